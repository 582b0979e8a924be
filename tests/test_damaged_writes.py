"""Writes to damaged images must never cross-link clusters or overwrite metadata."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest

from helpers import mounted, needs_fuse, qemu_img, qemu_io

MiB = 1 << 20
CLUSTER = 65536


def header_u64(image: Path, offset: int) -> int:
    with open(image, "rb") as stream:
        stream.seek(offset)
        return struct.unpack(">Q", stream.read(8))[0]


def host_offsets(image: Path) -> list:
    """Return the host offset of every allocated guest cluster, from qemu-img map."""
    ranges = json.loads(qemu_img("map", "--output=json", "-U", image).stdout)
    offsets = []
    for entry in ranges:
        if entry.get("data") and "offset" in entry:
            for start in range(0, entry["length"], CLUSTER):
                offsets.append(entry["offset"] + start)
    return offsets


def write_through(exposed: Path, offset: int, data: bytes) -> None:
    fd = os.open(exposed, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@needs_fuse
def test_truncated_image_no_cross_links(tmp_path):
    whole = tmp_path / "whole.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", whole, "16M")
    qemu_io(whole, "write -P 7 0 4M")
    image = tmp_path / "truncated.qcow2"
    image.write_bytes(whole.read_bytes()[:2_000_000])

    with mounted(image, tmp_path / "mnt") as exposed:
        write_through(exposed, 100 * CLUSTER, b"\x42" * (4 * CLUSTER))

    offsets = host_offsets(image)
    assert len(offsets) == len(set(offsets)), "two guest clusters share a host cluster"
    qemu_io(image, f"read -P 0x42 {100 * CLUSTER} {4 * CLUSTER}", "read -P 7 0 1M")


@needs_fuse
def test_refcount_past_end_not_reused(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "16M")
    size = os.path.getsize(image)
    refcount_table = header_u64(image, 48)
    block = header_u64(image, refcount_table)
    # The cluster after the end of the file gets refcount 1, which qemu-img check accepts.
    with open(image, "r+b") as stream:
        stream.seek(block + 2 * (size // CLUSTER + 1))
        stream.write(struct.pack(">H", 1))
    assert qemu_img("check", image, check=False).returncode == 0

    with mounted(image, tmp_path / "mnt") as exposed:
        write_through(exposed, 0, b"\x55" * (8 * CLUSTER))

    check = qemu_img("check", image, check=False)
    assert check.returncode in (0, 3), check.stdout + check.stderr
    qemu_io(image, f"read -P 0x55 0 {8 * CLUSTER}")


@needs_fuse
def test_l2_entry_at_refcount_table(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "16M")
    qemu_io(image, "write -P 0x11 0 1M")
    l1_table = header_u64(image, 40)
    l2_table = header_u64(image, l1_table) & 0x00FFFFFFFFFFFE00
    refcount_table = header_u64(image, 48)
    # Guest cluster 4 claims to live where the refcount table is, with QCOW_OFLAG_COPIED set.
    with open(image, "r+b") as stream:
        stream.seek(l2_table + 4 * 8)
        stream.write(struct.pack(">Q", (1 << 63) | refcount_table))
    table_before = Path(image).read_bytes()[refcount_table:refcount_table + CLUSTER]

    with mounted(image, tmp_path / "mnt") as exposed:
        with pytest.raises(OSError) as raised:
            write_through(exposed, 4 * CLUSTER, b"\x99" * CLUSTER)
        assert raised.value.errno in (errno.EIO, errno.EROFS)
        with open(exposed, "rb") as stream:
            assert stream.read(CLUSTER) == b"\x11" * CLUSTER

    assert Path(image).read_bytes()[refcount_table:refcount_table + CLUSTER] == table_before
    assert header_u64(image, 72) & 2, "the corrupt bit is set"


def test_odd_virtual_size_rounded_like_qemu(tmp_path):
    from vdiskfs.registry import open_chain

    image = tmp_path / "odd.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    with open(image, "r+b") as stream:
        stream.seek(24)
        stream.write(struct.pack(">Q", 1000001))
    driver = open_chain(str(image))
    try:
        assert driver.virtual_size == json.loads(
            qemu_img("info", "--output=json", image).stdout)["virtual-size"]
    finally:
        driver.close()
