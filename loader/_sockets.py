"""Socket files: a stale one cleared, ours removed only while it is still ours, access
granted to chosen uids (a POSIX ACL).  Shared by the server, the page-fault handler's
socket and the metrics endpoint."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket as stdsocket
import stat
import struct

log = logging.getLogger("pageload.server")


class SocketInUse(OSError):
    """The socket path is taken: by a live daemon, or by something that is not a socket."""


def remove_socket_file(path: str, inode: tuple[int, int]) -> None:
    """Unlink the socket file at ``path`` only if it is still ``inode`` (st_dev, st_ino),
    the one this daemon bound: another daemon's socket put there since is left alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == inode:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        log.warning("%s is no longer the socket this daemon created: left in place", path)


def clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead daemon; refuse to touch a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(errno.EEXIST, f"{path} exists and is not a socket")
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: a dead daemon's leftover
        return
    except BlockingIOError:
        pass  # EAGAIN: someone listens, with a full backlog
    finally:
        probe.close()
    raise SocketInUse(errno.EADDRINUSE, f"{path}: another daemon is serving on this socket")


# POSIX ACL in its extended-attribute form (linux/posix_acl_xattr.h): a version, then
# (tag, permissions, id) entries sorted by tag, then by id.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF
_RW = 0o6


def grant_uids(path: str, uids: list[int]) -> None:
    """Give ``uids`` read-write on the socket file (connect needs write), no one else."""
    entries = [(_ACL_USER_OBJ, _RW, _ACL_UNDEFINED_ID)]
    entries += [(_ACL_USER, _RW, uid) for uid in sorted(uids)]
    entries += [(_ACL_GROUP_OBJ, 0, _ACL_UNDEFINED_ID), (_ACL_MASK, _RW, _ACL_UNDEFINED_ID),
                (_ACL_OTHER, 0, _ACL_UNDEFINED_ID)]
    data = struct.pack("<I", _ACL_VERSION) + b"".join(_ACL_ENTRY.pack(*e) for e in entries)
    try:
        os.setxattr(path, _ACL_XATTR, data, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        os.chmod(path, 0o666)
        log.warning("%s: this file system has no POSIX ACLs; the socket is mode 0666 so that uids %s can "
                    "connect, and only the peer-credential check keeps other users out",
                    path, ", ".join(map(str, uids)))
