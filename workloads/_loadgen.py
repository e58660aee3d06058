"""The load generator: N client processes replay a fault trace against a running daemon.

:func:`run_loadgen` splits the trace among ``clients`` worker **processes** (the
``forkserver`` start method: workers fork from a clean server process that never
ran trio), each with its own blocking :class:`~loader.Client` and a
read-only mapping of the daemon's memory file.  Each worker issues its faults as
``wait(offset, length)`` in order: open loop at the trace's timestamps (scaled to
``rate`` faults/s in total when given), or closed loop (the next wait as soon as the
previous one returns).  A worker blocked on a wait cannot issue its next fault,
like a vCPU; how late each fault was issued against its schedule is reported as
``late_us`` rather than folded into the wait latency.

After each wait the worker checks the range's bytes in the memory file against
the checkpoint (``image``): the expected bytes are read from the checkpoint's
pages file into one reused buffer (holes are zero) and compared with one
``memcmp`` (``bytearray == memoryview``) per chunk of at most
:data:`VERIFY_CHUNK` bytes, so no per-page object is ever made.

Each worker keeps two ``array('Q')`` columns (wait latency in ns, completion time
in ns since the common start) and sends them back once at the end; the parent
merges them and computes exact percentiles by sorting.  Workers publish their
progress through a shared counter array, which the parent turns into calls of
``progress(done, total, elapsed_s)`` about five times a second.

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
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loader import Client, ClientError, ConnectionLost, mapped_memory
from loader.checkpoint import open_checkpoint

from ._percentiles import percentiles
from ._traces import Trace

__all__ = [
    "VERIFY_CHUNK",
    "LoadgenError",
    "LoadgenReport",
    "Mismatch",
    "run_loadgen",
    "scale_to_rate",
]

#: largest span compared at once; the per-worker buffer never grows past it
VERIFY_CHUNK = 1 << 20
#: how many error messages and mismatches each worker sends back in full
SAMPLES_KEPT = 8
#: the parent's start time is this far in the future when it is announced (plus a bit a client)
START_LEAD_NS = 10_000_000
START_LEAD_PER_CLIENT_NS = 500_000
#: how often the parent calls ``progress``
PROGRESS_INTERVAL_S = 0.2

ProgressFn = Callable[[int, int, float], None]


class LoadgenError(Exception):
    """The run could not be made (a worker failed to start or died); one-line message."""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A waited-for range whose bytes in the memory file differ from the checkpoint's."""

    client: int
    offset: int  #: the fault's offset
    length: int
    first_bad: int  #: memory offset of the first differing byte
    expected: int  #: that byte in the checkpoint
    actual: int  #: that byte in the memory file

    def describe(self) -> str:
        return (
            f"client {self.client}: fault at {self.offset:#x}+{self.length:#x}: byte "
            f"{self.first_bad:#x} is {self.actual:#04x}, the checkpoint has {self.expected:#04x}"
        )


@dataclass(frozen=True, slots=True, eq=False)
class LoadgenReport:
    """What one run measured.  ``as_dict()`` is the ``--json`` document (no raw samples)."""

    clients: int
    closed_loop: bool
    rate: float | None  #: faults/s asked for in total (None: the trace's own timestamps)
    verify: bool
    #: waits the clients answered from the daemon's loaded map, sending nothing
    #: (``loaded_map``; 0 otherwise)
    map_hits: int
    waits: int  #: waits that returned (successfully or not)
    errors: int  #: waits answered with an error
    not_issued: int  #: faults never sent because the client lost its connection
    mismatches: int
    duration_s: float  #: common start to the last worker's end
    immediate: int | None  #: daemon's ``waits_immediate`` delta (every client of it)
    served: int | None  #: daemon's ``waits_served`` delta
    latency_us: dict[str, float]  #: p50, p90, p99, p999, max, mean
    late_us: dict[str, float]  #: open loop: issue time minus scheduled time (p50, p99, max)
    overhead_us_per_wait: float  #: generator time outside the wait round trip and sleeping
    verify_us_per_wait: float  #: of which spent checking bytes
    error_samples: tuple[str, ...]
    mismatch_samples: tuple[Mismatch, ...]
    start_ns: int  #: ``perf_counter_ns`` of the common start
    #: per wait, in no particular order across clients: latency and completion time (ns)
    latencies_ns: array[int] = field(repr=False)
    completed_ns: array[int] = field(repr=False)

    @property
    def waits_per_s(self) -> float:
        return self.waits / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def blocked_s(self) -> float:
        """Sum of the wait latencies: time clients spent blocked."""
        return sum(self.latencies_ns) / 1e9

    @property
    def ok(self) -> bool:
        return not (self.errors or self.mismatches or self.not_issued)

    def as_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "closed_loop": self.closed_loop,
            "rate": self.rate,
            "verify": self.verify,
            "map_hits": self.map_hits,
            "waits": self.waits,
            "errors": self.errors,
            "not_issued": self.not_issued,
            "mismatches": self.mismatches,
            "duration_s": self.duration_s,
            "waits_per_s": self.waits_per_s,
            "immediate": self.immediate,
            "served": self.served,
            "blocked_s": self.blocked_s,
            "latency_us": dict(self.latency_us),
            "late_us": dict(self.late_us),
            "overhead_us_per_wait": self.overhead_us_per_wait,
            "verify_us_per_wait": self.verify_us_per_wait,
            "error_samples": list(self.error_samples),
            "mismatch_samples": [m.describe() for m in self.mismatch_samples],
        }

    def summary(self) -> str:
        lat = self.latency_us
        line = (
            f"{self.waits} waits from {self.clients} clients in {self.duration_s:.2f} s "
            f"({self.waits_per_s:.0f}/s); latency us p50 {lat['p50']:.0f} p90 {lat['p90']:.0f} "
            f"p99 {lat['p99']:.0f} p99.9 {lat['p999']:.0f} max {lat['max']:.0f}; "
        )
        if self.map_hits:
            line += f"{self.map_hits} answered from the loaded map (no request); "
        if self.immediate is not None:
            line += f"{self.immediate} found loaded (daemon count); "
        line += (
            f"generator overhead {self.overhead_us_per_wait:.1f} us/wait "
            f"(verify {self.verify_us_per_wait:.1f}); {self.errors} errors, "
            f"{self.mismatches} mismatches"
        )
        if self.not_issued:
            line += f", {self.not_issued} faults not issued (connection lost)"
        return line


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


# -- the worker process ---------------------------------------------------------------------


class _Verifier:
    """Compares memory-file ranges with the checkpoint, through one reused buffer."""

    def __init__(self, image: str) -> None:
        ckpt = open_checkpoint(image)
        self.layout = ckpt.layout
        self.fd = ckpt.open_pages()
        self.buf = bytearray(self.layout.page_size)
        self.view = memoryview(self.buf)
        self.zeros = bytes(VERIFY_CHUNK)

    def close(self) -> None:
        self.view.release()
        os.close(self.fd)

    def _expected(self, lo: int, hi: int) -> bytearray:
        """The checkpoint's bytes [lo, hi) (hi - lo <= VERIFY_CHUNK), in the buffer.

        The buffer is kept at the size last asked for (faults mostly share one
        length), so that the comparison is ``bytearray == memoryview``: one memcmp.
        """
        n = hi - lo
        if len(self.buf) != n:
            self.view.release()
            self.buf = bytearray(n)
            self.view = memoryview(self.buf)
        view = self.view
        pos = lo
        layout = self.layout
        for a, b in layout.data_in(lo, hi):
            if a > pos:
                view[pos - lo : a - lo] = self.zeros[: a - pos]
            i = layout.find(a)
            file_off = layout.file[i] + (a - layout.mem[i])
            got = os.preadv(self.fd, [view[a - lo : b - lo]], file_off)
            if got != b - a:
                raise OSError(f"short read of the checkpoint at {file_off:#x}: {got} of {b - a} bytes")
            pos = b
        if pos < hi:
            view[pos - lo : n] = self.zeros[: hi - pos]
        return self.buf

    def check(self, memory: memoryview, offset: int, length: int) -> tuple[int, int, int] | None:
        """None if equal, else (memory offset, expected byte, actual byte) of the first
        difference."""
        lo, end = offset, offset + length
        while lo < end:
            hi = min(end, lo + VERIFY_CHUNK)
            expected = self._expected(lo, hi)
            actual = memory[lo:hi]
            if expected != actual:  # bytearray vs memoryview: one memcmp
                for k in range(hi - lo):
                    if expected[k] != actual[k]:
                        return lo + k, expected[k], actual[k]
            lo = hi
        return None


def _worker(
    index: int,
    cwd: str,
    socket_path: str,
    t_us: array[int],
    offset: array[int],
    length: array[int],
    closed_loop: bool,
    conn: multiprocessing.connection.Connection,
    done_counts: Any,
    loaded_map: bool = False,
) -> None:
    """One client: wait for the go (it carries the image path, or None: no checking),
    connect, map, report ready, wait for the start time, replay, send the results.

    Runs in the parent's working directory, so relative paths mean the same as there.
    The parent closing its end before the go means: stop quietly.
    """
    try:
        conn.send(("alive", None))  # started and imported: the parent may start the daemon now
        image = conn.recv()
    except (EOFError, BrokenPipeError):
        conn.close()
        return
    try:
        os.chdir(cwd)
        client = Client.connect(socket_path)
        if loaded_map:
            client.load_map()  # from now on a wait the map shows loaded sends nothing
    except (OSError, ClientError) as exc:
        conn.send(("error", f"client {index}: cannot connect to {socket_path}: {exc}"))
        conn.close()
        return
    verifier = None
    try:
        with client, mapped_memory(client) as memory:
            verifier = _Verifier(image) if image is not None else None
            conn.send(("ready", None))
            start_ns = conn.recv()
            result = _replay(
                index,
                client,
                memory,
                verifier,
                t_us,
                offset,
                length,
                closed_loop,
                start_ns,
                done_counts,
            )
        conn.send(("result", result))
    except BaseException as exc:  # the parent must hear about any failure, in one line
        detail = "".join(traceback.format_exception_only(exc)).strip()
        try:
            conn.send(("error", f"client {index}: {detail}"))
        except OSError:
            pass
    finally:
        if verifier is not None:
            verifier.close()
        conn.close()


def _replay(
    index: int,
    client: Client,
    memory: memoryview,
    verifier: _Verifier | None,
    t_us: array[int],
    offset: array[int],
    length: array[int],
    closed_loop: bool,
    start_ns: int,
    done_counts: Any,
) -> dict[str, Any]:
    clock = time.perf_counter_ns
    n = len(offset)
    latencies = array("Q", bytes(8 * n))
    completed = array("Q", bytes(8 * n))
    late = array("Q")
    errors = 0
    error_samples: list[str] = []
    mismatches: list[tuple[int, int, int, int, int]] = []
    mismatch_count = 0
    verify_ns = 0
    sleep_ns = 0
    issued = 0
    lost = False
    now = clock()
    if now < start_ns:
        time.sleep((start_ns - now) / 1e9)
    began = clock()
    for i in range(n):
        if not closed_loop:
            due = start_ns + t_us[i] * 1000
            now = clock()
            if now < due:
                time.sleep((due - now) / 1e9)
                after = clock()
                sleep_ns += after - now
                now = after
            late.append(now - due if now > due else 0)
        off = offset[i]
        ln = length[i]
        t0 = clock()
        try:
            client.wait(off, ln)
            failed = False
        except ClientError as exc:
            failed = True
            errors += 1
            if len(error_samples) < SAMPLES_KEPT:
                error_samples.append(f"client {index}: fault {i} at {off:#x}+{ln:#x}: {exc}")
            if isinstance(exc, ConnectionLost):
                lost = True
        except OSError as exc:
            failed = lost = True
            errors += 1
            if len(error_samples) < SAMPLES_KEPT:
                error_samples.append(f"client {index}: fault {i}: connection lost: {exc}")
        t1 = clock()
        latencies[i] = t1 - t0
        completed[i] = t1 - start_ns
        issued = i + 1
        done_counts[index] = issued
        if lost:
            break
        if verifier is not None and not failed:
            bad = verifier.check(memory, off, ln)
            if bad is not None:
                mismatch_count += 1
                if len(mismatches) < SAMPLES_KEPT:
                    mismatches.append((off, ln, *bad))
            verify_ns += clock() - t1
    ended = clock()
    del latencies[issued:]
    del completed[issued:]
    wait_ns = sum(latencies)
    return {
        "latencies": latencies,
        "completed": completed,
        "late": late,
        "errors": errors,
        "error_samples": error_samples,
        "not_issued": n - issued,
        "mismatches": mismatch_count,
        "mismatch_samples": mismatches,
        "overhead_ns": (ended - began) - wait_ns - sleep_ns,
        "verify_ns": verify_ns,
        "end_ns": ended,
        "map_hits": client.map_hits,
    }


# -- the parent -----------------------------------------------------------------------------


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["workloads._loadgen"])
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
    return _merge(
        result,
        clients=clients,
        closed_loop=closed_loop,
        rate=rate,
        verify=verify,
        immediate=immediate - immediate0 if "waits_immediate" in after else None,
        served=served - served0 if "waits_served" in after else None,
    )


WORKERS_START_TIMEOUT_S = 120.0


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
                    target=_worker,
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


def _merge(
    result: dict[str, Any],
    *,
    clients: int,
    closed_loop: bool,
    rate: float | None,
    verify: bool,
    immediate: int | None,
    served: int | None,
) -> LoadgenReport:
    parts = result["parts"]
    start_ns = result["start_ns"]
    latencies = array("Q")
    completed = array("Q")
    late = array("Q")
    errors = not_issued = mismatches = map_hits = 0
    overhead_ns = verify_ns = 0
    error_samples: list[str] = []
    mismatch_samples: list[Mismatch] = []
    end_ns = start_ns
    for k, part in enumerate(parts):
        latencies.extend(part["latencies"])
        completed.extend(part["completed"])
        late.extend(part["late"])
        errors += part["errors"]
        not_issued += part["not_issued"]
        mismatches += part["mismatches"]
        map_hits += part["map_hits"]
        overhead_ns += part["overhead_ns"]
        verify_ns += part["verify_ns"]
        error_samples.extend(part["error_samples"])
        mismatch_samples.extend(Mismatch(k, *m) for m in part["mismatch_samples"])
        end_ns = max(end_ns, part["end_ns"])
    waits = len(latencies)
    late_pct = percentiles(late)
    return LoadgenReport(
        clients=clients,
        closed_loop=closed_loop,
        rate=rate,
        verify=verify,
        map_hits=map_hits,
        waits=waits,
        errors=errors,
        not_issued=not_issued,
        mismatches=mismatches,
        duration_s=(end_ns - start_ns) / 1e9,
        immediate=immediate,
        served=served,
        latency_us=percentiles(latencies),
        late_us={"p50": late_pct["p50"], "p99": late_pct["p99"], "max": late_pct["max"]},
        overhead_us_per_wait=overhead_ns / waits / 1000 if waits else 0.0,
        verify_us_per_wait=verify_ns / waits / 1000 if waits else 0.0,
        error_samples=tuple(error_samples[:SAMPLES_KEPT]),
        mismatch_samples=tuple(mismatch_samples[:SAMPLES_KEPT]),
        start_ns=start_ns,
        latencies_ns=latencies,
        completed_ns=completed,
    )
