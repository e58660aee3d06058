"""A layer made from a REAL Firecracker diff snapshot is byte-exact against the full
snapshot of the same paused VM (workloads/firecracker_diff.sh: Full snapshot = parent,
resume, pause, Diff snapshot, then Full snapshot = the reference).

Skipped only for what is checked before anything runs (no usable KVM, a missing tool,
no Firecracker binary); past that, a failed snapshot fails the test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from store_reference import assemble

from bench._firecracker import SHARED, fetch_firecracker, firecracker_binary, firecracker_unavailable
from loader.checkpoint._raw import data_extents
from loader.store._access import open_store
from loader.store._write import create_snapshot, read_manifest

pytestmark = [
    pytest.mark.skipif(firecracker_unavailable() is not None, reason=str(firecracker_unavailable())),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("curl", "gcc", "ld")),
                       reason="needs curl, gcc and ld (the script builds the guest and drives the API)"),
]

SCRIPT = Path(__file__).resolve().parent.parent / "workloads" / "firecracker_diff.sh"


@pytest.fixture(scope="module")
def diff_snapshot(tmp_path_factory):
    binary = firecracker_binary()
    if not binary.exists():
        why = fetch_firecracker(binary)
        if why is not None:
            pytest.skip(why)
    work = tmp_path_factory.mktemp("fcdiff")
    r = subprocess.run(["bash", str(SCRIPT), str(work)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, FIRECRACKER=str(binary), FIRECRACKER_KIT=str(SHARED)))
    assert r.returncode == 0, r.stdout + r.stderr
    return work


def test_a_layer_from_a_real_diff_snapshot_equals_the_full_snapshot(diff_snapshot, tmp_path):
    base, diff, full = (str(diff_snapshot / f"{n}.mem") for n in ("base", "diff", "full"))
    with open(base, "rb") as f:
        base_bytes = f.read()
    with open(full, "rb") as f:
        full_bytes = f.read()
    assert base_bytes != full_bytes  # the guest ran between the two snapshots
    fd = os.open(diff, os.O_RDONLY)
    try:
        dirtied = data_extents(fd, os.fstat(fd).st_size, 4096)
    finally:
        os.close(fd)
    assert dirtied and sum(e - s for s, e in dirtied) < len(full_bytes) // 4  # a sparse diff, not a full image
    store = open_store(str(tmp_path / "st"), create=True)
    create_snapshot(base, store, "base")
    report = create_snapshot(diff, store, "child", parent="base")
    assert assemble(store, "child") == full_bytes
    pm, _ = read_manifest(store, "base")
    cm, _ = read_manifest(store, "child")
    dirty_chunks = {off // cm.chunk_size * cm.chunk_size for s, e in dirtied for off in range(s, e, 4096)}
    parent = {pm.offsets[i]: pm.hash_at(i) for i in range(len(pm))}
    child = {cm.offsets[i]: cm.hash_at(i) for i in range(len(cm))}
    assert {o: h for o, h in child.items() if o not in dirty_chunks} == {
        o: h for o, h in parent.items() if o not in dirty_chunks}
    assert report.inherited_chunks == len(parent.keys() - dirty_chunks)
