"""The load generator: N client processes replay a fault trace against a running daemon.

:func:`run_loadgen` splits the trace among ``clients`` worker **processes** (the
``forkserver`` start method: workers fork from a clean server process that never
ran trio), each with its own blocking :class:`~loader.Client` and a
read-only mapping of the daemon's memory file (``_loadgen_client.py``: the replay,
open or closed loop, scaled to ``rate`` faults/s in total when given, and the check
of each waited range's bytes against the checkpoint).

This module is the coordinator: it starts the workers, tells them to connect, starts
them together and collects their results; ``_loadgen_report.py`` merges them into a
:class:`LoadgenReport`.  Workers publish their progress through a shared counter
array, which the parent turns into calls of ``progress(done, total, elapsed_s)``
about five times a second.

Whether a wait found its range already loaded is not in the Wait reply, so it is
taken from the daemon's ``waits_immediate`` statistic, read before and after the
run: the delta counts every client of that daemon, not only ours.

Clock: ``time.perf_counter_ns`` is ``CLOCK_MONOTONIC`` on Linux, one clock for every
process, so the parent's start time is meaningful in the workers.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import time
from array import array
from collections.abc import Callable
from typing import Any

from loader import Client, ClientError
from loader.checkpoint import open_checkpoint

from ._loadgen_client import VERIFY_CHUNK, client_main
from ._loadgen_report import LoadgenReport, Mismatch, merge
from ._traces import Trace

__all__ = [
    "VERIFY_CHUNK",
    "LoadgenError",
    "LoadgenReport",
    "Mismatch",
    "run_loadgen",
    "scale_to_rate",
]

#: the parent's start time is this far in the future when it is announced (plus a bit a client)
START_LEAD_NS = 10_000_000
START_LEAD_PER_CLIENT_NS = 500_000
#: how often the parent calls ``progress``
PROGRESS_INTERVAL_S = 0.2
WORKERS_START_TIMEOUT_S = 120.0

ProgressFn = Callable[[int, int, float], None]


class LoadgenError(Exception):
    """The run could not be made (a worker failed to start or died); one-line message."""


def scale_to_rate(trace: Trace, rate: float) -> Trace:
    """A copy of ``trace`` whose timestamps run at ``rate`` faults/s overall.

    Intervals keep their proportions; a trace whose faults all share one timestamp
    gets evenly spaced ones.  ``ValueError`` if ``rate`` is not positive.
    """
    if not rate > 0:
        raise ValueError(f"rate must be positive, not {rate}")
    n = len(trace)
    t = trace.t_us
    duration = t[-1] - t[0] if n else 0
    if duration > 0:
        factor = (n - 1) / rate * 1e6 / duration
        t0 = t[0]
        scaled = array("Q", (round((x - t0) * factor) for x in t))
    else:
        step = 1e6 / rate
        scaled = array("Q", (round(i * step) for i in range(n)))
    return Trace(
        scaled,
        array("Q", trace.offset),
        array("Q", trace.length),
        page_size=trace.page_size,
        memory_size=trace.memory_size,
        source=trace.source,
    )


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["workloads._loadgen_client"])
    return ctx


def _daemon_counts(stats: dict[str, Any]) -> tuple[int, int]:
    return int(stats.get("waits_immediate", 0)), int(stats.get("waits_served", 0))


def run_loadgen(
    socket_path: str,
    trace: Trace,
    *,
    clients: int,
    rate: float | None = None,
    closed_loop: bool = False,
    image: str | None = None,
    verify: bool = True,
    progress: ProgressFn | None = None,
    wait_for_daemon: Callable[[], None] | None = None,
    start_timeout: float = 60.0,
    loaded_map: bool = False,
) -> LoadgenReport:
    """Replay ``trace`` against the daemon at ``socket_path`` from ``clients`` processes.

    The trace is split round-robin (``trace.split(clients)``).  ``rate`` rescales the
    timestamps to that many faults/s in total; ``closed_loop`` ignores them.  With
    ``verify`` the bytes are checked against ``image`` (default: the daemon's
    ``source`` statistic, a path the daemon was given, so relative to its own working
    directory).

    The worker processes are started first; then ``wait_for_daemon()`` is called,
    if given (the benchmark passes one that blocks until a daemon it just spawned
    says READY), so that process start-up is not counted against the daemon.  Then
    the workers connect, map the memory file and, once all have, start together.

    With ``loaded_map`` each client maps the daemon's loaded map first
    (:meth:`~loader.Client.load_map`): a wait for bytes it shows loaded returns at once
    and sends nothing; the report counts those as ``map_hits`` (the daemon never sees
    them, so its ``immediate`` count leaves them out).

    Raises ``OSError``/:class:`ClientError` when the daemon cannot be reached,
    :class:`~workloads.TraceError` when a fault runs past the daemon's memory
    size, ``ValueError`` for bad arguments (and ``CheckpointError`` for a bad
    image), :class:`LoadgenError` when a worker cannot start or dies, and whatever
    ``wait_for_daemon`` raises.  Errors and mismatches of waits do not raise: they
    are counted in the report (see :attr:`LoadgenReport.ok`).  Every worker is
    joined (or killed) before this returns or raises.
    """
    if clients < 1:
        raise ValueError(f"need at least one client, not {clients}")
    if closed_loop and rate is not None:
        raise ValueError("--rate and --closed-loop exclude each other")
    if rate is not None:
        trace = scale_to_rate(trace, rate)
    parts = trace.split(clients)
    with _Workers(socket_path, parts, closed_loop, loaded_map) as workers:
        if wait_for_daemon is not None:
            wait_for_daemon()
        with Client.connect(socket_path) as control:
            memory_size = control.memory_size
            trace.check_fits(memory_size)
            before = control.stats()
            if verify and image is None:
                image = str(before.get("source") or "")
                if not image:
                    raise ValueError("the daemon does not say its source; give the image with --image")
            if verify:
                assert image is not None
                ckpt = open_checkpoint(image)
                if ckpt.layout.memory_size != memory_size:
                    raise ValueError(
                        f"{image}: memory size {ckpt.layout.memory_size} is not the "
                        f"daemon's {memory_size}: not the checkpoint it restores"
                    )
            result = workers.run(image if verify else None, progress, start_timeout)
            try:  # the daemon may have died under the load: keep what the workers measured
                after = control.stats()
            except (OSError, ClientError):
                after = {}
    immediate, served = _daemon_counts(after)
    immediate0, served0 = _daemon_counts(before)
    return merge(
        result,
        clients=clients,
        closed_loop=closed_loop,
        rate=rate,
        verify=verify,
        immediate=immediate - immediate0 if "waits_immediate" in after else None,
        served=served - served0 if "waits_served" in after else None,
    )


class _Workers:
    """The worker processes of one run; leaving the ``with`` kills any still alive."""

    def __init__(self, socket_path: str, parts: list[Trace], closed_loop: bool, loaded_map: bool = False) -> None:
        ctx = _context()
        self.total = sum(len(p) for p in parts)
        self.done_counts = ctx.Array("Q", len(parts), lock=False)
        self.procs: list[Any] = []
        self.conns: list[multiprocessing.connection.Connection] = []
        try:
            for k, part in enumerate(parts):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(
                    target=client_main,
                    name=f"pageload-loadgen-{k}",
                    daemon=True,
                    args=(
                        k,
                        os.getcwd(),
                        socket_path,
                        part.t_us,
                        part.offset,
                        part.length,
                        closed_loop,
                        child_end,
                        self.done_counts,
                        loaded_map,
                    ),
                )
                proc.start()
                child_end.close()
                self.procs.append(proc)
                self.conns.append(parent_end)
            # every worker is up (a machine busy starting processes would skew the run)
            deadline = time.monotonic() + WORKERS_START_TIMEOUT_S
            for k, conn in enumerate(self.conns):
                kind, payload = _receive(conn, self.procs[k], k, deadline - time.monotonic())
                if kind != "alive":
                    raise LoadgenError(payload)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            proc.close()
        self.procs = []
        self.conns = []

    def run(self, image: str | None, progress: ProgressFn | None, start_timeout: float) -> dict[str, Any]:
        """Tell the workers to connect; start them together; collect their results."""
        procs, conns = self.procs, self.conns
        for conn in conns:
            conn.send(image)
        deadline = time.monotonic() + start_timeout
        for k, conn in enumerate(conns):
            kind, payload = _receive(conn, procs[k], k, deadline - time.monotonic())
            if kind != "ready":
                raise LoadgenError(payload)
        start_ns = time.perf_counter_ns() + START_LEAD_NS + START_LEAD_PER_CLIENT_NS * len(conns)
        for conn in conns:
            conn.send(start_ns)
        results: dict[int, dict[str, Any]] = {}
        index_of = {id(conn): k for k, conn in enumerate(conns)}
        pending = dict(enumerate(conns))
        last = 0.0
        while pending:
            ready = multiprocessing.connection.wait(list(pending.values()), PROGRESS_INTERVAL_S)
            for done in ready:
                k = index_of[id(done)]
                kind, payload = _receive(conns[k], procs[k], k, 0)
                if kind != "result":
                    raise LoadgenError(payload)
                results[k] = payload
                del pending[k]
            now = time.monotonic()
            if progress is not None and (now - last >= PROGRESS_INTERVAL_S or not pending):
                last = now
                elapsed = max(0, time.perf_counter_ns() - start_ns) / 1e9
                progress(sum(self.done_counts), self.total, elapsed)
            if not ready:
                for k in pending:
                    if not procs[k].is_alive() and not conns[k].poll():
                        raise LoadgenError(
                            f"client {k} died (exit code {procs[k].exitcode}) without sending its results"
                        )
        return {"start_ns": start_ns, "parts": [results[k] for k in range(len(conns))]}


def _receive(conn: multiprocessing.connection.Connection, proc: Any, k: int, timeout: float) -> tuple[str, Any]:
    try:
        if not conn.poll(max(0.0, timeout)):
            raise LoadgenError(f"client {k} did not start within the time allowed")
        return conn.recv()  # type: ignore[no-any-return]
    except (EOFError, OSError):
        proc.join(1)
        raise LoadgenError(f"client {k} died (exit code {proc.exitcode})") from None
