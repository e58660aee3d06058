"""A fuzzer for the uffd socket's handshake (``--uffd-socket``): seeded hostile
handshakes over many connections, JSON and SCM_RIGHTS variants, while correct
clients wait on the wait socket and check the bytes; then a real (emulated) VMM
must still be served.

JSON variants: Firecracker's message with a byte flipped, cut, doubled or spliced;
random JSON values; deep nesting (``[`` and ``{"a":`` up to 100k levels); numbers
at and past 2^64, negative, fractional, thousands of digits; regions unaligned,
overlapping, past the image or the address space; 1025 regions; messages past the
size limit; bytes that are not UTF-8.  SCM_RIGHTS variants: no descriptor, a
userfaultfd, two, a descriptor that is not a userfaultfd (eventfd, pipe, memfd),
a userfaultfd among junk descriptors, the descriptor in a second message, the
message in pieces, a connection closed at once.  A handshake the daemon could
accept would end the run (it serves one VMM, then exits): a userfaultfd goes only
with a message that cannot be a list of regions (checked here with ``json`` alone,
not with the daemon's parser), or that claims memory past the image.

``run_uffd_fuzz`` reports the refusals seen (connections the daemon closed), the
daemon's descriptors and memory before and after, and whether a VMM was served.

    python -m workloads.fuzz_uffd [--handshakes N] [--seed S] [--size BYTES] [--workers N]
"""

from __future__ import annotations

import argparse
import array
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from loader import Client
from loader.uffd import _ioctl as _uffd

from ._daemon_process import DaemonProcess
from ._fuzz import _checker, process_memory
from ._sample import make_sample_image
from ._vmm import GuestRegion, VmmEmulator

PAGE = 4096
_FIELDS = ("base_host_virt_addr", "size", "offset", "page_size", "page_size_kib")
_NUMBERS = [0, 1, -1, 4096, 4095, 2**12, 2**21, 2**30, 2**47, 2**63 - 1, 2**63, 2**64 - 4096, 2**64 - 1,
            2**64, 2**64 + 4096, 2**70, -(2**63)]


def _region(rng: random.Random, size: int, past_image: bool) -> dict[str, Any]:
    page = rng.choice([PAGE, PAGE, 2 << 20])
    length = page * rng.randrange(1, 16)
    offset = size + page * rng.randrange(0, 16) if past_image else page * rng.randrange(0, max(1, size // page))
    base = rng.choice([0x7F0000000000, 0x10000, 2**64 - length, 2**47]) + page * rng.randrange(0, 1024)
    return {"base_host_virt_addr": base, "size": length, "offset": offset, "page_size": page,
            "page_size_kib": page}


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(_NUMBERS)
    if kind == 1:
        return rng.choice([None, True, False, 1.5, 1e308, -0.0, ""])
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
    if kind == 3:
        return rng.choice(_FIELDS)
    if kind == 4:
        return rng.randrange(-(2**70), 2**70)
    if kind == 5:
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(_FIELDS + ("x",)): _json_value(rng, depth + 1) for _ in range(rng.randrange(6))}


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        how = rng.randrange(5)
        if how == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif how == 1 and len(b) > 1:
            del b[rng.randrange(1, len(b)):]
        elif how == 2:
            b[rng.randrange(len(b) + 1):0] = rng.randbytes(rng.randrange(1, 6))
        elif how == 3:
            b.extend(data)
        else:
            at = rng.randrange(len(b) + 1)
            b[at:at] = rng.choice([b"[", b"]", b"{", b"}", b",", b":", b'"', b"\\", b"-", b"e9", b"\xff", b"\x00"])
    return bytes(b)


def handshake_message(rng: random.Random, size: int) -> bytes:
    """One hostile handshake message (see the module doc)."""
    roll = rng.random()
    if roll < 0.35:  # Firecracker's message, mutated
        regions = [_region(rng, size, rng.random() < 0.3) for _ in range(rng.randrange(1, 5))]
        return _mutate(rng, json.dumps(regions).encode())
    if roll < 0.55:  # well formed, wrong inside
        regions = [_region(rng, size, rng.random() < 0.5) for _ in range(rng.randrange(1, 5))]
        for r in regions:
            if rng.random() < 0.5:
                r[rng.choice(_FIELDS)] = _json_value(rng)
            if rng.random() < 0.2:
                del r[rng.choice(_FIELDS[:3])]
        if rng.random() < 0.2 and len(regions) > 1:
            regions[1] = dict(regions[0])  # overlapping
        return json.dumps(regions).encode()
    if roll < 0.7:
        return json.dumps(_json_value(rng)).encode()
    if roll < 0.8:
        depth = rng.choice([10, 900, 1000, 1100, 5000, 100_000])
        opener = rng.choice([b"[", b'{"a":', b'[{"size":'])
        return opener * depth + rng.choice([b"", b"0", b"]" * depth])
    if roll < 0.87:  # numbers: huge, past 2^64, many digits
        digits = rng.choice([20, 21, 4300, 5000, 60_000])
        r = {"base_host_virt_addr": int("9" * digits) if digits < 5000 else 0, "size": PAGE,
             "offset": 0, "page_size": PAGE}
        text = json.dumps([r]) if digits < 5000 else '[{"base_host_virt_addr": ' + "9" * digits + "}]"
        return text.encode()
    if roll < 0.92:  # too many regions, or past the size limit
        n = rng.choice([1025, 2000])
        regions = [_region(rng, size, True) for _ in range(n)]
        return json.dumps(regions, indent=rng.choice([None, 8])).encode()
    if roll < 0.96:
        return rng.randbytes(rng.randrange(0, 64))
    return b""


def could_be_regions(data: bytes, size: int) -> bool:
    """Whether ``data`` might be a handshake the daemon accepts (then no userfaultfd
    goes with it): a non-empty JSON list of objects whose offsets and sizes are
    integers inside the image of ``size`` bytes.  ``json`` alone, not the daemon's
    parser: a message that claims memory past the image is refused whatever else."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return False
    if not isinstance(value, list) or not value or not all(isinstance(r, dict) for r in value):
        return False
    for r in value:
        offset, length = r.get("offset"), r.get("size")
        if not (isinstance(offset, int) and isinstance(length, int)):
            return False
        if isinstance(offset, bool) or isinstance(length, bool) or offset + length > size:
            return False
    return True


@dataclass
class UffdFuzzReport:
    handshakes: int = 0
    with_uffd: int = 0  #: of those, carrying a real userfaultfd (the parser's path)
    junk_fds: int = 0  #: descriptors sent that are not userfaultfds
    closed_by_daemon: int = 0  #: connections the daemon refused (EOF or reset)
    seconds: float = 0.0
    checked_waits: int = 0
    check_errors: list[str] = field(default_factory=list)
    daemon_alive: bool = True
    fds_before: int = 0
    fds_after: int = 0
    rss_before: int = 0
    rss_after: int = 0
    anon_before: int = 0
    anon_after: int = 0
    vmm_served: bool = False
    vmm_mismatches: int = 0

    def summary(self) -> str:
        mib = 1 << 20
        return (f"{self.handshakes} hostile uffd handshakes ({self.with_uffd} with a userfaultfd, "
                f"{self.junk_fds} other descriptors sent) in {self.seconds:.1f} s "
                f"({self.handshakes / max(self.seconds, 1e-9):,.0f}/s), {self.closed_by_daemon} refused; "
                f"{self.checked_waits} checked waits, {len(self.check_errors)} wrong; daemon "
                f"{'alive' if self.daemon_alive else 'DEAD'}; descriptors {self.fds_before} -> {self.fds_after}; "
                f"RSS {self.rss_before / mib:.1f} -> {self.rss_after / mib:.1f} MiB "
                f"(RssAnon {self.anon_before / mib:.1f} -> {self.anon_after / mib:.1f} MiB); then a VMM "
                + (f"served, {self.vmm_mismatches} wrong pages" if self.vmm_served else "NOT served"))


def _fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settled_fds(pid: int, timeout: float = 10.0) -> int:
    """The daemon's descriptors once the count stops changing (a closed connection goes just after)."""
    deadline = time.monotonic() + timeout
    last = _fds_of(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = _fds_of(pid)
        if now == last:
            break
        last = now
    return last


def _junk_fd(rng: random.Random) -> list[int]:
    kind = rng.randrange(3)
    if kind == 0:
        return [os.eventfd(0, os.EFD_CLOEXEC)]
    if kind == 1:
        r, w = os.pipe()
        return [r, w]
    return [os.memfd_create("fuzz", os.MFD_CLOEXEC)]


def _new_uffd() -> int:
    fd = _uffd.userfaultfd()
    _uffd.api(fd)
    return fd


def _rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def one_handshake(path: str, rng: random.Random, size: int, report: UffdFuzzReport, lock: threading.Lock) -> None:
    """Send one hostile handshake (message + descriptors), half-close, read until the daemon closes."""
    data = handshake_message(rng, size)
    mine: list[int] = []  # descriptors to close here once sent (the daemon gets its own copies)
    roll = rng.random()
    send_uffd = roll < 0.75 and not could_be_regions(data, size)
    junk = 0
    if send_uffd:
        mine.append(_new_uffd())
        if rng.random() < 0.1:
            mine.append(_new_uffd())  # two userfaultfds
        if rng.random() < 0.1:
            for _ in range(rng.randrange(1, 6)):
                fds = _junk_fd(rng)
                mine.extend(fds)
                junk += len(fds)
    elif roll < 0.9:
        fds = _junk_fd(rng)
        mine.extend(fds)
        junk += len(fds)
    # else: no descriptor at all
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(path)
            how = rng.random()
            try:
                if how < 0.05:
                    pass  # closed at once
                elif how < 0.15 and len(data) > 1:  # in pieces: the descriptor with the first
                    cut = rng.randrange(1, len(data))
                    s.sendmsg([data[:cut]], _rights(mine))
                    s.sendall(data[cut:])
                elif how < 0.2:  # the descriptor in a second message
                    s.sendall(data or b"[")
                    s.sendmsg([b" "], _rights(mine))
                else:
                    s.sendmsg([data or b" "], _rights(mine))  # (a large one may be refused before it is all sent)
                s.shutdown(socket.SHUT_WR)
                closed = s.recv(1) == b""
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            except TimeoutError:
                closed = False
    finally:
        for fd in mine:
            os.close(fd)
    with lock:
        report.handshakes += 1
        report.with_uffd += send_uffd
        report.junk_fds += junk
        report.closed_by_daemon += closed


def run_uffd_fuzz(uffd_path: str, wait_path: str, pid: int, image: bytes, *, handshakes: int, seed: int = 0,
                  workers: int = 4, checkers: int = 2, image_path: str | None = None) -> UffdFuzzReport:
    """Fuzz the uffd socket at ``uffd_path`` of the daemon ``pid`` (wait socket
    ``wait_path``) with ``handshakes`` hostile handshakes; then connect a VMM over the
    whole image (checked against ``image_path`` when given) and touch some pages."""
    report = UffdFuzzReport()
    size = len(image)
    before = process_memory(pid)
    report.rss_before, report.anon_before = before["VmRSS"], before["RssAnon"]
    with Client.connect(wait_path, timeout=30) as client:  # the daemon's read-only memory fd, opened once
        os.close(client.memory_fd())
    report.fds_before = _settled_fds(pid)
    lock = threading.Lock()
    counter = iter(range(handshakes))
    errors: list[str] = []
    stop = threading.Event()

    def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        while True:
            with lock:
                if next(counter, None) is None or errors:
                    return
            try:
                one_handshake(uffd_path, rng, size, report, lock)
            except OSError as exc:
                with lock:
                    errors.append(f"handshake connection failed: {exc}")
                return

    check_threads = [threading.Thread(target=_checker, args=(wait_path, image, stop, report, seed + i))
                     for i in range(checkers)]
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    t0 = time.perf_counter()
    for t in check_threads + threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in check_threads:
        t.join()
    report.seconds = time.perf_counter() - t0
    report.check_errors.extend(errors)
    try:
        process_memory(pid)["VmRSS"]  # (a zombie has none)
    except (OSError, KeyError):
        report.daemon_alive = False
        return report
    deadline = time.monotonic() + 10  # the last refused connections are closed just after their EOF
    while _fds_of(pid) > report.fds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        report.fds_after = _settled_fds(pid)
        after = process_memory(pid)
        report.rss_after, report.anon_after = after["VmRSS"], after["RssAnon"]
    except (OSError, KeyError):  # it died meanwhile
        report.daemon_alive = False
        return report
    rng = random.Random(seed)
    pages = (size // PAGE) * PAGE
    with VmmEmulator([GuestRegion(0, pages)], expected=image_path) as vmm:
        vmm.connect(uffd_path)
        with Client.connect(wait_path, timeout=30) as client:  # the daemon says it took the VMM
            deadline = time.monotonic() + 30
            while "uffd" not in client.stats() and time.monotonic() < deadline:
                time.sleep(0.02)
            if "uffd" not in client.stats():
                return report
        offsets = sorted(rng.randrange(0, pages // PAGE) * PAGE for _ in range(64))
        touched = vmm.touch([(0, off, PAGE) for off in offsets], vcpus=2)
        report.vmm_served = touched.touches == len(offsets)
        report.vmm_mismatches = len(touched.mismatches)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workloads.fuzz_uffd", description=__doc__.split("\n\n")[0])
    p.add_argument("--handshakes", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64 << 20, help="guest memory bytes of the sample image")
    p.add_argument("--workers", type=int, default=4, help="connections open at once")
    p.add_argument("--max-rss-growth", type=int, default=10 << 20,
                   help="fail if the daemon's RssAnon grew more than this many bytes (default 10 MiB)")
    args = p.parse_args(argv)
    why = _uffd.unavailable()
    if why is not None:
        print(f"uffd handshake fuzz skipped: {why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="pageload-fuzz-uffd-") as d:
        image_path = os.path.join(d, "memory.img")
        make_sample_image(image_path, args.size, seed=args.seed)
        with open(image_path, "rb") as f:
            image = f.read()
        sock, uffd = os.path.join(d, "fuzz.sock"), os.path.join(d, "fuzz.uffd")
        with DaemonProcess(image_path, sock, os.path.join(d, "daemon.log"),
                           ["--background", "-q", "--uffd-socket", uffd]) as daemon:
            report = run_uffd_fuzz(uffd, sock, daemon.pid, image, handshakes=args.handshakes, seed=args.seed,
                                   workers=args.workers, image_path=image_path)
            assert daemon.proc is not None
            code = daemon.proc.wait(30) if report.vmm_served else daemon.stop()
            tail = daemon.stderr_tail()
    print(report.summary())
    failed = []
    if not report.daemon_alive or code != 0:
        failed.append(f"the daemon died or exited {code}: {tail}")
    if report.check_errors:
        failed.append("; ".join(report.check_errors[:5]))
    if report.checked_waits == 0:
        failed.append("no checked wait completed")
    if report.fds_after > report.fds_before:
        failed.append(f"the daemon holds {report.fds_after - report.fds_before} more descriptors")
    if report.anon_after - report.anon_before > args.max_rss_growth:
        failed.append(f"RssAnon grew {(report.anon_after - report.anon_before) / (1 << 20):.1f} MiB")
    if not report.vmm_served or report.vmm_mismatches:
        failed.append("the VMM after the fuzz was not served correctly")
    for line in failed:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["UffdFuzzReport", "could_be_regions", "handshake_message", "run_uffd_fuzz"]

if __name__ == "__main__":
    sys.exit(main())
