"""A fuzzer for the working-set file reader (docs/FORMAT.md §3): seeded valid files,
mutated and hostile ones, through everything that reads one.

``fuzz_working_set_file(rng)`` makes one file's bytes: a valid working set (random
page-aligned ranges in first-touch order), then for most files one mutation: a byte
flipped, the file cut, bytes inserted, a field replaced by a random value of any type,
columns that disagree with the range count, ranges that overlap, are unaligned, run
past 2**64 or go back in time, a count in the billions, deep nesting, a bin header
claiming 4 GiB, tens of thousands of empty arrays (a byte in the file, 64 in memory
each if built), trailing bytes, raw random bytes.  Files are written with msgpack
directly, not with ``encode_working_set``.

``run_working_set_fuzz`` reads ``files`` of them in process through each consumer of
a working set: ``decode_working_set`` (must return a set or raise ``ValueError``),
``read_working_set`` from a file (only ``WorkingSetError``), and for the accepted ones
``clip_working_set``, ``merge_working_sets``, ``replay_order`` against a layout and
``format_working_set`` (no exception at all).  Anything else is a finding, and so is a
decode whose memory peak (tracemalloc, files of 16 KiB and more) is above the
``DECODE_BYTES_PER_FILE_BYTE`` that ``read_working_set``'s memory check assumes.  With
``commands`` it also runs that many of the files through the real commands
(``working-set show``, ``working-set merge``, ``restore --working-set`` with a
checkpoint): exit 0 (or READY) or one line and exit 2, never a traceback or a hang.

    python -m workloads.wsfuzz [--files N] [--commands N] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack

from loader import Layout
from loader.core._replay import merge_working_sets, replay_order
from loader.core._workingset import (
    DECODE_BYTES_PER_FILE_BYTE,
    FORMAT,
    VERSION,
    WorkingSetError,
    clip_working_set,
    decode_working_set,
    format_working_set,
    read_working_set,
)

from ._fuzz import _pack, _random_value

PAGE = 4096
#: the memory size of the valid files (and the layout replay_order is tried against)
MEMORY_SIZE = 64 << 20
FIELDS = ("format", "version", "checkpoint", "recordings", "window_s", "ranges", "offset", "length",
          "first_touch_us")


def _u64s(values: list[int]) -> bytes:
    return b"".join((v % (1 << 64)).to_bytes(8, "little") for v in values)


def _valid_fields(rng: random.Random, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """A valid working set as its msgpack map (columns as little-endian bytes), of
    ``identity`` (a checkpoint's, as ``CheckpointIdentity.as_dict``) or a random one."""
    pages = MEMORY_SIZE // PAGE
    count = rng.choice([0, 1, 2, rng.randrange(1, 64), rng.randrange(64, 2000)])
    starts = sorted(rng.sample(range(pages), min(count, pages)))
    offs, lens = [], []
    for i, p in enumerate(starts):  # non-overlapping: each ends before the next starts
        room = (starts[i + 1] if i + 1 < len(starts) else pages) - p
        offs.append(p * PAGE)
        lens.append(rng.randrange(1, min(room, 16) + 1) * PAGE)
    order = list(range(len(offs)))
    rng.shuffle(order)  # first-touch order is not memory order
    times = sorted(rng.randrange(10**7) for _ in order)
    return {
        "format": FORMAT, "version": VERSION,
        "checkpoint": dict(identity) if identity is not None else {
            "kind": rng.choice(["raw", "pages"]), "memory_size": MEMORY_SIZE, "page_size": PAGE,
            "digest": rng.getrandbits(64)},
        "recordings": rng.randrange(1, 5), "window_s": rng.random() * 20, "ranges": len(order),
        "offset": _u64s([offs[i] for i in order]), "length": _u64s([lens[i] for i in order]),
        "first_touch_us": _u64s(times),
    }


def _column_values(blob: bytes) -> list[int]:
    return [int.from_bytes(blob[i : i + 8], "little") for i in range(0, len(blob) - 7, 8)]


def _hostile_fields(rng: random.Random, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with one thing wrong inside an otherwise well-formed map."""
    how = rng.randrange(9)
    n = fields["ranges"]
    if how == 0:  # any field, any value
        fields[rng.choice(FIELDS)] = _random_value(rng)
    elif how == 1:  # a field of the identity
        fields["checkpoint"][rng.choice(["kind", "memory_size", "page_size", "digest"])] = rng.choice(
            [_random_value(rng), 0, 3, 2**64 - 1, -1, 2**63, PAGE * 3])
    elif how == 2:  # the count disagrees with the columns
        fields["ranges"] = rng.choice([n + 1, max(0, n - 1), 2**32, 2**63, 2**64 - 1])
    elif how == 3 and n:  # a column one entry short or long
        name = rng.choice(["offset", "length", "first_touch_us"])
        fields[name] = fields[name][:-8] if rng.random() < 0.5 else fields[name] + bytes(8)
    elif how == 4 and n:  # a range bent: unaligned, empty, past 2**64, overlapping, back in time
        i = rng.randrange(n)
        offs, lens, times = (_column_values(fields[k]) for k in ("offset", "length", "first_touch_us"))
        what = rng.randrange(5)
        if what == 0:
            offs[i] += rng.randrange(1, PAGE)
        elif what == 1:
            lens[i] = 0
        elif what == 2:
            offs[i], lens[i] = 2**64 - PAGE, 2 * PAGE
        elif what == 3 and n > 1:
            j = (i + 1) % n
            offs[j] = offs[i]
        else:
            times[i] = (times[i - 1] - 1) if i else 2**64 - 1
            if i == 0 and n > 1:
                times[1] = 0
        fields["offset"], fields["length"], fields["first_touch_us"] = _u64s(offs), _u64s(lens), _u64s(times)
    elif how == 5:  # ranges past the memory size (clipped by restore, refused by nobody else)
        fields["checkpoint"]["memory_size"] = rng.choice([PAGE, MEMORY_SIZE // 2])
    elif how == 6:
        fields["window_s"] = rng.choice([float("nan"), float("inf"), -1.0, 1e300, True, "10"])
    elif how == 7:
        del fields[rng.choice(FIELDS)]
    else:
        fields["extra"] = _random_value(rng)
    return fields


def fuzz_working_set_file(rng: random.Random, identity: dict[str, Any] | None = None) -> bytes:
    """One file's bytes: valid (about one in six), hostile inside a good map, or broken;
    for ``identity``'s checkpoint (see :func:`_valid_fields`)."""
    fields = _valid_fields(rng, identity)
    roll = rng.random()
    if roll < 0.17:
        return _pack(fields)
    if roll < 0.6:
        return _pack(_hostile_fields(rng, fields))
    data = bytearray(_pack(fields))
    how = rng.randrange(8)
    if how == 0:
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == 1:
        del data[rng.randrange(1, len(data)) :]
    elif how == 2:
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randrange(1, 9))
    elif how == 3:
        data += rng.choice([b"\x00", b"\xc0", bytes(data[:20])])  # trailing bytes
    elif how == 4:  # deep nesting where the map should be, or inside it
        depth = rng.choice([10, 100, 1000, 100_000])
        data = bytearray(b"\x91" * depth + b"\x00") if rng.random() < 0.5 else bytearray(
            b"\x82\xa6format" + msgpack.packb(FORMAT) + b"\xa5extra" + b"\x91" * depth + b"\x00")
    elif how == 5 and rng.random() < 0.5:  # wide: tens of thousands of empty arrays and maps, a byte each
        width = rng.randrange(20_000, 60_000)
        data = bytearray(b"\x82\xa6format" + msgpack.packb(FORMAT) + b"\xa5extra\xdd" + width.to_bytes(4, "big")
                         + (rng.choice([b"\x90", b"\x80", b"\x90\x80"]) * width)[:width])
    elif how == 5:  # a bin32 header claiming 4 GiB for a column
        data = bytearray(b"\x81\xa6offset\xc6\xff\xff\xff\xff" + bytes(16))
    elif how == 6:
        data = bytearray(rng.randbytes(rng.randrange(0, 200)))
    else:
        data = bytearray(msgpack.packb(_random_value(rng), use_bin_type=True))
    return bytes(data)


@dataclass
class WsFuzzReport:
    files: int = 0
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)  #: by the reason's first words
    findings: list[str] = field(default_factory=list)  #: anything but a one-line refusal
    commands: int = 0
    command_exits: Counter[int] = field(default_factory=Counter)
    peak_bytes_per_file_byte: float = 0.0  #: the worst decode peak (tracemalloc) over the file's size
    elapsed_s: float = 0.0

    def summary(self) -> str:
        top = ", ".join(f"{k} {v}" for k, v in self.refused.most_common(6))
        return (f"working-set fuzz: {self.files} files in {self.elapsed_s:.1f} s: {self.accepted} accepted, "
                f"{sum(self.refused.values())} refused ({top}); {self.commands} command runs (exits "
                f"{dict(sorted(self.command_exits.items()))}); worst decode peak "
                f"{self.peak_bytes_per_file_byte:.1f} bytes per file byte; findings {len(self.findings)}")


def _reason(message: str) -> str:
    text = message.split(": ", 1)[-1] if message.startswith("/") else message
    return " ".join(text.split()[:3])


def _consume(data: bytes, path: str, layout: Layout, report: WsFuzzReport) -> None:
    """One file through every in-process consumer; findings recorded in ``report``."""
    try:
        ws = decode_working_set(data)
    except ValueError as exc:
        if "\n" in str(exc) or len(str(exc)) > 300:
            report.findings.append(f"decode: a refusal of {len(str(exc))} chars over lines: {str(exc)[:80]!r}")
        ws = None
        report.refused[_reason(str(exc))] += 1
    except Exception as exc:  # noqa: BLE001 - that is what the fuzzer looks for
        report.findings.append(f"decode: {type(exc).__name__}: {exc}"[:200])
        return
    with open(path, "wb") as f:
        f.write(data)
    try:
        from_file = read_working_set(path)
    except WorkingSetError as exc:
        if ws is not None:
            report.findings.append(f"read_working_set refused what decode accepted: {exc}")
        return
    except Exception as exc:  # noqa: BLE001
        report.findings.append(f"read_working_set: {type(exc).__name__}: {exc}"[:200])
        return
    if ws is None:
        report.findings.append("read_working_set accepted what decode refused")
        return
    report.accepted += 1
    try:
        clipped, _ = clip_working_set(from_file, layout.memory_size)
        merge_working_sets([from_file, from_file], ["a", "b"])
        replay_order(clipped, layout, chunk_size=1 << 20)
        format_working_set(from_file, path, 5)
    except WorkingSetError:
        pass
    except Exception as exc:  # noqa: BLE001
        report.findings.append(f"an accepted working set broke a consumer: {type(exc).__name__}: {exc}"[:200])


def _command(argv: list[str], report: WsFuzzReport, ready_ok: bool = False) -> None:
    """Run ``pageload ARGV``: exit 0, or one line ``pageload: ...`` and exit 2; with
    ``ready_ok`` a daemon that printed READY is stopped and counts as 0."""
    report.commands += 1
    proc = subprocess.Popen([sys.executable, "-m", "cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        if ready_ok:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            if first.startswith("READY"):
                proc.terminate()
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        report.findings.append(f"pageload {' '.join(argv[:2])}: hung (60 s)")
        return
    code = proc.returncode
    if ready_ok and code == 0 - 15:
        code = 0
    report.command_exits[code] += 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code not in (0, 2) or "Traceback" in err or (code == 2 and (len(lines) != 1
                                                                    or not lines[0].startswith("pageload"))):
        report.findings.append(f"pageload {' '.join(argv[:2])}: exit {code}: {err.strip()[-200:]!r}")


def run_working_set_fuzz(files: int, *, seed: int = 0, commands: int = 0,
                         checkpoint: str | None = None) -> WsFuzzReport:
    """``files`` fuzzed files through the in-process consumers, ``commands`` of them
    through the real commands too (``restore --working-set`` needs ``checkpoint``)."""
    rng = random.Random(seed)
    report = WsFuzzReport()
    layout = Layout(MEMORY_SIZE, PAGE, [(0, MEMORY_SIZE // 2, 0), (MEMORY_SIZE // 2 + 4 * PAGE, 64 * PAGE,
                                                                   MEMORY_SIZE // 2)])
    identity = None
    if checkpoint is not None:
        from loader import checkpoint_identity
        from loader.checkpoint import open_checkpoint
        identity = checkpoint_identity(open_checkpoint(checkpoint)).as_dict()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pageload-wsfuzz-") as d:
        path = os.path.join(d, "ws.msgpack")
        samples: list[bytes] = []
        for i in range(files):
            data = fuzz_working_set_file(rng, identity if rng.random() < 0.5 else None)
            report.files += 1
            if len(data) >= 16384 and i % 5 == 0:  # the decode's peak, past its fixed cost (tracemalloc is slow)
                tracemalloc.start()
                try:
                    decode_working_set(data)
                except Exception:  # noqa: BLE001, S110 - findings are _consume's
                    pass
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                report.peak_bytes_per_file_byte = max(report.peak_bytes_per_file_byte, peak / len(data))
            _consume(data, path, layout, report)
            if len(samples) < commands and rng.random() < 0.5:
                samples.append(data)
        for i, data in enumerate(samples):
            p = os.path.join(d, f"cmd{i}.msgpack")
            with open(p, "wb") as f:
                f.write(data)
            which = i % 3
            if which == 0:
                _command(["working-set", "show", p], report)
            elif which == 1:
                _command(["working-set", "merge", p, p, "-o", os.path.join(d, "merged.msgpack")], report)
            elif checkpoint is not None:
                _command(["restore", checkpoint, "--socket", os.path.join(d, "s.sock"), "--background", "-q",
                          "--working-set", p], report, ready_ok=True)
    report.elapsed_s = time.perf_counter() - t0
    if report.peak_bytes_per_file_byte > DECODE_BYTES_PER_FILE_BYTE:
        report.findings.append(f"a decode peaked at {report.peak_bytes_per_file_byte:.1f} bytes per file byte, more "
                               f"than the {DECODE_BYTES_PER_FILE_BYTE} read_working_set's memory check assumes")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workloads.wsfuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--commands", type=int, default=60, help="files also run through the real commands")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from ._sample import make_sample_image
    with tempfile.TemporaryDirectory(prefix="pageload-wsfuzz-ckpt-") as d:
        image = os.path.join(d, "memory.img")
        make_sample_image(image, MEMORY_SIZE, seed=args.seed)
        report = run_working_set_fuzz(args.files, seed=args.seed, commands=args.commands, checkpoint=image)
    print(report.summary())
    for line in report.findings[:20]:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if report.findings else 0
