"""Server reply path: pipelined waits per second on a fully loaded image.

Every wait is for a loaded page, so the daemon answers it at once; what is measured
is the server's read -> decode -> reply -> write path.  CONNECTIONS raw sockets each
keep DEPTH waits in flight (ids below 128, so each Loaded reply is 15 bytes and the
client compares bytes): ``bench._latency.daemon_rate``, the latency section's figure.

    python examples/reply_path_bench.py [SECONDS] [CONNECTIONS] [DEPTH]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from bench._latency import daemon_rate
from loader import Client
from workloads import DaemonProcess, make_sample_image

SIZE = 64 << 20


def main(seconds: float = 5.0, connections: int = 8, depth: int = 64) -> None:
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "memory.img")
        make_sample_image(image, SIZE, seed=1)
        path = os.path.join(d, "s.sock")
        with DaemonProcess(image, path, os.path.join(d, "daemon.log"), ["--background", "-q"]):
            with Client.connect(path) as client:
                while not client.stats()["done"]:
                    time.sleep(0.05)
            rate = daemon_rate(path, connections=connections, depth=depth, seconds=seconds)
    print(f"{connections} connections x {depth} in flight for {seconds:.1f} s: {rate:,.0f} waits/s")


if __name__ == "__main__":
    main(*(float(a) if i == 0 else int(a) for i, a in enumerate(sys.argv[1:])))  # type: ignore[arg-type]
