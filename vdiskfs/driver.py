"""The format driver interface that every image format implements.

The FUSE layer and the CLI talk only to this interface. A driver turns a guest range into
runs with map_range(); the generic read path (plan_into) turns those runs into a ReadPlan,
and the write, discard and map commands consume the same runs.

Concurrency rule: drivers are synchronous and not thread-safe. The FUSE layer calls them from
the trio thread only. The one exception is ReadPlan.run(), which may run in worker threads
while the trio thread goes on, and so only reads host files (see vdiskfs.readplan).
"""

from __future__ import annotations

import abc
import enum
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from vdiskfs.errors import ReadOnlyError
from vdiskfs.locking import ImageLock
from vdiskfs.readplan import ReadPlan


class RunKind(enum.Enum):
    """State of a guest range in one layer of a backing chain."""

    UNALLOCATED = "unallocated"  # reads from the backing file, or zeros without one
    ZERO = "zero"  # reads as zeros and hides the backing file
    DATA = "data"  # stored uncompressed at host_offset in the layer's data file
    COMPRESSED = "compressed"  # part of a compressed cluster


@dataclass(frozen=True)
class Run:
    """A guest range of one layer whose bytes all come from the same place.

    For DATA, host_offset is the byte offset of guest_offset in the data file. For
    COMPRESSED, host_offset and compressed_length locate the compressed cluster, and
    cluster_offset is the guest offset at which that cluster starts. A ZERO or UNALLOCATED
    run of a qcow2 cluster that keeps its host cluster has host_allocated set, and
    host_offset is then where guest_offset lies in that cluster.
    """

    guest_offset: int
    length: int
    kind: RunKind
    host_offset: int = 0
    compressed_length: int = 0
    cluster_offset: int = 0
    host_allocated: bool = False

    @property
    def end(self) -> int:
        return self.guest_offset + self.length


class Driver(abc.ABC):
    """An open image of one format: one layer of a backing chain.

    Subclasses set filename, virtual_size and read_only in open(), and may set
    backing_filename and backing_format; open_chain() then opens the backing file and
    hands it to attach_backing().
    """

    format_name: str = ""

    filename: str
    virtual_size: int
    read_only: bool
    backing: Optional["Driver"] = None
    backing_filename: Optional[str] = None
    backing_format: Optional[str] = None
    # Set by the registry when the format was probed instead of given by the user.
    format_probed: bool = False
    # QEMU-compatible locks on the image file, set by registry.open_image().
    image_lock: Optional[ImageLock] = None

    @classmethod
    @abc.abstractmethod
    def probe(cls, head: bytes, filename: str) -> int:
        """Score from 0 to 100 for how surely `head` (the first 512 bytes) is this format."""

    @classmethod
    @abc.abstractmethod
    def open(cls, filename: str, *, read_only: bool, cache_size: int) -> "Driver":
        """Open and validate `filename`; raise a VdiskError that names the bad field on failure."""

    @abc.abstractmethod
    def map_range(self, offset: int, length: int) -> Iterator[Run]:
        """Yield runs that cover [offset, offset + length) of this layer, in guest order.

        The range must lie inside the virtual size. Raises CorruptImageError on damaged
        metadata.
        """

    @abc.abstractmethod
    def plan_data(self, run: Run, plan: ReadPlan, start: int, end: int) -> None:
        """Add the steps that read a DATA or COMPRESSED run into the plan's [start, end).

        The steps may run in a worker thread, so they may touch only host files and state
        that is locked.
        """

    def attach_backing(self, backing: "Driver") -> None:
        self.backing = backing

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Return up to `length` bytes from guest `offset`, short at the end of the disk."""
        plan = self.plan_read(offset, length)
        plan.run_here()
        # pyfuse3 accepts any bytes-like object, so the buffer goes out without a copy.
        return plan.result

    def plan_read(self, offset: int, length: int) -> ReadPlan:
        """Return a plan for up to `length` bytes from guest `offset`, short at the end."""
        if offset >= self.virtual_size or length <= 0:
            return ReadPlan.for_length(0)
        length = min(length, self.virtual_size - offset)
        plan = ReadPlan.for_length(length)
        self.plan_into(offset, length, plan, 0)
        return plan

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill `view` with guest data from `offset`; the range must lie inside the disk."""
        plan = ReadPlan(view, zeroed=False)
        self.plan_into(offset, len(view), plan, 0)
        plan.run_here()

    def plan_into(self, offset: int, length: int, plan: ReadPlan, start: int) -> None:
        """Plan guest [offset, offset + length) into the plan's result from index `start`."""
        for run in self.map_range(offset, length):
            begin = start + run.guest_offset - offset
            end = begin + run.length
            if run.kind is RunKind.DATA or run.kind is RunKind.COMPRESSED:
                self.plan_data(run, plan, begin, end)
            elif run.kind is RunKind.UNALLOCATED and self.backing is not None:
                self.plan_backing(run.guest_offset, run.length, plan, begin)
            else:
                plan.zeros(begin, end)

    def plan_backing(self, offset: int, length: int, plan: ReadPlan, start: int) -> None:
        """Plan a range from the backing file; what lies past its end reads as zeros."""
        backing = self.backing
        covered = max(0, min(length, backing.virtual_size - offset))
        if covered:
            backing.plan_into(offset, covered, plan, start)
        if covered < length:
            plan.zeros(start + covered, start + length)

    def write(self, offset: int, data: bytes) -> None:
        """Write `data` at guest `offset`; the range must lie inside the disk."""
        raise ReadOnlyError(f"{self.filename}: the {self.format_name} driver cannot write")

    def discard(self, offset: int, length: int) -> None:
        """Release [offset, offset + length); later reads return zeros or backing data."""
        raise ReadOnlyError(f"{self.filename}: the {self.format_name} driver cannot discard")

    def resize(self, new_size: int) -> None:
        """Change the virtual size."""
        raise ReadOnlyError(f"{self.filename}: the {self.format_name} driver cannot resize")

    def flush(self) -> None:
        """Make every completed write durable, in this layer and its data file."""

    def close(self) -> None:
        """Flush and release this layer and every backing layer below it.

        Subclasses close their files first and then call this, so the image lock is
        released only after the last write.
        """
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self.image_lock is not None:
            self.image_lock.release()
            self.image_lock = None

    def allocated_size(self) -> int:
        """Bytes the image file occupies on disk (st_blocks * 512)."""
        return os.stat(self.filename).st_blocks * 512

    def describe(self) -> dict:
        """Fields for `vdiskfs info`, keyed as `qemu-img info --output=json` keys them."""
        info = {
            "filename": self.filename,
            "format": self.format_name,
            "virtual-size": self.virtual_size,
            "actual-size": self.allocated_size(),
        }
        if self.backing_filename is not None:
            info["backing-filename"] = self.backing_filename
            if self.backing is not None:
                info["full-backing-filename"] = self.backing.filename
            if self.backing_format is not None:
                info["backing-filename-format"] = self.backing_format
        return info
