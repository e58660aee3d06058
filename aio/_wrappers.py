"""Wrappers that any backend can be put in: fault injection and slowing down."""

from __future__ import annotations

import errno
from collections.abc import Callable

import trio

from ._base import Completion, Op, Queue, Request

#: decides a request's fate: ``None`` to pass it on, ``-errno`` to fail it,
#: or a byte count >= 0 to cut it short to that many bytes.
FaultRule = Callable[[Request], "int | None"]


def fail_offsets(lo: int, hi: int, err: int = errno.EIO) -> FaultRule:
    """A rule failing every request whose file span touches [lo, hi)."""

    def rule(request: Request) -> int | None:
        first, last = request.span
        if first < hi and last > lo:
            return -err
        return None

    return rule


class FaultInjectingQueue(Queue):
    """Passes requests to ``inner`` unless ``rule`` says to fail or shorten them.

    A failed request never reaches the inner backend; a shortened one is sent with
    its buffers cut down, so the bytes past the cut are really not written.
    """

    def __init__(self, inner: Queue, rule: FaultRule) -> None:
        super().__init__(inner.capacity)
        self.name = f"faulty({inner.name})"
        self.transparent = False  # its reads fail where the file's would not
        self.inner = inner
        self.copies = inner.copies
        self.gathers = inner.gathers
        self.max_buffers = inner.max_buffers
        self.calls = inner.calls
        self.rule = rule
        self._ready: list[Completion] = []
        self.injected = 0

    def _add(self, request: Request) -> None:
        verdict = self.rule(request)
        if verdict is None:
            self.inner.add(request)
            return
        self.injected += 1
        if verdict < 0:
            self._ready.append(Completion(request.id, verdict))
            return
        if request.op == Op.COPY:
            dest, left = [], verdict
            for offset, length in request.dest:
                if left <= 0:
                    break
                dest.append((offset, min(length, left)))
                left -= dest[-1][1]
            if dest:
                self.inner.add(Request.copy(request.id, request.fd, request.offset, request.dest_fd, dest,
                                            urgent=request.urgent, gather=request.gather))
            else:
                self._ready.append(Completion(request.id, 0))
            return
        buffers, left = [], verdict
        for buf in request.buffers:
            if left <= 0:
                break
            buffers.append(buf[: min(len(buf), left)])
            left -= len(buffers[-1])
        if not buffers:
            self._ready.append(Completion(request.id, 0))
            return
        if request.op == Op.CALL:
            assert request.fn is not None
            self.inner.add(Request.call(request.id, request.fn, buffers, urgent=request.urgent,
                                        offset=request.offset))
            return
        if request.op == Op.GATHER:
            self.inner.add(Request.gather_read(request.id, request.fd, buffers, request.offsets[:len(buffers)],
                                               urgent=request.urgent, fds=request.fds[:len(buffers)]))
            return
        self.inner.add(Request.readv(request.id, request.fd, request.offset, buffers, urgent=request.urgent))

    async def _wait(self, min_completions: int) -> list[Completion]:
        need = min_completions - len(self._ready)
        self._ready.extend(await self.inner.wait(max(need, 0)))
        done, self._ready = self._ready, []
        return done

    async def _aclose(self) -> None:
        self._ready.clear()
        await self.inner.aclose()

    def _ready_count(self) -> int:
        return len(self._ready) + self.inner.statistics().ready


class DelayedQueue(Queue):
    """Slows ``inner`` down on purpose: each completion is held back ``delay`` seconds
    (requests complete no faster than one per ``delay``).  For priority tests."""

    def __init__(self, inner: Queue, delay: float) -> None:
        super().__init__(inner.capacity)
        self.name = f"delayed({inner.name})"
        self.transparent = inner.transparent  # later, not other
        self.inner = inner
        self.copies = inner.copies
        self.gathers = inner.gathers
        self.max_buffers = inner.max_buffers
        self.calls = inner.calls
        self.delay = delay
        self._held: list[Completion] = []  # kept across a cancelled wait: nothing is lost

    def _add(self, request: Request) -> None:
        self.inner.add(request)

    async def _wait(self, min_completions: int) -> list[Completion]:
        self._held.extend(await self.inner.wait(max(min_completions - len(self._held), 0)))
        await trio.sleep(self.delay * len(self._held))
        done, self._held = self._held, []
        return done

    async def _aclose(self) -> None:
        self._held.clear()
        await self.inner.aclose()

    def _ready_count(self) -> int:
        return len(self._held) + self.inner.statistics().ready


def hang_offsets(lo: int, hi: int) -> Callable[[Request], bool]:
    """A rule for :class:`HangingQueue`: hang every request whose file span touches [lo, hi)."""

    def rule(request: Request) -> bool:
        first, last = request.span
        return first < hi and last > lo

    return rule


class HangingQueue(Queue):
    """Passes requests to ``inner``, except those ``hang`` picks: they never complete,
    like a read stuck in a dead disk or a hung network file system.

    As for a read that really started, :meth:`aclose` cannot return while one hangs:
    it waits for :meth:`release` (which completes them with ``-EIO``).  Buffers of
    hung requests are never written.
    """

    def __init__(self, inner: Queue, hang: Callable[[Request], bool]) -> None:
        super().__init__(inner.capacity)
        self.name = f"hanging({inner.name})"
        self.transparent = False  # its reads hang where the file's would not
        self.inner = inner
        self.copies = inner.copies
        self.gathers = inner.gathers
        self.max_buffers = inner.max_buffers
        self.calls = inner.calls
        self.hang = hang
        self._hung: list[Request] = []
        self._ready: list[Completion] = []
        self._released = trio.Event()
        self.hung_total = 0

    @property
    def hung(self) -> int:
        """Requests hanging now."""
        return len(self._hung)

    def release(self) -> None:
        """Let the hung requests (and any later one) fail with ``-EIO``."""
        self._released.set()

    def cancel_unstarted(self) -> int:
        cancel = getattr(self.inner, "cancel_unstarted", None)
        return cancel() if cancel is not None else 0

    def _add(self, request: Request) -> None:
        if self._released.is_set() or not self.hang(request):
            self.inner.add(request)
            return
        self.hung_total += 1
        self._hung.append(request)

    def _take_released(self) -> None:
        if self._released.is_set() and self._hung:
            self._ready.extend(Completion(r.id, -errno.EIO) for r in self._hung)
            self._hung.clear()

    async def _wait(self, min_completions: int) -> list[Completion]:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._take_released()
        while len(self._ready) < min_completions:
            if self.inner.outstanding:
                self._ready.extend(await self.inner.wait(1))
            else:
                await self._released.wait()
                self._take_released()
        if self.inner.outstanding and self.inner.statistics().ready:
            self._ready.extend(await self.inner.wait(0))
        done, self._ready = self._ready, []
        return done

    async def _aclose(self) -> None:
        await self._released.wait()
        self._hung.clear()
        self._ready.clear()
        await self.inner.aclose()

    def _ready_count(self) -> int:
        return len(self._ready) + self.inner.statistics().ready
