"""The page-fault handler's mode as one explicit state (as ``protocol/_state.py``
does for the Hello handshake): a :class:`Phase`, the events that move it, and a
transition table; :meth:`HandlerState.advance` refuses a transition the table does
not have (:class:`IllegalTransition`).

Four parties read it: the fault thread, the fill thread, the disk threads and the
trio thread.  Before, each fact was a boolean of its own (``_load_done``,
``_filled``, ``_stop``, ``gone``) stored by one thread and read by the others.  Now:

* **Stores**: :meth:`HandlerState.advance` computes the next phase under a lock of
  its own and stores it with ONE attribute store (``self.phase = new``), as each
  boolean was stored.  The lock only orders the writers (two threads may move the
  state at once: the trio thread stops the handler while the fill thread reports
  the guest filled, and neither move may be lost, which one boolean each could not
  lose); it is a leaf lock, taken with no other held inside it and never by a
  reader.
* **Loads**: a reader loads ``phase`` once (one attribute load, as it loaded a
  boolean before) and tests it with ``is``; it never takes the lock.  Under the GIL
  an attribute store is atomic, and a thread sees it at its next load, as it saw
  each boolean.

``direct_fill`` is no mode: which fill runs is decided before any thread starts and
never changes (:mod:`._fill`).  The signals between threads (``want_read``,
``woken``, ``want_sync``) are requests, not modes: each stays a flag of its own.
"""

from __future__ import annotations

import enum
import logging
import threading

log = logging.getLogger("pageload")


class Phase(enum.Enum):
    LOADING = "loading"  #: serving; the loader still loads; the guest is not filled
    LOADED = "loaded"  #: serving; the loader has loaded everything; the guest is not filled yet
    #: serving; every data byte is in guest memory (the loader may still load: after a
    #: fill from the source, it has the sweep back then)
    FILLED = "filled"
    STOPPING = "stopping"  #: :meth:`UffdHandler.run` ends: each thread finishes its pass and leaves
    STOPPING_FILLED = "stopping-filled"  #: the same, the guest filled (eager mode's held faults are answered)
    #: the VMM's memory is gone (ESRCH/ENOENT), a thread failed, poisoning is impossible, or
    #: the handler has stopped: nothing more is done (what the phase was before is forgotten)
    GONE = "gone"


class Event(enum.Enum):
    LOAD_DONE = "load-done"  #: the trio thread: the loader has loaded everything
    FILL_DONE = "fill-done"  #: the fill thread: every data byte is in guest memory
    STOP = "stop"  #: the trio thread: the handler stops (``run`` ends)
    VANISH = "vanish"  #: any thread: the VMM's memory is gone, or serving it is impossible


LOADING, LOADED, FILLED = Phase.LOADING, Phase.LOADED, Phase.FILLED
STOPPING, STOPPING_FILLED, GONE = Phase.STOPPING, Phase.STOPPING_FILLED, Phase.GONE
LOAD_DONE, FILL_DONE, STOP, VANISH = Event.LOAD_DONE, Event.FILL_DONE, Event.STOP, Event.VANISH

#: Each phase's events and where they lead.  A move to the same phase is a fact that
#: no longer matters there (the load ending once the guest is filled or the handler
#: stops; anything once it is gone); a missing one cannot happen (the guest filled
#: twice, the handler stopped twice) and is refused.
TRANSITIONS: dict[Phase, dict[Event, Phase]] = {
    LOADING: {LOAD_DONE: LOADED, FILL_DONE: FILLED, STOP: STOPPING, VANISH: GONE},
    # (LOAD_DONE: a handler made after the load ended still watches for its end)
    LOADED: {LOAD_DONE: LOADED, FILL_DONE: FILLED, STOP: STOPPING, VANISH: GONE},
    FILLED: {LOAD_DONE: FILLED, STOP: STOPPING_FILLED, VANISH: GONE},
    # (FILL_DONE: the fill looked at the phase just before the stop)
    STOPPING: {LOAD_DONE: STOPPING, FILL_DONE: STOPPING_FILLED, VANISH: GONE},
    STOPPING_FILLED: {LOAD_DONE: STOPPING_FILLED, VANISH: GONE},
    GONE: {LOAD_DONE: GONE, FILL_DONE: GONE, STOP: GONE, VANISH: GONE},
}

_RUNNING = frozenset((LOADING, LOADED, FILLED))
_FILLED = frozenset((FILLED, STOPPING_FILLED))
#: the phases in which a fill that waits for the load may go on: a fill after the
#: loader and the eager one reach FILLED only from LOADED, so FILLED means loaded for
#: them (the fill from the source never asks)
_LOADED = frozenset((LOADED, FILLED, STOPPING_FILLED))


class IllegalTransition(RuntimeError):
    """An event in a phase where it cannot happen (a bug, never the VMM's doing)."""


class HandlerState:
    """The handler's one state (see the module doc for who stores and who loads it)."""

    __slots__ = ("phase", "_lock")

    def __init__(self, loaded: bool = False) -> None:
        self.phase = LOADED if loaded else LOADING
        self._lock = threading.Lock()  # orders the writers only (module doc)

    def advance(self, event: Event) -> Phase:
        """Move on by ``event``; returns the new phase.  :class:`IllegalTransition`
        when the table has no such move."""
        with self._lock:
            try:
                new = TRANSITIONS[self.phase][event]
            except KeyError:
                raise IllegalTransition(f"uffd handler: {event.value} while {self.phase.value}") from None
            self.phase = new  # one attribute store (module doc)
        return new

    @property
    def gone(self) -> bool:
        """Nothing more is done (was ``gone``)."""
        return self.phase is GONE

    @property
    def running(self) -> bool:
        """Neither stopping nor gone: the fill and the disk threads go on (was ``not
        _stop and not gone``)."""
        return self.phase in _RUNNING

    @property
    def stopping(self) -> bool:
        """The handler stops: the fault thread finishes its pass (was ``_stop``)."""
        return self.phase is STOPPING or self.phase is STOPPING_FILLED

    @property
    def filled(self) -> bool:
        """Every data byte is in guest memory (was ``_filled``)."""
        return self.phase in _FILLED

    @property
    def loaded(self) -> bool:
        """The loader has loaded everything, as far as a fill after the loader asks (was
        ``_load_done``; see ``_LOADED``)."""
        return self.phase in _LOADED

    def vanished(self, why: str) -> None:
        """An ioctl said the VMM's memory is gone (an :class:`._answer.Answerer`'s owner)."""
        if self.phase is not GONE:
            log.info("uffd: the VMM's memory is gone (%s)", why)
        self.advance(VANISH)
