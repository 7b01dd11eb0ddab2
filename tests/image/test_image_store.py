"""ImageStore semantics: names and ids, tag/remove, persistence, atomicity, crash recovery."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from imagetools import (
    busybox_config,
    busybox_rootfs_layer,
    debugfs_stat,
    dir_entry,
    file_entry,
    image_id,
    leftovers,
    make_config,
    make_layer,
    write_oci_archive,
)

from torpor.errors import ConflictError, ImageError, NotFoundError, UsageError
from torpor.image import ImageStore
from torpor.image.ext4 import DEFAULT_DISK_SIZE
from torpor.paths import Paths

TESTS = Path(__file__).resolve().parent.parent


def tiny_archive(tmp_path: Path, label: str) -> tuple[Path, dict]:
    """A one-layer image that builds fast; ``label`` makes its id unique."""
    layers = [make_layer([dir_entry("etc"), file_entry("etc/label", label.encode())])]
    config = make_config(layers, labels={"label": label}, cmd=["/bin/true"])
    path = tmp_path / f"{label}.tar"
    write_oci_archive(path, layers, config, "latest", workdir=tmp_path / f"{label}.layout")
    return path, config


@pytest.fixture
def two(tmp_path: Path, store: ImageStore):  # type: ignore[no-untyped-def]
    a_path, _ = tiny_archive(tmp_path, "a")
    b_path, _ = tiny_archive(tmp_path, "b")
    a = store.import_archive(a_path, "tools:latest")
    b = store.import_archive(b_path, "localhost:5000/other:v1")
    return a, b


def test_get_by_every_name(two, store: ImageStore) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    for name in (
        "tools",
        "tools:latest",
        "docker.io/library/tools:latest",
        "library/tools:latest",
        a.id,
        f"sha256:{a.id}",
        a.id[:12],
        a.id[:4],
    ):
        assert store.get(name).id == a.id, name
    for name in ("localhost:5000/other:v1", b.id[:6]):
        assert store.get(name).id == b.id
    for missing in ("tools:v2", "localhost:5000/other", "nothing", "sha256:" + "f" * 64):
        with pytest.raises(NotFoundError):
            store.get(missing)
    with pytest.raises(NotFoundError):
        store.get(a.id[:3])  # shorter than 4 hex digits is a name, and there is no such name


def test_ambiguous_prefix(tmp_path: Path, store: ImageStore) -> None:
    # Find two labels whose image ids share the first 4 hex digits.
    seen: dict[str, str] = {}
    pair = None
    for i in range(20000):
        layers = [make_layer([dir_entry("etc"), file_entry("etc/label", f"p{i}".encode())])]
        prefix = image_id(make_config(layers, labels={"label": f"p{i}"}, cmd=["/bin/true"]))[:4]
        if prefix in seen:
            pair = (seen[prefix], f"p{i}")
            break
        seen[prefix] = f"p{i}"
    assert pair
    x = store.import_archive(tiny_archive(tmp_path, pair[0])[0])
    y = store.import_archive(tiny_archive(tmp_path, pair[1])[0])
    assert x.id[:4] == y.id[:4]
    with pytest.raises(ConflictError, match="ambiguous"):
        store.get(x.id[:4])
    with pytest.raises(ConflictError):
        store.remove(x.id[:4])
    common = next(i for i, (p, q) in enumerate(zip(x.id, y.id, strict=True)) if p != q)
    assert store.get(x.id[: common + 1]) == x


def test_list_and_image_fields(two, store: ImageStore, paths: Paths) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    images = store.list()
    assert {i.id for i in images} == {a.id, b.id}
    assert a.repo_tags == ("tools:latest",)
    assert a.disk_path == paths.images / a.id / "rootfs.ext4"
    assert a.created is not None and a.created.year == 2023
    assert a.size == len(b"a")
    assert a.short_id == a.id[:12] and a.digest == f"sha256:{a.id}"
    meta = json.loads((paths.images / a.id / "image.json").read_text())
    assert meta["schema_version"] == 1
    refs = json.loads((paths.images / "refs.json").read_text())
    assert refs["schema_version"] == 1
    assert refs["refs"]["docker.io/library/tools:latest"] == a.id
    assert refs["refs"]["localhost:5000/other:v1"] == b.id


def test_tag_and_move(two, store: ImageStore) -> None:  # type: ignore[no-untyped-def]
    a, _ = two
    a2 = store.tag(a, "tools:v1")
    assert a2.repo_tags == ("tools:latest", "tools:v1")
    assert store.tag(a.id[:8], "alias").repo_tags == ("alias:latest", "tools:latest", "tools:v1")
    # Moving a tag leaves the old image untagged but present.
    moved = store.tag("localhost:5000/other:v1", "tools:latest")
    assert "tools:latest" in moved.repo_tags
    assert store.get(a.id).repo_tags == ("alias:latest", "tools:v1")
    with pytest.raises(UsageError):
        store.tag(a, "tools@sha256:" + "a" * 64)
    with pytest.raises(UsageError):
        store.tag(a, "Bad Name")
    with pytest.raises(NotFoundError):
        store.tag("nope:latest", "x")


def test_remove_semantics(two, store: ImageStore, paths: Paths) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    store.tag(a, "tools:v1")
    assert store.remove("tools:latest") == ["Untagged: tools:latest"]
    assert (paths.images / a.id).exists()
    assert store.remove("tools:v1") == ["Untagged: tools:v1", f"Deleted: sha256:{a.id}"]
    assert not (paths.images / a.id).exists()
    with pytest.raises(NotFoundError):
        store.get(a.id)
    with pytest.raises(NotFoundError):
        store.remove("tools:latest")

    store.tag(b, "second:tag")
    with pytest.raises(ConflictError, match="several repositories"):
        store.remove(b.id)
    done = store.remove(b.id[:10], force=True)
    assert sorted(done[:-1]) == ["Untagged: localhost:5000/other:v1", "Untagged: second:tag"]
    assert done[-1] == f"Deleted: sha256:{b.id}"
    assert store.list() == []
    assert leftovers(paths) == []


def test_remove_in_use(two, store: ImageStore, paths: Paths) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    used = {a.id}
    with pytest.raises(ConflictError, match="used by a VM"):
        store.remove("tools:latest", in_use=used.__contains__)
    assert store.get("tools:latest") == a  # nothing changed
    # Untagging while another tag keeps the image is fine.
    store.tag(a, "tools:keep")
    store.remove("tools:latest", in_use=used.__contains__)
    guarded = ImageStore(paths, in_use=used.__contains__)
    with pytest.raises(ConflictError):
        guarded.remove(a.id)
    assert guarded.remove(a.id, force=True)[-1] == f"Deleted: sha256:{a.id}"
    assert guarded.remove("localhost:5000/other:v1")[-1] == f"Deleted: sha256:{b.id}"


def test_remove_by_id(tmp_path: Path, store: ImageStore) -> None:
    path, _ = tiny_archive(tmp_path, "untagged")
    image = store.import_archive(path)
    assert image.repo_tags == ()
    assert store.remove(image.id[:5]) == [f"Deleted: sha256:{image.id}"]
    # Several tags of one repository do not need force (as in Docker).
    image = store.import_archive(path, "one:1")
    store.tag(image, "one:2")
    assert store.remove(image.id) == [
        "Untagged: one:1",
        "Untagged: one:2",
        f"Deleted: sha256:{image.id}",
    ]


def test_import_twice_is_stored_once(
    tmp_path: Path, store: ImageStore, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, config = tiny_archive(tmp_path, "twice")
    first = store.import_archive(path, "twice:1")
    import torpor.image.store as store_module

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the image exists: nothing should be built")

    monkeypatch.setattr(store_module, "build_ext4", no_build)
    second = store.import_archive(path, "twice:2")
    assert second.id == first.id == image_id(config)
    assert second.repo_tags == ("twice:1", "twice:2")
    assert leftovers(paths) == [first.id]


def test_schema_version_checked(two, store: ImageStore, paths: Paths) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    meta_path = paths.images / a.id / "image.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "schema_version": 2}))
    with pytest.raises(ImageError, match="schema_version 2"):
        store.get(a.id)
    assert [i.id for i in store.list()] == [b.id]  # a skipped, with a warning
    meta_path.write_text(json.dumps(meta))
    refs_path = paths.images / "refs.json"
    refs = json.loads(refs_path.read_text())
    refs_path.write_text(json.dumps({**refs, "schema_version": 99}))
    with pytest.raises(ImageError, match="schema_version 99"):
        store.list()


def test_keyboard_interrupt_cleans_up(
    tmp_path: Path, store: ImageStore, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torpor.image.store as store_module

    seen: list[list[str]] = []

    def interrupted(*args: object, **kwargs: object) -> None:
        seen.append(leftovers(paths))
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "build_ext4", interrupted)
    path, _ = tiny_archive(tmp_path, "ctrlc")
    with pytest.raises(KeyboardInterrupt):
        store.import_archive(path, "ctrlc:latest")
    assert seen and seen[0] and seen[0][0].startswith("tmp/image-")
    assert leftovers(paths) == []
    assert store.list() == []


def test_stale_partial_blobs_removed(paths: Paths, store: ImageStore) -> None:
    stale = paths.blobs / ".partial-deadbeef"
    stale.write_bytes(b"half a layer")
    live = paths.blobs / ".partial-live"
    live.write_bytes(b"being written")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        store.list()
        assert not stale.exists()
        assert live.exists()
    finally:
        os.close(fd)
    store.list()
    assert not live.exists()


def test_kill_9_during_import(tmp_path: Path, paths: Paths) -> None:
    """A killed import leaves a staging dir; the next operation removes it."""
    layers = [busybox_rootfs_layer()]
    config = busybox_config(layers)
    archive = tmp_path / "kill.tar"
    write_oci_archive(archive, layers, config, "latest")
    marker = tmp_path / "building"
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        import torpor.image.store as s
        def slow(rootfs, out, **kw):
            Path({str(marker)!r}).write_text(str(rootfs))
            time.sleep(120)
        s.build_ext4 = slow
        s.ImageStore(s.Paths(Path({str(paths.root)!r}))).import_archive(
            {str(archive)!r}, "killed:latest")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=TESTS.parent)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the import finished or failed before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        staging = [p for p in paths.tmp.iterdir() if p.name.startswith("image-")]
        assert staging and (staging[0] / "rootfs/bin/busybox").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p.name for p in paths.tmp.iterdir()]  # the killed process left its staging dir

    store = ImageStore(paths)
    assert store.list() == []
    assert leftovers(paths) == []
    image = store.import_archive(archive, "killed:latest")
    assert image.id == image_id(config)
    assert leftovers(paths) == [image.id]


def test_default_disk_is_sparse_8g_with_journal(tmp_path: Path, paths: Paths) -> None:
    store = ImageStore(paths)
    path, _ = tiny_archive(tmp_path, "big")
    image = store.import_archive(path, "big:latest")
    st = os.stat(image.disk_path)
    assert st.st_size == DEFAULT_DISK_SIZE == 8 << 30
    assert st.st_blocks * 512 < 64 << 20, "the base disk should be sparse"
    assert st.st_mode & 0o777 == 0o400  # read-only and private
    header = subprocess.run(
        ["dumpe2fs", "-h", str(image.disk_path)], capture_output=True, text=True, check=True
    ).stdout
    assert "has_journal" in header
    assert "Filesystem volume name:   torpor-root" in header
    assert "Reserved block count:     0" in header
    inodes = int(
        next(line for line in header.splitlines() if line.startswith("Inode count:")).split()[-1]
    )
    assert inodes >= (8 << 30) // 16384
    fsck = subprocess.run(["e2fsck", "-fn", str(image.disk_path)], capture_output=True)
    assert fsck.returncode == 0


def test_disk_grows_for_large_content(tmp_path: Path, paths: Paths) -> None:
    store = ImageStore(paths, disk_size=32 << 20)
    chunk = os.urandom(1 << 20)
    layers = [make_layer([file_entry(f"data/{i}", chunk) for i in range(40)], None)]
    archive = tmp_path / "large.tar"
    write_oci_archive(archive, layers, make_config(layers), "latest")
    image = store.import_archive(archive)
    size = os.stat(image.disk_path).st_size
    assert size > 40 << 20 and size % (256 << 20) == 0
    assert image.size == 40 << 20
    assert debugfs_stat(image.disk_path, "/data/39")["size"] == 1 << 20


def test_concurrent_imports_store_once(tmp_path: Path, paths: Paths) -> None:
    import threading

    path, config = tiny_archive(tmp_path, "race")
    results: dict[str, object] = {}

    def run(tag: str) -> None:
        try:
            results[tag] = ImageStore(paths, disk_size=256 << 20).import_archive(path, tag)
        except BaseException as e:  # pragma: no cover - reported below
            results[tag] = e

    threads = [threading.Thread(target=run, args=(f"race:{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = {getattr(r, "id", r) for r in results.values()}
    assert ids == {image_id(config)}
    final = ImageStore(paths).get(image_id(config))
    assert final.repo_tags == ("race:0", "race:1", "race:2", "race:3")
    assert leftovers(paths) == [image_id(config)]
