"""Bad cases on real VMs: kill -9 of torpor or QEMU mid-capture or mid-restore, a
full disk, forks' identities, and a store moved to another TORPOR_HOME.

After each failure the store must verify clean, list no partial snapshot, still
restore the earlier snapshots, and the VM must be running (not stuck paused) or
clearly ended.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.snapshot.counter import COUNTER, count
from torpor.errors import TorporError
from torpor.paths import Paths
from torpor.snapshot import fork, restore, snapshot
from torpor.store import ChunkStore
from torpor.vmm.manager import VMManager
from torpor.vmm.qcow2 import qcow2_backing

pytestmark = pytest.mark.vm


SNAPSHOT_IN_CHILD = """
import sys
from torpor.paths import Paths
from torpor.snapshot import snapshot
from torpor.vmm.manager import VMManager
snapshot(VMManager(Paths.default()), sys.argv[1], stop=sys.argv[2] == "stop")
"""


def _keeps_counting(mgr, vm) -> bool:
    """True once the guest's counter moves: the VM runs, it is not stuck paused."""
    n = count(mgr, vm)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if count(mgr, vm) > n:
            return True
    return False


def _manifest_ids(paths: Paths) -> set[str]:
    return {m.id for m in ChunkStore(paths.store).list()}


def _assert_store_clean(paths: Paths) -> None:
    r = ChunkStore(paths.store).verify()
    assert r.ok, (r.corrupt, r.missing, r.bad_manifests)


@pytest.mark.parametrize("stop", [False, True], ids=["running", "hibernate"])
def test_kill_torpor_at_each_capture_phase(vms, tools_image, paths, stop) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, *COUNTER, name=f"crashy-{int(stop)}")
    first = snapshot(mgr, vm.id).manifest.id
    phases = ["capture-sent", "captured", "memory-stored", "before-commit", "committed"]
    for phase in phases:
        before = _manifest_ids(paths)
        env = dict(os.environ, TORPOR_TEST_CRASH=phase)
        r = subprocess.run(
            [sys.executable, "-c", SNAPSHOT_IN_CHILD, vm.name, "stop" if stop else "run"],
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert r.returncode == -9, (phase, r.stderr[-2000:])
        new = _manifest_ids(paths) - before
        if phase == "committed":
            # killed after its commit: exactly that snapshot is listed, complete (verify
            # below), and a child of the last one
            assert len(new) == 1, (phase, new)
            assert ChunkStore(paths.store).get(new.pop()).parent == first
        else:
            assert new == set(), phase  # no partial snapshot is ever listed
        _assert_store_clean(paths)
        # the VM is not left paused: the shim resumed it when the client vanished
        vm = mgr.get(vm.id)
        assert vm.state.status == "running", (phase, vm.state)
        assert _keeps_counting(mgr, vm), phase
    # the snapshot taken before all that still restores, and runs
    back = restore(mgr, first, name=f"crashy-back-{int(stop)}")
    vms.ids.append(back.id)
    assert _keeps_counting(mgr, back)
    assert not list((paths.tmp).glob("snap-*")), "stale staging folders are reaped"


def test_qemu_killed_during_capture(vms, tools_image, paths, monkeypatch) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, *COUNTER, name="qemu-dies")
    first = snapshot(mgr, vm.id).manifest.id
    before = _manifest_ids(paths)
    monkeypatch.setenv("TORPOR_TEST_FAULT", "kill-qemu-in-pause")
    with pytest.raises(TorporError) as e:
        snapshot(mgr, vm.id)
    monkeypatch.delenv("TORPOR_TEST_FAULT")
    assert "capture" in str(e.value)
    assert _manifest_ids(paths) == before
    _assert_store_clean(paths)
    deadline = time.monotonic() + 15
    while mgr.get(vm.id).state.status in ("running", "stopping") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mgr.get(vm.id).state.status in ("exited", "dead")  # clearly ended, not stuck
    back = restore(mgr, first, name="qemu-dies-back")
    vms.ids.append(back.id)
    assert _keeps_counting(mgr, back)


def test_qemu_killed_during_restore(vms, tools_image, paths, monkeypatch) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, *COUNTER, name="restore-dies-src")
    snap = snapshot(mgr, vm.id).manifest.id
    names = {v.name for v in mgr.list()}
    monkeypatch.setenv("TORPOR_TEST_FAULT", "kill-qemu-in-restore")
    with pytest.raises(TorporError):
        restore(mgr, snap, name="restore-dies")
    monkeypatch.delenv("TORPOR_TEST_FAULT")
    assert {v.name for v in mgr.list()} == names  # the half-restored VM is gone
    _assert_store_clean(paths)
    ok = restore(mgr, snap, name="restore-dies")  # the name is free again, the snapshot fine
    vms.ids.append(ok.id)
    assert _keeps_counting(mgr, ok)


def _side_home(paths: Paths, root) -> Paths:
    """A second TORPOR_HOME sharing the session's kernel and images (by symlink)."""
    root.mkdir()
    for d in ("guest", "images", "blobs"):
        os.symlink(paths.root / d, root / d)
    return Paths(root).ensure()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_during_snapshot(vms, tools_image, paths, tmp_path) -> None:
    side = _side_home(paths, tmp_path / "home")
    side.store.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(side.store)], check=True)
    try:
        mgr = VMManager(side)
        vm = mgr.run(_req(tools_image, "full-disk"))
        try:
            with pytest.raises(TorporError) as e:
                snapshot(mgr, vm.id)
            assert "No space left" in str(e.value) or "no space" in str(e.value).lower()
            store = ChunkStore(side.store)
            assert store.list() == []  # nothing partial listed
            assert store.verify().ok
            assert mgr.get(vm.id).state.status == "running"
            assert _keeps_counting(mgr, mgr.get(vm.id))  # and not paused
        finally:
            mgr.remove(vm.id, force=True)
    finally:
        subprocess.run(["umount", "-l", str(side.store)], check=False)


def _req(image: str, name: str):
    from torpor.vmm.manager import RunRequest

    return RunRequest(image=image, command=COUNTER, name=name, memory_mib=256, network=False)


def test_forks_get_their_own_identity(vms, tools_image) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, *COUNTER, name="id-parent")
    snap = snapshot(mgr, vm.id).manifest.id
    forks = fork(mgr, snap, 3, name_prefix="idf")
    vms.ids.extend(f.id for f in forks)
    assert [f.name for f in forks] == ["idf-1", "idf-2", "idf-3"]
    seen = set()
    for f in forks:
        with mgr.client(f) as c:
            assert c.exec(["hostname"]).stdout.decode().strip() == f.name
            seen.add(c.exec(["head", "-c", "32", "/dev/urandom"]).stdout)
        assert _keeps_counting(mgr, f)
    assert len(seen) == 3
    with mgr.client(vm) as c:
        assert c.exec(["hostname"]).stdout == b"id-parent\n"  # the parent is untouched


def test_store_copied_to_another_home_restores_cold(vms, tools_image, paths, tmp_path) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, *COUNTER, name="mover")
    with mgr.client(vm) as c:
        c.exec(["sh", "-c", "echo moved > /root/where.txt"])
    snap = snapshot(mgr, vm.id).manifest.id
    new = Paths(tmp_path / "elsewhere").ensure()
    shutil.copytree(paths.store, new.store, dirs_exist_ok=True)
    for d in ("images", "blobs"):  # hard links: an 8 GiB sparse base must not be copied
        shutil.copytree(paths.root / d, new.root / d, dirs_exist_ok=True, copy_function=os.link)
    shutil.rmtree(new.guest, ignore_errors=True)
    os.symlink(paths.guest, new.guest)
    mgr2 = VMManager(new)
    moved = restore(mgr2, snap, name="moved")
    try:
        backing = qcow2_backing(moved.files.disk)
        assert backing is not None and backing.startswith(str(new.root)), backing
        with mgr2.client(moved) as c:
            assert c.exec(["cat", "/root/where.txt"]).stdout == b"moved\n"
        assert _keeps_counting(mgr2, moved)
    finally:
        mgr2.remove(moved.id, force=True)


def test_a_cache_that_cannot_be_kept_does_not_fail_a_committed_snapshot(vms, tools_image):
    """Once the store committed a snapshot, keeping its hot cache is best effort: it
    failed the whole snapshot (a concurrent eviction's vanished folder, here a cache root
    that cannot be made), so a session's checkpoint was never logged although durable."""
    mgr = vms.mgr
    vm = vms.run(tools_image, *COUNTER, name="no-cache")
    root = mgr.paths.snapshot_cache
    shutil.rmtree(root, ignore_errors=True)
    root.write_text("not a folder")
    try:
        res = snapshot(mgr, vm.id)
        assert ChunkStore(mgr.paths.store).get(res.manifest.id).id == res.manifest.id
    finally:
        root.unlink()
    # committed, listed, and restorable (cold: no cache was kept)
    again = restore(mgr, res.manifest.id, name="no-cache-back")
    vms.ids.append(again.id)
    assert _keeps_counting(mgr, again)
