"""``--metrics ADDR``: the daemon's statistics in the Prometheus text format.

The exposition is ``prometheus_client``'s (:func:`prometheus_client.generate_latest`
over a registry holding one custom collector), never written by hand.  The
collector reads one statistics snapshot (``Server.stats_dict()``) per scrape, so a
scrape costs the hot paths nothing between scrapes.

It is served from the daemon's own trio loop, not from a thread: the snapshot is
taken where the statistics change, so it is consistent, and TCP and Unix-socket
addresses share one tiny HTTP/1.0 responder.  The responder is bounded, and idle or
slow peers cannot lock a scraper out: every connection is accepted at once; at most
``MAX_CONNECTIONS`` are open, and one more closes the oldest (the oldest still sending
its request first); a request head of at most ``MAX_REQUEST_BYTES`` must come within
``REQUEST_TIMEOUT_S``, the response must be taken within ``RESPONSE_TIMEOUT_S``; one
request per connection.  Only ``GET``/``HEAD`` of ``/metrics`` (or ``/``) get the
metrics, other paths 404, other methods 405, anything unparsable 400.
"""

from __future__ import annotations

import logging
import os
import socket as stdsocket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:  # prometheus_client is imported where it is used: only with --metrics
    # (it and the http.server and ssl it imports were about 45 ms of every daemon's start-up)
    from prometheus_client.core import (
        CollectorRegistry,
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )

from .._sockets import clear_stale_socket, remove_socket_file
from .._startup import StartupError
from ..core._stats import HISTOGRAM_BUCKETS

log = logging.getLogger("pageload.metrics")

MAX_CONNECTIONS = 16
MAX_REQUEST_BYTES = 8192
#: a scraper sends its request as it connects: a peer silent this long is closed
REQUEST_TIMEOUT_S = 1.0
RESPONSE_TIMEOUT_S = 5.0

#: busy-poll outcomes and their server statistics
_BUSY_POLL_KEYS = {"hit": "busy_poll_hits", "miss": "busy_poll_misses", "yield": "busy_poll_yields"}
#: wait outcomes, as the statistics name them: (label, stats key)
WAIT_OUTCOMES = (
    ("immediate", "waits_immediate"),
    ("served", "waits_served"),
    ("failed", "waits_failed"),
    ("cancelled", "waits_cancelled"),
)


class MetricsError(StartupError):
    """A bad ``--metrics`` address, or one that cannot be served: a start-up failure (one line, exit 2)."""


@dataclass(frozen=True, slots=True)
class MetricsAddress:
    """Where to serve: ``host:port`` (TCP) or a filesystem path (Unix socket)."""

    host: str | None = None
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_metrics_address(text: str) -> MetricsAddress:
    """``127.0.0.1:9464``, ``[::1]:9464``, ``:9464`` (all interfaces) or a Unix path
    (anything containing ``/``).  :class:`MetricsError` otherwise."""
    if not text:
        raise MetricsError("--metrics: empty address")
    if "/" in text:
        return MetricsAddress(path=text)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise MetricsError(f"--metrics {text!r}: expected HOST:PORT or a Unix socket path (with a '/')")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise MetricsError(f"--metrics {text!r}: port {port_text!r} is not a number from 0 to 65535")
    return MetricsAddress(host=host or "0.0.0.0", port=port)


class StatsCollector:
    """Turns one ``stats`` snapshot (the dict ``pageload stats --json`` prints) into
    metric families.  ``snapshot`` is called once per scrape.  A
    ``prometheus_client`` collector: registries need only :meth:`collect`."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.snapshot()
        yield _gauge("pageload_memory_bytes", "Size of the restored memory", s["memory_size"])
        yield _gauge("pageload_data_bytes", "Bytes of data to load (holes excluded)", s["total_bytes"])
        yield _gauge("pageload_loaded_bytes", "Bytes of data loaded so far", s["loaded_bytes"])
        yield _gauge("pageload_failed_bytes", "Bytes that failed to load", s["failed_bytes"])
        yield _gauge("pageload_done", "1 once nothing is left to load (failed ranges included)", int(s["done"]))
        yield _gauge("pageload_elapsed_seconds", "Time since the loader started", s["elapsed_s"])
        yield _gauge("pageload_fill_throughput_bytes_per_second",
                     "Bytes loaded / time since the loader started (until the last byte)", s["throughput_bps"])
        yield _gauge("pageload_reads_in_flight", "Reads of the checkpoint in flight", s["reads_in_flight"])
        yield _counter("pageload_reads", "Reads of the checkpoint issued", s["reads_total"])
        yield _counter("pageload_reads_retried", "Failed reads retried in halves", s["reads_retried"])
        yield _gauge("pageload_failed_ranges", "Failed ranges (the statistics list at most 64)",
                     len(s["failed_ranges"]))
        optional = (  # kept by newer loaders; emitted when the statistics have them
            (_gauge, "pageload_background_reads_in_flight", "Of the reads in flight, prefetch and sweep reads",
             "background_reads_in_flight"),
            (_counter, "pageload_reads_copied", "Of the reads, those copied file to file in the kernel (splice)",
             "reads_copied"),
            (_counter, "pageload_reads_timed_out", "Reads failed with timeout after --read-timeout",
             "reads_timed_out"),
            (_gauge, "pageload_reads_stuck", "Timed-out reads the backend has not returned yet", "reads_stuck"),
            (_counter, "pageload_chunks_verified", "Chunks checked against the checkpoint's checksums",
             "chunks_verified"),
            (_counter, "pageload_corrupt_chunks", "Chunks whose checksum did not match", "corrupt_chunks"),
            (_gauge, "pageload_scanned_bytes", "Memory whose holes are known (memory_bytes once data_bytes is exact)",
             "scanned_bytes"),
        )
        for make, name, doc, key in optional:
            if key in s:
                yield make(name, doc, s[key])
        waits = CounterMetricFamily("pageload_waits", "Waits by outcome", labels=["outcome"])
        for label, key in WAIT_OUTCOMES:
            waits.add_metric([label], s[key])
        yield waits
        yield _gauge("pageload_waiters_blocked", "Waits blocked right now", s["waiters_blocked"])
        yield _counter("pageload_waited_bytes", "Bytes that waits had to wait for", s["bytes_waited"])
        yield _counter("pageload_blocked_seconds",
                       "Time during which at least one waiter was blocked", s["blocked_time_s"])
        yield _counter("pageload_wait_seconds", "Sum over waits of the time each was blocked",
                       s["total_wait_time_s"])
        yield _counter("pageload_prefetches", "Prefetch requests", s["prefetches"])
        yield _latency(s.get("latency_us") or {})
        server = s.get("server") or {}
        if server:
            yield _gauge("pageload_clients_connected", "Clients connected now", server["connections"])
            yield _counter("pageload_connections", "Client connections accepted", server["connections_total"])
            yield _counter("pageload_connections_refused", "Connections refused (uid not allowed)",
                           server["connections_refused"])
            if "busy_poll_hits" in server:
                polls = CounterMetricFamily("pageload_busy_polls", "Polls of a lone client's socket after its "
                                            "replies, by how they ended", labels=["outcome"])
                for label in ("hit", "miss", "yield"):
                    polls.add_metric([label], server[_BUSY_POLL_KEYS[label]])
                yield polls
        ws = s.get("working_set")
        if isinstance(ws, dict) and "hits" in ws:  # once the working-set statistics exist
            yield _counter("pageload_working_set_hits", "Waits that hit the recorded working set", ws["hits"])
        process = s.get("process") or {}
        if "vmrss_bytes" in process:
            yield _gauge("pageload_process_resident_bytes", "Daemon RSS (the memory file's pages included)",
                         process["vmrss_bytes"])
            outside = process.get("rssanon_bytes", 0) + process.get("rssfile_bytes", 0)
            yield _gauge("pageload_process_resident_outside_memory_bytes",
                         "Daemon RSS outside the memory file (anon + file)", outside)
        yield from _uffd_metrics(s.get("uffd"), s.get("uffd_minor"))
        yield from _remote_metrics(s.get("remote"))
        info = GaugeMetricFamily("pageload_info", "The daemon's backend and source",
                                 labels=["backend", "source"])
        info.add_metric([str(s.get("backend", "")), str(s.get("source", ""))], 1)
        yield info


#: userfaultfd fault kinds, as the statistics name them: (label, key), per mode
UFFD_FAULTS = (("copied", "faults_immediate"), ("direct", "faults_direct"), ("waited", "faults_waited"),
               ("zero", "faults_zero"), ("failed", "faults_failed"))
UFFD_MINOR_FAULTS = (("minor", "faults_minor"), ("waited", "faults_waited"), ("zero", "faults_zero"),
                     ("failed", "faults_failed"), ("stray", "faults_stray"))


def _uffd_metrics(handler: dict[str, Any] | None, minor: dict[str, Any] | None) -> Iterator[Metric]:
    """Page faults served through userfaultfd: the Firecracker handler (``--uffd-socket``)
    while a VMM is connected, and the zero-copy ranges (``uffd-register``) once one was
    registered.  Their faults are counted in the waits too; these say how each was served."""
    if not handler and not minor:
        return
    from prometheus_client.core import CounterMetricFamily

    faults = CounterMetricFamily("pageload_uffd_faults", "Page faults served through userfaultfd, by mode and how",
                                 labels=["mode", "how"])
    latency: dict[str, Any] = {}
    if handler:
        for label, key in UFFD_FAULTS:
            faults.add_metric(["handler", label], handler.get(key, 0))
        latency = handler.get("fault_latency_us") or {}
        yield _counter("pageload_uffd_copied_bytes", "Bytes copied into guest memory (UFFDIO_COPY)",
                       handler.get("copied_bytes", 0))
        yield _gauge("pageload_uffd_filled", "1 once every data byte is in guest memory",
                     int(bool(handler.get("filled"))))
        yield _counter("pageload_uffd_spin_reads", "Reads of the userfaultfd that found faults while the fault "
                       "thread spun (read without a wake-up, --uffd-spin-us)", handler.get("spin_reads", 0))
    ranges = (minor or {}).get("ranges") or []
    if minor:
        for label, key in UFFD_MINOR_FAULTS:
            faults.add_metric(["zero-copy", label], sum(r.get(key, 0) for r in ranges))
        yield _gauge("pageload_uffd_zero_copy_ranges", "Zero-copy userfaultfd ranges registered now",
                     minor.get("registrations", 0))
        yield _counter("pageload_uffd_mapped_bytes", "Bytes mapped into VMMs ahead of their faults (UFFDIO_CONTINUE)",
                       sum(r.get("mapped_bytes", 0) for r in ranges))
    yield faults
    counts = [0] * HISTOGRAM_BUCKETS
    count, total_us = 0, 0.0
    for lat in [latency, *(r.get("fault_latency_us") or {} for r in ranges)]:
        for k, n in enumerate(lat.get("counts", [])[:HISTOGRAM_BUCKETS]):
            counts[k] += n
        count += lat.get("count", 0)
        total_us += lat.get("mean_us", 0.0) * lat.get("count", 0)
    yield _latency({"counts": counts, "count": count, "mean_us": total_us / count if count else 0.0},
                   "pageload_uffd_fault_latency_seconds", "Time from reading a fault to its answer, in the daemon")


#: a store error's codes (``loader.remote.CODES``; not imported: a local daemon never loads the store client)
STORE_CODES = ("not-found", "denied", "unreachable", "unavailable", "bad-url")


def _remote_metrics(remote: dict[str, Any] | None) -> Iterator[Metric]:
    """Fetching from object storage (a checkpoint in a store, docs/REMOTE.md): the
    store's requests, the chunks and where they came from, the host chunk cache (where
    there is one).  Absent for a local checkpoint."""
    if not remote:
        return
    from prometheus_client.core import CounterMetricFamily

    store = remote.get("store") or {}
    fetch = remote.get("fetch") or {}
    yield _counter("pageload_remote_gets", "GET requests sent to the store (each retry counted; the index's too)",
                   store.get("gets", 0))
    yield _counter("pageload_remote_fetched_bytes", "Bytes of GET responses taken from the store",
                   store.get("bytes_fetched", 0))
    yield _counter("pageload_remote_retries", "Store requests tried again (timeouts, 5xx, 429/503, resets)",
                   store.get("retries", 0))
    by_code = store.get("by_code") or {}
    failures = CounterMetricFamily("pageload_remote_failures", "Store requests that failed past their retries, "
                                   "by error code", labels=["code"])
    for code in (*STORE_CODES, *sorted(set(by_code) - set(STORE_CODES))):
        failures.add_metric([code], by_code.get(code, 0))
    yield failures
    chunks = CounterMetricFamily("pageload_remote_chunks", "Checksum chunks put into memory, by where they came "
                                 "from", labels=["source"])
    chunks.add_metric(["cache"], fetch.get("chunks_cached", 0))
    chunks.add_metric(["store"], fetch.get("chunks_fetched", 0))
    yield chunks
    yield _counter("pageload_remote_wrong_chunks", "Fetched chunks that did not match their checksum",
                   fetch.get("wrong_chunks", 0))
    cache = remote.get("cache")
    if cache:
        yield _counter("pageload_remote_cache_hits", "Chunk reads the host chunk cache answered (this daemon's)",
                       cache.get("hits", 0))
        yield _counter("pageload_remote_cache_misses", "Chunk reads the host chunk cache did not answer (this "
                       "daemon's)", cache.get("misses", 0))
        yield _gauge("pageload_remote_cache_bytes", "Bytes in the host chunk cache (all its daemons')",
                     cache.get("bytes", 0))
        yield _gauge("pageload_remote_cache_max_bytes", "The host chunk cache's bound (--cache-size)",
                     cache.get("max_bytes", 0))
    yield _latency(store.get("get_latency_us") or {}, "pageload_remote_get_latency_seconds",
                   "Time of each GET request to the store, from sending it to its body taken (or its failure)")


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, doc, value=value)


def _latency(lat: dict[str, Any], name: str = "pageload_wait_latency_seconds",
             doc: str = "Time from a wait's arrival to its answer, in the daemon") -> HistogramMetricFamily:
    """The stats' power-of-two buckets, as they are: bucket k holds [2**(k-1), 2**k) us,
    so ``le`` = 2**k us is exact; the last bucket (the overflow) is ``+Inf``.  The
    bucket list is fixed, whatever has been seen so far."""
    counts = list(lat.get("counts", []))
    counts += [0] * (HISTOGRAM_BUCKETS - len(counts))
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for k in range(HISTOGRAM_BUCKETS - 1):
        cumulative += counts[k]
        buckets.append((_le((1 << k) / 1e6), cumulative))
    buckets.append(("+Inf", cumulative + counts[HISTOGRAM_BUCKETS - 1]))
    count = lat.get("count", 0)
    total_s = lat.get("mean_us", 0.0) * count / 1e6
    from prometheus_client.core import HistogramMetricFamily

    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total_s)


def _le(seconds: float) -> str:
    return repr(seconds)


def make_registry(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    from prometheus_client.core import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(snapshot))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry)


class MetricsServer:
    """Serves ``registry`` over HTTP on ``address``.  :meth:`bind` at start-up (so a
    bad address is a start-up failure), then :meth:`serve` in a nursery."""

    def __init__(self, address: MetricsAddress, registry: CollectorRegistry) -> None:
        self.address = address
        self.registry = registry
        self._listener: trio.socket.SocketType | None = None
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file bound
        #: open connections, oldest first: their cancel scopes, and whether they are
        #: still reading the request (those are closed first to make room)
        self._open: dict[trio.socket.SocketType, tuple[trio.CancelScope, list[bool]]] = {}
        self.scrapes = 0
        self.evicted = 0  #: connections closed to make room for newer ones

    @property
    def bound(self) -> str:
        """The address actually bound (the port chosen for port 0)."""
        if self.address.path is not None:
            return self.address.path
        assert self._listener is not None
        host, port = self._listener.getsockname()[:2]
        return str(MetricsAddress(host=host, port=port))

    async def bind(self) -> None:
        a = self.address
        try:
            if a.path is not None:
                clear_stale_socket(a.path)  # the wait socket's rule: a live one is refused
                std = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
                sockaddr: Any = a.path
            else:
                infos = await trio.socket.getaddrinfo(a.host, a.port, type=stdsocket.SOCK_STREAM,
                                                      flags=stdsocket.AI_PASSIVE)
                if not infos:
                    raise MetricsError(f"--metrics {a}: the host does not resolve")
                family, type_, proto, _, sockaddr = infos[0]
                std = stdsocket.socket(family, type_, proto)
                std.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
            # bind and listen with nothing in between: a scraper connecting as soon as the
            # socket file appears is never refused, and the umask is ours only meanwhile
            old = os.umask(0o177)  # a Unix socket file is created mode 0600
            try:
                std.bind(sockaddr)
                if a.path is not None:
                    st = os.lstat(a.path)
                    self._inode = (st.st_dev, st.st_ino)
                std.listen(128)
            except BaseException:
                std.close()
                raise
            finally:
                os.umask(old)
            sock = trio.socket.from_stdlib_socket(std)
        except OSError as exc:
            raise MetricsError(f"--metrics {a}: {exc.strerror or exc}") from exc
        self._listener = sock

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._listener is None:
            await self.bind()
        listener = self._listener
        assert listener is not None
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    conn, _ = await listener.accept()
                    if len(self._open) >= MAX_CONNECTIONS:
                        self._evict()
                    scope = trio.CancelScope()
                    reading = [True]
                    self._open[conn] = (scope, reading)
                    nursery.start_soon(self._handle, conn, scope, reading)
        finally:
            self.close()

    def _evict(self) -> None:
        """Close the oldest connection still sending its request, else the oldest."""
        victim = next((c for c, (_, reading) in self._open.items() if reading[0]), None)
        if victim is None:
            victim = next(iter(self._open))
        scope, _ = self._open.pop(victim)
        scope.cancel()
        self.evicted += 1

    def close(self) -> None:
        """Stop listening and remove the socket file; idempotent."""
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        if self.address.path is not None and self._inode is not None:
            remove_socket_file(self.address.path, self._inode)  # only the file bound here
            self._inode = None

    async def _handle(self, conn: trio.socket.SocketType, scope: trio.CancelScope, reading: list[bool]) -> None:
        try:
            with conn, scope:
                head = b""
                with trio.move_on_after(REQUEST_TIMEOUT_S) as waited:
                    while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) <= MAX_REQUEST_BYTES:
                        chunk = await conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                reading[0] = False
                if waited.cancelled_caught and not head:
                    return  # it never said anything: nothing to answer
                response = self._respond(head)
                with trio.move_on_after(RESPONSE_TIMEOUT_S):
                    view = memoryview(response)
                    while view:
                        view = view[await conn.send(view):]
        except OSError:
            pass  # the scraper went away: nothing to answer
        finally:
            if self._open.get(conn, (None,))[0] is scope:
                del self._open[conn]

    def _respond(self, head: bytes) -> bytes:
        if len(head) > MAX_REQUEST_BYTES:
            return _response(431, b"request head too large\n")
        line = head.split(b"\n", 1)[0].strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response(400, b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET and HEAD\n", extra=b"Allow: GET, HEAD\r\n")
        path = target.split(b"?", 1)[0]
        if path not in (b"/metrics", b"/"):
            return _response(404, b"not found: try /metrics\n")
        try:
            body = render(self.registry)
        except Exception:  # a bug in a collector: answer, and say so in the log
            log.exception("metrics: collecting failed")
            return _response(500, b"collecting the metrics failed\n")
        self.scrapes += 1
        from prometheus_client import CONTENT_TYPE_LATEST

        return _response(200, body, CONTENT_TYPE_LATEST.encode(), head_only=method == b"HEAD")


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            431: b"Request Header Fields Too Large", 500: b"Internal Server Error"}


def _response(status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8", *,
              extra: bytes = b"", head_only: bool = False) -> bytes:
    return (b"HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
            % (status, _REASONS[status], content_type, len(body), extra)) + (b"" if head_only else body)
