"""``python -m torpor.sandbox.reaper``: a sandbox's ``timeout`` and ``idle`` watcher.

Started detached (own session) by ``Sandbox.create(timeout=..., idle=...)`` and
``set_timeout``, so both hold after the creating process exits.  Every second it
re-reads ``<vm dir>/sandbox.json`` (``set_timeout`` may move or clear the
deadline; with neither a deadline nor ``idle`` left the watcher exits), and:

- removes the VM once the deadline has passed (running or hibernated);
- hibernates a running VM whose ``sandbox.active`` is older than ``idle``
  seconds, holding the exclusive ``sandbox.busy`` lock (taken without waiting: a
  foreground command holds it shared, and then the VM is not idle).  The
  activity time is checked again under the lock.

A VM removed meanwhile ends the watcher.  One watcher per VM: it holds
``<vm dir>/sandbox.reaper`` locked (exclusive flock) for its life and exits at
once if another holds it, so a Sandbox that finds the lock free may start one
(``Sandbox._ensure_reaper``) without counting the ones already there.  Were two to
run anyway, that would be harmless: removal is idempotent and a snapshot of a VM is
serialised by torpor.snapshot (the loser sees a VM that is no longer running).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from torpor.errors import NotFoundError, TorporError
from torpor.paths import Paths

POLL = 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="torpor.sandbox.reaper")
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--vm", required=True)
    args = ap.parse_args(argv)
    from torpor.fsutil import locked
    from torpor.sandbox.core import REAPER_LOCK

    vm_dir = Paths(args.root).vm(args.vm)
    try:
        with locked(vm_dir / REAPER_LOCK, wait=False, make_parents=False):
            return _watch(Paths(args.root), args.vm, vm_dir)
    except (BlockingIOError, FileNotFoundError):
        return 0  # another watcher has it, or the VM is gone


def _watch(paths: Paths, vm_id: str, vm_dir: Path) -> int:
    from torpor.sandbox.core import _read_limits
    from torpor.vmm.manager import VMManager

    mgr = VMManager(paths)
    while True:
        if not (vm_dir / "vm.json").exists():
            return 0  # removed meanwhile
        end_at, idle = _read_limits(vm_dir)
        if end_at is None and idle is None:
            return 0  # nothing (left) to enforce
        if end_at is not None and end_at <= time.time():
            break
        if idle is not None and _idle_for(vm_dir) >= idle:
            try:
                _hibernate_if_idle(mgr, vm_id, vm_dir, idle)
            except NotFoundError:
                return 0
            except TorporError as e:  # e.g. a full store: try again later
                with contextlib.suppress(OSError):
                    print(f"torpor sandbox watcher: hibernate: {e}", file=sys.stderr)
        wait = POLL if end_at is None else min(POLL, max(0.0, end_at - time.time()))
        time.sleep(wait)
    try:
        mgr.remove(vm_id, force=True)
    except NotFoundError:
        return 0
    except TorporError as e:
        with contextlib.suppress(OSError):
            print(f"torpor sandbox reaper: {e}", file=sys.stderr)
        return 1
    return 0


def _idle_for(vm_dir: Path) -> float:
    from torpor.sandbox.core import ACTIVE_FILE

    try:
        return time.time() - (vm_dir / ACTIVE_FILE).stat().st_mtime
    except OSError:
        return 0.0  # no record yet: not idle


def _hibernate_if_idle(mgr: object, vm_id: str, vm_dir: Path, idle: float) -> None:
    from torpor.sandbox.core import busy_lock
    from torpor.snapshot import snapshot
    from torpor.vmm.manager import VMManager
    from torpor.vmm.state import Status

    assert isinstance(mgr, VMManager)
    try:
        with busy_lock(vm_dir, shared=False, wait=False):
            if _idle_for(vm_dir) < idle:
                return  # used while we took the lock
            if mgr.get(vm_id).state.status != Status.RUNNING:
                return  # hibernated, stopped or starting: nothing to do
            snapshot(mgr, vm_id, stop=True)
    except BlockingIOError:
        return  # a command is running: not idle


if __name__ == "__main__":
    sys.exit(main())
