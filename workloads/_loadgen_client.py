"""The load generator's client process (:func:`workloads.run_loadgen`): one blocking
:class:`~loader.Client` and a read-only mapping of the daemon's memory file, replaying
its share of the trace.

It issues its faults as ``wait(offset, length)`` in order: open loop at the trace's
timestamps, or closed loop (the next wait as soon as the previous one returns).
Blocked on a wait it cannot issue its next fault, like a vCPU; how late each fault
was issued against its schedule is kept as ``late`` rather than folded into the wait
latency.

After each wait it checks the range's bytes in the memory file against the
checkpoint (``image``): the expected bytes are read from the checkpoint's pages file
into one reused buffer (holes are zero) and compared with one ``memcmp``
(``bytearray == memoryview``) per chunk of at most :data:`VERIFY_CHUNK` bytes, so no
per-page object is ever made.

It keeps two ``array('Q')`` columns (wait latency in ns, completion time in ns since
the common start) and sends them back once, at the end, with its counts; it
publishes its progress in a shared counter array as it goes.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import time
import traceback
from array import array
from typing import Any

from loader import Client, ClientError, ConnectionLost, mapped_memory
from loader.checkpoint import open_checkpoint

#: largest span compared at once; the per-worker buffer never grows past it
VERIFY_CHUNK = 1 << 20
#: how many error messages and mismatches each worker sends back in full
SAMPLES_KEPT = 8


class _Verifier:
    """Compares memory-file ranges with the checkpoint, through one reused buffer."""

    def __init__(self, image: str) -> None:
        ckpt = open_checkpoint(image)
        self.layout = ckpt.layout
        self.fd = ckpt.open_pages()
        self.buf = bytearray(self.layout.page_size)
        self.view = memoryview(self.buf)
        self.zeros = bytes(VERIFY_CHUNK)

    def close(self) -> None:
        self.view.release()
        os.close(self.fd)

    def _expected(self, lo: int, hi: int) -> bytearray:
        """The checkpoint's bytes [lo, hi) (hi - lo <= VERIFY_CHUNK), in the buffer.

        The buffer is kept at the size last asked for (faults mostly share one
        length), so that the comparison is ``bytearray == memoryview``: one memcmp.
        """
        n = hi - lo
        if len(self.buf) != n:
            self.view.release()
            self.buf = bytearray(n)
            self.view = memoryview(self.buf)
        view = self.view
        pos = lo
        layout = self.layout
        for a, b in layout.data_in(lo, hi):
            if a > pos:
                view[pos - lo : a - lo] = self.zeros[: a - pos]
            i = layout.find(a)
            file_off = layout.file_at(i) + (a - layout.mem_at(i))
            got = os.preadv(self.fd, [view[a - lo : b - lo]], file_off)
            if got != b - a:
                raise OSError(f"short read of the checkpoint at {file_off:#x}: {got} of {b - a} bytes")
            pos = b
        if pos < hi:
            view[pos - lo : n] = self.zeros[: hi - pos]
        return self.buf

    def check(self, memory: memoryview, offset: int, length: int) -> tuple[int, int, int] | None:
        """None if equal, else (memory offset, expected byte, actual byte) of the first
        difference."""
        lo, end = offset, offset + length
        while lo < end:
            hi = min(end, lo + VERIFY_CHUNK)
            expected = self._expected(lo, hi)
            actual = memory[lo:hi]
            if expected != actual:  # bytearray vs memoryview: one memcmp
                for k in range(hi - lo):
                    if expected[k] != actual[k]:
                        return lo + k, expected[k], actual[k]
            lo = hi
        return None


def client_main(
    index: int,
    cwd: str,
    socket_path: str,
    t_us: array[int],
    offset: array[int],
    length: array[int],
    closed_loop: bool,
    conn: multiprocessing.connection.Connection,
    done_counts: Any,
    loaded_map: bool = False,
) -> None:
    """One client: wait for the go (it carries the image path, or None: no checking),
    connect, map, report ready, wait for the start time, replay, send the results.

    Runs in the parent's working directory, so relative paths mean the same as there.
    The parent closing its end before the go means: stop quietly.
    """
    try:
        conn.send(("alive", None))  # started and imported: the parent may start the daemon now
        image = conn.recv()
    except (EOFError, BrokenPipeError):
        conn.close()
        return
    try:
        os.chdir(cwd)
        client = Client.connect(socket_path)
        if loaded_map:
            client.load_map()  # from now on a wait the map shows loaded sends nothing
    except (OSError, ClientError) as exc:
        conn.send(("error", f"client {index}: cannot connect to {socket_path}: {exc}"))
        conn.close()
        return
    verifier = None
    try:
        with client, mapped_memory(client) as memory:
            verifier = _Verifier(image) if image is not None else None
            conn.send(("ready", None))
            start_ns = conn.recv()
            result = _replay(
                index,
                client,
                memory,
                verifier,
                t_us,
                offset,
                length,
                closed_loop,
                start_ns,
                done_counts,
            )
        conn.send(("result", result))
    except BaseException as exc:  # the parent must hear about any failure, in one line
        detail = "".join(traceback.format_exception_only(exc)).strip()
        try:
            conn.send(("error", f"client {index}: {detail}"))
        except OSError:
            pass
    finally:
        if verifier is not None:
            verifier.close()
        conn.close()


def _replay(
    index: int,
    client: Client,
    memory: memoryview,
    verifier: _Verifier | None,
    t_us: array[int],
    offset: array[int],
    length: array[int],
    closed_loop: bool,
    start_ns: int,
    done_counts: Any,
) -> dict[str, Any]:
    clock = time.perf_counter_ns
    n = len(offset)
    latencies = array("Q", bytes(8 * n))
    completed = array("Q", bytes(8 * n))
    late = array("Q")
    errors = 0
    error_samples: list[str] = []
    mismatches: list[tuple[int, int, int, int, int]] = []
    mismatch_count = 0
    verify_ns = 0
    sleep_ns = 0
    issued = 0
    lost = False
    now = clock()
    if now < start_ns:
        time.sleep((start_ns - now) / 1e9)
    began = clock()
    for i in range(n):
        if not closed_loop:
            due = start_ns + t_us[i] * 1000
            now = clock()
            if now < due:
                time.sleep((due - now) / 1e9)
                after = clock()
                sleep_ns += after - now
                now = after
            late.append(now - due if now > due else 0)
        off = offset[i]
        ln = length[i]
        t0 = clock()
        try:
            client.wait(off, ln)
            failed = False
        except ClientError as exc:
            failed = True
            errors += 1
            if len(error_samples) < SAMPLES_KEPT:
                error_samples.append(f"client {index}: fault {i} at {off:#x}+{ln:#x}: {exc}")
            if isinstance(exc, ConnectionLost):
                lost = True
        except OSError as exc:
            failed = lost = True
            errors += 1
            if len(error_samples) < SAMPLES_KEPT:
                error_samples.append(f"client {index}: fault {i}: connection lost: {exc}")
        t1 = clock()
        latencies[i] = t1 - t0
        completed[i] = t1 - start_ns
        issued = i + 1
        done_counts[index] = issued
        if lost:
            break
        if verifier is not None and not failed:
            bad = verifier.check(memory, off, ln)
            if bad is not None:
                mismatch_count += 1
                if len(mismatches) < SAMPLES_KEPT:
                    mismatches.append((off, ln, *bad))
            verify_ns += clock() - t1
    ended = clock()
    del latencies[issued:]
    del completed[issued:]
    wait_ns = sum(latencies)
    return {
        "latencies": latencies,
        "completed": completed,
        "late": late,
        "errors": errors,
        "error_samples": error_samples,
        "not_issued": n - issued,
        "mismatches": mismatch_count,
        "mismatch_samples": mismatches,
        "overhead_ns": (ended - began) - wait_ns - sleep_ns,
        "verify_ns": verify_ns,
        "end_ns": ended,
        "map_hits": client.map_hits,
    }
