"""Measuring tools shared by the ``pageload bench`` sections.

* :func:`fill_run` — start a daemon (:class:`workloads.DaemonProcess`), poll its stats until the fill is ``done``,
  optionally with a :class:`WaitProber` thread issuing 4 KiB waits on pages that
  are not loaded yet; returns a :class:`FillRun`.
* :func:`cp_mb_s` — the limit: ``cp IMAGE /dev/shm/...``, timed; :func:`cp_limit` — the
  limit as the sections use it: one cold cp, then the image warmed and cp timed warm.
* :func:`drop_caches` / :func:`warm_cache` / :func:`evict_cache` — page-cache state before a run.

Nothing here asserts a speed: figures are returned, the caller compares them
with goals and reports.  Every daemon started is stopped (SIGTERM, then SIGKILL
after 10 s) before the function that started it returns, even on error.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loader import Client, ClientError
from loader.core._stats import histogram_bound_us
from workloads import DaemonProcess, DaemonStartError

__all__ = [
    "BenchError",
    "CpLimit",
    "FillRun",
    "WaitProber",
    "cp_limit",
    "cp_mb_s",
    "cp_text",
    "drop_caches",
    "fill_run",
    "median",
    "warm_cache",
    "evict_cache",
]


class BenchError(Exception):
    """A measurement could not be taken (the daemon failed to start, timed out...)."""


# --------------------------------------------------------------------------- statistics
def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (mean of the middle two for even lengths)."""
    s = sorted(values)
    if not s:
        raise ValueError("median of nothing")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


# --------------------------------------------------------------------------- bytecode
#: the packages a daemon imports before READY
DAEMON_PACKAGES = ("loader", "aio", "protocol", "cli")


def byte_compile(packages: Sequence[str] = DAEMON_PACKAGES) -> str:
    """Write the bytecode of ``packages``' modules (``__pycache__``) where it is missing
    or stale, as ``pip install`` does for an installed package: a daemon spawned by
    the bench then imports them as an installed one would.  Without it (an editable
    install, with ``PYTHONDONTWRITEBYTECODE`` set) every spawn compiled every module
    again, 0.15-0.2 s of CPU before READY (docs/MEASUREMENTS.md, "READY from
    bytecode").  Returns what was found, for the bench's ``host`` record: ``"compiled"``
    or ``"not all compiled: ..."`` (a directory that cannot be written: the spawns
    then pay the compile, and the record says so)."""
    import compileall
    import importlib
    import io

    failed: list[str] = []
    for name in packages:
        for directory in importlib.import_module(name).__path__:
            with contextlib.redirect_stdout(io.StringIO()):  # (compileall prints what it cannot write)
                if not compileall.compile_dir(directory, quiet=2):
                    failed.append(directory)
    return "compiled" if not failed else "not all compiled: " + ", ".join(failed)


# --------------------------------------------------------------------------- page cache
def drop_caches() -> str | None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``.  Returns None when done, else why
    it cannot be done here (one line)."""
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()}): /proc/sys/vm/drop_caches is root-only"
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"cannot write /proc/sys/vm/drop_caches: {exc.strerror or exc}"
    return None


def warm_cache(path: str) -> None:
    """Read ``path``'s data once so it is in the page cache (1 MiB buffer, reused).

    Only the data: a sparse image's holes are skipped (``SEEK_DATA``/``SEEK_HOLE``;
    the whole file where the file system cannot tell).  Reading a hole puts a page of
    zeros in the page cache: a 16 GiB image with 4 GiB of data would take 16 GiB of
    cache that no restore reads, and the memory file of the run after it would then
    be made by reclaiming that cache (issue 20: the dense fill it was compared with
    ran 2-5x slower for it)."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        at = 0
        while at < size:
            try:
                data = os.lseek(fd, at, os.SEEK_DATA)
                hole = os.lseek(fd, data, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data past here
                    break
                data, hole = at, size  # no hole support: read the rest whole
            while data < hole:
                n = os.preadv(fd, [view[:min(len(buf), hole - data)]], data)
                if n <= 0:
                    break
                data += n
            at = max(hole, at + 1)
    finally:
        os.close(fd)


def evict_cache(path: str) -> None:
    """Ask the kernel to drop ``path``'s pages from the page cache
    (``POSIX_FADV_DONTNEED``; any user, this file only; clean pages only, so it syncs
    the file first).  The scale section evicts the images a run does not read, so that
    its memory file never has to be made by reclaiming their cache."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # a hint
    finally:
        os.close(fd)


def cp_mb_s(src: str, shm_dir: str = "/dev/shm") -> tuple[float, float]:
    """Time ``cp SRC /dev/shm/<tmp>`` (the copy is removed after).  Returns
    ``(seconds, MB/s)`` with MB = 10**6 bytes."""
    dst = os.path.join(shm_dir, f"pageload-bench-cp-{os.getpid()}")
    size = os.stat(src).st_size
    free = shutil.disk_usage(shm_dir).free
    if free < size * 1.1:
        raise BenchError(f"{shm_dir} has {free} bytes free, not enough to copy {src} ({size} bytes); cp not timed")
    try:
        t0 = time.perf_counter()
        subprocess.run(["cp", src, dst], check=True)
        seconds = time.perf_counter() - t0
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BenchError(f"cp {src} {dst} failed: {exc}") from None
    finally:
        try:
            os.unlink(dst)
        except FileNotFoundError:
            pass
    return seconds, size / seconds / 1e6


@dataclass(frozen=True, slots=True)
class CpLimit:
    """``cp IMAGE /dev/shm``, the limit a fill is read against, as :func:`cp_limit` took it.

    ``warm_*``: after the image was read through once (:func:`warm_cache`) and after one
    first cp (``cold_mb_s``): every ratio to cp uses a warm figure.  ``cold_mb_s`` is
    shown beside it, never used for a ratio."""

    warm_runs_mb_s: list[float]  #: each warm cp, in the order taken
    warm_runs_s: list[float]
    cold_mb_s: float  #: the first cp of the call, before the image was warmed
    cold_how: str  #: what "cold" means here (after drop_caches, or the page cache as found)

    @property
    def warm_mb_s(self) -> float:
        """The median warm cp."""
        return median(self.warm_runs_mb_s)

    @property
    def warm_best_mb_s(self) -> float:
        return max(self.warm_runs_mb_s)

    @property
    def warm_best_s(self) -> float:
        return min(self.warm_runs_s)

    def as_dict(self) -> dict[str, Any]:
        return {"mb_s": self.warm_mb_s, "warm_mb_s": self.warm_mb_s, "warm_best_mb_s": self.warm_best_mb_s,
                "warm_runs_mb_s": list(self.warm_runs_mb_s), "cold_mb_s": self.cold_mb_s, "cold_how": self.cold_how}

    def line(self) -> str:
        return cp_text(self.as_dict())


def cp_text(cp: dict[str, Any]) -> str:
    """:meth:`CpLimit.as_dict` in words: the warm figure that ratios use, the cold one apart."""
    return (f"cp to /dev/shm: warm {cp['warm_mb_s']:.0f} MB/s (median of "
            + ", ".join(f"{r:.0f}" for r in cp["warm_runs_mb_s"])
            + f"; ratios use it), cold {cp['cold_mb_s']:.0f} MB/s ({cp['cold_how']})")


COLD_HOW = "the first cp, before the image was read through: the page cache as found"


def cp_limit(src: str, warm_runs: int = 3) -> CpLimit:
    """Time ``cp SRC /dev/shm`` once "cold", then ``warm_runs`` times warm (at least 1).

    Cold: the first cp, before this call reads the image (the page cache as found: no
    ``drop_caches`` here, which would also empty the cache under whatever else runs on
    the machine; the ``backends`` section has a truly cold cp where it can).  Then the
    image is read through (:func:`warm_cache`) and each warm cp is timed: the first cp
    of a run has been seen far slower than the next ones (one at 617 MB/s made a fill
    read 3.38x cp, issue 20), and a fill from a warm image must be compared with a warm cp."""
    _, cold = cp_mb_s(src)
    warm_cache(src)
    runs = [cp_mb_s(src) for _ in range(max(1, warm_runs))]
    return CpLimit(warm_runs_mb_s=[r for _, r in runs], warm_runs_s=[t for t, _ in runs], cold_mb_s=cold,
                   cold_how=COLD_HOW)


# --------------------------------------------------------------------------- the daemon
# --------------------------------------------------------------------------- the socket's own cost
def _echo_server(path: str, ready: Any) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    ready.set()
    conn, _ = srv.accept()
    with conn, srv:
        while data := conn.recv(1 << 16):
            conn.sendall(data)


@contextlib.contextmanager
def echo_socket(workdir: str) -> Iterator[socket.socket]:
    """A Unix socket connected to an echo server in another process (the limit a
    daemon's round trip is compared with); the server is stopped on exit."""
    path = os.path.join(workdir, f"echo-{os.getpid()}.sock")
    if os.path.exists(path):
        os.unlink(path)
    ctx = multiprocessing.get_context("forkserver")
    ready = ctx.Event()
    proc = ctx.Process(target=_echo_server, args=(path, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(30):
            raise BenchError("the echo server for the socket round trip did not start")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            yield sock
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        proc.close()
        if os.path.exists(path):
            os.unlink(path)


def round_trips(sock: socket.socket, rounds: int, size: int) -> array[int]:
    """Nanoseconds of each of ``rounds`` send-``size``-bytes-and-read-them-back exchanges."""
    msg = b"x" * size
    samples = array("q")
    clock = time.perf_counter_ns
    for _ in range(rounds):
        t0 = clock()
        sock.sendall(msg)
        got = 0
        while got < size:
            got += len(sock.recv(4096))
        samples.append(clock() - t0)
    return samples


# --------------------------------------------------------------------------- waits
class _Mincore:
    """``mincore(2)`` on a read-only shared mapping of the daemon's memory file: is
    a page in the memory file yet?  (A memfd page exists only once written.)"""

    def __init__(self, fd: int, size: int) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        import mmap

        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap of the memory file failed")
        self.libc, self.addr, self.size = libc, addr, size
        self.vec = ctypes.create_string_buffer(1)

    def resident(self, offset: int, page_size: int) -> bool:
        if self.libc.mincore(self.addr + offset, page_size, self.vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return bool(self.vec.raw[0] & 1)

    def close(self) -> None:
        self.libc.munmap(self.addr, self.size)


class WaitProber:
    """A thread with its own blocking :class:`Client` that issues one 4 KiB wait at a
    time, back to back, at random pages the daemon has not loaded yet, and times
    each from just before sending to the reply (``samples_ns``, an ``array('q')``).

    Pages "not loaded yet" are found with ``mincore(2)`` on a mapping of the
    daemon's memory file: a page not in the file has not been written.  A page
    may still get loaded between that check and the wait (the wait is then fast:
    this biases the figures down by at most that race, and the daemon's own
    histogram counts only waits that blocked, as a cross-check).  If ``mincore``
    cannot see the file (``selection`` then says so), pages are drawn at random.
    Meant for dense images (every page is data).  :meth:`stop` ends it after its
    current wait; errors end it and are kept in ``error``.
    """

    def __init__(self, socket_path: str, *, seed: int = 0, length: int = 4096, stride: int = 1) -> None:
        self.socket_path = socket_path
        self.length = length
        self.stride = stride  #: pages asked for are multiples of this (a scattered image's data pages)
        self.rng = random.Random(seed)
        self.samples_ns = array("q")
        self.skipped_resident = 0
        self.selection = "mincore"
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pageload-bench-prober", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the prober to end by itself (an error); True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            with Client.connect(self.socket_path) as client:
                self._loop(client)
        except (OSError, ClientError) as exc:
            if not self._stop.is_set():
                self.error = str(exc)

    def _loop(self, client: Client) -> None:
        page, size = client.page_size, client.memory_size
        pages = size // page
        fd = client.memory_fd()
        try:
            mc: _Mincore | None = _Mincore(fd, size)
        except OSError:
            mc, self.selection = None, "random (the memory file could not be mapped)"
        finally:
            os.close(fd)
        if mc is not None and all(
            mc.resident(p * page, page) for p in range(0, pages, max(1, pages // 64))
        ):
            # right after READY most pages cannot be loaded yet: mincore is not seeing the file
            mc.close()
            mc, self.selection = None, "random (mincore reports every page resident)"
        randrange, stop, samples, perf = (
            self.rng.randrange,
            self._stop,
            self.samples_ns,
            time.perf_counter_ns,
        )
        step = self.stride
        slots = max(1, pages // step)
        try:
            while not stop.is_set():
                offset = randrange(slots) * step * page
                if mc is not None:
                    tries = 0
                    while mc.resident(offset, page) and tries < 256:
                        offset = randrange(slots) * step * page
                        tries += 1
                    if tries == 256:
                        self.skipped_resident += 1
                        time.sleep(0.001)
                        continue
                t0 = perf()
                client.wait(offset, self.length)
                samples.append(perf() - t0)
        finally:
            if mc is not None:
                mc.close()


# --------------------------------------------------------------------------- one fill
@dataclass(frozen=True, slots=True)
class FillRun:
    """One daemon run from spawn to ``done`` (figures as the daemon and we saw them)."""

    args: list[str]
    ready_s: float  #: spawn -> READY line
    fill_s: float  #: the daemon's own elapsed_s at done (loader created -> last byte)
    throughput_mb_s: float  #: the daemon's throughput_bps / 1e6 at done
    wall_to_done_s: float  #: spawn -> first stats poll that saw done
    total_bytes: int
    rss_outside_peak_bytes: int  #: max over polls of rssanon + rssfile (the memory file is shmem)
    vmhwm_bytes: int
    heap_peak_bytes: int | None  #: with --tracemalloc
    waits_served: int  #: waits that blocked (daemon's count)
    waits_immediate: int  #: waits answered at once, already loaded (daemon's count)
    #: an upper bound on the p99 from the daemon's histogram: its bucket's bound (a power of
    #: two), or the histogram's max where that is lower; a bound, not a percentile
    daemon_p99_us: float
    #: the daemon's CPU time (user + system, all threads) from its start to done
    cpu_s: float = 0.0
    samples_ns: list[int] = field(
        default_factory=list
    )  #: client-timed 4 KiB waits on unloaded pages
    selection: str = ""
    polls: int = 0

    def as_dict(self, with_samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_samples:
            d.pop("samples_ns")
        return d


def _histogram_p99(hist: dict[str, Any]) -> float:
    """An upper bound on the daemon histogram's p99 (its bucket's bound, never above its max)."""
    return histogram_bound_us(hist, 99)


def fill_run(
    source: str,
    workdir: str,
    extra_args: Sequence[str] = (),
    *,
    probe: bool = False,
    poll_s: float = 0.05,
    seed: int = 0,
    timeout_s: float = 600.0,
    stride: int = 1,
) -> FillRun:
    """Start a daemon on ``source`` with ``extra_args``, poll stats every ``poll_s``
    until ``done`` (and with ``probe`` run a :class:`WaitProber` meanwhile), stop it.
    Raises :class:`BenchError` if it does not start or does not finish in ``timeout_s``."""
    socket_path = os.path.join(workdir, "bench.sock")
    daemon = DaemonProcess(
        source, socket_path, os.path.join(workdir, "daemon.log"), ["--background", "-q", *extra_args]
    )
    t0 = time.perf_counter()
    try:
        daemon.start()
    except DaemonStartError as exc:
        raise BenchError(str(exc)) from None
    with daemon:
        prober = WaitProber(socket_path, seed=seed, stride=stride) if probe else None
        if prober is not None:
            prober.start()
        rss_peak, polls = 0, 0
        try:
            with Client.connect(socket_path) as client:
                deadline = time.monotonic() + timeout_s
                while True:
                    s = client.stats()
                    polls += 1
                    proc = s.get("process", {})
                    rss_peak = max(
                        rss_peak, proc.get("rssanon_bytes", 0) + proc.get("rssfile_bytes", 0)
                    )
                    if s["done"]:
                        wall = time.perf_counter() - t0
                        if prober is not None:  # its last wait must be in the final counts
                            prober.stop()
                            s = {**client.stats(), "process": proc}
                        break
                    if time.monotonic() > deadline:
                        raise BenchError(f"the fill did not finish in {timeout_s:.0f} s")
                    time.sleep(poll_s)
        except (OSError, ClientError) as exc:
            raise BenchError(f"lost the daemon: {exc}; {daemon.stderr_tail()}") from None
        finally:
            if prober is not None:
                prober.stop()
    if prober is not None and prober.error:
        raise BenchError(f"wait prober failed: {prober.error}")
    proc = s.get("process", {})
    return FillRun(
        args=list(extra_args),
        ready_s=daemon.ready_s,
        fill_s=s["elapsed_s"],
        throughput_mb_s=s["throughput_bps"] / 1e6,
        wall_to_done_s=wall,
        total_bytes=s["total_bytes"],
        rss_outside_peak_bytes=rss_peak,
        vmhwm_bytes=proc.get("vmhwm_bytes", 0),
        heap_peak_bytes=proc.get("heap_peak_bytes"),
        waits_served=s["waits_served"],
        waits_immediate=s["waits_immediate"],
        daemon_p99_us=_histogram_p99(s.get("latency_us", {})),
        cpu_s=(proc.get("cpu_user_ms", 0) + proc.get("cpu_system_ms", 0)) / 1000,
        samples_ns=list(prober.samples_ns) if prober else [],
        selection=prober.selection if prober else "",
        polls=polls,
    )
