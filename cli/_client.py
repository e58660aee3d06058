"""``pageload wait``, ``pageload stats`` and ``pageload mark``: talk to a running daemon."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from typing import Any, TextIO

from loader import Client, ClientError, human

from ._args import size_arg


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("wait", help="block until a memory range is loaded",
                       description="Exit 0 once [OFFSET, OFFSET+LENGTH) is loaded; 1 with the error "
                       "otherwise, or after --timeout seconds without an answer.  Sizes take K/M/G suffixes.")
    p.add_argument("--socket", required=True, metavar="PATH")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_WAIT_TIMEOUT_S, metavar="SECONDS",
                   help="give up after this long in all: connecting, the handshake and the wait "
                   "(default %(default)g s)")
    p.add_argument("offset", type=size_arg, metavar="OFFSET")
    p.add_argument("length", type=size_arg, metavar="LENGTH")
    p.set_defaults(func=run_wait)

    p = sub.add_parser("stats", help="show a running daemon's statistics")
    p.add_argument("--socket", required=True, metavar="PATH")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--watch", action="store_true",
                   help="follow the restore until it is done: on a terminal one redrawn line (bar, MB/s, "
                   "waits blocked now, ETA), otherwise one plain line per interval")
    p.add_argument("--interval", type=float, metavar="SECONDS",
                   help="with --watch: poll this often (default 0.5 on a terminal, 5 otherwise)")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_STATS_TIMEOUT_S, metavar="SECONDS",
                   help="give up after this long in all (default %(default)g s)")
    p.set_defaults(func=run_stats)

    p = sub.add_parser("mark", help="end a daemon's working-set recording window now",
                       description="The daemon recording with --record-working-set closes its window and "
                       "writes the working set (see docs/FORMAT.md).")
    p.add_argument("--socket", required=True, metavar="PATH")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_STATS_TIMEOUT_S, metavar="SECONDS",
                   help="give up after this long in all (default %(default)g s)")
    p.set_defaults(func=run_mark)


#: How long ``pageload wait`` and ``pageload stats`` wait for the daemon in all, by default.
DEFAULT_WAIT_TIMEOUT_S = 60.0
DEFAULT_STATS_TIMEOUT_S = 10.0


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _fail(exc: BaseException, path: str, timeout: float) -> int:
    if isinstance(exc, TimeoutError):
        exc = f"{path}: no answer from the daemon within {timeout:g} s"  # type: ignore[assignment]
    elif isinstance(exc, OSError) and not isinstance(exc, ClientError):
        exc = f"{path}: cannot reach the daemon: {exc.strerror or exc}"  # type: ignore[assignment]
    print(f"pageload: {exc}", file=sys.stderr)
    return 1


def run_wait(args: argparse.Namespace) -> int:
    try:
        with Client.connect(args.socket, deadline=time.monotonic() + args.timeout) as client:
            client.wait(args.offset, args.length)
    except (ClientError, OSError) as exc:
        return _fail(exc, args.socket, args.timeout)
    return 0


def run_mark(args: argparse.Namespace) -> int:
    try:
        with Client.connect(args.socket, deadline=time.monotonic() + args.timeout) as client:
            client.mark()
    except (ClientError, OSError) as exc:
        return _fail(exc, args.socket, args.timeout)
    return 0


def run_stats(args: argparse.Namespace) -> int:
    if args.watch:
        return watch(args.socket, args.interval, sys.stdout)
    try:
        with Client.connect(args.socket, deadline=time.monotonic() + args.timeout) as client:
            stats = client.stats()
    except (ClientError, OSError) as exc:
        return _fail(exc, args.socket, args.timeout)
    if args.json:
        json.dump(stats, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    lat = stats.get("latency_us", {})
    total = stats["total_bytes"]
    pct = 100 * stats["loaded_bytes"] / total if total else 100
    print(f"loaded      {human(stats['loaded_bytes'])} of {human(total)} ({pct:.1f}%)"
          f"{'  done' if stats['done'] else ''}")
    print(f"throughput  {stats['throughput_bps'] / 1e6:.1f} MB/s over {stats['elapsed_s']:.2f} s")
    print(f"reads       {stats['reads_in_flight']} in flight, {stats['reads_total']} total, "
          f"{stats['reads_retried']} retried")
    print(f"waits       {stats['waits_total']} total: {stats['waits_immediate']} immediate, "
          f"{stats['waits_served']} served, {stats['waits_failed']} failed, "
          f"{stats['waits_cancelled']} cancelled, {stats['waiters_blocked']} blocked now")
    print(f"waited      {human(stats['bytes_waited'])}, {stats['total_wait_time_s']:.3f} s in all, "
          f"someone blocked {stats['blocked_time_s']:.3f} s; mean {lat.get('mean_us', 0):.0f} us, "
          f"max {lat.get('max_us', 0):.0f} us")
    if stats["failed_bytes"]:
        print(f"FAILED      {human(stats['failed_bytes'])}: " + ", ".join(
            f"{off:#x}+{n:#x} errno {e}" for off, n, e in stats["failed_ranges"]))
    if "backend" in stats:
        print(f"backend     {stats['backend']}")
    ws = stats.get("working_set")
    if ws:
        when = "not yet" if ws["loaded_s"] is None else f"in {ws['loaded_s']:.3f} s"
        rate = "-" if ws["hit_rate"] is None else f"{ws['hit_rate'] * 100:.0f}%"
        print(f"working set {human(ws['loaded_bytes'])} of {human(ws['size_bytes'])} loaded {when}; waits "
              f"{ws['waits_hit']} hit, {ws['waits_early']} early, {ws['waits_missed']} missed (hit rate {rate})")
    rec = stats.get("recording")
    if rec:
        print(f"recording   {'active' if rec['active'] else 'done'}: {human(rec['bytes'])} in {rec['ranges']} "
              f"ranges -> {rec['path']}")
    return 0


# -- stats --watch

BAR_WIDTH = 24
MIN_BAR_WIDTH = 8


def watch_line(stats: dict[str, Any], rate_bps: float, *, bar_width: int = BAR_WIDTH) -> str:
    """One progress line: bar, percent, bytes, MB/s (``rate_bps``), waits blocked now, ETA."""
    total = stats["total_bytes"]
    loaded = stats["loaded_bytes"]
    frac = loaded / total if total else 1.0
    filled = int(frac * bar_width)
    bar = "#" * filled + "-" * (bar_width - filled)
    line = (f"[{bar}] {frac * 100:5.1f}% {human(loaded)}/{human(total)} {rate_bps / 1e6:7.1f} MB/s "
            f"blocked {stats['waiters_blocked']}")
    if stats["done"]:
        line += f" done in {stats['elapsed_s']:.2f} s"
        if stats["failed_bytes"]:
            line += f", FAILED {human(stats['failed_bytes'])}"
    elif rate_bps > 0:
        line += f" ETA {(total - loaded - stats['failed_bytes']) / rate_bps:.1f} s"
    else:
        line += " ETA ?"
    return line


def watch(path: str, interval: float | None, out: TextIO) -> int:
    """Poll the daemon's stats until it is done; redraw one line on a terminal, else
    print one line per poll.  The rate is over the last interval (the daemon's own
    average on the first poll).  Exit 0 once done, 1 if the daemon cannot be reached
    or goes away."""
    tty = out.isatty()
    if interval is None:
        interval = 0.5 if tty else 5.0
    interval = max(interval, 0.05)
    drawn = False
    try:
        with Client.connect(path) as client:
            last: tuple[float, int] | None = None
            while True:
                stats = client.stats()
                now = time.monotonic()
                if last is None or now <= last[0]:
                    rate = float(stats["throughput_bps"])
                else:
                    rate = max(0.0, (stats["loaded_bytes"] - last[1]) / (now - last[0]))
                last = (now, stats["loaded_bytes"])
                if stats["done"]:
                    rate = float(stats["throughput_bps"])
                line = watch_line(stats, rate)
                if tty:  # fit the terminal: the bar shrinks first, then the line is cut
                    width = shutil.get_terminal_size().columns - 1
                    if len(line) > width:
                        line = watch_line(stats, rate, bar_width=max(MIN_BAR_WIDTH, BAR_WIDTH - (len(line) - width)))
                    out.write("\r" + line[:width] + "\x1b[K")
                    drawn = True
                else:
                    out.write(line + "\n")
                out.flush()
                if stats["done"]:
                    break
                time.sleep(interval)
    except (ClientError, OSError) as exc:
        if drawn:
            out.write("\n")
        return _fail(exc, path, DEFAULT_STATS_TIMEOUT_S)
    except KeyboardInterrupt:
        if drawn:
            out.write("\n")
        return 130
    if tty:
        out.write("\n")
    return 0
