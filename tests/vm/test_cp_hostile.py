"""``torpor cp`` out of a hostile guest (issue 9, defect 1): real VMs, real CLI.

The guest controls every name, type and byte of a copy out of it.  These tests
plant links and swap files for folders between and during copies, and check the
host never writes outside the destination and never follows a link it did not
create.  Run as root (CI does): the defect let a guest write any host file as root.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tests.conftest import VMs, torpor_cli

pytestmark = pytest.mark.vm


def _sh(vms: VMs, name: str, script: str) -> None:
    with vms.mgr.client(name) as c:
        r = c.exec(["sh", "-c", script], timeout=120)
    assert r.code == 0, (r.stdout, r.stderr)


@pytest.fixture(scope="module")
def hostile(paths, tools_image: str):
    f = VMs(paths)
    f.run(tools_image, "sleep", "infinity", name="cp-hostile")
    yield f
    f.cleanup()


def test_planted_temp_link_is_not_followed(hostile: VMs, tmp_path: Path) -> None:
    """The issue's example: ``.f7.torpor-cp`` -> a host file, then ``f7``."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"host secret\n")
    dest = tmp_path / "dest"
    dest.mkdir()
    # First copy: the guest folder holds only the link, which lands in dest/o2.
    _sh(
        hostile,
        "cp-hostile",
        f"rm -rf /srv/o2; mkdir -p /srv/o2; ln -s {victim} /srv/o2/.f7.torpor-cp",
    )
    r = torpor_cli("cp", "cp-hostile:/srv/o2", f"{dest}/")
    assert r.returncode == 0, r.stderr
    # Second copy: now with f7, whose temp file name the planted link holds.
    _sh(hostile, "cp-hostile", "printf 'guest bytes\\n' > /srv/o2/f7")
    r = torpor_cli("cp", "cp-hostile:/srv/o2", f"{dest}/")
    assert victim.read_bytes() == b"host secret\n"
    assert r.returncode == 0, r.stderr
    assert (dest / "o2" / "f7").read_bytes() == b"guest bytes\n"


def test_folder_swapped_for_link_between_copies(hostile: VMs, tmp_path: Path) -> None:
    """A link copied out first, then a folder of the same name: no write through it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    _sh(hostile, "cp-hostile", f"rm -rf /srv/s; mkdir -p /srv/s; ln -s {outside} /srv/s/d")
    assert torpor_cli("cp", "cp-hostile:/srv/s", f"{dest}/").returncode == 0
    assert os.readlink(dest / "s" / "d") == str(outside)
    _sh(hostile, "cp-hostile", "rm /srv/s/d; mkdir /srv/s/d; echo x > /srv/s/d/evil")
    r = torpor_cli("cp", "cp-hostile:/srv/s", f"{dest}/")
    assert list(outside.iterdir()) == []
    assert r.returncode != 0
    assert b"Traceback" not in r.stderr
    assert b"not a folder" in r.stderr
    # The whole destination as a link planted earlier: copying "to" it replaces the link.
    _sh(hostile, "cp-hostile", "rm -rf /srv/s/d; echo y > /srv/s/f")
    r = torpor_cli("cp", "cp-hostile:/srv/s/f", str(dest / "s" / "d"))
    assert r.returncode == 0, r.stderr
    assert list(outside.iterdir()) == []
    assert (dest / "s" / "d").read_bytes() == b"y\n"


def test_copy_of_the_guest_root_stays_in_dest(hostile: VMs, tmp_path: Path) -> None:
    """``cp VM:/ dest/`` must land under dest (basename of "/" is not a host path)."""
    dest = tmp_path / "dest"
    dest.mkdir()
    _sh(hostile, "cp-hostile", "mkdir -p /srv/r; echo r > /srv/r/x")
    r = torpor_cli("cp", "cp-hostile:/srv/r/", f"{dest}/")
    assert r.returncode == 0, r.stderr
    assert (dest / "r" / "x").read_bytes() == b"r\n"


def test_special_files_and_setuid_bits(hostile: VMs, tmp_path: Path) -> None:
    """Device nodes are never created and setuid/setgid bits never kept from guest data."""
    dest = tmp_path / "dest"
    dest.mkdir()
    _sh(
        hostile,
        "cp-hostile",
        "rm -rf /srv/sp; mkdir -p /srv/sp; mknod /srv/sp/null c 1 3; mkfifo /srv/sp/fifo; "
        "echo s > /srv/sp/suid; chmod 6755 /srv/sp/suid",
    )
    r = torpor_cli("cp", "cp-hostile:/srv/sp", f"{dest}/")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (dest / "sp").iterdir()) == ["suid"]
    mode = os.lstat(dest / "sp" / "suid").st_mode
    assert stat.S_IMODE(mode) == 0o755


def test_byte_cap_and_devices(hostile: VMs, tmp_path: Path) -> None:
    """A guest cannot fill the host disk through cp; a device is refused, not created."""
    dest = tmp_path / "dest"
    dest.mkdir()
    _sh(
        hostile,
        "cp-hostile",
        "rm -rf /srv/z; mkdir -p /srv/z; dd if=/dev/zero of=/srv/z/big bs=1M count=5",
    )
    r = torpor_cli("cp", "cp-hostile:/srv/z", f"{dest}/", env={"TORPOR_CP_MAX_BYTES": "3000000"})
    assert r.returncode != 0
    assert b"TORPOR_CP_MAX_BYTES" in r.stderr and b"Traceback" not in r.stderr
    assert list((dest / "z").iterdir()) == []  # no partial file, no temp file left
    r = torpor_cli("cp", "cp-hostile:/dev/zero", str(dest / "zero"))
    assert r.returncode != 0 and b"Traceback" not in r.stderr
    assert not (dest / "zero").exists()


def test_entry_cap(hostile: VMs, tmp_path: Path) -> None:
    _sh(
        hostile,
        "cp-hostile",
        "rm -rf /srv/n; mkdir -p /srv/n; cd /srv/n; for i in 1 2 3 4 5 6; do echo $i > f$i; done",
    )
    r = torpor_cli(
        "cp", "cp-hostile:/srv/n", str(tmp_path / "n"), env={"TORPOR_CP_MAX_ENTRIES": "4"}
    )
    assert r.returncode != 0
    assert b"entries" in r.stderr and b"TORPOR_CP_MAX_ENTRIES" in r.stderr


def test_swaps_during_copies(hostile: VMs, tmp_path: Path) -> None:
    """A guest loop swaps a folder, a link to the host and a file while we copy."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep\n")
    _sh(
        hostile,
        "cp-hostile",
        "rm -rf /srv/w; mkdir -p /srv/w/a; echo 1 > /srv/w/a/f; "
        f"(while :; do rm -rf /srv/w/a; ln -s {outside} /srv/w/a; "
        "rm -f /srv/w/a; mkdir /srv/w/a; echo 2 > /srv/w/a/f; "
        f"rm -rf /srv/w/a; echo 3 > /srv/w/a; rm -f /srv/w/a; ln -s {outside}/keep /srv/w/a; "
        "rm -f /srv/w/a; mkdir /srv/w/a; ln -s /etc/passwd /srv/w/a/f; done) "
        "</dev/null >/dev/null 2>&1 &",
    )
    try:
        for i in range(12):
            dest = tmp_path / f"d{i}"
            dest.mkdir()
            r = torpor_cli("cp", "cp-hostile:/srv/w", f"{dest}/")
            assert b"Traceback" not in r.stderr
            r = torpor_cli("cp", "cp-hostile:/srv/w", f"{dest}/")  # again, over the first
            assert b"Traceback" not in r.stderr
            assert sorted(p.name for p in outside.iterdir()) == ["keep"]
            assert (outside / "keep").read_bytes() == b"keep\n"
            for root, dirs, files in os.walk(dest):
                for n in dirs + files:
                    p = Path(root) / n
                    st = os.lstat(p)
                    assert (
                        stat.S_ISDIR(st.st_mode)
                        or stat.S_ISREG(st.st_mode)
                        or stat.S_ISLNK(st.st_mode)
                    ), p
    finally:
        _sh(hostile, "cp-hostile", "kill $(pgrep -f 'while :') 2>/dev/null; true")


def test_cp_to_stdout_writes_a_tar(hostile: VMs, tmp_path: Path) -> None:
    """Docker's ``cp VM:path -``: a tar archive on stdout, not a file named ``-``."""
    _sh(
        hostile,
        "cp-hostile",
        "rm -rf /srv/t; mkdir -p /srv/t/sub; echo A > /srv/t/sub/a; ln -s sub/a /srv/t/l",
    )
    cwd_before = set(os.listdir("."))
    r = torpor_cli("cp", "cp-hostile:/srv/t", "-")
    assert r.returncode == 0, r.stderr
    assert set(os.listdir(".")) == cwd_before  # no file named "-"
    out = tmp_path / "t.tar"
    out.write_bytes(r.stdout)
    with tarfile.open(out) as tf:
        names = {m.name: m for m in tf.getmembers()}
        assert set(names) == {"t", "t/sub", "t/sub/a", "t/l"}
        assert names["t/l"].issym() and names["t/l"].linkname == "sub/a"
        f = tf.extractfile("t/sub/a")
        assert f is not None and f.read() == b"A\n"


def test_cp_from_stdin_reads_a_tar(hostile: VMs, tmp_path: Path) -> None:
    """``cp - VM:dir`` extracts a tar from stdin into the guest folder; escapes refused."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "b").write_bytes(b"B\n")
    os.symlink("sub/b", src / "lk")
    tar_path = tmp_path / "in.tar"
    with tarfile.open(tar_path, "w") as tf:
        tf.add(src, arcname="in")
    _sh(hostile, "cp-hostile", "rm -rf /srv/in_dest; mkdir -p /srv/in_dest")
    r = torpor_cli("cp", "-", "cp-hostile:/srv/in_dest", input=tar_path.read_bytes())
    assert r.returncode == 0, r.stderr
    with hostile.mgr.client("cp-hostile") as c:
        assert c.read_file("/srv/in_dest/in/sub/b") == b"B\n"
        assert c.stat("/srv/in_dest/in/lk").link_target == "sub/b"
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        info = tarfile.TarInfo("../../escape")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    r = torpor_cli("cp", "-", "cp-hostile:/srv/in_dest", input=bad.read_bytes())
    assert r.returncode != 0 and b"Traceback" not in r.stderr
