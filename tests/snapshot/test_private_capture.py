"""Snapshots of VMs whose guest RAM is mapped private (``share=off``, copy-on-write
over a base): their RAM file never shows what the guest wrote, so a capture reads
the written pages from QEMU itself (torpor.vmm.ramless) — never the stale file."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.snapshot.test_snapshot_bad_cases import SNAPSHOT_IN_CHILD, _manifest_ids
from torpor.errors import VMError
from torpor.snapshot import restore, snapshot
from torpor.snapshot.core import _store, last_snapshot, place_snapshot
from torpor.vmm import qmp
from torpor.vmm.capture import CAPTURE, CAPTURE_END, CHUNK
from torpor.vmm.manager import VM, RunRequest
from torpor.vmm.ramless import PAGE, guest_ram_hva, overlay_of
from torpor.vmm.state import VMConfig, save_config

pytestmark = pytest.mark.vm

WRITE = (
    "head -c 3000000 /dev/urandom > /dev/shm/{name} && echo {name} > /root/{name}.txt && "
    "md5sum /dev/shm/{name} | cut -d' ' -f1"
)


def restore_private(vms, snap_id: str, name: str) -> VM:
    """A restore of ``snap_id`` with its RAM mapped private: restore.json says
    ``ram_private`` (what a shared base sets), through the normal create / place /
    start path, whether or not this torpor maps a shared base for it."""
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
        base = place_snapshot(mgr, store, m, vm)
    finally:
        store.close()
    info = json.loads((vm.dir / "restore.json").read_text())
    (vm.dir / "restore.json").write_text(json.dumps(info | {"ram_private": True}))
    try:
        return mgr.start(vm.id)
    finally:
        if base is not None:
            base.close()


def _ram_arg(vm: VM) -> str:
    argv = json.loads((vm.dir / "qemu.argv").read_text())
    return next(a for a in argv if a.startswith("memory-backend-file"))


def _sh(mgr, vm, script: str) -> str:
    with mgr.client(vm) as c:
        r = c.exec(["sh", "-c", script], timeout=60)
    assert r.status.code == 0, r.stderr
    return r.stdout.decode()


def _write(mgr, vm, name: str) -> str:
    return _sh(mgr, vm, WRITE.format(name=name)).strip()


def _check(mgr, vm, files: dict[str, str]) -> None:
    for name, md5 in files.items():
        out = _sh(mgr, vm, f"md5sum /dev/shm/{name} | cut -d' ' -f1; cat /root/{name}.txt")
        assert out == f"{md5}\n{name}\n", name


def _sleeper_alive(mgr, vm) -> bool:
    return "sleep 7777" in _sh(mgr, vm, "ps")


@pytest.fixture(scope="module")
def private_vm(shared_vms, tools_image):
    """A private VM (restored from a fresh VM's snapshot) with 3 MB written and a
    process started after its restore."""
    mgr = shared_vms.mgr
    src = shared_vms.run(tools_image, "sleep", "100000", name="priv-origin")
    first = snapshot(mgr, src.id)
    mgr.remove(src.id, force=True)
    vm = restore_private(shared_vms, first.manifest.id, "priv-shared")
    assert "share=off" in _ram_arg(vm)
    md5 = _write(mgr, vm, "a")
    _sh(mgr, vm, "(sleep 7777 &) ; true")
    return vm, {"a": md5}


@pytest.mark.slow
def test_two_generations_of_private_captures_restore_everything(vms, tools_image) -> None:
    mgr = vms.mgr
    src = vms.run(tools_image, "sleep", "100000", name="gen-src")
    s0 = snapshot(mgr, src.id)
    vm = restore_private(vms, s0.manifest.id, "gen-1")
    files = {"a": _write(mgr, vm, "a")}
    _sh(mgr, vm, "(sleep 7777 &) ; true")
    s1 = snapshot(mgr, vm.id)
    assert s1.timings["memory_dirty_path"] == 1.0 and s1.timings["memory_pages_private"] > 0
    assert s1.manifest.parent == s0.manifest.id
    # the same VM again: pages written before s1 and unchanged since are not re-hashed
    files["c"] = _write(mgr, vm, "c")
    s2 = snapshot(mgr, vm.id)
    assert s2.timings["memory_dirty_path"] == 1.0
    assert s2.timings["memory_chunks_changed"] < s2.timings["memory_overlay_chunks"]
    # generation 2: a private restore of a private capture, captured in turn
    vm2 = restore_private(vms, s2.manifest.id, "gen-2")
    _check(mgr, vm2, files)
    assert _sleeper_alive(mgr, vm2)
    files["b"] = _write(mgr, vm2, "b")
    s3 = snapshot(mgr, vm2.id)
    assert s3.manifest.parent == s2.manifest.id
    # hibernation: the cache gets the whole memory (the overlay's holes from the base)
    snapshot(mgr, vm2.id, stop=True)
    assert not overlay_of(vm2.files.shadow).exists()
    mgr.start(vm2.id)
    vm2 = mgr.get(vm2.id)
    _check(mgr, vm2, files)
    assert _sleeper_alive(mgr, vm2)
    # and s3 restored as a plain VM
    vm3 = restore(mgr, s3.manifest.id, name="gen-3")
    vms.ids.append(vm3.id)
    _check(mgr, vm3, files)
    assert _sleeper_alive(mgr, vm3)


def test_overlay_and_base_equal_guest_memory_at_the_pause(private_vm, shared_vms, tmp_path):
    """What a capture hands the store (overlay chunks, the base in its holes) is
    byte for byte the guest's memory while it is paused (read via /proc/<pid>/mem)."""
    vm, _ = private_vm
    mgr = shared_vms.mgr
    vm = mgr.get(vm.id)
    _write(mgr, vm, "eq")
    stage = tmp_path / "stage"
    stage.mkdir()
    with mgr.client(vm, timeout=60) as c:
        c.sync()
        req = {"stage": str(stage), "keep_paused": True}
        cap = json.loads(c.request(CAPTURE, json.dumps(req).encode(), timeout=120).payload)
        try:
            assert cap["private"] is True
            size = vm.config.memory_mib << 20

            async def hva() -> int:
                async with qmp.session(vm.files.qmp_sock) as q:
                    status = await qmp.execute(q, "query-status")
                    assert status["status"] == "paused"
                    return await guest_ram_hva(q)

            addr = asyncio.run(hva())
            overlay = Path(cap["shadow"])
            bad = []
            with (
                open(f"/proc/{vm.state.qemu_pid}/mem", "rb", buffering=0) as mem,
                open(overlay, "rb") as ov,
                open(cap["base_file"], "rb") as base,
            ):
                data = set()  # the overlay's pages (its holes stand for the base)
                pos = 0
                while pos < size:
                    try:
                        start = os.lseek(ov.fileno(), pos, os.SEEK_DATA)
                    except OSError:
                        break
                    end = os.lseek(ov.fileno(), start, os.SEEK_HOLE)
                    data.update(range(start // PAGE, (end - 1) // PAGE + 1))
                    pos = end
                for i in range(size // CHUNK):
                    want = bytearray(os.pread(base.fileno(), CHUNK, i * CHUNK))
                    ovc = os.pread(ov.fileno(), CHUNK, i * CHUNK)
                    for j in range(CHUNK // PAGE):
                        if i * (CHUNK // PAGE) + j in data:
                            want[j * PAGE : (j + 1) * PAGE] = ovc[j * PAGE : (j + 1) * PAGE]
                    got = os.pread(mem.fileno(), CHUNK, addr + i * CHUNK)
                    if want != got:
                        bad.append(i)
            assert data, "the guest wrote nothing?"
            assert bad == []
        finally:
            c.request(CAPTURE_END, json.dumps({"action": "resume"}).encode(), timeout=30)


def test_kill9_of_the_capturing_client_in_the_pause(private_vm, shared_vms, paths) -> None:
    """The client dies inside the pause (with and without hibernation): the guest
    runs on, nothing is listed, and the next capture (the overlay never committed:
    every overlay chunk is stored) restores everything."""
    vm, files = private_vm
    mgr = shared_vms.mgr
    parent = last_snapshot(mgr.get(vm.id))
    for mode in ("run", "stop"):
        before = _manifest_ids(paths)
        env = dict(os.environ, TORPOR_TEST_CRASH="capture-sent")
        r = subprocess.run(
            [sys.executable, "-c", SNAPSHOT_IN_CHILD, vm.name, mode],
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert r.returncode == -9, r.stderr[-2000:]
        assert _manifest_ids(paths) == before
        vm = mgr.get(vm.id)
        assert vm.state.status == "running"
        _check(mgr, vm, files)  # answers: not left paused
    files["k"] = _write(mgr, vm, "k")
    s = snapshot(mgr, vm.id)
    assert s.manifest.parent == parent
    back = restore(mgr, s.manifest.id, name="priv-after-kill")
    shared_vms.ids.append(back.id)
    _check(mgr, back, files)
    assert _sleeper_alive(mgr, back)
    mgr.remove(back.id, force=True)


def test_private_vm_is_never_captured_from_its_ram_file(private_vm, shared_vms, paths, monkeypatch):
    """Where QEMU's memory cannot be read (a host that denies ptrace), the capture is
    refused and the guest runs on — never a snapshot of the stale RAM file."""
    vm, files = private_vm
    mgr = shared_vms.mgr
    before = _manifest_ids(paths)
    monkeypatch.setenv("TORPOR_TEST_FAULT", "private-no-ptrace")
    with pytest.raises(VMError, match="cannot read guest memory"):
        snapshot(mgr, vm.id)
    assert _manifest_ids(paths) == before
    _check(mgr, mgr.get(vm.id), files)


def test_guest_writes_to_the_bios_region_are_kept(private_vm, shared_vms) -> None:
    """A microvm's BIOS region is guest-writable RAM outside the RAM file: its pages
    in the reused stream head are those of the capture, not of the restore."""
    vm, _ = private_vm
    mgr = shared_vms.mgr
    vm = mgr.get(vm.id)
    before = _sh(mgr, vm, "devmem 0xffff0010 32").strip()
    value = "0x9ABCDEF0" if before != "0x9ABCDEF0" else "0x12345678"
    _sh(mgr, vm, f"devmem 0xffff0010 32 {value}")
    s = snapshot(mgr, vm.id)
    back = restore(mgr, s.manifest.id, name="priv-bios")
    shared_vms.ids.append(back.id)
    assert _sh(mgr, back, "devmem 0xffff0010 32 && devmem 0xf0010 32").split() == [value] * 2
    mgr.remove(back.id, force=True)


def test_parent_gone_the_whole_memory_is_stored(private_vm, shared_vms) -> None:
    """The VM's last snapshot was removed: no parent to take unchanged chunks from, so
    the store reads the whole memory — the overlay with the base in its holes."""
    from torpor.snapshot.core import remove_snapshot

    vm, files = private_vm
    mgr = shared_vms.mgr
    vm = mgr.get(vm.id)
    files["g"] = _write(mgr, vm, "g")
    snapshot(mgr, vm.id)  # a snapshot only this VM builds on: removable
    remove_snapshot(mgr, last_snapshot(vm))
    s = snapshot(mgr, vm.id)
    assert s.manifest.parent is None and s.timings["memory_dirty_path"] == 0.0
    back = restore(mgr, s.manifest.id, name="priv-orphan")
    shared_vms.ids.append(back.id)
    _check(mgr, back, files)
    assert _sleeper_alive(mgr, back)
    mgr.remove(back.id, force=True)
