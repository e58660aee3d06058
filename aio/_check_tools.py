"""What the conformance suite's checks (:mod:`aio.testing`) share: the files and
mappings they read into, draining a queue, and checking each request completed once."""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator

import trio

from ._base import Completion, Queue

#: ``make_queue(capacity)``: a new, empty queue of that capacity (called inside trio)
MakeQueue = Callable[[int], Queue]
PAGE = mmap.PAGESIZE
#: a descriptor number above the kernel's hard limit (fs.nr_open <= 2**30 - 64): never open
BAD_FD = 2**30
#: how long the close checks give stray writers to show themselves (not an assertion)
GRACE = 0.05


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


@contextlib.contextmanager
def pages_file(size: int, seed: int) -> Iterator[tuple[int, bytes]]:
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
def memfd_view(size: int) -> Iterator[memoryview]:
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


@contextlib.contextmanager
def memfd_file(size: int) -> Iterator[tuple[int, mmap.mmap]]:
    """A fresh memfd of ``size`` zero bytes, and a shared mapping to look at it."""
    fd = os.memfd_create("aio-check-copy", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mapping:
            yield fd, mapping
    finally:
        os.close(fd)


async def drain(queue: Queue, into: list[Completion]) -> None:
    """Wait until nothing is outstanding, appending every completion to ``into``."""
    while queue.outstanding:
        into.extend(await queue.wait(1))


def exactly_once(done: list[Completion], ids: set[int]) -> dict[int, int]:
    counts = Counter(c.id for c in done)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    expect(not repeated, f"completions returned more than once: ids {repeated[:10]}")
    missing = sorted(ids - counts.keys())
    expect(not missing, f"requests never completed: ids {missing[:10]}")
    extra = sorted(counts.keys() - ids)
    expect(not extra, f"completions for ids never added: {extra[:10]}")
    return {c.id: c.result for c in done}


async def stray_writes_after_close(view: memoryview) -> bool:
    """Mark ``view``, give stray writers time, and say whether anything changed it."""
    view[:] = b"\x5a" * len(view)
    await trio.sleep(GRACE)
    return view != b"\x5a" * len(view)
