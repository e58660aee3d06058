"""How the page-fault handler answers each fault (loader/uffd/_faults.py: ``_fault``,
``_answer``, ``_zero``, ``_fail``, ``_copy``; loader/uffd/_answer.py; ``_on_waited`` in
loader/uffd/_handler.py), in this process and in a second or two: the ``uffd-handler`` mutation target's tests
(docs/TESTING.md); test_uffd.py and test_uffd_failures.py serve a VMM end to end.

Everything is real but the VMM's process: a loader over a small image (data, a hole,
data), guest memory of this process registered with a userfaultfd
(:class:`workloads._vmm.VmmEmulator`, not connected to any socket) and the handler's
code.  The test plays the fault thread (the handler's ``reader`` and ``decide``, whichever
thread calls them): it reads the faults (``reader.read_ready``) and hands over the
loader's answers (``decide.take_answers``) when it chooses, so that the races a handler must survive are
staged exactly -- a page put in by someone else first (EEXIST), the mapping changing
under an answer (EAGAIN: a balloon's REMOVE event not read yet).  A "vCPU" reads guest
memory through a system call (``pwrite`` from the guest page into a memfd): a
poisoned page fails that call with EFAULT where a vCPU's own read gets SIGBUS
(test_uffd_failures.py checks that), so nothing here kills the test process.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import select
import threading
import time

import pytest
import trio
import trio.testing

import aio
import aio.testing
from loader import Layout, Loader, LoaderConfig, LoadError, MemoryFile, UffdConfig
from loader.source import FileSource
from loader.uffd import _ioctl as _uffd
from loader.uffd._handler import Region, UffdHandler
from loader.uffd._state import STOP
from protocol import codes
from workloads._vmm import GuestRegion, VmmEmulator

KiB = 1 << 10
PAGE = mmap.PAGESIZE
SIZE = 1 << 20
#: data [0, 256K) and [512K, 1M); a hole between
DATA = [(0, 256 * KiB), (512 * KiB, 512 * KiB)]
HOLE = 256 * KiB


def _probe() -> str | None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(323, ctypes.c_int(os.O_CLOEXEC | os.O_NONBLOCK))
    if fd < 0:
        return f"userfaultfd(2) fails here: {os.strerror(ctypes.get_errno())}"
    os.close(fd)
    return None


_REASON = _probe() if os.uname().machine == "x86_64" else "the syscall number probed is x86-64's"
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


def _pending_faults(fd: int) -> int:
    """Faults queued in the userfaultfd and not read yet (its /proc fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("pending:"):
                return int(line.split()[1])
    raise AssertionError("no 'pending' line in a userfaultfd's fdinfo")


class Vcpu(threading.Thread):
    """Reads ``[address, address+length)`` with a system call: :meth:`result` is the
    bytes, or the errno it failed with."""

    def __init__(self, address: int, length: int = PAGE) -> None:
        super().__init__(daemon=True)
        self.address, self.length = address, length
        self.got: bytes | int | None = None
        self.start()

    def run(self) -> None:
        sink = os.memfd_create("vcpu", os.MFD_CLOEXEC)
        try:
            n = os.pwrite(sink, (ctypes.c_char * self.length).from_address(self.address), 0)
            self.got = os.pread(sink, n, 0)
        except OSError as exc:
            self.got = exc.errno
        finally:
            os.close(sink)

    def result(self, timeout: float = 10.0) -> bytes | int | None:
        self.join(timeout)
        assert not self.is_alive(), "the faulting thread was never woken"
        return self.got

    def blocked(self) -> bool:
        """Still blocked after a moment (only ever a reason to fail when it is not)."""
        self.join(0.2)
        return self.is_alive()


class Rig:
    """A loader (lazy: nothing loads unless waited for), guest memory and the handler,
    the test thread being its fault thread (see the module doc)."""

    def __init__(self, path: str, *, identity: bool = True, config: UffdConfig | None = None,
                 loader_config: LoaderConfig | None = None, wrap=None,
                 regions: list[GuestRegion] | None = None, serve_only: int | None = None,
                 layout_page: int = PAGE, data: list[tuple[int, int]] = DATA, guest_page: int | None = None,
                 features: int = _uffd.FEATURE_EVENT_REMOVE | _uffd.FEATURE_EXACT_ADDRESS) -> None:
        rng = os.urandom
        self.expected = bytearray(SIZE)
        for lo, n in data:
            self.expected[lo:lo + n] = rng(n)
        if identity:  # a raw image: file offset = memory offset, the hole a hole
            with open(path, "wb") as f:
                f.truncate(SIZE)
                for lo, n in data:
                    f.seek(lo)
                    f.write(self.expected[lo:lo + n])
            triples = [(lo, n, lo) for lo, n in data]
        else:  # the data packed one range after the other (a pages file)
            with open(path, "wb") as f:
                for lo, n in data:
                    f.write(self.expected[lo:lo + n])
            triples, at = [], 0
            for lo, n in data:
                triples.append((lo, n, at))
                at += n
        self.path = path
        self.layout = Layout(SIZE, layout_page, triples)
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.memory = MemoryFile(SIZE)
        queue = aio.open_queue("sync", 16)
        self.queue = wrap(queue) if wrap is not None else queue
        lazy = LoaderConfig(sweep=False, read_now_bytes=0, queue_depth=16, background_reads=4)
        self.loader = Loader(FileSource(self.layout, self.fd), self.memory, self.queue, loader_config or lazy)
        self.vmm = VmmEmulator(regions or [GuestRegion(0, SIZE)], features=features, align=guest_page or 0)
        # (``serve_only``: the handler is told of only the first so many bytes of the first region)
        # (``guest_page``: the page size the handler is told, over the same 4 KiB pages)
        hregions = [Region(self.vmm.address(r.offset), serve_only or r.size, r.offset, guest_page or r.page_size)
                    for r in self.vmm.regions[:1 if serve_only else None]]
        self.handler = UffdHandler(self.loader, self.memory, os.dup(self.vmm.uffd), hregions,
                                   config or UffdConfig.for_mode("lazy"))
        self.uffd = _uffd.Uffd(self.vmm.uffd)  # the test's own, to stage pages
        self.vcpus: list[Vcpu] = []
        self.source = mmap.mmap(-1, PAGE)
        self.source.write(b"\xa5" * PAGE)  # bytes that are nowhere in the image
        self.src = ctypes.addressof(ctypes.c_char.from_buffer(self.source))

    def address(self, offset: int) -> int:
        return self.vmm.address(offset)

    def vcpu(self, offset: int, length: int = PAGE) -> Vcpu:
        """A vCPU reading image ``offset``: returns once its fault is queued."""
        before = _pending_faults(self.vmm.uffd)
        v = Vcpu(self.address(offset), length)
        self.vcpus.append(v)
        deadline = time.monotonic() + 10
        while _pending_faults(self.vmm.uffd) <= before:
            assert time.monotonic() < deadline, f"no fault at {offset:#x}"
            time.sleep(0.0005)
        return v

    def read(self, offset: int, length: int = PAGE) -> bytes | int | None:
        """Guest memory at ``offset`` (a page already there: no fault)."""
        return Vcpu(self.address(offset), length).result()

    def serve(self) -> None:
        """Read and answer what is queued now, as the fault thread does."""
        self.handler.reader.read_ready()

    def stage(self, offset: int) -> None:
        """Put a page at ``offset`` in before the handler does, without waking anyone."""
        self.uffd.copy(self.address(offset), self.src, PAGE, _uffd.COPY_MODE_DONTWAKE)

    def present(self, offset: int) -> bool:
        return self.vmm._present(self.address(offset))

    def image(self, offset: int, length: int = PAGE) -> bytes:
        return bytes(self.expected[offset:offset + length])

    async def answers(self, count: int = 1) -> None:
        """Wait for the loader to answer ``count`` faults, then hand the answers over."""
        with trio.fail_after(10):
            while len(self.handler.shared.answers) < count:
                await trio.sleep(0.001)
        self.handler.decide.take_answers()

    def balloon(self, offset: int, length: int) -> threading.Thread:
        """MADV_DONTNEED ``[offset, offset+length)`` in a thread, which blocks until
        the REMOVE event is read; returns once the event is queued (the mapping is
        "changing" until then: UFFDIO_COPY and its kin say EAGAIN)."""
        t = threading.Thread(target=self.vmm.balloon, args=(offset, length), daemon=True)
        t.start()
        poller = select.poll()
        poller.register(self.vmm.uffd, select.POLLIN)
        assert poller.poll(10_000), "no REMOVE event"
        return t

    def close(self) -> None:
        h = self.handler
        h.state.advance(STOP)  # (disk threads, where a test started one)
        with h.decide.disk.cv:
            h.decide.disk.cv.notify_all()
        if isinstance(self.queue, aio.testing.HangingQueue):
            self.queue.release()
        os.close(h.uffd.fd)
        if h.shared.wake_fd >= 0:
            os.close(h.shared.wake_fd)
            h.shared.wake_fd = -1
        if h.direct.map is not None:
            h.direct.map.close()
        self.vmm.close()  # releases any vCPU still blocked
        for v in self.vcpus:  # ended before the next test maps memory, maybe at the same address
            v.join(10)
            assert not v.is_alive(), "a vCPU still runs after its guest memory was closed"
        self.memory.close()
        os.close(self.fd)


@pytest.fixture
def rig(tmp_path):
    made: list[Rig] = []

    def make(**kw) -> Rig:
        made.append(Rig(str(tmp_path / f"image{len(made)}"), **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


class serving:
    """``async with serving(rig):`` the loader runs, this thread is the fault thread."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig

    async def __aenter__(self) -> Rig:
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        self._nursery = nursery
        await nursery.start(self.rig.loader.run)
        self.rig.handler.shared.token = trio.lowlevel.current_trio_token()
        return self.rig

    async def __aexit__(self, *exc) -> bool | None:
        self._nursery.cancel_scope.cancel()
        return await self._nursery_cm.__aexit__(*exc)


def counts(h: UffdHandler) -> dict[str, int]:
    c = h.counts
    return {k: getattr(c, k) for k in ("faults", "loaded", "direct", "zero", "failed", "spurious", "copies",
                                        "copied_bytes", "eexist", "eagain", "efault", "uncached", "around_bytes")}


def nonzero(h: UffdHandler) -> dict[str, int]:
    return {k: v for k, v in counts(h).items() if v}


def _pfn(address: int) -> int:
    """The physical page behind ``address`` (root only: 0 otherwise)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // PAGE * 8)
        entry = int.from_bytes(f.read(8), "little")
    assert entry >> 63, "not present"
    return entry & ((1 << 55) - 1)


# ------------------------------------------------------------------ _fault's paths
@pytest.mark.parametrize("probe", ["cachestat", "mincore"])
async def test_a_cached_page_of_a_raw_image_is_copied_straight_from_the_source(rig, monkeypatch, probe):
    """The short path: one region of 4 KiB pages over a raw image, nothing removed,
    nothing loaded: a page in the page cache is copied from the source at once --
    also the region's first and last page, at an address inside the page."""
    r = rig()
    h = r.handler
    if probe == "mincore":
        h.decide.fast_cachestat = None  # as on a kernel without cachestat(2)
    elif h.decide.fast_cachestat is None:
        pytest.skip("no cachestat(2) here (Linux 6.5+)")
    looked: list[int] = []
    full = h.guest.region  # the full path's first step: never taken here
    monkeypatch.setattr(h.guest, "region", lambda a: looked.append(a) or full(a))
    async with serving(r):
        for off in (0, SIZE - PAGE + 101, 512 * KiB + 5 * PAGE + 101):  # (exact addresses: the first is the base)
            v = r.vcpu(off, 16)
            r.serve()
            assert v.result() == r.image(off, 16)
    assert looked == []
    assert nonzero(h) == {"faults": 3, "direct": 3, "copies": 3, "copied_bytes": 3 * PAGE}
    assert h.histogram.count == 3


@pytest.mark.parametrize("kind", ["direct", "loaded", "hole"])
async def test_a_page_put_in_first_by_someone_else_is_only_woken(rig, kind):
    """The page is there when the handler answers (EEXIST): the thread is woken and
    sees that page (the short path gives way to the full one, which counts it)."""
    r = rig(identity=kind == "direct")
    off = {"direct": 512 * KiB + 3 * PAGE, "loaded": 512 * KiB + 4 * PAGE, "hole": HOLE + 5 * PAGE}[kind]
    async with serving(r):
        if kind == "loaded":
            await r.loader.wait_loaded(off, PAGE)
        v = r.vcpu(off)
        r.stage(off)
        r.serve()
        assert v.result() == r.source[:]
    want = {"direct": {"direct": 1, "spurious": 1, "copies": 1, "eexist": 1},
            "loaded": {"loaded": 1, "spurious": 1, "copies": 1, "eexist": 1},
            "hole": {"zero": 1}}[kind]
    assert nonzero(r.handler) == {"faults": 1, **want}
    assert r.handler.histogram.count == 1


@pytest.mark.parametrize("identity", [True, False])
async def test_a_hole_gets_the_shared_zero_page(rig, identity):
    """A hole costs no memory: it is answered with UFFDIO_ZEROPAGE (the kernel's
    shared zero page), not a copy of zeros -- also a raw image's hole that is in the
    page cache (the short path copies only data)."""
    r = rig(identity=identity)
    if identity:
        os.pread(r.fd, 8 * PAGE, HOLE)  # its zeros in the page cache now
    async with serving(r):
        for off in (HOLE, HOLE + 7 * PAGE):
            v = r.vcpu(off + 8, 8)
            r.serve()
            assert v.result() == bytes(8)
    assert nonzero(r.handler) == {"faults": 2, "zero": 2}
    a, b = _pfn(r.address(HOLE)), _pfn(r.address(HOLE + 7 * PAGE))
    if a == 0:
        pytest.skip("/proc/self/pagemap hides page frame numbers (not root)")
    assert a == b


async def test_an_image_of_larger_pages_is_served_in_guest_pages(rig):
    """The image's pages (8 KiB here) are larger than the guest's: whether a guest page
    holds data is looked up in its own span."""
    r = rig(layout_page=2 * PAGE)
    async with serving(r):
        for off, want in ((HOLE - PAGE, r.image(HOLE - PAGE)), (HOLE, bytes(PAGE)), (HOLE + 3 * PAGE, bytes(PAGE)),
                          (512 * KiB, r.image(512 * KiB))):  # (the first page of a range)
            v = r.vcpu(off)
            r.serve()
            assert v.result() == want
    assert nonzero(r.handler) == {"faults": 4, "zero": 2, "direct": 2, "copies": 2, "copied_bytes": 2 * PAGE}


async def test_a_guest_page_larger_than_the_images_is_data_if_any_of_it_is(rig):
    """Guest pages larger than the image's (8 KiB regions here, standing in for 2 MiB
    huge pages, which this machine may not have): a page whose first half is a hole
    and second half data is data, copied whole; one all hole is zeros, copied whole
    from a zero source (there is no zeropage ioctl for huge pages)."""
    r = rig(data=[(0, 256 * KiB), (516 * KiB, 508 * KiB)], guest_page=2 * PAGE)
    os.pread(r.fd, SIZE, 0)  # all of the source in the page cache (its holes too)
    async with serving(r):
        for off, want in ((516 * KiB, r.image(516 * KiB)), (HOLE + 2 * PAGE, bytes(PAGE))):
            v = r.vcpu(off)
            r.serve()
            assert v.result() == want
            assert r.present(off & ~(2 * PAGE - 1)) and r.present(off | PAGE)  # both halves
    assert nonzero(r.handler) == {"faults": 2, "zero": 1, "direct": 1, "copies": 1, "copied_bytes": 2 * PAGE}


async def test_a_removed_page_reads_as_zeros_and_its_neighbours_as_data(rig):
    r = rig()
    off = 512 * KiB + 16 * PAGE
    async with serving(r):
        balloon = r.balloon(off, PAGE)
        r.serve()  # reads the REMOVE event
        balloon.join(10)
        assert not balloon.is_alive() and r.handler.counts.remove == 1
        for at, want in ((off, bytes(PAGE)), (off + PAGE, r.image(off + PAGE)), (off - PAGE, r.image(off - PAGE))):
            v = r.vcpu(at)
            r.serve()
            assert v.result() == want
    assert nonzero(r.handler) == {"faults": 3, "zero": 1, "direct": 2, "copies": 2, "copied_bytes": 2 * PAGE}


async def test_a_loaded_page_is_copied_from_the_memory_file_and_counted_for_the_loader(rig):
    r = rig(identity=False)
    h = r.handler
    touched: list[tuple[int, int]] = []  # a working-set recorder's view

    class Recorder:
        def touched(self, lo: int, hi: int) -> None:
            touched.append((lo, hi))

    r.loader.recorder = Recorder()
    off = 512 * KiB + 9 * PAGE
    async with serving(r):
        await r.loader.wait_loaded(off, PAGE)
        assert h.shared.pending.overlap_bytes(off, off + PAGE) == PAGE
        before = r.loader.counters.waits_immediate
        v = r.vcpu(off + 5, 100)
        r.serve()
        assert v.result() == r.image(off + 5, 100)
        h._merge()
        assert r.loader.counters.waits_immediate - before == 1
        assert touched == [(off, off + PAGE)] * 2  # the wait above, then the fault
    assert nonzero(h) == {"faults": 1, "loaded": 1, "copies": 1, "copied_bytes": PAGE}
    assert h.shared.pending.overlap_bytes(off, off + PAGE) == 0 and not h.shared.installed


async def test_a_page_not_loaded_is_copied_from_the_source_even_when_others_are(rig):
    """The full path (something is loaded, so the short path is not taken): a page
    not loaded is copied from the source, and its window is hinted to the loader."""
    r = rig(config=UffdConfig(fill=False, fault_around=PAGE, hint_around=64 * KiB, spin_s=0.0))
    h = r.handler
    async with serving(r):
        await r.loader.wait_loaded(0, PAGE)
        off = 512 * KiB + 21 * PAGE
        v = r.vcpu(off)
        r.serve()
        assert v.result() == r.image(off)
        with trio.fail_after(10):
            while not r.loader.is_loaded(576 * KiB, 640 * KiB):  # the hint: its aligned 64 KiB window
                await trio.sleep(0.001)
    assert nonzero(h) == {"faults": 1, "direct": 1, "copies": 1, "copied_bytes": PAGE}
    assert r.loader.counters.prefetches == 1 and r.loader.loaded_bytes == PAGE + 64 * KiB


async def test_a_loaded_page_brings_the_loaded_pages_of_its_window(rig):
    """``fault_around``: the loaded, not yet copied pages of the aligned 64 KiB window
    around a fault are copied with it (in pieces around the faulting page), and
    none outside it; copying from the source after the loader (direct fill) marks
    them installed."""
    r = rig(identity=False, config=UffdConfig(fill=True, fault_around=64 * KiB, hint_around=0, spin_s=0.0))
    h = r.handler
    assert h.fill.from_source
    lo, hi = 576 * KiB, 640 * KiB
    async with serving(r):
        await r.loader.wait_loaded(lo - PAGE, hi - lo + 2 * PAGE)
        v = r.vcpu(lo + 5 * PAGE)
        r.serve()
        assert v.result() == r.image(lo + 5 * PAGE)
        assert [r.present(o) for o in (lo - PAGE, lo, hi - PAGE, hi)] == [False, True, True, False]
        assert r.read(lo, hi - lo) == r.image(lo, hi - lo)
    assert nonzero(h) == {"faults": 1, "loaded": 1, "copies": 3, "copied_bytes": hi - lo}
    assert h.shared.installed.overlap_bytes(0, SIZE) == h.shared.installed.overlap_bytes(lo, hi) == hi - lo
    assert h.shared.pending.overlap_bytes(lo, hi) == 0 and h.shared.pending.overlap_bytes(0, SIZE) == 2 * PAGE


async def test_the_window_ends_at_the_region(rig):
    """A region of part of the image, not aligned to the window: only its own pages
    come with the fault."""
    r = rig(identity=False, regions=[GuestRegion(16 * KiB, 32 * KiB)],
            config=UffdConfig(fill=False, fault_around=64 * KiB, hint_around=0, spin_s=0.0))
    async with serving(r):
        await r.loader.wait_loaded(0, 64 * KiB)
        v = r.vcpu(16 * KiB + PAGE)
        r.serve()
        assert v.result() == r.image(16 * KiB + PAGE)
        assert all(r.present(o) for o in range(16 * KiB, 48 * KiB, PAGE))
        assert r.read(16 * KiB, 32 * KiB) == r.image(16 * KiB, 32 * KiB)
    assert nonzero(r.handler) == {"faults": 1, "loaded": 1, "copies": 3, "copied_bytes": 32 * KiB}


async def test_a_page_in_the_middle_of_the_window_already_there_is_skipped(rig):
    """A copy of the window stops at a page already there (the kernel says EAGAIN
    with the bytes done): the rest is still copied, that page kept."""
    r = rig(identity=False, config=UffdConfig(fill=False, fault_around=64 * KiB, hint_around=0, spin_s=0.0))
    lo, hi = 64 * KiB, 128 * KiB
    async with serving(r):
        await r.loader.wait_loaded(lo, hi - lo)
        r.stage(100 * KiB)
        v = r.vcpu(72 * KiB)
        r.serve()
        assert v.result() == r.image(72 * KiB)
        assert r.read(lo, 36 * KiB) == r.image(lo, 36 * KiB)
        assert r.read(100 * KiB) == r.source[:]
        assert r.read(104 * KiB, 24 * KiB) == r.image(104 * KiB, 24 * KiB)
    # the page, [64K, 72K), then [76K, 128K) in three: to 100K, 100K (EEXIST), the rest
    assert nonzero(r.handler) == {"faults": 1, "loaded": 1, "copies": 5, "copied_bytes": 60 * KiB, "eexist": 1}


def _read_not_woken(fd: int) -> int:
    """Faults read from the userfaultfd and not woken yet (its /proc fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["total"]) - int(fields["pending"])


async def test_a_fault_outside_every_region_is_woken_not_left_hanging(rig, caplog):
    """The handler was told of less than the VMM registered: a fault outside its
    regions (also at the first byte past one) is logged and woken -- it faults
    again -- never left blocked silently."""
    r = rig(serve_only=512 * KiB)
    async with serving(r):
        at = [512 * KiB, 768 * KiB + 3 * PAGE + 1]  # the region's end; an odd address further on
        vcpus = [r.vcpu(off, 8) for off in at]
        with caplog.at_level(logging.WARNING, logger="pageload"):
            r.serve()
        for off in at:
            assert f"fault at {r.address(off):#x} outside every region" in caplog.text
        deadline = time.monotonic() + 10
        while _read_not_woken(r.vmm.uffd):
            assert time.monotonic() < deadline, "a fault was read and never woken"
            time.sleep(0.001)
        assert all(v.is_alive() for v in vcpus)  # (woken, they fault again: nobody serves that memory)
    assert nonzero(r.handler) == {"faults": 2}


async def test_in_eager_mode_a_fault_waits_for_the_whole_fill(rig):
    r = rig(config=UffdConfig.for_mode("eager"))
    async with serving(r):
        v = r.vcpu(PAGE)
        r.serve()
        assert v.blocked() and [a for a, _ in r.handler.decide.deferred] == [r.address(PAGE)]
    assert nonzero(r.handler) == {"faults": 1}


async def _disk_reads(h: UffdHandler) -> None:
    """Wait for a disk thread to have read a source page in, then let the fault go on."""
    with trio.fail_after(10):
        while True:
            with h.decide.disk.cv:
                if h.decide.disk.done:
                    break
            await trio.sleep(0.001)
    h.decide.take_disk_reads()


def _drop_cache(r: Rig, offset: int) -> None:
    os.fsync(r.fd)
    os.posix_fadvise(r.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    h = r.handler
    if h.decide.cache.cached(h.direct.address(offset, PAGE), PAGE):
        pytest.skip(f"{r.path}'s file system keeps its pages cached (tmpfs?): nothing to drop")


@pytest.mark.parametrize("probe", ["cachestat", "mincore"])
async def test_a_source_page_not_in_the_page_cache_is_read_in_first(rig, probe):
    """The fault thread never reads the disk: an uncached source page goes to a disk
    thread, and the fault comes back once it is in."""
    r = rig()
    h = r.handler
    if probe == "mincore":
        h.decide.fast_cachestat = None
    off = 512 * KiB + 40 * PAGE
    _drop_cache(r, off)
    async with serving(r):
        v = r.vcpu(off)
        r.serve()
        assert h.counts.uncached == 1 and v.blocked()
        await _disk_reads(h)
        assert v.result() == r.image(off)
        await trio.testing.wait_all_tasks_blocked()
    assert nonzero(h) == {"faults": 1, "direct": 1, "copies": 1, "copied_bytes": PAGE, "uncached": 1}
    assert r.loader.counters.waits_total == 0  # the disk thread's read, not the loader's


async def test_a_source_page_that_cannot_be_read_goes_to_the_loader(rig):
    """The source shrank after the handler mapped it: the direct copy of a page past
    its new end fails (EFAULT), the fault goes to the loader, whose read fails too:
    the page is poisoned, never answered with wrong bytes."""
    r = rig()
    h = r.handler
    os.truncate(r.path, 512 * KiB)
    off = 768 * KiB
    async with serving(r):
        v = r.vcpu(off)
        r.serve()
        await _disk_reads(h)
        assert h.counts.efault == 1 and h.decide.answerer.copied == 0
        await r.answers()
        assert v.result() == errno.EFAULT
    assert nonzero(h) == {"faults": 1, "copies": 1, "efault": 1, "uncached": 1, "failed": 1}
    assert h.faults_waited == 1


async def test_a_direct_copy_brings_the_cached_pages_of_its_window(rig):
    """After a fault copied from the source, the rest of its aligned 64 KiB window
    follows from the source (the cached data pages), so its neighbours never fault."""
    r = rig(config=UffdConfig(fill=False, fault_around=64 * KiB, hint_around=0, spin_s=0.0))
    lo = 576 * KiB
    async with serving(r):
        v = r.vcpu(lo + 3 * PAGE)
        r.serve()
        assert v.result() == r.image(lo + 3 * PAGE)
        hi = lo + 64 * KiB
        assert [r.present(o) for o in (lo - PAGE, lo, hi - PAGE, hi)] == [False, True, True, False]
        assert r.read(lo, 64 * KiB) == r.image(lo, 64 * KiB)
    assert nonzero(r.handler) == {"faults": 1, "direct": 1, "copies": 3, "copied_bytes": 64 * KiB,
                                  "around_bytes": 60 * KiB}


# ------------------------------------------------------------------ the mapping changing (EAGAIN)
@pytest.mark.parametrize("kind", ["direct", "loaded", "hole"])
async def test_an_answer_while_the_mapping_changes_is_retried(rig, kind):
    """A REMOVE event not read yet makes every answer fail with EAGAIN: the fault is
    kept for a retry (after the events), never dropped, and then answered."""
    r = rig(identity=kind != "direct")
    h = r.handler
    off = {"direct": 512 * KiB + 30 * PAGE, "loaded": 512 * KiB + 31 * PAGE, "hole": HOLE + 2 * PAGE}[kind]
    async with serving(r):
        if kind == "loaded":
            await r.loader.wait_loaded(off, PAGE)
        v = r.vcpu(off + 3, 8)
        [msg] = r.uffd.read_messages()  # the fault, read here: the handler sees only the event
        balloon = r.balloon(64 * KiB, PAGE)
        h.decide._fault(msg.b, 1)
        assert v.blocked() and h.counts.eagain == 1
        va = r.address(off)
        assert h.decide.answerer.retry == [(msg.b if kind == "direct" else va, 1)]
        r.serve()  # the event
        balloon.join(10)
        retry, h.decide.answerer.retry = h.decide.answerer.retry, []
        for address, start in retry:
            h.decide._fault(address, start)
        assert v.result() == (bytes(8) if kind == "hole" else r.image(off + 3, 8))
    want = {"direct": {"direct": 1, "copies": 2, "copied_bytes": PAGE},
            "loaded": {"loaded": 2, "copies": 2, "copied_bytes": PAGE},
            "hole": {"zero": 2}}[kind]
    assert nonzero(h) == {**want, "eagain": 1}
    assert h.counts.remove == 1


# ------------------------------------------------------------------ waits for the loader
async def test_faults_that_wait_for_the_loader_are_answered_when_it_has_read(rig):
    """Direct copies off: each fault on a page not loaded waits at the head of the
    loader's queue; the handler counts them until each is answered."""
    second = 512 * KiB + 50 * PAGE
    r = rig(config=UffdConfig(direct=False, fill=False, fault_around=PAGE, hint_around=0, spin_s=0.0),
            wrap=lambda q: aio.testing.HangingQueue(q, aio.testing.hang_offsets(second, second + PAGE)))
    h = r.handler
    first = 512 * KiB + 10 * PAGE
    async with serving(r):
        before = r.loader.counters.waits_immediate
        v1 = r.vcpu(first)
        v2 = r.vcpu(second)
        r.serve()
        with trio.fail_after(10):
            while h.outstanding + len(h.shared.answers) < 2:
                await trio.sleep(0.001)
        await r.answers(1)
        assert v1.result() == r.image(first)
        assert h.outstanding == 1 and not h._none_outstanding.is_set() and v2.blocked()
        r.queue.release()  # the hung read fails
        await r.answers(1)
        assert v2.result() == errno.EFAULT  # poisoned
        assert h.outstanding == 0 and h._none_outstanding.is_set()
        h._merge()
        assert r.loader.counters.waits_immediate == before  # the loader counted these waits itself
    assert h.faults_waited == 2 and h.histogram.count == 2
    assert h.counts.blocked_ns > 0  # measured from each fault's own start
    assert nonzero(h) == {"faults": 2, "copies": 1, "copied_bytes": PAGE, "failed": 1}


async def test_a_page_that_fails_to_load_is_poisoned_and_named_in_the_log(rig, caplog):
    off = 512 * KiB + 12 * PAGE
    r = rig(identity=False, regions=[GuestRegion(256 * KiB, 768 * KiB)],
            wrap=lambda q: aio.testing.FaultInjectingQueue(q, aio.testing.fail_offsets(0, 1 << 30)))
    h = r.handler
    assert h.direct_off_reason == "off (the loader's queue changes what reads return)"
    async with serving(r):
        v = r.vcpu(off + 9, 8)
        r.serve()
        with caplog.at_level(logging.ERROR, logger="pageload"):
            await r.answers()
        assert v.result() == errno.EFAULT
        assert Vcpu(r.address(off)).result() == errno.EFAULT  # and stays so, without a fault
    assert f"page at {r.address(off):#x} (memory {off:#x}) failed to load" in caplog.text
    assert nonzero(h) == {"faults": 1, "failed": 1} and not h.gone


async def test_a_page_still_waited_for_at_shutdown_is_poisoned_with_a_warning(rig, caplog):
    off = 512 * KiB + 13 * PAGE
    r = rig(identity=False, regions=[GuestRegion(256 * KiB, 768 * KiB)],
            wrap=lambda q: aio.testing.HangingQueue(q, aio.testing.hang_offsets(0, 1 << 30)))
    async with serving(r):
        v = r.vcpu(off)
        r.serve()
        with trio.fail_after(10):
            while not r.handler.outstanding:
                await trio.sleep(0.001)
        r.loader.shutdown()
        with caplog.at_level(logging.WARNING, logger="pageload"):
            await r.answers()
        assert v.result() == errno.EFAULT
    warned = [rec for rec in caplog.records if "not loaded at shutdown" in rec.getMessage()]
    assert [rec.levelno for rec in warned] == [logging.WARNING]
    assert f"page at {r.address(off):#x} (memory {off:#x})" in warned[0].getMessage()
    assert "failed to load" not in caplog.text
    assert nonzero(r.handler) == {"faults": 1, "failed": 1}


async def test_a_poison_while_the_mapping_changes_is_tried_again(rig):
    off = 512 * KiB + 14 * PAGE
    r = rig(identity=False, wrap=lambda q: aio.testing.FaultInjectingQueue(q, aio.testing.fail_offsets(0, 1 << 30)))
    h = r.handler
    async with serving(r):
        v = r.vcpu(off)
        r.serve()
        with trio.fail_after(10):
            while not h.shared.answers:
                await trio.sleep(0.001)
        balloon = r.balloon(64 * KiB, PAGE)
        h.decide.take_answers()  # EAGAIN: kept for later
        assert v.blocked() and h.counts.failed == 0 and len(h.shared.answers) == 1
        r.serve()
        balloon.join(10)
        h.decide.take_answers()
        assert v.result() == errno.EFAULT
    assert nonzero(h) == {"faults": 1, "failed": 1}


# ------------------------------------------------------------------ errors of the ioctls themselves
_NOWHERE = 1 << 47  # past the end of the user address space: every ioctl there is EINVAL


def _unmapped(r: Rig, offset: int) -> int:
    """Unmap guest page ``offset`` (the VMM's memory gone from under the handler)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    assert libc.munmap(r.address(offset), PAGE) == 0
    return r.address(offset)


async def test_memory_gone_stops_the_handler_quietly(rig, caplog):
    """ENOENT (the range is no longer mapped): the VMM's memory is gone; the handler
    stops, logging it once, without a warning per ioctl."""
    for call in ("zero", "copy", "poison"):
        r = rig()
        h = r.handler
        region = h.guest.regions[0]
        async with serving(r):
            va = _unmapped(r, 512 * KiB + 3 * PAGE)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="pageload"):
                if call == "zero":
                    h.decide._zero(region, va, 1)
                elif call == "copy":
                    assert h.decide._copy(region, va, h._src, 2 * PAGE) == 0
                    assert h.counts.copies == 1
                else:
                    h.decide._fail(region, va, 1, LoadError(codes.IO_ERROR, "bad"))
            assert h.gone, call
            assert "the VMM's memory is gone" in caplog.text, call
            assert not [rec for rec in caplog.records
                        if rec.levelno >= logging.WARNING and "failed to load" not in rec.getMessage()], call


async def test_an_unexpected_ioctl_error_is_logged_and_skipped(rig, caplog):
    """An error that is neither EEXIST, EAGAIN nor a VMM gone (EINVAL here: an
    address past user space) is logged; a copy goes on with the next page, a wake
    is harmless, and a poison that cannot be made stops the handler (no wrong bytes)."""
    r = rig()
    h = r.handler
    region = h.guest.regions[0]
    async with serving(r):
        with caplog.at_level(logging.WARNING, logger="pageload"):
            assert h.decide._copy(region, _NOWHERE, h._src, 2 * PAGE) == 0
            assert nonzero(h) == {"copies": 2}
            assert caplog.text.count(f"uffd: copy to {_NOWHERE:#x}:") == 1
            assert caplog.text.count(f"uffd: copy to {_NOWHERE + PAGE:#x}:") == 1
            h.decide._zero(region, _NOWHERE, 1)
            assert f"uffd: zero page at {_NOWHERE:#x}:" in caplog.text and not h.gone
            h.decide.answerer.wake(_NOWHERE, PAGE)  # no exception
            h.decide._fail(region, _NOWHERE, 1, LoadError(codes.IO_ERROR, "bad"))
        assert h.gone and "cannot poison" in caplog.text
    assert h.histogram.count == 2  # the zero page and the poison were answers (recorded)
