"""Filling the host chunk cache off the fetch path (docs/REMOTE.md, "The cache on the
way").

A fetch call that GETs chunks hands each whole one to a :class:`CacheInserter`: the
bytes are copied into one of its slots (a bounded, reused set of chunk-sized buffers
in one anonymous mapping: no per-chunk heap object) and the call goes on.  One thread
of the inserter's own takes the queued chunks a batch at a time and puts them into the
cache with :meth:`ChunkCache.insert_many` (each hashed, written to a temporary file,
and renamed into place under one taking of the cache's lock), then frees their slots.

* **Never twice.**  A chunk is *pending* from the moment it is queued until its insert
  has landed (or failed).  A call that needs a pending chunk copies it from its slot
  (:meth:`read_into`, checked first, before the cache), so it is neither fetched nor
  queued again; a chunk offered while pending is not queued twice.
* **Bounded.**  When every slot is taken, a call of the sweep waits for one (the fill
  goes no faster than the cache takes chunks, and memory stays the slots'); an
  ``urgent`` call (a waiter's) never waits: a few slots are kept for urgent calls
  alone, and where none is free the chunk is not cached (counted in ``dropped``: a
  later restore fetches it again).
* **Shutdown.**  :meth:`close` stops taking chunks, lets the thread insert what is
  queued for at most ``timeout`` seconds, drops the rest (counted), and joins it.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._cache import ChunkCache

__all__ = ["DEFAULT_INSERT_BUFFER", "CacheInserter", "InserterStats"]

log = logging.getLogger("pageload")

#: the inserter's slots together (bytes): 512 chunks of 16 KiB
DEFAULT_INSERT_BUFFER = 8 << 20
#: chunks put into the cache per taking of its lock
BATCH = 64
#: the inserter's threads: a chunk's insert is mostly waiting on the file system
#: (creating its file), which several threads overlap
DEFAULT_INSERT_THREADS = 2


@dataclass(frozen=True, slots=True)
class InserterStats:
    slots: int  #: chunk-sized slots
    queued: int  #: chunks queued for the cache
    inserted: int  #: chunks the cache took
    failed: int  #: chunks the cache could not store (no space, an I/O error)
    wrong: int  #: chunks whose bytes did not hash to their checksum (never cached)
    dropped: int  #: chunks not cached: no slot for an urgent call, or left at shutdown
    served: int  #: reads answered from a pending chunk's slot
    waits: int  #: times a call of the sweep waited for a free slot
    waited_s: float  #: the time those waits took, together
    pending: int  #: chunks queued now

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CacheInserter:
    """Puts chunks of one checkpoint (``identity``, chunks of ``chunk_size`` bytes, the
    last one possibly shorter) into ``cache`` from a thread of its own; its slots hold
    ``capacity`` bytes (at least two chunks).  Thread-safe."""

    def __init__(self, cache: ChunkCache, identity: int, chunk_size: int,
                 capacity: int = DEFAULT_INSERT_BUFFER, threads: int = DEFAULT_INSERT_THREADS) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
        self.cache = cache
        self.identity = identity
        self.chunk_size = chunk_size
        self.slots = max(2, capacity // chunk_size)
        #: slots only urgent calls may take
        self.reserve = max(1, self.slots // 8)
        self._buffer = mmap.mmap(-1, self.slots * chunk_size)
        self._view = memoryview(self._buffer)
        self._free = list(range(self.slots - 1, -1, -1))
        #: chunk index -> (slot, length): queued or being inserted
        self._pending: dict[int, tuple[int, int]] = {}
        #: (chunk index, checksum, slot, length), in the order offered
        self._queue: deque[tuple[int, int, int, int]] = deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the thread: something queued, or closing
        self._room = threading.Condition(self._lock)  # the calls: a slot freed, or closing
        self._closing = False
        self._drain_until = float("inf")
        self._queued = self._inserted = self._failed = self._wrong = self._dropped = 0
        self._served = self._waits = 0
        self._waited_s = 0.0
        self._threads = [threading.Thread(target=self._run, name=f"pageload-cache-inserter-{n}", daemon=True)
                         for n in range(max(1, threads))]
        for thread in self._threads:
            thread.start()

    # -- the calls' side ----------------------------------------------------------------------

    def offer(self, k: int, checksum: int, data: memoryview, *, urgent: bool = False) -> bool:
        """Queue chunk ``k`` (its bytes ``data``, copied into a slot) for the cache.
        True if it is queued (or was already pending); False if it is not cached
        (closing, or no slot free for an urgent call).  A call of the sweep
        (``urgent`` False) waits for a slot while more than the reserve is taken."""
        length = len(data)
        if not 0 < length <= self.chunk_size:
            raise ValueError(f"a chunk is 1 to {self.chunk_size} bytes, not {length}")
        with self._lock:
            if k in self._pending:
                return True
            if self._closing:
                self._dropped += 1
                return False
            keep = 0 if urgent else self.reserve
            if len(self._free) <= keep:
                if urgent:
                    self._dropped += 1
                    return False
                self._waits += 1
                t0 = time.monotonic()
                while len(self._free) <= keep and not self._closing:
                    self._room.wait()
                self._waited_s += time.monotonic() - t0
                if self._closing:
                    self._dropped += 1
                    return False
                if k in self._pending:
                    return True
            slot = self._free.pop()
        at = slot * self.chunk_size
        self._view[at : at + length] = data
        with self._lock:
            if k in self._pending or self._closing:  # another call queued it meanwhile
                self._free.append(slot)
                self._room.notify()
                if k in self._pending:
                    return True
                self._dropped += 1
                return False
            self._pending[k] = (slot, length)
            self._queue.append((k, checksum, slot, length))
            self._queued += 1
            self._work.notify()
        return True

    def read_into(self, k: int, buffer: memoryview) -> bool:
        """Copy chunk ``k`` into ``buffer`` (its length exactly) if it is pending; True if
        it was.  (A chunk whose insert has landed is the cache's to read.)"""
        with self._lock:
            found = self._pending.get(k)
            if found is None:
                return False
            slot, length = found
            if len(buffer) != length:
                raise ValueError(f"chunk {k} is {length} bytes, not {len(buffer)}")
            at = slot * self.chunk_size
            buffer[:] = self._view[at : at + length]
            self._served += 1
        return True

    def stats(self) -> InserterStats:
        with self._lock:
            return InserterStats(self.slots, self._queued, self._inserted, self._failed, self._wrong,
                                 self._dropped, self._served, self._waits, round(self._waited_s, 6),
                                 len(self._pending))

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        c = self.chunk_size
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._work.wait()
                if self._closing and (not self._queue or time.monotonic() > self._drain_until):
                    left = len(self._queue)
                    self._work.notify_all()  # the other threads: closing too
                    for k, _, slot, _ in self._queue:
                        del self._pending[k]
                        self._free.append(slot)
                    self._queue.clear()
                    self._dropped += left
                    self._room.notify_all()
                    return
                # the queue shared out among the threads, at most a batch each
                share = -(-len(self._queue) // len(self._threads))
                batch = [self._queue.popleft() for _ in range(min(BATCH, share))]
            chunks = [(checksum, self._view[slot * c : slot * c + length]) for _, checksum, slot, length in batch]
            try:
                results: list[bool | None] = self.cache.insert_many(self.identity, chunks)
            except (OSError, ValueError) as exc:  # a cache gone bad (closed under us): not cached
                log.warning("chunk cache: inserts failed: %s", exc)
                results = [False] * len(batch)
            for view in chunks:
                view[1].release()
            del chunks
            with self._lock:
                for (k, _, slot, _), done in zip(batch, results):
                    if done is None:
                        self._wrong += 1
                    elif done:
                        self._inserted += 1
                    else:
                        self._failed += 1
                    del self._pending[k]
                    self._free.append(slot)
                self._room.notify_all()

    def close(self, timeout: float = 2.0) -> None:
        """Stop taking chunks; insert what is queued for at most ``timeout`` seconds,
        drop the rest; join the thread and unmap the slots.  Idempotent."""
        with self._lock:
            if not self._closing:
                self._closing = True
                self._drain_until = time.monotonic() + timeout
            self._work.notify_all()
            self._room.notify_all()
        deadline = time.monotonic() + timeout + 5
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):  # stuck in the file system: leave the slots mapped
            log.warning("chunk cache: the inserter did not stop in %.0f s", timeout + 5)
            return
        if not self._buffer.closed:
            self._view.release()
            self._buffer.close()
