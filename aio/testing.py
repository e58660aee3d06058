"""The conformance suite every :class:`~aio.Queue` backend passes.

In the spirit of ``trio.testing.check_one_way_stream``: give it a factory and it
drives a fresh queue through the whole contract of :mod:`aio._base`::

    await aio.testing.check_queue(lambda capacity: MyQueue(capacity))

``make_queue(capacity)`` is called inside trio and must return a new, empty queue
of that capacity.  Each check is also available on its own (:data:`CHECKS`, by
name) so a test suite can report them separately.  A check raises
:class:`AssertionError` saying what broke; it creates its own files (in
``tempfile.gettempdir()``) and a memfd mapping, and removes them afterwards.

Also here, as test tools rather than part of :mod:`aio`'s main interface:
:class:`FaultInjectingQueue` (fails or shortens chosen requests, see
:func:`fail_offsets`), :class:`HangingQueue` (chosen requests never complete,
see :func:`hang_offsets`), :class:`DelayedQueue` (holds completions back), and two
stand-in probes that die the way a broken native binding does,
:func:`probe_killed_by_sigill` and :func:`probe_killed_by_sigsegv`
(``PAGELOAD_AIO_PROBE_URING=aio.testing:probe_killed_by_sigill``, see docs/AIO.md).

What is checked: reads at page-aligned offsets land in the mapping and equal the
file; readv scatters in order; short reads at end of file; errors as ``-errno``
(``-EBADF`` for a bad descriptor; ``-EIO`` injected by
:class:`FaultInjectingQueue` around the queue); capacity and
:class:`~aio.QueueFull`; 1000 requests through capacity 32, each completed once;
urgent requests; cancelled ``wait`` losing nothing; ``aclose`` with requests in
flight (including a read blocked on an empty pipe, where the backend accepts one)
leaving the buffers alone afterwards; :class:`~aio.QueueClosed` after close;
:meth:`~aio.Queue.statistics` consistent with what happened; :meth:`~aio.Queue.read_now`
reading exactly its buffer or declining, and never making a request; :data:`~aio.Op.COPY`
(where :attr:`~aio.Queue.copies` says the backend takes it: refused otherwise) copying
file to file at both offsets, larger than one pipe, short at end of file, ``-EBADF``
for a bad source or a read-only destination (whose bytes never leak into a later
copy), urgent or not, mixed with reads; :data:`~aio.Op.GATHER` (where
:attr:`~aio.Queue.gathers` says so: refused otherwise) reading ranges apart from their
own offsets, short at end of file with nothing read after the short range;
:data:`~aio.Op.CALL` (where :attr:`~aio.Queue.calls` says so: refused otherwise)
returning its callable's result, an urgent call started while normal ones wait, and
``aclose`` with calls running (:func:`check_calls`).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import signal
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import trio

from ._base import SPLICE_PIPE_BYTES, Completion, Queue, QueueClosed, QueueFull, Request
from ._wrappers import DelayedQueue, FaultInjectingQueue, FaultRule, HangingQueue, fail_offsets, hang_offsets

__all__ = [
    "CHECKS",
    "DelayedQueue",
    "FaultInjectingQueue",
    "FaultRule",
    "HangingQueue",
    "MakeQueue",
    "check_queue",
    "fail_offsets",
    "hang_offsets",
    "probe_killed_by_sigill",
    "probe_killed_by_sigsegv",
]

MakeQueue = Callable[[int], Queue]
PAGE = mmap.PAGESIZE
#: a descriptor number above the kernel's hard limit (fs.nr_open <= 2**30 - 64): never open
BAD_FD = 2**30
#: how long the close checks give stray writers to show themselves (not an assertion)
_GRACE = 0.05


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


@contextlib.contextmanager
def _pages_file(size: int, seed: int) -> Iterator[tuple[int, bytes]]:
    """A temporary file of ``size`` random bytes, open read-only: (fd, its bytes)."""
    data = random.Random(seed).randbytes(size)
    with tempfile.NamedTemporaryFile(prefix="aio-check-") as f:
        f.write(data)
        f.flush()
        fd = os.open(f.name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield fd, data
        finally:
            os.close(fd)


@contextlib.contextmanager
def _mapping(size: int) -> Iterator[memoryview]:
    """A shared mapping of a fresh memfd (as the daemon uses), zero-filled."""
    fd = os.memfd_create("aio-check", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    view = memoryview(mapping)
    try:
        yield view
    finally:
        view.release()
        with contextlib.suppress(BufferError):  # slices still referenced: the GC unmaps it
            mapping.close()


async def _drain(queue: Queue, into: list[Completion]) -> None:
    """Wait until nothing is outstanding, appending every completion to ``into``."""
    while queue.outstanding:
        into.extend(await queue.wait(1))


def _exactly_once(done: list[Completion], ids: set[int]) -> dict[int, int]:
    counts = Counter(c.id for c in done)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    _expect(not repeated, f"completions returned more than once: ids {repeated[:10]}")
    missing = sorted(ids - counts.keys())
    _expect(not missing, f"requests never completed: ids {missing[:10]}")
    extra = sorted(counts.keys() - ids)
    _expect(not extra, f"completions for ids never added: {extra[:10]}")
    return {c.id: c.result for c in done}


# -- the checks ------------------------------------------------------------------------
async def check_reads_into_mapping(make_queue: MakeQueue) -> None:
    """Reads at random page-aligned offsets land in the mapping, equal to the file."""
    rng = random.Random(1)
    with _pages_file(64 * PAGE, seed=1) as (fd, data), _mapping(128 * PAGE) as view:
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
            await _drain(queue, done)
        finally:
            await queue.aclose()
        results = _exactly_once(done, set(plan))
        written = bytearray(128 * PAGE)
        for i, (offset, dest, length) in plan.items():
            _expect(results[i] == length, f"request {i}: read {results[i]} bytes, not {length}")
            _expect(
                view[dest : dest + length] == data[offset : offset + length],
                f"request {i}: the mapping at {dest:#x} differs from the file at {offset:#x}",
            )
            written[dest : dest + length] = data[offset : offset + length]
        _expect(view == written, "bytes outside the requested windows were written")


async def check_readv_scatter(make_queue: MakeQueue) -> None:
    """One readv fills several destinations, in order, from consecutive file bytes."""
    with _pages_file(16 * PAGE, seed=2) as (fd, data), _mapping(16 * PAGE) as view:
        parts = [view[9 * PAGE : 11 * PAGE], view[2 * PAGE : 3 * PAGE], view[5 * PAGE : 8 * PAGE]]
        queue = make_queue(2)
        try:
            queue.add(Request.readv(7, fd, 4 * PAGE, parts))
            done: list[Completion] = []
            await _drain(queue, done)
        finally:
            await queue.aclose()
        _expect(done == [Completion(7, 6 * PAGE)], f"expected one full 6-page readv, got {done}")
        _expect(view[9 * PAGE : 11 * PAGE] == data[4 * PAGE : 6 * PAGE], "first part wrong")
        _expect(view[2 * PAGE : 3 * PAGE] == data[6 * PAGE : 7 * PAGE], "second part wrong")
        _expect(view[5 * PAGE : 8 * PAGE] == data[7 * PAGE : 10 * PAGE], "third part wrong")


async def check_short_read_at_eof(make_queue: MakeQueue) -> None:
    """A read crossing end of file returns the bytes that exist; at EOF it returns 0."""
    size = 10 * PAGE + 100
    with _pages_file(size, seed=3) as (fd, data), _mapping(4 * PAGE) as view:
        view[:] = b"\xee" * len(view)
        queue = make_queue(4)
        try:
            queue.add(Request.read(1, fd, 10 * PAGE, view[0 : 2 * PAGE]))
            queue.add(Request.readv(2, fd, 11 * PAGE, [view[2 * PAGE : 3 * PAGE]]))
            done: list[Completion] = []
            await _drain(queue, done)
        finally:
            await queue.aclose()
        results = _exactly_once(done, {1, 2})
        _expect(results[1] == 100, f"short read returned {results[1]}, not the 100 bytes left")
        _expect(results[2] == 0, f"a read past end of file returned {results[2]}, not 0")
        _expect(view[:100] == data[10 * PAGE :], "the 100 bytes before EOF are wrong")
        _expect(view[100 : 3 * PAGE] == b"\xee" * (3 * PAGE - 100), "bytes past EOF were written")


async def check_errors_as_negative_errno(make_queue: MakeQueue) -> None:
    """A bad descriptor completes with -EBADF; an injected EIO with -EIO, buffer untouched."""
    with _pages_file(8 * PAGE, seed=4) as (fd, data), _mapping(8 * PAGE) as view:
        queue = make_queue(4)
        try:
            queue.add(Request.read(1, BAD_FD, 0, view[0:PAGE]))
            queue.add(Request.read(2, fd, 0, view[PAGE : 2 * PAGE]))
            done: list[Completion] = []
            await _drain(queue, done)
        finally:
            await queue.aclose()
        results = _exactly_once(done, {1, 2})
        _expect(results[1] == -errno.EBADF, f"bad fd gave {results[1]}, not -EBADF")
        _expect(results[2] == PAGE, f"a good read next to it gave {results[2]}")

        view[:] = b"\xee" * len(view)
        faulty = FaultInjectingQueue(make_queue(4), fail_offsets(3 * PAGE, 4 * PAGE))
        try:
            for page in (2, 3, 4):
                faulty.add(Request.read(page, fd, page * PAGE, view[page * PAGE : (page + 1) * PAGE]))
            done = []
            await _drain(faulty, done)
        finally:
            await faulty.aclose()
        results = _exactly_once(done, {2, 3, 4})
        _expect(results[3] == -errno.EIO, f"injected EIO came back as {results[3]}")
        _expect(results[2] == results[4] == PAGE, f"neighbours of the fault: {results}")
        _expect(view[3 * PAGE : 4 * PAGE] == b"\xee" * PAGE, "a failed read wrote its buffer")
        _expect(view[4 * PAGE : 5 * PAGE] == data[4 * PAGE : 5 * PAGE], "a neighbour is wrong")


async def check_capacity(make_queue: MakeQueue) -> None:
    """``add`` raises QueueFull at capacity and accepts again once completions are returned."""
    with _pages_file(8 * PAGE, seed=5) as (fd, _), _mapping(8 * PAGE) as view:
        queue = make_queue(4)
        try:
            _expect(queue.capacity == 4, f"make_queue(4) gave capacity {queue.capacity}")
            for i in range(4):
                queue.add(Request.read(i, fd, i * PAGE, view[i * PAGE : (i + 1) * PAGE]))
            extra = Request.read(4, fd, 4 * PAGE, view[4 * PAGE : 5 * PAGE])
            try:
                queue.add(extra)
            except QueueFull:
                pass
            else:
                raise AssertionError("a fifth add to a queue of capacity 4 did not raise QueueFull")
            _expect(queue.outstanding == 4, f"outstanding is {queue.outstanding} after QueueFull")
            done = await queue.wait(1)
            queue.add(extra)  # a completion came back, so there is room again
            await _drain(queue, done)
            _exactly_once(done, {0, 1, 2, 3, 4})
        finally:
            await queue.aclose()


async def check_many_requests(make_queue: MakeQueue) -> None:
    """1000 requests through capacity 32: each completes exactly once with the right bytes."""
    count, file_pages = 1000, 256
    with _pages_file(file_pages * PAGE, seed=6) as (fd, data), _mapping(count * PAGE) as view:
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
            await _drain(queue, done)
        finally:
            await queue.aclose()
        results = _exactly_once(done, set(range(count)))
        for i in range(count):
            offset = (i * 37 % file_pages) * PAGE
            _expect(results[i] == PAGE, f"request {i} read {results[i]} bytes")
            _expect(view[i * PAGE : (i + 1) * PAGE] == data[offset : offset + PAGE], f"page {i} wrong")


async def check_urgent_requests(make_queue: MakeQueue) -> None:
    """Urgent requests mixed with normal ones are all served, exactly once, correctly."""
    with _pages_file(16 * PAGE, seed=7) as (fd, data), _mapping(16 * PAGE) as view:
        queue = make_queue(16)
        try:
            for i in range(16):
                queue.add(Request.read(i, fd, i * PAGE, view[i * PAGE : (i + 1) * PAGE], urgent=i % 4 == 3))
            done: list[Completion] = []
            await _drain(queue, done)
        finally:
            await queue.aclose()
        results = _exactly_once(done, set(range(16)))
        _expect(all(r == PAGE for r in results.values()), f"results {results}")
        _expect(view == data, "mapping differs from the file")


async def check_wait_cancelled_loses_nothing(make_queue: MakeQueue) -> None:
    """``wait`` is a checkpoint; cancelling it at any point loses no completion."""
    with _pages_file(64 * PAGE, seed=8) as (fd, _), _mapping(64 * PAGE) as view:
        queue = make_queue(64)
        done: list[Completion] = []
        try:
            for i in range(64):
                queue.add(Request.read(i, fd, i * PAGE, view[i * PAGE : (i + 1) * PAGE]))
            with trio.CancelScope() as scope:
                scope.cancel()
                done.extend(await queue.wait(1))
            _expect(scope.cancelled_caught, "wait() returned in a cancelled scope: not a checkpoint")

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
            await _drain(queue, done)
        finally:
            await queue.aclose()
        _exactly_once(done, set(range(64)))


async def _stray_writes_after_close(view: memoryview) -> bool:
    """Mark ``view``, give stray writers time, and say whether anything changed it."""
    view[:] = b"\x5a" * len(view)
    await trio.sleep(_GRACE)
    return view != b"\x5a" * len(view)


async def check_close_with_reads_in_flight(make_queue: MakeQueue) -> None:
    """``aclose`` with many reads started returns only when no buffer is written again."""
    size = 16 << 20
    with _pages_file(size, seed=9) as (fd, _), _mapping(size) as view:
        queue = make_queue(64)
        chunk = size // 64
        for i in range(64):
            queue.add(Request.read(i, fd, i * chunk, view[i * chunk : (i + 1) * chunk]))
        await queue.wait(1)  # the round that starts them
        await queue.aclose()
        _expect(queue.outstanding == 0, f"{queue.outstanding} outstanding after aclose")
        _expect(not await _stray_writes_after_close(view), "a buffer was written after aclose")


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
        with _mapping(PAGE) as view:
            view[:] = b"\xee" * PAGE
            queue = make_queue(2)
            queue.add(Request.read(1, read_end, 0, view[:PAGE]))
            answered: list[Completion] = []
            with trio.move_on_after(_GRACE):
                answered = await queue.wait(1)
            if answered:
                await queue.aclose()
                _expect(answered[0].id == 1, f"unexpected completion {answered}")
                _expect(
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
            _expect(not hung, "aclose did not return within 5 s with a read blocked on a pipe")
            os.write(write_end, payload)
            _expect(not await _stray_writes_after_close(view[:PAGE]), "buffer written after aclose")
            _expect(os.read(read_end, 2 * len(payload)) == payload, "a cancelled read took pipe data")
    finally:
        os.close(read_end)
        os.close(write_end)


async def check_use_after_close(make_queue: MakeQueue) -> None:
    """After ``aclose``: add and wait raise QueueClosed, aclose is idempotent."""
    with _mapping(PAGE) as view:
        queue = make_queue(2)
        await queue.aclose()
        _expect(queue.closed, "closed is False after aclose")
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
        _expect(queue.statistics().outstanding == 0, "statistics after close show requests")


async def check_statistics(make_queue: MakeQueue) -> None:
    """``statistics()`` matches what was added and returned."""
    with _pages_file(16 * PAGE, seed=10) as (fd, _), _mapping(16 * PAGE) as view:
        queue = make_queue(8)
        try:
            first = queue.statistics()
            _expect(first.backend == queue.name, f"backend {first.backend!r} != {queue.name!r}")
            _expect(first.capacity == 8, f"capacity {first.capacity}")
            _expect(
                (first.outstanding, first.ready, first.submitted_total, first.completed_total)
                == (0, 0, 0, 0),
                f"a fresh queue reports {first}",
            )
            for i in range(6):
                queue.add(Request.read(i, fd, i * PAGE, view[i * PAGE : (i + 1) * PAGE]))
            stats = queue.statistics()
            _expect(stats.outstanding == 6 and stats.submitted_total == 6, f"after 6 adds: {stats}")
            returned = len(await queue.wait(2))
            stats = queue.statistics()
            _expect(stats.completed_total == returned, f"{returned} returned, stats say {stats}")
            _expect(stats.outstanding == 6 - returned, f"{returned} returned, stats say {stats}")
            _expect(0 <= stats.ready <= stats.outstanding, f"ready out of range: {stats}")
            await _drain(queue, [])
            stats = queue.statistics()
            _expect(
                (stats.outstanding, stats.ready, stats.submitted_total, stats.completed_total)
                == (0, 0, 6, 6),
                f"after draining: {stats}",
            )
        finally:
            await queue.aclose()


async def check_completions_waiting(make_queue: MakeQueue) -> None:
    """``completions_waiting()`` is False on a fresh and on a drained queue, and True
    whenever completions are ready to be returned."""
    with _pages_file(8 * PAGE, seed=11) as (fd, _), _mapping(8 * PAGE) as view:
        queue = make_queue(8)
        try:
            _expect(not queue.completions_waiting(), "a fresh queue says completions are waiting")
            for i in range(4):
                queue.add(Request.read(i, fd, i * PAGE, view[i * PAGE : (i + 1) * PAGE]))
            with trio.move_on_after(0.5):
                while queue.statistics().ready == 0:
                    await trio.sleep(0.001)
            if queue.statistics().ready:  # (a backend may run reads only inside wait())
                _expect(queue.completions_waiting(), "completions are ready, completions_waiting() says none")
            await _drain(queue, [])
            _expect(not queue.completions_waiting(), "a drained queue says completions are waiting")
        finally:
            await queue.aclose()
        _expect(not queue.completions_waiting(), "a closed queue says completions are waiting")


@contextlib.contextmanager
def _memfd(size: int) -> Iterator[tuple[int, mmap.mmap]]:
    """A fresh memfd of ``size`` zero bytes, and a shared mapping to look at it."""
    fd = os.memfd_create("aio-check-copy", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mapping:
            yield fd, mapping
    finally:
        os.close(fd)


async def check_copies(make_queue: MakeQueue) -> None:
    """:data:`Op.COPY` copies file to file at both offsets (also more than one pipe
    holds, scattered over several destination ranges, urgent or not), short at end of
    file, ``-EBADF`` for a bad source or a read-only destination, whose bytes never
    reach a later copy; a backend that does not take it refuses it at :meth:`Queue.add`."""
    big = SPLICE_PIPE_BYTES * 2 + 3 * PAGE  # more than the pipe holds: several splices
    size = big + 16 * PAGE + 100
    with _pages_file(size, seed=12) as (fd, data), _memfd(big + 64 * PAGE) as (dest, mapping):
        queue = make_queue(8)
        try:
            if not queue.copies:
                try:
                    queue.add(Request.copy(1, fd, 0, dest, [(0, PAGE)]))
                except ValueError:
                    pass
                else:
                    raise AssertionError("a backend without copies took an Op.COPY request")
                _expect(queue.outstanding == 0, "a refused copy left a request outstanding")
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
                await _drain(queue, done)
                # after the refused destination: the pipe is clean, whichever worker copies
                later = {i: (i * PAGE, [((i + 3) * PAGE, PAGE)], PAGE) for i in range(8, 12)}
                for i, (src, dst, _) in later.items():
                    queue.add(Request.copy(i, fd, src, dest, dst))
                plan.update(later)
                await _drain(queue, done)
            finally:
                os.close(ro)
            results = _exactly_once(done, {*plan, 6, 7, 12})
            _expect(results[12] == 6 * PAGE, f"a gathered copy returned {results[12]}, not {6 * PAGE}")
            _expect(results[6] == -errno.EBADF, f"a copy from a bad descriptor returned {results[6]}, not -EBADF")
            _expect(results[7] == -errno.EBADF,
                    f"a copy into a read-only descriptor returned {results[7]}, not -EBADF")
            expected = bytearray(len(mapping))
            for i, (src, dst, result) in plan.items():
                _expect(results[i] == result, f"copy {i} returned {results[i]}, not {result}")
                left = result
                for offset, length in dst:
                    n = min(length, left)
                    expected[offset : offset + n] = data[src : src + n]
                    src += n
                    left -= n
            for offset, length in gathered:
                expected[offset : offset + length] = data[offset : offset + length]
            _expect(mapping[:] == expected, "the destination holds other bytes than the copies put there")
        finally:
            await queue.aclose()


async def check_gathers(make_queue: MakeQueue) -> None:
    """:data:`Op.GATHER` reads each range from its own offset into its buffer, urgent or
    not; short at end of file and failed (``-EBADF``) as one request: the bytes read in
    order up to the short range, nothing after it; refused at :meth:`Queue.add` by a
    backend that does not take it, and when its offsets are not ascending ranges apart;
    each range from its own file (``fds``), cut by a bad descriptor or a file's end."""
    size = 64 * PAGE + 100
    with _pages_file(size, seed=13) as (fd, data), _mapping(96 * PAGE) as view:
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
                _expect(queue.outstanding == 0, "a refused gather left a request outstanding")
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
            await _drain(queue, done)
            results = _exactly_once(done, {*plan, 5})
            _expect(results[5] == -errno.EBADF, f"a gather from a bad descriptor returned {results[5]}")
            expected = bytearray(len(view))
            for i, (pairs, result) in plan.items():
                _expect(results[i] == result, f"gather {i} returned {results[i]}, not {result}")
                left = result
                for offset, length in pairs:
                    n = max(0, min(length, left, size - offset))
                    expected[offset : offset + n] = data[offset : offset + n]
                    left -= n
            _expect(view[:] == expected, "the mapping holds other bytes than the gathers read there")
        finally:
            await queue.aclose()
    # more ranges than a small queue's ring holds (placed over several rounds), then a
    # close with such gathers in flight: nothing is written after aclose returns
    pages = 600
    with _pages_file(pages * PAGE, seed=14) as (fd, data), _mapping(pages * PAGE) as view:
        queue = make_queue(2)
        try:
            every_other = [(k * PAGE, PAGE) for k in range(0, pages, 2)]
            queue.add(Request.gather_read(1, fd, [view[o : o + n] for o, n in every_other],
                                          [o for o, _ in every_other]))
            done = []
            await _drain(queue, done)
            results = _exactly_once(done, {1})
            _expect(results[1] == len(every_other) * PAGE, f"a gather of {len(every_other)} ranges returned "
                    f"{results[1]}, not {len(every_other) * PAGE}")
            for o, n in every_other:
                _expect(view[o : o + n] == data[o : o + n], f"gathered range at {o:#x} differs from the file")
            _expect(view[PAGE : 2 * PAGE] == bytes(PAGE), "a gather wrote between its ranges")
            view[:] = bytes(len(view))
            odd = [(k * PAGE, PAGE) for k in range(1, pages, 2)]
            queue.add(Request.gather_read(2, fd, [view[o : o + n] for o, n in odd], [o for o, _ in odd]))
            queue.add(Request.gather_read(3, fd, [view[o : o + n] for o, n in every_other],
                                          [o for o, _ in every_other]))
        finally:
            await queue.aclose()
        after = bytes(view)
        await trio.sleep(0.05)
        _expect(bytes(view) == after, "the mapping changed after aclose returned")
    # each range from its own file (a source kept as many files): two files taken in
    # turn, offsets not ascending across them; a bad descriptor or a file's end cuts it
    with (_pages_file(8 * PAGE, seed=15) as (fd_a, data_a), _pages_file(4 * PAGE + 10, seed=16) as (fd_b, data_b),
          _mapping(16 * PAGE) as view):
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
            await _drain(queue, done)
            results = _exactly_once(done, {1, 2, 3})
            _expect(results == {1: 4 * PAGE, 2: PAGE, 3: 10},
                    f"gathers over two files returned {results}, not {4 * PAGE}, {PAGE} and 10")
            expected = bytearray(16 * PAGE)
            for fd, offset, m in spans + cut[:1]:
                expected[m : m + PAGE] = (data_a if fd == fd_a else data_b)[offset : offset + PAGE]
            expected[12 * PAGE : 12 * PAGE + 10] = data_b[4 * PAGE :]
            if view[10 * PAGE : 11 * PAGE] == data_b[:PAGE]:  # read at once with the failed one (io_uring)
                expected[10 * PAGE : 11 * PAGE] = data_b[:PAGE]  # though it does not count
            if view[13 * PAGE : 14 * PAGE] == data_a[:PAGE]:  # likewise after the short one
                expected[13 * PAGE : 14 * PAGE] = data_a[:PAGE]
            _expect(view[:] == expected, "the mapping holds other bytes than the gathers over two files read there")
        finally:
            await queue.aclose()


#: every check, by name, in the order :func:`check_queue` runs them
async def check_read_now(make_queue: MakeQueue) -> None:
    """``read_now`` reads exactly its buffer from the page cache, or declines (-1);
    either way it is no request: nothing outstanding, no completion, no slot taken."""
    with _pages_file(16 * PAGE, seed=9) as (fd, data), _mapping(16 * PAGE) as view:
        os.pread(fd, 16 * PAGE, 0)  # in the page cache
        queue = make_queue(4)
        try:
            got = queue.read_now(fd, view[2 * PAGE : 4 * PAGE], 5 * PAGE)
            _expect(got in (-1, 2 * PAGE), f"read_now returned {got}, not -1 or {2 * PAGE}")
            if got == 2 * PAGE:
                _expect(view[2 * PAGE : 4 * PAGE] == data[5 * PAGE : 7 * PAGE],
                        "read_now's bytes differ from the file")
            _expect(view[: 2 * PAGE] == bytes(2 * PAGE) and view[4 * PAGE :] == bytes(12 * PAGE),
                    "read_now wrote outside its buffer")
            _expect(queue.read_now(BAD_FD, view[:PAGE], 0) == -1, "read_now on a bad descriptor did not decline")
            stats = queue.statistics()
            _expect(queue.outstanding == 0 and stats.submitted_total == 0 and stats.ready == 0,
                    f"read_now left a request behind: {stats}")
        finally:
            await queue.aclose()
        _expect(queue.read_now(fd, view[:PAGE], 0) == -1, "read_now after close did not decline")


async def check_calls(make_queue: MakeQueue) -> None:
    """:data:`Op.CALL`: the callable runs once with the request's buffers, and its
    result is the completion's (bytes, short, ``-errno``; an exception is ``-EIO``; a
    count past the buffers is ``-EIO``); ``then`` runs after a full result only; an
    urgent call is started while normal calls wait (normal calls blocked until it has
    run do not block it); ``aclose`` with calls running returns only when no buffer
    is written again; refused at :meth:`Queue.add` by a backend that does not take it."""
    import threading
    import time
    from collections.abc import Sequence

    with _mapping(16 * PAGE) as view:
        queue = make_queue(16)
        try:
            if not queue.calls:
                try:
                    queue.add(Request.call(1, lambda buffers: 0, [view[:PAGE]]))
                except ValueError:
                    pass
                else:
                    raise AssertionError("a backend without calls took an Op.CALL request")
                _expect(queue.outstanding == 0, "a refused call left a request outstanding")
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
            await _drain(queue, done)
            results = _exactly_once(done, {1, 2, 3, 4, 5})
            _expect(results == {1: 2 * PAGE, 2: PAGE // 2, 3: -errno.ENOENT, 4: -errno.EIO, 5: -errno.EIO},
                    f"call results {results}")
            _expect(sorted(ran) == [1, 2, 3, 5], f"callables ran {sorted(ran)}, not once each")
            _expect(view[:PAGE] == b"\x01" * PAGE and view[2 * PAGE : 3 * PAGE] == b"\x01" * PAGE,
                    "a call's buffers do not hold what it wrote")
            _expect(thens == [1], f"then ran for calls {thens}, not only after the full one")

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
            await _drain(queue, done)
            results = _exactly_once(done, {*range(10, 16), 20})
            _expect(all(r == PAGE for r in results.values()),
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
        _expect(queue.outstanding == 0, f"{queue.outstanding} outstanding after aclose")
        _expect(not await _stray_writes_after_close(view), "a call wrote into its buffer after aclose")


CHECKS: dict[str, Callable[[MakeQueue], Awaitable[None]]] = {
    "read_now": check_read_now,
    "reads_into_mapping": check_reads_into_mapping,
    "readv_scatter": check_readv_scatter,
    "short_read_at_eof": check_short_read_at_eof,
    "errors_as_negative_errno": check_errors_as_negative_errno,
    "capacity": check_capacity,
    "many_requests": check_many_requests,
    "urgent_requests": check_urgent_requests,
    "wait_cancelled_loses_nothing": check_wait_cancelled_loses_nothing,
    "close_with_reads_in_flight": check_close_with_reads_in_flight,
    "close_with_blocked_read": check_close_with_blocked_read,
    "use_after_close": check_use_after_close,
    "statistics": check_statistics,
    "completions_waiting": check_completions_waiting,
    "copies": check_copies,
    "gathers": check_gathers,
    "calls": check_calls,
}


def _die_by(signum: signal.Signals) -> str:
    signal.signal(signum, signal.SIG_DFL)  # no Python handler (faulthandler) in the way
    signal.raise_signal(signum)
    return f"still alive after {signum.name}"  # only if the signal is blocked


def probe_killed_by_sigill(step: Callable[[str, str], None]) -> str | None:
    """A probe that dies by SIGILL while "creating a ring", as ``liburing`` 2026.x does on
    a CPU without AVX-512.  Run only in a probe child process (:mod:`aio._isolated`)."""
    step("liburing's binary", "creating a ring")
    return _die_by(signal.SIGILL)


def probe_killed_by_sigsegv(step: Callable[[str, str], None]) -> str | None:
    """A probe that dies by SIGSEGV while "creating a ring" (a binding with a memory bug).
    Run only in a probe child process (:mod:`aio._isolated`)."""
    step("liburing's binary", "creating a ring")
    return _die_by(signal.SIGSEGV)


async def check_queue(make_queue: MakeQueue) -> None:
    """Run every check in :data:`CHECKS` against queues from ``make_queue``."""
    for check in CHECKS.values():
        await check(make_queue)
