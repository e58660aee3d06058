"""The loader: a background sweep with priority waits, after gVisor's restore loop.

One trio task (:meth:`Loader.run`) owns the AIO queue.  Each round it

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

State is three :class:`RangeSet` of memory offsets: ``unloaded`` (not started),
``inflight`` (being read, or read and waiting for its chunk's checksum) and
``failed``; everything else of the layout is loaded.  ``unloaded`` is a *window*:
it holds the data below :attr:`Loader.frontier`, taken from an :class:`ExtentSource`
a batch at a time as the sweep goes (the layout's columns; or a raw image's file
system, scanned in a worker thread), plus what waits and hints beyond it asked for
(``_beyond``: the source is asked about that one place).  So the loader is ready at
once, and the sets cost what the window holds, not a Python object — nor 16 bytes —
per range of the image.  A waiter counts the bytes
it still needs; each settled span subtracts its overlap, so a waiter joins reads
already in flight instead of reading twice.  A small wait whose bytes the page cache
holds is read at once, in the waiting task, with the queue's ``read_now`` (no request,
no round of this loop: :meth:`Loader._read_now`).

With checksums (a pages checkpoint: one xxh3_64 per ``chunk_size`` of the pages
file, 16 KiB by default), bytes that land are not loaded yet: once every byte of
their chunk has landed, the chunk is hashed, and only then are its bytes loaded
(and waiters answered), or failed with ``corrupt``.  A waiter's reads cover the
whole chunks its bytes are in, so it never waits for the sweep.  A small wait's
chunks are read and hashed at once in the waiting task (:meth:`Loader._verify_now`);
a chunk a waiter needs is hashed on landing; a background read's whole chunks are
hashed by the backend's thread right after it (``aio.Request.then``); the rest go
to the hash thread (:class:`_Hasher`) in runs (docs/DESIGN.md, Verification).
"""

from __future__ import annotations

import ctypes
import enum
import errno as errno_mod
import fcntl
import logging
import math
import os
import threading
import time
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter, sub
from typing import TYPE_CHECKING, Protocol, overload

import trio
import xxhash

import aio
from protocol import codes

from .._memfile import Destination, explain_error
from ._extents import ExtentSource, LayoutExtents
from ._layout import Layout
from ._rangeset import RangeSet, gaps
from ._stats import LatencyHistogram, LoaderCounters, LoaderStatistics
from ._sweep import SequentialOrder, SweepOrder, WorkingSetOrder

log = logging.getLogger("pageload")

if TYPE_CHECKING:
    from ..source import LocalPages, PageSource
    from ._workingset import AccessRecorder

_RETRIABLE = {errno_mod.EINTR, errno_mod.EAGAIN}
#: a waiter's read up to this long goes into the mapping (the threads backend reads
#: such urgent reads at once, in the adding thread, when the page cache has them);
#: a longer one is copied too
_INLINE_LIMIT = 64 << 10
#: a copy completing so says the memory file cannot be written to through its fd
_NO_COPY = {-errno_mod.EINVAL, -errno_mod.EOPNOTSUPP, -errno_mod.EBADF}


def _copy_target(config: LoaderConfig, queue: aio.Queue, destination: Destination,
                 local: LocalPages | None) -> int | None:
    """The destination's fd for file-to-file copies (``aio.Op.COPY``), or None: not
    configured, the queue does not copy, the destination offers none, the source is
    not one local file, or it is read with O_DIRECT (bypassing the page cache, which
    splice reads from)."""
    copy_fd: int | None = getattr(destination, "copy_fd", None)
    if not config.kernel_copy or not queue.copies or copy_fd is None or local is None:
        return None
    try:
        if local.direct or fcntl.fcntl(local.fd, fcntl.F_GETFL) & os.O_DIRECT:
            return None
    except OSError:
        return None
    return copy_fd


#: checksum chunks that landed and wait for their hash: the sweep pauses while this
#: many bytes of them wait (hashing is behind the reads)
_MAX_UNHASHED = 16 << 20
#: a background hash job hashes about this many bytes of landed chunks, in the hash thread
_HASH_BATCH = 1 << 20
#: background hash jobs given to the hash thread at once
_HASH_JOBS = 2
#: the hash thread's nice value while clients fault
_HASH_NICE = 10
#: a chunk a waiter needs, once all its bytes landed, is hashed at once in the loader's
#: task when it is at most this long (no worker-thread round trip, ~10 us per 64 KiB);
#: a longer one goes to the front of the background queue
_INLINE_HASH = 256 << 10
#: extents taken from the source per batch; the window is refilled below the low
#: mark and not beyond the high one (intervals of ``unloaded``: 16 bytes each)
_BATCH_EXTENTS = 1 << 16
_WINDOW_LOW = 1 << 14
_WINDOW_HIGH = 1 << 18
#: a prefetch hint past the window is looked up (and loaded) this far at most
_HINT_PROBE_LIMIT = 64 << 20
#: most ranges one gathered background copy takes (two ``splice`` calls each)
_GATHER_SEGMENTS = 256


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


class _Hint:
    """A prefetch hint: a span to read ahead of the sweep.  Nobody waits on it."""

    __slots__ = ("cursor", "read_hi")

    def __init__(self, lo: int, hi: int) -> None:
        self.cursor = lo
        self.read_hi = hi


def _c_xxh3() -> Callable[[int, int], int] | None:
    """``XXH3_64bits(address, length)`` of the system's libxxhash (0.8 or later), called
    through ctypes, which lets the GIL go for the call; None where there is none, or
    where it does not agree with the ``xxhash`` module on a probe.  The Python module
    keeps the GIL for inputs up to 64 KiB: a worker thread hashing 16 KiB chunks with
    it keeps the trio thread (answering clients) waiting."""
    try:
        f = ctypes.CDLL("libxxhash.so.0").XXH3_64bits
    except (OSError, AttributeError):
        return None
    f.restype = ctypes.c_uint64
    f.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    probe = ctypes.create_string_buffer(bytes(range(256)) * 129)
    # a length of each of XXH3's classes: 0, 1-3, 4-8, 9-16, 17-128, 129-240, longer
    lengths = (0, 1, 4, 9, 17, 129, 241, 33000)
    if any(f(ctypes.addressof(probe), n) != xxhash.xxh3_64_intdigest(probe.raw[:n]) for n in lengths):
        return None
    return f


#: see :func:`_c_xxh3`
_C_XXH3 = _c_xxh3()

#: what :meth:`_Chunks.check` finds: (good memory, merged; chunks good; each bad chunk with its memory)
_Checked = tuple[list[list[int]], int, list[tuple[int, list[tuple[int, int]]]]]


class _Segs(Sequence[list[int]]):
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


class _Read:
    __slots__ = ("id", "kind", "owner", "file_offset", "segments", "length", "attempts", "retry", "deadline",
                 "copied", "gather", "hashed", "columns")

    def __init__(self, id: int, kind: ReadKind, owner: WaitHandle | None, file_offset: int,
                 segments: Sequence[list[int]], retry: bool = False, length: int | None = None) -> None:
        self.id = id
        self.kind = kind
        self.owner = owner  #: the waiter of a WAITER read
        self.file_offset = file_offset
        self.segments = segments  #: [[mem_lo, mem_hi], ...], contiguous in the pages file
        self.length = sum(hi - lo for lo, hi in segments) if length is None else length
        self.attempts = 0
        self.retry = retry  #: a half of a failed read, being narrowed down
        self.deadline = math.inf  #: trio time after which it fails with ``timeout``
        self.copied = False  #: in flight as an ``aio.Op.COPY`` (file to file), not a read
        #: segments apart in the file, each at its own memory offset (a raw image's
        #: ranges: :meth:`Loader._issue_gather`); ``file_offset`` is the first's
        self.gather = False
        #: a gathered read's segments as (starts, lengths) arrays, in memory order, while
        #: they are all of it (None once it is cut: a short read's rest)
        self.columns: tuple[array[int], array[int]] | None = None
        #: (first, last, what check found) for the checksum chunks wholly inside it,
        #: hashed by the backend's thread right after the read (``aio.Request.then``)
        self.hashed: tuple[int, int, _Checked] | None = None


class _Chunks:
    """The checkpoint's checksum chunks: which bytes of each have landed, which are bad,
    which wait for their hash.

    Needs a layout whose ranges lie back to back in the pages file, in memory order
    (pages checkpoints are written so): then chunk ``k``'s memory is the ranges over
    file bytes [k*size, (k+1)*size), in memory order.  Costs 8 bytes a chunk (its
    checksum, the checkpoint's own array); the chunks partly landed (a count of their
    bytes still to land), bad, or waiting for their hash are kept in a dict and sets
    (few at a time).  Chunks are handled in runs of consecutive ones: one walk of
    the layout per run."""

    __slots__ = ("size", "sums", "partial", "bad", "end", "layout", "queued", "runs", "queued_bytes")

    def __init__(self, layout: Layout, chunk_size: int, checksums: Sequence[int]) -> None:
        if chunk_size <= 0 or chunk_size % layout.page_size:
            raise ValueError(f"chunk size {chunk_size} is not a multiple of the page size")
        if not layout.file_ascends():
            raise ValueError("cannot verify chunks: the layout's pages-file offsets do not ascend with memory")
        self.layout = layout
        self.size = chunk_size
        n = len(layout)
        self.end = layout.file[n - 1] + layout.length[n - 1] if n else 0
        count = -(-self.end // chunk_size)
        if len(checksums) != count:
            raise ValueError(f"{len(checksums)} checksums for {count} chunks of {chunk_size} bytes")
        # ranges apart in the file (checked) and ascending cover every byte of [0, end)
        # exactly when their lengths add up to it: then they lie back to back, in memory order
        if layout.data_bytes != self.end:
            covered = 0
            for f, ln in zip(layout.file, layout.length):  # (only to name the chunk at fault)
                if f != covered:
                    break
                covered = f + ln
            raise ValueError(f"cannot verify chunk {covered // chunk_size}: the pages file has bytes outside "
                             "the layout")
        # the checkpoint's array('Q') as it is (no copy)
        self.sums = checksums if isinstance(checksums, array) and checksums.typecode == "Q" else array("Q", checksums)
        #: chunks partly landed: bytes of each still to land (or fail)
        self.partial: dict[int, int] = {}
        self.bad: set[int] = set()
        #: chunks whose bytes all landed, waiting for a background hash: as a set, and as
        #: runs (first, last) in landing order (which may still cover chunks hashed since)
        self.queued: set[int] = set()
        self.runs: deque[tuple[int, int]] = deque()
        self.queued_bytes = 0

    def landed(self, lo: int, hi: int, bad: bool) -> list[int]:
        """File bytes [lo, hi) landed (or failed: ``bad``); returns the chunks now
        complete, ascending.  (Each byte lands once: a chunk wholly inside [lo, hi)
        is complete now; one cut by an end is counted in ``partial``.)"""
        k0, k1 = lo // self.size, (hi - 1) // self.size
        if bad:
            self.bad.update(range(k0, k1 + 1))
        done: list[int] = [k0] if self._take(k0, lo, hi) else []
        if k1 > k0:
            done.extend(range(k0 + 1, k1))
            if self._take(k1, lo, hi):
                done.append(k1)
        return done

    def _take(self, k: int, lo: int, hi: int) -> bool:
        """Chunk ``k``'s part of file bytes [lo, hi) landed: whether all of it has now."""
        c_lo, c_hi = k * self.size, min((k + 1) * self.size, self.end)
        left = self.partial.pop(k, c_hi - c_lo) - (min(hi, c_hi) - max(lo, c_lo))
        if left:
            self.partial[k] = left
            return False
        return True

    def run_bytes(self, first: int, last: int) -> int:
        return min((last + 1) * self.size, self.end) - first * self.size

    def queue(self, first: int, last: int, urgent: bool = False) -> None:
        """Chunks ``first..last`` wait for a background hash (``urgent``: ahead of the others)."""
        self.queued.update(range(first, last + 1))
        self.queued_bytes += self.run_bytes(first, last)
        if urgent:
            self.runs.appendleft((first, last))
        else:
            self.runs.append((first, last))

    def unqueue(self, k: int) -> bool:
        """Take chunk ``k`` out of the hash queue (it is hashed now); False if it was not in it."""
        if k not in self.queued:
            return False
        self.queued.discard(k)
        self.queued_bytes -= self.run_bytes(k, k)
        return True

    def take(self, budget: int) -> list[tuple[int, int]]:
        """The next queued chunks, as runs in landing order, up to ``budget`` bytes
        (at least one chunk); they leave the queue."""
        out: list[tuple[int, int]] = []
        total = 0
        runs, queued, size = self.runs, self.queued, self.size
        while runs and total < budget:
            first, last = runs.popleft()
            k = first
            while k <= last and total < budget:
                if k not in queued:
                    k += 1
                    continue
                j = k
                while j <= last and j in queued and (j == k or total + (j - k + 1) * size <= budget):
                    queued.discard(j)
                    j += 1
                taken = self.run_bytes(k, j - 1)
                total += taken
                out.append((k, j - 1))
                k = j
            if k <= last:
                runs.appendleft((k, last))
        self.queued_bytes -= total
        return out

    def file_spans(self, flo: int, fhi: int) -> list[tuple[int, int]]:
        """The memory of pages-file bytes [flo, fhi), in file order (which is memory order)."""
        layout = self.layout
        files, lengths, mems = layout.file, layout.length, layout.mem
        i = max(bisect_right(files, flo) - 1, 0)
        n = len(files)
        spans: list[tuple[int, int]] = []
        while i < n and files[i] < fhi:
            f = files[i]
            lo, hi = max(f, flo), min(f + lengths[i], fhi)
            if lo < hi:
                spans.append((mems[i] + lo - f, mems[i] + hi - f))
            i += 1
        return spans

    def memory_spans(self, k: int) -> list[tuple[int, int]]:
        """Chunk ``k``'s memory, in pages-file order (which is memory order)."""
        return self.file_spans(k * self.size, min((k + 1) * self.size, self.end))

    def matches(self, destination: Destination, k: int, spans: list[tuple[int, int]]) -> bool:
        """Whether chunk ``k`` (all landed, its memory ``spans``) hashes to its checksum."""
        if len(spans) == 1:
            lo, hi = spans[0]
            return bool(xxhash.xxh3_64_intdigest(destination.buffer(lo, hi - lo)) == self.sums[k])
        hasher = xxhash.xxh3_64()
        for lo, hi in spans:
            hasher.update(destination.buffer(lo, hi - lo))
        return bool(hasher.intdigest() == self.sums[k])

    def check(self, destination: Destination, runs: list[tuple[int, int]],
              polite: Callable[[], bool] | None = None) -> _Checked:
        """Hash each chunk of ``runs`` (all landed) in ``destination``: returns (the
        memory of the good ones, merged; how many were good; each bad one with its
        memory).  One walk of the layout per run.

        xxhash keeps the GIL for inputs up to 64 KiB, so a worker thread hashing a run
        of small chunks would keep the trio thread from running for the whole run:
        where ``polite()`` (in another thread, while clients fault), the chunks of one
        stretch of memory are hashed by the C library through ctypes (``_C_XXH3``,
        which lets the GIL go) where there is one, and otherwise the GIL is let go
        after each chunk (``os.sched_yield``)."""
        size, end, sums = self.size, self.end, self.sums
        buffer = destination.buffer
        good: list[list[int]] = []
        bad: list[tuple[int, list[tuple[int, int]]]] = []
        verified = 0
        plain = xxhash.xxh3_64_intdigest
        yielding = polite is not None and polite()

        def yielding_digest(data: memoryview) -> int:
            value: int = plain(data)
            os.sched_yield()  # (lets the GIL go)
            return value

        def keep(a: int, b: int) -> None:
            """Memory [a, b) is good: merged with the good memory just before it."""
            if good and good[-1][1] == a:
                good[-1][1] = b
            else:
                good.append([a, b])

        digest: Callable[[memoryview], int] = yielding_digest if yielding else plain
        # while clients fault: the C library's XXH3 where there is one (the GIL let go;
        # otherwise slower than the module: ctypes costs about a microsecond a call)
        c_digest = _C_XXH3 if yielding else None
        for first, last in runs:
            spans = self.file_spans(first * size, min((last + 1) * size, end))
            if len(spans) == 1:  # one stretch of memory (a dense image): slices of one view
                lo, hi = spans[0]
                view = buffer(lo, hi - lo)
                if c_digest is not None and not view.readonly:  # the GIL let go while it hashes
                    anchor = ctypes.c_char.from_buffer(view)  # (holds the memory while hashing)
                    base, n = ctypes.addressof(anchor), hi - lo
                    failed = [k for k, off in zip(range(first, last + 1), range(0, n, size))
                              if c_digest(base + off, min(size, n - off)) != sums[k]]
                    del anchor
                else:
                    failed = [k for k, off in zip(range(first, last + 1), range(0, hi - lo, size))
                              if digest(view[off : off + size]) != sums[k]]
                verified += last - first + 1 - len(failed)
                pos = lo
                for k in failed:
                    k_lo = lo + (k - first) * size
                    k_hi = min(k_lo + size, hi)
                    if pos < k_lo:
                        keep(pos, k_lo)
                    bad.append((k, [(k_lo, k_hi)]))
                    pos = k_hi
                if pos < hi:
                    keep(pos, hi)
                continue
            j = 0
            lo, hi = spans[0]
            for k in range(first, last + 1):
                want = min((k + 1) * size, end) - k * size  # this chunk's bytes
                if hi - lo >= want:  # within one span (the common case): one call
                    pieces = [(lo, lo + want)]
                    ok = digest(buffer(lo, want)) == sums[k]
                    lo += want
                else:
                    pieces = []
                    hasher = xxhash.xxh3_64()
                    while want:
                        take = min(want, hi - lo)
                        pieces.append((lo, lo + take))
                        hasher.update(buffer(lo, take))
                        lo += take
                        want -= take
                        if lo == hi and want:
                            j += 1
                            lo, hi = spans[j]
                    ok = hasher.intdigest() == sums[k]
                    if yielding:
                        os.sched_yield()
                if lo == hi and j + 1 < len(spans):
                    j += 1
                    lo, hi = spans[j]
                if not ok:
                    bad.append((k, pieces))
                    continue
                verified += 1
                for a, b in pieces:
                    keep(a, b)
        return good, verified, bad

    def chunk_range(self, lo: int, hi: int) -> tuple[int, int] | None:
        """The first and last chunk holding data of memory [lo, hi); None for holes only."""
        layout = self.layout
        first = layout.first_at_or_after(lo)
        last = bisect_right(layout.mem, hi - 1) - 1
        if first >= len(layout) or last < first:
            return None
        first_byte = max(lo, layout.mem[first])
        last_byte = min(hi, layout.mem[last] + layout.length[last]) - 1
        if first_byte > last_byte:
            return None
        return ((layout.file[first] + first_byte - layout.mem[first]) // self.size,
                (layout.file[last] + last_byte - layout.mem[last]) // self.size)

    def memory_hull(self, first: int, last: int) -> tuple[int, int]:
        """The memory from chunk ``first``'s start to chunk ``last``'s end."""
        return self.memory_spans(first)[0][0], self.memory_spans(last)[-1][1]


class _Hasher:
    """The loader's hash thread: runs :meth:`_Chunks.check` on batches of landed chunks
    and hands each result to ``deliver`` in the trio thread.

    One thread (hashing, ~8 GB/s, outpaces the fill), fed at most ``_HASH_JOBS``
    batches at once so it never idles between two.  While clients fault (``busy``) it
    runs at ``_HASH_NICE``, like the queue's background workers, so the trio thread
    answering them comes first; otherwise at the nice value of the thread that made
    it (going back needs the right to lower a nice value: without it, it stays)."""

    def __init__(self, chunks: _Chunks, destination: Destination,
                 deliver: Callable[[list[tuple[int, int]], _Checked | Exception], None],
                 ) -> None:
        self._chunks = chunks
        self._destination = destination
        self._deliver = deliver
        self._token = trio.lowlevel.current_trio_token()
        self._cv = threading.Condition()
        self._jobs: deque[list[tuple[int, int]]] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.busy = False  #: clients are faulting: run niced
        self._base_nice = os.getpriority(os.PRIO_PROCESS, 0)

    def _is_busy(self) -> bool:
        return self.busy

    def submit(self, runs: list[tuple[int, int]]) -> None:
        with self._cv:
            self._jobs.append(runs)
            self._cv.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="pageload-hash", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread once its current batch is hashed (it reads the destination's
        memory: the caller may unmap it after this returns); queued batches are dropped."""
        with self._cv:
            self._stopping = True
            self._jobs.clear()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    def _work(self) -> None:
        tid = threading.get_native_id()
        nice = self._base_nice
        check = self._chunks.check
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                runs = self._jobs.popleft()
            want = _HASH_NICE if self.busy else self._base_nice
            if want != nice:
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, want)
                    nice = want
                except OSError:  # lowering it again needs the right to
                    pass
            result: _Checked | Exception
            try:
                result = check(self._destination, runs, self._is_busy)
            except Exception as exc:  # (a bug, or the memory unmapped under it): its chunks fail
                result = exc
            try:
                self._token.run_sync_soon(self._deliver, runs, result)
            except trio.RunFinishedError:
                return


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
        local = source.local
        #: the source's local file (the userfaultfd handler maps it; -1: none)
        self.pages_fd = local.fd if local is not None else -1
        self.destination = destination
        self.queue = queue
        self.config = config or LoaderConfig()
        if self.config.queue_depth > queue.capacity:
            raise ValueError(f"queue_depth {self.config.queue_depth} exceeds the queue's capacity {queue.capacity}")
        self.order: SweepOrder = order or SequentialOrder()
        #: where reads are copied to in the kernel (None: into the mapping)
        self._copy_fd: int | None = _copy_target(self.config, queue, destination, local)
        self._local = local
        # optional hooks (working-set replay, loader._workingset): asked once
        hooks = self.order.hooks()
        self._order_limit: Callable[[int], int | None] | None = hooks.limit_for
        self._order_wait: Callable[[int, int, int], None] | None = hooks.note_wait
        self._order_loaded: Callable[[int, int], None] | None = hooks.note_loaded
        self._order_full: Callable[[], bool] | None = hooks.wants_full_width
        #: told of every touched range, ``recorder.touched(lo, hi)`` (page span of each wait;
        #: userfaultfd faults go through it too): working-set recording
        self.recorder: AccessRecorder | None = None
        # a layout whose pages-file offsets do not ascend with memory (working set laid out
        # first): the ranges in file order, so that sweep reads can follow the file
        self._by_file: array[int] | None = None
        self._file_starts: array[int] | None = None
        files = layout.file
        if not layout.file_ascends():
            import numpy

            by_file = numpy.argsort(numpy.frombuffer(files, dtype=numpy.uint64), kind="stable")
            self._by_file = array("Q", by_file.astype(numpy.uint64).tobytes())
            self._file_starts = array("Q", numpy.frombuffer(files, dtype=numpy.uint64)[by_file].tobytes())
        #: the pages file holds the ranges back to back in memory order from 0
        #: (``checkpoint create``'s layout): a sweep read takes ranges straight from the table
        self._packed = not layout.identity_mapped and len(layout) > 1 and layout.prefix() is layout.file
        chunk_size, checksums = source.chunk_size, source.checksums
        self._chunks = (
            _Chunks(layout, chunk_size, checksums)
            if self.config.verify and use_checksums and chunk_size is not None and checksums is not None
            else None
        )
        #: where the data comes from, a batch at a time (see the module's docstring)
        self._extents: ExtentSource = source.extents() or LayoutExtents(layout)
        self.frontier = 0  #: the data below this offset is in the sets (or loaded)
        self._beyond = RangeSet()  #: spans past the frontier already looked up (waits, hints)
        self._scan_wanted = trio.Event()  #: a blocking source's batch is wanted
        self._scanning = False
        self._hole_bytes = 0  #: holes found by a source without an exact total
        #: data bytes to load: the layout's; with a source that has not found the holes
        #: yet, the memory less the holes found so far (exact once the scan is done)
        self.total_bytes = layout.data_bytes if self._extents.exact_total else self.memory_size
        self._loaded_listeners: list[Callable[[int, int], None]] = []
        self.unloaded = RangeSet()
        if not isinstance(self.order, SequentialOrder):
            # another order (working-set replay) may start anywhere: it sees every range
            while not self._extents.done:
                self._take_batch(*self._extents.next_batch(_BATCH_EXTENTS))
        elif not self._extents.blocking:
            self._take_batch(*self._extents.next_batch(_BATCH_EXTENTS))
        self.inflight = RangeSet()
        self.failed = RangeSet()
        #: failed intervals by (code, errno or 0, reason): merged, never one entry per page
        self._failures: dict[tuple[str, int, str], RangeSet] = {}
        self._reads: dict[int, _Read] = {}
        self._stuck: dict[int, _Read] = {}  # timed out, not returned by the backend yet
        self._next_id = 0
        self._background_inflight = 0
        self._waiters: list[WaitHandle] = []  # blocked, not finished
        self._priority: deque[WaitHandle] = deque()
        self._prefetch: deque[_Hint] = deque()
        self._resubmit: deque[_Read] = deque()
        self._hash_jobs = 0  # background hash jobs given to the hash thread, not delivered yet
        self._hasher: _Hasher | None = None  # made at the first background hash
        self._hashed: list[tuple[list[tuple[int, int]], _Checked | Exception]] = []
        self._tail_failed_at: int | None = None
        # when a wait last blocked or finished / last needed bytes (blocked, or read at once);
        # "never" is far in the past, not 0: the monotonic clock starts near 0 at boot
        self._last_wait_ns = self._last_fault_ns = -(1 << 62)
        self._linger_ns = int(self.config.busy_linger_s * 1e9)
        self._busy = True  # as the queue starts: background reads yield until the first round
        # waits up to this many bytes may be read at once by the waiting task (_read_now)
        self._read_now_limit = self.config.read_now_bytes if self.config.priority and self._chunks is None else 0
        # with checksums: a wait whose chunks (at most this many bytes) are unstarted and
        # cached, or landed and waiting for their hash, is read and hashed at once (_verify_now)
        self._verify_now_limit = self.config.read_now_bytes if self.config.priority and self._chunks is not None else 0
        self._wait_scope: trio.CancelScope | None = None
        self._kick = trio.Event()
        self._closing = False
        self._running = False
        self._closed = trio.Event()
        self.done = trio.Event()
        self.abandoned_reads = 0  #: reads still running when :meth:`aclose` gave up on them
        self._started_ns = time.perf_counter_ns()
        self._finished_ns: int | None = None
        self.loaded_bytes = 0
        self.counters = LoaderCounters()
        self._blocked_since: int | None = None
        self.histogram = LatencyHistogram()
        #: wait callbacks run inside ``reply_batch.open()`` ... ``close()``, one pair per
        #: batch of completions (the server writes the batch's replies at the close)
        self.reply_batch: CallbackBatch = _NoBatch()
        self.sweep_held = False  #: see :meth:`hold_sweep`
        if self._all_settled():
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
        counters = self.counters
        counters.waits_total += 1
        if self.recorder is not None:
            self.recorder.touched(lo, hi)
        if hi > self.frontier:
            self._look_up(lo, hi)
        if self.failed and self.failed.overlap_bytes(lo, hi):
            counters.waits_failed += 1
            raise self._failure_for(lo, hi)
        unloaded, inflight = self.unloaded, self.inflight
        need = ((unloaded.overlap_bytes(lo, hi) if unloaded else 0)
                + (inflight.overlap_bytes(lo, hi) if inflight else 0))  # (all loaded: no lookups)
        if self._order_wait is not None:
            self._order_wait(lo, hi, need)
        if need == 0:
            counters.waits_immediate += 1
            return None
        if self._closing:
            counters.waits_failed += 1
            raise LoadError(codes.SHUTTING_DOWN, "the loader is shutting down")
        now = self._last_fault_ns = time.perf_counter_ns()
        if not self._busy and not (self._order_full is not None and self._order_full()):
            self._set_busy(True)  # clients fault from now: background reads yield the CPU at once
        if need <= self._read_now_limit and self._read_now(lo, hi, need, now):
            return None  # no I/O to queue behind: the sweep keeps its width
        read_lo, read_hi, chunk_span = self._read_span(lo, hi)
        if read_hi > self.frontier:
            self._look_up(read_lo, read_hi)  # (a chunk's memory may reach past [lo, hi))
        if self._verify_now_limit:  # (after the look-up: it looks at the window only)
            need = self._verify_now(lo, hi, need, now)
            if need == 0:
                return None
        self._last_wait_ns = now
        handle = WaitHandle(lo, hi, need, callback, now, context, read_lo, read_hi)
        if chunk_span is not None:
            handle.chunk_lo, handle.chunk_hi = chunk_span
        counters.bytes_waited += need
        if not self._waiters:
            self._blocked_since = now
        self._waiters.append(handle)
        if self.config.priority and self._wants_turn(handle):
            handle.queued = True
            self._priority.append(handle)
            self._poke()
        return handle

    def _read_now(self, lo: int, hi: int, need: int, now: int) -> bool:
        """Serve a small wait in the caller's task: when all of ``[lo, hi)`` is unstarted
        data of one range (so one contiguous read of the pages file) and the queue can
        read it at once from the page cache (:meth:`aio.Queue.read_now`), it is read
        into the destination here and settled; True then.  This saves the loader task's
        wake-up and the queue's round trip, the larger part of a fault's cost when its
        data is cached.  Not with checksums (a chunk is served only once verified) nor
        without priority (a first-come-first-served wait queues behind the sweep)."""
        layout = self.layout
        if need != hi - lo or self.unloaded.overlap_bytes(lo, hi) != need:
            return False  # holes, several ranges, or bytes already in flight
        i = layout.find(lo)
        mem = layout.mem[i]
        if i < 0 or hi > mem + layout.length[i]:
            return False
        buffer = self.destination.buffer(lo, need)
        if self.source.read_now(self.queue, buffer, layout.file[i] + lo - mem) != need:
            return False  # not cached (or failed): the queue reads it, and reports errors
        self.unloaded.remove(lo, hi)  # never in flight: _settle's removal from inflight finds nothing
        counters = self.counters
        counters.reads_total += 1
        self.order.note_served(hi)
        self._settle([[lo, hi]], None)  # also answers earlier waiters on these bytes
        self._served_at_once(need, now)
        return True

    def _verify_now(self, lo: int, hi: int, need: int, now: int) -> int:
        """With checksums: serve a small wait in the caller's task, as :meth:`_read_now`
        does without.  Each chunk of ``[lo, hi)`` (at most ``read_now_bytes`` of chunks
        in all) whose bytes all landed and wait for their hash is hashed now; each one
        wholly unstarted is read now when the queue can do that without blocking (page
        cache), then hashed.  Returns the bytes still needed (0: served; raises the
        chunk's :class:`LoadError` when it is corrupt).  A chunk partly in flight, or
        not cached, is left to the loader's task, with the bytes already needed."""
        chunks = self._chunks
        assert chunks is not None
        span = chunks.chunk_range(lo, hi)
        if span is None:
            return need
        k0, k1 = span
        if (k1 - k0 + 1) * chunks.size > self._verify_now_limit:
            for k in range(k0, k1 + 1):  # too long to hash here: queued ones go first
                if k in chunks.queued:
                    chunks.runs.appendleft((k, k))
            return need
        unloaded = self.unloaded
        dest, queue, source = self.destination, self.queue, self.source
        counters = self.counters
        served = corrupt = pending = False
        for k in range(k0, k1 + 1):
            spans = chunks.memory_spans(k)
            if chunks.unqueue(k):  # landed, waiting for a background hash
                pass
            elif k in chunks.bad:
                pending = True
                break
            elif all(unloaded.overlap_bytes(a, b) == b - a for a, b in spans):
                file_offset = k * chunks.size
                for a, b in spans:
                    if source.read_now(queue, dest.buffer(a, b - a), file_offset) != b - a:
                        break  # not cached: the loader reads it (what was read is read again)
                    file_offset += b - a
                else:
                    for a, b in spans:
                        unloaded.remove(a, b)  # never in flight: _settle finds nothing to remove there
                    chunks.partial.pop(k, None)  # (none: all of it was unstarted)
                    counters.reads_total += 1
                    self.order.note_served(spans[-1][1])
                if file_offset != k * chunks.size + chunks.run_bytes(k, k):
                    pending = True
                    break
            else:  # loaded already, or (partly) in flight: the loader's task finishes it
                pending = pending or any(unloaded.overlap_bytes(a, b) or self.inflight.overlap_bytes(a, b)
                                         for a, b in spans)
                continue
            served = True
            if chunks.matches(dest, k, spans):
                counters.chunks_verified += 1
                self._settle([[a, b] for a, b in spans], None)
            else:
                corrupt = True
                self._checked([], 0, [(k, spans)])
        if corrupt:
            counters.waits_failed += 1
            raise self._failure_for(lo, hi)
        if not served:
            return need
        if pending:
            return ((unloaded.overlap_bytes(lo, hi) if unloaded else 0)
                    + (self.inflight.overlap_bytes(lo, hi) if self.inflight else 0))
        self._served_at_once(need, now)
        return 0

    def _served_at_once(self, need: int, start_ns: int) -> None:
        """Count a wait served in the waiting task (read, or verified, at once)."""
        counters = self.counters
        elapsed = time.perf_counter_ns() - start_ns
        counters.waits_served += 1
        counters.bytes_waited += need
        counters.wait_ns += elapsed
        if not self._waiters:
            counters.blocked_ns += elapsed
        self.histogram.record(elapsed)
        if self.done.is_set():
            self._poke()  # the driver may be parked with nothing left to do

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
        self._drop_waiter(handle, time.perf_counter_ns())

    def prefetch(self, offset: int, length: int) -> None:
        """A hint: load ``[offset, offset+length)`` ahead of the sweep, behind waiters."""
        lo, hi = self._page_span(offset, length)
        self.counters.prefetches += 1
        if hi > self.frontier and not self._closing:
            hi = min(hi, max(lo, self.frontier) + _HINT_PROBE_LIMIT)
            self._look_up(lo, hi)
        if self._closing or not self.unloaded.overlap_bytes(lo, hi):
            return
        self._prefetch.append(_Hint(lo, hi))
        self._poke()

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
        self.sweep_held = held
        if not held:
            self._poke()

    def not_loaded(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of memory [lo, hi) that are not loaded (yet), sorted: unstarted,
        in flight, failed, or past the frontier where nobody has looked (its holes
        too: not known yet).  What a map of loaded memory must leave unset."""
        parts = [*self.unloaded.overlapping(lo, hi), *self.inflight.overlapping(lo, hi),
                 *self.failed.overlapping(lo, hi)]
        start = max(lo, self.frontier)
        if start < hi:
            parts.extend(gaps(self._beyond.overlapping(start, hi), start, hi))
        parts.sort()
        return parts

    def is_loaded(self, lo: int, hi: int) -> bool:
        """Whether all of memory [lo, hi) is loaded (holes count as loaded)."""
        if hi > self.frontier and any(True for _ in gaps(self._beyond.overlapping(max(lo, self.frontier), hi),
                                                          max(lo, self.frontier), hi)):
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
        return self._chunks is not None

    @property
    def read_timeout(self) -> float | None:
        return self.config.read_timeout

    @property
    def local_source(self) -> LocalPages | None:
        """The source as one local file (:attr:`PageSource.local`), or None."""
        return self._local

    def set_reply_batch(self, batch: CallbackBatch) -> None:
        """Run wait callbacks inside ``batch.open()`` ... ``batch.close()``."""
        self.reply_batch = batch

    def completions_waiting(self) -> bool:
        return self.queue.completions_waiting()

    def queue_statistics(self) -> aio.QueueStatistics:
        return self.queue.statistics()

    def add_loaded_listener(self, listener: Callable[[int, int], None]) -> None:
        """Call ``listener(lo, hi)`` (in the loader's task, before waiters are answered)
        each time memory ``[lo, hi)`` finishes loading.  The userfaultfd handler uses it
        to copy loaded pages into guest memory in the order they load."""
        self._loaded_listeners.append(listener)

    def statistics(self) -> LoaderStatistics:
        now = time.perf_counter_ns()
        end = self._finished_ns or now
        elapsed = (end - self._started_ns) / 1e9
        c = self.counters
        blocked = c.blocked_ns + (now - self._blocked_since if self._blocked_since is not None else 0)
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
            background_reads_in_flight=self._background_inflight,
            reads_total=c.reads_total,
            reads_copied=c.reads_copied,
            reads_retried=c.reads_retried,
            reads_timed_out=c.reads_timed_out,
            reads_stuck=len(self._stuck),
            waits_total=c.waits_total,
            waits_immediate=c.waits_immediate,
            waits_served=c.waits_served,
            waits_failed=c.waits_failed,
            waits_cancelled=c.waits_cancelled,
            waiters_blocked=len(self._waiters),
            bytes_waited=c.bytes_waited,
            blocked_time_s=blocked / 1e9,
            total_wait_time_s=(c.wait_ns + waiting_now) / 1e9,
            prefetches=c.prefetches,
            verify=self._chunks is not None,
            priority=self.config.priority,
            sweep=self.config.sweep,
            chunks_verified=c.chunks_verified,
            corrupt_chunks=c.corrupt_chunks,
            latency_us=self.histogram.as_dict(),
            scanned_bytes=self.memory_size if self._extents.exact_total else self.frontier,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The driver loop.  Returns when everything is loaded (or failed) and no
        read is in flight, or after :meth:`shutdown`; in lazy mode it runs until closed."""
        if self._running:
            raise RuntimeError("Loader.run is already running")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:  # the scan
                if self._extents.blocking and not self._extents.done:
                    nursery.start_soon(self._scan)
                task_status.started()
                await self._loop()
                nursery.cancel_scope.cancel()
        finally:
            if self._hasher is not None:
                self._hasher.stop()
                self._hasher = None
            self._hash_jobs = 0
            self._hashed.clear()
            self._running = False
            self._closed.set()

    def shutdown(self) -> None:
        """Stop at once: issue nothing new, answer every waiter ``shutting-down``.
        Reads already in the queue are left to :meth:`aclose`."""
        self._closing = True
        self._resubmit.clear()
        self._priority.clear()
        self._prefetch.clear()
        if self._waiters:
            error = LoadError(codes.SHUTTING_DOWN, "the daemon is shutting down")
            now = time.perf_counter_ns()
            for w in list(self._waiters):
                w.error = error
                self._finish_waiter(w, now)
        self._poke()

    async def aclose(self, timeout: float | None = None) -> None:
        """Shut down: :meth:`shutdown`, let the driver stop, drop reads that have not
        started (where the backend can), wait up to ``timeout`` seconds for the
        ones running, then close the queue.  If reads are still running then (a
        hung disk), give up on them without closing the queue: their buffers stay
        mapped (their requests hold them), :attr:`abandoned_reads` counts them."""
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        self.shutdown()
        if self._running:
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
                    self._complete(completion)
        if queue.outstanding:
            self.abandoned_reads = queue.outstanding
            log.warning("shutdown: %d read(s) still running after %g s; not waiting for them",
                        queue.outstanding, timeout)
            return
        await queue.aclose()

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        queue = self.queue
        while not self._closing:
            if self._hashed:
                self._settle_hashed()
            self._schedule()
            if not self._reads:
                if (self.done.is_set() and not self._priority and not self._prefetch
                        and not self._hashing()):
                    return
                self._kick = trio.Event()
                await self._kick.wait()
                continue
            with trio.CancelScope(deadline=self._next_deadline()) as scope:
                self._wait_scope = scope
                completions = await queue.wait(1)
            self._wait_scope = None
            if scope.cancelled_caught:
                self._expire(trio.current_time())
                continue
            batch = self.reply_batch
            batch.open()
            try:
                for completion in completions:
                    self._complete(completion)
            finally:
                batch.close()

    def _room(self) -> bool:
        return len(self._reads) < self.config.queue_depth and self.queue.outstanding < self.queue.capacity

    def _schedule(self) -> None:
        if self._closing:
            return
        cfg = self.config
        room = self._room
        now = time.perf_counter_ns()
        full = self._order_full is not None and self._order_full()  # working-set replay keeps its width
        if (self._waiters or now - self._last_wait_ns < self._linger_ns) and not full:
            background_cap = cfg.busy_background_reads or 1  # a blocked wait: fewer reads ahead of it
        else:
            background_cap = cfg.background_reads
        # any fault, also one read at once: the background reads yield the CPU
        self._set_busy(not full and (bool(self._waiters) or now - self._last_fault_ns < self._linger_ns))
        # 0. halves of failed reads, being narrowed down: a waiter's at once,
        #    background ones within the background share
        resubmit = self._resubmit
        for _ in range(len(resubmit)):
            if not room():
                break
            read = resubmit.popleft()
            if read.kind.urgent or self._background_inflight < background_cap:
                self._submit(read)
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
                self._requeue(w)
            if not progressed:
                break
        # 2. prefetch hints, 3. the sweep: within the background share only, and a
        # smaller one while clients are faulting; paused while hashing is behind
        pf = self._prefetch
        while pf and self._background_inflight < background_cap and room():
            hint = pf[0]
            if not self._issue_for(hint, ReadKind.PREFETCH, None) or not self._has_unstarted(hint):
                pf.popleft()
        self._refill()  # (also without the sweep: the window's holes and totals must be found)
        if not cfg.sweep or self.sweep_held or (self._chunks is not None
                                                 and self._chunks.queued_bytes >= _MAX_UNHASHED):
            return
        order = self.order
        while self._background_inflight < background_cap and room():
            start = order.next_start(self.unloaded)
            if start is None:
                if self._refill(force=True):
                    continue
                break
            limit = self._order_limit(start) if self._order_limit is not None else None
            self._issue(start, limit or self.memory_size, cfg.sweep_read_size, ReadKind.SWEEP, None)

    def _is_busy(self) -> bool:
        """Clients are faulting (read from other threads: hashing lets the GIL go then)."""
        return self._busy

    def _set_busy(self, busy: bool) -> None:
        """Clients are faulting (or no longer): the queue's background reads yield the
        CPU to this thread meanwhile (:meth:`aio.Queue.background_yields`)."""
        if busy != self._busy:
            self._busy = busy
            self.queue.background_yields(busy)
            if self._hasher is not None:
                self._hasher.busy = busy

    def _wants_turn(self, w: WaitHandle) -> bool:
        """The one rule for (re-)entering the priority deque: a live waiter with
        unstarted bytes to read and fewer than ``waiter_reads`` reads in flight."""
        return (not w.queued and not w.finished and not w.cancelled
                and w.inflight < self.config.waiter_reads and self._has_unstarted(w))

    def _requeue(self, w: WaitHandle) -> None:
        if self.config.priority and self._wants_turn(w):
            w.queued = True
            self._priority.append(w)

    def _has_unstarted(self, target: WaitHandle | _Hint) -> bool:
        if target.cursor >= target.read_hi:
            return False
        nxt = self.unloaded.first_at_or_after(target.cursor)
        return nxt is not None and nxt[0] < target.read_hi

    def _issue_for(self, target: WaitHandle | _Hint, kind: ReadKind, owner: WaitHandle | None) -> bool:
        nxt = self.unloaded.first_at_or_after(target.cursor)
        if nxt is None or nxt[0] >= target.read_hi:
            target.cursor = target.read_hi
            return False
        end = self._issue(nxt[0], target.read_hi, self.config.read_size, kind, owner)
        target.cursor = end
        if kind.urgent:
            self.order.note_served(end)
        return True

    def _issue(self, start: int, limit: int, budget: int, kind: ReadKind, owner: WaitHandle | None) -> int:
        """Start one read at unstarted ``start``, coalescing forward while the pages
        file stays contiguous, up to ``limit`` and ``budget`` bytes.  Returns its end."""
        if owner is None and self.layout.identity_mapped and (self._copy_fd is not None or self.queue.gathers):
            return self._issue_gather(start, limit, budget, kind)
        if owner is None and self._packed:
            end = self._issue_packed(start, limit, budget, kind)
            if end is not None:
                return end
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
            if total >= budget:
                break
            if end == stop and end < limit:
                nxt = unloaded.first_at_or_after(end)
                if nxt is not None and nxt[0] < limit:
                    j = layout.find(nxt[0])
                    if layout.file[j] + (nxt[0] - layout.mem[j]) == file_pos:
                        pos, i = nxt[0], j
                        continue
            if kind is ReadKind.SWEEP and self._by_file is not None:
                # pages laid out out of memory order (working set first): the sweep's read
                # goes on with whatever memory is next in the pages file
                nxt_mem = self._file_next(file_pos)
                if nxt_mem is not None:
                    pos, i, limit = nxt_mem, layout.find(nxt_mem), self.memory_size
                    continue
            break
        for lo, hi in segments:
            unloaded.remove(lo, hi)
            self.inflight.add(lo, hi)
        read = _Read(self._next_id, kind, owner, file_offset, segments)
        self._next_id += 1
        self.counters.reads_total += 1
        self._submit(read)
        return segments[-1][1]

    def _issue_gather(self, start: int, limit: int, budget: int, kind: ReadKind) -> int:
        """A background read of a raw image (file offset == memory offset), copied in the
        kernel (``aio.Op.COPY``) or read range by range into the mapping (``aio.Op.GATHER``):
        the unstarted ranges from ``start`` on, holes between them skipped, up to
        ``budget`` bytes or ``_GATHER_SEGMENTS`` ranges, in one request; the sets are
        edited once for all of them where nothing else is in flight among them."""
        los, his = self.unloaded.take_arrays(start, limit, budget, _GATHER_SEGMENTS)
        first, last = los[0], his[-1]
        self.unloaded.remove(first, last)  # (every unstarted byte in between is in segments)
        inflight = self.inflight
        if len(los) > 1 and not inflight.overlap_bytes(first, last):
            inflight.insert_sorted(los, his)
        else:
            for lo, hi in zip(los, his):
                inflight.add(lo, hi)
        lengths = array("Q", map(sub, his, los))  # (no Python work per range: C loops all through)
        read = _Read(self._next_id, kind, None, first, _Segs(los, lengths), length=sum(lengths))
        read.gather = True
        read.columns = (los, lengths)
        self._next_id += 1
        self.counters.reads_total += 1
        self._submit(read)
        return last

    def _issue_packed(self, start: int, limit: int, budget: int, kind: ReadKind) -> int | None:
        """A background read of a pages file packed in memory order (``checkpoint
        create``'s): the file bytes from ``start``'s on are the next ranges' in memory
        order, so where all of them are unstarted the read's segments are the ranges
        themselves, taken from the table's columns and put in the sets at once.  None
        where some are started (the general loop then walks them)."""
        layout = self.layout
        i = layout.find(start)
        if i < 0:
            return None
        mem, length = layout.mem, layout.length
        k = min(len(mem), i + _GATHER_SEGMENTS, bisect_right(mem, limit - 1))
        segments: list[list[int]] = []
        left = budget
        for lo, ln in zip(mem[i:k], length[i:k]):
            hi = min(lo + ln, limit)
            if lo < start:
                lo = start
            if hi - lo >= left:
                hi = lo + left
            if segments and segments[-1][1] == lo:
                segments[-1][1] = hi
            else:
                segments.append([lo, hi])
            left -= hi - lo
            if not left:
                break
        total = budget - left
        first, last = start, segments[-1][1]
        unloaded = self.unloaded
        if len(segments) < 2 or unloaded.overlap_bytes(first, last) != total:
            return None  # a single range, or some of it started: the general loop
        unloaded.remove(first, last)
        inflight = self.inflight
        if not inflight.overlap_bytes(first, last):
            inflight.insert_sorted(array("Q", [lo for lo, _ in segments]), array("Q", [hi for _, hi in segments]))
        else:
            for lo, hi in segments:
                inflight.add(lo, hi)
        read = _Read(self._next_id, kind, None, layout.file[i] + start - mem[i], segments)
        self._next_id += 1
        self.counters.reads_total += 1
        self._submit(read)
        return last

    def _degather(self, read: _Read) -> None:
        """A gathered read that can be neither copied in the kernel nor gathered by the
        queue (the memory file refused a copy, and the backend takes no ``Op.GATHER``):
        one read into the mapping per range."""
        for lo, hi in read.segments:
            part = _Read(self._next_id, read.kind, read.owner, lo, [[lo, hi]], read.retry)
            self._next_id += 1
            self._submit(part)

    def _file_next(self, file_pos: int) -> int | None:
        """The memory offset whose data is at pages-file offset ``file_pos``, if unloaded."""
        assert self._by_file is not None and self._file_starts is not None
        k = bisect_right(self._file_starts, file_pos) - 1
        if k < 0:
            return None
        layout = self.layout
        j = self._by_file[k]
        if file_pos >= layout.file[j] + layout.length[j]:
            return None
        mem = layout.mem[j] + file_pos - layout.file[j]
        return mem if self.unloaded.contains(mem) else None

    def _submit(self, read: _Read) -> None:
        """Put ``read`` in flight; it counts against its share until :meth:`_release`."""
        self._reads[read.id] = read
        if read.owner is not None:
            read.owner.inflight += 1
        elif not read.kind.urgent:
            self._background_inflight += 1
        timeout = self.config.read_timeout
        read.deadline = math.inf if timeout is None else trio.current_time() + timeout
        urgent = read.kind.urgent
        copy_fd, local = self._copy_fd, self._local
        read.hashed = None
        # (a gathered read is a raw image's, which has no checksums; its file bytes are apart)
        then = self._hash_after(read) if self._chunks is not None and not urgent and not read.gather else None
        if copy_fd is not None and local is not None and (read.gather or not urgent or read.length > _INLINE_LIMIT):
            # file to file in the kernel; a waiter's small read goes into the mapping,
            # where the backends read it at once in this thread (inline_urgent)
            read.copied = True
            self.counters.reads_copied += 1
            columns = read.columns
            self.queue.add(local.copy(read.id, read.file_offset, copy_fd,
                                      list(zip(*columns)) if columns is not None
                                      else [(lo, hi - lo) for lo, hi in read.segments], urgent=urgent,
                                      gather=read.gather, then=then))
            return
        read.copied = False
        dest = self.destination
        if read.gather and len(read.segments) > 1:
            if not self.queue.gathers:
                self._release(read)
                self._degather(read)
                return
            # a raw image: each range from its own offset of the file into the mapping
            columns = read.columns
            if columns is not None:
                buffers, offsets = list(map(dest.buffer, *columns)), columns[0]
            else:
                buffers = [dest.buffer(lo, hi - lo) for lo, hi in read.segments]
                offsets = array("Q", [lo for lo, _ in read.segments])
            self.queue.add(self.source.gather(read.id, buffers, offsets, urgent=urgent))
            return
        buffers = [dest.buffer(lo, hi - lo) for lo, hi in read.segments]
        self.queue.add(self.source.read(read.id, read.file_offset, buffers, urgent=urgent, then=then))

    def _hash_after(self, read: _Read) -> Callable[[], None] | None:
        """For a background read: hash the checksum chunks wholly inside it in the
        backend's thread, right after it lands (``aio.Request.then``), while its bytes
        are in the CPU's cache; :meth:`_land` takes the result.  None: no whole chunk."""
        chunks = self._chunks
        assert chunks is not None
        size, end = chunks.size, chunks.end
        lo, hi = read.file_offset, read.file_offset + read.length
        first = -(-lo // size)
        last = (end - 1) // size if hi >= end else hi // size - 1
        if first > last:
            return None
        check, destination, busy = chunks.check, self.destination, self._is_busy

        def then() -> None:
            read.hashed = (first, last, check(destination, [(first, last)], busy))

        return then

    def _release(self, read: _Read) -> None:
        """``read`` is out of flight (completed or timed out): uncount it."""
        del self._reads[read.id]
        owner = read.owner
        if owner is not None:
            owner.inflight -= 1
            self._requeue(owner)
        elif not read.kind.urgent:
            self._background_inflight -= 1

    def _next_deadline(self) -> float:
        return min((r.deadline for r in self._reads.values()), default=math.inf)

    def _expire(self, now: float) -> None:
        """Fail reads past their deadline with ``timeout`` and free their slots.  Their
        memory is failed for good, so no other read ever targets the buffers that a
        stuck thread may still write into; their completions are ignored."""
        timeout = self.config.read_timeout
        for read in [r for r in self._reads.values() if r.deadline <= now]:
            self._release(read)
            self._stuck[read.id] = read
            self.counters.reads_timed_out += 1
            self._fail(read.segments, read.file_offset, codes.TIMEOUT, None,
                       f"reading the pages file took longer than {timeout:g} s")

    def _complete(self, completion: aio.Completion) -> None:
        read = self._reads.get(completion.id)
        if read is None:  # a timed-out read came back after all: its pages stay failed
            self._stuck.pop(completion.id, None)
            return
        self._release(read)
        if self._closing:
            return
        result = completion.result
        if result == read.length:
            self._land(read.segments, read.file_offset, read.hashed, read.length if read.columns else None)
            return
        if read.copied and result in _NO_COPY:
            # the memory file takes no writes (hugetlbfs: EINVAL): into the mapping from now on
            if self._copy_fd is not None:  # (said once: the other copies in flight fail alike)
                log.info("memory file: copying into it in the kernel failed (%s); reading into its "
                         "mapping instead", errno_mod.errorcode.get(-result, str(-result)))
                self._copy_fd = None
            self._submit(read)
            return
        counters = self.counters
        if result > 0:  # short read: keep what arrived, resubmit the rest
            done, rest = _split(read.segments, result)
            self._land(done, read.file_offset)
            read.segments = rest
            read.columns = None
            read.length -= result
            read.file_offset = rest[0][0] if read.gather else read.file_offset + result
            counters.reads_retried += 1
            self._submit(read)
            return
        if result == 0 and self._at_end_of_file(read.file_offset):
            self._fail_tail(read)
            return
        err = -result if result < 0 else errno_mod.EIO
        read.attempts += 1
        if (result == 0 or err in _RETRIABLE) and read.attempts <= self.config.max_retries:
            counters.reads_retried += 1
            self._submit(read)
            return
        if read.length > self.page_size:  # narrow it down: only the bad pages fail
            self._split_failed(read)
            return
        if result == 0:
            self._fail(read.segments, read.file_offset, codes.IO_ERROR, None,
                       "the pages file returned no data here, again and again")
        elif (why := explain_error(self.destination, err)) != os.strerror(err):
            # e.g. EFAULT from a full memory file: "memory file is full (ENOSPC on ...)"
            self._fail(read.segments, read.file_offset, codes.IO_ERROR,
                       errno_mod.ENOSPC if err == errno_mod.EFAULT else err, why)
        else:
            self._fail(read.segments, read.file_offset, codes.IO_ERROR, err, "reading the pages file failed")

    def _split_failed(self, read: _Read) -> None:
        """Retry a failed multi-page read as two halves of the same kind (until single
        pages fail), so an error costs only the pages it is really on.  The halves
        count against their share only once submitted."""
        half = max(self.page_size, (read.length // 2) & ~(self.page_size - 1))
        first, second = _split(read.segments, half)
        for segments, file_offset in ((first, read.file_offset), (second, read.file_offset + half)):
            if segments:
                part = _Read(self._next_id, read.kind, read.owner, segments[0][0] if read.gather else file_offset,
                             segments, True)
                part.gather = read.gather
                self._resubmit.append(part)
                self._next_id += 1
                self.counters.reads_retried += 1

    # ------------------------------------------------------------------ end of file
    def _at_end_of_file(self, file_offset: int) -> bool:
        try:
            size = self.source.size()
        except OSError:
            return False
        return file_offset >= size

    def _fail_tail(self, read: _Read) -> None:
        """A read at or past the end of the pages file: the file is shorter than the
        layout says.  Fail this read and every unstarted byte past the end at once."""
        size = self.source.size()
        need = max((f + n for f, n in zip(self.layout.file, self.layout.length)), default=0)
        reason = f"pages file ends at {size}, the layout needs {need}"
        self._fail(read.segments, read.file_offset, codes.IO_ERROR, None, reason)
        if self._tail_failed_at == size:
            return
        self._tail_failed_at = size
        layout = self.layout
        past: list[tuple[int, int, int]] = []
        for i in range(len(layout)):
            f, n, m = layout.file[i], layout.length[i], layout.mem[i]
            if f + n <= size:
                continue
            lo = m + max(0, size - f)
            for a, b in self.unloaded.overlapping(lo, m + n):
                past.append((a, b, f + a - m))
        for a, b, f in past:
            self.unloaded.remove(a, b)
            self._fail([[a, b]], f, codes.IO_ERROR, None, reason)
        log.warning("%s: %d bytes of memory failed", reason, self.failed.total)

    # ------------------------------------------------------------------ settling
    def _land(self, segments: Sequence[list[int]], file_offset: int,
              hashed: tuple[int, int, _Checked] | None = None, ordered_length: int | None = None) -> None:
        """Bytes were read into ``segments`` (contiguous in the file from ``file_offset``).
        Without checksums they are loaded; with, they wait for their chunk, unless the
        chunks wholly inside were ``hashed`` already (by the backend's thread)."""
        chunks = self._chunks
        if chunks is None:
            self._settle(segments, None, ordered_length=ordered_length)
            return
        length = sum(hi - lo for lo, hi in segments)
        complete = chunks.landed(file_offset, file_offset + length, bad=False)
        if hashed is not None:
            first, last, found = hashed  # all complete now: each byte lands once
            complete = [k for k in complete if k < first or k > last]
            self._checked(*found)
        if complete:
            self._chunks_complete(complete)

    def _fail(self, segments: Sequence[list[int]], file_offset: int, code: str, err: int | None,
              reason: str) -> None:
        """``segments`` (contiguous in the file from ``file_offset``) failed for good."""
        length = sum(hi - lo for lo, hi in segments)
        where = f"memory {segments[0][0]:#x}+{length:#x} (pages file {file_offset:#x})"
        self._settle(segments, LoadError(code, f"{where}: {reason}", err), reason)
        chunks = self._chunks
        if chunks is not None:
            complete = chunks.landed(file_offset, file_offset + length, bad=True)
            if complete:
                self._chunks_complete(complete)

    def _chunks_complete(self, ks: list[int]) -> None:
        """Every byte of chunks ``ks`` (ascending) has landed or failed.  Chunks a
        waiter needs are hashed at once, in this task (up to ``_INLINE_HASH`` bytes;
        more go first in the queue); the others queue, in runs, for background hash jobs."""
        chunks = self._chunks
        assert chunks is not None
        if chunks.bad:
            for k in [k for k in ks if k in chunks.bad]:
                self._unverifiable(k)
            ks = [k for k in ks if k not in chunks.bad]
        if not ks or not self._running or self._closing:
            return
        first, last = ks[0], ks[-1]
        wanted = [(w.chunk_lo, w.chunk_hi) for w in self._waiters if w.chunk_lo <= last and w.chunk_hi >= first]
        runs: list[list[int]] = []  # [first, last, urgent]
        for k in ks:
            urgent = int(any(a <= k <= b for a, b in wanted)) if wanted else 0
            if runs and runs[-1][1] == k - 1 and runs[-1][2] == urgent:
                runs[-1][1] = k
            else:
                runs.append([k, k, urgent])
        now = [(a, b) for a, b, urgent in runs if urgent]
        if now and sum(chunks.run_bytes(a, b) for a, b in now) <= _INLINE_HASH:
            self._checked(*chunks.check(self.destination, now))
            runs = [r for r in runs if not r[2]]
        for a, b, urgent in runs:
            chunks.queue(a, b, bool(urgent))
        self._start_hashing()

    def _unverifiable(self, k: int) -> None:
        """Part of bad chunk ``k`` failed: what landed of it cannot be verified."""
        spans = self._chunks.memory_spans(k) if self._chunks is not None else []
        landed = [[a, b] for lo, hi in spans for a, b in self.inflight.overlapping(lo, hi)]
        if landed:
            self._settle(landed, LoadError(
                codes.IO_ERROR, f"memory {landed[0][0]:#x}: other pages of its checksum chunk {k} "
                "failed to load, so it cannot be verified"),
                "other pages of its checksum chunk failed to load, so it cannot be verified")

    def _hashing(self) -> bool:
        """Whether chunks wait for their hash or are being hashed."""
        return self._chunks is not None and (bool(self._chunks.queued) or self._hash_jobs > 0)

    def _start_hashing(self) -> None:
        """Give the hash thread batches of the queued chunks, up to ``_HASH_JOBS`` at once."""
        chunks = self._chunks
        assert chunks is not None
        while chunks.queued and self._hash_jobs < _HASH_JOBS and self._running and not self._closing:
            if self._hasher is None:
                self._hasher = _Hasher(chunks, self.destination, self._hash_delivered)
            self._hash_jobs += 1
            self._hasher.busy = self._busy
            self._hasher.submit(chunks.take(_HASH_BATCH))

    def _hash_delivered(self, runs: list[tuple[int, int]], result: _Checked | Exception) -> None:
        """A batch was hashed (called in the trio thread, outside any task): the loop settles it."""
        self._hashed.append((runs, result))
        if self._wait_scope is not None:
            self._wait_scope.cancel()
        else:
            self._kick.set()

    def _settle_hashed(self) -> None:
        """Settle the batches the hash thread delivered, and give it more."""
        results, self._hashed = self._hashed, []
        self._hash_jobs -= len(results)
        batch = self.reply_batch
        batch.open()
        try:
            for runs, result in results:
                if isinstance(result, Exception):
                    self._unhashable(runs, result)
                else:
                    self._checked(*result)
        finally:
            batch.close()
        self._start_hashing()

    def _unhashable(self, runs: list[tuple[int, int]], exc: Exception) -> None:
        """Hashing chunks ``runs`` raised ``exc``: their bytes cannot be verified, so they fail."""
        chunks = self._chunks
        assert chunks is not None
        reason = f"its checksum chunk could not be hashed ({type(exc).__name__}: {exc})"
        log.error("checksum chunks %s: %s", runs, reason)
        for first, last in runs:
            spans = chunks.file_spans(first * chunks.size, min((last + 1) * chunks.size, chunks.end))
            segments = [[lo, hi] for lo, hi in spans]
            self._settle(segments, LoadError(codes.IO_ERROR, f"memory {spans[0][0]:#x}: {reason}"), reason)

    def _checked(self, good: list[list[int]], verified: int, bad: list[tuple[int, list[tuple[int, int]]]]) -> None:
        """Chunks were hashed: ``good`` memory (``verified`` chunks) is loaded, in one
        settle; each ``bad`` chunk fails with ``corrupt``."""
        counters = self.counters
        counters.chunks_verified += verified
        for k, spans in bad:
            counters.corrupt_chunks += 1
            where = f"memory {spans[0][0]:#x}+{spans[-1][1] - spans[0][0]:#x}"
            reason = f"chunk {k} of the pages file does not match its checksum"
            log.warning("%s: %s", where, reason)
            self._settle([[lo, hi] for lo, hi in spans], LoadError(codes.CORRUPT, f"{where}: {reason}"), reason)
        if good:
            if any(good[i][0] < good[i - 1][1] for i in range(1, len(good))):
                good.sort()  # runs hashed in landing order: _settle takes segments in memory order
            self._settle(good, None)

    def _settle(self, segments: Sequence[list[int]], error: LoadError | None, reason: str = "",
                ordered_length: int | None = None) -> None:
        """Segments are loaded (or failed): update the sets and the waiters.
        ``ordered_length``: they are known to be in memory order, this many bytes."""
        inflight = self.inflight
        dest = self.destination
        failures: RangeSet | None = None
        if error is not None:
            key = (error.code, error.errno or 0, reason)
            failures = self._failures.get(key)
            if failures is None:
                failures = self._failures[key] = RangeSet()
        if ordered_length is None and len(segments) > 1 \
                and any(segments[k][0] < segments[k - 1][1] for k in range(1, len(segments))):
            # (a sweep read that follows a pages file laid out working set first can go
            # back in memory; the hash thread hands chunks back in the order they landed)
            segments = sorted(segments)
        many = len(segments) > 8  # a gathered read: the sets edited once, waiters found by bisection
        first, last = segments[0][0], segments[-1][1]
        length = 0
        if many and failures is None and not self._order_loaded and not dest.needs_commit \
                and not self._loaded_listeners:
            length = sum(hi - lo for lo, hi in segments) if ordered_length is None else ordered_length
            if inflight.overlap_bytes(first, last) == length:  # nothing else in flight among them
                inflight.remove(first, last)
            else:
                for lo, hi in segments:
                    inflight.remove(lo, hi)
            self.loaded_bytes += length
        else:
            for lo, hi in segments:
                inflight.remove(lo, hi)
                if failures is None:
                    self.loaded_bytes += hi - lo
                    if self._order_loaded is not None:
                        self._order_loaded(lo, hi)
                    if dest.needs_commit:
                        dest.commit(lo, hi - lo)
                    for listener in self._loaded_listeners:
                        listener(lo, hi)
                else:
                    self.failed.add(lo, hi)
                    failures.add(lo, hi)
        if self._waiters:
            finished: list[WaitHandle] | None = None  # allocated only when someone is done
            starts: list[int] | None = None  # (made for the first waiter among a gathered read's segments)
            for w in self._waiters:
                if w.hi <= first or w.lo >= last:
                    continue
                if many and starts is None:
                    starts = (segments.los.tolist() if isinstance(segments, _Segs)
                              else list(map(itemgetter(0), segments)))
                got = 0
                k = max(0, bisect_right(starts, w.lo) - 1) if starts is not None else 0
                for lo, hi in segments[k:] if starts is not None else segments:
                    if lo >= w.hi:
                        break
                    if hi > w.lo:
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
        if self._all_settled():
            self._mark_done()

    def _finish_waiter(self, w: WaitHandle, now: int) -> None:
        if w.cancelled:  # withdrawn meanwhile, by the callback of a waiter finished with it
            return
        w.finished = True
        self._last_wait_ns = now
        self._drop_waiter(w, now)
        elapsed = now - w.start_ns
        self.counters.wait_ns += elapsed
        self.histogram.record(elapsed)
        if w.error is None:
            self.counters.waits_served += 1
        else:
            self.counters.waits_failed += 1
        if w.callback is not None:
            w.callback(w)

    def _drop_waiter(self, w: WaitHandle, now: int) -> None:
        try:
            self._waiters.remove(w)
        except ValueError:
            return
        if not self._waiters and self._blocked_since is not None:
            self.counters.blocked_ns += now - self._blocked_since
            self._blocked_since = None

    # ------------------------------------------------------------------ helpers
    def _page_span(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length <= 0 or offset + length > self.memory_size:
            raise ValueError(
                f"range {offset:#x}+{length:#x} is outside the memory (size {self.memory_size:#x})"
            )
        mask = self.page_size - 1
        return offset & ~mask, (offset + length + mask) & ~mask

    def _read_span(self, lo: int, hi: int) -> tuple[int, int, tuple[int, int] | None]:
        """What a waiter on [lo, hi) reads: its span, or with checksums the whole
        chunks its data is in (a chunk is served only once all of it is verified);
        and those chunks (first, last), if any."""
        chunks = self._chunks
        if chunks is None:
            return lo, hi, None
        span = chunks.chunk_range(lo, hi)
        if span is None:
            return lo, hi, None
        hull_lo, hull_hi = chunks.memory_hull(*span)
        return min(lo, hull_lo), max(hi, hull_hi), span

    def _poke(self) -> None:
        """New work arrived: wake the driver if it is parked or blocked in queue.wait."""
        if self._wait_scope is not None:
            if self._room() or self._closing:
                self._wait_scope.cancel()
        else:
            self._kick.set()

    def _failure_for(self, lo: int, hi: int) -> LoadError:
        for (code, err, reason), ranges in self._failures.items():
            for flo, fhi in ranges.overlapping(lo, hi):
                return LoadError(code, f"memory {flo:#x}+{fhi - flo:#x}: {reason}", err or None)
        return LoadError(codes.IO_ERROR, "part of the range failed to load")

    def _failed_ranges(self, limit: int) -> list[tuple[int, int, int]]:
        """(offset, length, errno or 0) of the failed intervals, lowest first, at most ``limit``."""
        out = [(lo, hi - lo, err) for (_, err, _), ranges in self._failures.items() for lo, hi in ranges]
        out.sort()
        return out[:limit]

    # ------------------------------------------------------------------ the window
    def _all_settled(self) -> bool:
        # (the frontier, not the source's own offset: a batch in a worker thread moves that
        # before the batch is in the sets)
        return not self.unloaded and not self.inflight and self.frontier >= self.memory_size

    def _take_batch(self, starts: array[int], ends: array[int]) -> None:
        """Put a batch of the source's extents into ``unloaded``: the parts between the
        old frontier and the source's new offset that no wait or hint looked up already."""
        old = self.frontier
        new = self.memory_size if self._extents.done else max(self._extents.offset, ends[-1] if ends else 0)
        if starts and starts[0] < old:  # the first extent reaches back into the window
            if ends[0] <= old:
                starts, ends = starts[1:], ends[1:]
            else:
                starts = array("Q", starts)
                starts[0] = old
        looked_up = list(self._beyond.overlapping(old, new)) if self._beyond else []
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
            self._beyond.remove(old, new)
        self.frontier = new
        if not self._extents.exact_total:
            fresh = new - old - sum(b - a for a, b in looked_up)
            self._found_holes(fresh - data, old, new, starts, ends, looked_up)

    def _found_holes(self, nbytes: int, lo: int, hi: int, starts: array[int], ends: array[int],
                     looked_up: list[tuple[int, int]]) -> None:
        """``nbytes`` of [lo, hi) turned out to be holes: less to load; and loaded (zero)
        for the listeners (the loaded map)."""
        self._hole_bytes += nbytes
        self.total_bytes -= nbytes
        if self._loaded_listeners and nbytes:
            data = zip(starts, ends)
            for a, b in gaps(sorted([*looked_up, *data]), lo, hi):
                for listener in self._loaded_listeners:
                    listener(a, b)

    def _look_up(self, lo: int, hi: int) -> None:
        """A wait or hint reaches past the frontier: ask the source about [lo, hi) now,
        and put the data there that nobody looked up before into ``unloaded``."""
        lo = max(lo, self.frontier)
        if lo >= hi:
            return
        fresh = list(gaps(self._beyond.overlapping(lo, hi), lo, hi)) if self._beyond else [(lo, hi)]
        if not fresh:
            return
        extents = self._extents
        for a, b in fresh:
            try:
                found = extents.probe(a, b)
            except OSError as exc:
                found = [(a, b)]  # cannot tell: read it all (holes read as zero)
                log.warning("looking up the data in %#x-%#x failed (%s); reading it whole", a, b, exc)
            data = 0
            for x, y in found:
                self.unloaded.add(x, y)
                data += y - x
            self._beyond.add(a, b)
            if not extents.exact_total:
                s = array("Q", (x for x, _ in found))
                e = array("Q", (y for _, y in found))
                self._found_holes(b - a - data, a, b, s, e, [])

    def _refill(self, force: bool = False) -> bool:
        """Take another batch when the window runs low (``force``: it ran dry); a
        blocking source's batch is asked of the scan task.  True if one was taken now."""
        extents = self._extents
        if extents.done or (not force and len(self.unloaded) >= _WINDOW_LOW):
            return False
        if extents.blocking:
            self._scan_wanted.set()
            return False
        before = len(self.unloaded)
        while not extents.done and len(self.unloaded) < _WINDOW_LOW:
            self._take_batch(*extents.next_batch(_BATCH_EXTENTS))  # (a batch of looked-up data adds nothing)
        if self._all_settled():
            self._mark_done()
        return len(self.unloaded) > before

    async def _scan(self) -> None:
        """Takes a blocking source's batches in a worker thread, ahead of the sweep,
        while the window holds fewer than ``_WINDOW_HIGH`` intervals."""
        extents = self._extents
        while not extents.done and not self._closing:
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
        if self._all_settled():
            self._mark_done()
        self._poke()

    def _mark_done(self) -> None:
        if not self.done.is_set():
            self._finished_ns = time.perf_counter_ns()
            self.done.set()


def _split(segments: Sequence[list[int]], nbytes: int) -> tuple[list[list[int]], list[list[int]]]:
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
