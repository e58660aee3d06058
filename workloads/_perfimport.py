"""Import ``perf script`` output of page-fault samples as a fault trace.

Record and print with::

    perf record -e page-faults -c 1 -d -- COMMAND      # -d: sample the data address
    perf script -F +addr > faults.txt                  # default fields plus addr

For software events perf prints, per sample, ``comm tid [cpu] sec.usec: period
event: addr sym (dso) ip sym+off (dso)`` (``[cpu]`` only when sampled, ``pid/tid``
with ``-F +pid``, nanoseconds with ``--ns``, call chains on following lines with
``-g``).  The parser takes the fields up to the event name by their shape, keeps
events named ``page-faults``, ``faults``, ``minor-faults`` or ``major-faults``
(with any ``:modifier``) and reads the data address as the first field after the
event name.  Other lines (other events, call-chain lines, ``#`` headers, blank
lines) are skipped.  Without the addr field the first number is the instruction
pointer, not a data address; the parser spots that layout and says to print with
``-F +addr`` rather than import code addresses.

Folding (``docs/TRACES.md``): virtual addresses are sparse (heap near 0x55..., stack
near 0x7ffd...), an image is dense.  Touched pages are grouped into regions (an
approximation of VMAs: a gap of more than ``region_gap`` bytes starts a new region),
regions are laid back to back, page-aligned, from offset 0 (in address order or in
order of first touch), each keeping its internal layout, so two addresses on one
page map to one page and neighbouring pages stay neighbours.  If the folded span
exceeds ``memory_size``, offsets wrap modulo ``memory_size`` (locality survives
except across the wrap point; distinct pages may then share an offset).
"""

from __future__ import annotations

import os
import re
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ._traces import Trace, TraceError

__all__ = [
    "PAGE_FAULT_EVENTS",
    "PerfSamples",
    "parse_perf_script",
    "fold_addresses",
    "import_perf_script",
]

#: event names (before any ``:modifier``) taken as page faults
PAGE_FAULT_EVENTS = frozenset({"page-faults", "faults", "minor-faults", "major-faults"})

# comm (may hold spaces) | pid or pid/tid | optional [cpu] | sec.frac: | optional period | event:
_SAMPLE = re.compile(
    r"^\s*(?P<comm>.*?)\s+(?P<pid>-?\d+)(?:/(?P<tid>-?\d+))?\s+(?:\[(?P<cpu>\d+)\]\s+)?"
    r"(?P<sec>\d+)\.(?P<frac>\d+):\s+(?:(?P<period>\d+)\s+)?(?P<event>\S+):\s+(?P<rest>.*)$"
)
_HEX_FIRST = re.compile(r"^\s*(?P<addr>[0-9a-fA-F]+)(?P<after>.*)$")
# what may follow the data address: the ip right away (no sym/dso fields), or after "(dso)"
_IP_NEXT = re.compile(r"^\s+[0-9a-fA-F]+(\s|$)|\)\s+[0-9a-fA-F]+(\s|$)")
_CALLCHAIN_LINE = re.compile(r"^\s+[0-9a-fA-F]+\s")


@dataclass(slots=True)
class PerfSamples:
    """Page-fault samples in file order: timestamps (ns) and data addresses."""

    t_ns: array[int]
    addr: array[int]
    skipped_events: int  #: samples of other events
    skipped_lines: int  #: lines that are not samples (headers, call chains, blank)


def parse_perf_script(lines: Iterable[str], source: str = "<perf script>") -> PerfSamples:
    """Read page-fault samples from ``perf script`` text.

    ``TraceError`` names ``source:line`` for a page-fault sample without a readable
    data address, and ``source`` alone when no page-fault sample is found.
    """
    t_ns = array("Q")
    addr = array("Q")
    skipped_events = skipped_lines = 0
    pending: tuple[int, int, int] | None = None  # ambiguous sample awaiting a call-chain line
    for lineno, line in enumerate(lines, 1):
        if pending is not None:
            if _CALLCHAIN_LINE.match(line):
                t_ns.append(pending[0])
                addr.append(pending[1])
            else:
                _no_addr(source, pending[2])
            pending = None
        m = _SAMPLE.match(line)
        if m is None or line.lstrip().startswith("#"):
            skipped_lines += 1
            continue
        if m["event"].split(":", 1)[0] not in PAGE_FAULT_EVENTS:
            skipped_events += 1
            continue
        frac = m["frac"]
        if len(frac) > 9:
            raise TraceError(
                f"{source}:{lineno}: timestamp {m['sec']}.{frac} has more than 9 decimals"
            )
        t = int(m["sec"]) * 1_000_000_000 + int(frac.ljust(9, "0"))
        h = _HEX_FIRST.match(m["rest"])
        if h is None:
            raise TraceError(
                f"{source}:{lineno}: no data address after the event name "
                "(record with 'perf record -d' and print with 'perf script -F +addr')"
            )
        value = int(h["addr"], 16)
        if value >= 1 << 64:
            raise TraceError(f"{source}:{lineno}: address {h['addr']} does not fit in 64 bits")
        after = h["after"]
        if after.strip() and not _IP_NEXT.search(after):
            # "hex sym (dso)" then end of line: either addr with a call chain below (-g),
            # or the ip of a sample printed without addr.  The next line decides.
            pending = (t, value, lineno)
            continue
        t_ns.append(t)
        addr.append(value)
    if pending is not None:
        _no_addr(source, pending[2])
    if not len(t_ns):
        raise TraceError(
            f"{source}: no page-fault samples found "
            f"({skipped_events} samples of other events, {skipped_lines} other lines)"
        )
    return PerfSamples(t_ns, addr, skipped_events, skipped_lines)


def _no_addr(source: str, lineno: int) -> None:
    raise TraceError(
        f"{source}:{lineno}: this sample has no data address field, only the instruction pointer "
        "(print with 'perf script -F +addr')"
    )


def fold_addresses(
    addr: array[int],
    *,
    page_size: int = 4096,
    region_gap: int = 1 << 20,
    order: Literal["address", "first-touch"] = "address",
) -> tuple[array[int], int]:
    """Map virtual addresses to page-aligned image offsets, keeping locality.

    Returns ``(offsets, folded_size)``: ``offsets[i]`` is the start of the page that
    holds ``addr[i]`` after folding, and ``folded_size`` the sum of the region spans.
    A region is a maximal run of touched pages whose gaps are at most ``region_gap``
    bytes; it keeps its internal layout (gaps included).  Memory: one entry per
    distinct page touched, plus the output.
    """
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two")
    shift = page_size.bit_length() - 1
    pages = sorted(set(a >> shift for a in addr))
    gap_pages = max(0, region_gap >> shift)
    # regions as [first_page, last_page] in address order
    starts = array("Q")
    ends = array("Q")
    for p in pages:
        if starts and p - ends[-1] - 1 <= gap_pages:
            ends[-1] = p
        else:
            starts.append(p)
            ends.append(p)
    nregions = len(starts)
    if order == "address":
        sequence = list(range(nregions))
    elif order == "first-touch":
        seen: dict[int, None] = {}
        for a in addr:
            seen.setdefault(bisect_right(starts, a >> shift) - 1, None)
            if len(seen) == nregions:
                break
        sequence = list(seen)
    else:
        raise ValueError(f"unknown region order {order!r} (address or first-touch)")
    base = [0] * nregions  # image page number of each region's first page
    next_page = 0
    for r in sequence:
        base[r] = next_page
        next_page += ends[r] - starts[r] + 1
    out = array("Q")
    for a in addr:
        p = a >> shift
        r = bisect_right(starts, p) - 1
        out.append((base[r] + p - starts[r]) << shift)
    return out, next_page << shift


def import_perf_script(
    path: str | os.PathLike[str],
    *,
    memory_size: int | None = None,
    page_size: int = 4096,
    region_gap: int = 1 << 20,
    order: Literal["address", "first-touch"] = "address",
) -> Trace:
    """Read ``perf script`` output at ``path`` and fold it into a :class:`Trace`.

    Faults are page-sized (``page_size``), sorted by time (stable), timed in
    microseconds from the first sample.  ``memory_size`` defaults to the folded
    span; when given and smaller, offsets wrap modulo it (it is rounded down to a
    whole number of pages).  ``OSError`` if the file cannot be read.
    """
    source = os.fspath(path)
    with open(source, encoding="utf-8", errors="replace") as f:
        samples = parse_perf_script(f, source)
    t_ns, addr = samples.t_ns, samples.addr
    if any(t_ns[i] < t_ns[i - 1] for i in range(1, len(t_ns))):
        order_idx = sorted(range(len(t_ns)), key=t_ns.__getitem__)
        t_ns = array("Q", (t_ns[i] for i in order_idx))
        addr = array("Q", (addr[i] for i in order_idx))
    offsets, folded = fold_addresses(addr, page_size=page_size, region_gap=region_gap, order=order)
    if memory_size is None:
        size = folded
    else:
        size = memory_size - memory_size % page_size
        if size <= 0:
            raise TraceError(
                f"{source}: memory size {memory_size} is smaller than one {page_size}-byte page"
            )
        if folded > size:
            offsets = array("Q", (o % size for o in offsets))
    t0 = t_ns[0]
    t_us = array("Q", ((t - t0) // 1000 for t in t_ns))
    length = array("Q", [page_size]) * len(offsets)
    return Trace(t_us, offsets, length, page_size=page_size, memory_size=size, source=source)
