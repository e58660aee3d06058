"""In-line backend: requests run one by one inside :meth:`wait`.  For debugging and tests."""

from __future__ import annotations

from collections import deque

import trio

from ._base import Completion, Queue, Request, SplicePipe, run_request


class SyncQueue(Queue):
    """Runs each request synchronously in the caller's thread, urgent ones first.

    Nothing runs between :meth:`add` and :meth:`wait`; ``wait`` runs requests until
    ``min_completions`` are ready, yielding to trio between them.
    """

    name = "sync"
    copies = True
    gathers = True
    calls = True  # Op.CALL: run inline in wait(), like a read

    def __init__(self, capacity: int = 64) -> None:
        super().__init__(capacity)
        self._urgent: deque[Request] = deque()
        self._normal: deque[Request] = deque()
        self._ready: list[Completion] = []
        self._pipe = SplicePipe()  # for Op.COPY

    def _add(self, request: Request) -> None:
        (self._urgent if request.urgent else self._normal).append(request)

    async def _wait(self, min_completions: int) -> list[Completion]:
        await trio.lowlevel.checkpoint()
        while len(self._ready) < max(min_completions, 1) and (self._urgent or self._normal):
            request = self._urgent.popleft() if self._urgent else self._normal.popleft()
            self._ready.append(Completion(request.id, run_request(request, self._pipe)))
        done, self._ready = self._ready, []
        return done

    async def _aclose(self) -> None:
        self._urgent.clear()
        self._normal.clear()
        self._ready.clear()
        self._pipe.close()
        await trio.lowlevel.checkpoint()

    def _ready_count(self) -> int:
        return len(self._ready)
