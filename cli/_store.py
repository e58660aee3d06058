"""``pageload store gc``: chunk-store maintenance (docs/FORMAT.md, section 3)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from loader.checkpoint import CheckpointError

from ._args import add_s3_endpoint

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "store", help="chunk-store maintenance: gc",
        description="Chunk stores: compressed, content-addressed snapshots (docs/FORMAT.md, section 3).",
    )
    sub = parser.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "gc", help="delete the chunks no snapshot references",
        description="Delete the chunk objects of STORE that no snapshot's manifest references and that are older "
        "than the grace period.  Safe against a create or push running meanwhile as long as it finishes within the "
        "grace: its chunks are younger than that until its manifest names them, and a chunk it reuses is made "
        "young again first.  A manifest that cannot be read stops gc (exit 2): what it references is unknown.",
    )
    p.add_argument("store", metavar="STORE", help="the store: a directory, file:///DIR or s3://BUCKET/PREFIX")
    p.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="never delete a chunk younger than this (default 3600)")
    p.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_s3_endpoint(p)
    p.set_defaults(func=_gc)


def _gc(args: argparse.Namespace) -> int:
    from loader.store._access import open_store
    from loader.store._gc import DEFAULT_GRACE, gc_store

    grace = DEFAULT_GRACE if args.grace is None else args.grace
    try:
        if not grace >= 0:
            raise CheckpointError(args.store, f"--grace {args.grace}: seconds, 0 or more")
        report = gc_store(open_store(args.store, endpoint=args.s3_endpoint), grace=grace, dry_run=args.dry_run)
    except CheckpointError as exc:
        print(f"pageload: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict()) if args.json else report.line())
    return 0
