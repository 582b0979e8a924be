"""Internal snapshots: create, apply and delete, with QEMU's refcount rules.

A snapshot owns a copy of the active L1 table. Every L2 table and data cluster that the
copy reaches gets one more reference, so QCOW_OFLAG_COPIED is cleared in the active
tables and the next guest write copies the cluster first.

Crash order: new references reach the disk before the snapshot table that needs them,
and a reference is dropped (refcounts.release_later) only after the tables that held it
are gone from the disk, so a crash leaves at worst leaked clusters.
"""

from __future__ import annotations

import os
import struct
import time
from array import array
from typing import List, Optional

from vdiskfs.errors import VdiskError
from vdiskfs.formats.qcow2.cache import decode_table, encode_table
from vdiskfs.formats.qcow2.mapping import L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED
from vdiskfs.formats.qcow2.rebuild import fix_copied_flags
from vdiskfs.formats.qcow2.snapshot import Snapshot, snapshot_table_length
from vdiskfs.hostfile import pread_exact

HEADER_SNAPSHOTS_OFFSET = 60  # nb_snapshots (4 bytes), then snapshots_offset (8 bytes)
EXTRA_DATA_SIZE = 24  # vm_state_size (8), disk_size (8), icount (8), as QEMU writes it
_ENTRY_FIXED = struct.Struct(">QIHHIIQII")


class SnapshotError(VdiskError):
    """A snapshot operation cannot be done: the name is unknown, or refcounts would overflow."""


def find_snapshot(driver, name_or_id: str) -> Optional[int]:
    """Return the index of the snapshot whose ID, or else whose name, is `name_or_id`."""
    for index, snapshot in enumerate(driver.snapshots):
        if snapshot.id_str == name_or_id:
            return index
    for index, snapshot in enumerate(driver.snapshots):
        if snapshot.name == name_or_id:
            return index
    return None


def read_snapshot_l1(driver, snapshot: Snapshot) -> array:
    return decode_table(pread_exact(driver.fd, snapshot.l1_size * 8, snapshot.l1_table_offset))


def encode_snapshot_table(snapshots: List[Snapshot]) -> bytes:
    parts = []
    for snapshot in snapshots:
        entry = _ENTRY_FIXED.pack(
            snapshot.l1_table_offset, snapshot.l1_size, len(snapshot.id_bytes),
            len(snapshot.name_bytes), snapshot.date_sec, snapshot.date_nsec,
            snapshot.vm_clock_nsec, min(snapshot.vm_state_size, 0xFFFFFFFF),
            len(snapshot.extra_data))
        entry += snapshot.extra_data + snapshot.id_bytes + snapshot.name_bytes
        entry += bytes(-len(entry) % 8)
        parts.append(entry)
    return b"".join(parts)


def _references(driver, l1_table: array):
    """Yield (offset, length) of every L2 table and data cluster that `l1_table` reaches."""
    writer = driver.writer
    for l1_entry in l1_table:
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        yield l2_offset, driver.cluster_size
        table = driver.l2_cache.get(l2_offset)
        for position in range(0, len(table), writer.entry_words):
            entry = table[position]
            if entry & QCOW_OFLAG_COMPRESSED:
                yield writer.compressed_extent(entry)
            elif entry & L2E_OFFSET_MASK and not writer.has_data_file:
                yield entry & L2E_OFFSET_MASK, driver.cluster_size


def _clusters_of(driver, l1_table: array) -> List[int]:
    bits = driver.header.cluster_bits
    clusters = []
    for offset, length in _references(driver, l1_table):
        clusters.extend(range(offset >> bits, ((offset + length - 1) >> bits) + 1))
    return clusters


def _add_references(driver, l1_table: array) -> None:
    """Raise every refcount that `l1_table` reaches by one, after checking none overflows."""
    refcounts = driver.refcounts
    clusters = _clusters_of(driver, l1_table)
    needed = {}
    for index in clusters:
        needed[index] = needed.get(index, 0) + 1
    for index, count in needed.items():
        if refcounts.get(index) + count > refcounts.max_refcount:
            raise SnapshotError(
                f"refcount of cluster {index << driver.header.cluster_bits:#x} would exceed "
                f"{refcounts.max_refcount}, the maximum of {driver.header.refcount_bits}-bit refcounts")
    for index in clusters:
        refcounts.update(index, 1)


def _release_references(driver, l1_table: array) -> None:
    bits = driver.header.cluster_bits
    for index in _clusters_of(driver, l1_table):
        driver.refcounts.release_later(index << bits, 1)


def _write_snapshot_table(driver, snapshots: List[Snapshot]) -> None:
    """Write the snapshot table to new clusters, point the header at it and free the old one."""
    header = driver.header
    old_offset, old_length = header.snapshots_offset, snapshot_table_length(driver.snapshots)
    data = encode_snapshot_table(snapshots)
    new_offset = 0
    if data:
        clusters = -(-len(data) // driver.cluster_size)
        new_offset = driver.refcounts.allocate(clusters)
        os.pwrite(driver.fd, data + bytes(clusters * driver.cluster_size - len(data)), new_offset)
    driver.flush()

    driver.write_header_field(HEADER_SNAPSHOTS_OFFSET, ">IQ", len(snapshots), new_offset)
    header.nb_snapshots, header.snapshots_offset = len(snapshots), new_offset
    if driver.snapshots and old_length:
        driver.refcounts.release_later(old_offset, old_length)
    driver.snapshots = snapshots
    driver.snapshot_table_bytes = len(data)


def create_snapshot(driver, name: str, vm_clock_nsec: int = 0) -> Snapshot:
    """Take an internal snapshot of the active layer, as `qemu-img snapshot -c` does."""
    driver.require_writable()
    if driver.has_external_data_file():
        raise SnapshotError("images with an external data file cannot have internal snapshots")
    driver.flush()

    l1_table = array("Q", driver.l1_table)
    _add_references(driver, l1_table)
    l1_bytes = len(l1_table) * 8
    l1_offset = 0
    if l1_bytes:
        clusters = -(-l1_bytes // driver.cluster_size)
        l1_offset = driver.refcounts.allocate(clusters)
        os.pwrite(driver.fd, encode_table(l1_table) + bytes(clusters * driver.cluster_size - l1_bytes),
                  l1_offset)
    fix_copied_flags(driver)

    numeric_ids = [int(snapshot.id_str) for snapshot in driver.snapshots if snapshot.id_str.isdigit()]
    snapshot_id = str(max(numeric_ids, default=0) + 1)
    now = time.time_ns()
    extra = struct.pack(">QQq", 0, driver.virtual_size, 0)
    snapshot = Snapshot(l1_offset, len(l1_table), snapshot_id, name, now // 1_000_000_000,
                        now % 1_000_000_000, vm_clock_nsec, 0, driver.virtual_size, 0, extra,
                        snapshot_id.encode(), name.encode("utf-8"))
    _write_snapshot_table(driver, driver.snapshots + [snapshot])
    driver.flush()
    return snapshot


def _prepare_change(driver, name_or_id: str) -> int:
    """Check that the image is writable, flush it, and return the snapshot's index."""
    driver.require_writable()
    index = find_snapshot(driver, name_or_id)
    if index is None:
        raise SnapshotError("not found")
    driver.flush()
    return index


def delete_snapshot(driver, name_or_id: str) -> Snapshot:
    """Delete a snapshot and free what only it referenced, as `qemu-img snapshot -d` does."""
    index = _prepare_change(driver, name_or_id)
    snapshot = driver.snapshots[index]
    l1_table = read_snapshot_l1(driver, snapshot)
    remaining = driver.snapshots[:index] + driver.snapshots[index + 1:]
    _write_snapshot_table(driver, remaining)

    _release_references(driver, l1_table)
    if snapshot.l1_size:
        driver.refcounts.release_later(snapshot.l1_table_offset, snapshot.l1_size * 8)
    driver.flush()
    fix_copied_flags(driver)
    driver.flush()
    return snapshot


def apply_snapshot(driver, name_or_id: str) -> Snapshot:
    """Make a snapshot's content the active layer again, as `qemu-img snapshot -a` does."""
    index = _prepare_change(driver, name_or_id)
    snapshot = driver.snapshots[index]
    new_l1 = read_snapshot_l1(driver, snapshot)
    if snapshot.disk_size > driver.virtual_size or len(new_l1) > len(driver.l1_table):
        driver.resize(max(snapshot.disk_size, driver.virtual_size), min_l1_entries=len(new_l1))

    _add_references(driver, new_l1)
    old_l1 = array("Q", driver.l1_table)
    for position in range(len(driver.l1_table)):
        # COPIED flags in a snapshot's L1 table are not kept accurate; fix_copied_flags sets them.
        driver.l1_table[position] = new_l1[position] & L1E_OFFSET_MASK if position < len(new_l1) else 0
    driver.l1_dirty = True
    _release_references(driver, old_l1)
    driver.flush()

    if snapshot.disk_size != driver.virtual_size:
        driver.set_virtual_size(snapshot.disk_size)
    fix_copied_flags(driver)
    driver.flush()
    return snapshot
