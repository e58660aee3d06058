"""pageload as the page-fault handler of a real Firecracker (v1.12.1), end to end:
../shared/firecracker/snapshot-and-restore.sh snapshots a tiny guest that checks 64 MiB
of its own RAM, then restores it with the Uffd backend, pageload listening.

Skipped only for what is checked directly before anything runs: no usable KVM
(/dev/kvm opened and a VM created: ``kvm_unavailable``), a missing tool, or no
Firecracker binary.  Past that, a failed snapshot or restore fails the test: no
output is read for a reason to skip, and the script's exit code is the verdict."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench._firecracker import SHARED, fetch_firecracker, firecracker_binary, firecracker_unavailable
from workloads import DaemonProcess

pytestmark = [
    pytest.mark.skipif(firecracker_unavailable() is not None, reason=str(firecracker_unavailable())),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("curl", "bc")),
                       reason="needs curl and bc (the script drives the API with them)"),
]


@pytest.fixture(scope="session")
def firecracker():
    binary = firecracker_binary()
    if not binary.exists():
        why = fetch_firecracker(binary)
        if why is not None:
            pytest.skip(why)
    return str(binary)


@pytest.fixture(scope="session")
def snapshot(firecracker, tmp_path_factory):
    work = tmp_path_factory.mktemp("fc")
    r = subprocess.run(["bash", str(SHARED / "snapshot-and-restore.sh"), "snapshot", str(work)],
                       env=dict(os.environ, FIRECRACKER=firecracker), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # the restore's verdict compares its first tick with the snapshot's last one.  The pause
    # can cut the guest's last tick line, and Firecracker's own log line written at the pause
    # ("2026-...") then runs on from it: "tick 0000000c" + "2026..." reads as one tick far
    # ahead of the counter.  A cut last tick is taken out of the log, so the verdict compares
    # with the last whole tick before it (never with a number no tick had)
    log = work / "serial-snapshot.log"
    assert _trim_cut_tick(log), f"no whole tick in the snapshot's serial log: {r.stdout}"
    return work


@pytest.mark.parametrize("form", ["raw", "pages"])
def test_real_firecracker_restores_through_pageload(firecracker, snapshot, tmp_path, form):
    source = str(snapshot / "vm.mem")
    if form == "pages":
        subprocess.run([sys.executable, "-m", "cli", "checkpoint", "create", source, str(tmp_path / "ckpt")],
                       check=True, capture_output=True)
        source = str(tmp_path / "ckpt")
    uffd = str(tmp_path / "uffd.sock")
    work = tmp_path / "work"
    shutil.copytree(snapshot, work, ignore=shutil.ignore_patterns("*.sock"))
    with DaemonProcess(source, str(tmp_path / "s.sock"), str(tmp_path / "daemon.log"),
                       ["--background", "--uffd-socket", uffd]) as daemon:
        for attempt in range(2):
            r = subprocess.run(["bash", str(SHARED / "snapshot-and-restore.sh"), "restore", str(work), uffd],
                               env=dict(os.environ, FIRECRACKER=firecracker), capture_output=True, text=True,
                               timeout=120)
            # the script waits for Firecracker's API socket file, which exists a moment before
            # Firecracker listens on it: a refused connect means no restore was tried, so once
            # more (the daemon is still waiting for its VMM)
            if attempt or not _api_refused(r.stdout + r.stderr):
                break
            shutil.rmtree(work)
            shutil.copytree(snapshot, work, ignore=shutil.ignore_patterns("*.sock"))
        # the script's verdict: the counter went on from the snapshot's last tick, some
        # ticks said ok and none BAD
        assert r.returncode == 0, r.stdout + r.stderr + daemon.stderr_tail(20)
        assert " 0 BAD" in r.stdout
        assert daemon.proc is not None
        daemon.proc.wait(10)  # Firecracker has exited: the daemon finishes by itself
        code = daemon.stop()
    log = (tmp_path / "daemon.log").read_text()
    assert code == 0, log
    assert "uffd: the VMM went away" in log and "uffd: " in log


def _api_refused(output: str) -> bool:
    return "curl: (7)" in output and "restore:" not in output


def _trim_cut_tick(log: Path) -> bool:
    """Make the last ``tick`` in the guest's serial log a whole one (8 hex digits, then
    the end of a word: what the script takes as the counter before the snapshot) by
    cutting the log where a cut last tick starts; False if no whole tick is left."""
    import re

    data = log.read_bytes()
    ticks = list(re.finditer(rb"tick [0-9a-f]*", data))
    while ticks and re.fullmatch(rb"tick [0-9a-f]{8}", ticks[-1].group()) is None:
        data = data[:ticks.pop().start()]
    log.write_bytes(data)
    return bool(ticks)
