"""The range table: where each data range of guest memory lives in the pages file.

Held in three ``array('Q')`` columns, so its cost is 24 bytes per range whatever
the image size (never an object per page); a raw image's file column *is* its
memory column (file offset == memory offset), so it costs 16.  Ranges are sorted
by memory offset, page-aligned, non-overlapping in memory and in the pages file.
Memory outside every range is a hole: zero, never read, never waited on.

Built from arrays (:meth:`Layout.from_arrays`) and validated with NumPy over the
columns, so a table of millions of ranges is checked in milliseconds, with no
Python object per range.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


#: ranges :meth:`Layout.validate` checks at a time (its temporaries: a few bytes each)
_CHECK_BLOCK = 1 << 18


class DataRange(NamedTuple):
    mem_offset: int
    length: int
    file_offset: int


class LayoutError(ValueError):
    """The ranges break an invariant; the message says which and where."""


class Layout:
    __slots__ = ("memory_size", "page_size", "mem", "length", "file", "data_bytes", "_prefix")

    def __init__(self, memory_size: int, page_size: int, ranges: Iterable[tuple[int, int, int]]) -> None:
        self.memory_size = memory_size
        self.page_size = page_size
        self.mem = array("Q")
        self.length = array("Q")
        self.file = array("Q")
        for mem_offset, length, file_offset in ranges:
            self.mem.append(mem_offset)
            self.length.append(length)
            self.file.append(file_offset)
        self.data_bytes = sum(self.length)
        self._prefix: array[int] | None = None

    @classmethod
    def from_arrays(cls, memory_size: int, page_size: int, mem: array[int], length: array[int],
                    file: array[int] | None = None) -> Layout:
        """A layout over the given columns, taken as they are (no copy, no Python object
        per range).  ``file=None``: a raw image, whose file offsets are its memory
        offsets (the one array serves as both columns)."""
        self = cls.__new__(cls)
        self.memory_size = memory_size
        self.page_size = page_size
        self.mem = mem
        self.length = length
        self.file = mem if file is None else file
        self.data_bytes = int(_np(length).sum()) if len(length) else 0
        self._prefix = None
        return self

    @property
    def identity_mapped(self) -> bool:
        """Whether every file offset is its memory offset (a raw image)."""
        return self.file is self.mem

    def prefix(self) -> array[int]:
        """``prefix()[i]``: data bytes in the ranges before range ``i`` (one entry per
        range): data coordinates, in which holes take no room; the end is
        :attr:`data_bytes`.  A pages file written in memory order from offset 0
        (``checkpoint create``) *is* this column, so it is shared, not copied."""
        if self._prefix is None:
            n = len(self.mem)
            if n == 0:
                self._prefix = array("Q")
            else:
                import numpy

                sums = numpy.zeros(n, dtype=numpy.uint64)
                numpy.cumsum(_np(self.length)[:-1], out=sums[1:])
                if not self.identity_mapped and numpy.array_equal(sums, _np(self.file)):
                    self._prefix = self.file  # packed in memory order: the same numbers
                else:
                    self._prefix = array("Q", sums.tobytes())
        return self._prefix

    def __len__(self) -> int:
        return len(self.mem)

    def __iter__(self) -> Iterator[DataRange]:
        for i in range(len(self.mem)):
            yield DataRange(self.mem[i], self.length[i], self.file[i])

    def __getitem__(self, i: int) -> DataRange:
        return DataRange(self.mem[i], self.length[i], self.file[i])

    def validate(self, pages_file_size: int | None = None) -> None:
        """Raise :class:`LayoutError` naming the first broken invariant (checked over
        the columns at once; the loop runs only to name the range at fault)."""
        ps = self.page_size
        if ps <= 0 or ps & (ps - 1):
            raise LayoutError(f"page size {ps} is not a power of two")
        if self.memory_size % ps:
            raise LayoutError(f"memory size {self.memory_size} is not a multiple of the page size {ps}")
        n = len(self.mem)
        if not (len(self.length) == len(self.file) == n):
            raise LayoutError("the range table's columns differ in length")
        if n == 0:
            return
        import numpy

        mem_all, length_all, file_all = _np(self.mem), _np(self.length), _np(self.file)
        limit = numpy.uint64((1 << 64) - 1)
        prev_end = 0
        # a block of the columns at a time: the temporaries stay a few MiB at millions of ranges
        for b in range(0, n, _CHECK_BLOCK):
            mem, length, file = (c[b : b + _CHECK_BLOCK] for c in (mem_all, length_all, file_all))
            bad = (((mem | length | file) & numpy.uint64(ps - 1)) != 0) | (length == 0)
            bad |= length > limit - mem  # mem + length would wrap
            bad |= length > limit - file
            if bad.any():
                i = int(numpy.argmax(bad))
                m, ln, f = int(mem[i]), int(length[i]), int(file[i])
                i += b
                if ln == 0:
                    raise LayoutError(f"range {i} at memory {m:#x} is empty")
                if (m | ln | f) % ps:
                    raise LayoutError(f"range {i} (memory {m:#x}+{ln:#x} at file {f:#x}) is not page-aligned")
                raise LayoutError(f"range {i} (memory {m:#x}+{ln:#x} at file {f:#x}) runs past 2**64")
            ends = mem + length
            if int(mem[0]) < prev_end:
                raise LayoutError(f"range {b} at memory {int(mem[0]):#x} overlaps or precedes the one before it")
            order_bad = mem[1:] < ends[:-1]
            if order_bad.any():
                i = int(numpy.argmax(order_bad)) + 1
                raise LayoutError(f"range {i + b} at memory {int(mem[i]):#x} overlaps or precedes the one before it")
            prev_end = int(ends[-1])
            del bad, ends, order_bad
        mem, length, file = mem_all, length_all, file_all
        if prev_end > self.memory_size:
            i = int(numpy.argmax(mem + length > numpy.uint64(self.memory_size)))
            raise LayoutError(
                f"range {i} (memory {int(mem[i]):#x}+{int(length[i]):#x}) runs past the memory size "
                f"{self.memory_size:#x}"
            )
        if self.identity_mapped:
            file_end = prev_end
        else:
            if n > 1 and not self.file_ascends():
                by_file = numpy.argsort(file, kind="stable")
                f_sorted, l_sorted = file[by_file], length[by_file]
            else:
                f_sorted, l_sorted = file, length
            file_end = last_end = 0
            for b in range(0, n, _CHECK_BLOCK):
                fs, fl = f_sorted[b : b + _CHECK_BLOCK], l_sorted[b : b + _CHECK_BLOCK]
                f_ends = fs + fl
                if b and int(fs[0]) < last_end:
                    raise LayoutError(f"pages-file spans at {int(f_sorted[b - 1]):#x} and {int(fs[0]):#x} overlap")
                clash = fs[1:] < f_ends[:-1]
                if clash.any():
                    k = int(numpy.argmax(clash))
                    raise LayoutError(f"pages-file spans at {int(fs[k]):#x} and {int(fs[k + 1]):#x} overlap")
                file_end = max(file_end, int(f_ends.max()))
                last_end = int(f_ends[-1])
        if pages_file_size is not None and file_end > pages_file_size:
            raise LayoutError(f"the pages file holds {pages_file_size} bytes but the index needs {file_end}")

    def file_ascends(self) -> bool:
        """Whether pages-file offsets ascend with memory (not so when laid out working set first)."""
        if self.identity_mapped or len(self.file) < 2:
            return True
        file = _np(self.file)
        return not bool((file[1:] < file[:-1]).any())

    def find(self, mem_offset: int) -> int:
        """Index of the range holding ``mem_offset``, or -1 if it is in a hole."""
        i = bisect_right(self.mem, mem_offset) - 1
        if i >= 0 and mem_offset < self.mem[i] + self.length[i]:
            return i
        return -1

    def first_at_or_after(self, mem_offset: int) -> int:
        """Index of the first range ending after ``mem_offset`` (len(self) if none)."""
        i = bisect_right(self.mem, mem_offset) - 1
        if i >= 0 and mem_offset < self.mem[i] + self.length[i]:
            return i
        return i + 1

    def data_in(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """The data (non-hole) parts of memory span [lo, hi), as (start, end) pairs."""
        i = self.first_at_or_after(lo)
        n = len(self.mem)
        while i < n and self.mem[i] < hi:
            yield max(lo, self.mem[i]), min(hi, self.mem[i] + self.length[i])
            i += 1

    def file_offset(self, mem_offset: int) -> int:
        """Pages-file offset of a byte of data; KeyError if it is in a hole."""
        i = self.find(mem_offset)
        if i < 0:
            raise KeyError(mem_offset)
        return self.file[i] + (mem_offset - self.mem[i])

    def table_bytes(self) -> int:
        """Memory the range table itself takes (a shared column counted once)."""
        columns = {id(a): a for a in (self.mem, self.length, self.file, self._prefix) if a is not None}
        return sum(a.buffer_info()[1] * a.itemsize for a in columns.values())


def _np(column: array[int]) -> npt.NDArray[np.uint64]:
    """A NumPy view of an ``array('Q')`` column (no copy)."""
    import numpy

    return numpy.frombuffer(column, dtype=numpy.uint64) if len(column) else numpy.zeros(0, dtype=numpy.uint64)
