"""A full disk under a VM: detected, shown, refused fast, and recovered from.

Real parts: the VM's folder is moved onto a small tmpfs mounted for the test (as
root), the guest fills its own disk until QEMU's qcow2 overlay cannot grow, QEMU
stops the guest (``werror=enospc``), and torpor must say so in ``ps``/``inspect``,
refuse ``exec``/``snapshot`` with a clear error naming the full folder, and resume
the guest once the filesystem has room again (here: the tmpfs is grown).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import torpor_cli

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root"),
]


def _state(ref: str) -> dict:
    r = torpor_cli("inspect", ref)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]["State"]


def _wait(pred, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def small_vm_dir(vms, tools_image: str) -> Iterator[tuple[object, Path]]:
    from torpor.vmm.manager import RunRequest

    vm = vms.mgr.create(
        RunRequest(
            image=tools_image,
            command=("sleep", "infinity"),
            name="disk-full",
            memory_mib=256,
            network=False,
        )
    )
    vms.ids.append(vm.id)
    aside = vm.dir.with_name(vm.dir.name + ".aside")
    os.rename(vm.dir, aside)
    vm.dir.mkdir(mode=0o700)
    used = sum(p.stat().st_blocks * 512 for p in aside.iterdir())
    size_kib = used // 1024 + 12 * 1024  # what the VM has, and 12 MiB to grow into
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(vm.dir)],
        check=True,
    )
    try:
        for p in aside.iterdir():
            shutil.copy2(p, vm.dir / p.name)
        shutil.rmtree(aside)
        yield vm, vm.dir
    finally:
        with contextlib.suppress(Exception):
            vms.mgr.kill(vm.id)
        subprocess.run(["umount", "-l", str(vm.dir)], check=False)


def test_full_disk_is_reported_refused_and_recovered(vms, small_vm_dir) -> None:
    vm, vm_dir = small_vm_dir
    vms.mgr.start(vm.id)
    r = torpor_cli(
        "exec",
        "-d",
        "disk-full",
        "sh",
        "-c",
        "dd if=/dev/zero of=/fill bs=1M count=40 && sync && echo done > /filled && sync",
    )
    assert r.returncode == 0, r.stderr

    _wait(lambda: _state("disk-full").get("io_error"), "the I/O error to be reported")
    st = _state("disk-full")
    assert st["status"] == "running"
    assert str(vm_dir) in st["io_error"] and "full" in st["io_error"]
    r = torpor_cli("ps")
    line = [x for x in r.stdout.decode().splitlines() if "disk-full" in x]
    assert line and "disk full" in line[0], r.stdout

    # exec and snapshot fail at once with the reason, instead of hanging
    r = torpor_cli("exec", "disk-full", "true")
    assert r.returncode == 125, (r.stdout, r.stderr)
    assert b"full" in r.stderr and str(vm_dir).encode() in r.stderr
    r = torpor_cli("snapshot", "create", "disk-full")
    assert r.returncode != 0
    assert b"full" in r.stderr and b"Traceback" not in r.stderr
    assert str(vm_dir).encode() in r.stderr and b"staging" not in r.stderr  # the right path

    # room again: the guest resumes by itself and its write completes
    subprocess.run(["mount", "-o", "remount,size=512m", str(vm_dir)], check=True)
    _wait(lambda: not _state("disk-full").get("io_error"), "the guest to resume")
    _wait(
        lambda: torpor_cli("exec", "disk-full", "cat", "/filled").stdout == b"done\n",
        "the guest's write to complete",
    )
    assert _state("disk-full")["status"] == "running"


def test_stop_of_a_disk_full_vm(vms, small_vm_dir) -> None:
    vm, _vm_dir = small_vm_dir
    vms.mgr.start(vm.id)
    r = torpor_cli(
        "exec", "-d", "disk-full", "sh", "-c", "dd if=/dev/zero of=/fill bs=1M count=40; sync"
    )
    assert r.returncode == 0, r.stderr
    _wait(lambda: _state("disk-full").get("io_error"), "the I/O error to be reported")
    r = torpor_cli("stop", "-t", "1", "disk-full")
    assert r.returncode == 0, r.stderr
    st = _state("disk-full")
    assert st["status"] == "exited" and not st["io_error"]
