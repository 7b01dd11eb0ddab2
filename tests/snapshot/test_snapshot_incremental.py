"""The incremental capture path (shadow + dirty chunks) stores exactly what a full
read would: checked chunk by chunk against a from-scratch chunking of the same
memory, on real VMs, across a restore and a hibernation."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from torpor.snapshot import restore, snapshot
from torpor.store import ChunkStore
from torpor.vmm import basemem, ramless
from torpor.vmm.capture import CHUNK, read_meta, sparse_copy

pytestmark = pytest.mark.vm


def _full_chunks(paths, vm, snap_id, base_snap: str | None = None):
    """Chunk the VM's shadow from scratch (no parent, no dirty list).  A VM whose RAM
    is private over a shared base (``base_snap``: torpor.vmm.basemem) has an overlay
    instead, whose holes stand for the base: a copy with the holes filled from it."""
    store = ChunkStore(paths.store)
    try:
        if base_snap is None:
            assert read_meta(vm.files.shadow_meta).get("snapshot") == snap_id
            art, _ = store.put_file(vm.files.shadow, chunk_size=CHUNK)
            return art
        overlay = ramless.overlay_of(vm.files.shadow)
        assert read_meta(overlay.with_name(overlay.name + ".json")).get("snapshot") == snap_id
        size = store.get(snap_id).artifacts["memory"].size
        with (
            tempfile.TemporaryDirectory(dir=overlay.parent) as d,
            basemem.connect(paths, base_snap, size) as base,
        ):
            full = Path(d) / "full"
            sparse_copy(overlay, full)
            ramless.fill_holes(full, Path(f"/proc/self/fd/{base.fd}"))
            art, _ = store.put_file(full, chunk_size=CHUNK)
            return art
    finally:
        store.close()


def _base_of(vm, restored_from: str) -> str | None:
    """The snapshot whose shared base ``vm`` maps (None: it has its own RAM file)."""
    return None if vm.files.ram.exists() else restored_from


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
    base = _base_of(vm2, second.manifest.id)
    assert third.manifest.artifacts["memory"] == _full_chunks(paths, vm2, third.manifest.id, base)
    used = sum(1 for h in third.manifest.artifacts["memory"].chunks if h)
    assert third.timings["memory_chunks_changed"] < used / 2  # only those were read
    # hibernation frees the shadow; the resumed VM gets a fresh one, still incremental
    hib = snapshot(mgr, vm2.id, stop=True).manifest.id
    assert not vm2.files.shadow.exists()
    mgr.start(vm2.id)
    vm2 = mgr.get(vm2.id)
    with mgr.client(vm2) as c:
        assert c.exec(["cat", "/dev/shm/more"]).stdout == b"more\n"
    fourth = snapshot(mgr, vm2.id)
    assert fourth.timings["memory_dirty_path"] == 1.0
    base = _base_of(vm2, hib)
    assert fourth.manifest.artifacts["memory"] == _full_chunks(paths, vm2, fourth.manifest.id, base)
