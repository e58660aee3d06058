"""The daemon end to end: checkpoint -> memory file -> socket -> clients."""

from __future__ import annotations

import errno
import mmap
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import msgpack
import pytest
import trio

import aio
import aio.testing
from loader import Client, ClientError, DaemonOptions, LoaderConfig, TrioClient, mapped_memory, run_daemon
from loader.checkpoint import create_checkpoint
from workloads import make_sample_image

MiB = 1 << 20
PAGE = 4096
SIZE = 32 * MiB


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    raw = str(d / "memory.img")
    make_sample_image(raw, SIZE, seed=7)
    ckpt = str(d / "ckpt")
    create_checkpoint(raw, ckpt)
    with open(raw, "rb") as f:
        expected = f.read()
    return {"raw": raw, "pages": ckpt, "expected": expected}


def options(tmp_path, source, **kw):
    kw.setdefault("handle_signals", False)
    kw.setdefault("ready_line", False)
    return DaemonOptions(source=source, socket_path=str(tmp_path / "s.sock"), **kw)


def slowed(delay):
    return lambda q: aio.testing.DelayedQueue(q, delay)


@pytest.mark.parametrize("kind", ["raw", "pages"])
async def test_full_load_equals_image(tmp_path, images, kind):
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, images[kind]))
        await state.loader.done.wait()
        assert state.memory.view == images["expected"]
        async with TrioClient.connect(state.server.path) as client:
            assert client.memory_size == SIZE and client.page_size == PAGE
            stats = await client.stats()
            assert stats["done"] and stats["loaded_bytes"] == stats["total_bytes"]
        state.stop()


@pytest.mark.parametrize("kind", ["raw", "pages"])
async def test_waited_range_is_correct_the_moment_wait_returns(tmp_path, images, kind):
    opts = options(tmp_path, images[kind], wrap_queue=slowed(0.002), aio_backend="sync")
    expected = images["expected"]
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        async with TrioClient.connect(state.server.path) as client:
            for off in (SIZE - 5 * PAGE, SIZE // 2 + 3 * PAGE, 7 * PAGE):
                await client.wait(off, 2 * PAGE)
                assert state.memory.view[off : off + 2 * PAGE] == expected[off : off + 2 * PAGE]
            assert not state.loader.done.is_set()
        state.stop()


async def test_priority_over_the_socket(tmp_path, images):
    opts = options(tmp_path, images["raw"], wrap_queue=slowed(0.005), aio_backend="sync",
                   config=LoaderConfig(sweep_read_size=256 * 1024))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        async with TrioClient.connect(state.server.path) as client:
            await client.wait(SIZE - PAGE, PAGE)
            stats = await client.stats()
        assert stats["loaded_bytes"] < stats["total_bytes"] // 4
        assert stats["waits_served"] + stats["waits_immediate"] == 1
        state.stop()


async def test_many_clients_and_pipelined_waits(tmp_path, images):
    expected = images["expected"]
    opts = options(tmp_path, images["pages"], wrap_queue=slowed(0.0005))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        path = state.server.path

        async def trio_client(seed):
            async with TrioClient.connect(path) as client:
                async with trio.open_nursery() as inner:  # pipelined: many waits in flight at once
                    for i in range(16):
                        off = ((seed * 7919 + i * 104729) * PAGE) % (SIZE - PAGE)
                        inner.start_soon(client.wait, off, PAGE)

        def blocking_client(seed):
            with Client.connect(path) as client, mapped_memory(client) as mem:
                offs = [((seed * 31 + i * 257) * PAGE) % (SIZE - 2 * PAGE) for i in range(32)]
                ids = [client.send_wait(off, 2 * PAGE) for off in offs]
                for request_id, off in zip(reversed(ids), reversed(offs)):  # replies in any order
                    client.result(request_id)
                    assert mem[off : off + 2 * PAGE] == expected[off : off + 2 * PAGE]

        async with trio.open_nursery() as clients:
            for seed in range(6):
                clients.start_soon(trio_client, seed)
            for seed in range(3):
                clients.start_soon(trio.to_thread.run_sync, blocking_client, seed)
        stats = state.loader.statistics()
        assert stats.waits_total == 6 * 16 + 3 * 32
        assert stats.waits_failed == 0 and stats.waiters_blocked == 0
        state.stop()


async def test_client_vanishing_mid_wait_leaks_nothing(tmp_path, images):
    opts = options(tmp_path, images["raw"], wrap_queue=slowed(0.02), aio_backend="sync",
                   config=LoaderConfig(sweep=False, waiter_reads=1))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        path = state.server.path

        def vanish():
            client = Client.connect(path)
            client.send_wait(0, 8 * MiB)  # many reads' worth, slowed: still waiting when we go
            time.sleep(0.05)
            client.close()

        await trio.to_thread.run_sync(vanish)
        for _ in range(200):
            if not state.server.sessions:
                break
            await trio.sleep(0.01)
        stats = state.loader.statistics()
        assert stats.waits_cancelled == 1 and stats.waiters_blocked == 0
        assert not state.server.sessions
        async with TrioClient.connect(path) as client:  # the daemon carries on
            await client.wait(SIZE - PAGE, PAGE)
        state.stop()


#: The id of the request that ends each raw exchange: its reply proves that every
#: reply before it has arrived (replies to one connection are written in order).
LAST = 999


def _raw_exchange(path, payload, *, chunked=False):
    """Send a hello, raw bytes, then a stats request with id LAST; return every reply up
    to LAST's, or up to the daemon closing the connection (and whether it did)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(30)  # only a hang trips it: the exchange ends with LAST's reply or EOF
    hello = msgpack.packb({"op": "hello", "id": 1, "v": [1]})
    data = hello + payload + msgpack.packb({"op": "stats", "id": LAST})
    try:
        if chunked:
            for i in range(len(data)):
                sock.send(data[i : i + 1])
                time.sleep(0.001)
        else:
            sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon hung up early (a fatal error): its replies are still to be read
    unpacker = msgpack.Unpacker()
    replies, closed = [], False
    try:
        while not any(r.get("re") == LAST for r in replies):
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            unpacker.feed(chunk)
            replies.extend(unpacker)
    except ConnectionResetError:
        closed = True
    finally:
        sock.close()
    return [r for r in replies if r.get("re") != LAST], closed


def _codes(replies):
    return [r.get("err") for r in replies if "err" in r]


async def test_bad_input_gets_named_errors(tmp_path, images):
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, images["raw"]))
        path = state.server.path

        def check():
            out = {}
            pack = msgpack.packb
            out["unknown-op"] = _raw_exchange(path, pack({"op": "explode", "id": 2}) + pack({"op": "stats", "id": 3}))
            out["out-of-range"] = _raw_exchange(path, pack({"op": "wait", "id": 2, "off": SIZE, "len": PAGE}))
            out["bad-message"] = _raw_exchange(path, pack([1, 2, 3]))
            out["bad-frame"] = _raw_exchange(path, b"\xc1\xc1\xc1")
            out["too-large"] = _raw_exchange(path, pack({"op": "wait", "id": 2, "pad": "x" * 200_000}))
            out["many"] = _raw_exchange(path, b"".join(pack({"op": "nope", "id": i}) for i in range(2, 40)))
            return out

        out = await trio.to_thread.run_sync(check)
        replies, closed = out["unknown-op"]
        assert _codes(replies) == ["unknown-op"] and not closed
        assert any(r.get("ok") == "stats" for r in replies)  # still served afterwards
        assert _codes(out["out-of-range"][0]) == ["out-of-range"]
        assert _codes(out["bad-message"][0]) == ["bad-message"]
        assert _codes(out["bad-frame"][0]) == ["bad-frame"] and out["bad-frame"][1]
        assert "too-large" in _codes(out["too-large"][0]) and out["too-large"][1]
        replies, closed = out["many"]
        assert closed and _codes(replies)[-1] == "too-many-errors"
        # the daemon is fine
        async with TrioClient.connect(path) as client:
            await client.wait(0, PAGE)
        state.stop()


async def test_protocol_fed_one_byte_at_a_time(tmp_path, images):
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, images["raw"]))
        payload = msgpack.packb({"op": "wait", "id": 2, "off": SIZE - PAGE, "len": PAGE})
        replies, _ = await trio.to_thread.run_sync(lambda: _raw_exchange(state.server.path, payload, chunked=True))
        assert [r.get("re") for r in replies] == [1, 2]  # and LAST's reply came after them
        assert replies[1].get("ok") == "loaded"
        state.stop()


async def test_memory_fd_is_passed_and_maps_the_memory(tmp_path, images):
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, images["pages"]))
        await state.loader.done.wait()
        async with TrioClient.connect(state.server.path) as client:
            fd = await client.memory_fd()
        try:
            assert os.fstat(fd).st_size == SIZE
            with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                assert m[:] == images["expected"]
        finally:
            os.close(fd)
        state.stop()


async def test_shutdown_answers_waiting_clients(tmp_path, images):
    opts = options(tmp_path, images["raw"], wrap_queue=slowed(0.02), aio_backend="sync",
                   config=LoaderConfig(sweep=False, waiter_reads=1))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        errors = []

        async def waiter():
            try:
                async with TrioClient.connect(state.server.path) as client:
                    await client.wait(0, 16 * MiB)
            except ClientError as exc:
                errors.append(exc.code)

        nursery.start_soon(waiter)
        await trio.sleep(0.1)
        state.stop()
    assert errors == ["shutting-down"]
    assert not os.path.exists(opts.socket_path)


async def test_shutdown_answers_every_waiting_client_with_an_error(tmp_path, images):
    """Several clients blocked on slow reads: each one gets ``shutting-down``, none
    a late ``loaded`` and none a dropped connection.  The deadline only turns a
    client left unanswered (a hang) into a failure; it bounds nothing measured."""
    opts = options(tmp_path, images["raw"], wrap_queue=slowed(0.05), aio_backend="sync",
                   config=LoaderConfig(sweep=False, waiter_reads=1))
    offsets = [0, 5 * MiB, 11 * MiB, 17 * MiB, 23 * MiB]
    outcomes: dict[int, str] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            state = await nursery.start(run_daemon, opts)

            async def waiter(offset):
                try:
                    async with TrioClient.connect(state.server.path) as client:
                        await client.wait(offset, 8 * MiB)
                        outcomes[offset] = "loaded"
                except ClientError as exc:
                    outcomes[offset] = exc.code

            for off in offsets:
                nursery.start_soon(waiter, off)
            while state.loader.statistics().waiters_blocked < len(offsets):
                await trio.sleep(0.01)
            state.stop()
    assert outcomes == {off: "shutting-down" for off in offsets}
    s = state.loader.statistics()
    assert s.waits_failed == len(offsets) and s.waits_served == 0


async def test_eager_mode_opens_the_socket_only_when_loaded(tmp_path, images):
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, images["raw"], background=False))
        assert state.loader.done.is_set()
        async with TrioClient.connect(state.server.path) as client:
            assert client.done_at_connect
        state.stop()


NOBODY = 65534
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.fixture
def shared_dir():
    """A directory any uid may enter (pytest's tmp_path is 0700)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="pageload-peercred-"))
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as uid 65534")
@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no system python3 in /usr/bin or /bin to run as uid 65534")
async def test_socket_is_private_and_peer_uid_checked(shared_dir, images):
    # the client runs as another uid, with the stdlib only: send a hello, print the reply's kind
    hello = msgpack.packb({"op": "hello", "id": 1, "v": [1]}).hex()
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(5)\n"
        "try:\n    s.connect(sys.argv[1]); s.sendall(bytes.fromhex(sys.argv[2])); data = s.recv(4096)\n"
        "except OSError as e:\n    data = e.strerror.encode()\n"
        "print('OK' if b'hello' in data else data.decode() or 'CLOSED')\n"
    )
    # (allow_uids, chmod 0666 by hand, what the client sees, connections refused by SO_PEERCRED)
    hung_up = {"CLOSED", "Broken pipe", "Connection reset by peer"}
    cases = [((), False, {"Permission denied"}, 0), ((), True, hung_up, 1), ((NOBODY,), False, {"OK"}, 0)]
    for i, (allow, widen, expect, refused) in enumerate(cases):
        opts = DaemonOptions(source=images["raw"], socket_path=str(shared_dir / f"s{i}.sock"),
                             handle_signals=False, ready_line=False, allow_uids=allow)
        async with trio.open_nursery() as nursery:
            state = await nursery.start(run_daemon, opts)
            mode = stat.S_IMODE(os.stat(opts.socket_path).st_mode)
            assert mode == (0o660 if allow else 0o600)  # with an ACL, the group bits show its mask
            if widen:
                os.chmod(opts.socket_path, 0o666)  # let the file mode pass: SO_PEERCRED still refuses
            result = await trio.run_process([SYSTEM_PYTHON, "-c", script, opts.socket_path, hello], user=NOBODY,
                                            capture_stdout=True, check=False)
            assert result.stdout.decode().strip() in expect, result
            assert state.server.statistics().connections_refused == refused
            state.stop()


# ---------------------------------------------------------------- the real command line


def _start(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_cli_restore_wait_stats_and_sigterm(tmp_path, images):
    sock = str(tmp_path / "cli.sock")
    proc = _start(["restore", images["pages"], "--socket", sock, "--background"])
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY socket=" + sock)

        def run(*a):
            return subprocess.run([sys.executable, "-m", "cli", *a], capture_output=True, text=True)

        ok = run("wait", "--socket", sock, "16M", "4K")
        assert ok.returncode == 0, ok.stderr
        bad = run("wait", "--socket", sock, "40M", "4K")
        assert bad.returncode != 0 and "out-of-range" in bad.stderr
        st = run("stats", "--socket", sock, "--json")
        import json

        stats = json.loads(st.stdout)
        assert {"total_bytes", "loaded_bytes", "done"} <= stats.keys()
        assert stats["total_bytes"] > 0
        human = run("stats", "--socket", sock)
        assert "loaded" in human.stdout and human.returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not os.path.exists(sock)
    assert "shutting down" in err


def test_cli_ready_fd(tmp_path, images):
    sock = str(tmp_path / "fd.sock")
    r, w = os.pipe()
    proc = _start(["restore", images["raw"], "--socket", sock, "--background", "--ready-fd", str(w), "-q"],
                  pass_fds=(w,))
    os.close(w)
    try:
        with os.fdopen(r) as ready:
            assert ready.read() == "READY\n"
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "index.msgpack"
    bad.write_bytes(b"\xc1garbage")
    proc = subprocess.run([sys.executable, "-m", "cli", "restore", str(bad), "--socket",
                           str(tmp_path / "x.sock")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and str(bad) in proc.stderr


def test_cli_wait_without_daemon_fails_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cli", "wait", "--socket", str(tmp_path / "none"),
                           "0", "4K"], capture_output=True, text=True)
    assert proc.returncode == 1 and "cannot reach the daemon" in proc.stderr


async def test_memory_file_path_is_reused_with_force_emptied_and_sized(tmp_path, images):
    target = tmp_path / "guest.mem"
    target.write_bytes(b"stale" * 100_000)  # bigger than nothing, smaller than SIZE: emptied and resized
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, images["pages"], memory_file=str(target),
                                                        force_memory_file=True))
        await state.loader.done.wait()
        st = os.stat(target)
        assert st.st_size == SIZE
        assert st.st_blocks * 512 < SIZE  # sparse: holes stayed holes
        with open(target, "rb") as f:
            assert f.read() == images["expected"]
        state.stop()


async def test_direct_falls_back_with_a_message_where_refused(tmp_path, images, caplog, monkeypatch):
    # some file systems refuse O_DIRECT with EINVAL (tmpfs did before Linux 6.6): act as one
    real_open = os.open

    def refusing_open(path, flags, *args, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", refusing_open)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, images["raw"], direct=True))
        await state.loader.done.wait()
        assert state.memory.view == images["expected"]
        state.stop()
    assert "O_DIRECT is not supported" in caplog.text and "falling back to buffered reads" in caplog.text


async def test_direct_reads_the_same_bytes(tmp_path, images):
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, images["pages"], direct=True))
        await state.loader.done.wait()
        assert state.memory.view == images["expected"]
        state.stop()


async def test_pending_waits_per_connection_are_bounded(tmp_path, images):
    opts = options(tmp_path, images["raw"], wrap_queue=slowed(0.02), aio_backend="sync",
                   config=LoaderConfig(sweep=False, waiter_reads=1), max_pending_waits=4)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)

        layout = state.source.checkpoint.scanned().layout  # (the daemon finds the holes as it loads)
        data_pages = [lo for lo, _ in layout.data_in(0, SIZE)][:6]  # one page of each of 6 extents
        assert len(data_pages) == 6

        def pipeline():
            with Client.connect(state.server.path) as client:
                ids = [client.send_wait(off, PAGE) for off in data_pages]
                outcome = []
                for request_id in ids:
                    try:
                        client.result(request_id)
                        outcome.append("loaded")
                    except ClientError as exc:
                        outcome.append(exc.code)
                return outcome

        outcome = await trio.to_thread.run_sync(pipeline)
        assert sorted(outcome) == ["loaded"] * 4 + ["too-many-requests"] * 2
        state.stop()


def test_the_heap_freed_at_start_up_goes_back_to_the_system() -> None:
    """Issue 20: a million-range index's start-up temporaries (about 48 MiB) were freed
    but kept by glibc, and the daemon's RSS stayed 22 MiB higher for its whole life;
    release_free_heap (called once the tables are built) gives them back."""
    import loader.daemon._options as daemon_mod

    if daemon_mod._MALLOC_TRIM is None:
        pytest.skip("no glibc malloc_trim in this C library")

    def anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) * 1024

    held = [bytearray(60 << 10) for _ in range(1000)]  # below the mmap threshold: the heap
    for b in held:
        b[::4096] = b"\1" * len(b[::4096])  # touched: resident
    keep = held[-1]  # the heap's top stays in use: only a trim can give back what is below
    del held
    before = anon()
    daemon_mod.release_free_heap()
    after = anon()
    assert before - after > 30 << 20, f"RssAnon {before >> 20} -> {after >> 20} MiB"
    del keep


#: glibc's mallinfo2 and malloc/free through ctypes, for the probes below
_MALLINFO = """
import ctypes

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Info
"""

_MMAP_PROBE = _MALLINFO + """
import sys
from loader.daemon._options import unmap_large_allocations

if sys.argv[1] == "fixed" and not unmap_large_allocations():
    sys.exit(3)
libc.free(libc.malloc(1 << 20))  # a response body freed: glibc's default raises its threshold past it
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


@pytest.mark.parametrize("mode, mapped", [("default", 0), ("fixed", 1)])
def test_large_allocations_stay_mappings_of_their_own_in_a_daemon_on_a_store(mode: str, mapped: int) -> None:
    """A restore from a store keeps glibc's mmap threshold fixed (unmap_large_allocations):
    a 1 MiB block allocated after one was freed is still a mapping of its own (given
    back when freed), where glibc's default would take it from a heap that keeps it
    resident (18 MiB of RSS in a restore from a store, docs/REMOTE.md "Measured")."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("no mallinfo2 in this C library (glibc >= 2.33 has it)")
    got = subprocess.run([sys.executable, "-c", _MMAP_PROBE, mode], capture_output=True, text=True, check=False)
    assert got.returncode == 0, got.stderr
    assert int(got.stdout) == mapped, got.stdout


_LOCAL_MMAP_PROBE = _MALLINFO + """
import sys, trio
from loader import DaemonOptions, run_daemon
from workloads import make_sample_image

image, sock = sys.argv[1], sys.argv[2]
make_sample_image(image, 8 << 20, seed=3)

async def main():
    opts = DaemonOptions(source=image, socket_path=sock, handle_signals=False, ready_line=False)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        libc.free(libc.malloc(1 << 20))  # glibc's default raises its threshold past a block freed
        before = libc.mallinfo2().hblks
        block = libc.malloc(1 << 20)
        print(libc.mallinfo2().hblks - before)
        libc.free(block)
        state.stop()

trio.run(main)
"""


def test_a_local_restore_keeps_large_allocations_mappings_of_their_own(tmp_path: pathlib.Path) -> None:
    """A local restore fixes glibc's mmap threshold too, not only one from a store:
    a 1M-range fill's big temporaries (a window's batch of the table) otherwise left
    4 MiB of freed heap resident (77.2 against 73.3 MiB outside the memory file, docs/
    MEASUREMENTS.md, "RSS outside the memory file, counted whole")."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("no mallinfo2 in this C library (glibc >= 2.33 has it)")
    got = subprocess.run([sys.executable, "-c", _LOCAL_MMAP_PROBE, str(tmp_path / "img"), str(tmp_path / "s.sock")],
                         capture_output=True, text=True, check=False, cwd=str(pathlib.Path(__file__).parent.parent),
                         timeout=60)
    assert got.returncode == 0, got.stderr
    assert int(got.stdout.split()[-1]) == 1, got.stdout
