"""The tests' reference reader of a chunk-store snapshot: simple, whole-memory, every
check made (kept apart from the real reader, loader/source/, on purpose)."""

from __future__ import annotations

import cramjam
import zstandard

from loader.store import CODEC_LZ4, CODEC_ZSTD, chunk_hash
from loader.store._access import ChunkStore
from loader.store._write import read_manifest


def assemble(store: ChunkStore, name: str) -> bytes:
    """The snapshot's memory, from its manifest and chunks, every chunk's size,
    decompression and BLAKE3 checked."""
    m, _ = read_manifest(store, name)
    memory = bytearray(m.memory_size)
    for i in range(len(m)):
        raw = store.get(m.key_at(i), 1 << 30)
        assert len(raw) == m.stored_lengths[i]
        if m.codecs[i] == CODEC_ZSTD:
            data = zstandard.ZstdDecompressor().decompress(raw)
        elif m.codecs[i] == CODEC_LZ4:  # a standard LZ4 frame: any frame decoder reads it
            data = bytes(cramjam.lz4.decompress(raw))
        else:
            data = raw
        assert len(data) == m.lengths[i] and chunk_hash(data) == m.hash_at(i)
        memory[m.offsets[i] : m.offsets[i] + len(data)] = data
    return bytes(memory)
