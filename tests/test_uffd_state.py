"""The page-fault handler's one state (loader/uffd/_state.py): its transition table,
the moves it refuses, and what each phase means to the threads that read it."""

from __future__ import annotations

import pytest

from loader.uffd._state import (
    FILL_DONE,
    FILLED,
    GONE,
    LOAD_DONE,
    LOADED,
    LOADING,
    STOP,
    STOPPING,
    STOPPING_FILLED,
    TRANSITIONS,
    VANISH,
    Event,
    HandlerState,
    IllegalTransition,
    Phase,
)


def at(phase: Phase) -> HandlerState:
    s = HandlerState()
    s.phase = phase
    return s


def test_every_phase_has_its_row_and_gone_is_the_end():
    assert set(TRANSITIONS) == set(Phase)
    assert TRANSITIONS[GONE] == {e: GONE for e in Event}
    assert all(row[VANISH] is GONE for row in TRANSITIONS.values())


@pytest.mark.parametrize(("phase", "event"), [(FILLED, FILL_DONE), (STOPPING_FILLED, FILL_DONE),
                                              (STOPPING, STOP), (STOPPING_FILLED, STOP)])
def test_a_move_that_cannot_happen_is_refused_and_changes_nothing(phase, event):
    s = at(phase)
    with pytest.raises(IllegalTransition, match=f"{event.value} while {phase.value}"):
        s.advance(event)
    assert s.phase is phase


@pytest.mark.parametrize(("events", "end"), [
    ([], LOADING),
    ([LOAD_DONE], LOADED),
    ([LOAD_DONE, FILL_DONE], FILLED),  # the fill after the loader, or eager
    ([FILL_DONE, LOAD_DONE], FILLED),  # the fill from the source, the load after it
    ([LOAD_DONE, FILL_DONE, STOP], STOPPING_FILLED),
    ([STOP, FILL_DONE], STOPPING_FILLED),  # the fill looked just before the stop: not lost
    ([STOP, LOAD_DONE], STOPPING),
    ([FILL_DONE, VANISH, STOP, FILL_DONE, LOAD_DONE], GONE),
])
def test_lifecycles(events, end):
    s = HandlerState()
    for e in events:
        s.advance(e)
    assert s.phase is end


@pytest.mark.parametrize(("phase", "running", "stopping", "filled", "loaded", "gone"), [
    (LOADING, True, False, False, False, False),
    (LOADED, True, False, False, True, False),
    (FILLED, True, False, True, True, False),
    (STOPPING, False, True, False, False, False),
    (STOPPING_FILLED, False, True, True, True, False),
    (GONE, False, False, False, False, True),
])
def test_what_each_phase_tells_the_threads(phase, running, stopping, filled, loaded, gone):
    s = at(phase)
    assert (s.running, s.stopping, s.filled, s.loaded, s.gone) == (running, stopping, filled, loaded, gone)


def test_a_handler_made_after_the_load_starts_loaded_and_a_vanished_vmm_is_said_once(caplog):
    s = HandlerState(loaded=True)
    assert s.phase is LOADED and s.advance(LOAD_DONE) is LOADED
    with caplog.at_level("INFO", logger="pageload"):
        s.vanished("No such process")
        s.vanished("No such process")
    assert s.gone and caplog.text.count("the VMM's memory is gone (No such process)") == 1
