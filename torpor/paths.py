"""Every path torpor uses, derived from one root.

The root is ``$TORPOR_HOME``; without it ``/var/lib/torpor`` for root and
``~/.local/share/torpor`` for everyone else.  Pass a :class:`Paths` explicitly
(tests use ``tmp_path``); nothing else in torpor reads the environment for paths.

Privacy invariant: the root is mode 0700 and owned by its user (``ensure`` creates it
so, and tightens a root an older torpor made 0755); every folder torpor makes under it
is 0700 and every file 0600 (the CLI and the shim run with umask 077).  Everything
here holds guest data — RAM, disks, manifests carrying ``-e`` values, logs — so no
other local user may read any of it.

Layout::

    ROOT/
      blobs/sha256/<hex>        image manifests, configs and layers as pulled
      images/<id>/              one unpacked image: rootfs.ext4 (read-only), image.json
      images/refs.json          name:tag -> image id
      vms/<id>/                 one VM: vm.json, state.json, disk overlay, RAM file, logs
      vms/names/<name>          symlink -> ../<id>, created atomically: names are unique
      guest/                    guest kernel(s), initramfs and agent builds
      store/                    snapshots: content-addressed chunks + manifests (torpor.store)
      cache/                    things that can always be rebuilt (accelerator probe,
                                snapshots/<id>/ uncompressed artifacts for hot restore)
      tmp/                      staging for atomic renames (same filesystem as the rest)
      locks/                    advisory lock files
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path


def default_root() -> Path:
    env = os.environ.get("TORPOR_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if os.geteuid() == 0:
        return Path("/var/lib/torpor")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "torpor"


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def default(cls) -> Paths:
        return cls(default_root())

    @property
    def blobs(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def vms(self) -> Path:
        return self.root / "vms"

    @property
    def names(self) -> Path:
        return self.root / "vms" / "names"

    @property
    def guest(self) -> Path:
        return self.root / "guest"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def snapshot_cache(self) -> Path:
        return self.root / "cache" / "snapshots"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def vm(self, vm_id: str) -> Path:
        return self.vms / vm_id

    def ensure(self) -> Paths:
        """Create the layout (private: see the module docstring) and return ``self``."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.root.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            # a read-only home cannot be tightened; reading it must still work
            with contextlib.suppress(OSError):
                os.chmod(self.root, 0o700)
        for p in (
            self.blobs,
            self.images,
            self.vms,
            self.names,
            self.guest,
            self.cache,
            self.tmp,
            self.locks,
        ):
            p.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self
