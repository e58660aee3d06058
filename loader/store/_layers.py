"""Layers: a child snapshot from a Firecracker diff snapshot (a sparse memory file whose
data extents are the pages dirtied since its parent) and the parent's manifest.

The child's table is the parent's, row for row, except the chunks a dirtied page falls
in: each of those is rebuilt from the parent's chunk (fetched, decompressed and checked
against its BLAKE3) or zeros where the parent has none, with the diff's data extents
laid over it.  Only the diff's *data* is read: its holes are "unchanged", not zero.
"""

from __future__ import annotations

import threading
from array import array
from bisect import bisect_left, bisect_right

import zstandard

from .._files import CheckpointError
from ._access import ChunkStore
from ._format import CODEC_LZ4, CODEC_ZSTD, Manifest, chunk_hash, max_stored_length
from ._lz4 import decode_into as lz4_decode_into

__all__ = ["ParentChunks", "extents_in", "unpack_chunk"]


class ParentChunks:
    """The parent's chunks, by memory offset, read into a caller's buffer."""

    def __init__(self, store: ChunkStore, manifest: Manifest, name: str) -> None:
        self.store = store
        self.manifest = manifest
        self.name = name
        self._row = {off: i for i, off in enumerate(manifest.offsets)}
        self._local = threading.local()

    def _staging(self, size: int) -> memoryview:
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._local.buf = bytearray(size)
        return memoryview(buf)

    def fill(self, offset: int, dest: memoryview) -> bool:
        """The parent's bytes of the chunk at ``offset`` into ``dest`` (its length);
        False (``dest`` untouched) where the parent has no chunk there (zero memory)."""
        i = self._row.get(offset)
        if i is None:
            return False
        m = self.manifest
        key = m.key_at(i)
        stored, length, codec = m.stored_lengths[i], m.lengths[i], m.codecs[i]
        if length != len(dest):
            raise CheckpointError(self.store.url_of(key), f"parent chunk is {length} bytes, not {len(dest)}")
        staging = self._staging(max_stored_length(codec, length))
        got = self.store.read_into(key, staging[: max_stored_length(codec, length)])
        if got != stored:
            raise CheckpointError(self.store.url_of(key), f"{got} bytes, not the {stored} the snapshot "
                                  f"{self.name} says")
        unpack_chunk(staging[:stored], codec, dest, m.hash_at(i), self.store.url_of(key))
        return True


def unpack_chunk(stored: memoryview, codec: int, dest: memoryview, digest: bytes, where: str) -> None:
    """A chunk object's bytes (``stored``) decompressed into ``dest`` (exactly its
    length) and checked against its BLAKE3 ``digest``; ``CheckpointError`` otherwise."""
    length = len(dest)
    if codec == CODEC_ZSTD:
        done = 0
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(stored)
            while done < length:
                n = reader.readinto(dest[done:])
                if n == 0:
                    break
                done += n
            if done == length and reader.read(1):
                done += 1  # more than the chunk: refused below
        except zstandard.ZstdError as exc:
            raise CheckpointError(where, f"does not decompress: {exc}") from None
        if done != length:
            raise CheckpointError(where, f"decompresses to {'more than ' if done > length else ''}"
                                  f"{min(done, length)} bytes, not {length}")
    elif codec == CODEC_LZ4:
        try:
            lz4_decode_into(stored, dest)
        except ValueError as exc:
            raise CheckpointError(where, f"does not decompress: {exc}") from None
    elif len(stored) == length:
        dest[:] = stored
    else:
        raise CheckpointError(where, f"{len(stored)} bytes stored raw, not {length}")
    if chunk_hash(dest) != digest:
        raise CheckpointError(where, "its bytes do not match its BLAKE3 hash (the chunk is corrupt)")


def extents_in(starts: array[int], ends: array[int], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of the sorted, disjoint extents ``[starts[i], ends[i])`` inside ``[lo, hi)``."""
    first = bisect_right(ends, lo)
    last = bisect_left(starts, hi)
    return [(max(lo, starts[j]), min(hi, ends[j])) for j in range(first, last)]
