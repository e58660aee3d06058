"""Filling the host chunk cache off the fetch path (docs/REMOTE.md, "The cache on the
way").

The cache keeps a remote checkpoint's chunks a *block* at a time (``BLOCK_BYTES``,
1 MiB of its pages file: 64 chunks of 16 KiB; ``_cache.py``).  A fetch call that GETs
chunks hands them to a :class:`CacheInserter`: they are copied into their block's
slot (a bounded, reused set of block-sized buffers in one anonymous mapping: no
per-chunk heap object), or GET straight into it (:meth:`CacheInserter.claim`), and
the call goes on.  Once a block's slot holds all its chunks the block is queued, and
threads of the inserter's own take the queued blocks a batch at a time and put them
into the cache with :meth:`ChunkCache.insert_blocks` (each block's chunks hashed, the
block written to a temporary file, and renamed into place under one taking of the
cache's lock), then free their slots.

* **Never twice.**  A chunk is *held* from the moment its bytes are in a slot until
  its block's insert has landed (or failed, or the slot was given up).  A call that
  needs a held chunk copies it from its slot (:meth:`read_into`, checked first,
  before the cache), so it is neither fetched nor copied in again.
* **Bounded.**  When every slot is taken, a call of the sweep first gives up the
  oldest block still missing chunks (no call writing into it), then waits for a slot
  (the fill goes no faster than the cache takes blocks, and memory stays the
  slots'); an ``urgent`` call (a waiter's) never waits: a slot is kept for urgent
  calls alone, and where none is free its chunks are not cached (counted in
  ``dropped``).  A block given up is not cached: a later restore fetches it again
  (the sweep's calls fetch their blocks whole, so this is a waiter's block the sweep
  has not come to).
* **Shutdown.**  :meth:`close` stops taking chunks, lets the threads insert what is
  queued for at most ``timeout`` seconds, drops the rest (counted), and joins them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .._memfile import private_mapping

if TYPE_CHECKING:
    from ._cache import ChunkCache

__all__ = ["DEFAULT_INSERT_BUFFER", "CacheInserter", "InserterStats"]

log = logging.getLogger("pageload")

#: the inserter's slots together (bytes): 4 blocks of 1 MiB (8 held 5 MiB more at a cold
#: fill's peak, and filled no faster: docs/MEASUREMENTS.md, "RSS outside the memory file")
DEFAULT_INSERT_BUFFER = 4 << 20
#: blocks put into the cache per taking of its lock
BATCH = 4
#: the inserter's threads: a block's insert is mostly waiting on the file system
#: (creating its file, writing it), which several threads overlap
DEFAULT_INSERT_THREADS = 2

_FREE, _FILLING, _QUEUED = 0, 1, 2


@dataclass(frozen=True, slots=True)
class InserterStats:
    slots: int  #: block-sized slots
    block_bytes: int  #: a block's bytes (its last one may be shorter)
    queued: int  #: blocks queued for the cache (all their chunks in)
    inserted: int  #: blocks the cache took
    failed: int  #: blocks the cache could not store (no space, an I/O error)
    wrong: int  #: blocks with a chunk whose bytes did not hash to its checksum (never cached)
    dropped: int  #: blocks not cached: given up before they were whole, no slot for an urgent call, left at shutdown
    served: int  #: chunk reads answered from a slot
    waits: int  #: times a call of the sweep waited for a free slot
    waited_s: float  #: the time those waits took, together
    pending: int  #: blocks in slots now (filling or queued)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CacheInserter:
    """Puts blocks of one checkpoint (``identity``; chunks of ``chunk_size`` bytes with
    checksums ``sums``, in a pages file of ``size`` bytes; ``block_chunks`` chunks a
    block) into ``cache`` from threads of its own; its slots hold ``capacity`` bytes
    (at least two blocks).  Thread-safe."""

    def __init__(self, cache: ChunkCache, identity: int, chunk_size: int, sums: Sequence[int], size: int,
                 block_chunks: int, capacity: int = DEFAULT_INSERT_BUFFER,
                 threads: int = DEFAULT_INSERT_THREADS) -> None:
        if chunk_size < 1 or block_chunks < 1:
            raise ValueError(f"chunk_size and block_chunks must be at least 1, not {chunk_size}, {block_chunks}")
        self.cache = cache
        self.identity = identity
        self.chunk_size = chunk_size
        self.sums = sums
        self.size = size
        self.block_chunks = block_chunks
        self.block_bytes = block_chunks * chunk_size
        self.slots = max(2, capacity // self.block_bytes)
        #: slots only urgent calls may take
        self.reserve = max(1, self.slots // 8)
        self._buffer = private_mapping(self.slots * self.block_bytes)
        self._view = memoryview(self._buffer)
        self._free = list(range(self.slots - 1, -1, -1))
        #: per slot: its block, its state, the chunks in (a bit each), calls writing into
        #: it, when it was taken (for giving up the oldest)
        self._block = [-1] * self.slots
        self._state = [_FREE] * self.slots
        self._bits = [0] * self.slots
        self._writers = [0] * self.slots
        self._since = [0.0] * self.slots
        #: block -> its slot (filling or queued)
        self._pending: dict[int, int] = {}
        #: slots whose blocks are whole, in the order they became so
        self._queue: deque[int] = deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the threads: something queued, or closing
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

    # -- geometry -------------------------------------------------------------------------------

    def block_span(self, block: int) -> tuple[int, int]:
        """The block's first chunk and its chunks' count."""
        first = block * self.block_chunks
        return first, min(self.block_chunks, -(-self.size // self.chunk_size) - first)

    def _full(self, block: int) -> int:
        return (1 << self.block_span(block)[1]) - 1

    # -- the calls' side ----------------------------------------------------------------------

    def held(self, block: int) -> int:
        """The chunks of ``block`` in a slot now, as bits (bit j: the block's chunk j)."""
        with self._lock:
            slot = self._pending.get(block)
            return 0 if slot is None else self._bits[slot]

    def claim(self, block: int, *, urgent: bool = False) -> memoryview | None:
        """The slot of ``block`` (all its bytes, from the block's start), to put chunks
        into; every claim is followed by :meth:`filled`.  None where its chunks are
        not taken (closing, the block whole already, or no slot for an urgent call).
        A call of the sweep gives up the oldest unfinished block, or waits, for a slot."""
        with self._lock:
            slot = self._pending.get(block)
            if slot is None:
                slot = self._take(urgent)
                if slot is None:
                    return None
                if block in self._pending:  # another call took one for it meanwhile
                    self._release(slot)
                    slot = self._pending[block]
                else:
                    self._pending[block] = slot
                    self._block[slot], self._state[slot], self._bits[slot] = block, _FILLING, 0
                    self._since[slot] = time.monotonic()
            if self._state[slot] != _FILLING:
                return None
            self._writers[slot] += 1
        at = slot * self.block_bytes
        first, count = self.block_span(block)
        return self._view[at : at + min(self.block_bytes, self.size - first * self.chunk_size)]

    def filled(self, block: int, k0: int, k1: int) -> None:
        """After :meth:`claim`: chunks ``k0..k1`` of the pages file (of ``block``; none
        where ``k1 < k0``) are in its slot; the block is queued once it is whole."""
        with self._lock:
            slot = self._pending[block]
            self._writers[slot] -= 1
            if k1 >= k0:
                first = block * self.block_chunks
                self._bits[slot] |= ((1 << (k1 - k0 + 1)) - 1) << (k0 - first)
            if self._state[slot] == _FILLING and self._bits[slot] == self._full(block):
                if self._writers[slot]:
                    return  # the last writer queues it
                self._state[slot] = _QUEUED
                self._queue.append(slot)
                self._queued += 1
                self._work.notify()
            elif self._writers[slot] == 0 and self._state[slot] == _FILLING:
                if self._closing:
                    self._give_up(slot)
                else:  # a call of the sweep waiting for a slot may give this block up now
                    self._room.notify_all()

    def offer(self, k0: int, data: memoryview, *, urgent: bool = False) -> bool:
        """Copy whole chunks from ``k0`` on (``data``: within one block) into their
        block's slot.  True if they are held (now or already); False if not (closing,
        or no slot free for an urgent call).  A call of the sweep (``urgent`` False)
        may wait for a slot."""
        c = self.chunk_size
        block = k0 // self.block_chunks
        n = -(-len(data) // c)
        if not data or k0 + n > (block + 1) * self.block_chunks or (len(data) % c and (k0 + n) * c < self.size):
            raise ValueError(f"not whole chunks of one block: {len(data)} bytes from chunk {k0}")
        if (self.held(block) >> (k0 - block * self.block_chunks)) & ((1 << n) - 1) == (1 << n) - 1:
            return True
        slot = self.claim(block, urgent=urgent)
        if slot is None:  # whole and queued already, or not taken
            with self._lock:
                taken = self._pending.get(block)
                return taken is not None and self._state[taken] == _QUEUED
        at = (k0 - block * self.block_chunks) * c
        slot[at : at + len(data)] = data
        self.filled(block, k0, k0 + n - 1)
        return True

    def read_into(self, k: int, buffer: memoryview) -> bool:
        """Copy chunk ``k`` into ``buffer`` (its length exactly) if a slot holds it; True
        if one did.  (A block whose insert has landed is the cache's to read.)"""
        block, j = divmod(k, self.block_chunks)
        with self._lock:
            slot = self._pending.get(block)
            if slot is None or not (self._bits[slot] >> j) & 1:
                return False
            length = min(self.chunk_size, self.size - k * self.chunk_size)
            if len(buffer) != length:
                raise ValueError(f"chunk {k} is {length} bytes, not {len(buffer)}")
            at = slot * self.block_bytes + j * self.chunk_size
            buffer[:] = self._view[at : at + length]
            self._served += 1
        return True

    def stats(self) -> InserterStats:
        with self._lock:
            return InserterStats(self.slots, self.block_bytes, self._queued, self._inserted, self._failed,
                                 self._wrong, self._dropped, self._served, self._waits, round(self._waited_s, 6),
                                 len(self._pending))

    # -- slots (under the lock) -----------------------------------------------------------------

    def _take(self, urgent: bool) -> int | None:
        """A free slot: the sweep keeps the reserve for urgent calls, gives up the oldest
        unfinished block where none is free, else waits; an urgent call never waits."""
        keep = 0 if urgent else self.reserve
        waited = False
        t0 = 0.0
        while True:
            if self._closing:
                self._dropped += 1
                return None
            if len(self._free) > keep:
                break
            oldest = min((s for s in range(self.slots) if self._state[s] == _FILLING and not self._writers[s]),
                         key=self._since.__getitem__, default=None)
            if oldest is not None:
                self._give_up(oldest)
                continue
            if urgent:
                self._dropped += 1
                return None
            if not waited:
                waited, t0 = True, time.monotonic()
                self._waits += 1
            self._room.wait()
        if waited:
            self._waited_s += time.monotonic() - t0
        return self._free.pop()

    def _give_up(self, slot: int) -> None:
        """A block that is not whole and that no call writes into: not cached."""
        self._dropped += 1
        del self._pending[self._block[slot]]
        self._release(slot)

    def _release(self, slot: int) -> None:
        self._block[slot], self._state[slot], self._bits[slot], self._writers[slot] = -1, _FREE, 0, 0
        self._free.append(slot)
        self._room.notify()

    # -- the threads --------------------------------------------------------------------------

    def _run(self) -> None:
        c, size = self.chunk_size, self.size
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._work.wait()
                if self._closing and (not self._queue or time.monotonic() > self._drain_until):
                    self._work.notify_all()  # the other threads: closing too
                    while self._queue:
                        self._give_up(self._queue.popleft())
                    for s in range(self.slots):
                        if self._state[s] == _FILLING and not self._writers[s]:
                            self._give_up(s)
                    self._room.notify_all()
                    return
                # the queue shared out among the threads, at most a batch each
                share = -(-len(self._queue) // len(self._threads))
                batch = [self._queue.popleft() for _ in range(min(BATCH, share))]
                blocks = [self._block[s] for s in batch]
            items = []
            for slot, block in zip(batch, blocks):
                first, count = self.block_span(block)
                at = slot * self.block_bytes
                items.append((self.sums[first : first + count], self._view[at : at + min(count * c, size - first * c)]))
            try:
                results: list[bool | None] = self.cache.insert_blocks(self.identity, c, items)
            except (OSError, ValueError) as exc:  # a cache gone bad (closed under us): not cached
                log.warning("chunk cache: inserts failed: %s", exc)
                results = [False] * len(batch)
            for _, view in items:
                view.release()
            del items
            with self._lock:
                for slot, block, done in zip(batch, blocks, results):
                    if done is None:
                        self._wrong += 1
                    elif done:
                        self._inserted += 1
                    else:
                        self._failed += 1
                    del self._pending[block]
                    self._release(slot)
                self._room.notify_all()

    def close(self, timeout: float = 2.0) -> None:
        """Stop taking chunks; insert what is queued for at most ``timeout`` seconds,
        drop the rest; join the threads and unmap the slots.  Idempotent."""
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
        with self._lock:
            busy = any(self._writers)
        if not self._buffer.closed and not busy:
            self._view.release()
            self._buffer.close()
