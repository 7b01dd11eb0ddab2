"""Capture a running VM into the store, and bring a snapshot back as a new VM.

Capture (:func:`snapshot`; the guest is paused only for step 3, the *pause window*):

1. the guest agent syncs its filesystems (the disk image is then self-consistent);
2. the VM's shim is asked to capture (frame CAPTURE, :mod:`torpor.vmm.capture`) — the
   shim owns QEMU, so a capture never depends on this process staying alive;
3. the shim pauses the guest, saves device state (``x-ignore-shared``: RAM is a file
   and not in the stream), brings the VM's *shadow* (tmpfs: guest RAM exactly as of
   its last capture) up to date chunk by chunk, noting which chunks changed, copies
   the disk overlay, and resumes (with ``stop=True`` it stays paused until step 5);
4. the store takes the memory artifact from the shadow — with the shadow's previous
   snapshot as parent, only the changed chunks are read, hashed and compressed —
   and device state and disk from the staging folder; the manifest is committed:
   the *durable* point; the shadow is then vouched for as equal to that snapshot;
5. with ``stop=True`` the VM ends (hibernated) and its memory moves to the on-disk
   cache, freeing host RAM; device state and disk are kept in the cache either way.

A session's turn checkpoint takes steps 1-3 and then, instead of step 4 on its path,
writes the changed chunks to a checkpoint journal (:mod:`torpor.snapshot.journal`):
durable there, stored behind.  :func:`restore`, :func:`fork` and the VM's next
snapshot (its parent) finish a snapshot's pending journal before they use it.

Restore creates a new VM folder from the snapshot's recorded config (new id and
name), puts disk and device state in place (cache, or cold from the store — every
chunk hash-checked, the manifest MAC-checked before anything reaches QEMU), and
starts a shim in restore mode.  The shim copies RAM into the new VM's RAM file while
QEMU starts, from, in order of preference: the on-disk cache (hibernated VMs), a
running VM's shadow that still equals the snapshot (copied under its shared lock),
or this VM's own shadow materialized from the store (cold).  QEMU then loads the
device state over the RAM file and the guest continues where it paused; the new
VM's shadow is initialised from the same source in the background, so its first
capture is already incremental.

Crash safety: a ``kill -9`` of this process at any step leaves the guest running
(the shim resumes it when the capturing client disappears), no partial snapshot
listed (the store's commit protocol), and a staging folder that the next snapshot
reaps.  The shadow's ``snapshot`` tag is cleared before it is modified and set only
after a commit, so a torn capture never passes for an incremental base.

The hot cache is authenticated like the store: every file restored from it (the
cache folder ``cache/snapshots/<id>/`` and a running VM's RAM shadow alike) is
checked against the chunk hashes of the MAC-checked manifest before QEMU or the
guest sees it — device state and disk after their copy into the new VM's private
folder, RAM after the shim's copy into the new VM's RAM file (in the copy thread,
while QEMU starts: :func:`torpor.vmm.capture.copy_shadow_of`).  A copy that does not
match is never used: the restore falls back to the store, and the bad cache files
are rebuilt from the store (``verify`` checks and rebuilds every cache).  What is
checked is the private copy, not the cache file, so changing the cache during the
check gains nothing.  A removed snapshot's cache goes with it (``rm``, ``gc``).

Snapshot references: an id, an id prefix, or a tag (see
:meth:`torpor.store.ChunkStore.get`).

Forks (:func:`fork`) restore in parallel and then give each VM its own hostname and
MAC.  A snapshot names its base disk by content digest, and the guest kernel and
agent protocol it needs; with a bucket store the base itself is stored too, so a host
that never saw the image restores it (:mod:`torpor.snapshot.base`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torpor.agent.client import AgentClient, AgentRequestError
from torpor.errors import (
    AgentError,
    ConflictError,
    NotFoundError,
    StoreError,
    TorporError,
    UsageError,
    VMError,
)
from torpor.fsutil import atomic_write_bytes, locked
from torpor.snapshot import base as bases
from torpor.snapshot import journal
from torpor.store import Artifact, ChunkMissingError, ChunkStore, GcReport, Manifest, PutStats
from torpor.store import chunks as ck
from torpor.store.errors import io_error
from torpor.vmm import basemem
from torpor.vmm.capture import (
    CAPTURE,
    CAPTURE_END,
    CHUNK,
    precopy,
    read_meta,
    remove_shadow,
    sparse_copy,
    unvouch_shadow,
    vouch_for_shadow,
    write_meta,
)
from torpor.vmm.layout import home_ram_dir
from torpor.vmm.manager import NAME_RE, VM, RunRequest, VMManager, check_ports
from torpor.vmm.qcow2 import qcow2_backing
from torpor.vmm.state import (
    PortMap,
    Status,
    VMConfig,
    VMState,
    alive,
    proc_start_time,
    save_state,
    write_synced,
)

ARTIFACTS = ("memory", "disk", "devstate")


@dataclass(frozen=True)
class SnapshotResult:
    manifest: Manifest
    pause_ms: float
    durable_ms: float
    stored_bytes: int
    new_chunks: int
    timings: dict[str, float] = field(default_factory=dict)


def _store(mgr: VMManager) -> ChunkStore:
    """The home's store: local, or a cache in front of ``TORPOR_STORE=s3://...``
    (torpor.store.home: the one way every caller opens it)."""
    from torpor.store.home import home_store

    return home_store(mgr.paths)


log = logging.getLogger("torpor.snapshot")


def _crash_point(phase: str) -> None:
    """Test hook: ``TORPOR_TEST_CRASH=<phase>`` makes this process die by SIGKILL there.

    Phases, in order: ``capture-sent`` (the shim is inside the pause window),
    ``captured``, ``memory-stored``, ``before-commit``, ``committed``.
    """
    if os.environ.get("TORPOR_TEST_CRASH") == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def _stage_roots(mgr: VMManager) -> list[Path]:
    """Where staging folders go: tmpfs first (next to guest RAM), then ``Paths.tmp``."""
    roots = [mgr.paths.tmp]
    shm = home_ram_dir(mgr.paths.root)
    if shm is not None:
        roots.insert(0, shm / "stage")
    return roots


def _stage_dir(mgr: VMManager) -> Path:
    """A staging folder named after this process, so stale ones can be reaped.

    On tmpfs when the host has one: the pause-window copy of guest RAM then never
    waits on disk writeback or journal commits (on ext4 it sometimes took 350 ms
    instead of 55 ms while earlier snapshots were being flushed).
    """
    root = _stage_roots(mgr)[0]
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    me = os.getpid()
    _reap_stale_stages(mgr)
    return Path(tempfile.mkdtemp(prefix=f"snap-{me}-{proc_start_time(me)}-", dir=root))


def _reap_stale_stages(mgr: VMManager) -> None:
    """Remove staging folders whose snapshotting process is gone (kill -9, crash)."""
    for root in _stage_roots(mgr):
        for d in root.glob("snap-*-*-*") if root.is_dir() else ():
            try:
                _, pid, start, _ = d.name.split("-", 3)
                if alive(int(pid), int(start)):
                    continue
            except ValueError:
                continue
            shutil.rmtree(d, ignore_errors=True)


def _log_tail(vm: VM, lines: int = 12) -> str:
    try:
        with open(vm.files.shim_log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError as e:
        return f"  (unreadable: {e})"
    return "\n".join(f"  {line}" for line in tail)


def _capture(c: AgentClient, stage: Path, keep_paused: bool) -> dict[str, float]:
    req = {
        "stage": str(stage),
        "keep_paused": keep_paused,
        "fault": os.environ.get("TORPOR_TEST_FAULT", ""),
    }
    reply = c.request(CAPTURE, json.dumps(req).encode(), timeout=120)
    return json.loads(reply.payload or b"{}")


def _capture_checked(c: AgentClient, stage: Path, vm: VM, keep_paused: bool) -> dict[str, Any]:
    """The shim's capture (the pause window) with its failures as torpor errors."""
    try:
        if os.environ.get("TORPOR_TEST_CRASH") == "capture-sent":
            threading.Timer(0.002, _crash_point, ("capture-sent",)).start()
        cap = _capture(c, stage, keep_paused=keep_paused)
    except AgentRequestError as e:
        if e.errno == errno.EBUSY:
            raise ConflictError(str(e), step="snapshot") from e
        if e.errno == errno.ENOSPC:
            raise StoreError(
                f"no space left for the snapshot's staging copy: {e.remote_message}",
                step="snapshot: copy RAM and disk",
                path=stage,
            ) from e
        raise VMError(
            f"capture of VM {vm.name} failed: {e.remote_message}", step="snapshot: pause"
        ) from e
    except AgentError as e:
        # no answer: the shim went away (QEMU, and so the VM, ended mid-capture) or
        # is stuck; its log says which step it reached
        raise VMError(
            f"capture of VM {vm.name} failed: no answer from its shim ({e}); "
            f"the shim's log ends with:\n{_log_tail(vm)}",
            step="snapshot: pause",
        ) from e
    return cap


def _snapshot_meta(
    vm: VM, base_ref: bases.BaseRef, guest: dict[str, str], tag: str | None
) -> dict[str, str]:
    """A VM snapshot's manifest meta (its config, base disk, guest, source)."""
    cfg = dataclasses.replace(vm.config, base_digest=base_ref.digest)
    return {
        "vm": json.dumps(cfg.to_json()),
        "base_digest": base_ref.digest,
        "base_manifest": base_ref.manifest,
        **guest,
        "main_id": str(vm.state.main_id),
        "accel": vm.state.accel,
        "source_vm": vm.id,
        "tag": tag or "",
    }


def _take_capture(
    cap: dict[str, Any],
) -> tuple[float, Path, Any, Any, Any, int, bool, Path, str]:
    """Take the shim's CAPTURE answer apart; what is left in ``cap`` are timings.

    (pause_ms, shadow, changed chunks, the shadow's base snapshot, capture id, memory
    chunk size, private, base_file, QEMU version).  A private VM's capture
    (torpor.vmm.ramless): the memory file is its overlay, whose holes stand for its base
    (readable at base_file while its shim lives).
    """
    return (
        float(cap.pop("pause_ms")),
        Path(cap.pop("shadow")),
        cap.pop("changed"),
        cap.pop("base_snapshot"),
        cap.pop("capture"),
        int(cap.pop("chunk_size")),
        bool(cap.pop("private", False)),
        Path(str(cap.pop("base_file", ""))),
        str(cap.pop("qemu_version", "")),
    )


def snapshot(
    mgr: VMManager, ref: str, tag: str | None = None, stop: bool = False
) -> SnapshotResult:
    """Snapshot the running VM ``ref``; with ``stop`` the VM ends once it is durable.

    Raises NotFoundError (no such VM), ConflictError (not running, or a snapshot of
    it is already in progress), VMError / AgentError (QEMU or the guest failed during
    capture: the VM keeps running if QEMU is alive), StoreError (the store could not
    be written, e.g. a full disk: nothing is listed, the VM keeps running).
    """
    vm = mgr.get(ref)
    if vm.state.status != Status.RUNNING:
        raise ConflictError(
            f"VM {vm.name} is not running ({vm.state.status}); only a running VM can be snapshotted"
        )
    # one snapshot of a VM at a time: its shadow is read by the store until the commit
    with locked(mgr.paths.locks / f"snap-{vm.id}.lock"):
        return _snapshot(mgr, mgr.get(vm.id), tag, stop)


def _snapshot(mgr: VMManager, vm: VM, tag: str | None, stop: bool) -> SnapshotResult:
    if vm.state.status != Status.RUNNING:
        raise ConflictError(f"VM {vm.name} is not running ({vm.state.status})")
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    store = _store(mgr)
    parent: Manifest | None = None
    last = last_snapshot(vm)
    if last:
        journal.finish(mgr.paths, last)  # a checkpoint still journaled: stored first
        with contextlib.suppress(TorporError):
            parent = store.get(last)
    stage = _stage_dir(mgr)
    c = mgr.client(vm, timeout=30)
    ended = False
    spec: Future[tuple[Artifact, PutStats]] | None = None
    try:
        # the base first (once per base with a bucket store): never a durable snapshot
        # whose base is not stored; before the pause, which it does not lengthen
        tb = time.perf_counter()
        base_ref = bases.ensure_stored(mgr, store, vm)
        guest = bases.guest_meta(mgr.paths, vm)
        t["base_ms"] = (time.perf_counter() - tb) * 1000
        t["base_upload_bytes"] = float(base_ref.uploaded_bytes)
        c.sync()
        t["guest_sync_ms"] = (time.perf_counter() - t0) * 1000 - t["base_ms"]
        if not last:  # a VM's very first capture: its memory put overlaps the pause
            spec = _start_first_put(store, vm, t)
        tc = time.perf_counter()
        cap = _capture_checked(c, stage, vm, keep_paused=stop)
        t["capture_ms"] = (time.perf_counter() - tc) * 1000  # request to the shim's answer
        pause_ms, shadow, changed, base, capture_id, mem_chunk, private, base_file, qemu = (
            _take_capture(cap)
        )
        t.update(cap)
        _crash_point("captured")
        t1 = time.perf_counter()
        arts = {}
        stored = new = 0
        for name in ARTIFACTS:
            pa = parent.artifacts.get(name) if parent else None
            if name != "memory":
                art, stats = store.put_file(stage / name, parent=pa)
            else:
                # only the chunks the shim saw change since the parent are read
                usable = (
                    changed is not None
                    and parent is not None
                    and base == parent.id
                    and pa is not None
                    and pa.chunk_size == mem_chunk
                )
                t["memory_dirty_path"] = float(usable)
                if private and not usable:
                    _fill_overlay(shadow, base_file)  # read whole: the base into its holes
                try:
                    if spec is not None:
                        art, stats = _finish_first_put(
                            store, spec, shadow, mem_chunk, changed, base, private, t
                        )
                        spec = None
                        stored += int(t["memory_spec_stored_bytes"])
                        new += int(t["memory_spec_chunks_new"])
                    else:
                        art, stats = store.put_file(
                            shadow,
                            chunk_size=mem_chunk,
                            parent=pa,
                            dirty=changed if usable else None,
                        )
                except ChunkMissingError:  # a parent chunk vanished: read everything
                    if private:
                        _fill_overlay(shadow, base_file)
                    art, stats = store.put_file(shadow, chunk_size=mem_chunk, parent=pa)
            arts[name] = art
            stored += stats.bytes_stored
            new += stats.chunks_new
            t[f"{name}_hash_s"] = stats.seconds_hashing
            t[f"{name}_compress_s"] = stats.seconds_compressing
            t[f"{name}_put_ms"] = stats.seconds_total * 1000
            t[f"{name}_sync_wait_ms"] = stats.seconds_syncing * 1000
            if name == "memory":
                _crash_point("memory-stored")
        meta = _snapshot_meta(vm, base_ref, guest, tag)
        if qemu:  # a private VM restored from it reuses its stream's head: same QEMU only
            meta["qemu"] = qemu
        _crash_point("before-commit")
        t2 = time.perf_counter()
        manifest = store.commit(arts, parent=parent.id if parent else None, meta=meta)
        t["commit_ms"] = (time.perf_counter() - t2) * 1000
        t |= getattr(store, "last_commit_timings", dict)()  # a bucket: both durable points
        stored += store.manifest_bytes(manifest.id)  # the chunk list is stored too
        t["store_ms"] = (time.perf_counter() - t1) * 1000
        durable_ms = (time.perf_counter() - t0) * 1000
        _crash_point("committed")
        vouch_for_shadow(shadow, capture_id, manifest.id)
        set_last_snapshot(vm, manifest.id)
        if stop and private:  # the hibernation's cache is the whole memory, base included
            _fill_overlay(shadow, base_file)
        if stop:
            c.request(CAPTURE_END, json.dumps({"action": "end"}).encode(), timeout=30)
            ended = True
        t3 = time.perf_counter()
        # a hibernated VM's memory moves to the disk cache: hibernation frees host RAM.
        # Best effort: the snapshot is committed, a restore without a cache is cold.
        try:
            _keep_in_cache(mgr, stage, manifest, parent, vm.id, memory=shadow if stop else None)
        except OSError as e:
            log.warning("snapshot %s: hot cache not kept: %s", manifest.id[:12], e)
            t["cache_error"] = 1
        if stop:
            remove_shadow(shadow)
        t["cache_ms"] = (time.perf_counter() - t3) * 1000
    except OSError as e:
        raise StoreError(f"snapshot of {vm.name} failed: {e}", step="snapshot", path=stage) from e
    finally:
        # closing the connection is what resumes a guest kept paused for a failed
        # hibernation (the shim resumes it when its capturing client leaves)
        with contextlib.suppress(Exception):
            if stop and not ended:
                c.request(CAPTURE_END, json.dumps({"action": "resume"}).encode(), timeout=10)
        c.close()
        if spec is not None:  # a failed snapshot: the store's writer is done before it closes
            with contextlib.suppress(BaseException):
                spec.result()
        store.close()
        shutil.rmtree(stage, ignore_errors=True)
    if stop:
        mgr.end_hibernated(vm.id)
    return SnapshotResult(manifest, pause_ms, durable_ms, stored, new, t)


# A VM's first capture has no shadow: the shim would copy guest RAM into one (the
# pre-copy, guest running), pause, bring it up to date, resume — and only then could
# the store read, hash, compress and write ~134 MB.  Instead the client makes the
# pre-copy itself — the put reads each range of the shadow as soon as the copy is
# past it (chunks.Filling), so hashing and compressing start with the copy, not after
# it — and stores it *while* the shim pauses: the shim then finds a shadow
# (with no snapshot vouched for) and answers with the chunks that differed at the
# pause (``changed``, brought up to date in the shadow); only those are read again,
# the rest come from the speculative put (put_file's dirty path).  Sound because the
# shim writes no shadow chunk outside ``changed``, so every other chunk the
# speculative put read is the pause's; a chunk it read half-updated is in ``changed``
# and re-read (its speculative hash names a whole, unneeded chunk: gc's).  If the shim
# answers anything else (no ``changed``: it made its own pre-copy) the whole shadow is
# put as before.  TORPOR_FIRST_OVERLAP=0 turns it off.
_first_pool = ThreadPoolExecutor(2, thread_name_prefix="torpor-first-put")


def _start_first_put(
    store: ChunkStore, vm: VM, t: dict[str, float]
) -> Future[tuple[Artifact, PutStats]] | None:
    """Pre-copy guest RAM into the (absent) shadow and start storing it; None if this
    VM's capture cannot use it (a shadow exists, RAM is not a plain file)."""
    if os.environ.get("TORPOR_FIRST_OVERLAP", "1") == "0":
        return None
    ram, shadow = vm.files.ram, vm.files.shadow
    put: list[Future[tuple[Artifact, PutStats]]] = []

    def started(extents: list[tuple[int, int]]) -> ck.Filling:
        # the put reads each range of the shadow once the copy is past it
        filling = ck.Filling(extents)
        put.append(_first_pool.submit(store.put_file, shadow, chunk_size=CHUNK, filling=filling))
        return filling

    try:
        if shadow.exists() or not stat.S_ISREG(os.stat(ram).st_mode):
            return None
        t0 = time.perf_counter()
        with contextlib.suppress(FileNotFoundError):
            vm.files.shadow_meta.unlink()  # a stale one must not name a base for the shim
        precopy(ram, shadow, started)  # 0600, holes kept
        t["client_precopy_ms"] = (time.perf_counter() - t0) * 1000
    except OSError as e:  # no room for it, or the VM went: the shim's own path decides
        log.info("first capture of %s: no pre-copy by the client: %s", vm.name, e)
        for f in put:  # failed with the copy (Filling.fail): done before the shadow goes
            with contextlib.suppress(BaseException):
                f.result()
        with contextlib.suppress(OSError):
            shadow.unlink()  # half copied: the shim makes its own
        return None
    return put[0]


def _finish_first_put(
    store: ChunkStore,
    spec: Future[tuple[Artifact, PutStats]],
    shadow: Path,
    mem_chunk: int,
    changed: Any,
    base: Any,
    private: bool,
    t: dict[str, float],
) -> tuple[Artifact, PutStats]:
    """The memory artifact of a first capture whose put started before the pause (see
    above): the speculative artifact with ``changed`` chunks read again."""
    got, sstats = spec.result()
    t["memory_spec_put_ms"] = sstats.seconds_total * 1000
    t["memory_spec_stored_bytes"] = float(sstats.bytes_stored)
    t["memory_spec_chunks_new"] = float(sstats.chunks_new)
    if changed is not None and base is None and not private and got.chunk_size == mem_chunk:
        t["memory_overlap"] = 1.0
        t["memory_chunks_reread"] = float(len(changed))
        return store.put_file(shadow, chunk_size=mem_chunk, parent=got, dirty=changed)
    t["memory_overlap"] = 0.0
    return store.put_file(shadow, chunk_size=mem_chunk)


def _fill_overlay(overlay: Path, base_file: Path) -> None:
    from torpor.vmm.ramless import fill_holes

    try:
        fill_holes(overlay, base_file)
    except OSError as e:
        raise VMError(
            f"cannot read the base of the VM's private memory ({base_file}): {e}",
            step="snapshot: memory",
        ) from e


CACHE_KEEP = 8  # hot caches kept at most (uncompressed RAM + disk: ~100s of MB each)


def _keep_in_cache(
    mgr: VMManager,
    stage: Path,
    manifest: Manifest,
    parent: Manifest | None,
    vm_id: str,
    memory: Path | None = None,
) -> None:
    """The staged copies (device state, disk; ``memory`` if given) become the hot
    cache of ``manifest``; old caches are evicted.  A running VM's memory stays in
    its shadow instead (see :mod:`torpor.vmm.capture`): writing 100s of MB to disk
    after every snapshot was the largest per-snapshot cost.

    The parent's cache goes if the parent was taken from this same VM (a lineage
    only needs its newest snapshot hot); beyond :data:`CACHE_KEEP` the least recently
    used go.  An evicted snapshot still restores, cold, from the store.
    """
    root = mgr.paths.snapshot_cache
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    cache = root / manifest.id
    if not cache.exists():
        try:
            if memory is not None:
                raise OSError("memory is copied below")
            os.rename(stage, cache)
        except OSError:  # the stage is on tmpfs: copy it onto the disk, then rename
            tmp = root / f".{manifest.id}.{os.getpid()}"
            with contextlib.suppress(OSError):
                tmp.mkdir(mode=0o700)
                for f in stage.iterdir():
                    sparse_copy(f, tmp / f.name)
                if memory is not None:
                    sparse_copy(memory, tmp / "memory")
                os.rename(tmp, cache)
            shutil.rmtree(tmp, ignore_errors=True)
    if parent is not None and parent.meta.get("source_vm") == vm_id:
        _drop_cache(root / parent.id)
    aged: list[tuple[float, Path]] = []
    for d in root.iterdir():
        if d.name.startswith("."):
            continue
        try:  # another process may evict (rename) it meanwhile: then it is not ours to age
            st = d.stat()
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            aged.append((st.st_mtime, d))
    aged.sort(reverse=True)
    for _, d in aged[CACHE_KEEP:]:
        _drop_cache(d)


def _drop_cache(d: Path) -> None:
    """Rename first, then delete: a restore never sees half a cache folder."""
    if not d.exists():
        return
    tomb = d.with_name(f".drop-{d.name}-{os.getpid()}")
    with contextlib.suppress(OSError):
        os.rename(d, tomb)
        shutil.rmtree(tomb, ignore_errors=True)


RAM_MISMATCH = "does not match its snapshot"  # the shim's error for a bad cached RAM copy


def _drop_cache_file(f: Path) -> None:
    """Unlink one cached file (a restore holding it open or linked keeps its copy)."""
    with contextlib.suppress(OSError):
        f.unlink()


def _repair_cache_file(cached: Path, good: Path) -> None:
    """Replace a cached file that failed its check with ``good`` (from the store)."""
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.repair")
    try:
        sparse_copy(good, tmp)
        os.replace(tmp, cached)
    except OSError:  # cannot rebuild it: at least never offer it again
        with contextlib.suppress(OSError):
            tmp.unlink()
        _drop_cache_file(cached)


@dataclass(frozen=True)
class CacheCheck:
    """What :func:`verify_caches` found for one cache folder."""

    snapshot: str
    bad: tuple[str, ...] = ()  # artifacts that did not match the manifest
    repaired: bool = False  # rebuilt from the store (else dropped)
    orphan: bool = False  # its snapshot is gone or unreadable: the folder was deleted
    shadow: str = ""  # a running VM's RAM shadow (VM id) that did not match: unvouched


def verify_caches(mgr: VMManager, store: ChunkStore | None = None) -> list[CacheCheck]:
    """Check every hot cache file against its manifest; rebuild bad ones from the
    store (dropped if the store cannot provide them); delete caches whose snapshot
    is gone.  Only problems are returned."""
    root = mgr.paths.snapshot_cache
    if not root.is_dir():
        return []
    own = store is None
    store = store or _store(mgr)
    out: list[CacheCheck] = []
    try:
        live = set(store.ids())
        for d in sorted(root.iterdir()):
            if not d.is_dir() or d.name.startswith("."):
                continue
            try:
                if d.name not in live:
                    raise NotFoundError(f"no snapshot {d.name}")
                m = store.get(d.name)
            except TorporError:  # removed, or damaged: nothing to check the cache against
                _drop_cache(d)
                out.append(CacheCheck(d.name, orphan=True))
                continue
            bad = []
            for f in sorted(d.iterdir()):
                art = m.artifacts.get(f.name)
                try:
                    if art is None or store.check_file(art, f):
                        bad.append(f.name)
                except OSError:
                    bad.append(f.name)
            if not bad:
                continue
            repaired = True
            for name in bad:
                art = m.artifacts.get(name)
                try:
                    if art is None:
                        raise OSError(f"{name} is not an artifact of the snapshot")
                    store.materialize(art, d / name, name=name, durable=False)
                except (OSError, TorporError):
                    _drop_cache_file(d / name)
                    repaired = False
            out.append(CacheCheck(d.name, tuple(bad), repaired))
        out.extend(_verify_shadows(mgr, store))
    finally:
        if own:
            store.close()
    return out


def _verify_shadows(mgr: VMManager, store: ChunkStore) -> list[CacheCheck]:
    """Running VMs' RAM shadows vouched for a snapshot, checked against it (under the
    shadow's shared lock, so no capture changes it meanwhile); one that differs is
    unvouched: no restore uses it and its VM's next capture reads all of RAM."""
    root = home_ram_dir(mgr.paths.root)
    out: list[CacheCheck] = []
    for meta_path in sorted(root.glob("*.shadow.json")) if root is not None else ():
        snap_id = read_meta(meta_path).get("snapshot")
        if not isinstance(snap_id, str) or not snap_id:
            continue
        shadow = meta_path.with_name(meta_path.name[: -len(".json")])
        vm_id = shadow.name.split(".", 1)[0]
        try:
            mem = store.get(snap_id).artifacts["memory"]
        except NotFoundError:
            continue  # removed: nothing restores it, and no capture builds on it
        except (TorporError, KeyError):
            mem = None
        try:
            if mem is None:
                raise KeyError("no memory artifact to check against")
            with locked(shadow.with_name(shadow.name + ".lock"), shared=True):
                if read_meta(meta_path).get("snapshot") != snap_id:
                    continue  # captured meanwhile
                bad = store.check_file(mem, shadow)
        except (TorporError, KeyError, OSError):
            bad = [0]
        if bad:
            unvouch_shadow(shadow, snap_id)
            out.append(CacheCheck(snap_id, ("memory",), shadow=vm_id))
    return out


def remove_snapshot(mgr: VMManager, ref: str, force: bool = False) -> str:
    """Remove snapshot ``ref`` (id, prefix or tag) and its hot cache; returns its id.

    ConflictError if other snapshots build on it, a hibernated VM waits on it, or it
    is a stored base disk (snapshots restore over it on other hosts) (unless
    ``force``); StoreError naming the path if the home is read-only.
    """
    store = _store(mgr)
    try:
        snap_id = store.resolve_id(ref)
        if not force:
            with contextlib.suppress(NotFoundError, StoreError):  # damaged: removable
                if store.get(snap_id).kind == bases.KIND_IMAGE_BASE:
                    raise ConflictError(
                        f"{snap_id[:12]} is a stored base disk: snapshots name it, and "
                        "hosts without that image restore them over it; use force",
                        step="remove snapshot",
                    )
            waiting = [
                v.name
                for v in mgr.list()
                if v.state.status == Status.HIBERNATED and last_snapshot(v) == snap_id
            ]
            if waiting:
                raise ConflictError(
                    f"snapshot {snap_id[:12]} is the hibernation of VM {', '.join(waiting)}"
                    " (it resumes from it); remove the VM first or use force",
                    step="remove snapshot",
                )
        store.remove(snap_id, force=force)
    finally:
        store.close()
    _drop_cache(mgr.paths.snapshot_cache / snap_id)
    basemem.retire(mgr.paths, snap_id)  # its shared base: no new users, gone with the last
    from torpor.vmm import pool

    pool.drain(mgr.paths, snap_id)  # its spare VMs (torpor.vmm.pool)
    return snap_id


def gc(mgr: VMManager, grace_seconds: float) -> GcReport:
    """The store's gc, then the hot caches of snapshots no longer present."""
    store = _store(mgr)
    try:
        r = store.gc(grace_seconds=grace_seconds)
        live = set(store.ids())
    finally:
        store.close()
    bases.prune(mgr, grace_seconds)  # materialized bases no VM here uses
    basemem.retire_missing(mgr.paths, live)  # shared RAM bases of removed snapshots
    root = mgr.paths.snapshot_cache
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and not d.name.startswith(".") and d.name not in live:
                _drop_cache(d)
    return r


def restore(
    mgr: VMManager,
    snap: str,
    name: str | None = None,
    cold: bool = False,
    ports: tuple[PortMap, ...] = (),
    keep_pool: bool = True,
    shared: bool = True,
    labels: Mapping[str, str] | None = None,
) -> VM:
    """Bring snapshot ``snap`` back as a new running VM named ``name``, forwarding
    only ``ports`` (the source may still hold its own: see RunRequest.from_config).
    ``labels``: added to the source's (e.g. torpor's own ``torpor.session``, which a
    copy does not inherit; a pool spare has none, so such a restore takes none).

    A hot restore without ports takes a ready spare of the snapshot when the pool
    has one (:mod:`torpor.vmm.pool`: claim, ``cont``, HELLO) and, with
    ``keep_pool``, asks for the next one.  ``shared=False`` marks a one-off restore
    (a session's recovery restores its checkpoint once): it maps the snapshot's
    shared base if one is already held, but never fills one — the RAM goes straight
    into the VM's own file (see :func:`_shared_base`)."""
    if name is not None and not NAME_RE.match(name):
        raise UsageError(f"invalid VM name {name!r}")
    store = _store(mgr)
    # a checkpoint still journaled (its worker was killed before the store commit):
    # restored from the parent's chunks and the journal's (a recovery's lazily: the
    # lazy server reads the journal too), committed behind once the VM runs.  Where
    # the RAM would be a shared base, which cannot read a journal, or with
    # TORPOR_LAZY_RESTORE=1 (not tried with a journal), it is stored first
    held, asked_cold = None, cold
    if journal.pending(mgr.paths, snap) and _journal_restorable(shared):
        held = journal.read_pending(mgr.paths, snap, store)
    if held is None:
        journal.finish(mgr.paths, snap)
        manifest = store.get(snap)
    else:
        manifest, cold = held.manifest, True  # no cache or shadow vouches for it yet
    if set(ARTIFACTS) - set(manifest.artifacts):
        raise UsageError(f"snapshot {manifest.id[:12]} is not a VM snapshot")
    src_cfg = VMConfig.from_json(json.loads(manifest.meta["vm"]))
    # before anything is made: this host's kernel and agent, and the base disk by digest
    # (materialized from the store if this host lacks it; a damaged one is refused)
    bases.check_guest(mgr.paths, manifest)
    image = None
    if src_cfg.base_digest:
        stored_base = manifest.meta.get("base_manifest", "")
        base_disk = bases.find_base(mgr, src_cfg.base_digest, src_cfg.image_id, store, stored_base)
        image = bases.image_for(mgr, src_cfg.image_id, base_disk)
    pooled = not cold and not ports and not labels
    if pooled:
        from torpor.vmm import pool

        vm = pool.claim(mgr, manifest.id, name)
        if vm is not None:
            if keep_pool:
                pool.want_soon(mgr.paths, manifest.id)
            return vm
    # a VM record made through the normal create path (name link, overlay, config)...
    check_ports(ports)  # a taken port: a clear error before anything is made
    try:
        # the snapshot's image ref and base digest go into the one vm.json write
        req = RunRequest.from_config(src_cfg, name, ports)
        if labels:
            req = dataclasses.replace(req, labels={**req.labels, **labels})
        vm = mgr.create(
            req,
            overlay=False,
            image=image,
            amend={"image_ref": src_cfg.image_ref, "base_digest": src_cfg.base_digest},
        )
    except OSError as e:  # e.g. a read-only home
        raise io_error(e, "restore: create the VM", mgr.paths.root) from e
    try:
        # ...whose memory, disk and device state are then replaced by the snapshot's
        _crash_point("restore-created")
        base = place_snapshot(
            mgr, store, manifest, vm, cold, shared=shared, extra=held.chunks if held else None
        )
        try:
            started = mgr.start(vm.id)
        finally:
            if base is not None:  # the VM's shim holds its own reference by now
                base.close()
        if held is not None:
            journal.commit_behind(mgr.paths, manifest)  # the VM runs: now its commit
            return started
        if pooled and keep_pool:
            pool.want_soon(mgr.paths, manifest.id)  # spares for the next restore
        return started
    except ChunkMissingError as e:
        with contextlib.suppress(TorporError):
            mgr.remove(vm.id, force=True)
        if held is None:
            raise
        # a parent chunk this process could not find (seen: its view of the store's
        # packs lagging another process's writes): the journal committed first, then
        # the store's restore, which reads every chunk again or fails as it would
        log.warning("restore %s from its journal: %s; committed first", manifest.id[:12], e)
        journal.finish(mgr.paths, manifest.id)
        return restore(mgr, manifest.id, name, asked_cold, ports, keep_pool, shared, labels)
    except VMError as e:
        with contextlib.suppress(TorporError):
            mgr.remove(vm.id, force=True)
        if not cold and "changed during the restore" in str(e):
            # the running VM whose memory we copied snapshotted again meanwhile
            return restore(mgr, manifest.id, name, True, ports, shared=shared, labels=labels)
        if not cold and RAM_MISMATCH in str(e):
            # the cached RAM did not match the manifest: never used; the store has it
            _drop_cache_file(mgr.paths.snapshot_cache / manifest.id / "memory")
            return restore(mgr, manifest.id, name, True, ports, shared=shared, labels=labels)
        if not cold and not shared:
            # a one-off restore (lazy by default: a chunk it served was missing or
            # damaged ends QEMU, never wrong bytes): once more in full from the store,
            # which names the bad chunks (ChunkCorruptError) or recovers the VM
            log.warning("restore %s failed (%s): again, in full", manifest.id[:12], e)
            return restore(mgr, manifest.id, name, True, ports, shared=shared, labels=labels)
        raise
    except OSError as e:
        with contextlib.suppress(TorporError):
            mgr.remove(vm.id, force=True)
        raise io_error(e, "restore", vm.dir) from e
    except BaseException:
        with contextlib.suppress(TorporError):
            mgr.remove(vm.id, force=True)
        raise


def _journal_restorable(shared: bool) -> bool:
    """Whether a restore can read a pending journal: its RAM is not a shared base (a
    one-off restore, or shared bases off) and lazy restore is not forced for all."""
    from torpor.vmm import lazymem

    if lazymem.enabled():
        return False
    return not shared or not (basemem.wanted()[0] and basemem.private_capture()[0])


def fork(
    mgr: VMManager,
    snap: str,
    count: int,
    name_prefix: str | None = None,
    cold: bool = False,
    parallel: int = 4,
    ports: tuple[PortMap, ...] = (),
    *,
    identity_by_exec: bool = False,
) -> list[VM]:
    """``count`` independent VMs from one snapshot, restored in parallel.

    Each fork shares nothing writable with the others (own RAM file, own disk
    overlay, own QEMU) and gets its own identity: its hostname becomes its name, a
    networked fork gets its own MAC (``mac_for(id)``, set in the guest too), and the
    shim reseeds every restored guest's RNG with fresh host entropy.  (QEMU 7.2
    accepts ``vmgenid`` on microvm but microvm's ACPI tables do not describe it to
    the guest, and Debian 6.1's cloud kernel has no vmgenid driver, so entropy
    injection is the reseed.)  If any fork fails, the ones already made are removed
    and the first error is raised.  ``identity_by_exec``: set the identity through a
    guest shell as agents before SET_IDENTITY need (``bench fork`` compares the two).
    """
    if count < 1:
        raise UsageError("a fork needs a count of at least 1")
    if ports and count > 1:
        raise UsageError("one host port cannot serve several forks: use -p with -n 1")
    journal.finish(mgr.paths, snap)  # a checkpoint still journaled: stored first
    snap = _store(mgr).resolve_id(snap)  # once: a tag lookup reads every manifest
    names = [f"{name_prefix}-{i}" if name_prefix else None for i in range(1, count + 1)]
    made: list[VM] = []
    errors: list[BaseException] = []

    def one(name: str | None) -> VM:
        vm = restore(mgr, snap, name, cold, ports, keep_pool=False)
        try:
            set_identity(mgr, vm, by_exec=identity_by_exec)
        except BaseException:
            with contextlib.suppress(TorporError):
                mgr.remove(vm.id, force=True)
            raise
        return vm

    with ThreadPoolExecutor(max(1, min(parallel, count))) as ex:
        futures = [ex.submit(one, n) for n in names]
        for f in futures:
            try:
                made.append(f.result())
            except BaseException as e:
                errors.append(e)
    try:
        if errors:
            raise errors[0]
    except BaseException:
        for vm in made:
            with contextlib.suppress(TorporError):
                mgr.remove(vm.id, force=True)
        raise
    return made


#: Seconds a fork's agent has to answer SET_IDENTITY (or the fallback exec to finish).
IDENTITY_TIMEOUT = 30.0


def set_identity(
    mgr: VMManager, vm: VM, timeout: float = IDENTITY_TIMEOUT, by_exec: bool = False
) -> str:
    """Give a restored guest this VM's identity: hostname = name; MAC when networked.

    The agent sets both itself (SET_IDENTITY: no process is started in the guest, so
    the fork does not pay a first exec's fresh TCG translation).  An agent older than
    that request (a snapshot taken before it) answers ENOSYS: then a shell in the
    guest sets them, as before (``by_exec``: the shell at once).  Returns how:
    ``"agent"`` or ``"exec"``.

    Raises UsageError for a name no hostname can be (before anything is sent), and
    AgentError (ProtocolError for an answer that is not the identity asked for) if
    the agent refuses, answers garbage or does not answer within ``timeout``.
    """
    from torpor.agent.protocol import parse_mac
    from torpor.errors import ProtocolError
    from torpor.vmm.boot import mac_for

    mac = mac_for(vm.id) if vm.config.network else ""
    step = "fork: set identity"
    with mgr.client(vm) as c:
        try:
            if not by_exec:
                c.set_identity(
                    vm.name, "eth0" if mac else "", parse_mac(mac) if mac else b"", timeout=timeout
                )
                return "agent"
        except AgentRequestError as e:
            if e.errno != errno.ENOSYS:  # ENOSYS: an agent older than SET_IDENTITY
                raise AgentError(  # the guest's words, clipped: it may send 1 MiB of them
                    f"could not set the identity of fork {vm.name}: {e.remote_message[:300]!r} "
                    f"({errno.errorcode.get(e.errno, e.errno)})",
                    step=step,
                ) from e
        except AgentError as e:
            kind = ProtocolError if isinstance(e, ProtocolError) else AgentError
            raise kind(f"could not set the identity of fork {vm.name}: {e}", step=step) from e
        script = 'echo "$1" > /proc/sys/kernel/hostname'
        args = [vm.name]
        if mac:
            script += ' && (ip link set dev eth0 address "$2" 2>/dev/null || true)'
            args.append(mac)
        r = c.exec(["/bin/sh", "-c", script, "set-identity", *args], timeout=timeout)
    if r.status.code != 0:
        raise AgentError(
            f"could not set the identity of fork {vm.name}: "
            f"{r.stderr[-300:].decode(errors='replace')}",
            step=step,
        )
    return "exec"


def last_snapshot(vm: VM) -> str:
    """The snapshot this VM was last captured into or restored from ("" if none)."""
    try:
        return (vm.dir / "snapshot.ref").read_text().strip()
    except FileNotFoundError:
        return ""


def set_last_snapshot(vm: VM, snap_id: str) -> None:
    atomic_write_bytes(vm.dir / "snapshot.ref", (snap_id + "\n").encode(), mode=0o600)


def _lazy_memory(manifest: Manifest, vm: VM, oneoff: bool = False) -> bool:
    """Whether this restore's memory, which would come whole from the store, is served
    lazily instead (:func:`torpor.vmm.lazymem.enabled`: ``TORPOR_LAZY_RESTORE=1``, or
    by default a one-off restore's).  Unusable FUSE falls back to the full
    materialization, with a warning in the log (asked for) or a debug line (default)."""
    from torpor.vmm import lazymem

    if not lazymem.enabled(oneoff):
        return False
    asked = lazymem.enabled()
    if manifest.artifacts["memory"].size != vm.config.memory_mib << 20:
        log.warning("restore %s: not lazy: memory size differs from the VM's", manifest.id[:12])
        return False
    why = lazymem.available()
    if why is not None:
        (log.warning if asked else log.debug)(
            "restore %s: lazy restore unavailable (%s): all of its memory is read from "
            "the store first",
            manifest.id[:12],
            why,
        )
        return False
    return True


def _lazy_instead(mgr: VMManager, manifest: Manifest, vm: VM, cold: bool) -> bool:
    """A restore with no hot copy of the memory (no cache file, no equal shadow) is
    lazy rather than filling a shared base from the store, when lazy restore is on."""
    from torpor.vmm import lazymem

    if not lazymem.enabled():
        return False
    if not cold and (
        (mgr.paths.snapshot_cache / manifest.id / "memory").exists()
        or find_shadow(mgr, manifest.id) is not None
    ):
        return False
    return _lazy_memory(manifest, vm)


def place_snapshot(
    mgr: VMManager,
    store: ChunkStore,
    manifest: Manifest,
    vm: VM,
    cold: bool = False,
    memory_checked: bool = False,
    shared: bool = True,
    extra: Mapping[str, bytes] | None = None,
) -> basemem.Base | None:
    """Put a snapshot's RAM, disk and device state into ``vm``'s folder for a restore.

    Hot: copied from the uncompressed cache.  Cold (or no cache): materialized from
    the store, every chunk hash-checked.  The next start of the VM restores it.
    RAM: the snapshot's shared sealed base when one can be had (returned: hold it
    until the VM is started, then close it — the VM's shim holds its own), else a
    copy made by the shim.  ``extra``: chunks of a snapshot still journaled
    (:func:`torpor.snapshot.journal.read_pending`; with ``cold``), read with the
    store's.
    """
    cache = mgr.paths.snapshot_cache / manifest.id
    mem = manifest.artifacts["memory"]
    info: dict[str, object] = {"ram_size": mem.size}
    own = vm.files.shadow
    base = _shared_base(mgr, store, manifest, vm, cold, shared)
    foreign = None if cold or base is not None else find_shadow(mgr, manifest.id)
    if base is not None:
        # 0. the snapshot's sealed base (torpor.vmm.basemem), mapped private by QEMU:
        # nothing copied; checked against the manifest when it was filled
        remove_shadow(own)
        info["ram_private"] = True
        info["ram_base"] = {"snapshot": manifest.id, "size": mem.size, "ino": base.ino}
        info["ram_snapshot"] = manifest.id
        basemem.note_base(vm.dir, manifest.id)  # what its overlay's holes will stand for
    # else RAM is copied by the shim while QEMU starts (launch._copy_job), from:
    elif not cold and (cache / "memory").exists():
        # 1. the disk cache of a hibernation; a hard link pins it against eviction.
        # Its meta names the snapshot so the shim's copy is checked against it, and
        # marks it one-shot: gone once it has also seeded this VM's shadow.
        src = vm.dir / "ram.src"
        remove_shadow(src)
        try:
            os.link(cache / "memory", src)
        except OSError:  # another filesystem: copy now
            sparse_copy(cache / "memory", src)
        info["ram_from"] = src.name
        if not memory_checked:  # (a wake checked the cache file itself: one pass, not two)
            write_meta(
                src.with_name(src.name + ".json"),
                {"snapshot": manifest.id, "store": str(store.root), "once": True},
            )
            info["ram_snapshot"] = manifest.id
    elif foreign is not None and foreign != own:
        # 2. a running VM's shadow that still equals the snapshot (copied under its lock)
        info["ram_from"] = str(foreign)
        info["ram_snapshot"] = manifest.id
    elif extra is not None and _journaled_shadow(mgr, store, manifest, own):
        # 2b. a snapshot still journaled: no shim can check a copy against a manifest
        # the store does not have yet, so the VM's shadow that equals it (the killed
        # worker's VM's) is copied and checked against the journal's manifest here
        write_meta(vm.files.shadow_meta, {"snapshot": manifest.id, "capture": None})
        info["ram_from"] = str(own)
        info["shadow_ready"] = True
    elif foreign is None and _lazy_memory(
        manifest, vm, oneoff=not shared and (not cold or extra is not None)
    ):
        # 3a. lazy: the shim serves the store's chunks (hash-checked) through a FUSE
        # file that QEMU maps private (torpor.vmm.lazymem); nothing materialized here.
        # By default a recovery's (one-off, not asked cold): its checkpoint is restored
        # once and captured again soon.  A checkpoint still journaled (``extra``): the
        # server reads the journal itself before QEMU's first read is answered
        remove_shadow(own)
        info["lazy"] = {"snapshot": manifest.id, "size": mem.size}
        info["ram_private"] = True
    elif foreign is None:
        # 3. cold: the store's chunks (hash-checked) into this VM's own shadow
        remove_shadow(own)
        store.materialize(mem, own, name="memory", durable=False, extra=extra)
        write_meta(vm.files.shadow_meta, {"snapshot": manifest.id, "capture": None})
        info["ram_from"] = str(own)
        info["shadow_ready"] = True
    else:  # our own shadow already is the snapshot (checked while the shim copies it)
        info["ram_from"] = str(own)
        info["ram_snapshot"] = manifest.id
        info["shadow_ready"] = True
    for art, dest in (
        ("disk", vm.files.disk),
        ("devstate", vm.dir / "devstate"),
    ):
        if not cold and (cache / art).exists():
            # the private copy is what is checked, and what QEMU gets
            tmp = dest.with_name(dest.name + ".restoring")
            sparse_copy(cache / art, tmp)
            if not store.check_file(manifest.artifacts[art], tmp):
                os.replace(tmp, dest)
                continue
            tmp.unlink()
            store.materialize(manifest.artifacts[art], dest, name=art, durable=False)
            _repair_cache_file(cache / art, dest)
        else:
            store.materialize(manifest.artifacts[art], dest, name=art, durable=False, extra=extra)
    if not cold and cache.exists():
        with contextlib.suppress(OSError):
            os.utime(cache)  # recently used: evicted last
    rebase_disk(mgr, vm, store, manifest)
    main_id = int(manifest.meta.get("main_id", "0"))
    # snapshot.ref and restore.json: contents fsync'd (never torn), the folder not;
    # state.json: renamed over create's (or a hibernation's) without fsync.  A host
    # crash may roll each back to what it was — the VM a crash right after `create`
    # leaves (listed, CREATED, nothing to restore) or, on a wake, the hibernated VM
    # (same snapshot): never a state an earlier crash could not show
    write_synced(vm.dir / "snapshot.ref", (manifest.id + "\n").encode())
    save_state(vm.dir, VMState(main_id=main_id), synced=False)
    info |= {"devstate": "devstate", "main_id": main_id, "snapshot": manifest.id}
    # the QEMU that wrote the device state: a private VM reuses its head (ramless)
    info["devstate_qemu"] = manifest.meta.get("qemu", "")
    fault = os.environ.get("TORPOR_TEST_FAULT", "")
    if fault:
        info["fault"] = fault
    write_synced(vm.dir / "restore.json", json.dumps(info).encode())
    _crash_point("restore-placed")
    return base


def _journaled_shadow(mgr: VMManager, store: ChunkStore, manifest: Manifest, own: Path) -> bool:
    """Copy a VM shadow equal to ``manifest`` (a snapshot still journaled) into ``own``
    under its lock and check it against the manifest's memory chunk hashes, as the
    shim checks a copy; False (``own`` removed) if there is none or it does not match."""
    src = find_shadow(mgr, manifest.id)
    if src is None or src == own:
        return False
    remove_shadow(own)
    try:
        with locked(src.with_name(src.name + ".lock"), shared=True):
            if read_meta(src.with_name(src.name + ".json")).get("snapshot") != manifest.id:
                return False  # captured again meanwhile
            sparse_copy(src, own)
        bad = store.check_file(manifest.artifacts["memory"], own)
    except OSError as e:  # its VM removed meanwhile: the chunks instead
        log.debug("restore %s: shadow %s not copied: %s", manifest.id[:12], src, e)
        bad = [0]
    if bad:
        log.warning("restore %s: shadow %s does not match; not used", manifest.id[:12], src)
        remove_shadow(own)
        return False
    return True


def _shared_base(
    mgr: VMManager, store: ChunkStore, manifest: Manifest, vm: VM, cold: bool, shared: bool = True
) -> basemem.Base | None:
    """The snapshot's sealed shared base for this restore, or None for the copy path.

    The copy path stays for: ``TORPOR_RAM_BASE=0``; a kernel without sealable memfds;
    a snapshot whose memory size is not the VM's RAM size; and while the RAM-less
    capture of private VMs is not available (:func:`basemem.private_capture`) — a VM
    restored onto a base must stay snapshottable.

    A one-off restore (``shared=False``: a session's recovery) maps a base only if its
    holder is already running (a reference: nothing copied).  It never fills one: a
    fill is the copy the copy path makes plus a second copy into the memfd, the
    allocation of every zero page and a holder process, for memory that nothing else
    will map (at N = 10 the recovery's restore took 0.3-0.55 s longer through a base,
    docs/thesis.md session 7).  The copy path checks the same chunk hashes."""
    if _lazy_instead(mgr, manifest, vm, cold):
        return None  # the base would be filled from the store: served lazily instead
    ok, why = basemem.wanted()
    if ok:
        ok, why = basemem.private_capture()
    if ok and manifest.artifacts["memory"].size != vm.config.memory_mib << 20:
        ok, why = False, "memory size differs from the VM's"
    # lazy restore (torpor.vmm.lazymem, opt-in) serves memory that would come from the
    # store: it wins over a base that only the store could fill
    lazy = os.environ.get("TORPOR_LAZY_RESTORE", "") == "1"
    if ok and lazy and (cold or basemem.hot_source(mgr.paths, manifest.id) is None):
        ok, why = False, "a lazy restore from the store (TORPOR_LAZY_RESTORE=1)"
    if not ok:
        log.debug("restore %s: RAM copied (%s)", manifest.id[:12], why)
        return None
    if not shared:
        size = manifest.artifacts["memory"].size
        try:
            b = basemem.connect(mgr.paths, manifest.id, size)
        except basemem.BaseUnavailable:
            log.debug("restore %s: one-off, no base held; RAM copied", manifest.id[:12])
            return None
        if not cold or b.filled_from == "store":
            return b
        b.close()  # cold: only a base filled from the store will do (as acquire)
        return None
    try:
        return basemem.acquire(mgr.paths, store, manifest, cold=cold)
    except basemem.BaseUnavailable as e:
        log.warning("restore %s: no shared base (%s); RAM copied", manifest.id[:12], e)
        return None


def find_shadow(mgr: VMManager, snap_id: str) -> Path | None:
    """A VM shadow of this home (see :mod:`torpor.vmm.capture`) equal to ``snap_id``."""
    return basemem.find_shadow(mgr.paths, snap_id)


def rebase_disk(
    mgr: VMManager, vm: VM, store: ChunkStore | None = None, manifest: Manifest | None = None
) -> None:
    """Point the restored overlay at this host's base disk with the snapshot's digest.

    A snapshot's overlay names its base by the absolute path it had where it was
    taken; on another ``TORPOR_HOME`` or host that path is wrong.  The base is found
    by content digest (:func:`torpor.snapshot.base.find_base`: this host's image if
    its bytes match, else the base stored with the snapshot), so an unsafe rebase
    (``qemu-img rebase -u``), which rewrites only the header, is right: the content is
    the same, only its path differs.  Snapshots older than the digest: by image id.
    """
    meta = manifest.meta if manifest is not None else {}
    digest = vm.config.base_digest or meta.get("base_digest", "")
    if digest:
        base = bases.find_base(
            mgr, digest, vm.config.image_id, store, meta.get("base_manifest", "")
        )
    else:
        base = mgr.images.get(vm.config.image_id).disk_path
    if qcow2_backing(vm.files.disk) == str(base):
        return
    r = subprocess.run(
        [
            "qemu-img",
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            str(base),
            str(vm.files.disk),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise VMError(
            f"qemu-img rebase failed: {r.stderr.strip()}", step="restore disk", path=vm.files.disk
        )


def prepare_resume(mgr: VMManager, vm: VM, cold: bool = False) -> None:
    """A hibernated VM starts by restoring its last snapshot in place."""
    store = _store(mgr)
    m = store.get(last_snapshot(vm))
    bases.check_guest(mgr.paths, m)  # before the wake changes anything
    mem = mgr.paths.snapshot_cache / m.id / "memory"
    checked = False
    # a shared base checks its own copy of the cache and skips a bad one (basemem)
    bases_on = basemem.wanted()[0] and basemem.private_capture()[0]
    if not cold and mem.exists() and not bases_on:
        # checked here, not in the shim's copy: a bad cache must make this wake come
        # from the store, not fail it (the file is then hard-linked: a writer racing
        # the wake could still change it, as it could change the VM's own disk)
        with contextlib.suppress(OSError):
            checked = not store.check_file(m.artifacts["memory"], mem)
        if not checked:
            _drop_cache_file(mem)
    base = place_snapshot(mgr, store, m, vm, cold, memory_checked=checked)
    if base is not None:  # the holder keeps it for the start that follows (or re-fills)
        base.close()
