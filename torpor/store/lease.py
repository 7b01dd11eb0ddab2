"""Writer leases: how a snapshot being written tells ``gc`` to keep its chunks.

Role: a lease is a small file ``leases/<host>.<pid>.<random>.lease`` that a writer
creates (under the store's shared gc lock) before it writes or relies on its first
chunk, and removes after its manifest is committed (or when it gives up).

Invariants:

- The lease file's mtime is the lease's start, on the same (kernel) clock as chunk
  mtimes; ``gc`` keeps every chunk whose mtime is not older than the oldest live
  lease.  The full safety argument is in :mod:`torpor.store.store`.
- A lease is live while its process is: the pid *and* the process start time (from
  ``/proc/<pid>/stat``) must both match, so a reused pid does not keep a dead
  writer's lease alive.  Leases written on another host cannot be checked and count
  as live (conservative: they only make gc keep more).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # comm (field 2) may contain spaces and parens; fields after the last ')' start
    # at field 3, so starttime (field 22) is index 19 there.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class LeaseInfo:
    path: Path
    host: str
    pid: int
    start_time: int | None
    mtime_ns: int

    def alive(self) -> bool:
        if self.host != socket.gethostname():
            return True
        return self.start_time is not None and _proc_start_time(self.pid) == self.start_time


def create_lease(leases_dir: Path) -> Path:
    """Create this process's lease file and return its path (not fsynced: it only has
    to outlive the writer, and a crash ends the writer anyway)."""
    leases_dir.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    host = socket.gethostname()
    path = leases_dir / f"{host}.{pid}.{secrets.token_hex(4)}.lease"
    body = {"host": host, "pid": pid, "start_time": _proc_start_time(pid)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(body).encode())
    finally:
        os.close(fd)
    return path


def release_lease(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def read_leases(leases_dir: Path) -> list[LeaseInfo]:
    out: list[LeaseInfo] = []
    if not leases_dir.is_dir():
        return out
    for p in leases_dir.iterdir():
        if not p.name.endswith(".lease"):
            continue
        try:
            st = p.stat()
            body = json.loads(p.read_bytes() or b"{}")
        except FileNotFoundError:
            continue
        except ValueError:
            body = {}
        try:
            pid = int(body.get("pid", -1))
            start = body.get("start_time")
            start = int(start) if start is not None else None
        except (TypeError, ValueError):
            pid, start = -1, None
        host = str(body.get("host", socket.gethostname()))
        out.append(LeaseInfo(p, host, pid, start, st.st_mtime_ns))
    return out
