"""The restore daemon: checkpoint + memory file + AIO queue + loader + server.

``run_daemon`` is what ``pageload restore`` runs.  With ``background=True`` it
serves at once and loads behind; otherwise it loads everything first, then serves.
The socket accepts connections only once the daemon can answer them; readiness is
reported to ``task_status`` (for tests and supervisors in-process), on ``ready_fd``
and as a ``READY`` line on stdout.  SIGTERM or SIGINT: reads in flight finish,
waiting clients get a ``shutting-down`` error, the socket file is removed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

import aio

from ._loader import Loader, LoaderConfig
from ._memfile import MemoryFile
from ._server import Server
from ._sweep import SweepOrder
from ._units import human
from .checkpoint import Checkpoint, CheckpointError, open_checkpoint

log = logging.getLogger("pageload")


@dataclass
class DaemonOptions:
    source: str
    socket_path: str
    background: bool = True
    memory_file: str | None = None
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
    max_pending_waits: int = 4096  #: per connection; more are refused with too-many-requests
    allow_writable_memory_fd: bool = False  #: hand out a read-write memory fd to clients that ask


@dataclass
class DaemonState:
    """What a running daemon exposes to an in-process caller (tests, bench)."""

    checkpoint: Checkpoint
    memory: MemoryFile
    loader: Loader
    server: Server
    backend: str
    started: float
    ready_s: float = 0.0
    stop: Callable[[], None] = lambda: None


def process_stats() -> dict[str, int]:
    """The daemon's own memory: RSS split as the kernel reports it (the memory file's
    pages show up as shmem), and the Python heap when tracemalloc is on."""
    out: dict[str, int] = {}
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


def _open_queue(opts: DaemonOptions) -> tuple[aio.Queue, str]:
    name, why = opts.aio_backend, "chosen with --aio"
    if name == "auto":
        name, why = aio.pick_auto()
    kwargs: dict[str, Any] = {}
    if name == "threads" and opts.threads:
        kwargs["threads"] = opts.threads
    queue = aio.open_queue(name, opts.config.queue_depth, **kwargs)
    log.info("aio backend %s (%s)", name, why)
    if opts.wrap_queue is not None:
        queue = opts.wrap_queue(queue)
    return queue, name


def _progress_line(loader: Loader, final: bool = False) -> str:
    s = loader.statistics()
    pct = 100.0 * s.loaded_bytes / s.total_bytes if s.total_bytes else 100.0
    head = "loaded" if final else "progress"
    line = (f"{head} {human(s.loaded_bytes)} / {human(s.total_bytes)} ({pct:.0f}%) in {s.elapsed_s:.2f} s, "
            f"{s.throughput_bps / 1e6:.1f} MB/s; waits {s.waits_total} "
            f"({s.waits_immediate} immediate, {s.waits_served} served, {s.waits_failed} failed), "
            f"time waited {s.total_wait_time_s:.3f} s, blocked {s.blocked_time_s:.3f} s")
    if s.failed_bytes:
        line += f"; FAILED {human(s.failed_bytes)} in {len(s.failed_ranges)} ranges"
    return line


async def _progress(loader: Loader, interval: float) -> None:
    while not loader.done.is_set():
        with trio.move_on_after(interval):
            await loader.done.wait()
        if not loader.done.is_set():
            log.info(_progress_line(loader))
    log.info(_progress_line(loader, final=True))


async def _progress_bar(loader: Loader) -> None:
    width = 40
    while True:
        s = loader.statistics()
        frac = s.loaded_bytes / s.total_bytes if s.total_bytes else 1.0
        bar = "#" * int(frac * width)
        sys.stderr.write(f"\r[{bar:<{width}}] {frac * 100:5.1f}% {s.throughput_bps / 1e6:8.1f} MB/s")
        sys.stderr.flush()
        if loader.done.is_set():
            sys.stderr.write("\n")
            return
        with trio.move_on_after(0.2):
            await loader.done.wait()


def _announce_ready(opts: DaemonOptions) -> None:
    if opts.ready_line:
        print(f"READY socket={opts.socket_path} pid={os.getpid()}", flush=True)
    if opts.ready_fd is not None:
        try:
            os.write(opts.ready_fd, b"READY\n")
        finally:
            os.close(opts.ready_fd)


async def run_daemon(
    opts: DaemonOptions, *, task_status: trio.TaskStatus[DaemonState] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run until SIGTERM/SIGINT (or until the caller cancels, or calls ``state.stop()``)."""
    started = time.perf_counter()
    ckpt = open_checkpoint(opts.source)
    layout = ckpt.layout
    log.info("restoring %s: %s checkpoint, memory %s, data %s in %d ranges",
             opts.source, ckpt.kind, human(layout.memory_size), human(layout.data_bytes), len(layout))
    try:
        pages_fd = ckpt.open_pages(direct=opts.direct)
    except CheckpointError as exc:
        if not opts.direct:
            raise
        log.warning("--direct: %s; falling back to buffered reads", exc)
        pages_fd = ckpt.open_pages(direct=False)
    memory = MemoryFile(layout.memory_size, opts.memory_file)
    try:
        queue, backend = _open_queue(opts)
        loader = Loader(layout, pages_fd, memory, queue, opts.config, opts.order)
        server = Server(loader, opts.socket_path, memory_fd=memory.fd, allow_uids=opts.allow_uids,
                        max_pending_waits=opts.max_pending_waits,
                        allow_writable_memory_fd=opts.allow_writable_memory_fd,
                        extra_stats=lambda: {"backend": backend, "source": os.path.abspath(opts.source),
                                             "process": process_stats()})
        state = DaemonState(ckpt, memory, loader, server, backend, started)
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            state.stop = stop.set
            if opts.handle_signals:
                nursery.start_soon(_signals, stop)
            nursery.start_soon(loader.run)
            if not opts.background:
                if opts.progress_bar:
                    nursery.start_soon(_progress_bar, loader)
                async with trio.open_nursery() as wait_nursery:  # stop also cuts the eager load short
                    wait_nursery.start_soon(_cancel_on, stop, wait_nursery.cancel_scope)
                    await loader.done.wait()
                    wait_nursery.cancel_scope.cancel()
            if not stop.is_set():
                await nursery.start(server.serve)
                state.ready_s = time.perf_counter() - started
                log.info("ready in %.3f s on %s", state.ready_s, opts.socket_path)
                _announce_ready(opts)
                nursery.start_soon(_progress, loader, opts.progress_interval)
                task_status.started(state)
            await stop.wait()
            log.info("shutting down: finishing reads in flight")
            await loader.aclose()
            await server.aclose()
            log.info(_progress_line(loader, final=True))
            nursery.cancel_scope.cancel()
    finally:
        memory.close()
        os.close(pages_fd)


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("got %s", signal.Signals(signum).name)
            stop.set()
            return
