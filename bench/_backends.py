"""``pageload bench`` section ``backends``: AIO backends compared.

On one dense image, for every usable backend (unusable ones are listed with the
reason :func:`aio.check_available` gives), for the raw image and for a pages
checkpoint made from it (``create_checkpoint``: page-aligned, the O_DIRECT case),
each without and with ``--direct``, each with a warm and a cold page cache:

* fill throughput: the daemon's own figure at ``done``, median of ``repeat``
  fills without waits;
* 4 KiB waits on pages not loaded yet during one more fill (client-timed p50/p99).

Cold means ``sync; echo 3 > /proc/sys/vm/drop_caches`` before every run of that
configuration (root only; otherwise cold is skipped and the reason recorded).
Warm means the source file was read once just before the configuration's runs.
The limit is ``cp IMAGE /dev/shm/x``, warm and cold.  Then the ``threads``
backend's thread count (1, 2, 4, 8 by default): warm raw image, median of
``thread_repeat`` fills each, so the default can be set to the best.

Last, what checksum verification costs (threads, warm): on the pages checkpoint
(16 KiB chunks, the default) and on one made with the old 1 MiB chunks, the fill
verified against ``--no-verify`` and the 4 KiB wait p50 during a fill, verified
against ``--no-verify``, each ratio against its goal (fill >= 0.85x, wait <= 1.5x).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import aio
from loader.checkpoint import create_checkpoint, open_checkpoint
from workloads import percentiles

from ._tools import BenchError, cp_mb_s, drop_caches, fill_run, median, warm_cache

__all__ = ["THREAD_COUNTS", "run_backends_section"]

THREAD_COUNTS = (1, 2, 4, 8)


def _default_threads() -> int | None:
    try:
        from aio._threads import DEFAULT_THREADS
    except ImportError:
        return None
    return int(DEFAULT_THREADS)


def run_backends_section(
    image: str,
    workdir: str,
    *,
    repeat: int = 1,
    thread_repeat: int = 3,
    thread_counts: Sequence[int] = THREAD_COUNTS,
    backends: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure the matrix in the module docstring; returns the section's JSON."""
    pages_dir = os.path.join(workdir, "pages-checkpoint")
    if not os.path.exists(pages_dir):
        log(f"creating the pages checkpoint {pages_dir}")
        create_checkpoint(image, pages_dir)
    pages_file = open_checkpoint(pages_dir).pages_path
    sources = {"raw": (image, image), "pages": (pages_dir, pages_file)}

    usable: list[str] = []
    unavailable: dict[str, str] = {}
    for name in backends or aio.backends():
        try:
            aio.check_available(name)
            usable.append(name)
        except aio.BackendUnavailable as exc:
            unavailable[name] = str(exc)
            log(f"backend {name} skipped: {exc}")

    cold_reason = drop_caches()  # also tells whether cold runs are possible
    caches = ["warm"] if cold_reason else ["warm", "cold"]
    if cold_reason:
        log(f"cold page cache skipped: {cold_reason}")

    limits: dict[str, Any] = {}
    if not cold_reason:
        limits["cp_cold_mb_s"] = cp_mb_s(image)[1]
    warm_cache(image)
    limits["cp_warm_mb_s"] = median([cp_mb_s(image)[1] for _ in range(max(repeat, 1))])
    log("cp image /dev/shm: " + ", ".join(f"{k[3:-5]} {v:.0f} MB/s" for k, v in limits.items()))

    runs: list[dict[str, Any]] = []
    for source, (path, data_file) in sources.items():
        for direct in (False, True):
            for cache in caches:
                for backend in usable:
                    runs.append(
                        _configuration(
                            path,
                            data_file,
                            workdir,
                            backend=backend,
                            source=source,
                            direct=direct,
                            cache=cache,
                            repeat=repeat,
                            log=log,
                        )
                    )

    warm_cache(image)
    counts: dict[str, Any] = {}
    if "threads" in usable:
        for n in thread_counts:
            mbs = [
                fill_run(image, workdir, ["--aio", "threads", "--threads", str(n)]).throughput_mb_s
                for _ in range(thread_repeat)
            ]
            counts[str(n)] = {"runs_mb_s": mbs, "mb_s": median(mbs)}
            log(f"threads={n}: {median(mbs):.0f} MB/s (runs {', '.join(f'{x:.0f}' for x in mbs)})")
    best = max(counts, key=lambda k: counts[k]["mb_s"]) if counts else None
    verify = _verify_cost(image, pages_dir, workdir, thread_repeat, log) if "threads" in usable else None
    return {
        "image": {"path": image, "size_bytes": os.path.getsize(image)},
        "pages_checkpoint": pages_dir,
        "backends": usable,
        "unavailable": unavailable,
        "cold": {"available": cold_reason is None, "reason": cold_reason},
        "limits": limits,
        "runs": runs,
        "threads": {
            "default": _default_threads(),
            "counts": counts,
            "best": int(best) if best is not None else None,
            "repeat": thread_repeat,
        },
        "verify": verify,
    }


#: what verification may cost (issue 20): the fill at least this much of --no-verify's,
#: a 4 KiB wait's p50 at most this many times --no-verify's
VERIFY_FILL_GOAL = 0.85
VERIFY_WAIT_GOAL = 1.5
#: the chunk size checkpoints had before 16 KiB became the default: measured beside it
OLD_CHUNK_SIZE = 1 << 20


def _verify_cost(image: str, pages_dir: str, workdir: str, repeat: int, log: Callable[[str], None]
                 ) -> dict[str, Any]:
    """What checksum verification costs, on the pages checkpoint (default chunk size)
    and on one with the old 1 MiB chunks (warm, threads): the fill with each chunk
    verified before it is served against ``--no-verify`` (``repeat`` fills each,
    alternating, medians), and the client-timed p50/p99 of 4 KiB waits on pages not
    loaded yet during one more fill each (verified and not, alternating)."""
    ckpt = open_checkpoint(pages_dir)
    old_dir = os.path.join(workdir, "pages-checkpoint-1m")
    if ckpt.chunk_size == OLD_CHUNK_SIZE:
        old_dir = pages_dir
    elif not os.path.exists(old_dir):
        log(f"creating {old_dir} (1 MiB checksum chunks, as before 16 KiB)")
        create_checkpoint(image, old_dir, chunk_size=OLD_CHUNK_SIZE)
    dirs = {ckpt.chunk_size or 0: pages_dir, OLD_CHUNK_SIZE: old_dir}
    out: dict[str, Any] = {"goals": {"fill_ratio_min": VERIFY_FILL_GOAL, "wait_p50_ratio_max": VERIFY_WAIT_GOAL},
                           "chunks": {}}
    for chunk_size, path in dirs.items():
        warm_cache(open_checkpoint(path).pages_path)
        on: list[float] = []
        off: list[float] = []
        for _ in range(max(repeat, 1)):
            on.append(fill_run(path, workdir, ["--aio", "threads"]).throughput_mb_s)
            off.append(fill_run(path, workdir, ["--aio", "threads", "--no-verify"]).throughput_mb_s)
        waits = {}
        for label, args in (("verified", []), ("unverified", ["--no-verify"])):
            probe = fill_run(path, workdir, ["--aio", "threads", *args], probe=True)
            waits[label] = percentiles(probe.samples_ns)
        verified, unverified = median(on), median(off)
        p50_on, p50_off = waits["verified"]["p50"], waits["unverified"]["p50"]
        cell = {
            "chunk_size": chunk_size,
            "checkpoint": path,
            "verified_mb_s": verified,
            "unverified_mb_s": unverified,
            "fill_ratio": verified / unverified if unverified else None,
            "runs": {"verified": on, "unverified": off},
            "wait_us": waits,
            "wait_p50_ratio": p50_on / p50_off if p50_off else None,
        }
        out["chunks"][str(chunk_size)] = cell
        log(f"checksums, {chunk_size >> 10} KiB chunks: fill {verified:.0f} MB/s verified, {unverified:.0f} "
            f"with --no-verify ({cell['fill_ratio'] or 0:.2f}x); 4 KiB wait p50 {p50_on:.0f} us verified, "
            f"{p50_off:.0f} us not ({cell['wait_p50_ratio'] or 0:.2f}x)")
    main = out["chunks"][str(ckpt.chunk_size or 0)]
    # the figures of the section's own checkpoint, as before, at the top level
    out.update(verified_mb_s=main["verified_mb_s"], unverified_mb_s=main["unverified_mb_s"],
               ratio=main["fill_ratio"], runs=main["runs"], chunk_size=ckpt.chunk_size)
    return out


def _configuration(
    path: str,
    data_file: str,
    workdir: str,
    *,
    backend: str,
    source: str,
    direct: bool,
    cache: str,
    repeat: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    args = ["--aio", backend] + (["--direct"] if direct else [])
    out: dict[str, Any] = {
        "backend": backend,
        "source": source,
        "direct": direct,
        "cache": cache,
        "error": None,
    }

    def prepare() -> None:
        if cache == "cold":
            drop_caches()
        else:
            warm_cache(data_file)

    label = f"{backend:7} {source:5} {'direct' if direct else 'cached':6} {cache}"
    try:
        fills = []
        for _ in range(repeat):
            prepare()
            fills.append(fill_run(path, workdir, args))
        prepare()
        probe = fill_run(path, workdir, args, probe=True)
    except BenchError as exc:
        out["error"] = str(exc)
        log(f"{label}: failed: {exc}")
        return out
    lat = percentiles(probe.samples_ns)
    out.update(
        fill_mb_s=median([r.throughput_mb_s for r in fills]),
        fill_runs_mb_s=[r.throughput_mb_s for r in fills],
        fill_with_waits_mb_s=probe.throughput_mb_s,
        wait_us=lat,
        daemon_blocked=probe.waits_served,
        rss_outside_peak_bytes=max(r.rss_outside_peak_bytes for r in [*fills, probe]),
    )
    log(
        f"{label}: fill {out['fill_mb_s']:.0f} MB/s; {lat['count']} waits p50 {lat['p50']:.0f} us "
        f"p99 {lat['p99']:.0f} us"
    )
    return out
