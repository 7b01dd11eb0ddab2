"""Build an image's read-only base disk: an ext4 filesystem in a sparse file.

Role: turn an unpacked root filesystem directory into ``rootfs.ext4`` with
``mkfs.ext4 -d`` (no loop mounts, no root needed for the build itself), check
it with ``e2fsck -fn`` and make the file read-only.

Invariants and decisions:

* The file is sparse: its *virtual* size (default 8 GiB, configurable, grown
  in 256 MiB steps when the content needs more) is what the guest sees; only
  the blocks mkfs writes take host space.  VMs never write this file: each VM
  gets a copy-on-write overlay (qcow2 with this file as backing), and the
  guest's free space in this filesystem is where its writes go.
* The journal is kept.  The guest mounts this filesystem read-write through
  its overlay, and VMs are killed, snapshotted and forked mid-write; without a
  journal every such VM would need a full fsck to boot again.  The journal is
  created with ``lazy_journal_init`` and inode tables are not zeroed: mkfs
  punches holes in the fresh file first, so unwritten blocks already read as
  zero and the groups are flagged ``ITABLE_ZEROED`` (the guest kernel does not
  zero them later, which would bloat every overlay).
* ``-N`` leaves room for files the guest creates: at least mkfs's own default
  for the size (one inode per 16 KiB) and twice what the image holds.
* ``-m 0``: no blocks reserved for root; the guest is single-tenant.
* ``-E root_owner=0:0``: ``/`` belongs to root whoever built it.
* ``mkfs.ext4 -d`` (e2fsprogs 1.47) copies regular files (holes kept),
  directories, symlinks, hard links (by inode number), device nodes, FIFOs,
  ownership, modes incl. setuid/sticky, and xattrs; it stores whole-second
  timestamps and skips sockets.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from torpor.errors import ImageError, SetupError

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_DISK_SIZE = 8 * GiB
LABEL = "torpor-root"
BLOCK_SIZE = 4096
INODE_RATIO = 16384
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


@dataclass(frozen=True)
class TreeStats:
    """A root filesystem's size: entries (inodes), apparent and allocated bytes."""

    entries: int
    apparent_bytes: int
    allocated_bytes: int


@dataclass(frozen=True)
class DiskInfo:
    path: Path
    virtual_size: int
    inodes: int


def find_tool(name: str) -> str:
    """Absolute path of an e2fsprogs tool; SetupError if it is not installed."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    raise SetupError(f"{name} not found: install e2fsprogs (1.43 or newer, for mkfs.ext4 -d)")


def scan_tree(root: Path) -> TreeStats:
    """Walk ``root`` without following symlinks; hard-linked inodes count once."""
    entries = 0
    apparent = 0
    allocated = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                entries += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
                    allocated += st.st_blocks * 512
                    continue
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                apparent += st.st_size
                allocated += st.st_blocks * 512
    return TreeStats(entries=entries, apparent_bytes=apparent, allocated_bytes=allocated)


def plan_size(stats: TreeStats, requested: int) -> int:
    """Virtual size: ``requested``, or more (in 256 MiB steps) if the content needs it."""
    # Data plus 15%, a block per entry (small files, directories), inode tables
    # and a floor for the journal and group metadata, so that mkfs succeeds and
    # the guest is left some room to write.
    needed = int(stats.allocated_bytes * 1.15) + stats.entries * BLOCK_SIZE + 128 * MiB
    needed += (needed // INODE_RATIO) * 256
    if needed <= requested:
        return requested
    step = 256 * MiB
    return -(-needed // step) * step


def build_ext4(
    rootfs: Path,
    out: Path,
    *,
    size: int = DEFAULT_DISK_SIZE,
    stats: TreeStats | None = None,
    label: str = LABEL,
) -> DiskInfo:
    """Create ``out`` (must not exist) holding ``rootfs``; verify it; chmod it 0400.

    Raises ImageError if mkfs.ext4 or e2fsck fails (the partial file is removed),
    SetupError if e2fsprogs is missing.
    """
    if size % BLOCK_SIZE:
        raise ImageError(f"disk size {size} is not a multiple of {BLOCK_SIZE}")
    mkfs = find_tool("mkfs.ext4")
    fsck = find_tool("e2fsck")
    stats = stats or scan_tree(rootfs)
    size = plan_size(stats, size)
    inodes = max(size // INODE_RATIO, stats.entries * 2 + 1024)
    cmd = [
        mkfs, "-q", "-F", "-t", "ext4",
        "-d", str(rootfs),
        "-L", label,
        "-b", str(BLOCK_SIZE),
        "-m", "0",
        "-N", str(inodes),
        "-E", "root_owner=0:0,lazy_journal_init=1,discard",
        str(out), f"{size // 1024}k",
    ]  # fmt: skip
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    try:
        _run(cmd, step="build disk", what=f"mkfs.ext4 -d {rootfs}")
        _run([fsck, "-f", "-n", str(out)], step="check disk", what=f"e2fsck -fn {out}")
        os.chmod(out, 0o400)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        raise
    return DiskInfo(path=out, virtual_size=size, inodes=inodes)


def _run(cmd: list[str], *, step: str, what: str) -> None:
    env = {**os.environ, "LC_ALL": "C"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
    except OSError as e:
        raise ImageError(f"{what}: cannot run {cmd[0]}: {e}", step=step) from e
    if proc.returncode != 0:
        output = (proc.stderr + proc.stdout).strip().splitlines()
        tail = "\n".join(output[-15:]) or "(no output)"
        raise ImageError(f"{what} failed (exit {proc.returncode}):\n{tail}", step=step)
