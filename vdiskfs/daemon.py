"""The FUSE daemon's life: runtime files, mounting, serving, signals and shutdown.

`vdiskfs mount` without --foreground runs these steps:
1. The parent opens the image first (commands/mount.py), so that image errors reach the
   terminal directly.
2. start_background() forks before trio starts and before any thread exists, because fork()
   copies only the calling thread and would leave a half-initialised trio or libfuse behind.
3. The child starts a new session, sends its output to the log file, locks the pid file,
   mounts with pyfuse3.init() and writes "ready" or the reason of the failure to a pipe. The
   parent prints that reason as one line, or returns once the mount is live.
4. The child serves requests until a stop signal or an unmount ends the FUSE loop. It then
   unmounts, closes (and so flushes) the image, removes the pid file and exits. The pid
   file's lock is dropped only when the process exits, and `vdiskfs umount` waits for that.

With --foreground the same steps run in the calling process, without the fork and the pipe.

Runtime files live in runtime_dir(): /run/vdiskfs for root, $XDG_RUNTIME_DIR/vdiskfs for
other users. Each mount has <key>.pid and <key>.log there, where the key is the mountpoint's
real path, percent-encoded; a future control socket can take <key>.sock.

Linux-only parts sit behind find_mount() (/proc/self/mountinfo) and unmount() (umount2(2) and
fusermount3). FreeBSD has FUSE and libfuse3 too, but needs its own versions of those two.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Set

import pyfuse3
import trio

from vdiskfs.control import serve_control
from vdiskfs.control import socket_path as control_socket_path
from vdiskfs.errors import VdiskError
from vdiskfs.fs import DiskOperations

log = logging.getLogger(__name__)

# The file system type that the kernel shows for a vdiskfs mount (fuse.<subtype>).
FUSE_SUBTYPE = "vdiskfs"
FUSE_FSTYPE = "fuse." + FUSE_SUBTYPE

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}

# pyfuse3 starts another task that reads requests whenever all tasks are busy, and then the
# tasks take turns on every request. That cost 5 to 20 us of CPU per request on a 2-core
# virtual machine (random 4 KiB reads and writes lost 10 to 20 %), more than serving the
# requests that arrive during a large read's thread handoff gains.
FUSE_MAX_TASKS = 1

# Seconds that a stop signal waits for the kernel to write back the mount's dirty pages.
STOP_SYNC_TIMEOUT = 60.0
SYNC_POLL_INTERVAL = 0.01

# Seconds that `vdiskfs mount` waits for the daemon to mount. Mounting normally takes
# milliseconds, so this only catches a daemon that hangs in libfuse or fusermount3.
READY_TIMEOUT = 60.0

# `vdiskfs umount` logs that it is waiting once the daemon has taken this long to exit.
SLOW_EXIT_NOTICE = 5.0
EXIT_POLL_INTERVAL = 0.02

# Longer keys are replaced by a hash, so that file names stay below NAME_MAX (255 bytes).
MAX_KEY_LENGTH = 200

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class MountError(VdiskError):
    """Mounting or unmounting failed. The message is the reason, without the mountpoint."""


# Runtime files


def runtime_dir() -> Path:
    """Return the directory that contains the pid and log files of this user's mounts."""
    if os.geteuid() == 0:
        return Path("/run/vdiskfs")
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "vdiskfs"
    # Without a session (cron, su), fall back to a private directory in /tmp.
    return Path(tempfile.gettempdir()) / f"vdiskfs-{os.getuid()}"


def ensure_runtime_dir() -> Path:
    """Create runtime_dir() if needed and check that only this user can write to it."""
    directory = runtime_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = os.lstat(directory)
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise MountError(f"runtime directory {directory} is not a directory")
    if status.st_uid != os.geteuid() or status.st_mode & 0o022:
        raise MountError(f"runtime directory {directory} must belong to uid {os.geteuid()} "
                         f"and be writable by it only")
    return directory


def mount_key(real_mountpoint: str) -> str:
    """Return the file name stem of the runtime files that belong to `real_mountpoint`."""
    key = urllib.parse.quote(real_mountpoint, safe="")
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha256(os.fsencode(real_mountpoint)).hexdigest()
        key = "sha256-" + digest
    return key


@dataclass(frozen=True)
class RuntimeFiles:
    """Paths of the pid file and the log file of one mount."""

    pid: Path
    log: Path

    @classmethod
    def for_mountpoint(cls, real_mountpoint: str) -> "RuntimeFiles":
        base = runtime_dir() / mount_key(real_mountpoint)
        return cls(pid=base.with_name(base.name + ".pid"), log=base.with_name(base.name + ".log"))


def describe_log_location() -> str:
    """Return where background daemons log, for help texts."""
    return ("RUNDIR/MOUNTPOINT.log, where RUNDIR is /run/vdiskfs for root and "
            "$XDG_RUNTIME_DIR/vdiskfs for other users, and MOUNTPOINT is the real path of "
            "the mountpoint, percent-encoded")


class PidFile:
    """A pid file that the daemon keeps locked with flock() for its whole life.

    Other processes test the lock, not the pid: the kernel drops the lock when the daemon
    exits, however it exits, so a file left behind by a killed daemon never looks alive.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def acquire(self) -> None:
        """Create and lock the file and write this process's pid; raise MountError when locked."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise MountError(f"vdiskfs daemon {pid} still serves it") from None
            # The previous owner may have removed the file between our open and our lock.
            # A lock on a removed file protects nothing, so start again.
            try:
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)

        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def remove(self) -> None:
        """Remove the file but keep it locked: the lock goes away when the process exits."""
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)


def _read_pid(fd: int) -> Optional[int]:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


class DaemonWatch:
    """An open pid file of a running daemon, to wait for its exit after unmounting.

    Open it before unmounting: the daemon removes the file while it shuts down, and the
    open descriptor still reaches the lock after that.
    """

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.pid = _read_pid(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def alive(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False

    def wait(self) -> None:
        """Block until the daemon has exited, telling the user once if that takes long."""
        started = time.monotonic()
        noticed = False
        while self.alive():
            if not noticed and time.monotonic() - started > SLOW_EXIT_NOTICE:
                log.info("waiting for vdiskfs daemon %s to flush the image and exit", self.pid)
                noticed = True
            time.sleep(EXIT_POLL_INTERVAL)


def watch_daemon(pid_path: Path) -> Optional[DaemonWatch]:
    """Return a DaemonWatch on `pid_path`, or None when no daemon has written that file."""
    try:
        return DaemonWatch(pid_path)
    except FileNotFoundError:
        return None


# Mount table and unmounting (Linux-only)


@dataclass(frozen=True)
class MountEntry:
    """One line of the mount table."""

    mountpoint: str
    fstype: str
    source: str
    device: str = ""  # "major:minor" of the mounted file system


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash as octal escapes (\040).
    return os.fsdecode(field.encode("ascii", "surrogateescape")
                       .decode("unicode_escape").encode("latin-1"))


def find_mount(real_path: str) -> Optional[MountEntry]:
    """Return the topmost mount at `real_path`, or None when nothing is mounted there.

    Linux-only: reads /proc/self/mountinfo, which also lists FUSE mounts whose daemon died
    (where stat() fails with ENOTCONN).
    """
    found = None
    with open("/proc/self/mountinfo", encoding="ascii", errors="surrogateescape") as table:
        for line in table:
            fields = line.split()
            separator = fields.index("-")
            mountpoint = _unescape_mountinfo(fields[4])
            if mountpoint == real_path:
                # Later lines are mounted on top of earlier ones.
                found = MountEntry(mountpoint, fields[separator + 1],
                                   _unescape_mountinfo(fields[separator + 2]), fields[2])
    return found


def unmount(real_path: str) -> None:
    """Unmount `real_path` the way umount(8) does, without forcing or detaching it.

    Raises OSError with EBUSY when a process still uses the mount. Linux-only: root calls
    umount2(2), other users go through the set-uid fusermount3.
    """
    if os.geteuid() != 0:
        unmount_with_fusermount(real_path)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(real_path), 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), real_path)


def unmount_with_fusermount(real_path: str) -> None:
    """Unmount `real_path` with `fusermount3 -u`; raise OSError (EBUSY when busy). Linux-only."""
    result = subprocess.run(["fusermount3", "-u", real_path], capture_output=True, text=True,
                            env={**os.environ, "LC_ALL": "C"})
    if result.returncode == 0:
        return
    # fusermount3 reports the failed umount2() only as text, such as
    # "fusermount3: failed to unmount /mnt: Device or resource busy".
    message = result.stderr.strip()
    if os.strerror(errno.EBUSY) in message:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), real_path)
    raise OSError(errno.EPERM, message or "fusermount3 -u failed", real_path)


# Mounting


def _set_stop_signals_blocked(blocked: bool) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK if blocked else signal.SIG_UNBLOCK, STOP_SIGNALS)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def _capture_stderr(captured: list) -> Iterator[None]:
    """Send file descriptor 2 to a temporary file; append the text written there to `captured`.

    libfuse and fusermount3 explain a failed mount only on stderr, so the explanation has to
    be caught at the descriptor level to become the reason in our one-line error.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            captured.append(capture.read().decode(errors="replace"))


def mount_fuse(operations: DiskOperations, mountpoint: str, fuse_options: Set[str],
               pid_file: PidFile) -> None:
    """Lock `pid_file` and mount `operations` on `mountpoint`; raise MountError on failure.

    The stop signals must be blocked already, so that no signal can end the process between
    the mount and the start of the FUSE loop and leave a dead mount behind.
    """
    pid_file.acquire()
    captured: list = []
    try:
        with _capture_stderr(captured):
            pyfuse3.init(operations, mountpoint, fuse_options)
    except RuntimeError as error:
        pid_file.remove()
        output = captured[0] if captured else ""
        if output.strip():
            log.debug("libfuse output: %s", output.strip())
        raise MountError(_last_line(output) or str(error)) from None
    if captured and captured[0]:
        sys.stderr.write(captured[0])


# Readahead of a FUSE mount, in KiB. The kernel's default of 128 KiB splits a 1 MiB read
# into eight requests; larger requests cut the per-request cost of the FUSE loop.
READ_AHEAD_KB = 1024


async def _raise_read_ahead_after_init(initialized: trio.Event, mountpoint: str) -> None:
    # The kernel caps readahead when it receives libfuse's reply to FUSE_INIT, which goes out
    # right after DiskOperations.init() returns; this task runs only after that.
    await initialized.wait()
    raise_read_ahead(mountpoint)


def raise_read_ahead(mountpoint: str) -> None:
    """Raise the readahead of the new mount; best effort, and a no-op outside Linux.

    Linux-only: writes /sys/class/bdi/MAJOR:MINOR/read_ahead_kb, which needs root. The
    device number comes from /proc/self/mountinfo, because stat() on the mount point from
    inside the FUSE loop would wait for that same loop.
    """
    try:
        entry = find_mount(mountpoint)
    except OSError:
        return
    if entry is None or not entry.device:
        return
    path = f"/sys/class/bdi/{entry.device}/read_ahead_kb"
    try:
        with open(path, "w") as setting:
            setting.write(str(READ_AHEAD_KB))
    except OSError as error:
        log.debug("cannot set %s: %s", path, error)


class _StopState:
    """The signal that ended the FUSE loop, or None when someone else unmounted."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None


async def _terminate_on_signal(signals, state: _StopState, mountpoint: str,
                               operations: DiskOperations) -> None:
    async for signum in signals:
        if state.signal is None:
            log.info("received %s, writing back cached pages and unmounting %s",
                     signal.Signals(signum).name, mountpoint)
            state.signal = signum
            await _write_back_cached_pages(writable_paths(operations, mountpoint))
            pyfuse3.terminate()
        else:
            log.info("received %s, already unmounting", signal.Signals(signum).name)


def writable_paths(operations: DiskOperations, mountpoint: str) -> List[str]:
    """Return the paths, under the mount, of the exported files that accept writes."""
    if operations.root_file is not None:
        return [] if operations.root_file.read_only else [mountpoint]
    return [os.path.join(mountpoint, exported.name) for exported in operations.files
            if not exported.read_only]


async def _write_back_cached_pages(paths: List[str]) -> None:
    # Dirty pages in the kernel (--writeback-cache, shared mmap) reach the image only as
    # write requests, so the loop must keep serving while a thread waits for them. A plain
    # thread, polled, can be left behind when the timeout passes.
    if not paths:
        return
    errors: list = []

    def write_back() -> None:
        for path in paths:
            try:
                fsync_path(path)
            except OSError as error:
                errors.append((path, error))

    thread = threading.Thread(target=write_back, name="vdiskfs-write-back", daemon=True)
    thread.start()
    with trio.move_on_after(STOP_SYNC_TIMEOUT):
        while thread.is_alive():
            await trio.sleep(SYNC_POLL_INTERVAL)
    if thread.is_alive():
        log.error("writing back the cached pages of %s did not finish in %.0f s; unmounting "
                  "anyway, and pages not yet written are lost", ", ".join(paths),
                  STOP_SYNC_TIMEOUT)
    for path, error in errors:
        log.error("writing back the cached pages of %s failed: %s; pages not yet written "
                  "are lost", path, error.strerror or error)


def fsync_path(path: str) -> None:
    """Open `path` and fsync it, so that the kernel sends its dirty pages and waits for them.

    syncfs(2) would not do: on Linux 6.18 it returned while a FUSE mount still had dirty
    pages (measured: 2 to 13 ms, with 28 of 64 MiB not yet written), because sync no longer
    waits for FUSE writeback. fsync(2) waits for the file's pages and then sends FUSE_FSYNC.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _serve(state: _StopState, mountpoint: str, operations: DiskOperations) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        _set_stop_signals_blocked(False)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_terminate_on_signal, signals, state, mountpoint, operations)
                nursery.start_soon(serve_control, operations, control_socket_path(mountpoint))
                initialized = trio.Event()
                operations.after_init = initialized.set
                nursery.start_soon(_raise_read_ahead_after_init, initialized, mountpoint)
                await pyfuse3.main(min_tasks=1, max_tasks=FUSE_MAX_TASKS)
                nursery.cancel_scope.cancel()
        finally:
            # A signal during the shutdown below would otherwise kill the process halfway
            # through flushing. Blocked, it stays pending and is dropped at exit.
            _set_stop_signals_blocked(True)


def serve_until_unmounted(operations: DiskOperations, mountpoint: str,
                          pid_file: PidFile) -> int:
    """Serve requests until a stop signal or an unmount, shut down and return the exit status.

    A stop signal ends the FUSE loop and the mount is then removed here. When someone else
    unmounted (fusermount3 -u, umount, `vdiskfs umount`), libfuse notices that the mount is
    gone and does not try again. Either way the drivers are closed, which flushes them.

    Before a stop signal ends the loop, the daemon fsyncs every writable exported file, so
    that the kernel writes back the pages it keeps dirty (with --writeback-cache, or through
    a shared mmap). Pages still dirty after STOP_SYNC_TIMEOUT seconds are lost, because the
    connection then closes.
    """
    state = _StopState()
    status = 0
    try:
        trio.run(_serve, state, mountpoint, operations)
    except Exception:
        log.exception("the FUSE loop on %s failed", mountpoint)
        status = 1

    pyfuse3.close(unmount=True)
    if state.signal is None and status == 0:
        log.info("%s was unmounted, closing the image", mountpoint)
    else:
        log.info("unmounted %s, closing the image", mountpoint)

    if not operations.close():
        status = 1
    pid_file.remove()
    log.info("stopped with exit status %d", status)
    return status


def run_foreground(operations: DiskOperations, mountpoint: str, fuse_options: Set[str],
                   files: RuntimeFiles) -> int:
    """Mount and serve in this process until unmounted; raise MountError if mounting fails."""
    ensure_runtime_dir()
    pid_file = PidFile(files.pid)
    _set_stop_signals_blocked(True)
    try:
        mount_fuse(operations, mountpoint, fuse_options, pid_file)
    except MountError:
        _set_stop_signals_blocked(False)
        operations.close()
        raise
    log.info("serving %s on %s; press Ctrl-C or run 'vdiskfs umount %s' to stop",
             ", ".join(exported.filename for exported in operations.files), mountpoint,
             mountpoint)
    return serve_until_unmounted(operations, mountpoint, pid_file)


def start_background(operations: DiskOperations, mountpoint: str, fuse_options: Set[str],
                     files: RuntimeFiles) -> int:
    """Fork a daemon that mounts and serves; return its pid once the mount is live.

    Raises MountError with the daemon's reason when it could not mount. The caller must not
    use the drivers after this returns: the daemon owns them.
    """
    ensure_runtime_dir()
    if threading.active_count() > 1:
        # fork() copies only this thread, so locks that other threads hold stay locked.
        log.warning("forking with %d threads running", threading.active_count())

    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        status = 1
        try:
            status = _daemon_main(operations, mountpoint, fuse_options, files, write_fd)
        except BaseException:
            log.exception("the vdiskfs daemon failed")
        finally:
            logging.shutdown()
            os._exit(status)

    os.close(write_fd)
    try:
        _wait_until_ready(read_fd, pid, files.log)
    finally:
        os.close(read_fd)
    return pid


def _daemon_main(operations: DiskOperations, mountpoint: str, fuse_options: Set[str],
                 files: RuntimeFiles, ready_fd: int) -> int:
    os.setsid()
    _redirect_output(files.log)
    os.chdir("/")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))

    def report(message: str) -> None:
        os.write(ready_fd, message.encode() + b"\n")
        os.close(ready_fd)

    pid_file = PidFile(files.pid)
    _set_stop_signals_blocked(True)
    try:
        mount_fuse(operations, mountpoint, fuse_options, pid_file)
    except MountError as error:
        log.error("cannot mount on %s: %s", mountpoint, error)
        report(f"error {error}")
        operations.close()
        return 1
    log.info("serving %s on %s", ", ".join(exported.filename for exported in operations.files),
             mountpoint)
    report("ready")
    return serve_until_unmounted(operations, mountpoint, pid_file)


def _redirect_output(log_path: Path) -> None:
    """Point stdin at /dev/null and stdout and stderr at the log file.

    Python's log handler writes to sys.stderr, so after this the log file receives the
    daemon's own log, libfuse's messages and anything else written to stderr.
    """
    null_fd = os.open(os.devnull, os.O_RDONLY)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)


def _wait_until_ready(read_fd: int, pid: int, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    message = b""
    while not message.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([read_fd], [], [], max(remaining, 0))
        if not readable:
            raise MountError(f"timed out after {READY_TIMEOUT:.0f} s waiting for vdiskfs "
                             f"daemon {pid} to mount; see {log_path}")
        chunk = os.read(read_fd, 4096)
        if not chunk:
            raise MountError(f"vdiskfs daemon {pid} exited before mounting; see {log_path}")
        message += chunk

    text = message.decode(errors="replace").strip()
    if text != "ready":
        raise MountError(text.removeprefix("error "))
