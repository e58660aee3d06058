"""Statistics records and the wait-latency histogram."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

#: bucket k counts latencies in [2**(k-1), 2**k) microseconds (bucket 0: below 1 us)
HISTOGRAM_BUCKETS = 40


def bound_us(counts: list[int], count: int, max_us: float, p: float) -> float:
    """Upper bound on the p-th percentile of a histogram of :data:`HISTOGRAM_BUCKETS`
    power-of-two buckets (``counts[k]``: latencies of ``[2**(k-1), 2**k)`` whole us):
    its bucket's upper bound ``2**k``, clamped to ``max_us`` (no sample lies above
    the max).  0.0 for an empty histogram."""
    if not count:
        return 0.0
    rank = p / 100 * count
    seen = 0
    upper = float(1 << (len(counts) - 1)) if counts else 0.0
    for k, c in enumerate(counts):
        seen += c
        if seen >= rank and c:
            upper = float(1 << k)
            break
    return min(upper, max_us)


def describe_bounds(counts: list[int], count: int, max_us: float, ps: tuple[float, ...] = (50, 99)) -> str:
    """The bounds of :func:`bound_us` for each of ``ps``, as bounds, then the max:
    ``"p50 <= 128 us, p99 <= 4096 us, max 2851 us"``."""
    if not count:
        return "no samples"
    parts = [f"p{p:g} <= {bound_us(counts, count, max_us, p):.0f} us" for p in ps]
    return ", ".join([*parts, f"max {max_us:.0f} us"])


def histogram_bound_us(hist: dict[str, Any], p: float) -> float:
    """:func:`bound_us` on a histogram as ``LatencyHistogram.as_dict`` (or the stats
    reply's ``latency_us``) gives it."""
    return bound_us(list(hist.get("counts", [])), int(hist.get("count", 0)), float(hist.get("max_us", 0.0)), p)


class LatencyHistogram:
    """Power-of-two microsecond buckets, as QEMU's postcopy reports them.  Fixed size."""

    __slots__ = ("counts", "count", "total_ns", "max_ns")

    def __init__(self) -> None:
        self.counts = [0] * HISTOGRAM_BUCKETS
        self.count = 0
        self.total_ns = 0
        self.max_ns = 0

    def record(self, ns: int) -> None:
        us = ns // 1000
        self.counts[min(us.bit_length(), HISTOGRAM_BUCKETS - 1)] += 1
        self.count += 1
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns

    def percentile_us(self, p: float) -> float:
        """An upper bound on the p-th percentile (0 < p <= 100), in microseconds: the
        upper bound of the bucket holding it, or the largest latency recorded where
        that is lower.  A bound, not a measurement: print it as one
        (:meth:`describe`), never as "p50 128 us"; 0.0 when nothing was recorded."""
        return bound_us(self.counts, self.count, self.max_ns / 1000, p)

    def describe(self, *ps: float) -> str:
        """``"p50 <= 128 us, p99 <= 4096 us, max 2851 us"`` (percentiles as the bounds
        they are, never above the max); ``"no samples"`` when empty."""
        return describe_bounds(self.counts, self.count, self.max_ns / 1000, ps or (50, 99))

    def as_dict(self) -> dict[str, Any]:
        last = max((k for k, c in enumerate(self.counts) if c), default=-1)
        return {
            "bucket_upper_us": [1 << k for k in range(last + 1)],
            "counts": self.counts[: last + 1],
            "count": self.count,
            "mean_us": self.total_ns / self.count / 1000 if self.count else 0.0,
            "max_us": self.max_ns / 1000,
        }


@dataclass(slots=True)
class LoaderCounters:
    """The loader's running counts, in one mutable record; :meth:`Loader.statistics`
    turns them (with the loader's state) into a frozen :class:`LoaderStatistics`."""

    reads_total: int = 0
    reads_copied: int = 0
    reads_retried: int = 0
    reads_timed_out: int = 0
    waits_total: int = 0
    waits_immediate: int = 0
    waits_served: int = 0
    waits_failed: int = 0
    waits_cancelled: int = 0
    bytes_waited: int = 0
    blocked_ns: int = 0  #: closed periods with at least one waiter blocked
    wait_ns: int = 0  #: sum over finished waits of the time each was blocked
    prefetches: int = 0
    chunks_verified: int = 0
    corrupt_chunks: int = 0


@dataclass(frozen=True, slots=True)
class LoaderStatistics:
    """A snapshot of the loader's state (``Loader.statistics()``)."""

    memory_size: int
    total_bytes: int  #: data bytes to load (holes excluded; while the holes are being found, those found so far)
    loaded_bytes: int
    failed_bytes: int
    #: (offset, length, errno), at most 64 listed; errno 0: no errno (corrupt, timeout,
    #: pages file too short)
    failed_ranges: list[tuple[int, int, int]]
    done: bool  #: nothing left to load (failed ranges included)
    elapsed_s: float
    throughput_bps: float  #: loaded_bytes / elapsed_s
    reads_in_flight: int
    background_reads_in_flight: int  #: of those, prefetch and sweep reads (at most ``background_reads``)
    reads_total: int
    #: submissions (resubmits included) copied file to file in the kernel (``aio.Op.COPY``),
    #: not read into the memory file's mapping
    reads_copied: int
    reads_retried: int
    reads_timed_out: int  #: failed with ``timeout`` after ``read_timeout``; their slots were freed
    reads_stuck: int  #: of those, not returned by the backend yet (a thread may still be in it)
    waits_total: int  #: every wait asked for
    waits_immediate: int  #: answered at once: already loaded, or a hole
    waits_served: int  #: answered after blocking
    waits_failed: int
    waits_cancelled: int  #: the client went away first
    waiters_blocked: int  #: blocked right now
    bytes_waited: int  #: bytes that waits had to wait for
    blocked_time_s: float  #: time during which at least one waiter was blocked
    total_wait_time_s: float  #: sum over waits of the time each was blocked
    prefetches: int
    verify: bool  #: chunks are checked against the checkpoint's checksums before being served
    priority: bool  #: waits jump ahead of the sweep (False: ``--no-priority``, first come, first served)
    sweep: bool  #: the background sweep loads everything (False: ``--no-sweep``, lazy only)
    chunks_verified: int
    corrupt_chunks: int  #: chunks whose checksum did not match: their pages failed with ``corrupt``
    latency_us: dict[str, Any] = field(default_factory=dict)  #: histogram (LatencyHistogram.as_dict)
    #: memory the loader has found the data of (the layout's, or a raw image's holes
    #: looked for); ``memory_size`` once ``total_bytes`` is exact
    scanned_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (msgpack- and JSON-able); cheap: stats may be polled often."""
        d = {name: getattr(self, name) for name in _FIELDS}
        d["failed_ranges"] = [list(r) for r in self.failed_ranges]
        return d


_FIELDS = tuple(f.name for f in fields(LoaderStatistics))
