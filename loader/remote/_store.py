"""An object store under the restore: ``s3://BUCKET/PREFIX`` and ``file:///DIR``, through obstore.

:class:`ObjectStore` is the one place that talks to object storage.  It is
synchronous: the restore's fetcher calls it from worker threads (obstore's calls
release the GIL while they wait on the network).  What it does:

* ``head``, ``get`` (small objects: the index, refused above a bound),
  ``get_range_into`` (one ranged GET written into the caller's buffer),
  ``put_bytes`` and ``put_file`` (multipart for big files);
* every failure is one :class:`StoreError` with a code among :data:`CODES` and a
  one-line message naming the object's URL;
* a per-request timeout, and retries with exponential backoff and jitter for
  timeouts, 5xx, 429/503 SlowDown, and connections reset or cut short
  (:class:`RetryPolicy`), counted in :class:`StoreStats`.

The endpoint and credentials are taken the way S3 tools take them: ``--s3-endpoint``
(``endpoint=``), else ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, else AWS's
own; ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``),
else obstore's credential chain (instance profiles, web identity); ``AWS_REGION``
(then ``AWS_DEFAULT_REGION``, else ``us-east-1``).  Requests are path-style
(``ENDPOINT/BUCKET/KEY``), as MinIO, Ceph and SeaweedFS need; plain http only for an
endpoint given as ``http://``.  docs/REMOTE.md has the rest.
"""

from __future__ import annotations

import errno
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import obstore
from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError
from obstore.store import LocalStore, S3Store

from ..core._stats import LatencyHistogram

__all__ = [
    "CODES",
    "DEFAULT_REGION",
    "ObjectStore",
    "RetryPolicy",
    "StoreError",
    "StoreStats",
    "StoreURL",
    "parse_store_url",
]

#: the error codes of :class:`StoreError`
CODES = ("not-found", "denied", "unreachable", "unavailable", "bad-url")
DEFAULT_REGION = "us-east-1"

_T = TypeVar("_T")

#: S3's bucket naming rules (3-63 of lowercase letters, digits, dots and hyphens)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_STATUS = re.compile(r"status(?: code)?: (\d{3})")
_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")
_S3_CODE = re.compile(r"<Code>([^<]{1,64})</Code>")
_OS_MESSAGE = re.compile(r'message: "([^"]{1,200})"')
_DNS = re.compile(r'"dns error",\s*\w+ \{[^}]*?error: "([^"]{1,200})"', re.S)
#: a ranged GET's body is taken this much at a time (obstore's stream: the last piece may be
#: shorter), each piece copied into the caller's buffer: what one GET in flight holds
STREAM_PIECE = 128 << 10
#: obstore's own check of a ranged GET's answer against the range asked
_WRONG_RANGE = re.compile(r"Requested (\d+)\.\.(\d+), got (\d+)\.\.(\d+)")
_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


class StoreError(Exception):
    """A failure of the object store, after any retries: ``code`` (one of :data:`CODES`)
    and a one-line ``message`` that names the object (its URL) and says what went wrong."""

    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown store error code {code!r}")
        self.code = code
        self.message = " ".join(message.split())
        super().__init__(code, self.message)

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long one request may take, and how failed ones are tried again."""

    retries: int = 4  #: tries after the first, for timeouts, 5xx, 429 and connections lost
    timeout: float = 30.0  #: seconds for one request, from connecting to its last byte
    connect_timeout: float = 5.0  #: seconds to connect
    backoff: float = 0.1  #: the first pause, in seconds; doubled for each retry after it
    max_backoff: float = 5.0  #: no pause is longer
    #: seconds for one part (or single PUT) of ``put_file``: parts are big
    upload_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, not {self.retries}")
        for name in ("timeout", "connect_timeout", "upload_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0, not {getattr(self, name)}")
        if not 0 < self.backoff <= self.max_backoff:
            raise ValueError(f"backoff must be above 0 and at most max_backoff, not {self.backoff}")

    def pause(self, retry: int, rng: random.Random) -> float:
        """The pause before retry number ``retry`` (1 for the first): exponential, with
        "equal jitter" (half of it fixed, half random), so that clients that failed
        together do not retry together."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** (retry - 1))
        return ceiling / 2 + rng.random() * ceiling / 2


@dataclass(slots=True)
class StoreStats:
    """What a store has done (a snapshot: :meth:`ObjectStore.stats`)."""

    gets: int = 0  #: GET requests sent, each retry counted
    heads: int = 0  #: HEAD requests sent, each retry counted
    puts: int = 0  #: objects put (a multipart upload counts once)
    bytes_fetched: int = 0  #: bytes of GET responses accepted
    bytes_stored: int = 0  #: bytes of objects put
    retries: int = 0  #: requests tried again (``put_file``'s parts retry inside obstore, uncounted)
    failures: int = 0  #: operations that raised :class:`StoreError`
    by_code: dict[str, int] = field(default_factory=dict)  #: failures by code
    #: each GET request's time, from sending it to its body copied (or its failure), as
    #: :meth:`~loader.core._stats.LatencyHistogram.as_dict` (power-of-two microsecond buckets)
    get_latency_us: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A parsed store URL: ``s3://BUCKET/PREFIX`` or ``file:///DIR``."""

    scheme: str  #: ``"s3"`` or ``"file"``
    bucket: str  #: ``s3``: the bucket; ``file``: ``""``
    prefix: str  #: ``s3``: the key prefix, no leading or trailing ``/`` (may be empty); ``file``: the directory

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.prefix}"
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def path_of(self, key: str) -> str:
        """The object's path in the store for ``key`` (a name under the prefix)."""
        if self.scheme == "file":
            return key
        return f"{self.prefix}/{key}" if self.prefix else key

    def url_of(self, key: str) -> str:
        """The object's URL, for messages."""
        return f"{str(self).rstrip('/')}/{key}"


def parse_store_url(url: str) -> StoreURL:
    """Parse ``s3://BUCKET[/PREFIX]`` or ``file:///ABSOLUTE/DIR``; :class:`StoreError`
    (``bad-url``) for anything else."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise StoreError("bad-url", f"{url}: a store URL has no query or fragment")
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise StoreError("bad-url", f"{url}: {bucket!r} is not a bucket name (3-63 of a-z, 0-9, '.', '-')")
        segments = [s for s in parts.path.split("/") if s]
        if any(s in (".", "..") for s in segments) or "//" in parts.path.strip("/"):
            raise StoreError("bad-url", f"{url}: the prefix may not hold empty, '.' or '..' parts")
        return StoreURL("s3", bucket, "/".join(segments))
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError("bad-url", f"{url}: a file URL names no host (file:///DIR)")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise StoreError("bad-url", f"{url}: a file URL needs an absolute path (file:///DIR)")
        return StoreURL("file", "", os.path.normpath(path))
    raise StoreError("bad-url", f"{url}: not a store URL (s3://BUCKET/PREFIX or file:///DIR)")


def _endpoint(explicit: str | None, env: Mapping[str, str]) -> str | None:
    """The S3 endpoint: ``explicit`` (``--s3-endpoint``), else the environment's, else
    None (AWS's own, from the region)."""
    for source, value in (("--s3-endpoint", explicit), ("AWS_ENDPOINT_URL_S3", env.get("AWS_ENDPOINT_URL_S3")),
                          ("AWS_ENDPOINT_URL", env.get("AWS_ENDPOINT_URL"))):
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise StoreError("bad-url", f"{source} {value}: not an http:// or https:// endpoint")
            if parts.path.strip("/") or parts.query or parts.fragment:
                raise StoreError("bad-url", f"{source} {value}: an endpoint is scheme://host[:port], "
                                 "without a path (requests are path-style: ENDPOINT/BUCKET/KEY)")
            return value.rstrip("/")
    return None


class ObjectStore:
    """One store URL's objects; see the module's docstring.

    ``url``: ``s3://BUCKET/PREFIX`` or ``file:///DIR``.  ``endpoint``, ``region``,
    ``access_key_id``/``secret_access_key``: override the environment's.  ``create``:
    a ``file://`` directory is made if missing (for puts); otherwise a missing one is
    ``not-found`` here.  ``env``: the environment to read (default ``os.environ``).
    """

    def __init__(
        self,
        url: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        policy: RetryPolicy | None = None,
        create: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.url = parse_store_url(url)
        self.policy = policy or RetryPolicy()
        self._lock = threading.Lock()
        self._stats = StoreStats()
        self._get_latency = LatencyHistogram()
        self._rng = random.Random()
        self.endpoint: str | None = None  #: the S3 endpoint, None for AWS's own or for file://
        if self.url.scheme == "file":
            directory = self.url.prefix
            if create:
                try:
                    os.makedirs(directory, exist_ok=True)
                except OSError as exc:
                    raise StoreError(_os_code(exc), f"{self.url}: cannot make the directory: "
                                     f"{exc.strerror or exc}") from None
            elif not os.path.isdir(directory):
                raise StoreError("not-found", f"{self.url}: no such directory")
            self._store: Any = LocalStore(prefix=directory)
            self._upload: Any = self._store
            return
        self.endpoint = _endpoint(endpoint, env)
        key_id = access_key_id if access_key_id is not None else env.get("AWS_ACCESS_KEY_ID")
        secret = secret_access_key if secret_access_key is not None else env.get("AWS_SECRET_ACCESS_KEY")
        if bool(key_id) != bool(secret):
            missing = "AWS_SECRET_ACCESS_KEY" if key_id else "AWS_ACCESS_KEY_ID"
            raise StoreError("denied", f"{self.url}: {missing} is not set, but its pair is")
        config: dict[str, Any] = {
            "region": region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
            "virtual_hosted_style_request": False,
        }
        if self.endpoint is not None:
            config["endpoint"] = self.endpoint
        if key_id and secret:
            config["access_key_id"] = key_id
            config["secret_access_key"] = secret
            token = env.get("AWS_SESSION_TOKEN") if access_key_id is None else None
            if token:
                config["session_token"] = token
        allow_http = self.endpoint is not None and self.endpoint.startswith("http://")
        p = self.policy
        client: Any = {"allow_http": allow_http, "timeout": timedelta(seconds=p.timeout),
                                  "connect_timeout": timedelta(seconds=p.connect_timeout)}
        try:
            # every request's retries are ours (counted, classified): obstore's are off
            self._store = S3Store(self.url.bucket, client_options=client, retry_config={"max_retries": 0},
                                  **config)
        except (BaseError, ValueError) as exc:
            raise StoreError("bad-url", f"{self.url}: {_first_line(str(exc))}") from None
        self._upload = None  # made by the first put_file (a client costs 5-10 ms: not at a restore's start)
        self._upload_config = (config, allow_http)

    @property
    def _upload_store(self) -> Any:
        """The client for ``put_file``: a multipart upload's parts are obstore's to
        retry (its API hides them), with the policy's backoff and a longer timeout."""
        if self._upload is None:
            config, allow_http = self._upload_config
            p = self.policy
            self._upload = S3Store(
                self.url.bucket,
                client_options={"allow_http": allow_http, "timeout": timedelta(seconds=p.upload_timeout),
                                "connect_timeout": timedelta(seconds=p.connect_timeout)},
                retry_config={"max_retries": p.retries,
                              "backoff": {"init_backoff": timedelta(seconds=p.backoff),
                                          "max_backoff": timedelta(seconds=p.max_backoff), "base": 2}},
                **config,
            )
        return self._upload

    def __repr__(self) -> str:
        return f"ObjectStore({str(self.url)!r}, endpoint={self.endpoint!r})"

    def stats(self) -> StoreStats:
        """A snapshot of what this store has done."""
        with self._lock:
            return replace(self._stats, by_code=dict(self._stats.by_code),
                           get_latency_us=self._get_latency.as_dict())

    # -- reads --------------------------------------------------------------------

    def head(self, key: str) -> int:
        """The size of object ``key`` (one HEAD)."""
        path = self.url.path_of(key)

        def attempt() -> int:
            self._count(heads=1)
            return int(obstore.head(self._store, path)["size"])

        return self._call(key, attempt)

    def get_if_there(self, key: str, max_bytes: int) -> bytes | None:
        """:meth:`get`, but None where there is no such object (not counted as a
        failure: for an object that may well be missing, such as a working set)."""
        try:
            return self.get(key, max_bytes, quiet="not-found")
        except StoreError as exc:
            if exc.code == "not-found":
                return None
            raise

    def list_objects(self, prefix: str) -> list[tuple[str, int, float]]:
        """Every object under ``prefix`` (a name under the store's prefix, ending in
        ``/``): ``(key, size, last modified as unix seconds)``, keys relative to the
        store's prefix.  One listing (paged by obstore), retried as a whole."""
        path = self.url.path_of(prefix)
        strip = len(self.url.path_of(""))

        def attempt() -> list[tuple[str, int, float]]:
            self._count(gets=1)
            out: list[tuple[str, int, float]] = []
            for batch in obstore.list(self._store, prefix=path):
                for meta in batch:
                    out.append((str(meta["path"])[strip:], int(meta["size"]), meta["last_modified"].timestamp()))
            return out

        return self._call(prefix, attempt)

    def get(self, key: str, max_bytes: int, *, quiet: str | None = None) -> bytes:
        """All of object ``key``, which must be at most ``max_bytes`` long (for small
        objects, such as the index; a bigger one is refused before its body is read).
        ``quiet``: a failure with this code is raised but not counted."""
        path = self.url.path_of(key)

        def attempt() -> bytes:
            started = self._count_get()
            try:
                result = obstore.get(self._store, path)
                size = int(result.meta["size"])
                if size > max_bytes:
                    raise _TooLarge(size)
                data = bytes(result.bytes())
                if len(data) != size:
                    raise _ShortRead(f"the response had {len(data)} bytes of the {size}")
            finally:
                self._got(started)
            self._count(bytes_fetched=size)
            return data

        try:
            return self._call(key, attempt, quiet=quiet)
        except _TooLarge as exc:
            self._failed("unavailable")
            raise StoreError("unavailable", f"{self.url.url_of(key)}: {exc.size} bytes, more than the "
                             f"{max_bytes} bytes allowed") from None

    def get_range_into(self, key: str, offset: int, buffer: memoryview, *, retries: int | None = None) -> int:
        """Read object ``key`` from ``offset`` into ``buffer`` with one ranged GET (and its
        retries); return the bytes written: ``len(buffer)``, or fewer where the object
        ends first.  The bytes are copied once, from the response into ``buffer``, which
        stays the caller's (reuse it); a response shorter than the range it names is
        never accepted (it is retried).  An offset at or past the object's end is an
        ``unavailable`` error.  ``retries``: at most this many retries (fewer than the
        policy's; None: the policy's)."""
        if buffer.readonly or buffer.ndim != 1 or buffer.itemsize != 1 or not buffer.c_contiguous:
            raise ValueError("buffer must be a writable, contiguous memoryview of bytes")
        if offset < 0:
            raise ValueError(f"offset must be 0 or more, not {offset}")
        n = len(buffer)
        if n == 0:
            return 0
        path = self.url.path_of(key)
        target = buffer.cast("B") if buffer.format != "B" else buffer

        def attempt() -> int:
            started = self._count_get()
            try:
                result = obstore.get(self._store, path, options={"range": (offset, offset + n)})
                size = int(result.meta["size"])
                want = min(offset + n, size) - offset
                if tuple(result.range) != (offset, offset + want):
                    raise _ShortRead(f"asked for bytes {offset}-{offset + want - 1}, the response named "
                                     f"{result.range[0]}-{result.range[1] - 1}")
                # the body a piece at a time, each copied to its place as it arrives: a GET
                # holds one piece, not its whole answer (16 GETs of 2 MiB in flight through
                # a slow link held 32 MiB; docs/REMOTE.md)
                got = 0
                for piece in result.stream(min_chunk_size=STREAM_PIECE):
                    end = got + len(piece)
                    if end > want:
                        raise _ShortRead(f"asked for bytes {offset}-{offset + want - 1}, the response had more")
                    target[got:end] = piece
                    got = end
                if got != want:
                    raise _ShortRead(f"asked for bytes {offset}-{offset + want - 1}, the response had {got}")
            finally:
                self._got(started)
            self._count(bytes_fetched=got)
            return got

        return self._call(key, attempt, retries)

    def backoff(self, retry: int) -> None:
        """Sleep the policy's pause before retry number ``retry`` (1 for the first), and
        count a retry: for a caller that tries again itself, differently (the remote
        source's last try of a failed stretch of chunks, chunk by chunk)."""
        with self._lock:
            self._stats.retries += 1
            pause = self.policy.pause(max(1, retry), self._rng)
        time.sleep(pause)

    # -- writes -------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes | memoryview) -> None:
        """Put ``data`` as object ``key`` (one PUT, retried as a read is)."""
        path = self.url.path_of(key)

        def attempt() -> None:
            obstore.put(self._store, path, data, use_multipart=False)

        self._call(key, attempt)
        self._count(puts=1, bytes_stored=len(data))

    def put_file(self, key: str, path: str, part_size: int, *, concurrency: int = 4) -> int:
        """Put the file at ``path`` as object ``key``: one PUT if it is at most
        ``part_size`` bytes, else a multipart upload of ``part_size`` parts, at most
        ``concurrency`` at once (memory: about ``part_size * concurrency``).  The object
        appears whole or not at all.  Returns the size put."""
        if part_size <= 0 or concurrency <= 0:
            raise ValueError("part_size and concurrency must be above 0")
        size = os.stat(path).st_size
        where = self.url.path_of(key)
        try:
            obstore.put(self._upload_store, where, Path(path), use_multipart=size > part_size,
                        chunk_size=part_size, max_concurrency=concurrency)
        except (BaseError, OSError) as exc:
            code, detail, _ = self._classify(exc)
            self._failed(code)
            raise StoreError(code, f"{self.url.url_of(key)}: {detail}") from None
        self._count(puts=1, bytes_stored=size)
        return size

    def delete(self, key: str) -> None:
        """Delete object ``key`` (absent already is not an error)."""
        path = self.url.path_of(key)

        def attempt() -> None:
            obstore.delete(self._store, path)

        try:
            self._call(key, attempt)
        except StoreError as exc:
            if exc.code != "not-found":
                raise

    # -- the machinery ------------------------------------------------------------

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self._stats, name, getattr(self._stats, name) + amount)

    def _count_get(self) -> int:
        """Count a GET request about to be sent; its start time (for :meth:`_got`)."""
        with self._lock:
            self._stats.gets += 1
        return time.perf_counter_ns()

    def _got(self, started: int) -> None:
        """A GET request ended (its body copied, or failed): record its time."""
        elapsed = time.perf_counter_ns() - started
        with self._lock:
            self._get_latency.record(elapsed)

    def _failed(self, code: str) -> None:
        with self._lock:
            self._stats.failures += 1
            self._stats.by_code[code] = self._stats.by_code.get(code, 0) + 1

    def _call(self, key: str, attempt: Callable[[], _T], most: int | None = None, quiet: str | None = None) -> _T:
        """``attempt()``, retried under the policy (at most ``most`` times where that is
        fewer); a :class:`StoreError` at the end (counted, unless its code is ``quiet``)."""
        limit = self.policy.retries if most is None else max(0, min(most, self.policy.retries))
        retries = 0
        while True:
            try:
                return attempt()
            except _ShortRead as exc:
                code, detail, retryable = "unavailable", f"response cut short: {exc}", True
            except (BaseError, OSError) as exc:
                code, detail, retryable = self._classify(exc)
            if retryable and retries < limit:
                retries += 1
                with self._lock:
                    self._stats.retries += 1
                    pause = self.policy.pause(retries, self._rng)
                time.sleep(pause)
                continue
            if code != quiet:
                self._failed(code)
            after = f" (after {retries} {'retry' if retries == 1 else 'retries'})" if retries else ""
            raise StoreError(code, f"{self.url.url_of(key)}: {detail}{after}") from None

    def _classify(self, exc: BaseException) -> tuple[str, str, bool]:
        """(code, one-line detail, worth retrying) for an exception from obstore."""
        text = str(exc)
        s3_code = _S3_CODE.search(text)
        said = f" ({s3_code.group(1)})" if s3_code else ""
        if isinstance(exc, FileNotFoundError) or (isinstance(exc, OSError) and exc.errno == errno.ENOENT):
            if s3_code and s3_code.group(1) == "NoSuchBucket":
                return "not-found", f"no bucket {self.url.bucket!r}", False
            return "not-found", f"no such object{said}", False
        if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)):
            status = _STATUS.search(text)
            return "denied", f"access denied{said}" + (f": HTTP {status.group(1)}" if status else ""), False
        if isinstance(exc, OSError) and not isinstance(exc, BaseError):
            return _os_code(exc), exc.strerror or _first_line(text), False
        status = _STATUS.search(text)
        if status:
            code = int(status.group(1))
            reason = _REASONS.get(code, "")
            detail = f"HTTP {code}{' ' + reason if reason else ''}{said}"
            if code >= 500 or code == 429:
                return "unavailable", detail, True
            if code in (401, 403):
                return "denied", detail, False
            if code == 404:
                return "not-found", detail, False
            if code == 416:
                return "unavailable", f"{detail}: the range starts at or past the object's end", False
            return "unavailable", detail, False
        wrong = _WRONG_RANGE.search(text)
        if wrong:
            a, b, c, d = (int(x) for x in wrong.groups())
            return "unavailable", (f"response cut short: asked for bytes {a}-{b - 1}, the response had "
                                   f"{c}-{d - 1}"), True
        kind = _HTTP_KIND.search(text)
        where = self.endpoint or "the S3 endpoint"
        if kind is not None:
            if kind.group(1) == "Timeout":
                return "unreachable", f"no answer from {where} within {self.policy.timeout:g} s", True
            if kind.group(1) == "Connect":
                dns = _DNS.search(text)
                why = f"DNS: {dns.group(1)}" if dns else (m.group(1) if (m := _OS_MESSAGE.search(text)) else
                                                          "cannot connect")
                return "unreachable", f"cannot connect to {where}: {why}", False
            why = m.group(1) if (m := _OS_MESSAGE.search(text)) else "connection lost"
            return "unavailable", f"{why} ({kind.group(1).lower()} error from {where})", True
        return "unavailable", _first_line(text), False


class _ShortRead(Exception):
    """A response that ended before the bytes it promised (retried)."""


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _os_code(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "not-found"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "denied"
    return "unavailable"


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()
