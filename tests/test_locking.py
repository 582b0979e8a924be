"""Tests that vdiskfs and QEMU see each other's image locks.

The other side is always a real QEMU process: qemu-io kept running with commands on a
pipe, or qemu-img and qemu-io started while a vdiskfs mount holds the image. The lock
bytes are read from /proc/PID/fdinfo, so these tests run on Linux only.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Set

import pytest

from helpers import mounted, needs_fuse, qemu_img, qemu_io, vdiskfs
from images import create_qcow2
from test_mount import within, write_at
from vdiskfs import locking
from vdiskfs.errors import ImageLockedError
from vdiskfs.registry import open_chain

pytestmark = pytest.mark.skipif(locking.F_OFD_SETLK is None or not sys.platform.startswith("linux"),
                                reason="open-file-description locks and /proc are Linux-only")

MiB = 1 << 20
START_TIMEOUT = 30

QEMU_WRITE_LOCK_ERROR = 'Failed to get "write" lock'
QEMU_SHARED_WRITE_LOCK_ERROR = 'Failed to get shared "write" lock'


@pytest.fixture
def image(tmp_path) -> Path:
    path = create_qcow2(tmp_path / "disk.qcow2", 4 * MiB)
    qemu_io(path, "write -P 0x5a 0 1M")
    return path


def locked_bytes(path: Path, pid: int) -> Set[int]:
    """Return the lock bytes that process `pid` holds on `path`, from its fdinfo files."""
    status = os.stat(path)
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    found = set()
    for owner, start, end in locking._fdinfo_locks(device):
        if owner == pid:
            found.update(range(start, end + 1))
    return found


@contextlib.contextmanager
def qemu_io_holding(path: Path, *options: str) -> Iterator[subprocess.Popen]:
    """Run qemu-io on `path` until the block ends, reading commands from a pipe."""
    process = subprocess.Popen(["qemu-io", *options, str(path)], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while locking.LOCK_PERM_BASE not in locked_bytes(path, process.pid):
            if process.poll() is not None:
                pytest.fail(f"qemu-io exited {process.returncode}: {process.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"qemu-io did not lock {path} within {START_TIMEOUT} s")
            time.sleep(0.02)
        yield process
    finally:
        if process.poll() is None:
            process.stdin.write("quit\n")
            process.stdin.close()
            try:
                process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def daemon_pid(mountpoint: Path) -> int:
    from vdiskfs.daemon import RuntimeFiles

    return int(RuntimeFiles.for_mountpoint(os.path.realpath(mountpoint)).pid.read_text())


# Lock layout


@pytest.mark.parametrize("qemu_options, mode", [
    ([], locking.WRITABLE),
    (["-r"], locking.READ_ONLY),
    (["-r", "-U"], locking.FORCE_SHARE),
], ids=["read-write", "read-only", "force-share"])
def test_lock_bytes_match_qemu_io(image, qemu_options, mode):
    with qemu_io_holding(image, *qemu_options) as process:
        qemu_bytes = locked_bytes(image, process.pid)
    lock = locking.acquire_image_lock(str(image), mode)
    try:
        assert locked_bytes(image, os.getpid()) == qemu_bytes
    finally:
        lock.release()
    assert locked_bytes(image, os.getpid()) == set()


def test_lock_mode_choice():
    assert locking.lock_mode(read_only=False) == locking.WRITABLE
    assert locking.lock_mode(read_only=True) == locking.READ_ONLY
    assert locking.lock_mode(read_only=True, force_share=True) == locking.FORCE_SHARE


# vdiskfs in front of a running qemu-io


def test_open_chain_rejects_qemu_writer(image):
    with qemu_io_holding(image) as process:
        for read_only in (False, True):
            with pytest.raises(ImageLockedError) as raised:
                open_chain(str(image), read_only=read_only)
            assert str(raised.value) == (f"the image is locked for writing by another process "
                                         f"(pid {process.pid})")
        driver = open_chain(str(image), read_only=True, force_share=True)
        driver.close()


def test_open_chain_shares_with_qemu_reader(image):
    with qemu_io_holding(image, "-r"):
        driver = open_chain(str(image), read_only=True)
        try:
            assert driver.read(0, 512) == b"\x5a" * 512
        finally:
            driver.close()
        with pytest.raises(ImageLockedError) as raised:
            open_chain(str(image), read_only=False)
        assert "which does not share the write permission" in str(raised.value)


@needs_fuse
@pytest.mark.parametrize("options", [[], ["--read-only"]], ids=["writable", "read-only"])
def test_mount_fails_while_qemu_writes(image, mountpoint, options):
    with qemu_io_holding(image) as process:
        result = vdiskfs("mount", *options, image, mountpoint, check=False)
    assert result.returncode == 1
    assert result.stderr == (f"vdiskfs: cannot open {image}: the image is locked for writing "
                             f"by another process (pid {process.pid})\n")
    assert not os.path.ismount(mountpoint)


@needs_fuse
def test_mount_force_share_warns(image, mountpoint):
    with qemu_io_holding(image) as process:
        with mounted(image, mountpoint, "--read-only", "--force-share") as exposed:
            assert within(exposed.read_bytes)[:MiB] == b"\x5a" * MiB
    # `mounted` does not return the mount's output, so mount once more to see the warning.
    with qemu_io_holding(image) as process:
        result = vdiskfs("mount", "--read-only", "-U", image, mountpoint)
        try:
            assert f"open for writing by another process (pid {process.pid})" in result.stderr
            assert "--force-share" in result.stderr
        finally:
            vdiskfs("umount", mountpoint)


def test_mount_force_share_needs_read_only(image, mountpoint):
    result = vdiskfs("mount", "--force-share", image, mountpoint, check=False)
    assert result.returncode == 1
    assert "--force-share needs --read-only" in result.stderr


@needs_fuse
def test_read_only_mount_beside_qemu_reader(image, mountpoint):
    with qemu_io_holding(image, "-r"):
        with mounted(image, mountpoint, "--read-only") as exposed:
            assert within(exposed.read_bytes)[:MiB] == b"\x5a" * MiB


# QEMU in front of a vdiskfs mount


@needs_fuse
def test_qemu_write_fails_while_mounted(image, mountpoint):
    with mounted(image, mountpoint) as exposed:
        within(write_at, exposed, 0, b"vdiskfs")
        assert locked_bytes(image, daemon_pid(mountpoint)) == {100, 101, 103, 201, 203}

        result = subprocess.run(["qemu-io", "-c", "write 0 512", str(image)],
                                capture_output=True, text=True)
        assert result.returncode != 0
        assert QEMU_WRITE_LOCK_ERROR in result.stderr

        info = qemu_img("info", image, check=False)
        assert info.returncode != 0
        assert QEMU_SHARED_WRITE_LOCK_ERROR in info.stderr
        qemu_img("info", "-U", image)

        info = vdiskfs("info", image, check=False)
        assert info.returncode == 1
        assert "the image is locked for writing by another process" in info.stderr
        assert "virtual size: 4 MiB" in vdiskfs("info", "-U", image).stdout

    # The daemon has exited, so its locks are gone.
    qemu_io(image, "write -P 0x11 0 512")


@needs_fuse
def test_qemu_reads_beside_read_only_mount(image, mountpoint):
    with mounted(image, mountpoint, "--read-only") as exposed:
        assert locked_bytes(image, daemon_pid(mountpoint)) == {100, 201, 203}
        qemu_img("info", image)
        result = subprocess.run(["qemu-io", "-r", "-c", "read -P 0x5a 0 1M", str(image)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "read 1048576/1048576 bytes" in result.stdout

        result = subprocess.run(["qemu-io", "-c", "write 0 512", str(image)],
                                capture_output=True, text=True)
        assert QEMU_WRITE_LOCK_ERROR in result.stderr
        assert within(exposed.read_bytes)[:MiB] == b"\x5a" * MiB


@needs_fuse
def test_backing_files_locked_read_only(tmp_path, mountpoint):
    base = tmp_path / "base.img"
    base.write_bytes(bytes(4 * MiB))
    top = create_qcow2(tmp_path / "top.qcow2", 4 * MiB, backing=str(base), backing_format="raw")
    with mounted(top, mountpoint):
        assert locked_bytes(base, daemon_pid(mountpoint)) == {100, 201, 203}
        result = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(base)],
                                capture_output=True, text=True)
        assert QEMU_WRITE_LOCK_ERROR in result.stderr
        qemu_img("info", "-f", "raw", base)


@needs_fuse
def test_overlay_mount_locks(tmp_path, mountpoint, image):
    overlay = tmp_path / "work.qcow2"
    with mounted(image, mountpoint, "--overlay", overlay):
        pid = daemon_pid(mountpoint)
        assert locked_bytes(image, pid) == {100, 201, 203}
        assert locked_bytes(overlay, pid) == {100, 101, 103, 201, 203}

        result = vdiskfs("commit", "-q", overlay, check=False)
        assert result.returncode == 1
        assert result.stderr == (f"vdiskfs: cannot open {overlay}: the image is locked for "
                                 f"writing by another process (pid {pid})\n")

        second = tmp_path / "second"
        second.mkdir()
        result = vdiskfs("mount", image, second, check=False)
        assert result.returncode == 1
        assert "which does not share the write permission" in result.stderr


def test_commit_fails_while_qemu_reads_backing(tmp_path, image):
    overlay = create_qcow2(tmp_path / "work.qcow2", 4 * MiB, backing=str(image))
    qemu_io(overlay, "write -P 0x77 0 64k")
    with qemu_io_holding(image, "-r") as process:
        result = vdiskfs("commit", "-q", overlay, check=False)
    assert result.returncode == 1
    assert f"cannot open backing file {image} of {overlay} for writing" in result.stderr
    assert f"(pid {process.pid})" in result.stderr
    vdiskfs("commit", "-q", overlay)


@contextlib.contextmanager
def storage_daemon_holding(path: Path) -> Iterator[subprocess.Popen]:
    """Run qemu-storage-daemon with `path` open read-write, as a VM's disk would be."""
    process = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=file0,filename={path}",
         "--blockdev", "driver=qcow2,node-name=disk0,file=file0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not locked_bytes(path, process.pid):
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "qemu-storage-daemon took no lock"
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=START_TIMEOUT)


@needs_fuse
@pytest.mark.skipif(not os.path.exists("/usr/bin/qemu-storage-daemon"),
                    reason="qemu-storage-daemon is missing (Debian package qemu-system-common)")
def test_mount_fails_while_storage_daemon_writes(image, mountpoint):
    with storage_daemon_holding(image) as process:
        result = vdiskfs("mount", image, mountpoint, check=False)
        assert result.returncode == 1
        assert result.stderr == (f"vdiskfs: cannot open {image}: the image is locked for "
                                 f"writing by another process (pid {process.pid})\n")
        assert not os.path.ismount(mountpoint)

        with mounted(image, mountpoint, "--read-only", "--force-share") as exposed:
            assert within(os.path.getsize, exposed) > 0


@needs_fuse
@pytest.mark.skipif(not os.path.exists("/usr/bin/qemu-storage-daemon"),
                    reason="qemu-storage-daemon is missing (Debian package qemu-system-common)")
def test_storage_daemon_fails_while_mounted(image, mountpoint):
    with mounted(image, mountpoint):
        result = subprocess.run(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=file0,filename={image}",
             "--blockdev", "driver=qcow2,node-name=disk0,file=file0"],
            capture_output=True, text=True, timeout=START_TIMEOUT)
    assert result.returncode != 0
    assert QEMU_WRITE_LOCK_ERROR in result.stderr
