"""Checksum chunks: which bytes of each chunk of the pages file have landed, hashing
them (:class:`_Chunks`), and the hash thread (:class:`_Hasher`) (docs/DESIGN.md,
Verification)."""

from __future__ import annotations

import ctypes
import os
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio
import xxhash

from .._memfile import Destination
from ._layout import Layout, _np

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

#: the hash thread's nice value while clients fault
_HASH_NICE = 10
#: a run of chunks over at least this many ranges finds their memory with NumPy
#: (:meth:`_Chunks.span_columns`); fewer, range by range (NumPy's calls cost more)
_COLUMN_SPANS = 16


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
        self.end = (layout.file_pages[n - 1] + layout.len_pages[n - 1]) << layout.shift if n else 0
        count = -(-self.end // chunk_size)
        if len(checksums) != count:
            raise ValueError(f"{len(checksums)} checksums for {count} chunks of {chunk_size} bytes")
        # ranges apart in the file (checked) and ascending cover every byte of [0, end)
        # exactly when their lengths add up to it: then they lie back to back, in memory order
        if layout.data_bytes != self.end:
            covered = 0
            for f, ln in zip(layout.file_pages, layout.len_pages):  # (only to name the chunk at fault)
                if f << layout.shift != covered:
                    break
                covered = (f + ln) << layout.shift
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
        files, lengths, mems, sh = layout.file_pages, layout.len_pages, layout.mem_pages, layout.shift
        i = max(bisect_right(files, flo >> sh) - 1, 0)
        n = len(files)
        spans: list[tuple[int, int]] = []
        while i < n and files[i] << sh < fhi:
            f = files[i] << sh
            lo, hi = max(f, flo), min(f + (lengths[i] << sh), fhi)
            if lo < hi:
                m = (mems[i] << sh) - f
                spans.append((m + lo, m + hi))
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
        import numpy

        size, end, sums = self.size, self.end, self.sums
        files, sh = self.layout.file_pages, self.layout.shift
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
            flo, fhi = first * size, min((last + 1) * size, end)
            los = his = None
            if bisect_left(files, fhi >> sh) - bisect_right(files, flo >> sh) >= _COLUMN_SPANS:
                los, his = self.span_columns(flo, fhi)  # many ranges: no Python work per range
                spans = list(zip(los.tolist(), his.tolist()))
            else:
                spans = self.file_spans(flo, fhi)
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
            failed = self._hash_spans(buffer, spans, first, last, yielding)
            if not failed and los is not None and his is not None:  # (the common case) all good: the spans
                apart = his[:-1] != los[1:]  # spans that touch are one
                if not apart.all():
                    los, his = los[numpy.concatenate(([True], apart))], his[numpy.concatenate((apart, [True]))]
                pairs = list(map(list, zip(los.tolist(), his.tolist())))
                if good and good[-1][1] == pairs[0][0]:
                    good[-1][1] = pairs[0][1]
                    del pairs[0]
                good.extend(pairs)
                verified += last - first + 1
                continue
            if not failed:  # (the common case) every piece is good: the spans as they are
                verified += last - first + 1
                for a, b in spans:
                    if good and good[-1][1] == a:
                        good[-1][1] = b
                    else:
                        good.append([a, b])
                continue
            verified += self._sort_pieces(first, last, set(failed), keep, bad)
        return good, verified, bad

    def span_columns(self, flo: int, fhi: int) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
        """:meth:`file_spans` as two columns (memory starts, ends): no Python work per
        range.  ``fhi`` is page-aligned (a chunk's end, or the file's)."""
        import numpy

        layout = self.layout
        files, sh = layout.file_pages, layout.shift
        i = max(bisect_right(files, flo >> sh) - 1, 0)
        j = bisect_left(files, fhi >> sh)  # the ranges starting before fhi
        shift = numpy.uint64(sh)
        f = _np(files)[i:j].astype(numpy.uint64) << shift
        m = _np(layout.mem_pages)[i:j].astype(numpy.uint64) << shift
        lo = numpy.maximum(f, numpy.uint64(flo))
        hi = numpy.minimum(f + (_np(layout.len_pages)[i:j].astype(numpy.uint64) << shift), numpy.uint64(fhi))
        m -= f  # (each range's memory minus file offset, mod 2**64)
        keep = lo < hi
        return (m + lo)[keep], (m + hi)[keep]

    def _hash_spans(self, buffer: Callable[[int, int], memoryview], spans: list[tuple[int, int]],
                    first: int, last: int, yielding: bool) -> list[int]:
        """The chunks ``first..last`` (their memory ``spans``, several) that do not match
        their checksums.  The hot loop of a scattered image's verification (a chunk of
        many small ranges): one view over the spans' hull, sliced; one hasher, reset
        (1M ranges of 4 KiB in 16 KiB chunks: docs/MEASUREMENTS.md, "Verified scattered chunks")."""
        size, end, sums = self.size, self.end, self.sums
        base = spans[0][0]
        view = buffer(base, spans[-1][1] - base)
        plain = xxhash.xxh3_64_intdigest
        hasher = xxhash.xxh3_64()
        update, reset, intdigest = hasher.update, hasher.reset, hasher.intdigest
        sched_yield = os.sched_yield
        failed: list[int] = []
        j, n = 0, len(spans)
        lo, hi = spans[0][0] - base, spans[0][1] - base
        for k in range(first, last + 1):
            want = min((k + 1) * size, end) - k * size  # this chunk's bytes
            if hi - lo >= want:  # within one span: one call
                if plain(view[lo : lo + want]) != sums[k]:
                    failed.append(k)
                lo += want
            else:
                reset()
                while True:
                    take = hi - lo if hi - lo < want else want
                    update(view[lo : lo + take])
                    lo += take
                    want -= take
                    if not want:
                        break
                    j += 1
                    lo, hi = spans[j][0] - base, spans[j][1] - base
                if intdigest() != sums[k]:
                    failed.append(k)
            if yielding:
                sched_yield()  # (lets the GIL go)
            if lo == hi and j + 1 < n:
                j += 1
                lo, hi = spans[j][0] - base, spans[j][1] - base
        return failed

    def _sort_pieces(self, first: int, last: int, failed: set[int], keep: Callable[[int, int], None],
                     bad: list[tuple[int, list[tuple[int, int]]]]) -> int:
        """Chunks ``first..last``, some of them ``failed`` (rare: corruption): the pieces
        of the good ones kept, each bad one with its pieces.  Returns the good ones."""
        good = 0
        for k in range(first, last + 1):
            pieces = self.memory_spans(k)
            if k in failed:
                bad.append((k, pieces))
                continue
            good += 1
            for a, b in pieces:
                keep(a, b)
        return good

    def chunk_range(self, lo: int, hi: int) -> tuple[int, int] | None:
        """The first and last chunk holding data of memory [lo, hi); None for holes only."""
        layout = self.layout
        mems, sh = layout.mem_pages, layout.shift
        first = layout.first_at_or_after(lo)
        last = bisect_right(mems, (hi - 1) >> sh) - 1
        if first >= len(layout) or last < first:
            return None
        first_mem, last_mem = mems[first] << sh, mems[last] << sh
        first_byte = max(lo, first_mem)
        last_byte = min(hi, last_mem + (layout.len_pages[last] << sh)) - 1
        if first_byte > last_byte:
            return None
        files = layout.file_pages
        return (((files[first] << sh) + first_byte - first_mem) // self.size,
                ((files[last] << sh) + last_byte - last_mem) // self.size)

    def memory_hull(self, first: int, last: int) -> tuple[int, int]:
        """The memory from chunk ``first``'s start to chunk ``last``'s end (two look-ups:
        the ranges lie back to back in the pages file, so each byte of [0, end) is in one)."""
        layout = self.layout
        files, mems, sh = layout.file_pages, layout.mem_pages, layout.shift
        flo, fhi = first * self.size, min((last + 1) * self.size, self.end)
        i = bisect_right(files, flo >> sh) - 1
        j = bisect_right(files, (fhi - 1) >> sh) - 1
        return ((mems[i] - files[i]) << sh) + flo, ((mems[j] - files[j]) << sh) + fhi


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
