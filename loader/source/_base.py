"""The seam under the loader: a :class:`PageSource` (where pages come from), the twin
of :class:`~loader._memfile.Destination` (where they go).

A source gives its layout (memory ranges and where each lies in the source's byte
stream, "the pages file"), its chunks and their checksums where it has them, and
its identity; and it turns "these bytes of the pages file into these buffers" into
:mod:`aio` requests, which the loader's queue runs.  The loader, the working-set
code and the userfaultfd handler see only this interface: no checkpoint kinds, no
bare file descriptors.

An optional attribute: ``decodes_whole_chunks = True`` says that reading any byte of a
checksum chunk costs decoding all of it (a chunk store's compressed chunks); the
loader then rounds its reads up to whole chunks (``read_size`` and ``sweep_read_size``:
a waiter's read as well as the sweep's, or one fault would decode its chunk once per
piece).

One capability is optional: :class:`LocalPages`, a source that is one local file
the kernel can read from directly (copied file to file in the kernel, mapped
read-only for the userfaultfd handler's direct copies, asked about its page cache).
A source without it (many files, a network store) is read only through its
requests.  So is one method, :class:`ExplainsFailures`: a source that knows why a read
failed (a store's message) says so, and the loader fails its waiters with that.

Adding a source: one module with a class that implements :class:`PageSource` plus
``claims``/``open`` class methods, and one line, ``register_source(TheClass)``
(docs/DESIGN.md "Adding a page source" walks through one).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aio

from ..core._identity import CheckpointIdentity
from ..core._layout import Layout

if TYPE_CHECKING:
    from ..core._extents import ExtentSource

__all__ = ["ExplainsFailures", "LocalPages", "PageSource"]


@dataclass(frozen=True, slots=True)
class LocalPages:
    """A source's pages file as one local regular file, open read-only (the optional
    capability of :class:`PageSource`).  ``direct``: opened with ``O_DIRECT``."""

    fd: int
    path: str
    direct: bool = False

    def copy(self, id: int, offset: int, dest_fd: int, dest: Sequence[tuple[int, int]], *, urgent: bool = False,
             gather: bool = False, then: Callable[[], object] | None = None) -> aio.Request:
        """An :data:`aio.Op.COPY` of the pages file's bytes into ``dest_fd`` (see
        :meth:`aio.Request.copy`)."""
        return aio.Request.copy(id, self.fd, offset, dest_fd, dest, urgent=urgent, gather=gather, then=then)

    def size(self) -> int:
        return os.fstat(self.fd).st_size


class PageSource(Protocol):
    """Where a restore's pages come from."""

    #: a short name for logs and for the identity (``raw``, ``pages``, ...)
    kind: str
    #: the memory ranges and where each lies in the pages file (validated)
    layout: Layout
    #: bytes of the pages file per checksum, and one xxh3_64 per chunk (None: unverified)
    chunk_size: int | None
    checksums: array[int] | None
    #: the optional capability: one local file (None: reads only through requests)
    local: LocalPages | None
    #: whether the layout already excludes every hole (False: :meth:`extents` finds them)
    holes_known: bool

    def identity(self) -> CheckpointIdentity:
        """Which checkpoint this is (working sets are recorded for one)."""
        ...

    def extents(self) -> ExtentSource | None:
        """Where the data is, found as the loader goes; None: the layout says it."""
        ...

    def read(self, id: int, file_offset: int, buffers: Sequence[memoryview], *, urgent: bool = False,
             then: Callable[[], object] | None = None) -> aio.Request:
        """A request reading the pages file's bytes from ``file_offset`` on into
        ``buffers``, in order; its result counts them in order (short at a failure)."""
        ...

    def gather(self, id: int, buffers: Sequence[memoryview], offsets: Sequence[int], *,
               urgent: bool = False) -> aio.Request:
        """A request reading each of ``buffers`` from its own offset of the pages file
        (ascending, apart); the queue must take :data:`aio.Op.GATHER`."""
        ...

    def read_now(self, queue: aio.Queue, buffer: memoryview, file_offset: int) -> int:
        """Read ``buffer`` at once if that cannot block (:meth:`aio.Queue.read_now`):
        the bytes read, or -1 (then make a request)."""
        ...

    def read_now_v(self, queue: aio.Queue, buffers: Sequence[memoryview], file_offset: int) -> int:
        """:meth:`read_now` into ``buffers``, one after the other from ``file_offset``
        (:meth:`aio.Queue.read_now_v`: a verified chunk's pieces in one system call):
        the bytes read (fewer where one was short), or -1."""
        ...

    def size(self) -> int:
        """The pages file's bytes that can be read now (a source that shrank reads
        short there); raises OSError."""
        ...

    def files(self) -> tuple[str, ...]:
        """Local paths this source reads (the memory file must not be one of them)."""
        ...

    def data_estimate(self) -> int:
        """About how many bytes of data the layout holds (exact once the holes are known)."""
        ...

    def describe(self) -> str:
        """One line for the start-up log: what this source is."""
        ...

    def close(self) -> None:
        """Close what the source holds open; idempotent."""
        ...


class ExplainsFailures(Protocol):
    """The optional method of a :class:`PageSource` that knows why its reads fail (the
    loader looks for it with ``getattr``; a source without it gets the loader's own
    mapping: ``io-error`` with the read's errno)."""

    def failure(self, file_offset: int, length: int, err: int) -> tuple[str, str] | None:
        """Why a read of the pages file's ``[file_offset, file_offset + length)`` failed
        for good with errno ``err`` (past the loader's retries, narrowed down to one
        page): ``(code, reason)`` for its waiters (a :mod:`protocol.codes` code, one
        line), or None for the loader's own mapping.  Called in the loader's task: no
        blocking."""
        ...
