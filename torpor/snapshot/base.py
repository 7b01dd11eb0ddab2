"""What a snapshot needs from its host besides itself: the base disk, kernel and agent.

A VM's disk is a qcow2 overlay over a read-only base disk (an image's
``rootfs.ext4``).  Images are built per host with ``mkfs.ext4`` (a random UUID and
hash seed each time), so two hosts holding "the same" image id hold different bytes,
and an overlay made over one is garbage over the other.  So a snapshot names its
base **by content digest**, never by image id or path, and a host restores it only
over a base with exactly that content.

Base digest: BLAKE3 (hex) of the canonical JSON (sorted keys, no spaces) of the
disk's chunk list as the store writes it — ``{"size", "chunk_size": 262144,
"chunks": [BLAKE3 of each 256 KiB chunk, null for an all-zero one]}``.  A Merkle
digest of the file's bytes: :func:`disk_digest` computes it reading only the
file's data extents (an 8 GiB sparse disk costs its few MB of data), and the
``disk`` artifact of a stored base *is* that chunk list, so a downloaded base is
checked against the digest without hashing it again (and every chunk against its
hash, as every store read is).  Computed once per file and kept in
``images/.bases/known/`` keyed by the file's (device, inode, size, mtime, ctime).

With a bucket store (:class:`~torpor.store.tiered.TieredStore`), the first snapshot
of a VM over a base puts that base into the store: a manifest of kind
``image-base`` with artifacts ``disk`` (the exact ``rootfs.ext4``) and ``image``
(its ``image.json``), meta ``{"digest", "image_id"}`` and a fixed ``created``, so
the same base from the same host is the same manifest id.  Chunks dedupe, zero
chunks cost nothing, and the manifest is MACed like any snapshot's.  Afterwards a
snapshot only checks that the manifest is still there (a local file read, or one
GET): it is never re-uploaded.  The snapshot's meta names ``base_digest`` and
``base_manifest``.  With the plain local store nothing is stored: the base is
already on the only host that can read the store (a store folder copied to another
host still restores there if that host holds a base with the same digest).

Restore (:func:`find_base`) uses, in order: this host's image of the same id if its
digest matches; a base already materialized here (``images/.bases/<digest>/``);
else the stored base, materialized under an exclusive flock per digest (concurrent
restores: one downloads, the others wait and then use it) into a private folder
renamed into place only when complete — so no partial base is ever used — then
made read-only (0400, like an image's disk).  The overlay is rebased onto the path
found (``qemu-img rebase -u``: header only).  Later starts use that path; restores
and wakes look it up by digest again.  ``images/.bases`` lies inside ``images/``
(QEMU's jail binds only backing files there) but is hidden from the image store:
``images``/``rmi``/``system prune`` neither list nor remove it.  :func:`prune`
(run by ``torpor gc``) removes a base no VM of this home uses, once it is older
than the gc grace period (a restore making a VM over it meanwhile is younger).

Kernel and agent: a snapshot records ``kernel_digest`` (BLAKE3 of the kernel file
the VM's QEMU was started with) and ``agent_protocol``.  :func:`check_guest`
runs before anything of a restore or wake is made: a restored RAM image needs the
exact kernel it was taken with, so another kernel is a GuestError naming both
digests; an agent protocol this host cannot speak is a GuestError too.  The
initramfs (agent + modules) is only read at boot — a restored guest already has
its agent in RAM — so an initramfs difference alone is not an error.  Snapshots
made before these fields existed restore as before (base by image id, no check).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from torpor.errors import GuestError, NotFoundError, StoreError, TorporError
from torpor.fsutil import atomic_write_json, fsync_dir, locked, read_json
from torpor.paths import Paths
from torpor.store import chunks as ck
from torpor.store.manifest import Artifact, Manifest, build_manifest

if TYPE_CHECKING:
    from torpor.image.store import Image
    from torpor.store import ChunkStore
    from torpor.vmm.manager import VM, VMManager

BASES = ".bases"  # images/.bases/<digest>/{rootfs.ext4,image.json,base.json}
KIND_IMAGE_BASE = "image-base"
BASE_CREATED = "1970-01-01T00:00:00.000000Z"  # fixed: the same base is the same manifest
DISK = "rootfs.ext4"
IMAGE_JSON = "image.json"
MAX_IMAGE_JSON = 16 << 20  # a stored image.json larger than this is refused
SOURCE = "base.json"  # {"manifest", "image_id"}: where a materialized base came from

_memo: dict[tuple[Any, ...], str] = {}
log = logging.getLogger("torpor.snapshot")


def bases_dir(paths: Paths) -> Path:
    return paths.images / BASES


# -- digests ------------------------------------------------------------------------


def artifact_digest(a: Artifact) -> str:
    """The base digest of a disk stored as ``a`` (see module doc)."""
    body = json.dumps(a.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return ck.hash_bytes(body.encode())


def hash_disk(path: Path, chunk_size: int = ck.DEFAULT_CHUNK_SIZE) -> Artifact:
    """The chunk list ``put_file`` would make of ``path``, without storing anything:
    only data extents are read; all-zero chunks are ``None``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        n = ck.chunk_count(size, chunk_size)
        result: list[str | None] = [None] * n
        with_data = ck.chunks_with_data(ck.data_extents(fd, size), chunk_size)
        todo = sorted(i for i in with_data if i < n)
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            for batch in ck.read_chunks(fd, size, chunk_size, todo):
                hashes = pool.map(ck.hash_bytes, [c.data for c in batch])
                for c, h in zip(batch, hashes, strict=True):
                    if h != ck.zero_hash(len(c.data)):
                        result[c.index] = h
    finally:
        os.close(fd)
    return Artifact(size, chunk_size, tuple(result))


def _blake3_file(path: Path) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _known_path(paths: Paths, what: str, real: str) -> Path:
    name = hashlib.blake2b(f"{what}\0{real}".encode(), digest_size=16).hexdigest()
    return bases_dir(paths) / "known" / f"{name}.json"


def _cached(paths: Paths, what: str, path: Path, compute: Callable[[Path], str]) -> str:
    """``compute(path)``, remembered (in this process and on disk) until the file's
    identity or times change: rewriting or replacing a file changes its ctime, which
    no unprivileged process can set back."""
    real = os.path.realpath(path)
    key = (what, real, *_stat_key(Path(real)))
    got = _memo.get(key)
    if got is not None:
        return got
    rec_path = _known_path(paths, what, real)
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        rec = read_json(rec_path)
        if rec.get("stat") == list(key[2:]) and ck.is_chunk_hash(rec.get("digest")):
            _memo[key] = rec["digest"]
            return str(rec["digest"])
    digest = compute(Path(real))
    if _stat_key(Path(real)) == list(key[2:]):  # unchanged while hashed
        _memo[key] = digest
        with contextlib.suppress(OSError):  # a cache: a read-only home just recomputes
            rec_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_json(rec_path, {"path": real, "stat": list(key[2:]), "digest": digest})
    return digest


def disk_digest(paths: Paths, disk: Path) -> str:
    """The base digest of the disk file ``disk`` (cached; see module doc)."""
    try:
        return _cached(paths, "disk", disk, lambda p: artifact_digest(hash_disk(p)))
    except OSError as e:
        raise StoreError(f"cannot read the base disk: {e}", step="base digest", path=disk) from e


def file_digest(paths: Paths, path: Path) -> str:
    """BLAKE3 of a guest file's bytes (the kernel; cached like :func:`disk_digest`)."""
    try:
        return _cached(paths, "file", path, _blake3_file)
    except OSError as e:
        raise GuestError(f"cannot read {path}: {e.strerror or e}", step="guest digest") from e


def kernel_file(paths: Paths) -> Path:
    """The kernel file QEMU boots on this host (GuestError if none is installed)."""
    from torpor.guest.kernel import installed_kernel

    return installed_kernel(paths).boot_image


def running_kernel(vm: VM) -> Path | None:
    """The kernel file ``vm``'s QEMU was started with (its ``-kernel`` argument), or
    None if that cannot be read (QEMU gone, another argv)."""
    from torpor.vmm.state import alive

    if not alive(vm.state.qemu_pid, vm.state.qemu_start):
        return None
    try:
        with open(f"/proc/{vm.state.qemu_pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        kernel = Path(os.fsdecode(argv[argv.index(b"-kernel") + 1]))
    except (OSError, ValueError, IndexError):
        return None
    return kernel if kernel.is_absolute() and kernel.is_file() else None


def guest_meta(paths: Paths, vm: VM | None = None) -> dict[str, str]:
    """What a snapshot of ``vm`` records about its guest side: the kernel its QEMU
    booted (a kernel installed since then is not the one in its RAM), else this
    host's current one; the agent protocol."""
    from torpor.agent.protocol import PROTOCOL_VERSION

    kernel = (running_kernel(vm) if vm is not None else None) or kernel_file(paths)
    return {
        "kernel_digest": file_digest(paths, kernel),
        "agent_protocol": str(PROTOCOL_VERSION),
    }


def check_guest(paths: Paths, m: Manifest) -> None:
    """GuestError unless this host can run snapshot ``m``'s guest (see module doc)."""
    from torpor.agent.protocol import PROTOCOL_VERSION

    proto = m.meta.get("agent_protocol")
    if proto is not None and proto != str(PROTOCOL_VERSION):
        raise GuestError(
            f"snapshot {m.id[:12]} was taken with guest agent protocol {proto!r}; this "
            f"torpor speaks {PROTOCOL_VERSION}: restore it with a torpor of that version",
            step="restore: check guest",
        )
    want = m.meta.get("kernel_digest")
    if not want:
        return  # taken before kernels were recorded
    kfile = kernel_file(paths)
    have = file_digest(paths, kfile)
    if have != want:
        raise GuestError(
            f"snapshot {m.id[:12]} was taken with guest kernel {want} (BLAKE3), but this "
            f"host boots {have} ({kfile}); a restored RAM image needs the kernel it was "
            "taken with: install that kernel under guest/kernels, or boot a new VM",
            step="restore: check guest",
            path=kfile,
        )


# -- the base of a VM, into the store ------------------------------------------------


@dataclass(frozen=True)
class BaseRef:
    digest: str
    manifest: str  # the store manifest holding it; "" with the plain local store
    uploaded_bytes: int = 0


def vm_backing(mgr: VMManager, vm: VM) -> Path:
    """The base disk under ``vm``'s overlay: a regular file inside this home's images."""
    from torpor.vmm.qcow2 import qcow2_backing

    back = qcow2_backing(vm.files.disk)
    if not back:
        raise StoreError("the VM's disk has no base disk", step="snapshot base", path=vm.files.disk)
    p = Path(os.path.normpath(os.path.join(vm.files.disk.parent, back))).resolve()
    images = mgr.paths.images.resolve()
    st = os.lstat(p)
    if not p.is_relative_to(images) or not stat.S_ISREG(st.st_mode):
        raise StoreError(
            f"the VM's base disk {back!r} is not an image's disk", step="snapshot base", path=p
        )
    return p


def _base_digest_of(mgr: VMManager, disk: Path) -> str:
    parent = disk.parent
    if parent.parent == bases_dir(mgr.paths).resolve() and ck.is_chunk_hash(parent.name):
        return parent.name  # materialized and checked against its name
    return disk_digest(mgr.paths, disk)


def _is_tiered(store: ChunkStore) -> bool:
    from torpor.store.tiered import TieredStore

    return isinstance(store, TieredStore)


def _store_key(store: ChunkStore) -> str:
    return str(getattr(store, "describe", lambda: store.root)())


def _present(store: ChunkStore, mid: str) -> bool:
    """Whether manifest ``mid`` is in the store (not removed).  Not ``resolve_id``:
    for an id not cached here that lists the whole bucket; ``load`` fetches just it."""
    if store.is_removed(mid):
        return False
    path = store.snapshots_dir / f"{mid}.manifest"
    if path.exists():
        return True
    try:
        store.load(path)
    except StoreError:
        return False  # damaged or foreign: store the base again (a new manifest)
    except NotFoundError:
        return False
    return True


def ensure_stored(mgr: VMManager, store: ChunkStore, vm: VM) -> BaseRef:
    """The base of ``vm`` by digest; with a bucket store, also put into the store
    once (see module doc).  Call before the snapshot's own ``put_file``s: the base is
    committed first, so a snapshot is never durable without its base.

    A VM whose base cannot be named (its overlay names no base disk of this home) is
    still snapshotted, without a base: it restores only where its image id does.
    """
    try:
        disk = vm_backing(mgr, vm)
    except (StoreError, OSError) as e:
        log.warning("VM %s: snapshot names no base disk: %s", vm.name, e)
        return BaseRef(vm.config.base_digest, "")
    digest = _base_digest_of(mgr, disk)
    if not _is_tiered(store):
        return BaseRef(digest, "")
    rec_path = _known_path(mgr.paths, "stored", f"{_store_key(store)}\0{digest}\0{disk}")
    candidates: list[str] = []
    for rec in (rec_path, disk.parent / SOURCE):
        with contextlib.suppress(OSError, ValueError, LookupError, TypeError):
            candidates.append(str(read_json(rec)["manifest"]))
    for mid in candidates:
        # written by this home after a commit or a checked materialization: only its
        # presence is checked (a file test, no manifest decode per snapshot), or one GET
        if ck.is_chunk_hash(mid) and _present(store, mid):
            return BaseRef(digest, mid)
    arts: dict[str, Artifact] = {}
    stored = 0
    for name, f in (("disk", disk), ("image", disk.parent / IMAGE_JSON)):
        art, stats = store.put_file(f)
        arts[name] = art
        stored += stats.bytes_stored
    if artifact_digest(arts["disk"]) != digest:
        raise StoreError(
            "the base disk changed while it was being stored", step="snapshot base", path=disk
        )
    meta = {"digest": digest, "image_id": _image_id_of(disk)}
    created: str | None = BASE_CREATED
    same, _ = build_manifest(
        parent=None, kind=KIND_IMAGE_BASE, meta=meta, artifacts=arts, created=created
    )
    if store.is_removed(same.id):
        created = None  # that manifest was removed (force): a removed id never comes back
    m = store.commit(arts, kind=KIND_IMAGE_BASE, meta=meta, created=created)
    with contextlib.suppress(OSError):
        rec_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_json(rec_path, {"manifest": m.id, "digest": digest})
    # what went to the bucket: the cache may already hold the chunks (stored = 0) when
    # this home used another bucket before; uploaded behind (durability local): stored
    last = getattr(store, "last_commit", None)
    sent = last.bytes_uploaded if last is not None and last.durability == "bucket" else stored
    return BaseRef(digest, m.id, sent)


def _image_id_of(disk: Path) -> str:
    """The image id a base disk belongs to: its folder name, or its source's meta."""
    name = disk.parent.name
    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    with contextlib.suppress(OSError, ValueError, AttributeError, KeyError):
        return str(read_json(disk.parent / SOURCE)["image_id"])
    return ""


# -- the base of a snapshot, on this host ---------------------------------------------


def find_base(
    mgr: VMManager,
    digest: str,
    image_id: str,
    store: ChunkStore | None = None,
    manifest_id: str = "",
) -> Path:
    """This host's base disk with content ``digest`` (see module doc for the order),
    materialized from ``store``'s manifest ``manifest_id`` if needed.

    Raises NotFoundError (no base with that digest here and none stored),
    StoreError / ChunkCorruptError (the stored base is damaged: nothing is used).
    """
    if not ck.is_chunk_hash(digest):
        raise StoreError(f"bad base digest {digest!r}", step="restore base")
    with contextlib.suppress(NotFoundError):
        img = mgr.images.get(image_id) if image_id else None
        if img is not None and disk_digest(mgr.paths, img.disk_path) == digest:
            return img.disk_path
    dest = bases_dir(mgr.paths) / digest
    if (dest / DISK).is_file():
        return dest / DISK
    if store is None or not manifest_id:
        raise NotFoundError(
            f"this host has no base disk with digest {digest[:16]} (image "
            f"{image_id[:12] or '?'}), and the snapshot names no stored copy (it was "
            "taken without a bucket store): copy that image's rootfs.ext4 here, or "
            "take the snapshot with TORPOR_STORE=s3://... so its base travels with it",
            step="restore base",
        )
    return _materialize(mgr, store, digest, manifest_id)


def _materialize(mgr: VMManager, store: ChunkStore, digest: str, manifest_id: str) -> Path:
    root = bases_dir(mgr.paths)
    dest = root / digest
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with locked(mgr.paths.locks / f"base-{digest}.lock"):
        if (dest / DISK).is_file():
            return dest / DISK  # another restore made it while we waited
        for old in root.glob(f".tmp-{digest}-*"):  # a dead materializer's (we hold the lock)
            shutil.rmtree(old, ignore_errors=True)
        if not ck.is_chunk_hash(manifest_id):
            raise StoreError(f"bad base manifest id {manifest_id!r}", step="restore base")
        # load, not get: for an id not cached here get lists the whole bucket
        m = store.load(store.snapshots_dir / f"{manifest_id}.manifest")
        if (
            m.kind != KIND_IMAGE_BASE
            or m.meta.get("digest") != digest
            or "disk" not in m.artifacts
            or artifact_digest(m.artifacts["disk"]) != digest
            or ("image" in m.artifacts and m.artifacts["image"].size > MAX_IMAGE_JSON)
        ):
            raise StoreError(
                f"store manifest {manifest_id[:12]} is not the base disk {digest[:16]}",
                step="restore base",
            )
        tmp = root / f".tmp-{digest}-{os.getpid()}"
        tmp.mkdir(mode=0o700)
        try:
            store.materialize(m.artifacts["disk"], tmp / DISK, name="base disk")
            if "image" in m.artifacts:
                store.materialize(m.artifacts["image"], tmp / IMAGE_JSON, name="image.json")
            image_id = m.meta.get("image_id", "")
            atomic_write_json(tmp / SOURCE, {"manifest": m.id, "image_id": image_id})
            for f in tmp.iterdir():
                os.chmod(f, 0o400)
            fsync_dir(tmp)
            os.rename(tmp, dest)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest / DISK


def image_for(mgr: VMManager, image_id: str, disk: Path) -> Image:
    """This host's image ``image_id``, or one made from a stored base's ``image.json``
    (its config: command, env, working dir) when the host has no such image."""
    from torpor.image.config import ImageConfig
    from torpor.image.store import Image

    try:
        return mgr.images.get(image_id)
    except NotFoundError:
        pass
    try:
        meta = read_json(disk.parent / IMAGE_JSON)
        config = ImageConfig.from_json(meta.get("config") or {})
    except (OSError, ValueError, AttributeError, TypeError, TorporError) as e:
        raise StoreError(
            f"the stored base of image {image_id[:12]} has no usable image.json: {e}",
            step="restore base",
            path=disk.parent,
        ) from e
    return Image(
        id=image_id,
        repo_tags=(),
        repo_digests=(),
        created=None,
        size=int(meta.get("size", 0)) if isinstance(meta.get("size", 0), int) else 0,
        disk_path=disk,
        config=config,
        manifest_digest=None,
        layers=(),
    )


def prune(mgr: VMManager, grace_seconds: float) -> list[str]:
    """Remove materialized bases no VM of this home uses and older than the grace
    period; returns their digests."""
    root = bases_dir(mgr.paths)
    if not root.is_dir():
        return []
    gone: list[str] = []
    for d in sorted(root.iterdir()):
        if d.name.startswith(".tmp-"):
            # a materializer holds its digest's lock while its folder exists: if the
            # lock is free, the folder is what a killed one left
            digest = d.name.split("-")[1]
            lock = mgr.paths.locks / f"base-{digest}.lock"
            with contextlib.suppress(OSError), locked(lock, wait=False):
                shutil.rmtree(d, ignore_errors=True)
            continue
        if not ck.is_chunk_hash(d.name):
            continue
        with locked(mgr.paths.locks / f"base-{d.name}.lock"):
            try:
                age = time.time() - d.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < grace_seconds or _in_use(mgr, d):
                continue
            tomb = root / f".tmp-{d.name}-rm-{os.getpid()}"
            os.rename(d, tomb)
            shutil.rmtree(tomb, ignore_errors=True)
            gone.append(d.name)
    return gone


def _in_use(mgr: VMManager, d: Path) -> bool:
    from torpor.vmm.qcow2 import qcow2_backing

    disk = str(d / DISK)
    for vm in mgr.list():
        if vm.config.base_digest == d.name:
            return True
        with contextlib.suppress(OSError, TorporError, ValueError):
            if qcow2_backing(vm.files.disk) == disk:
                return True
    return False
