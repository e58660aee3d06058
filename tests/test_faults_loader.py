"""The loader under faults: read errors, corrupt pages, hung reads, a short pages file,
shutdown with a hung read.

Time: the in-process tests run on trio's ``autojump_clock`` (a MockClock that jumps
to the next deadline as soon as every task is blocked) over the ``sync`` backend or
wrappers of it, where no read happens in a real thread; so a 30 s read deadline
costs no real time.  Tests that use real threads (the threads backend, chunk
hashing in worker threads, the daemon process) use the real clock and only
generous deadlines, never timing assertions.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import threading

import pytest
import trio
import trio.testing

import aio
import aio.testing
from aio._threads import ThreadQueue
from loader import Client, ClientError, Layout, Loader, LoaderConfig, LoadError, MemoryFile
from loader.checkpoint import create_checkpoint, open_checkpoint
from loader.source import FileSource
from protocol import codes
from workloads import DaemonProcess

PAGE = 4096
KiB = 1 << 10
MiB = 1 << 20


class Image:
    """A pages file of ``size`` random bytes at memory 0 (one range), open read-only."""

    def __init__(self, path: str, size: int, file_size: int | None = None) -> None:
        self.data = random.Random(size).randbytes(size)
        with open(path, "wb") as f:
            f.write(self.data[: size if file_size is None else file_size])
        self.layout = Layout(size, PAGE, [(0, size, 0)])
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)




def _image(tmp_path, resources, size, file_size=None) -> Image:
    img = Image(str(tmp_path / "pages"), size, file_size)
    resources[0].append(img.fd)
    return img


def _loader(resources, layout, fd, queue, size, **config) -> tuple[Loader, MemoryFile]:
    mem = MemoryFile(size)
    resources[1].append(mem)
    kwargs = {k: config.pop(k) for k in ("chunk_size", "checksums") if k in config}
    defaults = {"queue_depth": queue.capacity, "background_reads": 4, "sweep_read_size": 256 * KiB,
                "busy_background_reads": 2}
    return Loader(FileSource(layout, fd, **kwargs), mem, queue, LoaderConfig(**{**defaults, **config})), mem


class Watch(aio.testing.DelayedQueue):
    """Passes everything on; records the most background reads the loader had in flight."""

    def __init__(self, inner: aio.Queue) -> None:
        super().__init__(inner, 0)
        self.loader: Loader | None = None
        self.max_background = 0
        self.min_background = 0

    def _add(self, request):
        super()._add(request)
        s = self.loader.statistics()
        self.max_background = max(self.max_background, s.background_reads_in_flight)
        self.min_background = min(self.min_background, s.background_reads_in_flight)


# -- item 8: counters after read errors ---------------------------------------------------
@pytest.mark.parametrize("bad", [64 * KiB, 4 * MiB])
async def test_background_counter_stays_exact_after_read_errors(tmp_path, resources, autojump_clock, bad):
    img = _image(tmp_path, resources, 8 * MiB)
    lo = 1 * MiB + 12 * KiB  # not aligned to a read: a read straddles the bad span
    watch = Watch(aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16), aio.testing.fail_offsets(lo, lo + bad)))
    loader, mem = _loader(resources, img.layout, img.fd, watch, 8 * MiB)
    watch.loader = loader
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await loader.done.wait()
    s = loader.statistics()
    assert s.failed_bytes == bad and s.loaded_bytes == 8 * MiB - bad
    assert s.background_reads_in_flight == 0 and s.reads_in_flight == 0  # was -34 / -2040
    assert watch.min_background == 0
    assert watch.max_background <= 4  # the halves of failed reads stay within the background share
    assert mem.view[: lo] == img.data[: lo] and mem.view[lo + bad :] == img.data[lo + bad :]


async def test_waiters_keep_their_slots_while_the_sweep_narrows_errors(tmp_path, resources, autojump_clock):
    img = _image(tmp_path, resources, 8 * MiB)
    queue = aio.testing.FaultInjectingQueue(
        aio.testing.DelayedQueue(aio.open_queue("sync", 8), 0.001), aio.testing.fail_offsets(0, 4 * MiB)
    )
    loader, mem = _loader(resources, img.layout, img.fd, queue, 8 * MiB, background_reads=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        for page in range(4 * MiB, 8 * MiB, MiB // 2):  # served while the sweep fails page after page
            await loader.wait_loaded(page, PAGE)
            assert loader.statistics().background_reads_in_flight <= 2
        with pytest.raises(LoadError) as info:
            await loader.wait_loaded(PAGE, PAGE)
        await loader.done.wait()
    assert info.value.code == codes.IO_ERROR and info.value.errno == errno.EIO
    assert loader.statistics().background_reads_in_flight == 0


# -- item 12: messages and a short pages file -----------------------------------------
async def test_io_error_message_names_the_errno_once(tmp_path, resources, autojump_clock):
    img = _image(tmp_path, resources, MiB)
    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 8), aio.testing.fail_offsets(0, PAGE))
    loader, _ = _loader(resources, img.layout, img.fd, queue, MiB, sweep=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with pytest.raises(LoadError) as info:
            await loader.wait_loaded(0, PAGE)
        nursery.cancel_scope.cancel()
    err = info.value
    assert os.strerror(errno.EIO) not in err.message  # the errno travels on its own
    shown = str(ClientError(err.code, err.message, err.errno))
    assert shown.count(os.strerror(errno.EIO)) == 1, shown


async def test_truncated_pages_file_fails_the_tail_at_once(tmp_path, resources, autojump_clock):
    img = _image(tmp_path, resources, 8 * MiB, file_size=2 * MiB)
    loader, mem = _loader(resources, img.layout, img.fd, aio.open_queue("sync", 16), 8 * MiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with pytest.raises(LoadError) as info:
            await loader.wait_loaded(7 * MiB, PAGE)
        await loader.done.wait()
    s = loader.statistics()
    assert info.value.code == codes.IO_ERROR and info.value.errno is None
    assert "pages file ends at 2097152, the layout needs 8388608" in info.value.message
    assert s.loaded_bytes == 2 * MiB and s.failed_bytes == 6 * MiB
    assert s.failed_ranges == [(2 * MiB, 6 * MiB, 0)]
    assert s.reads_retried == 0 and s.reads_total < 20  # not ~4 reads per page (6144 pages)
    assert mem.view[: 2 * MiB] == img.data[: 2 * MiB]
    with pytest.raises(LoadError, match="pages file ends at"):
        loader.submit_wait(3 * MiB, PAGE, lambda h: None)


# -- item 5: checksums ----------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    """A pages checkpoint of 8 MiB of random data, 1 MiB chunks; one byte of chunk 5 flipped."""
    raw = tmp_path / "raw.img"
    data = bytearray(random.Random(5).randbytes(8 * MiB))
    raw.write_bytes(data)
    out = str(tmp_path / "ckpt")
    create_checkpoint(str(raw), out, chunk_size=MiB)
    ckpt = open_checkpoint(out)
    pages = os.path.join(out, "pages.img")
    flip = 5 * MiB + 1234
    with open(pages, "r+b") as f:
        f.seek(flip)
        byte = f.read(1)
        f.seek(flip)
        f.write(bytes([byte[0] ^ 0x01]))
    return ckpt, bytes(data), flip


@pytest.mark.parametrize("first_wait", ["in the bad chunk", "sweep only"])
async def test_flipped_byte_fails_its_chunk_with_corrupt(checkpoint, resources, first_wait):
    ckpt, data, flip = checkpoint
    fd = ckpt.open_pages()
    resources[0].append(fd)
    loader, mem = _loader(resources, ckpt.layout, fd, aio.open_queue("sync", 16), 8 * MiB,
                          chunk_size=ckpt.chunk_size, checksums=ckpt.checksums)
    answered = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        if first_wait == "in the bad chunk":  # before anything of it is loaded
            with pytest.raises(LoadError) as info:
                await loader.wait_loaded(flip, 1)
            answered.append(info.value)
        await loader.wait_loaded(7 * MiB, PAGE)  # a good chunk: served, whole chunk verified
        assert mem.view[7 * MiB : 7 * MiB + PAGE] == data[7 * MiB : 7 * MiB + PAGE]
        await loader.done.wait()
    s = loader.statistics()
    assert s.verify and s.corrupt_chunks == 1 and s.chunks_verified == 7
    assert s.failed_ranges == [(5 * MiB, MiB, 0)]
    assert s.loaded_bytes == 7 * MiB
    with pytest.raises(LoadError) as later:
        loader.submit_wait(5 * MiB + 8 * PAGE, PAGE, lambda h: None)
    for err in [*answered, later.value]:
        assert err.code == codes.CORRUPT and "checksum" in err.message
    assert mem.view[: 5 * MiB] == data[: 5 * MiB] and mem.view[6 * MiB :] == data[6 * MiB :]


async def test_without_verification_the_flipped_byte_is_served(checkpoint, resources):
    """What --no-verify gives up (and what every restore did before checksums were checked)."""
    ckpt, data, flip = checkpoint
    fd = ckpt.open_pages()
    resources[0].append(fd)
    loader, mem = _loader(resources, ckpt.layout, fd, aio.open_queue("sync", 16), 8 * MiB, verify=False,
                          chunk_size=ckpt.chunk_size, checksums=ckpt.checksums)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await loader.wait_loaded(flip, 1)
        await loader.done.wait()
    s = loader.statistics()
    assert not s.verify and s.corrupt_chunks == 0 and s.failed_bytes == 0
    assert mem.view[flip] != data[flip]


async def test_unverifiable_chunk_fails_instead_of_being_served(checkpoint, resources):
    """A read error on one page of a chunk: the chunk's other pages cannot be verified."""
    ckpt, data, _ = checkpoint
    fd = ckpt.open_pages()
    resources[0].append(fd)
    bad = aio.testing.fail_offsets(2 * MiB, 2 * MiB + PAGE)
    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16), bad)
    loader, mem = _loader(resources, ckpt.layout, fd, queue, 8 * MiB,
                          chunk_size=ckpt.chunk_size, checksums=ckpt.checksums)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with pytest.raises(LoadError) as info:
            await loader.wait_loaded(2 * MiB + 100 * PAGE, PAGE)
        await loader.done.wait()
    assert info.value.code == codes.IO_ERROR and "cannot be verified" in info.value.message
    s = loader.statistics()
    assert s.failed_bytes == 2 * MiB  # chunk 2 (the flipped chunk 5 too)
    assert s.loaded_bytes == 6 * MiB


# -- item 10: hung reads ---------------------------------------------------------------
async def test_hung_read_times_out_and_other_waits_are_served(tmp_path, resources, autojump_clock):
    img = _image(tmp_path, resources, 8 * MiB)
    queue = aio.testing.HangingQueue(aio.open_queue("sync", 16), aio.testing.hang_offsets(3 * MiB, 3 * MiB + PAGE))
    loader, mem = _loader(resources, img.layout, img.fd, queue, 8 * MiB, read_timeout=30, sweep=False)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader.run)
            t0 = trio.current_time()
            with pytest.raises(LoadError) as info:
                await loader.wait_loaded(3 * MiB, PAGE)
            assert trio.current_time() - t0 >= 30  # the deadline, on the mock clock
            s = loader.statistics()
            assert s.reads_timed_out == 1 and s.reads_stuck == 1 and s.reads_in_flight == 0
            for page in range(0, 8 * MiB, MiB):  # everything else still served
                if page != 3 * MiB:
                    await loader.wait_loaded(page, PAGE)
                    assert mem.view[page : page + PAGE] == img.data[page : page + PAGE]
            with pytest.raises(LoadError) as again:
                loader.submit_wait(3 * MiB, PAGE, lambda h: None)
            queue.release()  # the stuck read comes back at last: ignored, its pages stay failed
            await loader.wait_loaded(5 * MiB, 2 * PAGE)
            assert loader.statistics().reads_stuck == 0
            nursery.cancel_scope.cancel()
    finally:
        queue.release()
        await loader.aclose()
    assert info.value.code == again.value.code == codes.TIMEOUT
    assert "longer than 30 s" in info.value.message
    assert loader.statistics().failed_ranges == [(3 * MiB, PAGE, 0)]


async def test_shutdown_with_a_hung_read_answers_waiters_and_gives_up_on_it(tmp_path, resources, autojump_clock):
    img = _image(tmp_path, resources, 8 * MiB)
    queue = aio.testing.HangingQueue(aio.open_queue("sync", 64), aio.testing.hang_offsets(0, PAGE))
    loader, _ = _loader(resources, img.layout, img.fd, queue, 8 * MiB, sweep=False, read_timeout=None)
    codes_seen = []

    async def waiter(offset):
        try:
            await loader.wait_loaded(offset, PAGE)
        except LoadError as exc:
            codes_seen.append(exc.code)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader.run)
            for i in range(200):
                nursery.start_soon(waiter, (i % 2) * 4 * MiB + i * PAGE if i else 0)
            await trio.testing.wait_all_tasks_blocked()
            assert queue.hung == 1
            t0 = trio.current_time()
            await loader.aclose(timeout=2)
            assert trio.current_time() - t0 <= 2
        assert loader.abandoned_reads == 1 and not queue.closed
        assert len(codes_seen) + loader.statistics().waits_served == 200
        assert codes_seen and set(codes_seen) == {codes.SHUTTING_DOWN}
    finally:
        queue.release()
        await queue.aclose()


def _blocking_thread_queue(release: threading.Event, started: threading.Semaphore | None = None):
    class Stuck(ThreadQueue):
        def _run(self, request, pipe=None):
            if not request.urgent:
                if started is not None:
                    started.release()
                release.wait(60)  # a hung background read (released by the test)
            return super()._run(request, pipe)

    return Stuck(capacity=16, threads=2, inline_urgent=0, yield_threads=2)  # every worker may hang


async def test_threads_urgent_lane_serves_waits_while_every_worker_hangs(tmp_path, resources):
    img = _image(tmp_path, resources, 8 * MiB)
    release, started = threading.Event(), threading.Semaphore(0)
    queue = _blocking_thread_queue(release, started)
    mem = MemoryFile(8 * MiB)
    resources[1].append(mem)
    try:
        for i in range(4):  # two occupy both workers, two queue behind them
            queue.add(aio.Request.read(i, img.fd, i * MiB, mem.buffer(i * MiB, MiB)))
        for _ in range(2):  # both workers hold a hung read before the urgent one arrives
            assert await trio.to_thread.run_sync(started.acquire, True, 30)
        queue.add(aio.Request.read(99, img.fd, 6 * MiB, mem.buffer(6 * MiB, 256 * KiB), urgent=True))
        with trio.fail_after(30):
            done = await queue.wait(1)
        assert [(c.id, c.result) for c in done] == [(99, 256 * KiB)]
        assert mem.view[6 * MiB : 6 * MiB + 256 * KiB] == img.data[6 * MiB : 6 * MiB + 256 * KiB]
        assert queue.cancel_unstarted() == 2  # the two queued background reads
        with trio.fail_after(30):
            dropped = await queue.wait(2)
        assert sorted((c.id, c.result) for c in dropped) == [(2, -errno.ECANCELED), (3, -errno.ECANCELED)]
    finally:
        release.set()
        await queue.aclose()


@pytest.fixture
def raw_image(tmp_path):
    path = tmp_path / "raw.img"
    path.write_bytes(random.Random(3).randbytes(8 * MiB))
    return str(path)


def test_sigterm_with_a_hung_read_exits_within_the_deadline(tmp_path, raw_image, monkeypatch):
    """Through a real process, with the daemon's test hook: reads of the first page hang."""
    monkeypatch.setenv("PAGELOAD_TEST_HANG_READS", f"0:{PAGE}")
    sock = str(tmp_path / "s.sock")
    daemon = DaemonProcess(raw_image, sock, str(tmp_path / "log"),
                           ["--background", "--aio", "threads", "--shutdown-timeout", "1", "--read-timeout", "600"])
    with daemon:
        with Client.connect(sock) as client:
            for _ in range(2000):  # the sweep's first read, at page 0, hangs; the rest loads
                s = client.stats()
                if s["loaded_bytes"] >= 8 * MiB - 1 * MiB:
                    break
                threading.Event().wait(0.01)
            else:
                pytest.fail(f"the load did not progress past the hung read: {s}")
            assert s["reads_in_flight"] >= 1 and s["failed_bytes"] == 0
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.proc.wait(30)  # the deadline is 1 s; 30 s only so a hang fails, not blocks
    assert code == 0, daemon.stderr_tail()
    with open(tmp_path / "log") as f:
        log = f.read()
    assert "still running after 0.9 s" in log and "test hook" in log
    assert not os.path.exists(sock)


async def test_a_read_that_keeps_answering_eagain_fails_after_max_retries(tmp_path, resources, autojump_clock):
    """EAGAIN may pass, so it is retried, but only ``max_retries`` times: a page whose
    reads answer EAGAIN forever fails its waiter with io-error instead of spinning."""
    img = _image(tmp_path, resources, MiB)
    tries = []

    def again(request):
        if request.offset < PAGE:
            tries.append(request.offset)
            return -errno.EAGAIN
        return None

    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 8), again)
    loader, _ = _loader(resources, img.layout, img.fd, queue, MiB, sweep=False, max_retries=3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(30), pytest.raises(LoadError) as info:
            await loader.wait_loaded(0, PAGE)
        nursery.cancel_scope.cancel()
    assert info.value.code == codes.IO_ERROR
    assert len(tries) == 1 + 3  # the first read and its three retries, never more


async def test_a_wait_is_not_answered_by_other_reads_landing(tmp_path, resources, autojump_clock):
    """A waiter's count is taken down only by bytes of its own span: thousands of other
    reads settling while its own read hangs never answer it (a count off by one per
    settle would, after 4096 of them); it ends with the error of its own read."""
    size = 24 * MiB  # 6144 one-page sweep reads besides the hung one
    img = _image(tmp_path, resources, size)
    queue = aio.testing.HangingQueue(aio.open_queue("sync", 16), lambda r: r.offset < PAGE)
    loader, _ = _loader(resources, img.layout, img.fd, queue, size, sweep_read_size=PAGE, kernel_copy=False)
    outcome: list[str] = []

    async def waiter():
        try:
            await loader.wait_loaded(0, PAGE)
            outcome.append("loaded")
        except LoadError as exc:
            outcome.append(exc.code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        nursery.start_soon(waiter)
        with trio.fail_after(60):
            while loader.statistics().loaded_bytes < size - PAGE:  # everything else lands
                await trio.sleep(0.01)
        assert queue.hung == 1 and outcome == []  # still waiting for its own page
        queue.release()  # the hung read fails with EIO
        with trio.fail_after(60):
            while not outcome:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert outcome == [codes.IO_ERROR]


@pytest.mark.parametrize("kernel_copy", [False, True])
async def test_a_gathered_read_of_a_raw_image_narrows_an_error_and_resumes_after_a_short_read(
        tmp_path, resources, autojump_clock, kernel_copy):
    """A raw image's islands go many to a request (Op.GATHER into the mapping, or
    Op.COPY with gather in the kernel).  One bad page among them fails alone; a
    request cut short lands what it read and the rest is read again; every other
    byte lands exactly where it belongs."""
    pages = 256
    size = pages * PAGE
    data = bytearray(random.Random(7).randbytes(size))
    ranges = [(k * PAGE, PAGE, k * PAGE) for k in range(0, pages, 2)]  # every other page: holes between
    for k in range(1, pages, 2):
        data[k * PAGE:(k + 1) * PAGE] = bytes(PAGE)
    path = tmp_path / "raw"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    resources[0].append(fd)
    from array import array

    starts = array("Q", [m for m, _, _ in ranges])
    layout = Layout.from_arrays(size, PAGE, starts, array("Q", [n for _, n, _ in ranges]))  # a raw image's
    assert layout.identity_mapped
    bad = 100 * PAGE  # a data page in the middle of a gathered read
    cut = []

    def rule(request: aio.Request) -> int | None:
        first, last = request.span
        if first < bad + PAGE and last > bad:
            return -errno.EIO
        if not cut and len(request.buffers or request.dest) >= 4:
            cut.append(request.id)
            return 2 * PAGE + 100  # short, in the middle of its third range
        return None

    queue = aio.testing.FaultInjectingQueue(aio.open_queue("sync", 16), rule)
    loader, mem = _loader(resources, layout, fd, queue, size, kernel_copy=kernel_copy)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await loader.done.wait()
    s = loader.statistics()
    assert cut and queue.injected >= 2
    assert s.failed_bytes == PAGE and s.loaded_bytes == len(ranges) * PAGE - PAGE
    assert s.reads_total < len(ranges) // 4  # gathered, not one read a range
    expected = bytes(data[:bad]) + bytes(PAGE) + bytes(data[bad + PAGE:])
    assert mem.view[:] == expected
