"""The files inside one VM's folder (``Paths.vm(id)``), named in one place.

One exception: guest RAM (``memory-backend-file``) and its snapshot shadow live on
tmpfs when the host has a writable ``/dev/shm``, in one folder per torpor home:
``/dev/shm/torpor-<uid>/<hash of the home>/<vm id>.ram`` (the folder's ``home`` file
names the home).  On a disk filesystem the kernel writes dirty guest pages back to
disk every 30 s — pointless I/O that also made every snapshot's flush and copy
slower.  The files are deleted when the VM ends (shim cleanup, ``rm``, or when a
dead VM is found), and :func:`reap_ram_dirs` deletes those whose VM or whole home
was deleted behind torpor's back (``rm -rf`` of a test home, say).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
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


def home_ram_dir(home: Path) -> Path | None:
    """This torpor home's folder under :func:`ram_root` (created on first use)."""
    root = ram_root()
    if root is None:
        return None
    key = hashlib.blake2b(str(home).encode(), digest_size=8).hexdigest()
    d = root / key
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        if not (d / "home").exists():
            tmp = d / f".home.{os.getpid()}"
            tmp.write_text(str(home))
            os.replace(tmp, d / "home")
    except OSError:
        return None
    return d


# a VM's files in its home's RAM folder: RAM, its I/O-error marker, its shadow and, for
# a VM whose RAM is private, its overlay (torpor.vmm.ramless), each with meta and lock
RAM_SUFFIXES = (".ram", ".ram.ioerror", ".shadow", ".shadow.json", ".shadow.lock")
RAM_SUFFIXES += (".overlay", ".overlay.json", ".overlay.lock")


def reap_ram_dirs() -> None:
    """Delete RAM files and shadows whose VM, or whole home, no longer exists."""
    root = ram_root()
    if root is None:
        return
    for d in root.iterdir():
        try:
            home = Path((d / "home").read_text())
        except (OSError, ValueError):
            continue  # not a home folder (or being created)
        if not (home / "vms").is_dir():
            shutil.rmtree(d, ignore_errors=True)
            continue
        for f in d.iterdir():
            vm_id = f.name.split(".", 1)[0]
            if f.name.endswith(RAM_SUFFIXES) and not (home / "vms" / vm_id).exists():
                if f.name.endswith(".ram"):
                    from torpor.vmm.lazymem import unmount

                    unmount(f)  # a lazy restore's FUSE mount left by a killed server
                with contextlib.suppress(OSError):
                    f.unlink()


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
        d = home_ram_dir(self.dir.parent.parent)
        return self.dir / "ram" if d is None else d / f"{self.dir.name}.ram"

    @property
    def shadow(self) -> Path:
        """Guest RAM exactly as of this VM's last capture (see torpor.vmm.capture)."""
        d = home_ram_dir(self.dir.parent.parent)
        return self.dir / "ram.shadow" if d is None else d / f"{self.dir.name}.shadow"

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
    def events_sock(self) -> Path:
        """The shim's own QMP monitor (events: BLOCK_IO_ERROR, RESUME)."""
        return self.dir / "events.sock"

    @property
    def io_error(self) -> Path:
        """Set by the shim while QEMU holds the guest paused on a host I/O error.

        Next to the RAM file (tmpfs when there is one), not in the VM folder: the
        VM folder's filesystem is typically the one that is full.
        """
        return self.ram.with_name(self.ram.name + ".ioerror")

    @property
    def agent_sock(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def console_sock(self) -> Path:
        """QEMU's serial console stream, read by the shim into the capped console.log."""
        return self.dir / "console.sock"

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
