"""Snapshots of real running VMs: capture, hot and cold restore, layering, forks, damage."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.chunkfiles import hide
from tests.conftest import torpor_cli
from tests.snapshot.counter import COUNTER, count
from torpor.errors import ChunkError, ConflictError, NotFoundError
from torpor.snapshot import restore, snapshot
from torpor.store import ChunkStore

pytestmark = pytest.mark.vm


def _track(vms, vm):
    vms.ids.append(vm.id)
    return vm


def test_restore_continues_processes_memory_files_and_listeners(vms, tools_image) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, *COUNTER, name="src")
    with mgr.client(vm) as c:
        c.exec(["sh", "-c", "echo on-disk > /root/disk.txt; echo in-tmpfs > /dev/shm/tmp.txt"])
        c.exec(
            [
                "sh",
                "-c",
                "mkdir -p /srv/w && echo listening > /srv/w/index.html && "
                "(httpd -p 8080 -h /srv/w &)",
            ]
        )
    time.sleep(0.5)
    before = count(mgr, vm)
    snap = snapshot(mgr, "src", tag="t")
    at_snapshot = count(mgr, vm)
    assert snap.pause_ms > 0 and snap.manifest.meta["tag"] == "t"
    vm2 = _track(vms, restore(mgr, snap.manifest.id, name="dst"))
    n1 = count(mgr, vm2)
    assert before <= n1 <= at_snapshot + 2  # resumed from the snapshot's value, not from 0
    time.sleep(1)
    assert count(mgr, vm2) > n1  # and still counting
    with mgr.client(vm2) as c:
        r = c.exec(["cat", "/root/disk.txt", "/dev/shm/tmp.txt"])
        assert r.stdout == b"on-disk\nin-tmpfs\n"
        r = c.exec(["wget", "-qO-", "http://127.0.0.1:8080/"])
        assert r.stdout == b"listening\n", r.stderr
        assert c.exec(["hostname"]).stdout == b"src\n"  # the machine is the same one


def test_generations_store_only_their_delta(vms, tools_image, paths) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "100000", name="gen0")
    first = snapshot(mgr, vm.id)
    snap_id, name = first.manifest.id, vm.name
    # What the first snapshot occupies in the store, whoever stored its chunks (the
    # session's store is shared: other tests' VMs may have stored many of them).
    store = ChunkStore(paths.store)
    full = sum(
        store.frame_size(h) or 0  # loose or in a pack
        for h in {h for a in first.manifest.artifacts.values() for h in a.chunks if h}
    )
    for gen in range(1, 6):
        vm = _track(vms, restore(mgr, snap_id, name=f"gen{gen}"))
        with mgr.client(vm) as c:
            c.exec(["sh", "-c", f"echo {gen} > /root/gen-{gen}; cat /root/gen-* | wc -l"])
        r = snapshot(mgr, vm.id)
        assert r.manifest.parent == snap_id
        # only what changed is stored: most chunks come from the parent, and a
        # generation stores a small fraction of what a full snapshot occupies
        used = sum(1 for a in r.manifest.artifacts.values() for h in a.chunks if h)
        assert r.new_chunks < used / 2, (gen, r.new_chunks, used)
        assert r.stored_bytes * 10 < full, (gen, r.stored_bytes, full)
        mgr.remove(name, force=True)
        snap_id, name = r.manifest.id, vm.name
    last = _track(vms, restore(mgr, snap_id, name="gen-last", cold=True))
    with mgr.client(last) as c:
        assert c.exec(["sh", "-c", "cat /root/gen-*"]).stdout == b"1\n2\n3\n4\n5\n"


def test_forks_diverge(vms, tools_image) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, *COUNTER, name="parent")
    snap = snapshot(mgr, vm.id).manifest.id
    forks = [_track(vms, restore(mgr, snap, name=f"fork-{i}")) for i in range(4)]
    for i, f in enumerate(forks):
        with mgr.client(f) as c:
            c.exec(["sh", "-c", f"echo {i} > /root/mine; echo {i} > /dev/shm/mine"])
    for i, f in enumerate(forks):
        with mgr.client(f) as c:
            assert c.exec(["cat", "/root/mine", "/dev/shm/mine"]).stdout == f"{i}\n{i}\n".encode()
            seed = c.exec(["head", "-c", "16", "/dev/urandom"]).stdout
            assert len(seed) == 16
    with mgr.client(vm) as c:
        assert c.exec(["cat", "/root/mine"]).status.code != 0  # the parent saw none of it


def test_random_streams_differ_across_forks(vms, tools_image) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "100000", name="rng-parent")
    snap = snapshot(mgr, vm.id).manifest.id
    outs = []
    for i in range(2):
        f = _track(vms, restore(mgr, snap, name=f"rng-{i}"))
        with mgr.client(f) as c:
            outs.append(c.exec(["head", "-c", "32", "/dev/urandom"]).stdout)
    assert outs[0] != outs[1]


def _boot_id(mgr, vm) -> bytes:
    with mgr.client(vm) as c:
        return c.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout


def test_hibernate_and_resume_in_place(vms, tools_image) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, *COUNTER, name="sleepy")
    boot_id = _boot_id(mgr, vm)
    before = count(mgr, vm)  # read just before hibernating: it only grows from here
    snapshot(mgr, vm.id, stop=True)
    assert mgr.get("sleepy").state.status == "hibernated"
    assert not vm.files.ram.exists()  # its memory is freed
    r = torpor_cli("start", "sleepy")
    assert r.returncode == 0, r.stderr
    woken = mgr.get("sleepy")
    # continued, not restarted: the same boot, and the count did not go back
    assert _boot_id(mgr, woken) == boot_id
    n = count(mgr, woken)
    assert n >= before
    deadline = time.monotonic() + 60
    while count(mgr, woken) <= n:  # and still counting
        assert time.monotonic() < deadline, "the counter stopped after the resume"
        time.sleep(0.1)


def test_bad_cases(vms, tools_image, paths) -> None:
    mgr = vms.mgr
    with pytest.raises(NotFoundError):
        snapshot(mgr, "no-such-vm")
    vm = vms.run(tools_image, "sleep", "100000", name="victim-snap")
    mgr.stop(vm.id, timeout=1)
    with pytest.raises(ConflictError):
        snapshot(mgr, vm.id)
    assert torpor_cli("snapshot", "victim-snap").returncode == 4
    mgr.start(vm.id)
    snap = snapshot(mgr, vm.id).manifest
    # cold restore with a chunk deleted: the error names it, and no VM is left behind
    shutil.rmtree(paths.snapshot_cache / snap.id)
    victim = next(h for h in snap.artifacts["devstate"].chunks if h)
    with ChunkStore(paths.store) as st:
        put_back = hide(st, [victim])  # its file (loose, or its pack) moved away
    try:
        before = {v.name for v in mgr.list()}
        with pytest.raises(ChunkError) as e:
            restore(mgr, snap.id, name="never")
        assert victim in str(e.value)
        assert {v.name for v in mgr.list()} == before
        r = torpor_cli("verify")
        assert r.returncode == 10 and victim.encode() in r.stdout
    finally:  # the store is the session's: later tests verify it whole
        put_back()
    assert torpor_cli("restore", "no-such-snapshot").returncode == 3  # no such id or tag
    assert torpor_cli("restore", "0123456789ab").returncode == 3  # an id nobody has
