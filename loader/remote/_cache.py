"""The host chunk cache: checksum chunks of remote checkpoints, shared by every daemon
of one user on a host (docs/REMOTE.md, "The host chunk cache").

On disk, under the cache directory ``DIR`` (:func:`default_cache_dir`; the files,
the lock, the header and the journal are handled in ``_cache_files.py``)::

    DIR/v2/lock                                   flock; the shared totals (header)
    DIR/v2/journal                                what was inserted, 32 bytes an entry
    DIR/v2/<identity>/<cc>/<checksum>-<length>    one entry: a block (or a lone chunk)
    DIR/v2/<identity>/<cc>/.tmp-<pid>-<random>    an insert in progress

``<identity>`` is the checkpoint's identity digest (16 hex digits: a pages
checkpoint's is the xxh3_64 of its index, which holds every chunk's checksum),
``<checksum>`` the entry's key (16 hex digits), ``<cc>`` its first two, and
``<length>`` the file's length in bytes (decimal).  Two checkpoints never share a
key, and an entry is found without reading anything but itself.

The unit of a remote checkpoint's entries is a **block**: up to
:data:`BLOCK_BYTES` of its pages file (whole checksum chunks, aligned in the file),
one file: a small header that holds the block's chunk size, its length and its
chunks' xxh3_64 checksums (:func:`block_header`), then the bytes.  Its key is the
xxh3_64 of that header, so the entry verifies itself: a read compares the header
with the one the key names and each chunk it reads with the header's checksum
(:meth:`ChunkCache.read_block_into`; a read of part of a block reads the header and
those chunks).  One file per 1 MiB, not per 16 KiB chunk: a fill creates 64 times
fewer files, and a read opens 64 times fewer (docs/REMOTE.md, "Measured").  A lone
chunk (:meth:`ChunkCache.insert`, :meth:`ChunkCache.read_into`: keyed by its own
xxh3_64) and a chunk store's content-addressed chunks are entries too.

* Every read verifies: a corrupt, truncated, extended or replaced entry (a symlink, a
  FIFO, ...) is removed, counted and reported as a miss.
* An insert refuses bytes whose checksums are not the key's, writes a temporary file
  (``O_EXCL|O_NOFOLLOW``, 0600) in the entry's directory and renames it into place
  under the lock; the same entry inserted by two daemons at once is two renames of
  identical bytes.
* Bounded: before an insert, least-recently-used entries are removed until the
  entry fits under ``max_bytes``.  Recency is kept in memory, exactly, for the
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
import struct
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xxhash

from aio import IOV_MAX

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
#: a remote checkpoint's cache entries are blocks of (at most) this many bytes of its
#: pages file: whole checksum chunks, aligned (one chunk where chunks are bigger)
BLOCK_BYTES = 1 << 20
#: the identity under which a chunk store's chunks are kept, content-addressed: the
#: same chunk of any snapshot is one entry (``DIR/v1/626c616b65330000/``: "blake3")
CONTENT_NAMESPACE = int.from_bytes(b"blake3\0\0", "big")
#: a read touches an entry's mtime when it is older than this (the on-disk recency's
#: granularity; the in-memory recency is exact)
TOUCH_INTERVAL_NS = 10 * 1_000_000_000


_BLOCK_HEAD = struct.Struct("<8sIIQ")  # magic, chunk size, chunks, the block's bytes
_BLOCK_MAGIC = b"PLBLOCK1"


def block_header(chunk_size: int, sums: Sequence[int], length: int) -> bytes:
    """A block entry's header: its chunk size, its chunks, its length in bytes and its
    chunks' xxh3_64 checksums (little-endian 64-bit each).  The entry's key is the
    xxh3_64 of it."""
    count = len(sums)
    if not (1 <= chunk_size and 1 <= count and (count - 1) * chunk_size < length <= count * chunk_size):
        raise ValueError(f"not a block: {count} chunks of {chunk_size} bytes in {length} bytes")
    table = sums if isinstance(sums, array) and sums.typecode == "Q" else array("Q", sums)
    if sys.byteorder != "little":
        table = array("Q", table)
        table.byteswap()
    return _BLOCK_HEAD.pack(_BLOCK_MAGIC, chunk_size, count, length) + table.tobytes()


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
        """Read the lone chunk (:meth:`insert`) into ``buffer`` (``length`` bytes,
        writable) and verify it.

        True: ``buffer`` holds the chunk, checked against ``checksum``.  False: a miss
        (then ``buffer``'s contents are undefined: a corrupt entry's bytes may be in it,
        and the entry is gone).  One copy: the file is read straight into ``buffer``.
        """
        self._check_key(identity, checksum, length)
        view = _writable(buffer, length)
        return self._read(identity, checksum, length, [(0, view)],
                          lambda: xxhash.xxh3_64_intdigest(view) == checksum)

    def read_block_into(self, identity: int, chunk_size: int, sums: Sequence[int], length: int, first: int,
                        buffer: Any) -> bool:
        """Read chunks of a block (:meth:`insert_blocks`) into ``buffer``, each verified.

        The block is ``length`` bytes of chunks of ``chunk_size``, their checksums
        ``sums``; ``buffer`` (writable) receives whole chunks from chunk ``first`` of
        the block on (the last one may be the block's short last chunk).  ``buffer``
        may also be a list of writable memoryviews, filled one after the other (a
        restore's pieces of memory between holes: one ``preadv`` for all of them, a
        chunk across two pieces hashed across both).  The entry's header is read too
        and compared with the one its key names, and each chunk read is hashed against
        its checksum.  True: ``buffer`` holds them.  False: a miss (as
        :meth:`read_into`: a bad entry is dropped, the buffer undefined)."""
        header = block_header(chunk_size, sums, length)
        checksum = xxhash.xxh3_64_intdigest(header)
        total = len(header) + length
        self._check_key(identity, checksum, total)
        views = [memoryview(b).cast("B") for b in (buffer if isinstance(buffer, list) else [buffer])]
        size = sum(len(v) for v in views)
        at = first * chunk_size
        end = at + size
        if any(v.readonly or not len(v) for v in views) or not (
                0 <= at < length and end <= length and (end == length or size % chunk_size == 0)):
            raise ValueError(f"buffer must be whole chunks of the block from chunk {first} on, writable")
        seen = bytearray(len(header))
        parts = [(0, memoryview(seen))]
        offset = len(header) + at
        for v in views:
            parts.append((offset, v))
            offset += len(v)

        def good() -> bool:
            return seen == header and _chunks_match(views, chunk_size, sums, first)

        return self._read(identity, checksum, total, parts, good)

    def _read(self, identity: int, checksum: int, total: int, parts: list[tuple[int, memoryview]],
              good: Callable[[], bool]) -> bool:
        """Read an entry of ``total`` bytes: each ``(offset, view)`` of ``parts`` filled
        from it (contiguous ones with one ``preadv``), then ``good()`` asked; a miss,
        or a bad entry dropped (False); a hit counted and its recency touched (True)."""
        name = entry_name(checksum, total)
        with self._files.shard(identity, checksum, create=False) as shard:
            if shard is None:
                return self._miss()
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=shard)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EACCES):  # a symlink, a socket, mode 0
                    self._drop(identity, checksum, total, shard, name, None)
                return self._miss()  # missing (or, say, EMFILE: a miss costs a fetch, nothing else)
            try:
                st = os.fstat(fd)
                ok = stat.S_ISREG(st.st_mode) and st.st_size == total
                if ok:
                    try:
                        ok = _pread_all(fd, parts) and good()
                    except OSError:  # EIO: the entry is as bad as a corrupt one
                        ok = False
                if not ok:
                    self._drop(identity, checksum, total, shard, name, st)
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
                self._index.add(self._ident(identity), checksum, total, now)
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
        """Add a lone chunk: ``data`` (any buffer) must hash to ``checksum`` (ValueError
        otherwise: the cache never holds wrong bytes).  True if the chunk is in the
        cache afterwards; False if it could not be stored (no space, an I/O error, a
        chunk larger than the bound), which costs a later fetch and nothing else."""
        (done,) = self.insert_many(identity, [(checksum, data)])
        if done is None:
            raise ValueError(f"refused: the data's xxh3_64 is not {checksum:#018x}")
        return done

    def insert_many(self, identity: int, chunks: Iterable[tuple[int, Any]]) -> list[bool | None]:
        """Add several lone chunks of one checkpoint, each ``(checksum, data)``, at once:
        each is hashed and written to a temporary file, then all are renamed into place
        under one taking of the lock (one look at the journal, one journal write).  Per
        chunk, in order: True if it is in the cache afterwards, False if it could not be
        stored (as :meth:`insert`), None if its bytes do not hash to its checksum
        (refused: :meth:`insert` raises ValueError there).  A key that is not one (a
        length of 0, a checksum of more than 64 bits) raises ValueError before anything
        is stored."""
        items = [(checksum, memoryview(data).cast("B")) for checksum, data in chunks]
        for checksum, view in items:
            self._check_key(identity, checksum, len(view))
        return self._insert_views(identity, [(checksum, [view]) if xxhash.xxh3_64_intdigest(view) == checksum
                                             else None for checksum, view in items])

    def insert_blocks(self, identity: int, chunk_size: int,
                      blocks: Iterable[tuple[Sequence[int], Any]]) -> list[bool | None]:
        """Add blocks of one checkpoint, each ``(sums, data)``: ``data`` is whole chunks
        of ``chunk_size`` (the last may be short), ``sums`` their xxh3_64 checksums.
        Each is checked (every chunk hashed), written with its header
        (:func:`block_header`) to a temporary file, and all are renamed into place
        under one taking of the lock, as :meth:`insert_many`; per block: True (in the
        cache), False (could not be stored), None (a chunk's bytes do not hash to its
        checksum: refused, nothing of it stored).  :meth:`read_block_into` reads them."""
        items: list[tuple[int, list[memoryview]] | None] = []
        for sums, data in blocks:
            view = memoryview(data).cast("B")
            header = block_header(chunk_size, sums, len(view))
            checksum = xxhash.xxh3_64_intdigest(header)
            self._check_key(identity, checksum, len(header) + len(view))
            right = all(xxhash.xxh3_64_intdigest(view[j : j + chunk_size]) == sums[j // chunk_size]
                        for j in range(0, len(view), chunk_size))
            items.append((checksum, [memoryview(header), view]) if right else None)
        return self._insert_views(identity, items)

    def _insert_views(self, identity: int, items: list[tuple[int, list[memoryview]] | None]) -> list[bool | None]:
        """Insert checked entries: each ``(checksum, its bytes in parts)``, or None (wrong
        bytes: refused, its result None)."""
        results: list[bool | None] = [False] * len(items)
        #: written, not yet placed: (position, checksum, length, shard fd, temporary name)
        written: list[tuple[int, int, int, int, str]] = []
        try:
            for i, item in enumerate(items):
                if item is None:
                    results[i] = None
                    continue
                checksum, parts = item
                length = sum(len(p) for p in parts)
                if length > self.max_bytes:
                    self._failed()
                    continue
                temp = self._write_temp(identity, checksum, parts)
                if temp is None:
                    self._failed()
                    continue
                written.append((i, checksum, length, *temp))
            if written:
                records: list[tuple[int, int, int, int]] = []
                with self._files.locked():
                    try:
                        self._catch_up()
                        for n, (i, checksum, length, shard, temp_name) in enumerate(written):
                            try:
                                results[i] = self._place(identity, checksum, length, shard, temp_name, records)
                            except OSError:
                                self._failed()
                            if results[i]:
                                written[n] = (i, checksum, length, shard, "")  # renamed: nothing to remove
                    finally:
                        self._files.append_many(records)
        finally:
            for _, _, _, shard, temp_name in written:
                if temp_name:
                    with contextlib.suppress(OSError):
                        os.unlink(temp_name, dir_fd=shard)
                os.close(shard)
        return results

    def _write_temp(self, identity: int, checksum: int, parts: list[memoryview]) -> tuple[int, str] | None:
        """The entry's bytes (``parts``, one after the other) in a new temporary file in
        its directory: (that directory's fd, the file's name), or None where it cannot
        be written."""
        shard = self._files.open_shard(identity, checksum, create=True)
        if shard is None:
            return None
        temp = f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=shard)
        except OSError:
            os.close(shard)
            return None
        try:
            try:
                for view in parts:
                    done, length = 0, len(view)
                    while done < length:
                        done += os.write(fd, view[done:])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=shard)
            os.close(shard)
            return None
        return shard, temp

    def _failed(self) -> bool:
        with self._mutex:
            self._insert_failures += 1
        return False

    def _place(self, identity: int, checksum: int, length: int, shard: int, temp: str,
               records: list[tuple[int, int, int, int]]) -> bool:
        """Under the lock, caught up: rename the temporary file onto the entry's name
        (making room first for a new entry); its journal record goes to ``records``."""
        assert self._index is not None
        name = entry_name(checksum, length)
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
            records.append((identity, checksum, length, now))
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
        view = _writable(buffer, length)
        return self._read(CONTENT_NAMESPACE, checksum, length, [(0, view)], lambda: True)

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
        checksum = self._content_key(digest, len(view))
        (done,) = self._insert_views(CONTENT_NAMESPACE, [(checksum, [view])])
        return bool(done)

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


def _writable(buffer: Any, length: int) -> memoryview:
    view = memoryview(buffer).cast("B")
    if len(view) != length or view.readonly:
        raise ValueError(f"buffer must be {length} writable bytes")
    return view


def _chunks_match(views: list[memoryview], chunk_size: int, sums: Sequence[int], first: int) -> bool:
    """Whether the chunks in ``views`` (one after the other: whole chunks from chunk
    ``first`` on, the last one perhaps short) hash to their checksums in ``sums``; a
    chunk across views is hashed across them."""
    total = sum(len(v) for v in views)
    i = off = pos = 0  # the view and the offset in it where chunk k starts; k's offset in all
    k = first
    while pos < total:
        want = min(chunk_size, total - pos)
        view = views[i]
        if len(view) - off >= want:
            digest = xxhash.xxh3_64_intdigest(view[off : off + want])
            off += want
        else:
            state = xxhash.xxh3_64()
            left = want
            while left:
                view = views[i]
                take = min(left, len(view) - off)
                state.update(view[off : off + take])
                off += take
                left -= take
                if left:
                    i, off = i + 1, 0
            digest = state.intdigest()
        if digest != sums[k]:
            return False
        if off == len(views[i]) and i + 1 < len(views):
            i, off = i + 1, 0
        pos += want
        k += 1
    return True


def _pread_all(fd: int, parts: list[tuple[int, memoryview]]) -> bool:
    """Fill each ``(offset, view)`` from ``fd``, contiguous ones with one ``preadv``
    (of at most ``IOV_MAX`` views); False if the file ended first."""
    i = 0
    while i < len(parts):
        at, views = parts[i][0], [parts[i][1]]
        end = at + len(views[0])
        i += 1
        while i < len(parts) and parts[i][0] == end and len(views) < IOV_MAX:
            views.append(parts[i][1])
            end += len(parts[i][1])
            i += 1
        while views:
            n = os.preadv(fd, views, at)
            if n <= 0:
                return False
            at += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
    return True
