"""``checkpoint inspect`` and ``checkpoint verify`` of chunk stores (docs/FORMAT.md,
"Inspecting and verifying a store"): a snapshot (``STORE/snapshots/NAME``, a path,
``file://`` or ``s3://``) and a local store directory (its snapshots listed)."""

from __future__ import annotations

import argparse
import json

from loader.checkpoint import CheckpointError
from loader.source import RemoteConfig, StoreSource

__all__ = ["inspect_store", "verify_store"]


def _snapshot(args: argparse.Namespace) -> StoreSource | None:
    """The snapshot ``args.path`` names, open (no chunk cache); None if it names none."""
    if not StoreSource.claims(args.path):
        return None
    opened = StoreSource.open(args.path, remote=RemoteConfig(endpoint=args.s3_endpoint, cache=False))
    if not isinstance(opened, StoreSource):  # a pages checkpoint under a prefix ending in snapshots/NAME
        opened.close()
        return None
    return opened


def inspect_store(args: argparse.Namespace) -> int | None:
    """Print what ``inspect`` says of a snapshot or a store directory; the exit code, or
    None when ``args.path`` is neither (the caller inspects it as a checkpoint)."""
    from loader.store._inspect import describe_snapshot, format_snapshot, format_store, is_store_dir, list_store

    source = _snapshot(args)
    if source is not None:
        try:
            info = describe_snapshot(source)
        finally:
            source.close()
        lines = format_snapshot(info)
    elif is_store_dir(args.path):
        if args.s3_endpoint:
            raise CheckpointError(args.path, "--s3-endpoint is for a store in object storage (s3://, file://)")
        info = list_store(args.path)
        lines = format_store(info)
    else:
        return None
    print(json.dumps(info) if args.json else "\n".join(lines))
    return 0


def verify_store(args: argparse.Namespace) -> int | None:
    """``verify`` of a snapshot: every chunk's BLAKE3 (exit 1 if one is bad); None when
    ``args.path`` names no snapshot."""
    from loader.store._inspect import is_store_dir, verify_snapshot

    source = _snapshot(args)
    if source is None:
        if is_store_dir(args.path):
            raise CheckpointError(args.path, "a chunk store: verify one of its snapshots, "
                                  "STORE/snapshots/NAME ('checkpoint inspect STORE' lists them)")
        return None
    try:
        report = verify_snapshot(source)
    finally:
        source.close()
    print("\n".join(report.lines()))
    return 0 if report.ok else 1
