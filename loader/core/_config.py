"""The loader's small records: its configuration, the error a wait gets, why a read
was issued, a blocked wait's handle, a prefetch hint, a gathered read's segments, and the flags the loop's parts
share (:class:`LoopState`)."""

from __future__ import annotations

import enum
import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, overload


@dataclass(frozen=True, slots=True)
class LoaderConfig:
    read_size: int = 256 << 10  #: largest read for a waiter (gVisor: 256 KiB); bounds one wait's turn
    sweep_read_size: int = 1 << 20  #: largest background read: fewer, larger reads when nobody waits
    queue_depth: int = 64  #: AIO queue capacity
    background_reads: int = 8  #: most sweep reads in flight; the rest of the queue is for waiters
    #: while clients are faulting (a wait blocked within ``busy_linger_s``), the sweep
    #: shrinks to this many reads (of ``sweep_read_size``), leaving CPU and disk to
    #: the waiters; None: one less than the CPUs (at least 1, at most background_reads)
    busy_background_reads: int | None = None
    busy_linger_s: float = 0.05
    waiter_reads: int = 4  #: most reads in flight on behalf of one waiter (rotation bound)
    max_retries: int = 3  #: per read, for errors that may pass and for reads returning nothing
    sweep: bool = True  #: False: lazy, load only what is waited for or prefetched
    priority: bool = True  #: False: waits do not jump ahead of the sweep (first come, first served)
    #: a read not completed after this many seconds fails with ``timeout`` and frees
    #: its slot (None: no deadline)
    read_timeout: float | None = 30.0
    verify: bool = True  #: check each chunk against the checkpoint's checksum before serving it
    #: a wait for at most this many unstarted bytes of one range is read at once, in the
    #: waiting client's task, when the queue can do it without blocking (page cache);
    #: 0: never.  Without priority or with checksums it is never done.
    read_now_bytes: int = 64 << 10
    #: background reads and a waiter's reads over 64 KiB copy file to file in the kernel
    #: (``aio.Op.COPY``: splice), where the queue takes copies and the destination has a
    #: ``copy_fd``: no page fault per page of the memory file, so one thread fills at
    #: about ``cp``'s speed; False: every read goes into the destination's mapping
    kernel_copy: bool = True

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
        if self.read_timeout is not None and not self.read_timeout > 0:
            raise ValueError("read_timeout must be positive")


class LoadError(Exception):
    """A wait could not be satisfied: ``code`` is one of :mod:`protocol.codes`
    (``io-error``, ``corrupt``, ``timeout``, ``shutting-down``)."""

    def __init__(self, code: str, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.errno = errno


class ReadKind(enum.Enum):
    """Why a read was issued; decides its urgency and which share of the queue it uses."""

    WAITER = "waiter"  #: for one blocked waiter (its ``owner``): urgent
    PREFETCH = "prefetch"  #: for a prefetch hint: background share
    SWEEP = "sweep"  #: the background sweep: background share

    @property
    def urgent(self) -> bool:
        return self is ReadKind.WAITER


class CallbackBatch(Protocol):
    """Brackets a run of wait callbacks (the server sends their replies at ``close``)."""

    def open(self) -> None: ...

    def close(self) -> None: ...


class _NoBatch:
    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


class WaitHandle:
    """One blocked wait.  Completed exactly once: ``callback(handle)`` with
    ``handle.error`` None on success, else a :class:`LoadError`."""

    __slots__ = (
        "lo", "hi", "read_hi", "cursor", "remaining", "error", "callback", "start_ns",
        "inflight", "queued", "finished", "cancelled", "context", "chunk_lo", "chunk_hi",
    )

    def __init__(self, lo: int, hi: int, remaining: int, callback: Callable[[WaitHandle], None] | None,
                 start_ns: int, context: object = None, read_lo: int | None = None,
                 read_hi: int | None = None) -> None:
        self.lo = lo
        self.hi = hi
        #: this waiter's reads cover [read_lo, read_hi): its bytes, widened to whole
        #: checksum chunks when chunks are verified
        self.read_hi = hi if read_hi is None else read_hi
        self.cursor = lo if read_lo is None else read_lo  #: where its next priority read may start
        self.remaining = remaining  #: bytes still to be loaded
        self.error: LoadError | None = None
        self.callback = callback
        self.start_ns = start_ns
        self.inflight = 0  #: reads in flight that this waiter issued
        self.queued = False  #: in the priority deque
        self.finished = False
        self.cancelled = False
        self.context = context  #: the caller's (e.g. the request id)
        #: the checksum chunks its bytes are in, first and last (none: last < first)
        self.chunk_lo, self.chunk_hi = 0, -1


class Hint:
    """A prefetch hint: a span to read ahead of the sweep.  Nobody waits on it."""

    __slots__ = ("cursor", "read_hi")

    def __init__(self, lo: int, hi: int) -> None:
        self.cursor = lo
        self.read_hi = hi



class Segs(Sequence[list[int]]):
    """A gathered read's segments, ``[lo, hi]`` lists made only when asked for: the
    read keeps them as two columns (starts and lengths), so a thousand ranges landing
    together cost no Python object each unless a waiter or an error looks at them."""

    __slots__ = ("los", "lens")

    def __init__(self, los: array[int], lens: array[int]) -> None:
        self.los = los
        self.lens = lens

    def __len__(self) -> int:
        return len(self.los)

    @overload
    def __getitem__(self, i: int) -> list[int]: ...

    @overload
    def __getitem__(self, i: slice) -> list[list[int]]: ...

    def __getitem__(self, i: int | slice) -> list[int] | list[list[int]]:
        if isinstance(i, slice):
            return [[lo, lo + n] for lo, n in zip(self.los[i], self.lens[i])]
        lo = self.los[i]
        return [lo, lo + self.lens[i]]

    def __iter__(self) -> Iterator[list[int]]:
        for lo, n in zip(self.los, self.lens):
            yield [lo, lo + n]


class LoopState:
    """What the loop's parts share about the loop itself: whether :meth:`Loader.run`
    runs, whether the loader is shutting down, whether clients are faulting (``busy``:
    background work yields the CPU meanwhile), and the batch that wait callbacks run in."""

    __slots__ = ("running", "closing", "busy", "reply_batch")

    def __init__(self) -> None:
        self.running = False
        self.closing = False
        self.busy = True  # as the queue starts: background reads yield until the first round
        #: wait callbacks run inside ``reply_batch.open()`` ... ``close()``, one pair per
        #: batch of completions (the server writes the batch's replies at the close)
        self.reply_batch: CallbackBatch = _NoBatch()

    def is_busy(self) -> bool:
        """Clients are faulting (read from other threads: hashing lets the GIL go then)."""
        return self.busy
