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

The parts, each with one owner: the handshake (:mod:`._handshake`), answering
(:mod:`._answer`, shared with the zero-copy mode), the fault thread
(:mod:`._fault_thread`) and its decisions (:mod:`._faults`), the disk threads
(:mod:`._disk`), the fill (:mod:`._fill`), what the threads share (:mod:`._shared`)
and the handler's one state (:mod:`._state`).  :class:`UffdHandler` makes them and is
the trio thread's part: the loader's listener, the waits of faults that need the
loader, merging the fault thread's answers into the loader's counts, the drain and
the statistics.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import threading
import time
from typing import Any

import trio

from .._memfile import MemoryFile
from .._sockets import remove_socket_file
from ..core._config import LoadError, WaitHandle
from ..core._service import PageService
from . import _ioctl
from ._answer import Answerer
from ._config import UffdConfig, _Counters
from ._fault_thread import FaultThread
from ._faults import Decisions
from ._fill import Copies, Fill
from ._handshake import Region, _Handshakes, bind_uffd_socket
from ._shared import Guest, Shared
from ._source import DirectSource, _address_of, _address_of_map
from ._state import LOAD_DONE, STOP, VANISH, HandlerState

log = logging.getLogger("pageload")


class UffdHandler:
    """Serves one VMM's userfaultfd from ``loader`` and ``memory`` (see module doc).

    Threads: the *fault thread* (:attr:`reader`, deciding with :attr:`decide`) owns
    the userfaultfd; the *fill thread* (:attr:`fill`) copies in the background; the
    trio thread runs the loader, its loaded-listener (:meth:`_on_loaded`) and the
    waits of faults that need the loader (:meth:`_submit_wait`, :meth:`_on_waited`).
    What they share is :attr:`shared` (under its lock) and :attr:`guest`; the one mode
    is :attr:`state`.
    """

    def __init__(self, loader: PageService, memory: MemoryFile, uffd_fd: int, regions: list[Region],
                 config: UffdConfig | None = None) -> None:
        self.loader = loader
        self.memory = memory
        self.config = config = config or UffdConfig()
        self._src = _address_of(memory)
        #: the one mode: loading, loaded, filled, stopping, gone (:mod:`._state`: who stores it, who loads it)
        self.state = state = HandlerState(loaded=loader.done.is_set())
        self.shared = shared = Shared(regions)
        self.guest = guest = Guest(regions, shared)
        self.histogram = shared.histogram  #: the faults' latency (under ``shared.lock``)
        self.counts = _Counters()  #: the fault thread's
        self.fill_counts = _Counters()  #: the fill thread's (copies only)
        # each thread's Uffd has its own argument buffers: their copies run at once
        self.uffd = _ioctl.Uffd(uffd_fd)  #: the fault thread's
        fault_answers = Answerer(self.uffd, state, self.counts, shared.histogram, shared.lock)
        fill_answers = Answerer(_ioctl.Uffd(uffd_fd), state, self.fill_counts, shared.histogram, shared.lock)
        # the trio thread's own
        self.faults_waited = 0  #: faults that waited for the loader
        self.outstanding = 0  #: faults waiting for their read now
        self._none_outstanding = trio.Event()
        self._none_outstanding.set()
        self._synced: trio.Event | None = None
        self._merge_kick = trio.Event()
        self.filled = trio.Event()  #: every data byte in the regions is in guest memory
        self._finished = trio.Event()
        self.started_ns = time.perf_counter_ns()
        self._thread: threading.Thread | None = None
        self._fill_thread: threading.Thread | None = None
        self._direct_map: mmap.mmap | None = None
        self._direct_base = 0
        self._direct_size = 0
        self._direct_identity = False
        self.direct_off_reason = self._open_direct()
        self.direct = DirectSource(self._direct_map, self._direct_base, self._direct_size, self._direct_identity,
                                   loader)
        #: the fill copies from the source (one copy, from the page cache) instead of
        #: from the memory file after the loader: decided here, before any thread runs
        from_source = (self._direct_map is not None and config.fill and not config.eager
                       and (self._direct_identity or all(r.page_size == loader.page_size for r in regions)))
        copies = Copies(loader, shared, guest, self._src, from_source)
        self.fill = Fill(loader, config, state, shared, guest, self.direct, copies, fill_answers, self.filled,
                         self.started_ns)
        self.decide = Decisions(loader, config, state, shared, guest, self.direct, copies, fault_answers, self)
        self.reader = FaultThread(config, state, shared, guest, self.decide, self.uffd, self)
        if from_source:
            self.fill.seed_from_source(regions)
        loader.subscribe_loaded(self._on_loaded)  # what is loaded now, then as it loads

    # ------------------------------------------------------------ set-up
    def _open_direct(self) -> str | None:
        """Map the source read-only for direct copies; the reason when they are off."""
        if not self.config.direct:
            return "off (configured)"
        if self.config.eager:
            return "off (eager mode copies only loaded memory)"
        if self.loader.verifies:
            return "off (checksums are verified while loading)"
        local = self.loader.local_source
        if local is None:
            return "off (the source is not one local file)"
        if not self.loader.reads_transparent:
            return "off (the loader's queue changes what reads return)"
        fd = local.fd
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
        self._direct_identity = layout.identity_mapped or layout.file_pages == layout.mem_pages
        return None

    def _on_loaded(self, lo: int, hi: int) -> None:
        """The loader's listener (trio thread): ``[lo, hi)`` is in the memory file."""
        added = False
        shared = self.shared
        with shared.lock:
            for clo, chi in shared.covered.overlapping(lo, hi):
                shared.pending.add(max(lo, clo), min(hi, chi))
                added = True
            if added and (self.config.fill or self.config.eager) and not self.fill.from_source:
                shared.fill_queue.append([lo, hi])
        if added and self._thread is not None:
            shared.wake()

    @property
    def gone(self) -> bool:
        """The VMM's memory is gone, or the handler has stopped (:attr:`state`)."""
        return self.state.gone

    @property
    def filled_ns(self) -> int | None:
        """When every data byte was in guest memory (the fill's record)."""
        return self.fill.filled_ns

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
        with self.shared.lock:
            histogram = self.histogram.as_dict()
            pending = self.shared.pending.total
        return {
            "regions": len(self.guest.regions),
            "faults": c.faults,
            "faults_immediate": c.loaded,
            "faults_direct": c.direct,
            "faults_waited": self.faults_waited,
            "faults_zero": c.zero,
            "faults_failed": c.failed,
            "last_failure": c.last_failure,
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
            "removed_bytes": self.guest.removed.total,
            "pending_bytes": pending,
            "filled": self.filled.is_set(),
            "filled_s": (self.filled_ns - self.started_ns) / 1e9 if self.filled_ns else None,
            "fault_latency_us": histogram,
        }

    def summary_line(self) -> str:
        c = self.counts
        with self.shared.lock:
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
        self.shared.token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self.reader.main, name="pageload-uffd", daemon=True)
        interval = sys.getswitchinterval()
        if self.config.switch_interval_s is not None:
            sys.setswitchinterval(self.config.switch_interval_s)
        self._fill_thread = threading.Thread(target=self.fill.main, name="pageload-uffd-fill", daemon=True)
        self._thread.start()
        if self.fill.from_source and self.config.hold_sweep and not self.loader.done.is_set():
            self.loader.hold_sweep(True)
        self._fill_thread.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_load)
                nursery.start_soon(self._merge_loop)
                await self._finished.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.state.advance(STOP)
            self.shared.wake()
            self.decide.disk.stop()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._fill_thread.join, 2.0)
                await trio.to_thread.run_sync(self._thread.join, 2.0)
            self._merge()  # after the fault thread's last fault (it may answer one as it stops)
            self.state.advance(VANISH)
            sys.setswitchinterval(interval)
            if self.loader.sweep_held:
                self.loader.hold_sweep(False)
            # the loader's listener stays: it must not write there
            wake_fd, self.shared.wake_fd = self.shared.wake_fd, -1
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
        self.state.advance(LOAD_DONE)
        self.shared.wake()

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
        with self.shared.lock:
            self.shared.answers.append((r, va, start_ns, error))
        self.shared.wake()

    def _merge(self) -> None:
        """Trio thread: add the fault thread's faults to the loader's wait counts (each
        answered at once, so "immediate"), its touched pages to the working-set
        recorder, and its hints to the loader's prefetches."""
        shared = self.shared
        with shared.lock:
            n, shared.for_loader = shared.for_loader, 0
            touched, shared.touched = shared.touched, []
            hints, shared.hints = shared.hints, []
            shared.merge_scheduled = False
            shared.merge_later = False
        self.loader.note_answered_faults(n)
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
        if self.state.gone or self._thread is None:
            return
        with trio.move_on_after(timeout):
            # one pass of the fault thread: what it read was handed to us before this
            self._synced = synced = trio.Event()
            self.shared.want_sync = True
            self.shared.wake()
            await synced.wait()
            if self.outstanding:
                log.info("uffd: shutting down: waiting up to %g s for %d fault(s)", timeout, self.outstanding)
                while self.outstanding and not self.state.gone:
                    await self._none_outstanding.wait()
            while self.decide.disk.out and not self.state.gone:  # faults whose page a disk thread reads
                await trio.sleep(0.005)
        if self.outstanding:
            log.warning("uffd: %d fault(s) still waiting for reads at shutdown: they will be poisoned",
                        self.outstanding)

    def _set_synced(self) -> None:
        if self._synced is not None:
            self._synced.set()

    def _set_finished(self) -> None:
        self._finished.set()


async def serve_uffd(
    path: str,
    loader: PageService,
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
                        handler.state.advance(VANISH)  # its descriptor is closed now
                    os.close(fd)
                log.info("uffd: the VMM went away")
                log.info(handler.summary_line())
            listening.cancel_scope.cancel()
        return handler
    finally:
        sock.close()
        remove_socket_file(path, inode)


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
