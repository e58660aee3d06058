"""The conformance suite's checks of the other operations (:mod:`aio.testing`):
``read_now``, :data:`~aio.Op.COPY`, :data:`~aio.Op.GATHER` and :data:`~aio.Op.CALL`."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence

import trio

from ._base import SPLICE_PIPE_BYTES, Completion, Request
from ._check_tools import (
    BAD_FD,
    PAGE,
    MakeQueue,
    drain,
    exactly_once,
    expect,
    memfd_file,
    memfd_view,
    pages_file,
    stray_writes_after_close,
)


async def check_read_now(make_queue: MakeQueue) -> None:
    """``read_now`` reads exactly its buffer from the page cache, or declines (-1);
    either way it is no request: nothing outstanding, no completion, no slot taken."""
    with pages_file(16 * PAGE, seed=9) as (fd, data), memfd_view(16 * PAGE) as view:
        os.pread(fd, 16 * PAGE, 0)  # in the page cache
        queue = make_queue(4)
        try:
            got = queue.read_now(fd, view[2 * PAGE : 4 * PAGE], 5 * PAGE)
            expect(got in (-1, 2 * PAGE), f"read_now returned {got}, not -1 or {2 * PAGE}")
            if got == 2 * PAGE:
                expect(view[2 * PAGE : 4 * PAGE] == data[5 * PAGE : 7 * PAGE],
                        "read_now's bytes differ from the file")
            expect(view[: 2 * PAGE] == bytes(2 * PAGE) and view[4 * PAGE :] == bytes(12 * PAGE),
                    "read_now wrote outside its buffer")
            expect(queue.read_now(BAD_FD, view[:PAGE], 0) == -1, "read_now on a bad descriptor did not decline")
            # read_now_v: the file's bytes from one offset, one buffer after the other,
            # each at its own place (a verified chunk's pieces in memory), or declined
            view[: 2 * PAGE] = bytes(2 * PAGE)
            parts = [view[8 * PAGE : 9 * PAGE], view[11 * PAGE : 13 * PAGE], view[PAGE : 2 * PAGE]]
            got = queue.read_now_v(fd, parts, 3 * PAGE)
            expect(got in (-1, 4 * PAGE), f"read_now_v returned {got}, not -1 or {4 * PAGE}")
            if got == 4 * PAGE:
                expect(view[8 * PAGE : 9 * PAGE] == data[3 * PAGE : 4 * PAGE]
                       and view[11 * PAGE : 13 * PAGE] == data[4 * PAGE : 6 * PAGE]
                       and view[PAGE : 2 * PAGE] == data[6 * PAGE : 7 * PAGE],
                       "read_now_v's bytes are not the file's, in order")
            got = queue.read_now_v(fd, [view[14 * PAGE : 15 * PAGE], view[15 * PAGE : 16 * PAGE]], 15 * PAGE)
            expect(got in (-1, PAGE), f"read_now_v across the end of the file returned {got}, not -1 or {PAGE}")
            expect(queue.read_now_v(BAD_FD, parts, 0) == -1, "read_now_v on a bad descriptor did not decline")
            stats = queue.statistics()
            expect(queue.outstanding == 0 and stats.submitted_total == 0 and stats.ready == 0,
                    f"read_now left a request behind: {stats}")
        finally:
            await queue.aclose()
        expect(queue.read_now(fd, view[:PAGE], 0) == -1, "read_now after close did not decline")
        expect(queue.read_now_v(fd, [view[:PAGE], view[2 * PAGE : 3 * PAGE]], 0) == -1,
               "read_now_v after close did not decline")


async def check_copies(make_queue: MakeQueue) -> None:
    """:data:`Op.COPY` copies file to file at both offsets (also more than one pipe
    holds, scattered over several destination ranges, urgent or not), short at end of
    file, ``-EBADF`` for a bad source or a read-only destination, whose bytes never
    reach a later copy; a backend that does not take it refuses it at :meth:`Queue.add`."""
    big = SPLICE_PIPE_BYTES * 2 + 3 * PAGE  # more than the pipe holds: several splices
    size = big + 16 * PAGE + 100
    with pages_file(size, seed=12) as (fd, data), memfd_file(big + 64 * PAGE) as (dest, mapping):
        queue = make_queue(8)
        try:
            if not queue.copies:
                try:
                    queue.add(Request.copy(1, fd, 0, dest, [(0, PAGE)]))
                except ValueError:
                    pass
                else:
                    raise AssertionError("a backend without copies took an Op.COPY request")
                expect(queue.outstanding == 0, "a refused copy left a request outstanding")
                return
            ro = os.open(f"/proc/self/fd/{dest}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                plan = {  # id: (source offset, [(destination offset, length)], expected result)
                    1: (PAGE, [(40 * PAGE, big)], big),
                    2: (0, [(3 * PAGE, 2 * PAGE)], 2 * PAGE),
                    3: (big + 15 * PAGE, [(big + 20 * PAGE, 4 * PAGE)], PAGE + 100),  # crosses the end
                    4: (size + PAGE, [(big + 30 * PAGE, PAGE)], 0),  # past the end
                    # scattered over three ranges, out of memory order
                    5: (7 * PAGE, [(big + 50 * PAGE, 2 * PAGE), (36 * PAGE, PAGE),
                                   (big + 40 * PAGE, 3 * PAGE)], 6 * PAGE),
                }
                for i, (src, dst, _) in plan.items():
                    queue.add(Request.copy(i, fd, src, dest, dst, urgent=i == 2))
                # a gather: each range from the same offset of the source (a raw image)
                gathered = [(20 * PAGE, PAGE), (25 * PAGE, 2 * PAGE), (big + 10 * PAGE, 3 * PAGE)]
                queue.add(Request.copy(12, fd, 20 * PAGE, dest, gathered, gather=True))
                queue.add(Request.copy(6, BAD_FD, 0, dest, [(8 * PAGE, PAGE)]))
                queue.add(Request.copy(7, fd, 0, ro, [(9 * PAGE, 2 * PAGE)]))  # into the pipe, then refused
                done: list[Completion] = []
                await drain(queue, done)
                # after the refused destination: the pipe is clean, whichever worker copies
                later = {i: (i * PAGE, [((i + 3) * PAGE, PAGE)], PAGE) for i in range(8, 12)}
                for i, (src, dst, _) in later.items():
                    queue.add(Request.copy(i, fd, src, dest, dst))
                plan.update(later)
                await drain(queue, done)
            finally:
                os.close(ro)
            results = exactly_once(done, {*plan, 6, 7, 12})
            expect(results[12] == 6 * PAGE, f"a gathered copy returned {results[12]}, not {6 * PAGE}")
            expect(results[6] == -errno.EBADF, f"a copy from a bad descriptor returned {results[6]}, not -EBADF")
            expect(results[7] == -errno.EBADF,
                    f"a copy into a read-only descriptor returned {results[7]}, not -EBADF")
            expected = bytearray(len(mapping))
            for i, (src, dst, result) in plan.items():
                expect(results[i] == result, f"copy {i} returned {results[i]}, not {result}")
                left = result
                for offset, length in dst:
                    n = min(length, left)
                    expected[offset : offset + n] = data[src : src + n]
                    src += n
                    left -= n
            for offset, length in gathered:
                expected[offset : offset + length] = data[offset : offset + length]
            expect(mapping[:] == expected, "the destination holds other bytes than the copies put there")
        finally:
            await queue.aclose()


async def check_gathers(make_queue: MakeQueue) -> None:
    """:data:`Op.GATHER` reads each range from its own offset into its buffer, urgent or
    not; short at end of file and failed (``-EBADF``) as one request: the bytes read in
    order up to the short range, nothing after it; refused at :meth:`Queue.add` by a
    backend that does not take it, and when its offsets are not ascending ranges apart;
    each range from its own file (``fds``), cut by a bad descriptor or a file's end."""
    size = 64 * PAGE + 100
    with pages_file(size, seed=13) as (fd, data), memfd_view(96 * PAGE) as view:
        queue = make_queue(8)
        try:
            def ranges(pairs: list[tuple[int, int]]) -> tuple[list[memoryview], list[int]]:
                return [view[o : o + n] for o, n in pairs], [o for o, _ in pairs]

            if not queue.gathers:
                try:
                    queue.add(Request.gather_read(1, fd, *ranges([(0, PAGE)])))
                except ValueError:
                    pass
                else:
                    raise AssertionError("a backend without gathers took an Op.GATHER request")
                expect(queue.outstanding == 0, "a refused gather left a request outstanding")
                return
            for bad in ([(4 * PAGE, PAGE), (2 * PAGE, PAGE)], [(2 * PAGE, 2 * PAGE), (3 * PAGE, PAGE)]):
                try:
                    queue.add(Request.gather_read(9, fd, *ranges(bad)))
                except ValueError:
                    pass
                else:
                    raise AssertionError(f"a gather over {bad} (not ascending ranges apart) was taken")
            plan = {  # id: ([(offset, length)], expected result)
                1: ([(PAGE, PAGE), (5 * PAGE, 3 * PAGE), (20 * PAGE, 2 * PAGE)], 6 * PAGE),
                2: ([(10 * PAGE, PAGE), (12 * PAGE, PAGE)], 2 * PAGE),  # urgent
                # the second range crosses the end of the file: the third is not read
                3: ([(30 * PAGE, PAGE), (63 * PAGE, 2 * PAGE), (70 * PAGE, PAGE)], PAGE + PAGE + 100),
                4: ([(80 * PAGE, PAGE)], 0),  # past the end
            }
            for i, (pairs, _) in plan.items():
                queue.add(Request.gather_read(i, fd, *ranges(pairs), urgent=i == 2))
            queue.add(Request.gather_read(5, BAD_FD, *ranges([(90 * PAGE, PAGE)])))
            done: list[Completion] = []
            await drain(queue, done)
            results = exactly_once(done, {*plan, 5})
            expect(results[5] == -errno.EBADF, f"a gather from a bad descriptor returned {results[5]}")
            expected = bytearray(len(view))
            for i, (pairs, result) in plan.items():
                expect(results[i] == result, f"gather {i} returned {results[i]}, not {result}")
                left = result
                for offset, length in pairs:
                    n = max(0, min(length, left, size - offset))
                    expected[offset : offset + n] = data[offset : offset + n]
                    left -= n
            expect(view[:] == expected, "the mapping holds other bytes than the gathers read there")
        finally:
            await queue.aclose()
    # more ranges than a small queue's ring holds (placed over several rounds), then a
    # close with such gathers in flight: nothing is written after aclose returns
    pages = 600
    with pages_file(pages * PAGE, seed=14) as (fd, data), memfd_view(pages * PAGE) as view:
        queue = make_queue(2)
        try:
            every_other = [(k * PAGE, PAGE) for k in range(0, pages, 2)]
            queue.add(Request.gather_read(1, fd, [view[o : o + n] for o, n in every_other],
                                          [o for o, _ in every_other]))
            done = []
            await drain(queue, done)
            results = exactly_once(done, {1})
            expect(results[1] == len(every_other) * PAGE, f"a gather of {len(every_other)} ranges returned "
                    f"{results[1]}, not {len(every_other) * PAGE}")
            for o, n in every_other:
                expect(view[o : o + n] == data[o : o + n], f"gathered range at {o:#x} differs from the file")
            expect(view[PAGE : 2 * PAGE] == bytes(PAGE), "a gather wrote between its ranges")
            view[:] = bytes(len(view))
            odd = [(k * PAGE, PAGE) for k in range(1, pages, 2)]
            queue.add(Request.gather_read(2, fd, [view[o : o + n] for o, n in odd], [o for o, _ in odd]))
            queue.add(Request.gather_read(3, fd, [view[o : o + n] for o, n in every_other],
                                          [o for o, _ in every_other]))
        finally:
            await queue.aclose()
        after = bytes(view)
        await trio.sleep(0.05)
        expect(bytes(view) == after, "the mapping changed after aclose returned")
    # each range from its own file (a source kept as many files): two files taken in
    # turn, offsets not ascending across them; a bad descriptor or a file's end cuts it
    with (pages_file(8 * PAGE, seed=15) as (fd_a, data_a), pages_file(4 * PAGE + 10, seed=16) as (fd_b, data_b),
          memfd_view(16 * PAGE) as view):
        queue = make_queue(4)
        try:
            spans = [(fd_a, 6 * PAGE, 0), (fd_b, 0, PAGE), (fd_a, 2 * PAGE, 2 * PAGE), (fd_b, 3 * PAGE, 4 * PAGE)]
            queue.add(Request.gather_read(1, -1, [view[m : m + PAGE] for _, _, m in spans],
                                          [o for _, o, _ in spans], fds=[f for f, _, _ in spans]))
            cut = [(fd_a, PAGE, 8 * PAGE), (BAD_FD, 0, 9 * PAGE), (fd_b, 0, 10 * PAGE)]
            queue.add(Request.gather_read(2, -1, [view[m : m + PAGE] for _, _, m in cut],
                                          [o for _, o, _ in cut], fds=[f for f, _, _ in cut], urgent=True))
            short = [(fd_b, 4 * PAGE, 12 * PAGE), (fd_a, 0, 13 * PAGE)]
            queue.add(Request.gather_read(3, -1, [view[m : m + PAGE] for _, _, m in short],
                                          [o for _, o, _ in short], fds=[f for f, _, _ in short]))
            done = []
            await drain(queue, done)
            results = exactly_once(done, {1, 2, 3})
            expect(results == {1: 4 * PAGE, 2: PAGE, 3: 10},
                    f"gathers over two files returned {results}, not {4 * PAGE}, {PAGE} and 10")
            expected = bytearray(16 * PAGE)
            for fd, offset, m in spans + cut[:1]:
                expected[m : m + PAGE] = (data_a if fd == fd_a else data_b)[offset : offset + PAGE]
            expected[12 * PAGE : 12 * PAGE + 10] = data_b[4 * PAGE :]
            if view[10 * PAGE : 11 * PAGE] == data_b[:PAGE]:  # read at once with the failed one (io_uring)
                expected[10 * PAGE : 11 * PAGE] = data_b[:PAGE]  # though it does not count
            if view[13 * PAGE : 14 * PAGE] == data_a[:PAGE]:  # likewise after the short one
                expected[13 * PAGE : 14 * PAGE] = data_a[:PAGE]
            expect(view[:] == expected, "the mapping holds other bytes than the gathers over two files read there")
        finally:
            await queue.aclose()


async def check_calls(make_queue: MakeQueue) -> None:
    """:data:`Op.CALL`: the callable runs once with the request's buffers, and its
    result is the completion's (bytes, short, ``-errno``; an exception is ``-EIO``; a
    count past the buffers is ``-EIO``); ``then`` runs after a full result only; an
    urgent call is started while normal calls wait (normal calls blocked until it has
    run do not block it); ``aclose`` with calls running returns only when no buffer
    is written again; refused at :meth:`Queue.add` by a backend that does not take it."""
    import threading
    import time

    with memfd_view(16 * PAGE) as view:
        queue = make_queue(16)
        try:
            if not queue.calls:
                try:
                    queue.add(Request.call(1, lambda buffers: 0, [view[:PAGE]]))
                except ValueError:
                    pass
                else:
                    raise AssertionError("a backend without calls took an Op.CALL request")
                expect(queue.outstanding == 0, "a refused call left a request outstanding")
                return
            ran: list[int] = []
            thens: list[int] = []

            def filler(tag: int, result: int | None = None) -> Callable[[Sequence[memoryview]], int]:
                def fn(buffers: Sequence[memoryview]) -> int:
                    ran.append(tag)
                    n = 0
                    for b in buffers:
                        b[:] = bytes([tag]) * len(b)
                        n += len(b)
                    return n if result is None else result
                return fn

            def boom(buffers: Sequence[memoryview]) -> int:
                raise RuntimeError("the callable failed")

            def then_of(tag: int) -> Callable[[], None]:
                return lambda: thens.append(tag)

            queue.add(Request.call(1, filler(1), [view[:PAGE], view[2 * PAGE : 3 * PAGE]], then=then_of(1)))
            queue.add(Request.call(2, filler(2, PAGE // 2), [view[4 * PAGE : 5 * PAGE]], then=then_of(2)))
            queue.add(Request.call(3, filler(3, -errno.ENOENT), [view[6 * PAGE : 7 * PAGE]], then=then_of(3)))
            queue.add(Request.call(4, boom, [view[8 * PAGE : 9 * PAGE]], urgent=True))
            queue.add(Request.call(5, filler(5, 3 * PAGE), [view[10 * PAGE : 11 * PAGE]]))
            done: list[Completion] = []
            await drain(queue, done)
            results = exactly_once(done, {1, 2, 3, 4, 5})
            expect(results == {1: 2 * PAGE, 2: PAGE // 2, 3: -errno.ENOENT, 4: -errno.EIO, 5: -errno.EIO},
                    f"call results {results}")
            expect(sorted(ran) == [1, 2, 3, 5], f"callables ran {sorted(ran)}, not once each")
            expect(view[:PAGE] == b"\x01" * PAGE and view[2 * PAGE : 3 * PAGE] == b"\x01" * PAGE,
                    "a call's buffers do not hold what it wrote")
            expect(thens == [1], f"then ran for calls {thens}, not only after the full one")

            # urgent first: normal calls that wait for the urgent one to have run
            gate = threading.Event()

            def blocked(buffers: Sequence[memoryview]) -> int:
                return PAGE if gate.wait(5.0) else -errno.ETIMEDOUT

            def opener(buffers: Sequence[memoryview]) -> int:
                gate.set()
                return PAGE

            for i in range(6):
                queue.add(Request.call(10 + i, blocked, [view[i * PAGE : (i + 1) * PAGE]]))
            queue.add(Request.call(20, opener, [view[8 * PAGE : 9 * PAGE]], urgent=True))
            done = []
            await drain(queue, done)
            results = exactly_once(done, {*range(10, 16), 20})
            expect(all(r == PAGE for r in results.values()),
                    f"an urgent call did not start while normal calls waited: {results}")
        finally:
            await queue.aclose()

        # close with calls running: none writes into its buffer after aclose returns
        queue = make_queue(16)

        def slow(buffers: Sequence[memoryview]) -> int:
            time.sleep(0.02)
            for b in buffers:
                b[:] = b"\xa5" * len(b)
            return PAGE

        for i in range(16):
            queue.add(Request.call(i, slow, [view[i * PAGE : (i + 1) * PAGE]], urgent=i % 5 == 0))
        await queue.wait(1)
        await queue.aclose()
        expect(queue.outstanding == 0, f"{queue.outstanding} outstanding after aclose")
        expect(not await stray_writes_after_close(view), "a call wrote into its buffer after aclose")
