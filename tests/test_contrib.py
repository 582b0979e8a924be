"""Tests of the files in contrib/: the manual page, bash completion, the systemd unit and
the shell scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
CONTRIB = REPOSITORY / "contrib"


def render_man(page: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                          env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"},
                          timeout=60)


needs_man = pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")


@needs_man
def test_man_page_renders():
    result = render_man(CONTRIB / "man" / "vdiskfs.1")

    assert result.returncode == 0
    assert result.stderr == ""
    assert "vdiskfs mount" in result.stdout


@needs_man
def test_built_man_page_renders(tmp_path):
    from vdiskfs.cli import COMMANDS

    page = tmp_path / "vdiskfs.1"
    built = subprocess.run([sys.executable, str(CONTRIB / "man" / "build-man.py")],
                           capture_output=True, text=True, check=True, timeout=60)
    page.write_text(built.stdout)

    result = render_man(page)

    assert result.returncode == 0
    assert result.stderr == ""
    for command in COMMANDS:
        assert f'.SS "{command}"' in built.stdout


def complete(tmp_path: Path, *words: str) -> list:
    """Return the bash completions of `vdiskfs WORDS`, the last word being completed."""
    wrapper = tmp_path / "bin" / "vdiskfs"
    wrapper.parent.mkdir(exist_ok=True)
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPOSITORY} exec {sys.executable} -m vdiskfs "
                       f"\"$@\"\n")
    wrapper.chmod(0o755)
    quoted = " ".join(f"'{word}'" for word in ("vdiskfs",) + words)
    script = (f"source {CONTRIB / 'completion' / 'vdiskfs.bash'}\n"
              f"COMP_WORDS=({quoted}); COMP_CWORD={len(words)}\n"
              "_vdiskfs\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, "PATH": f"{wrapper.parent}:{os.environ['PATH']}"},
                            timeout=60)
    return [line for line in result.stdout.splitlines() if line]


def test_completion_of_commands(tmp_path):
    assert complete(tmp_path, "m") == ["mount", "map"]


def test_completion_of_options(tmp_path):
    assert complete(tmp_path, "mount", "--part") == ["--partitions"]


def test_completion_of_format(tmp_path):
    assert complete(tmp_path, "info", "-f", "q") == ["qcow2"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    unit = tmp_path / "vdiskfs@test.service"
    shutil.copy(CONTRIB / "systemd" / "vdiskfs@.service", unit)

    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)

    # vdiskfs need not be installed in /usr/local/bin here, nor the manual page; report any
    # other complaint.
    problems = [line for line in result.stderr.splitlines()
                if "/usr/local/bin/vdiskfs is not executable" not in line
                and "man vdiskfs(1)" not in line]
    assert problems == []


@pytest.mark.parametrize("script", ["bhyve/run-vm.sh", "setup.sh"])
def test_scripts_parse(script):
    shell = "bash" if script.endswith("setup.sh") else "sh"

    result = subprocess.run([shell, "-n", str(CONTRIB / script)], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
