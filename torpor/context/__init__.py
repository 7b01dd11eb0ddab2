"""torpor's context log: the durable, append-only record of every agent session.

A session's log is a sequence of :class:`Entry` (user messages, model requests
and responses, tool calls and results, checkpoints, hibernate/resume, errors,
VM moves), numbered 1, 2, 3... without gaps.  An append returns only once the
entry is durable, and carries an optional idempotency key so a retried append
returns the original entry instead of adding another.  Nothing is updated or
deleted in place: a ``SUPERSEDE`` entry marks earlier ones as replaced
(:func:`effective` applies that).  A fork is a new session that shares its
parent's log up to a seq by reference: no entry is copied.

Backends (same behaviour, same test suite): SQLite in one file, the default
(:mod:`torpor.context.sqlite`), and PostgreSQL (:mod:`torpor.context.postgres`).
:func:`open_log` picks one from a DSN.  The interface is :class:`ContextLog`
(:mod:`torpor.context.log`); the shared SQL and the schema are described in
:mod:`torpor.context.sql`; the guarantees and operations guide in
``docs/context-log.md``.
"""

from torpor.context.dsn import ENV_DSN, open_log
from torpor.context.errors import ChainError, ContextError, SchemaVersionError
from torpor.context.log import ContextLog
from torpor.context.model import (
    SCHEMA_VERSION,
    Entry,
    HostRecord,
    Kind,
    Lease,
    SessionRecord,
    effective,
    superseded,
)

__all__ = [
    "ENV_DSN",
    "SCHEMA_VERSION",
    "ChainError",
    "ContextError",
    "ContextLog",
    "Entry",
    "HostRecord",
    "Kind",
    "Lease",
    "SchemaVersionError",
    "SessionRecord",
    "effective",
    "open_log",
    "superseded",
]
