"""Settling: memory that finished loading (or failed for good) leaves ``inflight``,
the loaded listeners hear of it, and the waiters it was the last bytes of are
answered.  The waiters blocked now, the failures by reason, the wait statistics and
the ``done`` event live here (docs/DESIGN.md, "Waits" and "Errors")."""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from operator import itemgetter

import trio

from protocol import codes

from .._memfile import Destination
from ._config import LoadError, Segs, WaitHandle
from ._rangeset import RangeSet
from ._stats import LatencyHistogram, LoaderCounters
from ._window import Window


class Settler:
    """Answers waiters as their bytes settle.  ``inflight`` and ``failed`` are the
    loader's sets (shared, never replaced); ``window`` says whether anything is left
    to start (:meth:`check_done`)."""

    def __init__(self, inflight: RangeSet, failed: RangeSet, destination: Destination, window: Window,
                 counters: LoaderCounters, order_loaded: Callable[[int, int], None] | None,
                 listeners: list[Callable[[int, int], None]], *, poke: Callable[[], None]) -> None:
        self.inflight = inflight
        self.failed = failed
        self._destination = destination
        self._window = window
        self.counters = counters
        self._order_loaded = order_loaded
        self._poke = poke
        #: failed intervals by (code, errno or 0, reason): merged, never one entry per page
        self._failures: dict[tuple[str, int, str], RangeSet] = {}
        self.waiters: list[WaitHandle] = []  #: blocked, not finished
        #: told of each span that finishes loading (shared with the window, which tells holes)
        self.listeners = listeners
        self.loaded_bytes = 0
        self.histogram = LatencyHistogram()
        self.blocked_since: int | None = None
        # when a wait last blocked or finished / last needed bytes (blocked, or read at once);
        # "never" is far in the past, not 0: the monotonic clock starts near 0 at boot
        self.last_wait_ns = self.last_fault_ns = -(1 << 62)
        self.done = trio.Event()
        self.started_ns = time.perf_counter_ns()
        self.finished_ns: int | None = None

    # ------------------------------------------------------------------ waiters
    def block(self, handle: WaitHandle) -> None:
        """``handle`` waits for bytes from now on."""
        if not self.waiters:
            self.blocked_since = handle.start_ns
        self.waiters.append(handle)

    def finish_waiter(self, w: WaitHandle, now: int) -> None:
        if w.cancelled:  # withdrawn meanwhile, by the callback of a waiter finished with it
            return
        w.finished = True
        self.last_wait_ns = now
        self.drop_waiter(w, now)
        elapsed = now - w.start_ns
        self.counters.wait_ns += elapsed
        self.histogram.record(elapsed)
        if w.error is None:
            self.counters.waits_served += 1
        else:
            self.counters.waits_failed += 1
        if w.callback is not None:
            w.callback(w)

    def drop_waiter(self, w: WaitHandle, now: int) -> None:
        try:
            self.waiters.remove(w)
        except ValueError:
            return
        if not self.waiters and self.blocked_since is not None:
            self.counters.blocked_ns += now - self.blocked_since
            self.blocked_since = None

    def answer_all(self, error: LoadError) -> None:
        """Answer every blocked waiter with ``error`` (shutting down)."""
        now = time.perf_counter_ns()
        for w in list(self.waiters):
            w.error = error
            self.finish_waiter(w, now)

    def served_at_once(self, need: int, start_ns: int) -> None:
        """Count a wait served in the waiting task (read, or verified, at once)."""
        counters = self.counters
        elapsed = time.perf_counter_ns() - start_ns
        counters.waits_served += 1
        counters.bytes_waited += need
        counters.wait_ns += elapsed
        if not self.waiters:
            counters.blocked_ns += elapsed
        self.histogram.record(elapsed)
        if self.done.is_set():
            self._poke()  # the driver may be parked with nothing left to do

    def blocked_ns(self, now: int) -> int:
        """Time during which at least one waiter was blocked, until ``now``."""
        return self.counters.blocked_ns + (now - self.blocked_since if self.blocked_since is not None else 0)

    def waiting_ns(self, now: int) -> int:
        """The waiters blocked now: their time so far, added up."""
        return sum(now - w.start_ns for w in self.waiters)

    # ------------------------------------------------------------------ failures
    def failure_for(self, lo: int, hi: int) -> LoadError:
        for (code, err, reason), ranges in self._failures.items():
            for flo, fhi in ranges.overlapping(lo, hi):
                return LoadError(code, f"memory {flo:#x}+{fhi - flo:#x}: {reason}", err or None)
        return LoadError(codes.IO_ERROR, "part of the range failed to load")

    def failed_ranges(self, limit: int) -> list[tuple[int, int, int]]:
        """(offset, length, errno or 0) of the failed intervals, lowest first, at most ``limit``."""
        out = [(lo, hi - lo, err) for (_, err, _), ranges in self._failures.items() for lo, hi in ranges]
        out.sort()
        return out[:limit]

    # ------------------------------------------------------------------ settling
    def settle(self, segments: Sequence[list[int]], error: LoadError | None, reason: str = "",
               ordered_length: int | None = None) -> None:
        """Segments are loaded (or failed): update the sets and the waiters.
        ``ordered_length``: they are known to be in memory order, this many bytes."""
        inflight = self.inflight
        dest = self._destination
        failures: RangeSet | None = None
        if error is not None:
            key = (error.code, error.errno or 0, reason)
            failures = self._failures.get(key)
            if failures is None:
                failures = self._failures[key] = RangeSet()
        if ordered_length is None and len(segments) > 1 \
                and any(segments[k][0] < segments[k - 1][1] for k in range(1, len(segments))):
            # (a sweep read that follows a pages file laid out working set first can go
            # back in memory; the hash thread hands chunks back in the order they landed)
            segments = sorted(segments)
        many = len(segments) > 8  # a gathered read: the sets edited once, waiters found by bisection
        first, last = segments[0][0], segments[-1][1]
        length = 0
        if many and failures is None and not self._order_loaded and not dest.needs_commit \
                and not self.listeners:
            length = sum(hi - lo for lo, hi in segments) if ordered_length is None else ordered_length
            if inflight.overlap_bytes(first, last) == length:  # nothing else in flight among them
                inflight.remove(first, last)
            else:
                for lo, hi in segments:
                    inflight.remove(lo, hi)
            self.loaded_bytes += length
        else:
            for lo, hi in segments:
                inflight.remove(lo, hi)
                if failures is None:
                    self.loaded_bytes += hi - lo
                    if self._order_loaded is not None:
                        self._order_loaded(lo, hi)
                    if dest.needs_commit:
                        dest.commit(lo, hi - lo)
                    for listener in self.listeners:
                        listener(lo, hi)
                else:
                    self.failed.add(lo, hi)
                    failures.add(lo, hi)
        if self.waiters:
            finished: list[WaitHandle] | None = None  # allocated only when someone is done
            starts: list[int] | None = None  # (made for the first waiter among a gathered read's segments)
            for w in self.waiters:
                if w.hi <= first or w.lo >= last:
                    continue
                if many and starts is None:
                    starts = (segments.los.tolist() if isinstance(segments, Segs)
                              else list(map(itemgetter(0), segments)))
                got = 0
                k = max(0, bisect_right(starts, w.lo) - 1) if starts is not None else 0
                for lo, hi in segments[k:] if starts is not None else segments:
                    if lo >= w.hi:
                        break
                    if hi > w.lo:
                        got += min(hi, w.hi) - max(lo, w.lo)
                if not got:
                    continue
                w.remaining -= got
                if error is not None and w.error is None:
                    w.error = error
                if w.remaining <= 0 or w.error is not None:
                    if finished is None:
                        finished = []
                    finished.append(w)
            if finished:
                now = time.perf_counter_ns()
                for w in finished:
                    self.finish_waiter(w, now)
        self.check_done()

    def check_done(self) -> None:
        """Set ``done`` once nothing is left to start and nothing is in flight."""
        if not self.inflight and self._window.drained() and not self.done.is_set():
            self.finished_ns = time.perf_counter_ns()
            self.done.set()
