"""``torpor import``: docker save (both layouts), OCI archive and directory, plain rootfs,
and what happens with truncated, corrupt or lying archives."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from imagetools import (
    busybox_config,
    busybox_rootfs_layer,
    compress,
    debugfs_cat,
    debugfs_ls,
    debugfs_stat,
    diff_id,
    dir_entry,
    file_entry,
    image_id,
    leftovers,
    make_config,
    make_layer,
    symlink_entry,
    write_docker_save,
    write_oci_archive,
    write_oci_layout,
    write_rootfs_tar,
)

from torpor.errors import (
    DigestMismatchError,
    ImageError,
    LayerError,
    NotFoundError,
    UsageError,
)
from torpor.image.store import ImageStore
from torpor.paths import Paths


def app_layer(text: bytes = b"v1") -> bytes:
    return make_layer([dir_entry("app"), file_entry("app/version", text, mode=0o644)])


def layers_and_config(**kwargs: object) -> tuple[list[bytes], dict]:
    layers = [busybox_rootfs_layer(), app_layer()]
    return layers, busybox_config(layers, **kwargs)  # type: ignore[arg-type]


def check_image(store: ImageStore, image, config: dict) -> None:  # type: ignore[no-untyped-def]
    assert image.id == image_id(config)
    assert image.layers == tuple(config["rootfs"]["diff_ids"])
    assert debugfs_cat(image.disk_path, "/app/version") == b"v1"
    assert debugfs_stat(image.disk_path, "/bin/busybox")["mode"] == 0o755
    assert store.get(image.id) == image
    st = os.stat(image.disk_path)
    assert st.st_mode & 0o777 == 0o400  # read-only and private


# ---------------------------------------------------------------------------
# docker save


@pytest.mark.parametrize("layout", ["legacy", "docker25"])
@pytest.mark.parametrize("compression", [None, "gzip"])
def test_docker_save(
    tmp_path: Path, store: ImageStore, paths: Paths, layout: str, compression: str | None
) -> None:
    layers, config = layers_and_config(cmd=["/bin/sh", "-c", "echo hi"])
    archive = tmp_path / "saved.tar"
    write_docker_save(
        archive,
        layers,
        config,
        ["tools:latest", "tools:v1"],
        layout=layout,
        compression=compression,
    )
    image = store.import_archive(archive)
    check_image(store, image, config)
    assert image.repo_tags == ("tools:latest", "tools:v1")
    assert image.config.cmd == ("/bin/sh", "-c", "echo hi")
    if layout == "docker25":
        assert image.manifest_digest is not None
        assert (paths.blobs / image.manifest_digest[7:]).exists()
    else:
        assert image.manifest_digest is None
    # Config and layers are kept in the blob store, by digest.
    assert (paths.blobs / image.id).exists()
    assert leftovers(paths) == [image.id]


def test_docker_save_legacy_repeated_layer_is_a_symlink(tmp_path: Path, store: ImageStore) -> None:
    base = busybox_rootfs_layer()
    same = make_layer([file_entry("marker", b"m")])
    layers = [base, same, make_layer([file_entry("marker2", b"2")]), same]
    config = busybox_config(layers)
    archive = tmp_path / "dup.tar"
    write_docker_save(archive, layers, config, ["dup:1"], layout="legacy")
    with tarfile.open(archive) as tf:
        assert any(m.issym() and m.name.endswith("layer.tar") for m in tf.getmembers())
    image = store.import_archive(archive)
    assert image.id == image_id(config)
    assert sorted(debugfs_ls(image.disk_path, "/"))[:3] == ["bin", "dev", "etc"]


def test_docker_save_wrong_diff_id(tmp_path: Path, store: ImageStore, paths: Paths) -> None:
    layers, config = layers_and_config()
    config["rootfs"]["diff_ids"][1] = diff_id(app_layer(b"other"))
    archive = tmp_path / "lying.tar"
    write_docker_save(archive, layers, config, ["lying:latest"])
    with pytest.raises(DigestMismatchError, match="diff_id"):
        store.import_archive(archive)
    assert leftovers(paths) == []


def test_docker_save_config_name_mismatch(tmp_path: Path, store: ImageStore, paths: Paths) -> None:
    layers, config = layers_and_config()
    archive = tmp_path / "s.tar"
    write_docker_save(archive, layers, config, ["x:latest"])
    # Rewrite the config member with different content under the same name.
    rewritten = tmp_path / "r.tar"
    with tarfile.open(archive) as src, tarfile.open(rewritten, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isreg() else None  # type: ignore[union-attr]
            if m.name.endswith(".json") and len(m.name) == 69:
                data = data.replace(b'"amd64"', b'"amd64" ')  # type: ignore[union-attr]
                m.size = len(data)
            dst.addfile(m, __import__("io").BytesIO(data) if data is not None else None)
    with pytest.raises(DigestMismatchError, match="config"):
        store.import_archive(rewritten)
    assert leftovers(paths) == []


def test_docker_save_multiple_images(tmp_path: Path, store: ImageStore) -> None:
    layers, config = layers_and_config()
    other_layers = [busybox_rootfs_layer()]
    other = busybox_config(other_layers, cmd=["other"])
    # Two images in one manifest.json (docker save a b).
    a = tmp_path / "a.tar"
    b = tmp_path / "b.tar"
    write_docker_save(a, layers, config, ["first:1"], layout="docker25")
    write_docker_save(b, other_layers, other, ["second:1"], layout="docker25")
    merged = tmp_path / "both.tar"
    manifests = []
    with tarfile.open(merged, "w") as out:
        seen = set()
        for part in (a, b):
            with tarfile.open(part) as tf:
                for m in tf.getmembers():
                    data = tf.extractfile(m).read() if m.isreg() else None  # type: ignore[union-attr]
                    if m.name == "manifest.json":
                        manifests += json.loads(data)  # type: ignore[arg-type]
                        continue
                    if m.name in seen or m.name in ("index.json", "repositories"):
                        continue
                    seen.add(m.name)
                    out.addfile(m, __import__("io").BytesIO(data) if data is not None else None)
        body = json.dumps(manifests).encode()
        ti = tarfile.TarInfo("manifest.json")
        ti.size = len(body)
        out.addfile(ti, __import__("io").BytesIO(body))
    with pytest.raises(UsageError, match="first:1, second:1"):
        store.import_archive(merged)
    with pytest.raises(NotFoundError):
        store.import_archive(merged, "third:1")
    image = store.import_archive(merged, "second:1")
    assert image.id == image_id(other)
    assert image.config.cmd == ("other",)
    assert image.repo_tags == ("second:1",)


# ---------------------------------------------------------------------------
# OCI


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_oci_archive(
    tmp_path: Path, store: ImageStore, paths: Paths, compression: str | None
) -> None:
    layers, config = layers_and_config(entrypoint=["/bin/echo"], cmd=["hello"])
    archive = tmp_path / "oci.tar"
    manifest_digest = write_oci_archive(archive, layers, config, "v1", compression=compression)
    image = store.import_archive(archive, "localhost:5000/tools:v1")
    check_image(store, image, config)
    assert image.manifest_digest == manifest_digest
    assert image.repo_tags == ("localhost:5000/tools:v1",)
    assert image.config.entrypoint == ("/bin/echo",)
    assert leftovers(paths) == [image.id]


def test_oci_archive_without_name_is_untagged(tmp_path: Path, store: ImageStore) -> None:
    layers, config = layers_and_config()
    archive = tmp_path / "oci.tar"
    write_oci_archive(archive, layers, config, "latest")
    image = store.import_archive(archive)
    assert image.repo_tags == ()
    assert store.get(image.id[:8]) == image


def test_oci_layout_directory(tmp_path: Path, store: ImageStore) -> None:
    layers = [busybox_rootfs_layer("zstd"), compress(make_layer([], None), None), app_layer()]
    config = busybox_config(layers)
    layout = tmp_path / "layout"
    write_oci_layout(layout, layers, config, "latest")
    image = store.import_archive(layout, "dir:latest")
    check_image(store, image, config)
    # The layout directory is only read.
    assert (layout / "index.json").exists()


def test_oci_layout_picks_by_ref_name(tmp_path: Path, store: ImageStore) -> None:
    layers, config = layers_and_config()
    other_layers = [busybox_rootfs_layer()]
    other = busybox_config(other_layers, cmd=["other"])
    layout = tmp_path / "layout"
    write_oci_layout(layout, layers, config, "one", extra=[(other_layers, other, "two")])
    with pytest.raises(UsageError, match="one, two"):
        store.import_archive(layout)
    assert store.import_archive(layout, "x:two").id == image_id(other)
    assert store.import_archive(layout, "x:one").id == image_id(config)
    with pytest.raises(NotFoundError):
        store.import_archive(layout, "x:three")


def test_oci_wrong_blob_digest(tmp_path: Path, store: ImageStore, paths: Paths) -> None:
    layers, config = layers_and_config()
    layout = tmp_path / "layout"
    write_oci_layout(layout, layers, config, "latest")
    blob = layout / "blobs" / "sha256" / diff_id(layers[1])[7:]
    # layers[1] is gzip: its blob is named by the compressed digest, find it.
    blob = next(p for p in (layout / "blobs/sha256").iterdir() if p.read_bytes() == layers[1])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError, match=blob.name):
        store.import_archive(layout, "bad:dir")
    archive = tmp_path / "bad.tar"
    shutil.make_archive(str(archive.with_suffix("")), "tar", layout)
    with pytest.raises(DigestMismatchError, match=blob.name):
        store.import_archive(archive, "bad:tar")
    assert leftovers(paths) == []
    assert store.list() == []


def test_wrong_architecture(tmp_path: Path, store: ImageStore, paths: Paths) -> None:
    layers = [busybox_rootfs_layer()]
    archive = tmp_path / "arm.tar"
    write_oci_archive(archive, layers, make_config(layers, architecture="arm64"), "latest")
    with pytest.raises(ImageError, match="linux/arm64"):
        store.import_archive(archive)
    assert leftovers(paths) == []


# ---------------------------------------------------------------------------
# plain rootfs tarballs


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_plain_rootfs(
    tmp_path: Path, store: ImageStore, paths: Paths, compression: str | None
) -> None:
    archive = tmp_path / "rootfs.tar.whatever"
    write_rootfs_tar(
        archive,
        [
            dir_entry("./bin"),
            file_entry("./bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
            symlink_entry("./bin/sh", "busybox"),
            dir_entry("./etc"),
            file_entry("./etc/hostname", b"plain\n"),
            dir_entry("./tmp", mode=0o1777),
        ],
        compression,
    )
    image = store.import_archive(archive, "plain:latest", cmd=["/bin/sh"])
    assert image.repo_tags == ("plain:latest",)
    assert image.config.cmd == ("/bin/sh",)
    assert image.config.env == ()
    assert (image.config.architecture, image.config.os) == ("amd64", "linux")
    assert len(image.layers) == 1
    assert image.layers[0] == diff_id(archive.read_bytes())
    assert debugfs_cat(image.disk_path, "/etc/hostname") == b"plain\n"
    assert debugfs_stat(image.disk_path, "/tmp")["mode"] == 0o1777
    assert leftovers(paths) == [image.id]


def test_plain_rootfs_untagged_and_empty_config(tmp_path: Path, store: ImageStore) -> None:
    archive = tmp_path / "r.tar"
    write_rootfs_tar(archive, [file_entry("hello", b"world")], "gzip")
    image = store.import_archive(archive)
    assert image.repo_tags == ()
    assert image.config.cmd is None and image.config.entrypoint is None


def test_missing_path(tmp_path: Path, store: ImageStore) -> None:
    with pytest.raises(NotFoundError):
        store.import_archive(tmp_path / "nope.tar")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ImageError, match="not an OCI image layout"):
        store.import_archive(tmp_path / "emptydir")


# ---------------------------------------------------------------------------
# damaged archives leave nothing behind


def _docker_save_bytes(tmp_path: Path, compression: str | None) -> bytes:
    layers, config = layers_and_config()
    archive = tmp_path / "src.tar"
    write_docker_save(archive, layers, config, ["t:1"], compression=compression)
    return archive.read_bytes()


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_truncated_archive(
    tmp_path: Path, store: ImageStore, paths: Paths, compression: str | None
) -> None:
    data = _docker_save_bytes(tmp_path, compression)
    for cut in (len(data) // 3, len(data) * 2 // 3, len(data) - 2000):
        broken = tmp_path / f"cut{cut}.tar"
        broken.write_bytes(data[:cut])
        with pytest.raises(ImageError, match=r"truncated|unexpected end|missing"):
            store.import_archive(broken)
        assert leftovers(paths) == []
        assert store.list() == []


def test_corrupt_gzip(tmp_path: Path, store: ImageStore, paths: Paths) -> None:
    data = bytearray(_docker_save_bytes(tmp_path, "gzip"))
    data[len(data) // 2] ^= 0xFF
    broken = tmp_path / "corrupt.tar.gz"
    broken.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt gzip"):
        store.import_archive(broken)
    assert leftovers(paths) == []


def test_corrupt_plain_rootfs(tmp_path: Path, store: ImageStore, paths: Paths) -> None:
    archive = tmp_path / "r.tar.gz"
    write_rootfs_tar(archive, [file_entry(f"f{i}", os.urandom(20000)) for i in range(20)], "gzip")
    data = bytearray(archive.read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises((ImageError, LayerError), match="gzip"):
        store.import_archive(archive)
    truncated = tmp_path / "t.tar"
    plain = make_layer([dir_entry("./"), file_entry("a", b"a" * 3000)], None)
    truncated.write_bytes(plain[: 512 * 2 + 3072])  # ends right after a's data: no end marker
    with pytest.raises(LayerError, match="truncated"):
        store.import_archive(truncated)
    assert leftovers(paths) == []
