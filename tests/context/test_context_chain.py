"""The context log's MAC chain (issue 9) and session removal, on SQLite and PostgreSQL.

An attacker here edits the database behind torpor's back: SQLite's file bytes
in place, or SQL with the append-only triggers lifted.  Every such edit must make
reads fail with a ChainError naming the entry, and ``verify`` list it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.context.conftest import Backend
from torpor.context import SCHEMA_VERSION, ChainError, ContextError, ContextLog, Kind, open_log
from torpor.errors import ConflictError, NotFoundError
from torpor.paths import Paths


def _unguarded(backend: Backend, statement: str, *params: object) -> None:
    """``statement`` with the append-only triggers of torpor_entries/sessions lifted."""
    if backend.name == "sqlite":
        path = backend.dsn.removeprefix("sqlite://")
        conn = sqlite3.connect(path)
        try:
            for t in ("torpor_entries", "torpor_sessions"):
                conn.execute(f"DROP TRIGGER IF EXISTS {t}_no_update")
                conn.execute(f"DROP TRIGGER IF EXISTS {t}_no_delete")
            conn.execute(statement, params)
            conn.commit()
        finally:
            conn.close()
        return
    t = ("torpor_entries", "torpor_sessions")
    backend.sql("; ".join(f"ALTER TABLE {x} DISABLE TRIGGER {x}_append_only" for x in t))
    backend.sql(statement, *params)
    backend.sql("; ".join(f"ALTER TABLE {x} ENABLE TRIGGER {x}_append_only" for x in t))


def _turns(log: ContextLog, sid: str, texts: list[str]) -> None:
    for i, t in enumerate(texts, 1):
        log.append(sid, Kind.USER, {"content": t}, turn=i)
        log.append(sid, Kind.MODEL_RESPONSE, {"text": f"ok {i}"}, turn=i)


def test_an_in_place_edit_of_the_sqlite_file_is_refused(tmp_path: Path) -> None:
    """The issue's case: 'set up' -> 'rm -rf' in context.db's bytes, same length."""
    db = tmp_path / "context.db"
    with open_log(str(db)) as log:
        s = log.create_session("victim")
        _turns(log, s.id, ["please set up the repo", "thanks"])
        assert log.verify(s.id) == []
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the row into the main file
    conn.close()
    data = db.read_bytes()
    assert data.count(b"set up") == 1
    db.write_bytes(data.replace(b"set up", b"rm -rf"))
    with open_log(str(db)) as log:
        with pytest.raises(ChainError, match="entry 1") as ei:
            log.entries(s.id)
        assert ei.value.session_id == s.id and ei.value.seq == 1 and ei.value.exit_code == 11
        assert [seq for seq, _ in log.verify(s.id)] == [1]
        # reading on from a place already checked checks only the new rows
        assert [e.seq for e in log.entries(s.id, after=2)] == [3, 4]


@pytest.mark.parametrize(
    ("statement", "param", "broken"),
    [
        ("UPDATE torpor_entries SET payload = ? WHERE seq = 3", '{"content":"rm -rf /"}', 3),
        ("UPDATE torpor_entries SET turn = 7 WHERE seq = 4", None, 4),
        ("UPDATE torpor_entries SET kind = 'error' WHERE seq = 2", None, 2),
        ("UPDATE torpor_entries SET created_at = created_at + 1 WHERE seq = 6", None, 6),
        ("DELETE FROM torpor_entries WHERE seq = 5", None, 5),
        ("UPDATE torpor_sessions SET meta = ? WHERE name = 'a'", '{"system":"obey"}', 1),
    ],
    ids=["payload", "turn", "kind", "time", "deleted", "meta"],
)
def test_an_edit_breaks_the_chain_at_its_entry(
    backend: Backend, statement: str, param: str | None, broken: int
) -> None:
    with backend.open() as log:
        s = log.create_session("a", {"system": "be careful"})
        _turns(log, s.id, ["one", "two", "three"])  # seqs 1..6
        assert log.verify(s.id) == []
    _unguarded(backend, statement, *([param] if param is not None else []))
    with backend.open() as log:
        with pytest.raises(ChainError) as ei:
            log.entries(s.id)
        assert ei.value.seq == broken
        assert log.verify(s.id)[0][0] == broken


def test_swapped_payloads_are_caught(backend: Backend) -> None:
    with backend.open() as log:
        s = log.create_session()
        _turns(log, s.id, ["first", "second"])
    _unguarded(
        backend,
        "UPDATE torpor_entries SET payload = (SELECT payload FROM torpor_entries WHERE seq = 3)"
        " WHERE seq = 1",
    )
    with backend.open() as log:
        assert log.verify(s.id)[0][0] == 1


def test_another_homes_key_does_not_verify(backend: Backend, tmp_path: Path) -> None:
    with backend.open() as log:
        s = log.create_session()
        _turns(log, s.id, ["hi"])
    other = open_log(backend.dsn, paths=Paths(tmp_path / "other-home"))
    with other, pytest.raises(ChainError, match="key"):
        other.entries(s.id)


def test_a_fork_chains_onto_its_parent_at_the_fork_point(backend: Backend) -> None:
    with backend.open() as log:
        p = log.create_session("parent")
        _turns(log, p.id, ["a", "b"])  # 1..4
        f = log.create_session("fork", parent=(p.id, 2))
        log.append(f.id, Kind.USER, {"content": "fork's own"}, turn=2)  # seq 3
        g = log.create_session("fork0", parent=(p.id, 0))
        log.append(g.id, Kind.USER, {"content": "from nothing"}, turn=1)  # seq 1
        gg = log.create_session("grandchild", parent=(f.id, 3))
        log.append(gg.id, Kind.USER, {"content": "deeper"}, turn=3)  # seq 4
        for x in (p, f, g, gg):
            assert log.verify(x.id) == [], x.name
        assert [e.session_id for e in log.entries(gg.id)] == [p.id, p.id, f.id, gg.id]
    # an edit of the parent after the fork point leaves the fork intact
    _unguarded(backend, "UPDATE torpor_entries SET turn = 9 WHERE session_id = ? AND seq = 4", p.id)
    with backend.open() as log:
        assert log.verify(f.id) == [] and log.verify(gg.id) == []
        assert [seq for seq, _ in log.verify(p.id)] == [4]
    # an edit of the shared prefix breaks every view of it
    _unguarded(backend, "UPDATE torpor_entries SET turn = 9 WHERE session_id = ? AND seq = 1", p.id)
    with backend.open() as log:
        for x in (p, f, gg):
            with pytest.raises(ChainError) as ei:
                log.entries(x.id)
            assert ei.value.seq == 1
    # a fork's record (its fork point) is covered too
    _unguarded(backend, "UPDATE torpor_sessions SET parent_seq = 1 WHERE id = ?", f.id)
    with backend.open() as log:
        assert 3 in [seq for seq, _ in log.verify(f.id)]


def test_appends_stay_idempotent_and_chained(backend: Backend) -> None:
    with backend.open() as log:
        s = log.create_session()
        a = log.append(
            s.id, Kind.USER, {"content": "x", "n": 1e16, "b": {"z": 1, "a": 2}}, turn=1, key="k"
        )
        again = log.append(s.id, Kind.USER, {"content": "other"}, turn=1, key="k")
        assert again == a and again.chain == a.chain and len(a.chain) == 32
        (back,) = log.entries(s.id)
        assert back == a and back.chain == a.chain  # what append returned is what is stored
        assert log.verify(s.id) == []


def test_remove_is_a_tombstone_and_forks_keep_their_prefix(backend: Backend) -> None:
    with backend.open() as log:
        p = log.create_session("parent")
        _turns(log, p.id, ["a", "b"])
        f = log.create_session("fork", parent=(p.id, 4))
        log.append(f.id, Kind.USER, {"content": "mine"}, turn=3)
        tomb = log.remove_session(p.id, "test")
        assert tomb.kind is Kind.REMOVED and tomb.seq == 5 and tomb.payload == {"reason": "test"}
        assert [r.name for r in log.list_sessions()] == ["fork"]
        assert [r.name for r in log.list_sessions(include_removed=True)] == ["parent", "fork"]
        for ref in ("parent", p.id, p.id[:8]):
            with pytest.raises(NotFoundError):
                log.get_session(ref)
        assert log.get_session("parent", include_removed=True).removed
        with pytest.raises(NotFoundError, match="removed"):
            log.append(p.id, Kind.USER, {"content": "revive"}, turn=3)
        with pytest.raises(NotFoundError, match="removed"):
            log.remove_session(p.id)
        with pytest.raises(NotFoundError):
            log.create_session("fork2", parent=(p.id, 2))
        with pytest.raises(ConflictError, match="removed"):
            log.create_session("parent")
        # the rows stay: the fork reads its prefix, verify reads the removed log
        assert [e.seq for e in log.entries(f.id)] == [1, 2, 3, 4, 5]
        assert log.entries(p.id)[-1] == tomb
        assert log.verify(p.id) == [] and log.verify(f.id) == []
    assert backend.rows("torpor_removed") == 1
    with pytest.raises(Exception, match="append-only"):
        backend.sql("DELETE FROM torpor_removed")


# -- migration from schema 1 -----------------------------------------------------------

V1_SQLITE = [
    "CREATE TABLE torpor_meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
    """CREATE TABLE torpor_sessions (id TEXT PRIMARY KEY NOT NULL, name TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL, parent_id TEXT REFERENCES torpor_sessions (id),
        parent_seq INTEGER, meta TEXT NOT NULL, schema_version INTEGER NOT NULL)""",
    """CREATE TABLE torpor_entries (session_id TEXT NOT NULL REFERENCES torpor_sessions (id),
        seq INTEGER NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL,
        payload_bytes INTEGER NOT NULL, key TEXT, turn INTEGER NOT NULL,
        created_at REAL NOT NULL, PRIMARY KEY (session_id, seq), UNIQUE (session_id, key))""",
    "CREATE TRIGGER torpor_entries_no_update BEFORE UPDATE ON torpor_entries"
    " BEGIN SELECT RAISE(ABORT, 'torpor: UPDATE on torpor_entries refused: the context log"
    " is append-only'); END",
]
V1_PG = [
    "CREATE TABLE torpor_meta (key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE torpor_sessions (id text PRIMARY KEY, name text NOT NULL UNIQUE,
        created_at double precision NOT NULL, parent_id text REFERENCES torpor_sessions (id),
        parent_seq bigint, meta jsonb NOT NULL, schema_version integer NOT NULL)""",
    """CREATE TABLE torpor_entries (session_id text NOT NULL REFERENCES torpor_sessions (id),
        seq bigint NOT NULL, kind text NOT NULL, payload jsonb NOT NULL,
        payload_bytes integer NOT NULL, key text, turn integer NOT NULL,
        created_at double precision NOT NULL, PRIMARY KEY (session_id, seq),
        UNIQUE (session_id, key))""",
    """CREATE OR REPLACE FUNCTION torpor_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'torpor: % on % refused: the context log is append-only',
        TG_OP, TG_TABLE_NAME; END $$""",
    "CREATE TRIGGER torpor_entries_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON"
    " torpor_entries FOR EACH STATEMENT EXECUTE FUNCTION torpor_append_only()",
    "CREATE TRIGGER torpor_sessions_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON"
    " torpor_sessions FOR EACH STATEMENT EXECUTE FUNCTION torpor_append_only()",
]


def test_a_schema_1_database_is_migrated_with_its_chain(backend: Backend) -> None:
    if backend.name == "sqlite":
        path = backend.dsn.removeprefix("sqlite://")
        conn = sqlite3.connect(path)
        for stmt in V1_SQLITE:
            conn.execute(stmt)
        conn.commit()
        conn.close()
    else:
        for stmt in V1_PG:
            backend.sql(stmt)
    backend.sql("INSERT INTO torpor_meta VALUES ('schema_version', '1')")
    sess = "INSERT INTO torpor_sessions VALUES (?, ?, ?, ?, ?, ?, 1)"
    backend.sql(sess, "p" * 32, "old", 1.0, None, None, '{"image":"tools:latest"}')
    backend.sql(sess, "f" * 32, "oldfork", 2.0, "p" * 32, 2, "{}")
    ins = "INSERT INTO torpor_entries VALUES (?, ?, ?, ?, 10, ?, ?, ?)"
    for seq in (1, 2, 3):
        backend.sql(ins, "p" * 32, seq, "user", f'{{"content":"set up {seq}"}}', None, seq, 5.0)
    backend.sql(ins, "f" * 32, 3, "user", '{"content":"forked"}', "k", 3, 6.0)
    with backend.open() as log:
        assert log.verify("p" * 32) == [] and log.verify("f" * 32) == []
        assert [e.payload["content"] for e in log.entries("f" * 32)] == [
            "set up 1",
            "set up 2",
            "forked",
        ]
        e = log.append("f" * 32, Kind.USER, {"content": "new"}, turn=4)
        assert e.seq == 4 and log.verify("f" * 32) == []
    assert backend.sql("SELECT value FROM torpor_meta") == [(str(SCHEMA_VERSION),)]
    with pytest.raises(Exception, match="append-only"):
        backend.sql("UPDATE torpor_entries SET turn = 9")
    _unguarded(backend, "UPDATE torpor_entries SET payload = ? WHERE seq = 2", '{"content":"x"}')
    with backend.open() as log:
        assert log.verify("f" * 32)[0][0] == 2


def test_an_unreadable_key_is_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "store").mkdir(parents=True)
    (home / "store" / "key").mkdir()  # not a file: reading it fails
    with pytest.raises(ContextError, match="key"):
        open_log(str(tmp_path / "c.db"), paths=Paths(home))
