"""The daemon's working sets: the one replayed (the sweep's order) and the one recorded
(its window after READY, written atomically); their statistics and log lines."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from .._units import human
from ..core._replay import WorkingSetRecorder, replay_order
from ..core._sweep import SweepOrder, WorkingSetOrder
from ..core._workingset import (
    WorkingSet,
    WorkingSetError,
    check_identity,
    check_recording_path,
    checkpoint_identity,
    clip_working_set,
    decode_working_set,
    default_working_set_path,
    max_file_bytes,
    read_working_set,
    write_working_set,
)
from ..source import PageSource

if TYPE_CHECKING:
    from ._options import DaemonOptions

log = logging.getLogger("pageload")


def working_set_setup(
    opts: DaemonOptions, ckpt: PageSource, notes: list[str]
) -> tuple[SweepOrder | None, WorkingSetRecorder | None, str | None]:
    """The sweep order (working-set replay when there is one) and the recorder.

    An explicit ``working_set`` that cannot be used, or a recording path that cannot
    be written, raises :class:`WorkingSetError` (one line; the CLI exits 2).  The
    default file beside the checkpoint is only a hint: a problem with it is one
    warning line and the restore goes on without it.  A source that keeps its own
    (``stored_working_set(max_bytes) -> (where, bytes) | None``: a checkpoint in a
    store, its ``PREFIX/working-set.msgpack``) gives the default instead of a file."""
    identity = None
    order = opts.order
    if order is None and opts.use_working_set:
        path = opts.working_set
        explicit = path is not None
        limit = max_file_bytes(ckpt.layout.memory_size, ckpt.layout.page_size)
        stored: bytes | None = None
        fetch = getattr(ckpt, "stored_working_set", None)
        if path is None and fetch is not None:  # kept with the checkpoint in a store
            try:
                found = fetch(limit)
            except WorkingSetError as exc:
                log.warning("ignoring the working set %s", exc)
                found = None
            if found is not None:
                path, stored = found
        elif path is None:
            path = default_working_set_path(opts.source)
            if not os.path.exists(path):
                path = None
        if path is not None:
            try:
                ws = read_working_set(path, limit) if stored is None else decode_stored(stored, path)
                identity = checkpoint_identity(ckpt)
                check_identity(ws, identity, path)
            except WorkingSetError as exc:
                if explicit:
                    raise
                log.warning("ignoring the working set %s", exc)
            else:
                ws, dropped = clip_working_set(ws, ckpt.layout.memory_size)
                if dropped:
                    log.warning("working set %s: %d bytes lie past the memory size %#x; clipped",
                                path, dropped, ckpt.layout.memory_size)
                verified = opts.config.verify and ckpt.checksums is not None and ckpt.layout.file_ascends()
                order = replay_order(ws, ckpt.layout, chunk_size=ckpt.chunk_size if verified else None)
                notes.append(f"working set {path}: {human(order.size_bytes)} of data in {len(ws)} ranges "
                             f"({ws.recordings} recording{'s' if ws.recordings != 1 else ''}), replayed first "
                             f"as {len(order.span_lo)} reads")
    recorder = record_path = None
    if opts.record_working_set is not None:
        record_path = opts.record_working_set or default_working_set_path(opts.source)
        protect = [*ckpt.files(), *([opts.memory_file] if opts.memory_file else [])]
        replaces = check_recording_path(record_path, force=opts.force_working_set, protect=protect)
        recorder = WorkingSetRecorder(identity or checkpoint_identity(ckpt))
        recorder.replaces = replaces
    return order, recorder, record_path


def decode_stored(data: bytes, where: str) -> WorkingSet:
    """A working set fetched from where its checkpoint is stored, decoded and checked."""
    try:
        return decode_working_set(data)
    except ValueError as exc:
        raise WorkingSetError(where, str(exc)) from None


def working_set_stats(order: SweepOrder | None, recorder: WorkingSetRecorder | None,
                       record_path: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(order, WorkingSetOrder):
        out["working_set"] = order.statistics()
    if recorder is not None:
        out["recording"] = {"path": record_path, "active": recorder.active, "ranges": len(recorder.offset),
                            "bytes": recorder.seen.total, "touches": recorder.touches}
    return out


def working_set_line(order: WorkingSetOrder) -> str:
    s = order.statistics()
    when = "not yet" if s["loaded_s"] is None else f"in {s['loaded_s']:.3f} s"
    rate = "-" if s["hit_rate"] is None else f"{s['hit_rate'] * 100:.0f}%"
    return (f"working set {human(s['size_bytes'])}: loaded {human(s['loaded_bytes'])} {when}; waits "
            f"{s['waits_hit']} hit, {s['waits_early']} early, {s['waits_missed']} missed (hit rate {rate})")


async def record_window(recorder: WorkingSetRecorder, path: str, seconds: float | None,
                         done: trio.Event) -> None:
    """Close the window after ``seconds`` (or at a ``mark``, or at shutdown), then
    write the file atomically.  A write error is one warning line, never a crash."""
    try:
        with trio.move_on_after(seconds if seconds is not None else float("inf")):
            await recorder.closed.wait()
        ws = recorder.stop()
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(write_working_set, path, ws, recorder.replaces)
            except WorkingSetError as exc:
                log.warning("working set not recorded: %s", exc)
            else:
                log.info("working set recorded to %s: %s in %d ranges over %.1f s",
                         path, human(ws.total_bytes), len(ws), ws.window_s)
    finally:
        done.set()


