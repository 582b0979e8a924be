"""`vdiskfs snapshot`: list, create, apply and delete internal snapshots, as `qemu-img snapshot`.

TARGET is an image file, or the mount point of a running writable vdiskfs mount: then the
daemon takes the snapshot between two requests, after flushing, so it is a consistent point.
"""

from __future__ import annotations

import argparse
import datetime
import os

from vdiskfs.errors import VdiskError
from vdiskfs.formats.qcow2.snapshot import snapshot_fields
from vdiskfs.registry import open_chain
from vdiskfs.sizes import format_size

HELP = "list, create, apply or delete internal snapshots of a qcow2 image or a live mount"

LIST_FORMAT = "%-9s %-16s %8s %19s %12s %10s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    action.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot named NAME")
    action.add_argument("-a", dest="apply", metavar="SNAPSHOT",
                        help="revert the disk to SNAPSHOT (an ID or name); image files only")
    action.add_argument("-d", dest="delete", metavar="SNAPSHOT",
                        help="delete SNAPSHOT (an ID or name)")
    parser.add_argument("-f", "--format", dest="format_name", metavar="FMT",
                        help="image format; probed when omitted (only qcow2 has snapshots)")
    parser.add_argument("target", metavar="TARGET",
                        help="qcow2 image, or the mount point of a running writable mount")
    parser.epilog = ("examples:\n"
                     "  vdiskfs snapshot -c before-upgrade disk.qcow2\n"
                     "  vdiskfs snapshot -c checkpoint /mnt/disk    (live, on a mounted disk)\n"
                     "  vdiskfs snapshot -l disk.qcow2")


def run(args: argparse.Namespace) -> int:
    if os.path.isdir(args.target):
        from vdiskfs.control import request_snapshot

        snapshots = request_snapshot(args.target, list_only=args.list, create=args.create,
                                     delete=args.delete, apply=args.apply)
        if args.list:
            print(render_snapshot_list(snapshots))
        return 0

    from vdiskfs.formats.qcow2 import snapshot_ops

    read_only = bool(args.list)
    try:
        driver = open_chain(args.target, args.format_name, read_only=read_only)
    except (VdiskError, OSError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise type(error)(f"cannot open {args.target}: {reason}") from None

    try:
        if not hasattr(driver, "snapshots"):
            raise VdiskError(f"{args.target}: {driver.format_name} images have no internal snapshots")
        if args.list:
            if driver.snapshots:
                print(render_snapshot_list([snapshot_fields(s) for s in driver.snapshots]))
        elif args.create is not None:
            _run(snapshot_ops.create_snapshot, driver, args.create, "create")
        elif args.apply is not None:
            _run(snapshot_ops.apply_snapshot, driver, args.apply, "apply")
        else:
            _run(snapshot_ops.delete_snapshot, driver, args.delete, "delete")
    finally:
        driver.close()
    return 0


def _run(operation, driver, name: str, verb: str) -> None:
    try:
        operation(driver, name)
    except VdiskError as error:
        raise VdiskError(f"could not {verb} snapshot '{name}': {error}") from None


def render_snapshot_list(snapshots: list) -> str:
    """Render snapshots in the columns of `qemu-img snapshot -l`."""
    rows = ["Snapshot list:", LIST_FORMAT % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")]
    for snapshot in snapshots:
        date = datetime.datetime.fromtimestamp(snapshot["date-sec"]).strftime("%Y-%m-%d %H:%M:%S")
        seconds = snapshot["vm-clock-sec"]
        clock = (f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}."
                 f"{snapshot['vm-clock-nsec'] // 1_000_000:03d}")
        icount = "" if snapshot.get("icount", -1) < 0 else str(snapshot["icount"])
        rows.append(LIST_FORMAT % (snapshot["id"], snapshot["name"],
                                   format_size(snapshot["vm-state-size"]), date, clock, icount))
    return "\n".join(rows)
