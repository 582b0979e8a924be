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
