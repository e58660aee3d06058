"""``pageload bench``: the speed and memory goals, measured (never asserted in tests).

:func:`run_bench` makes a dense random image of ``size`` bytes in a work
directory and runs the chosen sections on it, each against real
``pageload restore`` subprocesses:

* ``daemon`` (:mod:`bench._daemon`): fill vs ``cp``, time to ready,
  4 KiB wait latency during the fill, RSS and heap, each against its goal;
* ``backends`` (:mod:`bench._backends`): every AIO backend, warm/cold page
  cache, with/without ``--direct``, raw image and pages checkpoint; thread counts;
* ``designs`` (:mod:`bench._designs`): priority/eager/lazy/fifo under a replayed trace,
  two rounds (``repeat``) in alternating order;
* ``latency`` (:mod:`bench._latency`): a wait's cost against the raw socket round
  trip (loaded pages one at a time, pipelined waits/s, unloaded pages during the fill).
* ``workingset`` (:mod:`bench._workingset`): record a working set under the same
  trace, then restore with and without it (and laid out first), same and perturbed trace.
* ``uffd`` (:mod:`bench._uffd`): the page-fault handler against two classic ones.
* ``firecracker`` (:mod:`bench._firecracker`): a real Firecracker's snapshot restored
  through pageload, load call to the guest's first ticks, per handler design.
* ``scale`` (:mod:`bench._scale`): scattered images of 64K to 4M one-page ranges, raw
  and as pages checkpoints, against a dense image of the same data bytes.
* ``remote`` (:mod:`bench._remote`): restoring from a real S3 server on loopback,
  straight and through a proxy that slows it to S3's pace, against its limits.
* ``store`` (:mod:`bench._store`): the chunk store: compression and create speed, fills
  local and through a throttled proxy to SeaweedFS, a layer's dedup, fault latency.

The result is one JSON-able dict (``{"sections": {name: {...}}, ...}``);
:func:`format_bench` renders it as tables.  A section that fails records
``{"error": "..."}`` and the others still run.  The work directory is removed
at the end unless ``keep`` (or unless the caller gave it).
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from loader.checkpoint import open_checkpoint
from workloads import Trace, generate, load_trace, make_sample_image

from ._backends import run_backends_section
from ._daemon import run_daemon_section
from ._designs import run_designs
from ._firecracker import format_firecracker, run_firecracker_section
from ._latency import run_latency_section
from ._remote import MAX_SIZE, QUICK_MAX_SIZE, format_remote, run_remote_section
from ._scale import format_scale, run_scale_section
from ._store import MAX_SIZE as STORE_MAX_SIZE
from ._store import QUICK_MAX_SIZE as STORE_QUICK_MAX_SIZE
from ._store import format_store, run_store_section
from ._tools import BenchError, byte_compile, cp_text
from ._uffd import run_uffd_section
from ._workingset import format_workingset, run_workingset_section

__all__ = ["SECTIONS", "BenchOptions", "format_bench", "run_bench"]

SECTIONS = ("daemon", "backends", "designs", "latency", "workingset", "uffd", "firecracker", "scale", "remote",
            "store")
QUICK_SIZE = 256 << 20
#: sections that bring their own memory image (no dense random image is made for them alone)
OWN_IMAGE = frozenset({"firecracker", "scale", "remote", "store"})


@dataclass(frozen=True, slots=True)
class BenchOptions:
    size: int = 1 << 30  #: bytes of the dense random image
    sections: tuple[str, ...] = ("daemon", "backends")
    quick: bool = False  #: fewer repetitions (and the CLI's default size becomes 256 MiB)
    workdir: str | None = (
        None  #: default: a fresh directory under $TMPDIR (must be a disk, not tmpfs)
    )
    keep: bool = False  #: keep the work directory (images, logs)
    trace: str | None = None  #: for ``designs``; default a zipf trace over the image
    clients: int = 4  #: for ``designs``
    loaded_map: bool = False  #: ``designs``: the clients use the daemons' loaded map
    repeat: int | None = None  #: override the repetitions of every measurement
    min_wait_samples: int | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [s for s in self.sections if s not in SECTIONS]
        if bad:
            raise ValueError(
                f"unknown section {', '.join(bad)} (choose from {', '.join(SECTIONS)})"
            )
        if self.size <= 0 or self.size % 4096:
            raise ValueError(f"size {self.size} is not a positive multiple of 4096")


def _fs_type(path: str) -> str:
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mount = parts[1]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
                    best
                ):
                    best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


def run_bench(opts: BenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sections of ``opts``; returns the whole result (see the module docstring)."""
    own_workdir = opts.workdir is None
    workdir = (
        tempfile.mkdtemp(
            prefix="pageload-bench-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None
        )
        if own_workdir
        else opts.workdir
    )
    assert workdir is not None
    os.makedirs(workdir, exist_ok=True)
    workdir = os.path.abspath(workdir)
    fstype = _fs_type(workdir)
    result: dict[str, Any] = {
        "version": 1,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "euid": os.geteuid(),
            "workdir": workdir,
            "workdir_fs": fstype,
            "loadavg_start": list(os.getloadavg()),
            # the daemons spawned import their modules' bytecode, as an installed daemon does
            "bytecode": byte_compile(),
        },
        "options": {k: v for k, v in asdict(opts).items() if k != "extra"},
        "sections": {},
    }
    if fstype in ("tmpfs", "ramfs"):
        log(f"warning: {workdir} is on {fstype}: reads never touch a disk, 'cold' means nothing")
    try:
        image = os.path.join(workdir, "image.raw")
        needs_image = any(s not in OWN_IMAGE for s in opts.sections)
        if needs_image and (not os.path.exists(image) or os.path.getsize(image) != opts.size):
            log(f"making a {opts.size >> 20} MiB dense random image {image}")
            t0 = time.perf_counter()
            make_sample_image(image, opts.size, seed=opts.seed, dense=True)
            log(f"  made in {time.perf_counter() - t0:.1f} s")
        quick = opts.quick
        for name in opts.sections:
            log(f"== section {name}")
            t0 = time.perf_counter()
            try:
                section = _run_section(name, opts, image, workdir, quick, log)
            except (BenchError, OSError, ValueError) as exc:
                section = {"error": str(exc)}
                log(f"section {name} failed: {exc}")
            section["duration_s"] = time.perf_counter() - t0
            result["sections"][name] = section
        result["host"]["loadavg_end"] = list(os.getloadavg())
    finally:
        if own_workdir and not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def _run_section(
    name: str, opts: BenchOptions, image: str, workdir: str, quick: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    rep = opts.repeat
    if name == "daemon":
        return run_daemon_section(
            image,
            os.path.join(workdir, "sparse-16g.raw"),
            workdir,
            repeat=rep or (1 if quick else 3),
            min_samples=opts.min_wait_samples or (100 if quick else 500),
            max_wait_runs=3 if quick else 8,
            log=log,
        )
    if name == "backends":
        return run_backends_section(
            image, workdir, repeat=rep or 1, thread_repeat=rep or (1 if quick else 3), log=log
        )
    if name == "workingset":
        return run_workingset_section(
            image, _trace(opts, image), clients=opts.clients, workdir=workdir, log=log, seed=opts.seed
        )
    if name == "latency":
        return run_latency_section(
            image,
            workdir,
            rounds=2000 if quick else 5000,
            pipelined=20_000 if quick else 100_000,
            min_samples=opts.min_wait_samples or (100 if quick else 500),
            max_wait_runs=2 if quick else 4,
            log=log,
        )
    if name == "uffd":
        return run_uffd_section(image, workdir, touches=500 if quick else 3000, seed=opts.seed,
                                firecracker_repeat=rep or (2 if quick else 3), repeat=rep or (1 if quick else 3),
                                log=log)
    if name == "firecracker":
        return run_firecracker_section(workdir, repeat=rep or (2 if quick else 3), log=log)
    if name == "scale":
        counts = opts.extra.get("scale_counts")
        return run_scale_section(workdir, quick=quick, repeat=rep or (1 if quick else 2),
                                 counts=tuple(counts) if counts else None, log=log)
    if name == "remote":
        return run_remote_section(min(opts.size, QUICK_MAX_SIZE if quick else MAX_SIZE), workdir,
                                  rounds=rep or (1 if quick else 2), faults=100 if quick else 300,
                                  clients=opts.clients, min_samples=opts.min_wait_samples or (50 if quick else 200),
                                  seed=opts.seed, log=log)
    if name == "store":
        return run_store_section(min(opts.size, STORE_QUICK_MAX_SIZE if quick else STORE_MAX_SIZE), workdir,
                                 rounds=rep or (2 if quick else 3), samples=10 if quick else 20, seed=opts.seed,
                                 log=log)
    return _designs_section(opts, image, workdir, log)


def _trace(opts: BenchOptions, image: str) -> Trace:
    """The trace the designs and workingset sections replay."""
    layout = open_checkpoint(image).layout
    if opts.trace:
        trace = load_trace(opts.trace)
        trace.check_fits(layout.memory_size)
    else:
        # 500 faults/s: an application running and faulting, far below what the load
        # generator can issue on a small machine (its ceiling is in the limits), so the
        # generator is not the bottleneck; docs/MEASUREMENTS.md has a run at 2000/s too
        # (2026-11-22 17:13-17:36 UTC)
        trace = generate(
            "zipf",
            count=500 if opts.quick else 3000,
            memory_size=layout.memory_size,
            rate=500.0,
            seed=opts.seed,
            layout=layout,
        )
    return trace


def _designs_section(
    opts: BenchOptions, image: str, workdir: str, log: Callable[[str], None]
) -> dict[str, Any]:
    # two rounds at least: the designs take turns in alternating order (one round would
    # always run priority first)
    out: dict[str, Any] = run_designs(
        image, _trace(opts, image), clients=opts.clients, workdir=workdir, log=log, loaded_map=opts.loaded_map,
        rounds=opts.repeat or 2,
    )
    return out


# --------------------------------------------------------------------------- text output
def _num(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = (
            f"{value:.3f}"
            if abs(value) < 10
            else f"{value:.1f}"
            if abs(value) < 100
            else f"{value:.0f}"
        )
    else:
        text = str(value)
    return f"{text} {unit}".rstrip()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return [
        fmt.format(*header),
        fmt.format(*("-" * w for w in widths)),
        *(fmt.format(*r) for r in rows),
    ]


def format_bench(result: dict[str, Any]) -> str:
    """Tables for a terminal: the goals (met / NOT MET), the backend matrix, thread counts."""
    lines = [
        f"pageload bench, {result['date']}, {result['host']['cpus']} CPUs, "
        f"kernel {result['host']['kernel']}, work dir on {result['host']['workdir_fs']}"
    ]
    bytecode = result["host"].get("bytecode", "compiled")
    if bytecode != "compiled":  # (READY times then include compiling every module)
        lines.append(f"warning: the daemon's modules are {bytecode}: READY times include compiling them")
    sections = result["sections"]
    for name, section in sections.items():
        lines.append("")
        if "error" in section or "skipped" in section:
            lines.append(f"{name}: {section.get('error') or section.get('skipped')}")
            continue
        if name == "daemon":
            lines.append(
                f"daemon ({section['image']['size_bytes'] >> 20} MiB dense image, "
                f"{section['backend']} backend, warm cache)"
            )
            rows = [
                [
                    g["name"],
                    _num(g["value"], g["unit"]),
                    g["goal"],
                    {True: "met", False: "NOT MET", None: "missing"}[g["met"]],
                    g["how"],
                ]
                for g in section["goals"]
            ]
            lines += _table(["figure", "value", "goal", "", "how"], rows)
            w = section["waits"]["client_us"]
            lines.append(
                f"fill {section['fill']['throughput_mb_s']:.0f} MB/s; {cp_text(section['cp'])}"
            )
            lines.append(
                f"waits (client-timed) p50 {w['p50']:.0f} us p90 {w['p90']:.0f} us p99 {w['p99']:.0f} us "
                f"max {w['max']:.0f} us (n={w['count']})"
            )
        elif name == "scale":
            lines += format_scale(section)
        elif name == "remote":
            lines += format_remote(section)
        elif name == "store":
            lines += format_store(section, _table)
        elif name == "latency":
            lines.append(
                f"latency ({section['image']['size_bytes'] >> 20} MiB dense image, "
                f"{section['backend']} backend, warm cache)"
            )
            lines += _goal_table(section["goals"])
            lim, ld = section["limits"], section["loaded"]
            lines.append(
                f"socket round trip p50 {lim['rtt_us']['p50']:.1f} us p99 {lim['rtt_us']['p99']:.1f} us; "
                f"loaded wait p50 {ld['one_at_a_time_us']['p50']:.1f} us p99 {ld['one_at_a_time_us']['p99']:.1f} us "
                f"({ld['ratio_p50_to_rtt']:.2f}x / {ld['ratio_p99_to_rtt']:.2f}x); pipelined "
                + ", ".join(
                    f"depth {d}: {r / 1e3:.1f}k/s "
                    f"({ld['pipelined_ratio_to_protocol'][d]:.2f}x the server's protocol half)"
                    for d, r in ld["pipelined_waits_per_s"].items()
                )
            )
            cpd = lim.get("cp")
            if cpd:
                lines.append(cp_text(cpd) + f"; the loaded daemon's fill {section['fill_mb_s']:.0f} MB/s "
                             f"({section['fill_mb_s'] / cpd['warm_mb_s']:.2f}x the warm cp)")
        elif name == "backends":
            lines += _format_backends(section)
        elif name == "uffd":
            lines += _format_uffd(section)
        elif name == "firecracker":
            lines += format_firecracker(section)
        elif name == "workingset":
            lines.append(format_workingset(section))
        elif name == "designs":
            try:
                from ._designs import format_designs

                lines.append(format_designs(section))
            except ImportError:
                lines.append(repr(section))
    return "\n".join(lines)


def _goal_table(goals: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            g["name"],
            _num(g["value"], g["unit"]),
            g["goal"],
            {True: "met", False: "NOT MET", None: "missing"}[g["met"]],
            g["how"],
        ]
        for g in goals
    ]
    return _table(["figure", "value", "goal", "", "how"], rows)


def _format_backends(section: dict[str, Any]) -> list[str]:
    lim = section["limits"]
    lines = [
        f"backends ({section['image']['size_bytes'] >> 20} MiB image); limit cp to /dev/shm: warm "
        f"{_num(lim.get('cp_warm_mb_s'), 'MB/s')}, cold {_num(lim.get('cp_cold_mb_s'), 'MB/s')}"
    ]
    for name, why in section["unavailable"].items():
        lines.append(f"  {name}: skipped: {why}")
    if not section["cold"]["available"]:
        lines.append(f"  cold cache: skipped: {section['cold']['reason']}")
    rows = []
    for r in section["runs"]:
        head = [r["backend"], r["source"], "yes" if r["direct"] else "no", r["cache"]]
        if r["error"]:
            rows.append([*head, "failed", "", "", "", r["error"][:60]])
            continue
        rows.append(
            [
                *head,
                _num(r["fill_mb_s"]),
                _num(r["fill_with_waits_mb_s"]),
                _num(r["wait_us"]["p50"]),
                _num(r["wait_us"]["p99"]),
                str(r["wait_us"]["count"]),
            ]
        )
    lines += _table(
        [
            "backend",
            "source",
            "direct",
            "cache",
            "fill MB/s",
            "w/ waits",
            "p50 us",
            "p99 us",
            "waits",
        ],
        rows,
    )
    th = section["threads"]
    if th["counts"]:
        lines.append(
            "threads backend, warm raw image: "
            + ", ".join(f"{n}: {c['mb_s']:.0f} MB/s" for n, c in th["counts"].items())
            + f"; best {th['best']}, default {th['default']}"
        )
    verify = section.get("verify")
    if verify:
        goals = verify.get("goals", {})
        for cell in verify.get("chunks", {}).values():
            fill, wait = cell["fill_ratio"] or 0, cell["wait_p50_ratio"] or 0
            met = ""
            if goals and cell["chunk_size"] == verify.get("chunk_size"):
                fill_ok = fill >= goals["fill_ratio_min"]
                wait_ok = 0 < wait <= goals["wait_p50_ratio_max"]
                met = (f" [goals: fill >= {goals['fill_ratio_min']}x {'met' if fill_ok else 'MISSED'}, "
                       f"wait <= {goals['wait_p50_ratio_max']}x {'met' if wait_ok else 'MISSED'}]")
            w_on, w_off = cell["wait_us"]["verified"], cell["wait_us"]["unverified"]
            lines.append(
                f"checksum verification, {cell['chunk_size'] >> 10} KiB chunks, pages checkpoint, warm, threads: "
                f"fill {cell['verified_mb_s']:.0f} MB/s verified, {cell['unverified_mb_s']:.0f} MB/s with "
                f"--no-verify ({fill:.2f}x); 4 KiB wait p50/p99 {w_on['p50']:.0f}/{w_on['p99']:.0f} us verified, "
                f"{w_off['p50']:.0f}/{w_off['p99']:.0f} us not ({wait:.2f}x){met}"
            )
    return lines


def _format_uffd(section: dict[str, Any]) -> list[str]:
    g = section["guest"]
    lines = [
        f"uffd ({section['image']['size_bytes'] >> 20} MiB dense image, warm cache; guest: {g['vcpus']} vCPUs, "
        f"{g['touches']} random 4 KiB touches over {g['window_s']:.3f} s; cp {section['cp']['mb_s']:.0f} MB/s"
        + (f" (the fastest warm cp; cold {section['cp']['cold_mb_s']:.0f} MB/s, not used)"
           if "cold_mb_s" in section["cp"] else "")
        + (f"; fill/eager/lazy/floors: medians of {section['repeat']} rounds, taking turns"
           if section.get("repeat", 1) > 1 else "") + ")"
    ]
    lines += _goal_table(section["goals"])
    rows = []
    for mode, r in section["runs"].items():
        f = r["fault_us"]
        rows.append([mode, str(f["count"]), _num(f["p50"]), _num(f["p99"]), _num(f["max"]),
                     _num(r["blocked_s"]), "never" if r["no_more_faults_s"] is None else _num(r["no_more_faults_s"]),
                     _num(r["fill_mb_s"])])
    lines += _table(["handler", "faults", "p50 us", "p99 us", "max us", "blocked s", "last fault s", "fill MB/s"],
                    rows)
    if section.get("fill_busy_ratio"):
        lines.append(f"the fill thread while it copies (not while it waits for the guest's faults): "
                     f"{section['runs']['fill']['fill_busy_mb_s']:.0f} MB/s, {section['fill_busy_ratio']:.2f}x cp")
    if section.get("floor_ratio"):
        lines.append(f"fault p50 against the floor (a Python handler that only copies): "
                     f"{section['floor_ratio']:.2f}x"
                     + (f"; against that handler spinning as ours does: {section['spinning_floor_ratio']:.2f}x"
                        if section.get("spinning_floor_ratio") else ""))
    if section.get("zero_copy_skipped"):
        lines.append(f"zero-copy: skipped ({section['zero_copy_skipped']})")
    if section.get("cold_cache_skipped"):
        lines.append(f"fill (cold cache): skipped ({section['cold_cache_skipped']})")
    fc = section.get("firecracker", {})
    if "designs" in fc:
        lines += format_firecracker(fc)
    elif "skipped" in fc:
        lines.append(f"real Firecracker: skipped ({fc['skipped']})")
    return lines
