"""The uffd socket against hostile and careless peers, through real daemon processes
(issue 21): nested or oversized handshakes, impossible addresses, silent peers, a
second daemon on the same path, and a VMM that forks."""

from __future__ import annotations

import ctypes
import json
import os
import select
import socket
import subprocess
import sys
import time

import pytest

from loader import Client
from loader.uffd import _ioctl as _uffd
from loader.uffd._handshake import (
    MAX_HANDSHAKE,
    MAX_PENDING_HANDSHAKES,
    MAX_REGIONS,
    HandshakeError,
    parse_handshake,
)
from workloads import DaemonProcess, make_sample_image
from workloads._vmm import DEFAULT_FEATURES, GuestRegion, VmmEmulator, spawn_child

MiB = 1 << 20
PAGE = 4096
SIZE = 16 * MiB
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_REASON = _uffd.unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("uffd-handshake") / "memory.img")
    make_sample_image(path, SIZE, seed=21, dense=True)
    return path


def start(tmp_path, image, *extra: str, name: str = "d") -> DaemonProcess:
    return DaemonProcess(image, str(tmp_path / f"{name}.sock"), str(tmp_path / f"{name}.log"),
                         ["--background", "--uffd-socket", str(tmp_path / f"{name}.uffd"), *extra])


def log_of(daemon: DaemonProcess) -> str:
    with open(daemon.log_path) as f:
        return f.read()


def wait_for_log(daemon: DaemonProcess, *texts: str, timeout: float = 30.0) -> str:
    """The daemon's log once it holds one of ``texts`` (or its exit, or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        text = log_of(daemon)
        if any(t in text for t in texts) or time.monotonic() > deadline:
            return text
        if daemon.proc is not None and daemon.proc.poll() is not None:
            return log_of(daemon)
        time.sleep(0.02)


def handshake(path: str, data: bytes, *, with_uffd: bool = True) -> socket.socket:
    """Connect and send ``data`` (with a fresh userfaultfd in SCM_RIGHTS); the socket stays open."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    if with_uffd:
        fd = _uffd.userfaultfd()
        try:
            _uffd.api(fd)
            s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(ctypes.c_int(fd)).cast("B")))])
        finally:
            os.close(fd)
    else:
        s.sendall(data)
    return s


def closed_by_daemon(s: socket.socket, timeout: float = 30.0) -> bool:
    """Whether the daemon closes ``s`` (EOF) within ``timeout`` (a bound for a hang, not a measure)."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:  # closed with some of what was sent unread
        return True
    except TimeoutError:
        return False


def still_open(s: socket.socket) -> bool:
    try:
        s.recv(1, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return False


def served(daemon: DaemonProcess, image: str, offsets: list[int], timeout: float = 60.0) -> list[str]:
    """A VMM child (one region over the image) touching ``offsets``; its lines, once it exited 0."""
    child = spawn_child(str(daemon.argv[daemon.argv.index("--uffd-socket") + 1]), SIZE, offsets,
                        expected=image, features=DEFAULT_FEATURES)
    try:
        out, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate()
        pytest.fail(f"the VMM was not served: {out!r}; daemon: {daemon.stderr_tail(5)}")
    assert child.returncode == 0, out
    lines = out.split()
    assert all(f"ok {o}" in out for o in offsets), out
    return lines


def wait_served(daemon: DaemonProcess) -> None:
    with Client.connect(daemon.socket_path, timeout=30) as c:
        c.wait(3 * MiB, 64 * PAGE)  # the wait socket still answers


def uffds_in(pid: int) -> int:
    n = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[userfaultfd]":
                n += 1
        except OSError:
            pass
    return n


# -- item 2: nested JSON --------------------------------------------------------------------------


def test_a_nested_json_handshake_is_refused_and_the_daemon_keeps_serving(tmp_path, image):
    with start(tmp_path, image) as daemon:
        uffd = str(tmp_path / "d.uffd")
        for depth in (1100, 100_000):
            s = handshake(uffd, b"[" * depth)
            assert closed_by_daemon(s)
            s.close()
        text = wait_for_log(daemon, "nested too deeply")
        assert daemon.proc.poll() is None, daemon.stderr_tail(5)
        assert "refused a connection: handshake is not JSON: nested too deeply" in text
        assert "Traceback" not in text and "RecursionError" not in text
        wait_served(daemon)
        served(daemon, image, [0, 5 * MiB])  # a real VMM after it is served
        assert daemon.proc.wait(30) == 0  # it went: the daemon ends by itself, exit 0


# -- item 13: addresses, the region limit and the buffer ------------------------------------------


def region(base: int, size: int = PAGE, offset: int = 0, page: int = PAGE) -> dict:
    return {"base_host_virt_addr": base, "size": size, "offset": offset, "page_size": page, "page_size_kib": page}


def test_handshake_addresses_are_bounded_by_the_address_space():
    def refused(*regions: dict) -> str:
        with pytest.raises(HandshakeError) as info:
            parse_handshake(json.dumps(list(regions)).encode(), SIZE)
        return str(info.value)

    assert "from 0 to 2^64-1" in refused(region(1 << 64))
    assert "from 0 to 2^64-1" in refused(region(1 << 70))
    assert "past the end of the 64-bit address space" in refused(region((1 << 64) - PAGE, 2 * PAGE))
    assert "multiples of 4096" in refused(region(0x10000 + 1))
    assert "power of two" in refused(region(0x10000, page=1 << 64))
    # the last page of the address space is a page like any other
    assert parse_handshake(json.dumps([region((1 << 64) - PAGE)]).encode(), SIZE)[0].end == 1 << 64


def test_the_region_limit_fits_the_handshake_buffer():
    """1024 regions in Firecracker's format, every number at its widest and indented,
    fit the buffer; 1025 are refused as too many regions, not as "not JSON"."""
    top = (1 << 64) - (1 << 32)
    widest = [region(top - (i + 1) * (1 << 20), PAGE, i * 2 * PAGE) for i in range(MAX_REGIONS + 1)]
    data = json.dumps(widest[:MAX_REGIONS], indent=2).encode()
    assert len(data) <= MAX_HANDSHAKE
    assert len(parse_handshake(data, SIZE)) == MAX_REGIONS
    with pytest.raises(HandshakeError, match=f"has {MAX_REGIONS + 1} regions, more than {MAX_REGIONS}"):
        parse_handshake(json.dumps(widest, indent=2).encode(), SIZE)
    with pytest.raises(HandshakeError, match=f"more than {MAX_HANDSHAKE}"):
        parse_handshake(b" " * MAX_HANDSHAKE + data, SIZE)


def test_an_address_past_2_64_is_refused_by_the_daemon_which_then_serves_a_vmm(tmp_path, image):
    with start(tmp_path, image) as daemon:
        uffd = str(tmp_path / "d.uffd")
        s = handshake(uffd, json.dumps([region((1 << 64) - PAGE, 2 * PAGE)]).encode())
        assert closed_by_daemon(s)
        s.close()
        text = wait_for_log(daemon, "address space", "serving")
        assert "refused a connection: region 0: base 0xfffffffffffff000 + size 0x2000 is past the end" in text
        served(daemon, image, [2 * MiB])
        assert daemon.proc.wait(30) == 0
        assert "Traceback" not in log_of(daemon)


def test_a_vmm_with_1024_regions_is_served_and_1025_are_refused_as_too_many(tmp_path, image):
    with start(tmp_path, image) as daemon:
        uffd = str(tmp_path / "d.uffd")
        with VmmEmulator([GuestRegion(i * 2 * PAGE, PAGE) for i in range(MAX_REGIONS + 1)]) as vmm:
            vmm.connect(uffd)
            assert closed_by_daemon(vmm.sock)
        text = wait_for_log(daemon, "regions, more than")
        assert f"handshake has {MAX_REGIONS + 1} regions, more than {MAX_REGIONS}" in text
        with VmmEmulator([GuestRegion(i * 2 * PAGE, PAGE) for i in range(MAX_REGIONS)], expected=image) as vmm:
            vmm.connect(uffd)
            text = wait_for_log(daemon, "uffd: serving", "not JSON")
            assert f"uffd: serving {MAX_REGIONS} region(s)" in text, daemon.stderr_tail(5)
            report = vmm.touch([(0, i * 2 * PAGE, PAGE) for i in range(0, MAX_REGIONS, 7)])
            assert report.touches == len(range(0, MAX_REGIONS, 7)) and not report.mismatches
        assert daemon.proc.wait(30) == 0


# -- item 7: silent peers, handshakes without a descriptor, many at once ---------------------------


def connected_vmm(daemon: DaemonProcess, image: str) -> VmmEmulator:
    """An in-process VMM (one region over the image) the daemon has taken: checked in
    its log before any page is touched (a touch it never answers would hang the test)."""
    vmm = VmmEmulator([GuestRegion(0, SIZE)], expected=image)
    try:
        vmm.connect(str(daemon.argv[daemon.argv.index("--uffd-socket") + 1]))
        text = wait_for_log(daemon, "uffd: serving")
        assert "uffd: serving" in text, daemon.stderr_tail(5)
    except BaseException:
        vmm.close()
        raise
    return vmm


def test_silent_peers_do_not_delay_a_vmm(tmp_path, image):
    """Two peers connect first and send nothing: the VMM after them is served while
    they are still waiting for their handshake (before, each held the socket for
    10 s in turn: the VMM's first fault was answered after both had timed out)."""
    with start(tmp_path, image) as daemon:
        uffd = str(tmp_path / "d.uffd")
        silent = []
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(uffd)
            silent.append(s)
        with connected_vmm(daemon, image) as vmm:
            report = vmm.touch([(0, 0, PAGE), (0, 7 * MiB, PAGE)])
            assert report.touches == 2 and not report.mismatches
            assert all(still_open(s) for s in silent)  # still in their handshake's time
        for s in silent:
            s.close()
        assert daemon.proc.wait(30) == 0


def test_a_handshake_without_a_descriptor_is_refused_at_once(tmp_path, image):
    """Refused as it arrives: before a silent peer that came first has timed out."""
    with start(tmp_path, image) as daemon:
        uffd = str(tmp_path / "d.uffd")
        first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        first.connect(uffd)
        s = handshake(uffd, json.dumps([region(0x10000)]).encode(), with_uffd=False)
        assert closed_by_daemon(s)
        assert still_open(first)
        assert "handshake carried no userfaultfd" in wait_for_log(daemon, "no userfaultfd")
        first.close()
        s.close()


def test_pending_handshakes_are_bounded_and_the_oldest_makes_room(tmp_path, image):
    with start(tmp_path, image) as daemon:
        uffd = str(tmp_path / "d.uffd")
        silent = []
        for _ in range(2 * MAX_PENDING_HANDSHAKES):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(uffd)
            silent.append(s)
        # the oldest are closed as newer ones come: at most MAX_PENDING_HANDSHAKES are kept
        for s in silent[:MAX_PENDING_HANDSHAKES]:
            assert closed_by_daemon(s)
        with connected_vmm(daemon, image) as vmm:  # one more makes room for itself too
            report = vmm.touch([(0, MiB, PAGE)])
            assert report.touches == 1 and not report.mismatches
            open_now = sum(still_open(s) for s in silent[MAX_PENDING_HANDSHAKES:])
            assert open_now < MAX_PENDING_HANDSHAKES  # (those left may time out meanwhile on a slow host)
            assert "newer connections came before its handshake" in log_of(daemon)
        for s in silent:
            s.close()
        assert daemon.proc.wait(30) == 0


# -- item 5: the uffd socket gets the wait socket's rules -----------------------------------------


def restore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "restore", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_one_path_for_both_sockets_is_refused(tmp_path, image):
    path = str(tmp_path / "both.sock")
    for args in (["--socket", path, "--uffd-socket", path],
                 ["--socket", path, "--uffd-socket", str(tmp_path / "." / "both.sock")]):
        r = restore(image, "--background", *args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("pageload: --uffd-socket")
        assert "also the wait socket's path" in r.stderr
    assert not os.path.exists(path)


def test_a_live_uffd_socket_or_wait_socket_is_never_taken_over(tmp_path, image):
    """A second daemon given the first one's uffd socket, or its wait socket, as its
    --uffd-socket: one line, exit 2, and both of the first one's sockets are left as
    they were (before, the second daemon unlinked them)."""
    with start(tmp_path, image, name="a") as first:
        uffd, wait = str(tmp_path / "a.uffd"), first.socket_path
        before = {p: os.stat(p).st_ino for p in (uffd, wait)}
        for taken in (uffd, wait):
            r = restore(image, "--background", "--socket", str(tmp_path / "b.sock"), "--uffd-socket", taken)
            assert r.returncode == 2, r.stderr
            assert r.stderr.count("\n") == 1 and "another daemon is serving on this socket" in r.stderr
            assert r.stderr.startswith(f"pageload: --uffd-socket {taken}")
        assert {p: os.stat(p).st_ino for p in (uffd, wait)} == before
        assert not os.path.exists(tmp_path / "b.sock")  # the refused one leaves nothing behind
        wait_served(first)
        served(first, image, [4 * MiB])
        assert first.proc.wait(30) == 0
    assert not os.path.exists(uffd) and not os.path.exists(wait)


def test_the_uffd_socket_file_is_removed_at_exit_only_if_it_is_ours(tmp_path, image):
    uffd = str(tmp_path / "d.uffd")
    with start(tmp_path, image) as daemon:
        os.unlink(uffd)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:  # someone else's, bound since
            other.bind(uffd)
            inode = os.stat(uffd).st_ino
            assert daemon.stop() == 0
            assert os.stat(uffd).st_ino == inode
    assert "is no longer the socket this daemon created" in log_of(daemon)


def test_a_stale_uffd_socket_is_replaced_and_a_file_is_refused(tmp_path, image):
    uffd = str(tmp_path / "d.uffd")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(uffd)  # bound, never listening: a dead daemon's leftover
    with start(tmp_path, image) as daemon:
        served(daemon, image, [0])
        assert daemon.proc.wait(30) == 0
    assert not os.path.exists(uffd)
    with open(uffd, "w") as f:
        f.write("precious")
    r = restore(image, "--background", "--socket", str(tmp_path / "x.sock"), "--uffd-socket", uffd)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a socket" in r.stderr
    with open(uffd) as f:
        assert f.read() == "precious"


# -- item 10: UFFD_EVENT_FORK ----------------------------------------------------------------------

FORKS = 40

_FORKING_VMM = r"""
import os, sys
from loader.uffd import _ioctl as _uffd
path, mode, forks = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "firecracker":
    from workloads._vmm import DEFAULT_FEATURES, GuestRegion, VmmEmulator
    vmm = VmmEmulator([GuestRegion(0, 16 << 20)], features=DEFAULT_FEATURES | _uffd.FEATURE_EVENT_FORK)
    vmm.connect(path)
    read = vmm.read
    granted = vmm.features
else:
    import ctypes
    from loader.vmm import ZeroCopyMemory
    memory = ZeroCopyMemory.open(path, features=_uffd.FEATURE_EVENT_FORK)
    granted = memory.features
    def read(offset, length):
        buf = ctypes.create_string_buffer(length)
        ctypes.memmove(buf, memory.address + offset, length)
        return buf.raw
if not granted & _uffd.FEATURE_EVENT_FORK:
    print("no-fork-feature", flush=True)
    sys.exit(0)
read(0, 4096)
for _ in range(forks):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
read(8 << 20, 4096)
print("forked", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("mode", ["firecracker", "zero-copy"])
def test_a_forking_vmm_leaves_no_descriptor_behind(tmp_path, image, mode):
    """A VMM whose userfaultfd has UFFD_FEATURE_EVENT_FORK forks FORKS times: each fork
    puts a userfaultfd into the daemon, which closes it (before, every one stayed open),
    and says so once (before: a line per fork)."""
    extra = ["--allow-writable-memory-fd"] if mode == "zero-copy" else []
    with start(tmp_path, image, *extra) as daemon:
        target = str(tmp_path / "d.uffd") if mode == "firecracker" else daemon.socket_path
        child = subprocess.Popen([sys.executable, "-c", _FORKING_VMM, target, mode, str(FORKS)], cwd=ROOT,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([child.stdout], [], [], 60)
            line = child.stdout.readline().strip() if ready else ""
            if line == "no-fork-feature":
                pytest.skip("this kernel does not grant UFFD_FEATURE_EVENT_FORK")
            assert line == "forked", daemon.stderr_tail(5)
            deadline = time.monotonic() + 10
            while uffds_in(daemon.pid) > 1 and time.monotonic() < deadline:
                time.sleep(0.05)  # the last fork's descriptor is closed just after the fork returned
            assert uffds_in(daemon.pid) == 1  # the VMM's own, still served
        finally:
            child.stdin.close()
            child.wait(30)
            child.stdout.close()
        assert child.returncode == 0
        text = wait_for_log(daemon, "forked (UFFD_EVENT_FORK)")
        assert text.count("forked (UFFD_EVENT_FORK)") == 1 and "ignoring event" not in text
