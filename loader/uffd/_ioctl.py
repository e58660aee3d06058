"""userfaultfd(2) from Python: constants, struct layouts, ioctls, events (x86-64 Linux).

The only module that knows the kernel's ABI.  Every struct is packed with
:mod:`struct` into a buffer made once per caller (no allocation per ioctl on hot
paths: :class:`Uffd` keeps one buffer per ioctl).  Sizes and offsets are checked
against ``<linux/userfaultfd.h>`` by ``tests/test_uffd_abi.py`` (a small C program).

The ioctls go through :func:`fcntl.ioctl`, which releases the GIL around the call
and copies a mutable buffer back even when the call fails, so the ``copy`` /
``zeropage`` / ``mapped`` result fields are readable after EAGAIN or EEXIST.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import os
import struct
from typing import NamedTuple

# --- ioctl numbers: _IOC(dir, 0xAA, nr, size) ---------------------------------------
_IOC_WRITE = 1
_IOC_READ = 2
UFFDIO = 0xAA


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (UFFDIO << 8) | nr


UFFD_API = 0xAA

# struct layouts (format, size): all little-endian u64 fields unless noted
API_STRUCT = struct.Struct("=QQQ")  # uffdio_api {api, features, ioctls}
RANGE_STRUCT = struct.Struct("=QQ")  # uffdio_range {start, len}
REGISTER_STRUCT = struct.Struct("=QQQQ")  # uffdio_register {range, mode, ioctls}
COPY_STRUCT = struct.Struct("=QQQQq")  # uffdio_copy {dst, src, len, mode, s64 copy}
ZEROPAGE_STRUCT = struct.Struct("=QQQq")  # uffdio_zeropage {range, mode, s64 zeropage}
CONTINUE_STRUCT = struct.Struct("=QQQq")  # uffdio_continue {range, mode, s64 mapped}
POISON_STRUCT = struct.Struct("=QQQq")  # uffdio_poison {range, mode, s64 updated}
MSG_STRUCT = struct.Struct("=BBHIQQQ")  # uffd_msg {u8 event, u8, u16, u32, union arg (3 x u64)}
MSG_SIZE = MSG_STRUCT.size  # 32

UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, 0x3F, API_STRUCT.size)
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, 0x00, REGISTER_STRUCT.size)
UFFDIO_UNREGISTER = _ioc(_IOC_READ, 0x01, RANGE_STRUCT.size)
UFFDIO_WAKE = _ioc(_IOC_READ, 0x02, RANGE_STRUCT.size)
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, 0x03, COPY_STRUCT.size)
UFFDIO_ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, 0x04, ZEROPAGE_STRUCT.size)
UFFDIO_CONTINUE = _ioc(_IOC_READ | _IOC_WRITE, 0x07, CONTINUE_STRUCT.size)
UFFDIO_POISON = _ioc(_IOC_READ | _IOC_WRITE, 0x08, POISON_STRUCT.size)

# events (uffd_msg.event)
EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16

# pagefault flags
PAGEFAULT_FLAG_WRITE = 1 << 0
PAGEFAULT_FLAG_WP = 1 << 1
PAGEFAULT_FLAG_MINOR = 1 << 2

# features (uffdio_api.features)
FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
FEATURE_EVENT_FORK = 1 << 1
FEATURE_EVENT_REMAP = 1 << 2
FEATURE_EVENT_REMOVE = 1 << 3
FEATURE_MISSING_HUGETLBFS = 1 << 4
FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_EVENT_UNMAP = 1 << 6
FEATURE_SIGBUS = 1 << 7
FEATURE_THREAD_ID = 1 << 8
FEATURE_MINOR_HUGETLBFS = 1 << 9
FEATURE_MINOR_SHMEM = 1 << 10
FEATURE_EXACT_ADDRESS = 1 << 11
FEATURE_POISON = 1 << 14

# register modes
REGISTER_MODE_MISSING = 1 << 0
REGISTER_MODE_WP = 1 << 1
REGISTER_MODE_MINOR = 1 << 2

COPY_MODE_DONTWAKE = 1 << 0
ZEROPAGE_MODE_DONTWAKE = 1 << 0

_NR_USERFAULTFD = 323  # x86-64
UFFD_USER_MODE_ONLY = 1


class UffdMessage(NamedTuple):
    event: int
    a: int  #: pagefault: flags; remap: from; remove/unmap: start
    b: int  #: pagefault: address; remap: to; remove/unmap: end
    c: int  #: pagefault: thread id (low 32 bits, with FEATURE_THREAD_ID); remap: len


_libc = ctypes.CDLL(None, use_errno=True)


def userfaultfd(flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> int:
    """A new userfaultfd (root, or vm.unprivileged_userfaultfd=1, or user-mode-only)."""
    fd = int(_libc.syscall(_NR_USERFAULTFD, ctypes.c_int(flags)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    return fd


def api(fd: int, features: int = 0) -> tuple[int, int]:
    """UFFDIO_API handshake; returns (features granted, ioctls bitmask)."""
    buf = bytearray(API_STRUCT.pack(UFFD_API, features, 0))
    fcntl.ioctl(fd, UFFDIO_API, buf)
    _, got, ioctls = API_STRUCT.unpack(buf)
    return got, ioctls


def register(fd: int, start: int, length: int, mode: int = REGISTER_MODE_MISSING) -> int:
    """UFFDIO_REGISTER ``[start, start+length)``; returns the ioctls bitmask allowed on it."""
    buf = bytearray(REGISTER_STRUCT.pack(start, length, mode, 0))
    fcntl.ioctl(fd, UFFDIO_REGISTER, buf)
    return int(REGISTER_STRUCT.unpack(buf)[3])


#: what each feature :func:`unavailable` can be asked for needs, for its reason line
_NEEDS = {FEATURE_MINOR_SHMEM: ("UFFD_FEATURE_MINOR_SHMEM", "Linux 5.13+"),
          FEATURE_POISON: ("UFFD_FEATURE_POISON", "Linux 6.6+")}


def unavailable(features: int = 0) -> str | None:
    """Why this process cannot use userfaultfd with ``features`` (a mask of
    ``FEATURE_MINOR_SHMEM`` and ``FEATURE_POISON``), as one line; None when it can."""
    path = "/proc/sys/vm/unprivileged_userfaultfd"
    if not os.path.exists(path):
        return f"{path} is missing: no userfaultfd in this kernel"
    if os.geteuid() != 0:
        with open(path) as f:
            if f.read().strip() != "1":
                return "userfaultfd needs root or vm.unprivileged_userfaultfd=1"
    if not features:
        return None
    try:
        fd = userfaultfd()
    except OSError as exc:
        return exc.strerror or str(exc)  # "userfaultfd: ..."
    try:
        granted, _ = api(fd, 0)
    except OSError as exc:
        return f"UFFDIO_API: {exc.strerror or exc}"
    finally:
        os.close(fd)
    for bit, (name, kernel) in _NEEDS.items():
        if features & bit and not granted & bit:
            return f"the kernel lacks {name} (needs {kernel})"
    return None


def close_forked(arg: int) -> int:
    """A ``UFFD_EVENT_FORK`` message's new userfaultfd (``arg.fork.ufd``, the low 32
    bits of the message's first argument word), which reading the message put into
    this process: closed at once (the child's copy of the mapping is then not served,
    and no descriptor is left behind per fork).  Returns the descriptor number."""
    fd = arg & 0xFFFFFFFF
    try:
        os.close(fd)
    except OSError:
        pass
    return fd


def is_userfaultfd(fd: int) -> bool:
    """True when ``fd`` is a userfaultfd (its /proc link names the anon inode)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False


class UffdError(OSError):
    """An ioctl failed; ``done`` bytes were handled before it did."""

    def __init__(self, err: int, what: str, done: int) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.done = done


class Uffd:
    """A userfaultfd we were handed (or made): the ioctls a handler needs, each with
    its own preallocated argument buffer.  Not thread-safe (one thread uses it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._copy = bytearray(COPY_STRUCT.size)
        self._zero = bytearray(ZEROPAGE_STRUCT.size)
        self._cont = bytearray(CONTINUE_STRUCT.size)
        self._poison = bytearray(POISON_STRUCT.size)
        self._range = bytearray(RANGE_STRUCT.size)
        self.capacity = 64  #: messages one :meth:`read_messages` can return
        self._msgs = bytearray(MSG_SIZE * self.capacity)

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        """UFFDIO_COPY; returns bytes copied.  Raises :class:`UffdError` (EEXIST: a
        page is already there; EAGAIN: the mapping is changing; ENOENT/ESRCH: gone)
        with ``done`` the bytes copied before the failure."""
        buf = self._copy
        COPY_STRUCT.pack_into(buf, 0, dst, src, length, mode, 0)
        try:
            fcntl.ioctl(self.fd, UFFDIO_COPY, buf)
        except OSError as exc:
            done = COPY_STRUCT.unpack_from(buf)[4]
            raise UffdError(exc.errno or errno_mod.EIO, "UFFDIO_COPY", max(done, 0)) from None
        return int(COPY_STRUCT.unpack_from(buf)[4])

    def zeropage(self, dst: int, length: int, mode: int = 0) -> int:
        return self._range_ioctl(self._zero, ZEROPAGE_STRUCT, UFFDIO_ZEROPAGE, "UFFDIO_ZEROPAGE", dst, length, mode)

    def continue_(self, dst: int, length: int, mode: int = 0) -> int:
        return self._range_ioctl(self._cont, CONTINUE_STRUCT, UFFDIO_CONTINUE, "UFFDIO_CONTINUE", dst, length, mode)

    def _range_ioctl(self, buf: bytearray, layout: struct.Struct, request: int, name: str, *fields: int) -> int:
        """An ioctl on ``{range, mode, result}``: bytes done, or UffdError with what got done."""
        layout.pack_into(buf, 0, *fields, 0)
        try:
            fcntl.ioctl(self.fd, request, buf)
        except OSError as exc:
            done = layout.unpack_from(buf)[-1]
            raise UffdError(exc.errno or errno_mod.EIO, name, max(done, 0)) from None
        return int(layout.unpack_from(buf)[-1])

    def poison(self, dst: int, length: int) -> int:
        """UFFDIO_POISON: accesses to the range raise SIGBUS (needs FEATURE_POISON)."""
        return self._range_ioctl(self._poison, POISON_STRUCT, UFFDIO_POISON, "UFFDIO_POISON", dst, length, 0)

    def wake(self, start: int, length: int) -> None:
        RANGE_STRUCT.pack_into(self._range, 0, start, length)
        fcntl.ioctl(self.fd, UFFDIO_WAKE, self._range)

    def read_messages(self) -> list[UffdMessage]:
        """Every message ready now (the fd is O_NONBLOCK); [] when none."""
        try:
            n = os.readv(self.fd, [self._msgs])
        except BlockingIOError:
            return []
        out = []
        for off in range(0, n - n % MSG_SIZE, MSG_SIZE):
            event, _, _, _, a, b, c = MSG_STRUCT.unpack_from(self._msgs, off)
            out.append(UffdMessage(event, a, b, c))
        return out
