"""Which chunk store a torpor home uses: one way to open it, for every caller.

Role: :func:`home_store` is how the CLI (``snapshots``, ``snapshot inspect/rm``,
``verify``, ``gc``, ``system prune``, completion), the HTTP API, the dashboard, the
snapshot module and the VM's shim open a home's store: a plain
:class:`~torpor.store.ChunkStore` on ``home/store``, or a
:class:`~torpor.store.tiered.TieredStore` (that folder as a cache in front of a
bucket) when ``TORPOR_STORE=s3://bucket/prefix`` is set.  Before it, the CLI and
the server opened the folder directly and saw only the cache.

Invariants:

- **The environment is the configuration.**  ``TORPOR_STORE``,
  ``TORPOR_DURABILITY`` and ``TORPOR_CACHE_MAX`` are read when a store is opened.
  The CLI's global ``--store`` / ``--durability`` (and ``torpor serve``'s) set
  those variables for their process, so every process torpor starts from it —
  the VM's shim (spawned, or forked by the zygote with the requester's
  environment), the session idle watcher — opens the same store.
- **A namespace has a bucket prefix of its own.**  A namespace home of
  ``torpor serve`` (:mod:`torpor.server.tenancy`: a ``namespace`` file at its root)
  uses ``<prefix>/namespaces/<name>``: tenants never list, restore or remove each
  other's snapshots, and each namespace's key (its own ``store/key``) signs only its
  own (one shared prefix would make every namespace but the first fail the bucket's
  key check).
- Nothing here contacts the bucket except :func:`home_store`'s open (the
  TieredStore's format check) and what the caller then asks of the store;
  :func:`store_info` only reads the configuration and the local cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torpor.errors import UsageError

if TYPE_CHECKING:
    from torpor.paths import Paths
    from torpor.store import ChunkStore, Manifest

def _namespace(root: Path) -> str | None:
    from torpor.context.dsn import NAMESPACE_FILE, namespace_schema
    from torpor.paths import Paths

    if namespace_schema(Paths(root)) is None:  # (also checks the name)
        return None
    return (root / NAMESPACE_FILE).read_text().strip()


def check_store_url(url: str) -> str:
    """``url`` if it names a store (``s3://bucket/prefix``, or ``local`` / empty for the
    home's folder); UsageError otherwise."""
    if url in ("", "local"):
        return url
    from torpor.store.backend import parse_s3_url

    parse_s3_url(url)
    return url


def check_durability(value: str) -> str:
    from torpor.store.tiered import DURABILITIES

    if value not in DURABILITIES:
        raise UsageError(
            f"durability must be one of {', '.join(DURABILITIES)}, got {value!r} "
            f"(TORPOR_DURABILITY / --durability)"
        )
    return value


def store_url(root: Path) -> str | None:
    """The bucket URL the home at ``root`` uses (namespace prefix applied), or None
    for the local folder alone."""
    url = os.environ.get("TORPOR_STORE", "")
    if not check_store_url(url) or url == "local":
        return None
    ns = _namespace(root)
    if ns is not None:
        url = url.rstrip("/") + f"/namespaces/{ns}"
    return url


def home_store(paths: Paths | Path) -> ChunkStore:
    """The store of a home (a ``Paths`` or its root folder), created if absent."""
    root = Path(paths.root if not isinstance(paths, Path) else paths)
    store_dir = root / "store"
    store_dir.mkdir(parents=True, exist_ok=True)
    url = store_url(root)
    if not url:  # the home's folder alone: the bucket code (≈ 40 ms of imports) unneeded
        from torpor.store.store import ChunkStore

        return ChunkStore(store_dir)
    from torpor.store.tiered import open_store

    return open_store(store_dir, store=url)


@dataclass(frozen=True)
class StoreInfo:
    """What ``torpor info`` shows about the store (no request to the bucket)."""

    kind: str  # "local" | "bucket"
    url: str | None
    endpoint: str | None
    durability: str
    cache_bytes: int
    cache_max: int | None


def _dir_bytes(d: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(d):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                continue
    return total


def store_info(root: Path) -> StoreInfo:
    """The configured store of the home at ``root`` (UsageError if misconfigured)."""
    from torpor.store.tiered import parse_size

    url = store_url(root)
    cache = _dir_bytes(root / "store" / "chunks") + _dir_bytes(root / "store" / "packs")
    if url is None:
        return StoreInfo("local", None, None, "local", cache, None)
    durability = check_durability(os.environ.get("TORPOR_DURABILITY") or "bucket")
    raw_max = os.environ.get("TORPOR_CACHE_MAX")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return StoreInfo(
        "bucket",
        url,
        endpoint or "AWS S3 (no AWS_ENDPOINT_URL)",
        durability,
        cache,
        parse_size(raw_max) if raw_max else None,
    )


def where(store: ChunkStore, m: Manifest) -> dict[str, Any]:
    """Where snapshot ``m`` is: the bucket (and whether its upload is pending) and how
    much of it the local cache holds."""
    present = len(m.chunks) - len(store._absent(m.chunks))
    out: dict[str, Any] = {
        "store": "local",
        "cached_chunks": present,
        "chunks": len(m.chunks),
    }
    remote = getattr(store, "remote", None)
    if remote is not None:
        out["store"] = "bucket"
        out["bucket"] = remote.describe()
        # TieredStore's markers: remote/<id> once the bucket holds the manifest,
        # pending/<id> while a durability=local commit is still uploading
        out["in_bucket"] = (getattr(store, "remote_dir", store.root / "remote") / m.id).exists()
        out["upload_pending"] = (
            getattr(store, "pending_dir", store.root / "pending") / m.id
        ).exists()
    return out


def durability_fields(timings: dict[str, float]) -> dict[str, Any]:
    """A snapshot's durability for its checkpoint entry, from its timings.

    ``durability``: ``"bucket"`` (in the bucket when the snapshot was acknowledged),
    ``"local, upload pending"`` (durability local: acknowledged at the local write,
    uploading behind), ``"local"`` (no bucket).  ``commit_local_ms`` is the local
    commit; ``commit_bucket_ms`` the upload (None while it is pending or without a
    bucket)."""
    if "commit_bucket_ms" not in timings:
        local = timings.get("commit_ms")
        return {
            "durability": "local",
            "commit_local_ms": None if local is None else round(float(local), 1),
            "commit_bucket_ms": None,
        }
    pending = bool(timings.get("upload_pending")) or timings["commit_bucket_ms"] < 0
    return {
        "durability": "local, upload pending" if pending else "bucket",
        "commit_local_ms": round(float(timings.get("commit_local_ms", 0.0)), 1),
        "commit_bucket_ms": None if pending else round(float(timings["commit_bucket_ms"]), 1),
    }
