"""Choosing a format driver and opening a whole backing chain."""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

from vdiskfs.driver import Driver
from vdiskfs.errors import BackingChainError, UnsupportedFeatureError, VdiskError
from vdiskfs.formats.qcow2 import Qcow2Driver
from vdiskfs.formats.raw import RawDriver
from vdiskfs.hostfile import open_host_file
from vdiskfs.locking import acquire_image_lock, lock_mode

log = logging.getLogger(__name__)

DRIVERS = {driver.format_name: driver for driver in (Qcow2Driver, RawDriver)}

# Backing chains deeper than this are rejected, so a crafted chain cannot exhaust file
# descriptors or memory. QEMU sets no such limit; real chains stay far below it.
MAX_CHAIN_DEPTH = 256

DEFAULT_CACHE_SIZE = 32 * 1024 * 1024

PROBE_LENGTH = 512

_PROTOCOL_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def probe_format(filename: str) -> str:
    """Return the name of the format whose driver scores highest for `filename`."""
    # open_host_file() adds O_NOATIME, so that probing evidence leaves its access time alone.
    fd = open_host_file(filename, read_only=True)
    try:
        head = os.pread(fd, PROBE_LENGTH, 0)
    finally:
        os.close(fd)
    return format_of_head(head, filename)


def format_of_head(head: bytes, filename: str) -> str:
    """Return the name of the format whose driver scores highest for `head`, a file's first bytes."""
    scores = {name: driver.probe(head, filename) for name, driver in DRIVERS.items()}
    return max(scores, key=scores.get)


def open_image(filename: str, format_name: Optional[str] = None, *, read_only: bool = True,
               cache_size: int = DEFAULT_CACHE_SIZE, force_share: bool = False) -> Driver:
    """Open one layer, probing its format unless `format_name` is given. Backing files stay closed.

    The image file is locked as QEMU locks it (see vdiskfs.locking) before anything reads
    or writes it. Raises ImageLockedError when another process holds a conflicting lock.
    `force_share` lets a read-only open share the image with writers, like `qemu-img -U`.
    """
    if force_share and not read_only:
        raise ValueError("force_share needs a read-only open")
    driver = DRIVERS.get(format_name) if format_name is not None else None
    if format_name is not None and driver is None:
        known = ", ".join(sorted(DRIVERS))
        raise UnsupportedFeatureError(f"unknown format '{format_name}' (known: {known})")

    # NOTE: an external data file of a qcow2 image is not locked, while QEMU locks it too.
    image_lock = acquire_image_lock(filename, lock_mode(read_only, force_share))
    try:
        probed = driver is None
        if probed:
            driver = DRIVERS[probe_format(filename)]
        opened = driver.open(filename, read_only=read_only, cache_size=cache_size)
        opened.format_probed = probed
    except BaseException:
        if image_lock is not None:
            image_lock.release()
        raise
    opened.image_lock = image_lock
    return opened


def resolve_backing_path(overlay_filename: str, backing_filename: str) -> str:
    """Return the path of a backing file as QEMU finds it.

    A relative name is relative to the directory of the overlay as the overlay was named
    (symbolic links in that name are not resolved first).
    """
    if os.path.isabs(backing_filename):
        return backing_filename
    if _PROTOCOL_PREFIX.match(backing_filename) and not os.path.exists(
            os.path.join(os.path.dirname(overlay_filename), backing_filename)):
        protocol = backing_filename.split(":", 1)[0]
        raise UnsupportedFeatureError(
            f"backing file '{backing_filename}' uses the '{protocol}' protocol; "
            f"vdiskfs opens only local files")
    return os.path.join(os.path.dirname(overlay_filename), backing_filename)


def open_chain(filename: str, format_name: Optional[str] = None, *, read_only: bool = True,
               cache_size: int = DEFAULT_CACHE_SIZE, snapshot: Optional[str] = None,
               force_share: bool = False) -> Driver:
    """Open `filename` and every backing file below it; return the top layer.

    Backing files are always opened read-only. With `snapshot` (an ID or name), the top
    layer serves that internal snapshot read-only. Raises BackingChainError when a backing
    file is missing, when the chain loops, or when it is deeper than MAX_CHAIN_DEPTH.
    Every file is locked as open_image() locks it, and `force_share` applies to all of them.
    """
    top = open_image(filename, format_name, read_only=read_only, cache_size=cache_size,
                     force_share=force_share)
    try:
        if snapshot is not None:
            select = getattr(top, "select_snapshot", None)
            if select is None:
                raise UnsupportedFeatureError(f"{top.format_name} images have no internal snapshots")
            select(snapshot)
        _open_backing_files(top, cache_size, force_share)
    except BaseException:
        top.close()
        raise
    return top


def _open_backing_files(top: Driver, cache_size: int, force_share: bool = False) -> None:
    names = [top.filename]
    stat = os.stat(top.filename)
    seen = {(stat.st_dev, stat.st_ino)}

    layer = top
    while layer.backing_filename is not None:
        if len(names) > MAX_CHAIN_DEPTH:
            raise BackingChainError(f"backing chain is deeper than {MAX_CHAIN_DEPTH} files")

        path = resolve_backing_path(layer.filename, layer.backing_filename)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise BackingChainError(f"backing file {path} of {layer.filename} not found") from None
        except OSError as error:
            raise BackingChainError(
                f"cannot open backing file {path}: {error.strerror}") from None

        identity = (stat.st_dev, stat.st_ino)
        if identity in seen:
            chain = " -> ".join(names + [path])
            raise BackingChainError(f"backing chain loops: {chain}")
        seen.add(identity)
        names.append(path)

        try:
            backing = open_image(path, layer.backing_format, read_only=True,
                                 cache_size=cache_size, force_share=force_share)
        except OSError as error:
            raise BackingChainError(
                f"cannot open backing file {path}: {error.strerror}") from None
        except VdiskError as error:
            raise type(error)(f"backing file {path}: {error}") from None
        layer.attach_backing(backing)
        layer = backing
