"""Command-line entry point: `vdiskfs COMMAND [options]`.

Each command lives in vdiskfs/commands/<name>.py and provides:
- HELP: a one-line summary for the command list;
- add_arguments(parser): adds the command's options to its argparse parser;
- run(args) -> int: does the work and returns the exit status.

A VdiskError or OSError that reaches main() is printed as one line,
`vdiskfs: <message>`, with exit status 1; a traceback appears only with --debug.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

from vdiskfs import __version__, mounthelper
from vdiskfs.errors import VdiskError

COMMANDS = ("mount", "umount", "info", "create", "check", "commit", "snapshot", "map")

EPILOG = """\
examples:
  vdiskfs mount disk.qcow2 /mnt/disk      expose disk.qcow2 as /mnt/disk/disk.raw
  vdiskfs umount /mnt/disk                flush, unmount and wait for the daemon
  vdiskfs info disk.qcow2                 show format, size, features and backing chain
  vdiskfs create -f qcow2 disk.qcow2 10G  make a new, empty image
  vdiskfs check disk.qcow2                find corruptions and leaked clusters
  vdiskfs commit work.qcow2               write an overlay's data into its backing image
"""


def build_parser(commands: Sequence[str] = COMMANDS) -> argparse.ArgumentParser:
    """Build the parser with the subcommands in `commands`, importing only their modules."""
    parser = argparse.ArgumentParser(
        prog="vdiskfs",
        description="Expose qcow2 and raw disk images as flat raw files through FUSE.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vdiskfs {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in commands:
        module = importlib.import_module(f"vdiskfs.commands.{name}")
        subparser = subparsers.add_parser(
            name, help=module.HELP, description=module.HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        subparser.add_argument("--debug", action="store_true",
                               help="log debug messages and show tracebacks")
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if mounthelper.is_helper_call(arguments, COMMANDS):
        # fuse3's mount.fuse3 runs `vdiskfs IMAGE MOUNTPOINT -o OPTIONS` for fuse.vdiskfs.
        return mounthelper.main(arguments, prog="vdiskfs")
    # Importing every command costs time that a mount should not spend (pyfuse3 and trio are
    # needed by mount alone), so a known command builds a parser with just that command.
    if arguments and arguments[0] in COMMANDS:
        parser = build_parser([arguments[0]])
    else:
        parser = build_parser()
    args = parser.parse_args(arguments)

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="vdiskfs: %(message)s" if not args.debug else
        "%(asctime)s %(name)s %(levelname)s: %(message)s",
    )

    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader of our output went away (`vdiskfs map IMAGE | head`): stop quietly, and
        # keep Python from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (VdiskError, OSError) as error:
        if args.debug:
            raise
        print(f"vdiskfs: {format_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vdiskfs: interrupted", file=sys.stderr)
        return 130


def format_error(error: BaseException) -> str:
    """Render an error as one line; OSError shows its file name and strerror."""
    if isinstance(error, OSError) and error.strerror:
        if error.filename is not None:
            return f"{error.filename}: {error.strerror}"
        return error.strerror
    return str(error)
