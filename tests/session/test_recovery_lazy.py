"""A recovery's restore is lazy by default (issue 13 §1: a recovery that does not grow
with the guest's RAM): the checkpoint's memory is served from the store on demand
(torpor.vmm.lazymem) while the replayed turn runs, and that turn's checkpoint does not
wait for the rest to stream in.  The recovered session is the pre-crash one (a file
only in guest RAM, a disk file, a running process, the messages), and so is the one
recovered again, in full (``TORPOR_LAZY_RESTORE=0``), from the checkpoint the lazily
restored VM took.  A damaged checkpoint is refused (tests/session/test_recovery_oneoff.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.session.test_recovery_oneoff import PROBE, _crash, _exec, prepared
from torpor.paths import Paths
from torpor.session import Session
from torpor.snapshot import journal
from torpor.vmm import lazymem
from torpor.vmm.manager import VMManager

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def session(paths: Paths, tools_image: str) -> Iterator[tuple[Session, str]]:
    if lazymem.available() is not None:
        pytest.skip(f"lazy restore unavailable: {lazymem.available()}")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TORPOR_LAZY_RESTORE", raising=False)  # the default
        with prepared(paths, tools_image, "lazy-recovery") as got:
            yield got


def test_a_recovery_is_lazy_and_its_checkpoint_restores_in_full(
    session, paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, probe = session
    mgr = VMManager(paths)
    before = s.messages()
    _crash(s, mgr, "still there?")
    assert s.recover() == "answer 0"  # the replayed turn, checkpointed
    vm = s.vm()
    assert vm is not None
    assert lazymem.is_mounted(vm.files.ram)  # served lazily, not materialized
    assert _exec(mgr, vm, PROBE) == probe
    first = s.state().last_checkpoint.snapshot
    # the replayed turn's checkpoint went through the journal (committed behind the
    # answer), as any turn's: the lazy VM's overlay, not its streamed shadow, says
    # which snapshot its RAM copy equals
    journal.wait_all()
    assert first in journal.commits

    # the checkpoint the lazy VM took, restored in full from the store
    monkeypatch.setenv("TORPOR_LAZY_RESTORE", "0")
    _crash(s, mgr, "and now?")
    assert s.recover() == "answer 1"
    vm = s.vm()
    assert vm is not None
    assert not lazymem.is_mounted(vm.files.ram)
    assert _exec(mgr, vm, PROBE) == probe
    assert s.state().last_checkpoint.snapshot != first
    assert [(m["role"], m["content"]) for m in s.messages()[len(before) :]] == [
        ("user", "still there?"),
        ("assistant", "answer 0"),
        ("user", "and now?"),
        ("assistant", "answer 1"),
    ]


def test_a_recovery_never_copies_the_ram_of_the_vm_it_removes(
    paths, tools_image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker died, its VM lives on, and that VM's RAM shadow still equals the
    checkpoint (committed).  The recovery removes that VM while it restores; a restore
    that copied its shadow raced the removal (seen in the thesis harness: the shim's
    copy found the file gone, and the restore began again, in full from the store).
    It restores lazily from the store instead, and is the pre-crash session."""
    from torpor.snapshot import core
    from torpor.vmm.capture import read_meta

    found: list[object] = []
    real = core.find_shadow

    def spy(mgr, snap_id):
        got = real(mgr, snap_id)
        found.append(got)
        return got

    with prepared(paths, tools_image, "recovery-old-shadow") as (s, probe):
        mgr = VMManager(paths)
        journal.wait_all()
        ck = s.state().last_checkpoint
        old = s.vm()
        assert old is not None
        assert read_meta(old.files.shadow_meta).get("snapshot") == ck.snapshot  # the setup
        s.append("user", {"content": "still there?"})  # the worker dies; its VM runs on
        monkeypatch.setattr(core, "find_shadow", spy)
        assert s.recover() == "answer 0"
        assert old.files.shadow not in found
        vm = s.vm()
        assert vm is not None and vm.id != old.id
        assert lazymem.is_mounted(vm.files.ram)
        assert _exec(mgr, vm, PROBE) == probe
