"""The chunk store's manifest format (loader/store/_format.py): a round trip, and every
check a reader makes refusing a bad manifest with one line naming the object."""

from __future__ import annotations

import sys
from array import array
from typing import Any

import msgpack
import pytest
import xxhash

from loader.store import (
    CODEC_LZ4,
    CODEC_NONE,
    CODEC_ZSTD,
    FORMAT,
    MAX_MANIFEST_BYTES,
    CheckpointError,
    Manifest,
    check_snapshot_name,
    chunk_hash,
    chunk_key,
    decode_manifest,
    encode_manifest,
    hash_of_chunk_key,
    looks_like_manifest,
    manifest_digest,
    max_stored_length,
    snapshot_key,
    split_snapshot_ref,
)
from loader.store._format import CheckpointError as FormatCheckpointError

MiB = 1 << 20
CS = 2 * MiB


def _manifest(**changes: Any) -> Manifest:
    """Three chunks of a 5 MiB memory (2 MiB chunks): rows at 0 and 4 MiB (short, 1 MiB)."""
    a, b = bytes(range(256)) * (CS // 256), b"\x01" * MiB
    fields: dict[str, Any] = dict(
        memory_size=5 * MiB, page_size=4096, chunk_size=CS,
        offsets=array("Q", [0, 4 * MiB]), lengths=array("I", [CS, MiB]),
        stored_lengths=array("I", [1000, MiB]), codecs=bytes([CODEC_ZSTD, CODEC_NONE]),
        hashes=chunk_hash(a) + chunk_hash(b),
        xxh3=array("Q", [xxhash.xxh3_64_intdigest(a), xxhash.xxh3_64_intdigest(b)]),
        parent="base", parent_digest=manifest_digest(b"parent manifest"), created=1_700_000_000, source="test",
    )
    fields.update(changes)
    return Manifest(**fields)


def _obj(m: Manifest | None = None) -> dict[str, Any]:
    decoded: dict[str, Any] = msgpack.unpackb(encode_manifest(m or _manifest()), raw=False)
    return decoded


def _refused(obj: Any, *words: str) -> str:
    data = msgpack.packb(obj, use_bin_type=True)
    with pytest.raises(CheckpointError) as info:
        decode_manifest(data, "st/snapshots/x")
    message = str(info.value)
    assert "\n" not in message and message.startswith("st/snapshots/x: ")
    for word in words:
        assert word in message, message
    return message


def test_the_checkpoint_error_is_the_projects():
    from loader._files import CheckpointError as Base

    assert CheckpointError is Base is FormatCheckpointError


def test_a_manifest_round_trips():
    m = _manifest()
    data = encode_manifest(m)
    assert looks_like_manifest(data[:64])
    back = decode_manifest(data, "x")
    assert (back.memory_size, back.page_size, back.chunk_size) == (5 * MiB, 4096, CS)
    assert back.offsets == m.offsets and back.lengths == m.lengths and back.stored_lengths == m.stored_lengths
    assert back.codecs == m.codecs and back.hashes == m.hashes and back.xxh3 == m.xxh3
    assert (back.parent, back.parent_digest, back.created, back.source) == ("base", m.parent_digest,
                                                                           1_700_000_000, "test")
    assert len(back) == 2 and back.data_bytes == 3 * MiB and back.stored_bytes == 1000 + MiB
    assert back.key_at(1) == chunk_key(m.hashes[32:])
    assert back.offsets.typecode == "Q" and back.lengths.typecode == "I"
    # the columns are little-endian on the wire, whatever the host
    assert _obj()["chunk_offsets"] == (0).to_bytes(8, "little") + (4 * MiB).to_bytes(8, "little")


def test_an_empty_table_and_no_parent_round_trip():
    m = _manifest(offsets=array("Q"), lengths=array("I"), stored_lengths=array("I"), codecs=b"", hashes=b"",
                  xxh3=array("Q"), parent=None, parent_digest=None, source=None)
    back = decode_manifest(encode_manifest(m), "x")
    assert len(back) == 0 and back.parent is None and back.parent_digest is None and back.source is None


def test_unknown_keys_are_kept_aside():
    obj = _obj()
    obj["future"] = 1
    back = decode_manifest(msgpack.packb(obj, use_bin_type=True), "x")
    assert back.extra == {"future": 1}


def test_chunk_names():
    h = chunk_hash(b"abc")
    assert len(h) == 32 and h.hex() == "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    key = chunk_key(h)
    assert key == f"chunks/64/{h.hex()}"
    assert hash_of_chunk_key(key) == h
    for other in (f"chunks/65/{h.hex()}", f"chunks/64/{h.hex()}.tmp", f"chunks/{h.hex()}", "snapshots/x",
                  f"chunks/64/{h.hex().upper()}"):
        assert hash_of_chunk_key(other) is None
    with pytest.raises(ValueError):
        chunk_key(b"short")


def test_snapshot_names():
    for good in ("a", "base-1.2_x", "A" * 128, "0"):
        assert check_snapshot_name(good) == good
        assert snapshot_key(good) == f"snapshots/{good}"
    for bad in ("", ".hidden", "a/b", "..", "x" * 129, "a b", "é"):
        with pytest.raises(ValueError, match="not a snapshot name"):
            check_snapshot_name(bad)


def test_snapshot_refs():
    assert split_snapshot_ref("st/snapshots/base") == ("st", "base")
    assert split_snapshot_ref("/a/b/snapshots/v1.2") == ("/a/b", "v1.2")
    assert split_snapshot_ref("snapshots/x") == (".", "x")
    assert split_snapshot_ref("s3://bucket/pre/fix/snapshots/x") == ("s3://bucket/pre/fix", "x")
    assert split_snapshot_ref("s3://bucket/snapshots/x") == ("s3://bucket", "x")
    assert split_snapshot_ref("file:///srv/st/snapshots/x") == ("file:///srv/st", "x")
    for no in ("st/base", "st/snapshots/", "st/snapshots/.x", "s3://snapshots/x", "st/chunks/x", "x"):
        assert split_snapshot_ref(no) is None, no


def test_stored_length_bounds():
    assert max_stored_length(CODEC_NONE, CS) == CS
    assert max_stored_length(CODEC_ZSTD, CS) == CS + CS // 256  # ZSTD_COMPRESSBOUND past 128 KiB
    assert max_stored_length(CODEC_ZSTD, 4096) == 4096 + 16 + ((128 << 10) - 4096) // 2048
    assert max_stored_length(CODEC_LZ4, CS) == CS + 19 + 4  # a frame of one block stored as it is
    assert max_stored_length(CODEC_LZ4, 64 * MiB) == 64 * MiB + 19 + 4 * 16


def test_encode_refuses_what_a_reader_would():
    with pytest.raises(CheckpointError, match="manifest: chunk 1 .* is not after"):
        encode_manifest(_manifest(offsets=array("Q", [2 * CS, 0]), lengths=array("I", [CS, CS])))


def _set(**changes: Any) -> dict[str, Any]:
    obj = _obj()
    obj.update(changes)
    return obj


def _le(typecode: str, values: list[int]) -> bytes:
    col = array(typecode, values)
    if sys.byteorder != "little":
        col.byteswap()
    return col.tobytes()


@pytest.mark.parametrize("obj, words", [
    ([1, 2], ("not a manifest", "list")),
    ({"format": "pageload-checkpoint"}, ("not a pageload store manifest",)),
    (_set(version=2), ("unsupported store manifest version 2",)),
    (_set(version=True), ("'version' is a bool",)),
    (_set(page_size=3000), ("page_size 3000",)),
    (_set(page_size=256), ("page_size 256",)),
    (_set(chunk_size=3 * MiB), ("chunk_size 3145728 is not a power of two",)),
    (_set(chunk_size=128 * MiB), ("chunk_size",)),
    (_set(chunk_size=32768), ("chunk_size 32768",)),
    (_set(page_size=1 << 22, chunk_size=CS), ("not a multiple of the page size",)),
    (_set(memory_size=0), ("'memory_size' is 0",)),
    (_set(memory_size=5 * MiB + 512), ("memory_size", "not a multiple of the page size")),
    (_set(memory_size=-1), ("memory_size",)),
    (_set(hash="sha256"), ("unknown hash 'sha256'",)),
    (_set(parent="../x"), ("'parent'", "not a snapshot name")),
    (_set(parent_digest=b"short"), ("'parent_digest' is not 32 bytes",)),
    (_set(parent=None), ("'parent_digest' is set but 'parent' is not",)),
    (_set(created="now"), ("'created' is a str",)),
    (_set(source=5), ("'source'",)),
    (_set(source="x" * 5000), ("'source'",)),
    (_set(chunk_offsets=None), ("'chunk_offsets' is missing or not binary",)),
    (_set(chunk_offsets=b"\0" * 12), ("'chunk_offsets' holds 12 bytes",)),
    (_set(chunk_lengths=b"\0" * 4), ("'chunk_lengths' holds 4 bytes, not 4 x 2",)),
    (_set(stored_lengths=b"\0" * 12), ("'stored_lengths' holds 12 bytes",)),
    (_set(codecs=b"\x01"), ("'codecs' holds 1 bytes, not 1 x 2",)),
    (_set(hashes=b"\0" * 63), ("'hashes' holds 63 bytes, not 32 x 2",)),
    (_set(xxh3=b"\0" * 8), ("'xxh3' holds 8 bytes",)),
    (_set(chunk_offsets=_le("Q", [4096, 4 * MiB])), ("chunk 0 at memory 0x1000 is not aligned",)),
    (_set(chunk_offsets=_le("Q", [4 * MiB, 4 * MiB])), ("chunk 1", "offsets must ascend")),
    (_set(chunk_offsets=_le("Q", [0, 6 * MiB])), ("chunk 1 at memory 0x600000 is past the memory size",)),
    (_set(chunk_lengths=_le("I", [CS, CS])), ("chunk 1", "is 2097152 bytes long, not 1048576",)),
    (_set(chunk_lengths=_le("I", [MiB, MiB])), ("chunk 0", "only the last chunk of memory may be short")),
    (_set(codecs=bytes([7, 0])), ("chunk 0 has unknown codec 7",)),
    (_set(codecs=bytes([3, 0])), ("chunk 0 has unknown codec 3",)),
    (_set(codecs=bytes([CODEC_LZ4, 0]), stored_lengths=_le("I", [CS + 24, MiB])),
     ("chunk 0 has stored length 2097176", "outside 1..2097175", "codec lz4")),
    (_set(stored_lengths=_le("I", [CS, MiB])), ("chunk 0 has stored length 2097152",
                                                 "a compressed chunk is smaller than its length")),
    (_set(stored_lengths=_le("I", [0, MiB])), ("chunk 0 has stored length 0",)),
    (_set(stored_lengths=_le("I", [CS + CS // 256 + 1, MiB])), ("chunk 0 has stored length 2105345",)),
    (_set(stored_lengths=_le("I", [1000, 1000])), ("chunk 1 has stored length 1000", "stored at its length")),
])
def test_a_reader_refuses_a_bad_manifest_with_one_line(obj, words):
    _refused(obj, *words)


def test_missing_fields_are_named():
    for name in ("version", "page_size", "chunk_size", "memory_size", "created"):
        obj = _obj()
        del obj[name]
        _refused(obj, f"missing field {name!r}")


def test_undecodable_bytes_are_one_line():
    data = encode_manifest(_manifest())
    for bad, words in ((data[:-5], "truncated manifest"), (data + b"\0", "trailing bytes"), (b"", "empty manifest"),
                       (b"\xc1", "not a msgpack manifest"),
                       (msgpack.packb({1: 2}), "not a msgpack manifest")):
        with pytest.raises(CheckpointError, match=words) as info:
            decode_manifest(bad, "m")
        assert "\n" not in str(info.value)


def test_an_oversized_manifest_is_refused_before_it_is_decoded():
    big = b"\x81" + msgpack.packb("format") + msgpack.packb(FORMAT)  # would decode, but is padded
    with pytest.raises(CheckpointError, match="more than the 67108864"):
        decode_manifest(big + b"\0" * MAX_MANIFEST_BYTES, "m")


def test_ext_types_are_refused():
    obj = _obj()
    obj["source"] = msgpack.ExtType(1, b"x")
    with pytest.raises(CheckpointError, match="not a msgpack manifest"):
        decode_manifest(msgpack.packb(obj, use_bin_type=True), "m")
