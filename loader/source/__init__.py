"""Page sources: where a restore's pages come from (see :mod:`loader.source._base`).

:func:`open_source` asks each registered source class, in order, whether it
claims a path (``claims``) and opens it with the first that does (``open``).  The
built-in ones: a snapshot in a chunk store (``STORE/snapshots/NAME``, local or in
object storage, registered first, with :func:`register_source` as any new source
is), then a pages checkpoint in object storage (``s3://`` and ``file://`` URLs),
a pages checkpoint (a directory, or its ``index.msgpack``), and a raw image
(anything else, last).  A new source is one module and one line:
``register_source(MySource)`` (it goes before the built-ins).  Helpers for a new
source: :func:`open_regular` (opens a regular file read-only, refusing symbolic
links and other kinds), :func:`file_digest` and :func:`layout_digest` (for an
identity).  :mod:`loader.source.testing` is the conformance suite every source passes.
"""

from __future__ import annotations

from typing import Any, Protocol

from .._files import open_regular
from ..core._identity import CheckpointIdentity, file_digest, layout_digest
from ._base import ExplainsFailures, LocalPages, PageSource
from ._file import FileSource
from ._pages import PagesSource
from ._raw import RawImageSource
from ._remote import RemoteConfig, RemoteSource, is_store_url
from ._store import StoreSource

__all__ = [
    "CheckpointIdentity",
    "ExplainsFailures",
    "FileSource",
    "LocalPages",
    "PageSource",
    "PagesSource",
    "RawImageSource",
    "RemoteConfig",
    "RemoteSource",
    "SourceClass",
    "StoreSource",
    "file_digest",
    "is_store_url",
    "layout_digest",
    "open_regular",
    "open_source",
    "register_source",
    "registered_sources",
    "unregister_source",
]


class SourceClass(Protocol):
    """What :func:`register_source` takes: a class (or any object) that tells whether
    it reads a path, and opens it."""

    def claims(self, path: str) -> bool:
        """Whether this source reads ``path`` (cheap; False where it cannot tell)."""
        ...

    def open(self, path: str, *, scan: bool = True, direct: bool = False) -> PageSource:
        """The source at ``path``, open and validated; raises :class:`CheckpointError`
        (one line, naming the file at fault).  ``scan=False``: the holes may be found
        while loading; ``direct``: read with ``O_DIRECT`` (refused where it cannot)."""
        ...


_BUILT_IN: tuple[SourceClass, ...] = (RemoteSource, PagesSource, RawImageSource)
_SOURCES: list[SourceClass] = list(_BUILT_IN)


def register_source(cls: SourceClass) -> SourceClass:
    """Make :func:`open_source` try ``cls`` before the sources registered so far
    (the built-ins last); returns it (usable as a class decorator)."""
    if cls not in _SOURCES:
        _SOURCES.insert(0, cls)
    return cls


def unregister_source(cls: SourceClass) -> None:
    """Take ``cls`` out again (tests)."""
    if cls in _SOURCES and cls not in _BUILT_IN:
        _SOURCES.remove(cls)


def registered_sources() -> tuple[SourceClass, ...]:
    return tuple(_SOURCES)


def open_source(path: str, *, scan: bool = True, direct: bool = False,
                remote: RemoteConfig | None = None) -> PageSource:
    """Open ``path`` with the first registered source that claims it.  ``remote``: how
    a source in object storage reaches its store and the chunk cache; passed to a
    class whose ``takes_remote`` is true (:class:`RemoteSource`), ignored by the others."""
    for cls in _SOURCES:
        if cls.claims(path):
            if remote is not None and getattr(cls, "takes_remote", False):
                taking: Any = cls  # (its open takes one more keyword than SourceClass's)
                opened: PageSource = taking.open(path, scan=scan, direct=direct, remote=remote)
                return opened
            return cls.open(path, scan=scan, direct=direct)
    raise AssertionError("the raw image source claims every path")


register_source(StoreSource)  # a snapshot in a chunk store (STORE/snapshots/NAME): one line, as any source
