"""Issue 9, defect 3: every file and folder torpor creates is private to its owner.

A VM's home holds guest RAM, disk overlays, snapshot manifests (which carry ``-e``
values) and logs: another local user must read none of it.  The home is created by
the real CLI in a world-traversable parent, as ``/var/lib/torpor`` would be, and then
every path under it (and the VM's tmpfs RAM folder) is checked, and an unprivileged
user (``nobody``, through ``setpriv``) tries to find the secret.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import torpor_cli
from torpor.demo.image import write_busybox_rootfs
from torpor.guest.kernel import find_kernels_dir
from torpor.vmm.layout import home_ram_dir

pytestmark = [pytest.mark.vm, pytest.mark.slow]

SECRET = "sk-torpor-test-4f1b9c2e"
NOBODY = 65534


@pytest.fixture
def fresh_home(torpor_home: Path) -> Iterator[Path]:
    """A home that does not exist yet, in a parent that everyone may traverse."""
    parent = Path(tempfile.mkdtemp(prefix="torpor-perm-", dir="/tmp"))
    parent.chmod(0o755)
    home = parent / "home"
    yield home
    # remove whatever VMs the test left, then the folder
    env = {"TORPOR_HOME": str(home)}
    r = torpor_cli("ps", "-a", "-q", env=env)
    for vm_id in r.stdout.decode().split():
        torpor_cli("rm", "-f", vm_id, env=env)
    ram = home_ram_dir(home)
    shutil.rmtree(parent, ignore_errors=True)
    if ram is not None:
        shutil.rmtree(ram, ignore_errors=True)


def _not_private(root: Path) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            if st.st_mode & 0o077:
                bad.append(f"{oct(stat.S_IMODE(st.st_mode))} {p}")
    return bad


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_reads_nothing(fresh_home: Path, tmp_path: Path) -> None:
    env = {"TORPOR_HOME": str(fresh_home)}
    tar = write_busybox_rootfs(tmp_path / "tools.tar")
    r = torpor_cli("import", str(tar), "tools:latest", env=env)
    assert r.returncode == 0, r.stderr
    kernels = find_kernels_dir()
    assert kernels is not None, "the guest kernel must be set up (scripts/setup)"
    # the kernel as `torpor setup` unpacks it (private), copied to spare the download
    dest = fresh_home / "guest" / "kernels"
    shutil.copytree(kernels, dest, symlinks=True)
    for dirpath, _dirs, files in os.walk(dest):
        for name in [".", *files]:
            p = Path(dirpath) / name
            if not p.is_symlink():
                p.chmod(stat.S_IMODE(p.stat().st_mode) & 0o700)
    r = torpor_cli("setup", env=env)  # builds the initramfs, probes the accelerator
    assert r.returncode == 0, r.stderr

    r = torpor_cli(
        "run", "-d", "--name", "secretive", "-e", f"API_KEY={SECRET}",
        "tools:latest", "sh", "-c", f"echo {SECRET} > /root/key; sleep 100000",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    r = torpor_cli("exec", "secretive", "sync", env=env)
    assert r.returncode == 0, r.stderr
    r = torpor_cli("snapshot", "secretive", "--tag", "one", env=env)
    assert r.returncode == 0, r.stderr
    r = torpor_cli("snapshot", "secretive", "--stop", env=env)  # hibernation: cache on disk
    assert r.returncode == 0, r.stderr

    assert stat.S_IMODE(fresh_home.stat().st_mode) == 0o700
    bad = _not_private(fresh_home)
    ram = home_ram_dir(fresh_home)
    if ram is not None:
        bad += _not_private(ram)
    assert not bad, "readable by others:\n" + "\n".join(bad)

    # and, as a user would try it: nobody finds the secret anywhere
    roots = [str(fresh_home)] + ([str(ram)] if ram is not None else [])
    probe = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "grep", "-r", "-a", "-l", SECRET, *roots],
        capture_output=True,
        timeout=120,
    )
    assert probe.stdout == b"", probe.stdout.decode()
    assert b"Permission denied" in probe.stderr
    # the owner, by contrast, does find it (the probe above can fail)
    mine = subprocess.run(["grep", "-r", "-a", "-l", SECRET, *roots], capture_output=True)
    assert mine.stdout, "the secret should be somewhere in the home (manifest, RAM, disk)"


def test_copies_a_library_caller_makes_are_private(vms, tools_image, paths) -> None:
    """Through the Python API (the caller's umask, 022 here, not the CLI's 077): the
    restore's shadow copy, the hibernation cache and the wake's copies are 0600."""
    from torpor.snapshot import restore, snapshot

    old = os.umask(0o022)
    try:
        mgr = vms.mgr
        vm = vms.run(tools_image, "sleep", "100000", name="priv-copies")
        snap = snapshot(mgr, vm.id)
        # one-off restore: RAM copied from the source's shadow, which seeds its own
        other = restore(mgr, snap.manifest.id, name="priv-copies-2", shared=False)
        vms.ids.append(other.id)
        shadow = mgr.get(other.id).files.shadow
        _wait_for(lambda: _shadow_vouched(shadow), "the restore's shadow")
        hib = snapshot(mgr, vm.id, stop=True)  # its RAM, disk, device state cached on disk
        cache = paths.snapshot_cache / hib.manifest.id
        assert cache.is_dir()
        copies = sorted(cache.iterdir())  # hibernation: RAM, disk and device state
        woken = mgr.start(vm.id)  # the wake copies the disk back from the cache
        assert {p.name for p in copies} >= {"memory", "disk", "devstate"}
        copies.append(woken.dir / "disk.qcow2")
        copies += [shadow, shadow.with_name(shadow.name + ".json")]  # a copy, and its meta
        _assert_private(copies)
    finally:
        os.umask(old)


def _shadow_vouched(shadow: Path) -> bool:
    import json

    meta = shadow.with_name(shadow.name + ".json")
    try:
        return bool(json.loads(meta.read_text()).get("snapshot"))
    except (OSError, ValueError):
        return False


def _wait_for(cond, what: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_library_callers_vm_files_are_private(vms, tools_image, paths) -> None:
    """A VM run through the Python API under umask 022: its logs, argv, jail record and
    every other file of its folder are private (the shim is forked by the zygote, which
    inherited the caller's umask), and so is the hibernation cache's folder.  The jail
    gives QEMU's uid what it needs by its own modes, not by the umask."""
    from torpor.snapshot import snapshot

    old = os.umask(0o022)
    try:
        mgr = vms.mgr
        vm = vms.run(tools_image, "sleep", "100000", name="priv-logs")
        with mgr.client(vm) as c:
            assert c.exec(["echo", "hi"]).status.code == 0
        hib = snapshot(mgr, vm.id, stop=True)
        # the jail's folder is QEMU's uid's, with its own modes
        files = [p for p in vm.dir.iterdir() if not p.is_symlink() and p.name != "jail"]
        _assert_private([*sorted(files), paths.snapshot_cache / hib.manifest.id])
    finally:
        os.umask(old)


def _assert_private(paths_: list[Path]) -> None:
    bad = [
        f"{oct(stat.S_IMODE(p.stat().st_mode))} {p}"
        for p in paths_
        if stat.S_IMODE(p.stat().st_mode) & 0o077
    ]
    assert not bad, "readable by others:\n" + "\n".join(bad)
