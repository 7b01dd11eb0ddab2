"""The hot cache (cache folder, RAM shadows) is checked like the store: bytes changed
in it never reach a restored guest or QEMU, ``verify`` finds it, the store repairs it."""

from __future__ import annotations

import os
import secrets

import pytest

from tests.conftest import torpor_cli
from torpor.snapshot import restore, snapshot
from torpor.store import ChunkStore
from torpor.vmm.capture import read_meta

pytestmark = pytest.mark.vm


def _tamper(path, old: bytes, new: bytes) -> int:
    """Replace every occurrence of ``old`` in the data of (sparse) file ``path``."""
    assert len(old) == len(new)
    hits = 0
    block = 8 << 20
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            f.seek(pos)
            buf = f.read(block + len(old))
            i = buf.find(old)
            while i >= 0:
                f.seek(pos + i)
                f.write(new)
                hits += 1
                i = buf.find(old, i + 1)
            pos += block
    return hits


def _marker(mgr, vm) -> bytes:
    m = ("TORPOR-CACHE-MARKER-" + secrets.token_hex(12)).encode()
    with mgr.client(vm) as c:
        # split on the command line so the marker itself is only in the file's page,
        # on a tmpfs of its own: its only copy is guest RAM (no disk behind it)
        script = 'mkdir -p /run/cm && mount -t tmpfs cm /run/cm && printf %s%s "$1" "$2" >/run/cm/m'
        r = c.exec(["sh", "-c", script, "-", m[:10], m[10:]])
        assert r.status.code == 0, r.stderr
    return m


def _count(path, s: bytes) -> int:
    n = 0
    with open(path, "rb") as f:
        while b := f.read(8 << 20):
            n += b.count(s)
    return n


def _count_ram(mgr, vm, s: bytes) -> int:
    """Occurrences of ``s`` in the RAM the guest runs on: its RAM file, or (RAM mapped
    private over a shared base, torpor.vmm.basemem) QEMU's mapping of the base, read
    through /proc/<qemu>/mem (the base's pages and the guest's own writes alike)."""
    if vm.files.ram.exists():
        return _count(vm.files.ram, s)
    pid = mgr.get(vm.id).state.qemu_pid
    n = found = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            if "torpor-base-" in line:
                found += 1
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                for off in range(lo, hi, 8 << 20):
                    mem.seek(off)
                    buf = mem.read(min(8 << 20, hi - off) + len(s))
                    n += buf.count(s)
    assert found, "QEMU maps neither a RAM file nor a base"
    return n


def _read_marker(mgr, vm) -> bytes:
    with mgr.client(vm) as c:
        return c.exec(["cat", "/run/cm/m"]).stdout


def test_tampered_hibernation_cache_is_not_used(vms, tools_image, paths) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "infinity", name="cache-victim")
    marker = _marker(mgr, vm)
    bogus = b"X" * len(marker)
    s1 = snapshot(mgr, vm.id, stop=True).manifest
    mem = paths.snapshot_cache / s1.id / "memory"
    assert _tamper(mem, marker, bogus) > 0
    vm = mgr.start(vm.id)  # wake in place: the bad cached RAM is not what it gets
    assert _count_ram(mgr, vm, bogus) == 0
    assert _read_marker(mgr, vm) == marker

    s2 = snapshot(mgr, vm.id, stop=True).manifest
    mem = paths.snapshot_cache / s2.id / "memory"
    assert _tamper(mem, marker, bogus) > 0
    r = torpor_cli("verify")
    assert r.returncode == 0 and b"memory" in r.stdout and b"rebuilt" in r.stdout, r.stdout
    with ChunkStore(paths.store) as store:
        assert store.check_file(s2.artifacts["memory"], mem) == []  # repaired
    assert _tamper(mem, marker, bogus) > 0  # and damaged again
    vm2 = restore(mgr, s2.id, name="cache-victim-copy")
    vms.ids.append(vm2.id)
    assert _count_ram(mgr, vm2, bogus) == 0
    assert _read_marker(mgr, vm2) == marker

    # one flipped byte of cached device state never reaches QEMU's parser
    dev = paths.snapshot_cache / s2.id / "devstate"
    data = bytearray(dev.read_bytes())
    data[len(data) // 2] ^= 0x01
    dev.write_bytes(bytes(data))
    vm3 = restore(mgr, s2.id, name="cache-victim-dev")
    vms.ids.append(vm3.id)
    assert _read_marker(mgr, vm3) == marker
    with ChunkStore(paths.store) as store:
        assert store.check_file(s2.artifacts["devstate"], dev) == []  # rebuilt by the restore


def test_tampered_ram_shadow_is_not_used(vms, tools_image, paths) -> None:
    mgr = vms.mgr
    vm = vms.run(tools_image, "sleep", "infinity", name="shadow-victim")
    marker = _marker(mgr, vm)
    snap = snapshot(mgr, vm.id).manifest
    shadow = vm.files.shadow
    assert read_meta(vm.files.shadow_meta).get("snapshot") == snap.id
    assert _tamper(shadow, marker, b"Y" * len(marker)) > 0
    vm2 = restore(mgr, snap.id, name="shadow-victim-copy")
    vms.ids.append(vm2.id)
    assert _count_ram(mgr, vm2, b"Y" * len(marker)) == 0
    assert _read_marker(mgr, vm2) == marker
    # the shadow is no longer vouched for: the next capture reads all of RAM
    assert read_meta(vm.files.shadow_meta).get("snapshot") is None
    r = snapshot(mgr, vm.id)
    vm3 = restore(mgr, r.manifest.id, name="shadow-victim-next", cold=True)
    vms.ids.append(vm3.id)
    assert _read_marker(mgr, vm3) == marker
    # verify checks vouched-for shadows too, and unvouches a bad one
    assert read_meta(vm.files.shadow_meta).get("snapshot") == r.manifest.id
    out = torpor_cli("verify")
    assert out.returncode == 0 and b"shadow" not in out.stdout, out.stdout
    assert _tamper(shadow, marker, b"Z" * len(marker)) > 0
    out = torpor_cli("verify")
    assert out.returncode == 0 and b"RAM shadow of VM" in out.stdout, out.stdout
    assert read_meta(vm.files.shadow_meta).get("snapshot") is None
