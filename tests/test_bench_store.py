"""``pageload bench --sections store`` at a tiny size: the JSON's shape and that its
figures agree with each other (GET and PUT counts, dedup bytes); no timing asserted.
And the proxy it measures through: no Nagle on its sockets."""

from __future__ import annotations

import socket
import time

from workloads import FaultProxy


def test_the_fault_proxy_sends_without_nagle() -> None:
    """A response goes out in pieces (head, then the body piece by piece under the cap):
    with Nagle each small piece waited for the client's delayed ACK (a 4 KiB GET through
    the proxy took 44 ms instead of 2, a capped 2 MiB one 88 ms instead of 38)."""
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        port = upstream.getsockname()[1]
        with FaultProxy(f"http://127.0.0.1:{port}") as proxy:
            there = proxy.endpoint.rpartition(":")[2]
            with socket.create_connection(("127.0.0.1", int(there))):
                deadline = time.monotonic() + 10
                while not proxy._conns and time.monotonic() < deadline:
                    time.sleep(0.01)
                conns = list(proxy._conns)
                assert conns and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in conns)
