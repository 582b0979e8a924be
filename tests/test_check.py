"""`vdiskfs check` compared with `qemu-img check` on clean and damaged images.

Both tools must agree on the exit status and on the counts of the JSON output
(corruptions, leaks, allocated, fragmented and compressed clusters, image end offset).
After `vdiskfs check --repair`, qemu-img must find the image clean.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from helpers import mounted, needs_fuse, qemu_img, qemu_io, vdiskfs
from images import (
    KiB,
    MiB,
    OFFSET_MASK,
    create_qcow2,
    iter_l2_entries,
    pattern_bytes,
    l2_entry_location,
    poke,
    qemu_io_then_abort,
    read_header,
    read_u64,
    set_header_field,
    working_directory,
    write_u64,
)
from test_read_matrix import MATRIX

COPIED = 1 << 63


def qemu_check(image: Path, *options: str) -> tuple:
    """Return (exit status, JSON output or None, messages) of `qemu-img check`."""
    result = qemu_img("check", "--output=json", *options, image, check=False)
    output = json.loads(result.stdout) if result.stdout.strip() else None
    return result.returncode, output, result.stderr.splitlines()


def vdiskfs_check(image: Path, *options: str) -> tuple:
    result = vdiskfs("check", "--output", "json", *options, image, check=False)
    output = json.loads(result.stdout) if result.stdout.strip() else None
    return result.returncode, output, result.stderr.splitlines()


def without_names(output):
    if output is None:
        return None
    return {key: value for key, value in output.items() if key not in ("filename", "format")}


def check_messages(qemu_messages: list) -> list:
    """Drop qemu-img's warnings about ignored bitmaps, which are not check results.

    qemu-img 7.2 prints its hint about leaks without a newline, so the hint starts the
    line of the first leaked cluster.
    """
    hint = "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
    lines = []
    for line in qemu_messages:
        if line.startswith("qemu-img: warning:"):
            continue
        lines.append(line[len(hint):] if line.startswith(hint) else line)
    return lines


def assert_same_as_qemu(image: Path) -> tuple:
    # QEMU 7.2 looks up a relative external data file name in its working directory.
    with working_directory(image.parent):
        qemu_status, qemu_output, qemu_messages = qemu_check(image)
    status, output, messages = vdiskfs_check(image)
    assert status == qemu_status
    assert without_names(output) == without_names(qemu_output)
    if qemu_status != 1:
        assert messages == check_messages(qemu_messages)
    return status, output


def refcount_location(image: Path, cluster_index: int) -> tuple:
    """Return (file offset, size in bytes) of the 16-bit or wider refcount of a cluster."""
    header = read_header(image)
    cluster_bits = header["cluster_bits"]
    refcount_bytes = (1 << header.get("refcount_order", 4)) // 8
    assert refcount_bytes >= 1, "the helper needs refcounts of at least 8 bits"
    entries = (1 << cluster_bits) // refcount_bytes
    block = read_u64(image, header["refcount_table_offset"] + 8 * (cluster_index // entries))
    block &= ~0x1FF
    assert block, f"cluster {cluster_index} has no refcount block"
    return block + refcount_bytes * (cluster_index % entries), refcount_bytes


def set_refcount(image: Path, cluster_index: int, value: int) -> None:
    offset, size = refcount_location(image, cluster_index)
    poke(image, offset, value.to_bytes(size, "big"))


def data_image(directory: Path, cluster_size: int = 64 * KiB) -> Path:
    image = create_qcow2(directory / "disk.qcow2", 4 * MiB, f"cluster_size={cluster_size}")
    qemu_io(image, "write -P 0x11 0 200k", "write -P 0x22 1M 64k")
    return image


def first_data_cluster(image: Path) -> int:
    """Return the index of the host cluster that contains guest offset 0."""
    entry = next(iter(iter_l2_entries(image))).entry
    return (entry & OFFSET_MASK) >> read_header(image)["cluster_bits"]


# ---------------------------------------------------------------- clean images


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_matrix_image_agrees_with_qemu(name, tmp_path):
    with working_directory(tmp_path):
        image = MATRIX[name](tmp_path)
    if image.path.read_bytes()[:4] != b"QFI\xfb":
        result = vdiskfs("check", image.path, check=False)
        assert result.returncode == 63
        assert result.returncode == qemu_img("check", image.path, check=False).returncode
        assert result.stderr == f"vdiskfs: {image.path}: this image format does not support checks\n"
        return
    assert_same_as_qemu(image.path)


def test_human_output_matches_qemu(tmp_path):
    image = data_image(tmp_path)
    expected = qemu_img("check", image).stdout
    assert vdiskfs("check", image).stdout == expected


def test_compressed_and_fragmented_counts(tmp_path):
    source = tmp_path / "source.raw"
    source.write_bytes(pattern_bytes(MiB // 2, seed=5) + bytes(MiB // 2))
    image = tmp_path / "disk.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", source, image)
    qemu_io(image, "write -P 0x33 900k 8k", "write -P 0x44 100k 4k")
    status, output = assert_same_as_qemu(image)
    assert status == 0
    assert output["compressed-clusters"] > 0
    assert output["fragmented-clusters"] > 0


# ---------------------------------------------------------------- damaged images


def test_leaked_cluster_found_and_repaired(tmp_path):
    image = data_image(tmp_path)
    cluster_size = 64 * KiB
    size = image.stat().st_size
    with open(image, "r+b") as stream:
        stream.truncate(-(-size // cluster_size) * cluster_size + cluster_size)
    set_refcount(image, image.stat().st_size // cluster_size - 1, 1)

    status, output = assert_same_as_qemu(image)
    assert status == 3
    assert output["leaks"] == 1

    repaired = vdiskfs("check", "--repair", "leaks", image, check=False)
    assert repaired.returncode == 0, repaired.stderr
    assert "1 leaked clusters" in repaired.stdout
    assert qemu_check(image)[0] == 0


def test_refcount_too_high(tmp_path):
    image = data_image(tmp_path)
    set_refcount(image, first_data_cluster(image), 2)

    status, output = assert_same_as_qemu(image)
    assert status == 2
    assert output["leaks"] == 1
    assert output["corruptions"] == 1  # QCOW_OFLAG_COPIED is set with refcount 2

    vdiskfs("check", "--repair", "all", image)
    assert qemu_check(image)[0] == 0


def test_refcount_too_low(tmp_path):
    image = data_image(tmp_path)
    set_refcount(image, first_data_cluster(image), 0)

    status, output = assert_same_as_qemu(image)
    assert status == 2
    assert output["corruptions"] == 2  # the refcount, and QCOW_OFLAG_COPIED with refcount 0

    leaks_only = vdiskfs("check", "--repair", "leaks", image, check=False)
    assert leaks_only.returncode == 1
    assert "need to rebuild" in leaks_only.stderr

    vdiskfs("check", "--repair", "all", image)
    assert qemu_check(image)[0] == 0


def test_copied_flag_missing(tmp_path):
    image = data_image(tmp_path)
    location = l2_entry_location(image, 0)
    write_u64(image, location, read_u64(image, location) & ~COPIED)

    status, output = assert_same_as_qemu(image)
    assert status == 2
    assert output["corruptions"] == 1

    leaks_only = vdiskfs("check", "--repair", "leaks", image, check=False)
    assert leaks_only.returncode == 2
    vdiskfs("check", "--repair", "all", image)
    assert qemu_check(image)[0] == 0
    assert read_u64(image, location) & COPIED


def test_dirty_image_after_abort(tmp_path):
    image = create_qcow2(tmp_path / "disk.qcow2", 4 * MiB, "lazy_refcounts=on", "cluster_size=4k")
    qemu_io_then_abort(image, "write -P 0x5a 0 100k", "write -P 0x6b 2M 64k")

    status, output = assert_same_as_qemu(image)
    assert status == 2

    vdiskfs("check", "--repair", "all", image)
    assert qemu_check(image)[0] == 0
    assert not read_header(image)["incompatible_features"] & 1


def test_l2_entry_past_end_of_file(tmp_path):
    image = data_image(tmp_path)
    location = l2_entry_location(image, 0)
    write_u64(image, location, COPIED | (1 << 40))
    status, _ = assert_same_as_qemu(image)
    assert status == 2


def test_misaligned_l2_entry(tmp_path):
    image = data_image(tmp_path)
    location = l2_entry_location(image, 0)
    write_u64(image, location, read_u64(image, location) + 512)
    status, _ = assert_same_as_qemu(image)
    assert status == 2


def test_data_cluster_overlaps_l1_table(tmp_path):
    image = data_image(tmp_path)
    location = l2_entry_location(image, 0)
    l1_offset = read_header(image)["l1_table_offset"]
    write_u64(image, location, COPIED | l1_offset)
    status, output = assert_same_as_qemu(image)
    assert status == 2
    assert output["corruptions"] >= 1


def test_refcount_block_overlaps_l2_table(tmp_path):
    image = data_image(tmp_path)
    header = read_header(image)
    l2_offset = read_u64(image, header["l1_table_offset"]) & OFFSET_MASK
    table_entry = header["refcount_table_offset"] + 8
    write_u64(image, table_entry, l2_offset)
    status, _ = assert_same_as_qemu(image)
    assert status == 2


def test_snapshot_image_repair_keeps_data(tmp_path):
    image = data_image(tmp_path)
    qemu_img("snapshot", "-c", "first", image)
    qemu_io(image, "write -P 0x55 0 64k")
    location = l2_entry_location(image, 1 * MiB)
    write_u64(image, location, read_u64(image, location) | COPIED)  # shared with the snapshot

    status, output = assert_same_as_qemu(image)
    assert status == 2
    before = qemu_img("convert", "-O", "raw", image, tmp_path / "before.raw")
    assert before.returncode == 0
    vdiskfs("check", "--repair", "all", image)
    assert qemu_check(image)[0] == 0
    qemu_img("compare", "-f", "raw", "-F", "qcow2", tmp_path / "before.raw", image)


def test_unreadable_image_exits_1(tmp_path):
    image = data_image(tmp_path)
    poke(image, 20, struct.pack(">I", 40))  # cluster_bits out of range
    result = vdiskfs("check", image, check=False)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1


@needs_fuse
def test_repair_of_mounted_image_rejected(tmp_path, mountpoint):
    image = data_image(tmp_path)
    with mounted(image, mountpoint):
        result = vdiskfs("check", "--repair", "all", image, check=False)
        assert result.returncode == 1
        assert "lock" in result.stderr
        assert vdiskfs("check", image, check=False).returncode == 1
        assert vdiskfs("check", "-U", image, check=False).returncode == 0


def test_persistent_bitmaps_agree_with_qemu(tmp_path):
    image = create_qcow2(tmp_path / "disk.qcow2", 4 * MiB, "cluster_size=4k")
    qemu_img("bitmap", "--add", image, "first")
    qemu_io(image, "write -P 0x11 0 200k", "write -P 0x22 2M 64k")
    qemu_img("bitmap", "--add", image, "second")
    status, _ = assert_same_as_qemu(image)
    assert status == 0

    # Without the autoclear bit, QEMU ignores the bitmaps, so their clusters are leaks.
    set_header_field(image, "autoclear_features", 0)
    status, output = assert_same_as_qemu(image)
    assert status == 3
    assert output["leaks"] > 2
