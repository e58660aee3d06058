"""Zero-copy userfaultfd mode: VMMs that map the memory file itself (docs/UFFD.md).

A VMM maps the daemon's memory file ``MAP_SHARED`` (descriptor from a ``memfd``
request), registers that mapping with a userfaultfd in MISSING and MINOR mode and
hands the userfaultfd over with a ``uffd-register`` request on the wait socket
(:class:`protocol.RegisterUffd`).  The memory file *is* guest memory: no page is
ever copied.  :class:`MinorRegistration` then answers the mapping's faults:

* a page with data: a wait at the head of the loader's queue (at once if loaded),
  then ``UFFDIO_CONTINUE``, which maps the memory file's page into the VMM;
  a MINOR fault (the page is in the page cache) and a MISSING fault (it is not:
  the loader has not written it yet) are served the same way;
* a hole: ``UFFDIO_ZEROPAGE`` (on shmem it puts a zeroed page into the memory file;
  the loader never writes holes), or ``UFFDIO_CONTINUE`` when that page already
  exists in the file (``EEXIST``);
* a page that cannot be read: ``UFFDIO_POISON`` (the faulting thread gets SIGBUS).

Every loaded range is also mapped into the VMM in the background with
``UFFDIO_CONTINUE`` (no copy: it only fills the VMM's page tables), so the guest
stops faulting once the load is done.

A page becomes visible to the VMM only once it is loaded (or is a hole), and the
loader writes only pages that are not loaded yet (never holes), so it never
overwrites a page the guest can see: the guest's writes survive the rest of the load.

Registrations belong to the connection that made them: when it closes, faults
still waiting are poisoned and the userfaultfd is closed.  The VMM must keep its
own descriptor of the userfaultfd open as long as the mapping exists: if the daemon
held the last one, closing it would let later faults allocate zero pages in the
memory file (wrong memory), where an open one leaves them waiting.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import mmap
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

import protocol
from protocol import codes

from ..core._config import LoadError, WaitHandle
from ..core._rangeset import RangeSet
from ..core._service import PageService
from ..core._stats import LatencyHistogram
from . import _ioctl as _uffd
from ._answer import GONE, Answerer

if TYPE_CHECKING:
    from ..socket._session import Session

log = logging.getLogger("pageload.uffd")

#: Registrations one connection may hold at once.
MAX_REGISTRATIONS = 16
#: Largest background ``UFFDIO_CONTINUE`` (a fault waits for at most one).
MAP_CHUNK = 2 << 20
#: After a fault, the loaded pages of the aligned window around it are mapped too.
FAULT_AROUND = 64 << 10
#: ``uffd-register`` reads the VMM's ``/proc/PID/maps`` (in a worker thread) up to the
#: range: at most this many bytes of it (``vm.max_map_count`` 65530 mappings of about
#: 100 bytes each fit) ...
MAX_MAPS_BYTES = 16 << 20
#: ... for at most this long
MAPS_TIMEOUT_S = 2.0
#: Worker threads reading mappings at once, for all connections.
MAPS_THREADS = 2
#: Features the VMM's ``UFFDIO_API`` must have asked for.
REQUIRED_FEATURES = _uffd.FEATURE_MINOR_SHMEM


class RegistrationError(Exception):
    """A ``uffd-register`` request that cannot be served: ``code`` and one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def uffd_features(fd: int) -> int | None:
    """The features a userfaultfd was opened with (``API:`` in its fdinfo), or None."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("API:"):
                    return int(line.split(":")[2], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


def mapping_covers(pid: int, address: int, length: int, offset: int, st: os.stat_result, *,
                   max_bytes: int | None = None, timeout: float | None = None) -> str | None:
    """Why ``[address, address+length)`` of process ``pid`` is not a shared mapping of
    the file ``st`` at file offset ``offset`` (from ``/proc/PID/maps``), or None if it is.

    Blocking (the kernel walks the process's mappings as they are read): called in a
    worker thread.  Bounded: the listing is read in address order only up to the end
    of the range, and at most ``max_bytes`` of it (:data:`MAX_MAPS_BYTES`) for at most
    ``timeout`` seconds (:data:`MAPS_TIMEOUT_S`); past either the answer is a refusal."""
    max_bytes = MAX_MAPS_BYTES if max_bytes is None else max_bytes
    timeout = MAPS_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    pos, end = address, address + length
    read = 0
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                read += len(line)
                if read > max_bytes:
                    return f"pid {pid} has more than {max_bytes} bytes of mappings below {pos:#x}"
                if time.monotonic() > deadline:
                    return f"the mappings of pid {pid} could not be read within {timeout:g} s"
                fields = line.split(None, 5)
                if len(fields) < 5:
                    continue
                lo_s, _, hi_s = fields[0].partition("-")
                lo, hi = int(lo_s, 16), int(hi_s, 16)
                if hi <= pos:
                    continue
                if lo > pos:
                    break  # the listing ascends: nothing maps pos
                perms, file_off, mdev, inode = fields[1], int(fields[2], 16), fields[3], int(fields[4])
                if mdev != dev or inode != st.st_ino:
                    return f"address {pos:#x} is not a mapping of the memory file"
                if len(perms) < 4 or perms[3] != "s":
                    return f"the mapping at {pos:#x} is private, not MAP_SHARED"
                if file_off + (pos - lo) != offset + (pos - address):
                    return (f"address {pos:#x} maps memory offset {file_off + (pos - lo):#x}, "
                            f"not {offset + (pos - address):#x}")
                pos = hi
                if pos >= end:
                    return None
    except OSError as exc:
        return f"cannot read the mappings of pid {pid}: {exc.strerror}"
    except ValueError:
        return f"cannot parse the mappings of pid {pid}"
    return f"address {pos:#x} is not mapped"


class MinorRegistration:
    """Serves one userfaultfd range of one VMM (see the module doc)."""

    def __init__(self, loader: PageService, uffd_fd: int, address: int, length: int, offset: int,
                 page_size: int) -> None:
        self.loader = loader
        self.uffd = _uffd.Uffd(uffd_fd)
        self.histogram = LatencyHistogram()
        #: the answers (the ones the copying handler makes too), with its counts
        self.answers = Answerer(self.uffd, self, histogram=self.histogram)
        self.base = address
        self.size = length
        self.offset = offset
        self.page = page_size
        self.pending = RangeSet()  #: loaded memory offsets not yet mapped into the VMM
        self._map_queue: deque[tuple[int, int]] = deque()
        self._more = trio.Event()
        self._waits: dict[int, tuple[WaitHandle, int, int]] = {}  # id(handle) -> (handle, va, start_ns)
        self.scope = trio.CancelScope()
        self.closed = False
        self.gone = False  #: the VMM's memory is gone (ESRCH/ENOENT), or the range is no longer served
        self.faults = 0
        self.faults_minor = 0  #: the page was in the memory file already
        self.faults_waited = 0  #: had to wait for the loader
        self.faults_zero = 0  #: holes
        self.faults_failed = 0  #: poisoned
        self.faults_stray = 0  #: outside the registered range: poisoned
        self.remap_events = 0
        self.fork_events = 0  #: UFFD_EVENT_FORK: the child's userfaultfd closed at once
        self.mapped_bytes = 0  #: mapped into the VMM ahead of faults
        self._seed()

    @property
    def eexist(self) -> int:
        return self.answers.counts.eexist

    @property
    def eagain(self) -> int:
        return self.answers.counts.eagain

    def vanished(self, why: str) -> None:
        """An ioctl said the VMM's memory is gone (the :class:`Answerer`'s owner)."""
        self.gone = True

    # ------------------------------------------------------------ loaded ranges
    def _seed(self) -> None:
        lo, hi = self.offset, self.offset + self.size
        for a, b in self.loader.loaded_in(lo, hi):
            self.on_loaded(a, b)

    def on_loaded(self, lo: int, hi: int) -> None:
        a, b = max(lo, self.offset), min(hi, self.offset + self.size)
        if a < b and not self.closed:
            self.pending.add(a, b)
            self._map_queue.append((a, b))
            self._more.set()

    # ------------------------------------------------------------ statistics
    def statistics(self) -> dict[str, Any]:
        return {
            "address": self.base, "size": self.size, "offset": self.offset,
            "faults": self.faults, "faults_minor": self.faults_minor, "faults_waited": self.faults_waited,
            "faults_zero": self.faults_zero, "faults_failed": self.faults_failed,
            "faults_stray": self.faults_stray, "faults_outstanding": len(self._waits),
            "mapped_bytes": self.mapped_bytes, "pending_bytes": self.pending.total,
            "eexist": self.eexist, "eagain": self.eagain, "remap_events": self.remap_events,
            "fork_events": self.fork_events,
            "fault_latency_us": self.histogram.as_dict(),
        }

    # ------------------------------------------------------------ the loops
    async def run(self) -> None:
        if self.closed:  # closed before this task first ran: its descriptor is gone (or reused)
            return
        with self.scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._map_loaded)
                    await self._read_events()
                    nursery.cancel_scope.cancel()
            finally:
                self.close()

    async def _read_events(self) -> None:
        uffd = self.uffd
        while not self.gone and not self.closed:
            await trio.lowlevel.wait_readable(uffd.fd)
            try:
                messages = uffd.read_messages()
            except OSError:
                return
            while messages:
                for m in messages:
                    if m.event == _uffd.EVENT_PAGEFAULT:
                        self.faults += 1
                        self._fault(m.b, m.a, time.perf_counter_ns())
                    elif m.event == _uffd.EVENT_REMAP:
                        self._remap(m.a, m.b, m.c)
                    elif m.event == _uffd.EVENT_FORK:  # the child's userfaultfd, now ours: closed
                        _uffd.close_forked(m.a)
                        self.fork_events += 1
                        if self.fork_events == 1:
                            log.warning("uffd: the VMM forked (UFFD_EVENT_FORK): the child's userfaultfd is "
                                        "closed, its copy of the range is not served (said once)")
                messages = uffd.read_messages()
            if self.answers.retry:
                retry, self.answers.retry = self.answers.retry, []
                for va, start in retry:
                    self._fault(va, 0, start)

    async def _map_loaded(self) -> None:
        """Map loaded ranges into the VMM ahead of its faults, in load order."""
        while not self.gone:
            if not self._map_queue:
                self._more = trio.Event()
                await self._more.wait()
                continue
            lo, hi = self._map_queue.popleft()
            for plo, phi in list(self.pending.overlapping(lo, hi)):
                a, b = max(lo, plo), min(hi, phi)
                while a < b and not self.gone:
                    n = min(b - a, MAP_CHUNK)
                    a += self._continue_range(a, a + n)
                    await trio.lowlevel.checkpoint()

    def _continue_range(self, lo: int, hi: int) -> int:
        """UFFDIO_CONTINUE memory ``[lo, hi)`` as far as it goes; returns bytes dealt with."""
        answers = self.answers
        status = answers.continue_(self.base + (lo - self.offset), hi - lo)
        done = answers.copied
        if status == GONE:
            return hi - lo
        if status and done == 0:
            if status == errno_mod.EAGAIN:  # the VMM changes its mappings: later
                answers.counts.eagain += 1
                self._map_queue.append((lo, hi))
                self._more.set()
                return hi - lo
            if status == errno_mod.EEXIST:
                answers.counts.eexist += 1
            # EEXIST: the VMM faulted it in first; EFAULT: not in the file (removed)
            done = self.page
        self.mapped_bytes += done
        self.pending.remove(lo, lo + done)
        return done

    # ------------------------------------------------------------ faults
    def _fault(self, address: int, flags: int, start_ns: int) -> None:
        page = self.page
        va = address & ~(page - 1)
        if not self.base <= va < self.base + self.size:
            # registered by the VMM but not handed to us: waking it would only fault
            # again, forever; SIGBUS says what is wrong
            self.faults_stray += 1
            if self.faults_stray == 1:
                log.error("uffd: fault at %#x, outside the range %#x+%#x the VMM registered here: poisoned",
                          va, self.base, self.size)
            self._poison_or_wake(va)
            return
        off = self.offset + (va - self.base)
        if not any(True for _ in self.loader.layout.data_in(off, off + page)):
            self.faults_zero += 1
            self._zero(va, start_ns)
            return
        try:
            handle = self.loader.submit_wait(off, page, self._on_waited, (va, start_ns))
        except LoadError as exc:
            self._fail(va, start_ns, exc)
            return
        if handle is None:
            if flags & _uffd.PAGEFAULT_FLAG_MINOR:
                self.faults_minor += 1
            self._answer(va, start_ns)
        else:
            self.faults_waited += 1
            self._waits[id(handle)] = (handle, va, start_ns)

    def _on_waited(self, handle: WaitHandle) -> None:
        entry = self._waits.pop(id(handle), None)
        if entry is None or self.closed:
            return
        _, va, start_ns = entry
        if handle.error is not None:
            self._fail(va, start_ns, handle.error)
        else:
            self._answer(va, start_ns)

    def _answer(self, va: int, start_ns: int) -> None:
        """The page is loaded: map the memory file's page into the VMM (wakes the thread)."""
        page = self.page
        off = self.offset + (va - self.base)
        answers = self.answers
        status = answers.continue_(va, page)
        if status == errno_mod.EEXIST:  # mapped ahead of the fault already
            answers.counts.eexist += 1
            answers.wake(va, page)
        elif status == errno_mod.EAGAIN:
            answers.counts.eagain += 1
            answers.retry.append((va, start_ns))
            return
        elif status == errno_mod.EFAULT:  # the VMM removed the page from the file: zeros
            self._zero(va, start_ns)
            return
        elif status == GONE:
            return
        elif status:
            assert answers.error is not None
            log.error("uffd: UFFDIO_CONTINUE at %#x failed: %s", va, answers.error.strerror)
            answers.wake(va, page)
        self.pending.remove(off, off + page)
        self.histogram.record(time.perf_counter_ns() - start_ns)
        # the neighbours the loader read with it: mapped now rather than in load order
        wlo = max(off & ~(FAULT_AROUND - 1), self.offset)
        whi = min(wlo + FAULT_AROUND, self.offset + self.size)
        for plo, phi in list(self.pending.overlapping(wlo, whi)):
            a, b = max(plo, wlo), min(phi, whi)
            while a < b and not self.gone:
                a += self._continue_range(a, b)

    def _zero(self, va: int, start_ns: int) -> None:
        answers = self.answers
        status = answers.zero(va, self.page)
        if status == errno_mod.EEXIST:  # the page exists in the file: map it
            again = answers.continue_(va, self.page)
            if again == errno_mod.EAGAIN:
                answers.retry.append((va, start_ns))
                return
            if again:
                answers.wake(va, self.page)
        elif status == errno_mod.EAGAIN:
            answers.counts.eagain += 1
            answers.retry.append((va, start_ns))
            return
        elif status == GONE:
            return
        elif status:
            answers.wake(va, self.page)
        self.histogram.record(time.perf_counter_ns() - start_ns)

    def _fail(self, va: int, start_ns: int, error: LoadError) -> None:
        """The page cannot be loaded: poison it so that the faulting thread gets SIGBUS."""
        self.faults_failed += 1
        log.error("uffd: page at %#x (memory %#x) not served: %s", va, self.offset + (va - self.base),
                  error.message)
        answers = self.answers
        status = answers.poison(va, self.page)
        if status == errno_mod.EAGAIN:
            answers.retry.append((va, start_ns))
            return
        if status:
            if status != GONE:
                # no UFFDIO_POISON: nothing can make the thread see an error, and zeros
                # would be wrong memory: stop serving this VMM (its faults stay blocked)
                assert answers.error is not None
                log.error("uffd: cannot poison %#x (%s): no longer serving this range", va,
                          answers.error.strerror)
            self.gone = True
            return
        self.histogram.record(time.perf_counter_ns() - start_ns)

    def _poison_or_wake(self, va: int) -> None:
        if self.answers.poison(va, self.page):
            self.answers.wake(va, self.page)

    def _remap(self, old: int, new: int, length: int) -> None:
        """mremap moved ``[old, old+length)`` to ``new`` (only a VMM that asked for
        UFFD_FEATURE_EVENT_REMAP gets these): the whole range moves with it; a move of
        part of it cannot be followed, so the range is no longer served."""
        self.remap_events += 1
        if old + length <= self.base or self.base + self.size <= old:
            return
        if old == self.base and length == self.size:
            self.base = new
            return
        log.error("uffd: the VMM moved part of the range %#x+%#x: no longer serving it", self.base, self.size)
        self.gone = True

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        """Stop serving: poison the faults still waiting, close the userfaultfd; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.scope.cancel()
        waits, self._waits = self._waits, {}
        for handle, va, _ in waits.values():
            self.loader.cancel(handle)
            if not self.gone:
                self.answers.poison(va, self.page)
        self._map_queue.clear()
        self.pending = RangeSet()
        h = self.histogram
        log.info("uffd: zero-copy range %#x+%#x closed: %d faults (%d minor, %d waited, %d zero, %d failed), "
                 "%s; %d MiB mapped ahead of faults", self.base, self.size, self.faults,
                 self.faults_minor, self.faults_waited, self.faults_zero, self.faults_failed,
                 h.describe(50, 99), self.mapped_bytes >> 20)
        if self.uffd.fd >= 0:
            os.close(self.uffd.fd)
            self.uffd.fd = -1


class MinorService:
    """Every zero-copy registration of one server, fed by one loaded listener."""

    def __init__(self, loader: PageService) -> None:
        self.loader = loader
        self.registrations: set[MinorRegistration] = set()
        self.total = 0
        self.refused = 0
        #: the worker threads that read VMMs' mappings (one service per server and trio run)
        self.maps_limiter = trio.CapacityLimiter(MAPS_THREADS)
        loader.add_loaded_listener(self._on_loaded)

    def _on_loaded(self, lo: int, hi: int) -> None:
        for r in self.registrations:
            r.on_loaded(lo, hi)

    def statistics(self) -> dict[str, Any]:
        return {"registrations": len(self.registrations), "registrations_total": self.total,
                "refused": self.refused, "ranges": [r.statistics() for r in self.registrations]}


def _service(session: Session) -> MinorService:
    return session.server.minor_service()


class PendingRegistration:
    """A ``uffd-register`` whose mappings are being read: it holds its place (the
    connection's count, the range for overlaps) and its descriptor until answered."""

    def __init__(self, address: int, length: int, fd: int) -> None:
        self.base = address
        self.size = length
        self.fd = fd
        self.closed = False
        self.scope = trio.CancelScope()

    def close(self) -> None:
        """The connection went: stop waiting, close the descriptor; idempotent."""
        self.scope.cancel()
        self.closed = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


Registration = MinorRegistration | PendingRegistration


def check_request(session: Session, event: protocol.RegisterUffd, fd: int | None,
                  mine: list[Registration]) -> int:
    """Validate a ``uffd-register`` request (all but the VMM's mappings, which
    :func:`mapping_covers` reads in a worker thread); returns the page size to serve it with."""
    server = session.server
    loader = session.loader
    if not server.allow_writable_memory_fd:
        raise RegistrationError(codes.FORBIDDEN, "zero-copy userfaultfd mode needs a daemon run with "
                                "--allow-writable-memory-fd")
    if server.memory_fd is None:
        raise RegistrationError(codes.FORBIDDEN, "this daemon's destination is not a shareable file")
    if fd is None:
        raise RegistrationError(codes.BAD_MESSAGE, "uffd-register came without a file descriptor")
    if not _uffd.is_userfaultfd(fd):
        raise RegistrationError(codes.BAD_MESSAGE, "the descriptor is not a userfaultfd")
    features = uffd_features(fd)
    if features is None or not features & REQUIRED_FEATURES:
        raise RegistrationError(codes.UNSUPPORTED, "the userfaultfd was opened without "
                                "UFFD_FEATURE_MINOR_SHMEM (the kernel lacks it, or UFFDIO_API did not ask)")
    if len(mine) >= MAX_REGISTRATIONS:
        raise RegistrationError(codes.TOO_MANY_REQUESTS,
                                f"this connection already has {len(mine)} userfaultfd registrations")
    page = max(loader.page_size, mmap.PAGESIZE)
    if (event.address | event.length | event.offset) % page:
        raise RegistrationError(codes.BAD_MESSAGE, f"addr, len and off must be multiples of the page size {page}")
    if event.offset + event.length > (loader.memory_size + page - 1) & ~(page - 1):  # the last page may be partial
        raise RegistrationError(codes.OUT_OF_RANGE, f"range {event.offset:#x}+{event.length:#x} is outside "
                                f"the memory (size {loader.memory_size:#x})")
    for r in mine:
        if event.address < r.base + r.size and r.base < event.address + event.length:
            raise RegistrationError(codes.BAD_MESSAGE, f"the range overlaps the one registered at {r.base:#x}")
    return page


def _refuse(session: Session, service: MinorService, event: protocol.RegisterUffd, exc: RegistrationError) -> None:
    service.refused += 1
    if exc.code in (codes.BAD_MESSAGE, codes.OUT_OF_RANGE):  # the client's fault: counted as bad requests
        session.client_error(event.id, exc.code, exc.message)
    else:
        session.reply(protocol.ErrorReply(event.id, exc.code, exc.message))


def register(session: Session, event: protocol.RegisterUffd, fd: int | None) -> None:
    """Serve ``uffd-register``: check it, then (in a task of the connection) read the
    VMM's mappings in a worker thread, start serving the range and answer.  Takes
    ``fd`` (closed on refusal, or when the connection goes first)."""
    mine: list[Registration] = session.uffd_registrations
    service = _service(session)
    try:
        mine[:] = [r for r in mine if not r.closed]
        page = check_request(session, event, fd, mine)
    except RegistrationError as exc:
        if fd is not None:
            os.close(fd)
        _refuse(session, service, event, exc)
        return
    assert fd is not None and session.nursery is not None
    pending = PendingRegistration(event.address, event.length, fd)
    mine.append(pending)
    session.nursery.start_soon(_register_mapped, session, service, event, pending, page)


async def _register_mapped(session: Session, service: MinorService, event: protocol.RegisterUffd,
                           pending: PendingRegistration, page: int) -> None:
    """The rest of :func:`register`: the VMM's mappings, read off the event loop."""
    mine: list[Registration] = session.uffd_registrations
    server = session.server
    assert server.memory_fd is not None
    why: str | None = None
    try:
        with pending.scope:  # cancelled when the connection goes (close_all)
            why = await trio.to_thread.run_sync(
                mapping_covers, session.peer_pid, event.address, event.length, event.offset,
                os.fstat(server.memory_fd), limiter=service.maps_limiter, abandon_on_cancel=True)
    except BaseException:  # the daemon is stopping
        pending.close()
        raise
    finally:
        if pending in mine:
            mine.remove(pending)
    if pending.closed:  # the connection went meanwhile: nothing to answer
        return
    fd, pending.fd = pending.fd, -1
    pending.closed = True
    if why is not None:
        os.close(fd)
        _refuse(session, service, event, RegistrationError(codes.BAD_MESSAGE, why))
        return
    os.set_blocking(fd, False)
    reg = MinorRegistration(session.loader, fd, event.address, event.length, event.offset, page)
    mine.append(reg)
    service.registrations.add(reg)
    service.total += 1
    log.info("uffd: pid %d registered %#x+%#x (memory offset %#x) for zero-copy faults",
             session.peer_pid, event.address, event.length, event.offset)
    session.reply(protocol.UffdRegistered(event.id))
    try:
        await reg.run()
    finally:
        service.registrations.discard(reg)


def close_all(registrations: list[Registration]) -> None:
    for reg in registrations:
        reg.close()
    registrations.clear()
