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
from array import array

import pytest
import trio
import trio.testing

import aio
import aio.testing
from loader import Layout, Loader, LoaderConfig, LoadError, MemoryFile, OrderHooks
from loader.checkpoint import DEFAULT_CHUNK_SIZE, create_checkpoint, open_checkpoint
from loader.core import _reads
from loader.core._chunks import _Chunks
from loader.core._sweep import SequentialOrder
from loader.core._verify import _INLINE_HASH
from loader.source import FileSource
from protocol import codes

PAGE = 4096
KiB = 1 << 10
MiB = 1 << 20
CHUNK = DEFAULT_CHUNK_SIZE




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
    return Loader(FileSource(layout, fd, **extra), mem, queue, cfg), mem


def _checkpoint(tmp_path, opened, size: int = MiB, flip: int | None = None, sparse: bool = False):
    """A verified pages checkpoint of ``size`` random bytes (16 KiB chunks), its pages
    file open; with ``flip``, one byte of that chunk flipped in the pages file; with
    ``sparse``, every other page zero (so each range is one page, a chunk four ranges).
    Returns (checkpoint, fd, the image's bytes)."""
    raw = tmp_path / "raw.img"
    data = bytearray(random.Random(size + 1).randbytes(size))
    if sparse:
        for page in range(1, size // PAGE, 2):
            data[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
    raw.write_bytes(data)
    out = str(tmp_path / "ckpt")
    create_checkpoint(str(raw), out)
    if flip is not None:
        with open(os.path.join(out, "pages.img"), "r+b") as f:
            f.seek(flip * CHUNK + 99)
            byte = f.read(1)
            f.seek(flip * CHUNK + 99)
            f.write(bytes([byte[0] ^ 0x01]))
    ck = open_checkpoint(out)
    assert ck.chunk_size == CHUNK
    fd = ck.open_pages()
    opened[0].append(fd)
    return ck, fd, bytes(data)


class Cached(aio.testing.HangingQueue):
    """The sync backend, with reads at once (:meth:`aio.Queue.read_now`) where ``cached``
    says the file offset is in the page cache (a plain ``pread`` here), and requests that
    ``hang`` picks never completing (until :meth:`release`)."""

    def __init__(self, capacity: int, cached=lambda offset: True, hang=lambda request: False,
                 held: bool = False) -> None:
        super().__init__(aio.open_queue("sync", capacity), hang)
        self.cached = cached
        self.read_now_calls = 0
        self.go = trio.Event()  #: with ``held``: no completion is handed over before it is set
        if not held:
            self.go.set()

    async def _wait(self, min_completions: int) -> list[aio.Completion]:
        await self.go.wait()
        return await super()._wait(min_completions)

    def read_now(self, fd: int, buffer: memoryview, offset: int) -> int:
        self.read_now_calls += 1
        return os.preadv(fd, [buffer], offset) if self.cached(offset) else -1

    async def _aclose(self) -> None:
        self.release()  # (a test releases the hung requests before Loader.aclose waits for them)
        await super()._aclose()


class Faulty(aio.testing.FaultInjectingQueue):
    """:class:`aio.testing.FaultInjectingQueue` that reads at once where its inner queue does."""

    def read_now(self, fd: int, buffer: memoryview, offset: int) -> int:
        return self.inner.read_now(fd, buffer, offset)


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


async def test_aclose_waits_within_its_timeout_for_the_reads_in_flight(tmp_path, opened, autojump_clock):
    """Reads in flight that complete within the timeout are waited for: none is
    abandoned, and the queue is closed."""
    layout, fd, _ = _raw(tmp_path, opened)
    queue = aio.testing.DelayedQueue(aio.open_queue("sync", 16), 1.0)
    loader, _ = _loader(opened, layout, fd, queue)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await _rounds()
        assert queue.outstanding > 0
        await loader.aclose(timeout=60)
    assert loader.abandoned_reads == 0 and queue.outstanding == 0 and queue.closed


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


async def test_a_wait_withdrawn_by_another_waits_callback_is_not_answered(tmp_path, opened, autojump_clock):
    """Two waits answered by the same read: the first one's callback withdraws the
    second (as a server does for a client whose connection it just closed).  The
    second's callback never runs, and it counts as withdrawn, not served."""
    layout, fd, _ = _raw(tmp_path, opened)
    queue = aio.testing.DelayedQueue(aio.open_queue("sync", 16), 0.01)
    loader, _ = _loader(opened, layout, fd, queue, sweep=False)
    answered: list[object] = []
    second = None

    def first_answered(handle: object) -> None:
        answered.append(handle)
        assert second is not None
        loader.cancel(second)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        first = loader.submit_wait(MiB, PAGE, first_answered)
        second = loader.submit_wait(MiB, PAGE, answered.append)  # joins the first one's read
        assert first is not None and second is not None
        with trio.fail_after(60):
            await loader.wait_loaded(MiB, PAGE)
        assert answered == [first] and second.cancelled
        s = loader.statistics()
        assert (s.waits_served, s.waits_cancelled, s.waiters_blocked) == (2, 1, 0)  # (wait_loaded's own: served)
        nursery.cancel_scope.cancel()
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
        s = loader.statistics()
        took = time.perf_counter() - started
        assert stopped <= took
        # the one wait answered (the others were withdrawn): its time, within the test's
        assert 0 < s.total_wait_time_s <= took and s.latency_us["count"] == 1
        assert s.latency_us["max_us"] <= took * 1e6
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
            assert s.reads_total == 4  # (one read at once per chunk)
        else:
            assert handle is not None and s.chunks_verified == 0 and s.loaded_bytes == 0
            assert queue.read_now_calls == 0
            with trio.fail_after(60):
                await loader.wait_loaded(lo, length)
            assert loader.statistics().chunks_verified == chunks
        assert mem.view[8 * CHUNK : (8 + chunks) * CHUNK] == data[8 * CHUNK : (8 + chunks) * CHUNK]
        nursery.cancel_scope.cancel()
    await loader.aclose()


async def test_a_verified_wait_on_a_chunk_in_four_pieces_reads_them_with_one_call(tmp_path, opened):
    """A chunk whose pages lie apart in memory (every other page a hole: four ranges a
    chunk), waited on: its four pieces are read at their places with one
    ``preadv2(RWF_NOWAIT)`` (it was one a piece), hashed, and served at once."""
    ck, fd, data = _checkpoint(tmp_path, opened, sparse=True)
    os.pread(fd, MiB, 0)  # (in the page cache, as read_now needs)
    queue = aio.open_queue("threads", 16)
    loader, mem = _loader(opened, ck.layout, fd, queue, ck, sweep=False, read_now_bytes=64 * KiB)
    k = 5
    lo = k * 2 * CHUNK  # chunk k's memory: 8 pages from here, its data the even ones
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader.run)
            assert loader.submit_wait(lo + 2 * PAGE, PAGE, lambda h: None) is None
            s = loader.statistics()
            assert (s.chunks_verified, s.loaded_bytes, s.reads_total) == (1, CHUNK, 1)
            assert queue.inline_reads == 1  # type: ignore[attr-defined]
            assert mem.view[lo : lo + 2 * CHUNK] == data[lo : lo + 2 * CHUNK]
            nursery.cancel_scope.cancel()
    finally:
        await loader.aclose()
        await queue.aclose()


@pytest.mark.parametrize("other", ["second in flight", "first in flight", "second not cached", "first not cached"])
async def test_a_verified_wait_half_served_at_once_needs_exactly_its_other_half(tmp_path, opened, other):
    """Of a wait over two chunks, one is read and hashed in the waiting task; the other
    is in flight for another wait (and nothing else is unstarted), or not in the page
    cache: the wait blocks for exactly the other chunk's bytes."""
    size = 2 * CHUNK
    ck, fd, data = _checkpoint(tmp_path, opened, size=size)
    busy = 0 if other.startswith("first") else 1  # the chunk not served at once
    lo, hi = busy * CHUNK, (busy + 1) * CHUNK
    if other == "first not cached":  # the cache is cold: nothing is read in the waiting task
        queue = Cached(16, cached=lambda offset: not lo <= offset < hi)
        loader, _ = _loader(opened, ck.layout, fd, queue, ck, sweep=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader.run)
            handle = loader.submit_wait(0, size, lambda h: None)
            assert handle is not None and handle.remaining == size
            assert loader.statistics().chunks_verified == 0
            with trio.fail_after(60):
                await loader.wait_loaded(0, size)
            nursery.cancel_scope.cancel()
        await loader.aclose()
        return
    if other == "second not cached":
        queue = Cached(16, cached=lambda offset: not lo <= offset < hi)
    else:
        queue = Cached(16, hang=aio.testing.hang_offsets(lo, hi))
    loader, mem = _loader(opened, ck.layout, fd, queue, ck, sweep=False, read_timeout=None)
    answered: list[object] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        before = 0
        if other != "second not cached":
            queue.cached = lambda offset: False
            assert loader.submit_wait(lo, PAGE, answered.append) is not None  # takes that chunk
            await _rounds()
            assert queue.hung == 1 and loader.unloaded.total == CHUNK  # the other chunk unstarted
            queue.cached = lambda offset: not lo <= offset < hi
            before = loader.statistics().bytes_waited
        handle = loader.submit_wait(0, size, answered.append)
        assert handle is not None and handle.remaining == CHUNK
        s = loader.statistics()
        assert (s.chunks_verified, s.loaded_bytes, s.reads_total - (other != "second not cached")) == (1, CHUNK, 1)
        assert s.bytes_waited - before == CHUNK
        served = 1 - busy
        assert mem.view[served * CHUNK : (served + 1) * CHUNK] == data[served * CHUNK : (served + 1) * CHUNK]
        queue.release()  # a hung read fails; its halves are read again, and land
        with trio.fail_after(60):
            await loader.wait_loaded(0, size)
        assert handle.finished and handle.error is None and mem.view[:size] == data
        assert answered[-1] is handle and loader.statistics().chunks_verified == 2
        nursery.cancel_scope.cancel()
    await loader.aclose()


async def test_a_wait_reaching_into_a_chunk_that_partly_failed_is_not_served_at_once(tmp_path, opened):
    """Chunk 1's last page fails (its read, narrowed down, fails there for good) while
    its first half hangs in flight.  A wait over chunk 0 (cached) and chunk 1's first
    page: chunk 0 is served in the waiting task, but the wait blocks on chunk 1, which
    can never be verified: it fails once chunk 1's bytes are in."""
    size = 2 * CHUNK
    ck, fd, data = _checkpoint(tmp_path, opened, size=size)
    held = Cached(16, cached=lambda offset: False,
                  hang=lambda request: request.offset == CHUNK and request.length == CHUNK // 2)
    queue = Faulty(held, aio.testing.fail_offsets(size - PAGE, size))
    loader, mem = _loader(opened, ck.layout, fd, queue, ck, sweep=False, read_timeout=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60), pytest.raises(LoadError) as first:
            await loader.wait_loaded(size - PAGE, PAGE)
        assert first.value.errno == errno.EIO and held.hung == 1  # chunk 1: last page failed, first half hung
        held.cached = lambda offset: offset < CHUNK
        handle = loader.submit_wait(0, CHUNK + PAGE, lambda h: None)
        assert handle is not None and handle.remaining == PAGE
        s = loader.statistics()
        assert (s.chunks_verified, s.loaded_bytes) == (1, CHUNK) and mem.view[:CHUNK] == data[:CHUNK]
        held.release()  # the hung half fails, is narrowed down, and its pages land
        with trio.fail_after(60):
            while not handle.finished:
                await trio.sleep(0.001)
        assert handle.error is not None and handle.error.code == codes.IO_ERROR
        assert "cannot be verified" in handle.error.message
        nursery.cancel_scope.cancel()
    await loader.aclose()


async def test_a_wait_starting_in_a_chunk_that_partly_failed_reads_nothing_in_its_task(tmp_path, opened):
    """Chunk 1's first page fails for good while its second half hangs in flight.  A wait
    over that second half and chunk 2 (cached) is bound to fail: nothing more is read for
    it in the waiting task (chunk 2 is left to the loader), and it fails once chunk 1's
    bytes are in."""
    size = 3 * CHUNK
    ck, fd, _ = _checkpoint(tmp_path, opened, size=size)
    half = CHUNK // 2
    held = Cached(16, cached=lambda offset: False,
                  hang=lambda request: request.offset == CHUNK + half and request.length == half)
    queue = Faulty(held, aio.testing.fail_offsets(CHUNK, CHUNK + PAGE))
    loader, _ = _loader(opened, ck.layout, fd, queue, ck, sweep=False, read_timeout=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60), pytest.raises(LoadError):
            await loader.wait_loaded(CHUNK, PAGE)
        assert held.hung == 1
        held.cached = lambda offset: offset >= 2 * CHUNK
        calls = held.read_now_calls
        handle = loader.submit_wait(CHUNK + half, half + CHUNK, lambda h: None)
        assert handle is not None and handle.remaining == half + CHUNK
        assert loader.statistics().chunks_verified == 0 and held.read_now_calls == calls
        held.release()
        with trio.fail_after(60):
            while not handle.finished:
                await trio.sleep(0.001)
        assert handle.error is not None and handle.error.code == codes.IO_ERROR
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


async def test_a_chunk_over_several_ranges_partly_cached_is_left_whole_to_the_loader(tmp_path, opened, autojump_clock):
    """A chunk of four one-page ranges whose first page is cached and the others are not:
    the waiting task reads no part of it for good (what it read is read again), and the
    loader's task serves the wait with the image's bytes."""
    ck, fd, data = _checkpoint(tmp_path, opened, sparse=True)
    k = 6
    assert ck.layout.file_offset(2 * 4 * k * PAGE) == k * CHUNK  # chunk k: memory pages 8k, 8k+2, 8k+4, 8k+6
    queue = Cached(16, cached=lambda offset: offset < k * CHUNK + PAGE)
    loader, mem = _loader(opened, ck.layout, fd, queue, ck, sweep=False)
    lo, hi = 8 * k * PAGE, 8 * (k + 1) * PAGE
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        handle = loader.submit_wait(lo, hi - lo, lambda h: None)
        assert handle is not None and handle.remaining == CHUNK
        assert loader.statistics().loaded_bytes == 0 and loader.unloaded.overlap_bytes(lo, hi) == CHUNK
        with trio.fail_after(60):
            await loader.wait_loaded(lo, hi - lo)
        assert handle.finished and handle.error is None
        assert mem.view[lo:hi] == data[lo:hi]
        assert loader.statistics().chunks_verified == 1
        nursery.cancel_scope.cancel()
    await loader.aclose()


@pytest.mark.parametrize("sparse", [False, True])
async def test_a_corrupt_chunk_names_its_memory_in_the_waiters_error(tmp_path, opened, autojump_clock, sparse):
    """Hashed on landing in the loader's task: the error says where, exactly: from its
    chunk's first byte to its last (one range; or four one-page ranges over 28 KiB)."""
    bad = 5
    ck, fd, _ = _checkpoint(tmp_path, opened, flip=bad, sparse=sparse)
    loader, _ = _loader(opened, ck.layout, fd, NoThen(16), ck, sweep=False)
    lo, length = (8 * bad * PAGE, 7 * PAGE) if sparse else (bad * CHUNK, CHUNK)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60), pytest.raises(LoadError) as info:
            await loader.wait_loaded(lo, PAGE)
        assert info.value.code == codes.CORRUPT
        assert info.value.message == (f"memory {lo:#x}+{length:#x}: chunk {bad} of the pages file "
                                      "does not match its checksum")
        nursery.cancel_scope.cancel()
    await loader.aclose()


async def test_a_corrupt_chunk_read_at_once_fails_the_wait_and_counts_it(tmp_path, opened):
    bad = 5
    ck, fd, _ = _checkpoint(tmp_path, opened, flip=bad)
    loader, _ = _loader(opened, ck.layout, fd, Cached(16), ck, sweep=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with pytest.raises(LoadError) as info:
            loader.submit_wait(bad * CHUNK + PAGE, PAGE, lambda h: None)  # read and hashed in this task
        assert info.value.code == codes.CORRUPT
        s = loader.statistics()
        assert (s.waits_total, s.waits_failed, s.waits_served, s.corrupt_chunks, s.chunks_verified) == (1, 1, 0, 1, 0)
        nursery.cancel_scope.cancel()
    await loader.aclose()


async def test_a_read_error_is_reported_with_its_own_errno(tmp_path, opened, autojump_clock):
    layout, fd, _ = _raw(tmp_path, opened)
    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16),
                                            aio.testing.fail_offsets(MiB, MiB + PAGE, errno.EPERM))
    loader, _ = _loader(opened, layout, fd, queue, sweep=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60), pytest.raises(LoadError) as info:
            await loader.wait_loaded(MiB, PAGE)
        assert (info.value.code, info.value.errno) == (codes.IO_ERROR, errno.EPERM)
        assert loader.statistics().failed_ranges == [(MiB, PAGE, errno.EPERM)]
        nursery.cancel_scope.cancel()
    await loader.aclose()


async def test_the_queue_is_told_to_yield_as_soon_as_a_wait_blocks(tmp_path, opened, autojump_clock):
    layout, fd, _ = _raw(tmp_path, opened)
    queue = Yields(16)
    loader, _ = _loader(opened, layout, fd, queue, sweep=False, busy_linger_s=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await _rounds()
        assert queue.yields == [False]  # (as the queue starts it yields; the first round: nobody waits)
        handle = loader.submit_wait(MiB, PAGE, lambda h: None)
        assert handle is not None and queue.yields == [False, True]  # at once, before any round
        with trio.fail_after(60):
            await loader.wait_loaded(MiB, PAGE)
        await _rounds()
        assert queue.yields == [False, True, False]
        nursery.cancel_scope.cancel()
    await loader.aclose()


class Committing:
    """A destination whose loaded bytes must be committed (``needs_commit``), over a
    memory file; it counts the bytes committed."""

    needs_commit = True

    def __init__(self, mem: MemoryFile) -> None:
        self.mem = mem
        self.copy_fd = mem.copy_fd
        self.committed = 0

    def buffer(self, offset: int, length: int) -> memoryview:
        return self.mem.buffer(offset, length)

    def commit(self, offset: int, length: int) -> None:
        self.committed += length


@pytest.mark.parametrize("told", ["commit", "listener"])
async def test_every_loaded_byte_is_committed_and_told_to_the_listeners(tmp_path, opened, autojump_clock, told):
    """Also those of gathered reads (many ranges a read), which edit the sets at once."""
    layout, fd, data = _one_page_ranges(tmp_path, opened)
    mem = MemoryFile(layout.memory_size)
    opened[1].append(mem)
    dest = Committing(mem) if told == "commit" else mem
    loader = Loader(FileSource(layout, fd), dest, Cached(16), LoaderConfig(queue_depth=16, sweep_read_size=256 * KiB))
    heard: list[tuple[int, int]] = []
    if told == "listener":
        loader.add_loaded_listener(lambda lo, hi: heard.append((lo, hi)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60):
            await loader.done.wait()
    assert loader.statistics().reads_total < len(layout) // 8  # (gathered)
    if told == "commit":
        assert dest.committed == layout.data_bytes
    else:
        assert sorted(heard) == [(m, m + PAGE) for m, _, _ in layout]
    assert mem.view[: layout.memory_size : 2 * PAGE] == data[: layout.memory_size : 2 * PAGE]
    await loader.aclose()


async def test_a_read_cut_short_to_one_byte_keeps_it_and_reads_the_rest(tmp_path, opened, autojump_clock):
    layout, fd, data = _raw(tmp_path, opened)
    cut: list[int] = []

    def once_one_byte(request: aio.Request) -> int | None:
        if cut:
            return None
        cut.append(request.offset)
        return 1

    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16), once_one_byte)
    loader, mem = _loader(opened, layout, fd, queue, sweep=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60):
            await loader.wait_loaded(MiB, 2 * PAGE)
        assert cut == [MiB] and mem.view[MiB : MiB + 2 * PAGE] == data[MiB : MiB + 2 * PAGE]
        s = loader.statistics()
        assert (s.reads_retried, s.waits_served, s.waits_failed) == (1, 1, 0)
        nursery.cancel_scope.cancel()
    await loader.aclose()


async def test_a_gathered_read_landing_around_a_read_in_flight_leaves_that_one_in_flight(tmp_path, opened):
    """A raw image of one-page ranges (every other page): the sweep's gathered reads
    (many ranges each) land around a prefetch's read that hangs; that page stays in
    flight, not loaded, and everything else loads.  Of two waits that joined the reads
    in flight, the one on the hung page (the first) stays blocked, the other is answered."""
    size, hung = 2 * MiB, 40 * PAGE
    data = bytearray(random.Random(3).randbytes(size))
    path = tmp_path / "raw.img"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    opened[0].append(fd)
    starts = array("Q", range(0, size, 2 * PAGE))
    layout = Layout.from_arrays(size, PAGE, starts, array("Q", [PAGE] * len(starts)))
    assert layout.identity_mapped
    queue = Cached(16, cached=lambda offset: False, hang=lambda request: request.offset == hung, held=True)
    loader, mem = _loader(opened, layout, fd, queue, read_timeout=None)
    loader.prefetch(hung, PAGE)  # read in the first round, before the sweep's first read
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await _rounds()
        reads = loader.statistics().reads_total
        first = loader.submit_wait(hung, PAGE, lambda h: None)
        second = loader.submit_wait(hung + 2 * PAGE, PAGE, lambda h: None)
        assert first is not None and second is not None and loader.statistics().reads_total == reads  # joined
        queue.go.set()
        with trio.fail_after(60):
            while loader.statistics().loaded_bytes < layout.data_bytes - PAGE:
                await trio.sleep(0.001)
        assert queue.hung == 1
        assert second.finished and second.error is None and not first.finished
        assert loader.statistics().reads_total < len(starts) // 8  # (gathered: many ranges a read)
        assert not loader.is_loaded(hung, hung + PAGE) and loader.is_loaded(0, hung)
        assert loader.not_loaded(0, size) == [(hung, hung + PAGE)]
        for m in starts:
            if m != hung:
                assert mem.view[m : m + PAGE] == data[m : m + PAGE]
        nursery.cancel_scope.cancel()
    queue.release()
    await loader.aclose()


class Held(NoThen):
    """:class:`NoThen` whose completions are held back until ``go`` is set."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.go = trio.Event()

    async def _wait(self, min_completions: int) -> list[aio.Completion]:
        await self.go.wait()
        return await super()._wait(min_completions)


@pytest.mark.parametrize("wanted", [(5, 6), (0, 0), (15, 15)])
async def test_a_read_landing_many_chunks_hashes_at_once_only_those_a_waiter_needs(
        tmp_path, opened, autojump_clock, monkeypatch, wanted):
    """A sweep read of 16 chunks is in flight; a wait joins it for chunks 5 and 6 (or 0).
    When it lands, those are hashed in the loader's task (the wait is answered while the
    hash thread is held); the others wait for the hash thread."""
    gate = threading.Event()
    check = _Chunks.check

    def held_in_the_hash_thread(self, destination, runs, *polite):
        if threading.current_thread().name == "pageload-hash":
            gate.wait(60)
        return check(self, destination, runs, *polite)

    monkeypatch.setattr(_Chunks, "check", held_in_the_hash_thread)
    ck, fd, data = _checkpoint(tmp_path, opened)
    queue = Held(16)
    loader, mem = _loader(opened, ck.layout, fd, queue, ck, background_reads=1, busy_background_reads=1,
                          sweep_read_size=16 * CHUNK)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        try:
            await _rounds()
            assert loader.inflight.total == 16 * CHUNK and loader.statistics().reads_total == 1
            first, last = wanted
            count = last - first + 1
            handle = loader.submit_wait(first * CHUNK + PAGE, count * CHUNK - 2 * PAGE, lambda h: None)
            assert handle is not None and loader.statistics().reads_total == 1  # joined the sweep's read
            queue.go.set()
            with trio.fail_after(60):
                while not handle.finished:
                    await trio.sleep(0.001)
            assert handle.error is None
            assert mem.view[first * CHUNK : (last + 1) * CHUNK] == data[first * CHUNK : (last + 1) * CHUNK]
            s = loader.statistics()
            assert s.chunks_verified == count and s.loaded_bytes == count * CHUNK  # (the others: held)
        finally:
            gate.set()
        nursery.cancel_scope.cancel()
    await loader.aclose()


async def test_a_read_returning_nothing_before_the_end_of_the_file_is_read_again(tmp_path, opened, autojump_clock):
    layout, fd, data = _raw(tmp_path, opened)
    seen: list[int] = []

    def once_nothing(request: aio.Request) -> int | None:
        seen.append(request.offset)
        return 0 if len(seen) == 1 else None

    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16), once_nothing)
    loader, mem = _loader(opened, layout, fd, queue, sweep=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60):
            await loader.wait_loaded(MiB, PAGE)
        assert seen == [MiB, MiB] and mem.view[MiB : MiB + PAGE] == data[MiB : MiB + PAGE]
        s = loader.statistics()
        assert (s.reads_retried, s.waits_served, s.waits_failed) == (1, 1, 0)
        nursery.cancel_scope.cancel()
    await loader.aclose()


async def test_a_read_returning_nothing_again_and_again_fails_its_wait_saying_so(tmp_path, opened, autojump_clock):
    layout, fd, _ = _raw(tmp_path, opened)
    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16), lambda request: 0)
    loader, _ = _loader(opened, layout, fd, queue, sweep=False, max_retries=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60), pytest.raises(LoadError) as info:
            await loader.wait_loaded(MiB, PAGE)
        assert (info.value.code, info.value.errno) == (codes.IO_ERROR, None)
        assert info.value.message == (f"memory {MiB:#x}+{PAGE:#x} (pages file {MiB:#x}): "
                                      "the pages file returned no data here, again and again")
        assert loader.statistics().reads_retried == 2
        nursery.cancel_scope.cancel()
    await loader.aclose()


class Explaining(Committing):
    """A destination that explains some errnos itself, as a memory file on a full file
    system does (EFAULT from a read into its mapping: it is full)."""

    needs_commit = False

    def explain_error(self, err: int) -> str:
        return "the memory file is full" if err in (errno.EFAULT, errno.ENOSPC) else os.strerror(err)


@pytest.mark.parametrize("err", [errno.EFAULT, errno.ENOSPC])
async def test_a_read_error_the_destination_explains_is_reported_in_its_words(tmp_path, opened, autojump_clock, err):
    """EFAULT into the mapping of a full memory file is reported as ENOSPC; ENOSPC as
    itself; both with the destination's explanation."""
    layout, fd, _ = _raw(tmp_path, opened)
    mem = MemoryFile(layout.memory_size)
    opened[1].append(mem)
    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16), aio.testing.fail_offsets(MiB, MiB + PAGE, err))
    loader = Loader(FileSource(layout, fd), Explaining(mem), queue,
                    LoaderConfig(queue_depth=16, sweep=False, kernel_copy=False))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60), pytest.raises(LoadError) as info:
            await loader.wait_loaded(MiB, PAGE)
        assert (info.value.code, info.value.errno) == (codes.IO_ERROR, errno.ENOSPC)
        assert info.value.message.endswith("): the memory file is full")
        nursery.cancel_scope.cancel()
    await loader.aclose()


async def test_a_wait_is_answered_only_once_its_last_byte_is_in(tmp_path, opened, autojump_clock):
    """Its read comes back one byte short: the wait is answered when the rest lands."""
    layout, fd, data = _raw(tmp_path, opened)
    cut: list[int] = []

    def once_one_byte_short(request: aio.Request) -> int | None:
        if cut:
            return None
        cut.append(request.offset)
        return request.length - 1

    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16), once_one_byte_short)
    loader, mem = _loader(opened, layout, fd, queue, sweep=False)
    seen: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        handle = loader.submit_wait(MiB, PAGE, lambda h: seen.append(loader.is_loaded(MiB, MiB + PAGE)))
        assert handle is not None
        with trio.fail_after(60):
            await loader.wait_loaded(MiB, PAGE)
        assert cut == [MiB] and seen == [True] and handle.error is None
        assert mem.view[MiB : MiB + PAGE] == data[MiB : MiB + PAGE]
        nursery.cancel_scope.cancel()
    await loader.aclose()


class LastAt(aio.testing.DelayedQueue):
    """The sync backend (a background read hashes the chunks wholly inside it in its
    ``then``), completing every request in flight at each wait and handing the one at
    file offset ``last`` over after the others."""

    def __init__(self, capacity: int, last: int) -> None:
        super().__init__(aio.open_queue("sync", capacity), 0)
        self.last = last
        self.offsets: dict[int, int] = {}

    def _add(self, request: aio.Request) -> None:
        self.offsets[request.id] = request.offset
        super()._add(request)

    async def _wait(self, min_completions: int) -> list[aio.Completion]:
        done = list(await self.inner.wait(min_completions))
        while self.inner.outstanding:
            done.extend(await self.inner.wait(1))
        return sorted(done, key=lambda c: self.offsets[c.id] == self.last)


async def test_a_read_landing_last_completes_the_chunks_cut_at_both_its_ends_once(tmp_path, opened):
    """Six chunks, swept in three reads of 36 KiB at once; the middle one lands last and
    completes chunks 2 and 4 (cut by its ends), while chunk 3, wholly inside it, was
    hashed with the read (as were 0, 1 and 5 with theirs): each chunk is verified once,
    each byte loaded once.  (Real time: the hash thread hashes chunks 2 and 4.)"""
    ck, fd, data = _checkpoint(tmp_path, opened, size=6 * CHUNK)
    queue = LastAt(16, last=36 * KiB)
    loader, mem = _loader(opened, ck.layout, fd, queue, ck, sweep_read_size=36 * KiB, background_reads=3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60):
            await loader.done.wait()
    assert sorted(queue.offsets.values()) == [0, 36 * KiB, 72 * KiB]
    assert mem.view[: 6 * CHUNK] == data
    s = loader.statistics()
    assert (s.chunks_verified, s.loaded_bytes) == (6, 6 * CHUNK)
    await loader.aclose()


class HeldLastAt(LastAt):
    """:class:`LastAt` holding every completion back until ``go`` is set."""

    def __init__(self, capacity: int, last: int) -> None:
        super().__init__(capacity, last)
        self.go = trio.Event()

    async def _wait(self, min_completions: int) -> list[aio.Completion]:
        await self.go.wait()
        return await super()._wait(min_completions)


async def test_a_waiters_chunks_cut_at_both_ends_of_the_read_landing_last_are_hashed_once(tmp_path, opened):
    """A wait over chunks 0-2 reads [0, 8 KiB) (one read at a time); the sweep follows
    with [8, 40) and [40, 72) KiB.  The sweep's first read lands last: it completes
    chunks 0 and 2, which the waiter needs (hashed at once), around chunk 1 (hashed with
    the read): each chunk is verified once.  (Real time: the hash thread runs.)"""
    ck, fd, data = _checkpoint(tmp_path, opened, size=6 * CHUNK)
    queue = HeldLastAt(16, last=8 * KiB)
    loader, mem = _loader(opened, ck.layout, fd, queue, ck, read_size=8 * KiB, waiter_reads=1,
                          sweep_read_size=32 * KiB, background_reads=2, busy_background_reads=2, read_now_bytes=0)
    handle = loader.submit_wait(0, 3 * CHUNK, lambda h: None)
    assert handle is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await _rounds()
        assert sorted(queue.offsets.values()) == [0, 8 * KiB, 40 * KiB]
        queue.go.set()
        with trio.fail_after(60):
            await loader.wait_loaded(0, 3 * CHUNK)
            await loader.done.wait()
    assert handle.finished and handle.error is None and mem.view[: 6 * CHUNK] == data
    s = loader.statistics()
    assert (s.chunks_verified, s.loaded_bytes) == (6, 6 * CHUNK)
    await loader.aclose()


def _one_page_ranges(tmp_path, opened, size: int = 2 * MiB) -> tuple[Layout, int, bytes]:
    """A raw image whose data is every other page (one-page ranges, file offset = memory offset)."""
    data = random.Random(3).randbytes(size)
    path = tmp_path / "raw.img"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    opened[0].append(fd)
    starts = array("Q", range(0, size, 2 * PAGE))
    layout = Layout.from_arrays(size, PAGE, starts, array("Q", [PAGE] * len(starts)))
    assert layout.identity_mapped
    return layout, fd, data


async def test_a_gathered_read_that_times_out_fails_every_one_of_its_ranges(tmp_path, opened, autojump_clock):
    layout, fd, _ = _one_page_ranges(tmp_path, opened)
    queue = Cached(16, cached=lambda offset: False, hang=lambda request: request.offset == 0)
    loader, _ = _loader(opened, layout, fd, queue, read_timeout=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60):
            await loader.done.wait()
        nursery.cancel_scope.cancel()
    s = loader.statistics()
    assert s.reads_timed_out == 1 and s.failed_bytes > 8 * PAGE  # (one read of many ranges)
    assert s.loaded_bytes + s.failed_bytes == layout.data_bytes
    for page in (0, 2 * PAGE):
        with pytest.raises(LoadError) as info:
            loader.submit_wait(page, PAGE, lambda h: None)
        assert info.value.code == codes.TIMEOUT
    queue.release()
    await loader.aclose()


def _spans(request: aio.Request) -> tuple[tuple[int, int], ...]:
    """Where a request reads from, as ``(file offset, length)`` pairs (a gathered copy's
    and a gathered read's ranges are at the same offsets of file and memory)."""
    if request.op == aio.Op.COPY:
        return tuple(request.dest) if request.gather else ((request.offset, request.length),)
    if request.op == aio.Op.GATHER:
        return tuple((o, len(b)) for o, b in zip(request.offsets, request.buffers))
    return ((request.offset, request.length),)


def _gathered(request: aio.Request) -> bool:
    return (request.op == aio.Op.COPY and request.gather) or request.op == aio.Op.GATHER


@pytest.mark.parametrize("rest", ["lands", "fails"])
@pytest.mark.parametrize("path", ["mapping", "copy"])
async def test_a_gathered_read_cut_short_reads_the_rest_from_where_it_stopped(
        tmp_path, opened, autojump_clock, monkeypatch, rest, path):
    """The sweep's first gathered read (two one-page ranges) comes back a page and a
    half long: the rest, half a page of its second range, is read again from there,
    and every page holds the image's bytes; or the rest fails, and its error says
    where it was.  Both ways a raw image's ranges are read: into the mapping (one
    preadv-like gather, what ranges this small take) and copied in the kernel (what
    larger ones take; here forced)."""
    if path == "copy":
        monkeypatch.setattr(_reads, "_COPY_MIN_SEGMENT", 0)
    layout, fd, data = _one_page_ranges(tmp_path, opened)
    cut: list[aio.Request] = []
    at = 2 * PAGE + PAGE // 2  # where the rest starts

    def first_gathered_cut(request: aio.Request) -> int | None:
        if rest == "fails" and _spans(request) == ((at, PAGE // 2),):
            return -errno.EIO
        if cut or not _gathered(request):
            return None
        cut.append(request)
        return PAGE + PAGE // 2

    held = Cached(16, held=True)
    queue = aio.testing.FaultInjectingQueue(held, first_gathered_cut)
    loader, mem = _loader(opened, layout, fd, queue, sweep_read_size=2 * PAGE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await _rounds()
        handle = loader.submit_wait(2 * PAGE, PAGE, lambda h: None)  # joins the first read
        assert handle is not None
        held.go.set()
        with trio.fail_after(60):
            await loader.done.wait()
    assert len(cut) == 1 and _spans(cut[0]) == ((0, PAGE), (2 * PAGE, PAGE))
    assert cut[0].op == (aio.Op.COPY if path == "copy" else aio.Op.GATHER)
    s = loader.statistics()
    if rest == "fails":
        assert s.failed_ranges == [(at, PAGE // 2, errno.EIO)]
        assert handle.error is not None and handle.error.message == (
            f"memory {at:#x}+{PAGE // 2:#x} (pages file {at:#x}): reading the pages file failed")
    else:
        assert handle.finished and handle.error is None
        assert s.reads_retried == 1 and s.loaded_bytes == layout.data_bytes and s.failed_bytes == 0
        for m, _, _ in layout:
            assert mem.view[m : m + PAGE] == data[m : m + PAGE], m
    await loader.aclose()


@pytest.mark.parametrize("faulting", [False, True])
async def test_a_pages_checkpoints_small_ranges_are_copied_in_the_kernel_only_while_clients_fault(
        tmp_path, opened, autojump_clock, faulting):
    """Background reads of small ranges (one page each here) go into the mapping with one
    readv, which threads do side by side, while no client faults; while one does, they
    are copied in the kernel (``splice``), which leaves the waiters' reads the CPU: at a
    million ranges a 4 KiB wait took 410 us p50 against 310 (docs/MEASUREMENTS.md, "Verified
    waits and the fill's reads")."""
    ck, fd, data = _checkpoint(tmp_path, opened, size=MiB, sparse=True)
    issued: list[tuple[bool, aio.Request]] = []  # (after the wait, the request)
    waited = [False]

    def record(request: aio.Request) -> None:
        issued.append((waited[0], request))

    held = Cached(16, held=True, cached=lambda offset: False)
    queue = aio.testing.FaultInjectingQueue(held, record)
    loader, mem = _loader(opened, ck.layout, fd, queue, ck, sweep_read_size=64 * KiB, busy_linger_s=3600.0)
    last = ck.layout.mem_at(len(ck.layout) - 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await _rounds()
        if faulting:
            waited[0] = True
            assert loader.submit_wait(last, PAGE, lambda h: None) is not None
        held.go.set()
        with trio.fail_after(60):
            await loader.done.wait()
    assert bytes(mem.view) == data
    background = [(after, r) for after, r in issued if not r.urgent and r.length > PAGE]
    assert background, "no background read of many ranges"
    copied = [after for after, r in background if r.op == aio.Op.COPY]
    if faulting:  # every one issued after the fault is a copy
        assert copied and all(r.op == aio.Op.COPY for after, r in background if after)
    else:
        assert not copied
    await loader.aclose()


class Replaying(SequentialOrder):
    """The sequential order with a working-set replay's hooks: it wants the sweep's full
    width while clients fault, and is told of every range loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded = 0

    def wants_full_width(self) -> bool:
        return True

    def note_loaded(self, lo: int, hi: int) -> None:
        self.loaded += hi - lo

    def hooks(self) -> OrderHooks:
        return OrderHooks(note_loaded=self.note_loaded, wants_full_width=self.wants_full_width)


class Yields(Cached):
    """:class:`Cached`, recording what the loader says of background reads yielding."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, cached=lambda offset: False)
        self.yields: list[bool] = []

    def background_yields(self, yields: bool) -> None:
        self.yields.append(yields)


async def test_an_order_that_replays_is_told_of_every_byte_and_keeps_the_cpu(tmp_path, opened, autojump_clock):
    """With an order like the working-set replay: each loaded range is reported to it,
    also those of gathered reads, and a fault does not make background reads yield."""
    layout, fd, data = _one_page_ranges(tmp_path, opened, size=8 * MiB)
    queue = Yields(16)
    order = Replaying()
    mem = MemoryFile(layout.memory_size)
    opened[1].append(mem)
    cfg = LoaderConfig(queue_depth=16, sweep_read_size=64 * PAGE, background_reads=1)  # (a slow sweep)
    loader = Loader(FileSource(layout, fd), mem, queue, cfg, order)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await _rounds()
        assert True not in queue.yields[1:]
        last = layout.memory_size - 2 * PAGE
        handle = loader.submit_wait(last, PAGE, lambda h: None)
        assert handle is not None  # blocked
        with trio.fail_after(60):
            await loader.wait_loaded(last, PAGE)
            await loader.done.wait()
        nursery.cancel_scope.cancel()
    assert True not in queue.yields[1:]  # (the first: as the queue starts, until the first round)
    assert order.loaded == layout.data_bytes == loader.statistics().loaded_bytes
    assert mem.view[: 8 * MiB : 2 * PAGE] == data[: 8 * MiB : 2 * PAGE]
    await loader.aclose()


async def test_a_wait_on_the_highest_range_of_a_sweep_read_that_goes_back_in_memory_is_answered(
        tmp_path, opened, autojump_clock):
    """Three ranges laid out X, Z, Y in the pages file but X < Y < Z in memory: one
    sweep read takes them in file order, so its last range is not its highest; a wait
    that joins it on Z is answered when it lands."""
    x, y, z = 0, MiB, 2 * MiB
    part = 64 * KiB
    data = random.Random(9).randbytes(3 * part)
    path = tmp_path / "pages"
    path.write_bytes(data)  # X, Z, Y
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    opened[0].append(fd)
    layout = Layout(4 * MiB, PAGE, [(x, part, 0), (y, part, 2 * part), (z, part, part)])
    layout.validate(3 * part)
    queue = Held(16)
    loader, mem = _loader(opened, layout, fd, queue, sweep_read_size=MiB, kernel_copy=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await _rounds()
        s = loader.statistics()
        assert s.reads_total == 1 and loader.inflight.total == 3 * part  # one read: X, Z, Y
        handle = loader.submit_wait(z + PAGE, PAGE, lambda h: None)
        assert handle is not None and loader.statistics().reads_total == 1  # joined it
        queue.go.set()
        with trio.fail_after(60):
            await loader.wait_loaded(z + PAGE, PAGE)
        assert handle.finished and handle.error is None
        assert mem.view[z : z + part] == data[part : 2 * part] and mem.view[y : y + part] == data[2 * part :]
        nursery.cancel_scope.cancel()
    await loader.aclose()


# -- the configuration's refusals, each at its edge ---------------------------------------
def test_the_loader_configuration_is_refused_exactly_at_its_limits(monkeypatch):
    LoaderConfig(queue_depth=8, background_reads=7)
    with pytest.raises(ValueError, match="leave queue slots"):
        LoaderConfig(queue_depth=8, background_reads=8)
    for name in ("read_size", "sweep_read_size", "waiter_reads", "background_reads"):
        LoaderConfig(**{name: 1})
        with pytest.raises(ValueError, match="must be positive"):
            LoaderConfig(**{name: 0})
    LoaderConfig(sweep=False)
    LoaderConfig(priority=False)
    with pytest.raises(ValueError, match="nothing would ever load"):
        LoaderConfig(sweep=False, priority=False)
    LoaderConfig(read_timeout=None)
    LoaderConfig(read_timeout=0.001)
    for bad in (0, 0.0, -1.0):
        with pytest.raises(ValueError, match="read_timeout"):
            LoaderConfig(read_timeout=bad)
    # the sweep's width while clients fault: one less than the CPUs, within [1, background_reads]
    assert LoaderConfig(busy_background_reads=3).busy_background_reads == 3
    for cpus, background, busy in [(4, 8, 3), (4, 2, 2), (1, 8, 1), (None, 8, 1)]:
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        assert LoaderConfig(background_reads=background).busy_background_reads == busy, (cpus, background)


async def test_a_long_waits_queued_chunks_go_first_in_the_hash_queue(tmp_path, opened, monkeypatch):
    """A wait too long to hash in its task puts every one of its queued chunks, its last
    included, ahead of the others in the (here: held) hash thread's queue."""
    gate = threading.Event()
    check = _Chunks.check

    def held_in_the_hash_thread(self, destination, runs, *polite):
        if threading.current_thread().name == "pageload-hash":
            gate.wait(60)
        return check(self, destination, runs, *polite)

    monkeypatch.setattr(_Chunks, "check", held_in_the_hash_thread)
    ck, fd, _ = _checkpoint(tmp_path, opened, size=4 * MiB)
    loader, _ = _loader(opened, ck.layout, fd, NoThen(16), ck)
    chunks = loader._verifier.chunks
    assert chunks is not None
    first, count = 200, 8  # 128 KiB: more than read_now_bytes
    wanted = set(range(first, first + count))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        try:
            with trio.fail_after(60):
                while not wanted | {first - 1, first + count} <= chunks.queued:
                    await trio.sleep(0.001)
            handle = loader.submit_wait(first * CHUNK, count * CHUNK, lambda h: None)
            assert handle is not None
            assert sorted(list(chunks.runs)[:count]) == [(k, k) for k in sorted(wanted)]
        finally:
            gate.set()
        with trio.fail_after(60):
            await loader.wait_loaded(first * CHUNK, count * CHUNK)
        nursery.cancel_scope.cancel()
    await loader.aclose()
