"""Writing the chunk store (loader/store/_write.py, _layers.py, _gc.py and the
commands): snapshots read back byte for byte by a small reference reader written
here, deduplication, layers over a parent, push between stores (local and a real S3
server, SeaweedFS), and gc with a create racing it."""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Iterator

import msgpack
import pytest
from store_reference import assemble

from cli import main
from loader.store import CODEC_LZ4, CODEC_NONE, CODEC_ZSTD, CheckpointError, decode_manifest, manifest_digest
from loader.store._access import ChunkStore, open_store
from loader.store._gc import gc_store
from loader.store._write import create_snapshot, push_snapshot, read_manifest
from workloads import SeaweedServer, make_sample_image

KiB, MiB = 1 << 10, 1 << 20
CS = 256 * KiB  # small chunks: many rows in small images


def _text_image(path: str, size: int, seed: int = 1) -> bytes:
    """A compressible image: repetitive text in some chunks, random bytes in one, one
    chunk of explicit (allocated) zeros, and holes."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnop", k=rng.randint(3, 9))) for _ in range(300)]
    with open(path, "wb") as f:
        f.truncate(size)
        for c in range(0, size // CS):
            kind = c % 5
            if kind == 0:
                continue  # a hole
            f.seek(c * CS)
            if kind == 1:
                f.write(bytes(CS))  # allocated, all zero: never stored
            elif kind == 4 and c == 4:
                f.write(rng.randbytes(CS))  # incompressible: stored raw
            else:
                text = b" ".join(rng.choices(words, k=CS // 4))[: CS // 2]
                f.write(text)  # the chunk's other half is a hole: zero
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def store(tmp_path) -> ChunkStore:
    return open_store(str(tmp_path / "st"), create=True)


def test_a_snapshot_reads_back_byte_for_byte_and_stores_no_zero_chunk(tmp_path, store):
    image = str(tmp_path / "img")
    want = _text_image(image, 40 * CS)
    report = create_snapshot(image, store, "base", chunk_size=CS, threads=3)
    assert assemble(store, "base") == want
    m, _ = read_manifest(store, "base")
    assert m.chunk_size == CS and m.memory_size == len(want) and m.parent is None
    for i in range(len(m)):  # no row is all zero; every row with data is there
        assert want[m.offsets[i] : m.offsets[i] + CS] != bytes(CS)
    nonzero = [c for c in range(40) if want[c * CS : (c + 1) * CS] != bytes(CS)]
    assert list(m.offsets) == [c * CS for c in nonzero]
    assert report.zero_chunks == 8 and report.chunks == len(nonzero) == 24
    assert CODEC_NONE in m.codecs and CODEC_ZSTD in m.codecs  # the random chunk is stored raw
    assert report.ratio > 2 and report.new_chunks == len(set(m.unique_keys())) and report.dedup_bytes == (
        report.data_bytes - report.new_bytes)
    objects = {e.key for e in store.listing("chunks/")}
    assert objects == m.unique_keys()


def test_a_sample_image_round_trips_with_its_holes(tmp_path, store):
    image = str(tmp_path / "img")
    make_sample_image(image, 16 * MiB, seed=3)
    create_snapshot(image, store, "s", chunk_size=CS, threads=2)
    with open(image, "rb") as f:
        assert assemble(store, "s") == f.read()


def test_only_missing_chunks_are_written_and_the_manifest_last(tmp_path, store):
    image = str(tmp_path / "img")
    _text_image(image, 40 * CS)
    first = create_snapshot(image, store, "a", chunk_size=CS)
    again = create_snapshot(image, store, "b", chunk_size=CS)
    assert again.new_chunks == 0 and again.dedup_bytes == first.data_bytes
    m, _ = read_manifest(store, "a")
    assert m.offsets[0] == 2 * CS
    store.delete(m.key_at(0))  # one chunk is lost
    with open(image, "r+b") as f:  # another changes
        f.seek(7 * CS + 100)
        f.write(b"changed")
    third = create_snapshot(image, store, "c", chunk_size=CS)
    assert third.new_chunks == 2 and third.dedup_chunks == third.chunks - 2
    with open(image, "rb") as f:
        assert assemble(store, "c") == f.read()
    seen = []

    fresh = open_store(str(tmp_path / "fresh"), create=True)

    def before() -> None:
        seen.append((fresh.exists("snapshots/d"), len(fresh.listing("chunks/"))))
    create_snapshot(image, fresh, "d", chunk_size=CS, codec="none", before_manifest=before)
    assert seen == [(False, third.chunks)] and fresh.exists("snapshots/d")
    d, _ = read_manifest(fresh, "d")
    assert set(d.codecs) == {CODEC_NONE} and list(d.stored_lengths) == list(d.lengths)


def test_a_chunk_already_stored_otherwise_is_described_as_it_is_stored(tmp_path, store):
    """Chunks are named by their uncompressed bytes: a create that finds one stored raw
    (or at another level) names that object as it is, and so does a push."""
    image = str(tmp_path / "img")
    want = _text_image(image, 24 * CS)
    create_snapshot(image, store, "raw", chunk_size=CS, codec="none")
    packed = create_snapshot(image, store, "packed", chunk_size=CS, codec="zstd:19")
    assert packed.new_chunks == 0 and packed.ratio == 1.0
    assert set(read_manifest(store, "packed")[0].codecs) == {CODEC_NONE}
    assert assemble(store, "packed") == want
    other = open_store(str(tmp_path / "other"), create=True)
    create_snapshot(image, other, "z", chunk_size=CS)
    pushed = push_snapshot(store, "raw", other)  # other holds them compressed
    assert pushed.new_chunks == 0
    assert set(read_manifest(other, "raw")[0].codecs) == {CODEC_ZSTD, CODEC_NONE}
    assert assemble(other, "raw") == want
    assert push_snapshot(store, "raw", other).new_chunks == 0  # the same snapshot there: completed, not refused


def test_an_lz4_snapshot_reads_back_and_shares_a_store_with_zstd_chunks(tmp_path, store):
    """``--compress lz4``: LZ4 frames (read back here by another frame decoder), raw
    where LZ4 does not shrink a chunk.  Chunks are named by their uncompressed bytes, so
    a create or a push that finds one stored with the other codec names it as it is:
    which codec is told by the object's first bytes, not by its size."""
    image = str(tmp_path / "img")
    want = _text_image(image, 24 * CS)
    first = create_snapshot(image, store, "l", chunk_size=CS, codec="lz4", threads=2)
    m, _ = read_manifest(store, "l")
    assert set(m.codecs) == {CODEC_LZ4, CODEC_NONE} and first.codec == "lz4" and first.ratio > 2
    assert assemble(store, "l") == want
    again = create_snapshot(image, store, "z", chunk_size=CS, codec="zstd")  # finds them all, as lz4
    assert again.new_chunks == 0 and list(read_manifest(store, "z")[0].codecs) == list(m.codecs)
    assert assemble(store, "z") == want
    other = open_store(str(tmp_path / "other"), create=True)
    create_snapshot(image, other, "z", chunk_size=CS, codec="zstd")
    pushed = push_snapshot(store, "l", other)  # other holds them as zstd
    assert pushed.new_chunks == 0 and pushed.codec == "none/zstd"
    assert set(read_manifest(other, "l")[0].codecs) == {CODEC_ZSTD, CODEC_NONE}
    assert assemble(other, "l") == want
    third = open_store(str(tmp_path / "third"), create=True)
    copied = push_snapshot(store, "l", third)  # copied as stored: lz4 objects, the manifest byte for byte
    assert copied.new_chunks == len(m.unique_keys())
    assert third.get("snapshots/l", 1 << 20) == store.get("snapshots/l", 1 << 20)
    assert assemble(third, "l") == want


def test_a_found_object_that_is_neither_raw_nor_a_known_frame_is_put_again(tmp_path, store):
    """A damaged object in the store (its size not its chunk's, its first bytes no
    codec's magic) is not named by a new snapshot: it is put again."""
    image = str(tmp_path / "img")
    want = _text_image(image, 24 * CS)
    create_snapshot(image, store, "a", chunk_size=CS, codec="lz4")
    m, _ = read_manifest(store, "a")
    i = m.codecs.index(CODEC_LZ4)
    path = os.path.join(store.root, m.key_at(i))
    with open(path, "r+b") as f:
        f.write(b"\0\0\0\0")
    again = create_snapshot(image, store, "b", chunk_size=CS, codec="zstd")
    assert again.new_chunks == 1
    assert read_manifest(store, "b")[0].codecs[i] == CODEC_ZSTD
    assert assemble(store, "b") == want


def test_bad_input_is_one_line(tmp_path, store):
    image = str(tmp_path / "img")
    _text_image(image, 8 * CS)
    create_snapshot(image, store, "a", chunk_size=CS)
    for kwargs, words in (
        (dict(name="a"), "already there"),
        (dict(name=".x"), "not a snapshot name"),
        (dict(name="b", codec="lz4:9"), "one of zstd, zstd:LEVEL, lz4, none"),
        (dict(name="b", codec="gzip"), "one of zstd, zstd:LEVEL, lz4, none"),
        (dict(name="b", codec="zstd:x"), "LEVEL is an integer"),
        (dict(name="b", chunk_size=3 * MiB), "not a power of two"),
        (dict(name="b", parent="nope"), "st/snapshots/nope"),
    ):
        with pytest.raises((CheckpointError, ValueError), match=words) as info:
            create_snapshot(image, store, **{"chunk_size": CS, **kwargs})  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
    with open(str(tmp_path / "odd"), "wb") as f:
        f.write(b"x" * 5000)
    with pytest.raises(CheckpointError, match="not a multiple of the page size"):
        create_snapshot(str(tmp_path / "odd"), store, "odd", chunk_size=CS)


# -- layers ---------------------------------------------------------------------------


def _diff_pair(tmp_path, size: int, dirty_pages: list[int]) -> tuple[str, str, bytes]:
    """A parent image, a Firecracker-style diff (a sparse file holding only the dirtied
    pages, at their offsets) and the full image at the diff's moment."""
    rng = random.Random(7)
    parent = str(tmp_path / "parent.mem")
    base = bytearray(_text_image(parent, size))
    diff = str(tmp_path / "diff.mem")
    full = bytearray(base)
    with open(diff, "wb") as f:
        f.truncate(size)
        for n, page in enumerate(dirty_pages):
            data = bytes(4096) if n == 0 else rng.randbytes(4096)  # the first dirtied page became zero
            f.seek(page * 4096)
            f.write(data)
            full[page * 4096 : (page + 1) * 4096] = data
    return parent, diff, bytes(full)


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_a_layer_is_its_parent_except_where_pages_were_dirtied(tmp_path, store, codec):
    """(The parent's chunks are read back, decoded and checked to rebuild the dirtied
    ones: zstd or lz4.)"""
    pages_per_chunk = CS // 4096
    # dirtied: a page in a text chunk (2) made zero, pages in chunks 7 and 8 (text), 10 (a hole in the
    # parent), 11 (explicit zeros in the parent), and two in chunk 22
    dirty = [2 * pages_per_chunk + 5, 7 * pages_per_chunk, 8 * pages_per_chunk + 63, 10 * pages_per_chunk + 1,
             11 * pages_per_chunk + 9, 22 * pages_per_chunk + 3, 22 * pages_per_chunk + 4]
    parent, diff, full = _diff_pair(tmp_path, 40 * CS, dirty)
    create_snapshot(parent, store, "base", chunk_size=CS, codec=codec)
    report = create_snapshot(diff, store, "child", parent="base", chunk_size=1 * MiB,  # takes its parent's size
                             codec=codec)
    pm, pdata = read_manifest(store, "base")
    cm, _ = read_manifest(store, "child")
    assert cm.parent == "base" and cm.parent_digest == manifest_digest(pdata) and cm.chunk_size == CS
    dirty_chunks = {p * 4096 // CS * CS for p in dirty}
    parent_rows = {pm.offsets[i]: pm.hash_at(i) for i in range(len(pm))}
    child_rows = {cm.offsets[i]: cm.hash_at(i) for i in range(len(cm))}
    assert {o: h for o, h in child_rows.items() if o not in dirty_chunks} == {
        o: h for o, h in parent_rows.items() if o not in dirty_chunks}
    for off in dirty_chunks:
        assert child_rows.get(off) != parent_rows.get(off)
    assert 10 * CS in child_rows and 11 * CS in child_rows  # new data where the parent had none
    assert report.inherited_chunks == len(parent_rows.keys() - dirty_chunks)
    assert report.new_chunks == len(dirty_chunks)
    assert assemble(store, "child") == full


def test_a_layer_of_the_wrong_size_is_refused(tmp_path, store):
    parent, diff, _ = _diff_pair(tmp_path, 8 * CS, [3])
    create_snapshot(parent, store, "base", chunk_size=CS)
    with open(diff, "r+b") as f:
        f.truncate(16 * CS)
    with pytest.raises(CheckpointError, match="but the parent base is a memory of 2097152 bytes"):
        create_snapshot(diff, store, "child", parent="base")


def test_a_corrupt_parent_chunk_is_refused_not_copied(tmp_path, store):
    parent, diff, _ = _diff_pair(tmp_path, 8 * CS, [2 * CS // 4096])
    create_snapshot(parent, store, "base", chunk_size=CS)
    pm, _ = read_manifest(store, "base")
    row = list(pm.offsets).index(2 * CS)
    path = os.path.join(store.where, pm.key_at(row))
    with open(path, "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError) as info:
        create_snapshot(diff, store, "child", parent="base")
    assert pm.key_at(row) in str(info.value) and not store.exists("snapshots/child")


# -- push -----------------------------------------------------------------------------


def test_push_copies_only_missing_chunks_and_checks_them(tmp_path, store):
    image = str(tmp_path / "img")
    want = _text_image(image, 24 * CS)
    create_snapshot(image, store, "a", chunk_size=CS)
    dest = open_store(str(tmp_path / "dest"), create=True)
    first = push_snapshot(store, "a", dest)
    assert assemble(dest, "a") == want and first.new_chunks == len(read_manifest(store, "a")[0].unique_keys())
    assert dest.get("snapshots/a", 1 << 20) == store.get("snapshots/a", 1 << 20)  # byte for byte
    assert push_snapshot(store, "a", dest).new_chunks == 0
    m, _ = read_manifest(store, "a")
    dest.delete(m.key_at(0))
    dest.delete("snapshots/a")
    assert push_snapshot(store, "a", dest).new_chunks == 1
    # a corrupt chunk in the source is not copied, and no manifest is put
    other = open_store(str(tmp_path / "other"), create=True)
    with open(os.path.join(store.where, m.key_at(1)), "r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(CheckpointError, match=m.key_at(1)):
        push_snapshot(store, "a", other, threads=1)
    assert not other.exists("snapshots/a")


# -- gc -------------------------------------------------------------------------------


def _age(store: ChunkStore, keys: set[str], seconds: float) -> None:
    for key in keys:
        path = os.path.join(store.where, key)
        t = os.stat(path).st_mtime - seconds
        os.utime(path, (t, t))


def test_gc_deletes_only_unreferenced_chunks_older_than_the_grace(tmp_path, store):
    image = str(tmp_path / "img")
    _text_image(image, 24 * CS)
    create_snapshot(image, store, "a", chunk_size=CS)
    with open(image, "r+b") as f:
        f.seek(2 * CS)
        f.write(b"other")
    create_snapshot(image, store, "b", chunk_size=CS)
    a, b = read_manifest(store, "a")[0].unique_keys(), read_manifest(store, "b")[0].unique_keys()
    only_a = a - b
    assert len(only_a) == 1
    store.delete("snapshots/a")
    report = gc_store(store, grace=60)
    assert report.deleted == 0 and report.young == 1  # unreferenced, but young
    _age(store, a | b, 120)
    dry = gc_store(store, grace=60, dry_run=True)
    assert dry.deleted == 1 and store.exists(next(iter(only_a)))
    report = gc_store(store, grace=60)
    assert report.deleted == 1 and report.referenced == len(b)
    assert {e.key for e in store.listing("chunks/")} == b
    with open(image, "rb") as f:
        assert assemble(store, "b") == f.read()


def test_gc_during_a_create_loses_none_of_its_chunks(tmp_path, store):
    """The race: a create has put its chunks but not its manifest when gc runs."""
    image = str(tmp_path / "img")
    want = _text_image(image, 24 * CS)
    runs = []

    def gc_now() -> None:
        runs.append(gc_store(store, grace=30))
    create_snapshot(image, store, "a", chunk_size=CS, before_manifest=gc_now)
    assert runs[0].chunks > 0 and runs[0].referenced == 0 and runs[0].deleted == 0
    assert assemble(store, "a") == want


def test_gc_during_a_create_that_reuses_an_old_unreferenced_chunk_loses_none(tmp_path, store):
    """The other race: the chunks a create finds in the store (deduplicated, not put) are
    old and unreferenced (their snapshot was deleted): the create makes them young."""
    image = str(tmp_path / "img")
    want = _text_image(image, 24 * CS)
    create_snapshot(image, store, "old", chunk_size=CS)
    keys = read_manifest(store, "old")[0].unique_keys()
    store.delete("snapshots/old")
    _age(store, keys, 7200)
    runs = []

    def gc_now() -> None:
        runs.append(gc_store(store, grace=3600))
    report = create_snapshot(image, store, "new", chunk_size=CS, before_manifest=gc_now, grace=3600)
    assert report.new_chunks == 0 and runs[0].deleted == 0
    assert assemble(store, "new") == want


def test_gc_stops_at_a_manifest_it_cannot_read(tmp_path, store):
    image = str(tmp_path / "img")
    _text_image(image, 8 * CS)
    create_snapshot(image, store, "a", chunk_size=CS)
    store.put("snapshots/broken", msgpack.packb({"format": "pageload-store", "version": 9}))
    _age(store, {e.key for e in store.listing("chunks/")}, 7200)
    with pytest.raises(CheckpointError, match="broken: unsupported store manifest version 9.*gc stopped"):
        gc_store(store, grace=0)
    assert len(store.listing("chunks/")) == len(read_manifest(store, "a")[0].unique_keys())


# -- the commands ---------------------------------------------------------------------


def test_the_commands(tmp_path, capsys):
    image = str(tmp_path / "img")
    want = _text_image(image, 16 * CS)
    st = str(tmp_path / "st")
    assert main(["checkpoint", "create", image, st, "--name", "a", "--chunk-size", "256K", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chunks"] > 0 and out["ratio"] > 1 and out["snapshot"] == f"{st}/snapshots/a"
    assert main(["checkpoint", "create", image, st, "--name", "b", "--compress", "zstd:19"]) == 0
    assert "deduplicated" in capsys.readouterr().out
    assert main(["checkpoint", "push", f"{st}/snapshots/a", str(tmp_path / "d1")]) == 0
    assert main(["checkpoint", "push", f"{st}/a", f"file://{tmp_path}/d2"]) == 0  # STORE/NAME: unambiguous here
    out = capsys.readouterr().out
    assert "pushed" in out
    for d in ("d1", "d2"):
        assert assemble(open_store(str(tmp_path / d)), "a") == want
    assert main(["store", "gc", st, "--dry-run"]) == 0
    assert "would delete 0" in capsys.readouterr().out
    assert main(["checkpoint", "create", image, st, "--name", "a"]) == 2
    assert main(["checkpoint", "create", image, str(tmp_path / "p"), "--compress", "none"]) == 2
    assert main(["store", "gc", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("pageload: ") for line in err), err
    assert "already there" in err[0] and "--compress is for a snapshot in a chunk store" in err[1]


# -- S3 (a real server) -----------------------------------------------------------------


@pytest.fixture
def s3_env(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_access_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    yield f"s3://{seaweed.bucket}/t-{uuid.uuid4().hex[:12]}"


def test_create_push_and_gc_in_s3(tmp_path, store, s3_env, capsys):
    image = str(tmp_path / "img")
    want = _text_image(image, 24 * CS)
    remote = open_store(s3_env, create=True)
    report = create_snapshot(image, remote, "base", chunk_size=CS)
    assert report.new_chunks > 0 and assemble(remote, "base") == want
    assert create_snapshot(image, remote, "again", chunk_size=CS).new_chunks == 0
    # an lz4 create finds every chunk there as zstd (or raw): told by a ranged GET of each one's magic
    assert create_snapshot(image, remote, "l", chunk_size=CS, codec="lz4").new_chunks == 0
    base_codecs = read_manifest(remote, "base")[0].codecs
    assert read_manifest(remote, "l")[0].codecs == base_codecs and CODEC_ZSTD in base_codecs
    remote.delete("snapshots/l")
    # a layer in S3
    with open(image, "r+b") as f:
        f.truncate(0)
        f.truncate(24 * CS)
        f.seek(3 * CS)
        f.write(b"dirty" * 100)
    full = bytearray(want)
    full[3 * CS : 3 * CS + 4096] = (b"dirty" * 100).ljust(4096, b"\0")  # a dirtied page is written whole
    create_snapshot(image, remote, "child", parent="base")
    assert assemble(remote, "child") == bytes(full)
    # push S3 -> local, then local -> S3 (another prefix) with the command
    pushed = push_snapshot(remote, "child", store)
    assert pushed.new_chunks == len(read_manifest(remote, "child")[0].unique_keys())
    assert assemble(store, "child") == bytes(full)
    other = s3_env + "-copy"
    assert main(["checkpoint", "push", f"{store.where}/snapshots/child", other]) == 0
    assert assemble(open_store(other), "child") == bytes(full)
    assert main(["checkpoint", "push", f"{other}/snapshots/child", s3_env]) == 0  # all there already
    assert "new 0 B in 0 chunks" in capsys.readouterr().out
    # gc: nothing is unreferenced; then, the layer and its parent deleted, only 'again''s chunks stay
    assert gc_store(remote, grace=0).deleted == 0
    child_only = read_manifest(remote, "child")[0].unique_keys() - read_manifest(remote, "again")[0].unique_keys()
    remote.delete("snapshots/child")
    remote.delete("snapshots/base")
    assert gc_store(remote, grace=3600).deleted == 0  # young
    report = gc_store(remote, grace=0)
    assert report.deleted == len(child_only) and report.snapshots == 1
    assert assemble(remote, "again") == want
    with pytest.raises(CheckpointError, match="snapshots/child"):
        read_manifest(remote, "child")
    assert decode_manifest(remote.get("snapshots/again", 1 << 20), "x").chunk_size == CS
