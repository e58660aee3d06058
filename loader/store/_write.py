"""Writing snapshots into a chunk store: ``create_snapshot`` (a raw image, or a
Firecracker diff over a parent snapshot) and ``push_snapshot`` (a snapshot copied to
another store).  docs/FORMAT.md, section 3.

Chunks are processed by a pool of threads (reading, BLAKE3, zstd and the store's
calls all release the GIL), each with its own reused chunk-sized buffers, and at
most ``2 x threads`` chunks in flight: memory is a few chunks per thread whatever the
image's size.  Only chunks the store lacks are written; the manifest goes last.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import xxhash
import zstandard

from .._files import CheckpointError, open_regular, read_span
from .._units import human
from ..checkpoint._raw import scan_extents
from ._access import ChunkStore, LocalStore, open_store
from ._format import (
    CODEC_IDS,
    CODEC_LZ4,
    CODEC_NAMES,
    CODEC_NONE,
    CODEC_ZSTD,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    MAX_CHUNK_SIZE,
    MAX_MANIFEST_BYTES,
    MIN_CHUNK_SIZE,
    Manifest,
    check_snapshot_name,
    chunk_hash,
    chunk_key,
    codec_of_object,
    decode_manifest,
    encode_manifest,
    manifest_digest,
    max_stored_length,
    snapshot_key,
)
from ._layers import ParentChunks, extents_in, unpack_chunk
from ._lz4 import encode_into as lz4_encode_into
from ._lz4 import scratch_length as lz4_scratch_length

__all__ = ["WriteReport", "create_snapshot", "default_threads", "parse_codec", "push_snapshot", "read_manifest"]

_T = TypeVar("_T")


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def parse_codec(text: str) -> tuple[int, int]:
    """``zstd``, ``zstd:LEVEL``, ``lz4`` or ``none`` as ``(codec id, level)`` (level 0
    but for zstd); ``ValueError`` otherwise."""
    name, _, level = text.partition(":")
    if name not in CODEC_IDS or (level and name != "zstd"):
        raise ValueError(f"--compress {text}: one of zstd, zstd:LEVEL, lz4, none")
    if name != "zstd":
        return CODEC_IDS[name], 0
    if not level:
        return CODEC_IDS[name], DEFAULT_ZSTD_LEVEL
    try:
        n = int(level)
    except ValueError:
        raise ValueError(f"--compress {text}: LEVEL is an integer") from None
    lo, hi = -(1 << 17), zstandard.MAX_COMPRESSION_LEVEL
    if not lo <= n <= hi or n == 0:
        raise ValueError(f"--compress {text}: zstd levels are {lo}..-1 and 1..{hi}")
    return CODEC_ZSTD, n


@dataclass(frozen=True, slots=True)
class WriteReport:
    """What a create or push did.  "New" chunks were written by it; "deduplicated" ones
    were in the store already (or twice in this snapshot) and were not."""

    snapshot: str  #: its URL or path: STORE/snapshots/NAME
    action: str  #: "created" or "pushed"
    memory_size: int
    chunk_size: int
    codec: str  #: e.g. "zstd:3"
    chunks: int  #: rows in the manifest
    data_bytes: int  #: uncompressed bytes in those chunks
    stored_bytes: int  #: bytes of their objects (as stored)
    new_chunks: int
    new_bytes: int  #: uncompressed bytes of the chunks written
    new_stored_bytes: int  #: bytes written to the store for them
    dedup_chunks: int
    dedup_bytes: int  #: uncompressed bytes not written: the store had them
    zero_chunks: int  #: chunks with data extents that were all zero (not stored)
    hole_bytes: int  #: memory in no chunk: holes, zero chunks (and, for a layer: rows the parent had)
    inherited_chunks: int  #: a layer's rows taken from its parent without being read
    manifest_bytes: int
    seconds: float
    parent: str | None = None

    @property
    def ratio(self) -> float:
        """Compression ratio of the snapshot: uncompressed / stored."""
        return self.data_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def line(self) -> str:
        rate = self.data_bytes / self.seconds if self.seconds > 0 else 0.0
        layer = (f" over {self.parent} ({self.inherited_chunks} chunks inherited)" if self.parent else "")
        return (f"{self.action} {self.snapshot}{layer}: {human(self.data_bytes)} in {self.chunks} chunks of "
                f"{human(self.chunk_size)} ({self.codec}); new {human(self.new_bytes)} in {self.new_chunks} chunks "
                f"({human(self.new_stored_bytes)} written), deduplicated {human(self.dedup_bytes)} in "
                f"{self.dedup_chunks}; compression {self.ratio:.2f}x; {self.seconds:.2f} s ({human(rate)}/s)")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = round(self.ratio, 4)
        return d


@dataclass(slots=True)
class _Row:
    offset: int
    length: int
    stored: int
    codec: int
    digest: bytes
    xxh3: int
    new: bool
    inherited: bool = False


class _Threads:
    """Per-thread reused buffers: the chunk, and the compressor's output."""

    def __init__(self, chunk_size: int, codec: int, level: int) -> None:
        self.chunk_size, self.codec, self.level = chunk_size, codec, level
        self.local = threading.local()

    def chunk(self) -> memoryview:
        buf: memoryview | None = getattr(self.local, "chunk", None)
        if buf is None:
            buf = self.local.chunk = memoryview(bytearray(self.chunk_size))
        return buf

    def compressor(self) -> Any:
        comp = getattr(self.local, "comp", None)
        if comp is None:
            comp = self.local.comp = zstandard.ZstdCompressor(level=self.level, write_checksum=False,
                                                              write_content_size=True)
        return comp

    def compress(self, data: memoryview) -> bytes | memoryview:
        """``data`` compressed with the run's codec (zstd: a new ``bytes``; lz4: a view of
        this thread's reused output buffer, valid until its next call)."""
        if self.codec == CODEC_LZ4:
            out: memoryview | None = getattr(self.local, "out", None)
            if out is None:
                out = self.local.out = memoryview(bytearray(lz4_scratch_length(self.chunk_size)))
            return out[: lz4_encode_into(data, out)]
        packed: bytes = self.compressor().compress(data)
        return packed


def _in_order(pool: ThreadPoolExecutor, work: Callable[[_T], Any], items: Iterable[_T], window: int) -> Iterator[Any]:
    """``work(item)`` for each item on the pool, at most ``window`` at once; results in order."""
    pending: deque[Future[Any]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


class _Uploader:
    """Decides which chunk objects must be put, and counts new ones once each."""

    def __init__(self, store: ChunkStore, grace_refresh: float) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.done: dict[bytes, tuple[int, int]] = {}  #: hash -> its object's (size, codec), handled in this run
        self.written: list[str] = []
        self.grace_refresh = grace_refresh

    def known(self, digest: bytes) -> tuple[int, int] | None:
        with self.lock:
            return self.done.get(digest)

    def usable(self, key: str, length: int) -> tuple[int, int] | None:
        """``(size, codec)`` of the object ``key`` already in the store, where it can be
        relied on; None where it must be put: absent, of a size or first bytes no chunk of
        ``length`` bytes can have (damaged), or too old to be relied on (gc could be
        deleting it) in a store that cannot make it young in place (S3: it is put again).
        A compressed object's codec is told by its first bytes (one more small read)."""
        found = self.store.stat(key)
        if found is None:
            return None
        size, when = found
        if size == length:
            codec: int | None = CODEC_NONE
        else:
            head = self.store.head_bytes(key, 4) if 4 <= size < length else None
            codec = None if head is None else codec_of_object(size, length, head)
        if codec is None:
            return None
        if time.time() - when >= self.grace_refresh and not self.store.touch(key):
            return None
        return size, codec

    def finished(self, digest: bytes, key: str, size: int, codec: int, put: bool) -> bool:
        """Record a chunk handled; True where this run wrote it first (counted as new)."""
        with self.lock:
            first = digest not in self.done
            self.done.setdefault(digest, (size, codec))
            if put:
                self.written.append(key)
            return put and first


def _image(path: str, page_size: int) -> tuple[int, int]:
    try:
        fd = open_regular(path)
    except OSError as exc:
        raise CheckpointError(path, exc.strerror or str(exc)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or st.st_size % page_size:
        os.close(fd)
        why = "empty image (0 bytes)" if st.st_size == 0 else \
            f"size {st.st_size} is not a multiple of the page size {page_size}"
        raise CheckpointError(path, why)
    return fd, st.st_size


def read_manifest(store: ChunkStore, name: str) -> tuple[Manifest, bytes]:
    key = snapshot_key(name)
    data = store.get(key, MAX_MANIFEST_BYTES)
    return decode_manifest(data, store.url_of(key)), data


def create_snapshot(
    image: str, store: ChunkStore | str, name: str, *, codec: str = "zstd", chunk_size: int = DEFAULT_CHUNK_SIZE,
    page_size: int = 4096, parent: str | None = None, threads: int | None = None, endpoint: str | None = None,
    grace: float = 3600.0, before_manifest: Callable[[], None] | None = None,
) -> WriteReport:
    """Write the raw memory image ``image`` into ``store`` as snapshot ``name``.

    Holes (found without reading: FIEMAP or SEEK_DATA) are never read; a chunk with
    data is read whole, and stored unless it is all zero.  Each chunk is hashed
    (BLAKE3 and xxh3_64), looked up in the store, and compressed and put only when
    the store lacks it; the manifest is put last.  With ``parent``, ``image`` is a
    Firecracker diff snapshot over that snapshot (same store): see
    :mod:`loader.store._layers`.  ``grace``: gc's grace period; a chunk found in the
    store but older than half of it is touched (locally) or put again (S3), so a gc
    running now cannot take it away before the manifest names it.
    ``before_manifest``: called after the chunks, before the manifest (tests).
    """
    started = time.perf_counter()
    cid, level = parse_codec(codec)
    check_snapshot_name(name)
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size & (chunk_size - 1) == 0):
        raise CheckpointError(image, f"chunk size {chunk_size} is not a power of two from {human(MIN_CHUNK_SIZE)} "
                              f"to {human(MAX_CHUNK_SIZE)}")
    if page_size <= 0 or page_size & (page_size - 1) or chunk_size % page_size:
        raise CheckpointError(image, f"page size {page_size} is not a power of two dividing the chunk size")
    st = store if isinstance(store, ChunkStore) else open_store(store, endpoint=endpoint, create=True)
    key = snapshot_key(name)
    if st.exists(key):
        raise CheckpointError(st.url_of(key), "a snapshot of that name is already there: choose another name")
    parents: ParentChunks | None = None
    parent_bytes = b""
    if parent is not None:
        check_snapshot_name(parent)
        pm, parent_bytes = read_manifest(st, parent)
        if chunk_size != pm.chunk_size or page_size != pm.page_size:
            chunk_size, page_size = pm.chunk_size, pm.page_size  # a layer is cut as its parent is
        parents = ParentChunks(st, pm, parent)
    fd, size = _image(image, page_size)
    try:
        if parents is not None and size != parents.manifest.memory_size:
            raise CheckpointError(image, f"{size} bytes, but the parent {parent} is a memory of "
                                  f"{parents.manifest.memory_size} bytes")
        try:
            starts, ends = scan_extents(fd, size, page_size)
        except OSError as exc:
            raise CheckpointError(image, exc.strerror or str(exc)) from None
        touched = _chunks_touched(starts, ends, chunk_size)
        nthreads = threads or default_threads()
        bufs = _Threads(chunk_size, cid, level)
        up = _Uploader(st, grace / 2)
        zero = bytes(chunk_size)

        def one(index: int) -> _Row | None:
            off = index * chunk_size
            length = min(chunk_size, size - off)
            buf = bufs.chunk()[:length]
            if parents is None:
                got = read_span(fd, image, buf, off)
                if got < length:
                    raise CheckpointError(image, f"the image shrank while it was read (end at {off + got})")
            else:
                if not parents.fill(off, buf):
                    buf[:] = zero[:length]
                for a, b in extents_in(starts, ends, off, off + length):
                    got = read_span(fd, image, buf[a - off : b - off], a)
                    if got < b - a:
                        raise CheckpointError(image, f"the image shrank while it was read (end at {a + got})")
            if buf == zero[:length]:
                return None
            digest = chunk_hash(buf)
            xxh = xxhash.xxh3_64_intdigest(buf)
            found = up.known(digest)
            if found is not None:
                return _Row(off, length, found[0], found[1], digest, xxh, False)
            key = chunk_key(digest)
            found = up.usable(key, length)
            put = found is None
            if found is None:
                data: bytes | memoryview = buf
                codec = CODEC_NONE
                if cid != CODEC_NONE:
                    packed = bufs.compress(buf)
                    if len(packed) < length:  # stored raw otherwise: no chunk costs more than its size
                        data, codec = packed, cid
                st.put(key, data)
                found = len(data), codec
            new = up.finished(digest, key, found[0], found[1], put)
            return _Row(off, length, found[0], found[1], digest, xxh, new)

        rows: list[_Row] = []
        zero_chunks = 0
        with ThreadPoolExecutor(nthreads, thread_name_prefix="pageload-store") as pool:
            for row in _in_order(pool, one, touched, 2 * nthreads):
                if row is None:
                    zero_chunks += 1
                else:
                    rows.append(row)
    finally:
        os.close(fd)
    inherited = 0
    if parents is not None:  # the parent's rows the diff does not touch, as they are
        pm = parents.manifest
        mine = {r.offset for r in rows}
        dirty = {i * chunk_size for i in touched}
        for i in range(len(pm)):
            off = pm.offsets[i]
            if off not in dirty and off not in mine:
                rows.append(_Row(off, pm.lengths[i], pm.stored_lengths[i], pm.codecs[i], pm.hash_at(i), pm.xxh3[i],
                                 False, True))
                inherited += 1
        rows.sort(key=lambda r: r.offset)
    manifest = Manifest(
        memory_size=size, page_size=page_size, chunk_size=chunk_size,
        offsets=array("Q", (r.offset for r in rows)), lengths=array("I", (r.length for r in rows)),
        stored_lengths=array("I", (r.stored for r in rows)), codecs=bytes(r.codec for r in rows),
        hashes=b"".join(r.digest for r in rows), xxh3=array("Q", (r.xxh3 for r in rows)),
        parent=parent, parent_digest=manifest_digest(parent_bytes) if parent is not None else None,
        created=int(time.time()), source=os.path.basename(image)[:256],
    )
    data = encode_manifest(manifest)
    if isinstance(st, LocalStore):
        st.sync_dirs(up.written)
    if before_manifest is not None:
        before_manifest()
    st.put(key, data)  # last: from now on the snapshot exists
    if isinstance(st, LocalStore):
        st.sync_dirs([key])
    new_rows = [r for r in rows if r.new]
    dedup = [r for r in rows if not r.new and not r.inherited]
    data_bytes = sum(r.length for r in rows)
    return WriteReport(
        snapshot=st.url_of(key), action="created", memory_size=size, chunk_size=chunk_size,
        codec=f"zstd:{level}" if cid == CODEC_ZSTD else CODEC_NAMES[cid], chunks=len(rows), data_bytes=data_bytes,
        stored_bytes=sum(r.stored for r in rows), new_chunks=len(new_rows),
        new_bytes=sum(r.length for r in new_rows), new_stored_bytes=sum(r.stored for r in new_rows),
        dedup_chunks=len(dedup), dedup_bytes=sum(r.length for r in dedup),
        zero_chunks=zero_chunks, hole_bytes=size - data_bytes, inherited_chunks=inherited,
        manifest_bytes=len(data), seconds=time.perf_counter() - started, parent=parent,
    )


def _chunks_touched(starts: array[int], ends: array[int], chunk_size: int) -> list[int]:
    """The indexes of the chunks any extent falls in, ascending."""
    if not starts:
        return []
    import numpy

    s = numpy.frombuffer(starts, dtype=numpy.uint64) // numpy.uint64(chunk_size)
    e = (numpy.frombuffer(ends, dtype=numpy.uint64) - numpy.uint64(1)) // numpy.uint64(chunk_size)
    n = int(e.max()) + 2
    marks = numpy.zeros(n, dtype=numpy.int64)
    numpy.add.at(marks, s.astype(numpy.int64), 1)
    numpy.add.at(marks, e.astype(numpy.int64) + 1, -1)
    out: list[int] = numpy.flatnonzero(numpy.cumsum(marks)[:-1] > 0).tolist()
    return out


def push_snapshot(source: ChunkStore, name: str, dest: ChunkStore, *, threads: int | None = None,
                  grace: float = 3600.0) -> WriteReport:
    """Copy snapshot ``name`` from ``source`` to ``dest``: the chunks ``dest`` lacks (each
    checked on the way: its size, its decompression, its BLAKE3), then the manifest,
    byte for byte (so a child's ``parent_digest`` still names it)."""
    started = time.perf_counter()
    m, data = read_manifest(source, name)
    key = snapshot_key(name)
    if dest.exists(key):
        there = dest.get(key, MAX_MANIFEST_BYTES)
        if there != data and decode_manifest(there, dest.url_of(key)).hashes != m.hashes:
            raise CheckpointError(dest.url_of(key), "another snapshot of that name is already there")
    rows: dict[str, int] = {}
    for i in range(len(m)):
        rows.setdefault(m.key_at(i), i)
    nthreads = threads or default_threads()
    up = _Uploader(dest, grace / 2)
    local = threading.local()

    def one(item: tuple[str, int]) -> tuple[int, tuple[int, int]]:
        """(bytes written for the chunk: 0 where ``dest`` has it, its object's (size, codec) there)."""
        k, i = item
        length, stored, codec = m.lengths[i], m.stored_lengths[i], m.codecs[i]
        there = up.usable(k, length)
        if there is not None:
            return 0, there
        bound = max_stored_length(codec, length)
        if getattr(local, "stage", None) is None:
            local.stage = memoryview(bytearray(max(max_stored_length(c, m.chunk_size) for c in CODEC_NAMES)))
            local.chunk = memoryview(bytearray(m.chunk_size))
        staged: memoryview = local.stage[:bound]
        got = source.read_into(k, staged)
        if got != stored:
            raise CheckpointError(source.url_of(k), f"{got} bytes, not the {stored} its manifest says")
        unpack_chunk(staged[:stored], codec, local.chunk[:length], m.hash_at(i), source.url_of(k))
        dest.put(k, staged[:stored])
        with up.lock:
            up.written.append(k)
        return stored, (stored, codec)

    new_chunks = new_stored = new_bytes = 0
    sizes: dict[str, tuple[int, int]] = {}
    with ThreadPoolExecutor(nthreads, thread_name_prefix="pageload-push") as pool:
        for (k, i), (wrote, size) in zip(rows.items(), _in_order(pool, one, rows.items(), 2 * nthreads)):
            sizes[k] = size
            if wrote:
                new_chunks += 1
                new_stored += wrote
                new_bytes += m.lengths[i]
    stored_lengths = array("I", (sizes[m.key_at(i)][0] for i in range(len(m))))
    codecs = bytes(sizes[m.key_at(i)][1] for i in range(len(m)))
    if stored_lengths != m.stored_lengths or codecs != m.codecs:
        # the destination holds some chunks encoded otherwise (another codec or level, or
        # raw): its manifest describes the objects it has (not byte for byte the source's)
        m = replace(m, stored_lengths=stored_lengths, codecs=codecs)
        data = encode_manifest(m)
    if isinstance(dest, LocalStore):
        dest.sync_dirs(up.written)
    dest.put(key, data)
    if isinstance(dest, LocalStore):
        dest.sync_dirs([key])
    data_bytes = m.data_bytes
    return WriteReport(
        snapshot=dest.url_of(key), action="pushed", memory_size=m.memory_size, chunk_size=m.chunk_size,
        codec="/".join(sorted({CODEC_NAMES[c] for c in m.codecs})) or "none",
        chunks=len(m), data_bytes=data_bytes, stored_bytes=m.stored_bytes, new_chunks=new_chunks,
        new_bytes=new_bytes, new_stored_bytes=new_stored, dedup_chunks=len(m) - new_chunks,
        dedup_bytes=data_bytes - new_bytes, zero_chunks=0, hole_bytes=m.memory_size - data_bytes,
        inherited_chunks=0, manifest_bytes=len(data), seconds=time.perf_counter() - started, parent=m.parent,
    )
