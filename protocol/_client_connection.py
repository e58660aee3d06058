"""A client's side of a connection (:class:`ClientConnection`): sends requests and
receives replies, matching each to its request; the Loaded replies' fast path in and
the wait frames' out.  The framing and buffering it shares with the server side are
in ``_connection.py``."""

from __future__ import annotations

from typing import Any

from . import codes
from ._connection import Marker, _Connection
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import Event, Hello, HelloReply, Loaded, ReplyEvent, Request, RequestEvent, Wait
from ._fast import MAX_LOADED_FRAME, MAX_WAIT_FRAME, encode_wait, parse_loaded
from ._limits import Limits, describe
from ._state import ACCEPTED, HELLO, IDLE, REFUSED, after, can
from ._wire import ENCODERS, REPLIES, SUPPORTED_VERSIONS, decode, error_reply, read_id


class ClientConnection(_Connection):
    """A client's side: sends requests, receives replies.

    Sends Hello first (requests may follow it at once, before the HelloReply).
    Tracks outstanding ids: a reply to no outstanding request is ``unknown-id``; a
    reply of the wrong type (``Loaded`` for a ``GetStats``) is ``bad-message`` with
    that id, and the request counts as answered.
    """

    _role = "client"

    def __init__(self, limits: Limits | None = None) -> None:
        super().__init__(Limits.client() if limits is None else limits)
        lim = self.limits
        # The fast path for loaded replies and wait requests (protocol/_fast.py) skips
        # msgpack, so it runs only where no limit could reject either.
        self._fast = (lim.max_buffer_size >= MAX_LOADED_FRAME and lim.max_map_len >= 4
                      and lim.max_str_len >= 6 and lim.max_depth >= 1
                      and lim.max_send_size >= MAX_WAIT_FRAME)

    def _next_fast(self) -> Event | None:
        raw = self._raw
        assert raw is not None
        got = parse_loaded(raw, self._raw_pos)
        # only the answer to an outstanding Wait; anything else: the general path says why
        if got is not None and self._outstanding.get(got[1]) is Wait:
            end, id = got
            if end == len(raw):
                self._raw = None
            else:
                self._raw_pos = end
            self._messages_received += 1
            del self._outstanding[id]
            return Loaded(id)
        self._flush_raw()
        return None

    def next_event(self) -> ReplyEvent | Marker:
        """The next reply, :data:`NEED_DATA`, or :data:`CLOSED` (see the base)."""
        event: ReplyEvent | Marker = super().next_event()
        return event

    def _answer(self, id: int) -> type[Request] | None:
        try:
            return self._outstanding.pop(id)
        except KeyError:
            raise self._reject(
                codes.UNKNOWN_ID, f"a reply to request {id}, which is not outstanding", id
            ) from None

    def _receive(self, message: Any) -> Event:
        if type(message) is not dict:
            raise self._reject(
                codes.BAD_MESSAGE, f"a reply must be a map, not {type(message).__name__}", None
            )
        if "err" in message:
            raw_id = message.get("re", 0)
            id = None if raw_id is None else read_id(message, "re")
            if id is None and raw_id is not None:
                raise self._reject(
                    codes.BAD_MESSAGE,
                    f"an error reply needs re: nil or an id, not {describe(raw_id)}",
                    None,
                )
            expected = None if id is None else self._answer(id)
            try:
                event = decode(error_reply, message, id, "error reply")
            except RemoteProtocolError:
                self._remote_errors += 1
                raise
            if expected is Hello:
                self._hello = after(self._hello, REFUSED)  # another Hello may be sent
            return event
        id = read_id(message, "re")
        if id is None:
            raise self._reject(
                codes.BAD_MESSAGE,
                f"a reply needs re, a request id, not {describe(message.get('re'))}",
                None,
            )
        expected = self._answer(id)
        ok = message.get("ok")
        decoder = REPLIES.get(ok) if type(ok) is str else None
        if decoder is None:
            raise self._reject(
                codes.BAD_MESSAGE, f"a reply needs an ok kind or err, not ok={describe(ok)}", id
            )
        try:
            reply = decode(decoder, message, id, f"{ok} reply")
        except RemoteProtocolError:
            self._remote_errors += 1
            raise
        answers = reply.answers  # type: ignore[attr-defined]
        if answers is not expected:
            what = expected.__name__ if expected is not None else "?"
            raise self._reject(
                codes.BAD_MESSAGE, f"{type(reply).__name__} cannot answer {what} {id}", id
            )
        if type(reply) is HelloReply:
            if reply.version not in self._offered or reply.version not in SUPPORTED_VERSIONS:
                self._hello = after(self._hello, REFUSED)
                raise self._reject(
                    codes.UNSUPPORTED_VERSION,
                    f"the server chose version {reply.version}; we offered {list(self._offered)}",
                    id,
                )
            self._hello = after(self._hello, ACCEPTED)
            self._version = reply.version
        return reply

    def send(self, event: RequestEvent) -> bytes:
        """The bytes of ``event``, a request, for the I/O layer to write.

        Raises :class:`LocalProtocolError`, sending nothing, when the event is not
        a request, reuses an outstanding id, is not a Hello while no Hello has been
        sent, or is a second Hello while one is pending or accepted.
        """
        if not isinstance(event, Request) or type(event) not in ENCODERS:
            raise LocalProtocolError(f"a client cannot send {event!r}")
        id = event.id
        if id in self._outstanding:
            raise LocalProtocolError(f"request id {id} is still outstanding")
        if type(event) is Hello:
            if not can(self._hello, HELLO):
                raise LocalProtocolError("a Hello was already sent")
        elif self._hello is IDLE:
            raise LocalProtocolError(f"{type(event).__name__} before Hello")
        if type(event) is Wait and self._fast:
            data = encode_wait(id, event.offset, event.length)
            self._outstanding[id] = Wait
            return self._sent(data)
        data = self._pack(event)
        if type(event) is Hello:
            self._hello = after(self._hello, HELLO)
            self._offered = event.versions
        self._outstanding[id] = type(event)
        return self._sent(data)
