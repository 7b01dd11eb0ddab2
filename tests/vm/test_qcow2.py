"""The host reads a hostile qcow2 header (QEMU, possibly taken over, writes it)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from torpor.errors import VMError
from torpor.vmm.qcow2 import qcow2_backing


def _overlay(tmp_path: Path) -> Path:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 65536)
    disk = tmp_path / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(disk)],
        check=True,
    )
    return disk


def test_reads_the_backing_name_qemu_img_wrote(tmp_path: Path) -> None:
    disk = _overlay(tmp_path)
    assert qcow2_backing(disk) == str(tmp_path / "base.raw")
    assert qcow2_backing(tmp_path / "base.raw") is None  # not qcow2


@pytest.mark.parametrize(
    ("size", "match"), [(1 << 31, "backing file"), (1000, "past its end")]
)
def test_a_hostile_header_is_refused_without_a_big_read(
    tmp_path: Path, size: int, match: str
) -> None:
    disk = _overlay(tmp_path)
    with open(disk, "r+b") as f:
        f.seek(8)
        f.write(struct.pack(">QI", disk.stat().st_size - 10, size))
    with pytest.raises(VMError, match=match):
        qcow2_backing(disk)
