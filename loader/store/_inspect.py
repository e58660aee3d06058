"""``checkpoint inspect`` and ``checkpoint verify`` of chunk stores (docs/FORMAT.md,
"Inspecting and verifying a store"): a snapshot described from its manifest (sizes,
chunks, stored bytes and ratio, codec mix, its parent chain and what it shares with
its parent), a snapshot verified chunk by chunk (every chunk fetched, decompressed
and its BLAKE3 checked, as a restore does, and its xxh3 against the manifest's), and
a store directory's snapshots listed."""

from __future__ import annotations

import errno
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash

from .._files import CheckpointError
from .._memfile import private_mapping
from .._units import human
from ._format import (
    CODEC_NAMES,
    MAX_MANIFEST_BYTES,
    SNAPSHOTS_DIR,
    decode_manifest,
    looks_like_manifest,
    manifest_digest,
)

if TYPE_CHECKING:
    from ..source._store import StoreSource

__all__ = ["StoreVerifyReport", "describe_snapshot", "format_snapshot", "format_store", "list_store",
           "verify_snapshot"]

#: a parent chain longer than this is cut short (and said to be)
MAX_CHAIN = 64


def describe_snapshot(source: StoreSource) -> dict[str, Any]:
    """What ``checkpoint inspect STORE/snapshots/NAME`` says (reads manifests only: this
    one, and its ancestors' in the same store)."""
    m = source.manifest
    by_codec: dict[str, dict[str, int]] = {}
    for i in range(len(m)):
        entry = by_codec.setdefault(CODEC_NAMES.get(m.codecs[i], str(m.codecs[i])), {"chunks": 0, "stored_bytes": 0,
                                                                                      "bytes": 0})
        entry["chunks"] += 1
        entry["stored_bytes"] += m.stored_lengths[i]
        entry["bytes"] += m.lengths[i]
    hashes = {m.hash_at(i) for i in range(len(m))}
    data, stored = m.data_bytes, m.stored_bytes
    info: dict[str, Any] = {
        "path": source.ref,
        "kind": "store snapshot",
        "store": source.store,
        "name": source.name,
        "memory_size": m.memory_size,
        "page_size": m.page_size,
        "chunk_size": m.chunk_size,
        "chunks": len(m),
        "unique_chunks": len(hashes),
        "data_bytes": data,
        "zero_bytes_skipped": m.memory_size - data,
        "stored_bytes": stored,
        "ratio": round(data / stored, 3) if stored else None,
        "codecs": by_codec,
        "hash": "blake3",
        "digest": source.digest.hex(),
        "identity": f"{source.identity().digest:#018x}",
        "created": m.created,
        "source": m.source,
        "parent": m.parent,
        "parent_digest": m.parent_digest.hex() if m.parent_digest is not None else None,
    }
    chain: list[dict[str, Any]] = []
    shared: dict[str, Any] | None = None
    name, want = m.parent, m.parent_digest
    seen = {source.name}
    while name is not None and len(chain) < MAX_CHAIN:
        if name in seen:
            chain.append({"name": name, "status": "a cycle: named again"})
            break
        seen.add(name)
        raw = source.read_manifest(name)
        if raw is None:
            chain.append({"name": name, "status": "missing"})
            break
        try:
            parent = decode_manifest(raw, f"{source.store}/{SNAPSHOTS_DIR}/{name}")
        except CheckpointError as exc:
            chain.append({"name": name, "status": f"unreadable: {exc.problem}"})
            break
        ok = want is not None and manifest_digest(raw) == want
        chain.append({"name": name, "status": "ok" if ok else "replaced (its digest is not the one recorded)",
                      "chunks": len(parent), "stored_bytes": parent.stored_bytes})
        if shared is None:  # the first parent: what this snapshot shares with it
            theirs = {parent.hash_at(i) for i in range(len(parent))}
            rows = [i for i in range(len(m)) if m.hash_at(i) in theirs]
            new = len(m) - len(rows)
            shared = {"chunks": len(rows), "new_chunks": new,
                      "new_stored_bytes": stored - sum(m.stored_lengths[i] for i in rows)}
        name, want = parent.parent, parent.parent_digest
    if name is not None and len(chain) >= MAX_CHAIN:
        chain.append({"name": name, "status": f"not followed (more than {MAX_CHAIN} ancestors)"})
    info["parent_chain"] = chain
    info["shared_with_parent"] = shared
    return info


def format_snapshot(info: dict[str, Any]) -> list[str]:
    """:func:`describe_snapshot`'s dict as lines."""
    codecs = ", ".join(f"{name} {v['chunks']} ({human(v['stored_bytes'])})" for name, v in info["codecs"].items())
    ratio = f"{info['ratio']:.2f}x" if info["ratio"] else "-"
    lines = [
        f"{info['path']}: snapshot {info['name']!r} in chunk store {info['store']}",
        f"  memory size        {human(info['memory_size'])} ({info['memory_size']} bytes, "
        f"{info['page_size']}-byte pages)",
        f"  data               {human(info['data_bytes'])} in {info['chunks']} chunks of "
        f"{human(info['chunk_size'])} ({info['unique_chunks']} distinct)",
        f"  zero, not stored   {human(info['zero_bytes_skipped'])}",
        f"  stored             {human(info['stored_bytes'])} (ratio {ratio}); codecs: {codecs or 'none'}",
        f"  digest             blake3 {info['digest']} (identity xxh3 {info['identity']})",
    ]
    if info["parent"] is None:
        lines.append("  parent             none (a base snapshot)")
    else:
        chain = " <- ".join(f"{p['name']}" + ("" if p["status"] == "ok" else f" ({p['status']})")
                            for p in info["parent_chain"])
        lines.append(f"  parent chain       {chain}")
        shared = info["shared_with_parent"]
        if shared is not None:
            lines.append(f"  over its parent    {shared['new_chunks']} new chunks ({human(shared['new_stored_bytes'])} "
                         f"stored), {shared['chunks']} shared")
    if info["source"]:
        lines.append(f"  source             {info['source']}")
    return lines


def list_store(root: str, *, endpoint: str | None = None, listing: list[Any] | None = None) -> dict[str, Any]:
    """A store's snapshots (``checkpoint inspect STORE``: a local directory, ``file://``
    or ``s3://``): each one's name, memory size, chunks, stored bytes, ratio and parent;
    a manifest that does not decode is listed with its problem.  ``listing``: the
    store's ``snapshots/`` already listed (:func:`store_snapshots`)."""
    from ._access import open_store

    store = open_store(root, endpoint=endpoint)
    entries = listing if listing is not None else store.listing(SNAPSHOTS_DIR + "/")
    snapshots: list[dict[str, Any]] = []
    for entry in sorted(entries, key=lambda e: e.key):
        name = entry.key[len(SNAPSHOTS_DIR) + 1 :]
        if not name or "/" in name or name.startswith("."):
            continue
        where = store.url_of(entry.key)
        try:
            m = decode_manifest(store.get(entry.key, MAX_MANIFEST_BYTES), where)
        except CheckpointError as exc:
            snapshots.append({"name": name, "problem": str(exc)})
            continue
        stored = m.stored_bytes
        snapshots.append({"name": name, "memory_size": m.memory_size, "chunks": len(m), "stored_bytes": stored,
                          "ratio": round(m.data_bytes / stored, 3) if stored else None, "parent": m.parent,
                          "created": m.created})
    return {"path": root, "kind": "chunk store", "snapshots": snapshots}


def store_snapshots(url: str, *, endpoint: str | None = None) -> list[Any] | None:
    """The objects under a store URL's ``snapshots/`` (one listing), or None where there
    are none: the URL is not a chunk store's root (it may be a pages checkpoint)."""
    from ._access import open_store

    entries = open_store(url, endpoint=endpoint).listing(SNAPSHOTS_DIR + "/")
    return entries or None


def format_store(info: dict[str, Any]) -> list[str]:
    lines = [f"{info['path']}: chunk store, {len(info['snapshots'])} snapshots"]
    for s in info["snapshots"]:
        if "problem" in s:
            lines.append(f"  {s['name']}: {s['problem']}")
            continue
        ratio = f"{s['ratio']:.2f}x" if s["ratio"] else "-"
        parent = f", parent {s['parent']}" if s["parent"] else ""
        lines.append(f"  {s['name']}: memory {human(s['memory_size'])}, {s['chunks']} chunks, "
                     f"{human(s['stored_bytes'])} stored ({ratio}){parent}")
    return lines


def is_store_dir(path: str) -> bool:
    """A local directory that holds ``snapshots/`` and ``chunks/``."""
    return os.path.isdir(os.path.join(path, SNAPSHOTS_DIR)) and os.path.isdir(os.path.join(path, "chunks"))


def looks_like_snapshot_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return looks_like_manifest(f.read(64))
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class BadStoreChunk:
    row: int
    memory_offset: int
    length: int
    key: str
    problem: str

    def describe(self) -> str:
        return f"chunk {self.row} (memory {self.memory_offset:#x}+{self.length:#x}, {self.key}): {self.problem}"


@dataclass(frozen=True, slots=True)
class StoreVerifyReport:
    """What :func:`verify_snapshot` found; ``ok`` is False only if a chunk is bad."""

    path: str
    chunks: int
    bytes_checked: int  #: uncompressed
    stored_bytes: int
    bad_chunks: tuple[BadStoreChunk, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.bad_chunks

    def lines(self) -> list[str]:
        if self.ok:
            return [f"{self.path}: ok: {self.chunks} chunks, {human(self.bytes_checked)} checked (BLAKE3, from "
                    f"{human(self.stored_bytes)} stored) in {self.seconds:.2f} s"]
        return [f"{self.path}: CORRUPT: {len(self.bad_chunks)} of {self.chunks} chunks",
                *(f"  {b.describe()}" for b in self.bad_chunks)]


def verify_snapshot(source: StoreSource, *, threads: int = 4) -> StoreVerifyReport:
    """Every chunk of the snapshot read from its store (never the cache), decompressed
    and its BLAKE3 checked, and its xxh3 against the manifest's, ``threads`` at once.
    A chunk missing, of the wrong size or bytes is reported bad; the store failing
    otherwise (unreachable, denied) raises :class:`CheckpointError`."""
    from ._read import ChunkFailure, ChunkReader

    m = source.manifest
    started = time.perf_counter()
    reader = ChunkReader(source.reader.chunks, max_stored=source.reader.max_stored, chunk_size=m.chunk_size)
    local = threading.local()
    n = len(m)

    def check(lo: int, hi: int) -> list[BadStoreChunk]:
        buffer = getattr(local, "buffer", None)
        if buffer is None:
            buffer = local.buffer = private_mapping(m.chunk_size)
        bad = []
        for i in range(lo, hi):
            length = m.lengths[i]
            dest = memoryview(buffer)[:length]
            problem = None
            try:
                reader.read(m.hash_at(i), length, m.stored_lengths[i], m.codecs[i], dest)
            except ChunkFailure as exc:
                if exc.errno not in (errno.EBADMSG, errno.ENOENT):
                    raise CheckpointError(source.reader.chunks.where(m.key_at(i)), exc.message) from None
                problem = exc.message.split(": ", 1)[-1]
            else:
                if xxhash.xxh3_64_intdigest(dest) != m.xxh3[i]:
                    problem = f"its bytes verify (BLAKE3) but the manifest's xxh3 {m.xxh3[i]:#018x} is not theirs"
            dest.release()
            if problem is not None:
                bad.append(BadStoreChunk(i, m.offsets[i], length, m.key_at(i), problem))
        return bad

    step = max(1, -(-n // (threads * 8)))
    bad: list[BadStoreChunk] = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for found in pool.map(lambda lo: check(lo, min(lo + step, n)), range(0, n, step)):
            bad.extend(found)
    return StoreVerifyReport(source.ref, n, m.data_bytes, m.stored_bytes, tuple(bad), time.perf_counter() - started)
