"""Start-up checks: everything the daemon can refuse before it opens anything.

Every start-up failure is one :class:`StartupError` whose ``str()`` is one line;
``pageload restore`` prints it as ``pageload: <line>`` and exits 2.  The checks
here look at the options and the file system only (lstat, fcntl, statvfs,
/proc/meminfo): nothing is created, truncated or bound.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from ._units import human

__all__ = [
    "SOCKET_PATH_MAX",
    "StartupError",
    "check_ready_fd",
    "check_socket_path",
    "check_uid",
    "describe_os_error",
    "host_memory",
    "identity",
    "memory_available",
    "space_free",
]

#: sun_path is 108 bytes on Linux, one of them the terminating NUL
SOCKET_PATH_MAX = 107


class StartupError(Exception):
    """The daemon cannot start.  ``str()`` is one line saying what and where.

    Raised by :func:`loader.run_daemon` for every problem found before READY (bad
    options, a socket path that cannot be used, an unusable memory file, ...);
    the command line prints it as one line and exits 2.  Raise it (or a subclass)
    from any start-up step that should end the same way.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def describe_os_error(exc: OSError, path: str | None = None) -> str:
    """``"<path>: <strerror>"``, one line, for an ``OSError`` from a start-up step."""
    where = path if path is not None else exc.filename
    what = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {what}" if where is not None else what


def identity(st: os.stat_result) -> tuple[int, int]:
    """(st_dev, st_ino): what makes two paths the same file."""
    return st.st_dev, st.st_ino


def check_socket_path(path: str) -> None:
    """Refuse a socket path that cannot work, before anything is opened.

    Too long for ``sun_path``; a parent that is missing or not a directory; an
    existing symbolic link, directory or any other non-socket at the path (never
    replaced).  An existing socket is left to the server (stale: removed; live:
    refused).
    """
    if not path:
        raise StartupError("the socket path is empty")
    size = len(os.fsencode(path))
    if size > SOCKET_PATH_MAX:
        raise StartupError(
            f"{path}: socket path is {size} bytes long; a Unix socket path has at most "
            f"{SOCKET_PATH_MAX} (use a shorter path, e.g. a relative one)"
        )
    parent = os.path.dirname(os.path.abspath(path))
    try:
        pst = os.stat(parent)
    except FileNotFoundError:
        raise StartupError(f"{path}: directory {parent} does not exist") from None
    except OSError as exc:
        raise StartupError(f"{path}: {describe_os_error(exc, parent)}") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise StartupError(f"{path}: {parent} is not a directory")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(describe_os_error(exc, path)) from None
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise StartupError(f"{path}: is a symbolic link, not a socket; refusing to replace it")
    if stat.S_ISDIR(mode):
        raise StartupError(f"{path}: is a directory, not a socket")
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path}: exists and is not a socket; refusing to replace it")


def check_ready_fd(fd: int) -> None:
    """The ready fd must be open, and open for writing."""
    if fd < 0:
        raise StartupError(f"ready fd {fd}: not a file descriptor number")
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise StartupError(f"ready fd {fd}: not an open file descriptor") from None
        raise StartupError(f"ready fd {fd}: {describe_os_error(exc, None)}") from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise StartupError(f"ready fd {fd}: open read-only; READY cannot be written to it")


def space_free(fd: int) -> tuple[int, int] | None:
    """(bytes free, file system size) for the file system holding ``fd``, or None
    where it cannot tell (a file system reporting no blocks: hugetlbfs without a
    size limit, procfs, ...).  Root may use the blocks reserved for root."""
    try:
        st = os.fstatvfs(fd)
    except OSError:
        return None
    if st.f_blocks == 0:
        return None
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize, st.f_blocks * st.f_frsize


def memory_available() -> int | None:
    """Bytes a memfd can still grow by, roughly: MemAvailable + SwapFree from
    /proc/meminfo, capped by this process's cgroup (v2) ``memory.max``.  None if
    neither can be read.

    A memfd lives on the kernel's internal shmem mount, which has no size limit
    of its own (the size of /dev/shm does not apply to it): only memory bounds it.
    """
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if parts and parts[0].isdigit():
                    fields[key] = int(parts[0]) * 1024
    except OSError:
        pass
    avail: int | None = None
    if "MemAvailable" in fields:
        avail = fields["MemAvailable"] + fields.get("SwapFree", 0)
    limit = _cgroup_memory_max()
    if limit is not None:
        avail = limit if avail is None else min(avail, limit)
    return avail


def host_memory() -> int | None:
    """The largest guest this host can hold: MemTotal + SwapTotal from /proc/meminfo
    (above it the kernel's default heuristic refuses a VMM's allocation of the guest's
    memory as an obvious overcommit), or None where there is no such bound: with
    ``vm.overcommit_memory=1`` (always overcommit), or when /proc/meminfo cannot be read."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            if f.read().strip() == "1":
                return None
    except OSError:
        pass
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if key in ("MemTotal", "SwapTotal") and parts and parts[0].isdigit():
                    total += int(parts[0]) * 1024
    except OSError:
        return None
    return total or None


#: uid_t is 32 bits, and (uid_t)-1 means "no change" to chown(2) and friends: never a user
UID_MAX = (1 << 32) - 2


def check_uid(uid: int, what: str = "uid") -> None:
    """Refuse (one line) a uid that no process can have."""
    if type(uid) is not int or not 0 <= uid <= UID_MAX:
        raise StartupError(f"{what} {uid!r}: not a user id (0 to {UID_MAX})")


def _cgroup_memory_max() -> int | None:
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            try:
                with open(os.path.join("/sys/fs/cgroup", line[3:].lstrip("/"), "memory.max")) as f:
                    text = f.read().strip()
            except OSError:
                return None
            return int(text) if text.isdigit() else None
    return None


def not_enough_space(path: str, needed: int, free: int, where: str) -> StartupError:
    return StartupError(
        f"{path}: not enough space for the memory file: the checkpoint has {human(needed)} of "
        f"data to load, {where} has {human(free)} free"
    )
