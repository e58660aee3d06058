"""Server reply path: pipelined waits per second on a fully loaded image.

Every wait is for a loaded page, so the daemon answers it at once; what is measured
is the server's read -> decode -> reply -> write path.  CONNECTIONS raw sockets each
keep DEPTH waits in flight (ids below 128, so each Loaded reply is 15 bytes and the
client only counts bytes).

    python examples/reply_path_bench.py [SECONDS] [CONNECTIONS] [DEPTH]
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time

import msgpack

from loader import Client
from workloads import DaemonProcess, make_sample_image

PAGE = 4096
SIZE = 64 << 20
REPLY_BYTES = len(msgpack.packb({"re": 1, "ok": "loaded"}))


def connection(path: str, depth: int, until: float, counts: list[int], index: int) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(msgpack.packb({"op": "hello", "id": 0, "v": [1]}))
    hello = sock.recv(4096)
    assert b"hello" in hello, hello
    burst = b"".join(msgpack.packb({"op": "wait", "id": i, "off": (index * 997 + i) * PAGE % SIZE, "len": PAGE})
                     for i in range(1, depth + 1))
    want = depth * REPLY_BYTES
    done = 0
    while time.perf_counter() < until:
        sock.sendall(burst)
        got = 0
        while got < want:
            chunk = sock.recv(65536)
            assert chunk, "the daemon closed the connection"
            got += len(chunk)
        done += depth
    counts[index] = done
    sock.close()


def main(seconds: float = 5.0, connections: int = 8, depth: int = 64) -> None:
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "memory.img")
        make_sample_image(image, SIZE, seed=1)
        path = os.path.join(d, "s.sock")
        with DaemonProcess(image, path, os.path.join(d, "daemon.log"), ["--background", "-q"]):
            with Client.connect(path) as client:
                while not client.stats()["done"]:
                    time.sleep(0.05)
            counts = [0] * connections
            until = time.perf_counter() + seconds
            t0 = time.perf_counter()
            threads = [threading.Thread(target=connection, args=(path, depth, until, counts, i))
                       for i in range(connections)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
    total = sum(counts)
    print(f"{total} waits in {elapsed:.2f} s over {connections} connections x {depth} in flight: "
          f"{total / elapsed:,.0f} waits/s")


if __name__ == "__main__":
    main(*(float(a) if i == 0 else int(a) for i, a in enumerate(sys.argv[1:])))  # type: ignore[arg-type]
