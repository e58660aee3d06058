"""The aio package: every backend through the conformance suite, the registry, detection."""

from __future__ import annotations

import errno
import gc
import mmap
import os
import sys
from collections.abc import Callable, Sequence

import pytest
import trio

import aio
import aio.testing
from aio import BackendUnavailable, Queue, Request
from aio._probe import LIBURING_VERSION, explain, probe, read_disabled
from aio.testing import DelayedQueue, FaultInjectingQueue

PAGE = mmap.PAGESIZE


def _backend(name: str) -> Callable[[int], Queue]:
    return lambda capacity: aio.open_queue(name, capacity)


def _uring_inline(capacity: int) -> Queue:
    from aio._uring import UringQueue

    return UringQueue(capacity, force_async=False)


#: label -> (backend that must be usable here, factory)
QUEUES: dict[str, tuple[str, Callable[[int], Queue]]] = {
    **{name: (name, _backend(name)) for name in aio.backends()},
    "uring(inline)": ("uring", _uring_inline),
    "faulty(threads)": (
        "threads",
        lambda capacity: FaultInjectingQueue(aio.open_queue("threads", capacity), lambda r: None),
    ),
    "delayed(threads)": (
        "threads",
        lambda capacity: DelayedQueue(aio.open_queue("threads", capacity), delay=0.001),
    ),
}


def _why_unavailable(backend: str) -> str | None:
    try:
        aio.check_available(backend)  # probes in a child process: a crashing binding cannot kill pytest
    except BackendUnavailable as exc:
        return str(exc)
    return None


#: decided at collection, so that ``-ra`` shows the reason (pytest.skip() inside a
#: trio-mode async test loses its message)
UNAVAILABLE = {name: _why_unavailable(name) for name in aio.backends()}


def requires(backend: str) -> pytest.MarkDecorator:
    why = UNAVAILABLE[backend]
    return pytest.mark.skipif(why is not None, reason=f"aio backend {backend} unavailable here: {why}")


requires_uring = requires("uring")


@pytest.mark.parametrize("check", list(aio.testing.CHECKS))
@pytest.mark.parametrize(
    "label", [pytest.param(label, marks=requires(backend)) for label, (backend, _) in QUEUES.items()]
)
async def test_conformance(label: str, check: str) -> None:
    _, make_queue = QUEUES[label]
    await aio.testing.CHECKS[check](make_queue)


async def test_check_queue_runs_every_check() -> None:
    await aio.testing.check_queue(_backend("sync"))


# -- registry ----------------------------------------------------------------------
def test_every_registered_backend_is_in_auto_order() -> None:
    assert set(aio.backends()) == set(aio.AUTO_ORDER)
    assert {"threads", "sync", "uring"} <= set(aio.backends())


def test_unknown_backend_names_the_known_ones() -> None:
    with pytest.raises(BackendUnavailable, match="unknown aio backend 'nope'; known: threads"):
        aio.check_available("nope")


async def test_open_queue_rejects_unknown_backend() -> None:
    with pytest.raises(BackendUnavailable, match="unknown aio backend"):
        aio.open_queue("nope", 4)


async def test_auto_picks_first_usable_backend() -> None:
    name, why = aio.pick_auto()
    usable = []
    for candidate in aio.AUTO_ORDER:
        try:
            aio.check_available(candidate)
            usable.append(candidate)
        except BackendUnavailable:
            pass
    assert name == usable[0]
    assert "preference order" in why
    queue = aio.open_queue("auto", 4)
    try:
        assert queue.name == name
    finally:
        await queue.aclose()


def test_auto_skips_an_unusable_backend_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> None:
        if name == aio.AUTO_ORDER[0]:
            raise BackendUnavailable("not here, for the test")

    monkeypatch.setattr(aio._registry, "check_available", refuse)
    name, why = aio.pick_auto()
    assert name == aio.AUTO_ORDER[1]
    assert f"skipped {aio.AUTO_ORDER[0]}: not here, for the test" in why


# -- io_uring detection ------------------------------------------------------------
def test_explain_says_nothing_when_io_uring_works() -> None:
    assert explain(disabled=0) is None
    assert explain(disabled=None) is None
    assert explain(disabled=1) is None  # restricted, but this process created a ring


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({"import_error": ImportError("No module named 'liburing'")}, "liburing Python package"),
        ({"disabled": 2}, "io_uring_disabled = 2 (io_uring is switched off for every process)"),
        ({"disabled": 2, "setup_errno": errno.EPERM}, "io_uring_disabled = 2"),
        ({"disabled": 1, "setup_errno": errno.EPERM}, "io_uring_disabled = 1 (only processes"),
        ({"disabled": 0, "setup_errno": errno.EPERM}, "refused with EPERM: a seccomp filter"),
        ({"setup_errno": errno.ENOSYS, "kernel": "4.19.0"}, "no io_uring (io_uring_setup: ENOSYS)"),
        ({"setup_errno": errno.ENOMEM}, "io_uring_setup failed: ENOMEM"),
        ({"readv_supported": False, "kernel": "5.0.1"}, "IORING_OP_READV unsupported on 5.0.1"),
    ],
)
def test_explain_gives_one_line_per_reason(facts: dict[str, object], expected: str) -> None:
    why = explain(**facts)  # type: ignore[arg-type]
    assert why is not None
    assert expected in why
    assert "\n" not in why


def test_read_disabled(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "io_uring_disabled")
    assert read_disabled(path) is None  # absent before Linux 6.6
    with open(path, "w") as f:
        f.write("1\n")
    assert read_disabled(path) == 1


# probe() runs native code only after the checks below have passed, so these run in-process safely
def test_probe_reports_a_disabled_host(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "io_uring_disabled")
    with open(path, "w") as f:
        f.write("2\n")
    steps: list[tuple[str, str]] = []
    why = probe(lambda *step: steps.append(step), disabled_path=path)
    assert why is not None and "io_uring_disabled = 2" in why
    assert steps == []  # decided before liburing was even imported


def _enabled(tmp_path: os.PathLike[str]) -> str:
    """An ``io_uring_disabled`` file saying 0: the probes below reach the import checks
    whatever this host's own setting (a host with io_uring off failed them)."""
    path = os.path.join(tmp_path, "io_uring_enabled")
    with open(path, "w") as f:
        f.write("0\n")
    return path


def test_probe_reports_missing_liburing(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "liburing", None)  # import now raises ImportError
    why = probe(disabled_path=_enabled(tmp_path))
    assert why is not None and "liburing Python package cannot be imported" in why
    assert f"pip install liburing=={LIBURING_VERSION}" in why


def test_probe_reports_a_binding_with_another_api(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    class Liburing2026:  # the 2026.x wheels: Ring(), Iovec, no io_uring()/iovec()
        __version__ = "2026.3.30"
        Ring = Iovec = object

    monkeypatch.setitem(sys.modules, "liburing", Liburing2026)
    why = probe(disabled_path=_enabled(tmp_path))
    assert why is not None
    assert why.startswith("liburing 2026.3.30 has another API (no io_uring, iovec,")
    assert f"pip install liburing=={LIBURING_VERSION}" in why


def test_probe_imports_liburing_again_when_its_cache_file_is_being_rewritten(
        tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """liburing's importer rewrites a cache file on some imports; a probe importing it
    meanwhile got FileNotFoundError, and the uring tests of a whole run were skipped
    ("probe failed (exit status 1) while being imported").  A fake liburing that fails
    so on its first two imports: the probe gets past the import (to the fake's API)."""
    pkg = os.path.join(tmp_path, "liburing")
    os.mkdir(pkg)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write(
            "import os\n"
            f"count = os.path.join({str(tmp_path)!r}, 'imports')\n"
            "fd = os.open(count, os.O_RDWR | os.O_CREAT | os.O_APPEND)\n"
            "n = os.fstat(fd).st_size\n"
            "os.write(fd, b'x')\n"
            "os.close(fd)\n"
            "if n < 2:\n"
            "    raise FileNotFoundError(2, 'No such file or directory', '__init__.importer-311.pyc')\n"
            "__version__ = '2099.1.1'\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "liburing", raising=False)
    enabled = _enabled(tmp_path)
    why = probe(disabled_path=enabled)
    assert why is not None and why.startswith("liburing 2099.1.1 has another API"), why
    assert os.path.getsize(os.path.join(tmp_path, "imports")) == 3  # two failed imports, then one
    # an import that keeps failing so: one line, not an exception out of the probe
    monkeypatch.delitem(sys.modules, "liburing", raising=False)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write("raise FileNotFoundError(2, 'No such file or directory', 'gone.pyc')\n")
    why = probe(disabled_path=enabled)
    assert why is not None and why.startswith("liburing could not be imported (4 tries):"), why


@requires_uring
def test_probe_in_process_where_uring_works() -> None:
    steps: list[str] = []
    assert probe(lambda subject, activity: steps.append(activity)) is None
    assert steps == ["being imported", "creating a ring", "probing the ring's operations", "reading through a ring"]


# -- uring specifics ---------------------------------------------------------------
@pytest.fixture
def page_file(tmp_path: os.PathLike[str]) -> tuple[int, bytes]:
    data = os.urandom(16 * PAGE)
    path = os.path.join(tmp_path, "pages")
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


@requires_uring
async def test_uring_submits_urgent_first_in_one_call(
    page_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import liburing

    from aio._uring import UringQueue

    fd, _ = page_file
    order: list[int] = []
    original = liburing.io_uring_prep_readv

    def recording(sqe: object, fd: int, iovec: object, offset: int) -> None:
        order.append(offset // PAGE)
        original(sqe, fd, iovec, offset)

    monkeypatch.setattr(liburing, "io_uring_prep_readv", recording)
    buf = bytearray(8 * PAGE)
    view = memoryview(buf)
    queue = UringQueue(8)
    try:
        for page in range(8):
            queue.add(Request.read(page, fd, page * PAGE, view[page * PAGE : (page + 1) * PAGE],
                                   urgent=page in (5, 7)))
        assert order == []  # add only prepares
        done = []
        while queue.outstanding:
            done.extend(await queue.wait(queue.outstanding))
        assert queue.submissions == 1
    finally:
        await queue.aclose()
    assert order == [5, 7, 0, 1, 2, 3, 4, 6]
    assert sorted(c.id for c in done) == list(range(8))


@requires_uring
async def test_uring_does_not_pin_buffers_after_completion(page_file: tuple[int, bytes]) -> None:
    from aio._uring import UringQueue

    fd, data = page_file
    mapping = mmap.mmap(-1, 16 * PAGE)
    view = memoryview(mapping)
    queue = UringQueue(4)
    try:
        queue.add(Request.readv(1, fd, 0, [view[:PAGE], view[8 * PAGE : 10 * PAGE]]))
        done = await queue.wait(1)
    finally:
        await queue.aclose()
    assert done == [aio.Completion(1, 3 * PAGE)]
    assert mapping[8 * PAGE : 10 * PAGE] == data[PAGE : 3 * PAGE]
    del done, queue
    view.release()
    gc.collect()
    mapping.close()  # BufferError if a slice were still exported (liburing 2026's Iovec did that)


@requires_uring
async def test_uring_rejects_read_only_buffers(page_file: tuple[int, bytes]) -> None:
    from aio._uring import UringQueue

    fd, _ = page_file
    queue = UringQueue(2)
    try:
        with pytest.raises(ValueError, match="writable"):
            queue.add(Request.read(1, fd, 0, memoryview(bytes(PAGE))))
    finally:
        await queue.aclose()


@requires_uring
async def test_uring_reads_into_many_buffers_in_order(page_file: tuple[int, bytes]) -> None:
    from aio._uring import UringQueue

    fd, data = page_file
    buf = bytearray(16 * PAGE)
    view = memoryview(buf)
    parts = [view[i * PAGE : (i + 1) * PAGE] for i in reversed(range(16))]
    queue = UringQueue(1)
    try:
        queue.add(Request.readv(1, fd, 0, parts))
        assert await queue.wait(1) == [aio.Completion(1, 16 * PAGE)]
    finally:
        await queue.aclose()
    for i in range(16):
        assert buf[(15 - i) * PAGE : (16 - i) * PAGE] == data[i * PAGE : (i + 1) * PAGE]


@requires_uring
async def test_uring_wait_parks_on_the_eventfd(page_file: tuple[int, bytes]) -> None:
    """A blocked wait sleeps in trio (other tasks run) and wakes when the data arrives."""
    from aio._uring import UringQueue

    read_end, write_end = os.pipe()
    buf = bytearray(PAGE)
    queue = UringQueue(2)
    try:
        queue.add(Request.read(1, read_end, 0, memoryview(buf)))
        async with trio.open_nursery() as nursery:
            results = []

            async def waiter() -> None:
                results.extend(await queue.wait(1))

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert results == []
            os.write(write_end, b"hello")
        assert results == [aio.Completion(1, 5)]
        assert buf[:5] == b"hello"
    finally:
        await queue.aclose()
        os.close(read_end)
        os.close(write_end)


def test_read_nowait_keeps_to_its_buffer_and_declines_what_it_cannot_do(tmp_path):
    """The GIL-keeping ``preadv2(RWF_NOWAIT)``: the file's bytes into a writable buffer,
    nothing past it; an empty buffer reads nothing; a read-only one and errors: -1."""
    from aio._base import read_nowait

    path = tmp_path / "f"
    data = os.urandom(4 * 4096)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, len(data), 0)  # in the page cache
        m = mmap.mmap(-1, 3 * 4096)
        view = memoryview(m)
        assert read_nowait(fd, view[4096:8192], 8192) == 4096
        assert view[4096:8192] == data[8192:12288]
        assert view[:4096] == bytes(4096) and view[8192:] == bytes(4096)
        assert read_nowait(fd, memoryview(bytes(4096)), 0) == -1  # read-only: declined
        assert read_nowait(fd, view[:0], 0) == 0
        assert read_nowait(-1, view[:4096], 0) == -1
        view.release()
        m.close()
    finally:
        os.close(fd)


def test_read_nowait_v_fills_its_buffers_in_order_and_declines_what_it_cannot_do(tmp_path):
    """A verified chunk's pieces in one ``preadv2(RWF_NOWAIT)``: the file's bytes from
    the offset, into each buffer in turn at its own place, nothing outside them; short
    at the end of the file; a read-only or empty piece, no pieces, more than IOV_MAX
    of them, a bad descriptor: -1."""
    from aio import IOV_MAX
    from aio._base import read_nowait_v

    path = tmp_path / "f"
    data = os.urandom(4 * 4096)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, len(data), 0)  # in the page cache
        m = mmap.mmap(-1, 8 * 4096)
        view = memoryview(m)
        parts = [view[5 * 4096 : 6 * 4096], view[1000:1100], view[2 * 4096 : 3 * 4096 + 7]]
        assert read_nowait_v(fd, parts, 4096) == 2 * 4096 + 107
        assert bytes(parts[0]) + bytes(parts[1]) + bytes(parts[2]) == data[4096 : 3 * 4096 + 107]
        assert view[:1000] == bytes(1000) and view[1100 : 2 * 4096] == bytes(2 * 4096 - 1100)
        assert view[3 * 4096 + 7 : 5 * 4096] == bytes(2 * 4096 - 7) and view[6 * 4096 :] == bytes(2 * 4096)
        assert read_nowait_v(fd, [view[:4096], view[4096 : 3 * 4096]], 2 * 4096) == 2 * 4096  # the file ends
        assert read_nowait_v(fd, [view[:4096]], 0) == 4096  # (one piece: read_nowait)
        assert read_nowait_v(fd, [view[:4096], memoryview(bytes(4096))], 0) == -1
        assert read_nowait_v(fd, [view[:4096], view[:0]], 0) == -1
        assert read_nowait_v(fd, [], 0) == -1
        assert read_nowait_v(fd, [view[:1]] * (IOV_MAX + 1), 0) == -1
        assert read_nowait_v(-1, [view[:4096], view[4096:8192]], 0) == -1
        for part in parts:
            part.release()
        view.release()
        m.close()
    finally:
        os.close(fd)


# -- Request.then ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sync", "threads"])
async def test_then_runs_after_a_full_read_in_the_backends_thread_and_never_after_a_short_one(
    page_file: tuple[int, bytes], backend: str
) -> None:
    """``then`` sees the bytes already in the buffer; a read cut short by the end of
    the file, a failed one, or one whose ``then`` raises completes as without it."""
    fd, data = page_file
    seen: dict[int, bytes] = {}
    buf = mmap.mmap(-1, 4 * PAGE)
    view = memoryview(buf)

    def then_for(i: int, part: memoryview) -> Callable[[], None]:
        return lambda: seen.__setitem__(i, bytes(part))

    def boom() -> None:
        raise RuntimeError("the caller's bug")

    queue = aio.open_queue(backend, 8)
    try:
        queue.add(Request.read(0, fd, PAGE, view[:PAGE], then=then_for(0, view[:PAGE])))
        queue.add(Request.readv(1, fd, 2 * PAGE, [view[PAGE : 2 * PAGE]], then=then_for(1, view[PAGE : 2 * PAGE])))
        queue.add(Request.read(2, fd, 15 * PAGE, view[2 * PAGE :], then=then_for(2, view[2 * PAGE :])))  # short
        queue.add(Request.read(3, -1, 0, view[:PAGE], then=then_for(3, view[:PAGE])))  # EBADF
        queue.add(Request.read(4, fd, 0, view[3 * PAGE :], urgent=True, then=boom))
        results: dict[int, int] = {}
        with trio.fail_after(30):
            while len(results) < 5:
                results.update((c.id, c.result) for c in await queue.wait(1))
    finally:
        await queue.aclose()
        view.release()
        buf.close()
    assert results == {0: PAGE, 1: PAGE, 2: PAGE, 3: -errno.EBADF, 4: PAGE}
    assert seen == {0: data[PAGE : 2 * PAGE], 1: data[2 * PAGE : 3 * PAGE]}


def test_only_the_wrappers_that_change_reads_are_not_transparent():
    """``Queue.transparent``: the fault-injecting and hanging wrappers change what reads
    return (the userfaultfd handler must not read the file around them); a delaying
    one is as its inner queue; the backends are."""
    inner = aio.open_queue("sync", 4)
    assert inner.transparent
    assert not FaultInjectingQueue(inner, lambda r: None).transparent
    assert not aio.testing.HangingQueue(inner, lambda r: False).transparent
    assert DelayedQueue(inner, 0.001).transparent
    assert not DelayedQueue(FaultInjectingQueue(inner, lambda r: None), 0.001).transparent


# -- Op.CALL -----------------------------------------------------------------------------
async def test_a_fault_injecting_wrapper_fails_and_shortens_calls_by_their_span() -> None:
    """A call's ``offset`` is its span for the wrappers: a call whose span touches the
    failing bytes fails without running; one cut short runs with its buffers cut down
    (the bytes past the cut are not written); the rest run as they are."""
    buf = mmap.mmap(-1, 4 * PAGE)
    view = memoryview(buf)
    ran: list[int] = []

    def fill(tag: int) -> Callable[[Sequence[memoryview]], int]:
        def fn(buffers: Sequence[memoryview]) -> int:
            ran.append(tag)
            for b in buffers:
                b[:] = bytes([tag]) * len(b)
            return sum(map(len, buffers))
        return fn

    def rule(request: Request) -> int | None:
        lo, hi = request.span
        if lo < 10 * PAGE + 1 and hi > 10 * PAGE:
            return -errno.EREMOTEIO
        return PAGE // 2 if lo == 20 * PAGE else None

    queue = FaultInjectingQueue(aio.open_queue("threads", 8), rule)
    assert queue.calls
    try:
        queue.add(Request.call(1, fill(1), [view[:PAGE]], offset=9 * PAGE + 1))  # touches 10 * PAGE
        queue.add(Request.call(2, fill(2), [view[PAGE : 2 * PAGE]], offset=20 * PAGE))  # cut to half a page
        queue.add(Request.call(3, fill(3), [view[2 * PAGE : 3 * PAGE]], offset=30 * PAGE))
        results: dict[int, int] = {}
        with trio.fail_after(30):
            while len(results) < 3:
                results.update((c.id, c.result) for c in await queue.wait(1))
    finally:
        await queue.aclose()
    assert results == {1: -errno.EREMOTEIO, 2: PAGE // 2, 3: PAGE}
    assert sorted(ran) == [2, 3]
    assert view[PAGE : PAGE + PAGE // 2] == b"\x02" * (PAGE // 2)
    assert view[PAGE + PAGE // 2 : 2 * PAGE] == bytes(PAGE // 2)
    assert view[:PAGE] == bytes(PAGE)
    view.release()
    buf.close()
