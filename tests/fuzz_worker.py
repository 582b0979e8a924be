"""Open and read images under an address-space limit, for tests/test_fuzz.py.

Run as `python fuzz_worker.py LIMIT_BYTES`. Each line on standard input is `ro PATH` or
`rw PATH`. For `ro` the worker opens the image read-only and reads its disk in chunks; for
`rw` it opens the image read-write, writes at a few offsets and flushes, where any
VdiskError after the open is allowed. It prints one line:
- `open-error <message>` when opening raised a VdiskError,
- `ok <chunks read> <chunks that raised CorruptImageError>` after the reads and a run of
  the qcow2 checker,
- `bug <exception type>: <message>` for any other exception, MemoryError included.
The limit makes an allocation that follows a corrupted size field fail here, instead of
passing unnoticed or exhausting the machine.
"""

from __future__ import annotations

import logging
import resource
import sys
import traceback

from vdiskfs.errors import CorruptImageError, VdiskError
from vdiskfs.formats.qcow2.check import Qcow2Checker
from vdiskfs.registry import open_chain

CHUNK = 256 * 1024
# Whole disks are read up to this size; larger ones (a corrupted size field) are sampled.
FULL_READ_LIMIT = 8 * 1024 * 1024
SAMPLES = 16


def read_offsets(size: int) -> list:
    if size <= FULL_READ_LIMIT:
        return list(range(0, size, CHUNK))
    step = max(CHUNK, size // SAMPLES)
    offsets = list(range(0, FULL_READ_LIMIT, CHUNK))
    offsets += [offset - offset % CHUNK for offset in range(FULL_READ_LIMIT, size, step)]
    offsets.append(max(0, size - CHUNK))
    return offsets


def check_image(path: str) -> str:
    try:
        driver = open_chain(path, read_only=True, cache_size=4 * 1024 * 1024)
    except VdiskError as error:
        message = str(error)
        if "\n" in message or not message:
            return f"bug {type(error).__name__} message is not one line: {message!r}"
        return f"open-error {message}"
    try:
        reads = damaged = 0
        for offset in read_offsets(driver.virtual_size):
            reads += 1
            try:
                driver.read(offset, CHUNK)
            except CorruptImageError:
                damaged += 1
        if driver.format_name == "qcow2":
            # The checker reads the same metadata and must not fail on it either.
            Qcow2Checker(driver, lambda line: None).check()
        return f"ok {reads} {damaged}"
    finally:
        driver.close()


def write_image(path: str) -> str:
    try:
        driver = open_chain(path, read_only=False, cache_size=4 * 1024 * 1024)
    except VdiskError as error:
        return f"open-error {error}"
    rejected = 0
    try:
        size = driver.virtual_size
        for offset in (0, 5000, size // 2, max(0, size - CHUNK)):
            if offset >= size:
                continue  # the driver requires writes inside the disk
            try:
                driver.write(offset, b"\x42" * min(CHUNK, size - offset))
            except VdiskError:
                rejected += 1
        try:
            driver.flush()
        except VdiskError:
            rejected += 1
    finally:
        try:
            driver.close()
        except VdiskError:
            rejected += 1
    return f"ok 4 {rejected}"


def main() -> None:
    limit = int(sys.argv[1])
    # Damage is expected here, and the driver logs every corrupt image it marks.
    logging.disable(logging.CRITICAL)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for line in sys.stdin:
        mode, path = line.rstrip("\n").split(" ", 1)
        try:
            answer = check_image(path) if mode == "ro" else write_image(path)
        except BaseException as error:  # every other exception is a finding of the fuzz test
            last = traceback.extract_tb(error.__traceback__)[-1]
            answer = (f"bug {type(error).__name__}: {error} "
                      f"(at {last.filename}:{last.lineno})")
        print(answer.replace("\n", "\\n"), flush=True)


if __name__ == "__main__":
    main()
