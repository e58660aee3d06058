"""The load generator's report (:func:`workloads.run_loadgen`): the client processes'
columns and counts merged into one :class:`LoadgenReport`, with exact percentiles by
sorting, its ``--json`` document and its one-line summary."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

from ._loadgen_client import SAMPLES_KEPT
from ._percentiles import percentiles


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A waited-for range whose bytes in the memory file differ from the checkpoint's."""

    client: int
    offset: int  #: the fault's offset
    length: int
    first_bad: int  #: memory offset of the first differing byte
    expected: int  #: that byte in the checkpoint
    actual: int  #: that byte in the memory file

    def describe(self) -> str:
        return (
            f"client {self.client}: fault at {self.offset:#x}+{self.length:#x}: byte "
            f"{self.first_bad:#x} is {self.actual:#04x}, the checkpoint has {self.expected:#04x}"
        )


@dataclass(frozen=True, slots=True, eq=False)
class LoadgenReport:
    """What one run measured.  ``as_dict()`` is the ``--json`` document (no raw samples)."""

    clients: int
    closed_loop: bool
    rate: float | None  #: faults/s asked for in total (None: the trace's own timestamps)
    verify: bool
    #: waits the clients answered from the daemon's loaded map, sending nothing
    #: (``loaded_map``; 0 otherwise)
    map_hits: int
    waits: int  #: waits that returned (successfully or not)
    errors: int  #: waits answered with an error
    not_issued: int  #: faults never sent because the client lost its connection
    mismatches: int
    duration_s: float  #: common start to the last worker's end
    immediate: int | None  #: daemon's ``waits_immediate`` delta (every client of it)
    served: int | None  #: daemon's ``waits_served`` delta
    latency_us: dict[str, float]  #: p50, p90, p99, p999, max, mean
    late_us: dict[str, float]  #: open loop: issue time minus scheduled time (p50, p99, max)
    overhead_us_per_wait: float  #: generator time outside the wait round trip and sleeping
    verify_us_per_wait: float  #: of which spent checking bytes
    error_samples: tuple[str, ...]
    mismatch_samples: tuple[Mismatch, ...]
    start_ns: int  #: ``perf_counter_ns`` of the common start
    #: per wait, in no particular order across clients: latency and completion time (ns)
    latencies_ns: array[int] = field(repr=False)
    completed_ns: array[int] = field(repr=False)

    @property
    def waits_per_s(self) -> float:
        return self.waits / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def blocked_s(self) -> float:
        """Sum of the wait latencies: time clients spent blocked."""
        return sum(self.latencies_ns) / 1e9

    @property
    def ok(self) -> bool:
        return not (self.errors or self.mismatches or self.not_issued)

    def as_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "closed_loop": self.closed_loop,
            "rate": self.rate,
            "verify": self.verify,
            "map_hits": self.map_hits,
            "waits": self.waits,
            "errors": self.errors,
            "not_issued": self.not_issued,
            "mismatches": self.mismatches,
            "duration_s": self.duration_s,
            "waits_per_s": self.waits_per_s,
            "immediate": self.immediate,
            "served": self.served,
            "blocked_s": self.blocked_s,
            "latency_us": dict(self.latency_us),
            "late_us": dict(self.late_us),
            "overhead_us_per_wait": self.overhead_us_per_wait,
            "verify_us_per_wait": self.verify_us_per_wait,
            "error_samples": list(self.error_samples),
            "mismatch_samples": [m.describe() for m in self.mismatch_samples],
        }

    def summary(self) -> str:
        lat = self.latency_us
        line = (
            f"{self.waits} waits from {self.clients} clients in {self.duration_s:.2f} s "
            f"({self.waits_per_s:.0f}/s); latency us p50 {lat['p50']:.0f} p90 {lat['p90']:.0f} "
            f"p99 {lat['p99']:.0f} p99.9 {lat['p999']:.0f} max {lat['max']:.0f}; "
        )
        if self.map_hits:
            line += f"{self.map_hits} answered from the loaded map (no request); "
        if self.immediate is not None:
            line += f"{self.immediate} found loaded (daemon count); "
        line += (
            f"generator overhead {self.overhead_us_per_wait:.1f} us/wait "
            f"(verify {self.verify_us_per_wait:.1f}); {self.errors} errors, "
            f"{self.mismatches} mismatches"
        )
        if self.not_issued:
            line += f", {self.not_issued} faults not issued (connection lost)"
        return line


def merge(
    result: dict[str, Any],
    *,
    clients: int,
    closed_loop: bool,
    rate: float | None,
    verify: bool,
    immediate: int | None,
    served: int | None,
) -> LoadgenReport:
    parts = result["parts"]
    start_ns = result["start_ns"]
    latencies = array("Q")
    completed = array("Q")
    late = array("Q")
    errors = not_issued = mismatches = map_hits = 0
    overhead_ns = verify_ns = 0
    error_samples: list[str] = []
    mismatch_samples: list[Mismatch] = []
    end_ns = start_ns
    for k, part in enumerate(parts):
        latencies.extend(part["latencies"])
        completed.extend(part["completed"])
        late.extend(part["late"])
        errors += part["errors"]
        not_issued += part["not_issued"]
        mismatches += part["mismatches"]
        map_hits += part["map_hits"]
        overhead_ns += part["overhead_ns"]
        verify_ns += part["verify_ns"]
        error_samples.extend(part["error_samples"])
        mismatch_samples.extend(Mismatch(k, *m) for m in part["mismatch_samples"])
        end_ns = max(end_ns, part["end_ns"])
    waits = len(latencies)
    late_pct = percentiles(late)
    return LoadgenReport(
        clients=clients,
        closed_loop=closed_loop,
        rate=rate,
        verify=verify,
        map_hits=map_hits,
        waits=waits,
        errors=errors,
        not_issued=not_issued,
        mismatches=mismatches,
        duration_s=(end_ns - start_ns) / 1e9,
        immediate=immediate,
        served=served,
        latency_us=percentiles(latencies),
        late_us={"p50": late_pct["p50"], "p99": late_pct["p99"], "max": late_pct["max"]},
        overhead_us_per_wait=overhead_ns / waits / 1000 if waits else 0.0,
        verify_us_per_wait=verify_ns / waits / 1000 if waits else 0.0,
        error_samples=tuple(error_samples[:SAMPLES_KEPT]),
        mismatch_samples=tuple(mismatch_samples[:SAMPLES_KEPT]),
        start_ns=start_ns,
        latencies_ns=latencies,
        completed_ns=completed,
    )
