"""Page sources (issue 22, item 1): the conformance suite over every source (the raw
image, the pages checkpoint, and the fixture source of per-chunk files,
tests/chunkdir_source.py), the registry, and the fixture source restored end to end
through the socket and through the userfaultfd emulator."""

from __future__ import annotations

import mmap
import os
import random

import pytest
import trio
from chunkdir_source import ChunkDirSource, chunk_path, make_chunk_dir
from uffd_run import fault_then_fill

import aio
import aio.testing
from loader import ClientError, DaemonOptions, LoaderConfig, TrioClient, UffdConfig, run_daemon
from loader.checkpoint import CheckpointError, create_checkpoint
from loader.source import (
    FileSource,
    PagesSource,
    RawImageSource,
    RemoteConfig,
    RemoteSource,
    StoreSource,
    open_source,
    register_source,
    registered_sources,
    unregister_source,
)
from loader.source.testing import check_source
from loader.uffd import _ioctl as _uffd
from workloads import SeaweedServer, make_sample_image

MiB = 1 << 20
PAGE = 4096
SIZE = 4 * MiB


def _why_unavailable(backend: str) -> str | None:
    try:
        aio.check_available(backend)
    except aio.BackendUnavailable as exc:
        return str(exc)
    return None


#: every backend, decided at collection (a skip says why: "io_uring disabled on this host", ...)
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(why is not None, reason=f"aio backend {b} unavailable: {why}"))
            for b, why in ((b, _why_unavailable(b)) for b in ("sync", "threads", "uring"))]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    raw = str(d / "memory.img")
    make_sample_image(raw, SIZE, seed=21)
    pages = str(d / "ckpt")
    create_checkpoint(raw, pages)
    chunks = make_chunk_dir(pages, str(d / "chunks"))
    with open(raw, "rb") as f:
        expected = f.read()
    return {"raw": raw, "pages": pages, "chunkdir": chunks, "expected": expected}


@pytest.fixture
def chunkdir_registered():
    register_source(ChunkDirSource)
    yield
    unregister_source(ChunkDirSource)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["raw", "pages", "chunkdir"])
async def test_every_source_passes_the_conformance_suite(images, kind, backend, chunkdir_registered):
    source = open_source(images[kind])
    assert type(source) is {"raw": RawImageSource, "pages": PagesSource, "chunkdir": ChunkDirSource}[kind]
    await check_source(source, images["expected"], lambda n: aio.open_queue(backend, n))


@pytest.fixture(scope="module")
def pushed(images, seaweed: SeaweedServer) -> str:
    """The pages checkpoint put into the session's S3 server as ``checkpoint push`` puts it."""
    from loader.remote import ObjectStore

    url = f"s3://{seaweed.bucket}/sources-{os.getpid()}"
    store = ObjectStore(url, endpoint=seaweed.endpoint, access_key_id=seaweed.access_key_id,
                        secret_access_key=seaweed.secret_access_key, env={})
    store.put_file("pages.img", os.path.join(images["pages"], "pages.img"), 8 << 20)
    with open(os.path.join(images["pages"], "index.msgpack"), "rb") as f:
        store.put_bytes("index.msgpack", f.read())
    return url


def _remote(seaweed: SeaweedServer, **kw) -> RemoteConfig:
    return RemoteConfig(endpoint=seaweed.endpoint, access_key_id=seaweed.access_key_id,
                        secret_access_key=seaweed.secret_access_key, env={}, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["s3", "file"])
async def test_a_checkpoint_in_a_store_passes_the_conformance_suite(images, pushed, seaweed, tmp_path, backend,
                                                                    where):
    """The remote source over S3 (the session's SeaweedFS) and over file://, with the
    chunk cache cold, then warm (every chunk from the cache, no GET of the pages); a
    backend that takes no calls (uring) refuses its requests at add."""
    url = pushed if where == "s3" else f"file://{images['pages']}"
    config = _remote(seaweed, cache_dir=str(tmp_path / "cache"), fetch_bound=64 << 10)
    source = open_source(url, remote=config)
    assert isinstance(source, RemoteSource) and source.local is None and source.files() == ()
    assert source.identity() == open_source(images["pages"]).identity()  # the same checkpoint, pushed
    if backend == "uring":
        queue = aio.open_queue(backend, 4)
        with pytest.raises(ValueError, match="Op.CALL"):
            queue.add(source.read(1, 0, [memoryview(bytearray(PAGE))]))
        await queue.aclose()
        source.close()
        return
    await check_source(source, images["expected"], lambda n: aio.open_queue(backend, n))
    cold = source.stats()
    assert cold["fetch"]["chunks_fetched"] >= len(source.checksums) and cold["fetch"]["wrong_chunks"] == 0
    # every block (1 MiB of whole chunks: the cache's entries) inserted once (taken last at close)
    assert source.inserter is not None
    assert cold["cache"]["inserts"] == -(-len(source.checksums) // source.inserter.block_chunks)
    source = open_source(url, remote=config)
    await check_source(source, images["expected"], lambda n: aio.open_queue(backend, n))
    warm = source.stats()
    assert warm["fetch"]["chunks_fetched"] == 0 and warm["fetch"]["gets"] == 0
    assert warm["store"]["gets"] == 1  # the index
    assert warm["fetch"]["chunks_cached"] >= len(source.checksums)


async def test_the_conformance_suite_fails_a_source_that_reads_wrong_bytes(images, tmp_path):
    """The suite can fail: a chunk file with one byte changed (its checksum no longer
    matches, and the bytes the requests read are not the memory's), and a source whose
    layout claims more than its file holds."""
    bad = make_chunk_dir(images["pages"], str(tmp_path / "bad"))
    with open(chunk_path(bad, 3), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(AssertionError, match="differ|checksum"):
        await check_source(ChunkDirSource(bad), images["expected"], lambda n: aio.open_queue("sync", n))
    source = open_source(images["raw"])
    fd = os.open(images["raw"], os.O_RDONLY | os.O_CLOEXEC)
    short = os.open(tmp_path / "short.img", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.truncate(short, SIZE // 2)
    try:
        with pytest.raises(AssertionError, match="does not fit"):
            await check_source(FileSource(source.layout, short), images["expected"],
                               lambda n: aio.open_queue("sync", n))
    finally:
        source.close()
        os.close(fd)
        os.close(short)


def test_open_source_asks_the_registered_sources_in_order(images):
    """A registered source goes before those registered so far (the chunk store's,
    registered at import, then the built-ins) and takes what it claims; taken out
    again, the same directory is a pages checkpoint without its pages file."""
    assert registered_sources() == (StoreSource, RemoteSource, PagesSource, RawImageSource)
    register_source(ChunkDirSource)
    try:
        assert registered_sources()[0] is ChunkDirSource
        source = open_source(images["chunkdir"])
        assert isinstance(source, ChunkDirSource) and source.local is None
        assert source.identity() == open_source(images["pages"]).identity().__class__(
            "chunkdir", SIZE, PAGE, source.identity().digest)
        source.close()
        assert isinstance(open_source(images["pages"]), PagesSource)  # not claimed: no chunks/ directory
    finally:
        unregister_source(ChunkDirSource)
    assert registered_sources() == (StoreSource, RemoteSource, PagesSource, RawImageSource)
    with pytest.raises(CheckpointError, match="pages file missing"):
        open_source(images["chunkdir"])


def test_a_chunk_file_of_the_wrong_size_is_refused_at_open(images, tmp_path):
    bad = make_chunk_dir(images["pages"], str(tmp_path / "bad"))
    with open(chunk_path(bad, 2), "ab") as f:
        f.write(b"x")
    with pytest.raises(CheckpointError, match="chunk 2 is"):
        ChunkDirSource(bad)


def _options(tmp_path, source, **kw):
    kw.setdefault("handle_signals", False)
    kw.setdefault("ready_line", False)
    return DaemonOptions(source=source, socket_path=str(tmp_path / "s.sock"), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_fixture_source_restores_through_the_socket(images, tmp_path, backend, chunkdir_registered):
    """A daemon restoring the chunk directory: waits for random ranges ahead of the
    sweep are answered, every chunk is verified, and the memory file ends as the image."""
    opts = _options(tmp_path, images["chunkdir"], aio_backend=backend,
                    wrap_queue=lambda q: aio.testing.DelayedQueue(q, 0.002))
    rng = random.Random(3)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        assert isinstance(state.source, ChunkDirSource)
        async with TrioClient.connect(state.server.path) as client:
            for _ in range(20):
                lo = rng.randrange(SIZE // PAGE) * PAGE
                await client.wait(lo, min(SIZE - lo, rng.randrange(1, 40) * PAGE))
            await client.wait(0, SIZE)
            fd = await client.memory_fd()
        try:
            with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                assert m[:] == images["expected"]
        finally:
            os.close(fd)
        s = state.loader.statistics()
        assert s.verify and s.chunks_verified == len(state.source.checksums) and s.reads_copied == 0
        state.stop()


async def test_the_fixture_source_never_serves_a_corrupt_chunk(images, tmp_path, chunkdir_registered):
    """Its checksums are the loader's: a chunk file with a byte flipped fails the waits on
    it, and the rest of the memory is still served."""
    bad = make_chunk_dir(images["pages"], str(tmp_path / "bad"))
    source = open_source(bad)
    first = next(r for r in source.layout if r.file_offset <= 5 * source.chunk_size < r.file_offset + r.length)
    at = first.mem_offset + 5 * source.chunk_size - first.file_offset
    source.close()
    with open(chunk_path(bad, 5), "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0x80]))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, _options(tmp_path, bad))
        async with TrioClient.connect(state.server.path) as client:
            with pytest.raises(ClientError) as info:
                await client.wait(at, PAGE)
            assert info.value.code == "corrupt"
            other = next(r for r in state.source.layout if r.mem_offset > at + 64 * 1024)
            await client.wait(other.mem_offset, PAGE)
        state.stop()


@pytest.mark.skipif(_uffd.unavailable() is not None, reason=str(_uffd.unavailable()))
async def test_the_fixture_source_restores_through_the_uffd_emulator(images, tmp_path, chunkdir_registered):
    """Firecracker's page-fault handler over the chunk directory: faults anywhere get the
    image's bytes, the fill completes the guest; direct copies are off (no local file)."""
    opts = _options(tmp_path, images["chunkdir"], uffd_socket=str(tmp_path / "uffd.sock"),
                    config=LoaderConfig(verify=False), uffd_config=UffdConfig.for_mode("fill"),
                    wrap_queue=lambda q: aio.testing.DelayedQueue(q, 0.001))
    rng = random.Random(4)
    faults = [(0, rng.randrange(SIZE // PAGE) * PAGE, PAGE) for _ in range(100)]
    state = await fault_then_fill(opts, SIZE, images["raw"], faults)
    assert state.uffd.statistics()["direct"] == "off (the source is not one local file)"
    assert state.uffd.faults >= 1
