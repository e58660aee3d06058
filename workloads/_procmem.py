"""A real process's memory as a raw image: the readable mappings of ``/proc/PID/mem``
laid end to end (each at a page-aligned offset, in address order), for measuring
compression and deduplication on memory that is not synthetic.  Unreadable
mappings (``[vvar]``, guard pages) are skipped."""

from __future__ import annotations

import subprocess
import sys

__all__ = ["PYTHON_WORKLOAD", "process_memory_image", "python_process_image"]

#: a Python process that imported and used a few large libraries, then waits
PYTHON_WORKLOAD = """
import json, sys, numpy, msgpack, trio, zstandard, xxhash
a = numpy.arange(4_000_000, dtype=numpy.float64).reshape(2000, 2000)
b = numpy.linalg.inv(a @ a.T + numpy.eye(2000))
doc = [{"id": i, "name": f"user{i}", "tags": ["x", "y", str(i % 7)]} for i in range(200_000)]
blob = msgpack.packb(doc)
text = json.dumps(doc[:50_000])
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.read()
"""


def process_memory_image(pid: int, out: str, max_bytes: int = 1 << 30) -> int:
    """Write process ``pid``'s readable memory into the raw image ``out``; its size."""
    written = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem, \
            open(out, "wb") as f:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if "r" not in fields[1] or written >= max_bytes:
                continue
            n = min(hi - lo, max_bytes - written)
            try:
                mem.seek(lo)
                data = mem.read(n)
            except OSError:
                continue
            if data:
                f.write(data)
                f.write(bytes(-len(data) % 4096))
                written += len(data) + (-len(data) % 4096)
    return written


def python_process_image(out: str, max_bytes: int = 1 << 30) -> int:
    """:func:`process_memory_image` of a fresh :data:`PYTHON_WORKLOAD` process."""
    proc = subprocess.Popen([sys.executable, "-c", PYTHON_WORKLOAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        return process_memory_image(proc.pid, out, max_bytes)
    finally:
        proc.kill()
        proc.wait()
