"""A snapshot in a chunk store (``STORE/snapshots/NAME``: a local path, ``file://`` or
``s3://``) as a page source (docs/FORMAT.md, "Reading a snapshot").

The pages file the loader sees is virtual: the manifest's chunks back to back, row
``k`` at ``k * chunk_size`` (only the last row, the last chunk of memory, may be
short), as a pages checkpoint's ``pages.img`` holds its data; the layout maps each
run of chunks adjacent in memory to its place there; memory no chunk covers is zero,
never read.  ``chunk_size`` is the manifest's and ``checksums`` its ``xxh3`` column
(one per row, so one per chunk of the pages file), so the loader's verification,
read widening and ``corrupt`` code work as for a pages checkpoint.  (Memory offsets
as file offsets, holes and all, would not do: the loader verifies chunks of a pages
file its layout covers back to back.)  The identity is the xxh3_64 of the
manifest's bytes (which name every chunk's BLAKE3): the same snapshot pushed to
another store is the same snapshot.

Reads are :data:`aio.Op.CALL` requests (``needs_calls``), run in the threads
backend's workers as a checkpoint in object storage's are, so the loader's priority
design holds unchanged (faults first, then the working set, then the sweep).  Each
call, in its worker thread, for each chunk it covers:

1. a chunk that failed for good before (its bytes did not verify, its object is
   missing): fails again at once, no fetch (the loader splits a failed read down to
   single pages, each a call: they must not each fetch the chunk);
2. otherwise :class:`loader.store._read.ChunkReader`: the stored bytes from the host
   chunk cache (a store in object storage) or the store, decompressed straight into
   the destination (or into this thread's chunk-sized scratch buffer when the call's
   buffers split the chunk or it asks for part of it, then copied out), its BLAKE3
   checked before the call may count it;
3. returns the bytes put into the buffers, in order, short at the first chunk that
   failed, or ``-errno`` when that is the first: ``EBADMSG`` for a chunk whose bytes
   do not verify (never served), the store's codes as for a checkpoint in object
   storage (``ENOENT``, ``EACCES``, ``EHOSTUNREACH``, ``EREMOTEIO``).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import xxhash

import aio

from .._files import CheckpointError, open_regular
from .._memfile import BufferPool
from .._units import human
from ..core._layout import Layout
from ._calls import CallSource
from ._remote import RemoteConfig, _checkpoint_error, _inside, _open_cache, _scatter, is_store_url

if TYPE_CHECKING:
    from ..remote import ChunkCache, ObjectStore
    from ..store import Manifest
    from ..store._read import ChunkReader
    from ._base import LocalPages

__all__ = ["StoreSource"]

log = logging.getLogger("pageload")





class StoreSource(CallSource):
    """A snapshot in a chunk store, open: its manifest read and checked (see the
    module's docstring).  Open it with :meth:`open` (or :func:`~loader.source.open_source`)."""

    kind = "store"
    holes_known = True
    local: LocalPages | None = None  # many objects: reads only through requests
    takes_remote = True  # open_source passes its remote= configuration (endpoint, cache)
    needs_calls = True  # its requests are Op.CALL: the daemon's queue must take calls
    #: reading any byte of a chunk decodes all of it: the loader makes its reads whole
    #: chunks (its read sizes, a waiter's and the sweep's, rounded up to the chunk size)
    decodes_whole_chunks = True
    #: a call returns only bytes whose chunk's BLAKE3 it checked (``ChunkReader``): the
    #: loader does not hash them again with the manifest's xxh3 column
    verifies_reads = True

    def __init__(self, ref: str, store: str, name: str, manifest: Manifest, data: bytes,
                 reader: ChunkReader, objects: ObjectStore | None = None, manifest_path: str | None = None) -> None:
        import numpy as np

        from ..store import manifest_digest

        self.ref = ref
        self.store = store  #: the store's root (a path or a URL)
        self.name = name
        self.manifest = manifest
        self.digest = manifest_digest(data)  #: BLAKE3 of the manifest (a child's parent_digest)
        self._digest = xxhash.xxh3_64_intdigest(data)  #: the identity's
        self.reader = reader
        self.objects = objects
        self.manifest_path = manifest_path
        m = manifest
        c = m.chunk_size
        self.chunk_size: int | None = c
        off = np.frombuffer(m.offsets, dtype=np.uint64)
        ln = np.frombuffer(m.lengths, dtype=np.uint32).astype(np.uint64)
        # the pages file: row k's bytes at k * chunk_size (only the last row may be short)
        self._size = int(ln.sum())
        # the layout: the rows, those adjacent in memory merged
        if len(off):
            starts = np.flatnonzero(np.concatenate(([True], off[1:] != off[:-1] + ln[:-1])))
            ends = np.append(starts[1:], len(off)) - 1
            mem = array("Q", off[starts].tobytes())
            length = array("Q", (off[ends] + ln[ends] - off[starts]).tobytes())
            file = array("Q", (starts.astype(np.uint64) * np.uint64(c)).tobytes())
        else:
            mem, length, file = array("Q"), array("Q"), array("Q")
        self.layout = Layout.from_arrays(m.memory_size, m.page_size, mem, length, file)
        self.layout.validate(self._size)
        self.checksums: array[int] | None = m.xxh3
        #: one-chunk buffers a chunk goes through where a call wants only part of it, or
        #: its buffers split it (then copied out): as many at once as the reader's staging
        self._scratch = BufferPool(m.chunk_size, reader.stages.limit)
        self._lock = threading.Lock()
        self._bad: dict[int, tuple[int, str]] = {}  # row -> (errno, why): failed for good
        self._calls = 0
        self._active = 0
        self._closing = False
        self._closed = False
        self.last_error: str | None = None
        self._cache_stats: dict[str, Any] | None = None
        self._cache_stats_at = -math.inf
        self._refresh_cache_stats()

    # -- registration --------------------------------------------------------------------------
    @classmethod
    def claims(cls, path: str) -> bool:
        """``STORE/snapshots/NAME``: a URL of that shape, or a local file of that shape
        that starts as a manifest does."""
        from ..store import looks_like_manifest, split_snapshot_ref

        if split_snapshot_ref(path) is None:
            return False
        if is_store_url(path):
            return True
        try:
            with open(path, "rb") as f:
                return looks_like_manifest(f.read(64))
        except OSError:
            return False

    @classmethod
    def open(cls, path: str, *, scan: bool = True, direct: bool = False,
             remote: RemoteConfig | None = None) -> Any:
        """Read and check the manifest; raises :class:`CheckpointError` (one line naming
        the object at fault).  A URL whose ``snapshots/NAME`` object does not exist is
        tried as a pages checkpoint in object storage (its prefix may end so).
        ``scan`` and ``direct`` mean nothing here."""
        from ..store import (
            CODEC_NAMES,
            MAX_MANIFEST_BYTES,
            decode_manifest,
            max_stored_length,
            snapshot_key,
            split_snapshot_ref,
        )
        from ..store._access import read_file
        from ..store._read import ChunkReader, LocalChunks, StoreChunks

        split = split_snapshot_ref(path)
        if split is None:
            raise CheckpointError(path, "not a snapshot in a chunk store (STORE/snapshots/NAME)")
        root, name = split
        key = snapshot_key(name)
        objects: ObjectStore | None = None
        cache: ChunkCache | None = None
        manifest_path: str | None = None
        if is_store_url(path):
            from ..remote import ObjectStore, StoreError

            config = remote or RemoteConfig()
            try:
                objects = ObjectStore(root, endpoint=config.endpoint, policy=config.policy, env=config.env,
                                      access_key_id=config.access_key_id,
                                      secret_access_key=config.secret_access_key)
                data = objects.get(key, MAX_MANIFEST_BYTES)
            except StoreError as exc:
                if exc.code == "not-found" and objects is not None:
                    from ._remote import RemoteSource

                    try:  # a pages checkpoint pushed under a prefix that ends in snapshots/NAME?
                        return RemoteSource.open(path, remote=remote)
                    except CheckpointError:
                        pass
                raise _checkpoint_error(exc, path) from None
            chunks: Any = StoreChunks(objects)
        else:
            manifest_path = path
            data = read_file(path, MAX_MANIFEST_BYTES)
            chunks = LocalChunks(root)
            if not os.path.isdir(os.path.join(root, "chunks")):
                raise CheckpointError(os.path.join(root, "chunks"), "missing: a store holds its chunks there")
        manifest = decode_manifest(data, path)
        stored = max(manifest.stored_lengths, default=1)
        bound = max(max_stored_length(c, manifest.chunk_size) for c in CODEC_NAMES)
        if objects is not None:
            cache = _open_cache(remote or RemoteConfig())
        # a local store's chunks are read and decoded at most three a CPU at once
        # (CPU work: more at once only holds more staging); a store's GETs one each
        limit = None if objects is not None else aio.usable_cpus() * 3
        reader = ChunkReader(chunks, max_stored=min(stored, bound), chunk_size=manifest.chunk_size, cache=cache,
                             staging_limit=limit, release_staging=objects is not None)
        source = cls(path, root, name, manifest, data, reader, objects, manifest_path)
        if isinstance(chunks, StoreChunks):
            chunks._note = source._note_error
        return source

    def read_manifest(self, name: str) -> bytes | None:
        """Snapshot ``name``'s manifest object in the same store (a parent's), or None if
        there is none; raises :class:`CheckpointError` if the store fails otherwise."""
        from ..store import MAX_MANIFEST_BYTES, snapshot_key
        from ..store._format import SNAPSHOTS_DIR

        if self.objects is not None:
            from ..remote import StoreError

            try:
                return self.objects.get(snapshot_key(name), MAX_MANIFEST_BYTES)
            except StoreError as exc:
                if exc.code == "not-found":
                    return None
                raise _checkpoint_error(exc, self.objects.url.url_of(snapshot_key(name))) from None
        path = os.path.join(self.store, SNAPSHOTS_DIR, name)
        try:
            fd = open_regular(path)
        except CheckpointError:
            return None
        except OSError as exc:
            raise CheckpointError(path, exc.strerror or str(exc)) from None
        try:
            return os.pread(fd, MAX_MANIFEST_BYTES + 1, 0)
        finally:
            os.close(fd)

    # -- PageSource ----------------------------------------------------------------------------
    def files(self) -> tuple[str, ...]:
        return (self.manifest_path,) if self.manifest_path is not None else ()

    def data_estimate(self) -> int:
        return self.layout.data_bytes

    def describe(self) -> str:
        m = self.manifest
        stored = m.stored_bytes
        ratio = f"{m.data_bytes / stored:.2f}x" if stored else "-"
        cache = self.reader.cache
        where = "" if self.objects is None else \
            f"; {f'chunk cache {cache.directory}' if cache is not None else 'no chunk cache'}"
        return (f"snapshot {self.name!r} in chunk store {self.store} ({len(m)} chunks of {human(m.chunk_size)}, "
                f"{human(stored)} stored, {ratio}{where})")

    def close(self) -> None:
        """Stop reading: calls not yet started return ``-ECANCELED``; the cache is closed
        once no call uses it."""
        with self._lock:
            self._closing = True
            last = self._active == 0
        if last:
            self._close_cache()

    # -- statistics ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The daemon's ``remote`` statistics: the store's requests (object storage), this
        source's reads, the cache's."""
        from dataclasses import asdict

        with self._lock:
            fetch: dict[str, Any] = {"calls": self._calls, "failed_chunks": len(self._bad)}
            last = self.last_error
            cache = self._cache_stats
            at = self._cache_stats_at
        fetch.update(self.reader.stats())
        if cache is not None:
            cache = {**cache, "age_s": round(time.monotonic() - at, 3)}
        return {"url": self.ref, "store": asdict(self.objects.stats()) if self.objects is not None else None,
                "fetch": fetch, "last_error": last, "cache": cache}

    #: how often the calls take the cache's stats again (seconds)
    CACHE_STATS_EVERY = 0.5

    def _refresh_cache_stats(self) -> None:
        cache = self.reader.cache
        if cache is None:
            return
        taken = cache.stats().as_dict()
        with self._lock:
            self._cache_stats = taken
            self._cache_stats_at = time.monotonic()

    def _note_error(self, line: str) -> None:
        with self._lock:
            first = self.last_error != line
            self.last_error = line
        if first:
            log.warning("fetching %s", line)

    # -- reading -------------------------------------------------------------------------------
    def _call(self, lo: int, buffers: Sequence[memoryview], urgent: bool = False) -> int:
        with self._lock:
            if self._closing:
                return -errno.ECANCELED
            self._active += 1
            self._calls += 1
        try:
            return self._read(lo, buffers)
        finally:
            with self._lock:
                self._active -= 1
                last = self._closing and self._active == 0
                stale = time.monotonic() - self._cache_stats_at > self.CACHE_STATS_EVERY
            if last:
                self._close_cache()
            elif stale and self.reader.cache is not None and not self._closing:
                self._refresh_cache_stats()

    def _read(self, lo: int, buffers: Sequence[memoryview]) -> int:
        """Put the virtual pages file's bytes from ``lo`` on into ``buffers``; the bytes
        put, in order (short at the end of memory or at the first chunk that failed),
        or -errno."""
        from ..store._read import ChunkFailure

        hi = min(lo + sum(len(b) for b in buffers), self._size)
        if hi <= lo:
            return 0
        m = self.manifest
        c = m.chunk_size
        starts: list[int] = []
        pos = lo
        for buf in buffers:
            starts.append(pos)
            pos += len(buf)
        for k in range(lo // c, (hi - 1) // c + 1):
            a = k * c
            b = a + m.lengths[k]
            bad = self._bad.get(k)
            if bad is None and self._closing:
                bad = (errno.ECANCELED, "closing")
            if bad is None:
                direct = _inside(starts, buffers, a, b, lo, hi)
                scratch = None if direct is not None else self._scratch.take()
                target = memoryview(scratch)[: b - a] if scratch is not None else direct
                assert target is not None
                try:
                    self.reader.read(m.hash_at(k), b - a, m.stored_lengths[k], m.codecs[k], target)
                    if scratch is not None:
                        _scatter(target, a, starts, buffers, lo, hi)
                except ChunkFailure as exc:
                    bad = (exc.errno, exc.message)
                    if exc.errno != errno.ECANCELED:  # past the store's retries: for good
                        with self._lock:
                            first = k not in self._bad
                            self._bad[k] = bad
                        if first:
                            log.warning("chunk %d (memory %#x) never served: %s", k, m.offsets[k], exc.message)
                else:
                    continue
                finally:
                    if scratch is not None:
                        self._scratch.give(scratch)
            done = max(0, a - lo)
            return done if done else -bad[0]
        return hi - lo

    def failure(self, file_offset: int, length: int, err: int) -> tuple[str, str] | None:
        """Why a read of the virtual pages file's ``[file_offset, file_offset + length)``
        failed (the loader asks, for its error to the waiters): ``corrupt`` for a chunk
        whose bytes did not verify, ``unavailable`` with the store's message for one the
        store could not give (past its retries, or missing); None otherwise."""
        from protocol import codes

        c = self.manifest.chunk_size
        for k in range(file_offset // c, (file_offset + max(length, 1) - 1) // c + 1):
            bad = self._bad.get(k)  # (a dict's get is atomic)
            if bad is not None:
                code = codes.CORRUPT if bad[0] == errno.EBADMSG else codes.UNAVAILABLE
                return code, f"the chunk at memory {self.manifest.offsets[k]:#x}: {bad[1]}"
        return None


    def _close_cache(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        cache = self.reader.cache
        if cache is not None:
            self._refresh_cache_stats()
            cache.close()
