"""The conformance suite's checks of reads (:mod:`aio.testing`): reads and readv
landing where asked, short reads at end of file, errors as ``-errno``, capacity and
:class:`~aio.QueueFull`, many and urgent requests, and a cancelled ``wait``."""

from __future__ import annotations

import errno
import random

import trio

from ._base import Completion, QueueFull, Request
from ._check_tools import BAD_FD, PAGE, MakeQueue, drain, exactly_once, expect, memfd_view, pages_file
from ._wrappers import FaultInjectingQueue, fail_offsets


async def check_reads_into_mapping(make_queue: MakeQueue) -> None:
    """Reads at random page-aligned offsets land in the mapping, equal to the file."""
    rng = random.Random(1)
    with pages_file(64 * PAGE, seed=1) as (fd, data), memfd_view(128 * PAGE) as view:
        queue = make_queue(8)
        try:
            dests = rng.sample(range(0, 128, 4), 20)  # distinct 4-page windows
            plan = {}
            for i, dest in enumerate(dests):
                pages = rng.randint(1, 4)
                offset = rng.randrange(0, 64 - pages + 1) * PAGE
                plan[i] = (offset, dest * PAGE, pages * PAGE)
            done: list[Completion] = []
            for i, (offset, dest, length) in plan.items():
                if queue.outstanding == queue.capacity:
                    done.extend(await queue.wait(1))
                queue.add(Request.read(i, fd, offset, view[dest : dest + length]))
            await drain(queue, done)
        finally:
            await queue.aclose()
        results = exactly_once(done, set(plan))
        written = bytearray(128 * PAGE)
        for i, (offset, dest, length) in plan.items():
            expect(results[i] == length, f"request {i}: read {results[i]} bytes, not {length}")
            expect(
                view[dest : dest + length] == data[offset : offset + length],
                f"request {i}: the mapping at {dest:#x} differs from the file at {offset:#x}",
            )
            written[dest : dest + length] = data[offset : offset + length]
        expect(view == written, "bytes outside the requested windows were written")


async def check_readv_scatter(make_queue: MakeQueue) -> None:
    """One readv fills several destinations, in order, from consecutive file bytes."""
    with pages_file(16 * PAGE, seed=2) as (fd, data), memfd_view(16 * PAGE) as view:
        parts = [view[9 * PAGE : 11 * PAGE], view[2 * PAGE : 3 * PAGE], view[5 * PAGE : 8 * PAGE]]
        queue = make_queue(2)
        try:
            queue.add(Request.readv(7, fd, 4 * PAGE, parts))
            done: list[Completion] = []
            await drain(queue, done)
        finally:
            await queue.aclose()
        expect(done == [Completion(7, 6 * PAGE)], f"expected one full 6-page readv, got {done}")
        expect(view[9 * PAGE : 11 * PAGE] == data[4 * PAGE : 6 * PAGE], "first part wrong")
        expect(view[2 * PAGE : 3 * PAGE] == data[6 * PAGE : 7 * PAGE], "second part wrong")
        expect(view[5 * PAGE : 8 * PAGE] == data[7 * PAGE : 10 * PAGE], "third part wrong")


async def check_readv_most_buffers(make_queue: MakeQueue) -> None:
    """A readv with the queue's :attr:`~aio.Queue.max_buffers` buffers lands each part
    where asked; one with a buffer more is refused with ValueError at ``add`` (not a
    crash, not a completion), and the queue goes on."""
    piece = 16
    queue = make_queue(2)
    count = queue.max_buffers
    expect(1 <= count <= 1024, f"max_buffers is {count}")
    size = -(-count * piece // PAGE) * PAGE
    with pages_file(size, seed=5) as (fd, data), memfd_view(2 * size) as view:
        try:
            # every other piece of the mapping, last first: scattered and out of order
            parts = [view[2 * piece * (count - 1 - k) : 2 * piece * (count - 1 - k) + piece] for k in range(count)]
            refused = False
            try:
                queue.add(Request.readv(1, fd, 0, [*parts, view[-piece:]]))
            except ValueError:
                refused = True
            expect(refused, f"a readv of {count + 1} buffers was taken (max_buffers {count})")
            queue.add(Request.readv(2, fd, 0, parts))
            done: list[Completion] = []
            await drain(queue, done)
        finally:
            await queue.aclose()
        expect(done == [Completion(2, count * piece)], f"expected one full readv of {count} parts, got {done}")
        for k, part in enumerate(parts):
            expect(part == data[k * piece : (k + 1) * piece], f"part {k} of {count} wrong")
        expect(view[-piece:] == bytes(piece), "the refused readv wrote its last buffer")


async def check_short_read_at_eof(make_queue: MakeQueue) -> None:
    """A read crossing end of file returns the bytes that exist; at EOF it returns 0."""
    size = 10 * PAGE + 100
    with pages_file(size, seed=3) as (fd, data), memfd_view(4 * PAGE) as view:
        view[:] = b"\xee" * len(view)
        queue = make_queue(4)
        try:
            queue.add(Request.read(1, fd, 10 * PAGE, view[0 : 2 * PAGE]))
            queue.add(Request.readv(2, fd, 11 * PAGE, [view[2 * PAGE : 3 * PAGE]]))
            done: list[Completion] = []
            await drain(queue, done)
        finally:
            await queue.aclose()
        results = exactly_once(done, {1, 2})
        expect(results[1] == 100, f"short read returned {results[1]}, not the 100 bytes left")
        expect(results[2] == 0, f"a read past end of file returned {results[2]}, not 0")
        expect(view[:100] == data[10 * PAGE :], "the 100 bytes before EOF are wrong")
        expect(view[100 : 3 * PAGE] == b"\xee" * (3 * PAGE - 100), "bytes past EOF were written")


async def check_errors_as_negative_errno(make_queue: MakeQueue) -> None:
    """A bad descriptor completes with -EBADF; an injected EIO with -EIO, buffer untouched."""
    with pages_file(8 * PAGE, seed=4) as (fd, data), memfd_view(8 * PAGE) as view:
        queue = make_queue(4)
        try:
            queue.add(Request.read(1, BAD_FD, 0, view[0:PAGE]))
            queue.add(Request.read(2, fd, 0, view[PAGE : 2 * PAGE]))
            done: list[Completion] = []
            await drain(queue, done)
        finally:
            await queue.aclose()
        results = exactly_once(done, {1, 2})
        expect(results[1] == -errno.EBADF, f"bad fd gave {results[1]}, not -EBADF")
        expect(results[2] == PAGE, f"a good read next to it gave {results[2]}")

        view[:] = b"\xee" * len(view)
        faulty = FaultInjectingQueue(make_queue(4), fail_offsets(3 * PAGE, 4 * PAGE))
        try:
            for page in (2, 3, 4):
                faulty.add(Request.read(page, fd, page * PAGE, view[page * PAGE : (page + 1) * PAGE]))
            done = []
            await drain(faulty, done)
        finally:
            await faulty.aclose()
        results = exactly_once(done, {2, 3, 4})
        expect(results[3] == -errno.EIO, f"injected EIO came back as {results[3]}")
        expect(results[2] == results[4] == PAGE, f"neighbours of the fault: {results}")
        expect(view[3 * PAGE : 4 * PAGE] == b"\xee" * PAGE, "a failed read wrote its buffer")
        expect(view[4 * PAGE : 5 * PAGE] == data[4 * PAGE : 5 * PAGE], "a neighbour is wrong")


async def check_capacity(make_queue: MakeQueue) -> None:
    """``add`` raises QueueFull at capacity and accepts again once completions are returned."""
    with pages_file(8 * PAGE, seed=5) as (fd, _), memfd_view(8 * PAGE) as view:
        queue = make_queue(4)
        try:
            expect(queue.capacity == 4, f"make_queue(4) gave capacity {queue.capacity}")
            for i in range(4):
                queue.add(Request.read(i, fd, i * PAGE, view[i * PAGE : (i + 1) * PAGE]))
            extra = Request.read(4, fd, 4 * PAGE, view[4 * PAGE : 5 * PAGE])
            try:
                queue.add(extra)
            except QueueFull:
                pass
            else:
                raise AssertionError("a fifth add to a queue of capacity 4 did not raise QueueFull")
            expect(queue.outstanding == 4, f"outstanding is {queue.outstanding} after QueueFull")
            done = await queue.wait(1)
            queue.add(extra)  # a completion came back, so there is room again
            await drain(queue, done)
            exactly_once(done, {0, 1, 2, 3, 4})
        finally:
            await queue.aclose()


async def check_many_requests(make_queue: MakeQueue) -> None:
    """1000 requests through capacity 32: each completes exactly once with the right bytes."""
    count, file_pages = 1000, 256
    with pages_file(file_pages * PAGE, seed=6) as (fd, data), memfd_view(count * PAGE) as view:
        queue = make_queue(32)
        done: list[Completion] = []
        try:
            for i in range(count):
                while queue.outstanding >= queue.capacity:
                    done.extend(await queue.wait(1))
                offset = (i * 37 % file_pages) * PAGE
                queue.add(
                    Request.read(i, fd, offset, view[i * PAGE : (i + 1) * PAGE], urgent=i % 7 == 0)
                )
            await drain(queue, done)
        finally:
            await queue.aclose()
        results = exactly_once(done, set(range(count)))
        for i in range(count):
            offset = (i * 37 % file_pages) * PAGE
            expect(results[i] == PAGE, f"request {i} read {results[i]} bytes")
            expect(view[i * PAGE : (i + 1) * PAGE] == data[offset : offset + PAGE], f"page {i} wrong")


async def check_urgent_requests(make_queue: MakeQueue) -> None:
    """Urgent requests mixed with normal ones are all served, exactly once, correctly."""
    with pages_file(16 * PAGE, seed=7) as (fd, data), memfd_view(16 * PAGE) as view:
        queue = make_queue(16)
        try:
            for i in range(16):
                queue.add(Request.read(i, fd, i * PAGE, view[i * PAGE : (i + 1) * PAGE], urgent=i % 4 == 3))
            done: list[Completion] = []
            await drain(queue, done)
        finally:
            await queue.aclose()
        results = exactly_once(done, set(range(16)))
        expect(all(r == PAGE for r in results.values()), f"results {results}")
        expect(view == data, "mapping differs from the file")


async def check_wait_cancelled_loses_nothing(make_queue: MakeQueue) -> None:
    """``wait`` is a checkpoint; cancelling it at any point loses no completion."""
    with pages_file(64 * PAGE, seed=8) as (fd, _), memfd_view(64 * PAGE) as view:
        queue = make_queue(64)
        done: list[Completion] = []
        try:
            for i in range(64):
                queue.add(Request.read(i, fd, i * PAGE, view[i * PAGE : (i + 1) * PAGE]))
            with trio.CancelScope() as scope:
                scope.cancel()
                done.extend(await queue.wait(1))
            expect(scope.cancelled_caught, "wait() returned in a cancelled scope: not a checkpoint")

            # let completions pile up (where the backend works on its own), so that a
            # wrapper's work after the inner wait returns is also hit by the cancels
            for _ in range(200):
                if queue.statistics().ready >= queue.outstanding:
                    break
                await trio.sleep(0.001)

            async def wait_some(n: int) -> None:
                done.extend(await queue.wait(n))

            for yields in range(24):  # cancel after 0, 1, 2, ... scheduling rounds
                if not queue.outstanding:
                    break
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait_some, 1 if yields % 2 else queue.outstanding)
                    for _ in range(yields // 2):
                        await trio.sleep(0)
                    nursery.cancel_scope.cancel()
            await drain(queue, done)
        finally:
            await queue.aclose()
        exactly_once(done, set(range(64)))
