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
- The namespace homes of one ``torpor serve`` (``HOME/namespaces/<ns>``, marked by
  their ``namespace`` file) are that server's host: they use ``HOME/host-id``.
- A damaged ``host-id`` file is an error, not silently replaced: replacing it would
  make this home a new host and orphan its leases.

Heartbeats (:class:`Heartbeat`): while a process holds leases (a :class:`Session`
that claimed one), a daemon thread renews them every ttl/3 through
``ContextLog.heartbeat`` on a connection of its own.  When the last holder lets go
(or the process exits) the thread stops, and the host's leases expire ttl later
unless another process of the same host (``torpor serve``) heartbeats: leases belong
to the host, not to a process.  A failed heartbeat is logged and retried at the next
beat; the leases then may lapse, which fenced writes notice (they never trust it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from torpor.context.dsn import NAMESPACE_FILE
from torpor.context.model import HOST_RE, check_host, check_ttl
from torpor.errors import TorporError, UsageError
from torpor.fsutil import fsync_dir
from torpor.paths import Paths

if TYPE_CHECKING:
    from torpor.context.log import ContextLog

__all__ = [
    "DEFAULT_LEASE_TTL",
    "ENV_HOST_ID",
    "ENV_LEASE_TTL",
    "HOST_FILE",
    "Heartbeat",
    "host_id",
    "lease_ttl",
]

ENV_HOST_ID = "TORPOR_HOST_ID"
ENV_LEASE_TTL = "TORPOR_LEASE_TTL"
DEFAULT_LEASE_TTL = 10.0
HOST_FILE = "host-id"
log = logging.getLogger("torpor.cluster")
_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")


def host_id(paths: Paths) -> str:
    """This host's id: ``$TORPOR_HOST_ID``, else the home's ``host-id`` (made once)."""
    env = os.environ.get(ENV_HOST_ID)
    if env:
        try:
            return check_host(env)
        except UsageError as e:
            raise UsageError(f"{ENV_HOST_ID}: {e.message}") from None
    root = paths.root
    if (root / NAMESPACE_FILE).is_file() and root.parent.name == "namespaces":
        root = root.parent.parent  # a server's namespace home: the server's host
    path = root / HOST_FILE
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    made = _new_id()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{HOST_FILE}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(made + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        with contextlib.suppress(FileExistsError):  # another process made it first: theirs
            os.link(tmp, path)
            fsync_dir(root)
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


def lease_ttl() -> float:
    """``$TORPOR_LEASE_TTL`` seconds (default 10): how long a lease outlives its last
    heartbeat, so how long a dead host's sessions wait before another host may take
    them.  A bad value is a UsageError."""
    raw = os.environ.get(ENV_LEASE_TTL)
    if not raw:
        return DEFAULT_LEASE_TTL
    try:
        return check_ttl(float(raw))
    except (ValueError, UsageError):
        raise UsageError(
            f"{ENV_LEASE_TTL}={raw!r:.40}: a number of seconds > 0 (at most a day)"
        ) from None


class Heartbeat:
    """One daemon thread per process, log and host renewing that host's leases while
    at least one holder is registered (see the module docstring)."""

    _all: ClassVar[dict[tuple[str, str, float], Heartbeat]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, key: tuple[str, str, float], opener: Callable[[], ContextLog]) -> None:
        self.key = key
        self.host, self.ttl = key[1], key[2]
        self._opener = opener
        self._holders: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0  # successful heartbeats (for tests and diagnostics)

    @classmethod
    def hold(
        cls,
        holder: object,
        *,
        where: str,
        host: str,
        ttl: float,
        opener: Callable[[], ContextLog],
    ) -> Heartbeat:
        """Register ``holder`` (kept by identity) for ``host``'s leases in the log
        ``where`` names; starts the thread if it is not running."""
        key = (where, host, ttl)
        with cls._guard:
            hb = cls._all.get(key)
            if hb is None:
                hb = cls._all[key] = Heartbeat(key, opener)
            hb._holders.add(id(holder))
            if hb._thread is None:
                hb._stop.clear()
                hb._thread = threading.Thread(
                    target=hb._run, name=f"torpor-heartbeat-{host}", daemon=True
                )
                hb._thread.start()
        return hb

    def drop(self, holder: object) -> None:
        """``holder`` holds no lease any more; the last one out stops the thread."""
        with self._guard:
            self._holders.discard(id(holder))
            if not self._holders:
                self._stop_locked()

    def stop(self) -> None:
        """Stop renewing now, whoever holds (a test simulating a host that froze)."""
        with self._guard:
            self._holders.clear()
            self._stop_locked()

    def _stop_locked(self) -> None:
        self._stop.set()
        self._thread = None
        if self._all.get(self.key) is self:
            del self._all[self.key]

    def _run(self) -> None:
        stop = self._stop
        lg: ContextLog | None = None
        info = {"pid": os.getpid(), "hostname": socket.gethostname()}
        try:
            while not stop.wait(self.ttl / 3):
                try:
                    if lg is None:
                        lg = self._opener()
                    if stop.is_set():
                        break
                    lg.heartbeat(self.host, info, self.ttl)
                    self.beats += 1
                except Exception as e:  # the database is away: leases may lapse; go on
                    log.warning("heartbeat of host %s failed: %s", self.host, e)
                    if lg is not None and not isinstance(e, TorporError):
                        with contextlib.suppress(Exception):
                            lg.close()
                        lg = None  # an unexpected failure: a fresh connection next time
        finally:
            if lg is not None:
                with contextlib.suppress(TorporError):
                    lg.close()
