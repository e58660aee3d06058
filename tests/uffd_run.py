"""A daemon serving Firecracker's page-fault handler to the VMM emulator, faults then the
fill, shared by the tests of page sources (tests/test_sources.py, tests/test_remote.py)."""

from __future__ import annotations

import trio

from loader import DaemonOptions, run_daemon
from loader.daemon._options import DaemonState
from workloads._vmm import GuestRegion, VmmEmulator


async def fault_then_fill(opts: DaemonOptions, size: int, expected: str,
                          faults: list[tuple[int, int, int]]) -> DaemonState:
    """Start the daemon of ``opts`` (with ``uffd_socket``), connect an emulated VMM with one
    region of ``size`` bytes, touch ``faults`` on 2 vCPUs, wait until the guest is filled:
    every touch and then the whole guest equal the image at ``expected``.  Closes the VMM
    and waits for the daemon to end by itself; returns its state."""
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        vmm = VmmEmulator([GuestRegion(0, size)], expected=expected)
        try:
            await trio.to_thread.run_sync(vmm.connect, opts.uffd_socket)
            report = await trio.to_thread.run_sync(lambda: vmm.touch(faults, vcpus=2))
            assert report.touches == len(faults) and not report.mismatches and not report.errors
            with trio.fail_after(30):
                while state.uffd is None:
                    await trio.sleep(0.01)
                await state.uffd.filled.wait()
            assert await trio.to_thread.run_sync(vmm.verify_all) == []
        finally:
            vmm.close()
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.01)
    return state
