"""What the page-fault handler's threads hand each other (docs/UFFD.md "Threads").

* :class:`Shared`: the state shared under one lock (``lock``) by the fault thread,
  the fill thread and the trio thread -- the loaded bytes not yet copied, the fill
  queue, the loader's answers to waits, what is to be merged into the loader's
  counts -- and the hand-offs between threads: :meth:`Shared.wake` (the eventfd the
  fault thread polls, the fill thread's kick) and :meth:`Shared.call_trio`.
* :class:`Guest`: guest memory as the VMM's events describe it (regions, removed
  ranges), written by the fault thread only, read by the fill thread under
  ``copy_lock``.
* :class:`TrioSide`: what the fault and fill threads ask of the trio thread.

Plain flags stored by one thread and loaded by another (``woken``, ``want_sync``,
``want_read``, ``last_fault_ns``, ``regions``, ``removed_gen``) are requests or
notes, not modes: each is one attribute store and one load, as before the split.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Any, Protocol

import trio

from ..core._config import LoadError
from ..core._rangeset import RangeSet
from ..core._stats import LatencyHistogram
from ._handshake import Region

log = logging.getLogger("pageload")


class TrioSide(Protocol):
    """The trio thread's part, called there with :meth:`Shared.call_trio`."""

    def _submit_wait(self, r: Region, va: int, start_ns: int) -> None: ...
    def _merge(self) -> None: ...
    def _kick_merge(self) -> None: ...
    def _set_synced(self) -> None: ...
    def _set_finished(self) -> None: ...


class Shared:
    """Shared by the threads under :attr:`lock` (the hand-offs excepted: see the
    module doc).  Owned by no thread: each field says who writes it."""

    def __init__(self, regions: list[Region]) -> None:
        self.lock = threading.Lock()
        # under lock
        self.pending = RangeSet()  #: loaded, not yet copied into guest memory (trio adds, the copies take)
        self.fill_queue: deque[list[int]] = deque()  #: [lo, hi] ranges the fill copies, in order
        #: the loader's answers to faults' waits (trio appends, the fault thread takes)
        self.answers: deque[tuple[Region, int, int, LoadError | None]] = deque()
        self.for_loader = 0  #: faults answered without the loader, to add to its wait counts
        self.touched: list[tuple[int, int]] = []  #: their pages, for a working-set recorder
        self.hints: list[tuple[int, int]] = []  #: windows to prefetch
        self.merge_scheduled = False  #: a merge at once (for a hint) is scheduled
        self.merge_later = False  #: the merge task was kicked: it merges after merge_interval_s
        #: what faults put into guest memory (a fill from the source skips it: not copied again)
        self.installed = RangeSet()
        self.histogram = LatencyHistogram()  #: the faults' latency (the answerers record it)
        self.covered = RangeSet((r.offset, r.offset + r.size) for r in regions)  #: never changes
        # hand-offs
        self.token: trio.lowlevel.TrioToken | None = None  #: the trio run's, once the handler runs
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  #: the fault thread polls it
        self.woken = False  #: wake_fd was written and not read yet (the fault thread's spin stops for it)
        self.fill_kick = threading.Event()  #: the fill thread waits on it when it has nothing to do
        self.want_sync = False  #: the trio thread asks for one pass of the fault thread (drain)

    def wake(self) -> None:
        """Any thread: wake the fault thread (and the fill thread)."""
        self.fill_kick.set()
        self.woken = True  # (ends the fault thread's spin; it clears this before reading the eventfd)
        if self.wake_fd < 0:
            return
        try:
            os.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass

    def call_trio(self, fn: Any, *args: Any) -> None:
        """From the fault or fill thread: run ``fn(*args)`` in the trio thread soon."""
        token = self.token
        if token is None:
            return
        try:
            token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass


class Guest:
    """Guest memory as the VMM's events describe it: written by the fault thread only
    (:meth:`remove`, :meth:`remap`), read by the fill thread under :attr:`copy_lock`."""

    def __init__(self, regions: list[Region], shared: Shared) -> None:
        #: sorted by address; replaced whole by a remap (one store: readers see the old or the new list)
        self.regions = list(regions)
        self.shared = shared
        self.removed = RangeSet()  #: memory offsets removed/unmapped by the VMM (changed under copy_lock)
        #: held by the fill thread around each copy and by the fault thread around
        #: reading the userfaultfd and recording removals: the kernel zaps a removed
        #: range as soon as its event is read, so no fill copy may run between the
        #: read and the recording (docs/UFFD.md "Events")
        self.copy_lock = threading.Lock()
        self.want_read = False  #: the fault thread waits for copy_lock: the fill lets it in
        self.removed_gen = 0  #: counts removals and remaps (changed under copy_lock, but remaps)
        self.last_fault_ns = -(1 << 62)  #: when the fault thread last read messages (never: long ago)

    def region(self, address: int) -> Region | None:
        for r in self.regions:
            if r.base <= address < r.end:
                return r
        return None

    def region_at(self, offset: int) -> Region | None:
        for r in self.regions:
            if r.offset <= offset < r.offset + r.size:
                return r
        return None

    def remove(self, start: int, end: int) -> None:
        """The VMM dropped ``[start, end)`` (balloon, MADV_DONTNEED, munmap): never copy
        there again; a later fault gets a zero page, as a fresh anonymous page would."""
        for r in self.regions:
            a, b = max(start, r.base), min(end, r.end)
            if a < b:
                lo, hi = r.offset + (a - r.base), r.offset + (b - r.base)
                self.removed.add(lo, hi)
                self.removed_gen += 1
                with self.shared.lock:
                    self.shared.pending.remove(lo, hi)

    def remap(self, old: int, new: int, length: int) -> None:
        """mremap moved ``[old, old+length)`` to ``new``: the image offsets go with it."""
        out: list[Region] = []
        for r in self.regions:
            a, b = max(old, r.base), min(old + length, r.end)
            if a >= b:
                out.append(r)
                continue
            if r.base < a:
                out.append(Region(r.base, a - r.base, r.offset, r.page_size))
            out.append(Region(new + (a - old), b - a, r.offset + (a - r.base), r.page_size))
            if b < r.end:
                out.append(Region(b, r.end - b, r.offset + (b - r.base), r.page_size))
        out.sort(key=lambda r: r.base)
        self.regions = out
        self.removed_gen += 1
