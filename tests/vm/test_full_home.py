"""A full filesystem under the VM folders: `run` fails with a clear error naming the
folder it could not write (not the home's root, not a traceback), and leaves nothing
behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import torpor_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


@pytest.fixture
def full_home(paths, tools_image: str, tmp_path: Path) -> Iterator[Path]:
    """A home sharing the session's kernel and image, whose vms/ folder is full."""
    home = tmp_path / "home"
    (home / "guest").mkdir(parents=True)
    # hard links, not copies: copying the image's disk took ~40 s of the suite; torpor
    # replaces files atomically (rename), so the shared inodes are never written
    for src, dst in (
        (paths.guest / "kernels", home / "guest" / "kernels"),
        (paths.images, home / "images"),
    ):
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    vms = home / "vms"
    vms.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(vms)], check=True)
    try:
        (vms / "names").mkdir()
        with open(vms / "fill", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        yield home
    finally:
        subprocess.run(["umount", "-l", str(vms)], check=False)


def test_run_on_a_full_disk_names_the_vm_folder(full_home: Path) -> None:
    env = {"TORPOR_HOME": str(full_home)}
    r = torpor_cli("images", env=env)
    assert b"tools" in r.stdout, (r.stdout, r.stderr)
    r = torpor_cli("run", "--rm", "tools:latest", "true", env=env)
    assert r.returncode == 125, (r.stdout, r.stderr)
    assert b"Traceback" not in r.stderr
    assert b"No space left on device" in r.stderr
    assert str(full_home / "vms").encode() + b"/" in r.stderr, r.stderr  # the VM folder
    left = [p.name for p in (full_home / "vms").iterdir()]
    assert sorted(left) == ["fill", "names"] and not os.listdir(full_home / "vms" / "names")
