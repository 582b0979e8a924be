"""Tests of partition tables: parsing MBR and GPT tables that sfdisk writes, rejecting
damaged ones, and --partitions mounts that expose each partition as its own file."""

from __future__ import annotations

import errno
import mmap
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from helpers import mounted, needs_fuse, qemu_img, vdiskfs
from vdiskfs.partitions import SECTOR_SIZE, parse_partition_table, read_partitions

MiB = 1 << 20

MBR_LAYOUT = """\
label: dos
start=2048, size=4096, type=83
start=6144, size=2048, type=82
start=8192, type=5
start=10240, size=2048, type=83
start=14336, size=4096, type=7
"""

GPT_LAYOUT = """\
label: gpt
start=2048, size=4096, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4
start=8192, size=8192, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
"""


def sfdisk(target: Path, layout: str) -> None:
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(target)],
                   input=layout, text=True, check=True, capture_output=True)


def file_reader(path: Path):
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as stream:
            data = os.pread(stream.fileno(), length, offset)
        return data + bytes(length - len(data))
    return read


def sfdisk_ranges(path: Path) -> list:
    """Return (number, offset, size) of each partition as sfdisk --dump lists them."""
    dump = subprocess.run(["sfdisk", "--dump", str(path)], capture_output=True, text=True,
                          check=True).stdout
    ranges = []
    for line in dump.splitlines():
        if not line.startswith(str(path)):
            continue
        device, fields = line.split(":", 1)
        values = dict(item.strip().split("=", 1) for item in fields.split(",") if "=" in item)
        if values.get("type", "").strip() in ("5", "f", "85"):
            continue
        number = int(device[len(str(path)):])
        ranges.append((number, int(values["start"]) * SECTOR_SIZE,
                       int(values["size"]) * SECTOR_SIZE))
    return ranges


@pytest.fixture
def disk(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as stream:
        stream.truncate(16 * MiB)
    return path


# Parsing


def test_mbr_primary_and_logical(disk):
    sfdisk(disk, MBR_LAYOUT)

    partitions = parse_partition_table(file_reader(disk), disk.stat().st_size)

    assert [(p.number, p.offset, p.size) for p in partitions] == sfdisk_ranges(disk)
    assert [p.number for p in partitions] == [1, 2, 5, 6]
    assert partitions[2].type_id == "83"


def test_gpt_entries(disk):
    sfdisk(disk, GPT_LAYOUT)

    partitions = parse_partition_table(file_reader(disk), disk.stat().st_size)

    assert [(p.number, p.offset, p.size) for p in partitions] == sfdisk_ranges(disk)
    assert partitions[0].type_id == "0fc63daf-8483-4772-8e79-3d69d8477de4"
    assert {p.scheme for p in partitions} == {"gpt"}


def test_gpt_backup_header_used(disk):
    sfdisk(disk, GPT_LAYOUT)
    with open(disk, "r+b") as stream:
        os.pwrite(stream.fileno(), bytes(SECTOR_SIZE), SECTOR_SIZE)

    partitions = parse_partition_table(file_reader(disk), disk.stat().st_size)

    assert [p.number for p in partitions] == [1, 2]


def test_empty_disk_has_no_partitions(disk):
    assert parse_partition_table(file_reader(disk), disk.stat().st_size) == []


def test_boot_sector_is_not_table(disk):
    sector = bytearray(SECTOR_SIZE)
    sector[446] = 0x12  # a status byte that no partition entry has
    sector[510:512] = b"\x55\xaa"
    with open(disk, "r+b") as stream:
        os.pwrite(stream.fileno(), bytes(sector), 0)

    assert parse_partition_table(file_reader(disk), disk.stat().st_size) == []


def test_mbr_past_end_rejected(disk, caplog):
    sfdisk(disk, MBR_LAYOUT)
    with open(disk, "r+b") as stream:
        os.pwrite(stream.fileno(), struct.pack("<I", 1 << 30), 446 + 12)

    assert read_partitions(file_reader(disk), disk.stat().st_size, "disk.raw") == []
    assert "disk.raw: ignoring the partition table" in caplog.text
    assert "past the end" in caplog.text


def test_ebr_loop_rejected(disk, caplog):
    sfdisk(disk, MBR_LAYOUT)
    first_ebr = 8192 * SECTOR_SIZE
    # Point the link of the first EBR back at itself.
    with open(disk, "r+b") as stream:
        os.pwrite(stream.fileno(), struct.pack("<BBBBBBBBII", 0, 0, 0, 0, 5, 0, 0, 0, 0, 2048),
                  first_ebr + 446 + 16)

    assert read_partitions(file_reader(disk), disk.stat().st_size) == []
    assert "loops" in caplog.text


def test_gpt_bad_crc_rejected(disk, caplog):
    sfdisk(disk, GPT_LAYOUT)
    size = disk.stat().st_size
    with open(disk, "r+b") as stream:
        # Damage an entry in both entry arrays, so that neither header's CRC matches.
        for offset in (2 * SECTOR_SIZE + 20, size - 33 * SECTOR_SIZE + 20):
            byte = os.pread(stream.fileno(), 1, offset)[0]
            os.pwrite(stream.fileno(), bytes([byte ^ 0xFF]), offset)

    assert read_partitions(file_reader(disk), size) == []
    assert "CRC32" in caplog.text


def test_gpt_entry_outside_usable_rejected(disk, caplog):
    sfdisk(disk, GPT_LAYOUT)
    size = disk.stat().st_size
    with open(disk, "r+b") as stream:
        entries = bytearray(os.pread(stream.fileno(), 128 * 128, 2 * SECTOR_SIZE))
        struct.pack_into("<Q", entries, 40, size // SECTOR_SIZE + 10)
        header = bytearray(os.pread(stream.fileno(), 92, SECTOR_SIZE))
        struct.pack_into("<I", header, 88, zlib.crc32(entries))
        header[16:20] = bytes(4)
        struct.pack_into("<I", header, 16, zlib.crc32(header))
        os.pwrite(stream.fileno(), bytes(entries), 2 * SECTOR_SIZE)
        os.pwrite(stream.fileno(), bytes(header), SECTOR_SIZE)
        os.pwrite(stream.fileno(), bytes(SECTOR_SIZE), size - SECTOR_SIZE)

    assert read_partitions(file_reader(disk), size) == []
    assert "outside the usable sectors" in caplog.text


# Mounts with --partitions


def partition_files(mountpoint: Path) -> list:
    return sorted(name for name in os.listdir(mountpoint) if "-part" in name)


@pytest.fixture
def image(tmp_path) -> Path:
    """An empty 16 MiB qcow2 image."""
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    return path


@pytest.fixture
def loop_mountpoint(tmp_path):
    """A directory for `mount -o loop`; anything left mounted there is removed afterwards."""
    path = tmp_path / "loop"
    path.mkdir()
    yield path
    if os.path.ismount(path):
        subprocess.run(["umount", str(path)], capture_output=True, timeout=30)


def loop_mount(source: Path, target: Path, *options: str) -> None:
    subprocess.run(["mount", "-o", ",".join(("loop",) + options), str(source), str(target)],
                   check=True, capture_output=True, timeout=60)


def loop_umount(target: Path) -> None:
    # mount -o loop sets autoclear, so the loop device goes away with the unmount.
    subprocess.run(["umount", str(target)], check=True, capture_output=True, timeout=60)


@needs_fuse
def test_mbr_partitions_appear_after_sfdisk(image, mountpoint):

    with mounted(image, mountpoint, "--partitions") as exposed:
        before = partition_files(mountpoint)
        sfdisk(exposed, MBR_LAYOUT)
        after = partition_files(mountpoint)
        sizes = {name: (mountpoint / name).stat().st_size for name in after}
        expected = sfdisk_ranges(exposed)

    assert before == []
    assert after == ["disk-part1.raw", "disk-part2.raw", "disk-part5.raw", "disk-part6.raw"]
    assert [sizes[f"disk-part{number}.raw"] for number, _, _ in expected] == [
        size for _, _, size in expected]
    assert qemu_img("check", image).returncode == 0


@needs_fuse
def test_partition_file_writes_through(image, mountpoint):

    with mounted(image, mountpoint, "--partitions") as exposed:
        sfdisk(exposed, GPT_LAYOUT)
        with open(mountpoint / "disk-part2.raw", "r+b") as stream:
            os.pwrite(stream.fileno(), b"\x42" * 4096, 8192)
            os.fsync(stream.fileno())
        with open(exposed, "rb") as stream:
            through_disk = os.pread(stream.fileno(), 4096, 8192 * SECTOR_SIZE + 8192)
        with open(exposed, "r+b") as stream:
            os.pwrite(stream.fileno(), b"\x24" * 512, 2048 * SECTOR_SIZE)
            os.fsync(stream.fileno())
        with open(mountpoint / "disk-part1.raw", "rb") as stream:
            through_partition = os.pread(stream.fileno(), 512, 0)

    assert through_disk == b"\x42" * 4096
    assert through_partition == b"\x24" * 512


@needs_fuse
def test_repartition_replaces_files(image, mountpoint):

    with mounted(image, mountpoint, "--partitions") as exposed:
        sfdisk(exposed, GPT_LAYOUT)
        first_inode = (mountpoint / "disk-part1.raw").stat().st_ino
        second_inode = (mountpoint / "disk-part2.raw").stat().st_ino
        sfdisk(exposed, "label: gpt\nstart=2048, size=8192, type=L\n")
        names = partition_files(mountpoint)
        new_stat = (mountpoint / "disk-part1.raw").stat()
        part2_exists = (mountpoint / "disk-part2.raw").exists()

    assert names == ["disk-part1.raw"]
    assert not part2_exists
    assert new_stat.st_size == 8192 * SECTOR_SIZE
    assert new_stat.st_ino not in (first_inode, second_inode)


@needs_fuse
def test_writable_partitions_mount_bypasses_cache(image, mountpoint):
    with mounted(image, mountpoint, "--partitions") as exposed:
        with open(exposed, "r+b") as stream:
            with pytest.raises(OSError) as raised:
                mmap.mmap(stream.fileno(), 4096, flags=mmap.MAP_SHARED)

    # Direct I/O files reject shared mappings, as README.md states.
    assert raised.value.errno == errno.ENODEV


@needs_fuse
def test_damaged_table_gives_no_files(tmp_path, mountpoint):
    image = tmp_path / "disk.img"
    with open(image, "wb") as stream:
        stream.truncate(16 * MiB)
    sfdisk(image, MBR_LAYOUT)
    with open(image, "r+b") as stream:
        os.pwrite(stream.fileno(), struct.pack("<I", 1 << 30), 446 + 12)

    with mounted(image, mountpoint, "--partitions", "--read-only"):
        names = sorted(os.listdir(mountpoint))

    assert names == ["disk.raw"]


@needs_fuse
@pytest.mark.parametrize("layout", [MBR_LAYOUT, GPT_LAYOUT], ids=["mbr", "gpt"])
def test_mkfs_and_loop_mount_partition(image, mountpoint, loop_mountpoint, layout):

    with mounted(image, mountpoint, "--partitions") as exposed:
        sfdisk(exposed, layout)
        partition = mountpoint / "disk-part1.raw"
        subprocess.run(["mkfs.ext2", "-q", "-F", str(partition)], check=True,
                       capture_output=True, timeout=60)
        loop_mount(partition, loop_mountpoint)
        try:
            (loop_mountpoint / "hello.txt").write_text("written through a partition file\n")
            (loop_mountpoint / "blob.bin").write_bytes(bytes(range(256)) * 1024)
        finally:
            loop_umount(loop_mountpoint)

    assert qemu_img("check", image).returncode == 0

    with mounted(image, mountpoint, "--partitions", "--read-only"):
        fsck = subprocess.run(["e2fsck", "-n", "-f", str(mountpoint / "disk-part1.raw")],
                              capture_output=True, text=True, timeout=60)
        loop_mount(mountpoint / "disk-part1.raw", loop_mountpoint, "ro")
        try:
            text = (loop_mountpoint / "hello.txt").read_text()
            blob = (loop_mountpoint / "blob.bin").read_bytes()
        finally:
            loop_umount(loop_mountpoint)

    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert text == "written through a partition file\n"
    assert blob == bytes(range(256)) * 1024


def test_partitions_reject_file_mountpoint(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    target = tmp_path / "target.bin"
    target.write_bytes(b"")

    result = vdiskfs("mount", "--partitions", image, target, check=False)

    assert result.returncode == 1
    assert "--partitions needs a directory" in result.stderr


def test_repartition_invalidates_old_names(disk):
    from vdiskfs.fs import DiskOperations
    from vdiskfs.registry import open_image

    sfdisk(disk, GPT_LAYOUT)
    driver = open_image(str(disk), "raw", read_only=False)
    operations = DiskOperations([("disk.raw", driver)], partitions=True)
    invalidated = []
    operations.invalidate_entry = invalidated.append
    try:
        before = {exported.name: exported.inode for exported in operations.files}
        sfdisk(disk, "label: gpt\nstart=2048, size=4096, type=L\n")
        operations.refresh_partitions(operations.files[0])
        after = {exported.name: exported.inode for exported in operations.files}
    finally:
        operations.close()

    assert sorted(before) == ["disk-part1.raw", "disk-part2.raw", "disk.raw"]
    assert sorted(after) == ["disk-part1.raw", "disk.raw"]
    assert invalidated == ["disk-part2.raw"]
    # Partition 1 kept its range, so it keeps its inode and its cached pages.
    assert after["disk-part1.raw"] == before["disk-part1.raw"]


@needs_fuse
def test_partitions_of_several_disks(image, tmp_path, mountpoint):
    data = tmp_path / "data.img"
    with open(data, "wb") as stream:
        stream.truncate(16 * MiB)
    sfdisk(data, MBR_LAYOUT)

    vdiskfs("mount", "--partitions", image, data, mountpoint)
    try:
        sfdisk(mountpoint / "disk.raw", GPT_LAYOUT)
        names = sorted(os.listdir(mountpoint))
    finally:
        vdiskfs("umount", mountpoint)

    assert names == ["data-part1.raw", "data-part2.raw", "data-part5.raw", "data-part6.raw",
                     "data.raw", "disk-part1.raw", "disk-part2.raw", "disk.raw"]
