"""A raw guest-memory image (Firecracker style) as a page source: memory offset X
is file offset X, and the sparse file's holes are zero pages (docs/FORMAT.md)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..checkpoint import Checkpoint, open_raw_image
from ._file import FileSource

if TYPE_CHECKING:
    from ..core._extents import ExtentSource

__all__ = ["RawImageSource"]


class RawImageSource(FileSource):
    """A raw image, open; its identity is its layout's digest (hashing the content
    would mean reading all of it).  Opened without its holes found (``scan=False``),
    the loader finds them as it goes (:meth:`extents`)."""

    kind = "raw"

    def __init__(self, checkpoint: Checkpoint, fd: int, direct: bool) -> None:
        super().__init__(checkpoint.layout, fd, path=checkpoint.pages_path, direct=direct, owns_fd=True)
        self.checkpoint = checkpoint
        self.holes_known = checkpoint.holes_known

    @classmethod
    def claims(cls, path: str) -> bool:
        return True  # anything no other source claims (registered last)

    @classmethod
    def open(cls, path: str, *, scan: bool = True, direct: bool = False) -> RawImageSource:
        checkpoint = open_raw_image(path, scan=scan)
        return cls(checkpoint, checkpoint.open_pages(direct=direct), direct)

    def extents(self) -> ExtentSource | None:
        return None if self.holes_known else self.checkpoint.extent_scanner(self._fd)

    def data_estimate(self) -> int:
        """The layout's data; before the holes are found, what the file system allocated."""
        if self.holes_known:
            return self.layout.data_bytes
        try:
            return min(self.layout.memory_size, os.fstat(self._fd).st_blocks * 512)
        except OSError:
            return self.layout.memory_size
