"""Errors raised by the snapshot store.

These belong in :mod:`torpor.errors` (one hierarchy for all of torpor); they live
here until that shared file is edited.  Lookups that fail use the shared
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

from collections.abc import Iterable

from torpor.errors import TorporError


class StoreError(TorporError):
    exit_code = 10


class ManifestError(StoreError):
    pass


class ManifestAuthError(ManifestError):
    pass


class ManifestVersionError(ManifestError):
    pass


class ChunkError(StoreError):
    """Chunks of ``artifact`` are missing and/or corrupt; all are listed."""

    def __init__(
        self,
        *,
        artifact: str,
        missing: Iterable[str] = (),
        corrupt: Iterable[str] = (),
        step: str | None = None,
        path: object = None,
    ):
        self.artifact = artifact
        self.missing = tuple(sorted(set(missing)))
        self.corrupt = tuple(sorted(set(corrupt)))
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing chunk(s): {', '.join(self.missing)}")
        if self.corrupt:
            parts.append(f"{len(self.corrupt)} corrupt chunk(s): {', '.join(self.corrupt)}")
        super().__init__(f"artifact {artifact}: " + "; ".join(parts), step=step, path=path)


class ChunkMissingError(ChunkError):
    pass


class ChunkCorruptError(ChunkError):
    pass


def chunk_error(
    *, artifact: str, missing: Iterable[str], corrupt: Iterable[str], step: str, path: object
) -> ChunkError:
    """The right subclass: missing wins when both kinds are present (both are listed)."""
    missing, corrupt = tuple(missing), tuple(corrupt)
    cls = ChunkMissingError if missing else ChunkCorruptError
    return cls(artifact=artifact, missing=missing, corrupt=corrupt, step=step, path=path)
