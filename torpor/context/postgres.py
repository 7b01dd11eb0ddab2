"""The PostgreSQL backend (psycopg 3; install ``torpor[postgres]``).

Durability: every append is one transaction, acknowledged after ``COMMIT``
returns.  The connection refuses to run with ``synchronous_commit = off`` (it
raises it to ``on``), so a returned append is flushed to the server's WAL (and,
if the server is so configured, to its synchronous standbys).

Concurrency: an append locks its session row ``FOR NO KEY UPDATE`` (appends to
one session queue up; other sessions and foreign-key checks are not blocked),
then numbers and inserts.  Schema creation takes a transaction-level advisory
lock so processes opening a fresh database at once do not race.

Tables, columns and triggers are those of :mod:`torpor.context.sql`, created in
the first schema of the connection's ``search_path`` (pick one with
``?options=-csearch_path%3Dmyschema`` in the DSN).  Errors name the server and
database as ``postgresql database "db" at host:port as user``; the password is
never part of a message.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from torpor.context.errors import ContextError
from torpor.context.model import SCHEMA_VERSION
from torpor.context.sql import SQLContextLog, Tx

__all__ = ["DDL", "PostgresContextLog", "describe_dsn"]

CONNECT_TIMEOUT_S = 10
SCHEMA_LOCK = 0x746F72706F72  # "torpor": pg_advisory_xact_lock key for schema setup

_REFUSE_FN = """
CREATE OR REPLACE FUNCTION torpor_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'torpor: % on % refused: the context log is append-only',
        TG_OP, TG_TABLE_NAME;
END
$$"""


def _refuse(table: str) -> list[str]:
    return [
        f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}",
        f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {table}"
        " FOR EACH STATEMENT EXECUTE FUNCTION torpor_append_only()",
    ]


DDL = [
    "CREATE TABLE IF NOT EXISTS torpor_meta (key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE IF NOT EXISTS torpor_sessions (
        id text PRIMARY KEY,
        name text NOT NULL UNIQUE,
        created_at double precision NOT NULL,
        parent_id text REFERENCES torpor_sessions (id),
        parent_seq bigint CHECK (parent_seq >= 0),
        meta jsonb NOT NULL,
        schema_version integer NOT NULL,
        CHECK ((parent_id IS NULL) = (parent_seq IS NULL))
    )""",
    """CREATE TABLE IF NOT EXISTS torpor_entries (
        session_id text NOT NULL REFERENCES torpor_sessions (id),
        seq bigint NOT NULL CHECK (seq >= 1),
        kind text NOT NULL,
        payload jsonb NOT NULL,
        payload_bytes integer NOT NULL,
        key text,
        turn integer NOT NULL CHECK (turn >= 0),
        created_at double precision NOT NULL,
        chain bytea NOT NULL CHECK (length(chain) = 32),
        PRIMARY KEY (session_id, seq),
        UNIQUE (session_id, key)
    )""",
    _REFUSE_FN,
    *_refuse("torpor_entries"),
    *_refuse("torpor_sessions"),
]
# schema 2's removal flags (also what a schema-1 database gains when migrated)
DDL_REMOVED = [
    """CREATE TABLE IF NOT EXISTS torpor_removed (
        session_id text PRIMARY KEY REFERENCES torpor_sessions (id),
        removed_at double precision NOT NULL,
        seq bigint NOT NULL
    )""",
    *_refuse("torpor_removed"),
]
# hosts and leases: coordination state beside the log, updated in place (no refusing
# triggers), created on every open so a schema-2 database gains them without a bump
DDL_LEASES = [
    """CREATE TABLE IF NOT EXISTS torpor_hosts (
        id text PRIMARY KEY,
        info jsonb NOT NULL,
        started_at double precision NOT NULL,
        heartbeat_at double precision NOT NULL,
        ttl double precision NOT NULL CHECK (ttl > 0)
    )""",
    """CREATE TABLE IF NOT EXISTS torpor_leases (
        session_id text PRIMARY KEY REFERENCES torpor_sessions (id),
        host text,
        epoch bigint NOT NULL CHECK (epoch >= 1),
        expires_at double precision NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS torpor_leases_host ON torpor_leases (host)",
    """CREATE TABLE IF NOT EXISTS torpor_tenures (
        session_id text NOT NULL REFERENCES torpor_sessions (id),
        epoch bigint NOT NULL,
        host text NOT NULL,
        PRIMARY KEY (session_id, epoch)
    )""",
]


def _secrets(dsn: str) -> list[str]:
    """Every spelling of the password in ``dsn`` (to scrub from messages)."""
    found: list[str] = []
    with contextlib.suppress(psycopg.Error):
        pw = conninfo_to_dict(dsn).get("password")
        if pw:
            found.append(str(pw))
    m = re.search(r"://[^/@]*?:([^@/]*)@", dsn)
    if m and m.group(1):
        found += [m.group(1), unquote(m.group(1))]
    m = re.search(r"[?&\s]password=([^&\s]+)", dsn)
    if m:
        found += [m.group(1), unquote(m.group(1))]
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return " ".join(text.split())


def describe_dsn(dsn: str) -> str:
    """``postgresql database "db" at host:port as user`` — never the password."""
    try:
        info: dict[str, Any] = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "postgresql database (unparsable DSN)"
    host = info.get("host") or info.get("hostaddr") or "the default socket"
    port = info.get("port") or "5432"
    user = info.get("user")
    db = info.get("dbname") or user or "(default)"
    return f'postgresql database "{db}" at {host}:{port}' + (f" as {user}" if user else "")


class PostgresContextLog(SQLContextLog):
    backend = "postgresql"
    db_errors = (psycopg.Error,)
    lock_clause = " FOR NO KEY UPDATE OF s"
    text_of = "{}::text"  # jsonb as text: what the chain's MAC covers
    blob_type = "bytea"  # state records (torpor.session.record)
    # the server's clock, now (not the transaction's start, which now() would give)
    now_sql = "CAST(extract(epoch FROM clock_timestamp()) AS double precision)"
    lease_lock = " FOR UPDATE"  # a claim waits for a heartbeat extending the same row

    def __init__(self, dsn: str, *, key: bytes, schema: str | None = None):
        """Connect and create the schema if needed; ``key`` signs the entries' chain.

        ``schema``: a PostgreSQL schema of its own (created if missing, put first on
        the connection's search_path) — one per torpor namespace sharing a database.

        Raises ContextError (unreachable server, refused login, missing database,
        malformed DSN), SchemaVersionError (written by a newer torpor).
        """
        self._dsn = dsn
        self._schema = schema
        self._secrets = _secrets(dsn)
        super().__init__(describe_dsn(dsn), key)
        self._conn = self._connect()
        try:
            self._init_schema(self._conn)
        except psycopg.Error as e:
            self._conn.close()
            raise self._db_error(e, "open context log") from e
        except BaseException:
            self._conn.close()
            raise

    def _connect(self) -> psycopg.Connection[Any]:
        step = "open context log"
        try:
            info = conninfo_to_dict(self._dsn)
        except psycopg.Error as e:
            # libpq may quote the offending part of the DSN: scrub, and do not chain
            msg = scrub(str(e), self._secrets)
            raise ContextError(f"malformed PostgreSQL DSN: {msg}", step=step) from None
        extra: dict[str, Any] = {}
        if "connect_timeout" not in info:
            extra["connect_timeout"] = CONNECT_TIMEOUT_S
        if "application_name" not in info:
            extra["application_name"] = "torpor"
        try:
            conn = psycopg.connect(self._dsn, autocommit=True, **extra)
        except psycopg.Error as e:
            msg = scrub(str(e), self._secrets)
            raise ContextError(f"cannot connect to {self.where}: {msg}", step=step) from None
        try:
            (sync,) = conn.execute("SHOW synchronous_commit").fetchone() or ("on",)
            if sync == "off":
                conn.execute("SET synchronous_commit = on")
            if self._schema:
                from psycopg import sql

                ident = sql.Identifier(self._schema)
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
                conn.execute(sql.SQL("SET search_path TO {}").format(ident))
        except psycopg.Error as e:
            conn.close()
            raise self._db_error(e, step) from e
        return conn

    def _init_schema(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            value = None
            row = conn.execute("SELECT to_regclass('torpor_meta')").fetchone()
            if row is not None and row[0] is not None:
                got = conn.execute(
                    "SELECT value FROM torpor_meta WHERE key = 'schema_version'"
                ).fetchone()
                value = got[0] if got else None
            found = self.check_schema_version(value)
            if found is None:
                for stmt in DDL + DDL_REMOVED:
                    conn.execute(stmt)
                conn.execute(
                    "INSERT INTO torpor_meta (key, value) VALUES ('schema_version', %s)",
                    (str(SCHEMA_VERSION),),
                )
            elif found == 1:
                self._migrate_1_to_2(conn)
            if conn.execute("SELECT to_regclass('torpor_tenures')").fetchone() in (None, (None,)):
                for stmt in DDL_LEASES:
                    conn.execute(stmt)

    def _migrate_1_to_2(self, conn: psycopg.Connection[Any]) -> None:
        """Schema 1 -> 2 inside the caller's transaction (PostgreSQL's DDL is
        transactional): add the chain column, lift the append-only trigger, compute every
        entry's chain, put the trigger back, add ``torpor_removed``."""
        conn.execute("ALTER TABLE torpor_entries ADD COLUMN chain bytea")
        conn.execute("DROP TRIGGER IF EXISTS torpor_entries_append_only ON torpor_entries")
        self.migrate_chain(Tx(conn, self._translate))
        for stmt in _refuse("torpor_entries") + DDL_REMOVED:
            conn.execute(stmt)
        conn.execute(
            "UPDATE torpor_meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
        )

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[psycopg.Connection[Any]]:
        with contextlib.ExitStack() as stack:
            stack.push(self._begin())  # already entered: only its __exit__ is left to run
            yield self._conn

    def _begin(self) -> psycopg.Transaction:
        """``BEGIN`` on a live connection.  A connection the server dropped while idle
        (restart, idle timeout) is only noticed here; nothing of this call was sent
        yet, so reconnecting and beginning again is safe even for an append."""
        for attempt in (1, 2):
            if self._conn.broken or self._conn.closed:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
                self._conn = self._connect()
            tx = self._conn.transaction()
            try:
                tx.__enter__()
            except psycopg.OperationalError:
                if attempt == 2 or not self._conn.broken:
                    raise
                continue
            return tx
        raise AssertionError("unreachable")

    @property
    def label(self) -> str:
        return self.where  # already says "postgresql database ..."

    def _translate(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _stored_text(self, tx: Tx, text: str) -> str:
        # jsonb renders a value its own way (key order, spacing, numbers): ask once
        (out,) = tx.one("SELECT CAST(CAST(? AS jsonb) AS text)", text)
        return str(out)

    def _close_connection(self) -> None:
        self._conn.close()

    def _is_unique_violation(self, exc: Exception) -> bool:
        return isinstance(exc, psycopg.errors.UniqueViolation)

    def _error_text(self, exc: Exception) -> str:
        return scrub(str(exc), self._secrets)
