"""The shared read-only loaded map: one bit per page of guest memory, set once the
page is loaded, in a sealed memfd that clients map read-only (protocol ``loadmap``).
The memfd is mode 0400 and sealed with ``F_SEAL_FUTURE_WRITE`` once the daemon's own
writable mapping exists: no client, whatever its uid, can set a bit another reads.

A client that finds every bit of a range set skips the ``wait`` round trip.  The map
is O(image) bits (64 GiB of 4 KiB pages: 2 MiB), against principle 2 (memory
proportional to what is in flight, not to the image): it is made only when a client
first asks for it, it is one bit per 32 Ki bits of guest memory, and a coarser
granule would make a loaded page look unloaded until all its neighbours are, which
is exactly the case (a sweep still running) the map is for.

Ordering: the loader calls :meth:`LoadedMap.mark` from its loaded-listener hook,
after the bytes are in the memory file (the read completed and was reaped, and a
checksummed chunk was verified).  The bit is a plain store made after that in the
daemon; a client that loads the bit and then reads the memory file reads after the
kernel finished the copy.  On x86-64 (TSO: loads are not reordered with loads,
stores not with stores) that is enough for a plain mmap read; the clients here read
the memory file with ``pread``/``mmap`` only after a syscall-free bit test, so on
weakly ordered CPUs (arm64) a reader of an mmap'd memory file should put a barrier
between the two (any syscall, such as the ``pread`` the clients use, is one).  Bits
are only ever set, and the daemon is the only writer, so a stale bit is only ever
0: the client then asks, which is always correct.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Any

from ._memfile import F_SEAL_FUTURE_WRITE, MEMFD_MODE
from .core._service import PageService

__all__ = ["LoadedMap"]


class LoadedMap:
    """The map for ``loader`` (its :class:`~loader.core._service.PageService`): call once, in its trio run."""

    def __init__(self, loader: PageService) -> None:
        self.loader = loader
        self.granule = page = loader.page_size
        self.pages = (loader.memory_size + page - 1) // page
        self.size = max(1, (self.pages + 7) // 8)
        self.fd = os.memfd_create("pageload-loaded-map", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            os.fchmod(self.fd, MEMFD_MODE)
            # A client's mapping can never lose its pages under it.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self._map = mmap.mmap(self.fd, self.size)
            # Only the daemon's mapping, made above, can write it: no write(2) and no new
            # writable shared mapping, through any descriptor (a client's bits are never
            # set by another client, even one of the daemon's uid or root).
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
            self.readonly_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self.fd)
            raise
        # Everything not unloaded, in flight, failed or past the loader's frontier is
        # loaded (holes included).
        loader.subscribe_loaded(self.mark, holes=True)

    def _page_loaded(self, p: int) -> bool:
        lo = p * self.granule
        hi = min(lo + self.granule, self.loader.memory_size)
        return bool(self.loader.is_loaded(lo, hi))

    def mark(self, lo: int, hi: int) -> None:
        """``[lo, hi)`` is loaded: set the bits of the pages now wholly loaded."""
        g = self.granule
        first, last = lo // g, min((hi + g - 1) // g, self.pages)  # pages touched
        if first >= last:
            return
        m = self._map
        # Edge pages only partly in [lo, hi): set when the rest is loaded too.
        inner_lo = first if lo % g == 0 else first + 1
        inner_hi = last if hi % g == 0 or hi >= self.loader.memory_size else last - 1
        edges = [first] if inner_lo != first else []
        if inner_hi != last and last - 1 not in edges:
            edges.append(last - 1)
        for p in edges:
            if self._page_loaded(p):
                m[p >> 3] |= 1 << (p & 7)
        p = inner_lo
        while p < inner_hi and p & 7:
            m[p >> 3] |= 1 << (p & 7)
            p += 1
        full_end = inner_hi & ~7
        if p < full_end:
            m[p >> 3:full_end >> 3] = b"\xff" * ((full_end - p) >> 3)
            p = full_end
        while p < inner_hi:
            m[p >> 3] |= 1 << (p & 7)
            p += 1

    def close_fds(self) -> None:
        """Close the descriptors (the mapping stays: the loader's hook still sets bits)."""
        os.close(self.readonly_fd)
        os.close(self.fd)


def map_readonly(fd: int, size: int) -> mmap.mmap:
    """A client's read-only shared mapping of the map ``fd`` (``size`` bytes)."""
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)


def all_loaded(view: Any, granule: int, memory_size: int, offset: int, length: int) -> bool:
    """Whether every bit of ``[offset, offset+length)`` is set in the map ``view``
    (a client's read-only mapping); False for a range outside the memory."""
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 1 \
            or offset + length > memory_size:
        return False
    first = offset // granule
    last = (offset + length - 1) // granule
    if first == last:
        return bool(view[first >> 3] >> (first & 7) & 1)
    for p in range(first, last + 1):
        if not view[p >> 3] >> (p & 7) & 1:
            return False
    return True
