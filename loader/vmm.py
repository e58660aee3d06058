"""Zero-copy guest memory for VMM authors: map the daemon's memory file and let the
daemon serve its page faults (docs/UFFD.md, "Zero-copy mode").

The memory file the daemon loads into becomes guest memory itself: nothing is
copied into the VMM.  :meth:`ZeroCopyMemory.open`

1. connects to the daemon's wait socket and asks for a writable descriptor of the
   memory file (the daemon must run with ``--allow-writable-memory-fd``);
2. maps ``[offset, offset+size)`` of it ``MAP_SHARED``, read-write;
3. creates a userfaultfd with ``UFFD_FEATURE_MINOR_SHMEM`` and registers the mapping
   in MISSING and MINOR mode;
4. hands the userfaultfd to the daemon (``uffd-register``, SCM_RIGHTS).

From then on a touch of a page not loaded yet blocks until the daemon has loaded it;
pages are mapped in as they load.  Give the guest ``memory.address`` (and
``memory.size``) as its RAM.

    from loader.vmm import ZeroCopyMemory

    with ZeroCopyMemory.open("/run/pageload.sock") as memory:
        start_vcpus(memory.address, memory.size)   # the guest runs on the mapping
        ...
    # leaving the block unmaps the memory and closes the connection

Keep the object (and so the connection and its userfaultfd) for as long as the guest
runs: the registration ends when the connection closes.  Touching the mapping from a
Python thread that holds the GIL while the daemon runs in the same process would
deadlock; a VMM touches guest memory from vCPU threads or with the GIL released
(``ctypes.memmove``).
"""

from __future__ import annotations

import ctypes
import errno as errnos
import mmap
import os
import socket
from array import array
from typing import Any

import protocol

from .socket._client import Client
from .uffd import _ioctl as _uffd

__all__ = ["ZeroCopyMemory", "ZeroCopyUnsupported"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_CONTINUE_IOCTL_BIT = 1 << 7  # _UFFDIO_CONTINUE in the register answer's ioctls


class ZeroCopyUnsupported(OSError):
    """This kernel cannot do zero-copy mode (no MINOR faults on shmem, or no
    ``UFFDIO_CONTINUE``)."""


class ZeroCopyMemory:
    """Guest memory mapped from the daemon's memory file, its faults served by the
    daemon (see the module doc).  Use :meth:`open`; close with :meth:`close` or a
    ``with`` block."""

    def __init__(self, client: Client, address: int, size: int, offset: int, uffd: int, memfd: int) -> None:
        self.client = client  #: the connection; the daemon serves the faults while it is open
        self.address = address  #: where guest memory is mapped in this process
        self.size = size
        self.offset = offset  #: where the mapping starts in the daemon's memory
        self.uffd = uffd  #: this process's descriptor of the userfaultfd (kept open: see close())
        self.memfd = memfd
        self.features = 0  #: what UFFDIO_API granted

    @classmethod
    def open(cls, socket_path: str, *, offset: int = 0, size: int | None = None,
             timeout: float | None = 30.0, features: int = 0) -> ZeroCopyMemory:
        """Connect to the daemon at ``socket_path`` and map memory ``[offset, offset+size)``
        (all of it by default), its faults served by the daemon.  ``features``: more
        ``UFFD_FEATURE_*`` bits to ask ``UFFDIO_API`` for (``UFFD_FEATURE_MINOR_SHMEM`` is
        always asked for).

        Raises :class:`loader.ClientError` when the daemon refuses (``forbidden``: it
        runs without ``--allow-writable-memory-fd``), :class:`ZeroCopyUnsupported`
        when the kernel lacks MINOR faults on shmem, ``OSError`` otherwise."""
        client = Client.connect(socket_path, timeout)
        memfd = uffd = -1
        address = 0
        length = 0
        try:
            page = max(client.page_size, mmap.PAGESIZE)
            if size is None:
                size = ((client.memory_size + page - 1) & ~(page - 1)) - offset
            length = size
            memfd = client.memory_fd(writable=True)
            address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, memfd, offset)
            if address in (None, _MAP_FAILED):
                err = ctypes.get_errno()
                address = 0
                raise OSError(err, f"mmap of {size} bytes of the memory file: {os.strerror(err)}")
            uffd = _uffd.userfaultfd()
            try:
                features, _ = _uffd.api(uffd, _uffd.FEATURE_MINOR_SHMEM | features)
            except OSError as exc:
                raise ZeroCopyUnsupported(exc.errno or errnos.EINVAL,
                                          "UFFDIO_API refused UFFD_FEATURE_MINOR_SHMEM") from None
            if not features & _uffd.FEATURE_MINOR_SHMEM:
                raise ZeroCopyUnsupported(errnos.EOPNOTSUPP, "this kernel has no MINOR faults on shmem")
            ioctls = _uffd.register(uffd, address, size, _uffd.REGISTER_MODE_MISSING | _uffd.REGISTER_MODE_MINOR)
            if not ioctls & _CONTINUE_IOCTL_BIT:
                raise ZeroCopyUnsupported(errnos.EOPNOTSUPP, "UFFDIO_CONTINUE is not allowed on the mapping")
            memory = cls(client, address, size, offset, uffd, memfd)
            memory.features = features
            memory._register()
            return memory
        except BaseException:
            if address:
                _libc.munmap(address, length)
            for fd in (uffd, memfd):
                if fd >= 0:
                    os.close(fd)
            client.close()
            raise

    def _register(self) -> None:
        client = self.client
        event = protocol.RegisterUffd(next(client._ids), self.address, self.size, self.offset)
        data = client.conn.send(event)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [self.uffd]))]
        sent = client.sock.sendmsg([data], rights)
        if sent < len(data):
            client.sock.sendall(data[sent:])
        client._check(client.reply(event.id))

    def stats(self) -> dict[str, Any]:
        """The daemon's statistics (``uffd_minor`` has this mapping's fault counts)."""
        return self.client.stats()

    def close(self) -> None:
        """Unmap guest memory, then close the userfaultfd and the connection; idempotent.

        The order matters: while the mapping exists this process keeps a descriptor of
        the userfaultfd, so that a fault can never be resolved by the kernel alone
        (that would put a zero page into the daemon's memory file)."""
        if self.address:
            _libc.munmap(self.address, self.size)
            self.address = 0
        for name in ("uffd", "memfd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self.client.close()

    def __enter__(self) -> ZeroCopyMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
