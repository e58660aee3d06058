"""``store gc``: delete the chunks no snapshot references.

Safe against a concurrent ``create`` or ``push`` by a grace period on the chunk
objects' age (their mtime, or S3's LastModified): a writer puts its chunks before
its manifest, so until the manifest is there its chunks are unreferenced, but they
are young, and gc only deletes chunks older than ``grace`` seconds.  A writer that
finds a chunk already in the store and relies on it (deduplication) makes it young
first if it is older than half the grace (``touch`` locally, put again on S3), so an
old unreferenced chunk that a new snapshot takes up is not deleted under it either.
Before deleting, gc lists the manifests a second time (a snapshot finished
meanwhile keeps its chunks) and looks at each chunk's age once more.  The bound
this relies on: a ``create`` or ``push`` finishes within the grace period.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from .._files import CheckpointError
from .._units import human
from ._access import ChunkStore
from ._format import _NAME, CHUNKS_DIR, MAX_MANIFEST_BYTES, SNAPSHOTS_DIR, decode_manifest, hash_of_chunk_key

__all__ = ["DEFAULT_GRACE", "GcReport", "gc_store"]

DEFAULT_GRACE = 3600.0  #: seconds: a chunk younger than this is never deleted


@dataclass(frozen=True, slots=True)
class GcReport:
    store: str
    snapshots: int
    chunks: int  #: chunk objects found
    referenced: int  #: of them, named by a snapshot
    deleted: int  #: unreferenced and older than the grace: deleted (or, dry run, would be)
    deleted_bytes: int
    young: int  #: unreferenced but younger than the grace: kept
    temporaries: int  #: a writer's leftover temporary files removed (local stores)
    dry_run: bool
    seconds: float

    def line(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (f"gc {self.store}: {self.snapshots} snapshots reference {self.referenced} of {self.chunks} chunks; "
                f"{verb} {self.deleted} ({human(self.deleted_bytes)}), kept {self.young} younger than the grace"
                + (f", removed {self.temporaries} temporary files" if self.temporaries else "")
                + f"; {self.seconds:.2f} s")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _referenced(store: ChunkStore) -> tuple[set[str], int]:
    """The chunk keys the store's snapshots name, and how many snapshots there are.
    A manifest that cannot be read stops gc (what it names is unknown)."""
    keys: set[str] = set()
    count = 0
    for entry in store.listing(f"{SNAPSHOTS_DIR}/"):
        name = entry.key[len(SNAPSHOTS_DIR) + 1 :]
        if "/" in name or not _NAME.fullmatch(name):
            continue  # not a snapshot name: never read as one
        try:
            m = decode_manifest(store.get(entry.key, MAX_MANIFEST_BYTES), store.url_of(entry.key))
        except CheckpointError as exc:
            raise CheckpointError(exc.path, f"{exc.problem}; gc stopped: it cannot know what this snapshot "
                                  "references (remove or repair it first)") from None
        keys.update(m.unique_keys())
        count += 1
    return keys, count


def gc_store(store: ChunkStore, *, grace: float = DEFAULT_GRACE, dry_run: bool = False) -> GcReport:
    """Delete the chunks of ``store`` that no snapshot references and that are older than
    ``grace`` seconds (see the module's docstring)."""
    if grace < 0:
        raise ValueError(f"grace must be 0 or more, not {grace}")
    started = time.perf_counter()
    referenced, snapshots = _referenced(store)
    cutoff = time.time() - grace
    chunks = [e for e in store.listing(f"{CHUNKS_DIR}/") if hash_of_chunk_key(e.key) is not None]
    unreferenced = [e for e in chunks if e.key not in referenced]
    old = [e for e in unreferenced if e.mtime < cutoff]
    if old:  # snapshots finished while we listed keep their chunks
        again, snapshots = _referenced(store)
        referenced |= again
        old = [e for e in old if e.key not in referenced]
    deleted = deleted_bytes = 0
    for e in old:
        if not dry_run:
            when = store.mtime(e.key)  # touched (taken up by a writer) since it was listed?
            if when is None or when >= cutoff:
                continue
            store.delete(e.key)
        deleted += 1
        deleted_bytes += e.size
    temporaries = store.stale_temporaries(cutoff)
    if not dry_run:
        for key in temporaries:
            store.delete(key)
    return GcReport(store.where, snapshots, len(chunks), len(referenced & {e.key for e in chunks}), deleted,
                    deleted_bytes, len(unreferenced) - len([e for e in unreferenced if e.mtime < cutoff]),
                    len(temporaries), dry_run, time.perf_counter() - started)
