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
from loader.store import DEFAULT_CHUNK_SIZE as DEFAULT_STORE_CHUNK_SIZE
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
        "create", help="convert a raw image into a pages checkpoint, or into a snapshot in a chunk store (--name)",
        description="Without --name: convert IMAGE into a pages checkpoint directory OUT (zero pages dropped). "
        "With --name: write IMAGE into the chunk store OUT (a directory, file:///DIR or s3://BUCKET/PREFIX) as "
        "OUT/snapshots/NAME: fixed-size chunks, content-addressed by BLAKE3, compressed; all-zero chunks are not "
        "stored, only the chunks the store lacks are written, and the manifest goes last (docs/FORMAT.md, "
        "section 3).  With --parent, IMAGE is a Firecracker diff snapshot over that snapshot.",
    )
    p.add_argument("image", metavar="IMAGE", help="raw memory image (sparse files welcome); with --parent, a "
                   "Firecracker diff snapshot (its data extents are the dirtied pages)")
    p.add_argument("out", metavar="OUT", help="checkpoint directory to create (must not exist); with --name, the "
                   "store")
    add_size(p, "--page-size", default=4096, help="page size")
    add_size(p, "--chunk-size", default=None,
             help="pages checkpoint: bytes of pages.img per checksum (default 16K): a client's wait reads and hashes "
             "its whole chunk before it is served, so smaller is faster to fault; each chunk costs 8 bytes of index "
             "and of the restoring daemon's memory.  Store: bytes of memory per chunk, a power of two from 64K to "
             f"64M (default {DEFAULT_STORE_CHUNK_SIZE >> 20}M; a layer takes its parent's)")
    p.add_argument(
        "--working-set", metavar="FILE",
        help="a working set recorded on IMAGE ('pageload restore IMAGE --record-working-set'): its "
        "pages go first in pages.img, in replay order, so replay is one sequential read; it is "
        "copied into OUT/working-set.msgpack for the new checkpoint",
    )
    store = p.add_argument_group("chunk store (with --name)")
    store.add_argument("--name", metavar="NAME", default=None,
                       help="write a snapshot NAME into the store OUT (1-128 of A-Z a-z 0-9 . _ -)")
    store.add_argument("--compress", metavar="CODEC", default="zstd",
                       help="zstd (level 3), zstd:LEVEL (negative: faster), lz4 (decodes faster, compresses "
                       "less) or none (default zstd); a chunk that does not get smaller is stored as it is")
    store.add_argument("--parent", metavar="NAME", default=None,
                       help="IMAGE is a Firecracker diff snapshot over snapshot NAME of the same store: the new "
                       "snapshot is NAME's chunks with the dirtied ones rebuilt")
    store.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="chunks hashed, compressed and put at once (default: the CPUs, at most 8); memory is "
                       "about 2 chunks per thread")
    store.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_s3_endpoint(store)
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
        "push", help="upload a pages checkpoint to object storage, or copy a chunk-store snapshot to another store",
        description="CKPT a pages checkpoint: upload it as it is: PREFIX/pages.img (a multipart upload when it is "
        "bigger than one part), PREFIX/working-set.msgpack if the checkpoint has one, then PREFIX/index.msgpack "
        "last, so that a checkpoint pushed halfway is never restorable.  CKPT a snapshot in a chunk store "
        "(STORE/snapshots/NAME, or STORE/NAME where that is unambiguous): copy it into the store URL (a directory, "
        "file:///DIR or s3://BUCKET/PREFIX), only the chunks it lacks (each checked on the way), the manifest last.  "
        "Endpoint and credentials: "
        "--s3-endpoint or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_REGION (default "
        "us-east-1); requests are path-style.  See docs/REMOTE.md and docs/FORMAT.md, section 3.",
    )
    p.add_argument("checkpoint", metavar="CKPT",
                   help="pages checkpoint directory (made by 'checkpoint create'), or its index.msgpack; or a "
                   "snapshot, STORE/snapshots/NAME (STORE a directory, file:///DIR or s3://BUCKET/PREFIX)")
    p.add_argument("url", metavar="URL", help="where to put it: s3://BUCKET/PREFIX or file:///DIR; for a snapshot, "
                   "the destination store (a directory too)")
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
    if args.name is not None:
        return _create_snapshot(args)
    for flag, value in (("--parent", args.parent), ("--s3-endpoint", args.s3_endpoint), ("--threads", args.threads),
                        ("--json", args.json or None), ("--compress", None if args.compress == "zstd" else 1)):
        if value is not None:
            raise CheckpointError(args.out, f"{flag} is for a snapshot in a chunk store: give --name NAME")
    report = create_checkpoint(
        args.image, args.out, page_size=args.page_size,
        chunk_size=DEFAULT_CHUNK_SIZE if args.chunk_size is None else args.chunk_size,
        working_set=args.working_set,
    )
    print("\n".join(report.lines()))
    return EXIT_OK


def _create_snapshot(args: argparse.Namespace) -> int:
    from loader.store._write import create_snapshot

    if args.working_set is not None:
        raise CheckpointError(args.working_set, "--working-set is for a pages checkpoint, not a chunk store")
    try:
        report = create_snapshot(
            args.image, args.out, args.name, codec=args.compress,
            chunk_size=DEFAULT_STORE_CHUNK_SIZE if args.chunk_size is None else args.chunk_size,
            page_size=args.page_size, parent=args.parent, threads=args.threads, endpoint=args.s3_endpoint,
        )
    except ValueError as exc:  # --compress, --name
        raise CheckpointError(args.out, str(exc)) from None
    print(json.dumps(report.as_dict()) if args.json else report.line())
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


def _snapshot_ref(ref: str) -> tuple[str, str] | None:
    """(STORE, NAME) where ``ref`` names a snapshot in a chunk store; None for a pages checkpoint.
    STORE/snapshots/NAME is a snapshot when it is a URL, or a local file holding a manifest;
    STORE/NAME too, when it is not there itself but STORE/snapshots/NAME is."""
    from loader.store import looks_like_manifest, split_snapshot_ref

    def manifest_file(path: str) -> bool:
        try:
            with open(path, "rb") as f:
                return os.path.isfile(path) and looks_like_manifest(f.read(64))
        except OSError:
            return False

    split = split_snapshot_ref(ref)
    is_url = "://" in ref
    if split is not None and (is_url or manifest_file(ref)):
        return split
    head, _, name = ref.rstrip("/").rpartition("/")
    if head and name and (is_url or (not os.path.exists(ref) and manifest_file(f"{head}/snapshots/{name}"))):
        try:
            from loader.store import check_snapshot_name

            return head, check_snapshot_name(name)
        except ValueError:
            return None
    return None


def _push_snapshot(args: argparse.Namespace, store: str, name: str) -> int:
    from loader.store._access import open_store
    from loader.store._write import push_snapshot

    source = open_store(store, endpoint=args.s3_endpoint)
    dest = open_store(args.url, endpoint=args.s3_endpoint, create=True)
    report = push_snapshot(source, name, dest, threads=args.concurrency)
    print(report.line())
    return EXIT_OK


def _push(args: argparse.Namespace) -> int:
    from loader.checkpoint._index import INDEX_NAME, PAGES_NAME
    from loader.remote import ObjectStore, StoreError

    snapshot = _snapshot_ref(args.checkpoint)
    if snapshot is not None:
        return _push_snapshot(args, *snapshot)
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
