"""A snapshot names its base disk by content digest (torpor.snapshot.base): an image
rebuilt on the same host (same id, other bytes: mkfs picks a new UUID and hash seed)
is not a base for it.  Before, the overlay was rebased onto the rebuilt disk by image
id and the guest got a garbage filesystem; now the restore is a clear NotFoundError
and nothing is made.  One VM boot, plain local store."""

from __future__ import annotations

import pytest

from tests.store.test_s3_travel import _build_here, _home
from torpor.errors import NotFoundError
from torpor.image.ext4 import build_ext4
from torpor.image.store import ImageStore
from torpor.snapshot import base as bases
from torpor.snapshot import restore, snapshot
from torpor.vmm.manager import RunRequest

pytestmark = pytest.mark.vm


def test_an_image_rebuilt_with_other_bytes_is_not_the_snapshots_base(
    tools_image, paths, tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("TORPOR_STORE", raising=False)
    mgr = _home(tmp_path, "home", paths)
    image = _build_here(mgr.paths, ImageStore(paths).get(tools_image), paths)
    vm = mgr.create(RunRequest(image=image.id, command=("sleep", "600"), memory_mib=256))
    try:
        vm = mgr.start(vm.id)
        res = snapshot(mgr, vm.id, tag="before-rebuild")
    finally:
        mgr.remove(vm.id, force=True)
    digest = res.manifest.meta["base_digest"]
    assert digest == bases.disk_digest(mgr.paths, image.disk_path)
    assert res.manifest.meta["base_manifest"] == ""  # a local store keeps no base copy

    # the same image id built again on this host: other bytes
    image.disk_path.unlink()
    build_ext4(mgr.paths.tmp / "rootfs", image.disk_path)
    assert bases.disk_digest(mgr.paths, image.disk_path) != digest
    try:
        with pytest.raises(NotFoundError, match=digest[:16]):
            restore(mgr, "before-rebuild", name="garbage")
        assert mgr.list() == []
    finally:  # a restore that did not fail must not leave its QEMU behind
        for left in mgr.list():
            mgr.remove(left.id, force=True)
