"""What a session's state and conversation are, derived from log entries alone (no VM)."""

from __future__ import annotations

from typing import Any

from torpor.context import Entry, Kind
from torpor.session.core import derive_state, messages_from


def _log(*items: tuple[Kind, int, dict[str, Any]]) -> list[Entry]:
    return [
        Entry("s", i + 1, kind, payload, None, 1000.0 + i, turn)
        for i, (kind, turn, payload) in enumerate(items)
    ]


CK = {"snapshot": "a" * 64, "reason": "turn", "stored_bytes": 10}


def test_fresh_session_is_running_with_checkpoint_zero() -> None:
    st = derive_state(_log((Kind.VM, 0, {"vm": "v1"}), (Kind.CHECKPOINT, 0, CK)))
    assert st.vm_id == "v1" and not st.hibernated and st.pending is None
    assert st.turns == 0 and st.last_checkpoint and st.last_checkpoint.seq == 2


def test_user_after_last_checkpoint_is_an_interrupted_turn() -> None:
    log = _log(
        (Kind.VM, 0, {"vm": "v1"}),
        (Kind.CHECKPOINT, 0, CK),
        (Kind.USER, 1, {"content": "hi"}),
        (Kind.MODEL_REQUEST, 1, {}),
    )
    st = derive_state(log)
    assert st.pending is not None and st.pending.seq == 3 and st.turns == 1


def test_hibernate_then_resume_and_vm_entries() -> None:
    base = [(Kind.VM, 0, {"vm": "v1"}), (Kind.CHECKPOINT, 0, CK), (Kind.HIBERNATE, 0, {})]
    assert derive_state(_log(*base)).hibernated
    assert not derive_state(_log(*base, (Kind.RESUME, 0, {"vm": "v1"}))).hibernated
    st = derive_state(_log(*base, (Kind.VM, 0, {"vm": "v2"})))
    assert st.vm_id == "v2" and not st.hibernated


def test_superseded_work_leaves_the_conversation() -> None:
    call = {"id": "c1", "name": "shell", "arguments": {"cmd": "ls"}}
    log = _log(
        (Kind.CHECKPOINT, 0, CK),
        (Kind.USER, 1, {"content": "list"}),
        (Kind.MODEL_RESPONSE, 1, {"text": "", "tool_calls": [call]}),  # 3: lost attempt
        (Kind.TOOL_CALL, 1, call),
        (Kind.SUPERSEDE, 1, {"seqs": [3, 4], "reason": "crash"}),
        (Kind.MODEL_RESPONSE, 1, {"text": "", "tool_calls": [call]}),
        (Kind.TOOL_CALL, 1, call),
        (Kind.TOOL_RESULT, 1, {"id": "c1", "name": "shell", "content": "a\nb"}),
        (Kind.MODEL_RESPONSE, 1, {"text": "two files"}),
        (Kind.CHECKPOINT, 1, CK),
    )
    msgs = messages_from(log, "sys")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[2]["tool_calls"] == [call]
    assert msgs[3] == {"role": "tool", "tool_call_id": "c1", "name": "shell", "content": "a\nb"}
    st = derive_state(log)
    assert st.pending is None and st.turns == 1


def _session_like_log() -> list[Entry]:
    """Turns, a crash with its partial work superseded and replayed, a hibernation, a
    fork's inherited prefix, and one marker that reaches back past a checkpoint."""
    call = {"id": "c", "name": "shell", "arguments": {"cmd": "ls"}}
    items: list[tuple[Kind, int, dict[str, Any]]] = [
        (Kind.VM, 0, {"vm": "v1"}),
        (Kind.CHECKPOINT, 0, CK),
    ]
    for t in range(1, 6):
        items += [
            (Kind.USER, t, {"content": f"turn {t}"}),
            (Kind.MODEL_REQUEST, t, {}),
            (Kind.MODEL_RESPONSE, t, {"text": "", "tool_calls": [call]}),
            (Kind.TOOL_CALL, t, call),
            (Kind.TOOL_RESULT, t, {"id": "c", "name": "shell", "content": f"out {t}"}),
        ]
        if t == 3:  # crash: the partial turn is superseded, then replayed
            n = len(items)
            items.append((Kind.VM, t, {"vm": "v2", "reason": "recover"}))
            items.append((Kind.SUPERSEDE, t, {"seqs": [n - 3, n - 2, n - 1, n], "reason": "x"}))
            items += [
                (Kind.MODEL_RESPONSE, t, {"text": "again", "tool_calls": []}),
            ]
        items += [(Kind.MODEL_RESPONSE, t, {"text": f"done {t}"}), (Kind.CHECKPOINT, t, CK)]
        if t == 4:
            items += [(Kind.HIBERNATE, t, {}), (Kind.CHECKPOINT, t, CK), (Kind.RESUME, t, {})]
    log = _log(*items)
    # entries 1-4 belong to a parent session (a fork's prefix): its VM is not ours
    log[:4] = [Entry("p", e.seq, e.kind, e.payload, None, e.created_at, e.turn) for e in log[:4]]
    # a marker that reaches back into settled history (no session writes one)
    log.append(Entry("s", len(log) + 1, Kind.SUPERSEDE, {"seqs": [5], "reason": "y"}, None, 0, 6))
    return log


def test_log_view_equals_folding_from_scratch_at_every_length() -> None:
    from torpor.session.core import LogView

    log = _session_like_log()
    for owner in ("s", None):
        view = LogView(owner)
        for n in range(len(log) + 1):
            prefix = log[:n]
            assert view.state(prefix) == derive_state(prefix, owner=owner), n
            assert view.messages(prefix, "sys") == messages_from(prefix, "sys"), n
            if n == len(log) - 1:
                assert view._n > len(log) // 2  # it did settle most of the log
    # a different log than the one settled (not a continuation) is folded anew
    view = LogView("s")
    view.state(log[:20])
    other = [Entry("s", e.seq + 100, e.kind, e.payload, None, 0, e.turn) for e in log]
    assert view.state(other) == derive_state(other, owner="s")
