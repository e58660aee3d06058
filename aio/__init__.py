"""Pluggable asynchronous reads for the loader.

One interface (:class:`Queue`, after gVisor's ``pkg/aio``), several backends chosen
by name through :func:`open_queue`: ``threads``, ``sync`` (and ``uring`` where
liburing and io_uring are usable).

Test tools (fault injection, slowed queues, the conformance suite) are in
:mod:`aio.testing`.
"""

from ._base import (
    IOV_MAX,
    AioError,
    BackendUnavailable,
    Completion,
    Op,
    Queue,
    QueueClosed,
    QueueFull,
    QueueStatistics,
    Request,
    usable_cpus,
)
from ._registry import AUTO_ORDER, backends, check_available, open_queue, pick_auto

__all__ = [
    "AUTO_ORDER",
    "IOV_MAX",
    "AioError",
    "BackendUnavailable",
    "Completion",
    "Op",
    "Queue",
    "QueueClosed",
    "QueueFull",
    "QueueStatistics",
    "Request",
    "backends",
    "check_available",
    "open_queue",
    "pick_auto",
    "usable_cpus",
]
