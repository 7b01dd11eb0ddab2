"""Snapshots of VMs whose guest RAM is mapped private (``share=off``, copy-on-write
over a base): their RAM file never shows what the guest wrote, so a capture must
read the written pages from QEMU itself (torpor.vmm.capture) — never the stale file."""

from __future__ import annotations

import dataclasses
import json

import pytest

from torpor.errors import VMError
from torpor.snapshot import snapshot
from torpor.snapshot.core import _store, place_snapshot
from torpor.vmm.manager import VM, RunRequest
from torpor.vmm.state import VMConfig, save_config

pytestmark = pytest.mark.vm


def restore_private(vms, snap_id: str, name: str) -> VM:
    """A restore of ``snap_id`` whose restore.json asks for RAM mapped private (the
    flag shared bases set), through the normal create / place / start path."""
    mgr = vms.mgr
    store = _store(mgr)
    try:
        m = store.get(snap_id)
        src = VMConfig.from_json(json.loads(m.meta["vm"]))
        vm = mgr.create(RunRequest.from_config(src, name, ()), overlay=False)
        vms.ids.append(vm.id)
        cfg = dataclasses.replace(vm.config, image_ref=src.image_ref, base_digest=src.base_digest)
        save_config(vm.dir, cfg)
        vm = VM(cfg, vm.state, vm.dir)
        place_snapshot(mgr, store, m, vm)
    finally:
        store.close()
    info = json.loads((vm.dir / "restore.json").read_text())
    (vm.dir / "restore.json").write_text(json.dumps(info | {"ram_private": True}))
    return mgr.start(vm.id)


def _ram_arg(vm: VM) -> str:
    argv = json.loads((vm.dir / "qemu.argv").read_text())
    return next(a for a in argv if a.startswith("memory-backend-file"))


def test_private_vm_is_never_captured_from_its_ram_file(vms, tools_image) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "100000", name="priv-src")
    snap = snapshot(mgr, vm.id)
    vm2 = restore_private(vms, snap.manifest.id, "priv-1")
    assert "share=off" in _ram_arg(vm2)
    with mgr.client(vm2) as c:
        c.exec(["sh", "-c", "echo after > /dev/shm/marker"])
    with pytest.raises(VMError, match="private"):
        snapshot(mgr, vm2.id)
    with mgr.client(vm2) as c:  # refused, and the guest runs on
        assert c.exec(["cat", "/dev/shm/marker"]).stdout == b"after\n"
