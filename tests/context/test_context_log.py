"""The ContextLog contract, run unchanged against SQLite and a real PostgreSQL."""

from __future__ import annotations

import json
import threading

import pytest

from tests.context.conftest import Backend
from torpor.context import (
    SCHEMA_VERSION,
    ContextError,
    ContextLog,
    Entry,
    Kind,
    SchemaVersionError,
    effective,
    open_log,
)
from torpor.errors import ConflictError, NotFoundError, UsageError


def _fill(log: ContextLog, sid: str, n: int, start: int = 0) -> list[Entry]:
    return [log.append(sid, Kind.USER, {"i": start + i}, turn=start + i) for i in range(n)]


# -- numbering and reading --------------------------------------------------------------


def test_seqs_start_at_1_and_increase_without_gaps(log: ContextLog) -> None:
    s = log.create_session("alpha")
    assert log.last_seq(s.id) == 0 and log.entries(s.id) == []
    got = [
        log.append(s.id, Kind.USER, {"text": "hi"}, turn=1),
        log.append(s.id, Kind.MODEL_REQUEST, {"model": "m", "messages": 1}, turn=1),
        log.append(
            s.id,
            Kind.MODEL_RESPONSE,
            {"text": "ok", "usage": {"input_tokens": 12, "output_tokens": 3}, "latency_ms": 41},
            turn=1,
        ),
        log.append(s.id, Kind.TOOL_CALL, {"id": "c1", "name": "sh", "args": {"cmd": "ls"}}, turn=1),
        log.append(s.id, Kind.TOOL_RESULT, {"id": "c1", "exit": 0, "stdout": "a\n"}, turn=1),
    ]
    assert [e.seq for e in got] == [1, 2, 3, 4, 5]
    assert log.entries(s.id) == got
    assert log.last_seq(s.id) == 5
    assert [e.seq for e in log.entries(s.id, after=2)] == [3, 4, 5]
    assert [e.seq for e in log.entries(s.id, after=1, limit=2)] == [2, 3]
    assert log.entries(s.id, after=5) == [] and log.entries(s.id, limit=0) == []
    assert got[2].payload["usage"]["output_tokens"] == 3 and got[0].session_id == s.id


def test_every_kind_round_trips_as_its_stored_string(log: ContextLog, backend: Backend) -> None:
    s = log.create_session()
    kinds = [k for k in Kind if k is not Kind.REMOVED]  # the tombstone: remove_session
    for turn, kind in enumerate(kinds):
        payload = {"seqs": [1], "reason": "r"} if kind is Kind.SUPERSEDE else {"k": kind.value}
        log.append(s.id, kind, payload, turn=turn)
    # a plain string is accepted too
    assert log.append(s.id, "vm", {"vm": "abc"}, turn=9).kind is Kind.VM
    with pytest.raises(UsageError, match="remove_session"):
        log.append(s.id, Kind.REMOVED, {}, turn=9)
    log.remove_session(s.id)
    back = log.entries(s.id)
    assert [e.kind for e in back] == [*kinds, Kind.VM, Kind.REMOVED]
    assert all(type(e.kind) is Kind for e in back)
    stored = [r[0] for r in backend.sql("SELECT kind FROM torpor_entries ORDER BY seq")]
    assert stored == [e.kind.value for e in back]
    assert [e.turn for e in back][: len(kinds)] == list(range(len(kinds)))


def test_threads_sharing_one_log_get_distinct_gapless_seqs(log: ContextLog) -> None:
    s = log.create_session()
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                log.append(s.id, Kind.TOOL_CALL, {"t": t, "i": i}, turn=1, key=f"{t}-{i}")
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    es = log.entries(s.id)
    assert [e.seq for e in es] == list(range(1, 101))
    assert len({e.key for e in es}) == 100


# -- idempotency ------------------------------------------------------------------------


def test_retried_append_returns_the_original_and_adds_nothing(
    log: ContextLog, backend: Backend
) -> None:
    s = log.create_session()
    first = log.append(s.id, Kind.USER, {"text": "hello"}, turn=1, key="msg-1")
    log.append(s.id, Kind.USER, {"text": "other"}, turn=1, key="msg-2")
    again = log.append(s.id, Kind.ERROR, {"text": "different"}, turn=7, key="msg-1")
    assert again == first
    assert log.last_seq(s.id) == 2 and backend.rows() == 2
    # keys are per session
    t = log.create_session()
    assert log.append(t.id, Kind.USER, {"text": "x"}, turn=1, key="msg-1").seq == 1
    # entries without a key never collide
    assert log.append(s.id, Kind.USER, {}, turn=1).seq == 3
    assert log.append(s.id, Kind.USER, {}, turn=1).seq == 4


def test_racing_retries_of_one_key_store_one_entry(log: ContextLog, backend: Backend) -> None:
    s = log.create_session()
    out: list[Entry] = []
    barrier = threading.Barrier(8)

    def retry() -> None:
        barrier.wait()
        out.append(log.append(s.id, Kind.TOOL_RESULT, {"ok": True}, turn=2, key="k"))

    threads = [threading.Thread(target=retry) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 8 and all(e == out[0] for e in out)
    assert backend.rows() == 1


def test_returned_entry_equals_the_stored_one(log: ContextLog) -> None:
    s = log.create_session()
    e = log.append(s.id, Kind.TOOL_CALL, {"args": (1, 2), "nested": {"b": 1, "a": [None]}}, turn=0)
    assert e.payload == {"args": [1, 2], "nested": {"b": 1, "a": [None]}}
    assert log.entries(s.id) == [e]


# -- fork by reference ------------------------------------------------------------------


def test_fork_shares_the_prefix_by_reference(log: ContextLog, backend: Backend) -> None:
    parent = log.create_session("parent")
    pe = _fill(log, parent.id, 10)
    child = log.create_session("child", parent=(parent.id, 6))
    assert (child.parent_id, child.parent_seq) == (parent.id, 6)
    assert log.entries(child.id) == pe[:6]
    assert log.last_seq(child.id) == 6
    # the parent moves on; the child does not see it
    _fill(log, parent.id, 2, start=10)
    assert log.last_seq(parent.id) == 12 and log.last_seq(child.id) == 6
    ce = _fill(log, child.id, 2, start=100)
    assert [e.seq for e in ce] == [7, 8]
    assert log.entries(child.id) == pe[:6] + ce
    # grandchild of the child, forked inside the child's own part
    grand = log.create_session("grand", parent=("child", 7))
    ge = log.append(grand.id, Kind.USER, {"g": 1}, turn=3)
    assert ge.seq == 8
    assert log.entries(grand.id) == [*pe[:6], ce[0], ge]
    # inherited entries keep their owner's id: nothing was copied
    assert [e.session_id for e in log.entries(grand.id)] == [parent.id] * 6 + [child.id, grand.id]
    assert backend.rows() == 12 + 2 + 1
    assert log.stats(grand.id) == {"entries": 8, "own_entries": 1, "bytes": len('{"g":1}')}
    assert log.stats(parent.id)["entries"] == 12
    assert log.entries(parent.id)[-1].seq == 12  # the parent is unaffected


def test_fork_inside_an_inherited_prefix_cuts_every_ancestor(
    log: ContextLog, backend: Backend
) -> None:
    g = log.create_session("g")
    ge = _fill(log, g.id, 10)
    p = log.create_session("p", parent=(g.id, 10))
    pe = _fill(log, p.id, 2, start=10)
    assert [e.seq for e in pe] == [11, 12]
    c = log.create_session("c", parent=(p.id, 5))  # the fork point lies in g's entries
    assert log.entries(c.id) == ge[:5]
    assert log.append(c.id, Kind.USER, {}, turn=1).seq == 6
    d = log.create_session("d", parent=(p.id, 12))  # at p's last visible seq
    assert log.entries(d.id) == ge + pe
    assert backend.rows() == 13


def test_fork_point_is_checked(log: ContextLog) -> None:
    p = log.create_session("p")
    _fill(log, p.id, 3)
    with pytest.raises(UsageError, match="ends at 3"):
        log.create_session(parent=(p.id, 4))
    with pytest.raises(UsageError):
        log.create_session(parent=(p.id, -1))
    with pytest.raises(NotFoundError):
        log.create_session(parent=("0" * 32, 0))
    c = log.create_session(parent=(p.id, 3))
    with pytest.raises(UsageError, match="ends at 3"):
        log.create_session(parent=(c.id, 4))  # the child's log is the inherited 1..3
    empty = log.create_session(parent=(p.id, 0))
    assert log.entries(empty.id) == [] and log.append(empty.id, Kind.USER, {}, turn=1).seq == 1
    assert len(log.list_sessions()) == 3  # failed forks left nothing behind


# -- supersede --------------------------------------------------------------------------


def test_supersede_marks_earlier_entries(log: ContextLog, backend: Backend) -> None:
    s = log.create_session()
    es = _fill(log, s.id, 4)
    mark = log.append(s.id, Kind.SUPERSEDE, {"seqs": [2, 3], "reason": "compacted"}, turn=4)
    summary = log.append(s.id, Kind.USER, {"summary": "2+3"}, turn=4)
    assert effective(log.entries(s.id)) == [es[0], es[3], summary]
    assert backend.rows() == 6  # nothing was deleted
    assert mark.seq == 5
    # in a fork, the parent's later markers are invisible
    c = log.create_session(parent=(s.id, 4))
    assert effective(log.entries(c.id)) == es
    with pytest.raises(UsageError, match="earlier"):
        log.append(s.id, Kind.SUPERSEDE, {"seqs": [99], "reason": "future"}, turn=4)
    with pytest.raises(UsageError):
        log.append(s.id, Kind.SUPERSEDE, {"reason": "no seqs"}, turn=4)


# -- sessions ---------------------------------------------------------------------------


def test_session_names_and_ids(log: ContextLog) -> None:
    s = log.create_session(meta={"image": "tools:latest", "memory_mib": 256})
    assert len(s.id) == 32 and int(s.id, 16) >= 0
    assert s.name == "s-" + s.id[:8] and s.parent_id is None and s.parent_seq is None
    assert s.meta == {"image": "tools:latest", "memory_mib": 256}
    assert s.schema_version == SCHEMA_VERSION
    assert log.get_session(s.id) == s
    named = log.create_session("agent-1.main_2")
    with pytest.raises(ConflictError, match=r"agent-1\.main_2"):
        log.create_session("agent-1.main_2")
    mine = log.create_session("mine", session_id="cafe" * 8)
    assert mine.id == "cafe" * 8
    with pytest.raises(ConflictError):
        log.create_session("other", session_id="cafe" * 8)
    for bad in ["", "-x", ".x", "a b", "a/b", "x" * 65, "é", "a\n"]:
        with pytest.raises(UsageError):
            log.create_session(bad)
    assert log.create_session("x" * 64).name == "x" * 64
    assert [r.id for r in log.list_sessions()] == [
        s.id,
        named.id,
        mine.id,
        log.get_session("x" * 64).id,
    ]


def test_lookup_by_id_name_and_prefix(log: ContextLog) -> None:
    a = log.create_session("a", session_id="abcd1111" + "0" * 24)
    b = log.create_session("b", session_id="abcd2222" + "0" * 24)
    assert log.get_session("abcd1").id == a.id
    assert log.get_session("abcd2222").id == b.id
    assert log.get_session("b") == b
    with pytest.raises(UsageError, match="ambiguous"):
        log.get_session("abcd")
    with pytest.raises(NotFoundError, match="4"):
        log.get_session("abc")  # too short for a prefix
    with pytest.raises(NotFoundError):
        log.get_session("ffff")
    with pytest.raises(NotFoundError):
        log.get_session("nope")


def test_unknown_session_is_not_found(log: ContextLog) -> None:
    missing = "f" * 32
    with pytest.raises(NotFoundError):
        log.append(missing, Kind.USER, {}, turn=0)
    for call in (log.entries, log.last_seq, log.stats):
        with pytest.raises(NotFoundError):
            call(missing)


# -- input validation ------------------------------------------------------------------


def test_bad_appends_are_refused_and_store_nothing(log: ContextLog, backend: Backend) -> None:
    s = log.create_session()
    bad: list[dict] = [
        {"kind": "bogus", "payload": {}},
        {"kind": Kind.USER, "payload": ["not", "a", "dict"]},
        {"kind": Kind.USER, "payload": {"x": {1, 2}}},
        {"kind": Kind.USER, "payload": {"x": float("nan")}},
        {"kind": Kind.USER, "payload": {"x": "nul \x00 inside"}},
        {"kind": Kind.USER, "payload": {"x": "\ud800"}},
        {"kind": Kind.USER, "payload": {}, "turn": -1},
        {"kind": Kind.USER, "payload": {}, "key": ""},
    ]
    for b in bad:
        with pytest.raises(UsageError):
            log.append(s.id, b["kind"], b["payload"], turn=b.get("turn", 0), key=b.get("key"))
    assert backend.rows() == 0
    # a backslash-u-0000 *text* (not a NUL) is fine
    e = log.append(s.id, Kind.USER, {"x": "\\u0000"}, turn=0)
    assert log.entries(s.id)[0].payload == {"x": "\\u0000"} == e.payload


def test_unicode_and_a_megabyte_round_trip(log: ContextLog) -> None:
    s = log.create_session(meta={"note": "méta ✓"})
    text = 'héllo wörld ✓ 日本語 עברית 🦀 e\u0301 \u2028 tab\t quote" back\\slash\n'
    big = ("0123456789abcdef" * 64 + "ü") * 1000  # ~1 MB, with multibyte chars
    e1 = log.append(s.id, Kind.USER, {"text": text, "🔑": "v"}, turn=1)
    e2 = log.append(s.id, Kind.TOOL_RESULT, {"stdout": big}, turn=1)
    back = log.entries(s.id)
    assert back == [e1, e2]
    assert back[0].payload == {"text": text, "🔑": "v"} and back[1].payload["stdout"] == big
    assert log.get_session(s.id).meta == {"note": "méta ✓"}
    size = sum(
        len(json.dumps(e.payload, ensure_ascii=False, separators=(",", ":")).encode()) for e in back
    )
    assert log.stats(s.id) == {"entries": 2, "own_entries": 2, "bytes": size}
    assert size > 1_000_000


# -- the database itself enforces append-only ------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE torpor_entries SET payload = '{}'",
        "UPDATE torpor_entries SET seq = seq + 100",
        "DELETE FROM torpor_entries",
        "DELETE FROM torpor_entries WHERE seq = 1",
        "UPDATE torpor_sessions SET name = 'renamed'",
        "DELETE FROM torpor_sessions",
    ],
)
def test_database_refuses_update_and_delete(
    log: ContextLog, backend: Backend, statement: str
) -> None:
    s = log.create_session("keep")
    before = _fill(log, s.id, 2)
    with pytest.raises(Exception, match="append-only"):
        backend.sql(statement)
    assert log.entries(s.id) == before and log.get_session(s.id).name == "keep"


def test_postgres_refuses_truncate(pg_dsn: str) -> None:
    pg = Backend("postgres", pg_dsn)  # SQLite has no TRUNCATE; its DELETE is covered above
    with pg.open() as log:
        s = log.create_session()
        _fill(log, s.id, 1)
    for table in ("torpor_entries", "torpor_sessions CASCADE"):
        with pytest.raises(Exception, match="append-only"):
            pg.sql(f"TRUNCATE {table}")
    assert pg.rows() == 1


# -- lifecycle --------------------------------------------------------------------------


def test_entries_survive_reopening(backend: Backend) -> None:
    with backend.open() as log:
        s = log.create_session("persist", meta={"m": 1})
        es = _fill(log, s.id, 3)
    with backend.open() as log:
        assert log.entries(s.id) == es and log.get_session("persist") == s
        assert log.append(s.id, Kind.RESUME, {}, turn=3).seq == 4


def test_closed_log_refuses_calls(backend: Backend) -> None:
    log = backend.open()
    s = log.create_session()
    log.close()
    log.close()  # idempotent
    with pytest.raises(ContextError, match="closed"):
        log.append(s.id, Kind.USER, {}, turn=0)


def test_newer_schema_version_is_refused(backend: Backend) -> None:
    with backend.open() as log:
        log.create_session("old")
    backend.sql("UPDATE torpor_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SchemaVersionError, match="schema_version 99") as ei:
        open_log(backend.dsn)
    assert f"up to {SCHEMA_VERSION}" in str(ei.value) and ei.value.exit_code == 11
    assert backend.rows("torpor_sessions") == 1  # untouched


def test_schema_creation_is_idempotent(backend: Backend) -> None:
    for _ in range(3):
        with backend.open() as log:
            log.create_session()
    assert backend.sql("SELECT value FROM torpor_meta") == [(str(SCHEMA_VERSION),)]
    assert backend.rows("torpor_sessions") == 3


def test_follow_in_process_until_stopped(log: ContextLog) -> None:
    s = log.create_session()
    _fill(log, s.id, 3)
    got: list[int] = []

    def writer() -> None:
        for i in range(5):
            log.append(s.id, Kind.TOOL_CALL, {"i": i}, turn=2)

    t = threading.Thread(target=writer)
    for e in log.follow(s.id, after=1, poll=0.01, stop=lambda: len(got) >= 7):
        got.append(e.seq)
        if e.seq == 3:
            t.start()
    t.join()
    assert got == list(range(2, 9))


def test_postgres_reconnects_after_the_server_dropped_the_connection(
    pg_dsn: str, pg_admin_dsn: str
) -> None:
    import psycopg

    with open_log(pg_dsn) as log:
        s = log.create_session()
        log.append(s.id, Kind.USER, {}, turn=1)
        pid = log._conn.info.backend_pid  # type: ignore[attr-defined]
        with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        # the drop is noticed at BEGIN, before anything of the append was sent: retried
        assert log.append(s.id, Kind.USER, {}, turn=1).seq == 2
        assert log._conn.info.backend_pid != pid  # type: ignore[attr-defined]


def test_numbers_json_allows_round_trip(log: ContextLog) -> None:
    """A model may put any JSON number in tool arguments, beyond 64 bits too."""
    s = log.create_session()
    payload = {"n": 2**70, "neg": -(2**65), "f": 0.25, "small": 3, "list": [2**64, 0.1]}
    e = log.append(s.id, Kind.TOOL_CALL, payload, turn=1)
    assert log.entries(s.id)[0].payload == payload == e.payload
