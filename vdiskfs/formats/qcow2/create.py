"""Creating qcow2 images, as `qemu-img create -f qcow2` does.

Layout: the clusters that a new image allocates are contiguous from offset 0, in this
order: the header cluster, the refcount table, the refcount blocks, the L1 table and,
with preallocation, all L2 tables and then all data clusters. Without preallocation and
with one refcount block, this puts the header, refcount table, refcount block and L1
table at clusters 0 to 3, where qemu-img 7.2 puts them. With preallocation the data
clusters follow the last L2 table, so the whole guest disk maps to one contiguous host
range.

Because the allocated clusters are exactly clusters 0 to N - 1, each refcount is 1 below
N and 0 from N on: every refcount block but the last is full of ones. Tables that stay
all zeros are never written, because the file is first truncated to its final length and
reads back as zeros. That keeps the creation of a 16 TiB image to a few small writes.

Caveats: encryption is not supported. With preallocation=falloc or full, QEMU places the
data clusters after all metadata too, but at other offsets; both layouts are valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from array import array
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

from vdiskfs.formats.create_options import (
    InvalidOptionError, OptionSpec, choice_parser, format_size_value, on_off, parse_bool,
    parse_integer, parse_size_value, parse_string)
from vdiskfs.formats.qcow2.cache import encode_table
from vdiskfs.formats.qcow2.header import (
    AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZLIB, COMPRESSION_ZSTD,
    EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_END, EXT_FEATURE_NAME_TABLE,
    FEATURE_NAME_ENTRY_SIZE, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2,
    KNOWN_FEATURE_NAMES, MAX_BACKING_FILE_SIZE, MAX_CLUSTER_BITS, MAX_L1_SIZE_BYTES,
    MAX_REFCOUNT_TABLE_BYTES, MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS, QCOW_MAGIC,
    V2_HEADER_LENGTH)
from vdiskfs.formats.qcow2.mapping import QCOW_OFLAG_COPIED
from vdiskfs.formats.raw_create import (
    new_image_file, preallocate, round_up_to_sector, validate_image_size,
    validate_preallocation)

DEFAULT_CLUSTER_SIZE = 64 * 1024
MIN_CLUSTER_SIZE = 1 << MIN_CLUSTER_BITS
MAX_CLUSTER_SIZE = 1 << MAX_CLUSTER_BITS
MIN_EXTENDED_L2_CLUSTER_SIZE = 1 << MIN_EXTENDED_L2_CLUSTER_BITS

# QEMU writes 112 header bytes for version 3: the 104 required ones, compression_type at
# byte 104, and padding to a multiple of 8.
V3_HEADER_LENGTH_WRITTEN = 112
COMPRESSION_TYPE_OFFSET = 104

# QEMU writes the feature name table only for clusters larger than 4 KiB, so that the
# first cluster of a 512-byte-cluster image keeps room for the backing file name.
FEATURE_TABLE_MIN_CLUSTER_SIZE = 4096 + 1

# L1 and L2 entries hold host offsets in bits 9 to 55.
MAX_HOST_OFFSET = 1 << 56

L1_ENTRY_SIZE = 8
REFCOUNT_TABLE_ENTRY_SIZE = 8

# Table entries generated per write when preallocating L1 and L2 tables.
TABLE_WRITE_BYTES = 8 * 1024 * 1024

COMPAT_LEVELS = ("0.10", "1.1")
COMPAT_ALIASES = {"v2": "0.10", "v3": "1.1"}
COMPRESSION_TYPES = {"zlib": COMPRESSION_ZLIB, "zstd": COMPRESSION_ZSTD}
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")

QCOW2_OPTIONS = (
    OptionSpec("backing_file", "file name of the backing image, stored as given",
               parse_string),
    OptionSpec("backing_fmt", "format of the backing image (qcow2 or raw)", parse_string),
    OptionSpec("cluster_size", "cluster size in bytes: a power of two from 512 to 2M "
               "(default 64K)", parse_size_value),
    OptionSpec("compat", "qcow2 version: 1.1 (v3, default) or 0.10 (v2)",
               choice_parser(*COMPAT_LEVELS, aliases=COMPAT_ALIASES)),
    OptionSpec("compression_type", "compression of compressed clusters: zlib (default) "
               "or zstd (needs compat 1.1)", choice_parser(*COMPRESSION_TYPES)),
    OptionSpec("data_file", "file name of an external data file for the guest data",
               parse_string),
    OptionSpec("data_file_raw", "on: the data file is also a valid raw image of the disk "
               "(needs data_file)", parse_bool),
    OptionSpec("extended_l2", "on: 32 subclusters per cluster (needs compat 1.1 and "
               "cluster_size 16K or larger)", parse_bool),
    OptionSpec("lazy_refcounts", "on: postpone refcount updates (needs compat 1.1)",
               parse_bool),
    OptionSpec("preallocation", "off (default), metadata (all L2 tables and clusters), "
               "falloc or full (metadata, then reserve or zero the data)",
               choice_parser(*PREALLOCATION_MODES)),
    OptionSpec("refcount_bits", "width of a refcount: a power of two from 1 to 64 "
               "(default 16, the only width for compat 0.10)", parse_integer),
    OptionSpec("size", "virtual disk size in bytes, with an optional K, M, G or T suffix",
               parse_size_value),
)


@dataclass(frozen=True)
class Qcow2CreateOptions:
    """The settings of a new qcow2 image, named like the `qemu-img create -o` options.

    `size` is in bytes and is rounded up to a multiple of 512, as qemu-img does.
    `backing_file` and `data_file` are stored in the header exactly as given.
    """

    size: int
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    compat: str = "1.1"
    refcount_bits: int = 16
    extended_l2: bool = False
    compression_type: str = "zlib"
    lazy_refcounts: bool = False
    preallocation: str = "off"
    backing_file: Optional[str] = None
    backing_fmt: Optional[str] = None
    data_file: Optional[str] = None
    data_file_raw: bool = False

    @property
    def version(self) -> int:
        return 3 if self.compat == "1.1" else 2

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8


@dataclass(frozen=True)
class Qcow2Layout:
    """Positions of a new image's structures, counted in clusters from offset 0."""

    cluster_size: int
    guest_clusters: int
    l2_entries: int
    l1_size: int  # entries
    refcount_table_cluster: int
    refcount_table_clusters: int
    refcount_block_cluster: int
    refcount_blocks: int
    l1_cluster: int
    l1_clusters: int
    l2_cluster: int
    l2_tables: int
    data_cluster: int
    data_clusters: int  # clusters of guest data inside the image file
    allocated_clusters: int
    file_size: int

    def offset(self, cluster: int) -> int:
        return cluster * self.cluster_size

    @property
    def l1_table_offset(self) -> int:
        # An empty L1 table has offset 0, as QEMU writes it for a disk of size 0.
        return self.offset(self.l1_cluster) if self.l1_size else 0


def create_qcow2(filename: str, options: Qcow2CreateOptions) -> None:
    """Create the qcow2 image `filename`, and its external data file if one is set.

    Raises InvalidOptionError, naming the option and its value, before any file is
    touched. An existing file of the same name is replaced. A file that this call began
    to write is removed again if a later step fails. Blocks until the image is durable.
    """
    options = normalize_options(options)
    validate_options(options)
    layout = plan_layout(options)
    header = build_header(options, layout)
    if options.data_file is not None:
        data_path = data_file_path(filename, options)
        if os.path.abspath(data_path) == os.path.abspath(filename):
            raise InvalidOptionError(
                f"invalid data_file {options.data_file}: it is the image being created")

    with contextlib.ExitStack() as files:
        if options.data_file is not None:
            data_fd = files.enter_context(new_image_file(data_path))
            os.ftruncate(data_fd, options.size)
            preallocate(data_fd, 0, options.size, options.preallocation)

        fd = files.enter_context(new_image_file(filename))
        os.ftruncate(fd, layout.file_size)
        _pwrite_all(fd, header, 0)
        _write_refcount_table(fd, layout)
        _write_refcount_blocks(fd, layout, options.refcount_bits)
        if options.preallocation != "off":
            _write_l1_table(fd, layout)
            _write_l2_tables(fd, options, layout)
            preallocate(fd, layout.offset(layout.data_cluster),
                        layout.offset(layout.data_clusters), options.preallocation)


def data_file_path(filename: str, options: Qcow2CreateOptions) -> str:
    """Return the path at which the external data file is created.

    A relative name is taken relative to the image's directory, where vdiskfs's qcow2
    driver looks for it.

    NOTE: qemu-img 7.2 resolves a relative data_file against the current directory
    instead, so both agree only for absolute names or an image in the current directory.
    """
    name = options.data_file
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(filename), name)


def normalize_options(options: Qcow2CreateOptions) -> Qcow2CreateOptions:
    """Apply qemu-img's implicit changes: round the size up to a multiple of 512, and
    preallocate metadata for data_file_raw, whose L2 tables must map the whole disk."""
    changes = {"size": round_up_to_sector(options.size)}
    if options.data_file_raw and options.preallocation == "off":
        changes["preallocation"] = "metadata"
    return dataclasses.replace(options, **changes)


def validate_options(options: Qcow2CreateOptions) -> None:
    """Raise InvalidOptionError for the first invalid option or forbidden combination."""
    _validate_values(options)
    _validate_feature_requirements(options)
    _validate_backing_and_data_file(options)
    layout = plan_layout(options)
    _validate_limits(options, layout)


def _validate_values(options: Qcow2CreateOptions) -> None:
    validate_image_size(options.size)

    size = options.cluster_size
    if not MIN_CLUSTER_SIZE <= size <= MAX_CLUSTER_SIZE or size & (size - 1):
        raise InvalidOptionError(
            f"invalid cluster_size {format_size_value(size)}: must be a power of two from "
            f"{format_size_value(MIN_CLUSTER_SIZE)} to {format_size_value(MAX_CLUSTER_SIZE)}")

    if options.compat not in COMPAT_LEVELS:
        raise InvalidOptionError(f"invalid compat {options.compat}: must be 0.10 or 1.1")

    bits = options.refcount_bits
    if not 1 <= bits <= 64 or bits & (bits - 1):
        raise InvalidOptionError(
            f"invalid refcount_bits {bits}: must be a power of two from 1 to 64")

    if options.compression_type not in COMPRESSION_TYPES:
        raise InvalidOptionError(
            f"invalid compression_type {options.compression_type}: must be zlib or zstd")

    validate_preallocation(options.preallocation, PREALLOCATION_MODES)


def _validate_feature_requirements(options: Qcow2CreateOptions) -> None:
    if options.extended_l2 and options.cluster_size < MIN_EXTENDED_L2_CLUSTER_SIZE:
        raise InvalidOptionError(
            f"invalid extended_l2 on: requires cluster_size "
            f"{format_size_value(MIN_EXTENDED_L2_CLUSTER_SIZE)} or larger, not "
            f"{format_size_value(options.cluster_size)}")
    if options.version >= 3:
        return
    if options.refcount_bits != 16:
        raise InvalidOptionError(
            f"invalid refcount_bits {options.refcount_bits}: compat 0.10 supports only 16 "
            f"(use compat=1.1)")
    needs_v3 = (
        ("extended_l2", options.extended_l2, on_off(options.extended_l2)),
        ("compression_type", options.compression_type != "zlib", options.compression_type),
        ("lazy_refcounts", options.lazy_refcounts, on_off(options.lazy_refcounts)),
        ("data_file", options.data_file is not None, options.data_file),
    )
    for name, used, value in needs_v3:
        if used:
            raise InvalidOptionError(f"invalid {name} {value}: requires compat=1.1")


def _validate_backing_and_data_file(options: Qcow2CreateOptions) -> None:
    backing = options.backing_file
    if options.backing_fmt is not None and backing is None:
        raise InvalidOptionError(
            f"invalid backing_fmt {options.backing_fmt}: requires a backing file")
    for name in ("backing_file", "backing_fmt", "data_file"):
        if getattr(options, name) == "":
            raise InvalidOptionError(f"invalid {name} '': the name is empty")

    if options.data_file_raw:
        if options.data_file is None:
            raise InvalidOptionError("invalid data_file_raw on: requires data_file")
        if backing is not None:
            raise InvalidOptionError(
                "invalid data_file_raw on: a raw data file cannot have a backing file")

    if backing is None:
        return
    if len(os.fsencode(backing)) > MAX_BACKING_FILE_SIZE:
        raise InvalidOptionError(
            f"invalid backing_file {backing}: longer than {MAX_BACKING_FILE_SIZE} bytes")
    if options.preallocation != "off" and not options.extended_l2:
        # Preallocated clusters would hide the backing file. With extended L2 entries,
        # their subclusters stay unallocated and still read from it.
        raise InvalidOptionError(
            f"invalid preallocation {options.preallocation}: an image with a backing "
            f"file needs preallocation=off, unless extended_l2=on")


def _validate_limits(options: Qcow2CreateOptions, layout: Qcow2Layout) -> None:
    cluster_size = options.cluster_size
    if layout.l1_size * L1_ENTRY_SIZE > MAX_L1_SIZE_BYTES:
        max_size = MAX_L1_SIZE_BYTES // L1_ENTRY_SIZE * layout.l2_entries * cluster_size
        raise InvalidOptionError(
            f"invalid size {format_size_value(options.size)}: cluster_size "
            f"{format_size_value(cluster_size)} allows at most {format_size_value(max_size)} "
            f"(use a larger cluster_size)")

    if layout.refcount_table_clusters * cluster_size > MAX_REFCOUNT_TABLE_BYTES:
        raise InvalidOptionError(
            f"invalid preallocation {options.preallocation}: the refcount table would "
            f"exceed QEMU's limit of {format_size_value(MAX_REFCOUNT_TABLE_BYTES)} "
            f"(use a larger cluster_size or smaller refcount_bits)")
    highest_host_offset = layout.file_size
    if options.data_file is not None and options.preallocation != "off":
        highest_host_offset = max(highest_host_offset, options.size)
    if highest_host_offset > MAX_HOST_OFFSET:
        raise InvalidOptionError(
            f"invalid preallocation {options.preallocation}: host offsets would exceed "
            f"the qcow2 limit of {format_size_value(MAX_HOST_OFFSET)}")

    header_bytes = _fixed_header_length(options) + len(_header_extensions(options))
    if options.backing_file is not None:
        header_bytes += len(os.fsencode(options.backing_file))
    if header_bytes > cluster_size:
        name, value = next((name, value) for name, value in (
            ("backing_file", options.backing_file), ("data_file", options.data_file),
            ("backing_fmt", options.backing_fmt)) if value is not None)
        raise InvalidOptionError(
            f"invalid {name} {value}: the header with its extensions and names needs "
            f"{header_bytes} bytes, more than cluster_size {format_size_value(cluster_size)}")


def plan_layout(options: Qcow2CreateOptions) -> Qcow2Layout:
    """Place every structure of the new image, in the order that the module docstring gives."""
    cluster_size = options.cluster_size
    l2_entries = cluster_size // options.l2_entry_size
    guest_clusters = _div_round_up(options.size, cluster_size)
    l1_size = _div_round_up(guest_clusters, l2_entries)
    l1_clusters = _div_round_up(l1_size * L1_ENTRY_SIZE, cluster_size)

    preallocated = options.preallocation != "off"
    l2_tables = l1_size if preallocated else 0
    in_file_data = preallocated and options.data_file is None
    data_clusters = guest_clusters if in_file_data else 0

    # The refcount blocks must also count themselves and the refcount table, so grow
    # both until one more round changes nothing.
    other_clusters = 1 + l1_clusters + l2_tables + data_clusters
    refcounts_per_block = cluster_size * 8 // options.refcount_bits
    blocks_per_table_cluster = cluster_size // REFCOUNT_TABLE_ENTRY_SIZE
    table_clusters, blocks = 1, 1
    while True:
        total = other_clusters + table_clusters + blocks
        needed_blocks = _div_round_up(total, refcounts_per_block)
        needed_table = _div_round_up(needed_blocks, blocks_per_table_cluster)
        if (needed_blocks, needed_table) == (blocks, table_clusters):
            break
        blocks = max(blocks, needed_blocks)
        table_clusters = max(table_clusters, needed_table)

    refcount_block_cluster = 1 + table_clusters
    l1_cluster = refcount_block_cluster + blocks
    l2_cluster = l1_cluster + l1_clusters
    data_cluster = l2_cluster + l2_tables
    allocated = data_cluster + data_clusters

    if preallocated:
        file_size = allocated * cluster_size
    else:
        # As in qemu-img's files, the file ends where the L1 entries end.
        file_size = l1_cluster * cluster_size + l1_size * L1_ENTRY_SIZE

    return Qcow2Layout(
        cluster_size=cluster_size, guest_clusters=guest_clusters, l2_entries=l2_entries,
        l1_size=l1_size, refcount_table_cluster=1, refcount_table_clusters=table_clusters,
        refcount_block_cluster=refcount_block_cluster, refcount_blocks=blocks,
        l1_cluster=l1_cluster, l1_clusters=l1_clusters, l2_cluster=l2_cluster,
        l2_tables=l2_tables, data_cluster=data_cluster, data_clusters=data_clusters,
        allocated_clusters=allocated, file_size=file_size)


def build_header(options: Qcow2CreateOptions, layout: Qcow2Layout) -> bytes:
    """Encode the header, its extensions and the backing file name (cluster 0)."""
    extensions = _header_extensions(options)
    header_length = _fixed_header_length(options)
    backing_name = b""
    backing_offset = 0
    if options.backing_file is not None:
        backing_name = os.fsencode(options.backing_file)
        backing_offset = header_length + len(extensions)

    header = bytearray(struct.pack(
        ">4sIQIIQIIQQIIQ",
        QCOW_MAGIC, options.version, backing_offset, len(backing_name), options.cluster_bits,
        options.size, 0, layout.l1_size, layout.l1_table_offset,
        layout.offset(layout.refcount_table_cluster), layout.refcount_table_clusters,
        0, 0))
    if options.version >= 3:
        incompatible, compatible, autoclear = _feature_bits(options)
        header += struct.pack(">QQQII", incompatible, compatible, autoclear,
                              options.refcount_bits.bit_length() - 1, header_length)
        header += bytes(header_length - len(header))
        header[COMPRESSION_TYPE_OFFSET] = COMPRESSION_TYPES[options.compression_type]
    return bytes(header) + extensions + backing_name


def _fixed_header_length(options: Qcow2CreateOptions) -> int:
    return V3_HEADER_LENGTH_WRITTEN if options.version >= 3 else V2_HEADER_LENGTH


def _feature_bits(options: Qcow2CreateOptions) -> Tuple[int, int, int]:
    incompatible = compatible = autoclear = 0
    if options.data_file is not None:
        incompatible |= INCOMPAT_DATA_FILE
    if options.compression_type != "zlib":
        incompatible |= INCOMPAT_COMPRESSION
    if options.extended_l2:
        incompatible |= INCOMPAT_EXTL2
    if options.lazy_refcounts:
        compatible |= COMPAT_LAZY_REFCOUNTS
    if options.data_file_raw:
        autoclear |= AUTOCLEAR_DATA_FILE_RAW
    return incompatible, compatible, autoclear


def _header_extensions(options: Qcow2CreateOptions) -> bytes:
    """Encode the header extensions in QEMU's order, ending with the end marker."""
    extensions = b""
    if options.backing_fmt is not None:
        extensions += _extension(EXT_BACKING_FORMAT, options.backing_fmt.encode())
    if options.data_file is not None:
        extensions += _extension(EXT_DATA_FILE, os.fsencode(options.data_file))
    if options.version >= 3 and options.cluster_size >= FEATURE_TABLE_MIN_CLUSTER_SIZE:
        extensions += _extension(EXT_FEATURE_NAME_TABLE, _feature_name_table())
    return extensions + _extension(EXT_END, b"")


def _extension(kind: int, data: bytes) -> bytes:
    padding = -len(data) % 8
    return struct.pack(">II", kind, len(data)) + data + bytes(padding)


def _feature_name_table() -> bytes:
    entries = b""
    for (kind, bit), name in KNOWN_FEATURE_NAMES.items():
        encoded = name.encode()
        entries += bytes([kind, bit]) + encoded + bytes(FEATURE_NAME_ENTRY_SIZE - 2 - len(encoded))
    return entries


def _write_refcount_table(fd: int, layout: Qcow2Layout) -> None:
    first = layout.offset(layout.refcount_block_cluster)
    offsets = range(first, first + layout.refcount_blocks * layout.cluster_size,
                    layout.cluster_size)
    _pwrite_all(fd, encode_table(array("Q", offsets)),
                layout.offset(layout.refcount_table_cluster))


def _write_refcount_blocks(fd: int, layout: Qcow2Layout, refcount_bits: int) -> None:
    # Only the refcounts of allocated clusters are written, because the rest of each
    # block is already zero in the freshly truncated file.
    refcounts_per_block = layout.cluster_size * 8 // refcount_bits
    full_block = encode_refcounts_of_one(refcounts_per_block, refcount_bits)
    for index in range(layout.refcount_blocks):
        count = min(refcounts_per_block, layout.allocated_clusters - index * refcounts_per_block)
        if count == refcounts_per_block:
            block = full_block
        else:
            block = encode_refcounts_of_one(count, refcount_bits)
        _pwrite_all(fd, block, layout.offset(layout.refcount_block_cluster + index))


def encode_refcounts_of_one(count: int, refcount_bits: int) -> bytes:
    """Encode the start of a refcount block whose first `count` refcounts are 1.

    The result stops after the byte that contains the last of them. Refcounts narrower
    than a byte are packed from the least significant bit, as the specification orders
    them, and wider ones are big-endian.
    """
    if refcount_bits >= 8:
        return (1).to_bytes(refcount_bits // 8, "big") * count

    per_byte = 8 // refcount_bits
    full_bytes, remainder = divmod(count, per_byte)
    ones = [1 << (index * refcount_bits) for index in range(per_byte)]
    encoded = bytes([sum(ones)]) * full_bytes
    if remainder:
        encoded += bytes([sum(ones[:remainder])])
    return encoded


def _write_l1_table(fd: int, layout: Qcow2Layout) -> None:
    offset = layout.offset(layout.l1_cluster)
    first_l2 = QCOW_OFLAG_COPIED + layout.offset(layout.l2_cluster)
    entries_per_write = TABLE_WRITE_BYTES // L1_ENTRY_SIZE
    for start in range(0, layout.l1_size, entries_per_write):
        stop = min(start + entries_per_write, layout.l1_size)
        entries = range(first_l2 + start * layout.cluster_size,
                        first_l2 + stop * layout.cluster_size, layout.cluster_size)
        _pwrite_all(fd, encode_table(array("Q", entries)), offset + start * L1_ENTRY_SIZE)


def _write_l2_tables(fd: int, options: Qcow2CreateOptions, layout: Qcow2Layout) -> None:
    """Map every guest cluster, in order, to the contiguous data area.

    With an external data file each guest cluster maps to the same offset there, which
    the specification requires. The entries carry QCOW_OFLAG_COPIED because every
    refcount is 1. With extended L2 entries all subclusters stay unallocated, as in
    images that qemu-img 7.2 preallocates.
    """
    if options.data_file is None:
        data_start = layout.offset(layout.data_cluster)
    else:
        data_start = 0
    for first_table, tables in _table_batches(layout):
        first_guest = first_table * layout.l2_entries
        last_guest = min((first_table + tables) * layout.l2_entries, layout.guest_clusters)
        host = QCOW_OFLAG_COPIED + data_start
        entries = array("Q", range(host + first_guest * layout.cluster_size,
                                   host + last_guest * layout.cluster_size,
                                   layout.cluster_size))
        unused = tables * layout.l2_entries - len(entries)
        entries.extend(array("Q", bytes(8 * unused)))
        if options.extended_l2:
            # Each extended entry is the standard entry followed by a zero bitmap.
            interleaved = array("Q", bytes(16 * len(entries)))
            interleaved[0::2] = entries
            entries = interleaved
        _pwrite_all(fd, encode_table(entries), layout.offset(layout.l2_cluster + first_table))


def _table_batches(layout: Qcow2Layout) -> Iterator[Tuple[int, int]]:
    """Yield (first L2 table, table count) pairs, each about TABLE_WRITE_BYTES long."""
    per_batch = max(1, TABLE_WRITE_BYTES // layout.cluster_size)
    for first in range(0, layout.l2_tables, per_batch):
        yield first, min(per_batch, layout.l2_tables - first)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _div_round_up(value: int, divisor: int) -> int:
    return -(-value // divisor)
