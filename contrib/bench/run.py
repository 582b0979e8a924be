#!/usr/bin/env python3
"""Compare vdiskfs with qemu-storage-daemon, qcowmount and the raw file read without FUSE.

One run creates the images, runs every workload against every system that can serve it,
and writes results.json, results.png (when matplotlib can be imported or installed) and a
Markdown table in DIR. Each workload runs --runs times per system and the median is kept,
because a shared machine gives noisy numbers.

Systems:
- vdiskfs: `python -m vdiskfs mount IMAGE MNT`, file MNT/<stem>.raw.
- vdiskfs --writeback-cache: the same with the kernel's writeback cache, for the write
  workloads only, because the option changes nothing for reads.
- qemu-storage-daemon: a FUSE export of a qcow2 node onto a regular file.
- qcowmount (libqcow): read-only workloads only; it does not follow backing files, so it
  is left out of the backing-chain read.
- raw: the same guest data as a plain raw file, read and written without FUSE, which is
  the ceiling.

Run it as root from the checkout with the project's virtualenv:
  .venv/bin/python contrib/bench/run.py [--quick] [--out DIR]

It needs qemu-img, qemu-io, qemu-storage-daemon, qcowmount, fio, mkfs.ext2, losetup and
fusermount3, and it drops the page cache (/proc/sys/vm/drop_caches) before every read run,
which slows down everything else on the machine for a moment. Everything it creates lives
in one `mktemp -d` directory under /tmp, removed at the end unless --keep is given.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

REPO = Path(__file__).resolve().parents[2]

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB

# Size of the buffer of random bytes that write workloads cycle through. Random bytes keep
# zero detection in the drivers from skipping the writes.
RANDOM_POOL_SIZE = 64 * MiB

BLOCK_SIZE = 1 * MiB

# Seconds to wait for a FUSE daemon to mount or to exit.
MOUNT_TIMEOUT = 30.0

VDISKFS = "vdiskfs"
VDISKFS_WRITEBACK = "vdiskfs --writeback-cache"
QSD = "qemu-storage-daemon"
QCOWMOUNT = "qcowmount"
RAW = "raw (no FUSE)"
SYSTEMS = [VDISKFS, VDISKFS_WRITEBACK, QSD, QCOWMOUNT, RAW]


@dataclass
class Sizes:
    """Workload sizes in bytes, and fio's time limit in seconds."""

    sequential: int
    sequential_write: int
    compressed: int
    chain: int
    filesystem_disk: int
    small_files: int
    small_file_size: int
    fio_runtime: int
    rss_disk: int
    rss_written: int
    rss_block: int
    big_disk: int
    big_data: int


FULL = Sizes(sequential=2 * GiB, sequential_write=1 * GiB, compressed=1 * GiB, chain=1 * GiB,
             filesystem_disk=4 * GiB, small_files=2000, small_file_size=8192, fio_runtime=5,
             rss_disk=100 * GiB, rss_written=8 * GiB, rss_block=64 * 1024, big_disk=4 * TiB,
             big_data=1 * GiB)

QUICK = Sizes(sequential=256 * MiB, sequential_write=256 * MiB, compressed=128 * MiB,
              chain=128 * MiB, filesystem_disk=4 * GiB, small_files=500, small_file_size=8192,
              fio_runtime=2, rss_disk=100 * GiB, rss_written=512 * MiB, rss_block=64 * 1024,
              big_disk=4 * TiB, big_data=1 * GiB)


# -- small helpers ----------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(command: List[str], **kwargs) -> subprocess.CompletedProcess:
    """Run `command`; raise RuntimeError with its stderr when it fails."""
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed with status "
                           f"{result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def is_mounted(path: Path) -> bool:
    """Return whether `path` is a mount point, from /proc/self/mountinfo."""
    target = str(path).replace("\\", "\\134").replace(" ", "\\040")
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.005)


def find_pid(argv: List[str]) -> Optional[int]:
    """Return the pid of a process whose command line is exactly `argv`."""
    expected = "\0".join(argv) + "\0"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline") as cmdline:
                if cmdline.read() == expected:
                    return int(entry.name)
        except OSError:
            continue
    return None


def peak_rss(pid: Optional[int]) -> Optional[int]:
    """Return VmHWM (peak resident set size) of `pid` in bytes, or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return False
    return False


def unmount_fuse(path: Path) -> None:
    """Unmount a FUSE mount with fusermount3, falling back to fusermount (libfuse 2)."""
    for tool in ("fusermount3", "fusermount"):
        if not is_mounted(path):
            return
        for _ in range(50):
            if subprocess.run([tool, "-u", str(path)], stderr=subprocess.DEVNULL).returncode == 0:
                break
            time.sleep(0.1)
    if is_mounted(path):
        raise RuntimeError(f"cannot unmount {path}")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- images -------------------------------------------------------------------------------


def write_pattern_file(path: Path, size: int) -> None:
    """Write `size` bytes in which every 64 KiB starts with 32 KiB of random bytes, then zeros.

    Every qcow2 cluster therefore contains data (the image is fully allocated), and zlib
    compresses each cluster to about half its size.
    """
    half = 32 * 1024
    zeros = bytes(half)
    chunk = bytearray()
    with open(path, "wb") as output:
        for _ in range(size // (2 * half)):
            chunk += os.urandom(half)
            chunk += zeros
            if len(chunk) >= 8 * MiB:
                output.write(chunk)
                chunk.clear()
        output.write(chunk)


@dataclass
class Image:
    """A qcow2 image and a raw file with the same guest data (the no-FUSE ceiling)."""

    qcow2: Path
    raw: Path


class Images:
    def __init__(self, directory: Path, sizes: Sizes) -> None:
        self.directory = directory
        self.sizes = sizes

    def path(self, name: str) -> Path:
        return self.directory / name

    def allocated(self) -> Image:
        """Create a fully allocated qcow2 image of sizes.sequential bytes."""
        raw = self.path("allocated.raw")
        qcow2 = self.path("allocated.qcow2")
        write_pattern_file(raw, self.sizes.sequential)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])
        return Image(qcow2, raw)

    def compressed(self) -> Image:
        raw = self.path("compressed-source.raw")
        qcow2 = self.path("compressed.qcow2")
        write_pattern_file(raw, self.sizes.compressed)
        run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zlib",
             str(raw), str(qcow2)])
        return Image(qcow2, raw)

    def chain(self) -> Image:
        """Create the chain base <- middle <- top, where each overlay rewrites every fourth MiB.

        The middle layer rewrites MiB 1, 5, 9, ... and the top layer MiB 2, 6, 10, ..., so
        a sequential read visits all three layers in turn.
        """
        size = self.sizes.chain
        base_raw = self.path("chain-source.raw")
        base = self.path("chain-base.qcow2")
        middle = self.path("chain-middle.qcow2")
        top = self.path("chain-top.qcow2")
        write_pattern_file(base_raw, size)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base_raw), str(base)])
        base_raw.unlink()
        for layer, backing, first, pattern in ((middle, base, 1, 0x6d), (top, middle, 2, 0x74)):
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing.name, "-F", "qcow2",
                 str(layer)], cwd=self.directory)
            commands = []
            for mib in range(first, size // MiB, 4):
                commands += ["-c", f"write -q -P {pattern} {mib * MiB} {MiB}"]
            run(["qemu-io", "-f", "qcow2", *commands, str(layer)])
        raw = self.path("chain.raw")
        run(["qemu-img", "convert", "-S", "0", "-O", "raw", str(top), str(raw)])
        return Image(top, raw)

    def empty(self, name: str, size: int) -> Image:
        """Create an empty qcow2 image and a sparse raw file of the same size."""
        qcow2 = self.path(name + ".qcow2")
        raw = self.path(name + ".raw")
        for stale in (qcow2, raw):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(size)])
        with open(raw, "wb") as output:
            output.truncate(size)
        return Image(qcow2, raw)

    def remove(self, image: Image) -> None:
        """Delete an image's files, so that the disk keeps only what later workloads need."""
        for path in (image.qcow2, image.raw):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if image.qcow2.name == "chain-top.qcow2":
            for name in ("chain-base.qcow2", "chain-middle.qcow2"):
                self.path(name).unlink()

    def big(self) -> Path:
        """Create a qcow2 image of sizes.big_disk bytes with sizes.big_data bytes in 16 pieces."""
        image = self.path("big.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(self.sizes.big_disk)])
        piece = self.sizes.big_data // 16
        stride = self.sizes.big_disk // 16
        commands = []
        for index in range(16):
            commands += ["-c", f"write -q -P {index + 1} {index * stride} {piece}"]
        run(["qemu-io", "-f", "qcow2", *commands, str(image)])
        return image


# -- systems ----------------------------------------------------------------------------


@dataclass
class Exposed:
    """A raw view of an image: the file to use and the serving process, if any."""

    path: Path
    pid: Optional[int] = None
    peak_rss: Optional[int] = None

    def sample_rss(self) -> None:
        value = peak_rss(self.pid)
        if value is not None:
            self.peak_rss = max(self.peak_rss or 0, value)


class System:
    name = ""
    writable = True
    follows_backing_files = True

    def __init__(self, work: Path, python: str) -> None:
        self.work = work
        self.python = python

    def expose(self, image: Image, read_only: bool) -> "contextlib.AbstractContextManager[Exposed]":
        raise NotImplementedError


class Vdiskfs(System):
    name = VDISKFS

    def command(self, image: Path, mountpoint: Path, read_only: bool) -> List[str]:
        command = [self.python, "-m", "vdiskfs", "mount"]
        if read_only:
            command.append("--read-only")
        return command + [str(image), str(mountpoint)]

    def mountpoint(self) -> Path:
        mountpoint = self.work / "mnt-vdiskfs"
        mountpoint.mkdir(exist_ok=True)
        return mountpoint

    @contextlib.contextmanager
    def expose(self, image: Image, read_only: bool) -> Iterator[Exposed]:
        mountpoint = self.mountpoint()
        command = self.command(image.qcow2, mountpoint, read_only)
        run(command, cwd=REPO)
        exposed = Exposed(mountpoint / (image.qcow2.stem + ".raw"), pid=find_pid(command))
        try:
            yield exposed
        finally:
            exposed.sample_rss()
            self.unmount(mountpoint)

    def unmount(self, mountpoint: Path) -> None:
        # umount fails with EBUSY while the kernel still uses the file (a loop device
        # being torn down), so retry for a while.
        for attempt in range(50):
            result = subprocess.run([self.python, "-m", "vdiskfs", "umount", str(mountpoint)],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            if result.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"vdiskfs umount {mountpoint} failed: {result.stderr.strip()}")

    def time_mount(self, image: Path) -> float:
        """Return the seconds from starting `vdiskfs mount` until it returns."""
        mountpoint = self.mountpoint()
        command = self.command(image, mountpoint, read_only=False)
        start = time.perf_counter()
        run(command, cwd=REPO)
        elapsed = time.perf_counter() - start
        self.unmount(mountpoint)
        return elapsed


class VdiskfsWriteback(Vdiskfs):
    """vdiskfs with the kernel's writeback cache, an option that only changes writes."""

    name = VDISKFS_WRITEBACK

    def command(self, image: Path, mountpoint: Path, read_only: bool) -> List[str]:
        command = super().command(image, mountpoint, read_only)
        return command[:-2] + ["--writeback-cache"] + command[-2:]

    def mountpoint(self) -> Path:
        mountpoint = self.work / "mnt-vdiskfs-writeback"
        mountpoint.mkdir(exist_ok=True)
        return mountpoint


class QemuStorageDaemon(System):
    name = QSD

    def command(self, image: Path, export: Path, read_only: bool) -> List[str]:
        read_only_option = ",read-only=on" if read_only else ""
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file,filename={image}{read_only_option}",
                "--blockdev", f"driver=qcow2,node-name=fmt,file=file{read_only_option}",
                "--export", f"type=fuse,id=exp,node-name=fmt,mountpoint={export},"
                            f"writable={'off' if read_only else 'on'}"]

    def start(self, image: Path, read_only: bool):
        export = self.work / "qsd-export.raw"
        export.touch()
        log_file = open(self.work / "qemu-storage-daemon.log", "ab")
        process = subprocess.Popen(self.command(image, export, read_only), stdout=log_file,
                                   stderr=subprocess.STDOUT)
        log_file.close()
        try:
            wait_until(lambda: is_mounted(export) or process.poll() is not None, MOUNT_TIMEOUT,
                       "qemu-storage-daemon to export the image")
        except BaseException:
            process.kill()
            process.wait()
            raise
        if process.poll() is not None:
            raise RuntimeError(f"qemu-storage-daemon exited with status {process.returncode}; "
                               f"see {self.work / 'qemu-storage-daemon.log'}")
        return process, export

    def stop(self, process: subprocess.Popen, export: Path) -> None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        unmount_fuse(export)

    @contextlib.contextmanager
    def expose(self, image: Image, read_only: bool) -> Iterator[Exposed]:
        process, export = self.start(image.qcow2, read_only)
        exposed = Exposed(export, pid=process.pid)
        try:
            yield exposed
        finally:
            exposed.sample_rss()
            self.stop(process, export)

    def time_mount(self, image: Path) -> float:
        """Return the seconds from starting the daemon until its export is mounted."""
        start = time.perf_counter()
        process, export = self.start(image, read_only=False)
        elapsed = time.perf_counter() - start
        self.stop(process, export)
        return elapsed


class Qcowmount(System):
    name = QCOWMOUNT
    writable = False
    follows_backing_files = False

    @contextlib.contextmanager
    def expose(self, image: Image, read_only: bool) -> Iterator[Exposed]:
        if not read_only:
            raise ValueError("qcowmount is read-only")
        mountpoint = self.work / "mnt-qcowmount"
        mountpoint.mkdir(exist_ok=True)
        command = ["qcowmount", str(image.qcow2), str(mountpoint)]
        # qcowmount puts itself in the background once the mount is live.
        run(command)
        wait_until(lambda: is_mounted(mountpoint), MOUNT_TIMEOUT, "qcowmount to mount")
        exposed = Exposed(mountpoint / "qcow1", pid=find_pid(command))
        try:
            yield exposed
        finally:
            exposed.sample_rss()
            unmount_fuse(mountpoint)
            if exposed.pid is not None:
                wait_until(lambda: not process_alive(exposed.pid), MOUNT_TIMEOUT,
                           "qcowmount to exit")


class RawFile(System):
    name = RAW

    @contextlib.contextmanager
    def expose(self, image: Image, read_only: bool) -> Iterator[Exposed]:
        yield Exposed(image.raw)


# -- workloads --------------------------------------------------------------------------


@dataclass
class Result:
    """Measurements of one workload: per system, every run's value."""

    name: str
    unit: str
    higher_is_better: bool
    runs: Dict[str, List[float]] = field(default_factory=dict)
    peak_rss: Dict[str, int] = field(default_factory=dict)
    note: str = ""

    def add(self, system: str, value: float, exposed: Optional[Exposed] = None) -> None:
        self.runs.setdefault(system, []).append(value)
        if exposed is not None and exposed.peak_rss is not None:
            self.peak_rss[system] = max(self.peak_rss.get(system, 0), exposed.peak_rss)

    def median(self, system: str) -> Optional[float]:
        values = self.runs.get(system)
        return statistics.median(values) if values else None

    def speed_ratio(self, system: str, reference: str) -> Optional[float]:
        """Return how many times faster `system` is than `reference` (above 1 is faster)."""
        value, base = self.median(system), self.median(reference)
        if value is None or base is None or value == 0 or base == 0:
            return None
        return value / base if self.higher_is_better else base / value

    @classmethod
    def from_json(cls, document: dict) -> "Result":
        return cls(document["name"], document["unit"], document["higher_is_better"],
                   runs=document["runs"], peak_rss=document["peak_rss_bytes"],
                   note=document["note"])

    def to_json(self) -> dict:
        return {
            "name": self.name, "unit": self.unit, "higher_is_better": self.higher_is_better,
            "runs": self.runs,
            "median": {system: self.median(system) for system in self.runs},
            "peak_rss_bytes": self.peak_rss,
            "vdiskfs_vs_qemu_storage_daemon": self.speed_ratio(VDISKFS, QSD),
            "vdiskfs_vs_raw": self.speed_ratio(VDISKFS, RAW),
            "note": self.note,
        }


def sequential_read(path: Path) -> float:
    """Read the whole file in 1 MiB blocks; return MB/s (10^6 bytes per second)."""
    buffer = bytearray(BLOCK_SIZE)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        while True:
            done = os.readv(fd, [buffer])
            if done == 0:
                break
            total += done
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return total / elapsed / 1e6


def sequential_write(path: Path, size: int, pool: bytes) -> float:
    """Write `size` bytes in 1 MiB blocks, then fsync; return MB/s including the fsync."""
    view = memoryview(pool)
    fd = os.open(path, os.O_WRONLY)
    try:
        start = time.perf_counter()
        for offset in range(0, size, BLOCK_SIZE):
            start_in_pool = offset % len(pool)
            block = view[start_in_pool:start_in_pool + BLOCK_SIZE]
            while block:
                block = block[os.write(fd, block):]
        os.fsync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return size / elapsed / 1e6


def fio(path: Path, size: int, mode: str, jobs: int, runtime: int, block_size: int,
        io_size: Optional[int] = None) -> dict:
    """Run fio with psync on `path`; return the JSON of its group report."""
    command = ["fio", "--name=bench", f"--filename={path}", f"--rw={mode}",
               f"--bs={block_size}", "--ioengine=psync", f"--numjobs={jobs}",
               f"--size={size}", "--group_reporting", "--output-format=json",
               "--allow_file_create=0", "--fallocate=none", "--randrepeat=0"]
    if io_size is None:
        command += ["--time_based", f"--runtime={runtime}"]
    else:
        command += [f"--io_size={io_size}", "--end_fsync=1"]
    output = run(command).stdout
    # fio may print notices before the JSON document.
    return json.loads(output[output.index("{"):])["jobs"][0]


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.work = work
        self.images = Images(work, self.sizes)
        self.systems = {system.name: system for system in (
            Vdiskfs(work, args.python), VdiskfsWriteback(work, args.python),
            QemuStorageDaemon(work, args.python),
            Qcowmount(work, args.python), RawFile(work, args.python))}
        self.results: List[Result] = []
        self.extra: Dict[str, dict] = {}
        self.pool = os.urandom(RANDOM_POOL_SIZE)

    def repeat(self, result: Result, systems: List[str], measure) -> Result:
        """Run `measure(system)` --runs times per system, alternating between systems."""
        for round_index in range(self.args.runs):
            for name in systems:
                value, exposed = measure(self.systems[name])
                result.add(name, value, exposed)
                log(f"{result.name}: {name} run {round_index + 1}: {value:.1f} {result.unit}")
        self.results.append(result)
        return result

    # Read workloads

    def read_workload(self, name: str, image: Image, systems: List[str]) -> None:
        def measure(system: System):
            with system.expose(image, read_only=True) as exposed:
                drop_caches()
                value = sequential_read(exposed.path)
            return value, exposed
        self.repeat(Result(name, "MB/s", True), systems, measure)

    def random_workload(self, image: Image, mode: str, jobs: int, systems: List[str]) -> None:
        key = "read" if mode == "randread" else "write"
        read_only = mode == "randread"

        def measure(system: System):
            with system.expose(image, read_only=read_only) as exposed:
                drop_caches()
                report = fio(exposed.path, image.raw.stat().st_size, mode, jobs,
                             self.sizes.fio_runtime, 4096)
            return report[key]["iops"], exposed
        label = "read" if read_only else "write"
        result = Result(f"random 4 KiB {label}, {jobs} job{'s' if jobs > 1 else ''}", "IOPS", True,
                        note=f"fio psync, {self.sizes.fio_runtime} s per run")
        self.repeat(result, systems, measure)

    # Write workloads

    def write_workload(self, systems: List[str]) -> None:
        """Write sizes.sequential_write bytes into an empty image of sizes.sequential bytes."""
        size = self.sizes.sequential_write

        def measure(system: System):
            image = self.images.empty("sequential-write", self.sizes.sequential)
            os.sync()
            with system.expose(image, read_only=False) as exposed:
                value = sequential_write(exposed.path, size, self.pool)
            self.images.remove(image)
            return value, exposed
        self.repeat(Result("sequential write 1 MiB, fsync", "MB/s", True), systems, measure)

    def filesystem_workload(self, systems: List[str]) -> None:
        sizes = self.sizes
        disk_gib = sizes.filesystem_disk // GiB
        mkfs = Result("mkfs.ext2", "s", False,
                      note=f"on the exposed file of an empty {disk_gib} GiB image")
        files = Result(f"{sizes.small_files} small files via loop", "s", False,
                       note=f"{sizes.small_file_size} bytes each, then sync, umount and fsync")
        loop_mountpoint = self.work / "mnt-loop"
        loop_mountpoint.mkdir(exist_ok=True)

        for round_index in range(self.args.runs):
            for name in systems:
                image = self.images.empty("filesystem", sizes.filesystem_disk)
                os.sync()
                with self.systems[name].expose(image, read_only=False) as exposed:
                    start = time.perf_counter()
                    run(["mkfs.ext2", "-q", "-F", str(exposed.path)])
                    fsync_path(exposed.path)
                    mkfs_seconds = time.perf_counter() - start

                    start = time.perf_counter()
                    device = run(["losetup", "--find", "--show", str(exposed.path)]).stdout.strip()
                    try:
                        run(["mount", device, str(loop_mountpoint)])
                        try:
                            self.write_small_files(loop_mountpoint)
                            os.sync()
                        finally:
                            run(["umount", str(loop_mountpoint)])
                    finally:
                        run(["losetup", "-d", device])
                    fsync_path(exposed.path)
                    files_seconds = time.perf_counter() - start
                self.images.remove(image)
                mkfs.add(name, mkfs_seconds, exposed)
                files.add(name, files_seconds, exposed)
                log(f"filesystem: {name} run {round_index + 1}: mkfs {mkfs_seconds:.2f} s, "
                    f"files {files_seconds:.2f} s")
        self.results += [mkfs, files]

    def write_small_files(self, directory: Path) -> None:
        size = self.sizes.small_file_size
        for index in range(self.sizes.small_files):
            start = (index * size) % (len(self.pool) - size)
            subdirectory = directory / f"d{index // 100:03d}"
            subdirectory.mkdir(exist_ok=True)
            with open(subdirectory / f"f{index:05d}", "wb") as output:
                output.write(self.pool[start:start + size])

    # Memory and mount time

    def memory_workload(self) -> None:
        """Write randomly into a large empty image and record the daemon's peak RSS.

        vdiskfs runs --runs times, qemu-storage-daemon once for reference, because one
        run takes over a minute at full size.
        """
        sizes = self.sizes
        note = (f"fio randwrite, {sizes.rss_block // 1024} KiB blocks, "
                f"{sizes.rss_written / GiB:g} GiB into a {sizes.rss_disk // GiB} GiB image, "
                f"then fsync; default cache size; qemu-storage-daemon ran once")
        throughput = Result("random write to a large image", "MB/s", True, note=note)
        memory = Result("peak RSS during that write", "MiB", False, note=note)
        schedule = [VDISKFS] * self.args.runs + [QSD]
        for name in schedule:
            image = self.images.empty("large", sizes.rss_disk)
            with self.systems[name].expose(image, read_only=False) as exposed:
                report = fio(exposed.path, sizes.rss_disk, "randwrite", 1, 0, sizes.rss_block,
                             io_size=sizes.rss_written)
            megabytes_per_second = report["write"]["bw_bytes"] / 1e6
            throughput.add(name, megabytes_per_second, exposed)
            if exposed.peak_rss is not None:
                memory.add(name, exposed.peak_rss / MiB, exposed)
            log(f"large random write: {name}: {megabytes_per_second:.1f} MB/s, "
                f"peak RSS {(exposed.peak_rss or 0) / MiB:.1f} MiB")
            self.images.remove(image)
        self.results += [throughput, memory]

    def mount_time_workload(self) -> None:
        image = self.images.big()
        result = Result(f"mount a {self.sizes.big_disk // TiB} TiB image with "
                        f"{self.sizes.big_data // GiB} GiB of data", "s", False,
                        note="vdiskfs: until `vdiskfs mount` returns; qemu-storage-daemon: until "
                             "its export shows in /proc/self/mountinfo; page cache warm")
        for round_index in range(self.args.runs):
            for name in (VDISKFS, QSD):
                value = self.systems[name].time_mount(image)
                result.add(name, value)
                log(f"mount time: {name} run {round_index + 1}: {value:.3f} s")
        self.results.append(result)

    # The whole run

    def run(self) -> None:
        log(f"creating images in {self.work}")
        allocated = self.images.allocated()
        compressed = self.images.compressed()
        chain = self.images.chain()

        readers = [VDISKFS, QSD, QCOWMOUNT, RAW]
        writers = [VDISKFS, VDISKFS_WRITEBACK, QSD, RAW]
        self.read_workload("sequential read 1 MiB", allocated, readers)
        self.read_workload("compressed sequential read", compressed, readers)
        self.read_workload("backing chain (3 deep) read", chain, [VDISKFS, QSD, RAW])
        self.images.remove(compressed)
        self.images.remove(chain)
        for jobs in (1, 4):
            self.random_workload(allocated, "randread", jobs, readers)
        self.write_workload(writers)
        for jobs in (1, 4):
            self.random_workload(allocated, "randwrite", jobs, writers)
        self.images.remove(allocated)
        self.filesystem_workload(writers)
        self.memory_workload()
        self.mount_time_workload()


# -- report -----------------------------------------------------------------------------


def machine_info(python: str) -> dict:
    def first_line(command: List[str]) -> str:
        try:
            return run(command).stdout.strip().splitlines()[0]
        except (RuntimeError, OSError, IndexError) as error:
            return f"unknown ({error})"

    with open("/proc/meminfo") as meminfo:
        memory_kib = int(meminfo.readline().split()[1])
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name")), "unknown"),
        "python": first_line([python, "--version"]),
        "pyfuse3": first_line([python, "-c", "import pyfuse3; print(pyfuse3.__version__)"]),
        "qemu": first_line(["qemu-storage-daemon", "--version"]),
        "qcowmount": first_line(["qcowmount", "-V"]),
        "fio": first_line(["fio", "--version"]),
        "vdiskfs_commit": first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "vdiskfs_uncommitted_changes": bool(run(["git", "-C", str(REPO), "status", "--porcelain",
                                                 "--", "vdiskfs"]).stdout.strip()),
    }


def format_value(value: Optional[float], unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "s":
        return f"{value:.3f} s" if value < 1 else f"{value:.2f} s"
    if unit == "IOPS":
        return f"{value:.0f}"
    return f"{value:.1f}"


def format_ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown_table(results: List[Result]) -> str:
    header = ["workload", "unit", *SYSTEMS, "vdiskfs / qsd", "writeback / qsd", "vdiskfs / raw",
              "vdiskfs peak RSS"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        rss = result.peak_rss.get(VDISKFS)
        row = [result.name, result.unit,
               *(format_value(result.median(system), result.unit) for system in SYSTEMS),
               format_ratio(result.speed_ratio(VDISKFS, QSD)),
               format_ratio(result.speed_ratio(VDISKFS_WRITEBACK, QSD)),
               format_ratio(result.speed_ratio(VDISKFS, RAW)),
               "n/a" if rss is None else f"{rss / MiB:.0f} MiB"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def import_matplotlib():
    """Import matplotlib, installing it with pip into a cache directory if needed."""
    target = Path.home() / ".cache" / "vdiskfs-bench" / "python-packages"
    sys.path.append(str(target))
    try:
        import matplotlib
    except ImportError:
        log(f"matplotlib is missing; installing it with pip into {target}")
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target",
                                 str(target), "matplotlib"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            log("installing matplotlib failed, so no chart is drawn: "
                + result.stdout.strip().splitlines()[-1])
            return None
        # The directory did not exist when it was put on sys.path, and the import system
        # remembers that.
        sys.path_importer_cache.pop(str(target), None)
        importlib.invalidate_caches()
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def draw_chart(results: List[Result], path: Path) -> bool:
    """Draw each system's speed relative to qemu-storage-daemon; return False without matplotlib."""
    pyplot = import_matplotlib()
    if pyplot is None:
        return False
    compared = [result for result in results if result.median(QSD) is not None
                and result.name != "peak RSS during that write"]
    figure, axes = pyplot.subplots(figsize=(12, 6))
    width = 0.8 / len(SYSTEMS)
    for index, system in enumerate(SYSTEMS):
        ratios = [result.speed_ratio(system, QSD) or float("nan") for result in compared]
        positions = [position + (index - (len(SYSTEMS) - 1) / 2) * width
                     for position in range(len(compared))]
        axes.bar(positions, ratios, width, label=system)
    axes.set_yscale("log")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(compared)))
    axes.set_xticklabels([result.name for result in compared], rotation=30, ha="right",
                         fontsize=8)
    axes.set_ylabel("speed relative to qemu-storage-daemon (log scale, higher is faster)")
    axes.set_title("vdiskfs benchmark, median of runs (missing bar: not measured)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return True


def write_report(results: List[Result], out: Path) -> None:
    """Print the table and write results.md and, with matplotlib, results.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (out / "results.md").write_text(table)
    print(table)
    if draw_chart(results, out / "results.png"):
        log(f"wrote {out / 'results.md'} and {out / 'results.png'}")
    else:
        log(f"wrote {out / 'results.md'}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: 256 MiB sequential images, 500 small files, "
                             "2 s fio runs, 512 MiB written into the 100 GiB image")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for results.json, results.md and results.png "
                             "(default: ./bench-results)")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs per workload and system; the median is reported (default: 3)")
    parser.add_argument("--python", default=sys.executable,
                        help="Python that runs `-m vdiskfs` (default: this one)")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="measure nothing; write the table and the chart of an earlier "
                             "results.json into --out")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory with the images")
    return parser.parse_args()


def main() -> int:
    args = parse_arguments()
    if args.from_json is not None:
        document = json.loads(args.from_json.read_text())
        results = [Result.from_json(workload) for workload in document["workloads"]]
        write_report(results, args.out)
        return 0
    if os.geteuid() != 0:
        print("run.py: must run as root (it drops caches and uses losetup)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vdiskfs-bench.", dir="/tmp"))
    bench = Bench(args, work)
    started = time.time()
    try:
        bench.run()
    finally:
        if args.keep:
            log(f"keeping {work}")
        else:
            run(["rm", "-rf", str(work)])

    elapsed = time.time() - started
    document = {
        "command": " ".join(sys.argv),
        "quick": args.quick,
        "runs": args.runs,
        "seconds": round(elapsed),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(args.python),
        "workloads": [result.to_json() for result in bench.results],
    }
    (args.out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    write_report(bench.results, args.out)
    log(f"wrote {args.out / 'results.json'} in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
