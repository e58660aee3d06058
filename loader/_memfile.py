"""Where loaded pages go.

The loader writes through a :class:`Destination`: it asks for the buffer a read
should land in and, once the read is complete, tells the destination so.  The
default destination is a :class:`MemoryFile` (a memfd, or a file on /dev/shm or
hugetlbfs) mapped shared, so a read lands directly in the file's pages: one copy,
by the kernel.  A userfaultfd destination (later) can hand out a staging buffer
and install the pages with UFFDIO_COPY in :meth:`Destination.commit`.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Protocol


class Destination(Protocol):
    size: int
    #: True when :meth:`commit` does work; the loader skips the call otherwise.
    needs_commit: bool

    def buffer(self, offset: int, length: int) -> memoryview:
        """The writable buffer that bytes ``[offset, offset+length)`` are read into."""
        ...

    def commit(self, offset: int, length: int) -> None:
        """Bytes ``[offset, offset+length)`` are fully read into their buffer."""
        ...


class MemoryFile:
    """A sparse memory file of ``size`` bytes, mapped shared.

    With ``path=None`` it is a memfd (nothing on any filesystem); otherwise the file
    at ``path`` is created, or truncated, to ``size``.  Unwritten parts are holes and
    read as zero, so zero pages of the image need no I/O at all.
    """

    needs_commit = False

    def __init__(self, size: int, path: str | None = None, *, name: str = "pageload-memory") -> None:
        if size <= 0:
            raise ValueError(f"memory size must be positive, not {size}")
        self.size = size
        self.path = path
        if path is None:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(self.fd, size)
            if path is None:  # a client with the fd must not shrink it under the loader (SIGBUS/EFAULT)
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._view = memoryview(self._map)

    def buffer(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]

    def commit(self, offset: int, length: int) -> None:
        pass

    @property
    def view(self) -> memoryview:
        """The whole mapping (read it only for ranges already loaded)."""
        return self._view

    def close(self) -> None:
        if self._map.closed:
            return
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # a slice is still exported (e.g. by a caller): let GC unmap it
            pass
        os.close(self.fd)

    def __enter__(self) -> MemoryFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
