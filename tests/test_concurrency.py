"""Concurrent writers through one mount: fio with data verification, and racing threads.

The FUSE layer serves requests from several processes and threads at once. Writes that
share clusters and L2 tables must neither corrupt the image nor tear a 512-byte sector.
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from helpers import mounted, needs_fuse, qemu_img, qemu_io
from images import KiB, MiB, create_qcow2

needs_fio = pytest.mark.skipif(shutil.which("fio") is None,
                               reason="fio is missing; contrib/setup.sh installs it")

CLUSTER_SIZE = 64 * KiB
DISK_SIZE = 16 * MiB
SECTOR = 512

# Four jobs write and verify regions of 1 MiB + 4 KiB each. Every region boundary falls
# inside a cluster that two jobs share, but no byte is written by two jobs.
FIO_JOB = """\
[global]
filename={disk}
ioengine=psync
direct=1
rw=randwrite
bsrange=4k-64k
size=1028k
offset_increment=1028k
numjobs=4
verify=crc32c
verify_fatal=1
do_verify=1
group_reporting=1

[writers]
"""

# Then four jobs write the same bytes for a while, with sizes and offsets down to 512 bytes.
FIO_OVERLAP = ["--name=overlap", "--ioengine=psync", "--direct=1", "--rw=randwrite",
               "--bsrange=512-96k", "--blockalign=512", "--size=4m", "--numjobs=4",
               "--time_based", "--runtime=2", "--group_reporting"]


def assert_check_clean(image: Path) -> None:
    result = qemu_img("check", image, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leaked" not in result.stdout, result.stdout


@needs_fuse
@needs_fio
@pytest.mark.parametrize("backing", [False, True], ids=["plain", "over-backing"])
def test_fio_verify_with_four_jobs(backing, tmp_path, mountpoint):
    options = [f"cluster_size={CLUSTER_SIZE}"]
    if backing:
        base = create_qcow2(tmp_path / "base.qcow2", DISK_SIZE, *options)
        qemu_io(base, f"write -P 0x3c 0 {DISK_SIZE}")
        image = create_qcow2(tmp_path / "disk.qcow2", DISK_SIZE, *options,
                             backing="base.qcow2", backing_format="qcow2")
    else:
        image = create_qcow2(tmp_path / "disk.qcow2", DISK_SIZE, *options)

    job = tmp_path / "verify.fio"
    with mounted(image, mountpoint) as disk:
        job.write_text(FIO_JOB.format(disk=disk))
        # fio leaves its verify state files in its working directory.
        result = subprocess.run(["fio", "--output-format=terse", str(job)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "verify" not in result.stderr.lower(), result.stderr[-2000:]

        overlap = subprocess.run(["fio", f"--filename={disk}", *FIO_OVERLAP], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
        assert overlap.returncode == 0, overlap.stdout[-2000:] + overlap.stderr[-2000:]
        served = disk.read_bytes()

    assert_check_clean(image)
    converted = tmp_path / "converted.raw"
    qemu_img("convert", "-O", "raw", image, converted)
    assert converted.read_bytes() == served


def race_writes(disk: Path, offset: int, length: int, first: bytes, second: bytes) -> None:
    """Write `first` and `second` over the same range from two threads released together."""
    barrier = threading.Barrier(2)
    errors = []

    def write(pattern: bytes) -> None:
        fd = os.open(disk, os.O_RDWR)
        try:
            barrier.wait(timeout=10)
            data = pattern * (length // len(pattern))
            view = memoryview(data)
            position = offset
            while view:
                done = os.pwrite(fd, view, position)
                view = view[done:]
                position += done
        except OSError as error:
            errors.append(error)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=write, args=(pattern,)) for pattern in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors


@needs_fuse
@pytest.mark.parametrize("cluster_size", [4 * KiB, 64 * KiB])
def test_racing_threads_leave_whole_sectors(cluster_size, tmp_path, mountpoint):
    image = create_qcow2(tmp_path / "disk.qcow2", DISK_SIZE, f"cluster_size={cluster_size}")
    first, second = b"\xaa" * SECTOR, b"\x55" * SECTOR
    # Each round writes a fresh, unallocated range that starts and ends inside clusters.
    length = 3 * cluster_size + 2 * SECTOR
    ranges = [(index * 4 * cluster_size + SECTOR, length) for index in range(20)]

    with mounted(image, mountpoint) as disk:
        for offset, size in ranges:
            race_writes(disk, offset, size, first, second)
        with open(disk, "rb") as stream:
            contents = [os.pread(stream.fileno(), size, offset) for offset, size in ranges]

    for (offset, size), data in zip(ranges, contents):
        for position in range(0, size, SECTOR):
            sector = data[position:position + SECTOR]
            assert sector in (first, second), (
                f"sector at guest offset {offset + position} is torn: "
                f"{sector[:8].hex()}...{sector[-8:].hex()}")
    assert_check_clean(image)


def read_direct(disk: Path, offset: int, length: int) -> bytes:
    """Read with O_DIRECT, so that every read reaches the daemon instead of the page cache."""
    buffer = mmap.mmap(-1, length)
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
    try:
        done = os.preadv(fd, [buffer], offset)
        return bytes(buffer[:done])
    finally:
        os.close(fd)
        buffer.close()


@needs_fuse
def test_large_reads_never_see_reused_clusters(tmp_path, mountpoint):
    # Uncached 1 MiB reads run in the daemon's worker thread while writes free clusters
    # (zeros) and allocate them again for other guest data. A read must return what its
    # range held, never the bytes of the other range.
    image = create_qcow2(tmp_path / "disk.qcow2", DISK_SIZE, f"cluster_size={CLUSTER_SIZE}")
    watched, other = 0, 8 * MiB
    block = MiB
    watched_data = b"\x5a" * block
    other_data = b"\xc3" * block
    zeros = bytes(block)
    stop = threading.Event()
    seen = []

    with mounted(image, mountpoint) as disk:
        def write_loop() -> None:
            fd = os.open(disk, os.O_RDWR)
            image_fd = os.open(image, os.O_RDONLY)
            try:
                while not stop.is_set():
                    for offset, data in ((watched, zeros), (other, other_data),
                                         (other, zeros), (watched, watched_data)):
                        os.pwrite(fd, data, offset)
                        os.fsync(fd)
                        # Evict the image from the host page cache, so that the reads
                        # wait for the disk in the daemon's worker thread.
                        os.posix_fadvise(image_fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(image_fd)
                os.close(fd)

        writer = threading.Thread(target=write_loop)
        writer.start()
        try:
            for _ in range(300):
                data = read_direct(disk, watched, block)
                for start in range(0, block, CLUSTER_SIZE):
                    seen.append(data[start:start + CLUSTER_SIZE])
        finally:
            stop.set()
            writer.join(timeout=60)

    allowed = {zeros[:CLUSTER_SIZE], watched_data[:CLUSTER_SIZE]}
    wrong = [index for index, cluster in enumerate(seen) if cluster not in allowed]
    assert not wrong, f"{len(wrong)} clusters read other data, first at read {wrong[0]}"
    assert_check_clean(image)
