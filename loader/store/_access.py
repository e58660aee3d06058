"""A chunk store's objects, wherever the store is: a local directory (or ``file://``
URL), written durably (a temporary name, ``fsync``, ``rename``), or an ``s3://``
prefix through :class:`loader.remote.ObjectStore` (imported only then).

Every failure is a :class:`CheckpointError`: one line naming the object."""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from .._files import CheckpointError

__all__ = ["ChunkStore", "Entry", "open_store"]

#: a local store's temporary files: ``.NAME.tmp-PID-N`` beside their final name
_TMP_MARK = ".tmp-"


@dataclass(frozen=True, slots=True)
class Entry:
    """One object of a listing."""

    key: str  #: relative to the store (``chunks/HH/HASH``)
    size: int
    mtime: float  #: unix seconds: modification time, or S3's LastModified


class ChunkStore:
    """The operations the store's writers need, on one store."""

    where: str  #: the store, for messages

    def url_of(self, key: str) -> str:
        return f"{self.where.rstrip('/')}/{key}"

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def mtime(self, key: str) -> float | None:
        """When ``key`` was last written, or None where it is absent."""
        found = self.stat(key)
        return None if found is None else found[1]

    def stat(self, key: str) -> tuple[int, float] | None:
        """``(size, last written)`` of ``key``, or None where it is absent."""
        raise NotImplementedError

    def touch(self, key: str) -> bool:
        """Make ``key`` young again (gc's grace period starts anew) where the store can do
        that in place; False where it cannot (S3: the caller puts it again) or it is gone."""
        raise NotImplementedError

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Put ``data`` as ``key``, whole or not at all (durable before it returns, locally)."""
        raise NotImplementedError

    def get(self, key: str, max_bytes: int) -> bytes:
        raise NotImplementedError

    def read_into(self, key: str, buffer: memoryview) -> int:
        """Object ``key`` into ``buffer``; its size (a bigger object is an error)."""
        raise NotImplementedError

    def head_bytes(self, key: str, n: int) -> bytes | None:
        """The first ``n`` bytes of object ``key`` (fewer where it is shorter), or None
        where it is absent: what tells a compressed chunk object's codec."""
        raise NotImplementedError

    def listing(self, prefix: str) -> list[Entry]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def stale_temporaries(self, older_than: float) -> list[str]:
        """Temporary files a writer left behind (locally), older than ``older_than``."""
        return []


class LocalStore(ChunkStore):
    def __init__(self, root: str, *, create: bool) -> None:
        self.root = root
        self.where = root
        self._n = 0
        self._lock = threading.Lock()
        if create:
            try:
                os.makedirs(root, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(root, f"cannot make the store directory: {exc.strerror or exc}") from None
        if not os.path.isdir(root):
            raise CheckpointError(root, "no such store directory")

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def stat(self, key: str) -> tuple[int, float] | None:
        try:
            st = os.stat(self._path(key))
            return st.st_size, st.st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(self._path(key), exc.strerror or str(exc)) from None

    def touch(self, key: str) -> bool:
        try:
            os.utime(self._path(key))
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CheckpointError(self._path(key), exc.strerror or str(exc)) from None

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        directory = os.path.dirname(path)
        with self._lock:
            self._n += 1
            n = self._n
        tmp = os.path.join(directory, f".{os.path.basename(path)}{_TMP_MARK}{os.getpid()}-{n}")
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                os.makedirs(directory, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fdatasync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise CheckpointError(path, exc.strerror or str(exc)) from None

    def sync_dirs(self, keys: list[str]) -> None:
        """``fsync`` the directories of ``keys`` (their renames durable)."""
        for directory in sorted({os.path.dirname(self._path(k)) for k in keys}):
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def get(self, key: str, max_bytes: int) -> bytes:
        return read_file(self._path(key), max_bytes)

    def read_into(self, key: str, buffer: memoryview) -> int:
        path = self._path(key)
        fd, size = _open_sized(path, len(buffer))
        try:
            if os.preadv(fd, [buffer[:size]], 0) != size:
                raise CheckpointError(path, "changed while it was read")
            return size
        except OSError as exc:
            raise CheckpointError(path, exc.strerror or str(exc)) from None
        finally:
            os.close(fd)

    def head_bytes(self, key: str, n: int) -> bytes | None:
        path = self._path(key)
        try:  # never through a symbolic link; a FIFO must not block the open
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(path, exc.strerror or str(exc)) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CheckpointError(path, "not a regular file")
            return os.pread(fd, n, 0)
        except OSError as exc:
            raise CheckpointError(path, exc.strerror or str(exc)) from None
        finally:
            os.close(fd)

    def listing(self, prefix: str) -> list[Entry]:
        out: list[Entry] = []
        top = self._path(prefix)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                if _TMP_MARK in name and name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    continue
                out.append(Entry(os.path.relpath(full, self.root), st.st_size, st.st_mtime))
        return out

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CheckpointError(self._path(key), exc.strerror or str(exc)) from None

    def stale_temporaries(self, older_than: float) -> list[str]:
        out = []
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                if name.startswith(".") and _TMP_MARK in name:
                    full = os.path.join(dirpath, name)
                    try:
                        if os.lstat(full).st_mtime < older_than:
                            out.append(os.path.relpath(full, self.root))
                    except FileNotFoundError:
                        continue
        return out


class RemoteStore(ChunkStore):
    def __init__(self, url: str, *, endpoint: str | None, create: bool) -> None:
        from ..remote import ObjectStore, StoreError

        self._error = StoreError
        try:
            self._store: Any = ObjectStore(url, endpoint=endpoint, create=create)
        except StoreError as exc:
            raise CheckpointError(url, exc.message) from None
        self.where = str(self._store.url)

    def _fail(self, exc: Any) -> CheckpointError:
        text = str(exc)
        head, sep, rest = text.partition(": ")
        return CheckpointError(head, rest) if sep else CheckpointError(self.where, text)

    def _head(self, key: str) -> tuple[int, float] | None:
        import obstore

        store = self._store
        path = store.url.path_of(key)

        def attempt() -> tuple[int, float]:
            store._count(heads=1)
            meta = obstore.head(store._store, path)
            return int(meta["size"]), float(meta["last_modified"].timestamp())

        try:
            result: tuple[int, float] = store._call(key, attempt)
            return result
        except self._error as exc:
            if exc.code == "not-found":
                return None
            raise self._fail(exc) from None

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def stat(self, key: str) -> tuple[int, float] | None:
        return self._head(key)

    def touch(self, key: str) -> bool:
        return False

    def put(self, key: str, data: bytes | memoryview) -> None:
        try:
            self._store.put_bytes(key, data)
        except self._error as exc:
            raise self._fail(exc) from None

    def get(self, key: str, max_bytes: int) -> bytes:
        try:
            data: bytes = self._store.get(key, max_bytes)
            return data
        except self._error as exc:
            raise self._fail(exc) from None

    def read_into(self, key: str, buffer: memoryview) -> int:
        try:
            got: int = self._store.get_range_into(key, 0, buffer)
        except self._error as exc:
            raise self._fail(exc) from None
        return got

    def head_bytes(self, key: str, n: int) -> bytes | None:
        buffer = bytearray(n)
        try:
            got: int = self._store.get_range_into(key, 0, memoryview(buffer))
        except self._error as exc:
            if exc.code == "not-found":
                return None
            raise self._fail(exc) from None
        return bytes(buffer[:got])

    def listing(self, prefix: str) -> list[Entry]:
        try:
            return [Entry(k, n, t) for k, n, t in self._store.list_objects(prefix)]
        except self._error as exc:
            raise self._fail(exc) from None

    def delete(self, key: str) -> None:
        try:
            self._store.delete(key)
        except self._error as exc:
            raise self._fail(exc) from None


def _open_sized(path: str, max_bytes: int) -> tuple[int, int]:
    """``path`` opened as a regular file (never blocking, never a FIFO or device) and its
    size, at most ``max_bytes`` (refused before anything is read); one-line
    :class:`CheckpointError`."""
    from .._files import open_regular

    try:
        fd = open_regular(path)
    except OSError as exc:
        raise CheckpointError(path, exc.strerror or str(exc)) from None
    try:
        size = os.fstat(fd).st_size
    except OSError as exc:
        os.close(fd)
        raise CheckpointError(path, exc.strerror or str(exc)) from None
    if size > max_bytes:
        os.close(fd)
        raise CheckpointError(path, f"{size} bytes, more than the {max_bytes} allowed")
    return fd, size


def read_file(path: str, max_bytes: int) -> bytes:
    """All of the local regular file ``path``, at most ``max_bytes`` (a manifest, a store
    object); one-line :class:`CheckpointError`."""
    fd, size = _open_sized(path, max_bytes)
    try:
        data = os.pread(fd, size + 1, 0)
    except OSError as exc:
        raise CheckpointError(path, exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if len(data) != size:
        raise CheckpointError(path, "changed while it was read")
    return data


def open_store(spec: str, *, endpoint: str | None = None, create: bool = False) -> ChunkStore:
    """The store at ``spec``: a local directory, ``file:///DIR`` (the same, locally) or
    ``s3://BUCKET/PREFIX``.  ``create``: a missing local directory is made."""
    if spec.startswith("s3://"):
        return RemoteStore(spec, endpoint=endpoint, create=create)
    if endpoint:
        raise CheckpointError(spec, "--s3-endpoint is for a store in S3 (s3://)")
    if spec.startswith("file:"):
        parts = urlsplit(spec)
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/") or parts.query or parts.fragment:
            raise CheckpointError(spec, "a file URL is file:///ABSOLUTE/DIR")
        spec = os.path.normpath(path)
    elif "://" in spec:
        raise CheckpointError(spec, "not a store: a directory, file:///DIR or s3://BUCKET/PREFIX")
    return LocalStore(spec, create=create)

