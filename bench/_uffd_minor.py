"""Zero-copy userfaultfd mode measured against the ``fill`` handler, in one run.

:func:`run_zero_copy` starts ``pageload restore IMAGE --background
--allow-writable-memory-fd`` and maps guest memory from the daemon's memory file
(:class:`workloads._vmm.ZeroCopyVmm`, i.e. :class:`loader.vmm.ZeroCopyMemory`), with
the same guest as the ``uffd`` section: ``vcpus`` threads touching ``touches`` random
4 KiB pages paced over ``window_s`` (by default the time of ``cp``).  Figures, as in
that section: fault p50/p99/max (touch to return of the touches whose page was not
mapped just before), guest blocked time (every touch), the daemon's own fault
service histogram, and the time from connect until every loaded page is mapped into
the guest (``no_more_faults_s``: from then on the guest never faults on data).
With ``compare`` the ``fill`` handler runs the same touches too, in the order fill,
zero-copy, zero-copy, fill (the first run after ``cp`` measured slower on the shared
development machine, whichever it was), and the ratios compare the means of the two
runs of each.

Not a section of its own: ``run_uffd_section`` adds one zero-copy run
(:func:`bench._guest.zero_copy_run`, shared with this module) as a row next to
``fill``, ``eager`` and ``lazy``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from loader.uffd import _ioctl as _uffd

from ._guest import cp_extra, guest_touches, handler_run, zero_copy_run
from ._tools import warm_cache

__all__ = ["run_zero_copy"]


def run_zero_copy(image: str, workdir: str, *, touches: int = 3000, vcpus: int = 2,
                  window_s: float | None = None, seed: int = 0, compare: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure zero-copy mode (and ``fill`` with ``compare``) on ``image``, a raw image."""
    why = _uffd.unavailable(_uffd.FEATURE_MINOR_SHMEM)
    if why is not None:
        return {"skipped": why}
    size = os.path.getsize(image)
    cp_s, cp_rate, window, trace, cpl = guest_touches(image, touches, window_s, seed, log)
    timeout = max(30.0, 20 * cp_s)
    order = ("fill", "zero-copy", "zero-copy", "fill") if compare else ("zero-copy",)
    runs: dict[str, list[dict[str, Any]]] = {}
    for mode in order:
        warm_cache(image)
        run = (zero_copy_run(image, workdir, trace, vcpus, timeout, log) if mode == "zero-copy"
               else handler_run("fill", image, workdir, trace, vcpus, timeout, log))
        runs.setdefault(mode, []).append(run)
    result: dict[str, Any] = {
        "image": {"path": image, "size_bytes": size},
        "guest": {"touches": touches, "vcpus": vcpus, "window_s": window, "seed": seed},
        "cp": {"seconds": cp_s, "mb_s": cp_rate, "how": "the fastest warm cp", **cp_extra(cpl)},
        "order": list(order),
        "runs": runs,
    }
    if compare:
        def ratio(get: Callable[[dict[str, Any]], float | None]) -> float | None:
            z = [v for v in map(get, runs["zero-copy"]) if v is not None]
            f = [v for v in map(get, runs["fill"]) if v is not None]
            if len(z) < len(runs["zero-copy"]) or len(f) < len(runs["fill"]) or not sum(f):
                return None
            return sum(z) / sum(f)

        result["ratios"] = {
            "fault_p50": ratio(lambda r: r["fault_us"]["p50"]),
            "blocked": ratio(lambda r: r["blocked_s"]),
            "no_more_faults": ratio(lambda r: r["no_more_faults_s"]),
        }
    return result
