"""``pageload working-set merge|show``: combine and inspect recorded working sets.

Bad input (a corrupt file, sets from different checkpoints) is one line,
``pageload: <path>: <problem>``, on stderr and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from loader import (
    WorkingSetError,
    format_working_set,
    merge_working_sets,
    read_working_set,
    write_working_set,
)

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "working-set",
        help="merge and inspect recorded working sets",
        description="Working sets are recorded by 'pageload restore --record-working-set' and replayed "
        "before the sweep ('--working-set').  See docs/FORMAT.md.",
    )
    sub = parser.add_subparsers(dest="working_set_command", metavar="ACTION", required=True)
    p = sub.add_parser("merge", help="union of several recordings, ordered by median first touch")
    p.add_argument("inputs", nargs="+", metavar="FILE", help="working sets of the same checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="file to write (atomically; it replaces a regular file, never a symbolic link or a "
                   "non-regular file)")
    p.set_defaults(func=_merge)
    p = sub.add_parser("show", help="describe a working set")
    p.add_argument("path", metavar="FILE")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="ranges listed (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the facts and every range as JSON")
    p.set_defaults(func=_show)


def _merge(args: argparse.Namespace) -> int:
    try:
        sets = [read_working_set(path) for path in args.inputs]
        merged = merge_working_sets(sets, args.inputs)
        write_working_set(args.output, merged)
    except WorkingSetError as exc:
        print(f"pageload: {exc}", file=sys.stderr)
        return 2
    print(f"merged {len(sets)} working sets ({merged.recordings} recordings) into {args.output}: "
          f"{merged.total_bytes} bytes in {len(merged)} ranges")
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        ws = read_working_set(args.path)
    except WorkingSetError as exc:
        print(f"pageload: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "path": args.path, "checkpoint": ws.identity.as_dict(), "recordings": ws.recordings,
            "window_s": ws.window_s, "bytes": ws.total_bytes, "ranges": len(ws),
            "first_touches": [list(r) for r in ws.ranges()],
        }))
    else:
        print("\n".join(format_working_set(ws, args.path, max(0, args.limit))))
    return 0
