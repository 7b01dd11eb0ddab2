"""The first snapshot of a VM (no shadow, no parent: every touched chunk is hashed,
compressed and written, on the store's parallel path) on real VMs: what it stores is
exactly guest RAM at the pause, holes and zero pages included; and a ``kill -9`` in
the middle of its chunk writes lists nothing, leaves the VM running and the store
clean, and the next snapshot succeeds."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest

from torpor.failpoints import ENV as FAILPOINTS_ENV
from torpor.snapshot import restore, snapshot
from torpor.store import ChunkStore
from torpor.vmm.capture import CHUNK, read_meta

pytestmark = pytest.mark.vm

SNAPSHOT_IN_CHILD = """
import sys
from torpor.paths import Paths
from torpor.snapshot import snapshot
from torpor.vmm.manager import VMManager
snapshot(VMManager(Paths.default()), sys.argv[1])
"""

# 6 MB of random data and 6 MB of zeros in the guest's tmpfs: data chunks, chunks
# that hold data extents but only zero bytes, and holes (never touched)
FILL = (
    "head -c 6000000 /dev/urandom > /dev/shm/rand; head -c 6000000 /dev/zero > /dev/shm/zero; "
    "md5sum /dev/shm/rand /dev/shm/zero"
)


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def test_first_snapshot_of_sparse_memory_restores_byte_for_byte(vms, tools_image, paths, tmp_path):
    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "100000", name="first-src")
    with mgr.client(vm) as c:
        sums = c.exec(["sh", "-c", FILL]).stdout
    # the guest keeps writing while it is captured: the client's speculative put of
    # its pre-copy races those writes, and only the chunks the pause found changed
    # are read again (torpor.snapshot.core._start_first_put)
    churn = "while :; do head -c 1048576 /dev/urandom > /dev/shm/churn; done"
    with mgr.client(vm) as c:
        c.exec(["sh", "-c", f"({churn}) >/dev/null 2>&1 &"])
    r = snapshot(mgr, vm.id)
    assert r.manifest.parent is None and r.timings["memory_dirty_path"] == 0.0
    assert r.timings.get("memory_overlap") == 1.0, r.timings
    assert r.timings["memory_chunks_reread"] > 0
    mem = r.manifest.artifacts["memory"]
    assert mem.chunk_size == CHUNK
    assert None in mem.chunks and sum(1 for h in mem.chunks if h) > 100  # sparse, and data
    # the store's memory artifact, materialized, is the shadow (guest RAM at the pause)
    # byte for byte, and so is every chunk hash against a plain serial hashing of it
    vm = mgr.get(vm.id)
    assert read_meta(vm.files.shadow_meta).get("snapshot") == r.manifest.id
    assert stat.S_IMODE(os.stat(vm.files.shadow).st_mode) == 0o600  # guest memory: private
    store = ChunkStore(paths.store)
    try:
        store.materialize(mem, tmp_path / "memory", durable=False)
        assert store.check_file(mem, vm.files.shadow) == []
        # its new chunks went into local packs (one fdatasync a pack, not one a chunk)
        assert any(store._packs.get(h) for h in mem.chunks if h)
    finally:
        store.close()
    assert _sha(tmp_path / "memory") == _sha(vm.files.shadow)
    # and a cold restore (from the chunks only) runs with the guest's data intact
    back = restore(mgr, r.manifest.id, name="first-cold", cold=True)
    vms.ids.append(back.id)
    with mgr.client(back) as c:
        assert c.exec(["md5sum", "/dev/shm/rand", "/dev/shm/zero"]).stdout == sums


def test_kill9_in_the_middle_of_a_first_snapshot(vms, tools_image, paths) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "100000", name="first-kill")
    with mgr.client(vm) as c:
        sums = c.exec(["sh", "-c", FILL]).stdout
    before = {m.id for m in ChunkStore(paths.store).list()}
    # killed at the 40th chunk write of the memory artifact: other writes are in flight
    env = dict(os.environ, **{FAILPOINTS_ENV: "store.chunk_write=kill@40"})
    p = subprocess.run(
        [sys.executable, "-c", SNAPSHOT_IN_CHILD, vm.name],
        env=env,
        capture_output=True,
        timeout=180,
    )
    assert p.returncode == -9, p.stderr[-2000:]
    store = ChunkStore(paths.store)
    try:
        assert {m.id for m in store.list()} == before  # nothing listed
        v = store.verify()  # nothing half-written under a chunk's name
        assert v.ok and not v.corrupt, (v.corrupt, v.missing, v.bad_manifests)
    finally:
        store.close()
    vm = mgr.get(vm.id)
    assert vm.state.status == "running"
    with mgr.client(vm) as c:  # not left paused
        assert c.exec(["md5sum", "/dev/shm/rand", "/dev/shm/zero"]).stdout == sums
    # the next snapshot succeeds (the torn capture's shadow is not trusted as a base)
    r = snapshot(mgr, vm.id)
    assert r.manifest.parent is None and r.timings["memory_dirty_path"] == 0.0
    back = restore(mgr, r.manifest.id, name="first-kill-back", cold=True)
    vms.ids.append(back.id)
    with mgr.client(back) as c:
        assert c.exec(["md5sum", "/dev/shm/rand", "/dev/shm/zero"]).stdout == sums
