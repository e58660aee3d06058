"""A ``pageload restore`` subprocess to drive: spawned, ready, stopped.

The one implementation used by the benchmark, the design comparison, the demo
and the tests.  :meth:`DaemonProcess.start` spawns ``python -m cli restore SOURCE
--socket PATH ...`` and blocks until the daemon prints its ``READY`` line
(``ready_s`` is the time from just before the spawn to that line).  Its stderr
goes to ``log_path``.  :meth:`DaemonProcess.stop` sends SIGTERM and waits; used
as a context manager, the daemon is always stopped, even on error.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


class DaemonStartError(Exception):
    """The daemon exited, or said nothing, before READY; one line with its stderr's tail."""


class DaemonProcess:
    """One ``pageload restore SOURCE --socket SOCKET [args...]`` subprocess.

    ``args`` are the other ``restore`` flags (``--background`` is not implied).
    The daemon's stdout after READY is left unread in :attr:`proc`; its stderr is
    written to ``log_path``.
    """

    def __init__(self, source: str, socket_path: str, log_path: str, args: Sequence[str] = ()) -> None:
        self.argv = [sys.executable, "-m", "cli", "restore", source, "--socket", socket_path, *args]
        self.socket_path = socket_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_line = ""
        self.ready_s = 0.0
        self.returncode: int | None = None

    def __enter__(self) -> DaemonProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Spawn and wait for READY; :class:`DaemonStartError` if it does not come."""
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        with open(self.log_path, "wb") as log:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = read_line(self.proc.stdout, timeout)
        self.ready_s = time.perf_counter() - t0
        self.ready_line = line.decode(errors="replace").strip()
        if not line.startswith(b"READY"):
            code = self.stop()
            said = self.stderr_tail() or "no message"
            how = f"exited with {code}" if line or code else f"printed nothing in {timeout:.0f} s"
            raise DaemonStartError(f"pageload restore {' '.join(self.argv[5:])}: {how} before READY: {said}")

    def stderr_tail(self, lines: int = 3) -> str:
        """The last ``lines`` non-empty lines of the daemon's stderr, joined with ' | '."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return " | ".join([ln.strip() for ln in text.splitlines() if ln.strip()][-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL.  Returns the exit status
        (negative: killed by that signal); idempotent."""
        proc = self.proc
        if proc is None or self.returncode is not None:
            return self.returncode
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self.returncode = proc.returncode
        return self.returncode


def read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a pipe, or what came before EOF, or b'' after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    data = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return b""
            chunk = os.read(fd, 1)  # byte by byte: what follows READY stays in the pipe
            if not chunk:
                return data
            data += chunk
    return data
