"""The ``workingset`` section: does replaying a recorded working set stop the faults?

:func:`run_workingset_section`, on one image and one trace, with the pieces of
:mod:`bench._designs` (client processes started first, the daemon spawned when
they idle, its stats polled):

1. **record**: ``restore --background --record-working-set WS --record-seconds 0``
   while the trace is replayed; the file is written when the daemon stops;
2. ``checkpoint create IMAGE CKPT --working-set WS``: the same data with the
   working set laid out first in ``pages.img`` (replay is a sequential read);
3. for the **same** trace and a **perturbed** one (:func:`perturb_trace`: 20 % of its
   distinct ranges moved elsewhere in the image), three restores: ``without``
   (``--no-working-set``), ``with`` (``--working-set WS`` on the raw image: the
   working set read as coalesced but scattered reads) and ``laid-out`` (CKPT, whose
   working set is picked up by default).

Each of the six restores runs twice: with plain clients (``same``, ``perturbed``) and
with clients that read the daemon's loaded map first (``same, loaded map``, ...:
a wait for a range the map shows loaded sends nothing).  The three variants of a
trace take turns in an order that alternates from trace to trace
(:func:`~bench._designs.design_order`), each restore from its source read through just
before, and the checkpoint's files are fsynced before the first: no baseline runs
alone right after the checkpoint's gigabyte was written.

Each run reports the waits that blocked and the daemon's total blocked time (sum
over waits of the time each was blocked), the clients' own summed wait latency
(``client_wait_s``: what the application feels, every round trip included; with
its ratio to ``without`` in ``client_wait``), the
time to the last fault (the last wait that blocked, from the stats polled every
50 ms) and to the end of the trace, the full-load time, and the working set's own
statistics.  ``goals`` compares ``with`` against ``without`` on the same trace
(>= 90 % fewer blocked waits, >= 3x less blocked time) and on the perturbed one
(fewer blocked waits and less blocked time).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from typing import Any

from loader import ClientError, read_working_set
from loader.checkpoint import CheckpointError, create_checkpoint, open_checkpoint
from workloads import LoadgenError, Trace

from ._designs import DesignError, PlotUnavailable, design_order, run_one_design
from ._tools import BenchError, warm_cache

__all__ = ["format_workingset", "perturb_trace", "plot_workingset", "run_workingset_section"]

VARIANTS = ("without", "with", "laid-out")
#: the runs whose clients read the daemon's loaded map (``run_loadgen(loaded_map=True)``)
MAP_SUFFIX = ", loaded map"
PERTURB_FRACTION = 0.2


def perturb_trace(trace: Trace, fraction: float, data: list[tuple[int, int]], seed: int = 0) -> Trace:
    """``trace`` with ``fraction`` of its distinct (offset, length) ranges each moved,
    consistently, to a random page-aligned place inside ``data`` (memory spans)."""
    rng = random.Random(seed)
    distinct = sorted(set(zip(trace.offset, trace.length)))
    moved = set(rng.sample(distinct, round(len(distinct) * fraction)))
    page = trace.page_size
    mapping: dict[tuple[int, int], int] = {}
    for off, n in sorted(moved):
        lo, hi = rng.choice([s for s in data if s[1] - s[0] >= n] or data)
        slots = max(1, (hi - lo - n) // page + 1)
        mapping[(off, n)] = lo + rng.randrange(slots) * page
    out = Trace(page_size=page, memory_size=trace.memory_size, source=f"{trace.source} (perturbed {fraction:.0%})")
    for t, off, n in zip(trace.t_us, trace.offset, trace.length):
        out.append(t, mapping.get((off, n), off), n)
    return out


def _last_blocked_s(row: dict[str, Any]) -> float | None:
    series = row["series"]
    served = series["waits_blocked"]
    last = None
    for t, prev, cur in zip(series["t_s"][1:], served, served[1:]):
        if cur > prev:
            last = t
    return last


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    ws = row.get("working_set") or {}
    return {
        "waits": row["waits"],
        "waits_blocked": row["waits_blocked"],
        "blocked_s": row["daemon_wait_time_s"],
        "client_wait_s": row["wait_blocked_s"],  #: the clients' own sum of their wait latencies
        "map_hits": row["map_hits"],  #: waits the clients answered from the loaded map, sending nothing
        "last_blocked_wait_s": _last_blocked_s(row),
        "trace_done_s": row["clients_done_s"],
        "ready_s": row["ready_s"],
        "loaded_s": row["loaded_s"],
        "latency_us": row["latency_us"],
        "errors": row["errors"],
        "mismatches": row["mismatches"],
        "working_set": ws or None,
        "series": {"t_s": row["series"]["t_s"], "waits_blocked": row["series"]["waits_blocked"]},
    }


def run_workingset_section(
    image: str,
    trace: Trace,
    *,
    clients: int,
    workdir: str,
    log: Callable[[str], None] = print,
    aio: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Record, lay out, and replay with and without the working set (module docstring)."""
    work = os.path.join(workdir, "ws")  # short: socket paths have at most 107 bytes
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    image = os.path.abspath(image)
    ws_path = os.path.join(work, "ws.msgpack")
    layout = open_checkpoint(image).layout
    data = [(m, m + n) for m, n, _ in layout]
    perturbed = perturb_trace(trace, PERTURB_FRACTION, data, seed)

    def run(name: str, source: str, flags: tuple[str, ...], tr: Trace, use_map: bool = False) -> dict[str, Any]:
        try:
            row, _ = run_one_design(source, tr, name, clients=clients, workdir=work, aio_name=aio, log=log,
                                 ceiling=False, flags=("--background", *flags), loaded_map=use_map)
        except (DesignError, LoadgenError, ClientError, OSError) as exc:
            raise BenchError(f"workingset {name}: {type(exc).__name__}: {exc}") from None
        return row

    log("workingset: recording while the trace replays ...")
    run("rec", image, ("--no-working-set", "--record-working-set", ws_path, "--record-seconds", "0"), trace)
    ws = read_working_set(ws_path)
    log(f"workingset: recorded {ws.total_bytes >> 10} KiB in {len(ws)} ranges")
    ckpt = os.path.join(work, "ckpt")
    try:
        report = create_checkpoint(image, ckpt, working_set=ws_path)
    except CheckpointError as exc:
        raise BenchError(f"workingset: checkpoint create --working-set: {exc}") from None
    log(f"workingset: laid out {report.working_set_bytes >> 10} KiB first in {ckpt}/pages.img")
    _settle(ckpt)
    sources = {
        "without": (image, ("--no-working-set",)),
        "with": (image, ("--working-set", ws_path)),
        "laid-out": (ckpt, ()),
    }
    warm = {"without": image, "with": image, "laid-out": open_checkpoint(ckpt).pages_path}
    runs: dict[str, dict[str, Any]] = {}
    orders: dict[str, list[str]] = {}
    traces = (("same", trace), ("perturbed", perturbed))
    sets = [(name, tr, use_map) for use_map in (False, True) for name, tr in traces]
    for index, (trace_name, tr, use_map) in enumerate(sets):
        key = f"{trace_name}{MAP_SUFFIX if use_map else ''}"
        runs[key] = {}
        # the variants take turns in an order that alternates from set to set (none always
        # runs first, e.g. right after the checkpoint was written), each from its source
        # read through just before
        orders[key] = design_order(list(VARIANTS), index)
        for variant in orders[key]:
            source, flags = sources[variant]
            warm_cache(warm[variant])
            tag = f"{trace_name[0]}{'m' if use_map else ''}-{variant}"  # s-with, pm-laid-out, ...
            row = _summary(run(tag, source, flags, tr, use_map))
            runs[key][variant] = row
            log(f"workingset {key} {variant}: {_line(row)}")
        runs[key] = {v: runs[key][v] for v in VARIANTS}  # rows in the same order every time
    result = {
        "faults": len(trace),
        "clients": clients,
        "perturbed_fraction": PERTURB_FRACTION,
        "recorded": {"bytes": ws.total_bytes, "ranges": len(ws), "window_s": ws.window_s},
        "laid_out_bytes": report.working_set_bytes,
        "order": orders,
        "runs": runs,
    }
    result["goals"] = _goals(runs)
    result["client_wait"] = _client_wait(runs)
    return result


def _settle(ckpt: str) -> None:
    """Write the new checkpoint's files out (fsync) before anything is timed: a run
    right after ``checkpoint create`` otherwise shares the disk with the writeback of
    its 1 GiB (the same-trace baseline once took 2.1-2.7 s to load, against 0.70 s)."""
    for name in sorted(os.listdir(ckpt)):
        path = os.path.join(ckpt, name)
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _client_wait(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per set of runs, the clients' own summed wait time for each variant and its ratio
    to ``without``: what the application feels, where the daemon's blocked time leaves
    out every wait's round trip (a wait that finds its range loaded still costs one,
    unless the client reads the loaded map)."""
    out: dict[str, dict[str, Any]] = {}
    for key, variants in runs.items():
        base = variants["without"]["client_wait_s"]
        out[key] = {v: {"client_wait_s": r["client_wait_s"], "ratio_to_without": _ratio(r["client_wait_s"], base)}
                    for v, r in variants.items()}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when it has no value (b is 0: nothing blocked at all)."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _less_met(base: float, got: float, factor: float) -> bool | None:
    if got <= 0:
        return True if base > 0 else None
    return base / got >= factor


def _goals(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    goals = []
    for variant in ("with", "laid-out"):
        same, pert = runs["same"], runs["perturbed"]
        base, got = same["without"], same[variant]
        fewer = 1 - got["waits_blocked"] / base["waits_blocked"] if base["waits_blocked"] else None
        less = _ratio(base["blocked_s"], got["blocked_s"])
        pbase, pgot = pert["without"], pert[variant]
        pfewer = 1 - pgot["waits_blocked"] / pbase["waits_blocked"] if pbase["waits_blocked"] else None
        pless = _ratio(pbase["blocked_s"], pgot["blocked_s"])
        goals += [
            {"name": f"{variant}: fewer blocked waits, same trace", "value": fewer, "goal": ">= 90 %",
             "met": None if fewer is None else fewer >= 0.9},
            {"name": f"{variant}: less blocked time, same trace", "value": less, "goal": ">= 3x",
             "met": _less_met(base["blocked_s"], got["blocked_s"], 3)},
            {"name": f"{variant}: fewer blocked waits, perturbed", "value": pfewer, "goal": ">= 30 % (a clear gain)",
             "met": None if pfewer is None else pfewer >= 0.3},
            {"name": f"{variant}: less blocked time, perturbed", "value": pless, "goal": ">= 1.5x (a clear gain)",
             "met": _less_met(pbase["blocked_s"], pgot["blocked_s"], 1.5)},
        ]
    return goals


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _line(row: dict[str, Any]) -> str:
    ws = row["working_set"]
    extra = ""
    if ws:
        extra = (f"; working set {ws['size_bytes'] >> 10} KiB loaded in {_s(ws['loaded_s'])} s, "
                 f"waits {ws['waits_hit']} hit / {ws['waits_early']} early / {ws['waits_missed']} missed")
    return (f"{row['waits_blocked']} of {row['waits']} waits blocked, blocked {row['blocked_s']:.4f} s, "
            f"clients' summed wait {row['client_wait_s']:.4f} s, "
            f"last blocked wait {_s(row['last_blocked_wait_s'])} s, trace done {_s(row['trace_done_s'])} s, "
            f"loaded {_s(row['loaded_s'])} s, {row['errors']} errors, {row['mismatches']} mismatches{extra}")


def format_workingset(result: dict[str, Any]) -> str:
    """The section as a terminal table, goals underneath."""
    head = ("trace", "restore", "blocked waits", "blocked s", "client wait s", "last blocked s", "trace done s",
            "loaded s", "ws loaded s", "hit/early/missed", "err", "mism")
    rows = [head]
    for trace_name, variants in result["runs"].items():
        for variant, r in variants.items():
            ws = r["working_set"]
            rows.append((
                trace_name, variant, f"{r['waits_blocked']}/{r['waits']}", f"{r['blocked_s']:.4f}",
                f"{r['client_wait_s']:.4f}", _s(r["last_blocked_wait_s"]), _s(r["trace_done_s"]), _s(r["loaded_s"]),
                _s(ws["loaded_s"]) if ws else "-",
                f"{ws['waits_hit']}/{ws['waits_early']}/{ws['waits_missed']}" if ws else "-",
                str(r["errors"]), str(r["mismatches"]),
            ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"workingset: {result['faults']} faults from {result['clients']} clients; recorded "
             f"{result['recorded']['bytes'] >> 10} KiB in {result['recorded']['ranges']} ranges"]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in rows]
    for g in result["goals"]:
        v = g["value"]
        none = "none blocked" if g["met"] else "-"
        shown = none if v is None else (f"{v * 100:.0f} %" if "waits" in g["name"] else f"{v:.1f}x")
        met = {True: "met", False: "NOT MET", None: "missing"}[g["met"]]
        lines.append(f"  {g['name']}: {shown} (goal {g['goal']}): {met}")
    for key, variants in result.get("client_wait", {}).items():
        lines.append(f"  clients' summed wait, {key} trace: " + ", ".join(
            f"{v} {c['client_wait_s']:.3f} s" + ("" if v == "without" or c["ratio_to_without"] is None
                                                  else f" ({c['ratio_to_without']:.2f}x without)")
            for v, c in variants.items()))
    if result.get("order"):
        lines.append("  run order: " + "; ".join(f"{k}: {', '.join(o)}" for k, o in result["order"].items())
                     + " (each from its source read through just before; the checkpoint fsynced first)")
    lines.append("  blocked s: the daemon's sum over waits of the time each was blocked; client wait s: the "
                 "clients' own sum of their wait latencies (every request's round trip included; the loaded-map "
                 "runs send none for ranges the map shows loaded); last blocked: "
                 "when the last wait that blocked was seen (stats polled every 50 ms), from the spawn")
    return "\n".join(lines)


def plot_workingset(result: dict[str, Any], path: str) -> None:
    """Blocked waits over time, with and without the working set, per trace."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed (pip install 'pageload[plot]')") from None
    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.5), squeeze=False)
    for ax, (trace_name, variants) in zip(axes[0], runs.items()):
        for variant, r in variants.items():
            ax.step(r["series"]["t_s"], r["series"]["waits_blocked"], where="post", label=variant)
        ax.set_title(f"{trace_name} trace: waits that blocked")
        ax.set_xlabel("seconds since the daemon was started")
        ax.set_ylabel("blocked waits (cumulative)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
