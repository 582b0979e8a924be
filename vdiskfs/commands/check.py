"""`vdiskfs check`: check the metadata of an image, and optionally repair it, as `qemu-img check` does.

Exit status, as qemu-img's: 0 no errors, 1 the check did not complete (an internal error,
or an image that cannot be opened), 2 corruptions found, 3 only leaked clusters found.
"""

from __future__ import annotations

import argparse
import json
import sys

from vdiskfs.errors import VdiskError
from vdiskfs.formats.qcow2 import Qcow2Driver
from vdiskfs.formats.qcow2.check import REPAIR_MODES, Qcow2Checker, describe_repair
from vdiskfs.locking import acquire_image_lock, lock_mode
from vdiskfs.registry import DEFAULT_CACHE_SIZE, open_image, probe_format

HELP = "check an image's metadata for corruptions and leaked clusters, and repair them"

EPILOG = """\
Messages about each damaged cluster go to standard error, the summary to standard output.
--repair leaks lowers refcounts that are too high; --repair all also raises refcounts that
are too low and corrects QCOW_OFLAG_COPIED. The image is opened read-write only for --repair.

examples:
  vdiskfs check disk.qcow2
  vdiskfs check --output json disk.qcow2
  vdiskfs check --repair leaks disk.qcow2
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="image file to check")
    parser.add_argument("-f", "--format", dest="format_name", metavar="FMT",
                        help="image format (qcow2 or raw); probed when omitted")
    parser.add_argument("-r", "--repair", choices=sorted(REPAIR_MODES),
                        help="repair leaked clusters only (leaks), or every error found (all)")
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="check an image that a writer holds, as `qemu-img check -U` does; "
                             "the result may show errors that the writer is in the middle of")
    parser.add_argument("--output", choices=("human", "json"), default="human",
                        help="summary format; json uses the keys of `qemu-img check --output=json`")
    parser.epilog = EPILOG


def run(args: argparse.Namespace) -> int:
    format_name = args.format_name or probe_format(args.image)
    if format_name != "qcow2":
        # Raw images have no metadata. qemu-img 7.2 reports that and exits 63, and scripts
        # that run both tools rely on the same status.
        print(f"vdiskfs: {args.image}: this image format does not support checks",
              file=sys.stderr)
        return 63

    def report(line: str) -> None:
        print(line, file=sys.stderr)

    if args.repair and args.force_share:
        print("vdiskfs: --force-share cannot be used with --repair, because a repair writes",
              file=sys.stderr)
        return 1

    try:
        if args.repair:
            driver = open_for_repair(args.image)
        else:
            driver = open_image(args.image, "qcow2", read_only=True,
                                force_share=args.force_share)
    except (VdiskError, OSError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        print(f"vdiskfs: cannot open {args.image}: {reason}", file=sys.stderr)
        return 1

    try:
        checker = Qcow2Checker(driver, report)
        if args.repair:
            result = checker.repair(REPAIR_MODES[args.repair])
        else:
            result = checker.check()
    except VdiskError as error:
        print(f"vdiskfs: check of {args.image} failed: {error}", file=sys.stderr)
        return 1
    finally:
        driver.close()

    result.filename = args.image
    if args.output == "json":
        print(json.dumps(result.to_json(), indent=4))
    else:
        if result.leaks_fixed or result.corruptions_fixed:
            print(describe_repair(result))
        print(result.render_human())
    return result.exit_code()


def open_for_repair(filename: str) -> Qcow2Driver:
    """Open a qcow2 image read-write as found, for the checker to repair.

    A normal read-write open rebuilds the refcounts of a dirty image and serves an image
    marked corrupt read-only. The repair must see and fix the image as it is, so the image
    is opened read-only and then switched to read-write by hand. The image is locked for
    writing first, as a read-write open_image() would lock it, so that no mount or QEMU
    process writes it during the repair.
    """
    image_lock = acquire_image_lock(filename, lock_mode(read_only=False))
    try:
        driver = Qcow2Driver.open(filename, read_only=True, cache_size=DEFAULT_CACHE_SIZE)
    except BaseException:
        if image_lock is not None:
            image_lock.release()
        raise
    driver.image_lock = image_lock
    try:
        data_file_fd = driver.data_file_fd
        driver._reopen_read_write()
        # The external data file, if any, stays read-only: a repair changes only metadata.
        driver.data_file_fd = data_file_fd
        driver.read_only = False
        driver.enable_writes()
    except BaseException:
        driver.close()
        raise
    return driver
