"""The host chunk cache filled off the fetch path (loader/remote/_inserter.py): chunks a
call fetched are copied into the inserter's slots and put into the cache by its own
thread.  The cache's lock is held by another process here, as another daemon's
directory walk holds it, so that inserts wait for as long as a test needs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import xxhash

import aio
from loader.checkpoint import create_checkpoint, read_pages_index
from loader.remote import ChunkCache
from loader.remote._inserter import CacheInserter
from loader.source import RemoteConfig, RemoteSource, open_source
from workloads import make_sample_image

CHUNK = 16 << 10


class LockHolder:
    """Another process holding the cache's flock until :meth:`release`."""

    def __init__(self, cache_dir: Path) -> None:
        code = ("import fcntl, sys; f = open(sys.argv[1], 'r+b'); fcntl.flock(f, fcntl.LOCK_EX); "
                "print('locked', flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(cache_dir / "v2" / "lock")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"locked\n"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def holder() -> Iterator[list[LockHolder]]:
    held: list[LockHolder] = []
    yield held
    for h in held:
        h.release()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("inserter")
    raw = str(d / "memory.img")
    make_sample_image(raw, 4 << 20, seed=5, dense=True)
    create_checkpoint(raw, str(d / "ckpt"))
    with open(d / "ckpt" / "pages.img", "rb") as f:
        pages = f.read()
    return {"dir": str(d / "ckpt"), "pages": pages, "index": read_pages_index(str(d / "ckpt" / "index.msgpack"))}


async def _read(queue: aio.Queue, source: RemoteSource, id: int, lo: int, buf: memoryview, *,
                urgent: bool = False) -> int:
    queue.add(source.read(id, lo, [buf], urgent=urgent))
    (done,) = await queue.wait(1)
    return done.result


BLOCK = 64 * CHUNK  # the cache's entries: 1 MiB of the pages file


async def _restore(ckpt: dict[str, Any], cache_dir: Path, pieces: list[tuple[int, int, bool]],
                   cache_size: int | None = None) -> dict[str, Any]:
    """Open the checkpoint (file://) with the cache in ``cache_dir``, read each
    ``(offset, length, urgent)`` in turn and check its bytes, close (the inserter
    drained into the cache); the source's stats."""
    source = open_source(f"file://{ckpt['dir']}", remote=RemoteConfig(cache_dir=str(cache_dir), env={},
                                                                      cache_size=cache_size))
    assert isinstance(source, RemoteSource)
    queue = aio.open_queue("threads", 4)
    try:
        for i, (lo, n, urgent) in enumerate(pieces):
            buf = bytearray(n)
            with trio.fail_after(30):
                assert await _read(queue, source, i + 1, lo, memoryview(buf), urgent=urgent) == n
            assert buf == ckpt["pages"][lo : lo + n]
    finally:
        await queue.aclose()
        source.close()
    return source.stats()


def _whole(ckpt: dict[str, Any], piece: int = BLOCK, start: int = 0) -> list[tuple[int, int, bool]]:
    size = len(ckpt["pages"])
    cuts = [0, *range(start, size, piece), size] if start else [*range(0, size, piece), size]
    return [(a, b - a, False) for a, b in zip(cuts, cuts[1:]) if b > a]


def _block_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "v2").glob("*/*/*") if not p.name.startswith(".tmp-"))


async def test_reads_of_the_sweep_across_blocks_cache_every_block_whole_and_fetch_each_once(ckpt, tmp_path):
    """Reads of the sweep not aligned to the blocks (each 1 MiB read covers parts of two):
    every block is fetched once, whole (the part outside a read into its slot), and
    cached as one entry; a second restore makes no GET."""
    size = len(ckpt["pages"])
    blocks = -(-size // BLOCK)
    cold = await _restore(ckpt, tmp_path / "cache", _whole(ckpt, start=24 << 10))
    assert cold["fetch"]["bytes_fetched"] == size and cold["fetch"]["gets"] == blocks
    assert cold["cache"]["entries"] == blocks == len(_block_files(tmp_path / "cache"))
    warm = await _restore(ckpt, tmp_path / "cache", _whole(ckpt, start=24 << 10))
    assert warm["fetch"]["gets"] == 0 and warm["store"]["gets"] == 1  # the index only


async def test_a_warm_block_read_into_several_buffers_is_one_cache_read(ckpt, tmp_path):
    """A read whose bytes go to several buffers (memory with holes between its pieces,
    cut anywhere, a chunk across two) takes each warm block from the cache with one
    read of its entry (it read the block a chunk at a time: 64 opens and reads of the
    entry's file for a block), byte-exact, no GET."""
    size = len(ckpt["pages"])
    blocks = -(-size // BLOCK)
    await _restore(ckpt, tmp_path / "cache", _whole(ckpt))
    source = open_source(f"file://{ckpt['dir']}", remote=RemoteConfig(cache_dir=str(tmp_path / "cache"), env={}))
    assert isinstance(source, RemoteSource)
    queue = aio.open_queue("threads", 4)
    try:
        for b in range(blocks):
            lo, n = b * BLOCK, min(BLOCK, size - b * BLOCK)
            cuts = [0, 4096, CHUNK + 1000, 5 * CHUNK, n - CHUNK - 7, n]
            bufs = [bytearray(y - x) for x, y in zip(cuts, cuts[1:])]
            queue.add(source.read(b + 1, lo, [memoryview(x) for x in bufs]))
            with trio.fail_after(30):
                (done,) = await queue.wait(1)
            assert done.result == n and b"".join(bufs) == ckpt["pages"][lo : lo + n]
    finally:
        await queue.aclose()
        source.close()
    stats = source.stats()
    assert stats["fetch"]["gets"] == 0 and stats["fetch"]["chunks_cached"] == -(-size // CHUNK)
    assert stats["cache"]["hits"] == blocks


async def test_a_block_widened_around_a_waiters_chunk_is_cached_whole(ckpt, tmp_path):
    """A waiter's lone chunk (chunk 70: block 1's seventh) is fetched alone; the sweep's
    reads of the rest of block 1 fetch the block's other chunks (widened: the chunks
    before the waiter's too) and the block is cached whole, one entry; a restore
    after it reads block 1 from the cache with no GET."""
    k = 70
    cold = await _restore(ckpt, tmp_path / "cache", [(k * CHUNK, CHUNK, True), (BLOCK + CHUNK, CHUNK, False),
                                                      ((k + 1) * CHUNK, 2 * BLOCK - (k + 1) * CHUNK, False)])
    assert cold["fetch"]["chunks_fetched"] == 64  # the waiter's chunk, then the block's other 63, once each
    assert cold["cache"]["entries"] == 1 and cold["cache"]["inserts"] == 1
    warm = await _restore(ckpt, tmp_path / "cache", [(BLOCK, BLOCK, False)])
    assert warm["fetch"]["gets"] == 0 and warm["fetch"]["chunks_cached"] == 64 and warm["cache"]["hits"] == 1


async def test_a_corrupt_chunk_of_a_cached_block_is_detected_dropped_and_the_block_fetched_again(ckpt, tmp_path):
    """A byte flipped in one chunk of a cached block: the read of that chunk detects it
    (the bytes served are right, fetched again), the entry is dropped and counted, the
    block is fetched whole and cached again; the next restore makes no GET."""
    cache_dir = tmp_path / "cache"
    await _restore(ckpt, cache_dir, _whole(ckpt))
    files = _block_files(cache_dir)
    assert len(files) == -(-len(ckpt["pages"]) // BLOCK)
    from loader.remote._cache import block_header

    sums = ckpt["index"].checksums
    head = block_header(CHUNK, sums[64:128], BLOCK)
    header = len(head)
    (victim,) = [p for p in files if p.name.startswith(f"{xxhash.xxh3_64_intdigest(head):016x}-")]
    raw = bytearray(victim.read_bytes())
    raw[header + 6 * CHUNK + 100] ^= 1  # block 1's chunk 6 (chunk 70)
    victim.write_bytes(raw)
    again = await _restore(ckpt, cache_dir, [(70 * CHUNK, CHUNK, False)])  # reads chunk 70 alone (widened)
    assert again["cache"]["corrupt_dropped"] == 1 and again["fetch"]["gets"] == 1
    assert again["fetch"]["chunks_fetched"] == 64 and again["cache"]["inserts"] == 1
    warm = await _restore(ckpt, cache_dir, _whole(ckpt))
    assert warm["fetch"]["gets"] == 0 and warm["cache"]["corrupt_dropped"] == 0


async def test_the_cache_bound_holds_with_blocks_the_least_recent_evicted(ckpt, tmp_path):
    """--cache-size of two blocks and a bit: after a restore of four blocks the cache
    holds the last two read, whole, within the bound."""
    from loader.remote._cache import block_header

    bound = 2 * (BLOCK + len(block_header(CHUNK, [0] * 64, BLOCK))) + 1000
    cold = await _restore(ckpt, tmp_path / "cache", _whole(ckpt), cache_size=bound)
    assert cold["cache"]["entries"] == 2 and cold["cache"]["bytes"] <= bound and cold["cache"]["evictions"] == 2
    assert sum(p.stat().st_size for p in _block_files(tmp_path / "cache")) == cold["cache"]["bytes"]
    warm = await _restore(ckpt, tmp_path / "cache", [(2 * BLOCK, 2 * BLOCK, False)])
    assert warm["fetch"]["gets"] == 0


async def test_two_sources_at_once_on_one_cache_fill_it_once_and_serve_right_bytes(ckpt, tmp_path):
    """Two restores of the same checkpoint at once (two caches on one directory: the
    lock taken as by two daemons), reading in opposite orders: both byte-exact,
    nothing counted corrupt, one entry per block, and the totals are the disk's."""
    cache_dir = tmp_path / "cache"
    pieces = _whole(ckpt, piece=256 << 10)
    results: list[dict[str, Any]] = []

    async def one(order: list[tuple[int, int, bool]]) -> None:
        results.append(await _restore(ckpt, cache_dir, order))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, pieces)
        nursery.start_soon(one, pieces[::-1])
    assert all(r["cache"]["corrupt_dropped"] == 0 for r in results)
    files = _block_files(cache_dir)
    assert len(files) == -(-len(ckpt["pages"]) // BLOCK)
    with ChunkCache(str(cache_dir), 1 << 30) as cache:
        st = cache.stats()
        assert (st.entries, st.bytes) == (len(files), sum(p.stat().st_size for p in files))


async def test_a_chunk_read_again_before_its_insert_lands_is_neither_fetched_nor_inserted_twice(ckpt, tmp_path,
                                                                                                holder):
    """With the cache's lock held elsewhere, a call that fetched chunks returns at once
    (its inserts wait in the inserter, not in the call; before, the call itself waited
    for the lock); the same chunks read again come from the inserter's slots (no GET);
    once the lock is let go, their block is inserted once, whole (the call of the
    sweep fetched the rest of the block with its chunks, into the block's slot)."""
    cache_dir = tmp_path / "cache"
    source = open_source(f"file://{ckpt['dir']}", remote=RemoteConfig(cache_dir=str(cache_dir), env={}))
    assert isinstance(source, RemoteSource) and source.inserter is not None
    holder.append(LockHolder(cache_dir))
    queue = aio.open_queue("threads", 4)
    n = 16  # chunks read, twice: a quarter of a block
    assert source.inserter.block_chunks == 64
    first, second = bytearray(n * CHUNK), bytearray(n * CHUNK)
    try:
        with trio.fail_after(30):  # (the call stuck behind the lock would never return)
            assert await _read(queue, source, 1, 0, memoryview(first)) == n * CHUNK
            gets = source.stats()["fetch"]["gets"]
            assert await _read(queue, source, 2, 0, memoryview(second)) == n * CHUNK
        assert first == second == ckpt["pages"][: n * CHUNK]
        stats = source.stats()
        assert stats["fetch"]["gets"] == gets == 1  # the second read made no GET
        assert stats["fetch"]["chunks_fetched"] == 64  # the block, whole
        assert stats["inserter"]["served"] == n and stats["inserter"]["inserted"] == 0
    finally:
        holder[0].release()
        await queue.aclose()
        source.close()  # drains the inserter into the cache
    stats = source.stats()
    assert stats["inserter"]["inserted"] == 1 and stats["inserter"]["queued"] == 1
    assert stats["cache"]["inserts"] == 1 and stats["cache"]["entries"] == 1


def _blocks(count: int, chunks: int) -> tuple[bytes, list[int]]:
    data = os.urandom(count * chunks * CHUNK)
    return data, [xxhash.xxh3_64_intdigest(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]


def test_the_sweep_waits_for_a_slot_and_a_waiter_never_does(tmp_path, holder):
    """Four block slots, one kept for urgent calls: with the inserts held up, three
    blocks of the sweep fill the rest, a fourth waits for a slot (not dropped); an
    urgent block takes the kept slot, the next urgent one finds none and is dropped,
    never waits.  Once the inserts go on, the waiting block is queued and all four
    reach the cache."""
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    holder.append(LockHolder(tmp_path / "cache"))
    per = 4  # chunks a block
    data, sums = _blocks(6, per)
    size, bb = len(data), per * CHUNK
    inserter = CacheInserter(cache, 7, CHUNK, sums, size, per, capacity=4 * bb)

    def block(b: int) -> memoryview:
        return memoryview(data)[b * bb : (b + 1) * bb]

    try:
        assert (inserter.slots, inserter.reserve) == (4, 1)
        for b in range(3):
            assert inserter.offer(b * per, block(b))
        result: list[bool] = []
        sweep = threading.Thread(target=lambda: result.append(inserter.offer(3 * per, block(3))))
        sweep.start()
        while inserter.stats().waits == 0:
            time.sleep(0.01)
        assert inserter.offer(4 * per, block(4), urgent=True)
        assert not inserter.offer(5 * per, block(5), urgent=True)  # at once: no slot, dropped
        assert sweep.is_alive() and result == []
        assert inserter.offer(0, block(0))  # held already: not queued twice
        got = bytearray(CHUNK)
        assert inserter.read_into(4 * per + 1, memoryview(got)) and got == block(4)[CHUNK : 2 * CHUNK]
        holder[0].release()
        sweep.join(30)
        assert result == [True]
    finally:
        inserter.close()
    s = inserter.stats()
    assert (s.queued, s.inserted, s.dropped, s.pending, s.waits) == (5, 5, 1, 0, 1)
    found = [cache.read_block_into(7, CHUNK, sums[b * per : (b + 1) * per], bb, 0, bytearray(bb)) for b in range(6)]
    assert found == [True] * 5 + [False]
    cache.close()


def test_a_block_missing_chunks_is_given_up_for_the_sweep_and_holds_only_what_arrived(tmp_path):
    """Two slots: a waiter's lone chunk holds a block that is not whole (its chunk is
    served from the slot, the others are not); a call of the sweep that needs the
    slot gives that block up (counted as dropped) rather than wait for it forever,
    and nothing of the given-up block reaches the cache."""
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    per = 4
    data, sums = _blocks(4, per)
    bb = per * CHUNK
    inserter = CacheInserter(cache, 8, CHUNK, sums, len(data), per, capacity=2 * bb)
    try:
        assert (inserter.slots, inserter.reserve) == (2, 1)
        assert inserter.offer(1, memoryview(data)[CHUNK : 2 * CHUNK], urgent=True)  # block 0's chunk 1 alone
        assert inserter.held(0) == 0b0010
        got = bytearray(CHUNK)
        assert inserter.read_into(1, memoryview(got)) and got == data[CHUNK : 2 * CHUNK]
        assert not inserter.read_into(0, memoryview(got))
        assert inserter.offer(2 * per, memoryview(data)[2 * bb : 3 * bb])  # the sweep: gives block 0 up
        assert inserter.held(0) == 0 and inserter.stats().dropped == 1
    finally:
        inserter.close()
    assert inserter.stats().inserted == 1
    assert not cache.read_block_into(8, CHUNK, sums[:per], bb, 0, bytearray(bb))
    assert cache.read_block_into(8, CHUNK, sums[2 * per : 3 * per], bb, 0, bytearray(bb))
    cache.close()


def test_a_sweep_waiting_for_a_slot_wakes_when_a_block_it_may_give_up_is_left_unfinished(tmp_path):
    """Two slots: a waiter's call is putting chunks into block 0's slot (a claim in
    progress, so block 0 cannot be given up yet), and a call of the sweep waits for a
    slot; when the waiter's call is done with block 0 (not whole), the sweep gives it
    up and goes on.  (Before, nothing woke the sweep there: it waited for ever, found
    by the random reads below, one run in twenty.)"""
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    per = 4
    data, sums = _blocks(3, per)
    bb = per * CHUNK
    inserter = CacheInserter(cache, 10, CHUNK, sums, len(data), per, capacity=2 * bb)
    try:
        slot = inserter.claim(0, urgent=True)
        assert slot is not None
        result: list[bool] = []
        sweep = threading.Thread(target=lambda: result.append(inserter.offer(per, memoryview(data)[bb : 2 * bb])),
                                 daemon=True)
        sweep.start()
        while inserter.stats().waits == 0:
            time.sleep(0.01)
        slot[:CHUNK] = data[:CHUNK]
        del slot
        inserter.filled(0, 0, 0)  # block 0: one chunk of four, and no call writing into it
        sweep.join(10)
        assert result == [True] and inserter.stats().dropped == 1
    finally:
        inserter.close()
    assert inserter.stats().inserted == 1
    cache.close()


def test_shutdown_with_inserts_held_up_is_bounded_and_drops_them(tmp_path, holder):
    """close() with the cache's lock held elsewhere: the queued blocks are dropped after
    the timeout, counted; the threads are gone; nothing was inserted."""
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    per = 2
    data, sums = _blocks(3, per)
    bb = per * CHUNK
    inserter = CacheInserter(cache, 9, CHUNK, sums, len(data), per, capacity=64 * bb)
    holder.append(LockHolder(tmp_path / "cache"))
    for b in range(3):
        assert inserter.offer(b * per, memoryview(data)[b * bb : (b + 1) * bb])
    release = threading.Timer(1.0, holder[0].release)  # lets the batch in the cache's lock go
    release.start()
    inserter.close(timeout=0.1)
    release.join()
    s = inserter.stats()
    assert not any(t.is_alive() for t in inserter._threads)
    assert s.pending == 0 and s.inserted + s.dropped == 3
    assert not inserter.offer(0, memoryview(data)[:bb])  # closed
    cache.close()


def test_insert_many_refuses_wrong_bytes_and_stores_the_rest(tmp_path):
    """One taking of the lock for many chunks: each result in order (None: refused,
    wrong bytes), the journal and the totals as for single inserts."""
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    data = [os.urandom(CHUNK) for _ in range(5)]
    sums = [xxhash.xxh3_64_intdigest(d) for d in data]
    chunks = [(s, d) for s, d in zip(sums, data)]
    chunks[2] = (sums[2] ^ 1, data[2])
    assert cache.insert_many(3, chunks) == [True, True, None, True, True]
    other = ChunkCache(str(tmp_path / "cache"), 1 << 30)  # learns the inserts from the journal
    other.load_index()
    assert other.checkpoints() == {3: (4, 4 * CHUNK)}
    st = cache.stats()
    assert (st.entries, st.bytes, st.inserts) == (4, 4 * CHUNK, 4)
    buf = bytearray(CHUNK)
    assert [cache.read_into(3, s, CHUNK, buf) for s in sums] == [True, True, False, True, True]
    assert not [n for n in os.listdir(tmp_path / "cache" / "v2" / f"{3:016x}" / f"{sums[0] >> 56:02x}")
                if n.startswith(".tmp-")]
    with pytest.raises(ValueError):
        cache.insert_many(3, [(sums[0], b"")])
    other.close()
    cache.close()


async def test_random_reads_of_waiters_and_the_sweep_at_once_are_byte_exact_and_cache_only_right_blocks(ckpt,
                                                                                                        tmp_path):
    """Reads of waiters (urgent) and of the sweep at any offset and length, eight at a
    time, with two block slots only (so blocks are given up and waited for): every
    read byte-exact; afterwards every entry in the cache is a whole block that reads
    back right, and a restore that reads everything again GETs only what is missing."""
    import random

    rng = random.Random(3)
    size = len(ckpt["pages"])
    cache_dir = tmp_path / "cache"
    source = open_source(f"file://{ckpt['dir']}", remote=RemoteConfig(cache_dir=str(cache_dir), env={}))
    assert isinstance(source, RemoteSource) and source.inserter is not None
    source.inserter.close()  # replaced by one of two slots
    source.inserter = CacheInserter(source.cache, source._digest, CHUNK,  # type: ignore[arg-type]
                                    ckpt["index"].checksums, size, 64, capacity=2 * BLOCK)
    queue = aio.open_queue("threads", 8)
    pieces = []
    for _ in range(120):
        lo = rng.randrange(size)
        pieces.append((lo, min(size - lo, rng.choice([4096, CHUNK, 100_000, 256 << 10, BLOCK])), rng.random() < 0.4))
    try:
        with trio.fail_after(60):
            for start in range(0, len(pieces), 8):
                batch = pieces[start : start + 8]
                bufs = [bytearray(n) for _, n, _ in batch]
                for i, ((lo, _, urgent), buf) in enumerate(zip(batch, bufs)):
                    queue.add(source.read(start + i + 1, lo, [memoryview(buf)], urgent=urgent))
                done = await queue.wait(len(batch))
                assert sorted(d.result for d in done) == sorted(n for _, n, _ in batch)
                for (lo, n, _), buf in zip(batch, bufs):
                    assert buf == ckpt["pages"][lo : lo + n]
    finally:
        await queue.aclose()
        source.close()
    stats = source.stats()
    assert stats["inserter"]["wrong"] == 0 and stats["cache"]["corrupt_dropped"] == 0
    sums = ckpt["index"].checksums
    cached = 0
    with ChunkCache(str(cache_dir), 1 << 30) as cache:
        for b in range(size // BLOCK):
            buf = bytearray(BLOCK)
            if cache.read_block_into(source._digest, CHUNK, sums[b * 64 : (b + 1) * 64], BLOCK, 0, buf):
                assert buf == ckpt["pages"][b * BLOCK : (b + 1) * BLOCK]
                cached += 1
        assert cache.stats().corrupt_dropped == 0
    assert len(_block_files(cache_dir)) == cached
    again = await _restore(ckpt, cache_dir, _whole(ckpt))
    assert again["fetch"]["gets"] == size // BLOCK - cached


def _concurrency(source: RemoteSource, calls: list[tuple[int, bool]]) -> int:
    """Run ``source``'s calls for ``(offset, urgent)`` in threads at once, each cache
    look-up held 50 ms; the most look-ups that ran at the same time."""
    lock = threading.Lock()
    now = [0, 0]  # running, most
    lookup = source._lookup

    def held(*args: Any, **kwargs: Any) -> int:
        with lock:
            now[0] += 1
            now[1] = max(now[1], now[0])
        time.sleep(0.05)
        try:
            return lookup(*args, **kwargs)
        finally:
            with lock:
                now[0] -= 1

    source._lookup = held  # type: ignore[method-assign]
    results: list[int] = []

    def call(lo: int, urgent: bool) -> None:
        results.append(source._call(lo, [memoryview(bytearray(BLOCK))], urgent))

    threads = [threading.Thread(target=call, args=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    source._lookup = lookup  # type: ignore[method-assign]
    assert results == [BLOCK] * len(calls)
    return now[1]


async def test_background_reads_of_a_warm_cache_take_turns_one_a_cpu_waiters_and_misses_do_not(
        ckpt, tmp_path, monkeypatch):
    """Reading the host cache is CPU work: while it answers, background calls read it at
    most one a CPU at once (--fetch-concurrency calls together mostly handed the GIL
    round: a warm-cache fill 25 % faster).  A waiter's call never waits for that, and
    while the cache misses (a cold one) the look-ups are not held back."""
    monkeypatch.setattr(aio, "usable_cpus", lambda: 1)
    warm = tmp_path / "warm"
    await _restore(ckpt, warm, _whole(ckpt))  # the cache holds every block now
    blocks = [(k * BLOCK, False) for k in range(3)]
    source = open_source(f"file://{ckpt['dir']}", remote=RemoteConfig(cache_dir=str(warm), env={}))
    try:
        assert _concurrency(source, blocks) == 1
        assert _concurrency(source, [(lo, True) for lo, _ in blocks]) == 3
    finally:
        source.close()
    source = open_source(f"file://{ckpt['dir']}", remote=RemoteConfig(cache_dir=str(tmp_path / "cold"), env={}))
    try:
        assert _concurrency(source, blocks[:1]) == 1  # finds nothing in the cache
        assert _concurrency(source, [(k * BLOCK, False) for k in range(1, 4)]) == 3
    finally:
        source.close()
