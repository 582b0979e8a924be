"""`vdiskfs mount`: expose an image as a raw file in a directory, served by a FUSE daemon."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

from vdiskfs import daemon
from vdiskfs.daemon import FUSE_SUBTYPE, MountError, RuntimeFiles
from vdiskfs.driver import Driver
from vdiskfs.errors import VdiskError
from vdiskfs.fs import DiskOperations, exported_name
from vdiskfs.locking import find_writer
from vdiskfs.overlay import open_overlay, open_temporary_overlay
from vdiskfs.registry import DEFAULT_CACHE_SIZE, open_chain
from vdiskfs.sizes import format_size, parse_size

log = logging.getLogger(__name__)

HELP = "expose an image as a raw file in MOUNTPOINT, served by a FUSE daemon"

EPILOG = """\
The image appears as MOUNTPOINT/NAME.raw, NAME being the image's file name without its last
extension; several images each appear that way, and two images with the same NAME are an
error. When MOUNTPOINT is a regular file, the one disk appears at that path instead, and the
file comes back at unmount. The command returns once the mount is live; the daemon keeps
running in the background until `vdiskfs umount MOUNTPOINT`, SIGTERM or SIGINT.

examples:
  vdiskfs mount disk.qcow2 /mnt/disk                 serve /mnt/disk/disk.raw
  vdiskfs mount --read-only disk.qcow2 /mnt/disk     serve it read-only
  vdiskfs mount a.qcow2 b.img /mnt/disks             serve /mnt/disks/a.raw and b.raw
  vdiskfs mount disk.qcow2 /vm/disk.img              show the disk at /vm/disk.img
  vdiskfs mount --partitions disk.qcow2 /mnt/disk    also serve disk-part1.raw, ...
  mount -o loop /mnt/disk/disk-part1.raw /mnt/root   mount a partition, no offset needed
  vdiskfs mount --overlay work.qcow2 disk.qcow2 /mnt/disk
                                                     keep disk.qcow2; writes go to work.qcow2
  vdiskfs mount --overlay-temporary disk.qcow2 /mnt/disk
                                                     discard all writes at unmount
  vdiskfs mount -f --debug disk.qcow2 /mnt/disk      stay in the foreground; Ctrl-C unmounts
  vdiskfs mount --cache-size 256M disk.qcow2 /mnt/disk
  vdiskfs mount --allow-other -o noatime disk.qcow2 /mnt/disk
  losetup --find --show /mnt/disk/disk.raw           use the raw file as a block device
  vdiskfs umount /mnt/disk                           flush, unmount and wait for the daemon
"""


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", metavar="IMAGE", nargs="+",
                        help="image file to expose; several images each get their own raw file")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT",
                        help="existing directory in which the raw files appear, or, with one "
                             "image, an existing regular file that shows the disk in its place "
                             "until unmount")
    parser.add_argument("--format", dest="format_name", metavar="FMT",
                        help="image format (qcow2 or raw); probed when omitted")
    parser.add_argument("--partitions", action="store_true",
                        help="also show each MBR or GPT partition of a disk as NAME-partN.raw, "
                             "N being the number Linux gives it; the files follow changes to "
                             "the partition table once the writer flushes")
    parser.add_argument("-r", "--read-only", action="store_true",
                        help="open the image read-only and mount with the 'ro' option; "
                             "writes fail with EROFS")
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="with --read-only, open the image even while another process "
                             "(QEMU, qemu-img, another mount) holds it for writing, as "
                             "qemu-img -U does; reads may then see inconsistent data")
    parser.add_argument("--snapshot", metavar="SNAPSHOT",
                        help="serve the internal snapshot SNAPSHOT (an ID or name, as "
                             "`vdiskfs snapshot -l` lists them) instead of the active disk; "
                             "implies --read-only")

    overlay = parser.add_mutually_exclusive_group()
    overlay.add_argument("--overlay", metavar="FILE",
                         help="send writes to FILE, a qcow2 image over IMAGE, and open IMAGE "
                              "and its backing chain read-only; FILE is created on first use "
                              "and reused when its backing file is IMAGE")
    overlay.add_argument("--overlay-temporary", action="store_true",
                         help="like --overlay, with a new file in $TMPDIR (else /tmp) that is "
                              "removed at unmount, so the writes are discarded")

    parser.add_argument("--writeback-cache", action="store_true",
                        help="let the kernel cache writes and send them in large batches, "
                             "which speeds up small random writes; fsync() and close() still "
                             "reach the image before they return (not with --partitions)")
    parser.add_argument("--cache-size", type=_size, default=DEFAULT_CACHE_SIZE, metavar="SIZE",
                        help="memory for cached image metadata, in bytes with an optional "
                             f"K, M or G suffix (default: {format_size(DEFAULT_CACHE_SIZE)})")
    parser.add_argument("--allow-other", action="store_true",
                        help="let other users access the mount (FUSE option allow_other; "
                             "needs user_allow_other in /etc/fuse.conf unless run by root)")
    parser.add_argument("-o", dest="fuse_options", action="append", default=[],
                        metavar="OPTS",
                        help="extra FUSE mount options, comma separated; may be repeated")
    parser.add_argument("--debug-fuse", action="store_true",
                        help="make libfuse print every FUSE request and reply")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground and log to stderr; otherwise the daemon "
                             f"logs to {daemon.describe_log_location()}")
    parser.epilog = EPILOG


def run(args: argparse.Namespace) -> int:
    args.image = args.images[0]
    mountpoint = check_mountpoint(args.mountpoint)
    on_file = os.path.isfile(mountpoint)
    names = exported_names(args.images)
    check_several_images(args, on_file)
    if args.partitions and on_file:
        raise MountError(f"--partitions needs a directory to show the partition files in, "
                         f"but {args.mountpoint} is a file")
    if args.partitions and args.writeback_cache:
        # Partition files bypass the page cache, so they would miss writes cached for the disk.
        raise MountError("--writeback-cache cannot be combined with --partitions")
    extra_options = split_options(args.fuse_options)
    # `-o ro` alone would make the kernel reject writes, so open the image read-only to match.
    read_only = args.read_only or "ro" in extra_options or args.snapshot is not None
    if args.force_share and not read_only:
        raise MountError("--force-share needs --read-only, because vdiskfs never writes to an "
                         "image that another process may be writing")

    if read_only and (args.overlay or args.overlay_temporary):
        raise MountError("--overlay and --overlay-temporary need a writable mount; to read an "
                         "overlay without changing it, mount the overlay file with --read-only")

    if args.overlay or args.overlay_temporary:
        driver = open_with_overlay(args.image, args.format_name, args.overlay, args.cache_size)
    else:
        driver = open_image(args.image, args.format_name, read_only, args.cache_size,
                            snapshot=args.snapshot, force_share=args.force_share)
    drivers = [driver]
    try:
        for image in args.images[1:]:
            drivers.append(open_image(image, args.format_name, read_only, args.cache_size,
                                      force_share=args.force_share))
        operations = DiskOperations(list(zip(names, drivers)), root_is_file=on_file,
                                    partitions=args.partitions,
                                    writeback_cache=args.writeback_cache and not read_only)
    except BaseException:
        for opened in drivers:
            opened.close()
        raise

    options = fuse_options(driver, read_only, args.allow_other, args.debug_fuse, extra_options)
    files = RuntimeFiles.for_mountpoint(mountpoint)
    log.debug("FUSE options: %s", ",".join(sorted(options)))
    if args.debug_fuse:
        logging.getLogger("pyfuse3").setLevel(logging.DEBUG)
    else:
        logging.getLogger("pyfuse3").setLevel(logging.INFO)

    try:
        if args.foreground:
            return daemon.run_foreground(operations, mountpoint, options, files)
        pid = daemon.start_background(operations, mountpoint, options, files)
    except MountError as error:
        raise MountError(f"cannot mount {args.image} on {args.mountpoint}: {error}") from None
    log.debug("vdiskfs daemon %d serves %s; it logs to %s", pid, mountpoint, files.log)
    return 0


def check_mountpoint(mountpoint: str) -> str:
    """Return the real path of `mountpoint`; raise MountError when nothing can be mounted there."""
    real_path = os.path.realpath(mountpoint)
    # Check the mount table first: stat() on a FUSE mount whose daemon died fails with ENOTCONN.
    if daemon.find_mount(real_path) is not None:
        raise MountError(f"cannot mount on {mountpoint}: already a mount point")
    if not os.path.exists(real_path):
        raise MountError(f"cannot mount on {mountpoint}: no such directory")
    if not os.path.isdir(real_path) and not os.path.isfile(real_path):
        raise MountError(f"cannot mount on {mountpoint}: not a directory or regular file")
    return real_path


def exported_names(images: list) -> list:
    """Return the raw file name of each image; raise MountError when two names are equal."""
    names = [exported_name(image) for image in images]
    first_image = {}
    for image, name in zip(images, names):
        if name in first_image:
            raise MountError(f"{first_image[name]} and {image} would both appear as {name}; "
                             f"rename one of them or link it under another name")
        first_image[name] = image
    return names


def check_several_images(args: argparse.Namespace, on_file: bool) -> None:
    """Reject options that apply to one image only when several images are given."""
    if len(args.images) == 1:
        return
    if on_file:
        raise MountError(f"cannot mount {len(args.images)} images on the file "
                         f"{args.mountpoint}; a file mount point shows one disk, so give a "
                         f"directory")
    for option, value in (("--overlay", args.overlay),
                          ("--overlay-temporary", args.overlay_temporary),
                          ("--snapshot", args.snapshot)):
        if value:
            raise MountError(f"{option} works with one image only, but "
                             f"{len(args.images)} images were given")


def open_image(image: str, format_name, read_only: bool, cache_size: int,
               snapshot: Optional[str] = None, force_share: bool = False) -> Driver:
    """Open `image` and its backing chain; raise MountError that names the image on failure.

    With `force_share`, a read-only open succeeds while another process writes the image,
    and a warning names that process.
    """
    try:
        # An absolute name keeps working after the daemon changes to the root directory.
        driver = open_chain(os.path.abspath(image), format_name, read_only=read_only,
                            cache_size=cache_size, snapshot=snapshot, force_share=force_share)
    except OSError as error:
        raise MountError(f"cannot open {image}: {error.strerror or error}") from None
    except VdiskError as error:
        raise MountError(f"cannot open {image}: {error}") from None
    if force_share:
        writer = find_writer(driver.filename)
        if writer is not None:
            log.warning("%s is open for writing by %s; serving it anyway because of "
                        "--force-share, so reads may see inconsistent data", image, writer)
    return driver


def open_with_overlay(image: str, format_name, overlay, cache_size: int) -> Driver:
    """Open `image` read-only under an overlay; a temporary one when `overlay` is None."""
    try:
        if overlay is None:
            return open_temporary_overlay(image, format_name, cache_size=cache_size)
        return open_overlay(image, overlay, format_name, cache_size=cache_size)
    except OSError as error:
        raise MountError(f"cannot open {error.filename or image} for the overlay: "
                         f"{error.strerror or error}") from None
    except VdiskError as error:
        raise MountError(f"cannot open {image} with an overlay: {error}") from None


def split_options(values: list) -> list:
    """Split the values of repeated -o arguments at commas, dropping empty items."""
    return [option.strip() for value in values for option in value.split(",") if option.strip()]


def fuse_options(driver: Driver, read_only: bool, allow_other: bool, debug_fuse: bool,
                 extra: list) -> set:
    """Return the FUSE mount options for one image."""
    options = {"default_permissions", f"subtype={FUSE_SUBTYPE}",
               f"fsname={_fsname(driver.filename)}"}
    if read_only:
        options.add("ro")
    if allow_other:
        options.add("allow_other")
    if debug_fuse:
        options.add("debug")
    options.update(extra)
    return options


def _fsname(filename: str) -> str:
    # pyfuse3 passes options as ASCII, and libfuse splits them at commas unless escaped.
    if not filename.isascii():
        return "vdiskfs"
    return filename.replace("\\", "\\\\").replace(",", "\\,")
