"""Shared test helpers: running vdiskfs and qemu-img, and mounting images for real."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

HAVE_FUSE = os.path.exists("/dev/fuse")

needs_fuse = pytest.mark.skipif(not HAVE_FUSE, reason="/dev/fuse is missing, so nothing can be mounted")


def vdiskfs(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the vdiskfs CLI of this checkout and capture its output as text."""
    result = subprocess.run([sys.executable, "-m", "vdiskfs", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"vdiskfs {' '.join(map(str, args))} exited {result.returncode}: "
                             f"{result.stderr.strip()}")
    return result


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))} failed: {result.stderr.strip()}")
    return result


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    """Run qemu-io commands (each like 'write -P 0x11 0 64k') on `image`."""
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, str(image)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0 or "error" in output.lower() or "failed" in output.lower():
        raise AssertionError(f"qemu-io {commands} on {image} failed: {output.strip()}")


def qemu_info(image: Path) -> dict:
    return json.loads(qemu_img("info", "--output=json", image).stdout)


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reference_raw(image: Path, tmp_path: Path, *options: str) -> Path:
    """Convert `image` to raw with qemu-img, the oracle for what a read must return."""
    raw = tmp_path / (image.name + ".reference.raw")
    qemu_img("convert", *options, "-O", "raw", image, raw)
    return raw


@contextlib.contextmanager
def mounted(image: Path, mountpoint: Path, *options: str) -> Iterator[Path]:
    """Mount `image` with `vdiskfs mount` and yield the exposed raw file; unmount on exit."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    vdiskfs("mount", *options, image, mountpoint)
    try:
        yield mountpoint / (Path(image).stem + ".raw")
    finally:
        vdiskfs("umount", mountpoint)
