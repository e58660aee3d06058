"""Clients of the restore daemon, in two flavours with the same methods.

* :class:`Client` — blocking, plain sockets, for VMMs that are not async.
  ``with Client.connect(path) as c: c.wait(off, n)``.  Pipelining:
  ``ids = [c.send_wait(off, n) ...]`` then ``c.result(id)`` for each.
* :class:`TrioClient` — ``async with TrioClient.connect(path) as c: await c.wait(off, n)``;
  any number of tasks may call it at once (one reader task matches replies to ids).

Both say hello on connect (``version``, ``memory_size``, ``page_size`` and
``done_at_connect`` come from the reply) and raise :class:`ClientError` for an
error reply, or its subclass :class:`ConnectionLost` when the daemon went away.

Connecting retries while the daemon's listen backlog is full (``EAGAIN`` on a Unix
socket), with backoff, for at most ``connect_timeout`` seconds.
"""

from __future__ import annotations

import array
import contextlib
import errno as errnos
import itertools
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import trio

import protocol
from protocol import codes

from .._loadmap import all_loaded, map_readonly

_FD_SPACE = socket.CMSG_SPACE(4 * 4)
RECV_SIZE = 256 << 10
#: How long connecting keeps retrying while the daemon's listen backlog is full.
CONNECT_TIMEOUT_S = 10.0
_BACKOFF_FIRST_S = 0.001
_BACKOFF_MAX_S = 0.05


class ClientError(Exception):
    """The daemon answered with an error (``code`` is from :mod:`protocol.codes`), or
    the connection was lost (:class:`ConnectionLost`, whose ``code`` is ``None``)."""

    def __init__(self, code: str | None, message: str, errno: int | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" ({os.strerror(errno)})" if errno else ""))
        self.code = code
        self.message = message
        self.errno = errno

    @classmethod
    def from_reply(cls, reply: Any) -> ClientError:
        return cls(reply.code, reply.message, reply.errno)


class ConnectionLost(ClientError):
    """The daemon closed the connection, or the socket failed; no protocol code."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)
        self.args = (f"connection lost: {message}",)

    def __str__(self) -> str:
        return f"connection lost: {self.message}"


def _connect(sock: socket.socket, path: str, timeout: float) -> float:
    """One non-blocking connect attempt; 0 once connected, else the seconds to back off.

    A Unix socket whose listen backlog is full fails at once with EAGAIN (it is not
    "in progress"): try again later."""
    try:
        sock.connect(path)
    except BlockingIOError as exc:
        if exc.errno != errnos.EAGAIN:
            raise
        return timeout
    return 0.0


def _backoff(delay: float) -> float:
    return min(delay * 2, _BACKOFF_MAX_S)


def _take_fds(ancdata: list[tuple[int, int, bytes]], into: deque[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            into.extend(fds)


class _Common:
    version: int
    memory_size: int
    page_size: int
    done_at_connect: bool

    def _init_common(self) -> None:
        self.conn = protocol.ClientConnection()
        self._ids = itertools.count(1)
        self._fds: deque[int] = deque()
        self._map: Any = None  # the daemon's loaded map, read-only, after load_map()
        self._granule = 0
        #: waits answered from the loaded map, with no round trip
        self.map_hits = 0

    def _in_map(self, offset: int, length: int) -> bool:
        """Whether the loaded map shows all of ``[offset, offset+length)`` loaded."""
        if self._map is not None and all_loaded(self._map, self._granule, self.memory_size, offset, length):
            self.map_hits += 1
            return True
        return False

    def _take_map(self, reply: Any) -> None:
        fd = self._fd_for(reply)
        try:
            self._map = map_readonly(fd, reply.size)
        finally:
            os.close(fd)
        self._granule = reply.granule

    def _hello_done(self, reply: Any) -> None:
        if isinstance(reply, protocol.ErrorReply):
            raise ClientError.from_reply(reply)
        self.version = reply.version
        self.memory_size = reply.memory_size
        self.page_size = reply.page_size
        self.done_at_connect = reply.done

    @staticmethod
    def _check(reply: Any) -> Any:
        if isinstance(reply, protocol.ErrorReply):
            raise ClientError.from_reply(reply)
        return reply

    def _fd_for(self, reply: Any) -> int:
        self._check(reply)
        if not self._fds:
            raise ClientError(codes.BAD_MESSAGE, "the memory fd reply came without a file descriptor")
        return self._fds.popleft()


class Client(_Common):
    """Blocking client over a plain socket."""

    def __init__(self, sock: socket.socket, deadline: float | None = None) -> None:
        self.sock = sock
        #: time.monotonic() by which every call must be done (TimeoutError), or None
        self.deadline = deadline
        self._init_common()
        self._replies: dict[int | None, Any] = {}
        self._hello_done(self._request(protocol.Hello(next(self._ids), protocol.SUPPORTED_VERSIONS, "pageload-client")))

    @classmethod
    def connect(cls, path: str, timeout: float | None = None, *,
                connect_timeout: float = CONNECT_TIMEOUT_S, deadline: float | None = None) -> Client:
        """Connect and say hello.  ``timeout`` bounds each later socket operation
        (``TimeoutError``); ``connect_timeout`` bounds the retries of a full backlog;
        ``deadline`` (a ``time.monotonic()`` value) bounds everything, this call and
        every later one, together (``TimeoutError``)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if deadline is not None:
                connect_timeout = min(connect_timeout, deadline - time.monotonic())
            deadline_connect = time.monotonic() + connect_timeout
            delay = _BACKOFF_FIRST_S
            while _connect(sock, path, delay):
                if time.monotonic() + delay > deadline_connect:
                    raise TimeoutError(errnos.ETIMEDOUT, f"the daemon's listen backlog stayed full for "
                                       f"{connect_timeout:g} s", path)
                time.sleep(delay)
                delay = _backoff(delay)
            sock.settimeout(timeout)
            return cls(sock, deadline)
        except BaseException:
            sock.close()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()
        while self._fds:
            os.close(self._fds.popleft())

    # -- pipelining
    def send(self, event: Any) -> int:
        data = self.conn.send(event)
        if self.deadline is not None:
            self.sock.settimeout(max(self.deadline - time.monotonic(), 1e-3))
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:  # a lost daemon is a ClientError
            raise ConnectionLost(f"the daemon went away: {exc.strerror}") from exc
        return int(event.id)

    def send_wait(self, offset: int, length: int) -> int:
        return self.send(protocol.Wait(next(self._ids), offset, length))

    def reply(self, request_id: int) -> Any:
        """Block until the reply to ``request_id`` arrives (others are kept for later)."""
        while request_id not in self._replies:
            event = self.conn.next_event()
            if event is protocol.NEED_DATA:
                if self.deadline is not None:
                    left = self.deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(errnos.ETIMEDOUT, "no answer from the daemon in time")
                    self.sock.settimeout(left)
                try:
                    data, ancdata, _, _ = self.sock.recvmsg(RECV_SIZE, _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
                except ConnectionResetError as exc:
                    raise ConnectionLost(f"the daemon went away: {exc.strerror}") from exc
                _take_fds(ancdata, self._fds)
                self.conn.receive_data(data)
                continue
            if event is protocol.CLOSED:
                raise ConnectionLost("the daemon closed the connection")
            if event.id is None:  # a connection-level error
                raise ClientError.from_reply(event)
            self._replies[event.id] = event
        return self._replies.pop(request_id)

    def result(self, request_id: int) -> None:
        """Wait for a pipelined wait's reply; raise ClientError if it failed."""
        self._check(self.reply(request_id))

    def _request(self, event: Any) -> Any:
        return self.reply(self.send(event))

    # -- the methods both clients have
    def wait(self, offset: int, length: int) -> None:
        if self._in_map(offset, length):
            return
        self._check(self._request(protocol.Wait(next(self._ids), offset, length)))

    def load_map(self) -> None:
        """Map the daemon's loaded map (read-only); from then on :meth:`wait` returns
        at once, with no request, for a range the map shows loaded."""
        self._take_map(self._request(protocol.GetLoadedMap(next(self._ids))))

    def prefetch(self, offset: int, length: int, working_set: bool = False) -> None:
        """A hint; ``working_set``: the range is in the working set (``hint working-set``)."""
        self._check(self._request(protocol.Prefetch(next(self._ids), offset, length, working_set)))

    def mark(self) -> None:
        """End the daemon's working-set recording window now."""
        self._check(self._request(protocol.Mark(next(self._ids))))

    def stats(self) -> dict[str, Any]:
        return dict(self._check(self._request(protocol.GetStats(next(self._ids)))).stats)

    def memory_fd(self, writable: bool = False) -> int:
        """A new fd of the daemon's memory file (the caller closes it).  Read-only
        unless ``writable`` (which the daemon refuses with ``forbidden`` unless it
        runs with ``--allow-writable-memory-fd``)."""
        return self._fd_for(self._request(protocol.GetMemoryFd(next(self._ids), writable)))


class _AsyncMethods(_Common):
    """The request methods of the two async clients, over their ``_request``."""

    async def _request(self, event: protocol.Event) -> Any:
        raise NotImplementedError

    async def wait(self, offset: int, length: int) -> None:
        if self._in_map(offset, length):
            return
        self._check(await self._request(protocol.Wait(next(self._ids), offset, length)))

    async def load_map(self) -> None:
        """As :meth:`Client.load_map <loader.Client.load_map>`."""
        self._take_map(await self._request(protocol.GetLoadedMap(next(self._ids))))

    async def prefetch(self, offset: int, length: int, working_set: bool = False) -> None:
        """A hint; ``working_set``: the range is in the working set (``hint working-set``)."""
        self._check(await self._request(protocol.Prefetch(next(self._ids), offset, length, working_set)))

    async def mark(self) -> None:
        """End the daemon's working-set recording window now."""
        self._check(await self._request(protocol.Mark(next(self._ids))))

    async def stats(self) -> dict[str, Any]:
        return dict(self._check(await self._request(protocol.GetStats(next(self._ids)))).stats)

    async def memory_fd(self, writable: bool = False) -> int:
        """A new fd of the daemon's memory file (the caller closes it); as :meth:`Client.memory_fd`."""
        return self._fd_for(await self._request(protocol.GetMemoryFd(next(self._ids), writable)))


class TrioClient(_AsyncMethods):
    """trio client; many tasks may await requests at once."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._init_common()
        self._slots: dict[int, list[Any]] = {}  # id -> [event, reply]
        self._lost: ClientError | None = None
        self._send_lock = trio.Lock()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: str, *, connect_timeout: float = CONNECT_TIMEOUT_S) -> AsyncIterator[TrioClient]:
        """Connect (retrying a full backlog for up to ``connect_timeout`` s) and say hello.

        trio's own ``connect`` takes EAGAIN on a Unix socket for "in progress" and
        reports success on a socket that is not connected, so this one connects the
        plain socket itself."""
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            raw.setblocking(False)
            deadline = trio.current_time() + connect_timeout
            delay = _BACKOFF_FIRST_S
            while _connect(raw, path, delay):
                if trio.current_time() + delay > deadline:
                    raise TimeoutError(errnos.ETIMEDOUT, f"the daemon's listen backlog stayed full for "
                                       f"{connect_timeout:g} s", path)
                await trio.sleep(delay)
                delay = _backoff(delay)
        except BaseException:
            raw.close()
            raise
        sock = trio.socket.from_stdlib_socket(raw)
        with sock:
            client = cls(sock)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client._reader)
                    try:
                        client._hello_done(await client._request(
                            protocol.Hello(next(client._ids), protocol.SUPPORTED_VERSIONS, "pageload-trio-client")))
                        yield client
                    finally:
                        nursery.cancel_scope.cancel()
                        while client._fds:
                            os.close(client._fds.popleft())
            except BaseExceptionGroup as group:  # the reader never raises: unwrap the caller's error
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise

    async def _reader(self) -> None:
        conn = self.conn
        try:
            while True:
                event = conn.next_event()
                if event is protocol.NEED_DATA:
                    data, ancdata, _, _ = await self.sock.recvmsg(RECV_SIZE, _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
                    _take_fds(ancdata, self._fds)
                    conn.receive_data(data)
                    continue
                if event is protocol.CLOSED:
                    raise ConnectionLost("the daemon closed the connection")
                if event.id is None:
                    raise ClientError.from_reply(event)
                slot = self._slots.pop(event.id, None)
                if slot is not None:
                    slot[1] = event
                    slot[0].set()
        except (ClientError, protocol.ProtocolError, OSError) as exc:
            self._lost = exc if isinstance(exc, ClientError) else ConnectionLost(str(exc))
            for slot in self._slots.values():
                slot[0].set()

    async def _request(self, event: Any) -> Any:
        if self._lost is not None:
            raise self._lost
        slot: list[Any] = [trio.Event(), None]
        self._slots[event.id] = slot
        data = self.conn.send(event)
        async with self._send_lock:
            view = memoryview(data)
            try:
                while view:
                    view = view[await self.sock.send(view):]
            except (BrokenPipeError, ConnectionResetError) as exc:  # a lost daemon is a ClientError
                self._slots.pop(event.id, None)
                raise ConnectionLost(f"the daemon went away: {exc.strerror}") from exc
        await slot[0].wait()
        if slot[1] is None:
            assert self._lost is not None
            raise self._lost
        return slot[1]


@contextlib.contextmanager
def mapped_memory(client: Client) -> Iterator[memoryview]:
    """Map the daemon's memory file read-only (for checking bytes)."""
    import mmap

    fd = client.memory_fd()
    try:
        m = mmap.mmap(fd, client.memory_size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    view = memoryview(m)
    try:
        yield view
    finally:
        view.release()
        m.close()
