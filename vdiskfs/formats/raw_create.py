"""Creating raw images, and the new-file handling that every image creator shares.

As `qemu-img create` does, creating an image replaces a regular file of the same name.
new_image_file() writes the new file in place and removes it again if creation fails,
so a failed create leaves no half-written image behind.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Iterator

from vdiskfs.errors import UnsupportedFeatureError
from vdiskfs.formats.create_options import (
    MAX_IMAGE_SIZE, InvalidOptionError, OptionSpec, choice_parser, join_choices,
    parse_size_value)
from vdiskfs.progress import progress_bar

SECTOR_SIZE = 512  # qemu-img rounds image sizes up to whole sectors

PREALLOCATION_MODES = ("off", "falloc", "full")

# Bytes of zeros per write when preallocation=full fills a file.
ZERO_FILL_CHUNK = 1 << 20

RAW_OPTIONS = (
    OptionSpec("preallocation", "off (sparse file), falloc (reserve the blocks) or "
               "full (write zeros)", choice_parser(*PREALLOCATION_MODES)),
    OptionSpec("size", "virtual disk size in bytes, with an optional K, M, G or T suffix",
               parse_size_value),
)


def round_up_to_sector(size: int) -> int:
    return -(-size // SECTOR_SIZE) * SECTOR_SIZE


def validate_image_size(size: int) -> None:
    """Raise InvalidOptionError unless `size` is a byte count that qemu-img accepts."""
    if not 0 <= size <= MAX_IMAGE_SIZE - SECTOR_SIZE + 1:
        raise InvalidOptionError(
            f"invalid size {size}: must be from 0 to {MAX_IMAGE_SIZE - SECTOR_SIZE + 1} bytes")


def validate_preallocation(mode: str, modes: tuple = PREALLOCATION_MODES) -> None:
    if mode not in modes:
        raise InvalidOptionError(f"invalid preallocation {mode}: must be {join_choices(modes)}")


def create_raw(filename: str, size: int, preallocation: str = "off") -> None:
    """Create a raw image of `size` bytes, rounded up to a multiple of 512.

    preallocation "off" makes a sparse file, "falloc" reserves its blocks with
    posix_fallocate and "full" writes zeros. Raises InvalidOptionError before touching
    the file when an argument is invalid. Blocks until the data is durable (fsync).
    """
    validate_image_size(size)
    validate_preallocation(preallocation)
    size = round_up_to_sector(size)

    with new_image_file(filename) as fd:
        os.ftruncate(fd, size)
        preallocate(fd, 0, size, preallocation)


def preallocate(fd: int, offset: int, length: int, mode: str) -> None:
    """Reserve [offset, offset + length) of a file ("falloc") or write zeros there ("full").

    The modes "off" and "metadata" allocate nothing here.
    """
    if length <= 0:
        return
    if mode == "falloc":
        os.posix_fallocate(fd, offset, length)
    elif mode == "full":
        zeros = bytes(min(ZERO_FILL_CHUNK, length))
        end = offset + length
        with progress_bar(length, "preallocating") as bar:
            while offset < end:
                view = memoryview(zeros)[:end - offset]
                written = os.pwrite(fd, view, offset)
                offset += written
                bar.advance(written)


@contextlib.contextmanager
def new_image_file(filename: str) -> Iterator[int]:
    """Open `filename` empty for writing and yield its descriptor.

    An existing regular file of that name is truncated, as qemu-img does. When the body
    finishes, the file and its directory are fsynced. When the body raises (or is
    interrupted), the file is removed before the exception goes on.
    """
    _check_replaceable(filename)
    fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        yield fd
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(filename)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    _fsync_directory(os.path.dirname(filename) or ".")


def _check_replaceable(filename: str) -> None:
    try:
        mode = os.stat(filename).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        # NOTE: qemu-img also formats block devices. vdiskfs rejects them, because it
        # removes the file name when creation fails.
        raise UnsupportedFeatureError(
            f"{filename} exists and is not a regular file (vdiskfs creates images only "
            f"as regular files)")


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
