"""Building test images with qemu-img and qemu-io, and damaging them on purpose.

The header layout and table entry formats follow the qcow2 specification
(docs/interop/qcow2.txt in the QEMU source tree). Every number in a qcow2 file
is big-endian.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

from helpers import qemu_img, qemu_io, sha256_of_file

KiB = 1 << 10
MiB = 1 << 20

# Header fields: name -> (byte offset, struct format). Fields from offset 72 on
# exist only in version 3 images.
HEADER_FIELDS = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
}

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION_TYPE = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Bits 9-55 of L1 and standard L2 entries contain a host offset.
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2_COMPRESSED = 1 << 62
L2_ZERO = 1 << 0


def poke(path: Path, offset: int, data: bytes) -> None:
    """Overwrite the bytes of `path` at `offset` with `data`."""
    with open(path, "r+b") as image:
        image.seek(offset)
        image.write(data)


def read_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as image:
        image.seek(offset)
        return image.read(length)


def read_u64(path: Path, offset: int) -> int:
    return struct.unpack(">Q", read_bytes(path, offset, 8))[0]


def write_u64(path: Path, offset: int, value: int) -> None:
    poke(path, offset, struct.pack(">Q", value))


def read_header(path: Path) -> dict:
    """Return the header fields of a qcow2 image, without the version 3 fields for version 2."""
    raw = read_bytes(path, 0, 104)
    header = {}
    for name, (offset, layout) in HEADER_FIELDS.items():
        if offset >= 72 and struct.unpack_from(">I", raw, 4)[0] < 3:
            break
        header[name] = struct.unpack_from(layout, raw, offset)[0]
    return header


def set_header_field(path: Path, name: str, value: int) -> None:
    offset, layout = HEADER_FIELDS[name]
    poke(path, offset, struct.pack(layout, value))


def l1_entry_location(path: Path, guest_offset: int) -> int:
    """Return the file offset of the L1 entry that covers `guest_offset`."""
    header = read_header(path)
    cluster_bits = header["cluster_bits"]
    entries_per_l2 = (1 << cluster_bits) // _l2_entry_size(header)
    l1_index = (guest_offset >> cluster_bits) // entries_per_l2
    return header["l1_table_offset"] + 8 * l1_index


def l2_entry_location(path: Path, guest_offset: int) -> int:
    """Return the file offset of the L2 entry that maps `guest_offset`.

    Raises AssertionError when the L1 entry is empty, since there is no L2 table to find.
    """
    header = read_header(path)
    cluster_bits = header["cluster_bits"]
    entry_size = _l2_entry_size(header)
    entries_per_l2 = (1 << cluster_bits) // entry_size
    l2_index = (guest_offset >> cluster_bits) % entries_per_l2
    l2_offset = read_u64(path, l1_entry_location(path, guest_offset)) & OFFSET_MASK
    assert l2_offset, f"{path}: guest offset {guest_offset} has no L2 table"
    return l2_offset + entry_size * l2_index


def _l2_entry_size(header: dict) -> int:
    return 16 if header.get("incompatible_features", 0) & INCOMPAT_EXTENDED_L2 else 8


@dataclass(frozen=True)
class L2Entry:
    guest_offset: int
    entry: int
    bitmap: int  # subcluster allocation bitmap, or 0 without extended L2 entries


def iter_l2_entries(path: Path) -> Iterator[L2Entry]:
    """Yield every non-empty entry of the active L2 tables, in guest order."""
    header = read_header(path)
    cluster_bits = header["cluster_bits"]
    entry_size = _l2_entry_size(header)
    entries_per_l2 = (1 << cluster_bits) // entry_size
    data = Path(path).read_bytes()
    for l1_index in range(header["l1_size"]):
        l1_entry = struct.unpack_from(">Q", data, header["l1_table_offset"] + 8 * l1_index)[0]
        l2_offset = l1_entry & OFFSET_MASK
        if not l2_offset:
            continue
        for l2_index in range(entries_per_l2):
            location = l2_offset + entry_size * l2_index
            entry = struct.unpack_from(">Q", data, location)[0]
            bitmap = struct.unpack_from(">Q", data, location + 8)[0] if entry_size == 16 else 0
            if entry or bitmap:
                guest = (l1_index * entries_per_l2 + l2_index) << cluster_bits
                yield L2Entry(guest, entry, bitmap)


@dataclass(frozen=True)
class CompressedCluster:
    guest_offset: int
    host_offset: int
    sectors: int  # 512-byte sectors the descriptor claims, counted from the start sector
    deflate_length: int  # real length of the zlib stream, or 0 for zstd


def compressed_clusters(path: Path) -> List[CompressedCluster]:
    """Decode the compressed cluster descriptors of the active L2 tables."""
    header = read_header(path)
    cluster_bits = header["cluster_bits"]
    offset_bits = 62 - (cluster_bits - 8)
    zlib_type = header.get("incompatible_features", 0) & INCOMPAT_COMPRESSION_TYPE == 0
    data = Path(path).read_bytes()
    found = []
    for item in iter_l2_entries(path):
        if not item.entry & L2_COMPRESSED:
            continue
        host_offset = item.entry & ((1 << offset_bits) - 1)
        sectors = ((item.entry >> offset_bits) & ((1 << (cluster_bits - 8)) - 1)) + 1
        deflate_length = 0
        if zlib_type:
            stream = zlib.decompressobj(-15)
            chunk = data[host_offset:(host_offset & ~511) + sectors * 512]
            stream.decompress(chunk)
            deflate_length = len(chunk) - len(stream.unused_data)
        found.append(CompressedCluster(item.guest_offset, host_offset, sectors, deflate_length))
    return found


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the body in `path`.

    QEMU 7.2 looks up a relative external data file name in its working directory,
    not beside the image, so qemu-img and qemu-io must run in the image's folder.
    """
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def pattern_bytes(size: int, seed: int) -> bytes:
    """Return `size` deterministic bytes that compress to about half their size.

    Every KiB is 512 random bytes followed by a text run that names the KiB, so a
    read from a wrong offset differs from the right bytes even inside one region.
    """
    generator = random.Random(seed)
    parts = []
    for index in range((size + KiB - 1) // KiB):
        parts.append(generator.randbytes(512))
        parts.append((b"seed %d KiB %010d " % (seed, index) * 32)[:512])
    return b"".join(parts)[:size]


def random_file(path: Path, size: int, seed: int) -> Path:
    """Write `size` random bytes to `path`, for `qemu-io write -s`."""
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def create_qcow2(path: Path, size: int, *options: str, backing: Optional[str] = None,
                 backing_format: Optional[str] = None) -> Path:
    """Create an empty qcow2 image; `options` are `-o` values such as 'cluster_size=4k'."""
    argv = ["create", "-q", "-f", "qcow2"]
    if options:
        argv += ["-o", ",".join(options)]
    if backing is not None:
        argv += ["-b", backing, "-F", backing_format or "qcow2"]
    qemu_img(*argv, path, str(size))
    return path


def convert_to_qcow2(source: Path, target: Path, *options: str, compressed: bool = False,
                     source_format: str = "raw") -> Path:
    argv = ["convert", "-f", source_format, "-O", "qcow2"]
    if compressed:
        argv.append("-c")
    if options:
        argv += ["-o", ",".join(options)]
    qemu_img(*argv, source, target)
    return target


def qemu_io_then_abort(image: Path, *commands: str) -> None:
    """Run qemu-io commands and then abort the process, leaving caches unflushed."""
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    argv += ["-c", "abort", str(image)]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode != 0, f"qemu-io abort on {image} exited 0"


def scattered_writes(image: Path, size: int, scratch: Path, seed: int) -> None:
    """Write random and constant data at unaligned offsets all over a disk of `size` bytes.

    The writes run from the end of the disk towards its start, so host clusters are not
    in guest order. The disk must be at least 4 MiB.
    """
    assert size >= 4 * MiB
    first = random_file(scratch / f"random-{seed}-a.bin", 4099, seed)
    second = random_file(scratch / f"random-{seed}-b.bin", 65539, seed + 1)
    qemu_io(
        image,
        f"write -P 0xa7 {size - 4097} 4097",
        f"write -s {first} {size - 3 * MiB + 12345} 500000",
        f"write -s {second} {2 * MiB - 1000} 300000",
        f"write -s {first} 65000 140000",
        "write -P 0x5c 1000 3000",
        f"write -s {second} 0 777",
        "write -z 66000 20000",
        "write -P 0x3e 70001 1",
        f"write -z {2 * MiB} 65536",
        f"write -s {first} {2 * MiB + 512} 3",
    )


@dataclass
class BuiltImage:
    """An image made for a test, with what vdiskfs needs to open and check it."""

    path: Path
    format_name: Optional[str] = None  # for open_chain and mount, or None to probe
    files: List[Path] = field(default_factory=list)  # every file the image reads from
    reference: Optional[Path] = None  # raw file to compare with, or None for qemu-img convert

    def __post_init__(self) -> None:
        if not self.files:
            self.files = [self.path]

    def mount_options(self) -> List[str]:
        return ["--format", self.format_name] if self.format_name else []

    def digests(self) -> dict:
        return {path: sha256_of_file(path) for path in self.files}


def daemon_log_lines(mountpoint: Path, *levels: str) -> List[str]:
    """Return the lines of the mount daemon's log file that have one of the logging `levels`."""
    from vdiskfs.daemon import RuntimeFiles

    log = RuntimeFiles.for_mountpoint(os.path.realpath(mountpoint)).log
    return [line for line in log.read_text().splitlines()
            if any(f" {level} " in line for level in levels)]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
