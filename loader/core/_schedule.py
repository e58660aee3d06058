"""The loader's loop: one trio task (:meth:`Scheduler.loop`, run by :meth:`Loader.run`)
owns the AIO queue.  Each round it

0. resubmits the halves of failed multi-page reads that are being narrowed down
   to the pages really failing (a waiter's halves at once, background halves
   within the background share);
1. serves waiters: at most one read of at most ``read_size`` per waiter per
   round, rotating, so a 1 GiB wait cannot starve a 4 KiB one;
2. then prefetch hints;
3. then fills what is left of the background share of the queue with the sweep,
   which reads unstarted ranges in the order a :class:`SweepOrder` gives,
   coalescing ranges whose pages-file offsets are contiguous;
4. waits for at least one completion, for new work, or for the earliest read
   deadline (``read_timeout``): a read past it fails with ``timeout`` and its slot
   is freed.

Every read has a :class:`ReadKind`: ``WAITER`` reads (on behalf of one waiter,
marked urgent so backends start them before queued background reads),
``PREFETCH`` and ``SWEEP`` reads (the background share: never more than
``background_reads`` in flight, so slots stay free for waiters).  A read's kind
is kept through its retries and its halves, and each read is counted while it
is in flight and only then.
"""

from __future__ import annotations

import time
from collections import deque

import trio

import aio

from ._config import Hint, LoaderConfig, LoopState, ReadKind, WaitHandle
from ._rangeset import RangeSet
from ._reads import Reads
from ._settle import Settler
from ._sweep import SweepOrder
from ._verify import Verifier
from ._window import Window


class Scheduler:
    """Decides, each round of :meth:`loop`, which reads start: waiters first (the
    ``priority`` deque, rotating), then prefetch hints, then the sweep, within the
    background share; and wakes the loop when work arrives (:meth:`poke`)."""

    def __init__(self, config: LoaderConfig, queue: aio.Queue, order: SweepOrder, reads: Reads, window: Window,
                 verifier: Verifier, settler: Settler, state: LoopState) -> None:
        self.config = config
        self.queue = queue
        self.order = order
        self.reads = reads
        self.window = window
        self.unloaded: RangeSet = window.unloaded
        self.verifier = verifier
        self.settler = settler
        self._state = state
        # optional hooks (working-set replay, loader.core._workingset): asked once
        hooks = order.hooks()
        self._order_limit = hooks.limit_for
        self._order_full = hooks.wants_full_width
        self._priority: deque[WaitHandle] = deque()
        self._prefetch: deque[Hint] = deque()
        self._linger_ns = int(config.busy_linger_s * 1e9)
        self.sweep_held = False  #: see :meth:`Loader.hold_sweep`
        self._wait_scope: trio.CancelScope | None = None
        self._kick = trio.Event()

    def full_width(self) -> bool:
        """The order keeps the sweep at full width while clients fault (working-set replay)."""
        return self._order_full is not None and self._order_full()

    # ------------------------------------------------------------------ work arriving
    def enqueue(self, w: WaitHandle) -> None:
        """A new waiter: into the priority deque if it wants a turn, and wake the loop."""
        if self.config.priority and self._wants_turn(w):
            w.queued = True
            self._priority.append(w)
            self.poke()

    def hint(self, lo: int, hi: int) -> None:
        """A prefetch hint for [lo, hi): read ahead of the sweep, behind waiters."""
        self._prefetch.append(Hint(lo, hi))
        self.poke()

    def clear(self) -> None:
        """Shutting down: forget the waiters' turns and the hints."""
        self._priority.clear()
        self._prefetch.clear()

    def poke(self) -> None:
        """New work arrived: wake the driver if it is parked or blocked in queue.wait."""
        if self._wait_scope is not None:
            if self.reads.room() or self._state.closing:
                self._wait_scope.cancel()
        else:
            self._kick.set()

    def wake(self) -> None:
        """Wake the driver whatever it waits for (hashed chunks to settle)."""
        if self._wait_scope is not None:
            self._wait_scope.cancel()
        else:
            self._kick.set()

    def set_busy(self, busy: bool) -> None:
        """Clients are faulting (or no longer): the queue's background reads yield the
        CPU to this thread meanwhile (:meth:`aio.Queue.background_yields`), and so does
        the hash thread."""
        state = self._state
        if busy != state.busy:
            state.busy = busy
            self.queue.background_yields(busy)
            self.verifier.set_busy(busy)

    # ------------------------------------------------------------------ the loop
    async def loop(self) -> None:
        queue, reads, verifier, state = self.queue, self.reads, self.verifier, self._state
        done = self.settler.done
        while not state.closing:
            if verifier.hashed:
                verifier.settle_hashed()
            self.schedule()
            if not reads.table:
                if (done.is_set() and not self._priority and not self._prefetch
                        and not verifier.hashing()):
                    return
                self._kick = trio.Event()
                await self._kick.wait()
                continue
            with trio.CancelScope(deadline=reads.next_deadline()) as scope:
                self._wait_scope = scope
                completions = await queue.wait(1)
            self._wait_scope = None
            if scope.cancelled_caught:
                reads.expire(trio.current_time())
                continue
            batch = state.reply_batch
            batch.open()
            try:
                for completion in completions:
                    reads.complete(completion)
            finally:
                batch.close()

    def schedule(self) -> None:
        if self._state.closing:
            return
        cfg = self.config
        room = self.reads.room
        now = time.perf_counter_ns()
        waiters = self.settler.waiters
        full = self.full_width()  # working-set replay keeps its width
        if (waiters or now - self.settler.last_wait_ns < self._linger_ns) and not full:
            background_cap = cfg.busy_background_reads or 1  # a blocked wait: fewer reads ahead of it
        else:
            background_cap = cfg.background_reads
        # any fault, also one read at once: the background reads yield the CPU
        self.set_busy(not full and (bool(waiters) or now - self.settler.last_fault_ns < self._linger_ns))
        # 0. halves of failed reads, being narrowed down: a waiter's at once,
        #    background ones within the background share
        reads = self.reads
        resubmit = reads.resubmit
        for _ in range(len(resubmit)):
            if not room():
                break
            read = resubmit.popleft()
            if read.kind.urgent or reads.background_inflight < background_cap:
                reads.submit(read)
            else:
                resubmit.append(read)
        # 1. waiters, one read each per round, rotating
        prio = self._priority
        while prio and room():
            progressed = False
            for _ in range(len(prio)):
                if not room():
                    break
                w = prio.popleft()
                w.queued = False
                if w.finished or w.cancelled:
                    continue
                if self._issue_for(w, ReadKind.WAITER, w):
                    progressed = True
                self.requeue(w)
            if not progressed:
                break
        # 2. prefetch hints, 3. the sweep: within the background share only, and a
        # smaller one while clients are faulting; paused while hashing is behind
        pf = self._prefetch
        while pf and reads.background_inflight < background_cap and room():
            hint = pf[0]
            if not self._issue_for(hint, ReadKind.PREFETCH, None) or not self._has_unstarted(hint):
                pf.popleft()
        self.window.refill()  # (also without the sweep: the window's holes and totals must be found)
        if not cfg.sweep or self.sweep_held or self.verifier.paused():
            return
        order = self.order
        while reads.background_inflight < background_cap and room():
            start = order.next_start(self.unloaded)
            if start is None:
                if self.window.refill(force=True):
                    continue
                break
            limit = self._order_limit(start) if self._order_limit is not None else None
            reads.issue(start, limit or self.window.memory_size, cfg.sweep_read_size, ReadKind.SWEEP, None)

    def _wants_turn(self, w: WaitHandle) -> bool:
        """The one rule for (re-)entering the priority deque: a live waiter with
        unstarted bytes to read and fewer than ``waiter_reads`` reads in flight."""
        return (not w.queued and not w.finished and not w.cancelled
                and w.inflight < self.config.waiter_reads and self._has_unstarted(w))

    def requeue(self, w: WaitHandle) -> None:
        """A waiter back in the deque if it wants another turn (after its read left flight)."""
        if self.config.priority and self._wants_turn(w):
            w.queued = True
            self._priority.append(w)

    def _has_unstarted(self, target: WaitHandle | Hint) -> bool:
        if target.cursor >= target.read_hi:
            return False
        nxt = self.unloaded.first_at_or_after(target.cursor)
        return nxt is not None and nxt[0] < target.read_hi

    def _issue_for(self, target: WaitHandle | Hint, kind: ReadKind, owner: WaitHandle | None) -> bool:
        nxt = self.unloaded.first_at_or_after(target.cursor)
        if nxt is None or nxt[0] >= target.read_hi:
            target.cursor = target.read_hi
            return False
        end = self.reads.issue(nxt[0], target.read_hi, self.config.read_size, kind, owner)
        target.cursor = end
        if kind.urgent:
            self.order.note_served(end)
        return True
