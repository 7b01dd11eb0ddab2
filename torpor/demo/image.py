"""A small real image built offline from the host's static busybox.

No image can be downloaded here (only package registries are reachable), so the
demo and the tests make their own: a root filesystem tarball holding Debian's
``busybox-static`` binary, a symlink per applet, ``/etc/passwd`` and ``/etc/group``
with root and an unprivileged ``app`` user.  ``torpor import`` turns the tarball
into an image exactly as ``docker import`` would.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import time
from pathlib import Path

from torpor.errors import SetupError

BUSYBOX = Path("/bin/busybox")
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    try:
        out = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SetupError(
            f"{busybox} is missing or not busybox (apt: busybox-static)", step="build demo image"
        ) from e
    return [a for a in out.split() if a and a != "bin/busybox"]


def write_busybox_rootfs(out: Path, busybox: Path = BUSYBOX) -> Path:
    """Write a rootfs tarball (uncompressed) to ``out``; returns ``out``."""
    now = int(time.time())

    def add(
        tf: tarfile.TarFile,
        name: str,
        kind: bytes,
        mode: int,
        data: bytes = b"",
        link: str = "",
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = kind, mode, now, uid, gid
        ti.linkname = link
        ti.size = len(data) if kind == tarfile.REGTYPE else 0
        tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    applets = busybox_applets(busybox)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for d, mode in (
            ("bin", 0o755),
            ("sbin", 0o755),
            ("usr", 0o755),
            ("usr/bin", 0o755),
            ("usr/sbin", 0o755),
            ("etc", 0o755),
            ("root", 0o700),
            ("tmp", 0o1777),
            ("var", 0o755),
            ("var/tmp", 0o1777),
            ("home", 0o755),
            ("dev", 0o755),
            ("proc", 0o755),
            ("sys", 0o755),
            ("run", 0o755),
            ("srv", 0o755),
        ):
            add(tf, d, tarfile.DIRTYPE, mode)
        add(tf, "home/app", tarfile.DIRTYPE, 0o755, uid=1000, gid=1000)
        add(tf, "bin/busybox", tarfile.REGTYPE, 0o755, busybox.read_bytes())
        for a in applets:
            add(tf, a, tarfile.SYMTYPE, 0o777, link="/bin/busybox")
        add(tf, "etc/passwd", tarfile.REGTYPE, 0o644, PASSWD.encode())
        add(tf, "etc/group", tarfile.REGTYPE, 0o644, GROUP.encode())
        add(tf, "etc/hostname", tarfile.REGTYPE, 0o644, b"torpor\n")
        add(
            tf,
            "etc/os-release",
            tarfile.REGTYPE,
            0o644,
            b'NAME="torpor tools (busybox)"\nID=busybox\n',
        )
    tmp.replace(out)
    return out
