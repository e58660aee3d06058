"""The wait/loaded fast path (protocol/_fast.py) against the general msgpack path.

A ServerConnection with the fast path off (``_fast = False``, the general path alone)
is the reference: the same bytes, in any chunking, must give the same events, the
same errors and the same statistics, and replies the same bytes.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import msgpack
import pytest

from protocol import (
    NEED_DATA,
    SUPPORTED_VERSIONS,
    ClientConnection,
    Hello,
    HelloReply,
    Limits,
    Loaded,
    LocalProtocolError,
    RemoteProtocolError,
    ServerConnection,
    Wait,
)
from protocol._fast import MAX_LOADED_FRAME, MAX_WAIT_FRAME, encode_loaded, encode_wait, parse_loaded, parse_wait

EDGES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


def test_encode_loaded_is_msgpack() -> None:
    rng = random.Random(1)
    for id in EDGES[:-2] + [rng.randrange(2**63) for _ in range(2000)]:
        data = encode_loaded(id)
        assert data == msgpack.packb({"re": id, "ok": "loaded"})
        assert len(data) <= MAX_LOADED_FRAME


def test_parse_wait_matches_msgpack() -> None:
    rng = random.Random(2)
    for _ in range(3000):
        id, off, ln = (rng.choice(EDGES) if rng.random() < 0.5 else rng.randrange(2**64) for _ in range(3))
        frame = msgpack.packb({"op": "wait", "id": id, "off": off, "len": ln})
        valid = id < 2**63 and ln >= 1 and off + ln <= 2**64
        got = parse_wait(b"xy" + frame + b"tail", 2)
        assert got == ((2 + len(frame), id, off, ln) if valid else None)
        assert len(frame) <= MAX_WAIT_FRAME
        for cut in range(len(frame)):  # a partial frame is never taken
            assert parse_wait(frame[:cut], 0) is None


def test_parse_wait_takes_only_what_msgpack_decodes_the_same() -> None:
    rng = random.Random(3)
    base = msgpack.packb({"op": "wait", "id": 300, "off": 70000, "len": 2**33})
    for _ in range(20000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        got = parse_wait(bytes(data), 0)
        if got is None:
            continue
        end, id, off, ln = got
        message = msgpack.unpackb(bytes(data[:end]))
        assert message == {"op": "wait", "id": id, "off": off, "len": ln}
        assert list(message) == ["op", "id", "off", "len"]


def _random_message(rng: random.Random, ids: list[int]) -> bytes:
    """Mostly waits (valid, invalid, duplicate ids, other key orders), some others."""
    r = rng.random()
    id = rng.choice(ids) if ids and rng.random() < 0.1 else rng.choice([rng.randrange(1 << 20), rng.choice(EDGES)])
    ids.append(id)
    off = rng.choice([rng.randrange(1 << 30), rng.choice(EDGES), -1])
    ln = rng.choice([4096, rng.randrange(1 << 20), rng.choice(EDGES), 0])
    if r < 0.7:
        return msgpack.packb({"op": "wait", "id": id, "off": off, "len": ln})
    if r < 0.75:
        return msgpack.packb({"id": id, "op": "wait", "len": ln, "off": off})
    if r < 0.8:
        return msgpack.packb({"op": "wait", "id": id, "off": off, "len": ln, "x": 1})
    if r < 0.85:
        return msgpack.packb({"op": "prefetch", "id": id, "off": off, "len": ln})
    if r < 0.9:
        return msgpack.packb({"op": "stats", "id": id})
    if r < 0.95:
        return msgpack.packb({"op": "hello", "id": id, "v": [1]})
    return msgpack.packb({"op": "wait", "id": id, "off": "x", "len": ln})


def _run(data: bytes, chunks: list[int], fast: bool,
         limits: Limits | None = None, next_wait: bool = False) -> tuple[list[Any], Any, list[bytes]]:
    """Events, statistics and reply bytes; ``next_wait``: try ServerConnection.next_wait
    before each next_event, as the server does."""
    conn = ServerConnection(limits)
    if not fast:
        conn._fast = False
    out: list[Any] = []
    sent: list[bytes] = []
    pos = 0
    chunk_list = chunks + [len(data)]
    for size in chunk_list:
        piece = data[pos:pos + size]
        pos += len(piece)
        conn.receive_data(piece)
        while True:
            got = conn.next_wait() if next_wait else None
            try:
                event = Wait(*got) if got is not None else conn.next_event()
            except RemoteProtocolError as exc:
                out.append(("error", exc.code, exc.id, exc.fatal))
                if exc.fatal:
                    return out, conn.statistics(), sent
                continue
            if event is NEED_DATA:
                break
            out.append(event)
            if type(event) is Hello:
                sent.append(conn.send(HelloReply(event.id, 1, 1 << 30, 4096, False)))
            elif type(event) is Wait and event.id % 3:
                # answer most waits at once, through the fast encoder or the general one
                sent.append(conn.send_loaded(event.id) if fast else conn.send(Loaded(event.id)))
        if pos >= len(data):
            break
    conn.receive_data(b"")
    try:
        out.append(conn.next_event())
    except RemoteProtocolError as exc:
        out.append(("error", exc.code, exc.id, exc.fatal))
    return out, conn.statistics(), sent


@pytest.mark.parametrize("seed", range(12))
def test_server_fast_path_equals_general_path(seed: int) -> None:
    rng = random.Random(seed)
    ids: list[int] = []
    hello = msgpack.packb({"op": "hello", "id": 0, "v": [1]})
    messages = [_random_message(rng, ids) for _ in range(rng.randint(0, 3))]  # before Hello
    messages += [hello] + [_random_message(rng, ids) for _ in range(300)]
    if seed % 4 == 0:
        messages.append(b"\xc1")  # never used in msgpack: fatal
    if seed % 4 == 1:
        messages.append(hello[:5])  # truncated at EOF
    data = b"".join(messages)
    reference = _run(data, [len(data)], fast=False)
    whole = _run(data, [len(data)], fast=True)
    bytewise = _run(data, [1] * len(data), fast=True)
    chunked = _run(data, [rng.randint(1, 80) for _ in range(len(data))], fast=True)
    assert whole == reference
    assert bytewise == reference
    assert chunked == reference
    assert _run(data, [len(data)], fast=True, next_wait=True) == reference
    assert _run(data, [rng.randint(1, 80) for _ in range(len(data))], fast=True, next_wait=True) == reference
    assert any(type(e) is Wait for e in reference[0])


def test_fast_path_is_off_when_a_limit_could_reject_a_wait() -> None:
    assert ServerConnection()._fast
    assert not ServerConnection(Limits.server(max_buffer_size=32))._fast
    data = msgpack.packb({"op": "hello", "id": 0, "v": [1]}) + msgpack.packb(
        {"op": "wait", "id": 2**40, "off": 2**40, "len": 2**40})
    small = Limits.server(max_buffer_size=32)
    got, _, _ = _run(data, [len(data)], fast=True, limits=small)
    assert got[-1][:2] == ("error", "too-large")


def test_send_loaded_checks_like_send() -> None:
    conn = ServerConnection()
    conn.receive_data(msgpack.packb({"op": "hello", "id": 0, "v": [1]}) + msgpack.packb(
        {"op": "wait", "id": 7, "off": 0, "len": 1}) + msgpack.packb({"op": "stats", "id": 8}))
    assert type(conn.next_event()) is Hello
    assert conn.next_event() == Wait(7, 0, 1)
    conn.next_event()
    from protocol import LocalProtocolError
    with pytest.raises(LocalProtocolError):  # before the HelloReply
        conn.send_loaded(7)
    conn.send(HelloReply(0, 1, 1 << 30, 4096, False))
    with pytest.raises(LocalProtocolError):  # answers a GetStats
        conn.send_loaded(8)
    with pytest.raises(LocalProtocolError):  # not outstanding
        conn.send_loaded(9)
    assert conn.send_loaded(7) == msgpack.packb({"re": 7, "ok": "loaded"})
    with pytest.raises(LocalProtocolError):  # answered already
        conn.send_loaded(7)


def test_next_wait_takes_only_a_valid_wait_and_consumes_nothing_else() -> None:
    conn = ServerConnection()
    wait = msgpack.packb({"op": "wait", "id": 5, "off": 4096, "len": 4096})
    conn.receive_data(wait)
    assert conn.next_wait() is None  # before Hello: the general path refuses it
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    conn = ServerConnection()
    conn.receive_data(msgpack.packb({"op": "hello", "id": 0, "v": [1]}))
    assert type(conn.next_event()) is Hello
    conn.receive_data(wait + wait + msgpack.packb({"op": "stats", "id": 6}))
    assert conn.next_wait() == (5, 4096, 4096)
    assert conn.next_wait() is None  # id 5 is outstanding: next_event says so
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.next_wait() is None  # a stats request
    assert conn.next_event().id == 6
    assert conn.next_wait() is None and conn.next_event() is NEED_DATA


@pytest.mark.parametrize("seed", range(5))
def test_nothing_buffered_is_true_exactly_when_next_event_would_need_data(seed: int) -> None:
    """``nothing_buffered`` lets the server skip asking for the next event; it must be
    True only when that event is NEED_DATA, whatever the chunking, fast path on or off,
    and False at end of input or after an error (which next_event must report)."""
    rng = random.Random(seed)
    frames = [msgpack.packb({"op": "hello", "id": 0, "v": [1]})]
    frames += [msgpack.packb({"op": "wait", "id": i, "off": 4096 * i, "len": 4096}) for i in range(1, 40)]
    frames += [msgpack.packb({"op": "stats", "id": 99})]
    stream = b"".join(frames)
    for fast in (True, False):
        conn = ServerConnection()
        conn._fast = fast
        at = 0
        while at < len(stream):
            n = rng.randrange(1, 40)
            conn.receive_data(stream[at:at + n])
            at += n
            while True:
                if conn.next_wait() is not None:
                    continue
                quiet = conn.nothing_buffered()
                event = conn.next_event()
                assert event is NEED_DATA or not quiet, (fast, at, event)  # never hides an event
                if event is NEED_DATA:
                    break
            if at >= len(stream):
                assert conn.nothing_buffered(), fast  # all taken: the server may skip asking
        conn.receive_data(stream[:3])  # a cut frame, then end of input
        assert not conn.nothing_buffered()
        conn.receive_data(b"")
        assert not conn.nothing_buffered()
    bad = ServerConnection()
    bad.receive_data(b"\xc1")  # never valid msgpack: a fatal error to report
    assert not bad.nothing_buffered()


# ---------------------------------------------------------------- the client's side


def test_encode_wait_is_what_the_general_encoder_writes() -> None:
    from protocol._fast import encode_wait

    rng = random.Random(4)
    for _ in range(3000):
        id = rng.choice(EDGES[:-2]) if rng.random() < 0.5 else rng.randrange(2**63)
        off = rng.choice(EDGES[:-1]) if rng.random() < 0.5 else rng.randrange(2**63)
        ln = max(1, rng.choice(EDGES[:-1]) if rng.random() < 0.5 else rng.randrange(2**63))
        if off + ln > 2**64:
            continue
        data = encode_wait(id, off, ln)
        assert data == msgpack.packb({"op": "wait", "id": id, "off": off, "len": ln})
        assert parse_wait(data, 0) == (len(data), id, off, ln)


def _client_run(replies: bytes, chunks: list[int], fast: bool) -> tuple[list[Any], Any, bytes]:
    """A client that sent Hello (id 0), waits 1..40 and stats 41..50, fed ``replies``."""
    from protocol import ClientConnection, GetStats

    conn = ClientConnection()
    if not fast:
        conn._fast = False
    sent = conn.send(Hello(0, (1,), "t"))
    sent += b"".join(conn.send(Wait(i, i * 4096, 4096)) for i in range(1, 41))
    sent += b"".join(conn.send(GetStats(i)) for i in range(41, 51))
    out: list[Any] = []
    pos = 0
    for size in chunks + [len(replies)]:
        piece = replies[pos:pos + size]
        pos += len(piece)
        conn.receive_data(piece)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                out.append(("error", exc.code, exc.id, exc.fatal))
                if exc.fatal:
                    return out, conn.statistics(), sent
                continue
            if event is NEED_DATA:
                break
            out.append(event)
        if pos >= len(replies):
            break
    return out, conn.statistics(), sent


@pytest.mark.parametrize("seed", range(8))
def test_client_fast_path_equals_general_path(seed: int) -> None:
    rng = random.Random(seed)
    frames = [msgpack.packb({"re": 0, "ok": "hello", "v": 1, "size": 1 << 30, "page": 4096, "done": False})]
    for _ in range(120):
        id = rng.randrange(0, 60)
        kind = rng.random()
        if kind < 0.6:
            frames.append(msgpack.packb({"re": id, "ok": "loaded"}))  # maybe a stats id, a repeat, unknown
        elif kind < 0.7:
            frames.append(msgpack.packb({"ok": "loaded", "re": id}))  # another key order
        elif kind < 0.8:
            frames.append(msgpack.packb({"re": id, "err": "io-error", "msg": "x"}))
        elif kind < 0.9:
            frame = bytearray(msgpack.packb({"re": id, "ok": "loaded"}))
            frame[rng.randrange(len(frame))] = rng.randrange(256)
            frames.append(bytes(frame))
        else:
            frames.append(msgpack.packb({"re": id, "ok": "stats", "stats": {}}))
    data = b"".join(frames)
    reference = _client_run(data, [len(data)], fast=False)
    assert any(type(e) is Loaded for e in reference[0])
    by_frame = [len(f) for f in frames]  # each frame its own receive: the fast path's case
    for chunks in ([len(data)], by_frame, [1] * len(data), [rng.randint(1, 40) for _ in range(len(data))]):
        # the same chunks, the same events, errors, statistics and request bytes
        assert _client_run(data, chunks, fast=True) == _client_run(data, chunks, fast=False)


# ---------------------------------------------------------------- bounds at their edges (issue 25)


def test_the_frame_bounds_are_the_longest_frames() -> None:
    assert MAX_WAIT_FRAME == len(encode_wait(2**63 - 1, 2**63, 2**63 - 1)) == 47
    assert MAX_LOADED_FRAME == len(encode_loaded(2**63 - 1)) == 23


def test_parse_loaded_takes_exactly_a_loaded_reply() -> None:
    for id in [i for i in EDGES if i < 2**63]:
        frame = encode_loaded(id)
        assert frame == msgpack.packb({"re": id, "ok": "loaded"})
        assert parse_loaded(frame, 0) == (len(frame), id)
        assert parse_loaded(b"junk" + frame + b"more", 4) == (4 + len(frame), id)
        for cut in range(len(frame)):
            assert parse_loaded(frame[:cut], 0) is None, (id, cut)
    for id in (2**63, 2**64 - 1):  # a uint64 past the id range: the general path says why
        frame = b"\x82\xa2re\xcf" + id.to_bytes(8, "big") + b"\xa2ok\xa6loaded"
        assert parse_loaded(frame, 0) is None
    others = ({"re": 1, "ok": "accepted"}, {"ok": "loaded", "re": 1}, {"re": 1, "err": "x"}, {"re": -1, "ok": "loaded"})
    for other in others:
        assert parse_loaded(msgpack.packb(other), 0) is None, other


def _limits_at(**changes: int) -> Limits:
    base = Limits(max_buffer_size=1 << 20, max_array_len=64, max_map_len=4, max_str_len=6, max_bin_len=1,
                  max_depth=1, max_send_size=1 << 20)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("side, edges", [
    ("server", {"max_buffer_size": MAX_WAIT_FRAME, "max_map_len": 4, "max_str_len": 4, "max_depth": 1,
                "max_send_size": MAX_LOADED_FRAME}),
    ("client", {"max_buffer_size": MAX_LOADED_FRAME, "max_map_len": 4, "max_str_len": 6, "max_depth": 1,
                "max_send_size": MAX_WAIT_FRAME}),
])
def test_the_fast_path_runs_down_to_the_smallest_limits_that_take_its_frames(side: str, edges: dict[str, int]) -> None:
    """At exactly the limits a wait frame and a loaded reply need, the fast path is on;
    one below any of them, it is off (the general path applies that limit)."""
    conn = ServerConnection if side == "server" else ClientConnection
    assert conn(_limits_at(**edges))._fast
    for name, value in edges.items():
        if value > 1:  # a limit is at least 1
            assert not conn(_limits_at(**{**edges, name: value - 1}))._fast, name


@pytest.mark.parametrize("offered, chosen", [((1, 7), 7), ((1,), 7), ((7,), 7)])
def test_a_hello_reply_needs_a_version_both_sides_speak(offered: tuple[int, ...], chosen: int) -> None:
    """The client refuses, and the server may not send, a version it did not offer
    or that this library does not speak (7: offered, not spoken)."""
    assert chosen not in SUPPORTED_VERSIONS
    client = ClientConnection()
    client.send(Hello(0, offered))
    client.receive_data(msgpack.packb({"re": 0, "ok": "hello", "v": chosen, "size": 0, "page": 4096, "done": True}))
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert info.value.code == "unsupported-version" and client.version is None
    server = ServerConnection()
    server.receive_data(msgpack.packb({"op": "hello", "id": 0, "v": list(offered)}))
    if 1 in offered:
        assert server.next_event() == Hello(0, offered)
        with pytest.raises(LocalProtocolError, match="not one both sides speak"):
            server.send(HelloReply(0, chosen, 0, 4096, True))
        assert server.version is None
        server.send(HelloReply(0, 1, 0, 4096, True))
        assert server.version == 1


def test_buffered_bytes_counts_the_held_back_bytes_not_yet_taken() -> None:
    conn = ServerConnection()
    assert conn.nothing_buffered() and conn.statistics().buffered_bytes == 0  # a fresh connection
    conn.receive_data(msgpack.packb({"op": "hello", "id": 0, "v": [1]}))
    assert type(conn.next_event()) is Hello
    conn.send(HelloReply(0, 1, 1 << 30, 4096, False))
    first, second = encode_wait(1, 0, 4096), encode_wait(2, 1 << 20, 1 << 16)
    conn.receive_data(first + second)
    assert conn._raw is not None  # held back for the fast path
    assert conn.statistics().buffered_bytes == len(first) + len(second)
    assert conn.next_event() == Wait(1, 0, 4096)
    assert conn.statistics().buffered_bytes == len(second)
    assert conn.next_event() == Wait(2, 1 << 20, 1 << 16)
    assert conn.statistics().buffered_bytes == 0 and conn.nothing_buffered()
