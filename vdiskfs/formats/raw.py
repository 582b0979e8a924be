"""The raw format: the file or block device is the disk, byte for byte.

A raw image opened without --format (probed) rejects writes that would make its first
sector probe as another format, as QEMU does. Otherwise a guest could plant a qcow2 header
that names a host file as its backing file, and the next probing open would read it.
"""

from __future__ import annotations

import os
import stat
from typing import Iterator

from vdiskfs.driver import Driver, Run, RunKind
from vdiskfs.errors import FormatChangeError, ReadOnlyError, UnsupportedFeatureError
from vdiskfs.hostfile import file_size, open_host_file, pread_exact
from vdiskfs.readplan import ReadPlan

# Bytes at the start of a file that format probing reads.
PROBE_LENGTH = 512


class RawDriver(Driver):
    format_name = "raw"

    def __init__(self, filename: str, fd: int, read_only: bool) -> None:
        self.filename = filename
        self.fd = fd
        self.read_only = read_only
        self.virtual_size = file_size(fd)

    @classmethod
    def probe(cls, head: bytes, filename: str) -> int:
        # Any file is a raw disk, so raw wins only when no other format claims the file.
        return 1

    @classmethod
    def open(cls, filename: str, *, read_only: bool, cache_size: int = 0) -> "RawDriver":
        return cls(filename, open_host_file(filename, read_only), read_only)

    def map_range(self, offset: int, length: int) -> Iterator[Run]:
        yield Run(offset, length, RunKind.DATA, host_offset=offset)

    def plan_data(self, run: Run, plan: ReadPlan, start: int, end: int) -> None:
        # When the file shrank under us, what is gone reads as zeros.
        plan.host_read(self.fd, run.host_offset, start, end)

    def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        if self.format_probed and offset < PROBE_LENGTH:
            self._check_format_kept(offset, data)
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view = view[done:]
            offset += done

    def _check_format_kept(self, offset: int, data: bytes) -> None:
        """Raise FormatChangeError when the write would make the file probe as another format."""
        # Imported here because the registry imports this module.
        from vdiskfs.registry import format_of_head

        head = bytearray(pread_exact(self.fd, PROBE_LENGTH, 0))
        end = min(PROBE_LENGTH, offset + len(data))
        head[offset:end] = bytes(data[:end - offset])
        probed = format_of_head(bytes(head), self.filename)
        if probed != self.format_name:
            raise FormatChangeError(
                f"write at offset {offset} to {self.filename} rejected: the image's format was "
                f"probed as raw and the write would make it probe as {probed}; mount with "
                f"--format raw to allow such writes")

    def resize(self, new_size: int) -> None:
        """Grow a regular file; shrinking is rejected because it would discard guest data."""
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        if new_size < self.virtual_size:
            raise UnsupportedFeatureError(
                f"shrinking {self.filename} from {self.virtual_size} to {new_size} bytes is not "
                f"supported, because it would discard guest data")
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            raise UnsupportedFeatureError(f"{self.filename} is not a regular file and cannot grow")
        os.ftruncate(self.fd, new_size)
        self.virtual_size = new_size

    def flush(self) -> None:
        if not self.read_only:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            self.flush()
            os.close(self.fd)
            self.fd = -1
        super().close()
