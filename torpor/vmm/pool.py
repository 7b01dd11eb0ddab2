"""A pool of restored-but-paused VMs: a hot restore becomes "claim, `cont`, HELLO".

Why: a restore used to pay, on its path, for the shim's start, QEMU's process start,
the snapshot's RAM reaching QEMU, and loading the device state (~200 ms of a 260 ms
hot restore here, TCG).  None of that depends on who asks: for one snapshot it is
the same work every time.  A *spare* does all of it ahead of time and then waits.

A spare is a VM folder ``vms/<id>/`` prepared for one snapshot exactly as
:func:`torpor.snapshot.core.restore` prepares one (same config, same
``place_snapshot``: disk, device state, RAM — a copy or the snapshot's sealed shared
base, whatever the restore path does), whose shim (a zygote child) has started QEMU
jailed as usual, loaded the device state (``-S``: the guest does not run) and
filled the VM's RAM shadow, and now waits on ``pool.sock`` in its folder.  Until it
is claimed the folder has no ``vm.json`` — to ``ps``/``get`` it does not exist — and
its ``.creating`` names the spare's own (live) process, so nothing reaps it.

Claim (:func:`claim`, in :func:`torpor.snapshot.core.restore`): the registry
``locks/pool/<snapshot>/<vm id>`` (one JSON file per ready spare) is the only
arbiter — a claimer owns a spare iff *its* ``unlink`` of the entry succeeded, so a
spare is never handed to two restores.  The claimer then gives the VM its name and
``vm.json``, hands the shim the ready pipe over ``pool.sock`` (SCM_RIGHTS, peer uid
checked) and waits for the ready line like :meth:`VMManager.start`.  The shim
``cont``s, waits for HELLO, sets clock and entropy, and reports ready.  A spare
whose shim or QEMU died is discarded and the restore goes the ordinary way.

Who starts spares (:func:`want`, after a restore of a snapshot without ports and not
cold): ``TORPOR_POOL`` spares per snapshot (default :data:`DEFAULT_SIZE`; ``0``
disables the pool), at most :data:`MAX_SNAPSHOTS` snapshots pooled at a time,
counted under a lock from the registry (``<id>.prep`` while preparing).  The zygote
forks them (fallback: a detached ``python -m torpor.vmm.pool``).

Life cycle — nothing stays after torpor stops using it: a spare exits (QEMU killed,
its folder, RAM and shadow removed, its entry gone) when unclaimed for
``TORPOR_POOL_IDLE`` seconds (default :data:`IDLE_SECONDS`), when its QEMU dies,
when the home's ``vms`` folder is gone, or on :func:`drain` (``snapshot rm``).  A
spare made under other ``TORPOR_*`` settings (jail, store, RAM base, a test fault)
is never claimed: its entry records a hash of them (:func:`env_key`).

Warm-up: a spare lets its agent answer once before it parks (TCG then has translated
the guest's wake-up path; seen from the guest, a pause right after the restore, like a
capture's); ``TORPOR_POOL_WARM=exec`` also runs one ``true`` (its fork/exec path), at
the cost of that one exited process in the guest.

CPU: a spare only uses idle CPU.  Once its folder is prepared (the part that takes
locks: the store, the shared base) and QEMU spawned, its shim and QEMU (every thread)
run ``SCHED_IDLE`` until a claim puts them back to ``SCHED_OTHER`` before the guest
runs again — on a busy host a spare waits instead of taking CPU from running VMs and
from restores.  ``TORPOR_POOL_SCHED=normal`` keeps spares at normal priority; without
root (no ``CAP_SYS_NICE`` to undo it on QEMU) spares are not deprioritized.

Isolation: a spare is an ordinary VM start (own folder 0700, own jail uid, sockets,
overlay, cgroup) — only its timing differs.  Memory: a spare holds what a restored
VM holds (its RAM copy or its share of a base, its shadow, QEMU and the shim) —
:func:`spares` lists them with their memory.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torpor.fsutil import locked
from torpor.paths import Paths
from torpor.vmm.state import alive, proc_start_time, signal_if_alive

if TYPE_CHECKING:
    from torpor.vmm.manager import VM, VMManager

DEFAULT_SIZE = 1
MAX_SIZE = 8
MAX_SNAPSHOTS = 2
IDLE_SECONDS = 60.0
PREP_STALE = 120.0  # a ``.prep`` entry this old is a preparation that died
CLAIM_WAIT = 10.0  # how long a claimed spare waits for its claimer's hand-over
SOCK = "pool.sock"
SPARE_CONFIG = "pool.json"
# settings that do not change what a spare is (the pool's own, logging)
_NEUTRAL = {
    "TORPOR_POOL",
    "TORPOR_POOL_IDLE",
    "TORPOR_POOL_SCHED",
    "TORPOR_DEBUG",
    "TORPOR_NO_ZYGOTE",
}


def size() -> int:
    """Spares kept per snapshot (``TORPOR_POOL``; 0: no pool)."""
    try:
        n = int(os.environ.get("TORPOR_POOL", DEFAULT_SIZE))
    except ValueError:
        n = DEFAULT_SIZE
    return max(0, min(n, MAX_SIZE))


def idle_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get("TORPOR_POOL_IDLE", IDLE_SECONDS)))
    except ValueError:
        return IDLE_SECONDS


def idle_cpu() -> bool:
    """Whether spares run SCHED_IDLE until claimed (``TORPOR_POOL_SCHED``, default
    ``idle``; only as root, which can put QEMU back to normal at the claim)."""
    return os.environ.get("TORPOR_POOL_SCHED", "idle") != "normal" and os.geteuid() == 0


def set_sched(pids: tuple[int, ...], idle: bool) -> None:
    """Every thread of ``pids`` to SCHED_IDLE (``idle``) or back to SCHED_OTHER.

    Threads inherit their creator's policy, so passes repeat until one changes
    nothing: a thread made meanwhile by a not yet changed one is caught by the next."""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    for _ in range(10):
        changed = False
        for pid in pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for t in tids:
                with contextlib.suppress(OSError, ValueError):
                    if os.sched_getscheduler(int(t)) != policy:
                        os.sched_setscheduler(int(t), policy, os.sched_param(0))
                        changed = True
        if not changed:
            return


def env_key() -> str:
    """A hash of this process's ``TORPOR_*`` settings that shape a VM."""
    items = sorted(
        (k, v) for k, v in os.environ.items() if k.startswith("TORPOR_") and k not in _NEUTRAL
    )
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:32]


def _root(paths: Paths) -> Path:
    return paths.locks / "pool"


def _dir(paths: Paths, snap_id: str) -> Path:
    return _root(paths) / snap_id


def _entries(d: Path) -> list[Path]:
    try:
        return [p for p in d.iterdir() if not p.name.startswith(".")]
    except OSError:
        return []


def _put(path: Path, data: bytes) -> None:
    """Atomic (rename) but not fsync'd: the registry only describes live processes,
    which a host crash ends anyway; its entries are never worth a disk flush."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(p: Path) -> dict[str, Any]:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


# -- the library side ---------------------------------------------------------------


def want(paths: Paths, snap_id: str) -> int:
    """Start spares of ``snap_id`` up to the pool size; returns how many were asked for.

    Best effort and quick: the spares are prepared by other processes."""
    n = size()
    if n == 0 or not snap_id.isalnum():
        return 0
    root = _root(paths)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with locked(paths.locks / "pool.lock"):
            pooled = [d for d in root.iterdir() if d.is_dir() and _live(d)]
            d = _dir(paths, snap_id)
            if d not in pooled and len(pooled) >= MAX_SNAPSHOTS:
                return 0
            d.mkdir(mode=0o700, exist_ok=True)
            # spares made under other settings are never claimed here: not counted
            # (they leave when idle); at most MAX_SIZE of any kind per snapshot
            key = env_key()
            live = [_read(p).get("env") for p in _live_entries(d)]
            missing = min(n - live.count(key), MAX_SIZE - len(live))
            ids = []
            for _ in range(max(0, missing)):
                vm_id = os.urandom(32).hex()
                _put(d / f"{vm_id}.prep", json.dumps({"t": time.time(), "env": key}).encode())
                ids.append(vm_id)
    except OSError:
        return 0
    for vm_id in ids:
        _start_spare(paths, snap_id, vm_id)
    return len(ids)


def want_soon(paths: Paths, snap_id: str) -> None:
    """:func:`want` on a thread, off the restore's path (the zygote request is a few
    ms, tens under load).  Not a daemon: a CLI process finishes it before it exits,
    so no ``.prep`` entry is left without its spare."""
    import threading

    threading.Thread(target=want, args=(paths, snap_id), name="torpor-pool-want").start()


def _live_entries(d: Path) -> list[Path]:
    """Ready and preparing entries of one snapshot; stale ones removed on sight."""
    out = []
    for p in _entries(d):
        info = _read(p)
        if p.name.endswith(".prep"):
            if time.time() - float(info.get("t", 0)) > PREP_STALE:
                p.unlink(missing_ok=True)
                continue
        elif not alive(int(info.get("pid", 0)), int(info.get("start", 0))):
            p.unlink(missing_ok=True)  # its spare died without unregistering
            continue
        out.append(p)
    return out


def _live(d: Path) -> bool:
    if _live_entries(d):
        return True
    with contextlib.suppress(OSError):
        d.rmdir()
    return False


def _start_spare(paths: Paths, snap_id: str, vm_id: str) -> None:
    from torpor.vmm import zygote

    if not os.environ.get("TORPOR_NO_ZYGOTE") and zygote.request_spare(paths.root, snap_id, vm_id):
        return
    import subprocess

    with contextlib.suppress(OSError):
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torpor.vmm.pool",
                "--root",
                str(paths.root),
                "--snapshot",
                snap_id,
                "--vm",
                vm_id,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd="/",
        )


def claim(mgr: VMManager, snap_id: str, name: str | None) -> VM | None:
    """A running VM of ``snap_id`` from the pool, named ``name``; None if there is no
    usable spare (the caller restores the ordinary way).

    Raises ConflictError (the name is taken) like an ordinary restore would."""
    if size() == 0 or not snap_id.isalnum():
        return None
    if name is not None:
        from torpor.errors import UsageError
        from torpor.vmm.manager import NAME_RE

        if not NAME_RE.fullmatch(name):
            raise UsageError(f"invalid VM name {name!r}")
    d = _dir(mgr.paths, snap_id)
    key = env_key()
    for entry in sorted(_entries(d)):
        if entry.name.endswith(".prep"):
            continue
        info = _read(entry)
        if info.get("env") != key or info.get("vm") != entry.name:
            continue
        try:
            entry.unlink()  # the arbiter: whoever unlinks it owns the spare
        except FileNotFoundError:
            continue
        if not alive(int(info.get("pid", 0)), int(info.get("start", 0))):
            _discard(mgr.paths, entry.name)
            continue
        vm = _take(mgr, entry.name, name, info)
        if vm is not None:
            return vm
    return None


def _take(mgr: VMManager, vm_id: str, name: str | None, info: dict[str, Any]) -> VM | None:
    import dataclasses

    from torpor.errors import ConflictError, TorporError
    from torpor.vmm.manager import VM
    from torpor.vmm.state import VMConfig, load_state, save_config

    vm_dir = mgr.paths.vm(vm_id)
    try:
        cfg = VMConfig.from_json(json.loads((vm_dir / SPARE_CONFIG).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        _discard(mgr.paths, vm_id)
        return None
    # the spare's shim may run SCHED_IDLE: back to normal first, or on a busy host the
    # hand-over below waits for idle CPU (it puts its QEMU back itself)
    set_sched((int(info.get("pid", 0)),), idle=False)
    name = name or mgr._new_name()
    cfg = dataclasses.replace(cfg, name=name, created=time.time())
    try:
        mgr.link_name(name, vm_id)
    except ConflictError:
        # not ours to use: back into the pool for the next restore
        with contextlib.suppress(OSError):
            _register(mgr.paths, str(info.get("snapshot", "")), info)
        raise
    try:
        save_config(vm_dir, cfg)  # the VM exists from here on (ps, get, rm)
        (vm_dir / ".creating").unlink(missing_ok=True)
        vm = VM(cfg, load_state(vm_dir), vm_dir)
        with locked(mgr.paths.locks / f"vm-{vm_id}.lock"):
            rfd, wfd = os.pipe()
            try:
                _hand_over(vm_dir, vm_id, wfd)
            except OSError:
                os.close(rfd)
                raise
            finally:
                os.close(wfd)
            return mgr.await_ready(vm, rfd)
    except (TorporError, OSError):
        # the spare failed (its QEMU or shim died): discarded; the caller restores anew
        with contextlib.suppress(TorporError):
            mgr.remove(vm_id, force=True)
        with contextlib.suppress(OSError):
            if os.readlink(mgr.paths.names / name) == f"../{vm_id}":
                os.unlink(mgr.paths.names / name)
        _discard(mgr.paths, vm_id)
        return None


def _hand_over(vm_dir: Path, vm_id: str, wfd: int) -> None:
    from torpor.vmm.sockets import connect_unix

    with connect_unix(vm_dir / SOCK, timeout=5) as s:
        s.settimeout(5)
        s.sendmsg(
            [json.dumps({"claim": vm_id}).encode()],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [wfd]))],
        )
        if not s.recv(16).startswith(b"ok"):
            raise OSError("the spare refused the claim")


def _discard(paths: Paths, vm_id: str) -> None:
    """Remove a spare that was never claimed (or failed): its processes and files."""
    from torpor.vmm.capture import remove_shadow
    from torpor.vmm.layout import VMFiles
    from torpor.vmm.state import load_state

    vm_dir = paths.vm(vm_id)
    if (vm_dir / "vm.json").exists():
        return  # claimed: a VM like any other now
    files = VMFiles(vm_dir)
    with contextlib.suppress(Exception):
        st = load_state(vm_dir)
        # a parked spare's shim runs SCHED_IDLE: its clean-up must not wait for idle CPU
        if alive(st.shim_pid, st.shim_start):
            set_sched((st.shim_pid,), idle=False)
        # QEMU first: its shim then ends the spare itself (sockets, RAM, cgroup, folder)
        signal_if_alive(st.qemu_pid, st.qemu_start, signal.SIGKILL)
        shim = (st.shim_pid, st.shim_start)
        if shim[0] and shim[0] != os.getpid():
            deadline = time.monotonic() + 5
            while alive(*shim) and time.monotonic() < deadline:
                time.sleep(0.02)
            signal_if_alive(*shim, signal.SIGKILL)
    with contextlib.suppress(OSError):
        files.ram.unlink()
    remove_shadow(files.shadow)
    from torpor.vmm.jail import remove_cgroups

    with contextlib.suppress(OSError):
        remove_cgroups(vm_dir)
    shutil.rmtree(vm_dir, ignore_errors=True)


def drain(paths: Paths, snap_id: str | None = None) -> int:
    """Stop the spares of ``snap_id`` (all snapshots when None); returns how many."""
    n = 0
    dirs = [_dir(paths, snap_id)] if snap_id else [p for p in _entries(_root(paths))]
    for d in dirs:
        for entry in _entries(d):
            try:
                entry.unlink()
            except FileNotFoundError:
                continue
            if entry.name.endswith(".prep"):
                continue  # its preparer finds no entry to turn ready and gives up
            _discard(paths, entry.name)
            n += 1
        with contextlib.suppress(OSError):
            d.rmdir()
    return n


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup as bytes per field ({} if the process is gone)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


def vm_memory(qemu_pid: int, shim_pid: int, ram: Path) -> int:
    """Host memory one running VM holds on its own: QEMU's anonymous PSS (heap, TCG
    buffers, guest pages written copy-on-write) + QEMU's shared-memory PSS or its own
    RAM file's allocated size, whichever is larger + the shim's PSS.  A base shared by
    many VMs is not in it (count it once, apart)."""
    q = smaps_rollup(qemu_pid)
    s = smaps_rollup(shim_pid)
    try:
        ram_alloc = ram.stat().st_blocks * 512
    except OSError:
        ram_alloc = 0
    return q.get("Pss_Anon", 0) + max(q.get("Pss_Shmem", 0), ram_alloc) + s.get("Pss", 0)


def spares(paths: Paths) -> list[dict[str, Any]]:
    """The ready spares: snapshot, VM id, pids, and host memory each holds."""
    from torpor.vmm.layout import VMFiles
    from torpor.vmm.state import load_state

    out = []
    for d in _entries(_root(paths)):
        for entry in _entries(d):
            if entry.name.endswith(".prep"):
                continue
            info = _read(entry)
            vm_dir = paths.vm(entry.name)
            with contextlib.suppress(Exception):
                st = load_state(vm_dir)
                info["memory"] = vm_memory(st.qemu_pid, st.shim_pid, VMFiles(vm_dir).ram)
                info["qemu_pid"] = st.qemu_pid
            out.append(info)
    return out


def _register(paths: Paths, snap_id: str, info: dict[str, Any]) -> None:
    d = _dir(paths, snap_id)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    _put(d / str(info["vm"]), json.dumps(info).encode())


# -- the spare's side ------------------------------------------------------------------


@dataclass
class Slot:
    """The shim's end of a spare: register, then wait for the one claim."""

    paths: Paths
    snapshot: str
    vm_id: str
    claimed: bool = False

    @property
    def entry(self) -> Path:
        return _dir(self.paths, self.snapshot) / self.vm_id

    def unregister(self) -> bool:
        """Take the entry back; False if a claimer already took it."""
        try:
            self.entry.unlink()
            return True
        except FileNotFoundError:
            return False

    async def wait(self, vm_dir: Path, qemu_exited: Any) -> int:
        """Register as ready, wait for a claim; the claimer's ready pipe (write end).

        Raises TimeoutError when unclaimed for the idle time, or when its home or QEMU
        went away (the entry is then withdrawn, or was never claimed)."""
        import asyncio

        from torpor.vmm.state import load_config

        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SOCK)  # the shim's cwd is the VM folder: names are relative
        old = os.umask(0o077)
        try:
            srv.bind(SOCK)
        finally:
            os.umask(old)
        srv.listen(4)
        srv.setblocking(False)
        me = os.getpid()
        info = {
            "vm": self.vm_id,
            "snapshot": self.snapshot,
            "pid": me,
            "start": proc_start_time(me),
            "env": env_key(),
            "t": time.time(),
        }
        _register(self.paths, self.snapshot, info)
        try:  # drained while being prepared (snapshot rm): withdraw
            (_dir(self.paths, self.snapshot) / f"{self.vm_id}.prep").unlink()
        except FileNotFoundError:
            if self.unregister():
                srv.close()
                raise TimeoutError("withdrawn while being prepared") from None
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + idle_seconds()
        withdrawn = False
        try:
            while True:
                if qemu_exited.is_set() or not self.paths.vms.is_dir():
                    self.unregister()
                    raise TimeoutError("the spare's QEMU or home is gone")
                if time.monotonic() > deadline:
                    if withdrawn or self.unregister():
                        raise TimeoutError("unclaimed")
                    withdrawn = True  # claimed meanwhile: its claimer is on the way
                    deadline = time.monotonic() + CLAIM_WAIT
                accept = asyncio.ensure_future(loop.sock_accept(srv))
                died = asyncio.ensure_future(qemu_exited.wait())
                await asyncio.wait({accept, died}, timeout=1.0, return_when="FIRST_COMPLETED")
                died.cancel()
                if not accept.done():
                    accept.cancel()
                    continue
                conn, _ = accept.result()
                fd = await asyncio.to_thread(self._receive, conn, vm_dir, load_config)
                if fd is not None:
                    self.claimed = True
                    return fd
        finally:
            srv.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SOCK)

    def _receive(self, conn: socket.socket, vm_dir: Path, load_config: Any) -> int | None:
        with conn:
            conn.setblocking(True)
            conn.settimeout(5)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            if int.from_bytes(creds[4:8], sys.byteorder) != os.getuid():
                return None
            fds = array.array("i")
            try:
                msg, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
            except OSError:
                return None
            for level, typ, data in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            ok = False
            with contextlib.suppress(ValueError, OSError, TypeError, AttributeError, KeyError):
                req = json.loads(msg)
                # only the claimer that unlinked our entry writes vm.json for our id
                ok = (
                    len(fds) == 1
                    and req.get("claim") == self.vm_id
                    and not self.entry.exists()
                    and load_config(vm_dir).id == self.vm_id
                )
            if not ok:
                for fd in fds:
                    os.close(fd)
                return None
            with contextlib.suppress(OSError):
                conn.sendall(b"ok\n")
            return fds[0]


def run_spare(root: Path, snap_id: str, vm_id: str) -> int:
    """Prepare a spare of ``snap_id`` as VM ``vm_id`` and serve it (this process
    becomes its shim).  Returns the shim's exit code; cleans up if never claimed."""
    import dataclasses
    import logging

    os.umask(0o077)  # every file of the spare private, as a VM start's are
    paths = Paths(root)
    prep = _dir(paths, snap_id) / f"{vm_id}.prep"
    if not prep.exists() or not vm_id.isalnum() or not snap_id.isalnum():
        return 1  # withdrawn (drain) or not asked for by want()
    vm_dir = paths.vm(vm_id)
    slot = Slot(paths, snap_id, vm_id)
    made = False
    try:
        from torpor.snapshot import base as bases
        from torpor.snapshot.core import _store, place_snapshot
        from torpor.vmm.layout import VMFiles
        from torpor.vmm.manager import VM, RunRequest, VMManager, config_for, new_vm_folder
        from torpor.vmm.state import VMConfig, VMState

        mgr = VMManager(paths)
        store = _store(mgr)
        manifest = store.get(snap_id)
        src_cfg = VMConfig.from_json(json.loads(manifest.meta["vm"]))
        bases.check_guest(paths, manifest)
        if src_cfg.base_digest:
            stored = manifest.meta.get("base_manifest", "")
            disk = bases.find_base(mgr, src_cfg.base_digest, src_cfg.image_id, store, stored)
            image = bases.image_for(mgr, src_cfg.image_id, disk)
        else:
            image = mgr.images.get(src_cfg.image_id)
        cfg = config_for(RunRequest.from_config(src_cfg), image, vm_id, f"spare-{vm_id[:12]}")
        cfg = dataclasses.replace(cfg, image_ref=src_cfg.image_ref, base_digest=src_cfg.base_digest)
        new_vm_folder(paths, vm_id, {SPARE_CONFIG: json.dumps(cfg.to_json())})
        made = True
        _log_to(VMFiles(vm_dir).shim_log)
        base = place_snapshot(mgr, store, manifest, VM(cfg, VMState(), vm_dir))
        try:
            if not prep.exists():
                raise TimeoutError("withdrawn while being prepared")
            from torpor.vmm import launch, shim

            os.chdir(vm_dir)  # sockets are bound by relative name
            pre = launch.prelaunch(paths, cfg, VMFiles(vm_dir))
            if idle_cpu():  # from here on no lock is taken: only idle CPU until claimed
                set_sched((os.getpid(), pre.popen.pid), idle=True)
        finally:
            if base is not None:  # (a shared base: prelaunch took its own reference)
                base.close()
    except BaseException as e:  # a spare that cannot be made is dropped
        logging.getLogger("torpor.pool").warning("spare of %s not made: %s", snap_id[:12], e)
        prep.unlink(missing_ok=True)
        if made:
            _discard(paths, vm_id)
        return 1
    args = argparse_namespace(root, vm_id)
    try:
        return shim.main(args, pre, cfg=cfg, pool=slot)
    finally:
        if not slot.claimed:
            slot.unregister()
            prep.unlink(missing_ok=True)
            _discard(paths, vm_id)


def argparse_namespace(root: Path, vm_id: str) -> Any:
    import argparse

    return argparse.Namespace(root=str(root), vm=vm_id, ready_fd=None)


def _log_to(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="torpor-pool-spare")
    ap.add_argument("--root", required=True)
    ap.add_argument("--snapshot", required=True)
    ap.add_argument("--vm", required=True)
    args = ap.parse_args(argv)
    os.umask(0o077)
    return run_spare(Path(args.root), args.snapshot, args.vm)


if __name__ == "__main__":
    sys.exit(main())
