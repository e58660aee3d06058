"""Where the data is, found a batch at a time: the loader's :class:`ExtentSource`.

The loader does not hold a set of every unloaded range from the start: it holds a
*window* of them, ahead of its sweep, and asks a source for more as the sweep
goes (:meth:`ExtentSource.next_batch`), and for one place out of order when a
client waits beyond the window (:meth:`ExtentSource.probe`).  So the loader is
ready at once, and its range sets cost what the window holds, whatever the image's
range count.  Two sources:

* :class:`LayoutExtents`: a known range table (a pages checkpoint's index, a
  scanned raw image), sliced as NumPy columns: no Python work per range.
* :class:`~loader.checkpoint._raw.ExtentScanner`: a raw image whose holes have not
  been looked for yet (``FS_IOC_FIEMAP`` or ``SEEK_DATA``); its batches block on
  the file system, so the loader runs them in a worker thread.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from typing import Protocol

from ._layout import Layout, _np

__all__ = ["ExtentSource", "LayoutExtents"]


class ExtentSource(Protocol):
    offset: int  #: memory before this offset has been given out in batches
    #: whether :meth:`next_batch` blocks on I/O (then it runs in a worker thread)
    blocking: bool
    #: whether the layout's ``data_bytes`` is the data's size (False: holes not known yet)
    exact_total: bool

    @property
    def done(self) -> bool: ...

    def next_batch(self, max_extents: int) -> tuple[array[int], array[int]]:
        """The next data extents (about ``max_extents`` at most), sorted, apart, as
        ``(starts, ends)``; they start at or after the old :attr:`offset` (the first may
        reach back before it) and end by the new one."""
        ...

    def probe(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The data in ``[lo, hi)``, in order, merged."""
        ...


class LayoutExtents:
    """The ranges of a known :class:`Layout`, in memory order, touching ones merged."""

    __slots__ = ("layout", "index", "offset")

    blocking = False
    exact_total = True

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.index = 0  #: ranges before this one are given out
        self.offset = 0 if len(layout) else layout.memory_size

    @property
    def done(self) -> bool:
        return self.index >= len(self.layout)

    def next_batch(self, max_extents: int) -> tuple[array[int], array[int]]:
        layout = self.layout
        k, n = self.index, len(layout)
        if k >= n:
            return array("Q"), array("Q")
        m = min(n, k + max_extents)
        if m - k == 1:
            starts, ends = array("Q", [layout.mem_at(k)]), array("Q", [layout.end_at(k)])
        else:
            import numpy

            s = _np(layout.mem_pages)[k:m].astype(numpy.uint64)  # (a copy: shifted in place below)
            e = s + _np(layout.len_pages)[k:m]
            shift = numpy.uint64(layout.shift)
            s <<= shift
            e <<= shift
            keep_start = numpy.ones(m - k, dtype=bool)
            keep_start[1:] = s[1:] != e[:-1]  # a range touching the one before it joins it
            keep_end = numpy.ones(m - k, dtype=bool)
            keep_end[:-1] = keep_start[1:]
            starts, ends = array("Q"), array("Q")
            starts.frombytes(s[keep_start].tobytes())
            ends.frombytes(e[keep_end].tobytes())
        self.index = m
        self.offset = ends[-1] if m < n else layout.memory_size
        return starts, ends

    def widened(self, lo: int, hi: int) -> tuple[int, int]:
        """[lo, hi) grown over the holes on either side of it (where it ends in a hole or
        at a range's end): to the end of the data before it, the start of the data after
        it; never into data."""
        layout = self.layout
        mem, shift = layout.mem_pages, layout.shift
        if lo > 0 and layout.find(lo - 1) < 0:
            i = bisect_right(mem, (lo - 1) >> shift) - 1
            lo = layout.end_at(i) if i >= 0 else 0
        if hi < layout.memory_size and layout.find(hi) < 0:
            j = bisect_left(mem, -(-hi >> shift))
            hi = layout.mem_at(j) if j < len(mem) else layout.memory_size
        return lo, hi

    def probe(self, lo: int, hi: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for a, b in self.layout.data_in(lo, hi):
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        return out
