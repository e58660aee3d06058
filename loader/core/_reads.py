"""The read side of the loader: which unstarted bytes a read takes, putting it in
flight through the queue, its deadline, and its completion: landed, retried, cut
short, narrowed down to the failing pages, or failed (docs/DESIGN.md, "The loader's
loop", Deadlines, Errors)."""

from __future__ import annotations

import errno as errno_mod
import fcntl
import logging
import math
import os
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from operator import sub
from typing import TYPE_CHECKING

import trio

import aio
from protocol import codes

from .._memfile import Destination, MemoryFile, explain_error
from ._chunks import _Checked
from ._config import LoaderConfig, LoopState, ReadKind, Segs, WaitHandle
from ._layout import _np
from ._rangeset import RangeSet
from ._settle import Settler
from ._stats import LoaderCounters
from ._sweep import SweepOrder
from ._verify import Verifier

if TYPE_CHECKING:
    from ..source import LocalPages, PageSource

log = logging.getLogger("pageload")

_RETRIABLE = {errno_mod.EINTR, errno_mod.EAGAIN}
#: a waiter's read up to this long goes into the mapping (the threads backend reads
#: such urgent reads at once, in the adding thread, when the page cache has them);
#: a longer one is copied too
_INLINE_LIMIT = 64 << 10
#: a read whose ranges average less than this goes into the mapping, not through the
#: pipe: one ``preadv`` (or ``pread`` a range) against a ``splice`` a range, which threads
#: cannot do side by side (the memory file's inode lock).  1M 4 KiB ranges of a pages
#: checkpoint: 5.1 s against 10.1 s, verified (docs/MEASUREMENTS.md, "Small ranges into the mapping").
#: Except a pages file's background read while clients fault: copied, it costs the waiters
#: less (measured, not explained: a 4 KiB wait at 1M ranges 310 us p50 against 410; a raw
#: image's gathered reads the other way; docs/MEASUREMENTS.md, "Verified waits and the fill's reads")
_COPY_MIN_SEGMENT = 64 << 10
#: a copy completing so says the memory file cannot be written to through its fd
_NO_COPY = {-errno_mod.EINVAL, -errno_mod.EOPNOTSUPP, -errno_mod.EBADF}
#: most ranges one gathered background copy takes (two ``splice`` calls each)
_GATHER_SEGMENTS = 256


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
        #: ranges: :meth:`Reads._issue_gather`); ``file_offset`` is the first's
        self.gather = False
        #: a gathered read's segments as (starts, lengths) arrays, in memory order, while
        #: they are all of it (None once it is cut: a short read's rest)
        self.columns: tuple[array[int], array[int]] | None = None
        #: (first, last, what check found) for the checksum chunks wholly inside it,
        #: hashed by the backend's thread right after the read (``aio.Request.then``)
        self.hashed: tuple[int, int, _Checked] | None = None


class Reads:
    """The reads in flight (``table``, by id) and everything done to one: started at an
    unstarted byte (:meth:`issue`), submitted to the queue (:meth:`submit`), expired
    past its deadline (:meth:`expire`), completed (:meth:`complete`).  Each read counts
    against its share (its waiter's ``inflight``, or ``background_inflight``) exactly
    while it is in ``table``.  Landed bytes go to the ``verifier``."""

    def __init__(self, source: PageSource, destination: Destination, queue: aio.Queue, config: LoaderConfig,
                 unloaded: RangeSet, verifier: Verifier, settler: Settler, order: SweepOrder,
                 counters: LoaderCounters, state: LoopState, *, requeue: Callable[[WaitHandle], None]) -> None:
        layout = self.layout = source.layout
        self.page_size = layout.page_size
        self.memory_size = layout.memory_size
        self.source = source
        self.destination = destination
        self.queue = queue
        self.config = config
        self.unloaded = unloaded
        self.inflight = settler.inflight
        self.failed = settler.failed
        self._verifier = verifier
        self._chunks = verifier.chunks
        self._settler = settler
        self.order = order
        self.counters = counters
        self._state = state
        self._requeue = requeue
        #: the source's reason for a failed read, where it has one (:class:`~loader.source.ExplainsFailures`)
        self._failure: Callable[[int, int, int], tuple[str, str] | None] | None = getattr(source, "failure", None)
        local = self._local = source.local
        #: where reads are copied to in the kernel (None: into the mapping)
        self._copy_fd: int | None = _copy_target(config, queue, destination, local)
        #: the mapping a raw image's gathers read into by address, a batch of ranges a
        #: system call (:mod:`aio._batch`): where the source takes it and every buffer is
        #: a slice of it at its memory offset, the raw image's file offset
        self._within: memoryview | None = (
            destination.view if getattr(source, "gathers_within", False) and isinstance(destination, MemoryFile)
            and type(destination).buffer is MemoryFile.buffer else None)
        # a layout whose pages-file offsets do not ascend with memory (working set laid out
        # first): the ranges in file order, so that sweep reads can follow the file
        self._by_file: array[int] | None = None
        self._file_starts: array[int] | None = None
        if not layout.file_ascends():
            import numpy

            files = _np(layout.file_pages)
            by_file = numpy.argsort(files, kind="stable")
            self._by_file = array("Q", by_file.astype(numpy.uint64).tobytes())
            # (page numbers, as the column)
            self._file_starts = array(layout.file_pages.typecode, files[by_file].tobytes())
        #: the pages file holds the ranges back to back in memory order from 0
        #: (``checkpoint create``'s layout): a sweep read takes ranges straight from the table
        self._packed = not layout.identity_mapped and len(layout) > 1 and layout.prefix() is layout.file_pages
        self.table: dict[int, _Read] = {}  #: in flight, by id
        self.stuck: dict[int, _Read] = {}  #: timed out, not returned by the backend yet
        self._next_id = 0
        self.background_inflight = 0
        #: halves of failed reads being narrowed down, waiting for their turn
        self.resubmit: deque[_Read] = deque()
        self._tail_failed_at: int | None = None

    def room(self) -> bool:
        """Whether a read may be started now (the loader's depth, and the queue's)."""
        return len(self.table) < self.config.queue_depth and self.queue.outstanding < self.queue.capacity

    def read_now(self, lo: int, hi: int, need: int, now: int) -> bool:
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
        if i < 0 or hi > layout.end_at(i):
            return False
        buffer = self.destination.buffer(lo, need)
        if self.source.read_now(self.queue, buffer, layout.file_at(i) + lo - layout.mem_at(i)) != need:
            return False  # not cached (or failed): the queue reads it, and reports errors
        self.unloaded.remove(lo, hi)  # never in flight: settling's removal from inflight finds nothing
        counters = self.counters
        counters.reads_total += 1
        self.order.note_served(hi)
        self._settler.settle([[lo, hi]], None)  # also answers earlier waiters on these bytes
        self._settler.served_at_once(need, now)
        return True

    def issue(self, start: int, limit: int, budget: int, kind: ReadKind, owner: WaitHandle | None) -> int:
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
        file_pos = layout.file_at(i) + (start - layout.mem_at(i))
        file_offset = file_pos
        segments: list[list[int]] = []
        max_segments = self.queue.max_buffers
        total = 0
        while True:
            interval = unloaded.interval_at(pos)
            assert interval is not None
            range_end = layout.end_at(i)
            stop = min(interval[1], range_end)
            end = min(stop, limit, pos + budget - total)
            if segments and segments[-1][1] == pos:
                segments[-1][1] = end
            elif len(segments) < max_segments:
                segments.append([pos, end])
            else:
                break  # as many buffers as one read of the queue's takes
            total += end - pos
            file_pos += end - pos
            if total >= budget:
                break
            if end == stop and end < limit:
                nxt = unloaded.first_at_or_after(end)
                if nxt is not None and nxt[0] < limit:
                    j = layout.find(nxt[0])
                    if layout.file_at(j) + (nxt[0] - layout.mem_at(j)) == file_pos:
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
        self.submit(read)
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
        read = _Read(self._next_id, kind, None, first, Segs(los, lengths), length=sum(lengths))
        read.gather = True
        read.columns = (los, lengths)
        self._next_id += 1
        self.counters.reads_total += 1
        self.submit(read)
        return last

    def _issue_packed(self, start: int, limit: int, budget: int, kind: ReadKind) -> int | None:
        """A background read of a pages file packed in memory order (``checkpoint
        create``'s): the file bytes from ``start``'s on are the next ranges' in memory
        order, so where all of them are unstarted the read's segments are the ranges
        themselves, taken from the table's columns (as columns: no Python work per
        range) and put in the sets at once.  None where some are started (the general
        loop then walks them)."""
        import numpy

        layout = self.layout
        i = layout.find(start)
        if i < 0:
            return None
        mem, sh = layout.mem_pages, layout.shift
        k = min(len(mem), i + min(_GATHER_SEGMENTS, self.queue.max_buffers), bisect_right(mem, (limit - 1) >> sh))
        if k - i < 2:
            return None  # a single range: the general loop
        shift = numpy.uint64(sh)
        los = _np(mem)[i:k].astype(numpy.uint64) << shift
        his = los + (_np(layout.len_pages)[i:k].astype(numpy.uint64) << shift)
        los[0] = max(int(los[0]), start)
        numpy.minimum(his, numpy.uint64(limit), out=his)
        ends = numpy.cumsum(his - los)
        if int(ends[-1]) > budget:  # the range that reaches the budget is cut there, the rest left
            j = int(numpy.searchsorted(ends, budget))
            his[j] -= numpy.uint64(int(ends[j]) - budget)
            los, his = los[:j + 1], his[:j + 1]
        apart = his[:-1] != los[1:]  # ranges that touch in memory are one segment
        if not apart.all():
            los, his = los[numpy.concatenate(([True], apart))], his[numpy.concatenate((apart, [True]))]
        total = min(budget, int(ends[-1]))
        first, last = start, int(his[-1])
        unloaded = self.unloaded
        if len(los) < 2 or unloaded.overlap_bytes(first, last) != total:
            return None  # a single range, or some of it started: the general loop
        starts, lengths = array("Q", los.tobytes()), array("Q", (his - los).tobytes())
        unloaded.remove(first, last)
        inflight = self.inflight
        if not inflight.overlap_bytes(first, last):
            inflight.insert_sorted(starts, array("Q", his.tobytes()))
        else:
            for lo, hi in zip(starts.tolist(), his.tolist()):
                inflight.add(lo, hi)
        read = _Read(self._next_id, kind, None, layout.file_at(i) + start - layout.mem_at(i), Segs(starts, lengths),
                     length=total)
        read.columns = (starts, lengths)
        self._next_id += 1
        self.counters.reads_total += 1
        self.submit(read)
        return last

    def _degather(self, read: _Read) -> None:
        """A gathered read that can be neither copied in the kernel nor gathered by the
        queue (the memory file refused a copy, and the backend takes no ``Op.GATHER``):
        one read into the mapping per range."""
        for lo, hi in read.segments:
            part = _Read(self._next_id, read.kind, read.owner, lo, [[lo, hi]], read.retry)
            self._next_id += 1
            self.submit(part)

    def _file_next(self, file_pos: int) -> int | None:
        """The memory offset whose data is at pages-file offset ``file_pos``, if unloaded."""
        assert self._by_file is not None and self._file_starts is not None
        layout = self.layout
        k = bisect_right(self._file_starts, file_pos >> layout.shift) - 1
        if k < 0:
            return None
        j = self._by_file[k]
        if file_pos >= layout.file_at(j) + layout.length_at(j):
            return None
        mem = layout.mem_at(j) + file_pos - layout.file_at(j)
        return mem if self.unloaded.contains(mem) else None

    def submit(self, read: _Read) -> None:
        """Put ``read`` in flight; it counts against its share until :meth:`release`."""
        self.table[read.id] = read
        if read.owner is not None:
            read.owner.inflight += 1
        elif not read.kind.urgent:
            self.background_inflight += 1
        timeout = self.config.read_timeout
        read.deadline = math.inf if timeout is None else trio.current_time() + timeout
        urgent = read.kind.urgent
        copy_fd, local = self._copy_fd, self._local
        read.hashed = None
        # (a gathered read is a raw image's, which has no checksums; its file bytes are apart)
        then = self._verifier.hash_after(read) if self._chunks is not None and not urgent and not read.gather else None
        # small ranges go into the mapping (threads read into it side by side), but a pages
        # file's background read while clients fault is copied (measured kinder to the waits)
        small = read.length < _COPY_MIN_SEGMENT * len(read.segments)
        if (copy_fd is not None and local is not None and (read.gather or not urgent or read.length > _INLINE_LIMIT)
                and (not small or (self._state.busy and not urgent and not read.gather))):
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
                self.release(read)
                self._degather(read)
                return
            # a raw image: each range from its own offset of the file into the mapping
            columns = read.columns
            if columns is not None:
                buffers, offsets = list(map(dest.buffer, *columns)), columns[0]
            else:
                buffers = [dest.buffer(lo, hi - lo) for lo, hi in read.segments]
                offsets = array("Q", [lo for lo, _ in read.segments])
            if self._within is not None:
                self.queue.add(self.source.gather(read.id, buffers, offsets, urgent=urgent,  # type: ignore[call-arg]
                                                  within=self._within))
            else:
                self.queue.add(self.source.gather(read.id, buffers, offsets, urgent=urgent))
            return
        columns = read.columns
        buffers = (list(map(dest.buffer, *columns)) if columns is not None
                   else [dest.buffer(lo, hi - lo) for lo, hi in read.segments])
        self.queue.add(self.source.read(read.id, read.file_offset, buffers, urgent=urgent, then=then))

    def release(self, read: _Read) -> None:
        """``read`` is out of flight (completed or timed out): uncount it."""
        del self.table[read.id]
        owner = read.owner
        if owner is not None:
            owner.inflight -= 1
            self._requeue(owner)
        elif not read.kind.urgent:
            self.background_inflight -= 1

    def next_deadline(self) -> float:
        return min((r.deadline for r in self.table.values()), default=math.inf)

    def expire(self, now: float) -> None:
        """Fail reads past their deadline with ``timeout`` and free their slots.  Their
        memory is failed for good, so no other read ever targets the buffers that a
        stuck thread may still write into; their completions are ignored."""
        timeout = self.config.read_timeout
        for read in [r for r in self.table.values() if r.deadline <= now]:
            self.release(read)
            self.stuck[read.id] = read
            self.counters.reads_timed_out += 1
            self._verifier.fail(read.segments, read.file_offset, codes.TIMEOUT, None,
                                 f"reading the pages file took longer than {timeout:g} s")

    def complete(self, completion: aio.Completion) -> None:
        read = self.table.get(completion.id)
        if read is None:  # a timed-out read came back after all: its pages stay failed
            self.stuck.pop(completion.id, None)
            return
        self.release(read)
        if self._state.closing:
            return
        result = completion.result
        if result == read.length:
            self._verifier.land(read.segments, read.file_offset, read.hashed, read.length if read.columns else None)
            return
        if read.copied and result in _NO_COPY:
            # the memory file takes no writes (hugetlbfs: EINVAL): into the mapping from now on
            if self._copy_fd is not None:  # (said once: the other copies in flight fail alike)
                log.info("memory file: copying into it in the kernel failed (%s); reading into its "
                         "mapping instead", errno_mod.errorcode.get(-result, str(-result)))
                self._copy_fd = None
            self.submit(read)
            return
        counters = self.counters
        if result > 0:  # short read: keep what arrived, resubmit the rest
            done, rest = _split(read.segments, result)
            self._verifier.land(done, read.file_offset)
            read.segments = rest
            read.columns = None
            read.length -= result
            read.file_offset = rest[0][0] if read.gather else read.file_offset + result
            counters.reads_retried += 1
            self.submit(read)
            return
        if result == 0 and self._at_end_of_file(read.file_offset):
            self._fail_tail(read)
            return
        err = -result if result < 0 else errno_mod.EIO
        read.attempts += 1
        if (result == 0 or err in _RETRIABLE) and read.attempts <= self.config.max_retries:
            counters.reads_retried += 1
            self.submit(read)
            return
        if read.length > self.page_size:  # narrow it down: only the bad pages fail
            self._split_failed(read)
            return
        if result < 0 and self._failure is not None and \
                (said := self._failure(read.file_offset, read.length, err)) is not None:
            self._verifier.fail(read.segments, read.file_offset, said[0], None, said[1])  # e.g. unavailable
        elif result == 0:
            self._verifier.fail(read.segments, read.file_offset, codes.IO_ERROR, None,
                                 "the pages file returned no data here, again and again")
        elif (why := explain_error(self.destination, err)) != os.strerror(err):
            # e.g. EFAULT from a full memory file: "memory file is full (ENOSPC on ...)"
            self._verifier.fail(read.segments, read.file_offset, codes.IO_ERROR,
                                 errno_mod.ENOSPC if err == errno_mod.EFAULT else err, why)
        else:
            self._verifier.fail(read.segments, read.file_offset, codes.IO_ERROR, err, "reading the pages file failed")

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
                self.resubmit.append(part)
                self._next_id += 1
                self.counters.reads_retried += 1

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
        need = max(((f + n) << self.layout.shift for f, n in zip(self.layout.file_pages, self.layout.len_pages)),
                   default=0)
        reason = f"pages file ends at {size}, the layout needs {need}"
        self._verifier.fail(read.segments, read.file_offset, codes.IO_ERROR, None, reason)
        if self._tail_failed_at == size:
            return
        self._tail_failed_at = size
        layout = self.layout
        past: list[tuple[int, int, int]] = []
        for i in range(len(layout)):
            m, n, f = layout[i]
            if f + n <= size:
                continue
            lo = m + max(0, size - f)
            for a, b in self.unloaded.overlapping(lo, m + n):
                past.append((a, b, f + a - m))
        for a, b, f in past:
            self.unloaded.remove(a, b)
            self._verifier.fail([[a, b]], f, codes.IO_ERROR, None, reason)
        log.warning("%s: %d bytes of memory failed", reason, self.failed.total)


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
