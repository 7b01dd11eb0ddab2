"""A chunk store whose truth is an object-store bucket, with the local folder as a cache.

Role: :class:`TieredStore` is a :class:`~torpor.store.store.ChunkStore` (same API,
same local folder layout, same crash- and gc-safety locally) that also keeps every
committed snapshot in a :class:`~torpor.store.backend.Backend` (S3).  It is chosen
with ``TORPOR_STORE=s3://bucket/prefix`` (or ``open_store(..., store=...)``); with
nothing configured :func:`open_store` returns a plain ``ChunkStore`` and nothing
here runs.  The bucket layout is in :mod:`torpor.store.backend` (format 2).

Packs and indexes (a checkpoint costs a handful of requests, not one per chunk):

- A **pack** ``packs/<aa>/<hash>.pack`` is ``torpor-pack 1\n`` + 16 random bytes +
  chunk frames (each exactly the local chunk file's bytes: plain or delta),
  concatenated; ``<hash>`` is the BLAKE3 of the whole object.  A checkpoint's new
  chunks go into one pack, or several of about ``PACK_BYTES`` each, sealed and
  uploaded while ``put_file`` is still chunking.  The random bytes make every pack
  a new name: a pack is uploaded once with ``If-None-Match: *`` and never replaced.
- A snapshot's **index** ``snapshots/<id>.index`` says where *every* chunk it needs
  is — its own and its parents', and every delta's base (pack, offset, length,
  base) — so a cold restore reads one small object, then the packs in ranged GETs
  coalesced over adjacent frames (gaps up to ``COALESCE_GAP``), in parallel.  It is
  ``torpor-index 1`` / ``hmac-sha256 <mac over the id and body>`` / zstd(JSON):
  a truncated, damaged or foreign index is refused (ManifestAuthError /
  ManifestError naming it) before anything in it is used.  An index never changes
  once its manifest is in the bucket (a retried commit that finds both keeps them),
  so hosts may cache it.
- A checkpoint's chunks are located through its parent's index (deduplication is
  against the parent and within the checkpoint: identical chunks of unrelated
  snapshots are stored twice), the rest are packed from the local frames.

Invariants:

- **Nothing half-listed.**  Order of a commit: packs, index, the gc check below,
  manifest; only then the local manifest.  If the bucket fails, the commit raises a
  :class:`~torpor.errors.RemoteStoreError` and no manifest is listed anywhere;
  committing the same artifacts again later succeeds.  With ``durability="local"``
  (``TORPOR_DURABILITY=local``) the commit returns at the local durable point and a
  background uploader sends it (same order); a ``pending/<id>`` marker survives
  crashes and the next store opened on this home resumes the upload.
  :attr:`TieredStore.last_commit` says which happened and how long each took.
- **Every download is checked** as a local read is: a frame cut from a pack must
  decompress (through its base, fetched and checked too) to bytes whose BLAKE3 is
  its name before it is returned or cached; manifests and indexes are MAC-checked
  before use; a tombstone counts only if its MAC (over its id) verifies.  A bad
  object is refused (ChunkCorruptError / ManifestAuthError), never cached.
- **The cache is bounded** (``TORPOR_CACHE_MAX``, e.g. ``10G``; LRU by bytes: reads
  touch a chunk's mtime).  Eviction removes only chunks the bucket holds: never one
  named by a local manifest that is not in the bucket (``remote/<id>`` marks those
  that are), never one younger than the oldest live lease — writers hold one while
  they write, readers (:meth:`TieredStore.pinned`) while they read.  A chunk evicted
  anyway between a reader's check and its open is fetched again.  The cache is loose
  chunk files only: a TieredStore writes no local packs (``pack_min_chunks`` None);
  packs a home wrote before it had a bucket stay readable and are never evicted.
- **One key per deployment.**  Manifests, indexes and tombstones are MACed with the
  home's ``store/key``; every host sharing a bucket must have the same key file.
  The bucket's ``FORMAT`` object records the key's id, so a host with a different
  key gets a clear error at open.  A format-1 bucket (one object per chunk, older
  torpor) is refused at open with a clear error (no migration).

Garbage collection across hosts (:meth:`TieredStore.gc`; the rule, as restic and
kopia document theirs):

- **Live** = every manifest in the bucket, any host's, without an authentic
  tombstone (tags live in manifests; there is no other pin).  A pack is referenced
  if a live snapshot's index names it; a partly garbage pack is kept whole (no
  repacking).  An index that cannot be read makes that gc delete no pack.
- **Two phases.**  A pack unreferenced and older than the grace period (object times
  and "now" both from the server's clock) is first *condemned*: an empty object
  ``condemned/<pack>``.  A later gc deletes it only if it is still unreferenced and
  its marker is older than the grace period; a gc that finds a condemned pack
  referenced again removes the marker.  One gc at a time: ``gc/lock`` (taken with
  ``If-None-Match: *``; expires after ``GC_LOCK_TTL``).
- **A committer never names a condemned pack.**  Just before writing its manifest
  (after its packs and index), a commit lists ``condemned/`` and checks that the
  parent whose index lent it locations is still live (manifest there, no
  tombstone); chunks in a condemned pack, or lent by a removed parent, are packed
  again from the local cache (a condemned pack is still readable) and the index
  rewritten, then checked again.  So a pack a manifest names was not condemned when
  that manifest's check ran: a marker made later is older than the grace period
  only after the manifest is listed (a check and one PUT take far less than the
  grace period: the default 15 min; tests use seconds on loopback), and the gc that
  would delete it lists that manifest first.  Uploads in flight are protected by
  the grace period alone (they are not condemned while young); a commit slower than
  the grace period finds its own packs condemned and packs those chunks again.
- Indexes and manifests of tombstoned snapshots are deleted (the tombstone stays);
  an index with no manifest older than the grace period (a failed commit) too.
  ``dry_run`` lists what would be deleted and condemned, and changes nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import zstandard

from torpor import fsutil
from torpor.errors import ConflictError, NotFoundError, RemoteStoreError, UsageError
from torpor.store import chunks as ck
from torpor.store.backend import Backend, ObjectInfo, S3Backend
from torpor.store.errors import (
    ChunkMissingError,
    ManifestAuthError,
    ManifestError,
    StoreError,
)
from torpor.store.lease import create_lease, read_leases, release_lease
from torpor.store.manifest import (
    KIND_VM_SNAPSHOT,
    Artifact,
    Manifest,
    build_manifest,
    decode_manifest,
    encode_manifest,
)
from torpor.store.store import (
    DEFAULT_GRACE_SECONDS,
    MAX_DELTA_DEPTH,
    ChunkStore,
    GcReport,
    VerifyReport,
)

log = logging.getLogger("torpor.store")

DURABILITIES = ("bucket", "local")
NET_THREADS = 16  # parallel requests: latency-bound, not CPU-bound
FORMAT_OBJECT = "FORMAT"
FORMAT_MAGIC = b"torpor-store 2\n"
OLD_FORMAT_MAGIC = b"torpor-store 1\n"
TOMBSTONE_MAGIC = b"torpor-tombstone 1\n"
PACK_MAGIC = b"torpor-pack 1\n"
PACK_NONCE = 16
PACK_HEADER_LEN = len(PACK_MAGIC) + PACK_NONCE
INDEX_MAGIC = b"torpor-index 1\n"
# A pack is sealed (and its upload started) once it holds this much: big enough that
# a turn is one PUT, small enough that a first checkpoint's upload overlaps its put.
PACK_BYTES = 16 << 20
# Cold restore: adjacent wanted frames of a pack are fetched in one ranged GET when
# the bytes between them are at most COALESCE_GAP (fetched and thrown away), and one
# GET covers at most RANGE_BYTES (so a big restore still runs in parallel).
COALESCE_GAP = 32 << 10
RANGE_BYTES = 4 << 20
MAX_INDEX_BYTES = 512 << 20  # decompressed: ~100 bytes a chunk
GC_LOCK_OBJECT = "gc/lock"
GC_LOCK_TTL = 3600.0  # a gc lock older than this is a dead gc's: taken over
CLOCK_SLACK = 1.0  # object times have a resolution of one second
SYNC_AGAIN_S = 5.0  # a chunk no index locates lists the bucket's snapshots at most this often
COMMIT_CHECK_WINDOW = 60.0  # logged when a commit's check -> manifest took longer

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_checked_formats: set[tuple[str, str]] = set()  # (bucket url, key id) checked this process
_checked_lock = threading.Lock()
_PACK_NAME_RE = re.compile(r"^packs/([0-9a-f]{2})/([0-9a-f]{64})\.pack$")


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


# -- packs and indexes --------------------------------------------------------------


class Loc(NamedTuple):
    """Where a chunk's frame is in the bucket."""

    pack: str  # the pack's hash
    offset: int
    length: int
    base: str | None  # the chunk a delta frame needs (None: plain)


def pack_object(name: str) -> str:
    return f"packs/{name[:2]}/{name}.pack"


def index_object(snap_id: str) -> str:
    return f"snapshots/{snap_id}.index"


def build_pack(items: Iterable[tuple[str, bytes]]) -> tuple[str, bytes, dict[str, Loc]]:
    """(name, bytes, locations) of a pack holding ``items`` (hash, frame)."""
    parts = [PACK_MAGIC, os.urandom(PACK_NONCE)]
    off = PACK_HEADER_LEN
    rel: dict[str, tuple[int, int, str | None]] = {}
    for h, frame in items:
        rel[h] = (off, len(frame), ck.delta_base(frame))
        parts.append(frame)
        off += len(frame)
    data = b"".join(parts)
    name = ck.hash_bytes(data)
    return name, data, {h: Loc(name, o, n, b) for h, (o, n, b) in rel.items()}


def _index_mac(key: bytes, snap_id: str, body: bytes) -> str:
    return hmac.new(
        key, b"torpor-index " + snap_id.encode() + b"\n" + body, hashlib.sha256
    ).hexdigest()


def encode_index(key: bytes, snap_id: str, locs: Mapping[str, Loc]) -> bytes:
    packs = sorted({loc.pack for loc in locs.values()})
    at = {p: i for i, p in enumerate(packs)}
    doc = {
        "snapshot": snap_id,
        "packs": packs,
        "chunks": [[h, at[v.pack], v.offset, v.length, v.base] for h, v in sorted(locs.items())],
    }
    body = zstandard.ZstdCompressor(level=3).compress(
        json.dumps(doc, separators=(",", ":")).encode()
    )
    return INDEX_MAGIC + f"hmac-sha256 {_index_mac(key, snap_id, body)}\n".encode() + body


def decode_index(key: bytes, data: bytes, *, snap_id: str, source: object) -> dict[str, Loc]:
    """The locations in an index, after its MAC (bound to ``snap_id``) verified."""
    step = "read index"
    if not data.startswith(INDEX_MAGIC):
        raise ManifestError(f"not a torpor index: {source}", step=step, path=source)
    line, sep, body = data[len(INDEX_MAGIC) :].partition(b"\n")
    if not sep or not line.startswith(b"hmac-sha256 "):
        raise ManifestError(f"index truncated: {source}", step=step, path=source)
    if not hmac.compare_digest(line[12:], _index_mac(key, snap_id, body).encode()):
        raise ManifestAuthError(
            f"the index of snapshot {snap_id[:12]} does not verify (damaged, truncated, or "
            f"not signed with this store's key): {source}",
            step=step,
            path=source,
        )
    try:
        doc = json.loads(
            zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_INDEX_BYTES)
        )
        packs = doc["packs"]
        if doc["snapshot"] != snap_id or not all(ck.is_chunk_hash(p) for p in packs):
            raise ValueError("wrong snapshot or pack name")
        out: dict[str, Loc] = {}
        for h, pi, off, n, base in doc["chunks"]:
            if not (
                ck.is_chunk_hash(h)
                and type(pi) is int
                and type(off) is int
                and type(n) is int
                and 0 <= pi < len(packs)
                and off >= PACK_HEADER_LEN
                and 0 < n <= 2 * ck.MAX_CHUNK_SIZE
                and (base is None or ck.is_chunk_hash(base))
            ):
                raise ValueError(f"bad entry for {str(h)[:64]!r}")
            out[h] = Loc(packs[pi], off, n, base)
    except (zstandard.ZstdError, ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"malformed index {source}: {e}", step=step, path=source) from e
    return out


class _Packer:
    """A writer's pack buffer: frames in, packs of about ``PACK_BYTES`` out, each
    uploaded as soon as it is sealed (the put goes on meanwhile)."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.items: list[tuple[str, bytes]] = []
        self.size = 0
        self.seen: set[str] = set()
        self.sent: list[tuple[Future[bool], dict[str, Loc]]] = []

    def add(self, h: str, frame: bytes) -> None:
        with self.lock:
            if h in self.seen:
                return
            self.seen.add(h)
            self.items.append((h, frame))
            self.size += len(frame)
            if self.size < PACK_BYTES:
                return
            items, self.items, self.size = self.items, [], 0
        self._send(items)

    def _send(self, items: list[tuple[str, bytes]]) -> None:
        name, data, locs = build_pack(items)
        remote = self.store.remote
        fut = self.store._net().submit(remote.put, pack_object(name), data, if_absent=True)
        with self.lock:
            self.sent.append((fut, locs))

    def finish(self) -> dict[str, Loc]:
        """Send what is buffered, wait for every pack; the locations of those that
        made it (a failed pack's chunks are packed again by the commit)."""
        with self.lock:
            items, self.items, self.size = self.items, [], 0
        if items:
            self._send(items)
        with self.lock:
            sent = list(self.sent)
        out: dict[str, Loc] = {}
        for fut, locs in sent:
            try:
                fut.result()
            except StoreError:
                continue
            out.update(locs)
        with self.lock:  # (what failed is dropped: the commit packs it again)
            self.sent = [(f, locs) for f, locs in self.sent if not f.exception()]
        return out


def _coalesce(want: Mapping[str, Loc]) -> list[tuple[str, int, int, list[str]]]:
    """Ranged reads (pack, start, end, chunks) covering ``want``: adjacent frames of a
    pack share one read when the gap is at most COALESCE_GAP (up to RANGE_BYTES)."""
    by_pack: dict[str, list[str]] = {}
    for h, loc in want.items():
        by_pack.setdefault(loc.pack, []).append(h)
    out: list[tuple[str, int, int, list[str]]] = []
    for pack, hs in sorted(by_pack.items()):
        hs.sort(key=lambda h: want[h].offset)
        cur: list[str] = []
        start = end = 0
        for h in hs:
            loc = want[h]
            if cur and (
                loc.offset - end > COALESCE_GAP or loc.offset + loc.length - start > RANGE_BYTES
            ):
                out.append((pack, start, end, cur))
                cur = []
            if not cur:
                start = loc.offset
            cur.append(h)
            end = max(end, loc.offset + loc.length)
        if cur:
            out.append((pack, start, end, cur))
    return out


@dataclass(frozen=True)
class CommitStats:
    """How the last :meth:`TieredStore.commit` became durable."""

    durability: str  # "bucket": in the bucket when commit returned; "local": uploaded behind
    local_ms: float  # the local commit (manifest written and fsynced)
    bucket_ms: float | None  # packs + index + check + manifest; None while it runs behind
    chunks_uploaded: int = 0
    bytes_uploaded: int = 0
    requests: int = 0
    upload_pending: bool = False
    packs_uploaded: int = 0

    def timings(self) -> dict[str, float]:
        """As numbers for a snapshot's timings (``bucket_ms`` -1: still uploading)."""
        return {
            "commit_local_ms": self.local_ms,
            "commit_bucket_ms": -1.0 if self.bucket_ms is None else self.bucket_ms,
            "upload_pending": float(self.upload_pending),
            "upload_chunks": float(self.chunks_uploaded),
            "upload_bytes": float(self.bytes_uploaded),
            "upload_requests": float(self.requests),
            "upload_packs": float(self.packs_uploaded),
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
        # the local folder is a bounded cache evicted chunk by chunk: loose files only
        # (local packs of a home that had no bucket before stay readable, never evicted)
        self.pack_min_chunks = None
        self.remote_dir = self.root / "remote"
        self.pending_dir = self.root / "pending"
        self.indexes_dir = self.root / "indexes"
        for d in (self.remote_dir, self.pending_dir, self.indexes_dir):
            d.mkdir(exist_ok=True)
        self._written: set[str] = set()  # chunks this writer wrote (trusted for upload)
        self._pending_trusted: dict[str, set[str]] = {}  # same, for commits sent behind
        self._packer: _Packer | None = None  # packs being sealed/sent by this writer
        self._locs: dict[str, Loc] = {}  # chunk -> where, from the indexes loaded
        self._indexed: set[str] = set()  # snapshots whose index is in _locs
        self._mchunks: dict[str, frozenset[str]] = {}  # (local manifests' chunks, cached)
        self._owners: dict[int, tuple[str, Artifact]] = {}  # id(artifact) -> (snapshot, it)
        self._loc_lock = threading.RLock()
        self._synced_at = -SYNC_AGAIN_S  # when _locate last listed the bucket
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
        """The bucket's FORMAT names format 2 and our key's id (created by the first
        writer)."""
        kid = key_id(self._key)
        tag = (self.remote.describe(), kid)
        with _checked_lock:
            if tag in _checked_formats:
                return
        want = FORMAT_MAGIC + b"key-id " + kid.encode() + b"\n"
        got = self.remote.get(FORMAT_OBJECT)
        if got is None and self.remote.put(FORMAT_OBJECT, want, if_absent=True):
            got = want
        elif got is None:
            got = self.remote.get(FORMAT_OBJECT) or b""
        if got.startswith(OLD_FORMAT_MAGIC):
            raise StoreError(
                f"{self.describe()} holds a format-1 torpor store (one object per chunk, "
                "written by an older torpor); this torpor reads and writes format 2 (packs) "
                "and does not convert: use another bucket or prefix",
                step="open store",
            )
        if not got.startswith(FORMAT_MAGIC):
            raise StoreError(
                f"{self.describe()} holds {got[:40]!r}, not a torpor store (format 2)",
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
    def _obj_manifest(snap_id: str) -> str:
        return f"snapshots/{snap_id}.manifest"

    def _net(self) -> ThreadPoolExecutor:
        from torpor.store.store import _shared_pool

        return _shared_pool(NET_THREADS, "torpor-store-net")

    def _is_remote(self, snap_id: str) -> bool:
        return (self.remote_dir / snap_id).exists()

    def _mark_remote(self, snap_id: str) -> None:
        fsutil.atomic_write_bytes(self.remote_dir / snap_id, b"")

    # -- indexes -----------------------------------------------------------------

    def _index_path(self, snap_id: str) -> Path:
        return self.indexes_dir / f"{snap_id}.index"

    def _load_index(
        self, snap_id: str, *, fetch: bool = True, remember: bool = True
    ) -> dict[str, Loc]:
        """``snap_id``'s chunk locations (the cached index, else the bucket's, cached
        after its MAC verified).  ManifestError / ManifestAuthError if it is missing
        from the bucket or does not verify."""
        path = self._index_path(snap_id)
        try:
            data = path.read_bytes()
            src: object = path
        except FileNotFoundError:
            if not fetch:
                return {}
            obj = index_object(snap_id)
            src = f"{self.describe()}/{obj}"
            got = self.remote.get(obj)
            if got is None:
                raise ManifestError(
                    f"snapshot {snap_id[:12]} has no index in the bucket ({src}): its "
                    "chunks cannot be located (damaged or deleted bucket)",
                    step="read index",
                    path=src,
                ) from None
            data = got
            locs = decode_index(self._key, data, snap_id=snap_id, source=src)
            fsutil.atomic_write_bytes(path, data, mode=0o600)
        else:
            locs = decode_index(self._key, data, snap_id=snap_id, source=src)
        if remember:  # (gc reads every index: it keeps only their pack names)
            with self._loc_lock:
                self._locs.update(locs)
                self._indexed.add(snap_id)
        return locs

    def _locate(self, h: str) -> Loc | None:
        """Where chunk ``h`` is in the bucket: from the indexes loaded, else the cached
        ones, else the index of a (local) manifest naming it.  None if no index says;
        an index that does not verify raises."""
        loc = self._locs.get(h)
        if loc is not None:
            return loc
        with self._loc_lock:
            if h in self._locs:
                return self._locs[h]
            for p in self.indexes_dir.glob("*.index"):
                i = p.name[: -len(".index")]
                if i not in self._indexed and ck.is_chunk_hash(i) and not self.is_removed(i):
                    with contextlib.suppress(StoreError):
                        self._load_index(i, fetch=False)
            if h in self._locs:
                return self._locs[h]
            failed: list[StoreError] = []
            if time.monotonic() - self._synced_at > SYNC_AGAIN_S:
                # a snapshot this home has not listed yet (another host's) may name it
                self._synced_at = time.monotonic()
                self._sync_listing()
            for i in self._local_ids():
                if i in self._indexed or not self._is_remote(i):
                    continue
                if i not in self._mchunks:
                    try:
                        self._mchunks[i] = super().load(self._manifest_path(i)).chunks
                    except (StoreError, NotFoundError):
                        self._mchunks[i] = frozenset()
                if h not in self._mchunks[i]:
                    continue
                try:
                    self._load_index(i)
                except StoreError as e:
                    failed.append(e)
                    continue
                if h in self._locs:
                    return self._locs[h]
            if failed:
                raise failed[0]
        return None

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
        """Download chunk ``h`` (a ranged GET of its pack), check it (through its
        base), cache it; or say why not."""
        loc = self._locate(h)
        if loc is None:
            return "missing"
        frame = self.remote.get_range(pack_object(loc.pack), loc.offset, loc.length)
        if frame is None:
            return "missing"
        if len(frame) != loc.length:
            return "corrupt"  # a truncated (or grown) pack
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
        """Fetch the chunks of ``hashes`` not in the cache, and the bases of those that
        are deltas, in coalesced ranged GETs, in parallel (cold restore).  A frame that
        fails its check is not cached (the read that follows reports it)."""
        todo = self._absent(hashes)
        want: dict[str, Loc] = {}
        for _ in range(MAX_DELTA_DEPTH + 1):
            nxt = []
            for h in todo:
                if h in want:
                    continue
                loc = self._locate(h)
                if loc is None:
                    continue  # (the read reports it missing)
                want[h] = loc
                if loc.base and loc.base not in want and not self.has_chunk(loc.base):
                    nxt.append(loc.base)
            todo = nxt
            if not todo:
                break
        if not want:
            return

        def check(h: str, frame: bytes) -> None:
            if isinstance(self._check_frame(h, frame, None, 0), bytes):
                self._cache_frame(h, frame)

        def one(r: tuple[str, int, int, list[str]]) -> list[tuple[str, bytes]]:
            pack, start, end, members = r
            data = self.remote.get_range(pack_object(pack), start, end - start)
            if data is None:
                return []
            later = []
            for h in members:
                loc = want[h]
                frame = data[loc.offset - start : loc.offset - start + loc.length]
                if len(frame) != loc.length:
                    continue
                if loc.base is None:
                    check(h, frame)  # plain: checked and cached in this thread
                else:
                    later.append((h, frame))  # a delta: once its base is cached
            return later

        deltas: list[tuple[str, bytes]] = []
        for later in self._net().map(one, _coalesce(want)):
            deltas.extend(later)

        def depth(h: str) -> int:
            d, cur = 0, want[h].base
            while cur in want and d <= MAX_DELTA_DEPTH:
                d, cur = d + 1, want[cur].base
            return d

        levels: dict[int, list[tuple[str, bytes]]] = {}
        for h, frame in deltas:
            levels.setdefault(depth(h), []).append((h, frame))
        for d in sorted(levels):
            list(self._executor().map(lambda hf: check(*hf), levels[d]))

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
        self,
        artifact: Artifact,
        dest: Path,
        *,
        name: str | None = None,
        durable: bool = True,
        extra: Mapping[str, bytes] | None = None,
    ) -> None:
        with self.pinned():
            self._index_of(artifact)
            # (a journal's chunks, ``extra``, are never in the bucket: not fetched)
            self._prefetch(sorted(artifact.stored - (extra or {}).keys()))
            super().materialize(artifact, dest, name=name, durable=durable, extra=extra)
        self.maybe_evict()

    def read_range(
        self, artifact: Artifact, offset: int, length: int, *, name: str | None = None
    ) -> bytes:
        with self.pinned():
            self._index_of(artifact)
            return super().read_range(artifact, offset, length, name=name)

    # -- manifests ------------------------------------------------------------

    def _fetch_manifest(self, snap_id: str, *, index: bool = False) -> bool:
        """Download, authenticate and cache ``snap_id``'s manifest (and, with ``index``,
        try its index too); False if the bucket has none.  ManifestError /
        ManifestAuthError if it does not verify."""
        data = self.remote.get(self._obj_manifest(snap_id))
        if data is None:
            return False
        src = f"{self.describe()}/{self._obj_manifest(snap_id)}"
        decode_manifest(self._key, data, source=src, expect_id=snap_id)
        fsutil.atomic_write_bytes(self._manifest_path(snap_id), data, mode=0o600)
        self._mark_remote(snap_id)
        if index:  # (a bad one is reported by the read that needs it)
            with contextlib.suppress(StoreError):
                self._load_index(snap_id)
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
            self._fetch_manifest(stem, index=True)
        m = super().load(path)
        with self._loc_lock:  # which snapshot an artifact passed to put_file is from
            for a in m.artifacts.values():
                self._owners[id(a)] = (m.id, a)
            while len(self._owners) > 64:
                self._owners.pop(next(iter(self._owners)))
        return m

    def _sync_tombstones(self, tombs: Iterable[str]) -> None:
        """Record the bucket's authentic tombstones locally (forged ones are ignored)."""
        for i in sorted(tombs):
            if self.is_removed(i):
                continue
            body = self.remote.get(f"snapshots/{i}.removed")
            if body is not None and hmac.compare_digest(body, tombstone_bytes(self._key, i)):
                fsutil.atomic_write_bytes(self._tombstone_path(i), b"")

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
        self._sync_tombstones(tombs)
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

    def _whole_present(self, snap_id: str) -> bool:
        """Local first; else the bucket's tombstone and manifest by name (two GETs, no
        listing of the whole bucket).  A manifest there that fails its check counts as
        present, as in a listing, so ``get`` says why and ``remove`` can drop it."""
        if self._manifest_path(snap_id).exists() or self.is_removed(snap_id):
            return super()._whole_present(snap_id)
        self._sync_tombstones([snap_id])
        if self.is_removed(snap_id):
            return False
        try:
            return self._fetch_manifest(snap_id, index=True)
        except StoreError:
            return True

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

    def _index_of(self, artifact: Artifact | None) -> None:
        """Load the index of the snapshot ``artifact`` was loaded from (:meth:`load`
        remembers), if it is in the bucket: the cached copy (one small file) or the
        bucket's.  Errors are left to the read that needs a location."""
        owner = self._owners.get(id(artifact)) if artifact is not None else None
        if (
            owner is not None
            and owner[1] is artifact
            and owner[0] not in self._indexed
            and self._is_remote(owner[0])
        ):
            with contextlib.suppress(StoreError):
                self._load_index(owner[0])

    def put_file(self, path: Path, *, parent: Artifact | None = None, **kw: Any) -> Any:
        if self.durability == "bucket":
            # the parent's chunks need not be sent again: with its index loaded,
            # those written again (evicted from the cache) are known to be there
            self._index_of(parent)
        return super().put_file(path, parent=parent, **kw)

    def _chunk_stored(self, h: str, frame: bytes | memoryview) -> None:
        self._written.add(h)
        if self.durability == "bucket" and h not in self._locs:
            # (a chunk an index locates, e.g. a parent's evicted from the cache and
            # written again, is not sent again: the commit finds it there)
            # into the pack being filled: a full pack is uploaded at once, so the
            # network overlaps the rest of the put (commit sends the remainder);
            # the frame just written, not read back from the file
            if self._packer is None:
                with self._loc_lock:
                    if self._packer is None:
                        self._packer = _Packer(self)
            self._packer.add(h, bytes(frame))

    def _drop_lease(self) -> None:
        super()._drop_lease()
        self._written = set()
        self._packer = None

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
                self._fetch_manifest(parent, index=True)
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
            missing = self._absent(a.stored)
            if missing:
                raise ChunkMissingError(
                    artifact=name, missing=missing, step="commit", path=self.root
                )
        t0 = time.perf_counter()
        packed = self._packer.finish() if self._packer is not None else {}
        n, npacks = self._upload(m, encode_manifest(self._key, body), self._written, packed)
        bucket_ms = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        out = super().commit(artifacts, parent=parent, kind=kind, meta=meta, created=m.created)
        local_ms = (time.perf_counter() - t1) * 1000
        self._mark_remote(out.id)
        self.last_commit = CommitStats(
            "bucket", local_ms, bucket_ms, chunks_uploaded=n,
            bytes_uploaded=self.remote.bytes_up - u0,
            requests=self.remote.requests - r0, packs_uploaded=npacks,
        )  # fmt: skip
        self._acct = (self.remote.requests, self.remote.bytes_up)
        self.maybe_evict()
        return out

    def last_commit_timings(self) -> dict[str, float]:
        return self.last_commit.timings() if self.last_commit is not None else {}

    def _parent_locs(self, m: Manifest) -> dict[str, Loc]:
        """Where the parent's chunks (and their bases) are, if the parent is in the
        bucket and its index reads; else nothing (every chunk is packed again)."""
        if m.parent is None or not self._is_remote(m.parent):
            return {}
        try:
            return dict(self._load_index(m.parent))
        except (StoreError, OSError):
            return {}

    def _frame_for_upload(self, h: str, trusted: set[str]) -> bytes:
        """Chunk ``h``'s frame from the cache, checked unless this writer wrote it; else
        fetched (from a pack an index names, condemned ones included)."""
        for attempt in range(2):
            got = self._frame_of(h)  # a loose cache file or a local pack
            frame = got if isinstance(got, bytes) else None
            if frame is not None and (
                h in trusted or isinstance(self._check_frame(h, frame, None, 0), bytes)
            ):
                return frame
            if attempt == 0 and not isinstance(self._fetch(h, None), bytes):
                break
        raise ChunkMissingError(
            artifact="upload", missing=[h], step="upload", path=self.root
        )  # fmt: skip

    def _close_over(
        self, m: Manifest, located: Mapping[str, Loc], lent: Mapping[str, Loc], trusted: set[str]
    ) -> tuple[dict[str, Loc], dict[str, bytes]]:
        """Every chunk ``m`` needs (its chunks, and every delta's bases) -> where it is
        (``located``: packed by this commit; ``lent``: the parent's index), and the
        frames of those that are nowhere yet (to be packed)."""
        locs: dict[str, Loc] = {}
        extra: dict[str, bytes] = {}
        todo = sorted(m.chunks)
        for _ in range(MAX_DELTA_DEPTH + 2):
            nxt: list[str] = []
            for h in todo:
                if h in locs or h in extra:
                    continue
                loc = located.get(h) or lent.get(h)
                if loc is not None:
                    locs[h] = loc
                    base = loc.base
                else:
                    extra[h] = self._frame_for_upload(h, trusted)
                    base = ck.delta_base(extra[h])
                if base is not None:
                    nxt.append(base)
            todo = nxt
            if not todo:
                break
        return locs, extra

    def _send_packs(self, frames: Mapping[str, bytes]) -> tuple[dict[str, Loc], int]:
        """Pack ``frames`` (about PACK_BYTES a pack), upload them in parallel, wait."""
        groups: list[list[tuple[str, bytes]]] = [[]]
        size = 0
        for h in sorted(frames):
            if size >= PACK_BYTES:
                groups.append([])
                size = 0
            groups[-1].append((h, frames[h]))
            size += len(frames[h])
        built = [build_pack(g) for g in groups if g]
        list(
            self._net().map(
                lambda b: self.remote.put(pack_object(b[0]), b[1], if_absent=True), built
            )
        )
        out: dict[str, Loc] = {}
        for _, _, locs in built:
            out.update(locs)
        return out, len(built)

    def _condemned(self) -> set[str]:
        return {n.rsplit("/", 1)[-1] for n in self.remote.list("condemned/")}

    def _snapshot_live(self, snap_id: str) -> bool:
        """The bucket lists ``snap_id``'s manifest and no tombstone for it."""
        names = set(self.remote.list(f"snapshots/{snap_id}."))
        return self._obj_manifest(snap_id) in names and f"snapshots/{snap_id}.removed" not in names

    def _upload(
        self, m: Manifest, manifest_bytes: bytes, trusted: set[str], packed: Mapping[str, Loc]
    ) -> tuple[int, int]:
        """Packs, index, the gc check, manifest (module doc); (chunks, packs) uploaded."""
        lent = self._parent_locs(m)
        located = dict(packed)
        chunks, packs = len(packed), len({v.pack for v in packed.values()})
        put_before = False
        for _ in range(4):
            locs, extra = self._close_over(m, located, lent, trusted)
            if extra:
                new, n = self._send_packs(extra)
                located |= new
                locs |= new
                chunks, packs = chunks + len(new), packs + n
            index = encode_index(self._key, m.id, locs)
            if not self.remote.put(index_object(m.id), index, if_absent=not put_before):
                # an earlier try of this commit (an error, a crash) left an index: if
                # its manifest made it too, that index is the truth (hosts may have
                # read it: it never changes once a manifest names it); if not, no
                # host reads it, and ours replaces it
                if self.remote.exists(self._obj_manifest(m.id)):
                    self._index_path(m.id).unlink(missing_ok=True)
                    self._load_index(m.id)
                    return chunks, packs
                self.remote.put(index_object(m.id), index)
            put_before = True
            t_check = time.monotonic()
            condemned = self._condemned()
            ours = {v.pack for v in located.values()}
            borrowed = {v.pack for v in locs.values()} - ours
            live = not borrowed or m.parent is None or self._snapshot_live(m.parent)
            bad = {v.pack for v in locs.values()} & condemned
            if live and not bad:
                break
            log.info(
                "commit %s: %s; packing those chunks again", m.id[:12],
                "its parent was removed" if not live else f"{len(bad)} pack(s) condemned by gc",
            )  # fmt: skip
            lent = {} if not live else {h: v for h, v in lent.items() if v.pack not in bad}
            located = {h: v for h, v in located.items() if v.pack not in bad}
        else:
            raise RemoteStoreError(
                f"{self.describe()}: the packs of snapshot {m.id[:12]} kept being condemned "
                "by gc while it was committed (is gc running with a grace period of ~0?)",
                step="upload",
            )
        self.remote.put(self._obj_manifest(m.id), manifest_bytes, if_absent=True)
        if time.monotonic() - t_check > COMMIT_CHECK_WINDOW:
            log.warning(
                "commit %s: %.0f s between the gc check and the manifest; a gc grace period "
                "must be longer than that", m.id[:12], time.monotonic() - t_check,
            )  # fmt: skip
        fsutil.atomic_write_bytes(self._index_path(m.id), index, mode=0o600)
        with self._loc_lock:
            self._locs.update(locs)
            self._indexed.add(m.id)
        return chunks, packs

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
                if self.remote.exists(self._obj_manifest(snap_id)):
                    # a crash after the manifest's PUT: it is there, with its index
                    self._index_path(snap_id).unlink(missing_ok=True)
                    self._load_index(snap_id)
                else:
                    self._upload(m, data, self._pending_trusted.pop(snap_id, set()), {})
            self._mark_remote(snap_id)
            p.unlink(missing_ok=True)
            done.append(snap_id)
        return done

    def verify(self) -> VerifyReport:
        """:meth:`ChunkStore.verify` of the cache; a chunk absent from the cache (evicted,
        never fetched) counts as missing only if no index locates it in a pack the
        bucket holds."""
        r = super().verify()
        if not r.missing:
            return r
        packs = set()
        for n in self.remote.list("packs/"):
            mt = _PACK_NAME_RE.match(n)
            if mt:
                packs.add(mt.group(2))

        def there(h: str) -> bool:
            try:
                loc = self._locate(h)
            except StoreError:
                return False
            return loc is not None and loc.pack in packs

        gone = {h for h in r.missing if not there(h)}
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
            bad_packs=r.bad_packs,
            packs_checked=r.packs_checked,
        )

    # -- gc across hosts (module doc: the rule) ------------------------------------

    def gc(
        self, grace_seconds: float = DEFAULT_GRACE_SECONDS, *, dry_run: bool = False
    ) -> GcReport:
        """The cache's gc (:meth:`ChunkStore.gc`), then the bucket's: condemn
        unreferenced packs older than ``grace_seconds``, delete those condemned more
        than ``grace_seconds`` ago and still unreferenced, and the indexes and
        manifests of removed snapshots.  ``dry_run`` changes nothing and reports
        what would go.  ConflictError if another host's gc holds the bucket's lock.
        """
        if grace_seconds < 0:
            raise UsageError("grace_seconds must be >= 0")
        local = super().gc(grace_seconds, dry_run=dry_run)
        if dry_run:
            return self._gc_bucket(local, grace_seconds, dry_run=True)
        self._take_gc_lock()
        try:
            return self._gc_bucket(local, grace_seconds, dry_run=False)
        finally:
            with contextlib.suppress(RemoteStoreError):
                self.remote.delete(GC_LOCK_OBJECT)

    def _take_gc_lock(self) -> None:
        body = f"{socket.gethostname()} pid {os.getpid()}\n".encode()
        for _ in range(2):
            if self.remote.put(GC_LOCK_OBJECT, body, if_absent=True):
                return
            infos, now = self.remote.list_info("gc/")
            held = [o for o in infos if o.name == GC_LOCK_OBJECT]
            if held and now - held[0].mtime < GC_LOCK_TTL:
                who = (self.remote.get(GC_LOCK_OBJECT) or b"?").decode(errors="replace")
                who = "".join(c for c in who if c.isprintable())[:80]
                raise ConflictError(
                    f"another gc is running on {self.describe()} ({GC_LOCK_OBJECT}: {who}, "
                    f"taken {now - held[0].mtime:.0f} s ago): try again later (a dead "
                    f"gc's lock is taken over {GC_LOCK_TTL:.0f} s after it was taken)",
                    step="gc",
                )
            with contextlib.suppress(RemoteStoreError):
                self.remote.delete(GC_LOCK_OBJECT)  # expired: its gc died
        raise ConflictError(f"cannot take {GC_LOCK_OBJECT} on {self.describe()}", step="gc")

    def _gc_bucket(self, local: GcReport, grace: float, *, dry_run: bool) -> GcReport:
        t_start = time.monotonic()
        # markers first, then packs, then the snapshots (the mark): a manifest listed
        # after a marker was is seen by this run (module doc)
        marks, now1 = self.remote.list_info("condemned/")
        packs, now2 = self.remote.list_info("packs/")
        snaps, now3 = self.remote.list_info("snapshots/")
        now = min(now1, now2, now3)

        def age(o: ObjectInfo) -> float:
            return now - o.mtime - CLOCK_SLACK

        manifests: dict[str, ObjectInfo] = {}
        indexes: dict[str, ObjectInfo] = {}
        tombs: set[str] = set()
        for o in snaps:
            stem, _, ext = o.name[len("snapshots/") :].partition(".")
            if not ck.is_chunk_hash(stem):
                continue
            if ext == "manifest":
                manifests[stem] = o
            elif ext == "index":
                indexes[stem] = o
            elif ext == "removed":
                tombs.add(stem)
        self._sync_tombstones(tombs)
        removed = {i for i in tombs if self.is_removed(i)}
        live = sorted(set(manifests) - removed)
        referenced: set[str] = set()
        unreadable: list[str] = []

        def mark(i: str) -> tuple[str, set[str] | None]:
            try:
                return i, {v.pack for v in self._load_index(i, remember=False).values()}
            except StoreError:
                return i, None

        for i, got in self._net().map(mark, live):
            if got is None:
                unreadable.append(f"{i}.index")
            else:
                referenced |= got
        blind = bool(unreadable)  # what an unreadable index names is unknowable

        marked = {o.name[len("condemned/") :]: o for o in marks}
        pack_info: dict[str, ObjectInfo] = {}
        for o in packs:
            mt = _PACK_NAME_RE.match(o.name)
            if mt and mt.group(1) == mt.group(2)[:2]:
                pack_info[mt.group(2)] = o
        delete: list[str] = []
        condemn: list[str] = []
        unmark: list[str] = []
        kept = young = 0
        freed = 0
        for name, o in sorted(pack_info.items()):
            mk = marked.get(name)
            if name in referenced:
                kept += 1
                if mk is not None:
                    unmark.append(f"condemned/{name}")
            elif age(o) < grace:
                young += 1
            elif blind:
                kept += 1
            elif mk is None:
                condemn.append(name)
                kept += 1
            elif age(mk) >= grace:
                delete.append(pack_object(name))
                freed += o.size
            else:
                kept += 1  # condemned, not long enough
        stale_marks = [
            f"condemned/{n}" for n, mk in sorted(marked.items())
            if n not in pack_info and age(mk) >= grace
        ]  # fmt: skip
        dead_meta = [self._obj_manifest(i) for i in sorted(removed) if i in manifests]
        dead_meta += [index_object(i) for i in sorted(removed) if i in indexes]
        dead_meta += [
            index_object(i) for i, o in sorted(indexes.items())
            if i not in manifests and i not in removed and age(o) >= grace
        ]  # fmt: skip
        gone = [*delete, *dead_meta, *stale_marks]
        if time.monotonic() - t_start > GC_LOCK_TTL / 2:
            raise RemoteStoreError(
                f"gc of {self.describe()} took too long to act safely on its listing; "
                "nothing was deleted",
                step="gc",
            )
        if not dry_run:
            for name in condemn:
                self.remote.put(f"condemned/{name}", b"", if_absent=True)

            def drop(obj: str) -> None:
                self.remote.delete(obj)
                mt = _PACK_NAME_RE.match(obj)
                if mt:  # the pack first, then its marker: never a pack without one
                    self.remote.delete(f"condemned/{mt.group(2)}")

            list(self._net().map(drop, gone))
            for obj in unmark:
                self.remote.delete(obj)
            for i in removed:
                with contextlib.suppress(FileNotFoundError):
                    self._index_path(i).unlink()
        return dataclasses.replace(
            local,
            manifests_unreadable=(*local.manifests_unreadable, *unreadable),
            bucket_deleted=tuple(gone),
            bucket_condemned=tuple(pack_object(n) for n in condemn),
            bucket_bytes_freed=freed,
            packs_kept=kept,
            packs_kept_young=young,
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
