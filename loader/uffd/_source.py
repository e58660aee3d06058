"""The handler's reads of the source outside the loader: a private read-only
mapping of it for direct copies, and page-cache checks and read-in on that
mapping (``mincore``, ``cachestat(2)``, ``MADV_POPULATE_READ``, ``MADV_WILLNEED``),
so that the fault thread never reads the disk (docs/UFFD.md "Faults")."""

from __future__ import annotations

import ctypes
import errno as errno_mod
import mmap
import os

from .._memfile import MemoryFile
from ..core._service import PageService


def _has_data(loader: PageService, lo: int, hi: int) -> bool:
    for _ in loader.layout.data_in(lo, hi):
        return True
    return False


def _data_bytes(loader: PageService, lo: int, hi: int) -> int:
    return sum(b - a for a, b in loader.layout.data_in(lo, hi))


def _address_of(memory: MemoryFile) -> int:
    c = ctypes.c_char.from_buffer(memory.view)
    try:
        return ctypes.addressof(c)
    finally:
        del c


_libc = ctypes.CDLL(None, use_errno=True)  # ctypes calls release the GIL (a disk read may block)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
# mincore never waits for a disk: called without releasing the GIL, so the fault
# thread does not have to take the GIL back from another thread after it (measured:
# about 8 us of a fault's p50 through the GIL-releasing CDLL)
_mincore = ctypes.PyDLL(None, use_errno=True).mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_syscall = ctypes.PyDLL(None, use_errno=True).syscall  # (cachestat: never waits, the GIL kept)
_syscall.restype = ctypes.c_long
MADV_WILLNEED = 3
MADV_POPULATE_READ = 22  # Linux 5.14+: fault the range's pages in (reading them), map nothing new


class _Cachestat:
    """``cachestat(2)`` (Linux 6.5+) on one open file: is a page of it in the page
    cache?  It looks the page up in the file's cache only, without mincore's lookup
    of the mapping and walk of its page table: about 1 us less a call here (1.4
    against 2.5 us).  No argument conversion per call: the range and the result are
    ctypes arrays made once, passed by pointer."""

    NR = 451  # x86_64, arm64 and the other architectures of the unified syscall table

    def __init__(self, fd: int) -> None:
        self._range = (ctypes.c_uint64 * 2)(0, mmap.PAGESIZE)  # struct cachestat_range {off, len}
        self._stat = (ctypes.c_uint64 * 5)()  # struct cachestat: nr_cache first
        self._args = (ctypes.c_long(self.NR), ctypes.c_long(fd), ctypes.cast(self._range, ctypes.c_void_p),
                      ctypes.cast(self._stat, ctypes.c_void_p), ctypes.c_long(0))

    @classmethod
    def open(cls, fd: int) -> _Cachestat | None:
        """One for ``fd``, or None where the kernel lacks cachestat, refuses it (a
        seccomp filter, a file system without a page cache) or cannot say."""
        if os.uname().machine not in ("x86_64", "aarch64"):
            return None
        c = cls(fd)
        return c if _syscall(*c._args) == 0 else None

    def page(self, offset: int) -> bool:
        """Is the page at ``offset`` in the page cache now?  (False when the call
        fails: the caller then takes the safe path.)"""
        self._range[0] = offset
        return _syscall(*self._args) == 0 and self._stat[0] == 1


class _PageCache:
    """Bring pieces of the source's mapping into the page cache ahead of a direct
    copy: ``UFFDIO_COPY`` reads an uncached source inside the ioctl, and the fill's
    copies hold the lock that every fault needs to read its message, so the fill
    reads the disk before it takes the lock (and asks the kernel to read ahead)."""

    def __init__(self, pages: int = 1) -> None:
        self.populate_works = True  #: False once MADV_POPULATE_READ is refused (kernel before 5.14)
        self._vec = (ctypes.c_ubyte * pages)()
        self._pages = pages

    def cached(self, address: int, length: int) -> bool:
        """Is every page of ``[address, address+length)`` (page-aligned) in the page
        cache now?  (False when it cannot tell: the caller then takes the safe path.)"""
        n = length // mmap.PAGESIZE
        if n > self._pages or _mincore(address, length, self._vec) != 0:
            return False
        if n == 1:
            return bool(self._vec[0] & 1)
        return all(b & 1 for b in bytes(self._vec)[:n])

    def advise(self, address: int, length: int) -> None:
        """Start reading ``[address, address+length)`` into the page cache (MADV_WILLNEED)."""
        _libc.madvise(address, length, MADV_WILLNEED)

    def populate(self, address: int, length: int) -> None:
        """Read ``[address, address+length)`` into the page cache (blocking, GIL released)."""
        if self.populate_works and _libc.madvise(address, length, MADV_POPULATE_READ) != 0:
            if ctypes.get_errno() == errno_mod.EINVAL:
                self.populate_works = False  # the copy then reads the source itself, as before


def _address_of_map(m: mmap.mmap) -> int:
    c = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(c)
    finally:
        del c



class DirectSource:
    """The source's private read-only mapping for direct copies, as
    ``UffdHandler._open_direct`` made it (``map`` None: direct copies are off)."""

    def __init__(self, m: mmap.mmap | None, base: int, size: int, identity: bool, loader: PageService) -> None:
        self.map = m
        self.base = base  #: the mapping's address
        self.size = size
        self.identity = identity  #: a raw image: memory offset = file offset, holes read as zeros
        self.layout = loader.layout

    def address(self, off: int, length: int) -> int | None:
        """Where memory ``[off, off+length)`` is in the source's mapping, if it is
        one piece of data there; None if direct copies are off."""
        if self.map is None:
            return None
        if self.identity:  # a raw image: memory offset = file offset, holes read as zeros
            fo = off
        else:
            layout = self.layout
            i = layout.find(off)
            if i < 0 or off + length > layout.end_at(i):
                return None
            fo = layout.file_at(i) + (off - layout.mem_at(i))
        if fo + length > self.size:
            return None
        return self.base + fo
