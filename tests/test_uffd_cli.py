"""``pageload loadgen --uffd`` and ``pageload demo --uffd`` end to end (real processes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loader import _uffd
from workloads import DaemonProcess, make_sample_image

MiB = 1 << 20
SIZE = 16 * MiB


_REASON = _uffd.unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=timeout)


def test_loadgen_uffd_replays_a_trace_as_faults(tmp_path):
    image = str(tmp_path / "memory.img")
    make_sample_image(image, SIZE, seed=4)
    trace = tmp_path / "t.txt"
    trace.write_text("# page_size: 4096\n" + "".join(f"{i * 100} {(i * 37 % 4096) * 4096:#x} 8192\n"
                                                     for i in range(300)))
    uffd = str(tmp_path / "uffd.sock")
    with DaemonProcess(image, str(tmp_path / "s.sock"), str(tmp_path / "d.log"),
                       ["--background", "--uffd-socket", uffd]) as daemon:
        r = cli("loadgen", "--uffd", uffd, "--trace", str(trace), "--image", image, "--vcpus", "2",
                "--closed-loop", "--json", str(tmp_path / "r.json"))
        assert r.returncode == 0, r.stderr
        assert daemon.proc is not None and daemon.proc.wait(10) == 0  # the VMM went: it exits by itself
    assert "600 pages touched by 2 vCPUs" in r.stderr and "0 mismatches" in r.stderr
    assert '"faults"' in (tmp_path / "r.json").read_text()


def test_loadgen_needs_one_target(tmp_path):
    trace = tmp_path / "t.txt"
    trace.write_text("0 0 4096\n")
    r = cli("loadgen", "--trace", str(trace))
    assert r.returncode == 2 and "--socket PATH or --uffd PATH" in r.stderr
    r = cli("loadgen", "--uffd", str(tmp_path / "u"), "--trace", str(trace))
    assert r.returncode == 2 and "needs --image" in r.stderr


def test_demo_uffd(tmp_path):
    r = cli("demo", "--uffd", "--size", "16M", "--clients", "2", "--waits", "30", "--workdir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "touches            60 by 2 vCPUs" in r.stdout
    assert "0 wrong touches, 0 wrong MiB" in r.stdout
    assert "daemon exit        0" in r.stdout
