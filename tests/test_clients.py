"""Client conformance: the same tests over the three clients (blocking ``Client``,
``TrioClient``, ``AsyncioClient``), against a real ``pageload restore`` subprocess.

Each test is a scenario ``async def scenario(c, gather)`` run by :func:`run_with`:
``c`` is the client (the blocking one behind a thin adapter whose methods never
suspend) and ``gather`` runs zero-argument coroutine functions concurrently the
way that client's world does it (a trio nursery, ``asyncio.gather``, or one after
another for the blocking client).  The daemon is lazy (``--no-sweep``), so a page
is loaded only once some test waited for it or prefetched it; every test uses its
own region per client kind, so they can share one daemon.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

import protocol
from loader import AsyncioClient, Client, ClientError, TrioClient
from workloads import DaemonProcess, make_sample_image

MiB = 1 << 20
PAGE = 4096
SIZE = 16 * MiB
KINDS = ["blocking", "trio", "asyncio"]
REGION = SIZE // 16  #: each (test, kind) gets its own 1 MiB region

Gather = Callable[..., Awaitable[list[Any]]]


class BlockingAdapter:
    """``Client`` with awaitable methods (that never suspend) for the shared scenarios."""

    def __init__(self, client: Client) -> None:
        self.client = client
        for name in ("version", "memory_size", "page_size", "done_at_connect"):
            setattr(self, name, getattr(client, name))

    async def wait(self, offset: int, length: int) -> None:
        self.client.wait(offset, length)

    async def prefetch(self, offset: int, length: int, working_set: bool = False) -> None:
        self.client.prefetch(offset, length, working_set)

    async def mark(self) -> None:
        self.client.mark()

    async def stats(self) -> dict[str, Any]:
        return self.client.stats()

    async def memory_fd(self) -> int:
        return self.client.memory_fd()

    async def load_map(self) -> None:
        self.client.load_map()

    @property
    def map_hits(self) -> int:
        return self.client.map_hits


async def _sequential(*fns: Callable[[], Awaitable[Any]]) -> list[Any]:
    return [await fn() for fn in fns]


async def _trio_gather(*fns: Callable[[], Awaitable[Any]]) -> list[Any]:
    results: list[Any] = [None] * len(fns)

    async def one(i: int, fn: Callable[[], Awaitable[Any]]) -> None:
        results[i] = await fn()

    async with trio.open_nursery() as nursery:
        for i, fn in enumerate(fns):
            nursery.start_soon(one, i, fn)
    return results


async def _asyncio_gather(*fns: Callable[[], Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*(fn() for fn in fns)))


def run_with(kind: str, path: str, scenario: Callable[[Any, Gather], Awaitable[Any]]) -> Any:
    """Connect a ``kind`` client to ``path`` and run ``scenario`` in its event loop."""
    if kind == "asyncio":
        async def main_asyncio() -> Any:
            async with AsyncioClient.connect(path) as c:
                return await scenario(c, _asyncio_gather)
        return asyncio.run(main_asyncio())
    if kind == "trio":
        async def main_trio() -> Any:
            async with TrioClient.connect(path) as c:
                return await scenario(c, _trio_gather)
        return trio.run(main_trio)

    async def main_blocking() -> Any:
        with Client.connect(path) as c:
            return await scenario(BlockingAdapter(c), _sequential)
    return trio.run(main_blocking)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("clients")
    path = str(d / "memory.img")
    make_sample_image(path, SIZE, seed=11, dense=True)
    with open(path, "rb") as f:
        return path, f.read()


@pytest.fixture(scope="module")
def daemon(image, tmp_path_factory):
    d = tmp_path_factory.mktemp("clients-daemon")
    with DaemonProcess(image[0], str(d / "s.sock"), str(d / "daemon.log"),
                       ["--background", "--no-sweep", "-q"]) as proc:
        yield proc


def region(test_index: int, kind: str) -> int:
    return (test_index * len(KINDS) + KINDS.index(kind)) % 16 * REGION


@pytest.mark.parametrize("kind", KINDS)
def test_hello_tells_the_memory_geometry(daemon, kind):
    async def scenario(c, gather):
        return c.version, c.memory_size, c.page_size, c.done_at_connect

    version, size, page, done = run_with(kind, daemon.socket_path, scenario)
    assert version in protocol.SUPPORTED_VERSIONS
    assert (size, page, done) == (SIZE, PAGE, False)


@pytest.mark.parametrize("kind", KINDS)
def test_wait_loads_the_range_and_the_memory_fd_shows_it(daemon, image, kind):
    base = region(1, kind) + 3 * PAGE + 100  # unaligned: the daemon rounds to pages

    async def scenario(c, gather):
        before = (await c.stats())["loaded_bytes"]
        await c.wait(base, 5 * PAGE)
        after = (await c.stats())["loaded_bytes"]
        fd = await c.memory_fd()
        try:
            m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            return before, after, m[base : base + 5 * PAGE]
        finally:
            m.close()

    before, after, data = run_with(kind, daemon.socket_path, scenario)
    assert after - before >= 5 * PAGE  # lazy: only what was waited for
    assert data == image[1][base : base + 5 * PAGE]


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_wait_is_immediate(daemon, kind):
    base = region(2, kind)

    async def scenario(c, gather):
        await c.wait(base, PAGE)
        s1 = await c.stats()
        await c.wait(base, PAGE)
        s2 = await c.stats()
        return s1, s2

    s1, s2 = run_with(kind, daemon.socket_path, scenario)
    assert s2["waits_immediate"] == s1["waits_immediate"] + 1
    assert s2["loaded_bytes"] == s1["loaded_bytes"]


@pytest.mark.parametrize("kind", KINDS)
def test_prefetch_is_accepted_and_loads(daemon, kind):
    base = region(3, kind)

    async def scenario(c, gather):
        s1 = await c.stats()
        await c.prefetch(base, 8 * PAGE)
        for _ in range(500):  # prefetch answers at once; the load follows
            s2 = await c.stats()
            if s2["loaded_bytes"] >= s1["loaded_bytes"] + 8 * PAGE:
                break
            await (asyncio.sleep(0.01) if isinstance(c, AsyncioClient) else trio.sleep(0.01))
        await c.wait(base, 8 * PAGE)
        s3 = await c.stats()
        return s1, s2, s3

    s1, s2, s3 = run_with(kind, daemon.socket_path, scenario)
    assert s2["prefetches"] == s1["prefetches"] + 1
    assert s2["loaded_bytes"] >= s1["loaded_bytes"] + 8 * PAGE
    assert s3["waits_immediate"] == s2["waits_immediate"] + 1


@pytest.mark.parametrize("kind", KINDS)
def test_hint_working_set_and_mark(daemon, kind):
    """Working sets (issue 10): a prefetch marked as working set is a prefetch to a daemon
    that is not recording, and ``mark`` is answered whether or not it records."""
    base = region(8, kind)

    async def scenario(c, gather):
        s1 = await c.stats()
        await c.prefetch(base, 2 * PAGE, working_set=True)
        await c.mark()
        await c.mark()
        return s1, await c.stats()

    s1, s2 = run_with(kind, daemon.socket_path, scenario)
    assert s2["prefetches"] == s1["prefetches"] + 1 and "recording" not in s2


@pytest.mark.parametrize("kind", KINDS)
def test_errors_are_client_errors_and_the_connection_survives(daemon, kind):
    async def scenario(c, gather):
        codes = []
        for offset, length in ((SIZE, PAGE), (SIZE - PAGE, 2 * PAGE)):
            try:
                await c.wait(offset, length)
            except ClientError as exc:
                codes.append(exc.code)
        try:
            await c.prefetch(SIZE + PAGE, PAGE)
        except ClientError as exc:
            codes.append(exc.code)
        await c.wait(0, PAGE)  # still usable
        return codes

    assert run_with(kind, daemon.socket_path, scenario) == ["out-of-range"] * 3


@pytest.mark.parametrize("kind", KINDS)
def test_many_concurrent_waits(daemon, image, kind):
    base = region(4, kind)
    offsets = [base + ((i * 37) % 64) * PAGE for i in range(64)]

    async def scenario(c, gather):
        await gather(*(lambda off=off: c.wait(off, PAGE) for off in offsets))
        fds = await gather(c.memory_fd, c.memory_fd)
        for fd in fds:
            os.close(fd)
        return fds, await c.stats()

    fds, stats = run_with(kind, daemon.socket_path, scenario)
    assert len(set(fds)) == 2  # each memory_fd call is a new fd
    assert stats["waiters_blocked"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_stats_are_the_daemons_record(daemon, kind):
    async def scenario(c, gather):
        return await c.stats()

    stats = run_with(kind, daemon.socket_path, scenario)
    for key in ("memory_size", "total_bytes", "loaded_bytes", "waits_total", "latency_us", "server", "backend"):
        assert key in stats
    assert stats["memory_size"] == SIZE and stats["server"]["connections"] >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_daemon_going_away_is_a_client_error(image, tmp_path, kind):
    proc = DaemonProcess(image[0], str(tmp_path / "s.sock"), str(tmp_path / "d.log"), ["--background", "-q"])
    proc.start()
    try:
        async def scenario(c, gather):
            await c.wait(0, PAGE)
            proc.stop()
            with pytest.raises(ClientError) as info:
                for _ in range(3):  # the first may still get through before the close is seen
                    await c.wait(PAGE, PAGE)
            return info.value.code

        assert run_with(kind, proc.socket_path, scenario) in (None, "shutting-down")  # None: ConnectionLost
    finally:
        proc.stop()


def test_connecting_to_nothing_raises_oserror(tmp_path):
    path = str(tmp_path / "none.sock")
    for kind in KINDS:
        with pytest.raises(OSError):
            run_with(kind, path, lambda c, gather: gather())


# -- asyncio only: read() -------------------------------------------------------------------------


def test_asyncio_read_waits_then_returns_the_bytes(daemon, image):
    base = region(5, "asyncio")
    expected = image[1]

    async def scenario(c, gather):
        s1 = await c.stats()
        one = await c.read(base + 10, 3 * PAGE)  # across page boundaries
        empty = await c.read(base, 0)
        # many tasks at once: one file position per client, so each gets its own bytes
        offs = [base + 4 * PAGE + i * 1000 for i in range(40)]
        many = await gather(*(lambda off=off: c.read(off, 777) for off in offs))
        s2 = await c.stats()
        with pytest.raises(ClientError, match="out-of-range"):
            await c.read(SIZE - 10, 20)
        with pytest.raises(ValueError):
            await c.read(-1, 4)
        return s1, s2, one, empty, list(zip(offs, many))

    s1, s2, one, empty, many = run_with("asyncio", daemon.socket_path, scenario)
    assert one == expected[base + 10 : base + 10 + 3 * PAGE]
    assert empty == b""
    for off, data in many:
        assert data == expected[off : off + 777]
    assert s2["waits_total"] >= s1["waits_total"] + 41  # the empty read asks nothing


def test_asyncio_read_does_not_block_the_loop(daemon):
    """While reads run (in aiofiles' worker threads), another task keeps ticking."""
    base = region(6, "asyncio")

    async def scenario(c, gather):
        ticks = 0
        done = False

        async def ticker():
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        async def reader():
            nonlocal done
            for i in range(50):
                await c.read(base + i * PAGE, PAGE)
            done = True

        await gather(ticker, reader)
        return ticks

    assert run_with("asyncio", daemon.socket_path, scenario) > 50


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_map_skips_the_round_trip_for_loaded_ranges(daemon, image, kind):
    # region 9 shares its 1 MiB with regions 3 and 4 (modulo 16), whose tests load its first
    # 64 pages: the second half is untouched
    base = region(9, kind) + REGION // 2 + 2 * PAGE

    async def waits() -> int:
        return int((await c_ref[0].stats())["waits_total"])

    c_ref: list[Any] = []

    async def scenario(c, gather):
        c_ref.append(c)
        await c.load_map()
        w0 = await waits()
        await c.wait(base + 100, 3 * PAGE)  # not loaded: asks the daemon
        w1 = await waits()
        await c.wait(base + 100, 3 * PAGE)  # loaded now, and the map shows it: no request
        await c.wait(base + PAGE, PAGE)
        w2 = await waits()
        hits = c.map_hits
        await c.wait(base + 4 * PAGE, PAGE)  # the next page: not loaded, asks
        w3 = await waits()
        with pytest.raises(ClientError):  # outside the memory: still the daemon's error
            await c.wait(SIZE - PAGE, 2 * PAGE)
        return w1 - w0, w2 - w1, hits, w3 - w2

    asked, skipped, hits, asked_again = run_with(kind, daemon.socket_path, scenario)
    assert (asked, skipped, hits, asked_again) == (1, 0, 2, 1)
