"""Nearest-rank percentiles of latency samples: every figure is a value that was
observed, never an interpolation."""

from __future__ import annotations

from collections.abc import Sequence


def percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    """``count`` and p50/p90/p99/p99.9 (``p999``)/max/mean in microseconds.

    Nearest rank: the smallest sample with at least p % of the samples at or below
    it.  An empty sample gives ``count`` 0 and 0.0 for every figure.
    """
    n = len(samples_ns)
    if not n:
        return {"count": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0, "mean": 0.0}
    ordered = sorted(samples_ns)

    def rank(p: float) -> float:
        permille = round(p * 10)  # integer arithmetic, so 99.9 % of 1000 is exactly rank 999
        return ordered[min(n - 1, max(0, -(-permille * n // 1000) - 1))] / 1000

    return {
        "count": n,
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "p999": rank(99.9),
        "max": ordered[-1] / 1000,
        "mean": sum(ordered) / n / 1000,
    }
