"""Busy polling (docs/DESIGN.md, "Busy polling"): after its replies the server polls
the one connection asking for a moment before its task sleeps in epoll; only then,
never with other connections asking or a VMM's faults served, and not for a client
that does not come back at once."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import trio

from loader import Client, DaemonOptions, run_daemon
from workloads import make_sample_image

MiB = 1 << 20
SIZE = 4 * MiB
PAGE = 4096


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("image") / "memory.img")
    make_sample_image(path, SIZE, seed=5)
    return path


def options(tmp_path, source, **kw):
    kw.setdefault("handle_signals", False)
    kw.setdefault("ready_line", False)
    return DaemonOptions(source=source, socket_path=str(tmp_path / "s.sock"), **kw)


async def _loaded_daemon(nursery, tmp_path, image, **kw):
    state = await nursery.start(run_daemon, options(tmp_path, image, **kw))
    with trio.fail_after(20):
        await state.loader.done.wait()
    return state


def _waits(path, n, pause_s=0.0):
    """``n`` waits one at a time on loaded pages (``pause_s`` between them); the replies' errors."""
    with Client.connect(path, timeout=10) as client:
        for i in range(n):
            client.wait((i * 7 % (SIZE // PAGE)) * PAGE, PAGE)
            if pause_s:
                time.sleep(pause_s)
        return client.stats()["server"]


async def test_a_client_waiting_back_to_back_is_answered_from_the_poll(tmp_path, image):
    # a generous poll time, so that a slow machine's client still comes back within it
    async with trio.open_nursery() as nursery:
        state = await _loaded_daemon(nursery, tmp_path, image, busy_poll_us=1000)
        server = await trio.to_thread.run_sync(_waits, state.server.path, 400)
        nursery.cancel_scope.cancel()
    assert server["busy_poll_us"] == 1000
    assert server["busy_poll_hits"] > 0  # the next request came while the task polled
    assert state.server.sessions == set()


_TIGHT_CLIENT = """
import json, os, sys, time
from loader import Client
path, stop, pages = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Client.connect(path, timeout=10) as client:
    deadline = time.monotonic() + 60  # a guard against a hang, not a bound on anything measured
    i = 0
    while not os.path.exists(stop) and time.monotonic() < deadline:
        client.wait((i * 7 % pages) * 4096, 4096)
        i += 1
        if i == 200:
            print("going", flush=True)
    stopped_by = "stop-file" if os.path.exists(stop) else "deadline"
    print(json.dumps({"stopped_by": stopped_by, "server": client.stats()["server"]}), flush=True)
"""


async def test_a_client_served_from_the_poll_never_starves_another(tmp_path, image):
    """Requests caught by the poll take no checkpoint of their own: they count towards
    the periodic one, where trio serves the other connections (and signals, timers).
    The tight client is a process of its own, so that it never waits for our GIL."""
    import json
    import os

    stop = str(tmp_path / "stop")

    def other(path):
        time.sleep(0.05)  # the tight client is being polled by now
        try:
            with Client.connect(path, timeout=90) as client:
                return client.stats()["server"]["connections"]
        finally:
            open(stop, "w").close()  # only now may the tight client stop asking

    async with trio.open_nursery() as nursery:
        state = await _loaded_daemon(nursery, tmp_path, image, busy_poll_us=1000)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", _TIGHT_CLIENT, state.server.path, stop, str(SIZE // PAGE)],
            stdout=subprocess.PIPE, cwd=root)
        assert proc.stdout is not None
        out = b""
        with trio.fail_after(30):
            while b"going\n" not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the tight client ended early"
                out += chunk
        connections = await trio.to_thread.run_sync(other, state.server.path)
        with trio.fail_after(90):
            async for chunk in proc.stdout:
                out += chunk
            await proc.wait()
        nursery.cancel_scope.cancel()
    tight = json.loads(out.split(b"going\n", 1)[1])
    assert tight["server"]["busy_poll_hits"] > 0
    # the other client was answered while the tight one was still connected and asking:
    # the tight client stopped because of the file written after that answer, not at its
    # deadline (a starved connection is answered only once the tight one has gone)
    assert connections == 2 and tight["stopped_by"] == "stop-file"


async def test_no_busy_polling_when_it_is_off(tmp_path, image):
    async with trio.open_nursery() as nursery:
        state = await _loaded_daemon(nursery, tmp_path, image, busy_poll_us=0)
        server = await trio.to_thread.run_sync(_waits, state.server.path, 200)
        nursery.cancel_scope.cancel()
    assert (server["busy_poll_hits"], server["busy_poll_misses"]) == (0, 0)


async def test_a_client_that_does_not_come_back_at_once_is_polled_twice_then_no_more(tmp_path, image):
    """Each poll that runs out of time burns the daemon's CPU: two in a row, and the
    connection is not polled again while its client keeps pausing."""
    async with trio.open_nursery() as nursery:
        state = await _loaded_daemon(nursery, tmp_path, image, busy_poll_us=1000)
        server = await trio.to_thread.run_sync(_waits, state.server.path, 12, 0.005)
        nursery.cancel_scope.cancel()
    assert server["busy_poll_misses"] == 2
    assert server["busy_poll_hits"] == 0


async def test_busy_polling_only_for_the_one_connection_asking(tmp_path, image):
    from loader.socket import _session as _server

    async with trio.open_nursery() as nursery:
        state = await _loaded_daemon(nursery, tmp_path, image, busy_poll_us=50)
        server = state.server
        a, b = object(), object()
        server.note_asking(a)
        assert not server.may_busy_poll(a)  # a request from another connection just before
        server._asking_since -= _server.BUSY_POLL_QUIET_NS
        assert server.may_busy_poll(a)
        assert not server.may_busy_poll(b)
        server.note_asking(b)  # another connection asks: a is no longer polled
        assert not server.may_busy_poll(a) and not server.may_busy_poll(b)
        server._asking_since -= _server.BUSY_POLL_QUIET_NS
        assert server.may_busy_poll(b)
        server.busy_poll_paused += 1  # a VMM's page faults are served
        assert not server.may_busy_poll(b)
        server.busy_poll_paused -= 1
        assert server.may_busy_poll(b)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("value", ["-1", "1001"])
def test_a_busy_poll_time_out_of_range_is_one_line_and_exit_2(tmp_path, image, value):
    proc = subprocess.run([sys.executable, "-m", "cli", "restore", image, "--socket", str(tmp_path / "s.sock"),
                           "--background", "--busy-poll-us", value], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"pageload: busy poll time must be 0 to 1000 us, not {value}"]
