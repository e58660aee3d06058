"""The Firecracker page-fault handler mode, driven by the VMM emulator (workloads)."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import trio

import aio.testing
from loader import DaemonOptions, LoaderConfig, UffdConfig, run_daemon
from loader.checkpoint import create_checkpoint
from loader.uffd import _ioctl as _uffd
from workloads import make_sample_image
from workloads._vmm import HUGE_PAGE, GuestRegion, VmmEmulator, hugepages_free

KiB = 1 << 10
MiB = 1 << 20
PAGE = 4096
SIZE = 16 * MiB

_REASON = _uffd.unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("uffd-images")
    raw = str(d / "memory.img")
    make_sample_image(raw, SIZE, seed=11)
    ckpt = str(d / "ckpt")
    create_checkpoint(raw, ckpt)
    return {"raw": raw, "pages": ckpt}


def options(tmp_path, source, **kw):
    kw.setdefault("handle_signals", False)
    kw.setdefault("ready_line", False)
    return DaemonOptions(source=source, socket_path=str(tmp_path / "s.sock"),
                         uffd_socket=str(tmp_path / "uffd.sock"), **kw)


def slowed(delay):
    return lambda q: aio.testing.DelayedQueue(q, delay)


async def run_vmm(tmp_path, opts, regions, expected, body, features=None, started=None):
    """Start the daemon, run ``body(vmm)`` in a thread, disconnect; return (state, result).
    ``started(state)`` is called once the daemon serves."""
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        if started is not None:
            started(state)
        kw = {} if features is None else {"features": features}
        vmm = VmmEmulator(regions, expected=expected, **kw)
        try:
            await trio.to_thread.run_sync(vmm.connect, opts.uffd_socket)
            result = await trio.to_thread.run_sync(body, vmm)
        finally:
            vmm.close()
        with trio.fail_after(10):  # the daemon ends by itself once the VMM has gone
            while nursery.child_tasks:
                await trio.sleep(0.01)
    return state, result


async def run_filled(opts, regions, expected, body, created=None):
    """Start the daemon, connect an emulated VMM, wait until the guest is filled,
    then ``await body(state, vmm)``; close the VMM and wait for the daemon to end by
    itself.  Returns (state, what body returned).  ``created(vmm)`` is called before
    the VMM connects."""
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        vmm = VmmEmulator(regions, expected=expected)
        if created is not None:
            created(vmm)
        try:
            await trio.to_thread.run_sync(vmm.connect, opts.uffd_socket)
            with trio.fail_after(20):
                while state.uffd is None:
                    await trio.sleep(0.01)
                await state.uffd.filled.wait()
            result = await body(state, vmm)
        finally:
            vmm.close()
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.01)
    return state, result


@pytest.mark.parametrize("kind", ["raw", "pages"])
async def test_faults_and_fill_give_the_image(tmp_path, images, kind):
    opts = options(tmp_path, images[kind], wrap_queue=slowed(0.002))
    rng = random.Random(1)
    faults = [(0, rng.randrange(SIZE // PAGE) * PAGE, PAGE) for _ in range(200)]

    def body(vmm):
        report = vmm.touch(faults, vcpus=4)
        assert report.touches == 200 and not report.mismatches and not report.errors
        assert vmm.verify_all() == []
        return report

    state, report = await run_vmm(tmp_path, opts, [GuestRegion(0, SIZE)], images["raw"], body)
    u = state.uffd
    assert u is not None and u.faults >= 1
    s = state.loader.statistics()
    assert s.waits_total >= u.faults_immediate + u.faults_waited


@pytest.mark.parametrize("spin_us", [0, 5000])
async def test_the_fault_thread_reads_the_next_fault_of_a_burst_while_it_spins(tmp_path, images, spin_us):
    """After a fault the fault thread keeps reading the userfaultfd for ``spin_s``
    (2 ms in fill mode): the faults of a burst are read without a wake-up, and are
    answered the same.  With 0 it sleeps in poll after every fault.  (Lazy mode, so
    that no fill puts the pages in first: every touch faults.)"""
    import dataclasses

    assert UffdConfig.for_mode("fill").spin_s > 0 and UffdConfig.for_mode("lazy").spin_s == 0
    cfg = dataclasses.replace(UffdConfig.for_mode("lazy"), spin_s=spin_us / 1e6)
    opts = options(tmp_path, images["raw"], uffd_config=cfg)
    offsets = [(0, o, PAGE) for o in range(0, SIZE, 256 * 1024)]  # one vCPU, back to back

    def body(vmm):
        report = vmm.touch(offsets, vcpus=1)
        assert not report.mismatches and not report.errors
        return vmm.verify_all()

    state, bad = await run_vmm(tmp_path, opts, [GuestRegion(0, SIZE)], images["raw"], body)
    assert bad == []
    s = state.uffd.statistics()
    assert s["faults"] >= len(offsets)  # (and verify_all faults on the rest)
    if spin_us:  # each fault after the first comes well within 5 ms of the one before
        assert s["spin_reads"] >= len(offsets) // 2
    else:
        assert s["spin_reads"] == 0


def test_cachestat_says_what_mincore_says(tmp_path):
    """The fault thread's page-cache check (cachestat where the kernel has it) agrees
    with mincore on a page dropped from the cache and read back."""
    import ctypes
    import mmap

    from loader.uffd._source import _Cachestat, _PageCache

    path = tmp_path / "f"
    path.write_bytes(os.urandom(16 * PAGE))
    fd = os.open(path, os.O_RDONLY)
    try:
        c = _Cachestat.open(fd)
        if c is None:
            pytest.skip("cachestat(2) is not available here (Linux 6.5+, not blocked by seccomp)")
        m = mmap.mmap(fd, 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        cache = _PageCache()
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cache.cached(base + 5 * PAGE, PAGE):
            pytest.skip(f"{tmp_path} keeps its pages cached (tmpfs?): nothing to drop")
        assert not c.page(5 * PAGE)
        os.pread(fd, PAGE, 5 * PAGE)
        assert c.page(5 * PAGE) and cache.cached(base + 5 * PAGE, PAGE)
        assert not c.page(6 * PAGE) or cache.cached(base + 6 * PAGE, PAGE)
        assert not c.page(64 * PAGE)  # past the end: nothing cached
    finally:
        os.close(fd)


async def test_the_direct_fill_copies_the_working_set_first(tmp_path, monkeypatch):
    """With a working set replayed (``--working-set``), the fill from the source
    copies its spans first, in first-touch order and without yielding to faults, then
    the rest in memory order; the guest ends up holding the image either way."""
    import threading
    from array import array

    from loader import WorkingSet, checkpoint_identity, write_working_set
    from loader.checkpoint import open_checkpoint
    from loader.uffd._fill import Fill

    raw = str(tmp_path / "memory.img")
    make_sample_image(raw, SIZE, seed=8, dense=True)
    ws = str(tmp_path / "ws.msgpack")
    first = [(12 * MiB, MiB), (4 * MiB, 256 * 1024)]  # in first-touch order, far apart
    write_working_set(ws, WorkingSet(checkpoint_identity(open_checkpoint(raw)), array("Q", [o for o, _ in first]),
                                     array("Q", [n for _, n in first]), array("Q", [0, 1])))
    copied: list[int] = []  # the fill thread's copies, as memory offsets, in order
    copy = Fill._copy

    def recorded(self, r, va, src, length):
        if threading.current_thread().name == "pageload-uffd-fill":
            copied.append(r.offset + (va - r.base))
        return copy(self, r, va, src, length)

    monkeypatch.setattr(Fill, "_copy", recorded)
    waited_at: list[int] = []  # the queue's head each time the fill would wait for faults to pause
    wait = Fill._yield_to_faults

    def waiting(self):
        waited_at.append(self.shared.fill_queue[0][0])
        return wait(self)

    monkeypatch.setattr(Fill, "_yield_to_faults", waiting)
    opts = options(tmp_path, raw, working_set=ws)

    async def body(state, vmm):
        assert state.uffd.fill.from_source
        return await trio.to_thread.run_sync(vmm.verify_all)

    _, bad = await run_filled(opts, [GuestRegion(0, SIZE)], raw, body)
    assert bad == []
    in_first = [next((k for k, (o, n) in enumerate(first) if o <= at < o + n), None) for at in copied]
    n_first = sum(1 for k in in_first if k is not None)
    assert n_first >= 2
    assert in_first[:n_first] == sorted(in_first[:n_first])  # the spans first, in first-touch order
    assert None not in in_first[:n_first] and 0 in in_first and 1 in in_first
    rest = copied[n_first:]
    assert rest and rest == sorted(rest) and rest[0] == 0  # then the rest, from the start, in memory order
    # the spans are copied without waiting for the guest's faults to pause; the rest waits
    assert waited_at and not any(o <= at < o + n for at in waited_at for o, n in first)


async def test_background_fill_ends_faults(tmp_path, images):
    """After the load, the fill has put every data page in: touching all causes no fault."""
    opts = options(tmp_path, images["raw"])

    async def body(state, vmm):
        u = state.uffd
        data_faults = u.faults - u.faults_zero
        bad = await trio.to_thread.run_sync(vmm.verify_all)
        assert bad == []
        assert u.faults - u.faults_zero == data_faults  # no data page faulted any more
        assert u.faults_zero > 0  # holes are never copied: they fault once, as zero pages
        # the raw image was filled straight from the source, with the loader's sweep
        # held meanwhile; the sweep goes on afterwards and loads the memory file
        assert u.fill.from_source
        await state.loader.done.wait()
        assert not state.loader.sweep_held
        # while a VMM's faults are served the server never busy-polls (the fault thread needs the GIL)
        assert state.server.busy_poll_paused == 1 and not state.server.may_busy_poll(state.server.asking)
        s = u.statistics()
        assert s["copied_bytes"] >= state.loader.layout.data_bytes  # both threads' copies, merged
        assert s["copies"] == u.counts.copies + u.fill_counts.copies > u.counts.copies

    await run_filled(opts, [GuestRegion(0, SIZE)], images["raw"], body)


async def test_several_regions(tmp_path, images):
    """Two regions, out of order in the address space, mapping two parts of the image."""
    opts = options(tmp_path, images["pages"], wrap_queue=slowed(0.001))
    regions = [GuestRegion(8 * MiB, 8 * MiB), GuestRegion(0, 4 * MiB)]

    def body(vmm):
        report = vmm.touch([(0, o, PAGE) for o in range(0, 4 * MiB, 64 * 1024)]
                           + [(0, o, PAGE) for o in range(8 * MiB, 16 * MiB, 96 * 1024)], vcpus=3)
        assert not report.mismatches and not report.errors
        return vmm.verify_all()

    state, bad = await run_vmm(tmp_path, opts, regions, images["raw"], body)
    assert bad == []
    assert state.uffd.statistics()["regions"] == 2


@pytest.mark.skipif(hugepages_free() < 4, reason="needs 4 free 2 MiB huge pages (vm.nr_hugepages)")
async def test_huge_pages(tmp_path, images):
    opts = options(tmp_path, images["raw"], wrap_queue=slowed(0.001))

    def body(vmm):
        report = vmm.touch([(0, o, PAGE) for o in (0, 3 * MiB + 5 * PAGE, 6 * MiB)], vcpus=2)
        assert not report.mismatches and not report.errors
        return vmm.verify_all()

    state, bad = await run_vmm(tmp_path, opts, [GuestRegion(0, 8 * MiB, HUGE_PAGE)], images["raw"], body)
    assert bad == []


@pytest.mark.skipif(hugepages_free() < 4, reason="needs 4 free 2 MiB huge pages (vm.nr_hugepages)")
@pytest.mark.parametrize("direct", [True, False])
async def test_huge_pages_are_filled_whole(tmp_path, images, direct):
    """The fill copies whole 2 MiB pages (from the source, or after the loader): the
    guest is filled and then holds the image."""
    opts = options(tmp_path, images["raw"], uffd_config=UffdConfig(direct=direct))

    async def body(state, vmm):
        assert state.uffd.fill.from_source == direct
        return await trio.to_thread.run_sync(vmm.verify_all)

    state, bad = await run_filled(opts, [GuestRegion(0, 8 * MiB, HUGE_PAGE)], images["raw"], body)
    assert bad == []
    assert state.uffd.faults == state.uffd.faults_zero  # only huge pages without data fault (zero)


async def test_balloon_remove_gives_zero_pages_and_is_never_refilled(tmp_path, images):
    opts = options(tmp_path, images["raw"], config=LoaderConfig(sweep=False))
    lo, length = 2 * MiB, 1 * MiB

    def body(vmm):
        assert vmm.read(lo, PAGE) != bytes(PAGE) or True
        vmm.balloon(lo, length)  # blocks until the handler has read the REMOVE event
        return vmm.read(lo, length), vmm.read(lo + length, PAGE)

    state, (removed, after) = await run_vmm(tmp_path, opts, [GuestRegion(0, SIZE)], images["raw"], body)
    assert removed == bytes(length)
    with open(images["raw"], "rb") as f:
        f.seek(lo + length)
        assert after == f.read(PAGE)
    assert state.uffd.counts.remove == 1 and state.uffd.guest.removed.total == length


def _image_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


async def test_fault_paths_loaded_hole_direct(tmp_path, images):
    """Raw image, lazy mode (no fill, so a loaded page still faults), no sweep: a loaded
    page is copied from the memory file, a hole gets a zero page, a page not loaded
    yet is copied straight from the source; none of them waits for the loader, and
    the loader counts the data faults as immediate waits."""
    opts = options(tmp_path, images["raw"], config=LoaderConfig(sweep=False), uffd_config=UffdConfig.for_mode("lazy"))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        layout = state.loader.layout
        data = [r.mem_offset for r in layout if r.length >= 2 * PAGE]
        loaded, direct = data[0], data[-1] + PAGE
        hole = next(o for o in range(0, SIZE, PAGE) if layout.find(o) < 0)
        await state.loader.wait_loaded(loaded, PAGE)
        before = state.loader.statistics()
        vmm = VmmEmulator([GuestRegion(0, SIZE)], expected=images["raw"])
        try:
            await trio.to_thread.run_sync(vmm.connect, opts.uffd_socket)
            got = [await trio.to_thread.run_sync(vmm.read, o, PAGE) for o in (loaded, hole, direct)]
        finally:
            vmm.close()
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.01)
    assert got == [_image_bytes(images["raw"], loaded, PAGE), bytes(PAGE), _image_bytes(images["raw"], direct, PAGE)]
    u = state.uffd
    assert (u.faults, u.faults_immediate, u.faults_zero, u.faults_direct, u.faults_waited) == (3, 1, 1, 1, 0)
    after = state.loader.statistics()
    assert after.waits_immediate - before.waits_immediate == 2
    s = u.statistics()
    assert s["direct"] == "on" and s["faults_direct"] == 1 and s["fault_latency_us"]["count"] == 3


async def test_faults_answered_by_the_thread_reach_the_loader_counts_soon(tmp_path, images):
    """Faults the fault thread answers itself are added to the loader's wait counts by a
    merge ``merge_interval_s`` after the first of them (no trio wake-up per fault),
    while the VMM is still connected and without anyone reading statistics."""
    opts = options(tmp_path, images["raw"], config=LoaderConfig(sweep=False),
                   uffd_config=UffdConfig(fill=False, fault_around=PAGE, hint_around=0, merge_interval_s=0.05))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        layout = state.loader.layout
        pages = [r.mem_offset for r in layout][:3]
        before = state.loader.counters.waits_immediate
        vmm = VmmEmulator([GuestRegion(0, SIZE)], expected=images["raw"])
        try:
            await trio.to_thread.run_sync(vmm.connect, opts.uffd_socket)
            for o in pages:
                await trio.to_thread.run_sync(vmm.read, o, PAGE)
            with trio.fail_after(5):
                while state.loader.counters.waits_immediate - before < len(pages):
                    await trio.sleep(0.01)
            assert state.uffd.faults_direct == len(pages)
        finally:
            vmm.close()
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.01)


async def test_a_fault_answered_as_the_vmm_goes_is_still_counted(tmp_path, images, monkeypatch):
    """The fault thread does a fault's bookkeeping after the copy that wakes the vCPU;
    a VMM that leaves right then must not take that fault out of the loader's counts
    (the last merge runs after the fault thread has stopped)."""
    import time

    from loader.uffd._faults import Decisions

    done = Decisions._direct_done

    def slow(self, off, page, start_ns):
        time.sleep(0.2)  # the VMM has its page and closes meanwhile
        done(self, off, page, start_ns)

    monkeypatch.setattr(Decisions, "_direct_done", slow)
    opts = options(tmp_path, images["raw"], config=LoaderConfig(sweep=False), uffd_config=UffdConfig.for_mode("lazy"))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        page = next(r.mem_offset for r in state.loader.layout)
        before = state.loader.counters.waits_immediate
        vmm = VmmEmulator([GuestRegion(0, SIZE)], expected=images["raw"])
        try:
            await trio.to_thread.run_sync(vmm.connect, opts.uffd_socket)
            await trio.to_thread.run_sync(vmm.read, page, PAGE)
        finally:
            vmm.close()
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.01)
    assert state.uffd.faults_direct == 1
    assert state.loader.counters.waits_immediate - before == 1


async def test_a_direct_fault_copies_its_window_so_the_neighbours_never_fault(tmp_path):
    """After a fault copied straight from the source, the rest of its aligned 64 KiB
    window (``fault_around``) is copied from the source too: touching a neighbour
    then does not fault, and it reads the image's bytes."""
    raw = str(tmp_path / "memory.img")
    make_sample_image(raw, 4 * MiB, seed=8, dense=True)
    opts = options(tmp_path, raw, config=LoaderConfig(sweep=False), uffd_config=UffdConfig(fill=False))
    page = 1 * MiB + 5 * PAGE
    neighbours = [1 * MiB, 1 * MiB + 15 * PAGE]  # the first and last page of its window

    def body(vmm):
        import time

        first = vmm.read(page, PAGE)  # woken by the page's own copy; the window follows
        deadline = time.monotonic() + 5
        while state_box[0].uffd.counts.around_bytes < 15 * PAGE and time.monotonic() < deadline:
            time.sleep(0.005)
        present = [vmm._present(vmm.address(o)) for o in neighbours]
        return first, present, [vmm.read(o, PAGE) for o in neighbours]

    state_box = []
    state, (first, present, got) = await run_vmm(tmp_path, opts, [GuestRegion(0, 4 * MiB)], raw, body,
                                                 started=state_box.append)
    assert first == _image_bytes(raw, page, PAGE)
    assert present == [True, True]  # in before they were touched
    assert got == [_image_bytes(raw, o, PAGE) for o in neighbours]
    u = state.uffd
    assert u.faults == 1 and u.statistics()["fault_around_bytes"] == 15 * PAGE


async def test_checksummed_pages_wait_for_the_loader(tmp_path, images):
    """A pages checkpoint is verified while loading: a fault on a page not loaded yet
    goes to the loader (never a direct copy of unverified bytes), which reads and
    verifies its chunk first (at once in the wait's task when the page cache has it,
    or blocked until its read lands)."""
    opts = options(tmp_path, images["pages"], config=LoaderConfig(sweep=False),
                   uffd_config=UffdConfig.for_mode("lazy"))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        offset = next(r.mem_offset for r in state.loader.layout)
        vmm = VmmEmulator([GuestRegion(0, SIZE)], expected=images["raw"])
        try:
            await trio.to_thread.run_sync(vmm.connect, opts.uffd_socket)
            got = await trio.to_thread.run_sync(vmm.read, offset, PAGE)
        finally:
            vmm.close()
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.01)
    assert got == _image_bytes(images["raw"], offset, PAGE)
    u = state.uffd
    assert u.faults_direct == 0 and u.faults_waited in (0, 1)
    s = state.loader.statistics()
    assert s.waits_served == 1 and s.chunks_verified == 1 and s.loaded_bytes == s.chunks_verified * 16 * KiB
    assert u.statistics()["direct"].startswith("off (checksums")


async def test_direct_copy_that_fails_falls_back_to_the_loader(tmp_path, monkeypatch):
    """The source shrinks under the handler just after it mapped it: the direct copy of
    a page past the new end fails (EFAULT), and the fault takes the loader's path,
    whose read fails too: the page is poisoned (SIGBUS in the VMM child), never
    answered with wrong bytes."""
    from loader.uffd._handler import UffdHandler
    from workloads._vmm import reap_child, spawn_child

    raw = str(tmp_path / "memory.img")
    make_sample_image(raw, 4 * MiB, seed=3, dense=True)
    opts = options(tmp_path, raw, config=LoaderConfig(sweep=False), uffd_config=UffdConfig.for_mode("lazy"))
    mapped = UffdHandler._open_direct

    def then_shrink(self):
        why = mapped(self)
        os.truncate(raw, 2 * MiB)
        return why

    monkeypatch.setattr(UffdHandler, "_open_direct", then_shrink)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        child = spawn_child(opts.uffd_socket, 4 * MiB, [3 * MiB])
        try:
            code = await trio.to_thread.run_sync(child.wait, 15)
        finally:
            reap_child(child)
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.01)
    u = state.uffd
    assert code == -signal.SIGBUS
    assert u.counts.efault >= 1 and u.faults_direct == 0 and u.faults_failed == 1


async def test_a_fault_on_an_uncached_source_page_is_read_in_by_a_disk_thread(tmp_path):
    """The fault thread never reads the disk itself: a fault whose source page is not
    in the page cache goes to a disk thread, which reads it in, and comes back to be
    copied; a cached page is copied at once."""
    raw = str(tmp_path / "memory.img")
    make_sample_image(raw, 4 * MiB, seed=5, dense=True)
    opts = options(tmp_path, raw, config=LoaderConfig(sweep=False), uffd_config=UffdConfig.for_mode("lazy"))
    cold, warm = 1 * MiB, 3 * MiB

    def body(vmm):
        fd = os.open(raw, os.O_RDONLY)
        try:
            os.fsync(fd)  # written just now: only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.pread(fd, PAGE, warm)  # and this one read back in
        finally:
            os.close(fd)
        return vmm.read(cold, PAGE), vmm.read(warm, PAGE)

    state, got = await run_vmm(tmp_path, opts, [GuestRegion(0, 4 * MiB)], raw, body)
    assert got == (_image_bytes(raw, cold, PAGE), _image_bytes(raw, warm, PAGE))
    u = state.uffd
    assert (u.faults_direct, u.counts.uncached, u.faults_waited) == (2, 1, 0)
    assert u.statistics()["faults_uncached"] == 1


async def test_a_range_removed_while_its_page_is_read_in_reads_as_zeros(tmp_path, monkeypatch):
    """The VMM drops a range (balloon) while a disk thread reads the source page its
    vCPU faulted on: when the page comes back, the fault gets a zero page, never the
    old data."""
    import threading

    from loader.uffd._source import _PageCache

    raw = str(tmp_path / "memory.img")
    make_sample_image(raw, 4 * MiB, seed=6, dense=True)
    stuck, release = threading.Event(), threading.Event()
    populate = _PageCache.populate

    def slow(self, address, length):
        if threading.current_thread().name == "pageload-uffd-disk":
            stuck.set()
            release.wait(5)
        populate(self, address, length)

    monkeypatch.setattr(_PageCache, "populate", slow)
    # nothing is cached, by either check (cachestat where the kernel has it, else mincore)
    monkeypatch.setattr("loader.uffd._source._mincore", lambda address, length, vec: -1)
    monkeypatch.setattr("loader.uffd._source._Cachestat.page", lambda self, offset: False)
    opts = options(tmp_path, raw, config=LoaderConfig(sweep=False), uffd_config=UffdConfig.for_mode("lazy"))
    page = 2 * MiB

    def body(vmm):
        got = {}
        reader = threading.Thread(target=lambda: got.setdefault("page", vmm.read(page, PAGE)))
        reader.start()
        assert stuck.wait(5), "the fault never reached a disk thread"
        vmm.balloon(page & ~(64 * 1024 - 1), 64 * 1024)  # returns once the REMOVE event is read
        release.set()
        reader.join(10)
        return got.get("page")

    try:
        state, got = await run_vmm(tmp_path, opts, [GuestRegion(0, 4 * MiB)], raw, body)
    finally:
        release.set()
    assert got == bytes(PAGE)
    u = state.uffd
    assert u.counts.uncached == 1 and u.counts.remove == 1 and u.faults_zero == 1


async def test_faults_are_answered_while_the_fill_waits_for_the_disk(tmp_path, images, monkeypatch):
    """The direct fill reads the source into the page cache before it takes the copy
    lock: while that read hangs (a stuck disk, simulated), the lock is free and the
    guest's faults are answered."""
    import threading

    from loader.uffd._source import _PageCache

    stuck = threading.Event()
    release = threading.Event()
    populate = _PageCache.populate

    def hanging(self, address, length):
        if threading.current_thread().name == "pageload-uffd-fill" and not release.is_set():
            stuck.set()
            release.wait(20)
        populate(self, address, length)

    monkeypatch.setattr(_PageCache, "populate", hanging)
    opts = options(tmp_path, images["raw"])
    offsets = [o for o in range(0, SIZE, 193 * PAGE)]
    seen = {}

    def body(vmm):
        try:
            assert stuck.wait(10), "the fill never read its source"
            seen["lock_held"] = state_box[0].uffd.guest.copy_lock.locked()
            seen["pages"] = [vmm.read(o, PAGE) for o in offsets]  # faults, the fill stuck
            seen["faults"] = state_box[0].uffd.faults
        finally:
            release.set()
        return True

    state_box = []
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        state_box.append(state)
        vmm = VmmEmulator([GuestRegion(0, SIZE)], expected=images["raw"])
        try:
            await trio.to_thread.run_sync(vmm.connect, opts.uffd_socket)
            await trio.to_thread.run_sync(body, vmm)
            with trio.fail_after(20):
                await state.uffd.filled.wait()
            assert await trio.to_thread.run_sync(vmm.verify_all) == []
        finally:
            release.set()
            vmm.close()
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.01)
    assert seen["lock_held"] is False
    assert seen["pages"] == [_image_bytes(images["raw"], o, PAGE) for o in offsets]
    assert seen["faults"] >= len(offsets) // 2  # answered by the fault thread, not the stuck fill


@pytest.mark.parametrize("config", [UffdConfig(direct=False), UffdConfig(fill_chunk=PAGE)],
                         ids=["fill-after-loader", "direct-fill"])
async def test_removals_while_the_fill_runs_are_never_refilled(tmp_path, images, config):
    """The VMM removes ranges while the fill copies (kept going by slowed reads, or by
    page-sized direct copies): once memory is filled, every removed range still reads
    as zeros, the rest as the image."""
    opts = options(tmp_path, images["raw"], wrap_queue=slowed(0.002), uffd_config=config)
    holes = [(o, 64 * 1024) for o in range(1 * MiB, SIZE, 3 * MiB + 64 * 1024)]

    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        vmm = VmmEmulator([GuestRegion(0, SIZE)], expected=images["raw"])
        try:
            await trio.to_thread.run_sync(vmm.connect, opts.uffd_socket)
            for lo, length in holes:
                await trio.to_thread.run_sync(vmm.balloon, lo, length)
                await trio.sleep(0.005)
            with trio.fail_after(20):
                await state.uffd.filled.wait()
            removed = [await trio.to_thread.run_sync(vmm.read, lo, length) for lo, length in holes]
            kept = await trio.to_thread.run_sync(vmm.read, 0, 1 * MiB)
        finally:
            vmm.close()
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.01)
    assert all(b == bytes(len(b)) for b in removed)
    assert kept == _image_bytes(images["raw"], 0, 1 * MiB)
    assert state.uffd.counts.remove == len(holes)


async def test_a_removal_in_the_middle_of_a_fill_span_is_never_refilled(tmp_path, images, monkeypatch):
    """The direct fill looks up a span's removed ranges once, then copies it chunk by
    chunk: a removal read between two of its chunks must send the rest of the span
    back to be looked up again, so the removed part stays zeros."""
    import threading

    from loader.uffd import _handler as _uffd_handler

    init = _uffd_handler.UffdHandler.__init__
    seen: dict[str, object] = {}

    class Lock:
        """The copy lock; after the fill's second copy it lets the VMM remove a range of the same span."""

        def __init__(self, handler, vmm_box):
            self._lock = threading.Lock()
            self._handler = handler
            self._vmm_box = vmm_box
            self._fill_releases = 0
            a, end = handler.shared.fill_queue[0]
            self.target = (min(end, a + handler.config.fill_span) - 64 * 1024, 64 * 1024)

        def __enter__(self):
            self._lock.acquire()

        def __exit__(self, *exc):
            self._lock.release()
            if threading.current_thread().name != "pageload-uffd-fill":
                return
            self._fill_releases += 1
            if self._fill_releases == 3:  # the look-up, then two copies
                t = threading.Thread(target=self._vmm_box[0].balloon, args=self.target)
                t.start()
                t.join(10)  # back once the fault thread has read the REMOVE event...
                # ...which it counts just after: wait for that (on a loaded machine the check
                # came first and failed), so the removal is in before the fill's next copy
                deadline = time.monotonic() + 10
                while self._handler.counts.remove != 1 and time.monotonic() < deadline:
                    time.sleep(0.001)
                seen["removed_at_once"] = self._handler.counts.remove == 1

    vmm_box: list[VmmEmulator] = []

    def patched(self, *args, **kw):
        init(self, *args, **kw)
        self.guest.copy_lock = Lock(self, vmm_box)
        seen["target"] = self.guest.copy_lock.target

    monkeypatch.setattr(_uffd_handler.UffdHandler, "__init__", patched)
    opts = options(tmp_path, images["raw"], uffd_config=UffdConfig(fill_chunk=64 * 1024, fill_quiet_s=0.0))
    lo, length = 0, 0

    async def body(state, vmm):
        nonlocal lo, length
        lo, length = seen["target"]
        removed = await trio.to_thread.run_sync(vmm.read, lo, length)
        rest = await trio.to_thread.run_sync(vmm.read, 0, lo)
        return removed, rest

    state, (removed, rest) = await run_filled(opts, [GuestRegion(0, SIZE)], images["raw"], body,
                                              created=vmm_box.append)
    assert seen["removed_at_once"] is True
    assert removed == bytes(length)
    assert rest == _image_bytes(images["raw"], 0, lo)
    assert state.uffd.fill_counts.relooked >= 1  # the span's rest was looked up again


async def test_fault_and_fill_threads_never_share_ioctl_buffers(tmp_path, images, monkeypatch):
    """Both threads copy at once (the fault thread's copies take no lock): each must
    pack its UFFDIO_COPY arguments, and read back the bytes done, in a buffer of its
    own.  One shared :class:`_uffd.Uffd` let one thread read the other's result."""
    import threading

    from loader.uffd._fill import Fill

    users: dict[int, set[str]] = {}
    copy = _uffd.Uffd.copy
    faulted = threading.Event()

    def recording(self, dst, src, length, mode=0):
        users.setdefault(id(self._copy), set()).add(threading.current_thread().name)
        try:
            return copy(self, dst, src, length, mode)
        finally:
            if threading.current_thread().name == "pageload-uffd":
                faulted.set()

    # the fill's first copy waits (outside the copy lock) for the fault thread's first:
    # on a loaded machine the fill could otherwise copy every page before the guest
    # touched one, and the fault thread would never copy (seen once in a full run)
    yield_to_faults = Fill._yield_to_faults

    def after_a_fault(self):
        faulted.wait(10)
        return yield_to_faults(self)

    monkeypatch.setattr(_uffd.Uffd, "copy", recording)
    monkeypatch.setattr(Fill, "_yield_to_faults", after_a_fault)
    # page-sized fill copies, no yielding: the fill runs while the guest faults
    opts = options(tmp_path, images["raw"], uffd_config=UffdConfig(fill_chunk=PAGE, fill_quiet_s=0.0))
    # data pages (holes are answered without a copy), from the end down: the fill goes
    # up from the start, so the guest faults ahead of it
    offsets = [o for o in range(0, SIZE, 97 * PAGE)
               if _image_bytes(images["raw"], o, PAGE) != bytes(PAGE)][::-1]
    assert len(offsets) > 20

    def body(vmm):
        got = [vmm.read(o, PAGE) for o in offsets]
        # the fill copies the rest of the guest once the faults are quiet: wait for its
        # first copy while the guest is still there (it may come only after the reads)
        deadline = time.monotonic() + 30
        while not any("pageload-uffd-fill" in names for names in list(users.values())) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        return got

    state, got = await run_vmm(tmp_path, opts, [GuestRegion(0, SIZE)], images["raw"], body)
    assert got == [_image_bytes(images["raw"], o, PAGE) for o in offsets]
    threads = set().union(*users.values())
    assert {"pageload-uffd", "pageload-uffd-fill"} <= threads  # both copied
    assert all(len(names) == 1 for names in users.values()), users


def _yielding(config: UffdConfig, last_fault_ago_s: float, monkeypatch) -> list[float]:
    """The sleeps the fill thread takes before its next copy, the last fault having
    come ``last_fault_ago_s`` ago (on a fake clock: nothing is slept)."""
    from types import SimpleNamespace

    from loader.uffd._fill import Fill
    from loader.uffd._state import HandlerState

    now = [1000.0]
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    monkeypatch.setattr("loader.uffd._fill.time", SimpleNamespace(
        monotonic=lambda: now[0], perf_counter_ns=lambda: int(now[0] * 1e9), sleep=fake_sleep))
    fill = Fill.__new__(Fill)
    fill.config = config
    fill.state = HandlerState()
    fill.guest = SimpleNamespace(last_fault_ns=int((now[0] - last_fault_ago_s) * 1e9))
    fill._yield_to_faults()
    return sleeps


def test_the_fill_waits_while_faults_come_but_never_stops(monkeypatch):
    cfg = UffdConfig(fill_quiet_s=0.002, fill_max_wait_s=0.05)
    assert _yielding(cfg, 10.0, monkeypatch) == []  # quiet guest: copy at once
    assert sum(_yielding(cfg, 0.0005, monkeypatch)) == pytest.approx(0.0015)  # until 2 ms of quiet
    assert _yielding(UffdConfig.for_mode("eager"), 0.0, monkeypatch) == []  # eager's faults wait for it
    assert _yielding(UffdConfig(fill_quiet_s=0), 0.0, monkeypatch) == []
    # faults that never stop: the fill still copies after fill_max_wait_s
    assert sum(_yielding(UffdConfig(fill_quiet_s=100.0, fill_max_wait_s=0.01), 0.0, monkeypatch)) == \
        pytest.approx(0.01)
