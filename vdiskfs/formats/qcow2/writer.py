"""The qcow2 write path: cluster allocation, copy-on-write, zero clusters and discard.

Every step here runs between two awaits of the FUSE layer, so no other request can read a
half-done cluster update. The order inside one cluster update is: refcount increment,
data write, then the L2 entry; decrements are queued and applied by flush() only after
the tables that dropped the reference are on disk.
"""

from __future__ import annotations

from array import array

from vdiskfs.errors import CorruptImageError
from vdiskfs.formats.qcow2.mapping import (
    L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO, SECTOR_SIZE)

ALL_ALLOCATED = 0xFFFFFFFF
ALL_ZERO = 0xFFFFFFFF << 32


class ClusterWriter:
    """Applies guest writes and discards to one qcow2 layer's active tables."""

    def __init__(self, driver) -> None:
        self.driver = driver
        self.mapper = driver.mapper
        self.refcounts = driver.refcounts
        self.cluster_size = driver.cluster_size
        self.cluster_bits = driver.header.cluster_bits
        self.extended_l2 = driver.header.extended_l2
        self.entry_words = 2 if self.extended_l2 else 1
        self.subcluster_size = self.mapper.subcluster_size
        self.has_data_file = self.mapper.has_data_file
        self.data_file_raw = driver.data_file_raw
        self.zero_clusters = driver.header.version >= 3 and not self.data_file_raw
        self.zero_cluster_bytes = bytes(self.cluster_size)

    # -- L2 tables ------------------------------------------------------------

    def l2_table_for_write(self, cluster_index: int):
        """Return (L2 table offset, table, entry position), allocating or copying the table.

        An L2 table that an internal snapshot shares (QCOW_OFLAG_COPIED clear in its L1
        entry) is copied first, so the snapshot never changes.
        """
        l1_index, l2_offset, l2_index = self.mapper.l2_location(cluster_index)
        l1_table = self.driver.l1_table
        if l1_index >= len(l1_table):
            raise CorruptImageError(f"guest cluster {cluster_index} lies beyond the L1 table")
        position = l2_index * self.entry_words

        if l2_offset and l1_table[l1_index] & QCOW_OFLAG_COPIED:
            return l2_offset, self.driver.l2_cache.get(l2_offset), position

        if l2_offset:
            table = array("Q", self.driver.l2_cache.get(l2_offset))
            self._share_clusters_of(table)
        else:
            table = array("Q", bytes(self.cluster_size))

        new_offset = self.refcounts.allocate()
        self.driver.l2_cache.put(new_offset, table)
        l1_table[l1_index] = new_offset | QCOW_OFLAG_COPIED
        self.driver.l1_dirty = True
        if l2_offset:
            self.refcounts.release_later(l2_offset, self.cluster_size)
        return new_offset, table, position

    def _share_clusters_of(self, table: array) -> None:
        """Clear QCOW_OFLAG_COPIED in a copied L2 table.

        Creating a snapshot already raised the refcount of every data cluster that the
        snapshot's L1 table reaches, so the copy adds no reference of its own.
        """
        for position in range(0, len(table), self.entry_words):
            entry = table[position]
            if not entry & QCOW_OFLAG_COMPRESSED:
                table[position] = entry & ~QCOW_OFLAG_COPIED

    def compressed_extent(self, entry: int) -> tuple:
        """Return the (offset, length) of the host sectors a compressed cluster occupies."""
        mapper = self.mapper
        descriptor = entry & ((1 << 62) - 1)
        host_offset = descriptor & mapper.coffset_mask
        sectors = ((descriptor >> mapper.csize_shift) & mapper.csize_mask) + 1
        return host_offset & ~(SECTOR_SIZE - 1), sectors * SECTOR_SIZE

    def release_entry(self, entry: int) -> None:
        """Queue the decrement of whatever host clusters an L2 entry referenced."""
        if entry & QCOW_OFLAG_COMPRESSED:
            offset, length = self.compressed_extent(entry)
            self.refcounts.release_later(offset, length)
        elif entry & L2E_OFFSET_MASK and not self.has_data_file:
            self.refcounts.release_later(entry & L2E_OFFSET_MASK, self.cluster_size)

    # -- writes ---------------------------------------------------------------

    def write(self, offset: int, data: memoryview) -> None:
        position = 0
        mask = self.cluster_size - 1
        while position < len(data):
            guest_offset = offset + position
            in_cluster = guest_offset & mask
            length = min(len(data) - position, self.cluster_size - in_cluster)
            self.write_cluster(guest_offset >> self.cluster_bits, in_cluster,
                               data[position:position + length])
            position += length

    def write_cluster(self, cluster_index: int, in_cluster: int, chunk: memoryview) -> None:
        whole = in_cluster == 0 and len(chunk) == self.cluster_size
        if whole and self.zero_clusters and self.zero_cluster_bytes.startswith(chunk):
            self.zero_cluster(cluster_index)
            return
        if self._zeros_already(cluster_index, chunk):
            return

        l2_offset, table, position = self.l2_table_for_write(cluster_index)
        entry = table[position]
        host_cluster = entry & L2E_OFFSET_MASK
        compressed = bool(entry & QCOW_OFLAG_COMPRESSED)
        owned = (not compressed and entry & QCOW_OFLAG_COPIED
                 and (host_cluster or self.has_data_file))
        if owned:
            # A damaged entry must not send the write past the end of the file.
            self.mapper.check_data_cluster(host_cluster, cluster_index << self.cluster_bits)
        if self.extended_l2 and not compressed:
            self._write_subclusters(cluster_index, in_cluster, chunk, l2_offset, table,
                                    position, owned)
            return

        plain_zero = not self.extended_l2 and entry & QCOW_OFLAG_ZERO
        if owned and not plain_zero:
            self.driver.write_host(host_cluster + in_cluster, chunk)
            return

        # Copy-on-write: a new cluster receives the current guest content with the chunk on top.
        guest_cluster = cluster_index << self.cluster_bits
        buffer = bytearray(self.cluster_size)
        if not whole:
            self.driver.read_guest_cluster(guest_cluster, memoryview(buffer))
        buffer[in_cluster:in_cluster + len(chunk)] = chunk

        new_host = self.allocate_data_cluster(guest_cluster)
        self.driver.write_host(new_host, buffer)
        table[position] = new_host | QCOW_OFLAG_COPIED
        if self.extended_l2:
            table[position + 1] = ALL_ALLOCATED
        self.driver.l2_cache.mark_dirty(l2_offset, table)
        if new_host != host_cluster or compressed:
            # The old cluster was shared, compressed or a preallocated zero cluster.
            self.release_entry(entry)

    def _zeros_already(self, cluster_index: int, chunk: memoryview) -> bool:
        """Tell whether `chunk` is zeros written to a cluster that already reads as zeros.

        Only an unallocated cluster without a backing file qualifies, so mkfs writing zeroed
        tables into an empty image allocates nothing.
        """
        if self.driver.backing is not None or self.data_file_raw:
            return False
        # Most writes carry data, and memcmp stops at the first non-zero byte, so this test
        # comes before the L2 lookup. bytes.startswith uses memcmp; memoryview == bytes does not.
        if not self.zero_cluster_bytes.startswith(chunk):
            return False
        entry, bitmap = self.mapper.l2_entry(cluster_index)
        return not entry and not bitmap

    def allocate_data_cluster(self, guest_cluster: int) -> int:
        if self.has_data_file:
            # External data files map every guest cluster at its own offset.
            return guest_cluster
        return self.refcounts.allocate()

    def _write_subclusters(self, cluster_index, in_cluster, chunk, l2_offset, table, position,
                           owned) -> None:
        """Write into an extended-L2 cluster; only the touched subclusters change state."""
        entry = table[position]
        bitmap = table[position + 1]
        allocated = bitmap & ALL_ALLOCATED
        zeros = bitmap >> 32
        size = self.subcluster_size
        first = in_cluster // size
        last = (in_cluster + len(chunk) - 1) // size
        touched = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)

        guest_cluster = cluster_index << self.cluster_bits
        span_start, span_end = first * size, (last + 1) * size
        buffer = bytearray(span_end - span_start)
        if span_start != in_cluster or span_end != in_cluster + len(chunk):
            # Fill the touched subclusters' untouched parts from their current content.
            self.driver.read_guest_range(guest_cluster + span_start, memoryview(buffer))
        buffer[in_cluster - span_start:in_cluster - span_start + len(chunk)] = chunk

        host_cluster = entry & L2E_OFFSET_MASK
        if owned:
            self.driver.write_host(host_cluster + span_start, buffer)
            new_entry = entry
        else:
            new_host = self.allocate_data_cluster(guest_cluster)
            if allocated & ~touched:
                # A shared cluster: carry over the allocated subclusters that stay.
                old = bytearray(self.cluster_size)
                self.driver.read_host(host_cluster, memoryview(old))
                old[span_start:span_end] = buffer
                self.driver.write_host(new_host, old)
            else:
                self.driver.write_host(new_host + span_start, buffer)
            new_entry = new_host | QCOW_OFLAG_COPIED
            if host_cluster and new_host != host_cluster:
                self.release_entry(entry)

        table[position] = new_entry
        table[position + 1] = ((zeros & ~touched) << 32) | (allocated | touched)
        self.driver.l2_cache.mark_dirty(l2_offset, table)

    # -- zeroing and discard ---------------------------------------------------

    def zero_cluster(self, cluster_index: int) -> None:
        """Make a whole guest cluster read as zeros without storing data."""
        entry, bitmap = self.mapper.l2_entry(cluster_index)
        if not entry and not bitmap and self.driver.backing is None:
            return  # unallocated without a backing file already reads as zeros

        l2_offset, table, position = self.l2_table_for_write(cluster_index)
        entry = table[position]
        if self.extended_l2:
            table[position] = 0
            table[position + 1] = ALL_ZERO
        else:
            table[position] = QCOW_OFLAG_ZERO
        self.driver.l2_cache.mark_dirty(l2_offset, table)
        self.release_entry(entry)

    def discard(self, offset: int, length: int) -> None:
        """Release whole clusters of [offset, offset + length); zero the partial edges."""
        end = offset + length
        mask = self.cluster_size - 1
        first_whole = (offset + mask) & ~mask
        last_whole = end & ~mask
        if first_whole >= last_whole:
            self.write(offset, memoryview(bytes(length)))
            return
        if offset < first_whole:
            self.write(offset, memoryview(bytes(first_whole - offset)))
        for cluster_index in range(first_whole >> self.cluster_bits, last_whole >> self.cluster_bits):
            self.discard_cluster(cluster_index)
        if last_whole < end:
            self.write(last_whole, memoryview(bytes(end - last_whole)))

    def discard_cluster(self, cluster_index: int) -> None:
        entry, bitmap = self.mapper.l2_entry(cluster_index)
        if self.driver.backing is not None or self.data_file_raw:
            # Reads must keep returning zeros, not the backing file's data.
            if self.data_file_raw or not self.zero_clusters:
                self.write(cluster_index << self.cluster_bits, memoryview(self.zero_cluster_bytes))
            else:
                self.zero_cluster(cluster_index)
            return
        if not entry and not bitmap:
            return
        l2_offset, table, position = self.l2_table_for_write(cluster_index)
        entry = table[position]
        table[position] = 0
        if self.extended_l2:
            table[position + 1] = 0
        self.driver.l2_cache.mark_dirty(l2_offset, table)
        self.release_entry(entry)

