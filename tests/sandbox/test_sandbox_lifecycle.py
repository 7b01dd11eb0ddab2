"""Sandbox lifecycle on real VMs: context manager, timeout, snapshot/restore/fork,
hibernate and connect-wakes."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from torpor.errors import NotFoundError
from torpor.paths import Paths
from torpor.sandbox import Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def _small(paths: Paths, **kw: object) -> Sandbox:
    return Sandbox.create("tools:latest", memory="256M", network=False, paths=paths, **kw)


def test_context_manager_kills_on_exit(paths: Paths, tools_image: str) -> None:
    with _small(paths) as sb:
        assert sb.exec("echo in").stdout == "in\n"
        sid = sb.id
    with pytest.raises(NotFoundError):
        Sandbox.get_info(sid, paths=paths)
    # a killed sandbox stays gone: using the old object neither works nor brings
    # back an empty VM folder
    with pytest.raises(NotFoundError):
        sb.exec("true")
    with pytest.raises(NotFoundError):
        sb.files.read("/etc/hostname")
    assert not paths.vm(sid).exists()


def test_timeout_kills_the_sandbox_without_its_creator(paths: Paths, tools_image: str) -> None:
    sb = _small(paths, timeout=600)
    try:
        assert Sandbox.get_info(sb.id, paths=paths).end_at is not None
        sb.close()  # the creator lets go: the detached watcher enforces the deadline
        sb.set_timeout(2)
        deadline = time.monotonic() + 120  # a bound for a loaded machine, not a timing check
        while time.monotonic() < deadline:
            try:
                Sandbox.get_info(sb.id, paths=paths)
            except NotFoundError:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the sandbox outlived its timeout")
    finally:
        with contextlib.suppress(NotFoundError):
            sb.kill()


def test_snapshot_restore_fork_hibernate_connect(paths: Paths, tools_image: str) -> None:
    made: list[Sandbox] = []
    sb = _small(paths)
    made.append(sb)
    try:
        sb.files.write("/root/state.txt", "installed\n")
        snap = sb.snapshot(tag="after-install")
        sb.files.write("/root/state.txt", "changed later\n")
        sb2 = Sandbox.restore("after-install", paths=paths)
        made.append(sb2)
        assert sb2.id != sb.id
        assert sb2.files.read("/root/state.txt") == "installed\n"
        kids = sb.fork(2)
        made.extend(kids)
        assert len({k.id for k in kids}) == 2
        for k in kids:
            assert k.files.read("/root/state.txt") == "changed later\n"
        assert str(snap) == snap.id
        p = sb.exec("sleep 1000", background=True)
        sb.hibernate()
        assert Sandbox.get_info(sb.id, paths=paths).status == "hibernated"
        assert [i.status for i in Sandbox.list(paths=paths) if i.id == sb.id] == ["hibernated"]
        woke = Sandbox.connect(sb.id, paths=paths)
        assert woke.is_running()
        assert woke.files.read("/root/state.txt") == "changed later\n"
        # the background process was frozen with the machine and runs on after the wake
        assert woke.exec(f"kill -0 {p.pid}").exit_code == 0
        woke.close()
    finally:
        for s in made:
            with contextlib.suppress(NotFoundError):
                s.kill()


def _wait_status(sb: Sandbox, paths: Paths, status: str) -> None:
    deadline = time.monotonic() + 180  # a bound for a loaded machine, not a timing check
    while Sandbox.get_info(sb.id, paths=paths).status != status:
        if time.monotonic() > deadline:
            pytest.fail(f"sandbox never became {status}")
        time.sleep(0.5)


def test_idle_hibernates_but_never_under_a_command_and_use_wakes(
    paths: Paths, tools_image: str
) -> None:
    sb = _small(paths, idle=2)
    try:
        sb.files.write("/root/f", "kept\n")
        # longer than idle: the watcher must wait for the command (busy lock)
        r = sb.exec("sleep 6; echo done", timeout=120)
        assert (r.exit_code, r.stdout) == (0, "done\n")
        _wait_status(sb, paths, "hibernated")
        # the next use wakes it in place, with its memory and disk
        assert sb.files.read("/root/f") == "kept\n"
        assert Sandbox.get_info(sb.id, paths=paths).status == "running"
        assert sb.exec("echo awake").stdout == "awake\n"
    finally:
        with contextlib.suppress(NotFoundError):
            sb.kill()


def test_aio_create_exec_hibernate_connect_kill(paths: Paths, tools_image: str) -> None:
    import asyncio

    from torpor import aio

    async def main() -> str:
        async with await aio.Sandbox.create(
            "tools:latest", memory="256M", network=False, paths=paths
        ) as sb:
            await sb.files.write("/root/a", "1")
            assert (await sb.exec("cat /root/a")).stdout == "1"
            await sb.hibernate()
            assert (await aio.Sandbox.get_info(sb.id, paths=paths)).status == "hibernated"
            again = await aio.Sandbox.connect(sb.id, paths=paths)
            assert await again.files.read("/root/a") == "1"
            await again.close()
            return sb.id

    sid = asyncio.run(main())
    with pytest.raises(NotFoundError):  # the async context manager killed it
        Sandbox.get_info(sid, paths=paths)


def _watchers(vm_id: str) -> list[int]:
    """pids of the sandbox watchers (torpor.sandbox.reaper) of VM ``vm_id``."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdecimal():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
                if b"torpor.sandbox.reaper" in argv and vm_id.encode() in argv:
                    out.append(int(d))
    return out


def test_restored_forked_and_woken_sandboxes_keep_timeout_and_idle(
    paths: Paths, tools_image: str
) -> None:
    made: list[Sandbox] = []
    sb = _small(paths, timeout=900, idle=3)
    made.append(sb)
    try:
        snap = sb.snapshot()
        sb.kill()  # the settings travel inside the snapshot, not with the source VM
        sb2 = Sandbox.restore(snap, paths=paths)
        made.append(sb2)
        assert Sandbox.get_info(sb2.id, paths=paths).end_at is not None  # timeout inherited
        kid = sb2.fork(1)[0]
        made.append(kid)
        assert Sandbox.get_info(kid.id, paths=paths).end_at is not None
        # idle inherited: both hibernate by themselves
        _wait_status(sb2, paths, "hibernated")
        _wait_status(kid, paths, "hibernated")
        # the watcher dies while the sandbox sleeps (say, a host reboot): connect wakes
        # it and starts a new one, so idle still holds after the wake
        for pid in _watchers(kid.id):
            os.kill(pid, signal.SIGKILL)
        woke = Sandbox.connect(kid.id, paths=paths)
        assert woke.exec("echo awake").stdout == "awake\n"
        assert len(_watchers(kid.id)) == 1
        _wait_status(kid, paths, "hibernated")
        # set_timeout(None) is what a later restore inherits too
        sb2.set_timeout(None)
        again = Sandbox.restore(sb2.snapshot(), paths=paths)
        made.append(again)
        assert Sandbox.get_info(again.id, paths=paths).end_at is None
    finally:
        for s in made:
            with contextlib.suppress(NotFoundError):
                s.kill()


def test_cli_restore_and_fork_of_a_sandbox_snapshot_keep_its_timeout(
    paths: Paths, tools_image: str
) -> None:
    """`torpor restore` / `torpor fork` of a sandbox's snapshot enforce its timeout and
    idle as Sandbox.restore does (they came back with the labels but no watcher)."""
    from tests.conftest import torpor_cli

    sb = _small(paths, timeout=900, idle=600)
    made = [sb.id]
    try:
        snap = sb.snapshot()
        r = torpor_cli("restore", snap.id)
        assert r.returncode == 0, r.stderr
        restored = r.stdout.decode().split()[-1]
        made.append(restored)
        r = torpor_cli("fork", snap.id, "-n", "1")
        assert r.returncode == 0, r.stderr
        forked = r.stdout.decode().split()[-1]
        made.append(forked)
        for vm_id in (restored, forked):
            assert Sandbox.get_info(vm_id, paths=paths).end_at is not None
            assert len(_watchers(vm_id)) == 1
    finally:
        for ref in made:
            with contextlib.suppress(NotFoundError):
                Sandbox.connect(ref, paths=paths).kill()
