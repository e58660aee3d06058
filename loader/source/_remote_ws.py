"""A store's working set kept in the host chunk cache (docs/REMOTE.md, "Restoring from a
store"): a second restore of the same checkpoint from the same place makes no GET for it.

Two content-addressed entries (:meth:`~loader.remote.ChunkCache.insert_content`):

* the working set's bytes, under their own BLAKE3 (checked when read back: a wrong or
  truncated entry is dropped and the object GET again);
* a *pointer* of :data:`POINTER_BYTES`, under a BLAKE3 derived from the checkpoint's
  identity and the working set's URL and endpoint (not from its content): which working
  set that is (its length and BLAKE3), or that there is none, and when that was found.
  Its fields are checked on every read (a magic, the identity, an xxh3_64 of the rest): a
  pointer that fails is dropped.  "None there" is believed for :data:`ABSENT_S` only, so
  a working set pushed later is found within that time.

The daemon then checks the working set as it checks one it fetched (decoded, its
identity against the checkpoint's).  A working set replaced at the same place under the
same index (the same checkpoint) is not seen until the cache drops its entry (evicted,
or ``pageload cache prune --all``: content-addressed entries are not under the
checkpoint's identity).
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING

import xxhash

from .._memfile import private_mapping

if TYPE_CHECKING:
    from ..remote import ChunkCache

__all__ = ["ABSENT_S", "POINTER_BYTES", "keep_working_set", "kept_working_set", "pointer_key"]

#: how long a checkpoint found without a working set is believed to have none (seconds)
ABSENT_S = 600.0
_MAGIC = b"PLWSPTR1"
_POINTER = struct.Struct("<8sQQQQ32s")  # magic, identity, there (0/1), found at (unix ns), length, BLAKE3
POINTER_BYTES = _POINTER.size + 8  #: the fields and their xxh3_64
#: what :func:`kept_working_set` returns where the cache says the checkpoint has none
ABSENT = b""


def pointer_key(identity: int, url: str, endpoint: str | None) -> bytes:
    """The pointer's key: a BLAKE3 of the checkpoint's identity and where its working set is."""
    import blake3

    h = blake3.blake3(b"pageload working-set pointer v1\0")
    h.update(identity.to_bytes(8, "big"))
    h.update(f"{url}\0{endpoint or ''}".encode())
    return h.digest()


def kept_working_set(cache: ChunkCache, key: bytes, identity: int, max_bytes: int, *,
                     absent_s: float = ABSENT_S) -> bytes | None:
    """The working set the cache keeps for ``key``: its bytes (checked against their
    BLAKE3), :data:`ABSENT` where the checkpoint was found to have none less than
    ``absent_s`` ago, or None where the cache cannot say (then GET it)."""
    import blake3

    record = bytearray(POINTER_BYTES)
    if not cache.read_content_into(key, POINTER_BYTES, record):
        return None
    fields, check = bytes(record[:_POINTER.size]), int.from_bytes(record[_POINTER.size:], "little")
    magic, ident, there, found_ns, length, digest = _POINTER.unpack(fields)
    if magic != _MAGIC or ident != identity or there not in (0, 1) or xxhash.xxh3_64_intdigest(fields) != check \
            or (there and not 0 < length <= max_bytes):
        cache.drop_content(key, POINTER_BYTES)
        return None
    if not there:
        age = time.time() - found_ns / 1e9
        return ABSENT if 0 <= age < absent_s else None
    buffer = private_mapping(length)  # (not a heap object of its size; freed below)
    try:
        if not cache.read_content_into(digest, length, buffer):
            return None
        if blake3.blake3(buffer).digest() != digest:
            cache.drop_content(digest, length)
            return None
        return buffer[:]
    finally:
        buffer.close()


def keep_working_set(cache: ChunkCache, key: bytes, identity: int, data: bytes | None) -> bool:
    """Keep ``data`` (None: the checkpoint has no working set, as of now) for ``key``;
    whether the cache took it (it may not: no space, a bound smaller than it)."""
    import blake3

    if data:
        digest = blake3.blake3(data).digest()
        if not cache.insert_content(digest, data):
            return False
        fields = _POINTER.pack(_MAGIC, identity, 1, time.time_ns(), len(data), digest)
    else:
        fields = _POINTER.pack(_MAGIC, identity, 0, time.time_ns(), 0, bytes(32))
    record = fields + xxhash.xxh3_64_intdigest(fields).to_bytes(8, "little")
    return cache.insert_content(key, record)
