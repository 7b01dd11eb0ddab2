"""A capture whose QEMU monitor is unavailable fails fast and clearly, and the VM runs on.

QEMU serves one QMP client per monitor: while another client holds it, a new one
connects but never gets the greeting.  The capture used to wait for it forever —
the shim stayed "capturing" and ``snapshot`` gave up after 120 s saying the VM had
ended (it had not; CI saw it once, in the session property test).  Now every QMP
wait is bounded and the error names the step.
"""

from __future__ import annotations

import pytest

from torpor.errors import TorporError
from torpor.snapshot import snapshot
from torpor.vmm.sockets import connect_unix

pytestmark = pytest.mark.vm


def test_capture_with_the_monitor_held_fails_naming_it(vms, tools_image) -> None:
    vm = vms.run(tools_image, "sleep", "100000")
    holder = connect_unix(vm.files.qmp_sock, timeout=10)  # handles long socket paths
    assert b"QMP" in holder.recv(4096)  # we hold the monitor now
    try:
        with pytest.raises(TorporError) as ei:
            snapshot(vms.mgr, vm.id)
        assert "QMP handshake timed out" in str(ei.value), str(ei.value)
    finally:
        holder.close()
    # the monitor is free again: the VM was never paused and a snapshot now works
    with vms.mgr.client(vms.mgr.get(vm.id)) as c:
        assert c.exec(["true"], timeout=60).code == 0
    assert snapshot(vms.mgr, vm.id).manifest.id
