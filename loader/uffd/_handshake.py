"""Firecracker's handshake on the uffd socket (docs/UFFD.md "Handshake").

The VMM connects to the socket and sends one message: a JSON array of regions
``{base_host_virt_addr, size, offset, page_size, page_size_kib}`` with the
userfaultfd in SCM_RIGHTS.  :func:`bind_uffd_socket` binds the socket with the wait
socket's rules; :class:`_Handshakes` reads the handshakes of its connections
concurrently and bounded, :func:`receive_handshake` one of them, and
:func:`parse_handshake` checks the regions.  Nothing here touches guest memory.
"""

from __future__ import annotations

import array
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import trio

from .._sockets import clear_stale_socket
from .._startup import StartupError, describe_os_error
from . import _ioctl as _uffd

log = logging.getLogger("pageload")

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
        clear_stale_socket(path)
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

