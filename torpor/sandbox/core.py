"""``Sandbox``: one microVM as a library object (the E2B/Modal-style face of torpor).

A thin layer over the library calls the CLI uses too: :class:`VMManager` +
:class:`RunRequest` (create, start, kill, list), :class:`AgentClient` (exec,
files) and :mod:`torpor.snapshot` (snapshot, restore, fork, hibernate, wake).
Nothing here holds state the VM folder does not: a Sandbox object is a VM id plus
a cached agent connection, so ``Sandbox.connect(id)`` from another process sees
the same machine.

Invariants:

- Every error is a :class:`~torpor.errors.TorporError` subclass.
- ``timeout`` (kill) and ``idle`` (hibernate) on create are enforced by a
  detached watcher process (``python -m torpor.sandbox.reaper``), so they hold
  after the creating process exits.  Both live in ``<vm dir>/sandbox.json``
  (written atomically), which ``set_timeout`` rewrites and the watcher re-reads
  every second.  The watcher holds ``<vm dir>/sandbox.reaper`` locked for its
  life: whoever finds that lock free (connect, wake, restore) starts one again.
- The settings themselves (seconds, not the deadline) are also VM labels,
  ``torpor.sandbox.timeout`` / ``torpor.sandbox.idle``, so they travel inside every
  snapshot's recorded config: a restored or forked sandbox gets the same
  ``timeout`` (counted from its restore) and ``idle`` as the one it came from, even
  when that one is gone or the snapshot came from another host.
- Activity, for ``idle``: every use of the agent connection through a Sandbox
  (any process) touches ``<vm dir>/sandbox.active``; a foreground ``exec`` and a
  background handle's ``wait``/``output`` hold a shared flock on
  ``<vm dir>/sandbox.busy`` while they run.  The watcher hibernates only with the
  exclusive lock (so never under a running foreground command) and only after
  ``idle`` seconds without a touch.  A hibernated sandbox wakes on its next use
  (``connect``, ``exec``, ``files``): the sandbox looks always there, it just
  stops costing CPU and RAM while unused.
- ``pty`` runs a program on a guest pseudo-terminal (:mod:`torpor.sandbox.pty`);
  the terminal is hung up when its Pty is closed or its process goes away.
- Thread-safety: the agent client is thread-safe (one reader thread, a send
  lock), and the cached connection is (re)made under a lock, so one Sandbox may
  be used from several threads; :mod:`torpor.sandbox.aio` relies on this.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torpor.agent.client import AgentClient
from torpor.errors import ConflictError, NotFoundError, NotSupportedError, UsageError
from torpor.paths import Paths
from torpor.sandbox.files import Files
from torpor.sandbox.process import (
    DEFAULT_MAX_OUTPUT,
    CommandHandle,
    OutputCallback,
    run_handle,
)
from torpor.sandbox.pty import Pty, check_size
from torpor.vmm.layout import VMFiles
from torpor.vmm.manager import VM, RunRequest, VMManager, exec_settings, parse_memory
from torpor.vmm.state import Status

#: The main process of a sandbox: it only has to keep the VM up.
KEEPALIVE = ("sleep", "infinity")
#: Default seconds an ``exec`` may run (as E2B); ``timeout=None`` means no limit.
DEFAULT_EXEC_TIMEOUT = 60.0
DEADLINE_FILE = "sandbox.json"
ACTIVE_FILE = "sandbox.active"
BUSY_FILE = "sandbox.busy"
REAPER_LOCK = "sandbox.reaper"
#: VM labels carrying ``timeout`` / ``idle`` into snapshots, restores and forks
LABEL_TIMEOUT = "torpor.sandbox.timeout"
LABEL_IDLE = "torpor.sandbox.idle"


@dataclass(frozen=True)
class SandboxInfo:
    """What ``Sandbox.list`` / ``get_info`` report about one sandbox."""

    id: str
    name: str
    image: str
    status: str
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    memory_mib: int = 0
    cpus: int = 0
    end_at: float | None = None  # when the ``timeout`` watcher kills it (epoch seconds)


@dataclass(frozen=True)
class ProcessInfo:
    """A process running in the guest (``sb.ps()``), as its /proc describes it."""

    pid: int
    cmdline: tuple[str, ...]


#: At most this many processes are read by ``ps`` (one agent request each).
MAX_PS = 4096
#: /proc entries that are not processes (``self``, ``meminfo``, ...; about 60 on the
#: guest kernel), which come first in its listing: ``ps`` reads at most MAX_PS plus
#: these, so a guest with millions of pids (or a hostile agent) costs a bounded listing.
PROC_OTHER_ENTRIES = 256

# Background commands of every Sandbox object in this process, by (VM id, pid), with
# the object that started them: any object for the same VM lists them
# (``processes``) and reconnects to them (``commands.connect``).  A handle's output
# flows on its starter's connection, so the entry keeps that object alive and goes
# when the command was waited for or when its starter closes its connection.
_BACKGROUND: dict[tuple[str, int], tuple[CommandHandle, Sandbox]] = {}
_BACKGROUND_LOCK = threading.Lock()


@dataclass(frozen=True)
class Snapshot:
    """A snapshot taken by :meth:`Sandbox.snapshot`; ``str()`` is its id."""

    id: str
    tag: str | None = None

    def __str__(self) -> str:
        return self.id


def _env_list(env: Mapping[str, str] | None) -> tuple[str, ...]:
    out = []
    for k, v in (env or {}).items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise UsageError(f"invalid environment variable name {k!r}")
        out.append(f"{k}={v}")
    return tuple(out)


def _manager(paths: Paths | None) -> VMManager:
    return VMManager(paths or Paths.default())


def _snap_id(snap: Snapshot | str) -> str:
    return snap.id if isinstance(snap, Snapshot) else str(snap)


def _read_limits(vm_dir: Path) -> tuple[float | None, float | None]:
    """(end_at epoch seconds, idle seconds) of a sandbox; None where unset."""
    try:
        d = json.loads((vm_dir / DEADLINE_FILE).read_text())
        end_at = float(d["end_at"]) if d.get("end_at") is not None else None
        idle = float(d["idle"]) if d.get("idle") is not None else None
        return end_at, idle
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None


def _read_deadline(vm_dir: Path) -> float | None:
    return _read_limits(vm_dir)[0]


def _write_limits(vm_dir: Path, end_at: float | None, idle: float | None) -> None:
    from torpor.fsutil import atomic_write_json

    atomic_write_json(vm_dir / DEADLINE_FILE, {"end_at": end_at, "idle": idle})


def _limit_labels(timeout: float | None, idle: float | None) -> dict[str, str]:
    out = {}
    if timeout is not None:
        out[LABEL_TIMEOUT] = repr(float(timeout))
    if idle is not None:
        out[LABEL_IDLE] = repr(float(idle))
    return out


def _label_seconds(labels: Mapping[str, str], key: str) -> float | None:
    """A positive, finite number of seconds from a label; None if absent or not one
    (a snapshot's config may come from another host's store: never trusted to parse)."""
    try:
        v = float(labels[key])
    except (KeyError, ValueError, TypeError):
        return None
    return v if 0 < v < float("inf") else None


def _reaper_running(vm_dir: Path) -> bool:
    from torpor.fsutil import locked

    try:
        with locked(vm_dir / REAPER_LOCK, wait=False, make_parents=False):
            return False
    except BlockingIOError:
        return True
    except FileNotFoundError:  # the VM is gone: nothing to watch
        return True


@contextlib.contextmanager
def busy_lock(vm_dir: Path, shared: bool, wait: bool = True) -> Iterator[None]:
    """flock on ``<vm dir>/sandbox.busy``; NotFoundError once the VM was removed."""
    from torpor.fsutil import locked

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                locked(vm_dir / BUSY_FILE, shared=shared, wait=wait, make_parents=False)
            )
        except FileNotFoundError:
            raise NotFoundError(f"no such sandbox: {vm_dir.name[:12]} (removed)") from None
        yield


def touch_active(vm_dir: Path) -> None:
    """Record a use of the sandbox now (the idle clock restarts)."""
    p = vm_dir / ACTIVE_FILE
    try:
        os.utime(p)
    except FileNotFoundError:
        with contextlib.suppress(OSError):  # fails, as it should, if the VM was removed
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError:
        pass


class Commands:
    """``sb.commands``: the command calls under the names E2B users know."""

    def __init__(self, sandbox: Sandbox):
        self._sb = sandbox

    def run(self, cmd: str | Iterable[str], **kw: Any) -> Any:
        """``sb.exec`` (``envs=`` is accepted for ``env=``)."""
        if "envs" in kw:
            kw["env"] = kw.pop("envs")
        return self._sb.exec(cmd, **kw)

    def list(self) -> list[CommandHandle]:
        return self._sb.processes()

    def connect(self, pid: int) -> CommandHandle:
        """Reconnect to command ``pid`` (started with ``exec``, by any process): a
        handle streaming its further output, taking its stdin, giving its exit code.

        A command of a Sandbox object of this process is that object's handle.  One
        whose starting connection has gone (another process, a closed object) is
        reattached through the shim (REATTACH, docs/protocol.md); output it wrote
        while nobody followed it is not kept.  NotFoundError if there is no such
        command (or it was started before a hibernation: a woken sandbox's new shim
        does not know it); ConflictError if another connection still follows it.
        """
        if not isinstance(pid, int) or isinstance(pid, bool) or pid < 1:
            raise UsageError(f"invalid pid {pid!r}")
        for p in self._sb.processes():
            if p.pid == pid:
                return p
        return self._sb._reattach(pid)

    def kill(self, pid: int) -> bool:
        """SIGKILL the process group of ``pid`` (any process in the sandbox).

        False if there was no such process.
        """
        if not isinstance(pid, int) or pid < 2:
            raise UsageError(f"invalid pid {pid!r}")
        for p in self._sb.processes():
            if p.pid == pid:
                p.kill()
                return True
        if not self._sb.files.exists(f"/proc/{pid}"):
            return False
        # the group first, then the process alone (not a group leader).  No "--":
        # busybox kill rejects it (exit 1) yet still kills the group after it, and the
        # fallback then failed on the dead pid, reporting False for a killed process
        for argv in (["kill", "-KILL", f"-{pid}"], ["kill", "-KILL", str(pid)]):
            if self._sb.exec(argv, timeout=60).exit_code == 0:
                return True
        return not self._sb.files.exists(f"/proc/{pid}")


class Sandbox:
    """A running microVM: ``exec``, ``files``, snapshots, forks, hibernation.

    Get one with :meth:`create`, :meth:`connect`, :meth:`restore` or :meth:`fork`;
    ``with Sandbox.create(...) as sb:`` kills it when the block ends.
    """

    def __init__(self, mgr: VMManager, vm: VM):
        self._mgr = mgr
        self.id: str = vm.id
        self.name: str = vm.name
        self._config = vm.config  # fixed for the VM's life: read once, not per exec
        self._dir = vm.dir
        self._conn: AgentClient | None = None
        self._conn_sock: tuple[int, int] | None = None
        self._conn_lock = threading.Lock()
        self.files = Files(self)
        self.commands = Commands(self)

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id[:12]!r}, name={self.name!r})"

    # -- lifecycle -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        image: str = "tools:latest",
        *,
        memory: str | int = "512M",
        cpus: int = 1,
        env: Mapping[str, str] | None = None,
        network: bool = True,
        labels: Mapping[str, str] | None = None,
        idle: float | None = None,
        timeout: float | None = None,
        name: str | None = None,
        cwd: str | None = None,
        user: str | None = None,
        command: Iterable[str] = KEEPALIVE,
        paths: Paths | None = None,
    ) -> Sandbox:
        """Boot a new sandbox from ``image`` and return once its agent answers.

        ``memory`` is Docker-style ("512M", "2G") or MiB as an int; ``timeout``
        seconds after creation it is killed (removed), even if this process has
        exited.  After ``idle`` seconds without use it is hibernated, and woken
        again by its next use (see the module docstring).
        """
        if timeout is not None and not timeout > 0:
            raise UsageError(f"timeout must be > 0 seconds, not {timeout!r}")
        if idle is not None and not idle > 0:
            raise UsageError(f"idle must be > 0 seconds, not {idle!r}")
        req = RunRequest(
            image=image,
            command=tuple(command),
            entrypoint=(),  # the keep-alive runs as given, not wrapped by the image's
            name=name,
            env=_env_list(env),
            workdir=cwd,
            user=user,
            memory_mib=parse_memory(f"{memory}M" if isinstance(memory, int) else memory),
            cpus=cpus,
            network=network,
            labels={**dict(labels or {}), **_limit_labels(timeout, idle)},
        )
        mgr = _manager(paths)
        vm = mgr.create(req)
        try:
            if timeout is not None or idle is not None:
                end_at = time.time() + timeout if timeout is not None else None
                _write_limits(vm.dir, end_at, idle)
            touch_active(vm.dir)
            vm = mgr.start(vm.id)
            touch_active(vm.dir)  # the idle clock starts once it is up, not at create
            sb = cls(mgr, vm)
            if timeout is not None or idle is not None:
                sb._ensure_reaper()
        except BaseException:
            with contextlib.suppress(Exception):
                mgr.remove(vm.id, force=True)
            raise
        return sb

    @classmethod
    def connect(cls, sandbox_id: str, *, paths: Paths | None = None) -> Sandbox:
        """The sandbox ``sandbox_id`` (id, id prefix or name); a hibernated one is woken.

        NotFoundError if there is none; ConflictError if it is stopped or dead.
        """
        mgr = _manager(paths)
        vm = _wake_if_hibernated(mgr, mgr.get(sandbox_id))
        if vm.state.status != Status.RUNNING:
            raise ConflictError(f"sandbox {vm.name} is not running ({vm.state.status})")
        sb = cls(mgr, vm)
        sb._ensure_reaper()  # its watcher may have died (a reboot) while it slept
        return sb

    @classmethod
    def list(
        cls,
        labels: Mapping[str, str] | None = None,
        *,
        all: bool = False,
        paths: Paths | None = None,
    ) -> list[SandboxInfo]:
        """Running and hibernated sandboxes (``all``: stopped ones too) carrying
        every label of ``labels``."""
        want = dict(labels or {})
        out = []
        for vm in _manager(paths).list(all=True):
            if not all and vm.state.status not in (Status.RUNNING, Status.HIBERNATED):
                continue
            if any(vm.config.labels.get(k) != v for k, v in want.items()):
                continue
            out.append(_info(vm))
        return out

    @classmethod
    def get_info(cls, sandbox_id: str, *, paths: Paths | None = None) -> SandboxInfo:
        return _info(_manager(paths).get(sandbox_id))

    @classmethod
    def restore(
        cls, snap: Snapshot | str, *, name: str | None = None, paths: Paths | None = None
    ) -> Sandbox:
        """A new sandbox from a snapshot (its id, id prefix or tag)."""
        from torpor.snapshot import restore

        mgr = _manager(paths)
        return cls._inherit(mgr, restore(mgr, _snap_id(snap), name=name))

    @classmethod
    def adopt(cls, vm_id: str, *, paths: Paths | None = None) -> Sandbox:
        """A VM restored or forked by another face (``torpor restore``/``fork``) as a
        Sandbox, its snapshot's ``timeout`` and ``idle`` enforced as ``restore`` does."""
        mgr = _manager(paths)
        return cls._inherit(mgr, mgr.get(vm_id))

    @classmethod
    def _inherit(cls, mgr: VMManager, vm: VM) -> Sandbox:
        """A restored or forked VM as a Sandbox with the ``timeout`` and ``idle`` its
        snapshot's config carries (labels): a fresh lifetime and idle clock from now."""
        timeout = _label_seconds(vm.config.labels, LABEL_TIMEOUT)
        idle = _label_seconds(vm.config.labels, LABEL_IDLE)
        sb = cls(mgr, vm)
        if timeout is not None or idle is not None:
            try:
                _write_limits(vm.dir, time.time() + timeout if timeout else None, idle)
                touch_active(vm.dir)
                sb._ensure_reaper()
            except BaseException:  # never leave a copy running that would not be reaped
                with contextlib.suppress(Exception):
                    mgr.remove(vm.id, force=True)
                raise
        return sb

    def info(self) -> SandboxInfo:
        return _info(self._mgr.get(self.id))

    def is_running(self) -> bool:
        return self._mgr.get(self.id).state.status == Status.RUNNING

    def set_timeout(self, timeout: float | None) -> None:
        """Kill the sandbox ``timeout`` seconds from now (None: never)."""
        if timeout is not None and not timeout > 0:
            raise UsageError(f"timeout must be > 0 seconds, not {timeout!r}")
        vm = self._mgr.get(self.id)
        idle = _read_limits(vm.dir)[1]
        _write_limits(vm.dir, None if timeout is None else time.time() + timeout, idle)
        self._set_limit_labels(timeout, idle)  # what later restores and forks inherit
        if timeout is not None:
            self._ensure_reaper()  # none runs if nothing was left to enforce

    def kill(self) -> None:
        """End the sandbox and remove it (its snapshots stay)."""
        self.close()
        self._mgr.remove(self.id, force=True)

    def close(self) -> None:
        """Drop this object's connection; the sandbox keeps running."""
        with self._conn_lock:
            conn, self._conn = self._conn, None
        self._drop_background()
        if conn is not None:
            conn.close()

    def _drop_background(self) -> None:
        """Forget the background handles whose output flowed on this object's
        connection (closed, or lost to a hibernation): they cannot stream any more."""
        with _BACKGROUND_LOCK:
            for k in [k for k, (_, owner) in _BACKGROUND.items() if owner is self]:
                del _BACKGROUND[k]

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(NotFoundError):
            self.kill()

    # -- snapshots -------------------------------------------------------------------
    def snapshot(self, tag: str | None = None) -> Snapshot:
        """A durable snapshot (memory, disk, devices); the sandbox keeps running."""
        from torpor.snapshot import snapshot

        # a use like any other: wakes a hibernated sandbox, and the idle watcher must
        # not hibernate it halfway (it would make this snapshot fail as "not running")
        with self._busy():
            self._client()
            r = snapshot(self._mgr, self.id, tag=tag)
        return Snapshot(r.manifest.id, tag)

    def fork(self, n: int = 1) -> list[Sandbox]:
        """Snapshot this sandbox and start ``n`` independent copies of it."""
        from torpor.snapshot import fork

        snap = self.snapshot()
        return [Sandbox._inherit(self._mgr, vm) for vm in fork(self._mgr, snap.id, n)]

    def hibernate(self) -> Snapshot:
        """Snapshot, then end the VM (no CPU, no RAM); ``connect`` wakes it in place.

        Running commands are frozen with the machine; their output streams to this
        host end (a background handle's ``wait`` fails with AgentError).
        """
        from torpor.snapshot import snapshot

        self.close()
        r = snapshot(self._mgr, self.id, stop=True)
        return Snapshot(r.manifest.id)

    def wake(self) -> None:
        """Resume a hibernated sandbox in place (what ``connect`` does)."""
        vm = _wake_if_hibernated(self._mgr, self._mgr.get(self.id))
        if vm.state.status != Status.RUNNING:
            self._mgr.start(self.id)  # stopped: ConflictError/VMError say why not
        self._ensure_reaper()

    # -- commands --------------------------------------------------------------------
    def exec(
        self,
        cmd: str | Iterable[str],
        *,
        background: bool = False,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = DEFAULT_EXEC_TIMEOUT,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        stdin: bytes | str | bool | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> Any:
        """Run ``cmd`` (a string goes through ``/bin/sh -c``; a list runs as argv).

        Returns a :class:`CommandResult` (any exit code; ``timeout`` kills the
        process group and raises ExecTimeoutError), or with ``background`` a
        :class:`CommandHandle` at once (``pid``, ``kill()``, ``wait()``).
        ``stdin``: bytes/str are fed then closed; ``True`` keeps stdin open for
        ``send_stdin``; None (default) gives the command an empty stdin.
        """
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        if not argv:
            raise UsageError("empty command")
        if timeout is not None and not timeout > 0:
            raise UsageError(f"timeout must be > 0 seconds, not {timeout!r}")
        full_env, run_cwd, run_user = exec_settings(self._config, _env_list(env), cwd, user)
        what = cmd if isinstance(cmd, str) else " ".join(argv)
        with self._busy():  # an idle watcher does not hibernate under a running command
            client = self._client()
            handle = client.start_exec(
                argv, env=full_env, cwd=run_cwd, user=run_user, stdin=stdin not in (None, False)
            )
            if stdin is not None and not isinstance(stdin, bool):
                data = stdin.encode() if isinstance(stdin, str) else stdin
                threading.Thread(
                    target=AgentClient._feed,
                    args=(handle, data),
                    daemon=True,
                    name="torpor-sandbox-stdin",
                ).start()
            if background:
                p = CommandHandle(handle, what, self._forget, self._busy)
                with _BACKGROUND_LOCK:
                    _BACKGROUND[(self.id, p.pid)] = (p, self)
                return p
            try:
                return run_handle(handle, timeout, on_stdout, on_stderr, max_output, what)
            finally:
                touch_active(self._dir)

    def processes(self) -> list[CommandHandle]:
        """Background commands not yet waited for that any Sandbox object of this
        process started in this sandbox (see ``_BACKGROUND``).

        Each handle streams the command's further output (``output()``, ``wait()``)
        and gives its exit code, whichever object asks.  Commands started by another
        process are not listed (``ps()`` lists every process in the guest).
        """
        with _BACKGROUND_LOCK:
            return [p for (vm, _), (p, _) in _BACKGROUND.items() if vm == self.id]

    def ps(self) -> list[ProcessInfo]:
        """Every user process in the guest (from any connection), from its /proc.

        Kernel threads (empty cmdline) and the guest agent (pid 1) are left out.
        What the guest's /proc says is only reported, never acted on.
        """
        from torpor.agent.client import AgentRequestError
        from torpor.agent.files import list_dir_capped

        c = self._client()
        listing, _ = list_dir_capped(c, "/proc", MAX_PS + PROC_OTHER_ENTRIES)
        pids = sorted(int(e.name) for e in listing if e.name.isdecimal())
        out = []
        for pid in pids[:MAX_PS]:
            if pid == 1:
                continue
            try:
                raw = c.read_file(f"/proc/{pid}/cmdline")
            except AgentRequestError:
                continue  # exited meanwhile
            if raw:
                argv = raw[:65536].rstrip(b"\0").split(b"\0")
                out.append(ProcessInfo(pid, tuple(a.decode("utf-8", "replace") for a in argv)))
        return out

    def pty(
        self,
        cmd: str | Iterable[str] = "sh",
        cols: int = 80,
        rows: int = 24,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> Pty:
        """Start ``cmd`` on a new ``cols`` x ``rows`` terminal (see torpor.sandbox.pty).

        A one-word string (``"bash"``) runs that program; a longer one goes through
        ``/bin/sh -c``; a list runs as argv. ``TERM`` defaults to ``xterm-256color``.
        """
        check_size(cols, rows)
        if isinstance(cmd, str):
            argv = [cmd] if cmd and cmd.split() == [cmd] else ["/bin/sh", "-c", cmd]
        else:
            argv = [str(a) for a in cmd]
        if not argv or not argv[0]:
            raise UsageError("empty command")
        full_env, run_cwd, run_user = exec_settings(
            self._config, _env_list({"TERM": "xterm-256color", **(env or {})}), cwd, user
        )
        hold = self._busy()  # held while the terminal is open (see the module docstring)
        hold.__enter__()
        try:
            handle = self._client().start_exec(
                argv, env=full_env, cwd=run_cwd, user=run_user, tty=(cols, rows)
            )
        except BaseException:
            hold.__exit__(None, None, None)
            raise
        return Pty(handle, cols, rows, hold)

    # -- internals -------------------------------------------------------------------
    def _reattach(self, pid: int) -> CommandHandle:
        import errno

        from torpor.agent.client import AgentRequestError

        try:
            handle = self._client().reattach(pid)
        except AgentRequestError as e:
            if e.errno == errno.EBUSY:
                raise ConflictError(
                    f"command {pid} in sandbox {self.name} is still followed by the "
                    "connection that started it"
                ) from e
            if e.errno == errno.ENOSYS:
                raise NotSupportedError(
                    f"sandbox {self.name} runs under a VM supervisor without REATTACH "
                    "(started by an older torpor): restart it to reconnect to commands"
                ) from e
            raise NotFoundError(
                f"no command with pid {pid} to reconnect to in sandbox {self.name} (it "
                "was not started with exec, or before the sandbox was hibernated)"
            ) from e
        p = CommandHandle(handle, f"pid {pid}", self._forget, self._busy)
        with _BACKGROUND_LOCK:
            _BACKGROUND[(self.id, p.pid)] = (p, self)
        return p

    def _busy(self) -> contextlib.AbstractContextManager[None]:
        """A shared hold on the busy lock: the idle watcher waits for it to end."""
        return busy_lock(self._dir, shared=True)

    def _client(self) -> AgentClient:
        """The cached connection to the VM's shim; remade if it was lost, waking the
        sandbox first if it was hibernated (by ``hibernate`` or the idle watcher)."""
        touch_active(self._dir)
        with self._conn_lock:
            conn = self._conn
            # the shim makes a new socket each run: one stat tells a cached connection
            # to an ended run (hibernated meanwhile) before a request fails on it
            if conn is not None and conn._error is None and self._sock_id() == self._conn_sock:
                return conn
            if conn is not None:
                conn.close()
                self._drop_background()
            self._conn = None
            _wake_if_hibernated(self._mgr, self._mgr.get(self.id))
            self._conn_sock = self._sock_id()
            self._conn = self._mgr.client(self.id)
            return self._conn

    def _sock_id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(VMFiles(self._dir).agent_sock)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _forget(self, p: CommandHandle) -> None:
        with _BACKGROUND_LOCK:
            if _BACKGROUND.get((self.id, p.pid), (None,))[0] is p:
                del _BACKGROUND[(self.id, p.pid)]

    def _set_limit_labels(self, timeout: float | None, idle: float | None) -> None:
        import dataclasses

        from torpor.fsutil import locked
        from torpor.vmm.state import load_config, save_config

        with locked(self._mgr.paths.locks / f"vm-{self.id}.lock"):  # as VMManager.rename
            cfg = load_config(self._dir)
            labels = {k: v for k, v in cfg.labels.items() if k not in (LABEL_TIMEOUT, LABEL_IDLE)}
            labels.update(_limit_labels(timeout, idle))
            if labels != cfg.labels:
                save_config(self._dir, dataclasses.replace(cfg, labels=labels))

    def _ensure_reaper(self) -> None:
        """Start the watcher unless one holds its lock or there is nothing to enforce."""
        end_at, idle = _read_limits(self._dir)
        if (end_at is not None or idle is not None) and not _reaper_running(self._dir):
            self._start_reaper()

    def _start_reaper(self) -> None:
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torpor.sandbox.reaper",
                "--root",
                str(self._mgr.paths.root),
                "--vm",
                self.id,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd="/",
            env=dict(os.environ),
        )


def _wake_if_hibernated(mgr: VMManager, vm: VM) -> VM:
    """Start a hibernated sandbox in place; its record afterwards.

    Under a shared hold of the busy lock: the idle watcher hibernates holding it
    exclusively, and its VM reads "hibernated" before the hibernation is over (the
    memory is still moving to the snapshot cache); a wake in that window failed
    with "the cached memory ... changed during the restore".
    """
    if vm.state.status != Status.HIBERNATED:
        return vm
    # ConflictError: another process woke it first
    with busy_lock(vm.dir, shared=True), contextlib.suppress(ConflictError):
        mgr.start(vm.id)
    return mgr.get(vm.id)


def _info(vm: VM) -> SandboxInfo:
    c = vm.config
    return SandboxInfo(
        id=vm.id,
        name=vm.name,
        image=c.image_ref,
        status=str(vm.state.status),
        labels=dict(c.labels),
        created=c.created,
        memory_mib=c.memory_mib,
        cpus=c.cpus,
        end_at=_read_deadline(vm.dir),
    )
