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
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(cache_dir / "v1" / "lock")],
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


async def _read(queue: aio.Queue, source: RemoteSource, id: int, lo: int, buf: memoryview) -> int:
    queue.add(source.read(id, lo, [buf]))
    (done,) = await queue.wait(1)
    return done.result


async def test_a_chunk_read_again_before_its_insert_lands_is_neither_fetched_nor_inserted_twice(ckpt, tmp_path,
                                                                                                holder):
    """With the cache's lock held elsewhere, a call that fetched chunks returns at once
    (its inserts wait in the inserter, not in the call; before, the call itself waited
    for the lock); the same chunks read again come from the inserter's slots (no GET);
    once the lock is let go, each chunk is inserted once."""
    cache_dir = tmp_path / "cache"
    source = open_source(f"file://{ckpt['dir']}", remote=RemoteConfig(cache_dir=str(cache_dir), env={}))
    assert isinstance(source, RemoteSource)
    holder.append(LockHolder(cache_dir))
    queue = aio.open_queue("threads", 4)
    n = 16  # chunks read, twice
    first, second = bytearray(n * CHUNK), bytearray(n * CHUNK)
    try:
        with trio.fail_after(30):  # (the call stuck behind the lock would never return)
            assert await _read(queue, source, 1, 0, memoryview(first)) == n * CHUNK
            gets = source.stats()["fetch"]["gets"]
            assert await _read(queue, source, 2, 0, memoryview(second)) == n * CHUNK
        assert first == second == ckpt["pages"][: n * CHUNK]
        stats = source.stats()
        assert stats["fetch"]["gets"] == gets == 1  # the second read made no GET
        assert stats["inserter"]["served"] == n and stats["inserter"]["inserted"] == 0
    finally:
        holder[0].release()
        await queue.aclose()
        source.close()  # drains the inserter into the cache
    stats = source.stats()
    assert stats["inserter"]["inserted"] == n and stats["inserter"]["queued"] == n
    assert stats["cache"]["inserts"] == n and stats["cache"]["entries"] == n


def test_the_sweep_waits_for_a_slot_and_a_waiter_never_does(ckpt, tmp_path, holder):
    """Four slots, one kept for urgent calls: with the inserts held up, three chunks of
    the sweep fill the rest, a fourth waits for a slot (not dropped); an urgent chunk
    takes the kept slot, the next urgent one finds none and is dropped, never waits.
    Once the inserts go on, the waiting chunk is queued and all four reach the cache."""
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    holder.append(LockHolder(tmp_path / "cache"))
    data = [os.urandom(CHUNK) for _ in range(6)]
    sums = [xxhash.xxh3_64_intdigest(d) for d in data]
    inserter = CacheInserter(cache, 7, CHUNK, capacity=4 * CHUNK)
    try:
        assert (inserter.slots, inserter.reserve) == (4, 1)
        for k in range(3):
            assert inserter.offer(k, sums[k], memoryview(data[k]))
        result: list[bool] = []
        sweep = threading.Thread(target=lambda: result.append(inserter.offer(3, sums[3], memoryview(data[3]))))
        sweep.start()
        while inserter.stats().waits == 0:
            time.sleep(0.01)
        assert inserter.offer(4, sums[4], memoryview(data[4]), urgent=True)
        assert not inserter.offer(5, sums[5], memoryview(data[5]), urgent=True)  # at once: no slot, dropped
        assert sweep.is_alive() and result == []
        assert inserter.offer(0, sums[0], memoryview(data[0]))  # pending already: not queued twice
        got = bytearray(CHUNK)
        assert inserter.read_into(4, memoryview(got)) and got == data[4]
        holder[0].release()
        sweep.join(30)
        assert result == [True]
    finally:
        inserter.close()
    s = inserter.stats()
    assert (s.queued, s.inserted, s.dropped, s.pending, s.waits) == (5, 5, 1, 0, 1)
    buf = bytearray(CHUNK)
    assert [cache.read_into(7, sums[k], CHUNK, buf) for k in range(6)] == [True] * 5 + [False]
    cache.close()


def test_shutdown_with_inserts_held_up_is_bounded_and_drops_them(tmp_path, holder):
    """close() with the cache's lock held elsewhere: the queued chunks are dropped after
    the timeout, counted; the thread is gone; nothing was inserted."""
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    data = [os.urandom(CHUNK) for _ in range(3)]
    inserter = CacheInserter(cache, 9, CHUNK, capacity=64 * CHUNK)
    holder.append(LockHolder(tmp_path / "cache"))
    for k, d in enumerate(data):
        assert inserter.offer(k, xxhash.xxh3_64_intdigest(d), memoryview(d))
    release = threading.Timer(1.0, holder[0].release)  # lets the batch in the cache's lock go
    release.start()
    inserter.close(timeout=0.1)
    release.join()
    s = inserter.stats()
    assert not any(t.is_alive() for t in inserter._threads)
    assert s.pending == 0 and s.inserted + s.dropped == 3
    assert not inserter.offer(5, xxhash.xxh3_64_intdigest(data[0]), memoryview(data[0]))  # closed
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
    assert not [n for n in os.listdir(tmp_path / "cache" / "v1" / f"{3:016x}" / f"{sums[0] >> 56:02x}")
                if n.startswith(".tmp-")]
    with pytest.raises(ValueError):
        cache.insert_many(3, [(sums[0], b"")])
    other.close()
    cache.close()
