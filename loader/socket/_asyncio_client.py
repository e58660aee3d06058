"""The asyncio client: the same methods as :class:`~loader.Client` and
:class:`~loader.TrioClient`, plus :meth:`AsyncioClient.read`.

``async with AsyncioClient.connect(path) as c: await c.wait(off, n)``.  Any number
of tasks may call it at once: replies are matched to requests by id in a reader
callback (``loop.add_reader``, non-blocking ``recvmsg``, so the memory fd's
``SCM_RIGHTS`` arrive with their reply), and sends are serialised by a lock.

:meth:`AsyncioClient.read` waits for a range and then reads its bytes from the
daemon's memory file through ``aiofiles`` (the read runs in a worker thread, so
the event loop never blocks on it).  The memory fd is asked for once, on the
first read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiofiles

import protocol

from ._client import _FD_SPACE, RECV_SIZE, ClientError, ConnectionLost, _AsyncMethods, _take_fds


class AsyncioClient(_AsyncMethods):
    """asyncio client; many tasks may await requests at once."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self._init_common()
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._lost: ClientError | None = None
        self._send_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()
        self._file: Any = None  # the aiofiles file over the memory fd, opened on the first read
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)
        self._reading = True

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: str) -> AsyncIterator[AsyncioClient]:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        client = cls(sock, loop)
        try:
            client._hello_done(await client._request(
                protocol.Hello(next(client._ids), protocol.SUPPORTED_VERSIONS, "pageload-asyncio-client")))
            yield client
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        """Close the connection and the memory file; pending requests fail with ``closed``."""
        self._stop_reading()
        self._lose(ConnectionLost("the client was closed"))
        if self._file is not None:
            file, self._file = self._file, None
            await file.close()
        while self._fds:
            os.close(self._fds.popleft())
        self.sock.close()

    # ----------------------------------------------------------------- plumbing
    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _lose(self, error: ClientError) -> None:
        if self._lost is None:
            self._lost = error
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(self._lost)

    def _on_readable(self) -> None:
        conn = self.conn
        try:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(RECV_SIZE, _FD_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            _take_fds(ancdata, self._fds)
            conn.receive_data(data)
            while True:
                event = conn.next_event()
                if event is protocol.NEED_DATA:
                    return
                if event is protocol.CLOSED:
                    raise ConnectionLost("the daemon closed the connection")
                if event.id is None:  # a connection-level error
                    raise ClientError.from_reply(event)
                future = self._futures.pop(event.id, None)
                if future is not None and not future.done():
                    future.set_result(event)
        except (ClientError, protocol.ProtocolError, OSError) as exc:
            self._stop_reading()
            self._lose(exc if isinstance(exc, ClientError) else ConnectionLost(str(exc)))

    async def _request(self, event: Any) -> Any:
        if self._lost is not None:
            raise self._lost
        future: asyncio.Future[Any] = self.loop.create_future()
        self._futures[event.id] = future
        data = self.conn.send(event)
        try:
            async with self._send_lock:
                await self.loop.sock_sendall(self.sock, data)
        except OSError as exc:
            self._futures.pop(event.id, None)
            raise ConnectionLost(f"cannot send to the daemon: {exc.strerror or exc}") from exc
        try:
            return await future
        finally:
            self._futures.pop(event.id, None)

    # ----------------------------------------------------------------- asyncio only
    async def read(self, offset: int, length: int) -> bytes:
        """Wait for ``[offset, offset + length)``, then return its bytes, read from the
        memory file in a worker thread (``aiofiles``)."""
        if offset < 0 or length < 0:
            raise ValueError(f"read({offset}, {length}): offset and length must not be negative")
        if length == 0:  # nothing to wait for (a wait of 0 bytes is not a request)
            if offset > self.memory_size:
                raise ClientError("out-of-range", f"offset {offset:#x} is past the memory (size {self.memory_size:#x})")
            return b""
        await self.wait(offset, length)
        async with self._read_lock:  # one file position per client
            if self._file is None:
                fd = await self.memory_fd()
                try:
                    self._file = await aiofiles.open(fd, "rb", buffering=0)
                except BaseException:
                    os.close(fd)
                    raise
            file = self._file
            await file.seek(offset)
            parts: list[bytes] = []
            left = length
            while left:
                chunk = await file.read(left)
                if not chunk:
                    raise ConnectionLost(f"the memory file ended at {offset + length - left:#x}")
                parts.append(chunk)
                left -= len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)
