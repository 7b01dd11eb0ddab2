"""The VM library API: create, start, stop, remove, list, connect.

The CLI (and later the HTTP server) builds a :class:`RunRequest` and calls
:class:`VMManager`; nothing here prints.  A VM is a folder ``Paths.vm(id)``
plus a name link ``Paths.names/<name>``; the link is created with ``symlink``,
which fails if the name exists, so two concurrent ``run --name x`` cannot both
win.  A VM folder without ``vm.json`` is an interrupted create and is removed on
sight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import re
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torpor.errors import (
    ConflictError,
    NotFoundError,
    TorporError,
    UsageError,
    VMError,
)
from torpor.fsutil import locked, private_opener
from torpor.image.config import merge_env, resolve_command
from torpor.paths import Paths
from torpor.vmm.layout import VMFiles, reap_ram_dirs
from torpor.vmm.logfile import Follower, LogLimits, read_all
from torpor.vmm.sockets import connect_unix
from torpor.vmm.state import (
    PortMap,
    Status,
    VMConfig,
    VMState,
    alive,
    load_config,
    load_state,
    pidfd_if_alive,
    proc_start_time,
    save_config,
    save_state,
    signal_if_alive,
)

if TYPE_CHECKING:
    from torpor.agent.client import AgentClient
    from torpor.image.store import Image, ImageStore

# Start-up (issue 10): `torpor ps`, `exec VM true` and `images` construct a VMManager
# but never create or boot a VM, so the image store (zstandard, manifest parsers), the
# boot code (kernel, initramfs, QEMU argv), the zygote and the agent protocol are
# imported inside the methods that use them, not here (tests/cli/test_startup.py).

# torpor's own labels that a restore or fork keeps (see RunRequest.from_config)
INHERITED_LABELS = ("torpor.sandbox.",)
STAGING_PREFIX, STAGING_GRACE_S = ".new-", 60.0  # see new_vm_folder
# \Z, not $: "$" also matches before a trailing newline ("box\n" would pass .match)
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}\Z")
_ADJ = (
    "brave",
    "calm",
    "eager",
    "fond",
    "gentle",
    "happy",
    "jolly",
    "keen",
    "lucid",
    "merry",
    "nifty",
    "proud",
    "quiet",
    "sleepy",
    "swift",
    "tender",
    "vivid",
    "witty",
)
_NOUN = (
    "badger",
    "bear",
    "dormouse",
    "hedgehog",
    "lemur",
    "marmot",
    "otter",
    "panda",
    "possum",
    "sloth",
    "squirrel",
    "tortoise",
    "walrus",
    "wombat",
)


@dataclass(frozen=True)
class RunRequest:
    """Everything ``torpor run`` / ``create`` can say; the CLI and HTTP API build this."""

    image: str
    command: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    name: str | None = None
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    memory_mib: int = 512
    cpus: int = 1
    accel: str = "auto"
    ports: tuple[PortMap, ...] = ()
    network: bool = True
    stdin_open: bool = False
    tty: tuple[int, int] | None = None  # (cols, rows): run the command on a terminal
    auto_remove: bool = False
    client_removes: bool = False  # see VMConfig.client_removes
    labels: dict[str, str] = field(default_factory=dict)
    log_limits: LogLimits = field(default_factory=LogLimits)  # main.log, console.log each

    @classmethod
    def from_config(
        cls, cfg: VMConfig, name: str | None = None, ports: tuple[PortMap, ...] = ()
    ) -> RunRequest:
        """The request that recreates ``cfg`` (a restore or fork), under a new name.

        Port forwards are not inherited: the source VM may still hold its host ports
        (QEMU cannot bind one twice), so a restore or fork forwards only ``ports``.
        Labels are, except torpor's own (``torpor.*``, e.g. the session that owns a VM):
        a copy someone makes of a session's VM is theirs, and the session's removal
        must not take it along.  ``torpor.sandbox.*`` labels are settings of the
        machine, not ownership (a sandbox's ``timeout`` and ``idle``), and are kept.
        """
        return cls(
            image=cfg.image_id,
            command=cfg.command or ("true",),
            name=name,
            env=cfg.env,
            workdir=cfg.workdir,
            user=cfg.user,
            memory_mib=cfg.memory_mib,
            cpus=cfg.cpus,
            accel=cfg.accel,
            ports=ports,
            network=cfg.network,
            labels={
                k: v
                for k, v in cfg.labels.items()
                if not k.startswith("torpor.") or k.startswith(INHERITED_LABELS)
            },
            log_limits=LogLimits(cfg.log_max_size, cfg.log_max_files),
        )


@dataclass(frozen=True)
class VM:
    config: VMConfig
    state: VMState
    dir: Path

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def files(self) -> VMFiles:
        return VMFiles(self.dir)

    @property
    def running(self) -> bool:
        return self.state.status in (Status.RUNNING, Status.STARTING)


def exec_settings(
    cfg: VMConfig,
    env: list[str] | tuple[str, ...] = (),
    cwd: str | None = None,
    user: str | None = None,
) -> tuple[list[str], str, str]:
    """(env, cwd, user) of a command run in the VM: ``env`` over the VM's, and the
    VM's working directory and user where none is given (``torpor exec``, Sandbox)."""
    return (
        merge_env(list(cfg.env), list(env)),
        cwd if cwd is not None else cfg.workdir,
        user if user is not None else cfg.user,
    )


def parse_memory(text: str) -> int:
    """Docker-style memory size (``512m``, ``2G``, ``1048576`` bytes) to MiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)i?b?\s*", text.lower())
    if not m:
        raise UsageError(f"invalid memory size {text!r} (examples: 512M, 2G)")
    n = float(m.group(1))
    unit = m.group(2) or "b"
    mib = n * {"b": 1 / 2**20, "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}[unit]
    if mib < 64:
        hint = ""
        if not m.group(2) and n >= 64:  # bytes, as in Docker; MiB was likely meant
            hint = f" (a number without a unit is bytes: did you mean {m.group(1)}M?)"
        raise UsageError(f"memory {text!r} is too small: a VM needs at least 64M{hint}")
    if mib > 1024 * 1024:
        raise UsageError(f"memory {text!r} is too large")
    return int(mib)


ENV_FILE_MAX = 1 << 20  # an env file is a few lines; a huge one is a mistake


def read_env_file(path: Path) -> list[str]:
    """``docker run --env-file``: one ``K=V`` (or ``K``, copied from the caller) a line;
    blank lines and ``#`` comments skipped; no quoting (the value is the rest of the
    line, as in Docker).  Unreadable, too large or malformed: UsageError naming the line."""
    try:
        with open(path, "rb") as f:
            data = f.read(ENV_FILE_MAX + 1)
    except OSError as e:
        raise UsageError(f"cannot read env file {str(path)!r}: {e.strerror or e}") from e
    if len(data) > ENV_FILE_MAX:
        raise UsageError(f"env file {str(path)!r} is larger than {ENV_FILE_MAX} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"env file {str(path)!r} is not UTF-8") from e
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        key = line.partition("=")[0]
        if not key or "\0" in line or any(c.isspace() for c in key):
            raise UsageError(f"{path}:{n}: invalid line (expected K=V or K)")
        out.append(line)
    return out


def parse_port(text: str) -> PortMap:
    """``[ip:]host_port:guest_port[/tcp|udp]`` (Docker's -p syntax)."""
    proto = "tcp"
    spec = text
    if "/" in spec:
        spec, proto = spec.rsplit("/", 1)
        if proto not in ("tcp", "udp"):
            raise UsageError(f"invalid port mapping {text!r}: protocol must be tcp or udp")
    parts = spec.rsplit(":", 2)
    try:
        if len(parts) == 3:
            ip, hp, gp = parts[0] or "127.0.0.1", int(parts[1]), int(parts[2])
        elif len(parts) == 2:
            ip, hp, gp = "127.0.0.1", int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"invalid port mapping {text!r} (expected [ip:]hostPort:guestPort)"
        ) from None
    for p in (hp, gp):
        if not 1 <= p <= 65535:
            raise UsageError(f"invalid port mapping {text!r}: port {p} out of range")
    return PortMap(host_port=hp, guest_port=gp, host_ip=ip, proto=proto)


def check_ports(ports: tuple[PortMap, ...]) -> None:
    """Raise ConflictError if a host port of ``ports`` is taken (or named twice).

    QEMU binds forwards at start-up; a taken port made it exit before QMP answered,
    which surfaced as a raw "QMP handshake failed".  Checking first (with
    SO_REUSEADDR, as slirp binds) gives a clear error; a port taken in the instant
    between this check and QEMU's bind still fails the start, with QEMU's message.
    """
    import socket

    seen: set[tuple[str, str, int]] = set()
    for p in ports:
        key = (p.proto, p.host_ip, p.host_port)
        if key in seen:
            raise UsageError(f"host port {p.host_ip}:{p.host_port}/{p.proto} is published twice")
        seen.add(key)
        kind = socket.SOCK_DGRAM if p.proto == "udp" else socket.SOCK_STREAM
        try:
            family = socket.getaddrinfo(p.host_ip, p.host_port, type=kind)[0][0]
            with socket.socket(family, kind) as s:
                if kind == socket.SOCK_STREAM:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((p.host_ip, p.host_port))
        except OSError as e:
            what = (
                "is already in use"
                if e.errno == errno.EADDRINUSE
                else f"cannot be bound ({e.strerror or e})"
            )
            raise ConflictError(
                f"host port {p.host_ip}:{p.host_port}/{p.proto} {what}; "
                "publish another one with -p HOST:GUEST (restore and fork take -p too)"
            ) from e


def config_for(
    req: RunRequest,
    image: Image,
    vm_id: str,
    name: str,
    command: list[str] | None = None,
    env: list[str] | None = None,
) -> VMConfig:
    """The config ``create`` records for ``req`` (a pooled restore's spare VM is made
    from the same, before it has a name of its own: torpor.vmm.pool)."""
    if command is None:
        command = resolve_command(
            image.config,
            list(req.entrypoint) if req.entrypoint is not None else None,
            list(req.command) if req.command else None,
        )
    if env is None:
        env = merge_env(list(image.config.env), list(req.env))
    return VMConfig(
        id=vm_id,
        name=name,
        image_id=image.id,
        image_ref=req.image,
        command=tuple(command),
        env=tuple(env),
        workdir=req.workdir if req.workdir is not None else image.config.working_dir,
        user=req.user if req.user is not None else image.config.user,
        memory_mib=req.memory_mib,
        cpus=req.cpus,
        accel=req.accel,
        ports=req.ports,
        network=req.network,
        stdin_open=req.stdin_open,
        tty=req.tty,
        auto_remove=req.auto_remove,
        client_removes=req.client_removes,
        labels=dict(req.labels),
        log_max_size=req.log_limits.max_size,
        log_max_files=req.log_limits.max_files,
    )


def kill_and_wait(procs: Iterable[tuple[int, int]], timeout: float = 10.0) -> None:
    """SIGKILL each live ``(pid, start time)`` and wait until all have exited.

    Through pidfds: the pid is checked against its start time after the pidfd is
    open, so a reused pid is neither signalled nor waited for, and the wait wakes at
    the exit itself (no sleep-and-poll).  A process still there after ``timeout`` is
    left."""
    fds: list[int] = []
    try:
        for pid, start in procs:
            fd = pidfd_if_alive(pid, start)
            if fd is None:  # gone, or the pid is another process's now
                continue
            fds.append(fd)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        poll = select.poll()
        for fd in fds:
            poll.register(fd, select.POLLIN)
        waiting = set(fds)
        deadline = time.monotonic() + timeout
        while waiting and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poll.poll(left * 1000):
                waiting.discard(fd)
                poll.unregister(fd)
    finally:
        for fd in fds:
            os.close(fd)


def new_vm_folder(paths: Paths, vm_id: str, files: Mapping[str, str] | None = None) -> Path:
    """Make ``vms/<vm_id>`` with its creator's ``.creating`` marker (and ``files``, name
    -> text) already in it: built as ``vms/.new-<vm_id>`` and renamed (in ``vms/``: it
    may be a filesystem of its own), so a folder under its id always names its
    creator.  (Made in place, a ``ps`` between the ``mkdir`` and the marker took it for
    an interrupted create and deleted it under its creator.)  :meth:`VMManager.list`
    removes a staging folder whose creator died, once ``STAGING_GRACE_S`` old."""
    staged = paths.vms / f"{STAGING_PREFIX}{vm_id}"
    staged.mkdir(mode=0o700)
    try:
        me = os.getpid()
        (staged / ".creating").write_text(f"{me} {proc_start_time(me)}\n")
        for name, text in (files or {}).items():
            (staged / name).write_text(text)
        os.rename(staged, paths.vm(vm_id))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return paths.vm(vm_id)


class VMManager:
    def __init__(self, paths: Paths):
        self.paths = paths.ensure()
        self._images: ImageStore | None = None
        # no reap_ram_dirs() here: it reads every torpor home's RAM folder (3-4 ms
        # with 20 homes), a third of an `exec VM true`; list() and create() do it

    @property
    def images(self) -> ImageStore:
        """The image store, opened on first use (creating a VM, ``system df``)."""
        if self._images is None:
            from torpor.image.store import ImageStore

            self._images = ImageStore(self.paths)
        return self._images

    # -- lookup ----------------------------------------------------------------------
    def _load(self, vm_dir: Path) -> VM:
        cfg = load_config(vm_dir)
        st = load_state(vm_dir)
        if st.status.active and not alive(st.shim_pid, st.shim_start):
            # the shim died without recording an exit: kill -9, OOM, host reboot
            signal_if_alive(st.qemu_pid, st.qemu_start, signal.SIGKILL)
            st = st.replace(
                status=Status.DEAD,
                exit_code=st.exit_code if st.exit_code is not None else 137,
                error=st.error or "VM supervisor died",
                finished_at=st.finished_at or time.time(),
            )
            with contextlib.suppress(OSError):
                save_state(vm_dir, st)
        if st.status.active and not st.io_error:
            # the shim keeps it on tmpfs too: state.json cannot be rewritten on a full disk
            with contextlib.suppress(OSError):
                st = st.replace(io_error=VMFiles(vm_dir).io_error.read_text())
        elif not st.status.active and st.io_error:
            st = st.replace(io_error="")
        if st.status == Status.DEAD:  # nobody cleaned up after the shim: free its RAM
            from torpor.vmm.capture import remove_shadow
            from torpor.vmm.lazymem import unmount

            unmount(VMFiles(vm_dir).ram)  # a lazy restore's mount, its server killed
            with contextlib.suppress(OSError):
                VMFiles(vm_dir).ram.unlink()
            remove_shadow(VMFiles(vm_dir).shadow)
        return VM(cfg, st, vm_dir)

    def list(self, all: bool = True) -> list[VM]:
        reap_ram_dirs()  # RAM of VMs (or homes) deleted by hand: freed on sight
        out = []
        for d in sorted(self.paths.vms.iterdir()) if self.paths.vms.exists() else []:
            if d.name == "names" or not d.is_dir():
                continue
            if d.name.startswith(STAGING_PREFIX):  # being made (see new_vm_folder)
                with contextlib.suppress(OSError):
                    if time.time() - d.stat().st_mtime > STAGING_GRACE_S:
                        shutil.rmtree(d, ignore_errors=True)
                continue
            if not (d / "vm.json").exists():
                self._reap_partial(d)
                continue
            with contextlib.suppress(TorporError, OSError, ValueError):
                vm = self._load(d)
                if all or vm.running:
                    out.append(vm)
        out.sort(key=lambda v: v.config.created, reverse=True)
        return out

    def _reap_partial(self, d: Path) -> bool:
        """Remove a VM folder left by an interrupted create (no vm.json, creator dead).

        Returns True if it was removed (or already gone).
        """
        if (d / "vm.json").exists():
            return False
        try:
            pid, start = (int(x) for x in (d / ".creating").read_text().split())
        except (OSError, ValueError):
            pid = start = 0
        if alive(pid, start):
            return False
        for link in self.paths.names.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(link) == f"../{d.name}":
                    link.unlink()
        shutil.rmtree(d, ignore_errors=True)
        return True

    def get(self, ref: str) -> VM:
        if not ref:
            raise UsageError("empty VM name")
        link = self.paths.names / ref
        if NAME_RE.fullmatch(ref) and link.is_symlink():
            d = self.paths.vms / os.readlink(link).rsplit("/", 1)[-1]
            if (d / "vm.json").exists():
                return self._load(d)
        if re.fullmatch(r"[0-9a-f]{1,64}", ref):
            matches = [
                d
                for d in self.paths.vms.iterdir()
                if d.name.startswith(ref) and (d / "vm.json").exists()
            ]
            if len(matches) == 1:
                return self._load(matches[0])
            if len(matches) > 1:
                raise ConflictError(f"VM id prefix {ref!r} is ambiguous ({len(matches)} VMs)")
        raise NotFoundError(f"no such VM: {ref}")

    def in_use(self, image_id: str) -> bool:
        return any(vm.config.image_id == image_id for vm in self.list())

    # -- create / start ------------------------------------------------------------------
    def _new_name(self) -> str:
        for _ in range(100):
            name = f"{random.choice(_ADJ)}_{random.choice(_NOUN)}"
            if not (self.paths.names / name).is_symlink():
                return name
        return f"vm_{os.urandom(4).hex()}"

    def create(
        self,
        req: RunRequest,
        *,
        overlay: bool = True,
        image: Image | None = None,
        amend: dict[str, Any] | None = None,
    ) -> VM:
        """Make the VM record (folder, name link, config, disk overlay); not started.

        ``overlay=False`` skips the disk overlay: a restore puts the snapshot's own
        disk in place instead.  ``image`` replaces the lookup of ``req.image`` (a
        restore on a host without the image passes the one its stored base describes).
        ``amend``: fields of the config set before it is written (a restore's image
        ref and base digest), so ``vm.json`` is written once.
        Raises UsageError, NotFoundError (image), ConflictError (name taken).

        Durability: ``vm.json`` is fsync'd (file and folder) — a listed VM survives a
        host crash.  ``state.json`` (CREATED) is not: losing it, or finding it empty,
        reads as CREATED, which it is.
        """
        from torpor.vmm import boot, qemu

        reap_ram_dirs()  # before a new VM takes tmpfs: free what deleted ones left
        qemu.validate_accel(req.accel)
        if req.name is not None and not NAME_RE.fullmatch(req.name):
            raise UsageError(
                f"invalid VM name {req.name!r}: use letters, digits, _ . - "
                "(at most 63, starting with a letter or digit)"
            )
        if req.cpus < 1 or req.cpus > (os.cpu_count() or 1) * 4:
            raise UsageError(f"--cpus {req.cpus} is out of range")
        image = image if image is not None else self.images.get(req.image)
        command = resolve_command(
            image.config,
            list(req.entrypoint) if req.entrypoint is not None else None,
            list(req.command) if req.command else None,
        )
        env = merge_env(list(image.config.env), list(req.env))
        vm_id = os.urandom(32).hex()  # what secrets.token_hex does, without importing hmac
        name = req.name or self._new_name()
        vm_dir = self.paths.vm(vm_id)
        try:
            new_vm_folder(self.paths, vm_id)
            self.link_name(name, vm_id)
            cfg = config_for(req, image, vm_id, name, command, env)
            if amend:
                cfg = dataclasses.replace(cfg, **amend)
            files = VMFiles(vm_dir)
            if overlay:
                boot.ensure_qcow2_overlay(image.disk_path, files.disk)
            # kept as a file (a full disk's in-place fallback rewrites it), not fsync'd
            save_state(vm_dir, VMState(), synced=False)
            save_config(vm_dir, cfg)  # last: its presence marks the VM as complete
            (vm_dir / ".creating").unlink()
        except BaseException as e:
            with contextlib.suppress(OSError):
                if os.readlink(self.paths.names / name) == f"../{vm_id}":
                    os.unlink(self.paths.names / name)
            shutil.rmtree(vm_dir, ignore_errors=True)
            if isinstance(e, OSError):  # a write error has no filename: name the VM folder
                where = e.filename if e.filename is not None else vm_dir
                raise VMError(
                    f"cannot write the VM's files: {e.strerror or e}: {where}",
                    step="create VM",
                    path=where,
                ) from e
            raise
        return VM(cfg, VMState(), vm_dir)

    def link_name(self, name: str, vm_id: str) -> None:
        """Point the name link ``name`` at VM ``vm_id`` (atomic: ``symlink`` fails if the
        name exists); a link left by an interrupted create is taken over.
        Raises ConflictError if the name belongs to another VM."""
        link = self.paths.names / name
        try:
            os.symlink(f"../{vm_id}", link)
        except FileExistsError:
            target = self.paths.vms / os.readlink(link).rsplit("/", 1)[-1]
            if not self._reap_partial(target):
                raise ConflictError(
                    f"the name {name!r} is already in use by VM "
                    f"{target.name[:12]}; remove it or pick another name"
                ) from None
            os.symlink(f"../{vm_id}", link)

    def start(self, ref: str, on_progress: Callable[[str], None] | None = None) -> VM:
        """Boot the VM and start its main command; returns once the agent answered.

        Raises ConflictError if it is running, VMError (with the console tail) if
        QEMU or the guest failed to come up.
        """
        import subprocess

        from torpor.vmm import zygote

        vm = self.get(ref)
        if vm.state.status == Status.HIBERNATED:
            # it reads "hibernated" once QEMU ended, while the hibernating snapshot still
            # moves its memory to the cache under the VM's snapshot lock: wait for that
            # (taken and released before the VM lock, so the two never nest)
            with locked(self.paths.locks / f"snap-{vm.id}.lock"):
                pass
        with locked(self.paths.locks / f"vm-{vm.id}.lock"):
            vm = self.get(vm.id)
            if vm.state.status.active:
                raise ConflictError(f"VM {vm.name} is already {vm.state.status}")
            check_ports(vm.config.ports)  # before anything changes: a hibernated VM stays so
            # a hibernation marker is only for the run that writes it; one left over
            # (a racing end_hibernated) must not make this run's stop a hibernation
            with contextlib.suppress(FileNotFoundError):
                (vm.dir / "hibernate").unlink()
            if vm.state.status == Status.HIBERNATED:
                from torpor.snapshot.core import prepare_resume

                prepare_resume(self, vm)
            rfd, wfd = os.pipe()
            env = dict(os.environ)
            proc: subprocess.Popen[bytes] | None = None
            # a pre-started, pre-imported shim (torpor.vmm.zygote) saves 100-200 ms;
            # without one, spawn the shim here and start a zygote for next time
            use_zygote = not os.environ.get("TORPOR_NO_ZYGOTE")
            if not (use_zygote and zygote.request(self.paths.root, vm.id, wfd)):
                with open(vm.files.shim_log, "ab", opener=private_opener) as slog:
                    proc = subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "torpor.vmm.launch",
                            "--root",
                            str(self.paths.root),
                            "--vm",
                            vm.id,
                            "--ready-fd",
                            str(wfd),
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=slog,
                        stderr=slog,
                        pass_fds=(wfd,),
                        start_new_session=True,
                        env=env,
                        cwd="/",
                        umask=0o077,  # its logs and records private, whatever the caller's
                    )
                if use_zygote:
                    zygote.start(self.paths.root)
            os.close(wfd)
            if on_progress:
                on_progress("booting")
            # reap the shim in the background of this process only if we exit first:
            # it runs in its own session and is re-parented to init
            return self.await_ready(vm, rfd, proc)

    def await_ready(self, vm: VM, rfd: int, proc: Any = None) -> VM:
        """Read the shim's one ready line from ``rfd`` (closed here); the VM's record
        once its agent answered, else VMError (with the console tail)."""
        with os.fdopen(rfd, "rb") as r:
            line = r.readline()
        try:
            info = json.loads(line) if line else {}
        except ValueError:
            info = {}
        if not info.get("ok"):
            import subprocess

            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            status = proc.poll() if proc is not None else "an error"
            err = (
                info.get("error") or f"VM supervisor exited with {status}; see {vm.files.shim_log}"
            )
            console = info.get("console", "")
            raise VMError(err + (f"\n{console}" if console else ""), step="start VM")
        return self.get(vm.id)

    def run(self, req: RunRequest, on_progress: Callable[[str], None] | None = None) -> VM:
        vm = self.create(req)
        try:
            return self.start(vm.id, on_progress)
        except BaseException:
            if req.auto_remove:
                with contextlib.suppress(TorporError):
                    self.remove(vm.id, force=True)
            raise

    # -- control ------------------------------------------------------------------------
    def client(self, ref: str | VM, timeout: float = 10.0) -> AgentClient:
        from torpor.agent.client import AgentClient

        vm = ref if isinstance(ref, VM) else self.get(ref)
        if vm.state.status != Status.RUNNING:
            raise ConflictError(f"VM {vm.name} is not running ({vm.state.status})")
        try:
            sock = connect_unix(vm.files.agent_sock, timeout)
        except OSError as e:
            raise VMError(
                f"cannot reach VM {vm.name}: {e}", step="connect", path=vm.files.agent_sock
            ) from e
        return AgentClient(sock)

    def stop(self, ref: str, timeout: float = 10.0) -> VM:
        vm = self.get(ref)
        if not vm.state.status.active:
            return vm
        try:
            with self.client(vm) as c:
                c.stop(int(timeout), timeout=timeout + 30)
        except TorporError:
            pass
        deadline = time.monotonic() + timeout + 30
        while time.monotonic() < deadline:
            vm = self.get(vm.id)
            if not vm.state.status.active:
                break
            time.sleep(0.05)
        else:
            self.kill(vm.id)
        return self.get(vm.id)

    def end_hibernated(self, ref: str) -> VM:
        """End a VM whose snapshot was just taken: QEMU only, the shim records it."""
        vm = self.get(ref)
        st = vm.state
        if not alive(st.shim_pid, st.shim_start):
            return vm
        # if the shim already recorded the end (CAPTURE_END), a marker written now would
        # outlive it and turn the next, ordinary stop into a "hibernation"
        if vm.state.status != Status.HIBERNATED:
            (vm.dir / "hibernate").write_text("")
            signal_if_alive(st.qemu_pid, st.qemu_start, signal.SIGKILL)
        # either way, wait for the shim: it records HIBERNATED *before* it frees the RAM
        # file and exits, and a caller told "hibernated" may count on the memory being gone
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and alive(st.shim_pid, st.shim_start):
            time.sleep(0.01)
        return self.get(vm.id)

    def kill(self, ref: str, sig: int = signal.SIGKILL) -> VM:
        vm = self.get(ref)
        st = vm.state
        for pid, start in ((st.qemu_pid, st.qemu_start), (st.shim_pid, st.shim_start)):
            signal_if_alive(pid, start, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(st.shim_pid, st.shim_start):
            time.sleep(0.02)
        return self.get(vm.id)

    def signal_main(self, ref: str, sig: int) -> VM:
        """``docker kill -s SIG``: SIGKILL ends the VM; any other signal goes to its main
        command (through the shim, like a forwarded Ctrl-C), the VM stays up."""
        if sig == signal.SIGKILL:
            return self.kill(ref)
        vm = self.get(ref)
        if not vm.state.status.active:
            raise ConflictError(f"VM {vm.name} is {vm.state.status}, not running")
        with self.client(vm) as c:
            c.attach().signal(sig)  # the shim routes an attached SIGNAL to the main command
        return self.get(vm.id)

    def wait(self, ref: str, poll: float = 0.05) -> VM:
        """Block until the VM is no longer active (``docker wait``); its record after."""
        vm = self.get(ref)
        while vm.state.status.active:
            time.sleep(poll)
            vm = self.get(vm.id)
        return vm

    def rename(self, ref: str, new_name: str) -> VM:
        """Give a VM a new name: the new name link first (taken -> ConflictError), then
        vm.json (atomic), then the old link goes; a crash in between leaves the VM
        reachable by id and by at least one name."""
        if not NAME_RE.fullmatch(new_name):
            raise UsageError(
                f"invalid VM name {new_name!r}: use letters, digits, _ . - "
                "(at most 63, starting with a letter or digit)"
            )
        vm = self.get(ref)
        if new_name == vm.name:
            return vm
        with locked(self.paths.locks / f"vm-{vm.id}.lock"):
            vm = self.get(vm.id)
            try:
                os.symlink(f"../{vm.id}", self.paths.names / new_name)
            except FileExistsError:
                raise ConflictError(f"the name {new_name!r} is already in use") from None
            save_config(vm.dir, dataclasses.replace(vm.config, name=new_name))
            with contextlib.suppress(OSError):
                if os.readlink(self.paths.names / vm.name) == f"../{vm.id}":
                    os.unlink(self.paths.names / vm.name)
        return self.get(vm.id)

    def remove(self, ref: str, force: bool = False) -> None:
        """Delete a VM: its processes (``force``: killed, and waited for), name link,
        folder, RAM and shadow files, and its QEMU's cgroups."""
        vm = self.get(ref)
        if vm.state.status.active:
            if not force:
                raise ConflictError(
                    f"VM {vm.name} is {vm.state.status}; stop it first or use --force"
                )
            # not self.kill(): its re-read of the record would write it (state DEAD,
            # fsync'd) only for the folder to go right after
            st = vm.state
            kill_and_wait(((st.qemu_pid, st.qemu_start), (st.shim_pid, st.shim_start)))
        from torpor.vmm.jail import remove_cgroups

        # QEMU has exited (or was never there): its cgroups are empty and go now, not
        # at the sweep of a later start (the shim that would remove them was killed)
        remove_cgroups(vm.dir)
        with locked(self.paths.locks / f"vm-{vm.id}.lock"):
            link = self.paths.names / vm.name
            with contextlib.suppress(OSError):
                if os.readlink(link) == f"../{vm.id}":
                    os.unlink(link)
            # vm.json goes first: a half-removed folder is then an interrupted create
            with contextlib.suppress(FileNotFoundError):
                vm.files.config.unlink()
            from torpor.vmm.lazymem import unmount

            unmount(vm.files.ram)  # a lazy restore's FUSE mount, if its server is gone
            with contextlib.suppress(FileNotFoundError):
                vm.files.ram.unlink()  # on tmpfs, outside the VM folder
            from torpor.vmm.capture import remove_shadow

            remove_shadow(vm.files.shadow)
            shutil.rmtree(vm.dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.paths.locks / f"vm-{vm.id}.lock").unlink()

    def logs(
        self, ref: str, follow: bool = False, poll: float = 0.1
    ) -> Iterator[tuple[float, str, bytes]]:
        """(time, "stdout"|"stderr", bytes) records of the main command's output, from
        the oldest kept file of the capped, rotated ``main.log`` (torpor.vmm.logfile)."""
        vm = self.get(ref)
        reader = Follower(vm.files.main_log)
        try:
            while True:
                for line in reader.lines():
                    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                        rec = json.loads(line)
                        yield rec["t"], rec["s"], rec["d"].encode("utf-8", "surrogateescape")
                if not follow:
                    return
                if not self.get(vm.id).state.status.active:
                    follow = False  # one more pass to drain what was written before exit
                    continue
                time.sleep(poll)
        finally:
            reader.close()

    def console(self, ref: str) -> bytes:
        """What is kept of the guest's serial console (capped and rotated like logs)."""
        return read_all(self.get(ref).files.console_log)
