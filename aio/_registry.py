"""Backend registry: name -> implementation, imported lazily, with readable errors."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._base import BackendUnavailable, Queue


@dataclass(frozen=True)
class BackendInfo:
    name: str
    target: str  #: "module:Class", imported on first use
    summary: str
    probe: str | None = None  #: "module:function" returning None or raising BackendUnavailable


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


def check_available(name: str) -> None:
    """Return if backend ``name`` can run on this host; else raise BackendUnavailable(why)."""
    info = _BACKENDS.get(name)
    if info is None:
        raise BackendUnavailable(f"unknown aio backend {name!r}; known: {', '.join(_BACKENDS)}")
    try:
        if info.probe is not None:
            probe: Callable[[], None] = _resolve(info.probe)
            probe()
        _resolve(info.target)
    except BackendUnavailable:
        raise
    except ImportError as exc:
        raise BackendUnavailable(f"aio backend {name!r} cannot be imported: {exc}") from exc


def pick_auto() -> tuple[str, str]:
    """Choose the backend ``--aio auto`` uses: (name, why)."""
    skipped = []
    for name in AUTO_ORDER:
        try:
            check_available(name)
        except BackendUnavailable as exc:
            skipped.append(f"{name}: {exc}")
            continue
        why = "first usable in preference order " + " > ".join(AUTO_ORDER)
        if skipped:
            why += " (skipped " + "; ".join(skipped) + ")"
        return name, why
    raise BackendUnavailable("no aio backend is usable here: " + "; ".join(skipped))


def open_queue(name: str, capacity: int, **options: Any) -> Queue:
    """Create a queue of backend ``name`` (call inside trio).  ``auto`` picks one."""
    if name == "auto":
        name, _ = pick_auto()
    check_available(name)
    cls = _resolve(_BACKENDS[name].target)
    queue: Queue = cls(capacity=capacity, **options)
    return queue
