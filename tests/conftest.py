"""Fixtures for tests that mount images for real: mountpoints that never outlive a test,
and a subreaper so that tests can collect the exit status of background daemons."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import vdiskfs

PR_SET_CHILD_SUBREAPER = 36


def _set_child_subreaper(enabled: bool) -> bool:
    """Make this process adopt orphaned descendants (Linux-only); return whether that worked."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) == 0


@pytest.fixture(scope="session", autouse=True)
def subreaper():
    """Adopt the daemons that `vdiskfs mount` leaves behind, so tests can wait for them.

    Without this, a daemon's parent is whatever reaps orphans on the machine. In some
    containers nothing does, so exited daemons stay zombies and kill(pid, 0) still succeeds.
    """
    enabled = _set_child_subreaper(True)
    yield enabled
    if enabled:
        _set_child_subreaper(False)
        # Reap the daemons that tests did not wait for.
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass


@pytest.fixture(scope="session", autouse=True)
def runtime_logs(tmp_path_factory):
    """Remove, after the run, the daemon logs of every mount below this run's temporary
    directory; /run/vdiskfs would otherwise collect one file per mount of every run."""
    yield
    from vdiskfs.daemon import mount_key, runtime_dir

    prefix = mount_key(os.path.realpath(tmp_path_factory.getbasetemp()))
    for log_path in runtime_dir().glob(glob.escape(prefix) + "*.log"):
        log_path.unlink(missing_ok=True)


def wait_for_exit(pid: int, timeout: float) -> int:
    """Wait for adopted process `pid` to exit and return its exit status; fail on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            pytest.fail(f"vdiskfs daemon {pid} did not exit within {timeout} s")
        time.sleep(0.02)


def _is_mounted(path: Path) -> bool:
    real_path = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="ascii", errors="surrogateescape") as table:
        return any(line.split()[4] == real_path for line in table)


def force_unmount(path: Path) -> None:
    """Remove whatever a failed test left mounted at `path`, killing its daemon if needed."""
    if not _is_mounted(path):
        return
    with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
        vdiskfs("umount", path, check=False, timeout=30)
    if not _is_mounted(path):
        return

    from vdiskfs.daemon import RuntimeFiles

    pid_path = RuntimeFiles.for_mountpoint(os.path.realpath(path)).pid
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pid_path.read_text()), signal.SIGKILL)
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def remove_runtime_log(path: Path) -> None:
    """Remove the daemon log of a mount at `path`, which would otherwise stay in /run."""
    from vdiskfs.daemon import RuntimeFiles

    with contextlib.suppress(FileNotFoundError):
        RuntimeFiles.for_mountpoint(os.path.realpath(path)).log.unlink()


@pytest.fixture
def mountpoint(tmp_path):
    """An empty directory to mount on; anything still mounted there is removed afterwards."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    force_unmount(path)
    remove_runtime_log(path)
