"""The ``index.msgpack`` file of a pages checkpoint: encoding, and strict decoding.

The index is input from outside, so decoding trusts nothing: msgpack limits are
sized to the file, map keys must be strings, every field is type- and
range-checked, and each problem is reported as one line saying what is wrong.
The caller (:mod:`loader.checkpoint`) adds the file's path and checks the ranges
themselves against the pages file with :meth:`Layout.validate`.
See ``docs/FORMAT.md`` for the format, field by field.
"""

from __future__ import annotations

import os
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .._files import CheckpointError
from ..core._columns import column_bytes, read_column
from ..core._layout import Layout, PageColumnBuilder, page_shift

__all__ = [
    "read_index",
    "CHECKSUM_ALGORITHM",
    "FORMAT",
    "INDEX_NAME",
    "MAX_INDEX_BYTES",
    "PAGES_NAME",
    "VERSION",
    "CheckpointError",
    "IndexFields",
    "decode_index",
    "encode_index",
    "looks_like_index",
]

FORMAT = "pageload-checkpoint"  #: value of the ``"format"`` field, the file's magic
#: the format version this code writes: 2 holds the range table as three binary
#: columns and the checksums as one (decoded straight into ``array('Q')``); version
#: 1's list of triples and list of checksums still read
VERSION = 2
READS = (1, 2)  #: the versions this code reads
INDEX_NAME = "index.msgpack"
PAGES_NAME = "pages.img"
CHECKSUM_ALGORITHM = "xxh3_64"
MAX_INDEX_BYTES = 1 << 30  #: refuse larger index files rather than read them into memory
_U64 = 1 << 64

#: the index's first key, as msgpack writes it; used to recognise an index by content
_MAGIC = msgpack.packb("format") + msgpack.packb(FORMAT)


@dataclass(frozen=True, slots=True, eq=False)
class IndexFields:
    """The checked contents of an index (ranges not yet checked against each other):
    the range table as three columns of page numbers (memory offset, length,
    ``pages.img`` offset, each ``>> log2(page_size)``: :class:`~loader.Layout`'s
    columns).  The file holds them in bytes; they are converted on the way in and out."""

    page_size: int
    memory_size: int
    pages_size: int
    mem_pages: array[int]
    len_pages: array[int]
    file_pages: array[int]
    chunk_size: int
    checksums: array[int]
    source: dict[str, Any] = field(default_factory=dict)

    def layout(self) -> Layout:
        """The range table as a :class:`~loader.Layout` over these columns (no copy; not validated)."""
        return Layout.from_pages(self.memory_size, self.page_size, self.mem_pages, self.len_pages, self.file_pages)

    @property
    def ranges(self) -> list[tuple[int, int, int]]:
        """The range table as triples in bytes (one tuple per range: for small tables and tests)."""
        return [tuple(r) for r in self.layout()]  # type: ignore[misc]


def encode_index(fields: IndexFields) -> bytes:
    """The index file's bytes for ``fields``.

    ``"format"`` is the first key, so :func:`looks_like_index` can recognise the file.
    """
    layout = fields.layout()
    packed: bytes = msgpack.packb(
        {
            "format": FORMAT,
            "version": VERSION,
            "page_size": fields.page_size,
            "memory_size": fields.memory_size,
            "pages_size": fields.pages_size,
            "range_mem": _byte_column(layout, "mem"),
            "range_length": _byte_column(layout, "length"),
            "range_file": _byte_column(layout, "file"),
            "checksum": CHECKSUM_ALGORITHM,
            "chunk_size": fields.chunk_size,
            "checksums": column_bytes(fields.checksums),
            "source": fields.source,
        },
        use_bin_type=True,
    )
    return packed


def looks_like_index(head: bytes) -> bool:
    """Whether a file starting with ``head`` (its first 64 bytes or so) is an index we wrote."""
    return _MAGIC in head[:48]


def decode_index(data: bytes | bytearray) -> IndexFields:
    """Parse and check an index; raises ``ValueError`` with a one-line reason.

    A ``bytearray`` is emptied once parsed, and each binary column is let go once it
    is an array: a million ranges then peak at the parsed columns plus one array,
    not at the file, its columns and their arrays at once."""
    n = len(data)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise ValueError("not an index: trailing bytes after the msgpack map") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        if n == 0:
            raise ValueError("empty index file") from None
        if "incomplete" in str(exc):
            raise ValueError("truncated index: the msgpack data ends early") from None
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else "invalid msgpack data"
        raise ValueError(f"not a msgpack index ({detail})") from None
    if isinstance(data, bytearray):
        del data[:]
    return _fields(obj)


#: the binary columns :func:`read_index` reads from the file straight into their arrays
_COLUMNS = ("range_mem", "range_length", "range_file", "checksums")
#: of those, the range table's (bytes in the file, page numbers in memory)
_RANGE_COLUMNS = ("range_mem", "range_length", "range_file")
#: bytes of a range column read (and converted to page numbers) at a time (its temporaries: about 3x)
_PIECE = 1 << 18


class _Pages:
    """A range column read from the file as page numbers (:func:`_stream`)."""

    __slots__ = ("column", "nbytes")

    def __init__(self, column: array[int], nbytes: int) -> None:
        self.column = column
        self.nbytes = nbytes  #: its size in the file


def _byte_column(layout: Layout, name: str) -> bytes:
    """A layout's column in bytes, as the index holds it (little-endian u64)."""
    return b"".join(block.astype("<u8", copy=False).tobytes() for block in layout.byte_blocks(name))


def read_index(fd: int, size: int) -> IndexFields:
    """:func:`decode_index` of the ``size``-byte index open at ``fd``, reading its range
    columns from the file straight into their arrays: the heap never holds the file,
    its columns' bytes and their arrays at once (a million ranges peaked at 48 MiB for
    those; now the arrays plus one column's read buffer).  An index this streaming read
    does not follow to the end (any irregularity) is read whole and decoded by
    :func:`decode_index`, for the same checks and the same one-line reasons."""
    obj = _stream(fd, size)
    if obj is None:
        data = bytearray(size + 1)
        got = os.preadv(fd, [data], 0)
        del data[got:]
        return decode_index(data)
    return _fields(obj)


def _stream(fd: int, size: int) -> dict[str, Any] | None:
    """The index's top-level map, its binary columns as arrays; None where it is not a
    map of this shape (the caller then decodes it whole).  Each field is parsed where
    it starts, by an unpacker of its own; a column is read past, never through one."""
    limits = dict(raw=False, strict_map_key=True, use_list=True, max_buffer_size=max(size, 1 << 16),
                  max_str_len=size, max_bin_len=size, max_array_len=size, max_map_len=size, max_ext_len=0)
    reader = os.fdopen(os.dup(fd), "rb", buffering=0)

    def value_at(pos: int) -> tuple[Any, int]:
        """The msgpack value at ``pos`` and where the next one starts."""
        os.lseek(reader.fileno(), pos, os.SEEK_SET)
        unpacker = msgpack.Unpacker(reader, read_size=min(1 << 16, max(1, size - pos)), **limits)
        value = unpacker.unpack()
        return value, pos + unpacker.tell()

    try:
        head = os.pread(fd, 5, 0)
        if not head:
            return None
        if 0x80 <= head[0] <= 0x8F:
            count, pos = head[0] & 0x0F, 1
        elif head[0] in (0xDE, 0xDF) and len(head) >= (3 if head[0] == 0xDE else 5):
            size_bytes = 2 if head[0] == 0xDE else 4
            count, pos = int.from_bytes(head[1 : 1 + size_bytes], "big"), 1 + size_bytes
        else:
            return None
        obj: dict[str, Any] = {}
        for _ in range(count):
            key, pos = value_at(pos)
            if not isinstance(key, str) or key in obj:
                return None
            head = os.pread(fd, 5, pos)
            width: int | None = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(head[0]) if head and key in _COLUMNS else None
            if width is None:  # not a column, or not binary (an older index's checksums)
                obj[key], pos = value_at(pos)
                continue
            if len(head) < 1 + width:
                return None
            length = int.from_bytes(head[1 : 1 + width], "big")
            start = pos + 1 + width
            if length % 8 or start + length > size:
                return None
            if key in _RANGE_COLUMNS:  # page numbers, a piece at a time: never the column in bytes too
                pages = _read_pages(fd, start, length, obj.get("page_size"))
                if pages is None:
                    return None
                obj[key] = pages
                pos = start + length
                continue
            col = array("Q", [0]) * (length // 8)
            if col and os.preadv(fd, [memoryview(col).cast("B")], start) != length:
                return None
            if sys.byteorder != "little":
                col.byteswap()
            obj[key] = col
            pos = start + length
        if pos != size:
            return None  # trailing bytes (or the file changed): the whole decode says which
        if sum(isinstance(obj.get(k), _Pages) for k in _RANGE_COLUMNS) not in (0, len(_RANGE_COLUMNS)):
            return None  # some range columns missing or not binary: the whole decode says which
        return obj
    except (ValueError, TypeError, OSError, msgpack.UnpackException, msgpack.OutOfData):
        return None
    finally:
        reader.close()


def _fields(obj: Any) -> IndexFields:
    """The index's fields, checked, from its parsed top-level map."""
    if not isinstance(obj, dict):
        raise ValueError(f"not an index: the msgpack data is {_a(type(obj).__name__)}, not a map")
    if obj.get("format") != FORMAT:
        raise ValueError(f'not a pageload checkpoint index (no "format": "{FORMAT}" field)')
    version = _int(obj, "version")
    if version not in READS:
        raise ValueError(
            f"unsupported format version {version} (this pageload reads versions "
            f"{' and '.join(map(str, READS))})"
        )
    page_size = _int(obj, "page_size", minimum=1)
    memory_size = _int(obj, "memory_size", minimum=1)  # 0: nothing to restore (as an empty image)
    pages_size = _int(obj, "pages_size")
    chunk_size = _int(obj, "chunk_size", minimum=1)
    if chunk_size % page_size:
        raise ValueError(f"chunk_size {chunk_size} is not a multiple of the page size {page_size}")
    algorithm = obj.get("checksum")
    if algorithm != CHECKSUM_ALGORITHM:
        raise ValueError(
            f"unknown checksum algorithm {algorithm!r} (expected {CHECKSUM_ALGORITHM!r})"
        )
    if version == 1:
        mem, length, file = _ranges(_field(obj, "ranges", list))
        mem_p, len_p, file_p = _as_pages(memory_size, page_size, mem, length, file)
    elif all(isinstance(obj.get(k), _Pages) for k in _RANGE_COLUMNS):  # read_index's: page numbers already
        page_shift(page_size)
        cols = [obj.pop(k) for k in _RANGE_COLUMNS]
        for k, col in zip(_RANGE_COLUMNS[1:], cols[1:]):
            if len(col.column) != len(cols[0].column):
                raise ValueError(f"field {k!r} holds {col.nbytes} bytes, not 8 x {len(cols[0].column)} ranges")
        mem_p, len_p, file_p = (c.column for c in cols)
    else:
        mem = read_column(obj, "range_mem", release=True)
        length = read_column(obj, "range_length", len(mem), release=True)
        file = read_column(obj, "range_file", len(mem), release=True)
        mem_p, len_p, file_p = _as_pages(memory_size, page_size, mem, length, file)
        del mem, length, file
    checksums = _checksums(obj)
    source = obj.get("source", {})
    if not isinstance(source, dict):
        raise ValueError(f"field 'source' is {_a(type(source).__name__)}, not a map")
    return IndexFields(page_size, memory_size, pages_size, mem_p, len_p, file_p, chunk_size, checksums, source)


def _as_pages(memory_size: int, page_size: int, mem: array[int], length: array[int],
              file: array[int]) -> tuple[array[int], array[int], array[int]]:
    """Byte columns as page columns; ValueError (:class:`~loader.LayoutError`) naming
    the first range that is not page-aligned."""
    layout = Layout.from_arrays(memory_size, page_size, mem, length, file)
    return layout.mem_pages, layout.len_pages, layout.file_pages


def _read_pages(fd: int, start: int, length: int, page_size: object) -> _Pages | None:
    """The ``length`` bytes of u64 offsets at ``start`` as page numbers, read a piece at
    a time; None where that cannot be (no valid page size before the column, a value
    not page-aligned, a short read): the whole decode then says why."""
    try:
        shift = page_shift(page_size) if type(page_size) is int else None
    except ValueError:
        shift = None
    if shift is None:
        return None
    import numpy

    builder = PageColumnBuilder(shift)
    piece = array("Q", [0]) * (min(length, _PIECE) // 8)
    view = memoryview(piece).cast("B")
    done = 0
    while done < length:
        n = min(length - done, len(view))
        if os.preadv(fd, [view[:n]], start + done) != n:
            return None
        block = numpy.frombuffer(piece, dtype="<u8", count=n // 8)
        if builder.add(block.astype(numpy.uint64, copy=False)) >= 0:
            return None
        done += n
    return _Pages(builder.column, length)


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _field(obj: dict[str, Any], name: str, kind: type) -> Any:
    if name not in obj:
        raise ValueError(f"missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"field {name!r} is {_a(type(value).__name__)}, not {_a(kind.__name__)}")
    return value


def _int(obj: dict[str, Any], name: str, minimum: int = 0) -> int:
    value: int = _field(obj, name, int)
    if not minimum <= value < _U64:
        raise ValueError(f"field {name!r} is {value}, outside [{minimum}, 2**64)")
    return value


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value < _U64


def _ranges(items: list[Any]) -> tuple[array[int], array[int], array[int]]:
    """Version 1's ``ranges``: a list of ``[mem, len, off]`` triples, as three columns."""
    mem, length, file = array("Q"), array("Q"), array("Q")
    for i, item in enumerate(items):
        if not (isinstance(item, list) and len(item) == 3 and all(_is_u64(v) for v in item)):
            raise ValueError(
                f"ranges[{i}] is {item!r:.60}, not [memory offset, length, pages-file offset] "
                "(three integers in [0, 2**64))"
            )
        mem.append(item[0])
        length.append(item[1])
        file.append(item[2])
    return mem, length, file


def _checksums(obj: dict[str, Any]) -> array[int]:
    """``checksums``: bin of 8-byte little-endian integers (what this code writes, in
    version 2: decoded straight into an array, no object per chunk), or an array of
    integers (version 1's form, and that of version 2 indexes written before checksums
    became binary: still read, in either version)."""
    if "checksums" not in obj:
        raise ValueError("missing field 'checksums'")
    value = obj["checksums"]
    if isinstance(value, array):  # read from the file into an array already (read_index)
        return read_column(obj, "checksums", what="checksums")
    if isinstance(value, bytes):
        if len(value) % 8:
            raise ValueError(f"field 'checksums' is {len(value)} bytes, not a multiple of 8")
        return read_column(obj, "checksums", what="checksums")
    items = _field(obj, "checksums", list)
    if not all(_is_u64(v) for v in items):
        bad = next(i for i, v in enumerate(items) if not _is_u64(v))
        raise ValueError(f"checksums[{bad}] is {items[bad]!r:.40}, not an integer in [0, 2**64)")
    return array("Q", items)
