"""``pageload demo``: the main job on an embedded default, start to finish.

Makes a sample memory image and converts it to a checkpoint, starts the daemon
with ``--background`` as a real subprocess, drives faulting clients (threads with
the blocking client, each checking every byte it waited for against the image),
shows progress while the rest loads behind them, and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import threading
import time
from typing import Any

from loader import Client, human, mapped_memory
from loader.checkpoint import create_checkpoint
from workloads import DaemonProcess, DaemonStartError, make_sample_image
from workloads._vmm import GuestRegion, VmmEmulator, ZeroCopyVmm

from ._args import add_size


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="make a sample image, restore it in the background, drive faulting clients",
                       description=__doc__)
    add_size(p, "--size", default=512 << 20, help="image size")
    p.add_argument("--clients", type=int, default=4, metavar="N", help="faulting clients (default 4)")
    p.add_argument("--waits", type=int, default=400, metavar="N", help="waits per client (default 400)")
    p.add_argument("--workdir", default=".demo", metavar="DIR", help="where the image goes (default .demo)")
    p.add_argument("--aio", default="auto", metavar="NAME", help="I/O backend for the daemon")
    p.add_argument("--uffd", action="store_true",
                   help="show the page-fault handler mode instead: the daemon gets --uffd-socket, and an "
                   "emulated VMM (Firecracker's handshake, userfaultfd) has --clients vCPU threads touch "
                   "--waits pages each as real page faults, checking every byte (docs/UFFD.md)")
    p.add_argument("--uffd-minor", action="store_true",
                   help="show zero-copy mode instead: the daemon gets --allow-writable-memory-fd, and an "
                   "emulated VMM maps its memory file as guest memory and hands it its userfaultfd; "
                   "--clients vCPU threads touch --waits pages each, checking every byte (docs/UFFD.md)")
    p.set_defaults(func=run)


class ClientThread(threading.Thread):
    """Waits for pages in a hot-set-heavy pattern and checks each against the image."""

    def __init__(self, n: int, socket_path: str, image_path: str, waits: int, size: int) -> None:
        super().__init__(name=f"client-{n}", daemon=True)
        self.n, self.socket_path, self.image_path, self.waits, self.size = n, socket_path, image_path, waits, size
        self.latencies_ns: list[int] = []
        self.mismatches = 0
        self.errors: list[str] = []
        self.done = 0

    def run(self) -> None:
        rng = random.Random(self.n)
        pages = self.size // 4096
        hot = [rng.randrange(pages) for _ in range(64)]
        expected = bytearray(64 << 10)
        try:
            with Client.connect(self.socket_path) as client, mapped_memory(client) as mem, \
                    open(self.image_path, "rb") as image:
                for i in range(self.waits):
                    page = rng.choice(hot) if rng.random() < 0.3 else rng.randrange(pages)
                    npages = min(rng.choice((1, 1, 1, 4, 16)), pages - page)
                    off, length = page * 4096, npages * 4096
                    t0 = time.perf_counter_ns()
                    client.wait(off, length)
                    self.latencies_ns.append(time.perf_counter_ns() - t0)
                    view = memoryview(expected)[:length]
                    got = os.preadv(image.fileno(), [view], off)
                    if got != length or mem[off : off + length] != view:
                        self.mismatches += 1
                    self.done = i + 1
                    if i % 8 == 7:
                        time.sleep(0.001)  # the "application" computes a little between faults
        except Exception as exc:  # reported in the summary
            self.errors.append(f"{type(exc).__name__}: {exc}")


def _pct(sorted_ns: list[int], p: float) -> float:
    if not sorted_ns:
        return 0.0
    return sorted_ns[min(len(sorted_ns) - 1, int(p / 100 * len(sorted_ns)))] / 1000


def run(args: argparse.Namespace) -> int:
    os.makedirs(args.workdir, exist_ok=True)
    if args.uffd_minor:
        return run_uffd_minor(args)
    if args.uffd:
        return run_uffd(args)
    image = os.path.join(args.workdir, f"memory-{args.size}.img")
    ckpt = os.path.join(args.workdir, f"checkpoint-{args.size}")
    sock = os.path.join(args.workdir, "pageload.sock")
    print(f"== pageload demo: {human(args.size)} guest memory, {args.clients} faulting clients")
    _ensure_sample(image, args.size)
    if not os.path.exists(ckpt):
        report = create_checkpoint(image, ckpt)
        print(f"checkpoint {ckpt}: {human(report.data_bytes)} of data in {report.ranges} ranges, "
              f"{human(report.hole_bytes + report.zero_page_bytes)} of zeros skipped")
    print(f"$ pageload restore {ckpt} --socket {sock} --background")
    daemon = DaemonProcess(ckpt, sock, os.path.join(args.workdir, "daemon.log"),
                           ["--background", "--aio", args.aio, "--progress-interval", "1"])
    try:
        daemon.start()
    except DaemonStartError as exc:
        print(f"daemon failed to start: {exc}", file=sys.stderr)
        return 1
    t_ready = daemon.ready_s
    print(f"daemon ready in {t_ready:.3f} s (the application resumes now; pages load behind it)")

    clients = [ClientThread(n, sock, image, args.waits, args.size) for n in range(args.clients)]
    for c in clients:
        c.start()
    loaded_at = None
    try:
        with Client.connect(sock) as probe:
            while any(c.is_alive() for c in clients) or loaded_at is None:
                s = probe.stats()
                if s["done"] and loaded_at is None:
                    loaded_at = s["elapsed_s"]
                pct = 100 * s["loaded_bytes"] / s["total_bytes"] if s["total_bytes"] else 100
                waits = sum(c.done for c in clients)
                line = (f"  loaded {pct:5.1f}%  {s['throughput_bps'] / 1e6:7.1f} MB/s  "
                        f"waits {waits:6d}/{args.waits * args.clients}  blocked now {s['waiters_blocked']}")
                if sys.stdout.isatty():
                    print("\r" + line, end="", flush=True)
                else:
                    print(line, flush=True)
                time.sleep(0.25 if sys.stdout.isatty() else 0.5)
            final = probe.stats()
    finally:
        if sys.stdout.isatty():
            print()
        daemon.stop(30)
    lat = sorted(ns for c in clients for ns in c.latencies_ns)
    mismatches = sum(c.mismatches for c in clients)
    errors = [e for c in clients for e in c.errors]
    print("== summary")
    print(f"  ready after        {t_ready:.3f} s")
    print(f"  fully loaded after {loaded_at:.3f} s  ({human(final['total_bytes'])} at "
          f"{final['throughput_bps'] / 1e6:.0f} MB/s; {human(final['memory_size'] - final['total_bytes'])} "
          "of holes never read)")
    print(f"  waits              {len(lat)} by {args.clients} clients: {final['waits_immediate']} already loaded, "
          f"{final['waits_served']} served ahead of the sweep")
    print(f"  wait latency       p50 {_pct(lat, 50):.0f} us, p99 {_pct(lat, 99):.0f} us, "
          f"max {lat[-1] / 1000 if lat else 0:.0f} us")
    print(f"  time blocked       {final['total_wait_time_s']:.3f} s in all; someone blocked "
          f"{final['blocked_time_s']:.3f} s")
    print(f"  bytes checked      {mismatches} mismatches, {len(errors)} errors")
    print(f"  daemon exit        {daemon.returncode} after SIGTERM")
    for e in errors[:5]:
        print(f"  error: {e}")
    with open(daemon.log_path, errors="replace") as log:
        tail = [ln for ln in log if "loaded" in ln or "progress" in ln][-3:]
    if tail:
        print("== daemon log (last lines)")
        for ln in tail:
            print("  " + ln.rstrip())
    if args.workdir == ".demo" and not os.environ.get("PAGELOAD_DEMO_KEEP"):
        shutil.rmtree(ckpt, ignore_errors=True)
    ok = mismatches == 0 and not errors and daemon.returncode == 0
    return 0 if ok else 1


def run_uffd(args: argparse.Namespace) -> int:
    """The handler mode: sample image -> daemon with --uffd-socket -> emulated VMM faulting."""
    image = os.path.join(args.workdir, f"memory-{args.size}.img")
    sock = os.path.join(args.workdir, "pageload.sock")
    uffd_sock = os.path.join(args.workdir, "uffd.sock")
    print(f"== pageload demo --uffd: {human(args.size)} guest memory, {args.clients} vCPUs faulting")
    _ensure_sample(image, args.size)
    print(f"$ pageload restore {image} --background --uffd-socket {uffd_sock} --socket {sock}")
    daemon = _start_daemon(args, image, sock, ["--uffd-socket", uffd_sock])
    if daemon is None:
        return 1
    print(f"daemon ready in {daemon.ready_s:.3f} s; the VMM connects and its vCPUs resume at once")
    faults = _guest_faults(args.size, args.waits * args.clients)
    errors: list[str] = []
    filled_s = None
    try:
        with VmmEmulator([GuestRegion(0, args.size)], expected=image) as vmm:
            vmm.connect(uffd_sock)
            t0 = time.perf_counter()
            report = vmm.touch(faults, vcpus=args.clients, classify=True)
            print(f"  vCPUs done in {time.perf_counter() - t0:.3f} s; waiting for the background fill")
            with Client.connect(sock) as probe:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    u = probe.stats().get("uffd") or {}
                    if u.get("filled"):
                        filled_s = u.get("filled_s")
                        break
                    time.sleep(0.1)
            bad = vmm.verify_all()  # every page of guest memory against the image
            vmm.disconnect()
        if daemon.proc is not None:
            daemon.proc.wait(30)
    except Exception as exc:  # reported in the summary
        errors.append(f"{type(exc).__name__}: {exc}")
        report, bad = None, []
    finally:
        daemon.stop(30)
    print("== summary")
    if report is not None:
        lat = sorted(report.fault_latencies_ns)
        print(f"  touches            {report.touches} by {args.clients} vCPUs, {len(lat)} faulted "
              f"(the rest were already filled in)")
        print(f"  fault latency      p50 {_pct(lat, 50):.0f} us, p99 {_pct(lat, 99):.0f} us, "
              f"max {lat[-1] / 1000 if lat else 0:.0f} us (touch to return)")
        print(f"  guest blocked      {report.blocked_s:.3f} s in all")
        print(f"  no more faults     after {filled_s:.3f} s (guest memory filled)" if filled_s is not None
              else "  no more faults     not reached")
        print(f"  bytes checked      {len(report.mismatches)} wrong touches, {len(bad)} wrong MiB after the fill")
    print(f"  daemon exit        {daemon.returncode} (by itself once the VMM had gone)")
    for e in errors[:5]:
        print(f"  error: {e}")
    with open(daemon.log_path, errors="replace") as log:
        tail = [ln for ln in log if "uffd:" in ln][-3:]
    if tail:
        print("== daemon log (last lines)")
        for ln in tail:
            print("  " + ln.rstrip())
    ok = (report is not None and not report.mismatches and not report.errors and not bad and not errors
          and filled_s is not None and daemon.returncode == 0)
    return 0 if ok else 1


def run_uffd_minor(args: argparse.Namespace) -> int:
    """Zero-copy mode: sample image -> daemon -> emulated VMM mapping the memory file."""
    image = os.path.join(args.workdir, f"memory-{args.size}.img")
    sock = os.path.join(args.workdir, "pageload.sock")
    print(f"== pageload demo --uffd-minor: {human(args.size)} guest memory, {args.clients} vCPUs faulting")
    _ensure_sample(image, args.size)
    print(f"$ pageload restore {image} --background --allow-writable-memory-fd --socket {sock}")
    daemon = _start_daemon(args, image, sock, ["--allow-writable-memory-fd"])
    if daemon is None:
        return 1
    print(f"daemon ready in {daemon.ready_s:.3f} s; the VMM maps its memory file and hands over its userfaultfd")
    faults = _guest_faults(args.size, args.waits * args.clients)
    errors: list[str] = []
    mapped_s = None
    r: dict[str, Any] = {}
    report, bad = None, []
    try:
        with ZeroCopyVmm(sock, expected=image) as vmm:
            t0 = time.perf_counter()
            report = vmm.touch(faults, vcpus=args.clients, classify=True)
            print(f"  vCPUs done in {time.perf_counter() - t0:.3f} s; waiting for the load to be mapped in")
            with Client.connect(sock) as probe:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    st = probe.stats()
                    r = st["uffd_minor"]["ranges"][0]
                    if st["done"] and r["pending_bytes"] == 0:
                        mapped_s = time.perf_counter() - t0
                        break
                    time.sleep(0.1)
            bad = vmm.verify_all()  # every page of guest memory against the image
    except Exception as exc:  # reported in the summary
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        daemon.stop(30)
    print("== summary")
    if report is not None:
        lat = sorted(report.fault_latencies_ns)
        print(f"  touches            {report.touches} by {args.clients} vCPUs, "
              f"{len(lat)} on pages not in the memory file yet")
        print(f"  fault latency      p50 {_pct(lat, 50):.0f} us, p99 {_pct(lat, 99):.0f} us, "
              f"max {lat[-1] / 1000 if lat else 0:.0f} us (touch to return)")
        print(f"  guest blocked      {report.blocked_s:.3f} s in all")
        print(f"  no more faults     after {mapped_s:.3f} s (all loaded and mapped in)" if mapped_s is not None
              else "  no more faults     not reached")
        print(f"  daemon's faults    {r.get('faults', 0)} ({r.get('faults_waited', 0)} waited, "
              f"{r.get('faults_zero', 0)} zero pages), {r.get('mapped_bytes', 0) >> 20} MiB mapped ahead, "
              "0 bytes copied")
        print(f"  bytes checked      {len(report.mismatches)} wrong touches, {len(bad)} wrong MiB after the load")
    print(f"  daemon exit        {daemon.returncode}")
    for e in errors[:5]:
        print(f"  error: {e}")
    ok = (report is not None and not report.mismatches and not report.errors and not bad and not errors
          and mapped_s is not None and daemon.returncode == 0)
    return 0 if ok else 1


def _start_daemon(args: argparse.Namespace, image: str, sock: str, extra: list[str]) -> DaemonProcess | None:
    """``pageload restore IMAGE --background EXTRA...`` started and ready (None: it failed, said so)."""
    daemon = DaemonProcess(image, sock, os.path.join(args.workdir, "daemon.log"),
                           ["--background", *extra, "--aio", args.aio, "--progress-interval", "1"])
    try:
        daemon.start()
    except DaemonStartError as exc:
        print(f"daemon failed to start: {exc}", file=sys.stderr)
        return None
    return daemon


def _guest_faults(size: int, count: int) -> list[tuple[int, int, int]]:
    """``count`` 4 KiB touches, 30 % of them on 64 hot pages (seeded)."""
    rng = random.Random(1)
    pages = size // 4096
    hot = [rng.randrange(pages) for _ in range(64)]
    return [(0, (rng.choice(hot) if rng.random() < 0.3 else rng.randrange(pages)) * 4096, 4096)
            for _ in range(count)]


def _ensure_sample(image: str, size: int) -> None:
    """Make the demo's sample image unless an earlier run left it."""
    if not os.path.exists(image):
        t = time.perf_counter()
        make_sample_image(image, size, seed=1)
        print(f"made sample image {image} in {time.perf_counter() - t:.2f} s")
