"""The writable side of the qcow2 driver: writes, flush ordering, growth and header updates.

Flush order, which keeps the image consistent (at worst with leaked clusters) after a
crash at any point:
1. refcount blocks, then the refcount table, then the header fields that locate it;
2. sync, so the refcounts and the data clusters are durable;
3. L2 tables, then the L1 table, with a sync between them;
4. the queued refcount decrements, which are safe only once no table on disk uses the
   clusters any more.

Damage met while serving (a CorruptImageError from this layer's own metadata) marks the
image corrupt, as QEMU does. corruption_found() flushes what is cached, sets the corrupt
bit and switches the driver to read-only, so no write can build on damaged tables.
"""

from __future__ import annotations

import logging
import os
import struct
from array import array

from vdiskfs.errors import CorruptImageError, ReadOnlyError, UnsupportedFeatureError, VdiskError
from vdiskfs.formats.qcow2 import header as hdr
from vdiskfs.formats.qcow2.cache import encode_table
from vdiskfs.formats.qcow2.mapping import L1E_OFFSET_MASK
from vdiskfs.formats.qcow2.refcount import REFTABLE_OFFSET_MASK, Refcounts
from vdiskfs.formats.qcow2.snapshot import snapshot_table_length
from vdiskfs.formats.qcow2.writer import ClusterWriter

log = logging.getLogger(__name__)

HEADER_SIZE_OFFSET = 24  # size, crypt_method, l1_size, l1_table_offset
HEADER_INCOMPATIBLE_OFFSET = 72
HEADER_AUTOCLEAR_OFFSET = 88


class WritableMixin:
    """Write support for Qcow2Driver; set up by enable_writes() when the image opens read-write."""

    def enable_writes(self) -> None:
        self.refcounts = Refcounts(self, max(self.cache_size // 4, 4 * self.cluster_size))
        self.writer = ClusterWriter(self)
        self.l1_dirty = False
        self.unsynced = False
        self.prepared = False
        self.set_dirty_bit = False
        self.l2_cache.before_dirty_eviction = self.flush
        self.metadata_clusters = None
        self.marking_corrupt = False

    # -- host file I/O ----------------------------------------------------------

    def write_host(self, offset: int, data) -> None:
        """Write to the data file (the image file unless an external data file is used)."""
        view = memoryview(data)
        if self.data_file_fd == self.fd:
            self._check_not_metadata(offset, len(view))
        while view:
            done = os.pwrite(self.data_file_fd, view, offset)
            view = view[done:]
            offset += done
        if self.data_file_fd == self.fd and offset > self._file_size:
            self._file_size = offset
        self.unsynced = True

    def read_host(self, offset: int, view: memoryview) -> None:
        done = os.preadv(self.data_file_fd, [view], offset)
        if done < len(view):
            view[done:] = bytes(len(view) - done)

    def read_guest_range(self, offset: int, view: memoryview) -> None:
        """Fill `view` with the current guest content; bytes past the virtual size read as zeros."""
        covered = max(0, min(len(view), self.virtual_size - offset))
        if covered:
            self.read_into(offset, view[:covered])
        if covered < len(view):
            view[covered:] = bytes(len(view) - covered)

    read_guest_cluster = read_guest_range

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def write_header_field(self, offset: int, fmt: str, *values) -> None:
        """Write header fields in place and make them durable."""
        os.pwrite(self.fd, struct.pack(fmt, *values), offset)
        self.sync()

    # -- guest requests ---------------------------------------------------------

    def require_writable(self) -> None:
        """Raise ReadOnlyError unless the image is open read-write; prepare it for writes."""
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        if not self.prepared:
            self._prepare_for_writes()

    def has_external_data_file(self) -> bool:
        return self.data_file_fd != self.fd

    def set_virtual_size(self, new_size: int) -> None:
        """Change the size field in the header only; the L1 table must already cover it."""
        self.write_header_field(HEADER_SIZE_OFFSET, ">Q", new_size)
        self.header.size = new_size
        self.virtual_size = new_size

    def _check_writable(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        if offset < 0 or offset + length > self.virtual_size:
            raise ValueError(f"range {offset}+{length} lies outside the virtual size {self.virtual_size}")
        if not self.prepared:
            self._prepare_for_writes()

    def write(self, offset: int, data) -> None:
        self._check_writable(offset, len(data))
        try:
            self.writer.write(offset, memoryview(data))
        except CorruptImageError as error:
            self.corruption_found(error)
            raise

    def discard(self, offset: int, length: int) -> None:
        self._check_writable(offset, length)
        try:
            self.writer.discard(offset, length)
        except CorruptImageError as error:
            self.corruption_found(error)
            raise

    # -- damage -----------------------------------------------------------------

    def _check_not_metadata(self, offset: int, length: int) -> None:
        """Raise CorruptImageError when a data write would land on a metadata cluster.

        The set of metadata clusters is built at the first data write and loses clusters
        as they are freed. Tables allocated later are not added: new clusters come from
        free space, so only damaged refcounts could put data on them.
        """
        if self.metadata_clusters is None:
            self.metadata_clusters = self._find_metadata_clusters()
        bits = self.header.cluster_bits
        for index in range(offset >> bits, ((offset + length - 1) >> bits) + 1):
            if index in self.metadata_clusters:
                raise CorruptImageError(
                    f"data write at host offset {offset:#x} would overwrite metadata in host "
                    f"cluster {index << bits:#x}")

    def _find_metadata_clusters(self) -> set:
        bits = self.header.cluster_bits
        clusters = {0}

        def add(offset: int, length: int) -> None:
            if length > 0:
                clusters.update(range(offset >> bits, ((offset + length - 1) >> bits) + 1))

        add(self.header.l1_table_offset, len(self.l1_table) * 8)
        refcounts = self.refcounts
        add(refcounts.table_offset, refcounts.table_clusters * self.cluster_size)
        for entry in refcounts.table:
            add(entry & REFTABLE_OFFSET_MASK, 1)
        for entry in self.l1_table:
            add(entry & L1E_OFFSET_MASK, 1)
        if self.snapshots:
            add(self.header.snapshots_offset, snapshot_table_length(self.snapshots))
        for snapshot in self.snapshots:
            add(snapshot.l1_table_offset, snapshot.l1_size * 8)
        return clusters

    def corruption_found(self, error: CorruptImageError) -> None:
        """Mark the image corrupt and serve it read-only from now on, when `error` is ours.

        An error that a backing layer raised carries that layer in `error.source` and
        changes nothing here. On a read-only image this only records the source.
        """
        source = getattr(error, "source", None)
        if source is None:
            error.source = source = self
        if source is not self or self.read_only or self.fd < 0:
            return
        if getattr(self, "marking_corrupt", False):
            return
        self.marking_corrupt = True

        log.error("%s: damaged metadata found: %s; marking the image corrupt and serving it "
                  "read-only (run vdiskfs check)", self.filename, error)
        try:
            self._write_cached_metadata()
        except (VdiskError, OSError) as flush_error:
            log.error("%s: flush before marking the image corrupt failed: %s",
                      self.filename, flush_error)
        self.read_only = True
        if self.header.version >= 3:
            self.header.incompatible_features |= hdr.INCOMPAT_CORRUPT
            try:
                self.write_header_field(HEADER_INCOMPATIBLE_OFFSET, ">Q",
                                        self.header.incompatible_features)
            except OSError as write_error:
                log.error("%s: setting the corrupt bit failed: %s", self.filename, write_error)
        # NOTE: version 2 images have no corrupt bit, so only this process stops writing.

    def _prepare_for_writes(self) -> None:
        """Clear autoclear bits vdiskfs does not maintain and, with lazy refcounts, set the dirty bit."""
        header = self.header
        keep = header.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW
        if header.version >= 3 and header.autoclear_features != keep:
            # Bitmaps and unknown autoclear features would go stale under our writes.
            log.info("%s: clearing autoclear feature bits %#x before the first write",
                     self.filename, header.autoclear_features & ~keep)
            self.write_header_field(HEADER_AUTOCLEAR_OFFSET, ">Q", keep)
            header.autoclear_features = keep
        if header.version >= 3 and header.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS:
            header.incompatible_features |= hdr.INCOMPAT_DIRTY
            self.write_header_field(HEADER_INCOMPATIBLE_OFFSET, ">Q", header.incompatible_features)
            self.set_dirty_bit = True
        self.prepared = True

    # -- flush ------------------------------------------------------------------

    def flush(self) -> None:
        try:
            self._write_cached_metadata()
        except CorruptImageError as error:
            self.corruption_found(error)
            raise

    def _write_cached_metadata(self) -> None:
        if self.read_only or self.fd < 0:
            return
        refcounts = self.refcounts

        refcounts.write_dirty(self.sync)
        if self.data_file_fd != self.fd and self.unsynced:
            os.fsync(self.data_file_fd)
        self.sync()
        self.unsynced = False

        wrote = self.l2_cache.write_dirty()
        if self.l1_dirty:
            if wrote:
                self.sync()
            self._write_l1_table(self.header.l1_table_offset, self.l1_table)
            self.l1_dirty = False
            wrote = True
        if wrote:
            self.sync()

        if refcounts.pending:
            refcounts.apply_pending()
            refcounts.write_dirty(self.sync)
            self.sync()
        self._file_size = os.fstat(self.fd).st_size

    def _write_l1_table(self, offset: int, table: array) -> None:
        data = encode_table(table)
        os.pwrite(self.fd, data, offset)

    def cluster_freed(self, offset: int) -> None:
        """Forget cached copies of a cluster whose refcount dropped to 0."""
        if self.metadata_clusters is not None:
            self.metadata_clusters.discard(offset >> self.header.cluster_bits)
        self.l2_cache.forget(offset)
        self.forget_decompressed()

    def close_writable(self) -> None:
        self.flush()
        if self.set_dirty_bit:
            self.header.incompatible_features &= ~hdr.INCOMPAT_DIRTY
            self.write_header_field(HEADER_INCOMPATIBLE_OFFSET, ">Q", self.header.incompatible_features)
            self.set_dirty_bit = False

    # -- growth -----------------------------------------------------------------

    def resize(self, new_size: int, min_l1_entries: int = 0) -> None:
        """Grow the virtual size; the L1 table moves to a larger area when it must grow.

        `min_l1_entries` requests an L1 table of at least that many entries, which applying
        a snapshot whose L1 table also maps VM state needs.
        """
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        if new_size < self.virtual_size:
            raise UnsupportedFeatureError(
                f"shrinking {self.filename} from {self.virtual_size} to {new_size} bytes is not "
                f"supported, because it would discard guest data")
        if new_size == self.virtual_size and min_l1_entries <= len(self.l1_table):
            return
        if not self.prepared:
            self._prepare_for_writes()

        mapper = self.mapper
        bytes_per_l1_entry = self.cluster_size * mapper.l2_entries
        needed = max(-(-new_size // bytes_per_l1_entry), min_l1_entries)
        header = self.header
        if needed * 8 > hdr.MAX_L1_SIZE_BYTES:
            raise UnsupportedFeatureError(
                f"a virtual size of {new_size} bytes needs an L1 table above the 32 MiB limit")

        if needed <= len(self.l1_table):
            self.write_header_field(HEADER_SIZE_OFFSET, ">Q", new_size)
        else:
            self.flush()
            old_offset, old_entries = header.l1_table_offset, len(self.l1_table)
            new_table = array("Q", self.l1_table)
            new_table.extend([0] * (needed - old_entries))
            clusters = -(-needed * 8 // self.cluster_size)
            new_offset = self.refcounts.allocate(clusters)
            os.pwrite(self.fd, bytes(clusters * self.cluster_size), new_offset)
            self._write_l1_table(new_offset, new_table)
            self.refcounts.write_dirty(self.sync)
            self.sync()
            os.pwrite(self.fd, struct.pack(">QIIQ", new_size, header.crypt_method, needed, new_offset),
                      HEADER_SIZE_OFFSET)
            self.sync()
            header.l1_table_offset, header.l1_size = new_offset, needed
            self.l1_table = new_table
            mapper.l1_table = new_table
            if old_entries:
                self.refcounts.release_later(old_offset, old_entries * 8)
            self.flush()

        header.size = new_size
        self.virtual_size = new_size
        if self.data_file_raw and os.fstat(self.data_file_fd).st_size < new_size:
            os.ftruncate(self.data_file_fd, new_size)
