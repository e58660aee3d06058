"""``pageload cache stats|prune``: the host chunk cache from the shell (docs/REMOTE.md).

Every failure (a directory that is missing, a symlink, someone else's, writable by
others; a bad size) is one line, ``pageload: ...``, on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from loader import human
from loader.remote import CacheError, ChunkCache, default_cache_dir

from ._args import add_size

__all__ = ["register"]

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def register(subparsers: Any) -> None:
    """Add ``cache`` and its sub-commands to the ``pageload`` parser."""
    parser = subparsers.add_parser(
        "cache",
        help="show or prune the host chunk cache of remote checkpoints",
        description="The host chunk cache: checksum chunks of remote checkpoints, a block of them "
        "(1 MiB of a pages file) an entry, shared by every daemon of this user on the host, each chunk "
        "verified on every read.  See docs/REMOTE.md.",
    )
    sub = parser.add_subparsers(dest="cache_command", metavar="ACTION", required=True)

    p = sub.add_parser("stats", help="count the cache's entries and bytes (one directory walk)",
                       description="Count the cache's entries and bytes, per checkpoint, from one walk of "
                       "the directory (which also corrects the totals the daemons keep).")
    _add_dir(p)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=_guarded(_stats))

    p = sub.add_parser("prune", help="remove least recently used entries, one checkpoint's, or all",
                       description="Remove entries: the least recently used until the cache holds at most "
                       "--size bytes, every entry of one checkpoint (--identity), or everything (--all).  "
                       "Daemons using the cache meanwhile just fetch what they miss.")
    _add_dir(p)
    what = p.add_mutually_exclusive_group(required=True)
    add_size(what, "--size", default=None, help="keep at most this many bytes (least recently used go first)")
    what.add_argument("--identity", metavar="DIGEST", type=_digest,
                      help="remove one checkpoint's entries: its identity digest in hex, as "
                      "'pageload cache stats' lists them (a pages checkpoint's is the xxh3_64 of its "
                      "index.msgpack)")
    what.add_argument("--all", action="store_true", help="remove every entry")
    p.set_defaults(func=_guarded(_prune))


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help=f"the cache directory (default here: {default_cache_dir()})")


def _digest(text: str) -> int:
    try:
        value = int(text, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hex digest: {text!r}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"not a 64-bit digest: {text!r}")
    return value


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn an unusable cache into one line on stderr and exit code 2."""

    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except CacheError as exc:
            message = str(exc)
        except OSError as exc:
            message = f"{exc.filename if exc.filename is not None else args.cache_dir}: {exc.strerror or exc}"
        print(f"pageload: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_BAD_INPUT

    return guarded


def _open(args: argparse.Namespace) -> ChunkCache:
    return ChunkCache(args.cache_dir, create=False)


def _stats(args: argparse.Namespace) -> int:
    with _open(args) as cache:
        cache.refresh()
        stats = cache.stats()
        per = cache.checkpoints()
    if args.json:
        print(json.dumps({
            "directory": stats.directory, "entries": stats.entries, "bytes": stats.bytes,
            "corrupt_dropped": stats.corrupt_dropped,
            "checkpoints": [{"identity": f"{k:016x}", "entries": n, "bytes": b}
                            for k, (n, b) in sorted(per.items(), key=lambda kv: -kv[1][1])],
        }))
        return EXIT_OK
    print(f"cache {stats.directory}: {stats.entries} entries, {human(stats.bytes)} "
          f"({stats.bytes} bytes) of {len(per)} checkpoint(s)")
    for identity, (n, b) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"  {identity:016x}  {n} entries, {human(b)}")
    if stats.corrupt_dropped:
        print(f"  removed {stats.corrupt_dropped} entries that were not regular files")
    return EXIT_OK


def _prune(args: argparse.Namespace) -> int:
    with _open(args) as cache:
        if args.size is not None:
            report = cache.prune(max_bytes=args.size)
        else:
            report = cache.prune(identity=args.identity)  # None with --all: everything
        left = cache.stats()
    print(f"removed {report.entries} entries, {human(report.bytes)}; {left.entries} entries, "
          f"{human(left.bytes)} left in {left.directory}")
    return EXIT_OK
