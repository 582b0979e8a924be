"""`vdiskfs create`: make a new qcow2 or raw image, with `qemu-img create`'s options."""

from __future__ import annotations

import argparse
import os
from typing import Dict, Optional, Tuple

from vdiskfs import progress
from vdiskfs.errors import BackingChainError, VdiskError
from vdiskfs.formats.create_options import (
    InvalidOptionError, describe_options, join_choices, parse_options, split_option_string)
from vdiskfs.formats.qcow2.create import QCOW2_OPTIONS, Qcow2CreateOptions, create_qcow2
from vdiskfs.formats.raw_create import RAW_OPTIONS, create_raw
from vdiskfs.registry import DRIVERS, open_chain, probe_format, resolve_backing_path

HELP = "create a new qcow2 or raw image"

OPTION_SPECS = {"qcow2": QCOW2_OPTIONS, "raw": RAW_OPTIONS}

EPILOG = """\
SIZE takes a K, M, G or T suffix. With a backing file, SIZE defaults to the backing
file's virtual size. A relative backing file name is stored as given and is looked up
relative to IMAGE's directory.

examples:
  vdiskfs create -f qcow2 disk.qcow2 10G
  vdiskfs create -f qcow2 -o cluster_size=2M,lazy_refcounts=on disk.qcow2 1T
  vdiskfs create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
  vdiskfs create -f raw -o preallocation=falloc disk.raw 4G
  vdiskfs create -f qcow2 -o help
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", dest="format_name", default="raw", metavar="FMT",
                        help="format of the new image: qcow2 or raw (default raw, as in qemu-img)")
    parser.add_argument("-o", dest="option_strings", action="append", default=[],
                        metavar="OPTIONS",
                        help="format options as name=value,name=value (repeatable; a later "
                             "value wins; ',,' is a comma inside a value; '-o help' lists them)")
    parser.add_argument("-b", dest="backing_file", metavar="BACKING",
                        help="backing file of a qcow2 image, stored in the header as given")
    parser.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT",
                        help="format of the backing file, qcow2 or raw (probed when omitted)")
    parser.add_argument("-u", dest="unsafe", action="store_true",
                        help="do not open the backing file (then SIZE and -F are required)")
    parser.add_argument("-q", "--quiet", dest="quiet", action="store_true",
                        help="show no progress bar (shown on a terminal while "
                             "preallocation=full writes zeros)")
    parser.add_argument("image", metavar="IMAGE", nargs="?", help="file name of the new image")
    parser.add_argument("size", metavar="SIZE", nargs="?", help="virtual disk size in bytes")
    parser.epilog = EPILOG


def run(args: argparse.Namespace) -> int:
    specs = OPTION_SPECS.get(args.format_name)
    if specs is None:
        raise InvalidOptionError(
            f"invalid format {args.format_name}: must be {join_choices(sorted(OPTION_SPECS))}")

    values: Dict[str, str] = {}
    for text in args.option_strings:
        values.update(split_option_string(text))
    if "help" in values or "?" in values:
        print(describe_options(specs, args.format_name))
        return 0

    if args.image is None:
        raise InvalidOptionError("missing IMAGE: give the file name of the image to create")
    progress.set_quiet(args.quiet)
    try:
        create_image(args, values)
    except (VdiskError, OSError) as error:
        raise type(error)(f"cannot create {args.image}: {_reason(error)}") from None
    return 0


def create_image(args: argparse.Namespace, values: Dict[str, str]) -> None:
    """Merge -b, -F and SIZE into the -o values, fill in the size, and create the image."""
    # As in qemu-img, -b and -F replace the -o options of the same meaning, but a size
    # must not be given twice.
    if args.backing_file is not None:
        values["backing_file"] = args.backing_file
    if args.backing_fmt is not None:
        values["backing_fmt"] = args.backing_fmt
    if args.size is not None:
        if "size" in values:
            raise InvalidOptionError(
                f"invalid size {args.size}: the size is given twice, as SIZE and as -o size")
        values["size"] = args.size

    if args.format_name == "raw":
        for name in ("backing_file", "backing_fmt"):
            if name in values:
                raise InvalidOptionError(
                    f"invalid {name} {values[name]}: a raw image has no backing file")

    options = parse_options(values, OPTION_SPECS[args.format_name], args.format_name)
    backing_file = options.get("backing_file")
    backing_fmt = options.get("backing_fmt")
    if backing_fmt is not None and backing_fmt not in DRIVERS:
        raise InvalidOptionError(
            f"invalid backing_fmt {backing_fmt}: must be {join_choices(sorted(DRIVERS))}")

    if backing_file is not None and not args.unsafe:
        backing_size, options["backing_fmt"] = inspect_backing_file(
            args.image, backing_file, backing_fmt)
        options.setdefault("size", backing_size)
    elif backing_file is not None and backing_fmt is None:
        raise InvalidOptionError(
            "missing backing_fmt: -u does not open the backing file, so give its format with -F")
    elif backing_file is not None:
        # -u opens nothing, but an image that names itself can never be opened.
        path = resolve_backing_path(args.image, backing_file)
        if os.path.abspath(path) == os.path.abspath(args.image):
            raise InvalidOptionError(
                f"invalid backing_file {backing_file}: it is the image being created")

    if "size" not in options:
        raise InvalidOptionError("missing size: give SIZE, or a backing file to take it from")

    if args.format_name == "qcow2":
        create_qcow2(args.image, Qcow2CreateOptions(**options))
    else:
        create_raw(args.image, **options)


def inspect_backing_file(image: str, backing_file: str,
                         backing_fmt: Optional[str]) -> Tuple[int, str]:
    """Open the backing chain of a new image read-only, and return its virtual size and format.

    The format is probed when `backing_fmt` is None. A relative `backing_file` is found
    relative to the directory of `image`, as it will be when the image is opened.
    """
    path = resolve_backing_path(image, backing_file)
    if _is_same_file(path, image):
        raise InvalidOptionError(
            f"invalid backing_file {backing_file}: it is the image being created")

    try:
        if backing_fmt is None:
            backing_fmt = probe_format(path)
        backing = open_chain(path, backing_fmt, read_only=True)
    except OSError as error:
        raise BackingChainError(
            f"cannot open backing file {path}: {_reason(error)}") from None
    except VdiskError as error:
        raise type(error)(f"backing file {path}: {error}") from None

    try:
        return backing.virtual_size, backing_fmt
    finally:
        backing.close()


def _is_same_file(first: str, second: str) -> bool:
    if os.path.abspath(first) == os.path.abspath(second):
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
