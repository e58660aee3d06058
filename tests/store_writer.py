"""A test-only chunk-store writer (the reader's tests' own, independent of
``loader/store``'s writer): a memory image cut into chunks, all-zero ones left out,
each kept as ``chunks/HH/HASH`` (zstd, lz4 or raw), the manifest last.  Built on the
shared format module (:mod:`loader.store._format`) and, for lz4, the frame writer
(:mod:`loader.store._lz4`; tests/store_reference.py reads those frames with another
LZ4 frame decoder)."""

from __future__ import annotations

import os
from array import array

import xxhash
import zstandard

from loader.store import (
    CODEC_LZ4,
    CODEC_NONE,
    CODEC_ZSTD,
    Manifest,
    chunk_hash,
    chunk_key,
    encode_manifest,
    snapshot_key,
)
from loader.store._lz4 import encode_into, scratch_length


def snapshot_from(memory: bytes, *, chunk_size: int = 64 << 10, page_size: int = 4096, codec: str = "zstd",
                  parent: str | None = None, parent_digest: bytes | None = None) -> tuple[Manifest, dict[str, bytes]]:
    """The manifest of ``memory`` and its chunk objects (key -> stored bytes)."""
    comp = zstandard.ZstdCompressor(level=3)
    offsets, lengths, stored, xxh = array("Q"), array("I"), array("I"), array("Q")
    codecs, hashes = bytearray(), bytearray()
    objects: dict[str, bytes] = {}
    view = memoryview(memory)
    for at in range(0, len(memory), chunk_size):
        piece = view[at : at + chunk_size]
        if not any(piece):
            continue
        digest = chunk_hash(piece)
        if codec == "zstd":
            body, cid = comp.compress(piece), CODEC_ZSTD
        elif codec == "lz4":
            out = bytearray(scratch_length(len(piece)))
            body, cid = bytes(out[: encode_into(piece, memoryview(out))]), CODEC_LZ4
            if len(body) >= len(piece):
                body, cid = bytes(piece), CODEC_NONE
        else:
            body, cid = bytes(piece), CODEC_NONE
        objects[chunk_key(digest)] = body
        offsets.append(at)
        lengths.append(len(piece))
        stored.append(len(body))
        xxh.append(xxhash.xxh3_64_intdigest(piece))
        codecs.append(cid)
        hashes += digest
    digest = (parent_digest or bytes(32)) if parent else None
    manifest = Manifest(len(memory), page_size, chunk_size, offsets, lengths, stored, bytes(codecs), bytes(hashes),
                        xxh, parent, digest, 1_700_000_000, "tests/store_writer.py")
    return manifest, objects


def write_local(store: str, name: str, memory: bytes, **kw) -> str:
    """Write snapshot ``name`` of ``memory`` into the local store ``store``; returns
    ``STORE/snapshots/NAME``."""
    manifest, objects = snapshot_from(memory, **kw)
    for key, body in objects.items():
        path = os.path.join(store, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(body)
    os.makedirs(os.path.join(store, "snapshots"), exist_ok=True)
    ref = os.path.join(store, snapshot_key(name))
    with open(ref, "wb") as f:
        f.write(encode_manifest(manifest))
    return ref


def write_remote(objects_store, name: str, memory: bytes, **kw) -> None:
    """The same into an :class:`~loader.remote.ObjectStore` rooted at the store."""
    manifest, objects = snapshot_from(memory, **kw)
    for key, body in objects.items():
        objects_store.put_bytes(key, body)
    objects_store.put_bytes(snapshot_key(name), encode_manifest(manifest))
