"""The fault thread's decisions: which answer for which fault (docs/UFFD.md
"Faults"), in this order:

* a hole or a removed range: a zero page;
* a page already loaded into the memory file: a copy from there, plus the loaded,
  not yet copied bytes around it (``fault_around``);
* a page not loaded yet, when the source has no checksums to verify: a copy straight
  from the source's page cache (a disk thread reads it in first when it is not
  there), then its window from the source and a prefetch hint;
* otherwise: a wait at the head of the loader's queue, made in the trio thread,
  whose answer comes back here (copied, or poisoned after a read error).

:class:`Decisions` is the fault thread's own (its answerer, its page-cache checks,
its retries and held faults); the reading of messages is :mod:`._fault_thread`.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import mmap
from collections import deque

from protocol import codes

from ..core._config import LoadError
from ..core._service import PageService
from . import _ioctl, _source
from ._answer import GONE, Answerer
from ._config import UffdConfig
from ._disk import DiskReads
from ._fill import Copies
from ._handshake import Region
from ._shared import Guest, Shared, TrioSide
from ._source import DirectSource, _address_of_map, _Cachestat, _data_bytes, _has_data, _PageCache
from ._state import VANISH, HandlerState

log = logging.getLogger("pageload")

_PAGE_MASK = ~(mmap.PAGESIZE - 1)


class Decisions:
    """Which answer for which fault (module doc); the fault thread's."""

    def __init__(self, loader: PageService, config: UffdConfig, state: HandlerState, shared: Shared, guest: Guest,
                 direct: DirectSource, copies: Copies, answerer: Answerer, trio_side: TrioSide) -> None:
        self.loader = loader
        self.config = config
        self.state = state
        self.shared = shared
        self.guest = guest
        self.direct = direct
        self.copies = copies
        self.answerer = answerer  #: the fault thread's (its own ioctl buffers; its ``retry``: EAGAIN)
        self.counts = answerer.counts
        self.trio_side = trio_side
        self.from_source = copies.from_source  #: the fill copies from the source (never changes)
        self.disk = DiskReads(state, shared, self.counts, loader.read_timeout)
        self.cache = _PageCache(max(config.fault_around, *(r.page_size for r in guest.regions)) // mmap.PAGESIZE)
        self.deferred: list[tuple[int, int]] = []  #: eager mode: faults held until memory is filled
        self._zero_huge: mmap.mmap | None = None
        self._zero_src = 0
        self.fast = self.fast_region()  #: the short path (None: none)
        self._fast_vec = (ctypes.c_ubyte * 1)()  # its mincore vector
        #: its page-cache check where the kernel has cachestat (else mincore)
        local = loader.local_source
        self.fast_cachestat = _Cachestat.open(local.fd) if self.fast is not None and local is not None else None

    def fast_region(self) -> tuple[int, int, int, int] | None:
        """``(base, end, offset, source address)`` of the region whose faults may take
        the short path in :meth:`_fault`: a raw image copied directly from the source,
        4 KiB pages, no eager hold; None when there is none (or several regions)."""
        regions = self.guest.regions
        if self.direct.map is None or not self.direct.identity or self.config.eager or len(regions) != 1:
            return None
        r = regions[0]
        if r.page_size != mmap.PAGESIZE or self.loader.layout.page_size != mmap.PAGESIZE:
            return None
        return r.base, r.end, r.offset, self.direct.base

    def _fault(self, address: int, start_ns: int, from_disk: bool = False) -> None:
        """Answer one fault, or hand it to the trio thread (module doc, in order).
        ``from_disk``: its source page was just read into the page cache by a disk
        thread (copy it directly now, whatever ``mincore`` says)."""
        fast = self.fast
        guest = self.guest
        if fast is not None and not guest.removed and (self.from_source or not self.shared.pending):
            # the short path, for the common case: a data page of a raw image, nothing
            # removed: one copy from the source.  The full path below makes the same
            # choice with more lookups, except for a page loaded but not copied yet,
            # which it copies from the memory file with the loaded bytes around it;
            # the direct fill copies those from the source anyway, so with it the
            # memory file's pending bytes do not matter here (the daemon loads from
            # its start, before the VMM connects: there are always some)
            base, end, offset, source = fast
            if base <= address < end:
                va = address & _PAGE_MASK
                off = offset + (va - base)
                # in the page cache? (cachestat, else mincore, inline: each line costs
                # here; the check is 3-6 us of a fault's p50, the price of never reading
                # the disk here)
                vec = self._fast_vec
                cs = self.fast_cachestat
                if (off + mmap.PAGESIZE <= self.direct.size and self.loader.layout.find(off) >= 0
                        and (cs.page(off) if cs is not None
                             else not _source._mincore(source + off, mmap.PAGESIZE, vec) and vec[0] & 1)):
                    try:
                        self.answerer.ioctl.copy(va, source + off, mmap.PAGESIZE)
                    except _ioctl.UffdError:
                        pass  # EEXIST, EAGAIN, EFAULT, gone: the full path decides
                    else:
                        c = self.counts
                        c.copies += 1
                        c.copied_bytes += mmap.PAGESIZE
                        self._direct_done(off, mmap.PAGESIZE, start_ns)
                        return
        r = guest.region(address)
        if r is None:  # not ours (should not happen): wake it rather than leave it hanging
            log.warning("uffd: fault at %#x outside every region", address)
            self.answerer.wake(address & ~4095, 4096)
            return
        if self.config.eager and not self.state.filled:
            self.deferred.append((address, start_ns))
            return
        page = r.page_size
        va = address & ~(page - 1)
        off = r.offset + (va - r.base)
        layout = self.loader.layout
        if page == layout.page_size:  # one layout page: data or hole, as a whole
            data = layout.find(off) >= 0
        else:
            data = _has_data(self.loader, off, off + page)
        if not data or (guest.removed and guest.removed.overlap_bytes(off, off + page)):
            self.counts.zero += 1
            self._zero(r, va, start_ns)
            return
        loaded = False
        shared = self.shared
        if shared.pending:  # (read without the lock: a page loaded just now is copied directly, or waited for)
            with shared.lock:
                loaded = shared.pending.overlap_bytes(off, off + page) == _data_bytes(self.loader, off, off + page)
        if loaded:
            self.counts.loaded += 1
            self._answer(r, va, start_ns, loader_wait=True)
            return
        src = self.direct.address(off, page)
        if src is not None and not from_disk and not self.cache.cached(src, page):
            if self.disk.read(va, src, page, address, start_ns):
                return  # a disk thread brings the page in; the fault comes back here then
            src = None  # the disk threads are stuck: the loader's path (its reads have deadlines)
        if src is not None:
            status = self._copy(r, va, src, page)
            if status == errno_mod.EAGAIN:
                self.answerer.retry.append((address, start_ns))
                return
            if status != errno_mod.EFAULT:
                if status == errno_mod.EEXIST:
                    self.counts.spurious += 1
                    self.answerer.wake(va, page)
                self._direct_done(off, page, start_ns)
                return
            # the source page cannot be read (EFAULT): the loader's path decides
        shared.call_trio(self.trio_side._submit_wait, r, va, start_ns)

    def _copy(self, r: Region, va: int, src: int, length: int) -> int:
        """UFFDIO_COPY (:meth:`Answerer.copy`: 0, EEXIST, EAGAIN or EFAULT; after the
        last two the answerer's ``copied`` holds the bytes done)."""
        return self.answerer.copy(va, src, length, r.page_size)

    def take_disk_reads(self, stopping: bool = False) -> None:
        """Faults whose page a disk thread read in go on (copied now); those past the
        read deadline are answered as a failed read (poisoned)."""
        ready, late = self.disk.take()
        for address, start_ns, _ in ready:
            self._fault(address, start_ns, from_disk=True)
        for address, start_ns in late:
            r = self.guest.region(address)
            if r is None:
                continue
            if stopping:
                error = LoadError(codes.SHUTTING_DOWN, "the daemon stopped while the source page was read")
            else:
                self.counts.disk_timeouts += 1
                error = LoadError(codes.TIMEOUT, "reading the source page took longer than the read deadline")
            self._fail(r, address & ~(r.page_size - 1), start_ns, error)

    def _direct_done(self, off: int, page: int, start_ns: int) -> None:
        """The bookkeeping after a direct copy answered a fault at memory ``off``."""
        self.counts.direct += 1
        if self.from_source:
            with self.shared.lock:
                self.shared.installed.add(off, off + page)
        self.answerer.record(start_ns)
        # the hint loads the memory file sooner; the direct fill covers the guest
        # anyway, and the loader's reads would only take CPU from the guest then
        hint = 0 if self.from_source else self.config.hint_around
        window = (off & ~(hint - 1), min((off & ~(hint - 1)) + hint, self.loader.memory_size)) \
            if hint >= page else None
        self._for_trio(off, off + page, window)
        if self.config.fault_around > page:
            self._around_from_source(off, page)

    def _around_from_source(self, off: int, page: int) -> None:
        """After a direct copy (the vCPU is already woken): copy the rest of the aligned
        ``fault_around`` window around memory ``off`` from the source too, so that its
        neighbours never fault -- only data, only what is in the page cache (never a
        disk read here), never a removed range; pages already there are skipped."""
        window = self.config.fault_around
        r = self.guest.region_at(off)
        if r is None or r.page_size != page:
            return
        wlo = max(off & ~(window - 1), r.offset)
        whi = min(wlo + window, r.offset + r.size)
        cache = self.cache
        removed = self.guest.removed
        for a, b in ((wlo, off), (off + page, whi)):
            for da, db in self.loader.layout.data_in(a, b):
                if removed and removed.overlap_bytes(da, db):
                    continue
                src = self.direct.address(da, db - da)
                if src is None or not cache.cached(src, db - da):
                    continue
                status = self._copy(r, r.base + (da - r.offset), src, db - da)
                if status == 0 or status == errno_mod.EEXIST:
                    self.counts.around_bytes += db - da
                    if self.from_source:
                        with self.shared.lock:
                            self.shared.installed.add(da, db)

    def _for_trio(self, lo: int, hi: int, hint: tuple[int, int] | None) -> None:
        """A fault answered here counts as an immediate wait of the loader (and a touch
        for the working-set recorder); ``hint``: a window to prefetch."""
        shared = self.shared
        with shared.lock:
            shared.for_loader += 1
            if self.loader.recorder is not None:
                shared.touched.append((lo, hi))
            if hint is None:  # counts and touches: merged merge_interval_s from the first
                if shared.merge_later or shared.merge_scheduled:
                    return
                shared.merge_later = True
                later = True
            else:
                shared.hints.append(hint)
                if shared.merge_scheduled:
                    return
                shared.merge_scheduled = True
                later = False
        shared.call_trio(self.trio_side._kick_merge if later else self.trio_side._merge)  # a hint goes now

    def take_answers(self) -> None:
        """Answer the faults whose loader waits finished (trio thread's answers)."""
        shared = self.shared
        with shared.lock:
            if not shared.answers:
                return
            answers, shared.answers = shared.answers, deque()
        for r, va, start_ns, error in answers:
            if self.state.gone:
                return
            off = r.offset + (va - r.base)
            if error is not None:
                self._fail(r, va, start_ns, error)
            elif self.guest.removed.overlap_bytes(off, off + r.page_size):
                self.counts.zero += 1
                self._zero(r, va, start_ns)
            else:
                self._answer(r, va, start_ns)

    def _answer(self, r: Region, va: int, start_ns: int, loader_wait: bool = False) -> None:
        """The faulting page is loaded: copy it (waking the thread), then the loaded,
        not yet copied bytes of the window around it."""
        page = r.page_size
        off = r.offset + (va - r.base)
        status = self._copy(r, va, self.copies.src + off, page)
        if status == errno_mod.EAGAIN:
            self.answerer.retry.append((va, start_ns))
            return
        if status == errno_mod.EEXIST:
            self.counts.spurious += 1
            self.answerer.wake(va, page)
        self.answerer.record(start_ns)
        shared = self.shared
        with shared.lock:
            shared.pending.remove(off, off + page)
        if self.from_source:
            with shared.lock:
                shared.installed.add(off, off + page)
        if loader_wait:
            self._for_trio(off, off + page, None)
        window = max(self.config.fault_around, page)
        wlo = max(off & ~(window - 1), r.offset)
        whi = min(wlo + window, r.offset + r.size)
        if whi - wlo > page:
            self.copies.install(self.answerer, wlo, whi)

    def _zero(self, r: Region, va: int, start_ns: int) -> None:
        page = r.page_size
        answerer = self.answerer
        status = answerer.zero(va, page, 0 if page == mmap.PAGESIZE else self._zero_source(page))
        if status == errno_mod.EAGAIN:
            self.counts.eagain += 1
            answerer.retry.append((va, start_ns))
            return
        if status == errno_mod.EEXIST:
            answerer.wake(va, page)
        elif status and status != GONE:
            log.warning("uffd: zero page at %#x: %s", va, answerer.error)
        answerer.record(start_ns)

    def _zero_source(self, page: int) -> int:
        if self._zero_huge is None or len(self._zero_huge) < page:
            # anonymous and never written: every page reads as the shared zero page
            self._zero_huge = mmap.mmap(-1, page, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            self._zero_src = _address_of_map(self._zero_huge)
        return self._zero_src

    def _fail(self, r: Region, va: int, start_ns: int, error: LoadError) -> None:
        """The page cannot be read: poison it so the faulting thread gets SIGBUS."""
        self.counts.failed += 1
        self.counts.last_failure = f"{error.code}: {error.message}"
        if error.code == codes.SHUTTING_DOWN:
            log.warning("uffd: page at %#x (memory %#x) not loaded at shutdown: poisoned", va,
                        r.offset + (va - r.base))
        else:
            log.error("uffd: page at %#x (memory %#x) failed to load (%s): %s", va, r.offset + (va - r.base),
                      error.code, error.message)
        answerer = self.answerer
        status = answerer.poison(va, r.page_size)
        if status == errno_mod.EAGAIN:
            self.counts.failed -= 1
            with self.shared.lock:  # again after the events
                self.shared.answers.append((r, va, start_ns, error))
            return
        if status and status != GONE:
            # no UFFDIO_POISON (kernel before 6.6): nothing can raise SIGBUS in the
            # thread; never hand out wrong bytes -- the VMM's memory is unusable
            assert answerer.error is not None
            log.error("uffd: cannot poison %#x (%s): no UFFDIO_POISON in this kernel?; "
                      "stopping the handler", va, answerer.error.strerror)
            self.state.advance(VANISH)
        answerer.record(start_ns)
