"""A recovery's cost does not grow with the conversation: a session recovered from its
state record hands the scripted model the conversation without decoding the record's
sealed segments (the model reads the tail), a segment the model does read is still
checked (altered: the whole log answers instead), and the recovered VM keeps the
session's VM name while the dead one is removed beside the restore.

One real VM session; its long conversation is appended through the log API (no model
turns), then each recovery follows a "crash": a user message acknowledged, the VM
killed.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest

from torpor.context import Kind
from torpor.model import ScriptedModel, parse_script
from torpor.paths import Paths
from torpor.session import Session
from torpor.session.core import messages_from
from torpor.vmm import pool
from torpor.vmm.manager import VMManager

pytestmark = pytest.mark.vm

_names = itertools.count()


def _model(text: str) -> ScriptedModel:
    return ScriptedModel(parse_script({"version": 1, "turns": [{"steps": [{"text": text}]}]}))


def _sealed(s: Session) -> Any:
    """The segments the session's settled conversation starts with."""
    fold, _ = s._view.settled()
    return fold.msgs.segs


def _crash(s: Session, paths: Paths, text: str) -> str:
    """Acknowledge ``text`` as the next turn, then kill the VM: an interrupted turn."""
    s.append("user", {"content": text})
    vm = s.vm()
    assert vm is not None
    VMManager(paths).kill(vm.id)
    return vm.id


def _pool_entries(paths: Paths, snap: str) -> list[str]:
    """Spares (ready or being prepared) of ``snap``, once the restore's request for
    them (a thread) is done."""
    for t in threading.enumerate():
        if t.name == "torpor-pool-want":
            t.join()
    d = paths.locks / "pool" / snap
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_recovery_reads_only_the_tail_and_checks_what_it_reads(
    paths: Paths, tools_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"flat-{next(_names)}"
    s = Session.create(tools_image, _model("hi"), name=name, paths=paths)
    try:
        # a conversation of ~1 MB: 40 turns of a 25 KB tool result, the last one small
        for t in range(40):
            s.append("user", {"content": f"turn {t}"})
            call = {"id": f"c{t}", "name": "shell", "arguments": {"cmd": "true"}}
            s.append("model_response", {"text": "", "tool_calls": [call]})
            s.append("tool_call", call)
            out = "tail result" if t == 39 else f"{t}:" + "x" * 25_000
            s.append("tool_result", {"id": f"c{t}", "name": "shell", "content": out})
        s.checkpoint(reason="turn")
        assert len(s._rec.msegs) >= 4, "the conversation should be sealed in segments"
        assert sum(n for _, n in s._rec.msegs) == 40 * 3  # nothing left unsealed

        old = _crash(s, paths, "are you there?")
        with Session.open(s.id, paths=paths, model=_model("{user}")) as r:
            assert r.stats()["state_record"].startswith("used")
            ck = r.state().last_checkpoint
            assert ck is not None
            monkeypatch.setenv("TORPOR_POOL", "1")  # (the tests' default: no pool)
            try:
                assert r.recover() == "are you there?"
                # a checkpoint is restored once: no spare VM restoring it again beside
                # the replayed turn
                assert _pool_entries(paths, ck.snapshot) == []
            finally:
                monkeypatch.setenv("TORPOR_POOL", "0")
                pool.drain(paths)
            assert all(seg._items is None for seg in _sealed(r)), "a sealed segment decoded"
            vm = r.vm()
            assert vm is not None and vm.name == f"ses-{name}" and vm.id != old
            assert old not in {v.id for v in VMManager(paths).list()}
            assert r.messages() == messages_from(r._log.entries(s.id), r.record.meta["system"])

        # the model reaches back into the last sealed segment, which was altered
        _crash(s, paths, "and the last result?")
        digest = s._rec.msegs[-1][0]
        with s._log._tx("test", write=True) as tx:
            tx.run(
                "UPDATE torpor_state_parts SET body = ? WHERE session_id = ? AND digest = ?",
                b"[]",
                s.id,
                digest,
            )
        with Session.open(s.id, paths=paths, model=_model("[{last_result}]")) as r:
            assert r.recover() == "[tail result]"
            # refused when read, the whole log folded and the record written anew: the
            # altered segment is gone, and the new record checks out in full
            with s._log._tx("test", write=False) as tx:
                bodies = tx.all("SELECT body FROM torpor_state_parts WHERE session_id = ?", s.id)
            assert bodies and all(bytes(b) != b"[]" for (b,) in bodies)
            full = r._log.entries(s.id)
            assert r.messages() == messages_from(full, r.record.meta["system"])
            assert [e.payload["content"] for e in full if e.kind == Kind.USER][-2:] == [
                "are you there?",
                "and the last result?",
            ]
        with Session.open(s.id, paths=paths) as again:
            assert again.stats()["state_record"].startswith("used")
            assert again.messages() == messages_from(full, again.record.meta["system"])
    finally:
        s.remove()
        s.close()
