"""Checkpoints kept remotely: the host chunk cache (docs/REMOTE.md)."""

from ._cache import (
    DEFAULT_CACHE_SIZE,
    CacheError,
    CacheStats,
    ChunkCache,
    PruneReport,
    default_cache_dir,
    parse_cache_size,
)

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "CacheError",
    "CacheStats",
    "ChunkCache",
    "PruneReport",
    "default_cache_dir",
    "parse_cache_size",
]
