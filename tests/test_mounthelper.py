"""Tests of the mount(8) helpers: option mapping, and real `mount -t fuse.vdiskfs` and
`mount -T FSTAB` calls.

mount(8) runs fuse3's mount.fuse3, which runs `vdiskfs` from the default PATH. So that the
tests change nothing outside their temporary directory, each real mount runs in a private
mount namespace (unshare -m) in which a directory with a `vdiskfs` wrapper for this checkout
is bind-mounted over /usr/local/bin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import wait_for_exit
from helpers import mounted, needs_fuse, qemu_img, qemu_io, reference_raw, sha256_of_file
from vdiskfs.daemon import MountError, RuntimeFiles
from vdiskfs.mounthelper import is_helper_call, mount_arguments

REPOSITORY = Path(__file__).resolve().parent.parent

needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None or not Path("/sbin/mount.fuse3").exists()
    or os.geteuid() != 0,
    reason="needs root, unshare and fuse3's /sbin/mount.fuse3")


def test_options_map_to_mount_options():
    arguments = mount_arguments("/images/disk.qcow2", "/mnt/disk", [
        "rw,overlay=/images/work.qcow2,format=qcow2,cache-size=64M,allow_other,partitions,"
        "noatime,nofail,_netdev,x-systemd.automount,dev,suid"])

    assert arguments == ["--overlay", "/images/work.qcow2", "--format", "qcow2",
                         "--cache-size", "64M", "--allow-other", "--partitions",
                         "-o", "noatime,dev,suid", "/images/disk.qcow2", "/mnt/disk"]


def test_read_only_option_maps():
    arguments = mount_arguments("disk.qcow2", "/mnt", ["ro", "overlay-temporary"])

    assert arguments == ["--read-only", "--overlay-temporary", "disk.qcow2", "/mnt"]


def test_snapshot_and_force_share_map():
    arguments = mount_arguments("disk.qcow2", "/mnt", ["ro,snapshot=before-upgrade,force-share"])

    assert arguments == ["--read-only", "--snapshot", "before-upgrade", "--force-share",
                         "disk.qcow2", "/mnt"]


def test_read_only_overlay_missing_uses_image(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")

    arguments = mount_arguments(str(image), "/mnt", [f"ro,overlay={tmp_path / 'work.qcow2'}"])

    assert arguments == ["--read-only", str(image), "/mnt"]


def test_read_only_overlay_serves_overlay(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    overlay = tmp_path / "work.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", image, "-F", "qcow2", overlay)

    arguments = mount_arguments(str(image), "/mnt", [f"ro,format=qcow2,overlay={overlay}"])

    assert arguments == ["--read-only", str(overlay), "/mnt"]


def test_read_only_overlay_of_other_image_rejected(tmp_path):
    image = tmp_path / "disk.qcow2"
    other = tmp_path / "other.qcow2"
    for path in (image, other):
        qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    overlay = tmp_path / "work.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", other, "-F", "qcow2", overlay)

    with pytest.raises(MountError, match="does not have .* as its backing file"):
        mount_arguments(str(image), "/mnt", [f"ro,overlay={overlay}"])


def test_helper_call_detected():
    commands = ("mount", "umount", "info")

    assert is_helper_call(["/images/disk.qcow2", "/mnt/disk", "-o", "ro"], commands)
    assert not is_helper_call(["mount", "disk.qcow2", "/mnt"], commands)
    assert not is_helper_call(["--version"], commands)
    assert not is_helper_call(["info", "-f", "qcow2", "disk.qcow2"], commands)


def run_in_namespace(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace where `vdiskfs` is this checkout."""
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir(exist_ok=True)
    wrapper = wrapper_dir / "vdiskfs"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPOSITORY} exec {sys.executable} -m vdiskfs "
                       f"\"$@\"\n")
    wrapper.chmod(0o755)
    full_script = "set -eu\n" + f"mount --bind {wrapper_dir} /usr/local/bin\n" + script
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", full_script],
                          capture_output=True, text=True, timeout=120)


def new_mountpoint(tmp_path: Path) -> tuple:
    """Create an empty mountpoint; return it and the pid file its daemon will write."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    return mountpoint, RuntimeFiles.for_mountpoint(str(mountpoint)).pid


def daemon_pid(output: str) -> int:
    for line in output.splitlines():
        if line.startswith("pid "):
            return int(line.split()[1])
    raise AssertionError(f"no daemon pid in the output: {output}")


@needs_fuse
@needs_unshare
def test_mount_type_fuse_vdiskfs(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "8M")
    qemu_io(image, "write -P 0x5a 1M 64k")
    expected = sha256_of_file(reference_raw(image, tmp_path))
    mountpoint, pid_file = new_mountpoint(tmp_path)

    result = run_in_namespace(tmp_path, textwrap.dedent(f"""\
        mount -t fuse.vdiskfs {image} {mountpoint} -o ro
        echo "pid $(cat {pid_file})"
        findmnt -n -o FSTYPE,OPTIONS {mountpoint}
        sha256sum {mountpoint}/disk.raw
        if touch {mountpoint}/disk.raw 2>/dev/null; then echo writable; fi
        umount {mountpoint}
        """))

    assert result.returncode == 0, result.stderr
    wait_for_exit(daemon_pid(result.stdout), timeout=30)
    assert "fuse.vdiskfs ro," in result.stdout
    assert expected in result.stdout
    assert "writable" not in result.stdout


@needs_fuse
@needs_unshare
def test_fstab_line_with_overlay(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "8M")
    qemu_io(image, "write -P 0x11 0 1M")
    overlay = tmp_path / "disk.overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", image, "-F", "qcow2", overlay)
    qemu_io(overlay, "write -P 0x22 512k 64k")
    expected = sha256_of_file(reference_raw(overlay, tmp_path))
    image_before = sha256_of_file(image)
    overlay_before = sha256_of_file(overlay)
    mountpoint, pid_file = new_mountpoint(tmp_path)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{image} {mountpoint} fuse.vdiskfs ro,overlay={overlay},nofail 0 0\n")

    result = run_in_namespace(tmp_path, textwrap.dedent(f"""\
        mount -T {fstab} {mountpoint}
        echo "pid $(cat {pid_file})"
        ls {mountpoint}
        sha256sum {mountpoint}/disk.overlay.raw
        umount {mountpoint}
        """))

    assert result.returncode == 0, result.stderr
    wait_for_exit(daemon_pid(result.stdout), timeout=30)
    assert expected in result.stdout
    assert sha256_of_file(image) == image_before
    assert sha256_of_file(overlay) == overlay_before


@needs_fuse
def test_umount_helper_waits(tmp_path, mountpoint):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")

    with mounted(image, mountpoint):
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from vdiskfs.mounthelper import umount_main; "
             "sys.exit(umount_main(sys.argv[1:]))", str(mountpoint), "-n"],
            capture_output=True, text=True, timeout=60, cwd=REPOSITORY)
        mounted_after = os.path.ismount(mountpoint)
        # mounted() unmounts again on exit; mount it back so that it has something to do.
        subprocess.run([sys.executable, "-m", "vdiskfs", "mount", str(image), str(mountpoint)],
                       check=True, cwd=REPOSITORY, timeout=60)

    assert result.returncode == 0, result.stderr
    assert not mounted_after
