"""torpor's snapshot store: content-addressed, compressed, authenticated, relocatable.

A snapshot is a manifest naming, for each artifact (``memory``, ``disk``,
``devstate``), the BLAKE3 hashes of its fixed-size, offset-aligned chunks; zero
chunks are ``None`` and cost nothing.  Chunks are stored once, however many
snapshots, VMs or files share them, each as its own zstd frame so any byte range
is readable alone.  A snapshot restored from P and snapshotted again stores only
the chunks that changed (``put_file(parent=...)``, or ``dirty=`` to skip reading
clean chunks at all).

On-disk layout (``Paths.root / "store"``; nothing inside is an absolute path, so the
folder can be copied elsewhere and used there)::

    store/
      FORMAT                          "torpor-store 1+packs" (or "torpor-store 1": no
                                      packs yet) — layout version
      key                             32 random bytes (0600): HMAC key for manifests
      gc.lock                         flock: gc exclusive, writers shared (briefly)
      chunks/<aa>/<blake3-hex>        one zstd frame; <aa> = first 2 hex digits
      packs/<32 hex>.pack             many frames + a MAC'd index (a big put's new
                                      chunks; torpor.store.packs)
      snapshots/<id>.manifest         "torpor-manifest 1" / "hmac-sha256 <mac>" / body
      snapshots/.<id>.manifest.*.tmp  a commit in flight (ignored, gc'd)
      snapshots/<id>.removed          tombstone: <id> was removed, stays removed
      leases/<host>.<pid>.<rnd>.lease a writer in flight: gc keeps chunks newer than it
      tmp/                            chunk temp files before their rename

Write path: ``put_file`` (one per artifact; chunk data fdatasync'ed) → ``commit`` (fsync
the chunk directories, then the manifest).
Read path: ``get`` (id, id prefix or tag) / ``scan`` / ``list`` → ``materialize`` or
``read_range`` (every chunk hash-checked); ``check_file`` authenticates an
uncompressed copy (the hot cache) against an artifact.  Maintenance: ``verify``,
``gc``, ``remove`` (tombstoned).  The crash-safety and
gc-safety arguments are in :mod:`torpor.store.store`; the manifest format in
:mod:`torpor.store.manifest`; errors in :mod:`torpor.store.errors`.

With ``TORPOR_STORE=s3://bucket/prefix`` the folder is a bounded cache in front of a
bucket: :func:`torpor.store.tiered.open_store` returns a
:class:`~torpor.store.tiered.TieredStore` (same API; packs and indexes, uploads,
checked downloads, eviction, durability and the gc rule across hosts are described
there; the object layout and the S3 client in :mod:`torpor.store.backend`).  Without
it, ``open_store`` is exactly ``ChunkStore``.
"""

from torpor.store.chunks import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL
from torpor.store.errors import (
    ChunkCorruptError,
    ChunkError,
    ChunkMissingError,
    ManifestAuthError,
    ManifestError,
    ManifestVersionError,
    StoreError,
)
from torpor.store.manifest import KIND_VM_SNAPSHOT, SCHEMA_VERSION, Artifact, Manifest
from torpor.store.store import (
    DEFAULT_GRACE_SECONDS,
    ChunkStore,
    GcReport,
    PutStats,
    VerifyReport,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_GRACE_SECONDS",
    "DEFAULT_LEVEL",
    "KIND_VM_SNAPSHOT",
    "SCHEMA_VERSION",
    "Artifact",
    "ChunkCorruptError",
    "ChunkError",
    "ChunkMissingError",
    "ChunkStore",
    "GcReport",
    "Manifest",
    "ManifestAuthError",
    "ManifestError",
    "ManifestVersionError",
    "PutStats",
    "StoreError",
    "VerifyReport",
]
