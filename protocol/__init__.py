"""The sans-I/O wire protocol between page-load clients and the daemon.

One connection object per side, after h11: :class:`ClientConnection` and
:class:`ServerConnection` turn bytes into events and events into bytes, and never
touch a socket.  Messages are msgpack maps; ``docs/PROTOCOL.md`` describes them.

    conn = ServerConnection()
    conn.receive_data(data)          # b"" when the peer closed
    event = conn.next_event()        # an event, NEED_DATA or CLOSED
    sock.send(conn.send(Loaded(event.id)))

Errors say whose fault it was: :class:`LocalProtocolError` (this side misused the
API) or :class:`RemoteProtocolError` (the peer sent bad input; ``code`` is one of
:mod:`protocol.codes` and ``fatal`` says whether the connection survives).
"""

from . import codes
from ._client_connection import ClientConnection
from ._connection import CLOSED, NEED_DATA, ConnectionStatistics, Marker
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    Accepted,
    ErrorReply,
    Event,
    GetLoadedMap,
    GetMemoryFd,
    GetStats,
    Hello,
    HelloReply,
    Loaded,
    LoadedMapReply,
    Mark,
    Marked,
    MemoryFdReply,
    Prefetch,
    RegisterUffd,
    Reply,
    ReplyEvent,
    Request,
    RequestEvent,
    StatsReply,
    UffdRegistered,
    Wait,
)
from ._limits import Limits
from ._server_connection import ServerConnection
from ._wire import SUPPORTED_VERSIONS, negotiate

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "SUPPORTED_VERSIONS",
    "Accepted",
    "ClientConnection",
    "ConnectionStatistics",
    "ErrorReply",
    "Event",
    "GetLoadedMap",
    "GetMemoryFd",
    "GetStats",
    "Hello",
    "HelloReply",
    "Limits",
    "Loaded",
    "LocalProtocolError",
    "Mark",
    "Marked",
    "Marker",
    "LoadedMapReply",
    "MemoryFdReply",
    "Prefetch",
    "RegisterUffd",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "ReplyEvent",
    "Request",
    "RequestEvent",
    "ServerConnection",
    "StatsReply",
    "UffdRegistered",
    "Wait",
    "codes",
    "negotiate",
]
