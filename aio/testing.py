"""The conformance suite every :class:`~aio.Queue` backend passes.

In the spirit of ``trio.testing.check_one_way_stream``: give it a factory and it
drives a fresh queue through the whole contract of :mod:`aio._base`::

    await aio.testing.check_queue(lambda capacity: MyQueue(capacity))

``make_queue(capacity)`` is called inside trio and must return a new, empty queue
of that capacity.  Each check is also available on its own (:data:`CHECKS`, by
name) so a test suite can report them separately.  A check raises
:class:`AssertionError` saying what broke; it creates its own files (in
``tempfile.gettempdir()``) and a memfd mapping, and removes them afterwards.

Also here, as test tools rather than part of :mod:`aio`'s main interface:
:class:`FaultInjectingQueue` (fails or shortens chosen requests, see
:func:`fail_offsets`), :class:`HangingQueue` (chosen requests never complete,
see :func:`hang_offsets`), :class:`DelayedQueue` (holds completions back), and two
stand-in probes that die the way a broken native binding does,
:func:`probe_killed_by_sigill` and :func:`probe_killed_by_sigsegv`
(``PAGELOAD_AIO_PROBE_URING=aio.testing:probe_killed_by_sigill``, see docs/AIO.md).

What is checked: reads at page-aligned offsets land in the mapping and equal the
file; readv scatters in order; short reads at end of file; errors as ``-errno``
(``-EBADF`` for a bad descriptor; ``-EIO`` injected by
:class:`FaultInjectingQueue` around the queue); capacity and
:class:`~aio.QueueFull`; 1000 requests through capacity 32, each completed once;
urgent requests; cancelled ``wait`` losing nothing; ``aclose`` with requests in
flight (including a read blocked on an empty pipe, where the backend accepts one)
leaving the buffers alone afterwards; :class:`~aio.QueueClosed` after close;
:meth:`~aio.Queue.statistics` consistent with what happened; :meth:`~aio.Queue.read_now`
reading exactly its buffer or declining, and never making a request; :data:`~aio.Op.COPY`
(where :attr:`~aio.Queue.copies` says the backend takes it: refused otherwise) copying
file to file at both offsets, larger than one pipe, short at end of file, ``-EBADF``
for a bad source or a read-only destination (whose bytes never leak into a later
copy), urgent or not, mixed with reads; :data:`~aio.Op.GATHER` (where
:attr:`~aio.Queue.gathers` says so: refused otherwise) reading ranges apart from their
own offsets, short at end of file with nothing read after the short range;
:data:`~aio.Op.CALL` (where :attr:`~aio.Queue.calls` says so: refused otherwise)
returning its callable's result, an urgent call started while normal ones wait, and
``aclose`` with calls running (:func:`check_calls`).

The checks live in ``_checks_io.py`` (reads, errors, capacity), ``_checks_life.py``
(close, statistics) and ``_checks_ops.py`` (``read_now``, copies, gathers, calls), with what
they share in ``_check_tools.py``; this module is their one public entry point.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

from ._check_tools import MakeQueue
from ._checks_io import (
    check_capacity,
    check_errors_as_negative_errno,
    check_many_requests,
    check_reads_into_mapping,
    check_readv_most_buffers,
    check_readv_scatter,
    check_short_read_at_eof,
    check_urgent_requests,
    check_wait_cancelled_loses_nothing,
)
from ._checks_life import (
    check_close_with_blocked_read,
    check_close_with_reads_in_flight,
    check_completions_waiting,
    check_statistics,
    check_use_after_close,
)
from ._checks_ops import check_calls, check_copies, check_gathers, check_read_now
from ._wrappers import DelayedQueue, FaultInjectingQueue, FaultRule, HangingQueue, fail_offsets, hang_offsets

__all__ = [
    "CHECKS",
    "DelayedQueue",
    "FaultInjectingQueue",
    "FaultRule",
    "HangingQueue",
    "MakeQueue",
    "check_queue",
    "fail_offsets",
    "hang_offsets",
    "probe_killed_by_sigill",
    "probe_killed_by_sigsegv",
]

#: every check, by name, in the order :func:`check_queue` runs them
CHECKS: dict[str, Callable[[MakeQueue], Awaitable[None]]] = {
    "read_now": check_read_now,
    "reads_into_mapping": check_reads_into_mapping,
    "readv_scatter": check_readv_scatter,
    "readv_most_buffers": check_readv_most_buffers,
    "short_read_at_eof": check_short_read_at_eof,
    "errors_as_negative_errno": check_errors_as_negative_errno,
    "capacity": check_capacity,
    "many_requests": check_many_requests,
    "urgent_requests": check_urgent_requests,
    "wait_cancelled_loses_nothing": check_wait_cancelled_loses_nothing,
    "close_with_reads_in_flight": check_close_with_reads_in_flight,
    "close_with_blocked_read": check_close_with_blocked_read,
    "use_after_close": check_use_after_close,
    "statistics": check_statistics,
    "completions_waiting": check_completions_waiting,
    "copies": check_copies,
    "gathers": check_gathers,
    "calls": check_calls,
}


def _die_by(signum: signal.Signals) -> str:
    signal.signal(signum, signal.SIG_DFL)  # no Python handler (faulthandler) in the way
    signal.raise_signal(signum)
    return f"still alive after {signum.name}"  # only if the signal is blocked


def probe_killed_by_sigill(step: Callable[[str, str], None]) -> str | None:
    """A probe that dies by SIGILL while "creating a ring", as ``liburing`` 2026.x does on
    a CPU without AVX-512.  Run only in a probe child process (:mod:`aio._isolated`)."""
    step("liburing's binary", "creating a ring")
    return _die_by(signal.SIGILL)


def probe_killed_by_sigsegv(step: Callable[[str, str], None]) -> str | None:
    """A probe that dies by SIGSEGV while "creating a ring" (a binding with a memory bug).
    Run only in a probe child process (:mod:`aio._isolated`)."""
    step("liburing's binary", "creating a ring")
    return _die_by(signal.SIGSEGV)


async def check_queue(make_queue: MakeQueue) -> None:
    """Run every check in :data:`CHECKS` against queues from ``make_queue``."""
    for check in CHECKS.values():
        await check(make_queue)
