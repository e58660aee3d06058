"""The fault thread (docs/UFFD.md "Threads", "Spinning", "Events"): it owns the
userfaultfd, blocks in ``poll`` on it and on the wake-up eventfd (the GIL
released), keeps looking at it without sleeping for ``spin_s`` after a fault, reads
every queued message under the copy lock (removals recorded before any fault of the
batch is answered) and hands each fault to :class:`._faults.Decisions`."""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import select
import struct
import time

from . import _ioctl
from ._config import UffdConfig
from ._faults import Decisions
from ._shared import Guest, Shared, TrioSide
from ._state import VANISH, HandlerState

log = logging.getLogger("pageload")

_ADDRESS = struct.Struct("=Q")  # uffd_msg.arg.pagefault.address, at byte 16
_MSGS_PER_READ = 64


class FaultThread:
    """The fault thread's loop (:meth:`main`) and its reading of messages
    (:meth:`read_ready`); what it decides per fault is :attr:`decide`'s."""

    def __init__(self, config: UffdConfig, state: HandlerState, shared: Shared, guest: Guest,
                 decide: Decisions, uffd: _ioctl.Uffd, trio_side: TrioSide) -> None:
        self.config = config
        self.state = state
        self.shared = shared
        self.guest = guest
        self.decide = decide
        self.counts = decide.counts
        self.uffd = uffd  #: the fault thread's (the one its answerer makes the ioctls with)
        self.trio_side = trio_side
        self._msg_buf = bytearray(_ioctl.MSG_SIZE * _MSGS_PER_READ)  # its reads
        self._msg_bufs = [self._msg_buf]
        self._ignored: set[int] = set()  # unknown events logged once

    def main(self) -> None:
        decide = self.decide
        answerer = decide.answerer
        disk = decide.disk
        shared = self.shared
        state = self.state
        fd = self.uffd.fd
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(shared.wake_fd, select.POLLIN)
        spin_ns = int(self.config.spin_s * 1e9)
        clock = time.perf_counter_ns
        spin_poll = select.poll()  # the userfaultfd alone: poll(0) is the cheapest look (0.6 us, no exception)
        spin_poll.register(fd, select.POLLIN)
        try:
            while not state.gone:
                if answerer.retry:
                    timeout = 1
                elif disk.out:
                    timeout = disk.timeout_ms()
                else:
                    timeout = -1
                spun = False
                if spin_ns and timeout < 0:
                    # just after a fault: keep looking at the userfaultfd (without
                    # sleeping) for a while, so the next fault of a burst is read at once,
                    # not after the kernel has woken this thread; a wake-up from another
                    # thread (``woken``) ends it
                    until = self.guest.last_fault_ns + spin_ns
                    while not shared.woken and not state.gone and clock() < until:
                        if spin_poll.poll(0) and self.read_ready():
                            self.counts.spin_reads += 1
                            spun = True
                            break
                if not spun:
                    # the GIL is released while blocked here; each syscall after it takes the
                    # GIL again, which can wait for another thread's switch interval: so only
                    # the descriptors poll reported are read
                    uffd_ready = False
                    for pfd, _ in poller.poll(timeout):
                        if pfd == shared.wake_fd:
                            shared.woken = False
                            try:
                                os.eventfd_read(shared.wake_fd)
                            except BlockingIOError:
                                pass
                        else:
                            uffd_ready = True
                    if uffd_ready:
                        self.read_ready()
                if answerer.retry:
                    retry, answerer.retry = answerer.retry, []
                    for address, start in retry:
                        decide._fault(address, start)
                if disk.out:
                    decide.take_disk_reads()
                decide.take_answers()
                if shared.want_sync:
                    shared.want_sync = False
                    shared.call_trio(self.trio_side._set_synced)
                if decide.deferred and state.filled:  # eager mode: the held faults, now that all is in
                    deferred, decide.deferred = decide.deferred, []
                    for address, start in deferred:
                        decide._fault(address, start)
                if state.stopping:
                    break
            if disk.out and not state.gone:  # stopping: never leave a fault unanswered
                disk.expire_all()  # past its deadline
                decide.take_disk_reads(stopping=True)
        except Exception:
            log.exception("uffd: the fault thread failed")
            state.advance(VANISH)
        finally:
            shared.fill_kick.set()
            shared.call_trio(self.trio_side._set_finished)

    def read_ready(self) -> bool:
        """Handle every message queued now (non-blocking); False when there was none.
        Removals come first, so a fault read in the same batch never copies into a
        range being removed.

        This is the fault's hot path: it reads the raw messages into one reused
        buffer and looks only at their event byte and the fault's address (a woken
        thread runs with cold caches, so every line here costs several times what a
        warm loop would)."""
        fd = self.uffd.fd
        buf = self._msg_buf
        size = _ioctl.MSG_SIZE
        read = False
        state = self.state
        guest = self.guest
        fault = self.decide._fault
        while not state.gone:
            guest.want_read = True
            with guest.copy_lock:
                guest.want_read = False
                try:
                    n = os.readv(fd, self._msg_bufs)
                except BlockingIOError:
                    return read
                except OSError as exc:
                    if exc.errno not in (errno_mod.EBADF,):
                        log.warning("uffd: reading events: %s", exc)
                    state.advance(VANISH)
                    return read
                n -= n % size
                faults_only = True
                for off in range(0, n, size):
                    event = buf[off]
                    if event != _ioctl.EVENT_PAGEFAULT:
                        faults_only = False
                        if event == _ioctl.EVENT_REMOVE or event == _ioctl.EVENT_UNMAP:
                            if event == _ioctl.EVENT_REMOVE:
                                self.counts.remove += 1
                            else:
                                self.counts.unmap += 1
                            _, _, _, _, a, b, _ = _ioctl.MSG_STRUCT.unpack_from(buf, off)
                            guest.remove(a, b)
            if not n:
                return read
            read = True
            now = time.perf_counter_ns()
            guest.last_fault_ns = now
            for off in range(0, n, size):
                if faults_only or buf[off] == _ioctl.EVENT_PAGEFAULT:
                    self.counts.faults += 1
                    fault(_ADDRESS.unpack_from(buf, off + 16)[0], now)
                    continue
                event, _, _, _, a, b, c = _ioctl.MSG_STRUCT.unpack_from(buf, off)
                if event == _ioctl.EVENT_REMAP:
                    self.counts.remap += 1
                    guest.remap(a, b, c)
                    self.decide.fast = self.decide.fast_region()
                elif event == _ioctl.EVENT_FORK:
                    _ioctl.close_forked(a)
                    self.counts.fork += 1
                    if self.counts.fork == 1:
                        log.warning("uffd: the VMM forked (UFFD_EVENT_FORK): the child's userfaultfd is closed, "
                                    "its copy of guest memory is not served (said once; counted as events.fork)")
                elif event not in (_ioctl.EVENT_REMOVE, _ioctl.EVENT_UNMAP) and event not in self._ignored:
                    self._ignored.add(event)
                    log.warning("uffd: ignoring event %#x (said once)", event)
            if n < len(buf):  # the buffer was not filled: nothing more is queued
                return True
        return read
