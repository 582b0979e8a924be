"""The qcow2 image header and its header extensions: parsing and validation.

Field names follow the qcow2 specification (docs/interop/qcow2.txt in QEMU's repository).
Every check names the field and its value, so a malformed image fails at open with one
clear line instead of a huge allocation or an exception deep in the read path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from vdiskfs.errors import InvalidImageError, UnsupportedFeatureError

QCOW_MAGIC = b"QFI\xfb"

V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104  # the minimum; QEMU writes 112, with compression_type at byte 104

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's limit of 2 MiB clusters
MIN_EXTENDED_L2_CLUSTER_BITS = 14
MAX_REFCOUNT_ORDER = 6
MAX_BACKING_FILE_SIZE = 1023

# QEMU's implementation limits, which keep tables read at open time bounded.
MAX_L1_SIZE_BYTES = 32 * 1024 * 1024
MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)

# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0

# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

FEATURE_INCOMPATIBLE = 0
FEATURE_COMPATIBLE = 1
FEATURE_AUTOCLEAR = 2

# Names as QEMU writes them into the feature name table.
KNOWN_FEATURE_NAMES = {
    (FEATURE_INCOMPATIBLE, 0): "dirty bit",
    (FEATURE_INCOMPATIBLE, 1): "corrupt bit",
    (FEATURE_INCOMPATIBLE, 2): "external data file",
    (FEATURE_INCOMPATIBLE, 3): "compression type",
    (FEATURE_INCOMPATIBLE, 4): "extended L2 entries",
    (FEATURE_COMPATIBLE, 0): "lazy refcounts",
    (FEATURE_AUTOCLEAR, 0): "bitmaps",
    (FEATURE_AUTOCLEAR, 1): "raw external data",
}

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE = 0
CRYPT_NAMES = {1: "AES", 2: "LUKS"}

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAME_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

FEATURE_NAME_ENTRY_SIZE = 48

_V2_FIELDS = struct.Struct(">4sIQIIQIIQQIIQ")
_V3_FIELDS = struct.Struct(">QQQII")


@dataclass
class Qcow2Header:
    """The fields of a qcow2 header, with the header extensions it carries."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB

    backing_filename: Optional[str] = None
    backing_format: Optional[str] = None
    data_file: Optional[str] = None
    feature_names: Dict[Tuple[int, int], str] = field(default_factory=dict)
    # Extensions vdiskfs does not interpret, kept so that a header rewrite preserves them.
    unknown_extensions: List[Tuple[int, bytes]] = field(default_factory=list)
    has_bitmaps_extension: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def feature_name(self, kind: int, bit: int) -> Optional[str]:
        """Name of a feature bit from the image's own feature name table, else the standard name."""
        return self.feature_names.get((kind, bit)) or KNOWN_FEATURE_NAMES.get((kind, bit))


def parse_header(cluster: bytes, file_size: int) -> Qcow2Header:
    """Parse and validate the header in `cluster`, the first bytes of the image file.

    `cluster` must hold the whole first cluster, or the whole file when it is shorter.
    Raises InvalidImageError or UnsupportedFeatureError naming the field and its value.
    """
    if len(cluster) < V2_HEADER_LENGTH:
        raise InvalidImageError(
            f"invalid qcow2 header: the file is {file_size} bytes, shorter than a header")

    (magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
     crypt_method, l1_size, l1_table_offset, refcount_table_offset,
     refcount_table_clusters, nb_snapshots, snapshots_offset) = _V2_FIELDS.unpack_from(cluster)

    if magic != QCOW_MAGIC:
        raise InvalidImageError(f"invalid qcow2 header: bad magic {magic!r}")
    if version not in (2, 3):
        raise UnsupportedFeatureError(f"qcow2 version {version} is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise InvalidImageError(
            f"invalid qcow2 header: cluster_bits {cluster_bits} is outside "
            f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")

    header = Qcow2Header(
        version=version, backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size, cluster_bits=cluster_bits, size=size,
        crypt_method=crypt_method, l1_size=l1_size, l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters, nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset)

    if version >= 3:
        _parse_v3_fields(header, cluster)

    _validate_features(header)
    _validate_tables(header, file_size)

    extensions_end = header.cluster_size
    if header.backing_file_offset:
        extensions_end = min(extensions_end, header.backing_file_offset)
    _parse_extensions(header, cluster, header.header_length, extensions_end)
    _check_unknown_incompatible(header)

    if header.backing_file_offset:
        header.backing_filename = _read_backing_filename(header, cluster)
    if header.incompatible_features & INCOMPAT_DATA_FILE and header.data_file is None:
        raise UnsupportedFeatureError(
            "the image uses an external data file but its header names none")
    return header


def _parse_v3_fields(header: Qcow2Header, cluster: bytes) -> None:
    if len(cluster) < V3_HEADER_LENGTH:
        raise InvalidImageError("invalid qcow2 header: the file ends inside the version 3 header")
    (header.incompatible_features, header.compatible_features, header.autoclear_features,
     header.refcount_order, header.header_length) = _V3_FIELDS.unpack_from(cluster, V2_HEADER_LENGTH)

    if header.header_length < V3_HEADER_LENGTH:
        raise InvalidImageError(
            f"invalid qcow2 header: header_length {header.header_length} is below {V3_HEADER_LENGTH}")
    if header.header_length > header.cluster_size:
        raise InvalidImageError(
            f"invalid qcow2 header: header_length {header.header_length} is larger than "
            f"the cluster size {header.cluster_size}")
    if header.header_length > len(cluster):
        raise InvalidImageError(
            f"invalid qcow2 header: header_length {header.header_length} runs past the end of the file")
    if header.refcount_order > MAX_REFCOUNT_ORDER:
        raise InvalidImageError(
            f"invalid qcow2 header: refcount_order {header.refcount_order} is above {MAX_REFCOUNT_ORDER}")
    if header.header_length > 104:
        header.compression_type = cluster[104]


def _validate_features(header: Qcow2Header) -> None:
    if header.crypt_method != CRYPT_NONE:
        name = CRYPT_NAMES.get(header.crypt_method)
        if name is None:
            raise InvalidImageError(
                f"invalid qcow2 header: crypt_method {header.crypt_method} is unknown")
        raise UnsupportedFeatureError(
            f"encrypted images are not supported (crypt_method {header.crypt_method}, {name})")

    compression_bit = bool(header.incompatible_features & INCOMPAT_COMPRESSION)
    if compression_bit and header.compression_type == COMPRESSION_ZLIB:
        raise InvalidImageError(
            "invalid qcow2 header: the compression type bit is set but compression_type is 0 (zlib)")
    if not compression_bit and header.compression_type != COMPRESSION_ZLIB:
        raise InvalidImageError(
            f"invalid qcow2 header: compression_type {header.compression_type} needs "
            f"the compression type incompatible bit")
    if header.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFeatureError(
            f"compression_type {header.compression_type} is not supported (0 zlib, 1 zstd)")

    if header.extended_l2 and header.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise InvalidImageError(
            f"invalid qcow2 header: extended L2 entries need clusters of at least "
            f"{1 << MIN_EXTENDED_L2_CLUSTER_BITS} bytes, not {header.cluster_size}")


def _check_unknown_incompatible(header: Qcow2Header) -> None:
    unknown = header.incompatible_features & ~INCOMPAT_KNOWN
    if not unknown:
        return
    descriptions = []
    for bit in range(64):
        if unknown & (1 << bit):
            name = header.feature_names.get((FEATURE_INCOMPATIBLE, bit))
            descriptions.append(f"bit {bit} ({name})" if name else f"bit {bit}")
    raise UnsupportedFeatureError(
        f"unsupported incompatible feature {', '.join(descriptions)}")


def _check_table(name: str, offset: int, length: int, header: Qcow2Header, file_size: int) -> None:
    if offset % header.cluster_size:
        raise InvalidImageError(
            f"invalid qcow2 header: {name} offset {offset:#x} is not aligned to a cluster")
    if length and offset == 0:
        raise InvalidImageError(f"invalid qcow2 header: {name} offset 0 overlaps the header")
    if offset + length > file_size:
        raise InvalidImageError(
            f"invalid qcow2 header: {name} at {offset:#x} ({length} bytes) runs past the end "
            f"of the file ({file_size} bytes)")


def _validate_tables(header: Qcow2Header, file_size: int) -> None:
    cluster_size = header.cluster_size
    entry_size = 16 if header.extended_l2 else 8
    l2_entries = cluster_size // entry_size

    l1_bytes = header.l1_size * 8
    if l1_bytes > MAX_L1_SIZE_BYTES:
        raise InvalidImageError(
            f"invalid qcow2 header: l1_size {header.l1_size} is above the limit of "
            f"{MAX_L1_SIZE_BYTES // 8} entries")
    bytes_per_l1_entry = cluster_size * l2_entries
    needed = -(-header.size // bytes_per_l1_entry)
    if header.l1_size < needed:
        raise InvalidImageError(
            f"invalid qcow2 header: l1_size {header.l1_size} is too small for the virtual size "
            f"{header.size} (needs {needed})")
    _check_table("L1 table", header.l1_table_offset, l1_bytes, header, file_size)

    refcount_bytes = header.refcount_table_clusters * cluster_size
    if refcount_bytes > MAX_REFCOUNT_TABLE_BYTES:
        raise InvalidImageError(
            f"invalid qcow2 header: refcount_table_clusters {header.refcount_table_clusters} "
            f"is above the limit of {MAX_REFCOUNT_TABLE_BYTES // cluster_size}")
    if header.refcount_table_clusters == 0:
        raise InvalidImageError("invalid qcow2 header: refcount_table_clusters is 0")
    _check_table("refcount table", header.refcount_table_offset, refcount_bytes, header, file_size)

    if header.nb_snapshots > MAX_SNAPSHOTS:
        raise InvalidImageError(
            f"invalid qcow2 header: nb_snapshots {header.nb_snapshots} is above {MAX_SNAPSHOTS}")
    if header.nb_snapshots:
        # Each snapshot table entry takes at least 40 bytes.
        _check_table("snapshot table", header.snapshots_offset, header.nb_snapshots * 40,
                     header, file_size)
    _check_overlaps(header, [
        ("L1 table", header.l1_table_offset, l1_bytes),
        ("refcount table", header.refcount_table_offset, refcount_bytes),
        ("snapshot table", header.snapshots_offset, header.nb_snapshots * 40),
    ])


def _check_overlaps(header: Qcow2Header, tables: List[Tuple[str, int, int]]) -> None:
    """Reject tables that share a cluster; QEMU gives each table clusters of its own."""
    used = [(name, offset, length) for name, offset, length in tables if length]
    bits = header.cluster_bits
    for position, (name, offset, length) in enumerate(used):
        for other_name, other_offset, other_length in used[position + 1:]:
            first, last = offset >> bits, (offset + length - 1) >> bits
            other_first, other_last = other_offset >> bits, (other_offset + other_length - 1) >> bits
            if first <= other_last and other_first <= last:
                raise InvalidImageError(
                    f"invalid qcow2 header: the {name} at {offset:#x} ({length} bytes) overlaps "
                    f"the {other_name} at {other_offset:#x} ({other_length} bytes)")


def _parse_extensions(header: Qcow2Header, cluster: bytes, start: int, end: int) -> None:
    offset = start
    seen = set()
    while offset + 8 <= end:
        kind, length = struct.unpack_from(">II", cluster, offset)
        if kind == EXT_END:
            return
        data_start = offset + 8
        if data_start + length > end:
            raise InvalidImageError(
                f"invalid qcow2 header: header extension {kind:#010x} at {offset} with length "
                f"{length} runs past the header area ({end} bytes)")
        data = bytes(cluster[data_start:data_start + length])
        offset = data_start + ((length + 7) & ~7)

        if kind in seen and kind != EXT_FEATURE_NAME_TABLE:
            raise InvalidImageError(
                f"invalid qcow2 header: header extension {kind:#010x} appears twice")
        seen.add(kind)

        if kind == EXT_BACKING_FORMAT:
            header.backing_format = _decode_name(data, "backing file format")
        elif kind == EXT_DATA_FILE:
            header.data_file = _decode_name(data, "external data file name")
        elif kind == EXT_FEATURE_NAME_TABLE:
            _parse_feature_names(header, data)
        elif kind == EXT_BITMAPS:
            header.has_bitmaps_extension = True
            header.unknown_extensions.append((kind, data))
        else:
            header.unknown_extensions.append((kind, data))


def _parse_feature_names(header: Qcow2Header, data: bytes) -> None:
    for start in range(0, len(data) - FEATURE_NAME_ENTRY_SIZE + 1, FEATURE_NAME_ENTRY_SIZE):
        kind, bit = data[start], data[start + 1]
        raw_name = data[start + 2:start + FEATURE_NAME_ENTRY_SIZE].split(b"\0", 1)[0]
        header.feature_names[(kind, bit)] = raw_name.decode("utf-8", "replace")


def _decode_name(data: bytes, what: str) -> str:
    if b"\0" in data:
        # No file or format name contains a NUL byte, and os functions reject one.
        raise InvalidImageError(f"invalid qcow2 header: the {what} contains a NUL byte")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidImageError(f"invalid qcow2 header: the {what} is not valid UTF-8") from None


def _read_backing_filename(header: Qcow2Header, cluster: bytes) -> str:
    offset, size = header.backing_file_offset, header.backing_file_size
    if size > MAX_BACKING_FILE_SIZE:
        raise InvalidImageError(
            f"invalid qcow2 header: backing_file_size {size} is longer than "
            f"{MAX_BACKING_FILE_SIZE} bytes")
    if size == 0:
        raise InvalidImageError("invalid qcow2 header: backing_file_offset is set but backing_file_size is 0")
    if offset + size > min(header.cluster_size, len(cluster)):
        raise InvalidImageError(
            f"invalid qcow2 header: the backing file name at {offset}..{offset + size} "
            f"lies outside the first cluster ({header.cluster_size} bytes)")
    return _decode_name(bytes(cluster[offset:offset + size]), "backing file name")
