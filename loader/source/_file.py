"""A source that is one local file: the pages at the layout's file offsets."""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import aio

from ..core._identity import CheckpointIdentity, layout_digest
from ..core._layout import Layout
from ._base import LocalPages

if TYPE_CHECKING:
    from ..core._extents import ExtentSource

__all__ = ["FileSource"]


class FileSource:
    """The pages file ``fd`` (open read-only), laid out as ``layout`` says, with
    ``checksums`` per ``chunk_size`` bytes where given (``extents``: where its data
    is, found as the loader goes).  The base of the raw image and
    the pages checkpoint sources, and a source of its own for a layout and a file at
    hand (tests, benchmarks).  ``owns_fd``: :meth:`close` closes it."""

    kind = "file"
    #: :meth:`gather` takes ``within`` (the loader's mapping: ranges read by address, a
    #: batch a system call; :mod:`aio._batch`)
    gathers_within = True

    def __init__(self, layout: Layout, fd: int, *, chunk_size: int | None = None,
                 checksums: Sequence[int] | None = None, path: str = "", direct: bool = False,
                 owns_fd: bool = False, extents: ExtentSource | None = None) -> None:
        self.layout = layout
        self.chunk_size = chunk_size
        self.checksums: array[int] | None = (
            None if checksums is None else checksums if isinstance(checksums, array) else array("Q", checksums))
        self.local: LocalPages | None = LocalPages(fd, path, direct)
        self._fd = fd
        self._owns_fd = owns_fd
        self._extents = extents
        self.holes_known = extents is None

    def identity(self) -> CheckpointIdentity:
        layout = self.layout
        return CheckpointIdentity(self.kind, layout.memory_size, layout.page_size, layout_digest(layout))

    def extents(self) -> ExtentSource | None:
        return self._extents

    def read(self, id: int, file_offset: int, buffers: Sequence[memoryview], *, urgent: bool = False,
             then: Callable[[], object] | None = None) -> aio.Request:
        if len(buffers) == 1:
            return aio.Request.read(id, self._fd, file_offset, buffers[0], urgent=urgent, then=then)
        return aio.Request.readv(id, self._fd, file_offset, buffers, urgent=urgent, then=then)

    def gather(self, id: int, buffers: Sequence[memoryview], offsets: Sequence[int], *,
               urgent: bool = False, within: memoryview | None = None) -> aio.Request:
        return aio.Request.gather_read(id, self._fd, buffers, offsets, urgent=urgent, within=within)

    def read_now(self, queue: aio.Queue, buffer: memoryview, file_offset: int) -> int:
        return queue.read_now(self._fd, buffer, file_offset)

    def read_now_v(self, queue: aio.Queue, buffers: Sequence[memoryview], file_offset: int) -> int:
        return queue.read_now_v(self._fd, buffers, file_offset)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def files(self) -> tuple[str, ...]:
        return (self.local.path,) if self.local is not None and self.local.path else ()

    def data_estimate(self) -> int:
        return self.layout.data_bytes

    def describe(self) -> str:
        return f"{self.kind} checkpoint"

    def close(self) -> None:
        if self._owns_fd and self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
