"""Inputs that broke other qcow2 readers, rebuilt with qemu-img, qemu-io and header pokes.

The tests fall into three groups. Good images must read as stated byte ranges and
as `qemu-img convert -O raw` does. Damaged headers must fail to open with a typed
error that names the bad field and its value, both in process and through
`vdiskfs info`. Damaged L1 and L2 entries must fail only the reads that reach them:
with CorruptImageError in process and with EIO through a mount, while the rest of
the disk still reads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from helpers import mounted, needs_fuse, qemu_img, qemu_io, reference_raw, sha256_of_file, vdiskfs
from images import (
    INCOMPAT_COMPRESSION_TYPE,
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
    l1_entry_location,
    l2_entry_location,
    pattern_bytes,
    poke,
    qemu_io_then_abort,
    read_bytes,
    read_header,
    read_u64,
    set_header_field,
    working_directory,
    write_u64,
)
from vdiskfs.errors import (
    BackingChainError,
    CorruptImageError,
    InvalidImageError,
    ReadOnlyError,
    UnsupportedFeatureError,
    VdiskError,
)
from vdiskfs.registry import open_chain

# A byte range [start, end) and the byte value every byte in it must have.
Ranges = List[Tuple[int, int, int]]


@dataclass
class ReadCase:
    image: BuiltImage
    ranges: Ranges = field(default_factory=list)
    expected: Optional[bytes] = None  # the whole disk, when known apart from QEMU


# ---------------------------------------------------------------- images that must read right


def zero_only(directory: Path) -> ReadCase:
    image = create_qcow2(directory / "zero_all.qcow2", 64 * MiB)
    qemu_io(image, f"write -z -u 0 {64 * MiB}")
    assert all(item.entry == L2_ZERO for item in iter_l2_entries(image))
    return ReadCase(BuiltImage(image), [(0, 64 * MiB, 0)])


def zero_flag_stale_host_cluster(directory: Path) -> ReadCase:
    image = create_qcow2(directory / "zero_alloc.qcow2", 4 * MiB)
    qemu_io(image, "write -P 0xab 0 64k", "write -z 0 64k")
    entry = read_u64(image, l2_entry_location(image, 0))
    assert entry & L2_ZERO
    assert read_bytes(image, entry & OFFSET_MASK, 64 * KiB) == b"\xab" * (64 * KiB)
    return ReadCase(BuiltImage(image), [(0, 4 * MiB, 0)])


def raw_backing_unaligned_tail(directory: Path) -> ReadCase:
    base = directory / "base.raw"
    base.write_bytes(b"\x5a" * 70000)
    image = create_qcow2(directory / "overlay.qcow2", MiB, backing="base.raw", backing_format="raw")
    return ReadCase(BuiltImage(image, files=[image, base]), [(0, 70000, 0x5A), (70000, MiB, 0)])


def raw_backing_unaligned_tail_written(directory: Path) -> ReadCase:
    base = directory / "base.raw"
    base.write_bytes(b"\x5a" * 70000)
    image = create_qcow2(directory / "overlay.qcow2", MiB, backing="base.raw", backing_format="raw")
    qemu_io(image, "write -P 0xee 69632 512")
    assert base.stat().st_size == 70000
    return ReadCase(BuiltImage(image, files=[image, base]),
                    [(0, 69632, 0x5A), (69632, 70144, 0xEE), (70144, MiB, 0)])


def zero_flag_hides_backing(directory: Path) -> ReadCase:
    base = create_qcow2(directory / "base.qcow2", MiB)
    qemu_io(base, "write -P 0x11 0 128k")
    image = create_qcow2(directory / "overlay.qcow2", MiB, backing="base.qcow2")
    qemu_io(image, "write -z 0 64k", "write -P 0x22 4096 512")
    return ReadCase(BuiltImage(image, files=[image, base]),
                    [(0, 4096, 0), (4096, 4608, 0x22), (4608, 65536, 0),
                     (65536, 131072, 0x11), (131072, MiB, 0)])


def compressed(directory: Path, compression_type: str, cluster_size: int, size: int) -> ReadCase:
    source = directory / "src.raw"
    source.write_bytes(pattern_bytes(size, seed=cluster_size + len(compression_type)))
    image = convert_to_qcow2(source, directory / "disk.qcow2", f"cluster_size={cluster_size}",
                             f"compression_type={compression_type}", compressed=True)
    clusters = compressed_clusters(image)
    assert len(clusters) == size // cluster_size, "not every cluster was compressed"

    header = read_header(image)
    if compression_type == "zstd":
        assert header["incompatible_features"] & INCOMPAT_COMPRESSION_TYPE
        assert read_bytes(image, 104, 1) == b"\x01"
    if cluster_size == 4 * KiB and compression_type == "zlib":
        crossing = [c for c in clusters
                    if c.host_offset // cluster_size
                    != (c.host_offset + c.deflate_length - 1) // cluster_size]
        assert len(crossing) > 10, "too few compressed streams cross a host cluster boundary"
    if cluster_size == 2 * MiB:
        assert sum(c.sectors > 256 for c in clusters) >= 2, "too few descriptors need > 256 sectors"
    return ReadCase(BuiltImage(image), expected=source.read_bytes())


def large_cluster_overlay(directory: Path) -> ReadCase:
    """Make a 2 MiB-cluster overlay whose small write copies 2 MiB from a 64 KiB-cluster base."""
    base = create_qcow2(directory / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 0x11 0 4M")
    image = create_qcow2(directory / "ov2m.qcow2", 4 * MiB, "cluster_size=2M", backing="base.qcow2")
    qemu_io(image, "write -P 0x22 1052672 4096")
    return ReadCase(BuiltImage(image, files=[image, base]),
                    [(0, 1052672, 0x11), (1052672, 1056768, 0x22), (1056768, 4 * MiB, 0x11)])


def refcount_width(directory: Path, refcount_bits: int) -> ReadCase:
    image = create_qcow2(directory / f"r{refcount_bits}.qcow2", 4 * MiB,
                         f"refcount_bits={refcount_bits}")
    qemu_io(image, "write -P 0x31 0 1M", "write -P 0x32 3M 65536")
    assert read_header(image)["refcount_order"] == refcount_bits.bit_length() - 1
    return ReadCase(BuiltImage(image), [(0, MiB, 0x31), (MiB, 3 * MiB, 0),
                                        (3 * MiB, 3 * MiB + 65536, 0x32),
                                        (3 * MiB + 65536, 4 * MiB, 0)])


def dirty_after_abort(directory: Path) -> ReadCase:
    image = create_qcow2(directory / "dirty.qcow2", MiB, "lazy_refcounts=on")
    qemu_io_then_abort(image, "write -P 0x5a 0 128k")
    assert read_header(image)["incompatible_features"] & INCOMPAT_DIRTY
    return ReadCase(BuiltImage(image), [(0, 128 * KiB, 0x5A), (128 * KiB, MiB, 0)])


def internal_snapshot(directory: Path) -> ReadCase:
    image = create_qcow2(directory / "snap.qcow2", MiB)
    qemu_io(image, "write -P 0x01 0 1M")
    qemu_img("snapshot", "-c", "snap1", image)
    qemu_io(image, "write -P 0x02 0 64k", "write -P 0x03 524288 4096")
    return ReadCase(BuiltImage(image), [(0, 65536, 0x02), (65536, 524288, 0x01),
                                        (524288, 528384, 0x03), (528384, MiB, 0x01)])


def feature_bit(directory: Path, field_name: str, value: int) -> ReadCase:
    image = good_image(directory, 0x42)
    set_header_field(image, field_name, value)
    return ReadCase(BuiltImage(image), [(0, 65536, 0x42), (65536, MiB, 0)])


def external_data_file(directory: Path) -> ReadCase:
    image = create_qcow2(directory / "ext.qcow2", MiB, "data_file=disk.data", "data_file_raw=on")
    qemu_io(image, "write -P 0x48 0 256k", "write -P 0x49 700000 1000")
    header = read_header(image)
    assert header["incompatible_features"] == 0x4
    data_file = directory / "disk.data"
    return ReadCase(BuiltImage(image, files=[image, data_file]),
                    [(0, 262144, 0x48), (262144, 700000, 0), (700000, 701000, 0x49),
                     (701000, MiB, 0)],
                    expected=data_file.read_bytes())


def subclusters_over_backing(directory: Path) -> ReadCase:
    base = create_qcow2(directory / "base.qcow2", MiB)
    qemu_io(base, "write -P 0x11 0 128k")
    image = create_qcow2(directory / "ov.qcow2", MiB, "extended_l2=on", "cluster_size=64k",
                         backing="base.qcow2")
    qemu_io(image, "write -P 0x22 8192 2048", "write -z 16384 2048", "write -P 0x33 100000 3000")
    return ReadCase(BuiltImage(image, files=[image, base]),
                    [(0, 8192, 0x11), (8192, 10240, 0x22), (10240, 16384, 0x11),
                     (16384, 18432, 0), (18432, 100000, 0x11), (100000, 103000, 0x33),
                     (103000, 131072, 0x11), (131072, MiB, 0)])


def l1_reserved_bit(directory: Path) -> ReadCase:
    """Set reserved bit 8 of L1 entry 0, which QEMU 7.2 masks before it reads normally."""
    image = good_image(directory, 0x4A)
    location = l1_entry_location(image, 0)
    write_u64(image, location, read_u64(image, location) | 0x100)
    return ReadCase(BuiltImage(image), [(0, 65536, 0x4A), (65536, MiB, 0)])


def backing_name_good(directory: Path) -> ReadCase:
    base = good_image(directory, 0x45, name="base.qcow2")
    image = create_qcow2(directory / "good.qcow2", MiB, backing="base.qcow2")
    return ReadCase(BuiltImage(image, files=[image, base]), [(0, 65536, 0x45), (65536, MiB, 0)])


def raw_with_qcow2_header(directory: Path) -> ReadCase:
    """Make a raw disk whose sector 0 contains the qcow2 header of a 16 GiB image."""
    header_source = create_qcow2(directory / "hdr.qcow2", 16 << 30)
    disk = directory / "disk.raw"
    disk.write_bytes(read_bytes(header_source, 0, 512) + bytes(MiB - 512))
    header_source.unlink()
    qemu_io(disk, "write -P 0x4b 524288 4096", fmt="raw")
    return ReadCase(BuiltImage(disk, format_name="raw"), [(524288, 528384, 0x4B)],
                    expected=disk.read_bytes())


def good_image(directory: Path, byte: int, name: str = "good.qcow2", size: int = MiB) -> Path:
    """Create a qcow2 image whose first 64 KiB hold `byte` and the rest is unallocated."""
    image = create_qcow2(directory / name, size)
    qemu_io(image, f"write -P {byte:#x} 0 64k")
    return image


READ_CASES: Dict[str, Callable[[Path], ReadCase]] = {
    "zero-only": zero_only,
    "zero-flag-stale-host-cluster": zero_flag_stale_host_cluster,
    "raw-backing-unaligned-tail": raw_backing_unaligned_tail,
    "raw-backing-unaligned-tail-written": raw_backing_unaligned_tail_written,
    "zero-flag-hides-backing": zero_flag_hides_backing,
    "zlib": lambda d: compressed(d, "zlib", 64 * KiB, 4 * MiB),
    "zstd": lambda d: compressed(d, "zstd", 64 * KiB, 4 * MiB),
    "zlib-4k-crossing-host-clusters": lambda d: compressed(d, "zlib", 4 * KiB, MiB),
    "zlib-cluster-bits-21": lambda d: compressed(d, "zlib", 2 * MiB, 8 * MiB),
    "2m-overlay-over-64k-backing": large_cluster_overlay,
    "refcount-order-0": lambda d: refcount_width(d, 1),
    "refcount-order-6": lambda d: refcount_width(d, 64),
    "dirty-lazy-refcounts": dirty_after_abort,
    "internal-snapshot-active-layer": internal_snapshot,
    "corrupt-bit": lambda d: feature_bit(d, "incompatible_features", 1 << 1),
    "unknown-compatible-bit": lambda d: feature_bit(d, "compatible_features", 1 << 63),
    "unknown-autoclear-bit": lambda d: feature_bit(d, "autoclear_features", 1 << 63),
    "external-data-file-raw": external_data_file,
    "subclusters-over-backing": subclusters_over_backing,
    "l1-reserved-bit-8": l1_reserved_bit,
    "backing-name-good": backing_name_good,
    "raw-with-qcow2-header": raw_with_qcow2_header,
}


def build_in(directory: Path, builder: Callable[[Path], object]):
    with working_directory(directory):
        return builder(directory)


@pytest.mark.parametrize("name", sorted(READ_CASES))
def test_known_image_reads_right(name, tmp_path):
    case = build_in(tmp_path, READ_CASES[name])
    digests = case.image.digests()

    driver = open_chain(str(case.image.path), case.image.format_name)
    try:
        data = driver.read(0, driver.virtual_size)
    finally:
        driver.close()

    for start, end, byte in case.ranges:
        assert data[start:end] == bytes([byte]) * (end - start), \
            f"[{start}, {end}) should be all {byte:#04x}"
    if case.expected is not None:
        assert len(data) == len(case.expected)
        assert data == case.expected
    if case.image.format_name is None:
        with working_directory(tmp_path):
            reference = reference_raw(case.image.path, tmp_path)
        assert data == reference.read_bytes(), "differs from qemu-img convert -O raw"
    assert case.image.digests() == digests, "reading changed a file of the image"


def test_raw_with_qcow2_header_keeps_size(tmp_path):
    case = build_in(tmp_path, raw_with_qcow2_header)
    driver = open_chain(str(case.image.path), "raw")
    try:
        assert driver.virtual_size == MiB
        assert driver.read(0, 4) == b"QFI\xfb"
    finally:
        driver.close()


def test_corrupt_bit_refuses_writes(tmp_path):
    """A read-write open of a corrupt image either fails or serves it read-only."""
    case = build_in(tmp_path, READ_CASES["corrupt-bit"])
    digest = sha256_of_file(case.image.path)
    try:
        driver = open_chain(str(case.image.path), read_only=False)
    except VdiskError:
        driver = None
    if driver is not None:
        try:
            assert driver.read_only
            with pytest.raises(ReadOnlyError):
                driver.write(0, b"\x00" * 512)
        finally:
            driver.close()
    assert sha256_of_file(case.image.path) == digest


# ---------------------------------------------------------------- images that must not open


@dataclass
class OpenFailure:
    """A damaged image and what its error must contain: a type, a field and a value."""

    build: Callable[[Path], Path]
    error: Tuple[type, ...]
    field: str  # regular expression for the field the message must name
    value: Optional[int] = None  # value the message must show, in decimal or hex


def poked(size: int = 64 * MiB, **fields: int) -> Callable[[Path], Path]:
    """Return a builder of a clean image with header `fields` set to the given values."""
    def build(directory: Path) -> Path:
        image = good_image(directory, 0x41, size=size)
        for name, value in fields.items():
            set_header_field(image, name, value)
        return image
    return build


def backing_chain_loop(directory: Path) -> Path:
    a = create_qcow2(directory / "a.qcow2", MiB)
    create_qcow2(directory / "b.qcow2", MiB, backing="a.qcow2")
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    return a


def backing_self_loop(directory: Path) -> Path:
    image = directory / "self.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "self.qcow2", "-F", "qcow2",
             directory / "tmp.qcow2", str(MiB))
    (directory / "tmp.qcow2").rename(image)
    return image


def backing_name_size_huge(directory: Path) -> Path:
    image = backing_name_good(directory).image.path
    set_header_field(image, "backing_file_size", 0xFFFFFFFF)
    return image


def backing_name_straddles_cluster(directory: Path) -> Path:
    """Move the backing file name so that it starts 4 bytes before the end of cluster 0."""
    image = backing_name_good(directory).image.path
    header = read_header(image)
    name = read_bytes(image, header["backing_file_offset"], header["backing_file_size"])
    poke(image, 65536 - 4, name)
    set_header_field(image, "backing_file_offset", 65536 - 4)
    return image


def snapshot_image(directory: Path) -> Path:
    return internal_snapshot(directory).image.path


def snapshot_poked(**fields: int) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        image = snapshot_image(directory)
        for name, value in fields.items():
            set_header_field(image, name, value)
        return image
    return build


INVALID = (InvalidImageError,)
# A message may name a table offset by its header field or by the table itself.
L1_TABLE = "l1_table_offset|L1 table"
REFCOUNT_TABLE = "refcount_table_offset|refcount table"
SNAPSHOT_TABLE = "snapshots_offset|snapshot table offset"
INVALID_OR_UNSUPPORTED = (InvalidImageError, UnsupportedFeatureError)

OPEN_FAILURES: Dict[str, OpenFailure] = {
    **{f"cluster-bits-{bits}": OpenFailure(poked(cluster_bits=bits),
                                            INVALID if bits < 9 else INVALID_OR_UNSUPPORTED,
                                            "cluster_bits", bits)
       for bits in (0, 8, 22, 31, 63, 255)},
    "l1-size-ffffffff": OpenFailure(poked(l1_size=0xFFFFFFFF), INVALID, "l1_size", 0xFFFFFFFF),
    "l1-size-7fffffff": OpenFailure(poked(l1_size=0x7FFFFFFF), INVALID, "l1_size", 0x7FFFFFFF),
    "l1-size-0": OpenFailure(poked(l1_size=0), INVALID, "l1_size", 0),
    "l1-offset-past-eof": OpenFailure(poked(l1_table_offset=0x7FFFFFFFFFFF0000, l1_size=0xFFFF),
                                      INVALID, L1_TABLE, 0x7FFFFFFFFFFF0000),
    "l1-offset-unaligned": OpenFailure(poked(l1_table_offset=0x1234567890ABCDEF, l1_size=1),
                                       INVALID, L1_TABLE, 0x1234567890ABCDEF),
    "header-length-huge": OpenFailure(poked(header_length=0xFFFFFFFF), INVALID,
                                      "header_length", 0xFFFFFFFF),
    "header-length-64": OpenFailure(poked(header_length=64), INVALID, "header_length", 64),
    "refcount-table-clusters-huge": OpenFailure(poked(refcount_table_clusters=0xFFFFFFFF),
                                                INVALID, "refcount_table_clusters", 0xFFFFFFFF),
    "refcount-table-offset-unaligned": OpenFailure(
        poked(refcount_table_offset=0x1234567890ABCDEF), INVALID,
        REFCOUNT_TABLE, 0x1234567890ABCDEF),
    "refcount-table-offset-past-eof": OpenFailure(
        poked(refcount_table_offset=0xFFFFFFFFFFFF0000, refcount_table_clusters=0x7F), INVALID,
        REFCOUNT_TABLE, 0xFFFFFFFFFFFF0000),
    "refcount-order-7": OpenFailure(poked(refcount_order=7), INVALID_OR_UNSUPPORTED,
                                    "refcount_order", 7),
    "nb-snapshots-huge": OpenFailure(snapshot_poked(nb_snapshots=0xFFFFFFFF), INVALID,
                                     "nb_snapshots", 0xFFFFFFFF),
    "snapshots-offset-unaligned": OpenFailure(snapshot_poked(snapshots_offset=0x1234567890ABCDEF),
                                              INVALID, SNAPSHOT_TABLE, 0x1234567890ABCDEF),
    "unknown-incompatible-bit": OpenFailure(poked(size=MiB, incompatible_features=1 << 63),
                                            (UnsupportedFeatureError,), "incompatible", 63),
    "backing-chain-loop": OpenFailure(backing_chain_loop, (BackingChainError,), "loop"),
    "backing-self-loop": OpenFailure(backing_self_loop, (BackingChainError,), "loop"),
    "backing-name-too-long": OpenFailure(backing_name_size_huge, INVALID,
                                         "backing_file_size", 0xFFFFFFFF),
    "backing-name-outside-cluster-0": OpenFailure(backing_name_straddles_cluster, INVALID,
                                                  "backing_file_offset|backing file name", 65532),
}


def value_spellings(value: int) -> List[str]:
    """Return how a message may write `value`: decimal, hex, and as a bit number."""
    spellings = [str(value), f"{value:#x}"]
    if value in range(64):
        spellings.append(f"{1 << value:#x}")
    return spellings


def assert_names(message: str, field_pattern: str, value: Optional[int]) -> None:
    field_regex = field_pattern.replace("_", "[ _]")
    assert re.search(field_regex, message, re.IGNORECASE), \
        f"message does not name {field_pattern}: {message!r}"
    if value is not None:
        found = [spelling for spelling in value_spellings(value)
                 if re.search(rf"(?<![0-9a-fx]){re.escape(spelling)}(?![0-9a-f])", message,
                              re.IGNORECASE)]
        assert found, f"message does not show the value {value} ({value:#x}): {message!r}"


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError in the body after `seconds`, so a looping open fails the test."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", sorted(OPEN_FAILURES))
def test_damaged_image_fails_open(name, tmp_path):
    failure = OPEN_FAILURES[name]
    image = build_in(tmp_path, failure.build)
    size_before = image.stat().st_size

    with time_limit(20), pytest.raises(VdiskError) as caught:
        open_chain(str(image)).close()

    assert isinstance(caught.value, failure.error), \
        f"raised {type(caught.value).__name__}: {caught.value}"
    assert_names(str(caught.value), failure.field, failure.value)
    assert image.stat().st_size == size_before


@pytest.mark.parametrize("name", sorted(OPEN_FAILURES))
def test_damaged_image_info_prints_one_line(name, tmp_path):
    image = build_in(tmp_path, OPEN_FAILURES[name].build)
    result = vdiskfs("info", image, check=False, timeout=30)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vdiskfs: ")
    assert result.stdout == ""


# ---------------------------------------------------------------- damage met while reading


def damaged_l2_image(directory: Path) -> Path:
    """Return a 1 MiB image: clusters 0-3 hold 0x4a..0x4d, clusters 0 and 2 are damaged.

    L2 entry 0 points at an unaligned data offset (bit 9 set), and L2 entry 2 points
    near 2^56, far past the end of the file. Clusters 1 and 3 stay healthy.
    """
    image = create_qcow2(directory / "damaged.qcow2", MiB)
    qemu_io(image, "write -P 0x4a 0 64k", "write -P 0x4b 64k 64k", "write -P 0x4c 128k 64k",
            "write -P 0x4d 192k 64k")
    first = l2_entry_location(image, 0)
    write_u64(image, first, read_u64(image, first) | 0x200)
    write_u64(image, l2_entry_location(image, 128 * KiB), 0x80FFFFFFFFFF0000)
    return image


def unaligned_l2_table_image(directory: Path) -> Path:
    image = good_image(directory, 0x4A)
    location = l1_entry_location(image, 0)
    write_u64(image, location, read_u64(image, location) | 0x200)
    return image


def test_l1_entry_unaligned_l2_fails_read(tmp_path):
    image = build_in(tmp_path, unaligned_l2_table_image)
    l2_offset = read_u64(image, l1_entry_location(image, 0)) & OFFSET_MASK

    driver = open_chain(str(image))
    try:
        with pytest.raises(CorruptImageError) as caught:
            driver.read(0, 512)
    finally:
        driver.close()
    assert_names(str(caught.value), "L2", l2_offset)


def test_l2_entry_damage_fails_only_its_cluster(tmp_path):
    image = build_in(tmp_path, damaged_l2_image)
    digest = sha256_of_file(image)
    size = image.stat().st_size
    unaligned = read_u64(image, l2_entry_location(image, 0)) & OFFSET_MASK

    driver = open_chain(str(image))
    try:
        with pytest.raises(CorruptImageError) as unaligned_error:
            driver.read(0, 512)
        with pytest.raises(CorruptImageError) as past_eof_error:
            driver.read(128 * KiB + 100, 512)
        assert driver.read(64 * KiB, 64 * KiB) == b"\x4b" * (64 * KiB)
        assert driver.read(192 * KiB, 64 * KiB) == b"\x4d" * (64 * KiB)
        assert driver.read(256 * KiB, 4096) == bytes(4096)
    finally:
        driver.close()

    assert_names(str(unaligned_error.value), "offset", unaligned)
    assert_names(str(past_eof_error.value), "offset", 0xFFFFFFFFFF0000)
    assert image.stat().st_size == size, "reading extended the image file"
    assert sha256_of_file(image) == digest


@needs_fuse
def test_mount_returns_eio_for_damaged_clusters(tmp_path):
    image = build_in(tmp_path, damaged_l2_image)
    digest = sha256_of_file(image)
    mountpoint = tmp_path / "mnt"

    with mounted(image, mountpoint, "--read-only") as exposed:
        with open(exposed, "rb", buffering=0) as stream:
            descriptor = stream.fileno()
            for offset in (0, 128 * KiB + 100):
                with pytest.raises(OSError) as caught:
                    os.pread(descriptor, 512, offset)
                assert caught.value.errno == errno.EIO, f"read at {offset}"
            assert os.pread(descriptor, 4096, 64 * KiB) == b"\x4b" * 4096
            assert os.pread(descriptor, 4096, 192 * KiB + 5) == b"\x4d" * 4096
            assert os.pread(descriptor, 4096, 512 * KiB) == bytes(4096)
        with pytest.raises(OSError) as whole_file:
            sha256_of_file(exposed)
        assert whole_file.value.errno == errno.EIO
        assert os.path.ismount(mountpoint), "the daemon left after a damaged read"
        with open(exposed, "rb") as stream:
            stream.seek(192 * KiB)
            assert stream.read(16) == b"\x4d" * 16

    assert sha256_of_file(image) == digest
    errors = daemon_log_lines(mountpoint, "ERROR")
    assert any("0x50200" in line for line in errors), "the unaligned offset was not logged"
    assert any("0xffffffffff0000" in line for line in errors), "the offset past EOF was not logged"


@needs_fuse
def test_mount_raw_with_qcow2_header(tmp_path):
    case = build_in(tmp_path, raw_with_qcow2_header)
    with mounted(case.image.path, tmp_path / "mnt", "--read-only",
                 *case.image.mount_options()) as exposed:
        assert exposed.stat().st_size == MiB
        assert sha256_of_file(exposed) == sha256_of_file(case.image.path)
