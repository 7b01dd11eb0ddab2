"""The pool of spare VMs (torpor.vmm.pool): a hot restore claims a restored-and-parked
VM.  Real VMs throughout; one source VM and snapshot for the module."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VMs
from tests.vm.test_private_files import _not_private
from torpor.snapshot import restore, snapshot
from torpor.snapshot.core import remove_snapshot
from torpor.vmm import pool
from torpor.vmm.state import alive, load_state

pytestmark = pytest.mark.vm

SETUP = (
    "head -c 1000000 /dev/urandom > /root/data; "
    "(while :; do sleep 1; done) >/dev/null 2>&1 & echo $! > /root/pid"
)
CHECK = "md5sum /root/data | cut -d' ' -f1; kill -0 $(cat /root/pid) && echo alive"


@pytest.fixture(scope="module")
def source(paths, tools_image) -> Iterator[tuple[VMs, str, str]]:
    """A running VM with a file and a background process, and a snapshot of it."""
    f = VMs(paths)
    try:
        vm = f.run(tools_image, "sleep", "infinity", name="pool-source")
        with f.mgr.client(vm) as c:
            assert c.exec(["sh", "-c", SETUP]).status.code == 0
            expected = c.exec(["sh", "-c", CHECK]).stdout.decode()
        assert expected.endswith("alive\n")
        snap = snapshot(f.mgr, vm.id).manifest.id
        yield f, snap, expected
    finally:
        pool.drain(paths)
        f.cleanup()


@pytest.fixture
def pooled(monkeypatch, paths) -> Iterator[None]:
    monkeypatch.setenv("TORPOR_POOL", "1")
    monkeypatch.setenv("TORPOR_POOL_IDLE", "120")
    yield
    pool.drain(paths)


def _wait(cond, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = cond()
        if r:
            return r
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {cond}")


def _spares(paths, snap: str, n: int = 1) -> list[dict]:
    def ready() -> list[dict]:
        s = [x for x in pool.spares(paths) if x.get("snapshot") == snap]
        return s if len(s) >= n else []

    return _wait(ready)


def _check(mgr, vm) -> str:
    with mgr.client(vm) as c:
        return c.exec(["sh", "-c", CHECK]).stdout.decode()


def _gone(paths, spare: dict) -> bool:
    st_dir = paths.vm(spare["vm"])
    return not st_dir.exists() and not alive(int(spare["pid"]), int(spare["start"]))


def test_pooled_restore_gives_the_same_guest_as_a_plain_one(source, paths, pooled) -> None:
    f, snap, expected = source
    plain = restore(f.mgr, snap, name="pool-plain")  # no spare yet: the ordinary way
    f.ids.append(plain.id)
    spare = _spares(paths, snap)[0]
    # a spare's folder and the registry are as private as any VM's files
    assert not _not_private(paths.vm(spare["vm"])) and not _not_private(paths.locks / "pool")
    vm = restore(f.mgr, snap, name="pool-claimed")
    f.ids.append(vm.id)
    assert vm.id == spare["vm"]  # the spare, not a new VM
    assert vm.name == "pool-claimed" and f.mgr.get("pool-claimed").id == vm.id
    assert "claimed as VM pool-claimed" in (vm.dir / "shim.log").read_text()
    assert _check(f.mgr, plain) == expected
    assert _check(f.mgr, vm) == expected
    # the claimed VM is an ordinary VM now: listed, snapshottable, removable
    assert vm.id in {v.id for v in f.mgr.list()}
    assert not (vm.dir / ".creating").exists()
    again = snapshot(f.mgr, vm.id)
    assert again.manifest.id != snap
    f.mgr.remove(vm.id, force=True)
    assert not vm.dir.exists()


def _policies(pid: int) -> set[int]:
    return {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(os.geteuid() != 0, reason="spares are deprioritized only as root")
def test_a_spare_waits_on_idle_cpu_and_runs_normally_once_claimed(source, paths, pooled) -> None:
    f, snap, expected = source
    pool.want(paths, snap)
    spare = _spares(paths, snap)[0]
    st = load_state(paths.vm(spare["vm"]))
    # parked: its shim and every QEMU thread only get CPU nobody else wants
    assert _policies(st.shim_pid) == {os.SCHED_IDLE}
    assert _policies(st.qemu_pid) == {os.SCHED_IDLE}
    vm = restore(f.mgr, snap, name="pool-idle-claimed", keep_pool=False)
    f.ids.append(vm.id)
    assert vm.id == spare["vm"]
    # claimed: the guest it restores is the snapshot's, run at normal priority
    assert _check(f.mgr, vm) == expected
    assert _policies(vm.state.shim_pid) == {os.SCHED_OTHER}
    assert _policies(vm.state.qemu_pid) == {os.SCHED_OTHER}


def test_concurrent_claims_never_share_a_spare(source, paths, pooled, monkeypatch) -> None:
    f, snap, expected = source
    monkeypatch.setenv("TORPOR_POOL", "2")
    pool.want(paths, snap)
    ready = {s["vm"] for s in _spares(paths, snap, 2)}
    results: list[object] = []
    gate = threading.Barrier(6)

    def one() -> None:
        gate.wait()
        try:
            results.append(pool.claim(f.mgr, snap, None))
        except Exception as e:  # recorded, asserted below
            results.append(e)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    got = [r for r in results if r is not None]
    assert len(results) == 6 and not any(isinstance(r, Exception) for r in got), results
    f.ids.extend(v.id for v in got)  # type: ignore[attr-defined]
    ids = [v.id for v in got]  # type: ignore[attr-defined]
    assert len(ids) == 2 and len(set(ids)) == 2 and set(ids) <= ready
    for v in got:
        assert _check(f.mgr, v) == expected


def test_a_spare_whose_qemu_died_is_discarded(source, paths, pooled) -> None:
    f, snap, expected = source
    pool.want(paths, snap)
    spare = _spares(paths, snap)[0]
    st = load_state(paths.vm(spare["vm"]))
    os.kill(st.qemu_pid, signal.SIGKILL)
    vm = restore(f.mgr, snap)  # may meet the dead spare first: still succeeds
    f.ids.append(vm.id)
    assert vm.id != spare["vm"]
    assert _check(f.mgr, vm) == expected
    _wait(lambda: _gone(paths, spare), 30)
    assert not alive(st.qemu_pid, st.qemu_start)


def test_the_pool_stops_when_disabled_idle_or_drained(source, paths, monkeypatch) -> None:
    f, snap, _ = source
    registry = paths.locks / "pool" / snap
    # disabled: nothing is started, nothing is claimed
    monkeypatch.setenv("TORPOR_POOL", "0")
    assert pool.want(paths, snap) == 0
    vm = restore(f.mgr, snap)
    f.ids.append(vm.id)
    assert not registry.exists() or not list(registry.iterdir())
    f.mgr.remove(vm.id, force=True)
    # idle: a spare nobody claims goes away by itself, QEMU and folder included
    monkeypatch.setenv("TORPOR_POOL", "1")
    monkeypatch.setenv("TORPOR_POOL_IDLE", "2")
    assert pool.want(paths, snap) == 1
    spare = _spares(paths, snap)[0]
    qemu = load_state(paths.vm(spare["vm"]))
    _wait(lambda: _gone(paths, spare), 60)
    assert not alive(qemu.qemu_pid, qemu.qemu_start)
    assert not [p for p in registry.glob("*") if not p.name.startswith(".")]
    # drained: removing the snapshot stops its spares at once
    monkeypatch.setenv("TORPOR_POOL_IDLE", "120")
    snap2 = snapshot(f.mgr, "pool-source").manifest.id
    assert pool.want(paths, snap2) == 1
    spare = _spares(paths, snap2)[0]
    qemu = load_state(paths.vm(spare["vm"]))
    remove_snapshot(f.mgr, snap2)
    _wait(lambda: _gone(paths, spare), 30)
    assert not alive(qemu.qemu_pid, qemu.qemu_start)
    assert not Path(paths.locks / "pool" / snap2).exists()


def test_cli_restore_through_the_pool_keeps_its_errors(source, paths, pooled) -> None:
    from tests.conftest import torpor_cli

    f, snap, expected = source
    pool.want(paths, snap)
    spare = _spares(paths, snap)[0]
    # a bad name is refused before any spare is touched
    r = torpor_cli("restore", "--name", "../bad", snap)
    assert r.returncode == 2 and b"invalid VM name" in r.stderr, r.stderr
    # an id nobody has: no spare, the ordinary path says so
    assert torpor_cli("restore", "0" * 64).returncode == 3
    r = torpor_cli("restore", "--name", "pool-cli", snap)
    assert r.returncode == 0, r.stderr
    vm_id = r.stdout.decode().split()[-1]
    f.ids.append(vm_id)
    assert vm_id == spare["vm"] and b"restored pool-cli in" in r.stderr
    assert _check(f.mgr, f.mgr.get("pool-cli")) == expected
    # a taken name: ConflictError as ever, and the spare it would have used stays pooled
    spare = _spares(paths, snap)[0]
    r = torpor_cli("restore", "--name", "pool-cli", snap)
    assert r.returncode == 4 and b"already in use" in r.stderr, r.stderr
    assert spare["vm"] in {s["vm"] for s in pool.spares(paths)}
    # with a ready spare, a CLI restore by full id loads neither the snapshot nor the
    # store layers, nor rich (the import trimming of the pooled path)
    from tests.cli.test_startup import _forbidden, _imported

    _spares(paths, snap)
    mods, code = _imported("restore", "--name", "pool-probe", snap)
    f.ids.append(f.mgr.get("pool-probe").id)
    assert code == 0 and "torpor.vmm.pool" in mods
    assert _forbidden(mods) == []
    # the memory spares hold is accounted: `system df` shows it
    _spares(paths, snap)  # (the one the probe's restore asked for)
    r = torpor_cli("system", "df")
    assert r.returncode == 0 and b"Pool spares (memory)" in r.stdout, r.stdout


def test_a_spare_ends_when_its_home_is_removed(paths, tools_image, tmp_path, monkeypatch) -> None:
    import shutil

    from torpor.paths import Paths
    from torpor.vmm.manager import RunRequest, VMManager

    home = tmp_path / "home"
    (home / "guest").mkdir(parents=True)
    for src, dst in (
        (paths.guest / "kernels", home / "guest" / "kernels"),
        (paths.images, home / "images"),
    ):
        shutil.copytree(
            src, dst, symlinks=True, copy_function=os.link
        )  # shared inodes, never written
    other = Paths(home).ensure()
    mgr = VMManager(other)
    monkeypatch.setenv("TORPOR_POOL", "1")
    monkeypatch.setenv("TORPOR_POOL_IDLE", "120")
    vm = mgr.run(
        RunRequest(image=tools_image, command=("sleep", "infinity"), memory_mib=256, network=False)
    )
    try:
        snap = snapshot(mgr, vm.id).manifest.id
        assert pool.want(other, snap) == 1
        spare = _spares(other, snap)[0]
        st = load_state(other.vm(spare["vm"]))
    finally:
        mgr.remove(vm.id, force=True)
    # `rm -rf` of the home while its processes still write in it: until it is gone
    _wait(lambda: shutil.rmtree(home, ignore_errors=True) or not home.exists(), 30)
    _wait(lambda: not alive(int(spare["pid"]), int(spare["start"])), 30)
    assert not alive(st.qemu_pid, st.qemu_start)


def test_a_spare_made_under_other_settings_is_never_claimed(
    source, paths, pooled, monkeypatch
) -> None:
    f, snap, _ = source
    pool.want(paths, snap)
    spare = _spares(paths, snap)[0]
    monkeypatch.setenv("TORPOR_KERNEL_LOGLEVEL", "debug")  # a TORPOR_* setting of VMs
    assert pool.claim(f.mgr, snap, None) is None  # never the spare of the other kind
    assert spare["vm"] in {s["vm"] for s in pool.spares(paths)}
    # ...nor does it stand in for a spare of this kind
    assert pool.want(paths, snap) == 1
