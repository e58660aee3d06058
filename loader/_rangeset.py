"""A set of disjoint half-open byte ranges ``[lo, hi)``.

Two parallel sorted lists of interval bounds, searched with :mod:`bisect`: the cost
is per interval, never per page, so a 64 GiB range costs what a 4 KiB one does.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator


class RangeSet:
    __slots__ = ("_lo", "_hi", "_total")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []
        self._total = 0
        for lo, hi in ranges:
            self.add(lo, hi)

    def __len__(self) -> int:
        """Number of disjoint intervals (not bytes; see :attr:`total`)."""
        return len(self._lo)

    def __bool__(self) -> bool:
        return bool(self._lo)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._lo, self._hi))

    def __repr__(self) -> str:
        shown = ", ".join(f"[{lo:#x}, {hi:#x})" for lo, hi in list(self)[:8])
        more = f", ... {len(self) - 8} more" if len(self) > 8 else ""
        return f"RangeSet({shown}{more})"

    @property
    def total(self) -> int:
        """Bytes in the set."""
        return self._total

    def add(self, lo: int, hi: int) -> None:
        """Add ``[lo, hi)``, merging with overlapping or touching intervals."""
        if lo >= hi:
            return
        los, his = self._lo, self._hi
        i = bisect_left(his, lo)  # first interval ending at or after lo
        j = bisect_right(los, hi)  # first interval starting after hi
        if i < j:
            removed = sum(his[k] - los[k] for k in range(i, j))
            lo = min(lo, los[i])
            hi = max(hi, his[j - 1])
        else:
            removed = 0
        los[i:j] = [lo]
        his[i:j] = [hi]
        self._total += (hi - lo) - removed

    def remove(self, lo: int, hi: int) -> None:
        """Remove ``[lo, hi)``, splitting intervals it cuts."""
        if lo >= hi:
            return
        los, his = self._lo, self._hi
        i = bisect_right(his, lo)  # first interval ending after lo
        j = bisect_left(los, hi)  # first interval starting at or after hi
        if i >= j:
            return
        removed = sum(his[k] - los[k] for k in range(i, j))
        new_lo: list[int] = []
        new_hi: list[int] = []
        if los[i] < lo:
            new_lo.append(los[i])
            new_hi.append(lo)
        if his[j - 1] > hi:
            new_lo.append(hi)
            new_hi.append(his[j - 1])
        kept = sum(b - a for a, b in zip(new_lo, new_hi))
        los[i:j] = new_lo
        his[i:j] = new_hi
        self._total -= removed - kept

    def overlapping(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """The parts of the set inside ``[lo, hi)``, in order."""
        los, his = self._lo, self._hi
        i = bisect_right(his, lo)
        n = len(los)
        while i < n and los[i] < hi:
            yield max(lo, los[i]), min(hi, his[i])
            i += 1

    def overlap_bytes(self, lo: int, hi: int) -> int:
        """How many bytes of ``[lo, hi)`` are in the set."""
        los, his = self._lo, self._hi
        i = bisect_right(his, lo)
        n = len(los)
        total = 0
        while i < n and los[i] < hi:
            total += min(hi, his[i]) - max(lo, los[i])
            i += 1
        return total

    def contains(self, offset: int) -> bool:
        i = bisect_right(self._lo, offset) - 1
        return i >= 0 and offset < self._hi[i]

    def interval_at(self, offset: int) -> tuple[int, int] | None:
        """The interval holding ``offset``, if any."""
        i = bisect_right(self._lo, offset) - 1
        if i >= 0 and offset < self._hi[i]:
            return self._lo[i], self._hi[i]
        return None

    def first_at_or_after(self, offset: int) -> tuple[int, int] | None:
        """The first part of the set at or after ``offset``, clipped to start there."""
        i = bisect_right(self._hi, offset)
        if i < len(self._lo):
            return max(offset, self._lo[i]), self._hi[i]
        return None

    def first(self) -> int | None:
        """Lowest offset in the set."""
        return self._lo[0] if self._lo else None


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
