"""Start-up faults: every one is ONE line on stderr and exit 2, never a hang,
never a traceback, and never damage to the checkpoint or to another daemon's memory.

Each case runs ``python -m cli restore ...`` (or ``checkpoint ...``) as a
subprocess with a timeout, so a hang (a FIFO opened for reading) fails the test
instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import trio

from loader import Client, DaemonOptions, LoaderConfig, LoadError, MemoryFile, StartupError, run_daemon
from loader.checkpoint import CheckpointError, create_checkpoint, open_checkpoint
from workloads import DaemonProcess, make_sample_image

MiB = 1 << 20
TIMEOUT_S = 60  # a start-up that hangs (a FIFO) ends here and fails the test


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("images")
    raw = str(d / "memory.img")
    make_sample_image(raw, 8 * MiB, seed=3, hole_granularity=1 * MiB)
    ckpt = str(d / "ckpt")
    create_checkpoint(raw, ckpt)
    return {"raw": raw, "pages": ckpt}


def digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cli(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, stdin=subprocess.DEVNULL, pass_fds=pass_fds)


def restore(
    source: str, sock: str | Path, *args: str, pass_fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return cli("restore", source, "--socket", str(sock), "--background", *args, pass_fds=pass_fds)


def one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one stderr line of a refused start (exit 2), checked for ``needles``."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("pageload"), line
    assert "Traceback" not in line and "READY" not in proc.stdout
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# --------------------------------------------------------------- the memory file

@pytest.mark.parametrize("force", [False, True])
def test_memory_file_that_is_the_raw_source_is_refused_and_the_source_untouched(tmp_path, images, force):
    before = digest(images["raw"])
    extra = ["--force"] if force else []
    proc = restore(images["raw"], tmp_path / "s", "--memory-file", images["raw"], *extra)
    one_line(proc, images["raw"], "checkpoint's own file")
    assert digest(images["raw"]) == before and os.path.getsize(images["raw"]) == 8 * MiB


@pytest.mark.parametrize("name", ["pages.img", "index.msgpack"])
def test_memory_file_that_is_a_checkpoint_file_is_refused_even_with_force(tmp_path, images, name):
    target = os.path.join(images["pages"], name)
    before = digest(target)
    one_line(restore(images["pages"], tmp_path / "s", "--memory-file", target, "--force"), "checkpoint's own file")
    assert digest(target) == before


def test_memory_file_that_is_a_hard_link_to_the_source_is_refused(tmp_path, images):
    link = tmp_path / "same-inode"
    os.link(images["raw"], link)
    before = digest(images["raw"])
    one_line(restore(images["raw"], tmp_path / "s", "--memory-file", str(link), "--force"), "checkpoint's own file")
    assert digest(images["raw"]) == before


@pytest.mark.parametrize("target", ["source", "other", "dangling"])
def test_memory_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path, images, target):
    other = tmp_path / "precious"
    other.write_bytes(b"keep me" * 1000)
    link = tmp_path / "mem"
    dest = {"source": images["raw"], "other": str(other), "dangling": str(tmp_path / "nowhere")}[target]
    os.symlink(dest, link)
    for extra in ([], ["--force"]):
        one_line(restore(images["raw"], tmp_path / "s", "--memory-file", str(link), *extra), "symbolic link")
    assert other.read_bytes() == b"keep me" * 1000
    assert os.path.getsize(images["raw"]) == 8 * MiB
    assert not os.path.exists(tmp_path / "nowhere")  # not created through the dangling link


def test_existing_memory_file_needs_force(tmp_path, images):
    mem = tmp_path / "mem"
    mem.write_bytes(b"x" * 4096)
    one_line(restore(images["raw"], tmp_path / "s", "--memory-file", str(mem)), "already exists", "--force")
    assert mem.read_bytes() == b"x" * 4096


@pytest.mark.parametrize("kind", ["directory", "fifo", "chardev", "procfs"])
def test_memory_file_that_is_not_a_regular_file_is_refused(tmp_path, images, kind):
    if kind == "directory":
        path = str(tmp_path / "dir")
        os.mkdir(path)
    elif kind == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    elif kind == "chardev":
        path = "/dev/null"
    else:
        path = "/proc/version"
    for extra in ([], ["--force"]):
        line = one_line(restore(images["raw"], tmp_path / "s", "--memory-file", path, *extra), path)
        assert "not a regular file" in line or "already exists" in line or "cannot" in line, line
    assert os.path.exists("/dev/null") and Path("/proc/version").read_text()


def test_memory_file_in_a_missing_directory(tmp_path, images):
    one_line(restore(images["raw"], tmp_path / "s", "--memory-file", str(tmp_path / "no" / "mem")),
             "No such file or directory")


def test_second_daemon_on_a_locked_memory_file_is_refused_and_the_first_keeps_its_memory(tmp_path, images):
    mem = tmp_path / "mem"
    first = DaemonProcess(images["raw"], str(tmp_path / "a.sock"), str(tmp_path / "a.log"),
                          ["--background", "--memory-file", str(mem), "-q"])
    with first:
        assert mem.stat().st_size == 8 * MiB
        one_line(restore(images["raw"], tmp_path / "b.sock", "--memory-file", str(mem)), "already exists")
        one_line(restore(images["raw"], tmp_path / "b.sock", "--memory-file", str(mem), "--force"),
                 "in use", str(mem))
        assert mem.stat().st_size == 8 * MiB  # never truncated under the first daemon
        with Client.connect(first.socket_path) as client:
            client.wait(0, 8 * MiB)
        assert digest(mem) == digest(images["raw"])
        assert not os.path.exists(tmp_path / "b.sock")
    assert first.returncode == 0


def test_force_reuses_an_unlocked_file_emptied(tmp_path, images):
    mem = tmp_path / "mem"
    mem.write_bytes(b"\xff" * (16 * MiB))  # stale bytes, and larger than the image
    with DaemonProcess(images["raw"], str(tmp_path / "a.sock"), str(tmp_path / "a.log"),
                       ["--background", "--memory-file", str(mem), "--force", "-q"]) as daemon:
        with Client.connect(daemon.socket_path) as client:
            client.wait(0, 8 * MiB)
        assert mem.stat().st_size == 8 * MiB
        assert digest(mem) == digest(images["raw"])  # holes read as zero, not as stale 0xff


def test_memory_file_lock_and_refusals_in_process(tmp_path, images):
    path = str(tmp_path / "mem")
    with MemoryFile(1 * MiB, path) as first:
        assert first.fd >= 0
        with pytest.raises(StartupError, match="in use"):
            MemoryFile(1 * MiB, path, force=True)
        assert os.path.getsize(path) == 1 * MiB
    again = MemoryFile(2 * MiB, path, force=True)  # lock released by close()
    again.close()
    with pytest.raises(StartupError, match="checkpoint's own file"):
        MemoryFile(8 * MiB, images["raw"], force=True, protect=open_checkpoint(images["raw"]).files())


def test_memfd_is_sealed_against_shrinking_and_growing_and_mode_0400():
    with MemoryFile(1 * MiB) as mem:
        seals = fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        assert os.fstat(mem.fd).st_mode & 0o7777 == 0o400
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 4096)
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 2 * MiB)


@pytest.mark.parametrize("memory_size", [1 << 63, (1 << 64) - 4096, 1 << 62])
def test_huge_memory_size_in_an_index_is_one_line(tmp_path, memory_size):
    ckpt = tmp_path / "huge"
    ckpt.mkdir()
    (ckpt / "pages.img").write_bytes(b"")
    (ckpt / "index.msgpack").write_bytes(msgpack.packb({
        "format": "pageload-checkpoint", "version": 1, "page_size": 4096, "memory_size": memory_size,
        "pages_size": 0, "ranges": [], "checksum": "xxh3_64", "chunk_size": 1 << 20, "checksums": []}))
    line = one_line(restore(str(ckpt), tmp_path / "s"), "memory")
    assert "OverflowError" not in line


def _index(tmp_path: Path, name: str, memory_size: int, images: dict[str, str] | None = None) -> Path:
    """A checkpoint whose index claims ``memory_size`` (the pages and ranges of the
    sample checkpoint in ``images``, or none)."""
    ckpt = tmp_path / name
    if images is None:
        ckpt.mkdir()
        (ckpt / "pages.img").write_bytes(b"")
        fields = {"format": "pageload-checkpoint", "version": 1, "page_size": 4096, "pages_size": 0,
                  "ranges": [], "checksum": "xxh3_64", "chunk_size": 1 << 20, "checksums": []}
    else:
        shutil.copytree(images["pages"], ckpt)
        fields = msgpack.unpackb((ckpt / "index.msgpack").read_bytes())
    fields["memory_size"] = memory_size
    (ckpt / "index.msgpack").write_bytes(msgpack.packb(fields))
    return ckpt


def test_memory_size_0_in_an_index_is_one_line_for_restore_and_inspect(tmp_path):
    """Restore printed a 17-line traceback (exit 1), while checkpoint inspect exited 0."""
    ckpt = _index(tmp_path, "zero", 0)
    one_line(restore(str(ckpt), tmp_path / "s"), "memory_size", "is 0")
    one_line(cli("checkpoint", "inspect", str(ckpt)), "memory_size", "is 0")


def test_a_memory_size_past_the_hosts_memory_is_refused_before_ready(tmp_path, images):
    """An index claiming 64 TiB was served, and the first loadmap built a 2 GiB map."""
    from loader._startup import host_memory
    host = host_memory()
    if host is None or 64 * host >= 1 << 46:
        pytest.skip(f"no bound on this host (vm.overcommit_memory=1, or {host} bytes of RAM + swap)")
    ckpt = _index(tmp_path, "huge", 1 << 46, images)
    one_line(restore(str(ckpt), tmp_path / "s"), "64.0 TiB", "times this host's memory")
    # the bound is the host's: what fits is served
    with DaemonProcess(str(_index(tmp_path, "fits", 64 * MiB, images)), str(tmp_path / "ok.sock"),
                       str(tmp_path / "ok.log"), ["--background", "-q"]) as d:
        with Client.connect(d.socket_path) as c:
            c.load_map()
            c.wait(64 * MiB - 4096, 4096)


@pytest.mark.parametrize("uid", ["-1", "99999999999", "4294967295", "x"])
def test_an_impossible_allow_uid_is_one_line(tmp_path, images, uid):
    """--allow-uid -1 or 99999999999: a 45-line traceback, exit 1."""
    one_line(restore(images["raw"], tmp_path / "s", "--allow-uid", uid), "--allow-uid", "not a user id")


async def test_an_impossible_allowed_uid_is_a_startup_error(tmp_path, images):
    with pytest.raises(StartupError, match="not a user id"):
        await run_daemon(DaemonOptions(source=images["raw"], socket_path=str(tmp_path / "s"), allow_uids=(-1,),
                                       handle_signals=False, ready_line=False))


_MAXRSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "sys.stderr.write(r.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
           "sys.exit(r.returncode)")


@pytest.mark.parametrize("count", ["99999999999999999999", "50000000"])
def test_a_huge_listen_fds_is_one_line_before_any_memory_is_spent(tmp_path, images, count):
    """LISTEN_FDS=50000000 took 2 GB and 1.6 s before its one-line error;
    LISTEN_FDS=99999999999999999999 was a 14-line traceback."""
    script = f'LISTEN_PID=$$ LISTEN_FDS={count} exec "$0" -m cli restore "$1"'  # $$: the daemon's pid, after exec
    proc = subprocess.run([sys.executable, "-c", _MAXRSS, "sh", "-c", script, sys.executable, images["raw"]],
                          capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    one_line(proc, f"LISTEN_FDS={count}", "RLIMIT_NOFILE")
    assert int(proc.stdout.split()[-1]) < 200 * 1024, proc.stdout  # KiB: the daemon's peak RSS


# ------------------------------------------------------------- FIFOs and types

def _fifo_checkpoint(tmp_path: Path, images: dict[str, str], name: str) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(images["pages"], ckpt)
    os.unlink(ckpt / name)
    os.mkfifo(ckpt / name)
    return ckpt


def test_fifo_as_source_does_not_hang(tmp_path):
    fifo = tmp_path / "memory.img"
    os.mkfifo(fifo)
    one_line(restore(str(fifo), tmp_path / "s"), str(fifo), "FIFO")


@pytest.mark.parametrize("name", ["index.msgpack", "pages.img"])
def test_fifo_in_a_checkpoint_does_not_hang(tmp_path, images, name):
    ckpt = _fifo_checkpoint(tmp_path, images, name)
    one_line(restore(str(ckpt), tmp_path / "s"), name, "FIFO")
    if name == "index.msgpack":
        one_line(restore(str(ckpt / name), tmp_path / "s"), name, "FIFO")


@pytest.mark.parametrize("action", ["inspect", "verify"])
@pytest.mark.parametrize("name", ["index.msgpack", "pages.img"])
def test_checkpoint_commands_on_a_fifo_do_not_hang(tmp_path, images, action, name):
    ckpt = _fifo_checkpoint(tmp_path, images, name)
    one_line(cli("checkpoint", action, str(ckpt)), name, "FIFO")


def test_checkpoint_inspect_and_create_of_a_fifo_image(tmp_path):
    fifo = tmp_path / "memory.img"
    os.mkfifo(fifo)
    one_line(cli("checkpoint", "inspect", str(fifo)), "FIFO")
    one_line(cli("checkpoint", "create", str(fifo), str(tmp_path / "out")), "FIFO")
    assert not os.path.exists(tmp_path / "out")


def test_device_as_source_is_refused_without_opening_it(tmp_path):
    one_line(restore("/dev/zero", tmp_path / "s"), "/dev/zero", "character device")


def test_directory_without_index_and_missing_source(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line(restore(str(tmp_path / "empty"), tmp_path / "s"), "not a pages checkpoint")
    one_line(restore(str(tmp_path / "missing.img"), tmp_path / "s"), "No such file or directory")


def test_open_checkpoint_refuses_a_fifo_in_process(tmp_path):
    fifo = tmp_path / "x.img"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="FIFO"):
        open_checkpoint(str(fifo))


# ------------------------------------------------------------------- the socket

@pytest.mark.parametrize("kind", ["file", "symlink", "directory", "missing-parent", "parent-is-file", "too-long"])
def test_unusable_socket_path_is_one_line(tmp_path, images, kind):
    sock = tmp_path / "s.sock"
    if kind == "file":
        sock.write_bytes(b"not a socket")
    elif kind == "symlink":
        (tmp_path / "target").write_bytes(b"precious")
        os.symlink(tmp_path / "target", sock)
    elif kind == "directory":
        sock.mkdir()
    elif kind == "missing-parent":
        sock = tmp_path / "no" / "s.sock"
    elif kind == "parent-is-file":
        (tmp_path / "f").write_bytes(b"")
        sock = tmp_path / "f" / "s.sock"
    else:
        sock = tmp_path / ("x" * (120 - len(str(tmp_path))))
    mem = tmp_path / "mem"
    one_line(restore(images["raw"], sock, "--memory-file", str(mem)), str(sock) if kind != "too-long" else "107")
    assert not mem.exists()  # refused before the memory file was made
    if kind == "file":
        assert sock.read_bytes() == b"not a socket"
    if kind == "symlink":
        assert os.path.islink(sock) and (tmp_path / "target").read_bytes() == b"precious"


def test_socket_taken_by_a_live_daemon_is_one_line_and_the_new_memory_file_goes(tmp_path, images):
    sock = str(tmp_path / "a.sock")
    with DaemonProcess(images["raw"], sock, str(tmp_path / "a.log"), ["--background", "-q"]):
        mem = tmp_path / "mem"
        one_line(restore(images["raw"], sock, "--memory-file", str(mem)), sock)
        assert not mem.exists()  # created by the failed start, removed again
        assert os.path.exists(sock)


async def test_run_daemon_raises_startup_errors_bare(tmp_path, images):
    (tmp_path / "s.sock").write_bytes(b"")
    opts = DaemonOptions(source=images["raw"], socket_path=str(tmp_path / "s.sock"), handle_signals=False,
                         ready_line=False)
    with pytest.raises(StartupError, match="not a socket"):
        await run_daemon(opts)


async def test_bind_failure_inside_the_nursery_comes_out_bare(tmp_path, images, monkeypatch):
    """A failure the preflight cannot see (here: bind refused) is still one StartupError."""
    import loader.socket._server as server_mod

    async def refuse(self):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(server_mod.Server, "_bind", refuse)
    mem = tmp_path / "mem"
    opts = DaemonOptions(source=images["raw"], socket_path=str(tmp_path / "s.sock"), handle_signals=False,
                         ready_line=False, memory_file=str(mem))
    with pytest.raises(StartupError, match="s.sock: Permission denied"):
        await run_daemon(opts)
    assert not mem.exists()


# ------------------------------------------------------------------ the options

@pytest.mark.parametrize("args, needle", [
    (["--threads", "-3"], "--threads"),
    (["--threads", "0"], "--threads"),
    (["--queue-depth", "0"], "--queue-depth"),
    (["--background-reads", "0"], "--background-reads"),
    (["--busy-background-reads", "-1"], "--busy-background-reads"),
    (["--progress-interval", "0"], "--progress-interval"),
    (["--progress-interval", "nan"], "--progress-interval"),
    (["--read-size", "0"], "read"),
    (["--read-size", "12Q"], "--read-size"),
    (["--aio", "nonesuch"], "nonesuch"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--uffd-socket", "u.sock", "--uffd-spin-us", "-1"], "uffd spin time must be 0 to 10000 us, not -1"),
    (["--uffd-socket", "u.sock", "--uffd-spin-us", "10001"], "uffd spin time must be 0 to 10000 us, not 10001"),
    (["--shutdown-timeout", "0"], "--shutdown-timeout must be positive"),
    (["--metrics", "nohost"], "--metrics 'nohost'"),
    (["--record-seconds", "-1"], "record seconds must be a positive number of seconds, not -1.0"),
])
def test_bad_options_are_one_line(tmp_path, images, args, needle):
    one_line(restore(images["raw"], tmp_path / "s", *args), needle)


def test_missing_socket_option_is_one_line(images):
    one_line(cli("restore", images["raw"]), "--socket")


def test_ready_fd_not_open_is_one_line(tmp_path, images):
    one_line(restore(images["raw"], tmp_path / "s", "--ready-fd", "99"), "ready fd 99", "not an open")


def test_ready_fd_open_read_only_is_one_line(tmp_path, images):
    r, w = os.pipe()
    try:
        one_line(restore(images["raw"], tmp_path / "s", "--ready-fd", str(r), pass_fds=(r,)),
                 f"ready fd {r}", "read-only")
    finally:
        os.close(r)
        os.close(w)


# -------------------------------------------------------------- a full file system

@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on a directory of its own, not under pytest's
    temporary directories (``path`` names it): a run killed before it unmounts leaves
    a mount that pytest's clean-up of old temporary directories would fail on (EBUSY)
    at the end of every later run on the host."""
    path = Path(tempfile.mkdtemp(prefix=f"pageload-{path.name}-"))
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        with contextlib.suppress(OSError):
            path.rmdir()


_CAN_MOUNT = os.geteuid() == 0 and shutil.which("mount") is not None
needs_mount = pytest.mark.skipif(not _CAN_MOUNT, reason="mounting a small tmpfs needs root and mount(8)")


def _take_the_space(where: Path) -> None:
    """Someone else fills the file system at ``where`` up."""
    with open(where / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\x01" * MiB)
                f.flush()


@needs_mount
def test_memory_file_that_cannot_hold_the_data_is_refused_before_ready(tmp_path, images):
    data = open_checkpoint(images["raw"]).layout.data_bytes
    assert data > 2 * MiB
    with small_tmpfs(tmp_path / "small", "2m") as small:
        mem = small / "mem"
        one_line(restore(images["raw"], tmp_path / "s", "--memory-file", str(mem)),
                 str(mem), "not enough space", "2.0 MiB free")
        assert not mem.exists()


@needs_mount
async def test_a_file_system_filling_up_while_loading_is_named_not_bad_address(tmp_path, images):
    layout = open_checkpoint(images["raw"]).layout
    with small_tmpfs(tmp_path / "small", "8m") as small:
        mem = small / "mem"
        opts = DaemonOptions(source=images["raw"], socket_path=str(tmp_path / "s.sock"), handle_signals=False,
                             ready_line=False, memory_file=str(mem), aio_backend="sync", reserve="none",
                             config=LoaderConfig(sweep=False))  # lazy: nothing loads until waited for
        async with trio.open_nursery() as nursery:
            state = await nursery.start(run_daemon, opts)
            _take_the_space(small)
            first = layout[0]
            with pytest.raises(LoadError) as info:
                await state.loader.wait_loaded(first.mem_offset, first.length)
            message = str(info.value)
            assert "memory file is full (ENOSPC on" in message and str(mem) in message, message
            assert "Bad address" not in message
            state.stop()
        assert info.value.errno == errno.ENOSPC  # what EFAULT meant here


@needs_mount
async def test_a_file_system_filling_up_under_the_sweeps_copies_is_named(tmp_path, images):
    """The sweep copies file to file (splice): a full file system is ENOSPC there, not
    EFAULT; the failed pages' errors say the memory file is full all the same."""
    layout = open_checkpoint(images["raw"]).layout
    with small_tmpfs(tmp_path / "small", "8m") as small:
        mem = small / "mem"
        opts = DaemonOptions(source=images["raw"], socket_path=str(tmp_path / "s.sock"), handle_signals=False,
                             ready_line=False, memory_file=str(mem), aio_backend="threads", reserve="none",
                             config=LoaderConfig(sweep=False))
        async with trio.open_nursery() as nursery:
            state = await nursery.start(run_daemon, opts)
            _take_the_space(small)
            loader = state.loader
            loader.config = dataclasses.replace(loader.config, sweep=True)  # the sweep starts now
            loader.hold_sweep(False)
            with trio.fail_after(30):
                await loader.done.wait()
            stats = loader.statistics()
            assert stats.reads_copied > 0 and stats.failed_bytes == stats.total_bytes
            assert {e for _, _, e in stats.failed_ranges} == {errno.ENOSPC}
            first = layout[0]
            with pytest.raises(LoadError) as info:
                await loader.wait_loaded(first.mem_offset, first.length)
            state.stop()
        assert "memory file is full (ENOSPC on" in str(info.value) and str(mem) in str(info.value)


@needs_mount
async def test_the_data_is_reserved_so_a_file_system_filled_after_ready_fails_no_load(tmp_path, images):
    """The space check at start was no reservation: a file system filled by someone else
    after READY failed the loads with ENOSPC ('io-error' to the waiters)."""
    layout = open_checkpoint(images["raw"]).layout
    with open(images["raw"], "rb") as f:
        expected = f.read()
    with small_tmpfs(tmp_path / "small", "8m") as small:
        opts = DaemonOptions(source=images["raw"], socket_path=str(tmp_path / "s.sock"), handle_signals=False,
                             ready_line=False, memory_file=str(small / "mem"), aio_backend="threads",
                             config=LoaderConfig(sweep=False))  # lazy; --reserve auto: data, for a file
        async with trio.open_nursery() as nursery:
            state = await nursery.start(run_daemon, opts)
            _take_the_space(small)
            with trio.fail_after(30):
                for r in layout:
                    await state.loader.wait_loaded(r.mem_offset, r.length)  # LoadError (ENOSPC) unreserved
            assert state.memory.reserved == layout.data_bytes
            # pread: the holes read as zeros (the daemon's own mapping would SIGBUS on them now)
            assert os.pread(state.memory.fd, len(expected), 0) == expected
            state.stop()


def _read_every_page(fd: int, size: int) -> int:
    """In a forked child: map ``fd`` and read a byte of every page; its exit status
    (negative: the signal that killed it)."""
    pid = os.fork()
    if pid == 0:
        try:
            import faulthandler
            import mmap
            faulthandler.disable()  # a SIGBUS is the answer here, not a crash to report
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            total = 0
            for off in range(0, size, 4096):
                total += m[off]
            os._exit(0)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@needs_mount
@pytest.mark.parametrize("reserve", ["all", "data"])
def test_a_client_mapping_the_memory_file_on_a_full_file_system(tmp_path, images, reserve):
    """A client mapping the memory fd got SIGBUS reading a hole once the file system was
    full.  With --reserve all the holes are allocated too, and every page reads; with
    'data' (the default for a file) a hole is the file system's to allocate when a
    mapping first touches it, so such a client gets SIGBUS: what docs/OPERATIONS.md says
    a mapping client must expect (pread reads a hole as zeros and allocates nothing)."""
    with small_tmpfs(tmp_path / "small", "12m") as small:
        with DaemonProcess(images["raw"], str(tmp_path / "s.sock"), str(tmp_path / "d.log"),
                           ["--background", "-q", "--no-sweep", "--memory-file", str(small / "mem"),
                            "--reserve", reserve]) as d:
            _take_the_space(small)
            with Client.connect(d.socket_path) as c:
                c.wait(0, 8 * MiB)  # every data page, from reserved space
                fd = c.memory_fd()
            try:
                code = _read_every_page(fd, 8 * MiB)
                holes = [off for off in range(0, 8 * MiB, 4096) if os.pread(fd, 4096, off) == bytes(4096)]
            finally:
                os.close(fd)
            assert holes  # the image has holes and zero pages
            assert code == (0 if reserve == "all" else -signal.SIGBUS)
            assert d.stop() == 0


def test_explain_error_names_a_full_file_only_when_full(tmp_path):
    with MemoryFile(1 * MiB, str(tmp_path / "mem")) as mem:
        assert mem.explain_error(errno.EIO) == os.strerror(errno.EIO)
        assert "Bad address" in mem.explain_error(errno.EFAULT)  # the file system is not full here


def test_no_descriptor_left_for_the_memfd_is_a_startup_error():
    """memfd_create failing (EMFILE: the descriptor limit reached) came out of the daemon
    as a bare OSError: exit 1 and 'pageload: Too many open files', no word of what failed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.dup(0)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))  # no descriptor is free below it
    try:
        with pytest.raises(StartupError, match=r"^memory file \(memfd\): cannot create it: Too many open files$"):
            MemoryFile(1 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
