"""A bounded LRU cache of metadata tables (L2 tables), each one cluster long."""

from __future__ import annotations

import os
import sys
from array import array
from collections import OrderedDict
from typing import Callable


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
    damaged, so a bad table is never read or cached.
    """

    def __init__(self, fd: int, table_size: int, capacity_bytes: int,
                 validate: Callable[[int], None]) -> None:
        self.fd = fd
        self.table_size = table_size
        # At least two tables, so that an operation that spans a table boundary never
        # evicts the table it is still using.
        self.capacity = max(2, capacity_bytes // table_size)
        self.validate = validate
        self.tables: "OrderedDict[int, array]" = OrderedDict()

    def get(self, offset: int) -> array:
        """Return the table at host `offset`, loading it on a miss."""
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
            return table

        self.validate(offset)
        data = os.pread(self.fd, self.table_size, offset)
        if len(data) < self.table_size:
            data += bytes(self.table_size - len(data))
        table = decode_table(data)
        self.tables[offset] = table
        if len(self.tables) > self.capacity:
            self.tables.popitem(last=False)
        return table

    def forget(self, offset: int) -> None:
        self.tables.pop(offset, None)
