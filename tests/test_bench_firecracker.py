"""``pageload bench`` section ``firecracker``: the serial parser on cut and mixed
output, and one real run (a real Firecracker restored through pageload, each
design once).  No timing thresholds: fields, the guest's checks and the order of
events only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import BenchOptions, format_bench, run_bench
from bench._firecracker import (
    MODES,
    Serial,
    _parse_summary,
    fetch_firecracker,
    firecracker_binary,
    firecracker_unavailable,
)


def _feed(chunks: list[bytes]) -> Serial:
    s = Serial()
    for i, chunk in enumerate(chunks):
        s.feed(chunk, float(i))
    return s


def test_serial_joins_ticks_split_across_reads() -> None:
    s = _feed([b"COUNTER_BOOT_OK\ntick 0000", b"0001", b" o", b"k\ntick 00000002 ok\n"])
    assert s.seen == {1: 1.0, 2: 3.0}  # tick 1 complete in the second chunk, before its verdict
    assert s.ok == [(1, 3.0), (2, 3.0)] and s.bad == []


def test_serial_skips_cut_off_and_interleaved_lines() -> None:
    s = _feed([b"tick 0000\n",  # cut short: no number
               b"tick 00000003\n",  # cut after the number: seen, no verdict
               b"tick 00000004 o[WARN firecracker] something\n",  # a log line in the middle
               b"tick 00000005 BAD\n", b"tick 00000006 ok\n"])
    assert sorted(s.seen) == [3, 4, 5, 6]
    assert s.ok == [(6, 4.0)] and s.bad == [(5, 3.0)]


def test_serial_waits_for_a_verdict_at_the_end_of_the_data() -> None:
    s = _feed([b"tick 00000007 "])
    assert s.seen == {7: 0.0} and s.ok == []
    s.feed(b"ok\n", 1.0)
    assert s.ok == [(7, 1.0)]


def test_summary_figures_found_by_their_words() -> None:
    line = ("uffd: 7 faults (1 immediate, 2 direct, 3 waited, 1 zero, 0 failed), p50 <= 49 us, p99 <= 49 us, "
            "max 49 us; copied 128 MiB in 514 UFFDIO_COPY; guest filled in 0.338 s")
    assert _parse_summary(line) == {"faults": 7, "faults_waited": 3, "copied_mib": 128, "filled_s": 0.338}
    lazy = "uffd: 9 faults (0 immediate, 9 waited, 0 zero, 0 failed); copied 64 MiB in 9 UFFDIO_COPY; not filled"
    assert _parse_summary(lazy) == {"faults": 9, "faults_waited": 9, "copied_mib": 64, "filled_s": None}
    assert _parse_summary(None)["faults"] is None


@pytest.fixture(scope="module")
def firecracker_ready() -> None:
    why = firecracker_unavailable()
    if why is not None:
        pytest.skip(why)
    binary = firecracker_binary()
    if not binary.exists():
        why = fetch_firecracker(binary)
        if why is not None:
            pytest.skip(why)


def test_firecracker_section_end_to_end(firecracker_ready: None, tmp_path: Path) -> None:
    workdir = tmp_path / "w"  # short: Firecracker's API socket path must fit in sun_path
    result = run_bench(BenchOptions(size=1 << 20, sections=("firecracker",), repeat=1, workdir=str(workdir)),
                       log=lambda _line: None)
    section = result["sections"]["firecracker"]
    if "skipped" in section and "cannot run a VM" in section["skipped"]:
        pytest.skip(section["skipped"])
    assert "error" not in section and "skipped" not in section, section
    assert section["repeat"] == 1 and section["snapshot_s"] > 0
    guest = section["guest"]
    assert guest["memory_bytes"] == 128 << 20 and guest["tick_period_s"] > 0
    assert set(section["designs"]) == set(MODES)
    for mode, d in section["designs"].items():
        (run,) = d["runs"]
        assert run["passed"] and all(run["checks"].values()), (mode, run["checks"], run["load_error"], run["summary"])
        assert d["passed"] and d["load_api_s"] == run["load_api_s"]
        # the order of events: the load call started at 0, the first tick after it,
        # the Nth ok tick no earlier than the first tick; the counter went on
        assert 0 < run["load_api_s"] and 0 < run["first_tick_s"] <= run["ok_ticks_s"]
        assert run["ok_ticks_seen"] >= guest["ok_ticks"] and run["bad_ticks_seen"] == 0
        assert run["counter_first"] > run["counter_before"]
        assert run["daemon_exit"] == 0 and run["summary"].startswith("uffd: ")
        assert run["faults"] is not None and run["faults"] >= 0
        if mode == "lazy":  # only faulting pages are copied: the 64 MiB the guest checks, at least
            assert run["filled_s"] is None and run["faults"] >= (64 << 20) // 4096
            assert 64 <= run["copied_mib"] < 128
        else:
            assert run["filled_s"] is not None and run["filled_s"] > 0 and run["copied_mib"] == 128
    assert section["passed"]
    text = format_bench(result)
    assert "firecracker (counter guest" in text
    for mode in MODES:
        assert any(line.startswith(mode) and line.rstrip().endswith("passed") for line in text.splitlines())
    assert os.path.isdir(workdir / "firecracker")
    assert not (workdir / "image.raw").exists()  # the section brings its own memory image
