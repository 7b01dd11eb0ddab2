"""Stateful property test: random VM lifecycles against a model (tests/property/model.py).

Hypothesis draws sequences of run, exec writes, snapshot, snapshot --stop
(hibernate), start, stop, restore, fork, rm, snapshot rm and gc; after every step
it checks that ``ps`` matches the model, that every running VM's disk and memory
files hold the generations the model says, that the store verifies, and that no
ended VM left a process or RAM file behind.  A failure shrinks to a minimal
sequence, which goes into test_found_sequences.py as a plain regression test.

Profiles: see ``SETTINGS`` in tests/property/model.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import torpor_cli
from tests.property.model import (
    SETTINGS,
    STATUS,
    TIMEOUT,
    Seen,
    SnapModel,
    VMModel,
    check_all,
    remember,
    write_gen,
)
from torpor.errors import ConflictError, TorporError
from torpor.paths import Paths
from torpor.snapshot import fork, restore, snapshot
from torpor.store import ChunkStore
from torpor.vmm.manager import RunRequest, VMManager

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(TIMEOUT)]

MAX_VMS = 3  # live VMs at once (2 shared cores, TCG)
_names = itertools.count(1)


class VMLifecycle(RuleBasedStateMachine):
    def __init__(self, paths: Paths, image: str):
        super().__init__()
        self.mgr = VMManager(paths)
        self.image = image
        self.vms: dict[str, VMModel] = {}
        self.snaps: dict[str, SnapModel] = {}
        self.seen: dict[str, Seen] = {}
        self.removed: set[str] = set()
        self.gen = 0

    # -- helpers -----------------------------------------------------------------------
    def _name(self) -> str:
        return f"pt{os.getpid()}-{next(_names)}"

    def _with(self, state: str) -> list[str]:
        # insertion order, never sorted: names and snapshot ids differ between runs, and
        # a replayed choice must pick the same VM for hypothesis to shrink
        return [n for n, m in self.vms.items() if m.state == state]

    def _live(self) -> int:
        return sum(m.state == "running" for m in self.vms.values())

    def _add_running(self, name: str, disk: int | None, mem: int | None, last: str | None):
        self.vms[name] = VMModel(name, "running", disk, mem, last)
        remember(self.mgr, name, self.seen)

    # -- rules -------------------------------------------------------------------------
    @precondition(lambda self: self._live() < MAX_VMS)
    @rule()
    def run(self) -> None:
        name = self._name()
        req = RunRequest(image=self.image, command=("sleep", "infinity"), name=name, memory_mib=256)
        self.mgr.run(req)
        self._add_running(name, None, None, None)

    @precondition(lambda self: self._with("running"))
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._with("running")), label="vm")
        self.gen += 1
        write_gen(self.mgr, name, self.gen)
        self.vms[name].disk = self.vms[name].mem = self.gen

    @precondition(lambda self: self._with("running"))
    @rule(data=st.data(), hibernate=st.booleans())
    def snapshot(self, data: st.DataObject, hibernate: bool) -> None:
        name = data.draw(st.sampled_from(self._with("running")), label="vm")
        m = self.vms[name]
        if hibernate:  # through the CLI: `snapshot --stop` is the contract
            r = torpor_cli("snapshot", name, "--stop")
            assert r.returncode == 0, r.stderr.decode()
            snap_id = r.stdout.decode().strip()
            parent = ChunkStore(self.mgr.paths.store).get(snap_id).parent
            m.state = "hibernated"
        else:
            res = snapshot(self.mgr, name)
            snap_id, parent = res.manifest.id, res.manifest.parent
        assert parent == m.last_snap, f"parent {parent}, expected {m.last_snap}"
        self.snaps[snap_id] = SnapModel(snap_id, m.disk, m.mem, parent)
        m.last_snap = snap_id

    @precondition(lambda self: self._with("running"))
    @rule(data=st.data())
    def stop(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._with("running")), label="vm")
        self.mgr.stop(name)
        self.vms[name].state = "stopped"

    @precondition(
        lambda self: self._live() < MAX_VMS and (self._with("stopped") or self._with("hibernated"))
    )
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        name = data.draw(
            st.sampled_from(self._with("stopped") + self._with("hibernated")), label="vm"
        )
        m = self.vms[name]
        self.mgr.start(name)
        if m.state == "stopped":
            m.mem = None  # a cold boot: guest RAM (and its tmpfs) starts empty
        m.state = "running"
        remember(self.mgr, name, self.seen)

    @precondition(lambda self: self._live() < MAX_VMS and self.snaps)
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        snap = self.snaps[data.draw(st.sampled_from(list(self.snaps)), label="snapshot")]
        name = self._name()
        restore(self.mgr, snap.id, name=name)
        self._add_running(name, snap.disk, snap.mem, snap.id)

    @precondition(lambda self: self._live() < MAX_VMS - 1 and self.snaps)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        snap = self.snaps[data.draw(st.sampled_from(list(self.snaps)), label="snapshot")]
        prefix = self._name()
        made = fork(self.mgr, snap.id, 2, name_prefix=prefix)
        assert sorted(v.name for v in made) == [f"{prefix}-1", f"{prefix}-2"]
        for v in made:
            self._add_running(v.name, snap.disk, snap.mem, snap.id)

    @precondition(lambda self: self.vms)
    @rule(data=st.data())
    def rm(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(list(self.vms)), label="vm")
        vm = self.mgr.get(name)
        self.mgr.remove(name, force=True)
        self.removed.add(vm.id)
        del self.vms[name]

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def snapshot_rm(self, data: st.DataObject) -> None:
        # a hibernated VM's own snapshot is what `start` brings back: not offered
        held = {m.last_snap for m in self.vms.values() if m.state == "hibernated"}
        choices = [s for s in self.snaps if s not in held]
        if not choices:
            return
        snap = data.draw(st.sampled_from(choices), label="snapshot")
        has_children = any(s.parent == snap for s in self.snaps.values())
        store = ChunkStore(self.mgr.paths.store)
        try:
            if has_children:
                with pytest.raises(ConflictError):
                    store.remove(snap)
                return
            store.remove(snap)
        finally:
            store.close()
        del self.snaps[snap]
        for m in self.vms.values():  # its next snapshot has no parent to build on
            if m.last_snap == snap:
                m.last_snap = None

    @rule()
    def gc(self) -> None:
        r = torpor_cli("gc", "--grace", "0")
        assert r.returncode == 0, r.stderr.decode()

    # -- invariants --------------------------------------------------------------------
    @invariant()
    def matches_model(self) -> None:
        check_all(self.mgr, self.vms, self.seen, self.removed)

    def teardown(self) -> None:
        for name in list(self.vms):
            with contextlib.suppress(TorporError):
                self.removed.add(self.mgr.get(name).id)
                self.mgr.remove(name, force=True)
        store = ChunkStore(self.mgr.paths.store)
        for snap in self.snaps:
            with contextlib.suppress(TorporError):
                store.remove(snap, force=True)
        store.close()


def test_vm_lifecycle_matches_model(paths: Paths, tools_image: str) -> None:
    assert set(STATUS) == {"running", "stopped", "hibernated"}
    run_state_machine_as_test(lambda: VMLifecycle(paths, tools_image), settings=SETTINGS)
    r = torpor_cli("verify")
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
