"""A recovery's restore is one-off: the session restores its checkpoint once, so the
checkpoint's RAM goes straight into the new VM's own file — no shared sealed base is
filled (and no holder process started) for it — unless a base of that snapshot is
already held, which it maps (nothing copied).  On that path the recovered session is
the pre-crash one (guest files, a RAM-only file, a running process, the messages),
and checkpoint RAM altered in the store is refused, never restored.

One real VM session (shared bases forced on, as on any host where the RAM-less
capture works), crashed three times: an acknowledged user message, then the VM
killed.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chunkfiles import damaged
from torpor.errors import TorporError
from torpor.model import ScriptedModel, parse_script
from torpor.paths import Paths
from torpor.session import Session
from torpor.snapshot import journal
from torpor.store.home import home_store
from torpor.vmm import basemem
from torpor.vmm.manager import VMManager

pytestmark = pytest.mark.vm

_names = itertools.count()

SETUP = (
    "mkdir -p /m /work && mount -t tmpfs m /m && "
    "head -c 262144 /dev/urandom > /m/live && echo kept > /work/f && "
    "setsid sh -c 'echo $$ > /work/bg.pid; exec sleep 100000' </dev/null >/dev/null 2>&1 & "
    "while [ ! -s /work/bg.pid ]; do sleep 0.01; done; echo ok"
)
PROBE = "md5sum /m/live; cat /work/f; p=$(cat /work/bg.pid); kill -0 $p && echo alive $p"


def _model() -> ScriptedModel:
    steps = [{"text": f"answer {i}"} for i in range(8)]
    return ScriptedModel(parse_script({"version": 1, "turns": [{"steps": [s]} for s in steps]}))


def _exec(mgr: VMManager, vm: Any, cmd: str) -> str:
    with mgr.client(vm) as c:
        r = c.exec(["sh", "-c", cmd], timeout=60)
    assert r.status.code == 0, r.stderr
    return r.stdout.decode()


def _crash(s: Session, mgr: VMManager, text: str) -> None:
    """Acknowledge ``text`` as the next turn, then kill the VM: an interrupted turn."""
    s.append("user", {"content": text})
    vm = s.vm()
    assert vm is not None
    mgr.kill(vm.id)


def _base_inodes(s: Session, snap: str) -> set[int]:
    """Inodes of ``snap``'s shared base that the session's QEMU maps (guest RAM)."""
    vm = s.vm()
    assert vm is not None and vm.state.qemu_pid
    with open(f"/proc/{vm.state.qemu_pid}/maps") as f:
        return {int(ln.split()[4]) for ln in f if f"torpor-base-{snap[:12]}" in ln}


@contextlib.contextmanager
def prepared(paths: Paths, image: str, name: str) -> Iterator[tuple[Session, str]]:
    """A session whose guest ran :data:`SETUP`, checkpointed; with what PROBE printed."""
    s = Session.create(image, _model(), name=name, paths=paths)
    try:
        vm = s.vm()
        assert vm is not None
        assert _exec(VMManager(paths), vm, SETUP).strip() == "ok"
        s.checkpoint(reason="turn")
        yield s, _exec(VMManager(paths), vm, PROBE)
    finally:
        s.remove()
        s.close()


@pytest.fixture(scope="module")
def session(paths: Paths, tools_image: str) -> Iterator[tuple[Session, str]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORPOR_RAM_BASE", "1")
        mp.setenv("TORPOR_BASE_IDLE", "2")
        with prepared(paths, tools_image, f"oneoff-{next(_names)}") as got:
            yield got


def test_recovery_fills_no_base_and_equals_the_pre_crash_session(session, paths) -> None:
    s, probe = session
    mgr = VMManager(paths)
    before = s.messages()
    snap = s.state().last_checkpoint.snapshot
    _crash(s, mgr, "still there?")
    assert s.recover() == "answer 0"
    assert _base_inodes(s, snap) == set()  # one-off: the RAM in the VM's own file
    assert not basemem.sock_path(paths, snap).exists()  # no base holder started for it
    vm = s.vm()
    assert _exec(mgr, vm, PROBE) == probe  # RAM-only file, disk file, the same process
    after = s.messages()
    assert after[: len(before)] == before
    assert [(m["role"], m["content"]) for m in after[len(before) :]] == [
        ("user", "still there?"),
        ("assistant", "answer 0"),
    ]


def test_recovery_maps_a_base_already_held(session, paths) -> None:
    s, probe = session
    mgr = VMManager(paths)
    snap = s.state().last_checkpoint.snapshot
    journal.finish(paths, snap)
    store = home_store(paths)
    try:
        held = basemem.acquire(paths, store, store.get(snap))
    finally:
        store.close()
    with held:
        _crash(s, mgr, "and now?")
        assert s.recover() == "answer 1"
        assert _base_inodes(s, snap) == {held.ino}  # mapped, not copied
    assert _exec(mgr, s.vm(), PROBE) == probe


def test_tampered_checkpoint_ram_is_refused(session, paths) -> None:
    """Damages the checkpoint's memory chunks its parent does not have (the store is
    the test session's: they are put back after), then recovers: refused; repaired:
    recovered."""
    s, probe = session
    mgr = VMManager(paths)
    ck = s.state().last_checkpoint
    journal.finish(paths, ck.snapshot)
    store = home_store(paths)
    try:
        m = store.get(ck.snapshot)
        parent = store.get(m.parent) if m.parent else None
        old = set(parent.artifacts["memory"].chunks) if parent else set()
        mine = [h for h in set(m.artifacts["memory"].chunks) if h not in old]
        assert mine, "the checkpoint should have memory chunks of its own"
        with damaged(store, mine):  # loose or packed frames; put back after
            _crash(s, mgr, "hello?")
            with pytest.raises(TorporError, match="corrupt chunk"):  # the store's hash check
                s.recover()
    finally:
        store.close()
    assert s.recover() == "answer 2"
    assert _base_inodes(s, ck.snapshot) == set()
    assert _exec(mgr, s.vm(), PROBE) == probe
