"""Millions of ranges, proven small: the loader's window over an extent source, a raw
image ready before its holes are found, the FIEMAP scanner against SEEK_DATA, and
the scattered sample image.  Batches and windows are made tiny here, so that a
few hundred ranges exercise every edge the millions do."""

from __future__ import annotations

import fcntl
import os
from array import array

import pytest
import trio

import aio
import aio.testing
import loader.core._window as window_mod
from loader import Client, DaemonOptions, Loader, LoaderConfig, run_daemon
from loader._loadmap import LoadedMap
from loader.checkpoint import create_checkpoint, open_checkpoint
from loader.checkpoint._raw import ExtentScanner, data_extents, scan_extents
from loader.core._config import Segs
from loader.source import FileSource
from workloads import make_sample_image

PAGE = 4096
STRIDE = 3
SIZE = 2 << 20  # 512 pages: 171 one-page ranges


@pytest.fixture
def tiny_window(monkeypatch):
    monkeypatch.setattr(window_mod, "_BATCH_EXTENTS", 8)
    monkeypatch.setattr(window_mod, "_WINDOW_LOW", 4)
    monkeypatch.setattr(window_mod, "_WINDOW_HIGH", 16)


@pytest.fixture(scope="module")
def scattered(tmp_path_factory):
    d = tmp_path_factory.mktemp("scattered")
    raw = str(d / "memory.img")
    make_sample_image(raw, SIZE, scattered=STRIDE, seed=3)
    ckpt = str(d / "ckpt")
    create_checkpoint(raw, ckpt)
    with open(raw, "rb") as f:
        expected = f.read()
    return {"raw": raw, "pages": ckpt, "expected": expected}


def _wait_one(path, off):
    with Client.connect(path) as client:
        client.wait(off, PAGE)


def options(tmp_path, source, **kw):
    kw.setdefault("handle_signals", False)
    kw.setdefault("ready_line", False)
    return DaemonOptions(source=source, socket_path=str(tmp_path / "s.sock"), **kw)


def test_the_scattered_sample_has_one_range_every_stride_pages(scattered):
    layout = open_checkpoint(scattered["raw"]).layout
    assert list(layout.byte_column("mem")) == list(range(0, SIZE, STRIDE * PAGE))
    assert set(layout.byte_column("length")) == {PAGE}
    data = scattered["expected"]
    for off in range(0, SIZE, PAGE):
        page = data[off:off + PAGE]
        if off % (STRIDE * PAGE):
            assert page == bytes(PAGE)
        else:
            assert int.from_bytes(page[:8], "little") == off + 1  # stamped with where it goes


@pytest.mark.parametrize("kind", ["raw", "pages"])
@pytest.mark.parametrize("sweep", [True, False])
async def test_waits_past_the_window_get_their_bytes_and_the_window_stays_small(
        tmp_path, scattered, tiny_window, kind, sweep):
    """Waits anywhere (data, holes, far past the frontier) are answered with the
    image's bytes while the window holds a few ranges at a time, and the whole
    image loads byte-exact; a raw image's total is exact once its holes are found."""
    opts = options(tmp_path, scattered[kind], wrap_queue=lambda q: aio.testing.DelayedQueue(q, 0.001),
                   config=LoaderConfig(sweep=sweep, busy_linger_s=0.0))
    widest = 0
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        ld = state.loader
        if kind == "raw":
            assert not state.source.holes_known  # ready before the scan

        async def watch():
            nonlocal widest
            while True:
                widest = max(widest, len(ld.unloaded))
                await trio.sleep(0)

        nursery.start_soon(watch)
        small_waits_widest = 0
        expected = scattered["expected"]
        offsets = [SIZE - PAGE, SIZE // 2 + PAGE, STRIDE * PAGE * 100, PAGE, 0, SIZE - STRIDE * PAGE * 2]

        def waits():
            with Client.connect(state.server.path) as client:
                for off in offsets:
                    client.wait(off, PAGE)
                    assert state.memory.view[off:off + PAGE] == expected[off:off + PAGE], hex(off)
                nonlocal small_waits_widest
                small_waits_widest = widest
                client.wait(0, SIZE)  # everything, in one wait (looks all of it up)

        await trio.to_thread.run_sync(waits)
        with trio.fail_after(30):
            await ld.done.wait()
        assert state.memory.view == expected
        stats = ld.statistics()
        data = sum(1 for off in range(0, SIZE, PAGE) if off % (STRIDE * PAGE) == 0) * PAGE
        assert stats.total_bytes == stats.loaded_bytes == data
        assert stats.scanned_bytes == SIZE and ld.frontier == SIZE
        # a page wait adds its page to the window (with checksums, its chunk's ranges: one
        # page each in the pages file); a batch arrives when it runs low
        per_wait = (state.source.chunk_size or PAGE) // PAGE
        assert small_waits_widest <= window_mod._WINDOW_HIGH + window_mod._BATCH_EXTENTS + len(offsets) * per_wait
        assert small_waits_widest < len(open_checkpoint(scattered["raw"]).layout) or per_wait > 1
        state.stop()
        nursery.cancel_scope.cancel()


async def test_a_verified_wait_past_the_frontier_asks_the_source_once_for_its_chunks_memory(
        tmp_path, scattered, tiny_window, monkeypatch):
    """With checksums a wait reads its whole chunk, so the window looks up the chunk's
    memory (here four one-page ranges, STRIDE pages apart) in one probe, not the page
    first and then the rest of the chunk around it in two more; and where nobody has
    looked there yet (fresh), not even that: the chunk's memory comes from the chunk
    table, is read, hashed and settled at once, and only marked as looked up."""
    from loader.core._extents import LayoutExtents

    probes: list[tuple[int, int]] = []
    original = LayoutExtents.probe

    def probe(self, lo, hi):
        probes.append((lo, hi))
        return original(self, lo, hi)

    monkeypatch.setattr(LayoutExtents, "probe", probe)
    opts = options(tmp_path, scattered["pages"], config=LoaderConfig(sweep=False, busy_linger_s=0.0))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        ld = state.loader
        assert state.source.chunk_size == 4 * PAGE
        ranges = len(open_checkpoint(scattered["raw"]).layout)
        k = (ranges // 4 // 2) * 4 + 1  # the second range of a chunk half way through
        off = k * STRIDE * PAGE
        assert off > ld.frontier
        probes.clear()

        def wait():
            with Client.connect(state.server.path) as client:
                client.wait(off, PAGE)

        await trio.to_thread.run_sync(wait)
        expected = scattered["expected"]
        for m in range((k - 1) * STRIDE * PAGE, (k + 3) * STRIDE * PAGE, STRIDE * PAGE):  # the chunk
            assert state.memory.view[m:m + PAGE] == expected[m:m + PAGE], hex(m)
        hull = ((k - 1) * STRIDE * PAGE, (k + 2) * STRIDE * PAGE + PAGE)
        assert probes == []
        window = ld._window
        # marked with the holes around it (so that looked-up neighbours merge), not into data
        widened = ((k - 2) * STRIDE * PAGE + PAGE, (k + 3) * STRIDE * PAGE)
        assert list(window.beyond.overlapping(0, ld.memory_size)) == [widened], "given out: no batch gives it again"
        assert not ld.unloaded.overlap_bytes(*hull) and ld.counters.chunks_verified == 1
        assert ld.counters.bytes_waited == PAGE  # its own page, not the chunk's four
        # another chunk's, apart from it: fresh too
        off2 = off + 8 * STRIDE * PAGE
        probes.clear()
        def wait2():
            with Client.connect(state.server.path) as client:
                client.wait(off2, PAGE)

        await trio.to_thread.run_sync(wait2)
        assert probes == [] and ld.counters.chunks_verified == 2 and ld.counters.bytes_waited == 2 * PAGE
        # the chunk between the two: its marks join theirs into one interval
        off3 = off + 4 * STRIDE * PAGE
        await trio.to_thread.run_sync(_wait_one, state.server.path, off3)
        assert list(window.beyond.overlapping(0, ld.memory_size)) == [
            (widened[0], (k + 11) * STRIDE * PAGE)] and ld.counters.chunks_verified == 3
        state.stop()
        nursery.cancel_scope.cancel()


async def test_a_fresh_chunk_not_cached_or_corrupt_goes_the_usual_way(tmp_path, scattered, tiny_window,
                                                                      monkeypatch):
    """A verified wait on a fresh chunk (nobody looked there) that cannot be read at once
    (not in the page cache) is looked up and queued like any other, and one whose bytes
    do not match fails its waiter with the chunk named; neither leaves the chunk's
    memory marked looked up without its data in the sets, nor shows it loaded."""
    import shutil

    from loader import ClientError
    from loader.core._verify import Verifier

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(scattered["pages"], ckpt)
    ranges = len(open_checkpoint(scattered["raw"]).layout)
    good_k = (ranges // 4 // 2) * 4 + 1
    bad_k = good_k + 8  # another chunk's second range
    bad_file = open_checkpoint(ckpt).layout.file_offset(bad_k * STRIDE * PAGE)
    with open(os.path.join(ckpt, "pages.img"), "r+b") as f:
        f.seek(bad_file + 100)
        byte = f.read(1)
        f.seek(bad_file + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    tried: list[int] = []
    original = Verifier.verify_fresh

    def verify_fresh(self, lo, hi, span, now):
        tried.append(span[0])
        if span[0] == good_k // 4:
            return False  # as when the chunk is not in the page cache
        return original(self, lo, hi, span, now)

    monkeypatch.setattr(Verifier, "verify_fresh", verify_fresh)
    opts = options(tmp_path, ckpt, config=LoaderConfig(sweep=False, busy_linger_s=0.0))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        ld = state.loader
        expected = scattered["expected"]

        def wait(off):
            with Client.connect(state.server.path) as client:
                client.wait(off, PAGE)

        off = good_k * STRIDE * PAGE
        await trio.to_thread.run_sync(wait, off)  # looked up, queued, read, verified
        assert state.memory.view[off:off + PAGE] == expected[off:off + PAGE]
        bad = bad_k * STRIDE * PAGE
        with pytest.raises(ClientError, match="checksum"):
            await trio.to_thread.run_sync(wait, bad)
        assert tried == [good_k // 4, bad_k // 4]
        assert ld.failed.overlap_bytes(bad, bad + PAGE) == PAGE and not ld.is_loaded(bad, bad + PAGE)
        # the failed chunk went through the window like any other: looked up once, not left fresh
        assert not ld._window.fresh(bad, bad + PAGE) and not ld.unloaded.overlap_bytes(bad, bad + PAGE)
        state.stop()
        nursery.cancel_scope.cancel()


async def test_the_loaded_map_never_shows_memory_past_the_frontier_as_loaded(tmp_path, scattered, tiny_window,
                                                                            monkeypatch):
    """A client that trusts the map reads the memory file directly: a bit set past
    the frontier (where the data is not even known yet) would give it zeros."""
    monkeypatch.setattr(window_mod, "_WINDOW_HIGH", 1 << 20)  # without the sweep the scan stops at the window
    opts = options(tmp_path, scattered["raw"], config=LoaderConfig(sweep=False))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        ld = state.loader
        with trio.fail_after(30):
            while ld.frontier < SIZE:  # the scan runs ahead even without the sweep
                await trio.sleep(0.001)
        loaded_map = LoadedMap(ld)
        expected = scattered["expected"]
        for p in range(SIZE // PAGE):
            bit = loaded_map._map[p >> 3] >> (p & 7) & 1
            is_data = expected[p * PAGE:(p + 1) * PAGE] != bytes(PAGE)
            assert bit == (not is_data), p  # holes loaded (zero), data not yet: no sweep
        state.stop()

    # and before the scan has found anything: nothing past the frontier is set
    ckpt = open_checkpoint(scattered["raw"], scan=False)
    fd = ckpt.open_pages()
    from loader import MemoryFile

    mem = MemoryFile(SIZE)
    try:
        ld = Loader(FileSource(ckpt.layout, fd, extents=ckpt.extent_scanner(fd)), mem,
                               aio.open_queue("sync", 64), LoaderConfig(sweep=False))
        assert ld.frontier == 0
        m = LoadedMap(ld)
        assert bytes(m._map) == bytes(len(m._map))
        assert not ld.is_loaded(0, PAGE) and ld.not_loaded(0, SIZE) == [(0, SIZE)]
        await ld.aclose()
    finally:
        mem.close()
        os.close(fd)


def _write_fragmented(path: str, sync: bool) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, 8 << 20)
        for i in range(0, 2048, 5):
            os.pwrite(fd, b"x" * 100, i * PAGE + 7)  # partial pages: rounded out
        os.posix_fallocate(fd, 6 << 20, 1 << 20)  # an unwritten extent...
        os.pwrite(fd, b"y" * PAGE, (6 << 20) + 2 * PAGE)  # ...with data in it
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("sync", [False, True])
def test_the_fiemap_scan_finds_all_the_data_seek_data_finds(tmp_path, sync):
    """Every byte SEEK_DATA calls data is in an extent FIEMAP gives (delayed
    allocation and unwritten extents count as data), in batches of any size."""
    path = str(tmp_path / "img")
    _write_fragmented(path, sync)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        by_seek = ExtentScanner(fd, size, PAGE, fiemap=False)
        seek = []
        while not by_seek.done:
            s, e = by_seek.next_batch(1000)
            seek.extend(zip(s, e))
        for batch in (1, 7, 1 << 16):
            scanner = ExtentScanner(fd, size, PAGE)
            found: list[tuple[int, int]] = []
            while not scanner.done:
                s, e = scanner.next_batch(batch)
                assert list(s) == sorted(s) and all(a < b for a, b in zip(s, e))
                found.extend(zip(s, e))
            from loader.core._rangeset import RangeSet

            covered = RangeSet(sorted(found))
            for a, b in seek:
                assert covered.overlap_bytes(a, b) == b - a, (hex(a), hex(b), scanner.method)
            assert all(a % PAGE == 0 and b % PAGE == 0 for a, b in found)
        starts, ends = scan_extents(fd, size, PAGE)
        assert list(zip(starts, ends)) == data_extents(fd, size, PAGE)
        assert scanner.probe(0, 2 * PAGE) == [(0, PAGE)]  # the probe asks SEEK_DATA: exact
        assert scanner.probe(PAGE, 5 * PAGE) == []
    finally:
        os.close(fd)


def test_where_fiemap_is_missing_the_scan_seeks(tmp_path):
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        pytest.skip("no /dev/shm (tmpfs) on this host")
    path = os.path.join(shm, f"pageload-test-{os.getpid()}")
    try:
        _write_fragmented(path, False)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            scanner = ExtentScanner(fd, size, PAGE)
            s, e = scanner.next_batch(1 << 16)
            assert scanner.method == "seek"  # tmpfs has no FIEMAP
            assert list(zip(s, e))[:2] == [(0, PAGE), (5 * PAGE, 6 * PAGE)]
        finally:
            os.close(fd)
    finally:
        os.unlink(path)


def test_a_layout_of_a_million_ranges_is_built_and_checked_without_a_loop(tmp_path):
    """from_arrays + validate over columns: the range table is its three arrays
    (two for a raw image), and a broken one is still named by range."""
    from loader import Layout, LayoutError

    n = 1 << 20
    mem = array("Q", range(0, n * 4 * PAGE, 4 * PAGE))
    length = array("Q", [PAGE]) * n
    raw = Layout.from_arrays(n * 4 * PAGE, PAGE, mem, length)
    raw.validate(n * 4 * PAGE)
    # page numbers, 4 bytes each: 8 bytes a range (a raw image's two columns), 12 with a file column
    assert raw.identity_mapped and raw.table_bytes() == 8 * n and raw.data_bytes == n * PAGE
    assert raw.mem_pages.typecode == raw.len_pages.typecode == "I"
    packed = Layout.from_arrays(n * 4 * PAGE, PAGE, mem, length, array("Q", range(0, n * PAGE, PAGE)))
    packed.validate(n * PAGE)
    assert packed.prefix() is packed.file_pages and packed.table_bytes() == 12 * n
    assert packed.byte_column("mem") == mem and packed.byte_column("length") == length
    assert packed[n - 1] == ((n - 1) * 4 * PAGE, PAGE, (n - 1) * PAGE) and packed.find((n - 1) * 4 * PAGE + 5) == n - 1
    bad = array("Q", mem)
    bad[n // 2] = bad[n // 2 - 1]
    with pytest.raises(LayoutError, match=f"range {n // 2} at memory"):
        Layout.from_arrays(n * 4 * PAGE, PAGE, bad, length).validate()
    # checked a block at a time: an overlap just across a block's edge is still found
    import tracemalloc

    import loader.core._layout as layout_mod

    edge = layout_mod._CHECK_BLOCK
    bad = array("Q", mem)
    bad[edge] = bad[edge - 1]
    with pytest.raises(LayoutError, match=f"range {edge} at memory"):
        Layout.from_arrays(n * 4 * PAGE, PAGE, bad, length).validate()
    file = array("Q", range(0, n * PAGE, PAGE))
    file[edge] = file[edge - 1]
    with pytest.raises(LayoutError, match="pages-file spans .* overlap"):
        Layout.from_arrays(n * 4 * PAGE, PAGE, mem, length, file).validate()
    # and its temporaries stay small beside the columns (12 MiB here): a block at a time,
    # in buffers reused from block to block; so do those of finding the layout packed
    again = Layout.from_pages(packed.memory_size, PAGE, packed.mem_pages, packed.len_pages, packed.file_pages)
    tracemalloc.start()
    try:
        packed.validate(n * PAGE)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert again.prefix() is again.file_pages
        _, prefix_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * 2**20, f"validate's temporaries peaked at {peak / 2**20:.1f} MiB for {n} ranges"
    assert prefix_peak < 1.5 * 2**20, f"prefix()'s temporaries peaked at {prefix_peak / 2**20:.1f} MiB for {n} ranges"


def test_page_numbers_past_32_bits_take_wide_columns_and_bytes_must_be_page_aligned():
    """The range table's columns are page numbers: 32-bit up to 16 TiB of 4 KiB pages,
    64-bit beyond (a column is widened where one of its numbers needs it), the same
    bytes either way; a byte offset that is not page-aligned cannot be a page number."""
    from loader import Layout, LayoutError

    big = 1 << 46  # 64 TiB: page numbers up to 2**34
    ranges = [(0, PAGE, 0), ((1 << 45) + PAGE, 2 * PAGE, PAGE), (big - PAGE, PAGE, 3 * PAGE)]
    wide = Layout(big, PAGE, ranges)
    wide.validate(4 * PAGE)
    assert list(wide) == ranges and wide.mem_pages.typecode == "Q"
    assert wide.len_pages.typecode == wide.file_pages.typecode == "I"  # (their numbers are small)
    assert wide.find((1 << 45) + 2 * PAGE + 7) == 1 and wide.find(1 << 45) == -1
    assert wide.file_offset(big - 1) == 4 * PAGE - 1 and list(wide.data_in(0, big)) == [
        (m, m + n) for m, n, _ in ranges]
    assert wide.byte_column("mem") == array("Q", [m for m, _, _ in ranges])
    # a raw image's identity (its working sets name it) is still that of its byte offsets
    import xxhash

    from loader.core._identity import layout_digest

    old = xxhash.xxh3_64(array("Q", [m for m, _, _ in ranges]).tobytes())
    old.update(array("Q", [n for _, n, _ in ranges]).tobytes())
    assert layout_digest(wide) == old.intdigest()
    with pytest.raises(LayoutError, match=r"range 1 \(memory 0x2000\+0x1001 at file 0x1000\) is not page-aligned"):
        Layout(16 * PAGE, PAGE, [(0, PAGE, 0), (2 * PAGE, PAGE + 1, PAGE)])
    with pytest.raises(LayoutError, match="page size 3000 is not a power of two"):
        Layout(16 * PAGE, 3000, [])


class _SlowScanner:
    """A blocking extent source whose batch, in its worker thread, says it is done
    before it returns (as the FIEMAP scanner's last batch does), then waits."""

    blocking = True
    exact_total = False

    def __init__(self, size: int, data: list[tuple[int, int]]) -> None:
        import threading

        self.size, self.data, self.offset = size, data, 0
        self.release = threading.Event()
        self.entered = threading.Event()

    @property
    def done(self) -> bool:
        return self.offset >= self.size

    def next_batch(self, max_extents: int) -> tuple[array[int], array[int]]:
        self.offset = self.size  # done, as far as anyone asking the source can tell...
        self.entered.set()
        self.release.wait(30)  # ...while the batch is not in the loader's sets yet
        return array("Q", [a for a, _ in self.data]), array("Q", [b for _, b in self.data])

    def probe(self, lo: int, hi: int) -> list[tuple[int, int]]:
        return [(max(lo, a), min(hi, b)) for a, b in self.data if a < hi and b > lo]


async def test_the_loader_is_not_done_before_the_last_batch_is_in(tmp_path, scattered):
    """A wait settles while the scan's last batch is still in its worker thread: the
    source already says done, but its data is not loaded; the loader must not say done."""
    ckpt = open_checkpoint(scattered["raw"], scan=False)
    fd = ckpt.open_pages()
    from loader import MemoryFile

    data = [(off, off + PAGE) for off in range(0, SIZE, STRIDE * PAGE)]
    source = _SlowScanner(SIZE, data)
    mem = MemoryFile(SIZE)
    try:
        ld = Loader(FileSource(ckpt.layout, fd, extents=source), mem, aio.open_queue("threads", 64),
                               LoaderConfig())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ld.run)
            await trio.to_thread.run_sync(source.entered.wait, 30)
            await ld.wait_loaded(STRIDE * PAGE * 7, PAGE)  # a wait past the frontier, loaded and settled
            assert source.done and not ld.done.is_set()
            source.release.set()
            with trio.fail_after(30):
                await ld.done.wait()
        assert mem.view == scattered["expected"]
        assert ld.statistics().total_bytes == len(data) * PAGE
        await ld.aclose()
    finally:
        mem.close()
        os.close(fd)


def _uring_unavailable() -> str | None:
    try:
        aio.check_available("uring")  # probes in a child process
    except aio.BackendUnavailable as exc:
        return str(exc)
    return None


_NO_URING = _uring_unavailable()


@pytest.mark.parametrize("backend", [
    "threads", "sync",
    pytest.param("uring", marks=pytest.mark.skipif(_NO_URING is not None,
                                                   reason=f"io_uring unavailable here: {_NO_URING}")),
])
async def test_a_raw_image_read_into_the_mapping_takes_many_ranges_a_read(tmp_path, scattered, backend):
    """Without copies in the kernel (``--no-kernel-copy``, or a backend without them:
    io_uring), a raw image's data islands are still gathered many to a request
    (``aio.Op.GATHER``), not one request a range (at a million ranges that was 45-75 s
    instead of about 7), and land byte-exact."""
    opts = options(tmp_path, scattered["raw"], aio_backend=backend,
                   config=LoaderConfig(kernel_copy=False, busy_linger_s=0.0))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        ld = state.loader
        with trio.fail_after(30):
            await ld.done.wait()
        assert state.memory.view == scattered["expected"]
        ranges = len(open_checkpoint(scattered["raw"]).layout)
        stats = ld.statistics()
        assert stats.loaded_bytes == ranges * PAGE
        assert stats.reads_total * 8 <= ranges, f"{stats.reads_total} reads for {ranges} ranges"
        state.stop()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("rings", "direct"), [(True, False), (False, False), (True, True)])
async def test_a_raw_images_gathers_read_by_address_into_the_memory_file(tmp_path, scattered, monkeypatch, rings,
                                                                         direct):
    """The loader gives a raw image's gathers the memory file's mapping (``within``), so
    the threads backend reads a batch of ranges with one system call (aio._batch); where
    rings cannot be used, the same gathers read range by range.  Byte-exact either way,
    and with ``--direct`` (O_DIRECT reads through the ring) too."""
    from aio import _batch

    if rings and _batch.unavailable() is not None:
        pytest.skip(f"io_uring rings cannot be used here: {_batch.unavailable()}")
    if not rings:
        monkeypatch.setattr(_batch, "_reason", ["io_uring is disabled on this host"])
    monkeypatch.setattr(_batch, "_local", type(_batch._local)())
    gathers: list[bool] = []

    class Recording(aio.testing.DelayedQueue):
        def _add(self, request):
            if request.op == aio.Op.GATHER:
                gathers.append(request.within is not None and request.within.obj is state.memory.view.obj)
            super()._add(request)

    opts = options(tmp_path, scattered["raw"], aio_backend="threads", wrap_queue=lambda q: Recording(q, 0.0),
                   config=LoaderConfig(kernel_copy=False, busy_linger_s=0.0), direct=direct)
    state = None
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        with trio.fail_after(30):
            await state.loader.done.wait()
        assert state.memory.view == scattered["expected"]
        assert gathers and all(gathers)
        assert state.loader.queue.inner.gather_threads == (aio.usable_cpus() if rings else 1)
        if direct:  # (not fallen back to buffered reads: the image's file system takes O_DIRECT)
            assert state.source.local.direct
            assert fcntl.fcntl(state.source.local.fd, fcntl.F_GETFL) & os.O_DIRECT
        state.stop()
        nursery.cancel_scope.cancel()


def test_a_gathered_reads_segments_are_made_only_when_looked_at():
    """A gathered read keeps its segments as two columns; looking at them gives the
    same ``[lo, hi]`` lists a plain read has (index, negative index, slice, iteration)."""
    segs = Segs(array("Q", [0, 8192, 20480]), array("Q", [4096, 4096, 8192]))
    want = [[0, 4096], [8192, 12288], [20480, 28672]]
    assert len(segs) == 3 and list(segs) == want
    assert segs[0] == want[0] and segs[-1] == want[-1] and segs[1:] == want[1:] and segs[::2] == want[::2]
    assert sorted(segs) == want


@pytest.mark.parametrize("kernel_copy", [True, False])
@pytest.mark.parametrize("backend", [
    "threads", "sync",
    pytest.param("uring", marks=pytest.mark.skipif(_NO_URING is not None,
                                                   reason=f"io_uring unavailable here: {_NO_URING}")),
])
async def test_a_pages_checkpoints_packed_reads_take_many_ranges_and_no_more_than_the_backend_takes(
        tmp_path, scattered, backend, kernel_copy, monkeypatch):
    """A pages checkpoint packs its ranges one after the other, so one read scatters
    many of them (a readv of many buffers into the mapping, copies in the kernel or
    not: small ranges are not worth a splice each); no read has more buffers than its backend
    takes (``Queue.max_buffers``: liburing's binding takes 60, not the kernel's 1024,
    and a restore from a pages checkpoint on io_uring died of an OverflowError)."""
    most = []
    original = aio.Queue.add

    def add(self, request):
        most.append(len(request.buffers) or len(request.dest))  # (a copy's ranges have no buffers)
        assert len(request.buffers) <= self.max_buffers
        return original(self, request)

    monkeypatch.setattr(aio.Queue, "add", add)
    opts = options(tmp_path, scattered["pages"], aio_backend=backend,
                   config=LoaderConfig(kernel_copy=kernel_copy, busy_linger_s=0.0))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        ld = state.loader
        with trio.fail_after(30):
            await ld.done.wait()
        assert state.memory.view == scattered["expected"]
        ranges = len(open_checkpoint(scattered["raw"]).layout)
        assert ld.statistics().loaded_bytes == ranges * PAGE
        stats = ld.statistics()
        assert stats.reads_total * 2 <= ranges, f"{stats.reads_total} reads for {ranges} ranges"
        # one-page ranges: one preadv into the mapping, not a splice a range (which
        # threads cannot do side by side: 10.1 s against 5.1 s at a million ranges)
        assert stats.reads_copied == 0
        state.stop()
        nursery.cancel_scope.cancel()
    assert max(most) > 1


def _random_packed(rng, count):
    """A random scattered layout (ranges of 1-9 pages, holes of 0-3: some ranges touch)
    and its memory image."""
    from loader.core._layout import Layout

    table, mem_at, file_at = [], 0, 0
    for _ in range(count):
        mem_at += rng.randrange(0, 4) * PAGE
        n = rng.randrange(1, 10) * PAGE
        table.append((mem_at, n, file_at))
        mem_at += n
        file_at += n
    layout = Layout(mem_at + PAGE, PAGE, table)
    memory = bytearray(layout.memory_size)
    for m, n, _ in table:
        memory[m:m + n] = rng.randbytes(n)
    return layout, table, memory


@pytest.mark.parametrize("seed", range(4))
def test_a_chunks_spans_as_columns_are_its_spans(seed):
    """``_Chunks.span_columns`` (NumPy over the table, for a run of chunks) gives what
    ``file_spans`` (the table walked range by range) gives, for any stretch of the
    pages file, touching ranges kept apart as the table has them."""
    import random

    from loader.core._chunks import _Chunks

    rng = random.Random(seed)
    layout, table, _ = _random_packed(rng, rng.randrange(1, 300))
    end = table[-1][2] + table[-1][1]
    chunks = _Chunks(layout, PAGE, array("Q", [0]) * (end // PAGE))
    for _ in range(200):
        a = rng.randrange(0, end // PAGE)
        b = rng.randrange(a + 1, end // PAGE + 1)
        los, his = chunks.span_columns(a * PAGE, b * PAGE)
        assert list(zip(los.tolist(), his.tolist())) == chunks.file_spans(a * PAGE, b * PAGE), (seed, a, b)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("verify", [True, False])
async def test_a_random_pages_checkpoint_restores_byte_exact_whatever_the_read_size(tmp_path, seed, verify):
    """Packed sweep reads (the ranges taken from the table as columns) over a random
    layout, ranges touching in memory or not, read sizes cutting ranges anywhere,
    chunks of one or several pages: every byte lands, right, verified or not."""
    import random

    import xxhash

    from loader.checkpoint._index import IndexFields, encode_index

    rng = random.Random(seed)
    layout, table, memory = _random_packed(rng, 400)
    packed = b"".join(bytes(memory[m:m + n]) for m, n, _ in table)
    size = rng.choice([1, 2, 5]) * PAGE
    sums = array("Q", [xxhash.xxh3_64_intdigest(packed[k:k + size]) for k in range(0, len(packed), size)])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "pages.img").write_bytes(packed)
    (ckpt / "index.msgpack").write_bytes(encode_index(IndexFields(
        PAGE, layout.memory_size, len(packed), layout.mem_pages, layout.len_pages, layout.file_pages, size, sums, {})))
    read_size = rng.choice([3, 7, 16]) * PAGE + rng.choice([0, PAGE // 2])
    opts = options(tmp_path, str(ckpt), config=LoaderConfig(verify=verify, sweep_read_size=read_size))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        with trio.fail_after(30):
            await state.loader.done.wait()
        assert state.memory.view == memory
        stats = state.loader.statistics()
        assert stats.loaded_bytes == len(packed) and stats.chunks_verified == (len(sums) if verify else 0)
        state.stop()
        nursery.cancel_scope.cancel()
