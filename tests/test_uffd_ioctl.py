"""loader.uffd._ioctl's calls against a real userfaultfd, in this process (docs/TESTING.md:
the ``uffd`` mutation target's tests, with test_uffd_abi.py; a second or two).

Guest memory is a mapping of this process registered with a userfaultfd made here.
A "vCPU" (:class:`Vcpu`) is a thread that reads guest memory through a system call
(``pwrite`` from the guest page into a memfd): the call blocks in the fault until it
is answered, and a poisoned page fails it with EFAULT instead of killing the test
process with SIGBUS, as a user-mode read would.

Whether userfaultfd works here is probed with the bare system call, not with
:func:`loader.uffd._ioctl.unavailable`, which is under test: a broken ``unavailable`` must
fail these tests, not skip them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import subprocess
import sys
import threading
import time

import pytest

from loader.uffd import _ioctl as _uffd

PAGE = mmap.PAGESIZE
_UFFDIO_API_NR, _UFFDIO_REGISTER_NR, _UFFDIO_UNREGISTER_NR = 0x3F, 0x00, 0x01
_WAKE_NR, _COPY_NR, _ZEROPAGE_NR = 0x02, 0x03, 0x04


def _probe() -> str | None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(323, ctypes.c_int(os.O_CLOEXEC | os.O_NONBLOCK))
    if fd < 0:
        return f"userfaultfd(2) fails here: {os.strerror(ctypes.get_errno())}"
    os.close(fd)
    return None


_REASON = _probe() if os.uname().machine == "x86_64" else "the syscall number probed is x86-64's"
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


def _address(m: mmap.mmap) -> int:
    c = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(c)
    finally:
        del c


def _pending_faults(fd: int) -> int:
    """Faults queued in the userfaultfd and not read yet (its /proc fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("pending:"):
                return int(line.split()[1])
    raise AssertionError("no 'pending' line in a userfaultfd's fdinfo")


def _enabled_features(fd: int) -> int:
    """The features a userfaultfd's handshake enabled (its /proc fdinfo; without the
    kernel's own "initialized" bit)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("API:"):
                return int(line.split()[1].split(":")[1], 16) & ~(1 << 31)
    raise AssertionError("no 'API' line in a userfaultfd's fdinfo")


class Guest:
    """``pages`` pages of private anonymous memory registered MISSING with a new
    userfaultfd (``features`` asked of UFFDIO_API); closing the userfaultfd releases
    every fault still blocked."""

    def __init__(self, pages: int = 8, features: int = 0) -> None:
        self.size = pages * PAGE
        self.map = mmap.mmap(-1, self.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.base = _address(self.map)
        self.fd = _uffd.userfaultfd()
        self.features, self.ioctls = _uffd.api(self.fd, features)
        self.range_ioctls = _uffd.register(self.fd, self.base, self.size)
        self.uffd = _uffd.Uffd(self.fd)
        self.source = mmap.mmap(-1, self.size)  # what copies copy from
        self.source.write(os.urandom(self.size))
        self.src = _address(self.source)

    def page(self, n: int) -> int:
        return self.base + n * PAGE

    def data(self, n: int, count: int = 1) -> bytes:
        return self.source[n * PAGE:(n + count) * PAGE]

    def present(self, n: int) -> bool:
        vec = (ctypes.c_ubyte * 1)()
        assert ctypes.CDLL(None).mincore(ctypes.c_void_p(self.page(n)), ctypes.c_size_t(PAGE), vec) == 0
        return bool(vec[0] & 1)

    def wait_for_faults(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while _pending_faults(self.fd) < count:
            assert time.monotonic() < deadline, f"{count} fault(s) never came"
            time.sleep(0.001)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def guest():
    made: list[Guest] = []

    def make(pages: int = 8, features: int = 0) -> Guest:
        made.append(Guest(pages, features))
        return made[-1]

    yield make
    for g in made:
        g.close()  # (releases a vCPU a broken answer left blocked; it then reads zeros)


class Vcpu(threading.Thread):
    """Reads ``[address, address+length)`` with a system call: :meth:`result` is the
    bytes, or the errno it failed with."""

    def __init__(self, address: int, length: int = PAGE) -> None:
        super().__init__(daemon=True)
        self.address, self.length = address, length
        self.got: bytes | int | None = None
        self.start()

    def run(self) -> None:
        sink = os.memfd_create("vcpu", os.MFD_CLOEXEC)
        try:
            n = os.pwrite(sink, (ctypes.c_char * self.length).from_address(self.address), 0)
            self.got = os.pread(sink, n, 0)
        except OSError as exc:
            self.got = exc.errno
        finally:
            os.close(sink)

    def result(self, timeout: float = 10.0) -> bytes | int | None:
        self.join(timeout)
        assert not self.is_alive(), "the faulting thread was never woken"
        return self.got

    def blocked(self) -> bool:
        """Still blocked after a moment (only ever a reason to fail when it is not)."""
        self.join(0.2)
        return self.is_alive()


# ------------------------------------------------------------------ descriptors
def test_a_new_userfaultfd_is_nonblocking_close_on_exec_and_a_userfaultfd():
    fd = _uffd.userfaultfd()
    try:
        import fcntl

        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert _uffd.is_userfaultfd(fd)
    finally:
        os.close(fd)
    r, w = os.pipe()
    os.close(w)
    try:
        assert not _uffd.is_userfaultfd(r)
    finally:
        os.close(r)
    assert not _uffd.is_userfaultfd(r)  # closed: no /proc link to read


def test_the_handshake_grants_what_was_asked_and_names_the_ioctls(guest):
    asked = _uffd.FEATURE_EVENT_REMOVE | _uffd.FEATURE_THREAD_ID
    g = guest(features=asked)
    assert g.features & asked == asked
    want = (1 << _UFFDIO_API_NR) | (1 << _UFFDIO_REGISTER_NR) | (1 << _UFFDIO_UNREGISTER_NR)
    assert g.ioctls & want == want
    # a registered range allows wake, copy and zeropage (and not the API ioctls)
    want = (1 << _WAKE_NR) | (1 << _COPY_NR) | (1 << _ZEROPAGE_NR)
    assert g.range_ioctls & want == want and not g.range_ioctls & (1 << _UFFDIO_API_NR)
    with pytest.raises(OSError) as caught:  # a handshake is made once
        _uffd.api(g.fd, 0)
    assert caught.value.errno == errno.EINVAL


def test_a_handshake_enables_only_the_features_asked_for(guest):
    """UFFDIO_API answers with every feature the kernel has, whatever was asked; only
    those asked for are enabled (none by default)."""
    fd = _uffd.userfaultfd()
    try:
        granted, _ = _uffd.api(fd)
        assert granted & _uffd.FEATURE_EVENT_REMOVE and _enabled_features(fd) == 0
    finally:
        os.close(fd)
    asked = _uffd.FEATURE_EVENT_REMOVE | _uffd.FEATURE_THREAD_ID
    assert _enabled_features(guest(features=asked).fd) == asked


def test_a_forked_childs_userfaultfd_is_closed_by_its_low_32_bits():
    fds = [fd for _ in range(3) for fd in os.pipe()]
    odd = next(fd for fd in fds if fd % 2)
    even = next(fd for fd in fds if not fd % 2)
    try:
        for fd in (odd, even):
            assert _uffd.close_forked((0xDEAD << 32) | fd) == fd  # the high word is not the descriptor
            with pytest.raises(OSError):
                os.fstat(fd)
        for fd in fds:
            if fd not in (odd, even):
                os.fstat(fd)  # the others are left open
        # a descriptor already gone is no error (nothing to leave behind)
        assert _uffd.close_forked((1 << 32) | 0x7FFFFFFF) == 0x7FFFFFFF
    finally:
        for fd in fds:
            if fd not in (odd, even):
                os.close(fd)


# ------------------------------------------------------------------ faults and answers
def test_a_fault_message_names_the_page_and_copy_answers_it(guest):
    g = guest(features=_uffd.FEATURE_THREAD_ID)
    assert g.uffd.read_messages() == []  # nothing queued: no error
    vcpu = Vcpu(g.page(2) + 100, 16)
    g.wait_for_faults(1)
    [msg] = g.uffd.read_messages()
    assert msg.event == _uffd.EVENT_PAGEFAULT and not msg.a & _uffd.PAGEFAULT_FLAG_WRITE
    assert msg.b == g.page(2)  # page-aligned without FEATURE_EXACT_ADDRESS
    assert msg.c == vcpu.native_id
    assert g.uffd.copy(g.page(2), g.src + 2 * PAGE, PAGE) == PAGE  # wakes the thread
    assert vcpu.result() == g.data(2)[100:116]
    assert g.present(2) and not g.present(1) and not g.present(3)


def test_an_exact_address_is_given_when_asked_for(guest):
    g = guest(features=_uffd.FEATURE_EXACT_ADDRESS)
    assert g.features & _uffd.FEATURE_EXACT_ADDRESS
    vcpu = Vcpu(g.page(5) + 123, 8)
    g.wait_for_faults(1)
    [msg] = g.uffd.read_messages()
    assert msg.b == g.page(5) + 123
    assert g.uffd.zeropage(g.page(5), PAGE) == PAGE
    assert vcpu.result() == bytes(8)


def test_dontwake_answers_leave_the_thread_blocked_until_wake(guest):
    g = guest()
    vcpu = Vcpu(g.page(1))
    g.wait_for_faults(1)
    g.uffd.read_messages()
    assert g.uffd.copy(g.page(1), g.src + PAGE, PAGE, _uffd.COPY_MODE_DONTWAKE) == PAGE
    assert g.present(1) and vcpu.blocked()
    g.uffd.wake(g.page(1), PAGE)
    assert vcpu.result() == g.data(1)
    vcpu = Vcpu(g.page(6))
    g.wait_for_faults(1)
    g.uffd.read_messages()
    assert g.uffd.zeropage(g.page(6), PAGE, _uffd.ZEROPAGE_MODE_DONTWAKE) == PAGE
    assert vcpu.blocked()
    g.uffd.wake(g.page(6), PAGE)
    assert vcpu.result() == bytes(PAGE)


def test_zeropage_answers_with_zeros(guest):
    g = guest()
    vcpu = Vcpu(g.page(3), 2 * PAGE)
    g.wait_for_faults(1)
    assert g.uffd.zeropage(g.page(3), 2 * PAGE) == 2 * PAGE
    assert vcpu.result() == bytes(2 * PAGE)


def test_a_copy_stopped_by_a_page_already_there_says_how_much_it_did(guest):
    """The kernel stops a copy at a page already present: EAGAIN with the bytes done
    before it; a copy that starts on such a page fails EEXIST with none done."""
    g = guest()
    assert g.uffd.copy(g.page(2), g.src + 2 * PAGE, PAGE) == PAGE
    with pytest.raises(_uffd.UffdError) as caught:
        g.uffd.copy(g.page(0), g.src, 4 * PAGE)
    assert caught.value.errno == errno.EAGAIN and caught.value.done == 2 * PAGE
    assert "UFFDIO_COPY" in str(caught.value)
    assert g.present(0) and g.present(1) and not g.present(3)
    with pytest.raises(_uffd.UffdError) as caught:
        g.uffd.copy(g.page(2), g.src, 2 * PAGE)
    assert caught.value.errno == errno.EEXIST and caught.value.done == 0
    # the same for zero pages
    assert g.uffd.zeropage(g.page(6), PAGE) == PAGE
    with pytest.raises(_uffd.UffdError) as caught:
        g.uffd.zeropage(g.page(4), 4 * PAGE)
    assert caught.value.errno == errno.EAGAIN and caught.value.done == 2 * PAGE
    assert "UFFDIO_ZEROPAGE" in str(caught.value)
    with pytest.raises(_uffd.UffdError) as caught:
        g.uffd.zeropage(g.page(6), 2 * PAGE)
    assert caught.value.errno == errno.EEXIST and caught.value.done == 0
    assert g.present(4) and g.present(5) and not g.present(7)


def test_an_invalid_request_reports_nothing_done(guest):
    """A request the kernel refuses before it starts (a misaligned address) leaves its
    result field untouched: the bytes done read back as 0."""
    g = guest()
    for call, name in ((lambda: g.uffd.copy(g.page(1) + 8, g.src, PAGE), "UFFDIO_COPY"),
                       (lambda: g.uffd.zeropage(g.page(1) + 8, PAGE), "UFFDIO_ZEROPAGE")):
        with pytest.raises(_uffd.UffdError) as caught:
            call()
        assert caught.value.errno == errno.EINVAL and caught.value.done == 0, name
        assert name in str(caught.value)
    assert not g.present(1)


def test_continue_maps_pages_of_a_shared_file(guest):
    """MINOR mode on shared memory: a page in the page cache but not mapped faults as
    MINOR; UFFDIO_CONTINUE maps it (no copy).  A page already mapped stops it part-way,
    one the file lacks fails it with EFAULT."""
    features = _uffd.FEATURE_MINOR_SHMEM
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    uffd = _uffd.userfaultfd()
    try:
        os.ftruncate(fd, 8 * PAGE)
        data = os.urandom(6 * PAGE)
        os.pwrite(fd, data, 0)  # pages 0-5 in the page cache; 6 and 7 not
        m = mmap.mmap(fd, 8 * PAGE, mmap.MAP_SHARED)
        base = _address(m)
        granted, _ = _uffd.api(uffd, features)
        if not granted & features:
            pytest.skip("the kernel lacks UFFD_FEATURE_MINOR_SHMEM (Linux 5.13+)")
        _uffd.register(uffd, base, 8 * PAGE, _uffd.REGISTER_MODE_MINOR)
        u = _uffd.Uffd(uffd)
        vcpu = Vcpu(base + PAGE)
        deadline = time.monotonic() + 10
        while _pending_faults(uffd) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        [msg] = u.read_messages()
        assert msg.event == _uffd.EVENT_PAGEFAULT and msg.a & _uffd.PAGEFAULT_FLAG_MINOR and msg.b == base + PAGE
        assert u.continue_(base + PAGE, PAGE) == PAGE
        assert vcpu.result() == data[PAGE:2 * PAGE]
        with pytest.raises(_uffd.UffdError) as caught:
            u.continue_(base, 4 * PAGE)  # page 1 is mapped now
        assert caught.value.errno == errno.EAGAIN and caught.value.done == PAGE
        assert "UFFDIO_CONTINUE" in str(caught.value)
        with pytest.raises(_uffd.UffdError) as caught:
            u.continue_(base + 6 * PAGE, PAGE)
        assert caught.value.errno == errno.EFAULT and caught.value.done == 0
        with pytest.raises(_uffd.UffdError) as caught:
            u.continue_(base + 2 * PAGE + 8, PAGE)
        assert caught.value.errno == errno.EINVAL and caught.value.done == 0
        assert u.continue_(base + 2 * PAGE, 4 * PAGE, 0) == 4 * PAGE
        assert Vcpu(base + 2 * PAGE, 4 * PAGE).result() == data[2 * PAGE:]
    finally:
        os.close(uffd)
        os.close(fd)


def test_poison_fails_the_faulting_access(guest):
    g = guest()
    vcpu = Vcpu(g.page(4))
    g.wait_for_faults(1)
    g.uffd.read_messages()
    try:
        assert g.uffd.poison(g.page(4), PAGE) == PAGE  # and wakes the thread
    except _uffd.UffdError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTTY):
            pytest.skip(f"no UFFDIO_POISON in this kernel (Linux 6.6+): {exc}")
        raise
    assert vcpu.result() == errno.EFAULT  # a vCPU's own read gets SIGBUS (test_uffd_failures)
    assert Vcpu(g.page(4)).result() == errno.EFAULT  # and so does every later access
    with pytest.raises(_uffd.UffdError) as caught:
        g.uffd.poison(g.page(5) + 8, PAGE)
    assert caught.value.errno == errno.EINVAL and caught.value.done == 0 and "UFFDIO_POISON" in str(caught.value)
    assert g.uffd.poison(g.page(6), 2 * PAGE) == 2 * PAGE


def test_messages_are_read_at_most_a_buffer_at_a_time_and_none_is_lost(guest):
    """More faults queued than one read can return (``capacity``): a read returns a
    full buffer, the next the rest, each message whole and in place."""
    g = guest(pages=80)
    count = g.uffd.capacity + 6
    vcpus = [Vcpu(g.page(n)) for n in range(count)]
    g.wait_for_faults(count)
    first = g.uffd.read_messages()
    second = g.uffd.read_messages()
    assert len(first) == g.uffd.capacity and len(second) == 6 and g.uffd.read_messages() == []
    assert sorted(m.b for m in first + second) == [g.page(n) for n in range(count)]
    assert {m.event for m in first + second} == {_uffd.EVENT_PAGEFAULT}
    assert g.uffd.zeropage(g.base, count * PAGE) == count * PAGE
    assert [v.result() for v in vcpus] == [bytes(PAGE)] * count


# ------------------------------------------------------------------ unavailable()
_SCRIPT = r"""
import importlib.util, json, os, resource, sys
spec = importlib.util.spec_from_file_location("_uffd", sys.argv[1])
u = importlib.util.module_from_spec(spec)
spec.loader.exec_module(u)
if sys.argv[2] == "nobody":  # (dropped here: the interpreter may be where that user cannot run it)
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
out = {"euid": os.geteuid(), "plain": u.unavailable()}
if sys.argv[2] == "limits":
    os.close(0)  # the lowest free descriptor is 0 now: a valid one
    fd = u.userfaultfd()
    out["fd"], out["is_uffd"] = fd, u.is_userfaultfd(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1, 1))  # descriptor 0 taken: no room for one more
    out["plain_no_fds"] = u.unavailable()
    out["poison_no_fds"] = u.unavailable(u.FEATURE_POISON)
    try:
        u.userfaultfd()
    except OSError as exc:
        out["error"] = [exc.errno, str(exc)]
print(json.dumps(out))
"""


def _run_script(mode: str, **kw) -> dict:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, _uffd.__file__, mode], capture_output=True,
                          text=True, timeout=30, **kw)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_unavailable_says_none_where_userfaultfd_works():
    assert _uffd.unavailable() is None
    fd = _uffd.userfaultfd()
    try:
        granted, _ = _uffd.api(fd, 0)
    finally:
        os.close(fd)
    for bit in (_uffd.FEATURE_MINOR_SHMEM, _uffd.FEATURE_POISON):
        assert (_uffd.unavailable(bit) is None) == bool(granted & bit)


def test_unavailable_asks_the_kernel_for_no_feature(monkeypatch):
    """Its handshake asks for nothing and reads what the kernel has (asking for a
    feature a kernel lacks would fail the handshake instead of naming the feature)."""
    asked: list[int] = []
    real = _uffd.api

    def api(fd: int, features: int = 0) -> tuple[int, int]:
        asked.append(features)
        return real(fd, features)

    monkeypatch.setattr(_uffd, "api", api)
    _uffd.unavailable(_uffd.FEATURE_MINOR_SHMEM | _uffd.FEATURE_POISON)
    assert asked == [0]


def test_unavailable_without_a_free_descriptor():
    """Asked for nothing it opens no descriptor (so it says None even then); asked
    for a feature it must make a userfaultfd, and says why it cannot.  Descriptor 0
    is a userfaultfd like any other."""
    out = _run_script("limits")
    assert out["plain"] is None and out["fd"] == 0 and out["is_uffd"]
    assert out["plain_no_fds"] is None
    assert out["error"] == [errno.EMFILE, f"[Errno {errno.EMFILE}] userfaultfd: {os.strerror(errno.EMFILE)}"]
    assert out["poison_no_fds"] == f"userfaultfd: {os.strerror(errno.EMFILE)}"


def test_unavailable_to_a_user_without_the_sysctl():
    """Not root: userfaultfd needs vm.unprivileged_userfaultfd=1 (this daemon asks
    for no user-mode-only descriptor)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        allowed = f.read().strip() == "1"
    out = _run_script("nobody")
    assert out["euid"] == 65534
    assert out["plain"] == (None if allowed else "userfaultfd needs root or vm.unprivileged_userfaultfd=1")


def test_unavailable_when_the_handshake_is_refused(monkeypatch):
    """UFFDIO_API refused (a kernel or seccomp filter that says no; simulated: no
    kernel here refuses it): the reason names the ioctl."""
    def refuse(fd: int, features: int = 0) -> tuple[int, int]:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(_uffd, "api", refuse)
    assert _uffd.unavailable(_uffd.FEATURE_POISON) == f"UFFDIO_API: {os.strerror(errno.EINVAL)}"
    assert _uffd.unavailable() is None  # asked for nothing: no handshake made
