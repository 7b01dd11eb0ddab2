"""Everything a host needs travels with the snapshot (issue 12 §2): a VM snapshotted
into the bucket on home A restores on homes that never had its base disk.

Homes stand for hosts: each has its own folder (own chunk cache, own images) and the
deployment's store key; they share the bucket and, except where a test gives one its
own, the guest kernel.  ``tools:latest`` built on another home has other bytes (mkfs
picks a new UUID and hash seed), so a restore there must use the stored base, not the
local build of "the same" image.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.snapshot.counter import COUNTER, count
from torpor.errors import ChunkCorruptError, GuestError, TorporError
from torpor.image.ext4 import build_ext4
from torpor.image.store import Image, ImageStore
from torpor.paths import Paths
from torpor.snapshot import base as bases
from torpor.snapshot import core, restore, snapshot
from torpor.store.store import load_key
from torpor.vmm.manager import VMManager
from torpor.vmm.qcow2 import qcow2_backing
from torpor.vmm.state import VMConfig

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture
def homes() -> Iterator[list[VMManager]]:
    """Homes a test made: at its end, every VM still in one is removed (a restore
    expected to fail that did not must not leave a QEMU behind)."""
    made: list[VMManager] = []
    yield made
    for mgr in made:
        for vm in mgr.list():
            with contextlib.suppress(TorporError):
                mgr.remove(vm.id, force=True)


def _home(tmp_path: Path, name: str, paths: Paths, own_guest: bool = False) -> VMManager:
    """A new home with the deployment's store key and no images."""
    new = Paths(tmp_path / name).ensure()
    new.store.mkdir(parents=True, exist_ok=True)
    load_key(paths.store)  # (made on first use)
    shutil.copy2(paths.store / "key", new.store / "key")  # one key per deployment
    shutil.rmtree(new.guest, ignore_errors=True)
    if own_guest:
        shutil.copytree(paths.guest / "kernels", new.guest / "kernels", symlinks=True)
    else:
        os.symlink(paths.guest, new.guest)
    return VMManager(new)


def _build_here(home: Paths, image: Image, src: Paths) -> Image:
    """``image`` as another host builds it: the same id and config (its image.json),
    its root filesystem (its one layer, a plain tarball) made into ext4 here by mkfs."""
    (layer,) = image.layers
    tar = src.root / "blobs" / "sha256" / layer.removeprefix("sha256:")
    tree = home.tmp / "rootfs"
    with tarfile.open(tar) as tf:
        tf.extractall(tree, filter="tar")
    d = home.images / image.id
    d.mkdir(parents=True)
    shutil.copy2(image.disk_path.parent / "image.json", d / "image.json")
    shutil.copy2(image.disk_path.parent.parent / "refs.json", home.images / "refs.json")
    build_ext4(tree, d / "rootfs.ext4")
    return ImageStore(home).get(image.id)


def _keeps_counting(mgr: VMManager, vm) -> bool:
    n = count(mgr, vm)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if count(mgr, vm) > n:
            return True
    return False


def _objects(s3_server, bucket: str) -> set[str]:
    s3 = s3_server.client()
    return {
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    }


def test_snapshot_restores_on_hosts_without_its_base(
    vms, tools_image, paths, tmp_path, s3_server, bucket, monkeypatch, homes
) -> None:
    for k, v in s3_server.env(bucket, "torpor").items():
        monkeypatch.setenv(k, v)
    s3 = s3_server.client()
    mgr = vms.mgr
    vm = vms.run(tools_image, *COUNTER, name="traveller")
    with mgr.client(vm) as c:
        c.exec(["sh", "-c", "echo travelled > /root/travel.txt"])
    # what the first snapshot of a VM on an image does first: the base into the bucket
    # (called alone here to know which objects hold it, whatever the bucket layout)
    before = _objects(s3_server, bucket)
    with core._store(mgr) as store:
        first = bases.ensure_stored(mgr, store, mgr.get(vm.id))
    assert first.uploaded_bytes > 0
    base_data = sorted(
        k
        for k in _objects(s3_server, bucket) - before
        if not k.endswith((".manifest", ".index")) and not k.endswith("FORMAT")
    )
    assert base_data
    res = snapshot(mgr, vm.id, tag="travel")
    meta = res.manifest.meta
    digest = VMConfig.from_json(json.loads(meta["vm"])).base_digest
    assert digest and meta["base_digest"] == digest
    base_id = meta["base_manifest"]
    assert base_id == first.manifest
    assert f"torpor/snapshots/{base_id}.manifest" in _objects(s3_server, bucket)
    # once per image: the next snapshot names the same base and uploads none of it
    res2 = snapshot(mgr, vm.id, tag="travel-2")
    assert res2.manifest.meta["base_manifest"] == base_id
    assert res2.timings["base_upload_bytes"] == 0

    with core._store(mgr) as store:
        base_m = store.get(base_id)
    assert bases.artifact_digest(base_m.artifacts["disk"]) == digest

    # host B: no image at all.  A tampered base chunk in the bucket is refused, and
    # nothing is left behind: no VM, no base
    mgr_b = _home(tmp_path, "host-b", paths)
    homes.append(mgr_b)
    good = {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in base_data}
    for k, body in good.items():
        s3.put_object(Bucket=bucket, Key=k, Body=body[:-8] + b"tampered")
    with pytest.raises(ChunkCorruptError):
        restore(mgr_b, "travel", name="b-bad")
    assert mgr_b.list() == []
    assert not (mgr_b.paths.images / bases.BASES / digest).exists()
    for k, body in good.items():
        s3.put_object(Bucket=bucket, Key=k, Body=body)

    # ...and with the bucket's base intact, B restores: the file and the process
    moved = restore(mgr_b, "travel", name="b-moved")
    try:
        disk = mgr_b.paths.images / bases.BASES / digest / "rootfs.ext4"
        assert qcow2_backing(moved.files.disk) == str(disk)
        assert moved.config.base_digest == digest
        with mgr_b.client(moved) as c:
            assert c.exec(["cat", "/root/travel.txt"]).stdout == b"travelled\n"
            assert c.exec(["/bin/busybox", "true"]).status.code == 0  # from the base
        assert _keeps_counting(mgr_b, moved)
        assert [i.id for i in mgr_b.images.list()] == []  # the base cache is hidden
        # hibernated there: its snapshot names the same stored base (nothing sent),
        # gc keeps the base a hibernated VM needs, and the wake finds it by digest
        hib = snapshot(mgr_b, moved.id, stop=True)
        assert hib.manifest.meta["base_manifest"] == base_id
        assert hib.timings["base_upload_bytes"] == 0
        core.gc(mgr_b, grace_seconds=0)
        assert disk.exists()
        woke = mgr_b.start(moved.id)
        assert qcow2_backing(woke.files.disk) == str(disk)
        with mgr_b.client(woke) as c:
            assert c.exec(["cat", "/root/travel.txt"]).stdout == b"travelled\n"
        assert _keeps_counting(mgr_b, woke)
    finally:
        mgr_b.remove(moved.id, force=True)
    # no VM of B needs the base any more: gc removes it, and what a materializer
    # killed mid-way left (its folder, its lock free)
    left = mgr_b.paths.images / bases.BASES / f".tmp-{digest}-4194999"
    (left / "rootfs.ext4").parent.mkdir()
    (left / "rootfs.ext4").write_bytes(b"partial")
    core.gc(mgr_b, grace_seconds=0)
    assert not disk.exists() and not left.exists()

    # host E: concurrent restores of one base: one materializes, the other waits for
    # it; neither ever sees a partial base (materialize only, no VM: no boot needed)
    mgr_e = _home(tmp_path, "host-e", paths)
    homes.append(mgr_e)
    with ThreadPoolExecutor(2) as ex, core._store(mgr_e) as store_e:
        got = list(
            ex.map(
                lambda _: bases.find_base(mgr_e, digest, base_m.meta["image_id"], store_e, base_id),
                range(2),
            )
        )
        assert got[0] == got[1] == mgr_e.paths.images / bases.BASES / digest / "rootfs.ext4"
        assert store_e.check_file(base_m.artifacts["disk"], got[0]) == []
    left = [p.name for p in (mgr_e.paths.images / bases.BASES).iterdir()]
    assert digest in left and not [n for n in left if n.startswith(".tmp")]
    assert got[0].stat().st_mode & 0o777 == 0o400  # read-only, like an image's disk

    # host C built tools:latest itself: same image id, other bytes.  It must use the
    # stored base, not its own build
    mgr_c = _home(tmp_path, "host-c", paths, own_guest=True)
    homes.append(mgr_c)
    own = _build_here(mgr_c.paths, ImageStore(paths).get(tools_image), paths)
    assert own.id == VMConfig.from_json(json.loads(meta["vm"])).image_id
    assert bases.disk_digest(mgr_c.paths, own.disk_path) != digest
    moved_c = restore(mgr_c, "travel", name="c-moved")
    try:
        disk_c = mgr_c.paths.images / bases.BASES / digest / "rootfs.ext4"
        assert qcow2_backing(moved_c.files.disk) == str(disk_c)
        with mgr_c.client(moved_c) as c:
            assert c.exec(["cat", "/root/travel.txt"]).stdout == b"travelled\n"
            assert c.exec(["/bin/busybox", "true"]).status.code == 0
        assert _keeps_counting(mgr_c, moved_c)
        # rmi of this host's own build leaves the stored base the VM runs on
        ImageStore(mgr_c.paths).remove("tools:latest", force=True)
        assert disk_c.exists()
        # C installs another kernel while the VM runs: a snapshot names the kernel the
        # VM booted (in its RAM), not the new one; its base is not uploaded again
        want = meta["kernel_digest"]
        old = bases.kernel_file(mgr_c.paths)
        newer = mgr_c.paths.guest / "kernels" / "99.0.0-other-cloud-amd64"
        shutil.copytree(old.parent, newer)
        with open(newer / old.name, "ab") as f:
            f.write(b"\0")  # another build of the kernel
        assert bases.kernel_file(mgr_c.paths) == newer / old.name
        have = bases.file_digest(mgr_c.paths, newer / old.name)
        assert have != want
        res_c = snapshot(mgr_c, moved_c.id, tag="travel-c")
        assert res_c.manifest.meta["kernel_digest"] == want
        assert res_c.manifest.meta["base_manifest"] == base_id
        assert res_c.timings["base_upload_bytes"] == 0
    finally:
        mgr_c.remove(moved_c.id, force=True)
    # ...and restoring it now, with the other kernel: a clear error naming both
    # digests, before anything is made or QEMU starts
    with pytest.raises(GuestError) as e:
        restore(mgr_c, "travel-c", name="c-again")
    assert want in str(e.value) and have in str(e.value)
    assert mgr_c.list() == []
