"""The daemon's side of a connection (:class:`ServerConnection`): receives requests
and sends replies, with the handshake's and the request ids' rules; the wait frames'
fast path in (``next_wait``) and the Loaded reply's out (``send_loaded``).  The
framing and buffering it shares with the client side are in ``_connection.py``."""

from __future__ import annotations

from typing import Any

from . import codes
from ._connection import Marker, _Connection
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import Event, Hello, HelloReply, Loaded, Reply, ReplyEvent, RequestEvent, Wait
from ._fast import MAX_LOADED_FRAME, MAX_WAIT_FRAME, encode_loaded, parse_wait
from ._limits import Limits, describe
from ._state import ACCEPTED, HELLO, IDLE, NEGOTIATED, REFUSED, after, can
from ._wire import ENCODERS, REQUESTS, SUPPORTED_VERSIONS, decode, negotiate, read_id


class ServerConnection(_Connection):
    """The daemon's side of one client connection.

    Receives requests, sends replies.  Enforces that a Hello with a version in
    common comes first (anything else before it is ``hello-required``), that request
    ids are unique among outstanding requests (``duplicate-id``), and, on the sending
    side, that each reply answers an outstanding request of the right type, once.
    A request rejected with a non-fatal :class:`RemoteProtocolError` that carries an
    id stays outstanding until the application answers it with ``ErrorReply``
    (``ErrorReply.for_error(exc)``), so every request gets an answer.
    """

    _role = "server"

    def __init__(self, limits: Limits | None = None) -> None:
        super().__init__(Limits.server() if limits is None else limits)
        lim = self.limits
        # The fast path for wait frames (protocol/_fast.py) skips the unpacker, so it
        # runs only where no limit could reject a wait frame or a Loaded reply.
        self._fast = (lim.max_buffer_size >= MAX_WAIT_FRAME and lim.max_map_len >= 4
                      and lim.max_str_len >= 4 and lim.max_depth >= 1
                      and lim.max_send_size >= MAX_LOADED_FRAME)

    def _next_fast(self) -> Event | None:
        raw = self._raw
        assert raw is not None
        got = parse_wait(raw, self._raw_pos)
        # A duplicate id or a wait before Hello: the general path rejects it.
        if got is not None and got[1] not in self._outstanding and self._hello is not IDLE:
            end, id, offset, length = got
            if end == len(raw):
                self._raw = None
            else:
                self._raw_pos = end
            self._messages_received += 1
            self._outstanding[id] = Wait
            return Wait(id, offset, length)
        self._flush_raw()
        return None

    def next_wait(self) -> tuple[int, int, int] | None:
        """The next request as ``(id, offset, length)`` when it is a wait frame that the
        fast path takes (then it is consumed, as :meth:`next_event` would return it as a
        :class:`Wait`); None otherwise, consuming nothing: call :meth:`next_event`.
        Saves building the event for the most frequent request."""
        raw = self._raw
        if raw is None or self._error is not None:
            return None
        got = parse_wait(raw, self._raw_pos)
        if got is None or got[1] in self._outstanding or self._hello is IDLE:
            return None  # next_event hands the bytes to the general path, which says why
        end, id, offset, length = got
        if end == len(raw):
            self._raw = None
        else:
            self._raw_pos = end
        self._messages_received += 1
        self._outstanding[id] = Wait
        return id, offset, length

    def send_loaded(self, id: int) -> bytes:
        """``send(Loaded(id))``, from a template when ``id`` is an outstanding Wait
        after the HelloReply (otherwise through :meth:`send`, with its checks)."""
        if self._outstanding.get(id) is Wait and self._hello is NEGOTIATED:
            del self._outstanding[id]
            data = encode_loaded(id)
            self._messages_sent += 1
            self._bytes_sent += len(data)
            return data
        return self.send(Loaded(id))

    def next_event(self) -> RequestEvent | Marker:
        """The next request, :data:`NEED_DATA`, or :data:`CLOSED` (see the base)."""
        event: RequestEvent | Marker = super().next_event()
        return event

    def _receive(self, message: Any) -> Event:
        if type(message) is not dict:
            raise self._reject(
                codes.BAD_MESSAGE, f"a request must be a map, not {type(message).__name__}", None
            )
        id = read_id(message, "id")
        if id is None:
            raise self._reject(
                codes.BAD_MESSAGE,
                f"a request needs an id below 2**63, not {describe(message.get('id'))}",
                None,
            )
        if id in self._outstanding:
            raise self._reject(codes.DUPLICATE_ID, f"request {id} is still outstanding", None)
        op = message.get("op")
        decoder = REQUESTS.get(op) if type(op) is str else None
        if decoder is None:
            self._outstanding[id] = None
            if type(op) is str:
                raise self._reject(codes.UNKNOWN_OP, f"unknown op {describe(op)}", id)
            raise self._reject(codes.BAD_MESSAGE, f"a request needs an op string, not {describe(op)}", id)
        try:
            event = decode(decoder, message, id, f"{op} request")
        except RemoteProtocolError as exc:
            self._outstanding[id] = None
            self._remote_errors += 1
            raise exc from None
        if type(event) is Hello:
            if not can(self._hello, HELLO):
                self._outstanding[id] = None
                what = "accepted" if self._hello is NEGOTIATED else "received and is not answered yet"
                raise self._reject(codes.BAD_MESSAGE, f"a Hello was already {what}", id)
            if negotiate(event.versions) is None:
                self._outstanding[id] = None
                raise self._reject(
                    codes.UNSUPPORTED_VERSION,
                    f"no version in common: the client offers {list(event.versions)}, "
                    f"the server speaks {list(SUPPORTED_VERSIONS)}",
                    id,
                )
            self._hello = after(self._hello, HELLO)
            self._offered = event.versions
        elif self._hello is IDLE:
            self._outstanding[id] = None
            raise self._reject(codes.HELLO_REQUIRED, f"{op} before Hello", id)
        self._outstanding[id] = type(event)  # type: ignore[assignment]
        return event

    def send(self, event: ReplyEvent) -> bytes:
        """The bytes of ``event``, a reply, for the I/O layer to write.

        Raises :class:`LocalProtocolError`, sending nothing, when the event is not
        a reply, answers no outstanding request or one of another type, or comes
        before the HelloReply (only ErrorReply may), or when a HelloReply names a
        version the client did not offer.  ``ErrorReply(None, ...)`` may always be
        sent, even after a fatal error.
        """
        if not isinstance(event, Reply) or type(event) not in ENCODERS:
            raise LocalProtocolError(f"a server cannot send {event!r}")
        id = event.id
        answers = event.answers
        if id is not None:
            if id not in self._outstanding:
                raise LocalProtocolError(f"no request {id} is waiting for a reply")
            expected = self._outstanding[id]
            if answers is not None and answers is not expected:
                what = "a rejected request" if expected is None else expected.__name__
                raise LocalProtocolError(f"{type(event).__name__} cannot answer {what} ({id})")
        if type(event) is HelloReply:
            if event.version not in self._offered or event.version not in SUPPORTED_VERSIONS:
                raise LocalProtocolError(
                    f"version {event.version} is not one both sides speak "
                    f"(client {list(self._offered)}, server {list(SUPPORTED_VERSIONS)})"
                )
        elif answers is not None and self._hello is not NEGOTIATED:
            raise LocalProtocolError(f"{type(event).__name__} before the HelloReply")
        data = self._pack(event)
        if id is not None:
            if self._outstanding.pop(id) is Hello and answers is None:
                self._hello = after(self._hello, REFUSED)  # the client may try again
        if type(event) is HelloReply:
            self._hello = after(self._hello, ACCEPTED)
            self._version = event.version
        return self._sent(data)
