"""The window: the part of the source's data the loader's sets hold (docs/DESIGN.md,
"Millions of ranges").

``unloaded`` holds the data below :attr:`Window.frontier` that no read has started,
taken from an :class:`ExtentSource` a batch at a time as the sweep goes (the
layout's columns; or a raw image's file system, scanned in a worker thread), plus
what waits and hints beyond it asked for (``beyond``: the source is asked about that
one place).  So the loader is ready at once, and the sets cost what the window
holds, not a Python object (nor 16 bytes) per range of the image.
"""

from __future__ import annotations

import logging
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator

import trio

from ._config import LoopState
from ._extents import ExtentSource
from ._rangeset import RangeSet, gaps

log = logging.getLogger("pageload")

#: extents taken from the source per batch; the window is refilled below the low
#: mark and not beyond the high one (intervals of ``unloaded``: 16 bytes each)
_BATCH_EXTENTS = 1 << 16
_WINDOW_LOW = 1 << 14
_WINDOW_HIGH = 1 << 18


class Window:
    """Feeds ``unloaded`` from ``extents``: a batch when it runs low (:meth:`refill`;
    a blocking source's batches in a worker thread, :meth:`scan`), one place at a time
    for a wait or hint past the frontier (:meth:`look_up`).  Holes found on the way
    make ``total_bytes`` exact once the source is done, and are told to the loaded
    ``listeners`` as loaded (zero) memory.  ``whole``: take every batch now (an order
    that may start anywhere, as working-set replay does, sees every range)."""

    def __init__(self, extents: ExtentSource, unloaded: RangeSet, memory_size: int, data_bytes: int,
                 state: LoopState, listeners: list[Callable[[int, int], None]], *,
                 poke: Callable[[], None], check_done: Callable[[], None], whole: bool) -> None:
        self.extents = extents
        self.unloaded = unloaded
        self.memory_size = memory_size
        self.frontier = 0  #: the data below this offset is in the sets (or loaded)
        self.beyond = RangeSet()  #: spans past the frontier already looked up (waits, hints)
        self._state = state
        self._listeners = listeners
        self._poke = poke
        self._check_done = check_done
        self._scan_wanted = trio.Event()  #: a blocking source's batch is wanted
        self._hole_bytes = 0  #: holes found by a source without an exact total
        #: data bytes to load: the layout's; with a source that has not found the holes
        #: yet, the memory less the holes found so far (exact once the scan is done)
        self.total_bytes = data_bytes if extents.exact_total else memory_size
        if whole:
            while not extents.done:
                self._take_batch(*extents.next_batch(_BATCH_EXTENTS))
        elif not extents.blocking:
            self._take_batch(*extents.next_batch(_BATCH_EXTENTS))

    @property
    def scans(self) -> bool:
        """Whether the source's batches are to be taken by :meth:`scan`, in a task."""
        return self.extents.blocking and not self.extents.done

    @property
    def scanned_bytes(self) -> int:
        """How far the source has been asked (all of it when its total was exact)."""
        return self.memory_size if self.extents.exact_total else self.frontier

    def drained(self) -> bool:
        """Nothing is left to start: every batch taken, and taken up."""
        # (the frontier, not the source's own offset: a batch in a worker thread moves that
        # before the batch is in the sets)
        return not self.unloaded and self.frontier >= self.memory_size

    def unknown(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """The parts of memory [lo, hi) past the frontier that nobody looked up: not
        known to be data or holes yet."""
        start = max(lo, self.frontier)
        if start < hi:
            yield from gaps(self.beyond.overlapping(start, hi), start, hi)

    def _take_batch(self, starts: array[int], ends: array[int]) -> None:
        """Put a batch of the source's extents into ``unloaded``: the parts between the
        old frontier and the source's new offset that no wait or hint looked up already."""
        old = self.frontier
        new = self.memory_size if self.extents.done else max(self.extents.offset, ends[-1] if ends else 0)
        if starts and starts[0] < old:  # the first extent reaches back into the window
            if ends[0] <= old:
                starts, ends = starts[1:], ends[1:]
            else:
                starts = array("Q", starts)
                starts[0] = old
        looked_up = list(self.beyond.overlapping(old, new)) if self.beyond else []
        if not looked_up:
            self.unloaded.insert_sorted(starts, ends)
            data = sum(ends) - sum(starts)
        else:
            data = 0
            for a, b in gaps(looked_up, old, new):  # nothing of unloaded lies there: in bulk
                i = bisect_right(ends, a)
                j = bisect_right(starts, b - 1)
                if i >= j:
                    continue
                s, e = starts[i:j], ends[i:j]
                s[0], e[-1] = max(a, s[0]), min(b, e[-1])
                self.unloaded.insert_sorted(s, e)
                data += sum(e) - sum(s)
            self.beyond.remove(old, new)
        self.frontier = new
        if not self.extents.exact_total:
            fresh = new - old - sum(b - a for a, b in looked_up)
            self._found_holes(fresh - data, old, new, starts, ends, looked_up)

    def _found_holes(self, nbytes: int, lo: int, hi: int, starts: array[int], ends: array[int],
                     looked_up: list[tuple[int, int]]) -> None:
        """``nbytes`` of [lo, hi) turned out to be holes: less to load; and loaded (zero)
        for the listeners (the loaded map)."""
        self._hole_bytes += nbytes
        self.total_bytes -= nbytes
        if self._listeners and nbytes:
            data = zip(starts, ends)
            for a, b in gaps(sorted([*looked_up, *data]), lo, hi):
                for listener in self._listeners:
                    listener(a, b)

    def fresh(self, lo: int, hi: int) -> bool:
        """Whether memory [lo, hi) lies wholly past the frontier, where nobody looked
        yet, in a source that knows its data without I/O (a layout): its data is then
        unstarted and in no set, and :meth:`looked_up` may stand for :meth:`look_up`
        once it is loaded some other way (a verified wait's chunk, read at once)."""
        extents = self.extents
        return (lo >= self.frontier and extents.exact_total and not extents.blocking
                and not (self.beyond and self.beyond.overlap_bytes(lo, hi)))

    def looked_up(self, lo: int, hi: int) -> tuple[int, int]:
        """[lo, hi), :meth:`fresh`, is being loaded by its waiter: no batch is to give
        its data out again.  Marked with the holes on either side (nothing to load
        there), so that neighbours looked up so merge: a scattered image's chunks are
        apart by holes, and thousands of waits ahead of the sweep would otherwise keep
        an interval each.  Returns what was marked (for :meth:`unlook`)."""
        widened = getattr(self.extents, "widened", None)
        if widened is not None:
            lo, hi = widened(lo, hi)
            lo = max(lo, self.frontier)
        self.beyond.add(lo, hi)
        return lo, hi

    def unlook(self, lo: int, hi: int) -> None:
        """Undo :meth:`looked_up` (its waiter could not load it so): fresh again (the
        holes around it unknown again, as far as the loaded map can tell: never wrong)."""
        self.beyond.remove(lo, hi)

    def look_up(self, lo: int, hi: int) -> None:
        """A wait or hint reaches past the frontier: ask the source about [lo, hi) now,
        and put the data there that nobody looked up before into ``unloaded``."""
        lo = max(lo, self.frontier)
        if lo >= hi:
            return
        fresh = list(gaps(self.beyond.overlapping(lo, hi), lo, hi)) if self.beyond else [(lo, hi)]
        if not fresh:
            return
        extents = self.extents
        for a, b in fresh:
            try:
                found = extents.probe(a, b)
            except OSError as exc:
                found = [(a, b)]  # cannot tell: read it all (holes read as zero)
                log.warning("looking up the data in %#x-%#x failed (%s); reading it whole", a, b, exc)
            s = array("Q", [x for x, _ in found])
            e = array("Q", [y for _, y in found])
            # nothing of unloaded lies in a place nobody looked up: in bulk (a scattered
            # chunk's four pages were four additions)
            self.unloaded.insert_sorted(s, e)
            data = sum(e) - sum(s)
            self.beyond.add(a, b)
            if not extents.exact_total:
                self._found_holes(b - a - data, a, b, s, e, [])

    def refill(self, force: bool = False) -> bool:
        """Take another batch when the window runs low (``force``: it ran dry); a
        blocking source's batch is asked of the scan task.  True if one was taken now."""
        extents = self.extents
        if extents.done or (not force and len(self.unloaded) >= _WINDOW_LOW):
            return False
        if extents.blocking:
            self._scan_wanted.set()
            return False
        before = len(self.unloaded)
        while not extents.done and len(self.unloaded) < _WINDOW_LOW:
            self._take_batch(*extents.next_batch(_BATCH_EXTENTS))  # (a batch of looked-up data adds nothing)
        self._check_done()
        return len(self.unloaded) > before

    async def scan(self) -> None:
        """Takes a blocking source's batches in a worker thread, ahead of the sweep,
        while the window holds fewer than ``_WINDOW_HIGH`` intervals."""
        extents = self.extents
        while not extents.done and not self._state.closing:
            if len(self.unloaded) >= _WINDOW_HIGH:
                self._scan_wanted = trio.Event()
                await self._scan_wanted.wait()
                continue
            try:
                batch = await trio.to_thread.run_sync(extents.next_batch, _BATCH_EXTENTS)
            except OSError as exc:
                # holes unknown past here: the rest is read whole (holes read as zero)
                log.warning("finding the holes failed at %#x (%s); reading the rest of the image whole",
                            extents.offset, exc.strerror or exc)
                extents.offset = self.memory_size
                self._take_batch(array("Q", [self.frontier]), array("Q", [self.memory_size]))
                break
            self._take_batch(*batch)
            self._poke()
        self._check_done()
        self._poke()
