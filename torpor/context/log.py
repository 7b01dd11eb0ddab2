"""The :class:`ContextLog` interface every backend implements.

Role: the one API the session layer talks to; SQLite and PostgreSQL implement it
with the same semantics (the shared implementation is :mod:`torpor.context.sql`).

Guarantees (both backends):

- Append-only: entries and sessions are never updated or deleted in place, and
  the database itself refuses ``UPDATE``/``DELETE`` of them (triggers).
- Per session, seqs are strictly increasing without gaps: ``seq`` = the last
  *visible* seq + 1, so a fork's first own entry is ``parent_seq + 1``.
- ``append`` returns only after the entry is durable (SQLite: WAL with
  ``synchronous=FULL``; PostgreSQL: a committed transaction with
  ``synchronous_commit`` at least ``on``).
- ``append`` with a key already used in that session returns the stored entry,
  unchanged, and writes nothing; appends are serialized per session, across
  threads and processes, so this holds under races too.
- A fork shares its parent's entries up to the fork point by reference: no row
  is copied; reads walk the ancestry.
- Tamper-evident: every entry carries a keyed MAC chained over the previous one
  (:mod:`torpor.context.chain`); ``entries`` checks every row it returns and raises
  :class:`~torpor.context.errors.ChainError` at the first that fails.
- Removal is a tombstone: ``remove_session`` appends a ``removed`` entry and flags
  the session; it is then neither listed nor found, and refuses appends, but its
  rows stay (forks keep their inherited prefix; ``verify`` still reads it).

A :class:`ContextLog` object may be shared by threads (calls are serialized);
do not carry one across ``fork()`` — open one per process.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from torpor.context.model import Entry, HostRecord, Kind, Lease, SessionRecord

__all__ = ["FOLLOW_BATCH", "ContextLog"]

FOLLOW_BATCH = 500


class ContextLog(ABC):
    """An append-only log of sessions' entries.  Use as a context manager or ``close()``."""

    @abstractmethod
    def create_session(
        self,
        name: str | None = None,
        meta: dict[str, Any] | None = None,
        *,
        parent: tuple[str, int] | None = None,
        session_id: str | None = None,
    ) -> SessionRecord:
        """Create a session, or a fork of ``parent = (session_id, seq)``.

        The id is ``uuid4().hex`` unless given; the name defaults to ``"s-" + id[:8]``.
        Raises UsageError (bad name/id/meta, fork point beyond the parent's log),
        NotFoundError (no such parent), ConflictError (name or id taken).
        """

    @abstractmethod
    def get_session(self, ref: str, *, include_removed: bool = False) -> SessionRecord:
        """By exact id, exact name, or unique id prefix of at least 4 characters.

        Raises NotFoundError (also for a removed session, unless ``include_removed``),
        or UsageError when a prefix is ambiguous.
        """

    @abstractmethod
    def list_sessions(self, *, include_removed: bool = False) -> list[SessionRecord]:
        """Every live session (and removed ones, if asked), oldest first."""

    @abstractmethod
    def remove_session(
        self, session_id: str, reason: str = "removed", *, fence: tuple[str, int] | None = None
    ) -> Entry:
        """Append the session's ``removed`` tombstone and flag it removed (one
        transaction); returns the tombstone and releases its lease.  Raises
        NotFoundError (no such session, or already removed), FencedError (``fence``
        given and stale, as for :meth:`append`)."""

    @abstractmethod
    def verify(self, session_id: str) -> list[tuple[int, str]]:
        """Every break of the session's visible MAC chain as ``(seq, why)``; [] = intact."""

    @abstractmethod
    def own_entries(self, session_id: str, kind: Kind) -> list[Entry]:
        """The session's own entries of one kind, unchecked (bookkeeping only)."""

    @abstractmethod
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
        """Append an entry; returns once it is durable.

        With a ``key`` already used in this session, returns that stored entry
        unchanged (even if ``kind``/``payload`` differ) and appends nothing.
        With ``fence = (host, epoch)`` the append happens only if the session's lease
        is held by ``host`` at ``epoch`` and unexpired, checked inside the append's
        transaction (before the key is looked up); otherwise FencedError and nothing
        is written.  Without a fence, leases are not looked at.
        Raises NotFoundError (no such session id, or it was removed), UsageError
        (bad kind, turn, key or payload; ``removed``), FencedError, ContextError (the
        database failed).
        """

    @abstractmethod
    def entries(self, session_id: str, *, after: int = 0, limit: int | None = None) -> list[Entry]:
        """The visible log with ``seq > after`` in seq order: the inherited prefix
        (through every ancestor, each cut at its fork point) then own entries.

        Each returned row is MAC-checked against the row before it (the one at
        ``after`` included), so reading on from where one stopped checks only new
        rows.  Raises ChainError at the first row that fails."""

    @abstractmethod
    def last_seq(self, session_id: str) -> int:
        """The last visible seq, 0 for an empty log."""

    @abstractmethod
    def stats(self, session_id: str) -> dict[str, int]:
        """``{"entries": visible, "own_entries": stored here, "bytes": own payload bytes}``."""

    # -- hosts and leases (mutable state beside the log; times from the database clock) --

    @abstractmethod
    def now(self) -> float:
        """The database's clock as unix seconds: what leases and heartbeats are timed by."""

    @abstractmethod
    def heartbeat(self, host: str, info: dict[str, Any], ttl: float) -> None:
        """Record that ``host`` is alive (its row's ``heartbeat_at`` = now, ``info``
        replaced) and extend every *unexpired* lease it holds to now + ``ttl``.  A
        lease that already expired is not revived: its host claims it again."""

    @abstractmethod
    def hosts(self) -> list[HostRecord]:
        """Every host that ever heartbeat, by id; ``alive`` = heartbeat within its ttl."""

    @abstractmethod
    def claim(self, session_id: str, host: str, ttl: float) -> Lease:
        """Take (or extend) the session's lease for ``host`` until now + ``ttl``.

        Succeeds when the lease is free (never claimed, or released), already held
        by ``host`` (same epoch, even if it had expired meanwhile), or held by another
        host past its expiry.  The epoch grows by one whenever the holder changes (a
        release counts).  Serialized with :meth:`append` of the same session.
        Raises LeaseHeldError (another host holds it, unexpired: names it and the
        seconds left), NotFoundError (no such session, or removed), UsageError.
        """

    @abstractmethod
    def release(self, session_id: str, host: str, epoch: int) -> bool:
        """Give the lease up if ``host`` still holds it at ``epoch``; returns whether
        it did.  The next claim, by any host, gets epoch + 1."""

    @abstractmethod
    def tenures(self, session_id: str, after: int = 0) -> list[tuple[int, str]]:
        """``(epoch, host)`` of every tenure of the session's lease with epoch >
        ``after``, oldest first: who held it since a given epoch (a release ends a
        tenure; the next claim starts one)."""

    @abstractmethod
    def lease(self, session_id: str) -> Lease | None:
        """The session's lease as stored (None: never claimed); may be expired."""

    @abstractmethod
    def expired_leases(self) -> list[Lease]:
        """Leases held by a host but past their expiry (live sessions only)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; further calls raise ContextError.  Idempotent."""

    def follow(
        self,
        session_id: str,
        *,
        after: int = 0,
        poll: float = 0.2,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[Entry]:
        """Yield entries with ``seq > after`` as they are appended, by any process.

        Polls every ``poll`` seconds while idle.  Ends once ``stop()`` is true, after
        yielding every entry that was visible when it said so; without ``stop`` it
        never ends.
        """
        while True:
            stopping = stop is not None and stop()
            batch = self.entries(session_id, after=after, limit=FOLLOW_BATCH)
            for e in batch:
                yield e
                after = e.seq
            if len(batch) == FOLLOW_BATCH:
                continue
            if stopping:
                return
            time.sleep(poll)

    def __enter__(self) -> ContextLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
