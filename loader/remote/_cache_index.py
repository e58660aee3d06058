"""The host chunk cache's in-memory index (docs/REMOTE.md, "The host chunk cache"):
what one process knows is in the cache, (identity, checksum, length) -> recency, as an
open-addressing hash table over four NumPy columns (24 bytes a slot, no Python object
per entry), and the least recently used entries chosen from it a batch at a time.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np

_M64 = (1 << 64) - 1
_K_IDENT = 0x9E3779B97F4A7C15
_K_LENGTH = 0xC2B2AE3D27D4EB4F


def _mix(ident_no: int, checksum: int, length: int) -> int:
    return (checksum ^ (ident_no * _K_IDENT) ^ (length * _K_LENGTH)) & _M64


class _Index:
    """What this process knows is in the cache: (identity, checksum, length) -> recency.

    Linear probing over NumPy columns of a power-of-two capacity; a slot's ``ident``
    is 0 when empty, 1 when deleted, the identity's number + 2 when live.  The home
    slot is a multiply-shift hash with a random odd multiplier (per process), so
    checksums chosen by a hostile checkpoint cannot pile up on one slot.  At most 75 %
    of the slots are used (live or deleted); a rebuild sizes it to at most 60 %: 24
    bytes a slot are 32 to 64 bytes a live entry (40 to 80 right after a walk).
    """

    MAX_LOAD = 0.75
    TARGET_LOAD = 0.60

    def __init__(self, capacity: int = 1024) -> None:
        self._multiplier = secrets.randbits(64) | 1
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        assert capacity & (capacity - 1) == 0
        self.capacity = capacity
        self.bits = capacity.bit_length() - 1
        self.checksum = np.zeros(capacity, np.uint64)
        self.ident = np.zeros(capacity, np.uint32)
        self.length = np.zeros(capacity, np.uint32)
        self.tick = np.zeros(capacity, np.int64)
        self.live = 0
        self.used = 0
        self.generation = getattr(self, "generation", 0) + 1  # slots move: chosen victims are void

    def _home(self, ident_no: int, checksum: int, length: int) -> int:
        return ((_mix(ident_no, checksum, length) * self._multiplier) & _M64) >> (64 - self.bits)

    def find(self, ident_no: int, checksum: int, length: int) -> int:
        """The slot of the entry, or -1."""
        mask = self.capacity - 1
        slot = self._home(ident_no, checksum, length)
        tag = ident_no + 2
        ident, sums, lengths = self.ident, self.checksum, self.length
        while True:
            t = int(ident[slot])
            if t == 0:
                return -1
            if t == tag and int(sums[slot]) == checksum and int(lengths[slot]) == length:
                return slot
            slot = (slot + 1) & mask

    def add(self, ident_no: int, checksum: int, length: int, tick: int) -> bool:
        """Add the entry, or raise its recency to ``tick``; True if it is new."""
        slot = self.find(ident_no, checksum, length)
        if slot >= 0:
            if tick > int(self.tick[slot]):
                self.tick[slot] = tick
            return False
        if self.used + 1 > self.MAX_LOAD * self.capacity:
            self._rebuild(self.live + 1)
        mask = self.capacity - 1
        slot = self._home(ident_no, checksum, length)
        while int(self.ident[slot]) >= 2:  # the first empty or deleted slot on the path
            slot = (slot + 1) & mask
        if int(self.ident[slot]) == 0:
            self.used += 1
        self.ident[slot] = ident_no + 2
        self.checksum[slot] = checksum
        self.length[slot] = length
        self.tick[slot] = tick
        self.live += 1
        return True

    def remove(self, slot: int) -> None:
        assert int(self.ident[slot]) >= 2
        self.ident[slot] = 1
        self.live -= 1

    def clear(self) -> None:
        self._alloc(1024)

    def oldest(self, k: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """The ``k`` live slots of least recency, oldest first, and their recency."""
        slots = np.flatnonzero(self.ident >= 2)
        ticks = self.tick[slots]
        if k < slots.size:
            part = np.argpartition(ticks, k - 1)[:k]
            slots, ticks = slots[part], ticks[part]
        order = np.argsort(ticks, kind="stable")
        return slots[order], ticks[order]

    def _rebuild(self, need: int) -> None:
        keep = np.flatnonzero(self.ident >= 2)
        columns = (self.ident[keep] - 2, self.checksum[keep], self.length[keep], self.tick[keep])
        capacity = 1024
        while need > self.TARGET_LOAD * capacity:
            capacity *= 2
        self._alloc(capacity)
        self.bulk(*columns)

    def bulk(self, ident_nos: np.ndarray[Any, Any], checksums: np.ndarray[Any, Any],
             lengths: np.ndarray[Any, Any], ticks: np.ndarray[Any, Any]) -> None:
        """Fill an empty table with distinct entries, all at once (vectorized linear
        probing: each round places, on every free slot wanted, the first entry wanting
        it; the others move one slot on; a slot is passed only once it is taken)."""
        assert self.used == 0
        n = int(checksums.size)
        capacity = self.capacity
        while n > self.TARGET_LOAD * capacity:
            capacity *= 2
        if capacity != self.capacity:
            self._alloc(capacity)
        if n == 0:
            return
        ident_nos = ident_nos.astype(np.uint64)
        checksums = checksums.astype(np.uint64)
        lengths = lengths.astype(np.uint64)
        mixed = checksums ^ (ident_nos * np.uint64(_K_IDENT)) ^ (lengths * np.uint64(_K_LENGTH))
        pos = (mixed * np.uint64(self._multiplier)) >> np.uint64(64 - self.bits)
        pending = np.arange(n)
        mask = np.uint64(self.capacity - 1)
        while pending.size:
            free = self.ident[pos] == 0
            want, at = pending[free], pos[free]
            taken, first = np.unique(at, return_index=True)
            who = want[first]
            self.ident[taken] = (ident_nos[who] + np.uint64(2)).astype(np.uint32)
            self.checksum[taken] = checksums[who]
            self.length[taken] = lengths[who].astype(np.uint32)
            self.tick[taken] = ticks[who]
            placed = np.zeros(n, bool)
            placed[who] = True
            stay = ~placed[pending]
            pending, pos = pending[stay], (pos[stay] + np.uint64(1)) & mask
        self.live = self.used = n
