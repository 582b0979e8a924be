"""Translation of guest ranges to runs through the L1 and L2 tables.

One function turns a guest range into runs (unallocated, zero, data at a host offset,
compressed); read, write, discard and `map` all consume those runs.
"""

from __future__ import annotations

from typing import Iterator, Optional

from vdiskfs.driver import Run, RunKind
from vdiskfs.errors import CorruptImageError

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0

SUBCLUSTERS_PER_CLUSTER = 32
SECTOR_SIZE = 512


class Mapper:
    """Guest-to-host translation for one qcow2 layer (its active L1 table, or a snapshot's)."""

    def __init__(self, driver, l1_table) -> None:
        self.driver = driver
        self.l1_table = l1_table
        self.cluster_bits = driver.header.cluster_bits
        self.cluster_size = 1 << self.cluster_bits
        self.extended_l2 = driver.header.extended_l2
        self.entry_words = 2 if self.extended_l2 else 1
        self.l2_bits = self.cluster_bits - (4 if self.extended_l2 else 3)
        self.l2_entries = 1 << self.l2_bits
        self.subcluster_size = self.cluster_size // SUBCLUSTERS_PER_CLUSTER
        self.zero_flag_valid = driver.header.version >= 3 and not self.extended_l2
        self.has_data_file = driver.data_file_fd != driver.fd
        # Compressed cluster descriptor: the offset takes the low csize_shift bits and
        # the number of additional sectors the bits above, up to bit 61.
        self.csize_shift = 62 - (self.cluster_bits - 8)
        self.csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1

    def l2_location(self, cluster_index: int) -> tuple:
        """Return (l1_index, l2_offset or 0, index of the entry in its L2 table)."""
        l1_index = cluster_index >> self.l2_bits
        l2_index = cluster_index & (self.l2_entries - 1)
        if l1_index >= len(self.l1_table):
            return l1_index, 0, l2_index
        l2_offset = self.l1_table[l1_index] & L1E_OFFSET_MASK
        if l2_offset & (self.cluster_size - 1):
            raise CorruptImageError(
                f"L2 table offset {l2_offset:#x} in L1 entry {l1_index} is not aligned to a cluster")
        return l1_index, l2_offset, l2_index

    def l2_entry(self, cluster_index: int) -> tuple:
        """Return (L2 entry, subcluster bitmap) of a guest cluster; (0, 0) when unallocated."""
        _, l2_offset, l2_index = self.l2_location(cluster_index)
        if not l2_offset:
            return 0, 0
        table = self.driver.l2_cache.get(l2_offset)
        position = l2_index * self.entry_words
        if self.extended_l2:
            return table[position], table[position + 1]
        return table[position], 0

    def map_range(self, offset: int, length: int) -> Iterator[Run]:
        """Yield merged runs for [offset, offset + length), in guest order."""
        pending: Optional[Run] = None
        end = offset + length
        cluster_mask = self.cluster_size - 1
        while offset < end:
            cluster_index = offset >> self.cluster_bits
            in_cluster = offset & cluster_mask
            chunk = min(end - offset, self.cluster_size - in_cluster)
            for run in self.cluster_runs(cluster_index, in_cluster, chunk):
                if pending is not None and _can_merge(pending, run):
                    pending = Run(pending.guest_offset, pending.length + run.length, pending.kind,
                                  pending.host_offset, host_allocated=pending.host_allocated)
                    continue
                if pending is not None:
                    yield pending
                pending = run
            offset += chunk
        if pending is not None:
            yield pending

    def cluster_runs(self, cluster_index: int, in_cluster: int, length: int) -> Iterator[Run]:
        """Yield the runs of one guest cluster for [in_cluster, in_cluster + length)."""
        guest_cluster = cluster_index << self.cluster_bits
        guest_offset = guest_cluster + in_cluster
        entry, bitmap = self.l2_entry(cluster_index)

        if entry & QCOW_OFLAG_COMPRESSED:
            if bitmap:
                raise CorruptImageError(
                    f"compressed cluster at guest offset {guest_cluster:#x} has a non-zero "
                    f"subcluster bitmap {bitmap:#x}")
            yield self.compressed_run(entry, guest_cluster, guest_offset, length)
            return

        host_cluster = entry & L2E_OFFSET_MASK
        if self.extended_l2:
            yield from self.subcluster_runs(entry, bitmap, guest_cluster, in_cluster, length)
            return

        if self.zero_flag_valid and entry & QCOW_OFLAG_ZERO:
            if host_cluster:
                yield Run(guest_offset, length, RunKind.ZERO,
                          host_offset=host_cluster + in_cluster, host_allocated=True)
            else:
                yield Run(guest_offset, length, RunKind.ZERO)
        elif host_cluster == 0 and not (self.has_data_file and entry & QCOW_OFLAG_COPIED):
            yield Run(guest_offset, length, RunKind.UNALLOCATED)
        else:
            self.check_data_cluster(host_cluster, guest_cluster)
            yield Run(guest_offset, length, RunKind.DATA, host_offset=host_cluster + in_cluster)

    def subcluster_runs(self, entry: int, bitmap: int, guest_cluster: int, in_cluster: int,
                        length: int) -> Iterator[Run]:
        host_cluster = entry & L2E_OFFSET_MASK
        allocated_bits = bitmap & 0xFFFFFFFF
        zero_bits = bitmap >> 32
        if allocated_bits & zero_bits:
            raise CorruptImageError(
                f"subcluster bitmap {bitmap:#x} at guest offset {guest_cluster:#x} marks "
                f"subclusters both allocated and zero")
        if allocated_bits:
            if host_cluster == 0 and not (self.has_data_file and entry & QCOW_OFLAG_COPIED):
                raise CorruptImageError(
                    f"L2 entry at guest offset {guest_cluster:#x} has allocated subclusters "
                    f"but no host offset")
            self.check_data_cluster(host_cluster, guest_cluster)

        position = in_cluster
        end = in_cluster + length
        while position < end:
            index = position // self.subcluster_size
            run_end = min(end, (index + 1) * self.subcluster_size)
            guest_offset = guest_cluster + position
            if allocated_bits >> index & 1:
                yield Run(guest_offset, run_end - position, RunKind.DATA,
                          host_offset=host_cluster + position)
            elif zero_bits >> index & 1:
                yield Run(guest_offset, run_end - position, RunKind.ZERO,
                          host_offset=host_cluster + position if host_cluster else 0,
                          host_allocated=host_cluster != 0)
            else:
                yield Run(guest_offset, run_end - position, RunKind.UNALLOCATED,
                          host_offset=host_cluster + position if host_cluster else 0,
                          host_allocated=host_cluster != 0)
            position = run_end

    def compressed_run(self, entry: int, guest_cluster: int, guest_offset: int, length: int) -> Run:
        if self.has_data_file:
            raise CorruptImageError(
                f"compressed cluster at guest offset {guest_cluster:#x} in an image with an "
                f"external data file")
        descriptor = entry & ((1 << 62) - 1)
        host_offset = descriptor & self.coffset_mask
        sectors = ((descriptor >> self.csize_shift) & self.csize_mask) + 1
        compressed_length = sectors * SECTOR_SIZE - (host_offset & (SECTOR_SIZE - 1))
        if host_offset >= self.driver.file_size():
            raise CorruptImageError(
                f"compressed cluster at guest offset {guest_cluster:#x} starts at {host_offset:#x}, "
                f"past the end of the file")
        return Run(guest_offset, length, RunKind.COMPRESSED, host_offset=host_offset,
                   compressed_length=compressed_length, cluster_offset=guest_cluster)

    def check_data_cluster(self, host_cluster: int, guest_cluster: int) -> None:
        if host_cluster & (self.cluster_size - 1):
            raise CorruptImageError(
                f"data cluster offset {host_cluster:#x} for guest offset {guest_cluster:#x} is "
                f"not aligned to a cluster")
        if self.has_data_file:
            return
        if host_cluster == 0 or host_cluster >= self.driver.file_size():
            raise CorruptImageError(
                f"data cluster offset {host_cluster:#x} for guest offset {guest_cluster:#x} lies "
                f"outside the image file")
        metadata = self.driver.metadata_at(host_cluster)
        if metadata is not None:
            raise CorruptImageError(
                f"data cluster offset {host_cluster:#x} for guest offset {guest_cluster:#x} "
                f"overlaps the {metadata}")


def _can_merge(pending: Run, run: Run) -> bool:
    if pending.kind is not run.kind or pending.end != run.guest_offset:
        return False
    if pending.host_allocated != run.host_allocated:
        return False
    if run.kind is RunKind.DATA or run.host_allocated:
        return pending.host_offset + pending.length == run.host_offset
    return run.kind is not RunKind.COMPRESSED
