"""Verified pages checkpoints at wait speed (issue 20, item 5).

A wait reads and hashes only its small checksum chunk (16 KiB by default, not
1 MiB); a corrupt chunk is never served, whichever path hashed it: read and hashed
in the waiting task (``_verify_now``), hashed on landing because a waiter needs it,
hashed by the backend's thread right after a background read
(``aio.Request.then``), hashed by the loader's hash thread (chunks cut by a read's
ends; backends that do not call ``then``), or taken out of the hash queue by a
wait.  Old checkpoints (1 MiB chunks, checksums as a msgpack array) still open,
verify and restore.

Threads are real here (the threads backend, the hash thread, a daemon process):
generous deadlines only, no timing assertions.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import random
import threading

import msgpack
import pytest
import trio
import xxhash

import aio
import aio.testing
from aio._sync import SyncQueue
from loader import Client, ClientError, Loader, LoaderConfig, LoadError, MemoryFile
from loader.checkpoint import DEFAULT_CHUNK_SIZE, create_checkpoint, open_checkpoint, verify_checkpoint
from loader.core._chunks import _c_xxh3, _Chunks
from loader.core._layout import Layout
from loader.source import FileSource
from protocol import codes
from workloads import DaemonProcess

PAGE = 4096
KiB = 1 << 10
MiB = 1 << 20
CHUNK = DEFAULT_CHUNK_SIZE
BAD = 5  # the chunk with a flipped byte


def _make(tmp_path, size: int = MiB, chunk_size: int | None = None, flip: int | None = BAD):
    """A pages checkpoint of ``size`` bytes of random data (one range); with ``flip``,
    one byte of that chunk flipped.  Returns (checkpoint dir, the image's bytes)."""
    raw = tmp_path / "raw.img"
    data = random.Random(size).randbytes(size)
    raw.write_bytes(data)
    out = str(tmp_path / "ckpt")
    if chunk_size is None:
        create_checkpoint(str(raw), out)
    else:
        create_checkpoint(str(raw), out, chunk_size=chunk_size)
    if flip is not None:
        at = flip * open_checkpoint(out).chunk_size + 1234
        with open(os.path.join(out, "pages.img"), "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x01]))
    return out, data


class Recording(SyncQueue):
    """The sync backend, recording each request's (file offset, length)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.requests: list[tuple[int, int]] = []

    def _add(self, request: aio.Request) -> None:
        self.requests.append((request.offset, request.length))
        super()._add(request)


class NoThen(aio.testing.DelayedQueue):
    """Passes requests on without their ``then``: as a backend that never calls it,
    so every chunk goes to the loader's hash thread (or is hashed on landing)."""

    def __init__(self, inner: aio.Queue) -> None:
        super().__init__(inner, 0)

    def _add(self, request: aio.Request) -> None:
        super()._add(dataclasses.replace(request, then=None))




def _loader(opened, ckpt_dir: str, queue: aio.Queue, **config) -> tuple[Loader, MemoryFile]:
    ck = open_checkpoint(ckpt_dir)
    fd = ck.open_pages()
    opened[0].append(fd)
    mem = MemoryFile(ck.layout.memory_size)
    opened[1].append(mem)
    cfg = LoaderConfig(**{"queue_depth": queue.capacity, "background_reads": 4, "sweep_read_size": 256 * KiB,
                          "busy_background_reads": 2, **config})
    return Loader(FileSource(ck.layout, fd, chunk_size=ck.chunk_size, checksums=ck.checksums), mem, queue, cfg), mem


def _queue(backend: str) -> aio.Queue:
    if backend == "no-then":
        return NoThen(aio.open_queue("sync", 16))
    return aio.open_queue(backend, 16)


def _check_corrupt(err: LoadError | ClientError, chunk: int = BAD) -> None:
    assert err.code == codes.CORRUPT, err
    assert f"chunk {chunk} of the pages file does not match its checksum" in err.message


# -- the format ------------------------------------------------------------------------
def test_new_checkpoints_have_small_chunks_and_compact_checksums(tmp_path):
    ckpt, _ = _make(tmp_path, flip=None)
    ck = open_checkpoint(ckpt)
    assert ck.chunk_size == CHUNK == 16 * KiB
    assert ck.checksums is not None and len(ck.checksums) == MiB // CHUNK
    with open(os.path.join(ckpt, "index.msgpack"), "rb") as f:
        raw = msgpack.unpackb(f.read())
    assert isinstance(raw["checksums"], bytes) and len(raw["checksums"]) == 8 * len(ck.checksums)
    assert verify_checkpoint(ckpt).ok


def _as_old_format(ckpt_dir: str) -> None:
    """Rewrite the index as the code before 16 KiB chunks wrote it: checksums as a
    msgpack array of integers."""
    path = os.path.join(ckpt_dir, "index.msgpack")
    with open(path, "rb") as f:
        index = msgpack.unpackb(f.read())
    index["checksums"] = list(open_checkpoint(ckpt_dir).checksums or [])
    with open(path, "wb") as f:
        f.write(msgpack.packb(index))


def test_old_format_with_1mib_chunks_opens_verifies_and_names_the_bad_chunk(tmp_path):
    ckpt, _ = _make(tmp_path, size=4 * MiB, chunk_size=MiB, flip=None)
    _as_old_format(ckpt)
    with open(os.path.join(ckpt, "index.msgpack"), "rb") as f:
        assert isinstance(msgpack.unpackb(f.read())["checksums"], list)
    ck = open_checkpoint(ckpt)
    assert ck.chunk_size == MiB and ck.checksums is not None and len(ck.checksums) == 4
    assert verify_checkpoint(ckpt).ok
    with open(os.path.join(ckpt, "pages.img"), "r+b") as f:
        f.seek(2 * MiB + 77)
        f.write(b"\xff\x00")
    report = verify_checkpoint(ckpt)
    assert [b.index for b in report.bad_chunks] == [2]
    assert report.bad_chunks[0].memory == ((2 * MiB, 3 * MiB),)


@pytest.mark.parametrize("backend", ["sync", "threads"])
async def test_old_format_with_1mib_chunks_restores_and_never_serves_its_bad_chunk(tmp_path, opened, backend):
    ckpt, data = _make(tmp_path, size=4 * MiB, chunk_size=MiB, flip=2)
    _as_old_format(ckpt)
    loader, mem = _loader(opened, ckpt, aio.open_queue(backend, 16))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60), pytest.raises(LoadError) as info:
            await loader.wait_loaded(2 * MiB + 5 * PAGE, PAGE)
        _check_corrupt(info.value, 2)
        with trio.fail_after(60):
            await loader.wait_loaded(3 * MiB, PAGE)
            await loader.done.wait()
    s = loader.statistics()
    assert s.failed_ranges == [(2 * MiB, MiB, 0)] and s.corrupt_chunks == 1 and s.chunks_verified == 3
    assert mem.view[: 2 * MiB] == data[: 2 * MiB] and mem.view[3 * MiB :] == data[3 * MiB :]
    await loader.aclose()


# -- a wait reads its small chunk ------------------------------------------------------
async def test_a_waiters_read_covers_only_its_small_chunk(tmp_path, opened):
    """Nothing else loads (no sweep): the wait reads its 16 KiB chunk, not 1 MiB."""
    ckpt, data = _make(tmp_path, flip=None)
    queue = Recording(16)
    loader, mem = _loader(opened, ckpt, queue, sweep=False)
    at = 37 * PAGE  # in chunk 9 (pages 36-39)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60):
            await loader.wait_loaded(at, PAGE)
        assert queue.requests == [(9 * CHUNK, CHUNK)]
        s = loader.statistics()
        assert s.loaded_bytes == CHUNK and s.chunks_verified == 1
        assert mem.view[9 * CHUNK : 10 * CHUNK] == data[9 * CHUNK : 10 * CHUNK]
        nursery.cancel_scope.cancel()
    await loader.aclose()


async def test_a_small_verified_wait_is_read_and_hashed_at_once(tmp_path, opened):
    """The threads backend reads a cached chunk in the waiting task: no request, no
    round of the loader's loop (submit_wait returns None: served), only its chunk."""
    ckpt, data = _make(tmp_path, flip=None)
    with open(os.path.join(ckpt, "pages.img"), "rb") as f:
        f.read()  # in the page cache
    async with trio.open_nursery() as nursery:
        loader, mem = _loader(opened, ckpt, aio.open_queue("threads", 16), sweep=False)
        nursery.start_soon(loader.run)
        handle = loader.submit_wait(37 * PAGE, PAGE, lambda h: None)
        assert handle is None
        s = loader.statistics()
        assert s.loaded_bytes == CHUNK and s.chunks_verified == 1 and s.waits_served == 1
        assert mem.view[9 * CHUNK : 10 * CHUNK] == data[9 * CHUNK : 10 * CHUNK]
        nursery.cancel_scope.cancel()
    await loader.aclose()


# -- a corrupt chunk is never served -----------------------------------------------------
@pytest.mark.parametrize("backend", ["sync", "threads", "no-then"])
@pytest.mark.parametrize("first", ["wait in the bad chunk", "sweep only", "wait without sweep"])
async def test_corrupt_small_chunk_is_never_served(tmp_path, opened, backend, first):
    """Only the bad 16 KiB fail; the chunks around it load.  ``sync``: the waiter's
    read lands and is hashed in the loader's task, the sweep's in ``then``;
    ``threads``: read and hashed in the waiting task, the sweep's in the pool's
    threads; ``no-then``: the sweep's chunks in the loader's hash thread."""
    ckpt, data = _make(tmp_path)
    loader, mem = _loader(opened, ckpt, _queue(backend), sweep=first != "wait without sweep")
    bad_lo = BAD * CHUNK
    errors: list[LoadError] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60):
            if first != "sweep only":
                with pytest.raises(LoadError) as info:
                    await loader.wait_loaded(bad_lo + 3 * PAGE, PAGE)
                errors.append(info.value)
                for k in (BAD - 1, BAD + 1):  # the neighbours are served
                    await loader.wait_loaded(k * CHUNK, CHUNK)
                    assert mem.view[k * CHUNK : (k + 1) * CHUNK] == data[k * CHUNK : (k + 1) * CHUNK]
                if first == "wait without sweep":
                    assert loader.statistics().loaded_bytes == 2 * CHUNK
                    nursery.cancel_scope.cancel()
            if first != "wait without sweep":
                await loader.done.wait()
    s = loader.statistics()
    assert s.failed_ranges == [(bad_lo, CHUNK, 0)] and s.corrupt_chunks == 1
    if first != "wait without sweep":
        assert s.loaded_bytes == MiB - CHUNK and s.chunks_verified == MiB // CHUNK - 1
        assert mem.view[:bad_lo] == data[:bad_lo] and mem.view[bad_lo + CHUNK :] == data[bad_lo + CHUNK :]
    with pytest.raises(LoadError) as later:
        loader.submit_wait(bad_lo + CHUNK - PAGE, PAGE, lambda h: None)
    for err in [*errors, later.value]:
        _check_corrupt(err)
    await loader.aclose()


@pytest.mark.parametrize("backend", ["sync", "threads", "no-then"])
@pytest.mark.parametrize("first", ["wait in the bad chunk", "sweep only"])
async def test_corrupt_chunk_over_many_ranges_is_never_served(tmp_path, opened, backend, first):
    """Every other page is zero, so each range is one page and a 16 KiB chunk holds
    four of them, spread over 32 KiB of memory: the bad chunk's four pages fail, the
    pages between them (holes) and every other chunk load."""
    raw = tmp_path / "raw.img"
    data = bytearray(random.Random(7).randbytes(MiB))
    for page in range(1, MiB // PAGE, 2):
        data[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
    raw.write_bytes(bytes(data))
    ckpt = str(tmp_path / "ckpt")
    create_checkpoint(str(raw), ckpt)
    assert len(open_checkpoint(ckpt).layout) == MiB // PAGE // 2
    with open(os.path.join(ckpt, "pages.img"), "r+b") as f:
        f.seek(BAD * CHUNK + 2 * PAGE + 99)  # chunk 5's third page: memory page 2 * (4 * 5 + 2)
        byte = f.read(1)
        f.seek(BAD * CHUNK + 2 * PAGE + 99)
        f.write(bytes([byte[0] ^ 0x80]))
    bad_pages = [2 * (4 * BAD + i) * PAGE for i in range(4)]
    loader, mem = _loader(opened, ckpt, _queue(backend))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60):
            if first != "sweep only":
                with pytest.raises(LoadError) as info:
                    await loader.wait_loaded(bad_pages[0], PAGE)
                _check_corrupt(info.value)
            await loader.done.wait()
    s = loader.statistics()
    assert s.failed_ranges == [(p, PAGE, 0) for p in bad_pages] and s.corrupt_chunks == 1
    assert s.loaded_bytes == MiB // 2 - CHUNK
    got = bytearray(mem.view[:MiB])
    for p in bad_pages:  # (what landed there is failed: never served)
        got[p : p + PAGE] = data[p : p + PAGE]
    assert got == data
    for p in bad_pages:
        with pytest.raises(LoadError) as later:
            loader.submit_wait(p, PAGE, lambda h: None)
        _check_corrupt(later.value)
    await loader.aclose()


async def test_a_wait_takes_its_chunks_out_of_the_hash_queue(tmp_path, opened, monkeypatch):
    """Chunks that landed and wait for the (here: held) hash thread: a wait hashes
    its own at once, in its task; a corrupt one fails it, a good one serves it."""
    gate = threading.Event()
    check = _Chunks.check

    def held_in_the_hash_thread(self, destination, runs, *polite):
        if threading.current_thread().name == "pageload-hash":
            gate.wait(60)
        return check(self, destination, runs, *polite)

    monkeypatch.setattr(_Chunks, "check", held_in_the_hash_thread)
    bad = 200  # past the first batches the hash thread is given (and holds)
    ckpt, data = _make(tmp_path, size=4 * MiB, flip=bad)
    loader, mem = _loader(opened, ckpt, _queue("no-then"))
    chunks = loader._verifier.chunks
    assert chunks is not None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader.run)
            with trio.fail_after(60):
                while not {bad, bad + 2} <= chunks.queued:
                    await trio.sleep(0.001)
            assert loader.statistics().loaded_bytes == 0  # nothing hashed yet
            with pytest.raises(LoadError) as info:
                loader.submit_wait(bad * CHUNK, PAGE, lambda h: None)
            _check_corrupt(info.value, bad)
            assert loader.submit_wait((bad + 2) * CHUNK + PAGE, PAGE, lambda h: None) is None  # served
            assert mem.view[(bad + 2) * CHUNK : (bad + 3) * CHUNK] == data[(bad + 2) * CHUNK : (bad + 3) * CHUNK]
            assert bad not in chunks.queued and bad + 2 not in chunks.queued
            s = loader.statistics()
            assert s.corrupt_chunks == 1 and s.chunks_verified == 1 and s.loaded_bytes == CHUNK
            gate.set()
            with trio.fail_after(60):
                await loader.done.wait()
    finally:
        gate.set()
    s = loader.statistics()
    assert s.failed_ranges == [(bad * CHUNK, CHUNK, 0)] and s.loaded_bytes == 4 * MiB - CHUNK
    await loader.aclose()


def test_corrupt_small_chunk_is_never_served_by_a_daemon(tmp_path):
    """Through a real daemon and its socket: a wait in the bad chunk gets ``corrupt``,
    the chunks beside it are served with the image's bytes, and only 16 KiB fail."""
    ckpt, data = _make(tmp_path, size=4 * MiB)
    bad_lo = BAD * CHUNK
    sock = str(tmp_path / "s.sock")
    daemon = DaemonProcess(ckpt, sock, str(tmp_path / "log"), ["--background", "--aio", "threads"])
    with daemon, Client.connect(sock) as client:
        with pytest.raises(ClientError) as info:
            client.wait(bad_lo + 2 * PAGE, PAGE)
        _check_corrupt(info.value)
        client.wait(bad_lo - PAGE, PAGE)
        client.wait(bad_lo + CHUNK, PAGE)
        for _ in range(6000):
            s = client.stats()
            if s["done"]:
                break
            threading.Event().wait(0.01)
        else:
            pytest.fail(f"the load did not finish: {s}")
        with pytest.raises(ClientError) as again:
            client.wait(bad_lo + CHUNK - PAGE, PAGE)
        _check_corrupt(again.value)
        fd = client.memory_fd()
        try:
            with mmap.mmap(fd, 4 * MiB, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                assert m[:bad_lo] == data[:bad_lo] and m[bad_lo + CHUNK :] == data[bad_lo + CHUNK :]
        finally:
            os.close(fd)
    assert s["failed_bytes"] == CHUNK and s["corrupt_chunks"] == 1
    assert s["chunks_verified"] == 4 * MiB // CHUNK - 1


async def test_a_batch_the_hash_thread_cannot_hash_fails_instead_of_hanging(tmp_path, opened, monkeypatch):
    """Every request gets an answer: chunks whose hash raised (a bug, memory unmapped)
    fail with ``io-error``, the rest load, and the load finishes."""
    check = _Chunks.check

    def broken_in_the_hash_thread(self, destination, runs, *polite):
        if threading.current_thread().name == "pageload-hash":
            raise RuntimeError("simulated")
        return check(self, destination, runs, *polite)

    monkeypatch.setattr(_Chunks, "check", broken_in_the_hash_thread)
    ckpt, data = _make(tmp_path, flip=None)
    loader, mem = _loader(opened, ckpt, _queue("no-then"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with trio.fail_after(60):
            await loader.done.wait()
    s = loader.statistics()
    assert s.failed_bytes > 0 and s.failed_bytes + s.loaded_bytes == MiB
    with pytest.raises(LoadError) as info:
        loader.submit_wait(s.failed_ranges[0][0], PAGE, lambda h: None)
    assert info.value.code == codes.IO_ERROR and "could not be hashed (RuntimeError: simulated)" in info.value.message
    await loader.aclose()


@pytest.mark.parametrize("where", ["nobody faulting", "clients faulting, no libxxhash", "clients faulting"])
def test_check_finds_the_same_in_every_way_it_hashes(tmp_path, opened, where, monkeypatch):
    """The chunk hash is the same whichever way check() takes: the ``xxhash`` module
    (nobody faulting; or clients faulting, letting the GIL go after each chunk) or the
    C library through ctypes (clients faulting, where there is one: ``_C_XXH3``), on
    one stretch of memory and on chunks over many ranges."""
    import loader.core._chunks as impl

    if where == "clients faulting, no libxxhash":
        monkeypatch.setattr(impl, "_C_XXH3", None)
    for ckpt_name, flip in (("dense", BAD), ("scattered", 2)):
        raw = tmp_path / f"{ckpt_name}.img"
        data = bytearray(random.Random(3).randbytes(MiB))
        if ckpt_name == "scattered":
            for page in range(1, MiB // PAGE, 2):
                data[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
        raw.write_bytes(bytes(data))
        out = str(tmp_path / f"{ckpt_name}-ckpt")
        create_checkpoint(str(raw), out)
        ck = open_checkpoint(out)
        fd = ck.open_pages()
        opened[0].append(fd)
        mem = MemoryFile(ck.layout.memory_size)
        opened[1].append(mem)
        chunks = _Chunks(ck.layout, ck.chunk_size, ck.checksums)
        for m, n, f in ((r.mem_offset, r.length, r.file_offset) for r in ck.layout):
            mem.view[m : m + n] = os.pread(fd, n, f)
        at = ck.layout[0].mem_offset + flip * CHUNK if ckpt_name == "dense" else 2 * (4 * flip) * PAGE
        mem.view[at] ^= 0x10
        count = len(ck.checksums)
        polite = (lambda: False) if where == "nobody faulting" else (lambda: True)
        good, verified, bad = chunks.check(mem, [(0, count // 2 - 1), (count // 2, count - 1)], polite)
        assert verified == count - 1 and [k for k, _ in bad] == [flip]
        assert sum(hi - lo for lo, hi in good) + sum(b - a for a, b in bad[0][1]) == ck.layout.data_bytes


async def test_a_long_wait_whose_chunks_jump_the_hash_queue_is_answered(tmp_path, opened, monkeypatch):
    """A wait too long to hash in its task puts its queued chunks first in the hash
    queue, so the hash thread's next batch holds them before lower chunks: the memory
    it verified is out of memory order, and settling it must still find the waiter
    (the loader's settle looks for waiters between the first segment and the last)."""
    gate = threading.Event()
    check = _Chunks.check

    def held_in_the_hash_thread(self, destination, runs, *polite):
        if threading.current_thread().name == "pageload-hash":
            gate.wait(60)
        return check(self, destination, runs, *polite)

    monkeypatch.setattr(_Chunks, "check", held_in_the_hash_thread)
    ckpt, data = _make(tmp_path, size=4 * MiB, flip=None)
    loader, mem = _loader(opened, ckpt, _queue("no-then"))
    chunks = loader._verifier.chunks
    assert chunks is not None
    first, count = 200, 16  # 256 KiB: past what a wait hashes in its task
    wanted = set(range(first, first + count)) | {first - 40}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader.run)
            with trio.fail_after(60):
                while not wanted <= chunks.queued:
                    await trio.sleep(0.001)
            handle = loader.submit_wait(first * CHUNK, count * CHUNK, lambda h: None)
            assert handle is not None and not handle.finished
            gate.set()
            with trio.fail_after(60):
                await loader.wait_loaded(first * CHUNK, count * CHUNK)
                await loader.done.wait()
            assert handle.finished and handle.error is None
    finally:
        gate.set()
    assert mem.view[: 4 * MiB] == data
    assert loader.statistics().loaded_bytes == 4 * MiB
    await loader.aclose()


@pytest.mark.parametrize("polite", [False, True])
def test_check_matches_and_chunk_spans_agree_with_the_layout_page_by_page(tmp_path, opened, polite):
    """Every chunk's memory, its verdict and the good memory around a corrupt chunk,
    against the layout walked page by page: a dense image (its last chunk short, a zero
    page after it), a scattered one (each chunk over several stretches of memory), one
    of islands (chunks inside a stretch and across two) and a scattered one whose last
    chunk is one lone page; the corrupt chunk first, in the middle of a run and last;
    the runs whole, split at the corrupt chunk and a chunk each; the good memory merged
    across runs; matches() for every chunk; chunk_range() for windows anywhere."""
    for ckpt_name in ("dense", "scattered", "islands", "lone-tail"):
        raw = tmp_path / f"{ckpt_name}.img"
        data = bytearray(random.Random(5).randbytes(MiB))
        for page in range(MiB // PAGE):
            # scattered: a page every 3 (every chunk over 4 stretches); islands: 6 pages of
            # every 8 (chunks inside one island, and chunks across two, their good memory
            # merged); lone-tail: scattered less its last page (85 pages: a last chunk of
            # one page, right after a chunk that ends with the stretch before it)
            if ((ckpt_name in ("scattered", "lone-tail") and page % 3) or (ckpt_name == "islands" and page % 8 >= 6)
                    or (ckpt_name in ("dense", "lone-tail") and page == MiB // PAGE - 1)):
                data[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
        raw.write_bytes(bytes(data))
        out = str(tmp_path / f"{ckpt_name}-pages")
        create_checkpoint(str(raw), out)
        ck = open_checkpoint(out)
        fd = ck.open_pages()
        opened[0].append(fd)
        # the layout, page by page: (memory page offset, its chunk)
        pages = [(r.mem_offset + p, (r.file_offset + p) // ck.chunk_size)
                 for r in ck.layout for p in range(0, r.length, PAGE)]
        count = len(ck.checksums)

        def merged(offsets: list[int]) -> list[list[int]]:
            out_: list[list[int]] = []
            for m in sorted(offsets):
                if out_ and out_[-1][1] == m:
                    out_[-1][1] = m + PAGE
                else:
                    out_.append([m, m + PAGE])
            return out_

        chunks = _Chunks(ck.layout, ck.chunk_size, ck.checksums)
        for k in range(count):
            assert [list(s) for s in chunks.memory_spans(k)] == merged([m for m, c in pages if c == k]), k
        for first, last in ((0, 0), (0, count - 1), (1, 2), (count // 2, count - 1), (count - 1, count - 1)):
            own = [m for m, c in pages if first <= c <= last]  # (two look-ups, not the chunks' spans)
            assert chunks.memory_hull(first, last) == (min(own), max(own) + PAGE), (first, last)
        rng = random.Random(len(pages))
        size = ck.layout.memory_size
        for _ in range(300):  # chunk_range: a page, a byte, spans across ranges and holes
            lo = rng.randrange(size)
            hi = min(size, lo + rng.choice([1, 100, PAGE, 3 * PAGE, 64 * PAGE]))
            held = [c for m, c in pages if m < hi and lo < m + PAGE]
            assert chunks.chunk_range(lo, hi) == ((min(held), max(held)) if held else None), (lo, hi)
        for flip in (0, count // 2, count - 1):
            mem = MemoryFile(ck.layout.memory_size)
            opened[1].append(mem)
            for r in ck.layout:
                mem.view[r.mem_offset : r.mem_offset + r.length] = os.pread(fd, r.length, r.file_offset)
            first_page = min(m for m, c in pages if c == flip)
            mem.view[first_page + 100] ^= 0x10
            for k in (0, 1, flip, count - 2, count - 1):
                assert chunks.matches(mem, k, chunks.memory_spans(k)) == (k != flip), (ckpt_name, flip, k)
            splits = [[(0, count - 1)], [(0, 0), (1, count - 1)], [(k, k) for k in range(count)]]
            if 0 < flip < count - 1:
                splits.append([(0, flip - 1), (flip, flip), (flip + 1, count - 1)])
            for runs in splits:
                where = (ckpt_name, flip, runs[:3])
                good, verified, bad = chunks.check(mem, runs, (lambda: polite))
                assert verified == count - 1, where
                assert [k for k, _ in bad] == [flip], where
                assert [list(s) for s in bad[0][1]] == merged([m for m, c in pages if c == flip]), where
                assert good == merged([m for m, c in pages if c != flip]), where
        rng = random.Random(7)
        for _ in range(200):
            lo = rng.randrange(0, MiB // PAGE) * PAGE + rng.choice((0, 1, 100))
            hi = min(MiB, lo + rng.randrange(1, 64) * PAGE + rng.choice((0, -1, 1)))
            inside = [c for m, c in pages if m < hi and m + PAGE > lo]
            assert chunks.chunk_range(lo, hi) == ((min(inside), max(inside)) if inside else None), (lo, hi)


def test_landed_counts_bytes_not_pages():
    """``_Chunks.landed`` takes file bytes [lo, hi): a chunk is complete once every one of
    its bytes landed, whatever cuts the reads (here one byte past a chunk's end, then the
    rest; and a failed read marks every chunk it touched bad)."""
    layout = Layout(4 * CHUNK, PAGE, [(0, 4 * CHUNK, 0)])
    chunks = _Chunks(layout, CHUNK, [0] * 4)
    assert chunks.landed(0, CHUNK + 1, bad=False) == [0]
    assert chunks.landed(CHUNK + 1, 2 * CHUNK - 1, bad=False) == []
    assert chunks.landed(2 * CHUNK - 1, 3 * CHUNK + 1, bad=True) == [1, 2]
    assert chunks.bad == {1, 2, 3}
    assert chunks.landed(3 * CHUNK + 1, 4 * CHUNK, bad=False) == [3]
    assert chunks.partial == {}


@pytest.mark.parametrize("lengths", [None, (0,), (1, 3), (4, 8), (9, 16), (17, 128), (129, 240), (241, 1 << 20)])
def test_the_c_hash_is_used_only_where_it_agrees_with_the_module(monkeypatch, lengths):
    """``_c_xxh3`` takes the system's XXH3 only where it hashes as the ``xxhash`` module
    does at every length class of XXH3 (0, 1-3, 4-8, 9-16, 17-128, 129-240, longer):
    a library that disagrees in one class is refused (``lengths``: that class; None:
    one that agrees, taken), as are a missing library and one without the function."""
    proto = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t)

    def fake(address: int, n: int) -> int:
        value = xxhash.xxh3_64_intdigest(ctypes.string_at(address, n))
        return value ^ 1 if lengths is not None and lengths[0] <= n <= lengths[-1] else value

    function = proto(fake)

    class Library:
        XXH3_64bits = function

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Library())
    assert _c_xxh3() is (None if lengths is not None else function)

    class Without:
        pass

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Without())
    assert _c_xxh3() is None

    def missing(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert _c_xxh3() is None


@pytest.mark.parametrize("seed", range(6))
def test_check_agrees_with_hashing_each_chunk_alone(seed):
    """``_Chunks.check`` on random scattered layouts (ranges of 1-9 pages, holes of 0-3,
    chunks of 1-5 pages: chunks inside one range, chunks of many pieces, ranges over
    many chunks), random runs, some chunks corrupt, polite or not: the same chunks good
    and bad, with the same memory, as hashing each chunk's memory alone (``matches``)."""
    rng = random.Random(seed)
    ranges, mem_at = [], 0
    for _ in range(rng.randrange(1, 120)):
        mem_at += rng.randrange(0, 4) * PAGE
        n = rng.randrange(1, 10) * PAGE
        ranges.append((mem_at, n))
        mem_at += n
    file_at, table = 0, []
    for m, n in ranges:
        table.append((m, n, file_at))
        file_at += n
    layout = Layout(mem_at + PAGE, PAGE, table)
    size = rng.randrange(1, 6) * PAGE
    memory = bytearray(rng.randbytes(layout.memory_size))
    packed = b"".join(bytes(memory[m : m + n]) for m, n in ranges)
    sums = [xxhash.xxh3_64_intdigest(packed[k : k + size]) for k in range(0, len(packed), size)]
    chunks = _Chunks(layout, size, sums)
    count = len(sums)
    corrupt = set(rng.sample(range(count), rng.randrange(0, min(count, 5) + 1)))
    for k in corrupt:
        lo, hi = rng.choice(chunks.memory_spans(k))
        memory[rng.randrange(lo, hi)] ^= 0x40
    view = memoryview(memory)

    class Dest:
        def buffer(self, offset: int, length: int) -> memoryview:
            return view[offset : offset + length]

    cuts = sorted(rng.sample(range(1, count), rng.randrange(0, count))) if count > 1 else []
    runs = [(a, b - 1) for a, b in zip([0, *cuts], [*cuts, count])]
    for polite in (False, True):
        good, verified, bad = chunks.check(Dest(), runs, lambda polite=polite: polite)
        want_good: list[list[int]] = []
        for k in range(count):
            if k in corrupt:
                continue
            for a, b in chunks.memory_spans(k):
                if want_good and want_good[-1][1] == a:
                    want_good[-1][1] = b
                else:
                    want_good.append([a, b])
        assert all(chunks.matches(Dest(), k, chunks.memory_spans(k)) == (k not in corrupt) for k in range(count))
        assert verified == count - len(corrupt), (seed, polite)
        assert sorted((k, list(p)) for k, p in bad) == sorted((k, chunks.memory_spans(k)) for k in corrupt)
        assert good == want_good, (seed, polite)
