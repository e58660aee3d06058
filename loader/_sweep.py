"""Where the background sweep reads next: the :class:`SweepOrder` interface and
its default, :class:`SequentialOrder` (the pages file's order).

An order sees only the set of unstarted memory offsets and the ends of served
waits; it never issues I/O.  Working-set replay plugs in here.
"""

from __future__ import annotations

from typing import Protocol

from ._rangeset import RangeSet


class SweepOrder(Protocol):
    """Decides where the background sweep reads next (pluggable: working-set replay)."""

    def next_start(self, unloaded: RangeSet) -> int | None:
        """Memory offset of the next unstarted byte to read, or None when nothing is left."""
        ...

    def note_served(self, end: int) -> None:
        """A waiter's read ended at ``end``: continue near it (spatial locality)."""
        ...


class SequentialOrder:
    """Ascending memory order (the pages file's order), jumping to just after each
    served wait and wrapping around to pick up what was skipped."""

    __slots__ = ("cursor",)

    def __init__(self) -> None:
        self.cursor = 0

    def next_start(self, unloaded: RangeSet) -> int | None:
        nxt = unloaded.first_at_or_after(self.cursor)
        if nxt is None:
            nxt = unloaded.first_at_or_after(0)
            if nxt is None:
                return None
        self.cursor = nxt[0]
        return nxt[0]

    def note_served(self, end: int) -> None:
        self.cursor = end
