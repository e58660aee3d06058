"""Error codes: the ``code`` of a :class:`~protocol.RemoteProtocolError` and of an
:class:`~protocol.ErrorReply` on the wire.

The connection objects raise the first group themselves when the peer's input is bad;
the server application sends the second group in ``ErrorReply`` when a well-formed
request cannot be served.  ``docs/PROTOCOL.md`` has the table of who is at fault and
whether the connection survives.
"""

from __future__ import annotations

# Raised by the connection objects (the peer sent bad input).
BAD_FRAME = "bad-frame"  #: undecodable msgpack; fatal
TOO_LARGE = "too-large"  #: a message over a size limit; fatal
TRUNCATED = "truncated"  #: EOF in the middle of a message; fatal
BAD_MESSAGE = "bad-message"  #: well framed, but not a map or a field is missing/mistyped
UNKNOWN_OP = "unknown-op"  #: a request naming an operation this version does not have
HELLO_REQUIRED = "hello-required"  #: a request before a successful Hello
UNSUPPORTED_VERSION = "unsupported-version"  #: no protocol version in common
DUPLICATE_ID = "duplicate-id"  #: a request reusing the id of one still outstanding
UNKNOWN_ID = "unknown-id"  #: (client side) a reply to no outstanding request

# Sent by the server application.
OUT_OF_RANGE = "out-of-range"  #: the range runs past the guest memory size
IO_ERROR = "io-error"  #: reading the pages failed; ``errno`` says how (none: the pages file is too short)
CORRUPT = "corrupt"  #: the pages read do not match the checkpoint's checksum
TIMEOUT = "timeout"  #: reading the pages took longer than the daemon's read deadline
#: the pages' source (an object store) kept failing past its retries; the message is the store's
UNAVAILABLE = "unavailable"
SHUTTING_DOWN = "shutting-down"  #: the daemon is stopping; the request will not complete
TOO_MANY_ERRORS = "too-many-errors"  #: the server gives up on a misbehaving client
TOO_MANY_REQUESTS = "too-many-requests"  #: this connection already has the most waits pending
CANCELLED = "cancelled"  #: the request was abandoned by the server
FORBIDDEN = "forbidden"  #: the request is well formed but this daemon does not allow it
INTERNAL_ERROR = "internal-error"  #: the server failed on this connection (a bug); it closes it
UNSUPPORTED = "unsupported"  #: the request needs a kernel feature that is missing

#: Codes after which the byte stream cannot be trusted: the connection is dead.
FATAL = frozenset({BAD_FRAME, TOO_LARGE, TRUNCATED})

#: Every code this version defines.  Peers must accept codes outside this set
#: (a newer server may add some) and treat them as a failure of that request.
ALL = frozenset(
    {
        BAD_FRAME,
        TOO_LARGE,
        TRUNCATED,
        BAD_MESSAGE,
        UNKNOWN_OP,
        HELLO_REQUIRED,
        UNSUPPORTED_VERSION,
        DUPLICATE_ID,
        UNKNOWN_ID,
        OUT_OF_RANGE,
        IO_ERROR,
        CORRUPT,
        TIMEOUT,
        UNAVAILABLE,
        SHUTTING_DOWN,
        TOO_MANY_ERRORS,
        TOO_MANY_REQUESTS,
        CANCELLED,
        FORBIDDEN,
        INTERNAL_ERROR,
        UNSUPPORTED,
    }
)
