"""A pre-started shim: forks a ready, fully imported shim for each VM start.

Role: starting a shim the plain way costs a Python interpreter start-up plus the
shim's imports (asyncio, the agent protocol, QMP): 100-200 ms here, on the path of
every restore and resume.  The zygote pays that once.  ``VMManager.start`` sends it
``{"vm": id, "env": {...}}`` plus the ready pipe's write end (SCM_RIGHTS) on
``locks/.zygote.sock``; the zygote double-forks, and the grandchild — re-parented to
init like a shim started by ``Popen(start_new_session=True)`` — becomes the VM's shim
(:func:`torpor.vmm.launch.run_shim`).  If the zygote is absent, stale or busy, the
manager falls back to spawning the shim itself and starts a zygote for next time.

Invariants:

- The zygote never starts a thread or an event loop, so ``fork`` is safe.
- It serves one root and one uid (``SO_PEERCRED``); its socket is created under
  umask 077 in the root's ``locks`` folder.  It exits when idle for
  :data:`IDLE_SECONDS` with no VM of its root running (:func:`vms_running`: a VM's
  restore or its session's recovery may come at any time), when its root is gone,
  or when any torpor source file it loaded changed on disk (a stale zygote must
  never run old code: it then refuses, and the caller falls back).
- Everything a shim imports on its way to "ready" is imported here first (the shim
  logs how many modules it had to import itself: 0 expected), and the zygote's heap
  is frozen out of the child's garbage collector (``gc.freeze``) before each fork.
"""

from __future__ import annotations

import array
import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

IDLE_SECONDS = 120.0
#: ``TORPOR_ZYGOTE_IDLE``: another idle time, in seconds (tests)
IDLE_ENV = "TORPOR_ZYGOTE_IDLE"
SOCK_NAME = ".zygote.sock"


def _sources() -> dict[str, float]:
    out = {}
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None) or ""
        if "/torpor/" in f and f.endswith(".py"):
            with contextlib.suppress(OSError):
                out[f] = os.stat(f).st_mtime
    return out


def _stale(seen: dict[str, float]) -> bool:
    for f, mt in seen.items():
        try:
            if os.stat(f).st_mtime != mt:
                return True
        except OSError:
            return True
    return False


def vms_running(vms: Path) -> bool:
    """Whether a VM of this root has a live shim: its restore or its session's recovery
    may come at any time, so the zygote stays for it (idle counts only without one)."""
    from torpor.errors import TorporError
    from torpor.vmm.state import alive, load_state

    try:
        dirs = [d for d in os.scandir(vms) if not d.name.startswith(".")]
    except OSError:
        return False
    for d in dirs:
        try:
            st = load_state(Path(d.path))
        except (OSError, ValueError, TypeError, KeyError, TorporError):
            continue  # unreadable, or a version this code does not read: not counted
        if alive(st.shim_pid, st.shim_start):
            return True
    return False


def serve(root: Path) -> int:
    # everything a shim needs, imported once, here: a module a shim imports itself
    # costs every start its load (here, without bytecode caches: its compilation,
    # 30-60 ms per shim for the jail, the RAM-less capture and the stream parser)
    import qemu.qmp  # noqa: F401

    import torpor.vmm.basemem
    import torpor.vmm.boot
    import torpor.vmm.capture
    import torpor.vmm.jail
    import torpor.vmm.logfile
    import torpor.vmm.migstream
    import torpor.vmm.qmp
    import torpor.vmm.ramless
    import torpor.vmm.shim
    from torpor.vmm import launch

    # the guest agent's source is found through importlib.resources, whose readers
    # (and zipfile) are imported on first use
    with contextlib.suppress(Exception):
        from importlib import resources

        resources.files("torpor.guest").joinpath("agent.c")

    # a pool's spare (torpor.vmm.pool) also prepares its folder: the restore path
    # (store, snapshot placing) is imported once here too — no threads start on import
    with contextlib.suppress(ImportError):
        import torpor.snapshot.core
        import torpor.vmm.pool  # noqa: F401

    vms = root / "vms"
    run = root / "locks"
    run.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chdir(run)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SOCK_NAME)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        srv.bind(SOCK_NAME)
    finally:
        os.umask(old)
    srv.listen(16)
    ino = os.stat(SOCK_NAME).st_ino
    seen = _sources()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        idle = float(os.environ.get(IDLE_ENV, IDLE_SECONDS))
    except ValueError:
        idle = IDLE_SECONDS
    last = time.monotonic()
    try:
        while True:
            r, _, _ = select.select([srv], [], [], 5.0)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            if not vms.is_dir() or os.stat(SOCK_NAME).st_ino != ino:
                return 0  # the root is gone, or another zygote took over
            if not r:
                if time.monotonic() - last > idle and not vms_running(vms):
                    return 0
                continue
            conn, _ = srv.accept()
            last = time.monotonic()
            with conn:
                if _stale(seen):
                    return 0  # closing without a reply: the caller falls back
                _handle(conn, srv, root, launch)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(SOCK_NAME).st_ino == ino:
                os.unlink(SOCK_NAME)


def _handle(conn: socket.socket, srv: socket.socket, root: Path, launch: object) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    uid = int.from_bytes(creds[4:8], sys.byteorder)
    if uid != os.getuid():
        return
    conn.settimeout(5)
    fds = array.array("i")
    msg, anc, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if not fds:
        _handle_spare(conn, srv, root, msg)
        return
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return
    ready_fd = fds[0]
    try:
        req = json.loads(msg)
        vm_id = str(req["vm"])
        env = {str(k): str(v) for k, v in req["env"].items()}
        if not vm_id.isalnum() or not (root / "vms" / vm_id / "vm.json").exists():
            return
        _double_fork(conn, srv, lambda: _become_shim(root, vm_id, env, ready_fd, launch))
        conn.sendall(b"ok\n")
    except (ValueError, KeyError, TypeError, OSError):
        return
    finally:
        os.close(ready_fd)


def _handle_spare(conn: socket.socket, srv: socket.socket, root: Path, msg: bytes) -> None:
    """``{"spare": snapshot, "vm": id, "env": {...}}``: fork a pool spare (torpor.vmm.pool)."""
    try:
        req = json.loads(msg)
        snap, vm_id = str(req["spare"]), str(req["vm"])
        env = {str(k): str(v) for k, v in req["env"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return
    if not (snap.isalnum() and vm_id.isalnum()):
        return

    def become_spare() -> None:
        code = 1
        try:
            os.setsid()
            os.environ.clear()
            os.environ.update(env)
            os.chdir("/")
            from torpor.vmm import pool

            pool.detach_stdio()
            code = pool.run_spare(root, snap, vm_id)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code if isinstance(code, int) else 1)

    _double_fork(conn, srv, become_spare)
    with contextlib.suppress(OSError):
        conn.sendall(b"ok\n")


def _double_fork(conn: socket.socket, srv: socket.socket, become: Callable[[], None]) -> None:
    """Run ``become`` (which never returns) in a grandchild re-parented to init, like a
    process started with ``start_new_session``; waits for the intermediate child only."""
    # the child's collector then skips the zygote's objects: a shim's first GC no
    # longer writes (copies) every page of the inherited heap
    gc.freeze()
    pid = os.fork()
    if pid == 0:
        try:
            if os.fork() == 0:
                conn.close()
                srv.close()
                # every file a shim or spare creates private, whatever umask the zygote
                # inherited from the library caller that started it (022: logs were 0644)
                os.umask(0o077)
                from torpor.vmm import shim

                shim.FORK_MODULES = frozenset(sys.modules)
                become()
            os._exit(0)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)


def _become_shim(
    root: Path, vm_id: str, env: dict[str, str], ready_fd: int, launch: object
) -> None:
    code = 1
    try:
        os.setsid()
        os.environ.clear()
        os.environ.update(env)
        vm_dir = root / "vms" / vm_id
        log = os.open(vm_dir / "shim.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        # the shim runs from "/" like one started by the manager; launch chdirs
        os.chdir("/")
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        code = launch.main(  # type: ignore[attr-defined]
            ["--root", str(root), "--vm", vm_id, "--ready-fd", str(ready_fd)]
        )
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code if isinstance(code, int) else 1)


def request(root: Path, vm_id: str, ready_wfd: int, timeout: float = 2.0) -> bool:
    """Ask the zygote for a shim; True if it forked one (which now owns ``ready_wfd``)."""
    from torpor.vmm.sockets import connect_unix

    path = root / "locks" / SOCK_NAME
    if not path.exists():
        return False
    try:
        s = connect_unix(path, timeout=timeout)
    except OSError:
        return False
    with s:
        s.settimeout(timeout)
        body = json.dumps({"vm": vm_id, "env": dict(os.environ)}).encode()
        try:
            s.sendmsg(
                [body],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [ready_wfd]))],
            )
            return s.recv(16).startswith(b"ok")
        except OSError:
            return False


def request_spare(root: Path, snap_id: str, vm_id: str, timeout: float = 2.0) -> bool:
    """Ask the zygote to prepare a pool spare; True if it forked one."""
    from torpor.vmm.sockets import connect_unix

    path = root / "locks" / SOCK_NAME
    if not path.exists():
        start(root)
        return False
    try:
        s = connect_unix(path, timeout=timeout)
    except OSError:
        return False
    with s:
        s.settimeout(timeout)
        body = json.dumps({"spare": snap_id, "vm": vm_id, "env": dict(os.environ)}).encode()
        try:
            s.sendall(body)
            return s.recv(16).startswith(b"ok")
        except OSError:
            return False


def start(root: Path) -> None:
    """Start a zygote for ``root`` in the background (detached; best effort)."""
    import subprocess

    with contextlib.suppress(OSError):
        subprocess.Popen(
            [sys.executable, "-m", "torpor.vmm.zygote", "--root", str(root)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd="/",
            umask=0o077,
        )


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="torpor-zygote")
    ap.add_argument("--root", required=True)
    args = ap.parse_args()
    return serve(Path(args.root))


if __name__ == "__main__":
    sys.exit(main())
