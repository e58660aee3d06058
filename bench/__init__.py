"""``pageload bench``: the speed and memory goals, measured against the machine's
own limits in one run (never asserted in tests).

Sections: ``daemon`` (fill, ready, wait latency, memory), ``backends`` (every AIO
backend, warm and cold), ``designs`` (ours against eager, lazy-only and
first-come-first-served restores under one trace), ``workingset`` (restores with
and without a recorded working set), ``store`` (the chunk store: compression, fills
local and from S3 through a throttled proxy, a layer's dedup, faults on unfetched
chunks), and more (``bench._run``'s docstring lists them all).
"""

from ._designs import DESIGNS, DesignError, PlotUnavailable, format_designs, plot_designs, run_designs
from ._run import QUICK_SIZE, SECTIONS, BenchOptions, format_bench, run_bench
from ._tools import (
    BenchError,
    WaitProber,
    byte_compile,
    cp_mb_s,
    drop_caches,
    evict_cache,
    fill_run,
    median,
    warm_cache,
)
from ._workingset import format_workingset, perturb_trace, plot_workingset, run_workingset_section

__all__ = [
    "DESIGNS",
    "QUICK_SIZE",
    "SECTIONS",
    "BenchError",
    "BenchOptions",
    "DesignError",
    "PlotUnavailable",
    "WaitProber",
    "byte_compile",
    "cp_mb_s",
    "drop_caches",
    "fill_run",
    "format_bench",
    "format_designs",
    "format_workingset",
    "perturb_trace",
    "plot_workingset",
    "run_workingset_section",
    "median",
    "plot_designs",
    "run_bench",
    "run_designs",
    "warm_cache",
    "evict_cache",
]
