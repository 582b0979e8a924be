"""Overlays: a qcow2 layer that takes the writes of a mount, so the image below never changes.

An overlay is an ordinary qcow2 image. Its header records the absolute path of the image
as the backing file, and the image's format as the backing format, so qemu-img and QEMU
open it like any other qcow2 image with a backing file. The image and its whole chain are
opened read-only, and only the overlay is opened read-write.

`vdiskfs mount --overlay FILE` creates FILE on first use and reuses it later, so the
writes survive unmounting; `vdiskfs commit FILE` writes them into the image.
`--overlay-temporary` puts the overlay in the temporary directory ($TMPDIR, else /tmp)
and removes it when the driver is closed at unmount.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Optional

from vdiskfs.driver import Driver
from vdiskfs.errors import BackingChainError, InvalidImageError
from vdiskfs.formats.qcow2 import Qcow2Driver
from vdiskfs.formats.qcow2.create import Qcow2CreateOptions, create_qcow2
from vdiskfs.locking import WRITABLE, acquire_image_lock
from vdiskfs.registry import DEFAULT_CACHE_SIZE, open_chain, probe_format, resolve_backing_path

log = logging.getLogger(__name__)

OVERLAY_CLUSTER_SIZE = 64 * 1024
TEMPORARY_PREFIX = "vdiskfs-overlay-"


class TemporaryOverlayDriver(Qcow2Driver):
    """A qcow2 overlay whose file is removed when the driver is closed."""

    def close(self) -> None:
        path = self.filename
        try:
            super().close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                log.info("removed temporary overlay %s", path)


def open_overlay(image: str, overlay: str, image_format: Optional[str] = None, *,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> Driver:
    """Open `overlay` read-write on top of `image` opened read-only; return the overlay.

    The overlay is created when it does not exist. An existing overlay must name `image`
    as its backing file, compared by device and inode. Otherwise BackingChainError is
    raised and neither file changes.
    """
    image = os.path.abspath(image)
    overlay = os.path.abspath(overlay)
    if _same_file(image, overlay):
        raise InvalidImageError(f"the overlay {overlay} is the image itself")

    base = open_chain(image, image_format, read_only=True, cache_size=cache_size)
    try:
        if not os.path.exists(overlay):
            _create_overlay(overlay, image, base)
            log.info("created overlay %s over %s", overlay, image)
        top = _open_existing_overlay(overlay, image, base, Qcow2Driver, cache_size)
    except BaseException:
        base.close()
        raise
    return top


def open_temporary_overlay(image: str, image_format: Optional[str] = None, *,
                           cache_size: int = DEFAULT_CACHE_SIZE) -> Driver:
    """Create an overlay over `image` in the temporary directory, removed again at close."""
    image = os.path.abspath(image)
    base = open_chain(image, image_format, read_only=True, cache_size=cache_size)
    try:
        fd, overlay = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=".qcow2")
        os.close(fd)
        try:
            _create_overlay(overlay, image, base)
            top = _open_existing_overlay(overlay, image, base, TemporaryOverlayDriver,
                                         cache_size)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(overlay)
            raise
    except BaseException:
        base.close()
        raise
    log.info("writes go to the temporary overlay %s, which is removed at unmount", overlay)
    return top


def _create_overlay(overlay: str, image: str, base: Driver) -> None:
    # create_qcow2 rounds the size up to a multiple of 512, as qemu-img does, so over a raw
    # image of another size the exposed disk ends in a few bytes that read as zeros.
    options = Qcow2CreateOptions(size=base.virtual_size, cluster_size=OVERLAY_CLUSTER_SIZE,
                                 backing_file=image, backing_fmt=base.format_name)
    create_qcow2(overlay, options)


def _open_existing_overlay(overlay: str, image: str, base: Driver, driver_class,
                           cache_size: int) -> Driver:
    image_lock = acquire_image_lock(overlay, WRITABLE)
    try:
        if probe_format(overlay) != "qcow2":
            raise InvalidImageError(f"the overlay {overlay} is not a qcow2 image")
        top = driver_class.open(overlay, read_only=False, cache_size=cache_size)
    except BaseException:
        if image_lock is not None:
            image_lock.release()
        raise
    top.image_lock = image_lock
    try:
        if top.read_only:
            raise InvalidImageError(
                f"the overlay {overlay} is marked corrupt and cannot take writes; run "
                f"'qemu-img check -r all {overlay}' or give another --overlay file")
        _check_backing(top, image, base)
        top.attach_backing(base)
    except BaseException:
        top.close()
        raise
    return top


def _check_backing(top: Driver, image: str, base: Driver) -> None:
    if top.backing_filename is None:
        raise BackingChainError(
            f"the overlay {top.filename} has no backing file, so it is not an overlay of "
            f"{image}; give another --overlay file")
    backing_path = resolve_backing_path(top.filename, top.backing_filename)
    if not _same_file(backing_path, image):
        raise BackingChainError(
            f"the overlay {top.filename} has the backing file {backing_path}, not {image}; "
            f"give another --overlay file")
    if top.backing_format is not None and top.backing_format != base.format_name:
        raise BackingChainError(
            f"the overlay {top.filename} records the backing format {top.backing_format}, "
            f"but {image} is {base.format_name}")


def _same_file(first: str, second: str) -> bool:
    try:
        first_stat, second_stat = os.stat(first), os.stat(second)
    except FileNotFoundError:
        return False
    return (first_stat.st_dev, first_stat.st_ino) == (second_stat.st_dev, second_stat.st_ino)
