"""Restoring from object storage: S3-compatible stores and ``file://``, and the host
chunk cache (docs/REMOTE.md).

:class:`ObjectStore` is the client (obstore underneath): ranged GETs into the
caller's buffers, puts, timeouts and retries, one :class:`StoreError` type.
:class:`ChunkCache` keeps fetched checksum chunks on the host, shared by its daemons.
Imported at first use only: a local restore never loads the object-store client.
The cache's names are loaded at their first use too (the cache needs NumPy, 70 ms to
import): a restore from a store sends its first GET before that, and imports the
cache while the GET is in flight (:meth:`loader.source.RemoteSource.open`).
"""

from typing import TYPE_CHECKING, Any

from ._store import (
    CODES,
    DEFAULT_REGION,
    ObjectStore,
    RetryPolicy,
    StoreError,
    StoreStats,
    StoreURL,
    parse_store_url,
)

if TYPE_CHECKING:
    from ._cache import (
        CONTENT_NAMESPACE,
        DEFAULT_CACHE_SIZE,
        CacheError,
        CacheStats,
        ChunkCache,
        PruneReport,
        default_cache_dir,
        parse_cache_size,
    )

_CACHE_NAMES = frozenset({"CONTENT_NAMESPACE", "DEFAULT_CACHE_SIZE", "CacheError", "CacheStats", "ChunkCache",
                          "PruneReport", "default_cache_dir", "parse_cache_size"})


def __getattr__(name: str) -> Any:
    """The cache's names, from :mod:`._cache`, imported at the first one asked for."""
    if name in _CACHE_NAMES:
        from . import _cache

        return getattr(_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CODES",
    "CONTENT_NAMESPACE",
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_REGION",
    "CacheError",
    "CacheStats",
    "ChunkCache",
    "ObjectStore",
    "PruneReport",
    "RetryPolicy",
    "StoreError",
    "StoreStats",
    "StoreURL",
    "default_cache_dir",
    "parse_cache_size",
    "parse_store_url",
]
