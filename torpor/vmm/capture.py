"""The pause window of a snapshot, run by the VM's shim (the owner of QEMU).

Role: pause the guest, save its device state (QMP, ``x-ignore-shared``: RAM is a
file and not in the stream), copy the RAM file and the disk overlay into a staging
folder, and resume — all inside the shim, at the request of a client on
``agent.sock`` (frame :data:`CAPTURE`).

Why the shim and not the CLI: a VM must never stay paused because the process that
paused it died.  The shim outlives its clients, so ``kill -9`` of ``torpor
snapshot`` mid-capture cannot leave a stopped guest behind: the shim finishes the
window and resumes.  With ``keep_paused`` (hibernation: the VM ends once the
snapshot is durable) the guest stays paused only while the requesting client stays
connected; if it goes away first, the shim resumes the guest (see
:class:`~torpor.vmm.shim.Shim`).  If the shim itself dies, QEMU dies with it
(``PR_SET_PDEATHSIG``): clearly dead, never stuck.

Wire format (shim-local frame types, like ATTACH and STOP; the guest never sees
them): CAPTURE carries JSON ``{"stage": str, "keep_paused": bool, "fault": str}``
and is answered by OK with JSON timings (``pause_ms``, ``devstate_ms``,
``copy_ms``, ``memory_bytes_copied``, ``disk_bytes_copied``) or ERROR.
CAPTURE_END carries JSON ``{"action": "resume" | "end"}``.  ``fault`` is a test
hook (``kill-qemu-in-pause``) so tests can kill QEMU inside the window.

Restores copy RAM from a shadow (or a hibernation's cached RAM) with
:func:`copy_shadow_of`, which checks the *copy* against the snapshot's MAC-checked
manifest before QEMU loads device state over it: a shadow or cache file that was
damaged or altered never reaches a guest (the restore then comes from the store).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import mmap
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torpor.fsutil import locked

log = logging.getLogger("torpor.shim")

CAPTURE = 0x22
CAPTURE_END = 0x23
# a VM whose guest RAM is mapped private (share=off over a shared base) can be
# captured: by the RAM-less capture (torpor.vmm.ramless), never from its RAM file.
# Restores map shared bases only where this holds (torpor.vmm.basemem.private_capture)
PRIVATE_CAPTURE = True
# a restore copying this VM's shadow holds its lock shared for one copy (seconds); a
# capture waits at most this long for it, then fails naming the lock, never hangs
SHADOW_LOCK_TIMEOUT = 60.0
# Guest RAM is compared, and stored, in 64 KiB chunks. A turn dirties pages sparsely
# all over memory, so smaller chunks store less (stored per turn, 30-turn session:
# 256 KiB 1515 KB, 64 KiB 721 KB, 16 KiB 363 KB, 4 KiB 197 KB), but each snapshot's
# manifest lists every chunk (256 KiB: 24 KB, 64 KiB: 85 KB, 16 KiB: 333 KB, 4 KiB:
# 1.3 MB per snapshot) and per-chunk work grows (durable 115 / 136 / 211 / 463 ms).
# 64 KiB halves what a turn stores for ~20 ms; 16 KiB would save 14 % more for ~75 ms.
CHUNK = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcmp.restype = ctypes.c_int
_libc.memmove.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memmove.restype = ctypes.c_void_p


def read_meta(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_bytes())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def write_meta(path: Path, d: dict[str, Any]) -> None:
    """Atomic replace (the shadow lives on tmpfs: no fsync, it does not outlive a reboot)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _new_private_file(tmp)  # 0600 whatever the caller's umask (a library user's: 022)
    tmp.write_text(json.dumps(d))
    os.replace(tmp, path)


def _data_chunks(fd: int, size: int, chunk: int) -> set[int]:
    out: set[int] = set()
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.update(range(start // chunk, (end - 1) // chunk + 1))
        pos = end
    return out


MADV_POPULATE_READ = 22  # Linux 5.14; not exported by Python's mmap module


class ShadowSync:
    """Keeps guest RAM and its shadow mapped in the shim between captures.

    Fresh mappings cost a page fault per 4 KiB page touched (~50 ms for 130 MB
    here), which would land inside the pause window; so the mappings live as long
    as the VM, and :meth:`prepare` (before the pause) pre-faults the ranges holding
    data with ``MADV_POPULATE_READ`` (read, so a disk-backed file is not dirtied).
    :meth:`sync` (inside the pause) is then one ``memcmp`` per chunk, and a
    ``memmove`` for those that differ.
    """

    def __init__(self, ram: Path, shadow: Path, chunk: int = CHUNK) -> None:
        self.ram, self.shadow, self.chunk = ram, shadow, chunk
        self._key: tuple[int, int, int] | None = None
        self._maps: list[mmap.mmap] = []
        self._fds: list[int] = []
        self._addr = (0, 0)
        self._ptrs: list[Any] = []

    def close(self) -> None:
        self._ptrs.clear()
        for m in self._maps:
            with contextlib.suppress(BufferError):
                m.close()
        for fd in self._fds:
            os.close(fd)
        self._maps, self._fds, self._key = [], [], None

    def _open(self) -> None:
        size = os.stat(self.ram).st_size
        st = os.stat(self.shadow) if self.shadow.exists() else None
        key = (size, os.stat(self.ram).st_ino, st.st_ino if st else 0)
        if key == self._key and st is not None and st.st_size == size:
            return
        self.close()
        fr = os.open(self.ram, os.O_RDWR | os.O_CLOEXEC)  # RDWR only for ctypes addresses
        fs = os.open(self.shadow, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fds = [fr, fs]
        if os.fstat(fs).st_size != size:
            os.ftruncate(fs, size)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        self._maps = [mmap.mmap(fd, size, mmap.MAP_SHARED, prot) for fd in self._fds]
        self._ptrs = [ctypes.c_char.from_buffer(m) for m in self._maps]
        self._addr = (ctypes.addressof(self._ptrs[0]), ctypes.addressof(self._ptrs[1]))
        self._key = (size, os.fstat(fr).st_ino, os.fstat(fs).st_ino)
        self.size = size

    def _chunks(self) -> list[int]:
        return sorted(
            _data_chunks(self._fds[0], self.size, self.chunk)
            | _data_chunks(self._fds[1], self.size, self.chunk)
        )

    def prepare(self) -> None:
        """Map (once) and pre-fault the data ranges; call before pausing."""
        self._open()
        for m, fd in zip(self._maps, self._fds, strict=True):
            pos = 0
            while pos < self.size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = min(os.lseek(fd, start, os.SEEK_HOLE), self.size)
                lo = start & ~(mmap.PAGESIZE - 1)
                with contextlib.suppress(OSError, ValueError):
                    m.madvise(MADV_POPULATE_READ, lo, end - lo)
                pos = end

    def sync(self) -> list[int]:
        """Make the shadow equal RAM; return the indexes of the chunks that differed."""
        self._open()
        idx = self._chunks()
        if not idx:
            return []
        a, b, size, chunk = self._addr[0], self._addr[1], self.size, self.chunk

        def part(ids: list[int]) -> list[int]:
            changed = []
            for i in ids:
                off = i * chunk
                n = min(chunk, size - off)
                if _libc.memcmp(a + off, b + off, n):
                    _libc.memmove(b + off, a + off, n)
                    changed.append(i)
            return changed

        half = len(idx) // 2
        with ThreadPoolExecutor(2) as ex:  # ctypes calls release the GIL
            parts = list(ex.map(part, [idx[:half], idx[half:]]))
        return parts[0] + parts[1]


def copy_range(
    fi: int, fo: int, n: int, off: int, cross_fs: list[bool], dst_off: int | None = None
) -> int:
    """Copy ``n`` bytes at ``off`` to ``dst_off`` (default: the same offset); returns
    the bytes copied (fewer at the source's end).  copy_file_range, or sendfile across
    filesystems (``cross_fs[0]`` remembers which, for the caller's next range)."""
    dst = off if dst_off is None else dst_off
    done_total = 0
    while n > 0:
        if not cross_fs[0]:
            try:
                done = os.copy_file_range(fi, fo, n, off, dst)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                cross_fs[0] = True  # e.g. tmpfs RAM file -> ext4 stage folder
                continue
        else:
            os.lseek(fo, dst, os.SEEK_SET)
            done = os.sendfile(fo, fi, off, n)
        if done == 0:
            break
        n -= done
        off += done
        dst += done
        done_total += done
    return done_total


def _new_private_file(path: Path) -> None:
    """``path`` as an empty 0600 file (created, or truncated and made 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def sparse_copy(src: Path, dst: Path, *, into_existing: bool = False) -> int:
    """Copy ``src`` to ``dst`` keeping holes; returns bytes copied.

    ``into_existing`` writes into ``dst`` without truncating it first: the file may
    already be mapped by QEMU (a restore copies RAM while QEMU starts), and shrinking
    a mapped file would fault the mapping.  A file it creates is 0600 whatever the
    caller's umask (guest RAM, disk and device state: the CLI's umask is 077, a
    library caller's often 022).
    """
    if not into_existing:
        _new_private_file(dst)
    with open(src, "rb") as f_in, open(dst, "r+b") as f_out:
        fi, fo = f_in.fileno(), f_out.fileno()
        size = os.fstat(fi).st_size
        copied = _copy_extents(fi, fo, _data_extents(fi, size))
        f_out.truncate(size)
    return copied


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of ``fd`` holding data (SEEK_DATA / SEEK_HOLE)."""
    extents = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        extents.append((data, min(hole, size)))
        pos = hole
    return extents


def _copy_extents(fi: int, fo: int, extents: list[tuple[int, int]]) -> int:
    cross_fs = [False]
    return sum(copy_range(fi, fo, b - a, a, cross_fs) for a, b in extents)


PRECOPY_PIECE = 4 << 20  # how far a pre-copy gets between two reports of its progress


def precopy(
    ram: Path, shadow: Path, started: Callable[[list[tuple[int, int]]], Any]
) -> tuple[int, Any]:
    """Copy ``ram``'s data into a new 0600 ``shadow`` of the same size, front to back,
    telling a reader how far it got (a first capture's client stores the copy while
    it is made: :func:`torpor.snapshot.core._start_first_put`).

    ``started(extents)`` is called once the shadow exists at its full size (holes) and
    the data ranges to be copied are known; it returns a :class:`torpor.store.chunks.
    Filling`-like object whose ``advance(offset)`` is called as the copy passes
    ``offset`` and ``finish()`` at the end (``fail(error)`` if it fails, then the error
    is raised).  Returns (bytes copied, what ``started`` returned).
    """
    _new_private_file(shadow)
    with open(ram, "rb") as f_in, open(shadow, "r+b") as f_out:
        fi, fo = f_in.fileno(), f_out.fileno()
        size = os.fstat(fi).st_size
        f_out.truncate(size)  # before anyone reads it: a reader's view of its size is final
        extents = _data_extents(fi, size)
        filling = started(extents)
        try:
            cross_fs = [False]
            copied = 0
            for a, b in extents:
                for off in range(a, b, PRECOPY_PIECE):
                    end = min(off + PRECOPY_PIECE, b)
                    copied += copy_range(fi, fo, end - off, off, cross_fs)
                    filling.advance(end)
        except BaseException as e:
            filling.fail(e)
            raise
        filling.finish()
    return copied, filling


async def pause_and_copy(
    qmp_sock: Path,
    ram: Path,
    disk: Path,
    stage: Path,
    shadow: Path,
    sync: ShadowSync,
    *,
    keep_paused: bool,
    fault: str = "",
    qemu_pid: int = 0,
) -> dict[str, Any]:
    """The pause window: stop, device state, RAM into the shadow, disk copy, cont.

    Guest RAM is not copied whole: the VM's *shadow* (RAM as of its last capture,
    on tmpfs) is brought up to date chunk by chunk, and the chunks that changed are
    returned (``changed``) along with the committed snapshot the shadow equalled
    before (``base_snapshot``), so the store reads and hashes only those.  Without a
    shadow (first capture) RAM is copied whole and ``changed`` is None.  A client may
    make that first copy itself before asking (torpor.snapshot.core._start_first_put:
    it stores the copy meanwhile): the shadow then exists, vouched for nothing
    (``base_snapshot`` None), and ``changed`` names what differs from that copy.

    On any failure the guest is resumed before the error propagates (if QEMU lives).
    Raises VMError (QMP, QEMU died) or OSError (staging I/O, e.g. a full disk).
    """
    import asyncio

    from torpor.vmm import qmp

    meta_path = shadow.with_name(shadow.name + ".json")
    lock_path = shadow.with_name(shadow.name + ".lock")
    t: dict[str, Any] = {}
    t_start = time.perf_counter()

    def step(name: str) -> None:  # the shim's log tells where a slow or failed capture was
        log.info("capture: %s at %.0f ms", name, (time.perf_counter() - t_start) * 1000)

    async with qmp.session(qmp_sock) as q:
        step("QMP connected")
        await qmp.set_ignore_shared(q, True)  # before the pause: not part of the window
        # recorded with the snapshot: a private VM restored from it reuses the head of
        # this stream with its own device sections (torpor.vmm.ramless), same QEMU only
        qemu = qemu_version_of(await qmp.execute(q, "query-version"))
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # a restore may be copying our shadow (shared lock): wait before pausing
            await _flock_within(lock_fd, lock_path, SHADOW_LOCK_TIMEOUT)
            step("locked")
            have = shadow.exists() and shadow.stat().st_size == ram.stat().st_size
            base = read_meta(meta_path).get("snapshot") if have else None
            capture_id = secrets.token_hex(8)
            # from here until a commit vouches for it, the shadow equals no snapshot
            write_meta(meta_path, {"snapshot": None, "capture": capture_id})
            if not have:
                # First capture: pre-copy RAM while the guest still runs (like live
                # migration's first pass); the pause then fixes only what changed since.
                sync.close()
                t_pre = time.perf_counter()
                _new_private_file(shadow)  # guest memory: 0600 (a plain copy would be 0644)
                t["memory_bytes_precopied"] = await asyncio.to_thread(
                    sparse_copy, ram, shadow, into_existing=True
                )
                t["precopy_ms"] = (time.perf_counter() - t_pre) * 1000
                step("pre-copied RAM")
            await asyncio.to_thread(sync.prepare)
            t0 = time.perf_counter()
            await qmp.execute(q, "stop")
            step("paused")
            ok = False
            try:
                if fault == "kill-qemu-in-pause" and qemu_pid:
                    os.kill(qemu_pid, 9)
                await qmp.save_devstate(q, stage / "devstate", set_caps=False)
                t["devstate_ms"] = (time.perf_counter() - t0) * 1000
                step("device state saved")
                t1 = time.perf_counter()
                # on threads: the shim keeps serving its other clients meanwhile
                changed: list[int] | None = await asyncio.to_thread(sync.sync)
                t["memory_chunks_changed"] = len(changed or ())
                if not have:
                    changed = None  # relative to a racy pre-copy: no use to the store
                t["disk_bytes_copied"] = await asyncio.to_thread(sparse_copy, disk, stage / "disk")
                t["copy_ms"] = (time.perf_counter() - t1) * 1000
                step("RAM and disk copied")
                ok = True
            finally:
                if not (ok and keep_paused):
                    await qmp.execute(q, "cont")
            t["pause_ms"] = (time.perf_counter() - t0) * 1000
        finally:
            os.close(lock_fd)
    t |= {
        "capture": capture_id,
        "base_snapshot": base,
        "changed": changed,
        "chunk_size": CHUNK,
        "shadow": str(shadow),
        "qemu_version": qemu,
    }
    return t


def qemu_version_of(v: Any) -> str:
    """QMP ``query-version`` as one string: "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"."""
    try:
        q = v["qemu"]
        return f"{q['major']}.{q['minor']}.{q['micro']} ({str(v.get('package', '')).strip()})"
    except (KeyError, TypeError, AttributeError):
        return "unknown"


async def _flock_within(fd: int, path: Path, timeout: float) -> None:
    """``flock(LOCK_EX)`` on ``fd``, giving up after ``timeout`` seconds (EBUSY)."""
    import asyncio

    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise OSError(
                    errno.EBUSY,
                    f"the VM's RAM shadow stayed locked by a restore for {timeout:.0f} s",
                    str(path),
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)


def vouch_for_shadow(shadow: Path, capture_id: str, snapshot_id: str) -> bool:
    """After a commit: record that the shadow equals ``snapshot_id`` (if no capture
    has touched it since ``capture_id``).  Returns whether it was recorded."""
    meta_path = shadow.with_name(shadow.name + ".json")
    with locked(shadow.with_name(shadow.name + ".lock"), shared=False):
        if read_meta(meta_path).get("capture") != capture_id:
            return False
        write_meta(meta_path, {"snapshot": snapshot_id, "capture": capture_id})
    return True


def copy_shadow_of(src: Path, dst: Path, snapshot_id: str, *, into_existing: bool = False) -> int:
    """Copy a RAM source that equals ``snapshot_id`` (another VM's shadow, or a
    restore's ``ram.src`` from the hibernation cache), holding its lock shared, and
    check the copy against the snapshot's MAC-checked manifest (chunk hashes) before
    anyone uses it: the cache is trusted no more than the store.

    Raises VMError if the source no longer equals that snapshot (its VM captured
    again), or if the copy does not match the manifest (the message contains
    "does not match its snapshot"; the source is then no longer vouched for).  A
    one-shot source (meta ``once``) is removed after it has seeded a shadow.
    """
    from torpor.errors import VMError

    meta_path = src.with_name(src.name + ".json")
    with locked(src.with_name(src.name + ".lock"), shared=True):
        meta = read_meta(meta_path)
        if meta.get("snapshot") != snapshot_id:
            raise VMError(
                f"the cached memory of snapshot {snapshot_id[:12]} changed during the restore",
                step="restore: copy RAM",
            )
        try:
            n = sparse_copy(src, dst, into_existing=into_existing)
        except OSError as e:
            if e.errno == errno.ENOSPC or isinstance(e, PermissionError):
                raise
            # its VM was removed since the restore found it (or it is no file at all):
            # the restore retries from the store
            raise VMError(
                f"the cached memory of snapshot {snapshot_id[:12]} changed during the "
                f"restore ({src} cannot be read: {e})",
                step="restore: copy RAM",
            ) from e
    bad = _check_ram_copy(dst, snapshot_id, _store_root(src, meta))
    if bad:
        unvouch_shadow(src, snapshot_id)
        raise VMError(
            f"the cached memory {src} does not match its snapshot {snapshot_id[:12]} "
            f"({len(bad)} chunks differ, first at offset {bad[0]}); it was not used",
            step="restore: copy RAM",
        )
    if meta.get("once") and dst.name.endswith("shadow"):
        remove_shadow(src)
    return n


def unvouch_shadow(shadow: Path, snapshot_id: str) -> None:
    """A shadow found not to equal ``snapshot_id`` is no longer vouched for: no restore
    copies it, and its VM's next capture reads all of RAM instead of trusting it."""
    meta_path = shadow.with_name(shadow.name + ".json")
    with locked(shadow.with_name(shadow.name + ".lock"), shared=False):
        meta = read_meta(meta_path)
        if meta.get("snapshot") == snapshot_id:
            write_meta(meta_path, {**meta, "snapshot": None, "capture": None})


def _store_root(src: Path, meta: dict[str, Any]) -> Path | None:
    """The store holding the manifest of a RAM source: named in its meta, else the
    home of its folder (a home's RAM folder names it; a VM folder is home/vms/<id>)."""
    if isinstance(meta.get("store"), str):
        return Path(meta["store"])
    try:
        return Path((src.parent / "home").read_text()) / "store"
    except (OSError, ValueError):
        pass
    if src.parent.parent.name == "vms":
        return src.parent.parent.parent / "store"
    return None


def _check_ram_copy(dst: Path, snapshot_id: str, store_root: Path | None) -> list[int]:
    """Offsets of the chunks of ``dst`` that differ from the snapshot's memory
    artifact ([0] if the manifest cannot be had: fail closed)."""
    from torpor.errors import NotFoundError, TorporError
    from torpor.store import ChunkStore
    from torpor.store.home import home_store

    if store_root is None:
        return [0]
    try:
        # the manifest only (the check hashes dst): the restore that started this shim
        # has put it in the home's store folder, so the folder is opened first; with a
        # bucket that folder is a cache, and the bucket (TORPOR_STORE, in the
        # environment the shim inherits from the torpor that started it) has the rest
        store: ChunkStore = ChunkStore(store_root)
        try:
            m = store.get(snapshot_id)
        except NotFoundError:
            store = home_store(store_root.parent)
            m = store.get(snapshot_id)
        mem = m.artifacts["memory"]
        return [i * mem.chunk_size for i in store.check_file(mem, dst)]
    except (TorporError, KeyError, OSError):
        return [0]


def remove_shadow(shadow: Path) -> None:
    """Remove a shadow (its meta, lock) — and a VM's overlay next to it (a private VM's
    captures, torpor.vmm.ramless): wherever a VM's shadow goes, its overlay goes."""
    meta = shadow.with_name(shadow.name + ".json")
    leftovers = list(shadow.parent.glob(f".{meta.name}.*.tmp"))  # a write_meta cut short
    for p in (shadow, meta, shadow.with_name(shadow.name + ".lock"), *leftovers):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    if shadow.name.endswith(".shadow"):
        remove_shadow(shadow.with_name(shadow.name[: -len(".shadow")] + ".overlay"))


async def resume(qmp_sock: Path) -> None:
    from torpor.vmm import qmp

    async with qmp.session(qmp_sock) as q:
        await qmp.execute(q, "cont")
