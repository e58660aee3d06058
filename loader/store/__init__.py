"""The chunk store: compressed, content-addressed snapshots in a local directory or a
bucket prefix (docs/FORMAT.md, section 3).

:mod:`loader.store._format` is the format both sides share: snapshot and chunk
names, the manifest (:func:`encode_manifest`, :func:`decode_manifest` with every
check a reader makes), the chunk hash (BLAKE3) and the codecs.  Writing snapshots,
copying them between stores and collecting unreferenced chunks live beside it;
reading one for a restore is a page source (``loader/source/``).
"""

from ._format import (
    CODEC_IDS,
    CODEC_LZ4,
    CODEC_NAMES,
    CODEC_NONE,
    CODEC_ZSTD,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    FORMAT,
    HASH_ALGORITHM,
    HASH_BYTES,
    MAX_CHUNK_SIZE,
    MAX_MANIFEST_BYTES,
    MIN_CHUNK_SIZE,
    VERSION,
    CheckpointError,
    Manifest,
    check_snapshot_name,
    chunk_hash,
    chunk_key,
    decode_manifest,
    encode_manifest,
    hash_of_chunk_key,
    looks_like_manifest,
    manifest_digest,
    max_stored_length,
    snapshot_key,
    split_snapshot_ref,
)

__all__ = [
    "CODEC_IDS",
    "CODEC_LZ4",
    "CODEC_NAMES",
    "CODEC_NONE",
    "CODEC_ZSTD",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_ZSTD_LEVEL",
    "FORMAT",
    "HASH_ALGORITHM",
    "HASH_BYTES",
    "MAX_CHUNK_SIZE",
    "MAX_MANIFEST_BYTES",
    "MIN_CHUNK_SIZE",
    "VERSION",
    "CheckpointError",
    "Manifest",
    "check_snapshot_name",
    "chunk_hash",
    "chunk_key",
    "decode_manifest",
    "encode_manifest",
    "hash_of_chunk_key",
    "looks_like_manifest",
    "manifest_digest",
    "max_stored_length",
    "snapshot_key",
    "split_snapshot_ref",
]
