"""Firecracker's page-fault handler protocol, served by the loader (docs/UFFD.md).

:func:`serve_uffd` listens on a Unix socket the way Firecracker's ``Uffd`` memory
backend expects: the VMM connects and sends one message, a JSON array of regions
``{base_host_virt_addr, size, offset, page_size, page_size_kib}`` with the
userfaultfd in SCM_RIGHTS.  :class:`UffdHandler` then

* answers each page fault as a waiter at the head of the loader's queue, with
  ``UFFDIO_COPY`` from the memory file's mapping (the loader loaded it there), and
  copies the loaded, not yet copied bytes around it too (``fault_around``);
* answers faults on holes and on removed ranges with ``UFFDIO_ZEROPAGE`` (a zero
  source page on hugetlbfs, where there is no zeropage ioctl);
* fills guest memory in the background: every range the loader finishes is queued
  (in load order, i.e. sweep order) and copied in chunks of ``fill_chunk`` bytes,
  yielding to faults between chunks, so the guest stops faulting once the load is
  done;
* handles ``UFFD_EVENT_REMOVE`` / ``UNMAP`` (never copied again, later faults get zero
  pages) and ``REMAP`` (the region moves);
* answers a page that cannot be read with ``UFFDIO_POISON`` (the faulting thread gets
  SIGBUS) on kernels with UFFDIO_POISON (6.6+); see docs/UFFD.md otherwise.

Everything runs in the trio thread; each ioctl is at most ``fill_chunk`` bytes.
"""

from __future__ import annotations

import array
import ctypes
import errno as errno_mod
import json
import logging
import mmap
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import trio

from protocol import codes

from . import _uffd
from ._loader import Loader, LoadError, WaitHandle
from ._memfile import MemoryFile
from ._rangeset import RangeSet
from ._stats import LatencyHistogram

log = logging.getLogger("pageload")

MAX_HANDSHAKE = 64 << 10
MAX_REGIONS = 1024


class HandshakeError(ValueError):
    """The VMM's handshake message is malformed or does not fit the memory."""


@dataclass(frozen=True, slots=True)
class Region:
    base: int  #: guest memory's address in the VMM
    size: int
    offset: int  #: where it starts in the memory image
    page_size: int

    @property
    def end(self) -> int:
        return self.base + self.size


def parse_handshake(data: bytes, memory_size: int) -> list[Region]:
    """Firecracker's region list, checked: page sizes are powers of two from 4 KiB,
    everything aligned to them, inside the image, no overlaps."""
    try:
        items = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HandshakeError(f"handshake is not JSON: {exc}") from None
    if not isinstance(items, list) or not items:
        raise HandshakeError("handshake must be a non-empty JSON array of regions")
    if len(items) > MAX_REGIONS:
        raise HandshakeError(f"handshake has {len(items)} regions, more than {MAX_REGIONS}")
    regions = []
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise HandshakeError(f"region {n} is not an object")
        values: dict[str, int] = {}
        for key in ("base_host_virt_addr", "size", "offset"):
            v = item.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise HandshakeError(f"region {n}: {key} must be a non-negative integer")
            values[key] = v
        page = item.get("page_size", item.get("page_size_kib"))  # the old field holds bytes too
        if not isinstance(page, int) or isinstance(page, bool) or page < 4096 or page & (page - 1):
            raise HandshakeError(f"region {n}: page_size must be a power of two of at least 4096")
        base, size, offset = values["base_host_virt_addr"], values["size"], values["offset"]
        if size == 0 or (base | size | offset) % page:
            raise HandshakeError(f"region {n}: base, size and offset must be non-zero multiples of {page}")
        if offset + size > memory_size:
            raise HandshakeError(f"region {n}: offset {offset:#x} + size {size:#x} is beyond the image "
                                 f"({memory_size:#x} bytes)")
        regions.append(Region(base, size, offset, page))
    regions.sort(key=lambda r: r.base)
    for a, b in zip(regions, regions[1:]):
        if b.base < a.end:
            raise HandshakeError(f"regions at {a.base:#x} and {b.base:#x} overlap")
    by_offset = sorted(regions, key=lambda r: r.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if b.offset < a.offset + a.size:
            raise HandshakeError(f"regions at offsets {a.offset:#x} and {b.offset:#x} overlap in the image")
    return regions


@dataclass(frozen=True, slots=True)
class UffdConfig:
    fault_around: int = 64 << 10  #: after a fault, also copy loaded bytes in this aligned window
    fill_chunk: int = 256 << 10  #: largest background UFFDIO_COPY (a fault waits at most one)
    fill: bool = True  #: False: copy only on faults (the lazy per-fault handler, for comparison)
    #: True: copy all memory before answering any fault (Firecracker's "fault_all"
    #: example handler, for comparison): faults wait for the whole load
    eager: bool = False

    @classmethod
    def for_mode(cls, mode: str) -> UffdConfig:
        """``fill`` (ours), ``eager`` (copy everything first) or ``lazy`` (only the
        faulting page, no fill; run the loader without its sweep for Firecracker's
        "valid" example)."""
        if mode == "fill":
            return cls()
        if mode == "eager":
            return cls(eager=True)
        if mode == "lazy":
            return cls(fill=False, fault_around=4096)
        raise ValueError(f"unknown uffd mode {mode!r} (fill, eager or lazy)")


UFFD_MODES = ("fill", "eager", "lazy")


class UffdHandler:
    """Serves one VMM's userfaultfd from ``loader`` and ``memory`` (see module doc)."""

    def __init__(self, loader: Loader, memory: MemoryFile, uffd_fd: int, regions: list[Region],
                 config: UffdConfig | None = None) -> None:
        self.loader = loader
        self.memory = memory
        self.uffd = _uffd.Uffd(uffd_fd)
        self.regions = list(regions)
        self.config = config or UffdConfig()
        self._src = _address_of(memory)
        self.removed = RangeSet()  #: memory offsets removed/unmapped by the VMM
        self.pending = RangeSet()  #: loaded, not yet copied into guest memory
        self._fill_queue: deque[tuple[int, int]] = deque()  # loaded ranges, in load order
        self._more = trio.Event()
        self._retry: list[tuple[int, int, int]] = []  # (address, page_size, start_ns) hit EAGAIN
        self._zero_huge: mmap.mmap | None = None
        self._zero_src = 0
        self.gone = False  #: the VMM's memory is gone (ESRCH/ENOENT): stop copying
        self.filled = trio.Event()  #: every data byte in the regions is in guest memory
        self.started_ns = time.perf_counter_ns()
        self.filled_ns: int | None = None
        # statistics
        self.histogram = LatencyHistogram()
        self.faults = 0
        self.faults_immediate = 0  #: answered without waiting for I/O
        self.faults_waited = 0
        self.faults_zero = 0  #: holes and removed ranges
        self.faults_failed = 0  #: poisoned (or left to the VMM) after a read error
        self.faults_spurious = 0  #: the page was already there: only a wake
        self.copied_bytes = 0
        self.copies = 0
        self.eexist = 0
        self.eagain = 0
        self.removed_events = 0
        self.unmap_events = 0
        self.remap_events = 0
        self.blocked_ns = 0  #: total time faults waited (each fault counted)
        self.outstanding = 0  #: faults waiting for their read now
        self._none_outstanding = trio.Event()
        self._none_outstanding.set()
        self.draining = False  #: SIGTERM: pending faults are being answered before exit
        self._covered = RangeSet((r.offset, r.offset + r.size) for r in regions)
        self._seed_pending()
        loader.add_loaded_listener(self._on_loaded)

    # ------------------------------------------------------------ set-up
    def _seed_pending(self) -> None:
        loaded = RangeSet()
        for r in self.loader.layout:
            loaded.add(r.mem_offset, r.mem_offset + r.length)
        for s in (self.loader.unloaded, self.loader.inflight, self.loader.failed):
            for lo, hi in s:
                loaded.remove(lo, hi)
        for lo, hi in loaded:
            self._on_loaded(lo, hi)
        self._check_filled()

    def _on_loaded(self, lo: int, hi: int) -> None:
        added = False
        fill = self.config.fill and not self.config.eager
        for clo, chi in self._covered.overlapping(lo, hi):
            a, b = max(lo, clo), min(hi, chi)
            self.pending.add(a, b)
            for rlo, rhi in self.removed.overlapping(a, b):
                self.pending.remove(rlo, rhi)
            added = True
        if added and fill:
            self._fill_queue.append((lo, hi))
            self._more.set()

    # ------------------------------------------------------------ statistics
    def statistics(self) -> dict[str, Any]:
        now = time.perf_counter_ns()
        return {
            "regions": len(self.regions),
            "faults": self.faults,
            "faults_immediate": self.faults_immediate,
            "faults_waited": self.faults_waited,
            "faults_zero": self.faults_zero,
            "faults_failed": self.faults_failed,
            "faults_spurious": self.faults_spurious,
            "faults_outstanding": self.outstanding,
            "fault_blocked_s": self.blocked_ns / 1e9,
            "copied_bytes": self.copied_bytes,
            "copies": self.copies,
            "eexist": self.eexist,
            "eagain": self.eagain,
            "events": {"remove": self.removed_events, "unmap": self.unmap_events, "remap": self.remap_events},
            "removed_bytes": self.removed.total,
            "pending_bytes": self.pending.total,
            "filled": self.filled.is_set(),
            "filled_s": ((self.filled_ns or now) - self.started_ns) / 1e9 if self.filled_ns else None,
            "fault_latency_us": self.histogram.as_dict(),
        }

    def summary_line(self) -> str:
        h = self.histogram
        return (f"uffd: {self.faults} faults ({self.faults_immediate} immediate, {self.faults_waited} waited, "
                f"{self.faults_zero} zero, {self.faults_failed} failed), p50 {h.percentile_us(50):.0f} us "
                f"p99 {h.percentile_us(99):.0f} us max {h.max_ns / 1000:.0f} us; copied "
                f"{self.copied_bytes >> 20} MiB in {self.copies} UFFDIO_COPY"
                + (f"; guest filled in {(self.filled_ns - self.started_ns) / 1e9:.3f} s"
                   if self.filled_ns else "; not filled"))

    # ------------------------------------------------------------ the loops
    async def run(self) -> None:
        """Serve faults and fill until cancelled or the VMM's memory is gone."""
        if self.config.eager:
            await self._copy_all()
        async with trio.open_nursery() as nursery:
            if self.config.fill and not self.config.eager:
                nursery.start_soon(self._fill)
            await self._read_events()
            nursery.cancel_scope.cancel()

    async def _read_events(self) -> None:
        uffd = self.uffd
        while not self.gone:
            await trio.lowlevel.wait_readable(uffd.fd)
            while True:
                messages = uffd.read_messages()
                if not messages:
                    break
                for m in messages:
                    self._on_message(m)
            if self._retry:
                retry, self._retry = self._retry, []
                for address, page, start in retry:
                    self._fault(address, page, start)

    async def _copy_all(self) -> None:
        """Eager mode: wait for the whole load, copy every loaded byte, then serve faults."""
        await self.loader.done.wait()
        for lo, hi in list(self.pending):
            for a in range(lo, hi, self.config.fill_chunk):
                while not self._install(a, min(hi, a + self.config.fill_chunk)) and not self.gone:
                    self._read_ready()  # EAGAIN: events first
                await trio.lowlevel.checkpoint()
        self._check_filled()

    async def drain(self, timeout: float) -> None:
        """Before the daemon exits (SIGTERM): read the faults already queued in the
        userfaultfd and answer them, and give the faults waiting for a read up to
        ``timeout`` seconds (their reads are at the head of the queue).  Those still
        waiting then are answered by the loader's shutdown (``shutting-down``):
        poisoned, so the thread gets SIGBUS instead of hanging on a handler that
        is gone.  Faults arriving until the daemon exits are still answered."""
        if self.gone or self.uffd.fd < 0:
            return
        self.draining = True
        self._read_ready()
        if self.outstanding:
            log.info("uffd: shutting down: waiting up to %g s for %d fault(s)", timeout, self.outstanding)
            with trio.move_on_after(timeout):
                while self.outstanding and not self.gone:
                    await self._none_outstanding.wait()
                    self._read_ready()
        if self.outstanding:
            log.warning("uffd: %d fault(s) still waiting for reads at shutdown: they will be poisoned",
                        self.outstanding)

    def _read_ready(self) -> None:
        """Handle every message queued now (non-blocking)."""
        try:
            messages = self.uffd.read_messages()
        except OSError:
            return
        while messages:
            for m in messages:
                self._on_message(m)
            messages = self.uffd.read_messages()

    def _on_message(self, m: _uffd.UffdMessage) -> None:
        if m.event == _uffd.EVENT_PAGEFAULT:
            self.faults += 1
            self._fault(m.b, 0, time.perf_counter_ns())
        elif m.event == _uffd.EVENT_REMOVE:
            self.removed_events += 1
            self._remove(m.a, m.b)
        elif m.event == _uffd.EVENT_UNMAP:
            self.unmap_events += 1
            self._remove(m.a, m.b)
        elif m.event == _uffd.EVENT_REMAP:
            self.remap_events += 1
            self._remap(m.a, m.b, m.c)
        else:
            log.warning("uffd: ignoring event %#x", m.event)

    def _remove(self, start: int, end: int) -> None:
        """The VMM dropped ``[start, end)`` (balloon, MADV_DONTNEED, munmap): never copy
        there again; a later fault gets a zero page, as a fresh anonymous page would."""
        for r in self.regions:
            a, b = max(start, r.base), min(end, r.end)
            if a < b:
                lo, hi = r.offset + (a - r.base), r.offset + (b - r.base)
                self.removed.add(lo, hi)
                self.pending.remove(lo, hi)

    def _remap(self, old: int, new: int, length: int) -> None:
        """mremap moved ``[old, old+length)`` to ``new``: the image offsets go with it."""
        out: list[Region] = []
        for r in self.regions:
            a, b = max(old, r.base), min(old + length, r.end)
            if a >= b:
                out.append(r)
                continue
            if r.base < a:
                out.append(Region(r.base, a - r.base, r.offset, r.page_size))
            out.append(Region(new + (a - old), b - a, r.offset + (a - r.base), r.page_size))
            if b < r.end:
                out.append(Region(b, r.end - b, r.offset + (b - r.base), r.page_size))
        out.sort(key=lambda r: r.base)
        self.regions = out

    def _region(self, address: int) -> Region | None:
        for r in self.regions:
            if r.base <= address < r.end:
                return r
        return None

    def _fault(self, address: int, _unused: int, start_ns: int) -> None:
        r = self._region(address)
        if r is None:  # not ours (should not happen): wake it rather than leave it hanging
            log.warning("uffd: fault at %#x outside every region", address)
            self._wake(address & ~4095, 4096)
            return
        page = r.page_size
        va = address & ~(page - 1)
        off = r.offset + (va - r.base)
        if self.removed.overlap_bytes(off, off + page) or not _has_data(self.loader, off, off + page):
            self.faults_zero += 1
            self._zero(r, va, start_ns)
            return
        try:
            handle = self.loader.submit_wait(off, page, self._on_waited, (r, va, start_ns))
        except LoadError as exc:
            self._fail(r, va, start_ns, exc)
            return
        if handle is None:
            self.faults_immediate += 1
            self._answer(r, va, start_ns)
        else:
            self.faults_waited += 1
            if self.outstanding == 0:
                self._none_outstanding = trio.Event()
            self.outstanding += 1

    def _on_waited(self, handle: WaitHandle) -> None:
        context = handle.context
        assert isinstance(context, tuple)
        r: Region = context[0]
        va: int = context[1]
        start_ns: int = context[2]
        self.outstanding -= 1
        if self.outstanding == 0:
            self._none_outstanding.set()
        if handle.error is not None:
            self._fail(r, va, start_ns, handle.error)
        else:
            self._answer(r, va, start_ns)

    def _answer(self, r: Region, va: int, start_ns: int) -> None:
        """The faulting page is loaded: copy it (waking the thread), then the window around it."""
        page = r.page_size
        off = r.offset + (va - r.base)
        status = self._copy(r, va, off, page)
        if status == errno_mod.EAGAIN:
            self._retry.append((va, page, start_ns))
            return
        if status == errno_mod.EEXIST:
            self.faults_spurious += 1
            self._wake(va, page)
        self._record(start_ns)
        self.pending.remove(off, off + page)
        window = max(self.config.fault_around, page)
        wlo = max(off & ~(window - 1), r.offset)
        whi = min(wlo + window, r.offset + r.size)
        for plo, phi in list(self.pending.overlapping(wlo, whi)):
            self._install(max(plo, wlo), min(phi, whi))

    def _record(self, start_ns: int) -> None:
        elapsed = time.perf_counter_ns() - start_ns
        self.blocked_ns += elapsed
        self.histogram.record(elapsed)

    def _zero(self, r: Region, va: int, start_ns: int) -> None:
        page = r.page_size
        try:
            if page == mmap.PAGESIZE:
                self.uffd.zeropage(va, page)
            else:
                self.uffd.copy(va, self._zero_source(page), page)
        except _uffd.UffdError as exc:
            if exc.errno == errno_mod.EAGAIN:
                self.eagain += 1
                self._retry.append((va, page, start_ns))
                return
            if exc.errno == errno_mod.EEXIST:
                self._wake(va, page)
            elif not self._gone_error(exc):
                log.warning("uffd: zero page at %#x: %s", va, exc)
        self._record(start_ns)

    def _zero_source(self, page: int) -> int:
        if self._zero_huge is None or len(self._zero_huge) < page:
            # anonymous and never written: every page reads as the shared zero page
            self._zero_huge = mmap.mmap(-1, page, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            self._zero_src = _address_of_map(self._zero_huge)
        return self._zero_src

    def _fail(self, r: Region, va: int, start_ns: int, error: LoadError) -> None:
        """The page cannot be read: poison it so the faulting thread gets SIGBUS."""
        self.faults_failed += 1
        if error.code == codes.SHUTTING_DOWN:
            log.warning("uffd: page at %#x (memory %#x) not loaded at shutdown: poisoned", va,
                        r.offset + (va - r.base))
        else:
            log.error("uffd: page at %#x (memory %#x) failed to load: %s", va, r.offset + (va - r.base),
                      error.message)
        try:
            self.uffd.poison(va, r.page_size)
        except _uffd.UffdError as exc:
            if exc.errno == errno_mod.EAGAIN:
                self._retry.append((va, r.page_size, start_ns))
                return
            if not self._gone_error(exc):
                # no UFFDIO_POISON (kernel before 6.6): nothing can raise SIGBUS in the
                # thread; never hand out wrong bytes -- the VMM's memory is unusable
                log.error("uffd: cannot poison %#x (%s): no UFFDIO_POISON in this kernel?; "
                          "stopping the handler", va, exc.strerror)
                self.gone = True
        self._record(start_ns)

    def _wake(self, va: int, length: int) -> None:
        try:
            self.uffd.wake(va, length)
        except OSError:
            pass

    # ------------------------------------------------------------ copying
    def _copy(self, r: Region, va: int, off: int, length: int) -> int:
        """UFFDIO_COPY ``length`` bytes (whole pages of ``r``) of memory ``off`` to ``va``.
        Returns 0, or EEXIST if some page was already there (the rest is copied), or
        EAGAIN (the mapping is changing: retry after reading the events)."""
        page = r.page_size
        done = 0
        status = 0
        while done < length and not self.gone:
            try:
                n = self.uffd.copy(va + done, self._src + off + done, length - done)
                self.copies += 1
                self.copied_bytes += n
                done += n
            except _uffd.UffdError as exc:
                self.copies += 1
                self.copied_bytes += exc.done
                done += exc.done - exc.done % page
                if exc.errno == errno_mod.EEXIST:
                    self.eexist += 1
                    status = errno_mod.EEXIST
                    done += page
                elif exc.errno == errno_mod.EAGAIN:
                    self.eagain += 1
                    return errno_mod.EAGAIN
                elif self._gone_error(exc):
                    return 0
                else:
                    log.warning("uffd: copy to %#x: %s", va + done, exc)
                    done += page
        return status

    def _gone_error(self, exc: OSError) -> bool:
        if exc.errno in (errno_mod.ESRCH, errno_mod.ENOENT):
            if not self.gone:
                log.info("uffd: the VMM's memory is gone (%s)", exc.strerror)
            self.gone = True
            return True
        return False

    def _install(self, lo: int, hi: int) -> bool:
        """Copy pending bytes ``[lo, hi)`` into the guest (whole pages of each region).
        Returns False if the mapping is changing (EAGAIN): try again later."""
        for r in self.regions:
            a, b = max(lo, r.offset), min(hi, r.offset + r.size)
            if a >= b:
                continue
            page = r.page_size
            if page > self.loader.page_size:  # a huge page goes in whole, once all of it is loaded
                a &= ~(page - 1)
                b = (b + page - 1) & ~(page - 1)
                ld = self.loader
                for hp in range(a, b, page):
                    if (ld.unloaded.overlap_bytes(hp, hp + page) or ld.inflight.overlap_bytes(hp, hp + page)
                            or ld.failed.overlap_bytes(hp, hp + page) or self.removed.overlap_bytes(hp, hp + page)):
                        continue
                    if not self.pending.overlap_bytes(hp, hp + page):
                        continue
                    if self._copy(r, r.base + (hp - r.offset), hp, page) == errno_mod.EAGAIN:
                        return False
                    self.pending.remove(hp, hp + page)
                continue
            if self._copy(r, r.base + (a - r.offset), a, b - a) == errno_mod.EAGAIN:
                return False
            self.pending.remove(a, b)
        return True

    async def _fill(self) -> None:
        chunk = self.config.fill_chunk
        queue = self._fill_queue
        while not self.gone:
            if not queue:
                self._check_filled()
                self._more = trio.Event()
                await self._more.wait()
                continue
            lo, hi = queue[0]
            nxt = self.pending.first_at_or_after(lo)
            if nxt is None or nxt[0] >= hi:
                queue.popleft()
                continue
            a = nxt[0]
            b = min(nxt[1], hi, a + chunk)
            if not self._install(a, b):
                await trio.sleep(0.0005)  # the VMM is changing its mapping; events come first
                continue
            await trio.lowlevel.checkpoint()  # faults first

    def _check_filled(self) -> None:
        if self.filled.is_set() or not self.loader.done.is_set():
            return
        if self.pending:
            return
        self.filled_ns = time.perf_counter_ns()
        self.filled.set()
        log.info("uffd: guest memory filled in %.3f s", (self.filled_ns - self.started_ns) / 1e9)


def _has_data(loader: Loader, lo: int, hi: int) -> bool:
    for _ in loader.layout.data_in(lo, hi):
        return True
    return False


def _address_of(memory: MemoryFile) -> int:
    c = ctypes.c_char.from_buffer(memory.view)
    try:
        return ctypes.addressof(c)
    finally:
        del c


def _address_of_map(m: mmap.mmap) -> int:
    c = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(c)
    finally:
        del c


# ------------------------------------------------------------ the listener
async def receive_handshake(conn: trio.socket.SocketType, memory_size: int) -> tuple[list[Region], int]:
    """Read the VMM's one message: regions + the userfaultfd.  Closes any fds that
    came with a bad message.  Raises :class:`HandshakeError`."""
    fds = array.array("i")
    data = b""
    while True:
        msg, ancdata, _flags, _addr = await conn.recvmsg(MAX_HANDSHAKE, socket.CMSG_SPACE(16 * fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        data += msg
        if not msg or fds:
            break
        if len(data) > MAX_HANDSHAKE:
            break
    try:
        if not fds:
            raise HandshakeError("handshake carried no userfaultfd (SCM_RIGHTS)" if data
                                 else "the VMM closed the connection before the handshake")
        if len(fds) != 1:
            raise HandshakeError(f"handshake carried {len(fds)} file descriptors, expected 1")
        if not _uffd.is_userfaultfd(fds[0]):
            raise HandshakeError("the descriptor sent is not a userfaultfd")
        regions = parse_handshake(data, memory_size)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    flags = _fcntl_getfl(fds[0])
    if not flags & os.O_NONBLOCK:
        os.set_blocking(fds[0], False)
    return regions, fds[0]


def _fcntl_getfl(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


async def serve_uffd(
    path: str,
    loader: Loader,
    memory: MemoryFile,
    config: UffdConfig | None = None,
    *,
    on_handler: Any = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> UffdHandler | None:
    """Listen on ``path`` (mode 0600) for one VMM; serve it until it closes the
    connection (or exits); return its handler.  A bad handshake is logged and
    refused (the connection closed), and the next connection is awaited."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(4)
        task_status.started()
        while True:
            conn, _ = await sock.accept()
            with conn:
                try:
                    with trio.fail_after(10):
                        regions, fd = await receive_handshake(conn, loader.memory_size)
                except (HandshakeError, trio.TooSlowError, OSError) as exc:
                    why = "no handshake within 10 s" if isinstance(exc, trio.TooSlowError) else str(exc)
                    log.error("uffd: refused a connection: %s", why)
                    continue
                handler = None
                try:
                    handler = UffdHandler(loader, memory, fd, regions, config)
                    log.info("uffd: serving %d region(s): %s", len(regions),
                             ", ".join(f"{r.size >> 20} MiB at memory {r.offset:#x} ({r.page_size >> 10} KiB pages)"
                                       for r in regions))
                    if on_handler is not None:
                        on_handler(handler)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_until_closed, conn, nursery.cancel_scope)
                        await handler.run()  # returns when the VMM's memory is gone
                        nursery.cancel_scope.cancel()
                finally:
                    if handler is not None:
                        handler.gone = True  # its descriptor is closed now
                    os.close(fd)
                log.info("uffd: the VMM went away")
                log.info(handler.summary_line())
                return handler
    finally:
        sock.close()
        try:
            os.unlink(path)
        except OSError:
            pass


async def _until_closed(conn: trio.socket.SocketType, scope: trio.CancelScope) -> None:
    """Firecracker keeps the connection open while it runs: EOF means it is gone."""
    while True:
        try:
            data = await conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            scope.cancel()
            return
