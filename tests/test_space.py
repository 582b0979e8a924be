"""Tests of the space a mount reports: df shows the host file system of the image, and du
of an exposed file shows what the image occupies on disk."""

from __future__ import annotations

import os
import subprocess

from helpers import mounted, needs_fuse, qemu_img, qemu_io


@needs_fuse
def test_df_shows_host_file_system(tmp_path, mountpoint):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")

    with mounted(image, mountpoint, "--read-only"):
        mounted_stat = os.statvfs(mountpoint)
        host_stat = os.statvfs(tmp_path)

    assert mounted_stat.f_frsize == host_stat.f_frsize
    assert mounted_stat.f_blocks == host_stat.f_blocks
    # Other processes may write meanwhile, so allow 64 MiB of difference in free space.
    assert abs(mounted_stat.f_bavail - host_stat.f_bavail) * host_stat.f_frsize < 64 << 20


@needs_fuse
def test_du_shows_allocated_size(tmp_path, mountpoint):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    qemu_io(image, "write -P 0x11 0 3M")
    allocated = os.stat(image).st_blocks * 512

    with mounted(image, mountpoint, "--read-only") as exposed:
        du = subprocess.run(["du", "-B1", exposed], capture_output=True, text=True, check=True)
        apparent = subprocess.run(["du", "-B1", "--apparent-size", exposed],
                                  capture_output=True, text=True, check=True)

    assert int(du.stdout.split()[0]) == allocated
    assert int(apparent.stdout.split()[0]) == 64 << 20
    assert allocated < 64 << 20
