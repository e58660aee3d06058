"""Restoring a snapshot from a chunk store (issue 24, item 4): the store source
(loader/source/_store.py) through the conformance suite on every backend that takes
calls, end to end through the socket and through the userfaultfd emulator, from a
local store and from a SeaweedFS ``s3://`` store; chunks verified (BLAKE3) before
they count, the host chunk cache keyed on chunk hashes (shared between snapshots).
Snapshots are written by the tests' own writer (tests/store_writer.py)."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import uuid
from typing import Any

import pytest
import trio
import xxhash
from store_writer import snapshot_from, write_local, write_remote
from test_sources import BACKENDS
from uffd_run import fault_then_fill

import aio
import aio.testing
import loader.store._read
from loader import ClientError, DaemonOptions, LoaderConfig, TrioClient, UffdConfig, run_daemon
from loader.checkpoint import CheckpointError
from loader.remote import ObjectStore, RetryPolicy
from loader.source import RemoteConfig, StoreSource, open_source
from loader.source.testing import check_source
from loader.store import encode_manifest, snapshot_key
from loader.uffd import _ioctl as _uffd
from workloads import SeaweedServer, make_sample_image

MiB = 1 << 20
PAGE = 4096
SIZE = 4 * MiB
CHUNK = 64 << 10
FAST = RetryPolicy(retries=2, backoff=0.01, max_backoff=0.05)


def _memory() -> bytes:
    """A compressible image: the sample image's data pages (random bytes) with every
    other 4 KiB of them zeroed, and its holes (whole zero chunks)."""
    path = f"/tmp/pageload-store-{os.getpid()}.img"
    make_sample_image(path, SIZE, seed=24)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    os.unlink(path)
    for at in range(0, SIZE, 2 * PAGE):
        data[at : at + PAGE] = bytes(PAGE)
    return bytes(data)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("store")
    memory = _memory()
    raw = str(d / "memory.img")
    with open(raw, "wb") as f:
        f.write(memory)
    store = str(d / "store")
    ref = write_local(store, "base", memory, chunk_size=CHUNK)
    raw_ref = write_local(str(d / "raw-store"), "base", memory, chunk_size=CHUNK, codec="none")
    lz4_ref = write_local(str(d / "lz4-store"), "base", memory, chunk_size=CHUNK, codec="lz4")
    return {"memory": memory, "raw": raw, "store": store, "ref": ref, "raw_ref": raw_ref, "lz4_ref": lz4_ref,
            "dir": d}


def _objects(seaweed: SeaweedServer, url: str) -> ObjectStore:
    return ObjectStore(url, endpoint=seaweed.endpoint, access_key_id=seaweed.access_key_id,
                       secret_access_key=seaweed.secret_access_key, env={}, policy=FAST)


@pytest.fixture(scope="module")
def s3_store(image: dict[str, Any], seaweed: SeaweedServer) -> str:
    """The snapshot written into the session's S3 server: returns the store's URL."""
    url = f"s3://{seaweed.bucket}/store-{uuid.uuid4().hex[:12]}"
    write_remote(_objects(seaweed, url), "base", image["memory"], chunk_size=CHUNK)
    return url


def _remote(seaweed: SeaweedServer, tmp_path: Any, **kw: Any) -> RemoteConfig:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return RemoteConfig(endpoint=seaweed.endpoint, access_key_id=seaweed.access_key_id,
                        secret_access_key=seaweed.secret_access_key, env={}, policy=FAST, **kw)


def _stored_chunks(memory: bytes) -> int:
    return sum(1 for at in range(0, len(memory), CHUNK) if any(memory[at : at + CHUNK]))


# -- the conformance suite -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["ref", "raw_ref", "lz4_ref"])
async def test_a_local_store_snapshot_passes_the_conformance_suite(image, backend, which):
    """zstd chunks, raw ones and lz4 ones; a backend without calls (uring) refuses its requests."""
    source = open_source(image[which])
    assert isinstance(source, StoreSource) and source.local is None and source.kind == "store"
    if backend == "uring":
        queue = aio.open_queue(backend, 4)
        with pytest.raises(ValueError, match="Op.CALL"):
            queue.add(source.read(1, 0, [memoryview(bytearray(PAGE))]))
        await queue.aclose()
        source.close()
        return
    await check_source(source, image["memory"], lambda n: aio.open_queue(backend, n))
    fetch = source.stats()["fetch"]
    assert fetch["chunks_fetched"] >= _stored_chunks(image["memory"]) and fetch["failures"] == 0


async def test_a_local_store_stages_at_most_three_chunks_a_cpu_whatever_the_threads(image):
    """Sixteen worker threads reading a local store's zstd chunks: the staging and
    scratch buffers made are bounded by the CPUs (three a CPU), not one a thread
    (16 x 2 MiB of staging, uncounted as shmem, once)."""
    source = open_source(image["ref"])
    assert isinstance(source, StoreSource)
    limit = 3 * aio.usable_cpus()
    assert source.reader.stages.limit == limit and source._scratch.limit == limit
    await check_source(source, image["memory"], lambda n: aio.open_queue("threads", n, threads=16))
    assert 1 <= source.reader.stages.made <= limit and source._scratch.made <= limit


def _resident_pages(buffer: mmap.mmap) -> int:
    """Pages of ``buffer`` in memory now (``mincore``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    pages = (len(buffer) + PAGE - 1) // PAGE
    vec = ctypes.create_string_buffer(pages)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    assert libc.mincore(address, len(buffer), vec) == 0, os.strerror(ctypes.get_errno())
    return sum(b & 1 for b in vec.raw)


async def test_an_s3_store_gives_back_its_staging_past_the_first_pages_after_each_chunk(image, s3_store, seaweed,
                                                                                      tmp_path, monkeypatch):
    """Chunks from object storage: a staging buffer for each GET in flight, each given
    back past its first pages once its chunk is decoded (what it holds is what its GET
    is bringing, not the largest chunk it ever brought); a local store keeps its few."""
    monkeypatch.setattr(loader.store._read, "STAGING_KEPT", PAGE)
    source = open_source(f"{s3_store}/snapshots/base", remote=_remote(seaweed, tmp_path, cache=False))
    assert isinstance(source, StoreSource) and source.reader.release_staging
    await check_source(source, image["memory"], lambda n: aio.open_queue("threads", n))
    stages = source.reader.stages
    assert stages.made >= 1
    held = [stages.take() for _ in range(stages.made)]
    assert all(_resident_pages(b) <= 1 for b in held), [_resident_pages(b) for b in held]
    local = open_source(image["ref"])
    assert isinstance(local, StoreSource) and not local.reader.release_staging


def test_open_source_claims_a_snapshot_by_its_shape_and_its_manifest(image, tmp_path):
    """STORE/snapshots/NAME is claimed when it starts as a manifest; the same bytes
    elsewhere, or another file there, are not; the identity is the manifest's."""
    source = open_source(image["ref"])
    assert isinstance(source, StoreSource)
    identity = source.identity()
    with open(image["ref"], "rb") as f:
        assert identity.digest == xxhash.xxh3_64_intdigest(f.read()) and identity.kind == "store"
    source.close()
    assert StoreSource.claims(image["ref"]) and StoreSource.claims("s3://bucket/p/snapshots/x")
    assert not StoreSource.claims(image["raw"]) and not StoreSource.claims("s3://bucket/p/x")
    other = tmp_path / "snapshots" / "raw"
    other.parent.mkdir()
    other.write_bytes(image["memory"][: 1 << 16])
    assert not StoreSource.claims(str(other))
    raw = open_source(str(other))
    assert type(raw).__name__ == "RawImageSource"
    raw.close()


def test_a_bad_manifest_or_a_store_without_chunks_is_one_line(image, tmp_path):
    store = tmp_path / "s"
    (store / "snapshots").mkdir(parents=True)
    manifest, _ = snapshot_from(image["memory"], chunk_size=CHUNK)
    data = encode_manifest(manifest)
    (store / "snapshots" / "x").write_bytes(data)
    with pytest.raises(CheckpointError, match="chunks: missing"):
        open_source(str(store / "snapshots" / "x"))
    (store / "chunks").mkdir()
    (store / "snapshots" / "x").write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match="truncated manifest"):
        open_source(str(store / "snapshots" / "x"))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "uring"])
async def test_a_store_in_s3_passes_the_suite_cold_then_warm_from_the_cache(image, s3_store, seaweed, tmp_path,
                                                                            backend):
    """Cold: every stored chunk GET once at least; warm (the same cache directory):
    no GET but the manifest's."""
    ref = f"{s3_store}/snapshots/base"
    config = _remote(seaweed, tmp_path)
    source = open_source(ref, remote=config)
    assert isinstance(source, StoreSource) and source.files() == ()
    assert source.identity() == open_source(image["ref"]).identity()  # the same snapshot, elsewhere
    await check_source(source, image["memory"], lambda n: aio.open_queue(backend, n))
    cold = source.stats()
    n = _stored_chunks(image["memory"])
    assert cold["fetch"]["chunks_fetched"] >= n and cold["store"]["gets"] >= n + 1
    source = open_source(ref, remote=config)
    await check_source(source, image["memory"], lambda n: aio.open_queue(backend, n))
    warm = source.stats()
    assert warm["store"]["gets"] == 1 and warm["fetch"]["chunks_fetched"] == 0
    assert warm["fetch"]["chunks_cached"] >= n


# -- restores through the daemon -----------------------------------------------------------------


def _options(tmp_path: Any, source: str, **kw: Any) -> DaemonOptions:
    kw.setdefault("handle_signals", False)
    kw.setdefault("ready_line", False)
    return DaemonOptions(source=source, socket_path=str(tmp_path / "s.sock"), **kw)


async def _check_memory(client: TrioClient, expected: bytes) -> None:
    fd = await client.memory_fd()
    try:
        with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:] == expected
    finally:
        os.close(fd)


async def _restore(opts: DaemonOptions, expected: bytes, seed: int) -> dict[str, Any]:
    """Waits for random ranges ahead of the sweep, then all of it: the image's bytes."""
    rng = random.Random(seed)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        assert isinstance(state.source, StoreSource) and state.backend == "threads"
        async with TrioClient.connect(state.server.path) as client:
            for _ in range(20):
                lo = rng.randrange(SIZE // PAGE) * PAGE
                await client.wait(lo, min(SIZE - lo, rng.randrange(1, 40) * PAGE))
            await client.wait(0, SIZE)
            await _check_memory(client, expected)
            stats = await client.stats()
        s = state.loader.statistics()
        # every chunk checked once, by its BLAKE3 as it was read (the reader's count), and
        # not hashed a second time by the loader against the manifest's xxh3 column
        assert s.verify and s.chunks_verified == 0 and s.waits_failed == 0
        fetch = stats["remote"]["fetch"]
        assert fetch["chunks_fetched"] + fetch["chunks_cached"] >= _stored_chunks(expected)
        state.stop()
    return stats


@pytest.mark.parametrize("which", ["ref", "lz4_ref"])
async def test_a_local_store_snapshot_restores_through_the_socket(image, tmp_path, which):
    opts = _options(tmp_path, image[which], wrap_queue=lambda q: aio.testing.DelayedQueue(q, 0.002))
    stats = await _restore(opts, image["memory"], 5)
    assert stats["remote"]["fetch"]["wrong_chunks"] == 0 and stats["remote"]["store"] is None


async def test_an_s3_store_snapshot_restores_through_the_socket_then_from_the_cache(image, s3_store, seaweed,
                                                                                   tmp_path):
    """The second restore on the host (same cache) makes no GET of a chunk."""
    ref = f"{s3_store}/snapshots/base"
    cold = await _restore(_options(tmp_path, ref, remote=_remote(seaweed, tmp_path), fetch_concurrency=8,
                                   wrap_queue=lambda q: aio.testing.DelayedQueue(q, 0.002)), image["memory"], 6)
    assert cold["remote"]["fetch"]["chunks_fetched"] >= _stored_chunks(image["memory"])
    warm = await _restore(_options(tmp_path, ref, remote=_remote(seaweed, tmp_path), fetch_concurrency=8),
                          image["memory"], 7)
    assert warm["remote"]["store"]["gets"] == 1 and warm["remote"]["fetch"]["chunks_fetched"] == 0


async def test_two_snapshots_sharing_chunks_fetch_each_shared_chunk_once_per_host(image, seaweed, tmp_path):
    """Snapshot B differs from A in 3 chunks: restoring B after A on the same host
    (the same cache) GETs only those 3 chunks and B's manifest."""
    url = f"s3://{seaweed.bucket}/shared-{uuid.uuid4().hex[:12]}"
    objects = _objects(seaweed, url)
    a = image["memory"]
    b = bytearray(a)
    changed = [k for k in range(SIZE // CHUNK) if any(a[k * CHUNK : (k + 1) * CHUNK])][2:5]
    for k in changed:
        b[k * CHUNK + 100] ^= 0x5A
    write_remote(objects, "a", a, chunk_size=CHUNK)
    write_remote(objects, "b", bytes(b), chunk_size=CHUNK)
    first = await _restore(_options(tmp_path, f"{url}/snapshots/a", remote=_remote(seaweed, tmp_path)), a, 8)
    assert first["remote"]["store"]["gets"] == 1 + _stored_chunks(a)
    second = await _restore(_options(tmp_path, f"{url}/snapshots/b", remote=_remote(seaweed, tmp_path)),
                            bytes(b), 9)
    assert second["remote"]["store"]["gets"] == 1 + len(changed)
    assert second["remote"]["fetch"]["chunks_fetched"] == len(changed)


def _forge(store: str, name: str, memory: bytes, k: int, codec: str = "zstd") -> tuple[str, int]:
    """A copy of the snapshot whose chunk at memory chunk ``k`` is stored as other
    bytes, with the manifest's xxh3 made to match them (only BLAKE3 tells): returns
    the snapshot's path and a memory offset in that chunk."""
    manifest, objects = snapshot_from(memory, chunk_size=CHUNK, codec=codec)
    row = list(manifest.offsets).index(k * CHUNK)
    forged = bytearray(memory[k * CHUNK : (k + 1) * CHUNK])
    forged[PAGE + 1000] ^= 0x01
    import zstandard

    objects[manifest.key_at(row)] = snapshot_from(bytes(forged), chunk_size=CHUNK, codec=codec)[1].popitem()[1] \
        if codec == "lz4" else zstandard.ZstdCompressor().compress(bytes(forged))
    manifest.stored_lengths[row] = len(objects[manifest.key_at(row)])
    manifest.xxh3[row] = xxhash.xxh3_64_intdigest(bytes(forged))
    for key, body in objects.items():
        path = os.path.join(store, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(body)
    os.makedirs(os.path.join(store, "snapshots"), exist_ok=True)
    ref = os.path.join(store, snapshot_key(name))
    with open(ref, "wb") as f:
        f.write(encode_manifest(manifest))
    return ref, k * CHUNK + PAGE + 1000


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
async def test_a_chunk_corrupt_in_the_store_is_never_served(image, tmp_path, codec):
    """A chunk stored as other bytes (a valid frame of them), which even match the
    manifest's xxh3: BLAKE3 fails the call, the waits on it fail with ``corrupt``
    naming the chunk, the rest of memory loads, and the chunk is fetched once, not once
    per page."""
    k = next(k for k in range(SIZE // CHUNK) if any(image["memory"][k * CHUNK : (k + 1) * CHUNK]))
    ref, at = _forge(str(tmp_path / "forged"), "bad", image["memory"], k, codec)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, _options(tmp_path, ref))
        async with TrioClient.connect(state.server.path) as client:
            with pytest.raises(ClientError) as info:
                await client.wait(at - at % PAGE, PAGE)
            assert info.value.code == "corrupt", info.value
            assert f"the chunk at memory {k * CHUNK:#x}" in info.value.message, info.value.message
            assert "BLAKE3" in info.value.message, info.value.message
            with trio.fail_after(60):
                while not state.loader.done.is_set():
                    await trio.sleep(0.02)
            fd = await client.memory_fd()
            with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                assert m[: k * CHUNK] == image["memory"][: k * CHUNK]
                assert m[(k + 1) * CHUNK :] == image["memory"][(k + 1) * CHUNK :]
                assert m[at - at % PAGE : at - at % PAGE + PAGE] != image["memory"][at - at % PAGE :
                                                                                    at - at % PAGE + PAGE]
            os.close(fd)
            remote = (await client.stats())["remote"]
        s = state.loader.statistics()
        assert s.failed_bytes == CHUNK
        assert remote["fetch"]["wrong_chunks"] == 1 and remote["fetch"]["failed_chunks"] == 1
        state.stop()


async def test_a_chunk_missing_from_the_store_fails_its_waits_as_unavailable_and_the_rest_loads(image, tmp_path):
    """A chunk object gone from a local store (deleted by hand, or by a careless gc):
    its waits fail with ``unavailable`` naming the chunk, the chunk is looked for once
    (not once per page as the loader narrows the failure down), and the rest loads."""
    from loader.store import chunk_key, decode_manifest

    store = str(tmp_path / "store")
    ref = write_local(store, "gone", image["memory"], chunk_size=CHUNK)
    with open(ref, "rb") as f:
        manifest = decode_manifest(f.read(), ref)
    row = len(manifest.offsets) // 2
    at = manifest.offsets[row] + next(i for i in range(0, CHUNK, PAGE)
                                      if any(image["memory"][manifest.offsets[row] + i :
                                                             manifest.offsets[row] + i + PAGE]))
    os.unlink(os.path.join(store, chunk_key(manifest.hash_at(row))))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, _options(tmp_path, ref))
        async with TrioClient.connect(state.server.path) as client:
            with pytest.raises(ClientError) as info:
                await client.wait(at, PAGE)
            assert info.value.code == "unavailable", info.value
            assert f"the chunk at memory {manifest.offsets[row]:#x}" in info.value.message, info.value.message
            with trio.fail_after(60):
                while not state.loader.done.is_set():
                    await trio.sleep(0.02)
            fd = await client.memory_fd()
            lo, hi = manifest.offsets[row], manifest.offsets[row] + manifest.lengths[row]
            with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                assert m[:lo] == image["memory"][:lo] and m[hi:] == image["memory"][hi:]
            os.close(fd)
            remote = (await client.stats())["remote"]
        assert state.loader.statistics().failed_bytes == manifest.lengths[row]
        assert remote["fetch"]["failed_chunks"] == 1
        state.stop()


async def test_a_corrupt_cache_entry_is_dropped_and_fetched_again(image, s3_store, seaweed, tmp_path):
    ref = f"{s3_store}/snapshots/base"
    config = _remote(seaweed, tmp_path)
    source = open_source(ref, remote=config)
    await check_source(source, image["memory"], lambda n: aio.open_queue("threads", n))
    entries = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "cache") for f in files
               if f[:1] != "." and "-" in f and os.sep + "626c616b65330000" + os.sep in d + os.sep]
    assert len(entries) == _stored_chunks(image["memory"])
    with open(entries[0], "r+b") as f:
        f.seek(20)
        byte = f.read(1)
        f.seek(20)
        f.write(bytes([byte[0] ^ 0xFF]))
    warm = await _restore(_options(tmp_path, ref, remote=config), image["memory"], 10)
    assert warm["remote"]["fetch"]["cache_dropped"] == 1 and warm["remote"]["fetch"]["chunks_fetched"] == 1
    assert warm["remote"]["store"]["gets"] == 2  # the manifest and that chunk


@pytest.mark.skipif(_uffd.unavailable() is not None, reason=str(_uffd.unavailable()))
@pytest.mark.parametrize("where", ["local", "s3"])
async def test_a_store_snapshot_restores_through_the_uffd_emulator(image, tmp_path, where, request):
    if where == "local":
        ref, remote = image["ref"], None
    else:
        seaweed = request.getfixturevalue("seaweed")
        ref, remote = f"{request.getfixturevalue('s3_store')}/snapshots/base", _remote(seaweed, tmp_path)
    opts = _options(tmp_path, ref, remote=remote, uffd_socket=str(tmp_path / "uffd.sock"),
                    config=LoaderConfig(), uffd_config=UffdConfig.for_mode("fill"),
                    wrap_queue=lambda q: aio.testing.DelayedQueue(q, 0.001))
    rng = random.Random(11)
    faults = [(0, rng.randrange(SIZE // PAGE) * PAGE, PAGE) for _ in range(100)]
    state = await fault_then_fill(opts, SIZE, image["raw"], faults)
    assert state.uffd.statistics()["direct"].startswith("off (")  # no local file; checksums verified
    assert state.uffd.faults >= 1


# -- checkpoint inspect and verify; pageload restore ------------------------------------------------


def test_inspect_describes_a_snapshot_its_parent_chain_and_a_store(image, tmp_path, capsys):
    """A child two chunks away from its parent: inspect says its size, chunks, stored
    bytes and ratio, codecs, its parent chain (a replaced grandparent said so) and
    what it adds; inspect STORE lists the snapshots."""
    import json

    from cli import main
    from loader.store import manifest_digest

    store = str(tmp_path / "st")
    a = image["memory"]
    grand = write_local(store, "grand", bytes(SIZE // 2) + a[SIZE // 2 :], chunk_size=CHUNK)
    with open(grand, "rb") as f:
        grand_digest = manifest_digest(f.read())
    base = write_local(store, "base", a, chunk_size=CHUNK, parent="grand", parent_digest=bytes(32))
    with open(base, "rb") as f:
        base_digest = manifest_digest(f.read())
    b = bytearray(a)
    rows = [k for k in range(SIZE // CHUNK) if any(a[k * CHUNK : (k + 1) * CHUNK])]
    for k in rows[:2]:
        b[k * CHUNK + PAGE + 5] ^= 1
    child = write_local(store, "child", bytes(b), chunk_size=CHUNK, parent="base", parent_digest=base_digest)
    assert main(["checkpoint", "inspect", "--json", child]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "store snapshot" and info["chunks"] == len(rows) and info["memory_size"] == SIZE
    assert info["codecs"]["zstd"]["chunks"] == len(rows) and info["ratio"] > 1.5
    assert [p["name"] for p in info["parent_chain"]] == ["base", "grand"]
    assert info["parent_chain"][0]["status"] == "ok" and info["parent_chain"][1]["status"].startswith("replaced")
    assert grand_digest != bytes(32)
    assert info["shared_with_parent"]["new_chunks"] == 2 and info["shared_with_parent"]["chunks"] == len(rows) - 2
    assert main(["checkpoint", "inspect", child]) == 0
    text = capsys.readouterr().out
    assert "parent chain       base <- grand (replaced" in text and "2 new chunks" in text
    assert main(["checkpoint", "inspect", "--json", store]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listing["snapshots"]] == ["base", "child", "grand"]
    assert listing["snapshots"][1]["parent"] == "base"


def test_verify_checks_every_chunk_of_a_snapshot(image, tmp_path, capsys):
    """ok for the snapshot; exit 1 naming the chunk for one whose object has a byte
    changed, and for one whose object is gone; a store directory is refused (exit 2)."""
    from cli import main

    store = str(tmp_path / "st")
    ref = write_local(store, "base", image["memory"], chunk_size=CHUNK)
    assert main(["checkpoint", "verify", ref]) == 0
    assert f"{ref}: ok: {_stored_chunks(image['memory'])} chunks" in capsys.readouterr().out
    source = open_source(ref)
    key3, key5 = source.manifest.key_at(3), source.manifest.key_at(5)
    source.close()
    with open(os.path.join(store, key3), "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0x10]))
    os.unlink(os.path.join(store, key5))
    assert main(["checkpoint", "verify", ref]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT: 2 of" in out and "chunk 3 (memory" in out and key3 in out and "chunk 5 (memory" in out
    assert main(["checkpoint", "verify", store]) == 2
    assert "verify one of its snapshots" in capsys.readouterr().err


def test_inspect_and_verify_take_a_snapshot_in_s3(image, s3_store, seaweed, capsys, monkeypatch):
    import json

    from cli import main

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_access_key)
    ref = f"{s3_store}/snapshots/base"
    ep = ["--s3-endpoint", seaweed.endpoint]
    assert main(["checkpoint", "inspect", "--json", ref, *ep]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == ref and info["store"] == s3_store and info["chunks"] == _stored_chunks(image["memory"])
    assert main(["checkpoint", "verify", ref, *ep]) == 0
    assert f"{ref}: ok:" in capsys.readouterr().out
    # the store's root lists its snapshots (one listing of snapshots/, each manifest read)
    assert main(["checkpoint", "inspect", "--json", s3_store, *ep]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["kind"] == "chunk store" and [s["name"] for s in listing["snapshots"]] == ["base"]
    assert listing["snapshots"][0]["chunks"] == _stored_chunks(image["memory"])
    assert main(["checkpoint", "inspect", s3_store, *ep]) == 0
    assert f"{s3_store}: chunk store, 1 snapshots" in capsys.readouterr().out


def test_pageload_restore_of_a_store_snapshot_in_a_process(image, tmp_path):
    """``pageload restore STORE/snapshots/NAME --background --socket S``: the daemon's
    own command line, byte-exact."""
    from loader import Client
    from workloads._daemon_process import DaemonProcess

    with DaemonProcess(image["ref"], str(tmp_path / "s.sock"), str(tmp_path / "log"), ["--background"]) as daemon:
        with Client.connect(daemon.socket_path) as client:
            client.wait(0, SIZE)
            fd = client.memory_fd()
            try:
                with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                    assert m[:] == image["memory"]
            finally:
                os.close(fd)
            stats = client.stats()
    assert stats["backend"] == "threads" and stats["remote"]["fetch"]["chunks_fetched"] >= 1
    log = (tmp_path / "log").read_text()
    assert "snapshot 'base' in chunk store" in log


async def test_the_sweep_decodes_each_chunk_once(image, tmp_path):
    """Sweep reads of half a chunk asked for: the loader makes them whole chunks (the
    source decodes a chunk whole to read any of it), so each chunk is read once."""
    opts = _options(tmp_path, image["ref"], config=LoaderConfig(sweep_read_size=CHUNK // 2))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        with trio.fail_after(60):
            await state.loader.done.wait()
        async with TrioClient.connect(state.server.path) as client:
            await _check_memory(client, image["memory"])
        fetch = state.source.stats()["fetch"]
        state.stop()
    assert fetch["chunks_fetched"] == _stored_chunks(image["memory"])


async def test_a_wait_on_an_unfetched_chunk_decodes_it_once(image, tmp_path):
    """A waiter's reads of a quarter chunk asked for (``read_size``), nothing else loading
    (no sweep): the loader makes each wait's read its whole chunk, so each 4 KiB wait on
    a chunk not read yet reads that chunk once (pieces of ``read_size`` each fetched and
    decoded the whole chunk: 4 reads a wait here, 8 GETs a fault with the defaults)."""
    offsets = [at for at in range(0, SIZE, CHUNK) if any(image["memory"][at : at + CHUNK])][:6]
    opts = _options(tmp_path, image["ref"], config=LoaderConfig(read_size=CHUNK // 4, sweep=False))
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, opts)
        async with TrioClient.connect(state.server.path) as client:
            for at in offsets:
                await client.wait(at + CHUNK // 2, PAGE)
        fetch = state.source.stats()["fetch"]
        state.stop()
    assert fetch["chunks_fetched"] == len(offsets) and fetch["failures"] == 0


def test_recording_a_working_set_beside_a_snapshot_is_refused(image, tmp_path):
    """Beside STORE/snapshots/NAME would put a file among the store's manifests: a FILE
    is needed (one line at start-up, before anything is opened)."""
    from loader import StartupError
    from loader.daemon._options import check_options

    with pytest.raises(StartupError, match="needs a FILE for a snapshot in a chunk store"):
        check_options(_options(tmp_path, image["ref"], record_working_set=""))
    check_options(_options(tmp_path, image["ref"], record_working_set=str(tmp_path / "ws.msgpack")))
