"""Writes that would change the probed format of a raw image are rejected with EPERM.

A guest of a raw image mounted without --format could otherwise write a qcow2 header
naming a host file as backing file, and the next probing open would read that file.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from helpers import mounted, needs_fuse
from images import MiB, daemon_log_lines, read_bytes
from vdiskfs.errors import FormatChangeError
from vdiskfs.registry import open_chain, probe_format

# The start of a qcow2 version 3 header: magic, version, backing_file_offset 0x200.
QCOW2_HEAD = b"QFI\xfb" + struct.pack(">IQ", 3, 0x200)


def raw_image(directory: Path) -> Path:
    image = directory / "disk.img"
    image.write_bytes(b"\x5a" * MiB)
    return image


def test_probed_raw_rejects_qcow2_magic(tmp_path):
    image = raw_image(tmp_path)
    driver = open_chain(str(image), read_only=False)
    try:
        with pytest.raises(FormatChangeError, match="--format raw"):
            driver.write(0, QCOW2_HEAD + bytes(500))
    finally:
        driver.close()
    assert probe_format(str(image)) == "raw"
    assert read_bytes(image, 0, 16) == b"\x5a" * 16


def test_magic_built_by_two_writes_rejected(tmp_path):
    image = raw_image(tmp_path)
    driver = open_chain(str(image), read_only=False)
    try:
        driver.write(0, b"QFI")  # the file still probes as raw
        with pytest.raises(FormatChangeError):
            driver.write(3, b"\xfb" + struct.pack(">I", 3))
    finally:
        driver.close()
    assert probe_format(str(image)) == "raw"


def test_other_writes_allowed(tmp_path):
    image = raw_image(tmp_path)
    driver = open_chain(str(image), read_only=False)
    try:
        driver.write(0, b"\x00" * 4096)
        driver.write(4, QCOW2_HEAD)
        driver.write(512, QCOW2_HEAD)
    finally:
        driver.close()
    assert read_bytes(image, 512, len(QCOW2_HEAD)) == QCOW2_HEAD


def test_given_format_allows_any_write(tmp_path):
    image = raw_image(tmp_path)
    driver = open_chain(str(image), "raw", read_only=False)
    try:
        driver.write(0, QCOW2_HEAD)
    finally:
        driver.close()
    assert probe_format(str(image)) == "qcow2"


@needs_fuse
def test_mount_returns_eperm_for_qcow2_head(tmp_path, mountpoint):
    image = raw_image(tmp_path)
    with mounted(image, mountpoint) as disk:
        fd = os.open(disk, os.O_RDWR)
        try:
            with pytest.raises(OSError) as raised:
                os.pwrite(fd, QCOW2_HEAD + bytes(4096 - len(QCOW2_HEAD)), 0)
            assert raised.value.errno == errno.EPERM
            assert os.pwrite(fd, b"\x11" * 4096, 4096) == 4096
            assert os.pwrite(fd, b"\x22" * 512, 0) == 512
            os.fsync(fd)
        finally:
            os.close(fd)
        log_lines = daemon_log_lines(mountpoint, "ERROR", "WARNING")
        assert any("would make it probe as qcow2" in line for line in log_lines)
    assert probe_format(str(image)) == "raw"
    assert read_bytes(image, 0, 512) == b"\x22" * 512


@needs_fuse
def test_mount_with_format_raw_allows_qcow2_head(tmp_path, mountpoint):
    image = raw_image(tmp_path)
    with mounted(image, mountpoint, "--format", "raw") as disk:
        fd = os.open(disk, os.O_RDWR)
        try:
            assert os.pwrite(fd, QCOW2_HEAD, 0) == len(QCOW2_HEAD)
        finally:
            os.close(fd)
    assert read_bytes(image, 0, len(QCOW2_HEAD)) == QCOW2_HEAD
