"""The sans-I/O protocol: plain synchronous tests, no sockets."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest

import protocol
from protocol import (
    CLOSED,
    NEED_DATA,
    SUPPORTED_VERSIONS,
    Accepted,
    ClientConnection,
    ErrorReply,
    GetMemoryFd,
    GetStats,
    Hello,
    HelloReply,
    Limits,
    Loaded,
    LocalProtocolError,
    MemoryFdReply,
    Prefetch,
    ProtocolError,
    RemoteProtocolError,
    ServerConnection,
    StatsReply,
    Wait,
    codes,
    negotiate,
)

HELLO_REPLY = HelloReply(0, 1, 1 << 30, 4096, False)


def drain(conn: Any) -> list[Any]:
    """Every event buffered in ``conn``, up to NEED_DATA or CLOSED (not included)."""
    events: list[Any] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is CLOSED:
            return events
        events.append(event)


def handshake() -> tuple[ClientConnection, ServerConnection]:
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send(Hello(0, (1,), "test")))
    assert drain(server) == [Hello(0, (1,), "test")]
    client.receive_data(server.send(HELLO_REPLY))
    assert drain(client) == [HELLO_REPLY]
    return client, server


def feed_server(data: bytes, server: ServerConnection | None = None) -> ServerConnection:
    """A server past the handshake (Hello id 0) that has received ``data``."""
    if server is None:
        server = ServerConnection()
    if server.version is None:
        server.receive_data(packb({"op": "hello", "id": 0, "v": [1]}))
        assert drain(server) == [Hello(0, (1,))]
        server.send(HELLO_REPLY)
    if data:  # b"" would mean EOF
        server.receive_data(data)
    return server


def packb(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def remote_error(conn: Any) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    return info.value


# ---------------------------------------------------------------- public surface


def test_public_surface() -> None:
    assert sorted(protocol.__all__) == sorted(
        [
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
            "Mark",  # working sets: end the recording window
            "Marked",
            "Marker",
            "LoadedMapReply",
            "MemoryFdReply",
            "Prefetch",
            "ProtocolError",
            "RegisterUffd",  # zero-copy userfaultfd mode
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
    )
    for name in protocol.__all__:
        assert getattr(protocol, name) is not None
    public = {n for n in dir(protocol) if not n.startswith("_")}
    # Nothing public beyond __all__ except the private modules' names.
    assert public - set(protocol.__all__) <= {"annotations"}


def test_error_codes() -> None:
    assert codes.ALL == {
        "bad-frame",
        "too-large",
        "truncated",
        "bad-message",
        "unknown-op",
        "hello-required",
        "unsupported-version",
        "duplicate-id",
        "unknown-id",
        "out-of-range",
        "io-error",
        "corrupt",
        "timeout",
        "unavailable",  # the object store kept failing (a checkpoint in a store)
        "shutting-down",
        "too-many-errors",
        "too-many-requests",
        "cancelled",
        "forbidden",
        "internal-error",
        "unsupported",  # zero-copy userfaultfd mode on a kernel without MINOR shmem faults
    }
    assert codes.FATAL == {codes.BAD_FRAME, codes.TOO_LARGE, codes.TRUNCATED}
    assert codes.OUT_OF_RANGE == "out-of-range"
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)


def test_sentinels() -> None:
    assert repr(NEED_DATA) == "NEED_DATA" and repr(CLOSED) == "CLOSED"
    assert len({NEED_DATA, CLOSED}) == 2


# ---------------------------------------------------------------- round trips

REQUESTS: list[protocol.RequestEvent] = [
    Hello(0, (1, 2), "firecracker-vm-7"),
    Wait(1, 0, 4096),
    Wait(2, 2**64 - 4096, 4096),
    Prefetch(3, 1 << 20, 1 << 30),
    GetStats(4),
    GetMemoryFd(2**63 - 1),
]


def test_requests_round_trip() -> None:
    client, server = ClientConnection(), ServerConnection()
    for request in REQUESTS:
        server.receive_data(client.send(request))
        assert drain(server) == [request]
    assert set(server.outstanding) == {r.id for r in REQUESTS}
    assert set(client.outstanding) == {r.id for r in REQUESTS}


def test_replies_round_trip() -> None:
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(b"".join(client.send(r) for r in REQUESTS))
    assert drain(server) == REQUESTS
    stats = {
        "loaded": 12,
        "rate": 1.5,
        "done": False,
        "name": "x",
        "none": None,
        "hist": [0, 1, 2**63],
        "nested": {"a": [{"b": -1}]},
    }
    replies: list[protocol.ReplyEvent] = [
        HelloReply(0, 1, 1 << 34, 4096, True),
        Loaded(1),
        ErrorReply(2, codes.IO_ERROR, "pread failed", 5),
        Accepted(3),
        StatsReply(4, stats),
        MemoryFdReply(2**63 - 1, 1 << 34),
    ]
    for reply in replies:
        client.receive_data(server.send(reply))
        assert drain(client) == [reply]
    assert not client.outstanding and not server.outstanding
    assert client.version == server.version == 1


def test_memory_fd_request_writable_field() -> None:
    client, server = handshake()
    plain = client.send(GetMemoryFd(1))
    assert plain == packb({"op": "memfd", "id": 1})  # read-only: the field is left out
    writable = client.send(GetMemoryFd(2, writable=True))
    assert writable == packb({"op": "memfd", "id": 2, "writable": True})
    server.receive_data(plain + writable + packb({"op": "memfd", "id": 3, "writable": 1}))
    assert server.next_event() == GetMemoryFd(1)
    assert server.next_event() == GetMemoryFd(2, writable=True)
    error = remote_error(server)
    assert (error.code, error.id) == (codes.BAD_MESSAGE, 3) and "writable must be a bool" in error.message


def test_connection_error_reply_round_trip() -> None:
    client, server = handshake()
    reply = ErrorReply(None, codes.SHUTTING_DOWN, "the daemon is stopping")
    client.receive_data(server.send(reply))
    assert drain(client) == [reply]


def test_wire_layout() -> None:
    """The bytes are the documented maps (docs/PROTOCOL.md shows these in hex)."""
    client, server = handshake()
    wait = client.send(Wait(7, 0, 4096))
    assert wait == packb({"op": "wait", "id": 7, "off": 0, "len": 4096})
    assert wait.hex() == "84a26f70a477616974a2696407a36f666600a36c656ecd1000"
    server.receive_data(wait)
    drain(server)
    assert server.send(Loaded(7)) == packb({"re": 7, "ok": "loaded"})
    assert packb({"re": 7, "ok": "loaded"}).hex() == "82a2726507a26f6ba66c6f61646564"


def test_documented_examples() -> None:
    """Each JSON-ish example in docs/PROTOCOL.md is followed by its exact bytes, and
    decodes to a valid event."""
    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    lines = doc.splitlines()
    pairs = [
        (json.loads(line), bytes.fromhex(lines[i + 1]))
        for i, line in enumerate(lines)
        if line.startswith('{"op"') or line.startswith('{"re"')
    ]
    assert len(pairs) == 17  # 12, working sets: prefetch with ws, mark, marked; uffd-register, uffd-registered
    server, client = ServerConnection(), ClientConnection()
    for message, data in pairs:
        assert packb(message) == data, message
        if "op" in message:
            server.receive_data(data)
            request = server.next_event()
            assert isinstance(request, protocol.Request)
            assert client.send(request) == data
        else:
            client.receive_data(data)
            try:
                reply = client.next_event()
                assert isinstance(reply, protocol.Reply)
            except RemoteProtocolError as exc:
                assert exc.code == codes.UNKNOWN_ID and message["re"] == 11
                continue
            assert server.send(reply) == data


def test_unknown_keys_are_ignored() -> None:
    server = feed_server(packb({"op": "wait", "id": 5, "off": 0, "len": 1, "future": [1, 2]}))
    assert drain(server) == [Wait(5, 0, 1)]


# ---------------------------------------------------------------- framing


def test_one_byte_at_a_time() -> None:
    client = ClientConnection()
    data = b"".join(client.send(r) for r in REQUESTS)
    whole = ServerConnection()
    whole.receive_data(data)
    expected = drain(whole)
    server = ServerConnection()
    got: list[Any] = []
    for i in range(len(data)):
        server.receive_data(data[i : i + 1])
        got += drain(server)
    assert got == expected == REQUESTS

    replies: list[protocol.ReplyEvent] = [
        HELLO_REPLY,
        StatsReply(4, {"hist": list(range(300))}),
        Loaded(1),
    ]
    out = b"".join(whole.send(r) for r in replies)
    for i in range(len(out)):
        client.receive_data(out[i : i + 1])
        got += drain(client)
    assert got[len(REQUESTS) :] == replies


def test_pipelined_requests_in_one_chunk() -> None:
    client = ClientConnection()
    chunk = client.send(Hello(0, (1,))) + b"".join(
        client.send(Wait(i, i * 4096, 4096)) for i in range(1, 101)
    )
    server = ServerConnection()
    server.receive_data(chunk)
    events = drain(server)
    assert events == [Hello(0, (1,))] + [Wait(i, i * 4096, 4096) for i in range(1, 101)]
    assert server.next_event() is NEED_DATA


def test_replies_out_of_order() -> None:
    client, server = handshake()
    server.receive_data(b"".join(client.send(Wait(i, 0, 4096)) for i in (1, 2, 3)))
    drain(server)
    out = (
        server.send(Loaded(3))
        + server.send(ErrorReply(1, codes.CANCELLED))
        + server.send(Loaded(2))
    )
    client.receive_data(out)
    assert drain(client) == [Loaded(3), ErrorReply(1, codes.CANCELLED), Loaded(2)]
    assert not client.outstanding


def test_chunk_larger_than_buffer_holds_many_messages() -> None:
    """A chunk over max_buffer_size made of small messages is not "too-large"."""
    server = feed_server(b"", ServerConnection(Limits.server(max_buffer_size=64)))
    chunk = b"".join(packb({"op": "wait", "id": i, "off": 0, "len": 1}) for i in range(1, 200))
    assert len(chunk) > 20 * 64
    server.receive_data(chunk)
    assert server.statistics().buffered_bytes == len(chunk)
    assert drain(server) == [Wait(i, 0, 1) for i in range(1, 200)]
    assert server.statistics().buffered_bytes == 0


def test_received_buffer_may_be_reused_at_once() -> None:
    server = feed_server(b"", ServerConnection(Limits.server(max_buffer_size=32)))
    chunk = b"".join(packb({"op": "wait", "id": i, "off": 0, "len": 1}) for i in range(1, 30))
    buffer = bytearray(chunk)
    server.receive_data(memoryview(buffer))
    buffer[:] = b"\xc1" * len(buffer)  # the caller reuses its receive buffer
    assert drain(server) == [Wait(i, 0, 1) for i in range(1, 30)]


def test_message_of_exactly_max_buffer_size() -> None:
    base = {"op": "wait", "id": 1, "off": 0, "len": 1, "pad": ""}
    pad = 100 - len(packb(base)) - 1  # str header grows by 1 byte past 31 chars
    message = packb({**base, "pad": "x" * pad})
    assert len(message) == 100
    server = feed_server(message, ServerConnection(Limits.server(max_buffer_size=100)))
    assert drain(server) == [Wait(1, 0, 1)]
    over = packb({**base, "id": 2, "pad": "x" * (pad + 1)})
    assert len(over) == 101
    server.receive_data(over)
    error = remote_error(server)
    assert (error.code, error.fatal) == (codes.TOO_LARGE, True)


# ---------------------------------------------------------------- bad input


NON_FATAL = [
    # (name, bytes, code, id)
    ("scalar int", b"\x01", codes.BAD_MESSAGE, None),
    ("nil", b"\xc0", codes.BAD_MESSAGE, None),
    ("array", packb([1, 2, 3]), codes.BAD_MESSAGE, None),
    ("ext", b"\xd4\x01\x00", codes.BAD_MESSAGE, None),
    ("no id", packb({"op": "wait", "off": 0, "len": 1}), codes.BAD_MESSAGE, None),
    ("negative id", packb({"op": "stats", "id": -1}), codes.BAD_MESSAGE, None),
    ("bool id", packb({"op": "stats", "id": True}), codes.BAD_MESSAGE, None),
    ("id too big", packb({"op": "stats", "id": 2**63}), codes.BAD_MESSAGE, None),
    ("str id", packb({"op": "stats", "id": "7"}), codes.BAD_MESSAGE, None),
    ("no op", packb({"id": 7}), codes.BAD_MESSAGE, 7),
    ("op not str", packb({"op": 3, "id": 7}), codes.BAD_MESSAGE, 7),
    ("unknown op", packb({"op": "format-disk", "id": 7}), codes.UNKNOWN_OP, 7),
    ("missing len", packb({"op": "wait", "id": 7, "off": 0}), codes.BAD_MESSAGE, 7),
    (
        "negative offset",
        packb({"op": "wait", "id": 7, "off": -4096, "len": 1}),
        codes.BAD_MESSAGE,
        7,
    ),
    ("zero length", packb({"op": "prefetch", "id": 7, "off": 0, "len": 0}), codes.BAD_MESSAGE, 7),
    ("str offset", packb({"op": "wait", "id": 7, "off": "0", "len": 1}), codes.BAD_MESSAGE, 7),
    ("bool length", packb({"op": "wait", "id": 7, "off": 0, "len": True}), codes.BAD_MESSAGE, 7),
    ("float length", packb({"op": "wait", "id": 7, "off": 0, "len": 1.0}), codes.BAD_MESSAGE, 7),
    (
        "past 2**64",
        packb({"op": "wait", "id": 7, "off": 2**64 - 1, "len": 2}),
        codes.BAD_MESSAGE,
        7,
    ),
    ("second hello", packb({"op": "hello", "id": 7, "v": [1]}), codes.BAD_MESSAGE, 7),
]


@pytest.mark.parametrize("name, data, code, id", NON_FATAL, ids=[c[0] for c in NON_FATAL])
def test_bad_message_is_not_fatal(name: str, data: bytes, code: str, id: int | None) -> None:
    follow = packb({"op": "stats", "id": 99})
    server = feed_server(data + follow)
    error = remote_error(server)
    assert (error.code, error.id, error.fatal) == (code, id, False)
    assert error.message
    # The bad message was consumed; the next one decodes.
    assert drain(server) == [GetStats(99)]
    assert server.statistics().remote_errors == 1
    if id is not None:
        # A rejected request stays outstanding until answered, by ErrorReply only.
        assert id in server.outstanding
        with pytest.raises(LocalProtocolError):
            server.send(Loaded(id))
        assert server.send(ErrorReply.for_error(error)) == packb(
            {"re": id, "err": code, "msg": error.message, "errno": None}
        )
        assert id not in server.outstanding


FATAL = [
    ("0xc1", b"\xc1", codes.BAD_FRAME),
    ("0xc1 inside a map", b"\x82\xa2op\xc1", codes.BAD_FRAME),
    ("invalid utf-8", b"\x82\xa2op\xa2\xff\xfe\xa2id\x07", codes.BAD_FRAME),
    ("int map key", packb({1: 2}), codes.BAD_FRAME),
    ("invalid timestamp", b"\xd5\xff\x00\x00", codes.BAD_FRAME),
    ("nested too deep", b"\x91" * 5000, codes.TOO_LARGE),
    ("map too long", packb({str(i): i for i in range(100)}), codes.TOO_LARGE),
    ("array too long", packb({"op": "hello", "id": 1, "v": list(range(1, 100))}), codes.TOO_LARGE),
    (
        "str too long",
        packb({"op": "hello", "id": 1, "v": [1], "client": "x" * 2000}),
        codes.TOO_LARGE,
    ),
    ("bin too long", packb({"op": "stats", "id": 1, "x": b"\0" * 2000}), codes.TOO_LARGE),
    (
        "over max_buffer_size",
        packb({"op": "stats", "id": 1, "x": [["y" * 1000] * 40] * 2}),
        codes.TOO_LARGE,
    ),
]


@pytest.mark.parametrize("name, data, code", FATAL, ids=[c[0] for c in FATAL])
@pytest.mark.parametrize("chunk", [None, 1], ids=["whole", "bytewise"])
def test_bad_frame_is_fatal(name: str, data: bytes, code: str, chunk: int | None) -> None:
    server = feed_server(b"")
    error = None
    pieces = [data] if chunk is None else [data[i : i + 1] for i in range(len(data))]
    for piece in pieces + [packb({"op": "stats", "id": 99})]:
        server.receive_data(piece)
        try:
            drain(server)
        except RemoteProtocolError as exc:
            error = exc
            break
    assert error is not None
    assert (error.code, error.id, error.fatal) == (code, None, True)
    # The connection is dead: the same error again, whatever arrives later.
    server.receive_data(packb({"op": "stats", "id": 100}))
    again = remote_error(server)
    assert (again.code, again.message, again.fatal) == (error.code, error.message, True)
    assert server.statistics().failed
    # A last connection-level ErrorReply may still be sent.
    assert server.send(ErrorReply(None, error.code, error.message))


def test_slow_huge_array_is_too_large() -> None:
    """A message consumed piecemeal by the unpacker is still bounded by max_buffer_size."""
    server = ServerConnection(Limits.server(max_buffer_size=256, max_array_len=10_000))
    message = b"\xdc\x27\x10" + b"\xc0" * 10_000  # array of 10000 nils
    error = None
    for i in range(0, len(message), 16):
        server.receive_data(message[i : i + 16])
        try:
            assert server.next_event() is NEED_DATA
        except RemoteProtocolError as exc:
            error = exc
            break
    assert error is not None and (error.code, error.fatal) == (codes.TOO_LARGE, True)
    assert i < 1024


def test_eof_mid_message_is_truncated() -> None:
    data = packb({"op": "wait", "id": 1, "off": 0, "len": 4096})
    server = feed_server(data[:-3])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    error = remote_error(server)
    assert (error.code, error.fatal) == (codes.TRUNCATED, True)
    assert remote_error(server).code == codes.TRUNCATED


def test_eof_after_whole_messages_is_closed() -> None:
    server = feed_server(packb({"op": "stats", "id": 1}))
    server.receive_data(b"")
    assert server.next_event() == GetStats(1)
    assert server.next_event() is CLOSED
    assert server.next_event() is CLOSED
    server.receive_data(b"")  # a second EOF is harmless
    assert server.statistics().eof
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")
    # Half-closed: replies can still be sent.
    assert server.send(StatsReply(1, {})) == packb({"re": 1, "ok": "stats", "stats": {}})


def test_duplicate_id() -> None:
    server = feed_server(packb({"op": "wait", "id": 5, "off": 0, "len": 1}) * 2)
    assert server.next_event() == Wait(5, 0, 1)
    error = remote_error(server)
    assert (error.code, error.id, error.fatal) == (codes.DUPLICATE_ID, None, False)
    server.send(Loaded(5))
    server.receive_data(packb({"op": "wait", "id": 5, "off": 0, "len": 1}))
    assert server.next_event() == Wait(5, 0, 1)  # ids may be reused once answered


# ---------------------------------------------------------------- handshake


def test_negotiate() -> None:
    assert SUPPORTED_VERSIONS == (1,)
    assert negotiate((1,)) == 1
    assert negotiate((3, 1, 2)) == 1
    assert negotiate([2, 3]) is None
    assert negotiate(()) is None


def test_hello_required() -> None:
    server = ServerConnection()
    server.receive_data(packb({"op": "wait", "id": 3, "off": 0, "len": 1}))
    error = remote_error(server)
    assert (error.code, error.id, error.fatal) == (codes.HELLO_REQUIRED, 3, False)
    with pytest.raises(LocalProtocolError):
        server.send(Loaded(3))
    server.send(ErrorReply.for_error(error))
    # Hello then a pipelined request before the HelloReply is sent: both fine.
    server.receive_data(packb({"op": "hello", "id": 4, "v": [1]}) + packb({"op": "stats", "id": 5}))
    assert drain(server) == [Hello(4, (1,)), GetStats(5)]
    with pytest.raises(LocalProtocolError, match="before the HelloReply"):
        server.send(StatsReply(5, {}))
    server.send(HelloReply(4, 1, 4096, 4096, False))
    server.send(StatsReply(5, {}))


def test_unsupported_version_then_retry() -> None:
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send(Hello(0, (7, 8))))
    error = remote_error(server)
    assert (error.code, error.id, error.fatal) == (codes.UNSUPPORTED_VERSION, 0, False)
    assert "[7, 8]" in error.message
    client.receive_data(server.send(ErrorReply.for_error(error)))
    assert drain(client) == [ErrorReply(0, codes.UNSUPPORTED_VERSION, error.message)]
    # The client may try again with other versions.
    server.receive_data(client.send(Hello(1, (1, 7))))
    assert drain(server) == [Hello(1, (1, 7))]
    with pytest.raises(LocalProtocolError):
        server.send(HelloReply(1, 7, 4096, 4096, False))  # not one the server speaks
    client.receive_data(server.send(HelloReply(1, 1, 4096, 4096, False)))
    assert drain(client) == [HelloReply(1, 1, 4096, 4096, False)]
    assert client.version == server.version == 1


def test_client_rejects_version_it_did_not_offer() -> None:
    client = ClientConnection()
    client.send(Hello(0, (1,)))
    client.receive_data(
        packb({"re": 0, "ok": "hello", "v": 2, "size": 0, "page": 4096, "done": True})
    )
    error = remote_error(client)
    assert (error.code, error.id, error.fatal) == (codes.UNSUPPORTED_VERSION, 0, False)
    assert client.version is None


# ---------------------------------------------------------------- client-side input


def test_client_bad_replies() -> None:
    client, server = handshake()
    client.send(Wait(1, 0, 4096))
    client.send(GetStats(2))
    client.receive_data(
        packb({"re": 42, "ok": "loaded"})  # nobody asked
        + packb({"re": 2, "ok": "loaded"})  # wrong type for a GetStats
        + packb({"re": 1, "ok": "teleported"})
        + packb({"re": None, "ok": "loaded"})
        + packb({"re": "x", "err": "io-error"})
        + packb([1])
    )
    expected = [
        (codes.UNKNOWN_ID, 42),
        (codes.BAD_MESSAGE, 2),
        (codes.BAD_MESSAGE, 1),
        (codes.BAD_MESSAGE, None),
        (codes.BAD_MESSAGE, None),
        (codes.BAD_MESSAGE, None),
    ]
    for code, id in expected:
        error = remote_error(client)
        assert (error.code, error.id, error.fatal) == (code, id, False)
    # Each request counts as answered, badly.
    assert not client.outstanding
    assert client.next_event() is NEED_DATA


def test_client_accepts_unknown_error_codes() -> None:
    client, server = handshake()
    client.send(Wait(1, 0, 4096))
    client.receive_data(packb({"re": 1, "err": "quota-exceeded", "msg": "from a newer server"}))
    assert drain(client) == [ErrorReply(1, "quota-exceeded", "from a newer server")]


def test_client_bad_stats_reply() -> None:
    client, server = handshake()
    client.send(GetStats(1))
    client.receive_data(packb({"re": 1, "ok": "stats", "stats": {b"bytes-key": 1}}))
    error = remote_error(client)
    assert (error.code, error.id) == (codes.BAD_MESSAGE, 1)


def test_client_limits_are_roomier() -> None:
    client, server = handshake()
    client.send(GetStats(1))
    server.receive_data(packb({"op": "stats", "id": 1}))
    drain(server)
    stats = {"histogram": list(range(50_000)), "names": ["x" * 100] * 1000}
    reply = server.send(StatsReply(1, stats))
    assert len(reply) > 200_000
    client.receive_data(reply)
    assert drain(client) == [StatsReply(1, stats)]


# ---------------------------------------------------------------- local misuse


@pytest.mark.parametrize(
    "build",
    [
        lambda: Wait(1, -1, 4096),
        lambda: Wait(1, 0, 0),
        lambda: Wait(1, 0, -5),
        lambda: Wait(-1, 0, 1),
        lambda: Wait(2**63, 0, 1),
        lambda: Wait(True, 0, 1),
        lambda: Wait(1, 1.0, 1),  # type: ignore[arg-type]
        lambda: Prefetch(1, 2**64 - 1, 2),
        lambda: Hello(1, ()),
        lambda: Hello(1, [1]),  # type: ignore[arg-type]
        lambda: Hello(1, (0,)),
        lambda: Hello(1, (1,), "x" * 1000),
        lambda: HelloReply(1, 1, 4096, 3000, False),
        lambda: HelloReply(1, 1, 4096, 4096, 0),  # type: ignore[arg-type]
        lambda: HelloReply(1, 0, 4096, 4096, False),
        lambda: MemoryFdReply(1, -1),
        lambda: StatsReply(1, {"s": {1, 2}}),
        lambda: StatsReply(1, {1: 2}),  # type: ignore[dict-item]
        lambda: StatsReply(1, [1]),  # type: ignore[arg-type]
        lambda: StatsReply(1, {"big": 2**64}),
        lambda: ErrorReply(1, ""),
        lambda: ErrorReply(1, "io-error", "x", -5),
        lambda: ErrorReply(-1, "io-error"),
        lambda: GetMemoryFd(1, 1),  # type: ignore[arg-type]
    ],
)
def test_invalid_events(build: Any) -> None:
    with pytest.raises(LocalProtocolError):
        build()


def test_events_are_frozen() -> None:
    wait = Wait(1, 0, 4096)
    with pytest.raises(AttributeError):
        wait.offset = 5  # type: ignore[misc]
    assert not hasattr(wait, "__dict__")


def test_client_misuse() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError, match="before Hello"):
        client.send(Wait(1, 0, 4096))
    with pytest.raises(LocalProtocolError, match="cannot send"):
        client.send(Loaded(1))  # type: ignore[arg-type]
    client.send(Hello(0, (1,)))
    with pytest.raises(LocalProtocolError, match="already sent"):
        client.send(Hello(1, (1,)))
    client.send(Wait(1, 0, 4096))
    with pytest.raises(LocalProtocolError, match="outstanding"):
        client.send(Wait(1, 4096, 4096))
    with pytest.raises(LocalProtocolError):
        client.send(Hello(0, (1,), "\udcff"))  # not encodable; nothing sent
    assert set(client.outstanding) == {0, 1}
    assert client.statistics().messages_sent == 2


def test_server_misuse() -> None:
    client, server = handshake()
    with pytest.raises(LocalProtocolError, match="cannot send"):
        server.send(Wait(1, 0, 4096))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="no request 9"):
        server.send(Loaded(9))
    server.receive_data(client.send(GetStats(9)))
    drain(server)
    with pytest.raises(LocalProtocolError, match="cannot answer GetStats"):
        server.send(Loaded(9))
    server.send(StatsReply(9, {}))
    with pytest.raises(LocalProtocolError, match="no request 9"):
        server.send(StatsReply(9, {}))  # answered once only


def test_max_send_size() -> None:
    client, server = handshake()
    server.receive_data(client.send(GetStats(1)))
    drain(server)
    with pytest.raises(LocalProtocolError, match="max_send_size"):
        server.send(StatsReply(1, {"x": "y" * (2 << 20)}))
    assert 1 in server.outstanding  # nothing was sent
    server.send(StatsReply(1, {"x": "small"}))


def test_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_buffer_size"):
        Limits.server(max_buffer_size=0)
    with pytest.raises(ValueError, match="max_depth"):
        Limits.client(max_depth=True)
    with pytest.raises(TypeError):
        ServerConnection({"max_buffer_size": 1})  # type: ignore[arg-type]


def test_limits_are_one_frozen_object() -> None:
    limits = Limits.server(max_str_len=10)
    assert ServerConnection(limits).limits is limits
    assert limits.max_buffer_size == Limits.server().max_buffer_size
    with pytest.raises(AttributeError):
        limits.max_str_len = 11  # type: ignore[misc]
    # Each side's default send size is what the other side accepts.
    assert Limits.server().max_send_size == Limits.client().max_buffer_size
    assert Limits.client().max_send_size == Limits.server().max_buffer_size


def test_statistics() -> None:
    client, server = handshake()
    data = client.send(Wait(1, 0, 4096))
    server.receive_data(data[:5])
    stats = server.statistics()
    assert stats.role == "server" and stats.version == 1
    assert stats.buffered_bytes == 5
    assert stats.messages_received == 1 and stats.messages_sent == 1
    assert stats.outstanding == 0
    server.receive_data(data[5:])
    drain(server)
    stats = server.statistics()
    assert stats.buffered_bytes == 0 and stats.outstanding == 1
    assert (
        stats.bytes_received == server.statistics().bytes_received == client.statistics().bytes_sent
    )
    assert not stats.eof and not stats.failed


# ---------------------------------------------------------------- hostile values


def test_deeply_nested_id_is_too_large_not_recursion() -> None:
    """A 1000-deep array as the id raised RecursionError from repr()."""
    server = ServerConnection()
    server.receive_data(b"\x82\xa2op\xa4wait\xa2id" + b"\x91" * 1000 + b"\x00")
    error = remote_error(server)
    assert (error.code, error.fatal) == (codes.TOO_LARGE, True)
    assert "nested" in error.message


@pytest.mark.parametrize("depth", [8, 9, 30])
def test_nesting_limit(depth: int) -> None:
    limits = Limits.server(max_depth=8)
    value: Any = 0
    for _ in range(depth - 1):  # the request map itself is one level
        value = [value]
    server = feed_server(packb({"op": "wait", "id": 2, "off": 0, "len": 1, "x": value}), ServerConnection(limits))
    if depth <= 8:
        assert drain(server) == [Wait(2, 0, 1)]
    else:
        assert remote_error(server).code == codes.TOO_LARGE


@pytest.mark.parametrize(
    "field, value",
    [
        ("id", [[[[[[1]]]]]]),
        ("off", {"a": [[["x" * 1000]]]}),
        ("op", "y" * 1000),
        ("off", "z" * 1000),
    ],
)
def test_bad_values_are_described_briefly(field: str, value: Any) -> None:
    message = {"op": "wait", "id": 3, "off": 0, "len": 1, field: value}
    server = feed_server(packb(message), ServerConnection(Limits.server(max_depth=32)))
    error = remote_error(server)
    assert error.code in (codes.BAD_MESSAGE, codes.UNKNOWN_OP)
    assert len(error.message) < 150, error.message


def test_client_describes_bad_values_briefly() -> None:
    client, _ = handshake()
    client.send(GetStats(1))
    client.receive_data(packb({"re": 1, "ok": ["x" * 5000] * 3}))
    error = remote_error(client)
    assert error.code == codes.BAD_MESSAGE and len(error.message) < 150


def test_handshake_states_are_named() -> None:
    from protocol import _state

    assert repr(_state.IDLE) == "IDLE"
    assert _state.after(_state.IDLE, _state.HELLO) is _state.OFFERED
    assert _state.after(_state.OFFERED, _state.REFUSED) is _state.IDLE
    assert _state.after(_state.OFFERED, _state.ACCEPTED) is _state.NEGOTIATED
    assert not _state.can(_state.NEGOTIATED, _state.HELLO)
    with pytest.raises(KeyError):
        _state.after(_state.IDLE, _state.ACCEPTED)


def test_second_hello_while_the_first_is_pending() -> None:
    server = ServerConnection()
    server.receive_data(packb({"op": "hello", "id": 0, "v": [1]}) + packb({"op": "hello", "id": 1, "v": [1]}))
    assert server.next_event() == Hello(0, (1,))
    error = remote_error(server)
    assert (error.code, error.id) == (codes.BAD_MESSAGE, 1) and "not answered yet" in error.message
    server.send(HELLO_REPLY)
    server.send(ErrorReply.for_error(error))  # the rejected Hello gets its answer too
    assert server.version == 1 and not server.outstanding


def test_idle_connection_buffers_start_small() -> None:
    """Each connection's msgpack buffers start at a few KiB (msgpack's defaults: a 256 KiB
    packer buffer and a read buffer of max_buffer_size).  The unpacker's fixed parse
    stack (about 40 KiB) is most of what is left."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        conns = [ServerConnection() for _ in range(50)]
        per_connection = (tracemalloc.get_traced_memory()[0] - before) / len(conns)
    finally:
        tracemalloc.stop()
    assert per_connection < 64 * 1024, per_connection



# ---------------------------------------------------------------- every bound at its edge (issue 25)


def _every_event() -> list[Any]:
    """One instance of each event class (requests, replies) and the other frozen records."""
    return [
        Hello(0, (1,), "x"), Wait(1, 0, 1), Prefetch(2, 0, 1), protocol.Mark(3), GetStats(4), GetMemoryFd(5),
        protocol.GetLoadedMap(6), protocol.RegisterUffd(7, 4096, 4096, 0),
        HELLO_REPLY, Loaded(1), Accepted(2), protocol.Marked(3), StatsReply(4, {}), MemoryFdReply(5, 4096),
        protocol.LoadedMapReply(6, 1, 4096), protocol.UffdRegistered(7), ErrorReply(8, "x"),
        Limits.server(), ServerConnection().statistics(),
    ]


@pytest.mark.parametrize("record", _every_event(), ids=lambda r: type(r).__name__)
def test_every_event_is_frozen_and_has_no_dict(record: Any) -> None:
    """Events are handed between tasks and kept in queues: nobody may change one, and
    a million of them cost no per-instance dict."""
    name = dataclasses.fields(record)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(record, name, getattr(record, name))
    assert not hasattr(record, "__dict__")


def test_the_default_limits_are_the_documented_ones() -> None:
    """docs/PROTOCOL.md's table of limits is what Limits.server() and Limits.client() hold."""
    text = (Path(__file__).parents[1] / "docs" / "PROTOCOL.md").read_text()
    units = {"": 1, "Ki": 1024, "KiB": 1024, "MiB": 1 << 20}
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and (cells[0].startswith("`max_") or cells[0] == "ext length"):
            name = cells[0].split("`")[1] if "`" in cells[0] else "ext"

            def size(cell: str) -> int:
                number, unit = re.match(r"(\d+) ?(\w*)", cell).groups()  # type: ignore[union-attr]
                return int(number) * units[unit]
            rows[name] = (size(cells[1]), size(cells[2]))
    fields = [f.name for f in dataclasses.fields(Limits)]
    assert set(rows) == {*fields, "ext"}
    assert {f: (getattr(Limits.server(), f), getattr(Limits.client(), f)) for f in fields} == \
        {f: rows[f] for f in fields}
    assert rows["ext"] == (16, 16)


@pytest.mark.parametrize("side", ["server", "client"])
def test_each_default_limit_holds_at_its_edge(side: str) -> None:
    """A value exactly at each default limit is decoded; one more is too-large."""
    limits = getattr(Limits, side)()
    over = {"s": "x" * (limits.max_str_len + 1), "b": b"x" * (limits.max_bin_len + 1),
            "a": [0] * (limits.max_array_len + 1), "m": {str(i): 0 for i in range(limits.max_map_len + 1)},
            "e": msgpack.ExtType(1, b"x" * 17)}
    at = {"s": "x" * limits.max_str_len, "b": b"x" * limits.max_bin_len, "a": [0] * limits.max_array_len,
          "m": {str(i): 0 for i in range(limits.max_map_len)}, "e": msgpack.ExtType(1, b"x" * 16)}
    for key in over:
        for value, ok in ((at[key], True), (over[key], False)):
            if side == "server":
                conn: Any = feed_server(packb({"op": "stats", "id": 1, "x": value}))
                expected: Any = GetStats(1)
            else:
                conn, server = handshake()
                conn.send(GetStats(1))
                conn.receive_data(packb({"re": 1, "ok": "stats", "stats": {}, "x": value}))
                expected = StatsReply(1, {})
            if ok:
                assert drain(conn) == [expected], key
            else:
                assert remote_error(conn).code == codes.TOO_LARGE, key


@pytest.mark.parametrize("value", [1, 2])
def test_a_limit_of_one_is_allowed(value: int) -> None:
    assert Limits.server(max_depth=value).max_depth == value


def test_hello_versions_bounds() -> None:
    """1 to 16 versions, each in [1, 2**31)."""
    assert Hello(1, tuple(range(1, 17))).versions == tuple(range(1, 17))
    with pytest.raises(LocalProtocolError, match="1 to 16 ints"):
        Hello(1, tuple(range(1, 18)))
    assert Hello(1, (2**30, 2**31 - 1)).versions == (2**30, 2**31 - 1)
    for bad in (0, 2**31):
        with pytest.raises(LocalProtocolError, match=re.escape("a version must be an int in [1, 2**31)")):
            Hello(1, (bad,))
    for bad in (0, 2**31):
        with pytest.raises(LocalProtocolError, match=re.escape("version must be an int in [1, 2**31)")):
            HelloReply(1, bad, 0, 4096, False)
    assert HelloReply(1, 2**31 - 1, 0, 4096, False).version == 2**31 - 1


def test_name_code_and_errno_bounds() -> None:
    assert Hello(1, (1,), "c" * 256).client == "c" * 256
    with pytest.raises(LocalProtocolError, match="at most 256 characters"):
        Hello(1, (1,), "c" * 257)
    assert ErrorReply(1, "e").code == "e" and ErrorReply(1, "e" * 64).code == "e" * 64
    with pytest.raises(LocalProtocolError, match="1 to 64 characters"):
        ErrorReply(1, "e" * 65)
    assert ErrorReply(1, "io-error", "", 1).errno == 1
    assert ErrorReply(1, "io-error", "", 2**31 - 1).errno == 2**31 - 1
    for bad in (0, 2**31):
        with pytest.raises(LocalProtocolError, match=re.escape("errno must be an int in [1, 2**31)")):
            ErrorReply(1, "io-error", "", bad)


def test_bounds_are_worded_as_powers_of_two() -> None:
    with pytest.raises(LocalProtocolError, match=re.escape("id must be an int in [0, 2**63), not 9223372036854775808")):
        Wait(2**63, 0, 1)
    with pytest.raises(LocalProtocolError, match=re.escape("length must be an int in [1, 2**64), not 0")):
        Wait(1, 0, 0)
    with pytest.raises(LocalProtocolError, match=re.escape("page_size must be an int in [1, 2**32), not 0")):
        HelloReply(1, 1, 0, 0, False)


def test_page_size_and_granule_are_powers_of_two_from_one() -> None:
    for p in (1, 2, 4, 4096, 2**31):
        assert HelloReply(1, 1, 0, p, False).page_size == p
        assert protocol.LoadedMapReply(1, 0, p).granule == p
    for bad in (0, 3, 6, 12, 3000, 2**32):
        with pytest.raises(LocalProtocolError):
            HelloReply(1, 1, 0, bad, False)
        with pytest.raises(LocalProtocolError):
            protocol.LoadedMapReply(1, 0, bad)


def test_a_prefetch_is_not_a_working_set_hint_unless_it_says_so() -> None:
    assert Prefetch(1, 0, 1).working_set is False
    client, server = handshake()
    server.receive_data(client.send(Prefetch(1, 0, 1)) + packb({"op": "prefetch", "id": 2, "off": 0, "len": 1}))
    assert drain(server) == [Prefetch(1, 0, 1), Prefetch(2, 0, 1)]


def _nested(levels: int, kind: str) -> dict[str, Any]:
    """A stats dict ``levels`` containers deep (itself included), lists or dicts inside."""
    value: Any = 1
    for _ in range(levels - 1):
        value = [value] if kind == "list" else {"k": value}
    return {"x": value} if levels > 1 else {"x": 1}


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_stats_nest_at_most_16_deep_and_ints_fit_in_64_bits(kind: str) -> None:
    assert StatsReply(1, _nested(16, kind)).stats == _nested(16, kind)
    with pytest.raises(LocalProtocolError, match="nested deeper than 16"):
        StatsReply(1, _nested(17, kind))
    with pytest.raises(LocalProtocolError, match="does not fit in 64 bits"):
        StatsReply(1, {"l": [0, 2**64]} if kind == "list" else {"d": {"a": 0, "b": 2**64}})
    assert StatsReply(1, {"lo": -(2**63), "hi": 2**64 - 1}).stats["lo"] == -(2**63)
    for bad in (-(2**63) - 1, 2**64):
        with pytest.raises(LocalProtocolError, match="does not fit in 64 bits"):
            StatsReply(1, {"v": bad})


def test_describe_cuts_a_long_value_to_40_characters() -> None:
    from protocol._limits import DESCRIBE_MAX, describe

    assert DESCRIBE_MAX == 40
    for value in ("y" * 38, b"y" * 37):
        assert describe(value) == repr(value)  # 40 characters: whole
    for value in ("y" * 39, "z" * 5000, b"y" * 38):
        text = describe(value)
        assert len(text) == 40 and text.endswith("...") and text[:-3] == repr(value)[:37], text
    assert describe([1, 2]) == "an array of 2" and describe({"a": 1}) == "a map of 1"
    assert describe(1.5) == "1.5" and describe(None) == "None" and describe(set()) == "a set"


def test_remote_errors_are_counted_once_each() -> None:
    """statistics().remote_errors: one per RemoteProtocolError raised, a fatal one once."""
    client, server = handshake()
    client.send(GetStats(1))
    client.send(GetStats(2))
    client.send(GetStats(3))
    client.receive_data(packb({"re": 1, "ok": "stats", "stats": 5}))  # a bad reply body
    remote_error(client)
    assert client.statistics().remote_errors == 1
    client.receive_data(packb({"re": 2, "err": ""}))  # a bad error reply
    remote_error(client)
    assert client.statistics().remote_errors == 2
    client.receive_data(packb({"re": 3, "ok": "loaded"}))  # the wrong kind of reply
    error = remote_error(client)
    assert error.message == "Loaded cannot answer GetStats 3"
    assert client.statistics().remote_errors == 3
    server = feed_server(b"\xc1")  # never valid msgpack: fatal
    for _ in range(3):
        assert remote_error(server).fatal
    stats = server.statistics()
    assert stats.remote_errors == 1 and stats.failed
    assert stats.buffered_bytes == 1  # the undecodable byte; nothing queued behind it is counted


def test_a_truncated_message_says_how_far_it_got() -> None:
    server = feed_server(b"")
    data = packb({"op": "stats", "id": 1})
    server.receive_data(packb({"op": "stats", "id": 9}) + data[:5])
    server.receive_data(b"")
    assert server.next_event() == GetStats(9)
    error = remote_error(server)
    assert error.code == codes.TRUNCATED and "5 bytes into a message" in error.message


def test_a_remote_error_names_its_request() -> None:
    assert str(RemoteProtocolError("bad-message", "no", 7)) == "bad-message (request 7): no"
    assert str(RemoteProtocolError("bad-frame", "no")) == "bad-frame: no"


def test_bytes_received_while_the_buffer_is_full_keep_their_order() -> None:
    """Input arriving while earlier input waits for room (a chunk over max_buffer_size)
    goes behind it, and after the last event nothing is left buffered, whatever the
    chunks' sizes."""
    rng = __import__("random").Random(25)
    for trial in range(300):
        limits = Limits.server(max_buffer_size=rng.choice([21, 22, 25, 32, 40]))
        server = feed_server(b"", ServerConnection(limits))
        messages = [{"op": "stats", "id": i, "p": "x" * rng.randint(0, 4)} for i in range(1, 30)]
        data = b"".join(packb(m) for m in messages)
        got: list[Any] = []
        pos = 0
        while pos < len(data):
            n = rng.randint(1, 90)
            server.receive_data(data[pos:pos + n])
            pos += n
            for _ in range(rng.randint(0, 3)):
                empty = server.statistics().buffered_bytes == 0
                said = server.nothing_buffered()
                event = server.next_event()
                if event is NEED_DATA:
                    assert said is empty, trial  # nothing_buffered(): no bytes held, no event to come
                    break
                assert not said, trial
                got.append(event)
        got += drain(server)
        assert got == [GetStats(m["id"]) for m in messages], trial
        assert server.nothing_buffered() and server.statistics().buffered_bytes == 0, trial


def test_nothing_is_left_buffered_after_a_queued_chunk_that_exactly_fills_the_room() -> None:
    """Four 14-byte requests in one chunk with room for two: two are fed, 28 bytes
    wait, and once the first two are taken they fill the room exactly."""
    messages = [packb({"op": "stats", "id": i}) for i in range(1, 5)]
    assert {len(m) for m in messages} == {14}
    server = feed_server(b"", ServerConnection(Limits.server(max_buffer_size=28)))
    server.receive_data(b"".join(messages))
    assert [server.next_event() for _ in range(4)] == [GetStats(i) for i in range(1, 5)]
    assert server.nothing_buffered() and server.statistics().buffered_bytes == 0
    assert server.next_event() is NEED_DATA
    server.receive_data(packb({"op": "stats", "id": 5}) + packb({"op": "stats", "id": 6}))  # the room, exactly
    assert server.statistics().buffered_bytes == 28
    assert [server.next_event() for _ in range(2)] == [GetStats(5), GetStats(6)]
    assert server.nothing_buffered() and server.statistics().buffered_bytes == 0
    assert server.next_event() is NEED_DATA


def test_buffered_bytes_counts_what_is_queued_too() -> None:
    server = feed_server(b"", ServerConnection(Limits.server(max_buffer_size=28)))
    messages = [packb({"op": "stats", "id": i}) for i in range(1, 5)]
    server.receive_data(b"".join(messages))  # 28 fed, 28 queued
    assert server.statistics().buffered_bytes == 56
    assert server.next_event() == GetStats(1)
    assert server.statistics().buffered_bytes == 42


def test_a_message_filling_the_buffer_behind_a_one_byte_message() -> None:
    """A one-byte message, then one of exactly max_buffer_size bytes, in one chunk: the
    big one is fed in two parts, the second into a room of exactly its size."""
    big = {"op": "stats", "id": 2, "p": ""}
    big["p"] = "x" * (64 - len(packb(big)) - 1)
    data = packb(big)
    assert len(data) == 64
    server = feed_server(b"", ServerConnection(Limits.server(max_buffer_size=64)))
    server.receive_data(packb(1) + data)
    assert remote_error(server).code == codes.BAD_MESSAGE  # 1 is not a map: not fatal
    assert drain(server) == [GetStats(2)]


def test_input_in_any_buffer_format_counts_bytes() -> None:
    """A memoryview of 2-byte items (an array.array('H') buffer) is taken as its bytes."""
    data = packb({"op": "stats", "id": 1, "p": "x"})
    assert len(data) % 2 == 0
    server = feed_server(b"")
    before = server.statistics().bytes_received
    server.receive_data(memoryview(data).cast("H"))
    assert drain(server) == [GetStats(1)]
    assert server.statistics().bytes_received - before == len(data)
    client, _ = handshake()
    client.send(GetStats(5))
    reply = packb({"re": 5, "ok": "stats", "stats": {"a": 1}})
    reply += b"\x00" * (len(reply) % 2)  # whole items; the pad is a 0, an invalid reply
    client.receive_data(memoryview(reply).cast("H"))
    assert client.next_event() == StatsReply(5, {"a": 1})


def test_a_frame_of_exactly_max_send_size_is_sent() -> None:
    client, server = handshake()
    server.receive_data(client.send(GetStats(1)))
    drain(server)
    size = len(server.send(StatsReply(1, {"x": "y" * 100})))
    limited = ServerConnection(Limits.server(max_send_size=size))
    limited.receive_data(packb({"op": "hello", "id": 0, "v": [1]}) + packb({"op": "stats", "id": 1}))
    drain(limited)
    limited.send(HELLO_REPLY)
    assert len(limited.send(StatsReply(1, {"x": "y" * 100}))) == size
    tight = ServerConnection(Limits.server(max_send_size=size - 1))
    tight.receive_data(packb({"op": "hello", "id": 0, "v": [1]}) + packb({"op": "stats", "id": 1}))
    drain(tight)
    tight.send(HELLO_REPLY)
    with pytest.raises(LocalProtocolError, match="max_send_size"):
        tight.send(StatsReply(1, {"x": "y" * 100}))


def test_an_event_that_cannot_be_encoded_is_refused_and_nothing_is_sent() -> None:
    """A str with a lone surrogate (ValueError), and a stats dict changed after its event
    was built (documented as not to be done) holding a set (TypeError) or an int past 64
    bits (OverflowError): each a LocalProtocolError, the request still unanswered."""
    client = ClientConnection()
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        client.send(Hello(0, (1,), "\udcff"))
    assert not client.outstanding and client.statistics().messages_sent == 0
    client, server = handshake()
    server.receive_data(client.send(GetStats(1)))
    drain(server)
    for bad in ({1, 2}, 2**64, "\udcff"):
        stats: dict[str, Any] = {}
        reply = StatsReply(1, stats)
        stats["x"] = bad
        with pytest.raises(LocalProtocolError, match="cannot encode"):
            server.send(reply)
        assert 1 in server.outstanding
    server.send(StatsReply(1, {"x": 1}))
    assert not server.outstanding
