"""The range table: where each data range of guest memory lives in the pages file.

Held in three columns of *page numbers* (``mem_pages``, ``len_pages``,
``file_pages``): ``array('I')``, 4 bytes a value, wherever every page number fits 32
bits (memory and pages file up to 16 TiB with 4 KiB pages), ``array('Q')`` beyond.
So the table costs 12 bytes per range whatever the image size (never an object per
page, nor per range); a raw image's file column *is* its memory column (file offset
== memory offset), so it costs 8.  Ranges are sorted by memory offset, page-aligned
(so whole pages: the column holds ``offset >> shift``), non-overlapping in memory and
in the pages file.  Memory outside every range is a hole: zero, never read, never
waited on.

The columns are page numbers, not bytes: a byte offset is ``column[i] << shift``
(:meth:`Layout.mem_at`, :meth:`Layout.end_at`, :meth:`Layout.file_at` say so
in one call; hot loops take the columns and ``shift`` as locals).  Byte columns
come in (:meth:`Layout.from_arrays`, an index's ``array('Q')`` columns) and go out
(:meth:`Layout.byte_column`: tools and tests, never the daemon's paths) converted.
Checked with NumPy over the columns, so a table of millions of ranges is checked
in milliseconds, with no Python object per range.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


#: ranges :meth:`Layout.validate` checks (and byte columns are converted) at a time
#: (its temporaries: a few bytes each; a block's flags stay below glibc's mmap threshold
#: of 128 KiB, each a fresh mapping and its page faults where they are not)
_CHECK_BLOCK = 1 << 16
#: a page number below this fits an ``array('I')`` column
NARROW_LIMIT = 1 << 32
_U64_MAX = (1 << 64) - 1

assert array("I").itemsize == 4 and array("Q").itemsize == 8


class DataRange(NamedTuple):
    mem_offset: int
    length: int
    file_offset: int


class LayoutError(ValueError):
    """The ranges break an invariant; the message says which and where."""


def page_shift(page_size: int) -> int:
    """log2 of ``page_size``; :class:`LayoutError` if it is not a power of two."""
    if page_size <= 0 or page_size & (page_size - 1):
        raise LayoutError(f"page size {page_size} is not a power of two")
    return page_size.bit_length() - 1


def column_typecode(largest: int) -> str:
    """``'I'`` for a column whose values are all at most ``largest`` when that fits 32 bits."""
    return "I" if largest < NARROW_LIMIT else "Q"


def _np(column: array[int]) -> npt.NDArray[np.unsignedinteger]:
    """A NumPy view of an ``array('I')`` or ``array('Q')`` column (no copy)."""
    import numpy

    dtype = numpy.uint32 if column.typecode == "I" else numpy.uint64
    return numpy.frombuffer(column, dtype=dtype) if len(column) else numpy.zeros(0, dtype=dtype)


def _u64(values: npt.NDArray[np.unsignedinteger]) -> npt.NDArray[np.uint64]:
    """``values`` as uint64 (a copy only where they are narrower): sums of page numbers
    are taken in 64 bits, never in a column's 32."""
    import numpy

    return values if values.dtype == numpy.uint64 else values.astype(numpy.uint64)


class _Blocks:
    """Reused uint64 buffers of a block each: a column's block widened into one (page
    numbers are summed in 64 bits) costs no allocation, where a fresh one would be a
    mapping of its own and its page faults, each block (the daemon's large allocations
    are: ``unmap_large_allocations``; 0.2 s of a 4M-range READY went to them)."""

    __slots__ = ("_bufs",)

    def __init__(self, count: int) -> None:
        import numpy

        self._bufs = [numpy.empty(_CHECK_BLOCK, dtype=numpy.uint64) for _ in range(count)]

    def widen(self, k: int, block: npt.NDArray[np.unsignedinteger]) -> npt.NDArray[np.uint64]:
        """``block`` (at most a block long) copied into buffer ``k``, as uint64."""
        import numpy

        out = self._bufs[k][: len(block)]
        numpy.copyto(out, block)
        return out

    def buffer(self, k: int, n: int) -> npt.NDArray[np.uint64]:
        return self._bufs[k][:n]


class PageColumnBuilder:
    """Builds a page-number column from byte offsets given a block at a time: each
    block checked page-aligned (``misaligned`` says where the first bad one is) and
    shifted down; narrow (``'I'``) until a value needs 64 bits."""

    __slots__ = ("shift", "column", "count")

    def __init__(self, shift: int) -> None:
        self.shift = shift
        self.column: array[int] = array("I")
        self.count = 0

    def add(self, block: npt.NDArray[np.uint64]) -> int:
        """Append the byte offsets ``block``; returns -1, or the index (in the block) of
        the first value that is not page-aligned (nothing appended then)."""
        import numpy

        if not len(block):
            return -1
        mask = numpy.uint64((1 << self.shift) - 1)
        if self.shift:
            odd = (block & mask) != 0
            if odd.any():
                return int(numpy.argmax(odd))
        pages = block >> numpy.uint64(self.shift)
        if self.column.typecode == "I" and int(pages.max()) >= NARROW_LIMIT:
            self.column = array("Q", self.column)
        dtype = numpy.uint32 if self.column.typecode == "I" else numpy.uint64
        self.column.frombytes(pages.astype(dtype, copy=False).tobytes())
        self.count += len(block)
        return -1


class Layout:
    """The range table (see the module's docstring): page-number columns ``mem_pages``,
    ``len_pages`` and ``file_pages`` (``file_pages is mem_pages`` for a raw image),
    ``shift`` = log2 of ``page_size``."""

    __slots__ = ("memory_size", "page_size", "shift", "mem_pages", "len_pages", "file_pages", "data_bytes",
                 "_prefix")

    def __init__(self, memory_size: int, page_size: int, ranges: Iterable[tuple[int, int, int]]) -> None:
        """A layout from (memory offset, length, file offset) triples in bytes (small
        tables, tools and tests); :class:`LayoutError` if one is not page-aligned."""
        mem, length, file = array("Q"), array("Q"), array("Q")
        for mem_offset, length_, file_offset in ranges:
            if not (0 <= mem_offset <= _U64_MAX and 0 <= length_ <= _U64_MAX and 0 <= file_offset <= _U64_MAX):
                raise LayoutError(f"range {len(mem)} (memory {mem_offset:#x}+{length_:#x} at file "
                                  f"{file_offset:#x}) is not in 0..2**64")
            mem.append(mem_offset)
            length.append(length_)
            file.append(file_offset)
        self._set(*_converted(memory_size, page_size, mem, length, file))

    def _set(self, memory_size: int, page_size: int, mem_pages: array[int], len_pages: array[int],
             file_pages: array[int] | None) -> None:
        self.memory_size = memory_size
        self.page_size = page_size
        self.shift = page_shift(page_size)
        self.mem_pages = mem_pages
        self.len_pages = len_pages
        self.file_pages = mem_pages if file_pages is None else file_pages
        self.data_bytes = (int(_u64(_np(len_pages)).sum()) << self.shift) if len(len_pages) else 0
        self._prefix: array[int] | None = None

    @classmethod
    def from_arrays(cls, memory_size: int, page_size: int, mem: Sequence[int], length: Sequence[int],
                    file: Sequence[int] | None = None) -> Layout:
        """A layout over byte-offset columns (``array('Q')``: a scan's, an old index's),
        converted to page numbers a block at a time (no Python object per range);
        :class:`LayoutError` if a value is not page-aligned or a range wraps past 2**64.
        ``file=None``: a raw image, whose file offsets are its memory offsets."""
        self = cls.__new__(cls)
        self._set(*_converted(memory_size, page_size, mem, length, file))
        return self

    @classmethod
    def from_pages(cls, memory_size: int, page_size: int, mem_pages: array[int], len_pages: array[int],
                   file_pages: array[int] | None = None) -> Layout:
        """A layout over page-number columns (``array('I')`` or ``array('Q')``), taken as
        they are (no copy).  ``file_pages=None``: a raw image."""
        self = cls.__new__(cls)
        self._set(memory_size, page_size, mem_pages, len_pages, file_pages)
        return self

    @property
    def identity_mapped(self) -> bool:
        """Whether every file offset is its memory offset (a raw image)."""
        return self.file_pages is self.mem_pages

    def prefix(self) -> array[int]:
        """``prefix()[i] << shift``: data bytes in the ranges before range ``i`` (one
        entry per range): data coordinates, in which holes take no room; the end is
        :attr:`data_bytes`.  A pages file written in memory order from offset 0
        (``checkpoint create``) *is* this column, so it is shared, not copied."""
        if self._prefix is None:
            if not len(self.mem_pages):
                self._prefix = array("I")
            elif not self.identity_mapped and self._file_is_prefix():
                self._prefix = self.file_pages  # packed in memory order: the same numbers
            else:
                import numpy

                code = column_typecode(self.data_bytes >> self.shift)
                dtype = numpy.uint32 if code == "I" else numpy.uint64
                self._prefix = array(code)
                for _, sums in self._prefix_blocks():
                    self._prefix.frombytes(sums.astype(dtype).tobytes())
        return self._prefix

    def _prefix_blocks(self) -> Iterator[tuple[int, npt.NDArray[np.uint64]]]:
        """The prefix column a block at a time: (where the block starts, its sums), the
        sums in a buffer reused for the next block (no column of them is ever made)."""
        import numpy

        lengths = _np(self.len_pages)
        blocks = _Blocks(2)
        running = numpy.uint64(0)
        for b in range(0, len(lengths), _CHECK_BLOCK):
            block = blocks.widen(0, lengths[b : b + _CHECK_BLOCK])
            sums = blocks.buffer(1, len(block))
            numpy.cumsum(block, out=sums)
            sums -= block  # (the sums before each range)
            sums += running
            running = sums[-1] + block[-1]
            yield b, sums

    def _file_is_prefix(self) -> bool:
        """Whether the file column is :meth:`prefix` (a pages file packed in memory order)."""
        import numpy

        file = _np(self.file_pages)
        return all(numpy.array_equal(sums, file[b : b + len(sums)]) for b, sums in self._prefix_blocks())

    def __len__(self) -> int:
        return len(self.mem_pages)

    def __iter__(self) -> Iterator[DataRange]:
        s = self.shift
        for m, n, f in zip(self.mem_pages, self.len_pages, self.file_pages):
            yield DataRange(m << s, n << s, f << s)

    def __getitem__(self, i: int) -> DataRange:
        s = self.shift
        return DataRange(self.mem_pages[i] << s, self.len_pages[i] << s, self.file_pages[i] << s)

    def mem_at(self, i: int) -> int:
        """Range ``i``'s memory offset in bytes."""
        return self.mem_pages[i] << self.shift

    def end_at(self, i: int) -> int:
        """Where range ``i`` ends in memory, in bytes."""
        return (self.mem_pages[i] + self.len_pages[i]) << self.shift

    def length_at(self, i: int) -> int:
        """Range ``i``'s length in bytes."""
        return self.len_pages[i] << self.shift

    def file_at(self, i: int) -> int:
        """Range ``i``'s pages-file offset in bytes."""
        return self.file_pages[i] << self.shift

    def byte_column(self, name: str) -> array[int]:
        """Column ``name`` (``"mem"``, ``"length"`` or ``"file"``) in bytes, as a new
        ``array('Q')``: 8 bytes per range more, for tools and tests (the daemon's paths
        use the page columns)."""
        out = array("Q")
        for block in self.byte_blocks(name):
            out.frombytes(block.tobytes())
        return out

    def byte_blocks(self, name: str) -> Iterator[npt.NDArray[np.uint64]]:
        """Column ``name`` (``"mem"``, ``"length"`` or ``"file"``) in bytes, as NumPy
        uint64 blocks of a few MiB at most, in order."""
        import numpy

        flat = _np({"mem": self.mem_pages, "length": self.len_pages, "file": self.file_pages}[name])
        shift = numpy.uint64(self.shift)
        for b in range(0, len(flat), _CHECK_BLOCK):
            yield _u64(flat[b : b + _CHECK_BLOCK]) << shift

    def validate(self, pages_file_size: int | None = None) -> None:
        """Raise :class:`LayoutError` naming the first broken invariant (checked over
        the columns at once; the loop runs only to name the range at fault).  Page
        alignment holds by construction (the columns are page numbers)."""
        ps, shift = self.page_size, self.shift
        if self.memory_size % ps:
            raise LayoutError(f"memory size {self.memory_size} is not a multiple of the page size {ps}")
        n = len(self.mem_pages)
        if not (len(self.len_pages) == len(self.file_pages) == n):
            raise LayoutError("the range table's columns differ in length")
        if n == 0:
            return
        import numpy

        mem_all, length_all, file_all = _np(self.mem_pages), _np(self.len_pages), _np(self.file_pages)
        memory_pages = self.memory_size >> shift
        prev_end = 0
        # a block of the columns at a time: the temporaries stay a few MiB at millions of ranges
        limit = numpy.uint64(_U64_MAX >> shift)  # the last page number a byte offset has
        # (two 32-bit page numbers add up to less than 2**33: no end past 2**64 bytes then)
        narrow = all(c.dtype == numpy.uint32 for c in (mem_all, length_all, file_all)) and shift <= 31
        blocks = _Blocks(4)
        for b in range(0, n, _CHECK_BLOCK):
            mem, length, file = (blocks.widen(k, c[b : b + _CHECK_BLOCK])
                                 for k, c in enumerate((mem_all, length_all, file_all)))
            empty = length == 0
            # its end in bytes would be 2**64 or more
            wrap = empty if narrow else (length > limit - mem) | (length > limit - file)
            if empty.any() or wrap.any():
                i = int(numpy.argmax(empty | wrap))
                m, ln, f = int(mem[i]) << shift, int(length[i]) << shift, int(file[i]) << shift
                if not ln:
                    raise LayoutError(f"range {i + b} at memory {m:#x} is empty")
                raise LayoutError(f"range {i + b} (memory {m:#x}+{ln:#x} at file {f:#x}) runs past 2**64")
            ends = numpy.add(mem, length, out=blocks.buffer(3, len(mem)))  # (no wrap: checked)
            if int(mem[0]) < prev_end:
                raise LayoutError(f"range {b} at memory {int(mem[0]) << shift:#x} overlaps or precedes the one "
                                  "before it")
            order_bad = mem[1:] < ends[:-1]
            if order_bad.any():
                i = int(numpy.argmax(order_bad)) + 1
                raise LayoutError(f"range {i + b} at memory {int(mem[i]) << shift:#x} overlaps or precedes the "
                                  "one before it")
            prev_end = int(ends[-1])
            del mem, length, file, ends, order_bad, empty, wrap
        if prev_end > memory_pages:
            for b in range(0, n, _CHECK_BLOCK):
                mem, length = (blocks.widen(k, c[b : b + _CHECK_BLOCK]) for k, c in enumerate((mem_all, length_all)))
                past = mem + length > numpy.uint64(memory_pages)
                if past.any():
                    i = int(numpy.argmax(past))
                    raise LayoutError(
                        f"range {i + b} (memory {int(mem[i]) << shift:#x}+{int(length[i]) << shift:#x}) runs past "
                        f"the memory size {self.memory_size:#x}"
                    )
        if self.identity_mapped:
            file_end = prev_end
        else:
            if n > 1 and not self.file_ascends():
                by_file = numpy.argsort(file_all, kind="stable")
                f_sorted, l_sorted = file_all[by_file], length_all[by_file]
            else:
                f_sorted, l_sorted = file_all, length_all
            file_end = last_end = 0
            for b in range(0, n, _CHECK_BLOCK):
                fs = blocks.widen(0, f_sorted[b : b + _CHECK_BLOCK])
                fl = blocks.widen(1, l_sorted[b : b + _CHECK_BLOCK])
                f_ends = numpy.add(fs, fl, out=blocks.buffer(2, len(fs)))
                if b and int(fs[0]) < last_end:
                    raise LayoutError(f"pages-file spans at {int(f_sorted[b - 1]) << shift:#x} and "
                                      f"{int(fs[0]) << shift:#x} overlap")
                clash = fs[1:] < f_ends[:-1]
                if clash.any():
                    k = int(numpy.argmax(clash))
                    raise LayoutError(f"pages-file spans at {int(fs[k]) << shift:#x} and "
                                      f"{int(fs[k + 1]) << shift:#x} overlap")
                file_end = max(file_end, int(f_ends.max()))
                last_end = int(f_ends[-1])
        if pages_file_size is not None and file_end << shift > pages_file_size:
            raise LayoutError(f"the pages file holds {pages_file_size} bytes but the index needs "
                              f"{file_end << shift}")

    def file_ascends(self) -> bool:
        """Whether pages-file offsets ascend with memory (not so when laid out working set first)."""
        n = len(self.file_pages)
        if self.identity_mapped or n < 2:
            return True
        file = _np(self.file_pages)
        for b in range(0, n - 1, _CHECK_BLOCK):  # (a block at a time: its flags stay small)
            part = file[b : b + _CHECK_BLOCK + 1]
            if (part[1:] < part[:-1]).any():
                return False
        return True

    def find(self, mem_offset: int) -> int:
        """Index of the range holding ``mem_offset``, or -1 if it is in a hole."""
        page = mem_offset >> self.shift
        i = bisect_right(self.mem_pages, page) - 1
        if i >= 0 and page < self.mem_pages[i] + self.len_pages[i]:
            return i
        return -1

    def first_at_or_after(self, mem_offset: int) -> int:
        """Index of the first range ending after ``mem_offset`` (len(self) if none)."""
        page = mem_offset >> self.shift
        i = bisect_right(self.mem_pages, page) - 1
        if i >= 0 and page < self.mem_pages[i] + self.len_pages[i]:
            return i
        return i + 1

    def data_in(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """The data (non-hole) parts of memory span [lo, hi), as (start, end) pairs."""
        i = self.first_at_or_after(lo)
        mem, length, s = self.mem_pages, self.len_pages, self.shift
        n = len(mem)
        while i < n and mem[i] << s < hi:
            yield max(lo, mem[i] << s), min(hi, (mem[i] + length[i]) << s)
            i += 1

    def file_offset(self, mem_offset: int) -> int:
        """Pages-file offset of a byte of data; KeyError if it is in a hole."""
        i = self.find(mem_offset)
        if i < 0:
            raise KeyError(mem_offset)
        return (self.file_pages[i] << self.shift) + mem_offset - (self.mem_pages[i] << self.shift)

    def table_bytes(self) -> int:
        """Memory the range table itself takes (a shared column counted once)."""
        columns = {id(a): a for a in (self.mem_pages, self.len_pages, self.file_pages, self._prefix)
                   if a is not None}
        return sum(a.buffer_info()[1] * a.itemsize for a in columns.values())


def _converted(memory_size: int, page_size: int, mem: Sequence[int], length: Sequence[int],
               file: Sequence[int] | None) -> tuple[int, int, array[int], array[int], array[int] | None]:
    """Byte columns as page columns (:meth:`Layout.from_arrays`), checked on the way:
    page-aligned, and no range wrapping past 2**64 (in bytes)."""
    import numpy

    shift = page_shift(page_size)
    cols = [c if isinstance(c, array) and c.typecode == "Q" else array("Q", c) for c in (mem, length)]
    files = None if file is None else (file if isinstance(file, array) and file.typecode == "Q" else array("Q", file))
    if not (len(cols[0]) == len(cols[1]) and (files is None or len(files) == len(cols[0]))):
        raise LayoutError("the range table's columns differ in length")
    m_all, l_all = _np(cols[0]), _np(cols[1])
    f_all = m_all if files is None else _np(files)
    limit = numpy.uint64(_U64_MAX)
    builders = [PageColumnBuilder(shift) for _ in range(2 if files is None else 3)]
    for b in range(0, len(m_all), _CHECK_BLOCK):
        m, ln, f = (c[b : b + _CHECK_BLOCK] for c in (m_all, l_all, f_all))
        odd = ((m | ln | f) & numpy.uint64(page_size - 1)) != 0
        wrap = (ln > limit - m) | (ln > limit - f)
        if odd.any() or wrap.any():
            i = int(numpy.argmax(odd | wrap))
            mi, li, fi = int(m[i]), int(ln[i]), int(f[i])
            if (mi | li | fi) % page_size:
                raise LayoutError(f"range {b + i} (memory {mi:#x}+{li:#x} at file {fi:#x}) is not page-aligned")
            raise LayoutError(f"range {b + i} (memory {mi:#x}+{li:#x} at file {fi:#x}) runs past 2**64")
        for builder, block in zip(builders, (m, ln, f)):
            builder.add(block)
    mem_pages, len_pages = builders[0].column, builders[1].column
    return memory_size, page_size, mem_pages, len_pages, None if files is None else builders[2].column
