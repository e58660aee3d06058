"""The host chunk cache on disk (docs/REMOTE.md, "The host chunk cache"): the
directory and its checks, the tree of entries and its walk, the lock file whose
header holds the shared totals, and the journal of inserts.

    DIR/v2/lock                                   flock; the shared totals (header)
    DIR/v2/journal                                what was inserted, 32 bytes an entry
    DIR/v2/<identity>/<cc>/<checksum>-<length>    one entry: a block of chunks (or a chunk)
    DIR/v2/<identity>/<cc>/.tmp-<pid>-<random>    an insert in progress

Nothing here decides what to keep: :class:`loader.remote.ChunkCache` does, under
:meth:`CacheFiles.locked`.  No path component is ever followed through a symlink, and
a directory someone else could write into is refused (:class:`CacheError`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

#: a temporary file older than this, found by a walk, was left by a daemon that died
STALE_TEMP_NS = 3600 * 1_000_000_000
#: the largest chunk the cache takes (the length is a 32-bit column of the index)
MAX_CHUNK = (1 << 32) - 1

#: the layout's version: ``v1`` held one file per checksum chunk; ``v2`` a block of
#: them per file (``_cache.py``).  A tree of another version is ignored (left for the
#: operator to remove: docs/REMOTE.md)
_LAYOUT = "v2"
_HEADER = struct.Struct("<8sQQQ")  # magic, bytes, entries, journal generation
_MAGIC = b"PLCACHE2"
_RECORD = struct.Struct("<QQQQ")  # identity, checksum, length, time (ns)
_ENTRY = re.compile(r"([0-9a-f]{16})-([1-9][0-9]{0,9})")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_SHARD = re.compile(r"[0-9a-f]{2}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: a walk's columns: identity numbers, checksums, lengths, recency (mtimes)
Columns = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]


class CacheError(Exception):
    """The cache directory cannot be used.  ``str()`` is one line: ``"<path>: <what>"``."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(" ".join(f"{path}: {problem}".split()))


def entry_name(checksum: int, length: int) -> str:
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


class CacheFiles:
    """The cache directory ``directory``, open: ``DIR`` and ``DIR/v2`` (checked), the
    lock file and its header, the journal and how far this process has read it, and
    the checkpoints' directories (a few kept open).

    ``mutex`` is the cache's: :meth:`locked` takes it before the ``flock`` (which
    does not exclude this process's threads), and :meth:`shard` under it.
    """

    def __init__(self, directory: str, mutex: threading.RLock, *, create: bool) -> None:
        self.directory = directory
        self._mutex = mutex
        self._ident_fds: dict[int, int] = {}
        self._fds: list[int] = []
        #: the journal's generation and offset this process has read up to
        self.journal_gen = -1
        self.journal_off = 0
        if create:
            parent = os.path.dirname(directory)
            try:
                os.makedirs(parent, 0o700, exist_ok=True)
            except OSError as exc:
                raise CacheError(parent, f"cannot create: {exc.strerror or exc}") from None
        try:
            self._root = _open_dir(directory, None, directory, create=create)
            self._fds.append(self._root)
            _check_dir(self._root, directory)
            where = os.path.join(directory, _LAYOUT)
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

    # -- the tree of entries -----------------------------------------------------------------

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
    def shard(self, identity: int, checksum: int, *, create: bool) -> Iterator[int | None]:
        """The entry's directory, opened ``O_PATH|O_NOFOLLOW`` (None when it is missing or
        not a directory), closed on exit (:meth:`open_shard`)."""
        fd = self.open_shard(identity, checksum, create=create)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def open_shard(self, identity: int, checksum: int, *, create: bool) -> int | None:
        """The entry's directory, opened ``O_PATH|O_NOFOLLOW`` (None when it is missing or
        not a directory); the caller closes it.  Opened under the mutex: the
        checkpoint's directory it is opened in may be closed by another thread once the
        mutex is released."""
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
        return fd

    def walk(self, ident: Callable[[int], int]) -> tuple[Columns, int]:
        """Under the lock: every entry on disk, as columns (``ident`` numbers each
        checkpoint that has one), and how many corrupt ones were removed.

        Removes what cannot be an entry where an entry would be (symlinks and other
        non-files, counted as corrupt) and temporary files older than an hour."""
        idents, sums, lengths, ticks = array("I"), array("Q"), array("Q"), array("q")
        corrupt = 0
        now = time.time_ns()
        for ident_name, ifd in _subdirs(self._top, _HEX16):
            identity = int(ident_name, 16)
            no = -1
            for shard_name, sfd in _subdirs(ifd, _SHARD):
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
                                corrupt += 1
                            continue
                        try:
                            mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                        except FileNotFoundError:
                            continue
                        if no < 0:
                            no = ident(identity)
                        idents.append(no)
                        sums.append(int(m.group(1), 16))
                        lengths.append(length)
                        ticks.append(mtime)
        i, s, n, t = (np.frombuffer(a, dtype) if len(a) else np.zeros(0, dtype)
                      for a, dtype in ((idents, np.uint32), (sums, np.uint64), (lengths, np.uint64),
                                       (ticks, np.int64)))
        return (i, s, n, t), corrupt

    def remove_entries(self, identity: int | None) -> int:
        """Under the lock: remove every entry (of ``identity``) and the directories left
        empty, not temporary files (other daemons' inserts in progress); how many."""
        removed = 0
        for name, ifd in _subdirs(self._top, _HEX16):
            if identity is not None and int(name, 16) != identity:
                continue
            for shard, sfd in _subdirs(ifd, _SHARD):
                for entry in os.listdir(sfd):
                    if _ENTRY.fullmatch(entry):
                        with contextlib.suppress(OSError):
                            os.unlink(entry, dir_fd=sfd)
                            removed += 1
                with contextlib.suppress(OSError):
                    os.rmdir(shard, dir_fd=ifd)
            fd = self._ident_fds.pop(int(name, 16), None)
            if fd is not None:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=self._top)
        return removed

    # -- the shared state: lock, header, journal ---------------------------------------------

    @contextlib.contextmanager
    def locked(self, shared: bool = False) -> Iterator[None]:
        with self._mutex:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def header(self) -> tuple[int, int, int] | None:
        """The shared totals: (bytes, entries, journal generation), None if unreadable."""
        raw = os.pread(self._lock_fd, _HEADER.size, 0)
        if len(raw) != _HEADER.size:
            return None
        magic, total, entries, gen = _HEADER.unpack(raw)
        return (total, entries, gen) if magic == _MAGIC else None

    def put_header(self, total: int, entries: int, gen: int) -> None:
        os.pwrite(self._lock_fd, _HEADER.pack(_MAGIC, max(total, 0), max(entries, 0), gen), 0)

    def append(self, identity: int, checksum: int, length: int, tick: int) -> None:
        """Under the lock: journal an insert (this process has read up to its end)."""
        os.write(self._journal_fd, _RECORD.pack(identity, checksum, length, tick))
        self.journal_off = os.fstat(self._journal_fd).st_size

    def append_many(self, records: list[tuple[int, int, int, int]]) -> None:
        """Under the lock: journal several inserts with one write (as :meth:`append`)."""
        if records:
            os.write(self._journal_fd, b"".join(_RECORD.pack(*r) for r in records))
            self.journal_off = os.fstat(self._journal_fd).st_size

    def news(self) -> Iterator[tuple[int, int, int, int]]:
        """Under the lock: the inserts journaled since this process last read it, whole
        records only, as (identity, checksum, length, time); a length no chunk can
        have is skipped."""
        end = os.fstat(self._journal_fd).st_size
        end -= end % _RECORD.size
        while self.journal_off < end:
            raw = os.pread(self._journal_fd, min(end - self.journal_off, 1 << 20), self.journal_off)
            if not raw:
                break
            usable = len(raw) - len(raw) % _RECORD.size
            for record in _RECORD.iter_unpack(raw[:usable]):
                if 1 <= record[2] <= MAX_CHUNK:
                    yield record
            self.journal_off += usable

    def compact(self, header: tuple[int, int, int]) -> None:
        """Under the lock, just read to its end: truncate the journal when it exceeds
        twice the entries (plus 4096 records), bumping its generation (the other
        daemons walk once)."""
        total, entries, gen = header
        end = os.fstat(self._journal_fd).st_size
        if end - end % _RECORD.size > _RECORD.size * (2 * entries + 4096):
            os.ftruncate(self._journal_fd, 0)
            self.put_header(total, entries, gen + 1)
            self.journal_gen, self.journal_off = gen + 1, 0

    def read_all(self, gen: int) -> None:
        """After a walk: the journal of generation ``gen`` is known up to its end."""
        self.journal_gen, self.journal_off = gen, os.fstat(self._journal_fd).st_size
