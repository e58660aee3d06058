"""A pages checkpoint in object storage (``s3://BUCKET/PREFIX``, ``file:///DIR``) as a
page source (docs/REMOTE.md, "Restoring from a store").

Opening it GETs ``PREFIX/index.msgpack`` (the commit point of a push: a checkpoint
pushed halfway has none) and parses it with the local index code, HEADs
``PREFIX/pages.img`` alongside (in a thread) and checks its size against the index.
The working set kept with it is looked up in the host cache before it is GET
(:mod:`._remote_ws`).  The identity is the
index's xxh3_64, as for a local pages checkpoint: the same checkpoint pushed is the
same checkpoint (a working set recorded on either fits both), and the host chunk
cache keys its entries on it.

Reads are :data:`aio.Op.CALL` requests: the loader's queue runs them in its worker
threads (``threads``: urgent ones in its urgent lane too) exactly where it would run
preads, so the loader's priority design holds unchanged: waiters' reads first, slots
kept for them, a waiter joining a read in flight.  Each call, in its worker thread:

1. covers the checksum chunks its bytes are in, whole (a fetch is chunk-aligned);
2. asks the inserter's slots, then the host chunk cache (:class:`~loader.remote.ChunkCache`),
   for its chunks a block (1 MiB of whole chunks: the cache's entry) at a time, read
   straight into the destination with one ``preadv`` where they lie inside the call's
   buffers (several, where memory has holes between them); every cache read is
   checked against the chunks' checksums;
3. GETs the chunks still missing, one ranged GET per contiguous stretch of them (at
   most ``fetch_bound`` bytes each), straight into the destination where the stretch
   lies inside one buffer, else into this thread's staging buffer (one per worker
   thread, ``fetch_bound`` bytes, touched only as far as used) and copied out;
4. puts the whole chunks it fetched into their blocks' slots in the inserter, which
   puts each block into the cache once whole (a call of the sweep fetches its blocks
   whole, the bytes outside its buffers straight into the slot; a waiter's only its
   chunks); the cache refuses a block with a chunk that does not hash to its
   checksum: it never holds wrong bytes;
5. returns the bytes put into the buffers, in order, short at the first stretch that
   failed, or ``-errno`` (a store's ``not-found`` is ENOENT, ``denied`` EACCES,
   ``unreachable`` EHOSTUNREACH, ``unavailable`` EREMOTEIO).

The loader then verifies every chunk against the index's checksums before any of its
bytes is served (a wrong chunk fails its waiters with ``corrupt``), as it does for a
local pages file.  The store client retries what is worth retrying
(:class:`~loader.remote.RetryPolicy`); a stretch of several chunks keeps its last try
for its chunks one by one (:meth:`RemoteSource._last_try`), so a failing chunk is told
apart from its neighbours and costs at most 1 + ``retries`` GETs.  A chunk that still
fails is remembered (at most ``MAX_BAD_CHUNKS``): a read touching it fails at once,
without a GET, as the loader narrows its failure down, and :meth:`RemoteSource.failure`
gives its waiters ``unavailable`` with the store's message.  The rest goes on.
"""

from __future__ import annotations

import errno
import logging
import math
import mmap
import threading
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import xxhash

import aio

from .._files import CheckpointError
from .._memfile import private_mapping
from .._units import human
from ._calls import CallSource

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint, PagesIndex, VerifyReport
    from ..remote import ChunkCache, ObjectStore, RetryPolicy, StoreError
    from ..remote._inserter import CacheInserter
    from ._base import LocalPages

__all__ = ["DEFAULT_FETCH_BOUND", "RemoteConfig", "RemoteSource", "STORE_ERRNOS", "is_store_url"]

log = logging.getLogger("pageload")
_R = TypeVar("_R")

#: the largest ranged GET: contiguous missing chunks are fetched together up to this
DEFAULT_FETCH_BOUND = 4 << 20
#: a store error's code as the errno a failed call returns
STORE_ERRNOS = {"not-found": errno.ENOENT, "denied": errno.EACCES, "unreachable": errno.EHOSTUNREACH,
                "unavailable": errno.EREMOTEIO, "bad-url": errno.EINVAL}
_SCHEMES = ("s3://", "file://")


def is_store_url(path: str) -> bool:
    """Whether ``path`` names a checkpoint in a store (``s3://``, ``file://``)."""
    return path.startswith(_SCHEMES)


@dataclass(frozen=True)
class RemoteConfig:
    """How a source in object storage reaches its store and the host's chunk cache.

    ``open_source(url, remote=RemoteConfig(...))`` passes it to the source (the
    daemon builds it from ``--s3-endpoint``, ``--cache-dir``, ``--cache-size`` and
    ``--no-cache``); without one, the defaults: the endpoint and credentials from the
    environment, the default cache directory (one that cannot be used there is
    skipped with a warning; an explicit ``cache_dir`` that cannot be is an error)."""

    endpoint: str | None = None  #: ``--s3-endpoint``; None: ``AWS_ENDPOINT_URL``... (docs/REMOTE.md)
    cache: bool = True  #: False: no host chunk cache (``--no-cache``)
    cache_dir: str | None = None  #: None: ``default_cache_dir()``
    cache_size: int | None = None  #: None: ``DEFAULT_CACHE_SIZE``
    fetch_bound: int = DEFAULT_FETCH_BOUND  #: the largest GET, rounded down to whole chunks (one at least)
    #: look up the working set kept with the checkpoint (the host cache's copy, else its
    #: GET) from open on, in a thread of its own, while start-up goes on: the daemon sets
    #: it where it will ask for it (:meth:`RemoteSource.stored_working_set`)
    working_set: bool = False
    policy: RetryPolicy | None = None  #: timeouts and retries; None: the store's defaults
    env: Mapping[str, str] | None = None  #: the environment to read; None: ``os.environ``
    #: the credentials, over the environment's (tests)
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.fetch_bound < 1:
            raise ValueError(f"fetch_bound must be at least 1, not {self.fetch_bound}")


@dataclass(slots=True)
class FetchCounts:
    """What a source's calls did (:meth:`RemoteSource.stats`)."""

    calls: int = 0  #: Op.CALL requests run
    chunks_cached: int = 0  #: chunks read from the host chunk cache
    chunks_fetched: int = 0  #: chunks fetched from the store
    gets: int = 0  #: ranged GETs of pages.img asked of the store (its retries are the store's)
    bytes_fetched: int = 0
    #: chunks (or stretches of them) whose GETs failed past the store's retries (a read
    #: touching one later fails at once, without a GET: not counted again)
    failures: int = 0
    wrong_chunks: int = 0  #: fetched chunks that did not hash to their checksum (kept out of the cache)
    staged_bytes: int = 0  #: bytes fetched through a staging buffer (not straight into memory)


class _Staging(threading.local):
    """One worker thread's staging buffer: an anonymous mapping, touched only as far as used."""

    buffer: mmap.mmap | None = None


class RemoteSource(CallSource):
    """A pages checkpoint in a store, open: its index fetched and checked, its pages
    object's size checked (see the module's docstring)."""

    kind = "pages"
    holes_known = True
    local: LocalPages | None = None  # no local file: reads only through requests
    #: :func:`~loader.source.open_source` passes its ``remote=`` configuration to it
    takes_remote = True
    #: its requests are :data:`aio.Op.CALL`: the daemon's queue must take calls
    needs_calls = True

    def __init__(self, url: str, index: PagesIndex, digest: int, store: ObjectStore, size: int,
                 cache: ChunkCache | None, fetch_bound: int) -> None:
        self.url = url
        self.index = index
        self.layout = index.layout
        self.chunk_size: int | None = index.chunk_size
        self.checksums: array[int] | None = index.checksums
        self.store = store
        self.cache = cache
        self._digest = digest
        self._size = size
        from ..remote import StoreError  # (loaded by now: the store is open)

        self._store_error = StoreError
        chunk = index.chunk_size
        self.fetch_bound = max(chunk, fetch_bound // chunk * chunk)
        self._staging = _Staging()
        #: fetched chunks go into the cache from the inserter's thread, off the fetch path,
        #: a block (``BLOCK_BYTES``: whole chunks, aligned in the pages file) an entry
        self.inserter: CacheInserter | None = None
        self._block_chunks = 1
        if cache is not None:
            from ..remote._cache import BLOCK_BYTES
            from ..remote._inserter import CacheInserter

            self._block_chunks = max(1, BLOCK_BYTES // chunk)
            self.inserter = CacheInserter(cache, digest, chunk, index.checksums, size, self._block_chunks)
        #: background calls reading the host cache at once, at most one a CPU, while the
        #: cache answers them: that part is CPU work (file reads, checks, copies), and
        #: --fetch-concurrency calls doing it together mostly handed the GIL round (a
        #: warm-cache fill 25 % faster; docs/REMOTE.md).  Waiters' calls do not wait for
        #: it; GETs are outside it; while the cache misses (``_cache_warm`` false: the
        #: last background call found nothing there) the look-ups are not held back.
        self._cache_slots = threading.BoundedSemaphore(aio.usable_cpus())
        self._cache_warm = True
        self._lock = threading.Lock()
        self._counts = FetchCounts()
        self._active = 0
        self._closing = False
        self._closed = False
        #: the last store error a call met (for the log and the stats); None: none yet
        self.last_error: str | None = None
        #: chunks that failed past the store's retries: chunk -> (store code, reason), at
        #: most ``MAX_BAD_CHUNKS`` (the oldest forgotten first): a read touching one fails
        #: at once, without a GET, and :meth:`failure` gives its waiters the store's message
        self._bad: dict[int, tuple[str, str]] = {}
        #: the cache's stats as a worker thread last took them (taking them waits for the
        #: cache's lock, which another daemon's directory walk may hold for seconds: never
        #: in the event loop), and when
        self._cache_stats: dict[str, Any] | None = None
        self._cache_stats_at = -math.inf
        #: the working set's look-up started at open (``RemoteConfig.working_set``), if any
        self._working_set: _WorkingSetLookup | None = None
        self._refresh_cache_stats()

    # -- registration --------------------------------------------------------------------------
    @classmethod
    def claims(cls, path: str) -> bool:
        return is_store_url(path)

    @classmethod
    def open(cls, path: str, *, scan: bool = True, direct: bool = False,
             remote: RemoteConfig | None = None) -> RemoteSource:
        """Fetch and check the index, check the pages object; raises
        :class:`CheckpointError` naming the URL at fault (one line) for a bad URL, a
        missing bucket, prefix or object, bad credentials, an unreachable endpoint, an
        index that is not one, a pages object of another size, or an explicit cache
        directory that cannot be used.  ``scan`` and ``direct`` mean nothing here."""
        from ..checkpoint import parse_pages_index
        from ..checkpoint._index import INDEX_NAME, MAX_INDEX_BYTES, PAGES_NAME
        from ..remote import ObjectStore, StoreError

        config = remote or RemoteConfig()
        try:
            store = ObjectStore(path, endpoint=config.endpoint, policy=config.policy, env=config.env,
                                access_key_id=config.access_key_id, secret_access_key=config.secret_access_key)
        except StoreError as exc:
            raise _checkpoint_error(exc, path) from None
        index_url = store.url.url_of(INDEX_NAME)
        head = _Background(lambda: store.head(PAGES_NAME))  # the pages object's HEAD alongside the index's GET
        get = _Background(lambda: store.get(INDEX_NAME, MAX_INDEX_BYTES))
        _import_for_open()  # what parsing the index and opening the cache need (70 ms), while both are in flight
        try:
            data = get.result()
        except StoreError as exc:
            error = _checkpoint_error(exc, index_url)
            if exc.code == "not-found":
                raise CheckpointError(index_url, f"{error.problem}: no checkpoint here, or one pushed only "
                                      "halfway (its index is put last)") from None
            raise error from None
        index = parse_pages_index(data, index_url)
        digest = xxhash.xxh3_64_intdigest(data)
        del data
        cache = _open_cache(config)
        lookup = None
        if config.working_set:  # (in a thread: while the HEAD ends and the daemon goes on)
            from ..core._workingset import max_file_bytes

            limit = max_file_bytes(index.layout.memory_size, index.layout.page_size)
            lookup = _WorkingSetLookup(store, cache, digest, limit)
        pages_url = store.url.url_of(PAGES_NAME)
        try:
            try:
                size = head.result()
            except StoreError as exc:
                raise _checkpoint_error(exc, pages_url) from None
            if size != index.pages_size:
                shorter = "shorter" if size < index.pages_size else "longer"
                raise CheckpointError(pages_url, f"the pages object is {shorter} than the index says: {size} "
                                      f"bytes, not {index.pages_size}")
        except BaseException:
            if lookup is not None:
                lookup.join(1.0)
            if cache is not None:
                cache.close()
            raise
        source = cls(path, index, digest, store, size, cache, config.fetch_bound)
        source._working_set = lookup
        return source

    # -- PageSource ----------------------------------------------------------------------------
    def files(self) -> tuple[str, ...]:
        return ()

    def data_estimate(self) -> int:
        return self.layout.data_bytes

    def describe(self) -> str:
        cache = f"chunk cache {self.cache.directory}" if self.cache is not None else "no chunk cache"
        return (f"pages checkpoint in {self.url} (pages.img {human(self._size)}, {len(self.index.checksums)} chunks "
                f"of {human(self.index.chunk_size)}; GETs of at most {human(self.fetch_bound)}; {cache})")

    def close(self) -> None:
        """Stop fetching: calls not yet in their GETs return ``-ECANCELED``; the cache is
        closed once no call uses it (a call still in a GET at shutdown closes it on
        its way out)."""
        with self._lock:
            self._closing = True
            last = self._active == 0
        if last:
            self._close_cache()

    # -- inspect and verify ----------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        """The checkpoint as :func:`~loader.checkpoint.describe_checkpoint` and the
        verify report take it (its paths are the objects' URLs)."""
        from ..checkpoint import Checkpoint
        from ..checkpoint._index import INDEX_NAME, PAGES_NAME

        url = self.store.url
        return Checkpoint("pages", self.url, url.url_of(PAGES_NAME), self.layout, self.index.chunk_size,
                          self.index.checksums, pages_size=self._size, index_path=url.url_of(INDEX_NAME),
                          source=self.index.source)

    def verify(self) -> VerifyReport:
        """``checkpoint verify`` of the checkpoint in the store: every byte of the pages
        object GET (in pieces of at most ``fetch_bound``, one buffer) and every chunk's
        xxh3_64 checked against the index; the cache is neither read nor filled.
        Raises :class:`CheckpointError` (naming the object) if a GET fails."""
        from ..checkpoint import BadChunk, VerifyReport
        from ..checkpoint._index import PAGES_NAME

        started = time.perf_counter()
        ckpt = self.checkpoint()
        c, size, sums = self.index.chunk_size, self._size, self.index.checksums
        bad: list[BadChunk] = []
        buffer = private_mapping(self.fetch_bound)
        view = memoryview(buffer)
        try:
            for lo in range(0, size, self.fetch_bound):
                hi = min(lo + self.fetch_bound, size)
                try:
                    got = self.store.get_range_into(PAGES_NAME, lo, view[: hi - lo])
                except self._store_error as exc:
                    raise _checkpoint_error(exc, ckpt.pages_path) from None
                for k in range(lo // c, -(-hi // c)):
                    a, b = k * c, min((k + 1) * c, size)
                    actual = xxhash.xxh3_64_intdigest(view[a - lo : b - lo]) if b - lo <= got else None
                    if actual != sums[k]:
                        bad.append(BadChunk(k, a, b - a, sums[k], actual, tuple(ckpt.memory_spans(a, b))))
        finally:
            view.release()
            buffer.close()
        return VerifyReport(self.url, "pages", True, len(sums), size, tuple(bad), time.perf_counter() - started)

    def stored_working_set(self, max_bytes: int) -> tuple[str, bytes] | None:
        """The working set pushed with the checkpoint (``PREFIX/working-set.msgpack``,
        one GET of at most ``max_bytes``), for the daemon to replay before the sweep:
        (its URL, its bytes), or None where there is none.  The host chunk cache keeps
        it, and its absence for a while (:mod:`._remote_ws`): a second restore on the
        host makes no GET for it.  Looked up from open on where ``RemoteConfig.working_set``
        asked for it.  Raises
        :class:`~loader.core._workingset.WorkingSetError` (one line naming it) where it
        cannot be fetched."""
        lookup = self._working_set
        if lookup is None or lookup.max_bytes != max_bytes:
            if lookup is not None:
                lookup.join(1.0)
            lookup = self._working_set = _WorkingSetLookup(self.store, self.cache, self._digest, max_bytes)
        return lookup.result()

    # -- failures ------------------------------------------------------------------------------
    #: the most failed chunks remembered (:meth:`failure`; a forgotten one is fetched again)
    MAX_BAD_CHUNKS = 4096

    def failure(self, file_offset: int, length: int, err: int) -> tuple[str, str] | None:
        """Why a read of the pages file's ``[file_offset, file_offset + length)`` failed
        with ``err``, where the store is the reason (the loader asks, for its error to
        the waiters): ``("unavailable", the store's message)`` when a chunk there failed
        past the store's retries (or, for ``not-found``/``denied`` in the middle of a
        restore, at once); None otherwise (the loader's own mapping: ``io-error``)."""
        c = self.index.chunk_size
        first, last = file_offset // c, (file_offset + max(length, 1) - 1) // c
        with self._lock:
            bad = self._bad
            if not bad:
                return None
            if last - first < len(bad):
                found = next((bad[k] for k in range(first, last + 1) if k in bad), None)
            else:
                found = next((v for k, v in bad.items() if first <= k <= last), None)
        if found is None:
            return None
        from protocol import codes

        return codes.UNAVAILABLE, found[1]

    def _remember(self, k0: int, k1: int, code: str, reason: str) -> None:
        """Chunks ``k0..k1`` failed past the store's retries (bounded; oldest out first)."""
        record = (code, reason)
        with self._lock:
            bad = self._bad
            for k in range(k0, k1 + 1):
                bad.pop(k, None)
                bad[k] = record
            while len(bad) > self.MAX_BAD_CHUNKS:
                del bad[next(iter(bad))]

    def _last_try(self, k0: int, k1: int, a: int, target: memoryview,
                  exc: StoreError) -> tuple[int, int, int, StoreError]:
        """A GET of the stretch of chunks ``k0..k1`` (at pages-file offset ``a``, into
        ``target``) failed every try but the last with ``unavailable`` (a 5xx, a reset,
        a response cut short: perhaps one chunk's bytes only).  The last try goes chunk
        by chunk, without retries: so a chunk that keeps failing costs at most 1 +
        ``retries`` GETs and is told apart from its neighbours, which are fetched.
        Each chunk that fails is remembered.  Returns the bytes in ``target`` in order
        (short at the first chunk that failed), the GETs made, the chunks that failed,
        and the first one's error (``exc`` if none failed)."""
        c, size, store = self.index.chunk_size, self._size, self.store
        retries = store.policy.retries
        store.backoff(retries)
        got = gets = extra = lost = 0
        first: StoreError | None = None
        for k in range(k0, k1 + 1):
            if self._closing:
                break
            ca, cb = k * c - a, min((k + 1) * c, size) - a
            gets += 1
            try:
                n = store.get_range_into("pages.img", k * c, target[ca:cb], retries=0)
            except self._store_error as e:
                tries = f"{max(retries, 1) + 1} tries"
                self._remember(k, k, e.code, f"{e.message} (after {tries}, the last for chunk {k} alone)")
                first = first or e
                lost += 1
                continue
            if first is None:
                got += n
            else:
                extra += n  # (fetched, but after a failed chunk: not in the bytes returned)
            if n < cb - ca:  # the object ended first
                break
        if extra:
            with self._lock:
                self._counts.bytes_fetched += extra
        if first is not None:
            self._note_error(first)
        return got, gets, lost, first or exc

    # -- statistics ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The daemon's ``remote`` statistics: the store's, the cache's, this source's fetching."""
        from dataclasses import asdict

        with self._lock:
            counts = asdict(self._counts)
            last = self.last_error
            cache = self._cache_stats
            at = self._cache_stats_at
        if cache is not None:
            cache = {**cache, "age_s": round(time.monotonic() - at, 3)}
        inserter = self.inserter.stats().as_dict() if self.inserter is not None else None
        if inserter is not None:
            counts["wrong_chunks"] += inserter["wrong"]
        return {"url": self.url, "store": asdict(self.store.stats()), "fetch": counts, "last_error": last,
                "fetch_bound": self.fetch_bound, "cache": cache, "inserter": inserter}

    def progress_note(self, elapsed_s: float) -> str:
        """What the daemon's progress lines add for a source in a store: the bytes
        fetched from it and their rate over ``elapsed_s`` (the loader's time), and the
        share of chunks the host chunk cache gave (``fetched 123 MiB at 85.0 MB/s, cache
        40% hits``), and the chunks that failed, if any."""
        with self._lock:
            n = self._counts
            fetched, cached, from_store, failures = n.bytes_fetched, n.chunks_cached, n.chunks_fetched, n.failures
        rate = fetched / elapsed_s / 1e6 if elapsed_s > 0 else 0.0
        note = f"fetched {human(fetched)} at {rate:.1f} MB/s"
        if self.cache is not None:
            chunks = cached + from_store
            note += f", cache {100 * cached / chunks:.0f}% hits" if chunks else ", cache -% hits"
        if failures:
            note += f", {failures} failed past the store's retries"
        return note

    #: how often the calls take the cache's stats again (seconds)
    CACHE_STATS_EVERY = 0.5

    def _refresh_cache_stats(self) -> None:
        """Take the cache's stats (in a worker thread, or at open and close)."""
        cache = self.cache
        if cache is None:
            return
        taken = cache.stats().as_dict()
        with self._lock:
            self._cache_stats = taken
            self._cache_stats_at = time.monotonic()

    # -- fetching ------------------------------------------------------------------------------
    def _call(self, lo: int, buffers: Sequence[memoryview], urgent: bool = False) -> int:
        with self._lock:
            if self._closing:
                return -errno.ECANCELED
            self._active += 1
            self._counts.calls += 1
        try:
            return self._fetch(lo, buffers, urgent)
        finally:
            with self._lock:
                self._active -= 1
                last = self._closing and self._active == 0
            if last:
                self._close_cache()

    def _fetch(self, lo: int, buffers: Sequence[memoryview], urgent: bool = False) -> int:
        """Put the pages file's bytes from ``lo`` on into ``buffers``; the bytes put, in
        order (short at the object's end or at the first failed GET), or -errno.
        ``urgent``: a waiter's call (its chunks never wait for room in the inserter)."""
        want = sum(len(b) for b in buffers)
        hi = min(lo + want, self._size)
        if hi <= lo:
            return 0
        c = self.index.chunk_size
        # where each buffer starts in the pages file
        starts: list[int] = []
        pos = lo
        for buf in buffers:
            starts.append(pos)
            pos += len(buf)
        cache, inserter = self.cache, self.inserter
        first, last = lo // c, (hi - 1) // c
        missing: list[int] = []
        hits = 0
        if cache is None:
            missing.extend(range(first, last + 1))
        else:  # block by block: from the inserter's slots, else the cache, else to fetch
            per = self._block_chunks
            slots = None if urgent or not self._cache_warm else self._cache_slots
            if slots is not None:
                slots.acquire()
            try:
                for block in range(first // per, last // per + 1):
                    hits += self._lookup(block, max(first, block * per), min(last, block * per + per - 1), starts,
                                         buffers, lo, hi, missing, urgent)
            finally:
                if slots is not None:
                    slots.release()
            if not urgent:
                self._cache_warm = hits > 0  # (a plain store: the next calls read as this one did)
        failed_at: int | None = None
        error = 0
        fetched = gets = staged = nbytes = failures = 0
        run_start = 0
        bad = self._bad
        # with a cache, a stretch stays within one block (one slot); a call of the sweep
        # fetches its blocks whole (_lookup), the chunks outside its bytes into the slot
        split = self._block_chunks if cache is not None else 0
        while run_start < len(missing):
            # a stretch of contiguous missing chunks, at most fetch_bound bytes
            k0 = missing[run_start]
            known = bad.get(k0) if bad else None  # (a dict's get and `in` are atomic)
            if known is not None and not first <= k0 <= last:  # outside the call's bytes: not needed
                run_start += 1
                continue
            if known is not None:  # failed past its retries before: not fetched again
                failed_at, error = k0 * c, STORE_ERRNOS.get(known[0], errno.EIO)
                break
            run_end = run_start + 1
            limit = self.fetch_bound // c
            while (run_end < len(missing) and missing[run_end] == missing[run_end - 1] + 1
                   and run_end - run_start < limit and not (bad and missing[run_end] in bad)
                   and not (split and missing[run_end] % split == 0)):
                run_end += 1
            k1 = missing[run_end - 1]
            a, b = k0 * c, min((k1 + 1) * c, self._size)
            if self._closing:
                failed_at, error = a, errno.ECANCELED
                break
            direct = _inside(starts, buffers, a, b, lo, hi)
            slot = None
            if direct is None and inserter is not None:  # straight into the block's slot
                block = k0 // split
                slot = inserter.claim(block, urgent=urgent)
            if slot is not None:
                at = block * split * c
                target = slot[a - at : b - at]
            else:
                target = direct if direct is not None else self._stage(b - a)
            gets += 1
            retries = self.store.policy.retries
            try:  # (a stretch of several chunks keeps its last try for them one by one)
                got = self.store.get_range_into("pages.img", a, target,
                                                retries=retries - 1 if k1 > k0 and retries else None)
            except self._store_error as exc:
                self._note_error(exc)
                if k1 > k0 and exc.code == "unavailable":
                    got, more, lost, exc = self._last_try(k0, k1, a, target, exc)
                    gets += more
                    failures += lost
                else:  # one chunk, or the object (or the store) at fault: all of it failed
                    self._remember(k0, k1, exc.code, _reason(exc))
                    got = 0
                    failures += 1
                if got < b - a and a < hi and b > lo:  # (a stretch outside the call's bytes: not needed)
                    failed_at, error = a + got, STORE_ERRNOS.get(exc.code, errno.EIO)
            except BaseException:
                if slot is not None:  # let go: nothing arrived in it
                    inserter.filled(block, k0, k0 - 1)  # type: ignore[union-attr]
                raise
            whole = 0  # the stretch's chunks that arrived whole
            while k0 + whole <= k1 and min((k0 + whole + 1) * c, self._size) - a <= got:
                whole += 1
            fetched += whole
            if slot is not None:
                inserter.filled(block, k0, k0 + whole - 1)  # type: ignore[union-attr]
            elif inserter is not None and whole:  # copied into its block's slot; never cached wrong
                inserter.offer(k0, target[: min((k0 + whole) * c, self._size) - a], urgent=urgent)
            if failed_at is not None and got == 0:
                break
            nbytes += got
            if direct is None:
                if slot is None:
                    staged += got
                _scatter(target[:got], a, starts, buffers, lo, hi)
            if failed_at is not None:  # the chunks before the failed one are kept
                break
            if got < b - a and a < hi and b > lo:  # the object ended first (it shrank since the HEAD)
                failed_at = a + got
                break
            run_start = run_end
        with self._lock:
            n = self._counts
            n.chunks_cached += hits
            n.chunks_fetched += fetched
            n.gets += gets
            n.bytes_fetched += nbytes
            n.staged_bytes += staged
            n.failures += failures
            stale = time.monotonic() - self._cache_stats_at > self.CACHE_STATS_EVERY
        if stale and cache is not None and not self._closing:
            self._refresh_cache_stats()
        if failed_at is None or failed_at >= hi:  # (a widened stretch's failure past the call's bytes)
            return hi - lo
        done = max(0, failed_at - lo)
        if done:
            return done
        return -(error or errno.EIO)

    def _lookup(self, block: int, k0: int, k1: int, starts: list[int], buffers: Sequence[memoryview], lo: int,
                hi: int, missing: list[int], urgent: bool) -> int:
        """Chunks ``k0..k1`` of ``block`` into the buffers from the inserter's slots
        (first: a chunk on its way into the cache is never fetched twice) or from the
        cache; the others are appended to ``missing`` and, for a call of the sweep
        (not ``urgent``), the block's chunks outside the call too, but those a slot
        holds or that failed before: the block is fetched whole, to be cached whole
        (a waiter's call fetches only its chunks).  Returns the chunks found."""
        c, size, n = self.index.chunk_size, self._size, self._block_chunks
        cache, inserter, sums = self.cache, self.inserter, self.index.checksums
        assert cache is not None
        bfirst = block * n
        bcount = min(n, len(sums) - bfirst)
        blength = min(bcount * c, size - bfirst * c)
        held = inserter.held(block) if inserter is not None else 0
        need: list[int] = []
        found = 0
        a, b = k0 * c, min((k1 + 1) * c, size)
        pieces = _pieces(starts, buffers, a, b, lo, hi) if not held else None
        if pieces is not None:  # one read of the block's entry: the header and these chunks, into their places
            if cache.read_block_into(self._digest, c, sums[bfirst : bfirst + bcount], blength, k0 - bfirst, pieces):
                return k1 - k0 + 1
            need.extend(range(k0, k1 + 1))
        else:  # chunk by chunk (a slot holds some, or they reach outside the call's bytes)
            entry = True
            for k in range(k0, k1 + 1):
                ca, cb = k * c, min((k + 1) * c, size)
                view = _inside(starts, buffers, ca, cb, lo, hi)
                into = view if view is not None else self._stage(cb - ca)
                got = bool((held >> (k - bfirst)) & 1 and inserter is not None and inserter.read_into(k, into))
                if not got and entry:
                    got = cache.read_block_into(self._digest, c, sums[bfirst : bfirst + bcount], blength, k - bfirst,
                                                into)
                    entry = got  # no entry (or a bad one, dropped): not asked again
                if got:
                    found += 1
                    if view is None:
                        _scatter(into, ca, starts, buffers, lo, hi)
                else:
                    need.append(k)
        if not need:
            return found
        if urgent or inserter is None:
            missing.extend(need)
            return found
        bad = self._bad
        wanted = set(need)
        for k in range(bfirst, bfirst + bcount):
            if k in wanted or (not k0 <= k <= k1 and not (held >> (k - bfirst)) & 1 and not (bad and k in bad)):
                missing.append(k)
        return found

    def _stage(self, n: int) -> memoryview:
        """This thread's staging buffer's first ``n`` bytes (``n`` <= fetch_bound)."""
        buffer = self._staging.buffer
        if buffer is None:
            buffer = self._staging.buffer = private_mapping(self.fetch_bound)
        return memoryview(buffer)[:n]

    def _note_error(self, exc: StoreError) -> None:
        line = str(exc)
        with self._lock:
            first = self.last_error != line
            self.last_error = line
        if first:
            log.warning("fetching %s", line)

    def _close_cache(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.inserter is not None:
            self.inserter.close()  # what is queued goes into the cache first (bounded)
        if self._working_set is not None:
            self._working_set.join(2.0)  # (its keeping in the cache, bounded)
        if self.cache is not None:
            self._refresh_cache_stats()
            self.cache.close()


def _import_for_open() -> None:
    """Import what :meth:`RemoteSource.open` needs once its index has come (while its
    GET, and the pages object's HEAD, are in flight, each in a thread of its own)."""
    import numpy  # noqa: F401  (the index's range table; the cache's index)

    from ..remote import _cache  # noqa: F401


class _Background(Generic[_R]):
    """``fn()`` run in a thread of its own (a request sent alongside another);
    :meth:`result` waits for it and returns what it returned or raises what it raised."""

    def __init__(self, fn: Callable[[], _R]) -> None:
        self._fn = fn
        self._value: _R | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pageload-open", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # noqa: BLE001 - raised again by result()
            self._error = exc

    def result(self) -> _R:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return cast(_R, self._value)


class _WorkingSetLookup:
    """The working set kept with a checkpoint in a store, looked up in a thread of its
    own: the host cache's copy (:func:`._remote_ws.kept_working_set`), else one GET
    (then kept in the cache, or its absence, after :meth:`result` has it: never on the
    start-up path, where a cache's first insert may walk its directory)."""

    def __init__(self, store: ObjectStore, cache: ChunkCache | None, identity: int, max_bytes: int) -> None:
        self.store, self.cache, self.identity, self.max_bytes = store, cache, identity, max_bytes
        self._done = threading.Event()
        self._found: tuple[str, bytes] | None = None
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="pageload-working-set", daemon=True)
        self._thread.start()

    def result(self) -> tuple[str, bytes] | None:
        """(its URL, its bytes) or None (there is none); raises ``WorkingSetError``."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._found

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        from ..core._workingset import DEFAULT_NAME, WorkingSetError
        from ..remote import StoreError
        from ._remote_ws import keep_working_set, kept_working_set, pointer_key

        store, cache = self.store, self.cache
        url = store.url.url_of(DEFAULT_NAME)
        key = pointer_key(self.identity, url, store.endpoint) if cache is not None else b""
        fetched = False
        data: bytes | None = None
        try:
            kept = kept_working_set(cache, key, self.identity, self.max_bytes) if cache is not None else None
            if kept is not None:
                data = kept or None  # (ABSENT: none, as the cache found not long ago)
            else:
                try:
                    data = store.get_if_there(DEFAULT_NAME, self.max_bytes)
                    fetched = True
                except StoreError as exc:
                    self._error = WorkingSetError(url, _checkpoint_error(exc, url).problem)
            self._found = None if data is None else (url, data)
        except Exception as exc:  # noqa: BLE001 - a cache that fails: a warning, no working set
            self._error = WorkingSetError(url, f"looking it up: {exc}")
        finally:
            self._done.set()
        if fetched and cache is not None:
            try:
                keep_working_set(cache, key, self.identity, data)
            except Exception as exc:  # noqa: BLE001 - (a closed cache at shutdown): only not kept
                log.debug("working set %s not kept in the cache: %s", url, exc)


def _inside(starts: list[int], buffers: Sequence[memoryview], a: int, b: int, lo: int, hi: int) -> memoryview | None:
    """The part of one buffer that holds pages-file bytes [a, b) exactly, if one does
    (and [a, b) lies within the read's [lo, hi)); else None."""
    if a < lo or b > hi:
        return None
    for start, buf in zip(starts, buffers):
        if start <= a and b <= start + len(buf):
            return buf[a - start : b - start]
        if start > a:
            break
    return None


def _pieces(starts: list[int], buffers: Sequence[memoryview], a: int, b: int, lo: int,
            hi: int) -> list[memoryview] | None:
    """The parts of the buffers that hold pages-file bytes [a, b), in order (one where a
    buffer holds them all; several where they lie in memory between holes), if [a, b)
    lies within the read's [lo, hi); else None."""
    if a < lo or b > hi:
        return None
    out: list[memoryview] = []
    for start, buf in zip(starts, buffers):
        s, e = max(start, a), min(start + len(buf), b)
        if s < e:
            out.append(buf[s - start : e - start])
        elif start >= b:
            break
    return out


def _scatter(data: memoryview, a: int, starts: list[int], buffers: Sequence[memoryview], lo: int, hi: int) -> None:
    """Copy ``data`` (pages-file bytes from ``a`` on) into the parts of ``buffers`` it overlaps."""
    end = a + len(data)
    for start, buf in zip(starts, buffers):
        s, e = max(start, a), min(start + len(buf), end)
        if s < e:
            buf[s - start : e - start] = data[s - a : e - a]


def _reason(exc: StoreError) -> str:
    """A store's error as the reason a waiter is given: its message (naming the object,
    saying what went wrong and after how many retries), with its code unless that is
    ``unavailable`` (the waiter's code already)."""
    return exc.message if exc.code == "unavailable" else str(exc)


def _checkpoint_error(exc: StoreError, where: str) -> CheckpointError:
    """A store's error at start-up as one line naming ``where`` (the object's URL)."""
    detail = exc.message
    for prefix in (f"{where}: ", f"{where.rstrip('/')}: "):
        if detail.startswith(prefix):
            detail = detail[len(prefix):]
            break
    else:
        head, sep, rest = detail.partition(": ")
        if sep and is_store_url(head):
            where, detail = head, rest
    return CheckpointError(where, f"{detail} ({exc.code})")


def _open_cache(config: RemoteConfig) -> ChunkCache | None:
    if not config.cache:
        return None
    from ..remote import DEFAULT_CACHE_SIZE, CacheError, ChunkCache

    size = config.cache_size if config.cache_size is not None else DEFAULT_CACHE_SIZE
    try:
        return ChunkCache(config.cache_dir, size)
    except CacheError as exc:
        if config.cache_dir is not None:
            path, _, problem = str(exc).partition(": ")
            raise CheckpointError(path, f"{problem} (the chunk cache: give another --cache-dir, or --no-cache)") \
                from None
        log.warning("no chunk cache: %s", exc)
        return None
