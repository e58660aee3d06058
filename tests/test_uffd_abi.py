"""loader.uffd._ioctl's struct layouts and ioctl numbers equal the kernel headers' (gcc)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from loader.uffd import _ioctl as _uffd

HEADER = "/usr/include/linux/userfaultfd.h"

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not os.path.exists(HEADER),
    reason="needs gcc and the kernel headers (linux/userfaultfd.h) to compile the layout probe",
)

PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>
#define S(t) printf(#t " %zu\n", sizeof(struct t));
#define O(t, f) printf(#t "." #f " %zu\n", offsetof(struct t, f));
#define C(n) printf(#n " %llu\n", (unsigned long long)(n));
int main(void) {
  S(uffdio_api) S(uffdio_range) S(uffdio_register) S(uffdio_copy) S(uffdio_zeropage)
  S(uffdio_continue) S(uffd_msg)
  O(uffdio_copy, dst) O(uffdio_copy, src) O(uffdio_copy, len) O(uffdio_copy, mode) O(uffdio_copy, copy)
  O(uffdio_zeropage, zeropage) O(uffdio_continue, mapped)
  O(uffdio_register, mode) O(uffdio_register, ioctls) O(uffdio_api, features) O(uffdio_api, ioctls)
  O(uffd_msg, event) O(uffd_msg, arg.pagefault.flags) O(uffd_msg, arg.pagefault.address)
  O(uffd_msg, arg.pagefault.feat.ptid) O(uffd_msg, arg.remap.from) O(uffd_msg, arg.remap.to)
  O(uffd_msg, arg.remap.len) O(uffd_msg, arg.remove.start) O(uffd_msg, arg.remove.end)
  C(UFFD_API) C(UFFDIO_API) C(UFFDIO_REGISTER) C(UFFDIO_UNREGISTER) C(UFFDIO_WAKE) C(UFFDIO_COPY)
  C(UFFDIO_ZEROPAGE) C(UFFDIO_CONTINUE)
  C(UFFD_EVENT_PAGEFAULT) C(UFFD_EVENT_FORK) C(UFFD_EVENT_REMAP) C(UFFD_EVENT_REMOVE) C(UFFD_EVENT_UNMAP)
  C(UFFD_PAGEFAULT_FLAG_WRITE) C(UFFD_PAGEFAULT_FLAG_WP) C(UFFD_PAGEFAULT_FLAG_MINOR)
  C(UFFD_FEATURE_EVENT_REMAP) C(UFFD_FEATURE_EVENT_REMOVE) C(UFFD_FEATURE_MISSING_HUGETLBFS)
  C(UFFD_FEATURE_MISSING_SHMEM) C(UFFD_FEATURE_EVENT_UNMAP) C(UFFD_FEATURE_SIGBUS) C(UFFD_FEATURE_THREAD_ID)
  C(UFFD_FEATURE_MINOR_HUGETLBFS) C(UFFD_FEATURE_MINOR_SHMEM)
  C(UFFDIO_REGISTER_MODE_MISSING) C(UFFDIO_REGISTER_MODE_WP) C(UFFDIO_REGISTER_MODE_MINOR)
  C(UFFDIO_COPY_MODE_DONTWAKE) C(UFFDIO_ZEROPAGE_MODE_DONTWAKE)
  C(UFFD_FEATURE_PAGEFAULT_FLAG_WP) C(UFFD_FEATURE_EVENT_FORK) C(__NR_userfaultfd)
#ifdef UFFD_USER_MODE_ONLY  /* 5.11 */
  C(UFFD_USER_MODE_ONLY)
#endif
#ifdef UFFD_FEATURE_EXACT_ADDRESS  /* 5.18 */
  C(UFFD_FEATURE_EXACT_ADDRESS)
#endif
#ifdef UFFD_FEATURE_POISON  /* headers before 6.6 lack it */
  S(uffdio_poison) O(uffdio_poison, updated) C(UFFDIO_POISON) C(UFFD_FEATURE_POISON)
#endif
  return 0;
}
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    d = tmp_path_factory.mktemp("abi")
    (d / "probe.c").write_text(PROBE)
    subprocess.run(["gcc", "-o", str(d / "probe"), str(d / "probe.c")], check=True, capture_output=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_struct_sizes(kernel):
    u = _uffd
    assert kernel["uffdio_api"] == u.API_STRUCT.size
    assert kernel["uffdio_range"] == u.RANGE_STRUCT.size
    assert kernel["uffdio_register"] == u.REGISTER_STRUCT.size
    assert kernel["uffdio_copy"] == u.COPY_STRUCT.size
    assert kernel["uffdio_zeropage"] == u.ZEROPAGE_STRUCT.size
    assert kernel["uffdio_continue"] == u.CONTINUE_STRUCT.size
    assert kernel["uffd_msg"] == u.MSG_SIZE


def test_field_offsets(kernel):
    # our packing: every field a u64 in order, except uffd_msg's 8-byte header
    expect = {
        "uffdio_copy.dst": 0, "uffdio_copy.src": 8, "uffdio_copy.len": 16, "uffdio_copy.mode": 24,
        "uffdio_copy.copy": 32, "uffdio_zeropage.zeropage": 24, "uffdio_continue.mapped": 24,
        "uffdio_register.mode": 16, "uffdio_register.ioctls": 24,
        "uffdio_api.features": 8, "uffdio_api.ioctls": 16, "uffd_msg.event": 0,
        "uffd_msg.arg.pagefault.flags": 8, "uffd_msg.arg.pagefault.address": 16,
        "uffd_msg.arg.pagefault.feat.ptid": 24, "uffd_msg.arg.remap.from": 8, "uffd_msg.arg.remap.to": 16,
        "uffd_msg.arg.remap.len": 24, "uffd_msg.arg.remove.start": 8, "uffd_msg.arg.remove.end": 16,
    }
    for name, offset in expect.items():
        assert kernel[name] == offset, name
    if "uffdio_poison" in kernel:  # only in headers of 6.6 and later
        assert kernel["uffdio_poison"] == _uffd.POISON_STRUCT.size
        assert kernel["uffdio_poison.updated"] == 24


def test_constants(kernel):
    u = _uffd
    pairs = {
        "UFFD_API": u.UFFD_API, "UFFDIO_API": u.UFFDIO_API, "UFFDIO_REGISTER": u.UFFDIO_REGISTER,
        "UFFDIO_UNREGISTER": u.UFFDIO_UNREGISTER, "UFFDIO_WAKE": u.UFFDIO_WAKE, "UFFDIO_COPY": u.UFFDIO_COPY,
        "UFFDIO_ZEROPAGE": u.UFFDIO_ZEROPAGE, "UFFDIO_CONTINUE": u.UFFDIO_CONTINUE,
"UFFD_EVENT_PAGEFAULT": u.EVENT_PAGEFAULT,
        "UFFD_EVENT_FORK": u.EVENT_FORK, "UFFD_EVENT_REMAP": u.EVENT_REMAP, "UFFD_EVENT_REMOVE": u.EVENT_REMOVE,
        "UFFD_EVENT_UNMAP": u.EVENT_UNMAP, "UFFD_PAGEFAULT_FLAG_WRITE": u.PAGEFAULT_FLAG_WRITE,
        "UFFD_PAGEFAULT_FLAG_WP": u.PAGEFAULT_FLAG_WP, "UFFD_PAGEFAULT_FLAG_MINOR": u.PAGEFAULT_FLAG_MINOR,
        "UFFD_FEATURE_EVENT_REMAP": u.FEATURE_EVENT_REMAP, "UFFD_FEATURE_EVENT_REMOVE": u.FEATURE_EVENT_REMOVE,
        "UFFD_FEATURE_MISSING_HUGETLBFS": u.FEATURE_MISSING_HUGETLBFS,
        "UFFD_FEATURE_MISSING_SHMEM": u.FEATURE_MISSING_SHMEM, "UFFD_FEATURE_EVENT_UNMAP": u.FEATURE_EVENT_UNMAP,
        "UFFD_FEATURE_SIGBUS": u.FEATURE_SIGBUS, "UFFD_FEATURE_THREAD_ID": u.FEATURE_THREAD_ID,
        "UFFD_FEATURE_MINOR_HUGETLBFS": u.FEATURE_MINOR_HUGETLBFS,
        "UFFD_FEATURE_MINOR_SHMEM": u.FEATURE_MINOR_SHMEM,
        "UFFDIO_REGISTER_MODE_MISSING": u.REGISTER_MODE_MISSING, "UFFDIO_REGISTER_MODE_WP": u.REGISTER_MODE_WP,
        "UFFDIO_REGISTER_MODE_MINOR": u.REGISTER_MODE_MINOR, "UFFDIO_COPY_MODE_DONTWAKE": u.COPY_MODE_DONTWAKE,
        "UFFDIO_ZEROPAGE_MODE_DONTWAKE": u.ZEROPAGE_MODE_DONTWAKE,
        "UFFD_FEATURE_PAGEFAULT_FLAG_WP": u.FEATURE_PAGEFAULT_FLAG_WP,
        "UFFD_FEATURE_EVENT_FORK": u.FEATURE_EVENT_FORK, "__NR_userfaultfd": u._NR_USERFAULTFD,
        "UFFD_USER_MODE_ONLY": u.UFFD_USER_MODE_ONLY, "UFFD_FEATURE_EXACT_ADDRESS": u.FEATURE_EXACT_ADDRESS,
        "UFFDIO_POISON": u.UFFDIO_POISON, "UFFD_FEATURE_POISON": u.FEATURE_POISON,
    }
    for name, value in pairs.items():
        assert kernel.get(name, LINUX_6_6.get(name)) == value, name


#: the values of Linux 6.6's <linux/userfaultfd.h> for what older headers lack
#: (UFFDIO_POISON: _IOWR(0xAA, 0x08, struct uffdio_poison), 32 bytes)
LINUX_6_6 = {"UFFDIO_POISON": (3 << 30) | (32 << 16) | (0xAA << 8) | 0x08, "UFFD_FEATURE_POISON": 1 << 14,
             "UFFD_USER_MODE_ONLY": 1, "UFFD_FEATURE_EXACT_ADDRESS": 1 << 11}


def test_unavailable_names_the_missing_feature(monkeypatch):
    """The one-line reason every uffd test, the bench and the skips use."""
    if _uffd.unavailable() is not None:
        pytest.skip(f"userfaultfd unusable here: {_uffd.unavailable()}")
    monkeypatch.setattr(_uffd, "api", lambda fd, features=0: (_uffd.FEATURE_MINOR_SHMEM, 0))
    assert _uffd.unavailable(_uffd.FEATURE_MINOR_SHMEM) is None
    why = _uffd.unavailable(_uffd.FEATURE_MINOR_SHMEM | _uffd.FEATURE_POISON)
    assert why == "the kernel lacks UFFD_FEATURE_POISON (needs Linux 6.6+)"
