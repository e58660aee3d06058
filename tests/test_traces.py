"""Fault traces: container, file forms, generators, perf importer, CLI."""

from __future__ import annotations

import math
from array import array
from collections import Counter
from pathlib import Path

import msgpack
import pytest

from cli import _trace as trace_cmd
from cli import main as cli_main
from loader import Layout
from workloads import (
    KINDS,
    Fault,
    Trace,
    TraceError,
    detect_form,
    fold_addresses,
    generate,
    import_perf_script,
    load_trace,
    onto_layout,
    parse_perf_script,
    parse_text,
    save_trace,
)

DATA = Path(__file__).parent / "data"
PERF_SAMPLE = DATA / "perf_script_sample.txt"
MiB = 1 << 20


def small_trace() -> Trace:
    return Trace(
        [0, 10, 25, 25], [0, 0x3000, 0x1000, 0x7000], [4096, 8192, 4096, 4096], memory_size=0x8000
    )


# -- the container ------------------------------------------------------------------------


def test_trace_is_columns_and_iterates_faults() -> None:
    t = small_trace()
    assert len(t) == 4
    assert all(isinstance(c, array) and c.typecode == "Q" for c in (t.t_us, t.offset, t.length))
    assert list(t)[1] == Fault(10, 0x3000, 8192)
    assert t[-1] == Fault(25, 0x7000, 4096)
    assert t.max_end() == 0x8000
    assert Trace().max_end() == 0


def test_columns_must_match() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        Trace([1, 2], [0], [4096])


@pytest.mark.parametrize("mode", ["round-robin", "contiguous"])
def test_split_partitions_the_faults(mode: str) -> None:
    t = generate("uniform", count=1001, memory_size=64 * MiB, seed=3)
    parts = t.split(4, mode)  # type: ignore[arg-type]
    assert len(parts) == 4
    assert sum(len(p) for p in parts) == len(t)
    assert all(p.memory_size == t.memory_size and p.page_size == t.page_size for p in parts)
    assert sorted(f for p in parts for f in p) == sorted(t)
    if mode == "round-robin":
        assert list(parts[1]) == [t[i] for i in range(1, len(t), 4)]
    else:
        assert list(parts[0]) + list(parts[1]) + list(parts[2]) + list(parts[3]) == list(t)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_split_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        small_trace().split(0)
    with pytest.raises(ValueError):
        small_trace().split(2, "diagonal")  # type: ignore[arg-type]


def test_check_fits_names_the_first_fault_past_the_end() -> None:
    t = small_trace()
    t.source = "app.trace"
    t.check_fits()  # exactly fills its 0x8000 bytes
    with pytest.raises(TraceError) as info:
        t.check_fits(0x4000)
    message = str(info.value)
    assert message == "app.trace: fault 1 at offset 0x3000+len 8192 runs past the memory size 16384"
    assert "\n" not in message


def test_summary() -> None:
    s = small_trace().summary()
    assert (s.faults, s.bytes, s.span_lo, s.span_hi, s.duration_us) == (4, 20480, 0, 0x8000, 25)
    assert s.unique_pages == 5  # pages 0, 1, 3, 4, 7
    assert s.rate == pytest.approx(3 / 25e-6)


# -- file forms -----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["msgpack", "text"])
def test_round_trip_is_exact(tmp_path: Path, form: str) -> None:
    t = generate("zipf", count=5000, memory_size=512 * MiB, granularity=2 * MiB, seed=9)
    t.append((1 << 64) - 1, (1 << 64) - 8192, 4096)  # the largest values survive too
    path = tmp_path / f"t.{form}"
    save_trace(t, path, form)  # type: ignore[arg-type]
    assert detect_form(path) == form
    back = load_trace(path)
    assert back == t
    assert back.source == str(path)


def test_text_and_msgpack_agree(tmp_path: Path) -> None:
    t = small_trace()
    save_trace(t, tmp_path / "a.txt", "text")
    save_trace(load_trace(tmp_path / "a.txt"), tmp_path / "b.mp", "msgpack")
    assert load_trace(tmp_path / "b.mp") == t


def test_unknown_memory_size_round_trips_as_none(tmp_path: Path) -> None:
    t = Trace([0], [0], [4096])
    for form in ("msgpack", "text"):
        save_trace(t, tmp_path / "x", form)  # type: ignore[arg-type]
        assert load_trace(tmp_path / "x").memory_size is None


def test_msgpack_layout_is_as_documented(tmp_path: Path) -> None:
    save_trace(small_trace(), tmp_path / "t", "msgpack")
    doc = msgpack.unpackb((tmp_path / "t").read_bytes())
    assert doc["format"] == "pageload-trace" and doc["version"] == 1
    assert doc["count"] == 4 and doc["memory_size"] == 0x8000 and doc["page_size"] == 4096
    assert doc["offset"] == b"".join(x.to_bytes(8, "little") for x in (0, 0x3000, 0x1000, 0x7000))
    assert doc["t_us"] == b"".join(x.to_bytes(8, "little") for x in (0, 10, 25, 25))


def test_text_form_accepts_hex_comments_and_headers() -> None:
    lines = [
        "# a trace written by hand",
        "# memory_size: 64K",
        "# page_size: 0x1000",
        "",
        "0 0x0 4096",
        "5   4096 0x2000   # trailing comment",
    ]
    t = parse_text(lines, "hand.txt")
    assert list(t) == [Fault(0, 0, 4096), Fault(5, 4096, 8192)]
    assert (t.memory_size, t.page_size) == (65536, 4096)


@pytest.mark.parametrize(
    ("lines", "where", "what"),
    [
        (["0 0 4096", "1 2"], "bad.txt:2:", "expected"),
        (["0 0 4096", "", "1 zz 4096"], "bad.txt:3:", "not a non-negative integer"),
        (["0 -4096 4096"], "bad.txt:1:", "not a non-negative integer"),
        (["5 0 4096", "4 0 4096"], "bad.txt:2:", "before the previous"),
        (["0 0 0"], "bad.txt:1:", "length is 0"),
        (["# page_size: 3000"], "bad.txt:1:", "power of two"),
        (["# memory_size: lots"], "bad.txt:1:", "memory_size"),
        (["0 0 4096", "# memory_size: 4K"], "bad.txt:2:", "after the first fault"),
    ],
)
def test_text_errors_name_file_and_line(lines: list[str], where: str, what: str) -> None:
    with pytest.raises(TraceError) as info:
        parse_text(lines, "bad.txt")
    assert str(info.value).startswith(where)
    assert what in str(info.value)


def test_bad_msgpack_files_are_trace_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp"
    bad.write_bytes(msgpack.packb({"format": "something-else"}))
    with pytest.raises(TraceError, match="bad.mp: not a pageload-trace"):
        load_trace(bad)
    bad.write_bytes(msgpack.packb({"format": "pageload-trace", "version": 99, "count": 0}))
    with pytest.raises(TraceError, match="version 99"):
        load_trace(bad)
    doc = {
        "format": "pageload-trace",
        "version": 1,
        "count": 2,
        "page_size": 4096,
        "memory_size": None,
        "t_us": b"\0" * 16,
        "offset": b"\0" * 8,
        "length": b"\0" * 16,
    }
    bad.write_bytes(msgpack.packb(doc, use_bin_type=True))
    with pytest.raises(TraceError, match="'offset' holds 8 bytes, expected 16"):
        load_trace(bad)
    bad.write_bytes(b"\x85\xa6format")  # truncated
    with pytest.raises(TraceError, match="bad.mp: "):
        load_trace(bad)


# -- generators ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_generators_are_reproducible_aligned_and_in_bounds(kind: str) -> None:
    params = dict(count=20_000, memory_size=256 * MiB + 123, seed=42)
    a = generate(kind, **params)  # type: ignore[arg-type]
    assert a == generate(kind, **params)  # type: ignore[arg-type]
    if kind != "sequential":  # the one kind that uses no randomness
        assert a != generate(kind, **{**params, "seed": 43})  # type: ignore[arg-type]
    assert a.memory_size == 256 * MiB  # rounded down to whole granules
    assert len(a) == 20_000
    assert all(o % 4096 == 0 for o in a.offset)
    assert set(a.length) == {4096}
    a.check_fits()
    a.check_times()
    big = generate(kind, count=2000, memory_size=1 << 30, granularity=2 * MiB, seed=1)
    assert all(o % (2 * MiB) == 0 for o in big.offset) and set(big.length) == {2 * MiB}
    big.check_fits()


def test_constant_rate_timestamps() -> None:
    t = generate("uniform", count=1001, memory_size=MiB, rate=500.0)
    assert t.t_us[0] == 0 and t.t_us[-1] == 2_000_000
    assert t.summary().rate == pytest.approx(500.0)


def test_sequential_is_monotonic_and_contiguous() -> None:
    t = generate("sequential", count=4096, memory_size=64 * MiB)
    assert all(t.offset[i + 1] == t.offset[i] + 4096 for i in range(len(t) - 1))


def test_uniform_covers_memory_evenly() -> None:
    buckets = 16
    t = generate("uniform", count=64_000, memory_size=1 << 30, seed=5)
    counts = Counter(o * buckets // (1 << 30) for o in t.offset)
    expected = len(t) / buckets
    chi2 = sum((counts[b] - expected) ** 2 / expected for b in range(buckets))
    assert chi2 < 50  # 15 degrees of freedom: p(chi2 > 50) is about 1e-5
    pages = (1 << 30) // 4096
    distinct = pages * (1 - math.exp(-len(t) / pages))  # expected distinct pages drawn
    assert abs(len(set(t.offset)) - distinct) < 0.02 * distinct


def test_zipf_concentrates_on_a_hot_set() -> None:
    memory = 256 * MiB
    pages = memory // 4096
    t = generate("zipf", count=100_000, memory_size=memory, seed=11)
    counts = sorted(Counter(t.offset).values(), reverse=True)
    top = sum(counts[: pages // 10])
    assert top > 0.6 * len(t)
    # the hot pages are scattered over memory, not packed at the start
    hottest = [off for off, _ in Counter(t.offset).most_common(100)]
    assert max(hottest) - min(hottest) > memory // 2


def test_strided_has_a_constant_stride() -> None:
    memory = 64 * MiB
    t = generate("strided", count=10_000, memory_size=memory, stride=7, seed=2)
    assert {(t.offset[i + 1] - t.offset[i]) % memory for i in range(len(t) - 1)} == {7 * 4096}


def test_phased_faults_stay_in_their_working_set() -> None:
    memory, ws, phases = 1 << 30, 16 * MiB, 5
    count = 50_000
    t = generate("phased", count=count, memory_size=memory, phases=phases, working_set=ws, seed=8)
    windows = []
    for k in range(phases):
        offs = t.offset[k * count // phases : (k + 1) * count // phases]
        lo, hi = min(offs), max(offs) + 4096
        assert hi - lo <= ws  # all of phase k inside one window the size of a working set
        assert hi - lo > ws * 0.9  # and it uses that window
        windows.append(lo // ws)
    assert len(set(windows)) == phases  # the working set moved at every phase


def test_bursty_gaps_are_bimodal() -> None:
    rate, idle_us = 10_000.0, 20_000.0
    t = generate(
        "bursty", count=20_000, memory_size=1 << 30, rate=rate, burst=50, idle_us=idle_us, seed=4
    )
    gaps = [t.t_us[i + 1] - t.t_us[i] for i in range(len(t) - 1)]
    short = [g for g in gaps if g <= 10 * 1e6 / rate]
    long = [g for g in gaps if g >= idle_us / 2]
    assert len(short) + len(long) == len(gaps)  # nothing in between
    bursts = len(long) + 1
    assert 20_000 / 50 * 0.8 < bursts < 20_000 / 50 * 1.25
    assert sum(short) / len(short) == pytest.approx(1e6 / rate, rel=0.15)


def test_generator_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown trace kind"):
        generate("fractal", count=1, memory_size=MiB)
    with pytest.raises(ValueError, match="smaller than one"):
        generate("uniform", count=1, memory_size=1000)
    with pytest.raises(ValueError, match="rate"):
        generate("uniform", count=1, memory_size=MiB, rate=0)


@pytest.mark.slow
def test_a_million_faults() -> None:
    t = generate("zipf", count=1_000_000, memory_size=64 << 30, seed=1)
    assert len(t) == 1_000_000
    # 24 bytes a fault, whatever the memory size
    assert sum(c.buffer_info()[1] * c.itemsize for c in (t.t_us, t.offset, t.length)) == 24_000_000


# -- perf importer --------------------------------------------------------------------------


def sample_lines() -> list[str]:
    return [
        ln for ln in PERF_SAMPLE.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]


def sample_addresses() -> list[int]:
    return [int(ln.split("page-faults:")[1].split()[0], 16) for ln in sample_lines()]


def test_perf_sample_parses_every_event() -> None:
    samples = parse_perf_script(PERF_SAMPLE.read_text().splitlines(), "sample")
    assert len(samples.addr) == len(sample_lines()) == 151
    assert list(samples.addr) == sample_addresses()
    assert samples.t_ns[0] == 8731_402826_000
    assert samples.skipped_events == 0


def test_perf_import_keeps_time_order_and_bounds() -> None:
    t = import_perf_script(PERF_SAMPLE)
    assert len(t) == 151
    assert t.t_us[0] == 0
    t.check_times()
    t.check_fits()
    assert set(t.length) == {4096} and all(o % 4096 == 0 for o in t.offset)
    # the folded image is dense: regions back to back, not the 0x7ffd... address space
    assert t.memory_size == t.max_end() < 4 * MiB


def test_perf_import_keeps_locality() -> None:
    addrs = sample_addresses()
    t = import_perf_script(PERF_SAMPLE)
    page_of = {}
    for a, off in zip(addrs, t.offset, strict=True):
        page_of.setdefault(a >> 12, set()).add(off)
    # two addresses on one page land on one page
    assert all(len(offs) == 1 for offs in page_of.values())
    assert len(page_of) < len(addrs)  # the sample does touch some pages twice
    # neighbouring pages stay neighbours
    neighbours = [p for p in page_of if p + 1 in page_of]
    assert len(neighbours) > 50
    for p in neighbours:
        assert next(iter(page_of[p + 1])) - next(iter(page_of[p])) == 4096


def test_perf_import_wraps_into_a_smaller_memory() -> None:
    t = import_perf_script(PERF_SAMPLE, memory_size=MiB + 100)
    assert t.memory_size == MiB
    t.check_fits()
    assert t.max_end() <= MiB


def test_fold_orders_regions_by_address_or_first_touch() -> None:
    far = 1 << 40
    addr = array("Q", [far + 0x10, 0x1000, 0x2008, far + 0x1000, 0x1FFF])
    by_address, size = fold_addresses(addr)
    assert list(by_address) == [0x2000, 0x0, 0x1000, 0x3000, 0x0] and size == 0x4000
    by_touch, _ = fold_addresses(addr, order="first-touch")
    assert list(by_touch) == [0x0, 0x2000, 0x3000, 0x1000, 0x2000]
    # a gap within the threshold stays inside the region
    gapped, size = fold_addresses(array("Q", [0, 0x5000]), region_gap=0x10000)
    assert list(gapped) == [0, 0x5000] and size == 0x6000
    split, size = fold_addresses(array("Q", [0, 0x5000]), region_gap=0x1000)
    assert list(split) == [0, 0x1000] and size == 0x2000


PERF_VARIANTS = """\
# perf script -F +pid,+addr --ns, with a call chain (-g) and another event mixed in
 Web Content  4242/4243  91.000000100:          1 page-faults:u:     7f0000001010 [unknown] (//anon)
\t    7f00aa001234 memcpy+0x14 (/usr/lib/libc.so.6)
\t    55aa00001000 main+0x10 (/usr/bin/app)

 Web Content  4242/4243  91.000002100:          1 cycles:      55aa00001000 main+0x10 (/usr/bin/app)
        kworker  4242/4243  91.000003100:          3 minor-faults:     7f0000002020
"""


def test_perf_parser_handles_pid_tid_ns_callchains_and_other_events() -> None:
    samples = parse_perf_script(PERF_VARIANTS.splitlines(), "v")
    assert list(samples.addr) == [0x7F0000001010, 0x7F0000002020]
    assert list(samples.t_ns) == [91_000_000_100, 91_000_003_100]
    assert samples.skipped_events == 1


def test_perf_output_without_addr_is_refused() -> None:
    line = (
        "         python3 31337 [002]  8731.402826:          1 page-faults:"
        "      7f3a31c422b4 memset+0x4 (/lib/libc.so.6)"
    )
    with pytest.raises(TraceError, match=r"^x:1: .*-F \+addr"):
        parse_perf_script([line], "x")
    with pytest.raises(TraceError, match="^x: no page-fault samples"):
        parse_perf_script(
            ["# nothing here", "  ls 1 [000] 1.000001: 1 cycles: ffff sym (dso)"], "x"
        )


# -- command line --------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(["trace", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_gen_show_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "z.trace"
    code, _, err = run_cli(
        capsys,
        "gen",
        "phased",
        str(out),
        "--count",
        "3000",
        "--memory-size",
        "64M",
        "--seed",
        "5",
        "--phases",
        "3",
    )
    assert code == 0 and err == ""
    assert load_trace(out) == generate("phased", count=3000, memory_size=64 * MiB, seed=5, phases=3)
    code, shown, err = run_cli(capsys, "show", str(out))
    assert code == 0 and err == ""
    assert "faults:       3000" in shown and "msgpack" in shown
    text = tmp_path / "z.txt"
    assert (
        run_cli(capsys, "gen", "sequential", str(text), "--count", "10", "--granularity", "2M")[0]
        == 0
    )
    assert detect_form(text) == "text" and load_trace(text).length[0] == 2 * MiB


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "perf.trace"
    code, _, err = run_cli(capsys, "convert", str(PERF_SAMPLE), str(out), "--memory-size", "1M")
    assert code == 0 and err == ""
    t = load_trace(out)
    assert len(t) == 151 and t.memory_size == MiB


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["show", "{tmp}/missing"], "pageload: {tmp}/missing: No such file or directory"),
        (["show", "{tmp}/bad.txt"], "pageload: {tmp}/bad.txt:2: expected"),
        (
            ["show", "{tmp}/past.txt"],
            "pageload: {tmp}/past.txt: fault 0 at offset 0x1000+len 4096 runs past",
        ),
        (["convert", "{tmp}/bad.txt", "{tmp}/o"], "pageload: {tmp}/bad.txt: no page-fault samples"),
        (
            ["gen", "uniform", "{tmp}/o", "--memory-size", "1K"],
            "pageload: trace gen uniform: memory size",
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    (tmp_path / "bad.txt").write_text("0 0 4096\n1 2\n")
    (tmp_path / "past.txt").write_text("# memory_size: 4096\n0 0x1000 4096\n")
    code, _, err = run_cli(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert code == trace_cmd.EXIT_BAD_INPUT == 2
    assert err.startswith(expected.format(tmp=tmp_path))
    assert err.count("\n") == 1


def test_cli_registers_trace_subcommands() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    trace_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["trace", "gen", "zipf", "out", "--memory-size", "2G", "--granularity", "2M"]
    )
    assert args.memory_size == 2 << 30 and args.granularity == "2M" and callable(args.func)
    assert math.isclose(parser.parse_args(["trace", "gen", "bursty", "o"]).idle_ms, 20.0)


# -- generating against an image's layout --------------------------------------------------


def holey_layout() -> Layout:
    # data at [0, 64K), [1M, 1M+8K), [3M, 5M); holes elsewhere in 8 MiB
    ranges = [(0, 0x10000, 0), (MiB, 0x2000, 0x10000), (3 * MiB, 2 * MiB, 0x12000)]
    layout = Layout(8 * MiB, 4096, ranges)
    layout.validate()
    return layout


@pytest.mark.parametrize("kind", list(KINDS))
def test_generating_against_a_layout_touches_only_data(kind: str) -> None:
    layout = holey_layout()
    t = generate(kind, count=5000, memory_size=0, seed=3, layout=layout)
    assert (t.memory_size, t.page_size) == (layout.memory_size, layout.page_size)
    for off, n in zip(t.offset, t.length, strict=True):
        i = layout.find(off)
        assert i >= 0, f"fault at {off:#x} is in a hole"
        assert off + n <= layout.end_at(i)


def test_layout_mapping_keeps_order_and_cuts_at_range_ends() -> None:
    layout = holey_layout()
    seq = generate("sequential", count=(0x10000 + 0x2000) // 4096 + 1, memory_size=0, layout=layout)
    assert list(seq.offset[:17]) == [i * 4096 for i in range(16)] + [MiB]
    assert seq.offset[-1] == 3 * MiB  # past the second range, straight to the third
    # a 2 MiB fault starting in the 64 KiB range is cut at the range's end
    big = generate("sequential", count=1, memory_size=0, granularity=2 * MiB, layout=layout)
    assert list(big) == [Fault(0, 0, 0x10000)]
    # data offset 2M is 0x1ee000 into the third range, which ends 0x12000 later
    mapped = onto_layout(Trace([0], [2 * MiB], [2 * MiB]), layout)
    assert list(mapped) == [Fault(0, 3 * MiB + 0x1EE000, 0x12000)]
    with pytest.raises(ValueError, match="past the image's"):
        onto_layout(Trace([0], [layout.data_bytes], [4096]), layout)


def test_cli_gen_against_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "mem.img"
    image.write_bytes(b"\x01" * (256 * 1024))  # all data, no holes
    out = tmp_path / "t.trace"
    code, _, err = run_cli(
        capsys, "gen", "uniform", str(out), "--image", str(image), "--count", "100"
    )
    assert code == 0 and err == ""
    t = load_trace(out)
    assert t.memory_size == 256 * 1024
    t.check_fits()
    code, _, err = run_cli(capsys, "gen", "uniform", str(out), "--image", str(tmp_path / "nope"))
    assert code == 2 and err.startswith(f"pageload: {tmp_path}/nope: ") and err.count("\n") == 1


def test_perf_importer_reads_a_real_recording() -> None:
    """``perf script -F +addr`` output recorded on a live system (see the file's header)."""
    path = DATA / "perf_script_real.txt"
    lines = path.read_text().splitlines()
    samples = [ln for ln in lines if not ln.startswith("#") and " page-faults:" in ln]
    parsed = parse_perf_script(lines, str(path))
    assert len(parsed.addr) == len(samples) == 500
    # the data address is the field right after the event name, in hex
    assert parsed.addr[0] == int(samples[0].split("page-faults:")[1].split()[0], 16)
    assert list(parsed.t_ns) == sorted(parsed.t_ns)
    trace = import_perf_script(str(path), memory_size=64 * MiB)
    assert len(trace) == 500
    trace.check_fits(64 * MiB)
    # the same page twice (touch.py writes each page twice) folds to the same offset
    pages: dict[int, set[int]] = {}
    for address, fault in zip(parsed.addr, trace, strict=True):
        pages.setdefault(address // 4096, set()).add(fault.offset)
    assert all(len(offsets) == 1 for offsets in pages.values())
