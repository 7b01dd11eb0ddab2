"""Snapshot references on real VMs: tags for restore and fork, rm of a hibernation,
a read-only home, removed snapshots' caches."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

import pytest

from tests.conftest import torpor_cli
from torpor.errors import ConflictError
from torpor.snapshot import fork, restore, snapshot
from torpor.snapshot.core import remove_snapshot

pytestmark = pytest.mark.vm


def test_tags_restore_and_fork(vms, tools_image, paths) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "infinity", name="tagged")
    s1 = snapshot(mgr, vm.id, tag="tag-one").manifest
    r = torpor_cli("restore", "tag-one", "--name", "from-tag")
    assert r.returncode == 0, r.stderr
    vms.ids.append(r.stdout.decode().strip())
    assert mgr.get("from-tag").state.status == "running"
    forks = fork(mgr, "tag-one", 2, name_prefix="tagfork")
    vms.ids.extend(f.id for f in forks)
    assert len(forks) == 2
    s2 = snapshot(mgr, vm.id, tag="tag-one").manifest  # now the tag is ambiguous
    r = torpor_cli("restore", "tag-one")
    assert r.returncode == 4, r.stderr
    assert s1.id[:12].encode() in r.stderr and s2.id[:12].encode() in r.stderr
    vm2 = restore(mgr, s2.id[:12], name="from-prefix")
    vms.ids.append(vm2.id)


def test_removing_a_hibernation_is_refused_and_rm_drops_the_cache(vms, tools_image, paths):
    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "infinity", name="sleeper-rm")
    snap = snapshot(mgr, vm.id, stop=True).manifest
    assert (paths.snapshot_cache / snap.id / "memory").exists()
    with pytest.raises(ConflictError):
        remove_snapshot(mgr, snap.id)  # the VM resumes from it
    # a restore from the hibernation cache (RAM checked in the shim's copy) leaves no
    # link to the cached RAM behind once its shadow is seeded
    copy = restore(mgr, snap.id, name="sleeper-copy")
    vms.ids.append(copy.id)
    for _ in range(300):
        if not (copy.dir / "ram.src").exists():
            break
        time.sleep(0.1)
    assert not (copy.dir / "ram.src").exists()
    mgr.remove(vm.id, force=True)
    r = torpor_cli("snapshot", "rm", snap.id[:12])
    assert r.returncode == 0, r.stderr
    assert not (paths.snapshot_cache / snap.id).exists()


def test_restore_in_a_read_only_home_is_a_clear_error(vms, tools_image, paths) -> None:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs mount namespaces (unshare -m) to make a read-only home")
    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "infinity", name="ro-src")
    snap = snapshot(mgr, vm.id, tag="ro-tag").manifest
    home = shlex.quote(str(paths.root))
    for args in (["restore", "ro-tag"], ["snapshot", "rm", snap.id], ["gc"]):
        cmd = (
            f"mount --bind {home} {home} && mount -o remount,bind,ro {home} && "
            f"exec {shlex.quote(sys.executable)} -m torpor.cli.main {shlex.join(args)}"
        )
        r = subprocess.run(
            ["unshare", "-m", "sh", "-c", cmd],
            capture_output=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        err = r.stderr.decode()
        assert r.returncode != 0 and "Traceback" not in err, (args, err)
        assert "read-only" in err.lower() and str(paths.root) in err, (args, err)
    assert {v.name for v in mgr.list()} >= {"ro-src"}
