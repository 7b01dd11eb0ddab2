"""A VM folder being created had, for a moment, neither ``vm.json`` nor its creator's
``.creating`` marker (written right after ``mkdir``); a ``ps`` (``list``) in that moment
took it for an interrupted create and deleted it under its creator (CI: ``session
create`` failed with "qemu-img: Could not create .../disk.qcow2.tmp: No such file or
directory" while a test polled ``list``).  Now the folder is made under a staging name
with its marker in it, then renamed (``new_vm_folder``, for VMs and the pool's spares
alike): under its id it always names its creator."""

from __future__ import annotations

import os
import time
from pathlib import Path

from torpor.paths import Paths
from torpor.vmm.manager import STAGING_PREFIX, VMManager, new_vm_folder


def _folder(paths: Paths, name: str, marker: str | None) -> Path:
    d = paths.vms / name
    d.mkdir(mode=0o700, parents=True)
    if marker is not None:
        (d / ".creating").write_text(marker)
    return d


def test_a_new_folder_appears_with_its_creators_marker(tmp_path) -> None:
    paths = Paths(tmp_path / "home").ensure()
    d = new_vm_folder(paths, os.urandom(32).hex(), {"extra.json": "{}"})
    assert (d / ".creating").read_text().split()[0] == str(os.getpid())
    assert (d / "extra.json").read_text() == "{}"
    VMManager(paths).list()
    assert d.is_dir()
    assert [p.name for p in paths.vms.iterdir() if p.name != "names"] == [d.name]


def test_list_leaves_a_folder_being_staged_alone(tmp_path) -> None:
    paths = Paths(tmp_path / "home")
    paths.names.mkdir(parents=True, exist_ok=True)
    staged = _folder(paths, STAGING_PREFIX + os.urandom(32).hex(), None)
    VMManager(paths).list()
    assert staged.is_dir()


def test_list_removes_what_a_dead_creator_left(tmp_path) -> None:
    paths = Paths(tmp_path / "home")
    paths.names.mkdir(parents=True, exist_ok=True)
    dead = _folder(paths, os.urandom(32).hex(), "999999999 1\n")  # its creator is gone
    bare = _folder(paths, os.urandom(32).hex(), None)  # under its id: never a live create
    old = _folder(paths, STAGING_PREFIX + os.urandom(32).hex(), None)  # died while staging
    then = time.time() - 3600
    os.utime(old, (then, then))
    VMManager(paths).list()
    assert not dead.exists() and not bare.exists() and not old.exists()
