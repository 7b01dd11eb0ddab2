"""A turn's checkpoint through the journal (issue 13 §7): kill -9 at every point of
the fast path, then recovery must agree with what was acknowledged.

The rule (docs/sessions.md, "The checkpoint journal"): an answer is returned only
after the capture is durable in the journal *and* the checkpoint entry naming its
snapshot is in the log.  So a crash before that replays the turn from the previous
checkpoint (nothing of the lost attempt survives), and a crash after it keeps the
answer and restores the VM from the journal, whether or not the store commit behind
it ran.  Each turn of ``scripted:bench`` appends ``turn-N`` to /work/log in the guest
(the script counts from 0), so the guest's file says which turns the machine has:
exactly the checkpointed ones.

One VM boot; each crash is a child process running one turn (kill -9 by a
failpoint), each recovery restores the VM (no boot).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torpor.context import Kind
from torpor.errors import LeaseHeldError, StoreError
from torpor.paths import Paths
from torpor.session import Session
from torpor.session.core import _answer_of
from torpor.snapshot import journal
from torpor.store.home import home_store
from torpor.vmm.manager import VMManager

pytestmark = pytest.mark.vm

CHILD = """
import os, signal, sys
from torpor import failpoints
from torpor.session import Session
from torpor.snapshot import journal
name, dsn, text, after = sys.argv[1:5]
s = Session.open(name, dsn=dsn)
print("ANSWER", s.send(text, key=text), flush=True)
if after == "kill":  # the answer is out; the background commit failed (journal.commit)
    os.kill(os.getpid(), signal.SIGKILL)
if after == "mid-commit":  # the commit again, killed between its chunks and manifest
    failpoints.disable("journal.commit")
    failpoints.enable("store.manifest_write", "kill")
    journal.finish(s.paths, s.checkpoints[-1].snapshot)
"""


@pytest.fixture(scope="module")
def session(paths: Paths, tools_image: str, tmp_path_factory: pytest.TempPathFactory):
    dsn = str(tmp_path_factory.mktemp("fastpath") / "ctx.db")
    s = Session.create(image=tools_image, model="scripted:bench", paths=paths, dsn=dsn)
    s.send("turn 1", key="turn 1")  # checkpoint 0 was a first snapshot: this one journals
    yield s, dsn
    s.remove()
    s.close()


def _child(paths: Paths, name: str, dsn: str, text: str, points: str, after: str = "-"):
    env = dict(os.environ, TORPOR_HOME=str(paths.root), TORPOR_FAILPOINTS=points)
    return subprocess.run(
        [sys.executable, "-c", CHILD, name, dsn, text, after],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _guest_log(s: Session) -> list[str]:
    out = s.sandbox.exec(["cat", "/work/log"]).stdout
    return (out.decode() if isinstance(out, bytes) else out).split()


def _lines(turns: int) -> list[str]:
    """/work/log after ``turns`` turns (the script numbers turns from 0)."""
    return [f"turn-{i}" for i in range(turns)]


def _fresh(s: Session, dsn: str) -> Session:
    """The session as a new process sees it."""
    return Session.open(s.name, paths=s.paths, dsn=dsn)


def _kill_vm(s: Session) -> None:
    vm = s.vm()
    assert vm is not None
    VMManager(s.paths).kill(vm.id)


def test_the_turn_checkpoint_is_journaled_and_stored_behind(session) -> None:
    s, _ = session
    p = next(e.payload for e in s.log() if e.seq == s.checkpoints[-1].seq)
    assert p["journal"] is True and p["durability"] == "local"
    assert p["journal_bytes"] > 0 and p["stored_bytes"] == 0  # stored behind: not known yet
    journal.wait_all()
    snap = s.checkpoints[-1].snapshot
    assert not journal.pending(s.paths, snap)
    assert home_store(s.paths).get(snap).id == snap  # the commit gave it the same id


@pytest.mark.parametrize("point", ["journal.write", "journal.durable"])
def test_a_crash_before_the_entry_replays_the_turn(session, point: str) -> None:
    s, dsn = session
    turns = s.state().turns
    text = f"turn {turns + 1} ({point})"
    r = _child(s.paths, s.name, dsn, text, f"{point}=kill")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "ANSWER" not in r.stdout  # nothing acknowledged
    with _fresh(s, dsn) as t:
        assert t.status() == "interrupted"
        before = {c.snapshot for c in t.checkpoints}
        answer = t.recover()  # the VM back at the last checkpoint, the turn replayed
        assert answer == f"ok {turns}"
        new = [c.snapshot for c in t.checkpoints if c.snapshot not in before]
        assert len(new) == 1  # only the replay's: the journal the crash left is not named
        assert _guest_log(t) == _lines(turns + 1)  # once, not twice


def test_a_crash_after_the_entry_keeps_the_answer(session) -> None:
    s, dsn = session
    turns = s.state().turns
    text = f"turn {turns + 1} (logged)"
    r = _child(s.paths, s.name, dsn, text, "session.checkpoint_logged=kill,journal.commit=eio")
    assert r.returncode == -signal.SIGKILL, r.stderr
    with _fresh(s, dsn) as t:
        assert t.status() != "interrupted"  # the turn is complete in the log
        snap = t.checkpoints[-1].snapshot
        assert journal.pending(t.paths, snap)  # durable only in the journal
        _kill_vm(t)  # the machine is lost too: it comes back from the journal
        assert t.recover() is None
        journal.wait(snap)  # restored from the journal, committed behind (a thread)
        assert not journal.pending(t.paths, snap)
        assert _answer_of(t.log(), turns + 1) == f"ok {turns}"
        assert _guest_log(t) == _lines(turns + 1)


def test_a_crash_after_the_answer_before_the_commit(session) -> None:
    s, dsn = session
    turns = s.state().turns
    text = f"turn {turns + 1} (answered)"
    r = _child(s.paths, s.name, dsn, text, "journal.commit=eio", after="kill")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert f"ANSWER ok {turns}" in r.stdout  # acknowledged
    with _fresh(s, dsn) as t:
        snap = t.checkpoints[-1].snapshot
        path = journal.journal_path(t.paths, snap)
        good = path.read_bytes()
        # a damaged journal is refused, never stored under the id the log names
        path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        with pytest.raises(StoreError):
            journal.finish(t.paths, snap)
        assert path.exists()
        path.write_bytes(good)
        # the same session goes on in the same VM: its next snapshot stores this one first
        assert t.send("next", key=f"{text} next") == f"ok {turns + 1}"
        assert not journal.pending(t.paths, snap)
        assert home_store(t.paths).get(snap).id == snap
        assert _guest_log(t) == _lines(turns + 2)


def test_a_crash_in_the_middle_of_the_commit(session) -> None:
    s, dsn = session
    turns = s.state().turns
    text = f"turn {turns + 1} (mid-commit)"
    r = _child(s.paths, s.name, dsn, text, "journal.commit=eio", after="mid-commit")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert f"ANSWER ok {turns}" in r.stdout
    with _fresh(s, dsn) as t:
        snap = t.checkpoints[-1].snapshot
        assert journal.pending(t.paths, snap)
        _kill_vm(t)
        assert t.recover() is None  # restored from the half-committed journal
        assert _guest_log(t) == _lines(turns + 1)
        entries = t.log()
        assert _answer_of(entries, turns + 1) == f"ok {turns}"
        assert not any(e.kind is Kind.SUPERSEDE and e.turn == turns + 1 for e in entries)
    journal.finish_all(s.paths)  # what crashes left (the unnamed journal included) stores
    left = Path(s.paths.root, "journal")
    assert not list(left.glob("*.journal")) and not list(left.glob(".*.tmp"))


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_journal_of_a_host_that_lost_the_lease_never_reaches_the_log(
    paths: Paths, tools_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORPOR_LEASE_TTL", "2")
    monkeypatch.setenv("TORPOR_HOST_ID", "host-a")
    dsn = str(tmp_path / "ctx.db")
    s = Session.create(image=tools_image, model="scripted:bench", paths=paths, dsn=dsn)
    s.send("turn 1")  # from here on the turns journal
    name = s.name
    s.close()
    journal.wait_all()
    before = set(journal.journal_dir(paths).glob("*.journal"))
    env = dict(os.environ, TORPOR_HOME=str(paths.root), TORPOR_FAILPOINTS="journal.durable=stop")
    # host a (its own process) freezes once its turn's journal is durable, before the
    # checkpoint entry: a host paused past its lease
    a = subprocess.Popen(
        [sys.executable, "-c", CHILD, name, dsn, "turn 2", "-"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    b = None
    try:
        deadline = time.monotonic() + 240
        while not _stopped(a.pid):
            assert a.poll() is None, a.communicate()
            assert time.monotonic() < deadline, "host a never reached its journal"
            time.sleep(0.05)
        new = set(journal.journal_dir(paths).glob("*.journal")) - before
        frozen = [p.name[: -len(".journal")] for p in new]
        assert len(frozen) == 1
        # host b takes the session over once a's lease ran out (a's heartbeat is frozen)
        monkeypatch.setenv("TORPOR_HOST_ID", "host-b")
        b = Session.open(name, paths=paths, dsn=dsn)
        while True:
            try:
                b.append("app.note", {"by": "b"})
                break
            except LeaseHeldError:
                assert time.monotonic() < deadline, "a's lease never ran out"
                time.sleep(0.1)
        os.kill(a.pid, signal.SIGCONT)
        out, err = a.communicate(timeout=240)
        assert a.returncode == 1 and "FencedError" in err, err  # a's entry was refused
        assert "ANSWER" not in out  # nothing acknowledged
        assert frozen[0] not in {c.snapshot for c in b.checkpoints}
        assert b.status() == "interrupted"  # a's turn: replayed from the last checkpoint
        assert b.recover() == "ok 1"
        assert frozen[0] not in {c.snapshot for c in b.checkpoints}
        assert _guest_log(b) == _lines(2)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
        if b is not None:
            b.remove()
            b.close()
