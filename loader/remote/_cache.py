"""The host chunk cache: checksum chunks of remote checkpoints, shared by every daemon
of one user on a host (docs/REMOTE.md, "The host chunk cache").

On disk, under the cache directory ``DIR`` (:func:`default_cache_dir`; the files,
the lock, the header and the journal are handled in ``_cache_files.py``)::

    DIR/v1/lock                                   flock; the shared totals (header)
    DIR/v1/journal                                what was inserted, 32 bytes a chunk
    DIR/v1/<identity>/<cc>/<checksum>-<length>    one chunk: its bytes, nothing else
    DIR/v1/<identity>/<cc>/.tmp-<pid>-<random>    an insert in progress

``<identity>`` is the checkpoint's identity digest (16 hex digits: a pages
checkpoint's is the xxh3_64 of its index, which holds every chunk's checksum),
``<checksum>`` the chunk's xxh3_64 (16 hex digits), ``<cc>`` its first two, and
``<length>`` its length in bytes (decimal).  Two checkpoints never share a key, and
a chunk is found without reading anything but itself.

* Every read verifies the chunk's xxh3_64: a corrupt, truncated, extended or
  replaced entry (a symlink, a FIFO, ...) is removed, counted and reported as a miss.
* An insert refuses bytes whose checksum is not the key's, writes a temporary file
  (``O_EXCL|O_NOFOLLOW``, 0600) in the entry's directory and renames it into place
  under the lock; the same chunk inserted by two daemons at once is two renames of
  identical bytes.
* Bounded: before an insert, least-recently-used entries are removed until the
  chunk fits under ``max_bytes``.  Recency is kept in memory, exactly, for the
  entries this process knows, and on disk as the entry's mtime (touched by a read
  at most every :data:`TOUCH_INTERVAL_NS`), which is how one daemon's reads keep an
  entry alive against another daemon's eviction.
* The in-memory index (:class:`_Index`, ``_cache_index.py``) is an open-addressing hash table over four
  NumPy columns: 24 bytes a slot, 32 to 80 bytes an entry, no Python object
  per entry.  It is built by one directory walk, at the first insert (or
  :meth:`ChunkCache.load_index`), and kept current from the journal: other daemons'
  inserts are read from it, 32 bytes each, at every insert (under the lock).  A walk happens
  again only when some daemon compacts the journal (it grew past twice the entries),
  or when the totals say the cache is over its bound and this index has nothing left
  to remove (the totals drifted: a daemon died between a rename and its accounting).

:class:`ChunkCache` decides: reads, inserts, eviction, prune, when to walk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xxhash

from .._units import parse_size
from ._cache_files import MAX_CHUNK, CacheError, CacheFiles, entry_name
from ._cache_index import _M64, _Index

__all__ = [
    "CONTENT_NAMESPACE",
    "DEFAULT_CACHE_SIZE",
    "CacheError",
    "CacheStats",
    "ChunkCache",
    "PruneReport",
    "default_cache_dir",
    "parse_cache_size",
]

#: ``--cache-size`` when none is given
DEFAULT_CACHE_SIZE = 16 << 30
#: the identity under which a chunk store's chunks are kept, content-addressed: the
#: same chunk of any snapshot is one entry (``DIR/v1/626c616b65330000/``: "blake3")
CONTENT_NAMESPACE = int.from_bytes(b"blake3\0\0", "big")
#: a read touches an entry's mtime when it is older than this (the on-disk recency's
#: granularity; the in-memory recency is exact)
TOUCH_INTERVAL_NS = 10 * 1_000_000_000


def default_cache_dir() -> str:
    """Where the cache is when ``--cache-dir`` is not given.

    ``$CACHE_DIRECTORY`` (systemd's ``CacheDirectory=``, its first entry) if set; for
    root, ``/var/cache/pageload`` (every root daemon on the host shares one); else
    ``$XDG_CACHE_HOME/pageload`` (an absolute ``XDG_CACHE_HOME`` only, as the XDG
    specification says), else ``$HOME/.cache/pageload`` when ``$HOME`` is writable,
    else ``/var/cache/pageload``.
    """
    systemd = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if systemd:
        return systemd
    if os.geteuid() == 0:
        return "/var/cache/pageload"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, "pageload")
    home = os.environ.get("HOME", "")
    if os.path.isabs(home) and os.access(home, os.W_OK):
        return os.path.join(home, ".cache", "pageload")
    return "/var/cache/pageload"


def parse_cache_size(text: str) -> int:
    """``--cache-size``: a size with a K/M/G/T suffix (:func:`loader.parse_size`), at least 1."""
    value = parse_size(text)
    if value < 1:
        raise ValueError(f"a cache size must be at least 1 byte, not {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class CacheStats:
    """The cache's totals (shared by every daemon: the header's) and this process's counts."""

    directory: str
    max_bytes: int
    entries: int
    bytes: int
    hits: int
    misses: int
    corrupt_dropped: int
    evictions: int
    inserts: int
    insert_failures: int
    walks: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class PruneReport:
    entries: int
    bytes: int


class ChunkCache:
    """A host chunk cache in ``directory``, kept under ``max_bytes``.

    Thread-safe; any number of processes of the same user may open the same
    directory.  ``create=False`` refuses a directory that does not exist yet (the
    ``pageload cache`` commands).  Raises :class:`CacheError` for a directory that
    cannot be used: a symbolic link, not a directory, owned by another user, writable
    by its group or others.
    """

    def __init__(self, directory: str | None = None, max_bytes: int = DEFAULT_CACHE_SIZE, *,
                 fsync: bool = False, create: bool = True) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self.directory = os.path.abspath(directory if directory is not None else default_cache_dir())
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._mutex = threading.RLock()  # flock does not exclude this process's threads
        self._hits = self._misses = self._corrupt = self._evictions = 0
        self._inserts = self._insert_failures = self._walks = 0
        self._index: _Index | None = None
        self._idents: list[int] = []
        self._ident_no: dict[int, int] = {}
        #: the least recently used entries, oldest first, as chosen: slots, recency, next, generation
        self._victims: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int, int] | None = None
        self._files = CacheFiles(self.directory, self._mutex, create=create)

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> ChunkCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _check_key(identity: int, checksum: int, length: int) -> None:
        if not (0 <= identity <= _M64 and 0 <= checksum <= _M64):
            raise ValueError("identity and checksum are 64-bit digests")
        if not 1 <= length <= MAX_CHUNK:
            raise ValueError(f"a chunk's length is 1 to {MAX_CHUNK}, not {length}")

    # -- the index and the shared totals -----------------------------------------------------

    def _account(self, dbytes: int, dentries: int) -> None:
        """Under the lock, after a change on disk: add it to the shared totals (an
        unreadable header is recounted instead, by a walk that sees the change)."""
        header = self._files.header()
        if header is None:
            self._walk()
            return
        total, entries, gen = header
        self._files.put_header(total + dbytes, entries + dentries, gen)

    def _ident(self, identity: int) -> int:
        no = self._ident_no.get(identity)
        if no is None:
            no = self._ident_no[identity] = len(self._idents)
            self._idents.append(identity)
        return no

    def _catch_up(self) -> None:
        """Under the lock: this index knows every entry inserted so far (walks if it must)."""
        files = self._files
        header = files.header()
        if self._index is None or header is None or header[2] != files.journal_gen:
            self._walk()
            return
        index = self._index
        for identity, checksum, length, tick in files.news():
            index.add(self._ident(identity), checksum, length, tick)
        files.compact(header)

    def _walk(self) -> None:
        """Under the lock: rebuild the index and the shared totals from one directory walk
        (which also removes what cannot be an entry: :meth:`CacheFiles.walk`)."""
        self._walks += 1
        self._victims = None
        self._idents.clear()
        self._ident_no.clear()
        columns, corrupt = self._files.walk(self._ident)
        self._corrupt += corrupt
        index = _Index()
        index.bulk(*columns)
        self._index = index
        header = self._files.header()
        gen = header[2] if header is not None else 0
        lengths = columns[2]
        self._files.put_header(int(lengths.sum()), int(lengths.size), gen)
        self._files.read_all(gen)

    def load_index(self) -> None:
        """Build the in-memory index now (one directory walk) rather than at the first
        insert: a daemon may call it in a worker thread at start-up."""
        with self._files.locked():
            self._catch_up()

    # -- reads ---------------------------------------------------------------------------------

    def read_into(self, identity: int, checksum: int, length: int, buffer: Any) -> bool:
        """Read the chunk into ``buffer`` (``length`` bytes, writable) and verify it.

        True: ``buffer`` holds the chunk, checked against ``checksum``.  False: a miss
        (then ``buffer``'s contents are undefined: a corrupt entry's bytes may be in it,
        and the entry is gone).  One copy: the file is read straight into ``buffer``.
        """
        self._check_key(identity, checksum, length)
        view = memoryview(buffer).cast("B")
        if len(view) != length or view.readonly:
            raise ValueError(f"buffer must be {length} writable bytes")
        name = entry_name(checksum, length)
        with self._files.shard(identity, checksum, create=False) as shard:
            if shard is None:
                return self._miss()
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=shard)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EACCES):  # a symlink, a socket, mode 0
                    self._drop(identity, checksum, length, shard, name, None)
                return self._miss()  # missing (or, say, EMFILE: a miss costs a fetch, nothing else)
            try:
                st = os.fstat(fd)
                good = stat.S_ISREG(st.st_mode) and st.st_size == length
                if good:
                    done = 0
                    try:
                        while done < length:
                            n = os.preadv(fd, [view[done:]], done)
                            if n <= 0:
                                break
                            done += n
                    except OSError:  # EIO: the entry is as bad as a corrupt one
                        pass
                    good = done == length and xxhash.xxh3_64_intdigest(view) == checksum
                if not good:
                    self._drop(identity, checksum, length, shard, name, st)
                    return self._miss()
                now = time.time_ns()
                if now - st.st_mtime_ns > TOUCH_INTERVAL_NS:
                    with contextlib.suppress(OSError):
                        os.utime(fd, ns=(st.st_atime_ns, now))
            finally:
                os.close(fd)
        with self._mutex:
            self._hits += 1
            if self._index is not None:
                self._index.add(self._ident(identity), checksum, length, now)
        return True

    def _miss(self) -> bool:
        with self._mutex:
            self._misses += 1
        return False

    def _drop(self, identity: int, checksum: int, length: int, shard: int, name: str,
              seen: os.stat_result | None) -> None:
        """Remove a bad entry, if it is still the one found bad (another daemon may have
        put a good one there since: renames happen under the lock)."""
        with self._files.locked():
            try:
                now = os.stat(name, dir_fd=shard, follow_symlinks=False)
            except FileNotFoundError:
                return
            if seen is not None and (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
                return
            try:
                os.unlink(name, dir_fd=shard)
            except OSError:  # gone, or a directory: not ours to remove, reads of it keep missing
                return
            self._corrupt += 1
            self._account(-length, -1)
            self._forget(identity, checksum, length)

    def _forget(self, identity: int, checksum: int, length: int) -> None:
        if self._index is not None and identity in self._ident_no:
            slot = self._index.find(self._ident_no[identity], checksum, length)
            if slot >= 0:
                self._index.remove(slot)

    # -- inserts and eviction ----------------------------------------------------------------

    def insert(self, identity: int, checksum: int, data: Any) -> bool:
        """Add a chunk: ``data`` (any buffer) must hash to ``checksum`` (ValueError
        otherwise: the cache never holds wrong bytes).  True if the chunk is in the
        cache afterwards; False if it could not be stored (no space, an I/O error, a
        chunk larger than the bound), which costs a later fetch and nothing else."""
        view = memoryview(data).cast("B")
        length = len(view)
        self._check_key(identity, checksum, length)
        if xxhash.xxh3_64_intdigest(view) != checksum:
            raise ValueError(f"refused: the data's xxh3_64 is not {checksum:#018x}")
        if length > self.max_bytes:
            return self._failed()
        name = entry_name(checksum, length)
        with self._files.shard(identity, checksum, create=True) as shard:
            if shard is None:
                return self._failed()
            temp = f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=shard)
            except OSError:
                return self._failed()
            try:
                try:
                    done = 0
                    while done < length:
                        done += os.write(fd, view[done:])
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                return self._place(identity, checksum, length, shard, temp, name)
            except OSError:
                return self._failed()
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=shard)

    def _failed(self) -> bool:
        with self._mutex:
            self._insert_failures += 1
        return False

    def _place(self, identity: int, checksum: int, length: int, shard: int, temp: str, name: str) -> bool:
        with self._files.locked():
            self._catch_up()
            assert self._index is not None
            try:
                there = os.stat(name, dir_fd=shard, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            if there is None and not self._make_room(length):
                return self._failed()
            os.rename(temp, name, src_dir_fd=shard, dst_dir_fd=shard)
            now = time.time_ns()
            if there is None:
                self._account(length, 1)
                self._files.append(identity, checksum, length, now)
            self._index.add(self._ident(identity), checksum, length, now)
            self._inserts += 1
            return True

    def _make_room(self, length: int, bound: int | None = None) -> bool:
        """Under the lock, caught up: evict least recently used entries until ``length``
        more bytes fit under ``bound``."""
        bound = self.max_bytes if bound is None else bound
        walked = False
        while True:
            header = self._files.header()
            assert header is not None and self._index is not None
            if header[0] + length <= bound:
                return True
            if not self._evict_one():
                if walked:
                    return False
                self._walk()  # nothing known left: the totals count what this index does not
                walked = True

    def _evict_one(self) -> bool:
        """Remove the least recently used entry (False when this index has none).  An
        entry read by another daemon since (its mtime is newer than what this index
        knows) gets that recency and stays."""
        index = self._index
        assert index is not None
        while True:
            v = self._victims
            if v is None or v[2] >= v[0].size or v[3] != index.generation:
                if index.live == 0:
                    self._victims = None
                    return False
                slots, ticks = index.oldest(max(256, index.live // 64))
                v = (slots, ticks, 0, index.generation)
            slots, ticks, at, generation = v
            self._victims = (slots, ticks, at + 1, generation)
            slot, tick = int(slots[at]), int(ticks[at])
            if int(index.ident[slot]) < 2 or int(index.tick[slot]) != tick:
                continue  # removed, or read, since it was chosen
            identity = self._idents[int(index.ident[slot]) - 2]
            checksum, length = int(index.checksum[slot]), int(index.length[slot])
            name = entry_name(checksum, length)
            with self._files.shard(identity, checksum, create=False) as shard:
                if shard is None:
                    index.remove(slot)
                    continue
                try:
                    st = os.stat(name, dir_fd=shard, follow_symlinks=False)
                except FileNotFoundError:
                    index.remove(slot)
                    continue
                if st.st_mtime_ns > tick:
                    index.tick[slot] = st.st_mtime_ns
                    self._victims = None  # the order changed: choose again
                    continue
                try:
                    os.unlink(name, dir_fd=shard)
                except FileNotFoundError:
                    index.remove(slot)
                    continue
            index.remove(slot)
            self._evictions += 1
            self._account(-length, -1)
            return True

    # -- content-addressed entries (a chunk store's chunks) --------------------------------------

    @staticmethod
    def _content_key(digest: bytes, length: int) -> int:
        if len(digest) != 32:
            raise ValueError(f"a content key is a 32-byte BLAKE3 digest, not {len(digest)} bytes")
        checksum = int.from_bytes(digest[:8], "big")
        ChunkCache._check_key(CONTENT_NAMESPACE, checksum, length)
        return checksum

    def read_content_into(self, digest: bytes, length: int, buffer: Any) -> bool:
        """Read the chunk-store chunk named ``digest`` (kept as ``length`` stored bytes:
        compressed as its store keeps it) into ``buffer``, NOT verified: the caller
        decompresses it, checks its BLAKE3 against ``digest`` and calls
        :meth:`drop_content` if it does not match.  True: ``buffer`` holds the entry's
        bytes; False: a miss (a missing, truncated or replaced entry; the latter two
        are removed).  Kept under the identity :data:`CONTENT_NAMESPACE`, named by the
        digest's first 8 bytes, so that every snapshot sharing a chunk shares its entry."""
        checksum = self._content_key(digest, length)
        view = memoryview(buffer).cast("B")
        if len(view) != length or view.readonly:
            raise ValueError(f"buffer must be {length} writable bytes")
        identity = CONTENT_NAMESPACE
        name = entry_name(checksum, length)
        with self._files.shard(identity, checksum, create=False) as shard:
            if shard is None:
                return self._miss()
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=shard)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EACCES):
                    self._drop(identity, checksum, length, shard, name, None)
                return self._miss()
            try:
                st = os.fstat(fd)
                good = stat.S_ISREG(st.st_mode) and st.st_size == length
                if good:
                    done = 0
                    try:
                        while done < length:
                            n = os.preadv(fd, [view[done:]], done)
                            if n <= 0:
                                break
                            done += n
                    except OSError:
                        pass
                    good = done == length
                if not good:
                    self._drop(identity, checksum, length, shard, name, st)
                    return self._miss()
                now = time.time_ns()
                if now - st.st_mtime_ns > TOUCH_INTERVAL_NS:
                    with contextlib.suppress(OSError):
                        os.utime(fd, ns=(st.st_atime_ns, now))
            finally:
                os.close(fd)
        with self._mutex:
            self._hits += 1
            if self._index is not None:
                self._index.add(self._ident(identity), checksum, length, now)
        return True

    def drop_content(self, digest: bytes, length: int) -> None:
        """Remove the entry :meth:`read_content_into` gave whose bytes did not verify
        (counted as a corrupt entry dropped)."""
        checksum = self._content_key(digest, length)
        with self._files.shard(CONTENT_NAMESPACE, checksum, create=False) as shard:
            if shard is not None:
                self._drop(CONTENT_NAMESPACE, checksum, length, shard, entry_name(checksum, length), None)

    def insert_content(self, digest: bytes, data: Any) -> bool:
        """Add a chunk-store chunk's stored bytes under its BLAKE3 ``digest``; the caller
        has verified them (decompressed, hashed), the cache cannot.  Returns as
        :meth:`insert` does."""
        view = memoryview(data).cast("B")
        length = len(view)
        checksum = self._content_key(digest, length)
        if length > self.max_bytes:
            return self._failed()
        identity = CONTENT_NAMESPACE
        name = entry_name(checksum, length)
        with self._files.shard(identity, checksum, create=True) as shard:
            if shard is None:
                return self._failed()
            temp = f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=shard)
            except OSError:
                return self._failed()
            try:
                try:
                    done = 0
                    while done < length:
                        done += os.write(fd, view[done:])
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                return self._place(identity, checksum, length, shard, temp, name)
            except OSError:
                return self._failed()
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=shard)

    # -- whole-cache operations --------------------------------------------------------------

    def stats(self) -> CacheStats:
        """The shared totals (as of the last accounting; :meth:`refresh` recounts) and
        this process's counts."""
        with self._files.locked(shared=True):
            header = self._files.header()
        total, entries = (header[0], header[1]) if header is not None else (0, 0)
        with self._mutex:
            return CacheStats(self.directory, self.max_bytes, entries, total, self._hits, self._misses,
                              self._corrupt, self._evictions, self._inserts, self._insert_failures,
                              self._walks)

    def refresh(self) -> None:
        """Recount everything from one directory walk (corrects the totals)."""
        with self._files.locked():
            self._walk()

    def checkpoints(self) -> dict[int, tuple[int, int]]:
        """identity -> (entries, bytes) in this index (call :meth:`refresh` first for the disk's)."""
        with self._mutex:
            index = self._index
            if index is None:
                return {}
            live = index.ident >= 2
            numbers = index.ident[live].astype(np.int64) - 2
            counts = np.bincount(numbers, minlength=len(self._idents))
            sizes = np.bincount(numbers, weights=index.length[live].astype(np.float64),
                                minlength=len(self._idents))
            return {self._idents[i]: (int(counts[i]), int(sizes[i])) for i in np.flatnonzero(counts)}

    def prune(self, max_bytes: int | None = None, identity: int | None = None) -> PruneReport:
        """Evict least recently used entries down to ``max_bytes``; or remove every
        entry of one checkpoint (``identity``); or, with neither, everything."""
        if max_bytes is not None and identity is not None:
            raise ValueError("prune takes a bound or an identity, not both")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes cannot be negative: {max_bytes}")
        with self._files.locked():
            if max_bytes is not None:
                self._catch_up()  # keeps this process's recency (a walk has only the mtimes)
                before = self._files.header()
                self._make_room(0, max_bytes)
            else:
                self._walk()
                before = self._files.header()
                self._remove_all(identity)
            assert before is not None
            after = self._files.header()
            assert after is not None
            return PruneReport(before[1] - after[1], before[0] - after[0])

    def _remove_all(self, identity: int | None) -> None:
        """Under the lock, just walked: remove every entry (of ``identity``) and the
        directories left empty."""
        assert self._index is not None
        self._evictions += self._files.remove_entries(identity)
        self._walk()  # the totals and the index, recounted
