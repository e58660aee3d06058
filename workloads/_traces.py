"""Fault traces: what a client touched, and when, held compactly and stored in two forms.

A trace is a sequence of faults ``(t_us, offset, length)``: microseconds since the
start of the trace, a byte offset into the memory image, and a length in bytes.  A
load generator replays it against the restore daemon, turning each fault into a
``wait(offset, length)`` at its time.

:class:`Trace` keeps the three columns in ``array('Q')`` (24 bytes per fault, never
an object per fault), so a million-fault trace costs 24 MB and loads with one copy
per column.  Iterating yields :class:`Fault` tuples made on the fly.

Two file forms (``docs/TRACES.md``):

* msgpack: one map ``{"format": "pageload-trace", "version": 1, "page_size",
  "memory_size" (or nil), "count", "t_us", "offset", "length"}`` whose three columns
  are ``bin`` objects of little-endian uint64; loading is ``array.frombytes``.
* text: one fault per line, ``<t_us> <offset> <length>``, ``#`` comments, header
  comments ``# memory_size: N`` and ``# page_size: N``; decimal or ``0x`` hex.

:func:`load_trace` tells the forms apart by the first byte (a msgpack map starts
with ``0x80``-``0x8f``, ``0xde`` or ``0xdf``, which no text trace does).  Every error
reading a file is a :class:`TraceError` whose one-line message starts with the file
name (and ``:line`` for text).
"""

from __future__ import annotations

import operator
import os
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import msgpack

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Fault",
    "Trace",
    "TraceError",
    "TraceSummary",
    "detect_form",
    "load_trace",
    "save_trace",
    "parse_text",
    "format_text",
]

FORMAT_NAME = "pageload-trace"
FORMAT_VERSION = 1
DEFAULT_PAGE_SIZE = 4096

if array("Q").itemsize != 8:  # pragma: no cover - every platform we run on has 8-byte Q
    raise ImportError("array('Q') is not 64-bit on this platform")

_BIG_ENDIAN = sys.byteorder == "big"


class TraceError(ValueError):
    """A trace is malformed or does not fit; ``str()`` is one line naming the file."""


class Fault(NamedTuple):
    t_us: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class TraceSummary:
    """What ``pageload trace show`` prints."""

    faults: int
    bytes: int  #: sum of fault lengths
    span_lo: int  #: lowest offset touched (0 if empty)
    span_hi: int  #: end of the highest fault (0 if empty)
    duration_us: int  #: last timestamp minus first
    unique_pages: int  #: distinct pages of ``page_size`` covered by the faults
    page_size: int
    memory_size: int | None

    @property
    def rate(self) -> float:
        """Faults per second: intervals between faults over the duration (0.0 if it is 0)."""
        return (self.faults - 1) * 1e6 / self.duration_us if self.duration_us else 0.0


class Trace:
    """A sequence of faults in three ``array('Q')`` columns.

    ``source`` names the trace in error messages (the file it came from, normally).
    ``memory_size`` is the size of the memory image the trace was made for, when
    known; ``page_size`` is the granularity its faults are aligned to.  The columns
    are public and may be appended to directly; keep them the same length.
    """

    __slots__ = ("t_us", "offset", "length", "page_size", "memory_size", "source")

    def __init__(
        self,
        t_us: Iterable[int] = (),
        offset: Iterable[int] = (),
        length: Iterable[int] = (),
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        memory_size: int | None = None,
        source: str = "<trace>",
    ) -> None:
        self.t_us = t_us if isinstance(t_us, array) and t_us.typecode == "Q" else array("Q", t_us)
        self.offset = (
            offset if isinstance(offset, array) and offset.typecode == "Q" else array("Q", offset)
        )
        self.length = (
            length if isinstance(length, array) and length.typecode == "Q" else array("Q", length)
        )
        if not (len(self.t_us) == len(self.offset) == len(self.length)):
            raise ValueError(
                f"trace columns differ in length: t_us {len(self.t_us)}, "
                f"offset {len(self.offset)}, length {len(self.length)}"
            )
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        self.page_size = page_size
        self.memory_size = memory_size
        self.source = source

    # -- sequence ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.t_us)

    def __iter__(self) -> Iterator[Fault]:
        return map(Fault._make, zip(self.t_us, self.offset, self.length, strict=True))

    def __getitem__(self, i: int) -> Fault:
        return Fault(self.t_us[i], self.offset[i], self.length[i])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trace):
            return NotImplemented
        return (
            self.t_us == other.t_us
            and self.offset == other.offset
            and self.length == other.length
            and self.page_size == other.page_size
            and self.memory_size == other.memory_size
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"<Trace {self.source}: {len(self)} faults, page_size={self.page_size}, "
            f"memory_size={self.memory_size}>"
        )

    def append(self, t_us: int, offset: int, length: int) -> None:
        self.t_us.append(t_us)
        self.offset.append(offset)
        self.length.append(length)

    # -- slicing for N clients ----------------------------------------------------------

    def split(
        self, n: int, mode: Literal["round-robin", "contiguous"] = "round-robin"
    ) -> list[Trace]:
        """Divide the faults among ``n`` clients; each part keeps the metadata.

        ``round-robin``: client ``k`` gets faults ``k, k+n, k+2n, ...`` (all clients
        run over the whole duration).  ``contiguous``: client ``k`` gets the ``k``-th
        run of about ``len/n`` consecutive faults (clients work on different phases).
        Timestamps are kept as they are, so replaying every part together reproduces
        the original schedule.  Parts may be empty when ``n > len(self)``.
        """
        if n < 1:
            raise ValueError(f"cannot split a trace among {n} clients")
        parts: list[Trace] = []
        total = len(self)
        for k in range(n):
            if mode == "round-robin":
                sl = slice(k, None, n)
            elif mode == "contiguous":
                sl = slice(k * total // n, (k + 1) * total // n)
            else:
                raise ValueError(f"unknown split mode {mode!r} (round-robin or contiguous)")
            parts.append(
                Trace(
                    self.t_us[sl],
                    self.offset[sl],
                    self.length[sl],
                    page_size=self.page_size,
                    memory_size=self.memory_size,
                    source=f"{self.source}[{k}/{n}]",
                )
            )
        return parts

    # -- checks and summaries -----------------------------------------------------------

    def max_end(self) -> int:
        """The end of the furthest fault (``offset + length``); 0 for an empty trace."""
        return max(map(operator.add, self.offset, self.length), default=0)

    def check_fits(self, memory_size: int | None = None) -> None:
        """Raise :class:`TraceError` naming the first fault past ``memory_size``.

        ``memory_size`` defaults to the trace's own; with neither known, nothing is
        checked.  Zero-length faults are reported too (a wait for nothing is a bug in
        the trace, not a request the daemon should see).
        """
        size = self.memory_size if memory_size is None else memory_size
        if size is not None and self.max_end() > size:
            for i, (off, n) in enumerate(zip(self.offset, self.length, strict=True)):
                if off + n > size:
                    raise TraceError(
                        f"{self.source}: fault {i} at offset {off:#x}+len {n} "
                        f"runs past the memory size {size}"
                    )
        if len(self.length) and min(self.length) == 0:
            i = self.length.index(0)
            raise TraceError(f"{self.source}: fault {i} at offset {self.offset[i]:#x} has length 0")

    def check_times(self) -> None:
        """Raise :class:`TraceError` at the first timestamp earlier than the one before."""
        t = self.t_us
        for i in range(1, len(t)):
            if t[i] < t[i - 1]:
                raise TraceError(
                    f"{self.source}: fault {i} at {t[i]} us comes before "
                    f"fault {i - 1} at {t[i - 1]} us"
                )

    def unique_pages(self) -> int:
        """Distinct ``page_size`` pages covered by the faults (sorts a copy of the starts)."""
        if not len(self):
            return 0
        shift = self.page_size.bit_length() - 1
        spans = sorted(zip(self.offset, self.length, strict=True))
        pages = 0
        cur_lo = cur_hi = -1
        for off, n in spans:
            lo = off >> shift
            hi = (off + n + self.page_size - 1) >> shift
            if lo > cur_hi:
                pages += cur_hi - cur_lo if cur_hi > cur_lo else 0
                cur_lo, cur_hi = lo, hi
            elif hi > cur_hi:
                cur_hi = hi
        pages += cur_hi - cur_lo
        return pages

    def summary(self) -> TraceSummary:
        empty = not len(self)
        return TraceSummary(
            faults=len(self),
            bytes=sum(self.length),
            span_lo=0 if empty else min(self.offset),
            span_hi=self.max_end(),
            duration_us=0 if empty else self.t_us[-1] - self.t_us[0],
            unique_pages=self.unique_pages(),
            page_size=self.page_size,
            memory_size=self.memory_size,
        )


# -- msgpack form -------------------------------------------------------------------------


def _column_bytes(col: array[int]) -> bytes:
    if _BIG_ENDIAN:  # pragma: no cover
        col = array("Q", col)
        col.byteswap()
    return col.tobytes()


def _column_from(blob: object, name: str, count: int, source: str) -> array[int]:
    if not isinstance(blob, bytes):
        raise TraceError(f"{source}: column {name!r} is not binary data")
    if len(blob) != count * 8:
        raise TraceError(
            f"{source}: column {name!r} holds {len(blob)} bytes, "
            f"expected {count * 8} for {count} faults"
        )
    col = array("Q")
    col.frombytes(blob)
    if _BIG_ENDIAN:  # pragma: no cover
        col.byteswap()
    return col


def _pack(trace: Trace) -> bytes:
    packed: bytes = msgpack.packb(
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "page_size": trace.page_size,
            "memory_size": trace.memory_size,
            "count": len(trace),
            "t_us": _column_bytes(trace.t_us),
            "offset": _column_bytes(trace.offset),
            "length": _column_bytes(trace.length),
        },
        use_bin_type=True,
    )
    return packed


def _unpack(data: bytes, source: str) -> Trace:
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.UnpackException, ValueError) as exc:
        raise TraceError(f"{source}: not a msgpack trace ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise TraceError(f"{source}: not a {FORMAT_NAME} file (no 'format': '{FORMAT_NAME}' key)")
    version = doc.get("version")
    if version != FORMAT_VERSION:
        raise TraceError(
            f"{source}: trace format version {version!r} is not supported "
            f"(this reads {FORMAT_VERSION})"
        )
    count = doc.get("count")
    page_size = doc.get("page_size", DEFAULT_PAGE_SIZE)
    memory_size = doc.get("memory_size")
    if not isinstance(count, int) or count < 0:
        raise TraceError(f"{source}: 'count' is missing or not a non-negative integer")
    if not isinstance(page_size, int) or page_size <= 0 or page_size & (page_size - 1):
        raise TraceError(f"{source}: page size {page_size!r} is not a power of two")
    if memory_size is not None and (not isinstance(memory_size, int) or memory_size < 0):
        raise TraceError(f"{source}: memory size {memory_size!r} is not a non-negative integer")
    cols = [
        _column_from(doc.get(name), name, count, source) for name in ("t_us", "offset", "length")
    ]
    return Trace(*cols, page_size=page_size, memory_size=memory_size, source=source)


# -- text form ----------------------------------------------------------------------------


def _number(tok: str) -> int:
    """Decimal or ``0x`` hex, non-negative; ValueError otherwise."""
    if tok[:2] in ("0x", "0X"):
        value = int(tok[2:], 16)
    else:
        value = int(tok, 10)
    if value < 0 or tok[:1] in ("+", "-"):
        raise ValueError(tok)
    return value


def parse_text(lines: Iterable[str], source: str = "<text>") -> Trace:
    """Parse the text form.  Errors name ``source:line``.

    Timestamps must not go backwards and lengths must be positive; header comments
    (``# memory_size: N``, ``# page_size: N``) may appear anywhere before the first
    fault and take ``parse_size`` forms (``4K``, ``0x1000``).
    """
    from loader import parse_size

    t_us = array("Q")
    offset = array("Q")
    length = array("Q")
    page_size = DEFAULT_PAGE_SIZE
    memory_size: int | None = None
    last_t = 0
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("#"):
            key, sep, value = text[1:].partition(":")
            key = key.strip().lower()
            if sep and key in ("memory_size", "page_size"):
                if len(t_us):
                    raise TraceError(f"{source}:{lineno}: '{key}' header after the first fault")
                try:
                    size = parse_size(value)
                except ValueError as exc:
                    raise TraceError(f"{source}:{lineno}: bad {key}: {exc}") from None
                if key == "memory_size":
                    memory_size = size
                elif size <= 0 or size & (size - 1):
                    raise TraceError(f"{source}:{lineno}: page size {size} is not a power of two")
                else:
                    page_size = size
            continue
        fields = text.split("#", 1)[0].split()
        if len(fields) != 3:
            raise TraceError(
                f"{source}:{lineno}: expected '<microseconds> <offset> <length>', "
                f"got {len(fields)} fields"
            )
        try:
            t, off, n = _number(fields[0]), _number(fields[1]), _number(fields[2])
        except ValueError:
            raise TraceError(f"{source}:{lineno}: not a non-negative integer in {text!r}") from None
        if n == 0:
            raise TraceError(f"{source}:{lineno}: fault length is 0")
        if t < last_t:
            raise TraceError(
                f"{source}:{lineno}: time {t} us is before the previous fault's {last_t} us"
            )
        if max(t, off, n, off + n) >= 1 << 64:
            raise TraceError(f"{source}:{lineno}: value does not fit in 64 bits")
        last_t = t
        t_us.append(t)
        offset.append(off)
        length.append(n)
    return Trace(t_us, offset, length, page_size=page_size, memory_size=memory_size, source=source)


def format_text(trace: Trace) -> Iterator[str]:
    """Lines of the text form (with newlines): header comments, then one fault a line."""
    yield (
        f"# {FORMAT_NAME} version {FORMAT_VERSION}: "
        "<microseconds since start> <byte offset> <length>\n"
    )
    yield f"# page_size: {trace.page_size}\n"
    if trace.memory_size is not None:
        yield f"# memory_size: {trace.memory_size}\n"
    for t, off, n in zip(trace.t_us, trace.offset, trace.length, strict=True):
        yield f"{t} {off:#x} {n}\n"


# -- files --------------------------------------------------------------------------------


def _is_msgpack_map(first: bytes) -> bool:
    return bool(first) and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))


def detect_form(path: str | os.PathLike[str]) -> Literal["msgpack", "text"]:
    """Which form the file at ``path`` is in, from its first byte (``OSError`` if unreadable)."""
    with open(path, "rb") as f:
        return "msgpack" if _is_msgpack_map(f.read(1)) else "text"


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a trace in either form (told apart by the first byte).

    Raises :class:`TraceError` for malformed contents and ``OSError`` when the file
    cannot be read.  The trace's ``source`` is ``path``.
    """
    source = os.fspath(path)
    with open(source, "rb") as f:
        data = f.read()
    if _is_msgpack_map(data[:1]):
        return _unpack(data, source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TraceError(
            f"{source}: neither a msgpack trace nor UTF-8 text (byte {exc.start})"
        ) from None
    return parse_text(text.splitlines(), source)


def save_trace(
    trace: Trace, path: str | os.PathLike[str], form: Literal["msgpack", "text"] = "msgpack"
) -> None:
    """Write ``trace`` to ``path`` (replacing it atomically: a temporary file, then rename)."""
    target = os.fspath(path)
    tmp = f"{target}.tmp{os.getpid()}"
    try:
        if form == "msgpack":
            with open(tmp, "wb") as f:
                f.write(_pack(trace))
        elif form == "text":
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(format_text(trace))
        else:
            raise ValueError(f"unknown trace form {form!r} (msgpack or text)")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
