"""Fuzz the image importer: the layer unpacker and the archive reader (issue 9).

Layers are built from hostile members: ``..`` and absolute names, a symlink and
then a file through it, hard links out of the root or to missing targets,
devices, FIFOs, unknown types, sizes that lie (huge, short, long), duplicate
names, whiteouts and opaque markers anywhere, setuid modes; applied one to three
at a time, or as raw/mutated bytes.  The properties: only ImageError (or a
subclass) escapes, and nothing outside the root folder changes.

Examples per test: ``TORPOR_FUZZ_EXAMPLES`` (see tests/fuzz/fuzzing.py).
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.fuzzing import fuzz
from tests.imagetools import busybox_config, compress, file_entry, make_layer, sha256
from torpor.errors import ImageError, LayerError, TorporError
from torpor.image.archive import read_archive
from torpor.image.blobs import BlobStore
from torpor.image.layers import RootfsBuilder

OUTSIDE = "__OUTSIDE__"  # replaced by the real outside folder's path

NAMES = st.one_of(
    st.sampled_from(
        [
            "a",
            "a/b",
            "a/b/c",
            "l",
            "l/f",
            "l/x/y",
            "la",
            "la/f",
            "d",
            "d/f",
            "dup",
            "dup/x",
            "../x",
            "../../x",
            "/abs",
            "/a/b",
            "a/../../e",
            "./a",
            "a/./b",
            "",
            ".",
            "./",
            "hl",
            "dev",
            ".wh.a",
            ".wh.l",
            "a/.wh.b",
            "a/.wh..wh..opq",
            ".wh..wh..opq",
            ".wh.",
            ".wh..",
            ".wh...",
            "d/.wh..wh..opq",
            "n" * 300,
            "a/" + "m" * 256,
        ]
    ),
    st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=8),
)
TARGETS = st.sampled_from(
    [
        "",
        "/",
        "..",
        "../..",
        "../outside",
        OUTSIDE,
        f"{OUTSIDE}/keep",
        "a",
        "l",
        "la",
        "a/b",
        "/etc/passwd",
        "d/../..",
        "../" * 10,
        "dup",
        "hl",
        "l/f",
        "/a",
    ]
)
TYPES = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.AREGTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.FIFOTYPE,
        tarfile.CONTTYPE,
        b"Z",
        b"7",
    ]
)
MODES = st.sampled_from([0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o7777, 0, 0o000])


@st.composite
def members(draw: st.DrawFn, outside: str) -> bytes:
    """One raw tar member: header plus data, where the data may not match the size."""
    ti = tarfile.TarInfo(draw(NAMES))
    ti.type = draw(TYPES)
    ti.mode = draw(MODES)
    ti.uid, ti.gid = draw(st.sampled_from([(0, 0), (1000, 1000), (2**21 - 1, 7)]))
    ti.mtime = draw(st.sampled_from([0, 1_700_000_000, 2**33]))
    ti.linkname = draw(TARGETS).replace(OUTSIDE, outside)
    ti.devmajor, ti.devminor = draw(st.sampled_from([(1, 3), (1, 5), (8, 0), (0, 0)]))
    data = draw(st.one_of(st.just(b""), st.binary(max_size=600), st.just(b"\0" * 140_000)))
    lie = draw(st.sampled_from(["exact", "exact", "exact", "short", "long", "huge"]))
    if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, b"7"):
        ti.size = {
            "exact": len(data),
            "short": len(data) + 700,
            "long": max(len(data) - 1, 0),
            "huge": 2**40,
        }[lie]
    else:
        ti.size, data = 0, b""
    if draw(st.booleans()):
        ti.pax_headers = {"SCHILY.xattr.user.fuzz": "v", "SCHILY.xattr.security.capability": "\x01"}
    try:
        header = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    except (ValueError, tarfile.HeaderError):
        return b""
    pad = -len(data) % tarfile.BLOCKSIZE
    return header + data + b"\0" * pad


@st.composite
def layers(draw: st.DrawFn, outside: str) -> bytes:
    body = b"".join(draw(st.lists(members(outside), max_size=10)))
    end = draw(st.sampled_from([b"\0" * 1024, b"\0" * 1024, b"", b"\0" * 512, b"junk" * 128]))
    return compress(body + end, draw(st.sampled_from([None, None, "gzip", "zstd"])))


def _snapshot(top: Path) -> dict[str, tuple[int, bytes | str | None]]:
    out: dict[str, tuple[int, bytes | str | None]] = {}
    for root, dirs, files in os.walk(top):
        for n in dirs + files:
            p = Path(root) / n
            st_ = os.lstat(p)
            body: bytes | str | None = None
            if stat.S_ISREG(st_.st_mode):
                body = p.read_bytes()
            elif stat.S_ISLNK(st_.st_mode):
                body = os.readlink(p)
            out[str(p.relative_to(top))] = (st_.st_mode, body)
    return out


class _Sandbox:
    """base/{rootfs, outside (one file, must never change), to-outside -> outside}."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.base = Path(self._tmp.name)
        self.root = self.base / "rootfs"
        self.root.mkdir()
        self.outside = self.base / "outside"
        self.outside.mkdir()
        (self.outside / "keep").write_bytes(b"keep\n")
        os.symlink(self.outside, self.base / "to-outside")
        self.before = _snapshot(self.outside)

    def check_and_close(self) -> None:
        try:
            assert _snapshot(self.outside) == self.before
            assert sorted(os.listdir(self.base)) == ["outside", "rootfs", "to-outside"]
        finally:
            self._tmp.cleanup()


def _apply_all(root: Path, blobs: list[bytes]) -> None:
    with RootfsBuilder(root, warn=lambda _m: None) as b:
        for i, blob in enumerate(blobs):
            try:
                b.apply(io.BytesIO(blob), name=f"L{i}")
            except ImageError:
                continue  # the next layer still goes on top of what was applied


@fuzz
@given(st.data())
def test_hostile_layers(data: st.DataObject) -> None:
    box = _Sandbox()
    try:
        blobs = data.draw(st.lists(layers(str(box.outside)), min_size=1, max_size=3))
        _apply_all(box.root, blobs)
    finally:
        box.check_and_close()


@fuzz
@given(st.data(), st.binary(max_size=2048))
def test_mutated_layers(data: st.DataObject, noise: bytes) -> None:
    """A valid layer with bytes overwritten, cut or appended: ImageError or applied."""
    box = _Sandbox()
    try:
        good = make_layer(
            [
                file_entry("a/f", b"hello" * 50),
                file_entry("a/g", b"x", mode=0o4755),
                file_entry(".wh.z"),
            ],
            compression=None,
        )
        buf = bytearray(good)
        for _ in range(data.draw(st.integers(1, 6))):
            at = data.draw(st.integers(0, len(buf) - 1))
            chunk = data.draw(st.binary(min_size=1, max_size=16))
            buf[at : at + len(chunk)] = chunk
        cut = data.draw(st.sampled_from([len(buf), len(buf) // 2, 512, 600]))
        blob = bytes(buf[:cut]) + (noise if data.draw(st.booleans()) else b"")
        blob = compress(blob, data.draw(st.sampled_from([None, "gzip", "zstd"])))
        _apply_all(box.root, [blob])
    finally:
        box.check_and_close()


# ---- archives (torpor import) ------------------------------------------------------------


ARCHIVE_NAMES = st.sampled_from(
    [
        "manifest.json",
        "index.json",
        "oci-layout",
        "repositories",
        "blobs/",
        "blobs/sha256/",
        "../manifest.json",
        "/manifest.json",
        "blobs/sha256/../../x",
        "blobs/sha256/zz",
        "a" * 64 + "/layer.tar",
        "a" * 64 + ".json",
        "a" * 64 + "/json",
        "blobs/sha256/" + "b" * 64,
    ]
)


@st.composite
def archives(draw: st.DrawFn, layer: bytes) -> bytes:
    cfg = json.dumps(busybox_config([layer])).encode()
    docs = st.sampled_from(
        [
            b"{}",
            b"[]",
            b"null",
            b"not json",
            b"\xff\xfe",
            b'[{"Config": "../../etc/passwd"}]',
            json.dumps(
                [{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["l/layer.tar"]}]
            ).encode(),
            json.dumps(
                [
                    {
                        "Config": "a" * 64 + ".json",
                        "RepoTags": ["x:1", 7],
                        "Layers": ["a" * 64 + "/layer.tar"] * 3,
                    }
                ]
            ).encode(),
            json.dumps(
                {
                    "schemaVersion": 2,
                    "manifests": [{"digest": "sha256:" + "b" * 64, "size": -1, "mediaType": "x"}],
                }
            ).encode(),
            json.dumps(
                {"schemaVersion": 2, "manifests": [{"digest": "sha256:../../x", "size": 5}]}
            ).encode(),
            cfg,
        ]
    )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for _ in range(draw(st.integers(0, 8))):
            ti = tarfile.TarInfo(draw(ARCHIVE_NAMES))
            kind = draw(st.sampled_from(["doc", "layer", "cfg", "sym", "hard", "dir"]))
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif kind in ("sym", "hard"):
                ti.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                ti.linkname = draw(
                    st.sampled_from(
                        ["manifest.json", "../x", "/etc/passwd", ti.name, "a" * 64 + "/layer.tar"]
                    )
                )
                tf.addfile(ti)
            else:
                body = {"doc": draw(docs), "layer": layer, "cfg": cfg}[kind]
                ti.size = len(body)
                tf.addfile(ti, io.BytesIO(body))
    raw = buf.getvalue()
    if draw(st.booleans()):  # damage it
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        raw = raw[:at] + draw(st.binary(max_size=64)) + raw[at + 64 :]
    return compress(raw, draw(st.sampled_from([None, "gzip", "zstd"])))


@fuzz
@given(st.data())
def test_hostile_archives(data: st.DataObject) -> None:
    """read_archive: a TorporError (ImageError, UsageError, ...) or an image whose
    blobs are all in the staging store; nothing written outside staging."""
    layer = make_layer([file_entry("f", b"F")], compression=None)
    box = _Sandbox()
    try:
        archive = box.root / "in.tar"
        archive.write_bytes(data.draw(archives(layer)))
        staging = box.root / "staging"
        staging.mkdir()
        try:
            image = read_archive(archive, BlobStore(staging))
        except TorporError:
            return
        for digest in image.keep:
            assert (staging / digest.removeprefix("sha256:")).exists() or sha256(b"") == digest
    finally:
        box.check_and_close()


# ---- caps (not fuzzed: a decompression bomb is one precise input) -------------------------


def test_decompression_bomb_stops_at_the_byte_cap(monkeypatch) -> None:
    """A small zstd layer that unpacks to 48 MiB of non-zero data stops at
    TORPOR_IMAGE_MAX_BYTES instead of filling the host disk."""
    monkeypatch.setenv("TORPOR_IMAGE_MAX_BYTES", str(16 << 20))
    bomb = make_layer([file_entry("big", b"a" * (48 << 20))], compression="zstd")
    assert len(bomb) < 1 << 20
    box = _Sandbox()
    try:
        with (
            RootfsBuilder(box.root) as b,
            pytest.raises(LayerError, match="TORPOR_IMAGE_MAX_BYTES"),
        ):
            b.apply(io.BytesIO(bomb), name="bomb")
        assert sum(p.stat().st_size for p in box.root.rglob("*") if p.is_file()) <= 17 << 20
    finally:
        box.check_and_close()


def test_entry_bomb_stops_at_the_entry_cap(monkeypatch) -> None:
    monkeypatch.setenv("TORPOR_IMAGE_MAX_ENTRIES", "100")
    layer = make_layer([file_entry(f"f{i}") for i in range(300)], compression="gzip")
    box = _Sandbox()
    try:
        with (
            RootfsBuilder(box.root) as b,
            pytest.raises(LayerError, match="TORPOR_IMAGE_MAX_ENTRIES"),
        ):
            b.apply(io.BytesIO(layer), name="many")
        assert len(list(box.root.iterdir())) <= 100
    finally:
        box.check_and_close()


@pytest.mark.timeout(60)  # before the fix, opening the FIFO blocked forever
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_oci_layout_blob_that_is_not_a_file(tmp_path: Path, kind: str) -> None:
    """An OCI layout folder (say, unpacked from a download) whose blob is a FIFO or a
    link to /dev/zero: a clear ImageError, no hang, no endless read."""
    from tests.imagetools import busybox_rootfs_layer, write_oci_layout

    layers = [busybox_rootfs_layer()]
    layout = tmp_path / "layout"
    write_oci_layout(layout, layers, busybox_config(layers), "latest")
    blob = next(p for p in (layout / "blobs/sha256").iterdir() if p.read_bytes() == layers[0])
    blob.unlink()
    if kind == "fifo":
        os.mkfifo(blob)
    else:
        os.symlink("/dev/zero", blob)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(ImageError, match="not a regular file"):
        read_archive(layout, BlobStore(staging))


def _huge_unread_member(name: str) -> bytes:
    """A tar whose member claims 2**40 bytes of data that is not there."""
    ti = tarfile.TarInfo(name)
    ti.size = 2**40
    return ti.tobuf(tarfile.PAX_FORMAT) + b"\0" * 1024


@pytest.mark.timeout(60)  # before the fix tarfile skipped 2**40 bytes 10 KiB at a time
def test_huge_size_of_an_unread_member_is_truncation() -> None:
    """Found by test_hostile_layers: a whiteout (whose data nobody reads) claiming a
    huge size made tarfile's stream skip spin ~10**8 times; now it is truncation."""
    box = _Sandbox()
    try:
        with RootfsBuilder(box.root) as b, pytest.raises(LayerError, match="truncated"):
            b.apply(io.BytesIO(_huge_unread_member(".wh.x")), name="huge")
    finally:
        box.check_and_close()


@pytest.mark.timeout(60)
def test_huge_size_of_an_unread_archive_member(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(_huge_unread_member("a" * 64 + "/VERSION"))
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(ImageError, match="truncated"):
        read_archive(archive, BlobStore(staging))
