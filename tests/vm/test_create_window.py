"""A VM folder being created has no ``vm.json`` yet, and for a moment no ``.creating``
marker either (the creator writes it right after ``mkdir``).  A ``ps`` (``list``) in
that moment took it for an interrupted create and deleted it under its creator (CI:
``session create`` failed with "qemu-img: Could not create .../disk.qcow2.tmp: No such
file or directory" while a test polled ``list``).  A folder left by a creator that
really died is still cleaned up."""

from __future__ import annotations

import os
import time

from torpor.paths import Paths
from torpor.vmm.manager import VMManager


def _folder(paths: Paths, marker: str | None) -> os.PathLike[str]:
    d = paths.vm(os.urandom(32).hex())
    d.mkdir(mode=0o700, parents=True)
    if marker is not None:
        (d / ".creating").write_text(marker)
    return d


def test_list_leaves_a_folder_just_made_by_a_creator_alone(tmp_path) -> None:
    paths = Paths(tmp_path / "home")
    mgr = VMManager(paths)
    paths.names.mkdir(parents=True, exist_ok=True)
    bare = _folder(paths, None)  # between mkdir and the marker
    empty = _folder(paths, "")  # the marker opened, not yet written
    mgr.list()
    assert os.path.isdir(bare) and os.path.isdir(empty)


def test_list_removes_a_folder_whose_creator_died(tmp_path) -> None:
    paths = Paths(tmp_path / "home")
    mgr = VMManager(paths)
    paths.names.mkdir(parents=True, exist_ok=True)
    dead = _folder(paths, "999999999 1\n")  # a creator that is gone
    old = _folder(paths, None)  # no marker, and long ago: its creator died right away
    then = time.time() - 3600
    os.utime(old, (then, then))
    mgr.list()
    assert not os.path.exists(dead) and not os.path.exists(old)
