"""Which checkpoint a thing belongs to: a working set, a recording (:class:`CheckpointIdentity`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import xxhash

from ._layout import Layout

__all__ = ["CheckpointIdentity", "file_digest", "layout_digest"]


@dataclass(frozen=True, slots=True)
class CheckpointIdentity:
    """Which checkpoint a working set belongs to: its source's kind, its memory and
    page size, and a digest a source chooses (:meth:`PageSource.identity`).

    ``pages``: xxh3_64 of ``index.msgpack`` (which holds the checksums of every chunk
    of ``pages.img``, so it changes with any data).  ``raw``: xxh3_64 of the data
    extents (the layout): a raw image has no checksums, and hashing its content would
    mean reading all of it.
    """

    kind: str
    memory_size: int
    page_size: int
    digest: int

    def describe(self) -> str:
        return f"{self.kind} checkpoint of {self.memory_size} bytes, identity xxh3 {self.digest:#018x}"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "memory_size": self.memory_size, "page_size": self.page_size,
                "digest": self.digest}


def layout_digest(layout: Layout) -> int:
    """xxh3_64 of a layout's memory offsets and lengths."""
    h = xxhash.xxh3_64()
    # (of the byte offsets as little-endian u64, as ever: a block at a time from the page columns)
    for name in ("mem", "length"):
        for block in layout.byte_blocks(name):
            h.update(block.astype("<u8", copy=False).tobytes())
    return h.intdigest()


def file_digest(path: str) -> int:
    """xxh3_64 of a file's bytes (raises OSError)."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.intdigest()
