"""The qcow2 format driver: opening, validation and the read path.

Caveats: encrypted images (crypt_method 1 or 2) are rejected. Bitmaps are kept but not
interpreted.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import OrderedDict
from typing import Iterator, Optional

from vdiskfs.driver import Driver, Run, RunKind
from vdiskfs.errors import CorruptImageError, InvalidImageError
from vdiskfs.formats.qcow2 import header as hdr
from vdiskfs.formats.qcow2.cache import TableCache, decode_table
from vdiskfs.formats.qcow2.compression import decompress_cluster
from vdiskfs.formats.qcow2.header import Qcow2Header, parse_header
from vdiskfs.formats.qcow2.mapping import Mapper
from vdiskfs.formats.qcow2.snapshot import read_snapshot_table, snapshot_fields, snapshot_table_length
from vdiskfs.formats.qcow2.snapshot_ops import SnapshotError, find_snapshot, read_snapshot_l1
from vdiskfs.formats.qcow2.rebuild import repair_dirty_image
from vdiskfs.formats.qcow2.writable import WritableMixin
from vdiskfs.hostfile import file_size, open_host_file, pread_exact
from vdiskfs.readplan import ReadPlan

log = logging.getLogger(__name__)

# Decompressed clusters kept for reads that cover a compressed cluster piece by piece.
DECOMPRESSED_CACHE_BYTES = 8 * 1024 * 1024


class Qcow2Driver(WritableMixin, Driver):
    format_name = "qcow2"

    def __init__(self, filename: str, fd: int, read_only: bool, cache_size: int) -> None:
        self.filename = filename
        self.fd = fd
        self.data_file_fd = fd
        self.data_file_name: Optional[str] = None
        self.data_file_raw = False
        self.read_only = read_only
        self.cache_size = cache_size
        self._file_size = file_size(fd)

        self.header = self._read_header()
        # QEMU counts a disk in whole 512-byte sectors, so a size that is not a multiple of 512 (which
        # qemu-img never writes) is rounded down as QEMU rounds it.
        self.virtual_size = self.header.size & ~511
        self.cluster_size = self.header.cluster_size
        self.backing_filename = self.header.backing_filename
        self.backing_format = self.header.backing_format

        self._check_open_mode()
        if self.header.data_file is not None:
            self._open_data_file()

        self.l2_cache = TableCache(fd, self.cluster_size, cache_size, self._validate_l2_offset)
        self.l1_table = self._read_l1_table(self.header.l1_table_offset, self.header.l1_size)
        self.snapshots = read_snapshot_table(fd, self.header, self._file_size)
        self.snapshot_table_bytes = snapshot_table_length(self.snapshots)
        self.mapper = Mapper(self, self.l1_table)
        # Decompressed clusters by host offset, locked because plan steps may run in threads.
        self._decompressed: "OrderedDict[int, bytes]" = OrderedDict()
        self._decompressed_lock = threading.Lock()
        self._decompressed_capacity = max(1, DECOMPRESSED_CACHE_BYTES // self.cluster_size)
        if not self.read_only:
            self.enable_writes()
            if self.header.incompatible_features & hdr.INCOMPAT_DIRTY:
                repair_dirty_image(self)

    # -- opening --------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        if len(head) >= 8 and head[:4] == hdr.QCOW_MAGIC:
            version = int.from_bytes(head[4:8], "big")
            return 100 if version in (2, 3) else 50
        return 0

    @classmethod
    def open(cls, filename: str, *, read_only: bool, cache_size: int) -> "Qcow2Driver":
        fd = open_host_file(filename, read_only=True)
        try:
            return cls(filename, fd, read_only, cache_size)
        except BaseException:
            os.close(fd)
            raise

    def _read_header(self) -> Qcow2Header:
        first = os.pread(self.fd, hdr.V3_HEADER_LENGTH, 0)
        if len(first) < hdr.V2_HEADER_LENGTH or first[:4] != hdr.QCOW_MAGIC:
            return parse_header(first, self._file_size)
        cluster_bits = int.from_bytes(first[20:24], "big")
        if not hdr.MIN_CLUSTER_BITS <= cluster_bits <= hdr.MAX_CLUSTER_BITS:
            return parse_header(first, self._file_size)
        cluster = os.pread(self.fd, 1 << cluster_bits, 0)
        return parse_header(cluster, self._file_size)

    def _check_open_mode(self) -> None:
        features = self.header.incompatible_features
        if features & hdr.INCOMPAT_CORRUPT and not self.read_only:
            log.warning("%s: the image is marked corrupt; serving it read-only", self.filename)
            self.read_only = True
        if not self.read_only:
            self._reopen_read_write()

    def _reopen_read_write(self) -> None:
        """Replace the read-only descriptor with a read-write one under the same number.

        open() reads the header through a read-only descriptor, so that an image which turns
        out to be marked corrupt is never open for writing and keeps its access time.
        """
        read_write_fd = open_host_file(self.filename, read_only=False)
        try:
            before, after = os.fstat(self.fd), os.fstat(read_write_fd)
            if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino):
                raise InvalidImageError(f"{self.filename} was replaced while it was being opened")
            os.dup2(read_write_fd, self.fd, inheritable=False)
        finally:
            os.close(read_write_fd)
        self._file_size = file_size(self.fd)
        self.data_file_fd = self.fd

    def _open_data_file(self) -> None:
        name = self.header.data_file
        path = name if os.path.isabs(name) else os.path.join(os.path.dirname(self.filename), name)
        try:
            self.data_file_fd = open_host_file(path, self.read_only)
        except OSError as error:
            raise InvalidImageError(
                f"cannot open external data file {path}: {error.strerror}") from None
        self.data_file_name = path
        self.data_file_raw = bool(self.header.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW)

    def _read_l1_table(self, offset: int, entries: int):
        data = pread_exact(self.fd, entries * 8, offset)
        return decode_table(data)

    def _validate_l2_offset(self, offset: int) -> None:
        if offset + self.cluster_size > self._file_size:
            raise CorruptImageError(
                f"L2 table offset {offset:#x} lies past the end of the file ({self._file_size} bytes)")

    def file_size(self) -> int:
        return self._file_size

    def metadata_at(self, host_offset: int) -> Optional[str]:
        """Name the fixed metadata area (header, L1, refcount or snapshot table) at `host_offset`.

        A data cluster there means a damaged L2 entry; writing it would destroy the table.
        L2 tables and refcount blocks are not checked, because they are spread over the file.
        """
        if host_offset < self.cluster_size:
            return "image header"
        header = self.header
        refcounts = getattr(self, "refcounts", None)
        if refcounts is not None:
            reftable = (refcounts.table_offset, refcounts.table_clusters * self.cluster_size)
        else:
            reftable = (header.refcount_table_offset,
                        header.refcount_table_clusters * self.cluster_size)
        areas = (
            ("active L1 table", header.l1_table_offset, header.l1_size * 8),
            ("refcount table", *reftable),
            ("snapshot table", header.snapshots_offset, self.snapshot_table_bytes),
        )
        mask = self.cluster_size - 1
        for name, start, length in areas:
            # A table owns every cluster it touches, including the rest of its last one.
            if length and start <= host_offset < (start + length + mask) & ~mask:
                return name
        return None

    # -- reading --------------------------------------------------------------

    def map_range(self, offset: int, length: int) -> Iterator[Run]:
        try:
            yield from self.mapper.map_range(offset, length)
        except CorruptImageError as error:
            self.corruption_found(error)
            raise

    def plan_data(self, run: Run, plan: ReadPlan, start: int, end: int) -> None:
        if run.kind is RunKind.DATA:
            # The last cluster of a file, or an external data file, may end early, and the
            # plan reads zeros past the end.
            plan.host_read(self.data_file_fd, run.host_offset, start, end)
            return
        cluster = self._cached_cluster(run.host_offset)
        if cluster is not None:
            begin = run.guest_offset - run.cluster_offset
            plan.copy(start, cluster[begin:begin + end - start])
            return
        plan.call(functools.partial(self._read_compressed, run), start, end,
                  failed=self.corruption_found)

    def _read_compressed(self, run: Run, view: memoryview) -> None:
        # Safe in worker threads: it touches only the files and the locked cache.
        cluster = self._decompressed_cluster(run)
        start = run.guest_offset - run.cluster_offset
        view[:] = cluster[start:start + len(view)]

    def _cached_cluster(self, host_offset: int) -> Optional[bytes]:
        with self._decompressed_lock:
            cluster = self._decompressed.get(host_offset)
            if cluster is not None:
                self._decompressed.move_to_end(host_offset)
            return cluster

    def _decompressed_cluster(self, run: Run) -> bytes:
        cluster = self._cached_cluster(run.host_offset)
        if cluster is not None:
            return cluster

        compressed = os.pread(self.fd, run.compressed_length, run.host_offset)
        try:
            cluster = decompress_cluster(compressed, self.header.compression_type, self.cluster_size)
        except CorruptImageError as error:
            raise CorruptImageError(
                f"compressed cluster at host offset {run.host_offset:#x}: {error}") from None
        with self._decompressed_lock:
            self._decompressed[run.host_offset] = cluster
            if len(self._decompressed) > self._decompressed_capacity:
                self._decompressed.popitem(last=False)
        return cluster

    def forget_decompressed(self) -> None:
        """Drop every cached decompressed cluster."""
        with self._decompressed_lock:
            self._decompressed.clear()

    def select_snapshot(self, name_or_id: str) -> None:
        """Serve an internal snapshot's content, read-only, in place of the active layer."""
        index = find_snapshot(self, name_or_id)
        if index is None:
            names = ", ".join(f"{snapshot.id_str} ({snapshot.name})" for snapshot in self.snapshots)
            raise SnapshotError(f"snapshot '{name_or_id}' not found (snapshots: {names or 'none'})")
        if not self.read_only:
            raise SnapshotError("a snapshot can only be opened read-only")
        snapshot = self.snapshots[index]
        self.l1_table = read_snapshot_l1(self, snapshot)
        self.mapper = Mapper(self, self.l1_table)
        self.virtual_size = snapshot.disk_size
        self.snapshot = snapshot

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        if self.fd >= 0:
            if not self.read_only:
                self.close_writable()
            if self.data_file_fd != self.fd:
                os.close(self.data_file_fd)
            os.close(self.fd)
            self.fd = -1
            self.data_file_fd = -1
        super().close()

    # -- info -----------------------------------------------------------------

    def describe(self) -> dict:
        info = super().describe()
        header = self.header
        info["cluster-size"] = self.cluster_size
        info["dirty-flag"] = bool(header.incompatible_features & hdr.INCOMPAT_DIRTY)

        specific = {
            "compat": "1.1" if header.version >= 3 else "0.10",
            "compression-type": hdr.COMPRESSION_NAMES[header.compression_type],
            "refcount-bits": header.refcount_bits,
            "corrupt": bool(header.incompatible_features & hdr.INCOMPAT_CORRUPT),
            "extended-l2": header.extended_l2,
        }
        if header.version >= 3:
            specific["lazy-refcounts"] = bool(header.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS)
        if self.data_file_name is not None:
            specific["data-file"] = header.data_file
            specific["data-file-raw"] = bool(header.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW)
        specific["incompatible-features"] = self._feature_list(
            hdr.FEATURE_INCOMPATIBLE, header.incompatible_features)
        specific["compatible-features"] = self._feature_list(
            hdr.FEATURE_COMPATIBLE, header.compatible_features)
        specific["autoclear-features"] = self._feature_list(
            hdr.FEATURE_AUTOCLEAR, header.autoclear_features)
        info["format-specific"] = {"type": "qcow2", "data": specific}

        if self.snapshots:
            info["snapshots"] = [snapshot_fields(snapshot) for snapshot in self.snapshots]
        return info

    def _feature_list(self, kind: int, bits: int) -> list:
        names = []
        for bit in range(64):
            if bits & (1 << bit):
                names.append(self.header.feature_name(kind, bit) or f"bit {bit}")
        return names
