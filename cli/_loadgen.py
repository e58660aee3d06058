"""``pageload loadgen``: replay a trace against a running daemon from N client processes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from loader import ClientError
from loader.checkpoint import CheckpointError
from workloads import LoadgenError, ProgressFn, TraceError, load_trace, run_loadgen
from workloads._vmm import replay_as_faults


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "loadgen",
        help="replay a fault trace against a running daemon from N client processes",
        description="Split TRACE among N client processes; each replays its faults as waits "
        "(open loop at the trace's timestamps, or scaled to --rate faults/s in total, or closed "
        "loop), times each wait, and checks after it that the memory file holds the checkpoint's "
        "bytes.  Prints a summary (wait latency percentiles, waits/s, waits that found their range "
        "loaded as counted by the daemon, the generator's own overhead).  Exit 0 if every wait "
        "succeeded with the right bytes, 1 on errors or mismatches or an unreachable daemon, 2 for "
        "a bad trace or arguments.",
    )
    p.add_argument("--socket", metavar="PATH", help="the daemon's Unix socket (or --uffd)")
    p.add_argument("--uffd", metavar="PATH",
                   help="instead of waits on --socket, replay the trace as real page faults: an emulated "
                   "VMM (Firecracker's handshake) connects to the daemon's --uffd-socket PATH and --vcpus "
                   "threads touch the pages; needs --image (the raw image to check the bytes against, or a "
                   "checkpoint: then they are not checked); the daemon exits once the VMM has gone")
    p.add_argument("--uffd-minor", action="store_true",
                   help="with --socket: replay the trace as real page faults in zero-copy mode: an emulated VMM "
                   "maps the daemon's memory file and hands its userfaultfd over --socket (the daemon needs "
                   "--allow-writable-memory-fd); --vcpus threads touch the pages; needs --image as for --uffd")
    p.add_argument("--vcpus", type=int, default=2, metavar="N",
                   help="with --uffd or --uffd-minor: vCPU threads (default 2)")
    p.add_argument("--trace", required=True, metavar="FILE", help="trace file (msgpack or text)")
    p.add_argument(
        "--clients", type=int, default=1, metavar="N", help="client processes (default 1)"
    )
    loop = p.add_mutually_exclusive_group()
    loop.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="scale the timestamps to R faults/s in total (default: as recorded)",
    )
    loop.add_argument(
        "--closed-loop",
        action="store_true",
        help="each client issues its next wait as soon as the previous one returns",
    )
    p.add_argument(
        "--image",
        metavar="PATH",
        help="checkpoint to check bytes against (default: the daemon's source)",
    )
    p.add_argument("--no-verify", action="store_true", help="do not check the bytes")
    p.add_argument("--loaded-map", action="store_true",
                   help="each client maps the daemon's loaded map first (Client.load_map): a wait for "
                   "bytes it shows loaded sends nothing (counted as map hits)")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT ('-': stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=run)


def stderr_progress(stream: TextIO | None = None) -> ProgressFn:
    """A progress callback: one line redrawn with ``\\r`` on a terminal, else a line a second."""
    out = stream if stream is not None else sys.stderr
    tty = out.isatty()
    last = [0.0]

    def show(done: int, total: int, elapsed: float) -> None:
        now = time.monotonic()
        if not tty and done < total and now - last[0] < 1.0:
            return
        last[0] = now
        pct = 100.0 * done / total if total else 100.0
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"loadgen: {done}/{total} waits ({pct:.0f}%) in {elapsed:.1f} s, {rate:.0f}/s"
        if tty:
            out.write("\r" + text + ("\n" if done >= total else ""))
        else:
            out.write(text + "\n")
        out.flush()

    return show


def run(args: argparse.Namespace) -> int:
    if (args.socket is None) == (args.uffd is None):
        print("pageload: loadgen needs --socket PATH or --uffd PATH (one of them)", file=sys.stderr)
        return 2
    if args.uffd is not None or args.uffd_minor:
        if args.loaded_map:
            print("pageload: --loaded-map is for clients of the wait socket, not with --uffd or --uffd-minor",
                  file=sys.stderr)
            return 2
        return _run_uffd(args)
    if args.clients < 1:
        print(f"pageload: --clients must be at least 1, not {args.clients}", file=sys.stderr)
        return 2
    try:
        trace = load_trace(args.trace)
    except TraceError as exc:
        print(f"pageload: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pageload: {args.trace}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        report = run_loadgen(
            args.socket,
            trace,
            clients=args.clients,
            rate=args.rate,
            closed_loop=args.closed_loop,
            image=args.image,
            verify=not args.no_verify,
            progress=None if args.quiet else stderr_progress(),
            loaded_map=args.loaded_map,
        )
    except TraceError as exc:
        print(f"pageload: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError) as exc:
        print(f"pageload: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"pageload: {args.socket}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"pageload: {args.socket}: cannot reach the daemon: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    except LoadgenError as exc:
        print(f"pageload: loadgen: {exc}", file=sys.stderr)
        return 1
    if args.json:
        doc = json.dumps(report.as_dict(), indent=2, sort_keys=True)
        if args.json == "-":
            print(doc)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(doc + "\n")
    print(f"pageload: loadgen: {report.summary()}", file=sys.stderr)
    if report.ok:
        return 0
    for line in report.error_samples:
        print(f"pageload: error: {line}", file=sys.stderr)
    for m in report.mismatch_samples:
        print(f"pageload: MISMATCH: {m.describe()}", file=sys.stderr)
    print(
        f"pageload: loadgen FAILED: {report.errors} errors, {report.mismatches} mismatches, "
        f"{report.not_issued} faults not issued",
        file=sys.stderr,
    )
    return 1


def _run_uffd(args: argparse.Namespace) -> int:
    mode = "--uffd-minor" if args.uffd_minor else "--uffd"
    path = args.socket if args.uffd_minor else args.uffd
    if args.uffd_minor and args.socket is None:
        print("pageload: loadgen --uffd-minor needs --socket PATH (the daemon's wait socket)", file=sys.stderr)
        return 2
    if args.image is None:
        print(f"pageload: loadgen {mode} needs --image (the restored image: guest memory's size and bytes)",
              file=sys.stderr)
        return 2
    if args.vcpus < 1:
        print(f"pageload: --vcpus must be at least 1, not {args.vcpus}", file=sys.stderr)
        return 2
    try:
        trace = load_trace(args.trace)
        report = replay_as_faults(path, trace, args.image, vcpus=args.vcpus, rate=args.rate,
                                  closed_loop=args.closed_loop, verify=not args.no_verify,
                                  zero_copy=args.uffd_minor)
    except (TraceError, CheckpointError, ValueError) as exc:
        print(f"pageload: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pageload: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ClientError as exc:  # the daemon refused (forbidden without --allow-writable-memory-fd)
        print(f"pageload: {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        doc = json.dumps(report, indent=2, sort_keys=True)
        if args.json == "-":
            print(doc)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(doc + "\n")
    lat = report["fault_us"]
    print(f"pageload: loadgen {mode}: {report['touches']} pages touched by {args.vcpus} vCPUs in "
          f"{report['elapsed_s']:.3f} s, {lat['count']} faulted: p50 {lat['p50']:.0f} us p99 {lat['p99']:.0f} us "
          f"max {lat['max']:.0f} us; guest blocked {report['blocked_s']:.3f} s; "
          + (f"{report['mismatch_count']} mismatches" if report["verified"] else "bytes not checked"),
          file=sys.stderr)
    if report["mismatch_count"] or report["errors"]:
        for line in report["errors"]:
            print(f"pageload: error: {line}", file=sys.stderr)
        print(f"pageload: loadgen {mode} FAILED: wrong bytes at {report['mismatches']}", file=sys.stderr)
        return 1
    return 0
