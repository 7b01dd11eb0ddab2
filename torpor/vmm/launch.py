"""The shim's entry point: start QEMU first, import the rest of the shim meanwhile.

Role: ``python -m torpor.vmm.launch --root R --vm ID --ready-fd N`` is what
``VMManager.start`` runs.  Before anything heavy is imported (asyncio, the agent
protocol, QMP: ~70 ms of imports here) it builds QEMU's command line, spawns QEMU
and, for a restore, starts copying the snapshot's RAM into the VM's RAM file on a
thread.  QEMU's own start-up (~25 ms to its QMP greeting under TCG) and the RAM copy
(~50 ms for 130 MB) then overlap the imports instead of following them.  Only then
does :mod:`torpor.vmm.shim` take over, adopting the running QEMU.

Invariants: QEMU gets ``PR_SET_PDEATHSIG`` (it dies with this process, which
becomes the shim), and any failure before the hand-over is reported on the ready
pipe like every other start-up failure.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torpor.paths import Paths
from torpor.vmm.layout import VMFiles
from torpor.vmm.state import VMConfig, load_config

PR_SET_PDEATHSIG = 1


def pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.umask(0o077)


@dataclass
class Prelaunch:
    """A QEMU already running for this VM, handed to the shim."""

    popen: subprocess.Popen[bytes]
    accel: str
    t0: float  # time.monotonic() at spawn
    restore: dict[str, Any] | None  # restore.json, when restoring a snapshot
    ram_copy: concurrent.futures.Future[int] | None  # the RAM copy, when restoring
    prep_ms: float = 0.0  # from the start of prelaunch to QEMU's spawn
    spec_ms: float = 0.0  # of which: machine_spec_for (kernel, initramfs, accelerator)
    # the FUSE server of a lazy restore (torpor.vmm.lazymem.LazyMemory): guest RAM is
    # served from the store; the shim stops it once QEMU is gone (and if the shim dies,
    # its parent-death signal makes it unmount and exit)
    lazy: Any = None
    # guest RAM mapped share=off (copy-on-write over a base): the RAM file never shows
    # the guest's writes, so only the RAM-less capture may snapshot this VM
    ram_private: bool = False
    # the sealed shared base QEMU maps share=off (restore.json "ram_base"): the shim's
    # reference for the VM's whole life (torpor.vmm.basemem.Base; None: own RAM file)
    base: Any = None


def _copy_job(files: VMFiles, info: dict[str, Any]) -> concurrent.futures.Future[int] | None:
    """Create the RAM file at full size (QEMU maps it at start) and fill it on a thread."""
    src = info.get("ram_from")
    if not src:
        return None
    ram = files.ram
    with contextlib.suppress(FileNotFoundError):
        ram.unlink()
    fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, int(info["ram_size"]))
    finally:
        os.close(fd)
    src_path = files.dir / src
    locked_snap = info.get("ram_snapshot")
    fut: concurrent.futures.Future[int] = concurrent.futures.Future()

    def run() -> None:
        from torpor.vmm.capture import copy_shadow_of, sparse_copy

        try:
            if locked_snap:
                n = copy_shadow_of(src_path, ram, locked_snap, into_existing=True)
            else:
                n = sparse_copy(src_path, ram, into_existing=True)
        except BaseException as e:  # handed to whoever awaits the copy
            fut.set_exception(e)
        else:
            fut.set_result(n)

    threading.Thread(target=run, name="ram-copy", daemon=True).start()
    return fut


def prelaunch(paths: Paths, cfg: VMConfig, files: VMFiles) -> Prelaunch:
    """Build the argv, prepare RAM, spawn QEMU. Raises TorporError / OSError."""
    from torpor.vmm.boot import machine_spec_for
    from torpor.vmm.qemu import build_argv

    t_start = time.monotonic()
    spec, accel = machine_spec_for(paths, cfg, files)
    t_spec = time.monotonic()
    for p in (files.ctl_sock, files.qmp_sock, files.events_sock, files.console_sock):
        with contextlib.suppress(FileNotFoundError):  # the shim must not dial a stale one
            p.unlink()
    restore_file = files.dir / "restore.json"
    info: dict[str, Any] | None = None
    ram_copy = None
    lazy = None
    base = None
    if restore_file.exists():
        info = json.loads(restore_file.read_text())
        spec = dataclasses.replace(spec, incoming=True)
        if info.get("lazy"):
            # mounted on the RAM file's path before QEMU maps it (never a missing file)
            lazy = _lazy_for(paths, cfg, files, info)
            spec = dataclasses.replace(spec, ram_shared=False)
        if info.get("ram_private"):  # the restore's contract: RAM mapped private
            spec = dataclasses.replace(spec, ram_shared=False)
        if info.get("ram_base"):
            # guest RAM is the snapshot's sealed base, mapped private: no copy
            base = _base_for(paths, info)
            spec = dataclasses.replace(spec, ram_file=Path(base.mem_path), ram_shared=False)
            with contextlib.suppress(FileNotFoundError):
                files.ram.unlink()
        else:
            ram_copy = _copy_job(files, info)
    else:
        with contextlib.suppress(FileNotFoundError):
            files.ram.unlink()
    from torpor.vmm import jail

    argv = build_argv(spec)
    keep = (base.fd,) if base is not None else ()
    # plan None: not jailed
    argv, plan = jail.for_launch(paths.root, cfg, files, spec, argv, keep_fds=keep)
    (files.dir / "qemu.argv").write_text(json.dumps(argv) + "\n")
    preexec = jail.enter_fn(plan) if plan else pdeathsig
    if lazy is not None:  # page faults then read the FUSE file's read-ahead, not 4 MiB
        from torpor.vmm.lazymem import no_hugepage_preexec

        preexec = no_hugepage_preexec(preexec)
    try:
        with open(files.qemu_log, "ab") as qlog:
            t0 = time.monotonic()
            with jail.NewPidNamespace() if plan else contextlib.nullcontext():
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=qlog,
                    stderr=qlog,
                    preexec_fn=preexec,
                    close_fds=True,
                    pass_fds=plan.pass_fds if plan else keep,
                )
    finally:
        if plan:
            jail.close_parent_fds(plan)
    if plan:
        jail.join_cgroups(plan, popen.pid)  # on a thread: overlaps QEMU's start-up
    return Prelaunch(
        popen,
        accel,
        t0,
        info,
        ram_copy,
        prep_ms=(t0 - t_start) * 1000,
        spec_ms=(t_spec - t_start) * 1000,
        lazy=lazy,
        ram_private=not spec.ram_shared,
        base=base,
    )


def _base_for(paths: Paths, info: dict[str, Any]) -> Any:
    """This VM's reference to the base named in restore.json: from its running holder
    (the restoring call holds it until the VM is started), else acquired again from
    the store (the holder went away meanwhile: e.g. a wake long after the restore was
    prepared).  Raises TorporError / OSError."""
    from torpor.vmm import basemem

    rb = info["ram_base"]
    try:
        return basemem.connect(paths, str(rb["snapshot"]), int(rb["size"]))
    except basemem.BaseUnavailable:
        from torpor.errors import VMError
        from torpor.store.home import home_store

        store = home_store(paths)
        try:
            m = store.get(str(rb["snapshot"]))
            try:
                return basemem.acquire(paths, store, m)
            except basemem.BaseUnavailable as e:
                raise VMError(f"no shared base for the restore: {e}", step="restore") from e
        finally:
            store.close()


def _lazy_for(paths: Paths, cfg: VMConfig, files: VMFiles, info: dict[str, Any]) -> Any:
    """Start the FUSE server that serves this restore's RAM (torpor.vmm.lazymem)."""
    from torpor.vmm import jail, lazymem

    lz = info["lazy"]
    jailed, _ = jail.wanted()
    uid, gid, _ = jail.ids_for(paths.root, cfg.id) if jailed else (0, 0, 0)
    return lazymem.start(
        paths.root, files.dir, files.ram, str(lz["snapshot"]), int(lz["size"]),
        uid=uid, gid=gid, jailed=jailed,
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="torpor-shim")
    ap.add_argument("--root", required=True)
    ap.add_argument("--vm", required=True)
    ap.add_argument("--ready-fd", type=int)
    args = ap.parse_args(argv)
    paths = Paths(Path(args.root))
    os.chdir(paths.vm(args.vm))  # sockets are bound by relative name: see boot.py
    files = VMFiles(paths.vm(args.vm))
    pre: Prelaunch | BaseException
    try:
        from torpor.vmm.state import alive, load_state

        st = load_state(files.dir)
        if st.status.active and alive(st.shim_pid, st.shim_start) and st.shim_pid != os.getpid():
            pre = RuntimeError("VM is already running")
        else:
            # through the importable module, not __main__: the shim checks the type
            from torpor.vmm import launch

            pre = launch.prelaunch(paths, load_config(files.dir), files)
    except Exception as e:  # reported on the ready pipe by the shim
        pre = e
    from torpor.vmm import shim

    return shim.main(args, pre)


if __name__ == "__main__":
    sys.exit(main())
