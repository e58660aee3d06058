"""The guest side of the ``uffd`` bench and its ``zero-copy`` row, shared by
:mod:`bench._uffd` and :mod:`bench._uffd_minor` (which used to take these from
each other: an import circle, then private names): one handler's run against the
VMM emulator (:func:`handler_run`), one zero-copy run (:func:`zero_copy_run`), the
seeded touch trace paced over ``cp``'s time (:func:`guest_touches`), and the cp
figures a row shows (:func:`cp_extra`).  Neither of the two imports the other."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

from loader import Client
from workloads import DaemonProcess, DaemonStartError, percentiles
from workloads._vmm import GuestRegion, VmmEmulator, ZeroCopyVmm

from ._tools import BenchError, CpLimit, cp_limit

PAGE = 4096


def _stats(sock: str) -> dict[str, Any]:
    with Client.connect(sock, timeout=5) as c:
        return c.stats()


def handler_run(mode: str, image: str, workdir: str, touches: list[tuple[int, int, int]], vcpus: int,
         timeout_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    size = os.path.getsize(image)
    sock = os.path.join(workdir, f"uffd-{mode}.sock")
    uffd_sock = os.path.join(workdir, f"uffd-{mode}.uffd")
    daemon = DaemonProcess(image, sock, os.path.join(workdir, f"uffd-{mode}.log"),
                           ["--background", "--uffd-socket", uffd_sock, "--uffd-mode", mode,
                            "--progress-interval", "60"])
    try:
        daemon.start()
    except DaemonStartError as exc:
        raise BenchError(str(exc)) from None
    with daemon:
        with VmmEmulator([GuestRegion(0, size)], expected=image) as vmm:
            vmm.connect(uffd_sock)
            report = vmm.touch(touches, vcpus=vcpus, paced=True, verify=True, classify=True)
            filled = None
            deadline = time.monotonic() + timeout_s
            while mode != "lazy" and time.monotonic() < deadline:
                u = _stats(sock).get("uffd") or {}
                if u.get("filled"):
                    filled = u["filled_s"]
                    break
                time.sleep(0.02)
            u = _stats(sock).get("uffd") or {}
            vmm.disconnect()  # the daemon exits by itself once the VMM has gone
        if daemon.proc is not None:
            daemon.proc.wait(10)
    if report.mismatches or report.errors:
        raise BenchError(f"{mode}: the guest read wrong bytes at {report.mismatches[:3]} {report.errors[:3]}")
    data = u.get("copied_bytes", 0)
    out: dict[str, Any] = {
        "mode": mode,
        "touches": report.touches,
        "faults_seen_by_guest": len(report.fault_latencies_ns),
        "fault_us": percentiles(report.fault_latencies_ns),
        "touch_us": percentiles(report.latencies_ns),
        "blocked_s": report.blocked_s,
        "touch_elapsed_s": report.elapsed_s,
        "handler": {k: u.get(k) for k in ("faults", "faults_immediate", "faults_direct", "faults_waited",
                                          "faults_zero", "faults_failed", "copied_bytes", "copies",
                                          "fault_blocked_s", "direct", "fill_copied_bytes", "fill_busy_s")},
        "handler_fault_latency_us": u.get("fault_latency_us"),
        "no_more_faults_s": filled,
        "fill_mb_s": data / filled / 1e6 if filled else None,
        #: the fill thread's own rate while it copies (no goal: the goal counts from the connect)
        "fill_busy_mb_s": (u["fill_copied_bytes"] / u["fill_busy_s"] / 1e6
                           if filled and u.get("fill_busy_s") else None),
        "daemon_exit": daemon.returncode,
    }
    log(f"  {mode}: faults p50 {out['fault_us']['p50']:.0f} us p99 {out['fault_us']['p99']:.0f} us "
        f"max {out['fault_us']['max']:.0f} us (n={out['fault_us']['count']}), blocked {out['blocked_s']:.3f} s, "
        f"no more faults after {'never' if filled is None else f'{filled:.3f} s'}"
        + (f", fill {out['fill_mb_s']:.0f} MB/s" if out["fill_mb_s"] else ""))
    return out


def zero_copy_run(image: str, workdir: str, touches: list[tuple[int, int, int]], vcpus: int,
               timeout_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    """One zero-copy run of the guest: a daemon with ``--allow-writable-memory-fd``,
    guest memory mapped from its memory file (:class:`workloads._vmm.ZeroCopyVmm`),
    the touches, every byte checked; the same figures as :func:`handler_run`."""
    sock = os.path.join(workdir, "uffd-zero-copy.sock")
    daemon = DaemonProcess(image, sock, os.path.join(workdir, "uffd-zero-copy.log"),
                           ["--background", "--allow-writable-memory-fd", "--progress-interval", "60"])
    try:
        daemon.start()
    except DaemonStartError as exc:
        raise BenchError(str(exc)) from None
    with daemon:
        t0 = time.monotonic()
        with ZeroCopyVmm(sock, expected=image) as vmm:
            report = vmm.touch(touches, vcpus=vcpus, paced=True, verify=True, classify=True)
            mapped = None
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                with Client.connect(sock, timeout=5) as c:
                    st = c.stats()
                r = st["uffd_minor"]["ranges"][0]
                if st["done"] and r["pending_bytes"] == 0:
                    mapped = time.monotonic() - t0
                    break
                time.sleep(0.02)
            mismatches = vmm.verify_all()
    if report.mismatches or report.errors or mismatches:
        raise BenchError(f"zero-copy: the guest read wrong bytes at {report.mismatches[:3]} {mismatches[:3]} "
                         f"{report.errors[:3]}")
    out: dict[str, Any] = {
        "mode": "zero-copy",
        "touches": report.touches,
        "faults_seen_by_guest": len(report.fault_latencies_ns),
        "fault_us": percentiles(report.fault_latencies_ns),
        "touch_us": percentiles(report.latencies_ns),
        "blocked_s": report.blocked_s,
        "touch_elapsed_s": report.elapsed_s,
        "handler": {k: r.get(k) for k in ("faults", "faults_minor", "faults_waited", "faults_zero",
                                          "faults_failed", "mapped_bytes", "eexist", "eagain")},
        "handler_fault_latency_us": r.get("fault_latency_us"),
        "no_more_faults_s": mapped,
        "copied_bytes": 0,
    }
    log(f"  zero-copy: faults p50 {out['fault_us']['p50']:.0f} us p99 {out['fault_us']['p99']:.0f} us "
        f"max {out['fault_us']['max']:.0f} us (n={out['fault_us']['count']}), blocked {out['blocked_s']:.3f} s, "
        f"no more faults after {'never' if mapped is None else f'{mapped:.3f} s'}")
    return out


def guest_touches(image: str, touches: int, window_s: float | None, seed: int,
                  log: Callable[[str], None]) -> tuple[float, float, float, list[tuple[int, int, int]], CpLimit]:
    """``cp``'s time and rate on the warm image (the fastest of three, after one cold cp
    shown apart), the touches' window (``cp``'s time unless given), the touches:
    ``touches`` random 4 KiB pages (seeded), paced evenly over the window, as
    ``(time_us, offset, length)``, and the cp figures themselves."""
    # the fastest of three: one cp measured 570-1840 MB/s on the same quiet machine
    # (the first into /dev/shm is often the slowest), which made the ratio to it noise
    cpl = cp_limit(image, warm_runs=3)
    cp_s, cp_rate = cpl.warm_best_s, cpl.warm_best_mb_s
    log(f"  cp to /dev/shm: {cp_rate:.0f} MB/s ({cp_s:.3f} s; fastest of "
        + ", ".join(f"{r:.0f}" for r in cpl.warm_runs_mb_s)
        + f" MB/s on the warmed image; cold {cpl.cold_mb_s:.0f} MB/s, not used)")
    window = cp_s if window_s is None else window_s
    rng = random.Random(seed)
    pages = os.path.getsize(image) // PAGE
    trace = sorted((int(i * window * 1e6 / touches), rng.randrange(pages) * PAGE, PAGE) for i in range(touches))
    return cp_s, cp_rate, window, trace, cpl


def cp_extra(cpl: CpLimit) -> dict[str, Any]:
    d = cpl.as_dict()
    return {k: d[k] for k in ("warm_runs_mb_s", "cold_mb_s", "cold_how")}
