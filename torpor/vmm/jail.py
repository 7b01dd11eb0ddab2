"""QEMU's jail: each VM's QEMU runs unprivileged, alone in its namespaces, limited.

Modelled on Firecracker's jailer.  When torpor runs as root (the default where it
can), :func:`for_launch`/:func:`prepare` (in the shim, before QEMU is spawned), the
``preexec_fn`` from :func:`enter_fn` (in the forked child, just before ``exec``) and
:func:`join_cgroups` (a shim thread, right after the spawn) give every VM's QEMU:

- **its own uid and gid**, ``base + 1 + H(home, vm id) mod 2^20`` (base
  ``TORPOR_JAIL_UID_BASE``, default 1610612736; no account needs to exist).  Per-VM
  uids, not one shared ``torpor-vm`` user: a second,
  independent wall — even if a QEMU escaped its mount namespace, another VM's disk
  and RAM file are 0600 and owned by another uid.  (Two VMs share a uid only by a
  hash collision, about 1 in 10^6 per pair; then the mount namespace still
  separates them.)
- **no capabilities**: the bounding set is emptied, then setgroups/setresgid/
  setresuid drop root, the remaining sets are cleared, ``no_new_privs`` is set.
- **a new PID namespace** with QEMU as its PID 1 (the shim still sees QEMU's host
  pid, signals it and waits on it as before: the shim enters the new namespace only
  for the ``fork`` and returns to its own right after), and new mount, IPC and UTS
  namespaces.  A VM without a guest network also gets its own network namespace;
  with one, it stays the host's (user networking and ``hostfwd`` listen there).
- **only its own files visible**: the new root is a tmpfs holding read-only binds
  of ``/usr`` (QEMU and its libraries; merged-usr symlinks recreated),
  ``/etc/ld.so.cache``, ``/dev/{null,zero,random,urandom}`` (``/dev/kvm`` under
  KVM), a fresh ``/proc`` of the new PID namespace, the kernel, initramfs and the
  image's base disk (read-only; they stay 0400 root on the host and are bound
  *idmapped*, so they appear owned by QEMU's uid in its jail only — group-readable
  by the jail group ``base`` is the fallback without idmapped mounts), and the VM's
  own overlay disk and RAM file (read-write, chowned to the VM's uid) — each at the
  path QEMU's argv or the qcow2 header names, so both stay valid.  A backing file
  must be an image's base disk: the overlay's header is QEMU's to write.  Then
  ``pivot_root`` and the old root is detached; the tmpfs root is remounted read-only.
- **no writable host folder**: QEMU creates no files.  :func:`rewrite_argv` binds
  every listening socket the argv names (root-owned, in the VM folder) and passes it
  as an fd, and opens every ``-chardev file`` log for it (``-add-fd``).  Snapshot
  state files already travel as fds over QMP (``getfd``), which works across the
  jail unchanged.
- **a cgroup** with memory (guest RAM + 1 GiB: TCG's translation cache can grow to
  1 GiB), CPU (``cpus`` whole CPUs) and pids (256) limits: cgroup v2 when its
  controllers are available, else the v1 memory/cpu/pids hierarchies, else none;
  joined from the shim right after the spawn (attaching from inside the child sat
  an RCU grace period on the start path).
- QEMU's own seccomp sandbox stays on (qemu.py).

What was applied is written to ``jail.json`` in the VM folder (root-owned);
``inspect`` and ``info`` show it.  Opt-out: ``TORPOR_JAIL=0`` (CLI ``--no-jail``).
Without root the jail cannot be built: then nothing is applied and every entry
point says so; ``TORPOR_JAIL=1`` without root is an error, not a silent downgrade.

TCG policy (:func:`check_tcg_allowed`): under TCG the VM is no security boundary
(QEMU's security policy), so a multi-tenant entry point must refuse TCG unless the
operator opted in (``TORPOR_ALLOW_TCG=1`` or ``--allow-tcg``).

Invariants: :func:`enter` runs between fork and exec, so it imports nothing and
only calls libc; any failure there is written to QEMU's log (stderr) and aborts the
exec — QEMU never runs half-jailed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torpor.errors import JailError, TCGRefusedError
from torpor.fsutil import read_json
from torpor.vmm.qcow2 import qcow2_backing

DEFAULT_UID_BASE = 1610612736  # 0x60000000: far above real and subordinate uid ranges
UID_SPAN = 1 << 20
PIDS_MAX = 256  # QEMU's threads: vCPUs, RCU, the aio=threads pool (up to 64), ...
MAX_BACKING_CHAIN = 4
MEM_OVERHEAD = 1 << 30  # on top of guest RAM: TCG's translation cache is up to 1 GiB

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
SYS_OPEN_TREE = 428  # x86_64
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 4
MOUNT_ATTR_RDONLY = 1
MOUNT_ATTR_NOSUID = 2
MOUNT_ATTR_NODEV = 4
MOUNT_ATTR_NOEXEC = 8
MOUNT_ATTR_IDMAP = 0x00100000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = 155  # x86_64
SYS_CAPSET = 126  # x86_64
LINUX_CAPABILITY_VERSION_3 = 0x20080522

JAIL_FILE = "jail.json"
MOUNTPOINT = "jail"  # an empty folder in the VM folder: the tmpfs root is mounted on it


# -- policy ---------------------------------------------------------------------------


def _env_flag(name: str) -> bool | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v.strip().lower() not in ("0", "no", "false", "off")


def wanted() -> tuple[bool, str]:
    """Whether to jail QEMU, and why (TORPOR_JAIL: unset = when root)."""
    flag = _env_flag("TORPOR_JAIL")
    root = os.geteuid() == 0
    if flag is False:
        return False, "disabled (TORPOR_JAIL=0 / --no-jail)"
    if not root:
        if flag:
            raise JailError(
                "TORPOR_JAIL=1 needs root (the jail changes uid, mounts and cgroups); "
                "run as root or set TORPOR_JAIL=0",
                step="jail",
            )
        return False, "not applied: torpor is not running as root (QEMU runs as this user)"
    return True, "on"


def tcg_allowed(allow_tcg: bool = False) -> bool:
    """The operator's explicit opt-in to TCG for multi-tenant use."""
    return allow_tcg or bool(_env_flag("TORPOR_ALLOW_TCG"))


def check_tcg_allowed(accel: str, *, multi_tenant: bool, allow_tcg: bool = False) -> None:
    """Refuse a multi-tenant VM under TCG unless the operator opted in.

    Every entry point that may serve more than one tenant (the coming HTTP server
    with tokens) calls this with the accelerator the VM will really use.
    """
    if multi_tenant and accel != "kvm" and not tcg_allowed(allow_tcg):
        raise TCGRefusedError(
            f"this VM would run under {accel.upper()}, which is no security boundary "
            "between tenants (QEMU's security policy); set TORPOR_ALLOW_TCG=1 or pass "
            "--allow-tcg to accept that",
            step="isolation",
        )


def describe(files_dir: Path) -> dict[str, Any]:
    """What ``jail.json`` says was applied to this VM's QEMU (for inspect)."""
    try:
        d = read_json(files_dir / JAIL_FILE)
    except (OSError, ValueError):
        return {"applied": False, "reason": "unknown (the VM has not started with this torpor)"}
    return d if isinstance(d, dict) else {"applied": False, "reason": "unreadable jail.json"}


def summary(d: dict[str, Any]) -> str:
    """One line for ``ps``-like outputs and notices."""
    if not d.get("applied"):
        return f"no jail: {d.get('reason', '?')}"
    cg = d.get("cgroup") or {}
    limits = ", ".join(f"{k}={v}" for k, v in (cg.get("limits") or {}).items()) or "none"
    return (
        f"uid {d.get('uid')}, no capabilities, own pid/mount namespaces, seccomp; "
        f"cgroup {cg.get('version', 'none')}: {limits}"
    )


def host_summary() -> str:
    """For ``info``: what a VM started now would get."""
    try:
        on, why = wanted()
    except JailError as e:
        return str(e)
    if not on:
        return why
    cg = detect_cgroups()
    if cg is None:
        return "on (uid, capabilities, namespaces); cgroup limits: none (no usable cgroups)"
    return f"on (uid, capabilities, namespaces); cgroup {cg.version}: {', '.join(cg.controllers)}"


# -- cgroups --------------------------------------------------------------------------


@dataclass
class Cgroups:
    version: str  # "v2" | "v1"
    controllers: list[str]
    parents: dict[str, str]  # controller (v1) or "unified" (v2) -> parent folder


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of every mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rf = right.split()
            if len(fields) >= 5 and len(rf) >= 3:
                out.append((fields[4].replace("\\040", " "), rf[0], rf[2]))
    return out


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for v2) -> this process's path in that hierarchy."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) == 3:
                for c in parts[1].split(",") if parts[1] else [""]:
                    out[c] = parts[2]
    return out


def detect_cgroups() -> Cgroups | None:
    """cgroup v2 with memory/cpu/pids controllers, else v1's, else None."""
    want = ("memory", "cpu", "pids")
    own = _own_cgroups()
    mounts = _mountinfo()
    for mnt, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        # like Firecracker's jailer: torpor/ under the hierarchy's root, which may
        # enable controllers for its children although it holds processes (a cgroup
        # that is not the root may not: "no internal processes")
        parent = Path(mnt)
        try:
            avail = (parent / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        ctrls = [c for c in want if c in avail]
        if ctrls and os.access(parent, os.W_OK):
            return Cgroups("v2", ctrls, {"unified": str(parent)})
    parents: dict[str, str] = {}
    for c in want:
        for mnt, fstype, opts in mounts:
            if fstype == "cgroup" and c in opts.split(",") and c in own:
                p = Path(mnt + own[c])
                if os.access(p, os.W_OK):
                    parents[c] = str(p)
                break
    if parents:
        return Cgroups("v1", list(parents), parents)
    return None


def _write(p: Path, value: str) -> None:
    with open(p, "w") as f:
        f.write(value)


STALE_CGROUP_SECONDS = 120.0


def _sweep(tops: list[str]) -> None:
    """Remove VM cgroups left by shims that died without cleaning up (``rm -f`` kills
    the shim; QEMU follows it by PDEATHSIG).  rmdir fails on a cgroup that still has
    processes; one younger than a start-up is left alone (its QEMU may be about to
    join it).  Runs on a thread after QEMU's spawn, off the start's critical path."""
    import time

    now = time.time()
    for top in tops:
        with contextlib.suppress(OSError), os.scandir(top) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    if e.is_dir() and now - e.stat().st_mtime > STALE_CGROUP_SECONDS:
                        os.rmdir(e.path)


def _setup_cgroups(key: str, memory_bytes: int, cpus: int) -> dict[str, Any]:
    """Create this VM's cgroup(s) with limits; returns what was applied."""
    cg = detect_cgroups()
    if cg is None:
        return {"version": "none", "reason": "no writable cgroup v2 or v1 hierarchy"}
    limits: dict[str, str] = {}
    dirs: list[str] = []
    errors: list[str] = []
    if cg.version == "v2":
        parent = Path(cg.parents["unified"])
        top = parent / "torpor"
        vm = top / key
        try:
            top.mkdir(exist_ok=True)
            # torpor/ holds no processes, so it may pass the controllers on
            with contextlib.suppress(OSError):
                _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in cg.controllers))
            enabled = (parent / "cgroup.subtree_control").read_text().split()
            ctrls = [c for c in cg.controllers if c in enabled]
            if not ctrls:
                errors.append("v2: no controller could be enabled below the root")
            else:
                _write(top / "cgroup.subtree_control", " ".join(f"+{c}" for c in ctrls))
            with contextlib.suppress(OSError):
                vm.rmdir()
            vm.mkdir()
            dirs.append(str(vm))
            if "memory" in ctrls:
                _write(vm / "memory.max", str(memory_bytes))
                limits["memory"] = str(memory_bytes)
            if "cpu" in ctrls:
                _write(vm / "cpu.max", f"{cpus * 100000} 100000")
                limits["cpu"] = f"{cpus} CPU"
            if "pids" in ctrls:
                _write(vm / "pids.max", str(PIDS_MAX))
                limits["pids"] = str(PIDS_MAX)
        except OSError as e:
            errors.append(f"v2: {e}")
    else:
        for c, parent_s in cg.parents.items():
            vm = Path(parent_s) / "torpor" / key
            try:
                vm.parent.mkdir(exist_ok=True)
                with contextlib.suppress(OSError):
                    vm.rmdir()
                vm.mkdir()
                dirs.append(str(vm))
                if c == "memory":
                    _write(vm / "memory.limit_in_bytes", str(memory_bytes))
                    limits["memory"] = str(memory_bytes)
                elif c == "cpu":
                    _write(vm / "cpu.cfs_period_us", "100000")
                    _write(vm / "cpu.cfs_quota_us", str(cpus * 100000))
                    limits["cpu"] = f"{cpus} CPU"
                elif c == "pids":
                    _write(vm / "pids.max", str(PIDS_MAX))
                    limits["pids"] = str(PIDS_MAX)
            except OSError as e:
                errors.append(f"{c}: {e}")
    out: dict[str, Any] = {"version": cg.version, "dirs": dirs, "limits": limits}
    if errors:
        out["errors"] = errors
    return out


def remove_cgroups(files_dir: Path) -> None:
    """Delete this VM's cgroup folders (after its QEMU exited); best effort."""
    d = describe(files_dir)
    for p in (d.get("cgroup") or {}).get("dirs") or []:
        with contextlib.suppress(OSError):
            os.rmdir(p)


# -- preparing the jail (in the shim, as root) -----------------------------------------


@dataclass
class Bind:
    src: str
    writable: bool = False
    dev: bool = False  # a device node (keeps dev semantics)
    idmap: bool = False  # an idmapped mount: root's files appear owned by QEMU's uid
    # where QEMU will look for it: the path as its argv (or a qcow2 header) names it,
    # which may go through symlinks that do not exist in the jail; default: src
    dst: str | None = None


@dataclass
class Plan:
    """Everything :func:`enter` does, computed beforehand (no work after fork)."""

    uid: int
    gid: int
    groups: list[int]
    mountpoint: str
    cwd: str
    binds: list[Bind]
    symlinks: dict[str, str]  # path in the jail -> target
    cgroup_procs: list[str]
    record: dict[str, Any] = field(default_factory=dict)
    new_net: bool = False  # no guest network: no host network (nor abstract sockets)
    userns_fd: int = -1  # for idmapped binds: a user namespace mapping 0 -> QEMU's uid
    pass_fds: list[int] = field(default_factory=list)
    fds_to_close: list[int] = field(default_factory=list)


def ids_for(home: Path, vm_id: str) -> tuple[int, int, int]:
    """(uid, gid, shared asset gid) of a VM's QEMU."""
    base = int(os.environ.get("TORPOR_JAIL_UID_BASE") or DEFAULT_UID_BASE)
    h = hashlib.blake2b(f"{home}\0{vm_id}".encode(), digest_size=8).digest()
    n = base + 1 + int.from_bytes(h, "big") % UID_SPAN
    return n, n, base


def _share_read(p: Path, gid: int) -> None:
    """Let the jail group read a shared read-only asset (kernel, initramfs, base disk)
    that other local users cannot read: group ``gid`` (no real user is in it), g+r."""
    st = p.stat()
    if st.st_mode & stat.S_IROTH:
        return
    if st.st_gid != gid:
        os.chown(p, -1, gid)
    if not st.st_mode & stat.S_IRGRP:
        os.chmod(p, stat.S_IMODE(st.st_mode) | stat.S_IRGRP)


def _own(p: Path, uid: int, gid: int) -> None:
    """Give a VM's own file (overlay, RAM) to its QEMU's uid; never through a link."""
    st = os.lstat(p)
    if not stat.S_ISREG(st.st_mode):
        raise JailError("not a regular file", step="jail", path=p)
    os.chown(p, uid, gid, follow_symlinks=False)
    os.chmod(p, 0o600)


def _listen(path: Path) -> socket.socket:
    """A listening unix socket at ``path`` (relative to the VM folder, the cwd)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        s.bind(path.name)
    finally:
        os.umask(old)
    s.listen(16)
    return s


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _userns_fd(uid: int, gid: int) -> int:
    """An fd of a new user namespace whose uid/gid 0 is ``uid``/``gid`` outside: the
    mapping for idmapped mounts.  A forked child creates it and exits; the fd keeps
    it alive.  -1 when the kernel refuses (then shared assets are group-read)."""
    libc = ctypes.CDLL(None, use_errno=True)
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only calls libc and exits
        try:
            os.close(r)
            os.close(w2)
            ok = libc.unshare(CLONE_NEWUSER) == 0
            os.write(w, b"1" if ok else b"0")
            os.read(r2, 1)
        finally:
            os._exit(0)
    os.close(w)
    os.close(r2)
    try:
        if os.read(r, 1) != b"1":
            return -1
        for name, n in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"0 {n} 1\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1
    finally:
        os.close(r)
        os.close(w2)  # the child exits; reaped off the start path (~2 ms here)
        threading.Thread(target=_reap, args=(pid,), daemon=True).start()


def prepare(
    home: Path,
    vm_id: str,
    vm_dir: Path,
    argv: list[str],
    *,
    kernel: Path,
    initrd: Path,
    disk: Path,
    ram: Path | None,
    memory_mib: int,
    cpus: int,
    accel: str,
    network: bool = True,
) -> tuple[list[str], Plan]:
    """Set up files, sockets and cgroups for one jailed QEMU; returns QEMU's argv with
    every socket and log it would create turned into an inherited fd.  Raises JailError."""
    fds: list[int] = []
    try:
        return _prepare(
            home, vm_id, vm_dir, argv, kernel, initrd, disk, ram, memory_mib, cpus, accel,
            network, fds,
        )
    except BaseException as e:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if isinstance(e, OSError):
            raise JailError(f"cannot prepare QEMU's jail: {e}", step="jail", path=vm_dir) from e
        raise


def _opts(value: str) -> tuple[str, dict[str, str]]:
    """A QEMU option string "backend,k=v,..." (no ",," escapes: refused)."""
    if ",," in value:
        raise JailError(f"cannot jail a QEMU option with an escaped comma: {value!r}", step="jail")
    head, *rest = value.split(",")
    return head, dict(kv.partition("=")[::2] for kv in rest)


def _join(head: str, opts: dict[str, str]) -> str:
    return ",".join([head, *(f"{k}={v}" if v else k for k, v in opts.items())])


def rewrite_argv(argv: list[str], vm_dir: Path, fds: list[int]) -> list[str]:
    """Turn every file QEMU would create in the VM folder into an fd the shim opened:
    listening unix sockets (``-chardev socket,path=…,server=on``, ``-qmp unix:…``) are
    bound here (root-owned, under umask 077) and passed as ``fd=N``; ``-chardev file``
    logs are opened here and passed through ``-add-fd`` / ``/dev/fdset/N``.  Anything
    else that would make QEMU create a file is refused, loudly."""

    def where(p: str) -> Path:
        return Path(p) if p.startswith("/") else vm_dir / p

    def listen(p: str) -> int:
        s = _listen(where(p))
        fd = s.detach()
        fds.append(fd)
        return fd

    out: list[str] = []
    sets = 0
    i = 0
    while i < len(argv):
        a = argv[i]
        v = argv[i + 1] if i + 1 < len(argv) else ""
        if a == "-chardev":
            head, o = _opts(v)
            if head == "socket" and "path" in o:
                if o.get("server") not in ("on", "yes", "true"):
                    raise JailError(f"cannot jail a client socket chardev: {v!r}", step="jail")
                o["fd"] = str(listen(o.pop("path")))
                v = _join(head, o)
            elif head == "file" and "path" in o:
                flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
                flags |= os.O_APPEND if o.get("append") in ("on", "yes", "true") else os.O_TRUNC
                fd = os.open(where(o["path"]), flags, 0o600)
                fds.append(fd)
                sets += 1
                out += ["-add-fd", f"fd={fd},set={sets}"]
                o["path"] = f"/dev/fdset/{sets}"
                v = _join(head, o)
            elif "path" in o or head in ("pipe", "serial", "parallel", "pty"):
                raise JailError(f"cannot jail chardev {v!r}", step="jail")
            out += [a, v]
            i += 2
            continue
        if a == "-qmp":
            if not v.startswith("unix:"):
                raise JailError(f"cannot jail -qmp {v!r}", step="jail")
            head, o = _opts(v[len("unix:") :])
            cid = f"jailqmp{i}"
            o = {"id": cid, "fd": str(listen(head)), **{k: x for k, x in o.items() if k != "id"}}
            out += ["-chardev", _join("socket", o), "-mon", f"chardev={cid},mode=control"]
            i += 2
            continue
        host_file = v.split(":", 1)[0] in ("file", "unix", "pipe")
        if a in ("-pidfile", "-D") or (a in ("-serial", "-monitor") and host_file):
            raise JailError(f"cannot jail {a} {v!r}", step="jail")
        out.append(a)
        i += 1
    return out


def _prepare(
    home: Path, vm_id: str, vm_dir: Path, argv: list[str], kernel: Path, initrd: Path,
    disk: Path, ram: Path | None, memory_mib: int, cpus: int, accel: str, network: bool,
    fds: list[int],
) -> tuple[list[str], Plan]:
    uid, gid, shared = ids_for(home, vm_id)
    vm_dir = vm_dir.resolve()
    mountpoint = vm_dir / MOUNTPOINT
    mountpoint.mkdir(mode=0o700, exist_ok=True)
    binds: list[Bind] = []
    symlinks: dict[str, str] = {}
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):
            symlinks[top] = os.readlink(top)
        elif os.path.isdir(top):
            binds.append(Bind(top))
    if os.path.exists("/etc/ld.so.cache"):
        binds.append(Bind("/etc/ld.so.cache"))
    devs = ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"]
    groups = [shared]
    if accel == "kvm":
        devs.append("/dev/kvm")
        groups.append(os.stat("/dev/kvm").st_gid)
    binds += [Bind(d, writable=True, dev=True) for d in devs]
    # shared, read-only: kernel, initramfs, the backing chain of the overlay.  They
    # stay 0400 root: bound idmapped, they appear owned by QEMU's uid in its jail alone
    userns = _userns_fd(uid, gid)
    if userns >= 0:
        fds.append(userns)

    def shared_asset(p: Path, literal: str) -> Bind:
        if userns < 0:
            _share_read(p, shared)
        return Bind(str(p), idmap=userns >= 0, dst=literal)

    for p in (kernel, initrd):
        binds.append(shared_asset(p.resolve(), os.path.abspath(p)))
    # The overlay's header is QEMU's to write: a QEMU that was taken over could name
    # any host file as its backing file, to have it made readable and bound into its
    # jail at the next start.  So a backing file must be an image's base disk.
    images = (home / "images").resolve()
    cur, cur_literal = disk.resolve(), os.path.abspath(disk)
    for _ in range(MAX_BACKING_CHAIN + 1):
        back = qcow2_backing(cur)
        if not back:
            break
        # QEMU opens a relative backing name next to the overlay's path as it opened it
        literal = os.path.normpath(os.path.join(os.path.dirname(cur_literal), back))
        nxt = Path(literal).resolve()
        st = os.lstat(nxt)
        if not nxt.is_relative_to(images) or not stat.S_ISREG(st.st_mode):
            raise JailError(
                f"the VM's disk names {back!r} as its backing file, which is not an "
                "image's base disk; refusing to expose it to QEMU",
                step="jail",
                path=disk,
            )
        binds.append(shared_asset(nxt, literal))
        cur, cur_literal = nxt, literal
    else:
        raise JailError("the disk's backing chain is too long (or loops)", step="jail", path=disk)
    # the VM's own, read-write: overlay and RAM file (created here if QEMU would); no
    # RAM file for a VM mapping a sealed base (an inherited fd: torpor.vmm.basemem)
    if ram is not None and not ram.exists():
        os.close(os.open(ram, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for p in (disk, ram) if ram is not None else (disk,):
        _own(p, uid, gid)
        binds.append(Bind(str(p.resolve()), writable=True, dst=os.path.abspath(p)))
    # no host folder is writable by QEMU: sockets and logs are passed as fds
    n_private = len(fds)
    argv = rewrite_argv(argv, vm_dir, fds)
    key = f"{hashlib.blake2b(str(home).encode(), digest_size=6).hexdigest()}-{vm_id}"
    memory = memory_mib * (1 << 20) + MEM_OVERHEAD
    cg = _setup_cgroups(key, memory, cpus)
    procs = [str(Path(d) / "cgroup.procs") for d in cg.get("dirs", [])]
    record = {
        "applied": True,
        "uid": uid,
        "gid": gid,
        "groups": groups,
        "capabilities": "none (bounding, permitted, effective, inheritable, ambient empty)",
        "no_new_privs": True,
        "namespaces": ["pid", "mount", "ipc", "uts"] + ([] if network else ["net"]),
        "root": "tmpfs, read-only: /usr, libraries, /dev/{null,zero,random,urandom}, /proc, "
        "kernel, initramfs, base disk; read-write: this VM's overlay and RAM file"
        if ram is not None
        else "tmpfs, read-only: /usr, libraries, /dev/{null,zero,random,urandom}, /proc, "
        "kernel, initramfs, base disk; read-write: this VM's overlay; guest RAM: a sealed "
        "shared base, an inherited fd mapped copy-on-write",
        "seccomp": "QEMU -sandbox on (obsolete, elevateprivileges, spawn, resourcecontrol denied)",
        "cgroup": cg,
        "shared_files": "idmapped read-only binds (root's 0400 files appear owned by "
        "QEMU's uid in its jail only)"
        if userns >= 0
        else f"group-readable by the jail group {shared} (no idmapped mounts here)",
    }
    plan = Plan(
        uid=uid,
        gid=gid,
        groups=groups,
        mountpoint=str(mountpoint),
        cwd=os.path.dirname(os.path.abspath(disk)),
        binds=binds,
        symlinks=symlinks,
        cgroup_procs=procs,
        record=record,
        pass_fds=list(fds[n_private:]),
        new_net=not network,
        userns_fd=userns,
    )
    plan.fds_to_close = list(fds)
    return argv, plan  # jail.json is written by join_cgroups, after the spawn


def _write_record(vm_dir: Path, record: dict[str, Any]) -> None:
    """jail.json, replaced atomically but not fsync'd, and off the start path: it
    describes the running QEMU and is rewritten at every start, so a crash may lose
    it but never tear it.  (On the start path an fsync cost ~8 ms, and on ext4 even
    the rename over the old file flushes the new one: 1-11 ms here.)"""
    tmp = vm_dir / f".{JAIL_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, vm_dir / JAIL_FILE)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def record_unjailed(vm_dir: Path, reason: str) -> None:
    """jail.json for a QEMU without a jail, written on a thread (see _write_record)."""
    rec = {"applied": False, "reason": reason}
    threading.Thread(target=_write_record, args=(vm_dir, rec), daemon=True).start()


def close_parent_fds(plan: Plan) -> None:
    """After QEMU's spawn (or a failed one): close the shim's copies of QEMU's fds."""
    for fd in plan.fds_to_close:
        with contextlib.suppress(OSError):
            os.close(fd)
    plan.fds_to_close = []


def join_cgroups(plan: Plan, pid: int) -> threading.Thread:
    """Write ``jail.json``, move the spawned QEMU (all its threads) into its cgroups,
    then sweep stale VM cgroups (:func:`_sweep`) — on a thread, concurrent with
    QEMU's start-up.

    Not in the child before ``exec``: attaching a task to a cgroup waits for an RCU
    grace period (the cgroup threadgroup rwsem), measured here at 0-45 ms per start
    on a busy host, which sat on the critical path of every restore.  The cost of
    doing it from outside: QEMU's first milliseconds are charged to the shim's cgroup
    (and, as before, a restore's RAM pages are charged to whoever copies them: the
    shim's thread).  A failure (QEMU already gone) is recorded in ``jail.json``."""
    procs = list(plan.cgroup_procs)
    tops = [str(Path(p).parent.parent) for p in procs]

    def run() -> None:
        _write_record(Path(plan.cwd), plan.record)
        errors = []
        for path in procs:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, str(pid).encode())
                finally:
                    os.close(fd)
            except OSError as e:
                errors.append(f"{path}: {e}")
        if errors:
            rec = dict(plan.record)
            rec["cgroup"] = {**rec.get("cgroup", {}), "join_errors": errors}
            _write_record(Path(plan.cwd), rec)
        _sweep(tops)

    t = threading.Thread(target=run, name="cgroup-join", daemon=True)
    t.start()
    return t


# -- spawning into a new PID namespace (in the shim) ------------------------------------


class NewPidNamespace:
    """``with NewPidNamespace(): Popen(...)``: the next child becomes PID 1 of a new PID
    namespace; the shim itself stays in (and returns to) its own for later children."""

    def __enter__(self) -> NewPidNamespace:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        if self._libc.unshare(CLONE_NEWPID) != 0:
            e = ctypes.get_errno()
            os.close(self._fd)
            raise JailError(f"unshare(CLONE_NEWPID): {os.strerror(e)}", step="jail")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._libc.setns(self._fd, CLONE_NEWPID) != 0:
                e = ctypes.get_errno()
                raise JailError(f"setns back to the host PID namespace: {os.strerror(e)}")
        finally:
            os.close(self._fd)


# -- entering the jail (in the child, between fork and exec) ----------------------------


def enter_fn(plan: Plan) -> Any:
    """A ``preexec_fn`` that jails the child; everything it needs is bound now."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]
    libc.syscall.restype = ctypes.c_long
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    root = plan.mountpoint
    setups: list[tuple[str, str, bool, bool, bool]] = []  # src, dst, isdir, writable, dev
    idmapped: list[tuple[str, str]] = []
    for b in plan.binds:
        if b.idmap:
            idmapped.append((b.src, root + (b.dst or b.src)))
        else:
            dst = root + (b.dst or b.src)
            setups.append((b.src, dst, os.path.isdir(b.src), b.writable, b.dev))
    attr = ctypes.create_string_buffer(
        struct.pack(
            "QQQQ",
            MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
            | MOUNT_ATTR_NOEXEC,
            0,
            0,
            max(plan.userns_fd, 0),
        ),
        32,
    )
    links = [(root + k, v) for k, v in plan.symlinks.items()]
    cwd = plan.cwd
    net = CLONE_NEWNET if plan.new_net else 0

    def fail(what: str) -> None:
        err = ctypes.get_errno()
        msg = f"torpor jail: {what}: {os.strerror(err)}\n".encode()
        os.write(2, msg)
        raise OSError(err, what)

    def mount(src: str | None, dst: str, fs: str | None, flags: int, data: str | None = None):
        if libc.mount(
            src.encode() if src else None, dst.encode(), fs.encode() if fs else None, flags,
            data.encode() if data else None,
        ) != 0:
            fail(f"mount {src} on {dst}")

    def mkdirs(p: str) -> None:
        os.makedirs(p, mode=0o755, exist_ok=True)

    def enter() -> None:
        os.umask(0o022)  # the jail's own folders must be traversable by QEMU's uid
        if libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | net) != 0:
            fail("unshare(mount, ipc, uts)")
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        mount("torpor-jail", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for src, dst, isdir, writable, dev in setups:
            if isdir:
                mkdirs(dst)
            else:
                mkdirs(os.path.dirname(dst))
                os.close(os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600))
            mount(src, dst, None, MS_BIND | (MS_REC if isdir else 0))
            flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (0 if dev else MS_NODEV)
            if not writable:
                flags |= MS_RDONLY
            if not isdir and not dev:  # system folders keep exec: QEMU and its libraries
                flags |= MS_NOEXEC
            mount(None, dst, None, flags)
        for src, dst in idmapped:
            mkdirs(os.path.dirname(dst))
            os.close(os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600))
            t = libc.syscall(SYS_OPEN_TREE, AT_FDCWD, src.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC)
            if t < 0:
                fail(f"open_tree {src}")
            if libc.syscall(SYS_MOUNT_SETATTR, t, b"", AT_EMPTY_PATH, attr, 32) != 0:
                fail(f"idmapped mount of {src}")
            if libc.syscall(
                SYS_MOVE_MOUNT, t, b"", AT_FDCWD, dst.encode(), MOVE_MOUNT_F_EMPTY_PATH
            ) != 0:
                fail(f"move_mount {src}")
            os.close(t)
        for dst, target in links:
            os.symlink(target, dst)
        mkdirs(root + "/proc")
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mkdirs(root + "/.old")
        if libc.syscall(SYS_PIVOT_ROOT, root.encode(), (root + "/.old").encode()) != 0:
            fail("pivot_root")
        os.chdir("/")
        if libc.umount2(b"/.old", MNT_DETACH) != 0:
            fail("umount old root")
        os.rmdir("/.old")
        mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.chdir(cwd)
        for cap in range(last_cap + 1):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                fail(f"drop capability {cap} from the bounding set")
        os.setgroups(plan.groups)
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
        # setuid away from 0 cleared permitted/effective/ambient; clear inheritable too
        hdr = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()
        if libc.syscall(SYS_CAPSET, hdr, data) != 0:
            fail("capset")
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            fail("no_new_privs")
        # after the uid change: changing credentials clears the parent-death signal
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.umask(0o077)

    return enter


def as_dict(plan: Plan) -> dict[str, Any]:
    return asdict(plan)


# -- the hook in torpor.vmm.launch ------------------------------------------------------


def for_launch(
    home: Path, cfg: Any, files: Any, spec: Any, argv: list[str], keep_fds: tuple[int, ...] = ()
) -> tuple[list[str], Plan | None]:
    """(QEMU's argv, plan) for a VM about to start: the argv with its sockets and logs
    as inherited fds when jailed; (argv, None) when no jail applies (``jail.json``
    then says why).  ``keep_fds`` are inherited by QEMU too (a sealed RAM base: then
    ``spec.ram_file`` is ``/proc/self/fd/N`` and no RAM file is bound); the caller
    keeps and closes them."""
    on, why = wanted()
    if not on:
        record_unjailed(files.dir, why)
        return argv, None
    argv, plan = prepare(
        home,
        cfg.id,
        files.dir,
        argv,
        kernel=spec.kernel,
        initrd=spec.initrd,
        disk=files.disk,
        ram=None if str(spec.ram_file).startswith("/proc/self/fd/") else files.ram,
        memory_mib=cfg.memory_mib,
        cpus=cfg.cpus,
        accel=spec.accel,
        network=bool(cfg.network),
    )
    plan.pass_fds += list(keep_fds)
    return argv, plan
