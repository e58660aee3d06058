"""What the threads backend does beyond the conformance suite."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time

import pytest

import aio
from aio._threads import ThreadQueue


async def test_small_urgent_read_is_done_in_place_when_cached(tmp_path):
    path = tmp_path / "data"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    os.pread(fd, len(data), 0)  # in the page cache now
    m = mmap.mmap(-1, 1 << 20)
    view = memoryview(m)
    queue = ThreadQueue(capacity=8, threads=2, inline_urgent=64 << 10)
    try:
        queue.add(aio.Request.read(1, fd, 8192, view[8192 : 8192 + 4096], urgent=True))
        assert queue.inline_reads == 1  # already done, before any wait
        queue.add(aio.Request.read(2, fd, 0, view[0 : 256 << 10], urgent=True))  # too big: a worker
        queue.add(aio.Request.read(3, fd, 4096, view[4096:8192]))  # not urgent: a worker
        done = {c.id: c.result for c in await queue.wait(3)}
        assert done == {1: 4096, 2: 256 << 10, 3: 4096}
        assert queue.inline_reads == 1
        assert view[: 256 << 10] == data[: 256 << 10]
    finally:
        await queue.aclose()
        view.release()
        m.close()
        os.close(fd)


async def test_inline_read_that_fails_goes_to_a_worker_and_reports_errno(tmp_path):
    queue = ThreadQueue(capacity=4, threads=1)
    buf = memoryview(bytearray(4096))
    queue.add(aio.Request.read(7, 987654, 0, buf, urgent=True))  # bad fd: not done in place
    assert queue.inline_reads == 0
    [completion] = await queue.wait(1)
    assert completion.id == 7 and completion.result == -errno.EBADF  # from the worker
    await queue.aclose()


async def test_read_now_reads_cached_data_without_a_request(tmp_path):
    path = tmp_path / "data"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    os.pread(fd, len(data), 0)  # in the page cache now
    m = mmap.mmap(-1, 1 << 20)
    view = memoryview(m)
    queue = ThreadQueue(capacity=8, threads=1, inline_urgent=64 << 10)
    try:
        assert queue.read_now(fd, view[4096:12288], 4096) == 8192
        assert view[4096:12288] == data[4096:12288]
        assert queue.outstanding == 0 and queue.inline_reads == 1  # no request, no completion
        assert queue.read_now(fd, view[0 : 128 << 10], 0) == -1  # above inline_urgent: not offered
        assert queue.read_now(987654, view[0:4096], 0) == -1  # a failure is left to a request
        assert aio.open_queue("sync", 4).read_now(fd, view[0:4096], 0) == -1  # the default: not offered
    finally:
        await queue.aclose()
        view.release()
        m.close()
        os.close(fd)


async def test_background_yields_renices_the_pool_and_leaves_the_urgent_lane_alone():
    base = os.getpriority(os.PRIO_PROCESS, 0)
    queue = ThreadQueue(capacity=4, threads=2, worker_nice=10, urgent_threads=1)
    try:
        pool = [t.native_id for t in queue._workers if not t.name.startswith("pageload-aio-urgent")]
        urgent = [t.native_id for t in queue._workers if t.name.startswith("pageload-aio-urgent")]
        deadline = time.monotonic() + 30
        while len(queue._pool_tids) < 2 and time.monotonic() < deadline:  # the workers start
            time.sleep(0.01)

        def nices(tids):
            return [os.getpriority(os.PRIO_PROCESS, tid) for tid in tids]

        assert nices(pool) == [10, 10] and nices(urgent) == [base]  # yielding from the start
        queue.background_yields(False)
        back = nices(pool)
        if os.geteuid() != 0 and back != [base, base]:
            pytest.skip("lowering a nice value needs CAP_SYS_NICE or RLIMIT_NICE, which this user lacks")
        assert back == [base, base]
        queue.background_yields(True)
        assert nices(pool) == [10, 10] and nices(urgent) == [base]
    finally:
        await queue.aclose()


class _Held(ThreadQueue):
    """A queue whose workers record each request they start (``started``) and hold it
    until ``release`` is set: which requests run at once."""

    def __init__(self, *args, **kwargs):
        self.started: list[int] = []
        self.release = threading.Event()
        super().__init__(*args, **kwargs)

    def _run(self, request, pipe=None):
        with self._lock:
            self.started.append(request.id)
        self.release.wait(30)
        return 0

    def wait_for(self, count: int) -> int:
        deadline = time.monotonic() + 30
        while len(self.started) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self.started)


async def test_while_yielding_at_most_yield_threads_workers_run_background_reads():

    queue = _Held(capacity=8, threads=3, worker_nice=0, urgent_threads=0, yield_threads=1)
    started, release, wait_for = queue.started, queue.release, queue.wait_for
    buf = memoryview(bytearray(4096))
    try:
        for i in range(3):  # yielding from the start: one worker takes them, one at a time
            queue.add(aio.Request.read(i, 0, 0, buf))
        assert wait_for(1) == 1
        time.sleep(0.2)  # two idle workers had the time to take one, were they allowed to
        assert started == [0]
        queue.add(aio.Request.read(9, 0, 0, buf, urgent=True))  # urgent: not held back
        assert wait_for(2) == 2 and started[1] == 9
        queue.background_yields(False)  # the held-back reads start on the free worker
        assert wait_for(3) == 3 and started[2] == 1
        release.set()
        done = {c.id for c in await queue.wait(4)}
        while len(done) < 4:
            done |= {c.id for c in await queue.wait(1)}
        assert done == {0, 1, 2, 9}
    finally:
        release.set()
        await queue.aclose()


async def test_at_most_gather_threads_workers_run_background_gathers():
    """A gather read range by range (one small pread a range, the GIL given up and
    taken back for each) runs on one worker at a time where rings cannot be used: on a
    1M-range raw image four at once filled 18 % slower.  Other background reads, and
    urgent gathers, are not held back."""
    queue = _Held(capacity=8, threads=3, worker_nice=0, urgent_threads=0, gather_threads=1)
    started, release, wait_for = queue.started, queue.release, queue.wait_for
    queue.background_yields(False)  # no client faulting: every worker may run background reads
    bufs = [memoryview(bytearray(4096)) for _ in range(2)]
    try:
        queue.add(aio.Request.gather_read(0, 0, bufs, [0, 8192]))
        queue.add(aio.Request.gather_read(1, 0, bufs, [0, 8192]))
        assert wait_for(1) == 1
        time.sleep(0.2)  # two idle workers had the time to take the second, were they allowed to
        assert started == [0]
        queue.add(aio.Request.gather_read(9, 0, bufs, [0, 8192], urgent=True))  # urgent: not held back
        assert wait_for(2) == 2 and started[1] == 9
        release.set()
        done: set[int] = set()
        while len(done) < 3:
            done |= {c.id for c in await queue.wait(1)}
        assert done == {0, 1, 9} and started[2] == 1
    finally:
        release.set()
        await queue.aclose()


async def test_gather_threads_default_one_a_cpu_with_rings_else_one(monkeypatch):
    """Gathers through a ring (aio._batch) take the GIL once a batch, so as many run at
    once as there are CPUs; read range by range, one at a time."""
    from aio import _batch
    from aio._threads import DEFAULT_GATHER_THREADS, default_gather_threads

    monkeypatch.setattr(_batch, "_reason", [None])
    assert default_gather_threads() == aio.usable_cpus()
    queue = ThreadQueue(capacity=4, threads=2)
    try:
        assert queue.gather_threads == aio.usable_cpus()
    finally:
        await queue.aclose()
    monkeypatch.setattr(_batch, "_reason", ["io_uring is disabled on this host"])
    assert default_gather_threads() == DEFAULT_GATHER_THREADS == 1
    queue = ThreadQueue(capacity=4, threads=2)
    try:
        assert queue.gather_threads == 1
    finally:
        await queue.aclose()


async def test_a_background_read_behind_no_gather_runs_beside_one():
    queue = _Held(capacity=8, threads=2, worker_nice=0, urgent_threads=0)
    started, release = queue.started, queue.release
    queue.background_yields(False)
    bufs = [memoryview(bytearray(4096)) for _ in range(2)]
    try:
        queue.add(aio.Request.gather_read(0, 0, bufs, [0, 8192]))
        queue.add(aio.Request.read(1, 0, 0, bufs[0]))
        deadline = time.monotonic() + 30
        while len(started) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(started) == [0, 1]
        release.set()
        done: set[int] = set()
        while len(done) < 2:
            done |= {c.id for c in await queue.wait(1)}
    finally:
        release.set()
        await queue.aclose()


def test_yield_threads_must_be_positive():
    with pytest.raises(ValueError):
        ThreadQueue(capacity=4, threads=2, yield_threads=0)
    with pytest.raises(ValueError):
        ThreadQueue(capacity=4, threads=2, gather_threads=0)
