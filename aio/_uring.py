"""io_uring backend on the ``liburing`` package (2024.5.3): one ring, one eventfd, no threads of ours.

* :meth:`UringQueue.add` builds the request's ``liburing.iovec`` (a C array of
  ``struct iovec`` pointing straight at the caller's buffers: slices of a mapping,
  so the kernel copies page data once, into the mapping) and queues the request's
  slot, urgent or not.  Nothing reaches the kernel yet.  ``iovec`` reads each
  buffer's address while it is built and releases the buffer at once (it exports
  nothing afterwards), and frees its array when it is dropped, so a finished
  request pins nothing.
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

Import this module only after :func:`aio.check_available` said ``uring`` is usable:
that ran the binding in a child process first (:mod:`aio._isolated`).
"""

from __future__ import annotations

import errno
import functools
import os
from collections import deque
from collections.abc import Sequence

import liburing as _lu
import trio

from ._base import IOV_MAX, AioError, BackendUnavailable, Completion, Op, Queue, Request, read_nowait, read_nowait_v
from ._probe import explain, read_disabled, setup_errno

#: user_data of our cancel entries; read entries use their slot index, plus the range's
#: index times :data:`_RANGE_TAG` for an :data:`~aio.Op.GATHER`'s ranges
_CANCEL_TAG = (1 << 64) - 1
_RANGE_TAG = 1 << 32
_MAX_ENTRIES = 32768  # IORING_MAX_ENTRIES


#: ``IOSQE_ASYNC`` (1 << ``IOSQE_ASYNC_BIT``, linux/io_uring.h): liburing 2024.5.3 does not export it by name
IOSQE_ASYNC = 1 << 4
#: most bytes :meth:`UringQueue.read_now` reads in the caller's thread
READ_NOW_MAX = 64 << 10


def _iovec(buffers: Sequence[memoryview]) -> object:
    """A ``liburing.iovec`` over ``buffers`` (empty ones left out: they read nothing).

    Raises ValueError for a buffer that is not one contiguous run of bytes.
    """
    parts = []
    for buf in buffers:
        if not buf.nbytes:
            continue
        if not buf.c_contiguous:
            raise ValueError("the uring backend reads into contiguous buffers only")
        parts.append(buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B"))
    return _lu.iovec(parts)


@functools.cache
def iovec_limit() -> int:
    """Most buffers ``liburing.iovec`` takes: the kernel's ``IOV_MAX``, or fewer where
    the binding refuses more (liburing 2024.5.3 compares against the *name* of the
    sysconf constant, ``_SC_IOV_MAX`` = 60, not its value, and raises OverflowError)."""
    one = bytearray(1)
    for count in (IOV_MAX, 60, 16, 1):
        try:
            _lu.iovec([one] * count)
        except OverflowError:
            continue
        return count
    return 1


def _ring_entries(capacity: int) -> int:
    """Smallest power of two holding every request plus one cancel entry."""
    entries = 8
    while entries < capacity + 1 and entries < _MAX_ENTRIES:
        entries *= 2
    return entries


class UringQueue(Queue):
    """A :class:`~aio.Queue` on one io_uring ring; see the module docstring."""

    name = "uring"
    gathers = True  #: an Op.GATHER is one entry a range, its completion the ranges' in order

    def __init__(self, capacity: int = 64, *, force_async: bool = True) -> None:
        super().__init__(capacity)
        self.max_buffers = iovec_limit()
        self.force_async = force_async
        self._sqe_flags = IOSQE_ASYNC if force_async else 0
        self._ring = _lu.io_uring()
        self._ring_open = False
        try:
            _lu.io_uring_queue_init(_ring_entries(capacity), self._ring)
        except OSError as exc:
            # the binding's errno can be stale (it reads C errno after a raw system call):
            # ask the kernel again for the reason
            why = explain(disabled=read_disabled(), setup_errno=setup_errno() or exc.errno or errno.EIO)
            raise BackendUnavailable(why or f"io_uring_queue_init failed: {exc}") from exc
        self._ring_open = True
        self._eventfd = -1
        try:
            self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            _lu.io_uring_register_eventfd(self._ring, self._eventfd)
        except BaseException:
            self._exit_ring()
            raise
        self._cqe = _lu.io_uring_cqe()
        # slot i holds a request and its iovec from add until its completion is reaped
        self._requests: list[Request | None] = [None] * capacity
        self._iovecs: list[object] = [None] * capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._urgent: deque[int] = deque()  # slots added, not yet in the submission ring
        self._normal: deque[int] = deque()
        self._in_kernel = 0  # read entries placed in the submission ring, not yet reaped
        #: an Op.GATHER's slot: [ranges placed, ranges reaped, each range's result]
        self._gathers: dict[int, list[object]] = {}
        self._ready: list[Completion] = []
        self._submit_calls = 0

    # -- add ---------------------------------------------------------------------
    def read_now(self, fd: int, buffer: memoryview, offset: int) -> int:
        """:meth:`Queue.read_now`: ``preadv2(RWF_NOWAIT)`` for up to :data:`READ_NOW_MAX` bytes."""
        if self._closed or len(buffer) > READ_NOW_MAX:
            return -1
        return read_nowait(fd, buffer, offset)

    def read_now_v(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        """:meth:`Queue.read_now_v` as one ``preadv2(RWF_NOWAIT)``, up to :data:`READ_NOW_MAX` bytes."""
        if self._closed or sum(len(b) for b in buffers) > READ_NOW_MAX:
            return -1
        return read_nowait_v(fd, buffers, offset)

    def _add(self, request: Request) -> None:
        if request.op == Op.GATHER:
            if any(not b.c_contiguous for b in request.buffers):
                raise ValueError("the uring backend reads into contiguous buffers only")
            slot = self._free.pop()
            self._requests[slot] = request
            self._gathers[slot] = [0, 0, [0] * len(request.buffers)]
            (self._urgent if request.urgent else self._normal).append(slot)
            return
        buffers = request.buffers
        try:
            iovec = _iovec(buffers)
        except (TypeError, BufferError) as exc:
            raise ValueError(f"the uring backend cannot read into this buffer: {exc}") from exc
        slot = self._free.pop()
        self._requests[slot] = request
        self._iovecs[slot] = iovec
        (self._urgent if request.urgent else self._normal).append(slot)

    # -- submit / reap -----------------------------------------------------------
    def _fill(self) -> int:
        """Move queued requests into the submission ring, urgent first; return how many."""
        ring, flags, placed = self._ring, self._sqe_flags, 0
        for pending in (self._urgent, self._normal):
            while pending:
                sqe = _lu.io_uring_get_sqe(ring)
                if not sqe:  # ring full (a NULL entry): the rest waits for the next round
                    self._in_kernel += placed
                    return placed
                slot = pending[0]
                request = self._requests[slot]
                assert request is not None
                gather = self._gathers.get(slot)
                if gather is not None:  # one entry a range, as many as the ring takes now
                    placed += self._fill_gather(sqe, slot, request, gather)
                    if gather[0] == len(request.buffers):
                        pending.popleft()
                        continue
                    self._in_kernel += placed
                    return placed  # the ring is full
                pending.popleft()
                _lu.io_uring_prep_readv(sqe, request.fd, self._iovecs[slot], request.offset)
                _lu.io_uring_sqe_set_data64(sqe, slot)
                if flags:
                    _lu.io_uring_sqe_set_flags(sqe, flags)
                placed += 1
        self._in_kernel += placed
        return placed

    def _fill_gather(self, sqe: object, slot: int, request: Request, gather: list[object]) -> int:
        """Place an Op.GATHER's next ranges, the first into ``sqe``; return how many."""
        ring, flags, fd, fds = self._ring, self._sqe_flags, request.fd, request.fds
        buffers, offsets = request.buffers, request.offsets
        k = gather[0]
        assert isinstance(k, int)
        start = k
        while k < len(buffers):
            if k > start:
                sqe = _lu.io_uring_get_sqe(ring)
                if not sqe:
                    break
            buffer = buffers[k]
            _lu.io_uring_prep_read(sqe, fds[k] if fds else fd, buffer, len(buffer), offsets[k])
            _lu.io_uring_sqe_set_data64(sqe, slot + k * _RANGE_TAG)
            if flags:
                _lu.io_uring_sqe_set_flags(sqe, flags)
            k += 1
        gather[0] = k
        return k - start

    def _gather_done(self, slot: int, index: int, result: int) -> Completion | None:
        """Range ``index`` of the Op.GATHER in ``slot`` came back with ``result``; the
        request's completion once all its ranges have: the bytes read in order up to
        the first short or failed range (its ``-errno`` where none were)."""
        request = self._requests[slot]
        gather = self._gathers[slot]
        results = gather[2]
        assert request is not None and isinstance(results, list) and isinstance(gather[1], int)
        results[index] = result
        gather[1] += 1
        if gather[1] < len(results):
            return None
        del self._gathers[slot]
        done = 0
        for buffer, got in zip(request.buffers, results):
            if got < 0:
                return Completion(request.id, done if done else got)
            done += got
            if got < len(buffer):
                break
        return Completion(request.id, done)

    def _submit(self) -> None:
        """Hand everything in the submission ring to the kernel (one system call)."""
        while True:
            try:
                _lu.io_uring_submit(self._ring)
            except InterruptedError:
                continue
            except OSError as exc:  # its errno can be stale (see __init__): EAGAIN/EBUSY are the likely ones
                if exc.errno in (errno.EAGAIN, errno.EBUSY) and self._in_kernel:
                    return  # kernel short of resources: retried after the next completion
                raise AioError(f"io_uring_submit failed: {exc}") from exc
            self._submit_calls += 1
            return

    def _reap(self) -> int:
        """Move every read completion in the completion ring to ``_ready``; return how many."""
        ring, cqe, reads = self._ring, self._cqe, 0
        requests, iovecs, free, ready = self._requests, self._iovecs, self._free, self._ready
        peek, advance = _lu.io_uring_peek_cqe, _lu.io_uring_cq_advance
        while peek(ring, cqe) == 0:  # 0: an entry at the head; -EAGAIN: none
            slot, result = cqe.user_data, cqe.res
            advance(ring, 1)
            if slot == _CANCEL_TAG:
                continue
            reads += 1
            if slot >= _RANGE_TAG or slot in self._gathers:  # one range of an Op.GATHER
                index, slot = divmod(slot, _RANGE_TAG)
                completion = self._gather_done(slot, index, result)
                if completion is None:
                    continue
                requests[slot] = None
                free.append(slot)
                ready.append(completion)
                continue
            request = requests[slot]
            assert request is not None
            requests[slot] = iovecs[slot] = None  # the kernel is done with its buffers and iovec
            free.append(slot)
            ready.append(Completion(request.id, result))
        self._in_kernel -= reads
        return reads

    def _drain_eventfd(self) -> None:
        try:
            os.eventfd_read(self._eventfd)
        except BlockingIOError:
            pass

    def completions_waiting(self) -> bool:
        """:meth:`Queue.completions_waiting`: also what the kernel posted, not reaped yet."""
        if self._closed:
            return False
        return bool(self._ready) or bool(_lu.io_uring_cq_ready(self._ring))

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
                gather = self._gathers.get(slot)
                if gather is not None and gather[0]:  # some of its ranges are in the kernel
                    gather[2] = gather[2][: gather[0]]  # type: ignore[index]  # (wait for those only)
                    continue
                self._gathers.pop(slot, None)
                self._requests[slot] = self._iovecs[slot] = None
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
            gather = self._gathers.get(slot)
            placed = gather[0] if gather is not None else 1
            assert isinstance(placed, int)
            for k in range(placed):
                sqe = _lu.io_uring_get_sqe(self._ring)
                if not sqe:
                    self._submit()
                    sqe = _lu.io_uring_get_sqe(self._ring)
                    assert sqe
                _lu.io_uring_prep_cancel64(sqe, slot + k * _RANGE_TAG, 0)
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
        if self._ring_open:
            self._ring_open = False
            _lu.io_uring_queue_exit(self._ring)

    @property
    def submissions(self) -> int:
        """``io_uring_submit`` calls made so far (one per :meth:`wait` round that had work)."""
        return self._submit_calls

    def _ready_count(self) -> int:
        return len(self._ready)
