"""The host chunk cache: checksum chunks of remote checkpoints, shared by every daemon
of one user on a host (docs/REMOTE.md, "The host chunk cache").

On disk, under the cache directory ``DIR`` (:func:`default_cache_dir`)::

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
* The in-memory index (:class:`_Index`) is an open-addressing hash table over four
  NumPy columns: 24 bytes a slot, 32 to 80 bytes an entry, no Python object
  per entry.  It is built by one directory walk, at the first insert (or
  :meth:`ChunkCache.load_index`), and kept current from the journal: other daemons'
  inserts are read from it, 32 bytes each, at every insert (under the lock).  A walk happens
  again only when some daemon compacts the journal (it grew past twice the entries),
  or when the totals say the cache is over its bound and this index has nothing left
  to remove (the totals drifted: a daemon died between a rename and its accounting).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import struct
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xxhash

from .._units import parse_size

__all__ = [
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
#: a read touches an entry's mtime when it is older than this (the on-disk recency's
#: granularity; the in-memory recency is exact)
TOUCH_INTERVAL_NS = 10 * 1_000_000_000
#: a temporary file older than this, found by a walk, was left by a daemon that died
STALE_TEMP_NS = 3600 * 1_000_000_000
#: the largest chunk the cache takes (the length is a 32-bit column of the index)
MAX_CHUNK = (1 << 32) - 1

_LAYOUT = "v1"
_HEADER = struct.Struct("<8sQQQ")  # magic, bytes, entries, journal generation
_MAGIC = b"PLCACHE1"
_RECORD = struct.Struct("<QQQQ")  # identity, checksum, length, time (ns)
_ENTRY = re.compile(r"([0-9a-f]{16})-([1-9][0-9]{0,9})")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_SHARD = re.compile(r"[0-9a-f]{2}")
_M64 = (1 << 64) - 1
_K_IDENT = 0x9E3779B97F4A7C15
_K_LENGTH = 0xC2B2AE3D27D4EB4F
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CacheError(Exception):
    """The cache directory cannot be used.  ``str()`` is one line: ``"<path>: <what>"``."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(" ".join(f"{path}: {problem}".split()))


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


def _mix(ident_no: int, checksum: int, length: int) -> int:
    return (checksum ^ (ident_no * _K_IDENT) ^ (length * _K_LENGTH)) & _M64


class _Index:
    """What this process knows is in the cache: (identity, checksum, length) -> recency.

    Linear probing over NumPy columns of a power-of-two capacity; a slot's ``ident``
    is 0 when empty, 1 when deleted, the identity's number + 2 when live.  The home
    slot is a multiply-shift hash with a random odd multiplier (per process), so
    checksums chosen by a hostile checkpoint cannot pile up on one slot.  At most 75 %
    of the slots are used (live or deleted); a rebuild sizes it to at most 60 %: 24
    bytes a slot are 32 to 64 bytes a live entry (40 to 80 right after a walk).
    """

    MAX_LOAD = 0.75
    TARGET_LOAD = 0.60

    def __init__(self, capacity: int = 1024) -> None:
        self._multiplier = secrets.randbits(64) | 1
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        assert capacity & (capacity - 1) == 0
        self.capacity = capacity
        self.bits = capacity.bit_length() - 1
        self.checksum = np.zeros(capacity, np.uint64)
        self.ident = np.zeros(capacity, np.uint32)
        self.length = np.zeros(capacity, np.uint32)
        self.tick = np.zeros(capacity, np.int64)
        self.live = 0
        self.used = 0
        self.generation = getattr(self, "generation", 0) + 1  # slots move: chosen victims are void

    def _home(self, ident_no: int, checksum: int, length: int) -> int:
        return ((_mix(ident_no, checksum, length) * self._multiplier) & _M64) >> (64 - self.bits)

    def find(self, ident_no: int, checksum: int, length: int) -> int:
        """The slot of the entry, or -1."""
        mask = self.capacity - 1
        slot = self._home(ident_no, checksum, length)
        tag = ident_no + 2
        ident, sums, lengths = self.ident, self.checksum, self.length
        while True:
            t = int(ident[slot])
            if t == 0:
                return -1
            if t == tag and int(sums[slot]) == checksum and int(lengths[slot]) == length:
                return slot
            slot = (slot + 1) & mask

    def add(self, ident_no: int, checksum: int, length: int, tick: int) -> bool:
        """Add the entry, or raise its recency to ``tick``; True if it is new."""
        slot = self.find(ident_no, checksum, length)
        if slot >= 0:
            if tick > int(self.tick[slot]):
                self.tick[slot] = tick
            return False
        if self.used + 1 > self.MAX_LOAD * self.capacity:
            self._rebuild(self.live + 1)
        mask = self.capacity - 1
        slot = self._home(ident_no, checksum, length)
        while int(self.ident[slot]) >= 2:  # the first empty or deleted slot on the path
            slot = (slot + 1) & mask
        if int(self.ident[slot]) == 0:
            self.used += 1
        self.ident[slot] = ident_no + 2
        self.checksum[slot] = checksum
        self.length[slot] = length
        self.tick[slot] = tick
        self.live += 1
        return True

    def remove(self, slot: int) -> None:
        assert int(self.ident[slot]) >= 2
        self.ident[slot] = 1
        self.live -= 1

    def clear(self) -> None:
        self._alloc(1024)

    def oldest(self, k: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """The ``k`` live slots of least recency, oldest first, and their recency."""
        slots = np.flatnonzero(self.ident >= 2)
        ticks = self.tick[slots]
        if k < slots.size:
            part = np.argpartition(ticks, k - 1)[:k]
            slots, ticks = slots[part], ticks[part]
        order = np.argsort(ticks, kind="stable")
        return slots[order], ticks[order]

    def _rebuild(self, need: int) -> None:
        keep = np.flatnonzero(self.ident >= 2)
        columns = (self.ident[keep] - 2, self.checksum[keep], self.length[keep], self.tick[keep])
        capacity = 1024
        while need > self.TARGET_LOAD * capacity:
            capacity *= 2
        self._alloc(capacity)
        self.bulk(*columns)

    def bulk(self, ident_nos: np.ndarray[Any, Any], checksums: np.ndarray[Any, Any],
             lengths: np.ndarray[Any, Any], ticks: np.ndarray[Any, Any]) -> None:
        """Fill an empty table with distinct entries, all at once (vectorized linear
        probing: each round places, on every free slot wanted, the first entry wanting
        it; the others move one slot on; a slot is passed only once it is taken)."""
        assert self.used == 0
        n = int(checksums.size)
        capacity = self.capacity
        while n > self.TARGET_LOAD * capacity:
            capacity *= 2
        if capacity != self.capacity:
            self._alloc(capacity)
        if n == 0:
            return
        ident_nos = ident_nos.astype(np.uint64)
        checksums = checksums.astype(np.uint64)
        lengths = lengths.astype(np.uint64)
        mixed = checksums ^ (ident_nos * np.uint64(_K_IDENT)) ^ (lengths * np.uint64(_K_LENGTH))
        pos = (mixed * np.uint64(self._multiplier)) >> np.uint64(64 - self.bits)
        pending = np.arange(n)
        mask = np.uint64(self.capacity - 1)
        while pending.size:
            free = self.ident[pos] == 0
            want, at = pending[free], pos[free]
            taken, first = np.unique(at, return_index=True)
            who = want[first]
            self.ident[taken] = (ident_nos[who] + np.uint64(2)).astype(np.uint32)
            self.checksum[taken] = checksums[who]
            self.length[taken] = lengths[who].astype(np.uint32)
            self.tick[taken] = ticks[who]
            placed = np.zeros(n, bool)
            placed[who] = True
            stay = ~placed[pending]
            pending, pos = pending[stay], (pos[stay] + np.uint64(1)) & mask
        self.live = self.used = n


def _entry_name(checksum: int, length: int) -> str:
    return f"{checksum:016x}-{length}"


def _shard_name(checksum: int) -> str:
    return f"{checksum >> 56:02x}"


def _check_dir(fd: int, path: str) -> None:
    """Refuse a directory someone else could write into (trust nothing from outside)."""
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(path, "not a directory")
    if st.st_uid != os.geteuid():
        raise CacheError(path, f"owned by uid {st.st_uid}, not by this user ({os.geteuid()}): "
                         "the cache must be this user's alone")
    if st.st_mode & 0o022:
        raise CacheError(path, f"writable by {'others' if st.st_mode & 0o002 else 'its group'} "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}): the cache must be writable by this user alone")


def _open_dir(name: str, dir_fd: int | None, path: str, *, create: bool) -> int:
    """Open (and with ``create``, make 0700) a directory, never through a symlink."""
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise CacheError(path, f"cannot create: {exc.strerror or exc}") from None
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # O_NOFOLLOW|O_DIRECTORY on a symlink: ENOTDIR
            try:
                link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            except OSError:
                link = False
            kind = "a symbolic link" if link or exc.errno == errno.ELOOP else "not a directory"
            raise CacheError(path, f"{kind}: the cache directory must be a real directory") from None
        if exc.errno == errno.ENOENT:
            raise CacheError(path, "no such directory (no cache here)") from None
        raise CacheError(path, exc.strerror or str(exc)) from None


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
        self._ident_fds: dict[int, int] = {}
        #: the least recently used entries, oldest first, as chosen: slots, recency, next, generation
        self._victims: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int, int] | None = None
        self._journal_gen = -1
        self._journal_off = 0
        self._fds: list[int] = []
        if create:
            parent = os.path.dirname(self.directory)
            try:
                os.makedirs(parent, 0o700, exist_ok=True)
            except OSError as exc:
                raise CacheError(parent, f"cannot create: {exc.strerror or exc}") from None
        try:
            self._root = _open_dir(self.directory, None, self.directory, create=create)
            self._fds.append(self._root)
            _check_dir(self._root, self.directory)
            where = os.path.join(self.directory, _LAYOUT)
            self._top = _open_dir(_LAYOUT, self._root, where, create=True)
            self._fds.append(self._top)
            _check_dir(self._top, where)
            self._lock_fd = self._open_file("lock")
            self._journal_fd = self._open_file("journal", append=True)
        except BaseException:
            self.close()
            raise

    def _open_file(self, name: str, *, append: bool = False) -> int:
        path = os.path.join(self.directory, _LAYOUT, name)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(name, flags | (os.O_APPEND if append else 0), 0o600, dir_fd=self._top)
        except OSError as exc:
            what = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
            raise CacheError(path, what) from None
        self._fds.append(fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise CacheError(path, "not a regular file of this user")
        return fd

    def close(self) -> None:
        with self._mutex:
            for fd in [*self._fds, *self._ident_fds.values()]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
            self._ident_fds.clear()

    def __enter__(self) -> ChunkCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths -------------------------------------------------------------------------------

    def _identity_fd(self, identity: int, *, create: bool) -> int | None:
        """The checkpoint's directory (kept open; the caller holds the mutex)."""
        fd = self._ident_fds.get(identity)
        if fd is not None:
            return fd
        name = f"{identity:016x}"
        if create:
            with contextlib.suppress(OSError):
                os.mkdir(name, 0o700, dir_fd=self._top)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self._top)
        except OSError:  # missing, or not a directory (a symlink): nothing to read, nowhere to write
            return None
        if len(self._ident_fds) >= 64:  # a few checkpoints at a time: keep their directories open
            os.close(self._ident_fds.pop(next(iter(self._ident_fds))))
        self._ident_fds[identity] = fd
        return fd

    @contextlib.contextmanager
    def _shard(self, identity: int, checksum: int, *, create: bool) -> Iterator[int | None]:
        """The entry's directory, opened ``O_PATH|O_NOFOLLOW`` (None when it is missing or
        not a directory).  Opened under the mutex: the checkpoint's directory it is
        opened in may be closed by another thread once the mutex is released."""
        name = _shard_name(checksum)
        with self._mutex:
            top = self._identity_fd(identity, create=create)
            fd = None
            if top is not None:
                if create:
                    with contextlib.suppress(OSError):
                        os.mkdir(name, 0o700, dir_fd=top)
                with contextlib.suppress(OSError):
                    fd = os.open(name, os.O_PATH | _DIR_FLAGS, dir_fd=top)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    @staticmethod
    def _check_key(identity: int, checksum: int, length: int) -> None:
        if not (0 <= identity <= _M64 and 0 <= checksum <= _M64):
            raise ValueError("identity and checksum are 64-bit digests")
        if not 1 <= length <= MAX_CHUNK:
            raise ValueError(f"a chunk's length is 1 to {MAX_CHUNK}, not {length}")

    # -- the shared state: header, journal, lock ---------------------------------------------

    @contextlib.contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        with self._mutex:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _header(self) -> tuple[int, int, int] | None:
        raw = os.pread(self._lock_fd, _HEADER.size, 0)
        if len(raw) != _HEADER.size:
            return None
        magic, total, entries, gen = _HEADER.unpack(raw)
        return (total, entries, gen) if magic == _MAGIC else None

    def _put_header(self, total: int, entries: int, gen: int) -> None:
        os.pwrite(self._lock_fd, _HEADER.pack(_MAGIC, max(total, 0), max(entries, 0), gen), 0)

    def _account(self, dbytes: int, dentries: int) -> None:
        """Under the lock, after a change on disk: add it to the shared totals (an
        unreadable header is recounted instead, by a walk that sees the change)."""
        header = self._header()
        if header is None:
            self._walk()
            return
        total, entries, gen = header
        self._put_header(total + dbytes, entries + dentries, gen)

    def _ident(self, identity: int) -> int:
        no = self._ident_no.get(identity)
        if no is None:
            no = self._ident_no[identity] = len(self._idents)
            self._idents.append(identity)
        return no

    def _catch_up(self) -> None:
        """Under the lock: this index knows every entry inserted so far (walks if it must)."""
        header = self._header()
        if self._index is None or header is None or header[2] != self._journal_gen:
            self._walk()
            return
        end = os.fstat(self._journal_fd).st_size
        end -= end % _RECORD.size
        index = self._index
        while self._journal_off < end:
            raw = os.pread(self._journal_fd, min(end - self._journal_off, 1 << 20), self._journal_off)
            if not raw:
                break
            usable = len(raw) - len(raw) % _RECORD.size
            for identity, checksum, length, tick in _RECORD.iter_unpack(raw[:usable]):
                if 1 <= length <= MAX_CHUNK:
                    index.add(self._ident(identity), checksum, length, tick)
            self._journal_off += usable
        if end > _RECORD.size * (2 * header[1] + 4096):  # compact: the others walk once
            os.ftruncate(self._journal_fd, 0)
            self._put_header(header[0], header[1], header[2] + 1)
            self._journal_gen, self._journal_off = header[2] + 1, 0

    def _walk(self) -> None:
        """Under the lock: rebuild the index and the shared totals from one directory walk.

        Removes what cannot be an entry where an entry would be (symlinks and other
        non-files, counted as corrupt) and temporary files older than an hour."""
        self._walks += 1
        self._victims = None
        idents, sums, lengths, ticks = array("I"), array("Q"), array("Q"), array("q")
        now = time.time_ns()
        self._idents.clear()
        self._ident_no.clear()
        for ident_name, ifd in self._subdirs(self._top, _HEX16):
            identity = int(ident_name, 16)
            no = -1
            for shard_name, sfd in self._subdirs(ifd, _SHARD):
                with os.scandir(sfd) as entries:
                    for entry in entries:
                        name = entry.name
                        m = _ENTRY.fullmatch(name)
                        if m is None or not name.startswith(shard_name):
                            if name.startswith(".tmp-"):
                                with contextlib.suppress(OSError):
                                    if now - entry.stat(follow_symlinks=False).st_mtime_ns > STALE_TEMP_NS:
                                        os.unlink(name, dir_fd=sfd)
                            continue
                        length = int(m.group(2))
                        if not entry.is_file(follow_symlinks=False) or length > MAX_CHUNK:
                            with contextlib.suppress(OSError):
                                os.unlink(name, dir_fd=sfd)  # a symlink, a FIFO... (a directory stays)
                                self._corrupt += 1
                            continue
                        try:
                            mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                        except FileNotFoundError:
                            continue
                        if no < 0:
                            no = self._ident(identity)
                        idents.append(no)
                        sums.append(int(m.group(1), 16))
                        lengths.append(length)
                        ticks.append(mtime)
        index = _Index()
        index.bulk(*(np.frombuffer(a, dtype) if len(a) else np.zeros(0, dtype)
                     for a, dtype in ((idents, np.uint32), (sums, np.uint64), (lengths, np.uint64),
                                      (ticks, np.int64))))
        self._index = index
        header = self._header()
        gen = header[2] if header is not None else 0
        self._put_header(sum(lengths), len(lengths), gen)
        self._journal_gen, self._journal_off = gen, os.fstat(self._journal_fd).st_size

    @staticmethod
    def _subdirs(dir_fd: int, pattern: re.Pattern[str]) -> Iterator[tuple[str, int]]:
        """The directories in ``dir_fd`` named by ``pattern``, each opened (never through
        a symlink) for the duration of one step of the iteration."""
        with os.scandir(dir_fd) as entries:
            names = [e.name for e in entries if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
        for name in names:
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                yield name, fd
            finally:
                os.close(fd)

    def load_index(self) -> None:
        """Build the in-memory index now (one directory walk) rather than at the first
        insert: a daemon may call it in a worker thread at start-up."""
        with self._locked():
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
        name = _entry_name(checksum, length)
        with self._shard(identity, checksum, create=False) as shard:
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
        with self._locked():
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
        name = _entry_name(checksum, length)
        with self._shard(identity, checksum, create=True) as shard:
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
        with self._locked():
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
                os.write(self._journal_fd, _RECORD.pack(identity, checksum, length, now))
                self._journal_off = os.fstat(self._journal_fd).st_size
            self._index.add(self._ident(identity), checksum, length, now)
            self._inserts += 1
            return True

    def _make_room(self, length: int, bound: int | None = None) -> bool:
        """Under the lock, caught up: evict least recently used entries until ``length``
        more bytes fit under ``bound``."""
        bound = self.max_bytes if bound is None else bound
        walked = False
        while True:
            header = self._header()
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
            name = _entry_name(checksum, length)
            with self._shard(identity, checksum, create=False) as shard:
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

    # -- whole-cache operations --------------------------------------------------------------

    def stats(self) -> CacheStats:
        """The shared totals (as of the last accounting; :meth:`refresh` recounts) and
        this process's counts."""
        with self._locked(shared=True):
            header = self._header()
        total, entries = (header[0], header[1]) if header is not None else (0, 0)
        with self._mutex:
            return CacheStats(self.directory, self.max_bytes, entries, total, self._hits, self._misses,
                              self._corrupt, self._evictions, self._inserts, self._insert_failures,
                              self._walks)

    def refresh(self) -> None:
        """Recount everything from one directory walk (corrects the totals)."""
        with self._locked():
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
        with self._locked():
            if max_bytes is not None:
                self._catch_up()  # keeps this process's recency (a walk has only the mtimes)
                before = self._header()
                self._make_room(0, max_bytes)
            else:
                self._walk()
                before = self._header()
                self._remove_all(identity)
            assert before is not None
            after = self._header()
            assert after is not None
            return PruneReport(before[1] - after[1], before[0] - after[0])

    def _remove_all(self, identity: int | None) -> None:
        """Under the lock, just walked: remove every entry (of ``identity``) and the
        directories left empty."""
        assert self._index is not None
        for name, ifd in self._subdirs(self._top, _HEX16):
            if identity is not None and int(name, 16) != identity:
                continue
            for shard, sfd in self._subdirs(ifd, _SHARD):
                for entry in os.listdir(sfd):
                    if _ENTRY.fullmatch(entry):  # not temporary files: other daemons' inserts in progress
                        with contextlib.suppress(OSError):
                            os.unlink(entry, dir_fd=sfd)
                            self._evictions += 1
                with contextlib.suppress(OSError):
                    os.rmdir(shard, dir_fd=ifd)
            fd = self._ident_fds.pop(int(name, 16), None)
            if fd is not None:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=self._top)
        self._walk()  # the totals and the index, recounted
