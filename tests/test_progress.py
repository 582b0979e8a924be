"""Tests of progress bars: drawn on a terminal only, silent with --quiet, and shown by
`vdiskfs create` while preallocation=full writes zeros."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys

import pytest

from vdiskfs import progress
from vdiskfs.progress import progress_bar


@pytest.fixture
def terminal():
    """A writable text stream on a pseudo-terminal, and a function to read what it received."""
    main_fd, terminal_fd = pty.openpty()
    stream = open(terminal_fd, "w", encoding="utf-8")

    def received() -> str:
        stream.flush()
        chunks = []
        # Read until the terminal has had nothing more for a while.
        while select.select([main_fd], [], [], 0.2)[0]:
            chunks.append(os.read(main_fd, 65536))
        return b"".join(chunks).decode()

    yield stream, received
    stream.close()
    os.close(main_fd)
    progress.set_quiet(False)


def test_bar_silent_without_terminal():
    stream = io.StringIO()

    with progress_bar(100, "copying", stream) as bar:
        bar.advance(50)
        bar.advance(50)

    assert stream.getvalue() == ""


def test_bar_drawn_on_terminal(terminal):
    stream, received = terminal

    with progress_bar(4 << 20, "copying", stream) as bar:
        bar.advance(2 << 20)
        bar.advance(2 << 20)

    output = received()
    assert "copying 100% [" in output
    assert "4 MiB / 4 MiB" in output
    assert output.endswith("\r\n") or output.endswith("\n")


def test_bar_quiet_on_terminal(terminal):
    stream, received = terminal
    progress.set_quiet(True)

    with progress_bar(100, "copying", stream) as bar:
        bar.advance(100)
    stream.write("end\n")

    assert received().strip() == "end"


def test_bar_counts_clamped():
    bar = progress.ProgressBar(10, "copying", io.StringIO(), enabled=False)

    bar.advance(25)

    assert bar.done == 10


def run_on_terminal(*args: str) -> str:
    """Run `python -m vdiskfs ARGS` with stderr on a pseudo-terminal; return what it wrote."""
    main_fd, terminal_fd = pty.openpty()
    try:
        process = subprocess.Popen([sys.executable, "-m", "vdiskfs", *args],
                                   stderr=terminal_fd, stdout=subprocess.DEVNULL)
        os.close(terminal_fd)
        chunks = []
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # EIO once the process has closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=120) == 0
    finally:
        os.close(main_fd)
    return b"".join(chunks).decode()


def test_create_full_shows_progress(tmp_path):
    image = tmp_path / "disk.raw"

    output = run_on_terminal("create", "-f", "raw", "-o", "preallocation=full", str(image), "64M")

    assert "preallocating 100%" in output
    assert image.stat().st_size == 64 << 20


def test_create_quiet_shows_nothing(tmp_path):
    image = tmp_path / "disk.qcow2"

    output = run_on_terminal("create", "-q", "-f", "qcow2", "-o", "preallocation=full",
                             str(image), "16M")

    assert output == ""
