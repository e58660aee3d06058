"""``pageload checkpoint create|inspect|verify|push|sample``: checkpoint files from the shell.

Bad input (a malformed index, a missing file, an image of the wrong size) is
reported as one line, ``pageload: <path>: <problem>``, on stderr with exit code 2;
never a traceback.  ``verify`` exits 1 when it finds corruption.  ``inspect`` and
``verify`` take a checkpoint in a store too (``s3://``, ``file://``).  ``push`` uploads
a pages checkpoint to object storage, its index last (docs/REMOTE.md); any failure
there is one line and exit code 2 too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from loader import human
from loader.checkpoint import (
    DEFAULT_CHUNK_SIZE,
    CheckpointError,
    create_checkpoint,
    describe_checkpoint,
    format_inspection,
    inspect_checkpoint,
    open_checkpoint,
    verify_checkpoint,
)
from loader.core._workingset import DEFAULT_NAME as WORKING_SET_NAME
from loader.source import RemoteConfig, RemoteSource, is_store_url
from workloads import make_sample_image

from ._args import add_s3_endpoint, add_size, positive_int
from ._snapshots import inspect_store, verify_store

__all__ = ["register"]

EXIT_OK, EXIT_CORRUPT, EXIT_BAD_INPUT = 0, 1, 2

#: multipart upload parts: S3's bounds (at least 5 MiB but the last, at most 10000
#: parts of at most 5 GiB), and our default
_MIN_PART, _MAX_PART, _MAX_PARTS, _PART = 5 << 20, 5 << 30, 10_000, 16 << 20


def register(subparsers: Any) -> None:
    """Add ``checkpoint`` and its sub-commands to the ``pageload`` parser."""
    parser = subparsers.add_parser(
        "checkpoint",
        help="create, inspect, verify and push checkpoints; make sample images",
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
        "path", metavar="PATH", help="checkpoint directory, its index.msgpack, a raw image, a pages "
        "checkpoint in object storage: s3://BUCKET/PREFIX or file:///DIR (its index GET, its pages HEAD), "
        "a snapshot in a chunk store, STORE/snapshots/NAME (its manifest and its parents': sizes, chunks, "
        "stored bytes, ratio, codecs, parent chain), or a local store directory (its snapshots)"
    )
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    add_s3_endpoint(p)
    p.set_defaults(func=_guarded(_inspect))

    p = sub.add_parser("verify", help="check every checksum; exit 1 if data is corrupt")
    p.add_argument("path", metavar="PATH", help="checkpoint directory or its index.msgpack, or s3://BUCKET/PREFIX "
                   "or file:///DIR (every byte of its pages GET, nothing cached), or a snapshot in a chunk "
                   "store, STORE/snapshots/NAME (every chunk read from the store, decompressed, its BLAKE3 "
                   "checked)")
    add_s3_endpoint(p)
    p.set_defaults(func=_guarded(_verify))

    p = sub.add_parser(
        "push", help="upload a pages checkpoint to object storage (s3://, file://), its index last",
        description="Upload a pages checkpoint as it is: PREFIX/pages.img (a multipart upload when it is "
        "bigger than one part), PREFIX/working-set.msgpack if the checkpoint has one, then PREFIX/index.msgpack "
        "last, so that a checkpoint pushed halfway is never restorable.  Endpoint and credentials: "
        "--s3-endpoint or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_REGION (default "
        "us-east-1); requests are path-style.  See docs/REMOTE.md.",
    )
    p.add_argument("checkpoint", metavar="CKPT",
                   help="pages checkpoint directory (made by 'checkpoint create'), or its index.msgpack")
    p.add_argument("url", metavar="URL", help="where to put it: s3://BUCKET/PREFIX or file:///DIR")
    add_s3_endpoint(p)
    add_size(p, "--part-size", default=None,
             help=f"bytes per part of a multipart upload, at least {_MIN_PART >> 20}M (default: {_PART >> 20}M, "
             "or bigger where the file needs more than 10000 parts)")
    p.add_argument("--concurrency", type=positive_int, default=4, metavar="N",
                   help="parts uploaded at once; memory is about N parts (default 4)")
    p.add_argument("--replace", action="store_true",
                   help="replace a checkpoint already at URL: its index is deleted first, so it is not "
                   "restorable until the new index is in place (default: refuse)")
    p.set_defaults(func=_guarded(_push))

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


def _remote_source(args: argparse.Namespace) -> RemoteSource | None:
    """The checkpoint in a store ``args.path`` names, open (no chunk cache); None for a local path."""
    if not is_store_url(args.path):
        if args.s3_endpoint:
            raise CheckpointError(args.path, "--s3-endpoint is for a checkpoint in a store (s3://, file://)")
        return None
    return RemoteSource.open(args.path, remote=RemoteConfig(endpoint=args.s3_endpoint, cache=False))


def _inspect(args: argparse.Namespace) -> int:
    done = inspect_store(args)  # a snapshot in a chunk store, or a store directory
    if done is not None:
        return done
    source = _remote_source(args)
    if source is not None:
        try:
            info = describe_checkpoint(source.checkpoint())
        finally:
            source.close()
    else:
        info = inspect_checkpoint(args.path)
    print(json.dumps(info, sort_keys=False) if args.json else "\n".join(format_inspection(info)))
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    done = verify_store(args)  # a snapshot in a chunk store
    if done is not None:
        return done
    source = _remote_source(args)
    if source is not None:
        try:
            report = source.verify()
        finally:
            source.close()
    else:
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


def _part_size(chosen: int | None, size: int) -> int:
    """The multipart part size for a ``size``-byte file: ``chosen``, checked, or the
    default raised (in whole MiB) until 10000 parts hold the file."""
    if chosen is None:
        mib = 1 << 20
        return max(_PART, -(-size // _MAX_PARTS // mib) * mib)
    if not _MIN_PART <= chosen <= _MAX_PART:
        raise ValueError(f"--part-size {chosen}: S3 parts are {_MIN_PART >> 20} MiB to {_MAX_PART >> 30} GiB")
    if -(-size // chosen) > _MAX_PARTS:
        raise ValueError(f"--part-size {chosen}: {human(size)} needs more than {_MAX_PARTS} parts of it")
    return chosen


def _push(args: argparse.Namespace) -> int:
    from loader.checkpoint._index import INDEX_NAME, PAGES_NAME
    from loader.remote import ObjectStore, StoreError

    ckpt = open_checkpoint(args.checkpoint, scan=False)
    if ckpt.kind != "pages" or ckpt.index_path is None:
        raise CheckpointError(args.checkpoint, "a raw image, not a pages checkpoint: push a pages checkpoint "
                              "('pageload checkpoint create IMAGE DIR' makes one)")
    working_set = os.path.join(os.path.dirname(ckpt.index_path), WORKING_SET_NAME)
    has_working_set = os.path.isfile(working_set)
    try:
        part = _part_size(args.part_size, ckpt.pages_size)
    except ValueError as exc:
        _fail(str(exc))
        return EXIT_BAD_INPUT
    started = time.monotonic()
    try:
        store = ObjectStore(args.url, endpoint=args.s3_endpoint, create=True)
        # before any upload: the endpoint answers, the credentials hold, and no checkpoint is there
        try:
            store.head(INDEX_NAME)
            there = True
        except StoreError as exc:
            if exc.code != "not-found":
                raise
            there = False
        if there and not args.replace:
            _fail(f"{store.url.url_of(INDEX_NAME)}: a checkpoint is already there: push to another prefix, "
                  "or --replace it")
            return EXIT_BAD_INPUT
        if there:  # unrestorable from now until the new index is in place
            store.delete(INDEX_NAME)
            if not has_working_set:
                store.delete(WORKING_SET_NAME)
        pushed = store.put_file(PAGES_NAME, ckpt.pages_path, part, concurrency=args.concurrency)
        if pushed != ckpt.pages_size:
            _fail(f"{ckpt.pages_path}: changed while it was pushed ({pushed} bytes, not {ckpt.pages_size}): "
                  "the index was not pushed")
            return EXIT_BAD_INPUT
        if has_working_set:
            store.put_file(WORKING_SET_NAME, working_set, part)
        index_size = store.put_file(INDEX_NAME, ckpt.index_path, part)  # last: now it is restorable
    except StoreError as exc:
        _fail(str(exc))
        return EXIT_BAD_INPUT
    took = time.monotonic() - started
    parts = -(-pushed // part)
    how = f"{parts} parts of {human(part)}" if pushed > part else "one PUT"
    print(f"pushed {args.checkpoint} to {store.url}: {PAGES_NAME} {human(pushed)} ({how})"
          + (f", {WORKING_SET_NAME}" if has_working_set else "")
          + f", then {INDEX_NAME} {human(index_size)}; {took:.1f} s ({human(pushed / max(took, 1e-9))}/s)")
    return EXIT_OK
