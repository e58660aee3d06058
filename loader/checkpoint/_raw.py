"""Scanning raw memory images: where the data is, and which pages are all zero.

Functions over file descriptors and buffers; they raise ``OSError`` and leave
naming the file to the caller (:mod:`loader.checkpoint`).  Nothing here allocates
per page or per extent: extents come from ``FS_IOC_FIEMAP`` (hundreds per call,
into one reused buffer, read as NumPy columns) where the file system has it, else
from ``lseek(SEEK_DATA/SEEK_HOLE)``, and land in ``array('Q')`` columns; zero pages
are found with ``bytearray.find``/``startswith``, which compare in C without copying.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from array import array
from collections.abc import Iterator

__all__ = ["ExtentScanner", "data_extents", "nonzero_runs", "round_down", "round_up"]

#: ``_IOWR('f', 11, struct fiemap)``
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEADER = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT_WORDS = 7  # 56 bytes: logical, physical, length, 2 reserved, flags + 3 reserved (u32)
_FIEMAP_EXTENT_LAST = 0x1
#: extents asked for per FIEMAP call (a 28 KiB buffer, reused)
_FIEMAP_BATCH = 512

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


class ExtentScanner:
    """Finds the data extents of the first ``size`` bytes of ``fd`` in order, a batch at
    a time (:meth:`next_batch`), so a caller can be serving before the whole file has
    been looked at; :meth:`probe` asks about one place out of order.

    Extents are rounded out to page boundaries (a page that is partly data is data),
    clipped to ``size``, and merged when they overlap or touch, within a batch (two
    batches' extents may touch: a caller merging them keeps that in mind).
    ``FS_IOC_FIEMAP`` is used where the file system has it: every extent it reports
    is data, delayed-allocation and unwritten (preallocated) ones included, which
    may read as zeros but never hide data.  Elsewhere (tmpfs, NFS, ...)
    ``SEEK_DATA``/``SEEK_HOLE``; where the file system cannot tell holes from data
    at all, the whole file is one extent.
    """

    __slots__ = ("fd", "size", "page_size", "offset", "method", "_buf", "calls")

    blocking = True  #: its batches ask the file system (the loader runs them in a thread)
    exact_total = False  #: the data's size is known only once the scan is done

    def __init__(self, fd: int, size: int, page_size: int, *, fiemap: bool = True) -> None:
        self.fd = fd
        self.size = size
        self.page_size = page_size
        self.offset = 0  #: everything before this is scanned
        self.method = "fiemap" if fiemap else "seek"
        self._buf = bytearray(_FIEMAP_HEADER.size + 8 * _FIEMAP_EXTENT_WORDS * _FIEMAP_BATCH)
        self.calls = 0  #: ioctl or lseek calls made

    @property
    def done(self) -> bool:
        return self.offset >= self.size

    def next_batch(self, max_extents: int = 1 << 16) -> tuple[array[int], array[int]]:
        """The next extents after :attr:`offset` (about ``max_extents`` at most), as
        ``(starts, ends)`` columns; :attr:`offset` moves past them (to ``size`` at the end)."""
        if self.done:
            return array("Q"), array("Q")
        if self.method == "fiemap":
            try:
                starts, ends = self._fiemap_batch(max_extents)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL) or self.offset:
                    raise
                self.method = "seek"
            else:
                return _round_merge(starts, ends, self.page_size, self.size)
        starts, ends = self._seek_batch(max_extents)
        return _round_merge(starts, ends, self.page_size, self.size)

    def _fiemap_batch(self, max_extents: int) -> tuple[array[int], array[int]]:
        import numpy

        buf, header = self._buf, _FIEMAP_HEADER
        starts, ends = array("Q"), array("Q")
        while len(starts) < max_extents and self.offset < self.size:
            count = min(_FIEMAP_BATCH, max_extents - len(starts))
            header.pack_into(buf, 0, self.offset, self.size - self.offset, 0, 0, count, 0)
            fcntl.ioctl(self.fd, _FS_IOC_FIEMAP, buf, True)
            self.calls += 1
            mapped = header.unpack_from(buf)[3]
            if mapped == 0:
                self.offset = self.size
                break
            words = numpy.frombuffer(buf, dtype=numpy.uint64, offset=header.size,
                                     count=_FIEMAP_EXTENT_WORDS * mapped).reshape(mapped, _FIEMAP_EXTENT_WORDS)
            logical = words[:, 0]
            end = logical + words[:, 2]
            starts.frombytes(logical.tobytes())
            ends.frombytes(end.tobytes())
            self.offset = max(self.offset + 1, int(end[-1]))
            if int(words[-1, 5]) & _FIEMAP_EXTENT_LAST:
                self.offset = self.size
        return starts, ends

    def _seek_batch(self, max_extents: int) -> tuple[array[int], array[int]]:
        starts, ends = array("Q"), array("Q")
        size = self.size
        while len(starts) < max_extents and self.offset < size:
            found = self._seek_extent(self.offset, size)
            if found is None:
                self.offset = size
                break
            data, hole = found
            starts.append(data)
            ends.append(hole)
            self.offset = max(hole, data + 1)
        return starts, ends

    def _seek_extent(self, offset: int, limit: int) -> tuple[int, int] | None:
        """The first data extent at or after ``offset`` that starts before ``limit``."""
        self.calls += 1
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after offset
                return None
            if exc.errno in _SEEK_UNSUPPORTED:
                return (offset, self.size) if offset < limit else None
            raise
        if data >= limit:
            return None
        self.calls += 1
        try:
            hole = os.lseek(self.fd, data, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: truncated under us; take what we know
                raise
            hole = self.size
        return data, hole

    def probe(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The data in ``[lo, hi)`` (page-aligned), asked of the file now with
        ``SEEK_DATA``/``SEEK_HOLE`` (which also see data still in the page cache):
        page-rounded ``(start, end)`` pairs clipped to ``[lo, hi)``, in order."""
        out: list[tuple[int, int]] = []
        ps = self.page_size
        at = lo
        while at < hi:
            found = self._seek_extent(at, hi)
            if found is None:
                break
            a, b = max(lo, round_down(found[0], ps)), min(hi, round_up(found[1], ps))
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
            at = max(found[1], found[0] + 1)
        return out


def _round_merge(starts: array[int], ends: array[int], page_size: int, size: int) -> tuple[array[int], array[int]]:
    """Extents rounded out to pages, clipped to ``size``, merged where they overlap or touch."""
    if not starts:
        return starts, ends
    import numpy

    mask = numpy.uint64(page_size - 1)
    s = numpy.frombuffer(starts, dtype=numpy.uint64) & ~mask
    e = numpy.minimum((numpy.frombuffer(ends, dtype=numpy.uint64) + mask) & ~mask, numpy.uint64(size))
    keep = s < e
    s, e = s[keep], e[keep]
    if not len(s):
        return array("Q"), array("Q")
    reach = numpy.maximum.accumulate(e)
    first = numpy.ones(len(s), dtype=bool)
    first[1:] = s[1:] > reach[:-1]  # a new extent starts past everything before it
    last = numpy.ones(len(s), dtype=bool)
    last[:-1] = first[1:]
    out_s, out_e = array("Q"), array("Q")
    out_s.frombytes(s[first].tobytes())
    out_e.frombytes(reach[last].tobytes())
    return out_s, out_e


def scan_extents(fd: int, size: int, page_size: int) -> tuple[array[int], array[int]]:
    """All the data extents of the first ``size`` bytes of ``fd`` (see
    :class:`ExtentScanner`), merged across batches, as ``(starts, ends)`` columns."""
    scanner = ExtentScanner(fd, size, page_size)
    starts, ends = array("Q"), array("Q")
    while not scanner.done:
        s, e = scanner.next_batch()
        if s and ends and s[0] <= ends[-1]:
            ends[-1] = max(ends[-1], e[0])
            s, e = s[1:], e[1:]
        starts.extend(s)
        ends.extend(e)
    return starts, ends


def data_extents(fd: int, size: int, page_size: int) -> list[tuple[int, int]]:
    """The data extents of the first ``size`` bytes of ``fd``, as ``(start, end)`` pairs:
    :func:`scan_extents` as a list (one tuple per extent: for small files and tests).

    Everything outside them is a hole, which reads as zero.  A file with no data at
    all gives ``[]``.  ``size`` must be a multiple of ``page_size``.  The file may
    not change while it is scanned; if it shrinks, the extents stop where its data stops.
    """
    starts, ends = scan_extents(fd, size, page_size)
    return list(zip(starts, ends))


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
