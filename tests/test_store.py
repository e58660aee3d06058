"""The object store client (loader/remote/_store.py) against a real S3 server (SeaweedFS's
``weed mini``), through the fault proxy where failures are wanted, and ``pageload
checkpoint push``.  Nothing here mocks obstore: every request crosses a socket."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import main
from loader.checkpoint import create_checkpoint
from loader.remote import ObjectStore, RetryPolicy, StoreError, parse_store_url
from workloads import FaultProxy, SeaweedServer, make_sample_image

MiB = 1 << 20
#: quick retries, so that failing past the budget takes milliseconds
FAST = RetryPolicy(retries=2, backoff=0.01, max_backoff=0.05)


@pytest.fixture
def prefix() -> str:
    """A key prefix of the test's own in the shared bucket."""
    return f"t-{uuid.uuid4().hex[:12]}"


def _store(s3: SeaweedServer, prefix: str, *, endpoint: str | None = None, policy: RetryPolicy = FAST,
           secret: str | None = None, key_id: str | None = None, bucket: str | None = None) -> ObjectStore:
    return ObjectStore(f"s3://{bucket or s3.bucket}/{prefix}", endpoint=endpoint or s3.endpoint,
                       access_key_id=key_id or s3.access_key_id, secret_access_key=secret or s3.secret_access_key,
                       policy=policy, env={})


@pytest.fixture
def store(seaweed: SeaweedServer, prefix: str) -> ObjectStore:
    return _store(seaweed, prefix)


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(seaweed.endpoint) as p:
        yield p


@pytest.fixture
def proxied(seaweed: SeaweedServer, prefix: str, proxy: FaultProxy) -> ObjectStore:
    """The same prefix as ``store``, through the proxy."""
    return _store(seaweed, prefix, endpoint=proxy.endpoint)


@pytest.fixture
def obj(store: ObjectStore) -> bytes:
    """``obj``: 3 MiB of random bytes (no two 4 KiB pieces alike), put under the prefix."""
    data = os.urandom(3 * MiB)
    store.put_bytes("obj", data)
    return data


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def test_a_seaweed_server_stops_whole_and_leaves_nothing(seaweed: SeaweedServer) -> None:
    """A second server beside the session's (its own ports): gone, port closed and
    directory removed once its block ends."""
    with SeaweedServer(bucket="second") as other:
        assert other.endpoint != seaweed.endpoint
        pid = other._process.pid if other._process is not None else -1
        port = int(other.endpoint.rsplit(":", 1)[1])
        directory = other._tmp
        there = ObjectStore("s3://second/x", endpoint=other.endpoint, access_key_id=other.access_key_id,
                            secret_access_key=other.secret_access_key, env={})
        there.put_bytes("y", b"z")
        assert there.head("y") == 1
    assert directory is not None and not os.path.exists(directory)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# -- real puts and gets -------------------------------------------------------------------


def test_ranged_gets_are_byte_exact_into_one_reused_buffer(store: ObjectStore, obj: bytes) -> None:
    buffer = bytearray(256 * 1024 + 7)  # an odd size: no read lines up with anything
    view = memoryview(buffer)
    before = store.stats()
    offsets = [0, 1, 4095, 1 * MiB + 12345, len(obj) - len(buffer)]
    for offset in offsets:
        buffer[:] = b"\xa5" * len(buffer)  # what was there must be overwritten, every byte
        assert store.get_range_into("obj", offset, view) == len(buffer)
        assert buffer == obj[offset:offset + len(buffer)]
    # where the object ends first: fewer bytes, and only those written
    buffer[:] = b"\xa5" * len(buffer)
    assert store.get_range_into("obj", len(obj) - 1000, view) == 1000
    assert buffer[:1000] == obj[-1000:] and buffer[1000:] == b"\xa5" * (len(buffer) - 1000)
    # a slice of the caller's buffer is filled in place
    assert store.get_range_into("obj", 10, view[100:200]) == 100
    assert buffer[100:200] == obj[10:110]
    stats = store.stats()
    assert stats.gets - before.gets == len(offsets) + 2
    assert stats.bytes_fetched - before.bytes_fetched == len(offsets) * len(buffer) + 1000 + 100
    assert (stats.retries, stats.failures) == (before.retries, before.failures)


def test_worker_threads_share_one_store(store: ObjectStore, obj: bytes) -> None:
    """The restore's fetcher calls from worker threads, each with its own buffer."""
    from concurrent.futures import ThreadPoolExecutor

    def fetch(i: int) -> bool:
        buffer = bytearray(64 * 1024)
        offset = i * 40_000
        store.get_range_into("obj", offset, memoryview(buffer))
        return buffer == obj[offset:offset + len(buffer)]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(fetch, range(32)))
    stats = store.stats()
    assert (stats.gets, stats.bytes_fetched) == (32, 32 * 64 * 1024)


def test_head_get_and_the_size_bound(store: ObjectStore, obj: bytes) -> None:
    assert store.head("obj") == len(obj)
    assert store.get("obj", len(obj)) == obj
    with pytest.raises(StoreError) as info:
        store.get("obj", len(obj) - 1)
    assert info.value.code == "unavailable"
    assert f"{store.url}/obj" in str(info.value) and str(len(obj)) in str(info.value)


def test_a_read_buffer_must_be_writable_bytes(store: ObjectStore, obj: bytes) -> None:
    with pytest.raises(ValueError, match="writable"):
        store.get_range_into("obj", 0, memoryview(bytes(10)))
    assert store.stats().gets == 0


def test_a_big_file_is_put_in_parts_and_comes_back_whole(
    tmp_path: Path, proxied: ObjectStore, store: ObjectStore, proxy: FaultProxy
) -> None:
    data = os.urandom(11 * MiB + 5)
    (tmp_path / "big").write_bytes(data)
    assert proxied.put_file("big", str(tmp_path / "big"), part_size=5 * MiB) == len(data)
    parts = [line for line in proxy.forwarded if line.startswith("PUT ") and "partNumber=" in line]
    assert len(parts) == 3  # 5 + 5 + 1 MiB
    assert any(line.startswith("POST ") and "uploads" in line for line in proxy.forwarded)
    assert store.head("big") == len(data)
    assert hashlib.sha256(store.get("big", len(data))).digest() == hashlib.sha256(data).digest()
    # a small file is one PUT
    (tmp_path / "small").write_bytes(b"x" * 1000)
    proxy.forwarded.clear()
    proxied.put_file("small", str(tmp_path / "small"), part_size=5 * MiB)
    assert [line.split()[0] for line in proxy.forwarded] == ["PUT"]


def test_missing_objects_and_buckets_are_not_found(seaweed: SeaweedServer, store: ObjectStore, prefix: str) -> None:
    for call in (lambda: store.head("missing"), lambda: store.get("missing", 100),
                 lambda: store.get_range_into("missing", 0, memoryview(bytearray(10)))):
        with pytest.raises(StoreError) as info:
            call()
        assert info.value.code == "not-found"
        assert f"s3://{seaweed.bucket}/{prefix}/missing" in str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(StoreError) as info:
        _store(seaweed, prefix, bucket="no-such-bucket").get("x", 10)
    assert info.value.code == "not-found" and "no-such-bucket" in str(info.value)
    assert store.stats().retries == 0  # not retried


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_bad_credentials_are_denied_at_once(seaweed: SeaweedServer, prefix: str, obj: bytes, wrong: str) -> None:
    bad = _store(seaweed, prefix, secret="wrong-secret") if wrong == "secret" else _store(seaweed, prefix,
                                                                                          key_id="nobody")
    for call in (lambda: bad.head("obj"), lambda: bad.get_range_into("obj", 0, memoryview(bytearray(10)))):
        with pytest.raises(StoreError) as info:
            call()
        assert info.value.code == "denied" and "obj" in str(info.value)
    assert bad.stats().retries == 0 and bad.stats().failures == 2


def test_an_endpoint_nobody_listens_on_is_unreachable(seaweed: SeaweedServer, prefix: str) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    dead = _store(seaweed, prefix, endpoint=endpoint)
    with pytest.raises(StoreError) as info:
        dead.head("obj")
    assert info.value.code == "unreachable"
    assert endpoint in str(info.value) and "refused" in str(info.value).lower()


def test_a_request_past_its_timeout_is_retried_then_unreachable(
    seaweed: SeaweedServer, prefix: str, proxy: FaultProxy, obj: bytes
) -> None:
    slow = _store(seaweed, prefix, endpoint=proxy.endpoint,
                  policy=RetryPolicy(retries=1, timeout=0.3, backoff=0.01, max_backoff=0.01))
    proxy.first_byte_delay = 1.0
    with pytest.raises(StoreError) as info:
        slow.head("obj")
    assert info.value.code == "unreachable" and "0.3 s" in str(info.value)
    assert slow.stats().retries == 1 and slow.stats().heads == 2


def test_the_environment_gives_endpoint_credentials_and_region(seaweed: SeaweedServer, prefix: str,
                                                               obj: bytes) -> None:
    env = {"AWS_ENDPOINT_URL": seaweed.endpoint, "AWS_ACCESS_KEY_ID": seaweed.access_key_id,
           "AWS_SECRET_ACCESS_KEY": seaweed.secret_access_key, "AWS_REGION": "eu-west-3"}
    from_env = ObjectStore(f"s3://{seaweed.bucket}/{prefix}", env=env)
    assert from_env.endpoint == seaweed.endpoint
    assert from_env.head("obj") == len(obj)
    # an explicit endpoint wins over the environment's
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_closed_port()}"
    assert ObjectStore(f"s3://{seaweed.bucket}/{prefix}", endpoint=seaweed.endpoint, env=env).head("obj") == len(obj)
    with pytest.raises(StoreError) as info:
        ObjectStore(f"s3://{seaweed.bucket}/{prefix}", env=env).head("obj")
    assert info.value.code == "unreachable"
    # half a key pair is refused before any request
    with pytest.raises(StoreError) as info:
        ObjectStore(f"s3://{seaweed.bucket}/{prefix}", env={"AWS_ACCESS_KEY_ID": "k"})
    assert info.value.code == "denied" and "AWS_SECRET_ACCESS_KEY" in str(info.value)


@pytest.mark.parametrize("url, endpoint, says", [
    ("http://bucket/key", None, "not a store URL"),
    ("s3://Bad_Bucket/x", None, "not a bucket name"),
    ("s3://ok-bucket/a/../b", None, "'..'"),
    ("s3://ok-bucket/x?versionId=1", None, "no query"),
    ("file://host/dir", None, "names no host"),
    ("s3://ok-bucket/x", "ftp://127.0.0.1:1", "not an http:// or https:// endpoint"),
    ("s3://ok-bucket/x", "http://127.0.0.1:1/some/path", "without a path"),
])
def test_bad_urls_and_endpoints_are_refused_before_any_request(url: str, endpoint: str | None, says: str) -> None:
    with pytest.raises(StoreError) as info:
        ObjectStore(url, endpoint=endpoint, env={})
    assert info.value.code == "bad-url" and says in str(info.value) and "\n" not in str(info.value)


def test_store_urls_parse() -> None:
    assert parse_store_url("s3://b-1.x/a/b/") .prefix == "a/b"
    assert parse_store_url("s3://bucket").path_of("index.msgpack") == "index.msgpack"
    assert parse_store_url("s3://bucket/p/q").url_of("pages.img") == "s3://bucket/p/q/pages.img"
    assert parse_store_url("file:///tmp/x/").prefix == "/tmp/x"


def test_a_file_store_reads_and_writes_a_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        ObjectStore(f"file://{tmp_path}/not-yet")
    assert info.value.code == "not-found"
    store = ObjectStore(f"file://{tmp_path}/not-yet", create=True)
    data = os.urandom(100_000)
    store.put_bytes("a", data)
    (tmp_path / "src").write_bytes(data)
    store.put_file("b", str(tmp_path / "src"), part_size=30_000)
    assert (tmp_path / "not-yet" / "a").read_bytes() == data == (tmp_path / "not-yet" / "b").read_bytes()
    assert store.head("b") == len(data)
    buffer = bytearray(10_000)
    assert store.get_range_into("b", 95_000, memoryview(buffer)) == 5_000
    assert buffer[:5_000] == data[95_000:]
    with pytest.raises(StoreError) as info:
        store.head("c")
    assert info.value.code == "not-found" and f"file://{tmp_path}/not-yet/c" in str(info.value)


# -- every proxy knob acts ----------------------------------------------------------------


def test_a_500_is_retried_and_counted(proxied: ObjectStore, proxy: FaultProxy, obj: bytes) -> None:
    proxy.fail_next(1, 500, match="GET ")
    buffer = bytearray(MiB)
    assert proxied.get_range_into("obj", 5, memoryview(buffer)) == MiB
    assert buffer == obj[5:5 + MiB]
    stats = proxied.stats()
    assert (stats.gets, stats.retries, stats.failures) == (2, 1, 0)
    assert proxy.faults["status"] == 1 and len(proxy.forwarded) == 1


@pytest.mark.parametrize("status", [429, 503])
def test_slow_down_is_retried(proxied: ObjectStore, proxy: FaultProxy, obj: bytes, status: int) -> None:
    proxy.fail_next(2, status)
    assert proxied.head("obj") == len(obj)
    assert proxied.stats().retries == 2


def test_503_past_the_retry_budget_is_unavailable(proxied: ObjectStore, proxy: FaultProxy, obj: bytes) -> None:
    proxy.fail_next(FAST.retries + 5, 503)
    with pytest.raises(StoreError) as info:
        proxied.get_range_into("obj", 0, memoryview(bytearray(4096)))
    assert info.value.code == "unavailable"
    assert "503" in str(info.value) and f"after {FAST.retries} retries" in str(info.value)
    stats = proxied.stats()
    assert (stats.gets, stats.retries, stats.failures, stats.by_code) == (
        FAST.retries + 1, FAST.retries, 1, {"unavailable": 1})
    assert proxy.forwarded == []  # the server never saw one


@pytest.mark.parametrize("after", [40, 5000])  # inside the response's head; inside its body
def test_a_response_cut_short_is_retried_and_never_accepted(
    proxied: ObjectStore, proxy: FaultProxy, obj: bytes, after: int
) -> None:
    buffer = bytearray(MiB)
    proxy.cut_next(1, after)
    assert proxied.get_range_into("obj", 0, memoryview(buffer)) == MiB
    assert buffer == obj[:MiB] and proxied.stats().retries == 1
    # cut every time: an error, never a short count
    proxy.cut_next(FAST.retries + 1, after)
    with pytest.raises(StoreError) as info:
        proxied.get_range_into("obj", 0, memoryview(buffer))
    assert info.value.code == "unavailable"
    assert proxy.faults["cut"] == FAST.retries + 2


def test_a_short_well_formed_response_is_retried_and_never_accepted(
    proxied: ObjectStore, proxy: FaultProxy, obj: bytes
) -> None:
    """A proxy or cache that answers a ranged GET with fewer bytes than asked, saying so
    in its headers: not the object's end, so retried; never a short count."""
    buffer = bytearray(MiB)
    proxy.shorten_next(1, 1000)
    assert proxied.get_range_into("obj", 0, memoryview(buffer)) == MiB
    assert buffer == obj[:MiB] and proxied.stats().retries == 1
    proxy.shorten_next(FAST.retries + 1, 1000)
    with pytest.raises(StoreError) as info:
        proxied.get_range_into("obj", 0, memoryview(buffer))
    assert info.value.code == "unavailable" and "cut short" in str(info.value)
    assert proxy.faults["shorten"] == FAST.retries + 2


def test_a_reset_connection_is_retried(proxied: ObjectStore, proxy: FaultProxy, obj: bytes) -> None:
    proxy.reset_next(1)
    assert proxied.head("obj") == len(obj)
    assert proxied.stats().retries == 1 and proxy.faults["reset"] == 1
    proxy.reset_next(FAST.retries + 1)
    with pytest.raises(StoreError) as info:
        proxied.head("obj")
    assert info.value.code == "unavailable" and "reset" in str(info.value).lower()


def test_the_first_byte_delay_holds_every_response_back(proxied: ObjectStore, proxy: FaultProxy,
                                                        obj: bytes) -> None:
    proxy.first_byte_delay = 0.2
    started = time.monotonic()
    proxied.head("obj")
    proxied.get_range_into("obj", 0, memoryview(bytearray(10)))
    assert time.monotonic() - started >= 0.4  # at least; no upper bound on a shared machine


def test_the_bandwidth_cap_bounds_the_rate(proxied: ObjectStore, proxy: FaultProxy, obj: bytes) -> None:
    proxy.bandwidth = 4 * MiB
    started = time.monotonic()
    assert proxied.get_range_into("obj", 0, memoryview(bytearray(MiB))) == MiB
    assert time.monotonic() - started >= 0.25  # 1 MiB at 4 MiB/s: at least a quarter of a second


# -- pageload checkpoint push -------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A pages checkpoint of 12 MiB of data: three parts of 5 MiB."""
    image = tmp_path / "memory.img"
    make_sample_image(str(image), 12 * MiB, seed=7, dense=True)
    out = tmp_path / "ckpt"
    create_checkpoint(str(image), str(out))
    assert (out / "pages.img").stat().st_size > 10 * MiB
    return out


def _push(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_access_key)
    return main(["checkpoint", "push", *args])


def test_push_uploads_the_checkpoint_as_it_is_index_last(
    seaweed: SeaweedServer, checkpoint: Path, store: ObjectStore, proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    url = str(store.url)
    assert _push(seaweed, monkeypatch, str(checkpoint), url, "--s3-endpoint", proxy.endpoint,
                 "--part-size", "5M") == 0
    out = capsys.readouterr().out
    assert url in out and "3 parts" in out
    for name in ("pages.img", "index.msgpack"):
        local = (checkpoint / name).read_bytes()
        assert store.get(name, len(local)) == local
    puts = [line.split()[1] for line in proxy.forwarded if line.startswith(("PUT ", "POST "))]
    assert puts[-1].endswith("/index.msgpack")  # the last write of all
    assert sum("/pages.img" in p for p in puts) >= 5  # start, 3 parts, complete: before the index


def test_a_failed_index_put_leaves_no_index(
    seaweed: SeaweedServer, checkpoint: Path, store: ObjectStore, proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    proxy.fail_next(100, 503, match=f"PUT /{seaweed.bucket}/{store.url.prefix}/index.msgpack")
    assert _push(seaweed, monkeypatch, str(checkpoint), str(store.url), "--s3-endpoint", proxy.endpoint) == 2
    err = capsys.readouterr().err
    assert err.startswith("pageload: ") and err.count("\n") == 1
    assert "index.msgpack" in err and "503" in err and "(unavailable)" in err
    assert store.head("pages.img") == (checkpoint / "pages.img").stat().st_size  # the pages went up...
    with pytest.raises(StoreError) as info:  # ...and no index: not restorable
        store.head("index.msgpack")
    assert info.value.code == "not-found"


def test_push_refuses_a_raw_image(seaweed: SeaweedServer, tmp_path: Path, store: ObjectStore,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "raw.img"
    make_sample_image(str(image), MiB, seed=1)
    assert _push(seaweed, monkeypatch, str(image), str(store.url), "--s3-endpoint", seaweed.endpoint) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "push a pages checkpoint" in err and "checkpoint create" in err
    with pytest.raises(StoreError):
        store.head("pages.img")


def test_push_does_not_replace_a_checkpoint_unless_told(
    seaweed: SeaweedServer, checkpoint: Path, store: ObjectStore, proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A working set goes up with its checkpoint, before the index; a second push to
    the same place is refused; --replace deletes the old index first (and a working
    set the new checkpoint lacks)."""
    (checkpoint / "working-set.msgpack").write_bytes(b"a working set's bytes")
    args = (str(checkpoint), str(store.url), "--s3-endpoint", proxy.endpoint)
    assert _push(seaweed, monkeypatch, *args) == 0
    writes = [line.split()[1].split("?")[0].rsplit("/", 1)[1] for line in proxy.forwarded
              if line.startswith("PUT ")]
    assert writes == ["pages.img", "working-set.msgpack", "index.msgpack"]
    assert store.get("working-set.msgpack", MiB) == b"a working set's bytes"
    assert _push(seaweed, monkeypatch, *args) == 2
    assert "already there" in capsys.readouterr().err
    (checkpoint / "working-set.msgpack").unlink()
    proxy.forwarded.clear()
    assert _push(seaweed, monkeypatch, *args, "--replace") == 0
    first_put = next(i for i, line in enumerate(proxy.forwarded) if line.startswith("PUT "))
    deletes = [line for line in proxy.forwarded[:first_put] if line.startswith("DELETE ") or "?delete" in line]
    assert len(deletes) == 2  # the old index, then the old working set, before any upload
    assert store.get("index.msgpack", MiB) == (checkpoint / "index.msgpack").read_bytes()
    with pytest.raises(StoreError) as info:
        store.head("working-set.msgpack")
    assert info.value.code == "not-found"


def test_push_to_a_directory(checkpoint: Path, tmp_path: Path, seaweed: SeaweedServer,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert _push(seaweed, monkeypatch, str(checkpoint), f"file://{tmp_path}/pushed/c1") == 0
    for name in ("pages.img", "index.msgpack"):
        assert (tmp_path / "pushed" / "c1" / name).read_bytes() == (checkpoint / name).read_bytes()


@pytest.mark.parametrize("url, extra, says", [
    ("s3://Not_A_Bucket/x", [], "is not a bucket name"),
    ("s3://pageload/x", ["--s3-endpoint", "http://127.0.0.1:{closed}"], "cannot connect"),
    ("s3://pageload/x", ["--part-size", "1M"], "S3 parts are 5 MiB to 5 GiB"),
])
def test_push_failures_are_one_line(
    seaweed: SeaweedServer, checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], url: str, extra: list[str], says: str,
) -> None:
    extra = [a.format(closed=_closed_port()) for a in extra]
    assert _push(seaweed, monkeypatch, str(checkpoint), url, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("pageload: ") and err.count("\n") == 1 and says in err


def test_the_upload_client_is_made_only_by_the_first_put_file(store: ObjectStore, tmp_path: Path) -> None:
    """A restore never uploads: its store has one client (making an S3 client costs
    5-10 ms, on a restore's way to READY); ``put_file`` makes the upload client at
    its first use, and the file is put whole."""
    store.put_bytes("small", b"x" * 100)
    assert store.get("small", 1000) == b"x" * 100
    assert store._upload is None
    data = os.urandom(6 * MiB)
    (tmp_path / "src").write_bytes(data)
    store.put_file("big", str(tmp_path / "src"), part_size=5 * MiB)  # two parts
    assert store._upload is not None and store.get("big", 8 * MiB) == data
