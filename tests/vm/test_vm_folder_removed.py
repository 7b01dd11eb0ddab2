"""A VM whose folder is deleted under it (``rm -rf`` of the VM or of the whole home,
as a test harness or an operator does) must not run on unmanaged: nothing can reach
or stop it any more.  Seen: six such VMs kept running after their homes were gone."""

from __future__ import annotations

import shutil
import time

import pytest

from torpor.vmm.state import alive

pytestmark = pytest.mark.vm


def test_vm_ends_when_its_folder_is_removed(vms, tools_image: str) -> None:
    vm = vms.run(tools_image, "sleep", "infinity", name="orphaned")
    st = vm.state
    assert alive(st.shim_pid, st.shim_start) and alive(st.qemu_pid, st.qemu_start)
    shutil.rmtree(vm.dir)
    deadline = time.monotonic() + 60  # a bound for a hang, not a timing target
    while time.monotonic() < deadline and (
        alive(st.shim_pid, st.shim_start) or alive(st.qemu_pid, st.qemu_start)
    ):
        time.sleep(0.2)
    assert not alive(st.qemu_pid, st.qemu_start), "QEMU runs on without its folder"
    assert not alive(st.shim_pid, st.shim_start), "the shim runs on without its folder"
