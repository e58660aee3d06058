"""The public surface of each package is what was meant, every name resolves, and
the packages import each other only downwards: cli -> bench -> workloads -> loader
-> (aio, protocol)."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import aio
import aio.testing
import bench
import loader
import loader.checkpoint
import loader.remote
import loader.source
import loader.store
import loader.vmm
import workloads

ROOT = Path(__file__).resolve().parent.parent

#: package -> the top-level packages of ours it may import
ALLOWED_IMPORTS = {
    "protocol": set(),
    "aio": set(),
    "loader": {"aio", "protocol"},
    "workloads": {"loader"},
    "bench": {"loader", "workloads", "aio", "protocol"},  # protocol: the latency section times it alone
    "cli": {"loader", "workloads", "bench", "aio", "protocol"},
}


def test_aio_public_names():
    assert set(aio.__all__) == {
        "AUTO_ORDER", "AioError", "BackendUnavailable", "Completion", "Op", "Queue", "QueueClosed", "QueueFull",
        "QueueStatistics", "Request", "backends", "check_available", "open_queue", "pick_auto", "usable_cpus",
        "IOV_MAX",
    }
    for name in aio.__all__:
        assert getattr(aio, name) is not None


def test_aio_testing_public_names():
    """Test tools live in aio.testing, not in aio's main interface."""
    assert set(aio.testing.__all__) == {
        "CHECKS", "DelayedQueue", "FaultInjectingQueue", "FaultRule", "HangingQueue", "MakeQueue", "check_queue",
        "fail_offsets", "hang_offsets", "probe_killed_by_sigill", "probe_killed_by_sigsegv",
    }
    for moved in ("DelayedQueue", "FaultInjectingQueue", "FaultRule", "fail_offsets"):
        assert not hasattr(aio, moved)


def test_loader_public_names():
    assert set(loader.__all__) == {
        "Client", "ClientError", "DaemonOptions", "DataRange", "Destination", "LatencyHistogram", "Layout",
        "LayoutError", "LoadError", "Loader", "LoaderConfig", "LoaderStatistics", "MemoryFile", "RangeSet",
        "OrderHooks", "ReadKind", "SequentialOrder", "Server", "StartupError", "SweepOrder", "TrioClient", "WaitHandle",
        "human",
        "mapped_memory",
        "parse_size", "run_daemon",
        # working sets
        "AccessRecorder", "CheckpointIdentity", "WorkingSet", "WorkingSetError", "WorkingSetOrder",
        "WorkingSetRecorder", "checkpoint_identity", "format_working_set", "merge_working_sets",
        "read_working_set", "replay_order", "write_working_set",
        # operations: asyncio client, metrics, systemd
        "ActivationError", "AsyncioClient", "ConnectionLost", "MetricsAddress", "MetricsError", "MetricsServer",
        "Notifier", "SocketInUse", "StatsCollector", "activated_socket", "listen_fds", "parse_metrics_address",
        "BUSY_POLL_US", "MAX_BUSY_POLL_US",
        # Firecracker's page-fault handler: the handler modes
        "MAX_UFFD_SPIN_US", "UFFD_MODES", "UffdConfig",
    }
    assert set(loader.checkpoint.__all__) == {
        "DEFAULT_CHUNK_SIZE", "BadChunk", "Checkpoint", "CheckpointError", "CreateReport", "PagesIndex",
        "VerifyReport", "read_pages_index",
        "create_checkpoint",
        "format_inspection", "inspect_checkpoint", "looks_like_pages_checkpoint", "open_checkpoint",
        "open_pages_checkpoint", "open_raw_image", "verify_checkpoint",
        # an index fetched from a store; a checkpoint opened elsewhere described
        "parse_pages_index", "describe_checkpoint",
    }


def test_loader_source_public_names():
    """Page sources (the seam under the loader) are their own package."""
    assert set(loader.source.__all__) == {
        "CheckpointIdentity", "ExplainsFailures", "FileSource", "LocalPages", "PageSource", "PagesSource",
        "RawImageSource",
        "SourceClass", "file_digest", "layout_digest", "open_regular", "open_source", "register_source",
        "registered_sources", "unregister_source",
        # a pages checkpoint in object storage (docs/REMOTE.md)
        "RemoteConfig", "RemoteSource", "is_store_url",
        # a snapshot in a chunk store (docs/FORMAT.md, section 3)
        "StoreSource",
    }


def test_loader_remote_public_names():
    """Object storage is its own package, imported at first use (not by loader)."""
    assert set(loader.remote.__all__) == {
        "CODES", "DEFAULT_REGION", "ObjectStore", "RetryPolicy", "StoreError", "StoreStats", "StoreURL",
        "parse_store_url",
        # the host chunk cache
        "DEFAULT_CACHE_SIZE", "CacheError", "CacheStats", "ChunkCache", "PruneReport", "default_cache_dir",
        "parse_cache_size",
        # a chunk store's chunks in it, content-addressed
        "CONTENT_NAMESPACE",
    }
    assert not hasattr(loader, "ObjectStore")
    for name in loader.remote.__all__:
        assert getattr(loader.remote, name) is not None
    with pytest.raises(AttributeError):
        loader.remote.NoSuchName  # noqa: B018


def test_the_store_client_is_imported_without_numpy_which_the_cache_brings():
    """A restore from a store sends its index's GET before NumPy is imported (70 ms, the
    cache's and the range table's), and imports it while the GET is in flight."""
    code = ("import sys; from loader.remote import ObjectStore, StoreError; assert 'numpy' not in sys.modules; "
            "from loader.remote import ChunkCache; assert 'numpy' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr


def test_loader_store_public_names():
    """The chunk store is its own package (docs/FORMAT.md, section 3)."""
    assert set(loader.store.__all__) == {
        "CODEC_IDS", "CODEC_LZ4", "CODEC_NAMES", "CODEC_NONE", "CODEC_ZSTD", "DEFAULT_CHUNK_SIZE",
        "DEFAULT_ZSTD_LEVEL", "FORMAT", "HASH_ALGORITHM", "HASH_BYTES", "MAX_CHUNK_SIZE", "MAX_MANIFEST_BYTES",
        "MIN_CHUNK_SIZE", "VERSION", "CheckpointError", "Manifest", "check_snapshot_name", "chunk_hash",
        "chunk_key", "decode_manifest", "encode_manifest", "hash_of_chunk_key", "looks_like_manifest",
        "manifest_digest", "max_stored_length", "snapshot_key", "split_snapshot_ref",
    }
    assert not hasattr(loader, "Manifest")


def test_loader_vmm_public_names():
    """Zero-copy guest memory for VMM authors is its own module, not in loader's main list."""
    assert set(loader.vmm.__all__) == {"ZeroCopyMemory", "ZeroCopyUnsupported"}
    assert not hasattr(loader, "ZeroCopyMemory")


def test_every_exported_name_resolves_to_itself():
    for module in (aio, aio.testing, loader, loader.checkpoint, loader.remote, loader.source, loader.store,
                   loader.vmm, workloads, bench):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert obj.__name__ == name, (module.__name__, name)


def _imports(path: Path) -> set[str]:
    """Top-level packages ``path`` imports absolutely (relative imports stay inside)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_packages_import_only_downwards():
    ours = set(ALLOWED_IMPORTS)
    wrong = []
    for package, allowed in ALLOWED_IMPORTS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in (_imports(path) & ours) - allowed - {package}:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []


def test_every_module_imports_on_its_own():
    for package in ALLOWED_IMPORTS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__main__.py":
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:  # the uring backend needs the optional native binding
                assert (name, exc.name) == ("aio._uring", "liburing"), exc


def test_the_daemons_start_up_imports_nothing_it_does_not_need():
    """``pageload restore`` imports the CLI and the daemon; the asyncio client (asyncio,
    aiofiles), the metrics exposition (prometheus_client, with http.server and ssl) and
    the test tools are imported at first use only: they were about 60 ms of the 0.32 s
    from spawn to READY."""
    import subprocess
    import sys

    heavy = ("asyncio", "aiofiles", "prometheus_client", "aio.testing", "obstore", "loader.remote")
    code = ("import sys, cli, cli._restore, loader.daemon._run; "
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == []
    assert loader.AsyncioClient.__name__ == "AsyncioClient"  # still there, imported on first use


def test_every_package_is_in_the_distribution():
    """pyproject.toml lists the packages setuptools installs: a subpackage missing there
    imports from a checkout but not from an installed wheel."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts)
             for top in ("loader", "aio", "protocol", "workloads", "bench", "cli")
             for p in (root / top).rglob("__init__.py")}
    assert found == listed
