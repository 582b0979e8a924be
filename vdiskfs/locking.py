"""Image locks that QEMU understands: byte-range OFD locks at QEMU's fixed offsets.

QEMU's file-posix driver (block/file-posix.c, raw_apply_lock_bytes and
raw_check_lock_bytes in QEMU 7.2) describes each open image with shared (F_RDLCK)
open-file-description locks on single bytes:
- byte 100 + bit for each permission the opener holds;
- byte 200 + bit for each permission the opener does not let others hold.
The bits are those of BLK_PERM_* in QEMU's include/block/block-common.h: consistent read
(0), write (1), write unchanged (2) and resize (3). An opener first takes its bytes, then
tests with F_OFD_GETLK whether another open file description holds byte 200 + bit for
a permission it wants, or byte 100 + bit for a permission it does not share.

vdiskfs takes the locks on a descriptor of its own (ImageLock), which the driver keeps
until it is closed. Open-file-description locks belong to the open file, not to the
process, so a daemon that forks after opening the image keeps them. POSIX record locks
(F_SETLK) would not be inherited by the child, and flock() does not conflict with QEMU.

Linux-only: F_OFD_SETLK and F_OFD_GETLK exist on Linux 3.15 and later. Elsewhere
(FreeBSD) acquire_image_lock() takes no lock and logs that once at debug level.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

from vdiskfs.errors import ImageLockedError
from vdiskfs.hostfile import open_host_file

log = logging.getLogger(__name__)

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

PERM_CONSISTENT_READ = 1 << 0
PERM_WRITE = 1 << 1
PERM_WRITE_UNCHANGED = 1 << 2
PERM_RESIZE = 1 << 3
PERM_ALL = PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE
PERM_BITS = 4

PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}

# Permissions that only a writer holds.
WRITER_PERMS = PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", None)  # Linux-only
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)  # Linux-only

# struct flock on Linux with a 64-bit off_t: l_type, l_whence, l_start, l_len, l_pid.
FLOCK_FORMAT = "hhqqi4x"


@dataclass(frozen=True)
class LockMode:
    """The permissions an opener holds (perm) and lets others hold (shared), as QEMU bits."""

    perm: int
    shared: int


# Locks of a qcow2 image opened read-write by QEMU 7.2 (qemu-io IMAGE), as /proc/locks
# shows them: bytes 100, 101, 103, 201 and 203.
WRITABLE = LockMode(perm=PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
                    shared=PERM_ALL & ~(PERM_WRITE | PERM_RESIZE))

# Locks of `qemu-io -r` and `qemu-img info`: bytes 100, 201 and 203. Readers share with
# each other, and no one can write while they read.
READ_ONLY = LockMode(perm=PERM_CONSISTENT_READ, shared=PERM_ALL & ~(PERM_WRITE | PERM_RESIZE))

# Locks of `qemu-img -U` (--force-share): byte 100 only, sharing everything.
FORCE_SHARE = LockMode(perm=PERM_CONSISTENT_READ, shared=PERM_ALL)


def lock_mode(read_only: bool, force_share: bool = False) -> LockMode:
    """Return the lock mode of an image opened read-only or read-write."""
    if not read_only:
        return WRITABLE
    return FORCE_SHARE if force_share else READ_ONLY


class ImageLock:
    """QEMU-compatible locks on one image file, held on a descriptor of their own."""

    def __init__(self, path: str, fd: int, mode: LockMode) -> None:
        self.path = path
        self.fd = fd
        self.mode = mode

    def release(self) -> None:
        """Drop the locks by closing the descriptor that holds them."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def acquire_image_lock(path: str, mode: LockMode) -> Optional[ImageLock]:
    """Take the locks of `mode` on `path`; raise ImageLockedError when another open conflicts.

    Returns None where the platform has no OFD locks.
    """
    if F_OFD_SETLK is None or F_OFD_GETLK is None:
        log.debug("%s: no open-file-description locks on this platform, so the image is "
                  "not locked", path)
        return None

    fd = open_host_file(path, read_only=True)
    try:
        _apply(fd, mode)
        conflict = _find_conflict(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    if conflict is not None:
        os.close(fd)
        raise ImageLockedError(_describe_conflict(path, conflict))
    return ImageLock(path, fd, mode)


def find_writer(path: str) -> Optional[str]:
    """Return a description of another process that holds `path` for writing, or None."""
    if F_OFD_GETLK is None:
        return None
    fd = open_host_file(path, read_only=True)
    try:
        for bit in _bits(WRITER_PERMS):
            if _held_by_other(fd, LOCK_PERM_BASE + _index(bit)):
                return _holder(path, LOCK_PERM_BASE + _index(bit))
    finally:
        os.close(fd)
    return None


def _apply(fd: int, mode: LockMode) -> None:
    for bit in _bits(mode.perm):
        _lock_byte(fd, LOCK_PERM_BASE + _index(bit))
    for bit in _bits(PERM_ALL & ~mode.shared):
        _lock_byte(fd, LOCK_SHARED_BASE + _index(bit))


def _find_conflict(fd: int, mode: LockMode) -> Optional[int]:
    """Return the first lock byte that another open file holds against `mode`, or None.

    QEMU tests the same bytes. The bytes of permissions held by others come first here, so
    that a conflict with a writer is reported as such.
    """
    for bit in _bits(PERM_ALL & ~mode.shared):
        offset = LOCK_PERM_BASE + _index(bit)
        if _held_by_other(fd, offset):
            return offset
    for bit in _bits(mode.perm):
        offset = LOCK_SHARED_BASE + _index(bit)
        if _held_by_other(fd, offset):
            return offset
    return None


def _describe_conflict(path: str, offset: int) -> str:
    holder = _holder(path, offset)
    name = PERM_NAMES[1 << (offset % 100)]
    if offset >= LOCK_SHARED_BASE:
        if offset == LOCK_SHARED_BASE:
            return f"the image is in use by {holder}, which does not share reading"
        return f"the image is open by {holder}, which does not share the {name} permission"
    if (1 << (offset - LOCK_PERM_BASE)) & WRITER_PERMS:
        return f"the image is locked for writing by {holder}"
    return f"the image is locked for {name} by {holder}"


def _holder(path: str, offset: int) -> str:
    pid = find_lock_owner(path, offset)
    if pid is None:
        return "another process"
    return f"another process (pid {pid})"


def _lock_byte(fd: int, offset: int) -> None:
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, struct.pack(FLOCK_FORMAT, fcntl.F_RDLCK, os.SEEK_SET,
                                                 offset, 1, 0))
    except OSError as error:
        # Another open file holds an exclusive lock on the byte, which QEMU never does.
        raise ImageLockedError(f"cannot lock byte {offset}: {error.strerror}") from None


def _held_by_other(fd: int, offset: int) -> bool:
    """Return whether another open file description holds a lock on byte `offset`."""
    request = struct.pack(FLOCK_FORMAT, fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    reply = fcntl.fcntl(fd, F_OFD_GETLK, request)
    return struct.unpack(FLOCK_FORMAT, reply)[0] != fcntl.F_UNLCK


def _bits(mask: int) -> Iterator[int]:
    for index in range(PERM_BITS):
        if mask & (1 << index):
            yield 1 << index


def _index(bit: int) -> int:
    return bit.bit_length() - 1


# Finding the process behind a lock (Linux-only: /proc)


def find_lock_owner(path: str, offset: int) -> Optional[int]:
    """Return the pid of a process that holds a lock on byte `offset` of `path`, or None.

    OFD locks show pid -1 in /proc/locks, so this reads the lock lines of every
    /proc/PID/fdinfo/FD instead. Processes of other users stay hidden unless run by root.
    Another process is preferred over this one.
    """
    try:
        status = os.stat(path)
    except OSError:
        return None
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    own = None
    for pid, start, end in _fdinfo_locks(device):
        if start <= offset and (end is None or offset <= end):
            if pid != os.getpid():
                return pid
            own = pid
    return own


def _fdinfo_locks(device: str) -> Iterator[Tuple[int, int, Optional[int]]]:
    """Yield (pid, first byte, last byte or None for EOF) of each lock on `device`."""
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return
    for pid in pids:
        directory = f"/proc/{pid}/fdinfo"
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            try:
                with open(f"{directory}/{name}", encoding="ascii", errors="replace") as info:
                    lines = info.read().splitlines()
            except OSError:
                continue
            for line in lines:
                # lock:	1: OFDLCK  ADVISORY  READ -1 fe:00:1458538 100 101
                fields = line.split()
                if len(fields) < 8 or fields[0] != "lock:" or fields[-3] != device:
                    continue
                end = None if fields[-1] == "EOF" else int(fields[-1])
                yield int(pid), int(fields[-2]), end
