"""The Unix-socket server: it binds and listens, accepts connections (bounded, backing
off when out of descriptors or memory) and runs a :class:`~loader.socket._session.Session` for
each; its statistics."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket as stdsocket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .._loadmap import LoadedMap
from .._sockets import clear_stale_socket, grant_uids, remove_socket_file
from ..core._service import PageService
from ..uffd import _minor as _uffd_minor
from ._session import (
    BUSY_POLL_QUIET_NS,
    BUSY_POLL_US,
    FLUSH_TIMEOUT_S,
    MAX_BACKLOG_BYTES,
    RECV_SIZE,
    ReplyBatch,
    Session,
    SessionStatistics,
    peer_credentials,
)

log = logging.getLogger("pageload.server")

#: accept() failing for lack of descriptors or memory: wait this long, then try again.
ACCEPT_BACKOFF_S = 0.1
#: ... and say so in the log at most this often.
ACCEPT_LOG_INTERVAL_S = 10.0
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_TRANSIENT_ERRORS = frozenset({errno.ECONNABORTED, errno.EINTR, errno.EPROTO, errno.EPERM})

@dataclass(frozen=True, slots=True)
class ServerStatistics:
    path: str
    connections: int
    connections_total: int
    connections_refused: int
    accept_errors: int  #: accept() failures for lack of descriptors or memory (each backed off)
    sessions: list[SessionStatistics]


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
        self.uffd_minor: _uffd_minor.MinorService | None = None  #: made at the first uffd-register


    def minor_service(self) -> _uffd_minor.MinorService:
        """The zero-copy mode's service (made at the first ``uffd-register``)."""
        if self.uffd_minor is None:
            self.uffd_minor = _uffd_minor.MinorService(self.loader)
        return self.uffd_minor
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
        clear_stale_socket(self.path)
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
                grant_uids(self.path, self._acl_uids)
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
        remove_socket_file(self.path, self._inode)
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
