"""A fixture page source: a pages checkpoint whose page data is kept as one file per
checksum chunk (``DIR/index.msgpack`` + ``DIR/chunks/00000000``, ``00000001``, ...).

It is the worked example of docs/DESIGN.md "Adding a page source": one module, and
one line (``register_source(ChunkDirSource)``) to make ``pageload restore DIR`` read
it.  It stands in for the sources to come (object storage, chunk stores): the pages
file is many files, so it has no :class:`~loader.source.LocalPages` (no kernel
copies, no mapping for the userfaultfd handler's direct copies); a read across chunk
files is one :data:`aio.Op.GATHER` with a file per piece.

It holds one descriptor per chunk file: a fixture for tests, not for a million chunks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence

import aio
from loader.checkpoint import CheckpointError, read_pages_index
from loader.source import CheckpointIdentity, LocalPages, file_digest, open_regular

INDEX = "index.msgpack"
CHUNKS = "chunks"


def make_chunk_dir(pages_checkpoint: str, out: str) -> str:
    """Split the pages checkpoint directory ``pages_checkpoint`` into a chunk directory at ``out``."""
    index = read_pages_index(os.path.join(pages_checkpoint, INDEX))
    os.makedirs(os.path.join(out, CHUNKS))
    shutil.copyfile(os.path.join(pages_checkpoint, INDEX), os.path.join(out, INDEX))
    with open(os.path.join(pages_checkpoint, "pages.img"), "rb") as pages:
        for k in range(len(index.checksums)):
            with open(chunk_path(out, k), "wb") as f:
                f.write(pages.read(index.chunk_size))
    return out


def chunk_path(directory: str, k: int) -> str:
    return os.path.join(directory, CHUNKS, f"{k:08d}")


class ChunkDirSource:
    """A chunk directory, open: every chunk file checked for its size."""

    kind = "chunkdir"
    holes_known = True
    local: LocalPages | None = None  # many files: reads go through requests only

    def __init__(self, path: str) -> None:
        self.path = path
        self.index = read_pages_index(os.path.join(path, INDEX))
        self.layout = self.index.layout
        self.chunk_size: int | None = self.index.chunk_size
        self.checksums = self.index.checksums
        size, end = self.index.chunk_size, self.index.pages_size
        self._fds: list[int] = []
        try:
            for k in range(len(self.checksums)):
                name = chunk_path(path, k)
                try:
                    fd = open_regular(name)
                except OSError as exc:
                    raise CheckpointError(name, exc.strerror or str(exc)) from None
                self._fds.append(fd)
                want = min(size, end - k * size)
                if os.fstat(fd).st_size != want:
                    raise CheckpointError(name, f"chunk {k} is {os.fstat(fd).st_size} bytes, not {want}")
        except BaseException:
            self.close()
            raise

    # -- registration: what open_source asks
    @classmethod
    def claims(cls, path: str) -> bool:
        return os.path.isdir(os.path.join(path, CHUNKS)) and os.path.isfile(os.path.join(path, INDEX))

    @classmethod
    def open(cls, path: str, *, scan: bool = True, direct: bool = False) -> ChunkDirSource:
        return cls(path)

    # -- PageSource
    def identity(self) -> CheckpointIdentity:
        layout = self.layout
        return CheckpointIdentity(self.kind, layout.memory_size, layout.page_size, file_digest(self.index.path))

    def extents(self) -> None:
        return None

    def _pieces(self, buffer: memoryview, file_offset: int) -> list[tuple[int, int, memoryview]]:
        """(fd, offset in its chunk file, part of ``buffer``) for pages-file bytes from
        ``file_offset`` on; past the last chunk, offsets past its end (read as short)."""
        size, last = self.index.chunk_size, len(self._fds) - 1
        pieces, start = [], 0
        while start < len(buffer):
            pos = file_offset + start
            k = min(pos // size, last)
            take = len(buffer) - start if k == last else min(len(buffer) - start, (k + 1) * size - pos)
            pieces.append((self._fds[k], pos - k * size, buffer[start : start + take]))
            start += take
        return pieces

    def _gather(self, id: int, pieces: list[tuple[int, int, memoryview]], urgent: bool,
                then: Callable[[], object] | None) -> aio.Request:
        return aio.Request.gather_read(id, pieces[0][0], [b for _, _, b in pieces], [o for _, o, _ in pieces],
                                       urgent=urgent, then=then, fds=[f for f, _, _ in pieces])

    def read(self, id: int, file_offset: int, buffers: Sequence[memoryview], *, urgent: bool = False,
             then: Callable[[], object] | None = None) -> aio.Request:
        pieces = []
        for buffer in buffers:
            pieces += self._pieces(buffer, file_offset)
            file_offset += len(buffer)
        return self._gather(id, pieces, urgent, then)

    def gather(self, id: int, buffers: Sequence[memoryview], offsets: Sequence[int], *,
               urgent: bool = False) -> aio.Request:
        pieces = []
        for buffer, offset in zip(buffers, offsets):
            pieces += self._pieces(buffer, offset)
        return self._gather(id, pieces, urgent, None)

    def read_now(self, queue: aio.Queue, buffer: memoryview, file_offset: int) -> int:
        done = 0
        for fd, offset, part in self._pieces(buffer, file_offset):
            got = queue.read_now(fd, part, offset)
            if got < 0:
                return done if done else -1
            done += got
            if got < len(part):
                break
        return done

    def read_now_v(self, queue: aio.Queue, buffers, file_offset: int) -> int:
        done = 0
        for buffer in buffers:
            got = self.read_now(queue, buffer, file_offset + done)
            if got < 0:
                return done if done else -1
            done += got
            if got < len(buffer):
                break
        return done

    def size(self) -> int:
        total = 0
        for fd in self._fds:
            n = os.fstat(fd).st_size
            total += n
            if n < self.index.chunk_size:
                break
        return total

    def files(self) -> tuple[str, ...]:
        return (self.index.path, *(chunk_path(self.path, k) for k in range(len(self._fds))))

    def data_estimate(self) -> int:
        return self.layout.data_bytes

    def describe(self) -> str:
        return f"chunk directory ({len(self._fds)} chunk files)"

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
