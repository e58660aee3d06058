"""``pageload wait`` and ``pageload stats``: talk to a running daemon."""

from __future__ import annotations

import argparse
import json
import sys
import time

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
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_STATS_TIMEOUT_S, metavar="SECONDS",
                   help="give up after this long in all (default %(default)g s)")
    p.set_defaults(func=run_stats)


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


def run_stats(args: argparse.Namespace) -> int:
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
    return 0
