"""The conformance suite every :class:`~loader.source.PageSource` must pass.

``await check_source(source, memory, make_queue)`` runs every check against an open
source whose restored memory must equal ``memory`` (the guest image's bytes, holes
as zeros), reading through queues made by ``make_queue(capacity)`` (an
:func:`aio.open_queue` backend).  Each check raises ``AssertionError`` naming what
is wrong.  What is checked:

* the layout: validated, within the memory, its file bytes within :meth:`size`;
  the bytes outside it are zeros in ``memory``; the identity names the layout's
  memory and page size and the source's kind, and is the same when taken again;
* reads: every range read whole into a mapping at its memory offset gives
  ``memory``'s bytes; reads of random spans of the pages file, one buffer and
  several, small and large (across chunk files), urgent or not; a read running past
  :meth:`size` comes back short, counting only the bytes there;
* :meth:`read_now`: the exact bytes, or -1;
* :meth:`gather`: ranges apart, each from its own offset;
* checksums: each chunk's xxh3_64, hashed from what the source reads, is the one
  the source gives (where it gives them);
* the local file, where there is one: a regular file, as long as :meth:`size`, whose
  bytes are the ones the requests read;
* :meth:`close` may be called twice.
"""

from __future__ import annotations

import mmap
import os
import random
import stat
from collections.abc import Callable

import xxhash

import aio

from ..core._layout import LayoutError
from ._base import PageSource

__all__ = ["check_source"]

MakeQueue = Callable[[int], aio.Queue]


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


async def _run(queue: aio.Queue, request: aio.Request) -> int:
    queue.add(request)
    (completion,) = await queue.wait(1)
    _expect(completion.id == request.id, f"completion for {completion.id}, not {request.id}")
    return completion.result


async def check_source(source: PageSource, memory: bytes, make_queue: MakeQueue, *, seed: int = 1) -> None:
    """Every check, in order (see the module's docstring); closes the source at the end."""
    layout = source.layout
    try:
        layout.validate(source.size())
    except LayoutError as exc:
        raise AssertionError(f"the layout does not fit the source: {exc}") from None
    _expect(layout.memory_size == len(memory), f"memory of {layout.memory_size} bytes, not {len(memory)}")
    identity = source.identity()
    _expect((identity.kind, identity.memory_size, identity.page_size)
            == (source.kind, layout.memory_size, layout.page_size), f"identity {identity} does not name the source")
    _expect(source.identity() == identity, "the identity changed when taken again")
    pos = 0
    for r in layout:  # between the ranges: zeros
        _expect(memory[pos : r.mem_offset] == bytes(r.mem_offset - pos), f"data outside the layout before {pos:#x}")
        pos = r.mem_offset + r.length
    _expect(memory[pos:] == bytes(len(memory) - pos), f"data outside the layout after {pos:#x}")
    # the pages file as the requests read it, range by range: memory's bytes
    stream = bytearray(source.size())
    for r in layout:
        stream[r.file_offset : r.file_offset + r.length] = memory[r.mem_offset : r.mem_offset + r.length]
    mapping = mmap.mmap(-1, max(len(memory), 1))
    view = memoryview(mapping)
    queue = make_queue(4)
    rng = random.Random(seed)
    try:
        for n, r in enumerate(layout):
            got = await _run(queue, source.read(n, r.file_offset, [view[r.mem_offset : r.mem_offset + r.length]],
                                                urgent=n % 2 == 0))
            _expect(got == r.length, f"range {n} ({r.length} bytes at file {r.file_offset:#x}) read {got}")
        _expect(view[: len(memory)] == memory, "the ranges read whole differ from the memory")
        size = len(stream)
        chunk = source.chunk_size or 16 << 10
        for n in range(40 if size else 0):
            lo = rng.randrange(size)
            hi = min(size, lo + rng.choice((1, 100, chunk - 1, chunk + 7, 3 * chunk, 64 << 10)))
            cuts = sorted(rng.sample(range(lo + 1, hi), min(rng.randrange(3), hi - lo - 1))) if hi - lo > 1 else []
            edges = [lo, *cuts, hi]
            view[: hi - lo] = bytes(hi - lo)
            buffers = [view[a - lo : b - lo] for a, b in zip(edges, edges[1:])]
            got = await _run(queue, source.read(100 + n, lo, buffers, urgent=n % 3 == 0))
            _expect(got == hi - lo and view[: hi - lo] == stream[lo:hi],
                    f"pages file [{lo:#x}, {hi:#x}) in {len(buffers)} buffers: read {got}, "
                    f"{'same' if view[: max(got, 0)] == stream[lo : lo + max(got, 0)] else 'other'} bytes")
        if size:  # past the end: short, only the bytes there
            lo = max(0, size - 100)
            view[:300] = bytes(300)
            got = await _run(queue, source.read(200, lo, [view[:300]]))
            _expect(got == size - lo and view[: size - lo] == stream[lo:], f"a read past the end returned {got}, "
                    f"not {size - lo}")
            got = await _run(queue, source.read(201, size + 4096, [view[:100]]))
            _expect(got == 0, f"a read wholly past the end returned {got}, not 0")
            lo = rng.randrange(size)
            hi = min(size, lo + 4096)
            view[: hi - lo] = bytes(hi - lo)
            got = source.read_now(queue, view[: hi - lo], lo)
            _expect(got in (-1, hi - lo), f"read_now returned {got}, not -1 or {hi - lo}")
            if got > 0:
                _expect(view[: hi - lo] == stream[lo:hi], "read_now's bytes differ from the pages file")
            if hi - lo > 2048:  # read_now_v: the same bytes, in two buffers apart
                mid = (hi - lo) // 2
                view[: 2 * (hi - lo)] = bytes(2 * (hi - lo))
                parts = [view[hi - lo : hi - lo + mid], view[: hi - lo - mid]]
                got = source.read_now_v(queue, parts, lo)
                _expect(got in (-1, hi - lo), f"read_now_v returned {got}, not -1 or {hi - lo}")
                if got > 0:
                    _expect(bytes(parts[0]) + bytes(parts[1]) == stream[lo:hi],
                            "read_now_v's bytes differ from the pages file")
            if queue.gathers and size > 3 * 4096:
                spans = sorted(rng.sample(range(0, size // 4096 - 1, 2), min(5, size // 8192)))
                buffers = [view[k * 4096 : (k + 1) * 4096] for k in spans]
                view[: len(view)] = bytes(len(view))
                got = await _run(queue, source.gather(300, buffers, [k * 4096 for k in spans]))
                _expect(got == 4096 * len(spans), f"a gather of {len(spans)} pages returned {got}")
                for k in spans:
                    _expect(view[k * 4096 : (k + 1) * 4096] == stream[k * 4096 : (k + 1) * 4096],
                            f"gathered page at {k * 4096:#x} differs")
        if source.checksums is not None and source.chunk_size:
            c = source.chunk_size
            _expect(len(source.checksums) == -(-size // c), f"{len(source.checksums)} checksums for "
                    f"{size} bytes in chunks of {c}")
            for k, want in enumerate(source.checksums):
                _expect(xxhash.xxh3_64_intdigest(bytes(stream[k * c : (k + 1) * c])) == want,
                        f"chunk {k} does not hash to its checksum")
        local = source.local
        if local is not None:
            st = os.fstat(local.fd)
            _expect(stat.S_ISREG(st.st_mode) and st.st_size == size, "the local file is not a regular file "
                    f"of {size} bytes")
            _expect(os.pread(local.fd, size, 0) == stream, "the local file's bytes differ from what requests read")
    finally:
        await queue.aclose()  # (the mapping goes with the last view of it)
    source.close()
    source.close()
