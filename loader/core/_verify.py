"""Verification: bytes that land wait for their checksum chunk; once every byte of a
chunk has landed it is hashed, and only a matching chunk's bytes settle as loaded
(docs/DESIGN.md, Verification).  Without checksums, landed bytes settle at once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from operator import itemgetter, lt, sub
from typing import TYPE_CHECKING

import aio
from protocol import codes

from .._memfile import Destination
from ._chunks import _Checked, _Chunks, _Hasher
from ._config import LoadError, LoopState
from ._rangeset import RangeSet
from ._settle import Settler
from ._stats import LoaderCounters
from ._sweep import SweepOrder

if TYPE_CHECKING:
    from ..source import PageSource
    from ._reads import _Read

log = logging.getLogger("pageload")

#: checksum chunks that landed and wait for their hash: the sweep pauses while this
#: many bytes of them wait (hashing is behind the reads)
_MAX_UNHASHED = 16 << 20
#: a background hash job hashes about this many bytes of landed chunks, in the hash thread
_HASH_BATCH = 1 << 20
#: background hash jobs given to the hash thread at once
_HASH_JOBS = 2
#: a chunk a waiter needs, once all its bytes landed, is hashed at once in the loader's
#: task when it is at most this long (no worker-thread round trip, ~10 us per 64 KiB);
#: a longer one goes to the front of the background queue
_INLINE_HASH = 256 << 10


class Verifier:
    """Lands read bytes: settles them, or with ``chunks`` holds them until their chunk
    is hashed: at once in the loader's task (a waiter needs it), in the backend's
    thread right after a background read (:meth:`hash_after`), or in the hash thread.
    ``verify_now_limit``: a small wait's chunks are read and hashed in the waiting
    task (:meth:`verify_now`)."""

    def __init__(self, chunks: _Chunks | None, settler: Settler, unloaded: RangeSet, source: PageSource,
                 queue: aio.Queue, destination: Destination, order: SweepOrder, counters: LoaderCounters,
                 state: LoopState, *, wake: Callable[[], None], verify_now_limit: int) -> None:
        self.chunks = chunks
        self._settler = settler
        self._waiters = settler.waiters  # (the same list)
        self.unloaded = unloaded
        self.inflight = settler.inflight
        self.source = source
        self.queue = queue
        self.destination = destination
        self.order = order
        self.counters = counters
        self._state = state
        self._wake = wake
        self.verify_now_limit = verify_now_limit
        self._hash_jobs = 0  # background hash jobs given to the hash thread, not delivered yet
        self._last_spans: tuple[int, list[tuple[int, int]]] | None = None  # (:meth:`memory_spans`)
        self._hasher: _Hasher | None = None  # made at the first background hash
        #: batches the hash thread delivered, for the loop to settle (:meth:`settle_hashed`)
        self.hashed: list[tuple[list[tuple[int, int]], _Checked | Exception]] = []

    # ------------------------------------------------------------------ landing
    def land(self, segments: Sequence[list[int]], file_offset: int,
             hashed: tuple[int, int, _Checked] | None = None, ordered_length: int | None = None) -> None:
        """Bytes were read into ``segments`` (contiguous in the file from ``file_offset``).
        Without checksums they are loaded; with, they wait for their chunk, unless the
        chunks wholly inside were ``hashed`` already (by the backend's thread)."""
        chunks = self.chunks
        if chunks is None:
            self._settler.settle(segments, None, ordered_length=ordered_length)
            return
        length = sum(hi - lo for lo, hi in segments) if ordered_length is None else ordered_length
        complete = chunks.landed(file_offset, file_offset + length, bad=False)
        if hashed is not None:
            first, last, found = hashed  # all complete now: each byte lands once
            complete = [k for k in complete if k < first or k > last]
            self.checked(*found)
        if complete:
            self._chunks_complete(complete)

    def fail(self, segments: Sequence[list[int]], file_offset: int, code: str, err: int | None,
             reason: str) -> None:
        """``segments`` (contiguous in the file from ``file_offset``) failed for good."""
        length = sum(hi - lo for lo, hi in segments)
        where = f"memory {segments[0][0]:#x}+{length:#x} (pages file {file_offset:#x})"
        self._settler.settle(segments, LoadError(code, f"{where}: {reason}", err), reason)
        chunks = self.chunks
        if chunks is not None:
            complete = chunks.landed(file_offset, file_offset + length, bad=True)
            if complete:
                self._chunks_complete(complete)

    def _chunks_complete(self, ks: list[int]) -> None:
        """Every byte of chunks ``ks`` (ascending) has landed or failed.  Chunks a
        waiter needs are hashed at once, in this task (up to ``_INLINE_HASH`` bytes;
        more go first in the queue); the others queue, in runs, for background hash jobs."""
        chunks = self.chunks
        assert chunks is not None
        if chunks.bad:
            for k in [k for k in ks if k in chunks.bad]:
                self._unverifiable(k)
            ks = [k for k in ks if k not in chunks.bad]
        state = self._state
        if not ks or not state.running or state.closing:
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
            self.checked(*chunks.check(self.destination, now))
            runs = [r for r in runs if not r[2]]
        for a, b, urgent in runs:
            chunks.queue(a, b, bool(urgent))
        self._start_hashing()

    def _unverifiable(self, k: int) -> None:
        """Part of bad chunk ``k`` failed: what landed of it cannot be verified."""
        spans = self.chunks.memory_spans(k) if self.chunks is not None else []
        landed = [[a, b] for lo, hi in spans for a, b in self.inflight.overlapping(lo, hi)]
        if landed:
            self._settler.settle(landed, LoadError(
                codes.IO_ERROR, f"memory {landed[0][0]:#x}: other pages of its checksum chunk {k} "
                "failed to load, so it cannot be verified"),
                "other pages of its checksum chunk failed to load, so it cannot be verified")

    def checked(self, good: list[list[int]], verified: int, bad: list[tuple[int, list[tuple[int, int]]]]) -> None:
        """Chunks were hashed: ``good`` memory (``verified`` chunks) is loaded, in one
        settle; each ``bad`` chunk fails with ``corrupt``."""
        counters = self.counters
        counters.chunks_verified += verified
        settle = self._settler.settle
        for k, spans in bad:
            counters.corrupt_chunks += 1
            where = f"memory {spans[0][0]:#x}+{spans[-1][1] - spans[0][0]:#x}"
            reason = f"chunk {k} of the pages file does not match its checksum"
            log.warning("%s: %s", where, reason)
            settle([[lo, hi] for lo, hi in spans], LoadError(codes.CORRUPT, f"{where}: {reason}"), reason)
        if good:
            # (C loops over the segments: a scattered image's chunks have one a range)
            los, his = list(map(itemgetter(0), good)), list(map(itemgetter(1), good))
            if any(map(lt, los[1:], his)):
                good.sort()  # runs hashed in landing order: Settler.settle takes segments in memory order
            settle(good, None, ordered_length=sum(map(sub, his, los)))

    # ------------------------------------------------------------------ the hash thread
    def hashing(self) -> bool:
        """Whether chunks wait for their hash or are being hashed."""
        return self.chunks is not None and (bool(self.chunks.queued) or self._hash_jobs > 0)

    def paused(self) -> bool:
        """Whether the sweep must wait for hashing (too many landed bytes wait for it)."""
        return self.chunks is not None and self.chunks.queued_bytes >= _MAX_UNHASHED

    def set_busy(self, busy: bool) -> None:
        """Clients are faulting (or no longer): the hash thread runs niced meanwhile."""
        if self._hasher is not None:
            self._hasher.busy = busy

    def _start_hashing(self) -> None:
        """Give the hash thread batches of the queued chunks, up to ``_HASH_JOBS`` at once."""
        chunks = self.chunks
        assert chunks is not None
        state = self._state
        while chunks.queued and self._hash_jobs < _HASH_JOBS and state.running and not state.closing:
            if self._hasher is None:
                self._hasher = _Hasher(chunks, self.destination, self._hash_delivered)
            self._hash_jobs += 1
            self._hasher.busy = state.busy
            self._hasher.submit(chunks.take(_HASH_BATCH))

    def _hash_delivered(self, runs: list[tuple[int, int]], result: _Checked | Exception) -> None:
        """A batch was hashed (called in the trio thread, outside any task): the loop settles it."""
        self.hashed.append((runs, result))
        self._wake()

    def settle_hashed(self) -> None:
        """Settle the batches the hash thread delivered, and give it more."""
        results, self.hashed = self.hashed, []
        self._hash_jobs -= len(results)
        batch = self._state.reply_batch
        batch.open()
        try:
            for runs, result in results:
                if isinstance(result, Exception):
                    self._unhashable(runs, result)
                else:
                    self.checked(*result)
        finally:
            batch.close()
        self._start_hashing()

    def _unhashable(self, runs: list[tuple[int, int]], exc: Exception) -> None:
        """Hashing chunks ``runs`` raised ``exc``: their bytes cannot be verified, so they fail."""
        chunks = self.chunks
        assert chunks is not None
        reason = f"its checksum chunk could not be hashed ({type(exc).__name__}: {exc})"
        log.error("checksum chunks %s: %s", runs, reason)
        for first, last in runs:
            spans = chunks.file_spans(first * chunks.size, min((last + 1) * chunks.size, chunks.end))
            segments = [[lo, hi] for lo, hi in spans]
            self._settler.settle(segments, LoadError(codes.IO_ERROR, f"memory {spans[0][0]:#x}: {reason}"), reason)

    def stop(self) -> None:
        """The loop ended: stop the hash thread (it reads the memory file), drop its results."""
        if self._hasher is not None:
            self._hasher.stop()
            self._hasher = None
        self._hash_jobs = 0
        self.hashed.clear()

    def hash_after(self, read: _Read) -> Callable[[], None] | None:
        """For a background read: hash the checksum chunks wholly inside it in the
        backend's thread, right after it lands (``aio.Request.then``), while its bytes
        are in the CPU's cache; :meth:`land` takes the result.  None: no whole chunk."""
        chunks = self.chunks
        assert chunks is not None
        size, end = chunks.size, chunks.end
        lo, hi = read.file_offset, read.file_offset + read.length
        first = -(-lo // size)
        last = (end - 1) // size if hi >= end else hi // size - 1
        if first > last:
            return None
        check, destination, busy = chunks.check, self.destination, self._state.is_busy

        def then() -> None:
            read.hashed = (first, last, check(destination, [(first, last)], busy))

        return then

    # ------------------------------------------------------------------ waits
    def verify_now(self, lo: int, hi: int, need: int, now: int) -> int:
        """With checksums: serve a small wait in the caller's task, as :meth:`Reads.read_now`
        does without.  Each chunk of ``[lo, hi)`` (at most ``read_now_bytes`` of chunks
        in all) whose bytes all landed and wait for their hash is hashed now; each one
        wholly unstarted is read now when the queue can do that without blocking (page
        cache), then hashed.  Returns the bytes still needed (0: served; raises the
        chunk's :class:`LoadError` when it is corrupt).  A chunk partly in flight, or
        not cached, is left to the loader's task, with the bytes already needed."""
        chunks = self.chunks
        assert chunks is not None
        span = chunks.chunk_range(lo, hi)
        if span is None:
            return need
        k0, k1 = span
        if (k1 - k0 + 1) * chunks.size > self.verify_now_limit:
            for k in range(k0, k1 + 1):  # too long to hash here: queued ones go first
                if k in chunks.queued:
                    chunks.runs.appendleft((k, k))
            return need
        unloaded = self.unloaded
        dest, queue, source = self.destination, self.queue, self.source
        counters = self.counters
        served = corrupt = pending = False
        for k in range(k0, k1 + 1):
            spans = self.memory_spans(k)
            if chunks.unqueue(k):  # landed, waiting for a background hash
                pass
            elif k in chunks.bad:
                pending = True
                break
            # (the chunk's memory from its first piece to its last holds only its pieces and
            # holes, pages-file offsets ascending with memory: one look-up for all of them)
            elif unloaded.overlap_bytes(spans[0][0], spans[-1][1]) == (nbytes := sum(b - a for a, b in spans)):
                file_offset = k * chunks.size
                # the chunk's pieces at their places in memory, in one system call
                got = source.read_now_v(queue, [dest.buffer(a, b - a) for a, b in spans], file_offset)
                if got == nbytes:
                    file_offset += got
                    # never in flight: settling finds nothing to remove there
                    unloaded.remove(spans[0][0], spans[-1][1])
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
                self._settler.settle([[a, b] for a, b in spans], None)
            else:
                corrupt = True
                self.checked([], 0, [(k, spans)])
        if corrupt:
            counters.waits_failed += 1
            raise self._settler.failure_for(lo, hi)
        if not served:
            return need
        if pending:
            return ((unloaded.overlap_bytes(lo, hi) if unloaded else 0)
                    + (self.inflight.overlap_bytes(lo, hi) if self.inflight else 0))
        self._settler.served_at_once(need, now)
        return 0

    def verify_fresh(self, lo: int, hi: int, span: tuple[int, int], now: int) -> bool:
        """:meth:`verify_now` for chunks ``span`` (first, last) whose memory nobody has
        looked up yet (:meth:`Window.fresh`: unstarted, in no set): each is read from
        the page cache into its places and hashed here, then settled, without passing
        through ``unloaded``.  True when all of them were; False where one cannot be read
        at once or does not match (the caller then looks them up and goes the usual way,
        which reads it again and, corrupt, fails it).  The wait's ``[lo, hi)`` has all
        its data in these chunks."""
        chunks = self.chunks
        assert chunks is not None
        k0, k1 = span
        if (k1 - k0 + 1) * chunks.size > self.verify_now_limit:
            return False
        dest, queue, source = self.destination, self.queue, self.source
        pieces: list[list[int]] = []
        need = 0
        for k in range(k0, k1 + 1):
            spans = self.memory_spans(k)
            nbytes = 0
            for a, b in spans:
                nbytes += b - a
                if a < hi and b > lo:
                    need += min(b, hi) - max(a, lo)
            if source.read_now_v(queue, [dest.buffer(a, b - a) for a, b in spans], k * chunks.size) != nbytes:
                return False
            if not chunks.matches(dest, k, spans):
                return False
            pieces.extend([a, b] for a, b in spans)
        counters = self.counters
        counters.reads_total += k1 - k0 + 1
        counters.chunks_verified += k1 - k0 + 1
        self.order.note_served(pieces[-1][1])
        self._settler.settle(pieces, None)
        self._settler.served_at_once(need, now)
        return True

    def read_span(self, lo: int, hi: int) -> tuple[int, int, tuple[int, int] | None]:
        """What a waiter on [lo, hi) reads: its span, or with checksums the whole
        chunks its data is in (a chunk is served only once all of it is verified);
        and those chunks (first, last), if any."""
        chunks = self.chunks
        if chunks is None:
            return lo, hi, None
        span = chunks.chunk_range(lo, hi)
        if span is None:
            return lo, hi, None
        if span[0] == span[1]:  # (the usual wait: one chunk, whose pieces the read takes next)
            spans = self.memory_spans(span[0])
            hull_lo, hull_hi = spans[0][0], spans[-1][1]
        else:
            hull_lo, hull_hi = chunks.memory_hull(*span)
        return min(lo, hull_lo), max(hi, hull_hi), span

    def memory_spans(self, k: int) -> list[tuple[int, int]]:
        """Chunk ``k``'s memory (:meth:`_Chunks.memory_spans`), the last chunk's kept:
        a wait asks for it twice (its read span, then its read); the layout never changes."""
        last = self._last_spans
        if last is not None and last[0] == k:
            return last[1]
        assert self.chunks is not None
        spans = self.chunks.memory_spans(k)
        self._last_spans = (k, spans)
        return spans
