"""The Unix-socket server: trio glue between the sans-I/O protocol and the loader.

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
import errno
import itertools
import logging
import math
import os
import select
import socket as stdsocket
import stat
import struct
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

import protocol
from protocol import codes

from . import _uffd_minor
from ._loadmap import LoadedMap
from .core._config import LoadError, WaitHandle
from .core._replay import WorkingSetRecorder
from .core._service import PageService

log = logging.getLogger("pageload.server")

_UCRED = struct.Struct("3i")
RECV_SIZE = 64 << 10
#: Queued reply bytes per connection above which its requests are no longer read.
MAX_BACKLOG_BYTES = 1 << 20
#: Default time :meth:`Server.aclose` gives all clients together to take their replies.
FLUSH_TIMEOUT_S = 1.0
#: accept() failing for lack of descriptors or memory: wait this long, then try again.
ACCEPT_BACKOFF_S = 0.1
#: ... and say so in the log at most this often.
ACCEPT_LOG_INTERVAL_S = 10.0
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_TRANSIENT_ERRORS = frozenset({errno.ECONNABORTED, errno.EINTR, errno.EPROTO, errno.EPERM})
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


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    path: str
    connections: int
    connections_total: int
    connections_refused: int
    accept_errors: int  #: accept() failures for lack of descriptors or memory (each backed off)
    sessions: list[SessionStatistics]


class SocketInUse(OSError):
    """The socket path is taken: by a live daemon, or by something that is not a socket."""


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
        self._error(request_id, codes.OUT_OF_RANGE,
                    f"range {offset:#x}+{length:#x} is outside the memory (size {self.loader.memory_size:#x})")

    def _error(self, request_id: int | None, code: str, message: str) -> None:
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
                self._error(exc.id, exc.code, exc.message)
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


class Server:
    """Serves ``loader`` on the Unix socket at ``path``.

    Access: the socket is mode 0600, and each peer's uid (SO_PEERCRED) must be the
    daemon's, root, or one of ``allow_uids``.  For ``allow_uids`` the socket also gets
    a POSIX ACL granting those uids (and no one else) read-write, so that they can
    connect at all; where the file system has no ACLs it falls back to mode 0666,
    with SO_PEERCRED as the only gate, and says so in the log.

    The memory file's descriptor is handed out read-only (reopened O_RDONLY through
    /proc/self/fd); read-write only on request and with ``allow_writable_memory_fd``.
    """

    def __init__(
        self,
        loader: PageService,
        path: str,
        *,
        memory_fd: int | None = None,
        allow_uids: tuple[int, ...] = (),
        allow_writable_memory_fd: bool = False,
        max_errors: int = 8,
        max_pending_waits: int = 4096,
        max_backlog_bytes: int = MAX_BACKLOG_BYTES,
        extra_stats: Callable[[], dict[str, Any]] | None = None,
        listener: stdsocket.socket | None = None,
        busy_poll_us: int = BUSY_POLL_US,
    ) -> None:
        self.loader = loader
        self.path = path
        #: a listening socket handed over (socket activation): served as is, its file left alone
        self.inherited = listener
        self.memory_fd = memory_fd
        self.allow_uids = {os.getuid(), 0, *allow_uids}
        self._acl_uids = sorted(set(allow_uids) - {os.getuid(), 0})
        self.allow_writable_memory_fd = allow_writable_memory_fd
        self.max_errors = max_errors
        self.max_pending_waits = max_pending_waits
        self.max_backlog_bytes = max_backlog_bytes
        self.extra_stats = extra_stats
        self.busy_poll_ns = max(0, busy_poll_us) * 1000
        #: busy polling is off while this is non-zero (a VMM's page faults are served by
        #: threads that must get the GIL at once)
        self.busy_poll_paused = 0
        self.busy_poll_hits = 0  #: polls that found the next request
        self.busy_poll_misses = 0  #: polls that ran out of time
        self.busy_poll_yields = 0  #: polls cut short by completed reads (the loader's turn)
        self.asking: Session | None = None  #: the connection the last request came from
        self._asking_since = 0  # perf_counter_ns of the last change of ``asking``
        self.sessions: set[Session] = set()
        self._listener: stdsocket.socket | None = None
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we made
        self._readonly_fd: int | None = None
        self._connections_total = 0
        self._refused = 0
        self._accept_errors = 0
        self._loaded_map: LoadedMap | None = None
        #: replies queued while a batch is open are sent at its end
        self.batch = ReplyBatch()
        loader.set_reply_batch(self.batch)
        #: zero-copy userfaultfd ranges of every connection, made on the first ``uffd-register``
        self.uffd_minor: _uffd_minor.MinorService | None = None

    def note_asking(self, session: Session) -> None:
        """A request came from ``session``, and the one before from another connection."""
        self.asking = session
        self._asking_since = time.perf_counter_ns()

    def may_busy_poll(self, session: Session) -> bool:
        """Whether ``session`` may be polled after its replies: busy polling is on, no
        VMM's faults are being served, and for ``BUSY_POLL_QUIET_NS`` every request has
        come from this connection."""
        return (self.busy_poll_ns > 0 and not self.busy_poll_paused and self.uffd_minor is None
                and self.asking is session
                and time.perf_counter_ns() - self._asking_since >= BUSY_POLL_QUIET_NS)

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(self.path, len(self.sessions), self._connections_total, self._refused,
                                self._accept_errors, [s.statistics() for s in self.sessions])

    def stats_dict(self) -> dict[str, Any]:
        # first: the uffd handler merges the faults it answered into the loader's counts
        extra = self.extra_stats() if self.extra_stats is not None else {}
        d = self.loader.statistics().as_dict()
        d["queue"] = _plain(self.loader.queue_statistics())
        s = self.statistics()
        d["server"] = {"connections": s.connections, "connections_total": s.connections_total,
                       "connections_refused": s.connections_refused, "accept_errors": s.accept_errors,
                       "reply_bytes_queued": sum(x.reply_bytes_queued for x in s.sessions),
                       "busy_poll_us": self.busy_poll_ns // 1000, "busy_poll_hits": self.busy_poll_hits,
                       "busy_poll_misses": self.busy_poll_misses, "busy_poll_yields": self.busy_poll_yields}
        if self.uffd_minor is not None:
            d["uffd_minor"] = self.uffd_minor.statistics()
        d.update(extra)
        return d

    def loaded_map(self) -> LoadedMap:
        """The shared loaded map, made on the first request for it."""
        if self._loaded_map is None:
            self._loaded_map = LoadedMap(self.loader)
        return self._loaded_map

    def memory_fd_for(self, writable: bool) -> tuple[int | None, str]:
        """The descriptor to pass for a memfd request, or None and why not."""
        if self.memory_fd is None:
            return None, "this daemon's destination is not a shareable file"
        if writable:
            if not self.allow_writable_memory_fd:
                return None, "a writable memory fd needs a daemon run with --allow-writable-memory-fd"
            return self.memory_fd, ""
        if self._readonly_fd is None:
            self._readonly_fd = os.open(f"/proc/self/fd/{self.memory_fd}", os.O_RDONLY | os.O_CLOEXEC)
        return self._readonly_fd, ""

    # ----------------------------------------------------------------- the socket file
    async def _bind(self) -> stdsocket.socket:
        _clear_stale_socket(self.path)
        sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            st = os.lstat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            os.chmod(self.path, 0o600)
            if self._acl_uids:
                _grant_uids(self.path, self._acl_uids)
            sock.listen(stdsocket.SOMAXCONN)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            self._remove_socket()
            raise
        return sock

    def _remove_socket(self) -> None:
        """Unlink the socket file, only if it is still the one this server created."""
        if self._inode is None:
            return
        _remove_socket_file(self.path, self._inode)
        self._inode = None

    def _stop_listening(self) -> None:
        if self._listener is not None and self._listener.fileno() != -1:
            trio.lowlevel.notify_closing(self._listener)
            self._listener.close()

    # ----------------------------------------------------------------- serving
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report started, accept until cancelled or closed; removes the socket file at exit
        (unless the socket was handed over: its owner, e.g. systemd, keeps it)."""
        if self.inherited is not None:
            self.inherited.setblocking(False)
            self._listener = self.inherited
        else:
            self._listener = await self._bind()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await self._accept_loop(self._listener, nursery)
                # The listener was closed by aclose(), which flushes and closes the sessions.
        finally:
            self._stop_listening()
            self._remove_socket()
            if self._readonly_fd is not None:
                os.close(self._readonly_fd)
                self._readonly_fd = None
            if self._loaded_map is not None:
                self._loaded_map.close_fds()

    async def _accept_loop(self, listener: stdsocket.socket, nursery: trio.Nursery) -> None:
        last_logged = -math.inf
        while True:
            try:
                raw, _ = listener.accept()
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(listener)
                except trio.ClosedResourceError:
                    return
                continue
            except OSError as exc:
                if listener.fileno() == -1:
                    return
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    self._accept_errors += 1
                    now = trio.current_time()
                    if now - last_logged >= ACCEPT_LOG_INTERVAL_S:
                        last_logged = now
                        log.warning("cannot accept connections: %s; retrying every %.1f s (%d failures so far)",
                                    os.strerror(exc.errno or 0), ACCEPT_BACKOFF_S, self._accept_errors)
                    await trio.sleep(ACCEPT_BACKOFF_S)
                    continue
                if exc.errno in _ACCEPT_TRANSIENT_ERRORS:
                    continue
                raise
            raw.setblocking(False)
            nursery.start_soon(self._session, raw)
            await trio.lowlevel.checkpoint()  # a flood of connections must not starve the others

    async def aclose(self, deadline: float | None = None) -> None:
        """Stop accepting; give every client until ``deadline`` (trio time; by default
        :data:`FLUSH_TIMEOUT_S` from now), all at once, to take its queued replies;
        then close them all and remove the socket file."""
        if deadline is None:
            deadline = trio.current_time() + FLUSH_TIMEOUT_S
        self._stop_listening()
        sessions = list(self.sessions)
        for session in sessions:
            session._closing = True
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:
                for session in sessions:
                    nursery.start_soon(session.flush)
        for session in sessions:
            session.close()
        self._remove_socket()

    async def _session(self, raw: stdsocket.socket) -> None:
        try:
            pid, uid, _ = peer_credentials(raw)
        except OSError:
            raw.close()
            return
        if uid not in self.allow_uids:
            self._refused += 1
            log.warning("refused a connection from pid %d uid %d", pid, uid)
            raw.close()
            return
        self._connections_total += 1
        session = Session(self, raw, pid, uid)
        self.sessions.add(session)
        try:
            async with trio.open_nursery() as nursery:
                session.nursery = nursery
                nursery.start_soon(session.writer)
                try:
                    await session.read_loop()
                except Exception as exc:  # a bug must cost this one client, never the daemon
                    session.internal_error(exc)
                session.drop_waits()
                if session._closing and not session._closed:  # we hang up: let the last replies be read
                    with trio.move_on_after(FLUSH_TIMEOUT_S):
                        await session.flush()
                    await _lingering_close(session.sock)
                session.close()  # ends the writer
        finally:
            session.close()
            self.sessions.discard(session)
            if self.asking is session:
                self.asking = None


async def _lingering_close(sock: trio.socket.SocketType, timeout: float = 0.5) -> None:
    """Half-close, then discard what the peer still sends for a moment: closing with
    unread input would reset the connection and could destroy our last reply."""
    with contextlib.suppress(OSError):
        sock.shutdown(stdsocket.SHUT_WR)
    with trio.move_on_after(timeout), contextlib.suppress(OSError, trio.ClosedResourceError):
        while await sock.recv(RECV_SIZE):
            pass


def _plain(record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


def _remove_socket_file(path: str, inode: tuple[int, int]) -> None:
    """Unlink the socket file at ``path`` only if it is still ``inode`` (st_dev, st_ino),
    the one this daemon bound: another daemon's socket put there since is left alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == inode:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        log.warning("%s is no longer the socket this daemon created: left in place", path)


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead daemon; refuse to touch a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(errno.EEXIST, f"{path} exists and is not a socket")
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: a dead daemon's leftover
        return
    except BlockingIOError:
        pass  # EAGAIN: someone listens, with a full backlog
    finally:
        probe.close()
    raise SocketInUse(errno.EADDRINUSE, f"{path}: another daemon is serving on this socket")


# POSIX ACL in its extended-attribute form (linux/posix_acl_xattr.h): a version, then
# (tag, permissions, id) entries sorted by tag, then by id.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF
_RW = 0o6


def _grant_uids(path: str, uids: list[int]) -> None:
    """Give ``uids`` read-write on the socket file (connect needs write), no one else."""
    entries = [(_ACL_USER_OBJ, _RW, _ACL_UNDEFINED_ID)]
    entries += [(_ACL_USER, _RW, uid) for uid in sorted(uids)]
    entries += [(_ACL_GROUP_OBJ, 0, _ACL_UNDEFINED_ID), (_ACL_MASK, _RW, _ACL_UNDEFINED_ID),
                (_ACL_OTHER, 0, _ACL_UNDEFINED_ID)]
    data = struct.pack("<I", _ACL_VERSION) + b"".join(_ACL_ENTRY.pack(*e) for e in entries)
    try:
        os.setxattr(path, _ACL_XATTR, data, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        os.chmod(path, 0o666)
        log.warning("%s: this file system has no POSIX ACLs; the socket is mode 0666 so that uids %s can "
                    "connect, and only the peer-credential check keeps other users out",
                    path, ", ".join(map(str, uids)))
