"""Answering faults on a userfaultfd: the one implementation both modes use
(docs/UFFD.md "Faults", "Failure behaviour"; zero-copy mode's "Faults").

An :class:`Answerer` makes one thread's answers on one userfaultfd through an
ioctl object (:class:`._ioctl.Uffd`, or a fake in the tests: anything with its
``copy``, ``zeropage``, ``continue_``, ``poison`` and ``wake``) and turns each
ioctl's error into an outcome the caller decides on:

* ``0``: done (the faulting thread is woken);
* ``EEXIST``: a page is already there (someone put it in first): wake it;
* ``EAGAIN``: the VMM is changing its mapping (an event is pending): answer again
  after the next read of events (:attr:`Answerer.retry`);
* ``EFAULT``: the source could not be read (a copy), or the page is not in the
  memory file (a continue);
* :data:`GONE`: the VMM's memory is gone (``ESRCH``/``ENOENT``): its owner was told
  (:meth:`Owner.vanished`), and nothing more is done for it;
* any other errno: unexpected (the exception is :attr:`Answerer.error`).

The kernel reports a copy or a continue that stopped early at a page already there
as ``EAGAIN`` with the bytes done: that is progress, not a changing mapping
(:meth:`Answerer.copy` goes on after that page).  Each answerer has its own ioctl
argument buffers, so each thread that answers has an answerer of its own.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import threading
import time
from typing import Protocol

from ..core._stats import LatencyHistogram
from . import _ioctl
from ._config import _Counters

log = logging.getLogger("pageload")

#: The outcome of an answer to a VMM whose memory is gone (ESRCH/ENOENT).
GONE = -1
_VANISHED = (errno_mod.ESRCH, errno_mod.ENOENT)


class Ioctls(Protocol):
    """The ioctls an answerer makes (:class:`._ioctl.Uffd`)."""

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> int: ...
    def zeropage(self, dst: int, length: int, mode: int = 0) -> int: ...
    def continue_(self, dst: int, length: int, mode: int = 0) -> int: ...
    def poison(self, dst: int, length: int) -> int: ...
    def wake(self, start: int, length: int) -> None: ...


class Owner(Protocol):
    """Whoever serves the VMM: whether its memory is gone, and being told so."""

    @property
    def gone(self) -> bool: ...

    def vanished(self, why: str) -> None:
        """An ioctl said ESRCH/ENOENT (``why``): the VMM's memory is gone."""


class Answerer:
    """One thread's answers on one userfaultfd (see the module doc).  Not thread-safe."""

    __slots__ = ("ioctl", "owner", "counts", "histogram", "lock", "copied", "error", "retry")

    def __init__(self, ioctl: Ioctls, owner: Owner, counts: _Counters | None = None,
                 histogram: LatencyHistogram | None = None, lock: threading.Lock | None = None) -> None:
        self.ioctl = ioctl
        self.owner = owner
        self.counts = counts if counts is not None else _Counters()  #: this answerer's own
        #: answered faults' latency, recorded under ``lock`` (another thread may read it)
        self.histogram = histogram if histogram is not None else LatencyHistogram()
        self.lock = lock if lock is not None else threading.Lock()
        #: after EAGAIN or EFAULT from :meth:`copy`, or any error from :meth:`continue_`:
        #: the bytes done before it
        self.copied = 0
        self.error: OSError | None = None  #: the last unexpected error
        #: faults to answer again after the next read of events (EAGAIN): (address, start_ns)
        self.retry: list[tuple[int, int]] = []

    def vanished(self, exc: OSError) -> bool:
        """Whether ``exc`` says the VMM's memory is gone; its owner is told so."""
        if exc.errno in _VANISHED:
            self.owner.vanished(exc.strerror or str(exc))
            return True
        return False

    def record(self, start_ns: int) -> None:
        """A fault read at ``start_ns`` was answered now."""
        elapsed = time.perf_counter_ns() - start_ns
        self.counts.blocked_ns += elapsed
        with self.lock:
            self.histogram.record(elapsed)

    def copy(self, va: int, src: int, length: int, page: int) -> int:
        """UFFDIO_COPY ``length`` bytes (whole pages of ``page``) from address ``src`` to
        ``va``.  Returns 0, or EEXIST if some page was already there (the rest is
        copied), EAGAIN (the mapping is changing: retry after reading the events) or
        EFAULT (the source could not be read; nothing more copied); :attr:`copied`
        then holds the bytes done.  A VMM gone or an unexpected error (logged; that
        page skipped) leave 0."""
        done = 0
        status = 0
        c = self.counts
        copy = self.ioctl.copy
        owner = self.owner
        while done < length and not owner.gone:
            try:
                n = copy(va + done, src + done, length - done)
                c.copies += 1
                c.copied_bytes += n
                done += n
            except _ioctl.UffdError as exc:
                c.copies += 1
                c.copied_bytes += exc.done
                done += exc.done - exc.done % page
                if exc.errno == errno_mod.EEXIST:
                    c.eexist += 1
                    status = errno_mod.EEXIST
                    done += page
                elif exc.errno == errno_mod.EAGAIN:
                    if exc.done:  # a partial copy (it stopped at a page already there): go on
                        continue
                    c.eagain += 1
                    self.copied = done
                    return errno_mod.EAGAIN
                elif exc.errno == errno_mod.EFAULT:
                    c.efault += 1
                    self.copied = done
                    return errno_mod.EFAULT
                elif self.vanished(exc):
                    return 0
                else:
                    log.warning("uffd: copy to %#x: %s", va + done, exc)
                    done += page
        return status

    def zero(self, va: int, length: int, src: int = 0) -> int:
        """UFFDIO_ZEROPAGE ``[va, va+length)``; with ``src``, UFFDIO_COPY from there
        instead (an untouched anonymous mapping: hugetlbfs has no zeropage ioctl).
        Returns the outcome (module doc)."""
        try:
            if src:
                self.ioctl.copy(va, src, length)
            else:
                self.ioctl.zeropage(va, length)
        except _ioctl.UffdError as exc:
            return self._failed(exc)
        return 0

    def continue_(self, va: int, length: int) -> int:
        """UFFDIO_CONTINUE ``[va, va+length)`` (map the memory file's pages): the
        outcome; :attr:`copied` holds the bytes mapped (all of them on success)."""
        try:
            self.copied = self.ioctl.continue_(va, length)
        except _ioctl.UffdError as exc:
            self.copied = exc.done
            return self._failed(exc)
        return 0

    def poison(self, va: int, length: int) -> int:
        """UFFDIO_POISON: a later access raises SIGBUS in the faulting thread.  Any
        other errno than EAGAIN or :data:`GONE` means the kernel cannot poison (no
        UFFDIO_POISON before 6.6): then nothing can make the thread see an error."""
        try:
            self.ioctl.poison(va, length)
        except _ioctl.UffdError as exc:
            return self._failed(exc)
        return 0

    def wake(self, va: int, length: int) -> None:
        """UFFDIO_WAKE (a page already there); an error is ignored."""
        try:
            self.ioctl.wake(va, length)
        except OSError:
            pass

    def _failed(self, exc: _ioctl.UffdError) -> int:
        if self.vanished(exc):
            return GONE
        self.error = exc
        return exc.errno or errno_mod.EIO
