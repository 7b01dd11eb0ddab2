"""Capture a running VM into the store, and bring a snapshot back as a new VM.

Capture (the VM is paused only for steps 2-4, the *pause window*):

1. the guest agent syncs its filesystems (the disk image is then self-consistent);
2. QMP ``stop``; device state saved with ``x-ignore-shared`` (RAM excluded: it is a file);
3. the RAM file and the disk overlay are copied sparsely (``SEEK_DATA`` +
   ``copy_file_range``) into a staging folder — the VM's memory as of the pause;
4. QMP ``cont`` (or, with ``stop=True``, the VM is ended here: hibernation);
5. each artifact goes into the content-addressed store against the parent snapshot's
   artifact (only changed chunks are compressed and written), then the manifest is
   committed — the *durable* point;
6. the staging folder becomes the hot cache for this snapshot (uncompressed, so a
   restore maps it without decompressing).

Restore creates a new VM folder from the snapshot's recorded config (new id and
name), puts RAM, disk and device state in place from the hot cache or, cold, from the
store (every chunk hash-checked, the manifest MAC-checked before anything reaches
QEMU), and starts a shim in restore mode: QEMU with ``-incoming defer`` loads the
device state over the RAM file and continues where the guest paused.

Version 1 limits, stated plainly: a fork keeps the MAC address recorded in the device
state; the disk overlay refers to its image's base file by absolute path, so a store
copied to another host restores only where the same image is present.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from torpor.errors import ConflictError, TorporError, UsageError
from torpor.fsutil import atomic_write_bytes
from torpor.store import ChunkStore, Manifest
from torpor.vmm import qmp
from torpor.vmm.manager import NAME_RE, VM, RunRequest, VMManager
from torpor.vmm.state import Status, VMConfig, VMState, save_config, save_state

ARTIFACTS = ("memory", "disk", "devstate")


@dataclass(frozen=True)
class SnapshotResult:
    manifest: Manifest
    pause_ms: float
    durable_ms: float
    stored_bytes: int
    new_chunks: int
    timings: dict[str, float] = field(default_factory=dict)


def sparse_copy(src: Path, dst: Path) -> int:
    """Copy ``src`` to ``dst`` keeping holes; returns bytes copied."""
    copied = 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(fi.fileno(), data, os.SEEK_HOLE)
            n = hole - data
            off_in, off_out = data, data
            while n > 0:
                done = os.copy_file_range(fi.fileno(), fo.fileno(), n, off_in, off_out)
                if done == 0:
                    break
                n -= done
                off_in += done
                off_out += done
                copied += done
            pos = hole
        fo.truncate(size)
    return copied


def _store(mgr: VMManager) -> ChunkStore:
    mgr.paths.store.mkdir(parents=True, exist_ok=True)
    return ChunkStore(mgr.paths.store)


def snapshot(
    mgr: VMManager, ref: str, tag: str | None = None, stop: bool = False
) -> SnapshotResult:
    """Snapshot the running VM ``ref``. Raises ConflictError if it is not running."""
    vm = mgr.get(ref)
    if vm.state.status != Status.RUNNING:
        raise ConflictError(
            f"VM {vm.name} is not running ({vm.state.status}); only a running VM can be snapshotted"
        )
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    with mgr.client(vm) as c:
        c.sync()
    t["guest_sync_ms"] = (time.perf_counter() - t0) * 1000
    store = _store(mgr)
    parent: Manifest | None = None
    last = last_snapshot(vm)
    if last:
        with contextlib.suppress(TorporError):
            parent = store.get(last)
    mgr.paths.tmp.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix="snap-", dir=mgr.paths.tmp))
    try:
        pause_ms = asyncio.run(_pause_and_copy(vm, stage, stop, t))
        t1 = time.perf_counter()
        arts = {}
        stored = new = 0
        for name in ARTIFACTS:
            art, stats = store.put_file(
                stage / name, parent=parent.artifacts.get(name) if parent else None
            )
            arts[name] = art
            stored += stats.bytes_stored
            new += stats.chunks_new
        meta = {
            "vm": json.dumps(vm.config.to_json()),
            "main_id": str(vm.state.main_id),
            "accel": vm.state.accel,
            "source_vm": vm.id,
            "tag": tag or "",
        }
        manifest = store.commit(arts, parent=parent.id if parent else None, meta=meta)
        t["store_ms"] = (time.perf_counter() - t1) * 1000
        durable_ms = (time.perf_counter() - t0) * 1000
        cache = mgr.paths.snapshot_cache / manifest.id
        cache.parent.mkdir(parents=True, exist_ok=True)
        if not cache.exists():
            os.rename(stage, cache)
    except BaseException:
        if stop:  # the snapshot failed: a hibernating VM must not stay paused forever
            with contextlib.suppress(TorporError):
                asyncio.run(_resume(vm))
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    set_last_snapshot(vm, manifest.id)
    if stop:
        mgr.end_hibernated(vm.id)
    return SnapshotResult(manifest, pause_ms, durable_ms, stored, new, t)


async def _resume(vm: VM) -> None:
    async with qmp.session(vm.files.qmp_sock) as q:
        await qmp.execute(q, "cont")


async def _pause_and_copy(vm: VM, stage: Path, stop: bool, t: dict[str, float]) -> float:
    async with qmp.session(vm.files.qmp_sock) as q:
        t0 = time.perf_counter()
        await qmp.execute(q, "stop")
        try:
            await qmp.save_devstate(q, stage / "devstate")
            t["devstate_ms"] = (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            t["memory_bytes_copied"] = sparse_copy(vm.files.ram, stage / "memory")
            t["disk_bytes_copied"] = sparse_copy(vm.files.disk, stage / "disk")
            t["copy_ms"] = (time.perf_counter() - t1) * 1000
        finally:
            if not stop:
                await qmp.execute(q, "cont")
        return (time.perf_counter() - t0) * 1000


def restore(mgr: VMManager, snap: str, name: str | None = None, cold: bool = False) -> VM:
    """Bring snapshot ``snap`` back as a new running VM named ``name``."""
    if name is not None and not NAME_RE.match(name):
        raise UsageError(f"invalid VM name {name!r}")
    store = _store(mgr)
    manifest = store.get(snap)
    if set(ARTIFACTS) - set(manifest.artifacts):
        raise UsageError(f"snapshot {manifest.id[:12]} is not a VM snapshot")
    src_cfg = VMConfig.from_json(json.loads(manifest.meta["vm"]))
    # a VM record made through the normal create path (name link, overlay, config)...
    vm = mgr.create(RunRequest.from_config(src_cfg, name))
    try:
        # ...whose memory, disk and device state are then replaced by the snapshot's
        vm = VM(dataclasses.replace(vm.config, image_ref=src_cfg.image_ref), vm.state, vm.dir)
        save_config(vm.dir, vm.config)
        place_snapshot(mgr, store, manifest, vm, cold)
        return mgr.start(vm.id)
    except BaseException:
        with contextlib.suppress(TorporError):
            mgr.remove(vm.id, force=True)
        raise


def last_snapshot(vm: VM) -> str:
    """The snapshot this VM was last captured into or restored from ("" if none)."""
    try:
        return (vm.dir / "snapshot.ref").read_text().strip()
    except FileNotFoundError:
        return ""


def set_last_snapshot(vm: VM, snap_id: str) -> None:
    atomic_write_bytes(vm.dir / "snapshot.ref", (snap_id + "\n").encode(), mode=0o600)


def place_snapshot(
    mgr: VMManager, store: ChunkStore, manifest: Manifest, vm: VM, cold: bool = False
) -> None:
    """Put a snapshot's RAM, disk and device state into ``vm``'s folder for a restore.

    Hot: copied from the uncompressed cache.  Cold (or no cache): materialized from
    the store, every chunk hash-checked.  The next start of the VM restores it.
    """
    cache = mgr.paths.snapshot_cache / manifest.id
    for art, dest in (
        ("memory", vm.files.ram),
        ("disk", vm.files.disk),
        ("devstate", vm.dir / "devstate"),
    ):
        if not cold and (cache / art).exists():
            tmp = dest.with_name(dest.name + ".restoring")
            sparse_copy(cache / art, tmp)
            os.replace(tmp, dest)
        else:
            store.materialize(manifest.artifacts[art], dest, name=art, durable=False)
    main_id = int(manifest.meta.get("main_id", "0"))
    set_last_snapshot(vm, manifest.id)
    save_state(vm.dir, VMState(main_id=main_id))
    atomic_write_bytes(
        vm.dir / "restore.json",
        json.dumps({"devstate": "devstate", "main_id": main_id, "snapshot": manifest.id}).encode(),
    )


def prepare_resume(mgr: VMManager, vm: VM, cold: bool = False) -> None:
    """A hibernated VM starts by restoring its last snapshot in place."""
    store = _store(mgr)
    place_snapshot(mgr, store, store.get(last_snapshot(vm)), vm, cold)
