"""The chunk store's ``lz4`` codec (loader/store/_lz4.py, docs/FORMAT.md "Codecs"): a
standard LZ4 frame of a fixed subset, written and read into buffers the caller owns.
Frames it writes are read by other LZ4 frame decoders (cramjam's, the ``lz4`` tool);
a frame that is not exactly what it writes is refused with a reason, never decoded
into wrong or short bytes."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess

import cramjam
import pytest
import xxhash

from loader.store import CODEC_LZ4, CODEC_NONE, CODEC_ZSTD, max_stored_length
from loader.store._format import _LZ4_BLOCK, _LZ4_FRAME, codec_of_object
from loader.store._lz4 import BLOCK, MAGIC, decode_into, encode_into, max_encoded_length, scratch_length

KiB, MiB = 1 << 10, 1 << 20


def _data(n: int, seed: int = 0) -> bytes:
    """Compressible bytes (text and zeros) with a random (incompressible) stretch."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefgh", k=rng.randint(2, 8))) for _ in range(50)]
    text = b" ".join(rng.choices(words, k=n // 3))[: n // 2]
    out = bytearray(n)
    out[: len(text)] = text
    out[n // 2 : n // 2 + n // 8] = rng.randbytes(n // 8)
    return bytes(out)


def _encode(data: bytes) -> bytes:
    out = bytearray(scratch_length(len(data)))
    return bytes(out[: encode_into(memoryview(data), memoryview(out))])


@pytest.mark.parametrize("n", [64 * KiB, 2 * MiB, 4 * MiB, 4 * MiB + 4 * KiB, 9 * MiB])
def test_a_chunk_round_trips_and_other_lz4_readers_read_it(n):
    data = _data(n, seed=n)
    frame = _encode(data)
    assert frame[:4] == MAGIC and len(frame) < n <= len(frame) * 4
    assert len(frame) <= max_encoded_length(n) <= max_stored_length(CODEC_LZ4, n)
    dest = bytearray(n)
    decode_into(memoryview(frame), memoryview(dest))
    assert bytes(dest) == data
    assert bytes(cramjam.lz4.decompress(frame)) == data  # a standard frame decoder


def test_the_lz4_tool_reads_a_chunk(tmp_path):
    if shutil.which("lz4") is None:
        pytest.skip("no lz4 command on this host (apt-get install lz4); cramjam's frame decoder is checked above")
    data = _data(5 * MiB, seed=7)
    (tmp_path / "c.lz4").write_bytes(_encode(data))
    out = subprocess.run(["lz4", "-d", "-c", str(tmp_path / "c.lz4")], capture_output=True, check=True).stdout
    assert out == data


def test_incompressible_blocks_are_stored_as_they_are_and_the_bound_holds():
    data = os.urandom(BLOCK + 100 * KiB)
    frame = _encode(data)
    assert len(frame) == max_encoded_length(len(data))  # every block stored uncompressed
    (first,) = struct.unpack_from("<I", frame, 15)
    assert first == (1 << 31) | BLOCK
    dest = bytearray(len(data))
    decode_into(memoryview(frame), memoryview(dest))
    assert bytes(dest) == data


def test_the_format_modules_constants_agree_with_the_codec():
    assert _LZ4_BLOCK == BLOCK
    for n in (64 * KiB, 2 * MiB, 64 * MiB):
        assert max_stored_length(CODEC_LZ4, n) == max_encoded_length(n) == n + _LZ4_FRAME + 4 * max(1, -(-n // BLOCK))


def test_an_objects_codec_is_told_by_its_size_and_magic():
    n = 2 * MiB
    assert codec_of_object(n, n, b"\x28\xb5\x2f\xfd") == CODEC_NONE  # its length: raw, whatever it starts with
    assert codec_of_object(1000, n, b"\x28\xb5\x2f\xfd") == CODEC_ZSTD
    assert codec_of_object(1000, n, MAGIC) == CODEC_LZ4
    assert codec_of_object(1000, n, b"\0\0\0\0") is None  # neither: damaged
    assert codec_of_object(n + 1, n, MAGIC) is None  # bigger than its chunk: no writer stores that


def _frame_parts(data: bytes) -> tuple[bytearray, int]:
    frame = bytearray(_encode(data))
    return frame, 15  # the first block's size word


def _descriptor(frame: bytearray, flg: int | None = None, bd: int | None = None, size: int | None = None) -> None:
    """Rewrite the descriptor's fields, with a header checksum that matches."""
    if flg is not None:
        frame[4] = flg
    if bd is not None:
        frame[5] = bd
    if size is not None:
        frame[6:14] = size.to_bytes(8, "little")
    frame[14] = (xxhash.xxh32_intdigest(bytes(frame[4:14])) >> 8) & 0xFF


N = 256 * KiB


def _bad_frames() -> list[tuple[str, bytes, int, str]]:
    data = _data(N, seed=3)
    good, at = _frame_parts(data)
    out: list[tuple[str, bytes, int, str]] = []
    out.append(("zstd bytes", b"\x28\xb5\x2f\xfd" + bytes(good[4:]), N, "no magic"))
    out.append(("too short", bytes(good[:10]), N, "no magic"))
    f = bytearray(good)
    _descriptor(f, flg=0x64 | 0x08)  # content checksum on
    out.append(("content checksum", bytes(f), N, "flags"))
    f = bytearray(good)
    _descriptor(f, flg=0x48)  # linked blocks
    out.append(("linked blocks", bytes(f), N, "flags"))
    f = bytearray(good)
    _descriptor(f, bd=0x30)
    out.append(("block size code 3", bytes(f), N, "block descriptor"))
    f = bytearray(good)
    f[14] ^= 0xFF
    out.append(("header checksum", bytes(f), N, "header checksum"))
    f = bytearray(good)
    _descriptor(f, size=N + 1)
    out.append(("content size", bytes(f), N, "content size"))
    out.append(("cut short", bytes(good[:-9]), N, "past the frame"))
    out.append(("no end mark", bytes(good[:-4]), N, "cut short"))
    # (a block damaged so that it still decodes, to other bytes, is the chunk's BLAKE3's
    # to catch: tests/test_store_source.py)
    out.append(("trailing bytes", bytes(good) + b"x", N, "after the LZ4 frame"))
    f = bytearray(good)
    struct.pack_into("<I", f, at, len(f))  # a block past the frame
    out.append(("block past the frame", bytes(f), N, "past the frame"))
    f = bytearray(good)
    (size,) = struct.unpack_from("<I", f, at)
    f[at + 4 : at + 4 + size] = b"\xff" * size  # garbage where the block's sequences are
    out.append(("garbage block", bytes(f), N, "does not decode"))
    # a frame of a shorter chunk given as this one: its block decodes short
    short = _encode(data[: N - 4 * KiB])
    f = bytearray(short)
    _descriptor(f, size=N)
    out.append(("block decodes short", bytes(f), N, "decodes to"))
    # two frames' blocks: more than the content size
    f = bytearray(_encode(data[: 64 * KiB]))
    _descriptor(f, bd=0x40)  # 64 KiB blocks
    body = bytes(f[15:-4])
    f = bytearray(f[:15]) + body + body + b"\0\0\0\0"
    out.append(("more blocks than content", bytes(f), 64 * KiB, "more than its content size"))
    raw = bytearray(good[:15]) + struct.pack("<I", (1 << 31) | 100) + data[:100] + b"\0\0\0\0"
    out.append(("short uncompressed block", bytes(raw), N, "uncompressed LZ4 block"))
    return out


@pytest.mark.parametrize("name,frame,n,words", _bad_frames(), ids=[b[0] for b in _bad_frames()])
def test_a_frame_that_is_not_what_the_writer_writes_is_refused(name, frame, n, words):
    dest = bytearray(n)
    with pytest.raises(ValueError, match=words):
        decode_into(memoryview(frame), memoryview(dest))


def test_a_destination_of_the_wrong_size_is_refused():
    data = _data(N, seed=5)
    frame = _encode(data)
    for n in (N - 1, N + 1):
        with pytest.raises(ValueError, match="content size"):
            decode_into(memoryview(frame), memoryview(bytearray(n)))
