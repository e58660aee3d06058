"""Backend detection cannot kill the process: probes run in a child, crashes become one line.

Also: the chosen liburing binding creates its ring on a CPU without AVX-512
(``qemu-x86_64 -cpu Haswell``, where qemu-user is installed).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import aio
import aio._isolated
import aio._probe
from aio import BackendUnavailable

SIGILL_LINE = (
    "liburing's binary crashed with SIGILL while creating a ring (built for CPU features this machine lacks)"
)
SIGSEGV_LINE = (
    "liburing's binary crashed with SIGSEGV while creating a ring (a memory fault in native code: "
    "a bug, or a binary built against another library version)"
)
PROBE_VARIABLE = "PAGELOAD_AIO_PROBE_URING"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# -- probes that only the child process runs (loaded from this file by path) ------------------
def probe_reporting_core_settings(step: Callable[[str, str], None]) -> str | None:
    """Report the child's core-dump settings as its 'reason'."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
    return f"core limit {soft},{hard} dumpable {dumpable}"


def probe_raising(step: Callable[[str, str], None]) -> str | None:
    step("the test probe", "raising on purpose")
    raise ValueError("broken on purpose")


def probe_sleeping(step: Callable[[str, str], None]) -> str | None:
    step("the test probe", "sleeping")
    time.sleep(30)
    return None


def probe_reporting_step_text(step: Callable[[str, str], None]) -> str | None:
    return "two\nlines  squeezed"


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    cache: dict[str, str | None] = {}
    monkeypatch.setattr(aio._isolated, "_cache", cache)
    return cache


# -- a crashing probe makes the backend unavailable, and this process goes on ----------------
@pytest.mark.parametrize(
    ("fake", "line"),
    [("aio.testing:probe_killed_by_sigill", SIGILL_LINE), ("aio.testing:probe_killed_by_sigsegv", SIGSEGV_LINE)],
)
def test_a_probe_killed_by_a_signal_is_one_line(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: dict[str, str | None], fake: str, line: str
) -> None:
    monkeypatch.setenv(PROBE_VARIABLE, fake)
    with pytest.raises(BackendUnavailable) as info:
        aio.check_available("uring")
    assert str(info.value) == line
    assert fresh_cache == {fake: line}


def test_auto_goes_on_to_threads_past_a_crashing_uring(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: dict[str, str | None]
) -> None:
    monkeypatch.setenv(PROBE_VARIABLE, "aio.testing:probe_killed_by_sigill")
    monkeypatch.setenv("PAGELOAD_AIO_ORDER", "uring,threads,sync")
    name, why = aio.pick_auto()
    assert name == "threads"
    assert why == f"first usable in preference order uring > threads > sync (skipped uring: {SIGILL_LINE})"


async def test_open_queue_names_the_backend_in_the_reason(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: dict[str, str | None]
) -> None:
    monkeypatch.setenv(PROBE_VARIABLE, "aio.testing:probe_killed_by_sigill")
    with pytest.raises(BackendUnavailable) as info:
        aio.open_queue("uring", 4)
    assert str(info.value) == "uring: " + SIGILL_LINE


def test_order_variable_with_an_unknown_name_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGELOAD_AIO_ORDER", "threads,nope")
    with pytest.raises(BackendUnavailable, match="PAGELOAD_AIO_ORDER names unknown aio backends nope; known: "):
        aio.pick_auto()


def test_the_probe_runs_once_per_process(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: dict[str, str | None]
) -> None:
    runs: list[str] = []
    real = aio._isolated._run_child

    def counting(spec: str, timeout: float) -> str | None:
        runs.append(spec)
        return real(spec, timeout)

    monkeypatch.setattr(aio._isolated, "_run_child", counting)
    monkeypatch.setenv(PROBE_VARIABLE, "aio.testing:probe_killed_by_sigsegv")
    for _ in range(3):
        with pytest.raises(BackendUnavailable, match="SIGSEGV"):
            aio.check_available("uring")
    assert runs == ["aio.testing:probe_killed_by_sigsegv"]


def test_the_child_can_dump_no_core(fresh_cache: dict[str, str | None]) -> None:
    why = aio._isolated.run_probe(f"{__name__}:probe_reporting_core_settings")
    assert why == "core limit 0,0 dumpable 0"


def test_a_probe_that_raises_gives_its_last_error_line(fresh_cache: dict[str, str | None]) -> None:
    why = aio._isolated.run_probe(f"{__name__}:probe_raising")
    assert why == (f"the probe {__name__}:probe_raising failed (exit status 1) while raising on purpose: "
                   "ValueError: broken on purpose")


def test_a_probe_that_hangs_is_killed(fresh_cache: dict[str, str | None]) -> None:
    started = time.monotonic()
    why = aio._isolated.run_probe(f"{__name__}:probe_sleeping", timeout=0.5)
    assert why == f"the probe {__name__}:probe_sleeping did not finish within 0.5 s and was killed"
    assert time.monotonic() - started < 20


def test_a_reason_is_always_one_line(fresh_cache: dict[str, str | None]) -> None:
    assert aio._isolated.run_probe(f"{__name__}:probe_reporting_step_text") == "two lines squeezed"


def test_a_probe_that_cannot_be_found_says_so(fresh_cache: dict[str, str | None]) -> None:
    assert aio._isolated.run_probe("no_such_module_here:probe") == (
        "probe module 'no_such_module_here' cannot be found as a source file"
    )
    assert aio._isolated.run_probe("nocolon") == "probe 'nocolon' is not of the form module:function"


@pytest.mark.parametrize(
    ("returncode", "stdout", "expected"),
    [
        (-4, "", "the probe process for m:f crashed with SIGILL while starting (built for CPU features"),
        (-9, "step x\tdoing y\n", "x crashed with SIGKILL while doing y (killed from outside"),
        (-15, "step x\tdoing y\n", "x crashed with SIGTERM while doing y"),
        (0, "step x\tdoing y\n", "the probe m:f failed (exit status 0) while doing y: no output"),
    ],
)
def test_interpret(returncode: int, stdout: str, expected: str) -> None:
    why = aio._isolated.interpret("m:f", returncode, stdout, "")
    assert why is not None and why.startswith(expected)


# -- the real command line keeps running (or stops with the line and exit 2) -----------------
@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workloads import make_sample_image

    path = tmp_path_factory.mktemp("iso") / "memory.img"
    make_sample_image(str(path), 8 << 20, seed=3)
    return path


def _cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PAGELOAD_AIO_ORDER", None)
    env.pop(PROBE_VARIABLE, None)
    env.update(extra)
    return env


def test_daemon_with_auto_runs_on_threads_when_uring_crashes(tmp_path: Path, image: Path) -> None:
    sock, memory = str(tmp_path / "s.sock"), tmp_path / "memory"
    env = _cli_env(PAGELOAD_AIO_ORDER="uring,threads,sync", **{PROBE_VARIABLE: "aio.testing:probe_killed_by_sigill"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "restore", str(image), "--socket", sock, "--background",
         "--aio", "auto", "--memory-file", str(memory)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("READY socket=" + sock)
        deadline = time.monotonic() + 60
        while True:
            stats = subprocess.run([sys.executable, "-m", "cli", "stats", "--socket", sock, "--json"],
                                   capture_output=True, text=True, check=True)
            if json.loads(stats.stdout)["done"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert memory.read_bytes() == image.read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"aio backend threads (first usable in preference order uring > threads > sync (skipped uring: " \
           f"{SIGILL_LINE}))" in err
    assert not list(tmp_path.glob("core*"))


def test_daemon_with_aio_uring_stops_with_the_line_and_exit_2(tmp_path: Path, image: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "restore", str(image), "--socket", str(tmp_path / "s.sock"),
         "--aio", "uring", "-q"],
        capture_output=True, text=True, env=_cli_env(**{PROBE_VARIABLE: "aio.testing:probe_killed_by_sigsegv"}),
        cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"pageload: uring: {SIGSEGV_LINE}\n"
    assert not list(tmp_path.glob("core*"))


# -- the binding on a CPU without AVX-512 ---------------------------------------------------------
QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(
    QEMU is None or platform.machine() != "x86_64",
    reason=f"needs qemu-x86_64 on an x86-64 host (apt-get install qemu-user); here: "
           f"qemu-x86_64 {'found' if QEMU else 'not installed'}, machine {platform.machine()}",
)
RING_SNIPPET = """
import errno, liburing
ring = liburing.io_uring()
iov = liburing.iovec([memoryview(bytearray(4096))])
print("ring object created, iovec of", len(iov))
try:
    liburing.io_uring_queue_init(2, ring)
except OSError as exc:
    print("io_uring_queue_init:", errno.errorcode.get(exc.errno, exc.errno))
else:
    print("io_uring_queue_init: ok")
    liburing.io_uring_queue_exit(ring)
"""


def _haswell(*args: str) -> subprocess.CompletedProcess[str]:
    assert QEMU is not None
    return subprocess.run([QEMU, "-cpu", "Haswell", *args], capture_output=True, text=True, timeout=120,
                          env=_cli_env(PYTHONPATH=str(ROOT)))


@needs_qemu
def test_binding_creates_its_ring_on_haswell_without_avx512() -> None:
    """Haswell has AVX2 and no AVX-512.  qemu-user does not pass io_uring through, so
    ``io_uring_queue_init`` fails with ENOSYS: the clean 'unavailable' path, not SIGILL."""
    ring = _haswell(sys.executable, "-c", RING_SNIPPET)
    died = f" ({signal.Signals(-ring.returncode).name})" if ring.returncode < 0 else ""
    assert ring.returncode == 0, f"exit {ring.returncode}{died}: {ring.stderr[-500:]}"
    assert ring.stdout.splitlines() == ["ring object created, iovec of 1", "io_uring_queue_init: ENOSYS"]
    # and the whole probe, as the registry's child runs it
    probe = _haswell(sys.executable, "-c", aio._isolated._CHILD, "aio._probe", aio._probe.__file__, "probe")
    assert probe.returncode == 0, probe.stderr[-500:]
    # (where this host has io_uring switched off, the probe says so before it gets that far)
    switched_off = aio._probe.read_disabled(aio._probe.DISABLED_PATH) == 2
    expected = ("unavailable io_uring is disabled on this host" if switched_off
                else "unavailable the kernel has no io_uring (io_uring_setup: ENOSYS)")
    assert probe.stdout.splitlines()[-1].startswith(expected), probe.stdout[-500:]


@needs_qemu
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc) to build the AVX-512 control")
def test_haswell_in_qemu_really_lacks_avx512(tmp_path: Path) -> None:
    """The control: an AVX-512 instruction dies by SIGILL under ``-cpu Haswell``, so
    the test above would have caught a binding built for AVX-512."""
    source = tmp_path / "avx512.c"
    source.write_text('int main(void) { __asm__ volatile("vpxord %zmm0, %zmm0, %zmm0"); return 0; }\n')
    subprocess.run(["cc", "-O0", "-o", str(tmp_path / "avx512"), str(source)], check=True)
    assert _haswell(str(tmp_path / "avx512")).returncode == -signal.SIGILL


NUMPY_SNIPPET = """
from array import array
from loader import Layout
from loader.checkpoint._raw import _round_merge
n = 1 << 12
layout = Layout.from_arrays(n * 16384, 4096, array('Q', range(0, n * 16384, 16384)), array('Q', [4096]) * n)
layout.validate()
print(layout.data_bytes, layout.prefix()[1] << layout.shift, layout.file_ascends())
print(list(zip(*_round_merge(array('Q', [1, 5000, 9000]), array('Q', [10, 6000, 20000]), 4096, 1 << 20))))
"""


@needs_qemu
def test_the_range_tables_numpy_runs_on_haswell_without_avx512() -> None:
    """NumPy checks and merges range tables of millions of ranges: its wheel picks its
    CPU features at run time, so it must run where AVX-512 is missing (it needs
    x86-64-v2, SSE4.2, as Nehalem has)."""
    run = _haswell(sys.executable, "-c", NUMPY_SNIPPET)
    died = f" ({signal.Signals(-run.returncode).name})" if run.returncode < 0 else ""
    assert run.returncode == 0, f"exit {run.returncode}{died}: {run.stderr[-500:]}"
    assert run.stdout.splitlines() == [f"{(1 << 12) * 4096} 4096 True", "[(0, 20480)]"]
