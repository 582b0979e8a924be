"""Tests of `vdiskfs mount` and `vdiskfs umount`, the daemon's life and the FUSE handlers.

Most tests mount for real and read the exposed file as any program would. File I/O on a
mount runs through within(), so a hung daemon fails the test after IO_TIMEOUT seconds
instead of blocking the run. The handler tests at the end call DiskOperations in process
with a stand-in driver, to reach error paths that real images cannot trigger on demand.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyfuse3
import pytest
import trio

from conftest import force_unmount, remove_runtime_log, wait_for_exit
from helpers import mounted, needs_fuse, qemu_img, qemu_io, reference_raw, vdiskfs
from images import MiB
from vdiskfs import daemon
from vdiskfs.errors import CorruptImageError, ReadOnlyError, UnsupportedFeatureError
from vdiskfs.fs import DiskOperations, ErrorLog, errno_for, exported_name
from vdiskfs.registry import open_chain

IO_TIMEOUT = 30

# A size that is no multiple of the page size, so reads at the end are short.
RAW_SIZE = 3 * 1024 * 1024 + 1234


def within(function, *args, timeout: float = IO_TIMEOUT):
    """Call `function(*args)` in a thread and return its result; fail if it hangs."""
    outcome = {}

    def target():
        try:
            outcome["result"] = function(*args)
        except BaseException as error:  # handed to the test thread below
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{function.__name__}{args} on the mount hung for {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def read_file(path: Path) -> bytes:
    return path.read_bytes()


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as stream:
        return os.pread(stream.fileno(), length, offset)


def write_at(path: Path, offset: int, data: bytes) -> int:
    with open(path, "r+b") as stream:
        written = os.pwrite(stream.fileno(), data, offset)
        os.fsync(stream.fileno())
        return written


def is_mounted(path: Path) -> bool:
    return daemon.find_mount(os.path.realpath(path)) is not None


def runtime_files(mountpoint: Path) -> daemon.RuntimeFiles:
    return daemon.RuntimeFiles.for_mountpoint(os.path.realpath(mountpoint))


def daemon_pid(mountpoint: Path) -> int:
    return int(runtime_files(mountpoint).pid.read_text())


def daemon_log(mountpoint: Path) -> str:
    return runtime_files(mountpoint).log.read_text()


@pytest.fixture
def raw_image(tmp_path) -> Path:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(1).randbytes(RAW_SIZE))
    return image


@pytest.fixture
def qcow2_image(tmp_path) -> Path:
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "16M")
    qemu_io(image, "write -P 0x11 0 1M", "write -P 0x22 5M 64k", "write -P 0x33 12345 777",
            "write -z 512k 64k")
    return image


# Reading


@needs_fuse
def test_mount_raw_matches_image(raw_image, mountpoint):
    with mounted(raw_image, mountpoint) as exposed:
        assert within(read_file, exposed) == raw_image.read_bytes()


@needs_fuse
def test_mount_qcow2_matches_qemu_convert(qcow2_image, mountpoint, tmp_path):
    expected = reference_raw(qcow2_image, tmp_path).read_bytes()
    with mounted(qcow2_image, mountpoint) as exposed:
        assert within(read_file, exposed) == expected


@needs_fuse
def test_read_short_at_end(raw_image, mountpoint):
    data = raw_image.read_bytes()
    with mounted(raw_image, mountpoint) as exposed:
        assert within(read_at, exposed, RAW_SIZE - 100, 4096) == data[-100:]
        assert within(read_at, exposed, RAW_SIZE, 4096) == b""
        assert within(read_at, exposed, RAW_SIZE + 65536, 4096) == b""


@needs_fuse
def test_stat_raw_size_mode_owner(raw_image, mountpoint):
    with mounted(raw_image, mountpoint) as exposed:
        status = within(os.stat, exposed)
    assert stat.S_ISREG(status.st_mode)
    assert stat.S_IMODE(status.st_mode) == 0o644
    assert status.st_size == RAW_SIZE
    assert status.st_uid == os.getuid()
    assert status.st_gid == os.getgid()
    assert status.st_blocks == os.stat(raw_image).st_blocks


@needs_fuse
def test_stat_qcow2_size_and_blocks(qcow2_image, mountpoint):
    with mounted(qcow2_image, mountpoint) as exposed:
        status = within(os.stat, exposed)
    assert status.st_size == 16 * 1024 * 1024
    assert status.st_blocks == os.stat(qcow2_image).st_blocks


@needs_fuse
@pytest.mark.parametrize("image_name, exposed_name", [
    ("disk.qcow2", "disk.raw"),
    ("disk", "disk.raw"),
    ("my.disk.img", "my.disk.raw"),
    ("disk.raw", "disk.raw"),
])
def test_file_name_rule(tmp_path, mountpoint, image_name, exposed_name):
    image = tmp_path / image_name
    image.write_bytes(bytes(4096))
    with mounted(image, mountpoint, "--format", "raw"):
        assert within(os.listdir, mountpoint) == [exposed_name]


@needs_fuse
def test_mount_path_with_space_and_comma(tmp_path):
    image = tmp_path / "my disk, 1.img"
    image.write_bytes(random.Random(2).randbytes(8192))
    mountpoint = tmp_path / "mnt dir, 2"
    try:
        with mounted(image, mountpoint) as exposed:
            assert exposed.name == "my disk, 1.raw"
            assert within(read_file, exposed) == image.read_bytes()
            assert daemon.find_mount(str(mountpoint)).source == str(image)
    finally:
        force_unmount(mountpoint)
        remove_runtime_log(mountpoint)


# Writing


@needs_fuse
def test_read_only_write_fails_erofs(raw_image, mountpoint):
    before = raw_image.read_bytes()
    with mounted(raw_image, mountpoint, "--read-only") as exposed:
        assert stat.S_IMODE(within(os.stat, exposed).st_mode) == 0o444
        with pytest.raises(OSError) as raised:
            within(write_at, exposed, 0, b"x")
        assert raised.value.errno == errno.EROFS
        with pytest.raises(OSError) as raised:
            within(os.truncate, exposed, RAW_SIZE * 2)
        assert raised.value.errno == errno.EROFS
        assert "ro" in _mount_options(mountpoint)
    assert raw_image.read_bytes() == before


def _mount_options(mountpoint: Path) -> list:
    real_path = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            if fields[4] == real_path:
                return fields[5].split(",")
    return []


@needs_fuse
def test_write_raw_persists(raw_image, mountpoint):
    expected = bytearray(raw_image.read_bytes())
    payload = random.Random(3).randbytes(10000)
    with mounted(raw_image, mountpoint) as exposed:
        assert within(write_at, exposed, 4096 + 7, payload) == len(payload)
        expected[4096 + 7:4096 + 7 + len(payload)] = payload
        assert within(read_file, exposed) == bytes(expected)
    assert raw_image.read_bytes() == bytes(expected)


@needs_fuse
def test_write_past_end_stops_at_end(raw_image, mountpoint):
    with mounted(raw_image, mountpoint) as exposed:
        assert within(write_at, exposed, RAW_SIZE - 10, b"y" * 100) == 10
        with pytest.raises(OSError) as raised:
            within(write_at, exposed, RAW_SIZE, b"z")
        assert raised.value.errno == errno.ENOSPC
        assert within(os.stat, exposed).st_size == RAW_SIZE
    assert raw_image.read_bytes()[-10:] == b"y" * 10
    assert os.path.getsize(raw_image) == RAW_SIZE


@needs_fuse
def test_truncate_grows_raw(raw_image, mountpoint):
    before = raw_image.read_bytes()
    new_size = RAW_SIZE + 1024 * 1024
    with mounted(raw_image, mountpoint) as exposed:
        within(os.truncate, exposed, new_size)
        assert within(os.stat, exposed).st_size == new_size
        assert within(read_at, exposed, RAW_SIZE, 4096) == bytes(4096)
    assert os.path.getsize(raw_image) == new_size
    assert raw_image.read_bytes()[:RAW_SIZE] == before


@needs_fuse
def test_truncate_shrink_rejected(raw_image, mountpoint):
    with mounted(raw_image, mountpoint) as exposed:
        with pytest.raises(OSError) as raised:
            within(os.truncate, exposed, 4096)
        assert raised.value.errno == errno.EPERM
        assert within(os.stat, exposed).st_size == RAW_SIZE
    assert os.path.getsize(raw_image) == RAW_SIZE
    assert "shrinking a disk would drop guest data" in daemon_log(mountpoint)


@needs_fuse
def test_directory_rejects_new_files(raw_image, mountpoint):
    with mounted(raw_image, mountpoint):
        with pytest.raises(OSError) as raised:
            within(open, mountpoint / "new.raw", "wb")
        assert raised.value.errno == errno.EPERM


# Daemon life


@needs_fuse
def test_umount_waits_for_daemon_exit(raw_image, mountpoint):
    vdiskfs("mount", raw_image, mountpoint)
    pid = daemon_pid(mountpoint)
    pid_path = runtime_files(mountpoint).pid

    vdiskfs("umount", mountpoint)

    # The daemon writes its last log line and then exits, which drops the pid file lock
    # that umount waits for.
    assert daemon_log(mountpoint).rstrip().endswith("stopped with exit status 0")
    assert not pid_path.exists()
    assert not is_mounted(mountpoint)
    assert wait_for_exit(pid, timeout=2) == 0


@needs_fuse
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_unmounts_cleanly(raw_image, mountpoint, signum):
    # The signal comes right after `vdiskfs mount` returns. The daemon blocks stop signals
    # until its FUSE loop can handle them, so even that early it must not leave a dead mount.
    vdiskfs("mount", raw_image, mountpoint)
    pid = daemon_pid(mountpoint)

    os.kill(pid, signum)

    assert wait_for_exit(pid, timeout=IO_TIMEOUT) == 0
    assert not is_mounted(mountpoint)
    assert f"received {signal.Signals(signum).name}" in daemon_log(mountpoint)


@needs_fuse
@pytest.mark.parametrize("how", ["write-writeback-cache", "mmap-default", "mmap-writeback-cache"])
def test_signal_writes_back_cached_pages(how, tmp_path, mountpoint):
    # Written pages can stay in the kernel until writeback: with --writeback-cache, and for
    # a shared mmap in any mode. A stop signal must have them written to the image before
    # the connection closes. 64 MiB is more than a stop that skips the wait got through.
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "128M")
    size = 64 * MiB
    data = random.Random(3).randbytes(size)
    options = ["--writeback-cache"] if how.endswith("writeback-cache") else []
    vdiskfs("mount", *options, image, mountpoint)
    pid = daemon_pid(mountpoint)

    # The descriptor stays open, because close() would write the pages back itself.
    fd = os.open(mountpoint / "disk.raw", os.O_RDWR)
    mapping = None
    try:
        if how.startswith("mmap"):
            mapping = mmap.mmap(fd, size, offset=MiB)
            mapping[:] = data
        else:
            os.pwrite(fd, data, MiB)
        os.kill(pid, signal.SIGTERM)
        assert wait_for_exit(pid, timeout=IO_TIMEOUT) == 0
    finally:
        try:
            if mapping is not None:
                mapping.close()
            os.close(fd)
        except (OSError, ValueError):
            pass  # the connection is gone

    converted = tmp_path / "converted.raw"
    qemu_img("convert", "-O", "raw", image, converted)
    assert converted.read_bytes()[MiB:MiB + size] == data
    assert "received SIGTERM, writing back cached pages" in daemon_log(mountpoint)


@needs_fuse
def test_fusermount_stops_daemon(raw_image, mountpoint):
    vdiskfs("mount", raw_image, mountpoint)
    pid = daemon_pid(mountpoint)

    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True, timeout=IO_TIMEOUT)

    assert wait_for_exit(pid, timeout=IO_TIMEOUT) == 0
    assert not is_mounted(mountpoint)
    assert "was unmounted, closing the image" in daemon_log(mountpoint)


@needs_fuse
def test_foreground_sigint(raw_image, mountpoint):
    process = subprocess.Popen(
        [sys.executable, "-m", "vdiskfs", "mount", "-f", str(raw_image), str(mountpoint)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + IO_TIMEOUT
        while not is_mounted(mountpoint):
            if process.poll() is not None:
                pytest.fail(f"vdiskfs mount -f exited {process.returncode} before mounting: "
                            f"{process.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"vdiskfs mount -f did not mount within {IO_TIMEOUT} s")
            time.sleep(0.02)
        assert within(read_at, mountpoint / "disk.raw", 0, 4096) == raw_image.read_bytes()[:4096]

        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=IO_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0
    assert not is_mounted(mountpoint)
    assert "received SIGINT" in stderr
    assert "Traceback" not in stderr


# User errors: one line on stderr and exit status 1


def assert_user_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.stderr == message + "\n"
    assert result.returncode == 1


@needs_fuse
def test_mount_missing_image(tmp_path, mountpoint):
    image = tmp_path / "missing.qcow2"
    result = vdiskfs("mount", image, mountpoint, check=False)
    assert_user_error(result, f"vdiskfs: cannot open {image}: No such file or directory")


@needs_fuse
def test_mount_missing_mountpoint(raw_image, tmp_path):
    missing = tmp_path / "nowhere"
    result = vdiskfs("mount", raw_image, missing, check=False)
    assert_user_error(result, f"vdiskfs: cannot mount on {missing}: no such directory")


@needs_fuse
def test_mount_mountpoint_not_directory(raw_image, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = vdiskfs("mount", raw_image, fifo, check=False)
    assert_user_error(result, f"vdiskfs: cannot mount on {fifo}: not a directory or regular file")


@needs_fuse
def test_mount_mountpoint_in_use(raw_image, mountpoint):
    with mounted(raw_image, mountpoint):
        result = vdiskfs("mount", raw_image, mountpoint, check=False)
    assert_user_error(result, f"vdiskfs: cannot mount on {mountpoint}: already a mount point")


@needs_fuse
def test_mount_unknown_format(raw_image, mountpoint):
    result = vdiskfs("mount", "--format", "vmdk", raw_image, mountpoint, check=False)
    assert_user_error(result, f"vdiskfs: cannot open {raw_image}: unknown format 'vmdk' "
                              f"(known: qcow2, raw)")


@needs_fuse
def test_mount_unsupported_feature(tmp_path, mountpoint):
    # crypt_method (big-endian u32 at header offset 32) = 1 marks AES encryption. Setting it
    # by hand avoids `qemu-img create -o encrypt.format=luks`, whose key derivation timing
    # can fail on a loaded machine.
    image = tmp_path / "encrypted.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    with open(image, "r+b") as stream:
        os.pwrite(stream.fileno(), (1).to_bytes(4, "big"), 32)
    with pytest.raises(UnsupportedFeatureError) as raised:
        open_chain(str(image), read_only=True)

    result = vdiskfs("mount", image, mountpoint, check=False)

    assert_user_error(result, f"vdiskfs: cannot open {image}: {raised.value}")
    assert not is_mounted(mountpoint)


@needs_fuse
def test_mount_missing_backing_file(tmp_path, mountpoint):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    base.unlink()
    result = vdiskfs("mount", top, mountpoint, check=False)
    assert_user_error(result, f"vdiskfs: cannot open {top}: backing file {base} of {top} "
                              f"not found")


@needs_fuse
def test_mount_fuse_failure_in_daemon(raw_image, mountpoint):
    # libfuse rejects the option inside the daemon, after the fork; the parent reports it.
    result = vdiskfs("mount", "-o", "no_such_option", raw_image, mountpoint, check=False)
    assert_user_error(result, f"vdiskfs: cannot mount {raw_image} on {mountpoint}: "
                              f"fuse: unknown option(s): `-o no_such_option'")
    assert not is_mounted(mountpoint)


@needs_fuse
def test_mount_fuse_failure_in_foreground(raw_image, mountpoint):
    result = vdiskfs("mount", "-f", "-o", "no_such_option", raw_image, mountpoint, check=False)
    assert_user_error(result, f"vdiskfs: cannot mount {raw_image} on {mountpoint}: "
                              f"fuse: unknown option(s): `-o no_such_option'")


@needs_fuse
def test_umount_busy(raw_image, mountpoint):
    with mounted(raw_image, mountpoint) as exposed:
        stream = within(open, exposed, "rb")
        try:
            result = vdiskfs("umount", mountpoint, check=False)
            assert is_mounted(mountpoint)
        finally:
            stream.close()
    assert_user_error(result, f"vdiskfs: cannot unmount {mountpoint}: target is busy")


@needs_fuse
def test_umount_not_mounted(mountpoint):
    result = vdiskfs("umount", mountpoint, check=False)
    assert_user_error(result, f"vdiskfs: cannot unmount {mountpoint}: not mounted")


@needs_fuse
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_umount_other_file_system(mountpoint):
    subprocess.run(["mount", "-t", "tmpfs", "vdiskfs-test", str(mountpoint)], check=True)
    try:
        result = vdiskfs("umount", mountpoint, check=False)
        assert is_mounted(mountpoint)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    assert_user_error(result, f"vdiskfs: cannot unmount {mountpoint}: not a vdiskfs mount "
                              f"(file system type tmpfs)")


@needs_fuse
def test_unmount_through_fusermount_busy(raw_image, mountpoint):
    # Users other than root unmount through fusermount3; root can take that path too.
    with mounted(raw_image, mountpoint) as exposed:
        with open(exposed, "rb"):
            with pytest.raises(OSError) as raised:
                daemon.unmount_with_fusermount(str(mountpoint))
        assert raised.value.errno == errno.EBUSY


# Runtime files


def test_runtime_dir_for_user(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert daemon.runtime_dir() == tmp_path / "vdiskfs"


def test_runtime_dir_for_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert daemon.runtime_dir() == Path("/run/vdiskfs")


def test_mount_key_long_path():
    long_path = "/" + "d" * 300
    assert daemon.mount_key("/mnt/a b") == "%2Fmnt%2Fa%20b"
    assert daemon.mount_key(long_path).startswith("sha256-")
    assert len(daemon.mount_key(long_path)) < 255


def test_pid_file_rejects_second_owner(tmp_path):
    first = daemon.PidFile(tmp_path / "m.pid")
    first.acquire()
    second = daemon.PidFile(tmp_path / "m.pid")
    # flock() locks belong to open file descriptions, so a second open in this process
    # conflicts just as another daemon would.
    with pytest.raises(daemon.MountError) as raised:
        second.acquire()
    assert str(raised.value) == f"vdiskfs daemon {os.getpid()} still serves it"
    watch = daemon.watch_daemon(tmp_path / "m.pid")
    assert watch.pid == os.getpid()
    assert watch.alive()
    watch.close()


# Handlers in process


@pytest.fixture
def real_disk(tmp_path):
    """A qcow2 image opened read-write with the real driver, served by in-process handlers."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    driver = open_chain(str(image), read_only=False)
    flushes = []
    real_flush = driver.flush

    def counting_flush():
        flushes.append(1)
        real_flush()

    driver.flush = counting_flush
    operations = DiskOperations([("disk.raw", driver)])
    yield driver, operations, flushes
    driver.close()


INODE = pyfuse3.ROOT_INODE + 1


def call(handler, *args):
    return trio.run(handler, *args)


def test_handler_corrupt_read_eio_logged(tmp_path, caplog):
    image = tmp_path / "damaged.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 128k", str(image)], check=True,
                   capture_output=True)
    l1_offset = int.from_bytes(image.read_bytes()[40:48], "big")
    l2_offset = int.from_bytes(image.read_bytes()[l1_offset:l1_offset + 8], "big") & ((1 << 56) - 512)
    with open(image, "r+b") as stream:
        stream.seek(l2_offset + 8)  # the entry of guest cluster 1
        stream.write((0x80000000_00000000 | 0x7FFF_FFFF_0000).to_bytes(8, "big"))
    driver = open_chain(str(image), read_only=True)
    operations = DiskOperations([("damaged.raw", driver)])
    try:
        with caplog.at_level(logging.ERROR, logger="vdiskfs.fs"):
            with pytest.raises(pyfuse3.FUSEError) as raised:
                call(operations.read, INODE, 65536, 4096)
        assert raised.value.errno == errno.EIO
        message = caplog.records[-1].getMessage()
        assert str(image) in message
        assert "guest offset 65536" in message
        assert "length 4096" in message
        assert "outside the image file" in message

        assert call(operations.read, INODE, 0, 4) == b"\x11" * 4
    finally:
        driver.close()


@pytest.mark.parametrize("error, expected", [
    (ReadOnlyError("the qcow2 driver cannot write"), errno.EROFS),
    (UnsupportedFeatureError("compressed cluster"), errno.EOPNOTSUPP),
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (OSError(errno.EIO, "Input/output error"), errno.EIO),
    (CorruptImageError("refcount block out of range"), errno.EIO),
    (ValueError("a bug"), errno.EIO),
])
def test_errno_for_error(error, expected):
    assert errno_for(error) == expected


def test_handler_flush_only_after_write(real_disk):
    driver, operations, flushes = real_disk
    call(operations.flush, INODE)
    assert len(flushes) == 0
    call(operations.write, INODE, 0, b"data")
    call(operations.flush, INODE)
    call(operations.flush, INODE)
    assert len(flushes) == 1
    call(operations.fsync, INODE, False)
    assert len(flushes) == 2


def test_handler_close_closes_drivers(real_disk):
    driver, operations, _ = real_disk
    assert operations.close()
    assert driver.fd == -1


def test_handler_lookup_unknown_enoent(real_disk):
    _, operations, _ = real_disk
    with pytest.raises(pyfuse3.FUSEError) as raised:
        call(operations.lookup, pyfuse3.ROOT_INODE, b"other.raw", None)
    assert raised.value.errno == errno.ENOENT


def test_handler_file_attributes(real_disk):
    driver, operations, _ = real_disk
    attributes = call(operations.lookup, pyfuse3.ROOT_INODE, b"disk.raw", None)
    assert attributes.st_ino == INODE
    assert attributes.st_size == driver.virtual_size
    assert attributes.st_blocks == driver.allocated_size() // 512
    assert attributes.st_mode == stat.S_IFREG | 0o644


def test_error_log_rate_limit(caplog):
    now = [0.0]
    errors = ErrorLog(burst=2, window=60, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="vdiskfs.fs"):
        for _ in range(5):
            errors.log(("read", "CorruptImageError"), logging.ERROR, "read failed")
        assert len(caplog.records) == 2
        assert errors.dropped() == 3
        now[0] = 61.0
        errors.log(("read", "CorruptImageError"), logging.ERROR, "read failed")
    assert [record.getMessage() for record in caplog.records[2:]] == [
        "3 similar messages were not logged in the last 61 s", "read failed"]


@pytest.mark.parametrize("image, expected", [
    ("disk.qcow2", "disk.raw"),
    ("/images/disk", "disk.raw"),
    ("a.b.img", "a.b.raw"),
])
def test_exported_name(image, expected):
    assert exported_name(image) == expected
