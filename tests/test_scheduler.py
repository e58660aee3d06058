"""The loader's scheduling, proven without timing: slowed or faulty backends, counts.

Time is trio's ``autojump_clock`` (a MockClock with ``autojump_threshold=0``): the
``sync`` backend and its wrappers run reads inside ``wait`` in this thread, so a
``DelayedQueue``'s delays and every ``sleep`` cost no real time and the order of
events is decided by the mock clock alone.  The threads backend completes reads
in real threads, where an autojump could fire while a thread works; the tests
that use it do not depend on time (they wait for events, with a deadline).
Every poll loop has a deadline (``_until``), and the image, memory file and
queue come from fixtures, so a failing test leaks nothing.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess

import pytest
import trio
import trio.testing

import aio
import aio.testing
from loader import Layout, Loader, LoaderConfig, LoadError, MemoryFile
from loader.source import FileSource
from workloads._vmm import hugepages_free

PAGE = 4096
MiB = 1 << 20


class Image:
    """A pages file with data ranges and holes; ``expected`` is the memory it restores to."""

    def __init__(self, path: str, memory_size: int, ranges: list[tuple[int, int]], seed: int = 0) -> None:
        rng = random.Random(seed)
        self.memory_size = memory_size
        self.expected = bytearray(memory_size)
        triples = []
        file_off = 0
        with open(path, "wb") as f:
            for mem, length in ranges:
                data = rng.randbytes(length)
                self.expected[mem : mem + length] = data
                f.write(data)
                triples.append((mem, length, file_off))
                file_off += length
        self.layout = Layout(memory_size, PAGE, triples)
        self.layout.validate(file_off)
        self.fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def image(tmp_path):
    # 16 MiB of memory: 1 MiB data, 1 MiB hole, alternating; pages-file offsets contiguous
    img = Image(str(tmp_path / "pages"), 16 * MiB, [(m, MiB) for m in range(0, 16 * MiB, 2 * MiB)])
    yield img
    img.close()


@pytest.fixture
def cleanup():
    """Memory files and queues a test made, closed at teardown even if it failed."""
    made: list[object] = []
    yield made
    for thing in made:
        if isinstance(thing, MemoryFile):
            thing.close()


_made: list[object] | None = None


@pytest.fixture(autouse=True)
def _track(cleanup):
    global _made
    _made = cleanup
    yield
    _made = None


async def _until(condition, what: str, limit: float = 60.0) -> None:
    """Poll ``condition`` each scheduling round; fail (not hang) after ``limit`` clock seconds."""
    with trio.move_on_after(limit):
        while not condition():
            await trio.sleep(0.001)
        return
    pytest.fail(f"timed out waiting for {what}")


def make_loader(img: Image, queue: aio.Queue, **config) -> tuple[Loader, MemoryFile]:
    mem = MemoryFile(img.memory_size)
    if _made is not None:
        _made.append(mem)
    defaults = {"queue_depth": queue.capacity, "background_reads": 4, "sweep_read_size": 256 * 1024}
    cfg = LoaderConfig(**{**defaults, **config})
    return Loader(FileSource(img.layout, img.fd), mem, queue, cfg), mem


@pytest.mark.parametrize("backend", ["threads", "sync"])
async def test_full_load_equals_image(image, backend):
    queue = aio.open_queue(backend, 16)
    loader, mem = make_loader(image, queue, sweep_read_size=2 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await loader.done.wait()
    assert mem.view == image.expected
    stats = loader.statistics()
    assert stats.loaded_bytes == stats.total_bytes == 8 * MiB
    assert stats.done and stats.reads_in_flight == 0
    # coalescing: 8 data ranges of 1 MiB, contiguous in the pages file, at 2 MiB a read:
    # each read is one readv over two ranges that are apart in memory
    assert stats.reads_total == 4
    await loader.aclose()
    mem.close()


async def test_wait_returns_correct_bytes_while_rest_loads(image, autojump_clock):
    queue = aio.testing.DelayedQueue(aio.open_queue("sync", 16), 0.002)
    loader, mem = make_loader(image, queue)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        offset = 14 * MiB + 5 * PAGE + 100  # unaligned: rounds out to whole pages
        await loader.wait_loaded(offset, 3 * PAGE)
        lo, hi = 14 * MiB + 5 * PAGE, 14 * MiB + 9 * PAGE
        assert mem.view[lo:hi] == image.expected[lo:hi]
        assert not loader.done.is_set()
        assert loader.loaded_bytes < loader.total_bytes
        await loader.done.wait()
    assert mem.view == image.expected
    await loader.aclose()
    mem.close()


async def test_priority_far_end_served_while_most_unloaded(image, autojump_clock):
    # a backend slowed on purpose: every completion costs 5 ms
    queue = aio.testing.DelayedQueue(aio.open_queue("sync", 16), 0.005)
    loader, mem = make_loader(image, queue)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await trio.sleep(0)
        far = image.memory_size - 2 * MiB + MiB - PAGE  # last page of the last data range
        await loader.wait_loaded(far, PAGE)
        assert mem.view[far : far + PAGE] == image.expected[far : far + PAGE]
        stats = loader.statistics()
        assert stats.loaded_bytes < stats.total_bytes // 4, stats
        assert stats.waits_served == 1
        nursery.cancel_scope.cancel()
    await loader.aclose()
    mem.close()


async def test_without_priority_far_wait_waits_for_the_sweep(image, autojump_clock):
    queue = aio.testing.DelayedQueue(aio.open_queue("sync", 16), 0.0005)
    loader, mem = make_loader(image, queue, priority=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        far = image.memory_size - MiB - PAGE
        await loader.wait_loaded(far, PAGE)
        assert loader.statistics().loaded_bytes > loader.total_bytes * 3 // 4
        nursery.cancel_scope.cancel()
    await loader.aclose()
    mem.close()


async def test_holes_and_loaded_ranges_answer_without_io(image, autojump_clock):
    queue = aio.open_queue("sync", 16)
    loader, mem = make_loader(image, queue, sweep=False)
    # a hole: nothing to wait for, nothing read
    assert loader.submit_wait(MiB, MiB, lambda h: None) is None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await loader.wait_loaded(0, 2 * PAGE)
        reads = loader.statistics().reads_total
        assert loader.submit_wait(0, 2 * PAGE, lambda h: None) is None
        await loader.wait_loaded(PAGE, PAGE)
        assert loader.statistics().reads_total == reads
        assert loader.statistics().waits_immediate == 3
        nursery.cancel_scope.cancel()
    await loader.aclose()
    mem.close()


async def test_lazy_mode_loads_only_what_is_waited_for(image):
    queue = aio.open_queue("threads", 16)
    loader, mem = make_loader(image, queue, sweep=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await loader.wait_loaded(4 * MiB, 64 * 1024)
        await trio.testing.wait_all_tasks_blocked()
        assert loader.loaded_bytes == 64 * 1024 and loader.statistics().reads_in_flight == 0
        loader.prefetch(6 * MiB, MiB)
        await _until(lambda: loader.loaded_bytes >= 64 * 1024 + MiB, "the prefetch")
        assert mem.view[6 * MiB : 7 * MiB] == image.expected[6 * MiB : 7 * MiB]
        nursery.cancel_scope.cancel()
    await loader.aclose()
    mem.close()


async def test_in_flight_part_is_joined_not_read_twice(image, autojump_clock):
    queue = aio.testing.DelayedQueue(aio.open_queue("sync", 16), 0.01)
    loader, mem = make_loader(image, queue, sweep=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        results = []

        async def waiter(off, n):
            await loader.wait_loaded(off, n)
            results.append(off)

        nursery.start_soon(waiter, 0, 64 * 1024)
        await trio.sleep(0.001)
        nursery.start_soon(waiter, 16 * 1024, 8 * 1024)  # inside the first, now in flight
        await _until(lambda: len(results) == 2, "both waiters")
        stats = loader.statistics()
        assert stats.reads_total == 1
        assert stats.loaded_bytes == 64 * 1024
        nursery.cancel_scope.cancel()
    await loader.aclose()
    mem.close()


async def test_large_wait_does_not_starve_small_one(tmp_path, autojump_clock):
    img = Image(str(tmp_path / "pages"), 32 * MiB, [(0, 32 * MiB)])
    queue = aio.testing.DelayedQueue(aio.open_queue("sync", 8), 0.002)
    loader, mem = make_loader(img, queue, sweep=False, read_size=256 * 1024, waiter_reads=2)
    order = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)

        async def waiter(name, off, n):
            await loader.wait_loaded(off, n)
            order.append((name, loader.loaded_bytes))

        nursery.start_soon(waiter, "big", 0, 24 * MiB)
        await trio.sleep(0.01)
        nursery.start_soon(waiter, "small", 30 * MiB, PAGE)
        await _until(lambda: len(order) == 2, "both waiters")
        nursery.cancel_scope.cancel()  # lazy mode: run() goes on until closed
    assert order[0][0] == "small"
    assert order[0][1] < 12 * MiB  # served long before the big wait was half done
    assert mem.view[30 * MiB : 30 * MiB + PAGE] == img.expected[30 * MiB : 30 * MiB + PAGE]
    await loader.aclose()
    mem.close()
    img.close()


async def test_io_error_fails_exactly_the_waits_that_need_it(image, autojump_clock):
    bad_lo, bad_hi = 2 * MiB, 2 * MiB + 256 * 1024  # pages-file span of memory 4 MiB..
    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16), aio.testing.fail_offsets(bad_lo, bad_hi))
    loader, mem = make_loader(image, queue)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with pytest.raises(LoadError) as info:
            await loader.wait_loaded(4 * MiB + PAGE, PAGE)  # memory 4 MiB is file offset 2 MiB
        assert info.value.code == "io-error" and info.value.errno == errno.EIO
        await loader.wait_loaded(6 * MiB, MiB)  # unaffected
        await loader.done.wait()
    stats = loader.statistics()
    # failed reads are narrowed down to the pages really failing: exactly the bad span
    assert list(loader.failed) == [(4 * MiB, 4 * MiB + 256 * 1024)]
    assert stats.failed_bytes == 256 * 1024
    assert all(e == errno.EIO for _, _, e in stats.failed_ranges)
    assert stats.loaded_bytes + stats.failed_bytes == stats.total_bytes
    for lo, hi in loader.layout.data_in(0, image.memory_size):
        for a, b in [(lo, hi)]:
            pos = a
            for flo, fhi in loader.failed.overlapping(a, b):
                assert mem.view[pos:flo] == image.expected[pos:flo]
                pos = fhi
            assert mem.view[pos:b] == image.expected[pos:b]
    # a later wait on the failed part fails at once; one beside it succeeds at once
    with pytest.raises(LoadError):
        await loader.wait_loaded(4 * MiB, PAGE)
    fhi = max(lo + n for lo, n, _ in stats.failed_ranges)
    await loader.wait_loaded(fhi, PAGE)
    await loader.aclose()
    mem.close()


async def test_short_reads_are_resubmitted(image, autojump_clock):
    seen = set()

    def shorten_once(request):
        if request.id in seen:
            return None
        seen.add(request.id)
        return request.length // 2 + PAGE // 2  # not even page-aligned

    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16), shorten_once)
    loader, mem = make_loader(image, queue)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await loader.done.wait()
    assert mem.view == image.expected
    assert loader.statistics().reads_retried == len(seen) >= 8  # each read cut short once, resubmitted once
    assert loader.statistics().failed_bytes == 0
    await loader.aclose()
    mem.close()


async def test_cancelled_wait_leaves_nothing_behind(image, autojump_clock):
    queue = aio.testing.DelayedQueue(aio.open_queue("sync", 16), 0.01)
    loader, mem = make_loader(image, queue, sweep=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.move_on_after(0.005):
            await loader.wait_loaded(8 * MiB, MiB)
        stats = loader.statistics()
        assert stats.waits_cancelled == 1 and stats.waiters_blocked == 0
        nursery.cancel_scope.cancel()
    await loader.aclose()
    mem.close()


async def test_shutdown_answers_every_waiter(image, autojump_clock):
    queue = aio.testing.DelayedQueue(aio.open_queue("sync", 16), 0.01)
    loader, mem = make_loader(image, queue, sweep=False, waiter_reads=1)
    errors = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)

        async def waiter():
            try:
                await loader.wait_loaded(0, 8 * MiB)
            except LoadError as exc:
                errors.append(exc.code)

        nursery.start_soon(waiter)
        await trio.sleep(0.02)
        await loader.aclose()
    assert errors == ["shutting-down"]
    assert loader.statistics().reads_in_flight == 0
    with pytest.raises(LoadError):
        loader.submit_wait(10 * MiB, PAGE, lambda h: None)
    mem.close()


async def test_shutdown_answers_several_waiters_each_with_an_error_at_once(image, autojump_clock):
    """Every waiter, not only the first, gets ``shutting-down`` from ``shutdown()``
    itself (before any read could complete), never a late success.  The deadline
    only turns a waiter left unanswered (a hang) into a failure: with the mock
    clock it fires as soon as nothing else can happen."""
    queue = aio.testing.DelayedQueue(aio.open_queue("sync", 16), 0.01)
    loader, mem = make_loader(image, queue, sweep=False, waiter_reads=1)
    outcomes: dict[int, str] = {}
    offsets = [0, 4 * MiB, 8 * MiB + 5 * PAGE, 12 * MiB, 14 * MiB + PAGE]  # distinct data ranges
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader.run)

            async def waiter(offset):
                try:
                    await loader.wait_loaded(offset, MiB - (offset % MiB))
                    outcomes[offset] = "loaded"
                except LoadError as exc:
                    outcomes[offset] = exc.code

            for off in offsets:
                nursery.start_soon(waiter, off)
            await trio.sleep(0.02)
            before = loader.statistics()
            assert before.waiters_blocked == len(offsets) and before.waits_failed == 0 and not outcomes
            loader.shutdown()
            # answered inside shutdown(): nothing blocked, every one counted failed
            after = loader.statistics()
            assert (after.waiters_blocked, after.waits_failed, after.waits_served) == (0, len(offsets), 0)
            await loader.aclose()
    assert outcomes == {off: "shutting-down" for off in offsets}
    mem.close()


def test_out_of_memory_range_is_refused(image):
    async def main():
        loader, mem = make_loader(image, aio.open_queue("sync", 16))
        with pytest.raises(ValueError):
            loader.submit_wait(image.memory_size - PAGE, 2 * PAGE, lambda h: None)
        mem.close()

    trio.run(main)


async def test_waiters_filling_the_queue_leave_no_room_for_the_sweep(image, autojump_clock):
    # regression: with every slot taken by waiters' reads, the sweep must not add more
    queue = aio.testing.DelayedQueue(aio.open_queue("sync", 8), 0.001)
    loader, mem = make_loader(image, queue, background_reads=4)
    answered = []
    for i in range(32):  # all registered before the first round: they take every slot
        offset = (i % 8) * 2 * MiB + (i // 8) * 128 * 1024  # inside the data ranges
        assert loader.submit_wait(offset, PAGE, answered.append) is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await loader.done.wait()
    assert len(answered) == 32 and all(h.error is None for h in answered)
    assert mem.view == image.expected
    assert loader.statistics().waits_failed == 0
    await loader.aclose()
    mem.close()


async def test_sweep_shrinks_while_clients_fault(image, autojump_clock):
    """While a wait is blocked, at most ``busy_background_reads`` sweep reads are in flight."""
    inner = aio.testing.DelayedQueue(aio.open_queue("sync", 16), 0.001)
    seen = {"max_busy": 0, "max_quiet": 0}

    class Watch(aio.testing.DelayedQueue):
        def _add(self, request):
            super()._add(request)
            if not request.urgent:  # a sweep read: how many are in flight with it?
                background = loader.statistics().background_reads_in_flight
                key = "max_busy" if loader._settler.waiters else "max_quiet"
                seen[key] = max(seen[key], background)

    queue = Watch(inner, 0)
    loader, mem = make_loader(image, queue, background_reads=6, busy_background_reads=1, busy_linger_s=0,
                              sweep_read_size=256 * 1024)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await trio.sleep(0.005)  # the sweep runs at full width first
        for i in range(20):
            await loader.wait_loaded(15 * MiB - (i + 1) * 8 * PAGE, PAGE)
        await loader.done.wait()
    assert seen["max_quiet"] == 6
    assert seen["max_busy"] <= 1  # sweep reads added while a client waited: one at a time
    assert loader.statistics().waits_served >= 1
    await loader.aclose()
    mem.close()


async def test_a_dead_pages_file_fails_everything_with_merged_ranges(image, autojump_clock):
    # every read fails: the load still finishes, every data range is failed, and the
    # record is per merged interval (not per page, although reads were narrowed to pages)
    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16), aio.testing.fail_offsets(0, 1 << 40))
    loader, mem = make_loader(image, queue)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with pytest.raises(LoadError):
            await loader.wait_loaded(3 * PAGE, PAGE)
        await loader.done.wait()
    stats = loader.statistics()
    assert stats.loaded_bytes == 0 and stats.failed_bytes == stats.total_bytes
    assert stats.failed_ranges == [(m, MiB, errno.EIO) for m in range(0, 16 * MiB, 2 * MiB)]
    await loader.aclose()
    mem.close()


async def test_small_cached_wait_is_read_at_once_in_the_waiting_task(image):
    """A wait on unstarted, cached data of one range is read and answered inside
    submit_wait (no loader round, no callback); larger or split ones go to the queue."""
    queue = aio.open_queue("threads", 16)
    loader, mem = make_loader(image, queue, sweep=False, read_now_bytes=64 * 1024)
    called: list[object] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        lo = 6 * MiB + 3 * PAGE
        assert loader.submit_wait(lo + 10, 2 * PAGE - 10, called.append) is None  # the file is in the page cache
        assert mem.view[lo : lo + 2 * PAGE] == image.expected[lo : lo + 2 * PAGE]
        stats = loader.statistics()
        assert (stats.loaded_bytes, stats.waits_served, stats.waits_immediate, stats.reads_total) == (2 * PAGE, 1, 0, 1)
        assert loader.submit_wait(lo, PAGE, called.append) is None  # now loaded: immediate
        assert loader.statistics().waits_immediate == 1
        # more than read_now_bytes, or across a hole: through the queue, with a callback
        big = loader.submit_wait(8 * MiB, 128 * 1024, called.append)
        across = loader.submit_wait(MiB - PAGE, 2 * MiB, called.append)
        assert big is not None and across is not None
        await _until(lambda: len(called) == 2, "the queued waits")
        assert big.error is None and across.error is None
        assert queue.inline_reads >= 1
        nursery.cancel_scope.cancel()
    assert called == [big, across] or called == [across, big]
    await loader.aclose()
    mem.close()


@pytest.mark.parametrize("config", [{"read_now_bytes": 0}, {"priority": False}])
async def test_wait_is_not_read_at_once_when_turned_off_or_first_come_first_served(image, config):
    queue = aio.open_queue("threads", 16)
    loader, mem = make_loader(image, queue, **config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        done = trio.Event()
        handle = loader.submit_wait(12 * MiB + PAGE, PAGE, lambda h: done.set())
        assert handle is not None  # it blocked: read by the loader's task
        with trio.fail_after(60):
            await done.wait()
        assert handle.error is None
        nursery.cancel_scope.cancel()
    await loader.aclose()
    mem.close()


async def test_wait_is_not_read_at_once_with_checksums(image):
    """With checksums a chunk is served only once verified: never read at once."""
    import xxhash

    chunk = MiB
    sums = [xxhash.xxh3_64_intdigest(bytes(image.expected[m : m + chunk])) for m in range(0, 16 * MiB, 2 * MiB)]
    queue = aio.open_queue("threads", 16)
    mem = MemoryFile(image.memory_size)
    loader = Loader(FileSource(image.layout, image.fd, chunk_size=chunk, checksums=sums), mem, queue,
                    LoaderConfig(queue_depth=16, background_reads=4, sweep=False))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        done = trio.Event()
        handle = loader.submit_wait(4 * MiB, PAGE, lambda h: done.set())
        assert handle is not None
        with trio.fail_after(60):
            await done.wait()
        assert handle.error is None and loader.statistics().chunks_verified == 1
        nursery.cancel_scope.cancel()
    await loader.aclose()
    mem.close()


async def test_background_reads_yield_the_cpu_exactly_while_clients_fault(image):
    """The loader tells its queue when clients start and stop faulting."""
    from aio._sync import SyncQueue

    class Recording(SyncQueue):
        def __init__(self, capacity: int) -> None:
            super().__init__(capacity)
            self.hints: list[bool] = []

        def background_yields(self, yields: bool) -> None:
            self.hints.append(yields)

    queue = Recording(16)
    loader, mem = make_loader(image, queue, busy_linger_s=0.0, read_now_bytes=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await _until(lambda: loader.loaded_bytes > 0, "the sweep's first read")
        assert queue.hints == [False]  # nobody waits: full speed
        await loader.wait_loaded(15 * MiB - PAGE, PAGE)
        assert queue.hints[:2] == [False, True]  # a blocked wait: yield at once
        await loader.done.wait()
        assert queue.hints[-1] is False  # nobody waits again
        assert all(a != b for a, b in zip(queue.hints, queue.hints[1:]))  # only changes are told
        nursery.cancel_scope.cancel()
    await loader.aclose()
    mem.close()


@pytest.mark.parametrize("read_now", [True, False])
async def test_a_fault_read_at_once_yields_the_cpu_but_keeps_the_sweeps_width(image, read_now):
    """A blocked wait narrows the sweep to busy_background_reads (reads it would queue
    behind); a wait read at once queues behind nothing: the sweep keeps its width, and
    only the CPU is yielded (background_yields(True))."""
    from aio._base import read_nowait
    from aio._sync import SyncQueue

    class Recording(SyncQueue):
        def __init__(self, capacity: int) -> None:
            super().__init__(capacity)
            self.hints: list[bool] = []

        def background_yields(self, yields: bool) -> None:
            self.hints.append(yields)

        def read_now(self, fd, buffer, offset):
            return read_nowait(fd, buffer, offset) if read_now else -1

    os.pread(image.fd, 16 * MiB, 0)  # cached, for read_now
    queue = Recording(16)
    loader, mem = make_loader(image, queue, background_reads=4, busy_background_reads=1, busy_linger_s=3600.0)
    loader._scheduler.set_busy(False)  # as after a round with nobody waiting
    handle = loader.submit_wait(12 * MiB + PAGE, PAGE, lambda h: None)
    assert (handle is None) == read_now
    loader._scheduler.schedule()  # one round, no I/O runs (the sync queue reads only in wait)
    stats = loader.statistics()
    assert stats.background_reads_in_flight == (4 if read_now else 1)
    assert queue.hints == [False, True]
    await loader.aclose()
    mem.close()


# --------------------------------------------------------------- file-to-file copies (Op.COPY)
@pytest.mark.parametrize("backend", ["threads", "sync"])
@pytest.mark.parametrize("kernel_copy", [True, False])
async def test_background_reads_are_copied_file_to_file(tmp_path, backend, kernel_copy):
    """Sweep reads go file to file (splice) into the memory file, coalesced reads
    scattered over memory included; the bytes are the image's either way."""
    # ranges contiguous in the pages file but apart in memory: one read covers several
    img = Image(str(tmp_path / "pages"), 16 * MiB, [(m, 512 * 1024) for m in range(0, 16 * MiB, MiB)], seed=5)
    queue = aio.open_queue(backend, 16)
    loader, mem = make_loader(img, queue, sweep_read_size=2 * MiB, kernel_copy=kernel_copy)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await loader.done.wait()
    assert mem.view == img.expected
    stats = loader.statistics()
    assert stats.reads_total == 4  # 2 MiB reads, each over four ranges apart in memory
    assert stats.reads_copied == (stats.reads_total if kernel_copy else 0)
    await loader.aclose()
    img.close()


async def test_small_waiter_reads_go_into_the_mapping_larger_ones_are_copied(image):
    """A waiter's read of at most 64 KiB goes into the mapping (where the threads backend
    can read it at once, in the adding thread); a longer one is copied like the sweep's."""
    from aio._threads import ThreadQueue

    class Recording(ThreadQueue):
        def _add(self, request):
            added.append((request.op, request.urgent))
            super()._add(request)

    added: list[tuple[aio.Op, bool]] = []
    queue = Recording(16)
    loader, mem = make_loader(image, queue, sweep=False, read_size=256 * 1024)
    small, large = (4 * MiB + 3 * PAGE, 48 * 1024), (8 * MiB + 5 * PAGE, 300 * 1024)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await loader.wait_loaded(*small)
        assert loader.statistics().reads_copied == 0
        await loader.wait_loaded(*large)  # two reads: 256 KiB (copied) and 44 KiB (not)
        nursery.cancel_scope.cancel()
    for lo, n in (small, large):
        assert mem.view[lo : lo + n] == image.expected[lo : lo + n]
    stats = loader.statistics()
    assert stats.reads_total == 3 and stats.reads_copied == 1
    # (the small wait was read at once, no request); a waiter's copy is as urgent as its
    # read: it never queues behind the sweep's
    assert sorted(added) == [(aio.Op.READ, True), (aio.Op.COPY, True)]
    await loader.aclose()


async def _load_all_logged(loader: Loader, caplog) -> None:
    """Run ``loader`` until everything is loaded, its INFO lines in ``caplog``."""
    with caplog.at_level("INFO", logger="pageload"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader.run)
            await loader.done.wait()


class _RefusingMemory(MemoryFile):
    """A memory file whose copy fd takes no writes (as hugetlbfs refuses them)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._ro = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    @property
    def copy_fd(self) -> int:
        return self._ro

    def close(self) -> None:
        os.close(self._ro)
        super().close()


@pytest.mark.parametrize("backend", ["threads", "sync"])
async def test_a_memory_file_that_refuses_copies_is_read_into_instead(image, backend, caplog):
    """The first copy fails (EBADF here, EINVAL on hugetlbfs): that read and every later
    one go into the mapping, nothing fails, the bytes are right."""
    mem = _RefusingMemory(image.memory_size)
    _made.append(mem)
    queue = aio.open_queue(backend, 16)
    loader = Loader(FileSource(image.layout, image.fd), mem, queue,
                    LoaderConfig(queue_depth=16, background_reads=1, sweep_read_size=MiB))
    await _load_all_logged(loader, caplog)
    assert mem.view == image.expected
    stats = loader.statistics()
    assert stats.failed_bytes == 0 and stats.reads_copied == 1 < stats.reads_total
    assert "reading into its mapping instead" in caplog.text
    assert "failed (EBADF)" in caplog.text  # the errno by its name
    await loader.aclose()


async def test_an_o_direct_pages_file_is_read_not_copied(image, tmp_path):
    """O_DIRECT bypasses the page cache, which splice reads from: no copies then."""
    try:
        fd = os.open(str(tmp_path / "pages"), os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"this file system refuses O_DIRECT ({exc.strerror})")
    queue = aio.open_queue("sync", 16)
    mem = MemoryFile(image.memory_size)
    _made.append(mem)
    loader = Loader(FileSource(image.layout, fd), mem, queue, LoaderConfig(queue_depth=16, background_reads=4))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader.run)
            await loader.done.wait()
        stats = loader.statistics()
        assert stats.reads_copied == 0 and stats.reads_total > 0 and stats.failed_bytes == 0
        assert mem.view == image.expected
        await loader.aclose()
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting hugetlbfs needs root and mount(8)")
@pytest.mark.skipif(hugepages_free() < 8, reason="needs 8 free 2 MiB huge pages (vm.nr_hugepages)")
@pytest.mark.parametrize("backend", ["threads", "sync"])
async def test_a_memory_file_on_hugetlbfs_is_read_into_after_its_first_copy_fails(image, tmp_path, backend, caplog):
    """hugetlbfs takes no writes: the first copies fail with EINVAL, which is said once;
    every read then goes into the mapping and the bytes are right."""
    where = tmp_path / "huge"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "hugetlbfs", "none", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount hugetlbfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        mem = MemoryFile(image.memory_size, str(where / "mem"))
        _made.append(mem)
        queue = aio.open_queue(backend, 16)
        loader = Loader(FileSource(image.layout, image.fd), mem, queue,
                        LoaderConfig(queue_depth=16, background_reads=4))
        await _load_all_logged(loader, caplog)
        assert mem.view == image.expected
        stats = loader.statistics()
        assert stats.failed_bytes == 0 and 1 <= stats.reads_copied < stats.reads_total
        assert caplog.text.count("copying into it in the kernel failed (EINVAL)") == 1
        await loader.aclose()
        mem.close()
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_gaps_are_the_parts_outside_sorted_ranges():
    """``loader.core._rangeset.gaps``: what the fill, the loaded map and the fault-around
    path skip by; the covering ranges may overlap and reach past the span."""
    from loader.core._rangeset import RangeSet, gaps

    assert list(gaps([], 10, 20)) == [(10, 20)]
    assert list(gaps([(0, 30)], 10, 20)) == []
    assert list(gaps([(12, 14), (13, 15), (18, 25)], 10, 20)) == [(10, 12), (15, 18)]
    assert list(gaps([(0, 11), (20, 30)], 10, 20)) == [(11, 20)]
    assert list(gaps([(25, 30)], 10, 20)) == [(10, 20)]
    s = RangeSet([(4, 6), (8, 9)])
    assert list(gaps(s.overlapping(0, 10), 0, 10)) == [(0, 4), (6, 8), (9, 10)]


async def test_a_waiter_on_a_sweep_read_that_goes_back_in_memory_is_answered(tmp_path):
    """Pages laid out working set first: a sweep read that starts with the working
    set's range goes on with what is next in the pages file, lower in memory.  A wait
    that joins that read in flight, on its lower part, is answered when it lands."""
    from array import array as _array

    from loader.core._rangeset import RangeSet
    from loader.core._sweep import WorkingSetOrder

    rng = random.Random(5)
    a, b = rng.randbytes(MiB), rng.randbytes(MiB)
    path = tmp_path / "pages"
    path.write_bytes(b + a)  # B (memory 1 MiB) first in the file, then A (memory 0)
    layout = Layout(4 * MiB, PAGE, [(0, MiB, MiB), (MiB, MiB, 0)])
    layout.validate(2 * MiB)
    fd = os.open(path, os.O_RDONLY)
    mem = MemoryFile(4 * MiB)
    try:
        order = WorkingSetOrder(_array("Q", [MiB]), _array("Q", [2 * MiB]), RangeSet([(MiB, 2 * MiB)]))
        queue = aio.testing.DelayedQueue(aio.open_queue("sync", 16), 0.05)
        loader = Loader(FileSource(layout, fd), mem, queue, LoaderConfig(queue_depth=16, sweep_read_size=2 * MiB,
                                                             kernel_copy=False), order)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader.run)
            await _until(lambda: loader.statistics().reads_in_flight == 1, "the sweep's read")
            assert not loader.unloaded  # one read holds both ranges: B, then A below it
            with trio.fail_after(10):
                await loader.wait_loaded(PAGE, PAGE)  # in A: joins the read in flight
            assert bytes(mem.view[:MiB]) == a and bytes(mem.view[MiB:2 * MiB]) == b
            await loader.done.wait()
        await loader.aclose()
    finally:
        mem.close()
        os.close(fd)
