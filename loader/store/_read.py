"""Reading a chunk store's chunks (docs/FORMAT.md, "Reading a snapshot"): get a
chunk's stored bytes (the host chunk cache first, then the store), decompress them
straight into their destination, and check the result's BLAKE3 against the chunk's
name before anything counts it as read.

:class:`ChunkReader` is the engine a restore's worker threads run (``Op.CALL``, see
:mod:`loader.source._store`).  It reuses, for every chunk:

* staging buffers for the stored (compressed) bytes, from a pool (:class:`BufferPool`:
  private anonymous mappings of the largest stored length the manifest holds, touched
  only as far as used, the last given back taken first), one for each chunk being
  read at once, at most ``staging_limit`` (a local store: three a CPU, as
  decoding is CPU work; a store in object storage: one a GET in flight);
* a ``zstandard.ZstdDecompressor`` per worker thread (not thread-safe), its window
  bounded by the chunk size, so a hostile frame cannot make it allocate more.

Nothing is allocated per chunk in proportion to its size: the stored bytes are read
(``preadv``) or fetched (one GET, :meth:`~loader.remote.ObjectStore.get_range_into`)
into the staging buffer and decompressed from there into the destination
(``stream_reader(staging).readinto(destination)``, which zstd decodes in one pass
straight into it).  A chunk stored raw (``none``) is read straight into its
destination, no staging.

Where the bytes come from:

* a local store (:class:`LocalChunks`): ``STORE/chunks/HH/HASH``, opened read-only,
  never through a symbolic link, its size checked against the manifest's;
* a store in object storage (:class:`StoreChunks`): the same key under the store's
  URL, fetched whole with one ranged GET, its retries the store client's;
* the host chunk cache (:class:`~loader.remote.ChunkCache`, its content-addressed
  entries: :meth:`~loader.remote.ChunkCache.read_content_into`), asked first when
  there is one; an entry whose bytes do not decompress to the chunk's hash is
  dropped and the chunk fetched again; a chunk fetched and verified is put into it.

A chunk whose bytes do not decompress to exactly its length, or whose BLAKE3 is not
its name, raises :class:`ChunkFailure` with ``EBADMSG``: its destination holds no
counted bytes, and the caller fails the read.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .._files import CheckpointError, open_regular
from .._memfile import BufferPool
from ._format import CODEC_LZ4, CODEC_NONE, CODEC_ZSTD, chunk_key
from ._lz4 import decode_into as lz4_decode_into

if TYPE_CHECKING:
    from ..remote import ChunkCache, ObjectStore

__all__ = ["ChunkFailure", "ChunkReader", "LocalChunks", "ReadCounts", "StoreChunks"]


class ChunkFailure(Exception):
    """A chunk that could not be read or did not verify: ``errno`` (what a failed call
    returns, negated) and a one-line ``message`` naming the chunk."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.errno = code
        self.message = " ".join(message.split())

    def __str__(self) -> str:
        return self.message


class LocalChunks:
    """The chunks of a store that is a local directory (``root``)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def where(self, key: str) -> str:
        return os.path.join(self.root, key)

    def fetch_into(self, key: str, buffer: memoryview) -> None:
        """All of chunk object ``key`` into ``buffer``, which must be exactly its size."""
        path = self.where(key)
        try:
            fd = open_regular(path)
        except CheckpointError as exc:
            raise ChunkFailure(errno.ENOENT, str(exc)) from None
        except OSError as exc:
            raise ChunkFailure(exc.errno or errno.EIO, f"{path}: {exc.strerror or exc}") from None
        try:
            size = os.fstat(fd).st_size
            if size != len(buffer):
                raise ChunkFailure(errno.EBADMSG, f"{path}: {size} bytes, not the {len(buffer)} its snapshot says")
            done = 0
            while done < len(buffer):
                n = os.preadv(fd, [buffer[done:]], done)
                if n <= 0:
                    raise ChunkFailure(errno.EBADMSG, f"{path}: ended after {done} of {len(buffer)} bytes")
                done += n
        except OSError as exc:
            raise ChunkFailure(exc.errno or errno.EIO, f"{path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)


class StoreChunks:
    """The chunks of a store in object storage, through ``store`` (rooted at the store)."""

    def __init__(self, store: ObjectStore, note_error: Callable[[str], None] | None = None) -> None:
        from ..remote import StoreError
        from ..source._remote import STORE_ERRNOS

        self.store = store
        self._error: type[StoreError] = StoreError
        self._errnos = STORE_ERRNOS
        self._note = note_error

    def where(self, key: str) -> str:
        return self.store.url.url_of(key)

    def fetch_into(self, key: str, buffer: memoryview) -> None:
        try:
            got = self.store.get_range_into(key, 0, buffer)
        except self._error as exc:
            if self._note is not None:
                self._note(str(exc))
            raise ChunkFailure(self._errnos.get(exc.code, errno.EIO), str(exc)) from None
        if got != len(buffer):
            raise ChunkFailure(errno.EBADMSG, f"{self.where(key)}: {got} bytes, not the {len(buffer)} its "
                               "snapshot says")


@dataclass(slots=True)
class ReadCounts:
    """What a :class:`ChunkReader` did."""

    chunks_cached: int = 0  #: chunks read from the host chunk cache (and verified)
    chunks_fetched: int = 0  #: chunks read from the store (and verified)
    bytes_fetched: int = 0  #: stored bytes read from the store
    bytes_decompressed: int = 0  #: bytes put into destinations
    cache_dropped: int = 0  #: cache entries that did not verify, dropped (then fetched again)
    wrong_chunks: int = 0  #: chunks from the store that did not verify (never served, never cached)
    failures: int = 0  #: chunks that could not be read (missing, the store failing, wrong bytes)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


#: the bytes at the start of a staging buffer kept when the rest is given back (page-aligned)
STAGING_KEPT = 256 << 10


class _Thread(threading.local):
    decompressor: Any = None
    probe: bytearray | None = None


class ChunkReader:
    """Reads chunks into destinations: see the module's docstring.  ``max_stored``: the
    largest stored length it will be asked for (the staging buffer's size);
    ``chunk_size``: the largest uncompressed one (bounds the decompressor's window)."""

    def __init__(self, chunks: LocalChunks | StoreChunks, *, max_stored: int, chunk_size: int,
                 cache: ChunkCache | None = None, staging_limit: int | None = None,
                 release_staging: bool = False) -> None:
        self.chunks = chunks
        self.cache = cache
        self.max_stored = max(1, max_stored)
        #: the staging buffers: at most ``staging_limit`` chunks read and decoded at once
        #: (None: one a call at once, as many as the worker threads)
        self.stages = BufferPool(self.max_stored, staging_limit)
        #: a staging buffer's pages past its first ``STAGING_KEPT`` bytes are given back
        #: after each chunk (``MADV_DONTNEED``): where chunks wait on the network, one a GET
        #: in flight, each buffer then holds what its GET is bringing, not the largest
        #: chunk it ever brought (a fault per page again costs little beside a GET)
        self.release_staging = release_staging
        self.chunk_size = chunk_size
        window = 1 << max(10, (max(chunk_size, 1) - 1).bit_length())
        self._window = max(window, 1 << 20)
        self._local = _Thread()
        self._lock = threading.Lock()
        self.counts = ReadCounts()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return self.counts.as_dict()

    # -- per thread -----------------------------------------------------------------------------
    def _decompressor(self) -> Any:
        t = self._local
        if t.decompressor is None:
            import zstandard

            t.decompressor = zstandard.ZstdDecompressor(max_window_size=self._window)
            t.probe = bytearray(1)
        return t.decompressor

    # -- one chunk ------------------------------------------------------------------------------
    def read(self, digest: bytes, length: int, stored: int, codec: int, dest: memoryview) -> None:
        """Put the chunk named ``digest`` (BLAKE3 of its ``length`` uncompressed bytes,
        kept as ``stored`` bytes with ``codec``) into ``dest`` (``length`` writable bytes),
        verified; raises :class:`ChunkFailure`."""
        if len(dest) != length:
            raise ValueError(f"a destination of {len(dest)} bytes for a chunk of {length}")
        if not 0 < stored <= self.max_stored:
            raise ChunkFailure(errno.EBADMSG, f"chunk {digest.hex()}: {stored} stored bytes, beyond its snapshot's "
                               f"{self.max_stored}")
        if codec == CODEC_NONE:  # read straight into its place
            self._read(digest, length, stored, codec, dest, dest)
            return
        with self.stages.held() as stage:
            try:
                self._read(digest, length, stored, codec, dest, memoryview(stage)[:stored])
            finally:
                if self.release_staging and stored > STAGING_KEPT:  # what is past its first pages, given back
                    stage.madvise(mmap.MADV_DONTNEED, STAGING_KEPT, min(len(stage), stored) - STAGING_KEPT)

    def _read(self, digest: bytes, length: int, stored: int, codec: int, dest: memoryview,
              held: memoryview) -> None:
        """:meth:`read` with the stored bytes going into ``held``."""
        key = chunk_key(digest)
        cache = self.cache
        if cache is not None:
            if cache.read_content_into(digest, stored, held):
                try:
                    self._decode(held, codec, dest, digest, key)
                except ChunkFailure:
                    cache.drop_content(digest, stored)
                    with self._lock:
                        self.counts.cache_dropped += 1
                else:
                    with self._lock:
                        self.counts.chunks_cached += 1
                        self.counts.bytes_decompressed += length
                    return
        try:
            self.chunks.fetch_into(key, held)
        except ChunkFailure:
            with self._lock:
                self.counts.failures += 1
            raise
        try:
            self._decode(held, codec, dest, digest, key)
        except ChunkFailure:
            with self._lock:
                self.counts.wrong_chunks += 1
                self.counts.failures += 1
                self.counts.bytes_fetched += stored
            raise
        with self._lock:
            self.counts.chunks_fetched += 1
            self.counts.bytes_fetched += stored
            self.counts.bytes_decompressed += length
        if cache is not None:
            cache.insert_content(digest, held)  # verified: the cache never holds wrong bytes

    def _decode(self, held: memoryview, codec: int, dest: memoryview, digest: bytes, key: str) -> None:
        """Decompress ``held`` into ``dest`` (for ``none``: ``held`` is ``dest``) and check
        its BLAKE3; on any failure ``dest`` is zeroed (no wrong bytes left behind)."""
        import blake3

        where = self.chunks.where(key)
        try:
            if codec == CODEC_ZSTD:
                self._unzstd(held, dest, where)
            elif codec == CODEC_LZ4:
                try:
                    lz4_decode_into(held, dest)
                except ValueError as exc:
                    raise ChunkFailure(errno.EBADMSG, f"{where}: not an lz4 frame of its chunk: {exc}") from None
            elif codec != CODEC_NONE:
                raise ChunkFailure(errno.EBADMSG, f"{where}: codec {codec} is not one this reader knows")
            if blake3.blake3(dest).digest() != digest:
                raise ChunkFailure(errno.EBADMSG, f"{where}: its bytes do not hash to its name (BLAKE3)")
        except ChunkFailure:
            _zero(dest)
            raise

    def _unzstd(self, src: memoryview, dest: memoryview, where: str) -> None:
        import zstandard

        d = self._decompressor()
        try:
            reader = d.stream_reader(src, read_across_frames=False)
            done = 0
            n = len(dest)
            while done < n:
                got = reader.readinto(dest[done:])
                if got <= 0:
                    break
                done += got
            probe = self._local.probe
            assert probe is not None
            extra = reader.readinto(probe) if done == n else 0
        except zstandard.ZstdError as exc:
            raise ChunkFailure(errno.EBADMSG, f"{where}: not a zstd frame of its chunk: {exc}") from None
        if done != n or extra:
            raise ChunkFailure(errno.EBADMSG, f"{where}: decompresses to {'more' if extra else done} bytes, "
                               f"not {n}")


_ZERO_BLOCK = bytes(1 << 16)


def _zero(dest: memoryview) -> None:
    """Zero ``dest`` in place, 64 KiB at a time (no buffer of its size)."""
    block = _ZERO_BLOCK
    for at in range(0, len(dest), len(block)):
        end = min(at + len(block), len(dest))
        dest[at:end] = block[: end - at]
