"""Deterministic sample memory images for the demo, the tests and the benchmarks.

:func:`make_sample_image` writes a raw image (the Firecracker-style kind that
:func:`loader.checkpoint.open_checkpoint` reads) with data extents, sparse holes
and all-zero pages inside the data, all chosen by a seeded generator, so one
``seed`` always gives the same bytes and the same holes.

Page contents are pseudo-random but cheap: each written piece is a slice of one
seeded random pool, taken at a seeded offset, and the first 8 bytes of every page
hold its memory offset + 1 (native-endian ``uint64``).  So no two pages are alike,
no data page is all zero by accident, and a page read from the wrong place shows
where it came from.  A 1 GiB image takes about a second, mostly the kernel's.
"""

from __future__ import annotations

import os
import random
from array import array

__all__ = ["WRITE_SIZE", "make_sample_image"]

WRITE_SIZE = 8 << 20  #: bytes generated and written per ``pwrite``
_POOL_SLACK = 1 << 20  #: the pool is this much longer than a write, so slices start anywhere in it


def make_sample_image(
    path: str,
    size: int,
    *,
    seed: int = 0,
    data_fraction: float = 0.5,
    zero_page_fraction: float = 0.05,
    hole_granularity: int = 2 << 20,
    dense: bool = False,
    scattered: int = 0,
    page_size: int = 4096,
) -> None:
    """Write a raw memory image of ``size`` bytes to ``path`` (replacing any file there).

    Memory is cut into blocks of ``hole_granularity`` bytes; each is data with
    probability ``data_fraction``, otherwise a hole that is never written (the
    file is sized with ``ftruncate`` first), so it stays sparse where the file
    system allows.  When there are two blocks or more and ``0 < data_fraction <
    1``, at least one block is data and at least one is a hole.  Within data,
    ``zero_page_fraction`` of the pages are written as explicit zeros (allocated,
    yet all zero: what :func:`loader.checkpoint.create_checkpoint` drops).

    ``dense=True`` writes every page with random data: no holes, no zero pages
    (``data_fraction`` and ``zero_page_fraction`` are ignored).

    ``scattered=STRIDE`` writes one page of random data every ``STRIDE`` pages (pages
    0, STRIDE, 2*STRIDE, ...) and leaves the rest holes: fragmented guest memory,
    with ``size / page_size / STRIDE`` data ranges of one page each (the other
    options are ignored).  ``STRIDE`` is at least 2.

    Raises ``ValueError`` for sizes that are not positive multiples of
    ``page_size`` and ``OSError`` from the file system.
    """
    if page_size <= 0 or page_size & (page_size - 1) or page_size < 8:
        raise ValueError(f"page size {page_size} is not a power of two of at least 8")
    if size <= 0 or size % page_size:
        raise ValueError(f"size {size} is not a positive multiple of the page size {page_size}")
    if hole_granularity <= 0 or hole_granularity % page_size:
        raise ValueError(
            f"hole granularity {hole_granularity} is not a multiple of the page size {page_size}"
        )
    if scattered:
        if scattered < 2:
            raise ValueError(f"scattered stride {scattered} must be at least 2 pages")
        _write_scattered(path, size, scattered, page_size, random.Random(seed))
        return
    if dense:
        data_fraction, zero_page_fraction = 1.0, 0.0
    if not (0.0 <= data_fraction <= 1.0 and 0.0 <= zero_page_fraction <= 1.0):
        raise ValueError("data_fraction and zero_page_fraction must be between 0 and 1")

    rng = random.Random(seed)
    piece_size = min(WRITE_SIZE, size)
    pool = rng.randbytes(piece_size + min(_POOL_SLACK, piece_size))
    pool_view = memoryview(pool)
    extents = _data_extents(rng, size, hole_granularity, data_fraction)

    buf = bytearray(piece_size)
    view = memoryview(buf)
    words = view.cast("Q")
    zero = bytes(page_size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for start, end in extents:
            for off in range(start, end, piece_size):
                n = min(piece_size, end - off)
                pages = n // page_size
                at = rng.randrange(len(pool) - n + 1)
                buf[:n] = pool_view[at : at + n]
                words[0 : n // 8 : page_size // 8] = array(
                    "Q", range(off + 1, off + n + 1, page_size)
                )
                for p in rng.sample(range(pages), round(pages * zero_page_fraction)):
                    buf[p * page_size : (p + 1) * page_size] = zero
                _write_all(fd, view[:n], off)
    finally:
        os.close(fd)


def _write_scattered(path: str, size: int, stride: int, page_size: int, rng: random.Random) -> None:
    """One random page every ``stride`` pages, each written where it goes (one
    ``pwrite`` a page), stamped with its memory offset + 1 like every sample page."""
    batch = 1024  # pages generated at once
    pool = rng.randbytes(batch * page_size + _POOL_SLACK)
    buf = bytearray(batch * page_size)
    view = memoryview(buf)
    words = view.cast("Q")
    step = stride * page_size
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for first in range(0, size, step * batch):
            offsets = range(first, min(size, first + step * batch), step)
            at = rng.randrange(_POOL_SLACK)
            buf[:] = pool[at:at + len(buf)]
            words[0:len(offsets) * page_size // 8:page_size // 8] = array("Q", (o + 1 for o in offsets))
            for k, off in enumerate(offsets):
                _write_all(fd, view[k * page_size:(k + 1) * page_size], off)
    finally:
        os.close(fd)


def _data_extents(
    rng: random.Random, size: int, block: int, data_fraction: float
) -> list[tuple[int, int]]:
    """Which blocks are data, as merged ``(start, end)`` extents."""
    n = -(-size // block)
    is_data = [rng.random() < data_fraction for _ in range(n)]
    if n >= 2 and 0.0 < data_fraction < 1.0:
        if not any(is_data):
            is_data[0] = True
        if all(is_data):
            is_data[-1] = False
    extents: list[tuple[int, int]] = []
    for i, data in enumerate(is_data):
        if not data:
            continue
        start, end = i * block, min((i + 1) * block, size)
        if extents and extents[-1][1] == start:
            extents[-1] = (extents[-1][0], end)
        else:
            extents.append((start, end))
    return extents


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
