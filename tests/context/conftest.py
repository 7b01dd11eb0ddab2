"""Fixtures for the context-log tests: every ``log`` test runs on SQLite *and* PostgreSQL.

The PostgreSQL server is the suite-wide private one from :mod:`tests.pgserver`
(fixtures ``pg_admin_dsn`` / ``pg_dsn``, registered in ``tests/conftest.py``);
each test gets its own database.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from torpor.context import ContextLog, open_log

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Backend:
    """One backend under test: its DSN, and raw SQL access that bypasses torpor."""

    name: str
    dsn: str

    def open(self) -> ContextLog:
        return open_log(self.dsn)

    def sql(self, statement: str, *params: object) -> list[tuple[Any, ...]]:
        """Run ``statement`` (``?`` placeholders) on a connection of its own; commit."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.dsn.removeprefix("sqlite://"))
            try:
                rows = conn.execute(statement, params).fetchall()
                conn.commit()
                return rows
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as pc:
            cur = pc.execute(statement.replace("?", "%s"), params or None)
            return cur.fetchall() if cur.description else []

    def rows(self, table: str = "torpor_entries") -> int:
        return self.sql(f"SELECT COUNT(*) FROM {table}")[0][0]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite://{tmp_path / 'context.db'}")
    return Backend("postgres", request.getfixturevalue("pg_dsn"))


@pytest.fixture
def log(backend: Backend) -> Iterator[ContextLog]:
    with backend.open() as lg:
        yield lg


def spawn_writer(
    backend: Backend,
    session_id: str,
    mode: str,
    count: int = 0,
    tag: str = "w",
    delay: float = 0.0,
) -> subprocess.Popen[str]:
    """``tests.context._writer`` in a subprocess (see its docstring)."""
    args = [
        sys.executable,
        "-m",
        "tests.context._writer",
        backend.dsn,
        session_id,
        mode,
        str(count),
        tag,
        str(delay),
    ]
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def acks(lines: str) -> list[tuple[int, str]]:
    """Parse the writer's ``<seq> <key>`` lines."""
    out = []
    for line in lines.splitlines():
        seq, key = line.split()
        out.append((int(seq), key))
    return out
