"""The chunk store's format: names, the manifest (encode, and a decode that checks
everything), the chunk hash and the codecs.  docs/FORMAT.md section 3 is the spec.

A store is a local directory or a bucket prefix holding::

    chunks/HH/HASH       one chunk: its bytes as stored (compressed with its codec, or raw)
    snapshots/NAME       one snapshot's manifest (msgpack), written after all its chunks

``HASH`` is the 64-character lowercase hex BLAKE3 of the chunk's *uncompressed*
bytes, ``HH`` its first two characters.  A manifest is input from outside:
:func:`decode_manifest` refuses anything malformed with one line
(:class:`CheckpointError`), checking whole columns at once (NumPy), never a Python
object per chunk beyond the final arrays.
"""

from __future__ import annotations

import re
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any

import blake3
import msgpack

from .._files import CheckpointError
from ._lz4 import BLOCK as LZ4_BLOCK
from ._lz4 import FRAME_OVERHEAD as LZ4_FRAME_OVERHEAD
from ._lz4 import MAGIC as LZ4_MAGIC
from ._lz4 import max_encoded_length

__all__ = [
    "CHUNKS_DIR",
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
    "READS",
    "SNAPSHOTS_DIR",
    "VERSION",
    "ZSTD_MAGIC",
    "CheckpointError",
    "Manifest",
    "check_snapshot_name",
    "chunk_hash",
    "chunk_key",
    "codec_of_object",
    "decode_manifest",
    "encode_manifest",
    "hash_of_chunk_key",
    "looks_like_manifest",
    "manifest_digest",
    "max_stored_length",
    "snapshot_key",
    "split_snapshot_ref",
]

FORMAT = "pageload-store"  #: the manifest's ``"format"`` value, its magic
VERSION = 1  #: the manifest version this code writes
READS = (1,)  #: the versions this code reads
HASH_ALGORITHM = "blake3"
HASH_BYTES = 32
CHUNKS_DIR = "chunks"
SNAPSHOTS_DIR = "snapshots"

#: codec ids in the manifest's ``codecs`` column
CODEC_NONE, CODEC_ZSTD, CODEC_LZ4 = 0, 1, 2
#: the codecs this code reads and writes, by id (docs/FORMAT.md, "Codecs"); ``lz4`` is
#: an LZ4 frame of the subset :mod:`loader.store._lz4` writes
CODEC_NAMES = {CODEC_NONE: "none", CODEC_ZSTD: "zstd", CODEC_LZ4: "lz4"}
CODEC_IDS = {name: cid for cid, name in CODEC_NAMES.items()}
DEFAULT_ZSTD_LEVEL = 3
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  #: a zstd frame's first four bytes

#: the chunk size ``create`` uses unless told (docs/FORMAT.md, "Chunk size": measured)
DEFAULT_CHUNK_SIZE = 2 << 20
MIN_CHUNK_SIZE = 64 << 10  #: a reader refuses smaller chunks (a table row per 64 KiB at most)
MAX_CHUNK_SIZE = 64 << 20  #: and bigger ones (a reader's buffers are a few chunks)
MAX_MANIFEST_BYTES = 64 << 20  #: a reader refuses bigger manifests before decoding them
MAX_SOURCE_CHARS = 4096  #: the free-text ``source`` field
_MIN_PAGE, _MAX_PAGE = 512, 1 << 30
_LZ4_BLOCK = LZ4_BLOCK  #: the lz4 frames' block size (whole columns are checked against the bound)
_LZ4_FRAME = LZ4_FRAME_OVERHEAD  #: an lz4 frame's header and end mark
_U64 = 1 << 64

#: snapshot names: a path segment that is safe everywhere (no '/', no leading '.')
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_CHUNK_KEY = re.compile(r"chunks/([0-9a-f]{2})/([0-9a-f]{64})")
_MAGIC = msgpack.packb("format") + msgpack.packb(FORMAT)

if array("I").itemsize != 4:  # pragma: no cover (every platform Python runs on has a 4-byte unsigned int)
    raise ImportError("array('I') is not 4 bytes on this platform")


@dataclass(frozen=True, slots=True, eq=False)
class Manifest:
    """One snapshot: its memory's geometry and its chunk table, as columns (row *i* is
    one stored chunk; memory not covered by a row is zero)."""

    memory_size: int
    page_size: int
    chunk_size: int
    offsets: array[int]  #: ``'Q'``: each chunk's memory offset, ascending, multiples of ``chunk_size``
    lengths: array[int]  #: ``'I'``: its uncompressed length (``chunk_size``, or the short last chunk)
    stored_lengths: array[int]  #: ``'I'``: the size of its object as stored
    codecs: bytes  #: one codec id per chunk (:data:`CODEC_NAMES`)
    hashes: bytes  #: ``HASH_BYTES`` per chunk: BLAKE3 of the uncompressed bytes
    xxh3: array[int]  #: ``'Q'``: xxh3_64 (seed 0) of the uncompressed bytes
    parent: str | None = None  #: the parent snapshot's name (lineage and gc), or None
    parent_digest: bytes | None = None  #: :func:`manifest_digest` of the parent's manifest
    created: int = 0  #: unix seconds
    source: str | None = None  #: free text: where it came from
    extra: dict[str, Any] = field(default_factory=dict)  #: unknown keys, kept (not written back)

    def __len__(self) -> int:
        return len(self.offsets)

    def hash_at(self, i: int) -> bytes:
        return self.hashes[HASH_BYTES * i : HASH_BYTES * (i + 1)]

    def key_at(self, i: int) -> str:
        """Row ``i``'s object name in the store (``chunks/HH/HASH``)."""
        return chunk_key(self.hash_at(i))

    @property
    def data_bytes(self) -> int:
        """Uncompressed bytes held in chunks (the rest of memory is zero)."""
        return sum(self.lengths)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the chunk objects it names (a chunk named twice counted twice)."""
        return sum(self.stored_lengths)

    def unique_keys(self) -> set[str]:
        """The distinct chunk objects it needs."""
        return {self.key_at(i) for i in range(len(self))}


def chunk_hash(buffer: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3 (32 bytes) of ``buffer``; releases the GIL while it hashes."""
    return blake3.blake3(buffer).digest()


def manifest_digest(data: bytes) -> bytes:
    """A manifest's identity, for a child's ``parent_digest``: BLAKE3 of its bytes."""
    return blake3.blake3(data).digest()


def chunk_key(digest: bytes) -> str:
    """The object name of the chunk whose hash is ``digest``: ``chunks/HH/HASH``."""
    if len(digest) != HASH_BYTES:
        raise ValueError(f"a chunk hash is {HASH_BYTES} bytes, not {len(digest)}")
    h = digest.hex()
    return f"{CHUNKS_DIR}/{h[:2]}/{h}"


def hash_of_chunk_key(key: str) -> bytes | None:
    """The hash a chunk object's name (relative to the store) holds; None for any other name."""
    m = _CHUNK_KEY.fullmatch(key)
    if m is None or m.group(2)[:2] != m.group(1):
        return None
    return bytes.fromhex(m.group(2))


def check_snapshot_name(name: str) -> str:
    """``name`` if it is a snapshot name (``[A-Za-z0-9._-]{1,128}``, not starting with
    ``.``); ``ValueError`` with one line otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{name!r:.140} is not a snapshot name (1-128 of A-Z a-z 0-9 . _ -, "
                         "not starting with '.')")
    return name


def snapshot_key(name: str) -> str:
    """The object name of snapshot ``name``'s manifest: ``snapshots/NAME``."""
    return f"{SNAPSHOTS_DIR}/{check_snapshot_name(name)}"


def split_snapshot_ref(ref: str) -> tuple[str, str] | None:
    """``(STORE, NAME)`` for a snapshot named as ``STORE/snapshots/NAME`` (a local path,
    ``s3://BUCKET/PREFIX/snapshots/NAME`` or ``file:///DIR/snapshots/NAME``); None when
    ``ref`` does not have that shape.  STORE keeps its form (a path stays a path; an
    empty local store is ``.``); a trailing ``/`` is not a snapshot."""
    head, sep, name = ref.rpartition("/")
    if not sep or not _NAME.fullmatch(name):
        return None
    store, sep, last = head.rpartition("/")
    if last != SNAPSHOTS_DIR:
        return None
    if not sep:
        return (".", name)
    if store.endswith(":/") or store.endswith(":"):  # s3://snapshots/NAME: a bucket, no store prefix
        return None
    if "://" in store and store.split("://", 1)[1] == "":
        return None
    return (store or "/", name)


def looks_like_manifest(head: bytes) -> bool:
    """Whether an object starting with ``head`` (its first 64 bytes or so) is a manifest."""
    return _MAGIC in head[:48]


def max_stored_length(codec: int, length: int) -> int:
    """The most bytes a chunk of ``length`` uncompressed bytes may take as stored with
    ``codec``: ``length`` for ``none``; zstd's ``ZSTD_COMPRESSBOUND`` for ``zstd``; for
    ``lz4`` a frame whose blocks are all stored uncompressed."""
    if codec == CODEC_ZSTD:
        small = (128 << 10) - length >> 11 if length < 128 << 10 else 0
        return length + (length >> 8) + small
    if codec == CODEC_LZ4:
        return max_encoded_length(length)
    return length


def codec_of_object(size: int, length: int, head: bytes) -> int | None:
    """The codec of a chunk object of ``size`` bytes for a chunk of ``length``, from its
    first bytes ``head`` (four at least): ``none`` exactly when its size is the chunk's
    length, else (smaller: a writer stores a chunk compressed only when that makes it
    smaller) told by the frame's magic; None for an object that is none of these (damaged)."""
    if size == length:
        return CODEC_NONE
    for codec, magic in ((CODEC_ZSTD, ZSTD_MAGIC), (CODEC_LZ4, LZ4_MAGIC)):
        if head[:4] == magic and 0 < size < length:
            return codec
    return None


# -- encode -------------------------------------------------------------------------


def _le(col: array[int]) -> bytes:
    if sys.byteorder == "little":
        return col.tobytes()
    swapped = array(col.typecode, col)
    swapped.byteswap()
    return swapped.tobytes()


def encode_manifest(m: Manifest) -> bytes:
    """The manifest object's bytes for ``m`` (``"format"`` first).  ``m`` is checked
    as a reader checks it (``CheckpointError`` naming ``"manifest"``): a writer never
    stores what a reader would refuse."""
    obj: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "memory_size": m.memory_size,
        "page_size": m.page_size,
        "chunk_size": m.chunk_size,
        "hash": HASH_ALGORITHM,
        "parent": m.parent,
        "parent_digest": m.parent_digest,
        "created": m.created,
        "chunk_offsets": _le(m.offsets),
        "chunk_lengths": _le(m.lengths),
        "stored_lengths": _le(m.stored_lengths),
        "codecs": bytes(m.codecs),
        "hashes": bytes(m.hashes),
        "xxh3": _le(m.xxh3),
    }
    if m.source is not None:
        obj["source"] = m.source
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    decode_manifest(data, "manifest")
    return data


# -- decode -------------------------------------------------------------------------


def decode_manifest(data: bytes | bytearray | memoryview, path: str) -> Manifest:
    """Parse and check a manifest; :class:`CheckpointError` (``path``: what is wrong,
    one line) for anything a reader refuses (docs/FORMAT.md, section 3, "Checks")."""
    try:
        return _decode(bytes(data))
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from None


def _decode(data: bytes) -> Manifest:
    n = len(data)
    if n > MAX_MANIFEST_BYTES:
        raise ValueError(f"manifest is {n} bytes, more than the {MAX_MANIFEST_BYTES} a reader accepts")
    if n == 0:
        raise ValueError("empty manifest")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, max_str_len=n,
                              max_bin_len=n, max_array_len=n, max_map_len=n, max_ext_len=0)
    except msgpack.ExtraData:
        raise ValueError("not a manifest: trailing bytes after the msgpack map") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        if "incomplete" in str(exc):
            raise ValueError("truncated manifest: the msgpack data ends early") from None
        raise ValueError(f"not a msgpack manifest ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"not a manifest: the msgpack data is {_a(type(obj).__name__)}, not a map")
    if obj.get("format") != FORMAT:
        raise ValueError(f'not a pageload store manifest (no "format": "{FORMAT}" field)')
    version = _int(obj, "version")
    if version not in READS:
        raise ValueError(f"unsupported store manifest version {version} (this pageload reads version "
                         f"{' and '.join(map(str, READS))})")
    page_size = _int(obj, "page_size")
    if not (_MIN_PAGE <= page_size <= _MAX_PAGE and page_size & (page_size - 1) == 0):
        raise ValueError(f"page_size {page_size} is not a power of two from {_MIN_PAGE} to {_MAX_PAGE}")
    chunk_size = _int(obj, "chunk_size")
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size & (chunk_size - 1) == 0):
        raise ValueError(f"chunk_size {chunk_size} is not a power of two from {MIN_CHUNK_SIZE} "
                         f"to {MAX_CHUNK_SIZE}")
    if chunk_size % page_size:
        raise ValueError(f"chunk_size {chunk_size} is not a multiple of the page size {page_size}")
    memory_size = _int(obj, "memory_size", minimum=1)
    if memory_size % page_size:
        raise ValueError(f"memory_size {memory_size} is not a multiple of the page size {page_size}")
    if obj.get("hash") != HASH_ALGORITHM:
        raise ValueError(f"unknown hash {obj.get('hash')!r:.40} (expected {HASH_ALGORITHM!r})")
    parent = obj.get("parent")
    digest = obj.get("parent_digest")
    if parent is not None:
        if not isinstance(parent, str) or not _NAME.fullmatch(parent):
            raise ValueError(f"field 'parent' is {parent!r:.60}, not a snapshot name")
        if not isinstance(digest, bytes) or len(digest) != HASH_BYTES:
            raise ValueError(f"field 'parent_digest' is not {HASH_BYTES} bytes (the parent's manifest digest)")
    elif digest is not None:
        raise ValueError("field 'parent_digest' is set but 'parent' is not")
    created = _int(obj, "created")
    source = obj.get("source")
    if source is not None and (not isinstance(source, str) or len(source) > MAX_SOURCE_CHARS):
        raise ValueError(f"field 'source' is not text of at most {MAX_SOURCE_CHARS} characters")
    offsets = _column(obj, "chunk_offsets", 8, None)
    rows = len(offsets)
    lengths = _column(obj, "chunk_lengths", 4, rows)
    stored = _column(obj, "stored_lengths", 4, rows)
    codecs = _bytes_column(obj, "codecs", 1, rows)
    hashes = _bytes_column(obj, "hashes", HASH_BYTES, rows)
    xxh3 = _column(obj, "xxh3", 8, rows)
    _check_table(offsets, lengths, stored, codecs, memory_size, chunk_size)
    known = {"format", "version", "memory_size", "page_size", "chunk_size", "hash", "parent", "parent_digest",
             "created", "source", "chunk_offsets", "chunk_lengths", "stored_lengths", "codecs", "hashes", "xxh3"}
    extra = {k: v for k, v in obj.items() if k not in known}
    return Manifest(memory_size, page_size, chunk_size, offsets, lengths, stored, codecs, hashes, xxh3,
                    parent, digest if parent is not None else None, created, source, extra)


def _check_table(offsets: array[int], lengths: array[int], stored: array[int], codecs: bytes,
                 memory_size: int, chunk_size: int) -> None:
    """The chunk table's rows against each other and the memory (whole columns at once)."""
    if not offsets:
        return
    import numpy

    off = numpy.frombuffer(offsets, dtype=numpy.uint64)
    ln = numpy.frombuffer(lengths, dtype=numpy.uint32).astype(numpy.uint64)
    st = numpy.frombuffer(stored, dtype=numpy.uint32).astype(numpy.uint64)
    cd = numpy.frombuffer(codecs, dtype=numpy.uint8)
    bad = numpy.flatnonzero(off % numpy.uint64(chunk_size))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"chunk {i} at memory {int(off[i]):#x} is not aligned to the chunk size {chunk_size:#x}")
    bad = numpy.flatnonzero(off[1:] <= off[:-1])
    if len(bad):
        i = int(bad[0]) + 1
        raise ValueError(f"chunk {i} at memory {int(off[i]):#x} is not after chunk {i - 1} "
                         f"({int(off[i - 1]):#x}): offsets must ascend")
    if int(off[-1]) >= memory_size:
        raise ValueError(f"chunk {len(off) - 1} at memory {int(off[-1]):#x} is past the memory size "
                         f"{memory_size:#x}")
    want = numpy.minimum(numpy.uint64(chunk_size), numpy.uint64(memory_size) - off)
    bad = numpy.flatnonzero(ln != want)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"chunk {i} at memory {int(off[i]):#x} is {int(ln[i])} bytes long, not {int(want[i])} "
                         "(only the last chunk of memory may be short)")
    bad = numpy.flatnonzero(numpy.isin(cd, numpy.array(sorted(CODEC_NAMES), dtype=numpy.uint8), invert=True))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"chunk {i} has unknown codec {int(cd[i])}")
    zstd = cd == CODEC_ZSTD
    lz4 = cd == CODEC_LZ4
    small = numpy.where(ln < 128 << 10, ((128 << 10) - ln) >> numpy.uint64(11), numpy.uint64(0))
    blocks = numpy.maximum((ln + numpy.uint64(_LZ4_BLOCK - 1)) // numpy.uint64(_LZ4_BLOCK), numpy.uint64(1))
    bound = numpy.where(zstd, ln + (ln >> numpy.uint64(8)) + small,
                        numpy.where(lz4, ln + numpy.uint64(_LZ4_FRAME) + numpy.uint64(4) * blocks, ln))
    # a compressed chunk is smaller than its length (stored raw otherwise): its size
    # tells a raw object from a compressed one, its magic zstd from lz4
    raw = cd == CODEC_NONE
    bad = numpy.flatnonzero((st == 0) | (st > bound) | (raw & (st != ln)) | (~raw & (st == ln)))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"chunk {i} has stored length {int(st[i])}, outside 1..{int(bound[i])} for "
                         f"{int(ln[i])} bytes with codec {CODEC_NAMES[int(cd[i])]}"
                         + (" (a raw chunk is stored at its length)" if raw[i] else
                            " (a compressed chunk is smaller than its length)"))


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _int(obj: dict[str, Any], name: str, minimum: int = 0) -> int:
    if name not in obj:
        raise ValueError(f"missing field {name!r}")
    value = obj[name]
    if type(value) is not int:
        raise ValueError(f"field {name!r} is {_a(type(value).__name__)}, not an int")
    if not minimum <= value < _U64:
        raise ValueError(f"field {name!r} is {value}, outside [{minimum}, 2**64)")
    return value


def _blob(obj: dict[str, Any], name: str) -> bytes:
    value = obj.get(name)
    if not isinstance(value, bytes):
        raise ValueError(f"field {name!r} is missing or not binary")
    return value


def _column(obj: dict[str, Any], name: str, width: int, rows: int | None) -> array[int]:
    """A binary column of little-endian unsigned ``width``-byte integers."""
    blob = _blob(obj, name)
    if rows is None and len(blob) % width:
        raise ValueError(f"field {name!r} holds {len(blob)} bytes, not a whole number of {width}-byte values")
    if rows is not None and len(blob) != width * rows:
        raise ValueError(f"field {name!r} holds {len(blob)} bytes, not {width} x {rows} chunks")
    col = array("Q" if width == 8 else "I")
    col.frombytes(blob)
    if sys.byteorder != "little":
        col.byteswap()
    return col


def _bytes_column(obj: dict[str, Any], name: str, width: int, rows: int) -> bytes:
    blob = _blob(obj, name)
    if len(blob) != width * rows:
        raise ValueError(f"field {name!r} holds {len(blob)} bytes, not {width} x {rows} chunks")
    return blob
