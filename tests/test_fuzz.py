"""Seeded fuzzing in bounded time: random and mutated frames against the sans-I/O
connections in-process, then a short burst against a real daemon with correct
clients waiting alongside, and working-set files through every reader.  ``make fuzz``
runs the long versions (>= 1M frames, 100k working-set files)."""

from __future__ import annotations

import os
import random
import time

import msgpack
import pytest

import protocol
from loader import Client
from workloads import DaemonProcess, fuzz_frames, make_sample_image, run_fuzz

SIZE = 8 << 20
SEED = 20240611


def answer(server: protocol.ServerConnection, event: object) -> None:
    """Answer a request as a server application would (each must be answerable)."""
    if isinstance(event, protocol.Hello):
        version = protocol.negotiate(event.versions)
        assert version is not None
        server.send(protocol.HelloReply(event.id, version, SIZE, 4096, False))
    elif server.version is None:
        server.send(protocol.ErrorReply(event.id, protocol.codes.HELLO_REQUIRED, "x"))  # type: ignore[attr-defined]
    elif isinstance(event, protocol.Wait):
        server.send(protocol.Loaded(event.id))
    elif isinstance(event, protocol.Prefetch):
        server.send(protocol.Accepted(event.id))
    elif isinstance(event, protocol.GetStats):
        server.send(protocol.StatsReply(event.id, {}))
    else:
        assert isinstance(event, protocol.GetMemoryFd)
        server.send(protocol.MemoryFdReply(event.id, SIZE))


def drive(server: protocol.ServerConnection, data: bytes, rng: random.Random) -> tuple[int, int]:
    """Feed ``data`` in random chunks; (events, errors).  Only RemoteProtocolError may come out."""
    events = errors = 0
    pos = 0
    while True:
        if pos < len(data):
            step = rng.choice([1, 7, 100, 4096, len(data)])
            server.receive_data(data[pos : pos + step])
            pos += step
        elif not server.statistics().eof:
            server.receive_data(b"")
        while True:
            try:
                event = server.next_event()
            except protocol.RemoteProtocolError as exc:
                errors += 1
                assert len(exc.message) < 300
                if exc.id is not None:
                    server.send(protocol.ErrorReply.for_error(exc))
                if exc.fatal:
                    return events, errors
                continue
            if event is protocol.NEED_DATA:
                break
            if event is protocol.CLOSED:
                return events, errors
            events += 1
            answer(server, event)


def test_server_connection_survives_random_and_mutated_frames() -> None:
    rng = random.Random(SEED)
    frames = events = errors = 0
    for _ in range(300):
        batch = fuzz_frames(rng, SIZE, rng.randrange(1, 120))
        frames += len(batch)
        e, r = drive(protocol.ServerConnection(), b"".join(batch), rng)
        events += e
        errors += r
    assert frames > 10_000
    assert events > frames // 2 and errors > 100  # both paths were exercised


def test_client_connection_survives_random_replies() -> None:
    rng = random.Random(SEED + 1)
    for _ in range(300):
        client = protocol.ClientConnection()
        client.send(protocol.Hello(0, (1,)))
        for i in range(1, 20):
            client.send(protocol.Wait(i, 0, 1))
        data = b"".join(fuzz_frames(rng, SIZE, 40))
        data += msgpack.packb({"re": rng.randrange(30), "ok": rng.choice(["loaded", "hello", "stats"])})
        client.receive_data(data)
        client.receive_data(b"")
        while True:
            try:
                if client.next_event() is protocol.CLOSED:
                    break
            except protocol.RemoteProtocolError as exc:
                if exc.fatal:
                    break


def test_working_set_reader_survives_random_and_mutated_files(tmp_path) -> None:
    """Every consumer of a working-set file (decode, read, clip, merge, replay, show;
    restore --working-set, working-set show and merge as processes) on seeded valid,
    hostile and broken files: a working set or one line, never another exception, a
    traceback or a hang, and no decode peaks above what the memory check assumes
    (a file of 50k empty arrays cost 64 bytes a byte when they were built)."""
    from workloads._wsfuzz import MEMORY_SIZE, run_working_set_fuzz
    image = str(tmp_path / "memory.img")
    make_sample_image(image, MEMORY_SIZE, seed=5)
    report = run_working_set_fuzz(1500, seed=SEED, commands=9, checkpoint=image)
    assert report.findings == [], report.findings[:5]
    assert report.accepted > 200 and sum(report.refused.values()) > 700, report.summary()
    assert report.commands == 9 and set(report.command_exits) == {0, 2}, report.summary()
    assert report.peak_bytes_per_file_byte > 1  # it was measured


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    image = str(d / "memory.img")
    make_sample_image(image, SIZE, seed=5)
    with open(image, "rb") as f:
        data = f.read()
    with DaemonProcess(image, str(d / "s.sock"), str(d / "d.log"), ["--background", "-q"]) as daemon:
        yield daemon, data


def test_daemon_survives_a_fuzz_burst_and_serves_correct_bytes(fuzz_daemon) -> None:
    daemon, image = fuzz_daemon
    report = run_fuzz(daemon.socket_path, daemon.pid, image, frames=20_000, seed=SEED, workers=4)
    assert report.daemon_alive and daemon.proc.poll() is None, daemon.stderr_tail()
    assert report.check_errors == []
    assert report.checked_waits > 0 and report.frames >= 20_000 and report.replies > 0
    deadline = time.monotonic() + 30
    with Client.connect(daemon.socket_path, deadline=deadline) as client:
        while client.stats()["server"]["connections"] > 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # the last sessions finish their lingering close
        assert client.stats()["server"]["connections"] == 1  # every fuzz connection is gone
    assert os.path.exists(daemon.socket_path)


def test_daemon_survives_a_uffd_handshake_fuzz_burst(tmp_path) -> None:
    """Hostile handshakes on --uffd-socket (JSON and SCM_RIGHTS variants), with checked
    waits alongside: every one refused, nothing left open, and a VMM served after."""
    from loader.uffd import _ioctl as _uffd
    from workloads._fuzz_uffd import run_uffd_fuzz

    why = _uffd.unavailable()
    if why is not None:
        pytest.skip(why)
    image = str(tmp_path / "memory.img")
    make_sample_image(image, SIZE, seed=7)
    with open(image, "rb") as f:
        data = f.read()
    uffd = str(tmp_path / "fuzz.uffd")
    with DaemonProcess(image, str(tmp_path / "s.sock"), str(tmp_path / "d.log"),
                       ["--background", "-q", "--uffd-socket", uffd]) as daemon:
        report = run_uffd_fuzz(uffd, daemon.socket_path, daemon.pid, data, handshakes=1500, seed=SEED,
                               image_path=image)
        assert report.daemon_alive, daemon.stderr_tail()
        assert report.handshakes == 1500 and report.with_uffd > 500 and report.junk_fds > 200
        assert report.closed_by_daemon == report.handshakes  # each refused, none hung
        assert report.check_errors == [] and report.checked_waits > 0
        assert report.fds_after <= report.fds_before
        assert report.vmm_served and report.vmm_mismatches == 0
        assert daemon.proc.wait(30) == 0  # the VMM went: the daemon ends by itself
    with open(tmp_path / "d.log") as f:
        assert "Traceback" not in f.read()
