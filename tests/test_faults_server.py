"""The server's fault matrix: hostile frames, descriptor exhaustion, clients that do not
read, the memory fd's access, the socket file's life, other uids, full backlogs, a
stopped daemon, shutdown with clients that do not read.  Through real daemon
processes where the fault is about processes."""

from __future__ import annotations

import contextlib
import errno
import gc
import mmap
import os
import pathlib
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref

import msgpack
import pytest
import trio
import trio.testing

import loader.socket._client
import protocol
from loader import Client, ClientError, DaemonOptions, TrioClient, run_daemon
from workloads import DaemonProcess, make_sample_image

MiB = 1 << 20
PAGE = 4096
SIZE = 16 * MiB
HELLO = msgpack.packb({"op": "hello", "id": 1, "v": [1]})
STATS = msgpack.packb({"op": "stats", "id": 2})
NOBODY = 65534
ROOT = str(pathlib.Path(__file__).resolve().parents[1])  # the repository, for a daemon of another uid
DEADLINE_S = 30.0  # for poll loops: only a hang reaches it


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("image") / "memory.img")
    make_sample_image(path, SIZE, seed=3)
    return path


@pytest.fixture
def daemon(image, tmp_path):
    """A running ``pageload restore --background`` process (more flags by indirect param)."""
    with DaemonProcess(image, str(tmp_path / "d.sock"), str(tmp_path / "d.log"), ["--background", "-q"]) as d:
        yield d


def options(tmp_path, source, **kw):
    kw.setdefault("handle_signals", False)
    kw.setdefault("ready_line", False)
    return DaemonOptions(source=source, socket_path=str(tmp_path / "s.sock"), **kw)


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def read_until_closed(sock, limit=1 << 20):
    """Every reply until the peer closes (or resets) the connection."""
    sock.settimeout(DEADLINE_S)
    unpacker = msgpack.Unpacker()
    replies = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            unpacker.feed(chunk)
            replies.extend(unpacker)
            assert len(replies) < limit
    except ConnectionResetError:
        pass
    return replies


def served(path):
    """A wait and a stats through a fresh client: the daemon still serves."""
    with Client.connect(path, deadline=time.monotonic() + DEADLINE_S) as client:
        client.wait(SIZE - PAGE, PAGE)
        return client.stats()


# ---------------------------------------------------------------- hostile frames


def test_nested_frame_before_hello_costs_one_connection(daemon):
    """This frame made the daemon exit 1, dropping every client."""
    with Client.connect(daemon.socket_path) as bystander:
        for frame in (b"\x82\xa2op\xa4wait\xa2id" + b"\x91" * 1000 + b"\x00",  # before hello
                      HELLO + b"\x82\xa2op\xa4wait\xa2id" + b"\x91" * 1000 + b"\x00",  # after it
                      HELLO + msgpack.packb({"op": "wait", "id": 2, "off": [[["x" * 1000] * 60] * 4], "len": 1})):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(daemon.socket_path)
                s.sendall(frame)
                replies = read_until_closed(s)
            assert replies and replies[-1]["err"] == protocol.codes.TOO_LARGE, replies
            assert all(len(r.get("msg", "")) < 200 for r in replies)
        bystander.wait(0, PAGE)  # a client connected all along is still served
    assert daemon.proc.poll() is None
    served(daemon.socket_path)


async def test_a_bug_on_one_connection_answers_internal_error_and_spares_the_rest(tmp_path, image, monkeypatch):
    from loader.socket._session import Session

    real_handle = Session.handle

    def handle(self, event):
        if isinstance(event, protocol.Prefetch):
            raise RuntimeError("injected")
        return real_handle(self, event)

    monkeypatch.setattr(Session, "handle", handle)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, image))
        async with TrioClient.connect(state.server.path) as bystander:
            with pytest.raises(ClientError) as info:
                async with TrioClient.connect(state.server.path) as victim:
                    await victim.prefetch(0, PAGE)
            assert info.value.code == protocol.codes.INTERNAL_ERROR
            await bystander.wait(SIZE - PAGE, PAGE)
        state.stop()


# ---------------------------------------------------------------- descriptors


def test_accept_survives_emfile(daemon):
    """accept() failing with EMFILE killed the daemon."""
    pid = daemon.pid
    # loaded first: the backend's threads open their splice pipes during the fill, and a
    # limit taken before that left them, not accept(), to run out (accept_errors 0)
    deadline = time.monotonic() + DEADLINE_S
    while not served(daemon.socket_path).get("done") and time.monotonic() < deadline:
        time.sleep(0.01)
    limit = open_fds(pid) + 16
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    held = []
    try:
        for _ in range(64):  # well past the limit: the backlog takes what the daemon cannot accept
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(daemon.socket_path)
            held.append(s)
        deadline = time.monotonic() + DEADLINE_S
        while open_fds(pid) < limit and time.monotonic() < deadline:  # it accepted what it could
            time.sleep(0.01)
        # and then tried once more and failed (before the held sockets close and free descriptors)
        while ("cannot accept connections" not in pathlib.Path(daemon.log_path).read_text()
               and time.monotonic() < deadline):
            time.sleep(0.01)
        assert daemon.proc.poll() is None
    finally:
        for s in held:
            s.close()
    stats = served(daemon.socket_path)  # descriptors are back: served again
    assert stats["server"]["accept_errors"] > 0
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
    log = pathlib.Path(daemon.log_path).read_text()
    assert log.count("cannot accept connections") == 1, log  # rate-limited


# ---------------------------------------------------------------- clients that do not read


def test_unread_replies_are_bounded(daemon):
    """200k unread stats replies took the daemon from 18 to 185 MB."""
    before = rss(daemon.pid)
    burst = STATS * 20_000
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket_path)
        s.sendall(HELLO)
        s.setblocking(False)
        sent = 0
        stalled_since = None
        while sent < 200_000 * len(STATS):  # until the daemon stops reading us (backpressure)
            try:
                sent += s.send(burst[: min(len(burst), 200_000 * len(STATS) - sent)])
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.5:
                    break
                time.sleep(0.01)
        stats = served(daemon.socket_path)
        queued = stats["server"]["reply_bytes_queued"]
        assert queued < 2 * MiB, queued
        assert rss(daemon.pid) - before < 32 * MiB
        assert sent < 200_000 * len(STATS)  # it did stop reading
    served(daemon.socket_path)


def _unread_stats(path, count):
    """A connection that asked for ``count`` stats replies and reads none of them yet."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(path)
    s.sendall(HELLO + STATS * count)
    return s


def test_a_request_after_sigterm_with_unread_replies_still_exits_0(daemon):
    """Session.flush ran twice on one session (from aclose and from the session's own
    task), and ``self._flushed or trio.Event()`` raised 'Trio events cannot be treated
    as bools': the daemon exited 1 and cut the other clients' last replies short."""
    count = 1000
    greedy = _unread_stats(daemon.socket_path, count)
    bystander = _unread_stats(daemon.socket_path, count)
    try:
        with Client.connect(daemon.socket_path) as c:  # both backlogs are queued by now
            c.stats()
        daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)  # the shutdown's flush has begun
        with contextlib.suppress(OSError):
            greedy.sendall(STATS)
        replies = read_until_closed(bystander)
        assert daemon.proc.wait(timeout=DEADLINE_S) == 0, daemon.stderr_tail()
        assert sum(1 for r in replies if r.get("ok") == "stats") == count
        read_until_closed(greedy)
    finally:
        greedy.close()
        bystander.close()
    assert "Traceback" not in pathlib.Path(daemon.log_path).read_text()


async def test_closed_session_is_freed_by_refcount(tmp_path, image):
    """Closed sessions waited for the cyclic GC."""
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, image))
        gc.collect()
        gc.disable()
        try:
            for how in ("client closes", "server hangs up"):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(state.server.path)
                s.sendall(HELLO + STATS)
                with trio.move_on_after(DEADLINE_S):
                    while not state.server.sessions:
                        await trio.sleep(0.01)
                (session,) = state.server.sessions
                ref = weakref.ref(session)
                del session
                if how == "server hangs up":
                    s.sendall(b"\xc1")  # bad-frame: fatal
                    await trio.to_thread.run_sync(read_until_closed, s)
                s.close()
                with trio.move_on_after(DEADLINE_S):
                    while state.server.sessions:
                        await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked()
                assert ref() is None, gc.get_referrers(ref())
        finally:
            gc.enable()
        state.stop()


# ---------------------------------------------------------------- the memory fd


async def test_memory_fd_is_read_only_by_default(tmp_path, image):
    """Any client could ftruncate the memory file or write guest memory."""
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, image))
        async with TrioClient.connect(state.server.path) as client:
            fd = await client.memory_fd()
            try:
                with pytest.raises(OSError) as info:
                    os.ftruncate(fd, 0)
                assert info.value.errno in (errno.EINVAL, errno.EBADF, errno.EPERM)
                with pytest.raises(OSError) as info:
                    os.pwrite(fd, b"x", 0)
                assert info.value.errno == errno.EBADF
                with pytest.raises(OSError):
                    mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                with mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                    assert len(m[:]) == PAGE
            finally:
                os.close(fd)
            with pytest.raises(ClientError) as refused:
                await client.memory_fd(writable=True)
            assert refused.value.code == protocol.codes.FORBIDDEN
            await client.wait(0, PAGE)  # the connection goes on
        assert os.fstat(state.memory.fd).st_size == SIZE
        state.stop()


async def test_writable_memory_fd_only_when_allowed_and_never_shrinks_nor_grows(tmp_path, image):
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, image, allow_writable_memory_fd=True))
        async with TrioClient.connect(state.server.path) as client:
            fd = await client.memory_fd(writable=True)
            try:
                os.pwrite(fd, b"\x00", SIZE - 1)
                with pytest.raises(PermissionError):  # F_SEAL_SHRINK
                    os.ftruncate(fd, 0)
                with pytest.raises(PermissionError):  # F_SEAL_GROW: a client grew it to 512 MiB
                    os.ftruncate(fd, 512 * MiB)
                with pytest.raises(PermissionError):
                    os.pwrite(fd, b"\x00", SIZE)
                with pytest.raises(PermissionError):
                    os.posix_fallocate(fd, SIZE, PAGE)
            finally:
                os.close(fd)
        assert os.fstat(state.memory.fd).st_size == SIZE
        state.stop()


# ---------------------------------------------------------------- the socket file


def test_exit_leaves_a_socket_that_is_not_ours(daemon, tmp_path):
    """On exit the daemon unlinked whatever was at its path."""
    path = daemon.socket_path
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(path)
        other.listen(1)
        assert daemon.stop() == 0
        assert os.path.exists(path)  # the other one's socket survived
    assert "no longer the socket this daemon created" in pathlib.Path(daemon.log_path).read_text()


def test_live_socket_is_refused_with_one_line(daemon, image):
    proc = subprocess.run([sys.executable, "-m", "cli", "restore", image, "--socket", daemon.socket_path, "-q"],
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "another daemon is serving" in proc.stderr, proc.stderr
    served(daemon.socket_path)  # and the first one is untouched


def test_stale_socket_is_replaced(image, tmp_path):
    path = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(path)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "restore", image, "--socket", path, "--background", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("READY")
        served(path)  # the dead socket refused connections: this is the daemon's new one
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0


# ---------------------------------------------------------------- other uids


@pytest.fixture
def shared_dir():
    """A directory any uid may enter (pytest's tmp_path is 0700)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="pageload-uid-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_nobody(fn):
    """Run ``fn`` in a forked child as uid/gid 65534; its exit status (0: fn returned True)."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = 0 if fn() else 1
        except BaseException as exc:  # noqa: B036 - the child must never return into pytest
            os.write(2, f"child: {type(exc).__name__}: {exc}\n".encode())
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.getuid() != 0, reason="switching to uid 65534 needs root")
@pytest.mark.parametrize("allow", [True, False])
def test_allow_uid_lets_that_uid_connect(image, shared_dir, allow):
    """--allow-uid did nothing, the socket being 0600."""
    path = str(shared_dir / "s.sock")
    args = ["--background", "-q"] + (["--allow-uid", str(NOBODY)] if allow else [])
    with DaemonProcess(image, path, str(shared_dir / "d.log"), args):

        def client():
            try:
                with Client.connect(path, deadline=time.monotonic() + DEADLINE_S) as c:
                    c.wait(0, PAGE)
                    return True
            except PermissionError:
                return False

        assert _as_nobody(client) == (0 if allow else 1)
        served(path)  # the daemon's own uid, as ever


def _loaded_map_fd(client):
    """The daemon's loaded-map descriptor, as ``Client.load_map`` gets it (the caller closes it)."""
    return client._fd_for(client._request(protocol.GetLoadedMap(next(client._ids))))


def _reopen_rw(fd):
    """The errno of reopening ``fd`` read-write through /proc/self/fd, or 0 if that worked."""
    try:
        os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR))
    except OSError as exc:
        return exc.errno
    return 0


def _cannot_write(fd):
    """Whether neither write(2) nor a writable shared mapping of ``fd`` (read-write) is allowed."""
    try:
        os.pwrite(fd, b"\xff", 0)
        return False
    except PermissionError:
        pass
    try:
        mmap.mmap(fd, 1, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE).close()
        return False
    except PermissionError:
        return True


@pytest.mark.skipif(os.getuid() != 0, reason="switching to uid 65534 needs root")
def test_a_client_of_another_uid_cannot_write_guest_memory_or_the_loaded_map(image, shared_dir):
    """Both memfds were mode 0777: a client of --allow-uid reopened its read-only fd through
    /proc/self/fd read-write, wrote guest memory, grew the memory file and set loaded bits."""
    path = str(shared_dir / "s.sock")
    with DaemonProcess(image, path, str(shared_dir / "d.log"), ["--background", "-q", "--allow-uid", str(NOBODY)]):
        with Client.connect(path) as owner:
            owner.wait(0, SIZE)
            before = os.pread(fd := owner.memory_fd(), PAGE, 0)
            os.close(fd)

        def client():
            with Client.connect(path, deadline=time.monotonic() + DEADLINE_S) as c:
                mem = c.memory_fd()
                lmap = _loaded_map_fd(c)
                assert _reopen_rw(mem) == errno.EACCES
                assert _reopen_rw(lmap) == errno.EACCES
                for fd in (mem, lmap):
                    with pytest.raises(OSError):
                        os.ftruncate(fd, 512 * MiB)
                    with pytest.raises(OSError):
                        os.pwrite(fd, b"\xff", 0)
                    with pytest.raises(OSError):
                        os.fchmod(fd, 0o666)
                    assert os.fstat(fd).st_mode & 0o777 == 0o400
                return True

        assert _as_nobody(client) == 0
        with Client.connect(path) as owner:
            fd = owner.memory_fd()
            try:
                assert os.fstat(fd).st_size == SIZE
                assert os.pread(fd, PAGE, 0) == before
            finally:
                os.close(fd)


def test_no_client_can_write_the_loaded_map_even_as_root(daemon):
    """A client of the daemon's own uid (root here: file modes do not stop it) set every
    bit of the loaded map, and another client read unloaded pages as loaded."""
    with Client.connect(daemon.socket_path) as c:
        fd = _loaded_map_fd(c)
        try:
            rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR) if os.getuid() == 0 else None
            if rw is not None:
                try:
                    assert _cannot_write(rw)  # F_SEAL_FUTURE_WRITE: the daemon's mapping only
                finally:
                    os.close(rw)
            else:
                assert _reopen_rw(fd) == errno.EACCES
            with pytest.raises(OSError):
                os.ftruncate(fd, 1 << 30)
        finally:
            os.close(fd)
    served(daemon.socket_path)


@pytest.mark.skipif(os.getuid() != 0, reason="starting a daemon as uid 65534 needs root")
def test_a_client_of_the_daemons_own_uid_cannot_reopen_the_memory_fd_read_write(image, shared_dir):
    """Not a boundary (the uid may chmod the memfd it owns), but no client of the daemon's
    uid writes guest memory by reopening its read-only fd by accident: mode 0400."""
    home = shared_dir / "nobody"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    img = home / "memory.img"
    shutil.copyfile(image, img)
    os.chmod(img, 0o644)
    path = str(home / "s.sock")
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable]
    try:
        probe = subprocess.run([*as_nobody, "-c", "import cli"], capture_output=True, timeout=DEADLINE_S,
                               cwd=str(home), env={**os.environ, "PYTHONPATH": ROOT})
    except FileNotFoundError:
        pytest.skip("no setpriv (util-linux) to start the daemon as uid 65534")
    if probe.returncode != 0:
        pytest.skip(f"this interpreter cannot run the project as uid 65534: {probe.stderr[-200:]!r}")
    proc = subprocess.Popen([*as_nobody, "-m", "cli", "restore", str(img), "--socket", path, "--background", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(home), text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert proc.stdout.readline().startswith("READY"), proc.stderr.read()

        def client():
            with Client.connect(path, deadline=time.monotonic() + DEADLINE_S) as c:
                mem = c.memory_fd()
                lmap = _loaded_map_fd(c)
                assert _reopen_rw(mem) == errno.EACCES
                assert _reopen_rw(lmap) == errno.EACCES
                with pytest.raises(OSError):
                    os.ftruncate(mem, 512 * MiB)
                return True

        assert _as_nobody(client) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0


# ---------------------------------------------------------------- full backlog, stopped daemon


class _SlowAcceptor:
    """A listener with a tiny backlog that accepts only once told to, then answers hellos."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(0)
        self.fillers = []
        while True:  # fill the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            self.fillers.append(s)
        self.sock.settimeout(0.05)  # accept() polls, so that close() can stop the thread
        self.go = threading.Event()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.go.wait()
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn):
        server = protocol.ServerConnection()
        conn.settimeout(DEADLINE_S)
        with conn:
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                server.receive_data(data)
                while (event := server.next_event()) not in (protocol.NEED_DATA, protocol.CLOSED):
                    if isinstance(event, protocol.Hello):
                        conn.sendall(server.send(protocol.HelloReply(event.id, 1, SIZE, PAGE, True)))
                    else:
                        conn.sendall(server.send(protocol.Loaded(event.id)))

    def close(self):
        self.stopped = True
        self.go.set()
        self.thread.join()
        self.sock.close()
        for s in self.fillers:
            s.close()


@pytest.fixture
def full_backlog(tmp_path, monkeypatch):
    """(path, acceptor, count of EAGAINs the clients met): the listener starts
    accepting after the client under test has retried twice."""
    path = str(tmp_path / "full.sock")
    acceptor = _SlowAcceptor(path)
    retries = [0]
    real = loader.socket._client._connect

    def counting(sock, p, delay):
        backoff = real(sock, p, delay)
        if backoff:
            retries[0] += 1
            if retries[0] >= 2:
                acceptor.go.set()
        return backoff

    monkeypatch.setattr(loader.socket._client, "_connect", counting)
    yield path, acceptor, retries
    acceptor.close()


def test_client_retries_a_full_backlog(full_backlog):
    path, _, retries = full_backlog
    with Client.connect(path, deadline=time.monotonic() + DEADLINE_S) as c:
        c.wait(0, PAGE)
    assert retries[0] >= 2


async def test_trio_client_retries_a_full_backlog(full_backlog):
    """trio took EAGAIN for 'in progress' and handed back an unconnected socket (ENOTCONN)."""
    path, _, retries = full_backlog
    async with TrioClient.connect(path) as c:
        await c.wait(0, PAGE)
    assert retries[0] >= 2


def test_client_gives_up_on_a_backlog_that_stays_full(tmp_path):
    acceptor = _SlowAcceptor(str(tmp_path / "never.sock"))
    try:
        with pytest.raises(TimeoutError, match="backlog stayed full"):
            Client.connect(str(tmp_path / "never.sock"), connect_timeout=0.05)
    finally:
        acceptor.close()


def test_wait_timeout_on_a_stopped_daemon(daemon):
    """Pageload wait hung forever on a stopped daemon."""
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        proc = subprocess.run([sys.executable, "-m", "cli", "wait", "--socket", daemon.socket_path,
                               "--timeout", "0.5", "0", "4K"], capture_output=True, text=True, timeout=DEADLINE_S)
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"pageload: {daemon.socket_path}: no answer from the daemon within 0.5 s"
    served(daemon.socket_path)


# ---------------------------------------------------------------- shutdown


@pytest.fixture
def stuck():
    """Client sockets, closed at the end."""
    socks = []
    yield socks
    for s in socks:
        s.close()


async def test_shutdown_flushes_clients_that_do_not_read_all_at_once(tmp_path, image, mock_clock, stuck):
    """Twenty clients that read nothing cost one flush deadline in all, not one each."""
    mock_clock.autojump_threshold = 0
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, image, background=False, aio_backend="sync"))
        state.server.max_backlog_bytes = 16 * 1024  # fewer stats replies to fill it: faster
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stuck.append(s)
            s.connect(state.server.path)
            s.setblocking(False)
            s.sendall(HELLO)
            with pytest.raises(BlockingIOError):
                while True:  # until this client's replies fill the socket and the daemon stops reading
                    s.send(STATS * 64)
                    await trio.testing.wait_all_tasks_blocked()
        assert all(x.reply_bytes_queued > 0 for x in state.server.statistics().sessions)
        t0 = trio.current_time()
        await state.server.aclose(t0 + 1.0)
        assert trio.current_time() - t0 == pytest.approx(1.0, abs=0.1)  # virtual time: one deadline
        assert not state.server.sessions or all(s._closed for s in state.server.sessions)
        state.stop()


# ---------------------------------------------------------------- the write path


def _replies(sock, count):
    """``count`` replies read from a blocking socket (in a worker thread)."""
    sock.settimeout(DEADLINE_S)
    unpacker = msgpack.Unpacker()
    replies = []
    while len(replies) < count:
        chunk = sock.recv(65536)
        assert chunk, "the daemon closed the connection"
        unpacker.feed(chunk)
        replies.extend(unpacker)
    return replies


async def test_a_batch_of_requests_is_answered_by_the_batch_not_the_writer_task(tmp_path, image, monkeypatch):
    """The replies to one receive are written at the end of its batch, in the reading
    task; the writer task only takes over when the socket is full."""
    import loader.socket._session as server_mod

    writers: list[str] = []
    push = server_mod.Session._push

    def recording_push(self):
        writers.append(trio.lowlevel.current_task().name)
        push(self)

    monkeypatch.setattr(server_mod.Session, "_push", recording_push)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, image))
        await state.loader.done.wait()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(state.server.path)
            s.sendall(HELLO)
            assert (await trio.to_thread.run_sync(_replies, s, 1))[0]["re"] == 1
            waits = b"".join(msgpack.packb({"op": "wait", "id": 10 + i, "off": i * PAGE, "len": PAGE})
                             for i in range(256))
            s.sendall(waits)
            replies = await trio.to_thread.run_sync(_replies, s, 256)
        finally:
            s.close()
        assert sorted(r["re"] for r in replies) == list(range(10, 266))
        assert all(r.get("ok") == "loaded" for r in replies)
        assert writers and not [w for w in writers if "writer" in w], writers
        state.stop()


async def test_connections_closed_before_their_writer_starts_are_freed(tmp_path, image):
    """A client that sends and hangs up at once: its session may be done before its
    writer task first runs; the writer must end too (it once parked for good)."""
    async with trio.open_nursery() as nursery:
        state = await nursery.start(run_daemon, options(tmp_path, image))
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(state.server.path)
            s.sendall(HELLO + STATS)
            s.close()
        with trio.move_on_after(DEADLINE_S):
            while state.server.statistics().connections_total < 20 or state.server.sessions:
                await trio.sleep(0.01)
        assert not state.server.sessions
        state.stop()


def test_a_half_closed_client_gets_its_answers_and_the_error_for_a_cut_frame(daemon):
    """Requests, then a cut frame, then SHUT_WR: every request is answered, the cut
    frame gets its ``truncated`` error, then the daemon hangs up."""
    wait = msgpack.packb({"op": "wait", "id": 5, "off": 0, "len": PAGE})
    with Client.connect(daemon.socket_path, deadline=time.monotonic() + DEADLINE_S) as client:
        client.wait(0, SIZE)  # all loaded: the wait is answered at once (a blocked one is dropped at hang-up)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket_path)
        s.sendall(HELLO + STATS + wait + STATS[:-3])
        s.shutdown(socket.SHUT_WR)
        replies = read_until_closed(s)
    assert [r.get("re") for r in replies[:3]] == [1, 2, 5]
    assert replies[-1].get("err") == "truncated", replies
    served(daemon.socket_path)


def test_requests_trickling_in_a_byte_at_a_time_are_answered(daemon):
    """After a short receive the session waits for the socket before it reads again:
    a client that sends its frames a byte at a time still gets every answer."""
    wait = msgpack.packb({"op": "wait", "id": 7, "off": PAGE, "len": PAGE})
    with Client.connect(daemon.socket_path, deadline=time.monotonic() + DEADLINE_S) as client:
        client.wait(0, SIZE)  # all loaded
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket_path)
        for b in HELLO + wait + STATS:
            s.sendall(bytes([b]))
            time.sleep(0.0005)
        replies = _replies(s, 3)
    assert [r.get("re") for r in replies] == [1, 7, 2]
    assert "err" not in replies[1]
