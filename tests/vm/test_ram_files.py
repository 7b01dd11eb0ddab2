"""Guest RAM files and shadows live on tmpfs, outside the torpor home: they must not
outlive their VM or their home, even when those are deleted behind torpor's back."""

from __future__ import annotations

import shutil

import pytest

from torpor.paths import Paths
from torpor.vmm.layout import VMFiles, home_ram_dir, reap_ram_dirs


def test_orphaned_ram_files_are_reaped(tmp_path) -> None:
    paths = Paths(tmp_path / "home").ensure()
    ram_dir = home_ram_dir(paths.root)
    if ram_dir is None:
        pytest.skip("no writable tmpfs at /dev/shm: RAM stays inside the VM folder")
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
