"""The FUSE file system: a directory that contains one raw file per exported disk.

The root directory (pyfuse3.ROOT_INODE) lists the exported files and nothing else. Each
exported file shows the guest view of one image: its size is the virtual size, reads and
writes go to the image's Driver, truncating it to a larger size resizes the disk.

Concurrency rule: trio runs every handler in one thread, and drivers are synchronous and not
thread-safe, so handlers call them inline and never await between two driver calls. The one
exception is a read's plan, which runs in a worker thread (vdiskfs.concurrency): handlers
that change an image first wait in ReadGate.exclusive() until no plan runs.

Errors: handlers raise only pyfuse3.FUSEError, because pyfuse3 ends its main loop on any other
exception. DiskOperations.request_failed() turns every error into an errno value, logs it with
the image name, guest offset and length, and the daemon keeps serving.

Caveats:
- pyfuse3 3.5 has no fallocate handler, so discard (punch hole) requests are not forwarded to
  Driver.discard().
- Shrinking a disk is rejected with EPERM, because it would silently drop guest data.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import PurePath
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pyfuse3

from vdiskfs.concurrency import PlanRunner, ReadGate
from vdiskfs.driver import Driver
from vdiskfs.errors import (CorruptImageError, FormatChangeError, ReadOnlyError,
                            UnsupportedFeatureError, VdiskError)
from vdiskfs.partitions import PartitionDriver, read_partitions

log = logging.getLogger(__name__)

# Names and sizes never change behind the kernel's back: every change arrives through this
# file system. st_blocks does change with writes, so attributes expire after one second.
ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 1.0

# Preferred I/O size reported in st_blksize.
BLOCK_SIZE = 4096

# Errors of one kind are logged at most ERROR_LOG_BURST times per ERROR_LOG_WINDOW seconds,
# so a damaged range that the kernel reads again and again cannot flood the log.
ERROR_LOG_BURST = 10
ERROR_LOG_WINDOW = 60.0


def exported_name(image: str) -> str:
    """Return the name of the raw file that exposes `image`.

    The last extension of the image's name is replaced by `.raw` (disk.qcow2 -> disk.raw),
    and a name without an extension gets `.raw` appended (disk -> disk.raw).
    """
    return PurePath(image).stem + ".raw"


def errno_for(error: BaseException) -> int:
    """Return the errno value that a request failing with `error` returns to the kernel."""
    if isinstance(error, ReadOnlyError):
        return errno.EROFS
    if isinstance(error, FormatChangeError):
        return errno.EPERM
    if isinstance(error, UnsupportedFeatureError):
        return errno.EOPNOTSUPP
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        # The host file system is full, and the guest gets the same error.
        return errno.ENOSPC
    return errno.EIO


@dataclass
class ExportedFile:
    """One disk image shown as a raw file in the root directory."""

    inode: int
    name: str
    driver: Driver
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    # Set by a write or resize, cleared by a flush: whether driver.flush() has work to do.
    dirty: bool = False
    # For a partition file, the exported disk that contains the partition.
    disk: Optional["ExportedFile"] = None
    # For a disk with --partitions: set by a write, cleared when a flush re-reads the table.
    table_changed: bool = False

    @property
    def read_only(self) -> bool:
        return self.driver.read_only

    @property
    def filename(self) -> str:
        return self.driver.filename


@dataclass
class _LogWindow:
    start: float
    logged: int = 0
    dropped: int = 0


class ErrorLog:
    """Log lines rate-limited per key: at most `burst` lines per `window` seconds.

    When a window ends with lines dropped, the next line of that key reports how many.
    """

    def __init__(self, burst: int = ERROR_LOG_BURST, window: float = ERROR_LOG_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.window = window
        self.clock = clock
        self._windows: Dict[Tuple, _LogWindow] = {}

    def log(self, key: Tuple, level: int, message: str, *args, exc_info: bool = False) -> None:
        now = self.clock()
        current = self._windows.get(key)
        if current is None or now - current.start >= self.window:
            if current is not None and current.dropped:
                log.log(level, "%d similar messages were not logged in the last %.0f s",
                        current.dropped, now - current.start)
            current = _LogWindow(start=now)
            self._windows[key] = current
        if current.logged >= self.burst:
            current.dropped += 1
            return
        current.logged += 1
        log.log(level, message, *args, exc_info=exc_info)

    def dropped(self) -> int:
        """Return how many lines the current windows dropped."""
        return sum(current.dropped for current in self._windows.values())


class DiskOperations(pyfuse3.Operations):
    """The pyfuse3 request handlers for a directory of exported disks."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, exports: Sequence[Tuple[str, Driver]], *, uid: Optional[int] = None,
                 gid: Optional[int] = None, root_is_file: bool = False,
                 partitions: bool = False, writeback_cache: bool = False) -> None:
        """Export each (name, driver) pair as a raw file owned by uid:gid.

        With writeback_cache, the kernel collects writes in its page cache and sends them in
        large batches; fsync() and close() still send every dirty page before they return.

        uid and gid default to those of this process, the mounting user. With root_is_file,
        the only exported disk is the root inode itself, for a mount on a regular file. With
        partitions, each partition of each disk also appears as NAME-partN.raw.
        """
        super().__init__()
        self.enable_writeback_cache = writeback_cache
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.mount_time_ns = time.time_ns()
        self.files: List[ExportedFile] = []
        self._by_inode: Dict[int, ExportedFile] = {}
        self._by_name: Dict[bytes, ExportedFile] = {}
        self._errors = ErrorLog()
        self.gate = ReadGate()
        self._plans = PlanRunner(self.gate)
        self.after_init: Optional[Callable[[], None]] = None
        # Checked once: the read/write path logs nothing unless debug logging is on.
        self._trace = log.isEnabledFor(logging.DEBUG)

        if root_is_file and len(exports) != 1:
            raise ValueError(f"a mount on a file exports one disk, not {len(exports)}")
        first_inode = pyfuse3.ROOT_INODE if root_is_file else pyfuse3.ROOT_INODE + 1
        for inode, (name, driver) in enumerate(exports, start=first_inode):
            if name.encode() in self._by_name:
                raise ValueError(f"two exported files are named {name}")
            image_stat = os.stat(driver.filename)
            exported = ExportedFile(inode, name, driver, atime_ns=image_stat.st_atime_ns,
                                    mtime_ns=image_stat.st_mtime_ns,
                                    ctime_ns=image_stat.st_ctime_ns)
            self.files.append(exported)
            self._by_inode[inode] = exported
            self._by_name[name.encode()] = exported
        # The exported file that is the root inode, or None when the root is a directory.
        self.root_file: Optional[ExportedFile] = self.files[0] if root_is_file else None

        if partitions and root_is_file:
            raise ValueError("partition files need a directory mount")
        self.partitions = partitions
        self._next_inode = first_inode + len(self.files)
        for disk in list(self.files) if partitions else []:
            self.refresh_partitions(disk)

    def init(self) -> None:
        """Run `after_init` once the kernel and libfuse have agreed on the FUSE_INIT settings."""
        if self.after_init is not None:
            self.after_init()

    def close(self) -> bool:
        """Close (and so flush) every driver; return False when any of them failed."""
        ok = True
        for exported in self.files:
            try:
                exported.driver.close()
            except (VdiskError, OSError) as error:
                log.error("closing %s failed: %s; writes since its last flush may be lost",
                          exported.filename, error)
                ok = False
        dropped = self._errors.dropped()
        if dropped:
            log.warning("%d error messages were not logged because of rate limiting", dropped)
        return ok

    # Partition files

    def refresh_partitions(self, disk: ExportedFile) -> None:
        """Re-read the partition table of `disk` and add, replace or remove its partition files.

        A partition whose range changed gets a new inode, and the kernel's cached entry of
        the old name is invalidated, so that nothing cached for the old range is used.
        """
        disk.table_changed = False
        found = read_partitions(disk.driver.read, disk.driver.virtual_size, disk.filename)
        current = {exported.driver.partition.number: exported
                   for exported in self.files if exported.disk is disk}
        wanted = {partition.number: partition for partition in found}

        for number, exported in current.items():
            if wanted.get(number) != exported.driver.partition:
                self._remove_file(exported)
                log.info("%s: partition %d changed or was removed; %s is gone", disk.filename,
                         number, exported.name)

        stem = disk.name[:-len(".raw")] if disk.name.endswith(".raw") else disk.name
        for partition in found:
            previous = current.get(partition.number)
            if previous is not None and previous.driver.partition == partition:
                continue
            name = f"{stem}-part{partition.number}.raw"
            if name.encode() in self._by_name:
                log.warning("%s: partition %d is not exported, because %s is taken",
                            disk.filename, partition.number, name)
                continue
            self._add_file(name, PartitionDriver(disk.driver, partition), disk)
            log.info("%s: partition %d at byte %d, %d bytes, appears as %s", disk.filename,
                     partition.number, partition.offset, partition.size, name)

    def _add_file(self, name: str, driver: Driver, disk: ExportedFile) -> None:
        exported = ExportedFile(self._next_inode, name, driver, atime_ns=disk.atime_ns,
                                mtime_ns=disk.mtime_ns, ctime_ns=time.time_ns(), disk=disk)
        self._next_inode += 1
        self.files.append(exported)
        self._by_inode[exported.inode] = exported
        self._by_name[name.encode()] = exported

    def _remove_file(self, exported: ExportedFile) -> None:
        self.files.remove(exported)
        del self._by_inode[exported.inode]
        del self._by_name[exported.name.encode()]
        self.invalidate_entry(exported.name)

    def invalidate_entry(self, name: str) -> None:
        """Tell the kernel to forget the cached directory entry `name` of the root."""
        # The asynchronous variant runs in pyfuse3's own thread, because invalidating from
        # inside a request handler can deadlock.
        pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name.encode(), ignore_enoent=True)

    # Errors

    def request_failed(self, error: BaseException, exported: ExportedFile, operation: str,
                       offset: int = 0, length: int = 0) -> pyfuse3.FUSEError:
        """Log `error` from a request on `exported` and return the FUSEError to raise."""
        code = errno_for(error)
        key = (operation, type(error).__name__)
        where = (f"{operation} of {exported.filename} at guest offset {offset}, "
                 f"length {length}")
        if isinstance(error, (ReadOnlyError, UnsupportedFeatureError)):
            self._errors.log(key, logging.WARNING, "%s rejected: %s", where, error)
        elif isinstance(error, (CorruptImageError, VdiskError, OSError)):
            self._errors.log(key, logging.ERROR, "%s failed, returning %s: %s", where,
                             errno.errorcode.get(code, code), error)
        else:
            # A bug in vdiskfs: keep serving, but keep the traceback.
            self._errors.log(key, logging.ERROR, "%s failed, returning EIO: unexpected %s",
                             where, type(error).__name__, exc_info=True)
        return pyfuse3.FUSEError(code)

    # Attributes

    def _new_attributes(self, inode: int, mode: int, nlink: int) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = inode
        attributes.st_mode = mode
        attributes.st_nlink = nlink
        attributes.st_uid = self.uid
        attributes.st_gid = self.gid
        attributes.st_blksize = BLOCK_SIZE
        attributes.entry_timeout = ENTRY_TIMEOUT
        attributes.attr_timeout = ATTR_TIMEOUT
        return attributes

    def _root_attributes(self) -> pyfuse3.EntryAttributes:
        attributes = self._new_attributes(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, nlink=2)
        attributes.st_atime_ns = self.mount_time_ns
        attributes.st_mtime_ns = self.mount_time_ns
        attributes.st_ctime_ns = self.mount_time_ns
        return attributes

    def _file_attributes(self, exported: ExportedFile) -> pyfuse3.EntryAttributes:
        permissions = 0o444 if exported.read_only else 0o644
        attributes = self._new_attributes(exported.inode, stat.S_IFREG | permissions, nlink=1)
        attributes.st_size = exported.driver.virtual_size
        attributes.st_blocks = self._allocated_blocks(exported)
        attributes.st_atime_ns = exported.atime_ns
        attributes.st_mtime_ns = exported.mtime_ns
        attributes.st_ctime_ns = exported.ctime_ns
        return attributes

    def _allocated_blocks(self, exported: ExportedFile) -> int:
        # st_blocks is informational, so a failure here must not make stat() fail.
        try:
            return exported.driver.allocated_size() // 512
        except (VdiskError, OSError) as error:
            self._errors.log(("allocated_size", type(error).__name__), logging.WARNING,
                             "cannot get the allocated size of %s, reporting 0 blocks: %s",
                             exported.filename, error)
            return 0

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE and self.root_file is None:
            return self._root_attributes()
        return self._file_attributes(self._exported(inode))

    def _exported(self, inode: int) -> ExportedFile:
        exported = self._by_inode.get(inode)
        if exported is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return exported

    # Directory handlers

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or self.root_file is not None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._root_attributes()
        exported = self._by_name.get(name)
        if exported is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._file_attributes(exported)

    async def getattr(self, inode, ctx=None):
        return self._attributes(inode)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE or self.root_file is not None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        # An entry's next_id is its position plus one, so start_id is the number of entries
        # already returned.
        for position in range(start_id, len(self.files)):
            exported = self.files[position]
            if not pyfuse3.readdir_reply(token, exported.name.encode(),
                                         self._file_attributes(exported), position + 1):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        # df on the mount shows the space left for the image to grow into: that of the file
        # system which contains the first exported image (its top layer, with an overlay).
        # NOTE: images on other file systems in the same mount are not counted.
        statistics = pyfuse3.StatvfsData()
        try:
            host = os.statvfs(os.path.dirname(self.files[0].filename) or ".")
        except OSError as error:
            self._errors.log(("statfs", type(error).__name__), logging.WARNING,
                             "statvfs of the directory of %s failed: %s",
                             self.files[0].filename, error)
            raise pyfuse3.FUSEError(errno_for(error)) from None
        statistics.f_bsize = host.f_bsize
        statistics.f_frsize = host.f_frsize
        statistics.f_blocks = host.f_blocks
        statistics.f_bfree = host.f_bfree
        statistics.f_bavail = host.f_bavail
        statistics.f_files = len(self.files) + 1
        statistics.f_ffree = 0
        statistics.f_favail = 0
        statistics.f_namemax = 255
        return statistics

    # The set of files is fixed: creating, removing or renaming entries is not permitted.

    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    # File handlers. The file handle of an open exported file is its inode.

    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == pyfuse3.ROOT_INODE and self.root_file is None:
            if fields.update_size or fields.update_mode or fields.update_uid or fields.update_gid:
                raise pyfuse3.FUSEError(errno.EPERM)
            return self._root_attributes()

        exported = self._exported(inode)
        current = self._file_attributes(exported)
        if ((fields.update_mode and stat.S_IMODE(attr.st_mode) != stat.S_IMODE(current.st_mode))
                or (fields.update_uid and attr.st_uid != self.uid)
                or (fields.update_gid and attr.st_gid != self.gid)):
            # Mode and owner follow from --read-only and from the mounting user.
            raise pyfuse3.FUSEError(errno.EPERM)

        if fields.update_size:
            await self.gate.exclusive()
            self._resize(exported, attr.st_size)
        now = time.time_ns()
        if fields.update_atime:
            exported.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            exported.mtime_ns = attr.st_mtime_ns
        exported.ctime_ns = now
        return self._file_attributes(exported)

    def _resize(self, exported: ExportedFile, new_size: int) -> None:
        old_size = exported.driver.virtual_size
        if new_size == old_size:
            return
        if exported.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if new_size < old_size:
            log.warning("truncating %s from %d to %d bytes rejected with EPERM: shrinking a "
                        "disk would drop guest data", exported.filename, old_size, new_size)
            raise pyfuse3.FUSEError(errno.EPERM)
        try:
            exported.driver.resize(new_size)
        except Exception as error:
            raise self.request_failed(error, exported, "resize", old_size,
                                      new_size - old_size) from None
        exported.dirty = True
        exported.mtime_ns = time.time_ns()
        log.info("resized %s from %d to %d bytes", exported.filename, old_size, new_size)

    async def open(self, inode, flags, ctx):
        exported = self._exported(inode)
        if exported.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        # A read-only disk never changes, so its page cache stays valid across opens. A
        # writable one keeps the default, which drops cached pages at each open. With
        # partition files, a disk and its partitions show the same bytes through different
        # inodes, so writable files bypass the page cache to stay consistent.
        # NOTE: the kernel then rejects MAP_SHARED mmap of these files with ENODEV.
        direct_io = self.partitions and not exported.read_only
        return pyfuse3.FileInfo(fh=inode, keep_cache=exported.read_only, direct_io=direct_io)

    async def read(self, fh, off, size):
        exported = self._exported(fh)
        if self._trace:
            log.debug("read %s offset %d length %d", exported.name, off, size)
        if self.gate.changes_waiting:
            await self.gate.wait_for_changes()
        try:
            plan = exported.driver.plan_read(off, size)
            await self._plans.run(plan)
        except Exception as error:
            raise self.request_failed(error, exported, "read", off, size) from None
        return plan.result

    async def write(self, fh, off, buf):
        exported = self._exported(fh)
        if self._trace:
            log.debug("write %s offset %d length %d", exported.name, off, len(buf))
        # A disk does not grow by writing past its end: like a block device, a write that
        # crosses the end is cut short there, and one that starts at the end fails.
        available = exported.driver.virtual_size - off
        if available <= 0:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if len(buf) > available:
            buf = buf[:available]
        await self.gate.exclusive()
        try:
            exported.driver.write(off, buf)
        except Exception as error:
            raise self.request_failed(error, exported, "write", off, len(buf)) from None
        exported.dirty = True
        exported.mtime_ns = time.time_ns()
        if self.partitions and exported.disk is None:
            # The write may have changed the partition table; the next flush re-reads it.
            exported.table_changed = True
        return len(buf)

    async def flush(self, fh):
        # close(2) of a descriptor. Only flush when something was written since the last flush,
        # so that closing after a read costs nothing.
        exported = self._exported(fh)
        if exported.dirty:
            await self.gate.exclusive()
            self._flush(exported, "flush")

    async def fsync(self, fh, datasync):
        exported = self._exported(fh)
        await self.gate.exclusive()
        self._flush(exported, "fsync")

    def _flush(self, exported: ExportedFile, operation: str) -> None:
        try:
            exported.driver.flush()
        except Exception as error:
            raise self.request_failed(error, exported, operation) from None
        exported.dirty = False
        if exported.table_changed:
            try:
                self.refresh_partitions(exported)
            except Exception as error:
                raise self.request_failed(error, exported, "partition table read") \
                    from None

    async def release(self, fh):
        pass
