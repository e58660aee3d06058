"""The request-building half of a page source whose reads are :data:`aio.Op.CALL`
requests run in the queue's worker threads (a checkpoint in object storage, a chunk
store's snapshot): :class:`CallSource`, the part those sources share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import aio

from ..core._identity import CheckpointIdentity

if TYPE_CHECKING:
    from ..core._extents import ExtentSource
    from ..core._layout import Layout

__all__ = ["CallSource"]


class CallSource:
    """Identity, extents and requests of a source read only through calls: a subclass
    sets ``kind``, ``layout``, ``_digest`` (its identity's digest) and ``_size`` (its
    pages file's bytes) and implements :meth:`_call`, run in a worker thread."""

    kind: str
    layout: Layout
    _digest: int
    _size: int

    def _call(self, lo: int, buffers: Sequence[memoryview], urgent: bool = False) -> int:
        """Put the pages file's bytes from ``lo`` on into ``buffers``: the bytes put, in
        order (short at the first failure), or -errno."""
        raise NotImplementedError

    def identity(self) -> CheckpointIdentity:
        layout = self.layout
        return CheckpointIdentity(self.kind, layout.memory_size, layout.page_size, self._digest)

    def extents(self) -> ExtentSource | None:
        return None

    def read(self, id: int, file_offset: int, buffers: Sequence[memoryview], *, urgent: bool = False,
             then: Callable[[], object] | None = None) -> aio.Request:
        def fetch(parts: Sequence[memoryview]) -> int:
            return self._call(file_offset, parts, urgent)

        return aio.Request.call(id, fetch, buffers, urgent=urgent, then=then, offset=file_offset)

    def gather(self, id: int, buffers: Sequence[memoryview], offsets: Sequence[int], *,
               urgent: bool = False) -> aio.Request:
        """Each buffer from its own offset, one after the other, as one call."""
        spans = list(zip(offsets, buffers))

        def fetch(parts: Sequence[memoryview]) -> int:
            done = 0
            for (offset, _), part in zip(spans, parts):
                got = self._call(offset, [part], urgent)
                if got < 0:
                    return done if done else got
                done += got
                if got < len(part):
                    break
            return done

        return aio.Request.call(id, fetch, buffers, urgent=urgent, offset=offsets[0] if offsets else 0)

    def read_now(self, queue: aio.Queue, buffer: memoryview, file_offset: int) -> int:
        return -1  # every read may wait (on the network, on decompression): a request

    def read_now_v(self, queue: aio.Queue, buffers: Sequence[memoryview], file_offset: int) -> int:
        return -1

    def size(self) -> int:
        return self._size
