"""Crash consistency: SIGKILL of the mount daemon in the middle of writes.

Each round mounts an image with `vdiskfs mount -f`, lets a child process write random
patterns through the mount with an fsync after every few writes, kills the daemon with
SIGKILL at a random moment and removes the dead mount. Then qemu-img check must find no
corruption (leaked clusters are allowed, and `vdiskfs check --repair leaks` must remove
them), every write that a completed fsync covered must read back, and a new mount must
work. Rounds run on 4 KiB and 64 KiB clusters,
with and without a backing file and an internal snapshot, and over compressed clusters.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

from helpers import mounted, needs_fuse, qemu_img, qemu_io, vdiskfs
from images import KiB, MiB, create_qcow2, pattern_bytes

REPOSITORY = Path(__file__).resolve().parent.parent
DISK_SIZE = 8 * MiB
ROUNDS_PER_CONFIG = 4
# More writes than the writer completes before the kill, so that the kill hits it busy.
WRITES_PER_ROUND = 5000
SYNC_EVERY = 5
# The daemon is killed this many seconds after the writer starts. The lower bound leaves
# the writer's interpreter time to start, so that most kills hit it writing.
KILL_AFTER = (0.15, 0.6)
MOUNT_TIMEOUT = 20

# The writer child: reads its writes from a JSON file, prints the count of writes that a
# completed fsync covers after each fsync, and stops at the first error.
WRITER = r"""
import json, os, sys
path, sync_every = sys.argv[1], int(sys.argv[3])
with open(sys.argv[2]) as stream:
    writes = json.load(stream)
fd = os.open(path, os.O_RDWR)
try:
    for index, (offset, length, byte) in enumerate(writes, 1):
        os.pwrite(fd, bytes([byte]) * length, offset)
        if index % sync_every == 0:
            os.fsync(fd)
            print(index, flush=True)
except OSError:
    pass
"""


@dataclass(frozen=True)
class CrashConfig:
    name: str
    cluster_size: int
    backing: bool
    snapshot: bool
    compressed: bool = False


CONFIGS = [
    CrashConfig("4k", 4 * KiB, backing=False, snapshot=False),
    CrashConfig("64k", 64 * KiB, backing=False, snapshot=False),
    CrashConfig("4k-backing", 4 * KiB, backing=True, snapshot=False),
    CrashConfig("64k-snapshot", 64 * KiB, backing=False, snapshot=True),
    CrashConfig("4k-backing-snapshot", 4 * KiB, backing=True, snapshot=True),
    CrashConfig("4k-compressed", 4 * KiB, backing=False, snapshot=False, compressed=True),
]


def is_mounted(path: Path) -> bool:
    real_path = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="ascii", errors="surrogateescape") as table:
        return any(line.split()[4] == real_path for line in table)


def build_image(directory: Path, config: CrashConfig) -> Path:
    options = [f"cluster_size={config.cluster_size}"]
    if config.backing:
        base = directory / "base.qcow2"
        create_qcow2(base, DISK_SIZE, *options)
        (directory / "base.raw").write_bytes(pattern_bytes(DISK_SIZE, seed=3))
        qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", directory / "base.raw", base)
        image = create_qcow2(directory / "disk.qcow2", DISK_SIZE, *options,
                             backing="base.qcow2", backing_format="qcow2")
    elif config.compressed:
        (directory / "data.raw").write_bytes(pattern_bytes(DISK_SIZE, seed=4))
        image = directory / "disk.qcow2"
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", ",".join(options),
                 directory / "data.raw", image)
    else:
        image = create_qcow2(directory / "disk.qcow2", DISK_SIZE, *options)
    if not config.compressed:
        qemu_io(image, f"write -P 0x21 0 {DISK_SIZE // 2}")
    if config.snapshot:
        qemu_img("snapshot", "-c", "before", image)
    return image


def read_disk(image: Path, directory: Path, *options: str) -> bytes:
    raw = directory / "read.raw"
    qemu_img("convert", *options, "-O", "raw", image, raw)
    data = raw.read_bytes()
    raw.unlink()
    return data


def random_writes(generator: random.Random, cluster_size: int) -> List[tuple]:
    writes = []
    for _ in range(WRITES_PER_ROUND):
        length = generator.choice([512, 4096, cluster_size, 3 * cluster_size // 2 + 512,
                                   generator.randrange(1, 3 * cluster_size)])
        offset = generator.randrange(0, DISK_SIZE - length + 1)
        if generator.random() < 0.5:
            offset -= offset % 512
        writes.append((offset, length, generator.randrange(1, 256)))
    return writes


class Daemon:
    """`vdiskfs mount -f` running as a child process."""

    def __init__(self, image: Path, mountpoint: Path, log_path: Path) -> None:
        self.mountpoint = mountpoint
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vdiskfs", "mount", "-f", str(image), str(mountpoint)],
            cwd=REPOSITORY, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mountpoint):
            if self.process.poll() is not None:
                raise AssertionError(f"vdiskfs mount -f exited {self.process.returncode}; "
                                     f"see {log_path}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the mount did not appear within {MOUNT_TIMEOUT} s")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()
        if is_mounted(self.mountpoint):
            result = subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mountpoint)], check=True)
        assert not is_mounted(self.mountpoint)


def run_writer_until_kill(exposed: Path, writes: List[tuple], daemon: Daemon,
                          kill_after: float) -> int:
    """Run the writer child, kill the daemon after `kill_after` s; return the synced count."""
    writes_path = exposed.parent.parent / "writes.json"
    writes_path.write_text(json.dumps(writes))
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(exposed), str(writes_path), str(SYNC_EVERY)],
        stdout=subprocess.PIPE, text=True)
    synced = [0]

    def collect() -> None:
        for line in writer.stdout:
            synced[0] = int(line)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    time.sleep(kill_after)
    daemon.kill()
    try:
        writer.wait(timeout=30)
    except subprocess.TimeoutExpired:
        writer.kill()
        writer.wait()
    reader.join(timeout=10)
    return synced[0]


def apply_writes(data: bytearray, writes: List[tuple]) -> None:
    for offset, length, byte in writes:
        data[offset:offset + length] = bytes([byte]) * length


def unsettled_mask(writes: List[tuple]) -> bytearray:
    """Return a mask with 1 at every byte that an unsynced write may or may not have changed."""
    mask = bytearray(DISK_SIZE)
    for offset, length, _ in writes:
        mask[offset:offset + length] = b"\x01" * length
    return mask


def first_difference(got: bytes, expected: bytes, mask: bytearray) -> Optional[int]:
    """Return the first offset where `got` differs from `expected` outside `mask`."""
    step = 4096
    for start in range(0, len(expected), step):
        end = start + step
        if got[start:end] == expected[start:end]:
            continue
        for offset in range(start, min(end, len(expected))):
            if got[offset] != expected[offset] and not mask[offset]:
                return offset
    return None


@needs_fuse
@pytest.mark.parametrize("config", CONFIGS, ids=[config.name for config in CONFIGS])
def test_sigkill_keeps_image_consistent(config, tmp_path):
    image = build_image(tmp_path, config)
    snapshot_before = None
    if config.snapshot:
        snapshot_before = read_disk(image, tmp_path, "-l", "snapshot.name=before")
    generator = random.Random(f"crash-{config.name}")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    disk = bytearray(read_disk(image, tmp_path))

    for round_number in range(ROUNDS_PER_CONFIG):
        writes = random_writes(generator, config.cluster_size)
        daemon = Daemon(image, mountpoint, tmp_path / "daemon.log")
        try:
            synced = run_writer_until_kill(mountpoint / "disk.raw", writes, daemon,
                                           generator.uniform(*KILL_AFTER))
        finally:
            daemon.kill()

        check = qemu_img("check", image, check=False)
        assert check.returncode in (0, 3), (
            f"round {round_number}: qemu-img check exited {check.returncode}: "
            f"{check.stdout}{check.stderr}")
        ours = vdiskfs("check", image, check=False)
        assert ours.returncode == check.returncode, ours.stdout + ours.stderr
        if check.returncode == 3:
            vdiskfs("check", "--repair", "leaks", image)
            repaired = qemu_img("check", image, check=False)
            assert repaired.returncode == 0, repaired.stdout + repaired.stderr

        apply_writes(disk, writes[:synced])
        mask = unsettled_mask(writes[synced:])
        with mounted(image, tmp_path / "remount") as exposed:
            got = exposed.read_bytes()
        assert len(got) == DISK_SIZE
        difference = first_difference(got, bytes(disk), mask)
        assert difference is None, (
            f"round {round_number}: byte {difference} reads {got[difference]:#x}, but the "
            f"synced writes left {disk[difference]:#x} (synced {synced} of {len(writes)})")
        # What the unsynced writes left is now settled and is the next round's start.
        disk = bytearray(got)

        if snapshot_before is not None:
            assert read_disk(image, tmp_path, "-l", "snapshot.name=before") == snapshot_before
