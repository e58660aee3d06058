"""Checkpoint formats: raw images, pages checkpoints, create/inspect/verify, the CLI, samples."""

from __future__ import annotations

import errno
import json
import mmap
import os
import sys
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import xxhash

from cli import main
from loader.checkpoint import (
    DEFAULT_CHUNK_SIZE,
    CheckpointError,
    _raw,
    create_checkpoint,
    inspect_checkpoint,
    open_checkpoint,
    verify_checkpoint,
)
from workloads import make_sample_image

PS = 4096
MiB = 1 << 20


def _fs_reports_holes(directory: Path) -> bool:
    probe = directory / "hole-probe"
    with open(probe, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(2 * MiB)
        f.write(b"x" * PS)
        f.flush()
        try:
            first = os.lseek(f.fileno(), 0, os.SEEK_DATA)
        except OSError:
            first = 0
    probe.unlink()
    return first > 0


@pytest.fixture
def holes_ok(tmp_path: Path) -> None:
    if not _fs_reports_holes(tmp_path):
        pytest.skip(f"the file system of {tmp_path} does not report holes via SEEK_DATA")


def _nonzero_pages(data: bytes) -> list[tuple[int, int]]:
    """The non-zero pages of ``data`` as merged (start, end) runs, the slow obvious way."""
    zero = bytes(PS)
    runs: list[tuple[int, int]] = []
    for off in range(0, len(data), PS):
        if data[off : off + PS] != zero:
            if runs and runs[-1][1] == off:
                runs[-1] = (runs[-1][0], off + PS)
            else:
                runs.append((off, off + PS))
    return runs


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "mem.img"
    make_sample_image(
        str(path), 8 * MiB, seed=7, hole_granularity=256 * 1024, zero_page_fraction=0.1
    )
    return path


@pytest.fixture
def ckpt(image: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    create_checkpoint(str(image), str(out), chunk_size=64 * 1024)
    return out


# -- raw images -------------------------------------------------------------------


def test_raw_layout_from_sparse_file(tmp_path: Path, holes_ok: None) -> None:
    path = tmp_path / "sparse.img"
    size = 16 * MiB
    written = [(1 * MiB + 10, 100), (5 * MiB, 3 * PS), (12 * MiB + PS, PS)]
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in written:
            f.seek(off)
            f.write(b"\xaa" * n)
    ck = open_checkpoint(str(path))
    assert ck.kind == "raw" and ck.pages_path == str(path)
    assert ck.layout.memory_size == size and ck.checksums is None
    ranges = list(ck.layout)
    assert len(ranges) == len(written)  # one extent per write: they are megabytes apart
    for (off, n), r in zip(written, ranges, strict=True):
        assert r.mem_offset <= off and off + n <= r.mem_offset + r.length
        assert r.file_offset == r.mem_offset
        assert r.mem_offset % PS == 0 and r.length % PS == 0
    for hole in (0, 3 * MiB, 8 * MiB, size - PS):
        assert ck.layout.find(hole) == -1


def _fake_lseek(extents: list[tuple[int, int]], size: int) -> Callable[[int, int, int], int]:
    def lseek(fd: int, off: int, whence: int) -> int:
        if whence == os.SEEK_DATA:
            for start, end in extents:
                if end > off:
                    return max(start, off)
            raise OSError(errno.ENXIO, "no more data")
        assert whence == os.SEEK_HOLE
        for start, end in extents:
            if start <= off < end:
                return end
        return min(off, size)

    return lseek


def test_data_extents_round_out_and_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    size = 10 * PS
    extents = [(10, 100), (2 * PS + 5, 3 * PS), (3 * PS, 3 * PS + 1), (8 * PS, 9 * PS)]
    monkeypatch.setattr(os, "lseek", _fake_lseek(extents, size))
    assert _raw.data_extents(0, size, PS) == [(0, PS), (2 * PS, 4 * PS), (8 * PS, 9 * PS)]


def test_data_extents_all_hole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "lseek", _fake_lseek([], 4 * PS))
    assert _raw.data_extents(0, 4 * PS, PS) == []


def test_data_extents_without_seek_data_is_all_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def lseek(fd: int, off: int, whence: int) -> int:
        raise OSError(errno.EINVAL, "SEEK_DATA not supported")

    monkeypatch.setattr(os, "lseek", lseek)
    assert _raw.data_extents(0, 4 * PS, PS) == [(0, 4 * PS)]


@pytest.mark.parametrize("run_pages", [[], [0], [3], [0, 1, 2, 3], [1, 2], [0, 3], [1, 3]])
def test_nonzero_runs_on_page_patterns(run_pages: list[int]) -> None:
    buf = bytearray(4 * PS + 8)  # slack past hi, to check it is ignored
    for p in run_pages:
        buf[p * PS + PS - 1] = 1
    buf[-1] = 1
    # zero bytes straddling page boundaries must not make a zero page
    buf[2 * PS - 10 : 2 * PS + 10] = bytes(20)
    expected = _nonzero_pages(bytes(buf[: 4 * PS]))
    assert list(_raw.nonzero_runs(buf, 0, 4 * PS, PS)) == expected


def test_nonzero_runs_unaligned_zero_run_is_not_a_zero_page() -> None:
    buf = bytearray(b"\x01" * (3 * PS))
    buf[PS // 2 : PS // 2 + PS] = bytes(PS)  # a page's worth of zeros across pages 0 and 1
    assert list(_raw.nonzero_runs(buf, 0, 3 * PS, PS)) == [(0, 3 * PS)]


# -- create / open / inspect / verify ---------------------------------------------


def test_create_keeps_exactly_the_nonzero_pages(image: Path, ckpt: Path) -> None:
    data = image.read_bytes()
    ck = open_checkpoint(str(ckpt))
    assert ck.kind == "pages" and ck.pages_path == str(ckpt / "pages.img")
    assert ck.layout.memory_size == len(data) and ck.layout.page_size == PS
    assert [(r.mem_offset, r.mem_offset + r.length) for r in ck.layout] == _nonzero_pages(data)
    pages = (ckpt / "pages.img").read_bytes()
    position = 0
    for r in ck.layout:
        assert r.file_offset == position  # written back to back, in memory order
        assert (
            pages[r.file_offset : r.file_offset + r.length]
            == data[r.mem_offset : r.mem_offset + r.length]
        )
        position += r.length
    assert position == len(pages) == ck.layout.data_bytes


def test_zero_pages_inside_data_extents_are_dropped(image: Path, ckpt: Path) -> None:
    data = image.read_bytes()
    raw = open_checkpoint(str(image))
    zero = bytes(PS)
    zero_in_data = [
        off
        for r in raw.layout
        for off in range(r.mem_offset, r.mem_offset + r.length, PS)
        if data[off : off + PS] == zero
    ]
    assert zero_in_data, "the sample should put zero pages inside data extents"
    layout = open_checkpoint(str(ckpt)).layout
    assert all(layout.find(off) == -1 for off in zero_in_data)


def test_open_accepts_the_index_file_itself(ckpt: Path) -> None:
    ck = open_checkpoint(str(ckpt / "index.msgpack"))
    assert ck.kind == "pages" and ck.path == str(ckpt / "index.msgpack")
    assert ck.pages_path == str(ckpt / "pages.img")
    fd = ck.open_pages()
    try:
        r = ck.layout[0]
        assert (
            os.pread(fd, r.length, r.file_offset) == (ckpt / "pages.img").read_bytes()[: r.length]
        )
    finally:
        os.close(fd)


def test_inspect_numbers(image: Path, ckpt: Path, holes_ok: None) -> None:
    data = image.read_bytes()
    nonzero = _nonzero_pages(data)
    raw = inspect_checkpoint(str(image))
    info = inspect_checkpoint(str(ckpt))
    data_bytes = sum(e - s for s, e in nonzero)
    assert info["kind"] == "pages" and raw["kind"] == "raw"
    assert info["memory_size"] == raw["memory_size"] == len(data)
    assert info["data_bytes"] == info["pages_file_size"] == data_bytes
    assert info["zero_bytes_skipped"] == len(data) - data_bytes
    assert info["ranges"] == len(nonzero)
    assert info["hole_bytes"] == raw["hole_bytes"] == len(data) - raw["data_bytes"] > 0
    assert info["zero_page_bytes"] == raw["data_bytes"] - data_bytes > 0
    assert info["chunk_size"] == 64 * 1024
    assert info["chunks"] == -(-data_bytes // (64 * 1024))
    assert info["checksum"] == "xxh3_64" and raw["checksum"] is None


def test_create_report_matches_inspect(image: Path, tmp_path: Path) -> None:
    report = create_checkpoint(str(image), str(tmp_path / "c2"))
    info = inspect_checkpoint(str(tmp_path / "c2"))
    assert report.memory_size == info["memory_size"]
    assert report.data_bytes == info["data_bytes"]
    assert report.ranges == info["ranges"]
    assert report.zero_bytes_skipped == info["zero_bytes_skipped"]
    assert report.chunk_size == info["chunk_size"] == DEFAULT_CHUNK_SIZE == 16 * 1024
    assert report.chunks == info["chunks"] == -(-report.data_bytes // DEFAULT_CHUNK_SIZE)


def test_verify_passes_then_names_the_flipped_chunk(ckpt: Path) -> None:
    report = verify_checkpoint(str(ckpt))
    assert report.verified and report.ok and report.bad_chunks == ()
    assert report.bytes_checked == (ckpt / "pages.img").stat().st_size
    ck = open_checkpoint(str(ckpt))
    flip_at = 3 * 64 * 1024 + 123  # in chunk 3
    with open(ckpt / "pages.img", "r+b") as f:
        f.seek(flip_at)
        byte = f.read(1)
        f.seek(flip_at)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = verify_checkpoint(str(ckpt))
    assert not report.ok
    assert [b.index for b in report.bad_chunks] == [3]
    bad = report.bad_chunks[0]
    assert bad.file_offset == 3 * 64 * 1024
    i = next(
        i for i, r in enumerate(ck.layout) if r.file_offset <= flip_at < r.file_offset + r.length
    )
    flipped_mem = ck.layout.mem_at(i) + flip_at - ck.layout.file_at(i)
    assert any(lo <= flipped_mem < hi for lo, hi in bad.memory)
    assert sum(hi - lo for lo, hi in bad.memory) == bad.length


def test_verify_raw_image_says_nothing_to_verify(image: Path) -> None:
    report = verify_checkpoint(str(image))
    assert report.ok and not report.verified
    assert "nothing to verify" in report.lines()[0]


def test_all_zero_image(tmp_path: Path) -> None:
    image = tmp_path / "zero.img"
    with open(image, "wb") as f:
        f.write(bytes(16 * PS))  # allocated zeros, not holes
    create_checkpoint(str(image), str(tmp_path / "z"))
    ck = open_checkpoint(str(tmp_path / "z"))
    assert len(ck.layout) == 0 and ck.layout.memory_size == 16 * PS
    assert (tmp_path / "z" / "pages.img").stat().st_size == 0
    report = verify_checkpoint(str(tmp_path / "z"))
    assert report.ok and report.chunks == 0


def test_create_refuses_existing_output(image: Path, ckpt: Path) -> None:
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(CheckpointError, match="already exists") as info:
        create_checkpoint(str(image), str(ckpt))
    assert str(ckpt) in str(info.value)
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_failed_create_leaves_nothing_behind(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    before = set(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match="Input/output error"):
        create_checkpoint(str(image), str(tmp_path / "never"))
    assert set(os.listdir(tmp_path)) == before


# -- bad input ----------------------------------------------------------------------

Mutation = Callable[[Path, dict[str, Any]], Any]


def _set(**changes: Any) -> Mutation:
    def mutate(ckpt: Path, index: dict[str, Any]) -> Any:
        index.update(changes)
        return index

    return mutate


def _drop(name: str) -> Mutation:
    def mutate(ckpt: Path, index: dict[str, Any]) -> Any:
        del index[name]
        return index

    return mutate


def _ranges(edit: Callable[[list[list[int]]], None]) -> Mutation:
    def mutate(ckpt: Path, index: dict[str, Any]) -> Any:
        edit(index["ranges"])
        return index

    return mutate


def _raw_bytes(data: bytes) -> Mutation:
    return lambda ckpt, index: data


def _truncated(ckpt: Path, index: dict[str, Any]) -> Any:
    return msgpack.packb(index)[:-7]


def _shorten_pages(ckpt: Path, index: dict[str, Any]) -> Any:
    os.truncate(ckpt / "pages.img", index["pages_size"] - PS)
    return index


def _remove_pages(ckpt: Path, index: dict[str, Any]) -> Any:
    (ckpt / "pages.img").unlink()
    return index


def _overlap(r: list[list[int]]) -> None:
    r[1][0] = r[0][0] + r[0][1] - PS  # shares range 0's last page


def _swap(r: list[list[int]]) -> None:
    r[0], r[1] = r[1], r[0]


BAD_INDEXES: list[tuple[str, Mutation, str, str]] = [
    ("version", _set(version=3), "index.msgpack", "unsupported format version 3"),
    ("garbage", _raw_bytes(b"\xc1\xff garbage"), "index.msgpack", "not a msgpack index"),
    ("empty", _raw_bytes(b""), "index.msgpack", "empty index"),
    ("truncated", _truncated, "index.msgpack", "truncated index"),
    ("trailing", lambda c, i: msgpack.packb(i) + b"\x00", "index.msgpack", "trailing bytes"),
    ("not a map", _raw_bytes(msgpack.packb([1, 2, 3])), "index.msgpack", "not a map"),
    ("int keys", _raw_bytes(msgpack.packb({1: 2})), "index.msgpack", "not a msgpack index"),
    ("no magic", _drop("format"), "index.msgpack", "not a pageload checkpoint"),
    ("missing ranges", _drop("ranges"), "index.msgpack", "missing field 'ranges'"),
    ("missing size", _drop("memory_size"), "index.msgpack", "missing field 'memory_size'"),
    (
        "str page size",
        _set(page_size="4096"),
        "index.msgpack",
        "field 'page_size' is a str, not an int",
    ),
    ("bool version", _set(version=True), "index.msgpack", "field 'version' is a bool, not an int"),
    ("negative", _ranges(lambda r: r[0].__setitem__(0, -PS)), "index.msgpack", "ranges[0]"),
    ("pair", _ranges(lambda r: r[0].pop()), "index.msgpack", "ranges[0]"),
    ("overlap", _ranges(_overlap), "index.msgpack", "overlaps"),
    ("unsorted", _ranges(_swap), "index.msgpack", "overlaps or precedes"),
    ("past end", _set(memory_size=PS), "index.msgpack", "runs past the memory size"),
    (
        "unaligned",
        _ranges(lambda r: r[0].__setitem__(0, r[0][0] + 8)),
        "index.msgpack",
        "not page-aligned",
    ),
    (
        "page size",
        _set(page_size=3000, chunk_size=3000 * 64),
        "index.msgpack",
        "not a power of two",
    ),
    ("algorithm", _set(checksum="md5"), "index.msgpack", "unknown checksum algorithm"),
    (
        "checksums",
        lambda c, i: {**i, "checksums": i["checksums"][:-8]},
        "index.msgpack",
        "checksums for a",
    ),
    (
        "bad checksum",
        lambda c, i: {**i, "checksums": ["x"] * len(i["checksums"])},
        "index.msgpack",
        "checksums[0]",
    ),
    (
        "checksum bytes",
        lambda c, i: {**i, "checksums": i["checksums"][:-1]},
        "index.msgpack",
        "not a multiple of 8",
    ),
    ("pages short", _shorten_pages, "pages.img", "shorter than the index says"),
    ("pages missing", _remove_pages, "pages.img", "pages file missing"),
]


def _column(values: list[int]) -> bytes:
    return array("Q", values).tobytes() if sys.byteorder == "little" else _swapped(values)


def _swapped(values: list[int]) -> bytes:
    a = array("Q", values)
    a.byteswap()
    return a.tobytes()


def as_version_1(index: dict[str, Any]) -> dict[str, Any]:
    """A version 2 index (the range table in binary columns) as version 1 would hold it."""
    if index.get("version") != 2:
        return index
    cols = []
    for name in ("range_mem", "range_length", "range_file"):
        a = array("Q")
        a.frombytes(index.pop(name))
        if sys.byteorder != "little":
            a.byteswap()
        cols.append(a)
    return {**index, "version": 1, "ranges": [list(t) for t in zip(*cols)]}


def test_version_1_and_version_2_indexes_open_alike(ckpt: Path) -> None:
    """The index is written as version 2 (binary columns); one rewritten as version 1
    (a list of triples, as older pageloads wrote) opens to the same layout."""
    index_path = ckpt / "index.msgpack"
    index = msgpack.unpackb(index_path.read_bytes())
    assert index["version"] == 2 and "ranges" not in index and isinstance(index["range_mem"], bytes)
    v2 = open_checkpoint(str(ckpt)).layout
    index_path.write_bytes(msgpack.packb(as_version_1(index)))
    v1 = open_checkpoint(str(ckpt)).layout
    assert list(v1) == list(v2) and len(v2) >= 2
    assert v1.mem_pages == v2.mem_pages and v1.len_pages == v2.len_pages and v1.file_pages == v2.file_pages


def _v2_set(**fields: Any) -> Mutation:
    return lambda c, i: {**i, **fields}


def _v2_cut(name: str) -> Mutation:
    return lambda c, i: {**i, name: i[name][:-8]}


BAD_V2_INDEXES: list[tuple[str, Mutation, str]] = [
    ("list, not bin", lambda c, i: {**i, "range_mem": list(i["range_mem"])},
     "field 'range_mem' is missing or not binary"),
    ("missing column", lambda c, i: {k: v for k, v in i.items() if k != "range_file"},
     "field 'range_file' is missing or not binary"),
    ("short column", _v2_cut("range_length"), "field 'range_length' holds"),
    ("ragged", _v2_set(range_mem=b"\0" * 12), "not a whole number of 8-byte values"),
    ("overlap", lambda c, i: {**i, "range_mem": _column([0] * (len(i["range_mem"]) // 8))}, "overlaps or precedes"),
    ("unaligned", lambda c, i: {**i, "range_file": _column([8] + [0] * (len(i["range_file"]) // 8 - 1))},
     "not page-aligned"),
    ("past 2**64", lambda c, i: {**i, "range_mem": _column([(1 << 64) - PS] * (len(i["range_mem"]) // 8))},
     "runs past"),
]


@pytest.mark.parametrize(("mutate", "problem"), [pytest.param(m, p, id=name) for name, m, p in BAD_V2_INDEXES])
def test_bad_version_2_columns_are_named(ckpt: Path, mutate: Mutation, problem: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    index_path = ckpt / "index.msgpack"
    index = msgpack.unpackb(index_path.read_bytes())
    index_path.write_bytes(msgpack.packb(mutate(ckpt, index), use_bin_type=True))
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(str(ckpt))
    message = str(info.value)
    assert message.startswith(f"{index_path}: ") and problem in message and "\n" not in message, message
    capsys.readouterr()
    assert main(["checkpoint", "inspect", str(ckpt)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(
    ("mutate", "culprit", "problem"),
    [pytest.param(m, c, p, id=name) for name, m, c, p in BAD_INDEXES],
)
def test_bad_checkpoint_raises_naming_the_file(
    ckpt: Path, mutate: Mutation, culprit: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    index_path = ckpt / "index.msgpack"
    index = as_version_1(msgpack.unpackb(index_path.read_bytes()))  # the list of triples: every field hostile
    assert len(index["ranges"]) >= 2
    result = mutate(ckpt, index)
    index_path.write_bytes(result if isinstance(result, bytes) else msgpack.packb(result))
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(str(ckpt))
    message = str(info.value)
    assert message.startswith(f"{ckpt / culprit}: "), message
    assert problem in message and "\n" not in message
    # the same through the CLI: one line on stderr, exit code 2
    capsys.readouterr()
    assert main(["checkpoint", "inspect", str(ckpt)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"pageload: {message}\n"


def test_bad_raw_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"\x01" * (PS + 1))
    with pytest.raises(CheckpointError, match="not a multiple of the page size") as info:
        open_checkpoint(str(odd))
    assert str(info.value).startswith(f"{odd}: ")
    with pytest.raises(CheckpointError, match="not a multiple of the page size"):
        create_checkpoint(str(odd), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    missing = tmp_path / "missing.img"
    with pytest.raises(CheckpointError, match=f"^{missing}: No such file"):
        open_checkpoint(str(missing))
    empty_dir = tmp_path / "not-a-checkpoint"
    empty_dir.mkdir()
    with pytest.raises(CheckpointError, match="index.msgpack: missing"):
        open_checkpoint(str(empty_dir))
    for argv in (
        ["checkpoint", "create", str(odd), str(tmp_path / "out")],
        ["checkpoint", "verify", str(missing)],
        ["checkpoint", "inspect", str(empty_dir)],
    ):
        capsys.readouterr()
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert err.startswith("pageload: ") and err.count("\n") == 1 and "Traceback" not in err


# -- the CLI --------------------------------------------------------------------------


def test_cli_create_inspect_verify(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli-ckpt"
    assert main(["checkpoint", "create", str(image), str(out), "--chunk-size", "64K"]) == 0
    assert "ranges" in capsys.readouterr().out
    assert main(["checkpoint", "inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == json.loads(json.dumps(inspect_checkpoint(str(out))))
    assert main(["checkpoint", "inspect", str(out)]) == 0
    assert "pages checkpoint" in capsys.readouterr().out
    assert main(["checkpoint", "verify", str(out)]) == 0
    assert ": ok:" in capsys.readouterr().out
    with open(out / "pages.img", "r+b") as f:
        f.write(b"\x5a" * 8)  # chunk 0
    assert main(["checkpoint", "verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "CORRUPT" in text and "chunk 0 " in text


@pytest.mark.parametrize("argv, words", [
    (["checkpoint"], "required: ACTION"),
    (["checkpoint", "nope"], "invalid choice: 'nope'"),
    (["checkpoint", "create", "x"], "required: OUT"),
    (["checkpoint", "sample", "x", "--size", "1Q"], "not a size: '1Q'"),
    (["checkpoint", "inspect", "x", "--bogus"], "unrecognized arguments: --bogus"),
    # every other command reports usage errors the same way
    (["nope"], "invalid choice: 'nope'"),
    (["trace"], "required: SUBCOMMAND"),
    (["wait", "--socket", "s", "0"], "required: LENGTH"),
    (["stats"], "required: --socket"),
    (["loadgen", "--trace", "t", "--rate", "x"], "invalid"),
    (["working-set", "show"], "required: FILE"),
    (["bench", "--size", "1Q"], "not a size: '1Q'"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["restore", "img", "--socket", "s", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_usage_errors_are_one_line(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("pageload") and err.count("\n") == 1, err
    assert words in err and "usage:" not in err and "--help)" in err


def test_cli_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.img"
    assert main(["checkpoint", "sample", str(out), "--size", "2M", "--seed", "5"]) == 0
    assert out.stat().st_size == 2 * MiB
    make_sample_image(str(tmp_path / "t.img"), 2 * MiB, seed=5)
    assert out.read_bytes() == (tmp_path / "t.img").read_bytes()
    capsys.readouterr()
    assert main(["checkpoint", "sample", str(out), "--size", "1000"]) == 2
    assert capsys.readouterr().err.startswith(f"pageload: {out}: size 1000 is not")


# -- samples --------------------------------------------------------------------------


def test_sample_is_deterministic_and_sparse(tmp_path: Path, holes_ok: None) -> None:
    a, b, c = (str(tmp_path / n) for n in ("a.img", "b.img", "c.img"))
    make_sample_image(a, 16 * MiB, seed=1)
    make_sample_image(b, 16 * MiB, seed=1)
    make_sample_image(c, 16 * MiB, seed=2)
    assert Path(a).read_bytes() == Path(b).read_bytes()
    assert Path(a).read_bytes() != Path(c).read_bytes()
    layout = open_checkpoint(a).layout
    assert 0 < layout.data_bytes < 16 * MiB  # some data, some holes
    assert os.stat(a).st_blocks * 512 < 16 * MiB  # holes take no disk space
    assert [tuple(r) for r in layout] == [tuple(r) for r in open_checkpoint(b).layout]


def test_dense_sample_has_no_holes_or_zero_pages(tmp_path: Path) -> None:
    path = tmp_path / "dense.img"
    make_sample_image(str(path), 4 * MiB, seed=3, dense=True)
    data = path.read_bytes()
    assert _nonzero_pages(data) == [(0, len(data))]
    pages = {data[o : o + PS] for o in range(0, len(data), PS)}
    assert len(pages) == len(data) // PS  # every page differs


def test_sample_pages_carry_their_offset(tmp_path: Path) -> None:
    path = tmp_path / "s.img"
    make_sample_image(str(path), 4 * MiB, seed=4, zero_page_fraction=0.0, data_fraction=1.0)
    data = path.read_bytes()
    for off in (0, PS, 3 * MiB + 5 * PS):
        assert int.from_bytes(data[off : off + 8], sys.byteorder) == off + 1


def test_ranges_out_of_file_order_map_back_to_memory(tmp_path: Path) -> None:
    """Readers accept any file order (only creators keep it ascending); verify maps chunks back."""
    out = tmp_path / "by-hand"
    out.mkdir()
    first, second = b"\x11" * (2 * PS), b"\x22" * PS  # memory [0, 2P) stored after memory [5P, 6P)
    pages = second + first
    (out / "pages.img").write_bytes(pages)
    index = {
        "format": "pageload-checkpoint",
        "version": 1,
        "page_size": PS,
        "memory_size": 8 * PS,
        "pages_size": len(pages),
        "ranges": [[0, 2 * PS, PS], [5 * PS, PS, 0]],
        "checksum": "xxh3_64",
        "chunk_size": PS,
        "checksums": [
            xxhash.xxh3_64_intdigest(pages[i : i + PS]) for i in range(0, len(pages), PS)
        ],
    }
    (out / "index.msgpack").write_bytes(msgpack.packb(index))
    ck = open_checkpoint(str(out))
    assert ck.layout.file_offset(PS) == 2 * PS and ck.layout.file_offset(5 * PS) == 0
    assert verify_checkpoint(str(out)).ok
    with open(out / "pages.img", "r+b") as f:
        f.write(b"\x00")  # chunk 0: memory [5P, 6P)
        f.seek(2 * PS)
        f.write(b"\x00")  # chunk 2: memory [P, 2P)
    report = verify_checkpoint(str(out))
    assert [(b.index, b.memory) for b in report.bad_chunks] == [
        (0, ((5 * PS, 6 * PS),)),
        (2, ((PS, 2 * PS),)),
    ]


def test_open_pages_direct_reads_aligned_ranges(ckpt: Path) -> None:
    ck = open_checkpoint(str(ckpt))
    try:
        fd = ck.open_pages(direct=True)
    except CheckpointError as exc:
        pytest.skip(f"O_DIRECT refused here: {exc}")
    buf = mmap.mmap(-1, ck.layout[1].length)  # page-aligned, as O_DIRECT needs
    try:
        r = ck.layout[1]
        assert os.preadv(fd, [buf], r.file_offset) == r.length
        expected = (ckpt / "pages.img").read_bytes()[r.file_offset : r.file_offset + r.length]
        assert buf[:] == expected
    finally:
        os.close(fd)
        buf.close()


def _index_of(ranges: int) -> bytes:
    from loader.checkpoint._index import IndexFields, encode_index

    page = 4096
    mem = array("I", range(0, ranges * 2, 2))  # (page numbers)
    length = array("I", [1]) * ranges
    file = array("I", range(ranges))
    return encode_index(IndexFields(page, ranges * 2 * page, ranges * page, mem, length, file, page,
                                    array("Q", [0]) * ranges, {}))


def test_the_index_columns_are_read_from_the_file_into_their_arrays(tmp_path: Path) -> None:
    """Issue 20: opening a pages checkpoint never holds the index file, its columns'
    bytes and their arrays at once (a million ranges peaked at 48 MiB for those alone).
    The streamed read gives what the whole decode gives; where the streaming read meets
    anything irregular, the whole decode's one-line reason is the answer."""
    import tracemalloc

    from loader.checkpoint._index import decode_index, read_index

    ranges = 1 << 17
    data = _index_of(ranges)
    path = tmp_path / "index"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        tracemalloc.start()
        try:
            got = read_index(fd, len(data))
            _, streamed_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        whole = decode_index(bytearray(data))
        assert (got.mem_pages, got.len_pages, got.file_pages, got.checksums) == (
            whole.mem_pages, whole.len_pages, whole.file_pages, whole.checksums)
        assert got.mem_pages.typecode == got.len_pages.typecode == got.file_pages.typecode == "I"
        # the range table as page numbers (4 bytes each) and the checksums (8): the file holds
        # 32 bytes a range.  The streamed read holds the arrays plus a 256 KiB piece of a column
        # and its conversion (the whole decode: the file, the columns' bytes, their arrays)
        columns = (3 * 4 + 8) * ranges
        assert streamed_peak < columns + (1 << 20), (streamed_peak, columns)
    finally:
        os.close(fd)
    # hostile or damaged: the same reason as the whole decode gives
    for damaged in (data[:-5], data + b"\xc0", data.replace(b"range_length", b"range_lengtX"),
                    data.replace(b"range_mem\xc6\x00\x10\x00\x00", b"range_mem\xc6\x00\x10\x00\x08", 1),
                    data.replace(b"range_mem\xc6", b"range_mem\xc4", 1)):
        path.write_bytes(damaged)
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(ValueError) as streamed:
                read_index(fd, len(damaged))
        finally:
            os.close(fd)
        with pytest.raises(ValueError) as decoded:
            decode_index(bytearray(damaged))
        assert str(streamed.value) == str(decoded.value)
