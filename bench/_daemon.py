"""``pageload bench`` section ``daemon``: the daemon against its goals.

On one dense random image (every page data, page cache warm, ``threads``
backend), in one run:

* fill throughput — the daemon's own ``throughput_bps`` once ``done`` (loader
  created -> last byte), median of ``repeat`` runs without waits — against
  ``cp IMAGE /dev/shm/x`` on the warmed image (median of ``repeat``, at least 3, after one cold cp
  that is shown apart: :func:`~bench._tools.cp_limit`); goal ratio >= 0.8;
* spawn -> ``READY`` for that image (from the same runs) and for a 16 GiB sparse
  image (``repeat`` fresh daemons); goal <= 0.5 s each;
* 4 KiB waits on pages not loaded yet, during the fill (:class:`WaitProber`),
  client-timed; daemons are restarted until ``min_samples`` are collected (at most
  ``max_wait_runs``); goal p99 <= 2 ms;
* RSS outside the memory file (rssanon + rssfile, peak of the polls over every
  run) <= 100 MB, and the Python heap peak with ``--tracemalloc`` (one more run,
  with waits) <= 32 MiB.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from workloads import make_sample_image, percentiles

from ._tools import FillRun, cp_limit, fill_run, median

__all__ = ["Goal", "SPARSE_DATA_FRACTION", "run_daemon_section"]

SPARSE_DATA_FRACTION = 0.02  #: of the 16 GiB sparse image (about 330 MB of data)
SPARSE_HOLE_GRANULARITY = 256 << 10  #: so it has a few thousand extents, not a handful


@dataclass(frozen=True, slots=True)
class Goal:
    """One figure against its goal.  ``met`` is None when the figure is missing."""

    name: str
    value: float | None
    unit: str
    goal: str  #: e.g. "<= 2 ms"
    met: bool | None
    how: str = ""  #: what the value is, in a few words

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def at_most(name: str, value: float | None, limit: float, unit: str, how: str) -> Goal:
    return Goal(
        name, value, unit, f"<= {limit:g} {unit}", None if value is None else value <= limit, how
    )


def at_least(name: str, value: float | None, limit: float, unit: str, how: str) -> Goal:
    return Goal(
        name,
        value,
        unit,
        f">= {limit:g}{(' ' + unit) if unit else ''}",
        None if value is None else value >= limit,
        how,
    )


def run_daemon_section(
    image: str,
    sparse_image: str,
    workdir: str,
    *,
    repeat: int = 3,
    min_samples: int = 500,
    max_wait_runs: int = 8,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure everything listed in the module docstring; returns the section's JSON.

    ``image`` must be a dense raw image; ``sparse_image`` is created (16 GiB,
    ``SPARSE_DATA_FRACTION`` data) if it does not exist."""
    if not os.path.exists(sparse_image):
        log(f"making the 16 GiB sparse image {sparse_image}")
        make_sample_image(
            sparse_image,
            16 << 30,
            seed=1,
            data_fraction=SPARSE_DATA_FRACTION,
            hole_granularity=SPARSE_HOLE_GRANULARITY,
        )
    args = ["--aio", "threads"]
    cpl = cp_limit(image, warm_runs=max(repeat, 3))  # one cold cp (shown, not used), then the image warmed
    cp_runs = cpl.warm_runs_mb_s
    log(cpl.line())

    fills: list[FillRun] = []
    for i in range(repeat):
        run = fill_run(image, workdir, args)
        fills.append(run)
        log(
            f"fill {i + 1}/{repeat}: ready {run.ready_s:.3f} s, {run.throughput_mb_s:.0f} MB/s "
            f"in {run.fill_s:.3f} s, RSS outside memory {run.rss_outside_peak_bytes / 1e6:.1f} MB"
        )

    sparse_ready = []
    for _ in range(repeat):
        run = fill_run(sparse_image, workdir, args)
        sparse_ready.append(run.ready_s)
        fills_sparse = run
        log(f"16 GiB sparse: ready {run.ready_s:.3f} s ({run.total_bytes / 1e6:.0f} MB of data)")

    wait_runs: list[FillRun] = []
    samples: list[int] = []
    while len(samples) < min_samples and len(wait_runs) < max_wait_runs:
        run = fill_run(image, workdir, args, probe=True, seed=len(wait_runs))
        wait_runs.append(run)
        samples.extend(run.samples_ns)
        p = percentiles(run.samples_ns)
        log(
            f"waits run {len(wait_runs)}: {p['count']} waits on unloaded pages (daemon: "
            f"{run.waits_served} blocked), p50 {p['p50']:.0f} us, p99 {p['p99']:.0f} us; "
            f"fill {run.throughput_mb_s:.0f} MB/s"
        )

    heap_run = fill_run(image, workdir, [*args, "--tracemalloc"], probe=True, seed=99)
    log(
        f"--tracemalloc run: heap peak {(heap_run.heap_peak_bytes or 0) / 2**20:.1f} MiB, "
        f"RSS outside memory {heap_run.rss_outside_peak_bytes / 1e6:.1f} MB"
    )

    cp = cpl.warm_mb_s
    fill = median([r.throughput_mb_s for r in fills])
    ready_image = median([r.ready_s for r in fills])
    ready_sparse = median(sparse_ready)
    lat = percentiles(samples)
    all_runs = [*fills, fills_sparse, *wait_runs, heap_run]
    rss_peak = max(r.rss_outside_peak_bytes for r in all_runs)
    heap_peak = heap_run.heap_peak_bytes
    size_text = _size_text(os.path.getsize(image))
    goals = [
        at_least(
            "fill / cp ratio",
            fill / cp,
            0.8,
            "",
            f"median fill {fill:.0f} MB/s / median warm cp {cp:.0f} MB/s (cold {cpl.cold_mb_s:.0f}, not used)",
        ),
        at_most(f"ready, {size_text} image", ready_image, 0.5, "s", "spawn -> READY line, median"),
        at_most(
            "ready, 16 GiB sparse image", ready_sparse, 0.5, "s", "spawn -> READY line, median"
        ),
        at_most(
            "4 KiB wait on unloaded page, p99",
            lat["p99"] / 1000 if lat["count"] else None,
            2,
            "ms",
            f"client-timed, {lat['count']} waits in {len(wait_runs)} fills",
        ),
        at_most(
            "RSS outside the memory file, peak",
            rss_peak / 1e6,
            100,
            "MB",
            "max of rssanon+rssfile over stats polls, all runs",
        ),
        at_most(
            "Python heap peak (tracemalloc)",
            None if heap_peak is None else heap_peak / 2**20,
            32,
            "MiB",
            "stats process.heap_peak_bytes, one run with waits",
        ),
    ]
    return {
        "image": {"path": image, "size_bytes": os.path.getsize(image), "kind": "raw, dense random"},
        "backend": "threads",
        "cache": "warm",
        "cp": {"runs_mb_s": cp_runs, **cpl.as_dict()},
        "fill": {
            "runs": [r.as_dict() for r in fills],
            "throughput_mb_s": fill,
            "ratio_to_cp": fill / cp,
        },
        "ready": {
            "image_s": ready_image,
            "image_runs_s": [r.ready_s for r in fills],
            "sparse_16g_s": ready_sparse,
            "sparse_16g_runs_s": sparse_ready,
            "sparse_16g": {
                "path": sparse_image,
                "size_bytes": 16 << 30,
                "data_bytes": fills_sparse.total_bytes,
            },
        },
        "waits": {
            "runs": len(wait_runs),
            "selection": wait_runs[0].selection if wait_runs else "",
            "client_us": lat,
            "daemon_blocked": sum(r.waits_served for r in wait_runs),
            "daemon_p99_bucket_us": max((r.daemon_p99_us for r in wait_runs), default=0.0),
            "fill_with_waits_mb_s": median([r.throughput_mb_s for r in wait_runs])
            if wait_runs
            else None,
            "per_run": [{**r.as_dict(), "client_us": percentiles(r.samples_ns)} for r in wait_runs],
        },
        "memory": {
            "rss_outside_peak_bytes": rss_peak,
            "vmhwm_bytes": max(r.vmhwm_bytes for r in all_runs),
            "heap_peak_bytes": heap_peak,
            "heap_run": {**heap_run.as_dict(), "client_us": percentiles(heap_run.samples_ns)},
        },
        "goals": [g.as_dict() for g in goals],
    }


def _size_text(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"
