"""The page-fault handler's settings (:class:`UffdConfig`, ``--uffd-mode``) and
its per-thread counts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UffdConfig:
    fault_around: int = 64 << 10  #: after a fault, also copy loaded bytes in this aligned window
    fill_chunk: int = 256 << 10  #: largest background UFFDIO_COPY (a fault waits at most one)
    #: the direct fill's unit of work: read in (outside the copy lock), its removed and
    #: already installed pages looked up once, then copied ``fill_chunk`` at a time
    fill_span: int = 1 << 20
    fill: bool = True  #: False: copy only on faults (the lazy per-fault handler, for comparison)
    #: True: copy all memory before answering any fault (Firecracker's "fault_all"
    #: example handler, for comparison): faults wait for the whole load
    eager: bool = False
    #: answer a fault on a page not loaded yet by copying straight from the source
    #: file's page cache, when the source has no checksums to verify and its reads are
    #: not test-injected failures (docs/UFFD.md "Faults")
    direct: bool = True
    #: after a direct copy, ask the loader to load this aligned window around the page
    #: soon (0: no hint); not while the fill copies from the source (``direct_fill``)
    hint_around: int = 256 << 10
    #: the fill thread's nice value (Linux: per thread; 0: as the daemon)
    fill_nice: int = 0
    #: hold the loader's sweep while the fill copies from the source (direct fill)
    hold_sweep: bool = True
    #: the interpreter's switch interval while a VMM is served (None: leave it): how
    #: long the fault thread may wait for the GIL after the kernel wakes it
    switch_interval_s: float | None = 0.0005
    #: the fill copies only once no fault has come for this long: while the guest
    #: is faulting its vCPUs and the fault thread get the CPU first (docs/UFFD.md,
    #: "Background fill"; 0: never wait) ...
    fill_quiet_s: float = 0.002
    #: ... but waits at most this long between two copies, so it never stops
    fill_max_wait_s: float = 0.05
    #: how often faults answered by the fault thread are added to the loader's wait
    #: counts and the working-set recorder (a prefetch hint goes at once)
    merge_interval_s: float = 0.005
    #: after a fault, the fault thread keeps reading the userfaultfd without sleeping
    #: for this long before it blocks in poll again: the next fault of a burst is read
    #: at once instead of after the kernel has woken the thread (docs/UFFD.md
    #: "Threads"; 0: never).  As long as ``fill_quiet_s``: the fill waits then anyway
    spin_s: float = 0.002

    @classmethod
    def for_mode(cls, mode: str) -> UffdConfig:
        """``fill`` (ours), ``eager`` (copy everything first) or ``lazy`` (only the
        faulting page, no fill, no hints; run the loader without its sweep for
        Firecracker's "valid" example)."""
        if mode == "fill":
            return cls()
        if mode == "eager":
            # its faults wait for the fill: never yield to them; the example handlers
            # sleep in poll between faults
            return cls(eager=True, fill_quiet_s=0.0, spin_s=0.0)
        if mode == "lazy":
            return cls(fill=False, fault_around=4096, hint_around=0, spin_s=0.0)
        raise ValueError(f"unknown uffd mode {mode!r} (fill, eager or lazy)")


UFFD_MODES = ("fill", "eager", "lazy")
MAX_UFFD_SPIN_US = 10_000  #: the most ``--uffd-spin-us`` may be: a CPU is taken that long after each fault


@dataclass(slots=True)
class _Counters:
    """The fault thread's counts; read (not reset) by :meth:`UffdHandler.statistics`."""

    faults: int = 0
    loaded: int = 0  #: answered from the memory file, already loaded
    direct: int = 0  #: copied straight from the source
    zero: int = 0  #: holes and removed ranges
    failed: int = 0  #: poisoned (or left to the VMM) after a read error
    spurious: int = 0  #: the page was already there: only a wake
    copied_bytes: int = 0
    copies: int = 0
    eexist: int = 0
    eagain: int = 0
    efault: int = 0  #: direct copies whose source page could not be read
    uncached: int = 0  #: faults whose source page a disk thread read into the page cache first
    disk_timeouts: int = 0  #: of those, answered as failed reads at the read deadline
    remove: int = 0
    unmap: int = 0
    remap: int = 0
    fork: int = 0  #: UFFD_EVENT_FORK: the child's userfaultfd closed at once
    blocked_ns: int = 0  #: total time faults waited (each fault counted)
    busy_ns: int = 0  #: the fill thread's time reading ahead and copying (not waiting)
    relooked: int = 0  #: direct fill spans put back after a removal or remap came while they were copied
    around_bytes: int = 0  #: copied around direct faults (``fault_around``), so their neighbours never fault
    spin_reads: int = 0  #: reads of the userfaultfd that found messages while it spun (no wake-up needed)
    #: the last failed fault's error, ``"code: message"`` (the loader's: a store's message for
    #: ``unavailable``); None: none failed
    last_failure: str | None = None
