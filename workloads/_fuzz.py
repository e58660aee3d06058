"""A protocol fuzzer for a running daemon: seeded random and mutated frames over many
connections, with correct clients waiting alongside and checking the bytes.

``fuzz_frames(rng)`` makes one connection's worth of frames: a hello (or not), then
valid requests with random fields (most of them), requests with a field of the wrong
type or value, unknown ops, values that are not maps; and for some connections a
last frame that may end it: a valid request with a byte flipped, cut or doubled,
deep nesting, an oversized string, raw random bytes.  Frames are written with msgpack directly, not with the
``protocol`` package: the fuzzer does not share the daemon's idea of a frame.

``run_fuzz`` sends ``frames`` of those over connections opened ``workers`` at a time
(each connection: send its frames, shut down writing, read every reply until the
daemon closes), while ``checkers`` clients wait on random ranges and compare the
memory with the image.  It reports the daemon's memory before, at its peak and
after the connections closed.

    python -m workloads.fuzz [--frames N] [--seed S] [--size BYTES] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from loader import Client, ClientError, mapped_memory

from ._daemon_process import DaemonProcess
from ._sample import make_sample_image

PAGE = 4096
OPS = ("wait", "prefetch", "stats", "memfd", "hello")


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), rng.getrandbits(64)])
    if kind == 3:
        return rng.random() * 1e6
    if kind == 4:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
    if kind == 5:
        return rng.randbytes(rng.randrange(12))
    if kind == 6:
        return rng.choice(OPS)
    if kind in (7, 8):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = ["op", "id", "off", "len", "v", "x"]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def _valid_request(rng: random.Random, id: int, size: int) -> dict[str, Any]:
    op = rng.choices(("wait", "prefetch", "stats", "memfd"), (70, 25, 1, 1))[0]
    if op in ("wait", "prefetch"):
        length = rng.choice([1, PAGE, 2 * PAGE, rng.randrange(1, 1 << 20)])
        offset = rng.randrange(0, max(1, size - length))
        if rng.random() < 0.05:
            offset = size - rng.randrange(0, 2 * PAGE)  # around the end: some out of range
        return {"op": op, "id": id, "off": offset, "len": length}
    return {"op": op, "id": id}


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    how = rng.randrange(4)
    if how == 0 and b:
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif how == 1 and len(b) > 1:
        del b[rng.randrange(1, len(b)) :]
    elif how == 2:
        b[rng.randrange(len(b) + 1) : 0] = rng.randbytes(rng.randrange(1, 6))
    else:
        b.extend(data)  # the same request twice: a duplicate id
    return bytes(b)


def fuzz_frames(rng: random.Random, size: int, count: int) -> list[bytes]:
    """``count`` frames for one connection (the first is usually a valid hello)."""
    frames: list[bytes] = []
    if rng.random() < 0.95:
        versions = rng.choices([[1], [1, 2], [2, 1], [7]], (40, 25, 25, 5))[0]  # [7]: unsupported
        frames.append(_pack({"op": "hello", "id": 0, "v": versions}))
    next_id = 1
    while len(frames) < count:
        roll = rng.random()
        if roll < 0.96:  # valid: the connection lives on
            frames.append(_pack(_valid_request(rng, next_id, size)))
        elif roll < 0.99:  # well framed, wrong inside: bad-message, unknown-op, duplicate id...
            message = _valid_request(rng, next_id, size)
            message[rng.choice(["op", "id", "off", "len"])] = _random_value(rng)
            frames.append(_pack(message))
        else:
            frames.append(_pack(_random_value(rng)))
        next_id += 1
    if rng.random() < 0.3:  # end with a frame that may kill the connection
        roll = rng.random()
        if roll < 0.4:
            frames.append(_mutate(rng, _pack(_valid_request(rng, next_id, size))))
        elif roll < 0.6:
            depth = rng.choice([7, 8, 9, 100, 1000, 1100])
            frames.append(b"\x82\xa2op\xa4wait\xa2id" + b"\x91" * depth + b"\x00")
        elif roll < 0.8:
            frames.append(_pack({"op": "wait", "id": next_id, "pad": "x" * rng.choice([1000, 1025, 70_000])}))
        else:
            frames.append(rng.randbytes(rng.randrange(1, 64)))
    return frames


@dataclass
class FuzzReport:
    frames: int = 0
    connections: int = 0
    replies: int = 0
    seconds: float = 0.0
    checked_waits: int = 0
    check_errors: list[str] = field(default_factory=list)
    daemon_alive: bool = True
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    anon_before: int = 0
    anon_after: int = 0

    def summary(self) -> str:
        mib = 1 << 20
        return (f"{self.frames} frames over {self.connections} connections in {self.seconds:.1f} s "
                f"({self.frames / max(self.seconds, 1e-9):,.0f} frames/s), {self.replies} replies; "
                f"{self.checked_waits} checked waits, {len(self.check_errors)} wrong; daemon "
                f"{'alive' if self.daemon_alive else 'DEAD'}; RSS before {self.rss_before / mib:.1f} MiB, "
                f"peak {self.rss_peak / mib:.1f} MiB, after {self.rss_after / mib:.1f} MiB "
                f"(RssAnon {self.anon_before / mib:.1f} -> {self.anon_after / mib:.1f} MiB)")


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and RssAnon of ``pid``, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _one_connection(path: str, frames: list[bytes]) -> int:
    """Send ``frames``, shut down writing, read until the daemon closes; replies counted."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(path)
        try:
            s.sendall(b"".join(frames))
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it hung up on a fatal frame: read what it said
        unpacker = msgpack.Unpacker(max_buffer_size=8 << 20)
        replies = 0
        try:
            while chunk := s.recv(1 << 16):
                unpacker.feed(chunk)
                replies += sum(1 for _ in unpacker)
        except ConnectionResetError:
            pass
        return replies


def _checker(path: str, image: bytes, stop: threading.Event, report: FuzzReport, seed: int) -> None:
    rng = random.Random(seed)
    size = len(image)
    try:
        with Client.connect(path, timeout=60) as client, mapped_memory(client) as memory:
            while not stop.is_set():
                offset = rng.randrange(0, size - PAGE) & ~(PAGE - 1)
                length = rng.choice([PAGE, 4 * PAGE, 64 * PAGE])
                length = min(length, size - offset)
                client.wait(offset, length)
                if memory[offset : offset + length] != image[offset : offset + length]:
                    report.check_errors.append(f"wrong bytes at {offset:#x}+{length:#x}")
                report.checked_waits += 1
    except (ClientError, OSError) as exc:
        report.check_errors.append(f"checker {seed}: {exc}")


def run_fuzz(path: str, pid: int, image: bytes, *, frames: int, seed: int = 0, workers: int = 8,
             per_connection: int = 100, checkers: int = 2) -> FuzzReport:
    """Fuzz the daemon at ``path`` (process ``pid``) with ``frames`` frames."""
    report = FuzzReport()
    before = process_memory(pid)
    report.rss_before, report.anon_before = before["VmRSS"], before["RssAnon"]
    report.rss_peak = report.rss_before
    size = len(image)
    rng = random.Random(seed)
    # A pool of connections' frames, reused in turn (generating is slower than sending).
    pool = [fuzz_frames(random.Random(rng.getrandbits(64)), size, rng.randrange(1, 2 * per_connection))
            for _ in range(min(512, max(1, frames // per_connection)))]
    lock = threading.Lock()
    counter = iter(range(1 << 62))
    stop = threading.Event()
    errors: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                if report.frames >= frames or errors:
                    return
                batch = pool[next(counter) % len(pool)]
                report.frames += len(batch)
                report.connections += 1
            try:
                n = _one_connection(path, batch)
            except OSError as exc:
                with lock:
                    errors.append(f"connection failed: {exc}")
                return
            with lock:
                report.replies += n

    check_threads = [threading.Thread(target=_checker, args=(path, image, stop, report, seed + i))
                     for i in range(checkers)]
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    t0 = time.perf_counter()
    for t in check_threads + threads:
        t.start()
    while any(t.is_alive() for t in threads):
        report.rss_peak = max(report.rss_peak, process_memory(pid)["VmRSS"])
        time.sleep(0.2)
    stop.set()
    for t in threads + check_threads:
        t.join()
    report.seconds = time.perf_counter() - t0
    report.check_errors.extend(errors)
    try:
        os.kill(pid, 0)
        after = process_memory(pid)
        report.rss_after, report.anon_after = after["VmRSS"], after["RssAnon"]
        report.rss_peak = max(report.rss_peak, after["VmHWM"])
    except (ProcessLookupError, FileNotFoundError):
        report.daemon_alive = False
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workloads.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64 << 20, help="guest memory bytes of the sample image")
    p.add_argument("--workers", type=int, default=8, help="connections open at once")
    p.add_argument("--max-rss-growth", type=int, default=10 << 20,
                   help="fail if the daemon's RssAnon grew more than this many bytes (default 10 MiB)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pageload-fuzz-") as d:
        image_path = os.path.join(d, "memory.img")
        make_sample_image(image_path, args.size, seed=args.seed)
        with open(image_path, "rb") as f:
            image = f.read()
        sock = os.path.join(d, "fuzz.sock")
        with DaemonProcess(image_path, sock, os.path.join(d, "daemon.log"), ["--background", "-q"]) as daemon:
            with Client.connect(sock) as client:  # measure from a loaded, idle daemon
                while not client.stats()["done"]:
                    time.sleep(0.05)
            report = run_fuzz(sock, daemon.pid, image, frames=args.frames, seed=args.seed, workers=args.workers)
            code = daemon.stop()
            tail = daemon.stderr_tail()
    print(report.summary())
    growth = report.anon_after - report.anon_before
    failed = []
    if not report.daemon_alive or code != 0:
        failed.append(f"the daemon died or exited {code}: {tail}")
    if report.check_errors:
        failed.append("; ".join(report.check_errors[:5]))
    if report.checked_waits == 0:
        failed.append("no checked wait completed")
    if growth > args.max_rss_growth:
        failed.append(f"RssAnon grew {growth / (1 << 20):.1f} MiB")
    for line in failed:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
