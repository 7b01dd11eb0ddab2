"""The incremental capture path (shadow + dirty chunks) stores exactly what a full
read would: checked chunk by chunk against a from-scratch chunking of the same
memory, on real VMs, across a restore and a hibernation."""

from __future__ import annotations

import pytest

from torpor.snapshot import restore, snapshot
from torpor.store import ChunkStore
from torpor.vmm.capture import CHUNK, read_meta

pytestmark = pytest.mark.vm


def _full_chunks(paths, vm, snap_id):
    """Chunk the VM's shadow from scratch (no parent, no dirty list)."""
    assert read_meta(vm.files.shadow_meta).get("snapshot") == snap_id
    store = ChunkStore(paths.store)
    try:
        art, _ = store.put_file(vm.files.shadow, chunk_size=CHUNK)
    finally:
        store.close()
    return art


def test_dirty_path_matches_a_full_read(vms, tools_image, paths) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "100000", name="incr-src")
    first = snapshot(mgr, vm.id)
    assert first.timings["memory_dirty_path"] == 0.0  # nothing to be incremental on
    with mgr.client(vm) as c:
        c.exec(["sh", "-c", "head -c 3000000 /dev/urandom > /dev/shm/blob"])
    second = snapshot(mgr, vm.id)
    assert second.timings["memory_dirty_path"] == 1.0
    assert second.manifest.parent == first.manifest.id
    assert second.manifest.artifacts["memory"] == _full_chunks(paths, vm, second.manifest.id)
    # a restored VM's first capture is incremental too (its shadow came with it)
    vm2 = restore(mgr, second.manifest.id, name="incr-dst")
    vms.ids.append(vm2.id)
    with mgr.client(vm2) as c:
        c.exec(["sh", "-c", "echo more > /dev/shm/more"])
    third = snapshot(mgr, vm2.id)
    assert third.timings["memory_dirty_path"] == 1.0
    assert third.manifest.artifacts["memory"] == _full_chunks(paths, vm2, third.manifest.id)
    used = sum(1 for h in third.manifest.artifacts["memory"].chunks if h)
    assert third.timings["memory_chunks_changed"] < used / 2  # only those were read
    # hibernation frees the shadow; the resumed VM gets a fresh one, still incremental
    snapshot(mgr, vm2.id, stop=True)
    assert not vm2.files.shadow.exists()
    mgr.start(vm2.id)
    vm2 = mgr.get(vm2.id)
    with mgr.client(vm2) as c:
        assert c.exec(["cat", "/dev/shm/more"]).stdout == b"more\n"
    fourth = snapshot(mgr, vm2.id)
    assert fourth.timings["memory_dirty_path"] == 1.0
    assert fourth.manifest.artifacts["memory"] == _full_chunks(paths, vm2, fourth.manifest.id)
