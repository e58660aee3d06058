"""An async client: many concurrent waits over one connection (pipelined; replies
come back in whatever order the pages arrive).

    python examples/trio_pipelined.py /tmp/pl.sock
"""

from __future__ import annotations

import sys

import trio

from loader import TrioClient


async def main(socket_path: str) -> None:
    async with TrioClient.connect(socket_path) as client:
        step = client.memory_size // 64
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(client.wait, i * step, client.page_size)
        await client.prefetch(0, min(client.memory_size, 64 << 20))  # a hint, answered at once
        stats = await client.stats()
        print(f"64 waits served; {stats['loaded_bytes']} of {stats['total_bytes']} bytes loaded")


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
