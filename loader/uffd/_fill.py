"""The background fill (docs/UFFD.md "Background fill"): the fill thread copies
guest memory in, in chunks of ``fill_chunk``, each under the copy lock, so the guest
stops faulting once every data byte is in.

* From the source (:attr:`Fill.from_source`: direct copies on, not eager, a raw image
  or 4 KiB pages): the data of every region, the replayed working set's spans first
  (:meth:`Fill.seed_from_source`), a ``fill_span`` at a time, read in before the
  copy lock is taken (:meth:`Fill._direct_fill_span`).
* After the loader otherwise: each range the loader finishes, from the memory file
  (:class:`Copies`, which the fault thread uses too for a loaded fault's window).

Which of the two runs is decided before any thread starts and never changes.  The
fill yields to a faulting guest (:meth:`Fill._yield_to_faults`) and reports the
guest filled once (:meth:`Fill._check_filled`: the state's ``FILL_DONE``).
"""

from __future__ import annotations

import errno as errno_mod
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterator

import trio

from ..core._rangeset import RangeSet, gaps
from ..core._service import PageService
from ._answer import Answerer
from ._config import UffdConfig
from ._handshake import Region
from ._shared import Guest, Shared
from ._source import DirectSource, _data_bytes, _PageCache
from ._state import FILL_DONE, VANISH, HandlerState

log = logging.getLogger("pageload")

_PAGE_MASK = ~(mmap.PAGESIZE - 1)
_READ_AHEAD = 8  #: fill chunks the direct fill asks the kernel to read ahead of its copy


class Copies:
    """Copies of loaded bytes from the memory file into the guest (no state of its own:
    the fault thread and the fill thread each call it with their own answerer)."""

    def __init__(self, loader: PageService, shared: Shared, guest: Guest, src: int, from_source: bool) -> None:
        self.loader = loader
        self.shared = shared
        self.guest = guest
        self.src = src  #: the memory file's address
        self.from_source = from_source  #: a fill from the source skips what these copies installed

    def install(self, answerer: Answerer, lo: int, hi: int) -> bool:
        """Copy the pending bytes of ``[lo, hi)`` into the guest (whole pages of each
        region; a huge page only once all its data is loaded), never into removed
        ranges.  Returns False if the mapping is changing (EAGAIN): try again later."""
        shared = self.shared
        for r in self.guest.regions:
            a, b = max(lo, r.offset), min(hi, r.offset + r.size)
            if a >= b:
                continue
            page = r.page_size
            a &= ~(page - 1)
            b = (b + page - 1) & ~(page - 1)
            pieces = self.take(a, b, page)
            for k, (plo, phi) in enumerate(pieces):
                status = answerer.copy(r.base + (plo - r.offset), self.src + plo, phi - plo, page)
                copied = answerer.copied
                if self.from_source:
                    with shared.lock:
                        shared.installed.add(plo, phi if status != errno_mod.EAGAIN else plo + copied)
                if status == errno_mod.EAGAIN:
                    with shared.lock:  # what is left of this piece, and the pieces after it
                        shared.pending.add(plo + copied, phi)
                        for qlo, qhi in pieces[k + 1:]:
                            shared.pending.add(qlo, qhi)
                    return False
        return True

    def take(self, a: int, b: int, page: int) -> list[tuple[int, int]]:
        """Take out of ``pending`` what of ``[a, b)`` can be copied now: pending pieces
        minus removed ranges (whole huge pages, all of whose data is pending)."""
        out: list[tuple[int, int]] = []
        shared = self.shared
        with shared.lock:
            if page <= self.loader.page_size:
                for plo, phi in list(shared.pending.overlapping(a, b)):
                    plo, phi = max(plo, a), min(phi, b)
                    shared.pending.remove(plo, phi)
                    out.append((plo, phi))
            else:
                for hp in range(a, b, page):
                    have = shared.pending.overlap_bytes(hp, hp + page)
                    if have and have == _data_bytes(self.loader, hp, hp + page):
                        shared.pending.remove(hp, hp + page)
                        out.append((hp, hp + page))
        removed = self.guest.removed
        if not removed:
            return out
        pieces = [p for plo, phi in out for p in gaps(removed.overlapping(plo, phi), plo, phi)]
        if page > self.loader.page_size:  # a huge page goes in whole or not at all
            return [p for p in pieces if p[1] - p[0] == page]
        return pieces


class Fill:
    """The fill thread (:meth:`main`) and what only it touches."""

    def __init__(self, loader: PageService, config: UffdConfig, state: HandlerState, shared: Shared, guest: Guest,
                 direct: DirectSource, copies: Copies, answerer: Answerer, filled: trio.Event,
                 started_ns: int) -> None:
        self.loader = loader
        self.config = config
        self.state = state
        self.shared = shared
        self.guest = guest
        self.direct = direct
        self.copies = copies
        self.answerer = answerer  #: the fill thread's (its own ioctl buffers)
        self.counts = answerer.counts
        self.cache = _PageCache()
        self.from_source = copies.from_source  #: decided before the threads start; never changes
        self.filled = filled  #: the trio thread's, set from here once the guest is filled
        self.started_ns = started_ns
        self.filled_ns: int | None = None  #: when the guest was filled (its own record: reported once)
        self.skipped = 0  #: pages the direct fill could not read (left to faults)
        #: the replayed working set's spans in the direct fill's queue (copied first,
        #: without yielding to faults: they are the pages the guest is about to touch)
        self.working_set = RangeSet()

    def seed_from_source(self, regions: list[Region]) -> None:
        """The direct fill's queue: the data of every region (whole huge pages of a raw
        image, whose holes read as zeros), in the loader's sweep order: the working
        set's spans first, in first-touch order, when the daemon replays one
        (``--working-set``), then the rest in memory order."""
        queue = self.shared.fill_queue
        layout = self.loader.layout
        regions = sorted(regions, key=lambda r: r.offset)
        queued = self.working_set  # what the working set's spans put in the queue
        identity = self.direct.identity

        def data(lo: int, hi: int) -> Iterator[tuple[int, int]]:
            for r in regions:
                for a, b in layout.data_in(max(lo, r.offset), min(hi, r.offset + r.size)):
                    if r.page_size > layout.page_size:
                        a &= ~(r.page_size - 1)
                        b = (b + r.page_size - 1) & ~(r.page_size - 1)
                    yield a, b

        def put(a: int, b: int) -> None:
            if queue and identity and queue[-1][0] <= a <= queue[-1][1]:
                queue[-1][1] = max(queue[-1][1], b)
            else:
                queue.append([a, b])

        for lo, hi in self.loader.replay_spans():
            for a, b in data(lo, hi):
                for ga, gb in gaps(queued.overlapping(a, b), a, b):  # (spans may share huge pages)
                    put(ga, gb)
                    queued.add(ga, gb)
        for a, b in data(0, self.loader.memory_size):
            for ga, gb in gaps(queued.overlapping(a, b), a, b):
                put(ga, gb)

    def main(self) -> None:
        """The fill thread: background copies, one ``fill_chunk`` at a time, each under
        the copy lock; it lets the fault thread in between copies."""
        if self.config.fill_nice:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.fill_nice)
            except OSError:
                pass
        kick = self.shared.fill_kick
        try:
            while self.state.running:
                kick.clear()
                if not self._fill_ready():
                    self._check_filled()
                    kick.wait(0.1)
                    continue
                self._wait_for_reader()
                if not self._replaying():
                    self._yield_to_faults()
                t0 = time.perf_counter_ns()
                if self.from_source:
                    self._direct_fill_span()  # reads the disk first, then takes the copy lock per copy
                else:
                    with self.guest.copy_lock:
                        self._fill_step()
                self.counts.busy_ns += time.perf_counter_ns() - t0
        except Exception:
            log.exception("uffd: the fill thread failed")
            self.state.advance(VANISH)
            self.shared.wake()

    def _copy(self, r: Region, va: int, src: int, length: int) -> int:
        """UFFDIO_COPY from the source (:meth:`Answerer.copy`)."""
        return self.answerer.copy(va, src, length, r.page_size)

    def _replaying(self) -> bool:
        """Is the fill at the replayed working set's spans?  (Those it copies without
        waiting for the guest's faults to pause, as the loader's sweep keeps its
        width while it replays one: every page copied is a fault that never comes.)"""
        if not self.working_set:
            return False
        with self.shared.lock:
            queue = self.shared.fill_queue
            return bool(queue) and self.working_set.contains(queue[0][0])

    def _wait_for_reader(self) -> None:
        """The copy lock is not fair: when the fault thread waits for it, let it in first."""
        guest, state = self.guest, self.state
        while guest.want_read and state.running:
            time.sleep(0.00002)

    def _read_in(self, a: int, b: int, end: int) -> None:
        """Bring the source bytes of memory ``[a, b)`` into the page cache before the
        copy lock is taken, and ask the kernel to read ahead up to ``end`` (at most
        ``_READ_AHEAD`` spans): the copies under the lock then only copy, and a slow
        or hung disk holds up the fill, never the faults (which read their messages
        under that lock).  A page evicted in between is read by the copy itself."""
        src = self.direct.address(a, b - a)
        if src is None:
            return
        lo = src & _PAGE_MASK
        cache = self.cache
        stop = min(end, b + _READ_AHEAD * self.config.fill_span)
        ahead = self.direct.address(b, stop - b) if b < stop else None
        if ahead is not None:  # the next spans: read ahead now, asynchronously
            cache.advise(ahead & _PAGE_MASK, stop - b)
        cache.populate(lo, src + (b - a) - lo)

    def _yield_to_faults(self) -> None:
        """Sleep while faults keep coming (``fill_quiet_s``), at most ``fill_max_wait_s``."""
        quiet = self.config.fill_quiet_s
        if quiet <= 0:
            return
        deadline = time.monotonic() + self.config.fill_max_wait_s
        while self.state.running:
            since = (time.perf_counter_ns() - self.guest.last_fault_ns) / 1e9
            left = min(quiet - since, deadline - time.monotonic())
            if left <= 0:
                return
            time.sleep(left)

    def _fill_ready(self) -> bool:
        state = self.state
        if state.filled and not self.config.fill:
            return False
        if self.config.eager and not state.loaded:
            return False
        return bool(self.shared.fill_queue)

    def _fill_step(self) -> None:
        """One background copy of at most ``fill_chunk`` bytes, at the fill queue's head."""
        chunk = self.config.fill_chunk
        shared = self.shared
        with shared.lock:
            queue = shared.fill_queue
            while queue:
                entry = queue[0]
                nxt = shared.pending.first_at_or_after(entry[0])
                if nxt is None or nxt[0] >= entry[1]:
                    queue.popleft()
                    continue
                a = max(nxt[0], entry[0])
                b = min(nxt[1], entry[1], a + chunk)
                entry[0] = b
                break
            else:
                return
        if not self.copies.install(self.answerer, a, b):
            with shared.lock:  # EAGAIN: the events are read first, then this again
                shared.fill_queue.appendleft([a, b])

    def _direct_fill_span(self) -> None:
        """The direct fill: take the next ``fill_span`` of the queue, read it in, look
        up its removed ranges and the pages faults already put in (skipped), then copy
        it from the source ``fill_chunk`` at a time, each copy under the copy lock.  A
        removal or a remap read while the span is copied (``removed_gen``, changed
        under that lock) puts the rest of the span back, to be looked up again; pages
        put in meanwhile by faults are skipped by the kernel (EEXIST)."""
        shared, guest, state = self.shared, self.guest, self.state
        with shared.lock:
            if not shared.fill_queue:
                return
            entry = shared.fill_queue[0]
            a, end = entry
            r = guest.region_at(a)
            span = self.config.fill_span
            step = span if r is None else max(r.page_size, span - span % r.page_size)  # whole pages
            b = min(end, a + step)
            if r is not None:
                b = min(b, r.offset + r.size)
            entry[0] = b
            if entry[0] >= entry[1]:
                shared.fill_queue.popleft()
        if r is None:
            return
        self._read_in(a, b, end)
        with guest.copy_lock:  # (removals are recorded under it)
            gen = guest.removed_gen
            with shared.lock:
                skip = sorted([*guest.removed.overlapping(a, b), *shared.installed.overlapping(a, b)])
                shared.installed.remove(a, b)  # the fill is past it: forget it
        pieces = list(gaps(skip, a, b))
        page = r.page_size
        chunk = max(page, self.config.fill_chunk - self.config.fill_chunk % page)
        copy_lock = guest.copy_lock
        for k, (plo, phi) in enumerate(pieces):
            if page > self.loader.page_size and (plo % page or phi % page):
                continue  # part of a huge page was removed: it is never copied again
            src = self.direct.address(plo, phi - plo)
            if src is None:  # cannot happen for queued data; leave it to faults
                self.skipped += 1
                continue
            va = r.base + (plo - r.offset)
            at = plo
            while at < phi:
                n = min(chunk, phi - at)
                if guest.want_read:
                    self._wait_for_reader()
                with copy_lock:
                    if guest.removed_gen != gen or not state.running:  # removed or remapped meanwhile: look again
                        status = -1
                        self.counts.relooked += 1
                    else:
                        status = self._copy(r, va + (at - plo), src + (at - plo), n)
                if status == 0 or status == errno_mod.EEXIST:
                    at += n
                    continue
                rest = at
                if status == errno_mod.EAGAIN or status == errno_mod.EFAULT:
                    rest += self.answerer.copied
                    if status == errno_mod.EFAULT:  # that page cannot be read: its fault takes the loader's path
                        self.skipped += 1
                        rest += page
                with shared.lock:  # the rest of this piece and the ones after it, first
                    later = [[qlo, qhi] for qlo, qhi in pieces[k + 1:]]
                    if rest < phi:
                        later.insert(0, [rest, phi])
                    shared.fill_queue.extendleft(reversed(later))
                return

    def _check_filled(self) -> None:
        if self.filled_ns is not None or not (self.config.fill or self.config.eager):
            return
        shared = self.shared
        if self.from_source:
            with shared.lock:
                if shared.fill_queue or self.skipped:
                    return
        else:
            if not self.state.loaded:
                return
            with shared.lock:
                if shared.fill_queue or shared.pending:
                    return
        self.filled_ns = time.perf_counter_ns()  # (its own record: it reports the guest filled once)
        self.state.advance(FILL_DONE)
        log.info("uffd: guest memory filled in %.3f s", (self.filled_ns - self.started_ns) / 1e9)
        shared.call_trio(self.filled.set)
        if self.loader.sweep_held:
            shared.call_trio(self.loader.hold_sweep, False)
        shared.wake()  # the fault thread answers the faults held in eager mode
