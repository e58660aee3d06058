"""The daemon's options (:class:`DaemonOptions`, what ``pageload restore`` parses into),
the checks run on them before anything is opened, and what a running daemon exposes
(:class:`DaemonState`); the process's own memory figures."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import socket
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import aio

from .._memfile import MemoryFile
from .._startup import StartupError, check_ready_fd, check_socket_path, check_uid
from ..core._config import LoaderConfig
from ..core._loader import Loader
from ..core._sweep import SweepOrder
from ..socket._server import Server
from ..socket._session import BUSY_POLL_US, MAX_BUSY_POLL_US
from ..source import PageSource, RemoteConfig, StoreSource, is_store_url
from ..uffd._config import MAX_UFFD_SPIN_US, UffdConfig
from ..uffd._handler import UffdHandler
from ._metrics import MetricsAddress, MetricsServer
from ._sdnotify import Notifier

log = logging.getLogger("pageload")



@dataclass
class DaemonOptions:
    source: str
    socket_path: str
    background: bool = True
    memory_file: str | None = None
    #: reuse an existing ``memory_file`` (locked first, then emptied); never a
    #: symbolic link, a non-regular file or one of the checkpoint's own files
    force_memory_file: bool = False
    #: ``--force`` too: an existing ``record_working_set`` file may be replaced (never a
    #: symbolic link, a non-regular file or the checkpoint's own)
    force_working_set: bool = False
    #: what of the memory file to allocate at start (``fallocate``): ``data`` (the
    #: image's data ranges), ``all`` (the whole memory size, holes included),
    #: ``none``; ``auto``: ``data`` for a ``memory_file``, ``none`` for a memfd
    #: (docs/OPERATIONS.md, "The memory file's space")
    reserve: str = "auto"
    aio_backend: str = "auto"
    threads: int | None = None
    direct: bool = False
    config: LoaderConfig = field(default_factory=LoaderConfig)
    allow_uids: tuple[int, ...] = ()
    ready_fd: int | None = None
    ready_line: bool = True
    progress_interval: float = 5.0
    progress_bar: bool = False  #: draw a bar on stderr while loading in the foreground
    handle_signals: bool = True
    #: wraps the queue (tests slow it down or inject faults)
    wrap_queue: Callable[[aio.Queue], aio.Queue] | None = None
    order: SweepOrder | None = None
    #: replay this working set (``None``: the checkpoint's default file, if present)
    working_set: str | None = None
    use_working_set: bool = True  #: False: ignore any working set (``--no-working-set``)
    #: record a working set into this file (``""``: the checkpoint's default file)
    record_working_set: str | None = None
    record_seconds: float | None = 10.0  #: the window after READY; None: until ``mark`` or shutdown
    max_pending_waits: int = 4096  #: per connection; more are refused with too-many-requests
    #: after its replies, poll the one asking connection this long before sleeping in
    #: epoll (0: never; docs/DESIGN.md "Busy polling")
    busy_poll_us: int = BUSY_POLL_US
    #: a listening Unix socket to serve on instead of binding ``socket_path`` (socket activation)
    listen_socket: socket.socket | None = None
    metrics: MetricsAddress | None = None  #: serve the Prometheus text format there
    notifier: Notifier = field(default_factory=lambda: Notifier(None))  #: sd_notify; no-op by default
    #: also act as Firecracker's page-fault handler on this socket (docs/UFFD.md); the
    #: daemon exits once that VMM has gone
    uffd_socket: str | None = None
    uffd_config: UffdConfig | None = None
    allow_writable_memory_fd: bool = False  #: hand out a read-write memory fd to clients that ask
    shutdown_timeout: float = 2.0  #: SIGTERM to exit, at most (a hung read is abandoned)
    #: a checkpoint in a store (``s3://``, ``file://``): its endpoint and the chunk cache
    #: (None: the environment's and the defaults; docs/REMOTE.md)
    remote: RemoteConfig | None = None
    #: a checkpoint in a store: GETs at once at most, the threads backend's threads
    #: (``--threads`` overrides it)
    fetch_concurrency: int = 16


@dataclass
class DaemonState:
    """What a running daemon exposes to an in-process caller (tests, bench)."""

    source: PageSource
    memory: MemoryFile
    loader: Loader
    server: Server
    backend: str
    started: float
    ready_s: float = 0.0
    stop: Callable[[], None] = lambda: None
    metrics: MetricsServer | None = None
    uffd: UffdHandler | None = None  #: the VMM's handler, once one connected


def process_stats() -> dict[str, int]:
    """The daemon's own memory: RSS split as the kernel reports it (the memory file's
    pages show up as shmem), and the Python heap when tracemalloc is on; and the CPU
    time it has used, all its threads (``cpu_user_ms``, ``cpu_system_ms``)."""
    times = os.times()
    out: dict[str, int] = {"cpu_user_ms": int(times.user * 1000), "cpu_system_ms": int(times.system * 1000)}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key.lower() + "_bytes"] = int(value.split()[0]) * 1024
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        out["heap_bytes"] = current
        out["heap_peak_bytes"] = peak
    return out


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast("Callable[[int], int]", trim)


_MALLOC_TRIM = _malloc_trim()


def _mallopt() -> Callable[[int, int], int] | None:
    try:
        fn = ctypes.CDLL(None).mallopt  # glibc (and musl, where it does nothing)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int], int]", fn)


_MALLOPT = _mallopt()
_M_MMAP_THRESHOLD = -3
#: the C heap's allocations from this size on are mappings of their own, unmapped when freed
FETCH_MMAP_THRESHOLD = 128 << 10


def unmap_large_allocations(threshold: int = FETCH_MMAP_THRESHOLD) -> bool:
    """Keep glibc's mmap threshold at ``threshold`` for good (``mallopt``): a C
    allocation of that size or more is a mapping of its own, given back when it is
    freed.  By default glibc raises the threshold to the size of the first such block
    freed, and from then on keeps freed blocks for reuse: the store client's response
    bodies (1 MiB for the sweep, a dozen in flight, in the store client's threads'
    arenas) left 18 MiB of freed heap resident in a restore from a store (docs/REMOTE.md,
    "Measured"), and a 1M-range local fill's big temporaries 4 MiB.  Every daemon sets
    it.  True where it was set (glibc)."""
    return _MALLOPT is not None and _MALLOPT(_M_MMAP_THRESHOLD, threshold) == 1


def release_free_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's ``malloc_trim``; a
    no-op elsewhere).  Start-up's big temporaries (a million-range index decoded:
    about 48 MiB) are freed but kept by glibc for reuse, which is never coming: the
    daemon's RSS stayed 22 MiB higher for its whole life (issue 20)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def check_options(opts: DaemonOptions) -> None:
    """Refuse options that cannot work, before anything is opened (:class:`StartupError`)."""
    for uid in opts.allow_uids:
        check_uid(uid, "allowed uid")
    if opts.reserve not in RESERVE_CHOICES:
        raise StartupError(f"reserve must be one of {', '.join(RESERVE_CHOICES)}, not {opts.reserve!r}")
    if opts.threads is not None and opts.threads < 1:
        raise StartupError(f"threads must be at least 1, not {opts.threads}")
    if opts.fetch_concurrency < 1:
        raise StartupError(f"fetch concurrency must be at least 1, not {opts.fetch_concurrency}")
    if opts.record_working_set == "" and is_store_url(opts.source):
        raise StartupError(f"--record-working-set needs a FILE for a checkpoint in a store ({opts.source})")
    if opts.record_working_set == "" and StoreSource.claims(opts.source):
        # (beside it would be STORE/snapshots/NAME.working-set.msgpack: a file among the manifests)
        raise StartupError(f"--record-working-set needs a FILE for a snapshot in a chunk store ({opts.source})")
    if opts.config.queue_depth < 1:
        raise StartupError(f"queue depth must be at least 1, not {opts.config.queue_depth}")
    if opts.max_pending_waits < 1:
        raise StartupError(f"max pending waits must be at least 1, not {opts.max_pending_waits}")
    if not 0 <= opts.busy_poll_us <= MAX_BUSY_POLL_US:
        raise StartupError(f"busy poll time must be 0 to {MAX_BUSY_POLL_US} us, not {opts.busy_poll_us}")
    if opts.uffd_config is not None and not 0 <= opts.uffd_config.spin_s * 1e6 <= MAX_UFFD_SPIN_US:
        raise StartupError(f"uffd spin time must be 0 to {MAX_UFFD_SPIN_US} us, "
                           f"not {round(opts.uffd_config.spin_s * 1e6)}")
    if not (math.isfinite(opts.progress_interval) and opts.progress_interval > 0):
        raise StartupError(f"progress interval must be a positive number of seconds, not {opts.progress_interval}")
    if opts.record_seconds is not None and not (math.isfinite(opts.record_seconds) and opts.record_seconds > 0):
        raise StartupError(f"record seconds must be a positive number of seconds, not {opts.record_seconds}")
    if opts.working_set is not None and not opts.use_working_set:
        raise StartupError("--working-set and --no-working-set contradict each other")
    if opts.listen_socket is None:  # a handed-over socket is its owner's business
        check_socket_path(opts.socket_path)
    if opts.uffd_socket is not None:
        check_socket_path(opts.uffd_socket)
        if _same_path(opts.uffd_socket, opts.socket_path):
            raise StartupError(f"--uffd-socket {opts.uffd_socket} is also the wait socket's path (--socket): "
                               "give each its own")
    if opts.metrics is not None and opts.metrics.path is not None:
        for what, other in (("the wait socket's path (--socket)", opts.socket_path),
                            ("--uffd-socket", opts.uffd_socket)):
            if other is not None and _same_path(opts.metrics.path, other):
                raise StartupError(f"--metrics {opts.metrics.path} is also {what}: give each its own")
    if opts.ready_fd is not None:
        check_ready_fd(opts.ready_fd)


def _same_path(a: str, b: str) -> bool:
    """Whether two socket paths name one file (an abstract name, '@...', is no file)."""
    if not a or not b or a.startswith("@") or b.startswith("@"):
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


RESERVE_CHOICES = ("auto", "data", "all", "none")


