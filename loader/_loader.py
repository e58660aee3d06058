"""The loader: a background sweep with priority waits, after gVisor's restore loop.

One trio task (:meth:`Loader.run`) owns the AIO queue.  Each round it

1. serves waiters first: at most one read of at most ``read_size`` per waiter per
   round, rotating, so a 1 GiB wait cannot starve a 4 KiB one;
2. then prefetch hints;
3. then fills what is left of the background share of the queue with the sweep,
   which reads unstarted ranges in the order a :class:`SweepOrder` gives,
   coalescing ranges whose pages-file offsets are contiguous;
4. waits for at least one completion (or for new work).

Slots are reserved for waiters: the sweep never has more than ``background_reads``
reads in flight, and waiters' reads are marked urgent so backends start them
before queued background reads.

State is three :class:`RangeSet` of memory offsets: ``unloaded`` (not started),
``inflight`` and ``failed``; everything else of the layout is loaded.  A waiter
counts the bytes it still needs; each completed read subtracts its overlap, so a
waiter joins reads already in flight instead of reading twice.
"""

from __future__ import annotations

import errno as errno_mod
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

import aio

from ._layout import Layout
from ._memfile import Destination
from ._rangeset import RangeSet
from ._stats import LatencyHistogram, LoaderStatistics
from ._sweep import SequentialOrder, SweepOrder

_RETRIABLE = {errno_mod.EINTR, errno_mod.EAGAIN}


@dataclass(frozen=True, slots=True)
class LoaderConfig:
    read_size: int = 256 << 10  #: largest read for a waiter (gVisor: 256 KiB); bounds one wait's turn
    sweep_read_size: int = 1 << 20  #: largest background read: fewer, larger reads when nobody waits
    queue_depth: int = 64  #: AIO queue capacity
    background_reads: int = 8  #: most sweep reads in flight; the rest of the queue is for waiters
    #: while clients are faulting (a wait blocked within ``busy_linger_s``), the sweep
    #: shrinks to this many reads of at most ``read_size``, leaving CPU and disk to
    #: the waiters; None: one less than the CPUs (at least 1, at most background_reads)
    busy_background_reads: int | None = None
    busy_linger_s: float = 0.05
    waiter_reads: int = 4  #: most reads in flight on behalf of one waiter (rotation bound)
    max_retries: int = 3  #: per read, for errors that may pass and for reads returning nothing
    sweep: bool = True  #: False: lazy, load only what is waited for or prefetched
    priority: bool = True  #: False: waits do not jump ahead of the sweep (first come, first served)

    def __post_init__(self) -> None:
        if self.background_reads >= self.queue_depth:
            raise ValueError("background_reads must leave queue slots for waiters")
        if self.busy_background_reads is None:
            cpus = os.cpu_count() or 2
            object.__setattr__(self, "busy_background_reads", max(1, min(self.background_reads, cpus - 1)))
        if not self.sweep and not self.priority:
            raise ValueError("without the sweep and without priority nothing would ever load")
        if min(self.read_size, self.sweep_read_size, self.waiter_reads, self.background_reads) <= 0:
            raise ValueError("read sizes, waiter_reads and background_reads must be positive")


class LoadError(Exception):
    """A wait could not be satisfied: an I/O error, or the loader shut down."""

    def __init__(self, code: str, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.errno = errno


class WaitHandle:
    """One blocked wait.  Completed exactly once: ``callback(handle)`` with
    ``handle.error`` None on success, else a :class:`LoadError`."""

    __slots__ = (
        "lo", "hi", "cursor", "remaining", "error", "callback", "start_ns",
        "inflight", "queued", "finished", "cancelled", "context",
    )

    def __init__(self, lo: int, hi: int, remaining: int, callback: Callable[[WaitHandle], None] | None,
                 start_ns: int, context: object = None) -> None:
        self.lo = lo
        self.hi = hi
        self.cursor = lo  #: where this waiter's next priority read may start
        self.remaining = remaining  #: bytes still to be loaded
        self.error: LoadError | None = None
        self.callback = callback
        self.start_ns = start_ns
        self.inflight = 0  #: reads in flight that this waiter issued
        self.queued = False  #: in the priority deque
        self.finished = False
        self.cancelled = False
        self.context = context  #: the caller's (e.g. the request id)


class _Read:
    __slots__ = ("id", "file_offset", "segments", "length", "urgent", "owner", "attempts")

    def __init__(self, id: int, file_offset: int, segments: list[list[int]], urgent: bool,
                 owner: WaitHandle | None) -> None:
        self.id = id
        self.file_offset = file_offset
        self.segments = segments  #: [[mem_lo, mem_hi], ...], contiguous in the pages file
        self.length = sum(hi - lo for lo, hi in segments)
        self.urgent = urgent
        self.owner = owner
        self.attempts = 0


class Loader:
    """Loads ``layout``'s ranges from ``pages_fd`` into ``destination`` through ``queue``.

    Call :meth:`run` in a task; use :meth:`submit_wait` / :meth:`wait_loaded` and
    :meth:`prefetch` from any task of the same trio run.
    """

    def __init__(
        self,
        layout: Layout,
        pages_fd: int,
        destination: Destination,
        queue: aio.Queue,
        config: LoaderConfig | None = None,
        order: SweepOrder | None = None,
    ) -> None:
        self.layout = layout
        self.page_size = layout.page_size
        self.memory_size = layout.memory_size
        self.pages_fd = pages_fd
        self.destination = destination
        self.queue = queue
        self.config = config or LoaderConfig()
        if self.config.queue_depth > queue.capacity:
            raise ValueError(f"queue_depth {self.config.queue_depth} exceeds the queue's capacity {queue.capacity}")
        self.order: SweepOrder = order or SequentialOrder()
        self.unloaded = RangeSet((r.mem_offset, r.mem_offset + r.length) for r in layout)
        self.inflight = RangeSet()
        self.failed = RangeSet()
        self._failed_by_errno: dict[int, RangeSet] = {}  # merged intervals, never one entry per page
        self._reads: dict[int, _Read] = {}
        self._next_id = 0
        self._background_inflight = 0
        self._waiters: list[WaitHandle] = []  # blocked, not finished
        self._priority: deque[WaitHandle] = deque()
        self._prefetch: deque[WaitHandle] = deque()
        self._resubmit: deque[_Read] = deque()
        self._last_wait_ns = 0  # when a wait last blocked or finished
        self._linger_ns = int(self.config.busy_linger_s * 1e9)
        self._wait_scope: trio.CancelScope | None = None
        self._kick = trio.Event()
        self._closing = False
        self._running = False
        self._closed = trio.Event()
        self.done = trio.Event()
        self._started_ns = time.perf_counter_ns()
        self._finished_ns: int | None = None
        # statistics
        self.total_bytes = layout.data_bytes
        self.loaded_bytes = 0
        self._reads_total = 0
        self._reads_retried = 0
        self._waits_total = 0
        self._waits_immediate = 0
        self._waits_served = 0
        self._waits_failed = 0
        self._waits_cancelled = 0
        self._bytes_waited = 0
        self._blocked_since: int | None = None
        self._blocked_ns = 0
        self._wait_ns = 0
        self._prefetches = 0
        self.histogram = LatencyHistogram()
        self._loaded_listeners: list[Callable[[int, int], None]] = []
        if not self.unloaded:
            self._mark_done()

    # ------------------------------------------------------------------ public API
    def submit_wait(
        self, offset: int, length: int, callback: Callable[[WaitHandle], None], context: object = None
    ) -> WaitHandle | None:
        """Ask for ``[offset, offset+length)``.  Returns None when it is already
        loaded (or a hole): no I/O, no callback.  Raises :class:`LoadError` at once
        if part of it failed to load or the loader is shutting down.  Otherwise the
        returned handle's ``callback`` runs (in this trio run) when it is loaded."""
        lo, hi = self._page_span(offset, length)
        self._waits_total += 1
        if self.failed and self.failed.overlap_bytes(lo, hi):
            self._waits_failed += 1
            raise self._failure_for(lo, hi)
        need = self.unloaded.overlap_bytes(lo, hi) + self.inflight.overlap_bytes(lo, hi)
        if need == 0:
            self._waits_immediate += 1
            return None
        if self._closing:
            self._waits_failed += 1
            raise LoadError("shutting-down", "the loader is shutting down")
        now = self._last_wait_ns = time.perf_counter_ns()
        handle = WaitHandle(lo, hi, need, callback, now, context)
        self._bytes_waited += need
        if not self._waiters:
            self._blocked_since = now
        self._waiters.append(handle)
        if self.config.priority and self.unloaded.overlap_bytes(lo, hi):
            handle.queued = True
            self._priority.append(handle)
            self._poke()
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
        self._waits_cancelled += 1
        self._drop_waiter(handle, time.perf_counter_ns())

    def prefetch(self, offset: int, length: int) -> None:
        """A hint: load ``[offset, offset+length)`` ahead of the sweep, behind waiters."""
        lo, hi = self._page_span(offset, length)
        self._prefetches += 1
        if self._closing or not self.unloaded.overlap_bytes(lo, hi):
            return
        hint = WaitHandle(lo, hi, 0, None, 0)
        hint.queued = True
        self._prefetch.append(hint)
        self._poke()

    def add_loaded_listener(self, listener: Callable[[int, int], None]) -> None:
        """Call ``listener(lo, hi)`` (in the loader's task, before waiters are answered)
        each time memory ``[lo, hi)`` finishes loading.  The userfaultfd handler uses it
        to copy loaded pages into guest memory in the order they load."""
        self._loaded_listeners.append(listener)

    def statistics(self) -> LoaderStatistics:
        now = time.perf_counter_ns()
        end = self._finished_ns or now
        elapsed = (end - self._started_ns) / 1e9
        blocked = self._blocked_ns + (now - self._blocked_since if self._blocked_since is not None else 0)
        waiting_now = sum(now - w.start_ns for w in self._waiters)
        return LoaderStatistics(
            memory_size=self.memory_size,
            total_bytes=self.total_bytes,
            loaded_bytes=self.loaded_bytes,
            failed_bytes=self.failed.total,
            failed_ranges=self._failed_ranges(64),
            done=self.done.is_set(),
            elapsed_s=elapsed,
            throughput_bps=self.loaded_bytes / elapsed if elapsed > 0 else 0.0,
            reads_in_flight=len(self._reads),
            reads_total=self._reads_total,
            reads_retried=self._reads_retried,
            waits_total=self._waits_total,
            waits_immediate=self._waits_immediate,
            waits_served=self._waits_served,
            waits_failed=self._waits_failed,
            waits_cancelled=self._waits_cancelled,
            waiters_blocked=len(self._waiters),
            bytes_waited=self._bytes_waited,
            blocked_time_s=blocked / 1e9,
            total_wait_time_s=(self._wait_ns + waiting_now) / 1e9,
            prefetches=self._prefetches,
            latency_us=self.histogram.as_dict(),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The driver loop.  Returns when everything is loaded (or failed) and no
        read is in flight, or after :meth:`aclose`; in lazy mode it runs until closed."""
        if self._running:
            raise RuntimeError("Loader.run is already running")
        self._running = True
        task_status.started()
        queue = self.queue
        try:
            while not self._closing:
                self._schedule()
                if not self._reads:
                    if self.done.is_set() and not self._priority and not self._prefetch:
                        break
                    self._kick = trio.Event()
                    await self._kick.wait()
                    continue
                with trio.CancelScope() as scope:
                    self._wait_scope = scope
                    completions = await queue.wait(1)
                self._wait_scope = None
                if scope.cancelled_caught:
                    continue
                for completion in completions:
                    self._complete(completion)
            await self._drain()
        finally:
            self._running = False
            self._closed.set()

    async def aclose(self) -> None:
        """Shut down: issue nothing new, let reads in flight finish, fail every
        remaining waiter with ``shutting-down``, close the queue."""
        if not self._closing:
            self._closing = True
            self._poke()
        if self._running:
            await self._closed.wait()
        else:
            await self._drain()
        await self.queue.aclose()

    # ------------------------------------------------------------------ internals
    def _page_span(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length <= 0 or offset + length > self.memory_size:
            raise ValueError(
                f"range {offset:#x}+{length:#x} is outside the memory (size {self.memory_size:#x})"
            )
        mask = self.page_size - 1
        return offset & ~mask, (offset + length + mask) & ~mask

    def _poke(self) -> None:
        """New work arrived: wake the driver if it is parked or blocked in queue.wait."""
        if self._wait_scope is not None:
            if self.queue.outstanding < self.config.queue_depth or self._closing:
                self._wait_scope.cancel()
        else:
            self._kick.set()

    def _schedule(self) -> None:
        if self._closing:
            return
        cfg = self.config
        depth = cfg.queue_depth
        # 0. halves of failed reads, being narrowed down
        while self._resubmit and len(self._reads) < depth:
            self._submit(self._resubmit.popleft())
        # 1. waiters, one read each per round, rotating
        prio = self._priority
        while prio and len(self._reads) < depth:
            progressed = False
            for _ in range(len(prio)):
                if len(self._reads) >= depth:
                    break
                w = prio.popleft()
                w.queued = False
                if w.finished or w.cancelled:
                    continue
                if self._issue_for(w, urgent=True):
                    progressed = True
                if w.cursor < w.hi and w.inflight < cfg.waiter_reads and self._has_unstarted(w):
                    w.queued = True
                    prio.append(w)
            if not progressed:
                break
        # 2. prefetch hints, 3. the sweep: within the background share only, and a
        # smaller one while clients are faulting
        if self._waiters or time.perf_counter_ns() - self._last_wait_ns < self._linger_ns:
            background_cap = cfg.busy_background_reads or 1
        else:
            background_cap = cfg.background_reads
        pf = self._prefetch
        while pf and self._background_inflight < background_cap and len(self._reads) < depth:
            h = pf[0]
            if not self._issue_for(h, urgent=False):
                pf.popleft()
                continue
            if not self._has_unstarted(h):
                pf.popleft()
        if not cfg.sweep:
            return
        order = self.order
        while self._background_inflight < background_cap and len(self._reads) < depth:
            start = order.next_start(self.unloaded)
            if start is None:
                break
            self._issue(start, self.memory_size, cfg.sweep_read_size, urgent=False, owner=None)

    def _has_unstarted(self, w: WaitHandle) -> bool:
        nxt = self.unloaded.first_at_or_after(w.cursor)
        return nxt is not None and nxt[0] < w.hi

    def _issue_for(self, w: WaitHandle, urgent: bool) -> bool:
        nxt = self.unloaded.first_at_or_after(w.cursor)
        if nxt is None or nxt[0] >= w.hi:
            w.cursor = w.hi
            return False
        end = self._issue(nxt[0], w.hi, self.config.read_size, urgent=urgent, owner=w if urgent else None)
        w.cursor = end
        if urgent:
            self.order.note_served(end)
        return True

    def _issue(self, start: int, limit: int, budget: int, *, urgent: bool, owner: WaitHandle | None) -> int:
        """Start one read at unstarted ``start``, coalescing forward while the pages
        file stays contiguous, up to ``limit`` and ``budget`` bytes.  Returns its end."""
        layout = self.layout
        unloaded = self.unloaded
        i = layout.find(start)
        pos = start
        file_pos = layout.file[i] + (start - layout.mem[i])
        file_offset = file_pos
        segments: list[list[int]] = []
        total = 0
        while True:
            interval = unloaded.interval_at(pos)
            assert interval is not None
            range_end = layout.mem[i] + layout.length[i]
            stop = min(interval[1], range_end)
            end = min(stop, limit, pos + budget - total)
            if segments and segments[-1][1] == pos:
                segments[-1][1] = end
            else:
                segments.append([pos, end])
            total += end - pos
            file_pos += end - pos
            if end < stop or end >= limit or total >= budget:
                break
            nxt = unloaded.first_at_or_after(end)
            if nxt is None or nxt[0] >= limit:
                break
            j = layout.find(nxt[0])
            if layout.file[j] + (nxt[0] - layout.mem[j]) != file_pos:
                break
            pos, i = nxt[0], j
        for lo, hi in segments:
            unloaded.remove(lo, hi)
            self.inflight.add(lo, hi)
        read = _Read(self._next_id, file_offset, segments, urgent, owner)
        self._next_id += 1
        if owner is not None:
            owner.inflight += 1
        elif not urgent:
            self._background_inflight += 1
        self._reads_total += 1
        self._submit(read)
        return segments[-1][1]

    def _submit(self, read: _Read) -> None:
        self._reads[read.id] = read
        dest = self.destination
        buffers = [dest.buffer(lo, hi - lo) for lo, hi in read.segments]
        if len(buffers) == 1:
            request = aio.Request.read(read.id, self.pages_fd, read.file_offset, buffers[0], urgent=read.urgent)
        else:
            request = aio.Request.readv(read.id, self.pages_fd, read.file_offset, buffers, urgent=read.urgent)
        self.queue.add(request)

    def _complete(self, completion: aio.Completion) -> None:
        read = self._reads.pop(completion.id)
        result = completion.result
        if result == read.length:
            self._finish_read(read)
            self._settle(read.segments, None)
            return
        if result > 0:  # short read: keep what arrived, resubmit the rest
            done, rest = _split(read.segments, result)
            self._settle(done, None)
            read.segments = rest
            read.length -= result
            read.file_offset += result
            self._reads_retried += 1
            self._submit(read)
            return
        err = -result if result < 0 else errno_mod.EIO
        read.attempts += 1
        if (result == 0 or err in _RETRIABLE) and read.attempts <= self.config.max_retries:
            self._reads_retried += 1
            self._submit(read)
            return
        self._finish_read(read)
        if read.length > self.page_size:  # narrow it down: only the bad pages fail
            self._split_failed(read)
            return
        message = (
            f"pages file ended early at offset {read.file_offset:#x}" if result == 0
            else f"reading the pages file at offset {read.file_offset:#x}: {os.strerror(err)}"
        )
        self._settle(read.segments, LoadError("io-error", message, err))

    def _split_failed(self, read: _Read) -> None:
        """Retry a failed multi-page read as two halves (until single pages fail),
        so an error costs only the pages it is really on."""
        half = max(self.page_size, (read.length // 2) & ~(self.page_size - 1))
        first, second = _split(read.segments, half)
        for segments, file_offset in ((first, read.file_offset), (second, read.file_offset + half)):
            if segments:
                self._resubmit.append(_Read(self._next_id, file_offset, segments, read.urgent, None))
                self._next_id += 1
                self._reads_retried += 1

    def _finish_read(self, read: _Read) -> None:
        if read.owner is not None:
            owner = read.owner
            owner.inflight -= 1
            if (not owner.queued and not owner.finished and not owner.cancelled
                    and owner.cursor < owner.hi and self._has_unstarted(owner)):
                owner.queued = True
                self._priority.append(owner)
        elif not read.urgent:
            self._background_inflight -= 1

    def _settle(self, segments: list[list[int]], error: LoadError | None) -> None:
        """Segments are loaded (or failed): update the sets and the waiters."""
        inflight = self.inflight
        dest = self.destination
        for lo, hi in segments:
            inflight.remove(lo, hi)
            if error is None:
                self.loaded_bytes += hi - lo
                if dest.needs_commit:
                    dest.commit(lo, hi - lo)
                for listener in self._loaded_listeners:
                    listener(lo, hi)
            else:
                self.failed.add(lo, hi)
                err = error.errno or errno_mod.EIO
                self._failed_by_errno.setdefault(err, RangeSet()).add(lo, hi)
        if self._waiters:
            finished: list[WaitHandle] | None = None  # allocated only when someone is done
            for w in self._waiters:
                got = 0
                for lo, hi in segments:
                    if lo < w.hi and hi > w.lo:
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
                    self._finish_waiter(w, now)
        if not self.unloaded and not self.inflight:
            self._mark_done()

    def _finish_waiter(self, w: WaitHandle, now: int) -> None:
        w.finished = True
        self._last_wait_ns = now
        self._drop_waiter(w, now)
        elapsed = now - w.start_ns
        self._wait_ns += elapsed
        self.histogram.record(elapsed)
        if w.error is None:
            self._waits_served += 1
        else:
            self._waits_failed += 1
        if w.callback is not None:
            w.callback(w)

    def _drop_waiter(self, w: WaitHandle, now: int) -> None:
        try:
            self._waiters.remove(w)
        except ValueError:
            return
        if not self._waiters and self._blocked_since is not None:
            self._blocked_ns += now - self._blocked_since
            self._blocked_since = None

    def _failure_for(self, lo: int, hi: int) -> LoadError:
        for err, ranges in self._failed_by_errno.items():
            for flo, fhi in ranges.overlapping(lo, hi):
                return LoadError("io-error", f"memory {flo:#x}+{fhi - flo:#x} failed to load: {os.strerror(err)}", err)
        return LoadError("io-error", "part of the range failed to load", errno_mod.EIO)

    def _failed_ranges(self, limit: int) -> list[tuple[int, int, int]]:
        """(offset, length, errno) of the failed intervals, lowest first, at most ``limit``."""
        out = [(lo, hi - lo, err) for err, ranges in self._failed_by_errno.items() for lo, hi in ranges]
        out.sort()
        return out[:limit]

    def _mark_done(self) -> None:
        if not self.done.is_set():
            self._finished_ns = time.perf_counter_ns()
            self.done.set()

    async def _drain(self) -> None:
        """Let reads in flight finish (their waiters are answered), then fail the rest."""
        self._closing = True
        with trio.CancelScope(shield=True):
            while self._reads and not self.queue.closed:
                for completion in await self.queue.wait(1):
                    self._complete(completion)
        shutdown = LoadError("shutting-down", "the daemon is shutting down")
        now = time.perf_counter_ns()
        for w in list(self._waiters):
            w.error = shutdown
            self._finish_waiter(w, now)
        self._priority.clear()
        self._prefetch.clear()
        self._resubmit.clear()


def _split(segments: list[list[int]], nbytes: int) -> tuple[list[list[int]], list[list[int]]]:
    """Cut ``segments`` after ``nbytes`` bytes: (the part read, the rest)."""
    done: list[list[int]] = []
    rest: list[list[int]] = []
    left = nbytes
    for lo, hi in segments:
        if left >= hi - lo:
            done.append([lo, hi])
            left -= hi - lo
        elif left > 0:
            done.append([lo, lo + left])
            rest.append([lo + left, hi])
            left = 0
        else:
            rest.append([lo, hi])
    return done, rest



