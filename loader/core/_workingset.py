"""Working sets (REAP / FaaSnap style): which memory a restored guest touched first.

A working set is a list of page-aligned ranges in **first-touch order**, each with
the time of its first touch (microseconds after the recording started), tied to
one checkpoint by its :class:`CheckpointIdentity`.  This module holds the record
(:class:`WorkingSet`) and its msgpack file (docs/FORMAT.md, "Working sets"):
encoding, decoding and its bounds, reading and writing it safely, where it lives,
checking that it belongs to a checkpoint.  Recording, merging and replaying are in
:mod:`loader.core._replay`.

Everything is held in ``array('Q')`` columns: memory is 24 bytes per range,
never an object per page, whatever the working set's size.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from .._files import CheckpointError, open_regular
from .._startup import StartupError, memory_available
from .._startup import identity as file_identity
from .._units import human
from ._columns import column_bytes, read_column
from ._identity import CheckpointIdentity
from ._rangeset import RangeSet

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from ..source import PageSource

__all__ = [
    "DEFAULT_NAME",
    "FORMAT",
    "VERSION",
    "CheckpointIdentity",
    "WorkingSet",
    "WorkingSetError",
    "check_recording_path",
    "checkpoint_identity",
    "clip_working_set",
    "decode_working_set",
    "default_working_set_path",
    "encode_working_set",
    "format_working_set",
    "read_working_set",
    "write_working_set",
]

FORMAT = "pageload-working-set"  #: the file's magic (its first key's value)
VERSION = 1
DEFAULT_NAME = "working-set.msgpack"  #: in a pages checkpoint's directory
MAX_FILE_BYTES = 1 << 30
#: a working-set file's fields besides its three columns, at most (about 200 bytes in practice)
FILE_OVERHEAD_BYTES = 4096
#: reading a working set takes about this many bytes of memory per byte of the file at
#: its peak (measured: 6.4 for a million ranges; the overlap check sorts a list of them)
DECODE_BYTES_PER_FILE_BYTE = 8
_U64 = 1 << 64


class WorkingSetError(StartupError):
    """A working set cannot be used; ``str()`` is one line, ``"<path>: <problem>"``.
    A :class:`StartupError` when the daemon meets it before READY."""

    def __init__(self, path: str, problem: str) -> None:
        problem = " ".join(problem.split())
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def checkpoint_identity(source: Checkpoint | PageSource) -> CheckpointIdentity:
    """The identity of an opened checkpoint or source (:meth:`PageSource.identity`);
    raises :class:`WorkingSetError` where it cannot be taken (an index that cannot
    be read again)."""
    try:
        return source.identity()
    except OSError as exc:
        raise WorkingSetError(exc.filename or "checkpoint", exc.strerror or str(exc)) from None


def default_working_set_path(source: str) -> str:
    """Where a checkpoint's working set lives by default: ``DIR/working-set.msgpack``
    for a pages checkpoint (given as its directory or its index), and
    ``IMAGE.working-set.msgpack`` beside a raw image (one directory often holds
    several images)."""
    if os.path.isdir(source):
        return os.path.join(source, DEFAULT_NAME)
    if source.endswith(".msgpack"):
        return os.path.join(os.path.dirname(source), DEFAULT_NAME)
    return f"{source}.{DEFAULT_NAME}"


#: ``write_working_set(replaces=...)``: replace a regular file found at the path (never
#: anything else), as ``working-set merge -o`` does
ANY_REGULAR_FILE = "any regular file"


def check_recording_path(path: str, *, force: bool = False,
                         protect: Iterable[str] = ()) -> tuple[int, int] | None:
    """Fail now, with one line, if a working set cannot be written at ``path``
    (a read-only checkpoint directory must not be found out at shutdown), and
    apply the ``--memory-file`` rules: what is at ``path`` must not be a symbolic
    link (never followed), anything but a regular file, or one of the files in
    ``protect`` (the checkpoint's own, the memory file: same st_dev/st_ino), and
    an existing file is replaced only with ``force``.

    Returns the (st_dev, st_ino) of the file ``force`` lets the recording replace,
    or None when nothing is there: pass it to :func:`write_working_set` as
    ``replaces``, which checks again just before it puts the file in place."""
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise WorkingSetError(path, f"cannot record a working set here: {exc.strerror or exc}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise WorkingSetError(path, "cannot record a working set here: it is a directory")
        _refuse_kind(path, st, protect)
        if not force:
            raise WorkingSetError(path, "cannot record a working set here: the file exists (--force replaces "
                                  "it)")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        fd, probe = tempfile.mkstemp(prefix=".working-set.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise WorkingSetError(path, f"cannot record a working set here: {parent}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return None if st is None else file_identity(st)


def _refuse_kind(path: str, st: os.stat_result, protect: Iterable[str] = ()) -> None:
    """A working set is written only in place of a regular file, never one in ``protect``."""
    if stat.S_ISLNK(st.st_mode):
        raise WorkingSetError(path, "cannot record a working set here: it is a symbolic link; refusing to "
                              "write through it or replace it")
    if not stat.S_ISREG(st.st_mode):
        raise WorkingSetError(path, "cannot record a working set here: it exists and is not a regular file")
    for p in protect:
        try:
            if file_identity(os.stat(p)) == file_identity(st):
                raise WorkingSetError(path, f"cannot record a working set here: it is the checkpoint's own "
                                      f"file {p}; refusing to write over it")
        except OSError:
            pass


@dataclass(eq=False)
class WorkingSet:
    """Ranges in first-touch order (columns of equal length), for one checkpoint."""

    identity: CheckpointIdentity
    offset: array[int]
    length: array[int]
    first_touch_us: array[int]
    recordings: int = 1  #: how many recordings were merged into it
    window_s: float = 0.0  #: how long the recording window was (the longest, merged)

    def __len__(self) -> int:
        return len(self.offset)

    @property
    def page_size(self) -> int:
        return self.identity.page_size

    @property
    def total_bytes(self) -> int:
        return sum(self.length)

    def ranges(self) -> Iterator[tuple[int, int, int]]:
        """(offset, length, first_touch_us), in first-touch order."""
        return zip(self.offset, self.length, self.first_touch_us)

    def members(self) -> RangeSet:
        """The set of its memory (merged intervals; built in offset order)."""
        out = RangeSet()
        offs, lens = self.offset, self.length
        for i in sorted(range(len(offs)), key=offs.__getitem__):
            out.add(offs[i], offs[i] + lens[i])
        return out


# --------------------------------------------------------------------------- the file
def encode_working_set(ws: WorkingSet) -> bytes:
    """The file's bytes: a msgpack map, ``"format"`` first; columns as little-endian uint64."""
    packed: bytes = msgpack.packb({
        "format": FORMAT,
        "version": VERSION,
        "checkpoint": ws.identity.as_dict(),
        "recordings": ws.recordings,
        "window_s": float(ws.window_s),
        "ranges": len(ws),
        "offset": _column_bytes(ws.offset),
        "length": _column_bytes(ws.length),
        "first_touch_us": _column_bytes(ws.first_touch_us),
    }, use_bin_type=True)
    return packed


def _column_bytes(col: array[int]) -> bytes:
    return column_bytes(col)


def _column(obj: dict[str, Any], name: str, count: int) -> array[int]:
    return read_column(obj, name, count)


def _int(obj: dict[str, Any], name: str, minimum: int = 0) -> int:
    value = obj.get(name)
    if type(value) is not int:
        raise ValueError(f"field {name!r} is missing or not an integer")
    if not minimum <= value < _U64:
        raise ValueError(f"field {name!r} is {value}, outside [{minimum}, 2**64)")
    return value


#: a msgpack value's first byte that starts an array, a map or an ext (or is never used)
_NOT_SCALAR = frozenset([*range(0x80, 0xA0), 0xC1, 0xC7, 0xC8, 0xC9, *range(0xD4, 0xD9), 0xDC, 0xDD, 0xDE, 0xDF])
_MAP_FIRST = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
#: more fields than any version of the file has: refused before any is read
MAX_FIELDS = 32
_NESTED = object()  #: a field whose value was an array, a map or an ext: skipped, never built


def _read_map(up: msgpack.Unpacker, data: bytes, limit: int, nested: str | None) -> dict[str, Any]:
    """The map at the unpacker's position, of at most ``limit`` fields with string
    names.  Values are scalars (strings, bins, numbers); an array, a map or an ext is
    skipped without building it (:data:`_NESTED`), except a map under the name
    ``nested``, read the same way one level down.  So whatever the bytes, decoding
    builds no more objects than the few fields (the columns are single bins)."""
    count = up.read_map_header()
    if count > limit:
        raise ValueError(f"not a working set (a map of {count} fields)")
    out: dict[str, Any] = {}
    for _ in range(count):
        if data[up.tell()] in _NOT_SCALAR:
            raise ValueError("not a working set (a field name that is not a string)")
        key = up.unpack()
        if not isinstance(key, str):
            raise ValueError("not a working set (a field name that is not a string)")
        first = data[up.tell()]
        if key == nested and first in _MAP_FIRST:
            out[key] = _read_map(up, data, limit, None)
        elif first in _NOT_SCALAR:
            up.skip()
            out[key] = _NESTED
        else:
            out[key] = up.unpack()
    return out


def _read_fields(data: bytes) -> dict[str, Any]:
    """The file's top-level map (see :func:`_read_map`); ``ValueError`` otherwise."""
    n = len(data)
    if data[0] not in _MAP_FIRST:
        raise ValueError(f'not a working set (no "format": "{FORMAT}" field)')
    up = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=n, max_str_len=n, max_bin_len=n,
                          max_array_len=n, max_map_len=n, max_ext_len=n)
    up.feed(data)
    try:
        obj = _read_map(up, data, MAX_FIELDS, "checkpoint")
    except (msgpack.OutOfData, IndexError):  # IndexError: a peek past the end
        raise ValueError("truncated: the msgpack data ends early") from None
    except ValueError as exc:
        if str(exc).startswith("not a working set"):
            raise
        raise ValueError(f"not a working set (invalid msgpack: {type(exc).__name__})") from None
    except (TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a working set (invalid msgpack: {type(exc).__name__})") from None
    if obj.get("format") != FORMAT:
        raise ValueError(f'not a working set (no "format": "{FORMAT}" field)')
    if up.tell() != n:
        raise ValueError("trailing bytes after the working set's msgpack map")
    return obj


def decode_working_set(data: bytes) -> WorkingSet:
    """Parse and check a working set file; ``ValueError`` with a one-line reason.

    Nothing in the file makes it build objects beyond its fields (:func:`_read_map`):
    the peak is the ranges' overlap check, about 6.4 bytes per byte of the file."""
    n = len(data)
    if n == 0:
        raise ValueError("empty file")
    obj = _read_fields(data)
    version = _int(obj, "version")
    if version != VERSION:
        raise ValueError(f"unsupported working-set version {version} (this pageload reads version {VERSION})")
    ck = obj.get("checkpoint")
    if not isinstance(ck, dict):
        ck = {}
    kind = ck.get("kind")
    if not isinstance(kind, str) or not kind.isidentifier() or len(kind) > 32:
        raise ValueError("field 'checkpoint' is missing or has no kind (a source's name: 'raw', 'pages', ...)")
    page_size = _int(ck, "page_size", 1)
    if page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two")
    identity = CheckpointIdentity(kind, _int(ck, "memory_size"), page_size, _int(ck, "digest"))
    count = _int(obj, "ranges")
    recordings = _int(obj, "recordings", 1)
    window = obj.get("window_s", 0.0)
    if not isinstance(window, (int, float)) or isinstance(window, bool) or not 0 <= window < 1e12:
        raise ValueError("field 'window_s' is not a non-negative number")
    ws = WorkingSet(identity, _column(obj, "offset", count), _column(obj, "length", count),
                    _column(obj, "first_touch_us", count), recordings, float(window))
    _check_ranges(ws)
    return ws


def _check_ranges(ws: WorkingSet) -> None:
    ps = ws.page_size
    offs, lens, times = ws.offset, ws.length, ws.first_touch_us
    prev_t = 0
    for i in range(len(offs)):
        o, n, t = offs[i], lens[i], times[i]
        if n == 0 or o % ps or n % ps:
            raise ValueError(f"range {i} ({o:#x}+{n:#x}) is empty or not page-aligned")
        if o + n >= _U64:
            raise ValueError(f"range {i} ({o:#x}+{n:#x}) runs past 2**64")
        if t < prev_t:
            raise ValueError(f"range {i}: first touches are not in order ({t} us after {prev_t} us)")
        prev_t = t
    order = sorted(range(len(offs)), key=offs.__getitem__)
    for a, b in zip(order, order[1:]):
        if offs[a] + lens[a] > offs[b]:
            raise ValueError(f"ranges {a} and {b} overlap (at {offs[b]:#x})")


def max_file_bytes(memory_size: int, page_size: int) -> int:
    """The largest working-set file of a checkpoint of ``memory_size`` bytes in pages of
    ``page_size``: its ranges never overlap, so there are at most that many pages of
    them, each 24 bytes in the file, plus the fields around them."""
    return min(MAX_FILE_BYTES, FILE_OVERHEAD_BYTES + 24 * -(-memory_size // page_size))


def read_working_set(path: str, max_bytes: int = MAX_FILE_BYTES) -> WorkingSet:
    """Read and check the file; :class:`WorkingSetError` (one line) on any problem.

    Only a regular file is opened, never blocking (``O_NONBLOCK``; a FIFO or a device
    is refused without being read).  Its size is checked before anything is read:
    at most ``max_bytes`` (:func:`max_file_bytes` for a known checkpoint), and reading
    it must fit in the memory left (about :data:`DECODE_BYTES_PER_FILE_BYTE` times
    its size at the peak)."""
    try:
        fd = open_regular(path)
    except CheckpointError as exc:
        raise WorkingSetError(path, exc.problem) from None
    except OSError as exc:
        raise WorkingSetError(path, exc.strerror or str(exc)) from None
    try:
        with open(fd, "rb", closefd=True) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                why = "limit" if max_bytes >= MAX_FILE_BYTES else "most a working set of this checkpoint can be"
                raise WorkingSetError(path, f"{size} bytes, more than the {max_bytes}-byte {why}")
            avail = memory_available()
            if avail is not None and size * DECODE_BYTES_PER_FILE_BYTE > avail:
                raise WorkingSetError(path, f"{size} bytes: reading it takes about "
                                      f"{human(size * DECODE_BYTES_PER_FILE_BYTE)} of memory, more than the "
                                      f"{human(avail)} left")
            data = f.read(size + 1)
    except OSError as exc:
        raise WorkingSetError(path, exc.strerror or str(exc)) from None
    try:
        return decode_working_set(data)
    except ValueError as exc:
        raise WorkingSetError(path, str(exc)) from None


def write_working_set(path: str, ws: WorkingSet,
                      replaces: tuple[int, int] | str | None = ANY_REGULAR_FILE) -> None:
    """Write atomically: a temporary file beside ``path``, fsynced, then put in place.

    What may be at ``path`` then: with ``replaces=None`` nothing (the file is linked
    in, which never replaces anything); with a (st_dev, st_ino) from
    :func:`check_recording_path` that file, or nothing; with :data:`ANY_REGULAR_FILE`
    a regular file, or nothing.  Symbolic links and non-regular files are never
    replaced.  Anything else is a :class:`WorkingSetError`, and the path is left as
    it was."""
    parent = os.path.dirname(os.path.abspath(path))
    data = encode_working_set(ws)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".working-set.", suffix=".partial", dir=parent)
    except OSError as exc:
        raise WorkingSetError(path, f"cannot write: {exc.strerror or exc}") from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        _put_in_place(tmp, path, replaces)
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except (OSError, WorkingSetError) as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, WorkingSetError):
            raise
        raise WorkingSetError(path, f"cannot write: {exc.strerror or exc}") from None


def _put_in_place(tmp: str, path: str, replaces: tuple[int, int] | str | None) -> None:
    """Move ``tmp`` to ``path`` as :func:`write_working_set` allows."""
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is None:
        try:
            os.link(tmp, path)  # atomically: fails if anything appeared at path meanwhile
        except FileExistsError:
            raise WorkingSetError(path, "not written: a file appeared there since the daemon started; "
                                  "left as it is") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            os.rename(tmp, path)  # a file system without hard links
        else:
            os.unlink(tmp)
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        _refuse_kind(path, st)
    if replaces is None:
        raise WorkingSetError(path, "not written: a file appeared there since the daemon started; left as it is")
    if replaces != ANY_REGULAR_FILE and file_identity(st) != replaces:
        raise WorkingSetError(path, "not written: the file there was replaced since the daemon started; left "
                              "as it is")
    os.rename(tmp, path)


# --------------------------------------------------------------------------- use
def check_identity(ws: WorkingSet, identity: CheckpointIdentity, path: str) -> None:
    """Refuse (one line) a working set recorded for another checkpoint."""
    if ws.identity != identity:
        raise WorkingSetError(
            path, f"recorded for another checkpoint ({ws.identity.describe()}; this is a {identity.describe()})"
        )


def clip_working_set(ws: WorkingSet, memory_size: int) -> tuple[WorkingSet, int]:
    """Drop what lies past ``memory_size``; returns (the clipped set, bytes dropped)."""
    offs, lens = ws.offset, ws.length
    if not any(o + n > memory_size for o, n in zip(offs, lens)):
        return ws, 0
    out = WorkingSet(ws.identity, array("Q"), array("Q"), array("Q"), ws.recordings, ws.window_s)
    dropped = 0
    for o, n, t in ws.ranges():
        end = min(o + n, memory_size)
        dropped += o + n - max(end, o)
        if end > o:
            out.offset.append(o)
            out.length.append(end - o)
            out.first_touch_us.append(t)
    return out, dropped


def format_working_set(ws: WorkingSet, path: str, limit: int = 20) -> list[str]:
    """``pageload working-set show``: a summary, then the first ``limit`` ranges."""
    total = ws.total_bytes
    last = ws.first_touch_us[-1] / 1e6 if len(ws) else 0.0
    lines = [
        f"{path}: working set of {human(total)} ({total // ws.page_size} pages) in {len(ws)} ranges",
        f"  checkpoint         {ws.identity.describe()}",
        f"  recordings         {ws.recordings} (window {ws.window_s:.1f} s; last first touch at {last:.3f} s)",
    ]
    if len(ws):
        lines.append(f"  largest range      {human(max(ws.length))}")
        lines.append("  first touches (time, memory range):")
        for o, n, t in list(zip(ws.offset[:limit], ws.length[:limit], ws.first_touch_us[:limit])):
            lines.append(f"    {t / 1e6:10.6f} s  {o:#x}+{n:#x} ({human(n)})")
        if len(ws) > limit:
            lines.append(f"    ... {len(ws) - limit} more")
    return lines
