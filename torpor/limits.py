"""Caps on what untrusted input — a guest, an image — may make the host store.

A copy out of a VM (torpor/agent/files.py) and an image build (torpor/image/layers.py)
both write bytes and names that someone else chose.  Each counts what it writes in a
:class:`WriteBudget`: entries, bytes, and a free-space floor on the file system written
to (min(1 GiB, 5 %) stays free, re-read every 64 MiB), so neither can fill the host's
disk.  Limits come from the environment (``env_int``), with a message naming the
variable that raises them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from torpor.errors import TorporError, UsageError

#: The written file system keeps min(this, RESERVE_FRACTION of its size) free.
RESERVE_BYTES = 1 << 30
RESERVE_FRACTION = 0.05
#: Free space is re-read after this many bytes (a statvfs per chunk is wasteful).
FREE_CHECK_EVERY = 64 << 20

Fail = Callable[[str], TorporError]


def env_int(key: str, default: int, env: Mapping[str, str] | None = None) -> int:
    """A whole, non-negative number from ``env`` (default ``os.environ``).

    Raises UsageError naming the variable when it holds anything else.
    """
    raw = (os.environ if env is None else env).get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{key}={raw!r}: expected a whole number") from None
    if value < 0:
        raise UsageError(f"{key}={raw!r}: must not be negative")
    return value


class WriteBudget:
    """Entries and bytes written so far against their caps, and the free-space floor.

    ``fail`` turns a message into the caller's error (it adds where the writer was).
    """

    def __init__(self, max_bytes: int, max_entries: int, bytes_var: str, entries_var: str):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes_var = bytes_var
        self.entries_var = entries_var
        self.entries = 0
        self.bytes = 0
        self._since_free_check = FREE_CHECK_EVERY  # check before the first write

    def entry(self, fail: Fail) -> None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise fail(
                f"more than {self.max_entries} entries (raise {self.entries_var} to allow more)"
            )

    def add(self, n: int, fd: int | None, fail: Fail) -> None:
        """Count ``n`` bytes written; with ``fd``, check the floor of its file system."""
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise fail(
                f"more than {self.max_bytes} bytes (raise {self.bytes_var} to allow more)"
            )
        self._since_free_check += n
        if fd is not None and self._since_free_check >= FREE_CHECK_EVERY:
            self._since_free_check = 0
            fs = os.fstatvfs(fd)
            reserve = min(RESERVE_BYTES, int(fs.f_blocks * fs.f_frsize * RESERVE_FRACTION))
            if fs.f_bavail * fs.f_frsize < reserve + FREE_CHECK_EVERY:
                raise fail(
                    f"the host file system is nearly full (torpor keeps {reserve} bytes free)"
                )
