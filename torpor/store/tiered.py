"""A chunk store whose truth is an object-store bucket, with the local folder as a cache.

Role: :class:`TieredStore` is a :class:`~torpor.store.store.ChunkStore` (same API,
same local folder layout, same crash- and gc-safety locally) that also keeps every
committed snapshot in a :class:`~torpor.store.backend.Backend` (S3).  It is chosen
with ``TORPOR_STORE=s3://bucket/prefix`` (or ``open_store(..., store=...)``); with
nothing configured :func:`open_store` returns a plain ``ChunkStore`` and nothing
here runs.  The bucket layout is in :mod:`torpor.store.backend`.

Invariants:

- **Immutable, content-addressed objects.**  A chunk object holds exactly the bytes
  of the local chunk file (one frame, plain or delta) and is uploaded with
  ``If-None-Match: *``: an existing object is never replaced.  A delta is uploaded
  only after its base.
- **Nothing half-listed.**  With ``durability="bucket"`` (the default) chunk uploads
  start as ``put_file`` writes them; a commit waits for those, uploads every other
  chunk the manifest names that the bucket is not known to hold (the parent's
  chunks and their delta bases are, when the parent is in the bucket; any other is
  checked with a HEAD) with every delta's base before it, then the manifest, and
  only then writes the local manifest: if the bucket fails, the
  commit raises a :class:`~torpor.errors.RemoteStoreError` and no manifest is listed
  anywhere; committing the same artifacts again later succeeds.  With
  ``durability="local"`` (``TORPOR_DURABILITY=local``) the commit returns at the
  local durable point and a background uploader sends it (same order); a
  ``pending/<id>`` marker survives crashes and the next store opened on this home
  resumes the upload.  :attr:`TieredStore.last_commit` says which happened and how
  long each took.
- **Every download is checked** exactly as a local read is: a chunk's frame must
  decompress (through its base, fetched and checked too) to bytes whose BLAKE3 is
  its name before it is returned or cached; a manifest's MAC is checked before it is
  cached or parsed; a tombstone counts only if its MAC (over its id) verifies.  A bad
  object is refused (ChunkCorruptError / ManifestAuthError), never cached.
- **The cache is bounded** (``TORPOR_CACHE_MAX``, e.g. ``10G``; LRU by bytes: reads
  touch a chunk's mtime).  Eviction removes only chunks the bucket holds: never one
  named by a local manifest that is not in the bucket (``remote/<id>`` marks those
  that are), never one younger than the oldest live lease — writers hold one while
  they write, readers (:meth:`TieredStore.pinned`) while they read, so what a
  running read has touched stays.  A chunk evicted anyway between a reader's check
  and its open (a dead reader's lease, a clock step) is fetched again: eviction
  never makes a read fail.
- **One key per deployment.**  Manifests are MACed with the home's ``store/key``;
  every host sharing a bucket must have the same key file.  The bucket's
  ``FORMAT`` object records the key's id (an HMAC of a constant), so a host with a
  different key gets a clear error at open, not MAC failures later.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import logging
import os
import queue
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from torpor import fsutil
from torpor.errors import NotFoundError, RemoteStoreError, UsageError
from torpor.store import chunks as ck
from torpor.store.backend import Backend, S3Backend
from torpor.store.errors import ChunkMissingError, ManifestAuthError, StoreError, chunk_error
from torpor.store.lease import create_lease, read_leases, release_lease
from torpor.store.manifest import (
    KIND_VM_SNAPSHOT,
    Artifact,
    Manifest,
    build_manifest,
    decode_manifest,
    encode_manifest,
)
from torpor.store.store import MAX_DELTA_DEPTH, ChunkStore, VerifyReport

log = logging.getLogger("torpor.store")

DURABILITIES = ("bucket", "local")
NET_THREADS = 16  # parallel requests: latency-bound, not CPU-bound
FORMAT_OBJECT = "FORMAT"
TOMBSTONE_MAGIC = b"torpor-tombstone 1\n"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_checked_formats: set[tuple[str, str]] = set()  # (bucket url, key id) checked this process
_checked_lock = threading.Lock()


def parse_size(text: str) -> int:
    """``10G`` / ``512M`` / ``1.5GiB`` / ``4096`` -> bytes (powers of 1024)."""
    m = _SIZE_RE.match(text or "")
    if not m:
        raise UsageError(f"not a size: {text!r} (e.g. 10G, 512M)")
    mult = 1024 ** "kmgt".index(m.group(2).lower()) * 1024 if m.group(2) else 1
    return int(float(m.group(1)) * mult)


def key_id(key: bytes) -> str:
    return hmac.new(key, b"torpor store key id", hashlib.sha256).hexdigest()[:32]


def tombstone_bytes(key: bytes, snap_id: str) -> bytes:
    mac = hmac.new(key, b"removed " + snap_id.encode(), hashlib.sha256).hexdigest()
    return TOMBSTONE_MAGIC + f"hmac-sha256 {mac}\n".encode()


@dataclass(frozen=True)
class CommitStats:
    """How the last :meth:`TieredStore.commit` became durable."""

    durability: str  # "bucket": in the bucket when commit returned; "local": uploaded behind
    local_ms: float  # the local commit (manifest written and fsynced)
    bucket_ms: float | None  # chunk + manifest upload; None while it runs behind
    chunks_uploaded: int = 0
    bytes_uploaded: int = 0
    requests: int = 0
    upload_pending: bool = False

    def timings(self) -> dict[str, float]:
        """As numbers for a snapshot's timings (``bucket_ms`` -1: still uploading)."""
        return {
            "commit_local_ms": self.local_ms,
            "commit_bucket_ms": -1.0 if self.bucket_ms is None else self.bucket_ms,
            "upload_pending": float(self.upload_pending),
            "upload_chunks": float(self.chunks_uploaded),
            "upload_bytes": float(self.bytes_uploaded),
            "upload_requests": float(self.requests),
        }


def open_store(
    root: Path,
    *,
    store: str | None = None,
    durability: str | None = None,
    cache_max: int | str | None = None,
) -> ChunkStore:
    """The store for ``root``: a plain local ChunkStore, or a TieredStore when
    ``store`` (or ``TORPOR_STORE``) names a bucket (``s3://bucket/prefix``)."""
    url = store if store is not None else os.environ.get("TORPOR_STORE", "")
    if not url or url == "local":
        return ChunkStore(root)
    if not url.startswith("s3://"):
        raise UsageError(f"TORPOR_STORE must be s3://bucket/prefix or empty, got {url!r}")
    return TieredStore(
        root,
        S3Backend(url),
        durability=durability or os.environ.get("TORPOR_DURABILITY") or "bucket",
        cache_max=cache_max if cache_max is not None else os.environ.get("TORPOR_CACHE_MAX"),
    )


class TieredStore(ChunkStore):
    """A :class:`ChunkStore` backed by a bucket (see module doc)."""

    def __init__(
        self,
        root: Path,
        remote: Backend,
        *,
        durability: str = "bucket",
        cache_max: int | str | None = None,
        level: int = ck.DEFAULT_LEVEL,
        threads: int | None = None,
    ) -> None:
        if durability not in DURABILITIES:
            raise UsageError(f"durability must be one of {', '.join(DURABILITIES)}: {durability!r}")
        self.remote = remote
        self.durability = durability
        self.cache_max = parse_size(cache_max) if isinstance(cache_max, str) else cache_max
        super().__init__(root, level=level, threads=threads)
        self.remote_dir = self.root / "remote"
        self.pending_dir = self.root / "pending"
        self.remote_dir.mkdir(exist_ok=True)
        self.pending_dir.mkdir(exist_ok=True)
        self._written: set[str] = set()  # chunks this writer wrote (trusted for upload)
        self._pending_trusted: dict[str, set[str]] = {}  # same, for commits sent behind
        self._prev_of: dict[str, str] = {}  # chunk -> the parent's chunk its delta used
        self._early: dict[str, Future[bool]] = {}  # uploads started by _write_chunk
        self._acct = (0, 0)  # (requests, bytes up) when the last commit ended
        self.last_commit: CommitStats | None = None
        self.remote_bad: list[tuple[str, StoreError]] = []  # bucket manifests refused
        self._check_format()
        self._acct = (self.remote.requests, self.remote.bytes_up)
        if any(self.pending_dir.iterdir()):
            _uploader.submit(self)

    # -- setup -------------------------------------------------------------

    def describe(self) -> str:
        return self.remote.describe()

    def _check_format(self) -> None:
        """The bucket's FORMAT names our key's id (created by the first writer)."""
        kid = key_id(self._key)
        tag = (self.remote.describe(), kid)
        with _checked_lock:
            if tag in _checked_formats:
                return
        want = b"torpor-store 1\nkey-id " + kid.encode() + b"\n"
        got = self.remote.get(FORMAT_OBJECT)
        if got is None and self.remote.put(FORMAT_OBJECT, want, if_absent=True):
            got = want
        elif got is None:
            got = self.remote.get(FORMAT_OBJECT) or b""
        if not got.startswith(b"torpor-store 1\n"):
            raise StoreError(
                f"{self.describe()} holds {got[:40]!r}, not a torpor store (format 1)",
                step="open store",
            )
        if got != want:
            raise ManifestAuthError(
                f"this home's store key ({self.root / 'key'}) is not the key the snapshots in "
                f"{self.describe()} are signed with: copy the key file from a host that "
                "uses this bucket (every host of a deployment shares one key)",
                step="open store",
            )
        with _checked_lock:
            _checked_formats.add(tag)

    @staticmethod
    def _obj_chunk(h: str) -> str:
        return f"chunks/{h[:2]}/{h}"

    @staticmethod
    def _obj_manifest(snap_id: str) -> str:
        return f"snapshots/{snap_id}.manifest"

    def _net(self) -> ThreadPoolExecutor:
        from torpor.store.store import _shared_pool

        return _shared_pool(NET_THREADS, "torpor-store-net")

    def _is_remote(self, snap_id: str) -> bool:
        return (self.remote_dir / snap_id).exists()

    def _mark_remote(self, snap_id: str) -> None:
        fsutil.atomic_write_bytes(self.remote_dir / snap_id, b"")

    # -- reads: local first, then the bucket ----------------------------------

    def _read_chunk(self, h: str, length: int | None, *, depth: int = 0) -> bytes | str:
        path = self._cpath(h)
        with contextlib.suppress(OSError):
            os.utime(path)  # LRU: recently used (and kept by a pinned reader's evictor)
        got = super()._read_chunk(h, length, depth=depth)
        if isinstance(got, bytes):
            return got
        if got == "corrupt":  # a damaged cache file: the bucket's copy may be good
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return self._fetch(h, length, depth)

    def _fetch(self, h: str, length: int | None, depth: int = 0) -> bytes | str:
        """Download chunk ``h``, check it (through its base), cache it; or say why not."""
        frame = self.remote.get(self._obj_chunk(h))
        if frame is None:
            return "missing"
        data = self._check_frame(h, frame, length, depth)
        if isinstance(data, bytes):
            self._cache_frame(h, frame)
        return data

    def _cache_frame(self, h: str, frame: bytes) -> None:
        """Put a checked frame into the cache (no fsync: the bucket is the truth)."""
        dest = self.chunk_path(h)
        tmp = ""
        try:
            fd, tmp = tempfile.mkstemp(prefix=f"{h[:16]}.", suffix=".tmp", dir=self.tmp_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(frame)
            try:
                os.replace(tmp, dest)
            except FileNotFoundError:
                dest.parent.mkdir(exist_ok=True)
                os.replace(tmp, dest)
        except OSError:  # a full cache disk must not fail a read that has its bytes
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _prefetch(self, hashes: Iterable[str]) -> None:
        """Fetch the chunks of ``hashes`` not in the cache, in parallel (cold restore)."""
        absent = [h for h in hashes if not os.path.exists(self._cpath(h))]
        if absent:
            list(self._net().map(lambda h: self._read_chunk(h, None), absent))

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """While held, eviction spares every chunk read (touched) since it began."""
        with self._gc_lock(shared=True):
            lease = create_lease(self.leases_dir)
        try:
            yield
        finally:
            release_lease(lease)

    def materialize(
        self, artifact: Artifact, dest: Path, *, name: str | None = None, durable: bool = True
    ) -> None:
        with self.pinned():
            self._prefetch(sorted(artifact.stored))
            super().materialize(artifact, dest, name=name, durable=durable)
        self.maybe_evict()

    def read_range(
        self, artifact: Artifact, offset: int, length: int, *, name: str | None = None
    ) -> bytes:
        with self.pinned():
            return super().read_range(artifact, offset, length, name=name)

    # -- manifests ------------------------------------------------------------

    def _fetch_manifest(self, snap_id: str) -> bool:
        """Download, authenticate and cache ``snap_id``'s manifest; False if the bucket
        has none.  ManifestError / ManifestAuthError if it does not verify."""
        data = self.remote.get(self._obj_manifest(snap_id))
        if data is None:
            return False
        src = f"{self.describe()}/{self._obj_manifest(snap_id)}"
        decode_manifest(self._key, data, source=src, expect_id=snap_id)
        fsutil.atomic_write_bytes(self._manifest_path(snap_id), data, mode=0o600)
        self._mark_remote(snap_id)
        return True

    def load(self, path: Path) -> Manifest:
        path = Path(path)
        stem = path.name[: -len(".manifest")] if path.name.endswith(".manifest") else None
        if (
            stem is not None
            and ck.is_chunk_hash(stem)
            and path.parent == self.snapshots_dir
            and not path.exists()
            and not self.is_removed(stem)
        ):
            self._fetch_manifest(stem)
        return super().load(path)

    def _sync_listing(self) -> None:
        """Bring the bucket's manifests and (authentic) tombstones into the cache."""
        names = self.remote.list("snapshots/")
        manifests, tombs = set(), set()
        for n in names:
            base = n[len("snapshots/") :]
            if base.endswith(".manifest") and ck.is_chunk_hash(base[:-9]):
                manifests.add(base[:-9])
            elif base.endswith(".removed") and ck.is_chunk_hash(base[:-8]):
                tombs.add(base[:-8])
        for i in sorted(tombs):
            if self.is_removed(i):
                continue
            body = self.remote.get(f"snapshots/{i}.removed")
            if body is not None and hmac.compare_digest(body, tombstone_bytes(self._key, i)):
                fsutil.atomic_write_bytes(self._tombstone_path(i), b"")
        todo = [i for i in sorted(manifests) if not self._manifest_path(i).exists()]
        todo = [i for i in todo if not self.is_removed(i)]
        bad: list[tuple[str, StoreError]] = []

        def one(i: str) -> None:
            try:
                self._fetch_manifest(i)
            except StoreError as e:
                bad.append((i, e))

        list(self._net().map(one, todo))
        self.remote_bad = sorted(bad, key=lambda b: b[0])

    def _scan_names(self) -> tuple[list[str], set[str]]:
        """Local names after a sync; a bucket manifest that failed its check is listed
        too (as a damaged local one is), so ``get`` / ``scan`` report why it failed."""
        self._sync_listing()
        ids, removed = super()._scan_names()
        bad = {i for i, _ in self.remote_bad} - removed - set(ids)
        return sorted(set(ids) | bad), removed

    def remove(self, ref: str, *, force: bool = False) -> Manifest | None:
        m = super().remove(ref, force=force)
        snap_id = m.id if m is not None else self.resolve_removed(ref)
        if snap_id is not None:
            self.remote.put(
                f"snapshots/{snap_id}.removed", tombstone_bytes(self._key, snap_id), if_absent=True
            )
        return m

    def resolve_removed(self, ref: str) -> str | None:
        low = ref.strip().lower()
        hits = [
            p.name[: -len(".removed")]
            for p in self.snapshots_dir.glob(f"{low}*.removed")
            if ck.is_chunk_hash(p.name[: -len(".removed")])
        ]
        return hits[0] if len(hits) == 1 else None

    # -- writes ---------------------------------------------------------------

    def _write_chunk(
        self, h: str, data: memoryview | bytes, prev: str | None = None
    ) -> tuple[int, float]:
        out = super()._write_chunk(h, data, prev)
        self._written.add(h)
        if prev is not None:
            self._prev_of[h] = prev
        if self.durability == "bucket":
            # start the upload now: the network overlaps the rest of the put (commit
            # waits for it, and still uploads every base first, see _upload)
            self._early[h] = self._net().submit(self._upload_chunk, h, True)
        return out

    def _drop_lease(self) -> None:
        super()._drop_lease()
        self._written = set()
        self._prev_of = {}
        self._early = {}

    def commit(
        self,
        artifacts: Mapping[str, Artifact],
        *,
        parent: str | None = None,
        kind: str = KIND_VM_SNAPSHOT,
        meta: Mapping[str, str] | None = None,
        created: str | None = None,
    ) -> Manifest:
        """Commit locally and to the bucket (see module doc for the order).

        Raises what :meth:`ChunkStore.commit` raises, and RemoteStoreError (the bucket
        failed: with durability ``bucket`` nothing is listed, here or there).
        """
        m, body = build_manifest(
            parent=parent, kind=kind, meta=dict(meta or {}), artifacts=dict(artifacts),
            created=created,
        )  # fmt: skip
        if parent is not None and not self._manifest_path(parent).exists():
            with contextlib.suppress(StoreError):
                self._fetch_manifest(parent)
        r0, u0 = self._acct  # since the last commit: the uploads a put started count too
        self._acct = (self.remote.requests, self.remote.bytes_up)
        if self.durability == "local":
            t0 = time.perf_counter()
            written = set(self._written)  # (the local commit forgets them)
            out = super().commit(artifacts, parent=parent, kind=kind, meta=meta, created=m.created)
            local_ms = (time.perf_counter() - t0) * 1000
            if not self._is_remote(out.id):
                fsutil.atomic_write_bytes(self.pending_dir / out.id, b"")
                self._pending_trusted[out.id] = written
                _uploader.submit(self)
            self.last_commit = CommitStats("local", local_ms, None, upload_pending=True)
            return out
        self._ensure_lease()  # the chunks stay ours (gc, eviction) until both commits
        for name, a in artifacts.items():  # what the local commit would refuse, first
            missing = [h for h in a.stored if not os.path.exists(self._cpath(h))]
            if missing:
                raise ChunkMissingError(
                    artifact=name, missing=missing, step="commit", path=self.root
                )
        t0 = time.perf_counter()
        n = self._upload(
            m, encode_manifest(self._key, body), trusted=self._written, prev_of=self._prev_of,
            early=self._early,
        )  # fmt: skip
        bucket_ms = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        out = super().commit(artifacts, parent=parent, kind=kind, meta=meta, created=m.created)
        local_ms = (time.perf_counter() - t1) * 1000
        self._mark_remote(out.id)
        self.last_commit = CommitStats(
            "bucket", local_ms, bucket_ms, chunks_uploaded=n,
            bytes_uploaded=self.remote.bytes_up - u0,
            requests=self.remote.requests - r0,
        )  # fmt: skip
        self._acct = (self.remote.requests, self.remote.bytes_up)
        self.maybe_evict()
        return out

    def last_commit_timings(self) -> dict[str, float]:
        return self.last_commit.timings() if self.last_commit is not None else {}

    def _vouched(self, m: Manifest) -> frozenset[str]:
        """Chunks the bucket is known to hold: the parent's, if the parent is there."""
        if m.parent is None or not self._is_remote(m.parent):
            return frozenset()
        try:
            return super().load(self._manifest_path(m.parent)).chunks
        except (StoreError, NotFoundError):
            return frozenset()

    def _upload(
        self,
        m: Manifest,
        manifest_bytes: bytes,
        trusted: set[str],
        prev_of: Mapping[str, str] | None = None,
        early: dict[str, Future[bool]] | None = None,
    ) -> int:
        """Chunks (bases first), then the manifest, into the bucket; chunks uploaded.

        The bucket holds a chunk's base whenever it holds a manifest naming the chunk
        (every manifest goes up after its chunks and their bases), so the parent's
        chunks, and the bases of its chunks, need no request: a delta written against
        the parent's chunk ``prev`` (``prev_of``) has ``prev`` or ``prev``'s base as base.
        """
        vouched = self._vouched(m)
        prev_of = prev_of or {}
        todo = set(m.chunks) - vouched
        # a delta needs its base in the bucket first; bases outside ``todo`` are checked
        base_of: dict[str, str | None] = {}
        frontier = sorted(h for h in todo if prev_of.get(h) not in vouched)
        for _ in range(MAX_DELTA_DEPTH + 1):
            bases = dict(zip(frontier, self._executor().map(self._base_of, frontier), strict=True))
            base_of |= bases
            frontier = sorted({b for b in bases.values() if b} - vouched - todo)
            todo |= set(frontier)
            if not frontier:
                break

        def depth(h: str) -> int:
            d, cur = 0, base_of.get(h)
            while cur and d <= MAX_DELTA_DEPTH:
                d, cur = d + 1, base_of.get(cur)
            return d

        uploaded = 0
        for h, fut in list((early or {}).items()):
            if h not in todo:
                continue
            try:
                uploaded += fut.result()
            except StoreError:
                continue  # failed early: tried again below (and raised if it fails again)
            todo.discard(h)
            if early is not None:
                early.pop(h, None)
        waves: dict[int, list[str]] = {}
        for h in todo:
            waves.setdefault(depth(h), []).append(h)
        for d in sorted(waves, reverse=True):  # deepest = plain bases first
            for wrote in self._net().map(lambda h: self._upload_chunk(h, h in trusted), waves[d]):
                uploaded += wrote
        self.remote.put(self._obj_manifest(m.id), manifest_bytes, if_absent=True)
        return uploaded

    def _upload_chunk(self, h: str, trusted: bool) -> bool:
        """Upload chunk ``h``'s local frame unless the bucket has it (never overwrites)."""
        if not trusted and self.remote.exists(self._obj_chunk(h)):
            return False
        if not trusted:  # a chunk this writer did not write: check it before sharing it
            got = ChunkStore._read_chunk(self, h, None)
            if not isinstance(got, bytes):
                raise chunk_error(
                    artifact="upload", missing=[h] if got == "missing" else [],
                    corrupt=[h] if got == "corrupt" else [], step="upload", path=self.root,
                )  # fmt: skip
        try:
            with open(self._cpath(h), "rb") as f:
                frame = f.read()
        except FileNotFoundError:
            raise ChunkMissingError(artifact="upload", missing=[h], step="upload") from None
        return self.remote.put(self._obj_chunk(h), frame, if_absent=True)

    def upload_pending(self) -> list[str]:
        """Upload every locally committed snapshot marked pending; the ids uploaded."""
        done = []
        for p in sorted(self.pending_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns):
            snap_id = p.name
            try:
                data = self._manifest_path(snap_id).read_bytes()
                m = super().load(self._manifest_path(snap_id))
            except (OSError, StoreError, NotFoundError):
                p.unlink(missing_ok=True)  # removed or damaged meanwhile: nothing to send
                continue
            with self.pinned():
                self._upload(m, data, trusted=self._pending_trusted.pop(snap_id, set()))
            self._mark_remote(snap_id)
            p.unlink(missing_ok=True)
            done.append(snap_id)
        return done

    def verify(self) -> VerifyReport:
        """:meth:`ChunkStore.verify` of the cache; a chunk absent from the cache (evicted,
        never fetched) counts as missing only if the bucket lacks it too."""
        r = super().verify()
        if not r.missing:
            return r
        gone = {
            h
            for h, there in zip(
                r.missing,
                self._net().map(lambda h: self.remote.exists(self._obj_chunk(h)), r.missing),
                strict=True,
            )
            if not there
        }
        corrupt = set(r.corrupt)
        affected = {
            i: tuple(h for h in hs if h in gone or h in corrupt) for i, hs in r.affected.items()
        }
        return VerifyReport(
            chunks_checked=r.chunks_checked,
            bytes_checked=r.bytes_checked,
            manifests_checked=r.manifests_checked,
            corrupt=r.corrupt,
            missing=tuple(sorted(gone)),
            stray=r.stray,
            bad_manifests=r.bad_manifests,
            affected={i: hs for i, hs in affected.items() if hs},
        )

    # -- the bounded cache ---------------------------------------------------------

    def cache_bytes(self) -> int:
        total = 0
        files, _ = self._stored_chunks()
        for p in files:
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
        return total

    def maybe_evict(self) -> int:
        """Evict down to ``cache_max`` if the cache is above it (a stat per chunk file;
        the manifests are read only when something has to go)."""
        if self.cache_max is None or self.cache_bytes() <= self.cache_max:
            return 0
        return self.evict(self.cache_max)

    def evict(self, max_bytes: int) -> int:
        """Delete least recently used chunks the bucket holds until the cache is at most
        ``max_bytes`` (or nothing more may go); returns the bytes freed."""
        with self._gc_lock(shared=False):
            cutoff = time.time_ns()
            for lease in read_leases(self.leases_dir):
                if lease.alive():
                    cutoff = min(cutoff, lease.mtime_ns)
            keep: set[str] = set()
            for i in self._local_ids():
                if self._is_remote(i):
                    continue
                with contextlib.suppress(StoreError, NotFoundError):
                    keep |= super().load(self._manifest_path(i)).chunks
            frontier = sorted(keep)
            for _ in range(MAX_DELTA_DEPTH):  # and their bases
                found = {b for b in map(self._base_of, frontier) if b} - keep
                keep |= found
                frontier = sorted(found)
                if not frontier:
                    break
            files, _ = self._stored_chunks()
            entries = []
            total = 0
            for p in files:
                try:
                    s = p.stat()
                except FileNotFoundError:
                    continue
                total += s.st_size
                if p.name in keep or s.st_mtime_ns >= cutoff:
                    continue
                entries.append((s.st_mtime_ns, p, s.st_size))
            freed = 0
            for _, p, size in sorted(entries, key=lambda e: e[0]):
                if total - freed <= max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    freed += size
            return freed

    def _local_ids(self) -> list[str]:
        return super()._scan_names()[0]


class _Uploader:
    """One background thread per process sending ``durability=local`` commits."""

    def __init__(self) -> None:
        self._q: queue.Queue[TieredStore] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []

    def submit(self, store: TieredStore) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="torpor-store-upload", daemon=True
                )
                self._thread.start()
        self._q.put(store)

    def _run(self) -> None:
        while True:
            store = self._q.get()
            try:
                store.upload_pending()
            except (RemoteStoreError, StoreError, OSError) as e:
                # stays pending (store/pending/<id>): the next store opened on this
                # home, or the next local commit here, tries again
                self.errors.append(e)
                log.warning("background upload to %s failed: %s", store.describe(), e)
            finally:
                self._q.task_done()

    def wait(self, timeout: float | None = None) -> bool:
        """Until every submitted upload ran (True), or ``timeout`` passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._q.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


_uploader = _Uploader()


def wait_uploads(timeout: float | None = None) -> bool:
    """Wait for this process's background uploads (``durability=local``)."""
    return _uploader.wait(timeout)


@atexit.register
def _flush_at_exit() -> None:
    # a CLI process acknowledged a local commit and is exiting: give its upload a
    # bounded chance to finish; what does not stays pending and is resumed later
    _uploader.wait(timeout=float(os.environ.get("TORPOR_UPLOAD_EXIT_WAIT", "60")))
