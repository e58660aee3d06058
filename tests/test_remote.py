"""Restoring straight from object storage (issue 23, items 1-3): ``pageload restore
s3://BUCKET/PREFIX`` against a real S3 server (the session's SeaweedFS, ``weed mini``),
through the fault proxy where failures are wanted.  Nothing here mocks the store client
or the source: every GET crosses a socket, every byte is checked against the image."""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from uffd_run import fault_then_fill

import aio
import aio.testing
from cli import main
from loader import Client, ClientError, DaemonOptions, LoaderConfig, TrioClient, UffdConfig, run_daemon
from loader.checkpoint import create_checkpoint, read_pages_index
from loader.remote import ObjectStore, RetryPolicy
from loader.source import RemoteConfig, RemoteSource
from loader.uffd import _ioctl as _uffd
from workloads import FaultProxy, SeaweedServer, SeaweedStartError, make_sample_image
from workloads._daemon_process import DaemonProcess

MiB = 1 << 20
PAGE = 4096
SIZE = 8 * MiB
#: quick retries: a GET failing past them takes milliseconds
FAST = RetryPolicy(retries=3, backoff=0.01, max_backoff=0.05)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("remote")
    raw = str(d / "memory.img")
    make_sample_image(raw, SIZE, seed=23)
    ckpt = str(d / "ckpt")
    create_checkpoint(raw, ckpt)
    with open(raw, "rb") as f:
        expected = f.read()
    return {"raw": raw, "ckpt": ckpt, "expected": expected, "index": read_pages_index(f"{ckpt}/index.msgpack")}


def _env(seaweed: SeaweedServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=seaweed.access_key_id, AWS_SECRET_ACCESS_KEY=seaweed.secret_access_key, **extra)
    return env


@pytest.fixture(scope="module")
def pushed(image: dict[str, Any], seaweed: SeaweedServer) -> str:
    """The checkpoint, put by ``pageload checkpoint push``."""
    url = f"s3://{seaweed.bucket}/remote-{uuid.uuid4().hex[:12]}"
    saved = dict(os.environ)
    os.environ.update(_env(seaweed))
    try:
        assert main(["checkpoint", "push", image["ckpt"], url, "--s3-endpoint", seaweed.endpoint]) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return url


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(seaweed.endpoint) as p:
        yield p


def _config(seaweed: SeaweedServer, tmp_path: Path, *, endpoint: str | None = None, cache: bool = True,
            cache_dir: str | None = None) -> RemoteConfig:
    return RemoteConfig(endpoint=endpoint or seaweed.endpoint, access_key_id=seaweed.access_key_id,
                        secret_access_key=seaweed.secret_access_key, env={}, policy=FAST, cache=cache,
                        cache_dir=cache_dir or str(tmp_path / "cache"))


def _options(tmp_path: Path, url: str, remote: RemoteConfig, **kw: Any) -> DaemonOptions:
    kw.setdefault("handle_signals", False)
    kw.setdefault("ready_line", False)
    return DaemonOptions(source=url, socket_path=str(tmp_path / "s.sock"), remote=remote, fetch_concurrency=8,
                         **kw)


def _pages_gets(proxy: FaultProxy) -> list[str]:
    return [r for r in proxy.requests if r.startswith("GET ") and "pages.img" in r]


def _memory_at(image: dict[str, Any], chunk: int) -> int:
    """A memory offset whose data lies in checksum chunk ``chunk`` of the pages file."""
    index = image["index"]
    at = chunk * index.chunk_size
    r = next(r for r in index.layout if r.file_offset <= at < r.file_offset + r.length)
    return r.mem_offset + at - r.file_offset


async def _check_memory(client: TrioClient, expected: bytes) -> None:
    fd = await client.memory_fd()
    try:
        with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:] == expected
    finally:
        os.close(fd)


async def test_a_pushed_checkpoint_restores_byte_exact_through_the_socket(image, pushed, seaweed, tmp_path):
    """Waits for random ranges ahead of the sweep, then the whole memory, from a
    checkpoint ``checkpoint push`` put: the image's bytes, every chunk verified, the
    threads backend chosen for the store's calls, the remote stats in the socket's."""
    opts = _options(tmp_path, pushed, _config(seaweed, tmp_path), wrap_queue=lambda q: aio.testing.DelayedQueue(
        q, 0.002))
    rng = random.Random(5)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        assert isinstance(state.source, RemoteSource) and state.backend == "threads"
        async with TrioClient.connect(state.server.path) as client:
            for _ in range(20):
                lo = rng.randrange(SIZE // PAGE) * PAGE
                await client.wait(lo, min(SIZE - lo, rng.randrange(1, 40) * PAGE))
            await client.wait(0, SIZE)
            await _check_memory(client, image["expected"])
            stats = await client.stats()
        s = state.loader.statistics()
        assert s.verify and s.chunks_verified == len(image["index"].checksums) and s.waits_failed == 0
        remote = stats["remote"]
        assert stats["source"] == pushed and remote["url"] == pushed
        assert remote["fetch"]["chunks_fetched"] >= len(image["index"].checksums)
        assert remote["store"]["gets"] >= 2 and remote["store"]["failures"] == 0 and remote["last_error"] is None
        state.stop()


async def test_a_second_restore_from_the_same_cache_makes_no_get_of_the_pages(image, pushed, seaweed, tmp_path,
                                                                              proxy, caplog):
    """The first restore fills the host chunk cache (and keeps in it that this
    checkpoint has no working set: its GET was a 404); the second, with the same
    --cache-dir, makes no GET but the index's (issue 23 item 4).  The
    progress lines say so: what was fetched at what rate, and the cache's share."""
    caplog.set_level(logging.INFO, logger="pageload")
    for run in ("cold", "warm"):
        proxy.requests.clear()
        caplog.clear()
        opts = _options(tmp_path, pushed, _config(seaweed, tmp_path, endpoint=proxy.endpoint))
        async with trio.open_nursery() as nursery:
            state = await nursery.start(run_daemon, opts)
            async with TrioClient.connect(state.server.path) as client:
                await client.wait(0, SIZE)
                await _check_memory(client, image["expected"])
                remote = (await client.stats())["remote"]
            state.stop()
        # the last progress line says what was fetched, at what rate, and the cache's share
        line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")][-1]
        pages_gets = _pages_gets(proxy)
        if run == "cold":
            assert pages_gets and remote["fetch"]["gets"] >= 1
            assert re.search(r"; fetched [\d.]+ [KM]iB at [\d.]+ MB/s, cache 0% hits$", line), line
            continue
        assert line.endswith("; fetched 0 B at 0.0 MB/s, cache 100% hits"), line
        assert pages_gets == [] and remote["fetch"]["gets"] == 0
        assert remote["store"]["gets"] == 1  # the index; the working set's absence is the cache's
        assert remote["fetch"]["chunks_cached"] >= len(image["index"].checksums)
        gets = [r for r in proxy.requests if r.startswith("GET ")]
        assert len(gets) == 1 and "index.msgpack" in gets[0], gets


async def test_a_corrupt_pages_object_is_never_served(image, seaweed, tmp_path):
    """A pages object with a byte flipped in one chunk: the wait on that chunk fails
    with ``corrupt``, other memory is served, and the wrong chunk never enters the cache."""
    chunk = 5
    url = _corrupt_copy(image, seaweed, chunk)
    at = _memory_at(image, chunk)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, _options(tmp_path, url, _config(seaweed, tmp_path)))
        async with TrioClient.connect(state.server.path) as client:
            with pytest.raises(ClientError) as info:
                await client.wait(at, PAGE)
            assert info.value.code == "corrupt"
            other = _memory_at(image, chunk + 20)
            await client.wait(other, PAGE)
            fd = await client.memory_fd()
            with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                assert m[other : other + PAGE] == image["expected"][other : other + PAGE]
            os.close(fd)
            # refused by the cache: counted once the inserter's thread has come to it
            for _ in range(200):
                remote = (await client.stats())["remote"]
                if remote["fetch"]["wrong_chunks"] or remote["inserter"]["pending"] == 0:
                    break
                await trio.sleep(0.05)
        assert remote["fetch"]["wrong_chunks"] >= 1
        assert remote["inserter"]["wrong"] >= 1 and remote["cache"]["inserts"] <= remote["fetch"]["chunks_fetched"] - 1
        state.stop()


def _corrupt_copy(image: dict[str, Any], seaweed: SeaweedServer, chunk: int | None) -> str:
    """The checkpoint put under a new prefix with one byte of ``chunk`` flipped in its
    pages (None: none, a copy as it is)."""
    url = f"s3://{seaweed.bucket}/corrupt-{uuid.uuid4().hex[:12]}"
    store = ObjectStore(url, endpoint=seaweed.endpoint, access_key_id=seaweed.access_key_id,
                        secret_access_key=seaweed.secret_access_key, env={})
    with open(os.path.join(image["ckpt"], "pages.img"), "rb") as f:
        pages = bytearray(f.read())
    if chunk is not None:
        pages[chunk * image["index"].chunk_size + 100] ^= 0x40
    store.put_bytes("pages.img", bytes(pages))
    with open(os.path.join(image["ckpt"], "index.msgpack"), "rb") as f:
        store.put_bytes("index.msgpack", f.read())
    return url


def test_inspect_and_verify_take_a_url(image, pushed, seaweed, capsys, monkeypatch):
    """``checkpoint inspect URL`` says what ``inspect DIR`` says of the same checkpoint
    (but where its objects are); ``verify URL`` GETs every byte: ok for the pushed one,
    exit 1 naming the chunk for one with a byte flipped."""
    import json

    for name, value in _env(seaweed).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    ep = ["--s3-endpoint", seaweed.endpoint]
    assert main(["checkpoint", "inspect", "--json", image["ckpt"]]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["checkpoint", "inspect", "--json", pushed, *ep]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["path"] == pushed and remote["pages_path"] == f"{pushed}/pages.img"
    assert remote["index_path"] == f"{pushed}/index.msgpack"
    for key in ("path", "pages_path", "index_path"):
        del local[key], remote[key]
    assert remote == local
    assert main(["checkpoint", "verify", pushed, *ep]) == 0
    assert f"{pushed}: ok: {len(image['index'].checksums)} chunks" in capsys.readouterr().out
    bad = _corrupt_copy(image, seaweed, 9)
    assert main(["checkpoint", "verify", bad, *ep]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT: 1 of" in out and "chunk 9 " in out
    assert main(["checkpoint", "verify", f"s3://{seaweed.bucket}/nothing-here", *ep]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "index.msgpack: no such object" in err[0]


async def test_a_store_answering_503_to_a_few_gets_still_restores(image, pushed, seaweed, tmp_path, proxy):
    """503 SlowDown to the first GETs of the pages: retried by the store client, the
    restore is byte-exact, and the retries are counted, in the stats and in the
    Prometheus metrics (``pageload_remote_*``: GETs, bytes, retries, failures, chunks by
    source, each GET's latency; no cache metrics with --no-cache)."""
    from test_ops import families, http, value

    from loader import MetricsAddress

    proxy.fail_next(4, 503, match="pages.img", overlapping=(0, 1 << 40))  # ranged GETs only
    opts = _options(tmp_path, pushed, _config(seaweed, tmp_path, endpoint=proxy.endpoint, cache=False),
                    metrics=MetricsAddress(host="127.0.0.1", port=0))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        host, port = state.metrics.bound.rsplit(":", 1)
        async with TrioClient.connect(state.server.path) as client:
            await client.wait(0, SIZE)
            await _check_memory(client, image["expected"])
            with trio.fail_after(30):
                while not state.loader.done.is_set():
                    await trio.sleep(0.01)
            fams = families(await http((host, int(port)), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
            remote = (await client.stats())["remote"]
        state.stop()
    assert proxy.faults["status"] == 4
    assert remote["store"]["retries"] >= 4 and remote["cache"] is None
    store, fetch = remote["store"], remote["fetch"]
    assert value(fams, "pageload_remote_gets_total") == store["gets"] == len(
        [r for r in proxy.requests if r.startswith("GET ")])
    assert value(fams, "pageload_remote_fetched_bytes_total") == store["bytes_fetched"] >= image["index"].pages_size
    assert value(fams, "pageload_remote_retries_total") == store["retries"] >= 4
    assert value(fams, "pageload_remote_failures_total", code="unavailable") == 0
    assert value(fams, "pageload_remote_chunks_total", source="store") == fetch["chunks_fetched"] > 0
    assert value(fams, "pageload_remote_chunks_total", source="cache") == 0
    assert value(fams, "pageload_remote_get_latency_seconds_count") == store["gets"]
    assert value(fams, "pageload_remote_get_latency_seconds_sum") > 0
    assert not [name for name in fams if name.startswith("pageload_remote_cache")]


async def test_a_chunk_whose_gets_keep_failing_fails_its_waiters_and_the_rest_is_served(
        image, pushed, seaweed, tmp_path, proxy):
    """Every GET touching one chunk is answered 503: the wait on it fails with
    ``unavailable`` and the store's message (the object, the 503, the tries) after the
    retries, every other byte is served, and that chunk cost at most 1 + retries GETs
    (not one round of retries per half as the loader narrows the failure down)."""
    chunk, c = 7, image["index"].chunk_size
    proxy.fail_next(10_000, 503, overlapping=(chunk * c, (chunk + 1) * c))
    opts = _options(tmp_path, pushed, _config(seaweed, tmp_path, endpoint=proxy.endpoint, cache=False))
    at = _memory_at(image, chunk)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        async with TrioClient.connect(state.server.path) as client:
            with pytest.raises(ClientError) as info:
                await client.wait(at, PAGE)
            assert info.value.code == "unavailable" and info.value.errno is None
            message = str(info.value)
            assert f"{pushed}/pages.img: HTTP 503 Service Unavailable (SlowDown)" in message, message
            assert f"after {FAST.retries + 1} tries" in message, message
            with trio.fail_after(60):
                while not state.loader.done.is_set():
                    await trio.sleep(0.02)
            fd = await client.memory_fd()
            with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                for r in image["index"].layout:
                    lo, hi = r.file_offset, r.file_offset + r.length
                    if hi <= chunk * c or lo >= (chunk + 1) * c:  # (ranges apart from the bad chunk)
                        assert m[r.mem_offset : r.mem_offset + r.length] == \
                            image["expected"][r.mem_offset : r.mem_offset + r.length]
            os.close(fd)
            remote = (await client.stats())["remote"]
        s = state.loader.statistics()
        assert 0 < s.failed_bytes <= c
        assert remote["fetch"]["failures"] == 1 and "503" in remote["last_error"]
        # every GET overlapping the chunk was answered 503 by the proxy: these are all of them
        assert proxy.faults["status"] <= 1 + FAST.retries, proxy.faults
        state.stop()


async def test_the_working_set_pushed_with_a_checkpoint_is_replayed_before_the_sweep(image, seaweed, tmp_path,
                                                                                     caplog):
    """A checkpoint pushed with its working set (``DIR/working-set.msgpack``, as a
    recording leaves it): a restore from the store fetches it and replays it first, as
    a local restore does with the file beside the checkpoint; the restore is byte-exact."""
    import shutil

    from loader.core._workingset import WorkingSet, checkpoint_identity, write_working_set
    from loader.source import open_source

    caplog.set_level(logging.INFO, logger="pageload")
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(image["ckpt"], ckpt)
    layout = image["index"].layout
    chosen = [r for r in layout][-3:]  # the end of memory: the sweep would come to it last
    local = open_source(ckpt)
    try:
        identity = checkpoint_identity(local)
    finally:
        local.close()
    ws = WorkingSet(identity, array("Q", [r.mem_offset for r in chosen]), array("Q", [r.length for r in chosen]),
                    array("Q", range(len(chosen))))
    write_working_set(os.path.join(ckpt, "working-set.msgpack"), ws)
    url = f"s3://{seaweed.bucket}/with-ws-{uuid.uuid4().hex[:12]}"
    saved = dict(os.environ)
    os.environ.update(_env(seaweed))
    try:
        assert main(["checkpoint", "push", ckpt, url, "--s3-endpoint", seaweed.endpoint]) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    opts = _options(tmp_path, url, _config(seaweed, tmp_path, cache=False))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        async with TrioClient.connect(state.server.path) as client:
            await client.wait(0, SIZE)
            await _check_memory(client, image["expected"])
            stats = await client.stats()
        state.stop()
    replayed = stats["working_set"]
    assert replayed["size_bytes"] == ws.total_bytes == replayed["loaded_bytes"] > 0
    assert any(r.getMessage().startswith(f"working set {url}/working-set.msgpack: ") and "replayed first" in
               r.getMessage() for r in caplog.records)


def test_the_pages_head_is_sent_alongside_the_index_get(image, pushed, seaweed, tmp_path, proxy):
    """Opening a checkpoint in a store sends the pages object's HEAD without waiting
    for the index's response (issue 23, ready time: one round trip less at start-up).
    The proxy holds every response 3 s: the HEAD reaches it while the index's GET is
    still held (before, it was sent only once the index had come)."""
    import threading

    proxy.first_byte_delay = 3.0
    opened: list[Any] = []
    thread = threading.Thread(target=lambda: opened.append(RemoteSource.open(
        pushed, remote=_config(seaweed, tmp_path, endpoint=proxy.endpoint, cache=False))))
    thread.start()
    try:
        deadline = time.monotonic() + 2.5  # (the index's response comes 3 s after its GET)
        while time.monotonic() < deadline and not (any(r.startswith("HEAD ") for r in proxy.requests)
                                                   and any(r.startswith("GET ") for r in proxy.requests)):
            time.sleep(0.01)  # (both are sent at once, each from its thread: in either order)
        seen = list(proxy.requests)
    finally:
        thread.join()
    assert any(r.startswith("GET ") and "index.msgpack" in r for r in seen), seen
    assert any(r.startswith("HEAD ") and "pages.img" in r for r in seen), seen
    assert opened and opened[0].size() == image["index"].pages_size
    opened[0].close()


def _push_with_working_set(image: dict[str, Any], seaweed: SeaweedServer, tmp_path: Path) -> tuple[str, Any]:
    """The test image's checkpoint pushed with a working set of its last three ranges
    (the sweep would come to them last): (its URL, the working set)."""
    import shutil

    from loader.core._workingset import WorkingSet, checkpoint_identity, write_working_set
    from loader.source import open_source

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(image["ckpt"], ckpt)
    chosen = [r for r in image["index"].layout][-3:]
    local = open_source(ckpt)
    try:
        identity = checkpoint_identity(local)
    finally:
        local.close()
    ws = WorkingSet(identity, array("Q", [r.mem_offset for r in chosen]), array("Q", [r.length for r in chosen]),
                    array("Q", range(len(chosen))))
    write_working_set(os.path.join(ckpt, "working-set.msgpack"), ws)
    url = f"s3://{seaweed.bucket}/with-ws-{uuid.uuid4().hex[:12]}"
    saved = dict(os.environ)
    os.environ.update(_env(seaweed))
    try:
        assert main(["checkpoint", "push", ckpt, url, "--s3-endpoint", seaweed.endpoint]) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return url, ws


async def test_the_host_cache_keeps_a_stored_working_set_and_drops_a_corrupt_copy(image, seaweed, tmp_path,
                                                                                  proxy):
    """A checkpoint pushed with its working set, restored three times with one cache:
    the first GETs the working set (and keeps it in the cache), the second makes no GET
    but the index's and replays the same working set, the third finds the cache's copy
    with a byte flipped: dropped, GET again, replayed (issue 23 item 4)."""
    url, ws = _push_with_working_set(image, seaweed, tmp_path)
    cache_dir = str(tmp_path / "ws-cache")
    for run in ("cold", "warm", "corrupt"):
        if run == "corrupt":  # the working set's entry: the one file of its length in the cache
            size = os.path.getsize(tmp_path / "ckpt" / "working-set.msgpack")
            entries = [p for p in Path(cache_dir).rglob(f"*-{size}") if p.is_file()]
            assert len(entries) == 1, entries
            data = bytearray(entries[0].read_bytes())
            data[len(data) // 2] ^= 0xFF
            entries[0].write_bytes(bytes(data))
        proxy.requests.clear()
        config = _config(seaweed, tmp_path, endpoint=proxy.endpoint, cache_dir=cache_dir)
        if run != "cold":  # looked up at open (as the CLI asks), not when the daemon asks for it
            config = dataclasses.replace(config, working_set=True)
        opts = _options(tmp_path, url, config)
        async with trio.open_nursery() as nursery:
            state = await nursery.start(run_daemon, opts)
            async with TrioClient.connect(state.server.path) as client:
                await client.wait(0, SIZE)
                await _check_memory(client, image["expected"])
                stats = await client.stats()
            state.stop()
        assert stats["working_set"]["size_bytes"] == ws.total_bytes == stats["working_set"]["loaded_bytes"]
        gets = [r for r in proxy.requests if r.startswith("GET ") and "pages.img" not in r]
        if run == "warm":
            assert len(gets) == 1 and "index.msgpack" in gets[0], gets
        else:
            assert len(gets) == 2 and "working-set.msgpack" in gets[1], (run, gets)


async def test_a_pages_object_deleted_in_the_middle_of_a_restore_fails_waits_unavailable(image, seaweed, tmp_path):
    """The pages object disappears after start-up (lazy loading, nothing cached): a wait
    on memory not yet fetched fails with ``unavailable`` and the store's message
    (``no such object (not-found)``), after one GET (not-found is not retried), and a
    second wait on the same chunk fails the same, without another GET."""
    url = _corrupt_copy(image, seaweed, None)
    store = ObjectStore(url, endpoint=seaweed.endpoint, access_key_id=seaweed.access_key_id,
                        secret_access_key=seaweed.secret_access_key, env={})
    opts = _options(tmp_path, url, _config(seaweed, tmp_path, cache=False), config=LoaderConfig(sweep=False))
    first, later = _memory_at(image, 1), _memory_at(image, len(image["index"].checksums) - 5)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        async with TrioClient.connect(state.server.path) as client:
            await client.wait(first, PAGE)
            store.delete("pages.img")
            gets = state.source.store.stats().gets
            for _ in range(2):
                with pytest.raises(ClientError) as info:
                    await client.wait(later, PAGE)
                assert info.value.code == "unavailable", info.value
                assert f"{url}/pages.img: no such object" in str(info.value) and "(not-found)" in str(info.value)
            assert state.source.store.stats().gets == gets + 1
        state.stop()


@pytest.mark.skipif(_uffd.unavailable() is not None, reason=str(_uffd.unavailable()))
async def test_a_checkpoint_in_a_store_restores_through_the_uffd_emulator(image, pushed, seaweed, tmp_path):
    """Firecracker's page-fault handler over a checkpoint in S3: faults anywhere get the
    image's bytes (each chunk verified first), the fill completes the guest."""
    opts = _options(tmp_path, pushed, _config(seaweed, tmp_path), uffd_socket=str(tmp_path / "uffd.sock"),
                    uffd_config=UffdConfig.for_mode("fill"))
    rng = random.Random(6)
    faults = [(0, rng.randrange(SIZE // PAGE) * PAGE, PAGE) for _ in range(100)]
    await fault_then_fill(opts, SIZE, image["raw"], faults)



@pytest.mark.skipif(_uffd.unavailable() is not None, reason=str(_uffd.unavailable()))
async def test_a_fault_on_a_chunk_the_store_keeps_failing_is_poisoned_with_the_stores_message(
        image, pushed, seaweed, tmp_path, proxy):
    """Firecracker's handler over a store whose GETs of one chunk are all answered 503:
    the fault on it is poisoned (SIGBUS in the VMM child, never wrong bytes), and the
    handler's statistics say why: ``unavailable`` with the store's message."""
    from workloads._vmm import reap_child, spawn_child

    chunk, c = 7, image["index"].chunk_size
    proxy.fail_next(10_000, 503, overlapping=(chunk * c, (chunk + 1) * c))
    opts = _options(tmp_path, pushed, _config(seaweed, tmp_path, endpoint=proxy.endpoint, cache=False),
                    uffd_socket=str(tmp_path / "uffd.sock"), config=LoaderConfig(sweep=False),
                    uffd_config=UffdConfig.for_mode("lazy"))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        child = spawn_child(opts.uffd_socket, SIZE, [_memory_at(image, chunk)])
        try:
            code = await trio.to_thread.run_sync(child.wait, 30)
        finally:
            reap_child(child)
        assert state.uffd is not None
        stats = state.uffd.statistics()
        state.stop()
    assert code == -signal.SIGBUS
    assert stats["faults_failed"] == 1
    last = stats["last_failure"]
    assert last.startswith("unavailable: ") and f"{pushed}/pages.img: HTTP 503" in last, last

# -- start-up failures and SIGTERM, in a real process ---------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _restore(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "restore", *args, "--socket", str(tmp_path / "x.sock"),
                           "--cache-dir", str(tmp_path / "cache"), "--background"],
                          env=env, capture_output=True, text=True, timeout=60)


def _uring_unavailable() -> str | None:
    try:
        aio.check_available("uring")
    except aio.BackendUnavailable as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("case", ["missing prefix", "half pushed", "bad keys", "unreachable", "uring"])
def test_start_up_failures_are_one_line_and_exit_2(image, pushed, seaweed, tmp_path, case):
    env = _env(seaweed)
    url, extra, says = pushed, ["--s3-endpoint", seaweed.endpoint], ""
    if case == "missing prefix":
        url, says = f"s3://{seaweed.bucket}/no-such-{uuid.uuid4().hex[:8]}", "index.msgpack: no such object"
    elif case == "half pushed":
        url = f"s3://{seaweed.bucket}/half-{uuid.uuid4().hex[:8]}"
        ObjectStore(url, endpoint=seaweed.endpoint, env=env).put_file(
            "pages.img", os.path.join(image["ckpt"], "pages.img"), 8 * MiB)
        says = "pushed only halfway"
    elif case == "bad keys":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong"
        says = "(denied)"
    elif case == "unreachable":
        extra, says = ["--s3-endpoint", f"http://127.0.0.1:{_closed_port()}"], "(unreachable)"
    else:
        if (why := _uring_unavailable()) is not None:
            pytest.skip(f"aio backend uring unavailable here: {why}")
        extra += ["--aio", "uring"]
        says = "does not take"
    done = _restore([url, *extra], env, tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("pageload: ") and says in lines[0], lines[0]
    if case != "uring":
        assert url in lines[0] or "127.0.0.1" in lines[0]
    assert not (tmp_path / "x.sock").exists()


def test_sigterm_with_gets_held_back_exits_within_the_shutdown_timeout(pushed, seaweed, tmp_path, proxy):
    """A wait whose GET the proxy holds back (its first byte 5 s late; lazy loading, so
    nothing else is fetched): SIGTERM, and the daemon exits within --shutdown-timeout
    plus a second, abandoning the GET, the waiter answered."""
    daemon = DaemonProcess(pushed, str(tmp_path / "s.sock"), str(tmp_path / "log"),
                           ["--background", "--no-sweep", "--no-cache", "--s3-endpoint", proxy.endpoint,
                            "--shutdown-timeout", "1"])
    env_before = dict(os.environ)
    os.environ.update(_env(seaweed))
    try:
        daemon.start()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    try:
        proxy.first_byte_delay = 5.0  # every request read from now on
        with Client.connect(daemon.socket_path) as client:
            client.send_wait(0, SIZE)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not _pages_gets(proxy):
                time.sleep(0.01)
            assert _pages_gets(proxy)  # the wait's GET, held back (not the start-up's HEAD)
            started = time.monotonic()
            os.kill(daemon.pid, signal.SIGTERM)
            assert daemon.proc is not None
            code = daemon.proc.wait(timeout=15)
            took = time.monotonic() - started
    finally:
        daemon.stop()
    log = Path(tmp_path / "log").read_text()
    assert code == 0, log
    assert took < 1 + 1, f"exited {took:.1f} s after SIGTERM; {log}"
    assert "not waiting for them" in log, log


def test_weed_on_a_nearly_full_disk_is_refused_in_one_line() -> None:
    """A full disk made weed answer every write with HTTP 500 (its volumes go read-only
    below 1 % free), and the suite failed far from the cause: now the server refuses to
    start on such a disk, saying why."""
    from workloads._s3 import check_free_space

    gib = 1 << 30
    with pytest.raises(SeaweedStartError, match=r"1\.7 GiB free of 252 GiB; weed marks its volumes read-only"):
        check_free_space("/data", (252 * gib, 250 * gib, int(1.7 * gib)))  # what a run here once had
    check_free_space("/data", (252 * gib, 200 * gib, 52 * gib))
    check_free_space("/small", (gib, gib // 10, 900 << 20))  # a small file system: 1 % of it is little
    with pytest.raises(SeaweedStartError, match=r"free 0\.2 GiB more"):  # 1 % and the margin: 267 MiB
        check_free_space("/small", (gib, gib - (100 << 20), 100 << 20))
