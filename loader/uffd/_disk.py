"""The disk threads: faults whose source page is not in the page cache are handed to
them, so that the fault thread never reads the disk (docs/UFFD.md "Faults": "The
disk is never read in the fault thread").  Up to :data:`_DISK_THREADS` threads,
started when needed, read the page in (``MADV_POPULATE_READ``) and hand the fault
back; a fault still waiting at the loader's read deadline is answered as a failed
read (the fault thread poisons it)."""

from __future__ import annotations

import mmap
import threading
import time
from collections import deque

from ._config import _Counters
from ._shared import Shared
from ._source import _PageCache
from ._state import HandlerState

_PAGE_MASK = ~(mmap.PAGESIZE - 1)
_DISK_THREADS = 4  #: at most this many threads read uncached source pages for faults


class DiskReads:
    """The fault thread's hand-off to the disk threads: :meth:`read` and :meth:`take`
    are the fault thread's; everything under :attr:`cv` is shared with the disk
    threads (:meth:`_main`)."""

    def __init__(self, state: HandlerState, shared: Shared, counts: _Counters, read_timeout: float | None) -> None:
        self.state = state
        self.shared = shared
        self.counts = counts  #: the fault thread's
        self.cv = threading.Condition(threading.Lock())
        # under cv
        self.out: dict[int, tuple[int, int, int]] = {}  #: va -> (address, start_ns, deadline_ns)
        self.queue: deque[tuple[int, int, int]] = deque()  #: (va, src, length)
        self.done: list[int] = []  #: va read in (or failed: the copy says)
        self.threads: list[threading.Thread] = []
        self.idle = 0  #: disk threads waiting for work
        self.deadline_ns = None if read_timeout is None else int(read_timeout * 1e9)

    def read(self, va: int, src: int, length: int, address: int, start_ns: int) -> bool:
        """Hand an uncached source page to a disk thread; False when they are all stuck
        past the deadline (the caller then takes the loader's path)."""
        now = time.perf_counter_ns()
        deadline = now + self.deadline_ns if self.deadline_ns is not None else 1 << 62
        with self.cv:
            if self.idle == 0 and len(self.threads) >= _DISK_THREADS:
                oldest = min((d for _, _, d in self.out.values()), default=deadline)
                if oldest <= now:
                    return False
            if va in self.out:  # a second vCPU on the same page: one read, one copy wakes both
                return True
            self.out[va] = (address, start_ns, deadline)
            self.queue.append((va, src, length))
            if self.idle == 0 and len(self.threads) < _DISK_THREADS:
                t = threading.Thread(target=self._main, name="pageload-uffd-disk", daemon=True)
                self.threads.append(t)
                t.start()
            else:
                self.cv.notify()
        self.counts.uncached += 1
        return True

    def _main(self) -> None:
        """A disk thread: read queued source pages into the page cache (the GIL is
        released while the disk is read), hand each back to the fault thread."""
        cache = _PageCache()
        state = self.state
        while True:
            with self.cv:
                while not self.queue and state.running:
                    self.idle += 1
                    self.cv.wait()
                    self.idle -= 1
                if not state.running:
                    return
                va, src, length = self.queue.popleft()
            lo = src & _PAGE_MASK
            cache.populate(lo, src + length - lo)
            with self.cv:
                self.done.append(va)
            self.shared.wake()

    def stop(self) -> None:
        """After the state stopped running: let waiting disk threads see it."""
        with self.cv:
            self.cv.notify_all()

    def timeout_ms(self) -> int:
        """The fault thread's poll timeout: until the first disk read's deadline."""
        with self.cv:
            first = min((d for _, _, d in self.out.values()), default=0)
        return max(0, (first - time.perf_counter_ns()) // 1_000_000 + 1)

    def take(self) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
        """Fault thread: the faults whose page was read in (copy them now), and those
        past the read deadline (answer them as failed reads)."""
        ready: list[tuple[int, int, int]] = []
        late: list[tuple[int, int]] = []
        with self.cv:
            done, self.done = self.done, []
            for va in done:
                entry = self.out.pop(va, None)
                if entry is not None:  # (None: answered at its deadline already)
                    ready.append(entry)
            now = time.perf_counter_ns()
            for va in [va for va, (_, _, d) in self.out.items() if d <= now]:
                address, start_ns, _ = self.out.pop(va)
                late.append((address, start_ns))
        return ready, late

    def expire_all(self) -> None:
        """Stopping: every fault still waiting is past its deadline now."""
        with self.cv:
            for va in list(self.out):
                self.out[va] = (*self.out[va][:2], 0)
