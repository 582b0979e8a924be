"""The control channel of a running daemon: a Unix socket beside its pid file.

A client sends one JSON request line and reads one JSON reply line. The daemon handles a
request synchronously inside the trio loop, so it runs between two FUSE requests: no write
is half done while a snapshot is taken. Requests:
  {"op": "snapshot-list"}
  {"op": "snapshot-create", "name": NAME}
  {"op": "snapshot-delete", "name": NAME}
Replies: {"ok": true, "snapshots": [...]} or {"ok": false, "error": MESSAGE}.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional

import trio

from vdiskfs.errors import VdiskError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
CLIENT_TIMEOUT = 300  # seconds; a snapshot of a large image flushes and copies the L1 table


def socket_path(real_mountpoint: str) -> Path:
    from vdiskfs.daemon import mount_key, runtime_dir

    return runtime_dir() / (mount_key(real_mountpoint) + ".sock")


def handle_request(operations, request: dict) -> dict:
    """Carry out one control request on the mounted disk and return the reply."""
    from vdiskfs.formats.qcow2 import snapshot_ops
    from vdiskfs.formats.qcow2.snapshot import snapshot_fields

    if len(operations.files) != 1:
        raise VdiskError("live snapshots need a mount that serves exactly one disk")
    exported = operations.files[0]
    driver = exported.driver
    if not hasattr(driver, "snapshots"):
        raise VdiskError(f"{driver.filename}: {driver.format_name} images have no internal snapshots")

    operation = request.get("op")
    name = request.get("name")
    if operation == "snapshot-list":
        pass
    elif operation in ("snapshot-create", "snapshot-delete"):
        if not isinstance(name, str) or not name:
            raise VdiskError(f"{operation} needs a snapshot name")
        driver.flush()
        exported.dirty = False
        verb = "create" if operation == "snapshot-create" else "delete"
        try:
            if verb == "create":
                snapshot_ops.create_snapshot(driver, name)
            else:
                snapshot_ops.delete_snapshot(driver, name)
        except VdiskError as error:
            raise VdiskError(f"could not {verb} snapshot '{name}': {error}") from None
        log.info("%s: %s '%s' done", driver.filename, operation, name)
    else:
        raise VdiskError(f"unknown control request {operation!r}")
    return {"ok": True, "snapshots": [snapshot_fields(snapshot) for snapshot in driver.snapshots]}


async def serve_control(operations, path: Path) -> None:
    """Accept control connections on `path` until cancelled; remove the socket afterwards."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if path.exists():
            path.unlink()
        await listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(4)
        while True:
            connection, _ = await listener.accept()
            with connection:
                try:
                    await _serve_connection(operations, connection)
                except OSError as error:
                    # A client that went away must not stop the daemon.
                    log.warning("control connection failed: %s", error)
    finally:
        listener.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def _serve_connection(operations, connection) -> None:
    data = b""
    while b"\n" not in data and len(data) < MAX_REQUEST_BYTES:
        chunk = await connection.recv(4096)
        if not chunk:
            break
        data += chunk
    try:
        request = json.loads(data.split(b"\n", 1)[0] or b"{}")
        # Deleting a snapshot frees clusters, which running reads must not see.
        await operations.gate.exclusive()
        reply = handle_request(operations, request)
    except (VdiskError, OSError, ValueError) as error:
        log.error("control request failed: %s", error)
        reply = {"ok": False, "error": str(error)}
    except Exception as error:  # a bug must not take the mount down with it
        log.exception("control request failed")
        reply = {"ok": False, "error": f"internal error: {error}"}

    output = memoryview(json.dumps(reply).encode() + b"\n")
    while output:
        sent = await connection.send(output)
        output = output[sent:]


def request_snapshot(mountpoint: str, *, list_only: bool = False, create: Optional[str] = None,
                     delete: Optional[str] = None, apply: Optional[str] = None) -> list:
    """Send a snapshot request to the daemon serving `mountpoint`; return its snapshot list."""
    if apply is not None:
        raise VdiskError(
            f"cannot apply a snapshot on the live mount {mountpoint}: the kernel caches the "
            f"disk's content; unmount it, then run vdiskfs snapshot -a on the image")
    if create is not None:
        request = {"op": "snapshot-create", "name": create}
    elif delete is not None:
        request = {"op": "snapshot-delete", "name": delete}
    else:
        request = {"op": "snapshot-list"}

    path = socket_path(os.path.realpath(mountpoint))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(CLIENT_TIMEOUT)
    try:
        try:
            client.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise VdiskError(f"{mountpoint} is not served by a running vdiskfs daemon") from None
        client.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise VdiskError(f"the vdiskfs daemon of {mountpoint} did not respond within "
                         f"{CLIENT_TIMEOUT} s") from None
    finally:
        client.close()

    try:
        reply = json.loads(data)
    except ValueError:
        raise VdiskError(f"the vdiskfs daemon of {mountpoint} sent an invalid reply") from None
    if not reply.get("ok"):
        raise VdiskError(reply.get("error", "the request failed"))
    return reply["snapshots"]
