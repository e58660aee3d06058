"""Failure behaviour of the page-fault handler (docs/UFFD.md), with the VMM emulator.

A page that cannot be read is poisoned (UFFDIO_POISON): the faulting thread gets
SIGBUS.  To observe that safely the emulated VMM runs in a child process
(:func:`workloads._vmm.spawn_child`), which dies with -SIGBUS as a vCPU would.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import trio

import aio.testing
from loader import Client, DaemonOptions, LoaderConfig, UffdConfig, run_daemon
from loader.uffd import _ioctl as _uffd
from workloads import DaemonProcess, make_sample_image
from workloads._vmm import reap_child, spawn_child

MiB = 1 << 20
PAGE = 4096
SIZE = 4 * MiB
GOOD, BAD = 1 * MiB, 3 * MiB  # every page is data (dense image)


_REASON = _uffd.unavailable(_uffd.FEATURE_POISON)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("uffd-fail") / "memory.img")
    make_sample_image(path, SIZE, seed=5, dense=True)
    return path


def options(tmp_path, source, **kw):
    kw.setdefault("handle_signals", False)
    kw.setdefault("ready_line", False)
    kw.setdefault("shutdown_timeout", 0.6)
    return DaemonOptions(source=source, socket_path=str(tmp_path / "s.sock"),
                         uffd_socket=str(tmp_path / "uffd.sock"), **kw)


async def serve_child(opts, image, offsets, *, stop_when=None, stop_once=None):
    """Run the daemon in-process and a VMM child touching ``offsets``; return
    (state, child's return code, its output lines).  ``stop_when``: a line after
    which the daemon is stopped (as by SIGTERM) while the child faults, once
    ``stop_once(state)`` is true (default: a fault waits for the loader).  A child
    that never ends fails the test (its output is read to the end only after it
    exited), rather than hanging it."""
    lines: list[str] = []
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        child = spawn_child(opts.uffd_socket, SIZE, offsets, expected=image)

        def follow() -> int:
            assert child.stdout is not None
            for line in child.stdout:
                lines.append(line.strip())
                if stop_when is not None and line.strip() == stop_when:
                    # the child prints before it touches: stop once the fault is in the daemon
                    ready = stop_once or (lambda s: s.uffd is not None and s.uffd.outstanding)
                    deadline = time.monotonic() + 5
                    while not trio.from_thread.run_sync(ready, state) and time.monotonic() < deadline:
                        time.sleep(0.005)
                    trio.from_thread.run_sync(state.stop)
                    break
            code = child.wait(10)
            lines.extend(line.strip() for line in child.stdout)  # it has exited: the rest, to EOF
            return code

        try:
            with trio.fail_after(15):
                code = await trio.to_thread.run_sync(follow)
        finally:
            reap_child(child)
        with trio.fail_after(10):  # the daemon ends by itself once the VMM has gone
            while nursery.child_tasks:
                await trio.sleep(0.01)
    return state, code, lines


async def test_read_error_poisons_the_page_and_the_vcpu_gets_sigbus(tmp_path, image):
    opts = options(tmp_path, image, config=LoaderConfig(sweep=False),
                   wrap_queue=lambda q: aio.testing.FaultInjectingQueue(q, aio.testing.fail_offsets(BAD, BAD + PAGE)))
    state, code, lines = await serve_child(opts, image, [GOOD, BAD, GOOD + PAGE])
    assert code == -signal.SIGBUS, lines
    assert f"ok {GOOD}" in lines and lines[-1] == f"touching {BAD}"
    u = state.uffd
    assert u.faults_failed == 1 and u.outstanding == 0


async def test_a_poisoned_fault_fails_fault_then_fill_instead_of_killing_the_tests(tmp_path, image):
    """tests/uffd_run.py's VMM runs in a child: a page the handler poisons (a read that
    fails) becomes a failed assertion naming SIGBUS, and this process lives on."""
    from uffd_run import fault_then_fill

    opts = options(tmp_path, image, config=LoaderConfig(sweep=False), uffd_config=UffdConfig(direct=False),
                   wrap_queue=lambda q: aio.testing.FaultInjectingQueue(q, aio.testing.fail_offsets(BAD, BAD + PAGE)))
    with pytest.raises(BaseExceptionGroup) as info:  # from the daemon's nursery
        await fault_then_fill(opts, SIZE, image, [(0, GOOD, PAGE), (0, BAD, PAGE)])
    assert info.group_contains(AssertionError, match="ended early [(]signal SIGBUS[)]", depth=1), info.value


async def test_read_hung_past_the_deadline_is_answered(tmp_path, image):
    """A read that never completes: the fault is still answered (poisoned) once the
    read deadline passes; the faults before it got their data."""
    opts = options(tmp_path, image, config=LoaderConfig(sweep=False, read_timeout=0.3),
                   wrap_queue=lambda q: aio.testing.HangingQueue(q, aio.testing.hang_offsets(BAD, BAD + PAGE)))
    state, code, lines = await serve_child(opts, image, [GOOD, GOOD + 64 * 1024, BAD])
    assert code == -signal.SIGBUS, lines
    assert lines[1:] == [f"touching {GOOD}", f"ok {GOOD}", f"touching {GOOD + 65536}", f"ok {GOOD + 65536}",
                         f"touching {BAD}"]
    u = state.uffd
    assert u.faults_failed == 1 and u.outstanding == 0
    assert u.faults == u.faults_immediate + u.faults_direct + u.faults_waited + u.faults_zero


async def test_stop_lets_a_waiting_fault_finish_with_data(tmp_path, image):
    """Stopped while a fault waits for a slow read: the drain waits for it (within
    half the shutdown deadline), so the guest gets the right bytes, not SIGBUS."""
    # direct copies off: the fault must wait for the (slow) read, as with a checksummed source
    opts = options(tmp_path, image, config=LoaderConfig(sweep=False), shutdown_timeout=2.0,
                   wrap_queue=lambda q: aio.testing.DelayedQueue(q, 0.3), uffd_config=UffdConfig(direct=False))
    state, code, lines = await serve_child(opts, image, [BAD], stop_when=f"touching {BAD}")
    assert code == 0, lines
    assert lines[-1] == f"ok {BAD}"
    assert state.uffd.faults_failed == 0 and state.uffd.faults_waited == 1


def test_sigterm_drains_faults_then_exits_0(tmp_path, image):
    """A real daemon: SIGTERM while a vCPU waits on a read that hangs (test hook).
    The fault is answered (poisoned: SIGBUS in the child) and the daemon exits 0."""
    uffd_sock = str(tmp_path / "uffd.sock")
    env_key = "PAGELOAD_TEST_HANG_READS"
    old = os.environ.get(env_key)
    os.environ[env_key] = f"{BAD}:{BAD + PAGE}"
    try:
        daemon = DaemonProcess(image, str(tmp_path / "s.sock"), str(tmp_path / "daemon.log"),
                               ["--background", "--uffd-socket", uffd_sock, "--shutdown-timeout", "0.6"])
        daemon.start()
    finally:
        if old is None:
            del os.environ[env_key]
        else:
            os.environ[env_key] = old
    child = spawn_child(uffd_sock, SIZE, [GOOD, BAD], expected=image)
    try:
        assert child.stdout is not None
        lines = []
        for line in child.stdout:
            lines.append(line.strip())
            if lines[-1] == f"touching {BAD}":
                break
        assert f"ok {GOOD}" in lines
        deadline = time.monotonic() + 5  # the child prints before it touches: wait for the fault
        while time.monotonic() < deadline:
            with Client.connect(daemon.socket_path, timeout=5) as c:
                if c.stats()["uffd"]["faults_outstanding"] >= 1:
                    break
            time.sleep(0.01)
        code = daemon.stop()
        child_code = child.wait(10)
    finally:
        reap_child(child)
        daemon.stop()
    log = (tmp_path / "daemon.log").read_text()
    assert code == 0, log
    assert child_code == -signal.SIGBUS, log
    assert "not loaded at shutdown: poisoned" in log




async def test_poison_works_without_the_vmm_asking_for_the_feature(tmp_path, image):
    """Firecracker v1.12 asks only for UFFD_FEATURE_EVENT_REMOVE: UFFDIO_POISON still
    works on a kernel that has it (checked at collection: 6.6+), so the vCPU gets SIGBUS."""
    opts = options(tmp_path, image, config=LoaderConfig(sweep=False),
                   wrap_queue=lambda q: aio.testing.FaultInjectingQueue(q, aio.testing.fail_offsets(BAD, BAD + PAGE)))
    opts_features = _uffd.FEATURE_EVENT_REMOVE
    lines: list[str] = []
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        child = spawn_child(opts.uffd_socket, SIZE, [GOOD, BAD], expected=image, features=opts_features)
        try:
            def follow() -> int:
                assert child.stdout is not None
                lines.extend(line.strip() for line in child.stdout)
                return child.wait(10)

            with trio.fail_after(15):
                code = await trio.to_thread.run_sync(follow)
                while nursery.child_tasks:  # the daemon ends by itself once the VMM has gone
                    await trio.sleep(0.01)
        finally:
            reap_child(child)
    assert code == -signal.SIGBUS, lines
    assert f"ok {GOOD}" in lines
    assert state.uffd.faults_failed == 1


async def test_without_uffdio_poison_the_handler_stops_and_never_hands_out_wrong_bytes(
        tmp_path, image, monkeypatch, caplog):
    """A kernel before 6.6 has no UFFDIO_POISON (EINVAL): nothing can raise SIGBUS in
    the faulting thread, so after a read error the handler logs it and stops serving
    that VMM (docs/UFFD.md, "Failure behaviour"): the faulting thread stays blocked --
    it never gets wrong bytes -- and the daemon ends once the VMM is gone."""
    def no_poison(self, dst, length):
        raise _uffd.UffdError(22, "UFFDIO_POISON", 0)  # EINVAL: an ioctl this kernel does not know

    monkeypatch.setattr(_uffd.Uffd, "poison", no_poison)
    opts = options(tmp_path, image, config=LoaderConfig(sweep=False),
                   wrap_queue=lambda q: aio.testing.FaultInjectingQueue(q, aio.testing.fail_offsets(BAD, BAD + PAGE)))
    lines: list[str] = []
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        child = spawn_child(opts.uffd_socket, SIZE, [GOOD, BAD], expected=image)
        try:
            def until_stopped() -> None:
                assert child.stdout is not None
                for line in child.stdout:
                    lines.append(line.strip())
                    if line.strip() == f"touching {BAD}":
                        break
                deadline = time.monotonic() + 10
                while not trio.from_thread.run_sync(lambda: state.uffd is not None and state.uffd.gone):
                    assert time.monotonic() < deadline, "the handler did not stop"
                    time.sleep(0.01)
                time.sleep(0.2)  # the child stays blocked on the bad page
                assert child.poll() is None

            with trio.fail_after(15):
                await trio.to_thread.run_sync(until_stopped)
        finally:
            reap_child(child)  # killed as an operator would: the VMM's memory is unusable
        with trio.fail_after(10):  # the daemon ends once the VMM has gone
            while nursery.child_tasks:
                await trio.sleep(0.01)
    assert f"ok {GOOD}" in lines and not any(x.endswith(f" {BAD}") and not x.startswith("touching") for x in lines)
    assert "cannot poison" in caplog.text


async def test_a_source_page_read_that_hangs_is_answered_at_the_read_deadline(tmp_path, image, monkeypatch):
    """A disk thread stuck reading an uncached source page (a hung disk, simulated):
    the fault thread does not wait with it; at the read deadline the fault is answered
    as a failed read (poisoned: SIGBUS in the vCPU), never left hanging."""
    import threading

    from loader.uffd._source import _PageCache

    release = threading.Event()
    populate = _PageCache.populate

    def hanging(self, address, length):
        if threading.current_thread().name == "pageload-uffd-disk":
            release.wait(20)
        populate(self, address, length)

    monkeypatch.setattr(_PageCache, "populate", hanging)
    # nothing is cached, by either check (cachestat where the kernel has it, else mincore)
    monkeypatch.setattr("loader.uffd._source._mincore", lambda address, length, vec: -1)
    monkeypatch.setattr("loader.uffd._source._Cachestat.page", lambda self, offset: False)
    opts = options(tmp_path, image, config=LoaderConfig(sweep=False, read_timeout=0.3),
                   uffd_config=UffdConfig.for_mode("lazy"))
    try:
        state, code, lines = await serve_child(opts, image, [GOOD])
    finally:
        release.set()
    assert code == -signal.SIGBUS, lines
    assert lines[-1] == f"touching {GOOD}"
    u = state.uffd
    assert (u.counts.uncached, u.counts.disk_timeouts, u.faults_failed) == (1, 1, 1)


async def test_stop_while_a_source_page_is_read_poisons_it_after_the_drain(tmp_path, image, monkeypatch):
    """SIGTERM while a disk thread is stuck on a fault's source page: the drain gives
    it the shutdown timeout, then the fault is answered (poisoned, SIGBUS), so the
    daemon exits and the vCPU is not left blocked on a handler that is gone."""
    import threading

    from loader.uffd._source import _PageCache

    release = threading.Event()
    populate = _PageCache.populate

    def hanging(self, address, length):
        if threading.current_thread().name == "pageload-uffd-disk":
            release.wait(3)  # a regression must fail, not hang the suite
        populate(self, address, length)

    monkeypatch.setattr(_PageCache, "populate", hanging)
    # nothing is cached, by either check (cachestat where the kernel has it, else mincore)
    monkeypatch.setattr("loader.uffd._source._mincore", lambda address, length, vec: -1)
    monkeypatch.setattr("loader.uffd._source._Cachestat.page", lambda self, offset: False)
    opts = options(tmp_path, image, config=LoaderConfig(sweep=False),
                   uffd_config=UffdConfig.for_mode("lazy"))  # read deadline: the default 30 s
    try:
        state, code, lines = await serve_child(opts, image, [GOOD], stop_when=f"touching {GOOD}",
                                               stop_once=lambda s: bool(s.uffd and s.uffd.decide.disk.out))
    finally:
        release.set()
    assert code == -signal.SIGBUS, lines
    u = state.uffd
    assert u.counts.uncached == 1 and u.faults_failed == 1 and u.counts.disk_timeouts == 0
