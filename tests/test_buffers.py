"""The daemon's own buffers (staging, scratch, the cache inserter's slots) are private
anonymous mappings: their pages count as anonymous memory, so the daemon's "RSS
outside the memory file" (``rssanon + rssfile``: its stats, its metrics, the bench's
goals) includes them.  Shared anonymous mappings count as shmem, with the memory
file's pages, and went uncounted: 30 MiB of a store restore's staging, once."""

from __future__ import annotations

import ast
import pathlib
import threading

from loader._memfile import BufferPool, private_mapping

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} not in /proc/self/status")


def test_a_private_mapping_counts_as_anonymous_memory_not_shmem() -> None:
    size = 16 << 20
    anon, shmem = _status("RssAnon"), _status("RssShmem")
    buffer = private_mapping(size)
    try:
        assert _status("RssAnon") - anon < 4 << 20  # untouched: costs nothing yet
        for at in range(0, size, 4096):
            buffer[at] = 1
        assert _status("RssAnon") - anon >= size - (2 << 20)
        assert _status("RssShmem") - shmem < 2 << 20
    finally:
        buffer.close()
    assert len(private_mapping(0)) == 1  # (mmap refuses 0 bytes)


def _shared_anonymous_maps(path: pathlib.Path) -> list[int]:
    """Lines of ``path`` calling ``mmap.mmap(-1, n)`` with no flags (MAP_SHARED)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "mmap"
                and node.args and isinstance(node.args[0], ast.UnaryOp) and isinstance(node.args[0].op, ast.USub)
                and len(node.args) < 3 and not any(k.arg in ("flags", "prot") for k in node.keywords)):
            lines.append(node.lineno)
    return lines


def test_the_daemon_makes_no_shared_anonymous_mapping() -> None:
    found = {}
    for package in ("loader", "aio", "protocol"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "testing.py":  # test tools: a fake memory file is shared on purpose
                continue
            if lines := _shared_anonymous_maps(path):
                found[str(path.relative_to(ROOT))] = lines
    assert not found, f"shared anonymous mappings (use loader._memfile.private_mapping): {found}"


def test_the_check_finds_a_shared_anonymous_mapping(tmp_path: pathlib.Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import mmap\na = mmap.mmap(-1, 4096)\nb = mmap.mmap(-1, 4096, mmap.MAP_PRIVATE)\n")
    assert _shared_anonymous_maps(sample) == [2]


def test_a_buffer_pool_makes_buffers_as_wanted_and_reuses_the_last_given_back() -> None:
    pool = BufferPool(8192, limit=2)
    a = pool.take()
    assert len(a) == 8192 and pool.made == 1
    pool.give(a)
    assert pool.take() is a and pool.made == 1  # reused, not made again
    b = pool.take()
    assert b is not a and pool.made == 2
    pool.give(b)
    pool.give(a)
    assert pool.take() is a  # the last given back first


def test_a_buffer_pool_at_its_limit_waits_for_one_given_back() -> None:
    pool = BufferPool(4096, limit=1)
    first = pool.take()
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(pool.take()))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got and pool.made == 1  # waits: no second buffer made
    pool.give(first)
    t.join(5)
    assert got == [first]


def test_a_buffer_pool_without_a_limit_makes_one_for_each_taken_at_once() -> None:
    pool = BufferPool(4096)
    taken = [pool.take() for _ in range(5)]
    assert pool.made == 5 and len({id(b) for b in taken}) == 5
    for b in taken:
        pool.give(b)
    with pool.held() as b:
        assert b is taken[-1]
    assert pool.made == 5
