"""ReadPlan on real files, and ReadGate with real trio tasks."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from vdiskfs.concurrency import PlanRunner, ReadGate
from vdiskfs.errors import CorruptImageError
from vdiskfs.readplan import RWF_NOWAIT, ReadPlan


@pytest.fixture
def host_file(tmp_path):
    path = tmp_path / "host.bin"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def test_contiguous_reads_merge(host_file):
    plan = ReadPlan.for_length(8192)
    plan.host_read(host_file, 0, 0, 4096)
    plan.host_read(host_file, 4096, 4096, 8192)
    assert plan.pending_bytes == 8192
    assert len(plan._steps) == 1
    plan.run()
    assert plan.result == (bytes(range(256)) * 64)[:8192]


def test_reads_apart_stay_separate(host_file):
    plan = ReadPlan.for_length(1024)
    plan.host_read(host_file, 0, 0, 512)
    plan.host_read(host_file, 4096, 512, 1024)
    assert len(plan._steps) == 2
    plan.run()
    assert plan.result[:512] == bytes(range(256)) * 2
    assert plan.result[512:] == bytes(range(256)) * 2


def test_end_of_file_reads_as_zeros(host_file):
    plan = ReadPlan(memoryview(bytearray(b"\xff" * 1024)), zeroed=False)
    plan.host_read(host_file, 16384 - 256, 0, 1024)
    plan.run()
    assert plan.result[:256] == bytes(range(256))
    assert plan.result[256:] == bytes(768)


def test_zeros_written_only_when_needed():
    dirty = ReadPlan(memoryview(bytearray(b"\xff" * 16)), zeroed=False)
    dirty.zeros(4, 12)
    assert dirty.result == b"\xff" * 4 + bytes(8) + b"\xff" * 4
    assert dirty.pending_bytes == 0


@pytest.mark.skipif(not RWF_NOWAIT, reason="RWF_NOWAIT is Linux-only")
def test_cached_reads_complete_inline(host_file):
    os.pread(host_file, 16384, 0)  # bring the file into the page cache
    plan = ReadPlan.for_length(16384)
    plan.host_read(host_file, 0, 0, 16384)
    assert plan.run_cached()
    assert plan.pending_bytes == 0
    assert plan.result == bytes(range(256)) * 64


def test_failing_call_reaches_its_handler():
    reported = []

    def damaged(view):
        raise CorruptImageError("damaged cluster")

    plan = ReadPlan.for_length(512)
    plan.call(damaged, 0, 512, failed=reported.append)
    with pytest.raises(CorruptImageError):
        plan.run_here()
    assert len(reported) == 1
    assert str(reported[0]) == "damaged cluster"


def test_runner_completes_uncached_large_plan(tmp_path):
    path = tmp_path / "large.bin"
    data = os.urandom(1024 * 1024)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        plan = ReadPlan.for_length(len(data))
        plan.host_read(fd, 0, 0, len(data))

        async def main():
            await PlanRunner(ReadGate()).run(plan)

        trio.run(main)
    finally:
        os.close(fd)
    assert plan.result == data


def test_change_waits_for_running_read():
    events = []

    async def main():
        gate = ReadGate()
        release = trio.Event()

        async def read():
            with gate.running():
                events.append("read started")
                await release.wait()
                events.append("read done")

        async def change():
            await gate.exclusive()
            events.append("change")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(change)
            await trio.testing.wait_all_tasks_blocked()
            assert gate.changes_waiting == 1
            release.set()

    trio.run(main)
    assert events == ["read started", "read done", "change"]


def test_new_read_waits_for_waiting_change():
    events = []

    async def main():
        gate = ReadGate()
        release = trio.Event()

        async def first_read():
            with gate.running():
                await release.wait()
                events.append("first read done")

        async def change():
            await gate.exclusive()
            events.append("change")

        async def second_read():
            if gate.changes_waiting:
                await gate.wait_for_changes()
            events.append("second read")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_read)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(change)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second_read)
            await trio.testing.wait_all_tasks_blocked()
            assert events == []
            release.set()

    trio.run(main)
    assert events == ["first read done", "change", "second read"]


def test_change_without_reads_does_not_wait():
    async def main():
        gate = ReadGate()
        with trio.move_on_after(0) as scope:
            await gate.exclusive()
        assert not scope.cancelled_caught

    trio.run(main)
