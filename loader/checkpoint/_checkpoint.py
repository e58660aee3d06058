"""The checkpoints the daemon restores from, opened, inspected, verified and created.

Two kinds (``docs/FORMAT.md`` describes both, field by field):

``raw``
    A raw guest memory image, Firecracker style: memory from offset 0, file
    offset == memory offset, memory size == file size.  Sparse-file holes
    (``SEEK_DATA``/``SEEK_HOLE``) are zero pages and are left out of the layout.
``pages``
    Our own: a directory with ``pages.img`` (only the non-zero pages, back to
    back, page-aligned, no header) and ``index.msgpack`` (the range table and one
    xxh3_64 checksum per chunk of ``pages.img``).

:func:`open_checkpoint` tells them apart and validates everything that can be
checked without reading the page data; :func:`verify_checkpoint` reads it all.
Every problem with the input is a :class:`CheckpointError` whose message is one
line naming the file at fault.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from array import array
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import xxhash

from .._files import open_regular, read_span, stat_regular
from .._units import human
from ..core._identity import CheckpointIdentity, file_digest, layout_digest
from ..core._layout import Layout, LayoutError
from ._create import READ_SIZE
from ._index import (
    CHECKSUM_ALGORITHM,
    INDEX_NAME,
    MAX_INDEX_BYTES,
    PAGES_NAME,
    CheckpointError,
    IndexFields,
    decode_index,
    looks_like_index,
    read_index,
)
from ._raw import ExtentScanner, scan_extents

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True, eq=False)
class Checkpoint:
    """An opened, validated checkpoint.  Holds no open file: see :meth:`open_pages`."""

    kind: str  #: ``"raw"`` or ``"pages"``
    path: str  #: as given to :func:`open_checkpoint`
    pages_path: str  #: the file page data is read from (the image itself for raw)
    layout: Layout  #: validated against the pages file's size
    chunk_size: int | None  #: pages kind only: bytes of ``pages.img`` per checksum
    checksums: array[int] | None  #: pages kind only: xxh3_64 of each chunk
    pages_size: int = 0  #: size of the pages file when it was opened
    index_path: str | None = None  #: pages kind only
    source: Mapping[str, Any] = field(
        default_factory=lambda: _EMPTY
    )  #: what the index says about its origin
    #: False: a raw image opened without looking for its holes (``scan=False``): the
    #: layout is one range over all of it, and :meth:`extent_scanner` finds them
    holes_known: bool = True

    def extent_scanner(self, fd: int) -> ExtentScanner:
        """A scanner of the raw image open at ``fd``, for the loader to find its holes
        as it goes (see :class:`~loader.core._extents.ExtentSource`)."""
        return ExtentScanner(fd, self.layout.memory_size, self.layout.page_size)

    def scanned(self) -> Checkpoint:
        """This checkpoint with its holes found (itself if they are)."""
        if self.holes_known:
            return self
        return _open_raw(self.path, self.layout.page_size)

    def open_pages(self, direct: bool = False) -> int:
        """Open the pages file read-only (``O_CLOEXEC``, and ``O_DIRECT`` if ``direct``).

        Returns the file descriptor; the caller owns it and must close it.  Raises
        :class:`CheckpointError` if the file cannot be opened (``O_DIRECT`` is
        refused by some file systems, tmpfs among them), is no longer a regular
        file, or no longer has the size it had when the checkpoint was opened.
        """
        try:
            fd = open_regular(self.pages_path, os.O_DIRECT if direct else 0)
        except OSError as exc:
            what = exc.strerror or str(exc)
            if direct and exc.errno == errno.EINVAL:
                what = "O_DIRECT is not supported for this file (file system refuses it)"
            raise CheckpointError(self.pages_path, what) from None
        size = os.fstat(fd).st_size
        if size != self.pages_size:
            os.close(fd)
            raise CheckpointError(
                self.pages_path, f"changed since the checkpoint was opened: {size} bytes, not {self.pages_size}"
            )
        return fd

    def identity(self) -> CheckpointIdentity:
        """Which checkpoint this is (a working set belongs to one): memory and page size
        and xxh3_64 of the index (``pages``: it holds every chunk's checksum) or of the
        layout (``raw``).  Reads the index again; raises OSError naming it."""
        layout = self.layout
        if self.index_path is not None:
            digest = file_digest(self.index_path)
        else:
            digest = layout_digest(layout)
        return CheckpointIdentity(self.kind, layout.memory_size, layout.page_size, digest)

    def files(self) -> tuple[str, ...]:
        """The checkpoint's own files (the image; or pages.img and the index)."""
        return tuple(dict.fromkeys(p for p in (self.path, self.pages_path, self.index_path)
                                   if p is not None and not os.path.isdir(p)))

    def memory_spans(self, file_lo: int, file_hi: int) -> list[tuple[int, int]]:
        """The memory spans whose data lies in pages-file bytes [file_lo, file_hi), merged."""
        layout = self.layout
        order = sorted(range(len(layout)), key=layout.file_pages.__getitem__)
        starts = [layout.file_at(i) for i in order]
        spans: list[tuple[int, int]] = []
        k = max(bisect_right(starts, file_lo) - 1, 0)
        while k < len(order) and starts[k] < file_hi:
            i = order[k]
            mem, length, file = layout[i]
            lo = max(file_lo, file)
            hi = min(file_hi, file + length)
            if lo < hi:
                mem_lo = mem + lo - file
                mem_hi = mem_lo + hi - lo
                if spans and spans[-1][1] == mem_lo:
                    spans[-1] = (spans[-1][0], mem_hi)
                else:
                    spans.append((mem_lo, mem_hi))
            k += 1
        return spans


def open_checkpoint(path: str, page_size: int = 4096, *, scan: bool = True) -> Checkpoint:
    """Open and validate the checkpoint at ``path``, without reading its page data.

    ``path`` may be a pages checkpoint directory, its ``index.msgpack`` (any file
    whose name ends in ``.msgpack`` or whose content starts like our index), or a
    raw memory image (anything else).  ``page_size`` applies to raw images; a
    pages checkpoint records its own.  Raw images are scanned for holes with
    ``SEEK_DATA``; pages checkpoints have their index decoded and checked (fields,
    types, version, ranges sorted, aligned, in bounds, not overlapping) and the
    pages file's size and the checksum count checked against it.

    ``scan=False`` opens a raw image without looking for its holes (at once, whatever
    its size): see :attr:`Checkpoint.holes_known`.

    Raises :class:`CheckpointError` (one line, naming the file) on any problem.
    """
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            os.close(open_regular(path))  # (a symbolic link, a device: refused here)
    except OSError as exc:
        raise CheckpointError(path, exc.strerror or str(exc)) from None
    if looks_like_pages_checkpoint(path):
        return open_pages_checkpoint(path)
    return open_raw_image(path, page_size, scan=scan)


def looks_like_pages_checkpoint(path: str) -> bool:
    """Whether ``path`` names a pages checkpoint rather than a raw image: a directory,
    a file whose name ends in ``.msgpack``, or one whose content starts like our
    index.  False where it cannot be read (opening it says why)."""
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            return True
        if path.endswith(".msgpack"):
            return True
        fd = open_regular(path)
        try:
            head = os.pread(fd, 64, 0)
        finally:
            os.close(fd)
    except OSError:
        return False
    return looks_like_index(head)


def open_pages_checkpoint(path: str) -> Checkpoint:
    """Open and validate the pages checkpoint at ``path`` (its directory or its index):
    see :func:`open_checkpoint`."""
    if os.path.isdir(path):
        return _open_pages(path, os.path.join(path, INDEX_NAME))
    return _open_pages(path, path)


def open_raw_image(path: str, page_size: int = 4096, *, scan: bool = True) -> Checkpoint:
    """Open and validate the raw image at ``path``: see :func:`open_checkpoint`."""
    return _open_raw(path, page_size, scan)


def _open_raw(path: str, page_size: int, scan: bool = True) -> Checkpoint:
    try:
        fd = open_regular(path)
    except OSError as exc:
        raise CheckpointError(path, exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if page_size <= 0 or page_size & (page_size - 1):
            raise CheckpointError(path, f"page size {page_size} is not a power of two")
        if st.st_size == 0:
            raise CheckpointError(path, "empty image (0 bytes)")
        if st.st_size % page_size:
            raise CheckpointError(
                path, f"image size {st.st_size} is not a multiple of the page size {page_size}"
            )
        if scan:
            try:
                starts, ends = scan_extents(fd, st.st_size, page_size)
            except OSError as exc:
                raise CheckpointError(path, f"cannot find its holes: {exc.strerror or exc}") from None
        else:
            starts, ends = array("Q", [0]), array("Q", [st.st_size])
    finally:
        os.close(fd)
    import numpy

    lengths = array("Q", (numpy.frombuffer(ends, dtype=numpy.uint64)
                          - numpy.frombuffer(starts, dtype=numpy.uint64)).tobytes()) if starts else array("Q")
    layout = Layout.from_arrays(st.st_size, page_size, starts, lengths)
    _validate(layout, path, st.st_size)
    return Checkpoint("raw", path, path, layout, None, None, pages_size=st.st_size, holes_known=scan)


@dataclass(frozen=True, slots=True, eq=False)
class PagesIndex:
    """A pages index, read and validated (:func:`read_pages_index`)."""

    path: str
    layout: Layout  #: validated against ``pages_size``
    chunk_size: int
    checksums: array[int]  #: one xxh3_64 per chunk, as many as ``pages_size`` needs
    pages_size: int  #: the bytes of page data the layout's file offsets address
    source: Mapping[str, Any]  #: what the index says about its origin


def read_pages_index(index_path: str) -> PagesIndex:
    """Read and validate a pages index (``index.msgpack``; docs/FORMAT.md): its fields,
    its ranges against each other and against the page data's size it names, and the
    checksum count.  It does not look at the page data.  Raises :class:`CheckpointError`."""
    try:
        with open(open_regular(index_path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_INDEX_BYTES:
                raise CheckpointError(
                    index_path, f"index is {size} bytes, more than the {MAX_INDEX_BYTES}-byte limit"
                )
            try:  # the range columns straight from the file into their arrays
                fields = read_index(f.fileno(), size)
            except ValueError as exc:
                raise CheckpointError(index_path, str(exc)) from None
    except OSError as exc:
        raise CheckpointError(index_path, exc.strerror or str(exc)) from None
    return _pages_index(fields, index_path)


def parse_pages_index(data: bytes | bytearray, name: str) -> PagesIndex:
    """:func:`read_pages_index` of an index already in memory (one fetched from an
    object store): the same checks, the same one-line :class:`CheckpointError`, naming
    ``name`` (its URL).  ``data`` must be at most ``MAX_INDEX_BYTES`` long."""
    if len(data) > MAX_INDEX_BYTES:
        raise CheckpointError(name, f"index is {len(data)} bytes, more than the {MAX_INDEX_BYTES}-byte limit")
    try:
        fields = decode_index(data)
    except ValueError as exc:
        raise CheckpointError(name, str(exc)) from None
    return _pages_index(fields, name)


def _pages_index(fields: IndexFields, index_path: str) -> PagesIndex:
    layout = fields.layout()
    _validate(layout, index_path, fields.pages_size)
    expected = -(-fields.pages_size // fields.chunk_size)
    if len(fields.checksums) != expected:
        raise CheckpointError(
            index_path,
            f"{len(fields.checksums)} checksums for a {fields.pages_size}-byte pages file in "
            f"{fields.chunk_size}-byte chunks (expected {expected})",
        )
    return PagesIndex(index_path, layout, fields.chunk_size, fields.checksums, fields.pages_size,
                      MappingProxyType(dict(fields.source)))


def _open_pages(path: str, index_path: str) -> Checkpoint:
    if index_path != path and not os.path.lexists(index_path):
        raise CheckpointError(index_path, "missing: this directory is not a pages checkpoint")
    index = read_pages_index(index_path)
    pages_path = os.path.join(os.path.dirname(index_path), PAGES_NAME)
    if not os.path.exists(pages_path):
        raise CheckpointError(
            pages_path,
            f"pages file missing (the index {index_path} needs {index.pages_size} bytes)",
        )
    pages_size = stat_regular(pages_path).st_size
    if pages_size != index.pages_size:
        shorter = "shorter" if pages_size < index.pages_size else "longer"
        raise CheckpointError(
            pages_path,
            f"pages file is {shorter} than the index says: "
            f"{pages_size} bytes, not {index.pages_size}",
        )
    return Checkpoint(
        "pages",
        path,
        pages_path,
        index.layout,
        index.chunk_size,
        index.checksums,
        pages_size=pages_size,
        index_path=index_path,
        source=index.source,
    )


def _validate(layout: Layout, path: str, pages_size: int) -> None:
    try:
        layout.validate(pages_size)
    except LayoutError as exc:
        raise CheckpointError(path, str(exc)) from None


def inspect_checkpoint(path: str) -> dict[str, Any]:
    """Facts about the checkpoint at ``path``, as a JSON-ready dict (see FORMAT.md).

    Opens it like :func:`open_checkpoint` (so it validates, and raises
    :class:`CheckpointError` the same way) but reads no page data.
    ``zero_bytes_skipped`` is memory not stored: holes and dropped zero pages.
    """
    return describe_checkpoint(open_checkpoint(path))


def describe_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    """:func:`inspect_checkpoint`'s dict for a checkpoint already open (one in object
    storage too: its ``path`` and ``pages_path`` are then URLs)."""
    layout = ckpt.layout
    info: dict[str, Any] = {
        "path": ckpt.path,
        "kind": ckpt.kind,
        "pages_path": ckpt.pages_path,
        "page_size": layout.page_size,
        "memory_size": layout.memory_size,
        "data_bytes": layout.data_bytes,
        "zero_bytes_skipped": layout.memory_size - layout.data_bytes,
        "ranges": len(layout),
        "largest_range": max(layout.len_pages, default=0) << layout.shift,
        "range_table_bytes": layout.table_bytes(),
        "pages_file_size": ckpt.pages_size,
    }
    if ckpt.kind == "raw":
        info.update(hole_bytes=layout.memory_size - layout.data_bytes, checksum=None)
    else:
        assert ckpt.checksums is not None
        info.update(
            index_path=ckpt.index_path,
            hole_bytes=ckpt.source.get("hole_bytes"),
            zero_page_bytes=ckpt.source.get("zero_page_bytes"),
            checksum=CHECKSUM_ALGORITHM,
            chunk_size=ckpt.chunk_size,
            chunks=len(ckpt.checksums),
            source=dict(ckpt.source),
        )
    return info


def format_inspection(info: dict[str, Any]) -> list[str]:
    """:func:`inspect_checkpoint`'s dict as human-readable lines."""
    lines = [
        f"{info['path']}: {info['kind']} checkpoint",
        f"  memory size        {human(info['memory_size'])} ({info['memory_size']} bytes, "
        f"{info['page_size']}-byte pages)",
        f"  data               {human(info['data_bytes'])} in {info['ranges']} ranges "
        f"(largest {human(info['largest_range'])})",
        f"  zero, not stored   {human(info['zero_bytes_skipped'])}",
    ]
    if info.get("hole_bytes") is not None:
        lines[-1] += f" (holes {human(info['hole_bytes'])}"
        if info.get("zero_page_bytes") is not None:
            lines[-1] += f", zero pages {human(info['zero_page_bytes'])}"
        lines[-1] += ")"
    lines.append(f"  pages file         {info['pages_path']} ({info['pages_file_size']} bytes)")
    if info["checksum"]:
        lines.append(
            f"  checksums          {info['chunks']} x {info['checksum']} over "
            f"{human(info['chunk_size'])} chunks"
        )
    else:
        lines.append("  checksums          none (raw image)")
    lines.append(f"  range table        {human(info['range_table_bytes'])} in memory")
    return lines


@dataclass(frozen=True, slots=True)
class BadChunk:
    """A chunk of ``pages.img`` whose checksum does not match."""

    index: int
    file_offset: int
    length: int
    expected: int
    actual: int | None  #: None if the chunk could not be read in full
    memory: tuple[tuple[int, int], ...]  #: memory spans whose data is in this chunk

    def describe(self) -> str:
        spans = [f"{lo:#x}-{hi:#x}" for lo, hi in self.memory[:3]]
        if len(self.memory) > 3:
            spans.append(f"and {len(self.memory) - 3} more up to {self.memory[-1][1]:#x}")
        mem = ", ".join(spans) or "none"
        got = "short read" if self.actual is None else f"{self.actual:#018x}"
        return (
            f"chunk {self.index} (pages file {self.file_offset:#x}+{self.length:#x}): "
            f"expected {self.expected:#018x}, got {got}; memory {mem}"
        )


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify_checkpoint` found.  ``ok`` is False only if data is corrupt."""

    path: str
    kind: str
    verified: bool  #: False for raw images, which carry no checksums
    chunks: int
    bytes_checked: int
    bad_chunks: tuple[BadChunk, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.bad_chunks

    def lines(self) -> list[str]:
        if not self.verified:
            return [
                f"{self.path}: raw image: it carries no checksums, so there is nothing to verify"
            ]
        if self.ok:
            return [
                f"{self.path}: ok: {self.chunks} chunks, {human(self.bytes_checked)} checked "
                f"in {self.seconds:.2f} s"
            ]
        return [
            f"{self.path}: CORRUPT: {len(self.bad_chunks)} of {self.chunks} chunks do not match",
            *(f"  {bad.describe()}" for bad in self.bad_chunks),
        ]


def verify_checkpoint(path: str) -> VerifyReport:
    """Read all of ``pages.img`` and check every chunk's xxh3_64 against the index.

    Reads sequentially with one bounded buffer.  Each mismatching chunk is listed
    with the memory ranges it holds.  A raw image has no checksums: the report
    says so (``verified`` False, ``ok`` True).  Raises :class:`CheckpointError` if
    the checkpoint is invalid or cannot be read.
    """
    started = time.perf_counter()
    ckpt = open_checkpoint(path)
    if ckpt.kind == "raw" or ckpt.checksums is None or ckpt.chunk_size is None:
        return VerifyReport(path, ckpt.kind, False, 0, 0, (), time.perf_counter() - started)
    chunk_size, size, sums = ckpt.chunk_size, ckpt.pages_size, ckpt.checksums
    # whole chunks per read (small chunks: many per read; a chunk larger than READ_SIZE: in pieces)
    per_read = max(1, READ_SIZE // chunk_size)
    buf = bytearray(min(per_read * chunk_size, READ_SIZE, max(size, 1)))
    view = memoryview(buf)
    hasher = xxhash.xxh3_64()
    bad: list[BadChunk] = []
    fd = ckpt.open_pages()
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for first in range(0, len(sums), per_read):
            last = min(first + per_read, len(sums))
            lo, hi = first * chunk_size, min(last * chunk_size, size)
            if per_read > 1:  # read them at once, hash each
                got = read_span(fd, ckpt.pages_path, view[: hi - lo], lo)
                found = [xxhash.xxh3_64_intdigest(view[c - lo : min(c + chunk_size, hi) - lo])
                         if min(c + chunk_size, hi) - lo <= got else None
                         for c in range(lo, hi, chunk_size)]
            else:
                hasher.reset()
                found = [hasher.intdigest() if _hash_span(fd, ckpt.pages_path, view, hasher, lo, hi) else None]
            for i, actual in zip(range(first, last), found):
                if actual != sums[i]:
                    c_lo, c_hi = i * chunk_size, min((i + 1) * chunk_size, size)
                    bad.append(
                        BadChunk(i, c_lo, c_hi - c_lo, sums[i], actual, tuple(ckpt.memory_spans(c_lo, c_hi)))
                    )
    finally:
        os.close(fd)
    return VerifyReport(
        path, ckpt.kind, True, len(ckpt.checksums), size, tuple(bad), time.perf_counter() - started
    )


def _hash_span(fd: int, path: str, view: memoryview, hasher: Any, lo: int, hi: int) -> bool:
    off = lo
    while off < hi:
        want = min(len(view), hi - off)
        try:
            n = os.preadv(fd, [view[:want]], off)
        except OSError as exc:
            raise CheckpointError(
                path, f"read error at offset {off}: {exc.strerror or exc}"
            ) from None
        if n == 0:
            return False
        hasher.update(view[:n])
        off += n
    return True
