"""Sans-I/O connection objects, one per side (after h11): what both sides share.

The sides are :class:`~protocol.ServerConnection` (``_server_connection.py``) and
:class:`~protocol.ClientConnection` (``_client_connection.py``); this module holds
their base, the framing, buffering and bounding of input, and the packing of output.

Nothing here touches a socket.  The I/O layer hands received bytes to
:meth:`receive_data` (``b""`` for EOF), takes events from :meth:`next_event` until it
returns :data:`NEED_DATA` (read more) or :data:`CLOSED`, and writes the bytes that
:meth:`send` returns.  The methods never block and never call back.

Framing: the stream is a sequence of msgpack maps with no length prefix, decoded by
one reused ``msgpack.Unpacker``.  Input comes from another process, so every decoder
limit is set, and this module bounds each whole message by ``max_buffer_size`` itself
(the C unpacker consumes a partial message as it goes, so its own buffer limit alone
would not).  A decode error leaves the unpacker in the middle of a value with no way
to find the next message, so every one of them is fatal.

Neither object is thread-safe; each belongs to the task that runs its connection.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from . import codes
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import Event, Request
from ._limits import Limits, nesting_over
from ._state import IDLE
from ._wire import ENCODERS


class Marker(enum.Enum):
    """What :meth:`next_event` returns when it has no event."""

    NEED_DATA = "NEED_DATA"  #: no complete message buffered: call receive_data()
    CLOSED = "CLOSED"  #: the peer closed (EOF) and every message has been returned

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Literal[Marker.NEED_DATA] = Marker.NEED_DATA
CLOSED: Literal[Marker.CLOSED] = Marker.CLOSED

#: First size of each connection's msgpack buffers (they grow on demand): small, so
#: that an idle connection costs little.
_INITIAL_BUFFER = 4096


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    role: str  #: "client" or "server"
    version: int | None  #: negotiated protocol version, once HelloReply has passed
    messages_received: int  #: whole messages decoded, bad ones included
    messages_sent: int
    bytes_received: int
    bytes_sent: int
    buffered_bytes: int  #: received and not yet returned as events
    outstanding: int  #: requests not yet answered
    remote_errors: int  #: RemoteProtocolErrors raised (a fatal one counts once)
    eof: bool  #: the peer has closed its side
    failed: bool  #: a fatal error happened; the connection is dead


class _Connection:
    _role = "?"

    def __init__(self, limits: Limits) -> None:
        if not isinstance(limits, Limits):
            raise TypeError(f"limits must be a Limits, not {type(limits).__name__}")
        self.limits = limits
        self.max_buffer_size = limits.max_buffer_size
        self.max_send_size = limits.max_send_size
        self._max_depth = limits.max_depth
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            use_list=True,
            # Start small; the buffer grows up to max_buffer_size only when a message needs it.
            read_size=min(_INITIAL_BUFFER, limits.max_buffer_size),
            max_buffer_size=limits.max_buffer_size,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_ext_len=16,
        )
        self._packer = msgpack.Packer(use_bin_type=True, buf_size=_INITIAL_BUFFER)
        # Bytes received but not yet fed to the unpacker (owned copies).
        self._pending: deque[memoryview] = deque()
        self._pending_bytes = 0
        self._fed = 0  # bytes fed to the unpacker
        self._message_start = 0  # stream offset where the current message begins
        self._eof = False
        self._error: RemoteProtocolError | None = None
        # id -> the request type it was, or None for a rejected request (answered
        # only by ErrorReply).
        self._outstanding: dict[int, type[Request] | None] = {}
        self._hello = IDLE
        self._offered: tuple[int, ...] = ()
        self._version: int | None = None
        self._messages_received = 0
        self._messages_sent = 0
        self._bytes_received = 0
        self._bytes_sent = 0
        self._remote_errors = 0
        # Received bytes held back from the unpacker for a fast path (server side:
        # wait frames), from _raw_pos on; None when there are none.  They come
        # before anything the unpacker holds.
        self._raw: bytes | None = None
        self._raw_pos = 0
        self._fast = False  # hold bytes back for the fast path (set by ServerConnection)

    def _raw_bytes(self) -> int:
        return 0 if self._raw is None else len(self._raw) - self._raw_pos

    def _flush_raw(self) -> None:
        """Hand the held-back bytes to the general path, in front of the pending ones."""
        raw = self._raw
        assert raw is not None
        self._raw = None
        rest = memoryview(raw)[self._raw_pos:]
        later = self._pending
        self._pending = deque()
        self._pending_bytes = 0
        self._accept(rest, len(rest))
        for chunk in later:
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)

    # ------------------------------------------------------------ public state

    @property
    def version(self) -> int | None:
        """The negotiated protocol version, once the HelloReply has been sent
        (server) or received (client)."""
        return self._version

    @property
    def outstanding(self) -> Any:
        """Live, read-only set-like view of the ids of requests not yet answered."""
        return self._outstanding.keys()

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            role=self._role,
            version=self._version,
            messages_received=self._messages_received,
            messages_sent=self._messages_sent,
            bytes_received=self._bytes_received,
            bytes_sent=self._bytes_sent,
            buffered_bytes=self._fed - self._message_start + self._pending_bytes + self._raw_bytes(),
            outstanding=len(self._outstanding),
            remote_errors=self._remote_errors,
            eof=self._eof,
            failed=self._error is not None,
        )

    # ------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the peer; an empty ``data`` means EOF.

        The bytes are copied (a caller may reuse its receive buffer at once).
        Nothing is decoded here: call :meth:`next_event`.  Data after EOF is a
        :class:`LocalProtocolError`; data after a fatal error is dropped.
        """
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        n = len(view)
        if self._eof:
            if n:
                raise LocalProtocolError("receive_data() called with data after EOF")
            return
        if n == 0:
            self._eof = True
            return
        self._bytes_received += n
        if self._error is not None:
            return
        if self._fast:
            if self._raw is not None:  # rare: more bytes before the held-back ones were taken
                self._raw = self._raw[self._raw_pos:] + bytes(view)
                self._raw_pos = 0
                return
            if not self._pending and self._fed == self._message_start:  # the unpacker is empty
                self._raw = bytes(view)
                self._raw_pos = 0
                return
        self._accept(view, n)

    def _accept(self, view: bytes | memoryview, n: int) -> None:
        """Queue ``n`` bytes for the general (msgpack) path, behind any already queued."""
        if not self._pending:
            room = self.max_buffer_size - (self._fed - self._message_start)
            if n <= room:
                self._feed(view)
                return
            if room > 0:
                self._feed(memoryview(view)[:room])
                view = memoryview(view)[room:]
                n -= room
        self._pending.append(memoryview(bytes(view)))
        self._pending_bytes += n

    def _feed(self, chunk: bytes | memoryview) -> None:
        # Callers keep the unpacker's unread bytes within max_buffer_size, so
        # BufferFull cannot happen; it would mean a message too large all the same.
        try:
            self._unpacker.feed(chunk)
        except msgpack.BufferFull:
            self._error = RemoteProtocolError(
                codes.TOO_LARGE,
                f"a message is larger than {self.max_buffer_size} bytes",
                None,
                True,
            )
            return
        self._fed += len(chunk)

    def _feed_pending(self) -> None:
        room = self.max_buffer_size - (self._fed - self._message_start)
        if room <= 0:
            self._fail(codes.TOO_LARGE, f"a message is larger than {self.max_buffer_size} bytes")
        chunk = self._pending[0]
        if len(chunk) <= room:
            self._pending.popleft()
        else:
            self._pending[0] = chunk[room:]
            chunk = chunk[:room]
        self._pending_bytes -= len(chunk)
        self._feed(chunk)
        if self._error is not None:
            self._remote_errors += 1
            raise self._raised()

    def _fail(self, code: str, message: str, cause: BaseException | None = None) -> None:
        self._error = RemoteProtocolError(code, message, None, True)
        self._remote_errors += 1
        self._pending.clear()
        self._pending_bytes = 0
        self._raw = None
        raise self._raised() from cause

    def _raised(self) -> RemoteProtocolError:
        """A fresh copy of the fatal error to raise: the stored one never carries a
        traceback, which would hold the caller's frames (and this connection) in a cycle."""
        error = self._error
        assert error is not None
        return RemoteProtocolError(error.code, error.message, error.id, error.fatal)

    def nothing_buffered(self) -> bool:
        """True when :meth:`next_event` would return :data:`NEED_DATA` now: no bytes
        held, no partial message, no end of input or error to report.  Cheaper than
        asking (the unpacker says it with an exception)."""
        return (self._raw is None and not self._pending and self._fed == self._message_start
                and not self._eof and self._error is None)

    def next_event(self) -> Any:
        """The next event from the peer, :data:`NEED_DATA`, or :data:`CLOSED`.

        Raises :class:`RemoteProtocolError` for bad input.  A non-fatal one
        concerns one message, already consumed; call again for the next.  After a
        fatal one every call raises it again.
        """
        if self._error is not None:
            raise self._raised()
        if self._raw is not None:
            event = self._next_fast()
            if event is not None:
                return event
        unpacker = self._unpacker
        while True:
            try:
                message = unpacker.unpack()
            except msgpack.OutOfData:
                if self._pending:
                    self._feed_pending()
                    continue
                if self._eof:
                    if self._fed != self._message_start:
                        self._fail(
                            codes.TRUNCATED,
                            f"the peer closed the connection {self._fed - self._message_start} "
                            "bytes into a message",
                        )
                    return CLOSED
                return NEED_DATA
            except msgpack.StackError as exc:
                self._fail(codes.TOO_LARGE, "a message is nested too deeply", exc)
            except msgpack.FormatError as exc:
                self._fail(codes.BAD_FRAME, "the input is not msgpack", exc)
            except ValueError as exc:
                # Limits ("N exceeds max_str_len(M)"), invalid UTF-8, map keys
                # that are not strings, malformed timestamps.
                if "exceeds max_" in str(exc):
                    self._fail(codes.TOO_LARGE, f"a message is over a size limit: {exc}", exc)
                self._fail(codes.BAD_FRAME, f"undecodable msgpack: {exc}", exc)
            except (msgpack.UnpackException, TypeError, OverflowError) as exc:
                self._fail(codes.BAD_FRAME, f"undecodable msgpack: {type(exc).__name__}", exc)
            self._message_start = unpacker.tell()
            self._messages_received += 1
            if (type(message) is dict or type(message) is list) and nesting_over(message, self._max_depth):
                self._fail(codes.TOO_LARGE, f"a message is nested deeper than {self._max_depth}")
            return self._receive(message)

    def _next_fast(self) -> Event | None:
        """The next event from the held-back bytes, or None after handing them all to
        the general path (only valid input in the common form is taken here)."""
        raise NotImplementedError

    def _reject(self, code: str, message: str, id: int | None) -> RemoteProtocolError:
        self._remote_errors += 1
        return RemoteProtocolError(code, message, id, False)

    def _receive(self, message: Any) -> Event:
        raise NotImplementedError

    # ------------------------------------------------------------ sending

    def _pack(self, event: Event) -> bytes:
        try:
            data: bytes = self._packer.pack(ENCODERS[type(event)](event))
        except (ValueError, TypeError, OverflowError) as exc:
            raise LocalProtocolError(f"cannot encode {event!r}: {exc}") from exc
        if len(data) > self.max_send_size:
            raise LocalProtocolError(
                f"{type(event).__name__} {event.id} encodes to {len(data)} bytes, "  # type: ignore[attr-defined]
                f"over max_send_size ({self.max_send_size})"
            )
        return data

    def _sent(self, data: bytes) -> bytes:
        self._messages_sent += 1
        self._bytes_sent += len(data)
        return data
