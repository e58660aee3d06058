"""The Unix-socket server's connections (:class:`Session`), and the batches their replies go out in.
The server (:mod:`loader.socket._server`) accepts them; this is what follows.

One task per connection reads requests.  Replies are produced by whoever has them
(the read task, or the loader's completion callback for waits) and go through one
write path, :meth:`Session._push` (many replies per ``sendmsg``): they are queued,
and sent at the end of the batch that produced them, with no task switch: the read
task's batch (every request of one receive) or the loader's (every completion of one
wake-up).  Only a reply queued outside a batch, or one the socket did not take,
goes to the session's writer task, which waits for the socket to be writable.  A
wait costs the server no task: the loader calls back when its bytes are in.

After its replies go out, a connection whose client is the only one asking and
came back at once last time is polled for a moment (``busy_poll_us``) before the
task sleeps in trio's ``epoll``: a client waiting one page at a time sends its next
request within that moment, and catching it there saves the wake-up that is most of
a loaded-page wait (docs/DESIGN.md, "Busy polling").

Every connection is bounded: its queued reply bytes (past ``max_backlog_bytes`` the
session stops reading that client's requests until it reads its replies), its
pending waits, and its bad requests.  Whatever goes wrong on one connection ends
that connection only.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import socket as stdsocket
import struct
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

import protocol
from protocol import codes

from ..core._config import LoadError, WaitHandle
from ..core._replay import WorkingSetRecorder
from ..uffd import _minor as _uffd_minor

if TYPE_CHECKING:
    from ._server import Server

log = logging.getLogger("pageload.server")


_UCRED = struct.Struct("3i")
RECV_SIZE = 64 << 10
#: Queued reply bytes per connection above which its requests are no longer read.
MAX_BACKLOG_BYTES = 1 << 20
#: Default time :meth:`Server.aclose` gives all clients together to take their replies.
FLUSH_TIMEOUT_S = 1.0
#: receives served in a row without a trio checkpoint (when each finds data at once)
_RECEIVES_PER_CHECKPOINT = 8
#: how long a connection is polled after its replies before its task sleeps in epoll
#: (0: never); sized from the measured turnaround of a blocking Python client (15-25 us)
BUSY_POLL_US = 50
MAX_BUSY_POLL_US = 1000  #: the most it may be set to: the daemon's other tasks wait meanwhile
#: busy polling only for the one connection asking: another one that sent a request
#: within this long stops it (the daemon then serves them all through epoll)
BUSY_POLL_QUIET_NS = 2_000_000
#: polls in a row that found nothing before a connection is no longer polled (until
#: its client comes back within twice the poll time again)
_BUSY_POLL_MISSES = 2
_MAX_IOV = 1024  # replies gathered into one sendmsg() (the kernel's IOV_MAX)
#: Descriptors a client may have sent ahead of the requests that take them.
MAX_FDS_QUEUED = 4
_FD_SPACE = stdsocket.CMSG_SPACE(4 * MAX_FDS_QUEUED)


# Replies are never written from reply() itself: writing each at once cost one send
# per reply (29k waits/s against 59k with 8 connections x 64 waits in flight,
# examples/reply_path_bench.py); waking the writer task for each cost a task switch
# per batch (a loaded wait took 144-187 us instead of 119).  So a batch's replies are
# written once, at its end (ReplyBatch).  Numbers in docs/BENCHMARKS.md, "Server reply
# path", and docs/MEASUREMENTS.md (2026-11-23, "Latency: after the merge").


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    peer_pid: int
    peer_uid: int
    requests: int
    waits_pending: int
    errors: int
    replies_queued: int
    reply_bytes_queued: int


def peer_credentials(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _noop(handle: WaitHandle) -> None:
    pass


class ReplyBatch:
    """Replies queued while a batch is open are sent when the outermost batch ends,
    one ``sendmsg`` per session; outside a batch a queued reply wakes the session's
    writer task.  A batch never spans a checkpoint (``open``/``close`` are called
    without awaiting in between), so a reply never waits on another task."""

    __slots__ = ("depth", "dirty")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list[Session] = []

    def open(self) -> None:
        self.depth += 1

    def close(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.dirty:
            self.send()

    def send(self) -> None:
        """Write what every session of the batch queued (what a socket does not take
        goes to its writer task, which waits for the socket to be writable)."""
        dirty, self.dirty = self.dirty, []
        for session in dirty:
            session._push()
            if session._out:
                session._writer_idle.unpark()


class Session:
    """One client connection."""

    def __init__(self, server: Server, raw: stdsocket.socket, pid: int, uid: int) -> None:
        self.server = server
        self.loader = server.loader
        self.raw = raw  # non-blocking; written by _push()
        self.sock = trio.socket.from_stdlib_socket(raw)  # the same socket, for awaiting reads
        self.peer_pid = pid
        self.peer_uid = uid
        self.conn = protocol.ServerConnection()
        self.pending: dict[int, WaitHandle] = {}
        self.requests = 0
        self.errors = 0
        # Replies not yet written, in order: [bytes left, fd to pass with the first byte].
        self._out: deque[list[Any]] = deque()
        self._out_bytes = 0
        self._writer_idle = trio.lowlevel.ParkingLot()  # the writer task parks here while _out is empty
        self._drained: trio.Event | None = None  # the reader waits for the backlog to shrink
        self._flushed: trio.Event | None = None  # flush() waits for the backlog to empty
        self._broken = False  # the socket failed: nothing more can be written
        self._closing = False  # read no more requests (fatal error, too many errors, shutdown)
        self._closed = False
        self._other_requests = False  # a request other than a wait was handled since the last checkpoint
        self._busy_poll = True  # the client came back at once: poll before sleeping in epoll
        self._busy_misses = 0  # polls in a row that found nothing
        self._poller: Any = None  # a select.poll on this socket, made on the first poll
        self._on_loaded: Callable[[WaitHandle], None] = self._loaded  # one bound method, reused
        self.fds: deque[int] = deque()  # descriptors received (SCM_RIGHTS), oldest first
        self.uffd_registrations: list[_uffd_minor.Registration] = []  # and those being checked
        self.nursery: trio.Nursery | None = None  # the session's tasks (zero-copy userfaultfd ranges run here)

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(self.peer_pid, self.peer_uid, self.requests, len(self.pending),
                                 self.errors, len(self._out), self._out_bytes)

    # ----------------------------------------------------------------- replies
    def reply(self, event: Any, fd: int | None = None) -> None:
        """Queue a reply (with ``fd`` passed alongside) and write what the socket takes."""
        if self._broken or self._closed:
            return
        self._queue(self.conn.send(event), fd)

    def reply_loaded(self, request_id: int) -> None:
        """``reply(Loaded(request_id))`` through the protocol's template encoder."""
        if self._broken or self._closed:
            return
        self._queue(self.conn.send_loaded(request_id), None)

    def _queue(self, data: bytes, fd: int | None) -> None:
        self._out.append([data, fd])
        self._out_bytes += len(data)
        if len(self._out) == 1:  # nothing was queued: send at the batch's end, or wake the writer
            batch = self.server.batch
            if batch.depth:
                batch.dirty.append(self)
            else:
                self._writer_idle.unpark()

    def _push(self) -> None:
        """The one write path: send queued replies until the socket would block."""
        out = self._out
        raw = self.raw
        while out:
            head = out[0]
            try:
                if head[1] is not None:
                    ancillary = [(stdsocket.SOL_SOCKET, stdsocket.SCM_RIGHTS, array("i", [head[1]]))]
                    sent = raw.sendmsg([head[0]], ancillary)
                    head[1] = None  # it went with the first byte
                elif len(out) == 1:
                    sent = raw.send(head[0])
                else:
                    batch = []
                    for item in itertools.islice(out, _MAX_IOV):
                        if item[1] is not None:
                            break
                        batch.append(item[0])
                    sent = raw.sendmsg(batch)
            except BlockingIOError:
                break
            except OSError:  # reset, broken pipe, closed: the client is gone
                self._break()
                return
            self._out_bytes -= sent
            while sent:
                data = out[0][0]
                if len(data) <= sent:
                    sent -= len(data)
                    out.popleft()
                else:
                    out[0][0] = memoryview(data)[sent:]
                    sent = 0
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        if self._drained is not None and (self._out_bytes <= self.server.max_backlog_bytes or self._broken):
            self._drained.set()
            self._drained = None
        if self._flushed is not None and (not self._out or self._broken):
            self._flushed.set()
            self._flushed = None

    def _break(self) -> None:
        self._broken = True
        self._out.clear()
        self._out_bytes = 0
        self._writer_idle.unpark()  # let the writer task see it and end
        self._wake_waiters()

    def _loaded(self, handle: WaitHandle) -> None:
        """The loader's completion callback (runs in the loader's task: must not raise)."""
        request_id = handle.context
        assert isinstance(request_id, int)
        self.pending.pop(request_id, None)
        error = handle.error
        try:
            if error is None:
                self.reply_loaded(request_id)
            else:
                self.reply(protocol.ErrorReply(request_id, error.code, error.message, error.errno))
        except Exception as exc:
            self.internal_error(exc)

    async def writer(self) -> None:
        try:
            await self._write_when_writable()
        except Exception as exc:  # a bug must cost this one client, never the daemon
            self.internal_error(exc)
            self.close()

    async def _write_when_writable(self) -> None:
        while True:
            if self._broken or self._closed:  # also before the first park: close() may come first
                return
            if not self._out:
                await self._writer_idle.park()
                continue
            self._push()
            if not self._out:
                continue
            try:
                await trio.lowlevel.wait_writable(self.raw)
            except (trio.ClosedResourceError, OSError):
                return

    async def flush(self) -> None:
        """Wait until every queued reply is written (or the socket broke)."""
        while self._out and not self._broken:  # the shutdown and the session's own task may both wait
            if self._flushed is None:
                self._flushed = trio.Event()
            await self._flushed.wait()

    async def _wait_drained(self) -> None:
        while self._out_bytes > self.server.max_backlog_bytes and not self._broken:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    # ----------------------------------------------------------------- requests
    def handle(self, event: Any) -> None:
        self.requests += 1
        loader = self.loader
        if isinstance(event, protocol.Wait):
            self._wait(event.id, event.offset, event.length)
        elif isinstance(event, protocol.Prefetch):
            if self._in_memory(event):
                if event.working_set:
                    loader.hint_working_set(event.offset, event.length)
                else:
                    loader.prefetch(event.offset, event.length)
                self.reply(protocol.Accepted(event.id))
        elif isinstance(event, protocol.Mark):
            if isinstance(loader.recorder, WorkingSetRecorder):
                loader.recorder.stop()  # the daemon writes the file
            self.reply(protocol.Marked(event.id))
        elif isinstance(event, protocol.Hello):
            # ServerConnection delivers only a Hello with a version in common.
            version = protocol.negotiate(event.versions)
            assert version is not None
            self.reply(protocol.HelloReply(event.id, version, loader.memory_size, loader.page_size,
                                           loader.done.is_set()))
        elif isinstance(event, protocol.GetStats):
            self.reply(protocol.StatsReply(event.id, self.server.stats_dict()))
        elif isinstance(event, protocol.GetLoadedMap):
            recorder = loader.recorder
            if isinstance(recorder, WorkingSetRecorder) and recorder.active:
                # a client with the map would skip its waits for loaded pages: unrecorded touches
                self.reply(protocol.ErrorReply(event.id, codes.FORBIDDEN,
                                               "the daemon is recording a working set: every wait must reach "
                                               "it until the window closes (at its end or a 'mark')"))
                return
            lmap = self.server.loaded_map()
            self.reply(protocol.LoadedMapReply(event.id, lmap.size, lmap.granule), lmap.readonly_fd)
        elif isinstance(event, protocol.RegisterUffd):
            _uffd_minor.register(self, event, self.fds.popleft() if self.fds else None)
        elif isinstance(event, protocol.GetMemoryFd):
            fd, why = self.server.memory_fd_for(event.writable)
            if fd is None:
                self.reply(protocol.ErrorReply(event.id, codes.FORBIDDEN, why))
            else:
                self.reply(protocol.MemoryFdReply(event.id, loader.memory_size), fd)
        else:  # pragma: no cover - the protocol only yields the events above
            raise TypeError(f"unexpected event {type(event).__name__}")

    def _wait(self, request_id: int, offset: int, length: int) -> None:
        if offset + length > self.loader.memory_size:
            self._out_of_range(request_id, offset, length)
            return
        if len(self.pending) >= self.server.max_pending_waits:  # bounded memory per client
            self.reply(protocol.ErrorReply(request_id, codes.TOO_MANY_REQUESTS,
                                           f"{len(self.pending)} waits already pending on this connection"))
            return
        try:
            handle = self.loader.submit_wait(offset, length, self._on_loaded, request_id)
        except LoadError as exc:
            self.reply(protocol.ErrorReply(request_id, exc.code, exc.message, exc.errno))
            return
        if handle is None:
            self.reply_loaded(request_id)
        else:
            self.pending[request_id] = handle

    def _in_memory(self, event: Any) -> bool:
        if event.offset + event.length > self.loader.memory_size:
            self._out_of_range(event.id, event.offset, event.length)
            return False
        return True

    def _out_of_range(self, request_id: int, offset: int, length: int) -> None:
        self.client_error(request_id, codes.OUT_OF_RANGE,
                    f"range {offset:#x}+{length:#x} is outside the memory (size {self.loader.memory_size:#x})")

    def client_error(self, request_id: int | None, code: str, message: str) -> None:
        """Answer a bad request with an error; counted: too many close the connection."""
        self.errors += 1
        self.reply(protocol.ErrorReply(request_id, code, message))
        if self.errors >= self.server.max_errors and not self._closing:
            self.reply(protocol.ErrorReply(None, codes.TOO_MANY_ERRORS,
                                           f"{self.errors} bad requests: closing the connection"))
            self._closing = True

    def internal_error(self, exc: BaseException) -> None:
        """A bug met while serving this client: one log line, one error reply, hang up."""
        log.error("internal error on the connection from pid %d: %s: %.200s", self.peer_pid,
                  type(exc).__name__, exc)
        log.debug("internal error", exc_info=exc)
        self._closing = True
        with contextlib.suppress(Exception):
            self.reply(protocol.ErrorReply(None, codes.INTERNAL_ERROR, "the server failed on this connection"))

    async def read_loop(self) -> None:
        conn = self.conn
        raw = self.raw
        # descriptors from clients serve only uffd-register, which needs a writable memory fd
        # (recvmsg costs about 1.5 us more than recv; with recv the kernel closes any sent)
        recv = self._recv_with_fds if self.server.allow_writable_memory_fd else None
        limit = self.server.max_backlog_bytes
        batch = self.server.batch
        unblocked = 0  # receives in a row that found data without waiting
        drained = False  # the last receive took less than it could: wait before the next
        while not self._closing:
            if self._out_bytes > limit:  # backpressure: the client is not reading its replies
                await self._wait_drained()
                if self._broken:
                    return
            else:
                # a plain non-blocking recv, awaiting readability only when there is
                # nothing: no trio checkpoint per receive that finds data.  After a
                # short receive the socket was empty a moment ago: wait first (a
                # client waiting for its reply sends nothing more, and a failed recv
                # costs a syscall and an exception), then receive at once
                if drained:
                    drained = False
                    replied = time.perf_counter_ns()
                    # a request caught by the poll goes on without a checkpoint: it counts
                    # towards the next one (other tasks and connections get their turn)
                    if not (self._busy_poll and not self.pending and self.server.may_busy_poll(self)
                            and self._poll_for_request(replied)):
                        unblocked = 0
                        try:
                            await trio.lowlevel.wait_readable(raw)
                        except (OSError, trio.ClosedResourceError):
                            return
                        if time.perf_counter_ns() - replied < 2 * self.server.busy_poll_ns:
                            self._busy_poll = True  # it came back at once: poll next time
                try:
                    data = raw.recv(RECV_SIZE) if recv is None else recv()
                except BlockingIOError:
                    drained = True  # nothing there (a first receive, or a spurious wake-up): wait
                    continue
                except OSError:
                    return
                if not data and conn.statistics().eof:
                    return  # a second end of input: the first was served (never spin on it)
                conn.receive_data(data)  # b"": end of input (CLOSED, or the error for a cut frame)
                if self.server.asking is not self:
                    self.server.note_asking(self)
                unblocked += 1
                drained = 0 < len(data) < RECV_SIZE
            batch.open()
            try:
                if not self._handle_received(limit):
                    return
            finally:
                batch.close()  # this receive's replies, in one sendmsg
            if unblocked >= _RECEIVES_PER_CHECKPOINT or self._other_requests:
                # a client that keeps sending must not starve the others; and a request
                # other than a wait may have started tasks (uffd-register): they run
                # (to their first wait) before this connection can close
                unblocked = 0
                self._other_requests = False
                await trio.lowlevel.checkpoint()

    def _poll_for_request(self, start_ns: int) -> bool:
        """Poll the socket (no sleep, the GIL let go at each poll) until a request is
        there or ``busy_poll_us`` has passed since ``start_ns``; True if one came.
        Completed reads end it at once (the loader collects them; the background fill
        keeps its pace).  Two polls in a row that ran out of time stop polling this
        connection."""
        server = self.server
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.raw, select.POLLIN)
        end = start_ns + server.busy_poll_ns
        poll = poller.poll
        waiting = self.loader.completions_waiting
        while True:
            if poll(0):
                server.busy_poll_hits += 1
                self._busy_misses = 0
                return True
            if waiting():  # reads are done: the loader's turn (not this client's miss)
                server.busy_poll_yields += 1
                return False
            if time.perf_counter_ns() >= end:
                break
        server.busy_poll_misses += 1
        self._busy_misses += 1
        if self._busy_misses >= _BUSY_POLL_MISSES:
            self._busy_poll = False
            self._busy_misses = 0
        return False

    def _handle_received(self, limit: int) -> bool:
        """Serve every request of the received bytes; False once the connection is done.
        Past ``limit`` queued reply bytes, stops early (the loop waits for the client)."""
        conn = self.conn
        next_wait = conn.next_wait
        while not self._closing:
            if self._out_bytes > limit:
                self.server.batch.send()  # write what the socket takes now
                if self._out_bytes > limit:
                    return not self._broken  # read_loop waits until the backlog drains
            wait = next_wait()  # the frequent case, without building an event
            if wait is not None:
                self.requests += 1
                self._wait(*wait)
                continue
            if conn.nothing_buffered():
                return True  # NEED_DATA, without the unpacker's exception
            try:
                event = conn.next_event()
            except protocol.RemoteProtocolError as exc:
                self.client_error(exc.id, exc.code, exc.message)
                if exc.fatal:
                    self._closing = True
                continue
            if event is protocol.NEED_DATA:
                return True
            if event is protocol.CLOSED:
                return False
            self._other_requests = True
            self.handle(event)
        return True

    def _recv_with_fds(self) -> bytes:
        """Bytes from the client (non-blocking: BlockingIOError when there are none),
        keeping the descriptors sent with them (at most :data:`MAX_FDS_QUEUED` queued:
        the rest are closed)."""
        data, ancdata, _, _ = self.raw.recvmsg(RECV_SIZE, _FD_SPACE, stdsocket.MSG_CMSG_CLOEXEC)
        for level, kind, raw in ancdata:
            if level == stdsocket.SOL_SOCKET and kind == stdsocket.SCM_RIGHTS:
                fds = array("i")
                fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
                for fd in fds:
                    if len(self.fds) < MAX_FDS_QUEUED:
                        self.fds.append(fd)
                    else:
                        os.close(fd)
        return data

    def drop_waits(self) -> None:
        for handle in self.pending.values():
            self.loader.cancel(handle)
            handle.callback = _noop  # the handle may outlive the session in the loader: let go of it
        self.pending.clear()

    def close(self) -> None:
        """Close the socket and let go of everything; idempotent."""
        self._closing = True
        self.drop_waits()
        _uffd_minor.close_all(self.uffd_registrations)
        while self.fds:
            os.close(self.fds.popleft())
        if not self._closed:
            self._closed = True
            self._out.clear()
            self._out_bytes = 0
            self._writer_idle.unpark()
            self._wake_waiters()
            self.sock.close()
        self._on_loaded = _noop  # break the cycle self -> bound method -> self
