"""Pluggable asynchronous reads for the loader.

One interface (:class:`Queue`, after gVisor's ``pkg/aio``), several backends chosen
by name through :func:`open_queue`: ``threads``, ``sync`` (and ``uring`` where
liburing and io_uring are usable).
"""

from ._base import (
    AioError,
    BackendUnavailable,
    Completion,
    Op,
    Queue,
    QueueClosed,
    QueueFull,
    QueueStatistics,
    Request,
)
from ._registry import AUTO_ORDER, backends, check_available, open_queue, pick_auto
from ._wrappers import DelayedQueue, FaultInjectingQueue, FaultRule, fail_offsets

__all__ = [
    "AUTO_ORDER",
    "AioError",
    "BackendUnavailable",
    "Completion",
    "DelayedQueue",
    "FaultInjectingQueue",
    "FaultRule",
    "Op",
    "Queue",
    "QueueClosed",
    "QueueFull",
    "QueueStatistics",
    "Request",
    "backends",
    "check_available",
    "fail_offsets",
    "open_queue",
    "pick_auto",
]
