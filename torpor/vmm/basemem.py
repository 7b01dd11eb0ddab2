"""Snapshot *bases*: one sealed, immutable copy of a snapshot's guest RAM that many
QEMUs map copy-on-write (``share=off``, ``MAP_PRIVATE``).

Why: a restore used to copy the snapshot's RAM into each new VM's own RAM file
(mapped ``share=on``); 16 forks of a 256 MiB guest held 16 copies.  With a base,
every restore/fork of the same snapshot maps the same memory; a fork pays only for
the pages it writes (and QEMU itself).  See docs/design/fast-forks.md (measured).

What a base is: a memfd (tmpfs, ``MFD_ALLOW_SEALING``) of the snapshot's memory
size, filled from the best source — the hibernation cache
``cache/snapshots/<id>/memory``, a running VM's RAM shadow vouched for the snapshot
(copied under its shared lock), a private VM's overlay over its own base, or the
store — then **checked against the MAC-checked manifest's chunk hashes** (hot
sources: the copy is hashed; the store: every chunk as it is read), fully allocated
(``fallocate``: zero pages too, so the QEMUs mapping it are never charged for base
pages in their cgroups; the base's pages are charged once, to the process that
filled it), and **sealed** (``F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL``).
After sealing the kernel refuses every write (``pwrite``, shared-writable ``mmap``,
truncation) to anyone holding it, a compromised QEMU included: a fork's writes land
in its own private copy-on-write pages, never in the base or a sibling.  The content
is checked once, before sealing; nothing can change it afterwards.

QEMU gets the base as an inherited fd and ``mem-path=/proc/self/fd/N``, never a path
in a folder: QEMU 7.2 creates an empty file when ``mem-path`` is missing, and the
restore would "succeed" with zero RAM.

Who holds it — a small **holder process per base** (``python -m
torpor.vmm.basemem``, started detached by the first :func:`acquire`), not the zygote
and not a registry of VMs:

- the memfd must outlive the process that filled it (the CLI exits right after a
  restore) so that the next restore/fork of the snapshot reuses it (same inode) and
  pays no fill and no second copy;
- each user (the restoring library call until its VM is started, then the VM's shim
  for the VM's whole life) keeps one unix-socket connection to the holder: the
  holder's reference count is its set of open connections, which the kernel closes
  when a user dies, ``kill -9`` included — no pid-reuse games, no stale registry;
- the holder exits when it has had no connection for :data:`IDLE_SECONDS`
  (``TORPOR_BASE_IDLE``) — a sequence of start → remove keeps one base instead of
  refilling it — or at once when its socket is unlinked (``rm``/``gc`` of the
  snapshot: :func:`retire`; the home removed) and nobody is connected.  QEMUs keep
  their mappings either way: the memory is freed by the kernel when the last
  mapping and fd are gone, so a base never outlives its users by more than the idle
  time and never disappears under a running VM;
- the zygote (helper P's) serves shim start-up and is replaced whenever torpor's
  sources change; tying guest memory to it would tie it to that life cycle.

The holder imports nothing heavy and only passes the fd (SCM_RIGHTS) to whoever
connects on ``locks/.base-<id>.sock`` (folder 0700, socket 0600, peer uid checked).
A client checks what it receives: a memfd with all four seals, the snapshot's size,
and the inode the holder announced.  Creation is serialized per snapshot by
``locks/.base-<id>.lock``; the holder takes the same lock before it unlinks its
socket, then serves whatever connected before the unlink, so no client is ever
left with a dead holder.

A hot source that vanishes or cannot be read between being found and being copied
(a sibling's shadow whose VM was just removed) is skipped; one whose content does not
match the manifest is dropped (cache file) or unvouched (shadow); the store is the
last source.  A ``cold`` acquire reuses only a base that was filled from the store.

Who pays: the filling process (the restoring library call, or a shim that must
re-acquire) is charged for the base's pages, once; each VM's shim keeps its
reference (``launch.Prelaunch.base``, whose ``fd`` the RAM-less capture may read as
the content of the overlay's holes) for the VM's whole life.  Bases are shared only
within one home (one user): shared pages are a cross-VM side channel.

Fallback (:func:`wanted`, :func:`private_capture`): no sealable memfd (old kernel),
``TORPOR_RAM_BASE=0``, or no ptrace rights for the RAM-less capture → restores copy
RAM into the VM's own ``share=on`` file as before.  A VM whose RAM is private can
only be captured by the RAM-less capture (:mod:`torpor.vmm.ramless`); the restore
marks it ``"ram_private": true`` in ``restore.json`` so the shim knows for the VM's
whole life.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torpor.paths import Paths
    from torpor.store import ChunkStore, Manifest

IDLE_SECONDS = 10.0  # a base outlives its last user this long (a 256 MiB guest: 256 MiB)
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
HEADER_MAX = 4096  # the holder's JSON header (one datagram-sized read)


class BaseUnavailable(Exception):
    """No base can be had here (no memfd/sealing, disabled): use the copy path."""


@dataclass
class Base:
    """One user's reference to a sealed base.  ``fd`` is a read-only-by-seal memfd;
    close() (or the process ending) drops the reference."""

    fd: int
    size: int
    snapshot: str
    ino: int
    source: str  # "holder" (reused), "cache", "shadow" or "store" (filled now)
    filled_from: str = ""  # what the base was filled from: "cache", "shadow", "store"
    timings: dict[str, float] = field(default_factory=dict)
    _conn: socket.socket | None = None

    @property
    def mem_path(self) -> str:
        """What QEMU's ``mem-path`` names, in a process that inherited ``fd``."""
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None

    def __enter__(self) -> Base:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key(snapshot: str) -> str:
    if not snapshot or not all(c in "0123456789abcdef" for c in snapshot):
        raise ValueError(f"not a snapshot id: {snapshot!r}")
    return snapshot[:32]


def sock_path(paths: Paths, snapshot: str) -> Path:
    return paths.locks / f".base-{_key(snapshot)}.sock"


def lock_path(paths: Paths, snapshot: str) -> Path:
    return paths.locks / f".base-{_key(snapshot)}.lock"


def wanted() -> tuple[bool, str]:
    """Whether restores should map a shared base (else they copy RAM), and why not."""
    v = os.environ.get("TORPOR_RAM_BASE", "").strip().lower()
    if v in ("0", "off", "no", "false", "copy"):
        return False, "TORPOR_RAM_BASE=0"
    return available()


def private_capture() -> tuple[bool, str]:
    """Whether a VM whose RAM is private can be snapshotted here: the RAM-less capture
    (:mod:`torpor.vmm.ramless`) reads QEMU's memory from outside, which needs ptrace
    rights over QEMU (root, or QEMU unjailed as the shim's own child with Yama's
    ``ptrace_scope`` below 2).  ``TORPOR_RAM_BASE=1`` skips the check."""
    if os.environ.get("TORPOR_RAM_BASE", "").strip().lower() in ("1", "on", "yes", "true"):
        return True, ""
    try:
        from torpor.vmm import ramless
    except ImportError:
        return False, "no RAM-less capture of private VMs in this torpor"
    if not hasattr(ramless, "capture_private"):
        return False, "no RAM-less capture of private VMs in this torpor"
    try:
        scope = int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        scope = 0  # no Yama: classic ptrace rules (root, or same uid)
    if scope >= 3 or (scope == 2 and os.geteuid() != 0):
        return False, f"ptrace_scope {scope}: QEMU's memory cannot be read for a capture"
    return True, ""


_AVAILABLE: tuple[bool, str] | None = None


def available() -> tuple[bool, str]:
    """(True, "") if this kernel gives sealable memfds, else (False, why)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            fd = os.memfd_create("torpor-probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
                ok = fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
                _AVAILABLE = (ok, "" if ok else "memfd seals not applied")
            finally:
                os.close(fd)
        except (OSError, AttributeError) as e:
            _AVAILABLE = (False, f"no sealable memfd here: {e}")
    return _AVAILABLE


def check_sealed(fd: int, size: int) -> None:
    """Raise BaseUnavailable unless ``fd`` is a fully sealed memfd of ``size`` bytes."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        st = os.fstat(fd)
    except OSError as e:
        raise BaseUnavailable(f"not a sealed memfd: {e}") from e
    if seals & SEALS != SEALS or st.st_size != size:
        raise BaseUnavailable(f"base not sealed/size wrong (seals {seals:#x}, size {st.st_size})")


# -- clients ---------------------------------------------------------------------------


def connect(paths: Paths, snapshot: str, size: int, ino: int | None = None) -> Base:
    """A new reference to the running holder of ``snapshot``'s base.

    Raises BaseUnavailable if there is none (or what it hands over is not a sealed
    memfd of ``size`` bytes, or not inode ``ino`` when given)."""
    from torpor.vmm.sockets import connect_unix

    path = sock_path(paths, snapshot)
    try:
        s = connect_unix(path, timeout=10.0)
    except OSError as e:
        raise BaseUnavailable(f"no holder for base {snapshot[:12]}: {e}") from e
    fds: list[int] = []
    try:
        s.settimeout(10.0)
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        _pid, uid, _gid = array.array("i", creds)
        if uid != os.getuid():
            raise BaseUnavailable(f"the holder socket {path} belongs to uid {uid}")
        s.sendall(USE)
        msg, fds, _flags, _addr = socket.recv_fds(s, HEADER_MAX, 1)
        if not msg or len(fds) != 1:
            raise BaseUnavailable(f"the holder of base {snapshot[:12]} is going away")
        head = json.loads(msg)
        fd = fds.pop()
        try:
            check_sealed(fd, size)
            st = os.fstat(fd)
            if head.get("snapshot") != snapshot or st.st_ino != head.get("ino"):
                raise BaseUnavailable("the holder's fd is not the base it announced")
            if ino is not None and st.st_ino != ino:
                raise BaseUnavailable(f"base {snapshot[:12]} was replaced (inode changed)")
            os.set_inheritable(fd, False)
        except BaseException:
            os.close(fd)
            raise
        s.settimeout(None)
        src = str(head.get("source", ""))
        return Base(fd, size, snapshot, st.st_ino, "holder", filled_from=src, _conn=s)
    except (OSError, ValueError) as e:
        s.close()
        raise BaseUnavailable(f"holder of base {snapshot[:12]}: {e}") from e
    except BaseException:
        s.close()
        raise
    finally:
        for fd in fds:
            os.close(fd)


def acquire(paths: Paths, store: ChunkStore, manifest: Manifest, *, cold: bool = False) -> Base:
    """A reference to the sealed base of ``manifest``'s memory: the running holder's if
    there is one, else a new base filled from the best source and a holder started.

    ``cold`` fills only from the store, and reuses only a base filled from it.  A
    cache file or shadow whose content does not match the manifest is never used (the
    cache file is dropped, the shadow unvouched) and the store fills the base instead.
    Raises BaseUnavailable (no sealable memfd here), StoreError (the store cannot
    provide the memory), VMError (the store's own copy does not match)."""
    ok, why = available()
    if not ok:
        raise BaseUnavailable(why)
    from torpor.fsutil import locked

    mem = manifest.artifacts["memory"]
    with locked(lock_path(paths, manifest.id)):
        with contextlib.suppress(BaseUnavailable):
            b = connect(paths, manifest.id, mem.size)
            if not cold or b.filled_from == "store":
                return b
            b.close()  # cold: only a base filled from the store will do
        fd, source, t = _fill(paths, store, manifest, cold)
        try:
            _start_holder(paths, manifest.id, fd, source)
            # our reference: a queued connection that asked USE — the holder (a Python
            # start-up away) counts it when it runs; the fd we keep is the one we filled
            conn = _enqueue(paths, manifest.id)
        except BaseException:
            os.close(fd)
            raise
    os.set_inheritable(fd, False)
    ino = os.fstat(fd).st_ino
    return Base(fd, mem.size, manifest.id, ino, source, filled_from=source, timings=t, _conn=conn)


def _enqueue(paths: Paths, snapshot: str) -> socket.socket:
    from torpor.vmm.sockets import connect_unix

    s = connect_unix(sock_path(paths, snapshot), timeout=10.0)
    try:
        s.sendall(USE)
    except BaseException:
        s.close()
        raise
    return s


def hot_source(paths: Paths, snapshot: str) -> str | None:
    """Where a base of ``snapshot`` would come from without the store: "holder" (one
    runs), "cache" (a hibernation's memory), "shadow" (a running VM's), else None."""
    with contextlib.suppress(OSError, ValueError):
        if sock_path(paths, snapshot).exists():
            return "holder"
    if (paths.snapshot_cache / snapshot / "memory").exists():
        return "cache"
    if find_shadow(paths, snapshot) is not None:
        return "shadow"
    return None


def retire(paths: Paths, snapshot: str) -> None:
    """No new users for ``snapshot``'s base (the snapshot is removed): unlink the
    holder's socket; the holder exits once its current users are gone."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        sock_path(paths, snapshot).unlink()


def retire_missing(paths: Paths, live: set[str]) -> None:
    """Retire the base of every snapshot not in ``live`` (``gc``)."""
    keys = {_key(i) for i in live}
    for p in paths.locks.glob(".base-*.sock") if paths.locks.is_dir() else ():
        if p.name[len(".base-") : -len(".sock")] not in keys:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def holders(paths: Paths) -> list[dict[str, Any]]:
    """The bases this home's holders serve now (for tests, benches, ``inspect``)."""
    out = []
    for p in sorted(paths.locks.glob(".base-*.sock")) if paths.locks.is_dir() else ():
        snap = p.name[len(".base-") : -len(".sock")]
        try:
            s = _peek(p)
        except OSError:
            continue
        out.append({"snapshot": snap, **s})
    return out


def _peek(p: Path) -> dict[str, Any]:
    from torpor.vmm.sockets import connect_unix

    s = connect_unix(p, timeout=5.0)
    try:
        s.settimeout(5.0)
        s.sendall(PEEK)
        msg = s.recv(HEADER_MAX)
        return dict(json.loads(msg)) if msg else {}
    finally:
        s.close()


# -- filling ---------------------------------------------------------------------------


BASE_NOTE = "ram_base"  # in a VM folder: the snapshot whose base the VM maps


def note_base(vm_dir: Path, snap_id: str) -> None:
    """Record in a VM's folder which base its RAM maps (what its overlay's holes are)."""
    from torpor.fsutil import atomic_write_bytes

    atomic_write_bytes(vm_dir / BASE_NOTE, (snap_id + "\n").encode(), mode=0o600)


def find_overlay(paths: Paths, snap_id: str) -> Path | None:
    """A running private VM's overlay (:mod:`torpor.vmm.ramless`) vouched for
    ``snap_id``: with the base its VM maps, the snapshot's memory, or None."""
    from torpor.vmm.capture import read_meta
    from torpor.vmm.layout import home_ram_dir

    root = home_ram_dir(paths.root)
    if root is None:
        return None
    for meta in root.glob("*.overlay.json"):
        if read_meta(meta).get("snapshot") == snap_id:
            overlay = meta.with_name(meta.name[: -len(".json")])
            if overlay.exists():
                return overlay
    return None


def _overlay_base(paths: Paths, overlay: Path, size: int) -> Base:
    """The base an overlay's holes stand for: its VM's, from the note in its folder."""
    vm_id = overlay.name[: -len(".overlay")]
    try:
        snap = (paths.vm(vm_id) / BASE_NOTE).read_text().strip()
    except OSError as e:
        raise BaseUnavailable(f"VM {vm_id[:12]} names no base: {e}") from e
    return connect(paths, snap, size)


def find_shadow(paths: Paths, snap_id: str) -> Path | None:
    """A running VM's RAM shadow of this home vouched for ``snap_id`` (see
    :mod:`torpor.vmm.capture`), or None."""
    from torpor.vmm.capture import read_meta
    from torpor.vmm.layout import home_ram_dir

    root = home_ram_dir(paths.root)
    if root is None:
        return None
    for meta in root.glob("*.shadow.json"):
        if read_meta(meta).get("snapshot") == snap_id:
            shadow = meta.with_name(meta.name[: -len(".json")])
            if shadow.exists():
                return shadow
    return None


def _fill(
    paths: Paths, store: ChunkStore, manifest: Manifest, cold: bool
) -> tuple[int, str, dict[str, float]]:
    """(sealed memfd, source, timings): filled, checked, allocated, sealed."""
    from torpor.errors import VMError
    from torpor.vmm.capture import unvouch_shadow

    mem = manifest.artifacts["memory"]
    t: dict[str, float] = {}
    cache = paths.snapshot_cache / manifest.id / "memory"
    sources: list[tuple[str, Path | None]] = []
    if not cold:
        if cache.exists():
            sources.append(("cache", cache))
        shadow = find_shadow(paths, manifest.id)
        if shadow is not None:
            sources.append(("shadow", shadow))
        overlay = find_overlay(paths, manifest.id)
        if overlay is not None:
            sources.append(("overlay", overlay))
    sources.append(("store", None))
    for source, src in sources:
        fd = os.memfd_create(
            f"torpor-base-{manifest.id[:12]}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        )
        try:
            os.ftruncate(fd, mem.size)
            me = Path(f"/proc/self/fd/{fd}")
            t0 = time.perf_counter()
            if source == "store":
                _from_store(paths, store, mem, fd)
            elif not _copy_hot(paths, source, src, me, manifest.id):
                os.close(fd)  # gone, unreadable, or its VM captured again meanwhile
                continue
            t["fill_ms"] = (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            # the store's materialize checked every chunk as it read it (into a 0700
            # folder of ours): hashing the copy again cost 150-300 ms per cold restore
            bad = [] if source == "store" else store.check_file(mem, me)
            t["check_ms"] = (time.perf_counter() - t1) * 1000
            if bad:
                os.close(fd)
                msg = (
                    f"the {source} memory of snapshot {manifest.id[:12]} does not match its "
                    f"manifest ({len(bad)} chunks differ, first at offset "
                    f"{bad[0] * mem.chunk_size}); not used"
                )
                if source == "store":
                    raise VMError(msg, step="restore: base")
                import logging

                logging.getLogger("torpor.snapshot").warning("%s", msg)
                if source == "cache":
                    with contextlib.suppress(OSError):
                        cache.unlink()
                elif src is not None:
                    unvouch_shadow(src, manifest.id)
                continue
            t2 = time.perf_counter()
            # every page allocated here (zeros too): QEMUs mapping it never fault a
            # base page into their own cgroup
            os.posix_fallocate(fd, 0, mem.size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            check_sealed(fd, mem.size)
            t["seal_ms"] = (time.perf_counter() - t2) * 1000
            return fd, source, t
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise AssertionError("unreachable: the store source either fills or raises")


def _copy_hot(paths: Paths, source: str, src: Path | None, dst: Path, snap_id: str) -> bool:
    """Copy a cache file, a running VM's shadow or a private VM's overlay over its base
    (under its shared lock, if it still equals the snapshot) into ``dst``; False if it
    cannot be used: a shadow can vanish between being found and being read (its VM
    removed)."""
    from torpor.fsutil import locked
    from torpor.vmm.capture import read_meta, sparse_copy

    assert src is not None
    try:
        if source == "cache":
            sparse_copy(src, dst, into_existing=True)
            return True
        under = None
        if source == "overlay":  # its holes are its VM's base: that first
            under = _overlay_base(paths, src, os.stat(dst).st_size)
        try:
            with locked(src.with_name(src.name + ".lock"), shared=True, make_parents=False):
                if read_meta(src.with_name(src.name + ".json")).get("snapshot") != snap_id:
                    return False
                if under is not None:
                    sparse_copy(Path(under.mem_path), dst, into_existing=True)
                sparse_copy(src, dst, into_existing=True)  # data extents only: holes stay
                return True
        finally:
            if under is not None:
                under.close()
    except (OSError, BaseUnavailable) as e:
        import logging

        logging.getLogger("torpor.snapshot").warning(
            "base of %s: the %s %s cannot be read (%s); not used", snap_id[:12], source, src, e
        )
        return False


def _from_store(paths: Paths, store: ChunkStore, mem: Any, fd: int) -> None:
    """The store's chunks (hash-checked by materialize) into the memfd, through a
    private temporary file on the home's RAM folder (or its tmp folder)."""
    import tempfile

    from torpor.vmm.capture import sparse_copy
    from torpor.vmm.layout import home_ram_dir

    root = home_ram_dir(paths.root) or paths.tmp
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".base-", dir=root) as d:
        tmp = Path(d) / "memory"
        store.materialize(mem, tmp, name="memory", durable=False)
        sparse_copy(tmp, Path(f"/proc/self/fd/{fd}"), into_existing=True)


# -- the holder ------------------------------------------------------------------------


def _start_holder(paths: Paths, snapshot: str, mem_fd: int, source: str) -> None:
    """Bind the holder's socket (so it exists before the creation lock is released),
    then start the detached holder with the memfd and the listening socket."""
    path = sock_path(paths, snapshot)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".base-tmp-{os.getpid()}-{time.monotonic_ns() % 10**9}.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    old = os.umask(0o077)
    try:
        srv.bind(f"/proc/self/fd/{dirfd}/{tmp.name}")
        srv.listen(64)
        os.replace(tmp, path)  # a dead holder's stale socket is replaced
        ino = os.stat(path).st_ino
        idle = os.environ.get("TORPOR_BASE_IDLE") or str(IDLE_SECONDS)
        argv = [
            sys.executable, "-m", "torpor.vmm.basemem",
            "--sock-fd", str(srv.fileno()), "--mem-fd", str(mem_fd),
            "--sock", str(path), "--sock-ino", str(ino),
            "--lock", str(lock_path(paths, snapshot)),
            "--snapshot", snapshot, "--idle", idle, "--source", source,
        ]  # fmt: skip
        log = paths.root / "logs"
        out = subprocess.DEVNULL
        with contextlib.suppress(OSError):
            log.mkdir(mode=0o700, exist_ok=True)
            out = os.open(log / "basemem.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(srv.fileno(), mem_fd),
                start_new_session=True,
                close_fds=True,
            )
        finally:
            if isinstance(out, int) and out >= 0:
                os.close(out)
        # the holder double-forks nothing: reap it off the path when it exits one day
        import threading

        threading.Thread(target=p.wait, daemon=True).start()
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.umask(old)
        os.close(dirfd)
        srv.close()


USE, PEEK = b"u", b"p"  # a client's one request byte: a reference, or the header only
PENDING_SECONDS = 5.0  # a connection that sends no request is dropped after this


def _serve(args: Any) -> int:
    """The holder's loop.  A connection that asks USE gets the memfd and counts as a
    user until it closes; PEEK gets the header and is closed (never keeps a base).
    Idle = no user for ``args.idle`` seconds; then, under the creation lock, the
    socket is unlinked, connections already made are still served, and the holder
    exits when the last user is gone."""
    srv = socket.socket(fileno=args.sock_fd)
    mem_fd = args.mem_fd
    st = os.fstat(mem_fd)
    head = json.dumps(
        {
            "snapshot": args.snapshot,
            "ino": st.st_ino,
            "size": st.st_size,
            "pid": os.getpid(),
            "source": args.source,
        }
    ).encode()
    path = Path(args.sock)
    users: dict[int, socket.socket] = {}
    pending: dict[int, tuple[socket.socket, float]] = {}
    poll = select.poll()
    poll.register(srv.fileno(), select.POLLIN)
    last_used = time.monotonic()
    listening = published = True

    def mine() -> bool:
        try:
            return os.stat(path).st_ino == args.sock_ino
        except OSError:
            return False

    def drop(fd: int) -> None:
        poll.unregister(fd)
        c = users.pop(fd, None) or pending.pop(fd)[0]
        c.close()

    def accept_all() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                return
            creds = c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            if array.array("i", creds)[1] not in (0, os.getuid()):
                c.close()
                continue
            pending[c.fileno()] = (c, time.monotonic())
            poll.register(c.fileno(), select.POLLIN)

    def answer(fd: int) -> None:
        c = users.get(fd) or pending[fd][0]
        try:
            data = c.recv(64)
        except OSError:
            data = b""
        if fd in users or not data:  # a user's close (anything else from it: the same)
            drop(fd)
            return
        try:
            if data[:1] == USE:
                socket.send_fds(c, [head], [mem_fd])
                pending.pop(fd)
                users[fd] = c
                return
            if data[:1] == PEEK:
                c.sendall(head)
        except OSError:
            pass
        drop(fd)

    srv.setblocking(False)
    while listening or users or pending:
        for fd, _ev in poll.poll(500):
            if listening and fd == srv.fileno():
                accept_all()
            elif fd in users or fd in pending:
                answer(fd)
        now = time.monotonic()
        for fd, (_c, since) in list(pending.items()):
            if now - since > PENDING_SECONDS:
                drop(fd)
        if users:
            last_used = now
            continue
        if not listening:
            continue
        if published and not mine():
            published = False  # retired (rm, gc) or replaced: no new users will come
        if published and now - last_used < args.idle:
            continue
        try:  # going away: unpublish under the creation lock
            lock_fd = os.open(args.lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            lock_fd = -1
        try:
            if lock_fd >= 0:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # someone is acquiring this base right now: stay
            if published and mine():
                with contextlib.suppress(OSError):
                    path.unlink()
            published = listening = False
            accept_all()  # whoever connected before the unlink is still served
            poll.unregister(srv.fileno())
            srv.close()
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="torpor-basemem")
    ap.add_argument("--sock-fd", type=int, required=True)
    ap.add_argument("--mem-fd", type=int, required=True)
    ap.add_argument("--sock", required=True)
    ap.add_argument("--sock-ino", type=int, required=True)
    ap.add_argument("--lock", required=True)
    ap.add_argument("--snapshot", required=True)
    ap.add_argument("--idle", type=float, default=IDLE_SECONDS)
    ap.add_argument("--source", default="")
    args = ap.parse_args(argv)
    with contextlib.suppress(OSError):
        os.chdir("/")
    try:
        return _serve(args)
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        if e.errno == errno.EBADF:
            print(f"basemem: bad fds: {e}", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
