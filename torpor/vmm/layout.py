"""The files inside one VM's folder (``Paths.vm(id)``), named in one place.

One exception: guest RAM (``memory-backend-file``) lives on tmpfs when the host has
a writable ``/dev/shm``: ``/dev/shm/torpor-<uid>/<vm id>.ram``.  On a disk
filesystem the kernel writes dirty guest pages back to disk every 30 s — pointless
I/O that also made every snapshot's flush and copy slower.  The file is deleted
when the VM ends (shim cleanup, ``rm``, or when a dead VM is found).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

SHM = Path("/dev/shm")


@functools.cache
def ram_root() -> Path | None:
    """The tmpfs folder for guest RAM files, or None (then RAM stays in the VM folder)."""
    if os.environ.get("TORPOR_RAM_ON_DISK"):
        return None
    try:
        if os.statvfs(SHM).f_bsize <= 0 or not os.access(SHM, os.W_OK):
            return None
        d = SHM / f"torpor-{os.getuid()}"
        d.mkdir(mode=0o700, exist_ok=True)
        st = d.lstat()
        if st.st_uid != os.getuid() or st.st_mode & 0o077 or not d.is_dir():
            return None  # someone else's folder, or too open: do not put guest RAM there
    except OSError:
        return None
    return d


@dataclass(frozen=True)
class VMFiles:
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "vm.json"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def ram(self) -> Path:
        root = ram_root()
        return self.dir / "ram" if root is None else root / f"{self.dir.name}.ram"

    @property
    def shadow(self) -> Path:
        """Guest RAM exactly as of this VM's last capture (see torpor.vmm.capture)."""
        root = ram_root()
        return self.dir / "ram.shadow" if root is None else root / f"{self.dir.name}.shadow"

    @property
    def shadow_meta(self) -> Path:
        """JSON: which committed snapshot the shadow equals ({"snapshot": id|null, ...})."""
        return self.shadow.with_name(self.shadow.name + ".json")

    @property
    def shadow_lock(self) -> Path:
        """flock: a capture updates the shadow exclusively; restores copy it shared."""
        return self.shadow.with_name(self.shadow.name + ".lock")

    @property
    def ctl_sock(self) -> Path:
        return self.dir / "ctl.sock"

    @property
    def qmp_sock(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def agent_sock(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def shim_log(self) -> Path:
        return self.dir / "shim.log"

    @property
    def main_log(self) -> Path:
        return self.dir / "main.log"
