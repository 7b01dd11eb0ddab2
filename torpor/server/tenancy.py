"""Namespaces: one torpor home per tenant.

``default`` is the server's home itself (what the local CLI sees); any other
namespace ``ns`` is ``HOME/namespaces/ns``, a complete home of its own whose
``guest`` folder (kernels, initramfs, agent: host assets, not tenant data) is a link
torpor creates to the server home's, and whose ``namespace`` file names it, so a
context log on a PostgreSQL database shared by the server keeps the namespace's
sessions in a schema of their own (torpor.context.dsn).  Names are DNS-label-like,
so they are safe as path components and in URLs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torpor.context.dsn import NAMESPACE_FILE
from torpor.errors import UsageError
from torpor.fsutil import atomic_write_bytes
from torpor.paths import Paths

DEFAULT = "default"
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def check_namespace(ns: str) -> str:
    if not _NAME.match(ns) or ns == "namespaces":
        raise UsageError(
            f"bad namespace {ns!r}: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return ns


def namespace_paths(home: Paths, ns: str) -> Paths:
    """The home of namespace ``ns`` under the server's ``home``, created on first use."""
    if check_namespace(ns) == DEFAULT:
        return home
    paths = Paths(home.root / "namespaces" / ns)
    if not paths.root.is_dir():
        (home.root / "namespaces").mkdir(mode=0o700, exist_ok=True)
        paths.root.mkdir(mode=0o700, exist_ok=True)
    marker = paths.root / NAMESPACE_FILE  # a PostgreSQL log keeps it in a schema of its own
    if not marker.exists():
        atomic_write_bytes(marker, ns.encode())
    link = paths.guest
    if not link.is_symlink() and not link.exists():
        home.guest.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = link.with_name(f".guest.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.symlink(Path(os.path.relpath(home.guest, paths.root)), tmp)
        os.replace(tmp, link)
    return paths.ensure()


def namespaces(home: Paths) -> list[str]:
    """Every namespace that has a home (``default`` always)."""
    root = home.root / "namespaces"
    found = sorted(p.name for p in root.iterdir() if _NAME.match(p.name)) if root.is_dir() else []
    return [DEFAULT, *(n for n in found if n != DEFAULT)]
