"""Guest RAM files and shadows live on tmpfs, outside the torpor home: they must not
outlive their VM or their home, even when those are deleted behind torpor's back."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from torpor.paths import Paths
from torpor.vmm.layout import VMFiles, home_ram_dir, reap_ram_dirs


def _shm_is_writable_tmpfs() -> bool:
    """Probed here, not by the code under test: a bug there must fail, not skip."""
    shm = Path("/dev/shm")
    with Path("/proc/mounts").open() as mounts:
        if not any(line.split()[1:3] == [str(shm), "tmpfs"] for line in mounts):
            return False
    try:
        with tempfile.NamedTemporaryFile(dir=shm):
            return True
    except OSError:
        return False


def test_orphaned_ram_files_are_reaped(tmp_path, monkeypatch) -> None:
    if not _shm_is_writable_tmpfs():
        pytest.skip("no writable tmpfs at /dev/shm: RAM stays inside the VM folder")
    monkeypatch.delenv("TORPOR_RAM_ON_DISK", raising=False)
    paths = Paths(tmp_path / "home").ensure()
    ram_dir = home_ram_dir(paths.root)
    assert ram_dir is not None and ram_dir.is_relative_to("/dev/shm"), ram_dir
    keep, gone = paths.vm("a" * 64), paths.vm("b" * 64)
    for d in (keep, gone):
        d.mkdir(parents=True)
        VMFiles(d).ram.write_bytes(b"x")
        VMFiles(d).shadow.write_bytes(b"x")
        assert VMFiles(d).ram.parent == ram_dir
    shutil.rmtree(gone)  # a VM folder deleted by hand
    reap_ram_dirs()
    assert VMFiles(keep).ram.exists() and VMFiles(keep).shadow.exists()
    assert not VMFiles(gone).ram.exists() and not VMFiles(gone).shadow.exists()
    shutil.rmtree(paths.root)  # the whole home deleted (a test's tmp folder, say)
    reap_ram_dirs()
    assert not ram_dir.exists()
