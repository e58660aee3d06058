"""Firecracker's page-fault handler protocol, served by the loader (docs/UFFD.md).

:func:`serve_uffd` listens on a Unix socket the way Firecracker's ``Uffd`` memory
backend expects: the VMM connects and sends one message, a JSON array of regions
``{base_host_virt_addr, size, offset, page_size, page_size_kib}`` with the
userfaultfd in SCM_RIGHTS.  :class:`UffdHandler` then runs a *fault thread*, an OS
thread that owns the userfaultfd: it blocks in ``poll`` on it (the GIL released)
and answers each fault itself, in this order:

* a hole or a removed range: ``UFFDIO_ZEROPAGE`` (a zero source page on hugetlbfs,
  where there is no zeropage ioctl);
* a page already loaded into the memory file: ``UFFDIO_COPY`` from the memory file's
  mapping, plus the loaded, not yet copied bytes around it (``fault_around``);
* a page not loaded yet, when the source has no checksums to verify: ``UFFDIO_COPY``
  straight from a read-only mapping of the source (the kernel copies from the page
  cache), then a prefetch hint so the loader loads that window soon (``direct``);
* otherwise (a checksummed page not loaded yet, a source page that cannot be read,
  test-injected read failures): a wait at the head of the loader's queue, made in
  the trio thread; its answer comes back to the fault thread, which copies the page
  or poisons it (``UFFDIO_POISON``, SIGBUS in the faulting thread) after a read
  error.

A *fill thread* fills guest memory in the background: straight from the source in
memory order (a raw image, direct copies on), or else every range the loader finishes
(in load order, i.e. sweep order), in chunks of ``fill_chunk`` bytes, so the guest
stops faulting once the load is done; it waits while faults keep coming
(docs/UFFD.md "Background fill").
``UFFD_EVENT_REMOVE`` / ``UNMAP`` are read by the fault thread (never copied again,
later faults get zero pages), as is ``REMAP`` (the region moves); ``FORK`` (a VMM that
asked for it forked) puts the child's userfaultfd into the daemon, which closes it at
once (the child's copy is not served, and nothing is left open); reading events and
every fill copy hold one lock, so no fill copy can follow a removal once it is read.
"""

from __future__ import annotations

import array
import ctypes
import errno as errno_mod
import json
import logging
import math
import mmap
import os
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import trio

from protocol import codes

from . import _uffd
from ._memfile import MemoryFile
from ._server import _clear_stale_socket, _remove_socket_file
from ._startup import StartupError, describe_os_error
from .core._config import LoadError, WaitHandle
from .core._loader import Loader
from .core._rangeset import RangeSet, gaps
from .core._stats import LatencyHistogram

log = logging.getLogger("pageload")

_ADDRESS = struct.Struct("=Q")  # uffd_msg.arg.pagefault.address, at byte 16
_MSGS_PER_READ = 64
_PAGE_MASK = ~(mmap.PAGESIZE - 1)
_READ_AHEAD = 8  #: fill chunks the direct fill asks the kernel to read ahead of its copy
_DISK_THREADS = 4  #: at most this many threads read uncached source pages for faults

#: Regions a handshake may name.
MAX_REGIONS = 1024
#: Bytes a handshake may take: room for ``MAX_REGIONS`` regions in Firecracker's format
#: with every number at its widest (about 170 bytes each), indented
MAX_HANDSHAKE = MAX_REGIONS * 256
#: A connection that has not sent its whole handshake by then is refused.
HANDSHAKE_TIMEOUT_S = 5.0
#: Connections whose handshake is being read at once; one more refuses the oldest of them
#: (a VMM sends its handshake as it connects: it is never the oldest for long)
MAX_PENDING_HANDSHAKES = 8
_ADDRESS_SPACE = 1 << 64


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


def _decode(data: bytes, final: bool = True) -> Any:
    """The handshake's JSON value; None when ``data`` is only the start of one (and
    not ``final``).  Nesting too deep for the parser is refused, not raised."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not final and exc.reason == "unexpected end of data":
            return None  # cut inside a character: more is coming
        raise HandshakeError(f"handshake is not JSON: {exc}") from None
    try:
        return json.loads(text)
    except RecursionError:  # the parser's own bound (about 1000 levels): one line, never a crash
        raise HandshakeError("handshake is not JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        if not final and (exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")):
            return None  # it ended early (cut between values, in a number or in a string): more is coming
        raise HandshakeError(f"handshake is not JSON: {exc}") from None
    except ValueError as exc:  # an integer of too many digits
        raise HandshakeError(f"handshake is not JSON: {exc}") from None


def parse_handshake(data: bytes, memory_size: int) -> list[Region]:
    """Firecracker's region list, checked: page sizes are powers of two from 4 KiB,
    everything aligned to them, inside the image and the 64-bit address space, no
    overlaps, at most :data:`MAX_REGIONS` regions in :data:`MAX_HANDSHAKE` bytes."""
    if len(data) > MAX_HANDSHAKE:
        raise HandshakeError(f"handshake is {len(data)} bytes, more than {MAX_HANDSHAKE} "
                             f"(room for {MAX_REGIONS} regions)")
    return check_regions(_decode(data), memory_size)


def check_regions(items: Any, memory_size: int) -> list[Region]:
    """:func:`parse_handshake` after the JSON: the regions of a decoded handshake."""
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
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < _ADDRESS_SPACE:
                raise HandshakeError(f"region {n}: {key} must be an integer from 0 to 2^64-1")
            values[key] = v
        page = item.get("page_size", item.get("page_size_kib"))  # the old field holds bytes too
        if (not isinstance(page, int) or isinstance(page, bool) or page < 4096 or page & (page - 1)
                or page >= _ADDRESS_SPACE):
            raise HandshakeError(f"region {n}: page_size must be a power of two of at least 4096")
        base, size, offset = values["base_host_virt_addr"], values["size"], values["offset"]
        if size == 0 or (base | size | offset) % page:
            raise HandshakeError(f"region {n}: base, size and offset must be non-zero multiples of {page}")
        if base + size > _ADDRESS_SPACE:
            raise HandshakeError(f"region {n}: base {base:#x} + size {size:#x} is past the end of the "
                                 f"64-bit address space")
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
    #: the direct fill's unit of work: read in (outside the copy lock), its removed and
    #: already installed pages looked up once, then copied ``fill_chunk`` at a time
    fill_span: int = 1 << 20
    fill: bool = True  #: False: copy only on faults (the lazy per-fault handler, for comparison)
    #: True: copy all memory before answering any fault (Firecracker's "fault_all"
    #: example handler, for comparison): faults wait for the whole load
    eager: bool = False
    #: answer a fault on a page not loaded yet by copying straight from the source
    #: file's page cache, when the source has no checksums to verify and its reads are
    #: not test-injected failures (docs/UFFD.md "Faults")
    direct: bool = True
    #: after a direct copy, ask the loader to load this aligned window around the page
    #: soon (0: no hint); not while the fill copies from the source (``direct_fill``)
    hint_around: int = 256 << 10
    #: the fill thread's nice value (Linux: per thread; 0: as the daemon)
    fill_nice: int = 0
    #: hold the loader's sweep while the fill copies from the source (direct fill)
    hold_sweep: bool = True
    #: the interpreter's switch interval while a VMM is served (None: leave it): how
    #: long the fault thread may wait for the GIL after the kernel wakes it
    switch_interval_s: float | None = 0.0005
    #: the fill copies only once no fault has come for this long: while the guest
    #: is faulting its vCPUs and the fault thread get the CPU first (docs/UFFD.md,
    #: "Background fill"; 0: never wait) ...
    fill_quiet_s: float = 0.002
    #: ... but waits at most this long between two copies, so it never stops
    fill_max_wait_s: float = 0.05
    #: how often faults answered by the fault thread are added to the loader's wait
    #: counts and the working-set recorder (a prefetch hint goes at once)
    merge_interval_s: float = 0.005
    #: after a fault, the fault thread keeps reading the userfaultfd without sleeping
    #: for this long before it blocks in poll again: the next fault of a burst is read
    #: at once instead of after the kernel has woken the thread (docs/UFFD.md
    #: "Threads"; 0: never).  As long as ``fill_quiet_s``: the fill waits then anyway
    spin_s: float = 0.002

    @classmethod
    def for_mode(cls, mode: str) -> UffdConfig:
        """``fill`` (ours), ``eager`` (copy everything first) or ``lazy`` (only the
        faulting page, no fill, no hints; run the loader without its sweep for
        Firecracker's "valid" example)."""
        if mode == "fill":
            return cls()
        if mode == "eager":
            # its faults wait for the fill: never yield to them; the example handlers
            # sleep in poll between faults
            return cls(eager=True, fill_quiet_s=0.0, spin_s=0.0)
        if mode == "lazy":
            return cls(fill=False, fault_around=4096, hint_around=0, spin_s=0.0)
        raise ValueError(f"unknown uffd mode {mode!r} (fill, eager or lazy)")


UFFD_MODES = ("fill", "eager", "lazy")
MAX_UFFD_SPIN_US = 10_000  #: the most ``--uffd-spin-us`` may be: a CPU is taken that long after each fault


@dataclass(slots=True)
class _Counters:
    """The fault thread's counts; read (not reset) by :meth:`UffdHandler.statistics`."""

    faults: int = 0
    loaded: int = 0  #: answered from the memory file, already loaded
    direct: int = 0  #: copied straight from the source
    zero: int = 0  #: holes and removed ranges
    failed: int = 0  #: poisoned (or left to the VMM) after a read error
    spurious: int = 0  #: the page was already there: only a wake
    copied_bytes: int = 0
    copies: int = 0
    eexist: int = 0
    eagain: int = 0
    efault: int = 0  #: direct copies whose source page could not be read
    uncached: int = 0  #: faults whose source page a disk thread read into the page cache first
    disk_timeouts: int = 0  #: of those, answered as failed reads at the read deadline
    remove: int = 0
    unmap: int = 0
    remap: int = 0
    fork: int = 0  #: UFFD_EVENT_FORK: the child's userfaultfd closed at once
    blocked_ns: int = 0  #: total time faults waited (each fault counted)
    busy_ns: int = 0  #: the fill thread's time reading ahead and copying (not waiting)
    relooked: int = 0  #: direct fill spans put back after a removal or remap came while they were copied
    around_bytes: int = 0  #: copied around direct faults (``fault_around``), so their neighbours never fault
    spin_reads: int = 0  #: reads of the userfaultfd that found messages while it spun (no wake-up needed)


class UffdHandler:
    """Serves one VMM's userfaultfd from ``loader`` and ``memory`` (see module doc).

    Threads: the *fault thread* (:meth:`_main`) owns the userfaultfd and makes every
    ioctl on it; the trio thread runs the loader, its loaded-listener
    (:meth:`_on_loaded`) and the waits of faults that need the loader
    (:meth:`_submit_wait`, :meth:`_on_waited`).  They share ``pending``, the fill
    queue, the answers to waits and the counts for the loader, under ``_lock``;
    the trio thread wakes the fault thread with an eventfd, and the fault thread
    calls into trio with the run's token.
    """

    def __init__(self, loader: Loader, memory: MemoryFile, uffd_fd: int, regions: list[Region],
                 config: UffdConfig | None = None) -> None:
        self.loader = loader
        self.memory = memory
        self.uffd = _uffd.Uffd(uffd_fd)  #: the fault thread's (each Uffd's argument buffers are its own)
        self._fill_uffd = _uffd.Uffd(uffd_fd)  #: the fill thread's: its copies run while the fault thread's do
        self._msg_buf = bytearray(_uffd.MSG_SIZE * _MSGS_PER_READ)  # the fault thread's reads
        self._msg_bufs = [self._msg_buf]
        self.regions = list(regions)
        self.config = config or UffdConfig()
        self._src = _address_of(memory)
        self._lock = threading.Lock()
        # shared, under _lock
        self.pending = RangeSet()  #: loaded, not yet copied into guest memory
        self._fill_queue: deque[list[int]] = deque()  # [lo, hi] loaded ranges, in load order
        self._answers: deque[tuple[Region, int, int, LoadError | None]] = deque()
        self._for_loader = 0  # faults answered without the loader, to add to its wait counts
        self._touched: list[tuple[int, int]] = []  # their pages, for a working-set recorder
        self._hints: list[tuple[int, int]] = []  # windows to prefetch
        self._merge_scheduled = False  # a merge at once (for a hint) is scheduled
        self._merge_later = False  # the merge task was kicked: it merges after merge_interval_s
        self._merge_kick = trio.Event()  # the trio thread's
        # the fault thread's own
        self.removed = RangeSet()  #: memory offsets removed/unmapped by the VMM
        #: what faults put into guest memory (direct fill: skipped, not copied again)
        self.installed = RangeSet()
        self._retry: list[tuple[int, int]] = []  # (address, start_ns) that hit EAGAIN
        # faults whose source page is not in the page cache: a disk thread reads it in
        # (the fault thread never waits for the disk), then the fault comes back
        self._disk_out: dict[int, tuple[int, int, int]] = {}  # va -> (address, start_ns, deadline_ns)
        self._disk_queue: deque[tuple[int, int, int]] = deque()  # (va, src, length), under _disk_cv
        self._disk_done: list[int] = []  # va read in (or failed: the copy says), under _disk_cv
        self._disk_cv = threading.Condition(threading.Lock())
        self._disk_threads: list[threading.Thread] = []
        self._disk_idle = 0  # disk threads waiting for work, under _disk_cv
        self._disk_ready: list[tuple[int, int, int]] = []  # the fault thread's
        self._disk_late: list[tuple[int, int]] = []  # the fault thread's
        timeout = loader.config.read_timeout
        self._disk_deadline_ns = None if timeout is None else int(timeout * 1e9)
        self._deferred: list[tuple[int, int]] = []  # eager mode: faults held until memory is filled
        self._zero_huge: mmap.mmap | None = None
        self._zero_src = 0
        self.counts = _Counters()  #: the fault thread's
        self._ignored: set[int] = set()  # unknown events logged once (the fault thread's)
        self.fill_counts = _Counters()  #: the fill thread's (copies only)
        self._local = threading.local()  # per thread: counts, copied
        #: held by the fill thread around each copy and by the fault thread around
        #: reading the userfaultfd and recording removals: the kernel zaps a removed
        #: range as soon as its event is read, so no fill copy may run between the
        #: read and the recording (docs/UFFD.md "Events")
        self._copy_lock = threading.Lock()
        self._want_read = False  # the fault thread waits for _copy_lock: the fill lets it in
        self._removed_gen = 0  # counts removals and remaps (changed under _copy_lock, but remaps)
        self._last_fault_ns = -(1 << 62)  # when the fault thread last read messages (perf_counter_ns; never: long ago)
        self._fill_kick = threading.Event()
        self._fill_thread: threading.Thread | None = None
        self.histogram = LatencyHistogram()  # recorded under _lock
        # the trio thread's own
        self.faults_waited = 0  #: faults that waited for the loader
        self.outstanding = 0  #: faults waiting for their read now
        self._none_outstanding = trio.Event()
        self._none_outstanding.set()
        self._synced: trio.Event | None = None
        self.draining = False  #: SIGTERM: pending faults are being answered before exit
        # flags (plain stores, read by the other thread)
        self.gone = False  #: the VMM's memory is gone (ESRCH/ENOENT) or the handler stopped
        self._stop = False
        self._want_sync = False
        self._load_done = loader.done.is_set()
        self._filled = False
        self.filled = trio.Event()  #: every data byte in the regions is in guest memory
        self._finished = trio.Event()
        self.started_ns = time.perf_counter_ns()
        self.filled_ns: int | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._woken = False  # _wake_fd was written and not read yet (the spin stops for it)
        self._direct_map: mmap.mmap | None = None
        self._direct_base = 0
        self._direct_size = 0
        self._direct_identity = False
        self.direct_off_reason = self._open_direct()
        self._covered = RangeSet((r.offset, r.offset + r.size) for r in regions)
        #: the fill copies from the source (one copy, from the page cache) instead of
        #: from the memory file after the loader: set when direct copies are on
        self.direct_fill = (self._direct_map is not None and self.config.fill and not self.config.eager
                            and (self._direct_identity or all(r.page_size == loader.page_size for r in regions)))
        self._skipped = 0  #: pages the direct fill could not read (left to faults)
        #: the replayed working set's spans in the direct fill's queue (copied first,
        #: without yielding to faults: they are the pages the guest is about to touch)
        self._working_set = RangeSet()
        self._fast = self._fast_region()  # the fault thread's short path (None: none)
        self._fast_vec = (ctypes.c_ubyte * 1)()  # its mincore vector
        #: its page-cache check where the kernel has cachestat (else mincore)
        self._fast_cachestat = _Cachestat.open(loader.pages_fd) if self._fast is not None else None
        if self.direct_fill:
            self._seed_direct_fill()
        self._seed_pending()
        loader.add_loaded_listener(self._on_loaded)

    # ------------------------------------------------------------ set-up
    def _open_direct(self) -> str | None:
        """Map the source read-only for direct copies; the reason when they are off."""
        if not self.config.direct:
            return "off (configured)"
        if self.config.eager:
            return "off (eager mode copies only loaded memory)"
        if self.loader.statistics().verify:
            return "off (checksums are verified while loading)"
        if _injects_read_faults(self.loader.queue):
            return "off (reads go through a fault-injecting queue)"
        if self.loader.pages_fd < 0:
            return "off (the source is not one local file)"
        fd = self.loader.pages_fd
        size = os.fstat(fd).st_size
        if size == 0:
            return "off (empty source)"
        try:
            # private and writable only so that ctypes can take its address; never written
            m = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            return f"off (cannot map the source: {exc})"
        self._direct_map = m
        self._direct_base = _address_of_map(m)
        self._direct_size = size
        layout = self.loader.layout
        self._direct_identity = layout.identity_mapped or layout.file == layout.mem
        return None

    def _seed_direct_fill(self) -> None:
        """The direct fill's queue: the data of every region (whole huge pages of a raw
        image, whose holes read as zeros), in the loader's sweep order: the working
        set's spans first, in first-touch order, when the daemon replays one
        (``--working-set``), then the rest in memory order."""
        queue = self._fill_queue
        layout = self.loader.layout
        regions = sorted(self.regions, key=lambda r: r.offset)
        queued = self._working_set  # what the working set's spans put in the queue

        def data(lo: int, hi: int) -> Iterator[tuple[int, int]]:
            for r in regions:
                for a, b in layout.data_in(max(lo, r.offset), min(hi, r.offset + r.size)):
                    if r.page_size > layout.page_size:
                        a &= ~(r.page_size - 1)
                        b = (b + r.page_size - 1) & ~(r.page_size - 1)
                    yield a, b

        def put(a: int, b: int) -> None:
            if queue and self._direct_identity and queue[-1][0] <= a <= queue[-1][1]:
                queue[-1][1] = max(queue[-1][1], b)
            else:
                queue.append([a, b])

        order = self.loader.order
        for lo, hi in zip(getattr(order, "span_lo", ()), getattr(order, "span_hi", ()), strict=True):
            for a, b in data(lo, hi):
                for ga, gb in gaps(queued.overlapping(a, b), a, b):  # (spans may share huge pages)
                    put(ga, gb)
                    queued.add(ga, gb)
        for a, b in data(0, self.loader.memory_size):
            for ga, gb in gaps(queued.overlapping(a, b), a, b):
                put(ga, gb)

    def _seed_pending(self) -> None:
        loader = self.loader
        loaded = RangeSet(loader.layout.data_in(0, loader.memory_size))
        for lo, hi in loader.not_loaded(0, loader.memory_size):
            loaded.remove(lo, hi)
        for lo, hi in loaded:
            self._on_loaded(lo, hi)

    def _on_loaded(self, lo: int, hi: int) -> None:
        """The loader's listener (trio thread): ``[lo, hi)`` is in the memory file."""
        added = False
        with self._lock:
            for clo, chi in self._covered.overlapping(lo, hi):
                self.pending.add(max(lo, clo), min(hi, chi))
                added = True
            if added and (self.config.fill or self.config.eager) and not self.direct_fill:
                self._fill_queue.append([lo, hi])
        if added and self._thread is not None:
            self._wake()

    # ------------------------------------------------------------ statistics
    @property
    def faults(self) -> int:
        return self.counts.faults

    @property
    def faults_zero(self) -> int:
        return self.counts.zero

    @property
    def faults_immediate(self) -> int:
        return self.counts.loaded

    @property
    def faults_direct(self) -> int:
        return self.counts.direct

    @property
    def faults_failed(self) -> int:
        return self.counts.failed

    def statistics(self) -> dict[str, Any]:
        """Trio thread (the faults answered since the last merge are merged first)."""
        self._merge()
        c, f = self.counts, self.fill_counts
        with self._lock:
            histogram = self.histogram.as_dict()
            pending = self.pending.total
        return {
            "regions": len(self.regions),
            "faults": c.faults,
            "faults_immediate": c.loaded,
            "faults_direct": c.direct,
            "faults_waited": self.faults_waited,
            "faults_zero": c.zero,
            "faults_failed": c.failed,
            "faults_spurious": c.spurious,
            "faults_uncached": c.uncached,
            "fault_around_bytes": c.around_bytes,
            "faults_disk_timeouts": c.disk_timeouts,
            "faults_outstanding": self.outstanding,
            "spin_reads": c.spin_reads,
            "fault_blocked_s": c.blocked_ns / 1e9,
            "direct": self.direct_off_reason or "on",
            "copied_bytes": c.copied_bytes + f.copied_bytes,
            "fill_copied_bytes": f.copied_bytes,
            #: the fill thread's copies over its busy time (reading ahead, the lock, the
            #: copies; not its waits while the guest faults)
            "fill_busy_s": f.busy_ns / 1e9,
            "fill_relooked": f.relooked,
            "copies": c.copies + f.copies,
            "eexist": c.eexist + f.eexist,
            "eagain": c.eagain + f.eagain,
            "efault": c.efault + f.efault,
            "events": {"remove": c.remove, "unmap": c.unmap, "remap": c.remap, "fork": c.fork},
            "removed_bytes": self.removed.total,
            "pending_bytes": pending,
            "filled": self.filled.is_set(),
            "filled_s": (self.filled_ns - self.started_ns) / 1e9 if self.filled_ns else None,
            "fault_latency_us": histogram,
        }

    def summary_line(self) -> str:
        c = self.counts
        with self._lock:
            h = self.histogram
            latency = h.describe(50, 99)  # the histogram's bucket bounds, as bounds
        return (f"uffd: {c.faults} faults ({c.loaded} immediate, {c.direct} direct, {self.faults_waited} waited, "
                f"{c.zero} zero, {c.failed} failed), {latency}; "
                f"copied {(c.copied_bytes + self.fill_counts.copied_bytes) >> 20} MiB in "
                f"{c.copies + self.fill_counts.copies} UFFDIO_COPY"
                + (f"; guest filled in {(self.filled_ns - self.started_ns) / 1e9:.3f} s"
                   if self.filled_ns else "; not filled"))

    # ------------------------------------------------------------ the trio side
    async def run(self) -> None:
        """Serve faults and fill (in the fault thread) until cancelled or the VMM's
        memory is gone; the thread is stopped and joined before this returns."""
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._main, name="pageload-uffd", daemon=True)
        interval = sys.getswitchinterval()
        if self.config.switch_interval_s is not None:
            sys.setswitchinterval(self.config.switch_interval_s)
        self._fill_thread = threading.Thread(target=self._fill_main, name="pageload-uffd-fill", daemon=True)
        self._thread.start()
        if self.direct_fill and self.config.hold_sweep and not self.loader.done.is_set():
            self.loader.hold_sweep(True)
        self._fill_thread.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_load)
                nursery.start_soon(self._merge_loop)
                await self._finished.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._stop = True
            self._wake()
            with self._disk_cv:
                self._disk_cv.notify_all()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._fill_thread.join, 2.0)
                await trio.to_thread.run_sync(self._thread.join, 2.0)
            self._merge()  # after the fault thread's last fault (it may answer one as it stops)
            self.gone = True
            sys.setswitchinterval(interval)
            if self.loader.sweep_held:
                self.loader.hold_sweep(False)
            wake_fd, self._wake_fd = self._wake_fd, -1  # the loader's listener stays: it must not write there
            os.close(wake_fd)
            if self._direct_map is not None and not self._thread.is_alive() and not self._fill_thread.is_alive():
                self._direct_map.close()

    async def _merge_loop(self) -> None:
        """Merge what the fault thread answered ``merge_interval_s`` after the first
        fault not merged yet: waking the trio thread for every fault would take the
        GIL from the fault thread just when the next fault comes (and an idle guest
        wakes nothing)."""
        while True:
            await self._merge_kick.wait()
            self._merge_kick = trio.Event()
            await trio.sleep(self.config.merge_interval_s)
            self._merge()

    def _kick_merge(self) -> None:
        self._merge_kick.set()

    async def _watch_load(self) -> None:
        await self.loader.done.wait()
        self._load_done = True
        self._wake()

    def _wake(self) -> None:
        self._fill_kick.set()
        self._woken = True  # (ends the fault thread's spin; it clears this before reading the eventfd)
        if self._wake_fd < 0:
            return
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass

    def _call_trio(self, fn: Any, *args: Any) -> None:
        """From the fault thread: run ``fn(*args)`` in the trio thread soon."""
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def _submit_wait(self, r: Region, va: int, start_ns: int) -> None:
        """Trio thread: a fault the fault thread could not answer waits for the loader
        like a socket wait (head of the queue); its answer goes back to the thread."""
        off = r.offset + (va - r.base)
        try:
            handle = self.loader.submit_wait(off, r.page_size, self._on_waited, (r, va, start_ns))
        except LoadError as exc:
            self._post_answer(r, va, start_ns, exc)
            return
        if handle is None:
            self._post_answer(r, va, start_ns, None)
            return
        self.faults_waited += 1
        if self.outstanding == 0:
            self._none_outstanding = trio.Event()
        self.outstanding += 1

    def _on_waited(self, handle: WaitHandle) -> None:
        context = handle.context
        assert isinstance(context, tuple)
        self.outstanding -= 1
        if self.outstanding == 0:
            self._none_outstanding.set()
        self._post_answer(context[0], context[1], context[2], handle.error)

    def _post_answer(self, r: Region, va: int, start_ns: int, error: LoadError | None) -> None:
        with self._lock:
            self._answers.append((r, va, start_ns, error))
        self._wake()

    def _merge(self) -> None:
        """Trio thread: add the fault thread's faults to the loader's wait counts (each
        answered at once, so "immediate"), its touched pages to the working-set
        recorder, and its hints to the loader's prefetches."""
        with self._lock:
            n, self._for_loader = self._for_loader, 0
            touched, self._touched = self._touched, []
            hints, self._hints = self._hints, []
            self._merge_scheduled = False
            self._merge_later = False
        counters = self.loader.counters
        counters.waits_total += n
        counters.waits_immediate += n
        recorder = self.loader.recorder
        if recorder is not None:
            for lo, hi in touched:
                recorder.touched(lo, hi)
        for lo, hi in hints:
            self.loader.prefetch(lo, hi - lo)

    async def drain(self, timeout: float) -> None:
        """Before the daemon exits (SIGTERM): let the fault thread read the faults
        already queued in the userfaultfd and answer them, and give the faults
        waiting for a read up to ``timeout`` seconds (their reads are at the head of
        the queue).  Those still waiting then are answered by the loader's shutdown
        (``shutting-down``): poisoned, so the thread gets SIGBUS instead of hanging on
        a handler that is gone.  Faults arriving until the daemon exits are still
        answered."""
        if self.gone or self._thread is None:
            return
        self.draining = True
        with trio.move_on_after(timeout):
            # one pass of the fault thread: what it read was handed to us before this
            self._synced = synced = trio.Event()
            self._want_sync = True
            self._wake()
            await synced.wait()
            if self.outstanding:
                log.info("uffd: shutting down: waiting up to %g s for %d fault(s)", timeout, self.outstanding)
                while self.outstanding and not self.gone:
                    await self._none_outstanding.wait()
            while self._disk_out and not self.gone:  # faults whose page a disk thread reads
                await trio.sleep(0.005)
        if self.outstanding:
            log.warning("uffd: %d fault(s) still waiting for reads at shutdown: they will be poisoned",
                        self.outstanding)

    def _set_synced(self) -> None:
        if self._synced is not None:
            self._synced.set()

    # ------------------------------------------------------------ the fault thread
    def _be_fault_thread(self) -> None:
        """This thread's copies count as the fault thread's and use its ioctl buffers
        (the fault thread's first step; a test that answers faults in its own thread
        calls it too)."""
        self._local.counts = self.counts
        self._local.uffd = self.uffd
        self._local.copied = 0
        self._local.cache = _PageCache(max(self.config.fault_around, *(r.page_size for r in self.regions))
                                       // mmap.PAGESIZE)

    def _main(self) -> None:
        self._be_fault_thread()
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        spin_ns = int(self.config.spin_s * 1e9)
        clock = time.perf_counter_ns
        spin_poll = select.poll()  # the userfaultfd alone: poll(0) is the cheapest look (0.6 us, no exception)
        spin_poll.register(self.uffd.fd, select.POLLIN)
        try:
            while not self.gone:
                if self._retry:
                    timeout = 1
                elif self._disk_out:
                    timeout = self._disk_timeout_ms()
                else:
                    timeout = -1
                spun = False
                if spin_ns and timeout < 0:
                    # just after a fault: keep looking at the userfaultfd (without
                    # sleeping) for a while, so the next fault of a burst is read at once,
                    # not after the kernel has woken this thread; a wake-up from another
                    # thread (``_woken``) ends it
                    until = self._last_fault_ns + spin_ns
                    while not self._woken and not self.gone and clock() < until:
                        if spin_poll.poll(0) and self._read_ready():
                            self.counts.spin_reads += 1
                            spun = True
                            break
                if not spun:
                    # the GIL is released while blocked here; each syscall after it takes the
                    # GIL again, which can wait for another thread's switch interval: so only
                    # the descriptors poll reported are read
                    uffd_ready = False
                    for fd, _ in poller.poll(timeout):
                        if fd == self._wake_fd:
                            self._woken = False
                            try:
                                os.eventfd_read(self._wake_fd)
                            except BlockingIOError:
                                pass
                        else:
                            uffd_ready = True
                    if uffd_ready:
                        self._read_ready()
                if self._retry:
                    retry, self._retry = self._retry, []
                    for address, start in retry:
                        self._fault(address, start)
                if self._disk_out:
                    self._take_disk_reads()
                self._take_answers()
                if self._want_sync:
                    self._want_sync = False
                    self._call_trio(self._set_synced)
                if self._filled and self._deferred:  # eager mode: the held faults, now that all is in
                    deferred, self._deferred = self._deferred, []
                    for address, start in deferred:
                        self._fault(address, start)
                if self._stop:
                    break
            if self._disk_out and not self.gone:  # stopping: never leave a fault unanswered
                for va in list(self._disk_out):
                    self._disk_out[va] = (*self._disk_out[va][:2], 0)  # past its deadline
                self._take_disk_reads(stopping=True)
        except Exception:
            log.exception("uffd: the fault thread failed")
            self.gone = True
        finally:
            self._fill_kick.set()
            self._call_trio(self._finished.set)

    def _fill_main(self) -> None:
        """The fill thread: background copies, one ``fill_chunk`` at a time, each under
        ``_copy_lock``; it lets the fault thread in between copies."""
        self._local.counts = self.fill_counts
        self._local.uffd = self._fill_uffd
        self._local.copied = 0
        self._local.cache = _PageCache()
        if self.config.fill_nice:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.fill_nice)
            except OSError:
                pass
        try:
            while not self.gone and not self._stop:
                self._fill_kick.clear()
                if not self._fill_ready():
                    self._check_filled()
                    self._fill_kick.wait(0.1)
                    continue
                self._wait_for_reader()
                if not self._replaying():
                    self._yield_to_faults()
                t0 = time.perf_counter_ns()
                if self.direct_fill:
                    self._direct_fill_span()  # reads the disk first, then takes the copy lock per copy
                else:
                    with self._copy_lock:
                        self._fill_step()
                self.fill_counts.busy_ns += time.perf_counter_ns() - t0
        except Exception:
            log.exception("uffd: the fill thread failed")
            self.gone = True
            self._wake()

    def _replaying(self) -> bool:
        """Is the fill at the replayed working set's spans?  (Those it copies without
        waiting for the guest's faults to pause, as the loader's sweep keeps its
        width while it replays one: every page copied is a fault that never comes.)"""
        if not self._working_set:
            return False
        with self._lock:
            return bool(self._fill_queue) and self._working_set.contains(self._fill_queue[0][0])

    def _wait_for_reader(self) -> None:
        """The copy lock is not fair: when the fault thread waits for it, let it in first."""
        while self._want_read and not self._stop:
            time.sleep(0.00002)

    def _read_in(self, a: int, b: int, end: int) -> None:
        """Bring the source bytes of memory ``[a, b)`` into the page cache before the
        copy lock is taken, and ask the kernel to read ahead up to ``end`` (at most
        ``_READ_AHEAD`` spans): the copies under the lock then only copy, and a slow
        or hung disk holds up the fill, never the faults (which read their messages
        under that lock).  A page evicted in between is read by the copy itself."""
        src = self._direct_address(a, b - a)
        if src is None:
            return
        lo = src & _PAGE_MASK
        cache = self._local.cache
        stop = min(end, b + _READ_AHEAD * self.config.fill_span)
        ahead = self._direct_address(b, stop - b) if b < stop else None
        if ahead is not None:  # the next spans: read ahead now, asynchronously
            cache.advise(ahead & _PAGE_MASK, stop - b)
        cache.populate(lo, src + (b - a) - lo)

    def _yield_to_faults(self) -> None:
        """Sleep while faults keep coming (``fill_quiet_s``), at most ``fill_max_wait_s``."""
        quiet = self.config.fill_quiet_s
        if quiet <= 0:
            return
        deadline = time.monotonic() + self.config.fill_max_wait_s
        while not self._stop:
            since = (time.perf_counter_ns() - self._last_fault_ns) / 1e9
            left = min(quiet - since, deadline - time.monotonic())
            if left <= 0:
                return
            time.sleep(left)

    def _read_ready(self) -> bool:
        """Handle every message queued now (non-blocking); False when there was none.
        Removals come first, so a fault read in the same batch never copies into a
        range being removed.

        This is the fault's hot path: it reads the raw messages into one reused
        buffer and looks only at their event byte and the fault's address (a woken
        thread runs with cold caches, so every line here costs several times what a
        warm loop would)."""
        fd = self.uffd.fd
        buf = self._msg_buf
        size = _uffd.MSG_SIZE
        read = False
        while not self.gone:
            self._want_read = True
            with self._copy_lock:
                self._want_read = False
                try:
                    n = os.readv(fd, self._msg_bufs)
                except BlockingIOError:
                    return read
                except OSError as exc:
                    if exc.errno not in (errno_mod.EBADF,):
                        log.warning("uffd: reading events: %s", exc)
                    self.gone = True
                    return read
                n -= n % size
                faults_only = True
                for off in range(0, n, size):
                    event = buf[off]
                    if event != _uffd.EVENT_PAGEFAULT:
                        faults_only = False
                        if event == _uffd.EVENT_REMOVE or event == _uffd.EVENT_UNMAP:
                            if event == _uffd.EVENT_REMOVE:
                                self.counts.remove += 1
                            else:
                                self.counts.unmap += 1
                            _, _, _, _, a, b, _ = _uffd.MSG_STRUCT.unpack_from(buf, off)
                            self._remove(a, b)
            if not n:
                return read
            read = True
            now = time.perf_counter_ns()
            self._last_fault_ns = now
            for off in range(0, n, size):
                if faults_only or buf[off] == _uffd.EVENT_PAGEFAULT:
                    self.counts.faults += 1
                    self._fault(_ADDRESS.unpack_from(buf, off + 16)[0], now)
                    continue
                event, _, _, _, a, b, c = _uffd.MSG_STRUCT.unpack_from(buf, off)
                if event == _uffd.EVENT_REMAP:
                    self.counts.remap += 1
                    self._remap(a, b, c)
                elif event == _uffd.EVENT_FORK:
                    _uffd.close_forked(a)
                    self.counts.fork += 1
                    if self.counts.fork == 1:
                        log.warning("uffd: the VMM forked (UFFD_EVENT_FORK): the child's userfaultfd is closed, "
                                    "its copy of guest memory is not served (said once; counted as events.fork)")
                elif event not in (_uffd.EVENT_REMOVE, _uffd.EVENT_UNMAP) and event not in self._ignored:
                    self._ignored.add(event)
                    log.warning("uffd: ignoring event %#x (said once)", event)
            if n < len(buf):  # the buffer was not filled: nothing more is queued
                return True
        return read

    def _remove(self, start: int, end: int) -> None:
        """The VMM dropped ``[start, end)`` (balloon, MADV_DONTNEED, munmap): never copy
        there again; a later fault gets a zero page, as a fresh anonymous page would."""
        for r in self.regions:
            a, b = max(start, r.base), min(end, r.end)
            if a < b:
                lo, hi = r.offset + (a - r.base), r.offset + (b - r.base)
                self.removed.add(lo, hi)
                self._removed_gen += 1
                with self._lock:
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
        self._removed_gen += 1
        self._fast = self._fast_region()

    def _region(self, address: int) -> Region | None:
        for r in self.regions:
            if r.base <= address < r.end:
                return r
        return None

    def _fast_region(self) -> tuple[int, int, int, int] | None:
        """``(base, end, offset, source address)`` of the region whose faults may take
        the short path in :meth:`_fault`: a raw image copied directly from the source,
        4 KiB pages, no eager hold; None when there is none (or several regions)."""
        if (self._direct_map is None or not self._direct_identity or self.config.eager
                or len(self.regions) != 1):
            return None
        r = self.regions[0]
        if r.page_size != mmap.PAGESIZE or self.loader.layout.page_size != mmap.PAGESIZE:
            return None
        return r.base, r.end, r.offset, self._direct_base

    def _fault(self, address: int, start_ns: int, from_disk: bool = False) -> None:
        """Answer one fault, or hand it to the trio thread (module doc, in order).
        ``from_disk``: its source page was just read into the page cache by a disk
        thread (copy it directly now, whatever ``mincore`` says)."""
        fast = self._fast
        if fast is not None and not self.removed and (self.direct_fill or not self.pending):
            # the short path, for the common case: a data page of a raw image, nothing
            # removed: one copy from the source.  The full path below makes the same
            # choice with more lookups, except for a page loaded but not copied yet,
            # which it copies from the memory file with the loaded bytes around it;
            # the direct fill copies those from the source anyway, so with it the
            # memory file's pending bytes do not matter here (the daemon loads from
            # its start, before the VMM connects: there are always some)
            base, end, offset, source = fast
            if base <= address < end:
                va = address & _PAGE_MASK
                off = offset + (va - base)
                # in the page cache? (cachestat, else mincore, inline: each line costs
                # here; the check is 3-6 us of a fault's p50, the price of never reading
                # the disk here)
                vec = self._fast_vec
                cs = self._fast_cachestat
                if (off + mmap.PAGESIZE <= self._direct_size and self.loader.layout.find(off) >= 0
                        and (cs.page(off) if cs is not None
                             else not _mincore(source + off, mmap.PAGESIZE, vec) and vec[0] & 1)):
                    try:
                        self.uffd.copy(va, source + off, mmap.PAGESIZE)
                    except _uffd.UffdError:
                        pass  # EEXIST, EAGAIN, EFAULT, gone: the full path decides
                    else:
                        c = self.counts
                        c.copies += 1
                        c.copied_bytes += mmap.PAGESIZE
                        self._direct_done(off, mmap.PAGESIZE, start_ns)
                        return
        r = self._region(address)
        if r is None:  # not ours (should not happen): wake it rather than leave it hanging
            log.warning("uffd: fault at %#x outside every region", address)
            self._wake_range(address & ~4095, 4096)
            return
        if self.config.eager and not self._filled:
            self._deferred.append((address, start_ns))
            return
        page = r.page_size
        va = address & ~(page - 1)
        off = r.offset + (va - r.base)
        layout = self.loader.layout
        if page == layout.page_size:  # one layout page: data or hole, as a whole
            data = layout.find(off) >= 0
        else:
            data = _has_data(self.loader, off, off + page)
        if not data or (self.removed and self.removed.overlap_bytes(off, off + page)):
            self.counts.zero += 1
            self._zero(r, va, start_ns)
            return
        loaded = False
        if self.pending:  # (read without the lock: a page loaded just now is copied directly, or waited for)
            with self._lock:
                loaded = self.pending.overlap_bytes(off, off + page) == _data_bytes(self.loader, off, off + page)
        if loaded:
            self.counts.loaded += 1
            self._answer(r, va, start_ns, loader_wait=True)
            return
        src = self._direct_address(off, page)
        if src is not None and not from_disk and not self._local.cache.cached(src, page):
            if self._read_from_disk(va, src, page, address, start_ns):
                return  # a disk thread brings the page in; the fault comes back here then
            src = None  # the disk threads are stuck: the loader's path (its reads have deadlines)
        if src is not None:
            status = self._copy(r, va, src, page)
            if status == errno_mod.EAGAIN:
                self._retry.append((address, start_ns))
                return
            if status != errno_mod.EFAULT:
                if status == errno_mod.EEXIST:
                    self.counts.spurious += 1
                    self._wake_range(va, page)
                self._direct_done(off, page, start_ns)
                return
            # the source page cannot be read (EFAULT): the loader's path decides
        self._call_trio(self._submit_wait, r, va, start_ns)

    # ------------------------------------------------------------ disk reads (uncached faults)
    def _read_from_disk(self, va: int, src: int, length: int, address: int, start_ns: int) -> bool:
        """Hand an uncached source page to a disk thread; False when they are all stuck
        past the deadline (the caller then takes the loader's path)."""
        now = time.perf_counter_ns()
        deadline = now + self._disk_deadline_ns if self._disk_deadline_ns is not None else 1 << 62
        with self._disk_cv:
            if self._disk_idle == 0 and len(self._disk_threads) >= _DISK_THREADS:
                oldest = min((d for _, _, d in self._disk_out.values()), default=deadline)
                if oldest <= now:
                    return False
            if va in self._disk_out:  # a second vCPU on the same page: one read, one copy wakes both
                return True
            self._disk_out[va] = (address, start_ns, deadline)
            self._disk_queue.append((va, src, length))
            if self._disk_idle == 0 and len(self._disk_threads) < _DISK_THREADS:
                t = threading.Thread(target=self._disk_main, name="pageload-uffd-disk", daemon=True)
                self._disk_threads.append(t)
                t.start()
            else:
                self._disk_cv.notify()
        self.counts.uncached += 1
        return True

    def _disk_main(self) -> None:
        """A disk thread: read queued source pages into the page cache (the GIL is
        released while the disk is read), hand each back to the fault thread."""
        cache = _PageCache()
        while True:
            with self._disk_cv:
                while not self._disk_queue and not self._stop and not self.gone:
                    self._disk_idle += 1
                    self._disk_cv.wait()
                    self._disk_idle -= 1
                if self._stop or self.gone:
                    return
                va, src, length = self._disk_queue.popleft()
            lo = src & _PAGE_MASK
            cache.populate(lo, src + length - lo)
            with self._disk_cv:
                self._disk_done.append(va)
            self._wake()

    def _disk_timeout_ms(self) -> int:
        """The fault thread's poll timeout: until the first disk read's deadline."""
        with self._disk_cv:
            first = min((d for _, _, d in self._disk_out.values()), default=0)
        return max(0, (first - time.perf_counter_ns()) // 1_000_000 + 1)

    def _take_disk_reads(self, stopping: bool = False) -> None:
        """Fault thread: faults whose page a disk thread read in go on (copied now);
        those past the read deadline are answered as a failed read (poisoned)."""
        with self._disk_cv:
            done, self._disk_done = self._disk_done, []
            for va in done:
                entry = self._disk_out.pop(va, None)
                if entry is not None:  # (None: answered at its deadline already)
                    self._disk_ready.append(entry)
            now = time.perf_counter_ns()
            for va in [va for va, (_, _, d) in self._disk_out.items() if d <= now]:
                address, start_ns, _ = self._disk_out.pop(va)
                self._disk_late.append((address, start_ns))
        ready, self._disk_ready = self._disk_ready, []
        for address, start_ns, _ in ready:
            self._fault(address, start_ns, from_disk=True)
        late, self._disk_late = self._disk_late, []
        for address, start_ns in late:
            r = self._region(address)
            if r is None:
                continue
            if stopping:
                error = LoadError(codes.SHUTTING_DOWN, "the daemon stopped while the source page was read")
            else:
                self.counts.disk_timeouts += 1
                error = LoadError(codes.TIMEOUT, "reading the source page took longer than the read deadline")
            self._fail(r, address & ~(r.page_size - 1), start_ns, error)

    def _direct_done(self, off: int, page: int, start_ns: int) -> None:
        """The bookkeeping after a direct copy answered a fault at memory ``off``."""
        self.counts.direct += 1
        if self.direct_fill:
            with self._lock:
                self.installed.add(off, off + page)
        self._record(start_ns)
        # the hint loads the memory file sooner; the direct fill covers the guest
        # anyway, and the loader's reads would only take CPU from the guest then
        hint = 0 if self.direct_fill else self.config.hint_around
        window = (off & ~(hint - 1), min((off & ~(hint - 1)) + hint, self.loader.memory_size)) \
            if hint >= page else None
        self._for_trio(off, off + page, window)
        if self.config.fault_around > page:
            self._around_from_source(off, page)

    def _around_from_source(self, off: int, page: int) -> None:
        """After a direct copy (the vCPU is already woken): copy the rest of the aligned
        ``fault_around`` window around memory ``off`` from the source too, so that its
        neighbours never fault -- only data, only what is in the page cache (never a
        disk read here), never a removed range; pages already there are skipped."""
        window = self.config.fault_around
        r = self._region_at(off)
        if r is None or r.page_size != page:
            return
        wlo = max(off & ~(window - 1), r.offset)
        whi = min(wlo + window, r.offset + r.size)
        cache = self._local.cache
        for a, b in ((wlo, off), (off + page, whi)):
            for da, db in self.loader.layout.data_in(a, b):
                if self.removed and self.removed.overlap_bytes(da, db):
                    continue
                src = self._direct_address(da, db - da)
                if src is None or not cache.cached(src, db - da):
                    continue
                status = self._copy(r, r.base + (da - r.offset), src, db - da)
                if status == 0 or status == errno_mod.EEXIST:
                    self.counts.around_bytes += db - da
                    if self.direct_fill:
                        with self._lock:
                            self.installed.add(da, db)

    def _for_trio(self, lo: int, hi: int, hint: tuple[int, int] | None) -> None:
        """A fault answered here counts as an immediate wait of the loader (and a touch
        for the working-set recorder); ``hint``: a window to prefetch."""
        with self._lock:
            self._for_loader += 1
            if self.loader.recorder is not None:
                self._touched.append((lo, hi))
            if hint is None:  # counts and touches: merged merge_interval_s from the first
                if self._merge_later or self._merge_scheduled:
                    return
                self._merge_later = True
                later = True
            else:
                self._hints.append(hint)
                if self._merge_scheduled:
                    return
                self._merge_scheduled = True
                later = False
        self._call_trio(self._kick_merge if later else self._merge)  # a prefetch hint goes now

    def _direct_address(self, off: int, length: int) -> int | None:
        """Where memory ``[off, off+length)`` is in the source's mapping, if it is
        one piece of data there; None if direct copies are off."""
        if self._direct_map is None:
            return None
        if self._direct_identity:  # a raw image: memory offset = file offset, holes read as zeros
            fo = off
        else:
            layout = self.loader.layout
            i = layout.find(off)
            if i < 0 or off + length > layout.mem[i] + layout.length[i]:
                return None
            fo = layout.file[i] + (off - layout.mem[i])
        if fo + length > self._direct_size:
            return None
        return self._direct_base + fo

    def _take_answers(self) -> None:
        """Answer the faults whose loader waits finished (trio thread's answers)."""
        with self._lock:
            if not self._answers:
                return
            answers, self._answers = self._answers, deque()
        for r, va, start_ns, error in answers:
            if self.gone:
                return
            off = r.offset + (va - r.base)
            if error is not None:
                self._fail(r, va, start_ns, error)
            elif self.removed.overlap_bytes(off, off + r.page_size):
                self.counts.zero += 1
                self._zero(r, va, start_ns)
            else:
                self._answer(r, va, start_ns)

    def _answer(self, r: Region, va: int, start_ns: int, loader_wait: bool = False) -> None:
        """The faulting page is loaded: copy it (waking the thread), then the loaded,
        not yet copied bytes of the window around it."""
        page = r.page_size
        off = r.offset + (va - r.base)
        status = self._copy(r, va, self._src + off, page)
        if status == errno_mod.EAGAIN:
            self._retry.append((va, start_ns))
            return
        if status == errno_mod.EEXIST:
            self.counts.spurious += 1
            self._wake_range(va, page)
        self._record(start_ns)
        with self._lock:
            self.pending.remove(off, off + page)
        if self.direct_fill:
            with self._lock:
                self.installed.add(off, off + page)
        if loader_wait:
            self._for_trio(off, off + page, None)
        window = max(self.config.fault_around, page)
        wlo = max(off & ~(window - 1), r.offset)
        whi = min(wlo + window, r.offset + r.size)
        if whi - wlo > page:
            self._install(wlo, whi)

    def _record(self, start_ns: int) -> None:
        elapsed = time.perf_counter_ns() - start_ns
        self.counts.blocked_ns += elapsed
        with self._lock:
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
                self.counts.eagain += 1
                self._retry.append((va, start_ns))
                return
            if exc.errno == errno_mod.EEXIST:
                self._wake_range(va, page)
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
        self.counts.failed += 1
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
                self.counts.failed -= 1
                with self._lock:  # again after the events
                    self._answers.append((r, va, start_ns, error))
                return
            if not self._gone_error(exc):
                # no UFFDIO_POISON (kernel before 6.6): nothing can raise SIGBUS in the
                # thread; never hand out wrong bytes -- the VMM's memory is unusable
                log.error("uffd: cannot poison %#x (%s): no UFFDIO_POISON in this kernel?; "
                          "stopping the handler", va, exc.strerror)
                self.gone = True
        self._record(start_ns)

    def _wake_range(self, va: int, length: int) -> None:
        try:
            self.uffd.wake(va, length)
        except OSError:
            pass

    # ------------------------------------------------------------ copying (fault thread)
    def _copy(self, r: Region, va: int, src: int, length: int) -> int:
        """UFFDIO_COPY ``length`` bytes (whole pages of ``r``) from address ``src`` to
        ``va``.  Returns 0, or EEXIST if some page was already there (the rest is
        copied), EAGAIN (the mapping is changing: retry after reading the events) or
        EFAULT (the source could not be read; nothing more copied).  The kernel reports
        a copy that stopped early (at a page already there) as EAGAIN with the bytes
        done: that is progress, not a changing mapping.  After EAGAIN or EFAULT,
        ``_local.copied`` holds the bytes done (per thread)."""
        page = r.page_size
        done = 0
        status = 0
        local = self._local
        c = local.counts
        copy = local.uffd.copy
        while done < length and not self.gone:
            try:
                n = copy(va + done, src + done, length - done)
                c.copies += 1
                c.copied_bytes += n
                done += n
            except _uffd.UffdError as exc:
                c.copies += 1
                c.copied_bytes += exc.done
                done += exc.done - exc.done % page
                if exc.errno == errno_mod.EEXIST:
                    c.eexist += 1
                    status = errno_mod.EEXIST
                    done += page
                elif exc.errno == errno_mod.EAGAIN:
                    if exc.done:  # a partial copy (it stopped at a page already there): go on
                        continue
                    c.eagain += 1
                    self._local.copied = done
                    return errno_mod.EAGAIN
                elif exc.errno == errno_mod.EFAULT:
                    c.efault += 1
                    self._local.copied = done
                    return errno_mod.EFAULT
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
        """Copy the pending bytes of ``[lo, hi)`` into the guest (whole pages of each
        region; a huge page only once all its data is loaded), never into removed
        ranges.  Returns False if the mapping is changing (EAGAIN): try again later."""
        for r in self.regions:
            a, b = max(lo, r.offset), min(hi, r.offset + r.size)
            if a >= b:
                continue
            page = r.page_size
            a &= ~(page - 1)
            b = (b + page - 1) & ~(page - 1)
            pieces = self._take(a, b, page)
            for k, (plo, phi) in enumerate(pieces):
                status = self._copy(r, r.base + (plo - r.offset), self._src + plo, phi - plo)
                if self.direct_fill:
                    with self._lock:
                        self.installed.add(plo, phi if status != errno_mod.EAGAIN else plo + self._local.copied)
                if status == errno_mod.EAGAIN:
                    with self._lock:  # what is left of this piece, and the pieces after it
                        self.pending.add(plo + self._local.copied, phi)
                        for qlo, qhi in pieces[k + 1:]:
                            self.pending.add(qlo, qhi)
                    return False
        return True

    def _take(self, a: int, b: int, page: int) -> list[tuple[int, int]]:
        """Take out of ``pending`` what of ``[a, b)`` can be copied now: pending pieces
        minus removed ranges (whole huge pages, all of whose data is pending)."""
        out: list[tuple[int, int]] = []
        with self._lock:
            if page <= self.loader.page_size:
                for plo, phi in list(self.pending.overlapping(a, b)):
                    plo, phi = max(plo, a), min(phi, b)
                    self.pending.remove(plo, phi)
                    out.append((plo, phi))
            else:
                for hp in range(a, b, page):
                    have = self.pending.overlap_bytes(hp, hp + page)
                    if have and have == _data_bytes(self.loader, hp, hp + page):
                        self.pending.remove(hp, hp + page)
                        out.append((hp, hp + page))
        if not self.removed:
            return out
        pieces = [p for plo, phi in out for p in gaps(self.removed.overlapping(plo, phi), plo, phi)]
        if page > self.loader.page_size:  # a huge page goes in whole or not at all
            return [p for p in pieces if p[1] - p[0] == page]
        return pieces

    def _fill_ready(self) -> bool:
        if self._filled and not self.config.fill:
            return False
        if self.config.eager and not self._load_done:
            return False
        return bool(self._fill_queue)

    def _fill_step(self) -> None:
        """One background copy of at most ``fill_chunk`` bytes, at the fill queue's head."""
        chunk = self.config.fill_chunk
        with self._lock:
            queue = self._fill_queue
            while queue:
                entry = queue[0]
                nxt = self.pending.first_at_or_after(entry[0])
                if nxt is None or nxt[0] >= entry[1]:
                    queue.popleft()
                    continue
                a = max(nxt[0], entry[0])
                b = min(nxt[1], entry[1], a + chunk)
                entry[0] = b
                break
            else:
                return
        if not self._install(a, b):
            with self._lock:  # EAGAIN: the events are read first, then this again
                self._fill_queue.appendleft([a, b])

    def _direct_fill_span(self) -> None:
        """The direct fill: take the next ``fill_span`` of the queue, read it in, look
        up its removed ranges and the pages faults already put in (skipped), then copy
        it from the source ``fill_chunk`` at a time, each copy under the copy lock.  A
        removal or a remap read while the span is copied (``_removed_gen``, changed
        under that lock) puts the rest of the span back, to be looked up again; pages
        put in meanwhile by faults are skipped by the kernel (EEXIST)."""
        with self._lock:
            if not self._fill_queue:
                return
            entry = self._fill_queue[0]
            a, end = entry
            r = self._region_at(a)
            span = self.config.fill_span
            step = span if r is None else max(r.page_size, span - span % r.page_size)  # whole pages
            b = min(end, a + step)
            if r is not None:
                b = min(b, r.offset + r.size)
            entry[0] = b
            if entry[0] >= entry[1]:
                self._fill_queue.popleft()
        if r is None:
            return
        self._read_in(a, b, end)
        with self._copy_lock:  # (removals are recorded under it)
            gen = self._removed_gen
            with self._lock:
                skip = sorted([*self.removed.overlapping(a, b), *self.installed.overlapping(a, b)])
                self.installed.remove(a, b)  # the fill is past it: forget it
        pieces = list(gaps(skip, a, b))
        page = r.page_size
        chunk = max(page, self.config.fill_chunk - self.config.fill_chunk % page)
        copy_lock = self._copy_lock
        for k, (plo, phi) in enumerate(pieces):
            if page > self.loader.page_size and (plo % page or phi % page):
                continue  # part of a huge page was removed: it is never copied again
            src = self._direct_address(plo, phi - plo)
            if src is None:  # cannot happen for queued data; leave it to faults
                self._skipped += 1
                continue
            va = r.base + (plo - r.offset)
            at = plo
            while at < phi:
                n = min(chunk, phi - at)
                if self._want_read:
                    self._wait_for_reader()
                with copy_lock:
                    if self._removed_gen != gen or self._stop:  # removed or remapped meanwhile: look again
                        status = -1
                        self.fill_counts.relooked += 1
                    else:
                        status = self._copy(r, va + (at - plo), src + (at - plo), n)
                if status == 0 or status == errno_mod.EEXIST:
                    at += n
                    continue
                rest = at
                if status == errno_mod.EAGAIN or status == errno_mod.EFAULT:
                    rest += self._local.copied
                    if status == errno_mod.EFAULT:  # that page cannot be read: its fault takes the loader's path
                        self._skipped += 1
                        rest += page
                with self._lock:  # the rest of this piece and the ones after it, first
                    later = [[qlo, qhi] for qlo, qhi in pieces[k + 1:]]
                    if rest < phi:
                        later.insert(0, [rest, phi])
                    self._fill_queue.extendleft(reversed(later))
                return

    def _region_at(self, offset: int) -> Region | None:
        for r in self.regions:
            if r.offset <= offset < r.offset + r.size:
                return r
        return None

    def _check_filled(self) -> None:
        if self._filled or not (self.config.fill or self.config.eager):
            return
        if self.direct_fill:
            with self._lock:
                if self._fill_queue or self._skipped:
                    return
        else:
            if not self._load_done:
                return
            with self._lock:
                if self._fill_queue or self.pending:
                    return
        self._filled = True
        self.filled_ns = time.perf_counter_ns()
        log.info("uffd: guest memory filled in %.3f s", (self.filled_ns - self.started_ns) / 1e9)
        self._call_trio(self.filled.set)
        if self.loader.sweep_held:
            self._call_trio(self.loader.hold_sweep, False)
        self._wake()  # the fault thread answers the faults held in eager mode


def _has_data(loader: Loader, lo: int, hi: int) -> bool:
    for _ in loader.layout.data_in(lo, hi):
        return True
    return False


def _data_bytes(loader: Loader, lo: int, hi: int) -> int:
    return sum(b - a for a, b in loader.layout.data_in(lo, hi))


def _injects_read_faults(queue: object) -> bool:
    """Whether ``queue`` (or a queue it wraps) makes reads fail or hang on purpose:
    then faults must take the loader's path, which those reads reach."""
    from aio.testing import FaultInjectingQueue, HangingQueue  # (most daemons never import it otherwise)

    for _ in range(16):
        if isinstance(queue, (FaultInjectingQueue, HangingQueue)):
            return True
        queue = getattr(queue, "inner", None)
        if queue is None:
            return False
    return False


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


# ------------------------------------------------------------ the listener
_RECV_CHUNK = 64 << 10
_MAX_FDS = 16  #: descriptors read from one handshake (more are closed by the kernel: MSG_CTRUNC)


async def receive_handshake(conn: trio.socket.SocketType, memory_size: int) -> tuple[list[Region], int]:
    """Read the VMM's one message: regions + the userfaultfd.  Closes any fds that
    came with a bad message.  Raises :class:`HandshakeError`.

    Firecracker sends the message in one ``sendmsg`` with the descriptor, which
    arrives with its first byte: bytes without one are refused at once.  The rest
    is read until it is a whole JSON value (or the peer closes the connection), at
    most :data:`MAX_HANDSHAKE` bytes."""
    fds = array.array("i")
    data = b""
    try:
        while True:
            msg, ancdata, _flags, _addr = await conn.recvmsg(
                _RECV_CHUNK, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if not msg:
                if not data and not fds:
                    raise HandshakeError("the VMM closed the connection before the handshake")
                break  # the peer is done: what came is the message
            data += msg
            if not fds:
                raise HandshakeError("handshake carried no userfaultfd (SCM_RIGHTS)")
            if len(data) > MAX_HANDSHAKE:
                raise HandshakeError(f"handshake is more than {MAX_HANDSHAKE} bytes "
                                     f"(room for {MAX_REGIONS} regions)")
            items = _decode(data, final=False)
            if items is not None:
                break
        if not fds:
            raise HandshakeError("handshake carried no userfaultfd (SCM_RIGHTS)")
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


class _Refusals:
    """Refused connections, logged at most once a second (a flood is one line a
    second, with the number left out), all counted."""

    def __init__(self) -> None:
        self.count = 0
        self._unlogged = 0
        self._last = -math.inf

    def note(self, why: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last < 1.0:
            self._unlogged += 1
            return
        more = f" (and {self._unlogged} more refused since the last line)" if self._unlogged else ""
        self._last, self._unlogged = now, 0
        log.error("uffd: refused a connection: %s%s", why, more)


def bind_uffd_socket(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """Bind and listen on ``path`` (mode 0600) with the wait socket's rules: a stale
    socket (nobody listening) is replaced; a live one (another daemon's, or this
    one's wait socket) and anything that is not a socket are refused
    (:class:`StartupError`).  Returns the socket and the file's (st_dev, st_ino), so
    that only that file is removed at exit."""
    try:
        _clear_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            st = os.lstat(path)
            sock.listen(MAX_PENDING_HANDSHAKES)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        line = describe_os_error(exc, None)
        raise StartupError(f"--uffd-socket {line}" if path in line else f"--uffd-socket {path}: {line}") from None
    return sock, (st.st_dev, st.st_ino)


class _Handshakes:
    """The uffd socket's connections before one of them is served.  Each handshake is
    read in a task of its own (:meth:`accept`), so a peer that sends nothing delays no
    other: it is refused after :data:`HANDSHAKE_TIMEOUT_S`, or as soon as
    :data:`MAX_PENDING_HANDSHAKES` newer connections are being read.  The first good
    handshake wins (:attr:`won`); one that completes after it is refused, and so is
    every connection accepted after it."""

    def __init__(self, listener: trio.socket.SocketType, memory_size: int) -> None:
        self.listener = listener
        self.memory_size = memory_size
        self.refusals = _Refusals()
        self.won: tuple[trio.socket.SocketType, list[Region], int] | None = None
        self.ready = trio.Event()  #: set once :attr:`won` is
        self._pending: dict[trio.socket.SocketType, trio.CancelScope] = {}  # oldest first
        self._evicted: set[trio.socket.SocketType] = set()

    async def accept(self) -> None:
        """Accept connections until cancelled (run in a nursery; see the class doc)."""
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await self.listener.accept()
                if self.won is not None:
                    conn.close()
                    self.refusals.note("already serving a VMM")
                    continue
                if len(self._pending) >= MAX_PENDING_HANDSHAKES:
                    oldest = next(iter(self._pending))
                    self._evicted.add(oldest)
                    self._pending.pop(oldest).cancel()
                scope = trio.CancelScope(deadline=trio.current_time() + HANDSHAKE_TIMEOUT_S)
                self._pending[conn] = scope
                nursery.start_soon(self._one, conn, scope)

    async def _one(self, conn: trio.socket.SocketType, scope: trio.CancelScope) -> None:
        keep = False
        try:
            with scope:
                regions, fd = await receive_handshake(conn, self.memory_size)
                if self.won is not None:
                    os.close(fd)
                    self.refusals.note("already serving a VMM")
                    return
                self.won = (conn, regions, fd)
                keep = True
                self.ready.set()
            if scope.cancelled_caught:
                self.refusals.note(f"{MAX_PENDING_HANDSHAKES} newer connections came before its handshake"
                                   if conn in self._evicted else f"no handshake within {HANDSHAKE_TIMEOUT_S:g} s")
        except (HandshakeError, OSError) as exc:
            self.refusals.note(str(exc))
        finally:
            self._pending.pop(conn, None)
            self._evicted.discard(conn)
            if not keep:
                conn.close()


async def serve_uffd(
    path: str,
    loader: Loader,
    memory: MemoryFile,
    config: UffdConfig | None = None,
    *,
    on_handler: Any = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> UffdHandler | None:
    """Listen on ``path`` (mode 0600; :func:`bind_uffd_socket`) for one VMM; serve it
    until it closes the connection (or exits); return its handler.  Handshakes are
    read concurrently and bounded (:class:`_Handshakes`); a bad one is logged and
    refused (the connection closed).  The socket file is removed at exit if it is
    still the one bound here."""
    raw, inode = bind_uffd_socket(path)
    sock = trio.socket.from_stdlib_socket(raw)
    handshakes = _Handshakes(sock, loader.memory_size)
    try:
        async with trio.open_nursery() as listening:
            listening.start_soon(handshakes.accept)
            task_status.started()
            await handshakes.ready.wait()
            assert handshakes.won is not None
            conn, regions, fd = handshakes.won
            with conn:
                handler = None
                try:
                    handler = UffdHandler(loader, memory, fd, regions, config)
                    shown = ", ".join(f"{r.size >> 20} MiB at memory {r.offset:#x} ({r.page_size >> 10} KiB pages)"
                                      for r in regions[:8])
                    log.info("uffd: serving %d region(s): %s%s", len(regions), shown,
                             f", ... ({len(regions) - 8} more)" if len(regions) > 8 else "")
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
            listening.cancel_scope.cancel()
        return handler
    finally:
        sock.close()
        _remove_socket_file(path, inode)


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
