"""The design comparison: the same image and trace against four daemon designs.

:func:`run_designs` starts, for each design, a fresh ``pageload restore``
subprocess on the same image (stdout piped to catch its ``READY`` line; with
``tracemalloc=True`` also ``--tracemalloc``, for each design's heap peak: that
tracing slows the daemon's Python, more so the busier it is, so the timed runs of
``pageload bench`` go without it and the heap goal is the ``daemon`` section's):

* ``priority`` — ``--background``: serve at once, waits jump ahead of the sweep (ours);
* ``eager``    — no ``--background``: load everything, then open the socket;
* ``lazy``     — ``--background --no-sweep``: load only what is waited for;
* ``fifo``     — ``--background --no-priority``: waits queue behind the sweep.

The clients' processes are started first and idle; then the daemon is spawned
(the restore starts).  The application "resumes" when the daemon is ready, so
``ready_s`` runs from the spawn to the ``READY`` line (for eager it holds the whole load); the clients
start then.  Their blocked time ``blocked_s`` is what the application loses: each
client is blocked from the spawn until ready, then for each of its waits
(``wait_blocked_s`` is the second part alone).  A thread
polls the daemon's statistics every :data:`POLL_INTERVAL_S` from ready until it is
fully loaded (or, for lazy, until the clients finish), giving ``loaded_s``
(resolution: the poll interval) and a loaded-bytes time series for the plot.
Nothing is dropped from the page cache between designs (a warm cache): the image is
read through before each design's daemon starts.  With ``rounds`` > 1 the designs
take turns, their order alternating from round to round (:func:`design_order`), so
none always runs first on a machine whose speed drifts.

The same run measures the limits the numbers should be read against: copying
the image to ``/dev/shm`` with ``cp`` (MB/s of the image's apparent size: the median
of three on the warmed image; one cold cp before them is shown apart), a raw
Unix-socket round trip to an echo process (p50 us) and a 4 KiB ``pread`` of the
image (p50 us).  After the priority design has loaded everything, the trace is
replayed once more in closed loop: that rate is the generator's ceiling against a
daemon with nothing left to load (``limits.loadgen_ceiling_waits_per_s``).
"""

from __future__ import annotations

import os
import random
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from typing import Any

from loader import Client, ClientError
from workloads import DaemonProcess, DaemonStartError, LoadgenError, LoadgenReport, Trace, percentiles, run_loadgen

from ._tools import BenchError, CpLimit, cp_limit, cp_text, echo_socket, median, round_trips, warm_cache

__all__ = [
    "DESIGNS",
    "DesignError",
    "PlotUnavailable",
    "format_designs",
    "measure_limits",
    "plot_designs",
    "run_designs",
]

#: design name -> extra ``pageload restore`` flags
DESIGNS: dict[str, tuple[str, ...]] = {
    "priority": ("--background",),
    "eager": (),
    "lazy": ("--background", "--no-sweep"),
    "fifo": ("--background", "--no-priority"),
}
POLL_INTERVAL_S = 0.05  # the daemon answers each poll: keep their cost out of the clients' way
READY_TIMEOUT_S = 600.0
LOAD_TIMEOUT_S = 600.0
#: points kept per design for the plots (latency quantiles, wait marks)
PLOT_POINTS = 1000


class DesignError(Exception):
    """A daemon did not start, or did not exit cleanly; one line, with its log file."""


class PlotUnavailable(Exception):
    """matplotlib is not installed (the ``plot`` extra); one line saying so."""


# -- limits ---------------------------------------------------------------------------------


def _socket_rtt_us(workdir: str, rounds: int = 2000) -> float:
    try:
        with echo_socket(workdir) as sock:
            return percentiles(round_trips(sock, rounds, 32))["p50"]
    except BenchError as exc:
        raise DesignError(str(exc)) from None


def _pread_4k_us(image: str, rounds: int = 2000) -> float:
    size = os.stat(image).st_size
    pages = max(1, size // 4096)
    rng = random.Random(0)
    buf = bytearray(4096)
    samples = array("Q")
    fd = os.open(image, os.O_RDONLY)
    try:
        clock = time.perf_counter_ns
        for _ in range(rounds):
            off = rng.randrange(pages) * 4096
            t0 = clock()
            os.preadv(fd, [buf], off)
            samples.append(clock() - t0)
    finally:
        os.close(fd)
    return percentiles(samples)["p50"]


def _cp_or_none(image: str, log: Callable[[str], None]) -> CpLimit | None:
    try:
        return cp_limit(image)
    except BenchError as exc:
        log(f"limits: {exc}")
        return None


def measure_limits(image: str, workdir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``cp`` to /dev/shm (MB/s: the median of three on the warmed image, after one cold cp
    shown apart, :func:`~bench._tools.cp_limit`), a Unix-socket round trip and a 4 KiB pread (p50 us)."""
    cp = _cp_or_none(image, log)
    limits = {
        "cp_mb_s": None if cp is None else cp.warm_mb_s,
        "cp": None if cp is None else cp.as_dict(),
        "socket_rtt_us": _socket_rtt_us(workdir),
        "pread_4k_us": _pread_4k_us(image),
    }
    log(
        f"limits: {'cp not timed' if cp is None else cp.line()}; socket round trip "
        f"{limits['socket_rtt_us']:.1f} us, 4 KiB pread {limits['pread_4k_us']:.1f} us (p50)"
    )
    return limits


# -- one design -----------------------------------------------------------------------------


class _Poller(threading.Thread):
    """Polls a daemon's stats: loaded-bytes series, and when it was first seen done."""

    def __init__(self, socket_path: str, t0: float) -> None:
        super().__init__(name="pageload-designs-poller", daemon=True)
        self.socket_path = socket_path
        self.t0 = t0
        self.t_s = array("d")
        self.loaded = array("Q")
        self.served = array("Q")  #: waits that blocked, so far (the daemon's ``waits_served``)
        self.done_s: float | None = None
        self.last: dict[str, Any] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client.connect(self.socket_path) as client:
                while True:
                    stats = client.stats()
                    now = time.perf_counter() - self.t0
                    self.last = stats
                    self.t_s.append(now)
                    self.loaded.append(int(stats["loaded_bytes"]))
                    self.served.append(int(stats["waits_served"]))
                    if stats["done"] and self.done_s is None:
                        self.done_s = now
                    if self.stop.wait(POLL_INTERVAL_S):
                        return
        except (OSError, ClientError) as exc:
            self.error = exc


def _daemon(image: str, design: str, workdir: str, aio_name: str, flags: Iterable[str] | None = None,
            tracemalloc: bool = False, source: str | None = None) -> DaemonProcess:
    flags = DESIGNS[design] if flags is None else flags
    args = [*(["--tracemalloc"] if tracemalloc else []), "--aio", aio_name, "--progress-interval", "3600", *flags]
    sock, log_path = os.path.join(workdir, f"{design}.sock"), os.path.join(workdir, f"{design}.log")
    return DaemonProcess(source or image, sock, log_path, args)


def _stop(daemon: DaemonProcess, design: str) -> None:
    code = daemon.stop(30)
    if code != 0:
        raise DesignError(f"{design}: the daemon exited with {code}: {daemon.stderr_tail(1)} (log {daemon.log_path})")


def _thin(values: Iterable[float], points: int) -> list[float]:
    data = list(values)
    if len(data) <= points:
        return data
    step = len(data) / points
    return [data[int(i * step)] for i in range(points)]


def run_one_design(
    image: str,
    trace: Trace,
    design: str,
    *,
    clients: int,
    workdir: str,
    aio_name: str,
    log: Callable[[str], None],
    ceiling: bool,
    flags: Iterable[str] | None = None,
    tracemalloc: bool = False,
    loaded_map: bool = False,
    samples_ns: list[int] | None = None,
    source: str | None = None,
) -> tuple[dict[str, Any], float | None]:
    """One daemon (``flags``, default the design's) replaying ``trace``; its row.
    ``loaded_map``: the clients answer waits the daemon's loaded map shows loaded
    themselves (``run_loadgen(loaded_map=True)``).  ``samples_ns``: the clients' wait
    latencies are appended to it (to pool several rounds' percentiles).  ``source``: what
    the daemon restores, where it is not ``image`` (a checkpoint in a store, say; the
    clients check the bytes against ``image``)."""
    flags = tuple(DESIGNS[design] if flags is None else flags)
    daemon = _daemon(image, design, workdir, aio_name, flags, tracemalloc, source)
    sock = daemon.socket_path
    spawned: list[Any] = []  # [t0, poller]

    def daemon_ready() -> None:
        # the clients' processes are up and idle: the restore starts now
        t0 = time.perf_counter()
        poller = _Poller(sock, t0)
        spawned[:] = [t0, poller]
        try:
            daemon.start(READY_TIMEOUT_S)
        except DaemonStartError as exc:
            raise DesignError(f"{design}: {exc} (log {daemon.log_path})") from None
        poller.start()

    ceiling_wps = None
    try:
        # the clients' processes start first; the daemon is spawned once they are idle
        report = run_loadgen(sock, trace, clients=clients, image=image, verify=True, wait_for_daemon=daemon_ready,
                             loaded_map=loaded_map)
        t0, poller = spawned
        ready_s = daemon.ready_s
        clients_done_s = time.perf_counter() - t0
        if "--no-sweep" not in flags:
            deadline = time.monotonic() + LOAD_TIMEOUT_S
            while poller.done_s is None and poller.is_alive() and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL_S)
        poller.stop.set()
        poller.join()
        if poller.error is not None:
            raise DesignError(f"{design}: polling the daemon's stats failed: {poller.error}")
        with Client.connect(sock) as client:
            final = client.stats()
        # the daemon says which design it ran: a flag lost on the way (a fifo run that
        # was really priority) must not become a wrong comparison
        asked = {"priority": "--no-priority" not in flags, "sweep": "--no-sweep" not in flags}
        ran = {key: final.get(key) for key in asked}
        if ran != asked:
            raise DesignError(f"{design}: the daemon reports {ran}, not the design's {asked} (log {daemon.log_path})")
        if ceiling and final["done"]:
            again = run_loadgen(sock, trace, clients=clients, image=image, verify=True, closed_loop=True)
            ceiling_wps = again.waits_per_s
    finally:
        if spawned:
            _, poller = spawned
            poller.stop.set()
            if poller.is_alive():
                poller.join()
            _stop(daemon, design)
    if samples_ns is not None:
        samples_ns.extend(report.latencies_ns)
    process = final.get("process", {})
    total = final["total_bytes"]
    row = {
        "ready_s": ready_s,
        "loaded_s": poller.done_s,
        "loaded_fraction": final["loaded_bytes"] / total if total else 1.0,
        "clients_done_s": clients_done_s,
        # the application is paused until the daemon is ready, in every design: each
        # client is blocked from the spawn to READY, then for each of its waits
        "blocked_s": clients * ready_s + report.blocked_s,
        "wait_blocked_s": report.blocked_s,
        "latency_us": {k: report.latency_us[k] for k in ("p50", "p90", "p99", "p999", "max", "mean")},
        "waits": report.waits,
        "waits_per_s": report.waits_per_s,
        "immediate": report.immediate,
        "map_hits": report.map_hits,
        "errors": report.errors + report.not_issued,
        "mismatches": report.mismatches,
        "peak_rss_bytes": process.get("vmhwm_bytes"),
        "rss_outside_memory_bytes": (
            process["rssanon_bytes"] + process["rssfile_bytes"] if "rssanon_bytes" in process else None
        ),
        "heap_peak_bytes": process.get("heap_peak_bytes"),
        "generator_overhead_us_per_wait": report.overhead_us_per_wait,
        "waits_blocked": final["waits_served"] + final["waits_failed"],
        "daemon_wait_time_s": final["total_wait_time_s"],
        "working_set": final.get("working_set"),
        "series": _series(report, poller),
    }
    return row, ceiling_wps


def _series(report: LoadgenReport, poller: _Poller) -> dict[str, list[float]]:
    """Thinned samples for the plots; times in seconds since the daemon's spawn (nothing is
    loaded then, whatever the design, so the series starts at 0 bytes at 0 s)."""
    # the clients' common start, in the poller's time base (both are perf_counter)
    start_s = report.start_ns / 1e9 - poller.t0
    ordered = sorted(report.latencies_ns)
    n = len(ordered)
    quantiles = [ordered[min(n - 1, int(i * n / PLOT_POINTS))] / 1000 for i in range(PLOT_POINTS)] if n else []
    ends = sorted(report.completed_ns)
    return {
        "t_s": [0.0, *_thin(poller.t_s, PLOT_POINTS * 4)],
        "loaded_bytes": [0, *_thin(poller.loaded, PLOT_POINTS * 4)],
        "wait_end_s": [start_s + e / 1e9 for e in _thin(ends, PLOT_POINTS)],
        "waits_blocked": [0, *_thin(poller.served, PLOT_POINTS * 4)],
        "latency_quantiles_us": quantiles,
    }


def design_order(names: list[str], round_index: int) -> list[str]:
    """The order the designs run in, in round ``round_index`` (from 0): round ``2k`` is
    ``names`` rotated left by ``k``, round ``2k+1`` the reverse of round ``2k``.  Over
    each pair of rounds every design's mean position is the same, and the design that
    goes first changes from pair to pair (each goes first equally often over
    ``2 * len(names)`` rounds): no design always runs first, or always right after
    the same one, on a machine whose speed drifts over minutes."""
    if not names:
        return []
    k = (round_index // 2) % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if round_index % 2 else order


#: per-round figures that are combined as their median over the rounds
_MEDIAN_KEYS = ("ready_s", "clients_done_s", "blocked_s", "wait_blocked_s", "waits_per_s",
                "generator_overhead_us_per_wait", "daemon_wait_time_s")
#: counts summed over the rounds
_SUM_KEYS = ("waits", "errors", "mismatches", "map_hits", "waits_blocked")


def _combine(rows: list[dict[str, Any]], samples_ns: list[int]) -> dict[str, Any]:
    """One design's row from several rounds: medians of the times (``loaded_s`` only when
    every round loaded everything), counts summed, latency percentiles over every round's
    waits pooled, memory peaks the largest; series and working set from the round with
    the median blocked time; each round's own figures kept in ``rounds``."""
    if len(rows) == 1:
        return rows[0]
    by_blocked = sorted(rows, key=lambda r: r["blocked_s"])
    out = dict(by_blocked[(len(rows) - 1) // 2])
    for key in _MEDIAN_KEYS:
        out[key] = median([r[key] for r in rows])
    for key in _SUM_KEYS:
        out[key] = sum(r[key] for r in rows)
    loaded = [r["loaded_s"] for r in rows]
    out["loaded_s"] = median(loaded) if all(v is not None for v in loaded) else None
    out["loaded_fraction"] = min(r["loaded_fraction"] for r in rows)
    immediate = [r["immediate"] for r in rows]
    out["immediate"] = sum(immediate) if all(v is not None for v in immediate) else None
    for key in ("peak_rss_bytes", "rss_outside_memory_bytes", "heap_peak_bytes"):
        got = [r[key] for r in rows if r[key] is not None]
        out[key] = max(got) if got else None
    p = percentiles(samples_ns)
    out["latency_us"] = {k: p[k] for k in ("p50", "p90", "p99", "p999", "max", "mean")}
    return out


def run_designs(
    image_path: str,
    trace: Trace,
    *,
    clients: int,
    workdir: str,
    designs: Iterable[str] = ("priority", "eager", "lazy", "fifo"),
    log: Callable[[str], None] = print,
    aio: str = "auto",
    tracemalloc: bool = False,
    loaded_map: bool = False,
    rounds: int = 1,
) -> dict[str, Any]:
    """Run every design on ``image_path`` with ``trace``, ``rounds`` times; return the comparison.

    The designs take turns, in :func:`design_order` (``order``: each round's), each from
    an image read through just before.  With several rounds a design's row combines them
    (:func:`_combine`: medians, pooled latencies) and keeps each round's own figures,
    with its position in that round, in ``rounds``.
    ``workdir`` holds the sockets and each daemon's log (``<design>.log``).  Each
    daemon is stopped with SIGTERM and must exit 0.  A design whose daemon fails
    (does not start, crashes, exits non-zero) or whose run cannot be made gets
    ``{"error": "<one line>"}`` instead of its numbers, and the others still run.
    Raises ``ValueError`` for an unknown design.  The result is JSON-ready:
    ``{"designs": {name: {...}}, "limits": {...}, "clients": N, "faults": N, "order": [[...], ...]}``;
    each design's ``series`` holds thinned samples for :func:`plot_designs`.
    ``tracemalloc``: run the daemons with ``--tracemalloc`` (``heap_peak_bytes``,
    None otherwise), at the cost of timings that tracing distorts.  ``loaded_map``:
    the clients map each daemon's loaded map first, so a wait for bytes it shows
    loaded sends nothing (``map_hits`` per design; ``immed.`` then counts the map's).
    """
    names = list(designs)
    for name in names:
        if name not in DESIGNS:
            raise ValueError(f"unknown design {name!r} (one of {', '.join(DESIGNS)})")
    rounds = max(1, rounds)
    os.makedirs(workdir, exist_ok=True)
    image = os.path.abspath(image_path)
    limits = measure_limits(image, workdir, log)
    limits["loadgen_ceiling_waits_per_s"] = None
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    samples: dict[str, list[int]] = {name: [] for name in names}
    errors: dict[str, str] = {}
    orders: list[list[str]] = []
    t_start = time.perf_counter()
    for r in range(rounds):
        order = design_order(names, r)
        orders.append(order)
        if rounds > 1:
            log(f"round {r + 1} of {rounds}: {', '.join(order)}")
        for position, name in enumerate(order):
            if name in errors:
                continue
            log(f"{name}: pageload restore {' '.join(DESIGNS[name]) or '(eager)'} ...")
            warm_cache(image)  # every design starts from the same page cache: the image read through
            started_s = time.perf_counter() - t_start
            try:
                row, ceiling = run_one_design(
                    image,
                    trace,
                    name,
                    clients=clients,
                    workdir=workdir,
                    aio_name=aio,
                    log=log,
                    ceiling=name == "priority" and limits["loadgen_ceiling_waits_per_s"] is None,
                    tracemalloc=tracemalloc,
                    loaded_map=loaded_map,
                    samples_ns=samples[name],
                )
            except (DesignError, LoadgenError, ClientError, OSError) as exc:
                # one design failing (its daemon crashed) must not hide the others' results
                errors[name] = f"{type(exc).__name__}: {exc}"
                log(f"{name}: FAILED: {errors[name]}")
                continue
            if ceiling is not None:
                limits["loadgen_ceiling_waits_per_s"] = ceiling
            row["round"] = {"round": r, "position": position, "started_s": started_s}
            rows[name].append(row)
            log(_row_line(name, row))
    out: dict[str, Any] = {}
    for name in names:
        if name in errors:
            out[name] = {"error": errors[name]}
            continue
        combined = _combine(rows[name], samples[name])
        combined["rounds"] = [
            {**r.pop("round"), **{k: r[k] for k in ("ready_s", "loaded_s", "blocked_s", "wait_blocked_s")},
             "latency_p50_us": r["latency_us"]["p50"], "latency_p99_us": r["latency_us"]["p99"]}
            for r in rows[name]
        ]
        combined.pop("round", None)
        out[name] = combined
    return {"designs": out, "limits": limits, "clients": clients, "faults": len(trace), "loaded_map": loaded_map,
            "rounds": rounds, "order": orders}


# -- output ---------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / (1 << 20):.1f}"


def _row_line(name: str, row: dict[str, Any]) -> str:
    lat = row["latency_us"]
    loaded = (
        _s(row["loaded_s"]) if row["loaded_s"] is not None else f"never ({row['loaded_fraction'] * 100:.0f}% loaded)"
    )
    return (
        f"{name}: ready {row['ready_s']:.3f} s, loaded {loaded}, blocked {row['blocked_s']:.3f} s, "
        f"wait p50 {lat['p50']:.0f} us p99 {lat['p99']:.0f} us max {lat['max']:.0f} us, "
        f"{row['errors']} errors, {row['mismatches']} mismatches"
    )


def format_designs(result: dict[str, Any]) -> str:
    """The comparison as a terminal table, limits underneath."""
    head = (
        "design",
        "ready s",
        "loaded s",
        "blocked s",
        "p50 us",
        "p90 us",
        "p99 us",
        "p99.9 us",
        "max us",
        "waits",
        "immed.",
        "err",
        "mism",
        "peak RSS MiB",
        "heap MiB",
    )
    rows = [head]
    failed = []
    for name, r in result["designs"].items():
        if "error" in r:
            failed.append(f"{name}: FAILED: {r['error']}")
            continue
        lat = r["latency_us"]
        loaded = _s(r["loaded_s"]) if r["loaded_s"] is not None else f"({r['loaded_fraction'] * 100:.0f}%)"
        rows.append(
            (
                name,
                _s(r["ready_s"]),
                loaded,
                _s(r["blocked_s"]),
                *(f"{lat[k]:.0f}" for k in ("p50", "p90", "p99", "p999", "max")),
                str(r["waits"]),
                "-" if r["immediate"] is None else str(r["immediate"] + r.get("map_hits", 0)),
                str(r["errors"]),
                str(r["mismatches"]),
                _mib(r["peak_rss_bytes"]),
                _mib(r["heap_peak_bytes"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.extend(failed)
    lim = result["limits"]
    cp = "cp to /dev/shm not timed" if not lim.get("cp") else cp_text(lim["cp"])
    ceiling = lim.get("loadgen_ceiling_waits_per_s")
    lines.append(
        f"limits: {cp}; Unix socket round trip p50 {lim['socket_rtt_us']:.1f} us; "
        f"4 KiB pread p50 {lim['pread_4k_us']:.1f} us"
        + (f"; loadgen ceiling (loaded daemon, closed loop) {ceiling:.0f} waits/s" if ceiling else "")
    )
    lines.append(
        f"{result.get('faults', '?')} faults from {result.get('clients', '?')} clients; "
        "ready: spawn to READY; loaded: spawn to fully loaded (+-50 ms); blocked: clients x ready + sum of "
        "wait latencies; immed.: waits the daemon answered at once"
        + (f"; {result['rounds']} rounds, the designs taking turns in alternating order "
           "(" + " / ".join(",".join(o) for o in result.get("order", [])) + "): times are medians over the "
           "rounds, counts their sums, percentiles over every round's waits"
           if result.get("rounds", 1) > 1 else "")
        + ("; the clients used the loaded map: immed. includes the waits they answered from it, sending nothing"
           if result.get("loaded_map") else "")
    )
    return "\n".join(lines)


def plot_designs(result: dict[str, Any], path: str) -> None:
    """Two panels into ``path``: wait-latency CDF per design, loaded bytes over time with waits.

    Raises :class:`PlotUnavailable` when matplotlib is missing.
    """
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed (pip install 'pageload[plot]')") from None
    fig, (cdf, load) = plt.subplots(1, 2, figsize=(13, 5))
    for name, row in result["designs"].items():
        if "error" in row:
            continue
        series = row["series"]
        q = series["latency_quantiles_us"]
        if q:
            cdf.plot(q, [i / len(q) for i in range(len(q))], label=name)
        (line,) = load.plot(series["t_s"], [b / (1 << 20) for b in series["loaded_bytes"]], label=name)
        ends = series["wait_end_s"]
        load.plot(ends, [0] * len(ends), "|", color=line.get_color(), alpha=0.4, markersize=8)
        load.axvline(row["ready_s"], color=line.get_color(), linestyle=":", linewidth=1)
    cdf.set_xscale("log")
    cdf.set_xlabel("wait latency (us)")
    cdf.set_ylabel("fraction of waits")
    cdf.set_title("wait latency CDF")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend()
    load.set_xlabel("seconds since the daemon was started")
    load.set_ylabel("loaded (MiB)")
    load.set_title("bytes loaded; | = a wait completed, dotted = ready")
    load.grid(True, alpha=0.3)
    load.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
