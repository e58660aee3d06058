"""The conformance suite's checks of a queue's life (:mod:`aio.testing`): ``aclose``
with reads in flight or blocked, use after close, ``statistics()`` and
``completions_waiting()``."""

from __future__ import annotations

import os

import trio

from ._base import Completion, QueueClosed, Request
from ._check_tools import GRACE, PAGE, MakeQueue, drain, expect, memfd_view, pages_file, stray_writes_after_close


async def check_close_with_reads_in_flight(make_queue: MakeQueue) -> None:
    """``aclose`` with many reads started returns only when no buffer is written again."""
    size = 16 << 20
    with pages_file(size, seed=9) as (fd, _), memfd_view(size) as view:
        queue = make_queue(64)
        chunk = size // 64
        for i in range(64):
            queue.add(Request.read(i, fd, i * chunk, view[i * chunk : (i + 1) * chunk]))
        await queue.wait(1)  # the round that starts them
        await queue.aclose()
        expect(queue.outstanding == 0, f"{queue.outstanding} outstanding after aclose")
        expect(not await stray_writes_after_close(view), "a buffer was written after aclose")


async def check_close_with_blocked_read(make_queue: MakeQueue) -> None:
    """A read blocked on an empty pipe is cancelled by ``aclose``, which returns.

    Backends built on ``preadv`` answer a pipe at once (``-ESPIPE``); then there is
    nothing in flight and only the answer is checked.  Where the read blocks, a
    watchdog writes to the pipe after 5 s so that a hung ``aclose`` fails instead
    of hanging; afterwards the pipe data must still be there and the buffer clean.
    """
    payload = b"late data" * 100
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        with memfd_view(PAGE) as view:
            view[:] = b"\xee" * PAGE
            queue = make_queue(2)
            queue.add(Request.read(1, read_end, 0, view[:PAGE]))
            answered: list[Completion] = []
            with trio.move_on_after(GRACE):
                answered = await queue.wait(1)
            if answered:
                await queue.aclose()
                expect(answered[0].id == 1, f"unexpected completion {answered}")
                expect(
                    answered[0].result < 0 or len(view[: answered[0].result]) == 0,
                    f"a read of an empty pipe returned {answered[0].result}",
                )
                return
            hung = False

            async def watchdog() -> None:
                nonlocal hung
                await trio.sleep(5)
                hung = True
                os.write(write_end, b"unstick")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watchdog)
                await queue.aclose()
                nursery.cancel_scope.cancel()
            expect(not hung, "aclose did not return within 5 s with a read blocked on a pipe")
            os.write(write_end, payload)
            expect(not await stray_writes_after_close(view[:PAGE]), "buffer written after aclose")
            expect(os.read(read_end, 2 * len(payload)) == payload, "a cancelled read took pipe data")
    finally:
        os.close(read_end)
        os.close(write_end)


async def check_use_after_close(make_queue: MakeQueue) -> None:
    """After ``aclose``: add and wait raise QueueClosed, aclose is idempotent."""
    with memfd_view(PAGE) as view:
        queue = make_queue(2)
        await queue.aclose()
        expect(queue.closed, "closed is False after aclose")
        try:
            queue.add(Request.read(1, 0, 0, view[:PAGE]))
        except QueueClosed:
            pass
        else:
            raise AssertionError("add after aclose did not raise QueueClosed")
        try:
            await queue.wait(0)
        except QueueClosed:
            pass
        else:
            raise AssertionError("wait after aclose did not raise QueueClosed")
        await queue.aclose()
        expect(queue.statistics().outstanding == 0, "statistics after close show requests")


async def check_statistics(make_queue: MakeQueue) -> None:
    """``statistics()`` matches what was added and returned."""
    with pages_file(16 * PAGE, seed=10) as (fd, _), memfd_view(16 * PAGE) as view:
        queue = make_queue(8)
        try:
            first = queue.statistics()
            expect(first.backend == queue.name, f"backend {first.backend!r} != {queue.name!r}")
            expect(first.capacity == 8, f"capacity {first.capacity}")
            expect(
                (first.outstanding, first.ready, first.submitted_total, first.completed_total)
                == (0, 0, 0, 0),
                f"a fresh queue reports {first}",
            )
            for i in range(6):
                queue.add(Request.read(i, fd, i * PAGE, view[i * PAGE : (i + 1) * PAGE]))
            stats = queue.statistics()
            expect(stats.outstanding == 6 and stats.submitted_total == 6, f"after 6 adds: {stats}")
            returned = len(await queue.wait(2))
            stats = queue.statistics()
            expect(stats.completed_total == returned, f"{returned} returned, stats say {stats}")
            expect(stats.outstanding == 6 - returned, f"{returned} returned, stats say {stats}")
            expect(0 <= stats.ready <= stats.outstanding, f"ready out of range: {stats}")
            await drain(queue, [])
            stats = queue.statistics()
            expect(
                (stats.outstanding, stats.ready, stats.submitted_total, stats.completed_total)
                == (0, 0, 6, 6),
                f"after draining: {stats}",
            )
        finally:
            await queue.aclose()


async def check_completions_waiting(make_queue: MakeQueue) -> None:
    """``completions_waiting()`` is False on a fresh and on a drained queue, and True
    whenever completions are ready to be returned."""
    with pages_file(8 * PAGE, seed=11) as (fd, _), memfd_view(8 * PAGE) as view:
        queue = make_queue(8)
        try:
            expect(not queue.completions_waiting(), "a fresh queue says completions are waiting")
            for i in range(4):
                queue.add(Request.read(i, fd, i * PAGE, view[i * PAGE : (i + 1) * PAGE]))
            with trio.move_on_after(0.5):
                while queue.statistics().ready == 0:
                    await trio.sleep(0.001)
            if queue.statistics().ready:  # (a backend may run reads only inside wait())
                expect(queue.completions_waiting(), "completions are ready, completions_waiting() says none")
            await drain(queue, [])
            expect(not queue.completions_waiting(), "a drained queue says completions are waiting")
        finally:
            await queue.aclose()
        expect(not queue.completions_waiting(), "a closed queue says completions are waiting")
