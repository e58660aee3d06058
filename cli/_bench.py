"""``pageload bench``: run the benchmark sections and print their tables."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from bench import QUICK_SIZE, SECTIONS, BenchOptions, format_bench, run_bench

from ._args import add_size

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure the daemon against its goals; compare AIO backends and designs",
        description="Make a dense random image in a work directory and run the chosen sections "
        "against real 'pageload restore' daemons: daemon (fill vs cp, time to ready, wait latency, "
        "RSS and heap, each against its goal), backends (every AIO backend, warm/cold page cache, "
        "--direct, thread counts), designs (priority/eager/lazy/fifo replaying a trace), latency (a "
        "wait against the raw socket round trip: loaded pages, pipelined waits/s, unloaded pages), "
        "workingset (record a working set under the trace, restore with and without it), uffd "
        "(page faults from an emulated VMM: our handler against eager and lazy ones, zero-copy mode, "
        "and a real Firecracker restore where one can run), firecracker (only that restore), scale (millions "
        "of small ranges), store (the chunk store: compression, fills local and through a throttled proxy "
        "to SeaweedFS, a layer's dedup, faults on unfetched chunks; images of its own, at most 256M).  "
        "See docs/BENCHMARKS.md (the method, the current figures) and docs/MEASUREMENTS.md (every "
        "dated run).",
    )
    add_size(p, "--size", default=None, help=f"image size (default 1G; {QUICK_SIZE >> 20}M with --quick)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small image, one repetition each: well under a minute for 'daemon'",
    )
    p.add_argument(
        "--sections",
        default="daemon,backends",
        metavar="LIST",
        help=f"comma-separated, from {','.join(SECTIONS)} (default daemon,backends)",
    )
    p.add_argument(
        "--trace",
        metavar="FILE",
        help="trace for the designs and workingset sections (default: zipf over the image)",
    )
    p.add_argument(
        "--clients", type=int, default=4, metavar="N", help="clients for the designs and workingset sections"
    )
    p.add_argument(
        "--loaded-map", action="store_true",
        help="designs: the clients map each daemon's loaded map first (Client.load_map), so a wait for "
        "bytes it shows loaded sends no request (workingset always runs both ways)",
    )
    p.add_argument("--repeat", type=int, metavar="N",
                   help="repetitions of each measurement; for designs, the rounds (default 2), "
                   "the designs taking turns in alternating order")
    p.add_argument(
        "--scale-ranges", metavar="LIST",
        help="scale: the range counts to restore, comma-separated (K and M suffixes; default 64K,256K,1M,4M, "
        "--quick 64K,256K); each image holds one 4 KiB page every 4 pages",
    )
    p.add_argument("--json", metavar="OUT", help="write every figure as JSON to OUT ('-': stdout)")
    p.add_argument(
        "--plot", metavar="FILE.png",
        help="plot the designs section, and the workingset one (blocked waits over time; into "
        "FILE-workingset.png when designs is plotted too); needs matplotlib",
    )
    p.add_argument(
        "--workdir",
        metavar="DIR",
        help="keep images and logs here (a disk file system; default a temporary directory)",
    )
    p.add_argument("--keep", action="store_true", help="do not remove the temporary work directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    try:
        opts = BenchOptions(
            size=args.size or (QUICK_SIZE if args.quick else 1 << 30),
            sections=sections,
            quick=args.quick,
            workdir=args.workdir,
            keep=args.keep,
            trace=args.trace,
            clients=args.clients,
            loaded_map=args.loaded_map,
            repeat=args.repeat,
            extra={"scale_counts": _counts(args.scale_ranges)} if args.scale_ranges else {},
        )
    except ValueError as exc:
        print(f"pageload: {exc}", file=sys.stderr)
        return 2
    if args.plot and "designs" not in sections and "workingset" not in sections:
        print("pageload: --plot draws the designs and workingset sections; add one to --sections",
              file=sys.stderr)
        return 2
    log = (lambda line: print(line, file=sys.stderr)) if args.json == "-" else print
    result = run_bench(opts, log=log)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print()
        print(format_bench(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            print(f"\nfigures written to {args.json}")
    if args.plot and "workingset" in sections:
        ws = result["sections"].get("workingset", {})
        stem, ext = os.path.splitext(args.plot)
        path = f"{stem}-workingset{ext or '.png'}" if "designs" in sections else args.plot
        if "runs" not in ws:
            print(f"pageload: nothing to plot: {ws.get('error')}", file=sys.stderr)
            return 2
        try:
            from bench import PlotUnavailable, plot_workingset

            plot_workingset(ws, path)
        except (ImportError, PlotUnavailable) as exc:
            print(f"pageload: cannot plot: {exc}", file=sys.stderr)
            return 2
    if args.plot and "designs" in sections:
        designs = result["sections"].get("designs", {})
        if "designs" not in designs:
            print(
                f"pageload: nothing to plot: {designs.get('skipped') or designs.get('error')}",
                file=sys.stderr,
            )
            return 2
        try:
            from bench import plot_designs

            plot_designs(designs, args.plot)
        except ImportError as exc:
            print(f"pageload: cannot plot: {exc}", file=sys.stderr)
            return 2
    failed = [n for n, s in result["sections"].items() if "error" in s]
    return 1 if failed else 0


def _counts(text: str) -> list[int]:
    """'64K,1M' -> [65536, 1048576]; ValueError (one line) for anything else."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(part[-1:], 1)
        digits = part[:-1] if scale > 1 else part
        if not digits.isdigit() or int(digits) <= 0:
            raise ValueError(f"--scale-ranges: {part!r} is not a positive count (e.g. 64K, 1M)")
        out.append(int(digits) * scale)
    return out
