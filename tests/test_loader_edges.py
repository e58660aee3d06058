"""The loader's promises at their edges: the rotation bound, the statistics of waits,
and each limit of the waits served in the waiting task, tried on both sides.

These are the `loader` mutation target's first tests (mutation/run.py, docs/TESTING.md):
small and fast, each one written against a mutant that the rest of the suite let live.
Time: trio's ``autojump_clock`` over the ``sync`` backend (or wrappers of it), where no
read happens in a real thread; where real time is read (the blocked-time statistics)
only its direction is asserted, never a bound.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import threading
import time

import pytest
import trio
import trio.testing

import aio
import aio.testing
from loader import Layout, Loader, LoaderConfig, LoadError, MemoryFile
from loader._loader import _INLINE_HASH, _Chunks
from loader.checkpoint import DEFAULT_CHUNK_SIZE, create_checkpoint, open_checkpoint
from protocol import codes

PAGE = 4096
KiB = 1 << 10
MiB = 1 << 20
CHUNK = DEFAULT_CHUNK_SIZE


@pytest.fixture
def opened():
    """Closes what a test opened, even when it fails: fds, memory files."""
    fds: list[int] = []
    mems: list[MemoryFile] = []
    yield fds, mems
    for mem in mems:
        mem.close()
    for fd in fds:
        os.close(fd)


def _raw(tmp_path, opened, size: int = 4 * MiB) -> tuple[Layout, int, bytes]:
    """A pages file of ``size`` random bytes at memory 0 (one range)."""
    data = random.Random(size).randbytes(size)
    path = tmp_path / "pages"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    opened[0].append(fd)
    return Layout(size, PAGE, [(0, size, 0)]), fd, data


def _loader(opened, layout: Layout, fd: int, queue: aio.Queue, checkpoint=None, **config) -> tuple[Loader, MemoryFile]:
    mem = MemoryFile(layout.memory_size)
    opened[1].append(mem)
    cfg = LoaderConfig(**{"queue_depth": queue.capacity, "background_reads": 4, "sweep_read_size": 256 * KiB,
                          "busy_background_reads": 2, **config})
    extra = {} if checkpoint is None else {"chunk_size": checkpoint.chunk_size, "checksums": checkpoint.checksums}
    return Loader(layout, fd, mem, queue, cfg, **extra), mem


def _checkpoint(tmp_path, opened, size: int = MiB):
    """A verified pages checkpoint of ``size`` random bytes (16 KiB chunks), its pages
    file open; returns (checkpoint, fd, the image's bytes)."""
    raw = tmp_path / "raw.img"
    data = random.Random(size + 1).randbytes(size)
    raw.write_bytes(data)
    out = str(tmp_path / "ckpt")
    create_checkpoint(str(raw), out)
    ck = open_checkpoint(out)
    assert ck.chunk_size == CHUNK
    fd = ck.open_pages()
    opened[0].append(fd)
    return ck, fd, data


class Cached(aio.testing.HangingQueue):
    """The sync backend, with reads at once (:meth:`aio.Queue.read_now`) where ``cached``
    says the file offset is in the page cache (a plain ``pread`` here), and requests that
    ``hang`` picks never completing (until :meth:`release`)."""

    def __init__(self, capacity: int, cached=lambda offset: True, hang=lambda request: False) -> None:
        super().__init__(aio.open_queue("sync", capacity), hang)
        self.cached = cached
        self.read_now_calls = 0

    def read_now(self, fd: int, buffer: memoryview, offset: int) -> int:
        self.read_now_calls += 1
        return os.preadv(fd, [buffer], offset) if self.cached(offset) else -1

    async def _aclose(self) -> None:
        self.release()  # (the hung requests fail: their buffers are never written)
        await super()._aclose()


class NoThen(aio.testing.DelayedQueue):
    """The sync backend without the requests' ``then``: a backend that never hashes, so
    chunks are hashed on landing or by the loader's hash thread."""

    def __init__(self, capacity: int) -> None:
        super().__init__(aio.open_queue("sync", capacity), 0)

    def _add(self, request: aio.Request) -> None:
        super()._add(dataclasses.replace(request, then=None))


async def _rounds(n: int = 20) -> None:
    """Let the loader's task run a few scheduling rounds (no clock time needed)."""
    for _ in range(n):
        await trio.lowlevel.checkpoint()


# -- the rotation bound ----------------------------------------------------------------
@pytest.mark.parametrize("waiter_reads", [1, 2])
async def test_a_waiter_has_at_most_waiter_reads_reads_in_flight(tmp_path, opened, waiter_reads):
    """A waiter with ``waiter_reads`` reads in flight gets no other turn (the rule of
    ``_wants_turn``), however much it still needs and however much room the queue has."""
    layout, fd, _ = _raw(tmp_path, opened)
    queue = Cached(32, cached=lambda offset: False, hang=lambda request: True)
    loader, _ = _loader(opened, layout, fd, queue, sweep=False, waiter_reads=waiter_reads, read_size=64 * KiB,
                        read_timeout=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        a = loader.submit_wait(0, MiB, lambda h: None)
        b = loader.submit_wait(2 * MiB, MiB, lambda h: None)
        assert a is not None and b is not None
        await _rounds()
        assert queue.hung == 2 * waiter_reads
        assert (a.inflight, b.inflight) == (waiter_reads, waiter_reads)
        assert loader.statistics().reads_in_flight == 2 * waiter_reads
        loader.shutdown()
        queue.release()
    await loader.aclose()
    assert a.error is not None and a.error.code == codes.SHUTTING_DOWN


# -- the statistics of waits -----------------------------------------------------------
async def test_each_kind_of_wait_is_counted_once(tmp_path, opened, autojump_clock):
    """waits_total / immediate / served / failed / cancelled and bytes_waited, exactly,
    after one wait of each kind: loaded already, served, failed (a read error: in the
    loader's task, then at once for the failed memory), cancelled, refused at shutdown."""
    layout, fd, data = _raw(tmp_path, opened)
    bad = 3 * MiB
    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16), aio.testing.fail_offsets(bad, bad + PAGE))
    loader, mem = _loader(opened, layout, fd, queue, sweep=False, read_now_bytes=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await loader.wait_loaded(PAGE, 2 * PAGE)  # served: 2 pages blocked on
        assert mem.view[PAGE : 3 * PAGE] == data[PAGE : 3 * PAGE]
        await loader.wait_loaded(PAGE + 100, 10)  # loaded already: immediate
        with pytest.raises(LoadError) as first:
            await loader.wait_loaded(bad, PAGE)  # failed in the loader's task
        with pytest.raises(LoadError) as again:
            loader.submit_wait(bad, PAGE, lambda h: None)  # failed memory: at once
        assert first.value.code == again.value.code == codes.IO_ERROR
        assert first.value.errno == errno.EIO
        s = loader.statistics()
        assert (s.waits_total, s.waits_immediate, s.waits_served, s.waits_failed, s.waits_cancelled) == (4, 1, 1, 2, 0)
        assert s.bytes_waited == 3 * PAGE  # the served wait's 2 pages, the failed one's page
        handle = loader.submit_wait(2 * MiB, PAGE, lambda h: None)
        assert handle is not None
        loader.cancel(handle)
        loader.cancel(handle)  # twice: counted once
        loader.shutdown()
        with pytest.raises(LoadError) as closing:
            loader.submit_wait(MiB, PAGE, lambda h: None)
        assert closing.value.code == codes.SHUTTING_DOWN
    s = loader.statistics()
    assert (s.waits_total, s.waits_immediate, s.waits_served, s.waits_failed, s.waits_cancelled) == (6, 1, 1, 3, 1)
    assert s.waiters_blocked == 0
    await loader.aclose()


async def test_blocked_time_runs_only_while_a_wait_is_blocked(tmp_path, opened):
    """blocked_time_s grows while some wait is blocked and stands still once none is;
    it never exceeds the time the test took.  (Real time: only its direction is asserted.)"""
    layout, fd, _ = _raw(tmp_path, opened)
    queue = Cached(16, cached=lambda offset: False, hang=aio.testing.hang_offsets(0, MiB))
    loader, _ = _loader(opened, layout, fd, queue, sweep=False, read_timeout=None)
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        assert loader.statistics().blocked_time_s == 0
        a = loader.submit_wait(0, PAGE, lambda h: None)
        b = loader.submit_wait(PAGE, PAGE, lambda h: None)
        assert a is not None and b is not None
        await _rounds()
        first = loader.statistics().blocked_time_s
        time.sleep(0.002)
        second = loader.statistics().blocked_time_s
        assert 0 < first < second  # two waits blocked at once: one clock, not two
        loader.cancel(a)  # one still blocked: the clock runs on
        time.sleep(0.002)
        third = loader.statistics().blocked_time_s
        assert third > second
        await loader.wait_loaded(2 * MiB, PAGE)  # served while b is blocked
        loader.cancel(b)  # none blocked: the clock stops
        stopped = loader.statistics().blocked_time_s
        time.sleep(0.002)
        assert loader.statistics().blocked_time_s == stopped > third
        assert stopped <= time.perf_counter() - started
        nursery.cancel_scope.cancel()
    queue.release()
    await loader.aclose()


# -- a wait read at once, at the limit -------------------------------------------------
async def test_a_wait_of_exactly_read_now_bytes_is_read_at_once_one_byte_more_is_not(tmp_path, opened):
    layout, fd, data = _raw(tmp_path, opened)
    queue = Cached(16)
    loader, mem = _loader(opened, layout, fd, queue, sweep=False, read_now_bytes=64 * KiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        assert loader.submit_wait(MiB, 64 * KiB, lambda h: None) is None  # read in this task
        assert mem.view[MiB : MiB + 64 * KiB] == data[MiB : MiB + 64 * KiB]
        s = loader.statistics()
        assert (s.waits_served, s.bytes_waited, s.reads_total, s.loaded_bytes) == (1, 64 * KiB, 1, 64 * KiB)
        handle = loader.submit_wait(2 * MiB, 64 * KiB + 1, lambda h: None)
        assert handle is not None and handle.remaining == 64 * KiB + PAGE  # to the loader's task
        with trio.fail_after(60):
            await loader.wait_loaded(2 * MiB, 64 * KiB + 1)
        assert handle.finished and handle.error is None
        nursery.cancel_scope.cancel()
    await loader.aclose()


# -- a verified wait served in the waiting task (_verify_now) ----------------------------
@pytest.mark.parametrize("chunks", [4, 5])
async def test_a_verified_wait_of_read_now_bytes_of_chunks_is_served_at_once_one_chunk_more_is_not(
        tmp_path, opened, chunks):
    """read_now_bytes (64 KiB) of chunks, four: read and hashed in the waiting task;
    five: left to the loader's task."""
    ck, fd, data = _checkpoint(tmp_path, opened)
    queue = Cached(16)
    loader, mem = _loader(opened, ck.layout, fd, queue, ck, sweep=False, read_now_bytes=64 * KiB)
    lo = 8 * CHUNK + PAGE  # the wait's bytes start inside its first chunk and end inside its last
    length = chunks * CHUNK - 2 * PAGE
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        handle = loader.submit_wait(lo, length, lambda h: None)
        s = loader.statistics()
        if chunks == 4:
            assert handle is None
            assert (s.chunks_verified, s.loaded_bytes, s.waits_served, s.bytes_waited) == (4, 4 * CHUNK, 1, length)
        else:
            assert handle is not None and s.chunks_verified == 0 and s.loaded_bytes == 0
            assert queue.read_now_calls == 0
            with trio.fail_after(60):
                await loader.wait_loaded(lo, length)
            assert loader.statistics().chunks_verified == chunks
        assert mem.view[8 * CHUNK : (8 + chunks) * CHUNK] == data[8 * CHUNK : (8 + chunks) * CHUNK]
        nursery.cancel_scope.cancel()
    await loader.aclose()


@pytest.mark.parametrize("second", ["in flight", "not cached"])
async def test_a_verified_wait_half_served_at_once_needs_exactly_its_other_half(tmp_path, opened, second):
    """Of a wait over two chunks, the first is read and hashed in the waiting task; the
    second is in flight for another wait (and nothing else is unstarted), or not in the
    page cache: the wait blocks for exactly the second chunk's bytes."""
    size = 2 * CHUNK
    ck, fd, data = _checkpoint(tmp_path, opened, size=size)
    if second == "in flight":
        queue = Cached(16, hang=aio.testing.hang_offsets(CHUNK, size))
    else:
        queue = Cached(16, cached=lambda offset: offset < CHUNK)
    loader, mem = _loader(opened, ck.layout, fd, queue, ck, sweep=False, read_timeout=None)
    answered: list[object] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        if second == "in flight":
            queue.cached = lambda offset: False
            other = loader.submit_wait(CHUNK, PAGE, answered.append)  # takes the second chunk
            assert other is not None
            await _rounds()
            assert queue.hung == 1 and loader.unloaded.total == CHUNK  # the first chunk unstarted, the second in flight
            queue.cached = lambda offset: offset < CHUNK
            before = loader.statistics().bytes_waited
        else:
            before = 0
        handle = loader.submit_wait(0, size, answered.append)
        assert handle is not None and handle.remaining == CHUNK
        s = loader.statistics()
        assert s.chunks_verified == 1 and s.loaded_bytes == CHUNK and s.bytes_waited - before == CHUNK
        assert mem.view[:CHUNK] == data[:CHUNK]
        if second == "in flight":
            queue.release()  # the hung read fails; its halves are read again, and land
        with trio.fail_after(60):
            await loader.wait_loaded(0, size)
        assert handle.finished and handle.error is None and mem.view[:size] == data
        assert answered[-1] is handle and loader.statistics().chunks_verified == 2
        nursery.cancel_scope.cancel()
    await loader.aclose()


# -- chunks hashed in the loader's task when a waiter needs them ------------------------
async def test_a_waiters_landed_chunks_up_to_inline_hash_bytes_are_hashed_in_the_loaders_task(
        tmp_path, opened, autojump_clock, monkeypatch):
    """One read of exactly ``_INLINE_HASH`` bytes of chunks a waiter needs is hashed as
    it lands, in the loader's task: the wait is answered while the hash thread is held."""
    gate = threading.Event()
    check = _Chunks.check

    def held_in_the_hash_thread(self, destination, runs, *polite):
        if threading.current_thread().name == "pageload-hash":
            gate.wait(60)
        return check(self, destination, runs, *polite)

    monkeypatch.setattr(_Chunks, "check", held_in_the_hash_thread)
    ck, fd, data = _checkpoint(tmp_path, opened)
    loader, mem = _loader(opened, ck.layout, fd, NoThen(16), ck, sweep=False, read_size=_INLINE_HASH)
    lo = 16 * CHUNK
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        try:
            with trio.fail_after(60):  # (the mock clock: fires at once if the wait is left to the held thread)
                await loader.wait_loaded(lo, _INLINE_HASH)
        finally:
            gate.set()  # (before the loader stops: it joins the hash thread)
        s = loader.statistics()
        assert s.chunks_verified == _INLINE_HASH // CHUNK and s.reads_total == 1
        assert mem.view[lo : lo + _INLINE_HASH] == data[lo : lo + _INLINE_HASH]
        nursery.cancel_scope.cancel()
    await loader.aclose()
