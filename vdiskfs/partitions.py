"""Reading MBR and GPT partition tables, and exposing one partition of a disk as a driver.

read_partitions() returns the partitions that Linux would number the same way: MBR primary
partitions 1-4, logical partitions from 5 on in the order of their extended boot records
(EBRs), and GPT partitions numbered by their entry index plus one. Extended partitions
themselves are not returned, because they contain only EBRs and logical partitions.

A table that fails validation yields no partitions and one log line, and the disk itself stays
usable. Validation checks signatures, CRCs, that entries lie inside the disk and do not
overlap, and that the chain of EBRs does not loop.

Caveats: only 512-byte logical sectors are read, so a GPT written for 4096-byte sectors is
not found.
"""

from __future__ import annotations

import logging
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, List

from vdiskfs.driver import Driver, Run, RunKind
from vdiskfs.errors import ReadOnlyError, UnsupportedFeatureError
from vdiskfs.readplan import ReadPlan

log = logging.getLogger(__name__)

SECTOR_SIZE = 512

MBR_SIGNATURE = b"\x55\xaa"
MBR_ENTRIES_OFFSET = 446
MBR_ENTRY_SIZE = 16
MBR_TYPE_EMPTY = 0x00
MBR_TYPE_GPT_PROTECTIVE = 0xEE
MBR_TYPES_EXTENDED = {0x05, 0x0F, 0x85}
# A longer chain of EBRs is treated as damaged, so a crafted chain cannot make the mount
# read without end. Real tables stay far below this number.
MAX_LOGICAL_PARTITIONS = 256

GPT_SIGNATURE = b"EFI PART"
GPT_HEADER_FORMAT = "<8sIIIIQQQQ16sQIII"
GPT_HEADER_MIN_SIZE = 92
GPT_ENTRY_FORMAT = "<16s16sQQQ72s"
GPT_ENTRY_MIN_SIZE = 128
# Bounds on the entry array, so that a damaged header cannot make us read gigabytes.
GPT_MAX_ENTRIES = 4096
GPT_MAX_ENTRY_SIZE = 4096

ReadFunction = Callable[[int, int], bytes]


class PartitionTableError(ValueError):
    """A partition table is present but invalid; the message names the bad field."""


@dataclass(frozen=True)
class Partition:
    """One partition: its Linux number and its byte range on the disk."""

    number: int
    offset: int
    size: int
    scheme: str  # "mbr" or "gpt"
    type_id: str  # MBR type byte as two hex digits, or the GPT type GUID

    @property
    def end(self) -> int:
        return self.offset + self.size


def read_partitions(read: ReadFunction, disk_size: int, disk_name: str = "disk") -> List[Partition]:
    """Return the partitions of a disk whose bytes `read(offset, length)` returns.

    An invalid table is logged as a warning that names `disk_name`, and yields [].
    """
    try:
        return parse_partition_table(read, disk_size)
    except PartitionTableError as error:
        log.warning("%s: ignoring the partition table: %s", disk_name, error)
        return []


def parse_partition_table(read: ReadFunction, disk_size: int) -> List[Partition]:
    """Return the partitions of an MBR or GPT disk; raise PartitionTableError when invalid."""
    if disk_size < 2 * SECTOR_SIZE:
        return []
    mbr = read(0, SECTOR_SIZE)
    if mbr[510:512] != MBR_SIGNATURE:
        return []
    entries = [_mbr_entry(mbr, index) for index in range(4)]
    if any(entry[0] not in (0x00, 0x80) for entry in entries):
        # Not a partition table: a boot sector of a file system also ends with 55 AA.
        return []
    if any(entry[1] == MBR_TYPE_GPT_PROTECTIVE for entry in entries):
        return _parse_gpt(read, disk_size)
    return _parse_mbr(read, disk_size, entries)


def _mbr_entry(sector: bytes, index: int) -> tuple:
    """Return (status, type, first LBA, sector count) of entry `index` of an MBR or EBR."""
    start = MBR_ENTRIES_OFFSET + index * MBR_ENTRY_SIZE
    status, kind, first_lba, sectors = struct.unpack_from("<B3xB3xII", sector, start)
    return status, kind, first_lba, sectors


def _parse_mbr(read: ReadFunction, disk_size: int, entries: list) -> List[Partition]:
    partitions = []
    extended = None
    for index, (_status, kind, first_lba, sectors) in enumerate(entries):
        if kind == MBR_TYPE_EMPTY or sectors == 0:
            continue
        offset, size = _checked_range(first_lba, sectors, 0, disk_size,
                                      f"MBR partition {index + 1}")
        if kind in MBR_TYPES_EXTENDED:
            if extended is not None:
                raise PartitionTableError(f"MBR partition {index + 1} is a second extended "
                                          f"partition")
            extended = (offset, size)
            continue
        partitions.append(Partition(index + 1, offset, size, "mbr", f"{kind:02x}"))
    if extended is not None:
        partitions.extend(_parse_logical(read, extended[0], extended[1]))
    _check_no_overlap(partitions)
    return partitions


def _parse_logical(read: ReadFunction, extended_offset: int,
                   extended_size: int) -> Iterator[Partition]:
    """Yield the logical partitions of the chain of EBRs in an extended partition.

    The first entry of each EBR is relative to that EBR, and the second one, the link to
    the next EBR, is relative to the start of the extended partition.
    """
    extended_end = extended_offset + extended_size
    ebr_offset = extended_offset
    seen = set()
    number = 5
    while True:
        if ebr_offset in seen:
            raise PartitionTableError(f"the EBR chain loops back to byte {ebr_offset}")
        if len(seen) >= MAX_LOGICAL_PARTITIONS:
            raise PartitionTableError(f"more than {MAX_LOGICAL_PARTITIONS} EBRs")
        seen.add(ebr_offset)

        ebr = read(ebr_offset, SECTOR_SIZE)
        if ebr[510:512] != MBR_SIGNATURE:
            raise PartitionTableError(f"EBR at byte {ebr_offset} has no 55 AA signature")
        _status, kind, first_lba, sectors = _mbr_entry(ebr, 0)
        if kind != MBR_TYPE_EMPTY and sectors:
            offset, size = _checked_range(first_lba, sectors, ebr_offset, extended_end,
                                          f"logical partition {number}")
            yield Partition(number, offset, size, "mbr", f"{kind:02x}")
            number += 1

        _status, link_kind, link_lba, link_sectors = _mbr_entry(ebr, 1)
        if link_kind == MBR_TYPE_EMPTY or link_sectors == 0:
            return
        ebr_offset, _ = _checked_range(link_lba, link_sectors, extended_offset, extended_end,
                                       f"EBR link after logical partition {number - 1}")


def _checked_range(first_lba: int, sectors: int, base: int, limit: int, description: str) -> tuple:
    """Return (offset, size) in bytes of a range of sectors that starts at `base`."""
    offset = base + first_lba * SECTOR_SIZE
    size = sectors * SECTOR_SIZE
    if first_lba == 0 and base == 0:
        raise PartitionTableError(f"{description} starts at sector 0, over the table itself")
    if offset + size > limit:
        raise PartitionTableError(f"{description} ends at byte {offset + size}, past the end at "
                                  f"byte {limit}")
    return offset, size


def _check_no_overlap(partitions: List[Partition]) -> None:
    ordered = sorted(partitions, key=lambda partition: partition.offset)
    for first, second in zip(ordered, ordered[1:]):
        if second.offset < first.end:
            raise PartitionTableError(f"partitions {first.number} and {second.number} overlap")


def _parse_gpt(read: ReadFunction, disk_size: int) -> List[Partition]:
    last_lba = disk_size // SECTOR_SIZE - 1
    try:
        return _parse_gpt_header(read, disk_size, 1)
    except PartitionTableError as primary_error:
        try:
            partitions = _parse_gpt_header(read, disk_size, last_lba)
        except PartitionTableError:
            raise primary_error from None
        log.warning("the primary GPT header is invalid (%s); using the backup header",
                    primary_error)
        return partitions


def _parse_gpt_header(read: ReadFunction, disk_size: int, header_lba: int) -> List[Partition]:
    sector = read(header_lba * SECTOR_SIZE, SECTOR_SIZE)
    if sector[:8] != GPT_SIGNATURE:
        raise PartitionTableError(f"no GPT header signature at sector {header_lba}")
    (_signature, _revision, header_size, header_crc, _reserved, my_lba, _alternate_lba,
     first_usable, last_usable, _disk_guid, entries_lba, entry_count, entry_size,
     entries_crc) = struct.unpack_from(GPT_HEADER_FORMAT, sector)
    if not GPT_HEADER_MIN_SIZE <= header_size <= SECTOR_SIZE:
        raise PartitionTableError(f"GPT header size {header_size} is invalid")
    checked = bytearray(sector[:header_size])
    checked[16:20] = bytes(4)
    if zlib.crc32(checked) != header_crc:
        raise PartitionTableError(f"GPT header CRC32 at sector {header_lba} does not match")
    if my_lba != header_lba:
        raise PartitionTableError(f"GPT header at sector {header_lba} names sector {my_lba}")
    if entry_count > GPT_MAX_ENTRIES or not (
            GPT_ENTRY_MIN_SIZE <= entry_size <= GPT_MAX_ENTRY_SIZE and entry_size % 8 == 0):
        raise PartitionTableError(f"GPT entry array of {entry_count} entries of {entry_size} "
                                  f"bytes is invalid")
    last_lba = disk_size // SECTOR_SIZE - 1
    if not 2 <= first_usable <= last_usable + 1 <= last_lba:
        raise PartitionTableError(f"GPT usable sectors {first_usable}-{last_usable} do not fit "
                                  f"a disk of {last_lba + 1} sectors")
    array_length = entry_count * entry_size
    if entries_lba * SECTOR_SIZE + array_length > disk_size:
        raise PartitionTableError(f"GPT entry array at sector {entries_lba} lies past the end")

    array = read(entries_lba * SECTOR_SIZE, array_length)
    if zlib.crc32(array) != entries_crc:
        raise PartitionTableError("GPT entry array CRC32 does not match")

    partitions = []
    for index in range(entry_count):
        type_guid, _unique, first, last, _attributes, _name = struct.unpack_from(
            GPT_ENTRY_FORMAT, array, index * entry_size)
        if type_guid == bytes(16):
            continue
        if not first_usable <= first <= last <= last_usable:
            raise PartitionTableError(f"GPT partition {index + 1} (sectors {first}-{last}) lies "
                                      f"outside the usable sectors {first_usable}-{last_usable}")
        partitions.append(Partition(index + 1, first * SECTOR_SIZE,
                                    (last - first + 1) * SECTOR_SIZE, "gpt",
                                    str(uuid.UUID(bytes_le=type_guid))))
    _check_no_overlap(partitions)
    return partitions


class PartitionDriver(Driver):
    """One partition of an open disk, as a disk of its own.

    Reads and writes go to the disk's driver at the partition's offset. The disk's driver
    stays owned by its own exported file, so close() here releases nothing.
    """

    format_name = "partition"

    def __init__(self, disk: Driver, partition: Partition) -> None:
        self.disk = disk
        self.partition = partition
        self.filename = disk.filename
        self.virtual_size = partition.size
        self.read_only = disk.read_only

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        return 0

    @classmethod
    def open(cls, filename: str, *, read_only: bool, cache_size: int) -> "PartitionDriver":
        raise UnsupportedFeatureError("a partition is opened through its disk")

    def map_range(self, offset: int, length: int) -> Iterator[Run]:
        yield Run(offset, length, RunKind.DATA, host_offset=self.partition.offset + offset)

    def plan_data(self, run: Run, plan: ReadPlan, start: int, end: int) -> None:
        self.disk.plan_into(run.host_offset, end - start, plan, start)

    def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        self.disk.write(self.partition.offset + offset, data)

    def flush(self) -> None:
        self.disk.flush()

    def close(self) -> None:
        pass

    def allocated_size(self) -> int:
        # NOTE: reported as fully allocated, because counting the image's clusters inside
        # the partition at every stat() would cost a walk of its L2 tables.
        return self.virtual_size

