"""Columns of unsigned 64-bit integers in msgpack files: ``array('Q')`` to and from
little-endian ``bin`` fields, with no Python object per value (the checkpoint
index's range table, a working set's ranges)."""

from __future__ import annotations

import sys
from array import array
from typing import Any

__all__ = ["column_bytes", "read_column"]


def column_bytes(col: array[int]) -> bytes:
    """``col`` as little-endian u64 bytes."""
    if sys.byteorder == "little":
        return col.tobytes()
    swapped = array("Q", col)
    swapped.byteswap()
    return swapped.tobytes()


def read_column(obj: dict[str, Any], name: str, count: int | None = None, what: str = "ranges",
                release: bool = False) -> array[int]:
    """Field ``name`` of ``obj`` as an ``array('Q')``: binary, a whole number of u64
    values (``count`` of them, if given); ``ValueError`` with one line otherwise.
    ``release``: the field is taken out of ``obj`` (its bytes freed with the array made)."""
    blob = obj.pop(name, None) if release else obj.get(name)
    if isinstance(blob, array) and blob.typecode == "Q":  # read from the file into an array already
        if count is not None and len(blob) != count:
            raise ValueError(f"field {name!r} holds {8 * len(blob)} bytes, not 8 x {count} {what}")
        return blob
    if not isinstance(blob, bytes):
        raise ValueError(f"field {name!r} is missing or not binary")
    if count is not None and len(blob) != 8 * count:
        raise ValueError(f"field {name!r} holds {len(blob)} bytes, not 8 x {count} {what}")
    if len(blob) % 8:
        raise ValueError(f"field {name!r} holds {len(blob)} bytes, not a whole number of 8-byte values")
    col = array("Q")
    col.frombytes(blob)
    if sys.byteorder != "little":
        col.byteswap()
    return col
