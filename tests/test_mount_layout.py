"""Tests of what a mount shows: several images in one directory, and one disk mounted on a
regular file in place of that file."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from conftest import force_unmount, remove_runtime_log
from helpers import needs_fuse, qemu_img, qemu_io, reference_raw, vdiskfs

MiB = 1 << 20


@pytest.fixture
def two_images(tmp_path):
    qcow2 = tmp_path / "system.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", qcow2, "8M")
    qemu_io(qcow2, "write -P 0x11 0 1M", "write -P 0x22 5M 64k")
    raw = tmp_path / "data.img"
    raw.write_bytes(random.Random(7).randbytes(3 * MiB))
    return qcow2, raw


@pytest.fixture
def file_mountpoint(tmp_path):
    """A regular file to mount on; anything still mounted there is removed afterwards."""
    path = tmp_path / "disk.bin"
    path.write_bytes(b"the original file\n")
    yield path
    force_unmount(path)
    remove_runtime_log(path)


@needs_fuse
def test_several_images_each_get_file(two_images, mountpoint, tmp_path):
    qcow2, raw = two_images
    expected_qcow2 = reference_raw(qcow2, tmp_path).read_bytes()

    vdiskfs("mount", qcow2, raw, mountpoint)
    try:
        names = sorted(os.listdir(mountpoint))
        qcow2_data = (mountpoint / "system.raw").read_bytes()
        raw_data = (mountpoint / "data.raw").read_bytes()
    finally:
        vdiskfs("umount", mountpoint)

    assert names == ["data.raw", "system.raw"]
    assert qcow2_data == expected_qcow2
    assert raw_data == raw.read_bytes()


@needs_fuse
def test_several_images_write_each(two_images, mountpoint, tmp_path):
    qcow2, raw = two_images

    vdiskfs("mount", qcow2, raw, mountpoint)
    try:
        with open(mountpoint / "system.raw", "r+b") as stream:
            os.pwrite(stream.fileno(), b"\x5a" * 4096, 2 * MiB)
            os.fsync(stream.fileno())
        with open(mountpoint / "data.raw", "r+b") as stream:
            os.pwrite(stream.fileno(), b"\xa5" * 4096, 1 * MiB)
            os.fsync(stream.fileno())
    finally:
        vdiskfs("umount", mountpoint)

    converted = reference_raw(qcow2, tmp_path).read_bytes()
    assert converted[2 * MiB:2 * MiB + 4096] == b"\x5a" * 4096
    assert raw.read_bytes()[1 * MiB:1 * MiB + 4096] == b"\xa5" * 4096
    assert qemu_img("check", qcow2).returncode == 0


@needs_fuse
def test_same_names_rejected(tmp_path, mountpoint):
    first = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", first, "1M")
    (tmp_path / "other").mkdir()
    second = tmp_path / "other" / "disk.img"
    second.write_bytes(bytes(MiB))

    result = vdiskfs("mount", first, second, mountpoint, check=False)

    assert result.returncode == 1
    assert str(first) in result.stderr
    assert str(second) in result.stderr
    assert "disk.raw" in result.stderr
    assert os.listdir(mountpoint) == []


@needs_fuse
def test_several_images_reject_overlay(two_images, mountpoint, tmp_path):
    qcow2, raw = two_images

    result = vdiskfs("mount", "--overlay", tmp_path / "work.qcow2", qcow2, raw, mountpoint,
                     check=False)

    assert result.returncode == 1
    assert "--overlay works with one image only" in result.stderr


@needs_fuse
def test_file_mountpoint_shows_disk(two_images, file_mountpoint, tmp_path):
    qcow2, _ = two_images
    expected = reference_raw(qcow2, tmp_path).read_bytes()

    vdiskfs("mount", qcow2, file_mountpoint)
    try:
        size = file_mountpoint.stat().st_size
        data = file_mountpoint.read_bytes()
        with open(file_mountpoint, "r+b") as stream:
            os.pwrite(stream.fileno(), b"\x77" * 65536, 3 * MiB)
            os.fsync(stream.fileno())
        after_write = file_mountpoint.read_bytes()[3 * MiB:3 * MiB + 65536]
    finally:
        vdiskfs("umount", file_mountpoint)

    assert size == 8 * MiB
    assert data == expected
    assert after_write == b"\x77" * 65536
    assert file_mountpoint.read_bytes() == b"the original file\n"
    converted = reference_raw(qcow2, tmp_path).read_bytes()
    assert converted[3 * MiB:3 * MiB + 65536] == b"\x77" * 65536
    assert qemu_img("check", qcow2).returncode == 0


@needs_fuse
def test_file_mountpoint_works_with_losetup(two_images, file_mountpoint, tmp_path):
    qcow2, _ = two_images

    vdiskfs("mount", qcow2, file_mountpoint)
    try:
        device = subprocess.run(["losetup", "--find", "--show", "--read-only",
                                 str(file_mountpoint)],
                                capture_output=True, text=True, check=True).stdout.strip()
        try:
            with open(device, "rb") as stream:
                first_block = stream.read(4096)
        finally:
            subprocess.run(["losetup", "-d", device], check=True)
    finally:
        vdiskfs("umount", file_mountpoint)

    assert first_block == b"\x11" * 4096


@needs_fuse
def test_file_mountpoint_rejects_several_images(two_images, file_mountpoint):
    qcow2, raw = two_images

    result = vdiskfs("mount", qcow2, raw, file_mountpoint, check=False)

    assert result.returncode == 1
    assert "a file mount point shows one disk" in result.stderr
    assert file_mountpoint.read_bytes() == b"the original file\n"


def test_mountpoint_must_exist(two_images, tmp_path):
    qcow2, _ = two_images

    result = vdiskfs("mount", qcow2, tmp_path / "missing", check=False)

    assert result.returncode == 1
    assert "missing" in result.stderr


def test_exported_names_in_order(tmp_path):
    from vdiskfs.commands.mount import exported_names

    assert exported_names(["a/one.qcow2", "b/two.img"]) == ["one.raw", "two.raw"]


def test_exported_names_same_stem(tmp_path):
    from vdiskfs.commands.mount import exported_names
    from vdiskfs.daemon import MountError

    with pytest.raises(MountError, match="a/disk.qcow2 and b/disk.img would both appear"):
        exported_names(["a/disk.qcow2", "b/disk.img"])
