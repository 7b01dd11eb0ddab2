"""Removal and the MAC chain of a durable session whose log is in PostgreSQL."""

from __future__ import annotations

import contextlib

import pytest

from tests.conftest import torpor_cli
from torpor.context import Kind
from torpor.errors import NotFoundError
from torpor.session import Session

pytestmark = pytest.mark.vm


def test_rm_and_verify_on_postgres(pg_dsn: str, paths, tools_image) -> None:
    import psycopg

    env = {"TORPOR_CONTEXT_DSN": pg_dsn}
    s = Session.create(tools_image, "scripted:demo", name="pg-rm", paths=paths, dsn=pg_dsn)
    child = None
    try:
        s.send("set up a counter service and tell me its port")
        child = s.fork(name="pg-rm-child")
        r = torpor_cli("session", "rm", "pg-rm", env=env)
        assert r.returncode == 0, r.stderr
        r = torpor_cli("session", "send", "pg-rm", "hello?", env=env)
        assert r.returncode == NotFoundError.exit_code and b"removed" in r.stderr
        assert "counter" in child.send("is the counter still running?").lower()
        r = torpor_cli("session", "verify", env=env)
        assert r.returncode == 0, r.stdout
        assert b"pg-rm (removed): ok" in r.stdout and b"pg-rm-child: ok" in r.stdout
        # an edit of the shared prefix, made with the append-only trigger disabled
        (user,) = [e for e in child.log() if e.kind is Kind.USER and e.session_id == s.id]
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute("ALTER TABLE torpor_entries DISABLE TRIGGER torpor_entries_append_only")
            c.execute(
                'UPDATE torpor_entries SET payload = \'{"content": "rm -rf /"}\''
                " WHERE session_id = %s AND seq = %s",
                (s.id, user.seq),
            )
            c.execute("ALTER TABLE torpor_entries ENABLE TRIGGER torpor_entries_append_only")
        r = torpor_cli("session", "log", "pg-rm-child", env=env)
        assert r.returncode == 11 and f"at entry {user.seq}".encode() in r.stderr, r.stderr
        r = torpor_cli("session", "verify", env=env)
        assert r.returncode == 11
        assert f"pg-rm-child: entry {user.seq}:".encode() in r.stdout, r.stdout
    finally:
        for x in (s, child):
            if x is not None:
                with contextlib.suppress(NotFoundError):
                    x.remove()
                x.close()
