"""The floor of a Python page-fault handler on this machine, for the ``uffd`` section.

``python -m bench._uffd_floor SOCKET IMAGE [SPIN_US]`` is the least a handler
written in Python can do: it takes Firecracker's handshake on SOCKET (regions as
JSON, the userfaultfd in SCM_RIGHTS), maps IMAGE read-only, and answers each fault
with one ``UFFDIO_COPY`` of the faulting 4 KiB page straight from that mapping -- no
fill, no events, no statistics, no loader, about ten lines per fault (Firecracker's
"valid" example handler, in Python).  It sleeps in ``poll`` between faults, or with
SPIN_US > 0 keeps reading the userfaultfd for that long after each fault, as the
daemon's fault thread does (``--uffd-spin-us``).  It exits when the VMM closes the
socket.

The section runs it as rows of their own (``floor``, and ``floor (spinning)`` with
the daemon's spin) on the same touches as the daemon's handlers: their
touch-to-return p50 is what the interpreter, the kernel's wake-ups and the emulator
cost on this machine before any of the daemon's work, and the section reports
``fault p50 / floor p50`` next to the absolute goal.  It is a measuring stick, not a
handler to deploy: it has no checks at all.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import select
import socket
import sys
import time

from loader.uffd import _ioctl as _uffd

__all__ = ["main"]


def main(argv: list[str]) -> int:
    sock_path, image = argv[:2]
    spin_ns = int(argv[2]) * 1000 if len(argv) > 2 else 0
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    print("listening", flush=True)
    conn, _ = listener.accept()
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 4)
    uffd = fds[0]
    regions = [(r["base_host_virt_addr"], r["size"], r["offset"]) for r in json.loads(data)]
    with open(image, "rb") as f:
        source = mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    import ctypes

    src_base = ctypes.addressof(ctypes.c_char.from_buffer(source))
    base, size, offset = regions[0]
    end = base + size
    src = src_base + offset - base
    buf = bytearray(_uffd.MSG_SIZE * 16)
    arg = bytearray(_uffd.COPY_STRUCT.size)
    pack = _uffd.COPY_STRUCT.pack_into
    poller = select.poll()
    poller.register(uffd, select.POLLIN)
    poller.register(conn, select.POLLIN)
    copy = _uffd.UFFDIO_COPY
    mask = ~(mmap.PAGESIZE - 1)
    os.set_blocking(uffd, False)
    last = 0
    while True:
        if not spin_ns or time.perf_counter_ns() - last >= spin_ns:
            for fd, _ in poller.poll():
                if fd == conn.fileno():
                    return 0  # the VMM went away
        try:
            n = os.readv(uffd, [buf])
        except BlockingIOError:
            continue
        last = time.perf_counter_ns()
        for at in range(0, n, _uffd.MSG_SIZE):
            if buf[at] != _uffd.EVENT_PAGEFAULT:
                continue
            va = int.from_bytes(buf[at + 16:at + 24], "little") & mask
            if not base <= va < end:
                continue
            pack(arg, 0, va, src + va, mmap.PAGESIZE, 0, 0)
            try:
                fcntl.ioctl(uffd, copy, arg)
            except OSError:
                pass  # EEXIST: another vCPU's fault put it there


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
