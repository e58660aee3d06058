"""The ``lz4`` codec of the chunk store (docs/FORMAT.md, "Codecs"): a standard LZ4 frame
(the LZ4 Frame Format, version 01) of the subset this module writes, and a strict reader
of that subset that decodes straight into the caller's buffer.

What a chunk object holds with ``lz4``:

* the frame's magic ``04 22 4D 18``;
* its descriptor: FLG ``0x68`` (version 01, independent blocks, the content size present,
  no block or content checksums, no dictionary), BD with the largest block size (4 MiB:
  ``0x70``; a reader takes 64 KiB to 4 MiB), the content size (8 bytes, little-endian:
  the chunk's length) and the header checksum (the second byte of the descriptor's
  xxh32);
* the blocks, each ``min(block size, what is left)`` bytes of the chunk: a 4-byte
  little-endian size (its top bit set where the block is stored uncompressed because
  LZ4 did not make it smaller), then its bytes, an LZ4 *block*;
* the end mark (4 zero bytes), and nothing after it.

So ``lz4 -d`` (or any LZ4 frame reader) decodes a chunk object, and the codec of an
object found in a store is told by its first four bytes (zstd's frames start
``28 B5 2F FD``).  No checksums: the chunk's BLAKE3, which a reader checks on every
chunk, covers the bytes.

Both directions use ``cramjam``'s LZ4 *block* calls into buffers the caller owns
(``compress_block_into``, ``decompress_block_into``): nothing is allocated per chunk in
proportion to its size, and the GIL is released while they run.  (The ``lz4`` package
and ``cramjam``'s frame calls return new buffers, or decode through their own.)
"""

from __future__ import annotations

import struct

import xxhash

__all__ = ["BLOCK", "FRAME_OVERHEAD", "MAGIC", "decode_into", "encode_into", "max_encoded_length", "scratch_length"]

MAGIC = b"\x04\x22\x4d\x18"
_FLG = 0x68  #: version 01, independent blocks, content size, no checksums, no dictionary
_BLOCK_CODES = {4: 64 << 10, 5: 256 << 10, 6: 1 << 20, 7: 4 << 20}  #: BD bits 6-4 -> block size
_BD = 7 << 4  #: what this module writes: 4 MiB blocks
BLOCK = _BLOCK_CODES[7]
_HEADER = 4 + 1 + 1 + 8 + 1  #: magic, FLG, BD, content size, header checksum
_RAW = 1 << 31  #: a block size's top bit: stored uncompressed
_END = b"\0\0\0\0"
FRAME_OVERHEAD = _HEADER + len(_END)  #: a frame's bytes besides its blocks (and their size words)


def _header_check(descriptor: bytes) -> int:
    return (xxhash.xxh32_intdigest(descriptor) >> 8) & 0xFF


def _bound(n: int) -> int:
    """LZ4_COMPRESSBOUND(n): the most an LZ4 block of ``n`` bytes can take."""
    return n + n // 255 + 16


def max_encoded_length(length: int) -> int:
    """The most bytes :func:`encode_into` may write for ``length`` bytes (every block
    stored uncompressed): what a reader allows a chunk object with ``lz4``."""
    blocks = max(1, -(-length // BLOCK))
    return FRAME_OVERHEAD + 4 * blocks + length


def scratch_length(length: int) -> int:
    """The output buffer :func:`encode_into` needs: room for LZ4's worst case per block."""
    blocks = max(1, -(-length // BLOCK))
    return _HEADER + blocks * (4 + _bound(min(length, BLOCK))) + len(_END)


def encode_into(data: memoryview, out: memoryview) -> int:
    """``data`` as one LZ4 frame of this module's subset, written into ``out`` (at least
    ``scratch_length(len(data))`` bytes); the bytes written."""
    import cramjam

    n = len(data)
    if len(out) < scratch_length(n):
        raise ValueError(f"an output of {len(out)} bytes for {n} bytes of input: too small")
    descriptor = bytes((_FLG, _BD)) + n.to_bytes(8, "little")
    out[:4] = MAGIC
    out[4:14] = descriptor
    out[14] = _header_check(descriptor)
    at = _HEADER
    for lo in range(0, n, BLOCK):
        piece = data[lo : min(n, lo + BLOCK)]
        room = out[at + 4 : at + 4 + _bound(len(piece))]
        size = cramjam.lz4.compress_block_into(piece, room, store_size=False)
        if size >= len(piece):  # LZ4 did not make it smaller: the block as it is
            room[: len(piece)] = piece
            size = len(piece)
            struct.pack_into("<I", out, at, size | _RAW)
        else:
            struct.pack_into("<I", out, at, size)
        at += 4 + size
    out[at : at + 4] = _END
    return at + 4


def decode_into(src: memoryview, dest: memoryview) -> None:
    """Decode the LZ4 frame ``src`` (this module's subset) into ``dest``, which it must
    fill exactly; ``ValueError`` (saying what is wrong) otherwise.  ``dest`` may hold
    some of the bytes when it fails: the caller zeroes it."""
    import cramjam

    length = len(dest)
    end = len(src)
    if end < _HEADER + len(_END) or bytes(src[:4]) != MAGIC:
        raise ValueError("not an LZ4 frame (no magic)")
    flg, bd = src[4], src[5]
    if flg != _FLG:
        raise ValueError(f"LZ4 frame flags {flg:#04x}: this reader takes {_FLG:#04x} (version 01, independent "
                         "blocks, the content size, no checksums, no dictionary)")
    block = _BLOCK_CODES.get(bd >> 4) if bd & 0x8F == 0 else None
    if block is None:
        raise ValueError(f"LZ4 frame block descriptor {bd:#04x} is not one of 64 KiB to 4 MiB")
    descriptor = bytes(src[4:14])
    if src[14] != _header_check(descriptor):
        raise ValueError("LZ4 frame header checksum does not match")
    size = int.from_bytes(descriptor[2:10], "little")
    if size != length:
        raise ValueError(f"LZ4 frame content size {size}, not the chunk's {length}")
    at, pos = _HEADER, 0
    while True:
        if at + 4 > end:
            raise ValueError("LZ4 frame cut short (no end mark)")
        (word,) = struct.unpack_from("<I", src, at)
        at += 4
        if word == 0:
            break
        stored = word & ~_RAW
        want = min(block, length - pos)
        if want <= 0:
            raise ValueError(f"LZ4 frame holds more than its content size {length}")
        if stored > end - at or stored > block or stored == 0:
            raise ValueError(f"LZ4 block of {stored} bytes at {at - 4}: past the frame or the block size")
        piece = src[at : at + stored]
        if word & _RAW:
            if stored != want:
                raise ValueError(f"uncompressed LZ4 block of {stored} bytes where {want} are due")
            dest[pos : pos + want] = piece
        else:
            try:
                got = cramjam.lz4.decompress_block_into(piece, dest[pos : pos + want], output_len=want)
            except cramjam.DecompressionError as exc:
                raise ValueError(f"LZ4 block at {at - 4} does not decode: {exc}") from None
            if got != want:
                raise ValueError(f"LZ4 block at {at - 4} decodes to {got} bytes, not {want}")
        at += stored
        pos += want
    if pos != length:
        raise ValueError(f"LZ4 frame holds {pos} bytes, not its content size {length}")
    if at != end:
        raise ValueError(f"{end - at} bytes after the LZ4 frame's end mark")
