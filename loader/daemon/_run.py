"""The restore daemon: checkpoint + memory file + AIO queue + loader + server.

``run_daemon`` is what ``pageload restore`` runs.  With ``background=True`` it
serves at once and loads behind; otherwise it loads everything first, then serves.
The socket accepts connections only once the daemon can answer them; readiness is
reported to ``task_status`` (for tests and supervisors in-process), on ``ready_fd``
and as a ``READY`` line on stdout, and to systemd (``READY=1``, then ``STATUS=``
progress, ``STOPPING=1``) when ``notifier`` has a ``NOTIFY_SOCKET``.  The socket
is bound at ``socket_path``, or handed over (``listen_socket``, socket activation;
its file is then left to its owner).  With ``metrics``, the statistics are served
in the Prometheus format.  SIGTERM or SIGINT: within one deadline
(``shutdown_timeout``, 2 s), waiting clients get a ``shutting-down`` error and
their replies are flushed, reads not started are dropped, reads running are
waited for, and the socket file is removed; a read still running at the deadline
(a hung disk) is abandoned and the daemon exits anyway.

With a VMM connected (``uffd_socket``), SIGTERM first answers its pending page
faults: those whose reads finish within half the deadline get their data, the
rest are poisoned (SIGBUS in the faulting thread) by the loader's shutdown.

Test hooks: with ``PAGELOAD_TEST_HANG_READS=LO:HI`` in the environment (pages-file
byte offsets), reads touching [LO, HI) never complete
(:class:`aio.testing.HangingQueue`), so tests can drive the read deadline and
the shutdown deadline through a real process; with ``PAGELOAD_TEST_FAIL_READS=LO:HI``
they fail with EIO (:class:`aio.testing.FaultInjectingQueue`).  Nothing reads
them otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import trio

import aio

from .._memfile import MemoryFile
from .._startup import StartupError, describe_os_error
from .._units import human
from ..checkpoint import CheckpointError
from ..core._layout import Layout
from ..core._loader import Loader
from ..core._sweep import WorkingSetOrder
from ..core._workingset import default_working_set_path
from ..socket._server import Server
from ..source import PageSource, is_store_url, open_source
from ..uffd._handler import UffdHandler, serve_uffd
from ._metrics import MetricsServer, make_registry
from ._options import (
    DaemonOptions,
    DaemonState,
    check_options,
    process_stats,
    release_free_heap,
    unmap_large_allocations,
)
from ._sdnotify import Notifier
from ._working_sets import record_window, working_set_line, working_set_setup, working_set_stats

log = logging.getLogger("pageload")

#: the test hook's environment variable (module docstring)
HANG_READS_ENV = "PAGELOAD_TEST_HANG_READS"
FAIL_READS_ENV = "PAGELOAD_TEST_FAIL_READS"


def _reserve_ranges(layout: Layout, reserve: str) -> Iterator[tuple[int, int]]:
    """The memory ranges ``--reserve`` allocates at start, ascending."""
    if reserve == "all":
        yield 0, layout.memory_size
    elif reserve == "data":
        shift = layout.shift
        for lo, n in zip(layout.mem_pages, layout.len_pages):
            yield lo << shift, (lo + n) << shift


def _lone_startup_error(group: BaseExceptionGroup[BaseException]) -> StartupError | None:
    """The StartupError a nursery wrapped, if it is all the group holds."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1 and isinstance(leaves[0], StartupError):
        return leaves[0]
    return None


def _gathers_note() -> str:
    """How a raw image's data islands are read into the mapping (aio._batch)."""
    from aio._batch import BATCH_ENTRIES, unavailable

    why = unavailable()
    if why is None:
        return f"raw gathers: up to {BATCH_ENTRIES} ranges a system call (an io_uring ring a worker)"
    return f"raw gathers: one read a range ({why})"


def _open_queue(opts: DaemonOptions, notes: list[str], calls: bool = False) -> tuple[aio.Queue, str]:
    """The loader's queue; ``calls``: the source's requests are :data:`aio.Op.CALL`
    (a checkpoint in a store), which ``auto`` answers with the threads backend, its
    threads ``--fetch-concurrency`` (GETs wait on the network, not on a CPU)."""
    name, why = opts.aio_backend, "chosen with --aio"
    if name == "auto" and calls:
        name, why = "threads", "the source fetches from a store in its worker threads (Op.CALL)"
    elif name == "auto":
        name, why = aio.pick_auto()
    kwargs: dict[str, Any] = {}
    if name == "threads" and calls:
        kwargs["threads"] = opts.threads or opts.fetch_concurrency
        kwargs["yield_threads"] = kwargs["threads"]  # not held to the CPUs: they wait on the network
    elif name == "threads" and opts.threads:
        kwargs["threads"] = opts.threads
    # room beyond queue_depth for reads that timed out but whose threads are still in them
    try:
        queue = aio.open_queue(name, 2 * opts.config.queue_depth, **kwargs)
    except OSError as exc:
        raise StartupError(f"aio backend {name}: {describe_os_error(exc, None)}") from None
    notes.append(f"aio backend {name} ({why})" + (f", {kwargs['threads']} fetch threads" if calls and
                                                 name == "threads" else ""))
    if opts.wrap_queue is not None:
        queue = opts.wrap_queue(queue)
    fail = os.environ.get(FAIL_READS_ENV)
    hang = os.environ.get(HANG_READS_ENV)
    if fail or hang:  # only for the test hooks: aio.testing is not part of every start-up
        from aio.testing import FaultInjectingQueue, HangingQueue, fail_offsets, hang_offsets
    if fail:  # the test hook (module docstring)
        lo, _, hi = fail.partition(":")
        queue = FaultInjectingQueue(queue, fail_offsets(int(lo, 0), int(hi, 0)))
        log.warning("%s=%s: reads of pages-file bytes [%s, %s) will fail (test hook)", FAIL_READS_ENV, fail, lo, hi)
    if hang:  # the test hook (module docstring)
        lo, _, hi = hang.partition(":")
        queue = HangingQueue(queue, hang_offsets(int(lo, 0), int(hi, 0)))
        log.warning("%s=%s: reads of pages-file bytes [%s, %s) will hang (test hook)", HANG_READS_ENV, hang, lo, hi)
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
    fetching = getattr(loader.source, "progress_note", None)
    if fetching is not None:  # a checkpoint in a store: the fetch rate, the cache's share
        line += f"; {fetching(s.elapsed_s)}"
    return line


def _status_line(loader: Loader) -> str:
    """Short progress for systemd's STATUS= (``systemctl status`` shows it)."""
    s = loader.statistics()
    pct = 100.0 * s.loaded_bytes / s.total_bytes if s.total_bytes else 100.0
    head = "loaded" if s.done else "loading"
    return (f"{head} {human(s.loaded_bytes)} of {human(s.total_bytes)} ({pct:.0f}%), "
            f"{s.throughput_bps / 1e6:.0f} MB/s, {s.waiters_blocked} waits blocked")


async def _progress(loader: Loader, interval: float, notifier: Notifier) -> None:
    while not loader.done.is_set():
        with trio.move_on_after(interval):
            await loader.done.wait()
        if not loader.done.is_set():
            log.info(_progress_line(loader))
            notifier.status(_status_line(loader))
    log.info(_progress_line(loader, final=True))
    notifier.status(_status_line(loader))


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


def _announce_ready(opts: DaemonOptions, loader: Loader) -> None:
    """READY on stdout and on the ready fd.  Nobody listening any more (EPIPE) is
    logged, not fatal: the daemon is serving.  systemd hears READY=1 first."""
    opts.notifier.ready(f"serving on {opts.socket_path}; {_status_line(loader)}")
    if opts.ready_line:
        try:
            print(f"READY socket={opts.socket_path} pid={os.getpid()}", flush=True)
        except OSError as exc:
            log.warning("could not print READY on stdout: %s", exc.strerror or exc)
    if opts.ready_fd is not None:
        try:
            os.write(opts.ready_fd, b"READY\n")
        except OSError as exc:
            log.warning("could not write READY to fd %d: %s", opts.ready_fd, exc.strerror or exc)
        finally:
            try:
                os.close(opts.ready_fd)
            except OSError:
                pass


async def run_daemon(
    opts: DaemonOptions, *, task_status: trio.TaskStatus[DaemonState] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run until SIGTERM/SIGINT (or until the caller cancels, or calls ``state.stop()``).

    Every failure before READY is a :class:`StartupError` (one line; options,
    socket path, memory file, backend) or a :class:`CheckpointError` (the
    checkpoint), raised bare, never inside an exception group.  A memory file
    created by a start that failed is removed again.
    """
    started = time.perf_counter()
    if opts.listen_socket is not None:
        opts.socket_path = _socket_name(opts.listen_socket)
    check_options(opts)
    # large C allocations given back when freed, not kept resident: a store's response
    # bodies; a local restore's big temporaries (a window's batch of a million-range
    # table, 512 KiB arrays) left 4 MiB of freed heap behind a 1M-range fill
    unmap_large_allocations()
    try:
        source = open_source(opts.source, scan=_needs_holes_first(opts), direct=opts.direct, remote=opts.remote)
    except CheckpointError as exc:
        if not opts.direct or is_store_url(opts.source):
            raise
        log.warning("--direct: %s; falling back to buffered reads", exc)
        source = open_source(opts.source, scan=_needs_holes_first(opts))
    layout = source.layout
    # what start-up found is logged once it has succeeded: a failed start says one line
    if source.holes_known:
        notes = [f"restoring {opts.source}: {source.describe()}, memory {human(layout.memory_size)}, "
                 f"data {human(layout.data_bytes)} in {len(layout)} ranges"]
    else:
        notes = [f"restoring {opts.source}: {source.describe()}, memory {human(layout.memory_size)}, "
                 "its holes found while it loads"]
    metrics: MetricsServer | None = None
    try:
        order, recorder, record_path = working_set_setup(opts, source, notes)
        reserve = opts.reserve if opts.reserve != "auto" else "data" if opts.memory_file else "none"
        memory = MemoryFile(layout.memory_size, opts.memory_file, force=opts.force_memory_file,
                            protect=source.files(), data_bytes=source.data_estimate(),
                            reserve=_reserve_ranges(layout, reserve))
        if reserve != "none":
            notes.append(f"memory file: {human(memory.reserved)} reserved ({reserve})" if memory.reserved is not None
                         else "memory file: its file system cannot reserve space (fallocate); not reserved")
    except BaseException:
        source.close()
        raise
    state: DaemonState | None = None
    try:
        queue, backend = _open_queue(opts, notes, calls=_fetches(source))
        if _fetches(source) and not queue.calls:
            await queue.aclose()
            raise StartupError(f"--aio {opts.aio_backend}: a checkpoint in a store is fetched by calls in the "
                               f"backend's worker threads (Op.CALL), which the {backend} backend does not "
                               "take; use --aio threads (or auto)")
        use_checksums = True
        if source.checksums is not None and not _file_ascends(layout):
            # laid out with its working set first (checkpoint create --working-set): a chunk's
            # pages are scattered over memory, which the loader's verification cannot serve
            notes.append("checksums: not verified while loading (pages laid out working set first); "
                         "'pageload checkpoint verify' checks them")
            use_checksums = False
        checksums = source.checksums if use_checksums else None
        loader = Loader(source, memory, queue, opts.config, order, use_checksums=use_checksums)
        loader.recorder = recorder
        release_free_heap()  # what opening the checkpoint and building the tables freed
        if loader.source_verifies:
            notes.append("checksums: each chunk's BLAKE3 checked as it is read, before it is served")
        elif checksums is not None:
            notes.append("checksums: " + ("each chunk verified before it is served" if opts.config.verify
                                          else "not verified (--no-verify)"))
        if layout.identity_mapped and backend in ("threads", "sync") and getattr(source, "gathers_within", False):
            notes.append(_gathers_note())
        holder: list[DaemonState] = []

        def extra_stats() -> dict[str, Any]:
            where = opts.source if is_store_url(opts.source) else os.path.abspath(opts.source)
            extra: dict[str, Any] = {"backend": backend, "source": where, "process": process_stats()}
            remote_stats = getattr(source, "stats", None)
            if callable(remote_stats):  # a checkpoint in a store: the store's, the cache's, the fetching's
                extra["remote"] = remote_stats()
            if holder and holder[0].uffd is not None:
                extra["uffd"] = holder[0].uffd.statistics()
            extra.update(working_set_stats(order, recorder, record_path))
            return extra

        server = Server(loader, opts.socket_path, memory_fd=memory.fd, allow_uids=opts.allow_uids,
                        max_pending_waits=opts.max_pending_waits, listener=opts.listen_socket,
                        busy_poll_us=opts.busy_poll_us,
                        allow_writable_memory_fd=opts.allow_writable_memory_fd,
                        extra_stats=extra_stats)
        state = DaemonState(source, memory, loader, server, backend, started)
        holder.append(state)
        window_done = trio.Event()
        if opts.metrics is not None:  # bound now: a bad address is a start-up failure
            metrics = state.metrics = MetricsServer(opts.metrics, make_registry(server.stats_dict))
            await metrics.bind()
            notes.append(f"metrics on http://{metrics.bound}/metrics")
        async with _open_nursery() as nursery:
            stop = trio.Event()
            state.stop = stop.set
            if opts.handle_signals:
                nursery.start_soon(_signals, stop)
            if state.metrics is not None:
                nursery.start_soon(state.metrics.serve)
            nursery.start_soon(loader.run)
            if not opts.background:
                opts.notifier.status(f"loading before serving: {_status_line(loader)}")
                _log_notes(notes)
                if opts.progress_bar:
                    nursery.start_soon(_progress_bar, loader)
                async with trio.open_nursery() as wait_nursery:  # stop also cuts the eager load short
                    wait_nursery.start_soon(_cancel_on, stop, wait_nursery.cancel_scope)
                    await loader.done.wait()
                    wait_nursery.cancel_scope.cancel()
            if not stop.is_set():
                await _start_server(nursery, server)
                if opts.uffd_socket is not None:
                    await nursery.start(_serve_uffd, opts, state, stop)
                _log_notes(notes)
                state.ready_s = time.perf_counter() - started
                log.info("ready in %.3f s on %s", state.ready_s, opts.socket_path)
                _announce_ready(opts, loader)
                nursery.start_soon(_progress, loader, opts.progress_interval, opts.notifier)
                if recorder is not None and record_path is not None:
                    recorder.start()
                    nursery.start_soon(record_window, recorder, record_path, opts.record_seconds, window_done)
                task_status.started(state)
            await stop.wait()
            opts.notifier.stopping(f"stopping: {_status_line(loader)}")
            timeout = opts.shutdown_timeout
            if state.uffd is not None:  # the VMM's pending faults are answered first (docs/UFFD.md)
                drain_started = trio.current_time()
                await state.uffd.drain(0.5 * timeout)
                timeout = max(0.1, timeout - (trio.current_time() - drain_started))
            await _shutdown(loader, server, timeout)
            if recorder is not None and recorder.active:
                recorder.stop()  # the window task writes the file
                with trio.CancelScope(shield=True):
                    await window_done.wait()
            log.info(_progress_line(loader, final=True))
            if isinstance(order, WorkingSetOrder):
                log.info(working_set_line(order))
            nursery.cancel_scope.cancel()
    except BaseException:
        if state is None or not state.ready_s:
            memory.discard()  # never announced: a memory file this start created goes again
        raise
    finally:
        if metrics is not None:
            metrics.close()
        memory.close()
        source.close()


def _fetches(source: PageSource) -> bool:
    """Whether ``source``'s requests are :data:`aio.Op.CALL` (a checkpoint in a store)."""
    return bool(getattr(source, "needs_calls", False))


def _socket_name(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, bytes):  # abstract namespace
        return "@" + name[1:].decode(errors="replace")
    return str(name)


async def _serve_uffd(opts: DaemonOptions, state: DaemonState, stop: trio.Event,
                      *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    assert opts.uffd_socket is not None

    def attach(handler: UffdHandler) -> None:
        state.uffd = handler
        if not paused:
            paused.append(True)
            state.server.busy_poll_paused += 1  # its fault thread must get the GIL at once

    paused: list[bool] = []
    try:
        await serve_uffd(opts.uffd_socket, state.loader, state.memory, opts.uffd_config,
                         on_handler=attach, task_status=task_status)
    finally:
        if paused:
            state.server.busy_poll_paused -= 1
    stop.set()  # the VMM has gone: finish
async def _shutdown(loader: Loader, server: Server, timeout: float) -> None:
    """Everything after SIGTERM, within ``timeout`` seconds overall: waiters are
    answered ``shutting-down`` at once, then the server flushes its replies while
    the loader drops queued reads and waits for running ones."""
    deadline = trio.current_time() + timeout
    log.info("shutting down (at most %g s)", timeout)
    loader.shutdown()
    with trio.move_on_at(deadline) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loader.aclose, 0.9 * timeout)  # its own verdict before the deadline
            nursery.start_soon(server.aclose, deadline)  # all clients flushed at once, until then
    if scope.cancelled_caught:
        log.warning("shutdown took longer than %g s; exiting anyway", timeout)
    if loader.abandoned_reads:
        log.warning("exiting with %d read(s) hung in the backend", loader.abandoned_reads)


def _log_notes(notes: list[str]) -> None:
    for note in notes:
        log.info(note)
    notes.clear()


@contextlib.asynccontextmanager
async def _open_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery that lets a lone StartupError out bare, not in an exception group."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        lone = _lone_startup_error(group)
        if lone is None:
            raise
        raise lone from None


async def _start_server(nursery: trio.Nursery, server: Server) -> None:
    """Bind and listen; a socket that cannot be served on is a StartupError."""
    try:
        await nursery.start(server.serve)
    except OSError as exc:
        line = describe_os_error(exc, None)
        if server.path not in line:
            line = f"{server.path}: {line}"
        raise StartupError(line) from None


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("got %s", signal.Signals(signum).name)
            stop.set()
            return


# -- working sets ---------------------------------------------------------------------------


def _file_ascends(layout: Layout) -> bool:
    """Whether pages-file offsets ascend with memory (not so when laid out working set first)."""
    return layout.file_ascends()


def _needs_holes_first(opts: DaemonOptions) -> bool:
    """Whether a raw image's holes must be found before READY: the page-fault handler
    and the zero-copy mode place holes themselves, a working set is matched to the
    image by its extents (its identity), and ``--reserve data`` (the default for a
    ``--memory-file``) reserves exactly the data.  Otherwise they are found while it loads."""
    if opts.uffd_socket is not None or opts.allow_writable_memory_fd or opts.record_working_set is not None:
        return True
    if opts.memory_file is not None and opts.reserve in ("auto", "data"):
        return True  # the data's space is reserved before READY: where the data is must be known
    if opts.order is not None or not opts.use_working_set:
        return False
    return opts.working_set is not None or os.path.exists(default_working_set_path(opts.source))
