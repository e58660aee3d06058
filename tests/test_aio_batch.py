"""Gathers in batches through a ring of io_uring's (aio._batch): the same bytes and the
same results as one pread a range, checked against them; where rings cannot be used,
gathers read range by range and the reason is one line."""

from __future__ import annotations

import errno
import mmap
import os
import random

import pytest

import aio
from aio import _batch
from aio._base import _gather_read

pytestmark = pytest.mark.skipif(_batch.unavailable() is not None,
                                reason=f"io_uring rings cannot be used here: {_batch.unavailable()}")

PAGE = 4096


@pytest.fixture
def image(tmp_path):
    """A 16 MiB file of random bytes (its size not a whole number of pages: a read of its
    last page is short)."""
    path = tmp_path / "image"
    data = random.Random(7).randbytes(4096 * PAGE - 100)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def _mapping(size: int) -> tuple[mmap.mmap, memoryview]:
    m = mmap.mmap(-1, size)
    return m, memoryview(m)


def _ranges(rng: random.Random, count: int, limit: int) -> tuple[list[int], list[int]]:
    """``count`` ascending ranges apart, page-aligned, of 1-3 pages, below ``limit``."""
    offsets, lengths, at = [], [], 0
    while len(offsets) < count:
        at += rng.randrange(0, 3) * PAGE
        n = rng.randrange(1, 4) * PAGE
        if at + n > limit:
            break
        offsets.append(at)
        lengths.append(n)
        at += n + PAGE
    return offsets, lengths


def test_a_ring_reads_each_range_to_its_address(image):
    fd, data = image
    ring = _batch.BatchRing(16)
    m, view = _mapping(len(data) + PAGE)
    try:
        import numpy

        base = numpy.frombuffer(view, dtype=numpy.uint8).ctypes.data
        offsets = [0, 5 * PAGE, 9 * PAGE, 4095 * PAGE]
        lengths = [PAGE, 2 * PAGE, PAGE, PAGE]
        results = list(ring.read(fd, [base + o for o in offsets], lengths, offsets))
        assert results[:3] == lengths[:3]
        assert results[3] == len(data) - 4095 * PAGE  # short: the file ends
        for o, n in zip(offsets, results):
            assert view[o : o + n] == data[o : o + n]
        assert view[PAGE : 2 * PAGE] == bytes(PAGE)  # nothing between the ranges
        bad = list(ring.read(-1, [base], [PAGE], [0]))  # the next batch reuses the slots
        assert bad == [-errno.EBADF]
        with pytest.raises(ValueError):
            ring.read(fd, [base] * 17, [PAGE] * 17, [0] * 17)
    finally:
        ring.close()
        del base
        view.release()
        m.close()


@pytest.mark.parametrize("count", [1, 7, _batch.BATCH_ENTRIES, 600])
def test_gather_through_a_ring_matches_one_pread_a_range(image, count):
    """Bytes and result as the range-by-range loop's, for gathers of one batch, of a
    full one and of several (600 ranges: three turns of the ring)."""
    fd, data = image
    offsets, lengths = _ranges(random.Random(count), count, len(data) // PAGE * PAGE)
    assert len(offsets) == count
    size = offsets[-1] + lengths[-1]
    results = []
    for within in (True, False):
        m, view = _mapping(size)
        try:
            buffers = [view[o : o + n] for o, n in zip(offsets, lengths)]
            results.append(_gather_read(aio.Request.gather_read(0, fd, buffers, offsets,
                                                                within=view if within else None)))
            assert results[-1] == sum(lengths)
            for o, n in zip(offsets, lengths):
                assert view[o : o + n] == data[o : o + n]
            del buffers
        finally:
            view.release()
            m.close()
    assert results[0] == results[1]


def test_a_short_range_ends_the_count_as_the_loop_does(image):
    """A range the file ends in, then ranges past its end: the count stops at the short
    one, through the ring as range by range."""
    fd, data = image
    end = len(data) // PAGE * PAGE
    offsets = [0, 2 * PAGE, end, end + 2 * PAGE]
    lengths = [PAGE, PAGE, PAGE, PAGE]
    counts = []
    for within in (True, False):
        m, view = _mapping(end + 4 * PAGE)
        try:
            buffers = [view[o : o + n] for o, n in zip(offsets, lengths)]
            counts.append(_gather_read(aio.Request.gather_read(0, fd, buffers, offsets,
                                                                within=view if within else None)))
            del buffers
        finally:
            view.release()
            m.close()
    assert counts[0] == counts[1] == 2 * PAGE + len(data) - end


def test_a_failing_first_range_is_its_errno(image):
    m, view = _mapping(4 * PAGE)
    try:
        buffers = [view[0:PAGE], view[2 * PAGE : 3 * PAGE]]
        w = os.open("/dev/null", os.O_WRONLY)  # not open for reading: EBADF
        try:
            got = _gather_read(aio.Request.gather_read(0, w, buffers, [0, 2 * PAGE], within=view))
        finally:
            os.close(w)
        assert got == -errno.EBADF
        del buffers
    finally:
        view.release()
        m.close()


async def test_the_queue_refuses_a_within_that_does_not_hold_the_ranges(image):
    fd, _ = image
    queue = aio.open_queue("threads", 4)
    view = memoryview(bytearray(4 * PAGE))
    bufs = [view[0:PAGE], view[2 * PAGE : 3 * PAGE]]
    try:
        for within in (view[: 2 * PAGE], view.toreadonly()):  # too short for the second range; read-only
            with pytest.raises(ValueError, match="within"):
                queue.add(aio.Request.gather_read(0, fd, bufs, [0, 2 * PAGE], within=within))
        with pytest.raises(ValueError, match="within"):
            queue.add(aio.Request.gather_read(0, fd, bufs, [0, 2 * PAGE], fds=[fd, fd], within=view))
        queue.add(aio.Request.gather_read(5, fd, bufs, [0, 2 * PAGE], within=view))  # the right one is taken
        assert [(c.id, c.result) for c in await queue.wait(1)] == [(5, 2 * PAGE)]
    finally:
        await queue.aclose()


def test_a_read_the_ring_fails_is_read_again_range_by_range(image, monkeypatch):
    """The ring only makes a gather faster: where a read through it fails (EINVAL, say,
    a file the ring cannot read), the gather is read again range by range, and what
    that finds is its result."""
    fd, data = image
    ring = _batch.thread_ring()
    real = type(ring).read

    def failing(self, fds, addresses, lengths, offsets):
        results = real(self, fds, addresses, lengths, offsets)
        results[1] = -errno.EINVAL
        return results

    monkeypatch.setattr(type(ring), "read", failing)
    m, view = _mapping(8 * PAGE)
    try:
        buffers = [view[0:PAGE], view[3 * PAGE : 5 * PAGE], view[6 * PAGE : 7 * PAGE]]
        got = _gather_read(aio.Request.gather_read(0, fd, buffers, [0, 3 * PAGE, 6 * PAGE], within=view))
        assert got == 4 * PAGE
        assert view[3 * PAGE : 5 * PAGE] == data[3 * PAGE : 5 * PAGE]
        assert view[6 * PAGE : 7 * PAGE] == data[6 * PAGE : 7 * PAGE]
        del buffers
    finally:
        view.release()
        m.close()


def test_without_rings_gathers_read_range_by_range(image, monkeypatch):
    """No ring (io_uring disabled, say): the same gather reads range by range, and no
    thread makes a ring."""
    fd, data = image
    monkeypatch.setattr(_batch, "_reason", ["io_uring is disabled on this host"])
    monkeypatch.setattr(_batch, "_local", type(_batch._local)())
    made = []
    monkeypatch.setattr(_batch, "BatchRing", lambda *a: made.append(a))
    m, view = _mapping(8 * PAGE)
    try:
        buffers = [view[0:PAGE], view[3 * PAGE : 5 * PAGE]]
        assert _gather_read(aio.Request.gather_read(0, fd, buffers, [0, 3 * PAGE], within=view)) == 3 * PAGE
        assert view[3 * PAGE : 5 * PAGE] == data[3 * PAGE : 5 * PAGE]
        assert made == [] and _batch.thread_ring() is None
        del buffers
    finally:
        view.release()
        m.close()


def test_why_not_is_one_line(monkeypatch):
    def refuse(*args):
        raise OSError(errno.ENOSYS, "io_uring_setup: Function not implemented")

    monkeypatch.setattr(_batch, "BatchRing", refuse)
    why = _batch._probe()
    assert why is not None and "\n" not in why and "ENOSYS" in why


def test_each_thread_has_its_own_ring():
    import threading

    rings = [_batch.thread_ring()]
    t = threading.Thread(target=lambda: rings.append(_batch.thread_ring()))
    t.start()
    t.join()
    assert rings[0] is not None and rings[1] is not None and rings[0] is not rings[1]
    assert _batch.thread_ring() is rings[0]
