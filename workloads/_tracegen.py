"""Synthetic fault traces: sequential, uniform, zipf, strided, phased and bursty.

Every generator is a pure function of its parameters and ``seed`` (a private
``random.Random(seed)``; never the global one), so the same arguments give the same
trace, byte for byte.  Faults are ``granularity`` bytes long and aligned to it, and
lie inside ``[0, memory_size)``; ``memory_size`` is rounded down to a whole number
of granules.  Memory use is the trace itself plus O(1): no table per page, so a
64 GiB image costs no more than a 1 GiB one.

Timestamps: every kind but ``bursty`` paces faults at a constant ``rate`` (fault
``i`` at ``i * 1e6 / rate`` microseconds).  ``bursty`` draws bursts of faults at
``rate`` separated by idle gaps (see :func:`bursty`).

A generator returns the granule index of each fault; :func:`generate` turns them
into a :class:`~workloads.Trace`.  Given an image's layout, :func:`generate`
draws offsets in its data space (the data ranges end to end, holes left out) and
:func:`onto_layout` places them in memory, so faults land only on data.
"""

from __future__ import annotations

import math
import random
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from ._traces import Trace

if TYPE_CHECKING:
    from loader import Layout

__all__ = ["KINDS", "generate", "GRANULARITIES", "onto_layout"]

#: names accepted by ``--granularity``
GRANULARITIES = {"4K": 4096, "2M": 2 << 20}


def _constant_times(count: int, rate: float) -> array[int]:
    step = 1e6 / rate
    return array("Q", (int(i * step) for i in range(count)))


def sequential(rng: random.Random, units: int, count: int, **_: object) -> Iterator[int]:
    """Granules 0, 1, 2, ... (wrapping at the end of memory): monotonic, contiguous."""
    return (i % units for i in range(count))


def uniform(rng: random.Random, units: int, count: int, **_: object) -> Iterator[int]:
    """Granules drawn uniformly at random, with repeats."""
    rand = rng.randrange
    return (rand(units) for _ in range(count))


def _coprime_multiplier(rng: random.Random, units: int) -> int:
    if units <= 2:
        return 1
    while True:
        a = rng.randrange(units // 3 + 1, units) | 1
        if math.gcd(a, units) == 1:
            return a


def zipf(
    rng: random.Random, units: int, count: int, *, zipf_s: float = 1.1, **_: object
) -> Iterator[int]:
    """A hot set: rank ``r`` is drawn with probability about ``r ** -s`` (``zipf_s``).

    Ranks come from the inverse CDF of the continuous power law on ``[1, units+1)``
    (O(1) per fault, no table), then pass through an affine permutation of the
    granules so the hot pages are scattered over memory, not packed at offset 0.
    """
    if zipf_s <= 0:
        raise ValueError(f"zipf exponent must be positive, not {zipf_s}")
    a = _coprime_multiplier(rng, units)
    b = rng.randrange(units)
    rand = rng.random
    n1 = units + 1.0
    if abs(zipf_s - 1.0) < 1e-9:
        log_n = math.log(n1)

        def rank() -> int:
            return int(math.exp(rand() * log_n))
    else:
        e = 1.0 - zipf_s
        top = n1**e - 1.0
        inv = 1.0 / e

        def rank() -> int:
            return int((1.0 + rand() * top) ** inv)

    return (((min(rank(), units) - 1) * a + b) % units for _ in range(count))


def strided(
    rng: random.Random, units: int, count: int, *, stride: int = 16, **_: object
) -> Iterator[int]:
    """Every ``stride``-th granule from a random start, wrapping modulo memory.

    The difference between consecutive offsets is ``stride`` granules modulo the
    memory size (constant), so a stride sharing no factor with the granule count
    visits every granule before repeating.
    """
    if stride < 1:
        raise ValueError(f"stride must be at least 1 granule, not {stride}")
    start = rng.randrange(units)
    return ((start + i * stride) % units for i in range(count))


def phased(
    rng: random.Random,
    units: int,
    count: int,
    *,
    phases: int = 4,
    working_set: int = 0,
    **_: object,
) -> Iterator[int]:
    """``phases`` equal runs of faults; run ``k`` falls uniformly in working set ``k``.

    A working set is a window of ``working_set`` granules (default: an eighth of
    memory).  Windows are distinct slots of memory chosen at random (when memory
    has at least ``phases`` slots), so the working set moves at each phase change.
    """
    if phases < 1:
        raise ValueError(f"need at least one phase, not {phases}")
    width = working_set or max(1, units // 8)
    width = min(width, units)
    slots = units // width
    if slots >= phases:
        bases = [s * width for s in rng.sample(range(slots), phases)]
    else:
        bases = [rng.randrange(units - width + 1) for _ in range(phases)]
    rand = rng.randrange
    return (bases[i * phases // count] + rand(width) for i in range(count))


def bursty_times(rng: random.Random, count: int, rate: float, burst: int, idle_us: float) -> array[int]:
    """Bursts of about ``burst`` faults (``burst/2`` to ``3*burst/2``) separated by idle gaps.

    Inside a burst, gaps are exponential with mean ``1e6/rate`` us, capped at ten
    times the mean; idle gaps are uniform in ``[idle_us/2, 3*idle_us/2]``.  With the
    default idle time far above ten mean gaps, the gap distribution is bimodal.
    """
    mean = 1e6 / rate
    cap = 10 * mean
    t = 0.0
    out = array("Q")
    left = 0
    while len(out) < count:
        if left == 0:
            if out:
                t += rng.uniform(idle_us / 2, 3 * idle_us / 2)
            left = rng.randint(max(1, burst // 2), max(1, 3 * burst // 2))
        else:
            t += min(rng.expovariate(1.0 / mean), cap)
        out.append(int(t))
        left -= 1
    return out


def bursty(rng: random.Random, units: int, count: int, **_: object) -> Iterator[int]:
    """Offsets uniform at random; the bursts are in the timestamps (:func:`bursty_times`)."""
    return uniform(rng, units, count)


KINDS: dict[str, Callable[..., Iterable[int]]] = {
    "sequential": sequential,
    "uniform": uniform,
    "zipf": zipf,
    "strided": strided,
    "phased": phased,
    "bursty": bursty,
}


def generate(
    kind: str,
    *,
    count: int,
    memory_size: int,
    granularity: int = 4096,
    rate: float = 10_000.0,
    seed: int = 0,
    stride: int = 16,
    phases: int = 4,
    working_set: int = 0,
    zipf_s: float = 1.1,
    burst: int = 64,
    idle_us: float = 20_000.0,
    layout: Layout | None = None,
) -> Trace:
    """Make a trace of ``count`` faults of ``kind`` (a key of :data:`KINDS`).

    Sizes are in bytes: ``working_set`` is rounded down to whole granules (0 picks
    the kind's default) and ``stride`` is in granules.  ``ValueError`` for a bad
    parameter, with a message fit for the command line.

    With ``layout``, ``memory_size`` is ignored: the kind runs over the layout's
    data bytes and the result goes through :func:`onto_layout`.
    """
    if layout is not None:
        flat = generate(
            kind,
            count=count,
            memory_size=layout.data_bytes,
            granularity=granularity,
            rate=rate,
            seed=seed,
            stride=stride,
            phases=phases,
            working_set=working_set,
            zipf_s=zipf_s,
            burst=burst,
            idle_us=idle_us,
        )
        return onto_layout(flat, layout)
    try:
        make = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown trace kind {kind!r} (one of {', '.join(KINDS)})") from None
    if granularity <= 0 or granularity & (granularity - 1):
        raise ValueError(f"granularity {granularity} is not a power of two")
    units = memory_size // granularity
    if units < 1:
        raise ValueError(
            f"memory size {memory_size} is smaller than one {granularity}-byte granule"
        )
    if count < 0:
        raise ValueError(f"fault count cannot be negative ({count})")
    if not rate > 0:
        raise ValueError(f"rate must be positive, not {rate}")
    rng = random.Random(f"{kind}:{seed}")
    units_iter = make(
        rng,
        units,
        count,
        stride=stride,
        phases=phases,
        working_set=working_set // granularity,
        zipf_s=zipf_s,
    )
    offset = array("Q", (u * granularity for u in units_iter))
    if kind == "bursty":
        if burst < 1:
            raise ValueError(f"burst size must be at least 1, not {burst}")
        t_us = bursty_times(rng, count, rate, burst, idle_us)
    else:
        t_us = _constant_times(count, rate)
    length = array("Q", [granularity]) * count
    return Trace(
        t_us,
        offset,
        length,
        page_size=granularity,
        memory_size=units * granularity,
        source=f"<{kind} seed={seed}>",
    )


def onto_layout(trace: Trace, layout: Layout) -> Trace:
    """Map offsets in ``layout``'s data space onto memory offsets of its data ranges.

    Data-space offset ``d`` is byte ``d`` of the data ranges laid end to end (in
    memory order); it maps to the same byte of its range in memory, so order and
    adjacency within a range are kept and holes are never touched.  A fault that
    would run past the end of its range is cut at the range's end.  The result's
    ``memory_size`` and ``page_size`` are the layout's.  ``ValueError`` if an offset
    is past the layout's data.
    """
    prefix = array("Q")
    total = 0
    shift = layout.shift
    for n in layout.len_pages:
        prefix.append(total)
        total += n << shift
    offset = array("Q")
    length = array("Q")
    for d, n in zip(trace.offset, trace.length, strict=True):
        i = bisect_right(prefix, d) - 1
        into = d - prefix[i]
        if i < 0 or into >= layout.length_at(i):
            raise ValueError(
                f"{trace.source}: offset {d:#x} is past the image's {total} data bytes"
            )
        offset.append(layout.mem_at(i) + into)
        length.append(min(n, layout.length_at(i) - into))
    return Trace(
        array("Q", trace.t_us),
        offset,
        length,
        page_size=layout.page_size,
        memory_size=layout.memory_size,
        source=trace.source,
    )
