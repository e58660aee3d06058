"""``pageload checkpoint create|inspect|verify|sample``: checkpoint files from the shell.

Bad input (a malformed index, a missing file, an image of the wrong size) is
reported as one line, ``pageload: <path>: <problem>``, on stderr with exit code 2;
never a traceback.  ``verify`` exits 1 when it finds corruption.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from loader import human
from loader.checkpoint import (
    DEFAULT_CHUNK_SIZE,
    CheckpointError,
    create_checkpoint,
    format_inspection,
    inspect_checkpoint,
    verify_checkpoint,
)
from workloads import make_sample_image

from ._args import add_size

__all__ = ["register"]

EXIT_OK, EXIT_CORRUPT, EXIT_BAD_INPUT = 0, 1, 2


def register(subparsers: Any) -> None:
    """Add ``checkpoint`` and its sub-commands to the ``pageload`` parser."""
    parser = subparsers.add_parser(
        "checkpoint",
        help="create, inspect and verify checkpoints; make sample images",
        description="Checkpoints the daemon restores from: raw memory images, and pages "
        "checkpoints (pages.img + index.msgpack).  See docs/FORMAT.md.",
    )
    sub = parser.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "create", help="convert a raw image into a pages checkpoint, dropping zero pages"
    )
    p.add_argument("image", metavar="IMAGE", help="raw memory image (sparse files welcome)")
    p.add_argument("out", metavar="OUT", help="checkpoint directory to create (must not exist)")
    add_size(p, "--page-size", default=4096, help="page size")
    add_size(p, "--chunk-size", default=DEFAULT_CHUNK_SIZE,
             help="bytes of pages.img per checksum: a client's wait reads and hashes its "
             "whole chunk before it is served, so smaller is faster to fault; each chunk costs 8 bytes "
             "of index and of the restoring daemon's memory")
    p.add_argument(
        "--working-set", metavar="FILE",
        help="a working set recorded on IMAGE ('pageload restore IMAGE --record-working-set'): its "
        "pages go first in pages.img, in replay order, so replay is one sequential read; it is "
        "copied into OUT/working-set.msgpack for the new checkpoint",
    )
    p.set_defaults(func=_guarded(_create))

    p = sub.add_parser("inspect", help="describe a checkpoint without reading its page data")
    p.add_argument(
        "path", metavar="PATH", help="checkpoint directory, its index.msgpack, or a raw image"
    )
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    p.set_defaults(func=_guarded(_inspect))

    p = sub.add_parser("verify", help="check every checksum; exit 1 if data is corrupt")
    p.add_argument("path", metavar="PATH", help="checkpoint directory or its index.msgpack")
    p.set_defaults(func=_guarded(_verify))

    p = sub.add_parser("sample", help="write a deterministic sample raw image")
    p.add_argument("out", metavar="OUT", help="image file to write (replaced if it exists)")
    add_size(p, "--size", default=256 << 20, help="image size")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument(
        "--dense", action="store_true", help="random data everywhere: no holes, no zero pages"
    )
    p.add_argument("--data-fraction", type=float, default=0.5, help="share of blocks holding data")
    p.add_argument(
        "--zero-page-fraction", type=float, default=0.05, help="share of zero pages in data"
    )
    add_size(p, "--hole-granularity", default=2 << 20, help="block size")
    p.add_argument(
        "--scattered", type=int, default=0, metavar="STRIDE",
        help="one data page every STRIDE pages, holes between: SIZE/4K/STRIDE ranges (fragmented memory; "
        "e.g. --size 16G --scattered 4: a million ranges)",
    )
    p.set_defaults(func=_guarded(_sample))


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn bad input into one line on stderr and exit code 2."""

    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except CheckpointError as exc:
            _fail(str(exc))
        except OSError as exc:
            where = exc.filename if exc.filename is not None else "?"
            _fail(f"{where}: {exc.strerror or exc}")
        except ValueError as exc:  # from make_sample_image's argument checks
            _fail(f"{getattr(args, 'out', '?')}: {exc}")
        return EXIT_BAD_INPUT

    return guarded


def _fail(message: str) -> None:
    print(f"pageload: {' '.join(message.split())}", file=sys.stderr)


def _create(args: argparse.Namespace) -> int:
    report = create_checkpoint(
        args.image, args.out, page_size=args.page_size, chunk_size=args.chunk_size,
        working_set=args.working_set,
    )
    print("\n".join(report.lines()))
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.path)
    print(json.dumps(info, sort_keys=False) if args.json else "\n".join(format_inspection(info)))
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    report = verify_checkpoint(args.path)
    print("\n".join(report.lines()))
    return EXIT_OK if report.ok else EXIT_CORRUPT


def _sample(args: argparse.Namespace) -> int:
    make_sample_image(
        args.out,
        args.size,
        seed=args.seed,
        data_fraction=args.data_fraction,
        zero_page_fraction=args.zero_page_fraction,
        hole_granularity=args.hole_granularity,
        dense=args.dense,
        scattered=args.scattered,
    )
    kind = "dense" if args.dense else f"scattered (1 page in {args.scattered})" if args.scattered else "sparse"
    print(f"wrote {args.out}: {human(args.size)} {kind} sample image (seed {args.seed})")
    return EXIT_OK
