"""A recovery never waits for a journal's store commit (issue 13 §1).

A turn's checkpoint is durable once its journal is on disk; the store commit runs
behind in the worker.  When the worker is killed right after the checkpoint, the
recovering process restores the VM from the parent's chunks plus the journal's
(every chunk hash-checked, the rebuilt chunk list must give the journal's snapshot
id) and commits the journal behind, in a thread, once the VM runs.  Checked here:
the recovered VM equals the pre-crash checkpoint (guest files, a running process,
the messages) while the store has no manifest of it yet; the commit follows; a
journal altered in its chunk data or its header is refused, naming the snapshot,
and nothing runs on it; kill -9 of the restoring process mid-restore and
mid-commit leaves the journal (or the manifest) and a second recovery works.

One VM boot; each crash is a child process running one turn (killed once its
answer is out, the background commit held by ``journal.commit=eio``), each
recovery a restore.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor import failpoints
from torpor.errors import NotFoundError, StoreError, TorporError
from torpor.paths import Paths
from torpor.session import Session
from torpor.session.core import _answer_of
from torpor.snapshot import journal
from torpor.store.home import home_store
from torpor.vmm.manager import VMManager
from torpor.vmm.state import Status

pytestmark = pytest.mark.vm

CHILD = """
import os, signal, sys
from torpor.session import Session
from torpor.snapshot import journal
mode, name, dsn, text = sys.argv[1:5]
s = Session.open(name, dsn=dsn)
if mode == "turn":  # answered, then killed: the commit (journal.commit=eio) never ran
    print("ANSWER", s.send(text, key=text), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
print("RECOVERED", s.recover(), flush=True)
journal.wait_all()  # the commit behind the restore (killed there by a failpoint)
"""

SETUP = (
    "mkdir -p /work && setsid sh -c 'echo $$ > /work/bg.pid; exec sleep 100000' "
    "</dev/null >/dev/null 2>&1 & while [ ! -s /work/bg.pid ]; do sleep 0.01; done; echo ok"
)
PROBE = "p=$(cat /work/bg.pid); kill -0 $p && echo alive $p"


@pytest.fixture(scope="module")
def session(
    paths: Paths, tools_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Session, str, str]]:
    dsn = str(tmp_path_factory.mktemp("recjournal") / "ctx.db")
    s = Session.create(image=tools_image, model="scripted:bench", paths=paths, dsn=dsn)
    try:
        assert _sh(s, SETUP).strip() == "ok"
        s.send("turn 1", key="turn 1")  # checkpoint 0 was a first snapshot: this one journals
        yield s, dsn, _sh(s, PROBE)
    finally:
        journal.finish_all(paths)
        s.remove()
        s.close()


def _sh(s: Session, cmd: str) -> str:
    r = s.sandbox.exec(["sh", "-c", cmd])
    out = r.stdout
    return out.decode() if isinstance(out, bytes) else out


def _child(paths: Paths, mode: str, name: str, dsn: str, text: str, env: dict[str, str]):
    full = dict(os.environ, TORPOR_HOME=str(paths.root), TORPOR_FAILPOINTS="")
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", CHILD, mode, name, dsn, text],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _lines(turns: int) -> list[str]:
    return [f"turn-{i}" for i in range(turns)]


def _journaled_turn(
    s: Session, dsn: str, label: str, gone: bool = False
) -> tuple[Session, str, int]:
    """A turn answered by a worker killed before its commit; the VM killed too (its
    RAM shadow, which equals the checkpoint, stays until the recovery removes the VM),
    or with ``gone`` removed (the RAM then comes from the store and the journal).
    Returns the session as a new process sees it, the pending snapshot, the turn."""
    turns = s.state().turns
    text = f"turn {turns + 1} ({label})"
    r = _child(s.paths, "turn", s.name, dsn, text, {"TORPOR_FAILPOINTS": "journal.commit=eio"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert f"ANSWER ok {turns}" in r.stdout
    t = Session.open(s.name, paths=s.paths, dsn=dsn)
    snap = t.checkpoints[-1].snapshot
    assert journal.pending(t.paths, snap)  # durable only in the journal
    _kill_vm(t)
    vm = t.vm()
    if gone and vm is not None:
        VMManager(t.paths).remove(vm.id, force=True)
    return t, snap, turns + 1


def _kill_vm(s: Session) -> None:
    with contextlib.suppress(TorporError):
        vm = s.vm()
        if vm is not None:
            VMManager(s.paths).kill(vm.id)


def _stored(paths: Paths, snap: str) -> bool:
    store = home_store(paths)
    try:
        return store.get(snap).id == snap
    except NotFoundError:
        return False
    finally:
        store.close()


def _check_recovered(t: Session, turn: int, probe: str) -> None:
    assert _sh(t, "cat /work/log").split() == _lines(turn)
    assert _sh(t, PROBE) == probe  # the same process, still running
    assert _answer_of(t.log(), turn) == f"ok {turn - 1}"


def test_recovery_restores_from_the_journal_before_its_commit(session) -> None:
    s, dsn, probe = session
    t, snap, turn = _journaled_turn(s, dsn, "held")
    before = t.messages()
    failpoints.enable("journal.commit", "eio")  # the commit behind the restore fails
    try:
        assert t.recover() is None
        journal.wait_all()
        # the VM runs on the checkpoint while the store has no manifest of it: the
        # restore did not commit first
        assert journal.pending(t.paths, snap) and not _stored(t.paths, snap)
        _check_recovered(t, turn, probe)
        assert t.messages() == before
    finally:
        failpoints.disable("journal.commit")
    assert journal.finish(t.paths, snap) is not None  # the journal itself was kept whole
    assert _stored(t.paths, snap)
    t.close()


def test_the_journal_is_committed_behind_and_the_session_goes_on(session) -> None:
    s, dsn, probe = session
    t, snap, turn = _journaled_turn(s, dsn, "behind", gone=True)
    journal.commits.pop(snap, None)
    assert t.recover() is None
    # the next turn's checkpoint builds on the snapshot while its commit may still run
    assert t.send("next", key=f"{snap} next") == f"ok {turn}"
    journal.wait_all()
    assert snap in journal.commits  # committed by the thread behind the restore
    assert not journal.pending(t.paths, snap) and _stored(t.paths, snap)
    last = t.checkpoints[-1].snapshot
    assert not journal.pending(t.paths, last) and _stored(t.paths, last)
    _check_recovered(t, turn + 1, probe)
    t.close()


def _rewrite(path: Path, edit) -> bytes:
    """Rewrite journal ``path`` as ``edit(header, blob)`` makes it; returns the original."""
    good = path.read_bytes()
    n = int.from_bytes(good[len(journal.MAGIC) : len(journal.MAGIC) + 8], "big")
    start = len(journal.MAGIC) + 8
    header, blob = json.loads(good[start : start + n]), good[start + n :]
    header, blob = edit(header, blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(journal.MAGIC + len(head).to_bytes(8, "big") + head + blob)
    return good


def _flip_chunk_byte(header: dict, blob: bytes) -> tuple[dict, bytes]:
    lens = header["artifacts"]["memory"]["lengths"]
    at = next(i for i, ln in enumerate(lens) if ln)  # a memory chunk with data
    pos = sum(lens[:at]) + lens[at] // 2
    return header, blob[:pos] + bytes([blob[pos] ^ 0x40]) + blob[pos + 1 :]


def _shift_chunk_index(header: dict, blob: bytes) -> tuple[dict, bytes]:
    mem = header["artifacts"]["memory"]
    taken = set(mem["changed"])
    at = next(i for i, ln in enumerate(mem["lengths"]) if ln)
    free = next(i for i in range(mem["changed"][at] + 1, 1 << 30) if i not in taken)
    mem["changed"][at] = free  # the same bytes listed for another chunk
    mem["changed"].sort()  # (order kept with the data only by chance: refused anyway)
    return header, blob


def _huge_size(header: dict, blob: bytes) -> tuple[dict, bytes]:
    header["artifacts"]["memory"]["size"] = 1 << 50  # never allocated a list for
    return header, blob


def _cut_short(header: dict, blob: bytes) -> tuple[dict, bytes]:
    return header, blob[:-1]  # the last chunk's data ends before its stated length


def _trailing(header: dict, blob: bytes) -> tuple[dict, bytes]:
    return header, blob + b"\0"


@pytest.mark.parametrize(
    "edit",
    [_flip_chunk_byte, _shift_chunk_index, _huge_size, _cut_short, _trailing],
    ids=["data", "header", "size", "short", "trailing"],
)
def test_an_altered_journal_is_refused(session, edit) -> None:
    s, dsn, probe = session
    t, snap, turn = _journaled_turn(s, dsn, edit.__name__)
    mgr = VMManager(t.paths)
    path = journal.journal_path(t.paths, snap)
    good = _rewrite(path, edit)
    try:
        vms = {v.id for v in mgr.list()}
        with pytest.raises(StoreError, match=snap[:12]):
            t.recover()
        assert {v.id for v in mgr.list()} <= vms  # no VM made, nothing ran on it
        store = home_store(t.paths)
        try:
            with pytest.raises(StoreError, match=snap[:12]):
                journal.read_pending(t.paths, snap, store)
        finally:
            store.close()
        with pytest.raises(StoreError):  # nor is it committed
            journal.finish(t.paths, snap)
        assert not _stored(t.paths, snap)
    finally:
        path.write_bytes(good)
    assert t.recover() is None
    _check_recovered(t, turn, probe)
    journal.wait_all()
    assert _stored(t.paths, snap)
    t.close()


def test_a_commit_streams_the_journal_instead_of_holding_it(session) -> None:
    """The store commit copies each chunk from the journal file into the rebuilt one:
    a turn's journal (tens of MB when the guest wrote that much) is never held in the
    worker's memory, twice, while its commit runs behind the next turns."""
    s, dsn, probe = session
    _sh(s, "head -c 24000000 /dev/urandom > /dev/shm/noise && echo ok")  # RAM, changed
    try:
        t, snap, turn = _journaled_turn(s, dsn, "streamed")
        size = journal.journal_path(t.paths, snap).stat().st_size
        assert size > 20_000_000
        tracemalloc.start()
        try:
            assert journal.finish(t.paths, snap) is not None
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert _stored(t.paths, snap) and not journal.pending(t.paths, snap)
        assert peak < size // 2, f"the commit held {peak} bytes for a {size}-byte journal"
        assert t.recover() is None  # from the committed snapshot now
        _check_recovered(t, turn, probe)
        t.close()
    finally:
        _sh(s, "rm -f /dev/shm/noise")


@pytest.mark.parametrize(
    "env",
    [
        {"TORPOR_TEST_CRASH": "restore-created"},
        {"TORPOR_TEST_CRASH": "restore-placed"},
        {"TORPOR_FAILPOINTS": "journal.commit=kill"},
        {"TORPOR_FAILPOINTS": "store.manifest_write=kill"},
    ],
    ids=["created", "placed", "commit-start", "commit-manifest"],
)
def test_kill9_of_the_restoring_process(session, env: dict[str, str]) -> None:
    s, dsn, probe = session
    t, snap, turn = _journaled_turn(s, dsn, "kill9")
    mgr = VMManager(t.paths)
    vms = {v.id for v in mgr.list()}
    r = _child(t.paths, "recover", t.name, dsn, "-", env)
    assert r.returncode == -signal.SIGKILL, r.stderr
    try:
        assert journal.pending(t.paths, snap) or _stored(t.paths, snap)
        if "TORPOR_FAILPOINTS" in env:  # killed behind the restore: its VM was started
            made = [v for v in mgr.list() if v.id not in vms]
            assert [v.state.status for v in made] == [Status.RUNNING], r.stdout
            assert journal.pending(t.paths, snap)  # the kill came before the manifest
        t.close()
        t = Session.open(s.name, paths=s.paths, dsn=dsn)
        _kill_vm(t)
        assert t.recover() is None
        _check_recovered(t, turn, probe)
        journal.wait_all()
        assert not journal.pending(t.paths, snap) and _stored(t.paths, snap)
    finally:
        mine = t.vm()
        for v in mgr.list():  # the killed child's VM, if it made one
            if v.id not in vms and (mine is None or v.id != mine.id):
                with contextlib.suppress(TorporError):
                    mgr.remove(v.id, force=True)
        t.close()


def _vm_log(mgr: VMManager, vm) -> list[str]:
    with mgr.client(vm) as c:
        return c.exec(["sh", "-c", "cat /work/log"], timeout=60).stdout.decode().split()


def test_an_altered_shadow_of_the_journaled_snapshot_is_not_used(
    session, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running VM's shadow equal to the journaled checkpoint is copied instead of the
    store's chunks, but only once it matches the journal's manifest."""
    from torpor.snapshot import core
    from torpor.vmm import basemem

    s, dsn, _ = session
    # a VM with a shadow that follows its captures: restored in full (a recovery's lazy
    # VM maps its RAM private; its captures go to an overlay)
    monkeypatch.setenv("TORPOR_LAZY_RESTORE", "0")
    _kill_vm(s)
    assert s.recover() is None
    turns = s.state().turns
    text = f"turn {turns + 1} (shadow)"
    r = _child(s.paths, "turn", s.name, dsn, text, {"TORPOR_FAILPOINTS": "journal.commit=eio"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    t = Session.open(s.name, paths=s.paths, dsn=dsn)
    snap = t.checkpoints[-1].snapshot
    assert journal.pending(t.paths, snap)
    shadow = basemem.find_shadow(t.paths, snap)
    assert shadow is not None  # the session's VM (still running) vouched for it
    mgr = VMManager(t.paths)
    vm = None
    try:
        failpoints.enable("journal.commit", "eio")  # kept pending for the second restore
        try:
            with caplog.at_level("WARNING", logger="torpor.snapshot"):
                vm = core.restore(mgr, snap, shared=False, keep_pool=False)
            journal.wait_all()
        finally:
            failpoints.disable("journal.commit")
        assert "not used" not in caplog.text  # the shadow, as it is, was copied
        assert _vm_log(mgr, vm) == _lines(turns + 1)
        mgr.remove(vm.id, force=True)
        vm = None
        assert journal.pending(t.paths, snap)
        with open(shadow, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
        with caplog.at_level("WARNING", logger="torpor.snapshot"):
            vm = core.restore(mgr, snap, shared=False, keep_pool=False)
        assert "does not match; not used" in caplog.text
        assert _vm_log(mgr, vm) == _lines(turns + 1)
        journal.wait_all()
        assert _stored(t.paths, snap)
    finally:
        if vm is not None:
            mgr.remove(vm.id, force=True)
        _kill_vm(t)  # its shadow was altered: the session's next test restores it
        assert t.recover() is None
        t.close()
