"""Restoring from object storage: S3-compatible stores and ``file://``, and the host
chunk cache (docs/REMOTE.md).

:class:`ObjectStore` is the client (obstore underneath): ranged GETs into the
caller's buffers, puts, timeouts and retries, one :class:`StoreError` type.
:class:`ChunkCache` keeps fetched checksum chunks on the host, shared by its daemons.
Imported at first use only: a local restore never loads the object-store client.
"""

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
