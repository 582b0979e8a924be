"""Internal snapshots made by vdiskfs and by QEMU, offline and on a live mount."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import mounted, needs_fuse, qemu_img, qemu_io, vdiskfs

MiB = 1 << 20


def snapshot_content(image: Path, name: str, directory: Path) -> bytes:
    output = directory / f"snapshot-{name}.raw"
    qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", image, output)
    return output.read_bytes()


def assert_check_clean(image: Path) -> None:
    check = qemu_img("check", image, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "leaked" not in check.stdout, check.stdout


def write_through(exposed: Path, writes) -> None:
    fd = os.open(exposed, os.O_RDWR)
    try:
        for offset, data in writes:
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def random_writes(rng: random.Random, size: int, count: int) -> list:
    writes = []
    for _ in range(count):
        offset = rng.randrange(size)
        length = min(rng.randint(1, 150000), size - offset)
        writes.append((offset, bytes([rng.randrange(1, 256)]) * length))
    return writes


def apply_writes(content: bytearray, writes) -> None:
    for offset, data in writes:
        content[offset:offset + len(data)] = data


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "8M")
    qemu_io(path, "write -P 0x11 0 2M", "write -P 0x12 5M 100k")
    return path


@needs_fuse
def test_qemu_snapshot_mounts(image, tmp_path):
    qemu_img("snapshot", "-c", "from-qemu", image)
    qemu_io(image, "write -P 0x22 0 1M")
    expected = snapshot_content(image, "from-qemu", tmp_path)

    with mounted(image, tmp_path / "by-name", "--snapshot", "from-qemu") as exposed:
        assert exposed.read_bytes() == expected
    with mounted(image, tmp_path / "by-id", "--snapshot", "1") as exposed:
        assert exposed.read_bytes() == expected
        with pytest.raises(OSError):
            write_through(exposed, [(0, b"x")])


def test_snapshot_mount_unknown_name(image, tmp_path):
    (tmp_path / "mnt").mkdir()
    result = vdiskfs("mount", "--snapshot", "missing", image, tmp_path / "mnt", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"vdiskfs: cannot open {image}: snapshot 'missing' not found "
                                     f"(snapshots: none)")


def test_snapshot_list_matches_qemu(image):
    vdiskfs("snapshot", "-c", "first", image)
    qemu_img("snapshot", "-c", "from-qemu", image)
    vdiskfs("snapshot", "-c", "a-rather-long-snapshot-name", image)

    ours = vdiskfs("snapshot", "-l", image).stdout
    theirs = qemu_img("snapshot", "-l", image).stdout
    assert ours == theirs
    assert_check_clean(image)


@needs_fuse
def test_snapshot_keeps_content_after_writes(image, tmp_path):
    qemu_img("convert", "-O", "raw", image, tmp_path / "ref.raw")
    before = bytearray((tmp_path / "ref.raw").read_bytes())
    vdiskfs("snapshot", "-c", "S", image)
    assert_check_clean(image)

    writes = random_writes(random.Random(7), len(before), 40)
    with mounted(image, tmp_path / "mnt") as exposed:
        write_through(exposed, writes)
    assert_check_clean(image)
    assert snapshot_content(image, "S", tmp_path) == bytes(before)

    vdiskfs("snapshot", "-a", "S", image)
    assert_check_clean(image)
    qemu_img("convert", "-O", "raw", image, tmp_path / "applied.raw")
    assert (tmp_path / "applied.raw").read_bytes() == bytes(before)

    vdiskfs("snapshot", "-d", "S", image)
    assert_check_clean(image)
    assert qemu_img("snapshot", "-l", image).stdout == ""
    qemu_img("convert", "-O", "raw", image, tmp_path / "after-delete.raw")
    assert (tmp_path / "after-delete.raw").read_bytes() == bytes(before)


def test_snapshot_errors(image, tmp_path):
    result = vdiskfs("snapshot", "-d", "missing", image, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "vdiskfs: could not delete snapshot 'missing': not found"

    one_bit = tmp_path / "one-bit.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", one_bit, "1M")
    qemu_io(one_bit, "write -P 0x31 0 64k")
    result = vdiskfs("snapshot", "-c", "s", one_bit, check=False)
    assert result.returncode == 1
    assert "would exceed 1, the maximum of 1-bit refcounts" in result.stderr
    assert_check_clean(one_bit)
    assert qemu_img("snapshot", "-l", one_bit).stdout == ""

    raw = tmp_path / "disk.img"
    raw.write_bytes(bytes(4096))
    result = vdiskfs("snapshot", "-l", "-f", "raw", raw, check=False)
    assert result.returncode == 1
    assert "raw images have no internal snapshots" in result.stderr


@needs_fuse
def test_live_snapshot_between_batches(image, tmp_path):
    qemu_img("convert", "-O", "raw", image, tmp_path / "ref.raw")
    content = bytearray((tmp_path / "ref.raw").read_bytes())
    rng = random.Random(11)
    first = random_writes(rng, len(content), 30)
    second = random_writes(rng, len(content), 30)

    with mounted(image, tmp_path / "mnt") as mountpoint_file:
        mountpoint = mountpoint_file.parent
        write_through(mountpoint_file, first)
        apply_writes(content, first)
        after_first = bytes(content)
        vdiskfs("snapshot", "-c", "checkpoint", mountpoint)
        write_through(mountpoint_file, second)
        apply_writes(content, second)
        listing = vdiskfs("snapshot", "-l", mountpoint).stdout
        assert " checkpoint " in listing
        assert mountpoint_file.read_bytes() == bytes(content)

        result = vdiskfs("snapshot", "-a", "checkpoint", mountpoint, check=False)
        assert result.returncode == 1
        assert "cannot apply a snapshot on the live mount" in result.stderr
        result = vdiskfs("snapshot", "-d", "missing", mountpoint, check=False)
        assert result.stderr.strip() == "vdiskfs: could not delete snapshot 'missing': not found"

    assert_check_clean(image)
    assert snapshot_content(image, "checkpoint", tmp_path) == after_first
    qemu_img("convert", "-O", "raw", image, tmp_path / "active.raw")
    assert (tmp_path / "active.raw").read_bytes() == bytes(content)


@needs_fuse
def test_live_snapshot_read_only_mount(image, tmp_path):
    with mounted(image, tmp_path / "mnt", "--read-only") as exposed:
        result = vdiskfs("snapshot", "-c", "x", exposed.parent, check=False)
        assert result.returncode == 1
        assert "read-only" in result.stderr


snapshot_step = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2 ** 32)),
    st.tuples(st.just("create"), st.booleans()),
    st.tuples(st.just("apply"), st.integers(0, 5)),
    st.tuples(st.just("delete"), st.integers(0, 5)),
)


@needs_fuse
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(snapshot_step, min_size=3, max_size=12))
def test_snapshot_operations_property(tmp_path_factory, steps):
    directory = tmp_path_factory.mktemp("snapshots")
    image = directory / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", image, "4M")
    qemu_io(image, "write -P 0x11 0 1M")
    qemu_img("convert", "-O", "raw", image, directory / "ref.raw")
    content = bytearray((directory / "ref.raw").read_bytes())
    references = {}
    counter = 0

    mountpoint = directory / "mnt"
    with mounted(image, mountpoint) as exposed:
        live = True
        for step in steps:
            kind, value = step
            if kind == "write":
                writes = random_writes(random.Random(value), len(content), 5)
                if not live:
                    vdiskfs("mount", image, mountpoint)
                    live = True
                write_through(exposed, writes)
                apply_writes(content, writes)
            elif kind == "create":
                counter += 1
                name = f"s{counter}"
                if value and live:
                    vdiskfs("snapshot", "-c", name, mountpoint)
                else:
                    if live:
                        vdiskfs("umount", mountpoint)
                        live = False
                    vdiskfs("snapshot", "-c", name, image)
                references[name] = bytes(content)
            elif references:
                name = sorted(references)[value % len(references)]
                if kind == "apply":
                    if live:
                        vdiskfs("umount", mountpoint)
                        live = False
                    vdiskfs("snapshot", "-a", name, image)
                    content = bytearray(references[name])
                else:
                    if live:
                        vdiskfs("snapshot", "-d", name, mountpoint)
                    else:
                        vdiskfs("snapshot", "-d", name, image)
                    del references[name]
        if not live:
            vdiskfs("mount", image, mountpoint)
        assert exposed.read_bytes() == bytes(content)

    assert_check_clean(image)
    for name, expected in references.items():
        assert snapshot_content(image, name, directory) == expected, name
    shutil.rmtree(directory, ignore_errors=True)


QEMU_SYSTEM = shutil.which("qemu-system-x86_64")


def run_monitor(image: Path, *commands: str) -> str:
    """Run QEMU monitor commands on `image` with no guest machine, as savevm/loadvm need."""
    script = "\n".join(commands) + "\nquit\n"
    result = subprocess.run(
        [QEMU_SYSTEM, "-M", "none", "-nodefaults", "-display", "none", "-monitor", "stdio",
         "-drive", f"file={image},if=none,id=disk0,format=qcow2"],
        input=script, capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


@needs_fuse
@pytest.mark.skipif(QEMU_SYSTEM is None, reason="qemu-system-x86_64 is missing, so no VM state can be saved")
def test_vm_state_snapshot_kept(image, tmp_path):
    output = run_monitor(image, "savevm with-vm-state")
    assert "Error" not in output, output
    listing = qemu_img("snapshot", "-l", image).stdout
    assert vdiskfs("snapshot", "-l", image).stdout == listing
    assert " 0 B " not in listing.splitlines()[2]
    disk_part = snapshot_content(image, "with-vm-state", tmp_path)

    with mounted(image, tmp_path / "mnt", "--snapshot", "with-vm-state") as exposed:
        assert exposed.read_bytes() == disk_part
    vdiskfs("snapshot", "-c", "other", image)
    qemu_io(image, "write -P 0x55 0 64k")
    vdiskfs("snapshot", "-d", "other", image)
    vdiskfs("snapshot", "-a", "with-vm-state", image)
    assert_check_clean(image)

    output = run_monitor(image, "loadvm with-vm-state")
    assert "Error" not in output, output
    assert "rror" in run_monitor(image, "loadvm no-such-snapshot")
