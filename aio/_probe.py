"""Can io_uring run here?  One clear line saying why not.

:func:`explain` is pure: it turns observed facts (an import error, the value of
``/proc/sys/kernel/io_uring_disabled``, the errno of ``io_uring_setup``, whether
``IORING_OP_READV`` is supported) into ``None`` or a one-line reason, so every
reason can be tested on a host where io_uring works.  :func:`probe` gathers those
facts on this host: it creates a ring through ``liburing`` and reads eight bytes
through it.  That is native code which can kill its process (SIGILL where the
binary needs CPU features this machine lacks), so the registry runs
:func:`probe` only in a child process (:mod:`aio._isolated`), never in the daemon.

This module is loaded on its own in that child (not as part of the ``aio``
package, to keep the child from importing trio): it imports only the standard
library at its top level.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import time
from collections.abc import Callable
from typing import Any

DISABLED_PATH = "/proc/sys/kernel/io_uring_disabled"
#: the binding the uring backend is written for (its API: ``io_uring()``, ``iovec([...])``)
LIBURING_VERSION = "2024.5.3"
#: imports of liburing tried when its cache file is being rewritten (an OSError)
_IMPORT_TRIES = 4
#: ``__NR_io_uring_setup``: the same on every architecture Linux added it to after 5.1
_NR_IO_URING_SETUP = 425
#: ``sizeof(struct io_uring_params)``
_PARAMS_SIZE = 120

_DISABLED_MEANING = {
    1: "only processes in the group kernel.io_uring_group or with CAP_SYS_ADMIN may create rings",
    2: "io_uring is switched off for every process",
}

#: ``step(subject, activity)``: called before each native step; see :mod:`aio._isolated`
Step = Callable[[str, str], None]
_SUBJECT = "liburing's binary"


def _no_step(subject: str, activity: str) -> None:
    pass


def explain(
    *,
    import_error: BaseException | None = None,
    disabled: int | None = None,
    setup_errno: int | None = None,
    readv_supported: bool = True,
    kernel: str | None = None,
) -> str | None:
    """Return why io_uring cannot be used, in one line, or ``None`` if it can.

    ``disabled`` is the content of ``io_uring_disabled`` (``None``: the file is
    absent, kernels before 6.6); ``setup_errno`` the errno of a failed
    ``io_uring_setup`` (``None``: the ring was created); ``readv_supported`` what
    the ring's op probe says about ``IORING_OP_READV``.
    """
    release = kernel if kernel is not None else os.uname().release
    if import_error is not None:
        return (
            "the liburing Python package cannot be imported "
            f"(pip install liburing=={LIBURING_VERSION}): {type(import_error).__name__}: {import_error}"
        )
    if disabled == 2:
        return f"io_uring is disabled on this host: {DISABLED_PATH} = 2 ({_DISABLED_MEANING[2]})"
    if setup_errno is not None:
        if setup_errno == errno.ENOSYS:
            return (
                f"the kernel has no io_uring (io_uring_setup: ENOSYS); Linux 5.6 or later "
                f"built with CONFIG_IO_URING is needed, this is {release}"
            )
        if setup_errno == errno.EPERM and disabled == 1:
            return (
                f"io_uring is restricted on this host: {DISABLED_PATH} = 1 "
                f"({_DISABLED_MEANING[1]}) and this process is neither"
            )
        if setup_errno == errno.EPERM:
            return (
                "io_uring_setup is refused with EPERM: a seccomp filter or container runtime "
                "(Docker's default profile blocks io_uring) or a security module forbids it"
            )
        name = errno.errorcode.get(setup_errno, str(setup_errno))
        return f"io_uring_setup failed: {name} ({os.strerror(setup_errno)})"
    if not readv_supported:
        return f"this kernel's io_uring cannot read (IORING_OP_READV unsupported on {release})"
    return None


def read_disabled(path: str = DISABLED_PATH) -> int | None:
    """The value of ``io_uring_disabled``, or ``None`` where the file is absent/unreadable."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def setup_errno() -> int | None:
    """Create and close a two-entry ring with the raw ``io_uring_setup`` system call.

    Returns its errno, or ``None`` if it worked (or libc's ``syscall`` cannot be
    found).  Needs no binding, and its errno is the kernel's own (liburing 2024.5.3
    raises ``OSError`` with the C ``errno``, which its raw system calls never set, so
    the number it reports can be stale).
    """
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    params = (ctypes.c_uint8 * _PARAMS_SIZE)()
    fd = syscall(ctypes.c_long(_NR_IO_URING_SETUP), ctypes.c_uint(2), params)
    if fd < 0:
        return ctypes.get_errno() or errno.EIO
    os.close(fd)
    return None


def probe(step: Step = _no_step, *, disabled_path: str = DISABLED_PATH) -> str | None:
    """``None`` if the uring backend can run here, else one line saying why not.

    In order: ``io_uring_disabled`` = 2; ``import liburing`` and its API (the
    2024.5.3 one); the raw ``io_uring_setup``; then, through the binding (each
    announced with ``step``): a ring, its op probe (``IORING_OP_READV``), an eventfd
    registered with it and an 8-byte ``readv`` from a memfd that must return those
    bytes.  Run it in a child process (see the module docstring).
    """
    disabled = read_disabled(disabled_path)
    if disabled == 2:
        return explain(disabled=disabled)
    step(_SUBJECT, "being imported")
    liburing: Any = None
    for attempt in range(_IMPORT_TRIES):
        try:
            liburing = importlib.import_module("liburing")
            break
        except ImportError as exc:
            return explain(import_error=exc)
        except OSError as exc:
            # liburing's importer (dynamic_import) rewrites a cache file of its module
            # names when it sees fit; a process importing it at that moment (tests run
            # several probes at once) finds the file gone: try again, then say so
            if attempt == _IMPORT_TRIES - 1:
                return f"liburing could not be imported ({_IMPORT_TRIES} tries): {exc}"
            time.sleep(0.05 * (attempt + 1))
    version = getattr(liburing, "__version__", "?")
    missing = [name for name in ("io_uring", "iovec", "io_uring_prep_readv", "io_uring_peek_cqe")
               if not hasattr(liburing, name)]
    if missing:
        return (f"liburing {version} has another API (no {', '.join(missing)}); the uring backend is "
                f"written for liburing {LIBURING_VERSION}: pip install liburing=={LIBURING_VERSION}")
    why = explain(disabled=disabled, setup_errno=setup_errno())
    if why is not None:
        return why
    step(_SUBJECT, "creating a ring")
    ring = liburing.io_uring()
    try:
        liburing.io_uring_queue_init(2, ring)
    except OSError as exc:  # the raw setup worked a moment ago: say what the binding said
        return f"liburing {version} cannot create a ring although io_uring_setup works: {exc}"
    try:
        step(_SUBJECT, "probing the ring's operations")
        readv = _readv_supported(liburing, ring)
        why = explain(disabled=disabled, readv_supported=readv)
        if why is None:
            step(_SUBJECT, "reading through a ring")
            why = _test_read(liburing, ring, version)
    finally:
        liburing.io_uring_queue_exit(ring)
    return why


def _readv_supported(lu: Any, ring: Any) -> bool:
    ops = lu.io_uring_get_probe_ring(ring)
    if ops.last_op is None:  # no IORING_REGISTER_PROBE (before 5.6): readv exists since 5.1
        return True
    try:
        return bool(lu.io_uring_opcode_supported(ops, lu.io_uring_op.IORING_OP_READV))
    finally:
        lu.io_uring_free_probe(ops)


def _test_read(lu: Any, ring: Any, version: str) -> str | None:
    """Read 8 bytes from a memfd through ``ring`` with an eventfd registered, as the backend does."""
    expected = b"pageload"
    memfd = os.memfd_create("aio-probe", os.MFD_CLOEXEC)
    eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        os.write(memfd, expected)
        lu.io_uring_register_eventfd(ring, eventfd)
        buf = bytearray(len(expected))
        iov = lu.iovec([memoryview(buf)])
        sqe = lu.io_uring_get_sqe(ring)
        lu.io_uring_prep_readv(sqe, memfd, iov, 0)
        lu.io_uring_sqe_set_data64(sqe, 7)
        lu.io_uring_submit(ring)
        cqe = lu.io_uring_cqe()
        lu.io_uring_wait_cqe(ring, cqe)
        user_data, result = cqe.user_data, cqe.res
        lu.io_uring_cq_advance(ring, 1)
        lu.io_uring_unregister_eventfd(ring)
        signalled = os.eventfd_read(eventfd)
    except OSError as exc:
        return f"a test read through liburing {version} failed: {exc}"
    finally:
        os.close(memfd)
        os.close(eventfd)
    if (user_data, result, bytes(buf)) != (7, len(expected), expected) or not signalled:
        return (f"a test read through liburing {version} went wrong: user_data {user_data}, "
                f"result {result}, data {bytes(buf)!r}, eventfd count {signalled}")
    return None
