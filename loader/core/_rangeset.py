"""A set of disjoint half-open byte ranges ``[lo, hi)``, fast and small at millions.

The intervals are kept sorted in *blocks*: each block is two ``array('Q')`` columns
(starts, ends) of at most ``2 * _BLOCK`` intervals, and two plain lists hold each
block's first start and last end.  An operation bisects the block lists, then
the block, and edits only that block (a ``memmove`` of at most a few KiB), so
``add``, ``remove``, ``contains``, ``overlap_bytes`` and ``first_at_or_after`` cost
O(log n) plus a bounded constant at any size, where one flat list cost O(n) per
edit (the quadratic fill of a million-range image).  Memory: 16 bytes per
interval in the arrays, plus about 70 bytes per block of up to 2048 intervals —
never a Python object per interval, and never per page.

This is a B-tree of height two (cf. ``sortedcontainers.SortedList``, a list of
lists); the block index is a Python list because even 4M intervals make only a
few thousand blocks, whose index edits are a ``memmove`` of a few KiB.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

#: intervals per block after a split; a block splits at twice this
_BLOCK = 1024


class RangeSet:
    __slots__ = ("_los", "_his", "_firsts", "_lasts", "_total", "_count")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._los: list[array[int]] = []  #: per block: interval starts
        self._his: list[array[int]] = []  #: per block: interval ends
        self._firsts: list[int] = []  #: per block: its first start
        self._lasts: list[int] = []  #: per block: its last end
        self._total = 0
        self._count = 0
        pending_lo, pending_hi = array("Q"), array("Q")
        last_end = -1
        for lo, hi in ranges:
            if lo >= hi:
                continue
            if lo > last_end:  # sorted and apart (the usual case): appended in bulk
                pending_lo.append(lo)
                pending_hi.append(hi)
                last_end = hi
            else:
                self._extend(pending_lo, pending_hi)
                pending_lo, pending_hi = array("Q"), array("Q")
                self.add(lo, hi)
                last_end = self._lasts[-1]
        self._extend(pending_lo, pending_hi)

    @classmethod
    def from_arrays(cls, los: array[int], his: array[int]) -> RangeSet:
        """A set of the sorted, disjoint, non-touching intervals ``los[i], his[i]``
        (not checked), built without a Python object per interval."""
        s = cls()
        s._extend(los, his)
        return s

    def _extend(self, los: array[int], his: array[int]) -> None:
        """Append sorted intervals that all start after the set's last end."""
        n = len(los)
        if not n:
            return
        self._total += sum(his) - sum(los)
        self._count += n
        for k in range(0, n, _BLOCK):
            blo, bhi = los[k:k + _BLOCK], his[k:k + _BLOCK]
            if not isinstance(blo, array):
                blo, bhi = array("Q", blo), array("Q", bhi)
            self._los.append(blo)
            self._his.append(bhi)
            self._firsts.append(blo[0])
            self._lasts.append(bhi[-1])

    def __len__(self) -> int:
        """Number of disjoint intervals (not bytes; see :attr:`total`)."""
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for blo, bhi in zip(self._los, self._his):
            yield from zip(blo, bhi)

    def __repr__(self) -> str:
        shown = ", ".join(f"[{lo:#x}, {hi:#x})" for lo, hi in list(self.overlapping(0, 1 << 64))[:8])
        more = f", ... {len(self) - 8} more" if len(self) > 8 else ""
        return f"RangeSet({shown}{more})"

    @property
    def total(self) -> int:
        """Bytes in the set."""
        return self._total

    def memory_bytes(self) -> int:
        """What the set's arrays and block lists take (not counting the object itself)."""
        arrays = sum(a.buffer_info()[1] * a.itemsize + 64 for a in (*self._los, *self._his))
        return arrays + 8 * 4 * len(self._los) + 32 * 2 * len(self._los)

    # ---------------------------------------------------------------- positions
    # A position is (block, index within block); (b, len(block b)) is the same as
    # (b + 1, 0).

    def _pos_first_hi_ge(self, x: int) -> tuple[int, int]:
        """Position of the first interval whose end is >= x."""
        b = bisect_left(self._lasts, x)
        if b == len(self._lasts):
            return b, 0
        return b, bisect_left(self._his[b], x)

    def _pos_first_hi_gt(self, x: int) -> tuple[int, int]:
        """Position of the first interval whose end is > x."""
        b = bisect_right(self._lasts, x)
        if b == len(self._lasts):
            return b, 0
        return b, bisect_right(self._his[b], x)

    def _pos_first_lo_gt(self, x: int) -> tuple[int, int]:
        """Position of the first interval whose start is > x."""
        b = bisect_right(self._firsts, x) - 1
        if b < 0:
            return 0, 0
        return b, bisect_right(self._los[b], x)

    def _pos_first_lo_ge(self, x: int) -> tuple[int, int]:
        """Position of the first interval whose start is >= x."""
        b = bisect_left(self._firsts, x) - 1
        if b < 0:
            return 0, 0
        return b, bisect_left(self._los[b], x)

    def _splice(self, bi: int, pi: int, bj: int, pj: int, new_lo: list[int] | array[int],
                new_hi: list[int] | array[int]) -> None:
        """Replace the intervals from position (bi, pi) up to (bj, pj) with the new ones."""
        los, his = self._los, self._his
        nb = len(los)
        if bi == nb:  # appending after the last block
            if not new_lo:
                return
            if nb and len(los[-1]) < 2 * _BLOCK:
                bi, pi = nb - 1, len(los[-1])
                bj, pj = bi, pi
            else:
                los.append(array("Q"))
                his.append(array("Q"))
                self._firsts.append(new_lo[0])
                self._lasts.append(new_hi[-1])
                bj, pj = bi, 0
        if pj == 0 and bj > bi:  # (b, 0) is (b - 1, its length): stay in one block
            bj, pj = bj - 1, len(los[bj - 1])
        removed = 0
        if bi == bj:
            blo, bhi = los[bi], his[bi]
            self._count += len(new_lo) - (pj - pi)
            if pj - pi == 1 and len(new_lo) == 1:
                blo[pi], bhi[pi] = new_lo[0], new_hi[0]
            else:
                blo[pi:pj] = array("Q", new_lo)
                bhi[pi:pj] = array("Q", new_hi)
            self._fix(bi)
            return
        # several blocks: join what is kept of the first and last, with the new ones
        blo = los[bi][:pi]
        bhi = his[bi][:pi]
        blo.extend(new_lo)
        bhi.extend(new_hi)
        blo.extend(los[bj][pj:])
        bhi.extend(his[bj][pj:])
        for b in range(bi, bj + 1):
            removed += len(los[b])
        self._count += len(blo) - removed
        los[bi:bj + 1] = [blo]
        his[bi:bj + 1] = [bhi]
        self._firsts[bi:bj + 1] = [0]
        self._lasts[bi:bj + 1] = [0]
        self._fix(bi)

    def _fix(self, b: int) -> None:
        """Block ``b`` changed: drop it if empty, split it if too big, refresh its bounds."""
        blo, bhi = self._los[b], self._his[b]
        n = len(blo)
        if n == 0:
            del self._los[b], self._his[b], self._firsts[b], self._lasts[b]
            return
        if n > 2 * _BLOCK:
            parts = range(0, n, _BLOCK)
            self._los[b:b + 1] = [blo[k:k + _BLOCK] for k in parts]
            self._his[b:b + 1] = [bhi[k:k + _BLOCK] for k in parts]
            self._firsts[b:b + 1] = [blo[k] for k in parts]
            self._lasts[b:b + 1] = [bhi[min(k + _BLOCK, n) - 1] for k in parts]
            return
        self._firsts[b] = blo[0]
        self._lasts[b] = bhi[-1]

    def _between(self, bi: int, pi: int, bj: int, pj: int) -> Iterator[tuple[int, int]]:
        """The intervals from position (bi, pi) up to (bj, pj)."""
        los, his = self._los, self._his
        while bi < bj or (bi == bj and pi < pj):
            if bi >= len(los):
                return
            blo, bhi = los[bi], his[bi]
            end = pj if bi == bj else len(blo)
            for k in range(pi, end):
                yield blo[k], bhi[k]
            bi, pi = bi + 1, 0

    # ---------------------------------------------------------------- edits
    def add(self, lo: int, hi: int) -> None:
        """Add ``[lo, hi)``, merging with overlapping or touching intervals."""
        if lo >= hi:
            return
        bi, pi = self._pos_first_hi_ge(lo)  # first interval ending at or after lo
        bj, pj = self._pos_first_lo_gt(hi)  # first interval starting after hi
        removed = 0
        first = True
        for a, b in self._between(bi, pi, bj, pj):
            if first:
                lo = min(lo, a)
                first = False
            removed += b - a
            last_hi = b
        if not first:
            hi = max(hi, last_hi)
        self._splice(bi, pi, bj, pj, [lo], [hi])
        self._total += (hi - lo) - removed

    def remove(self, lo: int, hi: int) -> None:
        """Remove ``[lo, hi)``, splitting intervals it cuts (the intervals inside are
        counted a block slice at a time, in C: a gathered read's thousand ranges cost
        no Python work each)."""
        if lo >= hi or not self._count:
            return
        bi, pi = self._pos_first_hi_gt(lo)  # first interval ending after lo
        bj, pj = self._pos_first_lo_ge(hi)  # first interval starting at or after hi
        los, his = self._los, self._his
        if bi >= len(los) or (bi, pi) >= (bj, pj):
            return
        removed = 0
        b = bi
        while True:
            start = pi if b == bi else 0
            stop = pj if b == bj else len(los[b])
            removed += sum(his[b][start:stop]) - sum(los[b][start:stop])
            if b >= bj or b + 1 >= len(los):
                break
            b += 1
        first_lo = los[bi][pi]
        lb, lp = (bj, pj - 1) if pj else (bj - 1, len(los[bj - 1]) - 1)
        last_hi = his[lb][lp]
        new_lo: list[int] = []
        new_hi: list[int] = []
        if first_lo < lo:
            new_lo.append(first_lo)
            new_hi.append(lo)
        if last_hi > hi:
            new_lo.append(hi)
            new_hi.append(last_hi)
        kept = sum(b - a for a, b in zip(new_lo, new_hi))
        self._splice(bi, pi, bj, pj, new_lo, new_hi)
        self._total -= removed - kept

    def insert_sorted(self, los: array[int], his: array[int]) -> None:
        """Add sorted, disjoint, non-touching intervals that all fall in one gap of the
        set (they may touch its neighbours, and are merged with them), in bulk: no
        Python work per interval."""
        n = len(los)
        if not n:
            return
        if n == 1:
            self.add(los[0], his[0])
            return
        first, last = los[0], his[-1]
        bi, pi = self._pos_first_hi_ge(first)  # the left neighbour, if it ends at first
        bj, pj = self._pos_first_lo_gt(last)  # past the right neighbour, if it starts at last
        new_lo, new_hi = array("Q", los), array("Q", his)
        added = sum(his) - sum(los)
        for a, b in self._between(bi, pi, bj, pj):
            if b == first:
                new_lo[0] = a
            elif a == last:
                new_hi[-1] = b
            else:
                raise ValueError(f"[{first:#x}, {last:#x}) is not within a gap of the set")
        self._splice(bi, pi, bj, pj, new_lo, new_hi)
        self._total += added

    # ---------------------------------------------------------------- queries
    def overlapping(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """The parts of the set inside ``[lo, hi)``, in order."""
        b, p = self._pos_first_hi_gt(lo)
        los, his = self._los, self._his
        while b < len(los):
            blo, bhi = los[b], his[b]
            n = len(blo)
            while p < n:
                a = blo[p]
                if a >= hi:
                    return
                yield max(lo, a), min(hi, bhi[p])
                p += 1
            b, p = b + 1, 0

    def take(self, lo: int, hi: int, budget: int, count: int) -> list[list[int]]:
        """The parts of the set in ``[lo, hi)`` from ``lo`` on, as ``[start, end]`` lists,
        until ``budget`` bytes or ``count`` parts (the last cut to the budget); the set
        is not changed."""
        b, p = self._pos_first_hi_gt(lo)
        los, his = self._los, self._his
        out: list[list[int]] = []
        left = budget
        while b < len(los) and left > 0 and len(out) < count:
            blo, bhi = los[b], his[b]
            end = min(len(blo), p + count - len(out))
            for a, z in zip(blo[p:end], bhi[p:end]):
                if a >= hi:
                    return out
                if a < lo:
                    a = lo
                if z > hi:
                    z = hi
                if z - a >= left:
                    out.append([a, a + left])
                    return out
                out.append([a, z])
                left -= z - a
            b, p = b + 1, 0
        return out

    def take_arrays(self, lo: int, hi: int, budget: int, count: int) -> tuple[array[int], array[int]]:
        """:meth:`take` as two arrays (starts, ends), copied a block slice at a time:
        no Python work per part but the cut to ``budget``."""
        b, p = self._pos_first_hi_gt(lo)
        los, his = self._los, self._his
        out_lo, out_hi = array("Q"), array("Q")
        while b < len(los) and len(out_lo) < count:
            blo, bhi = los[b], his[b]
            end = min(len(blo), p + count - len(out_lo))
            stop = bisect_left(blo, hi, p, end)
            out_lo.extend(blo[p:stop])
            out_hi.extend(bhi[p:stop])
            if stop < end:
                break
            b, p = b + 1, 0
        if not out_lo:
            return out_lo, out_hi
        if out_lo[0] < lo:
            out_lo[0] = lo
        if out_hi[-1] > hi:
            out_hi[-1] = hi
        if sum(out_hi) - sum(out_lo) > budget:  # cut after budget bytes
            left = budget
            for k in range(len(out_lo)):
                n = out_hi[k] - out_lo[k]
                if n >= left:
                    out_hi[k] = out_lo[k] + left
                    del out_lo[k + 1 :], out_hi[k + 1 :]
                    break
                left -= n
        return out_lo, out_hi

    def overlap_bytes(self, lo: int, hi: int) -> int:
        """How many bytes of ``[lo, hi)`` are in the set (the intervals inside summed a
        block slice at a time, in C; only the two at the edges are clipped)."""
        if not self._count or lo >= hi:
            return 0
        b, p = self._pos_first_hi_gt(lo)
        los, his = self._los, self._his
        nblocks = len(los)
        total = 0
        first = True
        while b < nblocks:
            blo, bhi = los[b], his[b]
            stop = bisect_left(blo, hi, p)  # the first interval here starting at or past hi
            if stop > p:
                total += sum(bhi[p:stop]) - sum(blo[p:stop])
                if first and blo[p] < lo:
                    total -= lo - blo[p]
                first = False
                if bhi[stop - 1] > hi:
                    total -= bhi[stop - 1] - hi
            if stop < len(blo):
                break
            b, p = b + 1, 0
        return total

    def contains(self, offset: int) -> bool:
        return self.interval_at(offset) is not None

    def interval_at(self, offset: int) -> tuple[int, int] | None:
        """The interval holding ``offset``, if any."""
        b = bisect_right(self._firsts, offset) - 1
        if b < 0:
            return None
        blo = self._los[b]
        p = bisect_right(blo, offset) - 1
        if p >= 0:
            end = self._his[b][p]
            if offset < end:
                return blo[p], end
        return None

    def first_at_or_after(self, offset: int) -> tuple[int, int] | None:
        """The first part of the set at or after ``offset``, clipped to start there."""
        b, p = self._pos_first_hi_gt(offset)
        if b < len(self._los):
            return max(offset, self._los[b][p]), self._his[b][p]
        return None

    def first(self) -> int | None:
        """Lowest offset in the set."""
        return self._firsts[0] if self._firsts else None


def gaps(covered: Iterable[tuple[int, int]], lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The parts of ``[lo, hi)`` outside ``covered``, in order: ``covered`` is any
    ranges sorted by their start (they may overlap or reach outside ``[lo, hi)``),
    e.g. a :meth:`RangeSet.overlapping`."""
    at = lo
    for clo, chi in covered:
        if clo >= hi:
            break
        if clo > at:
            yield at, clo
        at = max(at, chi)
    if at < hi:
        yield at, hi
