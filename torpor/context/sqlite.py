"""The embedded backend: one SQLite file (default ``ROOT/context.db``).

Durability: the database runs in WAL mode with ``synchronous=FULL``, so every
commit fsyncs the WAL before ``append`` returns; a crash (or ``kill -9``) of any
writer loses no acknowledged entry and leaves no partial one.

Concurrency: writers use ``BEGIN IMMEDIATE`` (one writer at a time for the whole
file, across processes) and wait up to ``busy_timeout`` for their turn; readers
never block in WAL mode.  Within a process one connection serves all threads,
behind the log's lock.

The file is created 0600 before SQLite opens it; SQLite gives its ``-wal`` and
``-shm`` files the database file's mode.  The file lives on a local filesystem
(WAL needs shared memory; network filesystems are not supported).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from torpor import failpoints
from torpor.context.errors import ContextError
from torpor.context.model import SCHEMA_VERSION
from torpor.context.sql import SQLContextLog, Tx
from torpor.fsutil import fsync_dir

__all__ = ["DDL", "SQLiteContextLog"]

BUSY_TIMEOUT_S = 30.0


def _refuse(op: str, table: str) -> str:
    return (
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table}"
        f" BEGIN SELECT RAISE(ABORT, 'torpor: {op} on {table} refused:"
        " the context log is append-only'); END"
    )


DDL = [
    "CREATE TABLE IF NOT EXISTS torpor_meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS torpor_sessions (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        parent_id TEXT REFERENCES torpor_sessions (id),
        parent_seq INTEGER CHECK (parent_seq >= 0),
        meta TEXT NOT NULL CHECK (json_valid(meta)),
        schema_version INTEGER NOT NULL,
        CHECK ((parent_id IS NULL) = (parent_seq IS NULL))
    )""",
    """CREATE TABLE IF NOT EXISTS torpor_entries (
        session_id TEXT NOT NULL REFERENCES torpor_sessions (id),
        seq INTEGER NOT NULL CHECK (seq >= 1),
        kind TEXT NOT NULL,
        payload TEXT NOT NULL CHECK (json_valid(payload)),
        payload_bytes INTEGER NOT NULL,
        key TEXT,
        turn INTEGER NOT NULL CHECK (turn >= 0),
        created_at REAL NOT NULL,
        chain BLOB NOT NULL CHECK (length(chain) = 32),
        PRIMARY KEY (session_id, seq),
        UNIQUE (session_id, key)
    )""",
    _refuse("UPDATE", "torpor_entries"),
    _refuse("DELETE", "torpor_entries"),
    _refuse("UPDATE", "torpor_sessions"),
    _refuse("DELETE", "torpor_sessions"),
]
# schema 2's removal flags (also what a schema-1 database gains when migrated)
DDL_REMOVED = [
    """CREATE TABLE IF NOT EXISTS torpor_removed (
        session_id TEXT PRIMARY KEY NOT NULL REFERENCES torpor_sessions (id),
        removed_at REAL NOT NULL,
        seq INTEGER NOT NULL
    )""",
    _refuse("UPDATE", "torpor_removed"),
    _refuse("DELETE", "torpor_removed"),
]
# hosts and leases: coordination state beside the log, updated in place (no refusing
# triggers), created on every open so a schema-2 database gains them without a bump
DDL_LEASES = [
    """CREATE TABLE IF NOT EXISTS torpor_hosts (
        id TEXT PRIMARY KEY NOT NULL,
        info TEXT NOT NULL CHECK (json_valid(info)),
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        ttl REAL NOT NULL CHECK (ttl > 0)
    )""",
    """CREATE TABLE IF NOT EXISTS torpor_leases (
        session_id TEXT PRIMARY KEY NOT NULL REFERENCES torpor_sessions (id),
        host TEXT,
        epoch INTEGER NOT NULL CHECK (epoch >= 1),
        expires_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS torpor_leases_host ON torpor_leases (host)",
    """CREATE TABLE IF NOT EXISTS torpor_tenures (
        session_id TEXT NOT NULL REFERENCES torpor_sessions (id),
        epoch INTEGER NOT NULL,
        host TEXT NOT NULL,
        PRIMARY KEY (session_id, epoch)
    )""",
]


class SQLiteContextLog(SQLContextLog):
    backend = "sqlite"
    db_errors = (sqlite3.Error,)

    def __init__(self, path: Path, *, key: bytes, busy_timeout: float = BUSY_TIMEOUT_S):
        """Open (creating if needed) the log at ``path``; ``key`` signs its chain.

        Raises ContextError (cannot create, not a database, no WAL support),
        SchemaVersionError (written by a newer torpor).
        """
        self.path = Path(path)
        super().__init__(str(self.path), key)
        self._conn = self._open(busy_timeout)

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        step = "open context log"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                os.close(os.open(self.path, flags, 0o600))
                fsync_dir(self.path.parent)  # SQLite syncs its -wal's entry, not the db's
            except FileExistsError:
                pass
        except OSError as e:
            raise ContextError(f"cannot create {self.path}: {e.strerror}", step=step) from e
        try:
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise ContextError(f"cannot open {self.path}: {e}", step=step) from e
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise ContextError(
                    f"{self.path}: SQLite refused WAL mode (journal_mode={mode}); the context"
                    " log needs a local filesystem",
                    step=step,
                )
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._init_schema(conn)
        except sqlite3.Error as e:
            conn.close()
            raise ContextError(f"sqlite {self.path}: {e}", step=step) from e
        except BaseException:
            conn.close()
            raise
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            value = None
            has_meta = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'torpor_meta'"
            ).fetchone()
            if has_meta:
                row = conn.execute(
                    "SELECT value FROM torpor_meta WHERE key = 'schema_version'"
                ).fetchone()
                value = row[0] if row else None
            found = self.check_schema_version(value)
            if found is None:
                for stmt in DDL + DDL_REMOVED:
                    conn.execute(stmt)
                conn.execute(
                    "INSERT INTO torpor_meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif found == 1:
                self._migrate_1_to_2(conn)
            for stmt in DDL_LEASES:
                conn.execute(stmt)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            raise

    def _migrate_1_to_2(self, conn: sqlite3.Connection) -> None:
        """Schema 1 -> 2, inside the caller's write transaction: add the chain column,
        compute every entry's chain (the one UPDATE the log ever allows: the trigger
        is lifted and put back within this transaction), add ``torpor_removed``."""
        conn.execute("ALTER TABLE torpor_entries ADD COLUMN chain BLOB")
        conn.execute("DROP TRIGGER IF EXISTS torpor_entries_no_update")
        self.migrate_chain(Tx(conn, self._translate))
        conn.execute(_refuse("UPDATE", "torpor_entries"))
        for stmt in DDL_REMOVED:
            conn.execute(stmt)
        conn.execute(
            "UPDATE torpor_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
        )

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
            failpoints.hit("log.write" if write else "log.read", exc=sqlite3.OperationalError)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            raise

    def _close_connection(self) -> None:
        self._conn.close()

    def _is_unique_violation(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE constraint" in str(exc)
