"""The public surface of each package is what was meant, and every name resolves."""

from __future__ import annotations

import aio
import loader


def test_aio_public_names():
    assert set(aio.__all__) == {
        "AUTO_ORDER", "AioError", "BackendUnavailable", "Completion", "DelayedQueue", "FaultInjectingQueue",
        "FaultRule", "Op", "Queue", "QueueClosed", "QueueFull", "QueueStatistics", "Request", "backends",
        "check_available", "fail_offsets", "open_queue", "pick_auto",
    }
    for name in aio.__all__:
        assert getattr(aio, name) is not None


def test_loader_public_names_resolve():
    assert "Loader" in loader.__all__ and "Client" in loader.__all__
    for name in loader.__all__:
        obj = getattr(loader, name)
        assert getattr(obj, "__name__", name) == name
