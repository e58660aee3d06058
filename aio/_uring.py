"""io_uring backend on the ``liburing`` package: one ring, one eventfd, no threads of ours.

* :meth:`UringQueue.add` writes the request's iovec array (pointers straight at
  the caller's buffers: slices of a mapping, so the kernel copies page data once,
  into the mapping) into the request's slot and queues it, urgent or not.
  Nothing reaches the kernel yet.  Each slot owns one liburing ``Iovec`` for the
  queue's life, rewritten in place: ``liburing.Iovec(list)`` never releases the
  buffers it is given, so one per request would pin every slice (and the mapping)
  forever and leak them.
* :meth:`UringQueue.wait` fills submission entries, urgent requests first, and
  submits them with one ``io_uring_submit`` per round.  Completions are reaped
  from the completion ring; when too few are there, the task parks in
  ``trio.lowlevel.wait_readable`` on an eventfd registered with the ring, which
  the kernel signals on every completion.  No polling, no thread per request.
* Ownership: each request and its iovec array sit in a slot (index = the entry's
  ``user_data``) from ``add`` until its completion is reaped, so neither the
  buffers nor the iovecs can be freed while the kernel may still use them.
* :meth:`UringQueue.aclose` forgets requests not yet submitted, asks the kernel to
  cancel the submitted ones (``IORING_OP_ASYNC_CANCEL``; a read already copying
  data finishes), waits until every submitted request has completed, then exits
  the ring.  When it returns no buffer will be touched again.

By default (``force_async=True``) every entry carries ``IOSQE_ASYNC``: the kernel's
io-wq workers do the reads and copy in parallel while the submit returns at once.
With ``force_async=False`` reads whose data is in the page cache run inline inside
``io_uring_submit``, in the trio thread: one core copies, and the event loop is
blocked for the whole batch (slower in the fill measurement, see docs/AIO.md).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections import deque
from collections.abc import Sequence

import liburing as _lu
import trio

from ._base import AioError, BackendUnavailable, Completion, Queue, Request
from ._probe import check_iovec_layout, explain, read_disabled

#: user_data of our cancel entries; read entries use their slot index
_CANCEL_TAG = (1 << 64) - 1
_MAX_ENTRIES = 32768  # IORING_MAX_ENTRIES


_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


class _CIovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _IovecArray:
    """A liburing ``Iovec`` whose C array is rewritten for each request.

    Built from throw-away bytearrays (that path exports nothing), then its
    ``struct iovec`` entries and its count are overwritten in place through
    ctypes (layout checked by :func:`aio._probe.check_iovec_layout`).  Grows by
    doubling when a request has more buffers than it holds.
    """

    __slots__ = ("iovec", "_entries", "_count", "_capacity")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self.iovec = _lu.Iovec([bytearray(1) for _ in range(capacity)])
        base = id(self.iovec)
        self._count = ctypes.c_size_t.from_address(base + 16)
        array = ctypes.c_void_p.from_address(base + 24).value
        if array is None:
            raise BackendUnavailable("liburing Iovec has no iovec array (layout changed?)")
        self._entries = (_CIovec * capacity).from_address(array)

    def fill(self, buffers: Sequence[memoryview]) -> None:
        """Point the entries at ``buffers`` (writable, else TypeError).  No copy."""
        entries, addressof, from_buffer = self._entries, ctypes.addressof, ctypes.c_char.from_buffer
        for i, buf in enumerate(buffers):
            entry = entries[i]
            size = buf.nbytes
            entry.base = addressof(from_buffer(buf)) if size else None
            entry.len = size
        self._count.value = len(buffers)

    @property
    def capacity(self) -> int:
        return self._capacity

    def release(self) -> None:
        """Restore the count liburing allocated, so its destructor frees what it made."""
        self._count.value = self._capacity


def _ring_entries(capacity: int) -> int:
    """Smallest power of two holding every request plus one cancel entry."""
    entries = 8
    while entries < capacity + 1 and entries < _MAX_ENTRIES:
        entries *= 2
    return entries


class UringQueue(Queue):
    """A :class:`~aio.Queue` on one io_uring ring; see the module docstring."""

    name = "uring"

    def __init__(self, capacity: int = 64, *, force_async: bool = True) -> None:
        super().__init__(capacity)
        layout_problem = check_iovec_layout(_lu)
        if layout_problem is not None:
            raise BackendUnavailable(layout_problem)
        self.force_async = force_async
        self._sqe_flags = _lu.IOSQE_ASYNC if force_async else 0
        self._ring = _lu.Ring()
        try:
            _lu.io_uring_queue_init(_ring_entries(capacity), self._ring)
        except OSError as exc:
            why = explain(disabled=read_disabled(), setup_errno=exc.errno or errno.EIO)
            raise BackendUnavailable(why) from exc
        self._eventfd = -1
        try:
            self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            _lu.io_uring_register_eventfd(self._ring, self._eventfd)
        except BaseException:
            self._exit_ring()
            raise
        self._cqe = _lu.Cqe()
        # slot i holds a request (and its iovecs) from add until its completion is reaped
        self._requests: list[Request | None] = [None] * capacity
        self._iovecs = [_IovecArray(4) for _ in range(capacity)]
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._urgent: deque[int] = deque()  # slots added, not yet in the submission ring
        self._normal: deque[int] = deque()
        self._in_kernel = 0  # read entries placed in the submission ring, not yet reaped
        self._ready: list[Completion] = []
        self._submit_calls = 0

    # -- add ---------------------------------------------------------------------
    def _add(self, request: Request) -> None:
        buffers = request.buffers
        if len(buffers) > _IOV_MAX:
            raise ValueError(f"a request takes at most {_IOV_MAX} buffers, not {len(buffers)}")
        slot = self._free[-1]
        iovecs = self._iovecs[slot]
        if len(buffers) > iovecs.capacity:
            size = iovecs.capacity
            while size < len(buffers):
                size *= 2
            iovecs.release()
            iovecs = self._iovecs[slot] = _IovecArray(min(size, _IOV_MAX))
        try:
            iovecs.fill(buffers)
        except TypeError as exc:
            raise ValueError(f"the uring backend reads into writable buffers only: {exc}") from exc
        self._free.pop()
        self._requests[slot] = request
        (self._urgent if request.urgent else self._normal).append(slot)

    # -- submit / reap -----------------------------------------------------------
    def _fill(self) -> int:
        """Move queued requests into the submission ring, urgent first; return how many."""
        ring, flags, placed = self._ring, self._sqe_flags, 0
        for pending in (self._urgent, self._normal):
            while pending:
                sqe = _lu.io_uring_get_sqe(ring)
                if sqe is None:  # ring full: the rest waits for the next round
                    self._in_kernel += placed
                    return placed
                slot = pending.popleft()
                request = self._requests[slot]
                assert request is not None
                _lu.io_uring_prep_readv(sqe, request.fd, self._iovecs[slot].iovec, request.offset, 0)
                _lu.io_uring_sqe_set_data64(sqe, slot)
                if flags:
                    _lu.io_uring_sqe_set_flags(sqe, flags)
                placed += 1
        self._in_kernel += placed
        return placed

    def _submit(self) -> None:
        """Hand everything in the submission ring to the kernel (one system call)."""
        while True:
            try:
                _lu.io_uring_submit(self._ring)
            except InterruptedError:
                continue
            except (BlockingIOError, OSError) as exc:
                if exc.errno in (errno.EAGAIN, errno.EBUSY) and self._in_kernel:
                    return  # kernel short of resources: retried after the next completion
                raise AioError(f"io_uring_submit failed: {exc}") from exc
            self._submit_calls += 1
            return

    def _reap(self) -> int:
        """Move every read completion in the completion ring to ``_ready``; return how many."""
        cqe, seen, reads = self._cqe, 0, 0
        requests, free, ready = self._requests, self._free, self._ready
        for _ in _lu.CqeIter(self._ring, cqe):
            entry = cqe[0]
            seen += 1
            slot = entry.user_data
            if slot == _CANCEL_TAG:
                continue
            try:
                result = entry.res
            except OSError as exc:  # liburing raises for a negative res
                result = -(exc.errno or errno.EIO)
            request = requests[slot]
            assert request is not None
            reads += 1
            requests[slot] = None  # the kernel is done with its buffers and iovecs
            free.append(slot)
            ready.append(Completion(request.id, result))
        if seen:
            _lu.io_uring_cq_advance(self._ring, seen)
            self._in_kernel -= reads
        return reads

    def _drain_eventfd(self) -> None:
        try:
            os.eventfd_read(self._eventfd)
        except BlockingIOError:
            pass

    async def _park(self) -> None:
        """Sleep until the kernel posts a completion (or a spurious eventfd wakeup)."""
        self._drain_eventfd()
        if _lu.io_uring_cq_ready(self._ring):
            return
        await trio.lowlevel.wait_readable(self._eventfd)

    async def _wait(self, min_completions: int) -> list[Completion]:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._fill():
            self._submit()
        while True:
            self._reap()
            if len(self._ready) >= min_completions:
                break
            # the submission ring had been full, or the kernel had refused a submit
            if self._fill() or _lu.io_uring_sq_ready(self._ring):
                self._submit()
            await self._park()  # cancelled here: reaped completions stay in _ready
        done, self._ready = self._ready, []
        await trio.lowlevel.cancel_shielded_checkpoint()
        return done

    # -- close -------------------------------------------------------------------
    async def _aclose(self) -> None:
        for pending in (self._urgent, self._normal):  # never started: just forget them
            while pending:
                slot = pending.popleft()
                self._requests[slot] = None
                self._free.append(slot)
        if self._in_kernel:
            self._cancel_in_flight()
        while self._in_kernel:
            self._reap()
            if self._in_kernel:
                await self._park()
        self._ready.clear()
        self._exit_ring()

    def _cancel_in_flight(self) -> None:
        """Queue one ASYNC_CANCEL entry per submitted read and submit them."""
        for slot, request in enumerate(self._requests):
            if request is None:
                continue
            sqe = _lu.io_uring_get_sqe(self._ring)
            if sqe is None:
                self._submit()
                sqe = _lu.io_uring_get_sqe(self._ring)
                assert sqe is not None
            _lu.io_uring_prep_cancel64(sqe, slot, 0)
            _lu.io_uring_sqe_set_data64(sqe, _CANCEL_TAG)
        self._submit()

    def _exit_ring(self) -> None:
        if self._eventfd >= 0:
            try:
                _lu.io_uring_unregister_eventfd(self._ring)
            except OSError:
                pass
            os.close(self._eventfd)
            self._eventfd = -1
        _lu.io_uring_queue_exit(self._ring)
        for iovecs in getattr(self, "_iovecs", ()):  # absent if __init__ failed early
            iovecs.release()

    @property
    def submissions(self) -> int:
        """``io_uring_submit`` calls made so far (one per :meth:`wait` round that had work)."""
        return self._submit_calls

    def _ready_count(self) -> int:
        return len(self._ready)
