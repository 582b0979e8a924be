"""mount(8) and umount(8) helpers, so that /etc/fstab lines of type fuse.vdiskfs work.

An fstab line such as

    /images/disk.qcow2  /mnt/disk  fuse.vdiskfs  ro,partitions  0 0

reaches vdiskfs in one of three ways (util-linux 2.38 and fuse3 3.14 on Debian 12):
- mount(8) runs /sbin/mount.fuse.vdiskfs SOURCE TARGET -o OPTIONS when that helper exists;
- otherwise it runs /sbin/mount.fuse (fuse3's mount.fuse3), which runs `vdiskfs SOURCE TARGET
  -o OPTIONS` through /bin/sh with the default PATH, so vdiskfs must be in /usr/bin,
  /usr/local/bin or a similar directory; cli.main() hands such a call to main() here;
- for type vdiskfs (without fuse.) mount(8) runs /sbin/mount.vdiskfs.
umount(8) runs /sbin/umount.fuse.vdiskfs TARGET when it exists; umount_main() then waits, as
`vdiskfs umount` does, until the daemon has flushed the image and exited.

Options of the fstab line become `vdiskfs mount` options (see OPTION_MAP and FLAG_MAP).
Options that only mount(8) uses are dropped, and every other option goes to FUSE with -o.
A read-only mount cannot take writes, so `ro,overlay=FILE` serves the disk as FILE shows it
(the image with the writes kept in FILE), read-only, and changes neither file. When FILE does
not exist yet, that is the image itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

# fstab options with a value, and the `vdiskfs mount` option that takes it.
OPTION_MAP = {
    "overlay": "--overlay",
    "format": "--format",
    "cache-size": "--cache-size",
    "cache_size": "--cache-size",
    "snapshot": "--snapshot",
}

# fstab options without a value, and the `vdiskfs mount` option they turn on.
FLAG_MAP = {
    "ro": "--read-only",
    "overlay-temporary": "--overlay-temporary",
    "overlay_temporary": "--overlay-temporary",
    "partitions": "--partitions",
    "allow_other": "--allow-other",
    "force-share": "--force-share",
    "force_share": "--force-share",
}

# Options that mount(8), systemd or mount.fuse3 act on, and that mean nothing to FUSE.
DROPPED = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
           "nofail", "_netdev"}
DROPPED_PREFIXES = ("x-", "comment=", "helper=")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Mount a disk image with vdiskfs, as mount(8) calls a helper.")
    parser.add_argument("source", metavar="IMAGE")
    parser.add_argument("target", metavar="MOUNTPOINT")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    parser.add_argument("-t", dest="type", metavar="TYPE", help="ignored; always vdiskfs")
    parser.add_argument("-n", dest="no_mtab", action="store_true", help="ignored")
    parser.add_argument("-s", dest="sloppy", action="store_true", help="ignored")
    parser.add_argument("-v", dest="verbose", action="store_true", help="log debug messages")
    parser.add_argument("-f", dest="fake", action="store_true",
                        help="check the options and do nothing else")
    return parser


def mount_arguments(source: str, target: str, options: Sequence[str]) -> List[str]:
    """Return the `vdiskfs mount` arguments for a mount(8) call with comma-separated options."""
    arguments: List[str] = []
    fuse_options: List[str] = []
    for value in options:
        for option in value.split(","):
            option = option.strip()
            if not option or option in DROPPED or option.startswith(DROPPED_PREFIXES):
                continue
            name, has_value, argument = option.partition("=")
            if has_value and name in OPTION_MAP:
                arguments += [OPTION_MAP[name], argument]
            elif not has_value and option in FLAG_MAP:
                arguments.append(FLAG_MAP[option])
            else:
                fuse_options.append(option)
    if fuse_options:
        arguments += ["-o", ",".join(fuse_options)]
    if "--read-only" in arguments and "--overlay" in arguments:
        source = _read_only_overlay_source(arguments, source)
    return arguments + [source, target]


def _read_only_overlay_source(arguments: List[str], source: str) -> str:
    """Remove --overlay FILE from `arguments` and return the image to mount read-only.

    That is FILE when it exists and its backing file is `source`, else `source` itself.
    """
    from vdiskfs.daemon import MountError
    from vdiskfs.registry import open_image, resolve_backing_path

    index = arguments.index("--overlay")
    overlay = arguments[index + 1]
    del arguments[index:index + 2]
    if not os.path.exists(overlay):
        return source
    layer = open_image(overlay, "qcow2", read_only=True)
    try:
        backing = layer.backing_filename
        backing_path = None if backing is None else resolve_backing_path(overlay, backing)
    finally:
        layer.close()
    if backing_path is None or not os.path.exists(backing_path) or \
            not os.path.samefile(backing_path, source):
        raise MountError(f"overlay {overlay} does not have {source} as its backing file")
    # The format option names the format of the image, and the overlay is always qcow2.
    if "--format" in arguments:
        position = arguments.index("--format")
        del arguments[position:position + 2]
    return overlay


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Mount as `mount.fuse.vdiskfs IMAGE MOUNTPOINT [-o OPTIONS]` and return the exit status."""
    from vdiskfs import cli

    prog = prog or sys.argv[0]
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    arguments = mount_arguments(args.source, args.target, args.options)
    if args.verbose:
        arguments.insert(0, "--debug")
    if args.fake:
        # Parse for errors only; mount(8) with -f wants no mount.
        cli.build_parser().parse_args(["mount"] + arguments)
        return 0
    return cli.main(["mount"] + arguments)


def umount_main(argv: Optional[Sequence[str]] = None) -> int:
    """Unmount as `umount.fuse.vdiskfs MOUNTPOINT` and wait for the daemon to exit."""
    from vdiskfs import cli

    parser = argparse.ArgumentParser(prog=sys.argv[0], description="Unmount a vdiskfs mount.")
    parser.add_argument("target", metavar="MOUNTPOINT")
    # umount(8) passes these to helpers; the kernel unmount ignores them.
    for flag in ("-n", "-l", "-f", "-v", "-r"):
        parser.add_argument(flag, action="store_true", help="ignored")
    parser.add_argument("-t", dest="type", help="ignored")
    parser.add_argument("-N", dest="namespace", help="ignored")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return cli.main(["umount", args.target])


def is_helper_call(argv: Sequence[str], commands: Sequence[str]) -> bool:
    """Return whether `vdiskfs ARGV` is the `vdiskfs IMAGE MOUNTPOINT -o ...` of mount.fuse3."""
    return (len(argv) >= 2 and argv[0] not in commands and not argv[0].startswith("-")
            and not argv[1].startswith("-"))
