"""The protocol's exceptions, which say whose fault it was (as h11's do)."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error the ``protocol`` package raises."""


class LocalProtocolError(ProtocolError):
    """This side misused the API: an invalid event, or one it may not send now.

    Nothing was sent and the connection's state is unchanged.
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent bad input.

    ``code`` is one of :mod:`protocol.codes`; ``id`` is the request id when one could
    be read from the bad message (a server answers it with
    ``ErrorReply.for_error(exc)``), else ``None``.

    ``fatal`` is true when the byte stream can no longer be trusted (``bad-frame``,
    ``too-large``, ``truncated``): every later ``next_event()`` raises this error
    again and the connection should be closed, after at most one ``ErrorReply``.
    A non-fatal error concerns one message only, which has been consumed:
    ``next_event()`` goes on with the next one.
    """

    def __init__(self, code: str, message: str, id: int | None = None, fatal: bool = False) -> None:
        super().__init__(code, message, id, fatal)
        self.code = code
        self.message = message
        self.id = id
        self.fatal = fatal

    def __str__(self) -> str:
        where = "" if self.id is None else f" (request {self.id})"
        return f"{self.code}{where}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"RemoteProtocolError(code={self.code!r}, message={self.message!r}, "
            f"id={self.id!r}, fatal={self.fatal!r})"
        )
