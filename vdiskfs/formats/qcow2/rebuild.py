"""Rebuilding refcounts from the tables that reference clusters.

An image with lazy refcounts that was not closed cleanly keeps its dirty bit and may have
stale refcounts. Before such an image is written, every refcount is recomputed from what
actually references each cluster, and QCOW_OFLAG_COPIED is set again exactly where the
refcount is 1, as QEMU does when it opens a dirty image read-write.
"""

from __future__ import annotations

import logging
from collections import Counter

from vdiskfs.errors import CorruptImageError, UnsupportedFeatureError
from vdiskfs.formats.qcow2 import header as hdr
from vdiskfs.formats.qcow2.mapping import L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, \
    QCOW_OFLAG_COPIED
from vdiskfs.formats.qcow2.refcount import REFTABLE_OFFSET_MASK
from vdiskfs.formats.qcow2.snapshot import snapshot_table_length
from vdiskfs.hostfile import pread_exact
from vdiskfs.formats.qcow2.cache import decode_table

log = logging.getLogger(__name__)

# Each pass may allocate refcount blocks, which need counting in the next pass.
MAX_PASSES = 8


def count_references(driver) -> Counter:
    """Return, per host cluster index, how many references the image's metadata holds."""
    header = driver.header
    bits = header.cluster_bits
    counts: Counter = Counter()

    file_size = driver.file_size()

    def reference(offset: int, length: int) -> None:
        # Less than a cluster past the end is a last cluster written in part. Anything
        # further is damage, and counting it would grow the refcount table without bound.
        if offset + length - file_size >= driver.cluster_size:
            raise CorruptImageError(
                f"cannot rebuild refcounts: a table references {length} bytes at host offset "
                f"{offset:#x}, past the end of the file ({file_size} bytes)")
        for index in range(offset >> bits, ((offset + length - 1) >> bits) + 1):
            counts[index] += 1

    reference(0, driver.cluster_size)
    refcounts = driver.refcounts
    reference(refcounts.table_offset, refcounts.table_clusters * driver.cluster_size)
    for entry in refcounts.table:
        if entry & REFTABLE_OFFSET_MASK:
            reference(entry & REFTABLE_OFFSET_MASK, driver.cluster_size)

    if driver.snapshots:
        reference(header.snapshots_offset, snapshot_table_length(driver.snapshots))
    l1_tables = [(header.l1_table_offset, driver.l1_table)]
    for snapshot in driver.snapshots:
        l1_tables.append((snapshot.l1_table_offset,
                          decode_table(pread_exact(driver.fd, snapshot.l1_size * 8,
                                                   snapshot.l1_table_offset))))

    writer = driver.writer
    for l1_offset, l1_table in l1_tables:
        if len(l1_table):
            reference(l1_offset, len(l1_table) * 8)
        for l1_entry in l1_table:
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            reference(l2_offset, driver.cluster_size)
            table = driver.l2_cache.get(l2_offset)
            for position in range(0, len(table), writer.entry_words):
                entry = table[position]
                if entry & QCOW_OFLAG_COMPRESSED:
                    reference(*writer.compressed_extent(entry))
                elif entry & L2E_OFFSET_MASK and not writer.has_data_file:
                    reference(entry & L2E_OFFSET_MASK, driver.cluster_size)
    return counts


def rebuild_refcounts(driver) -> int:
    """Make every refcount match the references; return how many refcounts changed."""
    if driver.header.has_bitmaps_extension:
        raise UnsupportedFeatureError(
            "cannot rebuild the refcounts of an image with persistent bitmaps")
    refcounts = driver.refcounts
    changed = 0
    for _ in range(MAX_PASSES):
        counts = count_references(driver)
        last = max(max(counts, default=0) + 1, refcounts.end_cluster)
        pass_changes = 0
        for index in range(last):
            delta = counts.get(index, 0) - refcounts.get(index)
            if delta:
                refcounts.update(index, delta)
                pass_changes += 1
        changed += pass_changes
        if not pass_changes:
            break
    refcounts.free_hint = 0
    fix_copied_flags(driver)
    return changed


def fix_copied_flags(driver) -> None:
    """Set QCOW_OFLAG_COPIED in the active L1 and L2 tables exactly where the refcount is 1."""
    refcounts = driver.refcounts
    bits = driver.header.cluster_bits
    writer = driver.writer
    for l1_index, l1_entry in enumerate(driver.l1_table):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        expected = l2_offset | (QCOW_OFLAG_COPIED if refcounts.get(l2_offset >> bits) == 1 else 0)
        if l1_entry != expected:
            driver.l1_table[l1_index] = expected
            driver.l1_dirty = True

        table = driver.l2_cache.get(l2_offset)
        table_changed = False
        for position in range(0, len(table), writer.entry_words):
            entry = table[position]
            host = entry & L2E_OFFSET_MASK
            if entry & QCOW_OFLAG_COMPRESSED or (not host and not writer.has_data_file):
                continue
            owned = writer.has_data_file or refcounts.get(host >> bits) == 1
            fixed = entry | QCOW_OFLAG_COPIED if owned else entry & ~QCOW_OFLAG_COPIED
            if fixed != entry:
                table[position] = fixed
                table_changed = True
        if table_changed:
            driver.l2_cache.mark_dirty(l2_offset, table)


def repair_dirty_image(driver) -> None:
    """Rebuild refcounts of a dirty image opened read-write, then clear its dirty bit."""
    log.warning("%s: the dirty bit is set after an unclean shutdown; rebuilding refcounts",
                driver.filename)
    changed = rebuild_refcounts(driver)
    driver.flush()
    driver.header.incompatible_features &= ~hdr.INCOMPAT_DIRTY
    driver.write_header_field(72, ">Q", driver.header.incompatible_features)
    log.warning("%s: refcounts rebuilt (%d changed); the dirty bit is cleared", driver.filename, changed)
