"""The local content-addressed chunk store: put, commit, read back, verify, gc.

Role: :class:`ChunkStore` stores files as deduplicated, individually compressed
chunks and records snapshots as authenticated manifests naming those chunks.

Invariants:

- A chunk is stored as one frame whose decompressed bytes hash (BLAKE3) to its
  name: plain, or a delta against a base chunk (see ``chunks``); either *loose*, a
  file ``chunks/<aa>/<hash>``, or in a *pack* ``packs/<name>.pack`` (many frames and
  an index, see :mod:`torpor.store.packs`).  A put whose batch has at least
  ``pack_min_chunks`` new frames (a first snapshot) packs them and the rest of that
  put's new frames; smaller puts (a turn's changed chunks) write loose files.
  Every read re-checks the hash, the base's included, wherever the frame came from;
  a chunk that fails is reported as corrupt, never returned; a pack's index is
  bound-checked before use and a pack that fails is refused whole (its chunks read
  as corrupt, ``verify`` names it, ``gc`` keeps it).  A delta's base is never deleted while the
  delta is kept (gc keeps bases of what it keeps; a writer claims a base before it
  writes a delta against it).
- A manifest is listed (``snapshots/<id>.manifest`` exists) only after every chunk
  it names is durable.  Nothing inside the store is an absolute path, so the folder
  can be copied anywhere (its ``key`` goes with it).

Crash safety (the ordering)::

    1. lease      leases/<host>.<pid>.<rnd>.lease         (gc protection, see below)
    2. chunks     loose: tmp/<rnd>.tmp, fdatasync  --rename-->  chunks/<aa>/<hash>
                  packed: tmp/<name>.pack.tmp (frames, index, trailer), fdatasync
                          --rename-->  packs/<name>.pack, fsync packs/
    3. dirs       fsync every chunks/<aa>/ directory holding a loose chunk the
                  manifest names that is not already vouched for by the parent
                  manifest (its directory entry is then on disk too), and packs/ if
                  a chunk is in a pack another writer named
    4. manifest   snapshots/.<id>.manifest.<rnd>.tmp, fsync, rename, fsync dir
    5. release    unlink the lease

A crash before 4's rename leaves no manifest listed (temp files start with "." and
are ignored), only orphan chunks, orphan packs and temp files (a pack being written
is a ``.tmp`` in tmp/, never under packs/), which ``gc`` removes.  A crash after it
leaves a complete snapshot whose chunks were made durable in 2 and 3.  Chunks and
packs of earlier snapshots are never rewritten in place, so they stay intact.
``packs/index`` (the combined index of the packs, :mod:`torpor.store.packs`) is
outside this ordering: a cache, rewritten without an fsync, checked before use; a
torn, stale or missing one costs lookups time, never a chunk.

Step 2 is pipelined inside ``put_file``: chunks are read in batches, hashed on the
store's threads, compressed (zstd's own C threads for a batch's plain chunks), and
each loose frame is written, fdatasync'ed and renamed on the sync threads while the
next batch is read; packed frames gather until ``LOCAL_PACK_BYTES`` and the pack is
written, synced and named on a sync thread likewise (so a first snapshot costs a
handful of fdatasyncs, not one per chunk).  ``put_file`` returns only after every
sync has finished (the last pack is sealed first), and a chunk whose write failed
is dropped from the writer's own set (so a retry rewrites it), so the ordering
above holds per chunk and for the commit.

Why not one ``syncfs(2)`` (the first version did): it flushes *every* dirty page of
the filesystem — other VMs' disk overlays, snapshot caches, anything else on the
host — and cost 50-120 ms per snapshot here; fsyncing only the new chunk files and
their directories costs what was written.  Chunk data is synced before its rename,
so a chunk under its real name is never torn by a power loss; an existing chunk is
still re-hashed before reuse unless a committed parent names it, this writer
wrote it, or it is in a pack (a store written by an older torpor may hold torn loose
chunks; a pack is named only after its frames and MAC'd index were synced, and no
torpor without packs wrote one — reading back a first snapshot's worth of another
VM's chunks cost ~150 ms of CPU per first snapshot; damage on disk after that is
found, as for a parent's chunks, when the chunk is read: every read re-checks).  A
put that writes a pack writes such loose chunks into it instead of reading them back
(the same CPU once; later puts trust the packed copy; the loose copy stays until gc).

Why gc is safe while writers run (local filesystem, one kernel clock):

- gc holds ``gc.lock`` exclusively for its whole run.  Writers take it shared, and
  only briefly: to create their lease, to *claim* existing chunks (touch the file's
  mtime — for a packed chunk, the pack's — which also proves it still exists), and
  to check-and-write a manifest.
- gc keeps every chunk that a manifest names and every chunk whose mtime is not
  older than ``min(now - grace, oldest live lease's mtime)``.  For packs the unit
  is the pack: it is kept whole while any kept manifest names one of its chunks (or
  a kept delta needs a base in it), or its mtime is that young, and deleted whole
  otherwise.  **No repacking**: the dead chunks of a partly live pack stay on disk
  until its last named chunk is released (cost: a first snapshot's pack outlives
  the snapshot as long as any descendant still names one of its chunks — space,
  never correctness; rewriting live chunks into a new pack would need its own
  crash ordering and a claim protocol for the copies).
- A writer's lease is either created before gc starts (gc sees it) or after gc
  ends (the writer sees gc's deletions).  In the first case every chunk the writer
  relies on has an mtime >= its lease: chunks it wrote are newer than the lease, and
  chunks it claimed were touched under the shared lock, i.e. wholly before gc
  (so gc sees the new mtime) or wholly after (so the claim sees the deletion and the
  writer rewrites the chunk, or fails if it has no data for it).
- Finally ``commit`` checks, under the shared lock, that every chunk exists and
  writes the manifest before letting go: gc runs wholly before (the check catches
  any deletion) or wholly after (gc sees the manifest).  So no committed manifest
  can name a chunk gc deleted.

Clock steps backwards can shrink the lease window; ``grace_seconds`` is the backstop.

Removal is final: :meth:`ChunkStore.remove` first writes a tombstone
``snapshots/<id>.removed`` (fsynced), then unlinks the manifest.  Every lookup,
listing, ``verify`` and ``gc`` treats an id with a tombstone as gone, and ``gc``
deletes a manifest file found next to its tombstone; so a removed manifest copied
back into the folder (its MAC still verifies: the MAC binds content, not presence)
does not resurrect the snapshot or keep its chunks alive.  Tombstones are empty
files and are kept.  A damaged manifest never stops listing or removal:
:meth:`ChunkStore.scan` returns the good ones and names the bad ones, and
:meth:`ChunkStore.remove` removes a damaged one by id or id prefix.

Snapshot references (:meth:`ChunkStore.get`): a whole id, an id prefix, or a tag
(``meta["tag"]``, matched exactly; a reference shaped like a whole id is only an id,
answered by one path check, never a listing); a reference matching more than one snapshot is a
ConflictError listing the candidates.  I/O failures (a read-only or full disk) are
StoreErrors naming the path, never bare OSErrors.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from torpor import failpoints, fsutil
from torpor.errors import ConflictError, NotFoundError, UsageError
from torpor.store import chunks as ck
from torpor.store import packs as pk
from torpor.store.errors import ChunkMissingError, ManifestError, StoreError, chunk_error
from torpor.store.errors import io_error as _io_error
from torpor.store.lease import create_lease, read_leases, release_lease
from torpor.store.manifest import (
    KIND_VM_SNAPSHOT,
    Artifact,
    Manifest,
    build_manifest,
    decode_manifest,
    decode_meta,
    decode_parent,
    encode_manifest,
    salvage_hashes,
)

STORE_FORMAT = b"torpor-store 1\n"
# a store that holds (or may hold) local packs: an older torpor, which would take its
# packed chunks for missing ones, refuses it at open instead.  Written when a store
# is created and before the first pack of an older store is named.
STORE_FORMAT_PACKS = b"torpor-store 1+packs\n"
READABLE_FORMATS = (STORE_FORMAT, STORE_FORMAT_PACKS)
KEY_BYTES = 32
DEFAULT_GRACE_SECONDS = 15 * 60.0
SYNC_THREADS = 16
# at most this many chunks one sync task writes in turn: fewer tasks, thread wake-ups
# and context switches (a first snapshot writes ~1,700 chunks) while 16 syncs stay in flight
SYNC_GROUP = 8
# A new version of a chunk is stored as a delta against the previous version's plain
# anchor only when the delta is at most 1/DELTA_RATIO of the plain frame; otherwise
# it is stored plain and becomes the anchor for the versions after it.
DELTA_RATIO = 2
# Deltas are written one link deep; two writers racing on the same new chunk can make
# a base a delta itself, so reads follow up to this many links instead of failing.
MAX_DELTA_DEPTH = 4
# A put batch with at least this many new frames (a first snapshot: ~250 a batch)
# writes them, and the rest of that put's new frames, into local packs; smaller puts
# (a turn's few changed chunks, mostly deltas) stay loose files: no pack per turn,
# whose index every process would load, and no partly dead packs from short chains.
# TORPOR_STORE_PACKS=0 turns packs off (loose files only; packs stay readable).
PACK_MIN_CHUNKS = 64
# A pack is sealed (written, fdatasync'ed, named) in the background once its frames
# reach this size, so a big put's syncs overlap its reading and compression.
LOCAL_PACK_BYTES = 16 << 20
PACK_WRITE_GROUP = 64  # frames one sync-thread task writes into a pack


Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PutStats:
    """What one :meth:`ChunkStore.put_file` did. Times are summed over threads."""

    bytes_total: int = 0
    bytes_read: int = 0
    chunks_total: int = 0
    chunks_zero: int = 0
    chunks_reused: int = 0  # same as the parent's, skipped as clean, or already stored
    chunks_skipped: int = 0  # of chunks_reused: taken from the parent unread (dirty path)
    chunks_new: int = 0
    chunks_verified: int = 0  # of chunks_reused: another writer's, read back and re-hashed
    bytes_stored: int = 0  # compressed bytes written for new chunks
    seconds_reading: float = 0.0
    seconds_hashing: float = 0.0
    seconds_compressing: float = 0.0
    seconds_syncing: float = 0.0  # waiting for the last chunk syncs once all was read (wall)
    seconds_total: float = 0.0


@dataclass(frozen=True)
class VerifyReport:
    chunks_checked: int
    bytes_checked: int
    manifests_checked: int
    corrupt: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    stray: tuple[str, ...] = ()  # files under chunks/ that are not named like a chunk
    bad_manifests: tuple[tuple[str, str], ...] = ()  # (file name, reason)
    affected: dict[str, tuple[str, ...]] = field(default_factory=dict)  # snap id -> chunks
    bad_packs: tuple[tuple[str, str], ...] = ()  # (pack file, reason): index refused
    packs_checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.missing or self.bad_manifests or self.bad_packs)


@dataclass(frozen=True)
class GcReport:
    chunks_deleted: int
    bytes_freed: int
    chunks_kept: int
    chunks_kept_young: int  # unreferenced, but protected by a live lease or the grace period
    temp_files_deleted: int
    leases_live: int
    leases_stale_removed: int
    manifests_unreadable: tuple[str, ...] = ()
    dry_run: bool = False  # nothing was deleted: the counts and lists say what would go
    chunks_doomed: tuple[str, ...] = ()  # local chunks deleted (dry run: that would be)
    local_packs_deleted: int = 0  # of chunks_deleted: in whole local packs (packs/)
    local_packs_kept: int = 0
    # a bucket store (TieredStore) also collects the bucket: objects deleted (packs,
    # indexes and manifests of removed snapshots, condemned markers) and packs newly
    # condemned (deleted by a later gc if still unreferenced after the grace period)
    bucket_deleted: tuple[str, ...] = ()
    bucket_condemned: tuple[str, ...] = ()
    bucket_bytes_freed: int = 0
    packs_kept: int = 0
    packs_kept_young: int = 0


_pools: dict[tuple[int, str], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def load_key(root: Path) -> bytes:
    """The store's secret (``root/key``, 32 random bytes, 0600), created on first use.

    Also the context log's MAC key (:mod:`torpor.context.chain`): one secret per home.
    """
    path = root / "key"
    root.mkdir(parents=True, exist_ok=True)
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        # Create-if-absent atomically: write a temp, then link() it into place;
        # a concurrent creator's link fails with EEXIST and both read the winner.
        fd, tmp = tempfile.mkstemp(prefix=".key.", dir=root)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
            os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
        fsutil.fsync_dir(root)
        key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise StoreError(f"store key must be {KEY_BYTES} bytes", step="open store", path=path)
    return key


def _shared_pool(n: int, name: str) -> ThreadPoolExecutor:
    """Process-wide thread pools: a snapshot per agent turn opens a store each time,
    and starting fresh threads for every one cost ~10 ms per snapshot."""
    with _pools_lock:
        pool = _pools.get((n, name))
        if pool is None:
            pool = _pools[(n, name)] = ThreadPoolExecutor(n, thread_name_prefix=name)
        return pool


def _fsync_existing_dir(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fsutil.fsync_dir(path)


class ChunkStore:
    """A store folder. Pass ``Paths.root / "store"``; created on first use.

    One instance can write one snapshot at a time (a sequence of :meth:`put_file`
    calls, then :meth:`commit`); readers may share it.  Use it as a context manager
    or call :meth:`close` to drop an uncommitted writer's lease.
    """

    def __init__(
        self, root: Path, *, level: int = ck.DEFAULT_LEVEL, threads: int | None = None
    ) -> None:
        self.root = Path(root)
        self.level = level
        self.threads = max(1, threads or min(8, os.cpu_count() or 1))
        self.chunks_dir = self.root / "chunks"
        self._chunks_prefix = f"{self.chunks_dir}/"
        self.snapshots_dir = self.root / "snapshots"
        self.leases_dir = self.root / "leases"
        self.tmp_dir = self.root / "tmp"
        self.packs_dir = self.root / "packs"
        self._tmp_prefix = f"{self.tmp_dir}/"
        self._lock_path = self.root / "gc.lock"
        self._open()
        self._key = self._load_key()
        self._lease: Path | None = None
        self._lease_finalizer: weakref.finalize | None = None
        self._mine: set[str] = set()  # chunks written or claimed under the current lease
        self._synced_dirs: set[str] = set()  # chunks/<aa> fsynced since our last write there
        self._pool: ThreadPoolExecutor | None = None
        self._io_pool: ThreadPoolExecutor | None = None
        # a put with many new chunks packs them (None: loose files only, see PACK_MIN_CHUNKS)
        self.pack_min_chunks: int | None = (
            None if os.environ.get("TORPOR_STORE_PACKS", "1") == "0" else PACK_MIN_CHUNKS
        )
        self._packing = False  # the current put writes its new frames into packs
        self._claim_refreshed = False  # the current put's claims listed packs/ already
        self._pack: pk.PackWriter | None = None  # the pack being filled
        self._pack_writes: list[Future[int]] = []  # its frame writes in flight
        self._sealed: set[str] = set()  # packs this instance named (durable, dir fsynced)

    # -- setup -------------------------------------------------------------

    def _open(self) -> None:
        for d in (
            self.root,
            self.chunks_dir,
            self.snapshots_dir,
            self.leases_dir,
            self.tmp_dir,
            self.packs_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)
        fmt = self.root / "FORMAT"
        try:
            got = fmt.read_bytes()
        except FileNotFoundError:
            fsutil.atomic_write_bytes(fmt, STORE_FORMAT_PACKS)
            self._format = STORE_FORMAT_PACKS
            return
        if got not in READABLE_FORMATS:
            raise StoreError(
                f"unsupported store format {got[:40]!r} (this torpor reads "
                f"{' and '.join(repr(f.decode().strip()) for f in READABLE_FORMATS)})",
                step="open store",
                path=fmt,
            )
        self._format = got

    def _load_key(self) -> bytes:
        return load_key(self.root)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = _shared_pool(self.threads, "torpor-store")
        return self._pool

    def _sync_executor(self) -> ThreadPoolExecutor:
        """Threads that only fdatasync/fsync and rename: they wait on the disk, and
        the filesystem journal folds concurrent syncs into one commit, so many more
        of them than cores pay off.  Compression runs on :meth:`_executor` (CPU: as
        many threads as cores); before the split, 4 threads each compressing and then
        syncing left the cores idle while they waited on the disk."""
        if self._io_pool is None:
            self._io_pool = _shared_pool(max(self.threads, SYNC_THREADS), "torpor-store-sync")
        return self._io_pool

    def close(self) -> None:
        """Release an uncommitted writer's lease (its chunks become gc-able) and threads."""
        self._drop_lease()
        self._pool = self._io_pool = None  # shared, process-wide: not shut down here

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths and locks -----------------------------------------------------

    def chunk_path(self, h: str) -> Path:
        return self.chunks_dir / h[:2] / h

    def _cpath(self, h: str) -> str:
        """:meth:`chunk_path` as a str: a checkpoint touches thousands of chunk paths,
        and pathlib's joins cost more than the syscalls they feed."""
        return f"{self._chunks_prefix}{h[:2]}/{h}"

    def _manifest_path(self, snap_id: str) -> Path:
        return self.snapshots_dir / f"{snap_id}.manifest"

    def manifest_bytes(self, snap_id: str) -> int:
        """Size on disk of a committed snapshot's manifest (part of what it stores)."""
        try:
            return self._manifest_path(snap_id).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"snapshot {snap_id} is not in the store", step="stat") from None

    def _gc_lock(self, shared: bool) -> contextlib.AbstractContextManager[None]:
        return fsutil.locked(self._lock_path, shared=shared)

    def _ensure_lease(self) -> None:
        if self._lease is not None:
            return
        with self._gc_lock(shared=True):
            self._lease = create_lease(self.leases_dir)
        self._lease_finalizer = weakref.finalize(self, release_lease, self._lease)

    def _drop_lease(self) -> None:
        if self._lease_finalizer is not None:
            self._lease_finalizer()  # unlinks the lease file once
        self._lease = None
        self._lease_finalizer = None
        self._mine = set()

    # -- chunk I/O -----------------------------------------------------------

    def _anchor(self, prev: str) -> tuple[str, bytes, int] | None:
        """The plain chunk a new version of chunk ``prev`` can be a delta against:
        ``prev`` itself, or the base ``prev`` is a delta of; as (hash, bytes, size of
        its frame).  It is claimed (see module doc): the new chunk will rely on it.
        None if it cannot be had."""
        base = self._base_of(prev) or prev
        frame_len = self.frame_size(base)
        if frame_len is None:
            return None
        if self._claim([base]):
            return None  # gone (gc): write the new version whole
        got = self._read_chunk(base, None)
        return (base, got, frame_len) if isinstance(got, bytes) else None

    def _frame(self, data: memoryview | bytes, prev: str | None) -> tuple[bytes, float]:
        """The frame to store for a new chunk, and the seconds spent compressing.

        ``prev`` is the chunk at the same place in the parent: if a delta against its
        anchor is at most half the anchor's plain frame (the new version's own plain
        size, unknown without a second compression, is about the same), the delta is
        stored."""
        anchor = self._anchor(prev) if prev is not None else None
        t0 = time.perf_counter()
        frame = b""
        if anchor is not None:
            delta = ck.compress_delta(data, anchor[0], anchor[1], self.level)
            if len(delta) * DELTA_RATIO <= anchor[2]:
                frame = delta
        if not frame:
            frame = ck.compress_chunk(data, self.level)
        return frame, time.perf_counter() - t0

    def _store_frame(self, h: str, frame: bytes | memoryview) -> int:
        """Write chunk ``h``'s frame durably under its name; returns its size.

        Data first (temp file, fdatasync, rename): a chunk under its real name is
        never torn.  On failure the temp file is removed and nothing is named."""
        # (not tempfile.mkstemp: its name generation cost 2.5x the open, per chunk)
        tmp = f"{self._tmp_prefix}{h[:16]}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                failpoints.hit("store.chunk_write")
                view = memoryview(frame)
                while view:
                    view = view[os.write(fd, view) :]
                os.fdatasync(fd)
            finally:
                os.close(fd)
            dest = self._cpath(h)
            try:
                os.replace(tmp, dest)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                self._synced_dirs.discard("")  # chunks/ itself gained an entry
                os.replace(tmp, dest)
            self._synced_dirs.discard(h[:2])
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._chunk_stored(h, frame)
        return len(frame)

    def _chunk_stored(self, h: str, frame: bytes | memoryview) -> None:
        """Hook: chunk ``h`` was just written (durable, under its name) as ``frame``.
        Loose chunks only (TieredStore, the one user, writes no packs)."""

    def _write_chunk(
        self, h: str, data: memoryview | bytes, prev: str | None = None
    ) -> tuple[int, float]:
        """Compress and store chunk ``h`` durably; returns (compressed size, seconds
        compressing).  See :meth:`_frame` for ``prev``."""
        frame, dt = self._frame(data, prev)
        return self._store_frame(h, frame), dt

    @property
    def _packs(self) -> pk.PackMap:
        return pk.pack_map(self.packs_dir, self._key)

    def _frame_of(self, h: str) -> bytes | str:
        """Chunk ``h``'s stored frame (unchecked), from a pack or its loose file; or
        ``"missing"``, or ``"corrupt"`` (a pack holding it is short, or a pack that
        may hold it is refused: its index cannot be trusted to say)."""
        pm = self._packs
        for attempt in range(2):
            seen = pm.generation
            hit = pm.get(h)
            if hit is not None:
                got = pk.read_frame(pm.path(hit[0]), hit[1])
                if got is not None:
                    return got
            try:
                with open(self._cpath(h), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                pass
            # a pack named or deleted meanwhile (found by this listing or another
            # thread's: materialize reads on many)?
            if attempt == 0 and not pm.refresh(since=seen):
                break
        return "corrupt" if pm.bad else "missing"

    def frame_size(self, h: str) -> int | None:
        """Bytes chunk ``h`` takes in the store (its frame), None if it is not stored."""
        hit = self._packs.get(h)
        if hit is not None and os.path.exists(self._packs.path(hit[0])):
            return hit[1].length
        try:
            return os.stat(self._cpath(h)).st_size
        except OSError:
            return None

    def has_chunk(self, h: str) -> bool:
        """Whether chunk ``h`` is stored (loose or in a pack; not checked)."""
        return not self._absent([h])

    def _absent(self, hashes: Iterable[str]) -> list[str]:
        """The chunks of ``hashes`` stored neither loose nor in a pack."""
        pm = self._packs
        seen = pm.generation
        there: dict[str, bool] = {}

        def stored(h: str) -> bool:
            hit = pm.get(h)
            if hit is not None:
                name = hit[0]
                if name not in there:
                    there[name] = os.path.exists(pm.path(name))
                if there[name]:
                    return True
            return os.path.exists(self._cpath(h))

        out = [h for h in hashes if not stored(h)]
        if out and pm.refresh(since=seen):
            there.clear()
            out = [h for h in out if not stored(h)]
        return out

    def _read_chunk(self, h: str, length: int | None, *, depth: int = 0) -> bytes | str:
        """The verified bytes of chunk ``h``, or ``"missing"`` / ``"corrupt"``.

        A delta is read through its base (checked too): if the base is missing or
        damaged, so is the delta's data."""
        indexed = self._packs.indexed(h)  # found through the combined index (may lie)
        frame = self._frame_of(h)
        if isinstance(frame, str):
            return frame
        got = self._check_frame(h, frame, length, depth)
        if got == "corrupt" and indexed:  # read it again through the pack's own index
            self._packs.uncover()
            return self._read_chunk(h, length, depth=depth)
        if got == "corrupt" and self._packs.get(h) is not None:
            try:  # the packed copy is bad: a loose copy of it may be whole
                with open(self._cpath(h), "rb") as f:
                    frame = f.read()
            except FileNotFoundError:
                return got
            return self._check_frame(h, frame, length, depth)
        return got

    def _check_frame(self, h: str, frame: bytes, length: int | None, depth: int) -> bytes | str:
        """Decompress ``frame`` (through its base if it is a delta) and check it is chunk
        ``h``: its bytes, or ``"missing"`` / ``"corrupt"`` (the base's state counts)."""
        try:
            base_hash = ck.delta_base(frame)
            base = None
            if base_hash is not None:
                if depth >= MAX_DELTA_DEPTH or base_hash == h:
                    return "corrupt"
                got = self._read_chunk(base_hash, None, depth=depth + 1)
                if not isinstance(got, bytes):
                    return got
                base = got
            data = ck.decompress_chunk(frame, length, base)
        except StoreError:
            return "corrupt"
        if ck.hash_bytes(data) != h:
            return "corrupt"
        return data

    def _base_of(self, h: str) -> str | None:
        """The base chunk ``h`` is a delta of (None: plain, unreadable or gone), as the
        copy a read uses (the packed one first) is framed."""
        hit = self._packs.get(h)
        if hit is not None:
            return hit[1].base
        return self._loose_base_of(h)

    def _loose_base_of(self, h: str) -> str | None:
        """The base the loose file of ``h`` is a delta of (None: plain, unreadable, gone)."""
        try:
            with open(self._cpath(h), "rb") as f:
                return ck.delta_base(f.read(ck.DELTA_HEADER_LEN))
        except (OSError, StoreError):
            return None

    def _bases_of(self, h: str) -> set[str]:
        """The bases every stored copy of ``h`` needs: a chunk can be on disk twice,
        framed differently (a loose delta, and a plain frame a packing put wrote)."""
        hit = self._packs.get(h)
        return {b for b in (hit[1].base if hit else None, self._loose_base_of(h)) if b}

    def _claim(self, hashes: Iterable[str], packed: set[str] | None = None) -> set[str]:
        """Touch existing chunks under the shared gc lock; return the ones that are absent.

        A claimed chunk's mtime is newer than our lease, so gc keeps it (see module doc).
        The chunks found in a sealed pack are added to ``packed`` if given.
        """
        absent: set[str] = set()
        pm = self._packs
        seen = pm.generation
        touched: dict[str, bool] = {}  # pack -> still there (each touched once)

        def touch(h: str) -> bool:
            hit = pm.get(h)
            if hit is not None:
                name = hit[0]
                if name not in touched:
                    try:
                        os.utime(pm.path(name))  # a pack's mtime protects all it holds
                        touched[name] = True
                    except FileNotFoundError:
                        touched[name] = False
                if touched[name]:
                    if packed is not None:
                        packed.add(h)
                    return True
            try:
                os.utime(self._cpath(h))
                return True
            except FileNotFoundError:
                return False

        with self._gc_lock(shared=True):
            for h in hashes:
                if touch(h):
                    continue
                # a pack another writer named since we last looked: listed once per put
                # (a pack named later only costs a copy of a chunk, never correctness)
                if not self._claim_refreshed:
                    self._claim_refreshed = True
                    if pm.refresh(since=seen):
                        touched.clear()
                        if touch(h):
                            continue
                absent.add(h)
        return absent

    # -- put -----------------------------------------------------------------

    def put_file(
        self,
        path: Path,
        *,
        chunk_size: int = ck.DEFAULT_CHUNK_SIZE,
        parent: Artifact | None = None,
        dirty: Iterable[int] | None = None,
        progress: Progress | None = None,
        filling: ck.Filling | None = None,
    ) -> tuple[Artifact, PutStats]:
        """Store ``path`` as chunks; return its :class:`Artifact` and what it cost.

        With ``parent`` (the same file's artifact in the parent snapshot), chunks equal
        to the parent's are not rewritten.  With ``dirty`` (chunk indexes that may have
        changed since ``parent``; needs ``parent``), other chunks are taken from the
        parent without reading the file.  With ``filling`` the file is still being
        written by another thread: its data ranges are the filling's, and each range
        is read once the writer is past it.  Chunks stay unlisted until :meth:`commit`.

        Raises UsageError (bad chunk size, dirty without a compatible parent),
        NotFoundError (no such file), ChunkMissingError (a parent chunk the dirty path
        relies on is gone), StoreError (I/O).
        """
        t_start = time.perf_counter()
        ck.validate_chunk_size(chunk_size)
        path = Path(path)
        if parent is not None and parent.chunk_size != chunk_size:
            if dirty is not None:
                raise UsageError(
                    f"dirty chunks need a parent with the same chunk size "
                    f"({parent.chunk_size} != {chunk_size})"
                )
            parent = None  # incomparable: chunk indexes mean different ranges
        if dirty is not None and parent is None:
            raise UsageError("dirty chunk indexes need a parent artifact")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise NotFoundError(f"no such file: {path}", step="put file", path=path) from e
        except OSError as e:
            raise StoreError(f"cannot open: {e}", step="put file", path=path) from e
        try:
            self._ensure_lease()
            return self._put_fd(fd, path, chunk_size, parent, dirty, progress, t_start, filling)
        except OSError as e:
            raise StoreError(f"I/O error: {e}", step="put file", path=path) from e
        finally:
            os.close(fd)

    def _put_fd(
        self,
        fd: int,
        path: Path,
        chunk_size: int,
        parent: Artifact | None,
        dirty: Iterable[int] | None,
        progress: Progress | None,
        t_start: float,
        filling: ck.Filling | None = None,
    ) -> tuple[Artifact, PutStats]:
        size = os.fstat(fd).st_size
        n = ck.chunk_count(size, chunk_size)
        result: list[str | None] = [None] * n
        self._claim_refreshed = False
        parent_set = parent.stored if parent is not None else frozenset()

        # Which chunks come from the parent unread (dirty fast path)?
        skipped: list[int] = []
        if dirty is not None and parent is not None:
            dirty_set = set(dirty)
            for i in range(min(n, len(parent.chunks))):
                if i not in dirty_set and parent.span(i) == ck.chunk_span(i, size, chunk_size):
                    skipped.append(i)
        skipped_set = set(skipped)
        extents = filling.extents if filling is not None else ck.data_extents(fd, size)
        with_data = ck.chunks_with_data(extents, chunk_size)
        to_read = sorted(i for i in with_data if i < n and i not in skipped_set)

        st = dict.fromkeys(("bytes_read", "reused", "new", "stored", "verified"), 0) | {
            "t_read": 0.0,
            "t_hash": 0.0,
            "t_comp": 0.0,
            "t_sync": 0.0,
        }

        if skipped:
            need = {parent.chunks[i] for i in skipped} - {None} - self._mine
            absent = self._claim(sorted(need))
            if absent:
                raise ChunkMissingError(
                    artifact=f"parent of {path}", missing=absent, step="put file (dirty)"
                )
            self._mine |= need
            for i in skipped:
                result[i] = parent.chunks[i]
                st["reused"] += result[i] is not None

        # Written chunks are synced and named on the sync threads while later batches
        # are read, hashed and compressed; all of them are waited for before returning.
        pending: dict[Future[int], list[str]] = {}
        self._packing = False
        try:
            ready = filling.wait if filling is not None else None
            batches = ck.read_chunks(fd, size, chunk_size, to_read, ready)
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                st["t_read"] += time.perf_counter() - t0
                if batch is None:
                    break
                self._put_batch(batch, result, parent, parent_set, st, pending)
                if progress is not None:
                    progress(min(size, (batch[-1].index + 1) * chunk_size), size)
            self._seal_pack(pending)  # the last pack of this put
        finally:
            if self._pack is not None:  # failed before its seal: dropped, writes done
                for f in self._pack_writes:
                    with contextlib.suppress(BaseException):
                        f.result()
                self._pack.abort()
            self._pack, self._pack_writes, self._packing = None, [], False
            t0 = time.perf_counter()
            st["stored"] += self._wait_finished(pending)
            st["t_sync"] = time.perf_counter() - t0
        if progress is not None:
            progress(size, size)

        zero_total = n - sum(1 for h in result if h is not None)
        stats = PutStats(
            bytes_total=size,
            bytes_read=st["bytes_read"],
            chunks_total=n,
            chunks_zero=zero_total,
            chunks_reused=st["reused"],
            chunks_skipped=len(skipped) - sum(1 for i in skipped if result[i] is None),
            chunks_new=st["new"],
            chunks_verified=st["verified"],
            bytes_stored=st["stored"],
            seconds_reading=st["t_read"],
            seconds_hashing=st["t_hash"],
            seconds_compressing=st["t_comp"],
            seconds_syncing=st["t_sync"],
            seconds_total=time.perf_counter() - t_start,
        )
        return Artifact(size, chunk_size, tuple(result)), stats

    def _put_batch(
        self,
        batch: list[ck.ChunkRead],
        result: list[str | None],
        parent: Artifact | None,
        parent_set: frozenset[str],
        st: dict,
        pending: dict[Future[int], list[str]],
    ) -> None:
        t0 = time.perf_counter()
        hashed: list[tuple[ck.ChunkRead, str]] = []
        # BLAKE3 releases the GIL: hash the batch's chunks on the pool's threads, one
        # slice per thread (a future per 64 KiB chunk cost as much as its hashing)
        digests = self._hash_all([c.data for c in batch])
        for c, h in zip(batch, digests, strict=True):
            st["bytes_read"] += len(c.data)
            if h == ck.zero_hash(len(c.data)):
                continue
            hashed.append((c, h))
        st["t_hash"] += time.perf_counter() - t0

        # Classify: known-good (ours or the parent's) vs. to be looked at in the store.
        trusted: set[str] = set()
        unknown: dict[str, memoryview] = {}
        for c, h in hashed:
            result[c.index] = h
            if h in self._mine:
                continue
            same_as_parent = (
                parent is not None and c.index < len(parent.chunks) and parent.chunks[c.index] == h
            )
            if same_as_parent or h in parent_set:
                trusted.add(h)
            else:
                unknown.setdefault(h, c.data)
        # Claim everything that already exists; what is absent must be written.
        packed: set[str] = set()
        absent = self._claim(sorted(trusted | unknown.keys()), packed)
        data_of = {h: c.data for c, h in hashed}
        to_write = {h: data_of[h] for h in absent}
        # Pre-existing loose chunks nobody vouches for may be torn by an old crash:
        # re-hash them.  A sealed pack's are whole (see the module doc).  A put that
        # writes a pack writes them into it instead — compressing a chunk costs what
        # reading one back does, and later puts then trust the packed copy.
        suspects = [h for h in unknown if h not in absent and h not in packed]
        if suspects and self.pack_min_chunks is not None and (
            self._packing or len(to_write) + len(suspects) >= self.pack_min_chunks
        ):
            to_write |= {h: unknown[h] for h in suspects}
            suspects = []
        st["verified"] += len(suspects)
        if suspects:
            pool = self._executor()
            lens = [len(unknown[h]) for h in suspects]
            for h, got in zip(suspects, pool.map(self._read_chunk, suspects, lens), strict=True):
                if not isinstance(got, bytes):
                    to_write[h] = unknown[h]
        if to_write:
            prev: dict[str, str | None] = {}  # the parent's chunk at the same place
            if parent is not None:
                for c, h in hashed:
                    if h in absent and h not in prev and c.index < len(parent.chunks):
                        prev[h] = parent.chunks[c.index]  # (a repaired chunk stays plain)
            # Compress on the compute threads: chunks without a delta candidate in one
            # call that runs zstd on C threads (no GIL hand-offs per chunk; the same
            # frames as compress_chunk), the others one by one.  Then write, sync and
            # name each frame on the sync threads, in the background: the batch's
            # read buffer is free for the next batch as soon as this returns.
            t1 = time.perf_counter()
            plain = [h for h in to_write if prev.get(h) is None]
            frames: dict[str, bytes | memoryview] = {}
            if len(plain) > 1:
                out = ck.compress_many([to_write[h] for h in plain], self.level, self.threads)
                frames.update(zip(plain, out, strict=True))
            elif plain:
                frames[plain[0]] = ck.compress_chunk(to_write[plain[0]], self.level)
            st["t_comp"] += time.perf_counter() - t1
            others = [h for h in to_write if h not in frames]
            deltas = self._executor().map(
                self._frame, [to_write[h] for h in others], [prev[h] for h in others]
            )
            for h, (frame, dt) in zip(others, deltas, strict=True):
                frames[h] = frame
                st["t_comp"] += dt
            sync, items = self._sync_executor(), list(frames.items())
            if self.pack_min_chunks is not None and (
                self._packing or len(items) >= self.pack_min_chunks
            ):
                # many new chunks: into packs (one fdatasync per pack, not per chunk),
                # written on the sync threads at offsets reserved here, in order
                self._packing = True
                if self._pack is None:
                    self._pack_format()
                    self._pack = pk.PackWriter(self._key, self.tmp_dir, self.packs_dir)
                for k in range(0, len(items), PACK_WRITE_GROUP):
                    placed = self._pack.reserve(items[k : k + PACK_WRITE_GROUP])
                    fut = sync.submit(self._pack.write, placed)
                    pending[fut] = []  # (its chunks are the seal's)
                    self._pack_writes.append(fut)
                if self._pack.frame_bytes >= LOCAL_PACK_BYTES:
                    self._seal_pack(pending)
                items = []
            # a small put (a turn's few changed chunks) keeps one chunk per task: all
            # its syncs in flight at once, none waiting behind another in a group
            size = max(1, min(SYNC_GROUP, len(items) // SYNC_THREADS))
            for k in range(0, len(items), size):
                group = items[k : k + size]
                pending[sync.submit(self._store_frames, group)] = [h for h, _ in group]
        new = set(to_write)
        self._mine |= {h for _, h in hashed}
        # Count per chunk: the first occurrence of a written hash is "new", the rest reuse.
        for _, h in hashed:
            if h in new:
                st["new"] += 1
                new.discard(h)
            else:
                st["reused"] += 1

    def _hash_all(self, views: list[memoryview]) -> list[str]:
        """:func:`chunks.hash_bytes` of each of ``views``, in order, on the pool."""
        n = self.threads
        if n == 1 or len(views) < 2 * n:
            return [ck.hash_bytes(v) for v in views]
        parts = self._executor().map(
            lambda part: [ck.hash_bytes(v) for v in part], [views[i::n] for i in range(n)]
        )
        out: list[str] = [""] * len(views)
        for i, got in enumerate(parts):
            out[i::n] = got
        return out

    def _seal_pack(self, pending: dict[Future[int], list[str]]) -> None:
        """Seal the pack being filled on a sync thread, once its frame writes are done
        (waited for with the chunk syncs in ``pending``).  Its writes were submitted
        before it, so on the FIFO pool they never wait behind it."""
        w, writes = self._pack, self._pack_writes
        self._pack, self._pack_writes = None, []
        if w is not None:
            fut = self._sync_executor().submit(self._finish_pack, w, writes)
            pending[fut] = [h for h, _ in w.entries]

    def _finish_pack(self, w: pk.PackWriter, writes: list[Future[int]]) -> int:
        """Wait for ``w``'s writes, seal it (durable, named); returns its frame bytes."""
        try:
            futures_wait(writes)  # all of them: a failed one must not close the file
            for f in writes:  # under the others, still writing (or, reused, a stranger's)
                f.result()
            name, entries = w.seal()
        except BaseException:
            w.abort()
            raise
        self._sealed.add(name)
        self._packs.add(name, entries)
        return w.frame_bytes

    def _pack_format(self) -> None:
        """Mark an older store as holding packs before its first one (see FORMAT)."""
        if self._format != STORE_FORMAT_PACKS:
            fsutil.atomic_write_bytes(self.root / "FORMAT", STORE_FORMAT_PACKS)
            self._format = STORE_FORMAT_PACKS

    def _store_frames(self, group: list[tuple[str, bytes | memoryview]]) -> int:
        """:meth:`_store_frame` of each (hash, frame), in order; stops at the first error."""
        return sum(self._store_frame(h, frame) for h, frame in group)

    def _wait_finished(self, pending: dict[Future[int], list[str]]) -> int:
        """Wait for every chunk sync in flight; return their bytes, or raise the first
        error once all are done (the chunks of a group that failed are no longer
        counted as ours: a retry claims, re-hashes or rewrites them)."""
        stored, err = 0, None
        for f, hs in pending.items():
            try:
                stored += f.result()
            except BaseException as e:
                self._mine.difference_update(hs)
                err = err or e
        pending.clear()
        if err is not None:
            raise err
        return stored

    # -- commit --------------------------------------------------------------

    def commit(
        self,
        artifacts: Mapping[str, Artifact],
        *,
        parent: str | None = None,
        kind: str = KIND_VM_SNAPSHOT,
        meta: Mapping[str, str] | None = None,
        created: str | None = None,
    ) -> Manifest:
        """Make a snapshot of ``artifacts`` durable and listed; return its manifest.

        Raises NotFoundError (parent not in this store), ChunkMissingError (a named
        chunk is not stored), ManifestError (bad fields), StoreError (I/O).
        """
        m, body = build_manifest(
            parent=parent,
            kind=kind,
            meta=dict(meta or {}),
            artifacts=dict(artifacts),
            created=created,
        )
        if parent is not None and not self._manifest_path(parent).exists():
            raise NotFoundError(f"parent snapshot {parent} is not in the store", step="commit")
        self._ensure_lease()  # commits of artifacts not put by us are protected too
        try:
            self._sync_dirs(m, parent)  # step 3: every chunk's name durable before the manifest
            with self._gc_lock(shared=True):
                for name, a in artifacts.items():
                    missing = self._absent(a.stored)
                    if missing:
                        raise ChunkMissingError(
                            artifact=name, missing=missing, step="commit", path=self.root
                        )
                dest = self._manifest_path(m.id)
                if not dest.exists():
                    self._write_manifest(dest, encode_manifest(self._key, body))
        except OSError as e:
            raise StoreError(f"I/O error: {e}", step="commit", path=self.root) from e
        self._drop_lease()
        return m

    def _sync_dirs(self, m: Manifest, parent: str | None) -> None:
        """fsync the chunk directories whose entries the manifest relies on (step 3)."""
        vouched: frozenset[str] = frozenset()
        if parent is not None:
            with contextlib.suppress(StoreError, NotFoundError):
                vouched = self.load(self._manifest_path(parent)).chunks
        pm = self._packs
        loose: set[str] = set()
        other_packs = False
        for h in m.chunks - vouched:
            hit = pm.get(h)
            if hit is None:
                loose.add(h)
            elif hit[0] not in self._sealed:
                other_packs = True  # named by another writer, maybe before its dir fsync
        dirs = {h[:2] for h in loose} - self._synced_dirs
        paths = [self.chunks_dir / d for d in sorted(dirs)]
        if dirs and "" not in self._synced_dirs:
            paths.append(self.chunks_dir)
        if other_packs:
            paths.append(self.packs_dir)
        if not paths:
            return
        for _ in self._sync_executor().map(_fsync_existing_dir, paths):
            pass
        self._synced_dirs |= dirs | ({""} if dirs else set())

    def _write_manifest(self, dest: Path, data: bytes) -> None:
        failpoints.hit("store.manifest_write")
        fsutil.atomic_write_bytes(dest, data, mode=0o600)

    # -- lookup ----------------------------------------------------------------

    def _tombstone_path(self, snap_id: str) -> Path:
        return self.snapshots_dir / f"{snap_id}.removed"

    def _scan_names(self) -> tuple[list[str], set[str]]:
        """(ids with a manifest file and no tombstone, ids with a tombstone)."""
        ids, removed = [], set()
        try:
            names = [p.name for p in self.snapshots_dir.iterdir()]
        except OSError as e:
            raise _io_error(e, "list snapshots", self.snapshots_dir) from e
        for name in names:
            if name.startswith("."):
                continue
            if name.endswith(".manifest"):
                ids.append(name[: -len(".manifest")])
            elif name.endswith(".removed"):
                removed.add(name[: -len(".removed")])
        return sorted(i for i in ids if i not in removed), removed

    def _manifest_ids(self) -> list[str]:
        return self._scan_names()[0]

    def ids(self) -> list[str]:
        """Ids of every snapshot present and not removed, damaged ones included."""
        return self._manifest_ids()

    def is_removed(self, snap_id: str) -> bool:
        """Whether ``snap_id`` was removed (a tombstone exists; see module doc)."""
        return self._tombstone_path(snap_id).exists()

    def load(self, path: Path) -> Manifest:
        """Authenticate and parse one manifest file (ManifestError / ManifestAuthError).

        A removed snapshot's manifest (tombstoned; e.g. copied back) is NotFoundError.
        """
        path = Path(path)
        stem = path.name[: -len(".manifest")] if path.name.endswith(".manifest") else None
        if stem is not None and path.parent == self.snapshots_dir and self.is_removed(stem):
            raise NotFoundError(
                f"snapshot {stem[:12]} was removed", step="load manifest", path=path
            )
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise NotFoundError(f"no such manifest: {path}", step="load manifest") from e
        except OSError as e:  # a directory, unreadable file, I/O error: damaged, not a crash
            raise ManifestError(
                f"manifest cannot be read: {e.strerror or e}", step="load manifest", path=path
            ) from e
        return decode_manifest(self._key, data, source=path, expect_id=stem)

    def scan(self) -> tuple[list[Manifest], list[tuple[str, StoreError]]]:
        """Every snapshot that loads, oldest first, and ``(id, error)`` for every
        manifest file that does not: one damaged manifest hides nothing else."""
        good: list[Manifest] = []
        bad: list[tuple[str, StoreError]] = []
        for i in self._manifest_ids():
            try:
                good.append(self.load(self._manifest_path(i)))
            except NotFoundError:
                continue  # removed meanwhile
            except StoreError as e:
                bad.append((i, e))
        good.sort(key=lambda m: (m.created, m.id))
        return good, bad

    def _resolve(self, ref: str) -> tuple[list[str], list[tuple[str, str]]]:
        """(ids matching ``ref`` as a whole id or id prefix, snapshots tagged ``ref``)."""
        raw = ref.strip()
        if not raw:
            raise UsageError("an empty snapshot reference")
        low = raw.lower()
        is_hex = all(c in "0123456789abcdef" for c in low)
        if is_hex and len(low) == ck.HASH_HEX_LEN:
            # a whole id: a path check, no listing (stores hold 1000s, and ``session rm``
            # looks up ids released long ago); so a tag shaped like a whole id is not
            # looked up as a tag
            return ([low] if self._whole_present(low) else []), []
        all_ids = self._manifest_ids()
        ids = [i for i in all_ids if i.startswith(low)] if is_hex else []
        tagged = [(i, t) for i, t in self._tags(all_ids) if t == raw]
        return ids, tagged

    def _whole_present(self, snap_id: str) -> bool:
        """Whether whole id ``snap_id`` has a manifest (damaged or not) and no tombstone."""
        return self._manifest_path(snap_id).exists() and not self.is_removed(snap_id)

    def _tags(self, ids: Iterable[str]) -> Iterable[tuple[str, str]]:
        """(id, tag) of every snapshot that loads (only its authenticated meta is read)."""
        for i in ids:
            p = self._manifest_path(i)
            try:
                meta = decode_meta(self._key, p.read_bytes(), source=p, expect_id=i)
            except (OSError, StoreError):
                continue  # damaged: its tag cannot be trusted
            yield i, meta.get("tag", "")

    def resolve_id(self, ref: str) -> str:
        """The one snapshot id ``ref`` names (id, id prefix or tag), even if its
        manifest is damaged (so it can be removed). NotFoundError / ConflictError."""
        ids, tagged = self._resolve(ref)
        hits = sorted(set(ids) | {i for i, _ in tagged})
        if not hits:
            raise NotFoundError(f"no snapshot {ref.strip()!r}", step="get snapshot", path=self.root)
        if len(hits) > 1:
            tags = dict(tagged)
            shown = ", ".join(
                h[:12] + (f" (tag {tags[h]!r})" if tags.get(h) else "") for h in hits[:10]
            )
            more = f" and {len(hits) - 10} more" if len(hits) > 10 else ""
            raise ConflictError(
                f"snapshot reference {ref.strip()!r} is ambiguous: {len(hits)} snapshots match "
                f"({shown}{more}); use a longer id",
                step="get snapshot",
            )
        return hits[0]

    def get(self, ref: str) -> Manifest:
        """The snapshot ``ref`` names: its id, an id prefix, or its tag (exact).

        NotFoundError (none), ConflictError (several: the candidates are listed),
        ManifestError (it is damaged).
        """
        return self.load(self._manifest_path(self.resolve_id(ref)))

    def list(self) -> list[Manifest]:
        """Every snapshot that loads, oldest first (:meth:`scan` also names the bad ones)."""
        return self.scan()[0]

    def remove(self, ref: str, *, force: bool = False) -> Manifest | None:
        """Remove a snapshot for good (chunks go at the next gc); returns its manifest,
        or None if the manifest was damaged (it is removed all the same).

        A tombstone is written before the manifest goes (see module doc), so a copy of
        the manifest put back later stays removed.  Raises ConflictError if another
        snapshot names it as parent, unless ``force``; StoreError naming the path if
        the store cannot be written (e.g. a read-only home).
        """
        snap_id = self.resolve_id(ref)
        m: Manifest | None
        try:
            m = self.load(self._manifest_path(snap_id))
        except NotFoundError:
            raise
        except StoreError:
            m = None  # damaged: nothing can build on what cannot be read
        if not force:
            children = []
            for i in self._manifest_ids():  # each one's parent only, not its chunk list
                p = self._manifest_path(i)
                with contextlib.suppress(OSError, StoreError):
                    if decode_parent(self._key, p.read_bytes(), source=p, expect_id=i) == snap_id:
                        children.append(i)
            if children:
                raise ConflictError(
                    f"snapshot {snap_id[:12]} is the parent of "
                    f"{', '.join(c[:12] for c in children)}; remove those first or use force",
                    step="remove snapshot",
                )
        tomb = self._tombstone_path(snap_id)
        try:
            fsutil.atomic_write_bytes(tomb, b"")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._manifest_path(snap_id))
            fsutil.fsync_dir(self.snapshots_dir)
        except OSError as e:
            raise _io_error(e, "remove snapshot", tomb) from e
        return m

    # -- read back -------------------------------------------------------------

    def materialize(
        self,
        artifact: Artifact,
        dest: Path,
        *,
        name: str | None = None,
        durable: bool = True,
        extra: Mapping[str, bytes] | None = None,
    ) -> None:
        """Write ``artifact`` to ``dest`` as a sparse file, checking every chunk's hash.

        Zero chunks become holes.  On any bad chunk, raises ChunkMissingError or
        ChunkCorruptError naming every bad chunk, and ``dest`` is left untouched.
        ``durable`` fsyncs the file before the rename.  ``extra``: chunks not (yet) in
        the store, by hash (a pending checkpoint journal's), checked like the store's.
        """
        dest = Path(dest)
        label = name or f"<{artifact.size} bytes>"
        dest.parent.mkdir(parents=True, exist_ok=True)
        positions: dict[str, list[int]] = {}
        for i, h in enumerate(artifact.chunks):
            if h is not None:
                positions.setdefault(h, []).append(i)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            os.ftruncate(fd, artifact.size)

            def one(h: str) -> tuple[str, str | None]:
                idx = positions[h]
                ln = artifact.span(idx[0])[1]
                got: bytes | str | None = extra.get(h) if extra is not None else None
                if got is not None:  # trusted no more than a chunk file
                    if len(got) != ln or ck.hash_bytes(got) != h:
                        return h, "corrupt"
                else:
                    got = self._read_chunk(h, ln)
                if not isinstance(got, bytes):
                    return h, got
                for i in idx:
                    off = artifact.span(i)[0]
                    view = memoryview(got)
                    while view:
                        n = os.pwrite(fd, view, off)
                        view, off = view[n:], off + n
                return h, None

            bad: dict[str, list[str]] = {"missing": [], "corrupt": []}
            for h, err in self._executor().map(one, positions):
                if err is not None:
                    bad[err].append(h)
            if bad["missing"] or bad["corrupt"]:
                raise chunk_error(
                    artifact=self._label(label, bad["corrupt"]),
                    missing=bad["missing"],
                    corrupt=bad["corrupt"],
                    step="materialize",
                    path=dest,
                )
            if durable:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, dest)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if durable:
            fsutil.fsync_dir(dest.parent)

    def _label(self, label: str, corrupt: Iterable[str]) -> str:
        """``label``, naming the packs the ``corrupt`` chunks are in (or may be in:
        refused packs), so the error says which file is damaged."""
        pm = self._packs
        where = [f"packs/{n}.pack" for n in pk.names(corrupt, pm)]
        if corrupt and pm.bad:
            where += [f"packs/{n}.pack (refused: {why})" for n, why in sorted(pm.bad.items())]
        return f"{label} ({'; '.join(where)})" if where else label

    def check_file(self, artifact: Artifact, path: Path) -> list[int]:
        """Indexes of the chunks of file ``path`` that differ from ``artifact`` (all of
        them if its size differs): how an uncompressed copy outside the store (the hot
        cache, a RAM shadow) is authenticated against a MAC-checked manifest.

        Only chunks holding data are read and hashed (holes are zero chunks), so the
        cost is one BLAKE3 pass over the data.  OSError if the file cannot be read.
        """
        n = len(artifact.chunks)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size != artifact.size:
                return list(range(n))
            if size == 0:
                return []
            cs = artifact.chunk_size
            data: set[int] = set()
            pos = 0
            while pos < size:  # extents holding data (a hole reads as zeros)
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
                data.update(range(start // cs, (end - 1) // cs + 1))
                pos = end
            bad = [i for i, h in enumerate(artifact.chunks) if h is not None and i not in data]
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
                view = memoryview(mm)
                try:
                    for i in sorted(data):
                        off, ln = artifact.span(i)
                        got = blake3.blake3(view[off : off + ln]).hexdigest()
                        want = artifact.chunks[i]
                        if got != (want if want is not None else ck.zero_hash(ln)):
                            bad.append(i)
                finally:
                    view.release()
            return sorted(bad)
        finally:
            os.close(fd)

    def read_range(
        self,
        artifact: Artifact,
        offset: int,
        length: int,
        *,
        name: str | None = None,
        extra: Mapping[str, bytes] | None = None,
    ) -> bytes:
        """Bytes ``[offset, offset+length)`` of ``artifact`` (short at its end), hash-checked.

        Only the chunks covering the range are read.  ``extra``: chunks not (yet) in
        the store, each already checked against its hash by whoever built the map
        (a pending journal, as for :meth:`materialize`).  Raises UsageError for a
        negative offset/length or an offset past the end, ChunkMissingError /
        ChunkCorruptError.
        """
        if offset < 0 or length < 0 or offset > artifact.size:
            raise UsageError(
                f"range {offset}+{length} is outside artifact of {artifact.size} bytes"
            )
        end = min(artifact.size, offset + length)
        if end <= offset:
            return b""
        cs = artifact.chunk_size
        first, last = offset // cs, (end - 1) // cs
        parts: list[bytes] = []
        missing, corrupt = [], []
        for i in range(first, last + 1):
            off, ln = artifact.span(i)
            h = artifact.chunks[i]
            got = extra.get(h) if extra is not None and h is not None else None
            if got is not None and len(got) == ln:
                data: bytes | str = got
            else:
                data = bytes(ln) if h is None else self._read_chunk(h, ln)
            if data == "missing":
                missing.append(h)
            elif data == "corrupt":
                corrupt.append(h)
            else:
                lo, hi = max(offset, off) - off, min(end, off + ln) - off
                parts.append(data[lo:hi])
        if missing or corrupt:
            raise chunk_error(
                artifact=self._label(name or f"<{artifact.size} bytes>", corrupt),
                missing=missing,
                corrupt=corrupt,
                step="read range",
                path=self.root,
            )
        return b"".join(parts)

    # -- maintenance -------------------------------------------------------------

    def _stored_chunks(self) -> tuple[list[Path], list[str]]:
        """(chunk files, stray names) under chunks/."""
        files, stray = [], []
        for d in sorted(self.chunks_dir.iterdir()):
            if not d.is_dir():
                stray.append(d.name)
                continue
            for p in d.iterdir():
                if ck.is_chunk_hash(p.name) and p.name[:2] == d.name:
                    files.append(p)
                else:
                    stray.append(f"{d.name}/{p.name}")
        return files, stray

    def verify(self) -> VerifyReport:
        """Re-hash every stored chunk and authenticate every manifest; report damage."""
        manifests: list[Manifest] = []
        bad_manifests: list[tuple[str, str]] = []
        for i in self._manifest_ids():
            try:
                manifests.append(self.load(self._manifest_path(i)))
            except StoreError as e:
                bad_manifests.append((f"{i}.manifest", str(e)))
        files, stray = self._stored_chunks()
        pm = self._packs
        pm.refresh()
        members, bad_packs = pm.snapshot()
        # a cache, but a damaged or lying one is damage to report (gc rewrites it)
        why = pm.check_combined(members)
        bad_index = () if why is None else ((pk.INDEX_NAME, f"{why} (a cache: gc rewrites it)"),)

        def check_frame(h: str, frame: bytes | str) -> tuple[str, int, bool, str | None]:
            if isinstance(frame, str):
                return h, 0, False, None
            base = None
            with contextlib.suppress(StoreError):
                base = ck.delta_base(frame)
            got = self._check_frame(h, frame, None, 0)
            ok = isinstance(got, bytes)
            return h, len(got) if ok else 0, ok, base

        def check(p: Path) -> tuple[str, int, bool, str | None]:
            try:
                frame: bytes | str = p.read_bytes()  # this file, not a packed copy
            except FileNotFoundError:
                frame = "missing"
            return check_frame(p.name, frame)

        def check_packed(item: tuple[str, str, pk.Entry]) -> tuple[str, int, bool, str | None]:
            name, h, e = item
            return check_frame(h, pk.read_frame(pm.path(name), e) or "corrupt")

        packed = [(name, h, e) for name, es in members.items() for h, e in es.items()]
        corrupt: list[str] = []
        nbytes = 0
        present: set[str] = set()
        bases: set[str] = set()
        results = list(self._executor().map(check, files))
        results += self._executor().map(check_packed, packed)
        for h, n, ok, base in results:
            present.add(h)
            nbytes += n
            if not ok:
                corrupt.append(h)
            if base is not None:
                bases.add(base)
        corrupt_set = set(corrupt)
        missing: set[str] = bases - present  # a delta's base is needed like any chunk
        affected: dict[str, tuple[str, ...]] = {}
        for m in manifests:
            need = m.chunks
            gone = need - present
            missing |= gone
            bad = gone | (need & corrupt_set)
            if bad:
                affected[m.id] = tuple(sorted(bad))
        return VerifyReport(
            chunks_checked=len(files) + len(packed),
            bytes_checked=nbytes,
            manifests_checked=len(manifests) + len(bad_manifests),
            corrupt=tuple(sorted(set(corrupt))),
            missing=tuple(sorted(missing)),
            stray=tuple(stray),
            bad_manifests=tuple(bad_manifests),
            affected=affected,
            bad_packs=tuple((f"{n}.pack", why) for n, why in sorted(bad_packs.items())) + bad_index,
            packs_checked=len(members) + len(bad_packs),
        )

    def gc(
        self, grace_seconds: float = DEFAULT_GRACE_SECONDS, *, dry_run: bool = False
    ) -> GcReport:
        """Delete chunks no manifest names, except young ones (see module doc).

        A manifest that fails to load cannot be trusted, but its chunks are kept
        anyway (every 64-hex token in it counts as referenced): gc never turns a
        damaged manifest into lost data.  ``dry_run`` deletes nothing and reports
        what would go (``chunks_doomed``).
        """
        if grace_seconds < 0:
            raise UsageError("grace_seconds must be >= 0")
        try:
            return self._gc(grace_seconds, dry_run)
        except OSError as e:
            raise _io_error(e, "gc", self.root) from e

    def _deltas_first(self, doomed: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        """``doomed`` ordered so that no chunk is deleted before a delta built on it.

        A gc killed between the two unlinks then leaves a base without its delta
        (plain garbage), never a delta without its base (which ``verify`` would report
        as damage).  Chains are short (``MAX_DELTA_DEPTH``): deepest deltas go first.
        """
        bases = dict(
            zip(
                (p.name for p, _ in doomed),
                self._executor().map(self._loose_base_of, (p.name for p, _ in doomed)),
                strict=True,
            )
        )

        def depth(name: str) -> int:
            n = 0
            while (name := bases.get(name) or "") and n <= MAX_DELTA_DEPTH:
                n += 1
            return n

        return sorted(doomed, key=lambda d: -depth(d[0].name))

    def _gc(self, grace_seconds: float, dry_run: bool = False) -> GcReport:
        with self._gc_lock(shared=False):
            # removed snapshots' manifests put back (copied in) stay removed: drop them
            _, removed = self._scan_names()
            for i in removed if not dry_run else ():
                with contextlib.suppress(FileNotFoundError):
                    self._manifest_path(i).unlink()
            now_ns = time.time_ns()
            live, stale = 0, 0
            cutoff = now_ns - int(grace_seconds * 1e9)
            for lease in read_leases(self.leases_dir):
                if lease.alive():
                    live += 1
                    cutoff = min(cutoff, lease.mtime_ns)
                else:
                    if not dry_run:
                        release_lease(lease.path)
                    stale += 1
            referenced: set[str] = set()
            unreadable: list[str] = []
            blind = False
            for i in self._manifest_ids():
                p = self._manifest_path(i)
                try:
                    referenced |= self.load(p).chunks
                except StoreError:
                    unreadable.append(p.name)
                    try:
                        salvaged = salvage_hashes(p.read_bytes())
                    except OSError:
                        salvaged = None
                    if salvaged is None:
                        blind = True  # what it names is unknowable: delete no chunk
                    else:
                        referenced |= salvaged
            deleted = freed = kept = young = 0
            files, _ = self._stored_chunks()
            doomed: list[tuple[Path, int]] = []
            keep: list[str] = []
            # packs go whole or stay whole (no repacking): one any kept manifest names
            # a chunk of, a young one (lease, grace) and a refused one (its index
            # cannot say what it holds) stay with every chunk in them
            pm = self._packs
            pm.refresh()
            members, bad_packs = pm.snapshot()
            live_packs: set[str] = set(bad_packs)
            dead_packs: dict[str, int] = {}  # name -> size
            for name, entries in members.items():
                if not referenced.isdisjoint(entries):
                    live_packs.add(name)
                    continue
                try:
                    s = os.stat(pm.path(name))
                except FileNotFoundError:
                    continue
                if s.st_mtime_ns >= cutoff:
                    young += len(entries)
                    live_packs.add(name)
                else:
                    dead_packs[name] = s.st_size
            for name in live_packs - bad_packs.keys():
                keep.extend(members[name])
            for p in files:
                if p.name in referenced:
                    keep.append(p.name)
                    continue
                try:
                    s = p.stat()
                except FileNotFoundError:
                    continue
                if s.st_mtime_ns >= cutoff:
                    young += 1
                    keep.append(p.name)
                    continue
                doomed.append((p, s.st_size))
            # a kept delta keeps its base (and, after a writers' race, the base's base)
            needed: set[str] = set()
            todo = keep
            for _ in range(MAX_DELTA_DEPTH + 1):
                found = set().union(*self._executor().map(self._bases_of, todo))
                for name in [n for n in dead_packs if not found.isdisjoint(members[n])]:
                    del dead_packs[name]  # holds a kept delta's base: the pack stays
                    live_packs.add(name)
                    found |= members[name].keys()
                todo = sorted(found - needed)
                needed |= found
                if not todo:
                    break
            kept = len(keep)
            gone: list[str] = []
            for p, size in self._deltas_first(doomed):
                if blind or p.name in needed:
                    kept += 1
                    continue
                if dry_run:
                    gone.append(p.name)
                    deleted += 1
                    freed += size
                    continue
                with contextlib.suppress(FileNotFoundError):
                    failpoints.hit("store.gc_unlink")
                    p.unlink()
                    gone.append(p.name)
                    deleted += 1
                    freed += size
            # whole packs after the loose chunks (a loose delta goes before its base)
            packs_deleted = 0
            for name, size in sorted(dead_packs.items()):
                if blind:
                    kept += len(members[name])
                    continue
                if not dry_run:
                    try:
                        failpoints.hit("store.gc_unlink")
                        os.unlink(pm.path(name))
                    except FileNotFoundError:
                        continue
                    pm.forget(name)
                gone.extend(sorted(members[name]))
                deleted += len(members[name])
                freed += size
                packs_deleted += 1
            temps = 0
            for d in (self.tmp_dir, self.snapshots_dir, self.root):
                for p in d.iterdir():
                    if not (
                        p.name.endswith(".tmp") or (d == self.root and p.name.startswith(".key."))
                    ):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        if p.stat().st_mtime_ns < cutoff:
                            if not dry_run:
                                p.unlink()
                            temps += 1
        if not dry_run and not blind:
            # rewrite the combined index (after the lock: writers wait for none of it);
            # a cache: a pack named meanwhile is read on its own until the next rewrite
            with contextlib.suppress(OSError, StoreError):
                pm.rebuild()
        return GcReport(
            chunks_deleted=deleted,
            bytes_freed=freed,
            chunks_kept=kept,
            chunks_kept_young=young,
            temp_files_deleted=temps,
            leases_live=live,
            leases_stale_removed=stale,
            manifests_unreadable=tuple(unreadable),
            dry_run=dry_run,
            chunks_doomed=tuple(gone),
            local_packs_deleted=packs_deleted,
            local_packs_kept=len(live_packs),
        )
