"""Decompression of qcow2 compressed clusters: deflate (type 0) and zstd (type 1)."""

from __future__ import annotations

import zlib

from vdiskfs.errors import CorruptImageError
from vdiskfs.formats.qcow2.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD

try:
    import zstandard
except ImportError:  # pragma: no cover - zstandard is a declared dependency
    zstandard = None


def decompress_cluster(data: bytes, compression_type: int, cluster_size: int) -> bytes:
    """Decompress one cluster from `data`, which may carry trailing bytes after the stream.

    Raises CorruptImageError when the stream is damaged or yields less than a cluster.
    """
    if compression_type == COMPRESSION_ZLIB:
        output = _inflate(data, cluster_size)
    elif compression_type == COMPRESSION_ZSTD:
        output = _zstd_decompress(data, cluster_size)
    else:
        raise CorruptImageError(f"unknown compression type {compression_type}")

    if len(output) < cluster_size:
        raise CorruptImageError(
            f"compressed cluster decompresses to {len(output)} bytes, expected {cluster_size}")
    return output[:cluster_size]


def _inflate(data: bytes, cluster_size: int) -> bytes:
    # QEMU writes a raw deflate stream (no zlib header); a 32 KiB window reads any window size.
    decompressor = zlib.decompressobj(-15)
    try:
        return decompressor.decompress(data, cluster_size)
    except zlib.error as error:
        raise CorruptImageError(f"invalid deflate data in a compressed cluster: {error}") from None


def _zstd_decompress(data: bytes, cluster_size: int) -> bytes:
    if zstandard is None:
        raise CorruptImageError("zstd compressed clusters need the zstandard package")
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        with reader:
            chunks = []
            remaining = cluster_size
            while remaining:
                chunk = reader.read(remaining)
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
        return b"".join(chunks)
    except zstandard.ZstdError as error:
        raise CorruptImageError(f"invalid zstd data in a compressed cluster: {error}") from None
