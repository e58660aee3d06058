"""A VMM emulator: behaves towards a page-fault handler exactly like Firecracker.

It maps guest memory (anonymous, or MAP_HUGETLB for 2 MiB pages), creates a
userfaultfd, registers every region MISSING, connects to the handler's socket and
sends Firecracker's handshake: one message, a JSON array of regions
``{base_host_virt_addr, size, offset, page_size, page_size_kib}`` plus the
userfaultfd in SCM_RIGHTS.  Then "vCPU" threads touch guest pages (reading them
with the GIL released, so a thread blocked in a fault stalls only itself),
following a :class:`~workloads.Trace` or a list of offsets, and every page read can
be checked against the image.  :meth:`VmmEmulator.balloon` is MADV_DONTNEED on a
range (a UFFD_EVENT_REMOVE for the handler).  Closing the connection is how the
handler learns the VMM has gone.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loader.uffd import _ioctl as _uffd

from ._traces import Trace

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
MAP_HUGETLB = 0x40000
MAP_NORESERVE = 0x4000
MADV_DONTNEED = 4
HUGE_PAGE = 2 << 20

#: what Firecracker (v1.12, with a balloon) asks of the kernel
DEFAULT_FEATURES = _uffd.FEATURE_EVENT_REMOVE


@dataclass(frozen=True, slots=True)
class GuestRegion:
    offset: int  #: where it starts in the image
    size: int
    page_size: int = mmap.PAGESIZE


@dataclass
class TouchReport:
    """What the vCPUs saw: one latency per touched page (touch to return)."""

    touches: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    #: latencies of the touches that faulted (the page was not present just before)
    fault_latencies_ns: list[int] = field(default_factory=list)
    mismatches: list[int] = field(default_factory=list)  #: image offsets whose bytes were wrong
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def blocked_s(self) -> float:
        return sum(self.latencies_ns) / 1e9


def hugepages_free() -> int:
    try:
        with open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages") as f:
            return int(f.read())
    except OSError:
        return 0


class VmmEmulator:
    """Guest memory + userfaultfd + Firecracker's handshake (see module doc).

    ``expected`` is a raw image of the memory (a path) to verify against; without
    it nothing is checked.
    """

    def __init__(self, regions: Sequence[GuestRegion], expected: str | None = None,
                 features: int = DEFAULT_FEATURES, align: int = 0) -> None:
        """``align``: each region's memory starts at a multiple of it (a power of two;
        0: where mmap puts it), e.g. for a handler told of pages larger than 4 KiB."""
        self.regions = list(regions)
        self._maps: list[tuple[int, int]] = []  # (address, size)
        self.uffd = -1
        self.sock: socket.socket | None = None
        self._expected_fd = os.open(expected, os.O_RDONLY | os.O_CLOEXEC) if expected else -1
        self._expected: mmap.mmap | None = None
        if self._expected_fd >= 0:
            self._expected = mmap.mmap(self._expected_fd, 0, prot=mmap.PROT_READ)
        try:
            for r in self.regions:
                flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
                if r.page_size == HUGE_PAGE:
                    flags |= MAP_HUGETLB
                elif r.page_size != mmap.PAGESIZE:
                    raise ValueError(f"unsupported page size {r.page_size}")
                extra = align if align > mmap.PAGESIZE else 0
                addr = _libc.mmap(None, r.size + extra, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
                if addr in (None, _MAP_FAILED):
                    err = ctypes.get_errno()
                    raise OSError(err, f"mmap {r.size} bytes: {os.strerror(err)}")
                if extra:  # keep the aligned part
                    start = (addr + extra - 1) & ~(extra - 1)
                    if start > addr:
                        _libc.munmap(addr, start - addr)
                    if addr + extra > start:
                        _libc.munmap(start + r.size, addr + extra - start)
                    addr = start
                self._maps.append((addr, r.size))
            self.uffd = _uffd.userfaultfd()
            self.features, _ = _uffd.api(self.uffd, features)
            for (addr, size) in self._maps:
                _uffd.register(self.uffd, addr, size, _uffd.REGISTER_MODE_MISSING)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ handshake
    def handshake_message(self) -> bytes:
        return json.dumps([
            {"base_host_virt_addr": addr, "size": r.size, "offset": r.offset, "page_size": r.page_size,
             "page_size_kib": r.page_size}
            for r, (addr, _) in zip(self.regions, self._maps)
        ]).encode()

    def connect(self, path: str, timeout: float = 10.0) -> None:
        """Connect to the handler at ``path`` (retrying until it listens) and hand over."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        s.sendmsg([self.handshake_message()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(
            memoryview(ctypes.c_int(self.uffd)).cast("B")))])
        self.sock = s

    def disconnect(self) -> None:
        """What Firecracker's exit looks like to the handler: the connection closes."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # ------------------------------------------------------------ guest access
    def address(self, offset: int) -> int:
        """Guest address of image ``offset``; KeyError when no region holds it."""
        for r, (addr, _) in zip(self.regions, self._maps):
            if r.offset <= offset < r.offset + r.size:
                return addr + offset - r.offset
        raise KeyError(offset)

    def _region_page(self, offset: int) -> int:
        for r in self.regions:
            if r.offset <= offset < r.offset + r.size:
                return r.page_size
        raise KeyError(offset)

    def read(self, offset: int, length: int) -> bytes:
        """Read guest memory (faulting as needed, GIL released while blocked)."""
        buf = ctypes.create_string_buffer(length)
        ctypes.memmove(buf, self.address(offset), length)
        return buf.raw

    def balloon(self, offset: int, length: int) -> None:
        """MADV_DONTNEED a range, as a balloon inflating does (UFFD_EVENT_REMOVE)."""
        if _libc.madvise(self.address(offset), length, MADV_DONTNEED) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def _present(self, address: int) -> bool:
        vec = (ctypes.c_ubyte * 1)()
        if _libc.mincore(ctypes.c_void_p(address & ~(mmap.PAGESIZE - 1)), ctypes.c_size_t(mmap.PAGESIZE), vec):
            return True
        return bool(vec[0] & 1)

    def touch(self, offsets: Sequence[tuple[int, int, int]], vcpus: int = 1, paced: bool = False,
              verify: bool = True, classify: bool = False) -> TouchReport:
        """Run ``vcpus`` threads over ``(t_us, offset, length)`` faults (dealt round-robin);
        each touches (reads) every page of each fault once, timing each page.  With
        ``classify``, each page is checked (mincore, untimed) before its touch: the
        touches of pages not present are also in ``fault_latencies_ns``."""
        report = TouchReport()
        lock = threading.Lock()
        start = time.perf_counter()
        expected = self._expected

        def vcpu(mine: Sequence[tuple[int, int, int]]) -> None:
            lat: list[int] = []
            flat: list[int] = []
            bad: list[int] = []
            errs: list[str] = []
            page_buf = ctypes.create_string_buffer(HUGE_PAGE)
            for t_us, off, length in mine:
                if paced:
                    delay = start + t_us / 1e6 - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                try:
                    page = self._region_page(off)
                except KeyError:
                    errs.append(f"offset {off:#x} is in no region")
                    continue
                lo = off & ~(page - 1)
                hi = off + length
                while lo < hi:
                    # copy up to one 4 KiB page at a time: the first byte is the touch
                    n = min(mmap.PAGESIZE, page)
                    address = self.address(lo)
                    missing = classify and not self._present(address)
                    t0 = time.perf_counter_ns()
                    ctypes.memmove(page_buf, address, n)
                    took = time.perf_counter_ns() - t0
                    lat.append(took)
                    if missing:
                        flat.append(took)
                    if verify and expected is not None and page_buf.raw[:n] != expected[lo:lo + n]:
                        bad.append(lo)
                    lo += page
            with lock:
                report.latencies_ns.extend(lat)
                report.fault_latencies_ns.extend(flat)
                report.mismatches.extend(bad)
                report.errors.extend(errs)

        faults = list(offsets)
        threads = [threading.Thread(target=vcpu, args=(faults[i::vcpus],), name=f"vcpu{i}") for i in range(vcpus)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report.touches = len(report.latencies_ns)
        report.elapsed_s = time.perf_counter() - start
        return report

    def replay(self, trace: Trace, vcpus: int = 1, paced: bool = False, verify: bool = True) -> TouchReport:
        return self.touch([(f.t_us, f.offset, f.length) for f in trace], vcpus, paced, verify)

    def verify_all(self, chunk: int = 1 << 20) -> list[int]:
        """Read all guest memory (faulting what is missing); image offsets of wrong chunks."""
        assert self._expected is not None, "no expected image"
        bad = []
        buf = ctypes.create_string_buffer(chunk)
        for r, (addr, _) in zip(self.regions, self._maps):
            for pos in range(0, r.size, chunk):
                n = min(chunk, r.size - pos)
                ctypes.memmove(buf, addr + pos, n)
                if buf.raw[:n] != self._expected[r.offset + pos:r.offset + pos + n]:
                    bad.append(r.offset + pos)
        return bad

    def resident_bytes(self) -> int:
        """Guest bytes present now (mincore): what the handler has installed."""
        total = 0
        for addr, size in self._maps:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            total += sum(1 for v in vec if v & 1) * mmap.PAGESIZE
        return total

    def close(self) -> None:
        self.disconnect()
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1
        for addr, size in self._maps:
            _libc.munmap(addr, size)
        self._maps = []
        if self._expected is not None:
            self._expected.close()
            self._expected = None
        if self._expected_fd >= 0:
            os.close(self._expected_fd)
            self._expected_fd = -1

    def __enter__(self) -> VmmEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ZeroCopyVmm(VmmEmulator):
    """The zero-copy (MINOR fault) variant: guest memory is the daemon's memory file,
    mapped shared through :class:`loader.vmm.ZeroCopyMemory` (one region, image
    ``offset`` to ``offset + size``), its faults served by the daemon at
    ``socket_path`` (the wait socket).  :meth:`touch`, :meth:`replay`,
    :meth:`verify_all` and :meth:`read` work as for :class:`VmmEmulator`;
    :meth:`write` writes guest memory.  :meth:`disconnect` (or :meth:`close`) ends
    the registration."""

    def __init__(self, socket_path: str, expected: str | None = None, *, offset: int = 0,
                 size: int | None = None, timeout: float = 30.0) -> None:
        from loader.vmm import ZeroCopyMemory

        self.regions = []
        self._maps = []
        self.uffd = -1
        self.sock = None
        self._expected_fd = -1
        self._expected = None
        self.memory: ZeroCopyMemory | None = ZeroCopyMemory.open(socket_path, offset=offset, size=size,
                                                                 timeout=timeout)
        self.features = self.memory.features
        self.regions = [GuestRegion(offset, self.memory.size)]
        self._maps = [(self.memory.address, self.memory.size)]
        try:
            if expected:
                self._expected_fd = os.open(expected, os.O_RDONLY | os.O_CLOEXEC)
                self._expected = mmap.mmap(self._expected_fd, 0, prot=mmap.PROT_READ)
        except BaseException:
            self.close()
            raise

    def connect(self, path: str, timeout: float = 10.0) -> None:
        raise TypeError("a ZeroCopyVmm is connected when made")

    def write(self, offset: int, data: bytes) -> None:
        """Write guest memory (faulting as needed, GIL released while blocked)."""
        ctypes.memmove(self.address(offset), data, len(data))

    def disconnect(self) -> None:
        """Unmap guest memory and close the connection (the daemon stops serving it)."""
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self._maps = []

    def close(self) -> None:
        self.disconnect()
        super().close()


def replay_as_faults(uffd_socket: str, trace: Trace, image: str, *, vcpus: int = 2, rate: float | None = None,
                     closed_loop: bool = False, verify: bool = True, zero_copy: bool = False) -> dict[str, Any]:
    """``pageload loadgen --uffd``: replay ``trace`` as real page faults.  An emulated
    VMM with one region covering the image's memory (``image``: a raw image or a
    checkpoint) connects to the handler at ``uffd_socket``; ``vcpus`` threads touch
    each fault's pages (at the trace's timestamps, or ``rate`` faults/s in total, or
    as fast as they can with ``closed_loop``), checking the bytes when ``image`` is a
    raw image.  Returns the report as a dict (latencies in microseconds).

    ``zero_copy``: ``uffd_socket`` is the daemon's wait socket instead, and the VMM is
    a :class:`ZeroCopyVmm` (guest memory mapped from the daemon's memory file)."""
    from loader.checkpoint import open_checkpoint

    from ._percentiles import percentiles

    layout = open_checkpoint(image).layout
    size = (layout.memory_size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
    trace.check_fits(size)
    raw = os.path.isfile(image) and os.path.getsize(image) == layout.memory_size
    faults = [(f.t_us, f.offset, f.length) for f in trace]
    if rate:
        faults = [(int(i * 1e6 / rate), off, length) for i, (_, off, length) in enumerate(faults)]
    expected = image if raw and verify else None
    vmm: VmmEmulator
    if zero_copy:
        vmm = ZeroCopyVmm(uffd_socket, expected=expected)
    else:
        vmm = VmmEmulator([GuestRegion(0, size)], expected=expected)
        try:
            vmm.connect(uffd_socket)
        except BaseException:
            vmm.close()
            raise
    with vmm:
        report = vmm.touch(faults, vcpus=vcpus, paced=not closed_loop, verify=verify, classify=True)
    return {
        "faults_in_trace": len(faults),
        "touches": report.touches,
        "faults": len(report.fault_latencies_ns),
        "fault_us": percentiles(report.fault_latencies_ns),
        "touch_us": percentiles(report.latencies_ns),
        "blocked_s": report.blocked_s,
        "elapsed_s": report.elapsed_s,
        "verified": raw and verify,
        "mismatches": [hex(m) for m in report.mismatches[:20]],
        "mismatch_count": len(report.mismatches),
        "errors": report.errors[:20],
    }


def spawn_child(socket_path: str, size: int, offsets: Sequence[int], expected: str | None = None,
                features: int = DEFAULT_FEATURES | _uffd.FEATURE_POISON) -> subprocess.Popen[str]:
    """An emulated VMM in a child process (one region of ``size`` bytes at image 0)
    that touches ``offsets`` in turn, printing ``touching OFF`` before each and ``ok
    OFF`` (or ``bad OFF``) after.  A poisoned page kills it with SIGBUS, as it
    would kill a vCPU thread: ``returncode == -SIGBUS``.  Used by the failure tests."""
    argv = [sys.executable, "-m", "workloads._vmm", socket_path, str(size), str(features),
            expected or "-", *(str(o) for o in offsets)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1)


def spawn_zero_copy_child(socket_path: str, offsets: Sequence[int], expected: str | None = None
                          ) -> subprocess.Popen[str]:
    """:func:`spawn_child` for zero-copy mode: a :class:`ZeroCopyVmm` on the daemon's
    wait socket ``socket_path`` (all of memory) touching ``offsets`` in turn."""
    argv = [sys.executable, "-m", "workloads._vmm", "--zero-copy", socket_path, expected or "-",
            *(str(o) for o in offsets)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1)


def reap_child(child: subprocess.Popen[str]) -> None:
    """End a VMM child for good: killed if it still runs (as an operator would: its memory
    is unusable), waited for, its pipes closed.  The tests' ``finally``."""
    if child.poll() is None:
        child.kill()
    child.wait()
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            pipe.close()


def spawn_fill_child(socket_path: str, size: int, faults: Sequence[tuple[int, int, int]], expected: str,
                     vcpus: int = 2) -> subprocess.Popen[str]:
    """An emulated VMM in a child process (one region of ``size`` bytes at image 0) that
    touches ``faults`` (``(t_us, offset, length)``, not paced) on ``vcpus`` threads and
    prints ``touched TOUCHES MISMATCHES ERRORS``; then, each time a line ``verify`` comes
    on its stdin, reads all of guest memory and prints ``verified BAD`` (wrong 1 MiB
    chunks); it ends at stdin's end.  A poisoned page or a handler gone wrong kills the
    child with SIGBUS, not the test's process (tests/uffd_run.py)."""
    argv = [sys.executable, "-m", "workloads._vmm", "--fill", socket_path, str(size), expected, str(vcpus),
            *(f"{off}:{length}" for _, off, length in faults)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)


def _fill_child(argv: Sequence[str]) -> int:
    socket_path, size, expected, vcpus, *faults = argv
    vmm = VmmEmulator([GuestRegion(0, int(size))], expected=expected)
    with vmm:
        vmm.connect(socket_path)
        print("connected", flush=True)
        touches = [(0, int(off), int(length)) for off, length in (f.split(":") for f in faults)]
        report = vmm.touch(touches, vcpus=int(vcpus))
        first = " ".join([*(hex(m) for m in report.mismatches[:4]), *report.errors[:4]])
        print(f"touched {report.touches} {len(report.mismatches)} {len(report.errors)} {first}".rstrip(),
              flush=True)
        for line in sys.stdin:
            if line.strip() == "verify":
                bad = vmm.verify_all()
                print(f"verified {len(bad)} {' '.join(hex(b) for b in bad[:4])}".rstrip(), flush=True)
    return 0


def _child_main(argv: Sequence[str]) -> int:
    vmm: VmmEmulator
    if argv[0] == "--fill":
        return _fill_child(argv[1:])
    if argv[0] == "--zero-copy":
        socket_path, expected, *offsets = argv[1:]
        exp = None if expected == "-" else expected
        vmm = ZeroCopyVmm(socket_path, expected=exp)
    else:
        socket_path, size, features, expected, *offsets = argv
        exp = None if expected == "-" else expected
        vmm = VmmEmulator([GuestRegion(0, int(size))], expected=exp, features=int(features))
        vmm.connect(socket_path)
    with vmm:
        print("connected", flush=True)
        for text in offsets:
            off = int(text)
            print(f"touching {off}", flush=True)
            data = vmm.read(off, mmap.PAGESIZE)
            ok = vmm._expected is None or data == vmm._expected[off:off + mmap.PAGESIZE]
            print(f"{'ok' if ok else 'bad'} {off}", flush=True)
    return 0


__all__ = ["GuestRegion", "TouchReport", "VmmEmulator", "ZeroCopyVmm", "hugepages_free", "replay_as_faults",
           "reap_child", "spawn_child", "spawn_fill_child", "spawn_zero_copy_child"]

if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
