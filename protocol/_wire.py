"""The mapping between events and the msgpack maps on the wire.

Requests are maps with an ``op`` and an ``id``; replies are maps with ``re`` (the
request id) and either ``ok`` (naming the kind of success) or ``err`` (an error
code).  Keys a receiver does not know are ignored, so later versions may add some.
The field-by-field layout is in ``docs/PROTOCOL.md``.

Decoders raise :class:`RemoteProtocolError` (never fatal: the message was well
framed) and take the already-validated id so that the error can carry it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import codes
from ._errors import LocalProtocolError, RemoteProtocolError
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
    StatsReply,
    UffdRegistered,
    Wait,
)
from ._limits import describe

#: Protocol versions this implementation speaks.
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)


def negotiate(versions: tuple[int, ...] | list[int]) -> int | None:
    """The highest version in both ``versions`` and :data:`SUPPORTED_VERSIONS`, or
    ``None`` when there is none."""
    common = set(versions).intersection(SUPPORTED_VERSIONS)
    return max(common) if common else None


Wire = dict[str, Any]

# ---------------------------------------------------------------- encoding

ENCODERS: dict[type[Event], Callable[[Any], Wire]] = {
    Hello: lambda e: {"op": "hello", "id": e.id, "v": e.versions, "client": e.client},
    Wait: lambda e: {"op": "wait", "id": e.id, "off": e.offset, "len": e.length},
    Prefetch: lambda e: {"op": "prefetch", "id": e.id, "off": e.offset, "len": e.length,
                         **({"ws": True} if e.working_set else {})},
    Mark: lambda e: {"op": "mark", "id": e.id},
    GetStats: lambda e: {"op": "stats", "id": e.id},
    GetMemoryFd: lambda e: {"op": "memfd", "id": e.id, "writable": True} if e.writable else {"op": "memfd", "id": e.id},
    GetLoadedMap: lambda e: {"op": "loadmap", "id": e.id},
    RegisterUffd: lambda e: {"op": "uffd-register", "id": e.id, "addr": e.address, "len": e.length,
                             "off": e.offset},
    HelloReply: lambda e: {
        "re": e.id,
        "ok": "hello",
        "v": e.version,
        "size": e.memory_size,
        "page": e.page_size,
        "done": e.done,
    },
    Loaded: lambda e: {"re": e.id, "ok": "loaded"},
    Accepted: lambda e: {"re": e.id, "ok": "accepted"},
    StatsReply: lambda e: {"re": e.id, "ok": "stats", "stats": e.stats},
    Marked: lambda e: {"re": e.id, "ok": "marked"},
    MemoryFdReply: lambda e: {"re": e.id, "ok": "memfd", "size": e.size},
    LoadedMapReply: lambda e: {"re": e.id, "ok": "loadmap", "size": e.size, "granule": e.granule},
    UffdRegistered: lambda e: {"re": e.id, "ok": "uffd-registered"},
    ErrorReply: lambda e: {"re": e.id, "err": e.code, "msg": e.message, "errno": e.errno},
}

# ---------------------------------------------------------------- decoding


def _hello(m: Wire, id: int) -> Hello:
    versions = m["v"]
    if type(versions) is not list:
        raise LocalProtocolError(f"v must be an array of versions, not {describe(versions)}")
    return Hello(id, tuple(versions), m.get("client", ""))


def _hello_reply(m: Wire, id: int) -> HelloReply:
    return HelloReply(id, m["v"], m["size"], m["page"], m["done"])


def error_reply(m: Wire, id: int | None) -> ErrorReply:
    """Decoder of replies with ``err``; ``id`` is ``None`` for connection errors."""
    return ErrorReply(id, m["err"], m.get("msg", ""), m.get("errno"))


#: Request decoders, by ``op``.
REQUESTS: dict[str, Callable[[Wire, int], Event]] = {
    "hello": _hello,
    "wait": lambda m, id: Wait(id, m["off"], m["len"]),
    "prefetch": lambda m, id: Prefetch(id, m["off"], m["len"], m.get("ws", False)),
    "mark": lambda m, id: Mark(id),
    "stats": lambda m, id: GetStats(id),
    "memfd": lambda m, id: GetMemoryFd(id, m.get("writable", False)),
    "loadmap": lambda m, id: GetLoadedMap(id),
    "uffd-register": lambda m, id: RegisterUffd(id, m["addr"], m["len"], m["off"]),
}

#: Success-reply decoders, by ``ok``.
REPLIES: dict[str, Callable[[Wire, int], Event]] = {
    "hello": _hello_reply,
    "loaded": lambda m, id: Loaded(id),
    "accepted": lambda m, id: Accepted(id),
    "stats": lambda m, id: StatsReply(id, m["stats"]),
    "marked": lambda m, id: Marked(id),
    "memfd": lambda m, id: MemoryFdReply(id, m["size"]),
    "loadmap": lambda m, id: LoadedMapReply(id, m["size"], m["granule"]),
    "uffd-registered": lambda m, id: UffdRegistered(id),
}


def decode(
    decoder: Callable[[Wire, Any], Event], message: Wire, id: int | None, what: str
) -> Event:
    """Run ``decoder``, turning a missing or invalid field into ``bad-message``."""
    try:
        return decoder(message, id)
    except KeyError as exc:
        raise RemoteProtocolError(
            codes.BAD_MESSAGE, f"{what} lacks the field {exc.args[0]!r}", id
        ) from None
    except LocalProtocolError as exc:
        raise RemoteProtocolError(codes.BAD_MESSAGE, f"{what}: {exc}", id) from None


def read_id(message: object, key: str) -> int | None:
    """The request id under ``key``, or ``None`` if there is no valid one."""
    if type(message) is not dict:
        return None
    id = message.get(key)
    if type(id) is int and 0 <= id < 2**63:
        return id
    return None
