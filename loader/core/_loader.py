"""The loader: a background sweep with priority waits, after gVisor's restore loop.

:class:`Loader` is the public face (the :class:`~loader.core._service.PageService`
the front ends see) and the wiring of its parts, one object each:

* :class:`~loader.core._window.Window`: ``unloaded``, a *window* over the source's
  data, fed a batch at a time (docs/DESIGN.md, "Millions of ranges");
* :class:`~loader.core._reads.Reads`: the reads in flight, from issue to completion;
* :class:`~loader.core._verify.Verifier`: landed bytes held until their checksum
  chunk is hashed (with checksums), then settled;
* :class:`~loader.core._settle.Settler`: settled memory leaves ``inflight``, waiters
  are answered;
* :class:`~loader.core._schedule.Scheduler`: the loop, which decides which reads
  start each round (its module docstring has the steps).

State is three :class:`RangeSet` of memory offsets, shared by the parts: ``unloaded``
(not started), ``inflight`` (being read, or read and waiting for its chunk's
checksum) and ``failed``; everything else of the layout is loaded.  A waiter counts
the bytes it still needs; each settled span subtracts its overlap, so a waiter joins
reads already in flight instead of reading twice.  A small wait whose bytes the page
cache holds is read at once, in the waiting task, with the queue's ``read_now`` (no
request, no round of the loop: :meth:`Reads.read_now`).

With checksums (a pages checkpoint: one xxh3_64 per ``chunk_size`` of the pages
file, 16 KiB by default), bytes that land are not loaded yet: once every byte of
their chunk has landed, the chunk is hashed, and only then are its bytes loaded
(and waiters answered), or failed with ``corrupt``.  A waiter's reads cover the
whole chunks its bytes are in, so it never waits for the sweep.  A small wait's
chunks are read and hashed at once in the waiting task (:meth:`Verifier.verify_now`);
a chunk a waiter needs is hashed on landing; a background read's whole chunks are
hashed by the backend's thread right after it (``aio.Request.then``); the rest go
to the hash thread (:class:`_Hasher`) in runs (docs/DESIGN.md, Verification).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

import aio
from protocol import codes

from .._memfile import Destination
from ._chunks import _Chunks
from ._config import CallbackBatch, LoaderConfig, LoadError, LoopState, WaitHandle
from ._extents import LayoutExtents
from ._rangeset import RangeSet, gaps
from ._reads import Reads
from ._schedule import Scheduler
from ._settle import Settler
from ._stats import LoaderCounters, LoaderStatistics
from ._sweep import SequentialOrder, SweepOrder, WorkingSetOrder
from ._verify import Verifier
from ._window import Window

log = logging.getLogger("pageload")

if TYPE_CHECKING:
    from ..source import LocalPages, PageSource
    from ._replay import AccessRecorder

#: a prefetch hint past the window is looked up (and loaded) this far at most
_HINT_PROBE_LIMIT = 64 << 20


class Loader:
    """Loads ``source``'s ranges into ``destination`` through ``queue``.

    Call :meth:`run` in a task; use :meth:`submit_wait` / :meth:`wait_loaded` and
    :meth:`prefetch` from any task of the same trio run.  Where the source has
    checksums (and ``config.verify``, and ``use_checksums``), every chunk is verified
    before its bytes count as loaded.
    """

    def __init__(
        self,
        source: PageSource,
        destination: Destination,
        queue: aio.Queue,
        config: LoaderConfig | None = None,
        order: SweepOrder | None = None,
        *,
        use_checksums: bool = True,
    ) -> None:
        self.source = source
        layout = self.layout = source.layout
        self.page_size = layout.page_size
        self.memory_size = layout.memory_size
        self._local = source.local
        self.destination = destination
        self.queue = queue
        config = self._config = config or LoaderConfig()
        if config.queue_depth > queue.capacity:
            raise ValueError(f"queue_depth {config.queue_depth} exceeds the queue's capacity {queue.capacity}")
        order = self.order = order or SequentialOrder()
        hooks = order.hooks()  # optional hooks (working-set replay, loader.core._workingset): asked once
        self._order_wait: Callable[[int, int, int], None] | None = hooks.note_wait
        #: told of every touched range, ``recorder.touched(lo, hi)`` (page span of each wait;
        #: userfaultfd faults go through it too): working-set recording
        self.recorder: AccessRecorder | None = None
        chunk_size, checksums = source.chunk_size, source.checksums
        if chunk_size and getattr(source, "decodes_whole_chunks", False) and (
                config.sweep_read_size % chunk_size or config.read_size % chunk_size):
            # a source that decodes a chunk whole to read any of it (a chunk store: 2 MiB
            # chunks): every read covers whole chunks, or it would decode (and fetch) one
            # several times: a waiter's 4 KiB, widened to its chunk, was read in pieces of
            # read_size (256 KiB), each fetching and decoding the whole chunk (8 GETs a fault)
            config = self._config = dataclasses.replace(
                config, sweep_read_size=-(-config.sweep_read_size // chunk_size) * chunk_size,
                read_size=-(-config.read_size // chunk_size) * chunk_size)
        #: a source whose reads return only bytes it has checked against a cryptographic
        #: hash before the read completes (a chunk store: each chunk's BLAKE3): its
        #: checksums are not hashed a second time (that cost a tenth of a local fill)
        self.source_verifies = bool(getattr(source, "verifies_reads", False))
        chunks = (
            _Chunks(layout, chunk_size, checksums)
            if config.verify and use_checksums and chunk_size is not None and checksums is not None
            and not self.source_verifies
            else None
        )
        self.counters = LoaderCounters()
        state = self._state = LoopState()
        self.unloaded = RangeSet()
        self.inflight = RangeSet()
        self.failed = RangeSet()
        # the parts (each given the others it calls; the loader relays what runs the other way)
        listeners: list[Callable[[int, int], None]] = []  # (holes the window finds are loaded memory too)
        window = self._window = Window(
            source.extents() or LayoutExtents(layout), self.unloaded, self.memory_size, layout.data_bytes, state,
            listeners, poke=self._poke, check_done=self._check_done, whole=not isinstance(order, SequentialOrder))
        settler = self._settler = Settler(self.inflight, self.failed, destination, window, self.counters,
                                          hooks.note_loaded, listeners, poke=self._poke)
        self.done = settler.done
        self.histogram = settler.histogram
        # waits up to this many bytes may be read at once by the waiting task (Reads.read_now);
        # with checksums: a wait whose chunks (at most this many bytes) are unstarted and
        # cached, or landed and waiting for their hash, is read and hashed at once (verify_now)
        now_bytes = config.read_now_bytes if config.priority else 0
        self._read_now_limit = now_bytes if chunks is None else 0
        verifier = self._verifier = Verifier(
            chunks, settler, self.unloaded, source, queue, destination, order, self.counters, state,
            wake=self._wake, verify_now_limit=0 if chunks is None else now_bytes)
        reads = self._reads = Reads(source, destination, queue, config, self.unloaded, verifier, settler, order,
                                    self.counters, state, requeue=self._requeue)
        self._scheduler = Scheduler(config, queue, order, reads, window, verifier, settler, state)
        self._closed = trio.Event()
        self.abandoned_reads = 0  #: reads still running when :meth:`aclose` gave up on them
        settler.check_done()

    # ------------------------------------------------------------------ relays between the parts
    def _poke(self) -> None:
        self._scheduler.poke()

    def _wake(self) -> None:
        self._scheduler.wake()

    def _requeue(self, w: WaitHandle) -> None:
        self._scheduler.requeue(w)

    def _check_done(self) -> None:
        self._settler.check_done()

    # ------------------------------------------------------------------ the parts' figures
    @property
    def config(self) -> LoaderConfig:
        return self._config

    @config.setter
    def config(self, config: LoaderConfig) -> None:
        """A new configuration, for the parts that read it each round (the sweep may be
        turned on midway); what was derived from the old one at the start stays."""
        self._config = self._scheduler.config = self._reads.config = config

    @property
    def frontier(self) -> int:
        """The data below this offset is in the sets (or loaded)."""
        return self._window.frontier

    @property
    def total_bytes(self) -> int:
        """Data bytes to load (exact once the source has found every hole)."""
        return self._window.total_bytes

    @property
    def loaded_bytes(self) -> int:
        return self._settler.loaded_bytes

    @property
    def sweep_held(self) -> bool:
        """See :meth:`hold_sweep`."""
        return self._scheduler.sweep_held

    @property
    def reply_batch(self) -> CallbackBatch:
        """Wait callbacks run inside ``reply_batch.open()`` ... ``close()``, one pair per
        batch of completions (the server writes the batch's replies at the close)."""
        return self._state.reply_batch

    # ------------------------------------------------------------------ public API
    def submit_wait(
        self, offset: int, length: int, callback: Callable[[WaitHandle], None], context: object = None
    ) -> WaitHandle | None:
        """Ask for ``[offset, offset+length)``.  Returns None when it is already
        loaded (or a hole): no I/O, no callback.  Raises :class:`LoadError` at once
        if part of it failed to load or the loader is shutting down.  Otherwise the
        returned handle's ``callback`` runs (in this trio run) when it is loaded."""
        lo, hi = self._page_span(offset, length)
        counters = self.counters
        counters.waits_total += 1
        if self.recorder is not None:
            self.recorder.touched(lo, hi)
        window, settler, verifier = self._window, self._settler, self._verifier
        span = None
        fresh = False
        if hi > window.frontier:
            if verifier.chunks is not None:  # the chunks' memory at once: all of it is read
                span = verifier.read_span(lo, hi)
                # nobody looked there: read and hash its chunks at once, without the sets
                fresh = span[2] is not None and verifier.verify_now_limit > 0 and window.fresh(span[0], span[1])
                if not fresh:
                    window.look_up(span[0], span[1])
            else:
                window.look_up(lo, hi)
        if fresh:
            assert span is not None and span[2] is not None
            if not self._state.closing:
                if self._order_wait is not None:
                    self._order_wait(lo, hi, sum(b - a for a, b in self.layout.data_in(lo, hi)))
                now = settler.last_fault_ns = time.perf_counter_ns()
                if not self._state.busy and not self._scheduler.full_width():
                    self._scheduler.set_busy(True)  # (as below)
                marked = window.looked_up(span[0], span[1])  # (first: settling must find it given out)
                if verifier.verify_fresh(lo, hi, span[2], now):
                    return None
                window.unlook(*marked)
            window.look_up(span[0], span[1])  # (it could not be served so: the usual way)
        if self.failed and self.failed.overlap_bytes(lo, hi):
            counters.waits_failed += 1
            raise settler.failure_for(lo, hi)
        unloaded, inflight = self.unloaded, self.inflight
        need = ((unloaded.overlap_bytes(lo, hi) if unloaded else 0)
                + (inflight.overlap_bytes(lo, hi) if inflight else 0))  # (all loaded: no lookups)
        if self._order_wait is not None:
            self._order_wait(lo, hi, need)
        if need == 0:
            counters.waits_immediate += 1
            return None
        if self._state.closing:
            counters.waits_failed += 1
            raise LoadError(codes.SHUTTING_DOWN, "the loader is shutting down")
        now = settler.last_fault_ns = time.perf_counter_ns()
        scheduler = self._scheduler
        if not self._state.busy and not scheduler.full_width():
            scheduler.set_busy(True)  # clients fault from now: background reads yield the CPU at once
        if need <= self._read_now_limit and self._reads.read_now(lo, hi, need, now):
            return None  # no I/O to queue behind: the sweep keeps its width
        if span is None:
            span = verifier.read_span(lo, hi)
            if span[1] > window.frontier:
                window.look_up(span[0], span[1])  # (a chunk's memory may reach past [lo, hi))
        read_lo, read_hi, chunk_span = span
        if verifier.verify_now_limit:  # (after the look-up: it looks at the window only)
            need = verifier.verify_now(lo, hi, need, now)
            if need == 0:
                return None
        settler.last_wait_ns = now
        handle = WaitHandle(lo, hi, need, callback, now, context, read_lo, read_hi)
        if chunk_span is not None:
            handle.chunk_lo, handle.chunk_hi = chunk_span
        counters.bytes_waited += need
        settler.block(handle)
        scheduler.enqueue(handle)
        return handle

    async def wait_loaded(self, offset: int, length: int) -> None:
        """Return once ``[offset, offset+length)`` is loaded; raise :class:`LoadError`
        if it cannot be.  Cancelling the call withdraws the wait."""
        event = trio.Event()
        handle = self.submit_wait(offset, length, lambda h: event.set())
        if handle is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            await event.wait()
        except BaseException:
            self.cancel(handle)
            raise
        if handle.error is not None:
            raise handle.error

    def cancel(self, handle: WaitHandle) -> None:
        """Withdraw a wait (its client went away); its callback will not run."""
        if handle.finished or handle.cancelled:
            return
        handle.cancelled = True
        self.counters.waits_cancelled += 1
        self._settler.drop_waiter(handle, time.perf_counter_ns())

    def prefetch(self, offset: int, length: int) -> None:
        """A hint: load ``[offset, offset+length)`` ahead of the sweep, behind waiters."""
        lo, hi = self._page_span(offset, length)
        self.counters.prefetches += 1
        window, closing = self._window, self._state.closing
        if hi > window.frontier and not closing:
            hi = min(hi, max(lo, window.frontier) + _HINT_PROBE_LIMIT)
            window.look_up(lo, hi)
        if closing or not self.unloaded.overlap_bytes(lo, hi):
            return
        self._scheduler.hint(lo, hi)

    def hint_working_set(self, offset: int, length: int) -> None:
        """A client says ``[offset, offset+length)`` is in its working set: recorded as
        touched now (when recording), and prefetched."""
        lo, hi = self._page_span(offset, length)
        if self.recorder is not None:
            self.recorder.touched(lo, hi)
        self.prefetch(offset, length)

    def hold_sweep(self, held: bool) -> None:
        """Pause (True) or resume (False) the sweep; waits and prefetches are still
        served.  The userfaultfd handler holds it while it fills guest memory straight
        from the source, so the two do not share the CPU with the guest at once."""
        self._scheduler.sweep_held = held
        if not held:
            self._poke()

    def not_loaded(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of memory [lo, hi) that are not loaded (yet), sorted: unstarted,
        in flight, failed, or past the frontier where nobody has looked (its holes
        too: not known yet).  What a map of loaded memory must leave unset."""
        parts = [*self.unloaded.overlapping(lo, hi), *self.inflight.overlapping(lo, hi),
                 *self.failed.overlapping(lo, hi)]
        parts.extend(self._window.unknown(lo, hi))
        parts.sort()
        return parts

    def is_loaded(self, lo: int, hi: int) -> bool:
        """Whether all of memory [lo, hi) is loaded (holes count as loaded)."""
        window = self._window
        if hi > window.frontier and any(True for _ in window.unknown(lo, hi)):
            return False
        return not (self.unloaded.overlap_bytes(lo, hi) or self.inflight.overlap_bytes(lo, hi)
                    or self.failed.overlap_bytes(lo, hi))

    def subscribe_loaded(self, listener: Callable[[int, int], None], lo: int = 0, hi: int | None = None, *,
                         holes: bool = False) -> None:
        """Call ``listener(a, b)`` for each part of memory ``[lo, hi)`` loaded now (its
        data, or with ``holes`` everything not unloaded, in flight, failed or unknown),
        then every time memory finishes loading (:meth:`add_loaded_listener`).  The one
        place "what is loaded" is seeded, for every front end."""
        for a, b in self.loaded_in(lo, self.memory_size if hi is None else hi, holes=holes):
            listener(a, b)
        self.add_loaded_listener(listener)

    def loaded_in(self, lo: int, hi: int, *, holes: bool = False) -> list[tuple[int, int]]:
        """The parts of memory ``[lo, hi)`` loaded now, sorted: its data less what is not
        loaded (:meth:`not_loaded`); with ``holes``, everything but that."""
        if holes:
            return list(gaps(self.not_loaded(lo, hi), lo, hi))
        data = RangeSet(self.layout.data_in(lo, hi))
        for a, b in self.not_loaded(lo, hi):
            data.remove(a, b)
        return list(data)

    def note_answered_faults(self, count: int) -> None:
        """``count`` faults answered from loaded memory without a wait (the userfaultfd
        handler's): counted as waits, served at once."""
        counters = self.counters
        counters.waits_total += count
        counters.waits_immediate += count

    def replay_spans(self) -> list[tuple[int, int]]:
        """The working set's spans a replay loads first, in its order (empty: no replay)."""
        order = self.order
        if not isinstance(order, WorkingSetOrder):
            return []
        return list(zip(order.span_lo, order.span_hi, strict=True))

    @property
    def verifies(self) -> bool:
        """Whether chunks are verified against checksums before they are served."""
        return self._verifier.chunks is not None

    @property
    def read_timeout(self) -> float | None:
        return self.config.read_timeout

    @property
    def local_source(self) -> LocalPages | None:
        """The source as one local file (:attr:`PageSource.local`), or None."""
        return self._local

    @property
    def reads_transparent(self) -> bool:
        """Whether reading the source without the loader's queue gives what reads
        through it give (:attr:`aio.Queue.transparent`)."""
        return self.queue.transparent

    def set_reply_batch(self, batch: CallbackBatch) -> None:
        """Run wait callbacks inside ``batch.open()`` ... ``batch.close()``."""
        self._state.reply_batch = batch

    def completions_waiting(self) -> bool:
        return self.queue.completions_waiting()

    def queue_statistics(self) -> aio.QueueStatistics:
        return self.queue.statistics()

    def add_loaded_listener(self, listener: Callable[[int, int], None]) -> None:
        """Call ``listener(lo, hi)`` (in the loader's task, before waiters are answered)
        each time memory ``[lo, hi)`` finishes loading.  The userfaultfd handler uses it
        to copy loaded pages into guest memory in the order they load."""
        self._settler.listeners.append(listener)

    def statistics(self) -> LoaderStatistics:
        now = time.perf_counter_ns()
        settler, reads = self._settler, self._reads
        end = settler.finished_ns or now
        elapsed = (end - settler.started_ns) / 1e9
        c = self.counters
        loaded = settler.loaded_bytes
        return LoaderStatistics(
            memory_size=self.memory_size,
            total_bytes=self._window.total_bytes,
            loaded_bytes=loaded,
            failed_bytes=self.failed.total,
            failed_ranges=settler.failed_ranges(64),
            done=self.done.is_set(),
            elapsed_s=elapsed,
            throughput_bps=loaded / elapsed if elapsed > 0 else 0.0,
            reads_in_flight=len(reads.table),
            background_reads_in_flight=reads.background_inflight,
            reads_total=c.reads_total,
            reads_copied=c.reads_copied,
            reads_retried=c.reads_retried,
            reads_timed_out=c.reads_timed_out,
            reads_stuck=len(reads.stuck),
            waits_total=c.waits_total,
            waits_immediate=c.waits_immediate,
            waits_served=c.waits_served,
            waits_failed=c.waits_failed,
            waits_cancelled=c.waits_cancelled,
            waiters_blocked=len(settler.waiters),
            bytes_waited=c.bytes_waited,
            blocked_time_s=settler.blocked_ns(now) / 1e9,
            total_wait_time_s=(c.wait_ns + settler.waiting_ns(now)) / 1e9,
            prefetches=c.prefetches,
            verify=self.verifies or self.source_verifies,
            priority=self.config.priority,
            sweep=self.config.sweep,
            chunks_verified=c.chunks_verified,
            corrupt_chunks=c.corrupt_chunks,
            latency_us=self.histogram.as_dict(),
            scanned_bytes=self._window.scanned_bytes,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The driver loop.  Returns when everything is loaded (or failed) and no
        read is in flight, or after :meth:`shutdown`; in lazy mode it runs until closed."""
        state = self._state
        if state.running:
            raise RuntimeError("Loader.run is already running")
        state.running = True
        try:
            async with trio.open_nursery() as nursery:  # the scan
                if self._window.scans:
                    nursery.start_soon(self._window.scan)
                task_status.started()
                await self._scheduler.loop()
                nursery.cancel_scope.cancel()
        finally:
            self._verifier.stop()
            state.running = False
            self._closed.set()

    def shutdown(self) -> None:
        """Stop at once: issue nothing new, answer every waiter ``shutting-down``.
        Reads already in the queue are left to :meth:`aclose`."""
        self._state.closing = True
        self._reads.resubmit.clear()
        self._scheduler.clear()
        if self._settler.waiters:
            self._settler.answer_all(LoadError(codes.SHUTTING_DOWN, "the daemon is shutting down"))
        self._poke()

    async def aclose(self, timeout: float | None = None) -> None:
        """Shut down: :meth:`shutdown`, let the driver stop, drop reads that have not
        started (where the backend can), wait up to ``timeout`` seconds for the
        ones running, then close the queue.  If reads are still running then (a
        hung disk), give up on them without closing the queue: their buffers stay
        mapped (their requests hold them), :attr:`abandoned_reads` counts them."""
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        self.shutdown()
        if self._state.running:
            await self._closed.wait()
        queue = self.queue
        if queue.closed:
            return
        cancel = getattr(queue, "cancel_unstarted", None)
        if cancel is not None:
            cancel()
        with trio.move_on_at(deadline):
            while queue.outstanding:
                for completion in await queue.wait(1):
                    self._reads.complete(completion)
        if queue.outstanding:
            self.abandoned_reads = queue.outstanding
            log.warning("shutdown: %d read(s) still running after %g s; not waiting for them",
                        queue.outstanding, timeout)
            return
        await queue.aclose()

    def _page_span(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length <= 0 or offset + length > self.memory_size:
            raise ValueError(
                f"range {offset:#x}+{length:#x} is outside the memory (size {self.memory_size:#x})"
            )
        mask = self.page_size - 1
        return offset & ~mask, (offset + length + mask) & ~mask

