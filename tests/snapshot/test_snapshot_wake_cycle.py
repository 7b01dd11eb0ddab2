"""A VM woken from hibernation is an ordinary VM again: stopping it keeps its disk."""

from __future__ import annotations

import time

import pytest

from torpor.snapshot import snapshot

pytestmark = pytest.mark.vm


def test_stop_after_wake_keeps_the_work(vms, tools_image) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "infinity", name="waker")
    with mgr.client(vm) as c:
        c.exec(["sh", "-c", "echo one > /root/a; sync"])
    snapshot(mgr, vm.id, stop=True)
    assert mgr.get(vm.id).state.status == "hibernated"
    vm = mgr.start(vm.id)  # wakes: restores the hibernation snapshot in place
    # the hard link to the cached RAM goes once it has seeded the VM's shadow
    for _ in range(300):
        if not (vm.dir / "ram.src").exists():
            break
        time.sleep(0.1)
    assert not (vm.dir / "ram.src").exists()
    with mgr.client(vm) as c:
        r = c.exec(["sh", "-c", "echo two > /root/b; sync"])
        assert r.status.code == 0, r.stderr
    vm = mgr.stop(vm.id, timeout=5)
    # a stop is a stop: no stale hibernation marker may turn it into one
    assert vm.state.status == "exited", vm.state.status
    assert not (vm.dir / "hibernate").exists()
    vm = mgr.start(vm.id)  # a cold boot from the same disk
    with mgr.client(vm) as c:
        r = c.exec(["cat", "/root/a", "/root/b"])
    assert r.stdout == b"one\ntwo\n", r.stderr


def test_a_start_racing_a_hibernation_waits_for_it(vms, tools_image) -> None:
    """A VM reads "hibernated" as soon as QEMU ended, while its memory is still moving
    to the snapshot cache; a start right then (an idle watcher hibernating while a user
    wakes) failed with "the cached memory ... changed during the restore"."""
    import threading
    import traceback

    from torpor.vmm.state import Status

    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "infinity", name="racer", memory_mib=512)
    with mgr.client(vm) as c:  # memory worth moving: the window is the copy
        c.exec(["sh", "-c", "head -c 200000000 /dev/urandom > /dev/shm/fill"], timeout=300)
    errors: list[BaseException] = []

    def hibernate() -> None:
        try:
            snapshot(mgr, vm.id, stop=True)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=hibernate)
    t.start()
    while mgr.get(vm.id).state.status != Status.HIBERNATED:
        assert t.is_alive() or errors == [], errors
        time.sleep(0.002)
    woke = mgr.start(vm.id)  # right inside the window
    t.join(300)
    assert errors == [], "".join(traceback.format_exception(errors[0]))
    with mgr.client(woke) as c:
        r = c.exec(["sh", "-c", "wc -c < /dev/shm/fill"])
    assert r.stdout.strip() == b"200000000"
