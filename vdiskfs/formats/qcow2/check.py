"""Consistency check and repair of qcow2 metadata, with the categories of `qemu-img check`.

The check walks every structure that references host clusters: the header cluster, the
active and snapshot L1 and L2 tables, the snapshot table, the refcount table and its
blocks. It counts the references per host cluster and compares them with the stored
refcounts. A stored refcount below the count is a corruption, one above it is a leak.
It then compares QCOW_OFLAG_COPIED in the active L1 and L2 entries with the refcounts.
Messages go to the `report` callback in the words qemu-img 7.2 prints, so that the output
of both tools can be compared line by line.

Every table is read with pread and never through the driver's caches, so damaged offsets
are reported instead of raised. References to clusters more than one cluster past the end
of the file are reported and not counted, which bounds the counting array by the file size.

Persistent bitmaps count as QEMU counts them: the bitmap directory, each bitmap table and
each cluster a table entry names, when the bitmaps autoclear bit is set.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from vdiskfs.errors import CorruptImageError
from vdiskfs.formats.qcow2 import header as hdr
from vdiskfs.formats.qcow2.cache import decode_table
from vdiskfs.formats.qcow2.mapping import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO,
    SECTOR_SIZE)
from vdiskfs.formats.qcow2.refcount import REFTABLE_OFFSET_MASK, make_codec
from vdiskfs.formats.qcow2.snapshot import snapshot_table_length
from vdiskfs.hostfile import pread_exact

# Reserved bits of table entries, as the qcow2 specification defines them.
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFTABLE_RESERVED_MASK = 0x1FF

# Bitmap directory entry: bitmap_table_offset, bitmap_table_size, flags, type,
# granularity_bits, name_size, extra_data_size; then extra data and name, padded to 8.
BITMAP_DIRECTORY_ENTRY = struct.Struct(">QIIBBHI")
BITMAP_EXTENSION = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size and offset
BITMAP_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
# QEMU's limit on the bitmap directory, which bounds what the check reads.
MAX_BITMAP_DIRECTORY_SIZE = 64 * 1024 * 1024

# The references counted per cluster are stored in 32 bits.
MAX_REFERENCES = 0xFFFFFFFF

FIX_LEAKS = 1
FIX_ERRORS = 2
REPAIR_MODES = {"leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

# Kinds of a standard L2 entry, named as QEMU names them.
UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC, NORMAL, COMPRESSED = range(5)


@dataclass
class CheckResult:
    """Counts of one check, keyed in to_json() as `qemu-img check --output=json` keys them."""

    filename: str
    format: str = "qcow2"
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0

    def exit_code(self) -> int:
        """Return qemu-img's exit status: 1 check error, 2 corruptions, 3 leaks only, else 0."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict:
        """Return the JSON object; like qemu-img, counts that are 0 are left out."""
        output = {}
        for key in ("image_end_offset", "total_clusters", "corruptions", "leaks",
                    "corruptions_fixed", "leaks_fixed"):
            if getattr(self, key):
                output[key.replace("_", "-")] = getattr(self, key)
        output["check-errors"] = self.check_errors
        for key in ("allocated_clusters", "fragmented_clusters", "compressed_clusters"):
            if getattr(self, key):
                output[key.replace("_", "-")] = getattr(self, key)
        output["filename"] = self.filename
        output["format"] = self.format
        return output

    def render_human(self) -> str:
        """Return the summary in the layout of `qemu-img check` without --output."""
        lines: List[str] = []
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        if self.corruptions:
            lines += ["", f"{self.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if self.leaks:
            lines += ["", f"{self.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if self.check_errors:
            lines += ["", f"{self.check_errors} internal errors have occurred during the check."]
        if self.total_clusters and self.allocated_clusters:
            allocated = self.allocated_clusters
            lines.append(
                f"{allocated}/{self.total_clusters} = "
                f"{allocated * 100.0 / self.total_clusters:.2f}% allocated, "
                f"{self.fragmented_clusters * 100.0 / allocated:.2f}% fragmented, "
                f"{self.compressed_clusters * 100.0 / allocated:.2f}% compressed clusters")
        if self.image_end_offset:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines)


@dataclass
class _Mismatch:
    cluster: int
    stored: int
    references: int


@dataclass
class _State:
    result: CheckResult
    references: array = field(default_factory=lambda: array("I"))
    mismatches: List[_Mismatch] = field(default_factory=list)
    # Set when a stored refcount is 0 for a referenced cluster, or a refcount table entry
    # is unusable: then only a full repair (FIX_ERRORS) may change refcounts.
    needs_rebuild: bool = False


class _StoredRefcounts:
    """Read-only lookups of stored refcounts with pread; one refcount block is kept."""

    def __init__(self, fd: int, header: hdr.Qcow2Header, table) -> None:
        self.fd = fd
        self.cluster_size = header.cluster_size
        self.block_entries = (header.cluster_size * 8) >> header.refcount_order
        self.block_bits = self.block_entries.bit_length() - 1
        self.table = table
        self.decode, _ = make_codec(header.refcount_order)
        self.file_size = os.fstat(fd).st_size
        self.block_offset = -1
        self.block = None

    def get(self, cluster_index: int) -> int:
        """Return the stored refcount; raise ValueError when its refcount block is unusable."""
        table_index = cluster_index >> self.block_bits
        if table_index >= len(self.table):
            return 0
        block_offset = self.table[table_index] & REFTABLE_OFFSET_MASK
        if not block_offset:
            return 0
        if block_offset & (self.cluster_size - 1):
            raise ValueError(f"refcount block offset {block_offset:#x} is not aligned to a cluster")
        if block_offset != self.block_offset:
            # A block past the end of the file reads as zeros, as in QEMU; the offset may
            # be too large for pread.
            data = b""
            if block_offset < self.file_size:
                data = pread_exact(self.fd, self.cluster_size, block_offset)
            self.block = self.decode(data.ljust(self.cluster_size, b"\0"))
            self.block_offset = block_offset
        return self.block[cluster_index & (self.block_entries - 1)]


class Qcow2Checker:
    """One check, and optionally one repair, of an open Qcow2Driver."""

    def __init__(self, driver, report: Callable[[str], None]) -> None:
        self.driver = driver
        self.report = report
        self.header = driver.header
        self.cluster_size = driver.cluster_size
        self.cluster_bits = driver.header.cluster_bits
        self.extended_l2 = driver.header.extended_l2
        self.entry_words = 2 if self.extended_l2 else 1
        self.has_data_file = driver.data_file_fd != driver.fd
        mapper = driver.mapper
        self.coffset_mask = mapper.coffset_mask
        self.csize_shift = mapper.csize_shift
        self.csize_mask = mapper.csize_mask
        self.max_refcount = min((1 << self.header.refcount_bits) - 1, MAX_REFERENCES)

    # -- checking ---------------------------------------------------------------

    def check(self) -> CheckResult:
        """Return the result of one check; nothing is written."""
        state, _ = self._check()
        return state.result

    def _check(self, copied_flags: bool = True):
        driver = self.driver
        result = CheckResult(filename=driver.filename)
        state = _State(result)
        file_size = os.fstat(driver.fd).st_size
        self.file_size = file_size
        file_clusters = -(-file_size // self.cluster_size)
        # NOTE: like QEMU's check, this takes memory in proportion to the file size (4 bytes
        # per cluster), about 8 GiB for a 1 TiB file of 512-byte clusters.
        state.references = array("I", bytes(4 * file_clusters))
        result.total_clusters = -(-self.header.size // self.cluster_size)

        reftable = decode_table(pread_exact(
            driver.fd, self.header.refcount_table_clusters * self.cluster_size,
            self.header.refcount_table_offset))
        stored = _StoredRefcounts(driver.fd, self.header, reftable)

        self._count(state, 0, self.cluster_size)
        self._check_l1(state, self.header.l1_table_offset, self.header.l1_size, active=True)
        for snapshot in driver.snapshots:
            self._check_l1(state, snapshot.l1_table_offset, snapshot.l1_size, active=False)
        if driver.snapshots:
            self._count(state, self.header.snapshots_offset, snapshot_table_length(driver.snapshots))
        self._count(state, self.header.refcount_table_offset,
                    self.header.refcount_table_clusters * self.cluster_size)
        self._count_bitmaps(state)
        self._check_refcount_blocks(state, reftable, file_clusters)

        highest = self._compare(state, stored, max(len(state.references), file_clusters))
        if copied_flags:
            self._check_copied_flags(state, stored, repair=False)
        result.image_end_offset = (highest + 1) * self.cluster_size
        return state, stored

    def _count(self, state: _State, offset: int, length: int) -> None:
        """Add one reference to every cluster of [offset, offset + length)."""
        if length <= 0:
            return
        if offset + length - self.file_size >= self.cluster_size:
            # The last cluster may be partly written, so less than a cluster past the end is fine.
            self.report(f"ERROR: counting reference for region exceeding the end of the file by "
                        f"one cluster or more: offset {offset:#x} size {length:#x}")
            state.result.corruptions += 1
            return
        references = state.references
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        if last >= len(references):
            references.extend(bytes(4 * (last + 1 - len(references))))
        for index in range(first, last + 1):
            if references[index] >= self.max_refcount:
                self.report(f"ERROR: overflow cluster offset={index << self.cluster_bits:#x}")
                state.result.corruptions += 1
                continue
            references[index] += 1

    def _read_table(self, offset: int, length: int):
        return decode_table(pread_exact(self.driver.fd, length, offset))

    def _check_l1(self, state: _State, l1_offset: int, l1_size: int, active: bool) -> None:
        self._count(state, l1_offset, l1_size * 8)
        l1_table = self._read_table(l1_offset, l1_size * 8)
        for entry in l1_table:
            if entry & L1E_RESERVED_MASK:
                self.report(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                state.result.corruptions += 1
            l2_offset = entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            self._count(state, l2_offset, self.cluster_size)
            if l2_offset & (self.cluster_size - 1):
                self.report(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                            f"L1 entry corrupted")
                state.result.corruptions += 1
                continue
            self._check_l2(state, l2_offset, active)

    def cluster_type(self, entry: int) -> int:
        if entry & QCOW_OFLAG_COMPRESSED:
            return COMPRESSED
        if entry & QCOW_OFLAG_ZERO and not self.extended_l2 and self.header.version >= 3:
            return ZERO_ALLOC if entry & L2E_OFFSET_MASK else ZERO_PLAIN
        if not entry & L2E_OFFSET_MASK:
            if self.has_data_file and entry & QCOW_OFLAG_COPIED:
                return NORMAL
            return UNALLOCATED
        return NORMAL

    def _check_l2(self, state: _State, l2_offset: int, active: bool) -> None:
        result = state.result
        table = self._read_table(l2_offset, self.cluster_size)
        next_contiguous = 0
        for position in range(0, len(table), self.entry_words):
            entry = table[position]
            bitmap = table[position + 1] if self.extended_l2 else 0
            kind = self.cluster_type(entry)
            if kind != COMPRESSED and entry & L2E_STD_RESERVED_MASK:
                self.report(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                result.corruptions += 1

            if kind == COMPRESSED:
                self._check_compressed(state, entry, bitmap, position // self.entry_words, active)
            elif kind in (NORMAL, ZERO_ALLOC):
                offset = entry & L2E_OFFSET_MASK
                if (bitmap >> 32) & bitmap:
                    self.report(f"ERROR offset={offset:x}: Allocated cluster has corrupted "
                                f"subcluster allocation bitmap")
                    result.corruptions += 1
                if offset & (self.cluster_size - 1):
                    # Like qemu-img 7.2, count the entry's references all the same, so the
                    # clusters it straddles are reported too.
                    has_data = bitmap & 0xFFFFFFFF if self.extended_l2 else kind == NORMAL
                    what = "Data" if has_data else "Preallocated"
                    self.report(f"ERROR offset={offset:x}: {what} cluster is not properly "
                                f"aligned; L2 entry corrupted.")
                    result.corruptions += 1
                if active:
                    result.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        result.fragmented_clusters += 1
                    next_contiguous = offset + self.cluster_size
                if not self.has_data_file:
                    self._count(state, offset, self.cluster_size)

    def _check_compressed(self, state: _State, entry: int, bitmap: int, index: int,
                          active: bool) -> None:
        result = state.result
        if entry & QCOW_OFLAG_COPIED:
            self.report(f"ERROR: coffset={entry & self.coffset_mask:#x}: copied flag must never "
                        f"be set for compressed clusters")
            entry &= ~QCOW_OFLAG_COPIED
            result.corruptions += 1
        if self.has_data_file:
            self.report(f"ERROR compressed cluster {index} with data file, entry={entry:#x}")
            result.corruptions += 1
            return
        if bitmap:
            self.report(f"ERROR compressed cluster {index} with non-zero subcluster allocation "
                        f"bitmap, entry={entry:#x}")
            result.corruptions += 1
            return
        offset, length = self.compressed_extent(entry)
        self._count(state, offset, length)
        if active:
            result.allocated_clusters += 1
            result.compressed_clusters += 1
            # Compressed clusters share sectors, so qemu-img counts each one as fragmented.
            result.fragmented_clusters += 1

    def compressed_extent(self, entry: int) -> tuple:
        descriptor = entry & ((1 << 62) - 1)
        offset = descriptor & self.coffset_mask
        sectors = ((descriptor >> self.csize_shift) & self.csize_mask) + 1
        return offset, sectors * SECTOR_SIZE - (offset & (SECTOR_SIZE - 1))

    def _count_bitmaps(self, state: _State) -> None:
        """Count the bitmap directory, the bitmap tables and the clusters they name."""
        header = self.header
        if not header.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
            return  # QEMU ignores a bitmaps extension whose autoclear bit is clear
        extension = next((data for kind, data in header.unknown_extensions
                          if kind == hdr.EXT_BITMAPS), None)
        if extension is None or len(extension) < BITMAP_EXTENSION.size:
            return
        count, _, directory_size, directory_offset = BITMAP_EXTENSION.unpack_from(extension)
        if not count:
            return
        self._count(state, directory_offset, directory_size)
        if (directory_size > MAX_BITMAP_DIRECTORY_SIZE
                or directory_offset + directory_size > self.file_size):
            self.report(f"ERROR bitmap directory at {directory_offset:#x} ({directory_size} "
                        f"bytes) is invalid")
            state.result.corruptions += 1
            return

        directory = pread_exact(self.driver.fd, directory_size, directory_offset)
        position = 0
        for _ in range(count):
            if position + BITMAP_DIRECTORY_ENTRY.size > len(directory):
                self.report("ERROR bitmap directory is truncated")
                state.result.corruptions += 1
                return
            (table_offset, table_size, _, _, _, name_size,
             extra_size) = BITMAP_DIRECTORY_ENTRY.unpack_from(directory, position)
            position += (BITMAP_DIRECTORY_ENTRY.size + extra_size + name_size + 7) & ~7
            self._count(state, table_offset, table_size * 8)
            if table_offset + table_size * 8 > self.file_size:
                continue  # reported by _count as past the end of the file
            for entry in self._read_table(table_offset, table_size * 8):
                if entry & BITMAP_TABLE_OFFSET_MASK:
                    self._count(state, entry & BITMAP_TABLE_OFFSET_MASK, self.cluster_size)

    def _check_refcount_blocks(self, state: _State, reftable, file_clusters: int) -> None:
        result = state.result
        for index, entry in enumerate(reftable):
            offset = entry & REFTABLE_OFFSET_MASK
            if entry & REFTABLE_RESERVED_MASK:
                self.report(f"ERROR refcount table entry {index} has reserved bits set")
                result.corruptions += 1
                state.needs_rebuild = True
                continue
            if offset & (self.cluster_size - 1):
                self.report(f"ERROR refcount block {index} is not cluster aligned; "
                            f"refcount table entry corrupted")
                result.corruptions += 1
                state.needs_rebuild = True
                continue
            cluster = offset >> self.cluster_bits
            if cluster >= file_clusters:
                self.report(f"ERROR refcount block {index} is outside image")
                result.corruptions += 1
                state.needs_rebuild = True
                continue
            if offset:
                self._count(state, offset, self.cluster_size)
                if state.references[cluster] != 1:
                    self.report(f"ERROR refcount block {index} "
                                f"refcount={state.references[cluster]}")
                    result.corruptions += 1
                    state.needs_rebuild = True

    def _compare(self, state: _State, stored: _StoredRefcounts, clusters: int) -> int:
        """Compare stored refcounts with the references; return the highest cluster in use."""
        result = state.result
        references = state.references
        highest = 0
        for index in range(clusters):
            try:
                refcount = stored.get(index)
            except ValueError as error:
                self.report(f"Can't get refcount for cluster {index}: {error}")
                result.check_errors += 1
                continue
            reference = references[index] if index < len(references) else 0
            if refcount or reference:
                highest = index
            if refcount == reference:
                continue
            if refcount == 0:
                state.needs_rebuild = True
            state.mismatches.append(_Mismatch(index, refcount, reference))
            word = "ERROR" if refcount < reference else "Leaked"
            self.report(f"{word} cluster {index} refcount={refcount} reference={reference}")
            if refcount < reference:
                result.corruptions += 1
            else:
                result.leaks += 1
        return highest

    def _check_copied_flags(self, state: _State, stored, repair: bool) -> None:
        """Compare QCOW_OFLAG_COPIED of the active tables with refcounts (1 means set)."""
        driver = self.driver
        result = state.result
        word = "Repairing" if repair else "ERROR"
        for l1_index, l1_entry in enumerate(driver.l1_table):
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset or not self._is_valid_table(l2_offset):
                continue
            refcount = self._stored_refcount(stored, l2_offset)
            if refcount is None:
                continue
            if (refcount == 1) != bool(l1_entry & QCOW_OFLAG_COPIED):
                self.report(f"{word} OFLAG_COPIED L2 cluster: l1_index={l1_index} "
                            f"l1_entry={l1_entry:x} refcount={refcount}")
                if repair:
                    flag = QCOW_OFLAG_COPIED if refcount == 1 else 0
                    driver.l1_table[l1_index] = (l1_entry & ~QCOW_OFLAG_COPIED) | flag
                    driver.l1_dirty = True
                    result.corruptions_fixed += 1
                else:
                    result.corruptions += 1

            table = (driver.l2_cache.get(l2_offset) if repair
                     else self._read_table(l2_offset, self.cluster_size))
            changed = False
            for position in range(0, len(table), self.entry_words):
                entry = table[position]
                if self.cluster_type(entry) not in (NORMAL, ZERO_ALLOC):
                    continue
                if self.has_data_file:
                    refcount = 1
                else:
                    refcount = self._stored_refcount(stored, entry & L2E_OFFSET_MASK)
                    if refcount is None:
                        continue
                if (refcount == 1) == bool(entry & QCOW_OFLAG_COPIED):
                    continue
                self.report(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                            f"refcount={refcount}")
                if repair:
                    flag = QCOW_OFLAG_COPIED if refcount == 1 else 0
                    table[position] = (entry & ~QCOW_OFLAG_COPIED) | flag
                    changed = True
                    result.corruptions_fixed += 1
                else:
                    result.corruptions += 1
            if changed:
                driver.l2_cache.mark_dirty(l2_offset, table)

    def _is_valid_table(self, offset: int) -> bool:
        return not offset & (self.cluster_size - 1) and offset + self.cluster_size <= self.file_size

    def _stored_refcount(self, stored, offset: int) -> Optional[int]:
        try:
            return stored.get(offset >> self.cluster_bits)
        except (ValueError, CorruptImageError):
            return None

    # -- repairing --------------------------------------------------------------

    def repair(self, fix: int) -> CheckResult:
        """Check, fix what `fix` allows, and return the result of a second check.

        The driver must be open read-write. FIX_LEAKS lowers refcounts that are too high;
        FIX_ERRORS also raises refcounts that are too low and corrects QCOW_OFLAG_COPIED.
        A stored refcount of 0 for a referenced cluster needs FIX_ERRORS: with FIX_LEAKS
        alone the repair stops with a check error, as `qemu-img check -r leaks` does.
        """
        driver = self.driver
        state, stored = self._check(copied_flags=False)
        first = state.result
        if state.needs_rebuild and not fix & FIX_ERRORS:
            self.report("ERROR need to rebuild refcount structures")
            first.check_errors += 1
            return first

        fixed = CheckResult(filename=driver.filename)
        refcounts = driver.refcounts
        for mismatch in state.mismatches:
            too_high = mismatch.stored > mismatch.references
            if not (fix & FIX_LEAKS if too_high else fix & FIX_ERRORS):
                continue
            self.report(f"Repairing cluster {mismatch.cluster} refcount={mismatch.stored} "
                        f"reference={mismatch.references}")
            refcounts.update(mismatch.cluster, mismatch.references - mismatch.stored)
            if too_high:
                fixed.leaks_fixed += 1
            else:
                fixed.corruptions_fixed += 1
        driver.flush()

        # Like qemu-img, compare QCOW_OFLAG_COPIED only after the refcounts are repaired,
        # looking them up through the driver, which now contains the repaired ones.
        if fix & FIX_ERRORS:
            self._check_copied_flags(_State(fixed), refcounts, repair=True)
            driver.flush()
        else:
            self._check_copied_flags(state, refcounts, repair=False)

        if not (fixed.leaks_fixed or fixed.corruptions_fixed):
            if not (first.corruptions or first.check_errors):
                self._mark_clean()
            return first
        second = self._check()[0].result
        if not (second.corruptions or second.check_errors):
            self._mark_clean()
        second.leaks_fixed = fixed.leaks_fixed
        second.corruptions_fixed = fixed.corruptions_fixed
        return second

    def _mark_clean(self) -> None:
        """Clear the dirty and corrupt bits once the image checks without corruption."""
        driver = self.driver
        header = driver.header
        bits = hdr.INCOMPAT_DIRTY | hdr.INCOMPAT_CORRUPT
        if header.version >= 3 and header.incompatible_features & bits:
            header.incompatible_features &= ~bits
            driver.write_header_field(72, ">Q", header.incompatible_features)
        driver.set_dirty_bit = False


def describe_repair(result: CheckResult) -> str:
    """Return the lines qemu-img prints before it checks a repaired image again."""
    return (f"The following inconsistencies were found and repaired:\n\n"
            f"    {result.leaks_fixed} leaked clusters\n"
            f"    {result.corruptions_fixed} corruptions\n\n"
            f"Double checking the fixed image now...")

