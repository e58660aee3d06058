"""The range table: where each data range of guest memory lives in the pages file.

Held in three ``array('Q')`` columns, so its cost is 24 bytes per range whatever
the image size (never an object per page).  Ranges are sorted by memory offset,
page-aligned, non-overlapping in memory and in the pages file.  Memory outside
every range is a hole: zero, never read, never waited on.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from typing import NamedTuple


class DataRange(NamedTuple):
    mem_offset: int
    length: int
    file_offset: int


class LayoutError(ValueError):
    """The ranges break an invariant; the message says which and where."""


class Layout:
    __slots__ = ("memory_size", "page_size", "mem", "length", "file", "data_bytes")

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

    def __len__(self) -> int:
        return len(self.mem)

    def __iter__(self) -> Iterator[DataRange]:
        for i in range(len(self.mem)):
            yield DataRange(self.mem[i], self.length[i], self.file[i])

    def __getitem__(self, i: int) -> DataRange:
        return DataRange(self.mem[i], self.length[i], self.file[i])

    def validate(self, pages_file_size: int | None = None) -> None:
        """Raise :class:`LayoutError` naming the first broken invariant."""
        ps = self.page_size
        if ps <= 0 or ps & (ps - 1):
            raise LayoutError(f"page size {ps} is not a power of two")
        if self.memory_size % ps:
            raise LayoutError(f"memory size {self.memory_size} is not a multiple of the page size {ps}")
        prev_end = 0
        for i, (mem, length, file) in enumerate(self):
            if mem % ps or length % ps or file % ps:
                raise LayoutError(f"range {i} (memory {mem:#x}+{length:#x} at file {file:#x}) is not page-aligned")
            if length == 0:
                raise LayoutError(f"range {i} at memory {mem:#x} is empty")
            if mem < prev_end:
                raise LayoutError(f"range {i} at memory {mem:#x} overlaps or precedes the one before it")
            if mem + length > self.memory_size:
                raise LayoutError(
                    f"range {i} (memory {mem:#x}+{length:#x}) runs past the memory size {self.memory_size:#x}"
                )
            prev_end = mem + length
        spans = sorted(zip(self.file, self.length))
        for (a, alen), (b, _) in zip(spans, spans[1:]):
            if a + alen > b:
                raise LayoutError(f"pages-file spans at {a:#x} and {b:#x} overlap")
        if pages_file_size is not None and spans:
            end = max(f + n for f, n in spans)
            if end > pages_file_size:
                raise LayoutError(
                    f"the pages file holds {pages_file_size} bytes but the index needs {end}"
                )

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
        """Memory the range table itself takes."""
        return sum(a.buffer_info()[1] * a.itemsize for a in (self.mem, self.length, self.file))
