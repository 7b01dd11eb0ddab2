"""The SQL implementation of :class:`ContextLog` shared by SQLite and PostgreSQL.

Role: every query and every rule (seq numbering, idempotency, fork visibility,
validation) lives here once, so both backends behave the same.  A backend only
supplies a connection, its DDL, how a transaction begins, and its placeholder
style (queries here are written with ``?``).

Tables (types shown for SQLite / PostgreSQL)::

    torpor_meta      key text PK, value text            ("schema_version", "1")
    torpor_sessions  id text PK, name text UNIQUE, created_at real/double,
                     parent_id text FK NULL, parent_seq integer/bigint NULL,
                     meta text(JSON)/jsonb, schema_version integer
    torpor_entries   session_id text FK, seq integer/bigint, kind text,
                     payload text(JSON)/jsonb, payload_bytes integer, key text NULL,
                     turn integer, created_at real/double
                     PRIMARY KEY (session_id, seq), UNIQUE (session_id, key)

Both data tables carry triggers that refuse UPDATE and DELETE.

Seq numbering: a session's rows hold only its *own* entries, all with
``seq > parent_seq``.  The last visible seq is ``max(own seq)`` or, with no own
rows yet, ``parent_seq`` (0 for a root).  ``append`` runs in a write transaction
that excludes every other append to the session (SQLite: ``BEGIN IMMEDIATE``
locks the whole database; PostgreSQL: the session row is locked ``FOR NO KEY
UPDATE``), looks the key up, and inserts ``last + 1``.  The primary key and the
(session_id, key) unique constraint are the backstop should that ever fail.

Visibility: session S sees its own rows plus, for each ancestor A reached through
fork links, A's own rows with ``seq <=`` the smallest fork point on the path from
S to A — one recursive query (:data:`VISIBLE`).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

from torpor.context.errors import ContextError, SchemaVersionError
from torpor.context.log import ContextLog
from torpor.context.model import (
    MIN_PREFIX,
    SCHEMA_VERSION,
    Entry,
    Kind,
    SessionRecord,
    check_key,
    check_kind,
    check_name,
    check_supersede,
    check_turn,
    decode_json,
    encode_json,
)
from torpor.errors import ConflictError, NotFoundError, TorporError, UsageError

SESSION_COLS = "id, name, created_at, parent_id, parent_seq, meta, schema_version"
ENTRY_COLS = "e.session_id, e.seq, e.kind, e.payload, e.key, e.created_at, e.turn"

# chain(sid, hi): S itself (hi NULL = unbounded), then each ancestor with the
# highest of its seqs that S can see.
VISIBLE = """
WITH RECURSIVE chain(sid, pid, pseq, hi) AS (
    SELECT id, parent_id, parent_seq, CAST(NULL AS BIGINT)
      FROM torpor_sessions WHERE id = ?
  UNION ALL
    SELECT s.id, s.parent_id, s.parent_seq,
           CASE WHEN c.hi IS NULL OR c.pseq < c.hi THEN c.pseq ELSE c.hi END
      FROM torpor_sessions s JOIN chain c ON s.id = c.pid
)
"""

INSERT_ENTRY = (
    "INSERT INTO torpor_entries"
    " (session_id, seq, kind, payload, payload_bytes, key, turn, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_SESSION = f"INSERT INTO torpor_sessions ({SESSION_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)"


class Tx:
    """A transaction's connection with ``?``-placeholder helpers."""

    def __init__(self, conn: Any, translate: Callable[[str], str]):
        self.conn = conn
        self._t = translate

    def one(self, sql: str, *params: object) -> Any:
        return self.conn.execute(self._t(sql), params).fetchone()

    def all(self, sql: str, *params: object) -> list[Any]:
        return list(self.conn.execute(self._t(sql), params).fetchall())

    def run(self, sql: str, *params: object) -> None:
        self.conn.execute(self._t(sql), params)


class SQLContextLog(ContextLog):
    """The shared implementation; see the module docstring."""

    backend = "sql"
    db_errors: tuple[type[Exception], ...] = ()
    # appended to the SELECT of the session row that starts an append
    lock_clause = ""

    def __init__(self, where: str):
        self.where = where
        self._mutex = threading.RLock()
        self._closed = False

    # -- what a backend provides ------------------------------------------------------

    @abstractmethod
    def _transaction(self, write: bool) -> contextlib.AbstractContextManager[Any]:
        """A transaction on the connection; ``write`` ones exclude concurrent appends."""

    @abstractmethod
    def _close_connection(self) -> None: ...

    @abstractmethod
    def _is_unique_violation(self, exc: Exception) -> bool: ...

    def _translate(self, sql: str) -> str:
        return sql

    def _error_text(self, exc: Exception) -> str:
        return " ".join(str(exc).split())

    # -- plumbing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self, step: str, *, write: bool = False) -> Iterator[Tx]:
        with self._mutex:
            if self._closed:
                raise ContextError("the context log is closed", step=step, path=self.where)
            try:
                with self._transaction(write) as conn:
                    yield Tx(conn, self._translate)
            except self.db_errors as e:
                raise self._db_error(e, step) from e

    def _db_error(self, exc: Exception, step: str) -> TorporError:
        text = self._error_text(exc)
        if self._is_unique_violation(exc):
            return ConflictError(f"already exists: {text}", step=step, path=self.where)
        return ContextError(f"{self.label}: {text}", step=step)

    @property
    def label(self) -> str:
        """What a message calls this database: ``sqlite /path`` or ``postgresql database…``."""
        return f"{self.backend} {self.where}"

    def check_schema_version(self, value: str | None) -> int | None:
        """The stored version as an int (None: fresh database); refuses newer ones."""
        if value is None:
            return None
        try:
            found = int(value)
        except ValueError:
            raise ContextError(
                f"context log {self.where} has a malformed schema_version {value!r}",
                step="open context log",
            ) from None
        if found > SCHEMA_VERSION:
            raise SchemaVersionError(found=found, supported=SCHEMA_VERSION, where=self.where)
        if found < 1:
            raise ContextError(
                f"context log {self.where} has an impossible schema_version {found}",
                step="open context log",
            )
        return found

    @staticmethod
    def _session(row: Any) -> SessionRecord:
        return SessionRecord(
            id=row[0],
            name=row[1],
            created_at=float(row[2]),
            parent_id=row[3],
            parent_seq=row[4],
            meta=decode_json(row[5]),
            schema_version=row[6],
        )

    def _entry(self, row: Any) -> Entry:
        try:
            kind = Kind(row[2])
        except ValueError:
            raise ContextError(
                f"entry {row[0]}#{row[1]} has kind {row[2]!r}, unknown to this torpor",
                step="read entries",
                path=self.where,
            ) from None
        return Entry(
            session_id=row[0],
            seq=row[1],
            kind=kind,
            payload=decode_json(row[3]),
            key=row[4],
            created_at=float(row[5]),
            turn=row[6],
        )

    def _session_row(self, tx: Tx, session_id: str, lock: bool = False) -> Any:
        if not isinstance(session_id, str):
            raise UsageError(f"session id must be a string, not {type(session_id).__name__}")
        sql = f"SELECT {SESSION_COLS} FROM torpor_sessions WHERE id = ?"
        row = tx.one(sql + (self.lock_clause if lock else ""), session_id)
        if row is None:
            raise NotFoundError(f"no session with id {session_id!r}", path=self.where)
        return row

    def _resolve(self, tx: Tx, ref: str) -> Any:
        if not isinstance(ref, str) or not ref:
            raise UsageError(f"session reference must be a non-empty string, not {ref!r}")
        base = f"SELECT {SESSION_COLS} FROM torpor_sessions WHERE "
        row = tx.one(base + "id = ?", ref) or tx.one(base + "name = ?", ref)
        if row is not None:
            return row
        if len(ref) >= MIN_PREFIX:
            rows = tx.all(
                base + "substr(id, 1, CAST(? AS INTEGER)) = ? ORDER BY created_at, id LIMIT 6",
                len(ref),
                ref,
            )
            if len(rows) == 1:
                return rows[0]
            if rows:
                some = ", ".join(f"{r[0]} ({r[1]})" for r in rows[:5])
                more = " and more" if len(rows) > 5 else ""
                raise UsageError(f"session id prefix {ref!r} is ambiguous: {some}{more}")
        hint = "" if len(ref) >= MIN_PREFIX else f" (id prefixes need {MIN_PREFIX}+ characters)"
        raise NotFoundError(f"no session {ref!r}{hint}", path=self.where)

    @staticmethod
    def _last_seq(tx: Tx, session_id: str, parent_seq: int | None) -> int:
        (top,) = tx.one("SELECT MAX(seq) FROM torpor_entries WHERE session_id = ?", session_id)
        return int(top) if top is not None else (parent_seq or 0)

    # -- the API ------------------------------------------------------------------------

    def create_session(
        self,
        name: str | None = None,
        meta: dict[str, Any] | None = None,
        *,
        parent: tuple[str, int] | None = None,
        session_id: str | None = None,
    ) -> SessionRecord:
        sid = uuid.uuid4().hex if session_id is None else check_name(session_id, "session id")
        name = f"s-{sid[:8]}" if name is None else check_name(name)
        meta_text, _ = encode_json({} if meta is None else meta, "session meta")
        fork_seq: int | None = None
        if parent is not None:
            if not isinstance(parent, tuple) or len(parent) != 2:
                raise UsageError(f"parent must be (session_id, seq), not {parent!r}")
            fork_seq = parent[1]
            if not isinstance(fork_seq, int) or isinstance(fork_seq, bool) or fork_seq < 0:
                raise UsageError(f"fork point must be an integer seq >= 0, not {fork_seq!r}")
        with self._tx("create session", write=True) as tx:
            parent_id: str | None = None
            if parent is not None:
                prow = self._resolve(tx, parent[0])
                parent_id = prow[0]
                last = self._last_seq(tx, prow[0], prow[4])
                if fork_seq is not None and fork_seq > last:
                    raise UsageError(
                        f"cannot fork {prow[1]} at seq {fork_seq}: its log ends at {last}"
                    )
            if tx.one("SELECT id FROM torpor_sessions WHERE id = ?", sid) is not None:
                raise ConflictError(f"a session with id {sid!r} already exists")
            if tx.one("SELECT id FROM torpor_sessions WHERE name = ?", name) is not None:
                raise ConflictError(f"a session named {name!r} already exists")
            now = time.time()
            tx.run(INSERT_SESSION, sid, name, now, parent_id, fork_seq, meta_text, SCHEMA_VERSION)
        return SessionRecord(
            id=sid,
            name=name,
            created_at=now,
            parent_id=parent_id,
            parent_seq=fork_seq,
            meta=decode_json(meta_text),
            schema_version=SCHEMA_VERSION,
        )

    def get_session(self, ref: str) -> SessionRecord:
        with self._tx("get session") as tx:
            return self._session(self._resolve(tx, ref))

    def list_sessions(self) -> list[SessionRecord]:
        with self._tx("list sessions") as tx:
            rows = tx.all(f"SELECT {SESSION_COLS} FROM torpor_sessions ORDER BY created_at, id")
        return [self._session(r) for r in rows]

    def append(
        self,
        session_id: str,
        kind: Kind,
        payload: dict[str, Any],
        *,
        turn: int,
        key: str | None = None,
    ) -> Entry:
        kind = check_kind(kind)
        check_turn(turn)
        check_key(key)
        text, size = encode_json(payload, f"{kind.value} payload")
        with self._tx("append", write=True) as tx:
            srow = self._session_row(tx, session_id, lock=True)
            if key is not None:
                old = tx.one(
                    f"SELECT {ENTRY_COLS} FROM torpor_entries e"
                    " WHERE e.session_id = ? AND e.key = ?",
                    session_id,
                    key,
                )
                if old is not None:
                    return self._entry(old)
            seq = self._last_seq(tx, session_id, srow[4]) + 1
            if kind is Kind.SUPERSEDE:
                check_supersede(decode_json(text), seq)
            now = time.time()
            tx.run(INSERT_ENTRY, session_id, seq, kind.value, text, size, key, turn, now)
        return Entry(session_id, seq, kind, decode_json(text), key, now, turn)

    def entries(self, session_id: str, *, after: int = 0, limit: int | None = None) -> list[Entry]:
        if not isinstance(after, int) or after < 0:
            raise UsageError(f"after must be an integer >= 0, not {after!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise UsageError(f"limit must be None or an integer >= 0, not {limit!r}")
        sql = (
            VISIBLE + f"SELECT {ENTRY_COLS} FROM torpor_entries e JOIN chain c"
            " ON e.session_id = c.sid"
            " WHERE e.seq > ? AND (c.hi IS NULL OR e.seq <= c.hi) ORDER BY e.seq"
        )
        params: list[object] = [session_id, after]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._tx("read entries") as tx:
            self._session_row(tx, session_id)
            rows = tx.all(sql, *params)
        return [self._entry(r) for r in rows]

    def last_seq(self, session_id: str) -> int:
        with self._tx("read last seq") as tx:
            row = self._session_row(tx, session_id)
            return self._last_seq(tx, session_id, row[4])

    def stats(self, session_id: str) -> dict[str, int]:
        with self._tx("read stats") as tx:
            self._session_row(tx, session_id)
            own, size = tx.one(
                "SELECT COUNT(*), COALESCE(SUM(payload_bytes), 0) FROM torpor_entries"
                " WHERE session_id = ?",
                session_id,
            )
            (visible,) = tx.one(
                VISIBLE + "SELECT COUNT(*) FROM torpor_entries e JOIN chain c"
                " ON e.session_id = c.sid WHERE c.hi IS NULL OR e.seq <= c.hi",
                session_id,
            )
        return {"entries": int(visible), "own_entries": int(own), "bytes": int(size)}

    def close(self) -> None:
        with self._mutex:
            if not self._closed:
                self._closed = True
                self._close_connection()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.where} {state}>"
