"""``torpor cp``: copy files and folders between the host and a VM, Docker's rules.

Destination rules (as ``docker cp``): if DEST is an existing folder, or ends in
``/``, SRC is copied *into* it under its own name; otherwise SRC is copied *to*
DEST.  Folders are copied recursively; symlinks are copied as symlinks, never
followed.  Files land atomically in the guest (the agent writes a temp file and
renames it).  Errors name the side and path that failed.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from pathlib import Path

from torpor.agent.client import AgentClient
from torpor.errors import AgentError, NotFoundError, UsageError

CHUNK = 1 << 20


def split_vm_path(arg: str) -> tuple[str | None, str]:
    """``box:/root/f`` -> ("box", "/root/f"); a plain host path -> (None, path).

    Like Docker, a colon before any slash marks a VM; use ``./a:b`` for a host file
    whose name has a colon.
    """
    head, sep, tail = arg.partition(":")
    if sep and head and "/" not in head:
        if not tail:
            raise UsageError(f"{arg!r}: missing path after the VM name")
        return head, tail
    return None, arg


def _guest_stat(client: AgentClient, path: str):  # -> FileInfo | None
    try:
        return client.stat(path)
    except AgentError as e:
        if getattr(e, "errno", None) == errno.ENOENT:
            return None
        raise


def copy_to_vm(client: AgentClient, src: Path, dest: str, keep_owner: bool = False) -> None:
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        raise NotFoundError(f"no such file on the host: {src}") from None
    target = dest
    dinfo = _guest_stat(client, dest)
    if dest.endswith("/") or (dinfo is not None and stat.S_ISDIR(dinfo.mode)):
        if dinfo is None:
            raise NotFoundError(f"no such folder in the VM: {dest}")
        target = posixpath.join(dest, src.name)
    _put(client, src, st, target, keep_owner)


def _put(client: AgentClient, src: Path, st: os.stat_result, target: str, keep_owner: bool) -> None:
    owner = {"uid": st.st_uid, "gid": st.st_gid} if keep_owner else {}
    if stat.S_ISLNK(st.st_mode):
        client.symlink(os.readlink(src), target)
    elif stat.S_ISDIR(st.st_mode):
        client.mkdir(target, stat.S_IMODE(st.st_mode))
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            _put(
                client,
                Path(entry.path),
                entry.stat(follow_symlinks=False),
                posixpath.join(target, entry.name),
                keep_owner,
            )
    elif stat.S_ISREG(st.st_mode):
        with open(src, "rb") as f:
            client.write_file(target, f, mode=stat.S_IMODE(st.st_mode), **owner)
    # sockets, fifos and devices are skipped, as tar would warn and skip them


def copy_from_vm(client: AgentClient, src: str, dest: Path) -> None:
    info = _guest_stat(client, src)
    if info is None:
        raise NotFoundError(f"no such file in the VM: {src}")
    target = dest
    if str(dest).endswith("/") or dest.is_dir():
        if not dest.is_dir():
            raise NotFoundError(f"no such folder on the host: {dest}")
        target = dest / posixpath.basename(src.rstrip("/") or "/")
    _get(client, src, info, target)


def _get(client: AgentClient, src: str, info, target: Path) -> None:
    mode = info.mode
    if stat.S_ISLNK(mode):
        if target.is_symlink() or target.exists():
            target.unlink()
        os.symlink(info.link_target, target)
    elif stat.S_ISDIR(mode):
        target.mkdir(mode=stat.S_IMODE(mode) | 0o700, exist_ok=True)
        for entry in client.list_dir(src):
            if entry.name in (".", ".."):
                continue
            child = posixpath.join(src, entry.name)
            _get(client, child, client.stat(child), target / entry.name)
    elif stat.S_ISREG(mode):
        tmp = target.with_name(f".{target.name}.torpor-cp")
        _, chunks = client.read_file_stream(src)
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, stat.S_IMODE(mode))
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
