"""Damage found while serving a writable qcow2 image: corrupt bit, read-only switch, open checks.

A damaged L2 entry met by a read or a write of a read-write image must set the corrupt
bit (incompatible bit 1) on disk and turn later writes into EROFS, while reads of healthy
ranges go on. A read-only open never changes the image.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from helpers import mounted, needs_fuse, qemu_img, qemu_io, sha256_of_file
from images import (
    INCOMPAT_CORRUPT,
    KiB,
    MiB,
    create_qcow2,
    daemon_log_lines,
    l2_entry_location,
    read_bytes,
    read_header,
    read_u64,
    set_header_field,
    write_u64,
)
from vdiskfs.errors import CorruptImageError, InvalidImageError, ReadOnlyError
from vdiskfs.registry import open_chain

COPIED = 1 << 63
DAMAGED = 2 * MiB  # guest offset whose L2 entry the tests damage


def damaged_image(directory: Path, entry: int = None, cluster_size: int = 64 * KiB,
                  compat: str = "1.1") -> Path:
    """Return an image with healthy data at 0 and a damaged L2 entry at DAMAGED."""
    image = create_qcow2(directory / "disk.qcow2", 4 * MiB, f"cluster_size={cluster_size}",
                         f"compat={compat}")
    qemu_io(image, "write -P 0x11 0 128k", f"write -P 0x22 {DAMAGED} 64k")
    if entry is None:
        entry = COPIED | (1 << 40)  # a data cluster far past the end of the file
    write_u64(image, l2_entry_location(image, DAMAGED), entry)
    return image


def corrupt_bit_set(image: Path) -> bool:
    return bool(read_header(image)["incompatible_features"] & INCOMPAT_CORRUPT)


# ---------------------------------------------------------------- in process


@pytest.mark.parametrize("kind", ["past-end", "misaligned", "compressed-past-end"])
def test_read_write_open_marks_corrupt(kind, tmp_path):
    entries = {
        "past-end": COPIED | (1 << 40),
        "misaligned": COPIED | (3 * 64 * KiB + 512),
        "compressed-past-end": (1 << 62) | (1 << 40),
    }
    image = damaged_image(tmp_path, entries[kind])
    driver = open_chain(str(image), read_only=False)
    try:
        with pytest.raises(CorruptImageError):
            driver.read(DAMAGED, 4096)
        assert driver.read_only
        assert corrupt_bit_set(image)
        assert driver.read(0, 4096) == b"\x11" * 4096
        with pytest.raises(ReadOnlyError):
            driver.write(0, b"x" * 512)
    finally:
        driver.close()
    assert corrupt_bit_set(image)


def test_damaged_write_marks_corrupt(tmp_path):
    image = damaged_image(tmp_path)
    driver = open_chain(str(image), read_only=False)
    try:
        driver.write(0, b"\x33" * 512)
        with pytest.raises(CorruptImageError):
            driver.write(DAMAGED + 100, b"\x44" * 100)
        assert driver.read_only
        assert driver.read(0, 512) == b"\x33" * 512
    finally:
        driver.close()
    assert corrupt_bit_set(image)
    # The write acknowledged before the damage was found reached the file.
    raw = tmp_path / "disk.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    assert read_bytes(raw, 0, 512) == b"\x33" * 512


@pytest.mark.parametrize("table", ["l1_table_offset", "refcount_table_offset"])
def test_write_onto_metadata_marks_corrupt(table, tmp_path):
    probe = create_qcow2(tmp_path / "probe.qcow2", 4 * MiB)
    image = damaged_image(tmp_path, COPIED | read_header(probe)[table])
    metadata_before = read_bytes(image, read_header(image)[table], 64 * KiB)
    driver = open_chain(str(image), read_only=False)
    try:
        with pytest.raises(CorruptImageError, match="overwrite metadata|overlaps the"):
            driver.write(DAMAGED, b"\x77" * 4096)
        assert driver.read_only
    finally:
        driver.close()
    assert corrupt_bit_set(image)
    assert read_bytes(image, read_header(image)[table], 64 * KiB) == metadata_before


def test_read_only_open_leaves_image_alone(tmp_path):
    image = damaged_image(tmp_path)
    digest = sha256_of_file(image)
    driver = open_chain(str(image), read_only=True)
    try:
        with pytest.raises(CorruptImageError):
            driver.read(DAMAGED, 4096)
        assert driver.read(0, 4096) == b"\x11" * 4096
    finally:
        driver.close()
    assert sha256_of_file(image) == digest


def test_backing_damage_leaves_overlay_writable(tmp_path):
    base = damaged_image(tmp_path)
    overlay = create_qcow2(tmp_path / "top.qcow2", 4 * MiB, backing=str(base))
    base_digest = sha256_of_file(base)
    driver = open_chain(str(overlay), read_only=False)
    try:
        with pytest.raises(CorruptImageError):
            driver.read(DAMAGED, 4096)
        assert not driver.read_only
        driver.write(0, b"\x55" * 512)
    finally:
        driver.close()
    assert not corrupt_bit_set(overlay)
    assert sha256_of_file(base) == base_digest


# ---------------------------------------------------------------- open-time checks


@pytest.mark.parametrize("field, other", [
    ("l1_table_offset", "refcount_table_offset"),
    ("refcount_table_offset", "l1_table_offset"),
])
def test_overlapping_tables_rejected(field, other, tmp_path):
    image = create_qcow2(tmp_path / "disk.qcow2", 4 * MiB)
    qemu_io(image, "write -P 0x11 0 256k")  # so that no table ends the file
    set_header_field(image, field, read_header(image)[other])
    with pytest.raises(InvalidImageError) as raised:
        open_chain(str(image))
    message = str(raised.value)
    assert "overlaps" in message
    assert "\n" not in message


def test_snapshot_table_overlapping_l1_rejected(tmp_path):
    image = create_qcow2(tmp_path / "disk.qcow2", 4 * MiB)
    qemu_img("snapshot", "-c", "first", image)
    set_header_field(image, "snapshots_offset", read_header(image)["l1_table_offset"])
    with pytest.raises(InvalidImageError, match="snapshot table .* overlaps|overlaps the snapshot"):
        open_chain(str(image))


# ---------------------------------------------------------------- through a mount


@needs_fuse
def test_mount_serves_damaged_image(tmp_path, mountpoint):
    image = damaged_image(tmp_path)
    with mounted(image, mountpoint) as disk:
        fd = os.open(disk, os.O_RDWR)
        try:
            assert os.pread(fd, 4096, 0) == b"\x11" * 4096
            with pytest.raises(OSError) as raised:
                os.pread(fd, 4096, DAMAGED)
            assert raised.value.errno == errno.EIO
            assert os.pread(fd, 4096, 64 * KiB) == b"\x11" * 4096
            with pytest.raises(OSError) as raised:
                os.pwrite(fd, b"\x66" * 4096, 0)
                os.fsync(fd)
            assert raised.value.errno == errno.EROFS
        finally:
            os.close(fd)
        assert corrupt_bit_set(image)
        errors = daemon_log_lines(mountpoint, "ERROR")
        assert sum("marking the image corrupt" in line for line in errors) == 1
    assert corrupt_bit_set(image)
    assert struct.unpack(">Q", image.read_bytes()[72:80])[0] & INCOMPAT_CORRUPT


def test_release_past_end_marks_corrupt(tmp_path):
    # Without QCOW_OFLAG_COPIED, a write copies the cluster and releases the old one,
    # whose refcount lies far past the end of the refcount table.
    image = damaged_image(tmp_path, 0x00FF_FFFF_FFFF_F000, cluster_size=4 * KiB)
    driver = open_chain(str(image), read_only=False)
    try:
        driver.write(DAMAGED, b"\x44" * (4 * KiB))
        with pytest.raises(CorruptImageError, match="drop below 0"):
            driver.flush()
        assert driver.read_only
    finally:
        driver.close()
    assert corrupt_bit_set(image)
    assert image.stat().st_size < 2 * MiB


def test_dirty_image_with_entry_past_end_fails_open(tmp_path):
    image = damaged_image(tmp_path)
    set_header_field(image, "compatible_features", 1)  # lazy refcounts
    set_header_field(image, "incompatible_features", 1)  # dirty
    with pytest.raises(CorruptImageError, match="past the end of the file"):
        open_chain(str(image), read_only=False)
    driver = open_chain(str(image), read_only=True)
    try:
        assert driver.read(0, 512) == b"\x11" * 512
    finally:
        driver.close()
