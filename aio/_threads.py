"""Thread-pool backend: a few OS threads run ``preadv`` with the GIL released.

gVisor's preferred engine.  Many writers into one memfd contend in the kernel's
page-cache insert, so the pool is small (``pageload bench`` measures the size).
Completions reach trio through the run's token: a worker wakes the trio task only
when it is parked in :meth:`wait`, so there is no polling and no per-request task.

Four things keep faults fast on a busy machine (see docs/BENCHMARKS.md):

* a small urgent read (<= ``inline_urgent``) is tried at once in the caller's thread
  with ``RWF_NOWAIT``: a page-cache hit costs microseconds and needs no hand-off to a
  worker; a miss (EAGAIN) goes to a worker like any other request;
* the pool's workers run at a higher nice value than the trio thread that answers
  clients while clients fault (:meth:`ThreadQueue.background_yields`), and at the
  caller's otherwise (where the process may lower a nice value: root, or
  ``RLIMIT_NICE``), so a fill nobody waits on competes with other processes as
  ``cp`` would;
* while background reads yield, at most ``yield_threads`` of the pool's workers run
  them at once (one less than the CPUs); the others wait, the reads stay queued.
  More running workers than CPUs push each other off the CPUs, and one pushed off
  while it holds the GIL (taken back after each ``preadv``) keeps the trio thread
  waiting until its next turn: gaps of milliseconds in the trio thread between two
  lines of Python (docs/BENCHMARKS.md);
* an urgent lane: ``urgent_threads`` more threads (1) that take urgent requests
  only, at the caller's priority, so a read someone is blocked on never queues
  behind a pool full of background reads, even hung ones.

:meth:`ThreadQueue.cancel_unstarted` completes the requests no thread has taken
yet with ``-ECANCELED`` (the loader's shutdown drops queued reads with it).
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Sequence

import trio

from ._base import Completion, Op, Queue, Request, SplicePipe, read_nowait, read_nowait_v, run_request, usable_cpus

DEFAULT_THREADS = 4
DEFAULT_INLINE_URGENT = 64 << 10
DEFAULT_WORKER_NICE = 10
#: background Op.GATHER requests run by at most this many workers at once, where they
#: are a Python loop of one small ``pread`` a range (each giving the GIL up and taking
#: it back, so two at once mostly wait for each other and the trio thread: a 1M-range
#: raw image's fill took 6.1-6.6 s against 7.1-8.1 s with the four, alternated;
#: docs/AIO.md).  Gathers read in batches through a ring (:mod:`aio._batch`) take the
#: GIL once a batch: then as many as the CPUs (``gather_threads=None`` picks)
DEFAULT_GATHER_THREADS = 1


def default_gather_threads() -> int:
    """One a CPU where gathers read in batches through a ring (:mod:`aio._batch`), else
    :data:`DEFAULT_GATHER_THREADS`."""
    from ._batch import unavailable

    return max(1, usable_cpus()) if unavailable() is None else DEFAULT_GATHER_THREADS


def default_yield_threads() -> int:
    """One less than the CPUs this process may run on, at least 1."""
    return max(1, usable_cpus() - 1)


class ThreadQueue(Queue):
    name = "threads"
    copies = True  # Op.COPY: each worker splices through a pipe of its own
    gathers = True  # Op.GATHER: a worker reads the ranges one after the other
    calls = True  # Op.CALL: a worker runs the callable (urgent ones in the urgent lane too)

    def __init__(self, capacity: int = 64, threads: int | None = None, *,
                 inline_urgent: int = DEFAULT_INLINE_URGENT, worker_nice: int = DEFAULT_WORKER_NICE,
                 urgent_threads: int = 1, yield_threads: int | None = None,
                 gather_threads: int | None = None) -> None:
        super().__init__(capacity)
        self.threads = threads or DEFAULT_THREADS
        #: threads that take urgent requests only (the urgent lane)
        self.urgent_threads = urgent_threads
        #: urgent requests up to this many bytes run in the caller's thread, at add():
        #: no hand-off to a worker (a page-cache hit costs microseconds)
        self.inline_urgent = inline_urgent
        #: the pool's workers run at this nice value while background reads yield
        #: (from the start, and after ``background_yields(True)``), so the trio thread
        #: (which answers faults) wins the CPU when the machine is busy; -1 means
        #: SCHED_IDLE (they run only when nothing else wants the CPU; kept for good)
        self.worker_nice = worker_nice
        #: while background reads yield, at most this many of the pool's workers run
        #: them at once (urgent requests are not counted nor held back)
        self.yield_threads = default_yield_threads() if yield_threads is None else yield_threads
        #: background :data:`Op.GATHER` requests running at once, at most (urgent ones are
        #: not counted nor held back)
        self.gather_threads = default_gather_threads() if gather_threads is None else gather_threads
        self._pool_tids: list[int] = []  # native ids of the pool's workers
        self._yielding = True
        self._base_nice = os.getpriority(os.PRIO_PROCESS, 0)  # this thread's: what workers go back to
        self.inline_reads = 0  #: urgent reads done in place (by add() or read_now())
        if self.threads < 1 or urgent_threads < 0 or self.yield_threads < 1 or self.gather_threads < 1:
            raise ValueError("threads, yield_threads and gather_threads must be at least 1 and urgent_threads "
                             "at least 0")
        self._token = trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._urgent_work = threading.Condition(self._lock)  # the urgent lane waits here
        self._urgent: deque[Request] = deque()
        self._normal: deque[Request] = deque()
        self._running = 0
        self._running_background = 0  # non-urgent requests the pool's workers are running
        self._running_gathers = 0  # of those, Op.GATHER requests
        self._ready: list[Completion] = []
        self._parked: trio.Event | None = None
        self._idle = threading.Condition(self._lock)
        self._stopping = False
        self._workers = [
            threading.Thread(target=self._worker, name=f"pageload-aio-{i}", daemon=True)
            for i in range(self.threads)
        ] + [
            threading.Thread(target=self._worker, args=(True,), name=f"pageload-aio-urgent-{i}", daemon=True)
            for i in range(urgent_threads)
        ]
        for worker in self._workers:
            worker.start()

    def _add(self, request: Request) -> None:
        if request.urgent and request.op in (Op.READ, Op.READV) and request.length <= self.inline_urgent:
            # a small read someone is blocked on: do it here if the page cache has it
            # (RWF_NOWAIT fails rather than block); otherwise a worker does it
            try:
                result = os.preadv(request.fd, request.buffers, request.offset, os.RWF_NOWAIT)
            except OSError:
                result = -1
            if result == request.length:
                self.inline_reads += 1
                if request.then is not None:
                    try:
                        request.then()
                    except Exception:  # the caller's: it finds its work undone
                        pass
                with self._lock:
                    self._ready.append(Completion(request.id, result))
                return
        with self._lock:
            if request.urgent:
                self._urgent.append(request)
                self._urgent_work.notify()  # whichever wakes first takes it; the other sleeps again
            else:
                self._normal.append(request)
                if request.op == Op.GATHER and self._running_gathers >= self.gather_threads:
                    return  # no worker may take it now: the one running a gather takes it next
            self._work.notify()

    def read_now(self, fd: int, buffer: memoryview, offset: int) -> int:
        """:meth:`Queue.read_now`: ``preadv2(RWF_NOWAIT)`` for up to ``inline_urgent`` bytes."""
        if self._stopping or len(buffer) > self.inline_urgent:
            return -1
        result = read_nowait(fd, buffer, offset)
        if result == len(buffer):
            self.inline_reads += 1
        return result

    def read_now_v(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        """:meth:`Queue.read_now_v` as one ``preadv2(RWF_NOWAIT)``, up to ``inline_urgent`` bytes."""
        total = sum(len(b) for b in buffers)
        if self._stopping or total > self.inline_urgent:
            return -1
        result = read_nowait_v(fd, buffers, offset)
        if result == total:
            self.inline_reads += 1
        return result

    def cancel_unstarted(self) -> int:
        """Complete every request no thread has started with ``-ECANCELED``; returns how many."""
        with self._lock:
            dropped = [*self._urgent, *self._normal]
            self._urgent.clear()
            self._normal.clear()
            self._ready.extend(Completion(r.id, -errno.ECANCELED) for r in dropped)
            parked = self._parked if dropped else None
            if parked is not None:
                self._parked = None
        if parked is not None:
            parked.set()
        return len(dropped)

    def _run(self, request: Request, pipe: SplicePipe | None = None) -> int:
        """Perform one request in a worker thread (tests override it to make reads hang)."""
        return run_request(request, pipe)

    def background_yields(self, yields: bool) -> None:
        """:meth:`Queue.background_yields`: the pool's workers go to ``worker_nice``
        (``yields``) or back to the nice value of the thread that made the queue.
        Going back needs the right to lower a nice value; without it they stay.
        While yielding, at most ``yield_threads`` workers run background reads."""
        if yields == self._yielding:
            return
        with self._lock:
            self._yielding = yields
            tids = list(self._pool_tids)
            if not yields:
                self._work.notify_all()  # the workers held back take the queued reads
        if self.worker_nice <= 0:
            return
        nice = self.worker_nice if yields else self._base_nice
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except OSError:  # EACCES without CAP_SYS_NICE; ESRCH once a worker ended
                pass

    def _worker(self, urgent_only: bool = False) -> None:
        if self.worker_nice and not urgent_only:
            tid = threading.get_native_id()
            try:
                if self.worker_nice < 0:
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                else:
                    with self._lock:  # background_yields() sees this worker from here on
                        self._pool_tids.append(tid)
                        if self._yielding:
                            os.setpriority(os.PRIO_PROCESS, tid, self.worker_nice)
            except OSError:
                pass
        pipe = SplicePipe()  # this worker's, for Op.COPY
        try:
            self._serve(urgent_only, pipe)
        finally:
            pipe.close()

    def _serve(self, urgent_only: bool, pipe: SplicePipe) -> None:
        lock = self._lock
        while True:
            with lock:
                if urgent_only:
                    while not (self._urgent or self._stopping):
                        self._urgent_work.wait()
                else:
                    while not (self._urgent or self._stopping or (self._normal and (
                            not self._yielding or self._running_background < self.yield_threads) and (
                            self._normal[0].op != Op.GATHER or self._running_gathers < self.gather_threads))):
                        self._work.wait()
                if self._stopping:
                    return
                background = not self._urgent
                request = self._normal.popleft() if background else self._urgent.popleft()
                gather = background and request.op == Op.GATHER
                self._running += 1
                self._running_background += background
                self._running_gathers += gather
            result = self._run(request, pipe)
            with lock:
                self._running -= 1
                self._running_background -= background
                self._running_gathers -= gather
                self._ready.append(Completion(request.id, result))
                parked = self._parked
                if parked is not None:
                    self._parked = None
                if self._stopping and self._running == 0:
                    self._idle.notify_all()
            if parked is not None:
                try:
                    self._token.run_sync_soon(parked.set)
                except trio.RunFinishedError:  # the run ended under us: nobody is waiting
                    pass

    async def _wait(self, min_completions: int) -> list[Completion]:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            with self._lock:
                if len(self._ready) >= min_completions:
                    done, self._ready = self._ready, []
                    break
                event = self._parked = trio.Event()
            try:
                await event.wait()
            finally:
                with self._lock:
                    if self._parked is event:
                        self._parked = None
        await trio.lowlevel.cancel_shielded_checkpoint()
        return done

    async def _aclose(self) -> None:
        with self._lock:
            self._stopping = True
            self._urgent.clear()
            self._normal.clear()
            self._work.notify_all()
            self._urgent_work.notify_all()

        def join() -> None:
            with self._lock:
                while self._running:
                    self._idle.wait()
            for worker in self._workers:
                worker.join()

        await trio.to_thread.run_sync(join)
        self._ready.clear()

    def _ready_count(self) -> int:
        with self._lock:
            return len(self._ready)

