"""The same durable session with its log in a real PostgreSQL server (selected by DSN)."""

from __future__ import annotations

import pytest

from tests.conftest import torpor_cli
from torpor.context import Kind
from torpor.session import Session

pytestmark = pytest.mark.vm


def test_session_on_postgres(pg_dsn: str, paths, tools_image) -> None:
    import psycopg

    s = Session.create(tools_image, "scripted:demo", name="pg-s", paths=paths, dsn=pg_dsn)
    child = None
    try:
        s.send("set up a counter service and tell me its port")
        s.hibernate()
        # another process, the CLI, finds it through the DSN in the environment
        r = torpor_cli(
            "session",
            "send",
            "pg-s",
            "is the counter still running?",
            "-q",
            env={"TORPOR_CONTEXT_DSN": pg_dsn},
        )
        assert r.returncode == 0, r.stderr
        assert "kept counting" in r.stdout.decode()
        child = s.fork(name="pg-child")
        child.send("only in the child")
        with psycopg.connect(pg_dsn) as c:
            (own,) = c.execute(
                "SELECT count(*) FROM torpor_entries WHERE session_id = %s", (child.id,)
            ).fetchone()
            (parent_rows,) = c.execute(
                "SELECT count(*) FROM torpor_entries WHERE session_id = %s", (s.id,)
            ).fetchone()
        assert own == len(child.log()) - child.record.parent_seq  # the prefix is not copied
        assert parent_rows == len(s.log())
        assert [e.kind for e in s.log()][-1] == Kind.CHECKPOINT
        # the SQLite default log in $TORPOR_HOME knows nothing of these sessions
        assert "pg-s" not in torpor_cli("session", "ls").stdout.decode()
    finally:
        for x in (s, child):
            if x is not None:
                x.remove()
                x.close()
