"""Tests that a read-only mount leaves every file of the backing chain as it was.

Each test records the sha256 and the access time of every file in the chain, mounts, reads
the whole exposed file, tries to write, truncate and fsync, unmounts, and checks the
files again. The access times are first set far into the past, so that a read without
O_NOATIME would move them even under relatime.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Dict, List

import pytest

from helpers import mounted, needs_fuse, qemu_img, qemu_io, reference_raw, sha256_of_file
from images import INCOMPAT_CORRUPT, INCOMPAT_DIRTY, create_qcow2, read_header, set_header_field
from test_mount import within, write_at

MiB = 1 << 20

# 2001-09-09, older than any mtime a test image can have.
OLD_ATIME = 1_000_000_000


def chain_of_three(tmp_path: Path) -> List[Path]:
    """Build qcow2 over qcow2 over raw, with data in every layer; return top first."""
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(6 * MiB))
    middle = create_qcow2(tmp_path / "middle.qcow2", 8 * MiB, backing=str(base),
                          backing_format="raw")
    qemu_io(middle, "write -P 0x21 1M 1M", "write -z 3M 64k", "write -c -P 0x22 5M 64k")
    top = create_qcow2(tmp_path / "top.qcow2", 8 * MiB, backing=str(middle))
    qemu_io(top, "write -P 0x31 1536k 64k", "write -P 0x32 7M 4k")
    return [top, middle, base]


def flagged_image(tmp_path: Path, flag: int) -> List[Path]:
    """Build a qcow2 image with data and set `flag` in its incompatible features."""
    image = create_qcow2(tmp_path / "flagged.qcow2", 4 * MiB)
    qemu_io(image, "write -P 0x41 0 1M", "write -P 0x42 2M 4k")
    features = read_header(image)["incompatible_features"]
    set_header_field(image, "incompatible_features", features | flag)
    return [image]


def flagged_image_content() -> bytes:
    expected = bytearray(4 * MiB)
    expected[0:MiB] = b"\x41" * MiB
    expected[2 * MiB:2 * MiB + 4096] = b"\x42" * 4096
    return bytes(expected)


def age_access_times(files: List[Path]) -> Dict[Path, int]:
    """Set the access time of `files` to OLD_ATIME and return each file's atime in ns."""
    for path in files:
        os.utime(path, ns=(OLD_ATIME * 10**9, os.stat(path).st_mtime_ns))
    return {path: os.stat(path).st_atime_ns for path in files}


def stat_state(files: List[Path]) -> Dict[Path, tuple]:
    return {path: (os.stat(path).st_mtime_ns, os.stat(path).st_size) for path in files}


def try_to_change(exposed: Path) -> None:
    """Try to write, truncate and open the exposed file for writing; each must fail with EROFS."""
    with pytest.raises(OSError) as raised:
        within(write_at, exposed, 0, b"changed")
    assert raised.value.errno == errno.EROFS
    with pytest.raises(OSError) as raised:
        within(os.truncate, exposed, 0)
    assert raised.value.errno == errno.EROFS
    with pytest.raises(OSError) as raised:
        within(os.open, exposed, os.O_WRONLY)
    assert raised.value.errno == errno.EROFS


def fsync_read_only(exposed: Path) -> None:
    fd = os.open(exposed, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_mount_changes_nothing(files: List[Path], mountpoint: Path, expected: bytes,
                                *options: str) -> None:
    digests = {path: sha256_of_file(path) for path in files}
    states = stat_state(files)
    atimes = age_access_times(files)

    with mounted(files[0], mountpoint, *options) as exposed:
        assert within(exposed.read_bytes) == expected
        try_to_change(exposed)
        within(fsync_read_only, exposed)

    for path in files:
        assert os.stat(path).st_atime_ns == atimes[path], f"{path.name}: atime changed"
    assert stat_state(files) == states
    for path in files:
        assert sha256_of_file(path) == digests[path], f"{path.name}: content changed"


@pytest.fixture(autouse=True)
def require_atime_updates(tmp_path):
    """Skip when the file system of tmp_path never updates atime, which hides the check."""
    probe = tmp_path / "atime-probe"
    probe.write_bytes(b"x")
    os.utime(probe, ns=(OLD_ATIME * 10**9, os.stat(probe).st_mtime_ns))
    probe.read_bytes()
    if os.stat(probe).st_atime_ns == OLD_ATIME * 10**9:
        pytest.skip(f"{tmp_path} is mounted noatime, so atime changes cannot be seen")
    probe.unlink()


@needs_fuse
def test_read_only_chain_unchanged(tmp_path, mountpoint):
    files = chain_of_three(tmp_path)
    expected = reference_raw(files[0], tmp_path).read_bytes()
    check_mount_changes_nothing(files, mountpoint, expected, "--read-only")


@needs_fuse
@pytest.mark.parametrize("flag", [INCOMPAT_DIRTY, INCOMPAT_CORRUPT], ids=["dirty", "corrupt"])
def test_flagged_image_unchanged(tmp_path, mountpoint, flag):
    files = flagged_image(tmp_path, flag)
    check_mount_changes_nothing(files, mountpoint, flagged_image_content(), "--read-only")
    assert read_header(files[0])["incompatible_features"] & flag


@needs_fuse
def test_corrupt_image_served_read_only(tmp_path, mountpoint):
    """A writable mount of an image marked corrupt falls back to read-only and writes nothing."""
    files = flagged_image(tmp_path, INCOMPAT_CORRUPT)
    check_mount_changes_nothing(files, mountpoint, flagged_image_content())
    assert read_header(files[0])["incompatible_features"] & INCOMPAT_CORRUPT


@needs_fuse
def test_read_only_raw_unchanged(tmp_path, mountpoint):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(3 * MiB + 512))
    check_mount_changes_nothing([image], mountpoint, image.read_bytes(), "--read-only")

