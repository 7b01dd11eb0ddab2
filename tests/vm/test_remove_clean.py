"""``remove --force`` of a running VM leaves nothing behind: no process, no folder,
no RAM or shadow file, no cgroup (a jailed QEMU's memory/cpu/pids groups were left
for the sweep of a later start, up to 2 minutes, before)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torpor.snapshot import restore, snapshot
from torpor.vmm import jail
from torpor.vmm.state import alive

pytestmark = pytest.mark.vm


def _cgroups(vm) -> list[str]:
    return list((jail.describe(vm.dir).get("cgroup") or {}).get("dirs") or [])


@pytest.mark.skipif(os.geteuid() != 0, reason="the jail (and its cgroups) needs root")
def test_remove_force_leaves_no_process_folder_or_cgroup(vms, tools_image, paths) -> None:
    mgr = vms.mgr
    src = vms.run(tools_image, "sleep", "1000", name="rm-src")
    snap = snapshot(mgr, src.id).manifest.id
    # one booted VM (its own RAM file) and one restored (over the snapshot's base)
    restored = restore(mgr, snap, name="rm-restored")
    vms.ids.append(restored.id)
    for vm in (src, restored):
        vm = mgr.get(vm.id)
        with mgr.client(vm) as c:
            assert c.exec(["true"]).status.code == 0
        st = vm.state
        groups = _cgroups(vm)
        assert groups and all(Path(g).is_dir() for g in groups)
        files = (vm.dir, vm.files.ram, vm.files.shadow)
        mgr.remove(vm.id, force=True)
        assert not alive(st.qemu_pid, st.qemu_start)
        assert not alive(st.shim_pid, st.shim_start)
        assert [str(p) for p in files if p.exists()] == []
        assert [g for g in groups if Path(g).exists()] == []
        assert not (paths.locks / f"vm-{vm.id}.lock").exists()
