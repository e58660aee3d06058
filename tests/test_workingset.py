"""Working sets: recording, the file, merging, replay before the sweep,
refusal of stale/foreign/corrupt files, clipping, memory O(ranges), and the
checkpoint laid out with its working set first."""

from __future__ import annotations

import logging
import os
import pathlib
import random
import signal
import stat
import subprocess
import sys
import tracemalloc
from array import array

import msgpack
import pytest
import trio

import aio
import aio.testing
from loader import (
    CheckpointIdentity,
    ClientError,
    DaemonOptions,
    Layout,
    Loader,
    LoaderConfig,
    MemoryFile,
    RangeSet,
    TrioClient,
    WorkingSet,
    WorkingSetError,
    WorkingSetOrder,
    WorkingSetRecorder,
    checkpoint_identity,
    merge_working_sets,
    read_working_set,
    replay_order,
    run_daemon,
    write_working_set,
)
from loader.checkpoint import create_checkpoint, open_checkpoint
from loader.core._replay import chunk_hull, replay_plan
from loader.core._workingset import (
    DEFAULT_NAME,
    check_recording_path,
    clip_working_set,
    decode_working_set,
    encode_working_set,
)
from loader.source import FileSource
from workloads import make_sample_image

PAGE = 4096
MiB = 1 << 20
SIZE = 32 * MiB
IDENT = CheckpointIdentity("raw", 64 * MiB, PAGE, 0x1234)


def ws_of(ranges, identity=IDENT, times=None):
    """A working set from [(offset, length)] in first-touch order."""
    times = times or list(range(len(ranges)))
    return WorkingSet(identity, array("Q", [o for o, _ in ranges]), array("Q", [n for _, n in ranges]),
                      array("Q", times))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("ws-images")
    raw = str(d / "memory.img")
    make_sample_image(raw, SIZE, seed=3, data_fraction=1.0, zero_page_fraction=0.0)
    with open(raw, "rb") as f:
        expected = f.read()
    return {"raw": raw, "dir": str(d), "expected": expected}


# --------------------------------------------------------------------------- recording
def test_recorder_keeps_first_touch_order_and_each_page_once():
    rec = WorkingSetRecorder(IDENT)
    rec.touched(0, PAGE)  # before start: ignored
    rec.start()
    for lo, hi in [(10 * PAGE, 12 * PAGE), (12 * PAGE, 13 * PAGE), (2 * PAGE, 3 * PAGE),
                   (11 * PAGE, 14 * PAGE), (0, 4 * PAGE)]:
        rec.touched(lo, hi)
    ws = rec.stop()
    rec.touched(40 * PAGE, 41 * PAGE)  # after the window: ignored
    # 10..12 grew by the adjacent touch (12..13); the 4th touch adds only page 13, after page 2
    # (not adjacent to the range touched just before); the last adds only 0..2 and 3..4
    assert list(zip(ws.offset, ws.length)) == [
        (10 * PAGE, 3 * PAGE), (2 * PAGE, PAGE), (13 * PAGE, PAGE), (0, 2 * PAGE), (3 * PAGE, PAGE),
    ]
    assert list(ws.first_touch_us) == sorted(ws.first_touch_us)
    assert ws.total_bytes == 8 * PAGE and rec.touches == 5


def test_file_round_trip_and_atomic_write(tmp_path):
    ws = ws_of([(8 * PAGE, PAGE), (0, 4 * PAGE)], times=[5, 900])
    ws.window_s = 2.5
    path = str(tmp_path / "ws.msgpack")
    write_working_set(path, ws)
    assert os.listdir(tmp_path) == ["ws.msgpack"]  # no temporary left behind
    got = read_working_set(path)
    assert got.identity == IDENT and list(got.ranges()) == list(ws.ranges()) and got.window_s == 2.5
    with open(path, "rb") as f:
        assert f.read(40).find(b"pageload-working-set") > 0  # "format" comes first


def _corrupt_cases():
    good = msgpack.unpackb(encode_working_set(ws_of([(0, PAGE), (4 * PAGE, PAGE)])))
    cases = {
        "empty": b"",
        "garbage": b"\x00\xff garbage",
        "truncated": encode_working_set(ws_of([(0, PAGE)]))[:-5],
        "a list": msgpack.packb([1, 2]),
        "trailing bytes": encode_working_set(ws_of([(0, PAGE)])) + b"x",
    }

    def variant(**changes):
        d = dict(good)
        d.update(changes)
        return msgpack.packb(d, use_bin_type=True)

    cases["version 2"] = variant(version=2)
    cases["short column"] = variant(offset=good["offset"][:-8])
    cases["count lies"] = variant(ranges=5)
    cases["no checkpoint"] = variant(checkpoint="x")
    cases["unaligned"] = variant(offset=array("Q", [1, 4 * PAGE]).tobytes())
    cases["overlap"] = variant(offset=array("Q", [0, 0]).tobytes())
    cases["times backwards"] = variant(first_touch_us=array("Q", [9, 1]).tobytes())
    cases["bool version"] = variant(version=True)
    return cases


@pytest.mark.parametrize("name", list(_corrupt_cases()))
def test_corrupt_file_is_one_line_error(tmp_path, name):
    path = str(tmp_path / "ws.msgpack")
    with open(path, "wb") as f:
        f.write(_corrupt_cases()[name])
    with pytest.raises(WorkingSetError) as err:
        read_working_set(path)
    assert str(err.value).startswith(path + ": ") and "\n" not in str(err.value)


def test_an_image_given_as_a_working_set_is_not_one(tmp_path, images):
    with pytest.raises(WorkingSetError, match="not a working set"):
        read_working_set(images["raw"])  # starts with a msgpack int (a page's offset + 1)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(WorkingSetError, match="No such file"):
        read_working_set(str(tmp_path / "nope"))


# --------------------------------------------------------------------------- merging
def test_merge_is_a_union_ordered_by_median_first_touch():
    a = ws_of([(0, 2 * PAGE), (10 * PAGE, PAGE)], times=[100, 200])
    b = ws_of([(PAGE, 2 * PAGE), (20 * PAGE, PAGE)], times=[10, 50])
    c = ws_of([(10 * PAGE, PAGE)], times=[1])
    m = merge_working_sets([a, b, c])
    # page 0: [100]; page 1: [100, 10] -> 10 (median_low); page 2: [10]; page 10: [200, 1] -> 1;
    # page 20: [50]
    assert list(m.ranges()) == [(10 * PAGE, PAGE, 1), (PAGE, 2 * PAGE, 10), (20 * PAGE, PAGE, 50),
                                (0, PAGE, 100)]
    assert m.recordings == 3
    assert m.total_bytes == RangeSet([(0, 3 * PAGE), (10 * PAGE, 11 * PAGE), (20 * PAGE, 21 * PAGE)]).total


def test_merge_refuses_another_checkpoint():
    other = CheckpointIdentity("raw", 64 * MiB, PAGE, 0x9999)
    with pytest.raises(WorkingSetError, match="recorded for another checkpoint"):
        merge_working_sets([ws_of([(0, PAGE)]), ws_of([(0, PAGE)], identity=other)], ["a", "b"])


def test_cli_merge_and_show(tmp_path):
    a, b, out = (str(tmp_path / n) for n in ("a", "b", "out"))
    write_working_set(a, ws_of([(0, PAGE)], times=[5]))
    write_working_set(b, ws_of([(8 * PAGE, PAGE)], times=[1]))
    run = [sys.executable, "-m", "cli", "working-set"]
    r = subprocess.run([*run, "merge", a, b, "-o", out], capture_output=True, text=True, check=True)
    assert "2 recordings" in r.stdout
    r = subprocess.run([*run, "show", out], capture_output=True, text=True, check=True)
    assert "8.0 KiB" in r.stdout and "2 ranges" in r.stdout
    with open(a, "wb") as f:
        f.write(b"junk")
    r = subprocess.run([*run, "show", a], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"pageload: {a}: ")


# --------------------------------------------------------------------------- replay order
def test_replay_plan_keeps_first_touch_order_and_merges_neighbours():
    ranges = [(40 * PAGE, PAGE), (2 * PAGE, PAGE), (30 * PAGE, PAGE), (3 * PAGE, PAGE)]
    layout = Layout(64 * MiB, PAGE, [(0, 64 * MiB, 0)])
    lo, hi = replay_plan(ws_of(ranges), layout, batch=PAGE, gap=0)  # one range per batch
    assert list(zip(lo, hi)) == [(a, a + n) for a, n in ranges]
    lo, hi = replay_plan(ws_of(ranges), layout, gap=0)  # neighbours merged, in the place of the first
    assert list(zip(lo, hi)) == [(40 * PAGE, 41 * PAGE), (2 * PAGE, 4 * PAGE), (30 * PAGE, 31 * PAGE)]
    lo, hi = replay_plan(ws_of(ranges), layout, batch=2 * PAGE, gap=0)  # pages 2 and 3 in other batches
    assert list(zip(lo, hi)) == [(a, a + n) for a, n in ranges]
    lo, hi = replay_plan(ws_of(ranges), layout)  # the default gap (64 KiB) is read through
    assert list(zip(lo, hi)) == [(30 * PAGE, 41 * PAGE), (2 * PAGE, 4 * PAGE)]


def test_chunk_hull_covers_whole_checksum_chunks():
    # memory: data at [0, 2M) and [4M, 6M), pages file contiguous: file [0, 2M) and [2M, 4M)
    layout = Layout(8 * MiB, PAGE, [(0, 2 * MiB, 0), (4 * MiB, 2 * MiB, 2 * MiB)])
    assert chunk_hull(layout, PAGE, 2 * PAGE, MiB) == (0, MiB)
    assert chunk_hull(layout, 4 * MiB + PAGE, 4 * MiB + 2 * PAGE, 3 * MiB) == (0, 5 * MiB)  # file [0, 3M)
    assert chunk_hull(layout, 2 * MiB + PAGE, 3 * MiB, MiB) == (2 * MiB + PAGE, 3 * MiB)  # a hole: as is
    assert chunk_hull(layout, 5 * MiB, 6 * MiB, 4 * MiB) == (0, 6 * MiB)  # chunk 0 is the whole file


def test_clip_past_memory_size():
    ws = ws_of([(0, PAGE), (60 * MiB, 8 * MiB), (70 * MiB, PAGE)])
    clipped, dropped = clip_working_set(ws, 64 * MiB)
    assert list(zip(clipped.offset, clipped.length)) == [(0, PAGE), (60 * MiB, 4 * MiB)]
    assert dropped == 4 * MiB + PAGE


class RecordingQueue(aio.testing.DelayedQueue):
    """Slowed, and remembers each request (file offset, length, urgent) in order."""

    def __init__(self, inner, delay):
        super().__init__(inner, delay)
        self.log = []

    def _add(self, request):
        self.log.append((request.offset, request.length, request.urgent))
        super()._add(request)


def _pages_file(path, memory_size):
    rng = random.Random(1)
    data = rng.randbytes(memory_size)
    with open(path, "wb") as f:
        f.write(data)
    return data


async def test_replay_loads_the_working_set_first_in_order_then_sweeps(tmp_path):
    size = 8 * MiB
    data = _pages_file(str(tmp_path / "pages"), size)
    layout = Layout(size, PAGE, [(0, size, 0)])
    ranges = [(6 * MiB, 64 * 1024), (1 * MiB, 8 * 1024), (7 * MiB, 4 * 1024), (3 * MiB, 128 * 1024)]
    ws = ws_of(ranges, identity=CheckpointIdentity("raw", size, PAGE, 0))
    for attempt in range(2):  # deterministic: the same reads in the same order
        order = replay_order(ws, layout, batch=PAGE, gap=0)
        queue = RecordingQueue(aio.open_queue("sync", 8), 0.0005)
        fd = os.open(str(tmp_path / "pages"), os.O_RDONLY)
        mem = MemoryFile(size)
        loader = Loader(FileSource(layout, fd), mem, queue, LoaderConfig(queue_depth=8, background_reads=1,
                                                             busy_background_reads=1), order)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader.run)
            await loader.done.wait()
        await loader.aclose()
        assert mem.view == data
        first = queue.log[: len(ranges)]
        assert [(o, n) for o, n, _ in first] == ranges  # each exactly its range: no read past it
        if attempt == 0:
            log0 = queue.log
        else:
            assert queue.log == log0
        s = order.statistics()
        assert s["size_bytes"] == s["loaded_bytes"] == sum(n for _, n in ranges)
        assert s["loaded_s"] is not None and not s["replaying"]
        mem.close()
        os.close(fd)


async def test_waiters_still_come_first_during_replay(tmp_path):
    size = 8 * MiB
    _pages_file(str(tmp_path / "pages"), size)
    layout = Layout(size, PAGE, [(0, size, 0)])
    ws = ws_of([(o * 256 * 1024, 256 * 1024) for o in range(0, 24)],
               identity=CheckpointIdentity("raw", size, PAGE, 0))
    order = replay_order(ws, layout, batch=PAGE, gap=0)
    queue = RecordingQueue(aio.open_queue("sync", 8), 0.003)
    fd = os.open(str(tmp_path / "pages"), os.O_RDONLY)
    mem = MemoryFile(size)
    loader = Loader(FileSource(layout, fd), mem, queue, LoaderConfig(queue_depth=8, background_reads=1,
                                                         busy_background_reads=1), order)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await trio.sleep(0.01)
        assert order.replaying
        issued = len(queue.log)
        await loader.wait_loaded(size - PAGE, PAGE)  # outside the working set
        # the wait's read went out before any further working-set read
        assert queue.log[issued] == (size - PAGE, PAGE, True)
        assert order.replaying  # the wait did not have to wait for the replay
        await loader.done.wait()
    await loader.aclose()
    s = order.statistics()
    assert s["waits_missed"] == 1 and s["waits_hit"] == 0
    mem.close()
    os.close(fd)


def test_order_statistics_classify_waits():
    members = RangeSet([(0, 4 * PAGE)])
    order = WorkingSetOrder(array("Q", [0]), array("Q", [4 * PAGE]), members)
    order.note_wait(0, PAGE, 0)  # already loaded, in the set
    order.note_wait(PAGE, 2 * PAGE, PAGE)  # in the set, not loaded yet
    order.note_wait(8 * PAGE, 9 * PAGE, PAGE)  # outside
    order.note_wait(8 * PAGE, 9 * PAGE, 0)  # outside, loaded: not counted
    s = order.statistics()
    assert (s["waits_hit"], s["waits_early"], s["waits_missed"]) == (1, 1, 1)
    assert s["hit_rate"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- memory
def test_a_million_page_working_set_is_not_held_per_page():
    pages = 1 << 20
    block = 1024  # pages per touch
    blocks = list(range(pages // block))
    random.Random(5).shuffle(blocks)
    size = pages * PAGE
    identity = CheckpointIdentity("raw", size, PAGE, 0)
    layout = Layout(size, PAGE, [(0, size, 0)])
    tracemalloc.start()
    try:
        rec = WorkingSetRecorder(identity)
        rec.start()
        for b in blocks:
            rec.touched(b * block * PAGE, (b + 1) * block * PAGE)
        ws = rec.stop()
        ws = decode_working_set(encode_working_set(ws))
        order = replay_order(ws, layout)
        unloaded = RangeSet([(0, size)])
        while (start := order.next_start(unloaded)) is not None:
            limit = order.limit_for(start) or size
            end = min(limit, start + 64 * MiB)
            unloaded.remove(start, end)
            order.note_loaded(start, end)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # shuffled blocks that happen to follow each other merge
    assert ws.total_bytes == size and len(blocks) // 2 < len(ws) <= len(blocks)
    assert order.statistics()["loaded_bytes"] == size
    # 1024 ranges: a few columns of 8-byte entries and small lists; per page would be > 28 MiB
    assert peak < 2 * MiB, peak


# --------------------------------------------------------------------------- the daemon
def options(tmp_path, source, **kw):
    kw.setdefault("handle_signals", False)
    kw.setdefault("ready_line", False)
    return DaemonOptions(source=source, socket_path=str(tmp_path / "s.sock"), **kw)


def slowed(delay):
    return lambda q: aio.testing.DelayedQueue(q, delay)


TOUCHED = [(20 * MiB, 3 * PAGE), (5 * MiB + 7 * PAGE, PAGE), (30 * MiB, 16 * PAGE), (5 * MiB, 2 * PAGE)]


async def _record(tmp_path, source, path, touched=TOUCHED):
    opts = options(tmp_path, source, record_working_set=path, record_seconds=None, aio_backend="sync",
                   wrap_queue=slowed(0.001), use_working_set=False)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        async with TrioClient.connect(state.server.path) as client:
            for off, n in touched:
                await client.wait(off, n)
        state.stop()


async def test_record_then_replay_end_to_end(tmp_path, images):
    src = str(tmp_path / "mem.img")
    os.link(images["raw"], src)
    await _record(tmp_path, src, "")  # the default path beside the image
    path = src + "." + DEFAULT_NAME
    ws = read_working_set(path)
    assert list(zip(ws.offset, ws.length)) == [(o & ~(PAGE - 1), n) for o, n in TOUCHED]
    assert ws.identity == checkpoint_identity(open_checkpoint(src))
    # replay: picked up by default; it loads before the sweep, and the same waits all hit
    opts = options(tmp_path, src, aio_backend="sync", wrap_queue=slowed(0.002))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        order = state.loader.order
        assert isinstance(order, WorkingSetOrder)
        async with TrioClient.connect(state.server.path) as client:
            with trio.fail_after(30):
                while (await client.stats())["working_set"]["loaded_s"] is None:
                    await trio.sleep(0.005)
            stats = await client.stats()
            assert stats["loaded_bytes"] < stats["total_bytes"]  # the sweep has barely started
            for off, n in TOUCHED:
                await client.wait(off, n)
                assert state.memory.view[off:off + n] == images["expected"][off:off + n]
            s = (await client.stats())["working_set"]
        assert s["waits_hit"] == len(TOUCHED) and s["waits_missed"] == s["waits_early"] == 0
        assert s["size_bytes"] == s["loaded_bytes"] == ws.total_bytes
        await state.loader.done.wait()
        assert state.memory.view == images["expected"]
        state.stop()


async def test_pages_checkpoint_verified_replay_loads_whole_chunks_and_waits_hit(tmp_path, images):
    ckpt = str(tmp_path / "ckpt")
    create_checkpoint(images["raw"], ckpt, chunk_size=256 * 1024)
    await _record(tmp_path, ckpt, "")
    assert os.path.exists(os.path.join(ckpt, DEFAULT_NAME))
    opts = options(tmp_path, ckpt, aio_backend="sync", wrap_queue=slowed(0.002))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        order = state.loader.order
        assert isinstance(order, WorkingSetOrder)
        # spans grew to whole 256 KiB chunks: verified pages are served only chunk by chunk
        assert all((b - a) % (256 * 1024) == 0 for a, b in zip(order.span_lo, order.span_hi))
        async with TrioClient.connect(state.server.path) as client:
            with trio.fail_after(30):
                while (await client.stats())["working_set"]["loaded_s"] is None:
                    await trio.sleep(0.005)
            for off, n in TOUCHED:
                await client.wait(off, n)
                assert state.memory.view[off:off + n] == images["expected"][off:off + n]
            s = (await client.stats())["working_set"]
            assert s["waits_hit"] == len(TOUCHED)
        state.stop()


async def test_no_working_set_ignores_the_default(tmp_path, images):
    src = str(tmp_path / "mem.img")
    os.link(images["raw"], src)
    await _record(tmp_path, src, "")
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, src, use_working_set=False))
        assert not isinstance(state.loader.order, WorkingSetOrder)
        state.stop()


async def test_foreign_working_set_is_refused(tmp_path, images, caplog):
    src = str(tmp_path / "mem.img")
    os.link(images["raw"], src)
    foreign = str(tmp_path / "foreign.msgpack")
    write_working_set(foreign, ws_of([(0, PAGE)], identity=CheckpointIdentity("raw", SIZE, PAGE, 1)))
    with pytest.raises(WorkingSetError, match="recorded for another checkpoint") as err, trio.fail_after(30):
        await run_daemon(options(tmp_path, src, working_set=foreign))
    assert "\n" not in str(err.value)
    # the same file as the default beside the checkpoint: one warning, restore goes on without it
    os.rename(foreign, src + "." + DEFAULT_NAME)
    caplog.set_level(logging.WARNING, logger="pageload")
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, src))
        assert not isinstance(state.loader.order, WorkingSetOrder)
        state.stop()
    assert any("ignoring the working set" in r.getMessage() and "another checkpoint" in r.getMessage()
               for r in caplog.records)


async def test_stale_working_set_of_a_recreated_checkpoint_is_refused(tmp_path, images):
    ckpt = str(tmp_path / "ckpt")
    create_checkpoint(images["raw"], ckpt)
    ws_path = str(tmp_path / "ws.msgpack")
    await _record(tmp_path, ckpt, ws_path)
    # the checkpoint is made again from another image: same size, other data
    other = str(tmp_path / "other.img")
    make_sample_image(other, SIZE, seed=4, data_fraction=1.0, zero_page_fraction=0.0)
    os.rename(ckpt, str(tmp_path / "old"))
    create_checkpoint(other, ckpt)
    with pytest.raises(WorkingSetError, match="recorded for another checkpoint"), trio.fail_after(30):
        await run_daemon(options(tmp_path, ckpt, working_set=ws_path))


def test_cli_refusals_are_one_line_exit_2(tmp_path, images):
    src = str(tmp_path / "mem.img")
    os.link(images["raw"], src)
    bad = str(tmp_path / "bad.msgpack")
    with open(bad, "wb") as f:
        f.write(encode_working_set(ws_of([(0, PAGE)]))[:-3])
    base = [sys.executable, "-m", "cli", "restore", src, "--socket", str(tmp_path / "s.sock"), "-q"]
    for extra, needle in ((["--working-set", bad], "truncated"),
                          (["--record-seconds", "-1"], "record seconds must be a positive"),
                          (["--working-set", bad, "--no-working-set"], "contradict"),
                          (["--record-working-set", str(tmp_path / "no" / "dir" / "ws")], "cannot record")):
        r = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and needle in r.stderr and r.stderr.startswith("pageload: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
async def test_recording_into_a_read_only_directory_fails_at_start(tmp_path, images):
    d = tmp_path / "ro"
    d.mkdir()
    src = str(d / "mem.img")
    os.link(images["raw"], src)
    d.chmod(0o555)
    try:
        with pytest.raises(WorkingSetError, match="cannot record a working set here"), trio.fail_after(30):
            await run_daemon(options(tmp_path, src, record_working_set=""))
    finally:
        d.chmod(0o755)


def test_recording_into_an_unwritable_directory_fails_even_as_root():
    # /proc takes no new files, whoever asks: the check that runs before READY says so
    with pytest.raises(WorkingSetError, match="cannot record a working set here: /proc"):
        check_recording_path("/proc/working-set.msgpack")


def _restore_recording(source, record, tmp_path, *extra):
    """``pageload restore SOURCE --record-working-set RECORD`` as a process: (exit status, stderr).
    A daemon that starts gets a request and a mark (so it writes its recording), then SIGTERM."""
    sock = str(tmp_path / "rec.sock")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "restore", source, "--socket", sock, "--background",
                             "-q", "--record-working-set", record, "--record-seconds", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        if proc.stdout.readline().startswith("READY"):
            from loader import Client
            with Client.connect(sock) as c:
                c.wait(0, PAGE)
                c.mark()
                for _ in range(200):  # the window task writes the file, then answers nothing: poll stats
                    if not c.stats()["recording"]["active"]:
                        break
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def _fingerprint(path):
    st = os.lstat(path)
    data = b"" if not stat.S_ISREG(st.st_mode) else pathlib.Path(path).read_bytes()
    return stat.S_IFMT(st.st_mode), st.st_ino, st.st_size, data


@pytest.fixture
def ckpt(tmp_path, images):
    d = str(tmp_path / "ckpt")
    create_checkpoint(images["raw"], d)
    return d


@pytest.mark.parametrize("what", ["pages.img", "index.msgpack", "source image", "fifo", "symlink to pages.img",
                                  "dangling symlink", "existing file"])
def test_record_working_set_never_replaces_what_is_not_its_own(tmp_path, images, ckpt, what):
    """--record-working-set renamed its file over whatever was at the path: a checkpoint's
    pages.img (133 MB -> 180 bytes), a raw source image, a FIFO, /dev/full as root."""
    source = ckpt
    target = str(tmp_path / "target")
    if what in ("pages.img", "index.msgpack"):
        target = os.path.join(ckpt, what)
    elif what == "source image":
        source = str(tmp_path / "mem.img")
        os.link(images["raw"], source)
        target = source
    elif what == "fifo":
        os.mkfifo(target)
    elif what == "symlink to pages.img":
        os.symlink(os.path.join(ckpt, "pages.img"), target)
    elif what == "dangling symlink":
        os.symlink(str(tmp_path / "nowhere"), target)
    else:
        pathlib.Path(target).write_bytes(b"someone's file")
    before = _fingerprint(target)
    pages_before = _fingerprint(os.path.join(ckpt, "pages.img"))
    code, err = _restore_recording(source, target, tmp_path)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("pageload: ") and "cannot record a working set" in err, err
    assert _fingerprint(target) == before
    assert _fingerprint(os.path.join(ckpt, "pages.img")) == pages_before
    assert not os.path.exists(str(tmp_path / "nowhere"))
    if what not in ("pages.img", "index.msgpack", "source image"):
        # --force replaces an existing regular file only; the rest stay refused
        code, err = _restore_recording(source, target, tmp_path, "--force")
        if what == "existing file":
            assert code == 0, err
            assert read_working_set(target).identity == checkpoint_identity(open_checkpoint(source))
        else:
            assert code == 2 and err.count("\n") == 1, err
            assert _fingerprint(target) == before
    if what in ("pages.img", "index.msgpack", "source image"):
        code, err = _restore_recording(source, target, tmp_path, "--force")
        assert code == 2 and "checkpoint's own file" in err, err
        assert _fingerprint(target) == before


def test_record_working_set_never_replaces_what_appears_after_start(tmp_path, ckpt):
    """The path was free at start; a FIFO put there later is left alone (one warning)."""
    target = str(tmp_path / "later")
    opts = options(tmp_path, ckpt, record_working_set=target, record_seconds=None)

    async def main():
        async with trio.open_nursery() as nursery:
            state = await nursery.start(run_daemon, opts)
            async with TrioClient.connect(state.server.path) as client:
                await client.wait(0, PAGE)
                os.mkfifo(target)
                await client.mark()
                with trio.fail_after(30):
                    while (await client.stats())["recording"]["active"]:
                        await trio.sleep(0.01)
                    await state.loader.done.wait()
            state.stop()

    trio.run(main)
    assert stat.S_ISFIFO(os.lstat(target).st_mode)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".working-set.")]  # no temporary left


def test_write_working_set_replaces_only_the_file_it_was_told(tmp_path):
    ws = ws_of([(0, PAGE)])
    path = str(tmp_path / "ws.msgpack")
    pathlib.Path(path).write_bytes(b"x")
    with pytest.raises(WorkingSetError, match="appeared"):
        write_working_set(path, ws, replaces=None)
    replaces = check_recording_path(path, force=True)
    pathlib.Path(path + ".new").write_bytes(b"y")
    os.rename(path + ".new", path)  # another file, same name (made before the first went: another inode)
    with pytest.raises(WorkingSetError, match="replaced since"):
        write_working_set(path, ws, replaces=replaces)
    assert pathlib.Path(path).read_bytes() == b"y"
    write_working_set(path, ws, replaces=check_recording_path(path, force=True))
    assert len(read_working_set(path)) == 1
    os.unlink(path)
    os.symlink(str(tmp_path / "elsewhere"), path)
    with pytest.raises(WorkingSetError, match="symbolic link"):
        write_working_set(path, ws)  # merge -o: any regular file, but never through a link
    assert not os.path.exists(tmp_path / "elsewhere")
    assert sorted(os.listdir(tmp_path)) == ["ws.msgpack"]


def _one_line_exit_2(argv, needle, timeout=30):
    r = subprocess.run([sys.executable, "-m", "cli", *argv], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("pageload: ") and needle in r.stderr, r.stderr


def test_a_fifo_as_an_explicit_working_set_is_one_line_and_exit_2(tmp_path, images, ckpt):
    """A FIFO as the working-set file hung restore before READY, and show and merge."""
    fifo = str(tmp_path / "ws.fifo")
    os.mkfifo(fifo)
    _one_line_exit_2(["restore", ckpt, "--socket", str(tmp_path / "s.sock"), "--working-set", fifo], "FIFO")
    _one_line_exit_2(["working-set", "show", fifo], "FIFO")
    _one_line_exit_2(["working-set", "merge", fifo, "-o", str(tmp_path / "out.msgpack")], "FIFO")
    _one_line_exit_2(["checkpoint", "create", images["raw"], str(tmp_path / "c2"), "--working-set", fifo], "FIFO")
    assert not os.path.exists(tmp_path / "out.msgpack")


def test_a_fifo_as_the_default_working_set_is_one_warning_and_restore_goes_on(tmp_path, ckpt):
    from workloads import DaemonProcess
    os.mkfifo(os.path.join(ckpt, DEFAULT_NAME))
    log = str(tmp_path / "d.log")
    with DaemonProcess(ckpt, str(tmp_path / "s.sock"), log, ["--background"]) as d:
        from loader import Client
        with Client.connect(d.socket_path) as c:
            c.wait(0, SIZE)
        assert d.stop() == 0
    lines = [ln for ln in pathlib.Path(log).read_text().splitlines() if DEFAULT_NAME in ln]
    assert len(lines) == 1 and "FIFO" in lines[0] and "ignoring" in lines[0], lines


def test_a_working_set_larger_than_its_checkpoint_allows_is_refused_before_it_is_read(tmp_path, images, ckpt):
    """A 240 MB working-set file delayed READY by 6 s at a 1.5 GB peak: it was read whole
    before anything looked at its size.  A 32 MiB checkpoint has 8192 pages: a working
    set of it is at most 8192 ranges (24 bytes each in the file)."""
    path = str(tmp_path / "big.msgpack")
    with open(path, "wb") as f:
        f.truncate(64 * MiB)  # sparse: costs nothing here, 64 MiB to whoever reads it
    _one_line_exit_2(["restore", ckpt, "--socket", str(tmp_path / "s.sock"), "--working-set", path],
                     "more than the 200704-byte most a working set of this checkpoint can be")
    _one_line_exit_2(["checkpoint", "create", images["raw"], str(tmp_path / "c2"), "--working-set", path],
                     "most a working set of this checkpoint can be")
    ws = read_working_set_at_most(tmp_path)  # the bound admits the largest real one
    assert len(ws) == SIZE // PAGE // 2


def read_working_set_at_most(tmp_path):
    """A working set of every other page of SIZE (the most ranges one can have, less one
    in two), read with the checkpoint's bound."""
    from loader.core._workingset import max_file_bytes
    n = SIZE // PAGE // 2
    ws = WorkingSet(CheckpointIdentity("raw", SIZE, PAGE, 1), array("Q", range(0, SIZE, 2 * PAGE)),
                    array("Q", [PAGE]) * n, array("Q", range(n)))
    path = str(tmp_path / "most.msgpack")
    write_working_set(path, ws)
    assert os.path.getsize(path) <= max_file_bytes(SIZE, PAGE)
    return read_working_set(path, max_file_bytes(SIZE, PAGE))


def test_a_working_set_that_would_not_fit_in_memory_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """The host's memory (MemAvailable + SwapFree, cgroup limit) bounds it too: a host
    with 1 MiB left (simulated: ``memory_available`` reads the host)."""
    path = str(tmp_path / "ws.msgpack")
    write_working_set(path, ws_of([(i * 2 * PAGE, PAGE) for i in range(10_000)]))
    import loader.core._workingset as module
    monkeypatch.setattr(module, "memory_available", lambda: MiB)
    with pytest.raises(WorkingSetError, match="of memory, more than the 1.0 MiB left"):
        read_working_set(path)


def test_recording_path_that_is_a_directory_fails(tmp_path):
    with pytest.raises(WorkingSetError, match="is a directory"):
        check_recording_path(str(tmp_path))


async def test_working_set_past_the_memory_is_clipped_with_a_warning(tmp_path, images, caplog):
    src = str(tmp_path / "mem.img")
    os.link(images["raw"], src)
    identity = checkpoint_identity(open_checkpoint(src))
    path = str(tmp_path / "big.msgpack")
    write_working_set(path, ws_of([(PAGE, PAGE), (SIZE - PAGE, 4 * PAGE), (2 * SIZE, PAGE)], identity=identity))
    caplog.set_level(logging.WARNING, logger="pageload")
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, src, working_set=path))
        order = state.loader.order
        assert isinstance(order, WorkingSetOrder) and order.size_bytes == 2 * PAGE
        await state.loader.done.wait()
        assert state.memory.view == images["expected"]
        state.stop()
    assert any("clipped" in r.getMessage() for r in caplog.records)


async def test_mark_of_window_end_writes_the_file_before_shutdown(tmp_path, images):
    src = str(tmp_path / "mem.img")
    os.link(images["raw"], src)
    path = str(tmp_path / "ws.msgpack")
    opts = options(tmp_path, src, record_working_set=path, record_seconds=None)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        async with TrioClient.connect(state.server.path) as client:
            await client.wait(PAGE, PAGE)
            state.loader.recorder.stop()  # what a 'mark' request does
            with trio.fail_after(10):
                while not os.path.exists(path):
                    await trio.sleep(0.01)
            await client.wait(9 * PAGE, PAGE)  # after the window: not recorded
        state.stop()
    assert list(zip(read_working_set(path).offset, read_working_set(path).length)) == [(PAGE, PAGE)]


async def test_hint_working_set_and_mark_over_the_socket(tmp_path, images):
    src = str(tmp_path / "mem.img")
    os.link(images["raw"], src)
    path = str(tmp_path / "ws.msgpack")
    opts = options(tmp_path, src, record_working_set=path, record_seconds=None, use_working_set=False)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        async with TrioClient.connect(state.server.path) as client:
            await client.prefetch(3 * MiB + 5, 2 * PAGE, working_set=True)  # rounded out to pages
            await client.prefetch(9 * MiB, PAGE)  # a plain prefetch is not a touch
            await client.wait(PAGE, PAGE)
            assert (await client.stats())["recording"]["active"]
            with pytest.raises(ClientError, match="recording a working set"):
                await client.load_map()  # it would let waits skip the daemon, unrecorded
            await client.mark()
            with trio.fail_after(10):
                while not os.path.exists(path):
                    await trio.sleep(0.01)
            assert not (await client.stats())["recording"]["active"]
            await client.load_map()  # the window is closed
            await client.mark()  # again: still answered
        state.stop()
    ws = read_working_set(path)
    assert list(zip(ws.offset, ws.length)) == [(3 * MiB, 3 * PAGE), (PAGE, PAGE)]


async def test_record_window_ends_after_record_seconds(tmp_path, images):
    src = str(tmp_path / "mem.img")
    os.link(images["raw"], src)
    path = str(tmp_path / "ws.msgpack")
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, src, record_working_set=path, record_seconds=0.05))
        await state.loader.wait_loaded(2 * PAGE, PAGE)
        with trio.fail_after(10):
            while not os.path.exists(path):
                await trio.sleep(0.01)
        state.stop()
    assert read_working_set(path).window_s >= 0.05


def test_cli_mark_without_daemon_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cli", "mark", "--socket", str(tmp_path / "none.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cannot reach the daemon" in r.stderr


# --------------------------------------------------------------------------- laid out first
async def test_checkpoint_create_lays_the_working_set_out_first(tmp_path, images):
    src = str(tmp_path / "mem.img")
    os.link(images["raw"], src)
    ws_path = str(tmp_path / "ws.msgpack")
    await _record(tmp_path, src, ws_path)
    ws = read_working_set(ws_path)
    ckpt = str(tmp_path / "ckpt")
    report = create_checkpoint(src, ckpt, working_set=ws_path)
    assert report.working_set_bytes >= ws.total_bytes
    opened = open_checkpoint(ckpt)
    # the working set's replay spans are the front of pages.img, in replay order
    lo, hi = replay_plan(ws, opened.layout)
    pos = 0
    for a, b in zip(lo, hi):
        for x, y in opened.layout.data_in(a, b):
            assert opened.layout.file_offset(x) == pos
            pos += y - x
    with open(os.path.join(ckpt, "pages.img"), "rb") as f:
        pages = f.read(pos)
    assert pages == b"".join(images["expected"][x:y] for a, b in zip(lo, hi) for x, y in opened.layout.data_in(a, b))
    # its copy is tied to the new checkpoint and picked up by default; replay is sequential
    copy = read_working_set(os.path.join(ckpt, DEFAULT_NAME))
    assert copy.identity == checkpoint_identity(opened) and list(copy.ranges()) == list(ws.ranges())
    queues = []

    def wrap(q):
        queues.append(RecordingQueue(q, 0.0005))
        return queues[0]

    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, ckpt, aio_backend="sync", wrap_queue=wrap))
        assert isinstance(state.loader.order, WorkingSetOrder)
        await state.loader.done.wait()
        assert state.memory.view == images["expected"]
        state.stop()
    # replay is a sequential read of the front of pages.img, in sweep-sized reads that
    # follow the file across the working set's scattered memory
    front_bytes = sum(y - x for a, b in zip(lo, hi) for x, y in opened.layout.data_in(a, b))
    reads = -(-front_bytes // (1 << 20))
    front = [(o, n) for o, n, _ in queues[0].log[:reads]]
    assert front[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(front, front[1:]))
    assert sum(n for _, n in front) >= front_bytes
    # a working set recorded on another image is refused, one line
    with pytest.raises(Exception, match="recorded for another checkpoint"):
        create_checkpoint(images["raw"], str(tmp_path / "ckpt2"), working_set=os.path.join(ckpt, DEFAULT_NAME))


# --------------------------------------------------------------------------- the bench section
def test_perturb_trace_moves_a_fifth_of_the_ranges_consistently():
    from bench import perturb_trace
    from workloads import Trace

    trace = Trace(page_size=PAGE, memory_size=64 * MiB)
    for i in range(1000):
        trace.append(i * 10, (i % 100) * PAGE, PAGE)  # 100 distinct ranges, each 10 times
    data = [(32 * MiB, 40 * MiB)]
    out = perturb_trace(trace, 0.2, data, seed=1)
    assert len(out) == len(trace) and list(out.t_us) == list(trace.t_us)
    moved = {(a, b) for a, b in zip(trace.offset, out.offset) if a != b}
    assert len({a for a, _ in moved}) == 20  # a fifth of the distinct ranges
    assert len(moved) == 20  # each always to the same place
    assert all(32 * MiB <= b < 40 * MiB and b % PAGE == 0 for _, b in moved)


def test_workingset_bench_section_end_to_end(tmp_path):
    """Structure only (no timing): record, lay out, six restores, goals, the table."""
    from bench import format_workingset, run_workingset_section
    from workloads import generate

    image = str(tmp_path / "image.raw")
    make_sample_image(image, 16 * MiB, seed=2, dense=True)
    trace = generate("zipf", count=60, memory_size=16 * MiB, rate=2000.0, seed=1,
                     layout=open_checkpoint(image).layout)
    result = run_workingset_section(image, trace, clients=2, workdir=str(tmp_path / "work"), log=lambda _: None)
    # each trace also with clients that read the loaded map (issue 20: the client-side figure barely moved
    # without it, every wait still costing a round trip)
    assert set(result["runs"]) == {"same", "perturbed", "same, loaded map", "perturbed, loaded map"}
    for key, variants in result["runs"].items():
        assert set(variants) == {"without", "with", "laid-out"}
        for name, row in variants.items():
            assert row["errors"] == 0 and row["mismatches"] == 0 and row["waits"] == 60
            assert (row["working_set"] is None) == (name == "without")
            # the clients' own summed wait is reported beside the daemon's blocked time
            assert row["client_wait_s"] > 0 and result["client_wait"][key][name]["client_wait_s"] == row[
                "client_wait_s"]
            if not key.endswith("loaded map"):
                assert row["map_hits"] == 0, (key, name)
        if key.endswith("loaded map"):  # those clients really read the map: some waits sent nothing
            assert sum(r["map_hits"] for r in variants.values()) > 0, key
    # the variants take turns in alternating order: the same-trace baseline is not always first
    orders = result["order"]
    assert orders["same"] == ["without", "with", "laid-out"] and orders["perturbed"] == ["laid-out", "with", "without"]
    assert len({tuple(o) for o in orders.values()}) == 4
    assert result["recorded"]["bytes"] > 0 and len(result["goals"]) == 8
    text = format_workingset(result)
    assert "blocked waits" in text and "client wait s" in text and "clients' summed wait, same, loaded map" in text
