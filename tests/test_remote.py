"""Restoring straight from object storage (issue 23, items 1-3): ``pageload restore
s3://BUCKET/PREFIX`` against a real S3 server (the session's SeaweedFS, ``weed mini``),
through the fault proxy where failures are wanted.  Nothing here mocks the store client
or the source: every GET crosses a socket, every byte is checked against the image."""

from __future__ import annotations

import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from uffd_run import fault_then_fill

import aio
import aio.testing
from cli import main
from loader import Client, ClientError, DaemonOptions, TrioClient, UffdConfig, run_daemon
from loader.checkpoint import create_checkpoint, read_pages_index
from loader.remote import ObjectStore, RetryPolicy
from loader.source import RemoteConfig, RemoteSource
from loader.uffd import _ioctl as _uffd
from workloads import FaultProxy, SeaweedServer, make_sample_image
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
                                                                              proxy):
    """The first restore fills the host chunk cache; the second, with the same
    --cache-dir, GETs only the index: no request for pages.img reaches the proxy."""
    for run in ("cold", "warm"):
        proxy.requests.clear()
        opts = _options(tmp_path, pushed, _config(seaweed, tmp_path, endpoint=proxy.endpoint))
        async with trio.open_nursery() as nursery:
            state = await nursery.start(run_daemon, opts)
            async with TrioClient.connect(state.server.path) as client:
                await client.wait(0, SIZE)
                await _check_memory(client, image["expected"])
                remote = (await client.stats())["remote"]
            state.stop()
        pages_gets = _pages_gets(proxy)
        if run == "cold":
            assert pages_gets and remote["fetch"]["gets"] >= 1
            continue
        assert pages_gets == [] and remote["fetch"]["gets"] == 0
        assert remote["store"]["gets"] == 1  # the index
        assert remote["fetch"]["chunks_cached"] >= len(image["index"].checksums)
        assert [r for r in proxy.requests if r.startswith("GET ")] == [r for r in proxy.requests
                                                                       if "index.msgpack" in r and "GET " in r]


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


def _corrupt_copy(image: dict[str, Any], seaweed: SeaweedServer, chunk: int) -> str:
    """The checkpoint put under a new prefix with one byte of ``chunk`` flipped in its pages."""
    url = f"s3://{seaweed.bucket}/corrupt-{uuid.uuid4().hex[:12]}"
    store = ObjectStore(url, endpoint=seaweed.endpoint, access_key_id=seaweed.access_key_id,
                        secret_access_key=seaweed.secret_access_key, env={})
    with open(os.path.join(image["ckpt"], "pages.img"), "rb") as f:
        pages = bytearray(f.read())
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
    restore is byte-exact, and the retries are counted."""
    proxy.fail_next(4, 503, match="pages.img", overlapping=(0, 1 << 40))  # ranged GETs only
    opts = _options(tmp_path, pushed, _config(seaweed, tmp_path, endpoint=proxy.endpoint, cache=False))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        async with TrioClient.connect(state.server.path) as client:
            await client.wait(0, SIZE)
            await _check_memory(client, image["expected"])
            remote = (await client.stats())["remote"]
        state.stop()
    assert proxy.faults["status"] == 4
    assert remote["store"]["retries"] >= 4 and remote["cache"] is None


async def test_a_chunk_whose_gets_keep_failing_fails_its_waiters_and_the_rest_is_served(
        image, pushed, seaweed, tmp_path, proxy):
    """Every GET touching one chunk is answered 503: the wait on it fails with an
    error (``io-error``, EREMOTEIO) after the retries, every other byte is served."""
    chunk, c = 7, image["index"].chunk_size
    proxy.fail_next(10_000, 503, overlapping=(chunk * c, (chunk + 1) * c))
    opts = _options(tmp_path, pushed, _config(seaweed, tmp_path, endpoint=proxy.endpoint, cache=False))
    at = _memory_at(image, chunk)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        async with TrioClient.connect(state.server.path) as client:
            with pytest.raises(ClientError) as info:
                await client.wait(at, PAGE)
            assert info.value.code == "io-error" and info.value.errno == 121  # EREMOTEIO
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
        assert remote["fetch"]["failures"] >= 1 and "503" in remote["last_error"]
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
