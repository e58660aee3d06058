"""The answers both userfaultfd modes make (loader/uffd/_answer.py), driven with a
fake ioctl object that records each call and answers with chosen errnos: every
outcome a kernel can give, in a millisecond, without a userfaultfd.  (The same
code against a real userfaultfd: tests/test_uffd_answers.py, test_uffd_minor.py.)"""

from __future__ import annotations

import errno
import logging
import os

import pytest

from loader.uffd._answer import GONE, Answerer
from loader.uffd._ioctl import UffdError

PAGE = 4096
VA = 0x7F00_0000_0000
SRC = 0x5500_0000_0000


class FakeIoctl:
    """Records ``(name, args)`` per call; answers from ``script`` in order: a number
    (bytes done) or ``(errno, done)`` (raised as :class:`UffdError` with those bytes
    done).  An empty script means every call succeeds whole."""

    def __init__(self, *script: int | tuple[int, int]) -> None:
        self.script = list(script)
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def _answer(self, name: str, *args: int) -> int:
        self.calls.append((name, args))
        if not self.script:
            return args[-1] if name == "copy" else args[1]
        step = self.script.pop(0)
        if isinstance(step, tuple):
            err, done = step
            raise UffdError(err, f"UFFDIO_{name.upper()}", done)
        return step

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        return self._answer("copy", dst, src, length)

    def zeropage(self, dst: int, length: int, mode: int = 0) -> int:
        return self._answer("zeropage", dst, length)

    def continue_(self, dst: int, length: int, mode: int = 0) -> int:
        return self._answer("continue", dst, length)

    def poison(self, dst: int, length: int) -> int:
        return self._answer("poison", dst, length)

    def wake(self, start: int, length: int) -> None:
        self.calls.append(("wake", (start, length)))
        if self.script:
            err, _ = self.script.pop(0)  # type: ignore[misc]
            raise OSError(err, "UFFDIO_WAKE")


class Owner:
    def __init__(self) -> None:
        self.told: list[str] = []

    @property
    def gone(self) -> bool:
        return bool(self.told)

    def vanished(self, why: str) -> None:
        self.told.append(why)


def answerer(*script: int | tuple[int, int]) -> tuple[Answerer, FakeIoctl, Owner]:
    fake, owner = FakeIoctl(*script), Owner()
    return Answerer(fake, owner), fake, owner


def test_a_whole_copy_is_one_ioctl():
    a, fake, owner = answerer()
    assert a.copy(VA, SRC, 4 * PAGE, PAGE) == 0
    assert fake.calls == [("copy", (VA, SRC, 4 * PAGE))]
    assert (a.counts.copies, a.counts.copied_bytes) == (1, 4 * PAGE) and not owner.told


def test_a_copy_that_stops_at_a_page_already_there_goes_on_after_it():
    """The kernel says EAGAIN with the bytes done when it stops at a page already
    there: progress, not a changing mapping; that page then says EEXIST and is
    skipped; the rest is copied, and the answer is EEXIST (wake the thread)."""
    a, fake, _ = answerer((errno.EAGAIN, 2 * PAGE), (errno.EEXIST, 0), PAGE)
    assert a.copy(VA, SRC, 4 * PAGE, PAGE) == errno.EEXIST
    assert fake.calls == [("copy", (VA, SRC, 4 * PAGE)), ("copy", (VA + 2 * PAGE, SRC + 2 * PAGE, 2 * PAGE)),
                          ("copy", (VA + 3 * PAGE, SRC + 3 * PAGE, PAGE))]
    c = a.counts
    assert (c.copies, c.copied_bytes, c.eexist, c.eagain) == (3, 3 * PAGE, 1, 0)


@pytest.mark.parametrize("err", [errno.EAGAIN, errno.EFAULT])
def test_a_copy_that_cannot_go_on_says_how_far_it_got(err):
    """EAGAIN with nothing done (the mapping is changing) and EFAULT (the source
    cannot be read) end the copy; ``copied`` says how much was done before."""
    a, fake, _ = answerer((errno.EAGAIN, 2 * PAGE), (err, 0))
    assert a.copy(VA, SRC, 4 * PAGE, PAGE) == err
    assert a.copied == 2 * PAGE and len(fake.calls) == 2
    assert (a.counts.eagain, a.counts.efault) == ((1, 0) if err == errno.EAGAIN else (0, 1))


@pytest.mark.parametrize("err", [errno.ESRCH, errno.ENOENT])
def test_a_vmm_gone_ends_every_copy_and_its_owner_is_told(err):
    a, fake, owner = answerer((err, 0))
    assert a.copy(VA, SRC, 4 * PAGE, PAGE) == 0
    assert len(owner.told) == 1 and len(fake.calls) == 1
    assert owner.told == [f"UFFDIO_COPY: {os.strerror(err)}"]  # the ioctl and its reason, not the exception's repr
    assert a.copy(VA, SRC, PAGE, PAGE) == 0 and len(fake.calls) == 1  # nothing more is tried


def test_an_unexpected_copy_error_is_logged_and_that_page_skipped(caplog):
    a, fake, owner = answerer((errno.EINVAL, 0), PAGE)
    with caplog.at_level(logging.WARNING, logger="pageload"):
        assert a.copy(VA, SRC, 2 * PAGE, PAGE) == 0
    assert f"uffd: copy to {VA:#x}:" in caplog.text
    assert fake.calls[1] == ("copy", (VA + PAGE, SRC + PAGE, PAGE)) and not owner.told


def test_a_huge_page_copy_counts_whole_pages_only():
    """A partial copy's bytes done are rounded down to the region's page size."""
    huge = 4 * PAGE
    a, fake, _ = answerer((errno.EAGAIN, huge + PAGE), huge)
    assert a.copy(VA, SRC, 2 * huge, huge) == 0
    assert fake.calls[1] == ("copy", (VA + huge, SRC + huge, huge))


@pytest.mark.parametrize(("call", "name"), [("zero", "zeropage"), ("continue_", "continue"), ("poison", "poison")])
@pytest.mark.parametrize(("err", "outcome"), [(None, 0), (errno.EEXIST, errno.EEXIST), (errno.EAGAIN, errno.EAGAIN),
                                              (errno.EFAULT, errno.EFAULT), (errno.ESRCH, GONE),
                                              (errno.ENOENT, GONE), (errno.EINVAL, errno.EINVAL)])
def test_each_range_ioctl_turns_its_errno_into_an_outcome(call, name, err, outcome):
    a, fake, owner = answerer(*([] if err is None else [(err, 0)]))
    assert getattr(a, call)(VA, PAGE) == outcome
    assert fake.calls == [(name, (VA, PAGE))]
    assert bool(owner.told) == (outcome == GONE)
    assert (a.error is not None and a.error.errno == err) == (outcome not in (0, GONE))


def test_a_zero_page_without_a_zeropage_ioctl_is_a_copy_from_a_zero_source():
    a, fake, _ = answerer()
    assert a.zero(VA, 4 * PAGE, src=SRC) == 0
    assert fake.calls == [("copy", (VA, SRC, 4 * PAGE))]


def test_a_continue_says_how_much_it_mapped():
    a, _, _ = answerer(2 * PAGE)
    assert a.continue_(VA, 2 * PAGE) == 0 and a.copied == 2 * PAGE
    a, _, _ = answerer((errno.EAGAIN, PAGE))
    assert a.continue_(VA, 4 * PAGE) == errno.EAGAIN and a.copied == PAGE


def test_a_wake_that_fails_is_harmless():
    a, fake, owner = answerer((errno.EINVAL, 0))
    a.wake(VA, PAGE)
    assert fake.calls == [("wake", (VA, PAGE))] and not owner.told


def test_each_answer_is_recorded_with_its_latency():
    a, _, _ = answerer()
    a.record(0)
    a.record(0)
    assert a.histogram.count == 2 and a.counts.blocked_ns > 0
