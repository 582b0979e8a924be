"""Writes through a real FUSE mount, checked with qemu-img check and qemu-img compare."""

from __future__ import annotations

import errno
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import mounted, needs_fuse, qemu_img, qemu_info, qemu_io, sha256_of_file, vdiskfs

MiB = 1 << 20

# name -> (qemu-img create options, virtual size, base layer options or None, snapshot, extra)
IMAGE_KINDS = {
    "cluster-512": ("cluster_size=512", 4 * MiB, None),
    "cluster-4k": ("cluster_size=4k", 8 * MiB, None),
    "cluster-64k": ("cluster_size=64k", 8 * MiB, None),
    "cluster-2m": ("cluster_size=2M", 16 * MiB, None),
    "compat-0.10": ("compat=0.10,cluster_size=4k", 8 * MiB, None),
    "refcount-1": ("refcount_bits=1,cluster_size=4k", 8 * MiB, None),
    "refcount-64": ("refcount_bits=64,cluster_size=4k", 8 * MiB, None),
    "extended-l2": ("extended_l2=on,cluster_size=64k", 8 * MiB, None),
    "extended-l2-backing": ("extended_l2=on,cluster_size=64k", 8 * MiB, "backing"),
    "compressed": ("cluster_size=4k", 8 * MiB, "compressed"),
    "data-file": ("data_file={dir}/disk.data,cluster_size=4k", 8 * MiB, None),
    "backing-chain": ("cluster_size=4k", 8 * MiB, "backing"),
    "snapshot": ("cluster_size=4k", 8 * MiB, "snapshot"),
}


def make_image(directory: Path, kind: str) -> dict:
    """Create an image of `kind` with some data in it; return paths of everything to guard."""
    options, size, extra = IMAGE_KINDS[kind]
    image = directory / "disk.qcow2"
    guarded = []
    create = ["create", "-q", "-f", "qcow2", "-o", options.format(dir=directory)]
    if extra == "backing":
        base = directory / "base.raw"
        mid = directory / "mid.qcow2"
        with open(base, "wb") as stream:
            stream.write(bytes([0x5A]) * (3 * MiB + 1234))
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", base, "-F", "raw", mid, size)
        qemu_io(mid, "write -P 0x6b 1M 200k", "write -z 2M 64k")
        create += ["-b", str(mid), "-F", "qcow2"]
        guarded += [base, mid]
    qemu_img(*create, image, size)
    qemu_io(image, "write -P 0x11 0 96k", "write -P 0x12 3M 10k")
    if extra == "compressed":
        qemu_io(image, "write -c -P 0x77 1M 64k", "write -c -P 0x78 5M 4k")
    snapshot_reference = None
    if extra == "snapshot":
        qemu_img("snapshot", "-c", "first", image)
        snapshot_reference = directory / "snapshot.raw"
        qemu_img("convert", "-l", "snapshot.name=first", "-O", "raw", image, snapshot_reference)
    if "data_file" in options:
        guarded = []
    return {"image": image, "guarded": {path: sha256_of_file(path) for path in guarded},
            "snapshot_reference": snapshot_reference}


def reference_of(image: Path, directory: Path) -> bytearray:
    raw = directory / "reference.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    return bytearray(raw.read_bytes())


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


def assert_image_matches(image: Path, expected: bytes, directory: Path) -> None:
    check = qemu_img("check", image, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "leaked" not in check.stdout, check.stdout
    expected_path = directory / "expected.raw"
    expected_path.write_bytes(expected)
    compare = qemu_img("compare", "-f", "qcow2", "-F", "raw", image, expected_path, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr


write_operation = st.tuples(
    st.floats(min_value=0, max_value=1, allow_nan=False),  # offset as a fraction of the size
    st.integers(min_value=1, max_value=3),  # length in clusters, scaled below
    st.floats(min_value=0, max_value=1, allow_nan=False),  # fraction of that length
    st.sampled_from(["zeros", "aligned-zeros", "byte", "byte"]),
    st.integers(min_value=1, max_value=255),
)


@needs_fuse
@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_random_writes_through_mount(kind, tmp_path_factory):
    cluster_size = {"cluster-512": 512, "cluster-64k": 65536, "cluster-2m": 2 * MiB,
                    "extended-l2": 65536, "extended-l2-backing": 65536}.get(kind, 4096)

    @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(write_operation, min_size=1, max_size=25))
    def run(operations):
        directory = tmp_path_factory.mktemp(kind)
        made = make_image(directory, kind)
        image = made["image"]
        expected = reference_of(image, directory)
        size = len(expected)

        with mounted(image, directory / "mnt") as exposed:
            fd = os.open(exposed, os.O_RDWR)
            try:
                for fraction, clusters, length_fraction, pattern, byte in operations:
                    offset = int(fraction * (size - 1))
                    length = max(1, int(clusters * cluster_size * length_fraction))
                    if pattern == "aligned-zeros":
                        offset -= offset % cluster_size
                        length = clusters * cluster_size
                    length = min(length, size - offset)
                    data = bytes(length) if "zeros" in pattern else bytes([byte]) * length
                    pwrite_all(fd, data, offset)
                    expected[offset:offset + length] = data
                os.fsync(fd)
                assert os.pread(fd, size, 0) == bytes(expected)
            finally:
                os.close(fd)

        assert_image_matches(image, bytes(expected), directory)
        for path, digest in made["guarded"].items():
            assert sha256_of_file(path) == digest, f"{path} changed"
        if made["snapshot_reference"] is not None:
            after = directory / "snapshot-after.raw"
            qemu_img("convert", "-l", "snapshot.name=first", "-O", "raw", image, after)
            assert sha256_of_file(after) == sha256_of_file(made["snapshot_reference"])

    run()


def run_command(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"
    return result.stdout


@needs_fuse
def test_partition_mkfs_workflow(tmp_path):
    image = tmp_path / "disk.qcow2"
    vdiskfs("create", "-f", "qcow2", image, "1G")
    files = {f"file{index}.bin": os.urandom(1000 + index * 37777) for index in range(20)}
    ext2_mount = tmp_path / "ext2"
    ext2_mount.mkdir()

    with mounted(image, tmp_path / "mnt") as exposed:
        subprocess.run(["sfdisk", "-q", str(exposed)], input="1MiB,400MiB,L\n,,L\n", text=True,
                       check=True, capture_output=True)
        loop = run_command("losetup", "--find", "--show", "--offset", str(MiB),
                           "--sizelimit", str(400 * MiB), str(exposed)).strip()
        try:
            run_command("mkfs.ext2", "-q", "-F", loop)
            run_command("mount", loop, str(ext2_mount))
            for name, data in files.items():
                (ext2_mount / name).write_bytes(data)
            run_command("umount", str(ext2_mount))
        finally:
            subprocess.run(["losetup", "-d", loop])

    check = qemu_img("check", image, check=False)
    assert check.returncode == 0, check.stdout
    assert "leaked" not in check.stdout

    with mounted(image, tmp_path / "mnt") as exposed:
        table = run_command("sfdisk", "-d", str(exposed))
        loop = run_command("losetup", "--find", "--show", "--read-only", "--offset", str(MiB),
                           "--sizelimit", str(400 * MiB), str(exposed)).strip()
        try:
            fsck = subprocess.run(["e2fsck", "-fn", loop], capture_output=True, text=True)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            run_command("mount", "-o", "ro", loop, str(ext2_mount))
            try:
                for name, data in files.items():
                    assert (ext2_mount / name).read_bytes() == data, name
            finally:
                run_command("umount", str(ext2_mount))
        finally:
            subprocess.run(["losetup", "-d", loop])

    converted = tmp_path / "converted.raw"
    qemu_img("convert", "-O", "raw", image, converted)
    converted_table = run_command("sfdisk", "-d", str(converted))
    assert table.replace(str(tmp_path / "mnt" / "disk.raw"), "DISK") == \
        converted_table.replace(str(converted), "DISK")


@needs_fuse
@pytest.mark.parametrize("cluster_size", ["512", "64k"])
def test_truncate_grows_image(cluster_size, tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", image, "1G")
    qemu_io(image, "write -P 0x11 0 64k")

    with mounted(image, tmp_path / "mnt") as exposed:
        os.truncate(exposed, 3 << 30)
        assert os.stat(exposed).st_size == 3 << 30
        fd = os.open(exposed, os.O_RDWR)
        try:
            pwrite_all(fd, b"\x99" * 4096, (3 << 30) - 4096)
            os.fsync(fd)
        finally:
            os.close(fd)

    assert qemu_info(image)["virtual-size"] == 3 << 30
    check = qemu_img("check", image, check=False)
    assert check.returncode == 0, check.stdout
    qemu_io(image, f"read -P 0x99 {(3 << 30) - 4096} 4096", "read -P 0x11 0 64k")


@needs_fuse
def test_truncate_shrink_rejected(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1G")
    with mounted(image, tmp_path / "mnt") as exposed:
        with pytest.raises(OSError) as raised:
            os.truncate(exposed, 1 << 29)
        assert raised.value.errno == errno.EPERM
        assert os.stat(exposed).st_size == 1 << 30


@needs_fuse
def test_zero_write_stores_zero_cluster(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "8M")
    qemu_io(image, "write -P 0x11 0 1M")

    with mounted(image, tmp_path / "mnt") as exposed:
        fd = os.open(exposed, os.O_RDWR)
        try:
            pwrite_all(fd, bytes(256 * 1024), 256 * 1024)
            os.fsync(fd)
        finally:
            os.close(fd)

    mapping = subprocess.run(["qemu-img", "map", "--output=json", str(image)],
                             capture_output=True, text=True, check=True).stdout
    assert '"start": 262144, "length": 262144, "depth": 0, "present": true, "zero": true, "data": false' \
        in mapping
    check = qemu_img("check", image, check=False)
    assert check.returncode == 0, check.stdout
    assert "leaked" not in check.stdout
    qemu_io(image, "read -P 0 256k 256k", "read -P 0x11 0 256k", "read -P 0x11 512k 512k")


def header_u64(image: Path, offset: int) -> int:
    with open(image, "rb") as stream:
        stream.seek(offset)
        return struct.unpack(">Q", stream.read(8))[0]


def set_header_u64(image: Path, offset: int, value: int) -> None:
    with open(image, "r+b") as stream:
        stream.seek(offset)
        stream.write(struct.pack(">Q", value))


@needs_fuse
def test_unknown_autoclear_bits_cleared(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "8M")
    set_header_u64(image, 88, 1 << 63)

    with mounted(image, tmp_path / "mnt") as exposed:
        fd = os.open(exposed, os.O_RDWR)
        try:
            pwrite_all(fd, b"\x42" * 512, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    assert header_u64(image, 88) == 0
    assert qemu_img("check", image, check=False).returncode == 0


@needs_fuse
def test_lazy_refcounts_dirty_while_mounted(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", image, "8M")

    with mounted(image, tmp_path / "mnt") as exposed:
        fd = os.open(exposed, os.O_RDWR)
        try:
            pwrite_all(fd, b"\x42" * 70000, 1000)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert header_u64(image, 72) & 1 == 1

    assert header_u64(image, 72) & 1 == 0
    assert header_u64(image, 80) & 1 == 1
    assert qemu_img("check", image, check=False).returncode == 0
    qemu_io(image, "read -P 0x42 1000 70000")


@needs_fuse
def test_corrupt_image_mounts_read_only(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "8M")
    qemu_io(image, "write -P 0x42 0 64k")
    set_header_u64(image, 72, 1 << 1)
    digest = sha256_of_file(image)

    with mounted(image, tmp_path / "mnt") as exposed:
        with open(exposed, "rb") as stream:
            assert stream.read(65536) == b"\x42" * 65536
        with pytest.raises(OSError) as raised:
            fd = os.open(exposed, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x", 0)
            finally:
                os.close(fd)
        assert raised.value.errno in (errno.EROFS, errno.EACCES)

    assert sha256_of_file(image) == digest


@needs_fuse
def test_raw_write_and_fsync(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as stream:
        stream.truncate(4 * MiB)

    with mounted(image, tmp_path / "mnt", "--format", "raw") as exposed:
        fd = os.open(exposed, os.O_RDWR)
        try:
            pwrite_all(fd, b"\x33" * 5000, 12345)
            os.fsync(fd)
        finally:
            os.close(fd)

    data = image.read_bytes()
    assert data[12345:17345] == b"\x33" * 5000
    assert data[:12345] == bytes(12345)


@needs_fuse
def test_dirty_image_repaired_on_writable_mount(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", image, "8M")
    qemu_io(image, "write -P 0x11 0 1M")
    qemu_img("snapshot", "-c", "before-crash", image)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 128k", "-c", "abort", str(image)],
                   capture_output=True)
    assert header_u64(image, 72) & 1 == 1
    assert qemu_img("check", image, check=False).returncode == 2

    with mounted(image, tmp_path / "mnt") as exposed:
        fd = os.open(exposed, os.O_RDWR)
        try:
            pwrite_all(fd, b"\x77" * 70000, 5 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)

    check = qemu_img("check", image, check=False)
    assert check.returncode == 0, check.stdout
    assert "leaked" not in check.stdout
    assert header_u64(image, 72) & 1 == 0
    qemu_io(image, "read -P 0x5a 0 128k", "read -P 0x11 128k 896k", f"read -P 0x77 {5 * MiB} 70000")
    snapshot = tmp_path / "snapshot.raw"
    qemu_img("convert", "-l", "snapshot.name=before-crash", "-O", "raw", image, snapshot)
    assert snapshot.read_bytes()[:MiB] == b"\x11" * MiB


@needs_fuse
def test_freed_clusters_reused_first(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")

    with mounted(image, tmp_path / "mnt") as exposed:
        fd = os.open(exposed, os.O_RDWR)
        try:
            pwrite_all(fd, b"\x11" * MiB, 0)
            os.fsync(fd)
            size_with_data = os.stat(image).st_size
            # Whole zero clusters free their data clusters. The buffer is written to first:
            # the kernel splits a write from untouched (never faulted in) pages into pieces.
            pwrite_all(fd, b"\0" * MiB, 0)
            os.fsync(fd)
            pwrite_all(fd, b"\x22" * MiB, 32 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)

    assert os.stat(image).st_size == size_with_data
    check = qemu_img("check", image, check=False)
    assert check.returncode == 0, check.stdout
    assert "leaked" not in check.stdout
    qemu_io(image, "read -P 0 0 1M", f"read -P 0x22 {32 * MiB} 1M")


@needs_fuse
@pytest.mark.parametrize("cluster_size", ["4k", "64k"])
def test_writeback_cache_mount(cluster_size, tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", image, "16M")
    expected = bytearray(16 * MiB)
    rng = random.Random(5)

    with mounted(image, tmp_path / "mnt", "--writeback-cache") as exposed:
        fd = os.open(exposed, os.O_RDWR)
        try:
            for index in range(300):
                offset = rng.randrange(16 * MiB - 8192)
                data = bytes([rng.randrange(256)]) * rng.randint(1, 8192)
                pwrite_all(fd, data, offset)
                expected[offset:offset + len(data)] = data
                if index == 150:
                    os.fsync(fd)
                    assert_image_matches_without_unmount(image, exposed)
        finally:
            os.close(fd)
        assert exposed.read_bytes() == bytes(expected)

    assert_image_matches(image, bytes(expected), tmp_path)


def assert_image_matches_without_unmount(image: Path, exposed: Path) -> None:
    # After fsync the image file itself must contain what the mount shows.
    check = qemu_img("check", "-U", image, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    converted = image.parent / "during.raw"
    qemu_img("convert", "-U", "-O", "raw", image, converted)
    assert converted.read_bytes() == exposed.read_bytes()


@needs_fuse
def test_writeback_cache_rejects_partitions(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "16M")
    (tmp_path / "mnt").mkdir()
    result = vdiskfs("mount", "--writeback-cache", "--partitions", image, tmp_path / "mnt", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "vdiskfs: --writeback-cache cannot be combined with --partitions"
