"""open_log: DSN forms, the environment, file modes and durability settings, and errors."""

from __future__ import annotations

import socket
import stat
import sys
from pathlib import Path

import pytest

from tests.pgserver import _with_db
from torpor.context import ContextError, Kind, open_log
from torpor.context.sqlite import SQLiteContextLog
from torpor.errors import SetupError, UsageError
from torpor.paths import Paths

SECRET = "hunter2-Sw0rdfish"


@pytest.fixture(autouse=True)
def _no_env_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORPOR_CONTEXT_DSN", raising=False)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_default_is_sqlite_in_the_torpor_home_with_0600_files(tmp_path: Path) -> None:
    with open_log(paths=Paths(tmp_path / "home")) as log:
        assert isinstance(log, SQLiteContextLog)
        db = tmp_path / "home" / "context.db"
        assert log.path == db
        s = log.create_session()
        log.append(s.id, Kind.USER, {"x": 1}, turn=1)
        for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert _mode(p) == 0o600, p
        conn = log._conn  # durability settings, as the connection actually runs
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_dsn_forms_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Paths(tmp_path / "home")
    with open_log(f"sqlite://{tmp_path / 'a.db'}") as log:
        assert log.path == tmp_path / "a.db"
    with open_log(str(tmp_path / "b.db")) as log:
        assert log.path == tmp_path / "b.db"
    monkeypatch.setenv("TORPOR_CONTEXT_DSN", f"sqlite://{tmp_path / 'env.db'}")
    with open_log(paths=home) as log:
        assert log.path == tmp_path / "env.db"
    with open_log("", paths=home) as log:  # an explicit "" means the default
        assert log.path == home.root / "context.db"
    with pytest.raises(UsageError, match="absolute"):
        open_log("sqlite://relative.db")
    with pytest.raises(UsageError, match="mysql"):
        open_log("mysql://u@h/db")


def test_a_file_that_is_not_a_database_is_a_context_error(tmp_path: Path) -> None:
    p = tmp_path / "junk.db"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ContextError, match=r"junk\.db") as ei:
        open_log(str(p))
    assert ei.value.exit_code == 11


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_secret(e: BaseException) -> None:
    while e is not None:
        assert SECRET not in str(e) and SECRET not in repr(e.args)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]


def test_unreachable_postgres_names_host_and_db_but_not_the_password() -> None:
    port = _closed_port()
    with pytest.raises(ContextError) as ei:
        open_log(f"postgresql://agent:{SECRET}@127.0.0.1:{port}/torpor_ctx")
    msg = str(ei.value)
    assert "127.0.0.1" in msg and str(port) in msg and "torpor_ctx" in msg
    assert ei.value.exit_code == 11
    _no_secret(ei.value)


def test_malformed_postgres_dsn_does_not_echo_the_password() -> None:
    for dsn in (
        f"postgresql://agent:{SECRET}@db.example:notaport/x",
        f"postgres://agent@localhost/x?password={SECRET}&bogus_option=1",
    ):
        with pytest.raises(ContextError) as ei:
            open_log(dsn)
        _no_secret(ei.value)


def test_missing_database_is_named(pg_admin_dsn: str) -> None:
    with pytest.raises(ContextError, match="no_such_db_here"):
        open_log(_with_db(pg_admin_dsn, "no_such_db_here"))


def test_postgres_without_psycopg_is_a_setup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    with pytest.raises(SetupError, match=r"torpor\[postgres\]"):
        open_log("postgresql://u@localhost/db")


def test_postgres_log_turns_synchronous_commit_back_on(pg_dsn: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg_dsn, autocommit=True) as c:
        (db,) = c.execute("SELECT current_database()").fetchone() or ("",)
        c.execute(
            sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(sql.Identifier(db))
        )
    with psycopg.connect(pg_dsn) as c:
        assert c.execute("SHOW synchronous_commit").fetchone() == ("off",)
    with open_log(pg_dsn) as log:
        conn = log._conn  # type: ignore[attr-defined]
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
