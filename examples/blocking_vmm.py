"""A VMM-like client that is not async: maps the daemon's memory file and touches
pages, asking the daemon for each range before reading it.

    pageload checkpoint sample /tmp/mem.img --size 256M
    pageload restore /tmp/mem.img --socket /tmp/pl.sock --background &
    python examples/blocking_vmm.py /tmp/pl.sock
"""

from __future__ import annotations

import random
import sys
import time

from loader import Client, mapped_memory


def main(socket_path: str, faults: int = 1000) -> None:
    with Client.connect(socket_path) as client, mapped_memory(client) as memory:
        print(f"connected: protocol v{client.version}, memory {client.memory_size} bytes, "
              f"page {client.page_size}, loaded already: {client.done_at_connect}")
        rng = random.Random(0)
        pages = client.memory_size // client.page_size
        worst = 0
        for _ in range(faults):
            offset = rng.randrange(pages) * client.page_size
            t0 = time.perf_counter_ns()
            client.wait(offset, client.page_size)  # blocks only until this page is in
            worst = max(worst, time.perf_counter_ns() - t0)
            _ = memory[offset]  # now safe to read
        print(f"{faults} faults served; slowest wait {worst / 1000:.0f} us")
        print({k: v for k, v in client.stats().items() if k in ("loaded_bytes", "total_bytes", "done")})


if __name__ == "__main__":
    main(sys.argv[1])
