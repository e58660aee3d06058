"""``pageload bench`` section ``scale``: millions of ranges against a dense image.

For each range count (64K, 256K, 1M and 4M; ``--quick``: 64K and 256K) a raw
image with one 4 KiB page of data every ``STRIDE`` pages (``checkpoint sample
--scattered``: count x 16 KiB of memory, count x 4 KiB of data) and its pages
checkpoint are restored by real daemons, warm cache, each beside a warm ``cp`` of
its own image and a *dense* image of the same data bytes (the fill it is compared
with).  Figures per count and kind: spawn -> READY, the fill (nobody waiting), RSS
outside the memory file, the Python heap peak (``--tracemalloc``, a run of its own),
and, in a run of their own, 4 KiB waits back to back on data pages not loaded yet
during the fill, client-timed (the dense image's waits taken the same way).  The
goals are the issue's (docs/BENCHMARKS.md, "Section `scale`").  A count whose data would
not fit in the host's memory twice over (the memory file plus the page cache) but
whose memory file would is restored *cold* (its image evicted from the page cache
first, read from disk: READY, the fill, RSS and the heap peak, no dense image, no cp,
no waits), and the largest count below it is then filled cold as well, so that the
fill growth between them compares fills from disk; a count whose memory file does
not fit is skipped, saying so.  Also a microbenchmark
of the range set at each count (front removal, a page punched out, a lookup).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from loader.checkpoint import create_checkpoint
from loader.core._rangeset import RangeSet
from workloads import make_sample_image, percentiles

from ._daemon import Goal, at_most
from ._tools import BenchError, cp_limit, evict_cache, fill_run, median, warm_cache

__all__ = ["COUNTS", "run_scale_section"]

COUNTS = (1 << 16, 1 << 18, 1 << 20, 1 << 22)
QUICK_COUNTS = (1 << 16, 1 << 18)
STRIDE = 4
PAGE = 4096
#: memory a cold count wants free beside its memory file (the daemon, the bench, the page
#: cache its reads pass through)
COLD_HEADROOM = 3 << 30


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rangeset_micro(count: int, ops: int = 2000) -> dict[str, float]:
    """Per-call costs of the loader's range set holding ``count`` one-page intervals:
    removing from the front (the sweep), punching a page out (a wait), a lookup."""
    from array import array

    step = STRIDE * PAGE
    s = RangeSet.from_arrays(array("Q", range(0, count * step, step)), array("Q", range(PAGE, count * step, step)))
    rng = random.Random(count)
    t = time.perf_counter()
    for i in range(ops):
        s.remove(i * step, i * step + PAGE)
    front = (time.perf_counter() - t) / ops
    t = time.perf_counter()
    for _ in range(ops):
        x = rng.randrange(ops, count) * step
        s.overlap_bytes(x, x + PAGE)
    query = (time.perf_counter() - t) / ops
    t = time.perf_counter()
    for _ in range(ops):
        x = rng.randrange(ops, count) * step
        s.remove(x + 1024, x + 2048)
    punch = (time.perf_counter() - t) / ops
    return {"front_remove_us": front * 1e6, "lookup_us": query * 1e6, "punch_us": punch * 1e6,
            "bytes_per_interval": s.memory_bytes() / max(1, len(s))}


def _run(source: str, workdir: str, args: list[str], stride: int, probe: bool, log: Callable[[str], None],
         label: str) -> dict[str, Any]:
    run = fill_run(source, workdir, args, probe=probe, stride=stride, timeout_s=1800.0)
    d = run.as_dict()
    d["fill_s"] = run.fill_s
    us = list(run.samples_ns)
    if probe:
        d["wait_client_us"] = percentiles(us) if us else None
    log(f"  {label}: ready {run.ready_s:.3f} s, fill {run.fill_s:.2f} s ({run.throughput_mb_s:.0f} MB/s), "
        f"RSS outside {run.rss_outside_peak_bytes / 2**20:.1f} MiB"
        + (f", heap peak {run.heap_peak_bytes / 2**20:.1f} MiB" if run.heap_peak_bytes else "")
        + (f", waits p50 {d['wait_client_us']['p50']:.0f} us (n={len(us)})" if probe and us else ""))
    return d


def run_scale_section(workdir: str, *, quick: bool = False, repeat: int = 1, counts: tuple[int, ...] | None = None,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    counts = counts or (QUICK_COUNTS if quick else COUNTS)
    out: dict[str, Any] = {"stride": STRIDE, "page": PAGE, "counts": {}, "micro": {}, "goals": []}
    for count in counts:
        out["micro"][str(count)] = rangeset_micro(count)
    cold_counts: list[int] = []
    for count in counts:
        data = count * PAGE
        size = count * STRIDE * PAGE
        available = _mem_available()
        if available < 2 * data + (1 << 30):
            if available >= data + COLD_HEADROOM:  # the memory file fits, the image's cache beside it not
                cold_counts.append(count)
                continue
            out["counts"][str(count)] = {"skipped": f"needs about {(data + COLD_HEADROOM) / 2**30:.0f} GiB of free "
                                                    f"memory (the memory file, {data / 2**30:.0f} GiB, and room), "
                                                    f"the host has {available / 2**30:.1f} GiB available"}
            log(f"scale {count}: skipped (memory)")
            continue
        dense = os.path.join(workdir, f"dense-{data >> 20}M.raw")
        t0 = time.perf_counter()
        raw, pages = _images(count, workdir)
        if not os.path.exists(dense) or os.path.getsize(dense) != data:
            make_sample_image(dense, data, dense=True)
        log(f"scale {count}: images ready in {time.perf_counter() - t0:.1f} s")
        row: dict[str, Any] = {"memory_bytes": size, "data_bytes": data}
        sources = (("dense", dense), ("raw", raw), ("pages", os.path.join(pages, "pages.img")))
        for name, src in sources:
            for _, other in sources:
                evict_cache(other)
            row[f"cp_{name}"] = cp_limit(src, warm_runs=max(2, repeat)).as_dict()
        runs: dict[str, list[dict[str, Any]]] = {"dense": [], "raw": [], "pages": []}
        probes: dict[str, list[dict[str, Any]]] = {"dense": [], "raw": [], "pages": []}
        for r in range(max(1, repeat)):  # the kinds take turns, in an order that alternates
            order = [("dense", dense, 1), ("raw", raw, STRIDE), ("pages", pages, STRIDE)]
            for kind, src, stride in (order if r % 2 == 0 else order[::-1]):
                # only this run's source in the cache, warm: the others' cache would be reclaimed
                # while the memory file is made, inside the measurement
                for _, other in sources:
                    evict_cache(other)
                warm_cache(src if kind != "pages" else os.path.join(pages, "pages.img"))
                runs[kind].append(_run(src, workdir, [], stride, False, log, f"{kind} #{r + 1} fill"))
                probes[kind].append(_run(src, workdir, [], stride, True, log, f"{kind} #{r + 1} waits"))
        for kind, src, stride in (("raw", raw, STRIDE), ("pages", pages, STRIDE)):
            for _, other in sources:
                evict_cache(other)
            warm_cache(src if kind != "pages" else os.path.join(pages, "pages.img"))
            heap = _run(src, workdir, ["--tracemalloc"], stride, False, log, f"{kind} heap")
            runs[kind + "_heap"] = [heap]
        for kind in ("dense", "raw", "pages"):
            rs = runs[kind]
            row[kind] = {
                # every spawn of the kind is one of READY (the fill runs' and the wait runs'): the
                # one right after its image was read through was at times slower (0.46 against
                # 0.25 s, the page cache holding what it needs; why is not known), and two
                # samples made that one half the median
                "ready_s": median([x["ready_s"] for x in rs + probes[kind]]),
                "fill_s": median([x["fill_s"] for x in rs]),
                "rss_outside_peak_bytes": max(x["rss_outside_peak_bytes"] for x in rs + probes[kind]),
                "wait_p50_us": median([x["wait_client_us"]["p50"] for x in probes[kind] if x.get("wait_client_us")]
                                      or [0.0]),
                "fill_with_waits_s": median([x["fill_s"] for x in probes[kind]]),
                "runs": rs,
                "wait_runs": probes[kind],
            }
            if kind != "dense":
                row[kind]["heap_peak_bytes"] = runs[kind + "_heap"][0]["heap_peak_bytes"]
                row[kind]["fill_vs_dense"] = row[kind]["fill_s"] / row["dense"]["fill_s"]
                row[kind]["wait_p50_vs_dense"] = (row[kind]["wait_p50_us"] / row["dense"]["wait_p50_us"]
                                                  if row["dense"]["wait_p50_us"] else None)
        out["counts"][str(count)] = row
    for count in cold_counts:
        out["counts"][str(count)] = _cold_row(count, workdir, repeat, log)
        # the largest count that fits twice, filled cold as well: fill growth compares like with like
        warm = [c for c in counts if c < count and "raw" in out["counts"].get(str(c), {})]
        if warm and "cold_fill_s" not in out["counts"][str(warm[-1])]["raw"]:
            _cold_fills(out["counts"][str(warm[-1])], warm[-1], workdir, repeat, log)
    out["goals"] = [g.as_dict() for g in _goals(out["counts"])]
    out["cold_cpu_growth"] = _cpu_growth(out["counts"])
    return out


def _cpu_growth(rows: dict[str, Any]) -> dict[str, float]:
    """Where 4M was filled from disk: the growth of the daemon's CPU time over its cold
    fills from 1M to 4M, per kind (the work that grows with the ranges, whatever the
    disk does; beside the goal's wall-clock growth, not instead of it)."""
    one, four = rows.get(str(1 << 20), {}), rows.get(str(1 << 22), {})
    out: dict[str, float] = {}
    for kind in ("raw", "pages"):
        a, b = four.get(kind, {}).get("cold_cpu_s"), one.get(kind, {}).get("cold_cpu_s")
        if a and b:
            out[kind] = a / b
    return out


def _images(count: int, workdir: str) -> tuple[str, str]:
    """The scattered raw image of ``count`` ranges and its pages checkpoint (made if missing)."""
    raw = os.path.join(workdir, f"scattered-{count}.raw")
    pages = os.path.join(workdir, f"scattered-{count}.ckpt")
    if not os.path.exists(raw) or os.path.getsize(raw) != count * STRIDE * PAGE:
        make_sample_image(raw, count * STRIDE * PAGE, scattered=STRIDE)
    if not os.path.exists(pages):
        create_checkpoint(raw, pages)
    return raw, pages


def _evict_image(raw: str, pages: str) -> None:
    """Before a cold run: the raw image and the pages file out of the page cache; the
    checkpoint's index and the daemon's modules in it (read once), as on a restore host
    where only the image is cold (after a 64 GiB image was read, they were not, and a
    4M-range checkpoint's spawn to READY took 1.9-2.2 s, reading its index from disk)."""
    evict_cache(raw)
    evict_cache(os.path.join(pages, "pages.img"))
    for name in sorted(os.listdir(pages)):
        if name != "pages.img":
            warm_cache(os.path.join(pages, name))
    subprocess.run([sys.executable, "-c", "import cli._restore, loader.daemon._run"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _runs_from_disk(raw: str, pages: str, src: str, workdir: str, repeat: int, log: Callable[[str], None],
                    label: str) -> list[dict[str, Any]]:
    """``repeat`` fills of ``src`` (the raw image or the checkpoint), each after :func:`_evict_image`."""
    runs = []
    for r in range(max(1, repeat)):
        _evict_image(raw, pages)
        runs.append(_run(src, workdir, [], STRIDE, False, log, f"{label} #{r + 1} cold fill"))
    return runs


def _cold_fills(row: dict[str, Any], count: int, workdir: str, repeat: int, log: Callable[[str], None]) -> None:
    """Fills of ``count``'s raw image and pages checkpoint with their files evicted from
    the page cache first (read from disk): ``row[kind]["cold_fill_s"]``, the median."""
    raw, pages = _images(count, workdir)
    for kind, src in (("raw", raw), ("pages", pages)):
        runs = _runs_from_disk(raw, pages, src, workdir, repeat, log, f"{count} {kind}")
        row[kind]["cold_fills_s"] = [x["fill_s"] for x in runs]
        row[kind]["cold_fill_s"] = median(row[kind]["cold_fills_s"])
        row[kind]["cold_cpu_s"] = median([x["cpu_s"] for x in runs])


def _cold_row(count: int, workdir: str, repeat: int, log: Callable[[str], None]) -> dict[str, Any]:
    """A count whose memory file fits in the host's memory but not the page cache of its
    image beside it: its raw image and pages checkpoint restored with the image's cache
    evicted first (from disk), for spawn to READY, RSS, the heap peak and a cold fill.
    No dense image, no cp (``/dev/shm`` cannot hold the copy), no waits."""
    t0 = time.perf_counter()
    raw, pages = _images(count, workdir)
    log(f"scale {count}: images ready in {time.perf_counter() - t0:.1f} s (cold: the memory file fits, "
        "its image's page cache beside it does not)")
    row: dict[str, Any] = {"memory_bytes": count * STRIDE * PAGE, "data_bytes": count * PAGE, "cold": True}
    for kind, src in (("raw", raw), ("pages", pages)):
        rs = _runs_from_disk(raw, pages, src, workdir, repeat, log, kind)
        _evict_image(raw, pages)
        heap = _run(src, workdir, ["--tracemalloc"], STRIDE, False, log, f"{kind} heap (cold)")
        row[kind] = {
            "ready_s": median([x["ready_s"] for x in rs]),
            "fill_s": median([x["fill_s"] for x in rs]),
            "cold_fill_s": median([x["fill_s"] for x in rs]),
            "cold_cpu_s": median([x["cpu_s"] for x in rs]),
            "rss_outside_peak_bytes": max(x["rss_outside_peak_bytes"] for x in rs),
            "heap_peak_bytes": heap["heap_peak_bytes"],
            "runs": rs,
            "heap_run": heap,
        }
    return row


def _goals(rows: dict[str, Any]) -> list[Goal]:
    goals: list[Goal] = []
    one, four = rows.get(str(1 << 20)), rows.get(str(1 << 22))
    for label, row, rss_limit in (("1M", one, 64.0), ("4M", four, 160.0)):
        if row is None or "skipped" in row:
            continue
        count = 1 << 20 if label == "1M" else 1 << 22
        for kind in ("raw", "pages"):
            r = row[kind]
            goals.append(at_most(f"{label} {kind}: spawn to READY", r["ready_s"], 0.5, "s", "median"))
            goals.append(at_most(f"{label} {kind}: RSS outside the memory file", r["rss_outside_peak_bytes"] / 2**20,
                                  rss_limit, "MiB", "peak of the polls"))
            heap = r.get("heap_peak_bytes")
            goals.append(at_most(f"{label} {kind}: Python heap peak", None if heap is None else heap / 2**20,
                                  16 + 32 * count / 2**20, "MiB", "--tracemalloc, 16 MiB + 32 B per range"))
            if label == "1M":
                goals.append(at_most(f"1M {kind}: fill / dense fill of the same bytes", r["fill_vs_dense"], 3.0, "x",
                                      "median fills"))
                goals.append(at_most(f"1M {kind}: 4 KiB wait p50 / dense", r["wait_p50_vs_dense"], 1.5, "x",
                                      "client-timed, during the fill"))
    if one is not None and four is not None and "skipped" not in one and "skipped" not in four:
        cold = bool(four.get("cold") or one.get("cold"))
        for kind in ("raw", "pages"):
            key = "cold_fill_s" if cold else "fill_s"
            a, b = four[kind].get(key), one[kind].get(key)
            goals.append(at_most(f"{kind}: fill growth 1M -> 4M", a / b if a and b else None, 4.5, "x",
                                  "median fills, both from disk (4M's image does not fit in the page cache "
                                  "beside its memory file)" if cold else "median fills"))
    return goals


def format_scale(section: dict[str, Any]) -> list[str]:
    lines = [f"scale (one 4 KiB page of data every {section['stride']} pages, warm cache; "
             "against a dense image of the same data)"]
    header = f"{'ranges':>8} {'kind':6} {'ready s':>8} {'fill s':>8} {'x dense':>8} {'RSS MiB':>8} {'heap MiB':>9} " \
             f"{'wait p50 us':>11} {'cp MB/s':>8}"
    lines.append(header)
    for count, row in section["counts"].items():
        if "skipped" in row:
            lines.append(f"{count:>8} skipped: {row['skipped']}")
            continue
        if row.get("cold"):
            for kind in ("raw", "pages"):
                r = row[kind]
                lines.append(f"{count:>8} {kind:6} {r['ready_s']:8.3f} {r['fill_s']:8.2f} {'-':>8} "
                             f"{r['rss_outside_peak_bytes'] / 2**20:8.1f} {r['heap_peak_bytes'] / 2**20:9.1f} "
                             f"{'-':>11} {'-':>8}  (from disk: the image's cache does not fit beside the memory file)")
            continue
        for kind in ("dense", "raw", "pages"):
            r = row[kind]
            heap = r.get("heap_peak_bytes")
            lines.append(f"{count:>8} {kind:6} {r['ready_s']:8.3f} {r['fill_s']:8.2f} "
                         f"{r.get('fill_vs_dense', 1.0):8.2f} {r['rss_outside_peak_bytes'] / 2**20:8.1f} "
                         f"{'-' if heap is None else f'{heap / 2**20:.1f}':>9} {r['wait_p50_us']:11.0f} "
                         f"{row['cp_' + kind]['warm_mb_s']:8.0f}")
    for count, row in section["counts"].items():
        for kind in ("raw", "pages"):
            if "cold_fills_s" in row.get(kind, {}):
                lines.append(f"{count:>8} {kind:6} filled from disk (beside the counts that do not fit): "
                             f"{row[kind]['cold_fill_s']:.2f} s, the daemon's CPU {row[kind]['cold_cpu_s']:.2f} s")
    for kind, growth in section.get("cold_cpu_growth", {}).items():
        lines.append(f"  {kind}: the daemon's CPU time over a fill from disk, 1M -> 4M: {growth:.2f}x")
    lines.append("range set, per call: " + "; ".join(
        f"{c}: front {m['front_remove_us']:.1f} us, punch {m['punch_us']:.1f} us, lookup {m['lookup_us']:.1f} us, "
        f"{m['bytes_per_interval']:.1f} B/interval" for c, m in section["micro"].items()))
    for g in section["goals"]:
        met = {True: "met", False: "NOT MET", None: "missing"}[g["met"]]
        value = "-" if g["value"] is None else f"{g['value']:.3g}"
        lines.append(f"  {g['name']}: {value} {g['unit']} (goal {g['goal']}) {met}")
    return lines


def check_counts(counts: tuple[int, ...]) -> None:
    if not counts or any(c <= 0 for c in counts):
        raise BenchError("scale counts must be positive")
