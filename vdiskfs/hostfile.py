"""Opening the host files that hold image data.

O_NOATIME exists only on Linux; elsewhere (FreeBSD) the flag is 0 and has no effect.
"""

import errno
import os

O_NOATIME = getattr(os, "O_NOATIME", 0)  # Linux-only


def open_host_file(path: str, read_only: bool) -> int:
    """Open `path` for pread/pwrite and return the descriptor.

    A read-only open also asks for O_NOATIME, so that reading evidence leaves its access
    time alone; the kernel allows that flag only to the file's owner and to root, so
    without that right the file is opened without it.
    """
    flags = os.O_CLOEXEC | (os.O_RDONLY if read_only else os.O_RDWR)
    if read_only and O_NOATIME:
        try:
            return os.open(path, flags | O_NOATIME)
        except PermissionError as error:
            if error.errno != errno.EPERM:
                raise
    return os.open(path, flags)


def file_size(fd: int) -> int:
    """Size in bytes of a regular file or block device."""
    return os.lseek(fd, 0, os.SEEK_END)


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Read `length` bytes at `offset`; bytes past the end of the file read as zeros."""
    data = os.pread(fd, length, offset)
    if len(data) < length:
        data += bytes(length - len(data))
    return data


def data_extents(fd: int, offset: int, length: int):
    """Yield (start, length, is_data) pieces of [offset, offset + length) of a file.

    Holes are found with lseek(SEEK_DATA/SEEK_HOLE), which Linux and FreeBSD provide. Where
    the platform or the file system cannot tell, the whole range is reported as data.
    """
    end = offset + length
    seek_data = getattr(os, "SEEK_DATA", None)
    seek_hole = getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        yield offset, length, True
        return

    position = offset
    while position < end:
        try:
            data_start = os.lseek(fd, position, seek_data)
        except OSError as error:
            if error.errno == errno.ENXIO:
                # No data after `position`: the rest of the file is a hole.
                yield position, end - position, False
                return
            if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield position, end - position, True
                return
            raise
        if data_start > position:
            hole_end = min(data_start, end)
            yield position, hole_end - position, False
            position = hole_end
            continue
        data_end = min(os.lseek(fd, position, seek_hole), end)
        yield position, data_end - position, True
        position = data_end
