"""The host chunk cache (loader/remote/_cache.py) and ``pageload cache``: byte-exact
hits, every read verified, corrupt entries dropped, least-recently-used eviction under
the bound, two processes at once, hostile directories refused, the index's memory."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import xxhash

from cli import main
from loader.remote import CacheError, ChunkCache, default_cache_dir, parse_cache_size
from loader.remote._cache_index import _Index

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 4096
IDENT = 0x1234_5678_9ABC_DEF0
OTHER = 0x0FED_CBA9_8765_4321


def chunk(i: int, size: int = CHUNK) -> bytes:
    return random.Random(i).randbytes(size)


def key(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def entry_path(directory: Path, identity: int, data: bytes) -> Path:
    s = key(data)
    return directory / "v2" / f"{identity:016x}" / f"{s >> 56:02x}" / f"{s:016x}-{len(data)}"


def read(cache: ChunkCache, identity: int, data: bytes) -> bytes | None:
    buf = bytearray(len(data))
    return bytes(buf) if cache.read_into(identity, key(data), len(data), buf) else None


def entries_on_disk(directory: Path) -> list[Path]:
    return [p for p in (directory / "v2").glob("*/*/*") if not p.name.startswith(".tmp-")]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# -- hits, misses, keys ----------------------------------------------------------------------------


def test_a_hit_is_byte_exact_and_a_miss_is_false(cache_dir: Path) -> None:
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        a, b = chunk(1), chunk(2, 12345)
        assert read(cache, IDENT, a) is None
        assert cache.insert(IDENT, key(a), a)
        assert cache.insert(IDENT, key(b), memoryview(b))
        assert read(cache, IDENT, a) == a
        assert read(cache, IDENT, b) == b
        # keyed by the checkpoint's identity and the length too: no accidental sharing
        assert read(cache, OTHER, a) is None
        buf = bytearray(CHUNK - 1)
        assert not cache.read_into(IDENT, key(a), CHUNK - 1, buf)
        st = cache.stats()
        assert (st.hits, st.misses, st.entries, st.bytes, st.inserts) == (2, 3, 2, CHUNK + 12345, 2)


def test_read_into_fills_the_callers_buffer_in_place(cache_dir: Path) -> None:
    """One copy: the file is read into the memory the caller gives (here a slice of a
    larger buffer, as the loader's memory file would be)."""
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        a = chunk(3)
        cache.insert(IDENT, key(a), a)
        big = bytearray(3 * CHUNK)
        assert cache.read_into(IDENT, key(a), CHUNK, memoryview(big)[CHUNK : 2 * CHUNK])
        assert big == bytes(CHUNK) + a + bytes(CHUNK)
        with pytest.raises(ValueError, match="writable"):
            cache.read_into(IDENT, key(a), CHUNK, a)  # read-only


def test_the_layout_on_disk_and_its_modes(cache_dir: Path) -> None:
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        a = chunk(4)
        cache.insert(IDENT, key(a), a)
    path = entry_path(cache_dir, IDENT, a)
    assert path.read_bytes() == a
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # guest memory: this user's only
    for d in (cache_dir, cache_dir / "v2", path.parent.parent, path.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert sorted(p.name for p in (cache_dir / "v2").iterdir()) == sorted(["journal", "lock", f"{IDENT:016x}"])
    assert not list(path.parent.glob(".tmp-*"))


def test_inserting_the_same_chunk_twice_counts_it_once(cache_dir: Path) -> None:
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        a = chunk(5)
        assert cache.insert(IDENT, key(a), a) and cache.insert(IDENT, key(a), a)
        assert (cache.stats().entries, cache.stats().bytes) == (1, CHUNK)
        assert cache.insert(OTHER, key(a), a)  # another checkpoint's: its own entry
        assert (cache.stats().entries, cache.stats().bytes) == (2, 2 * CHUNK)


def test_a_wrong_checksum_is_refused_and_nothing_is_written(cache_dir: Path) -> None:
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        a = chunk(6)
        with pytest.raises(ValueError, match="refused"):
            cache.insert(IDENT, key(a) ^ 1, a)
        assert not list((cache_dir / "v2").rglob("*-*")) and not list((cache_dir / "v2").rglob(".tmp-*"))
        assert cache.stats().entries == 0
        assert read(cache, IDENT, a) is None


def test_a_chunk_larger_than_the_bound_is_not_cached(cache_dir: Path) -> None:
    with ChunkCache(str(cache_dir), CHUNK - 1) as cache:
        a = chunk(7)
        assert not cache.insert(IDENT, key(a), a)
        assert cache.stats().insert_failures == 1 and not entries_on_disk(cache_dir)


# -- corruption --------------------------------------------------------------------------------------


def _corrupt_flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(raw)


def _corrupt_truncate(path: Path) -> None:
    os.truncate(path, CHUNK - 1)


def _corrupt_extend(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0")


def _corrupt_symlink(path: Path) -> None:
    """An entry replaced by a symlink to a file holding the right bytes: still refused
    (never followed), and the target is left alone."""
    target = path.parent.parent.parent.parent.parent / "elsewhere"
    target.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(target)


def _corrupt_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("damage", [_corrupt_flip, _corrupt_truncate, _corrupt_extend, _corrupt_symlink,
                                    _corrupt_fifo])
def test_a_corrupt_entry_is_detected_dropped_counted_and_refetched(cache_dir: Path, damage: object) -> None:
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        a, b = chunk(10), chunk(11)
        cache.insert(IDENT, key(a), a)
        cache.insert(IDENT, key(b), b)
        path = entry_path(cache_dir, IDENT, a)
        damage(path)  # type: ignore[operator]
        assert read(cache, IDENT, a) is None
        assert not os.path.lexists(path)
        st = cache.stats()
        assert (st.corrupt_dropped, st.misses, st.entries, st.bytes) == (1, 1, 1, CHUNK)
        if damage is _corrupt_symlink:
            assert (cache_dir.parent / "elsewhere").read_bytes() == a
        assert read(cache, IDENT, b) == b  # the others are untouched
        assert cache.insert(IDENT, key(a), a)  # fetched again
        assert read(cache, IDENT, a) == a
        assert (cache.stats().entries, cache.stats().bytes) == (2, 2 * CHUNK)


def test_a_walk_removes_symlinks_and_stale_temporary_files_and_keeps_fresh_ones(cache_dir: Path) -> None:
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        a, b = chunk(12), chunk(13)
        cache.insert(IDENT, key(a), a)
        cache.insert(IDENT, key(b), b)
    pa = entry_path(cache_dir, IDENT, a)
    pa.unlink()
    pa.symlink_to(entry_path(cache_dir, IDENT, b))
    stale, fresh = pa.parent / ".tmp-1-stale", pa.parent / ".tmp-1-fresh"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time_ns() - 2 * 3600 * 10**9
    os.utime(stale, ns=(old, old))
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        cache.refresh()
        st = cache.stats()
        assert (st.entries, st.bytes, st.corrupt_dropped) == (1, CHUNK, 1)
    assert not os.path.lexists(pa) and not stale.exists() and fresh.exists()


# -- eviction ----------------------------------------------------------------------------------------


def test_the_least_recently_read_entry_goes_first(cache_dir: Path) -> None:
    with ChunkCache(str(cache_dir), 3 * CHUNK) as cache:
        a, b, c, d, e = (chunk(20 + i) for i in range(5))
        for x in (a, b, c):
            assert cache.insert(IDENT, key(x), x)
        assert read(cache, IDENT, a) == a  # a is now more recent than b and c
        assert cache.insert(IDENT, key(d), d)  # over the bound: b, the least recently used, goes
        assert [read(cache, IDENT, x) is not None for x in (b,)] == [False]
        assert all(read(cache, IDENT, x) == x for x in (c, a, d))  # order now: c, a, d
        assert cache.insert(IDENT, key(e), e)
        assert read(cache, IDENT, c) is None
        assert all(read(cache, IDENT, x) == x for x in (a, d, e))
        st = cache.stats()
        assert (st.entries, st.bytes, st.evictions) == (3, 3 * CHUNK, 2)
        assert len(entries_on_disk(cache_dir)) == 3


def test_the_bound_holds_over_many_inserts_of_mixed_sizes(cache_dir: Path) -> None:
    bound = 100_000
    rng = random.Random(1)
    with ChunkCache(str(cache_dir), bound) as cache:
        for i in range(400):
            x = chunk(1000 + i, rng.randrange(1, 9000))
            assert cache.insert(IDENT, key(x), x)
            assert cache.stats().bytes <= bound
        on_disk = sum(p.stat().st_size for p in entries_on_disk(cache_dir))
        assert on_disk == cache.stats().bytes <= bound
        assert cache.stats().entries == len(entries_on_disk(cache_dir))


def test_a_read_by_another_daemon_keeps_an_entry_alive(cache_dir: Path) -> None:
    """Recency is shared through the entry's mtime: a read by another process's cache
    touches it (once older than the touch interval), and eviction checks it."""
    for other_reads in (False, True):
        directory = cache_dir / str(other_reads)
        with ChunkCache(str(directory), 2 * CHUNK) as first, ChunkCache(str(directory), 2 * CHUNK) as second:
            x, y, z = chunk(30), chunk(31), chunk(32)
            first.insert(IDENT, key(x), x)
            first.insert(IDENT, key(y), y)
            hour_ago = time.time_ns() - 3600 * 10**9
            for v in (x, y):
                os.utime(entry_path(directory, IDENT, v), ns=(hour_ago, hour_ago))
            if other_reads:
                assert read(second, IDENT, x) == x
            first.insert(IDENT, key(z), z)
            kept = {name for name, v in (("x", x), ("y", y)) if entry_path(directory, IDENT, v).exists()}
            assert kept == ({"x"} if other_reads else {"y"})


def test_another_daemons_inserts_are_learnt_from_the_journal_and_evicted_in_order(cache_dir: Path) -> None:
    with ChunkCache(str(cache_dir), 4 * CHUNK) as first, ChunkCache(str(cache_dir), 4 * CHUNK) as second:
        second.load_index()
        walks = second.stats().walks
        olds = [chunk(40 + i) for i in range(3)]
        for x in olds:
            first.insert(IDENT, key(x), x)
        news = [chunk(50 + i) for i in range(2)]
        for x in news:
            assert second.insert(OTHER, key(x), x)
        assert second.stats().walks == walks  # learnt from the journal, not from a walk
        assert read(first, IDENT, olds[0]) is None  # the oldest, inserted by the other daemon
        assert all(read(first, IDENT, x) == x for x in olds[1:])
        assert all(read(first, OTHER, x) == x for x in news)
        assert second.stats().bytes == 4 * CHUNK == sum(p.stat().st_size for p in entries_on_disk(cache_dir))


def test_totals_that_drifted_are_recounted_by_a_walk(cache_dir: Path) -> None:
    """A daemon killed between a rename and its accounting leaves the totals wrong: an
    unreadable header, or an index with nothing left to evict while the totals say the
    cache is over its bound, makes the next insert recount the directory."""
    with ChunkCache(str(cache_dir), 3 * CHUNK) as cache:
        for i in range(3):
            cache.insert(IDENT, key(chunk(60 + i)), chunk(60 + i))
        with open(cache_dir / "v2" / "lock", "r+b") as f:
            f.write(b"garbage!")
        x = chunk(63)
        assert cache.insert(IDENT, key(x), x)
        assert cache.stats().bytes == 3 * CHUNK == sum(p.stat().st_size for p in entries_on_disk(cache_dir))
    with ChunkCache(str(cache_dir), 3 * CHUNK) as cache:  # totals too high: nothing known can go
        cache.load_index()
        with open(cache_dir / "v2" / "lock", "r+b") as f:
            f.seek(8)
            f.write((10 * CHUNK).to_bytes(8, "little"))
        cache._index.clear()  # type: ignore[union-attr]  (as if these entries were another daemon's)
        y = chunk(64)
        assert cache.insert(IDENT, key(y), y)
        assert cache.stats().bytes == 3 * CHUNK == sum(p.stat().st_size for p in entries_on_disk(cache_dir))


# -- blocks: a remote checkpoint's entries -----------------------------------------------------------


def block(i: int, chunks: int = 4, tail: int = 100) -> tuple[bytes, list[int]]:
    """A block of ``chunks`` chunks of CHUNK bytes, the last ``tail`` bytes short (0:
    whole), and its chunks' checksums."""
    data = random.Random(10_000 + i).randbytes(chunks * CHUNK - tail)
    return data, [key(data[j : j + CHUNK]) for j in range(0, len(data), CHUNK)]


def block_path(directory: Path, identity: int, sums: list[int], length: int) -> Path:
    from loader.remote._cache import block_header

    header = block_header(CHUNK, sums, length)
    s = key(header)
    return directory / "v2" / f"{identity:016x}" / f"{s >> 56:02x}" / f"{s:016x}-{len(header) + length}"


def read_block(cache: ChunkCache, identity: int, sums: list[int], length: int, first: int, n: int) -> bytes | None:
    buf = bytearray(min(n * CHUNK, length - first * CHUNK))
    return bytes(buf) if cache.read_block_into(identity, CHUNK, sums, length, first, buf) else None


def test_a_block_is_one_file_keyed_by_its_header_and_read_in_part(cache_dir: Path) -> None:
    """A block of chunks is one file: a header holding its chunks' checksums, then the
    bytes; named by the header's xxh3_64.  Any run of its chunks is read on its own
    (the header and those chunks), byte-exact, the short last chunk included."""
    data, sums = block(1)
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        assert read_block(cache, IDENT, sums, len(data), 0, 4) is None
        assert cache.insert_blocks(IDENT, CHUNK, [(sums, data)]) == [True]
        path = block_path(cache_dir, IDENT, sums, len(data))
        raw = path.read_bytes()
        assert raw.endswith(data) and len(raw) == len(data) + 24 + 8 * len(sums)
        assert [p for p in entries_on_disk(cache_dir)] == [path]
        for first, n in ((0, 4), (2, 1), (1, 3), (3, 1)):
            assert read_block(cache, IDENT, sums, len(data), first, n) == data[first * CHUNK : (first + n) * CHUNK]
        assert read_block(cache, OTHER, sums, len(data), 0, 4) is None  # another checkpoint's: not shared
        other = list(sums)
        other[3] ^= 1  # another block (a chunk of other bytes): another key
        assert read_block(cache, IDENT, other, len(data), 0, 1) is None
        st = cache.stats()
        assert (st.entries, st.bytes, st.hits, st.corrupt_dropped) == (1, len(raw), 4, 0)
        with pytest.raises(ValueError, match="whole chunks"):
            cache.read_block_into(IDENT, CHUNK, sums, len(data), 1, bytearray(CHUNK + 1))


def test_a_block_is_read_into_pieces_with_one_read_each_chunk_checked_across_them(cache_dir: Path) -> None:
    """A restore's memory between holes: the block's chunks go into several buffers,
    cut anywhere (a chunk across two, the short last chunk across three), each chunk
    checked across its pieces; one entry read (one hit) for all of them.  A wrong
    byte anywhere in a piece is a miss and the entry is dropped."""
    data, sums = block(4, chunks=5)
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        assert cache.insert_blocks(IDENT, CHUNK, [(sums, data)]) == [True]
        for first, cuts in ((0, [1, CHUNK - 1, CHUNK + 3, 4 * CHUNK - 100 - 7, 4 * CHUNK - 100 - 3]),
                            (1, [CHUNK // 2, 2 * CHUNK]), (0, [CHUNK, 2 * CHUNK, 3 * CHUNK]), (4, [10, 20])):
            want = data[first * CHUNK :]
            bounds = [0, *cuts, len(want)]
            bufs = [bytearray(bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)]
            hits = cache.stats().hits
            assert cache.read_block_into(IDENT, CHUNK, sums, len(data), first, [memoryview(b) for b in bufs])
            assert b"".join(bufs) == want
            assert cache.stats().hits == hits + 1
        with pytest.raises(ValueError, match="whole chunks"):
            cache.read_block_into(IDENT, CHUNK, sums, len(data), 0, [memoryview(bytearray(CHUNK)),
                                                                     memoryview(bytearray(1))])
        with pytest.raises(ValueError, match="whole chunks"):
            cache.read_block_into(IDENT, CHUNK, sums, len(data), 0, [memoryview(bytearray(CHUNK)),
                                                                     memoryview(bytes(CHUNK))])
        path = block_path(cache_dir, IDENT, sums, len(data))
        raw = bytearray(path.read_bytes())
        raw[-(3 * CHUNK - 120)] ^= 1  # byte 2 * CHUNK + 20: the third chunk's, past where the read cuts it
        path.write_bytes(raw)
        bufs = [bytearray(2 * CHUNK + 9), bytearray(3 * CHUNK - 100 - 9)]
        assert not cache.read_block_into(IDENT, CHUNK, sums, len(data), 0, [memoryview(b) for b in bufs])
        assert not path.exists() and cache.stats().corrupt_dropped == 1


def test_a_block_with_a_wrong_chunk_is_refused_whole(cache_dir: Path) -> None:
    data, sums = block(2)
    good, good_sums = block(3)
    bad = bytearray(data)
    bad[2 * CHUNK + 7] ^= 1
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        assert cache.insert_blocks(IDENT, CHUNK, [(sums, bad), (good_sums, good)]) == [None, True]
        assert entries_on_disk(cache_dir) == [block_path(cache_dir, IDENT, good_sums, len(good))]
        assert read_block(cache, IDENT, sums, len(data), 0, 1) is None


@pytest.mark.parametrize("where", ["chunk", "other-chunk", "header", "truncate"])
def test_a_corrupt_block_is_detected_by_a_read_of_its_chunk_dropped_and_inserted_again(cache_dir: Path,
                                                                                      where: str) -> None:
    """A flipped byte in the chunk read, or in the header, or a truncated file: the
    read misses, the entry is removed and counted; a read of one chunk checks only
    the header and that chunk (a flip in another chunk is found by that chunk's read)."""
    data, sums = block(4)
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        cache.insert_blocks(IDENT, CHUNK, [(sums, data)])
        path = block_path(cache_dir, IDENT, sums, len(data))
        raw = bytearray(path.read_bytes())
        head = len(raw) - len(data)
        if where == "truncate":
            os.truncate(path, len(raw) - 1)
        else:
            raw[{"chunk": head + CHUNK + 5, "other-chunk": head + 3 * CHUNK + 5, "header": 30}[where]] ^= 1
            path.write_bytes(raw)
        if where == "other-chunk":
            assert read_block(cache, IDENT, sums, len(data), 1, 1) == data[CHUNK : 2 * CHUNK]
            assert path.exists()
            assert read_block(cache, IDENT, sums, len(data), 2, 2) is None
        else:
            assert read_block(cache, IDENT, sums, len(data), 1, 1) is None
        assert not os.path.lexists(path)
        st = cache.stats()
        assert (st.corrupt_dropped, st.entries, st.bytes) == (1, 0, 0)
        assert cache.insert_blocks(IDENT, CHUNK, [(sums, data)]) == [True]  # fetched again
        assert read_block(cache, IDENT, sums, len(data), 0, 4) == data


def test_blocks_are_evicted_least_recently_used_first_under_the_bound(cache_dir: Path) -> None:
    blocks = [block(10 + i, tail=0) for i in range(6)]
    size = 24 + 8 * 4 + 4 * CHUNK  # one entry's bytes: its header and its chunks
    with ChunkCache(str(cache_dir), 3 * size) as cache:
        for data, sums in blocks:
            assert cache.insert_blocks(IDENT, CHUNK, [(sums, data)]) == [True]
            assert read_block(cache, IDENT, blocks[0][1], len(blocks[0][0]), 0, 1) is not None  # 0 stays hot
            assert cache.stats().bytes <= 3 * size
        kept = [read_block(cache, IDENT, sums, len(data), 0, 4) == data for data, sums in blocks]
        assert kept == [True, False, False, False, True, True]
        st = cache.stats()
        assert (st.entries, st.bytes, st.evictions) == (3, 3 * size, 3)
        assert sum(p.stat().st_size for p in entries_on_disk(cache_dir)) == 3 * size


# -- two processes --------------------------------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import random, sys, xxhash
    from loader.remote import ChunkCache
    directory, me, bound = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cache = ChunkCache(directory, bound)
    rng = random.Random(me)
    shared = [random.Random(i).randbytes(4096 + 512 * (i % 3)) for i in range(12)]
    own = [random.Random(1000 * (me + 1) + i).randbytes(4096) for i in range(6)]
    hits = 0
    for step in range(400):
        ident, data = (7, rng.choice(shared)) if rng.random() < 0.6 else (100 + me, rng.choice(own))
        s = xxhash.xxh3_64_intdigest(data)
        buf = bytearray(len(data))
        if cache.read_into(ident, s, len(data), buf):
            assert buf == data, "a hit returned other bytes"
            hits += 1
        else:
            cache.insert(ident, s, data)
    st = cache.stats()
    print(hits, st.corrupt_dropped, st.evictions)
""")


def test_two_processes_share_the_cache_at_once_under_a_small_bound(cache_dir: Path) -> None:
    """Same and different chunks inserted and read by two processes at once: no
    exception, every hit byte-exact and verified, nothing counted corrupt, and the
    bound held at the end with the shared totals equal to what is on disk."""
    bound = 8 * CHUNK
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(cache_dir), str(me), str(bound)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for me in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        hits, corrupt, evictions = map(int, out.split())
        assert hits > 0 and evictions > 0 and corrupt == 0
    on_disk = entries_on_disk(cache_dir)
    assert sum(p.stat().st_size for p in on_disk) <= bound
    assert not list((cache_dir / "v2").rglob(".tmp-*"))
    with ChunkCache(str(cache_dir), bound) as cache:
        before = cache.stats()
        assert (before.entries, before.bytes) == (len(on_disk), sum(p.stat().st_size for p in on_disk))
        cache.refresh()
        assert (cache.stats().entries, cache.stats().bytes) == (before.entries, before.bytes)


_BLOCK_WORKER = textwrap.dedent("""
    import random, sys, xxhash
    from loader.remote import ChunkCache
    directory, me, bound = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    C = 4096
    cache = ChunkCache(directory, bound)
    rng = random.Random(me)
    def make(seed, n):
        data = random.Random(seed).randbytes(n * C - 300)
        return data, [xxhash.xxh3_64_intdigest(data[j : j + C]) for j in range(0, len(data), C)]
    shared = [make(i, 4) for i in range(8)]
    own = [make(1000 * (me + 1) + i, 4) for i in range(4)]
    hits = 0
    for step in range(300):
        ident, (data, sums) = (7, rng.choice(shared)) if rng.random() < 0.6 else (100 + me, rng.choice(own))
        first = rng.randrange(4)
        n = rng.randrange(1, 5 - first)
        buf = bytearray(min(n * C, len(data) - first * C))
        if cache.read_block_into(ident, C, sums, len(data), first, buf):
            assert buf == data[first * C : first * C + len(buf)], "a hit returned other bytes"
            hits += 1
        else:
            assert cache.insert_blocks(ident, C, [(sums, data)]) == [True]
    st = cache.stats()
    print(hits, st.corrupt_dropped, st.evictions)
""")


def test_two_processes_share_blocks_at_once_under_a_small_bound(cache_dir: Path) -> None:
    """As above with blocks, each read a random run of a block's chunks: every hit
    byte-exact, nothing counted corrupt (a block renamed over by another process is
    the same bytes), the bound held, the totals equal to the disk."""
    bound = 5 * (4 * CHUNK - 300 + 24 + 32)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _BLOCK_WORKER, str(cache_dir), str(me), str(bound)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for me in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        hits, corrupt, evictions = map(int, out.split())
        assert hits > 0 and evictions > 0 and corrupt == 0
    on_disk = entries_on_disk(cache_dir)
    assert sum(p.stat().st_size for p in on_disk) <= bound
    assert not list((cache_dir / "v2").rglob(".tmp-*"))
    with ChunkCache(str(cache_dir), bound) as cache:
        before = cache.stats()
        assert (before.entries, before.bytes) == (len(on_disk), sum(p.stat().st_size for p in on_disk))


# -- hostile directories ------------------------------------------------------------------------------


def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
    else:
        theirs = Path("/")  # root's, and not writable by us: refused before anything is made
    with pytest.raises(CacheError, match="owned by uid"):
        ChunkCache(str(theirs), 1 << 20)
    assert not (theirs / "v2").exists()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_directory_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(CacheError, match="writable by"):
        ChunkCache(str(d), 1 << 20)
    assert not (d / "v2").exists()


def test_a_symlinked_cache_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(CacheError, match="symbolic link"):
        ChunkCache(str(link), 1 << 20)
    assert not (real / "v2").exists()
    (real / "v2").symlink_to(tmp_path)  # inside a good directory too
    with pytest.raises(CacheError, match="symbolic link"):
        ChunkCache(str(real), 1 << 20)


def test_symlinked_directories_inside_are_never_followed(cache_dir: Path, tmp_path: Path) -> None:
    """A checkpoint's directory replaced by a symlink: reads miss and inserts fail,
    nothing is read or written through it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    a = chunk(70)
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        (cache_dir / "v2" / f"{IDENT:016x}").symlink_to(elsewhere)
        assert not cache.insert(IDENT, key(a), a)
        assert read(cache, IDENT, a) is None
    assert not list(elsewhere.iterdir())


# -- prune ------------------------------------------------------------------------------------------------


def test_prune_to_a_size_to_nothing_and_one_checkpoint(cache_dir: Path) -> None:
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        mine = [chunk(80 + i) for i in range(4)]
        theirs = [chunk(90 + i) for i in range(2)]
        for x in mine:
            cache.insert(IDENT, key(x), x)
        for x in theirs:
            cache.insert(OTHER, key(x), x)
        read(cache, IDENT, mine[0])
        report = cache.prune(max_bytes=5 * CHUNK)
        assert (report.entries, report.bytes) == (1, CHUNK)
        assert read(cache, IDENT, mine[1]) is None and read(cache, IDENT, mine[0]) == mine[0]
        report = cache.prune(identity=OTHER)
        assert (report.entries, report.bytes) == (2, 2 * CHUNK)
        assert not (cache_dir / "v2" / f"{OTHER:016x}").exists()
        assert read(cache, IDENT, mine[2]) == mine[2]
        report = cache.prune()
        assert (report.entries, cache.stats().entries, cache.stats().bytes) == (3, 0, 0)
        assert not entries_on_disk(cache_dir)
        with pytest.raises(ValueError):
            cache.prune(max_bytes=1, identity=IDENT)


# -- the command line -----------------------------------------------------------------------------------


def test_cache_stats_and_prune_commands(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ChunkCache(str(cache_dir), 1 << 20) as cache:
        for i in range(3):
            cache.insert(IDENT, key(chunk(100 + i)), chunk(100 + i))
        cache.insert(OTHER, key(chunk(110)), chunk(110))
    assert main(["cache", "stats", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert f"4 entries, 16.0 KiB ({4 * CHUNK} bytes) of 2 checkpoint(s)" in out
    assert f"{IDENT:016x}  3 entries" in out
    assert main(["cache", "stats", "--cache-dir", str(cache_dir), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert (facts["entries"], facts["bytes"]) == (4, 4 * CHUNK)
    assert facts["checkpoints"][0] == {"identity": f"{IDENT:016x}", "entries": 3, "bytes": 3 * CHUNK}
    assert main(["cache", "prune", "--cache-dir", str(cache_dir), "--size", "8K"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert len(entries_on_disk(cache_dir)) == 2
    assert main(["cache", "prune", "--cache-dir", str(cache_dir), "--identity", f"{OTHER:x}"]) == 0
    capsys.readouterr()
    assert main(["cache", "prune", "--cache-dir", str(cache_dir), "--all"]) == 0
    assert "0 entries, 0 B left" in capsys.readouterr().out
    assert not entries_on_disk(cache_dir)


@pytest.mark.parametrize("argv, message", [
    (["cache", "stats", "--cache-dir", "{tmp}/missing"], "no such directory"),
    (["cache", "stats", "--cache-dir", "{tmp}/open"], "writable by others"),
    (["cache", "prune", "--cache-dir", "{tmp}/open", "--all"], "writable by others"),
    (["cache", "prune", "--cache-dir", "{tmp}"], "one of the arguments --size --identity --all is required"),
    (["cache", "prune", "--cache-dir", "{tmp}", "--size", "lots"], "not a size"),
    (["cache", "prune", "--cache-dir", "{tmp}", "--identity", "xyz"], "not a hex digest"),
])
def test_cache_command_failures_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # usage errors: argparse's exit
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("pageload") and err.count("\n") == 1 and message in err, err


def test_cache_help_is_true(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["cache", "--help"], ["cache", "stats", "--help"], ["cache", "prune", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "least recently used" in out and "--cache-dir DIR" in out


def test_the_cache_is_exported_from_loader_remote() -> None:
    import loader.remote

    names = {"DEFAULT_CACHE_SIZE", "CacheError", "CacheStats", "ChunkCache", "PruneReport", "default_cache_dir",
             "parse_cache_size"}
    assert names <= set(loader.remote.__all__)
    for name in names:
        assert getattr(loader.remote, name) is not None


# -- defaults and sizes ------------------------------------------------------------------------------------


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/svc:/other")
    assert default_cache_dir() == "/var/cache/svc"  # systemd's CacheDirectory=
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == "/var/cache/pageload"  # root: one cache for the host's daemons
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_cache_dir() == str(tmp_path / "pageload")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / ".cache" / "pageload")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/nonexistent/home")
    assert default_cache_dir() == "/var/cache/pageload"


def test_parse_cache_size() -> None:
    assert parse_cache_size("64G") == 64 << 30 and parse_cache_size("1") == 1
    for bad in ("0", "-1", "big"):
        with pytest.raises(ValueError):
            parse_cache_size(bad)


# -- the in-memory index ------------------------------------------------------------------------------------


def test_the_index_finds_what_it_holds_through_growth_deletes_and_rebuilds() -> None:
    index = _Index()
    rng = np.random.default_rng(5)
    sums = [int(s) for s in rng.integers(0, 2**63, 5000, dtype=np.uint64)]
    for i, s in enumerate(sums):
        assert index.add(i % 3, s, 4096, i)
    assert not index.add(0, sums[0], 4096, 10**9)  # known: its recency rises
    assert int(index.tick[index.find(0, sums[0], 4096)]) == 10**9
    for i in range(0, 5000, 2):
        index.remove(index.find(i % 3, sums[i], 4096))
    for i, s in enumerate(sums):
        assert (index.find(i % 3, s, 4096) >= 0) == (i % 2 == 1)
        assert index.find((i + 1) % 3, s, 4096) == -1 and index.find(i % 3, s, 8192) == -1
    slots, ticks = index.oldest(10)
    assert list(ticks) == list(range(1, 21, 2)) and [int(index.tick[s]) for s in slots] == list(ticks)
    assert index.live == 2500


def test_the_index_costs_a_few_dozen_bytes_an_entry() -> None:
    """100K entries, from one walk's columns (bulk) and one at a time: measured with
    tracemalloc (NumPy reports its buffers to it), generously bounded."""
    n = 100_000
    sums = np.random.default_rng(6).integers(0, 2**63, n, dtype=np.uint64)
    tracemalloc.start()
    try:
        index = _Index()
        index.bulk(np.zeros(n, np.uint32), sums, np.full(n, 16384, np.uint64), np.arange(n, dtype=np.int64))
        bulk = tracemalloc.get_traced_memory()[0] / n
        del index
        tracemalloc.clear_traces()
        index = _Index()
        for i, s in enumerate(sums[: n // 4].tolist()):  # a quarter, one at a time (tracemalloc is slow)
            index.add(1, s, 16384, i)
        single = tracemalloc.get_traced_memory()[0] / (n // 4)
    finally:
        tracemalloc.stop()
    assert index.find(1, int(sums[7]), 16384) >= 0
    assert bulk < 100 and single < 200, (bulk, single)
