"""The asynchronous I/O interface every backend implements.

Modelled on gVisor's ``pkg/aio`` queue: one driver (the loader's trio task) owns a
queue, adds requests, and waits for completions.  A request names a file descriptor,
an offset and one or more destination buffers (slices of a mapping, normally); the
backend reads straight into those buffers, so page data is copied once, by the kernel.

A backend whose :attr:`Queue.gathers` is true takes :data:`Op.GATHER`: many ranges
apart in one request, each read from its own offset (a sparse raw image's data
islands into its memory file's mapping: one request, and one system call per
range, instead of a request per range), and optionally from its own file (``fds``:
a source kept as many files, one read across several of them).

A backend whose :attr:`Queue.calls` is true takes :data:`Op.CALL`: a callable run
in the backend's worker (``fn(buffers) -> int``: the bytes it put into the buffers,
in order, or ``-errno``), for sources that are not files (an object store's ranged
GETs): the request takes its place in the queue like a read, urgent ones first.

A backend whose :attr:`Queue.copies` is true also takes :data:`Op.COPY`: bytes go
from one file into another at given offsets without passing through any mapping
(``splice`` through a pipe of the worker's: the source's page-cache pages go into
the pipe by reference and are copied once, into the destination file).  Filling a
memfd this way costs no page fault per page, which a read into its mapping does:
one thread fills at about ``cp``'s speed instead of about half of it
(docs/AIO.md).

Ownership: from :meth:`Queue.add` until its completion is returned by
:meth:`Queue.wait` (or until :meth:`Queue.aclose` returns), the request's buffers
belong to the backend.  The caller must keep them alive and must not touch them.
"""

from __future__ import annotations

import abc
import ctypes
import enum
import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import add, itemgetter, le

import trio


class Op(enum.IntEnum):
    """What a request does."""

    READ = 0  #: ``pread`` into ``buffers[0]``
    READV = 1  #: ``preadv`` into every buffer in order
    COPY = 2  #: bytes from ``fd`` at ``offset`` into ``dest_fd`` at the ``dest`` ranges, in the kernel
    GATHER = 3  #: ``pread`` into each buffer from its own offset (``offsets``) of ``fd`` (or its ``fds``), in order
    CALL = 4  #: ``fn(buffers)`` run by the backend: the bytes it put into the buffers in order, or ``-errno``


class AioError(Exception):
    """Base of every error the ``aio`` package raises."""


class BackendUnavailable(AioError):
    """A backend cannot run on this host; ``str()`` says why, in one line."""


class QueueFull(AioError):
    """``add`` was called with ``capacity`` requests already outstanding (a local misuse)."""


class QueueClosed(AioError):
    """The queue was used after :meth:`Queue.aclose` (a local misuse)."""


@dataclass(slots=True, eq=False)
class Request:
    """One read.

    ``id`` is the caller's: completions carry it back.  ``urgent`` marks a request
    that a client is blocked on; backends start urgent requests before queued
    non-urgent ones (a hint: the ring backend passes it on as submission order).
    A :data:`Op.COPY` has no buffers: its bytes go into ``dest_fd``, in order, at
    each ``(offset, length)`` of ``dest`` (consecutive bytes of the source; with
    ``gather``, each range's bytes from the same offset of the source: a raw image
    copied into its memory file, many ranges apart in one request).

    ``then`` (optional) is called with no arguments right after the request completed
    in full, before its completion is returned, in the thread that ran it, where a
    backend runs requests in threads of its own (``threads``, and ``sync`` in the
    trio thread); other backends never call it, and neither does a request that
    failed or came back short.  The loader hashes what a background read just
    copied there, while it is still in the CPU's cache.  What it raises is ignored.
    """

    id: int
    op: Op
    fd: int
    offset: int
    buffers: Sequence[memoryview]
    urgent: bool = False
    dest_fd: int = -1
    dest: Sequence[tuple[int, int]] = ()
    gather: bool = False
    then: Callable[[], object] | None = None
    offsets: Sequence[int] = ()  #: :data:`Op.GATHER`: the file offset of each buffer
    fds: Sequence[int] = ()  #: :data:`Op.GATHER`: the file of each buffer (empty: ``fd`` for all)
    fn: Callable[[Sequence[memoryview]], int] | None = None  #: :data:`Op.CALL`: what to run
    #: :data:`Op.GATHER`: the mapping every buffer is a slice of, each at its range's own
    #: file offset (a raw image into its memory file); lets a backend read by address
    within: memoryview | None = None

    @property
    def length(self) -> int:
        if self.op == Op.COPY:
            return sum(n for _, n in self.dest)
        return sum(len(b) for b in self.buffers)

    @property
    def span(self) -> tuple[int, int]:
        """The first and past-the-last byte of ``fd`` the request reads (of its first
        file, for an :data:`Op.GATHER` over several files)."""
        if self.op == Op.GATHER and self.fds:
            return self.offsets[0], self.offsets[0] + len(self.buffers[0])
        if self.op == Op.GATHER:
            return self.offsets[0], self.offsets[-1] + len(self.buffers[-1])
        if self.op == Op.COPY and self.gather:
            return self.dest[0][0], self.dest[-1][0] + self.dest[-1][1]
        return self.offset, self.offset + self.length

    @classmethod
    def read(cls, id: int, fd: int, offset: int, buffer: memoryview, *, urgent: bool = False,
             then: Callable[[], object] | None = None) -> Request:
        return cls(id, Op.READ, fd, offset, (buffer,), urgent, then=then)

    @classmethod
    def readv(
        cls, id: int, fd: int, offset: int, buffers: Sequence[memoryview], *, urgent: bool = False,
        then: Callable[[], object] | None = None,
    ) -> Request:
        return cls(id, Op.READV, fd, offset, tuple(buffers), urgent, then=then)

    @classmethod
    def copy(
        cls, id: int, fd: int, offset: int, dest_fd: int, dest: Sequence[tuple[int, int]], *, urgent: bool = False,
        gather: bool = False, then: Callable[[], object] | None = None,
    ) -> Request:
        """The bytes of ``fd`` from ``offset`` on into ``dest_fd`` at each ``(offset,
        length)`` of ``dest``, in order (only for a queue whose :attr:`Queue.copies`
        is true).  ``gather=True``: each range's bytes come from the same offset of
        ``fd`` (``offset`` is then the first range's).  ``then``: as for any request."""
        return cls(id, Op.COPY, fd, offset, (), urgent, dest_fd, tuple(dest), gather, then)


    @classmethod
    def gather_read(
        cls, id: int, fd: int, buffers: Sequence[memoryview], offsets: Sequence[int], *, urgent: bool = False,
        then: Callable[[], object] | None = None, fds: Sequence[int] = (), within: memoryview | None = None,
    ) -> Request:
        """Each of ``buffers`` read from ``fd`` at its own offset (``offsets``, ascending,
        as many), in order (only for a queue whose :attr:`Queue.gathers` is true).  The
        result counts the bytes read in order up to the first short or failed range:
        the ranges after it do not count (a backend may have read them at the same
        time: io_uring does; threads and sync stop there).  ``fds`` (as many as ``buffers``): each range
        from its own file instead (``fd`` is then the first's; the offsets need not
        ascend).  ``then``: as for any request.  ``within`` (not with ``fds``): the
        mapping each buffer is the slice of at its own file offset (``within[o:o+n]``
        for a range at offset ``o`` of ``n`` bytes: a raw image read into its memory
        file); the threads and sync backends then read a batch of ranges with one
        system call (:mod:`aio._batch`), where io_uring can be used."""
        return cls(id, Op.GATHER, fds[0] if fds else fd, offsets[0] if offsets else 0, tuple(buffers), urgent,
                   then=then, offsets=tuple(offsets), fds=tuple(fds), within=within)

    @classmethod
    def call(
        cls, id: int, fn: Callable[[Sequence[memoryview]], int], buffers: Sequence[memoryview], *,
        urgent: bool = False, then: Callable[[], object] | None = None, offset: int = 0,
    ) -> Request:
        """``fn(buffers)`` run by the backend (only for a queue whose :attr:`Queue.calls`
        is true): in a worker thread (``threads``; urgent ones in its urgent lane), or
        inline in :meth:`Queue.wait` (``sync``).  ``fn`` returns the bytes it put into
        ``buffers``, counted in order (short: the bytes after it were not written), or
        ``-errno``; an exception it raises is ``-EIO``.  It must write only into
        ``buffers`` (a wrapper may pass it a shortened list) and must return, soon:
        :meth:`Queue.aclose` waits for it.  ``offset`` names where in its source the
        bytes come from (``span``: wrappers that fail requests by offset use it);
        ``fd`` is -1.  ``then``: as for any request."""
        return cls(id, Op.CALL, -1, offset, tuple(buffers), urgent, then=then, fn=fn)


@dataclass(frozen=True, slots=True)
class Completion:
    """The result of one request: bytes read (>= 0; may be short) or ``-errno``."""

    id: int
    result: int


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    backend: str
    capacity: int
    outstanding: int  #: added and not yet returned by wait()
    ready: int  #: completed, waiting to be returned by wait()
    submitted_total: int
    completed_total: int


#: the pipe a copy goes through: one ``splice`` each way per this many bytes
SPLICE_PIPE_BYTES = 1 << 20
#: the kernel's most buffers a ``preadv`` takes
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


class SplicePipe:
    """The pipe one thread's :data:`Op.COPY` requests go through, made at first use.

    ``splice`` moves the source's page-cache pages into the pipe by reference, then
    copies them into the destination file at its offset: one copy, no mapping, no
    file position shared between threads.  After an error on the way out the pipe
    may still hold bytes: it is closed and made again at the next copy.
    """

    def __init__(self) -> None:
        self._fds: tuple[int, int] | None = None
        self._size = 0

    def _open(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:  # as large as the system lets us (1 MiB by default for everyone)
            self._size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, SPLICE_PIPE_BYTES)
        except OSError:
            self._size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)  # what it has (64 KiB)
        self._fds = (r, w)
        return r, w

    def copy(self, request: Request) -> int:
        """Perform an :data:`Op.COPY`; bytes copied (short at the source's end, or
        before an error), or ``-errno`` if none were."""
        try:
            r, w = self._fds or self._open()
        except OSError as exc:  # out of descriptors, say: this copy fails, the next tries again
            return -(exc.errno or errno.EIO)
        src, offset, dest = request.fd, request.offset, request.dest_fd
        if request.gather:
            return self._gather(r, w, request)
        done = 0  # bytes in the destination
        held = 0  # bytes in the pipe, not written yet
        total = request.length
        try:
            # the source is consecutive: it goes into the pipe a pipe's worth at a time, and
            # out of it into each destination range (one splice a range, not two)
            for dest_offset, count in request.dest:
                part = 0
                while part < count:
                    if not held:
                        held = os.splice(src, w, min(total - done, self._size), offset_src=offset + done)
                        if held == 0:  # the source's end
                            return done
                    n = min(held, count - part)
                    out = os.splice(r, dest, n, offset_dst=dest_offset + part)
                    if out <= 0:
                        raise OSError(errno.EIO, "the destination took no bytes")
                    done += out
                    part += out
                    held -= out
        except OSError as exc:
            if held:  # bytes left in the pipe: never let them reach the next copy
                self.close()
            return done if done else -(exc.errno or errno.EIO)
        return done

    def _gather(self, r: int, w: int, request: Request) -> int:
        """An :data:`Op.COPY` with ``gather``: each range from its own offset of the source."""
        src, dest = request.fd, request.dest_fd
        done = 0
        held = 0
        try:
            for dest_offset, count in request.dest:
                part = 0
                while part < count:
                    held = os.splice(src, w, min(count - part, self._size), offset_src=dest_offset + part)
                    if held == 0:  # the source's end
                        return done
                    out = os.splice(r, dest, held, offset_dst=dest_offset + part)
                    if out != held:
                        out = self._rest(r, dest, held, out, dest_offset + part)
                    done += out
                    part += out
                    held = 0
        except OSError as exc:
            if held:
                self.close()
            return done if done else -(exc.errno or errno.EIO)
        return done

    @staticmethod
    def _rest(r: int, dest: int, held: int, out: int, at: int) -> int:
        """The pipe held ``held`` bytes and ``out`` of them went to ``dest`` at ``at``:
        write the rest after them; returns all written (OSError: the pipe may still hold some)."""
        if out <= 0:
            raise OSError(errno.EIO, "the destination took no bytes")
        done = out
        while done < held:
            out = os.splice(r, dest, held - done, offset_dst=at + done)
            if out <= 0:
                raise OSError(errno.EIO, "the destination took no bytes")
            done += out
        return done

    def close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None


def run_request(request: Request, pipe: SplicePipe | None = None) -> int:
    """Perform ``request`` now; return bytes read or ``-errno``.  Shared by the preadv
    backends; an :data:`Op.COPY` goes through ``pipe``.  Calls ``request.then`` after
    a request that completed in full."""
    if request.op == Op.COPY:
        result = -errno.EOPNOTSUPP if pipe is None else pipe.copy(request)
    elif request.op == Op.GATHER:
        result = _gather_read(request)
    elif request.op == Op.CALL:
        result = _call(request)
    else:
        try:
            result = os.preadv(request.fd, request.buffers, request.offset)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        except (TypeError, ValueError, BufferError):  # a buffer the kernel cannot take
            return -errno.EINVAL
    if request.then is not None and result == request.length:
        try:
            request.then()
        except Exception:  # the caller's: it finds its work undone
            pass
    return result


def _call(request: Request) -> int:
    """An :data:`Op.CALL`: its callable's result, checked (an exception or a count past
    its buffers is ``-EIO``)."""
    assert request.fn is not None
    try:
        result = int(request.fn(request.buffers))
    except Exception:  # the caller's: it gets an error, never a dead worker
        return -errno.EIO
    return result if result <= request.length else -errno.EIO


def _gather_read(request: Request) -> int:
    """An :data:`Op.GATHER`: one ``pread`` a range, in order, until one is short or fails;
    with ``within``, batches of ranges through this thread's ring (:mod:`aio._batch`)."""
    if request.within is not None and not request.fds:
        from ._batch import gather_batch, thread_ring

        ring = thread_ring()
        if ring is not None:
            lengths = list(map(len, request.buffers))
            done = gather_batch(ring, request.fd, request.within, lengths, request.offsets)
            if done == sum(lengths):
                return done
            # short or failed through the ring: the loop below reads it all again and says
            # what one pread a range finds (the ring only ever makes a gather faster)
    done = 0
    fds = request.fds or repeat(request.fd)
    try:
        for buffer, offset, fd in zip(request.buffers, request.offsets, fds):
            n = os.preadv(fd, (buffer,), offset)
            done += n
            if n < len(buffer):
                break
    except OSError as exc:
        return done if done else -(exc.errno or errno.EIO)
    except (TypeError, ValueError, BufferError):
        return done if done else -errno.EINVAL
    return done


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


#: ``preadv2`` through a handle that keeps the GIL (``ctypes.PyDLL``): with RWF_NOWAIT
#: it never waits for a disk, and letting the GIL go for its few microseconds let a
#: worker thread take it, and the caller then waited for that thread's Python
_preadv2_held = ctypes.PyDLL(None, use_errno=True).preadv2
_preadv2_held.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_int, ctypes.c_long, ctypes.c_int]
_preadv2_held.restype = ctypes.c_ssize_t


def read_nowait(fd: int, buffer: memoryview, offset: int) -> int:
    """``preadv2(RWF_NOWAIT)`` into ``buffer``: the bytes read, or -1 if that would
    block (data not in the page cache) or failed.  Shared by the backends' ``read_now``.
    The GIL is kept (it never waits); a read-only or empty buffer takes ``os.preadv``
    (a read-only one is declined)."""
    n = len(buffer)
    if n and not buffer.readonly:
        iov = _IoVec(ctypes.addressof(ctypes.c_char.from_buffer(buffer)), n)
        return max(-1, int(_preadv2_held(fd, ctypes.byref(iov), 1, offset, os.RWF_NOWAIT)))
    try:
        return os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except (OSError, BufferError, TypeError, ValueError):  # (a read-only buffer: BufferError)
        return -1


def read_nowait_v(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
    """:func:`read_nowait` into several buffers, one after the other from ``offset``:
    one ``preadv2(RWF_NOWAIT)`` (a verified wait's chunk, its pieces at their places in
    memory), the GIL kept.  The bytes read (short where the file ends or the page cache
    holds only part), or -1."""
    n = len(buffers)
    if n == 1:
        return read_nowait(fd, buffers[0], offset)
    if n == 0 or n > IOV_MAX or any(b.readonly or not len(b) for b in buffers):
        return -1
    iov = (_IoVec * n)()
    for i, buffer in enumerate(buffers):
        iov[i].base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        iov[i].len = len(buffer)
    return max(-1, int(_preadv2_held(fd, iov, n, offset, os.RWF_NOWAIT)))


class Queue(abc.ABC):
    """An asynchronous read queue owned by one trio task.

    * :meth:`add` never blocks.  It may only *start* the request at the next
      :meth:`wait`, so several adds batch into one submission.
    * :meth:`wait` returns every completion that is ready, blocking until at least
      ``min_completions`` are.  Completions come in any order, each exactly once.
      Cancelling ``wait`` loses nothing: completions stay for the next call.
    * :meth:`aclose` cancels requests that have not started, waits for those that
      have, and returns only when no buffer will be touched again.  After it,
      every method raises :class:`QueueClosed`.
    """

    name: str = "?"
    #: whether :data:`Op.COPY` requests are taken (otherwise :meth:`add` refuses them)
    copies: bool = False
    #: whether :data:`Op.GATHER` requests are taken (otherwise :meth:`add` refuses them)
    gathers: bool = False
    #: whether :data:`Op.CALL` requests are taken (otherwise :meth:`add` refuses them)
    calls: bool = False
    #: whether a read through this queue returns what the file holds, so that a reader
    #: may read the file without it (the userfaultfd handler's direct copies do).  A
    #: queue that changes what reads return (fails them, holds them forever) is not.
    transparent: bool = True
    #: most buffers one :data:`Op.READV` (or :data:`Op.READ`) takes; :meth:`add`
    #: refuses more.  The kernel's ``IOV_MAX``, or less where a binding limits it.
    max_buffers: int = IOV_MAX

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._outstanding = 0
        self._submitted_total = 0
        self._completed_total = 0
        self._closed = False

    @property
    def outstanding(self) -> int:
        """Requests added and not yet returned by :meth:`wait`."""
        return self._outstanding

    @property
    def closed(self) -> bool:
        return self._closed

    def add(self, request: Request) -> None:
        """Queue ``request``.  Raises :class:`QueueFull` at capacity."""
        if self._closed:
            raise QueueClosed(f"{self.name} queue is closed")
        if self._outstanding >= self.capacity:
            raise QueueFull(f"{self.name} queue is at its capacity of {self.capacity}")
        if request.op == Op.COPY:
            if not self.copies:
                raise ValueError(f"the {self.name} backend does not take Op.COPY requests")
            if (request.buffers or request.dest_fd < 0 or not request.dest
                    or min(map(itemgetter(0), request.dest)) < 0 or min(map(itemgetter(1), request.dest)) <= 0):
                raise ValueError("Op.COPY takes no buffers, a destination fd and (offset, length) pairs, "
                                 "each length positive")
        elif not request.buffers:
            raise ValueError("a request needs at least one buffer")
        elif request.op == Op.CALL and not self.calls:
            raise ValueError(f"the {self.name} backend does not take Op.CALL requests")
        elif request.op == Op.CALL and not callable(request.fn):
            raise ValueError("Op.CALL needs a callable")
        elif request.op == Op.GATHER and not self.gathers:
            raise ValueError(f"the {self.name} backend does not take Op.GATHER requests")
        elif request.op == Op.GATHER and (
                len(request.offsets) != len(request.buffers) or min(request.offsets) < 0
                or (len(request.fds) != len(request.buffers) if request.fds
                    # each range ends at or before the next one starts (C loops: no Python per range)
                    else not all(map(le, map(add, request.offsets, map(len, request.buffers)),
                                     request.offsets[1:])))):
            raise ValueError("Op.GATHER takes one offset a buffer, ascending, the ranges apart "
                             "(or one file a buffer)")
        elif request.op == Op.GATHER and request.within is not None and (
                request.fds or request.within.readonly or request.within.itemsize != 1 or not request.within.contiguous
                or request.offsets[-1] + len(request.buffers[-1]) > request.within.nbytes):
            raise ValueError("Op.GATHER's within: a writable byte mapping holding every range at its file "
                             "offset, not with fds")
        elif request.op == Op.READ and len(request.buffers) != 1:
            raise ValueError("Op.READ takes exactly one buffer; use Op.READV")
        elif request.op == Op.READV and len(request.buffers) > self.max_buffers:
            raise ValueError(f"the {self.name} backend takes at most {self.max_buffers} buffers a read, "
                             f"not {len(request.buffers)}")
        elif any(b.readonly for b in request.buffers):
            raise ValueError("a read needs writable buffers")
        self._add(request)  # may raise: count only what was accepted
        self._outstanding += 1
        self._submitted_total += 1

    async def wait(self, min_completions: int = 1) -> list[Completion]:
        """Return the ready completions, at least ``min_completions`` of them."""
        if self._closed:
            raise QueueClosed(f"{self.name} queue is closed")
        if min_completions > self._outstanding:
            raise ValueError(
                f"cannot wait for {min_completions} completions with {self._outstanding} outstanding"
            )
        done = await self._wait(min_completions)
        self._outstanding -= len(done)
        self._completed_total += len(done)
        return done

    async def aclose(self) -> None:
        """Cancel what has not started, wait for what has; idempotent."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):  # buffers must be free before we return
            await self._aclose()
        self._outstanding = 0

    def read_now(self, fd: int, buffer: memoryview, offset: int) -> int:
        """Read ``buffer`` from ``fd`` at ``offset`` at once, in the caller's thread,
        only if that cannot block (the data is in the page cache); not a request: it
        takes no slot and yields no completion.  Returns the bytes read, or -1 where
        the backend does not offer it or the read would block or failed (the caller
        then adds a request).  By default the backend does not offer it."""
        return -1

    def read_now_v(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        """:meth:`read_now` into ``buffers``, one after the other from ``offset``: the
        bytes read (fewer where one was short), or -1 where the first was declined.  By
        default one :meth:`read_now` a buffer; a backend may make it one system call."""
        done = 0
        for buffer in buffers:
            got = self.read_now(fd, buffer, offset + done)
            if got < 0:
                return done if done else -1
            done += got
            if got < len(buffer):
                break
        return done

    def completions_waiting(self) -> bool:
        """Whether completions are there for :meth:`wait` to return now: a hint for an
        owner that polls something else meanwhile (the server's busy polling stops to
        let them be collected).  Cheap; False once closed."""
        return not self._closed and self._ready_count() > 0

    def background_yields(self, yields: bool) -> None:
        """A hint from the queue's owner: while ``yields`` (clients are blocked on
        reads), non-urgent reads should leave the CPU to the caller's thread; otherwise
        they may compete for it normally.  By default nothing changes."""
        return None

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            backend=self.name,
            capacity=self.capacity,
            outstanding=self._outstanding,
            ready=self._ready_count(),
            submitted_total=self._submitted_total,
            completed_total=self._completed_total,
        )

    # -- what a backend provides ---------------------------------------------------
    @abc.abstractmethod
    def _add(self, request: Request) -> None: ...

    @abc.abstractmethod
    async def _wait(self, min_completions: int) -> list[Completion]: ...

    @abc.abstractmethod
    async def _aclose(self) -> None: ...

    @abc.abstractmethod
    def _ready_count(self) -> int: ...
