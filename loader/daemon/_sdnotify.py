"""systemd integration: ``sd_notify`` and socket activation, in the few lines of the protocol.

Why not a library: ``sdnotify`` (0.3.2, 2017) is the same dozen lines, swallows
every error silently and knows nothing of socket activation; ``cysystemd`` needs
libsystemd's headers and a C build at install time, for two datagrams and two
environment variables.  Both protocols are small and stable
(``sd_notify(3)``, ``sd_listen_fds(3)``), so they are written here.

* :class:`Notifier` sends ``READY=1``, ``STATUS=...``, ``STOPPING=1`` as datagrams
  to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).  Without
  the variable it does nothing.  A failed send is logged once and never stops the
  daemon.
* :func:`listen_fds` returns the sockets systemd passed (``$LISTEN_FDS`` from fd 3,
  when ``$LISTEN_PID`` is this process), and :func:`activated_socket` checks the
  one the daemon serves on: a listening ``AF_UNIX`` stream socket.
"""

from __future__ import annotations

import logging
import os
import resource
import socket

from .._startup import StartupError

log = logging.getLogger("pageload")

SD_LISTEN_FDS_START = 3


class ActivationError(StartupError):
    """The sockets passed by the service manager are not what the daemon can serve: a
    start-up failure (one line, exit 2)."""


class Notifier:
    """Datagrams to the service manager; a no-op when ``address`` is None or empty."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._sock: socket.socket | None = None
        self._warned = False
        self.sent: list[str] = []  #: what was sent, for tests and the log

    @classmethod
    def from_environment(cls, unset: bool = True) -> Notifier:
        """From ``$NOTIFY_SOCKET``; ``unset`` removes it so children do not inherit it."""
        address = os.environ.get("NOTIFY_SOCKET")
        if unset:
            os.environ.pop("NOTIFY_SOCKET", None)
        return cls(address)

    def __bool__(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value``) as one datagram; False if it could not be sent."""
        if self.address is None:
            return False
        message = "\n".join(fields)
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), target)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %s failed: %s (further failures not logged)", self.address,
                            exc.strerror or exc)
                self._warned = True
            return False
        self.sent.append(message)
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={_one_line(status)}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={_one_line(status)}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={_one_line(status)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return text.replace("\n", " ")


def listen_fds(unset: bool = True) -> list[int]:
    """The fds passed by socket activation (``sd_listen_fds(3)``): none unless
    ``$LISTEN_PID`` is this process.  They are made close-on-exec.  ``unset``
    removes the variables.  :class:`ActivationError` if ``$LISTEN_FDS`` is not a number."""
    pid_text = os.environ.get("LISTEN_PID")
    count_text = os.environ.get("LISTEN_FDS")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if pid_text is None or count_text is None:
        return []
    try:
        pid = int(pid_text)
    except ValueError:
        return []  # not for us
    if pid != os.getpid():
        return []
    try:
        count = int(count_text)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={count_text!r} is not a number") from None
    if count < 0:
        raise ActivationError(f"LISTEN_FDS={count} is negative")
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit != resource.RLIM_INFINITY and count > limit - SD_LISTEN_FDS_START:
        raise ActivationError(f"LISTEN_FDS={count} is more descriptors than this process may have open "
                              f"(RLIMIT_NOFILE {limit})")
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS={count}: fd {fd} is not open ({exc.strerror})") from None
    return fds


def activated_socket(fds: list[int]) -> socket.socket:
    """The one socket to serve on: exactly one fd, a listening ``AF_UNIX`` stream socket."""
    if len(fds) != 1:
        raise ActivationError(f"socket activation passed {len(fds)} sockets; pageload serves on exactly one")
    fd = fds[0]
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"socket activation: fd {fd} is not a socket ({exc.strerror or exc})") from None
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ActivationError(f"socket activation: fd {fd} is {sock.family.name}/{sock.type.name}, "
                                  "not a Unix stream socket (ListenStream=/path in the .socket unit)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(f"socket activation: fd {fd} is not listening")
    except BaseException:
        sock.detach()
        raise
    return sock
