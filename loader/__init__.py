"""The restore daemon's core: the loader loop, the memory file, the server and clients.

Checkpoint formats live in :mod:`loader.checkpoint`.  Everything here is
re-exported from private modules; the load generator, traces and sample images
are in :mod:`workloads`, the benchmark harness in :mod:`bench`, the command line
in :mod:`cli`.
"""

from ._memfile import Destination, MemoryFile
from ._sockets import SocketInUse
from ._startup import StartupError
from ._units import human, parse_size
from .core._config import LoaderConfig, LoadError, ReadKind, WaitHandle
from .core._layout import DataRange, Layout, LayoutError
from .core._loader import Loader
from .core._rangeset import RangeSet
from .core._replay import AccessRecorder, WorkingSetRecorder, merge_working_sets, replay_order
from .core._stats import LatencyHistogram, LoaderStatistics
from .core._sweep import OrderHooks, SequentialOrder, SweepOrder, WorkingSetOrder
from .core._workingset import (
    CheckpointIdentity,
    WorkingSet,
    WorkingSetError,
    checkpoint_identity,
    format_working_set,
    read_working_set,
    write_working_set,
)
from .daemon._metrics import MetricsAddress, MetricsError, MetricsServer, StatsCollector, parse_metrics_address
from .daemon._options import DaemonOptions
from .daemon._run import run_daemon
from .daemon._sdnotify import ActivationError, Notifier, activated_socket, listen_fds
from .socket._client import Client, ClientError, ConnectionLost, TrioClient, mapped_memory
from .socket._server import Server
from .socket._session import BUSY_POLL_US, MAX_BUSY_POLL_US
from .uffd._config import MAX_UFFD_SPIN_US, UFFD_MODES, UffdConfig


def __getattr__(name: str) -> object:
    # the asyncio client is imported at first use: asyncio and aiofiles were about 60 ms
    # of every daemon's start-up, which needs neither
    if name == "AsyncioClient":
        from .socket._asyncio_client import AsyncioClient

        return AsyncioClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUSY_POLL_US",
    "MAX_BUSY_POLL_US",
    "MAX_UFFD_SPIN_US",
    "UFFD_MODES",
    "UffdConfig",
    "AccessRecorder",
    "CheckpointIdentity",
    "WorkingSet",
    "WorkingSetError",
    "WorkingSetOrder",
    "WorkingSetRecorder",
    "checkpoint_identity",
    "format_working_set",
    "merge_working_sets",
    "read_working_set",
    "replay_order",
    "write_working_set",
    "ActivationError",
    "AsyncioClient",
    "Client",
    "ClientError",
    "ConnectionLost",
    "DaemonOptions",
    "DataRange",
    "Destination",
    "LatencyHistogram",
    "Layout",
    "LayoutError",
    "LoadError",
    "Loader",
    "LoaderConfig",
    "LoaderStatistics",
    "MemoryFile",
    "MetricsAddress",
    "MetricsError",
    "MetricsServer",
    "Notifier",
    "RangeSet",
    "ReadKind",
    "OrderHooks",
    "SequentialOrder",
    "StatsCollector",
    "Server",
    "SocketInUse",
    "StartupError",
    "SweepOrder",
    "TrioClient",
    "WaitHandle",
    "activated_socket",
    "human",
    "listen_fds",
    "mapped_memory",
    "parse_metrics_address",
    "parse_size",
    "run_daemon",
]
