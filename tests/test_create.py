"""Tests of `vdiskfs create`, with qemu-img 7.2 as the oracle.

Each qcow2 case makes one image with vdiskfs and one with `qemu-img create` from the same
options, and compares what `qemu-img info --output=json` reports about them. The vdiskfs
image must then pass `qemu-img check`, take a qemu-io write and read it back, and pass
the check again.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import qemu_img, qemu_info, qemu_io, vdiskfs
from vdiskfs.formats.qcow2.create import (
    Qcow2CreateOptions, encode_refcounts_of_one, plan_layout)
from vdiskfs.registry import open_chain
from vdiskfs.sizes import parse_size

KiB = 1 << 10
MiB = 1 << 20

TOP_LEVEL_KEYS = ("virtual-size", "cluster-size", "format", "backing-filename",
                  "backing-filename-format", "dirty-flag")
FORMAT_SPECIFIC_KEYS = ("compat", "compression-type", "lazy-refcounts", "refcount-bits",
                        "corrupt", "extended-l2", "data-file", "data-file-raw")

# id -> (-o option strings, SIZE)
QCOW2_CASES = {
    "default-1G": ([], "1G"),
    "cluster-512": (["cluster_size=512"], "1G"),
    "cluster-4k": (["cluster_size=4k"], "1G"),
    "cluster-64k": (["cluster_size=64k"], "1G"),
    "cluster-2M": (["cluster_size=2M"], "1G"),
    "compat-0.10": (["compat=0.10"], "1G"),
    "compat-v2-cluster-512": (["compat=v2,cluster_size=512"], "3221237817"),
    "compat-v3": (["compat=v3"], "1G"),
    "refcount-1": (["refcount_bits=1"], "1G"),
    "refcount-2": (["refcount_bits=2,cluster_size=4k"], "1G"),
    "refcount-4": (["refcount_bits=4,cluster_size=4k"], "1G"),
    "refcount-16": (["refcount_bits=16"], "1G"),
    "refcount-64": (["refcount_bits=64"], "1G"),
    "refcount-64-cluster-512": (["refcount_bits=64,cluster_size=512"], "1G"),
    "extended-l2-16k": (["extended_l2=on,cluster_size=16k"], "1G"),
    "extended-l2-64k": (["extended_l2=on"], "3221237817"),
    "extended-l2-2M": (["extended_l2=on,cluster_size=2M"], "16T"),
    "zstd": (["compression_type=zstd"], "1G"),
    "lazy-refcounts": (["lazy_refcounts=on"], "1G"),
    "all-v3-features": (["extended_l2=on,compression_type=zstd,lazy_refcounts=on",
                         "refcount_bits=64"], "3221237817"),
    "size-16T": ([], "16T"),
    "size-16T-cluster-2M": (["cluster_size=2M"], "16T"),
    "size-1000000": ([], "1000000"),
    "size-3G-odd": ([], "3221237817"),
    "size-0": ([], "0"),
    "size-128G-cluster-512": (["cluster_size=512"], "128G"),
    "prealloc-metadata": (["preallocation=metadata"], "64M"),
    "prealloc-metadata-odd": (["preallocation=metadata"], "1000000"),
    "prealloc-metadata-512": (["preallocation=metadata,cluster_size=512"], "8M"),
    "prealloc-metadata-4k-refcount-1": (
        ["preallocation=metadata,cluster_size=4k,refcount_bits=1"], "64M"),
    "prealloc-metadata-512-refcount-64": (
        ["preallocation=metadata,cluster_size=512,refcount_bits=64"], "8M"),
    "prealloc-metadata-2M": (["preallocation=metadata,cluster_size=2M"], "64M"),
    "prealloc-metadata-extended-l2": (["preallocation=metadata,extended_l2=on"], "64M"),
    "prealloc-metadata-compat-0.10": (["preallocation=metadata,compat=0.10"], "64M"),
    "prealloc-falloc": (["preallocation=falloc"], "8M"),
    "prealloc-full": (["preallocation=full,cluster_size=4k"], "8M"),
    "options-repeated": (["cluster_size=4k", "cluster_size=16k,lazy_refcounts=on"], "1G"),
    "option-without-value": (["lazy_refcounts"], "1G"),
    "size-as-option": (["size=2G,cluster_size=4k"], None),
}

# Cases whose whole file qemu-img writes byte for byte as vdiskfs does:
# id -> (arguments before IMAGE, SIZE). The first ids name cases of QCOW2_CASES.
BYTE_IDENTICAL_CASES = {
    case: ([argument for text in QCOW2_CASES[case][0] for argument in ("-o", text)],
           QCOW2_CASES[case][1])
    for case in ("default-1G", "cluster-4k", "cluster-2M", "compat-0.10", "zstd",
                 "lazy-refcounts", "extended-l2-16k", "refcount-1", "size-0", "size-16T",
                 "size-1000000")
}
BYTE_IDENTICAL_CASES.update({
    "backing-unsafe": (["-u", "-b", "../base.raw", "-F", "raw", "-o", "cluster_size=4k"], "1G"),
    "data-file-raw": (["-o", "data_file=disk.data,data_file_raw=on"], "1G"),
})


def comparable_info(image: Path) -> dict:
    """Return the fields of `qemu-img info` that two images made with the same options share."""
    info = qemu_info(image)
    fields = {key: info.get(key) for key in TOP_LEVEL_KEYS}
    data = info.get("format-specific", {}).get("data", {})
    fields.update({key: data.get(key) for key in FORMAT_SPECIFIC_KEYS})
    return fields


def assert_check_clean(image: Path, directory: Optional[Path] = None) -> None:
    """Assert that `qemu-img check`, run in `directory`, finds no errors and no leaks."""
    result = run_in(directory or Path.cwd(), "qemu-img", "check", "--output=json", image)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["check-errors"] == 0
    assert report.get("corruptions", 0) == 0
    assert report.get("leaks", 0) == 0


def assert_write_read_back(image: Path, size: int) -> None:
    """Write a pattern at the start and at the end of the disk with qemu-io and read it back."""
    if size < 64 * KiB:
        return
    qemu_io(image, "write -P 0x5a 0 64k", "read -P 0x5a 0 64k")
    last_sector = (size - 1) // 512 * 512
    qemu_io(image, f"write -P 0xa5 {last_sector} 512", f"read -P 0xa5 {last_sector} 512")
    assert_check_clean(image)


def run_in(directory: Path, *argv: str) -> subprocess.CompletedProcess:
    """Run a command in `directory`, where qemu-img and qemu-io look for relative data files."""
    return subprocess.run([*map(str, argv)], cwd=directory, capture_output=True, text=True)


def create_pair(tmp_path: Path, arguments: Sequence[str], size: Optional[str],
                name: str = "disk.qcow2") -> tuple:
    """Create `name` with vdiskfs in tmp_path/vdiskfs and with qemu-img in tmp_path/qemu."""
    images = []
    for tool in ("vdiskfs", "qemu"):
        directory = tmp_path / tool
        directory.mkdir(exist_ok=True)
        image = directory / name
        tail = [str(image)] + ([size] if size is not None else [])
        if tool == "vdiskfs":
            vdiskfs("create", "-f", "qcow2", *arguments, *tail)
        else:
            result = run_in(directory, "qemu-img", "create", "-q", "-f", "qcow2", *arguments,
                            *tail)
            assert result.returncode == 0, result.stderr
        images.append(image)
    return tuple(images)


def option_arguments(option_strings: Sequence[str]) -> list:
    return [argument for text in option_strings for argument in ("-o", text)]


@pytest.mark.parametrize("case", QCOW2_CASES)
def test_qcow2_matches_qemu_img(tmp_path: Path, case: str) -> None:
    option_strings, size = QCOW2_CASES[case]
    ours, theirs = create_pair(tmp_path, option_arguments(option_strings), size)

    assert comparable_info(ours) == comparable_info(theirs)
    assert_check_clean(ours)
    assert_write_read_back(ours, qemu_info(ours)["virtual-size"])


@pytest.mark.parametrize("case", BYTE_IDENTICAL_CASES)
def test_qcow2_bytes_match_qemu_img(tmp_path: Path, case: str) -> None:
    arguments, size = BYTE_IDENTICAL_CASES[case]
    ours, theirs = create_pair(tmp_path, arguments, size)

    assert ours.stat().st_size == theirs.stat().st_size
    assert ours.read_bytes() == theirs.read_bytes()


def test_qcow2_prealloc_maps_contiguously(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    vdiskfs("create", "-f", "qcow2", "-o", "preallocation=metadata,cluster_size=4k", image, "8M")

    mapping = json.loads(qemu_img("map", "--output=json", image).stdout)
    assert len(mapping) == 1
    assert mapping[0]["length"] == 8 * MiB
    assert mapping[0]["data"] is True
    assert image.stat().st_size == mapping[0]["offset"] + 8 * MiB
    assert image.stat().st_blocks * 512 < MiB


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_qcow2_prealloc_allocates_data(tmp_path: Path, mode: str) -> None:
    image = tmp_path / "disk.qcow2"
    vdiskfs("create", "-f", "qcow2", "-o", f"preallocation={mode}", image, "8M")

    assert image.stat().st_blocks * 512 >= 8 * MiB
    assert_check_clean(image)


def test_qcow2_large_sparse_is_small(tmp_path: Path) -> None:
    for size, options in (("16T", "cluster_size=64k"), ("2E", "cluster_size=2M")):
        image = tmp_path / f"disk-{size}.qcow2"
        vdiskfs("create", "-f", "qcow2", "-o", options, image, size)

        assert qemu_info(image)["virtual-size"] == parse_size(size)
        assert image.stat().st_blocks * 512 < MiB
        assert_check_clean(image)


def test_qcow2_replaces_existing_file(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    fresh = tmp_path / "fresh.qcow2"
    image.write_bytes(b"\xff" * (3 * MiB))
    vdiskfs("create", "-f", "qcow2", image, "1G")
    vdiskfs("create", "-f", "qcow2", fresh, "1G")

    assert image.read_bytes() == fresh.read_bytes()
    assert_check_clean(image)


def test_qcow2_readable_by_vdiskfs(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    vdiskfs("create", "-f", "qcow2", "-o", "preallocation=metadata,cluster_size=4k", image,
            "1000000")

    driver = open_chain(str(image))
    try:
        assert driver.virtual_size == 1000448
        assert driver.read(0, 8192) == bytes(8192)
        assert driver.read(1000448 - 512, 512) == bytes(512)
    finally:
        driver.close()


# -- backing files -------------------------------------------------------------------


@pytest.fixture
def backing_files(tmp_path: Path) -> dict:
    """Create a raw and a qcow2 base with data in tmp_path/vdiskfs and tmp_path/qemu."""
    for tool in ("vdiskfs", "qemu"):
        directory = tmp_path / tool
        directory.mkdir()
        raw = directory / "base.raw"
        raw.write_bytes(b"\x11" * 1000000)
        qemu_img("create", "-q", "-f", "qcow2", directory / "base.qcow2", "3G")
        qemu_io(directory / "base.qcow2", "write -P 0x22 0 64k")
    return {"raw": "base.raw", "qcow2": "base.qcow2"}


BACKING_CASES = {
    # id -> (vdiskfs arguments, qemu-img arguments, SIZE). "{dir}" is the base's directory.
    "raw-probed-size-from-backing": (["-b", "base.raw"], ["-b", "base.raw", "-F", "raw"], None),
    "raw-with-format": (["-b", "base.raw", "-F", "raw"], ["-b", "base.raw", "-F", "raw"], None),
    "qcow2-relative": (["-b", "base.qcow2", "-F", "qcow2"],
                       ["-b", "base.qcow2", "-F", "qcow2"], None),
    "qcow2-probed-absolute": (["-b", "{dir}/base.qcow2"],
                              ["-b", "{dir}/base.qcow2", "-F", "qcow2"], None),
    "qcow2-larger-size": (["-b", "base.qcow2", "-F", "qcow2"],
                          ["-b", "base.qcow2", "-F", "qcow2"], "5G"),
    "qcow2-cluster-512-compat-0.10": (
        ["-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=512,compat=0.10"],
        ["-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=512,compat=0.10"], None),
    "extended-l2-prealloc": (
        ["-b", "base.qcow2", "-F", "qcow2", "-o", "extended_l2=on,preallocation=metadata"],
        ["-b", "base.qcow2", "-F", "qcow2", "-o", "extended_l2=on,preallocation=metadata"],
        "64M"),
    "option-aliases": (["-o", "backing_file=base.raw,backing_fmt=raw"],
                       ["-b", "base.raw", "-F", "raw"], None),
}


@pytest.mark.parametrize("case", BACKING_CASES)
def test_backing_matches_qemu_img(tmp_path: Path, backing_files: dict, case: str) -> None:
    ours_arguments, theirs_arguments, size = BACKING_CASES[case]
    images = []
    for tool, arguments in (("vdiskfs", ours_arguments), ("qemu", theirs_arguments)):
        directory = tmp_path / tool
        # The new image lives in a subdirectory, so a relative backing name must be
        # resolved against the image's directory, not against the current directory.
        (directory / "overlay").mkdir()
        for base in backing_files.values():
            (directory / "overlay" / base).symlink_to(directory / base)
        image = directory / "overlay" / "disk.qcow2"
        arguments = [argument.replace("{dir}", str(directory)) for argument in arguments]
        tail = [str(image)] + ([size] if size is not None else [])
        if tool == "vdiskfs":
            vdiskfs("create", "-f", "qcow2", *arguments, *tail)
        else:
            qemu_img("create", "-q", "-f", "qcow2", *arguments, *tail)
        images.append(image)
    ours, theirs = images

    # An absolute backing name differs between the two directories, so compare it apart.
    ours_info, theirs_info = comparable_info(ours), comparable_info(theirs)
    ours_backing = ours_info.pop("backing-filename")
    theirs_backing = theirs_info.pop("backing-filename")
    assert ours_info == theirs_info
    assert ours_backing.replace(str(tmp_path / "vdiskfs"), "{dir}") == \
        theirs_backing.replace(str(tmp_path / "qemu"), "{dir}")
    assert_check_clean(ours)
    assert_write_read_back(ours, ours_info["virtual-size"])


def test_backing_data_shows_through(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io(base, "write -P 0x33 0 64k")
    overlay = tmp_path / "overlay.qcow2"
    vdiskfs("create", "-f", "qcow2", "-b", "base.qcow2", overlay)

    qemu_io(overlay, "read -P 0x33 0 64k", "write -P 0x44 4k 4k", "read -P 0x44 4k 4k",
            "read -P 0x33 8k 56k")
    assert_check_clean(overlay)


def test_backing_unsafe_skips_opening(tmp_path: Path) -> None:
    image = tmp_path / "vdiskfs" / "disk.qcow2"
    ours, theirs = create_pair(tmp_path, ["-u", "-b", "missing.raw", "-F", "raw"], "1G")

    assert comparable_info(ours) == comparable_info(theirs)
    (image.parent / "missing.raw").write_bytes(bytes(MiB))
    assert_check_clean(ours)


def test_backing_name_with_comma(tmp_path: Path) -> None:
    (tmp_path / "a,b.raw").write_bytes(bytes(MiB))
    image = tmp_path / "disk.qcow2"
    vdiskfs("create", "-f", "qcow2", "-o", "backing_file=a,,b.raw", image)

    info = qemu_info(image)
    assert info["backing-filename"] == "a,b.raw"
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == MiB


# -- external data files -------------------------------------------------------------


DATA_FILE_CASES = {
    "plain": "data_file=disk.data",
    "raw": "data_file=disk.data,data_file_raw=on",
    "prealloc-metadata": "data_file=disk.data,preallocation=metadata,cluster_size=4k",
    "prealloc-falloc": "data_file=disk.data,preallocation=falloc",
    "raw-extended-l2": "data_file=disk.data,data_file_raw=on,extended_l2=on",
}


@pytest.mark.parametrize("case", DATA_FILE_CASES)
def test_data_file_matches_qemu_img(tmp_path: Path, case: str) -> None:
    ours, theirs = create_pair(tmp_path, ["-o", DATA_FILE_CASES[case]], "8M")
    data_file = ours.parent / "disk.data"

    assert comparable_info(ours) == comparable_info(theirs)
    assert data_file.stat().st_size == (theirs.parent / "disk.data").stat().st_size
    assert_check_clean(ours, ours.parent)

    # qemu-io of QEMU 7.2 finds a relative data file in the current directory.
    result = run_in(ours.parent, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 64k 64k",
                    "-c", "read -P 0x5a 64k 64k", ours)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stdout.lower() + result.stderr.lower()
    assert_check_clean(ours, ours.parent)
    if "data_file_raw=on" in DATA_FILE_CASES[case]:
        with open(data_file, "rb") as data:
            data.seek(64 * KiB)
            assert data.read(64 * KiB) == b"\x5a" * (64 * KiB)


# -- raw images ----------------------------------------------------------------------


@pytest.mark.parametrize("size", ["1000", "1M", "1G", "0"])
def test_raw_size_matches_qemu_img(tmp_path: Path, size: str) -> None:
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    vdiskfs("create", "-f", "raw", ours, size)
    qemu_img("create", "-q", "-f", "raw", theirs, size)

    assert comparable_info(ours) == comparable_info(theirs)
    assert ours.stat().st_size == theirs.stat().st_size


def test_raw_is_default_format(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    vdiskfs("create", image, "1M")

    assert qemu_info(image)["format"] == "raw"
    assert image.stat().st_size == MiB


@pytest.mark.parametrize("mode", ["off", "falloc", "full"])
def test_raw_preallocation(tmp_path: Path, mode: str) -> None:
    image = tmp_path / "disk.raw"
    vdiskfs("create", "-f", "raw", "-o", f"preallocation={mode}", image, "4M")

    allocated = image.stat().st_blocks * 512
    assert image.stat().st_size == 4 * MiB
    if mode == "off":
        assert allocated == 0
    else:
        assert allocated >= 4 * MiB
    assert image.read_bytes() == bytes(4 * MiB)


# -- invalid options -----------------------------------------------------------------


INVALID_QCOW2_OPTIONS = {
    "cluster-size-not-power": (
        ["-o", "cluster_size=1000"],
        "invalid cluster_size 1000: must be a power of two from 512 to 2M"),
    "cluster-size-too-large": (
        ["-o", "cluster_size=4M"], "invalid cluster_size 4M: must be a power of two from 512 to 2M"),
    "cluster-size-too-small": (
        ["-o", "cluster_size=256"],
        "invalid cluster_size 256: must be a power of two from 512 to 2M"),
    "cluster-size-not-number": (
        ["-o", "cluster_size=abc"],
        "invalid cluster_size abc: expected a byte count with an optional K, M, G or T suffix"),
    "compat-unknown": (["-o", "compat=0.9"], "invalid compat 0.9: must be 0.10 or 1.1"),
    "refcount-bits-not-power": (
        ["-o", "refcount_bits=3"], "invalid refcount_bits 3: must be a power of two from 1 to 64"),
    "refcount-bits-too-wide": (
        ["-o", "refcount_bits=128"],
        "invalid refcount_bits 128: must be a power of two from 1 to 64"),
    "refcount-bits-zero": (
        ["-o", "refcount_bits=0"], "invalid refcount_bits 0: must be a power of two from 1 to 64"),
    "refcount-bits-not-number": (
        ["-o", "refcount_bits=abc"], "invalid refcount_bits abc: expected a whole number"),
    "refcount-bits-compat-0.10": (
        ["-o", "compat=0.10,refcount_bits=8"],
        "invalid refcount_bits 8: compat 0.10 supports only 16 (use compat=1.1)"),
    "extended-l2-not-bool": (
        ["-o", "extended_l2=maybe"], "invalid extended_l2 maybe: must be on or off"),
    "extended-l2-small-clusters": (
        ["-o", "extended_l2=on,cluster_size=8k"],
        "invalid extended_l2 on: requires cluster_size 16K or larger, not 8K"),
    "extended-l2-compat-0.10": (
        ["-o", "extended_l2=on,compat=0.10"], "invalid extended_l2 on: requires compat=1.1"),
    "compression-type-unknown": (
        ["-o", "compression_type=lz4"], "invalid compression_type lz4: must be zlib or zstd"),
    "compression-type-compat-0.10": (
        ["-o", "compression_type=zstd,compat=0.10"],
        "invalid compression_type zstd: requires compat=1.1"),
    "lazy-refcounts-compat-0.10": (
        ["-o", "lazy_refcounts=on,compat=0.10"], "invalid lazy_refcounts on: requires compat=1.1"),
    "lazy-refcounts-not-bool": (
        ["-o", "lazy_refcounts=2"], "invalid lazy_refcounts 2: must be on or off"),
    "preallocation-unknown": (
        ["-o", "preallocation=foo"],
        "invalid preallocation foo: must be off, metadata, falloc or full"),
    "preallocation-with-backing": (
        ["-u", "-b", "base.raw", "-F", "raw", "-o", "preallocation=metadata"],
        "invalid preallocation metadata: an image with a backing file needs "
        "preallocation=off, unless extended_l2=on"),
    "data-file-raw-without-data-file": (
        ["-o", "data_file_raw=on"], "invalid data_file_raw on: requires data_file"),
    "data-file-raw-with-backing": (
        ["-u", "-b", "base.raw", "-F", "raw", "-o", "data_file=d.raw,data_file_raw=on"],
        "invalid data_file_raw on: a raw data file cannot have a backing file"),
    "data-file-compat-0.10": (
        ["-o", "data_file=d.raw,compat=0.10"], "invalid data_file d.raw: requires compat=1.1"),
    "unknown-option": (
        ["-o", "foo=bar"], "unknown option foo for format qcow2 (-o help lists the options)"),
    "backing-format-without-backing": (
        ["-F", "raw"], "invalid backing_fmt raw: requires a backing file"),
    "backing-format-unknown": (
        ["-u", "-b", "base.vmdk", "-F", "vmdk"], "invalid backing_fmt vmdk: must be qcow2 or raw"),
    "unsafe-without-backing-format": (
        ["-u", "-b", "base.raw"],
        "missing backing_fmt: -u does not open the backing file, so give its format with -F"),
    "backing-name-too-long": (
        ["-u", "-b", "b" * 1024, "-F", "raw"],
        f"invalid backing_file {'b' * 1024}: longer than 1023 bytes"),
    "backing-name-overflows-header": (
        ["-u", "-b", "b" * 400, "-F", "raw", "-o", "cluster_size=512"],
        f"invalid backing_file {'b' * 400}: the header with its extensions and names needs "
        f"536 bytes, more than cluster_size 512"),
}

# id -> (arguments after `create`, SIZE or None, message after "cannot create IMAGE: ")
INVALID_SIZES = {
    "size-too-large-for-l1": (["-f", "qcow2", "-o", "cluster_size=512"], "16T",
                              "invalid size 16T: cluster_size 512 allows at most 128G "
                              "(use a larger cluster_size)"),
    "size-not-number": (["-f", "qcow2"], "1Q",
                        "invalid size 1Q: expected a byte count with an optional K, M, G "
                        "or T suffix"),
    "size-above-int64": (["-f", "qcow2"], "8E",
                         "invalid size 9223372036854775808: must be from 0 to "
                         "9223372036854775296 bytes"),
    "size-missing": (["-f", "qcow2"], None,
                     "missing size: give SIZE, or a backing file to take it from"),
    "raw-size-missing": (["-f", "raw"], None,
                         "missing size: give SIZE, or a backing file to take it from"),
    "raw-preallocation-metadata": (["-f", "raw", "-o", "preallocation=metadata"], "1M",
                                   "invalid preallocation metadata: must be off, falloc or full"),
    "raw-backing-file": (["-f", "raw", "-b", "base.raw"], "1M",
                         "invalid backing_file base.raw: a raw image has no backing file"),
    "raw-unknown-option": (["-f", "raw", "-o", "cluster_size=4k"], "1M",
                           "unknown option cluster_size for format raw (-o help lists the "
                           "options)"),
    "size-given-twice": (["-f", "qcow2", "-o", "size=2G"], "1G",
                         "invalid size 1G: the size is given twice, as SIZE and as -o size"),
}


def assert_create_fails(tmp_path: Path, arguments: Sequence[str], size: Optional[str],
                        message: str) -> None:
    image = tmp_path / "disk.img"
    tail = [str(image)] + ([size] if size is not None else [])
    result = vdiskfs("create", *arguments, *tail, check=False)

    assert result.returncode == 1
    assert result.stderr == f"vdiskfs: cannot create {image}: {message}\n"
    assert result.stdout == ""
    assert not image.exists()


@pytest.mark.parametrize("case", INVALID_QCOW2_OPTIONS)
def test_create_rejects_invalid_option(tmp_path: Path, case: str) -> None:
    arguments, message = INVALID_QCOW2_OPTIONS[case]
    assert_create_fails(tmp_path, ["-f", "qcow2", *arguments], "1G", message)


@pytest.mark.parametrize("case", INVALID_SIZES)
def test_create_rejects_invalid_size(tmp_path: Path, case: str) -> None:
    arguments, size, message = INVALID_SIZES[case]
    assert_create_fails(tmp_path, arguments, size, message)


def test_create_rejects_missing_backing(tmp_path: Path) -> None:
    assert_create_fails(tmp_path, ["-f", "qcow2", "-b", "missing.qcow2"], None,
                        f"cannot open backing file {tmp_path / 'missing.qcow2'}: "
                        f"No such file or directory")


def test_create_rejects_backing_as_image(tmp_path: Path) -> None:
    assert_create_fails(tmp_path, ["-f", "qcow2", "-b", "disk.img", "-F", "qcow2"], "1G",
                        "invalid backing_file disk.img: it is the image being created")


def test_create_unsafe_rejects_backing_as_image(tmp_path: Path) -> None:
    assert_create_fails(tmp_path, ["-f", "qcow2", "-u", "-b", "disk.img", "-F", "qcow2"], "1G",
                        "invalid backing_file disk.img: it is the image being created")


def test_create_rejects_wrong_backing_format(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    result = vdiskfs("create", "-f", "qcow2", "-b", "base.raw", "-F", "qcow2",
                     tmp_path / "disk.img", check=False)

    assert result.returncode == 1
    assert result.stderr.startswith(
        f"vdiskfs: cannot create {tmp_path / 'disk.img'}: backing file {tmp_path / 'base.raw'}: ")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "disk.img").exists()


def test_create_rejects_unknown_format(tmp_path: Path) -> None:
    result = vdiskfs("create", "-f", "vmdk", tmp_path / "disk.vmdk", "1G", check=False)

    assert result.returncode == 1
    assert result.stderr == "vdiskfs: invalid format vmdk: must be qcow2 or raw\n"


def test_create_rejects_missing_image(tmp_path: Path) -> None:
    result = vdiskfs("create", "-f", "qcow2", check=False)

    assert result.returncode == 1
    assert result.stderr == "vdiskfs: missing IMAGE: give the file name of the image to create\n"


def test_create_rejects_directory_target(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    target.mkdir()
    result = vdiskfs("create", "-f", "qcow2", target, "1G", check=False)

    assert result.returncode == 1
    assert result.stderr == (f"vdiskfs: cannot create {target}: {target} exists and is not a "
                             f"regular file (vdiskfs creates images only as regular files)\n")
    assert target.is_dir()


def test_invalid_option_keeps_existing_file(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"precious")
    result = vdiskfs("create", "-f", "qcow2", "-o", "cluster_size=1000", image, "1G", check=False)

    assert result.returncode == 1
    assert image.read_bytes() == b"precious"


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, MiB))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.parametrize("arguments", [
    ["-f", "qcow2", "-o", "preallocation=metadata"],
    ["-f", "qcow2", "-o", "cluster_size=512", "-o", "preallocation=full"],
    ["-f", "qcow2", "-o", "data_file=disk.data"],
    ["-f", "raw", "-o", "preallocation=full"],
], ids=["qcow2-metadata", "qcow2-full", "qcow2-data-file", "raw-full"])
def test_failed_create_removes_files(tmp_path: Path, arguments: list) -> None:
    # A file size limit of 1 MiB makes the creation of an 8 MiB image fail with EFBIG.
    image = tmp_path / "disk.img"
    result = subprocess.run([sys.executable, "-m", "vdiskfs", "create", *arguments, image, "8M"],
                            capture_output=True, text=True, preexec_fn=_limit_file_size)

    assert result.returncode == 1
    assert result.stderr == f"vdiskfs: cannot create {image}: File too large\n"
    assert sorted(os.listdir(tmp_path)) == []


def test_failed_create_removes_data_file(tmp_path: Path) -> None:
    data_file = tmp_path / "disk.data"
    image = tmp_path / "missing" / "disk.qcow2"
    result = vdiskfs("create", "-f", "qcow2", "-o", f"data_file={data_file}", image, "1M",
                     check=False)

    assert result.returncode == 1
    assert result.stderr == f"vdiskfs: cannot create {image}: No such file or directory\n"
    assert not data_file.exists()


def test_option_help_lists_options() -> None:
    result = vdiskfs("create", "-f", "qcow2", "-o", "help")

    assert result.stdout.startswith("Supported qcow2 options:\n")
    for name in ("cluster_size", "compat", "refcount_bits", "extended_l2", "compression_type",
                 "lazy_refcounts", "preallocation", "data_file", "data_file_raw",
                 "backing_file", "backing_fmt"):
        assert f"\n  {name} " in result.stdout


# -- layout --------------------------------------------------------------------------


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_block_encoding(refcount_bits: int) -> None:
    cluster_size = 512
    per_block = cluster_size * 8 // refcount_bits
    for count in (0, 1, 3, per_block - 1, per_block):
        encoded = encode_refcounts_of_one(count, refcount_bits)
        assert len(encoded) == -(-count * refcount_bits // 8)
        block = encoded + bytes(cluster_size - len(encoded))
        refcounts = decode_refcounts(block, refcount_bits)
        assert refcounts == [1] * count + [0] * (per_block - count)


def decode_refcounts(block: bytes, refcount_bits: int) -> list:
    """Decode a refcount block as the qcow2 specification lays it out."""
    if refcount_bits >= 8:
        width = refcount_bits // 8
        return [int.from_bytes(block[start:start + width], "big")
                for start in range(0, len(block), width)]
    mask = (1 << refcount_bits) - 1
    return [(byte >> shift) & mask for byte in block for shift in range(0, 8, refcount_bits)]


@settings(max_examples=300, deadline=None)
@given(cluster_bits=st.integers(9, 21), refcount_order=st.integers(0, 6),
       size=st.integers(0, 1 << 40), preallocation=st.sampled_from(["off", "metadata"]),
       extended_l2=st.booleans())
def test_layout_refcounts_cover_clusters(cluster_bits: int, refcount_order: int, size: int,
                                         preallocation: str, extended_l2: bool) -> None:
    cluster_size = 1 << cluster_bits
    options = Qcow2CreateOptions(size=size, cluster_size=cluster_size,
                                 refcount_bits=1 << refcount_order, preallocation=preallocation,
                                 extended_l2=extended_l2 and cluster_bits >= 14)
    layout = plan_layout(options)
    per_block = cluster_size * 8 // options.refcount_bits

    assert layout.refcount_blocks * per_block >= layout.allocated_clusters
    assert (layout.refcount_blocks - 1) * per_block < layout.allocated_clusters
    assert layout.refcount_table_clusters * cluster_size // 8 >= layout.refcount_blocks
    assert layout.file_size <= layout.allocated_clusters * cluster_size
    assert layout.file_size > (layout.allocated_clusters - 1) * cluster_size
    assert layout.l1_size * layout.l2_entries * cluster_size >= size
