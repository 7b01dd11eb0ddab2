"""Errors raised by the snapshot store (defined in :mod:`torpor.errors`).

Lookups that fail use the shared
:class:`~torpor.errors.NotFoundError` and :class:`~torpor.errors.ConflictError`.

::

    TorporError
     └── StoreError                 the chunk store is damaged or misused      (10)
          ├── ManifestError         not a manifest, malformed, or inconsistent
          │    ├── ManifestAuthError      the MAC does not match the store's key
          │    └── ManifestVersionError   written by a newer (unknown) format major
          └── ChunkError            chunks an artifact needs are unusable
               ├── ChunkMissingError      at least one chunk file is absent
               └── ChunkCorruptError      chunks are present but do not hash right

A :class:`ChunkError` names *every* bad chunk found in one pass (``missing`` and
``corrupt``), not only the first, so one run of ``verify`` or one failed restore
tells the user everything that is damaged.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from pathlib import Path

from torpor.errors import (
    ChunkCorruptError,
    ChunkError,
    ChunkMissingError,
    ManifestAuthError,
    ManifestError,
    ManifestVersionError,
    StoreError,
)

__all__ = [
    "ChunkCorruptError",
    "ChunkError",
    "ChunkMissingError",
    "ManifestAuthError",
    "ManifestError",
    "ManifestVersionError",
    "StoreError",
    "chunk_error",
    "io_error",
]


def chunk_error(
    *, artifact: str, missing: Iterable[str], corrupt: Iterable[str], step: str, path: object
) -> ChunkError:
    """The right subclass: missing wins when both kinds are present (both are listed)."""
    missing, corrupt = tuple(missing), tuple(corrupt)
    cls = ChunkMissingError if missing else ChunkCorruptError
    return cls(artifact=artifact, missing=missing, corrupt=corrupt, step=step, path=path)


def io_error(e: OSError, step: str, path: Path | str | None) -> StoreError:
    """An OSError as a StoreError that names the path and says why: a read-only or
    full home must read as that, not as a traceback."""
    where = e.filename or path
    why = e.strerror or str(e)
    hint = ""
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = " (is the torpor home read-only or not yours?)"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = " (the disk is full)"
    return StoreError(f"cannot write {where}: {why}{hint}", step=step, path=where)
