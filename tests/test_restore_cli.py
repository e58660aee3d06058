"""``pageload restore``'s options, end to end: a real daemon process started by the
command line, driven through its socket, its userfaultfd and ``pageload wait``.

The loader's own tests prove what each option does inside the loader; these prove
that the command line hands it over.  Each option is tested both ways, so that a
flag wired to a constant (always on, always off) fails one of them:

* a corrupt chunk is never served: a wait on it gets ``corrupt``, a vCPU touching it
  gets SIGBUS; ``--no-verify`` serves the bytes as stored, wrong byte included;
* ``--no-priority`` and ``--no-sweep`` reach the loader (the daemon reports the
  design it runs; a first-come-first-served wait is answered behind the sweep).
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loader import Client, ClientError
from loader.checkpoint import create_checkpoint
from loader.uffd import _ioctl as _uffd
from workloads import DaemonProcess
from workloads._vmm import spawn_child

MiB = 1 << 20
PAGE = 4096
SIZE = 8 * MiB
FLIP = 5 * MiB + 1234  # a byte of chunk 5 (1 MiB chunks), flipped in the pages file
GOOD = 2 * MiB + 3 * PAGE  # a page of a good chunk


class Corrupt:
    """An 8 MiB image of random bytes (no zero page: pages-file offset == memory
    offset), its pages checkpoint with one byte of chunk 5 flipped, and a raw copy
    of what that checkpoint stores (the flipped byte included)."""

    def __init__(self, d: Path) -> None:
        data = bytearray(random.Random(25).randbytes(SIZE))
        self.raw = str(d / "memory.img")
        Path(self.raw).write_bytes(data)
        self.ckpt = str(d / "ckpt")
        create_checkpoint(self.raw, self.ckpt, chunk_size=MiB)
        self.good_byte = data[FLIP]
        data[FLIP] ^= 0x40
        self.bad_byte = data[FLIP]
        with open(os.path.join(self.ckpt, "pages.img"), "r+b") as f:
            f.seek(FLIP)
            assert f.read(1)[0] == self.good_byte
            f.seek(FLIP)
            f.write(bytes([self.bad_byte]))
        self.stored = str(d / "stored.img")  # what the pages file holds, as a raw image
        Path(self.stored).write_bytes(data)


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> Corrupt:
    return Corrupt(tmp_path_factory.mktemp("corrupt"))


def _daemon(tmp_path: Path, source: str, *args: str) -> DaemonProcess:
    return DaemonProcess(source, str(tmp_path / "s.sock"), str(tmp_path / "daemon.log"), list(args))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=60)


def _memory_byte(client: Client, offset: int) -> int:
    fd = client.memory_fd()
    try:
        with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            return m[offset]
    finally:
        os.close(fd)


def _until_done(client: Client, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while not (stats := client.stats())["done"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.01)
    return stats


# ---------------------------------------------------------------- --no-verify, socket


def test_a_corrupt_chunk_is_never_served_through_the_socket(tmp_path, corrupt):
    with _daemon(tmp_path, corrupt.ckpt, "--background") as daemon:
        with Client.connect(daemon.socket_path) as client:
            with pytest.raises(ClientError) as info:
                client.wait(FLIP - FLIP % PAGE, PAGE)
            assert info.value.code == "corrupt" and "checksum" in info.value.message
            client.wait(GOOD, PAGE)  # the rest is served
            stats = _until_done(client)
            assert stats["verify"] is True and stats["corrupt_chunks"] == 1
            assert stats["failed_ranges"] == [[5 * MiB, MiB, 0]] and stats["loaded_bytes"] == SIZE - MiB
        # and the command line's wait says so and fails
        r = _cli("wait", "--socket", daemon.socket_path, str(FLIP), "1")
        assert r.returncode == 1 and "corrupt" in r.stderr, r.stderr
        assert _cli("wait", "--socket", daemon.socket_path, str(GOOD), str(PAGE)).returncode == 0
        assert daemon.stop() == 0


def test_no_verify_serves_the_bytes_as_stored(tmp_path, corrupt):
    with _daemon(tmp_path, corrupt.ckpt, "--background", "--no-verify") as daemon:
        with Client.connect(daemon.socket_path) as client:
            client.wait(FLIP, 1)
            assert _memory_byte(client, FLIP) == corrupt.bad_byte != corrupt.good_byte
            stats = _until_done(client)
            assert stats["verify"] is False and stats["corrupt_chunks"] == 0 and stats["failed_bytes"] == 0
        r = _cli("wait", "--socket", daemon.socket_path, str(FLIP), "1")
        assert r.returncode == 0, r.stderr
        assert daemon.stop() == 0


# ---------------------------------------------------------------- --no-verify, userfaultfd


_UFFD = _uffd.unavailable(_uffd.FEATURE_POISON)
needs_poison = pytest.mark.skipif(_UFFD is not None, reason=str(_UFFD))


def _vmm_child(uffd: str, offsets: list[int], expected: str) -> tuple[int, list[str]]:
    """An emulated VMM in a child process touching ``offsets``: its exit code and lines."""
    child = spawn_child(uffd, SIZE, offsets, expected=expected)
    assert child.stdout is not None
    try:
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, out.split("\n")


@needs_poison
def test_a_corrupt_chunk_is_never_copied_into_the_guest(tmp_path, corrupt):
    """As Firecracker's page-fault handler: the vCPU touching the corrupt chunk dies
    with SIGBUS (the page is poisoned); the pages before it came right."""
    uffd = str(tmp_path / "uffd.sock")
    with _daemon(tmp_path, corrupt.ckpt, "--background", "--uffd-socket", uffd) as daemon:
        code, lines = _vmm_child(uffd, [GOOD, FLIP - FLIP % PAGE, GOOD + PAGE], corrupt.raw)
        assert code == -signal.SIGBUS, lines
        assert f"ok {GOOD}" in lines and [x for x in lines if x][-1] == f"touching {FLIP - FLIP % PAGE}"
        assert daemon.proc is not None and daemon.proc.wait(10) == 0  # the VMM went: it exits
    log = Path(daemon.log_path).read_text()
    assert "does not match its checksum" in log


@needs_poison
def test_no_verify_copies_the_bytes_as_stored_into_the_guest(tmp_path, corrupt):
    uffd = str(tmp_path / "uffd.sock")
    page = FLIP - FLIP % PAGE
    with _daemon(tmp_path, corrupt.ckpt, "--background", "--no-verify", "--uffd-socket", uffd) as daemon:
        code, lines = _vmm_child(uffd, [GOOD, page], corrupt.stored)  # compared with the stored bytes
        assert code == 0, lines
        assert f"ok {GOOD}" in lines and f"ok {page}" in lines
        assert daemon.proc is not None and daemon.proc.wait(10) == 0


# ---------------------------------------------------------------- --no-priority, --no-sweep


@pytest.mark.parametrize("flags, priority, sweep", [
    ((), True, True),
    (("--no-priority", "--background-reads", "1", "--sweep-read-size", "64K"), False, True),
    (("--no-sweep",), True, False),
])
def test_the_daemon_runs_the_design_its_flags_ask_for(tmp_path, corrupt, flags, priority, sweep):
    with _daemon(tmp_path, corrupt.raw, "--background", *flags) as daemon:
        with Client.connect(daemon.socket_path) as client:
            stats = client.stats()
            assert (stats["priority"], stats["sweep"]) == (priority, sweep)
            if not priority:
                # first come, first served, and the sweep goes up from 0 one 64 KiB read
                # at a time: a wait on the last page is answered once the sweep has
                # loaded what lies before it
                client.wait(SIZE - PAGE, PAGE)
                assert client.stats()["loaded_bytes"] >= SIZE - 64 * 1024
        assert daemon.stop() == 0


@pytest.mark.parametrize("flags", [(), ("--no-kernel-copy",)])
def test_no_kernel_copy_reaches_the_loader(tmp_path, corrupt, flags):
    """Background reads are copied file to file by default (threads backend, a memfd);
    with --no-kernel-copy none is."""
    with _daemon(tmp_path, corrupt.raw, "--background", "--aio", "threads", *flags) as daemon:
        with Client.connect(daemon.socket_path) as client:
            stats = _until_done(client)
        assert (stats["reads_copied"] > 0) is (not flags), stats["reads_copied"]
        assert daemon.stop() == 0


# ---------------------------------------------------------------- -q, --tracemalloc


@pytest.mark.parametrize("flags", [(), ("-q", "--tracemalloc")])
def test_quiet_logs_warnings_only_and_tracemalloc_reports_the_heap(tmp_path, corrupt, flags):
    """Without -q the daemon logs its start and its shutdown (INFO); with it, nothing
    but warnings.  With --tracemalloc its stats carry the Python heap; without, not;
    its CPU time always."""
    with _daemon(tmp_path, corrupt.raw, "--background", *flags) as daemon:
        with Client.connect(daemon.socket_path) as client:
            process = client.stats()["process"]
        assert daemon.stop() == 0
    log = Path(daemon.log_path).read_text()
    on = bool(flags)
    assert ("ready in" in log, "shutting down" in log) == (not on, not on), log
    assert ("heap_bytes" in process and "heap_peak_bytes" in process) is on, process
    assert process["vmrss_bytes"] > 0
    # its CPU time (all threads) so far: start-up alone costs some
    assert process["cpu_user_ms"] + process["cpu_system_ms"] > 0


def test_the_daemon_keeps_numpys_blas_to_one_thread():
    """NumPy's OpenBLAS would start a thread per CPU at import and spin them (the daemon
    does no linear algebra): ``pageload restore`` sets OPENBLAS_NUM_THREADS=1 before
    anything imports NumPy (checked here on a start-up that fails at once: the setting
    comes first), and keeps a value the operator set."""
    probe = (
        "import os, sys\n"
        "from cli import main\n"
        "rc = main(['restore', '/nonexistent/image', '--background', '-q'])\n"
        "import numpy\n"
        "print(rc, os.environ.get('OPENBLAS_NUM_THREADS'), len(os.listdir('/proc/self/task')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    rc, value, threads = out.stdout.split()
    assert (rc, value, threads) == ("2", "1", "1"), out.stdout + out.stderr
    env["OPENBLAS_NUM_THREADS"] = "3"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[1] == "3"
