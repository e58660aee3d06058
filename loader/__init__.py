"""The restore daemon: checkpoints, the loader, the memory file, the server and clients.

Public names are re-exported here and imported on first use, so that a command
such as ``pageload wait`` does not pay for modules it does not need.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Checkpoint": "loader.checkpoint",
    "CheckpointError": "loader.checkpoint",
    "open_checkpoint": "loader.checkpoint",
    "create_checkpoint": "loader.checkpoint",
    "inspect_checkpoint": "loader.checkpoint",
    "verify_checkpoint": "loader.checkpoint",
    "Layout": "loader.layout",
    "RangeSet": "loader.rangeset",
    "Destination": "loader.memfile",
    "MemoryFile": "loader.memfile",
    "Loader": "loader.scheduler",
    "LoaderConfig": "loader.scheduler",
    "LoadError": "loader.scheduler",
    "SequentialOrder": "loader.scheduler",
    "SweepOrder": "loader.scheduler",
    "WaitHandle": "loader.scheduler",
    "LoaderStatistics": "loader.stats",
    "Server": "loader.server",
    "Client": "loader.client",
    "TrioClient": "loader.client",
    "ClientError": "loader.client",
    "DaemonOptions": "loader.daemon",
    "run_daemon": "loader.daemon",
    "Trace": "loader.traces",
    "TraceError": "loader.traces",
    "load_trace": "loader.traces",
    "save_trace": "loader.traces",
    "run_loadgen": "loader.loadgen",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loader' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
