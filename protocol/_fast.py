"""The hottest request's fast path: a ``wait`` frame and its ``loaded`` reply, both ways.

:func:`parse_wait` recognises, at a position in raw received bytes, one whole
``{"op": "wait", "id": I, "off": O, "len": L}`` map with its keys in that order (the
order every encoder here writes) and unsigned ints (any msgpack uint width), and
returns ``(end, id, offset, length)``; it returns ``None`` for anything else — another
message, another key order, a partial frame, a value out of range — and the caller
hands the bytes to the general msgpack path, so the fast path accepts only input the
general path would decode to the same valid :class:`~protocol.Wait`, and every
rejection is the general path's.

:func:`encode_loaded` is the ``{"re": id, "ok": "loaded"}`` reply from a template
with the id patched in: the same bytes as ``msgpack.packb`` (minimal int width).

The client's side is the mirror image: :func:`encode_wait` (the wait frame, the same
bytes as the general encoder) and :func:`parse_loaded` (``(end, id)`` of a ``loaded``
reply in the form :func:`encode_loaded` writes, or None: the general path decides).
"""

from __future__ import annotations

from struct import Struct

_OP_WAIT_ID = b"\x84\xa2op\xa4wait\xa2id"  # fixmap(4), "op", "wait", "id"
_OFF = b"\xa3off"
_LEN = b"\xa3len"
_U16 = Struct(">H")
_U32 = Struct(">I")
_U64 = Struct(">Q")
_ID_LIMIT = 2**63
_U64_LIMIT = 2**64
#: The longest wait frame: the fixed 21 bytes and three uint64 (9 bytes each).
MAX_WAIT_FRAME = len(_OP_WAIT_ID) + len(_OFF) + len(_LEN) + 3 * 9


def _uint(buf: bytes, pos: int) -> tuple[int, int] | None:
    """The msgpack uint at ``pos`` and the position after it, or None."""
    if pos >= len(buf):
        return None
    tag = buf[pos]
    if tag < 0x80:
        return tag, pos + 1
    if tag == 0xCC:
        end = pos + 2
        return (buf[pos + 1], end) if end <= len(buf) else None
    if tag == 0xCD:
        end = pos + 3
        return (_U16.unpack_from(buf, pos + 1)[0], end) if end <= len(buf) else None
    if tag == 0xCE:
        end = pos + 5
        return (_U32.unpack_from(buf, pos + 1)[0], end) if end <= len(buf) else None
    if tag == 0xCF:
        end = pos + 9
        return (_U64.unpack_from(buf, pos + 1)[0], end) if end <= len(buf) else None
    return None


def parse_wait(buf: bytes, pos: int) -> tuple[int, int, int, int] | None:
    """``(end, id, offset, length)`` of a valid wait frame at ``buf[pos:]``, or None."""
    if not buf.startswith(_OP_WAIT_ID, pos):
        return None
    got = _uint(buf, pos + len(_OP_WAIT_ID))
    if got is None:
        return None
    id, p = got
    if not buf.startswith(_OFF, p):
        return None
    got = _uint(buf, p + 4)
    if got is None:
        return None
    offset, p = got
    if not buf.startswith(_LEN, p):
        return None
    got = _uint(buf, p + 4)
    if got is None:
        return None
    length, p = got
    if id >= _ID_LIMIT or length == 0 or offset + length > _U64_LIMIT:
        return None  # the general path says why
    return p, id, offset, length


_LOADED_HEAD = b"\x82\xa2re"
_LOADED_TAIL = b"\xa2ok\xa6loaded"
#: The longest Loaded frame (a uint64 id).
MAX_LOADED_FRAME = len(_LOADED_HEAD) + 9 + len(_LOADED_TAIL)
#: Replies for small ids, prebuilt.
_LOADED_SMALL = [_LOADED_HEAD + bytes([i]) + _LOADED_TAIL for i in range(128)]


def encode_loaded(id: int) -> bytes:
    """The bytes of ``Loaded(id)`` (``0 <= id < 2**63``, checked by the caller)."""
    if id < 128:
        return _LOADED_SMALL[id]
    if id < 0x100:
        return _LOADED_HEAD + b"\xcc" + bytes((id,)) + _LOADED_TAIL
    if id < 0x10000:
        return _LOADED_HEAD + b"\xcd" + _U16.pack(id) + _LOADED_TAIL
    if id < 0x100000000:
        return _LOADED_HEAD + b"\xce" + _U32.pack(id) + _LOADED_TAIL
    return _LOADED_HEAD + b"\xcf" + _U64.pack(id) + _LOADED_TAIL


def _pack_uint(value: int) -> bytes:
    """``value`` (``0 <= value < 2**64``) as msgpack writes it: the smallest width."""
    if value < 0x80:
        return bytes((value,))
    if value < 0x100:
        return b"\xcc" + bytes((value,))
    if value < 0x10000:
        return b"\xcd" + _U16.pack(value)
    if value < 0x100000000:
        return b"\xce" + _U32.pack(value)
    return b"\xcf" + _U64.pack(value)


def encode_wait(id: int, offset: int, length: int) -> bytes:
    """The bytes of ``Wait(id, offset, length)`` (validated by the caller)."""
    return _OP_WAIT_ID + _pack_uint(id) + _OFF + _pack_uint(offset) + _LEN + _pack_uint(length)


def parse_loaded(buf: bytes, pos: int) -> tuple[int, int] | None:
    """``(end, id)`` of a whole ``{"re": id, "ok": "loaded"}`` frame at ``buf[pos:]``, or None."""
    if not buf.startswith(_LOADED_HEAD, pos):
        return None
    got = _uint(buf, pos + len(_LOADED_HEAD))
    if got is None:
        return None
    id, p = got
    if id >= _ID_LIMIT or not buf.startswith(_LOADED_TAIL, p):
        return None
    return p + len(_LOADED_TAIL), id
