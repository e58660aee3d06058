"""Backend registry: name -> implementation, imported lazily, with readable errors.

A backend's probe (``BackendInfo.probe``) runs in a short-lived child process, once
per process (:func:`aio._isolated.run_probe`): a native binding that crashes while
being probed takes only that child down, and the backend is reported unusable
with one line saying why.  Its implementation module is imported only after the
probe said yes.

Two environment variables, documented in docs/AIO.md:

* ``PAGELOAD_AIO_ORDER=uring,threads,sync`` replaces :data:`AUTO_ORDER` for ``auto``;
* ``PAGELOAD_AIO_PROBE_<NAME>=module:function`` runs that probe for backend
  ``<name>`` instead of its own (how the tests make a probe die by SIGILL).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

from ._base import BackendUnavailable, Queue
from ._isolated import run_probe

ORDER_VARIABLE = "PAGELOAD_AIO_ORDER"


@dataclass(frozen=True)
class BackendInfo:
    name: str
    target: str  #: "module:Class", imported on first use
    summary: str
    #: "module:function(step)" returning None or a one-line reason; run in a child process
    probe: str | None = None


_BACKENDS: dict[str, BackendInfo] = {}

#: the order ``auto`` tries backends in, fastest first where measured (see docs/BENCHMARKS.md)
AUTO_ORDER: list[str] = ["threads", "uring", "sync"]


def register(info: BackendInfo, *, auto_rank: int | None = None) -> None:
    _BACKENDS[info.name] = info
    if auto_rank is not None and info.name not in AUTO_ORDER:
        AUTO_ORDER.insert(auto_rank, info.name)


register(BackendInfo("threads", "aio._threads:ThreadQueue", "pool of OS threads running preadv"))
register(BackendInfo("sync", "aio._sync:SyncQueue", "in-line reads, for debugging"))
register(
    BackendInfo(
        "uring", "aio._uring:UringQueue", "io_uring ring (liburing), eventfd wakeups", "aio._probe:probe"
    )
)


def backends() -> list[str]:
    """Every registered backend name, usable here or not."""
    return list(_BACKENDS)


def _resolve(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def probe_variable(name: str) -> str:
    """The environment variable that replaces backend ``name``'s probe."""
    return f"PAGELOAD_AIO_PROBE_{name.upper()}"


def check_available(name: str) -> None:
    """Return if backend ``name`` can run on this host; else raise BackendUnavailable(why).

    Runs the backend's probe in a child process the first time (cached after that),
    then imports the backend's module.
    """
    info = _BACKENDS.get(name)
    if info is None:
        raise BackendUnavailable(f"unknown aio backend {name!r}; known: {', '.join(_BACKENDS)}")
    probe = os.environ.get(probe_variable(name)) or info.probe
    if probe is not None:
        why = run_probe(probe)
        if why is not None:
            raise BackendUnavailable(why)
    try:
        _resolve(info.target)
    except ImportError as exc:
        raise BackendUnavailable(f"aio backend {name!r} cannot be imported: {exc}") from exc


def auto_order() -> list[str]:
    """The order ``auto`` tries backends in: ``$PAGELOAD_AIO_ORDER`` if set, else :data:`AUTO_ORDER`."""
    value = os.environ.get(ORDER_VARIABLE, "").strip()
    if not value:
        return list(AUTO_ORDER)
    order = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [part for part in order if part not in _BACKENDS]
    if unknown:
        raise BackendUnavailable(
            f"{ORDER_VARIABLE} names unknown aio backends {', '.join(unknown)}; known: {', '.join(_BACKENDS)}"
        )
    return order


def pick_auto() -> tuple[str, str]:
    """Choose the backend ``--aio auto`` uses: (name, why)."""
    skipped = []
    order = auto_order()
    for name in order:
        try:
            check_available(name)
        except BackendUnavailable as exc:
            skipped.append(f"{name}: {exc}")
            continue
        why = "first usable in preference order " + " > ".join(order)
        if skipped:
            why += " (skipped " + "; ".join(skipped) + ")"
        return name, why
    raise BackendUnavailable("no aio backend is usable here: " + "; ".join(skipped))


def open_queue(name: str, capacity: int, **options: Any) -> Queue:
    """Create a queue of backend ``name`` (call inside trio).  ``auto`` picks one."""
    if name == "auto":
        name, _ = pick_auto()
    try:
        check_available(name)
    except BackendUnavailable as exc:
        if name in _BACKENDS:  # say which backend the reason is about
            raise BackendUnavailable(f"{name}: {exc}") from exc
        raise
    cls = _resolve(_BACKENDS[name].target)
    queue: Queue = cls(capacity=capacity, **options)
    return queue
