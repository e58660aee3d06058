"""Where loaded pages go.

The loader writes through a :class:`Destination`: it asks for the buffer a read
should land in and, once the read is complete, tells the destination so.  The
default destination is a :class:`MemoryFile` (a memfd, or a file on /dev/shm or
hugetlbfs) mapped shared, so a read lands directly in the file's pages: one copy,
by the kernel.  A userfaultfd destination (later) can hand out a staging buffer
and install the pages with UFFDIO_COPY in :meth:`Destination.commit`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Protocol

from ._startup import (
    StartupError,
    describe_os_error,
    host_memory,
    identity,
    memory_available,
    not_enough_space,
    space_free,
)
from ._units import human

#: larger memory sizes cannot be given to ftruncate (an off_t) nor mapped
_MAX_MAP = sys.maxsize
#: a memory size past this many times the host's RAM + swap is refused at start
_MEMORY_PER_HOST = 64

#: the mode of the memfds handed to clients: read-only for the daemon's uid, nothing for
#: anyone else.  A memfd is made 0777, and a client given a read-only descriptor could
#: reopen ``/proc/self/fd/N`` read-write; the daemon never reopens its own for writing.
MEMFD_MODE = 0o400

#: Linux 5.1; Python's fcntl module does not name it
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)



def private_mapping(length: int) -> mmap.mmap:
    """A private anonymous mapping of ``length`` bytes (at least 1), for a buffer of
    the daemon's own (staging, scratch, the cache inserter's slots): its pages are
    touched only as far as used, and counted as anonymous memory (``RssAnon``).  A
    shared one (``mmap.mmap(-1, n)``) would count as shmem, which the daemon's "RSS
    outside the memory file" (its stats, its metrics, the bench's goals) leaves out
    with the memory file's pages."""
    return mmap.mmap(-1, max(1, length), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                     mmap.PROT_READ | mmap.PROT_WRITE)


class BufferPool:
    """At most ``limit`` buffers of ``size`` bytes (:func:`private_mapping`), made as
    they are first wanted and reused, the last given back first (its pages still
    touched): :meth:`take` one (waiting while all ``limit`` are taken), :meth:`give`
    it back.  ``limit=None``: as many as are taken at once (a buffer a thread, as a
    thread-local one would be, but shared by whichever threads run).  What it costs
    is what the buffers in use at once have touched, not a buffer per thread that
    ever ran."""

    def __init__(self, size: int, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.size = max(1, size)
        self.limit = limit
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._cond = threading.Condition(threading.Lock())

    @property
    def made(self) -> int:
        """Buffers made so far (at most ``limit``)."""
        return self._made

    def take(self) -> mmap.mmap:
        with self._cond:
            while not self._free and self.limit is not None and self._made >= self.limit:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._made += 1
        try:
            return private_mapping(self.size)
        except BaseException:
            with self._cond:
                self._made -= 1
                self._cond.notify()
            raise

    def give(self, buffer: mmap.mmap) -> None:
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()

    @contextlib.contextmanager
    def held(self) -> Iterator[mmap.mmap]:
        """:meth:`take` for the ``with`` block, then :meth:`give` back."""
        buffer = self.take()
        try:
            yield buffer
        finally:
            self.give(buffer)

class Destination(Protocol):
    """Where the loader's reads land.  One may also have ``copy_fd``: a file whose
    offset X holds memory offset X, so background reads can be copied into it file to
    file in the kernel (``aio.Op.COPY``) rather than read into :meth:`buffer`."""

    size: int
    #: True when :meth:`commit` does work; the loader skips the call otherwise.
    needs_commit: bool

    def buffer(self, offset: int, length: int) -> memoryview:
        """The writable buffer that bytes ``[offset, offset+length)`` are read into."""
        ...

    def commit(self, offset: int, length: int) -> None:
        """Bytes ``[offset, offset+length)`` are fully read into their buffer."""
        ...


def explain_error(destination: object, err: int) -> str:
    """``os.strerror(err)``, or what ``destination`` knows better about an errno
    from a read into it (its ``explain_error`` method, if it has one)."""
    explain = getattr(destination, "explain_error", None)
    return str(explain(err)) if callable(explain) else os.strerror(err)


class MemoryFile:
    """A sparse memory file of ``size`` bytes, mapped shared.

    With ``path=None`` it is a memfd (nothing on any filesystem), created with
    ``MFD_ALLOW_SEALING``, made mode 0400 (:data:`MEMFD_MODE`: no one reopens a
    descriptor a client was given read-only as read-write through ``/proc/self/fd``
    unless it is root, or the daemon's uid after a ``chmod`` of its own) and sealed
    against shrinking and growing once sized.  Otherwise the
    file at ``path`` is created, never followed through a symbolic link:

    - it must not exist (``O_CREAT|O_EXCL|O_NOFOLLOW``) unless ``force``; with
      ``force`` an existing regular file is reused, but only once it is locked, and
      then emptied (so stale bytes never show through the holes);
    - symbolic links, non-regular files and the files in ``protect`` (the
      checkpoint's own: same st_dev/st_ino) are refused, ``force`` or not;
    - it is mode 0600 (a reused file is made so);
    - it is locked (``flock(LOCK_EX|LOCK_NB)``) until :meth:`close`: a second
      daemon on the same file is refused instead of truncating the first one's
      memory.  The lock belongs to the open file description, so it also lasts
      while a client holds a copy of :attr:`fd` received over the socket.

    Where the file system can tell (``fstatvfs``; for a memfd, /proc/meminfo and
    the cgroup's ``memory.max``), ``data_bytes`` must fit in the space left.  The
    ``reserve`` ranges are then allocated (``fallocate``), where the file system
    can: that check is no reservation, and another writer could fill the file
    system before the daemon's loads land (:attr:`reserved`: the bytes, or None).
    Every refusal is a :class:`StartupError` (one line).  Unwritten parts are holes
    and read as zero, so zero pages of the image need no I/O at all.
    """

    needs_commit = False

    def __init__(
        self,
        size: int,
        path: str | None = None,
        *,
        name: str = "pageload-memory",
        force: bool = False,
        protect: Iterable[str] = (),
        data_bytes: int = 0,
        reserve: Iterable[tuple[int, int]] = (),
    ) -> None:
        if size <= 0:
            raise ValueError(f"memory size must be positive, not {size}")
        self.size = size
        self.path = path
        self._created = False  #: we created the file at path (discard() may remove it)
        #: bytes allocated at start for ``reserve``, None where the file system cannot
        self.reserved: int | None = 0
        where = path if path is not None else "memory file (memfd)"
        if size > _MAX_MAP:
            raise StartupError(
                f"{where}: memory size {size} bytes ({human(size)}) is more than a mapping can "
                f"hold"
            )
        host = host_memory()
        if host is not None and size > _MEMORY_PER_HOST * host:
            # before anything is made for it (the loaded map: 1 bit a page).  A sparse guest
            # larger than the host is normal (a 64 GiB guest of which 16 GiB is data, on a
            # 24 GiB host): only a claim no host could ever back is refused
            raise StartupError(
                f"{where}: memory size {size} bytes ({human(size)}) is more than {_MEMORY_PER_HOST} times this "
                f"host's memory ({human(host)}: RAM + swap); no guest that large runs here "
                "(vm.overcommit_memory=1 lifts this)"
            )
        if path is None:
            try:
                self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            except OSError as exc:  # EMFILE, ENFILE, ENOMEM: a start-up failure like any other
                raise StartupError(f"{where}: cannot create it: {exc.strerror or exc}") from None
        else:
            self.fd = self._open_path(path, force, protect)
        try:
            self._check_space(where, data_bytes)
            os.ftruncate(self.fd, size)
            self.reserved = self._reserve(where, reserve)
            if path is None:
                os.fchmod(self.fd, MEMFD_MODE)
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException as exc:
            self._abandon()
            if isinstance(exc, (OSError, OverflowError, ValueError)) and not isinstance(exc, StartupError):
                what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise StartupError(f"{where}: cannot make it {size} bytes ({human(size)}) and map it: "
                                   f"{what}") from None
            raise
        self._view = memoryview(self._map)
        self._closed = False

    def _open_path(self, path: str, force: bool, protect: Iterable[str]) -> int:
        protected = {}
        for p in protect:
            try:
                protected[identity(os.stat(p))] = p
            except OSError:
                pass

        def refuse_kind(st: os.stat_result) -> None:
            if stat.S_ISLNK(st.st_mode):
                raise StartupError(f"{path}: memory file is a symbolic link; refusing to write through it")
            if identity(st) in protected:
                raise StartupError(f"{path}: memory file is the checkpoint's own file "
                                   f"{protected[identity(st)]}; refusing to write over it")
            if not stat.S_ISREG(st.st_mode):
                raise StartupError(f"{path}: memory file exists and is not a regular file")

        try:
            before: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            before = None
        except OSError as exc:
            raise StartupError(describe_os_error(exc, path)) from None
        if before is not None:
            refuse_kind(before)
            if not force:
                raise StartupError(f"{path}: memory file already exists (--force reuses it: "
                                   "it is locked, then emptied)")
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        if not force:
            flags |= os.O_EXCL
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StartupError(f"{path}: memory file is a symbolic link; refusing to write through it") from None
            if exc.errno == errno.EEXIST:
                raise StartupError(f"{path}: memory file already exists (--force reuses it)") from None
            raise StartupError(f"{path}: cannot open the memory file: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            refuse_kind(st)
            self._created = before is None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StartupError(f"{path}: memory file is in use: another process holds its lock "
                                       "(another pageload daemon?)") from None
                raise StartupError(f"{path}: cannot lock the memory file: {exc.strerror or exc}") from None
            os.set_blocking(fd, True)
            if st.st_mode & 0o7777 != 0o600:  # a reused file: no other uid opens it by its path
                try:
                    os.fchmod(fd, 0o600)
                except OSError as exc:
                    raise StartupError(f"{path}: cannot make the memory file mode 0600 (it belongs to uid "
                                       f"{st.st_uid}): {exc.strerror or exc}") from None
            if st.st_size:
                os.ftruncate(fd, 0)  # locked: nobody else's memory; empty, so holes read as zero
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_space(self, where: str, data_bytes: int) -> None:
        if data_bytes <= 0:
            return
        if self.path is None:
            avail = memory_available()
            if avail is not None and data_bytes > avail:
                raise not_enough_space(where, data_bytes, avail, "memory (MemAvailable + SwapFree, cgroup limit)")
            return
        space = space_free(self.fd)
        if space is not None and data_bytes > space[0]:
            raise not_enough_space(where, data_bytes, space[0], f"its file system ({human(space[1])})")

    def _reserve(self, where: str, ranges: Iterable[tuple[int, int]]) -> int | None:
        """``fallocate`` the ``[lo, hi)`` ranges (in ascending order; touching ones are
        joined): the file system then holds their blocks for this file, and no write
        into them fails with ENOSPC later.  Returns the bytes reserved, or None where
        the file system cannot (EOPNOTSUPP: nothing is reserved)."""
        total = 0
        start = end = 0

        def one(lo: int, hi: int) -> None:
            try:
                os.posix_fallocate(self.fd, lo, hi - lo)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise StartupError(f"{where}: cannot reserve {human(hi - lo)} at {lo:#x} for the data "
                                       f"(--reserve): {exc.strerror}") from None
                raise

        try:
            for lo, hi in ranges:
                if lo == end:
                    end = hi
                    continue
                if end > start:
                    one(start, end)
                    total += end - start
                start, end = lo, hi
            if end > start:
                one(start, end)
                total += end - start
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return None
            raise
        return total

    def explain_error(self, err: int) -> str:
        """What errno ``err`` from a read into this file's mapping means.

        A read into a shared mapping of a full file system fails with EFAULT (the
        kernel cannot allocate the page it copies into), a copy into the file with
        ENOSPC: say so, rather than "Bad address".  Anything else is ``os.strerror(err)``.
        """
        if err not in (errno.EFAULT, errno.ENOSPC):
            return os.strerror(err)
        where = self.path if self.path is not None else "memfd"
        try:
            space = space_free(self.fd) if self.path is not None else None
        except OSError:
            space = None
        if self.path is None:
            avail = memory_available()
            if avail is not None and avail < 1 << 20:
                return f"memory file is full (ENOSPC on {where}: {human(avail)} of memory left)"
        elif space is not None and space[0] < mmap.PAGESIZE:
            return f"memory file is full (ENOSPC on {where}: {human(space[1])} file system)"
        return f"{os.strerror(err)} (writing into the memory file {where} failed)"

    def _abandon(self) -> None:
        """Close the fd after a failed start, removing the file if we created it."""
        if self._created and self.path is not None:
            with contextlib.suppress(OSError):
                if identity(os.lstat(self.path)) == identity(os.fstat(self.fd)):
                    os.unlink(self.path)
        os.close(self.fd)

    def buffer(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]

    @property
    def copy_fd(self) -> int:
        """The file itself: memory offset X is its offset X (the loader copies background
        reads into it file to file; on hugetlbfs, which takes no writes, that fails
        with EINVAL and the loader reads into the mapping instead)."""
        return self.fd

    def commit(self, offset: int, length: int) -> None:
        pass

    @property
    def view(self) -> memoryview:
        """The whole mapping (read it only for ranges already loaded)."""
        return self._view

    def discard(self) -> None:
        """Close after a failed start: a file this object created is removed."""
        if self._closed:
            return
        if self._created and self.path is not None:  # unlinked while still locked: never another's file
            with contextlib.suppress(OSError):
                if identity(os.lstat(self.path)) == identity(os.fstat(self.fd)):
                    os.unlink(self.path)
        self._created = False
        self.close()

    def close(self) -> None:
        """Unmap (or leave it to GC while a slice is still exported) and close the fd,
        which releases the lock; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # a slice is still exported (e.g. by a caller): let GC unmap it
            pass
        os.close(self.fd)

    def __enter__(self) -> MemoryFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
