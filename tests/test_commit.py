"""Tests of `vdiskfs commit` against qemu-img.

Overlays are written by qemu-io (data, zeros, compressed clusters) or through a vdiskfs
mount. The content that qemu-img convert reads from the overlay before the commit is
what the backing image must read as afterwards.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import mounted, needs_fuse, qemu_img, qemu_info, qemu_io, reference_raw, sha256_of_file, vdiskfs
from images import create_qcow2
from test_mount import within, write_at

MiB = 1 << 20

# Data, a zero range over data of every lower layer, a compressed cluster and an
# unaligned write, in the top layer.
OVERLAY_WRITES = ("write -P 0x22 100k 300k", "write -z 1M 192k", "write -c -P 0x33 4M 64k",
                  "write -P 0x44 5000 3", "write -P 0x55 7M 1M")


def assert_identical(image: Path, expected_raw: Path, image_format: str = "qcow2") -> None:
    result = qemu_img("compare", "-f", image_format, "-F", "raw", image, expected_raw,
                      check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Images are identical" in result.stdout


def assert_check_clean(image: Path) -> None:
    result = qemu_img("check", image, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout


def build_chain(tmp_path: Path, compat: str = "1.1") -> tuple:
    """Build raw base <- qcow2 middle <- qcow2 overlay, each layer with data."""
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(8 * MiB))
    middle = create_qcow2(tmp_path / "middle.qcow2", 8 * MiB, f"compat={compat}",
                          backing=str(base), backing_format="raw")
    qemu_io(middle, "write -P 0x11 1M 1M", "write -P 0x12 6M 64k")
    overlay = create_qcow2(tmp_path / "overlay.qcow2", 8 * MiB, backing=str(middle))
    qemu_io(overlay, *OVERLAY_WRITES)
    return base, middle, overlay


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_commit_into_qcow2(tmp_path, compat):
    base, middle, overlay = build_chain(tmp_path, compat)
    expected = reference_raw(overlay, tmp_path)
    base_digest = sha256_of_file(base)
    overlay_digest = sha256_of_file(overlay)

    result = vdiskfs("commit", overlay)

    assert result.stdout == "Image committed.\n"
    assert result.stderr == ""
    assert_identical(middle, expected)
    assert_identical(overlay, expected)
    assert_check_clean(middle)
    assert_check_clean(overlay)
    assert sha256_of_file(base) == base_digest
    assert sha256_of_file(overlay) == overlay_digest


def test_commit_into_raw(tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(8 * MiB))
    overlay = create_qcow2(tmp_path / "overlay.qcow2", 8 * MiB, backing=str(base),
                           backing_format="raw")
    qemu_io(overlay, *OVERLAY_WRITES)
    expected = reference_raw(overlay, tmp_path)

    vdiskfs("commit", "-q", overlay)

    assert base.read_bytes() == expected.read_bytes()
    assert_identical(overlay, expected)
    assert_check_clean(overlay)


def test_commit_grows_backing(tmp_path):
    base = create_qcow2(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 0x11 0 4M")
    overlay = create_qcow2(tmp_path / "overlay.qcow2", 6 * MiB, backing=str(base))
    qemu_io(overlay, "write -P 0x22 3M 2M", "write -P 0x23 6143k 1k")
    expected = reference_raw(overlay, tmp_path)

    vdiskfs("commit", "-q", overlay)

    assert qemu_info(base)["virtual-size"] == 6 * MiB
    assert_identical(base, expected)
    assert_check_clean(base)


def test_commit_relative_backing_name(tmp_path):
    base = create_qcow2(tmp_path / "base.qcow2", 4 * MiB)
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", overlay)
    qemu_io(overlay, "write -P 0x66 1M 64k")
    expected = reference_raw(overlay, tmp_path)

    vdiskfs("commit", "-q", overlay)

    assert_identical(base, expected)


@needs_fuse
def test_commit_mount_overlay(tmp_path, mountpoint):
    """Writes taken by `mount --overlay` end up in the image after `commit`."""
    base, middle, _ = build_chain(tmp_path)
    work = tmp_path / "work.qcow2"
    with mounted(middle, mountpoint, "--overlay", work) as exposed:
        within(write_at, exposed, 12345, b"\xab" * 100_000)
        within(write_at, exposed, 8 * MiB - 7, b"the end")
    expected = reference_raw(work, tmp_path)
    base_digest = sha256_of_file(base)

    vdiskfs("commit", "-q", work)

    assert_identical(middle, expected)
    assert_check_clean(middle)
    assert_check_clean(work)
    assert sha256_of_file(base) == base_digest


def test_commit_quiet_prints_nothing(tmp_path):
    _, _, overlay = build_chain(tmp_path)
    result = vdiskfs("commit", "--quiet", overlay)
    assert result.stdout == ""
    assert result.stderr == ""


def test_commit_progress_on_terminal(tmp_path):
    _, middle, overlay = build_chain(tmp_path)
    expected = reference_raw(overlay, tmp_path)
    leader, follower = pty.openpty()
    try:
        process = subprocess.run([sys.executable, "-m", "vdiskfs", "commit", str(overlay)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=follower, timeout=120)
        os.close(follower)
        follower = -1
        shown = os.read(leader, 65536).decode()
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)

    assert process.returncode == 0
    assert "committing 100%" in shown
    assert process.stdout == b"Image committed.\n"
    assert_identical(middle, expected)


def test_commit_without_backing_fails(tmp_path):
    image = create_qcow2(tmp_path / "alone.qcow2", MiB)
    digest = sha256_of_file(image)
    result = vdiskfs("commit", image, check=False)
    assert result.returncode == 1
    assert result.stderr == f"vdiskfs: {image} has no backing file, so there is nothing to " \
                            f"commit it into\n"
    assert sha256_of_file(image) == digest


def test_commit_missing_backing_fails(tmp_path):
    base = create_qcow2(tmp_path / "base.qcow2", MiB)
    overlay = create_qcow2(tmp_path / "overlay.qcow2", MiB, backing=str(base))
    base.unlink()
    result = vdiskfs("commit", overlay, check=False)
    assert result.returncode == 1
    assert f"cannot open backing file {base} of {overlay} for writing" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_commit_interrupted_leaves_backing_clean(tmp_path):
    base = create_qcow2(tmp_path / "base.qcow2", 2048 * MiB)
    overlay = create_qcow2(tmp_path / "overlay.qcow2", 2048 * MiB, backing=str(base))
    qemu_io(overlay, "write -P 0x33 0 1024M")

    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen([sys.executable, "-m", "vdiskfs", "commit", str(overlay)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=follower, start_new_session=True)
        os.close(follower)
        follower = -1
        shown = os.read(leader, 4096).decode()  # the first progress bar drawing
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=120)
        shown += _read_all(leader)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)

    assert "committing" in shown
    assert process.returncode == 130, shown
    assert f"commit of {overlay} interrupted" in shown
    assert stdout == b""
    check = qemu_img("check", base, check=False)
    assert check.returncode == 0, check.stdout
    assert "leaked" not in check.stdout


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO once the terminal's other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
