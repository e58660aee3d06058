"""Zero-copy userfaultfd mode (MINOR faults + UFFDIO_CONTINUE): a VMM maps the
daemon's memory file and hands its userfaultfd over the wait socket (docs/UFFD.md,
"Zero-copy mode").

The daemon runs in-process (its state is inspected); the emulated VMM
(:class:`workloads._vmm.ZeroCopyVmm`, on :mod:`loader.vmm`) runs in worker threads,
touching guest memory with the GIL released, or in a child process where a SIGBUS
must kill it and not pytest.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
from array import array

import pytest
import trio

import aio.testing
import protocol
from loader import Client, ClientError, DaemonOptions, LoaderConfig, run_daemon
from loader.checkpoint import create_checkpoint, open_checkpoint
from loader.uffd import _ioctl as _uffd
from loader.uffd import _minor as _uffd_minor
from loader.vmm import ZeroCopyMemory
from workloads import DaemonProcess, make_sample_image
from workloads._vmm import ZeroCopyVmm, reap_child, spawn_zero_copy_child

MiB = 1 << 20
PAGE = 4096
SIZE = 4 * MiB


_REASON = _uffd.unavailable(_uffd.FEATURE_MINOR_SHMEM | _uffd.FEATURE_POISON)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """4 MiB, about half data in 256 KiB blocks, the rest holes."""
    path = str(tmp_path_factory.mktemp("uffd-minor") / "memory.img")
    make_sample_image(path, SIZE, seed=11, hole_granularity=256 << 10)
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("uffd-minor-dense") / "memory.img")
    make_sample_image(path, SIZE, seed=5, dense=True)
    return path


def options(tmp_path, source, **kw):
    kw.setdefault("handle_signals", False)
    kw.setdefault("ready_line", False)
    kw.setdefault("shutdown_timeout", 0.6)
    kw.setdefault("allow_writable_memory_fd", True)
    return DaemonOptions(source=source, socket_path=str(tmp_path / "s.sock"), **kw)


def holes_and_data(path):
    layout = open_checkpoint(path).layout
    data = [(lo, hi) for lo, hi in layout.data_in(0, SIZE)]
    holes, pos = [], 0
    for lo, hi in data:
        if pos < lo:
            holes.append((pos, lo))
        pos = hi
    if pos < SIZE:
        holes.append((pos, SIZE))
    assert data and holes, "the sample image needs both"
    return holes, data


def expected_bytes(path, offset, length=PAGE):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length).ljust(length, b"\0")


@contextlib.asynccontextmanager
async def serving(opts, expected, **vmm_kw):
    """A daemon running ``opts`` and a zero-copy VMM on it (closed, then the daemon
    stopped, on the way out, also when the test fails): ``(state, vmm)``."""
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        try:
            vmm = await trio.to_thread.run_sync(lambda: ZeroCopyVmm(opts.socket_path, expected=expected, **vmm_kw))
            try:
                yield state, vmm
            finally:
                await trio.to_thread.run_sync(vmm.close)
        finally:
            state.stop()


def registrations(state):
    service = state.server.uffd_minor
    return [] if service is None else list(service.registrations)


async def wait_for(predicate, timeout=10.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


# ---------------------------------------------------------------- protocol


def test_register_request_frame():
    client, server = protocol.ClientConnection(), protocol.ServerConnection()
    server.receive_data(client.send(protocol.Hello(0, (1,))))
    server.next_event()
    client.receive_data(server.send(protocol.HelloReply(0, 1, SIZE, PAGE, False)))
    client.next_event()
    data = client.send(protocol.RegisterUffd(5, 0x7F0000000000, 1 << 30, 0))
    assert data.hex(" ") == ("85 a2 6f 70 ad 75 66 66 64 2d 72 65 67 69 73 74 65 72 a2 69 64 05 a4 61 64 64 72 "
                             "cf 00 00 7f 00 00 00 00 00 a3 6c 65 6e ce 40 00 00 00 a3 6f 66 66 00")
    server.receive_data(data)
    event = server.next_event()
    assert event == protocol.RegisterUffd(5, 0x7F0000000000, 1 << 30, 0)
    reply = server.send(protocol.UffdRegistered(5))
    assert reply.hex(" ") == "82 a2 72 65 05 a2 6f 6b af 75 66 66 64 2d 72 65 67 69 73 74 65 72 65 64"
    client.receive_data(reply)
    assert client.next_event() == protocol.UffdRegistered(5)
    with pytest.raises(protocol.LocalProtocolError):
        protocol.RegisterUffd(6, 4096, 0, 0)  # empty range


# ---------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def pages(image, tmp_path_factory):
    """``image`` as a pages checkpoint (zero pages dropped, 64 KiB checksum chunks)."""
    out = str(tmp_path_factory.mktemp("uffd-minor-pages") / "ckpt")
    create_checkpoint(image, out, chunk_size=64 << 10)
    return out


@pytest.mark.parametrize("form", ["raw", "pages"])
async def test_faults_and_background_load_are_byte_exact(tmp_path, image, pages, form):
    """vCPUs fault while nothing else loads (no sweep: every data touch waits for its
    read), then the rest is loaded (a prefetch of everything) and the whole memory is
    checked: data pages carry the image's bytes, holes read as zero.  From the raw
    image and from its pages checkpoint (each page served only once its chunk's
    checksum matched; zero pages are holes there)."""
    # no read at once either: a cached page would be read inside submit_wait, not waited for
    source = image if form == "raw" else pages
    opts = options(tmp_path, source, config=LoaderConfig(sweep=False, read_now_bytes=0))
    holes, data = holes_and_data(source)
    touches = [(0, off, PAGE) for off in range(0, SIZE, 61 * PAGE)]
    async with serving(opts, image) as (state, vmm):
        report = await trio.to_thread.run_sync(lambda: vmm.touch(touches, vcpus=3))
        assert report.touches == len(touches) and report.mismatches == [] and report.errors == []
        (reg,) = registrations(state)
        assert reg.faults_waited > 0 and not state.loader.done.is_set()
        state.loader.prefetch(0, SIZE)
        await state.loader.done.wait()
        await wait_for(lambda: reg.pending.total == 0)
        assert await trio.to_thread.run_sync(vmm.verify_all) == []
        hole_lo = holes[0][0]
        assert await trio.to_thread.run_sync(lambda: vmm.read(hole_lo, PAGE)) == bytes(PAGE)
        assert reg.faults_zero > 0 and reg.faults_failed == 0 and reg.faults_stray == 0
        data_bytes = sum(hi - lo for lo, hi in data)
        assert reg.mapped_bytes <= data_bytes
        stats = await trio.to_thread.run_sync(vmm.memory.stats)
        assert stats["verify"] is (form == "pages")
        if form == "pages":
            assert stats["chunks_verified"] > 0 and stats["corrupt_chunks"] == 0
        assert stats["uffd_minor"]["registrations"] == 1
        assert stats["uffd_minor"]["ranges"][0]["faults"] == reg.faults


async def test_loaded_pages_are_mapped_ahead_so_the_guest_stops_faulting(tmp_path, dense):
    """Once the load is done and mapped in, reading all of memory faults no more."""
    opts = options(tmp_path, dense)
    async with serving(opts, dense) as (state, vmm):
        await state.loader.done.wait()
        (reg,) = registrations(state)
        await wait_for(lambda: reg.pending.total == 0)
        before = reg.faults
        assert await trio.to_thread.run_sync(vmm.verify_all) == []
        assert reg.faults == before
        assert reg.mapped_bytes == SIZE - before * PAGE


async def test_guest_writes_survive_the_rest_of_the_load(tmp_path, image):
    """The guest writes pages (data and holes) while the rest of memory is not loaded
    (no sweep: only what it touches loads); then everything is loaded (a prefetch of
    it all, in small reads); its bytes are still there, in guest memory and in the
    memory file, and every other page is the image's."""
    opts = options(tmp_path, image, config=LoaderConfig(sweep=False, read_size=16 << 10))
    holes, data = holes_and_data(image)
    targets = sorted({lo for lo, _ in data} | {hi - PAGE for lo, hi in data} | {lo for lo, _ in holes}
                     | {lo + PAGE for lo, hi in holes if hi - lo > PAGE})
    async with serving(opts, image) as (state, vmm):
        def write_all() -> None:  # one thread per page: the waits go ahead of the sweep together
            threads = [threading.Thread(target=vmm.write, args=(off, off.to_bytes(8, "little") * (PAGE // 8)))
                       for off in targets]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        await trio.to_thread.run_sync(write_all)
        assert not state.loader.done.is_set(), "the load ended before the writes: nothing was tested"
        state.loader.prefetch(0, SIZE)
        await state.loader.done.wait()
        (reg,) = registrations(state)
        await wait_for(lambda: reg.pending.total == 0)

        def check() -> list[int]:
            bad = []
            mem = state.memory.view
            for off in range(0, SIZE, PAGE):
                want = (off.to_bytes(8, "little") * (PAGE // 8) if off in targets
                        else expected_bytes(image, off))
                if vmm.read(off, PAGE) != want or bytes(mem[off:off + PAGE]) != want:
                    bad.append(off)
            return bad

        assert await trio.to_thread.run_sync(check) == []


async def test_disconnect_stops_serving_and_closes_the_uffd(tmp_path, image):
    opts = options(tmp_path, image)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        vmm = await trio.to_thread.run_sync(lambda: ZeroCopyVmm(opts.socket_path, expected=image))
        (reg,) = registrations(state)
        fd = reg.uffd.fd
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        await trio.to_thread.run_sync(vmm.close)
        await wait_for(lambda: not registrations(state))
        assert reg.closed and reg.uffd.fd == -1
        assert not os.path.exists(f"/proc/self/fd/{fd}") or \
            os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[userfaultfd]"
        await wait_for(lambda: state.server.statistics().connections == 0)
        assert state.server.uffd_minor is not None and state.server.uffd_minor.total == 1
        state.stop()


# ---------------------------------------------------------------- refusals


def register_raw(client: Client, fd: int | None, address: int, length: int, offset: int):
    """Send ``uffd-register`` with ``fd`` attached; return the reply."""
    event = protocol.RegisterUffd(next(client._ids), address, length, offset)
    data = client.conn.send(event)
    rights = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [fd]))]
    client.sock.sendmsg([data], rights)
    return client.reply(event.id)


def minor_uffd(features=_uffd.FEATURE_MINOR_SHMEM) -> int:
    fd = _uffd.userfaultfd()
    _uffd.api(fd, features)
    return fd


def refusals(socket_path: str) -> dict[str, tuple[str, str]]:
    out = {}
    with Client.connect(socket_path, timeout=10) as client:
        memfd = client.memory_fd(writable=True)
        m = mmap.mmap(memfd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        private = mmap.mmap(memfd, SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        anon = mmap.mmap(-1, SIZE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        priv_base = ctypes.addressof(ctypes.c_char.from_buffer(private))
        anon_base = ctypes.addressof(ctypes.c_char.from_buffer(anon))
        r, w = os.pipe()
        uffds = []
        try:
            def ask(name, fd, address, length, offset):
                reply = register_raw(client, fd, address, length, offset)
                assert isinstance(reply, protocol.ErrorReply), (name, reply)
                out[name] = (reply.code, reply.message)

            ask("no fd", None, base, SIZE, 0)
            ask("not a uffd", r, base, SIZE, 0)
            uffds.append(minor_uffd(0))
            ask("no minor feature", uffds[-1], base, SIZE, 0)
            for name, address, length, offset in [
                ("unaligned", base + 1, PAGE, 0),
                ("out of range", base, SIZE, PAGE),
                ("private mapping", priv_base, SIZE, 0),
                ("anonymous memory", anon_base, SIZE, 0),
                ("wrong offset", base + PAGE, PAGE, 2 * PAGE),
            ]:
                uffds.append(minor_uffd())
                ask(name, uffds[-1], address, length, offset)
            # the connection survives every refusal
            assert client.stats()["uffd_minor"]["refused"] == len(out)
        finally:
            for fd in (r, w, memfd, *uffds):
                os.close(fd)
            del base, priv_base, anon_base
            m.close()
            private.close()
            anon.close()
    return out


async def test_bad_registrations_get_clear_errors(tmp_path, image):
    opts = options(tmp_path, image)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        out = await trio.to_thread.run_sync(lambda: refusals(opts.socket_path))
        assert registrations(state) == []
        state.stop()
    assert out["no fd"][0] == "bad-message" and "without a file descriptor" in out["no fd"][1]
    assert out["not a uffd"] == ("bad-message", "the descriptor is not a userfaultfd")
    assert out["no minor feature"][0] == "unsupported" and "MINOR_SHMEM" in out["no minor feature"][1]
    assert out["unaligned"][0] == "bad-message" and "multiples of the page size" in out["unaligned"][1]
    assert out["out of range"][0] == "out-of-range"
    assert out["private mapping"][0] == "bad-message" and "private, not MAP_SHARED" in out["private mapping"][1]
    assert out["anonymous memory"][0] == "bad-message" and "not a mapping of the memory file" in \
        out["anonymous memory"][1]
    assert out["wrong offset"][0] == "bad-message" and "maps memory offset 0x1000, not 0x2000" in \
        out["wrong offset"][1]


async def test_not_allowed_without_writable_memory_fd(tmp_path, image):
    opts = options(tmp_path, image, allow_writable_memory_fd=False)

    def attempt() -> tuple[str | None, str]:
        with pytest.raises(ClientError) as info:
            ZeroCopyMemory.open(opts.socket_path, timeout=10)
        # a VMM with a writable mapping from elsewhere is refused too
        with Client.connect(opts.socket_path, timeout=10) as client:
            fd = minor_uffd()
            try:
                reply = register_raw(client, fd, 1 << 30, SIZE, 0)
            finally:
                os.close(fd)
        assert isinstance(reply, protocol.ErrorReply) and reply.code == "forbidden"
        assert "--allow-writable-memory-fd" in reply.message
        return info.value.code, info.value.message

    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        code, message = await trio.to_thread.run_sync(attempt)
        state.stop()
    assert code == "forbidden" and "--allow-writable-memory-fd" in message


async def test_registrations_per_connection_are_bounded(tmp_path, image, monkeypatch):
    monkeypatch.setattr(_uffd_minor, "MAX_REGISTRATIONS", 2)
    opts = options(tmp_path, image)

    def attempt() -> list[str]:
        codes = []
        with Client.connect(opts.socket_path, timeout=10) as client:
            memfd = client.memory_fd(writable=True)
            m = mmap.mmap(memfd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            base = ctypes.addressof(ctypes.c_char.from_buffer(m))
            try:
                for i in range(3):
                    reply = register_raw(client, minor_uffd(), base + i * MiB, MiB, i * MiB)
                    codes.append(reply.code if isinstance(reply, protocol.ErrorReply) else "ok")
                reply = register_raw(client, minor_uffd(), base, PAGE, 0)  # overlaps the first
                codes.append(reply.code if isinstance(reply, protocol.ErrorReply) else "ok")
            finally:
                del base
                os.close(memfd)
        m.close()  # after the connection closed: no registration is left to serve it
        return codes

    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        codes = await trio.to_thread.run_sync(attempt)
        await wait_for(lambda: not registrations(state))
        state.stop()
    assert codes == ["ok", "ok", "too-many-requests", "too-many-requests"]


# ---------------------------------------------------------------- failures


async def test_read_error_gives_the_vcpu_sigbus(tmp_path, dense):
    """A page whose read fails is poisoned: the child VMM dies with SIGBUS on it,
    after the pages before it came right."""
    good, bad = 1 * MiB, 3 * MiB
    opts = options(tmp_path, dense, config=LoaderConfig(sweep=False),
                   wrap_queue=lambda q: aio.testing.FaultInjectingQueue(q, aio.testing.fail_offsets(bad, bad + PAGE)))
    lines: list[str] = []
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        child = spawn_zero_copy_child(opts.socket_path, [good, bad, good + PAGE], expected=dense)
        try:
            def follow() -> int:
                assert child.stdout is not None
                lines.extend(line.strip() for line in child.stdout)
                return child.wait(10)

            with trio.fail_after(15):
                code = await trio.to_thread.run_sync(follow)
        finally:
            reap_child(child)
        service = state.server.uffd_minor
        assert service is not None
        await wait_for(lambda: not service.registrations)
        state.stop()
    assert code == -signal.SIGBUS, lines
    assert f"ok {good}" in lines and lines[-1] == f"touching {bad}"


async def test_a_corrupt_chunk_gives_the_vcpu_sigbus_never_its_bytes(tmp_path, dense):
    """A pages checkpoint with one byte flipped in a chunk: the zero-copy VMM gets
    the good pages (those loaded with it and mapped ahead included), and SIGBUS on
    the corrupt chunk, whose wrong bytes lie in the memory file but are never mapped."""
    ckpt = str(tmp_path / "ckpt")
    create_checkpoint(dense, ckpt, chunk_size=64 << 10)
    layout = open_checkpoint(ckpt).layout
    assert len(layout) == 1 and layout.mem_at(0) == layout.file_at(0) == 0, "a dense image: file offset == memory"
    flip = 3 * MiB + 100
    with open(os.path.join(ckpt, "pages.img"), "r+b") as f:
        f.seek(flip)
        byte = f.read(1)[0]
        f.seek(flip)
        f.write(bytes([byte ^ 0x08]))
    good = flip - flip % (64 << 10) - PAGE  # the page just before the corrupt chunk
    bad = flip - flip % PAGE
    # a read of the good page's chunk reads its neighbours too: the sweep is off, so
    # only faults and what comes with them load
    opts = options(tmp_path, ckpt, config=LoaderConfig(sweep=False, read_size=256 << 10))
    lines: list[str] = []
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        child = spawn_zero_copy_child(opts.socket_path, [good, 1 * MiB, bad], expected=dense)
        try:
            def follow() -> int:
                assert child.stdout is not None
                lines.extend(line.strip() for line in child.stdout)
                return child.wait(10)

            with trio.fail_after(15):
                code = await trio.to_thread.run_sync(follow)
        finally:
            reap_child(child)
        service = state.server.uffd_minor
        assert service is not None
        await wait_for(lambda: not service.registrations)
        stats = state.loader.statistics()
        state.stop()
    assert code == -signal.SIGBUS, lines
    assert f"ok {good}" in lines and f"ok {MiB}" in lines and lines[-1] == f"touching {bad}"
    assert stats.corrupt_chunks == 1 and stats.failed_ranges == [(flip - flip % (64 << 10), 64 << 10, 0)]


async def test_dropped_pages_come_back_as_minor_faults(tmp_path, dense):
    """After the load, pages the guest dropped with MADV_DONTNEED are still in the
    memory file: touching them again is a MINOR fault, answered at once with the
    same bytes."""
    opts = options(tmp_path, dense)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    async with serving(opts, dense) as (state, vmm):
        await state.loader.done.wait()
        (reg,) = registrations(state)
        await wait_for(lambda: reg.pending.total == 0)
        assert libc.madvise(vmm.address(MiB), 16 * PAGE, 4) == 0  # MADV_DONTNEED
        before = reg.faults_minor
        report = await trio.to_thread.run_sync(
            lambda: vmm.touch([(0, MiB + i * PAGE, PAGE) for i in range(16)], vcpus=2))
        assert report.mismatches == [] and report.errors == []
        assert reg.faults_minor - before == 16 and reg.faults_waited == 0 and reg.faults_zero == 0


async def test_daemon_stop_ends_the_registration(tmp_path, image):
    """The daemon stops with a VMM registered: it exits, closing the registration."""
    opts = options(tmp_path, image)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        vmm = await trio.to_thread.run_sync(lambda: ZeroCopyVmm(opts.socket_path, expected=image))
        try:
            (reg,) = registrations(state)
            state.stop()
            with trio.fail_after(10):
                while nursery.child_tasks:
                    await trio.sleep(0.01)
            assert reg.closed and reg.uffd.fd == -1
        finally:
            await trio.to_thread.run_sync(vmm.close)


# ---------------------------------------------------------------- command line


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=timeout)


def test_loadgen_uffd_minor_replays_a_trace_in_zero_copy_mode(tmp_path, image):
    trace = tmp_path / "t.txt"
    trace.write_text("# page_size: 4096\n" + "".join(f"{i * 100} {(i * 37 % 1023) * 4096:#x} 8192\n"
                                                     for i in range(300)))
    args = ["loadgen", "--socket", str(tmp_path / "s.sock"), "--uffd-minor", "--trace", str(trace),
            "--image", image, "--vcpus", "2", "--closed-loop"]
    with DaemonProcess(image, str(tmp_path / "s.sock"), str(tmp_path / "d.log"),
                       ["--background", "--allow-writable-memory-fd"]):
        r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert "loadgen --uffd-minor: 600 pages touched by 2 vCPUs" in r.stderr and "0 mismatches" in r.stderr
    with DaemonProcess(image, str(tmp_path / "s.sock"), str(tmp_path / "d2.log"), ["--background"]):
        r = cli(*args)
    assert r.returncode == 1 and "forbidden" in r.stderr and "--allow-writable-memory-fd" in r.stderr


_STRAY_CHILD = """
import ctypes, mmap, os, socket, sys
from array import array
import protocol
from loader import Client
from loader.uffd import _ioctl as _uffd
client = Client.connect(sys.argv[1], timeout=10)
memfd = client.memory_fd(writable=True)
m = mmap.mmap(memfd, 2 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
uffd = _uffd.userfaultfd()
_uffd.api(uffd, _uffd.FEATURE_MINOR_SHMEM)
_uffd.register(uffd, base, 2 << 20, _uffd.REGISTER_MODE_MISSING | _uffd.REGISTER_MODE_MINOR)
event = protocol.RegisterUffd(100, base, 1 << 20, 0)  # only half of what is registered
client.sock.sendmsg([client.conn.send(event)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [uffd]))])
assert isinstance(client.reply(100), protocol.UffdRegistered)
buf = ctypes.create_string_buffer(4096)
ctypes.memmove(buf, base, 4096)
print("inside ok", flush=True)
ctypes.memmove(buf, base + (3 << 19), 4096)
print("outside returned", flush=True)
"""


async def test_fault_outside_the_range_handed_over_gets_sigbus(tmp_path, dense):
    """A VMM that registered more than it handed over: a fault in the rest is
    poisoned (a wake would only fault again, forever)."""
    opts = options(tmp_path, dense)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        child = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-c", _STRAY_CHILD, opts.socket_path], capture_output=True, text=True, timeout=30))
        service = state.server.uffd_minor
        assert service is not None
        await wait_for(lambda: not service.registrations)
        state.stop()
    assert child.returncode == -signal.SIGBUS, child.stderr
    assert child.stdout.split() == ["inside", "ok"]


async def test_part_of_memory_at_an_offset(tmp_path, image):
    """A mapping of memory [1 MiB, 2 MiB) only: its bytes are the image's there."""
    opts = options(tmp_path, image)
    async with serving(opts, image, offset=MiB, size=MiB) as (state, vmm):
        assert vmm.memory is not None and vmm.memory.size == MiB
        (reg,) = registrations(state)
        assert (reg.offset, reg.size) == (MiB, MiB)
        assert await trio.to_thread.run_sync(vmm.verify_all) == []
        with open(image, "rb") as f:
            f.seek(MiB)
            want = f.read(MiB)
        assert await trio.to_thread.run_sync(lambda: vmm.read(MiB, MiB)) == want


def test_demo_uffd_minor(tmp_path):
    r = cli("demo", "--uffd-minor", "--size", "16M", "--clients", "2", "--waits", "30", "--workdir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 wrong touches, 0 wrong MiB after the load" in r.stdout and "0 bytes copied" in r.stdout
    assert "daemon exit        0" in r.stdout


def test_bench_run_zero_copy_structure(tmp_path):
    """The measuring function runs both handlers on the same touches (fill, zero-copy,
    zero-copy, fill), checks every byte (it raises on a wrong one) and reports ratios."""
    from bench._uffd_minor import run_zero_copy

    image = str(tmp_path / "dense.img")
    make_sample_image(image, 8 * MiB, seed=2, dense=True)
    result = run_zero_copy(image, str(tmp_path), touches=100, vcpus=2, window_s=0.05, log=lambda line: None)
    assert result["order"] == ["fill", "zero-copy", "zero-copy", "fill"]
    assert [len(result["runs"][m]) for m in ("fill", "zero-copy")] == [2, 2]
    for run in result["runs"]["zero-copy"]:
        assert run["touches"] == 100 and run["copied_bytes"] == 0
        assert run["handler"]["faults_failed"] == 0 and run["no_more_faults_s"] is not None
    assert set(result["ratios"]) == {"fault_p50", "blocked", "no_more_faults"}
    assert result["ratios"]["blocked"] is not None


async def test_a_range_closed_before_its_task_runs_never_touches_a_descriptor():
    """A connection can close between ``uffd-register`` and the first run of the task
    serving it: the task then returns without waiting on the (closed, maybe reused) fd."""
    from types import SimpleNamespace

    from loader.core._rangeset import RangeSet

    nothing = RangeSet()  # a loader with no data: nothing to map ahead
    loader = SimpleNamespace(layout=SimpleNamespace(data_in=lambda lo, hi: iter(())),
                             unloaded=nothing, inflight=nothing, failed=nothing,
                             not_loaded=lambda lo, hi: [], loaded_in=lambda lo, hi: [])
    fd = _uffd.userfaultfd()
    reg = _uffd_minor.MinorRegistration(loader, fd, 0x10000000, 4096, 0, 4096)  # type: ignore[arg-type]
    reg.close()
    assert reg.closed and reg.uffd.fd == -1
    r, w = os.pipe()  # likely takes the closed descriptor's number
    try:
        with trio.fail_after(5):
            await reg.run()
        os.fstat(r)
    finally:
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------- the VMM's mappings (issue 21, item 8)

ROOT_FILE = os.path.abspath(__file__)
_MAPS_OPENS: list[tuple[str, int]] | None = None  # (path, thread) of /proc/PID/maps opened, while recording


def _audit(event: str, args: tuple) -> None:
    if _MAPS_OPENS is not None and event == "open" and isinstance(args[0], str):
        path = args[0]
        if path.startswith("/proc/") and path.endswith("/maps"):
            _MAPS_OPENS.append((path, threading.get_ident()))


sys.addaudithook(_audit)


async def test_uffd_register_reads_the_vmms_mappings_off_the_event_loop(tmp_path, image):
    """/proc/PID/maps is read in a worker thread: a VMM with many mappings costs the
    event loop nothing (before, each uffd-register read it in the trio thread, about
    20 ms per request with 30k mappings, and every other client waited)."""
    global _MAPS_OPENS
    loop_thread = threading.get_ident()
    _MAPS_OPENS = []
    try:
        async with serving(options(tmp_path, image), image) as (state, vmm):
            await wait_for(lambda: len(registrations(state)) == 1)
            data = await trio.to_thread.run_sync(vmm.read, 0, PAGE)
            assert data == expected_bytes(image, 0)
        opens = list(_MAPS_OPENS)
    finally:
        _MAPS_OPENS = None
    assert opens and all(path == f"/proc/{os.getpid()}/maps" for path, _ in opens)
    assert all(thread != loop_thread for _, thread in opens)


def test_reading_the_mappings_is_bounded():
    """Past its byte or time bound the check is a refusal, never a longer stall."""
    m = mmap.mmap(-1, 4 * PAGE, mmap.MAP_SHARED)
    try:
        view = ctypes.c_char.from_buffer(m)
        address = ctypes.addressof(view)
        del view
        st = os.stat(ROOT_FILE)  # any file: the mapping is not of it
        pid = os.getpid()
        why = _uffd_minor.mapping_covers(pid, address, PAGE, 0, st, max_bytes=200)
        assert why is not None and why.startswith(f"pid {pid} has more than 200 bytes of mappings below")
        why = _uffd_minor.mapping_covers(pid, address, PAGE, 0, st, timeout=0.0)
        assert why == f"the mappings of pid {pid} could not be read within 0 s"
        # within its bounds it answers as before: this is a mapping, but not of that file
        assert "not a mapping of the memory file" in _uffd_minor.mapping_covers(pid, address, PAGE, 0, st)
    finally:
        m.close()
