"""Forks that share one sealed base of their snapshot's RAM (torpor.vmm.basemem):
a fork's writes never reach the base or a sibling, the kernel refuses writes to the
base, the base is reused while it has users and gone when the last one is, and a
base whose source does not match the manifest is never used."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor.snapshot import fork, snapshot
from torpor.store import ChunkStore
from torpor.vmm import basemem

pytestmark = pytest.mark.vm

IDLE = "2"  # seconds a holder waits without users (set for this module's holders)


@pytest.fixture(scope="module")
def env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORPOR_RAM_BASE", "1")
        mp.setenv("TORPOR_BASE_IDLE", IDLE)
        yield


@pytest.fixture(scope="module")
def hibernated(env, shared_vms, tools_image, paths) -> Iterator[tuple[object, bytes, str]]:
    """A VM with a marker file on a guest tmpfs (its only copy is guest RAM),
    hibernated: its snapshot's memory is in the hot cache."""
    mgr = shared_vms.mgr
    vm = shared_vms.run(tools_image, "sleep", "infinity", name="shared-src")
    marker = ("TORPOR-SHARED-BASE-" + secrets.token_hex(12)).encode()
    with mgr.client(vm) as c:
        script = (
            "mkdir -p /m && mount -t tmpfs m /m && "
            'printf %s%s "$1" "$2" > /m/live && dd if=/dev/urandom bs=64k count=32 '
            ">> /m/live 2>/dev/null && md5sum /m/live"
        )
        r = c.exec(["sh", "-c", script, "-", marker[:10], marker[10:]])
        assert r.status.code == 0, r.stderr
        md5 = r.stdout.split()[0].decode()
    snap = snapshot(mgr, vm.id, stop=True).manifest
    yield snap, marker, md5


def _md5(mgr, vm) -> str:
    with mgr.client(vm) as c:
        r = c.exec(["md5sum", "/m/live"])
        assert r.status.code == 0, r.stderr
        return r.stdout.split()[0].decode()


def _base_maps(pid: int, snap_id: str) -> list[tuple[int, int, int, int]]:
    """(start, end, inode, file offset) of the mappings of ``snap_id``'s base in
    process ``pid`` (QEMU's guest RAM: possibly split into several)."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if f"torpor-base-{snap_id[:12]}" in line:
                rng, _perm, off, _dev, ino = line.split()[:5]
                lo, hi = (int(x, 16) for x in rng.split("-"))
                out.append((lo, hi, int(ino), int(off, 16)))
    return out


def _address(maps: list[tuple[int, int, int, int]], off: int) -> int:
    """Where offset ``off`` of the base is mapped."""
    [addr] = [lo + off - fo for lo, hi, _ino, fo in maps if fo <= off < fo + hi - lo]
    return addr


def _base_sha(fd: int, size: int) -> str:
    with mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
        return hashlib.sha256(m).hexdigest()


def test_tampered_cache_is_refused_at_fill_and_the_store_fills(hibernated, paths) -> None:
    snap, marker, _md5 = hibernated
    cache = paths.snapshot_cache / snap.id / "memory"
    data = bytearray(cache.read_bytes())
    i = data.find(marker)
    assert i >= 0
    data[i : i + len(marker)] = b"X" * len(marker)
    cache.write_bytes(bytes(data))
    store = ChunkStore(paths.store)
    with basemem.acquire(paths, store, snap) as b:
        assert b.source == "store"
        assert not cache.exists()  # the bad cache file is never offered again
        assert store.check_file(snap.artifacts["memory"], Path(f"/proc/self/fd/{b.fd}")) == []
    basemem.retire(paths, snap.id)  # the next tests start from a fresh base
    _wait_gone(paths, snap.id)


def test_forks_share_one_base_and_writes_stay_private(hibernated, shared_vms, paths) -> None:
    snap, marker, md5 = hibernated
    mgr = shared_vms.mgr
    a, b = fork(mgr, snap.id, 2, name_prefix="shared-fork")
    shared_vms.ids += [a.id, b.id]
    a, b = mgr.get(a.id), mgr.get(b.id)
    maps_a = _base_maps(a.state.qemu_pid, snap.id)
    maps_b = _base_maps(b.state.qemu_pid, snap.id)
    assert maps_a and maps_b, "QEMU does not map the base"
    assert {m[2] for m in maps_a} == {m[2] for m in maps_b}  # one base: the same inode
    assert "share=off" in (a.dir / "qemu.argv").read_text()
    assert not a.files.ram.exists()  # no per-fork copy of RAM
    [held] = [h for h in basemem.holders(paths) if h["snapshot"] == snap.id]
    assert held["ino"] == maps_a[0][2]
    assert _md5(mgr, a) == _md5(mgr, b) == md5

    mem = snap.artifacts["memory"]
    with basemem.connect(paths, snap.id, mem.size) as base:
        sha = _base_sha(base.fd, mem.size)
        with mmap.mmap(base.fd, mem.size, mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
            # every copy (the file's page, and stale ones in freed guest buffers)
            offs, o = [], m.find(marker)
            while o >= 0:
                offs.append(o)
                o = m.find(marker, o + 1)
        assert offs
        # a hostile write into fork a's guest RAM, from outside (as a compromised
        # QEMU could): it lands in a's private copy only
        with open(f"/proc/{a.state.qemu_pid}/mem", "r+b", buffering=0) as f:
            for off in offs:
                f.seek(_address(maps_a, off))
                f.write(b"Y" * len(marker))
        assert _md5(mgr, a) != md5  # the write reached a's guest memory...
        # ...and a's guest writes its own file too
        with mgr.client(a) as c:
            r = c.exec(["sh", "-c", "dd if=/dev/urandom of=/m/live bs=64k count=8 conv=notrunc"])
            assert r.status.code == 0, r.stderr
            # and takes 64 MiB of memory it never used (pages the base holds as zeros)
            r = c.exec(["sh", "-c", "dd if=/dev/zero of=/m/fill bs=1M count=64"])
            assert r.status.code == 0, r.stderr
        # the base's pages were allocated by whoever filled it: a fork's memory cgroup
        # is charged for its own writes and QEMU, never for the base's tmpfs pages
        for vm in (a, b):
            assert _cgroup_shmem(vm) < 1 << 20
        assert _md5(mgr, b) == md5  # the sibling never sees them
        assert _base_sha(base.fd, mem.size) == sha  # nor does the base
        assert ChunkStore(paths.store).check_file(mem, Path(f"/proc/self/fd/{base.fd}")) == []

        # reused by a later fork while in use: the same inode, no new fill
        (c3,) = fork(mgr, snap.id, 1, name_prefix="shared-late")
        shared_vms.ids.append(c3.id)
        c3 = mgr.get(c3.id)
        assert {m[2] for m in _base_maps(c3.state.qemu_pid, snap.id)} == {maps_a[0][2]}
        assert _md5(mgr, c3) == md5
    # every fork stays snapshottable (the RAM-less capture, torpor.vmm.ramless), and
    # its snapshot restores: a's raw write is in a's snapshot, b's data intact in b's
    s_b = snapshot(mgr, b.id).manifest
    s_a = snapshot(mgr, a.id).manifest
    b2, a2 = (
        fork(mgr, s.id, 1, name_prefix=f"shared-again-{i}")[0] for i, s in ((1, s_b), (2, s_a))
    )
    shared_vms.ids += [a2.id, b2.id]
    made = [a, b, c3, a2, b2]
    assert _md5(mgr, b2) == md5
    assert _md5(mgr, a2) == _md5(mgr, a) != md5
    # their bases were filled hot, from each fork's overlay over its own base (not the
    # store), and checked against the manifest like any other
    sources = {h["snapshot"]: h["source"] for h in basemem.holders(paths)}
    assert sources[s_a.id] == sources[s_b.id] == "overlay"
    for vm in made:
        mgr.remove(vm.id, force=True)
    # the last user gone: the holder exits after its idle time, nothing maps the base
    _wait_gone(paths, snap.id)
    assert not _mapped_anywhere(snap.id)


def test_a_sealed_base_cannot_be_written(hibernated, paths) -> None:
    snap, _marker, _md5 = hibernated
    store = ChunkStore(paths.store)
    with basemem.acquire(paths, store, snap) as b:
        assert fcntl.fcntl(b.fd, fcntl.F_GET_SEALS) & basemem.SEALS == basemem.SEALS
        # the fd a client gets is writable by its open mode; the kernel still refuses
        fd = os.open(f"/proc/self/fd/{b.fd}", os.O_RDWR)
        try:
            for attempt in (
                lambda: os.pwrite(fd, b"x", 0),
                lambda: os.ftruncate(fd, 4096),
                lambda: os.ftruncate(fd, b.size * 2),
                lambda: mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE),
                lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0),  # F_SEAL_SEAL: no change
            ):
                with pytest.raises(PermissionError):
                    attempt()
        finally:
            os.close(fd)
    basemem.retire(paths, snap.id)
    _wait_gone(paths, snap.id)


def _cgroup_shmem(vm) -> int:
    """tmpfs/shmem bytes charged to the memory cgroup of ``vm``'s jailed QEMU."""
    rec = json.loads((vm.dir / "jail.json").read_text())
    assert rec.get("applied"), rec  # (the tests run as root: QEMU is jailed)
    dirs = [Path(d) for d in rec["cgroup"].get("dirs", [])]
    [mem] = [d for d in dirs if (d / "memory.stat").exists()]
    stat = dict(line.split() for line in (mem / "memory.stat").read_text().splitlines())
    return int(stat["shmem"])


def _wait_gone(paths, snap_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(h["snapshot"] == snap_id for h in basemem.holders(paths)) or _holder_pids(snap_id):
        if time.monotonic() > deadline:
            users = {
                pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
                for pid in _mapped_anywhere(snap_id)
            }
            raise AssertionError(f"the holder of {snap_id[:12]} did not exit; users: {users}")
        time.sleep(0.1)


def _holder_pids(snap_id: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            if b"torpor.vmm.basemem" in cmd and snap_id.encode() in cmd:
                out.append(int(d.name))
    return out


def _mapped_anywhere(snap_id: str) -> list[int]:
    """Processes that still map or hold the base (fds named memfd:torpor-base-...)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if f"torpor-base-{snap_id[:12]}" in (d / "maps").read_text():
                out.append(int(d.name))
                continue
            for fd in (d / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if f"torpor-base-{snap_id[:12]}" in os.readlink(fd):
                        out.append(int(d.name))
                        break
    return out


def test_a_killed_holder_is_replaced_and_its_users_keep_their_base(hibernated, paths) -> None:
    snap, _marker, _md5 = hibernated
    store = ChunkStore(paths.store)
    mem = snap.artifacts["memory"]
    with basemem.acquire(paths, store, snap) as b1:
        [held] = [h for h in basemem.holders(paths) if h["snapshot"] == snap.id]
        os.kill(held["pid"], 9)
        _wait_gone(paths, snap.id)  # (its socket file stays: a dead holder's)
        # a user of the old base keeps it, sealed and intact
        basemem.check_sealed(b1.fd, mem.size)
        assert store.check_file(mem, Path(f"/proc/self/fd/{b1.fd}")) == []
        with basemem.acquire(paths, store, snap) as b2:  # a new holder, a new base
            assert b2.source != "holder" and b2.ino != b1.ino
            assert store.check_file(mem, Path(f"/proc/self/fd/{b2.fd}")) == []
    basemem.retire(paths, snap.id)
    _wait_gone(paths, snap.id)


def test_a_base_is_fully_allocated_by_its_filler(tmp_path, monkeypatch) -> None:
    """Zero pages too: a QEMU faulting on a hole of the base would allocate the page
    in its own memory cgroup (measured: 52 MiB of shmem in a fork's cgroup after the
    guest wrote 64 MiB); a base allocated whole is charged once, to its filler."""
    from torpor.paths import Paths

    monkeypatch.setenv("TORPOR_BASE_IDLE", "0")
    paths = Paths(tmp_path / "home")
    paths.locks.mkdir(parents=True)
    paths.tmp.mkdir(parents=True)
    src = tmp_path / "mem"
    with open(src, "wb") as f:  # 16 MiB, 3 MiB of data: a sparse snapshot memory
        f.truncate(16 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(3 << 20))
    with ChunkStore(tmp_path / "home" / "store") as store:
        arts = {
            n: store.put_file(src, chunk_size=1 << 16)[0] for n in ("memory", "disk", "devstate")
        }
        snap = store.commit(arts, parent=None, meta={})
        assert sum(h is None for h in snap.artifacts["memory"].chunks) > 0
        with basemem.acquire(paths, store, snap) as b:
            assert b.source == "store"
            assert os.fstat(b.fd).st_blocks * 512 == 16 << 20
            assert store.check_file(snap.artifacts["memory"], Path(f"/proc/self/fd/{b.fd}")) == []
            # gc retires the bases of snapshots no longer present, and only those
            basemem.retire_missing(paths, {snap.id})
            assert [h["snapshot"] for h in basemem.holders(paths)] == [snap.id]
            basemem.retire_missing(paths, set())
            assert basemem.holders(paths) == []
            basemem.check_sealed(b.fd, 16 << 20)  # its user keeps it
    _wait_gone(paths, snap.id)


def test_a_hot_source_that_cannot_be_read_falls_back_to_the_store(tmp_path, monkeypatch) -> None:
    """A running VM's shadow can vanish between being found and being copied (its VM
    was removed: seen by bench starts); the base then comes from the store."""
    from torpor.paths import Paths
    from torpor.vmm.capture import write_meta
    from torpor.vmm.layout import home_ram_dir

    monkeypatch.setenv("TORPOR_BASE_IDLE", "0")
    paths = Paths(tmp_path / "home")
    paths.locks.mkdir(parents=True)
    paths.tmp.mkdir(parents=True)
    src = tmp_path / "mem"
    with open(src, "wb") as f:
        f.truncate(4 << 20)
        f.write(os.urandom(1 << 20))
    with ChunkStore(tmp_path / "home" / "store") as store:
        arts = {
            n: store.put_file(src, chunk_size=1 << 16)[0] for n in ("memory", "disk", "devstate")
        }
        snap = store.commit(arts, parent=None, meta={})
        ram = home_ram_dir(paths.root)
        assert ram is not None
        shadow = ram / "gone.shadow"  # vouched for the snapshot, but not a readable file
        shadow.mkdir()
        write_meta(ram / "gone.shadow.json", {"snapshot": snap.id, "capture": None})
        try:
            with basemem.acquire(paths, store, snap) as b:
                assert b.source == "store"
                assert store.check_file(arts["memory"], Path(f"/proc/self/fd/{b.fd}")) == []
        finally:
            shadow.rmdir()
    _wait_gone(paths, snap.id)


def test_copy_path_retries_cold_when_the_shadow_vanishes(
    hibernated, shared_vms, paths, monkeypatch
) -> None:
    """The copy path (bases off): a shadow found equal to the snapshot that cannot be
    read when the shim copies it makes the restore come from the store, not fail."""
    from torpor.snapshot import restore
    from torpor.vmm.capture import write_meta
    from torpor.vmm.layout import home_ram_dir

    snap, _marker, md5 = hibernated
    monkeypatch.setenv("TORPOR_RAM_BASE", "0")
    (paths.snapshot_cache / snap.id / "memory").unlink(missing_ok=True)
    ram = home_ram_dir(paths.root)
    assert ram is not None
    # named after a VM that exists (the hibernated source: its own shadow is gone), so
    # nothing reaps it as a leftover
    shadow = ram / f"{snap.meta['source_vm']}.shadow"
    shadow.mkdir()
    write_meta(ram / f"{shadow.name}.json", {"snapshot": snap.id, "capture": None})
    try:
        vm = restore(shared_vms.mgr, snap.id, name="copy-vanished")
        shared_vms.ids.append(vm.id)
        assert vm.files.ram.exists()  # the copy path
        assert _md5(shared_vms.mgr, vm) == md5
        shared_vms.mgr.remove(vm.id, force=True)
    finally:
        shadow.rmdir()
        (ram / f"{shadow.name}.json").unlink(missing_ok=True)


def test_bench_fork_writes_json(tools_image: str, tmp_path: Path) -> None:
    """`torpor bench fork` runs its four modes and removes its VMs (figures not asserted,
    only what each mode is made of: copies in the copy mode, one base in the others, the
    identity set by the agent except in the exec row)."""
    from tests.conftest import torpor_cli

    out = tmp_path / "fork.json"
    before = torpor_cli("ps", "-aq").stdout
    r = torpor_cli(
        "bench", "fork", "--image", tools_image, "-n", "2", "--live", "4", "--settle", "0",
        "--json", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    rows = {row["mode"]: row for row in data["rows"]}
    assert set(rows) == {"copy", "shared (fill)", "shared (held)", "held, identity exec"}
    for mode, row in rows.items():
        assert row["md5_ok"] == 2 and row["restore_only_ok"] == 2
        assert row["identity"] == ("exec" if "exec" in mode else "agent")
        assert row["phases_p50"]["qemu_to_hello_ms"] > 0
    assert rows["copy"]["memory_settled"]["files"] > 0
    for mode in ("shared (fill)", "shared (held)", "held, identity exec"):
        mem = rows[mode]["memory_settled"]
        assert mem["files"] == 0 and mem["bases"] == 256 << 20
    assert b"fork: wall" in r.stdout
    assert torpor_cli("ps", "-aq").stdout == before
