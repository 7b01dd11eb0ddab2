"""Choosing and opening a context-log backend from a DSN.

::

    None            $TORPOR_CONTEXT_DSN if set, else as ""
    ""              SQLite at Paths.root / "context.db"
    /a/path.db      SQLite there (any string without a "scheme://")
    sqlite:///a.db  SQLite at /a.db (the path after "sqlite://" must be absolute)
    postgresql://user:pw@host:port/db?options   PostgreSQL (also postgres://)

psycopg is imported only for a PostgreSQL DSN, so the embedded default needs
nothing beyond the standard library.  Every backend gets the MAC key of its chain
from ``paths`` (the home's ``store/key``, created on first use).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torpor.context.log import ContextLog
from torpor.errors import SetupError, UsageError
from torpor.paths import Paths

__all__ = ["DB_NAME", "ENV_DSN", "open_log"]

ENV_DSN = "TORPOR_CONTEXT_DSN"
DB_NAME = "context.db"
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def open_log(dsn: str | None = None, *, paths: Paths | None = None) -> ContextLog:
    """Open the context log ``dsn`` names (see the module docstring).

    Raises UsageError (unknown scheme, relative sqlite:// path), SetupError
    (PostgreSQL DSN but psycopg is not installed), ContextError (the database
    cannot be opened; its message names the file or host and database, never a
    password), SchemaVersionError (written by a newer torpor).
    """
    if dsn is None:
        dsn = os.environ.get(ENV_DSN, "")
    paths = paths or Paths.default()
    if not dsn:
        return _sqlite(paths.root / DB_NAME, paths)
    m = _SCHEME.match(dsn)
    if m is None:
        return _sqlite(Path(dsn).expanduser().absolute(), paths)
    scheme = m.group(1).lower()
    if scheme == "sqlite":
        rest = dsn[m.end() :]
        if not rest.startswith("/"):
            raise UsageError(
                f"sqlite DSN {dsn!r} needs an absolute path: sqlite:///path/to/context.db"
            )
        return _sqlite(Path(rest), paths)
    if scheme in ("postgresql", "postgres"):
        try:
            import psycopg  # noqa: F401
        except ImportError as e:
            raise SetupError(
                "a PostgreSQL context log needs psycopg: pip install 'torpor[postgres]'",
                step="open context log",
            ) from e
        from torpor.context.postgres import PostgresContextLog

        return PostgresContextLog(dsn, key=chain_key(paths), schema=namespace_schema(paths))
    raise UsageError(
        f"unknown context log DSN scheme {scheme + '://'!r}: use a file path, sqlite:///path"
        " or postgresql://user@host/db"
    )


NAMESPACE_FILE = "namespace"
_NAMESPACE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def namespace_schema(paths: Paths) -> str | None:
    """The PostgreSQL schema of a namespace home (``torpor serve``'s tenants: the home
    holds a ``namespace`` file), None for an ordinary home.  Namespaces sharing one
    database each get ``torpor_ns_<name>``: they never see each other's sessions."""
    try:
        ns = (paths.root / NAMESPACE_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    if not _NAMESPACE.match(ns):
        raise UsageError(f"{paths.root / NAMESPACE_FILE}: bad namespace name {ns!r}")
    return "torpor_ns_" + ns.replace("-", "_")  # names have no "_": still one-to-one


def chain_key(paths: Paths) -> bytes:
    """The MAC key of the log's chain: the home's store key (one secret per home;
    hosts sharing a PostgreSQL log share it, as they share the snapshot store)."""
    from torpor.context.errors import ContextError
    from torpor.store.store import load_key

    try:
        return load_key(paths.store)
    except OSError as e:  # e.g. a read-only home without a key yet
        raise ContextError(
            f"cannot read or create the context log's key: {e.strerror}",
            step="open context log",
            path=paths.store / "key",
        ) from e


def _sqlite(path: Path, paths: Paths) -> ContextLog:
    from torpor.context.sqlite import SQLiteContextLog

    return SQLiteContextLog(path, key=chain_key(paths))
