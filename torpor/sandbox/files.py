"""``sb.files``: the sandbox's filesystem, over the guest agent's file requests.

Invariants:

- read/write/list/stat/make_dir are single agent requests (docs/protocol.md);
  ``write`` is atomic in the guest (a temporary file renamed over the target).
- The protocol has no unlink or rename: ``remove`` and ``rename`` run ``rm`` /
  ``mv`` in the guest with the paths as separate argv entries after ``--`` (no
  shell, so a path cannot inject a command).  They need those tools in the image.
- A missing path is :class:`~torpor.errors.NotFoundError`; other refusals from the
  guest are :class:`~torpor.agent.client.AgentRequestError` (an AgentError).
- ``read_stream`` yields the file chunk by chunk: a large file is never held whole.
- ``list`` holds at most :data:`MAX_LIST_ENTRIES` entries: a bigger folder (or a
  hostile guest's endless listing) is a GuestError, the request dropped at the cap.
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from torpor.agent.client import AgentRequestError
from torpor.errors import AgentError, GuestError, NotFoundError, UsageError

if TYPE_CHECKING:
    from torpor.sandbox.core import Sandbox

#: Most entries ``list`` returns (each is a small object: ~100 MB of host memory).
MAX_LIST_ENTRIES = 200_000


@dataclass(frozen=True)
class EntryInfo:
    """One file or folder: ``type`` is "file", "dir", "symlink" or "other"."""

    name: str
    path: str
    type: str
    size: int
    mode: int
    link_target: str = ""


def _kind(mode: int) -> str:
    import stat

    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _abs(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if not p.startswith("/"):
        raise UsageError(f"sandbox paths are absolute: {p!r}")
    return p


def _not_found(e: AgentRequestError, path: str) -> Exception:
    if e.errno == errno.ENOENT:
        return NotFoundError(f"no such file or folder in the sandbox: {path}", path=path)
    return e


class Files:
    """File operations on one sandbox (``sb.files``)."""

    def __init__(self, sandbox: Sandbox):
        self._sb = sandbox

    def read(self, path: str, format: str = "text") -> str | bytes:
        """The whole file: ``format="text"`` (UTF-8, default) or ``"bytes"``."""
        p = _abs(path)
        try:
            data = self._sb._client().read_file(p)
        except AgentRequestError as e:
            raise _not_found(e, p) from e
        if format == "bytes":
            return data
        if format != "text":
            raise UsageError(f"format must be 'text' or 'bytes', not {format!r}")
        return data.decode("utf-8", "replace")

    def read_stream(self, path: str) -> Iterator[bytes]:
        """The file's content, chunk by chunk (never held whole in memory)."""
        p = _abs(path)
        try:
            _info, chunks = self._sb._client().read_file_stream(p)
        except AgentRequestError as e:
            raise _not_found(e, p) from e
        return chunks

    def write(self, path: str, data: str | bytes | BinaryIO, mode: int = 0o644) -> EntryInfo:
        """Write (create or replace) a file atomically; parent folders are made."""
        p = _abs(path)
        c = self._sb._client()
        parent = p.rsplit("/", 1)[0] or "/"
        if parent != "/":
            c.mkdir(parent)
        c.write_file(p, data.encode() if isinstance(data, str) else data, mode=mode)
        return self.get_info(p)

    def list(self, path: str) -> list[EntryInfo]:
        """Entries of a folder (without . and ..), sorted by name."""
        from torpor.agent.files import list_dir_capped

        p = _abs(path)
        try:
            entries, cut = list_dir_capped(self._sb._client(), p, MAX_LIST_ENTRIES)
        except AgentRequestError as e:
            raise _not_found(e, p) from e
        if cut:
            raise GuestError(
                f"{p} has more than {MAX_LIST_ENTRIES:,} entries: too many to list at once "
                "(list part of it with exec, e.g. 'ls | head')"
            )
        base = p.rstrip("/")
        return sorted(
            (
                EntryInfo(e.name, f"{base}/{e.name}", _kind(e.mode), e.size, e.mode, e.link_target)
                for e in entries
            ),
            key=lambda x: x.name,
        )

    def get_info(self, path: str) -> EntryInfo:
        """lstat() of ``path`` (a symlink is not followed)."""
        p = _abs(path)
        try:
            st = self._sb._client().stat(p)
        except AgentRequestError as e:
            raise _not_found(e, p) from e
        name = p.rstrip("/").rsplit("/", 1)[-1] or "/"
        return EntryInfo(name, p, _kind(st.mode), st.size, st.mode, st.link_target)

    def exists(self, path: str) -> bool:
        try:
            self.get_info(path)
        except NotFoundError:
            return False
        return True

    def make_dir(self, path: str, mode: int = 0o755) -> bool:
        """``mkdir -p``; False if it already existed."""
        p = _abs(path)
        existed = self.exists(p)
        self._sb._client().mkdir(p, mode)
        return not existed

    def remove(self, path: str) -> None:
        """Remove a file or a folder with everything in it."""
        p = _abs(path)
        if posixpath.normpath(p) in ("/", "//"):
            raise UsageError("refusing to remove the sandbox's root folder")
        self.get_info(p)  # NotFoundError for a missing path, like os.remove
        self._tool(["rm", "-rf", "--", p], "remove", p)

    def rename(self, old: str, new: str) -> EntryInfo:
        """Move ``old`` to ``new`` (``mv``)."""
        o, n = _abs(old), _abs(new)
        self.get_info(o)
        self._tool(["mv", "--", o, n], "rename", o)
        return self.get_info(n)

    def _tool(self, argv: list[str], what: str, path: str) -> None:
        from torpor.vmm.manager import exec_settings

        # as the sandbox's own user and environment: the same rights as sb.exec
        env, _cwd, user = exec_settings(self._sb._config)
        r = self._sb._client().exec(argv, env=env, user=user, timeout=60)
        if r.code != 0:
            msg = (r.stderr or r.stdout).decode("utf-8", "replace").strip()[:500]
            raise AgentError(f"{what} failed ({r.code}): {msg}", step=f"files.{what}", path=path)
