"""Errors raised by the context log (the base classes live in :mod:`torpor.errors`).

Bad input uses the shared :class:`~torpor.errors.UsageError`; lookups use
:class:`~torpor.errors.NotFoundError` and :class:`~torpor.errors.ConflictError`;
a missing optional driver is a :class:`~torpor.errors.SetupError`.  Failures of
the database itself are a :class:`ContextError`::

    TorporError
     └── ContextError               the context-log database failed or refused   (11)
          ├── SchemaVersionError    written by a newer torpor (unknown schema_version)
          └── ChainError            an entry's MAC chain breaks: the log was edited

Messages name the database (a file path, or ``postgresql://user@host:port/db``)
and never contain a password.
"""

from __future__ import annotations

from torpor.errors import TorporError

__all__ = ["ChainError", "ContextError", "SchemaVersionError"]


class ContextError(TorporError):
    """The context-log database could not be opened, read or written."""

    exit_code = 11


class SchemaVersionError(ContextError):
    """The database's ``schema_version`` is newer than this torpor understands."""

    def __init__(self, *, found: int, supported: int, where: str):
        self.found = found
        self.supported = supported
        super().__init__(
            f"context log {where} has schema_version {found}; this torpor understands"
            f" up to {supported}: upgrade torpor (the database was left untouched)",
            step="open context log",
        )


class ChainError(ContextError):
    """An entry's MAC does not match its content or place: the log was changed
    after it was written (or the home's key is not the one that wrote it)."""

    def __init__(self, message: str, *, session_id: str, seq: int, where: str):
        self.session_id = session_id
        self.seq = seq
        super().__init__(message, step="verify context log", path=where)
