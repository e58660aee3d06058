"""The messages of the protocol, as small frozen dataclasses.

Constructors validate their fields and raise :class:`LocalProtocolError` on misuse
(a negative offset, an empty range, an id out of range, a bool where an int
belongs).  The connection objects build events from the peer's input with the same
constructors and turn that error into a non-fatal ``bad-message``
:class:`RemoteProtocolError`, so a decoded event is always valid.

Requests go from client to server and carry the client's ``id``; every request gets
exactly one reply carrying the same ``id``, in any order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from ._errors import LocalProtocolError, RemoteProtocolError
from ._limits import describe

MAX_ID = 2**63  #: ids are unsigned and below this
MAX_U64 = 2**64  #: offsets, lengths and sizes fit in an unsigned 64-bit int
MAX_VERSION = 2**31
MAX_VERSIONS = 16  #: a Hello offers at most this many versions
MAX_CLIENT_NAME = 256  #: characters in ``Hello.client``
MAX_CODE = 64  #: characters in ``ErrorReply.code``
MAX_ERRNO = 2**31
MAX_STATS_DEPTH = 16  #: nesting of dicts and lists in ``StatsReply.stats``


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bound(limit: int) -> str:
    return f"2**{limit.bit_length() - 1}" if limit & (limit - 1) == 0 else str(limit)


def _check_uint(what: str, value: object, limit: int, minimum: int = 0) -> None:
    if not _is_int(value) or not minimum <= value < limit:  # type: ignore[operator]
        raise LocalProtocolError(
            f"{what} must be an int in [{minimum}, {_bound(limit)}), not {describe(value)}"
        )


def _check_id(value: object) -> None:
    _check_uint("id", value, MAX_ID)


def _check_range(offset: object, length: object) -> None:
    _check_uint("offset", offset, MAX_U64)
    _check_uint("length", length, MAX_U64, 1)
    if offset + length > MAX_U64:  # type: ignore[operator]
        raise LocalProtocolError(f"range {offset:#x}+{length:#x} runs past 2**64")


def _check_stats_value(value: object, path: str, depth: int) -> None:
    if value is None or isinstance(value, (bool, float, str)):
        return
    if isinstance(value, int):
        if not -(2**63) <= value < MAX_U64:
            raise LocalProtocolError(f"stats{path} = {value} does not fit in 64 bits")
        return
    if depth >= MAX_STATS_DEPTH:
        raise LocalProtocolError(f"stats{path} is nested deeper than {MAX_STATS_DEPTH}")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_stats_value(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise LocalProtocolError(f"stats{path} has a key {describe(key)} that is not a str")
            _check_stats_value(item, f"{path}[{describe(key)}]", depth + 1)
        return
    raise LocalProtocolError(
        f"stats{path} is a {type(value).__name__}; only None, bool, int, float, str, "
        "list and dict can be sent"
    )


class Event:
    """Base of every message."""

    __slots__ = ()


class Request(Event):
    """A message from client to server.  Every request is answered exactly once."""

    __slots__ = ()
    id: int


class Reply(Event):
    """A message from server to client, answering the request with the same ``id``."""

    __slots__ = ()
    id: int | None
    answers: ClassVar[type[Request] | None]  #: the request type this replies to


# ---------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Hello(Request):
    """Opens a session: the protocol versions the client speaks, best last or first
    (order does not matter: the highest common one is chosen), and a free-form name
    for logs and statistics."""

    id: int
    versions: tuple[int, ...]
    client: str = ""

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not isinstance(self.versions, tuple) or not 1 <= len(self.versions) <= MAX_VERSIONS:
            raise LocalProtocolError(
                f"versions must be a tuple of 1 to {MAX_VERSIONS} ints, not {describe(self.versions)}"
            )
        for v in self.versions:
            _check_uint("a version", v, MAX_VERSION, 1)
        if not isinstance(self.client, str) or len(self.client) > MAX_CLIENT_NAME:
            raise LocalProtocolError(
                f"client must be a str of at most {MAX_CLIENT_NAME} characters"
            )


@dataclass(frozen=True, slots=True)
class Wait(Request):
    """Answered with :class:`Loaded` once guest memory ``[offset, offset+length)`` is
    loaded (at once if it already is), or with an :class:`ErrorReply`."""

    id: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_range(self.offset, self.length)


@dataclass(frozen=True, slots=True)
class Prefetch(Request):
    """A hint that ``[offset, offset+length)`` will be needed soon.  Answered at once
    with :class:`Accepted`; says nothing about when the range is loaded.
    ``working_set``: the range belongs to the working set (``hint working-set``): a
    daemon recording one records it as touched now."""

    id: int
    offset: int
    length: int
    working_set: bool = False

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_range(self.offset, self.length)
        if not isinstance(self.working_set, bool):
            raise LocalProtocolError(f"ws must be a bool, not {describe(self.working_set)}")


@dataclass(frozen=True, slots=True)
class Mark(Request):
    """Ends the daemon's working-set recording window now (answered with :class:`Marked`,
    also when nothing is being recorded)."""

    id: int

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True)
class GetStats(Request):
    """Asks for the daemon's statistics (:class:`StatsReply`)."""

    id: int

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True)
class GetMemoryFd(Request):
    """Asks for the guest memory file's descriptor.  The I/O layer sends the
    :class:`MemoryFdReply` frame with the descriptor attached (SCM_RIGHTS).

    The descriptor is read-only unless ``writable`` is true; a server may refuse
    that with ``forbidden``."""

    id: int
    writable: bool = False

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not isinstance(self.writable, bool):
            raise LocalProtocolError(f"writable must be a bool, not {describe(self.writable)}")


@dataclass(frozen=True, slots=True)
class GetLoadedMap(Request):
    """Asks for the daemon's loaded map: a read-only file with one bit per granule of
    guest memory, set once that granule is loaded (:class:`LoadedMapReply`, with the
    descriptor attached by the I/O layer, SCM_RIGHTS)."""

    id: int

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True)
class RegisterUffd(Request):
    """Hands the daemon a userfaultfd (attached by the I/O layer, SCM_RIGHTS) on which
    the client registered ``[address, address+length)`` of its address space, a
    shared mapping of the memory file starting at memory offset ``offset``, in
    MISSING and MINOR mode.  From then on the daemon resolves that range's faults
    (:class:`UffdRegistered`), until the connection closes."""

    id: int
    address: int
    length: int
    offset: int

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_range(self.address, self.length)
        _check_range(self.offset, self.length)


# ---------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class HelloReply(Reply):
    """The chosen version and the image geometry; ``done`` is true when every page
    is already loaded (waits will all be answered at once)."""

    answers: ClassVar[type[Request] | None] = Hello
    id: int
    version: int
    memory_size: int
    page_size: int
    done: bool

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_uint("version", self.version, MAX_VERSION, 1)
        _check_uint("memory_size", self.memory_size, MAX_U64)
        _check_uint("page_size", self.page_size, 2**32, 1)
        if self.page_size & (self.page_size - 1):
            raise LocalProtocolError(f"page_size {self.page_size} is not a power of two")
        if not isinstance(self.done, bool):
            raise LocalProtocolError(f"done must be a bool, not {describe(self.done)}")


@dataclass(frozen=True, slots=True)
class Loaded(Reply):
    """The range of :class:`Wait` ``id`` is loaded."""

    answers: ClassVar[type[Request] | None] = Wait
    id: int

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True)
class Accepted(Reply):
    """:class:`Prefetch` ``id`` was queued (or the range was already loaded)."""

    answers: ClassVar[type[Request] | None] = Prefetch
    id: int

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True)
class Marked(Reply):
    """:class:`Mark` ``id`` was done: the recording window is closed (or there was none)."""

    answers: ClassVar[type[Request] | None] = Mark
    id: int

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True)
class StatsReply(Reply):
    """The daemon's statistics: str keys; values None, bool, int, float, str, or
    lists and dicts of those.  The dict is not copied: do not change it after
    building the event.  Tuples are sent as lists and come back as lists."""

    answers: ClassVar[type[Request] | None] = GetStats
    id: int
    stats: dict[str, Any]

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not isinstance(self.stats, dict):
            raise LocalProtocolError(f"stats must be a dict, not {type(self.stats).__name__}")
        _check_stats_value(self.stats, "", 0)


@dataclass(frozen=True, slots=True)
class MemoryFdReply(Reply):
    """Answers :class:`GetMemoryFd`: the memory file (``size`` bytes) arrives as an
    SCM_RIGHTS descriptor with the bytes of this frame."""

    answers: ClassVar[type[Request] | None] = GetMemoryFd
    id: int
    size: int

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_uint("size", self.size, MAX_U64)


@dataclass(frozen=True, slots=True)
class LoadedMapReply(Reply):
    """Answers :class:`GetLoadedMap`: the map (``size`` bytes; bit ``i % 8`` of byte
    ``i // 8`` covers memory ``[i * granule, (i + 1) * granule)``) arrives as an
    SCM_RIGHTS descriptor with the bytes of this frame."""

    answers: ClassVar[type[Request] | None] = GetLoadedMap
    id: int
    size: int
    granule: int

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_uint("size", self.size, MAX_U64)
        _check_uint("granule", self.granule, 2**32, 1)
        if self.granule & (self.granule - 1):
            raise LocalProtocolError(f"granule {self.granule} is not a power of two")


@dataclass(frozen=True, slots=True)
class UffdRegistered(Reply):
    """Answers :class:`RegisterUffd`: the daemon serves that range's faults now."""

    answers: ClassVar[type[Request] | None] = RegisterUffd
    id: int

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True)
class ErrorReply(Reply):
    """A request failed (``id``), or the connection did (``id`` is ``None``: sent
    just before the server closes it).  ``code`` is one of :mod:`protocol.codes` (or a
    newer one); ``errno`` is set for ``io-error``."""

    answers: ClassVar[type[Request] | None] = None  # answers any request
    id: int | None
    code: str
    message: str = ""
    errno: int | None = None

    def __post_init__(self) -> None:
        if self.id is not None:
            _check_id(self.id)
        if not isinstance(self.code, str) or not 1 <= len(self.code) <= MAX_CODE:
            raise LocalProtocolError(
                f"code must be a str of 1 to {MAX_CODE} characters, not {describe(self.code)}"
            )
        if not isinstance(self.message, str):
            raise LocalProtocolError(f"message must be a str, not {type(self.message).__name__}")
        if self.errno is not None:
            _check_uint("errno", self.errno, MAX_ERRNO, 1)

    @classmethod
    def for_error(cls, error: RemoteProtocolError) -> ErrorReply:
        """The reply a server sends for a :class:`RemoteProtocolError` it caught."""
        return cls(error.id, error.code, error.message)


#: Any request (for annotations and match statements).
RequestEvent: TypeAlias = (Hello | Wait | Prefetch | GetStats | GetMemoryFd | GetLoadedMap | Mark
                           | RegisterUffd)
#: Any reply.
ReplyEvent: TypeAlias = (HelloReply | Loaded | Accepted | StatsReply | MemoryFdReply | LoadedMapReply
                          | ErrorReply | Marked | UffdRegistered)
