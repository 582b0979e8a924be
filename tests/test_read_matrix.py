"""Reads of qemu-made images compared byte for byte with `qemu-img convert -O raw`.

Every image of MATRIX is built once per session by qemu-img and qemu-io. Each one is
read in process through open_chain() and through a real read-only FUSE mount, and
both must return the bytes of QEMU's conversion. Neither may change a byte of any
file of the image.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import pytest

from helpers import mounted, needs_fuse, qemu_img, qemu_info, qemu_io, reference_raw, sha256_of_file
from images import (
    INCOMPAT_DIRTY,
    KiB,
    L2_ZERO,
    MiB,
    OFFSET_MASK,
    BuiltImage,
    compressed_clusters,
    convert_to_qcow2,
    create_qcow2,
    daemon_log_lines,
    iter_l2_entries,
    pattern_bytes,
    qemu_io_then_abort,
    random_file,
    read_bytes,
    read_header,
    scattered_writes,
    set_header_field,
    sha256_bytes,
    working_directory,
)

# ---------------------------------------------------------------- image builders


def build_cluster_size(directory: Path, cluster_size: int, compat: str = "1.1") -> BuiltImage:
    size = 6 * MiB + 1536
    image = create_qcow2(directory / "disk.qcow2", size, f"cluster_size={cluster_size}",
                         f"compat={compat}")
    scattered_writes(image, size, directory, seed=cluster_size)
    return BuiltImage(image)


def build_v2_over_backing(directory: Path) -> BuiltImage:
    """Build a version 2 overlay, whose zero writes store zeros: version 2 has no zero flag."""
    base = directory / "base.raw"
    base.write_bytes(pattern_bytes(3 * MiB + 1000, seed=20))
    image = create_qcow2(directory / "disk.qcow2", 5 * MiB, "compat=0.10",
                         backing="base.raw", backing_format="raw")
    scattered_writes(image, 5 * MiB, directory, seed=21)
    return BuiltImage(image, files=[image, base])


def build_compressed(directory: Path, compression_type: str, cluster_size: int,
                     size: int) -> BuiltImage:
    """Compress pattern data with a hole of zeros, then overwrite parts of some clusters.

    The partial overwrites make QEMU decompress those clusters and store them again
    uncompressed, so the image mixes compressed, normal and unallocated clusters.
    """
    data = bytearray(pattern_bytes(size, seed=cluster_size))
    hole = size // 2 - size // 2 % cluster_size
    hole_length = max(cluster_size, 128 * KiB)
    data[hole:hole + hole_length] = bytes(hole_length)
    source = directory / "source.raw"
    source.write_bytes(data)

    image = convert_to_qcow2(source, directory / "disk.qcow2", f"cluster_size={cluster_size}",
                             f"compression_type={compression_type}", compressed=True)
    qemu_io(image, "write -P 0x61 3 5", f"write -P 0x62 {cluster_size * 3 - 100} 300",
            f"write -P 0x63 {size - 700} 700")

    clusters = compressed_clusters(image)
    assert len(clusters) >= 2, f"{image} has fewer than 2 compressed clusters"
    if cluster_size == 4 * KiB and compression_type == "zlib":
        crossing = [c for c in clusters
                    if c.host_offset // cluster_size
                    != (c.host_offset + c.deflate_length - 1) // cluster_size]
        assert crossing, "no compressed stream crosses a host cluster boundary"
    if cluster_size == 2 * MiB:
        assert max(c.sectors for c in clusters) > 256, "no descriptor needs more than 256 sectors"
    return BuiltImage(image)


def build_zero_flag_with_stale_data(directory: Path) -> BuiltImage:
    """Zero parts of written data. The aligned zero write keeps its host cluster and old bytes."""
    image = create_qcow2(directory / "disk.qcow2", 4 * MiB)
    chunk = random_file(directory / "chunk.bin", 65539, seed=30)
    qemu_io(image, f"write -s {chunk} 0 {MiB}", "write -z 65536 131072", "write -z 300000 5000",
            "write -z -u 393216 131072", f"write -z -u {2 * MiB} {MiB}",
            f"write -s {chunk} {3 * MiB + 5} 70000", "write -P 0x71 250000 100")

    stale = [item for item in iter_l2_entries(image)
             if item.entry & L2_ZERO and item.entry & OFFSET_MASK]
    assert stale, "no zero cluster kept its host offset"
    old_bytes = read_bytes(image, stale[0].entry & OFFSET_MASK, 65536)
    assert old_bytes != bytes(65536), "the zeroed host cluster no longer holds old data"
    return BuiltImage(image)


def build_zero_only(directory: Path) -> BuiltImage:
    image = create_qcow2(directory / "disk.qcow2", 16 * MiB)
    qemu_io(image, f"write -z -u 0 {16 * MiB}")
    entries = list(iter_l2_entries(image))
    assert len(entries) == 256, f"expected 256 zero clusters, found {len(entries)}"
    assert all(item.entry == L2_ZERO for item in entries)
    return BuiltImage(image)


def build_zero_over_backing(directory: Path) -> BuiltImage:
    base = create_qcow2(directory / "base.qcow2", 2 * MiB)
    chunk = random_file(directory / "chunk.bin", 9999, seed=31)
    qemu_io(base, f"write -s {chunk} 0 {2 * MiB}")
    image = create_qcow2(directory / "disk.qcow2", 3 * MiB, backing="base.qcow2")
    qemu_io(image, "write -z 0 64k", "write -P 0x22 4096 512", "write -z -u 131072 65536",
            "write -z 200000 10000", f"write -z {2 * MiB - 4096} 8192", "write -P 0x23 500001 3")
    return BuiltImage(image, files=[image, base])


def build_extended_l2_over_backing(directory: Path) -> BuiltImage:
    base = directory / "base.raw"
    base.write_bytes(pattern_bytes(MiB, seed=40))
    image = create_qcow2(directory / "disk.qcow2", 2 * MiB, "extended_l2=on",
                         "cluster_size=64k", backing="base.raw", backing_format="raw")
    chunk = random_file(directory / "chunk.bin", 3001, seed=41)
    qemu_io(image, f"write -s {chunk} 8000 3000", "write -z 16384 2048", "write -z 20480 1000",
            "write -P 0x33 100000 3000", "write -z -u 196608 65536",
            f"write -s {chunk} 131000 9000", "write -P 0x44 1048000 2000",
            "write -z -u 300000 7000")
    assert read_header(image)["incompatible_features"] & 0x10
    return BuiltImage(image, files=[image, base])


def build_extended_l2_compressed(directory: Path) -> BuiltImage:
    source = directory / "source.raw"
    source.write_bytes(pattern_bytes(2 * MiB, seed=42))
    image = convert_to_qcow2(source, directory / "disk.qcow2", "extended_l2=on", compressed=True)
    qemu_io(image, "write -P 0x45 70000 3000", "write -z 140000 2048")
    assert compressed_clusters(image)
    return BuiltImage(image)


def build_data_file(directory: Path, data_file_raw: bool) -> BuiltImage:
    flag = "on" if data_file_raw else "off"
    image = create_qcow2(directory / "disk.qcow2", 4 * MiB, "data_file=disk.data",
                         f"data_file_raw={flag}")
    scattered_writes(image, 4 * MiB, directory, seed=50)
    # Without data_file_raw the zero flag alone zeroes a cluster: the data file keeps 0x48.
    qemu_io(image, f"write -P 0x48 {3 * MiB} 131072", f"write -z {3 * MiB} 65536")
    return BuiltImage(image, files=[image, directory / "disk.data"])


def build_three_deep_chain(directory: Path) -> BuiltImage:
    """Build top.qcow2 (5 MiB) -> layers/mid.qcow2 (2 MiB) -> base.raw (1234567 bytes).

    Both backing names are relative: 'layers/mid.qcow2' from the top, '../base.raw'
    from the middle.
    """
    base = directory / "base.raw"
    base.write_bytes(pattern_bytes(1234567, seed=60))
    (directory / "layers").mkdir()
    chunk = random_file(directory / "chunk.bin", 2049, seed=61)

    mid = create_qcow2(directory / "layers" / "mid.qcow2", 2 * MiB, "cluster_size=4k",
                       backing="../base.raw", backing_format="raw")
    qemu_io(mid, f"write -s {chunk} 1234000 2000", "write -P 0x61 100 200",
            "write -z 300000 70000", f"write -s {chunk} {2 * MiB - 3000} 3000")

    top = create_qcow2(directory / "top.qcow2", 5 * MiB, backing="layers/mid.qcow2")
    qemu_io(top, "write -P 0x71 1234560 20", f"write -s {chunk} 2097000 4000",
            "write -z 65536 65536", f"write -P 0x72 {5 * MiB - 100} 100", "write -P 0x73 150 10")
    return BuiltImage(top, files=[top, directory / "layers" / "mid.qcow2", base])


def build_raw_backing_short_tail(directory: Path) -> BuiltImage:
    base = directory / "base.raw"
    base.write_bytes(pattern_bytes(70000, seed=62))
    image = create_qcow2(directory / "disk.qcow2", MiB, backing="base.raw", backing_format="raw")
    qemu_io(image, "write -P 0xee 69632 512", "write -P 0xef 131072 7")
    return BuiltImage(image, files=[image, base])


def build_refcount_bits(directory: Path, refcount_bits: int) -> BuiltImage:
    image = create_qcow2(directory / "disk.qcow2", 5 * MiB, f"refcount_bits={refcount_bits}")
    scattered_writes(image, 5 * MiB, directory, seed=70 + refcount_bits)
    return BuiltImage(image)


def build_internal_snapshot(directory: Path) -> BuiltImage:
    """Take two snapshots with writes after each, which copy the clusters the snapshot shares."""
    image = create_qcow2(directory / "disk.qcow2", 4 * MiB)
    chunk = random_file(directory / "chunk.bin", 70001, seed=80)
    qemu_io(image, f"write -s {chunk} 0 {2 * MiB}")
    qemu_img("snapshot", "-c", "first", image)
    scattered_writes(image, 4 * MiB, directory, seed=81)
    qemu_img("snapshot", "-c", "second", image)
    qemu_io(image, "write -P 0x99 500000 70000")
    assert read_header(image)["nb_snapshots"] == 2
    return BuiltImage(image)


def build_dirty_lazy_refcounts(directory: Path) -> BuiltImage:
    image = create_qcow2(directory / "disk.qcow2", 4 * MiB, "lazy_refcounts=on")
    chunk = random_file(directory / "chunk.bin", 4097, seed=90)
    qemu_io_then_abort(image, "write -P 0x5a 0 128k", f"write -s {chunk} 1000000 70000")
    assert read_header(image)["incompatible_features"] & INCOMPAT_DIRTY
    return BuiltImage(image)


def build_unknown_feature_bits(directory: Path) -> BuiltImage:
    image = create_qcow2(directory / "disk.qcow2", 4 * MiB)
    scattered_writes(image, 4 * MiB, directory, seed=100)
    set_header_field(image, "compatible_features", 1 << 63)
    set_header_field(image, "autoclear_features", 1 << 62)
    return BuiltImage(image)


def build_raw_odd_size(directory: Path) -> BuiltImage:
    """Build a raw disk of 1000003 bytes, which is its own reference.

    QEMU rounds a raw file up to whole sectors, so its conversion is no oracle here.
    """
    image = directory / "disk.img"
    image.write_bytes(pattern_bytes(1000003, seed=110))
    return BuiltImage(image, format_name="raw", reference=image)


MATRIX: Dict[str, Callable[[Path], BuiltImage]] = {
    "cluster-512": functools.partial(build_cluster_size, cluster_size=512),
    "cluster-4k": functools.partial(build_cluster_size, cluster_size=4 * KiB),
    "cluster-64k": functools.partial(build_cluster_size, cluster_size=64 * KiB),
    "cluster-2m": functools.partial(build_cluster_size, cluster_size=2 * MiB),
    "compat-0.10": functools.partial(build_cluster_size, cluster_size=64 * KiB, compat="0.10"),
    "compat-0.10-4k": functools.partial(build_cluster_size, cluster_size=4 * KiB, compat="0.10"),
    "compat-0.10-backing": build_v2_over_backing,
    "zlib-512": functools.partial(build_compressed, compression_type="zlib",
                                  cluster_size=512, size=MiB),
    "zlib-4k": functools.partial(build_compressed, compression_type="zlib",
                                 cluster_size=4 * KiB, size=MiB),
    "zlib-64k": functools.partial(build_compressed, compression_type="zlib",
                                  cluster_size=64 * KiB, size=4 * MiB),
    "zlib-2m": functools.partial(build_compressed, compression_type="zlib",
                                 cluster_size=2 * MiB, size=12 * MiB),
    "zstd-4k": functools.partial(build_compressed, compression_type="zstd",
                                 cluster_size=4 * KiB, size=MiB),
    "zstd-64k": functools.partial(build_compressed, compression_type="zstd",
                                  cluster_size=64 * KiB, size=4 * MiB),
    "zstd-2m": functools.partial(build_compressed, compression_type="zstd",
                                 cluster_size=2 * MiB, size=12 * MiB),
    "zero-flag-stale-data": build_zero_flag_with_stale_data,
    "zero-only": build_zero_only,
    "zero-over-backing": build_zero_over_backing,
    "extended-l2-backing": build_extended_l2_over_backing,
    "extended-l2-compressed": build_extended_l2_compressed,
    "data-file-raw": functools.partial(build_data_file, data_file_raw=True),
    "data-file-not-raw": functools.partial(build_data_file, data_file_raw=False),
    "chain-three-deep": build_three_deep_chain,
    "raw-backing-short-tail": build_raw_backing_short_tail,
    "refcount-bits-1": functools.partial(build_refcount_bits, refcount_bits=1),
    "refcount-bits-64": functools.partial(build_refcount_bits, refcount_bits=64),
    "internal-snapshot": build_internal_snapshot,
    "dirty-lazy-refcounts": build_dirty_lazy_refcounts,
    "unknown-feature-bits": build_unknown_feature_bits,
    "raw-odd-size": build_raw_odd_size,
}

# ---------------------------------------------------------------- fixtures and checks


@dataclass
class MatrixCase:
    name: str
    image: BuiltImage
    expected: bytes  # what the whole disk must read as
    digests: dict  # sha256 of every file of the image before any test opened it


@pytest.fixture(scope="session", params=sorted(MATRIX))
def case(request, tmp_path_factory) -> MatrixCase:
    directory = tmp_path_factory.mktemp(request.param)
    with working_directory(directory):
        image = MATRIX[request.param](directory)
        reference = image.reference
        if reference is None:
            options = ["-f", image.format_name] if image.format_name else []
            reference = reference_raw(image.path, directory, *options)
    return MatrixCase(request.param, image, reference.read_bytes(), image.digests())


def describe_difference(got: bytes, expected: bytes, start: int = 0) -> str:
    """Name the first byte at which two reads differ, as guest offsets."""
    if len(got) != len(expected):
        return f"got {len(got)} bytes, expected {len(expected)}"
    for index, (left, right) in enumerate(zip(got, expected)):
        if left != right:
            return (f"first difference at guest offset {start + index}: "
                    f"got {got[index:index + 8].hex()}, expected {expected[index:index + 8].hex()}")
    return "no difference"


def read_ranges(name: str, size: int, cluster_size: int) -> List[tuple]:
    """Return (offset, length) pairs: cluster edges, the end of the disk, random ranges."""
    generator = random.Random(name)
    ranges = [(0, 1), (0, size), (size - 1, 1), (size - 700, 5000), (size, 10), (size + 4096, 1)]
    for boundary in range(cluster_size, min(size, 64 * cluster_size), cluster_size):
        ranges.append((boundary - 3, 7))
    for _ in range(150):
        offset = generator.randrange(size)
        length = generator.choice((1, 511, 512, 513, 4095, 65537, 300001,
                                   generator.randrange(1, 3 * cluster_size + 2)))
        ranges.append((offset, length))
    return ranges


def cluster_size_of(image: BuiltImage) -> int:
    if image.format_name == "raw":
        return 512
    return 1 << read_header(image.path)["cluster_bits"]


def open_case(case: MatrixCase):
    from vdiskfs.registry import open_chain

    return open_chain(str(case.image.path), case.image.format_name)


# ---------------------------------------------------------------- in-process reads


def test_whole_disk_matches_qemu(case):
    driver = open_case(case)
    try:
        assert driver.virtual_size == len(case.expected)
        got = driver.read(0, driver.virtual_size)
    finally:
        driver.close()

    assert got == case.expected, describe_difference(got, case.expected)
    assert case.image.digests() == case.digests, "reading changed a file of the image"


def test_unaligned_ranges_match_qemu(case):
    size = len(case.expected)
    driver = open_case(case)
    try:
        mismatches = []
        for offset, length in read_ranges(case.name, size, cluster_size_of(case.image)):
            got = driver.read(offset, length)
            expected = case.expected[offset:offset + length]
            if got != expected:
                mismatches.append(f"read({offset}, {length}): "
                                  + describe_difference(got, expected, offset))
    finally:
        driver.close()

    assert not mismatches, f"{len(mismatches)} ranges differ, first: " + "; ".join(mismatches[:3])


def test_virtual_size_matches_qemu(case):
    if case.image.format_name == "raw":
        pytest.skip("QEMU rounds raw files up to whole sectors")
    driver = open_case(case)
    try:
        assert driver.virtual_size == qemu_info(case.image.path)["virtual-size"]
    finally:
        driver.close()


# ---------------------------------------------------------------- reads through FUSE


@needs_fuse
def test_mounted_file_matches_qemu(case, tmp_path):
    size = len(case.expected)
    options = ["--read-only", *case.image.mount_options()]
    with mounted(case.image.path, tmp_path / "mnt", *options) as exposed:
        assert exposed.stat().st_size == size
        assert sha256_of_file(exposed) == sha256_bytes(case.expected)

        generator = random.Random(case.name + "-fuse")
        with open(exposed, "rb", buffering=0) as stream:
            for _ in range(40):
                offset = generator.randrange(size)
                length = generator.randrange(1, 200000)
                got = os.pread(stream.fileno(), length, offset)
                expected = case.expected[offset:offset + length]
                assert got == expected, describe_difference(got, expected, offset)

    assert case.image.digests() == case.digests, "a read-only mount changed a file of the image"
    assert daemon_log_lines(tmp_path / "mnt", "ERROR", "CRITICAL") == []


@needs_fuse
def test_read_write_mount_matches_qemu(case, tmp_path):
    """Mount a copy read-write: reads still match, and qemu-img check finds no new errors."""
    copy = tmp_path / "copy"
    shutil.copytree(case.image.path.parent, copy)
    image = copy / case.image.path.relative_to(case.image.path.parent)
    check_options = ["-f", case.image.format_name or "qcow2"]
    with working_directory(copy):
        errors_before = qemu_img("check", *check_options, image, check=False).returncode

    with mounted(image, tmp_path / "mnt", *case.image.mount_options()) as exposed:
        assert exposed.stat().st_size == len(case.expected)
        assert sha256_of_file(exposed) == sha256_bytes(case.expected)

    with working_directory(copy):
        errors_after = qemu_img("check", *check_options, image, check=False)
    assert errors_after.returncode in (0, errors_before), errors_after.stdout + errors_after.stderr


# ---------------------------------------------------------------- partition tables


PARTITION_SCRIPTS = {
    "mbr": ("label: dos\n"
            "start=2048, size=16384, type=83\n"
            "start=20480, size=8192, type=82\n"
            "start=30720, size=30720, type=5\n"
            "start=32768, size=8192, type=83\n"
            "start=43008, type=c\n"),
    "gpt": ("label: gpt\n"
            "start=2048, size=16384, type=L, name=\"data one\"\n"
            "start=20480, size=8192, type=S\n"
            "start=30720, type=L, name=last\n"),
}


def partition_lines(dump: str, device: str) -> List[str]:
    """Return the partition lines of `sfdisk -d` output with the device name removed."""
    return [line.replace(device, "DEVICE") for line in dump.splitlines() if line.startswith(device)]


@needs_fuse
@pytest.mark.parametrize("label", sorted(PARTITION_SCRIPTS))
def test_partition_table_through_mount(label, tmp_path):
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as stream:
        stream.truncate(32 * MiB)
    subprocess.run(["sfdisk", "-q", str(disk)], input=PARTITION_SCRIPTS[label], text=True,
                   check=True, capture_output=True)
    files = tmp_path / "files"
    files.mkdir()
    (files / "hello.txt").write_text("hello from vdiskfs\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={MiB}", "-d", str(files),
                    str(disk), "8M"], check=True, capture_output=True)
    image = convert_to_qcow2(disk, tmp_path / "disk.qcow2")
    expected = partition_lines(
        subprocess.run(["sfdisk", "-d", str(disk)], capture_output=True, text=True,
                       check=True).stdout, str(disk))
    assert len(expected) >= 3

    with mounted(image, tmp_path / "mnt", "--read-only") as exposed:
        dump = subprocess.run(["sfdisk", "-d", str(exposed)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        assert partition_lines(dump.stdout, str(exposed)) == expected

        check = subprocess.run(["e2fsck", "-fn", f"{exposed}?offset={MiB}"],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        content = subprocess.run(["debugfs", "-R", "cat /hello.txt", f"{exposed}?offset={MiB}"],
                                 capture_output=True, text=True)
        assert content.stdout == "hello from vdiskfs\n"
