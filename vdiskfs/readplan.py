"""Read plans: the host reads that fill one guest range, apart from the metadata lookups.

A read runs in two steps. Planning (Driver.plan_into) walks the image's metadata, which only
the thread that owns the driver may touch, and records which host bytes land where in the
result. Running the plan only reads host files and decompresses clusters, so the FUSE layer
can run it in a worker thread while the trio thread serves other requests. A plan never
changes image state, and it stays valid only while nothing frees or moves the clusters it
reads (see concurrency.ReadGate).
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Union

# Linux-only (preadv2 since 4.14): fail with EAGAIN instead of waiting for the disk. It is 0
# where Python does not provide it, and run_cached() then reads nothing.
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class _HostRead:
    """Copy host bytes [offset, offset + end - start) of fd into the result's [start, end)."""

    __slots__ = ("fd", "offset", "start", "end")

    def __init__(self, fd: int, offset: int, start: int, end: int) -> None:
        self.fd = fd
        self.offset = offset
        self.start = start
        self.end = end


class _Call:
    """Call function(view) on the result's [start, end), and pass its error to `failed`."""

    __slots__ = ("function", "start", "end", "failed")

    def __init__(self, function: Callable[[memoryview], None], start: int, end: int,
                 failed: Optional[Callable[[Exception], None]]) -> None:
        self.function = function
        self.start = start
        self.end = end
        self.failed = failed


class ReadPlan:
    """The steps that fill `view` with guest data, in any order and from any thread.

    With `zeroed`, the view contains only zeros already, so ranges that read as zeros and bytes
    past the end of a host file need no work.
    """

    def __init__(self, view: memoryview, zeroed: bool) -> None:
        self.view = view
        self.zeroed = zeroed
        self._steps: List[Union[_HostRead, _Call]] = []
        self._failed_step: Optional[_Call] = None

    @classmethod
    def for_length(cls, length: int) -> "ReadPlan":
        """Return a plan whose result is a new zero-filled bytearray of `length` bytes."""
        return cls(memoryview(bytearray(length)), zeroed=True)

    @property
    def result(self) -> bytearray:
        """The buffer that the plan fills (for plans made by for_length)."""
        return self.view.obj

    @property
    def has_calls(self) -> bool:
        return any(type(step) is _Call for step in self._steps)

    @property
    def pending_bytes(self) -> int:
        """Bytes that the remaining steps fill."""
        return sum(step.end - step.start for step in self._steps)

    # Planning

    def zeros(self, start: int, end: int) -> None:
        if not self.zeroed:
            self.view[start:end] = bytes(end - start)

    def copy(self, start: int, data) -> None:
        """Copy `data`, which the planner already has in memory, to the result at `start`."""
        self.view[start:start + len(data)] = data

    def host_read(self, fd: int, offset: int, start: int, end: int) -> None:
        """Read host bytes from `offset` of `fd`, with zeros past the end of the file."""
        last = self._steps[-1] if self._steps else None
        if (type(last) is _HostRead and last.fd == fd and last.end == start
                and last.offset + (last.end - last.start) == offset):
            # Contiguous in the result and on the host: one pread instead of two.
            last.end = end
            return
        self._steps.append(_HostRead(fd, offset, start, end))

    def call(self, function: Callable[[memoryview], None], start: int, end: int,
             failed: Optional[Callable[[Exception], None]] = None) -> None:
        """Run `function` on the result's [start, end) when the plan runs.

        `function` must be safe to call from a worker thread. When it raises, report_failure()
        passes the error to `failed` in the planning thread.
        """
        self._steps.append(_Call(function, start, end, failed))

    # Running

    def run_cached(self) -> bool:
        """Do the host reads whose data is in the host page cache, without blocking.

        Returns True when the plan is complete. Steps that would wait for the disk, and all
        calls, are left for run().
        """
        if not RWF_NOWAIT:
            return not self._steps
        remaining = []
        for step in self._steps:
            if type(step) is not _HostRead:
                remaining.append(step)
                continue
            try:
                done = os.preadv(step.fd, [self.view[step.start:step.end]], step.offset,
                                 RWF_NOWAIT)
            except OSError:
                # EAGAIN: not cached. Other errors (EOPNOTSUPP on file systems without
                # RWF_NOWAIT, or a real failure) are left for run(), which reports them.
                remaining.append(step)
                continue
            if step.start + done < step.end:
                # Partly cached, or the end of the file: run() reads the rest or zero-fills it.
                step.start += done
                step.offset += done
                remaining.append(step)
        self._steps = remaining
        return not remaining

    def run(self) -> None:
        """Do every remaining step, waiting for the disk, in any thread."""
        steps, self._steps = self._steps, []
        for step in steps:
            if type(step) is _HostRead:
                self._read_fully(step)
                continue
            try:
                step.function(self.view[step.start:step.end])
            except Exception:
                self._failed_step = step
                raise

    def _read_fully(self, step: _HostRead) -> None:
        start, offset = step.start, step.offset
        while start < step.end:
            done = os.preadv(step.fd, [self.view[start:step.end]], offset)
            if done == 0:
                self.zeros(start, step.end)
                return
            start += done
            offset += done

    def report_failure(self, error: Exception) -> None:
        """Pass `error` from run() to the failing step's handler, in the planning thread."""
        step, self._failed_step = self._failed_step, None
        if step is not None and step.failed is not None:
            step.failed(error)

    def run_here(self) -> None:
        """Run the plan in the planning thread, for synchronous callers."""
        try:
            self.run()
        except Exception as error:
            self.report_failure(error)
            raise
