"""A bounded LRU write-back cache of cluster-sized metadata tables (L2 tables, refcount blocks).

Write ordering is a property of the caches, not of scattered fsync calls: the driver's
flush() writes refcount blocks before the L2 tables that need them (see Qcow2Driver.flush).
"""

from __future__ import annotations

import os
import sys
from array import array
from collections import OrderedDict
from typing import Callable, Optional, Set


def decode_table(data: bytes) -> array:
    """Decode big-endian 64-bit table entries into an array of native integers."""
    table = array("Q")
    table.frombytes(data)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def encode_table(table: array) -> bytes:
    """Encode a table of native integers as big-endian bytes."""
    if sys.byteorder == "little":
        swapped = array("Q", table)
        swapped.byteswap()
        return swapped.tobytes()
    return table.tobytes()


class TableCache:
    """LRU cache of cluster-sized tables read from `fd`, bounded by a size in bytes.

    `validate(offset)` runs before a table is loaded and raises when the offset is
    damaged, so a bad table is never read or cached. A table changed in memory is marked
    with mark_dirty() and reaches the file only through write_dirty(). When a dirty table
    would be evicted, `before_dirty_eviction()` runs first; it must leave every table
    clean (the driver passes its own flush, which keeps the write order).
    """

    def __init__(self, fd: int, table_size: int, capacity_bytes: int,
                 validate: Callable[[int], None],
                 decode: Callable[[bytes], object] = decode_table,
                 encode: Callable[[object], bytes] = encode_table) -> None:
        self.fd = fd
        self.table_size = table_size
        # At least four tables, so that one write that touches a table of each kind
        # and spans a table boundary never evicts a table it still uses.
        self.capacity = max(4, capacity_bytes // table_size)
        self.validate = validate
        self.decode = decode
        self.encode = encode
        self.tables: "OrderedDict[int, object]" = OrderedDict()
        self.dirty: Set[int] = set()
        self.before_dirty_eviction: Optional[Callable[[], None]] = None

    def get(self, offset: int):
        """Return the table at host `offset`, loading it on a miss."""
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
            return table

        self.validate(offset)
        data = os.pread(self.fd, self.table_size, offset)
        if len(data) < self.table_size:
            data += bytes(self.table_size - len(data))
        table = self.decode(data)
        self._insert(offset, table)
        return table

    def put(self, offset: int, table) -> None:
        """Insert a table built in memory (a new or copied one) and mark it dirty."""
        self._insert(offset, table)
        self.dirty.add(offset)

    def mark_dirty(self, offset: int, table) -> None:
        """Mark `table`, changed in memory, for writing; re-insert it if it was evicted."""
        if offset not in self.tables:
            self._insert(offset, table)
        self.dirty.add(offset)

    def forget(self, offset: int) -> None:
        """Drop a table whose cluster was freed, without writing it."""
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    def write_dirty(self) -> bool:
        """Write every dirty table to the file; return whether anything was written."""
        if not self.dirty:
            return False
        for offset in sorted(self.dirty):
            os.pwrite(self.fd, self.encode(self.tables[offset]), offset)
        self.dirty.clear()
        return True

    def _insert(self, offset: int, table) -> None:
        self.tables[offset] = table
        self.tables.move_to_end(offset)
        while len(self.tables) > self.capacity:
            oldest = next(iter(self.tables))
            if oldest in self.dirty:
                if self.before_dirty_eviction is not None:
                    self.before_dirty_eviction()
                else:
                    self.write_dirty()
            self.tables.pop(oldest)
