"""Operations: Prometheus metrics, systemd notify and socket activation,
``pageload stats --watch``."""

from __future__ import annotations

import os
import pathlib
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import aio.testing
from loader import (
    ActivationError,
    DaemonOptions,
    LoaderConfig,
    MetricsAddress,
    MetricsError,
    Notifier,
    TrioClient,
    activated_socket,
    listen_fds,
    parse_metrics_address,
    run_daemon,
)
from workloads import DaemonProcess, make_sample_image
from workloads._daemon_process import read_line

MiB = 1 << 20
PAGE = 4096
SIZE = 16 * MiB
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ops") / "memory.img")
    make_sample_image(path, SIZE, seed=3)
    return path


def options(tmp_path, source, **kw):
    kw.setdefault("handle_signals", False)
    kw.setdefault("ready_line", False)
    return DaemonOptions(source=source, socket_path=str(tmp_path / "s.sock"), **kw)


async def http(address, request: bytes) -> bytes:
    """One HTTP exchange with the metrics responder (TCP (host, port) or a Unix path)."""
    if isinstance(address, str):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        await sock.connect(address)
        await sock.send(request)
        data = b""
        while chunk := await sock.recv(65536):
            data += chunk
    return data


def families(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    assert b"Content-Type: text/plain; version=" in head
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(fams, name, **labels):
    for fam in fams.values():
        for sample in fam.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name, labels)


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_addresses_parse():
    assert parse_metrics_address("127.0.0.1:9464") == MetricsAddress(host="127.0.0.1", port=9464)
    assert parse_metrics_address("[::1]:0") == MetricsAddress(host="::1", port=0)
    assert parse_metrics_address(":9464") == MetricsAddress(host="0.0.0.0", port=9464)
    assert parse_metrics_address("/run/pageload/metrics.sock") == MetricsAddress(path="/run/pageload/metrics.sock")
    assert parse_metrics_address("./m.sock").path == "./m.sock"
    for bad in ("", "9464", "localhost:http", "host:70000", "host:-1"):
        with pytest.raises(MetricsError, match="--metrics"):
            parse_metrics_address(bad)


async def test_metrics_scraped_over_tcp_match_the_stats(tmp_path, image):
    opts = options(tmp_path, image, metrics=MetricsAddress(host="127.0.0.1", port=0),
                   wrap_queue=lambda q: aio.testing.DelayedQueue(q, 0.002), aio_backend="sync",
                   config=LoaderConfig(sweep=False))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        host, port = state.metrics.bound.rsplit(":", 1)
        address = (host, int(port))
        async with TrioClient.connect(state.server.path) as client:
            while (await client.stats())["scanned_bytes"] < SIZE:  # the holes found: data_bytes exact
                await trio.sleep(0.01)
            await client.wait(5 * PAGE, 3 * PAGE)  # blocks: nothing is loaded without a sweep
            await client.wait(5 * PAGE, PAGE)  # immediate
            with pytest.raises(Exception, match="out-of-range"):
                await client.wait(SIZE, PAGE)
            fams = families(await http(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
            stats = await client.stats()
        assert value(fams, "pageload_memory_bytes") == SIZE
        assert value(fams, "pageload_data_bytes") == stats["total_bytes"]
        assert value(fams, "pageload_loaded_bytes") == stats["loaded_bytes"] >= 3 * PAGE
        assert value(fams, "pageload_done") == 0
        assert value(fams, "pageload_waits_total", outcome="served") == 1
        assert value(fams, "pageload_waits_total", outcome="immediate") == 1
        assert value(fams, "pageload_waits_total", outcome="failed") == 0
        assert value(fams, "pageload_waiters_blocked") == 0
        assert value(fams, "pageload_reads_in_flight") == 0
        assert value(fams, "pageload_reads_total") == stats["reads_total"] >= 1
        assert value(fams, "pageload_reads_timed_out_total") == stats["reads_timed_out"] == 0
        assert value(fams, "pageload_reads_copied_total") == stats["reads_copied"]  # (sync copies: sweep reads)
        assert value(fams, "pageload_background_reads_in_flight") == 0
        assert value(fams, "pageload_corrupt_chunks_total") == 0
        assert value(fams, "pageload_scanned_bytes") == stats["scanned_bytes"] == SIZE
        assert value(fams, "pageload_clients_connected") == 1
        assert value(fams, "pageload_connections_total") == 1
        for outcome, key in (("hit", "busy_poll_hits"), ("miss", "busy_poll_misses"), ("yield", "busy_poll_yields")):
            assert value(fams, "pageload_busy_polls_total", outcome=outcome) == stats["server"][key]
        assert value(fams, "pageload_blocked_seconds_total") > 0
        assert value(fams, "pageload_fill_throughput_bytes_per_second") >= 0
        assert value(fams, "pageload_info", backend="sync") == 1
        assert not [name for name in fams if name.startswith("pageload_remote_")]  # a local checkpoint
        hist = fams["pageload_wait_latency_seconds"]
        assert hist.type == "histogram"
        buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
        # every bucket the stats keep, fixed: 2**k us for k < 39, then +Inf
        assert [s.labels["le"] for s in buckets][:3] == ["1e-06", "2e-06", "4e-06"]
        assert buckets[-1].labels["le"] == "+Inf" and len(buckets) == 40
        assert buckets[-1].value == value(fams, "pageload_wait_latency_seconds_count") == stats["latency_us"]["count"]
        assert stats["latency_us"]["count"] >= 1
        assert [b.value for b in buckets] == sorted(b.value for b in buckets)  # cumulative
        assert value(fams, "pageload_wait_latency_seconds_sum") > 0
        state.stop()


async def test_metrics_over_a_unix_socket_and_the_responder_is_strict(tmp_path, image):
    path = str(tmp_path / "metrics.sock")
    opts = options(tmp_path, image, metrics=MetricsAddress(path=path))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        assert os.stat(path).st_mode & 0o777 == 0o600
        await state.loader.done.wait()
        fams = families(await http(path, b"GET /metrics HTTP/1.0\r\n\r\n"))
        assert value(fams, "pageload_done") == 1
        assert value(fams, "pageload_loaded_bytes") == value(fams, "pageload_data_bytes")
        assert value(fams, "pageload_clients_connected") == 0
        head = await http(path, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and head.endswith(b"\r\n\r\n")
        assert (await http(path, b"GET /other HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404")
        assert (await http(path, b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 405")
        assert (await http(path, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.0 400")
        too_long = b"GET /metrics HTTP/1.0\r\nX: " + b"a" * 9000 + b"\r\n\r\n"
        assert (await http(path, too_long)).startswith(b"HTTP/1.0 431")
        # a scraper that connects and says nothing holds one slot, not the responder
        async with trio.open_nursery() as idle:
            for _ in range(3):
                idle.start_soon(http, path, b"GET /metrics HTTP/1.0\r\n")  # never finishes its head
            await trio.sleep(0.05)
            assert (await http(path, b"GET / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 200")
            idle.cancel_scope.cancel()
        state.stop()
    assert not os.path.exists(path)


async def test_metrics_serve_while_an_eager_restore_loads(tmp_path, image):
    """Without --background the socket opens only when loaded; the metrics show the load meanwhile."""
    path = str(tmp_path / "metrics.sock")
    opts = options(tmp_path, image, background=False, metrics=MetricsAddress(path=path), aio_backend="sync",
                   wrap_queue=lambda q: aio.testing.DelayedQueue(q, 0.2),
                   config=LoaderConfig(sweep_read_size=PAGE * 16))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_daemon, opts)
        while not os.path.exists(path):
            await trio.sleep(0.01)
        fams = families(await http(path, b"GET /metrics HTTP/1.0\r\n\r\n"))
        assert value(fams, "pageload_done") == 0
        assert value(fams, "pageload_loaded_bytes") < value(fams, "pageload_data_bytes")
        assert not os.path.exists(tmp_path / "s.sock")  # not serving clients yet
        nursery.cancel_scope.cancel()


async def test_metrics_address_in_use_is_a_startup_failure(tmp_path, image):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match=f"127.0.0.1:{port}"):
            await run_daemon(options(tmp_path, image, metrics=MetricsAddress(host="127.0.0.1", port=port)))
    assert not os.path.exists(tmp_path / "s.sock")


def test_cli_bad_metrics_is_one_line_exit_2(tmp_path, image):
    for arg in ("nonsense", "127.0.0.1:99999"):
        proc = subprocess.run([sys.executable, "-m", "cli", "restore", image, "--socket", str(tmp_path / "s"),
                               "--metrics", arg], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "--metrics" in proc.stderr


IDLE = 1000
SCRAPE_TIMEOUT_S = 10.0  # Prometheus's default scrape_timeout: a scrape that takes longer has failed


class _IdleFlood:
    """``count`` TCP connections to ``port`` that never send anything, held: one the
    daemon closes is opened again at once (a thread), as a hostile client would."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.socks: dict[int, socket.socket] = {}
        self.poll = select.poll()
        self.stop = False
        self.reopened = 0
        for _ in range(count):
            self._open()
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()

    def _open(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))  # never waits: a full backlog leaves it connecting
        self.socks[s.fileno()] = s
        self.poll.register(s, select.POLLIN)

    def _hold(self) -> None:
        while not self.stop:
            for fd, _ in self.poll.poll(50):
                s = self.socks.pop(fd)
                self.poll.unregister(fd)
                s.close()  # the daemon closed it (or answered it): open another
                self.reopened += 1
                if not self.stop:
                    self._open()

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        for s in self.socks.values():
            s.close()


def _scrape_tcp(port: int) -> bytes:
    """One scrape as Prometheus makes it: connect, ask, read, within SCRAPE_TIMEOUT_S in all."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=SCRAPE_TIMEOUT_S) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            while time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    return data
                data += chunk
    except OSError:
        pass
    return b""


def test_idle_tcp_connections_cannot_lock_a_scraper_out(tmp_path, image):
    """1000 connections to the TCP metrics port that never say anything, held (one
    the daemon closes is opened again): scrapes still get their metrics.  Before,
    eight of them held every slot for 5 s each, the rest waited in the backlog ahead
    of the scraper, and scrapes failed for as long as they were held."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + 200:
        if hard != resource.RLIM_INFINITY and hard < IDLE + 200:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {IDLE + 200} descriptors this test holds")
        resource.setrlimit(resource.RLIMIT_NOFILE, (IDLE + 200, hard))
    with DaemonProcess(image, str(tmp_path / "s.sock"), str(tmp_path / "d.log"),
                       ["--background", "--metrics", "127.0.0.1:0"]) as daemon:
        with open(daemon.log_path) as f:
            port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", f.read()).group(1))
        flood = _IdleFlood(port, IDLE)
        try:
            time.sleep(0.5)  # the flood reaches the daemon first
            results = [_scrape_tcp(port) for _ in range(3)]
        finally:
            flood.close()
        assert all(results), [len(r) for r in results]
        for data in results:
            assert value(families(data), "pageload_memory_bytes") == SIZE
        assert daemon.proc.poll() is None


# -- systemd -------------------------------------------------------------------------------------


def test_notifier_is_a_no_op_without_a_socket():
    n = Notifier(None)
    assert not n and n.ready("x") is False and n.sent == []


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_datagrams(tmp_path, abstract):
    name = f"@pageload-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name[1:] if abstract else name)
        n = Notifier(name)
        assert n.ready("serving\non x") and n.status("50%") and n.stopping()
        got = [listener.recv(4096).decode() for _ in range(3)]
        n.close()
    assert got[0].split("\n") == ["READY=1", "STATUS=serving on x", f"MAINPID={os.getpid()}"]
    assert got[1] == "STATUS=50%"
    assert got[2].startswith("STOPPING=1\n")


def test_notifier_failure_does_not_raise(tmp_path, caplog):
    n = Notifier(str(tmp_path / "nobody-listens"))
    assert n.ready("x") is False and n.status("y") is False
    n.close()
    assert sum("sd_notify" in r.getMessage() for r in caplog.records) == 1


def test_listen_fds_follows_sd_listen_fds(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == [] and "LISTEN_FDS" not in os.environ  # not for us, and unset
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "x")
    with pytest.raises(ActivationError, match="not a number"):
        listen_fds()
    assert listen_fds() == []  # nothing set


def test_activated_socket_checks_what_it_is_given(tmp_path):
    with pytest.raises(ActivationError, match="exactly one"):
        activated_socket([3, 4])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(tmp_path / "a"))
        with pytest.raises(ActivationError, match="not listening"):
            activated_socket([s.fileno()])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(ActivationError, match="not a Unix stream socket"):
            activated_socket([s.fileno()])
    with open(tmp_path / "f", "w") as f:
        with pytest.raises(ActivationError, match="not a socket"):
            activated_socket([f.fileno()])


def _recv_until(listener, want: str, timeout: float = 60.0) -> list[str]:
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([listener], [], [], 0.5)
        if r:
            got.append(listener.recv(4096).decode())
            if any(want in m for m in got):
                return got
    raise AssertionError(f"no {want!r} in {got}")


def test_daemon_notifies_systemd(tmp_path, image):
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(notify_path)
        env = {**os.environ, "NOTIFY_SOCKET": notify_path}
        sock = str(tmp_path / "s.sock")
        proc = subprocess.Popen([sys.executable, "-m", "cli", "restore", image, "--socket", sock, "--background",
                                 "--progress-interval", "0.05", "--aio", "sync"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert read_line(proc.stdout, 60).startswith(b"READY")
            got = _recv_until(listener, "READY=1")
            ready = next(m for m in got if "READY=1" in m).split("\n")
            assert f"MAINPID={proc.pid}" in ready
            assert any(f.startswith(f"STATUS=serving on {sock}; ") for f in ready)
            got = _recv_until(listener, "STATUS=loaded")  # progress, until the fill is done
            proc.send_signal(signal.SIGTERM)
            got = _recv_until(listener, "STOPPING=1")
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def _activated(image, listener: socket.socket, *args: str, env: dict | None = None) -> subprocess.Popen:
    """The daemon as systemd starts it: the socket as fd 3, LISTEN_PID its own pid."""
    fd = listener.fileno()
    script = (f"import os, sys; os.dup2({fd}, 3); os.close({fd}); os.environ['LISTEN_PID'] = str(os.getpid()); "
              "os.environ['LISTEN_FDS'] = '1'; os.execv(sys.executable, [sys.executable, '-m', 'cli', 'restore', "
              "*sys.argv[1:]])")
    return subprocess.Popen([sys.executable, "-c", script, image, *args], cwd=ROOT,
                            env=env or dict(os.environ), pass_fds=(fd,), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_socket_activation_serves_on_fd_3_and_leaves_the_socket_file(tmp_path, image):
    path = str(tmp_path / "activated.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(16)
        proc = _activated(image, listener, "--background", "-q")
        try:
            line = read_line(proc.stdout, 60)
            assert line.decode().startswith(f"READY socket={path} pid={proc.pid}"), line
            out = subprocess.run([sys.executable, "-m", "cli", "wait", "--socket", path, "1M", "4K"],
                                 cwd=ROOT, capture_output=True, timeout=60)
            assert out.returncode == 0, out.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            proc.stdout.close()
            proc.stderr.close()
        assert os.path.exists(path)  # systemd's socket, not ours to remove
        # the socket lives on in its owner: a second activation serves on it again
        proc = _activated(image, listener, "-q")
        try:
            assert read_line(proc.stdout, 60).startswith(b"READY")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            proc.stdout.close()
            proc.stderr.close()


def test_socket_activation_misuse_is_one_line_exit_2(tmp_path, image):
    path = str(tmp_path / "a.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        proc = _activated(image, listener, "--socket", str(tmp_path / "other.sock"))
        _, err = proc.communicate(timeout=60)
        proc.stdout.close()
        assert proc.returncode == 2 and err.decode().count("\n") == 1 and b"choose one" in err
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as not_listening:
        proc = _activated(image, not_listening)
        _, err = proc.communicate(timeout=60)
        proc.stdout.close()
        assert proc.returncode == 2 and b"not listening" in err and err.count(b"\n") == 1
    proc = subprocess.run([sys.executable, "-m", "cli", "restore", image], cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == 2 and b"needs --socket" in proc.stderr and proc.stderr.count(b"\n") == 1


def test_example_units_exist_and_agree():
    units = pathlib.Path(ROOT, "examples", "systemd")
    service = (units / "pageload-restore.service").read_text()
    sock = (units / "pageload-restore.socket").read_text()
    exec_start = next(ln for ln in service.splitlines() if ln.startswith("ExecStart="))
    assert "Type=notify" in service and "--socket" not in exec_start and "--background" in exec_start
    assert "ListenStream=" in sock and "Accept=no" in sock


# -- stats --watch --------------------------------------------------------------------------------


def test_watch_line():
    from cli._client import watch_line

    stats = {"total_bytes": 100 * MiB, "loaded_bytes": 25 * MiB, "failed_bytes": 0, "waiters_blocked": 3,
             "done": False, "elapsed_s": 1.0}
    line = watch_line(stats, 50e6, bar_width=20)
    assert line.startswith("[" + "#" * 5 + "-" * 15 + "]  25.0%")
    assert "50.0 MB/s" in line and "blocked 3" in line
    assert re.search(r"ETA 1\.6 s$", line)  # 75 MiB at 50 MB/s
    assert watch_line(stats, 0.0).endswith("ETA ?")
    done = watch_line({**stats, "loaded_bytes": 100 * MiB, "done": True, "elapsed_s": 2.5}, 40e6)
    assert "100.0%" in done and done.endswith("done in 2.50 s")


def _slow_daemon(tmp_path, image):
    # one 64 KiB read at a time, so the fill takes a second or two
    return DaemonProcess(image, str(tmp_path / "w.sock"), str(tmp_path / "w.log"),
                         ["--background", "--aio", "sync", "--sweep-read-size", "64K", "--background-reads", "1",
                          "--queue-depth", "2", "-q"])


def test_watch_prints_plain_lines_when_not_on_a_terminal(tmp_path, image):
    with _slow_daemon(tmp_path, image) as daemon:
        out = subprocess.run([sys.executable, "-m", "cli", "stats", "--socket", daemon.socket_path, "--watch",
                              "--interval", "0.05"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stdout and "\x1b" not in out.stdout
    lines = out.stdout.splitlines()
    assert all(ln.startswith("[") and "MB/s" in ln and "blocked" in ln for ln in lines)
    assert "done in" in lines[-1] and "100.0%" in lines[-1]


def test_watch_redraws_one_line_on_a_terminal(tmp_path, image):
    with _slow_daemon(tmp_path, image) as daemon:
        master, slave = pty.openpty()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "cli", "stats", "--socket", daemon.socket_path,
                                     "--watch", "--interval", "0.05"], cwd=ROOT, stdout=slave,
                                    stderr=subprocess.PIPE)
            os.close(slave)
            data = b""
            while True:
                r, _, _ = select.select([master], [], [], 60)
                if not r:
                    break
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                data += chunk
            assert proc.wait(60) == 0, proc.stderr.read()
            proc.stderr.close()
        finally:
            os.close(master)
    text = data.decode()
    assert text.count("\r") >= 1 and "\x1b[K" in text
    assert text.rstrip("\r\n").count("\n") == 0  # one line, redrawn
    assert "done in" in text.rstrip("\r\n").rsplit("\r", 1)[-1]


def test_watch_without_a_daemon_fails_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cli", "stats", "--socket", str(tmp_path / "none"), "--watch"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cannot reach the daemon" in out.stderr


# -- bench section latency ------------------------------------------------------------------------


def test_quick_latency_section_end_to_end(tmp_path):
    import json

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "cli", "bench", "--quick", "--size", "32M", "--sections", "latency",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    section = json.loads(out.read_text())["sections"]["latency"]
    assert "error" not in section, section
    lim, loaded = section["limits"], section["loaded"]
    assert 0 < lim["rtt_us"]["p50"] <= lim["rtt_us"]["p99"]
    assert lim["protocol"]["server_us_per_wait"] > 0 and lim["protocol_waits_per_s"] > 0
    one = loaded["one_at_a_time_us"]
    assert one["count"] == 2000 and 0 < one["p50"] <= one["p99"]
    assert loaded["ratio_p50_to_rtt"] == pytest.approx(one["p50"] / lim["rtt_us"]["p50"])
    assert set(loaded["pipelined_waits_per_s"]) == {"64", "1024"}
    assert all(r > 0 for r in loaded["pipelined_waits_per_s"].values())
    assert loaded["daemon_rate_waits_per_s"] > 0
    goals = {g["name"]: g for g in section["goals"]}
    assert {"fill / cp, no clients", "loaded-page wait p50 / socket round trip p50",
            "pipelined waits/s, the daemon's rate", "4 KiB wait on unloaded page, p50",
            "4 KiB wait on unloaded page, p99", "the same, with the loaded map"} == set(goals)
    assert loaded["with_map_us"]["count"] == 2000
    for name, g in goals.items():
        assert isinstance(g["met"], bool) and name in proc.stdout


async def test_the_metrics_socket_listens_as_soon_as_its_file_exists(tmp_path):
    """A scraper connecting the moment the socket file appears is served, never
    refused: bind and listen happen with no checkpoint between them (the test that
    waited for the file then connected failed with ECONNREFUSED under load)."""
    from loader.daemon._metrics import MetricsServer

    path = str(tmp_path / "metrics.sock")
    server = MetricsServer(MetricsAddress(path=path), None)  # type: ignore[arg-type]  # (no request is sent)
    outcome: list[str] = []

    async def connect_at_once() -> None:
        while not os.path.exists(path):
            await trio.sleep(0)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
                outcome.append("connected")
            except OSError as exc:
                outcome.append(f"refused: {exc}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(connect_at_once)
        await trio.sleep(0)
        await server.bind()
    assert outcome == ["connected"]
    server._listener.close()
