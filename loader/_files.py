"""Opening checkpoint files for reading without ever blocking on the open, and the
one-line error about such a file (:class:`CheckpointError`; below the checkpoint
package and the working-set code, which both open files this way).

A FIFO opened for reading blocks until a writer comes (forever, for a daemon at
start-up); a device may do anything when opened.  So a checkpoint file is looked
at with ``stat`` first, only a regular file is opened (``O_NONBLOCK``, so a file
swapped for a FIFO in between cannot block either), and ``fstat`` checks that
what was opened is the regular file that was looked at.  Symbolic links are
followed: these files are only ever read.  Block devices are refused too (a raw
image on one would need its size from an ioctl; not supported).
"""

from __future__ import annotations

import os
import stat

__all__ = ["CheckpointError", "describe_kind", "open_regular", "read_span", "stat_regular"]


class CheckpointError(Exception):
    """A checkpoint cannot be used.  ``str()`` is one line: ``"<path>: <what is wrong>"``.

    Raised for bad input (a malformed index, a missing or short pages file, an
    image whose size is not a whole number of pages) and for I/O errors on the
    checkpoint's files.  ``path`` is the file at fault, ``problem`` the rest.
    """

    def __init__(self, path: str, problem: str) -> None:
        problem = " ".join(problem.split())  # one line, whatever the cause said
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def describe_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a directory', ... for a non-regular file's mode."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _require_regular(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(path, f"is {describe_kind(st.st_mode)}, not a regular file")


def stat_regular(path: str) -> os.stat_result:
    """``os.stat(path)``, refusing anything but a regular file (one-line CheckpointError)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(path, exc.strerror or str(exc)) from None
    _require_regular(path, st)
    return st


def open_regular(path: str, extra_flags: int = 0) -> int:
    """Open the regular file at ``path`` read-only without blocking on the open.

    Returns a blocking, close-on-exec fd the caller owns.  Raises
    :class:`CheckpointError` (one line) for a missing or unreadable file, or one
    that is not a regular file.
    """
    before = stat_regular(path)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | extra_flags
    fd = os.open(path, flags)  # OSError left to the caller: it knows what the flags mean
    try:
        st = os.fstat(fd)
        _require_regular(path, st)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise CheckpointError(path, "was replaced while it was being opened")
        os.set_blocking(fd, True)  # io_uring would answer EAGAIN on an O_NONBLOCK file
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_span(fd: int, path: str, view: memoryview, offset: int) -> int:
    """Read into all of ``view`` from ``offset``; the bytes read (fewer at the end of the file)."""
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise CheckpointError(
                path, f"read error at offset {offset + done}: {exc.strerror or exc}"
            ) from None
        if n == 0:
            break
        done += n
    return done
