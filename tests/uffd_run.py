"""A daemon serving Firecracker's page-fault handler to the VMM emulator, faults then the
fill, shared by the tests of page sources (tests/test_sources.py, tests/test_remote.py).

The VMM runs in a child process (:func:`workloads._vmm.spawn_fill_child`): a page the
handler poisons, or any other fault it answers wrongly, kills that child with SIGBUS as it
would kill a vCPU, and the test fails saying so, with the daemon's log, instead of the
whole test process dying (a pytest-xdist worker that died that way once left the run
hanging)."""

from __future__ import annotations

import signal
import subprocess

import trio

from loader import DaemonOptions, run_daemon
from loader.daemon._options import DaemonState
from workloads._vmm import reap_child, spawn_fill_child


async def _line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    line = await trio.to_thread.run_sync(child.stdout.readline, abandon_on_cancel=True)
    if not line:  # the child is gone: say how it ended
        code = await trio.to_thread.run_sync(child.wait)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        raise AssertionError(f"the VMM child ended early ({how})")
    return line.strip()


async def fault_then_fill(opts: DaemonOptions, size: int, expected: str,
                          faults: list[tuple[int, int, int]]) -> DaemonState:
    """Start the daemon of ``opts`` (with ``uffd_socket``), connect an emulated VMM with one
    region of ``size`` bytes, touch ``faults`` on 2 vCPUs, wait until the guest is filled:
    every touch and then the whole guest equal the image at ``expected``.  Closes the VMM
    and waits for the daemon to end by itself; returns its state."""
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        child = spawn_fill_child(opts.uffd_socket, size, faults, expected, vcpus=2)
        assert child.stdin is not None
        try:
            with trio.fail_after(60):
                assert await _line(child) == "connected"
                touched = await _line(child)
            assert touched == f"touched {len(faults)} 0 0", touched
            with trio.fail_after(30):
                while state.uffd is None:
                    await trio.sleep(0.01)
                await state.uffd.filled.wait()
            child.stdin.write("verify\n")
            child.stdin.flush()
            with trio.fail_after(60):
                assert await _line(child) == "verified 0"
        finally:
            child.stdin.close()  # (its end: the child leaves)
            try:
                await trio.to_thread.run_sync(child.wait, 10)
            finally:
                reap_child(child)
        assert child.returncode == 0, child.returncode
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.01)
    return state
