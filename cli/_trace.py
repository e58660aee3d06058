"""``pageload trace gen|convert|show``: make, import and inspect fault traces.

Bad input (an unreadable or malformed file, a bad parameter) prints one line,
``pageload: <file>: <problem>``, on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from loader import human
from workloads import Trace, TraceError, detect_form, load_trace, save_trace

from ._args import add_size

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from workloads import GRANULARITIES, KINDS

    trace = subparsers.add_parser(
        "trace",
        help="make, import and inspect fault traces",
        description="Fault traces: (microseconds, offset, length) per fault; see docs/TRACES.md.",
    )
    sub = trace.add_subparsers(dest="trace_command", metavar="SUBCOMMAND", required=True)

    gen = sub.add_parser(
        "gen", help="generate a synthetic trace", description="Generate a synthetic trace."
    )
    gen.add_argument(
        "kind", choices=list(KINDS), metavar="KIND", help=f"one of: {', '.join(KINDS)}"
    )
    gen.add_argument("out", metavar="OUT", help="trace file to write")
    gen.add_argument("--count", type=int, default=100_000, help="number of faults (default 100000)")
    add_size(gen, "--memory-size", default=1 << 30, help="image size, K/M/G suffixes")
    gen.add_argument(
        "--granularity",
        choices=list(GRANULARITIES),
        default="4K",
        help="fault size and alignment (default 4K)",
    )
    gen.add_argument(
        "--rate", type=float, default=10_000.0, help="faults per second (default 10000)"
    )
    gen.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed, same trace (default 0)"
    )
    gen.add_argument(
        "--stride", type=int, default=16, help="strided: step in granules (default 16)"
    )
    gen.add_argument("--phases", type=int, default=4, help="phased: number of phases (default 4)")
    add_size(gen, "--working-set", default=0, help="phased: working-set size (default: memory/8)")
    gen.add_argument("--zipf-s", type=float, default=1.1, help="zipf: exponent (default 1.1)")
    gen.add_argument(
        "--burst", type=int, default=64, help="bursty: mean faults per burst (default 64)"
    )
    gen.add_argument(
        "--idle-ms", type=float, default=20.0, help="bursty: mean idle gap in ms (default 20)"
    )
    gen.add_argument(
        "--image",
        default=None,
        help="checkpoint or raw image: faults land only on its data, not its holes "
        "(its memory size replaces --memory-size)",
    )
    _add_form(gen)
    gen.set_defaults(func=_gen)

    conv = sub.add_parser(
        "convert",
        help="import 'perf script' page-fault samples",
        description="Import the output of 'perf script -F +addr' for samples recorded with "
        "'perf record -e page-faults -c 1 -d'; virtual addresses are folded into image offsets.",
    )
    conv.add_argument("perf_output", metavar="PERF_SCRIPT_OUTPUT")
    conv.add_argument("out", metavar="OUT", help="trace file to write")
    add_size(conv, "--memory-size", default=None, help="wrap offsets to this size")
    add_size(conv, "--page-size", default=4096, help="fault size")
    add_size(conv, "--region-gap", default=1 << 20, help="a gap larger than this starts a new region")
    conv.add_argument(
        "--order",
        choices=["address", "first-touch"],
        default="address",
        help="region order (default address)",
    )
    _add_form(conv)
    conv.set_defaults(func=_convert)

    show = sub.add_parser(
        "show", help="summarize a trace", description="Print a summary of a trace file."
    )
    show.add_argument("file", metavar="FILE")
    show.set_defaults(func=_show)


def _add_form(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--form",
        choices=["msgpack", "text"],
        default=None,
        help="file form (default: text for a .txt name, msgpack otherwise)",
    )


def _form_for(path: str, form: str | None) -> str:
    if form is not None:
        return form
    return "text" if path.endswith(".txt") else "msgpack"


def _fail(message: str) -> int:
    print(f"pageload: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _guarded(body: Callable[[], int], path: str) -> int:
    try:
        return body()
    except TraceError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or path}: {exc.strerror or exc}")
    except ValueError as exc:
        return _fail(f"{path}: {exc}")


def _gen(args: argparse.Namespace) -> int:
    from workloads import GRANULARITIES, generate

    def body() -> int:
        layout = None
        if args.image is not None:
            from loader.checkpoint import CheckpointError, open_checkpoint

            try:
                layout = open_checkpoint(args.image).layout
            except CheckpointError as exc:
                return _fail(str(exc))
        try:
            trace = generate(
                args.kind,
                count=args.count,
                memory_size=args.memory_size,
                granularity=GRANULARITIES[args.granularity],
                rate=args.rate,
                seed=args.seed,
                stride=args.stride,
                phases=args.phases,
                working_set=args.working_set,
                zipf_s=args.zipf_s,
                burst=args.burst,
                idle_us=args.idle_ms * 1000.0,
                layout=layout,
            )
        except ValueError as exc:
            return _fail(f"trace gen {args.kind}: {exc}")
        save_trace(trace, args.out, _form_for(args.out, args.form))  # type: ignore[arg-type]
        print(f"{args.out}: {len(trace)} {args.kind} faults, {_describe(trace)}")
        return EXIT_OK

    return _guarded(body, args.out)


def _convert(args: argparse.Namespace) -> int:
    from workloads import import_perf_script

    def body() -> int:
        trace = import_perf_script(
            args.perf_output,
            memory_size=args.memory_size,
            page_size=args.page_size,
            region_gap=args.region_gap,
            order=args.order,
        )
        save_trace(trace, args.out, _form_for(args.out, args.form))  # type: ignore[arg-type]
        print(f"{args.out}: {len(trace)} faults from {args.perf_output}, {_describe(trace)}")
        return EXIT_OK

    return _guarded(body, args.perf_output)


def _describe(trace: Trace) -> str:
    size = "unknown" if trace.memory_size is None else human(trace.memory_size)
    return f"memory size {size}, page size {trace.page_size}"


def _show(args: argparse.Namespace) -> int:
    def body() -> int:
        trace = load_trace(args.file)
        s = trace.summary()
        form = detect_form(args.file)
        size = "unknown" if s.memory_size is None else f"{s.memory_size} ({human(s.memory_size)})"
        print(f"file:         {args.file} ({form})")
        print(f"faults:       {s.faults} ({human(s.bytes)} requested)")
        print(f"span:         {s.span_lo:#x} - {s.span_hi:#x} ({human(s.span_hi - s.span_lo)})")
        print(f"memory size:  {size}")
        print(f"page size:    {s.page_size}")
        print(f"unique pages: {s.unique_pages} ({human(s.unique_pages * s.page_size)})")
        print(f"duration:     {s.duration_us / 1e6:.6f} s")
        print(f"rate:         {s.rate:.1f} faults/s")
        trace.check_fits()
        return EXIT_OK

    return _guarded(body, args.file)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="pageload")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
