"""This host's identity in a cluster sharing one context log.

A host is one torpor *home* (``TORPOR_HOME``): two homes on one machine are two
hosts (that is how the tests run several hosts on one machine), and two processes
on one home are one host.  Leases name the host, never a process.

Invariants:

- ``TORPOR_HOST_ID`` in the environment wins (checked: 1-128 of
  ``[a-zA-Z0-9_.:-]``, starting with a letter or digit; a bad one is a UsageError).
- Otherwise the id is made once, ``<hostname>-<8 hex>``, and kept in
  ``$TORPOR_HOME/host-id`` (0600, written atomically; when two processes race to
  make it, both end with the one that was written first: the file is created with
  ``O_EXCL`` semantics through a hard link of a fully written temp file).  It never
  changes afterwards, so a restarted process is the same host and finds its leases.
- A damaged ``host-id`` file is an error, not silently replaced: replacing it would
  make this home a new host and orphan its leases.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import tempfile

from torpor.context.model import HOST_RE, check_host
from torpor.errors import UsageError
from torpor.fsutil import fsync_dir
from torpor.paths import Paths

__all__ = ["ENV_HOST_ID", "HOST_FILE", "host_id"]

ENV_HOST_ID = "TORPOR_HOST_ID"
HOST_FILE = "host-id"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")


def host_id(paths: Paths) -> str:
    """This host's id: ``$TORPOR_HOST_ID``, else the home's ``host-id`` (made once)."""
    env = os.environ.get(ENV_HOST_ID)
    if env:
        try:
            return check_host(env)
        except UsageError as e:
            raise UsageError(f"{ENV_HOST_ID}: {e.message}") from None
    path = paths.root / HOST_FILE
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    made = _new_id()
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{HOST_FILE}.", suffix=".tmp", dir=paths.root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(made + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        with contextlib.suppress(FileExistsError):  # another process made it first: theirs
            os.link(tmp, path)
            fsync_dir(paths.root)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return _read(path)


def _read(path: os.PathLike[str]) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(256).strip()
    if not HOST_RE.fullmatch(text):
        raise UsageError(
            f"{path}: not a host id ({text!r:.80}); fix or remove the file (a new id makes"
            " this home a new host: leases held under the old id expire) or set"
            f" {ENV_HOST_ID}"
        )
    return text


def _new_id() -> str:
    name = _UNSAFE.sub("-", socket.gethostname()).strip("-._")[:100] or "host"
    if not name[0].isalnum():
        name = "h" + name
    return f"{name}-{secrets.token_hex(4)}"
