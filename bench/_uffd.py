"""``pageload bench`` section ``uffd``: the page-fault handler against two classic ones.

On the dense image (warm page cache), in one run, one daemon process per handler
(``pageload restore IMAGE --background --uffd-socket ... --uffd-mode MODE``) with
the VMM emulator (:class:`workloads._vmm.VmmEmulator`, in this process) as the
guest:

* ``fill`` -- ours: a fault thread answers faults (from the memory file, or straight
  from the source's page cache; it spins on the userfaultfd for 2 ms after a
  fault), a fill thread copies all memory in behind them;
* ``eager`` -- Firecracker's "fault_all" example: copy everything, then answer faults;
* ``lazy`` -- its "valid" example: copy only the faulting page (from the source, as
  that example does with its mapped snapshot file), no fill.

The guest: ``vcpus`` threads touching ``touches`` random 4 KiB pages (seeded, the
same for every handler), paced evenly over ``window_s`` seconds from the connect
(by default the time ``cp`` takes to copy the image, so the touches fall during
the fill).  Each touch is timed (touch to return); a touch whose page was not
present just before (mincore) is a fault.  Figures per handler: fault p50/p99/max
(touch to return), total guest blocked time (every touch), the handler's own
service histogram, the time from connect to the guest never faulting again (the
handler's ``filled``; never for ``lazy``), and the fill's throughput (data bytes /
that time) against ``cp IMAGE /dev/shm`` measured in the same run.

Rows for reference (no goals): ``fill (cold cache)``, ours again after
``drop_caches`` (root only), the source read from the disk during the fill (the fill
reads ahead and brings each chunk into the page cache before it takes the lock that
faults need); ``floor``, a Python handler that does nothing but one
``UFFDIO_COPY`` per fault (:mod:`bench._uffd_floor`): what a fault costs on this
machine before any of the daemon's work, with ``floor_ratio`` = our fault p50 / its
p50; ``floor (spinning)``, the same handler reading the userfaultfd for 2 ms after
each fault instead of sleeping in ``poll``, as our fault thread does
(``spinning_floor_ratio``); ``zero-copy`` (the VMM maps the memory
file and hands over a MISSING|MINOR userfaultfd, :mod:`bench._uffd_minor`), on the
same touches; and, where a real Firecracker can run, the ``firecracker`` section's
restore of a real guest per handler (time from ``snapshot/load`` to its first
tick, :mod:`bench._firecracker`), as ``section["firecracker"]``.

Goals (``fill``): fault p50 <= 30 us, p99 <= 500 us, fill >= 0.8x cp, and the least
blocked time of the three.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from loader import UffdConfig
from loader.uffd import _ioctl as _uffd
from workloads import percentiles
from workloads._vmm import GuestRegion, VmmEmulator

from ._daemon import Goal, at_least, at_most
from ._guest import cp_extra, guest_touches, handler_run, zero_copy_run
from ._tools import BenchError, drop_caches, median, warm_cache

__all__ = ["MODES", "run_uffd_section"]

MODES = ("fill", "eager", "lazy")
PAGE = 4096


def _floor(image: str, workdir: str, touches: list[tuple[int, int, int]], vcpus: int,
           log: Callable[[str], None], spin_us: int = 0) -> dict[str, Any]:
    """The same touches against :mod:`bench._uffd_floor` (a Python handler doing
    nothing but one copy per fault, spinning ``spin_us`` after each as the daemon's
    fault thread does): what a fault costs here before the daemon's work."""
    size = os.path.getsize(image)
    sock = os.path.join(workdir, "uffd-floor.uffd")
    if os.path.exists(sock):
        os.unlink(sock)  # left by an earlier run in the same work directory
    proc = subprocess.Popen([sys.executable, "-m", "bench._uffd_floor", sock, image, str(spin_us)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "listening":
            raise BenchError("the floor handler did not start")
        with VmmEmulator([GuestRegion(0, size)], expected=image) as vmm:
            vmm.connect(sock)
            report = vmm.touch(touches, vcpus=vcpus, paced=True, verify=True, classify=True)
            vmm.disconnect()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if report.mismatches or report.errors:
        raise BenchError(f"floor: the guest read wrong bytes at {report.mismatches[:3]} {report.errors[:3]}")
    out: dict[str, Any] = {
        "mode": "floor (spinning)" if spin_us else "floor",
        "touches": report.touches,
        "faults_seen_by_guest": len(report.fault_latencies_ns),
        "fault_us": percentiles(report.fault_latencies_ns),
        "touch_us": percentiles(report.latencies_ns),
        "blocked_s": report.blocked_s,
        "no_more_faults_s": None,
        "fill_mb_s": None,
    }
    log(f"  {out['mode']}: faults p50 {out['fault_us']['p50']:.0f} us p99 {out['fault_us']['p99']:.0f} us "
        f"max {out['fault_us']['max']:.0f} us (n={out['fault_us']['count']}), blocked {out['blocked_s']:.3f} s")
    return out


def _median_run(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for several rounds of a handler: each figure's median over them (the
    worst of the maxima), with every round's p50 and blocked time kept."""
    if len(rounds) == 1:
        return rounds[0]
    out = dict(rounds[len(rounds) // 2])  # counts etc. from the middle round

    def med(values: list[float | None]) -> float | None:
        got = [v for v in values if v is not None]
        return median(got) if len(got) == len(values) else None

    out["fault_us"] = {**out["fault_us"], "p50": med([r["fault_us"]["p50"] for r in rounds]),
                       "p99": med([r["fault_us"]["p99"] for r in rounds]),
                       "max": max(r["fault_us"]["max"] for r in rounds)}
    for key in ("blocked_s", "no_more_faults_s", "fill_mb_s", "fill_busy_mb_s"):
        out[key] = med([r.get(key) for r in rounds])
    out["rounds"] = [{"fault_p50_us": r["fault_us"]["p50"], "fault_p99_us": r["fault_us"]["p99"],
                      "blocked_s": r["blocked_s"], "fill_mb_s": r.get("fill_mb_s")} for r in rounds]
    return out


def run_uffd_section(image: str, workdir: str, *, touches: int = 3000, vcpus: int = 2,
                     window_s: float | None = None, seed: int = 0, firecracker_repeat: int = 3,
                     repeat: int = 3, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure what the module docstring lists; returns the section's JSON."""
    from ._firecracker import run_firecracker_section  # both import this module

    why = _uffd.unavailable()
    if why is not None:
        return {"skipped": why}
    size = os.path.getsize(image)
    cp_s, cp_rate, window, trace, cpl = guest_touches(image, touches, window_s, seed, log)
    # the handlers take turns, ``repeat`` rounds: this machine's wake-ups drift by 2x
    # over minutes, which one run each would read as a difference between handlers
    spin_us = round(UffdConfig.for_mode("fill").spin_s * 1e6)  # the spinning floor spins as ours does
    rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in (*MODES, "floor", "floor (spinning)")}
    for k in range(max(repeat, 1)):
        if repeat > 1:
            log(f"  round {k + 1} of {repeat}")
        for mode in MODES:
            warm_cache(image)
            rounds[mode].append(handler_run(mode, image, workdir, trace, vcpus, max(30.0, 20 * cp_s), log))
        warm_cache(image)
        rounds["floor"].append(_floor(image, workdir, trace, vcpus, log))
        warm_cache(image)
        rounds["floor (spinning)"].append(_floor(image, workdir, trace, vcpus, log, spin_us=spin_us))
    runs = {mode: _median_run(rs) for mode, rs in rounds.items()}
    ours = runs["fill"]
    least = min((runs[m] for m in MODES), key=lambda r: r["blocked_s"])["mode"]  # of the three designs
    floor_p50 = runs["floor"]["fault_us"]["p50"]
    spin_floor_p50 = runs["floor (spinning)"]["fault_us"]["p50"]
    cold_skipped = drop_caches()  # our handler again, its source read from the disk
    if cold_skipped is None:
        runs["fill (cold cache)"] = handler_run("fill", image, workdir, trace, vcpus, max(60.0, 40 * cp_s), log)
    why = _uffd.unavailable(_uffd.FEATURE_MINOR_SHMEM)
    if why is None:
        warm_cache(image)
        runs["zero-copy"] = zero_copy_run(image, workdir, trace, vcpus, max(30.0, 20 * cp_s), log)
        runs["zero-copy"]["fill_mb_s"] = None  # nothing is copied into the guest
    ratio = ours["fill_mb_s"] / cp_rate if ours["fill_mb_s"] else None
    goals: list[Goal] = [
        at_most("fault p50", ours["fault_us"]["p50"], 30, "us", "touch to return, faulting touches, during the fill"),
        at_most("fault p99", ours["fault_us"]["p99"], 500, "us", "touch to return, faulting touches, during the fill"),
        at_least("fill / cp", ratio, 0.8, "", "data bytes / connect-to-filled, against cp to /dev/shm"),
        Goal("least blocked time", ours["blocked_s"], "s", "least of fill/eager/lazy", least == "fill",
             "sum of touch-to-return over every touch; least: " + least),
    ]
    return {
        "image": {"path": image, "size_bytes": size},
        "guest": {"touches": touches, "vcpus": vcpus, "window_s": window, "seed": seed},
        "repeat": max(repeat, 1),  #: rounds of fill/eager/lazy/floor; their rows are medians
        "cp": {"seconds": cp_s, "mb_s": cp_rate, "how": "the fastest warm cp", **cp_extra(cpl)},
        "runs": runs,
        "zero_copy_skipped": why,
        "cold_cache_skipped": cold_skipped,
        #: the fill thread's rate while it copies, against cp (no goal)
        "fill_busy_ratio": ours["fill_busy_mb_s"] / cp_rate if ours.get("fill_busy_mb_s") else None,
        #: our fault p50 against the floor's, measured on the same touches (no goal):
        #: the floor that sleeps in poll between faults, and the one that spins as ours does
        "floor_ratio": ours["fault_us"]["p50"] / floor_p50 if floor_p50 else None,
        "spinning_floor_ratio": ours["fault_us"]["p50"] / spin_floor_p50 if spin_floor_p50 else None,
        "goals": [g.as_dict() for g in goals],
        "firecracker": (run_firecracker_section(workdir, repeat=firecracker_repeat, log=log)
                        if firecracker_repeat else {"skipped": "not asked for"}),
    }
