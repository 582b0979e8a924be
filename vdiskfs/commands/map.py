"""`vdiskfs map`: show which guest ranges contain data, read as zeros or are unallocated.

The JSON output has the keys and the merging of `qemu-img map --output=json` (QEMU 7.2):
each entry covers [start, start + length) of the guest disk, and
- depth is the layer of the backing chain that decides the range (0 is the top image);
- present is false where no layer allocates the range, so it reads as zeros;
- zero is true where the range reads as zeros;
- data is true where the range reads from stored data;
- offset, when the layer keeps a host cluster for the range, is the host offset of `start`
  in that layer's file (its external data file, if it has one). Compressed clusters have
  none.
Adjacent entries merge when all keys match and their offsets are contiguous.

Raw layers report holes of their file (lseek SEEK_HOLE) as zero ranges, as QEMU does. A
qcow2 layer that looks as if it was created with preallocation=metadata reports holes of its
file under data clusters as zero (and still as data), as QEMU 7.2 does: QEMU makes that guess
when more clusters of the file have a non-zero refcount than its allocated blocks account for
(more than 10/9 of them, and more than two more).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from typing import Iterator, Optional

from vdiskfs.driver import Driver, RunKind
from vdiskfs.errors import VdiskError
from vdiskfs.formats.qcow2 import Qcow2Driver
from vdiskfs.formats.qcow2.refcount import Refcounts
from vdiskfs.formats.raw import RawDriver
from vdiskfs.hostfile import data_extents
from vdiskfs.registry import open_chain

HELP = "show which ranges of an image contain data, read as zeros or are unallocated"

EPILOG = """\
The human output lists the ranges that contain data, with the host offset and the file that
stores them (compressed ranges show 'compressed'). The JSON output lists every range, with
the keys of `qemu-img map --output=json`.

examples:
  vdiskfs map disk.qcow2
  vdiskfs map --output json -f qcow2 disk.qcow2
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="image file to map")
    parser.add_argument("--format", "-f", dest="format_name", metavar="FMT",
                        help="image format (qcow2 or raw); probed when omitted")
    parser.add_argument("--output", choices=("human", "json"), default="human",
                        help="output format (default: human)")
    parser.epilog = EPILOG


@dataclass(frozen=True)
class MapEntry:
    """A guest range whose bytes have the same status, as `qemu-img map` shows it."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: Optional[int] = None
    # The file that contains `offset`; compared when merging, shown by the human output.
    filename: Optional[str] = None

    @property
    def end(self) -> int:
        return self.start + self.length

    def to_json(self) -> dict:
        fields = {"start": self.start, "length": self.length, "depth": self.depth,
                  "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            fields["offset"] = self.offset
        return fields


def run(args: argparse.Namespace) -> int:
    try:
        top = open_chain(args.image, args.format_name, read_only=True)
    except (VdiskError, OSError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise type(error)(f"cannot open {args.image}: {reason}") from None

    try:
        entries = merge_entries(chain_entries(top, 0, top.virtual_size))
        if args.output == "json":
            write_json(entries, sys.stdout)
        else:
            write_human(entries, sys.stdout)
    finally:
        top.close()
    return 0


def chain_entries(layer: Driver, offset: int, length: int, depth: int = 0,
                  preallocated_layers: Optional[dict] = None) -> Iterator[MapEntry]:
    """Yield unmerged entries for [offset, offset + length) of `layer` and the layers below.

    `preallocated_layers` caches looks_preallocated() per layer across recursive calls.
    """
    if preallocated_layers is None:
        preallocated_layers = {}
    if layer not in preallocated_layers:
        preallocated_layers[layer] = looks_preallocated(layer)
    preallocated = preallocated_layers[layer]
    for run in layer.map_range(offset, length):
        if run.kind is RunKind.DATA and preallocated:
            yield from _preallocated_entries(layer, run, depth)
        elif run.kind is RunKind.DATA:
            yield from _data_entries(layer, run.guest_offset, run.length, run.host_offset, depth)
        elif run.kind is RunKind.COMPRESSED:
            yield MapEntry(run.guest_offset, run.length, depth, present=True, zero=False,
                           data=True)
        elif run.kind is RunKind.ZERO:
            yield _entry_with_host(layer, run, run.guest_offset, run.end, depth, present=True)
        else:
            yield from _unallocated_entries(layer, run, depth, preallocated_layers)


def _data_entries(layer: Driver, start: int, length: int, host_offset: int,
                  depth: int) -> Iterator[MapEntry]:
    if not isinstance(layer, RawDriver):
        yield MapEntry(start, length, depth, present=True, zero=False, data=True,
                       offset=host_offset, filename=_data_filename(layer))
        return
    for piece_start, piece_length, is_data in data_extents(layer.fd, host_offset, length):
        yield MapEntry(start + piece_start - host_offset, piece_length, depth, present=True,
                       zero=not is_data, data=is_data, offset=piece_start,
                       filename=layer.filename)


def looks_preallocated(layer: Driver) -> bool:
    """Guess, as QEMU 7.2 does, whether a qcow2 layer was created with preallocation=metadata.

    That is the case when more clusters of the image file have a non-zero refcount than
    max(10/9 of, two more than) the clusters its allocated blocks can hold.
    """
    if not isinstance(layer, Qcow2Driver):
        return False
    cluster_size = layer.cluster_size
    allocated_clusters = layer.allocated_size() // cluster_size
    threshold = max(allocated_clusters * 10 // 9, allocated_clusters + 2)
    refcounts = Refcounts(layer, 4 * cluster_size)
    referenced = 0
    for cluster_index in range(-(-layer.file_size() // cluster_size)):
        if refcounts.get(cluster_index):
            referenced += 1
            if referenced > threshold:
                return True
    return False


def _preallocated_entries(layer: Driver, run, depth: int) -> Iterator[MapEntry]:
    """Yield entries of a data run whose holes in the data file read as zeros."""
    for piece_start, piece_length, is_data in data_extents(layer.data_file_fd, run.host_offset,
                                                           run.length):
        yield MapEntry(run.guest_offset + piece_start - run.host_offset, piece_length, depth,
                       present=True, zero=not is_data, data=True, offset=piece_start,
                       filename=_data_filename(layer))


def _unallocated_entries(layer: Driver, run, depth: int,
                         preallocated_layers: dict) -> Iterator[MapEntry]:
    """Yield entries for a range that `layer` leaves to its backing file.

    The backing file decides the range up to its own end. Past that end, and everywhere
    when there is no backing file, the range reads as zeros at this depth.
    """
    backing = layer.backing
    covered_end = run.guest_offset
    if backing is not None:
        covered_end = max(run.guest_offset, min(run.end, backing.virtual_size))
        if covered_end > run.guest_offset:
            yield from chain_entries(backing, run.guest_offset, covered_end - run.guest_offset,
                                     depth + 1, preallocated_layers)
    if covered_end < run.end:
        yield _entry_with_host(layer, run, covered_end, run.end, depth, present=False)


def _entry_with_host(layer: Driver, run, start: int, end: int, depth: int,
                     present: bool) -> MapEntry:
    """Return a zero entry for [start, end) of `run`, with the run's host cluster if any."""
    entry = MapEntry(start, end - start, depth, present=present, zero=True, data=False)
    if run.host_allocated:
        entry = replace(entry, offset=run.host_offset + start - run.guest_offset,
                        filename=_data_filename(layer))
    return entry


def _data_filename(layer: Driver) -> str:
    return getattr(layer, "data_file_name", None) or layer.filename


def merge_entries(entries) -> Iterator[MapEntry]:
    """Merge adjacent entries whose keys match and whose offsets are contiguous."""
    pending: Optional[MapEntry] = None
    for entry in entries:
        if entry.length == 0:
            continue
        if pending is not None and _mergeable(pending, entry):
            pending = replace(pending, length=pending.length + entry.length)
            continue
        if pending is not None:
            yield pending
        pending = entry
    if pending is not None:
        yield pending


def _mergeable(first: MapEntry, second: MapEntry) -> bool:
    if (first.depth, first.present, first.zero, first.data, first.filename) != (
            second.depth, second.present, second.zero, second.data, second.filename):
        return False
    if (first.offset is None) != (second.offset is None):
        return False
    return first.offset is None or first.offset + first.length == second.offset


def write_json(entries, stream) -> None:
    """Write entries as a JSON list laid out as `qemu-img map --output=json` lays it out."""
    lines = []
    for entry in entries:
        fields = ", ".join(f"{json.dumps(key)}: {json.dumps(value)}"
                           for key, value in entry.to_json().items())
        lines.append("{ " + fields + "}")
    stream.write("[" + ",\n".join(lines) + "]\n")


def write_human(entries, stream) -> None:
    """Write the ranges that contain data as a table of offset, length, host offset and file."""
    stream.write(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")
    for entry in entries:
        if not entry.data or entry.zero:
            continue
        mapped = "compressed" if entry.offset is None else _hex(entry.offset)
        stream.write(f"{_hex(entry.start):<16}{_hex(entry.length):<16}{mapped:<16}"
                     f"{entry.filename or ''}\n")


def _hex(value: int) -> str:
    return "0" if value == 0 else f"{value:#x}"
