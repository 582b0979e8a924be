"""The qcow2 internal snapshot table: parsing and validation."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from vdiskfs.errors import InvalidImageError
from vdiskfs.formats.qcow2.header import MAX_L1_SIZE_BYTES, Qcow2Header

_ENTRY_FIXED = struct.Struct(">QIHHIIQII")
_EXTRA_VM_STATE_SIZE = struct.Struct(">Q")
_EXTRA_DISK_SIZE = struct.Struct(">Q")
_EXTRA_ICOUNT = struct.Struct(">q")

# QEMU's limits: extra data per entry, and the whole table.
MAX_EXTRA_DATA_SIZE = 1024
MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024


@dataclass
class Snapshot:
    """One entry of the snapshot table."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    icount: int = -1
    extra_data: bytes = b""
    id_bytes: bytes = b""
    name_bytes: bytes = b""


def snapshot_table_length(snapshots: list) -> int:
    """Bytes the snapshot table occupies, each entry padded to a multiple of 8."""
    total = 0
    for snapshot in snapshots:
        entry = _ENTRY_FIXED.size + len(snapshot.extra_data) + len(snapshot.id_bytes) + len(snapshot.name_bytes)
        total += (entry + 7) & ~7
    return total


def read_snapshot_table(fd: int, header: Qcow2Header, file_size: int) -> list:
    """Read and validate the snapshot table; raise InvalidImageError naming the bad entry."""
    snapshots = []
    offset = header.snapshots_offset
    table_end = offset
    for index in range(header.nb_snapshots):
        entry = os.pread(fd, _ENTRY_FIXED.size, offset)
        if len(entry) < _ENTRY_FIXED.size:
            raise InvalidImageError(f"invalid snapshot table: entry {index} runs past the end of the file")
        (l1_table_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock_nsec,
         vm_state_size, extra_data_size) = _ENTRY_FIXED.unpack(entry)

        if extra_data_size > MAX_EXTRA_DATA_SIZE:
            raise InvalidImageError(
                f"invalid snapshot table: entry {index} has {extra_data_size} bytes of extra data "
                f"(limit {MAX_EXTRA_DATA_SIZE})")
        variable_size = extra_data_size + id_size + name_size
        variable = os.pread(fd, variable_size, offset + _ENTRY_FIXED.size)
        if len(variable) < variable_size:
            raise InvalidImageError(f"invalid snapshot table: entry {index} runs past the end of the file")

        extra = variable[:extra_data_size]
        id_str = variable[extra_data_size:extra_data_size + id_size].decode("utf-8", "replace")
        name = variable[extra_data_size + id_size:].decode("utf-8", "replace")

        disk_size = header.size
        icount = -1
        if extra_data_size >= 8:
            vm_state_size = _EXTRA_VM_STATE_SIZE.unpack_from(extra, 0)[0]
        if extra_data_size >= 16:
            disk_size = _EXTRA_DISK_SIZE.unpack_from(extra, 8)[0]
        if extra_data_size >= 24:
            icount = _EXTRA_ICOUNT.unpack_from(extra, 16)[0]

        if l1_size * 8 > MAX_L1_SIZE_BYTES:
            raise InvalidImageError(
                f"invalid snapshot table: snapshot '{name}' has l1_size {l1_size}, above the limit")
        if l1_table_offset % header.cluster_size or l1_table_offset + l1_size * 8 > file_size:
            raise InvalidImageError(
                f"invalid snapshot table: snapshot '{name}' has an invalid L1 table offset "
                f"{l1_table_offset:#x}")

        snapshots.append(Snapshot(
            l1_table_offset, l1_size, id_str, name, date_sec, date_nsec, vm_clock_nsec,
            vm_state_size, disk_size, icount, bytes(extra),
            bytes(variable[extra_data_size:extra_data_size + id_size]),
            bytes(variable[extra_data_size + id_size:])))
        offset += (_ENTRY_FIXED.size + variable_size + 7) & ~7
        table_end = offset
        if table_end - header.snapshots_offset > MAX_SNAPSHOT_TABLE_BYTES:
            raise InvalidImageError(
                f"invalid snapshot table: larger than {MAX_SNAPSHOT_TABLE_BYTES} bytes")
    return snapshots


def snapshot_fields(snapshot) -> dict:
    """Describe one snapshot with the keys of `qemu-img info --output=json`."""
    return {
        "id": snapshot.id_str,
        "name": snapshot.name,
        "vm-state-size": snapshot.vm_state_size,
        "date-sec": snapshot.date_sec,
        "date-nsec": snapshot.date_nsec,
        "vm-clock-sec": snapshot.vm_clock_nsec // 1_000_000_000,
        "vm-clock-nsec": snapshot.vm_clock_nsec % 1_000_000_000,
        "icount": snapshot.icount,
    }
