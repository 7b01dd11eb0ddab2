"""On-disk state of one VM: ``vm.json`` (what was asked) and ``state.json`` (what is).

``vm.json`` is written once by ``create`` and never changes afterwards except
through :func:`save_config` (rename).  ``state.json`` is written only by the
VM's shim while it lives, and by the manager when it finds the shim dead.
Both carry ``schema_version``; a file with an unknown major version is refused
rather than guessed at.  Writes are atomic (temp, rename), so never torn; how durable
each is depends on what a host crash may show:

- ``save_*`` (temp, fsync, rename, fsync of the folder): survives a host crash.
- :func:`write_synced` (contents fsync'd, the folder not): never torn, even for a new
  file, but the rename may roll back after a host crash (to the old file, or none).
  Used only where the rolled-back state is one a crash a moment earlier shows anyway
  (a restore's ``snapshot.ref`` and ``restore.json``).
- ``state.json``'s unsynced variant (:func:`save_state` with ``synced=False``, the
  shim's start-up records): same rule; a zero-length file is what a host crash can
  leave of an unsynced *new* file on ext4, and :func:`load_state` reads it as never
  written (CREATED), which is what it was.

Liveness is never taken from ``state.json`` alone: a recorded pid is alive only
if ``/proc/<pid>/stat`` shows the same start time, so a reboot or pid reuse
cannot make a dead VM look running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torpor.errors import VMError
from torpor.fsutil import atomic_write_json, read_json
from torpor.vmm.logfile import DEFAULT_MAX_FILES, DEFAULT_MAX_SIZE

SCHEMA_VERSION = 1


class Status(enum.StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"
    DEAD = "dead"  # the shim vanished without recording an exit (kill -9, host reboot)
    HIBERNATED = "hibernated"  # ended right after a snapshot; `start` restores it

    @property
    def active(self) -> bool:
        return self in (Status.STARTING, Status.RUNNING, Status.STOPPING)


@dataclass(frozen=True)
class PortMap:
    host_port: int
    guest_port: int
    host_ip: str = "127.0.0.1"
    proto: str = "tcp"

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.guest_port}/{self.proto}"


@dataclass(frozen=True)
class VMConfig:
    id: str
    name: str
    image_id: str
    image_ref: str
    command: tuple[str, ...]
    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""
    memory_mib: int = 512
    cpus: int = 1
    accel: str = "auto"  # requested: auto | kvm | tcg
    ports: tuple[PortMap, ...] = ()
    network: bool = True
    stdin_open: bool = False
    tty: tuple[int, int] | None = None  # (cols, rows): the main command's terminal (run -t)
    auto_remove: bool = False
    # auto_remove is the caller's to do once it has the main command's exit (`torpor run
    # --rm`, attached): the shim does not remove the VM on its own, even if the command
    # ended before the caller could attach (its exit would go with the record)
    client_removes: bool = False
    created: float = field(default_factory=time.time)
    labels: dict[str, str] = field(default_factory=dict)
    # caps on main.log and console.log, each (see torpor.vmm.logfile); VMs made before
    # the caps existed get the defaults
    log_max_size: int = DEFAULT_MAX_SIZE
    log_max_files: int = DEFAULT_MAX_FILES
    # the content digest of the base disk under the overlay (torpor.snapshot.base): a
    # restore finds the base by it, never by image id or path.  "" until the VM's
    # first snapshot records it (and in VMs made before it existed)
    base_digest: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VMConfig:
        _check_version(d, "vm.json")
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["command"] = tuple(d.get("command", ()))
        d["env"] = tuple(d.get("env", ()))
        d["ports"] = tuple(PortMap(**p) for p in d.get("ports", ()))
        return cls(**d)


@dataclass(frozen=True)
class VMState:
    status: Status = Status.CREATED
    shim_pid: int = 0
    shim_start: int = 0
    qemu_pid: int = 0
    qemu_start: int = 0
    accel: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    exit_code: int | None = None
    error: str = ""
    boot_ms: float = 0.0
    main_id: int = 0  # the guest agent's request id of the main command (kept over restore)
    # non-empty while QEMU holds the guest paused on a host I/O error (a full disk);
    # the shim also keeps it in VMFiles.io_error, which a full disk cannot refuse
    io_error: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VMState:
        _check_version(d, "state.json")
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["status"] = Status(d.get("status", "created"))
        return cls(**d)

    def replace(self, **kw: Any) -> VMState:
        return dataclasses.replace(self, **kw)


def _check_version(d: dict[str, Any], what: str) -> None:
    v = d.get("schema_version", 1)
    if not isinstance(v, int) or v < 1 or v > SCHEMA_VERSION:
        raise VMError(
            f"{what} has schema_version {v!r}; this torpor reads up to {SCHEMA_VERSION}",
            step="read VM state",
        )


def load_config(vm_dir: Path) -> VMConfig:
    return VMConfig.from_json(read_json(vm_dir / "vm.json"))


def save_config(vm_dir: Path, cfg: VMConfig) -> None:
    atomic_write_json(vm_dir / "vm.json", cfg.to_json(), mode=0o600)


def load_state(vm_dir: Path) -> VMState:
    try:
        data = (vm_dir / "state.json").read_bytes()
    except FileNotFoundError:
        return VMState()
    if not data:  # an unsynced first write cut by a host crash: never written
        return VMState()
    return VMState.from_json(json.loads(data))


def save_state(vm_dir: Path, st: VMState, synced: bool = True) -> None:
    """``synced=False``: atomic (rename) but no fsync at all, for a record whose loss
    on a host crash shows what a crash a moment earlier shows (see the module doc)."""
    if synced:
        atomic_write_json(vm_dir / "state.json", st.to_json(), mode=0o600)
    else:
        write_quick(vm_dir / "state.json", st.to_json())


def write_quick(path: Path, obj: Any) -> None:
    """``obj`` as JSON into ``path`` atomically (temporary file, rename), not fsync'd."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_synced(path: Path, data: bytes) -> None:
    """``data`` into ``path``: contents fsync'd, then renamed, the folder not fsync'd.

    Never torn (the contents are on disk before the name points at them); after a
    host crash the name may still show the old file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def overwrite_state(vm_dir: Path, st: VMState) -> None:
    """Rewrite ``state.json`` in place: the fallback when the disk is full.

    The atomic write needs a new file, hence a free block; overwriting the existing
    file reuses its own block (the state is far smaller than one), so a VM that ends
    on a full disk still records how, instead of being found "dead".  Not atomic: used
    only when the atomic write failed with ENOSPC.  Raises OSError.
    """
    data = (json.dumps(st.to_json(), indent=2, sort_keys=True) + "\n").encode()
    fd = os.open(vm_dir / "state.json", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def proc_start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot, or 0 if it is not running."""
    if pid <= 0:
        return 0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    # comm may contain spaces and parens: fields resume after the last ')'
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":
        return 0
    return int(fields[19])


def alive(pid: int, start: int) -> bool:
    return pid > 0 and start > 0 and proc_start_time(pid) == start


def pidfd_if_alive(pid: int, start: int) -> int | None:
    """A pidfd on ``pid`` if it is still the process that started at ``start``, else
    None.  Opened first, checked second: a signal through it can never reach a process
    that took the pid over later.  The caller closes it."""
    if pid <= 0 or start <= 0:
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone already
        return None
    if proc_start_time(pid) != start:
        os.close(fd)
        return None
    return fd


def signal_if_alive(pid: int, start: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` if it is still the process that started at ``start``
    (through a pidfd: never to a process that took the pid over)."""
    fd = pidfd_if_alive(pid, start)
    if fd is None:
        return
    try:
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
            signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)
