"""Decoder limits, and bounded descriptions of values received from a peer.

Input comes from another process, so every limit is set: one frozen :class:`Limits`
per connection, built once and handed to the connection whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: Longest text a peer's value contributes to an error message.
DESCRIBE_MAX = 40


@dataclass(frozen=True, slots=True)
class Limits:
    """What one side accepts from its peer, and the largest frame it sends.

    ``Limits.server()`` and ``Limits.client()`` are each side's defaults, with
    any field changed by keyword (``Limits.server(max_buffer_size=64)``).
    """

    max_buffer_size: int  #: one received message, bytes
    max_array_len: int  #: items in a received array
    max_map_len: int  #: entries in a received map
    max_str_len: int  #: bytes in a received str
    max_bin_len: int  #: bytes in a received bin
    max_depth: int  #: nesting of arrays and maps in a received message (a flat map is 1)
    max_send_size: int  #: one frame sent, bytes

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{field.name} must be a positive int, not {describe(value)}")

    @classmethod
    def server(cls, **changes: int) -> Limits:
        """The daemon's side: tight, requests are small and flat."""
        return dataclasses.replace(_SERVER, **changes)

    @classmethod
    def client(cls, **changes: int) -> Limits:
        """A client's side: roomier, stats replies carry histograms and lists."""
        return dataclasses.replace(_CLIENT, **changes)


_SERVER = Limits(
    max_buffer_size=64 * 1024,
    max_array_len=64,
    max_map_len=32,
    max_str_len=1024,
    max_bin_len=1024,
    max_depth=8,
    max_send_size=1024 * 1024,
)
_CLIENT = Limits(
    max_buffer_size=1024 * 1024,
    max_array_len=128 * 1024,
    max_map_len=4096,
    max_str_len=64 * 1024,
    max_bin_len=64 * 1024,
    max_depth=32,
    max_send_size=64 * 1024,
)


def describe(value: Any) -> str:
    """A short description of ``value`` for an error message: at most about
    :data:`DESCRIBE_MAX` characters, and never recursive (a peer's value may be
    nested a thousand deep, and ``repr`` of that raises ``RecursionError``)."""
    if value is None or type(value) in (bool, int, float):
        text = repr(value)
    elif type(value) is str or type(value) is bytes:
        text = repr(value[: DESCRIBE_MAX + 1])
    elif type(value) is list:
        return f"an array of {len(value)}"
    elif type(value) is dict:
        return f"a map of {len(value)}"
    else:
        return f"a {type(value).__name__}"
    if len(text) > DESCRIBE_MAX:
        text = text[: DESCRIBE_MAX - 3] + "..."
    return text


def nesting_over(message: Any, limit: int) -> bool:
    """Whether arrays and maps in ``message`` nest deeper than ``limit`` (iterative)."""
    stack: list[tuple[Any, int]] = [(message, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if type(value) is dict else value
        for child in children:
            if type(child) is dict or type(child) is list:
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False
