"""Recording and replaying working sets (REAP / FaaSnap style).

A :class:`WorkingSetRecorder` is hooked into the loader (``Loader.recorder``: every
wait, and every userfaultfd fault, calls ``touched(lo, hi)``); recordings are merged
across runs with :func:`merge_working_sets`, and replayed by turning one into a
:class:`~loader.WorkingSetOrder` (:func:`replay_order`): the sweep loads it first, in
first-touch order, as a few large reads.  The record and its file are in
:mod:`loader.core._workingset`.
"""

from __future__ import annotations

import statistics
import time
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from typing import Protocol

import trio

from ._identity import CheckpointIdentity
from ._layout import Layout
from ._rangeset import RangeSet
from ._sweep import SweepOrder, WorkingSetOrder
from ._workingset import WorkingSet, check_identity

__all__ = [
    "REPLAY_BATCH",
    "REPLAY_GAP",
    "AccessRecorder",
    "WorkingSetRecorder",
    "chunk_hull",
    "merge_working_sets",
    "replay_order",
    "replay_plan",
]

#: replay: ranges within this many bytes of each other in first-touch order may merge
REPLAY_BATCH = 8 << 20
#: replay: ranges closer than this in memory (inside a batch) are read as one
REPLAY_GAP = 64 << 10


class AccessRecorder(Protocol):
    """What the loader calls when memory is touched: a wait is submitted (and, in
    userfaultfd mode, a fault arrives).  Must be cheap: it is on the wait path."""

    def touched(self, lo: int, hi: int) -> None:
        """Page-aligned memory ``[lo, hi)`` was touched now."""
        ...


# --------------------------------------------------------------------------- recording
class WorkingSetRecorder:
    """Records first touches while ``active``: each page once, at its first touch,
    appended in touch order; a touch adjacent to the previous range extends it.

    Cost per touch: a few bisects on the set of pages seen (merged intervals)."""

    __slots__ = ("identity", "seen", "offset", "length", "first_touch_us", "active", "t0_ns", "ended_ns",
                 "touches", "closed", "replaces")

    def __init__(self, identity: CheckpointIdentity) -> None:
        self.identity = identity
        self.seen = RangeSet()
        self.offset = array("Q")
        self.length = array("Q")
        self.first_touch_us = array("Q")
        self.active = False
        self.t0_ns = 0
        self.ended_ns: int | None = None
        self.touches = 0
        self.closed = trio.Event()  #: set when the window closes (``stop``: its end, or a ``mark``)
        #: the file the daemon may replace with the recording (``write_working_set``'s ``replaces``)
        self.replaces: tuple[int, int] | None = None

    def start(self, now_ns: int | None = None) -> None:
        """Open the window (the daemon does it at READY): times count from here."""
        self.t0_ns = time.perf_counter_ns() if now_ns is None else now_ns
        self.active = True

    def stop(self, now_ns: int | None = None) -> WorkingSet:
        """Close the window; later touches are ignored.  Returns what was recorded."""
        if self.active:
            self.active = False
            self.ended_ns = time.perf_counter_ns() if now_ns is None else now_ns
            self.closed.set()
        return self.working_set()

    def working_set(self) -> WorkingSet:
        end = self.ended_ns if self.ended_ns is not None else time.perf_counter_ns()
        return WorkingSet(self.identity, array("Q", self.offset), array("Q", self.length),
                          array("Q", self.first_touch_us), 1, max(0.0, (end - self.t0_ns) / 1e9))

    def touched(self, lo: int, hi: int) -> None:
        if not self.active or lo >= hi:
            return
        self.touches += 1
        seen = self.seen
        covered = seen.overlap_bytes(lo, hi)
        if covered == hi - lo:
            return
        t_us = max(0, (time.perf_counter_ns() - self.t0_ns) // 1000)
        pos = lo
        if covered:
            for a, b in list(seen.overlapping(lo, hi)):
                if a > pos:
                    self._append(pos, a, t_us)
                pos = b
        if pos < hi:
            self._append(pos, hi, t_us)
        seen.add(lo, hi)

    def _append(self, lo: int, hi: int, t_us: int) -> None:
        n = len(self.offset)
        if n and self.offset[n - 1] + self.length[n - 1] == lo:
            self.length[n - 1] += hi - lo
        else:
            self.offset.append(lo)
            self.length.append(hi - lo)
            self.first_touch_us.append(t_us)


# --------------------------------------------------------------------------- replay
def replay_plan(ws: WorkingSet, layout: Layout, batch: int = REPLAY_BATCH,
                gap: int = REPLAY_GAP) -> tuple[array[int], array[int]]:
    """The spans to read, in first-touch order.  Within each batch of ``batch`` bytes
    (in first-touch order), ranges closer than ``gap`` in memory merge into one span
    (the gap is read too: a few pages more buy one large read instead of several),
    which takes the place of its earliest range.  Spans are clipped to the memory
    size; holes inside them cost nothing."""
    lo_col, hi_col = array("Q"), array("Q")
    pending: list[tuple[int, int, int]] = []  # (lo, hi, rank in first-touch order), one batch
    in_batch = 0
    size = layout.memory_size

    def flush() -> None:
        pending.sort()
        groups: list[tuple[int, int, int]] = []  # (first rank, lo, hi)
        cur_lo, cur_hi, rank = pending[0]
        for a, b, r in pending[1:]:
            if a <= cur_hi + gap:
                cur_hi, rank = max(cur_hi, b), min(rank, r)
            else:
                groups.append((rank, cur_lo, cur_hi))
                cur_lo, cur_hi, rank = a, b, r
        groups.append((rank, cur_lo, cur_hi))
        groups.sort()
        for _, a, b in groups:
            lo_col.append(a)
            hi_col.append(b)
        pending.clear()

    for rank, (o, n) in enumerate(zip(ws.offset, ws.length)):
        end = min(o + n, size)
        if end <= o:
            continue
        pending.append((o, end, rank))
        in_batch += end - o
        if in_batch >= batch:
            flush()
            in_batch = 0
    if pending:
        flush()
    return lo_col, hi_col


def chunk_hull(layout: Layout, lo: int, hi: int, chunk_size: int) -> tuple[int, int]:
    """The memory of the whole checksum chunks that memory [lo, hi)'s data is in (for a
    layout whose pages-file offsets ascend with memory, as the loader verifies them)."""
    first = layout.first_at_or_after(lo)
    last = bisect_right(layout.mem_pages, (hi - 1) >> layout.shift) - 1
    if first >= len(layout) or last < first:
        return lo, hi
    mem, end_at, file = layout.mem_at, layout.end_at, layout.file_at
    k0 = (file(first) + max(lo, mem(first)) - mem(first)) // chunk_size
    k1 = (file(last) + min(hi, end_at(last)) - 1 - mem(last)) // chunk_size
    n = len(layout)
    end = file(n - 1) + layout.length_at(n - 1)

    def memory_at(f: int, after: bool) -> int:
        i = bisect_right(layout.file_pages, f >> layout.shift) - 1
        if i >= 0 and f < file(i) + layout.length_at(i):
            return mem(i) + f - file(i)
        return mem(i + 1) if after and i + 1 < n else end_at(i)

    return min(lo, memory_at(k0 * chunk_size, True)), max(hi, memory_at(min((k1 + 1) * chunk_size, end) - 1, False) + 1)


def replay_order(ws: WorkingSet, layout: Layout, fallback: SweepOrder | None = None, *,
                 batch: int = REPLAY_BATCH, gap: int = REPLAY_GAP, chunk_size: int | None = None) -> WorkingSetOrder:
    """A :class:`~loader.WorkingSetOrder` loading ``ws`` first, then ``fallback``'s order.

    With ``chunk_size`` (the loader verifies checksum chunks, and serves a page only
    once its whole chunk is verified), each span grows to whole chunks."""
    lo, hi = replay_plan(ws, layout, batch, gap)
    if chunk_size:
        for i in range(len(lo)):
            lo[i], hi[i] = chunk_hull(layout, lo[i], hi[i], chunk_size)
    members = ws.members()
    data = sum(y - x for a, b in members for x, y in layout.data_in(a, b))  # holes never load
    return WorkingSetOrder(lo, hi, members, size_bytes=data, ranges=len(ws), fallback=fallback)


# --------------------------------------------------------------------------- merging
def merge_working_sets(sets: Sequence[WorkingSet], names: Sequence[str] | None = None) -> WorkingSet:
    """The union of several recordings of one checkpoint, ordered by each piece's
    median first touch over the recordings that touched it.

    Cost: O(R log R) in the total number of ranges R; pieces are cut only where a
    range of some recording starts or ends, never per page.  Raises
    :class:`WorkingSetError` if the sets belong to different checkpoints."""
    if not sets:
        raise ValueError("nothing to merge")
    names = list(names or [f"working set {i}" for i in range(len(sets))])
    first = sets[0].identity
    for ws, name in zip(sets[1:], names[1:]):
        check_identity(ws, first, name)
    # per recording: its ranges sorted by offset (index arrays), for bisecting
    sorted_sets: list[tuple[array[int], array[int], array[int]]] = []
    bounds: set[int] = set()
    for ws in sets:
        order = sorted(range(len(ws)), key=ws.offset.__getitem__)
        offs = array("Q", (ws.offset[i] for i in order))
        ends = array("Q", (ws.offset[i] + ws.length[i] for i in order))
        times = array("Q", (ws.first_touch_us[i] for i in order))
        sorted_sets.append((offs, ends, times))
        bounds.update(offs)
        bounds.update(ends)
    cuts = sorted(bounds)
    pieces_lo, pieces_hi, pieces_t = array("Q"), array("Q"), array("Q")
    for a, b in zip(cuts, cuts[1:]):
        touches = []
        for offs, ends, times in sorted_sets:
            i = bisect_right(offs, a) - 1
            if i >= 0 and a < ends[i]:
                touches.append(times[i])
        if not touches:
            continue
        t = int(statistics.median_low(touches))
        if pieces_hi and pieces_hi[-1] == a and pieces_t[-1] == t:
            pieces_hi[-1] = b
        else:
            pieces_lo.append(a)
            pieces_hi.append(b)
            pieces_t.append(t)
    order = sorted(range(len(pieces_lo)), key=lambda i: (pieces_t[i], pieces_lo[i]))
    out = WorkingSet(first, array("Q"), array("Q"), array("Q"),
                     sum(ws.recordings for ws in sets), max(ws.window_s for ws in sets))
    for i in order:
        lo, hi, t = pieces_lo[i], pieces_hi[i], pieces_t[i]
        n = len(out.offset)
        if n and out.offset[n - 1] + out.length[n - 1] == lo:
            out.length[n - 1] += hi - lo
        else:
            out.offset.append(lo)
            out.length.append(hi - lo)
            out.first_touch_us.append(t)
    return out
