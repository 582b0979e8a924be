"""Refcounts: the refcount table and blocks, cluster allocation and freeing.

Every host cluster in use (header, L1 and L2 tables, refcount table and blocks, snapshot
tables, data) has a refcount above 0. Increments reach the file before the L2 and L1
entries that use them. Decrements wait in `pending` until the tables that dropped the
reference are on disk. A crash therefore leaves at worst leaked clusters, never a cluster
in use with refcount 0.
"""

from __future__ import annotations

import os
import sys
from array import array
from typing import List, Tuple

from vdiskfs.errors import CorruptImageError, VdiskError
from vdiskfs.formats.qcow2.cache import TableCache, decode_table, encode_table
from vdiskfs.hostfile import pread_exact

REFTABLE_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

_ARRAY_CODES = {3: "B", 4: "H", 5: "I", 6: "Q"}


class RefcountOverflowError(VdiskError):
    """A refcount would exceed the maximum that refcount_bits can store."""


def make_codec(refcount_order: int):
    """Return (decode, encode) functions for refcount blocks of 1 << refcount_order bits."""
    bits = 1 << refcount_order
    if refcount_order >= 3:
        code = _ARRAY_CODES[refcount_order]

        def decode(data: bytes):
            block = array(code)
            block.frombytes(data)
            if sys.byteorder == "little" and bits > 8:
                block.byteswap()
            return block

        def encode(block) -> bytes:
            if sys.byteorder == "little" and bits > 8:
                swapped = array(code, block)
                swapped.byteswap()
                return swapped.tobytes()
            return block.tobytes()

        return decode, encode

    # Sub-byte widths: bit 0 of an entry is the least significant bit of its byte.
    per_byte = 8 // bits
    mask = (1 << bits) - 1

    def decode_small(data: bytes):
        return array("B", [(byte >> (index * bits)) & mask
                           for byte in data for index in range(per_byte)])

    def encode_small(block) -> bytes:
        output = bytearray(len(block) // per_byte)
        for position, value in enumerate(block):
            output[position // per_byte] |= value << ((position % per_byte) * bits)
        return bytes(output)

    return decode_small, encode_small


class Refcounts:
    """Refcount table, refcount block cache and allocator of one qcow2 image file."""

    def __init__(self, driver, cache_bytes: int) -> None:
        self.driver = driver
        self.fd = driver.fd
        header = driver.header
        self.cluster_size = header.cluster_size
        self.cluster_bits = header.cluster_bits
        self.refcount_order = header.refcount_order
        self.max_refcount = (1 << (1 << header.refcount_order)) - 1
        self.block_entries = (self.cluster_size * 8) >> header.refcount_order
        self.block_bits = self.block_entries.bit_length() - 1

        self.table_offset = header.refcount_table_offset
        self.table_clusters = header.refcount_table_clusters
        self.table = decode_table(pread_exact(
            self.fd, self.table_clusters * self.cluster_size, self.table_offset))
        self.table_dirty = False
        self.table_moved = False
        self.old_tables: List[Tuple[int, int]] = []

        decode, encode = make_codec(header.refcount_order)
        self.blocks = TableCache(self.fd, self.cluster_size, cache_bytes, self._validate_block,
                                 decode, encode)
        self.pending: List[Tuple[int, int]] = []  # (cluster index, count) to decrement later
        self.free_hint = 0
        self.end_cluster = -(-driver.file_size() // self.cluster_size)

    def _validate_block(self, offset: int) -> None:
        if offset % self.cluster_size:
            raise CorruptImageError(f"refcount block offset {offset:#x} is not aligned to a cluster")
        if offset + self.cluster_size > self.driver.file_size():
            raise CorruptImageError(f"refcount block offset {offset:#x} lies past the end of the file")

    # -- lookups --------------------------------------------------------------

    def get(self, cluster_index: int) -> int:
        table_index = cluster_index >> self.block_bits
        if table_index >= len(self.table):
            return 0
        block_offset = self.table[table_index] & REFTABLE_OFFSET_MASK
        if not block_offset:
            return 0
        block = self.blocks.get(block_offset)
        return block[cluster_index & (self.block_entries - 1)]

    # -- changes --------------------------------------------------------------

    def update(self, cluster_index: int, delta: int) -> None:
        """Add `delta` to the refcount of one cluster, allocating its refcount block if needed."""
        if delta < 0 and self.get(cluster_index) + delta < 0:
            # Checked before any block or table is allocated, because a damaged entry can
            # name a cluster far past the end of the file.
            raise CorruptImageError(
                f"refcount of cluster {cluster_index << self.cluster_bits:#x} would drop below 0")
        table_index = cluster_index >> self.block_bits
        block_offset = self._block_for(table_index)
        block = self.blocks.get(block_offset)
        index = cluster_index & (self.block_entries - 1)
        value = block[index] + delta
        if value < 0:
            raise CorruptImageError(
                f"refcount of cluster {cluster_index << self.cluster_bits:#x} would drop below 0")
        if value > self.max_refcount:
            raise RefcountOverflowError(
                f"refcount of cluster {cluster_index << self.cluster_bits:#x} would exceed "
                f"{self.max_refcount}, the maximum of {1 << self.refcount_order}-bit refcounts")
        block[index] = value
        self.blocks.mark_dirty(block_offset, block)
        if value == 0:
            self._cluster_freed(cluster_index)

    def update_range(self, offset: int, length: int, delta: int) -> None:
        """Add `delta` to the refcount of every cluster that [offset, offset + length) touches."""
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        for cluster_index in range(first, last + 1):
            self.update(cluster_index, delta)

    def release_later(self, offset: int, length: int) -> None:
        """Queue a decrement for every cluster of a range; flush() applies it after the tables."""
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        for cluster_index in range(first, last + 1):
            self.pending.append((cluster_index, 1))

    def apply_pending(self) -> None:
        pending, self.pending = self.pending, []
        for cluster_index, count in pending:
            self.update(cluster_index, -count)

    def _cluster_freed(self, cluster_index: int) -> None:
        self.free_hint = min(self.free_hint, cluster_index)
        self.driver.cluster_freed(cluster_index << self.cluster_bits)

    # -- allocation -----------------------------------------------------------

    def allocate(self, count: int = 1) -> int:
        """Allocate `count` contiguous clusters with refcount 1; return the host offset.

        Free clusters (refcount 0) inside the file are reused before the file grows.
        """
        start = self._find_free(count)
        for cluster_index in range(start, start + count):
            self.update(cluster_index, 1)
        self.end_cluster = max(self.end_cluster, start + count)
        return start << self.cluster_bits

    def _find_free(self, count: int) -> int:
        index = self.free_hint
        run_start, run_length = index, 0
        while index < self.end_cluster:
            if self.get(index) == 0:
                if run_length == 0:
                    run_start = index
                run_length += 1
                if run_length == count:
                    self.free_hint = run_start + count
                    return run_start
            else:
                run_length = 0
            index += 1
        if run_length == 0:
            run_start = max(self.end_cluster, self.free_hint)
        # Clusters past the end of the file can still have refcounts (a truncated image, or
        # a refcount block that covers more than the file), and those are in use.
        while any(self.get(candidate) for candidate in range(run_start, run_start + count)):
            run_start += 1
        self.free_hint = run_start + count
        return run_start

    def _block_for(self, table_index: int) -> int:
        """Return the refcount block for `table_index`, creating it (and a larger table) when missing."""
        if table_index >= len(self.table):
            self._grow_table(table_index + 1)
        block_offset = self.table[table_index] & REFTABLE_OFFSET_MASK
        if block_offset:
            return block_offset

        # Place the new block at the end of the used area; it usually describes itself.
        block_index = max(self.end_cluster, self.free_hint)
        while self.get(block_index) != 0:
            block_index += 1
        block_offset = block_index << self.cluster_bits
        decode, _ = make_codec(self.refcount_order)
        self.blocks.put(block_offset, decode(bytes(self.cluster_size)))
        self.table[table_index] = block_offset
        self.table_dirty = True
        self.end_cluster = max(self.end_cluster, block_index + 1)
        self.update(block_index, 1)
        return block_offset

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a larger area at the end of the file, as QEMU does."""
        entries_per_cluster = self.cluster_size // 8
        # Leave room for the blocks that the table's own clusters and some growth need.
        wanted = max(min_entries, len(self.table) * 2, entries_per_cluster)
        new_clusters = -(-wanted // entries_per_cluster)
        new_index = max(self.end_cluster, self.free_hint)
        while any(self.get(index) for index in range(new_index, new_index + new_clusters)):
            new_index += 1

        old = (self.table_offset, self.table_clusters)
        new_table = decode_table(bytes(new_clusters * self.cluster_size))
        new_table[:len(self.table)] = self.table
        self.table = new_table
        self.table_offset = new_index << self.cluster_bits
        self.table_clusters = new_clusters
        self.table_dirty = True
        self.table_moved = True
        self.end_cluster = max(self.end_cluster, new_index + new_clusters)
        for index in range(new_index, new_index + new_clusters):
            self.update(index, 1)
        self.old_tables.append(old)

    # -- writing --------------------------------------------------------------

    def write_dirty(self, sync) -> None:
        """Write dirty blocks, then the table, then the header fields, with syncs between."""
        wrote = self.blocks.write_dirty()
        if self.table_dirty:
            if wrote:
                sync()
            os.pwrite(self.fd, encode_table(self.table), self.table_offset)
            self.table_dirty = False
        if self.table_moved:
            sync()
            self.driver.write_header_field(48, ">QI", self.table_offset, self.table_clusters)
            self.table_moved = False
            for offset, clusters in self.old_tables:
                self.release_later(offset, clusters * self.cluster_size)
            self.old_tables = []
