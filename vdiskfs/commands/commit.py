"""`vdiskfs commit`: write the data of an overlay into its backing image, as `qemu-img commit` does.

Every range that the overlay maps as data, compressed data or zeros is written to the
backing image, so afterwards the backing image reads as the overlay did. Ranges that the
overlay leaves unallocated already read from the backing image and are skipped. The
overlay is opened read-only and keeps its data, like `qemu-img commit -d`. The backing
image is opened read-write on its own, with its own backing chain opened read-only below
it. A backing image smaller than the overlay is grown first.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable, Optional

from vdiskfs.driver import Driver, Run, RunKind
from vdiskfs.errors import BackingChainError, VdiskError
from vdiskfs.formats.qcow2 import Qcow2Driver
from vdiskfs.progress import progress_bar, set_quiet
from vdiskfs.registry import open_chain, open_image, resolve_backing_path

HELP = "write the data of an overlay into its backing image"

EPILOG = """\
The overlay is kept unchanged (qemu-img commit empties it unless given -d). After the
commit, the backing image reads as the overlay did, and the overlay still reads the same.

examples:
  vdiskfs commit work.qcow2          merge the writes of `vdiskfs mount --overlay work.qcow2`
  vdiskfs commit -q work.qcow2       the same, without progress bar or message
"""

# Bytes read from the overlay and written to the backing image per step.
COPY_CHUNK = 4 * 1024 * 1024

# Receives the guest offset up to which the commit is done, in bytes.
ProgressCallback = Callable[[int], None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overlay", metavar="OVERLAY",
                        help="qcow2 image whose data goes into its backing image")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print no progress bar and no message on success")
    parser.epilog = EPILOG


def run(args: argparse.Namespace) -> int:
    if args.quiet:
        set_quiet(True)

    top, backing = open_overlay_and_backing(args.overlay)
    # Ctrl-C stops the copy between two chunks, never inside a cluster update, so the
    # backing image keeps no half-allocated cluster.
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        with progress_bar(top.virtual_size, "committing") as bar:
            def advance(done: int) -> None:
                bar.update(done)
                if interrupted:
                    raise KeyboardInterrupt

            commit(top, backing, advance)
        backing.close()
    except (VdiskError, OSError) as error:
        _close_quietly(backing)
        raise type(error)(f"cannot commit {args.overlay}: {_reason(error)}") from None
    except KeyboardInterrupt:
        # Closing flushes the metadata of what was copied, so the backing image stays
        # consistent and without leaked clusters. It then contains part of the overlay's data.
        _close_quietly(backing)
        print(f"vdiskfs: commit of {args.overlay} interrupted; {backing.filename} now holds "
              f"part of its data; run the commit again to finish it", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        _close_quietly(top)

    if not args.quiet:
        print("Image committed.")
    return 0


def open_overlay_and_backing(overlay: str):
    """Open `overlay` read-only and its backing image read-write with its own chain."""
    try:
        top = open_image(overlay, read_only=True)
    except (VdiskError, OSError) as error:
        raise type(error)(f"cannot open {overlay}: {_reason(error)}") from None

    try:
        if top.backing_filename is None:
            raise BackingChainError(f"{overlay} has no backing file, so there is nothing to "
                                    f"commit it into")
        backing_path = resolve_backing_path(top.filename, top.backing_filename)
        try:
            backing = open_chain(backing_path, top.backing_format, read_only=False)
        except (VdiskError, OSError) as error:
            raise type(error)(f"cannot open backing file {backing_path} of {overlay} for "
                              f"writing: {_reason(error)}") from None
        if backing.read_only:
            backing.close()
            raise BackingChainError(f"backing file {backing_path} of {overlay} can only be "
                                    f"opened read-only, so the commit cannot write to it")
    except BaseException:
        top.close()
        raise
    return top, backing


def commit(top: Driver, backing: Driver, progress: Optional[ProgressCallback] = None) -> None:
    """Write every range that `top` maps itself into `backing`, then flush `backing`.

    Blocks for as long as the copy takes. `progress(done)` is called with the guest offset
    up to which the copy is done.
    """
    total = top.virtual_size
    if backing.virtual_size < total:
        backing.resize(total)

    for run in top.map_range(0, total):
        if run.kind is RunKind.DATA or run.kind is RunKind.COMPRESSED:
            _copy_data(top, backing, run, progress)
        elif run.kind is RunKind.ZERO:
            write_zeros(backing, run.guest_offset, run.length)
        if progress is not None:
            progress(run.end)
    backing.flush()


def _copy_data(top: Driver, backing: Driver, run: Run, progress) -> None:
    offset = run.guest_offset
    while offset < run.end:
        length = min(COPY_CHUNK, run.end - offset)
        backing.write(offset, top.read(offset, length))
        offset += length
        if progress is not None:
            progress(offset)


def write_zeros(driver: Driver, offset: int, length: int) -> None:
    """Make [offset, offset + length) of `driver` read as zeros."""
    if isinstance(driver, Qcow2Driver):
        # The qcow2 driver's discard keeps zeros visible: it sets the zero flag, or writes
        # zeros, wherever a backing file would otherwise show through.
        driver.discard(offset, length)
        return
    zeros = bytes(min(COPY_CHUNK, length))
    end = offset + length
    while offset < end:
        step = min(len(zeros), end - offset)
        driver.write(offset, zeros[:step])
        offset += step


def _close_quietly(driver: Driver) -> None:
    # Used on error paths only, where the first error is the one to report.
    try:
        driver.close()
    except (VdiskError, OSError):
        pass


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
