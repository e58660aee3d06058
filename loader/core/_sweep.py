"""Where the background sweep reads next: the :class:`SweepOrder` interface and
its default, :class:`SequentialOrder` (the pages file's order).

An order sees only the set of unstarted memory offsets and the ends of served
waits; it never issues I/O.  Working-set replay plugs in here.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ._rangeset import RangeSet


@dataclass(frozen=True, slots=True)
class OrderHooks:
    """What else an order wants to be told or asked, each optional (None: nothing;
    the loader then skips the call on its hot paths): ``limit_for(start)``, where a
    sweep read from ``start`` must stop (None: anywhere); ``note_wait(lo, hi,
    blocked_bytes)``, a wait was submitted; ``note_loaded(lo, hi)``, memory landed;
    ``wants_full_width()``, whether the sweep keeps its full width while clients wait."""

    limit_for: Callable[[int], int | None] | None = None
    note_wait: Callable[[int, int, int], None] | None = None
    note_loaded: Callable[[int, int], None] | None = None
    wants_full_width: Callable[[], bool] | None = None


class SweepOrder(Protocol):
    """Decides where the background sweep reads next (pluggable: working-set replay)."""

    def next_start(self, unloaded: RangeSet) -> int | None:
        """Memory offset of the next unstarted byte to read, or None when nothing is left."""
        ...

    def note_served(self, end: int) -> None:
        """A waiter's read ended at ``end``: continue near it (spatial locality)."""
        ...

    def hooks(self) -> OrderHooks:
        """The optional calls this order takes (asked once, when the loader starts)."""
        ...


class SequentialOrder:
    """Ascending memory order (the pages file's order), jumping to just after each
    served wait and wrapping around to pick up what was skipped."""

    __slots__ = ("cursor",)

    def __init__(self) -> None:
        self.cursor = 0

    def next_start(self, unloaded: RangeSet) -> int | None:
        nxt = unloaded.first_at_or_after(self.cursor)
        if nxt is None:
            nxt = unloaded.first_at_or_after(0)
            if nxt is None:
                return None
        self.cursor = nxt[0]
        return nxt[0]

    def note_served(self, end: int) -> None:
        self.cursor = end

    def hooks(self) -> OrderHooks:
        return OrderHooks()


class WorkingSetOrder:
    """Working-set replay (REAP / FaaSnap): the recorded working set first, in
    first-touch order, then ``fallback`` (default :class:`SequentialOrder`).

    ``span_lo``/``span_hi`` are the memory spans to read, in order (built by
    ``loader.core._replay.replay_plan``); ``members`` is the working set's data as
    merged intervals (holes included).  Besides :class:`SweepOrder`, it offers the loader's
    optional hooks: :meth:`limit_for` (a sweep read must stop at the span's end),
    :meth:`wants_full_width` (no shrinking of the sweep while replaying),
    :meth:`note_wait` and :meth:`note_loaded` (its statistics: bytes loaded, waits
    that hit what it had loaded, waits on its pages that came too early, waits it
    missed).  Memory: the span columns and the member intervals, never per page.
    """

    __slots__ = ("span_lo", "span_hi", "members", "ranges", "fallback", "index", "size_bytes", "loaded_bytes",
                 "waits_hit", "waits_early", "waits_missed", "started_ns", "loaded_ns", "replayed_ns")

    def __init__(self, span_lo: array[int], span_hi: array[int], members: RangeSet, *, size_bytes: int | None = None,
                 ranges: int = 0, fallback: SweepOrder | None = None) -> None:
        self.span_lo = span_lo
        self.span_hi = span_hi
        self.members = members
        self.ranges = ranges
        self.fallback: SweepOrder = fallback or SequentialOrder()
        self.index = 0  #: the span being read
        #: data bytes of the working set (``members`` may include holes, which never load)
        self.size_bytes = members.total if size_bytes is None else size_bytes
        self.loaded_bytes = 0  #: of which loaded (by the sweep or by waits)
        self.waits_hit = 0  #: answered at once, on working-set pages
        self.waits_early = 0  #: blocked on working-set pages not loaded yet
        self.waits_missed = 0  #: blocked on pages outside the working set
        self.started_ns: int | None = None  #: the sweep's first question (the loader started)
        self.loaded_ns: int | None = None  #: when its last byte was loaded
        self.replayed_ns: int | None = None  #: when its last read was issued

    @property
    def replaying(self) -> bool:
        return self.index < len(self.span_lo)

    def next_start(self, unloaded: RangeSet) -> int | None:
        if self.started_ns is None:
            self.started_ns = time.perf_counter_ns()
        los, his = self.span_lo, self.span_hi
        while self.index < len(los):
            i = self.index
            nxt = unloaded.first_at_or_after(los[i])
            if nxt is not None and nxt[0] < his[i]:
                return nxt[0]
            self.index += 1
            if self.index == len(los):
                self.replayed_ns = time.perf_counter_ns()
        return self.fallback.next_start(unloaded)

    def wants_full_width(self) -> bool:
        """While replaying, the sweep keeps its full width even when clients fault:
        these are the pages they are about to fault on (waiters still come first)."""
        return self.index < len(self.span_lo)

    def limit_for(self, start: int) -> int | None:
        """Where a sweep read starting at ``start`` must stop (None: no limit)."""
        if self.index < len(self.span_lo):
            return self.span_hi[self.index]
        return None

    def note_served(self, end: int) -> None:
        self.fallback.note_served(end)  # the working set keeps its order; the rest follows waits

    def note_wait(self, lo: int, hi: int, blocked_bytes: int) -> None:
        inside = self.members.overlap_bytes(lo, hi)
        if blocked_bytes == 0:
            if inside:
                self.waits_hit += 1
        elif inside == hi - lo:  # all of it is working-set memory, just not loaded yet
            self.waits_early += 1
        else:
            self.waits_missed += 1

    def note_loaded(self, lo: int, hi: int) -> None:
        if self.started_ns is None:
            self.started_ns = time.perf_counter_ns()
        if self.loaded_ns is None:
            got = self.members.overlap_bytes(lo, hi)
            if got:
                self.loaded_bytes += got
                if self.loaded_bytes >= self.size_bytes:
                    self.loaded_ns = time.perf_counter_ns()

    def hooks(self) -> OrderHooks:
        return OrderHooks(self.limit_for, self.note_wait, self.note_loaded, self.wants_full_width)

    def statistics(self) -> dict[str, Any]:
        """JSON-able: size, bytes loaded, when, and what the waits found."""
        counted = self.waits_hit + self.waits_early + self.waits_missed
        loaded = self.size_bytes if self.loaded_ns is not None else self.loaded_bytes
        return {
            "ranges": self.ranges,
            "reads_planned": len(self.span_lo),
            "size_bytes": self.size_bytes,
            "loaded_bytes": loaded,
            "loaded_s": None if self.loaded_ns is None or self.started_ns is None
            else (self.loaded_ns - self.started_ns) / 1e9,
            "replaying": self.replaying,
            "waits_hit": self.waits_hit,
            "waits_early": self.waits_early,
            "waits_missed": self.waits_missed,
            "hit_rate": self.waits_hit / counted if counted else None,
        }
