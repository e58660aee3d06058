"""Can io_uring run here?  One clear line saying why not.

:func:`explain` is pure: it turns observed facts (an import error, the value of
``/proc/sys/kernel/io_uring_disabled``, the errno of ``io_uring_setup``, whether
``IORING_OP_READV`` is supported) into ``None`` or a one-line reason, so every
reason can be tested on a host where io_uring works.  :func:`probe` gathers those
facts on this host (creating and destroying a two-entry ring) and raises
:class:`~aio.BackendUnavailable` with that line.
"""

from __future__ import annotations

import errno
import os

from ._base import BackendUnavailable

DISABLED_PATH = "/proc/sys/kernel/io_uring_disabled"

_DISABLED_MEANING = {
    1: "only processes in the group kernel.io_uring_group or with CAP_SYS_ADMIN may create rings",
    2: "io_uring is switched off for every process",
}


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
            f"(pip install liburing): {type(import_error).__name__}: {import_error}"
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


def probe(disabled_path: str = DISABLED_PATH) -> None:
    """Return if io_uring can run readv here; else raise BackendUnavailable(why)."""
    try:
        import liburing
    except ImportError as exc:
        raise BackendUnavailable(explain(import_error=exc)) from exc
    disabled = read_disabled(disabled_path)
    ring = liburing.Ring()
    try:
        liburing.io_uring_queue_init(2, ring)
    except OSError as exc:
        why = explain(disabled=disabled, setup_errno=exc.errno or errno.EIO)
        raise BackendUnavailable(why) from exc
    try:
        ops = liburing.io_uring_get_probe_ring(ring)
        if ops is None:  # IORING_REGISTER_PROBE arrived in 5.6; without it assume readv (5.1)
            readv = True
        else:
            readv = liburing.io_uring_opcode_supported(
                ops, liburing.io_uring_op.IORING_OP_READV
            )
            liburing.io_uring_free_probe(ops)
    finally:
        liburing.io_uring_queue_exit(ring)
    why = explain(disabled=disabled, readv_supported=readv) or check_iovec_layout(liburing)
    if why is not None:
        raise BackendUnavailable(why)


def check_iovec_layout(liburing: object) -> str | None:
    """``None`` if liburing's ``Iovec`` object has the layout the uring backend patches.

    The package's ``Iovec(list)`` keeps every buffer it is given exported forever
    (so a memoryview slice of a mapping, and the mapping, can never be released),
    so the backend builds one ``Iovec`` per slot and rewrites its C array in place.
    This checks the object still looks as expected: a ``size_t`` count at offset 16
    and the ``struct iovec *`` at offset 24 after the object header.
    """
    import ctypes

    try:
        parts = [bytearray(3), bytearray(5)]
        iovec = liburing.Iovec(parts)  # type: ignore[attr-defined]
        count = ctypes.c_size_t.from_address(id(iovec) + 16).value
        array = ctypes.c_void_p.from_address(id(iovec) + 24).value
        ok = count == 2 and array is not None
        if ok and array is not None:
            first = (ctypes.c_size_t * 4).from_address(array)
            ok = first[1] == 3 and first[3] == 5 and first[0] == ctypes.addressof(
                ctypes.c_char.from_buffer(parts[0])
            )
    except Exception as exc:  # noqa: BLE001 - any surprise means "not the layout we know"
        return f"liburing's Iovec cannot be inspected: {type(exc).__name__}: {exc}"
    if not ok:
        version = getattr(liburing, "__version__", "?")
        return f"liburing {version}: Iovec object layout not recognised (expected count, pointer)"
    return None
