"""Tests of `vdiskfs mount --overlay` and `--overlay-temporary`.

Writes go through a real mount. qemu-img is the oracle for what the overlay contains and
whether it is consistent, and the sha256 of every base file shows that none changed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from helpers import mounted, needs_fuse, qemu_img, qemu_info, reference_raw, sha256_of_file, vdiskfs
from images import create_qcow2
from test_mount import daemon_log, within, write_at
from test_read_only import chain_of_three

MiB = 1 << 20


def raw_base(tmp_path: Path) -> List[Path]:
    image = tmp_path / "base.img"
    image.write_bytes(random.Random(7).randbytes(5 * MiB))
    return [image]


BASES = {"qcow2-chain": chain_of_three, "raw": raw_base}


def build_base(tmp_path: Path, base_kind: str) -> Tuple[List[Path], Dict[Path, str], bytearray]:
    """Build a base of `base_kind`; return its files, their sha256 and its content."""
    files = BASES[base_kind](tmp_path)
    digests = {path: sha256_of_file(path) for path in files}
    expected = bytearray(reference_raw(files[0], tmp_path).read_bytes())
    return files, digests, expected


def random_writes(exposed: Path, expected: bytearray, seed: int, count: int = 40) -> None:
    """Write `count` random pieces, some unaligned and some across clusters, to both."""
    generator = random.Random(seed)
    size = len(expected)
    for _ in range(count):
        length = generator.choice([1, 511, 4096, 65536 + 3, 200_000])
        offset = generator.randrange(0, size - length)
        data = generator.randbytes(length)
        within(write_at, exposed, offset, data)
        expected[offset:offset + length] = data


def check_qemu_sees(overlay: Path, expected: bytes, tmp_path: Path, *share: str) -> None:
    """Compare and check `overlay` with qemu-img; pass "-U" while the overlay is mounted."""
    expected_file = tmp_path / "expected.raw"
    expected_file.write_bytes(expected)
    compared = qemu_img("compare", *share, "-F", "raw", overlay, expected_file, check=False)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert "Images are identical" in compared.stdout
    checked = qemu_img("check", *share, overlay, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "No errors were found" in checked.stdout


@needs_fuse
@pytest.mark.parametrize("base_kind", BASES)
def test_overlay_takes_writes(tmp_path, mountpoint, base_kind):
    files, digests, expected = build_base(tmp_path, base_kind)
    image = files[0]
    overlay = tmp_path / "work.qcow2"

    with mounted(image, mountpoint, "--overlay", overlay) as exposed:
        random_writes(exposed, expected, seed=1)
        assert within(exposed.read_bytes) == expected

    for path in files:
        assert sha256_of_file(path) == digests[path], f"{path.name} changed"
    info = qemu_info(overlay)
    assert info["backing-filename"] == str(image.resolve())
    assert info["backing-filename-format"] == ("raw" if base_kind == "raw" else "qcow2")
    assert info["cluster-size"] == 64 * 1024
    assert info["virtual-size"] == len(expected)
    check_qemu_sees(overlay, bytes(expected), tmp_path)


@needs_fuse
@pytest.mark.parametrize("base_kind", BASES)
def test_overlay_reused_by_second_mount(tmp_path, mountpoint, base_kind):
    files, digests, expected = build_base(tmp_path, base_kind)
    image = files[0]
    overlay = tmp_path / "work.qcow2"

    with mounted(image, mountpoint, "--overlay", overlay) as exposed:
        random_writes(exposed, expected, seed=2)
    inode = os.stat(overlay).st_ino

    with mounted(image, mountpoint, "--overlay", overlay) as exposed:
        assert within(exposed.read_bytes) == expected
        random_writes(exposed, expected, seed=3, count=10)

    assert os.stat(overlay).st_ino == inode
    for path in files:
        assert sha256_of_file(path) == digests[path], f"{path.name} changed"
    check_qemu_sees(overlay, bytes(expected), tmp_path)


@needs_fuse
def test_overlay_relative_paths(tmp_path, mountpoint, monkeypatch):
    """Relative IMAGE and FILE work, and the overlay records IMAGE's absolute path."""
    files = raw_base(tmp_path)
    # `python3 -m vdiskfs` finds the checkout through the working directory, which moves.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    monkeypatch.chdir(tmp_path)
    with mounted(Path(files[0].name), mountpoint, "--overlay", "work.qcow2") as exposed:
        within(write_at, exposed, 0, b"relative")
    assert qemu_info(tmp_path / "work.qcow2")["backing-filename"] == str(files[0].resolve())


@needs_fuse
def test_overlay_temporary_removed(tmp_path, mountpoint, monkeypatch):
    files = chain_of_three(tmp_path)
    image = files[0]
    digests = {path: sha256_of_file(path) for path in files}
    expected = bytearray(reference_raw(image, tmp_path).read_bytes())
    temporary_dir = tmp_path / "tmpdir"
    temporary_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary_dir))

    with mounted(image, mountpoint, "--overlay-temporary") as exposed:
        random_writes(exposed, expected, seed=4)
        assert within(exposed.read_bytes) == expected
        overlays = list(temporary_dir.iterdir())
        assert len(overlays) == 1
        assert overlays[0].name.startswith("vdiskfs-overlay-")
        assert str(overlays[0]) in daemon_log(mountpoint)
        # The daemon holds the overlay for writing, so qemu-img must share it (-U).
        check_qemu_sees(overlays[0], bytes(expected), tmp_path, "-U")

    assert list(temporary_dir.iterdir()) == []
    assert "removed temporary overlay" in daemon_log(mountpoint)
    for path in files:
        assert sha256_of_file(path) == digests[path], f"{path.name} changed"


@needs_fuse
def test_overlay_temporary_discards_writes(tmp_path, mountpoint, monkeypatch):
    files = raw_base(tmp_path)
    original = files[0].read_bytes()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with mounted(files[0], mountpoint, "--overlay-temporary") as exposed:
        within(write_at, exposed, 0, b"discarded")
    with mounted(files[0], mountpoint, "--overlay-temporary") as exposed:
        assert within(exposed.read_bytes) == original


@needs_fuse
def test_overlay_of_other_image_rejected(tmp_path, mountpoint):
    files = raw_base(tmp_path)
    other = tmp_path / "other.img"
    other.write_bytes(bytes(MiB))
    overlay = create_qcow2(tmp_path / "work.qcow2", 5 * MiB, backing=str(other),
                           backing_format="raw")
    digest = sha256_of_file(overlay)

    result = vdiskfs("mount", "--overlay", overlay, files[0], mountpoint, check=False)

    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"has the backing file {other}, not {files[0]}" in result.stderr
    assert sha256_of_file(overlay) == digest


@needs_fuse
def test_overlay_without_backing_rejected(tmp_path, mountpoint):
    files = raw_base(tmp_path)
    overlay = create_qcow2(tmp_path / "work.qcow2", 5 * MiB)
    result = vdiskfs("mount", "--overlay", overlay, files[0], mountpoint, check=False)
    assert result.returncode == 1
    assert "has no backing file" in result.stderr


def test_overlay_not_qcow2_rejected(tmp_path, mountpoint):
    files = raw_base(tmp_path)
    overlay = tmp_path / "work.img"
    overlay.write_bytes(bytes(4096))
    result = vdiskfs("mount", "--overlay", overlay, files[0], mountpoint, check=False)
    assert result.returncode == 1
    assert "is not a qcow2 image" in result.stderr
    assert overlay.read_bytes() == bytes(4096)


def test_overlay_is_image_rejected(tmp_path, mountpoint):
    files = raw_base(tmp_path)
    digest = sha256_of_file(files[0])
    result = vdiskfs("mount", "--overlay", files[0], files[0], mountpoint, check=False)
    assert result.returncode == 1
    assert "is the image itself" in result.stderr
    assert sha256_of_file(files[0]) == digest


@pytest.mark.parametrize("option", [["--overlay", "work.qcow2"], ["--overlay-temporary"]])
def test_overlay_read_only_rejected(tmp_path, mountpoint, option):
    files = raw_base(tmp_path)
    result = vdiskfs("mount", "--read-only", *option, files[0], mountpoint, check=False)
    assert result.returncode == 1
    assert "need a writable mount" in result.stderr
    assert not (tmp_path / "work.qcow2").exists()


def test_overlay_options_exclusive(tmp_path, mountpoint):
    files = raw_base(tmp_path)
    result = vdiskfs("mount", "--overlay", tmp_path / "work.qcow2", "--overlay-temporary",
                     files[0], mountpoint, check=False)
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
