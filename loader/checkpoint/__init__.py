"""Checkpoint formats: a raw guest-memory image, or our pages file + msgpack index.

``open_checkpoint`` tells them apart and validates what can be checked without
reading page data; ``verify_checkpoint`` reads it all; ``create_checkpoint`` writes
our format from a raw image.  docs/FORMAT.md describes both formats field by field.
"""

from ._checkpoint import (
    BadChunk,
    Checkpoint,
    PagesIndex,
    VerifyReport,
    describe_checkpoint,
    format_inspection,
    inspect_checkpoint,
    looks_like_pages_checkpoint,
    open_checkpoint,
    open_pages_checkpoint,
    open_raw_image,
    parse_pages_index,
    read_pages_index,
    verify_checkpoint,
)
from ._create import DEFAULT_CHUNK_SIZE, CreateReport, create_checkpoint
from ._index import CheckpointError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BadChunk",
    "Checkpoint",
    "CheckpointError",
    "CreateReport",
    "PagesIndex",
    "VerifyReport",
    "create_checkpoint",
    "describe_checkpoint",
    "format_inspection",
    "inspect_checkpoint",
    "looks_like_pages_checkpoint",
    "open_checkpoint",
    "open_pages_checkpoint",
    "open_raw_image",
    "parse_pages_index",
    "read_pages_index",
    "verify_checkpoint",
]
