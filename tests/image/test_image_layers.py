"""Layer application: every entry type, whiteouts, opaque dirs, and the refusals.

Most tests apply layers into a plain directory and look at it with lstat; one
builds a full image and reads the ext4 disk with debugfs.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from imagetools import (
    CAP_NET_RAW,
    busybox_config,
    busybox_rootfs_layer,
    debugfs_cat,
    debugfs_exists,
    debugfs_ls,
    debugfs_stat,
    device_entry,
    diff_id,
    dir_entry,
    fifo_entry,
    file_entry,
    hardlink_entry,
    leftovers,
    make_config,
    make_layer,
    opaque_entry,
    symlink_entry,
    whiteout_entry,
    write_oci_archive,
)

from torpor.errors import DigestMismatchError, ImageError, LayerError
from torpor.image.layers import RootfsBuilder
from torpor.image.store import ImageStore
from torpor.paths import Paths

# Root-only tests skip elsewhere; scripts/test and CI run as root, where a skip fails.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ownership, devices)")


def apply(root: Path, *layers: bytes, warn: list[str] | None = None, **kwargs: object) -> None:
    root.mkdir(exist_ok=True)
    with RootfsBuilder(root, warn=warn.append if warn is not None else None) as b:
        for i, layer in enumerate(layers):
            b.apply(io.BytesIO(layer), name=f"L{i}", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "rootfs"


# ---------------------------------------------------------------------------
# entry types and metadata


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_entry_types_and_metadata(root: Path, compression: str | None) -> None:
    layer = make_layer(
        [
            dir_entry("./", mode=0o755),
            dir_entry("bin", mode=0o755),
            file_entry(
                "bin/tool",
                b"#!/bin/sh\necho hi\n",
                mode=0o4755,
                uid=0,
                gid=0,
                xattrs={"security.capability": CAP_NET_RAW},
            ),
            file_entry("bin/sgid", b"x", mode=0o2711, uid=0, gid=50),
            hardlink_entry("bin/tool-link", "bin/tool"),
            symlink_entry("bin/abs", "/etc/passwd"),
            symlink_entry("bin/rel", "../etc/../bin/tool"),
            symlink_entry("bin/dangling", "no/such/file"),
            dir_entry("tmp", mode=0o1777),
            dir_entry("home/app", mode=0o750, uid=1000, gid=1000, xattrs={"user.note": b"hello"}),
            file_entry("home/app/f", b"data", mode=0o600, uid=1000, gid=1000, mtime=1234567890),
            device_entry("dev/null", 1, 3),
            device_entry("dev/loop0", 7, 0, block=True, mode=0o660),
            fifo_entry("run/fifo", mode=0o620),
            file_entry("etc/os-release", b"NAME=test\n"),
        ],
        compression,
    )
    apply(root, layer)

    st = os.lstat(root / "bin/tool")
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert (root / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.getxattr(root / "bin/tool", "security.capability") == CAP_NET_RAW
    assert st.st_nlink == 2
    assert os.lstat(root / "bin/tool-link").st_ino == st.st_ino
    assert stat.S_IMODE(os.lstat(root / "bin/sgid").st_mode) == 0o2711
    assert os.readlink(root / "bin/abs") == "/etc/passwd"
    assert os.readlink(root / "bin/rel") == "../etc/../bin/tool"
    assert os.readlink(root / "bin/dangling") == "no/such/file"
    assert stat.S_IMODE(os.lstat(root / "tmp").st_mode) == 0o1777
    home = os.lstat(root / "home/app")
    assert stat.S_IMODE(home.st_mode) == 0o750
    assert os.getxattr(root / "home/app", "user.note") == b"hello"
    f = os.lstat(root / "home/app/f")
    assert f.st_mtime == 1234567890
    assert home.st_mtime == 1700000000  # set after its children were written
    assert stat.S_ISFIFO(os.lstat(root / "run/fifo").st_mode)
    assert stat.S_IMODE(os.lstat(root / "run/fifo").st_mode) == 0o620


@needs_root
def test_ownership_and_devices_as_root(root: Path) -> None:
    warnings: list[str] = []
    layer = make_layer(
        [
            file_entry("bin/sgid", b"x", mode=0o2711, uid=0, gid=50),
            dir_entry("home/app", mode=0o750, uid=1000, gid=1000),
            file_entry("home/app/f", b"data", mode=0o600, uid=1000, gid=1000),
            device_entry("dev/null", 1, 3),
            device_entry("dev/loop0", 7, 0, block=True, mode=0o660),
        ]
    )
    apply(root, layer, warn=warnings)
    assert warnings == []
    assert (os.lstat(root / "home/app").st_uid, os.lstat(root / "home/app").st_gid) == (1000, 1000)
    f = os.lstat(root / "home/app/f")
    assert (f.st_uid, f.st_gid) == (1000, 1000)
    assert os.lstat(root / "bin/sgid").st_gid == 50
    null = os.lstat(root / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = os.lstat(root / "dev/loop0")
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 0)
    assert stat.S_IMODE(loop.st_mode) == 0o660


def test_sparse_file_written_with_holes(root: Path) -> None:
    data = bytes(8 << 20) + b"end"
    apply(root, make_layer([file_entry("big", data)]))
    st = os.lstat(root / "big")
    assert st.st_size == len(data)
    assert st.st_blocks * 512 < 1 << 20
    with open(root / "big", "rb") as fh:
        fh.seek(len(data) - 3)
        assert fh.read() == b"end"


def test_not_root_skips_ownership_and_devices_with_one_warning(root: Path) -> None:
    root.mkdir()
    warnings: list[str] = []
    with RootfsBuilder(root, warn=warnings.append) as b:
        b.privileged = False  # as a non-root user would be
        layer = make_layer(
            [
                file_entry("a", b"1", uid=1000, gid=1000),
                file_entry("b", b"2", uid=33, gid=33),
                device_entry("dev/null", 1, 3),
                device_entry("dev/zero", 1, 5),
                dir_entry("ro", mode=0o555),
                file_entry("ro/inside", b"x"),
            ]
        )
        b.apply(io.BytesIO(layer), name="L0")
    assert len(warnings) == 2, warnings
    assert any("ownership" in w for w in warnings)
    assert any("device" in w for w in warnings)
    assert not (root / "dev/null").exists()
    assert (root / "ro/inside").read_bytes() == b"x"


# ---------------------------------------------------------------------------
# layering


def test_whiteouts_and_type_changes(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("host file")
    lower = make_layer(
        [
            file_entry("a/x", b"x"),
            file_entry("a/y", b"y"),
            dir_entry("b"),
            file_entry("b/deep/file", b"f"),
            dir_entry("dir2file"),
            file_entry("dir2file/child", b"c"),
            file_entry("file2dir", b"f"),
            dir_entry("keep", mode=0o755),
            file_entry("keep/old", b"old"),
            symlink_entry("link2file", str(outside)),
            file_entry("shared", b"shared"),
        ]
    )
    upper = make_layer(
        [
            whiteout_entry("a/x"),
            whiteout_entry("b"),
            whiteout_entry("never/existed"),
            file_entry("dir2file", b"now a file"),
            dir_entry("file2dir", mode=0o700),
            file_entry("file2dir/child", b"c"),
            dir_entry("keep", mode=0o711),
            file_entry("keep/new", b"new"),
            file_entry("link2file", b"replaced, not written through"),
            hardlink_entry("shared-link", "shared"),
        ]
    )
    apply(root, lower, upper)
    assert sorted(os.listdir(root / "a")) == ["y"]
    assert not (root / "b").exists()
    assert (root / "dir2file").read_bytes() == b"now a file"
    assert (root / "file2dir/child").read_bytes() == b"c"
    assert stat.S_IMODE(os.lstat(root / "file2dir").st_mode) == 0o700
    assert sorted(os.listdir(root / "keep")) == ["new", "old"]
    assert stat.S_IMODE(os.lstat(root / "keep").st_mode) == 0o711
    assert not os.path.islink(root / "link2file")
    assert outside.read_text() == "host file"
    assert os.lstat(root / "shared-link").st_ino == os.lstat(root / "shared").st_ino
    assert not any(n.startswith(".wh.") for _, _, fs in os.walk(root) for n in fs)


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_directory_keeps_same_layer_entries(root: Path, marker_first: bool) -> None:
    lower = make_layer(
        [
            file_entry("d/old1", b"1"),
            file_entry("d/old2", b"2"),
            file_entry("d/sub/oldsub", b"3"),
            file_entry("d/sub2/x", b"4"),
            file_entry("other/stays", b"5"),
        ]
    )
    same_layer = [file_entry("d/new1", b"n1"), dir_entry("d/sub"), file_entry("d/sub/n", b"n")]
    entries = (
        [dir_entry("d"), opaque_entry("d"), *same_layer]
        if marker_first
        else [dir_entry("d"), *same_layer, opaque_entry("d"), file_entry("d/new2", b"n2")]
    )
    apply(root, lower, make_layer(entries))
    expected = ["new1", "sub"] if marker_first else ["new1", "new2", "sub"]
    assert sorted(os.listdir(root / "d")) == expected
    assert os.listdir(root / "d/sub") == ["n"]
    assert (root / "other/stays").exists()


def test_whiteout_does_not_hide_same_layer_entry(root: Path) -> None:
    apply(
        root,
        make_layer([file_entry("f", b"lower")]),
        make_layer([file_entry("f", b"upper"), whiteout_entry("f")]),
    )
    assert (root / "f").read_bytes() == b"upper"


def test_relative_symlink_inside_root_is_followed(root: Path) -> None:
    lower = make_layer(
        [dir_entry("usr/lib"), symlink_entry("lib", "usr/lib"), symlink_entry("usr/lib64", "./lib")]
    )
    upper = make_layer([file_entry("lib/libc.so", b"libc"), file_entry("usr/lib64/x", b"x")])
    apply(root, lower, upper)
    assert (root / "usr/lib/libc.so").read_bytes() == b"libc"
    assert (root / "usr/lib/x").read_bytes() == b"x"
    assert os.path.islink(root / "lib")


def test_hardlink_to_lower_layer(root: Path) -> None:
    apply(
        root,
        make_layer([file_entry("bin/a", b"a", mode=0o755)]),
        make_layer([hardlink_entry("bin/b", "bin/a"), hardlink_entry("bin/c", "./bin/a")]),
    )
    ino = os.lstat(root / "bin/a").st_ino
    assert os.lstat(root / "bin/b").st_ino == ino == os.lstat(root / "bin/c").st_ino


def test_diff_id_checked(root: Path) -> None:
    layer = make_layer([file_entry("a", b"a")])
    apply(root, layer, expected_diff_id=diff_id(layer))
    with pytest.raises(DigestMismatchError, match="diff"):
        apply(root, layer, expected_diff_id="sha256:" + "0" * 64)


def test_empty_layer(root: Path) -> None:
    apply(root, b"", expected_diff_id="sha256:" + __import__("hashlib").sha256(b"").hexdigest())
    apply(root, make_layer([], None))
    apply(root, make_layer([], "gzip"))
    assert os.listdir(root) == []


# ---------------------------------------------------------------------------
# refusals


def _refused(root: Path, layers: list[bytes], match: str) -> LayerError:
    with pytest.raises(LayerError, match=match) as exc:
        apply(root, *layers)
    return exc.value


def test_dotdot_entry_refused(root: Path, tmp_path: Path) -> None:
    err = _refused(root, [make_layer([file_entry("../escaped", b"x")])], "escapes the root")
    assert "L0" in str(err) and "../escaped" in str(err)
    assert not (tmp_path / "escaped").exists()
    _refused(root, [make_layer([file_entry("a/../../escaped2", b"x")])], "escapes")
    assert not (tmp_path / "escaped2").exists()


def test_leading_slash_and_inner_dotdot_stay_inside(root: Path) -> None:
    apply(root, make_layer([file_entry("/etc/abs", b"1"), file_entry("a/../b", b"2")]))
    assert (root / "etc/abs").read_bytes() == b"1"
    assert (root / "b").read_bytes() == b"2"


def test_absolute_symlink_escape_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    err = _refused(
        root,
        [make_layer([symlink_entry("evil", str(outside)), file_entry("evil/passwd", b"pwned")])],
        "absolute symlink escape",
    )
    assert "evil/passwd" in str(err)
    assert os.listdir(outside) == []
    # The classic form, across layers, aimed at the host's /etc.
    _refused(
        root,
        [
            make_layer([symlink_entry("etc2", "/etc")]),
            make_layer([file_entry("etc2/passwd", b"x")]),
        ],
        "absolute symlink escape",
    )


def test_relative_symlink_escape_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _refused(
        root,
        [
            make_layer(
                [
                    dir_entry("a/b"),
                    symlink_entry("a/b/up", "../../../outside"),
                    file_entry("a/b/up/x", b"pwned"),
                ]
            )
        ],
        "relative symlink escape",
    )
    assert os.listdir(outside) == []


def test_hardlink_escape_refused(root: Path) -> None:
    _refused(root, [make_layer([hardlink_entry("h", "../../../etc/passwd")])], "escapes the root")
    _refused(
        root,
        [make_layer([symlink_entry("e", "/etc"), hardlink_entry("h", "e/passwd")])],
        "absolute symlink escape",
    )
    _refused(root, [make_layer([hardlink_entry("h", "missing")])], "does not exist")


def test_symlink_loop_refused(root: Path) -> None:
    _refused(
        root,
        [make_layer([symlink_entry("a", "b"), symlink_entry("b", "a"), file_entry("a/x", b"x")])],
        "too many levels",
    )


def test_whiteout_through_absolute_symlink_refused(root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("keep me")
    _refused(
        root,
        [make_layer([symlink_entry("v", str(victim)), whiteout_entry("v/file")])],
        "absolute symlink escape",
    )
    assert (victim / "file").read_text() == "keep me"


def test_nul_in_name_refused(root: Path) -> None:
    ti, data = file_entry("placeholder", b"x")
    ti.pax_headers = {"path": "a\x00b"}
    _refused(root, [make_layer([(ti, data)])], "NUL")


def test_file_under_a_file_refused(root: Path) -> None:
    _refused(
        root, [make_layer([file_entry("f", b"1"), file_entry("f/g", b"2")])], "not a directory"
    )


def test_truncated_and_corrupt_layers(root: Path) -> None:
    plain = make_layer([file_entry("a", os.urandom(5000)), file_entry("b", b"b")], None)
    with pytest.raises(LayerError, match=r"truncated|unexpected end"):
        apply(root, plain[:3000])
    # Cut exactly at a member boundary: only the missing end-of-archive marker tells.
    after_a = 512 + 5120  # header + data padded to 512
    after_b = after_a + 512 + 512
    for cut in (after_a, after_b):
        with pytest.raises(LayerError, match="no end-of-archive marker"):
            apply(root, plain[:cut])
    # ... unless a digest vouches for the content (other tools accept such tars).
    apply(root, plain[:after_b], expected_diff_id=diff_id(plain[:after_b]))
    corrupt = bytearray(plain)
    corrupt[512 * 11 + 100] ^= 0xFF  # inside the second header
    with pytest.raises(LayerError, match="corrupt tar header"):
        apply(root, bytes(corrupt))
    gz = bytearray(make_layer([file_entry("a", os.urandom(5000))], "gzip"))
    gz[len(gz) // 2] ^= 0xFF
    with pytest.raises(LayerError, match="gzip"):
        apply(root, bytes(gz))
    with pytest.raises(LayerError, match="not a tar archive"):
        apply(root, b"this is not a tarball at all" * 40)


# ---------------------------------------------------------------------------
# end to end: layers -> ext4


def test_layers_in_ext4_image(tmp_path: Path, store: ImageStore, paths: Paths) -> None:
    base = busybox_rootfs_layer()
    features = make_layer(
        [
            file_entry(
                "usr/bin/ping",
                b"\x7fELF fake",
                mode=0o4755,
                xattrs={"security.capability": CAP_NET_RAW},
            ),
            hardlink_entry("usr/bin/ping6", "usr/bin/ping"),
            symlink_entry("usr/bin/sh-abs", "/bin/busybox"),
            device_entry("dev/null", 1, 3),
            device_entry("dev/sda", 8, 0, block=True, mode=0o660),
            fifo_entry("run/initctl", mode=0o600),
            dir_entry("srv/data", mode=0o2775, uid=1000, gid=1000),
            file_entry("srv/data/report", b"r", uid=1000, gid=1000, mode=0o640),
            file_entry("opt/app/a", b"a"),
            file_entry("opt/app/b", b"b"),
            file_entry("opt/gone/x", b"x"),
            file_entry("etc/motd", b"hello\n"),
        ],
        "zstd",
    )
    changes = make_layer(
        [
            whiteout_entry("etc/motd"),
            whiteout_entry("opt/gone"),
            dir_entry("opt/app"),
            file_entry("opt/app/c", b"c"),
            opaque_entry("opt/app"),
        ],
        None,
    )
    layers = [base, features, changes]
    archive = tmp_path / "img.tar"
    write_oci_archive(archive, layers, busybox_config(layers), "latest")
    image = store.import_archive(archive, "features:latest")
    disk = image.disk_path

    bb = debugfs_stat(disk, "/bin/busybox")
    assert (bb["type"], bb["mode"], bb["uid"], bb["gid"]) == ("regular", 0o755, 0, 0)
    assert debugfs_stat(disk, "/bin/sh")["symlink"] == "busybox"
    ping = debugfs_stat(disk, "/usr/bin/ping")
    assert ping["mode"] == 0o4755
    assert ping["links"] == 2
    assert debugfs_stat(disk, "/usr/bin/ping6")["inode"] == ping["inode"]
    assert "security.capability" in ping["xattrs"]
    assert debugfs_stat(disk, "/usr/bin/sh-abs")["symlink"] == "/bin/busybox"
    null = debugfs_stat(disk, "/dev/null")
    assert null["mode"] == 0o666
    assert debugfs_stat(disk, "/run/initctl")["type"] == "FIFO"
    data = debugfs_stat(disk, "/srv/data")
    assert (data["mode"], data["uid"], data["gid"]) == (0o2775, 1000, 1000)
    assert debugfs_stat(disk, "/tmp")["mode"] == 0o1777
    assert debugfs_stat(disk, "/home/app")["uid"] == 1000
    assert debugfs_stat(disk, "/root")["mode"] == 0o700
    assert sorted(debugfs_ls(disk, "/opt/app")) == ["c"]
    assert not debugfs_exists(disk, "/opt/gone")
    assert not debugfs_exists(disk, "/etc/motd")
    assert sorted(debugfs_ls(disk, "/etc")) == ["group", "hostname", "hosts", "passwd"]
    assert b"app:x:1000:1000" in debugfs_cat(disk, "/etc/passwd")
    assert debugfs_stat(disk, "/")["uid"] == 0
    assert image.size > 1_900_000
    assert leftovers(paths) == [image.id]


@needs_root
def test_devices_and_ownership_in_ext4_image_as_root(
    tmp_path: Path, store: ImageStore, paths: Paths
) -> None:
    base = busybox_rootfs_layer()
    devices = make_layer(
        [
            device_entry("dev/null", 1, 3),
            device_entry("dev/sda", 8, 0, block=True, mode=0o660),
            file_entry("srv/owned", b"o", uid=1000, gid=33),
        ],
        None,
    )
    layers = [base, devices]
    archive = tmp_path / "img.tar"
    write_oci_archive(archive, layers, busybox_config(layers), "latest")
    disk = store.import_archive(archive, "devices:latest").disk_path
    null = debugfs_stat(disk, "/dev/null")
    assert (null["type"], null["mode"]) == ("character special", 0o666)
    sda = debugfs_stat(disk, "/dev/sda")
    assert (sda["type"], sda["mode"]) == ("block special", 0o660)
    owned = debugfs_stat(disk, "/srv/owned")
    assert (owned["uid"], owned["gid"]) == (1000, 33)


MALICIOUS = {
    "dotdot": ([file_entry("../../../tmp/pwned", b"x")], "escapes the root"),
    "absolute-symlink": (
        [symlink_entry("evil", "/etc"), file_entry("evil/passwd", b"root::0:0")],
        "absolute symlink escape",
    ),
    "relative-symlink": (
        [symlink_entry("up", "../../../../../../etc"), file_entry("up/passwd", b"root::0:0")],
        "relative symlink escape",
    ),
    "hardlink": ([hardlink_entry("shadow", "../../../../etc/shadow")], "escapes the root"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_layer_leaves_nothing(
    tmp_path: Path, store: ImageStore, paths: Paths, case: str
) -> None:
    entries, match = MALICIOUS[case]
    layers = [busybox_rootfs_layer(), make_layer(entries)]
    archive = tmp_path / "evil.tar"
    write_oci_archive(archive, layers, make_config(layers), "latest")
    before = Path("/etc/passwd").read_bytes()
    with pytest.raises(LayerError, match=match) as exc:
        store.import_archive(archive, "evil:latest")
    assert "layer 2/2" in str(exc.value)
    assert repr(entries[-1][0].name) in str(exc.value)
    assert Path("/etc/passwd").read_bytes() == before
    assert not Path("/tmp/pwned").exists()
    assert leftovers(paths) == []
    assert store.list() == []


def test_tar_member_reading_is_streamed(root: Path) -> None:
    # Many entries: the stream-mode member list is cleared as we go.
    entries = [file_entry(f"d/f{i}", b"x") for i in range(3000)]
    apply(root, make_layer(entries))
    assert len(os.listdir(root / "d")) == 3000


def test_unsupported_entry_type(root: Path) -> None:
    ti = tarfile.TarInfo("weird")
    ti.type = tarfile.CONTTYPE  # contiguous file: treated as a regular file
    ti.size = 1
    apply(root, make_layer([(ti, b"z")]))
    assert (root / "weird").read_bytes() == b"z"
    ti2 = tarfile.TarInfo("vol")
    ti2.type = b"V"  # GNU volume header
    with pytest.raises((LayerError, ImageError)):
        apply(root, make_layer([(ti2, None)]))


def test_unsettable_xattr_is_a_warning(root: Path) -> None:
    warnings: list[str] = []
    layer = make_layer([file_entry("f", b"x", xattrs={"bogus.ns": b"1", "user.ok": b"2"})])
    apply(root, layer, warn=warnings)
    assert os.getxattr(root / "f", "user.ok") == b"2"
    assert len(warnings) == 1 and "bogus.ns" in warnings[0] and "'f'" in warnings[0]


def test_image_modes_do_not_depend_on_the_umask(
    tmp_path: Path, store: ImageStore
) -> None:
    """The CLI runs with umask 077 (a private home); an image's own folders must keep
    the modes a layer implies (0755 for parents a layer does not list, and the root),
    or a non-root image user cannot enter them (regression: /srv/app was 0700)."""
    layer = make_layer([file_entry("srv/app/run.sh", b"#!/bin/sh\n", mode=0o755)])
    tar = tmp_path / "rootfs.tar"
    tar.write_bytes(layer)
    old = os.umask(0o077)
    try:
        image = store.import_archive(tar, "umask:latest")
    finally:
        os.umask(old)
    for path in ("/", "/srv", "/srv/app"):
        assert debugfs_stat(image.disk_path, path)["mode"] == 0o755, path
    assert debugfs_stat(image.disk_path, "/srv/app/run.sh")["mode"] == 0o755
