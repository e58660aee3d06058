"""The Unix-socket server: trio glue between the sans-I/O protocol and the loader.

One task per connection reads requests; replies are queued by whoever produces them
(the loader's completion callback, for waits) and written by one writer task per
connection, so replies go out in whatever order they are ready.  A wait costs the
server no task: the loader calls back when its bytes are in.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket as stdsocket
import stat
import struct
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

import protocol
from protocol import codes

from ._loader import Loader, LoadError, WaitHandle
from ._workingset import WorkingSetRecorder

log = logging.getLogger("pageload.server")

_UCRED = struct.Struct("3i")
RECV_SIZE = 64 << 10


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    peer_pid: int
    peer_uid: int
    requests: int
    waits_pending: int
    errors: int
    replies_queued: int


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    path: str
    connections: int
    connections_total: int
    connections_refused: int
    sessions: list[SessionStatistics]


class SocketInUse(OSError):
    pass


def peer_credentials(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


class Session:
    """One client connection."""

    def __init__(self, server: Server, sock: trio.socket.SocketType, pid: int, uid: int) -> None:
        self.server = server
        self.loader = server.loader
        self.sock = sock
        self.peer_pid = pid
        self.peer_uid = uid
        self.conn = protocol.ServerConnection()
        self.pending: dict[int, WaitHandle] = {}
        self.requests = 0
        self.errors = 0
        self._out: deque[tuple[bytes, int | None]] = deque()
        self._out_ready = trio.Event()
        self._broken = False
        self._writing = False  # the writer task holds data it has not finished sending
        self._fileno = sock.fileno()
        self._closing = False
        self._on_loaded: Callable[[WaitHandle], None] = self._loaded  # one bound method, reused

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(self.peer_pid, self.peer_uid, self.requests, len(self.pending),
                                 self.errors, len(self._out))

    # ----------------------------------------------------------------- replies
    def reply(self, event: Any, fd: int | None = None) -> None:
        """Send a reply now if the socket takes it whole, else queue it for the writer."""
        if self._broken:
            return
        data = self.conn.send(event)
        if fd is None and not self._out and not self._writing:
            try:  # fast path: no task switch (the socket is non-blocking)
                sent = os.write(self._fileno, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._broken = True
                return
            if sent == len(data):
                return
            data = data[sent:]
        self._out.append((data, fd))
        self._out_ready.set()

    def _loaded(self, handle: WaitHandle) -> None:
        request_id = handle.context
        assert isinstance(request_id, int)
        self.pending.pop(request_id, None)
        error = handle.error
        if error is None:
            self.reply(protocol.Loaded(request_id))
        else:
            self.reply(protocol.ErrorReply(request_id, error.code, error.message, error.errno))

    async def writer(self) -> None:
        sock = self.sock
        out = self._out
        while True:
            await self._out_ready.wait()
            self._out_ready = trio.Event()
            self._writing = True
            while out:
                data, fd = out.popleft()
                try:
                    if fd is not None:
                        ancillary = [(stdsocket.SOL_SOCKET, stdsocket.SCM_RIGHTS, array("i", [fd]))]
                        sent = await sock.sendmsg([data], ancillary)
                        data = data[sent:]
                    elif out and out[0][1] is None:  # batch what is queued behind it into one send
                        batch = [data]
                        while out and out[0][1] is None:
                            batch.append(out.popleft()[0])
                        data = b"".join(batch)
                    view = memoryview(data)
                    while view:
                        sent = await sock.send(view)
                        view = view[sent:]
                except (BrokenPipeError, ConnectionResetError, trio.ClosedResourceError):
                    self._broken = True
                    out.clear()
                    return
            self._writing = False

    async def flush(self, timeout: float = 1.0) -> None:
        """Give queued replies up to ``timeout`` seconds to go out."""
        with trio.move_on_after(timeout):
            while (self._out or self._writing) and not self._broken:
                await trio.sleep(0.001)

    # ----------------------------------------------------------------- requests
    def handle(self, event: Any) -> None:
        self.requests += 1
        loader = self.loader
        if isinstance(event, protocol.Wait):
            if not self._in_memory(event):
                return
            if len(self.pending) >= self.server.max_pending_waits:  # bounded memory per client
                self.reply(protocol.ErrorReply(event.id, codes.TOO_MANY_REQUESTS,
                                               f"{len(self.pending)} waits already pending on this connection"))
                return
            try:
                handle = loader.submit_wait(event.offset, event.length, self._on_loaded, event.id)
            except LoadError as exc:
                self.reply(protocol.ErrorReply(event.id, exc.code, exc.message, exc.errno))
                return
            if handle is None:
                self.reply(protocol.Loaded(event.id))
            else:
                self.pending[event.id] = handle
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
            version = protocol.negotiate(event.versions)
            if version is None:
                self._error(event.id, codes.UNSUPPORTED_VERSION,
                            f"no common version: client offers {list(event.versions)}, "
                            f"daemon speaks {list(protocol.SUPPORTED_VERSIONS)}")
                return
            self.reply(protocol.HelloReply(event.id, version, loader.memory_size, loader.page_size,
                                           loader.done.is_set()))
        elif isinstance(event, protocol.GetStats):
            self.reply(protocol.StatsReply(event.id, self.server.stats_dict()))
        elif isinstance(event, protocol.GetMemoryFd):
            fd = self.server.memory_fd
            if fd is None:
                self._error(event.id, codes.BAD_MESSAGE, "this daemon's destination is not a shareable file")
            else:
                self.reply(protocol.MemoryFdReply(event.id, loader.memory_size), fd)
        else:  # pragma: no cover - the protocol only yields the events above
            self._error(getattr(event, "id", None), codes.UNKNOWN_OP, f"unexpected {type(event).__name__}")

    def _in_memory(self, event: Any) -> bool:
        size = self.loader.memory_size
        if event.offset + event.length > size:
            self._error(event.id, codes.OUT_OF_RANGE,
                        f"range {event.offset:#x}+{event.length:#x} is outside the memory (size {size:#x})")
            return False
        return True

    def _error(self, request_id: int | None, code: str, message: str) -> None:
        self.errors += 1
        self.reply(protocol.ErrorReply(request_id, code, message))
        if self.errors >= self.server.max_errors and not self._closing:
            self.reply(protocol.ErrorReply(None, codes.TOO_MANY_ERRORS,
                                           f"{self.errors} bad requests: closing the connection"))
            self._closing = True

    async def read_loop(self) -> None:
        conn = self.conn
        sock = self.sock
        while not self._closing:
            try:
                data = await sock.recv(RECV_SIZE)
            except (ConnectionResetError, trio.ClosedResourceError):
                return
            conn.receive_data(data)
            while not self._closing:
                try:
                    event = conn.next_event()
                except protocol.RemoteProtocolError as exc:
                    self._error(exc.id, exc.code, exc.message)
                    if exc.fatal:
                        self._closing = True
                    continue
                if event is protocol.NEED_DATA:
                    break
                if event is protocol.CLOSED:
                    return
                self.handle(event)

    def drop_waits(self) -> None:
        for handle in self.pending.values():
            self.loader.cancel(handle)
        self.pending.clear()


class Server:
    """Serves ``loader`` on the Unix socket at ``path``.

    The socket is created mode 0600 and only accepts peers running as the daemon's
    uid, as root, or as one of ``allow_uids`` (checked with SO_PEERCRED).
    """

    def __init__(
        self,
        loader: Loader,
        path: str,
        *,
        memory_fd: int | None = None,
        allow_uids: tuple[int, ...] = (),
        max_errors: int = 8,
        max_pending_waits: int = 4096,
        extra_stats: Callable[[], dict[str, Any]] | None = None,
        listener: stdsocket.socket | None = None,
    ) -> None:
        self.loader = loader
        self.path = path
        #: a listening socket handed over (socket activation): served as is, its file left alone
        self.inherited = listener
        self.memory_fd = memory_fd
        self.allow_uids = {os.getuid(), 0, *allow_uids}
        self.max_errors = max_errors
        self.max_pending_waits = max_pending_waits
        self.extra_stats = extra_stats
        self.sessions: set[Session] = set()
        self._listener: trio.socket.SocketType | None = None
        self._nursery: trio.Nursery | None = None
        self._connections_total = 0
        self._refused = 0

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(self.path, len(self.sessions), self._connections_total, self._refused,
                                [s.statistics() for s in self.sessions])

    def stats_dict(self) -> dict[str, Any]:
        d = self.loader.statistics().as_dict()
        d["queue"] = _plain(self.loader.queue.statistics())
        s = self.statistics()
        d["server"] = {"connections": s.connections, "connections_total": s.connections_total,
                       "connections_refused": s.connections_refused}
        if self.extra_stats is not None:
            d.update(self.extra_stats())
        return d

    async def _bind(self) -> trio.socket.SocketType:
        _clear_stale_socket(self.path)
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(self.path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(128)
        return sock

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report started, accept until cancelled; removes the socket file at exit
        (unless the socket was handed over: its owner, e.g. systemd, keeps it)."""
        self._listener = trio.socket.from_stdlib_socket(self.inherited) if self.inherited else await self._bind()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    try:
                        conn, _ = await self._listener.accept()
                    except trio.ClosedResourceError:
                        break
                    nursery.start_soon(self._session, conn)
                nursery.cancel_scope.cancel()
        finally:
            self._listener.close()
            if self.inherited is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    async def aclose(self, flush_timeout: float = 1.0) -> None:
        """Stop accepting; give each client its queued replies, then close them all."""
        if self._listener is not None:
            self._listener.close()
        for session in list(self.sessions):
            await session.flush(flush_timeout)
            session._closing = True
            session.sock.close()
        if self.inherited is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _session(self, sock: trio.socket.SocketType) -> None:
        with sock:
            pid, uid, _ = peer_credentials(sock)
            if uid not in self.allow_uids:
                self._refused += 1
                log.warning("refused a connection from pid %d uid %d", pid, uid)
                return
            self._connections_total += 1
            session = Session(self, sock, pid, uid)
            self.sessions.add(session)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(session.writer)
                    await session.read_loop()
                    session.drop_waits()
                    if session._closing:  # we hang up: make sure the last error reply is read
                        await session.flush()
                        await _lingering_close(sock)
                    nursery.cancel_scope.cancel()
            finally:
                session.drop_waits()
                self.sessions.discard(session)


async def _lingering_close(sock: trio.socket.SocketType, timeout: float = 0.5) -> None:
    """Half-close, then discard what the peer still sends for a moment: closing with
    unread input would reset the connection and could destroy our last reply."""
    with contextlib.suppress(OSError):
        sock.shutdown(stdsocket.SHUT_WR)
    with trio.move_on_after(timeout), contextlib.suppress(OSError):
        while await sock.recv(RECV_SIZE):
            pass


def _plain(record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead daemon; refuse to touch a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(errno.EEXIST, f"{path} exists and is not a socket")
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise SocketInUse(errno.EADDRINUSE, f"{path}: another daemon is serving on this socket")
