"""``pageload restore``'s command line to the daemon's options, in-process and fast:
``cli._restore.daemon_options`` on the real parser's output, each option both ways.

tests/test_restore_cli.py proves end to end, with a real daemon process, that the
options reach the loader; this file pins every option's mapping and default (so that
the mutation target ``restore-cli`` runs in minutes, docs/TESTING.md).  The defaults
are compared with the daemon's and the loader's own: the command line and the library
must not disagree on what an option left out means.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import io
import math
import os
import re
import resource
import sys
from typing import Any

import pytest

from cli import build_parser
from cli._restore import daemon_options, os_error_line, run
from loader import DaemonOptions, LoaderConfig, MetricsAddress, StartupError, UffdConfig
from loader.source import RemoteConfig

SRC = "memory.img"
SOCK = "/run/s.sock"


@pytest.fixture(autouse=True)
def _no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    """daemon_options reads (and unsets) these: none is set for the tests, and the
    test process's own are restored after."""
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
        monkeypatch.delenv(name, raising=False)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser("restore").parse_args(["restore", *argv])


def options(*argv: str, stderr: Any = None) -> DaemonOptions:
    """daemon_options with ``stderr`` as sys.stderr: a log file (not a terminal) unless given."""
    saved = sys.stderr
    sys.stderr = io.StringIO() if stderr is None else stderr
    try:
        opts = daemon_options(parse(*argv))
    finally:
        sys.stderr = saved
    opts.notifier.close()
    return opts


def test_the_defaults_are_the_daemons_and_the_loaders() -> None:
    opts = options(SRC, "--socket", SOCK)
    library = DaemonOptions(source=SRC, socket_path=SOCK)
    assert (opts.source, opts.socket_path) == (SRC, SOCK)
    assert opts.config == LoaderConfig()  # sweep, priority, verify, kernel copy all on
    assert opts.uffd_config == UffdConfig.for_mode("fill")
    same = ["memory_file", "force_memory_file", "force_working_set", "reserve", "aio_backend", "threads",
            "direct", "allow_uids", "ready_fd", "progress_interval", "working_set", "use_working_set",
            "record_working_set", "record_seconds", "busy_poll_us", "listen_socket", "metrics",
            "uffd_socket", "allow_writable_memory_fd", "shutdown_timeout"]
    assert {f: getattr(opts, f) for f in same} == {f: getattr(library, f) for f in same}
    # and what --help says they are
    assert (opts.shutdown_timeout, opts.record_seconds, opts.progress_interval) == (2.0, 10.0, 5.0)
    # the command line's own: everything loads first, then the socket opens
    assert opts.background is False and opts.progress_bar is False
    assert not opts.notifier  # no $NOTIFY_SOCKET: sd_notify is a no-op


def _changed(flags: tuple[str, ...]) -> dict[str, Any]:
    """The fields of the options and of their LoaderConfig that ``flags`` change."""
    base, opts = options(SRC, "--socket", SOCK), options(SRC, "--socket", SOCK, *flags)
    out = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)
           if f.name not in ("config", "notifier") and getattr(opts, f.name) != getattr(base, f.name)}
    out.update({f"config.{k}": v for k, v in dataclasses.asdict(opts.config).items()
                if v != getattr(base.config, k)})
    return out


@pytest.mark.parametrize("flags, changes", [
    (("--background",), {"background": True}),
    (("--no-sweep",), {"config.sweep": False}),
    (("--no-priority",), {"config.priority": False}),
    (("--no-verify",), {"config.verify": False}),
    (("--no-kernel-copy",), {"config.kernel_copy": False}),
    (("--no-working-set",), {"use_working_set": False}),
    (("--working-set", "ws.msgpack"), {"working_set": "ws.msgpack"}),
    (("--record-working-set",), {"record_working_set": ""}),
    (("--record-working-set", "out.msgpack"), {"record_working_set": "out.msgpack"}),
    (("--record-seconds", "0"), {"record_seconds": None}),  # until a mark or shutdown
    (("--record-seconds", "1"), {"record_seconds": 1.0}),
    (("--record-seconds", "2.5"), {"record_seconds": 2.5}),
    (("--force",), {"force_memory_file": True, "force_working_set": True}),
    (("--memory-file", "/dev/shm/m", "--reserve", "all"), {"memory_file": "/dev/shm/m", "reserve": "all"}),
    (("--aio", "threads", "--threads", "3", "--direct"), {"aio_backend": "threads", "threads": 3, "direct": True}),
    (("--read-size", "64K", "--sweep-read-size", "2M", "--queue-depth", "7", "--background-reads", "3",
      "--busy-background-reads", "2", "--read-timeout", "4.5"),
     {"config.read_size": 65536, "config.sweep_read_size": 2 << 20, "config.queue_depth": 7,
      "config.background_reads": 3, "config.busy_background_reads": 2, "config.read_timeout": 4.5}),
    (("--allow-uid", "1000", "--allow-uid", "1001"), {"allow_uids": (1000, 1001)}),
    (("--allow-writable-memory-fd", "--busy-poll-us", "0"), {"allow_writable_memory_fd": True, "busy_poll_us": 0}),
    (("--ready-fd", "7", "--progress-interval", "0.5"), {"ready_fd": 7, "progress_interval": 0.5}),
    (("--shutdown-timeout", "0.5"), {"shutdown_timeout": 0.5}),
    (("--shutdown-timeout", "1e-9"), {"shutdown_timeout": 1e-9}),
    (("--metrics", "127.0.0.1:9464"), {"metrics": MetricsAddress(host="127.0.0.1", port=9464)}),
    (("--metrics", "/run/m.sock"), {"metrics": MetricsAddress(path="/run/m.sock")}),
])
def test_each_option_changes_what_it_names_and_nothing_else(flags: tuple[str, ...], changes: dict[str, Any]) -> None:
    assert _changed(flags) == changes


@pytest.mark.parametrize("mode, sweep", [("fill", True), ("eager", True), ("lazy", False)])
def test_the_uffd_mode_picks_its_handler_and_lazy_sweeps_nothing(mode: str, sweep: bool) -> None:
    opts = options(SRC, "--uffd-socket", "/run/u.sock", "--uffd-mode", mode)
    assert opts.uffd_socket == "/run/u.sock" and opts.uffd_config == UffdConfig.for_mode(mode)
    assert opts.config.sweep is sweep
    assert options(SRC, "--uffd-socket", "/run/u.sock", "--uffd-mode", mode, "--no-sweep").config.sweep is False


def test_the_wait_socket_defaults_beside_the_uffd_socket() -> None:
    assert options(SRC, "--uffd-socket", "/run/u.sock").socket_path == "/run/u.sock.pageload"
    assert options(SRC, "--uffd-socket", "/run/u.sock", "--socket", SOCK).socket_path == SOCK


@pytest.mark.parametrize("us", [0, 1, 250, 10000])
def test_uffd_spin_us_is_microseconds(us: int) -> None:
    opts = options(SRC, "--uffd-socket", "/run/u.sock", "--uffd-mode", "lazy", "--uffd-spin-us", str(us))
    assert opts.uffd_config == dataclasses.replace(UffdConfig.for_mode("lazy"), spin_s=us / 1e6)
    assert math.isclose(opts.uffd_config.spin_s * 1e6, us)


def test_the_help_states_the_uffd_spin_default_the_daemon_uses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    stated = re.search(r"default (\d+) in 'fill' mode", text)
    assert stated is not None, text
    assert int(stated.group(1)) / 1e6 == options(SRC, "--uffd-socket", "u").uffd_config.spin_s > 0


@pytest.mark.parametrize("seconds", ["0", "-1", "-0.5", "nan"])
def test_a_shutdown_timeout_that_is_not_positive_is_refused(seconds: str) -> None:
    with pytest.raises(ValueError, match="--shutdown-timeout must be positive"):
        daemon_options(parse(SRC, "--socket", SOCK, "--shutdown-timeout", seconds))


def test_no_socket_at_all_is_refused() -> None:
    with pytest.raises(ValueError, match="needs --socket PATH, --uffd-socket PATH or socket activation"):
        daemon_options(parse(SRC))


def test_a_bad_metrics_address_is_refused_before_anything_starts() -> None:
    with pytest.raises(StartupError, match="--metrics"):
        daemon_options(parse(SRC, "--socket", SOCK, "--metrics", "nohost"))


def test_the_progress_bar_is_drawn_only_on_a_terminal_and_only_in_the_foreground() -> None:
    main, sub = os.openpty()
    try:
        with open(sub, "w", closefd=False) as terminal:
            assert terminal.isatty()
            assert options(SRC, "--socket", SOCK, stderr=terminal).progress_bar is True
            assert options(SRC, "--socket", SOCK, "--background", stderr=terminal).progress_bar is False
    finally:
        os.close(main)
        os.close(sub)
    # a log file, a pipe: no bar
    assert options(SRC, "--socket", SOCK, stderr=io.StringIO()).progress_bar is False
    assert options(SRC, "--socket", SOCK, "--background", stderr=io.StringIO()).progress_bar is False


def test_an_os_error_is_one_line_naming_its_file_when_it_has_one() -> None:
    assert os_error_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y")) == \
        "/x/y: No such file or directory"
    assert os_error_line(OSError(errno.EMFILE, "Too many open files")) == "Too many open files"
    assert os_error_line(OSError("no errno")) == "no errno"


def test_an_event_loop_that_cannot_start_is_one_line_and_exit_2(tmp_path, monkeypatch) -> None:
    """trio.run's own start-up (its epoll and wake-up sockets) failing with EMFILE under a
    low descriptor limit was exit 1: a start-up failure is exit 2, one line."""
    args = parse(SRC, "--socket", str(tmp_path / "s.sock"))
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.dup(0)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))  # no descriptor is free below it
    try:
        code = run(args)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (code, stderr.getvalue()) == (2, "pageload: Too many open files\n")


URL = "s3://snap/ckpt"


def test_a_local_checkpoint_has_no_remote_options_and_the_fetch_default_is_16() -> None:
    opts = options(SRC, "--socket", SOCK)
    assert opts.remote is None and opts.fetch_concurrency == 16  # as --help and docs/REMOTE.md say


@pytest.mark.parametrize("flags, remote", [
    ((), RemoteConfig(working_set=True)),
    (("--no-cache",), RemoteConfig(cache=False, working_set=True)),
    (("--cache-dir", "/var/cache/x", "--cache-size", "1"), RemoteConfig(cache_dir="/var/cache/x", cache_size=1,
                                                                         working_set=True)),
    (("--s3-endpoint", "http://127.0.0.1:8333"), RemoteConfig(endpoint="http://127.0.0.1:8333", working_set=True)),
    # the working set kept with the checkpoint is looked up at open only where it will be used
    (("--no-working-set",), RemoteConfig()),
    (("--working-set", "/tmp/ws.msgpack"), RemoteConfig()),
])
def test_a_store_url_takes_the_remote_options(flags: tuple[str, ...], remote: RemoteConfig) -> None:
    assert options(URL, "--socket", SOCK, *flags).remote == remote


@pytest.mark.parametrize("flags, background, busy", [
    ((), 12, 6),  # 3/4 of the 16 fetch threads, and half of that while clients fault (16 CPUs)
    (("--fetch-concurrency", "8"), 6, 3),
    (("--fetch-concurrency", "1"), 1, 1),  # at least one each
    (("--threads", "4"), 3, 1),  # --threads overrides the fetch concurrency
    (("--queue-depth", "4"), 3, 1),  # and the queue keeps a slot for waiters
    (("--background-reads", "5"), 5, 2),  # given: kept
    (("--busy-background-reads", "2"), 12, 2),
])
def test_a_store_url_sizes_the_sweep_by_its_fetch_threads(flags: tuple[str, ...], background: int,
                                                          busy: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    config = options(URL, "--socket", SOCK, *flags).config
    assert (config.background_reads, config.busy_background_reads) == (background, busy)


@pytest.mark.parametrize("cpus, busy", [(2, 1), (4, 3), (None, 1), (64, 6)])
def test_a_store_urls_sweep_while_clients_fault_is_held_to_one_less_than_the_cpus(
        cpus: int | None, busy: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """While clients fault, the sweep's GETs in flight shrink to half its width and to
    one less than the CPUs: on loopback the store's work shares the CPUs, and a fault's
    GET queued behind six 1 MiB GETs took 6x a bare GET (docs/REMOTE.md, "Measured")."""
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    config = options(URL, "--socket", SOCK).config
    assert (config.background_reads, config.busy_background_reads) == (12, busy)


@pytest.mark.parametrize("flags", [
    ("--s3-endpoint", "http://127.0.0.1:8333"), ("--cache-dir", "/tmp/c"), ("--cache-size", "1G"), ("--no-cache",),
])
def test_the_remote_options_are_refused_for_a_local_checkpoint(flags: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="are for a checkpoint in a store"):
        options(SRC, "--socket", SOCK, *flags)


@pytest.mark.parametrize("flags, error", [
    (("--cache-size", "0"), "--cache-size must be at least 1 byte"),
    (("--no-cache", "--cache-dir", "/tmp/c"), "contradict"),
    (("--no-cache", "--cache-size", "1G"), "contradict"),
])
def test_remote_options_that_cannot_be_are_refused(flags: tuple[str, ...], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        options(URL, "--socket", SOCK, *flags)
