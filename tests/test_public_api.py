"""The public surface of each package is what was meant, and every name resolves."""

from __future__ import annotations

import aio
import aio.testing
import loader


def test_aio_public_names():
    assert set(aio.__all__) == {
        "AUTO_ORDER", "AioError", "BackendUnavailable", "Completion", "Op", "Queue", "QueueClosed", "QueueFull",
        "QueueStatistics", "Request", "backends", "check_available", "open_queue", "pick_auto",
    }
    for name in aio.__all__:
        assert getattr(aio, name) is not None


def test_aio_testing_public_names():
    """Test tools live in aio.testing, not in aio's main interface."""
    assert set(aio.testing.__all__) == {
        "CHECKS", "DelayedQueue", "FaultInjectingQueue", "FaultRule", "MakeQueue", "check_queue", "fail_offsets",
        "probe_killed_by_sigill", "probe_killed_by_sigsegv",
    }
    for name in aio.testing.__all__:
        assert getattr(aio.testing, name) is not None
    for moved in ("DelayedQueue", "FaultInjectingQueue", "FaultRule", "fail_offsets"):
        assert not hasattr(aio, moved)


def test_loader_public_names_resolve():
    assert "Loader" in loader.__all__ and "Client" in loader.__all__
    for name in loader.__all__:
        obj = getattr(loader, name)
        assert getattr(obj, "__name__", name) == name
