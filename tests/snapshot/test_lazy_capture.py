"""The capture of a lazily restored VM does not wait for its memory to stream in.

A recovery restores its checkpoint lazily (torpor.vmm.lazymem: the guest runs while
its RAM is served from the store on demand; the shim streams the rest into the VM's
shadow behind it) and then captures the replayed turn.  That capture reads what the
guest wrote from QEMU (the RAM-less capture, torpor.vmm.ramless) and the rest of each
chunk from the lazy file itself, so it must not wait for the stream: it used to (up to
60 s, then EAGAIN), which cost a recovery 1.3-1.7 s.  And what it captured is right:
the guest's memory restored from the new snapshot (the full path, from the store)
equals what the guest computed before it, byte for byte, random data, zero pages and
the page the guest changed after the lazy restore included.
"""

from __future__ import annotations

import pytest

from tests.snapshot.test_lazy_restore import _stats
from torpor.snapshot import restore, snapshot
from torpor.vmm import lazymem
from torpor.vmm.capture import read_meta

pytestmark = pytest.mark.vm

D = "/run/d"
# random data, a MiB of zeros (zero chunks), more random data: in guest RAM only
FILL = (
    f"mkdir -p {D} && mount -t tmpfs d {D} && head -c 2097152 /dev/urandom > {D}/a && "
    f"head -c 1048576 /dev/zero >> {D}/a && head -c 1048576 /dev/urandom >> {D}/a && "
    f"md5sum {D}/a"
)


def _md5(mgr, vm, path: str) -> str:
    with mgr.client(vm) as c:
        r = c.exec(["md5sum", path], timeout=120)
    assert r.status.code == 0, r.stderr
    return r.stdout.split()[0].decode()


def test_capture_of_a_lazy_vm_does_not_wait_for_the_stream(
    vms, tools_image, monkeypatch: pytest.MonkeyPatch
) -> None:
    if lazymem.available() is not None:
        pytest.skip(f"lazy restore unavailable: {lazymem.available()}")
    mgr = vms.mgr
    src = vms.run(tools_image, "sleep", "infinity", name="lazy-cap-src")
    with mgr.client(src) as c:
        r = c.exec(["sh", "-c", FILL], timeout=120)
    assert r.status.code == 0, r.stderr
    md5_a = r.stdout.split()[0].decode()
    snap = snapshot(mgr, src.id).manifest

    monkeypatch.setenv("TORPOR_LAZY_RESTORE", "1")
    # the stream of the rest held back far longer than the test: a capture that waits
    # for it would return only after it (or fail after 60 s)
    monkeypatch.setenv("TORPOR_LAZY_STREAM_DELAY_S", "30")
    vm = restore(mgr, snap.id, cold=True)
    vms.ids.append(vm.id)
    assert lazymem.is_mounted(vm.files.ram)
    assert _md5(mgr, vm, f"{D}/a") == md5_a
    with mgr.client(vm) as c:  # a change after the lazy restore, as a replayed turn makes
        r = c.exec(["sh", "-c", f"echo changed > {D}/b && md5sum {D}/b"], timeout=120)
    assert r.status.code == 0, r.stderr
    md5_b = r.stdout.split()[0].decode()
    second = snapshot(mgr, vm.id).manifest
    # captured while the stream had not started: the shadow is not the snapshot yet,
    # and the server fetched only part of the memory
    assert read_meta(vm.files.shadow_meta).get("snapshot") is None
    assert _stats(vm)["fetched_bytes"] < snap.artifacts["memory"].size
    assert second.parent == snap.id

    # the new snapshot restored in full from the store (no lazy file involved)
    monkeypatch.setenv("TORPOR_LAZY_RESTORE", "0")
    mgr.remove(vm.id, force=True)
    back = restore(mgr, second.id, cold=True)
    vms.ids.append(back.id)
    assert not lazymem.is_mounted(back.files.ram)
    assert _md5(mgr, back, f"{D}/a") == md5_a
    assert _md5(mgr, back, f"{D}/b") == md5_b
