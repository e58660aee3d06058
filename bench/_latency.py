"""``pageload bench`` section ``latency``: a wait's cost against the socket's.

In one run, on the dense image (``threads`` backend, warm page cache):

* limits — a raw Unix-socket round trip to an echo process, one message at a
  time (p50/p99, a 32-byte message: a wait request is 29); the echo's pipelined
  message rate at each depth (the transport's ceiling, same client loop minus the
  protocol); and the protocol's ceiling: a ``ClientConnection`` and a
  ``ServerConnection`` in one process, timed per half (the server's: parse a Wait,
  encode its Loaded; the client's: encode, parse the reply): the Python work each
  end of this protocol must do per wait, with no I/O, no loader, no scheduling.
  The pipelined ratio is against the server's half;
* a wait on a **loaded** page, one at a time, from a blocking :class:`~loader.Client`
  against a fully loaded daemon: p50/p99, client-timed, and the ratio to the round
  trip (goal p50 <= 3x);
* the same with the shared loaded map (``Client.load_map``): no request at all;
* pipelined waits/s at depth 64 and 1024 on loaded pages (a raw socket and the
  sans-I/O :class:`protocol.ClientConnection`, replies refilled as they come), with
  the ratios to the server's protocol half and the echo: one Python client, whose
  own protocol half (encode, parse) bounds it;
* the daemon's own rate (goal >= 100k waits/s): :func:`daemon_rate`, 8 connections
  each keeping 64 waits on loaded pages in flight from threads that compare the
  reply bytes with the expected ``loaded`` replies instead of parsing them, so the
  clients cost little next to the daemon;
* 4 KiB waits on pages **not loaded yet**, during the fill
  (:class:`~bench._tools.WaitProber`): p50 <= 150 us, p99 <= 1 ms;
* the fill of the daemon above (no client) against ``cp`` to ``/dev/shm``: >= 0.9.  The
  cp is :func:`~bench._tools.cp_limit`'s: the median of three on the warmed image, after
  one cold cp that is reported beside it and used for no ratio.

Every figure is reported with the limit measured in the same run.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

import protocol
from loader import Client, ClientError
from workloads import DaemonProcess, DaemonStartError, percentiles

from ._daemon import Goal, at_least, at_most
from ._tools import BenchError, FillRun, cp_limit, echo_socket, fill_run, round_trips, warm_cache

__all__ = ["run_latency_section"]

PAGE = 4096
MESSAGE = 32  #: bytes of the echo's message (a Wait request encodes to 29)


def _echo_limits(workdir: str, rounds: int, depths: Sequence[int], pipelined: int) -> dict[str, Any]:
    """Round trip p50/p99 (us) and pipelined messages/s per depth, against an echo process."""
    with echo_socket(workdir) as sock:
        samples = round_trips(sock, rounds, MESSAGE)
        rates = {str(depth): _echo_pipelined(sock, depth, pipelined) for depth in depths}
    p = percentiles(samples)
    return {"rtt_us": {"p50": p["p50"], "p99": p["p99"], "count": p["count"]}, "pipelined_msgs_per_s": rates}


def _echo_pipelined(sock: socket.socket, depth: int, total: int) -> float:
    msg = b"x" * MESSAGE
    sent = done = 0
    pending_bytes = 0
    t0 = time.perf_counter()
    first = min(depth, total)
    sock.sendall(msg * first)
    sent = first
    while done < total:
        data = sock.recv(1 << 16)
        if not data:
            raise BenchError("the echo server went away")
        pending_bytes += len(data)
        n, pending_bytes = divmod(pending_bytes, MESSAGE)
        done += n
        more = min(n, total - sent)
        if more:
            sock.sendall(msg * more)
            sent += more
    return total / (time.perf_counter() - t0)


def _protocol_ceiling(total: int) -> dict[str, float]:
    """Waits/s through the sans-I/O protocol in one process, in batches of 64: the
    server's half (parse a Wait, encode its Loaded), the client's half (encode a
    Wait, parse its reply), and both."""
    client, server = protocol.ClientConnection(), protocol.ServerConnection()
    server.receive_data(client.send(protocol.Hello(1, protocol.SUPPORTED_VERSIONS, "pageload-bench")))
    hello = server.next_event()
    assert isinstance(hello, protocol.Hello)
    client.receive_data(server.send(protocol.HelloReply(1, protocol.negotiate(hello.versions) or 1, 1 << 30,
                                                        4096, True)))
    client.next_event()
    ids = iter(range(2, 1 << 62))
    done = 0
    client_ns = server_ns = 0
    clock = time.perf_counter_ns
    while done < total:
        n = min(64, total - done)
        t0 = clock()
        requests = b"".join(client.send(protocol.Wait(next(ids), 4096 * (i + 1), 4096)) for i in range(n))
        t1 = clock()
        server.receive_data(requests)
        out = []
        while isinstance(event := server.next_event(), protocol.Wait):
            out.append(server.send(protocol.Loaded(event.id)))
        replies = b"".join(out)
        t2 = clock()
        client.receive_data(replies)
        while client.next_event() is not protocol.NEED_DATA:
            done += 1
        t3 = clock()
        client_ns += (t1 - t0) + (t3 - t2)
        server_ns += t2 - t1
    return {"both_waits_per_s": total / (client_ns + server_ns) * 1e9,
            "server_waits_per_s": total / server_ns * 1e9, "client_waits_per_s": total / client_ns * 1e9,
            "server_us_per_wait": server_ns / total / 1e3, "client_us_per_wait": client_ns / total / 1e3}


def _loaded_daemon(image: str, workdir: str, timeout_s: float = 600) -> tuple[DaemonProcess, float]:
    """A daemon that has loaded everything, and its fill throughput (MB/s, no client waiting)."""
    daemon = DaemonProcess(image, os.path.join(workdir, "latency.sock"), os.path.join(workdir, "latency.log"),
                           ["--background", "-q", "--aio", "threads"])
    try:
        daemon.start()
    except DaemonStartError as exc:
        raise BenchError(str(exc)) from None
    try:
        with Client.connect(daemon.socket_path) as client:
            deadline = time.monotonic() + timeout_s
            while not (stats := client.stats())["done"]:
                if time.monotonic() > deadline:
                    raise BenchError(f"the fill did not finish in {timeout_s:.0f} s")
                time.sleep(0.05)
    except BaseException:
        daemon.stop()
        raise
    return daemon, stats["throughput_bps"] / 1e6


def _one_at_a_time(path: str, rounds: int, seed: int, use_map: bool = False) -> dict[str, float]:
    rng = random.Random(seed)
    samples = array("q")
    with Client.connect(path) as client:
        if use_map:
            client.load_map()
        pages = client.memory_size // client.page_size
        offsets = [rng.randrange(pages) * client.page_size for _ in range(rounds)]
        page = client.page_size
        wait, clock = client.wait, time.perf_counter_ns
        for _ in range(200):  # warm up
            wait(offsets[0], page)
        for off in offsets:
            t0 = clock()
            wait(off, page)
            samples.append(clock() - t0)
    return percentiles(samples)


def _pipelined(path: str, depth: int, total: int, seed: int) -> float:
    """Waits/s with ``depth`` in flight, refilled as replies arrive (one send per receive)."""
    rng = random.Random(seed)
    with Client.connect(path) as hello:  # for the geometry
        page, pages = hello.page_size, hello.memory_size // hello.page_size
    offsets = [rng.randrange(pages) * page for _ in range(4096)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        conn = protocol.ClientConnection()
        ids = iter(range(1, 1 << 62))

        def request(n: int) -> bytes:
            return b"".join(conn.send(protocol.Wait(next(ids), offsets[i % 4096], page)) for i in range(n))

        sock.sendall(conn.send(protocol.Hello(next(ids), protocol.SUPPORTED_VERSIONS, "pageload-bench")))
        if not _drain(sock, conn, 1):
            raise BenchError("the daemon did not answer hello")
        t0 = time.perf_counter()
        first = min(depth, total)
        sock.sendall(request(first))
        sent, done = first, 0
        while done < total:
            n = _drain(sock, conn, 0)
            done += n
            more = min(n, total - sent)
            if more:
                sock.sendall(request(more))
                sent += more
        return total / (time.perf_counter() - t0)


def _drain(sock: socket.socket, conn: protocol.ClientConnection, at_least: int) -> int:
    """Receive once (more while fewer than ``at_least``); the number of replies decoded."""
    n = 0
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise BenchError("the daemon closed the connection")
        conn.receive_data(data)
        while True:
            event = conn.next_event()
            if event is protocol.NEED_DATA:
                break
            if isinstance(event, protocol.ErrorReply):
                raise BenchError(f"a pipelined wait failed: {event.code}: {event.message}")
            n += 1
        if n >= max(at_least, 1):
            return n


def daemon_rate(path: str, *, connections: int = 8, depth: int = 64, seconds: float = 2.0) -> float:
    """Waits/s a daemon whose memory is fully loaded answers to ``connections``
    sockets, each keeping ``depth`` waits for loaded 4 KiB pages in flight (ids
    below 128: every reply is the same 15-byte ``loaded`` frame but its id, so the
    client compares bytes instead of parsing).  Raises BenchError on any other reply."""
    if not 0 < depth < 128:
        raise ValueError("depth must be 1-127 (one-byte ids)")
    with Client.connect(path) as client:
        size = client.memory_size
    pages = max(1, size // PAGE)
    counts = [0] * connections
    errors: list[str] = []
    until = time.perf_counter() + seconds

    def one(index: int) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                sock.sendall(msgpack.packb({"op": "hello", "id": 0, "v": [1]}))
                if b"hello" not in sock.recv(4096):
                    raise BenchError("no hello reply")
                burst = b"".join(msgpack.packb({"op": "wait", "id": i, "off": (index * 997 + i) % pages * PAGE,
                                                "len": PAGE}) for i in range(1, depth + 1))
                want = b"".join(msgpack.packb({"re": i, "ok": "loaded"}) for i in range(1, depth + 1))
                got = bytearray()
                while time.perf_counter() < until:
                    sock.sendall(burst)
                    del got[:]
                    while len(got) < len(want):
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise BenchError("the daemon closed the connection")
                        got += chunk
                    if got != want:
                        raise BenchError(f"unexpected replies: {bytes(got[:64])!r}")
                    counts[index] += depth
        except (OSError, BenchError) as exc:
            errors.append(str(exc))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise BenchError(f"daemon rate: {errors[0]}")
    return sum(counts) / elapsed


def run_latency_section(
    image: str,
    workdir: str,
    *,
    rounds: int = 5000,
    pipelined: int = 100_000,
    depths: Sequence[int] = (64, 1024),
    min_samples: int = 500,
    max_wait_runs: int = 4,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure everything listed in the module docstring; returns the section's JSON."""
    cpl = cp_limit(image)  # first: its cold cp sees the page cache as the section found it; it warms the image
    cp = cpl.warm_mb_s
    log(cpl.line())
    limits = _echo_limits(workdir, rounds, depths, pipelined)
    limits["protocol"] = _protocol_ceiling(pipelined)
    limits["protocol_waits_per_s"] = limits["protocol"]["server_waits_per_s"]
    rtt = limits["rtt_us"]
    log(f"limits: socket round trip p50 {rtt['p50']:.1f} us p99 {rtt['p99']:.1f} us; echo pipelined "
        + ", ".join(f"depth {d}: {r / 1e3:.0f}k msgs/s" for d, r in limits["pipelined_msgs_per_s"].items())
        + f"; protocol alone, server half {limits['protocol']['server_us_per_wait']:.1f} us/wait "
        f"({limits['protocol']['server_waits_per_s'] / 1e3:.0f}k/s), client half "
        f"{limits['protocol']['client_us_per_wait']:.1f} us/wait")

    warm_cache(image)
    daemon, fill = _loaded_daemon(image, workdir)
    log(f"fill with no client {fill:.0f} MB/s, warm cp to /dev/shm {cp:.0f} MB/s ({fill / cp:.2f}x)")
    try:
        loaded = _one_at_a_time(daemon.socket_path, rounds, seed=1)
        log(f"wait on a loaded page, one at a time: p50 {loaded['p50']:.1f} us, p99 {loaded['p99']:.1f} us "
            f"({loaded['p50'] / rtt['p50']:.2f}x the round trip)")
        mapped = _one_at_a_time(daemon.socket_path, rounds, seed=1, use_map=True)
        log(f"the same with the loaded map (Client.load_map): p50 {mapped['p50']:.2f} us, "
            f"p99 {mapped['p99']:.2f} us ({mapped['p50'] / rtt['p50']:.3f}x the round trip)")
        rates = {}
        for depth in depths:
            rates[str(depth)] = _pipelined(daemon.socket_path, depth, pipelined, seed=depth)
            log(f"pipelined waits, depth {depth}: {rates[str(depth)] / 1e3:.1f}k waits/s "
                f"({rates[str(depth)] / limits['protocol_waits_per_s']:.2f}x the server's protocol half, "
                f"{rates[str(depth)] / limits['pipelined_msgs_per_s'][str(depth)]:.3f}x the echo)")
        rate = daemon_rate(daemon.socket_path)
        log(f"the daemon's own rate, 8 connections x 64 in flight: {rate / 1e3:.1f}k waits/s "
            f"({rate / limits['protocol_waits_per_s']:.2f}x the server's protocol half)")
    except (OSError, ClientError) as exc:
        raise BenchError(f"lost the daemon: {exc}; {daemon.stderr_tail()}") from None
    finally:
        daemon.stop()

    wait_runs: list[FillRun] = []
    samples: list[int] = []
    while len(samples) < min_samples and len(wait_runs) < max_wait_runs:
        run = fill_run(image, workdir, ["--aio", "threads"], probe=True, seed=100 + len(wait_runs))
        wait_runs.append(run)
        samples.extend(run.samples_ns)
        p = percentiles(run.samples_ns)
        log(f"unloaded waits run {len(wait_runs)}: {p['count']} waits, p50 {p['p50']:.0f} us, "
            f"p99 {p['p99']:.0f} us; fill {run.throughput_mb_s:.0f} MB/s")
    unloaded = percentiles(samples)

    goals: list[Goal] = [
        at_least("fill / cp, no clients", fill / cp, 0.9, "",
                  f"one fill {fill:.0f} MB/s / warm cp to /dev/shm {cp:.0f} MB/s (median of "
                  f"{len(cpl.warm_runs_mb_s)}; cold {cpl.cold_mb_s:.0f} MB/s, not used)"),
        at_most("loaded-page wait p50 / socket round trip p50", loaded["p50"] / rtt["p50"], 3, "x",
                 f"{loaded['p50']:.1f} us / {rtt['p50']:.1f} us, {loaded['count']} waits one at a time"),
        at_most("the same, with the loaded map", mapped["p50"] / rtt["p50"], 3, "x",
                 f"{mapped['p50']:.2f} us / {rtt['p50']:.1f} us: no request sent"),
        at_least("pipelined waits/s, the daemon's rate", rate / 1e3, 100, "k/s",
                  "8 connections x 64 in flight, replies compared as bytes; "
                  f"{rate / limits['protocol_waits_per_s']:.2f}x the server's protocol half "
                  f"({limits['protocol_waits_per_s'] / 1e3:.0f}k/s)"),
        at_most("4 KiB wait on unloaded page, p50", unloaded["p50"] if unloaded["count"] else None, 150, "us",
                 f"client-timed during the fill, {unloaded['count']} waits; "
                 f"{unloaded['p50'] / rtt['p50']:.1f}x the round trip"),
        at_most("4 KiB wait on unloaded page, p99", unloaded["p99"] / 1000 if unloaded["count"] else None, 1,
                 "ms", f"client-timed during the fill, {len(wait_runs)} fills"),
    ]
    return {
        "image": {"path": image, "size_bytes": os.path.getsize(image), "kind": "raw, dense random"},
        "backend": "threads",
        "cache": "warm",
        "limits": {**limits, "cp_mb_s": cp, "cp": cpl.as_dict()},
        "fill_mb_s": fill,
        "loaded": {
            "one_at_a_time_us": loaded,
            "ratio_p50_to_rtt": loaded["p50"] / rtt["p50"],
            "ratio_p99_to_rtt": loaded["p99"] / rtt["p99"],
            "with_map_us": mapped,
            "with_map_ratio_p50_to_rtt": mapped["p50"] / rtt["p50"],
            "pipelined_waits_per_s": rates,
            "daemon_rate_waits_per_s": rate,
            "pipelined_ratio_to_echo": {d: rates[d] / limits["pipelined_msgs_per_s"][d] for d in rates},
            "pipelined_ratio_to_protocol": {d: rates[d] / limits["protocol_waits_per_s"] for d in rates},
        },
        "unloaded": {
            "client_us": unloaded,
            "ratio_p50_to_rtt": unloaded["p50"] / rtt["p50"] if unloaded["count"] else None,
            "runs": [{**r.as_dict(), "client_us": percentiles(r.samples_ns)} for r in wait_runs],
        },
        "goals": [g.as_dict() for g in goals],
    }
