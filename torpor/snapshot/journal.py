"""The checkpoint journal: a turn's capture durable in one write, stored behind.

Role: :func:`fast_snapshot` is a session checkpoint's snapshot with the store's slow
part (compressing chunks, one file and fsync per chunk, the manifest) taken off the
turn's critical path.  On the path: the pause window (the shim's capture, exactly as
in :func:`torpor.snapshot.core.snapshot`; without the guest agent's ``sync`` before
it: RAM and disk are captured in one pause and restored together), then BLAKE3 of
the chunks the capture may have changed — memory: the chunks the shim saw change since
the parent snapshot; disk overlay and device state: every chunk — so the new
snapshot's manifest, and with it its **id**, is known before anything is stored.
The chunks that differ from the parent's, with what is needed to rebuild the
manifest, are written to one file ``$TORPOR_HOME/journal/<id>.journal`` (0600):
written, ``fdatasync``, renamed into place, folder fsync'd.  That is the *durable
point*: the caller may name ``<id>`` in a checkpoint entry and acknowledge the turn.
A thread of this process then commits the journal into the store (the store's own
commit protocol; the manifest gets the same id) and removes it.

Invariants:

- **A snapshot id named by the log is restorable.**  Its manifest is in the store,
  or its journal is complete on this home's disk: every reader that needs the
  snapshot finishes the journal first (:func:`finish`: the VM's next snapshot,
  which needs it as its parent, forks, ``Session.remove``) — except a restore whose
  RAM goes into the VM's own file (a session's recovery), which reads the journal
  instead (:func:`read_pending`: the parent's chunks plus the journal's, every one
  hash-checked, the rebuilt manifest's id must be the journal's) and commits it
  behind once the VM runs (:func:`commit_behind`).  The journal is removed only
  after its manifest is committed, so a crash at any point of a restore leaves one
  of the two.  Finishing is idempotent and serialised by a lock per journal; a
  journal whose manifest is already stored is just removed.
- **A journal is trusted no more than the store.**  Its chunks are rebuilt into
  files and stored by :meth:`ChunkStore.put_file`, which hashes them again; the
  manifest is committed from the rebuilt artifacts and must come out with the id
  the journal is named by (BLAKE3 over every chunk hash), else the commit is
  refused (StoreError) and the journal kept.  A torn journal (a crash before the
  rename) has no final name and is never used; its temp file is reaped.
- **Only a parent that is committed.**  The memory part is a delta against the
  parent snapshot (the one the VM's shadow equals), so the fast path runs only when
  that parent's manifest is in the store (its pending journal is finished first) and
  the store is the home's own folder.  With a bucket (``TORPOR_STORE=s3://...``)
  every checkpoint takes the synchronous path: ``--durability bucket`` acknowledges
  a turn only once its snapshot is in the bucket, and a journal on one host's disk
  is not that.  :func:`fast_snapshot` returns None whenever it does not apply, and
  the caller takes :func:`torpor.snapshot.core.snapshot`.
- **The journal never writes the log.**  Only the caller's fenced ``checkpoint``
  entry names the snapshot; a host that lost the session's lease commits its
  journal into the store as an unreferenced snapshot, which nothing restores.

Failpoints (``torpor.failpoints``): ``journal.write`` (data written, before
``fdatasync`` and the rename: the torn case), ``journal.durable`` (renamed and
fsync'd, before the caller logs anything), ``journal.commit`` (the background
commit, or the one behind a restore, before it reads the journal).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torpor import failpoints
from torpor.errors import ConflictError, NotFoundError, StoreError, TorporError
from torpor.fsutil import fsync_dir, locked
from torpor.paths import Paths
from torpor.store import ChunkStore, Manifest
from torpor.store import chunks as ck
from torpor.store.manifest import KIND_VM_SNAPSHOT, Artifact, build_manifest, now_iso
from torpor.vmm.capture import copy_range, read_meta, vouch_for_shadow
from torpor.vmm.manager import VM, VMManager
from torpor.vmm.state import Status, proc_start_time

log = logging.getLogger("torpor.journal")

#: ``TORPOR_JOURNAL=0``: every checkpoint takes the synchronous path (benchmarks
#: compare the two; an escape hatch).
ENV = "TORPOR_JOURNAL"
MAGIC = b"torpor-journal 1\n"
#: Largest journal header (JSON) read back: chunk index lists of a few GiB of RAM.
MAX_HEADER = 64 << 20
#: A journal not being committed by a thread of this process and older than this
#: is a crashed writer's: the next fast snapshot on this home finishes it.
ORPHAN_AGE = 10.0

_threads: dict[str, threading.Thread] = {}  # snapshot id -> this process's committer
# snapshot id -> its manifest, while this process commits it: the VM's next journal
# builds on it without waiting (its commit then waits for this one's: see _commit)
_manifests: dict[str, Manifest] = {}
#: snapshot id -> what its background commit took in this process (benchmarks):
#: ``commit_ms`` (start to stored), ``stored_bytes`` (new in the store).  Bounded.
commits: dict[str, dict[str, float]] = {}
MAX_COMMIT_STATS = 4096
_stored: dict[str, int] = {}
_threads_lock = threading.Lock()


def _at_exit() -> None:
    """A process ending normally (a CLI turn) commits its journals first."""
    with contextlib.suppress(Exception):
        wait_all()


# before the interpreter's thread pools refuse work at exit (callbacks registered
# this way run newest first, ahead of concurrent.futures' own): a commit still running
# then finishes instead of failing with "cannot schedule new futures after shutdown"
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_at_exit)


def journal_dir(paths: Paths) -> Path:
    return paths.root / "journal"


def journal_path(paths: Paths, snap_id: str) -> Path:
    return journal_dir(paths) / f"{snap_id}.journal"


def pending(paths: Paths, snap_id: str) -> bool:
    """Whether ``snap_id`` exists only as a journal on this home (not yet stored)."""
    return ck.is_chunk_hash(snap_id) and journal_path(paths, snap_id).exists()


# -- the fast path ------------------------------------------------------------------


def _delta(
    fd: int, parent: Artifact, candidates: set[int] | None
) -> tuple[Artifact, list[int], list[bytes]]:
    """The artifact of the file ``fd`` next to its parent's, hashing only the chunk
    indexes in ``candidates`` (all with None) and those whose span changed; returns
    it with the indexes that differ from the parent's and their data (b"" if zero)."""
    size = os.fstat(fd).st_size
    cs = parent.chunk_size
    n = ck.chunk_count(size, cs)
    check = set(range(n)) if candidates is None else {i for i in candidates if i < n}
    if size != parent.size:  # only then can a chunk cover other bytes than the parent's
        check |= {i for i in range(n) if i >= len(parent.chunks) or _moved(parent, i, size)}
    order = sorted(check)

    def one(i: int) -> tuple[str | None, bytes]:
        off, ln = ck.chunk_span(i, size, cs)
        data = os.pread(fd, ln, off)
        if len(data) != ln:
            raise StoreError(f"short read of a captured file at {off}", step="journal")
        h = ck.hash_bytes(data)
        return (None, b"") if h == ck.zero_hash(ln) else (h, data)

    # BLAKE3 releases the GIL; a turn changes ~100 chunks, for which a pool costs more
    got = list(_pool().map(one, order)) if len(order) > 256 else [one(i) for i in order]
    chunks = [parent.chunks[i] if i < len(parent.chunks) else None for i in range(n)]
    changed: list[int] = []
    datas: list[bytes] = []
    for i, (h, data) in zip(order, got, strict=True):
        if i >= len(parent.chunks) or _moved(parent, i, size) or parent.chunks[i] != h:
            changed.append(i)
            datas.append(data)
        chunks[i] = h
    return Artifact(size, cs, tuple(chunks)), changed, datas


_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _threads_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 1)), "journal-hash")
        return _executor


def _moved(parent: Artifact, i: int, size: int) -> bool:
    """Whether chunk ``i`` covers other bytes than the parent's (the file's size changed)."""
    return parent.span(i) != ck.chunk_span(i, size, parent.chunk_size)


def _write(paths: Paths, header: dict[str, Any], blobs: list[bytes]) -> int:
    """Write the journal durably: temp file, data, fdatasync, rename, folder fsync."""
    d = journal_dir(paths)
    if not d.is_dir():
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        fsync_dir(d.parent)
    _reap_temps(d)
    head = json.dumps(header, separators=(",", ":")).encode()
    final = d / f"{header['id']}.journal"
    tmp = d / f".{header['id']}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        total = 0
        parts = [MAGIC, len(head).to_bytes(8, "big"), head, *blobs]
        for p in parts:
            view = memoryview(p)
            while view:
                k = os.write(fd, view)
                view = view[k:]
                total += k
        failpoints.hit("journal.write")
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.rename(tmp, final)
    fsync_dir(d)
    return total


def _reap_temps(d: Path) -> None:
    """Torn journals (a writer killed before its rename) whose writer is gone."""
    for t in d.glob(".*.tmp"):
        try:
            pid = int(t.name.split(".")[2])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                t.unlink()


def fast_snapshot(mgr: VMManager, ref: str, tag: str | None = None) -> Any:
    """Snapshot the running VM ``ref`` durable as a journal; its store commit runs
    behind in a thread.  Returns a :class:`torpor.snapshot.core.SnapshotResult`
    whose manifest is the one the commit will store, or None when the fast path does
    not apply (no committed parent the VM's shadow equals, a bucket store): then
    call :func:`torpor.snapshot.core.snapshot`.  Errors as ``snapshot``'s."""
    from torpor.snapshot import core
    from torpor.store.tiered import TieredStore

    if os.environ.get(ENV) == "0":
        return None
    vm = mgr.get(ref)
    if vm.state.status != Status.RUNNING:
        raise ConflictError(
            f"VM {vm.name} is not running ({vm.state.status}); only a running VM can be snapshotted"
        )
    _finish_orphans(mgr.paths)
    with locked(mgr.paths.locks / f"snap-{vm.id}.lock"):
        vm = mgr.get(vm.id)
        if vm.state.status != Status.RUNNING:
            raise ConflictError(f"VM {vm.name} is not running ({vm.state.status})")
        last = core.last_snapshot(vm)
        if not last:
            log.debug("not journaled: VM %s has no snapshot yet", vm.name)
            return None
        store = core._store(mgr)
        try:
            if isinstance(store, TieredStore):
                log.debug("not journaled: the store has a bucket")
                return None
            with _threads_lock:
                parent = _manifests.get(last)  # still being committed by this process
            if parent is None:
                finish(mgr.paths, last)  # a journal a crashed process left: stored first
                try:
                    parent = store.get(last)
                except TorporError as e:
                    log.debug("not journaled: parent %s: %s", last[:12], e)
                    return None
            if set(core.ARTIFACTS) - set(parent.artifacts):
                return None
            if _ram_copy_tag(vm) != parent.id:
                # the shadow is not that snapshot: the capture would see no delta
                log.debug("not journaled: VM %s's shadow is not %s", vm.name, last[:12])
                return None
            return _fast(mgr, vm, store, parent, tag)
        finally:
            store.close()


def _ram_copy_tag(vm: VM) -> str | None:
    """Which committed snapshot the VM's copy of its RAM as of its last capture equals:
    its shadow, or for a VM whose RAM is mapped private (a restore over a shared
    base, :mod:`torpor.vmm.ramless`) its overlay.  The overlay first: a lazily
    restored VM (private too) has both, and its shadow is only the restored snapshot
    streamed in for the lazy server (:func:`torpor.vmm.lazymem.fill_shadow`), never
    what a capture changed."""
    from torpor.vmm.ramless import overlay_of

    for meta in (overlay_of(vm.files.shadow), vm.files.shadow_meta):
        meta = meta if meta.name.endswith(".json") else meta.with_name(meta.name + ".json")
        if meta.exists():
            got = read_meta(meta).get("snapshot")
            return got if isinstance(got, str) else None
    return None


def _fast(mgr: VMManager, vm: VM, store: ChunkStore, parent: Manifest, tag: str | None) -> Any:
    from torpor.snapshot import base as bases
    from torpor.snapshot import core

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    stage = core._stage_dir(mgr)
    handed_off = False
    c = mgr.client(vm, timeout=30)
    try:
        tb = time.perf_counter()
        base_ref = bases.ensure_stored(mgr, store, vm)
        guest = bases.guest_meta(mgr.paths, vm)
        t["base_ms"] = (time.perf_counter() - tb) * 1000
        # No guest sync (the synchronous path's step 1): RAM, device state and the disk
        # overlay are captured in one pause and only ever restored together, so what
        # the guest's page cache holds is in the snapshot's RAM; a sync would only make
        # the disk alone consistent, which nothing reads (10-20 ms quiet, 70-130 ms
        # loaded, of a turn's path)
        tc = time.perf_counter()
        cap = core._capture_checked(c, stage, vm, keep_paused=False)
        t["capture_ms"] = (time.perf_counter() - tc) * 1000  # the request; pause within
        pause_ms, shadow, changed, base, capture_id, mem_chunk, private, base_file, qemu = (
            core._take_capture(cap)
        )
        t.update(cap)
        t1 = time.perf_counter()
        pm = parent.artifacts["memory"]
        usable = changed is not None and base == parent.id and pm.chunk_size == mem_chunk
        t["memory_dirty_path"] = float(usable)
        if private and not usable:
            core._fill_overlay(shadow, base_file)  # every chunk is read: the base too
        arts: dict[str, Artifact] = {}
        header_arts: dict[str, Any] = {}
        blobs: list[bytes] = []
        for name in core.ARTIFACTS:
            path = shadow if name == "memory" else stage / name
            pa = parent.artifacts[name]
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                cand = set(changed) if name == "memory" and usable else None
                if name == "memory" and cand is None:
                    size = os.fstat(fd).st_size
                    cand = ck.chunks_with_data(ck.data_extents(fd, size), pa.chunk_size)
                    # a chunk the parent had and the file no longer holds is zero now
                    cand |= {i for i, h in enumerate(pa.chunks) if h is not None}
                art, idx, datas = _delta(fd, pa, cand)
            finally:
                os.close(fd)
            arts[name] = art
            header_arts[name] = {
                "size": art.size,
                "chunk_size": art.chunk_size,
                "changed": idx,
                "lengths": [len(b) for b in datas],
            }
            blobs += datas
        t["hash_ms"] = (time.perf_counter() - t1) * 1000
        meta = core._snapshot_meta(vm, base_ref, guest, tag)
        if qemu:  # a private VM restored from it reuses its stream's head: same QEMU only
            meta["qemu"] = qemu
        created = now_iso()
        manifest, _ = build_manifest(
            parent=parent.id, kind=KIND_VM_SNAPSHOT, meta=meta, artifacts=arts, created=created
        )
        header = {
            "id": manifest.id,
            "parent": parent.id,
            "created": created,
            "kind": KIND_VM_SNAPSHOT,
            "meta": meta,
            "vm": vm.id,
            "artifacts": header_arts,
        }
        t2 = time.perf_counter()
        nbytes = _write(mgr.paths, header, blobs)
        t["journal_ms"] = (time.perf_counter() - t2) * 1000
        t["commit_ms"] = t["journal_ms"]  # the local durable point (commit_local_ms)
        t["journal_bytes"] = float(nbytes)
        durable_ms = (time.perf_counter() - t0) * 1000
        failpoints.hit("journal.durable")
        # the shadow equals the journaled snapshot; the VM's next snapshot (which
        # builds on it) finishes the journal first
        vouch_for_shadow(shadow, capture_id, manifest.id)
        # no fsync: the shadow it describes is on tmpfs and does not outlive a crash of
        # the host either (a stale ref only costs the next snapshot its delta)
        write_meta_ref(vm, manifest.id)
        _start(mgr, manifest, stage, parent, vm.id)
        handed_off = True
        return core.SnapshotResult(
            manifest, pause_ms, durable_ms, nbytes, sum(len(b) > 0 for b in blobs), t
        )
    except OSError as e:
        raise StoreError(f"snapshot of {vm.name} failed: {e}", step="journal", path=stage) from e
    finally:
        c.close()
        if not handed_off:
            shutil.rmtree(stage, ignore_errors=True)


def write_meta_ref(vm: VM, snap_id: str) -> None:
    """:func:`torpor.snapshot.core.set_last_snapshot` by atomic rename, without fsync."""
    ref = vm.dir / "snapshot.ref"
    tmp = ref.with_name(f".snapshot.ref.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (snap_id + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, ref)


# -- committing a journal into the store --------------------------------------------


def _record_commit(snap_id: str, t0: float) -> None:
    """What a background commit started at ``t0`` took (:data:`commits`, bounded)."""
    with _threads_lock:
        if len(commits) >= MAX_COMMIT_STATS:
            commits.pop(next(iter(commits)))
        commits[snap_id] = {
            "commit_ms": (time.perf_counter() - t0) * 1000,
            "stored_bytes": float(_stored.pop(snap_id, 0)),
        }


def _forget_committer(snap_id: str) -> None:
    """The calling thread, ``snap_id``'s committer, is done."""
    with _threads_lock:
        if _threads.get(snap_id) is threading.current_thread():
            del _threads[snap_id]
            _manifests.pop(snap_id, None)


def _start(mgr: VMManager, manifest: Manifest, stage: Path, parent: Manifest, vm_id: str) -> None:
    snap_id = manifest.id

    def run() -> None:
        t0 = time.perf_counter()
        try:
            m = finish(mgr.paths, snap_id)
            _record_commit(snap_id, t0)
            if m is not None:  # the staged disk and device state become the hot cache
                from torpor.snapshot import core

                try:
                    core._keep_in_cache(mgr, stage, m, parent, vm_id)
                except OSError as e:
                    log.warning("snapshot %s: hot cache not kept: %s", snap_id[:12], e)
        except Exception as e:  # kept on disk: the next reader finishes it
            log.warning("journal %s: background commit failed: %s", snap_id[:12], e)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            _forget_committer(snap_id)

    th = threading.Thread(target=run, name=f"journal-{snap_id[:12]}", daemon=False)
    with _threads_lock:
        _threads[snap_id] = th
        _manifests[snap_id] = manifest
    th.start()


def wait(snap_id: str) -> None:
    """Wait for this process's background commit of ``snap_id`` (if any)."""
    with _threads_lock:
        th = _threads.get(snap_id)
    if th is not None and th is not threading.current_thread():
        th.join()


def wait_all() -> None:
    """Wait for every background commit of this process."""
    with _threads_lock:
        ths = list(_threads.values())
    for th in ths:
        if th is not threading.current_thread():
            th.join()


def finish(paths: Paths, snap_id: str) -> Manifest | None:
    """Make sure ``snap_id``'s journal (if it has one here) is committed into the
    store and removed; returns the committed manifest, or None if there was no
    journal.  StoreError if the journal cannot be committed (it is kept)."""
    if not pending(paths, snap_id):
        return None
    wait(snap_id)
    path = journal_path(paths, snap_id)
    with locked(paths.locks / f"journal-{snap_id}.lock"):
        if not path.exists():
            return None  # another actor finished it
        try:
            return _commit(paths, snap_id, path)
        except OSError as e:  # kept: the next reader tries again
            raise StoreError(
                f"journal {snap_id[:12]} not committed: {e}", step="journal", path=path
            ) from e


def finish_all(paths: Paths) -> list[str]:
    """Finish every journal of this home (e.g. before snapshots are released)."""
    wait_all()
    d = journal_dir(paths)
    done: list[str] = []
    for j in sorted(d.glob("*.journal")) if d.is_dir() else ():
        snap_id = j.name[: -len(".journal")]
        if finish(paths, snap_id) is not None:
            done.append(snap_id)
    return done


def _finish_orphans(paths: Paths) -> None:
    """Journals left by a process that died before its commit: finished here, so
    none waits forever for a reader (a crash before the log named one leaves an
    unreferenced snapshot, as a crash after a synchronous commit would)."""
    d = journal_dir(paths)
    if not d.is_dir():
        return
    now = time.time()
    for j in d.glob("*.journal"):
        snap_id = j.name[: -len(".journal")]
        with _threads_lock:
            ours = snap_id in _threads
        try:
            old = now - j.stat().st_mtime > ORPHAN_AGE
        except FileNotFoundError:
            continue
        if not ours and old:
            try:
                finish(paths, snap_id)
            except TorporError as e:
                log.warning("journal %s: not committed: %s", snap_id[:12], e)


def _parse(data: bytes, path: Path) -> tuple[dict[str, Any], memoryview]:
    """A journal read whole: its header and a view of its chunk data (not a copy)."""
    header, start = _header(data, len(data), path)
    return header, memoryview(data)[start:]


def _header(head: bytes, size: int, path: Path) -> tuple[dict[str, Any], int]:
    """The header of a journal of ``size`` bytes that begins with ``head`` (at least
    its header's bytes), and the offset its chunk data starts at."""
    bad = StoreError(f"journal {path.name} is damaged", step="journal", path=path)
    if not head.startswith(MAGIC) or len(head) < len(MAGIC) + 8:
        raise bad
    n = int.from_bytes(head[len(MAGIC) : len(MAGIC) + 8], "big")
    start = len(MAGIC) + 8
    if n > MAX_HEADER or start + n > min(len(head), size):
        raise bad
    try:
        header = json.loads(head[start : start + n])
    except ValueError as e:
        raise bad from e
    if not isinstance(header, dict):
        raise bad
    return header, start + n


def _open_header(f: Any, path: Path) -> tuple[dict[str, Any], int, int]:
    """An open journal's header, where its chunk data starts and how long that is."""
    size = os.fstat(f.fileno()).st_size
    pre = f.read(len(MAGIC) + 8)
    n = int.from_bytes(pre[len(MAGIC) :], "big") if len(pre) == len(MAGIC) + 8 else 0
    head = pre + f.read(min(n, MAX_HEADER))
    header, start = _header(head, size, path)
    return header, start, size - start


def _commit(paths: Paths, snap_id: str, path: Path) -> Manifest:
    from torpor.snapshot import core

    failpoints.hit("journal.commit")
    store = core._store(VMManager(paths))
    # the rebuilt files go where staging goes: tmpfs when the host has one, so they
    # never wait on (or add to) disk writeback next to the turns' journal fsyncs
    root = core._stage_roots(VMManager(paths))[0]
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    me = os.getpid()  # named like a stage: reaped by the next snapshot if we die
    work = Path(tempfile.mkdtemp(prefix=f"snap-{me}-{proc_start_time(me)}-journal-", dir=root))
    try:
        with contextlib.suppress(NotFoundError):
            m = store.get(snap_id)
            if m.id == snap_id:  # committed before (a crash after the commit)
                _unlink(path)
                return m
        with open(path, "rb") as jf:  # chunk data copied from it, never held whole
            header, data, data_len = _open_header(jf, path)
            cross_fs = [False]
            if header.get("id") != snap_id:
                raise StoreError(f"journal {path.name} names {header.get('id')!r}", step="journal")
            parent_id = str(header.get("parent"))
            if parent_id != snap_id:
                finish(paths, parent_id)  # a journaled parent is stored first (older: no cycle)
            parent = store.get(parent_id)
            arts: dict[str, Artifact] = {}
            pos = stored = 0
            try:
                items = dict(header["artifacts"]).items()
                for name, a in items:
                    size, cs = int(a["size"]), int(a["chunk_size"])
                    idx, lens = [int(i) for i in a["changed"]], [int(x) for x in a["lengths"]]
                    if len(idx) != len(lens) or size < 0 or not set(core.ARTIFACTS) >= {name}:
                        raise ValueError("bad artifact entry")
                    if ck.chunk_count(size, cs) > len(parent.artifacts[name].chunks) + len(idx):
                        raise ValueError(f"{name}: size {size} past its chunks")  # all listed
                    f = work / name
                    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                    try:
                        os.ftruncate(fd, size)
                        for i, ln in zip(idx, lens, strict=True):
                            if not 0 <= i < ck.chunk_count(size, cs):
                                raise ValueError(f"chunk {i} out of range")
                            off, want = ck.chunk_span(i, size, cs)
                            if ln not in (0, want) or pos + ln > data_len:
                                raise ValueError("chunk out of range")
                            got = copy_range(jf.fileno(), fd, ln, data + pos, cross_fs, off)
                            if got != ln:
                                raise OSError(errno.EIO, "journal: short read")
                            pos += ln
                    finally:
                        os.close(fd)
                    arts[name], st = store.put_file(
                        f, chunk_size=cs, parent=parent.artifacts[name], dirty=idx
                    )
                    stored += st.bytes_stored
            except (KeyError, TypeError, ValueError) as e:
                raise StoreError(f"journal {path.name} is damaged: {e}", step="journal") from e
            if pos != data_len:
                raise StoreError(f"journal {path.name} has trailing data", step="journal")
        m = store.commit(
            arts,
            parent=parent.id,
            kind=str(header["kind"]),
            meta={str(k): str(v) for k, v in dict(header["meta"]).items()},
            created=str(header["created"]),
        )
        if m.id != snap_id:
            # not the snapshot the log names: an unreferenced one, and the journal stays
            raise StoreError(
                f"journal {path.name} rebuilt snapshot {m.id[:12]}, not {snap_id[:12]}",
                step="journal",
            )
        _unlink(path)
        with _threads_lock:
            if snap_id in _threads:  # its thread records it in commits
                _stored[snap_id] = stored + store.manifest_bytes(m.id)
        return m
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# -- restoring straight from a journal ----------------------------------------------

#: ``TORPOR_JOURNAL_RESTORE=0``: a restore of a journaled snapshot commits it first
#: (the behaviour before; benchmarks compare the two).
RESTORE_ENV = "TORPOR_JOURNAL_RESTORE"
#: Largest journal a restore reads into memory (a turn's changed chunks are a few
#: MiB; a larger one, e.g. a whole RAM re-captured, is committed first instead).
MAX_READ = 256 << 20


@dataclass(frozen=True)
class Pending:
    """A snapshot that exists only as a journal, as a restore needs it: its manifest
    (rebuilt, with the journal's id) and the chunks the store does not have yet
    (hash -> bytes; every one hashes to its name, as a store read checks)."""

    manifest: Manifest
    chunks: dict[str, bytes]


def read_pending(paths: Paths, snap_id: str, store: ChunkStore) -> Pending | None:
    """``snap_id``'s journal read for a restore that must not wait for its commit.

    Returns None when there is nothing to read or reading would not help: no
    journal (stored, or another actor finished it meanwhile), this process is
    committing it already (the caller's :func:`finish` waits for that), a journal
    larger than :data:`MAX_READ`, or ``TORPOR_JOURNAL_RESTORE=0``; the caller then
    finishes it first (:func:`finish`) and reads the store.

    The journal is trusted no more than the store: it is read once, into memory,
    under its lock (a committer removes it only under that lock); the chunk list is
    rebuilt from the parent's manifest and the BLAKE3 of the journal's chunk data,
    and the manifest built from it must have the id ``snap_id`` names (BLAKE3 over
    every chunk hash), else StoreError naming the snapshot.  A journaled parent is
    finished first (a chain of crashes: rare).  The journal stays on disk: commit it
    with :func:`commit_behind` once the restored VM runs."""
    from torpor.snapshot import core

    if os.environ.get(RESTORE_ENV) == "0" or not pending(paths, snap_id):
        return None
    with _threads_lock:
        if snap_id in _threads:
            return None
    path = journal_path(paths, snap_id)
    with locked(paths.locks / f"journal-{snap_id}.lock"):
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > MAX_READ:
                    log.debug("journal %s: too large to read, committed first", snap_id[:12])
                    return None
                data = f.read(MAX_READ + 1)
        except FileNotFoundError:
            return None  # committed meanwhile: the store has it
    if len(data) > MAX_READ:
        return None
    header, blob = _parse(data, path)
    refuse = f"snapshot {snap_id[:12]}: its journal {path.name} is damaged"
    if header.get("id") != snap_id:
        raise StoreError(f"{refuse}: it names {header.get('id')!r}", step="journal", path=path)
    parent_id = str(header.get("parent"))
    if parent_id != snap_id:
        finish(paths, parent_id)
    parent = store.get(parent_id)
    arts: dict[str, Artifact] = {}
    chunks: dict[str, bytes] = {}
    pos = 0
    try:
        for name, a in dict(header["artifacts"]).items():
            size, cs = int(a["size"]), int(a["chunk_size"])
            idx, lens = [int(i) for i in a["changed"]], [int(x) for x in a["lengths"]]
            if len(idx) != len(lens) or size < 0 or name not in core.ARTIFACTS:
                raise ValueError("bad artifact entry")
            pa = parent.artifacts[name]
            if pa.chunk_size != cs:
                raise ValueError(f"{name}: chunk size {cs} is not its parent's")
            n = ck.chunk_count(size, cs)
            if n > len(pa.chunks) + len(idx):  # chunks past the parent's are all listed
                raise ValueError(f"{name}: size {size} past its chunks")
            # what the commit's put_file(parent=, dirty=changed) makes of the file the
            # journal rebuilds: a chunk not listed is the parent's where it covers the
            # same bytes, else a hole (zeros)
            hashes: list[str | None] = [
                pa.chunks[i]
                if i < len(pa.chunks) and pa.span(i) == ck.chunk_span(i, size, cs)
                else None
                for i in range(n)
            ]
            for i, ln in zip(idx, lens, strict=True):
                if not 0 <= i < n:
                    raise ValueError(f"chunk {i} out of range")
                want = ck.chunk_span(i, size, cs)[1]
                if ln not in (0, want) or pos + ln > len(blob):
                    raise ValueError("chunk out of range")
                piece = bytes(blob[pos : pos + ln])
                pos += ln
                h = ck.hash_bytes(piece) if ln else None
                if h is not None and h == ck.zero_hash(ln):
                    h = None  # the store keeps a zero chunk as a hole
                if h is not None:
                    chunks[h] = piece
                hashes[i] = h
            arts[name] = Artifact(size, cs, tuple(hashes))
        if pos != len(blob):
            raise ValueError("trailing data")
        m, _ = build_manifest(
            parent=parent.id,
            kind=str(header["kind"]),
            meta={str(k): str(v) for k, v in dict(header["meta"]).items()},
            artifacts=arts,
            created=str(header["created"]),
        )
    except (KeyError, TypeError, ValueError, TorporError) as e:
        raise StoreError(f"{refuse}: {e}", step="journal", path=path) from e
    if m.id != snap_id:
        # a chunk whose bytes were altered (or a header naming other chunks) rebuilds
        # another snapshot: nothing of it is used
        raise StoreError(
            f"{refuse}: its chunks rebuild snapshot {m.id[:12]}, not {snap_id[:12]}",
            step="journal",
            path=path,
        )
    return Pending(m, chunks)


def commit_behind(paths: Paths, manifest: Manifest) -> None:
    """Commit a journal a restore read (:func:`read_pending`) in a thread of this
    process, as a fast snapshot's is: the VM's next snapshot builds on ``manifest``
    without waiting, its own commit waits for this one; the process's exit waits too.
    A failed commit keeps the journal (the next reader finishes it)."""
    snap_id = manifest.id

    def run() -> None:
        t0 = time.perf_counter()
        try:
            finish(paths, snap_id)
            _record_commit(snap_id, t0)
        except Exception as e:  # kept on disk: the next reader finishes it
            log.warning("journal %s: commit behind a restore failed: %s", snap_id[:12], e)
        finally:
            _forget_committer(snap_id)

    th = threading.Thread(target=run, name=f"journal-{snap_id[:12]}", daemon=False)
    with _threads_lock:
        if snap_id in _threads:
            return  # already being committed here
        _threads[snap_id] = th
        _manifests[snap_id] = manifest
        th.start()  # under the lock: a wait() never joins a thread not yet started
