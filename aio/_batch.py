"""Many small reads in one system call: a ring of io_uring's, of one thread's.

An :data:`~aio.Op.GATHER` read range by range (``_gather_read``) costs a ``preadv``
a range, and each call gives the GIL up and takes it back: a million-range raw
image's fill spent about half its time handing the GIL between the worker and the
trio thread (docs/MEASUREMENTS.md, "Raw gathers in one system call").  A
:class:`BatchRing` puts up to :data:`BATCH_ENTRIES` reads into the submission queue
of a ring of its own with NumPy (no Python work per read), then makes one
``io_uring_enter`` through ctypes, which lets the GIL go for the whole batch: the
kernel does the reads (inline, where the page cache holds them), and the worker
takes the GIL again once for all their results.

The ring is driven with raw system calls and its queues are NumPy views of its
mappings, so it needs no native code of its own (not liburing's binding, whose
import is probed in a child process: :mod:`aio._probe`).  Each thread that gathers
gets its own ring (:func:`thread_ring`), made at its first gather and closed when
the thread ends.  Where io_uring cannot be used (:func:`unavailable` says why, in
one line), gathers read range by range as before; so is a gather that came back short
or failed through the ring (``aio._base._gather_read``): the ring only makes gathers
faster.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from ._probe import _NR_IO_URING_SETUP, _PARAMS_SIZE, explain, read_disabled

__all__ = ["BATCH_ENTRIES", "BatchRing", "thread_ring", "unavailable"]

#: reads a ring takes at once (a gather of more goes through it in turns)
BATCH_ENTRIES = 256
_NR_ENTER = _NR_IO_URING_SETUP + 1  # io_uring_enter: the same on every architecture (Linux 5.1+)
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP = 1
_OP_READ = 22  # IORING_OP_READ (Linux 5.6)
_ENTER_GETEVENTS = 1
_PARAMS = struct.Struct("<10I")  # sq_entries cq_entries flags sq_thread_cpu sq_thread_idle features wq_fd resv[3]
_RING_OFFSETS = struct.Struct("<8IQ")  # io_sqring_offsets / io_cqring_offsets

_libc = ctypes.CDLL(None, use_errno=True)  # CDLL: the GIL is let go for each call
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_lock = threading.Lock()
_reason: list[str | None] = []  # [] until probed; then [None] (usable) or [why not]
_local = threading.local()


def _sqe_dtype() -> Any:
    import numpy

    return numpy.dtype([("opcode", "u1"), ("flags", "u1"), ("ioprio", "<u2"), ("fd", "<i4"), ("off", "<u8"),
                        ("addr", "<u8"), ("len", "<u4"), ("rw_flags", "<u4"), ("user_data", "<u8"),
                        ("buf_index", "<u2"), ("personality", "<u2"), ("splice_fd_in", "<i4"), ("addr3", "<u8"),
                        ("pad", "<u8")])


def _cqe_dtype() -> Any:
    import numpy

    return numpy.dtype([("user_data", "<u8"), ("res", "<i4"), ("flags", "<u4")])


class BatchRing:
    """A ring of ``entries`` submission slots, driven by this thread alone.  Raises
    OSError where ``io_uring_setup`` fails."""

    def __init__(self, entries: int = BATCH_ENTRIES) -> None:
        import numpy

        params = ctypes.create_string_buffer(_PARAMS_SIZE)
        fd = _syscall(_NR_IO_URING_SETUP, ctypes.c_uint(entries), params)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        fields = _PARAMS.unpack_from(params, 0)
        sq_entries, cq_entries, features = fields[0], fields[1], fields[5]
        sq = _RING_OFFSETS.unpack_from(params, 40)  # head tail ring_mask ring_entries flags dropped array
        cq = _RING_OFFSETS.unpack_from(params, 80)  # head tail ring_mask ring_entries overflow cqes flags
        sq_size, cq_size = sq[6] + 4 * sq_entries, cq[5] + 16 * cq_entries
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        if features & _FEAT_SINGLE_MMAP:
            self._sq_map = self._cq_map = mmap.mmap(fd, max(sq_size, cq_size), flags, offset=_OFF_SQ_RING)
        else:
            self._sq_map = mmap.mmap(fd, sq_size, flags, offset=_OFF_SQ_RING)
            self._cq_map = mmap.mmap(fd, cq_size, flags, offset=_OFF_CQ_RING)
        self._sqe_map = mmap.mmap(fd, 64 * sq_entries, flags, offset=_OFF_SQES)
        words = numpy.frombuffer(self._sq_map, dtype="<u4")
        self._sq_tail = words[sq[1] // 4 : sq[1] // 4 + 1]
        self._sq_mask = int(words[sq[2] // 4])
        cwords = numpy.frombuffer(self._cq_map, dtype="<u4")
        self._cq_head = cwords[cq[0] // 4 : cq[0] // 4 + 1]
        self._cq_tail = cwords[cq[1] // 4 : cq[1] // 4 + 1]
        self._cq_mask = int(cwords[cq[2] // 4])
        self._cqes = numpy.frombuffer(self._cq_map, dtype=_cqe_dtype(), count=cq_entries, offset=cq[5])
        sqes = self._sqes = numpy.frombuffer(self._sqe_map, dtype=_sqe_dtype())
        sqes[:] = numpy.zeros(1, dtype=sqes.dtype)
        sqes["opcode"] = _OP_READ
        # slot i of the submission queue always names entry i: the array is written once
        words[sq[6] // 4 : sq[6] // 4 + sq_entries] = numpy.arange(sq_entries, dtype="<u4")
        self.entries = sq_entries
        self._steps = numpy.arange(sq_entries, dtype=numpy.uint64)
        self._results = numpy.zeros(sq_entries, dtype=numpy.int64)

    def close(self) -> None:
        self._finalizer()

    def read(self, fds: Any, addresses: Any, lengths: Any, offsets: Any) -> Any:
        """Reads ``i``: ``lengths[i]`` bytes of ``fds[i]`` (one fd, or one each) at
        ``offsets[i]`` to address ``addresses[i]``, at most :attr:`entries` of them,
        all started at once; returns their results in order (bytes, or ``-errno``), a
        view valid until the next call.  The caller vouches for the addresses."""
        import numpy

        n = len(addresses)
        if not 0 < n <= self.entries:
            raise ValueError(f"a batch of 1 to {self.entries} reads, not {n}")
        tail = int(self._sq_tail[0])
        slots = ((self._steps[:n] + tail) & self._sq_mask).astype(numpy.intp)
        sqes = self._sqes
        sqes["fd"][slots] = fds
        sqes["off"][slots] = offsets
        sqes["addr"][slots] = addresses
        sqes["len"][slots] = lengths
        sqes["user_data"][slots] = self._steps[:n]
        self._sq_tail[0] = (tail + n) & 0xFFFFFFFF  # the system call below orders it before the kernel looks
        results = self._results[:n]
        submitted = reaped = 0
        while reaped < n:
            got = _syscall(_NR_ENTER, self.fd, ctypes.c_uint(n - submitted), ctypes.c_uint(n - reaped),
                           ctypes.c_uint(_ENTER_GETEVENTS), None, ctypes.c_size_t(0))
            if got < 0:
                err = ctypes.get_errno()
                if err in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    continue
                # (the kernel returns early where it took fewer than asked: a partial
                # submission never waits for completions it was not given)
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
            submitted += got
            head, ctail = int(self._cq_head[0]), int(self._cq_tail[0])
            ready = (ctail - head) & 0xFFFFFFFF
            if ready:
                cqes = self._cqes[((self._steps[:ready] + head) & self._cq_mask).astype(numpy.intp)]
                results[cqes["user_data"].astype(numpy.intp)] = cqes["res"]
                self._cq_head[0] = ctail
                reaped += ready
            if submitted < n and got == 0 and not ready:
                raise OSError(errno.EIO, "io_uring_enter took none of the reads")
        return results


def unavailable() -> str | None:
    """Why gathers cannot go through a ring here (one line), or None: asked once, by
    making a ring and reading eight bytes of a memfd through it."""
    with _lock:
        if not _reason:
            _reason.append(_probe())
        return _reason[0]


def _probe() -> str | None:
    disabled = read_disabled()
    try:
        import numpy
    except ImportError as exc:  # (a dependency: never expected)
        return f"NumPy cannot be imported: {exc}"
    try:
        ring = BatchRing(8)
    except OSError as exc:
        return explain(disabled=disabled, setup_errno=exc.errno or errno.EIO) or str(exc)
    try:
        fd = os.memfd_create("pageload-probe", os.MFD_CLOEXEC)
        try:
            os.write(fd, b"pageload")
            out = bytearray(8)
            address = numpy.frombuffer(out, dtype=numpy.uint8).ctypes.data
            got = int(ring.read(fd, [address], [8], [0])[0])
            if got != 8 or out != b"pageload":
                return (f"io_uring's read op (IORING_OP_READ, Linux 5.6) failed here ({os.strerror(-got)})"
                        if got < 0 else f"io_uring read {got} bytes of 8")
        finally:
            os.close(fd)
    except OSError as exc:
        return f"io_uring: {exc}"
    finally:
        ring.close()
    return None


def thread_ring() -> BatchRing | None:
    """This thread's ring (made at its first call), or None where rings cannot be used."""
    ring: BatchRing | None = getattr(_local, "ring", None)
    if ring is not None:
        return ring
    if unavailable() is not None:
        return None
    try:
        ring = _local.ring = BatchRing()
    except OSError:  # out of memory or descriptors, say: this thread reads range by range
        return None
    return ring


def gather_batch(ring: BatchRing, fd: int, within: memoryview, lengths: Sequence[int],
                 offsets: Sequence[int]) -> int:
    """An :data:`~aio.Op.GATHER` whose ranges go to the same offsets of ``within`` as
    of ``fd``, through ``ring``: the bytes read in order up to the first short or failed
    range, or ``-errno`` where the first one failed."""
    import numpy

    view = numpy.frombuffer(within, dtype=numpy.uint8)  # holds the mapping while the kernel writes
    base = view.ctypes.data
    done = 0
    n = len(offsets)
    for start in range(0, n, ring.entries):
        offs = numpy.asarray(offsets[start : start + ring.entries], dtype=numpy.uint64)
        lens = numpy.asarray(lengths[start : start + ring.entries], dtype=numpy.uint64)
        try:
            results = ring.read(fd, offs + numpy.uint64(base), lens, offs)
        except OSError as exc:  # the ring may hold reads still: this thread makes a new one
            if getattr(_local, "ring", None) is ring:
                _local.ring = None
            return done if done else -(exc.errno or errno.EIO)
        bad = numpy.flatnonzero(results != lens.astype(numpy.int64))
        if len(bad):
            k = int(bad[0])
            done += int(lens[:k].sum())
            first = int(results[k])
            if first < 0:
                return done if done else first
            return done + first
        done += int(lens.sum())
    return done
