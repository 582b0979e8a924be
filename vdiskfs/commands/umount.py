"""`vdiskfs umount`: unmount a vdiskfs mount and wait until its daemon has exited."""

from __future__ import annotations

import argparse
import errno
import logging
import os

from vdiskfs import daemon
from vdiskfs.daemon import FUSE_FSTYPE, MountError, RuntimeFiles

log = logging.getLogger(__name__)

HELP = "unmount MOUNTPOINT and wait until its daemon has flushed the image and exited"

EPILOG = """\
The unmount fails while a process still uses the mount (an open file, a loop device, a shell
inside it); close it or run `losetup -d` first.

example:
  vdiskfs umount /mnt/disk
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="directory given to vdiskfs mount")
    parser.epilog = EPILOG


def mountpoint_path(path: str) -> str:
    """Return the real path of `path` without stat() of `path` itself when possible.

    stat() of a FUSE mount point waits for its daemon, so a stopped or hung daemon would
    hang umount in the kernel. Only the parent directory is resolved; the full path is
    resolved only when the name itself is not in the mount table (a symbolic link).
    """
    absolute = os.path.abspath(path)
    parent, name = os.path.split(absolute)
    if name:
        candidate = os.path.join(os.path.realpath(parent), name)
        if daemon.find_mount(candidate) is not None:
            return candidate
    return os.path.realpath(path)


def run(args: argparse.Namespace) -> int:
    real_path = mountpoint_path(args.mountpoint)
    entry = daemon.find_mount(real_path)
    if entry is None:
        if not os.path.lexists(real_path):
            raise MountError(f"cannot unmount {args.mountpoint}: no such file or directory")
        raise MountError(f"cannot unmount {args.mountpoint}: not mounted")
    if entry.fstype != FUSE_FSTYPE:
        raise MountError(f"cannot unmount {args.mountpoint}: not a vdiskfs mount "
                         f"(file system type {entry.fstype})")

    # Open the pid file before unmounting: the daemon removes it while shutting down.
    # A mount made by another user has its pid file elsewhere, and then nothing is waited for.
    watch = daemon.watch_daemon(RuntimeFiles.for_mountpoint(real_path).pid)
    try:
        try:
            daemon.unmount(real_path)
        except OSError as error:
            reason = "target is busy" if error.errno == errno.EBUSY else error.strerror
            raise MountError(f"cannot unmount {args.mountpoint}: {reason}") from None
        if watch is not None:
            watch.wait()
            log.debug("vdiskfs daemon %s has exited", watch.pid)
    finally:
        if watch is not None:
            watch.close()
    return 0
