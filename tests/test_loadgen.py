"""The load generator against real daemon subprocesses, and the design comparison's shape."""

from __future__ import annotations

import json
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import format_designs, run_designs
from cli import main
from loader import Client
from loader.checkpoint import open_checkpoint
from workloads import (
    DaemonProcess,
    Trace,
    generate,
    make_sample_image,
    percentiles,
    run_loadgen,
    save_trace,
    scale_to_rate,
)

MiB = 1 << 20
PAGE = 4096


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("img") / "memory.img")
    make_sample_image(path, 32 * MiB, seed=7, hole_granularity=1 * MiB)
    return path


class Daemon(DaemonProcess):
    def __init__(self, image: str, workdir: Path, *flags: str) -> None:
        self.socket = str(workdir / "d.sock")
        self.memory_file = str(workdir / "memory")
        args = ["--memory-file", self.memory_file, "-q", *flags]
        super().__init__(image, self.socket, str(workdir / "daemon.log"), args)
        self.start(timeout=60)

    def wait_loaded(self) -> None:
        with Client.connect(self.socket) as client:
            for _ in range(2000):
                if client.stats()["done"]:
                    return
                time.sleep(0.005)
        raise AssertionError("the daemon did not finish loading 32 MiB in 10 s")

    def stop_ok(self) -> None:
        assert self.stop(30) == 0, self.stderr_tail()


@pytest.fixture
def daemon(image: str, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(image, tmp_path, "--background")
    yield d
    d.stop_ok()


def _data_trace(image: str, count: int, seed: int = 0) -> Trace:
    layout = open_checkpoint(image).layout
    return generate("uniform", count=count, memory_size=0, layout=layout, seed=seed, rate=50_000)


def test_two_clients_verify_and_every_wait_counted(image: str, daemon: Daemon) -> None:
    trace = _data_trace(image, 300)
    seen: list[tuple[int, int]] = []
    report = run_loadgen(
        daemon.socket,
        trace,
        clients=2,
        closed_loop=True,
        progress=lambda done, total, _: seen.append((done, total)),
    )
    assert report.ok, report.summary()
    assert (report.waits, report.errors, report.mismatches) == (300, 0, 0)
    assert len(report.latencies_ns) == len(report.completed_ns) == 300
    # the daemon saw exactly our waits, each either found loaded or served after blocking
    assert report.immediate is not None and report.served is not None
    assert report.immediate + report.served == 300
    lat = report.latency_us
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert seen and seen[-1] == (300, 300)


def test_clients_with_the_loaded_map_send_nothing_for_loaded_bytes(image: str, daemon: Daemon) -> None:
    """With ``loaded_map`` a wait the map shows loaded is answered by the client itself:
    once the daemon has loaded everything, no wait reaches it, and the bytes check out."""
    daemon.wait_loaded()
    trace = _data_trace(image, 200, seed=2)
    report = run_loadgen(daemon.socket, trace, clients=2, closed_loop=True, loaded_map=True)
    assert report.ok and report.verify, report.summary()
    assert report.waits == report.map_hits == 200
    assert report.immediate == 0 and report.served == 0  # the daemon saw none of them
    assert "200 answered from the loaded map" in report.summary()
    assert report.as_dict()["map_hits"] == 200
    plain = run_loadgen(daemon.socket, trace, clients=2, closed_loop=True)
    assert plain.map_hits == 0 and plain.immediate == 200


def test_loaded_map_with_uffd_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.trace"
    save_trace(Trace([0], [0], [PAGE]), path)
    code = main(["loadgen", "--uffd", str(tmp_path / "u.sock"), "--trace", str(path), "--image", "x",
                 "--loaded-map", "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--loaded-map" in err


def test_open_loop_at_a_rate_defaults_the_image_to_the_daemons_source(
    image: str, daemon: Daemon
) -> None:
    trace = _data_trace(image, 200, seed=1)
    report = run_loadgen(daemon.socket, trace, clients=3, rate=20_000)
    assert report.ok and report.waits == 200 and report.verify
    assert report.rate == 20_000


def test_one_wrong_byte_is_one_mismatch(
    image: str, daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = open_checkpoint(image).layout
    daemon.wait_loaded()
    victim = layout.mem_at(1) + 5 * PAGE + 123  # inside data, away from the per-page tag
    with open(daemon.memory_file, "r+b") as f:
        f.seek(victim)
        good = f.read(1)[0]
        f.seek(victim)
        f.write(bytes([good ^ 0xFF]))
    page = victim - victim % PAGE
    # faults on data pages; exactly one covers the corrupted byte
    offsets = [layout.mem_at(0), page, layout.mem_at(0) + PAGE, layout.mem_at(1), page + PAGE]
    trace = Trace(
        range(len(offsets)), offsets, [PAGE] * len(offsets), memory_size=layout.memory_size
    )
    report = run_loadgen(daemon.socket, trace, clients=2, closed_loop=True, image=image)
    assert (report.mismatches, report.errors, report.waits) == (1, 0, 5)
    bad = report.mismatch_samples[0]
    assert (bad.offset, bad.first_bad, bad.expected, bad.actual) == (
        page,
        victim,
        good,
        good ^ 0xFF,
    )
    # and the command says so and fails
    path = tmp_path / "t.trace"
    save_trace(trace, path)
    code = main(["loadgen", "--socket", daemon.socket, "--trace", str(path), "--closed-loop", "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"byte {victim:#x}" in err and "1 mismatches" in err


def test_json_report_has_the_keys(image: str, daemon: Daemon, tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    save_trace(_data_trace(image, 100), path)
    out = tmp_path / "report.json"
    code = main(
        [
            "loadgen",
            "--socket",
            daemon.socket,
            "--trace",
            str(path),
            "--clients",
            "2",
            "--closed-loop",
            "--image",
            image,
            "--json",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert {
        "waits",
        "errors",
        "mismatches",
        "latency_us",
        "clients",
        "duration_s",
        "waits_per_s",
        "immediate",
        "overhead_us_per_wait",
    } <= doc.keys()
    assert {"p50", "p90", "p99", "p999", "max"} <= doc["latency_us"].keys()
    assert (doc["waits"], doc["errors"], doc["mismatches"], doc["clients"]) == (100, 0, 0, 2)


def test_trace_past_the_memory_size_is_one_line_exit_2(
    image: str, daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "far.trace"
    save_trace(Trace([0, 1], [0, 32 * MiB], [PAGE, PAGE]), path)
    code = main(["loadgen", "--socket", daemon.socket, "--trace", str(path), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"pageload: {path}: fault 1 ") and "runs past the memory size" in err


def test_unreachable_daemon_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.trace"
    save_trace(Trace([0], [0], [PAGE]), path)
    code = main(["loadgen", "--socket", str(tmp_path / "nobody.sock"), "--trace", str(path), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "cannot reach the daemon" in err


def test_percentiles_are_nearest_rank() -> None:
    samples = array("Q", range(1000, 1001 * 1000, 1000))  # 1..1000 us, in reverse order
    samples.reverse()
    p = percentiles(samples)
    assert (p["count"], p["p50"], p["p90"], p["p99"], p["p999"], p["max"]) == (1000, 500, 900, 990, 999, 1000)
    assert p["mean"] == 500.5
    small = percentiles([i * 1000 for i in range(1, 101)])  # 1..100 us
    assert (small["p50"], small["p99"], small["p999"]) == (50.0, 99.0, 100.0)
    assert percentiles(array("Q")) == dict.fromkeys(("p50", "p90", "p99", "p999", "max", "mean"), 0.0) | {"count": 0}


def test_scale_to_rate_keeps_proportions() -> None:
    trace = Trace([100, 200, 400, 1100], [0, 1, 2, 3], [1, 1, 1, 1])
    scaled = scale_to_rate(trace, 3)  # 3 intervals at 3 faults/s: one second in all
    assert list(scaled.t_us) == [0, 100_000, 300_000, 1_000_000]
    flat = scale_to_rate(Trace([5, 5, 5], [0, 1, 2], [1, 1, 1]), 1000)
    assert list(flat.t_us) == [0, 1000, 2000]
    with pytest.raises(ValueError):
        scale_to_rate(trace, 0)


@pytest.mark.slow
def test_run_designs_shape(tmp_path: Path) -> None:
    img = str(tmp_path / "small.img")
    make_sample_image(img, 8 * MiB, seed=3, hole_granularity=1 * MiB)
    trace = _data_trace(img, 60)
    lines: list[str] = []
    result = run_designs(img, trace, clients=1, workdir=str(tmp_path / "work"), log=lines.append, tracemalloc=True)
    assert set(result["designs"]) == {"priority", "eager", "lazy", "fifo"}
    assert {"cp_mb_s", "socket_rtt_us", "pread_4k_us"} <= result["limits"].keys()
    total = open_checkpoint(img).layout.data_bytes
    for name, row in result["designs"].items():
        assert {
            "ready_s",
            "loaded_s",
            "blocked_s",
            "latency_us",
            "waits",
            "errors",
            "mismatches",
            "peak_rss_bytes",
            "heap_peak_bytes",
        } <= row.keys(), name
        assert (row["waits"], row["errors"], row["mismatches"]) == (60, 0, 0), name
        assert row["heap_peak_bytes"] > 0 and row["peak_rss_bytes"] > 0
    eager = result["designs"]["eager"]
    # eager opened its socket only after loading: its first poll already sees all of it
    assert eager["series"]["loaded_bytes"][1] == total
    assert result["designs"]["lazy"]["loaded_s"] is None  # no sweep: 60 pages never load 4 MiB
    assert result["designs"]["lazy"]["loaded_fraction"] < 1
    assert "priority" in format_designs(result)
    json.dumps(result)
