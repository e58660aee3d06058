"""The Hello handshake as a small state machine (after h11's ``_state.py``).

Both sides go through the same states; what moves them is the Hello being sent
(client) or received (server), and its answer: a HelloReply (accepted) or an
ErrorReply (refused: the client may offer again).
"""

from __future__ import annotations


class _Sentinel:
    """A named constant that is its own repr (``IDLE``, not ``<object ...>``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# States.
IDLE = _Sentinel("IDLE")  #: no Hello yet, or the last one was refused
OFFERED = _Sentinel("OFFERED")  #: a Hello is out, unanswered (requests may follow it)
NEGOTIATED = _Sentinel("NEGOTIATED")  #: a HelloReply answered it: the version is set

# Events.
HELLO = _Sentinel("HELLO")
REFUSED = _Sentinel("REFUSED")
ACCEPTED = _Sentinel("ACCEPTED")

_TRANSITIONS: dict[_Sentinel, dict[_Sentinel, _Sentinel]] = {
    IDLE: {HELLO: OFFERED},
    OFFERED: {REFUSED: IDLE, ACCEPTED: NEGOTIATED},
    NEGOTIATED: {},
}


def can(state: _Sentinel, event: _Sentinel) -> bool:
    """Whether ``event`` may happen in ``state``."""
    return event in _TRANSITIONS[state]


def after(state: _Sentinel, event: _Sentinel) -> _Sentinel:
    """The state ``event`` leads to; ``KeyError`` when it may not happen in ``state``."""
    return _TRANSITIONS[state][event]
