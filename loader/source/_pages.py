"""A pages checkpoint (our format: ``pages.img`` + ``index.msgpack``, docs/FORMAT.md)
as a page source: the pages back to back, one xxh3_64 per chunk."""

from __future__ import annotations

from ..checkpoint import Checkpoint, looks_like_pages_checkpoint, open_pages_checkpoint
from ..core._identity import CheckpointIdentity, file_digest
from ._file import FileSource

__all__ = ["PagesSource"]


class PagesSource(FileSource):
    """A pages checkpoint, open; its identity is the digest of its index (which holds
    every chunk's checksum, so it changes with any data)."""

    kind = "pages"

    def __init__(self, checkpoint: Checkpoint, fd: int, direct: bool) -> None:
        super().__init__(checkpoint.layout, fd, chunk_size=checkpoint.chunk_size, checksums=checkpoint.checksums,
                         path=checkpoint.pages_path, direct=direct, owns_fd=True)
        self.checkpoint = checkpoint

    @classmethod
    def claims(cls, path: str) -> bool:
        return looks_like_pages_checkpoint(path)

    @classmethod
    def open(cls, path: str, *, scan: bool = True, direct: bool = False) -> PagesSource:
        checkpoint = open_pages_checkpoint(path)
        return cls(checkpoint, checkpoint.open_pages(direct=direct), direct)

    def identity(self) -> CheckpointIdentity:
        """Reads the index again (raises OSError, naming it, if it cannot)."""
        index = self.checkpoint.index_path
        assert index is not None
        digest = file_digest(index)
        layout = self.layout
        return CheckpointIdentity(self.kind, layout.memory_size, layout.page_size, digest)

    def files(self) -> tuple[str, ...]:
        return self.checkpoint.files()
