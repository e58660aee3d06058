"""Restoring from object storage: S3-compatible stores and ``file://`` (docs/REMOTE.md).

:class:`ObjectStore` is the client (obstore underneath): ranged GETs into the
caller's buffers, puts, timeouts and retries, one :class:`StoreError` type.
Imported at first use only: a local restore never loads the object-store client.
"""

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
    "DEFAULT_REGION",
    "ObjectStore",
    "RetryPolicy",
    "StoreError",
    "StoreStats",
    "StoreURL",
    "parse_store_url",
]
