"""A real VM snapshotted into the bucket on one home and restored on another whose
chunk cache is empty (two homes on one machine stand for two hosts).

The second home gets the base image by hard links and the store key by copy: a
restore finds its base disk by image id in the home's own image store, and a
snapshot's manifest names no image content (issue 12 §2, not done yet), so a host
without the image cannot restore.  Everything else comes from the bucket.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.snapshot.counter import COUNTER, count
from torpor.paths import Paths
from torpor.snapshot import restore, snapshot
from torpor.vmm.manager import VMManager

pytestmark = pytest.mark.vm


def _keeps_counting(mgr, vm) -> bool:
    n = count(mgr, vm)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if count(mgr, vm) > n:
            return True
    return False


def test_snapshot_to_the_bucket_restores_on_another_home(
    vms, tools_image, paths, tmp_path, s3_server, bucket, monkeypatch
) -> None:
    for k, v in s3_server.env(bucket, "torpor").items():
        monkeypatch.setenv(k, v)
    mgr = vms.mgr
    vm = vms.run(tools_image, *COUNTER, name="s3-mover")
    with mgr.client(vm) as c:
        c.exec(["sh", "-c", "echo from-the-bucket > /root/where.txt"])
    res = snapshot(mgr, vm.id, tag="s3-vm")
    assert res.timings["commit_bucket_ms"] > 0 and res.timings["upload_pending"] == 0
    snap = res.manifest.id
    keys = {
        o["Key"]
        for page in s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    }
    assert f"torpor/snapshots/{snap}.manifest" in keys

    new = Paths(tmp_path / "host-b").ensure()
    new.store.mkdir(parents=True, exist_ok=True)
    shutil.copy2(paths.store / "key", new.store / "key")  # one key per deployment
    for d in ("images", "blobs"):  # the base image (hard links: it is 8 GiB sparse)
        shutil.copytree(paths.root / d, new.root / d, dirs_exist_ok=True, copy_function=os.link)
    shutil.rmtree(new.guest, ignore_errors=True)
    os.symlink(paths.guest, new.guest)
    mgr2 = VMManager(new)
    moved = restore(mgr2, "s3-vm", name="s3-moved")  # by tag: found in the bucket's listing
    try:
        fetched = {p.name for p in (new.store / "chunks").glob("*/*")}
        assert fetched and fetched <= indexed_chunks(s3_server, bucket, paths, snap, keys)
        with mgr2.client(moved) as c:
            assert c.exec(["cat", "/root/where.txt"]).stdout == b"from-the-bucket\n"
        assert _keeps_counting(mgr2, moved)
    finally:
        mgr2.remove(moved.id, force=True)


def indexed_chunks(s3_server, bucket: str, paths: Paths, snap: str, keys: set[str]) -> set[str]:
    """The chunks the snapshot's index locates in a pack the bucket holds."""
    from torpor.store.tiered import decode_index, pack_object

    body = s3_server.client().get_object(Bucket=bucket, Key=f"torpor/snapshots/{snap}.index")
    locs = decode_index(
        (paths.store / "key").read_bytes(), body["Body"].read(), snap_id=snap, source="test"
    )
    return {h for h, loc in locs.items() if f"torpor/{pack_object(loc.pack)}" in keys}
