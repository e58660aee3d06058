"""The seam above the loader: :class:`PageService`, the only thing front ends see.

The socket server, the userfaultfd handler, the zero-copy mode and the loaded map
are typed against this protocol, not against :class:`~loader.core._loader.Loader`, so
mypy refuses a front end that reaches into the loader's state.  The loader
implements it (``tests/test_service.py`` checks that every front end module names
only the protocol).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from aio import QueueStatistics

from ._layout import Layout
from ._stats import LoaderStatistics

if TYPE_CHECKING:
    from ..source import LocalPages
    from ._config import CallbackBatch, WaitHandle
    from ._replay import AccessRecorder

__all__ = ["PageService"]


class PageService(Protocol):
    """Waits, hints, loaded ranges and statistics of one restore."""

    memory_size: int
    page_size: int
    #: where the data is (holes are zero pages): ``data_in``, ``find``
    layout: Layout
    #: set once everything is loaded (or failed)
    done: trio.Event
    #: told of every touched range (working-set recording), if any
    recorder: AccessRecorder | None

    # -- waits and hints
    def submit_wait(self, offset: int, length: int, callback: Callable[[WaitHandle], None],
                    context: object = None) -> WaitHandle | None:
        """Ask for ``[offset, offset+length)``: None when it is loaded already, else a
        handle whose ``callback`` runs exactly once (success, or its error)."""
        ...

    async def wait_loaded(self, offset: int, length: int) -> None:
        """Return once ``[offset, offset+length)`` is loaded; raise its error if it cannot be."""
        ...

    def cancel(self, handle: WaitHandle) -> None:
        """Withdraw a wait (its client went away); its callback will not run."""
        ...

    def prefetch(self, offset: int, length: int) -> None:
        """A hint: load ``[offset, offset+length)`` ahead of the sweep, behind waiters."""
        ...

    def hint_working_set(self, offset: int, length: int) -> None:
        """A client says ``[offset, offset+length)`` is in its working set."""
        ...

    def note_answered_faults(self, count: int) -> None:
        """``count`` faults were answered from loaded memory without a wait (the
        userfaultfd handler's own answers): counted as waits served at once."""
        ...

    # -- what is loaded
    def subscribe_loaded(self, listener: Callable[[int, int], None], lo: int = 0, hi: int | None = None, *,
                         holes: bool = False) -> None:
        """Call ``listener(a, b)`` for each part of memory ``[lo, hi)`` loaded now
        (data only, or with ``holes`` the holes too), then every time memory finishes
        loading from now on (in the loader's task, before waiters are answered)."""
        ...

    def add_loaded_listener(self, listener: Callable[[int, int], None]) -> None:
        """Call ``listener(a, b)`` every time memory ``[a, b)`` finishes loading."""
        ...

    def loaded_in(self, lo: int, hi: int, *, holes: bool = False) -> list[tuple[int, int]]:
        """The parts of memory ``[lo, hi)`` loaded now (data only; or with ``holes`` the holes too)."""
        ...

    def is_loaded(self, lo: int, hi: int) -> bool:
        """Whether all of memory ``[lo, hi)`` is loaded (holes count as loaded)."""
        ...

    # -- the sweep
    @property
    def sweep_held(self) -> bool: ...

    def hold_sweep(self, held: bool) -> None:
        """Pause (True) or resume (False) the background sweep; waits still go on."""
        ...

    def replay_spans(self) -> list[tuple[int, int]]:
        """The working set's spans a replay loads first, in its order (empty: none)."""
        ...

    # -- what front ends may know of the reading
    @property
    def verifies(self) -> bool:
        """Whether chunks are verified against checksums before they are served."""
        ...

    @property
    def read_timeout(self) -> float | None:
        """How long one read may take before its waiters get a timeout (None: no bound)."""
        ...

    @property
    def local_source(self) -> LocalPages | None:
        """The source as one local file holding all its bytes, where it is one (the
        userfaultfd handler maps it for direct copies); None otherwise."""
        ...

    @property
    def reads_transparent(self) -> bool:
        """Whether reading the source without the loader (the local file) gives what
        the loader's reads give (False: its queue fails or holds reads on purpose)."""
        ...

    def set_reply_batch(self, batch: CallbackBatch) -> None:
        """Run wait callbacks inside ``batch.open()`` ... ``batch.close()`` (the server
        sends their replies at ``close``)."""
        ...

    def completions_waiting(self) -> bool:
        """Whether read completions are waiting for the loader (a busy-poll hint)."""
        ...

    def statistics(self) -> LoaderStatistics: ...

    def queue_statistics(self) -> QueueStatistics: ...
