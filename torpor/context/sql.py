"""The SQL implementation of :class:`ContextLog` shared by SQLite and PostgreSQL.

Role: every query and every rule (seq numbering, idempotency, fork visibility,
validation) lives here once, so both backends behave the same.  A backend only
supplies a connection, its DDL, how a transaction begins, and its placeholder
style (queries here are written with ``?``).

Tables (types shown for SQLite / PostgreSQL)::

    torpor_meta      key text PK, value text            ("schema_version", "2")
    torpor_sessions  id text PK, name text UNIQUE, created_at real/double,
                     parent_id text FK NULL, parent_seq integer/bigint NULL,
                     meta text(JSON)/jsonb, schema_version integer
    torpor_entries   session_id text FK, seq integer/bigint, kind text,
                     payload text(JSON)/jsonb, payload_bytes integer, key text NULL,
                     turn integer, created_at real/double, chain blob/bytea (32 bytes)
                     PRIMARY KEY (session_id, seq), UNIQUE (session_id, key)
    torpor_removed   session_id text PK FK, removed_at real/double,
                     seq integer/bigint (the tombstone entry)
    torpor_state, torpor_state_parts   state records (torpor.session.record): a
                     cache of a session's fold at a checkpoint, created IF NOT EXISTS
                     on first use, plain tables (rewritten in place, not versioned)
    torpor_hosts     id text PK, info text(JSON)/jsonb, started_at, heartbeat_at,
                     ttl real/double                    (mutable: one row per host)
    torpor_leases    session_id text PK FK, host text NULL (NULL: released),
                     epoch integer/bigint, expires_at real/double        (mutable)
    torpor_tenures   session_id text FK, epoch, host text: who held each epoch
                     PRIMARY KEY (session_id, epoch)       (one row per new holder)

Every data table carries triggers that refuse UPDATE and DELETE.  The host and
lease tables are not the log but coordination state beside it: they are updated
in place, have no such triggers, and are created (IF NOT EXISTS) on every open, so
they joined schema 2 without a version bump.  Schema 1 had no
``chain`` column and no ``torpor_removed``: opening such a database migrates it
(:meth:`SQLContextLog.migrate_chain`, in the one transaction that bumps the version).

Tamper evidence: every entry row carries a keyed MAC chain value (:mod:`torpor.context.chain`),
computed by ``append`` and checked by every read (``entries``); a row that fails
raises :class:`~torpor.context.errors.ChainError`.  A read after seq ``k`` checks
rows ``k+1..`` against row ``k``'s stored value, so a reader that keeps its place
pays only for new rows.

Removal: ``remove_session`` appends a ``removed`` tombstone entry and a
``torpor_removed`` row in one transaction.  A removed session is not listed, not
found by name, id or prefix, and refuses appends and new forks; its rows stay,
so forks made before keep reading their inherited prefix.

Seq numbering: a session's rows hold only its *own* entries, all with
``seq > parent_seq``.  The last visible seq is ``max(own seq)`` or, with no own
rows yet, ``parent_seq`` (0 for a root).  ``append`` runs in a write transaction
that excludes every other append to the session (SQLite: ``BEGIN IMMEDIATE``
locks the whole database; PostgreSQL: the session row is locked ``FOR NO KEY
UPDATE``), looks the key up, and inserts ``last + 1``.  The primary key and the
(session_id, key) unique constraint are the backstop should that ever fail.

Leases and fencing: a session's lease names the host that may drive it, with an
epoch that grows whenever the holder changes.  Every lease time is the database's
clock (:attr:`SQLContextLog.now_sql`), never a host's.  ``claim`` runs under the
same session-row lock as ``append`` (SQLite: the whole-database write lock), so a
claim and an append never interleave; an append with ``fence=(host, epoch)`` reads
the lease inside its own transaction, after taking that lock, and refuses unless
the lease is that host's, at that epoch, unexpired.  A host that lost its lease
(paused past its ttl, partitioned) therefore cannot add a single entry once another
host claimed the session, however late its write arrives.

Visibility: session S sees its own rows plus, for each ancestor A reached through
fork links, A's own rows with ``seq <=`` the smallest fork point on the path from
S to A — one recursive query (:data:`VISIBLE`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import threading
import time
import uuid
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

from torpor.context.chain import (
    GENESIS,
    canonical_entry,
    canonical_session,
    entry_mac,
    session_base,
)
from torpor.context.errors import ChainError, ContextError, SchemaVersionError
from torpor.context.log import ContextLog
from torpor.context.model import (
    MIN_PREFIX,
    SCHEMA_VERSION,
    Entry,
    HostRecord,
    Kind,
    Lease,
    SessionRecord,
    check_fence,
    check_host,
    check_key,
    check_kind,
    check_name,
    check_supersede,
    check_ttl,
    check_turn,
    decode_json,
    encode_json,
)
from torpor.errors import (
    ConflictError,
    FencedError,
    LeaseHeldError,
    NotFoundError,
    TorporError,
    UsageError,
)

SESSION_COLS = "id, name, created_at, parent_id, parent_seq, meta, schema_version"
# a session row as read: its meta as text ({meta}: the backend's text form) and
# when it was removed (NULL: live)
SESSION_SELECT = (
    "SELECT s.id, s.name, s.created_at, s.parent_id, s.parent_seq, {meta}, s.schema_version,"
    " r.removed_at FROM torpor_sessions s LEFT JOIN torpor_removed r ON r.session_id = s.id"
)
ENTRY_COLS = "e.session_id, e.seq, e.kind, {payload}, e.key, e.created_at, e.turn, e.chain"

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
    " (session_id, seq, kind, payload, payload_bytes, key, turn, created_at, chain)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_SESSION = f"INSERT INTO torpor_sessions ({SESSION_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
LEASE_SELECT = "SELECT session_id, host, epoch, expires_at FROM torpor_leases"
INSERT_TENURE = "INSERT INTO torpor_tenures (session_id, epoch, host) VALUES (?, ?, ?)"
# a heartbeat: a host seen again after its last heartbeat expired starts a new stretch
UPSERT_HOST = (
    "INSERT INTO torpor_hosts (id, info, started_at, heartbeat_at, ttl) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET info = excluded.info,"
    " started_at = CASE WHEN torpor_hosts.heartbeat_at + torpor_hosts.ttl < excluded.heartbeat_at"
    " THEN excluded.started_at ELSE torpor_hosts.started_at END,"
    " heartbeat_at = excluded.heartbeat_at, ttl = excluded.ttl"
)


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
    # how a jsonb/JSON column reads as text (PostgreSQL renders jsonb with ::text)
    text_of = "{}"
    # the database's clock as unix seconds (leases and heartbeats are timed by it)
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"
    # appended to the SELECT of a lease row that a claim may change
    lease_lock = ""

    def __init__(self, where: str, key: bytes):
        if not isinstance(key, bytes) or len(key) < 16:
            raise UsageError("the context log's MAC key must be at least 16 bytes")
        self.where = where
        self._key = key
        self._mutex = threading.RLock()
        self._closed = False
        self._pseq: dict[str, int] = {}  # session id -> parent_seq (0: root); immutable
        self._session_sql = SESSION_SELECT.format(meta=self.text_of.format("s.meta"))
        self._entry_cols = ENTRY_COLS.format(payload=self.text_of.format("e.payload"))

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

    def _stored_text(self, tx: Tx, text: str) -> str:
        """``text`` as the database will give it back (the MAC covers that form)."""
        return text

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
            removed_at=None if row[7] is None else float(row[7]),
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
            chain=bytes(row[7]) if row[7] is not None else b"",
        )

    def _session_row(self, tx: Tx, session_id: str, lock: bool = False, live: bool = False) -> Any:
        if not isinstance(session_id, str):
            raise UsageError(f"session id must be a string, not {type(session_id).__name__}")
        sql = self._session_sql + " WHERE s.id = ?"
        row = tx.one(sql + (self.lock_clause if lock else ""), session_id)
        if row is None:
            raise NotFoundError(f"no session with id {session_id!r}", path=self.where)
        if live and row[7] is not None:
            raise NotFoundError(f"session {row[1]} ({row[0]}) was removed", path=self.where)
        return row

    def _resolve(self, tx: Tx, ref: str, include_removed: bool = False) -> Any:
        if not isinstance(ref, str) or not ref:
            raise UsageError(f"session reference must be a non-empty string, not {ref!r}")
        base = self._session_sql + " WHERE "
        row = tx.one(base + "s.id = ?", ref) or tx.one(base + "s.name = ?", ref)
        if row is not None:
            if row[7] is not None and not include_removed:
                raise NotFoundError(f"session {row[1]} ({row[0]}) was removed", path=self.where)
            return row
        if len(ref) >= MIN_PREFIX:
            live = "" if include_removed else " AND r.removed_at IS NULL"
            rows = tx.all(
                base
                + "substr(s.id, 1, CAST(? AS INTEGER)) = ?"
                + live
                + " ORDER BY s.created_at, s.id LIMIT 6",
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

    # -- the chain (see torpor.context.chain) -------------------------------------------

    def _parent_seq(self, tx: Tx, session_id: str) -> int:
        pseq = self._pseq.get(session_id)
        if pseq is None:
            row = tx.one("SELECT parent_seq FROM torpor_sessions WHERE id = ?", session_id)
            pseq = self._pseq[session_id] = int(row[0] or 0) if row is not None else 0
        return pseq

    def _chain_at(self, tx: Tx, session_id: str, seq: int) -> bytes:
        """The stored chain value of entry ``seq`` of ``session_id``'s visible log."""
        row = tx.one(
            VISIBLE + "SELECT e.chain FROM torpor_entries e JOIN chain c ON e.session_id = c.sid"
            " WHERE e.seq = ? AND (c.hi IS NULL OR e.seq <= c.hi)",
            session_id,
            seq,
        )
        if row is None or row[0] is None:
            raise ChainError(
                f"context log of session {session_id}: entry {seq} is missing",
                session_id=session_id,
                seq=seq,
                where=self.where,
            )
        return bytes(row[0])

    def _base(self, tx: Tx, session_id: str, anchor: bytes | None = None) -> bytes:
        """What ``session_id``'s first own entry chains onto.  ``anchor``: the chain of
        the entry at its fork point, when the caller already holds it."""
        row = tx.one(
            "SELECT id, name, created_at, parent_id, parent_seq, "
            + self.text_of.format("meta")
            + " FROM torpor_sessions WHERE id = ?",
            session_id,
        )
        if row is None:
            raise NotFoundError(f"no session with id {session_id!r}", path=self.where)
        sid, name, created, parent_id, parent_seq, meta_text = row
        if anchor is None:
            if parent_id is None:
                anchor = GENESIS
            elif not parent_seq:
                anchor = self._base(tx, parent_id)
            else:
                anchor = self._chain_at(tx, parent_id, int(parent_seq))
        canon = canonical_session(sid, name, float(created), parent_id, parent_seq, meta_text)
        return session_base(self._key, anchor, canon)

    def _mac_of(self, row: Any, prev: bytes) -> bytes:
        """The chain value row (``self._entry_cols`` order) must carry after ``prev``."""
        canon = canonical_entry(row[0], row[1], row[2], row[6], row[4], float(row[5]), row[3])
        return entry_mac(self._key, prev, canon)

    def _check(
        self, tx: Tx, session_id: str, rows: list[Any], pred: Any | None
    ) -> Iterator[tuple[int, str]]:
        """Problems ``(seq, why)`` of ``rows`` (visible, seq order), given ``pred``, the
        visible row just before them (None: they start at seq 1)."""
        prev_seq = 0 if pred is None else pred[1]
        prev_chain: bytes | None = None if pred is None else pred[7]
        key, same = self._key, hmac.compare_digest
        first_own: dict[str, int] = {}  # owner -> seq of its first own entry
        for r in rows:
            owner, seq, stored = r[0], r[1], r[7]
            if seq != prev_seq + 1:
                yield prev_seq + 1, f"entries {prev_seq + 1}..{seq - 1} are missing"
            first = first_own.get(owner)
            if first is None:
                first = first_own[owner] = self._parent_seq(tx, owner) + 1
            if seq == first:
                anchor = bytes(prev_chain) if prev_chain is not None and seq > 1 else None
                prev = self._base(tx, owner, anchor)
            else:
                prev = GENESIS if prev_chain is None else bytes(prev_chain)
            canon = canonical_entry(owner, seq, r[2], r[6], r[4], float(r[5]), r[3])
            if stored is None:
                yield seq, "it has no chain value"
            elif not same(entry_mac(key, prev, canon), bytes(stored)):
                yield (
                    seq,
                    (
                        f"its MAC does not match ({r[2]} entry of session {owner}): its content,"
                        " place or session record changed after it was written, or this"
                        " home's key is not the one that wrote it"
                    ),
                )
            prev_seq, prev_chain = seq, stored

    def _raise_broken(self, session_id: str, seq: int, why: str) -> None:
        raise ChainError(
            f"context log of session {session_id} fails verification at entry {seq}: {why};"
            f" refusing to use it (run `torpor session verify` for every break)",
            session_id=session_id,
            seq=seq,
            where=self.where,
        )

    def migrate_chain(self, tx: Tx) -> int:
        """Compute and store the chain of every existing entry (schema 1 -> 2), parents'
        entries before their forks'.  The caller holds the write transaction, has added
        the column and lifted the UPDATE trigger.  Returns the number of rows."""
        sessions = tx.all(
            "SELECT id, name, created_at, parent_id, parent_seq, "
            + self.text_of.format("meta")
            + " FROM torpor_sessions ORDER BY created_at, id"
        )
        by_id = {r[0]: r for r in sessions}
        chains: dict[tuple[str, int], bytes] = {}
        bases: dict[str, bytes] = {}

        def visible_chain(sid: str, seq: int) -> bytes:
            while seq <= int(by_id[sid][4] or 0):  # inherited: the owner is an ancestor
                sid = by_id[sid][3]
            return chains[(sid, seq)]

        def base(sid: str) -> bytes:
            if sid not in bases:
                _, name, created, pid, pseq, meta = by_id[sid]
                if pid is None:
                    anchor = GENESIS
                elif not pseq:
                    anchor = base(pid)
                else:
                    anchor = visible_chain(pid, int(pseq))
                canon = canonical_session(sid, name, float(created), pid, pseq, meta)
                bases[sid] = session_base(self._key, anchor, canon)
            return bases[sid]

        done: set[str] = set()

        def do(sid: str) -> int:
            if sid in done:
                return 0
            n = 0
            pid = by_id[sid][3]
            if pid is not None:
                n += do(pid)
            prev = base(sid)
            rows = tx.all(
                f"SELECT {self._entry_cols} FROM torpor_entries e WHERE e.session_id = ?"
                " ORDER BY e.seq",
                sid,
            )
            for r in rows:
                prev = chains[(sid, r[1])] = self._mac_of(r, prev)
                tx.run(
                    "UPDATE torpor_entries SET chain = ? WHERE session_id = ? AND seq = ?",
                    prev,
                    sid,
                    r[1],
                )
                n += 1
            done.add(sid)
            return n

        return sum(do(r[0]) for r in sessions)

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
            taken = tx.one(self._session_sql + " WHERE s.name = ?", name)
            if taken is not None:
                gone = " (a removed session; names are not reused)" if taken[7] else ""
                raise ConflictError(f"a session named {name!r} already exists{gone}")
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

    def get_session(self, ref: str, *, include_removed: bool = False) -> SessionRecord:
        with self._tx("get session") as tx:
            return self._session(self._resolve(tx, ref, include_removed))

    def list_sessions(self, *, include_removed: bool = False) -> list[SessionRecord]:
        live = "" if include_removed else " WHERE r.removed_at IS NULL"
        with self._tx("list sessions") as tx:
            rows = tx.all(self._session_sql + live + " ORDER BY s.created_at, s.id")
        return [self._session(r) for r in rows]

    def append(
        self,
        session_id: str,
        kind: Kind,
        payload: dict[str, Any],
        *,
        turn: int,
        key: str | None = None,
        fence: tuple[str, int] | None = None,
    ) -> Entry:
        kind = check_kind(kind)
        if kind is Kind.REMOVED:
            raise UsageError("a removed entry is written by remove_session, not append")
        check_turn(turn)
        check_key(key)
        check_fence(fence)
        text, size = encode_json(payload, f"{kind.value} payload")
        with self._tx("append", write=True) as tx:
            return self._append(tx, session_id, kind, text, size, turn, key, fence)

    def _append(
        self,
        tx: Tx,
        session_id: str,
        kind: Kind,
        text: str,
        size: int,
        turn: int,
        key: str | None,
        fence: tuple[str, int] | None = None,
    ) -> Entry:
        srow = self._session_row(tx, session_id, lock=True, live=True)
        if fence is not None:
            # under the session lock, so no claim slips in before the insert; and as a
            # statement of its own, so (READ COMMITTED) it sees a claim that committed
            # while this append waited for the lock — a join in the locking SELECT
            # would read the lease as it was before the wait
            self._check_fence(tx, srow, fence)
        if key is not None:
            old = tx.one(
                f"SELECT {self._entry_cols} FROM torpor_entries e"
                " WHERE e.session_id = ? AND e.key = ?",
                session_id,
                key,
            )
            if old is not None:
                return self._entry(old)
        top = tx.one(
            "SELECT seq, chain FROM torpor_entries WHERE session_id = ? ORDER BY seq DESC LIMIT 1",
            session_id,
        )
        if top is not None:
            seq, prev = int(top[0]) + 1, bytes(top[1])
        else:  # the first own entry: it chains onto the session's base
            seq, prev = (srow[4] or 0) + 1, self._base(tx, session_id)
        if kind is Kind.SUPERSEDE:
            check_supersede(decode_json(text), seq)
        stored = self._stored_text(tx, text)
        now = time.time()
        chain = entry_mac(
            self._key, prev, canonical_entry(session_id, seq, kind.value, turn, key, now, stored)
        )
        tx.run(INSERT_ENTRY, session_id, seq, kind.value, text, size, key, turn, now, chain)
        return Entry(session_id, seq, kind, decode_json(stored), key, now, turn, chain)

    def remove_session(
        self, session_id: str, reason: str = "removed", *, fence: tuple[str, int] | None = None
    ) -> Entry:
        """Mark a session removed: append its ``removed`` tombstone and record the flag,
        in one transaction, and release its lease.  Nothing is deleted; forks keep their
        inherited prefix.

        Raises NotFoundError (no such session, or already removed), FencedError.
        """
        check_fence(fence)
        text, size = encode_json({"reason": reason}, "removed payload")
        with self._tx("remove session", write=True) as tx:
            srow = self._session_row(tx, session_id, lock=True, live=True)
            turn_row = tx.one(
                "SELECT MAX(turn) FROM torpor_entries WHERE session_id = ?", session_id
            )
            turn = int(turn_row[0] or 0) if turn_row is not None else 0
            e = self._append(tx, session_id, Kind.REMOVED, text, size, turn, None, fence)
            tx.run(
                "INSERT INTO torpor_removed (session_id, removed_at, seq) VALUES (?, ?, ?)",
                srow[0],
                e.created_at,
                e.seq,
            )
            tx.run("UPDATE torpor_leases SET host = NULL WHERE session_id = ?", srow[0])
        return e

    def own_entries(self, session_id: str, kind: Kind) -> list[Entry]:
        """``session_id``'s own entries of one ``kind`` (removed sessions too), not
        chain-checked (a kind's rows have gaps): bookkeeping such as which snapshots
        a removed session's checkpoints name, never what a session acts on."""
        kind = check_kind(kind)
        with self._tx("read entries") as tx:
            self._session_row(tx, session_id)
            rows = tx.all(
                f"SELECT {self._entry_cols} FROM torpor_entries e"
                " WHERE e.session_id = ? AND e.kind = ? ORDER BY e.seq",
                session_id,
                kind.value,
            )
        return [self._entry(r) for r in rows]

    def _visible_rows(self, tx: Tx, session_id: str, after: int, limit: int | None) -> list[Any]:
        sql = (
            VISIBLE + f"SELECT {self._entry_cols} FROM torpor_entries e JOIN chain c"
            " ON e.session_id = c.sid"
            " WHERE e.seq > ? AND (c.hi IS NULL OR e.seq <= c.hi) ORDER BY e.seq"
        )
        params: list[object] = [session_id, after]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return tx.all(sql, *params)

    def entries(self, session_id: str, *, after: int = 0, limit: int | None = None) -> list[Entry]:
        if not isinstance(after, int) or after < 0:
            raise UsageError(f"after must be an integer >= 0, not {after!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise UsageError(f"limit must be None or an integer >= 0, not {limit!r}")
        with self._tx("read entries") as tx:
            self._session_row(tx, session_id)
            # the row at `after` too: the new rows are checked against its chain value
            start = max(after - 1, 0)
            rows = self._visible_rows(
                tx, session_id, start, None if limit is None else limit + (after - start)
            )
            pred = None
            if after and rows and rows[0][1] == after:
                pred, rows = rows[0], rows[1:]
            elif after and rows:
                self._raise_broken(session_id, after, "the entry is missing")
            for seq, why in self._check(tx, session_id, rows, pred):
                self._raise_broken(session_id, seq, why)
        return [self._entry(r) for r in rows]

    def verify(self, session_id: str) -> list[tuple[int, str]]:
        """Every break of ``session_id``'s visible chain as ``(seq, why)``; [] = intact.
        Works on removed sessions too."""
        with self._tx("verify context log") as tx:
            self._session_row(tx, session_id)
            rows = self._visible_rows(tx, session_id, 0, None)
            out = list(self._check(tx, session_id, rows, None))
        return out

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

    # -- hosts and leases (see the module docstring) ------------------------------------

    def _now(self, tx: Tx) -> float:
        (t,) = tx.one(f"SELECT {self.now_sql}")
        return float(t)

    @staticmethod
    def _lease(row: Any) -> Lease:
        return Lease(row[0], row[1], int(row[2]), float(row[3]))

    def _check_fence(self, tx: Tx, srow: Any, fence: tuple[str, int]) -> None:
        host, epoch = fence
        row = tx.one(
            f"SELECT host, epoch, expires_at, {self.now_sql} FROM torpor_leases"
            " WHERE session_id = ?",
            srow[0],
        )
        if row is not None and row[0] == host and int(row[1]) == epoch and row[2] > row[3]:
            return
        if row is None:
            why, holder, held = "no host holds its lease", None, None
        else:
            holder, held = row[0], int(row[1])
            if holder is None:
                why = f"its lease was released (epoch {held})"
            elif holder == host and held == epoch:
                why = f"this host's lease (epoch {epoch}) expired {row[3] - row[2]:.1f} s ago"
            else:
                left = max(0.0, float(row[2]) - float(row[3]))
                why = f"host {holder} holds its lease at epoch {held} ({left:.1f} s left)"
        raise FencedError(
            f"session {srow[1]} ({srow[0]}): write refused for host {host} at epoch {epoch}:"
            f" {why}; this host must stop driving it",
            session_id=srow[0],
            host=host,
            epoch=epoch,
            holder=holder,
            holder_epoch=held,
        )

    def now(self) -> float:
        with self._tx("read database clock") as tx:
            return self._now(tx)

    def heartbeat(self, host: str, info: dict[str, Any], ttl: float) -> None:
        check_host(host)
        ttl = check_ttl(ttl)
        info_text, _ = encode_json(info, "host info")
        with self._tx("heartbeat", write=True) as tx:
            now = self._now(tx)
            tx.run(UPSERT_HOST, host, info_text, now, now, ttl)
            tx.run(
                "UPDATE torpor_leases SET expires_at = ? WHERE host = ? AND expires_at > ?",
                now + ttl,
                host,
                now,
            )

    def hosts(self) -> list[HostRecord]:
        with self._tx("list hosts") as tx:
            now = self._now(tx)
            rows = tx.all(
                "SELECT id, "
                + self.text_of.format("info")
                + ", started_at, heartbeat_at, ttl FROM torpor_hosts ORDER BY id"
            )
        return [
            HostRecord(r[0], decode_json(r[1]), float(r[2]), float(r[3]), r[3] + r[4] > now)
            for r in rows
        ]

    def claim(self, session_id: str, host: str, ttl: float) -> Lease:
        check_host(host)
        ttl = check_ttl(ttl)
        with self._tx("claim session lease", write=True) as tx:
            srow = self._session_row(tx, session_id, lock=True, live=True)
            row = tx.one(LEASE_SELECT + " WHERE session_id = ?" + self.lease_lock, srow[0])
            now = self._now(tx)
            if row is None:
                lease = Lease(srow[0], host, 1, now + ttl)
                tx.run(
                    "INSERT INTO torpor_leases (session_id, host, epoch, expires_at)"
                    " VALUES (?, ?, ?, ?)",
                    srow[0],
                    host,
                    lease.epoch,
                    lease.expires_at,
                )
                tx.run(INSERT_TENURE, srow[0], lease.epoch, host)
                return lease
            holder, epoch, expires = row[1], int(row[2]), float(row[3])
            if holder != host:
                if holder is not None and expires > now:
                    raise LeaseHeldError(
                        f"session {srow[1]} ({srow[0]}) is held by host {holder} (epoch"
                        f" {epoch}) for {expires - now:.1f} s more; it can be taken over once"
                        " that host stops renewing its lease",
                        session_id=srow[0],
                        holder=holder,
                        epoch=epoch,
                        seconds_left=expires - now,
                    )
                epoch += 1  # a new tenure: every write fenced with the old epoch is stale
                tx.run(INSERT_TENURE, srow[0], epoch, host)
            lease = Lease(srow[0], host, epoch, now + ttl)
            tx.run(
                "UPDATE torpor_leases SET host = ?, epoch = ?, expires_at = ? WHERE session_id = ?",
                host,
                epoch,
                lease.expires_at,
                srow[0],
            )
            return lease

    def release(self, session_id: str, host: str, epoch: int) -> bool:
        check_fence((host, epoch))
        with self._tx("release session lease", write=True) as tx:
            srow = self._session_row(tx, session_id, lock=True)
            row = tx.one(LEASE_SELECT + " WHERE session_id = ?" + self.lease_lock, srow[0])
            if row is None or row[1] != host or int(row[2]) != epoch:
                return False
            tx.run("UPDATE torpor_leases SET host = NULL WHERE session_id = ?", srow[0])
            return True

    def tenures(self, session_id: str, after: int = 0) -> list[tuple[int, str]]:
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise UsageError(f"after must be an epoch >= 0, not {after!r}")
        with self._tx("read session tenures") as tx:
            srow = self._session_row(tx, session_id)
            rows = tx.all(
                "SELECT epoch, host FROM torpor_tenures WHERE session_id = ? AND epoch > ?"
                " ORDER BY epoch",
                srow[0],
                after,
            )
        return [(int(r[0]), r[1]) for r in rows]

    def lease(self, session_id: str) -> Lease | None:
        with self._tx("read session lease") as tx:
            srow = self._session_row(tx, session_id)
            row = tx.one(LEASE_SELECT + " WHERE session_id = ?", srow[0])
        return None if row is None else self._lease(row)

    def expired_leases(self) -> list[Lease]:
        with self._tx("read expired leases") as tx:
            now = self._now(tx)
            rows = tx.all(
                "SELECT l.session_id, l.host, l.epoch, l.expires_at FROM torpor_leases l"
                " LEFT JOIN torpor_removed r ON r.session_id = l.session_id"
                " WHERE l.host IS NOT NULL AND l.expires_at <= ? AND r.session_id IS NULL"
                " ORDER BY l.expires_at, l.session_id",
                now,
            )
        return [self._lease(r) for r in rows]

    # -- state records (a cache for torpor.session.record) -----------------------------

    #: how a backend spells a byte string column (PostgreSQL: bytea)
    blob_type = "BLOB"
    _state_ready: bool | None = None  # None: tables not ensured yet; False: cannot

    def _state_tables(self) -> bool:
        """Create the record tables on first use (IF NOT EXISTS, both backends): a
        cache next to the log, not part of its schema version."""
        if self._state_ready is None:
            b = self.blob_type
            try:
                with self._tx("create state tables", write=True) as tx:
                    tx.run(
                        "CREATE TABLE IF NOT EXISTS torpor_state (session_id TEXT PRIMARY KEY,"
                        f" seq BIGINT NOT NULL, body {b} NOT NULL, mac {b} NOT NULL)"
                    )
                    tx.run(
                        "CREATE TABLE IF NOT EXISTS torpor_state_parts (session_id TEXT NOT NULL,"
                        f" digest TEXT NOT NULL, body {b} NOT NULL,"
                        " PRIMARY KEY (session_id, digest))"
                    )
                self._state_ready = True
            except TorporError:
                self._state_ready = False  # e.g. a read-only database: no records
        return bool(self._state_ready)

    def state_key(self) -> bytes:
        """The MAC key of state records: derived from the log's key for that use only,
        so a record's MAC can never stand in for an entry's."""
        return hashlib.blake2b(b"torpor state record key v1", key=self._key).digest()[:32]

    def state_get(self, session_id: str) -> tuple[int, bytes, bytes, bytes | None] | None:
        """``(seq, head, mac, chain of visible entry seq or None)`` of ``session_id``'s
        record, read in one transaction; None: no record."""
        if not self._state_tables():
            return None
        with self._tx("read state record") as tx:
            row = tx.one("SELECT seq, body, mac FROM torpor_state WHERE session_id = ?", session_id)
            if row is None:
                return None
            seq = int(row[0])
            try:
                chain: bytes | None = self._chain_at(tx, session_id, seq)
            except ChainError:
                chain = None
        return seq, bytes(row[1]), bytes(row[2]), chain

    def state_parts(self, session_id: str, digests: list[str]) -> dict[str, bytes]:
        """The sealed segments ``digests`` of ``session_id``'s record that exist."""
        out: dict[str, bytes] = {}
        if not digests or not self._state_tables():
            return out
        with self._tx("read state record") as tx:
            for i in range(0, len(digests), 100):
                some = digests[i : i + 100]
                marks = ", ".join("?" * len(some))
                for d, b in tx.all(
                    "SELECT digest, body FROM torpor_state_parts WHERE session_id = ?"
                    f" AND digest IN ({marks})",
                    session_id,
                    *some,
                ):
                    out[d] = bytes(b)
        return out

    def find_key(self, session_id: str, key: str) -> int | None:
        """The seq of the visible entry of ``session_id`` carrying idempotency ``key``
        (not chain-checked: a lookup; the caller reads the entry through ``entries``)."""
        with self._tx("find key") as tx:
            row = tx.one(
                VISIBLE + "SELECT e.seq FROM torpor_entries e JOIN chain c"
                " ON e.session_id = c.sid WHERE e.key = ? AND (c.hi IS NULL OR e.seq <= c.hi)"
                " ORDER BY e.seq LIMIT 1",
                session_id,
                key,
            )
        return None if row is None else int(row[0])

    def state_put(
        self,
        session_id: str,
        seq: int,
        head: bytes,
        mac: bytes,
        parts: dict[str, bytes],
        keep: list[str] | None = None,
    ) -> None:
        """Replace ``session_id``'s record head; add sealed segments (content-addressed);
        with ``keep``, drop the session's segments not in it (a record folded anew)."""
        if not self._state_tables():
            return
        with self._tx("write state record", write=True) as tx:
            if keep is not None:
                rows = tx.all(
                    "SELECT digest FROM torpor_state_parts WHERE session_id = ?", session_id
                )
                for (d,) in rows:
                    if d not in keep and d not in parts:
                        tx.run(
                            "DELETE FROM torpor_state_parts WHERE session_id = ? AND digest = ?",
                            session_id,
                            d,
                        )
            for d, body in parts.items():
                tx.run(
                    "INSERT INTO torpor_state_parts (session_id, digest, body) VALUES (?, ?, ?)"
                    # same digest, same bytes: an update only repairs an altered row
                    " ON CONFLICT (session_id, digest) DO UPDATE SET body = excluded.body",
                    session_id,
                    d,
                    body,
                )
            tx.run(
                "INSERT INTO torpor_state (session_id, seq, body, mac) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (session_id) DO UPDATE SET seq = excluded.seq,"
                " body = excluded.body, mac = excluded.mac",
                session_id,
                seq,
                head,
                mac,
            )

    def close(self) -> None:
        with self._mutex:
            if not self._closed:
                self._closed = True
                self._close_connection()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.where} {state}>"
