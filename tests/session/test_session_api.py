"""The context log as an API (Session.append / checkpoint / entries / sandbox / fork /
recover): a loop of one's own gets torpor's durability, on real VMs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import Any

import pytest

from torpor.context import Kind, effective
from torpor.errors import ConflictError, UsageError
from torpor.session import Checkpoint, Session, SessionError
from torpor.session.core import LOOP_KINDS, MAX_APPEND_BYTES

pytestmark = pytest.mark.vm


@pytest.fixture
def sessions(paths, tools_image):
    made: list[Session] = []

    class Factory:
        def create(self, **kw: Any) -> Session:
            s = Session.create(tools_image, "scripted:demo", paths=paths, **kw)
            made.append(s)
            return s

        def track(self, s: Session) -> Session:
            made.append(s)
            return s

    yield Factory()
    for s in made:
        with contextlib.suppress(Exception):
            s.remove()
        s.close()


def _cat(s: Session, path: str) -> str:
    r = s.sandbox.exec(f"cat {path}")
    return r.stdout.strip()


def test_bad_appends_are_refused_and_write_nothing(sessions) -> None:
    s = sessions.create()
    before = s.entries()[-1].seq
    bad: list[tuple[Any, Any]] = [
        ("checkpoint", {"snapshot": "x"}),  # lifecycle kinds are torpor's own
        ("vm", {"vm": "x"}),
        ("supersede", {"seqs": [1]}),
        ("hibernate", {}),
        ("custom", {"type": "a.b", "data": {}}),  # only through a dotted kind
        ("removed", {}),
        ("note", {}),  # unknown, not namespaced
        ("App.Note", {}),  # custom kinds are lower-case dotted names
        ("a." + "x" * 40, {}),
        ("app.note", {"x": object()}),  # not JSON
        ("app.note", {"x": float("nan")}),
        ("app.note", ["not", "a", "dict"]),
        ("app.note", {"blob": "x" * (MAX_APPEND_BYTES + 1)}),  # over the cap
        ("user", {"content": "  "}),  # shapes messages() reads
        ("user", {}),
        ("tool_result", {"id": "c1", "name": "shell"}),
        ("model_response", {"text": "x", "tool_calls": [{"id": 1}]}),
    ]
    for kind, payload in bad:
        with pytest.raises(UsageError):
            s.append(kind, payload)
    with pytest.raises(UsageError):
        s.checkpoint(reason="")
    with pytest.raises(UsageError):
        s.entries(after=-1)
    with pytest.raises(UsageError, match="not a checkpoint"):
        s.fork(at=1)  # the vm entry, not a checkpoint
    assert s.entries()[-1].seq == before  # nothing was written
    assert s.status() == "running"


def test_own_loop_append_checkpoint_fork_and_vm_killed(sessions) -> None:
    s = sessions.create(name="own-loop")
    u = s.append("user", {"content": "make /f"}, key="msg-1")
    assert u.kind is Kind.USER and u.turn == 1
    assert s.append("user", {"content": "other"}, key="msg-1") == u  # idempotent by key
    assert s.status() == "interrupted"  # an open turn until the loop checkpoints
    note = s.append("app.note", {"step": 1, "tags": ["a"]})
    assert note.kind is Kind.CUSTOM
    assert note.payload == {"type": "app.note", "data": {"step": 1, "tags": ["a"]}}
    assert s.sandbox.exec("echo one > /f").exit_code == 0
    s.append("model_response", {"text": "made it"})

    ck = s.checkpoint(reason="after-f")
    assert isinstance(ck, Checkpoint)
    assert ck.reason == "after-f" and ck.turn == 1
    last = s.entries()[-1]
    assert last.seq == ck.seq and last.kind is Kind.CHECKPOINT  # at the current log position
    assert last.payload["snapshot"] == ck.snapshot
    assert s.status() == "running" and s.checkpoints[-1] == ck
    # durable before it returned: another opening of the log sees it
    with Session.open(s.id, paths=s.paths) as again:
        assert again.checkpoints[-1] == ck
    assert [e.kind for e in s.entries(after=u.seq)][:2] == [Kind.CUSTOM, Kind.MODEL_RESPONSE]

    # work after the checkpoint, then the user kills the machine under the session
    assert s.append("user", {"content": "make /f two"}).turn == 2 == s.state().turns
    s.append("model_response", {"text": "two written"})
    s.sandbox.exec("echo two > /f")
    assert _cat(s, "/f") == "two"

    child = sessions.track(s.fork(at=ck))  # a Checkpoint object ...
    assert _cat(child, "/f") == "one"
    assert [m["content"] for m in child.messages() if m["role"] == "user"] == ["make /f"]

    sb = s.sandbox
    sb.kill()
    with pytest.raises(SessionError, match="recover"):
        s.checkpoint()
    assert s.recover(replay=False) is None
    assert _cat(s, "/f") == "one"  # the machine is back at the checkpoint ...
    texts = [m.get("content") for m in s.messages()]
    assert "two written" not in texts and "made it" in texts  # ... and so is the log
    gone = {e.seq for e in s.entries()} - {e.seq for e in effective(s.entries())}
    assert any(e.kind is Kind.MODEL_RESPONSE and e.seq in gone for e in s.entries())
    # the open turn's user message stays acknowledged; the loop redoes it and settles it
    assert s.status() == "interrupted"
    s.sandbox.exec("echo two > /f")
    s.append("model_response", {"text": "two written again"})
    ck2 = s.checkpoint()
    assert s.status() == "running" and ck2.seq > ck.seq
    grandchild = sessions.track(s.fork(at=ck2.seq))  # ... or its number
    assert _cat(grandchild, "/f") == "two"


def test_checkpoint_and_sandbox_of_a_hibernated_session(sessions) -> None:
    s = sessions.create()
    s.sandbox.exec("echo kept > /k")
    ck = s.hibernate()
    assert s.checkpoint() == ck  # nothing happened since: no new snapshot, no wake
    assert s.status() == "hibernated"
    s.append("app.event", {"n": 1})
    assert s.status() == "hibernated"  # logging alone does not need the machine
    assert _cat(s, "/k") == "kept"  # s.sandbox wakes it (a resume entry says so)
    assert any(e.kind is Kind.RESUME for e in s.entries(after=ck.seq))
    ck2 = s.checkpoint(reason="woken")
    assert ck2.seq > ck.seq and ck2.snapshot != ck.snapshot and s.status() == "running"
    # hibernated through the Sandbox, behind the log's back: the session still hibernates
    s.sandbox.hibernate()
    assert s.status() == "hibernated"  # not "stopped": prune must not take it for ended
    ck3 = s.hibernate()
    assert ck3.seq > ck2.seq and s.status() == "hibernated"
    assert _cat(s, "/k") == "kept"


CRASHING_LOOP = """
import os, sys
from pathlib import Path
from torpor.paths import Paths
from torpor.session import Session
s = Session.open(sys.argv[1], paths=Paths(Path(sys.argv[2])))
s.append("user", {"content": "do the thing"}, key="m2")
s.append("app.step", {"n": 1})
s.sandbox.exec("echo half-done >> /effects")
s.append("model_response", {"text": "half"})
os._exit(9)  # the worker dies before its checkpoint; the VM lives on
"""


def test_own_loop_crash_in_another_process_then_recover(sessions, paths, tmp_path) -> None:
    s = sessions.create()
    s.append("user", {"content": "first"}, key="m1")
    s.sandbox.exec("echo first >> /effects")
    ck = s.checkpoint(reason="first")
    loop = tmp_path / "loop.py"
    loop.write_text(CRASHING_LOOP)
    r = subprocess.run([sys.executable, str(loop), s.id, str(paths.root)], timeout=300)
    assert r.returncode == 9
    with Session.open(s.id, paths=paths) as again:  # a new worker
        assert again.status() == "interrupted"
        assert again.state().pending is not None and again.state().pending.key == "m2"
        assert _cat(again, "/effects") == "first\nhalf-done"  # the old VM, past the checkpoint
        with pytest.raises(ConflictError):
            again.hibernate()  # an open turn is not hibernated behind the loop's back
        assert again.recover(replay=False) is None
        assert _cat(again, "/effects") == "first"  # the half-done effect is gone ...
        live = effective(again.entries(after=ck.seq))
        assert [e.kind for e in live if e.kind in (Kind.CUSTOM, Kind.MODEL_RESPONSE)] == []
        assert [e.key for e in live if e.kind is Kind.USER] == ["m2"]  # ... the message is not
        # the loop redoes the turn; the same key does not append the message twice
        assert again.append("user", {"content": "do the thing"}, key="m2").seq == (
            again.state().pending.seq
        )
        again.sandbox.exec("echo done >> /effects")
        again.append("model_response", {"text": "done"})
        again.checkpoint()
        assert again.status() == "running"
        assert _cat(again, "/effects") == "first\ndone"


def test_the_builtin_loop_is_a_user_of_the_public_api(paths, tools_image) -> None:
    """send() writes its conversation only through append() and settles the turn only
    through checkpoint(): one code path, so a loop of one's own gets the same rules."""

    class Watched(Session):
        seen: list[tuple[str, int]]
        reasons: list[str]

        def append(self, kind: Any, payload: dict[str, Any], *, key: str | None = None) -> Any:
            e = super().append(kind, payload, key=key)
            self.seen.append((e.kind.value, e.seq))
            return e

        def checkpoint(self, reason: str = "user") -> Checkpoint:
            ck = super().checkpoint(reason)
            self.reasons.append(reason)
            return ck

    Watched.seen, Watched.reasons = [], []
    s = Watched.create(tools_image, "scripted:demo", paths=paths)
    try:
        start = s.entries()[-1].seq
        s.send("set up a counter service and tell me its port")
        turn = s.entries(after=start)
        conversation = [(e.kind.value, e.seq) for e in turn if e.kind in LOOP_KINDS]
        assert conversation and Watched.seen == conversation
        assert Watched.reasons == ["turn"] and turn[-1].kind is Kind.CHECKPOINT
    finally:
        s.remove()
        s.close()
