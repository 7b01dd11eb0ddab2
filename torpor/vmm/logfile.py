"""Size-capped, rotated log files (Docker's ``max-size`` / ``max-file``).

A guest controls how much its main command prints and what it writes to its serial
console; neither may fill the host's disk.  A :class:`RotatingLog` keeps at most
``max_files`` files: ``NAME`` (being written), ``NAME.1`` (the previous one) …
``NAME.<max_files-1>`` (the oldest); when ``NAME`` would grow past ``max_size`` the
files shift by one and the oldest is deleted.  So the bytes kept are at most
``max_files * max_size`` plus one record.

Readers (:func:`log_files`, :class:`Follower`) see the kept files oldest first.  A
follower holds the file it reads open, so a rotation (rename) under it loses nothing
it had not yet read unless the writer rotates more than ``max_files - 1`` times
between two of its polls (then the skipped files were already deleted: capped logs
keep the newest output, like Docker's).

Invariant: only the VM's shim writes a VM's logs (one writer per file).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from torpor.errors import UsageError

DEFAULT_MAX_SIZE = 10 << 20  # like `--log-opt max-size=10m`
DEFAULT_MAX_FILES = 3


@dataclass(frozen=True)
class LogLimits:
    max_size: int = DEFAULT_MAX_SIZE
    max_files: int = DEFAULT_MAX_FILES


def parse_size(text: str) -> int:
    """Docker's ``max-size`` syntax: ``100k``, ``10m``, ``1g``, or bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)b?\s*", text.lower())
    if not m:
        raise UsageError(f"invalid log size {text!r} (examples: 512k, 10m, 1g)")
    n = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]
    if n < 4096:
        raise UsageError(f"log max-size {text!r} is too small (at least 4k)")
    return n


def parse_log_opts(opts: tuple[str, ...] | list[str]) -> LogLimits:
    """``--log-opt max-size=10m --log-opt max-file=3`` to :class:`LogLimits`."""
    size, files = DEFAULT_MAX_SIZE, DEFAULT_MAX_FILES
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            raise UsageError(f"invalid --log-opt {opt!r} (expected KEY=VALUE)")
        if key == "max-size":
            size = parse_size(value)
        elif key == "max-file":
            if not value.isdigit() or not 1 <= int(value) <= 100:
                raise UsageError(f"invalid --log-opt max-file={value!r} (1 to 100)")
            files = int(value)
        else:
            raise UsageError(f"unknown --log-opt {key!r} (known: max-size, max-file)")
    return LogLimits(size, files)


def log_files(path: Path, max_files: int = 100) -> list[Path]:
    """The kept files of the log at ``path``, oldest first (those that exist)."""
    out = [path.with_name(f"{path.name}.{i}") for i in range(max_files - 1, 0, -1)]
    out.append(path)
    return [p for p in out if p.exists()]


def read_all(path: Path) -> bytes:
    """Everything kept of the log at ``path``, oldest first."""
    data = b""
    for p in log_files(path):
        with contextlib.suppress(FileNotFoundError):
            data += p.read_bytes()
    return data


class RotatingLog:
    """Append-only writer with rotation; ``write`` never raises OSError (a full disk
    drops output and counts it, rather than killing the VM's supervisor)."""

    def __init__(self, path: Path, limits: LogLimits) -> None:
        self.path = path
        self.limits = limits
        self.dropped = 0
        self.f: BinaryIO | None = None
        self.size = 0
        self._open()

    def _open(self) -> None:
        try:
            self.f = open(self.path, "ab")  # noqa: SIM115  (closed in close())
            self.size = self.f.tell()
        except OSError:
            self.f = None

    def rotate(self) -> None:
        if self.f is not None:
            with contextlib.suppress(OSError):
                self.f.close()
            self.f = None
        n = self.limits.max_files
        for i in range(n - 1, 0, -1):
            src = self.path if i == 1 else self.path.with_name(f"{self.path.name}.{i - 1}")
            with contextlib.suppress(FileNotFoundError, OSError):
                os.replace(src, self.path.with_name(f"{self.path.name}.{i}"))
        if n == 1:
            with contextlib.suppress(FileNotFoundError, OSError):
                self.path.unlink()
        # files beyond the cap, left by a larger max-file earlier
        for i in range(n, n + 100):
            p = self.path.with_name(f"{self.path.name}.{i}")
            if not p.exists():
                break
            with contextlib.suppress(OSError):
                p.unlink()
        self._open()

    def write(self, data: bytes) -> None:
        if self.f is None or (self.size and self.size + len(data) > self.limits.max_size):
            self.rotate()
        if self.f is None:
            self.dropped += len(data)
            return
        try:
            self.f.write(data)
            self.f.flush()
            self.size += len(data)
        except OSError:
            self.dropped += len(data)

    def close(self) -> None:
        if self.f is not None:
            with contextlib.suppress(OSError):
                self.f.close()
            self.f = None


class Follower:
    """Reads a rotating log from its oldest kept file on, then follows new writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending = log_files(path)  # oldest first; the last one is the live file
        self.f: BinaryIO | None = None
        self.buf = b""

    def _next_file(self) -> bool:
        while self.pending:
            p = self.pending.pop(0)
            with contextlib.suppress(FileNotFoundError):
                self.f = open(p, "rb")  # noqa: SIM115  (closed on rotation / close())
                return True
        return False

    def lines(self) -> Iterator[bytes]:
        """Complete lines available now (each ends with b"\\n")."""
        while True:
            if self.f is None and not self._next_file():
                if self.path.exists():
                    self.pending = [self.path]
                    continue
                return
            assert self.f is not None
            chunk = self.f.read(1 << 16)
            if chunk:
                self.buf += chunk
                *full, self.buf = self.buf.split(b"\n")
                for line in full:
                    yield line + b"\n"
                continue
            if self.pending:  # a rotated file read to its end: on to the next one
                self.f.close()
                self.f = None
                self.buf = b""
                continue
            # at the end of what we believe is the live file: was it rotated away?
            try:
                live = os.stat(self.path).st_ino
            except FileNotFoundError:
                return
            if live == os.fstat(self.f.fileno()).st_ino:
                return
            self.f.close()  # drained: the writer moved on to a new file
            self.f = None
            self.buf = b""
            self.pending = [self.path]

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
