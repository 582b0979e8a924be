"""Fuzzing of the qcow2 reader with mutated metadata.

Small valid images of several kinds are mutated in their header, L1 and L2 tables,
refcount table and blocks, and snapshot table. Each mutated image must either fail to
open with a one-line VdiskError, or open and read in full, each chunk returning data or
raising CorruptImageError. Nothing else may be raised, and the reads run in a worker
process (tests/fuzz_worker.py) under an address-space limit, so an allocation sized by
a corrupted field fails the test.
"""

from __future__ import annotations

import os
import select
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import needs_fuse, qemu_img, qemu_io
from images import (
    KiB,
    MiB,
    OFFSET_MASK,
    convert_to_qcow2,
    create_qcow2,
    pattern_bytes,
    read_header,
    read_u64,
)

REPOSITORY = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "fuzz_worker.py"
# Address space of the worker. The interpreter with vdiskfs imported maps about 21 MiB
# (VmSize, Python 3.11 on x86_64), so the rest is headroom for caches and buffers.
WORKER_ADDRESS_SPACE = 512 * MiB
# Seconds one image may take to open and read before the test calls it a hang.
WORKER_TIMEOUT = 30


@dataclass
class FuzzImage:
    """A valid image and the byte ranges of its metadata, keyed by structure."""

    name: str
    path: Path
    regions: Dict[str, List[Tuple[int, int]]]


def metadata_regions(image: Path) -> Dict[str, List[Tuple[int, int]]]:
    header = read_header(image)
    cluster_size = 1 << header["cluster_bits"]
    regions = {"header": [(0, min(cluster_size, 4096))]}

    l1_offset, l1_size = header["l1_table_offset"], header["l1_size"]
    regions["L1 table"] = [(l1_offset, l1_size * 8)]
    l2_tables = []
    for index in range(l1_size):
        l2_offset = read_u64(image, l1_offset + 8 * index) & OFFSET_MASK
        if l2_offset:
            l2_tables.append((l2_offset, cluster_size))
    regions["L2 table"] = l2_tables

    table_offset = header["refcount_table_offset"]
    regions["refcount table"] = [(table_offset, header["refcount_table_clusters"] * cluster_size)]
    blocks = []
    for index in range(header["refcount_table_clusters"] * cluster_size // 8):
        block = read_u64(image, table_offset + 8 * index) & ~0x1FF
        if block:
            blocks.append((block, cluster_size))
    regions["refcount block"] = blocks

    if header["nb_snapshots"]:
        regions["snapshot table"] = [(header["snapshots_offset"], 256 * header["nb_snapshots"])]
    return {name: ranges for name, ranges in regions.items() if ranges}


def build_images(directory: Path) -> List[FuzzImage]:
    data = directory / "data.raw"
    data.write_bytes(pattern_bytes(MiB, seed=7) + bytes(MiB))
    built = {}

    built["v3-4k"] = convert_to_qcow2(data, directory / "v3-4k.qcow2", "cluster_size=4k")
    built["v2-64k"] = convert_to_qcow2(data, directory / "v2-64k.qcow2", "compat=0.10")
    built["extended-l2"] = convert_to_qcow2(
        data, directory / "extended-l2.qcow2", "extended_l2=on", "cluster_size=16k")
    built["compressed"] = convert_to_qcow2(
        data, directory / "compressed.qcow2", "cluster_size=4k", compressed=True)

    snapshot = convert_to_qcow2(data, directory / "snapshot.qcow2", "cluster_size=4k")
    qemu_img("snapshot", "-c", "first", snapshot)
    qemu_io(snapshot, "write -P 0x5a 4k 12k")
    built["snapshot"] = snapshot

    base = convert_to_qcow2(data, directory / "base.qcow2", "cluster_size=4k")
    top = create_qcow2(directory / "top.qcow2", 2 * MiB, "cluster_size=4k",
                       backing="base.qcow2", backing_format="qcow2")
    qemu_io(top, "write -P 0x6b 8k 20k", "write -z 64k 4k")
    built["backing"] = top
    assert base.exists()

    return [FuzzImage(name, path, metadata_regions(path)) for name, path in built.items()]


class Worker:
    """A fuzz_worker.py process that checks one image per request."""

    def __init__(self) -> None:
        environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), str(WORKER_ADDRESS_SPACE)], env=environment,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def check(self, path: Path, mode: str = "ro") -> str:
        self.process.stdin.write(f"{mode} {path}\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], WORKER_TIMEOUT)
        assert ready, f"reading {path} took more than {WORKER_TIMEOUT} s"
        line = self.process.stdout.readline()
        assert line, f"the worker died on {path} with status {self.process.wait()}"
        return line.rstrip("\n")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> List[FuzzImage]:
    return build_images(tmp_path_factory.mktemp("fuzz-images"))


@pytest.fixture(scope="module")
def worker():
    process = Worker()
    yield process
    process.close()


INTERESTING_WORDS = [
    0, 1, 0x200, 0xFFFF_FFFF, 1 << 31, 1 << 40, 1 << 55, 1 << 62, 1 << 63,
    0xFFFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0200, 0x00FF_FFFF_FFFF_FE00,
]


@st.composite
def mutations(draw):
    """Draw (image index, structure name, list of (relative offset, bytes))."""
    image_index = draw(st.integers(0, 5))
    structure = draw(st.sampled_from(
        ["header", "L1 table", "L2 table", "refcount table", "refcount block", "snapshot table"]))
    changes = []
    for _ in range(draw(st.integers(1, 6))):
        offset = draw(st.integers(0, 1 << 16))
        if draw(st.booleans()):
            value = draw(st.sampled_from(INTERESTING_WORDS) | st.integers(0, (1 << 64) - 1))
            changes.append((offset & ~7, struct.pack(">Q", value)))
        else:
            changes.append((offset, bytes([draw(st.integers(0, 255))])))
    return image_index, structure, changes


def mutate(image: FuzzImage, structure: str, changes, target: Path, region_pick: int) -> str:
    """Write a mutated copy of `image` to `target`; return a description of the change."""
    data = bytearray(image.path.read_bytes())
    regions = image.regions.get(structure) or image.regions["header"]
    start, length = regions[region_pick % len(regions)]
    described = []
    for offset, value in changes:
        position = start + offset % max(1, length - len(value) + 1)
        data[position:position + len(value)] = value
        described.append(f"{position:#x}={value.hex()}")
    target.write_bytes(bytes(data))
    return f"{image.name} {structure}: {', '.join(described)}"


@settings(max_examples=int(os.environ.get("VDISKFS_FUZZ_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=mutations(), region_pick=st.integers(0, 1000))
def test_mutated_image_reads_or_fails_cleanly(images, worker, mutation, region_pick):
    image_index, structure, changes = mutation
    image = images[image_index % len(images)]
    # The copy sits beside the original, so a backing file name still resolves.
    target = image.path.with_name("mutated-" + image.path.name)
    description = mutate(image, structure, changes, target, region_pick)

    outcome = worker.check(target)
    assert not outcome.startswith("bug"), f"{description}: {outcome}"
    assert outcome.startswith(("ok ", "open-error ")), f"{description}: {outcome}"


@settings(max_examples=int(os.environ.get("VDISKFS_FUZZ_EXAMPLES", "100")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=mutations(), region_pick=st.integers(0, 1000))
def test_mutated_image_survives_writes(images, worker, mutation, region_pick):
    image_index, structure, changes = mutation
    image = images[image_index % len(images)]
    target = image.path.with_name("mutated-" + image.path.name)
    description = mutate(image, structure, changes, target, region_pick)

    outcome = worker.check(target, "rw")
    assert not outcome.startswith("bug"), f"{description}: {outcome}"
    assert outcome.startswith(("ok ", "open-error ")), f"{description}: {outcome}"
    # Writes never grow the file without bound, whatever the tables say.
    assert target.stat().st_size < 64 * MiB, description


def test_worker_limit_catches_large_allocation(tmp_path):
    """The address-space limit is low enough to fail an allocation of 1 GiB."""
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, "
              f"({WORKER_ADDRESS_SPACE}, {WORKER_ADDRESS_SPACE}))\n"
              "try:\n    bytearray(1 << 30)\nexcept MemoryError:\n    sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == 3


# ---------------------------------------------------------------- through the daemon


@needs_fuse
@pytest.mark.parametrize("structure, offset, value", [
    ("L2 table", 0, struct.pack(">Q", (1 << 63) | (1 << 40))),
    ("L2 table", 64, struct.pack(">Q", (1 << 62) | 0x3FFF_FFFF_FFFF)),
    ("L1 table", 0, struct.pack(">Q", (1 << 63) | 0x200)),
    ("refcount block", 0, b"\xff" * 64),
])
def test_daemon_survives_mutated_image(images, structure, offset, value, tmp_path):
    from helpers import mounted

    image = next(image for image in images if image.name == "v3-4k")
    target = tmp_path / "mutated.qcow2"
    shutil.copy(image.path, target)
    start, _ = image.regions[structure][0]
    with open(target, "r+b") as stream:
        stream.seek(start + offset)
        stream.write(value)

    mountpoint = tmp_path / "mnt"
    with mounted(target, mountpoint, "--read-only") as disk:
        fd = os.open(disk, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            failures = 0
            for position in range(0, size, 64 * KiB):
                try:
                    os.pread(fd, 64 * KiB, position)
                except OSError as error:
                    assert error.errno == 5, f"read at {position} failed with {error}"
                    failures += 1
            # The daemon still serves the mount after the damaged reads.
            assert os.fstat(fd).st_size == size
        finally:
            os.close(fd)
        assert sorted(os.listdir(mountpoint)) == [disk.name]


# ---------------------------------------------------------------- findings of the fuzz test


def test_backing_name_with_nul_rejected(images, tmp_path):
    from vdiskfs.errors import InvalidImageError
    from vdiskfs.registry import open_chain

    image = next(image for image in images if image.name == "backing")
    target = image.path.with_name("nul-" + image.path.name)
    data = bytearray(image.path.read_bytes())
    name_offset = struct.unpack_from(">Q", data, 8)[0]
    data[name_offset + 1] = 0
    target.write_bytes(bytes(data))
    with pytest.raises(InvalidImageError, match="contains a NUL byte"):
        open_chain(str(target))


def test_error_message_escapes_control_characters():
    from vdiskfs.errors import InvalidImageError

    message = str(InvalidImageError("snapshot 'a\nb\x1b[2J' é"))
    assert message == "snapshot 'a\\x0ab\\x1b[2J' é"
