"""`vdiskfs info`: describe an image and its backing chain, as `qemu-img info` does."""

from __future__ import annotations

import argparse
import json

from vdiskfs.errors import VdiskError
from vdiskfs.registry import open_chain
from vdiskfs.commands.snapshot import render_snapshot_list
from vdiskfs.sizes import format_size

HELP = "show format, size, features, snapshots and backing chain of an image"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="image file to describe")
    parser.add_argument("--format", "-f", dest="format_name", metavar="FMT",
                        help="image format (qcow2 or raw); probed when omitted")
    parser.add_argument("--json", "--output=json", dest="json", action="store_true",
                        help="print JSON with the keys of `qemu-img info --output=json`")
    parser.add_argument("--backing-chain", action="store_true",
                        help="describe every layer of the backing chain, top first")
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="read the image even while another process holds it for "
                             "writing, as qemu-img info -U does")
    parser.epilog = "example:\n  vdiskfs info --json --backing-chain disk.qcow2"


def run(args: argparse.Namespace) -> int:
    try:
        top = open_chain(args.image, args.format_name, read_only=True,
                         force_share=args.force_share)
    except (VdiskError, OSError) as error:
        raise type(error)(f"cannot open {args.image}: {_reason(error)}") from None

    try:
        layers = [top]
        while args.backing_chain and layers[-1].backing is not None:
            layers.append(layers[-1].backing)
        descriptions = [layer.describe() for layer in layers]
    finally:
        top.close()

    if args.json:
        output = descriptions if args.backing_chain else descriptions[0]
        print(json.dumps(output, indent=4))
    else:
        print("\n\n".join(render_text(description) for description in descriptions))
    return 0


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def render_text(info: dict) -> str:
    """Render one layer's description in the human format of `qemu-img info`."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {format_size(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        backing = info["backing-filename"]
        full = info.get("full-backing-filename")
        if full is not None and full != backing:
            backing += f" (actual path: {full})"
        lines.append(f"backing file: {backing}")
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("dirty-flag"):
        lines.append("dirty: yes (refcounts may be stale)")

    snapshots = info.get("snapshots", [])
    lines.append(f"snapshots: {len(snapshots)}")
    if snapshots:
        lines.append(render_snapshot_list(snapshots))

    specific = info.get("format-specific", {}).get("data")
    if specific:
        lines.append("Format specific information:")
        for key, value in specific.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, list):
                value = ", ".join(value) if value else "none"
            lines.append(f"    {key}: {value}")
    return "\n".join(lines)
