"""Tests of `vdiskfs map`: its JSON output must equal `qemu-img map --output=json` byte for
byte on every image of the matrix, and its human output must list the same data ranges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import qemu_img, qemu_io, vdiskfs
from images import KiB, MiB, create_qcow2, random_file, working_directory


def random_file_with_hole(path: Path, size: int, data_size: int, seed: int) -> Path:
    """Write a sparse file of `size` bytes: `data_size` random bytes, then a hole."""
    random_file(path, data_size, seed)
    with open(path, "r+b") as stream:
        stream.truncate(size)
    return path


def build_cluster_sizes(tmp_path: Path, cluster_size: int) -> Path:
    image = create_qcow2(tmp_path / "disk.qcow2", 8 * MiB, f"cluster_size={cluster_size}")
    qemu_io(image, "write -P 0x11 0 100k", "write -P 0x22 3M 5k", "write -P 0x33 7M 1M",
            "write -P 0x44 12345 777")
    return image


def build_zero_clusters(tmp_path: Path) -> Path:
    image = create_qcow2(tmp_path / "disk.qcow2", 4 * MiB)
    # A zero write over allocated clusters keeps them (zero flag with a host offset); one
    # over unallocated clusters only sets the zero flag.
    qemu_io(image, "write -P 0x11 0 1M", "write -z 128k 128k", "write -z 2M 256k",
            "write -P 0x22 3M 64k", "write -z -u 3M 64k")
    return image


def build_compressed(tmp_path: Path) -> Path:
    image = create_qcow2(tmp_path / "disk.qcow2", 4 * MiB)
    qemu_io(image, "write -c -P 0x11 0 64k", "write -c -P 0x22 64k 64k", "write -P 0x33 128k 64k",
            "write -c -P 0x44 1M 64k")
    return image


def build_extended_l2(tmp_path: Path) -> Path:
    base = create_qcow2(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 0x55 0 4M")
    image = create_qcow2(tmp_path / "disk.qcow2", 4 * MiB,
                         "extended_l2=on,cluster_size=64k", backing="base.qcow2")
    qemu_io(image, "write -P 0x11 0 2k", "write -P 0x22 68k 6k", "write -z 130k 8k",
            "write -P 0x33 1M 64k")
    return image


def build_extended_l2_alone(tmp_path: Path) -> Path:
    image = create_qcow2(tmp_path / "disk.qcow2", 4 * MiB, "extended_l2=on")
    qemu_io(image, "write -P 0x11 0 2k", "write -P 0x22 66k 2k", "write -z 200k 4k")
    return image


def build_three_deep_chain(tmp_path: Path) -> Path:
    # The raw base has a hole, so that its zero ranges show too.
    random_file_with_hole(tmp_path / "base.raw", 6 * MiB, 4 * MiB, seed=3)
    middle = create_qcow2(tmp_path / "middle.qcow2", 8 * MiB, backing="base.raw",
                          backing_format="raw")
    qemu_io(middle, "write -P 0x22 1M 512k", "write -z 2M 64k")
    top = create_qcow2(tmp_path / "top.qcow2", 8 * MiB, backing="middle.qcow2")
    qemu_io(top, "write -P 0x33 1200k 64k", "write -P 0x44 7M 64k")
    return top


def build_short_backing(tmp_path: Path) -> Path:
    base = create_qcow2(tmp_path / "base.qcow2", 1 * MiB + 96 * KiB)
    qemu_io(base, "write -P 0x11 0 1M", "write -P 0x11 1M 96k")
    return create_qcow2(tmp_path / "disk.qcow2", 4 * MiB, backing="base.qcow2")


def build_data_file(tmp_path: Path) -> Path:
    # QEMU 7.2 looks up a relative data file name in its working directory.
    with working_directory(tmp_path):
        image = create_qcow2(tmp_path / "disk.qcow2", 4 * MiB, "data_file=disk.data")
        qemu_io(image, "write -P 0x11 64k 64k", "write -z 1M 64k")
    return image


def build_data_file_raw(tmp_path: Path) -> Path:
    with working_directory(tmp_path):
        image = create_qcow2(tmp_path / "disk.qcow2", 4 * MiB,
                             "data_file=disk.data,data_file_raw=on")
        qemu_io(image, "write -P 0x11 64k 64k")
    return image


def build_preallocated_metadata(tmp_path: Path) -> Path:
    image = create_qcow2(tmp_path / "disk.qcow2", 4 * MiB, "preallocation=metadata")
    qemu_io(image, "write -P 0x11 64k 4k", "write -z 1M 64k")
    return image


def build_preallocated_under_overlay(tmp_path: Path) -> Path:
    build_preallocated_metadata(tmp_path)
    top = create_qcow2(tmp_path / "top.qcow2", 4 * MiB, backing="disk.qcow2")
    qemu_io(top, "write -P 0x22 2M 64k")
    return top


def build_raw(tmp_path: Path) -> Path:
    return random_file_with_hole(tmp_path / "disk.raw", 3 * MiB, 1 * MiB, seed=5)


def build_empty_raw(tmp_path: Path) -> Path:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"")
    with open(image, "r+b") as stream:
        stream.truncate(2 * MiB)
    return image


MATRIX = {
    "cluster-512": lambda tmp_path: build_cluster_sizes(tmp_path, 512),
    "cluster-4k": lambda tmp_path: build_cluster_sizes(tmp_path, 4096),
    "cluster-64k": lambda tmp_path: build_cluster_sizes(tmp_path, 65536),
    "cluster-2m": lambda tmp_path: build_cluster_sizes(tmp_path, 2 * MiB),
    "zero-clusters": build_zero_clusters,
    "compressed": build_compressed,
    "extended-l2-over-backing": build_extended_l2,
    "extended-l2": build_extended_l2_alone,
    "chain-3-deep-raw-base": build_three_deep_chain,
    "short-backing": build_short_backing,
    "external-data-file": build_data_file,
    "external-data-file-raw": build_data_file_raw,
    "preallocation-metadata": build_preallocated_metadata,
    "preallocation-metadata-backing": build_preallocated_under_overlay,
    "raw-with-hole": build_raw,
    "raw-sparse": build_empty_raw,
}


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_map_json_equals_qemu(name, tmp_path):
    image = MATRIX[name](tmp_path)

    with working_directory(tmp_path):
        expected = qemu_img("map", "--output=json", image).stdout
    actual = vdiskfs("map", "--output", "json", image).stdout

    assert json.loads(actual) == json.loads(expected)
    assert actual == expected


def test_map_chain_shows_every_depth(tmp_path):
    image = build_three_deep_chain(tmp_path)

    entries = json.loads(vdiskfs("map", "--output", "json", image).stdout)

    assert {entry["depth"] for entry in entries} == {0, 1, 2}
    assert any(entry["depth"] == 2 and entry["zero"] and entry["present"] for entry in entries)
    assert any(not entry["present"] for entry in entries)


def test_map_keeps_offset_of_zero_clusters(tmp_path):
    image = build_zero_clusters(tmp_path)

    entries = json.loads(vdiskfs("map", "--output", "json", image).stdout)

    assert any(entry["zero"] and "offset" in entry for entry in entries)
    assert any(entry["zero"] and entry["present"] and "offset" not in entry for entry in entries)


@pytest.mark.parametrize("name", ["cluster-64k", "chain-3-deep-raw-base", "zero-clusters",
                                  "raw-with-hole"])
def test_map_human_lists_qemu_data_ranges(name, tmp_path):
    image = MATRIX[name](tmp_path)

    with working_directory(tmp_path):
        expected = qemu_img("map", image).stdout.splitlines()
    actual = vdiskfs("map", image).stdout.splitlines()

    assert actual[0] == expected[0]
    assert actual[1:] == expected[1:]


def test_map_human_shows_compressed(tmp_path):
    image = build_compressed(tmp_path)

    lines = vdiskfs("map", image).stdout.splitlines()

    assert lines[1].split()[:3] == ["0", "0x20000", "compressed"]


def test_map_rejects_missing_image(tmp_path):
    result = vdiskfs("map", tmp_path / "missing.qcow2", check=False)

    assert result.returncode == 1
    assert "missing.qcow2" in result.stderr
