"""Converting a raw memory image into a pages checkpoint (``pages.img`` + ``index.msgpack``).

One pass over the image's data extents with one reused read buffer: holes are
never read, all-zero pages inside extents are dropped, the rest is appended to
``pages.img`` and hashed as it is written.  Memory use is the read buffer plus
24 bytes per output range while it is written (12 in the index's columns after),
whatever the image size.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from array import array
from dataclasses import dataclass

import xxhash

from .._files import open_regular, read_span
from .._units import human
from ..core._identity import CheckpointIdentity, layout_digest
from ..core._layout import Layout
from ..core._rangeset import RangeSet
from ..core._replay import replay_plan
from ..core._workingset import (
    DEFAULT_NAME,
    WorkingSet,
    WorkingSetError,
    check_identity,
    clip_working_set,
    max_file_bytes,
    read_working_set,
)
from ._index import (
    CHECKSUM_ALGORITHM,
    INDEX_NAME,
    PAGES_NAME,
    CheckpointError,
    IndexFields,
    encode_index,
)
from ._raw import data_extents, nonzero_runs

__all__ = ["DEFAULT_CHUNK_SIZE", "READ_SIZE", "CreateReport", "create_checkpoint"]

READ_SIZE = 8 << 20  #: bytes read from the image per ``preadv``
#: bytes of ``pages.img`` per checksum: a wait reads and hashes its whole chunk before
#: it is served, so a chunk is small (docs/FORMAT.md, docs/BENCHMARKS.md); it costs
#: 8 bytes of index and of the daemon's memory per chunk (512 KiB per GiB of data)
DEFAULT_CHUNK_SIZE = 16 << 10


@dataclass(frozen=True, slots=True)
class CreateReport:
    """What :func:`create_checkpoint` did."""

    image: str
    out: str
    page_size: int
    memory_size: int
    data_bytes: int  #: bytes written to ``pages.img``
    ranges: int  #: ranges in the index (adjacent non-zero pages coalesced)
    hole_bytes: int  #: sparse-file holes in the image, never read
    zero_page_bytes: int  #: all-zero pages read from data extents and dropped
    chunk_size: int
    chunks: int  #: checksums written
    seconds: float
    working_set_bytes: int = 0  #: bytes laid out first in ``pages.img`` (``working_set=``)

    @property
    def zero_bytes_skipped(self) -> int:
        return self.hole_bytes + self.zero_page_bytes

    def lines(self) -> list[str]:
        """A human-readable summary, one fact per line."""
        rate = self.memory_size / self.seconds if self.seconds > 0 else 0.0
        return [
            f"created {self.out} from {self.image}",
            f"  memory size     {human(self.memory_size)} ({self.memory_size} bytes, "
            f"{self.page_size}-byte pages)",
            f"  data written    {human(self.data_bytes)} in {self.ranges} ranges",
            f"  zero skipped    {human(self.zero_bytes_skipped)} (holes {human(self.hole_bytes)}, "
            f"zero pages {human(self.zero_page_bytes)})",
            f"  checksums       {self.chunks} x {CHECKSUM_ALGORITHM} "
            f"over {human(self.chunk_size)} chunks",
            *([f"  working set     {human(self.working_set_bytes)} first in {PAGES_NAME}, in first-touch "
               f"order; {DEFAULT_NAME} written for the new checkpoint"] if self.working_set_bytes else []),
            f"  took            {self.seconds:.2f} s ({human(rate)}/s of image)",
        ]


class _PagesWriter:
    """Appends to the pages file, keeping one xxh3_64 per ``chunk_size`` bytes written."""

    def __init__(self, fd: int, chunk_size: int) -> None:
        self.fd = fd
        self.chunk_size = chunk_size
        self.position = 0
        self.checksums = array("Q")
        self._hasher = xxhash.xxh3_64()
        self._in_chunk = 0

    def write(self, data: memoryview) -> None:
        self.position += len(data)
        rest = data
        while rest:
            piece = rest[: self.chunk_size - self._in_chunk]
            self._hasher.update(piece)
            self._in_chunk += len(piece)
            if self._in_chunk == self.chunk_size:
                self._end_chunk()
            rest = rest[len(piece) :]
        while data:
            data = data[os.write(self.fd, data) :]

    def finish(self) -> array[int]:
        if self._in_chunk:
            self._end_chunk()
        return self.checksums

    def _end_chunk(self) -> None:
        self.checksums.append(self._hasher.intdigest())
        self._hasher.reset()
        self._in_chunk = 0


def create_checkpoint(
    image: str, out: str, page_size: int = 4096, chunk_size: int = DEFAULT_CHUNK_SIZE,
    working_set: str | None = None,
) -> CreateReport:
    """Convert the raw memory image ``image`` into a pages checkpoint directory ``out``.

    Holes (found with ``SEEK_DATA``) and all-zero pages inside data extents are
    dropped; adjacent non-zero pages become one range.  ``pages.img`` is written
    sequentially and checksummed per ``chunk_size`` bytes as it is written.
    Everything is written into a temporary directory beside ``out``, flushed with
    ``fsync``, and renamed to ``out`` only when complete, so a half-written
    checkpoint is never seen under ``out``; on any error (or cancellation by
    ``KeyboardInterrupt``) the temporary directory is removed.

    With ``working_set`` (a working set recorded on ``image``, as a raw checkpoint),
    its pages come first in ``pages.img``, in the order replay reads them, so that
    replaying it is one sequential read; the rest follows in memory order.  The
    working set is also written into ``out`` (``working-set.msgpack``), re-tied to
    the new checkpoint, where ``pageload restore`` picks it up.

    Raises :class:`CheckpointError` naming the file at fault: an unreadable image,
    one whose size is not a positive multiple of ``page_size``, an ``out`` that
    already exists, or a write error.  The image must not change during the call.
    """
    started = time.perf_counter()
    if page_size <= 0 or page_size & (page_size - 1):
        raise CheckpointError(image, f"page size {page_size} is not a power of two")
    if chunk_size <= 0 or chunk_size % page_size:
        raise CheckpointError(
            image, f"chunk size {chunk_size} is not a multiple of the page size {page_size}"
        )
    try:
        fd = open_regular(image)
    except OSError as exc:
        raise CheckpointError(image, exc.strerror or str(exc)) from None
    try:
        size = _image_size(fd, image, page_size)
        if os.path.lexists(out):
            raise CheckpointError(out, "already exists; remove it or choose another output path")
        parent = os.path.dirname(os.path.abspath(out))
        name = os.path.basename(os.path.abspath(out))
        try:
            tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
        except OSError as exc:
            raise CheckpointError(out, f"cannot create it: {exc.strerror or exc}") from None
        try:
            extents = data_extents(fd, size, page_size)
            ws = _working_set_for(working_set, extents, size, page_size)
            pieces, front_bytes = _write_order(extents, ws, size, page_size)
            fields = _write_pages(
                fd, image, os.path.join(tmp, PAGES_NAME), pieces, extents, size, page_size, chunk_size
            )
            index = encode_index(fields)
            _write_file(os.path.join(tmp, INDEX_NAME), index)
            if ws is not None:
                ident = CheckpointIdentity("pages", size, page_size, xxhash.xxh3_64_intdigest(index))
                ws.identity = ident
                from ..core._workingset import encode_working_set

                _write_file(os.path.join(tmp, DEFAULT_NAME), encode_working_set(ws))
            os.chmod(tmp, 0o755)  # mkdtemp made it private
            _fsync_dir(tmp)
            os.rename(tmp, out)
            _fsync_dir(parent)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            where = exc.filename if isinstance(exc.filename, str) else out
            raise CheckpointError(where, exc.strerror or str(exc)) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        os.close(fd)
    extent_bytes = sum(end - start for start, end in extents)
    return CreateReport(
        image=image,
        out=out,
        page_size=page_size,
        memory_size=size,
        data_bytes=fields.pages_size,
        ranges=len(fields.mem_pages),
        hole_bytes=size - extent_bytes,
        zero_page_bytes=extent_bytes - fields.pages_size,
        chunk_size=chunk_size,
        chunks=len(fields.checksums),
        seconds=time.perf_counter() - started,
        working_set_bytes=front_bytes,
    )


def _image_size(fd: int, image: str, page_size: int) -> int:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(image, "not a regular file")
    if st.st_size == 0:
        raise CheckpointError(image, "empty image (0 bytes)")
    if st.st_size % page_size:
        raise CheckpointError(
            image, f"size {st.st_size} is not a multiple of the page size {page_size}"
        )
    return st.st_size


def _working_set_for(
    path: str | None, extents: list[tuple[int, int]], size: int, page_size: int
) -> WorkingSet | None:
    """The working set to lay out first: it must have been recorded on this image."""
    if path is None:
        return None
    try:
        ws = read_working_set(path, max_file_bytes(size, page_size))
        layout = Layout(size, page_size, ((s, e - s, s) for s, e in extents))
        check_identity(ws, CheckpointIdentity("raw", size, page_size, layout_digest(layout)), path)
    except WorkingSetError as exc:
        raise CheckpointError(exc.path, exc.problem) from None
    ws, _ = clip_working_set(ws, size)
    return ws


def _write_order(
    extents: list[tuple[int, int]], ws: WorkingSet | None, size: int, page_size: int
) -> tuple[list[tuple[int, int]], int]:
    """The image's data pieces in the order they go into ``pages.img``: the working
    set's replay spans first (as the loader will read them), then the rest in
    memory order.  Returns (pieces, bytes of data in the front part)."""
    if ws is None:
        return extents, 0
    data = RangeSet(extents)
    front = RangeSet()
    pieces: list[tuple[int, int]] = []
    span_lo, span_hi = replay_plan(ws, Layout(size, page_size, ((s, e - s, s) for s, e in extents)))
    for lo, hi in zip(span_lo, span_hi):
        for a, b in list(data.overlapping(lo, hi)):
            _append_uncovered(pieces, front, a, b)
            front.add(a, b)
    front_bytes = front.total
    for a, b in extents:
        _append_uncovered(pieces, front, a, b)
    return pieces, front_bytes


def _append_uncovered(pieces: list[tuple[int, int]], covered: RangeSet, a: int, b: int) -> None:
    """Append the parts of [a, b) that ``covered`` does not hold, in order."""
    pos = a
    for x, y in list(covered.overlapping(a, b)):
        if x > pos:
            pieces.append((pos, x))
        pos = y
    if pos < b:
        pieces.append((pos, b))


def _write_pages(
    fd: int,
    image: str,
    pages_path: str,
    pieces: list[tuple[int, int]],
    extents: list[tuple[int, int]],
    size: int,
    page_size: int,
    chunk_size: int,
) -> IndexFields:
    mem, length, file = array("Q"), array("Q"), array("Q")
    buf = bytearray(min(READ_SIZE, size))
    view = memoryview(buf)
    out_fd = os.open(pages_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        writer = _PagesWriter(out_fd, chunk_size)
        for start, end in pieces:
            off = start
            while off < end:
                n = min(len(buf), end - off)
                _read_exactly(fd, image, view[:n], off)
                for a, b in nonzero_runs(buf, 0, n, page_size):
                    if mem and mem[-1] + length[-1] == off + a:
                        length[-1] += b - a
                    else:
                        mem.append(off + a)
                        length.append(b - a)
                        file.append(writer.position)
                    writer.write(view[a:b])
                off += n
        checksums = writer.finish()
        os.fsync(out_fd)
    finally:
        os.close(out_fd)
    extent_bytes = sum(end - start for start, end in extents)
    if pieces is not extents:  # laid out out of memory order: the index is sorted by memory
        merged: list[tuple[int, int, int]] = []
        for m, n, f in sorted(zip(mem, length, file, strict=True)):
            if merged and merged[-1][0] + merged[-1][1] == m and merged[-1][2] + merged[-1][1] == f:
                merged[-1] = (merged[-1][0], merged[-1][1] + n, merged[-1][2])
            else:
                merged.append((m, n, f))
        mem = array("Q", (m for m, _, _ in merged))
        length = array("Q", (n for _, n, _ in merged))
        file = array("Q", (f for _, _, f in merged))
    table = Layout.from_arrays(size, page_size, mem, length, file)  # (page numbers, as the index is read)
    del mem, length, file
    return IndexFields(
        page_size=page_size,
        memory_size=size,
        pages_size=writer.position,
        mem_pages=table.mem_pages,
        len_pages=table.len_pages,
        file_pages=table.file_pages,
        chunk_size=chunk_size,
        checksums=checksums,
        source={
            "image": os.path.basename(image),
            "hole_bytes": size - extent_bytes,
            "zero_page_bytes": extent_bytes - writer.position,
        },
    )


def _read_exactly(fd: int, image: str, view: memoryview, offset: int) -> None:
    done = read_span(fd, image, view, offset)
    if done < len(view):
        raise CheckpointError(image, f"the image shrank while it was read (end at {offset + done})")


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
