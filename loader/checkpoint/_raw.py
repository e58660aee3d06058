"""Scanning raw memory images: where the data is, and which pages are all zero.

Pure functions over file descriptors and buffers; they raise ``OSError`` and leave
naming the file to the caller (:mod:`loader.checkpoint`).  Nothing here allocates
per page: extents come from ``lseek(SEEK_DATA/SEEK_HOLE)`` and zero pages are
found with ``bytearray.find``/``startswith``, which compare in C without copying.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

__all__ = ["data_extents", "nonzero_runs", "round_down", "round_up"]

#: errors meaning "this file system cannot tell holes from data" (not "no more data")
_SEEK_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}

_zero_pages: dict[int, bytes] = {}


def round_down(n: int, step: int) -> int:
    return n - n % step


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _zero_page(page_size: int) -> bytes:
    page = _zero_pages.get(page_size)
    if page is None:
        page = _zero_pages[page_size] = bytes(page_size)
    return page


def data_extents(fd: int, size: int, page_size: int) -> list[tuple[int, int]]:
    """The data extents of the first ``size`` bytes of ``fd``, as ``(start, end)`` pairs.

    Extents are found with ``SEEK_DATA``/``SEEK_HOLE``, rounded out to page
    boundaries (a page that is partly data is data), clipped to ``size``, sorted, and
    merged when they touch.  Everything outside them is a hole, which reads as zero.
    Where the file system cannot report holes (``EINVAL``/``EOPNOTSUPP``), the whole
    file is one extent.  A file with no data at all gives ``[]``.  ``size`` must be a
    multiple of ``page_size``.  The file may not change while it is scanned; if it
    shrinks, the extents stop where its data stops.
    """
    extents: list[tuple[int, int]] = []
    off = 0
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after off
                break
            if exc.errno in _SEEK_UNSUPPORTED and off == 0:
                return [(0, size)] if size else []
            raise
        if data >= size:
            break
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: truncated under us; take what we know
                raise
            hole = size
        start = round_down(data, page_size)
        end = min(round_up(hole, page_size), size)
        if extents and start <= extents[-1][1]:
            extents[-1] = (extents[-1][0], max(extents[-1][1], end))
        else:
            extents.append((start, end))
        off = max(hole, data + 1)
    return extents


def nonzero_runs(buf: bytearray, lo: int, hi: int, page_size: int) -> Iterator[tuple[int, int]]:
    """The runs of pages in ``buf[lo:hi]`` that are not all zero, as ``(start, end)``.

    ``lo`` and ``hi - lo`` must be multiples of ``page_size``.  Adjacent non-zero
    pages come out as one run.  Cost: one ``find`` of a zero page over the span
    (which skips a page's length per comparison on random data), plus one
    ``startswith`` per page only where zero bytes make a zero page possible.
    """
    zero = _zero_page(page_size)
    run_start = lo  # start of the current non-zero run
    pos = lo  # pages before pos are known: non-zero, or zero and already cut out
    while pos < hi:
        hit = buf.find(zero, pos, hi)
        if hit < 0:
            break
        page = lo + round_up(hit - lo, page_size)  # first aligned page that could be zero
        if page + page_size > hi:
            break
        if not buf.startswith(zero, page):
            # No aligned zero page starts in [pos, page] (find would have hit it first).
            pos = page + page_size
            continue
        if page > run_start:
            yield run_start, page
        end = page + page_size
        while end < hi and buf.startswith(zero, end):
            end += page_size
        run_start = pos = end
    if run_start < hi:
        yield run_start, hi
