"""``pageload restore``: run the restore daemon."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tracemalloc

import trio

import aio
from aio import BackendUnavailable
from loader import (
    BUSY_POLL_US,
    MAX_BUSY_POLL_US,
    MAX_UFFD_SPIN_US,
    UFFD_MODES,
    DaemonOptions,
    LoaderConfig,
    Notifier,
    StartupError,
    UffdConfig,
    activated_socket,
    listen_fds,
    parse_metrics_address,
    run_daemon,
)
from loader.checkpoint import CheckpointError
from loader.daemon._options import RESERVE_CHOICES
from loader.source import RemoteConfig, is_store_url

from ._args import add_s3_endpoint, add_size, positive_float, positive_int, uid_arg

_DEFAULTS = LoaderConfig()


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "restore",
        help="serve a checkpoint's memory to faulting clients, loading it behind them",
        description="Restore SOURCE (a raw memory image, a pageload checkpoint directory, or a pages "
        "checkpoint in object storage: s3://BUCKET/PREFIX or file:///DIR, as 'checkpoint push' put it) into a "
        "memory file and serve waits on a Unix socket.  With --background the socket is ready at "
        "once and pages load behind the running application; waited-for pages jump ahead.  "
        "Without it, everything loads first (a progress bar on a terminal), then the socket opens.  "
        "Prints 'READY socket=PATH pid=N' on stdout once clients can connect.  SIGTERM/SIGINT: "
        "waiting clients get an error at once, reads not started are dropped, the socket is removed, "
        "exit 0 within --shutdown-timeout (even with a hung read).  "
        "Under systemd: with $NOTIFY_SOCKET set it sends READY=1, STATUS= progress and STOPPING=1 "
        "(Type=notify); with socket activation ($LISTEN_PID/$LISTEN_FDS, one listening Unix stream "
        "socket as fd 3) it serves on that socket instead of --socket.  "
        "Any start-up failure is one line on stderr and exit 2.",
    )
    p.add_argument("source", metavar="SOURCE",
                   help="raw memory image, checkpoint directory/index, or s3://BUCKET/PREFIX or file:///DIR")
    p.add_argument("--socket", metavar="PATH",
                   help="Unix socket to serve on (mode 0600); required unless socket-activated or "
                   "--uffd-socket is given (then it defaults to that path + '.pageload')")
    p.add_argument("--uffd-socket", metavar="PATH",
                   help="also be Firecracker's page-fault handler: listen on PATH for the VMM's regions "
                   "and userfaultfd, answer its faults and fill guest memory in the background; exit 0 "
                   "once the VMM has gone (docs/UFFD.md)")
    p.add_argument("--uffd-mode", choices=UFFD_MODES, default="fill",
                   help="with --uffd-socket: 'fill' (default) answers faults first and copies all memory "
                   "into the guest behind them (straight from the source when it has no checksums to "
                   "verify, else once loaded); 'eager' copies all memory before answering any fault and "
                   "'lazy' copies only faulting pages (no sweep): Firecracker's 'fault_all' and 'valid' "
                   "example handlers, for comparison (pageload bench --sections uffd)")
    p.add_argument("--uffd-spin-us", type=int, metavar="US",
                   help="with --uffd-socket: after a fault, keep reading the userfaultfd without sleeping for "
                   "this long, so the next fault of a burst is answered without a wake-up (it takes a CPU "
                   f"meanwhile); 0: never (0 to {MAX_UFFD_SPIN_US}; default "
                   f"{round(UffdConfig.for_mode('fill').spin_s * 1e6)} in 'fill' mode, 0 in the others)")
    p.add_argument("--background", action="store_true", help="serve at once and load behind (the point)")
    p.add_argument("--memory-file", metavar="PATH",
                   help="write into this new file (e.g. on /dev/shm or hugetlbfs) instead of a memfd; "
                   "created with O_EXCL, never through a symbolic link, locked while the daemon runs")
    p.add_argument("--force", action="store_true",
                   help="reuse an existing --memory-file: lock it first, then empty it; and let "
                   "--record-working-set replace an existing file (a file locked by another daemon, a "
                   "symbolic link, a non-regular file or the checkpoint's own files are still refused)")
    p.add_argument("--reserve", choices=RESERVE_CHOICES, default="auto",
                   help="allocate the memory file's space at start (fallocate), so that a file system filled "
                   "by others later fails nothing: 'data' (the image's data), 'all' (the whole memory size, "
                   "holes too: no client mapping the file can get SIGBUS reading a hole), 'none'; 'auto' "
                   "(default): 'data' for --memory-file, 'none' for a memfd (docs/OPERATIONS.md)")
    p.add_argument("--aio", default="auto", metavar="NAME",
                   help=f"I/O backend: auto (default) or one of {', '.join(aio.backends())}")
    p.add_argument("--threads", type=positive_int, metavar="N", help="threads for the threads backend")
    p.add_argument("--direct", action="store_true", help="read the pages file with O_DIRECT")
    p.add_argument("--no-kernel-copy", action="store_true",
                   help="read background reads into the memory file's mapping too (by default those of "
                   "ranges of 64 KiB or more on average, and a pages checkpoint's smaller ones while clients "
                   "fault, are copied file to file in the kernel with splice where the backend and memory "
                   "file allow: no page fault per page)")
    add_size(p, "--read-size", default=_DEFAULTS.read_size,
             help="largest read for a waiter, so a large wait takes turns with others")
    add_size(p, "--sweep-read-size", default=_DEFAULTS.sweep_read_size, help="largest background read")
    p.add_argument("--queue-depth", type=positive_int, default=_DEFAULTS.queue_depth, metavar="N",
                   help="reads in flight at most (default %(default)s)")
    p.add_argument("--background-reads", type=positive_int, default=None, metavar="N",
                   help="of those, at most N for the background sweep; the rest are kept for waiters "
                   f"(default {_DEFAULTS.background_reads}; from a store, three quarters of --fetch-concurrency)")
    p.add_argument("--busy-background-reads", type=positive_int, metavar="N",
                   help="while clients are faulting, at most N background reads (default: CPUs - 1; from a "
                   "store, half of --background-reads and at most CPUs - 1)")
    p.add_argument("--no-sweep", action="store_true",
                   help="lazy only: load nothing that is not waited for or prefetched")
    p.add_argument("--no-priority", action="store_true",
                   help="waits do not jump ahead of the sweep (first come, first served; for comparison)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not check the pages against the checkpoint's checksums (by default each chunk "
                   "is verified before its pages are served; a mismatch fails them with 'corrupt')")
    p.add_argument("--read-timeout", type=float, default=_DEFAULTS.read_timeout, metavar="SECONDS",
                   help="a read not done after this long fails with 'timeout' and frees its slot "
                   "(default %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=2.0, metavar="SECONDS",
                   help="SIGTERM/SIGINT to exit, at most; reads still running then are abandoned "
                   "(default %(default)s)")
    st = p.add_argument_group("a checkpoint in object storage (s3://, file://; docs/REMOTE.md)")
    add_s3_endpoint(st)
    st.add_argument("--fetch-concurrency", type=positive_int, default=16, metavar="N",
                    help="GETs at once at most: the threads backend's worker threads (--threads overrides it); "
                    "waiters' GETs go first (default %(default)s)")
    st.add_argument("--cache-dir", metavar="DIR",
                    help="the host chunk cache, shared by this user's daemons (default: $CACHE_DIRECTORY, "
                    "/var/cache/pageload for root, $XDG_CACHE_HOME/pageload or ~/.cache/pageload)")
    add_size(st, "--cache-size", default=None,
             help="keep the chunk cache under this many bytes, least recently used out first (default 16G)")
    st.add_argument("--no-cache", action="store_true", help="fetch every chunk from the store; cache nothing")
    ws = p.add_argument_group("working set (docs/FORMAT.md): what the guest touches first, loaded first")
    ws.add_argument("--working-set", metavar="FILE",
                    help="replay this working set before the sweep (default: working-set.msgpack in the "
                    "checkpoint directory (PREFIX/working-set.msgpack in a store), or IMAGE.working-set.msgpack "
                    "beside a raw image, when present; "
                    "a default file that does not fit is ignored with a warning, an explicit one is an error)")
    ws.add_argument("--no-working-set", action="store_true", help="ignore any working set")
    ws.add_argument("--record-working-set", nargs="?", const="", metavar="FILE",
                    help="record the ranges waited on after READY, in first-touch order, and write them "
                    "atomically at the end of the window or at shutdown (default FILE: the default "
                    "working-set path above); checked writable at start; a new file unless --force, never "
                    "through a symbolic link, never in place of a non-regular file or the checkpoint's own")
    ws.add_argument("--record-seconds", type=float, default=10.0, metavar="SECONDS",
                    help="the recording window after READY; a 'mark' request ends it early; 0: until a mark "
                    "or shutdown (default %(default)s)")
    p.add_argument("--allow-uid", type=uid_arg, action="append", default=[], metavar="UID",
                   help="also accept clients running as UID (default: the daemon's uid and root); the socket "
                   "gets a POSIX ACL granting these uids (mode 0666 where the file system has no ACLs), "
                   "and each peer's uid is checked with SO_PEERCRED")
    p.add_argument("--allow-writable-memory-fd", action="store_true",
                   help="hand a read-write memory fd to clients that ask for one, and serve the page faults of "
                   "VMMs that map it (uffd-register, zero-copy mode) (default: read-only fds only; "
                   "both requests are refused with 'forbidden')")
    p.add_argument("--busy-poll-us", type=int, default=BUSY_POLL_US, metavar="US",
                   help="after its replies, poll the one client asking for this long before sleeping: a client "
                   "waiting one page at a time gets its next answer without a wake-up; only while no other "
                   "connection asks and no VMM's page faults are served; 0: never (0 to "
                   f"{MAX_BUSY_POLL_US}, default %(default)s)")
    p.add_argument("--metrics", metavar="ADDR",
                   help="serve Prometheus metrics over HTTP at ADDR: HOST:PORT (e.g. 127.0.0.1:9464) "
                   "or a Unix socket path (containing a '/', mode 0600); GET /metrics")
    p.add_argument("--ready-fd", type=int, metavar="N", help="write 'READY\\n' to fd N, then close it")
    p.add_argument("--progress-interval", type=positive_float, default=5.0, metavar="SECONDS",
                   help="log progress this often (default %(default)s)")
    p.add_argument("--tracemalloc", action="store_true",
                   help="trace Python heap allocations (stats then report the heap and its peak)")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    p.set_defaults(func=run)


def daemon_options(args: argparse.Namespace) -> DaemonOptions:
    """What ``pageload restore``'s command line asks the daemon for.  Raises
    ``ValueError`` or a ``StartupError`` (``MetricsError``, ``ActivationError``) for options that cannot
    go together (:func:`run` prints it as one line and exits 2).  Reads (and unsets)
    the socket activation and ``$NOTIFY_SOCKET`` variables."""
    if not args.shutdown_timeout > 0:
        raise ValueError("--shutdown-timeout must be positive")
    remote = is_store_url(args.source)
    background = args.background_reads
    busy = args.busy_background_reads
    if remote:  # GETs wait on the network, not on a CPU: the sweep keeps most of the fetch threads
        fetchers = args.threads or args.fetch_concurrency
        if background is None:
            background = max(1, min(args.queue_depth - 1, fetchers * 3 // 4))
        if busy is None:  # half of it, and one less than the CPUs (the sweep's GETs cost CPU here too:
            # on loopback the store shares them; docs/REMOTE.md, "Measured")
            busy = max(1, min(background // 2, (os.cpu_count() or 2) - 1))
    elif args.s3_endpoint or args.cache_dir or args.cache_size is not None or args.no_cache:
        raise ValueError("--s3-endpoint, --cache-dir, --cache-size and --no-cache are for a checkpoint in a "
                         "store (s3://, file://)")
    if background is None:
        background = _DEFAULTS.background_reads
    if args.cache_size is not None and args.cache_size < 1:
        raise ValueError("--cache-size must be at least 1 byte")
    if args.no_cache and (args.cache_dir or args.cache_size is not None):
        raise ValueError("--no-cache and --cache-dir/--cache-size contradict each other")
    config = LoaderConfig(read_size=args.read_size, sweep_read_size=args.sweep_read_size,
                          queue_depth=args.queue_depth,
                          background_reads=background,
                          busy_background_reads=busy,
                          sweep=not args.no_sweep and args.uffd_mode != "lazy",
                          priority=not args.no_priority, read_timeout=args.read_timeout,
                          verify=not args.no_verify, kernel_copy=not args.no_kernel_copy)
    metrics = parse_metrics_address(args.metrics) if args.metrics is not None else None
    fds = listen_fds()
    listen_socket = activated_socket(fds) if fds else None
    if listen_socket is not None and args.socket is not None:
        raise ValueError(f"--socket {args.socket} and socket activation (LISTEN_FDS) both given: choose one")
    if listen_socket is None and args.socket is None and args.uffd_socket is None:
        raise ValueError("restore needs --socket PATH, --uffd-socket PATH or socket activation "
                         "(LISTEN_PID/LISTEN_FDS)")
    socket_path = args.socket or ("" if listen_socket is not None else args.uffd_socket + ".pageload")
    uffd_config = UffdConfig.for_mode(args.uffd_mode)
    if args.uffd_spin_us is not None:
        uffd_config = dataclasses.replace(uffd_config, spin_s=args.uffd_spin_us / 1e6)
    return DaemonOptions(
        source=args.source, socket_path=socket_path, listen_socket=listen_socket, metrics=metrics,
        notifier=Notifier.from_environment(), uffd_socket=args.uffd_socket,
        uffd_config=uffd_config, background=args.background,
        memory_file=args.memory_file, force_memory_file=args.force, force_working_set=args.force, reserve=args.reserve,
        aio_backend=args.aio, threads=args.threads, direct=args.direct,
        config=config, allow_uids=tuple(args.allow_uid), ready_fd=args.ready_fd,
        allow_writable_memory_fd=args.allow_writable_memory_fd, busy_poll_us=args.busy_poll_us,
        progress_interval=args.progress_interval, shutdown_timeout=args.shutdown_timeout,
        progress_bar=not args.background and sys.stderr.isatty(),
        working_set=args.working_set, use_working_set=not args.no_working_set,
        record_working_set=args.record_working_set,
        record_seconds=None if args.record_seconds == 0 else args.record_seconds,
        remote=RemoteConfig(endpoint=args.s3_endpoint, cache=not args.no_cache, cache_dir=args.cache_dir,
                            cache_size=args.cache_size,
                            working_set=args.working_set is None and not args.no_working_set) if remote else None,
        fetch_concurrency=args.fetch_concurrency,
    )


def os_error_line(exc: OSError) -> str:
    """``FILE: what happened`` (or only what happened) for an ``OSError``."""
    return f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}"


def quiet_blas() -> None:
    """Keep NumPy's BLAS to the calling thread.  The daemon uses NumPy for whole-column
    checks of its tables and never for linear algebra, but OpenBLAS starts a thread per
    CPU when NumPy is imported (before READY) and lets them spin on a CPU each for
    about a tenth of a second: 0.07-0.1 s of CPU a start on two CPUs, more on bigger
    hosts (docs/OPERATIONS.md).  A value the operator set is kept."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def run(args: argparse.Namespace) -> int:
    quiet_blas()  # before anything imports NumPy
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="pageload: %(message)s", stream=sys.stderr)
    try:
        opts = daemon_options(args)
    except (ValueError, StartupError) as exc:  # MetricsError and ActivationError are StartupErrors
        print(f"pageload: {exc}", file=sys.stderr)
        return 2
    if args.tracemalloc:
        tracemalloc.start()
    try:
        trio.run(run_daemon, opts)
    except (StartupError, CheckpointError, BackendUnavailable) as exc:  # WorkingSetError, MetricsError too
        print(f"pageload: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # trio's own start-up (its epoll and wake-up sockets: EMFILE under a low descriptor
        # limit) is a start-up failure like any other; none is known to escape run_daemon
        print(f"pageload: {os_error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        opts.notifier.close()
    return 0
