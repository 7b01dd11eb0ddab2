"""State records (torpor.session.record): a session opened from its record has exactly
the state and conversation a fold of its whole log gives, and a record that is forged,
another session's, written for another log or altered is refused — the session then
reads the whole log and writes a new record.

Logs are written through the context log's API (no VM) on SQLite and PostgreSQL; one
test runs a real session through a refused record and a recovery.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torpor.context import Kind, open_log
from torpor.context.dsn import chain_key
from torpor.context.sqlite import SQLiteContextLog
from torpor.paths import Paths
from torpor.session import Session
from torpor.session.core import derive_state, messages_from
from torpor.session.record import SEGMENT_BYTES

_names = itertools.count()


@pytest.fixture(params=["sqlite", "postgres"])
def log_dsn(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("pg_dsn") if request.param == "postgres" else None


@pytest.fixture
def log(log_dsn: str | None, paths: Paths) -> Iterator[Any]:
    lg = open_log(log_dsn, paths=paths)
    yield lg
    lg.close()


def _sql(lg: Any, sql: str, *params: object) -> list[Any]:
    """Tamper with a record as someone with database access (not the key) could."""
    with lg._tx("test", write=True) as tx:
        if sql.lstrip().upper().startswith("SELECT"):
            return tx.all(sql, *params)
        tx.run(sql, *params)
        return []


def _ck(n: int) -> dict[str, Any]:
    return {"snapshot": f"{n:064x}", "reason": "turn", "stored_bytes": n, "pause_ms": 1.5}


class Writer:
    """Appends what a session's loop and lifecycle would, through the log API."""

    def __init__(self, lg: Any, sid: str, turn: int = 0):
        self.lg, self.sid, self.turn, self.n = lg, sid, turn, 0

    def add(self, kind: Kind, payload: dict[str, Any], turn: int | None = None) -> int:
        t = self.turn if turn is None else turn
        return self.lg.append(self.sid, kind, payload, turn=t).seq

    def checkpoint(self) -> int:
        self.n += 1
        return self.add(Kind.CHECKPOINT, _ck(self.n))

    def start(self, vm: str = "v1") -> None:
        self.add(Kind.VM, {"vm": vm, "reason": "create"})
        self.checkpoint()

    def turn_work(self, tools: int = 1, text: str = "") -> list[int]:
        seqs = [self.add(Kind.MODEL_REQUEST, {"model": "m", "step": 0, "messages": 1})]
        calls = [
            {"id": f"c{self.turn}_{i}", "name": "shell", "arguments": {"cmd": f"echo {i}"}}
            for i in range(tools)
        ]
        seqs.append(self.add(Kind.MODEL_RESPONSE, {"text": text, "tool_calls": calls}))
        for c in calls:
            seqs.append(self.add(Kind.TOOL_CALL, c))
            seqs.append(
                self.add(
                    Kind.TOOL_RESULT,
                    {"id": c["id"], "name": "shell", "content": f"out {self.turn}"},
                )
            )
        seqs.append(self.add(Kind.CUSTOM, {"type": "app.note", "data": {"t": self.turn}}))
        return seqs

    def user(self, text: str | None = None) -> None:
        self.turn += 1
        self.add(Kind.USER, {"content": text or f"turn {self.turn}"})

    def keyed_turn(self, key: str) -> None:
        """A turn sent with an idempotency key, answered and checkpointed."""
        self.turn += 1
        self.lg.append(self.sid, Kind.USER, {"content": "keyed"}, turn=self.turn, key=key)
        self.add(Kind.MODEL_RESPONSE, {"text": "early answer"})
        self.checkpoint()

    def full_turn(self, tools: int = 1, text: str = "") -> None:
        self.user()
        self.turn_work(tools, text)
        self.add(Kind.MODEL_RESPONSE, {"text": f"done {self.turn}"})
        self.checkpoint()

    def crashed_turn(self) -> None:
        """A turn whose work is lost: VM restored, work superseded, turn replayed."""
        self.user()
        lost = self.turn_work(2)
        self.add(Kind.VM, {"vm": f"v{self.turn}", "reason": "recover"})
        self.add(Kind.SUPERSEDE, {"seqs": lost, "reason": "replayed"})
        self.turn_work(1, text="again")
        self.add(Kind.MODEL_RESPONSE, {"text": f"done {self.turn}"})
        self.checkpoint()

    def hibernation(self) -> None:
        self.checkpoint()
        self.add(Kind.HIBERNATE, {"vm": "v"})
        self.add(Kind.RESUME, {"vm": "v"})


def _open(lg: Any, sid: str, paths: Paths) -> Session:
    return Session(lg.get_session(sid), lg, paths, owns_log=False)


def _assert_same_as_full_fold(lg: Any, sid: str, paths: Paths) -> Session:
    s = _open(lg, sid, paths)
    full = lg.entries(sid)
    system = s.record.meta.get("system", "You are")
    assert s.state() == derive_state(full, owner=sid)
    assert s.messages()[1:] == messages_from(full, system)[1:]
    assert [e.seq for e in s.log()] == [e.seq for e in full]
    return s


def _new(lg: Any, meta: dict[str, Any] | None = None, parent: Any = None) -> Writer:
    rec = lg.create_session(f"rec-{next(_names)}", meta or {"system": "sys"}, parent=parent)
    return Writer(lg, rec.id)


def test_record_equals_the_full_fold_and_is_used_on_open(log: Any, paths: Paths) -> None:
    w = _new(log)
    w.start()
    for _ in range(3):
        w.full_turn(tools=2)
    w.crashed_turn()
    w.hibernation()
    w.full_turn()
    s = _assert_same_as_full_fold(log, w.sid, paths)
    status = s.stats()["state_record"]
    assert status.startswith("missing; written (seq"), status
    s2 = _assert_same_as_full_fold(log, w.sid, paths)
    last_ck = s2.state().last_checkpoint
    assert last_ck is not None
    assert s2.stats()["state_record"] == f"used (seq {last_ck.seq})"
    # what the record stands for is not in the cache; a full read still gives it
    assert all(e.seq > last_ck.seq for e in s2._cache)
    # an interrupted turn after the record: pending comes from the tail
    w.user("interrupted")
    w.turn_work()
    s3 = _assert_same_as_full_fold(log, w.sid, paths)
    st3 = s3.state()
    assert st3.pending is not None and st3.pending.payload["content"] == "interrupted"
    assert s3.stats()["state_record"].startswith("used")


def test_a_fork_writes_its_own_record_over_the_inherited_prefix(log: Any, paths: Paths) -> None:
    p = _new(log)
    p.start("parent-vm")
    p.full_turn()
    at = p.checkpoint()
    p.full_turn()  # after the fork point: not the fork's
    _assert_same_as_full_fold(log, p.sid, paths)
    f = _new(log, parent=(p.sid, at))
    f.turn = 1
    f.add(Kind.FORK, {"parent": p.sid, "at": at, "snapshot": "x"})
    f.add(Kind.VM, {"vm": "fork-vm", "reason": "fork"})
    first = _assert_same_as_full_fold(log, f.sid, paths)
    # no own checkpoint yet: the record is at the inherited checkpoint (fork point)
    assert first.stats()["state_record"] == f"missing; written (seq {at})"
    f.full_turn()
    s = _assert_same_as_full_fold(log, f.sid, paths)
    assert s.stats()["state_record"] == f"used (seq {at})"
    assert s.state().vm_id == "fork-vm"
    s._save_record()  # what a checkpoint does: now at the fork's own checkpoint
    again = _assert_same_as_full_fold(log, f.sid, paths)
    assert again.stats()["state_record"] == f"used (seq {f.lg.last_seq(f.sid)})"


def _built(log: Any, paths: Paths, turns: int = 3) -> Writer:
    w = _new(log)
    w.start()
    for _ in range(turns):
        w.full_turn()
    _assert_same_as_full_fold(log, w.sid, paths)  # writes the record
    assert _open(log, w.sid, paths).stats()["state_record"].startswith("used")
    return w


def _refused_then_rewritten(log: Any, sid: str, paths: Paths, why: str) -> None:
    s = _assert_same_as_full_fold(log, sid, paths)
    status = s.stats()["state_record"]
    assert status.startswith(f"refused: {why}") and "; written (seq" in status, status
    assert _assert_same_as_full_fold(log, sid, paths).stats()["state_record"].startswith("used")


def test_a_record_with_a_bad_mac_is_refused(log: Any, paths: Paths) -> None:
    w = _built(log, paths)
    (mac,) = _sql(log, "SELECT mac FROM torpor_state WHERE session_id = ?", w.sid)[0]
    bad = bytes([mac[0] ^ 1]) + bytes(mac[1:])
    _sql(log, "UPDATE torpor_state SET mac = ? WHERE session_id = ?", bad, w.sid)
    _refused_then_rewritten(log, w.sid, paths, "its MAC does not match")


def test_an_edited_head_is_refused(log: Any, paths: Paths) -> None:
    w = _built(log, paths)
    (body,) = _sql(log, "SELECT body FROM torpor_state WHERE session_id = ?", w.sid)[0]
    edited = bytes(body).replace(b'"turns":3', b'"turns":9')
    assert edited != bytes(body)
    _sql(log, "UPDATE torpor_state SET body = ? WHERE session_id = ?", edited, w.sid)
    _refused_then_rewritten(log, w.sid, paths, "its MAC does not match")


def test_another_sessions_record_is_refused(log: Any, paths: Paths) -> None:
    a, b = _built(log, paths), _built(log, paths)
    row = _sql(log, "SELECT seq, body, mac FROM torpor_state WHERE session_id = ?", a.sid)[0]
    _sql(
        log,
        "UPDATE torpor_state SET seq = ?, body = ?, mac = ? WHERE session_id = ?",
        row[0],
        bytes(row[1]),
        bytes(row[2]),
        b.sid,
    )
    _refused_then_rewritten(log, b.sid, paths, "its MAC does not match")


def test_a_record_written_for_another_log_is_refused(paths: Paths, tmp_path: Path) -> None:
    """Same key, same session id and record seq, but the log at that seq is not the
    one the record was computed over (a rewritten or swapped log).  Two SQLite files:
    the check is the backend-neutral one the other tests run on PostgreSQL too."""
    logs = [SQLiteContextLog(tmp_path / f"ctx{i}.sqlite", key=chain_key(paths)) for i in (1, 2)]
    try:
        sid = "ab" * 16
        ws = []
        for i, lg in enumerate(logs):
            lg.create_session("same", {"system": "sys"}, session_id=sid)
            w = Writer(lg, sid)
            w.start()
            w.full_turn(text=f"log {i}")
            ws.append(w)
        _assert_same_as_full_fold(logs[0], sid, paths)
        row = _sql(logs[0], "SELECT seq, body, mac FROM torpor_state WHERE session_id = ?", sid)
        _assert_same_as_full_fold(logs[1], sid, paths)
        seq, body, mac = row[0]
        _sql(
            logs[1],
            "UPDATE torpor_state SET seq = ?, body = ?, mac = ? WHERE session_id = ?",
            seq,
            bytes(body),
            bytes(mac),
            sid,
        )
        _refused_then_rewritten(logs[1], sid, paths, "its MAC does not match")
        s = _open(logs[1], sid, paths)
        assert any(m.get("content") == "log 1" for m in s.messages())
    finally:
        for lg in logs:
            lg.close()


def test_a_record_past_the_end_of_the_log_is_refused(log: Any, paths: Paths) -> None:
    w = _built(log, paths)
    _sql(log, "UPDATE torpor_state SET seq = seq + 1000 WHERE session_id = ?", w.sid)
    _refused_then_rewritten(log, w.sid, paths, "the log has no entry")


def test_sealed_segments_are_checked(log: Any, paths: Paths) -> None:
    w = _new(log)
    w.start()
    big = "x" * (SEGMENT_BYTES // 3)
    for _ in range(5):
        w.full_turn(text=big)
    s = _assert_same_as_full_fold(log, w.sid, paths)
    assert s._rec.msegs, "the conversation should have sealed segments"
    (head,) = _sql(log, "SELECT body FROM torpor_state WHERE session_id = ?", w.sid)[0]
    assert len(bytes(head)) < 2 * SEGMENT_BYTES
    assert _open(log, w.sid, paths).stats()["state_record"].startswith("used")
    d = s._rec.msegs[0][0]
    _sql(
        log,
        "UPDATE torpor_state_parts SET body = ? WHERE session_id = ? AND digest = ?",
        b'{"msgs":[],"cks":[]}',
        w.sid,
        d,
    )
    lazy = _open(log, w.sid, paths)
    lazy.state()  # the state alone never decodes (nor checks) the conversation
    assert lazy.stats()["state_record"].startswith("used")
    _refused_then_rewritten(log, w.sid, paths, f"segment {d[:12]}")


def test_a_marker_reaching_back_before_the_record_reads_the_whole_log(
    log: Any, paths: Paths
) -> None:
    """No session writes one, but if a marker supersedes settled work the answer must
    still equal the full fold."""
    w = _new(log)
    w.start()
    w.full_turn()
    early = w.lg.last_seq(w.sid) - 1  # the answer of turn 1, before the record
    w.full_turn()
    _assert_same_as_full_fold(log, w.sid, paths)
    w.add(Kind.SUPERSEDE, {"seqs": [early], "reason": "reach back"})
    s = _assert_same_as_full_fold(log, w.sid, paths)
    assert s.stats()["state_record"].startswith("stale")


OPS = st.lists(
    st.sampled_from(["turn", "turn2", "crash", "hibernate", "interrupt", "custom"]),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, reopen=st.lists(st.booleans(), min_size=12, max_size=12))
def test_random_logs_fold_the_same_from_the_record(
    paths: Paths, ops: list[str], reopen: list[bool]
) -> None:
    lg = open_log(None, paths=paths)
    try:
        w = _new(lg)
        w.start()
        open_turn = False
        for op, check in zip(ops, reopen, strict=False):
            if open_turn:  # an interrupted turn is finished by the replay
                w.add(Kind.MODEL_RESPONSE, {"text": "finished"})
                w.checkpoint()
                open_turn = False
            if op == "turn":
                w.full_turn()
            elif op == "turn2":
                w.full_turn(tools=2, text="two")
            elif op == "crash":
                w.crashed_turn()
            elif op == "hibernate":
                w.hibernation()
            elif op == "interrupt":
                w.user()
                w.turn_work()
                open_turn = True
            else:
                w.add(Kind.CUSTOM, {"type": "app.x", "data": {"n": 1}})
            if check:
                _assert_same_as_full_fold(lg, w.sid, paths)
        _assert_same_as_full_fold(lg, w.sid, paths)
        assert (
            _assert_same_as_full_fold(lg, w.sid, paths).stats()["state_record"].startswith("used")
        )
    finally:
        lg.close()


@pytest.mark.vm
def test_recovery_with_a_forged_record_reads_the_log_and_rewrites_it(
    paths: Paths, tools_image: str
) -> None:
    """A real session: its checkpoints write records; an interrupted turn is recovered
    by a new Session whose record was forged — from the log, and the record is new."""
    s = Session.create(tools_image, "scripted:demo", name=f"rec-vm-{next(_names)}", paths=paths)
    try:
        s.send("hello")
        assert s.stats()["state_record"].startswith("written"), s.stats()["state_record"]
        with Session.open(s.id, paths=paths) as again:
            assert again.stats()["state_record"].startswith("used")
        s.append("user", {"content": "are you there?"})  # acknowledged, then "crash"
        lg = s._log
        _sql(lg, "UPDATE torpor_state SET mac = ? WHERE session_id = ?", bytes(32), s.id)
        with Session.open(s.id, paths=paths) as r:
            st = r.state()
            assert st.pending is not None
            assert r.stats()["state_record"].startswith("refused: its MAC does not match")
            assert r.recover() is not None
            assert r.state().pending is None
        with Session.open(s.id, paths=paths) as fresh:
            ck = fresh.state().last_checkpoint
            assert ck is not None
            assert fresh.stats()["state_record"] == f"used (seq {ck.seq})"
            full = lg.entries(s.id)
            assert fresh.messages() == messages_from(full, s.record.meta["system"])
            assert fresh.state() == derive_state(full, owner=s.id)
    finally:
        s.remove()
        s.close()


def test_a_record_folded_anew_drops_the_old_segments(log: Any, paths: Paths) -> None:
    w = _new(log)
    w.start()
    for _ in range(4):
        w.full_turn(text="y" * (SEGMENT_BYTES // 3))
    _assert_same_as_full_fold(log, w.sid, paths)
    (old,) = _sql(log, "SELECT digest FROM torpor_state_parts WHERE session_id = ?", w.sid)[0]
    w.full_turn()
    _sql(log, "UPDATE torpor_state SET mac = ? WHERE session_id = ?", bytes(32), w.sid)
    _refused_then_rewritten(log, w.sid, paths, "its MAC does not match")
    left = {
        d for (d,) in _sql(log, "SELECT digest FROM torpor_state_parts WHERE session_id = ?", w.sid)
    }
    assert old not in left and left


def test_idempotency_keys_before_the_record_are_still_found(log: Any, paths: Paths) -> None:
    """send(key=) looks the key up: in the entries after the record, else through the
    database (the entries the record stands for are not read for a new key)."""
    w = _new(log)
    w.start()
    w.keyed_turn("k-early")
    w.full_turn()
    _assert_same_as_full_fold(log, w.sid, paths)  # writes the record
    w.turn += 1
    log.append(w.sid, Kind.USER, {"content": "late"}, turn=w.turn, key="k-late")
    s = _open(log, w.sid, paths)
    assert s.stats()["state_record"].startswith("used")
    assert s._key_used("k-early") and s._key_used("k-late")
    assert not s._key_used("k-new")
    assert all(e.key != "k-early" for e in s._cache)  # found without reading it
    f = _new(log, parent=(w.sid, w.lg.last_seq(w.sid)))
    child = _open(log, f.sid, paths)
    assert child._key_used("k-early") and not child._key_used("k-new")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_a_long_lived_session_keeps_only_what_its_record_does_not_stand_for(
    paths: Paths, ops: list[str]
) -> None:
    """One Session object through many turns (a worker process that runs for days):
    each time it writes its state record (after every checkpoint) it forgets the
    entries the record stands for, as a session opened from that record never read
    them — its memory follows the unsettled tail, not the log — and every answer
    still equals the full fold's."""
    lg = open_log(None, paths=paths)
    try:
        w = _new(lg)
        w.start()
        w.keyed_turn("k-early")
        s = _open(lg, w.sid, paths)
        open_turn = False
        for op in ops:
            if open_turn:
                w.add(Kind.MODEL_RESPONSE, {"text": "finished"})
                w.checkpoint()
                open_turn = False
            if op in ("turn", "turn2", "custom"):
                w.full_turn(tools=2 if op == "turn2" else 1)
            elif op == "crash":
                w.crashed_turn()
            elif op == "hibernate":
                w.hibernation()
            else:
                w.user()
                w.turn_work()
                open_turn = True
            s._save_record()  # what checkpoint() does after its entry
            full = lg.entries(w.sid)
            assert s.state() == derive_state(full, owner=w.sid)
            assert s.messages()[1:] == messages_from(full, "sys")[1:]
            settled = s.state().last_checkpoint
            assert settled is not None
            assert all(e.seq > settled.seq for e in s._cache), op
            assert s.last_active() == full[-1].created_at
            assert s._key_used("k-early") and not s._key_used("k-new")
        full = lg.entries(w.sid)
        assert [e.seq for e in s.log()] == [e.seq for e in full]
        assert [e.seq for e in s.log(after=3)] == [e.seq for e in full if e.seq > 3]
        w.full_turn()
        s._save_record()
        assert [e.seq for e in s.log()] == [e.seq for e in lg.entries(w.sid)]
    finally:
        lg.close()
