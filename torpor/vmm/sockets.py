"""Unix-socket helpers with no heavy imports (the shim and QMP code use them at start-up)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def connect_unix(path: Path, timeout: float = 10.0) -> socket.socket:
    """Connect to a unix socket whose path may exceed the 107-byte sun_path limit."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    target = str(path)
    dirfd = None
    if len(target.encode()) > 100:
        dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
        target = f"/proc/self/fd/{dirfd}/{path.name}"
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    finally:
        if dirfd is not None:
            os.close(dirfd)
    sock.settimeout(None)
    return sock
