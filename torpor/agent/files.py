"""``torpor cp``: copy files and folders between the host and a VM, Docker's rules.

Destination rules (as ``docker cp``): if DEST is an existing folder, or ends in
``/``, SRC is copied *into* it under its own name; otherwise SRC is copied *to*
DEST.  A SRC of ``/`` or ending in ``/.`` copies the folder's contents.  Folders
are copied recursively; symlinks are copied as symlinks, never followed.  Files
land atomically in the guest (the agent writes a temp file and renames it) and
on the host (a temp file renamed over the target).  ``VM:path -`` writes a tar
archive to a stream (stdout) instead; ``- VM:dir`` extracts a tar into the VM.

Copies *out of* a VM take every name, type, link target and byte from the
guest, which is hostile.  The host side therefore keeps these rules:

* The user's DEST is resolved once, as given (the user's own links are
  followed), except that a final component that is a symlink without a
  trailing ``/`` is replaced, not followed.  Everything below it is reached
  only through directory fds: one component at a time with ``dir_fd`` and
  ``O_NOFOLLOW``; a name from the guest must be one component (no ``/``, not
  ``.``/``..``, no NUL, at most 255 bytes) or the copy stops.
* An existing host entry in the way is never followed: a folder from the
  guest over a host link or file is a ConflictError; a file or link from the
  guest replaces a host link or file by ``rename`` (the link is not touched).
* Files are written to a fresh ``.torpor-cp-<random>`` temp file created with
  ``O_CREAT|O_EXCL|O_NOFOLLOW`` in the already-opened parent folder, then
  renamed over the target in that same folder; modes are set with ``fchmod``
  on the fd, never by path, and never include setuid/setgid/sticky bits.
  Ownership and times are not copied.
* Device nodes, FIFOs and sockets are skipped (never created); a file that
  turns out not to be a regular file when the guest opens it stops the copy.
* Caps: total bytes (``TORPOR_CP_MAX_BYTES``, default 64 GiB), entries
  (``TORPOR_CP_MAX_ENTRIES``, default 1,000,000), folder depth (256), and the
  destination file system keeps at least ``min(1 GiB, 5 %)`` free.  Hitting one
  raises UnsafeCopyError naming the variable; the partial file is removed
  (entries already copied stay, as with an interrupted ``cp -r``).
* A directory listing is consumed as a stream, so a guest that sends endless
  entries hits the entry cap instead of filling host memory.

Copies *into* a VM read host files with ``O_NOFOLLOW`` (a host path swapped
for a link is not followed); what the guest does with the bytes is its own
business.  Errors name the side and path that failed.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import secrets
import stat
import tarfile
import tempfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from torpor.agent.client import DEFAULT_TIMEOUT, AgentClient, _deadline
from torpor.agent.protocol import DirEntry, FileInfo, PathRequest, T
from torpor.errors import (
    AgentError,
    ConflictError,
    NotFoundError,
    TorporError,
    UnsafeCopyError,
    UsageError,
)
from torpor.limits import Fail, WriteBudget, env_int

log = logging.getLogger("torpor.agent")

CHUNK = 1 << 20
NAME_MAX = 255
LINK_MAX = 4095
ENV_MAX_BYTES = "TORPOR_CP_MAX_BYTES"
ENV_MAX_ENTRIES = "TORPOR_CP_MAX_ENTRIES"
DEFAULT_MAX_BYTES = 64 << 30
DEFAULT_MAX_ENTRIES = 1_000_000
DEFAULT_MAX_DEPTH = 256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_PREFIX = ".torpor-cp-"


@dataclass(frozen=True)
class CopyLimits:
    """What one copy out of a VM may write on the host."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_depth: int = DEFAULT_MAX_DEPTH

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> CopyLimits:
        """Defaults, overridden by ``TORPOR_CP_MAX_BYTES`` / ``TORPOR_CP_MAX_ENTRIES``."""
        return cls(
            env_int(ENV_MAX_BYTES, DEFAULT_MAX_BYTES, env),
            env_int(ENV_MAX_ENTRIES, DEFAULT_MAX_ENTRIES, env),
        )

    def budget(self) -> WriteBudget:
        return WriteBudget(self.max_bytes, self.max_entries, ENV_MAX_BYTES, ENV_MAX_ENTRIES)


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


def _guest_stat(client: AgentClient, path: str) -> FileInfo | None:
    try:
        return client.stat(path)
    except AgentError as e:
        if getattr(e, "errno", None) == errno.ENOENT:
            return None
        raise


def check_name(name: str, where: str) -> None:
    """A name the guest sent must be exactly one path component."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UnsafeCopyError(f"the VM sent an unsafe file name {name!r} in {where}")
    if len(os.fsencode(name)) > NAME_MAX:
        raise UnsafeCopyError(f"the VM sent a file name longer than {NAME_MAX} bytes in {where}")


def _check_link(target: str, where: str) -> None:
    if not target or "\0" in target or len(os.fsencode(target)) > LINK_MAX:
        raise UnsafeCopyError(f"the VM sent an unusable symlink target {target!r} for {where}")


def _source_name(src: str) -> str | None:
    """The name SRC is copied under; None for "its contents" (``/``, ``dir/.``)."""
    if posixpath.basename(src.rstrip("/")) in ("", "."):
        return None
    name = posixpath.basename(posixpath.normpath(src))
    return None if name in ("", ".", "..", "/") else name


def _list_dir(client: AgentClient, path: str, budget: WriteBudget) -> list[DirEntry]:
    """LIST_DIR with every entry counted against the entry cap as it arrives.

    :meth:`AgentClient.list_dir` would first hold everything a hostile guest sends;
    here the request ends (and later frames are dropped) as soon as the cap is hit.
    The listing is read whole before any entry is copied, so the reply is consumed
    at wire speed instead of queueing up behind slow file writes.
    """
    entries = []
    with client._call(T.LIST_DIR, PathRequest(path).encode(), path) as call:
        while (frame := call.next(_deadline(DEFAULT_TIMEOUT))).type != T.OK:
            if frame.type == T.DIRENT:
                e = DirEntry.decode(frame.payload)
                if e.name in (".", ".."):
                    continue
                budget.entry(_stopped_at(posixpath.join(path, e.name)))
                check_name(e.name, path)
                entries.append(e)
    return entries


def list_dir_capped(client: AgentClient, path: str, limit: int) -> tuple[list[DirEntry], bool]:
    """The first ``limit`` entries of a guest folder (without ``.``/``..``) and whether
    there were more.  The request is dropped at the limit: an endless listing from a
    hostile guest costs the host ``limit`` entries, not all it sends."""
    entries: list[DirEntry] = []
    with client._call(T.LIST_DIR, PathRequest(path).encode(), path) as call:
        while (frame := call.next(_deadline(DEFAULT_TIMEOUT))).type != T.OK:
            if frame.type == T.DIRENT:
                e = DirEntry.decode(frame.payload)
                if e.name in (".", ".."):
                    continue
                if len(entries) >= limit:
                    return entries, True
                entries.append(e)
    return entries, False


# ---- host -> VM ----------------------------------------------------------------


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
        # O_NOFOLLOW and an fstat check: a path swapped for a link or a FIFO since
        # the listing is not followed (nor blocked on).
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TorporError(f"cannot read {src} on the host: {e.strerror}", step="cp") from e
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConflictError(f"{src} changed while it was copied (no longer a file)")
            client.write_file(target, f, mode=stat.S_IMODE(st.st_mode), **owner)
    # sockets, fifos and devices are skipped, as tar would warn and skip them


# ---- VM -> host ------------------------------------------------------------------


def _stopped_at(where: str) -> Fail:
    return lambda message: UnsafeCopyError(f"copy stopped at {where}: {message}")


def _host_error(e: OSError, what: str) -> TorporError:
    err = TorporError(f"{what}: {e.strerror or e}", step="cp")
    err.__cause__ = e
    return err


class _ToHost:
    """Writes what the guest sends below one open host directory fd."""

    def __init__(self, client: AgentClient, limits: CopyLimits):
        self.client = client
        self.limits = limits
        self.budget = limits.budget()
        self.skipped: list[str] = []

    def entry(
        self, src: str, mode: int, link: str, dir_fd: int, name: str, shown: str, depth: int
    ) -> None:
        if stat.S_ISLNK(mode):
            _check_link(link, shown)
            self._replace_with(
                dir_fd, name, shown, lambda tmp: os.symlink(link, tmp, dir_fd=dir_fd)
            )
        elif stat.S_ISDIR(mode):
            self.folder(src, mode, dir_fd, name, shown, depth)
        elif stat.S_ISREG(mode):
            self.file(src, dir_fd, name, shown)
        else:  # devices, FIFOs, sockets: never created from guest data
            self.skipped.append(shown)

    def folder(self, src: str, mode: int, dir_fd: int, name: str, shown: str, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise UnsafeCopyError(
                f"copy stopped at {shown}: folders nest deeper than {self.limits.max_depth}"
            )
        with suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ConflictError(
                    f"{shown} exists on the host and is not a folder (a link or a file): "
                    "not followed, not replaced"
                ) from None
            raise _host_error(e, f"cannot open {shown} on the host") from e
        try:
            self.fill(src, fd, shown, depth)
            os.fchmod(fd, (mode & 0o777) | 0o700)  # owner rwx: the copy can be redone and removed
        finally:
            os.close(fd)

    def fill(self, src: str, fd: int, shown: str, depth: int) -> None:
        """Copy the entries of guest folder ``src`` into the open host folder ``fd``."""
        for e in _list_dir(self.client, src, self.budget):
            self.entry(
                posixpath.join(src, e.name),
                e.mode,
                e.link_target,
                fd,
                e.name,
                posixpath.join(shown, e.name),
                depth + 1,
            )

    def file(self, src: str, dir_fd: int, name: str, shown: str) -> None:
        def write(tmp: str) -> None:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
            try:
                info, chunks = self.client.read_file_stream(src)
                try:
                    if not info.is_file:
                        raise UnsafeCopyError(f"{src} in the VM is no longer a regular file")
                    for chunk in chunks:
                        self.budget.add(len(chunk), fd, _stopped_at(shown))
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                finally:
                    chunks.close()
                os.fchmod(fd, info.mode & 0o777)  # never setuid/setgid/sticky from the guest
                os.fsync(fd)
            finally:
                os.close(fd)

        self._replace_with(dir_fd, name, shown, write)

    def _replace_with(
        self, dir_fd: int, name: str, shown: str, make: Callable[[str], None]
    ) -> None:
        """Create a fresh temp entry with ``make(tmp)``, then rename it over ``name``."""
        for _ in range(100):
            tmp = f"{_TMP_PREFIX}{secrets.token_hex(8)}"
            try:
                make(tmp)
                break
            except FileExistsError:
                continue
            except BaseException as e:
                with suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                if isinstance(e, OSError):
                    raise _host_error(e, f"cannot write {shown} on the host") from e
                raise
        else:
            raise TorporError(f"cannot create a temp file next to {shown}", step="cp")
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as e:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise ConflictError(
                    f"cannot overwrite the folder {shown} with a non-folder"
                ) from None
            raise _host_error(e, f"cannot write {shown} on the host") from e


def _open_dir(path: Path, *, follow: bool) -> int:
    try:
        return os.open(path, _DIR_FLAGS if not follow else _DIR_FLAGS & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFoundError(f"no such folder on the host: {path}") from None
    except NotADirectoryError:
        raise ConflictError(f"{path} on the host is not a folder") from None
    except OSError as e:
        raise _host_error(e, f"cannot open {path}") from e


def copy_from_vm(
    client: AgentClient, src: str, dest: Path, limits: CopyLimits | None = None
) -> list[str]:
    """Copy ``src`` out of the VM to ``dest`` (rules in the module docstring).

    Returns the guest paths skipped because they are devices, FIFOs or sockets.
    """
    limits = limits or CopyLimits.from_env()
    info = _guest_stat(client, src)
    if info is None:
        raise NotFoundError(f"no such file in the VM: {src}")
    name = _source_name(src)
    raw = str(dest)
    try:
        lst = os.lstat(dest)
    except FileNotFoundError:
        lst = None
    except OSError as e:
        raise _host_error(e, f"cannot look at {dest}") from e
    into = raw.endswith("/") or (lst is not None and stat.S_ISDIR(lst.st_mode))
    if into:
        # A trailing "/" asks for a folder, so a link there is followed (the user's choice).
        parent_fd = _open_dir(dest, follow=raw.endswith("/"))
    else:
        parent_fd = _open_dir(dest.parent, follow=True)
        name_here = dest.name
        check_name(name_here, "the destination")
    writer = _ToHost(client, limits)
    try:
        if name is None:  # a folder's contents
            if not info.is_dir:
                raise UsageError(f"{src} in the VM is not a folder")
            writer.budget.entry(_stopped_at(src))
            if into:
                writer.fill(src, parent_fd, ".", 0)
            else:
                writer.folder(src, info.mode, parent_fd, name_here, name_here, 0)
        else:
            if not (info.is_dir or info.is_file or info.is_symlink):
                raise UsageError(
                    f"{src} in the VM is not a file, folder or link (devices are not copied)"
                )
            target = name if into else name_here
            writer.budget.entry(_stopped_at(src))
            writer.entry(src, info.mode, info.link_target, parent_fd, target, target, 0)
    finally:
        os.close(parent_fd)
    return writer.skipped


# ---- VM -> tar stream ----------------------------------------------------------------


def copy_from_vm_tar(
    client: AgentClient, src: str, out: BinaryIO, limits: CopyLimits | None = None
) -> list[str]:
    """Write ``src`` as a tar archive to ``out`` (``torpor cp VM:path -``).

    Member names are checked like host paths (one component each, never ``..``),
    so extracting the archive cannot climb out.  Returns the skipped special files.
    """
    limits = limits or CopyLimits.from_env()
    info = _guest_stat(client, src)
    if info is None:
        raise NotFoundError(f"no such file in the VM: {src}")
    name = _source_name(src)
    budget = limits.budget()
    skipped: list[str] = []

    def add(
        tf: tarfile.TarFile,
        path: str,
        mode: int,
        link: str,
        arc: str,
        fi: FileInfo | None,
        depth: int,
    ) -> None:
        ti = tarfile.TarInfo(arc or ".")
        ti.mode = mode & 0o777
        if fi is not None:
            ti.uid, ti.gid, ti.mtime = fi.uid, fi.gid, max(fi.mtime, 0)
        if stat.S_ISLNK(mode):
            _check_link(link, arc)
            ti.type, ti.linkname = tarfile.SYMTYPE, link
            tf.addfile(ti)
        elif stat.S_ISDIR(mode):
            if depth > limits.max_depth:
                raise UnsafeCopyError(
                    f"copy stopped at {arc}: folders nest deeper than {limits.max_depth}"
                )
            ti.type = tarfile.DIRTYPE
            if arc:
                tf.addfile(ti)
            for e in _list_dir(client, path, budget):
                add(
                    tf,
                    posixpath.join(path, e.name),
                    e.mode,
                    e.link_target,
                    posixpath.join(arc, e.name) if arc else e.name,
                    None,
                    depth + 1,
                )
        elif stat.S_ISREG(mode):
            # The size goes in the header before the data: spool, within the byte cap.
            with tempfile.SpooledTemporaryFile(max_size=8 * CHUNK) as spool:
                opened, chunks = client.read_file_stream(path)
                try:
                    if not opened.is_file:
                        raise UnsafeCopyError(f"{path} in the VM is no longer a regular file")
                    for chunk in chunks:
                        budget.add(len(chunk), None, _stopped_at(arc))
                        spool.write(chunk)
                finally:
                    chunks.close()
                ti.size = spool.tell()
                ti.mode = opened.mode & 0o777
                ti.uid, ti.gid, ti.mtime = opened.uid, opened.gid, max(opened.mtime, 0)
                spool.seek(0)
                tf.addfile(ti, spool)
        else:
            skipped.append(arc)

    budget.entry(_stopped_at(src))
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        if name is None:
            if not info.is_dir:
                raise UsageError(f"{src} in the VM is not a folder")
            add(tf, src, info.mode, "", "", info, 0)
        else:
            if not (info.is_dir or info.is_file or info.is_symlink):
                raise UsageError(
                    f"{src} in the VM is not a file, folder or link (devices are not copied)"
                )
            add(tf, src, info.mode, info.link_target, name, info, 0)
    return skipped


# ---- tar stream -> VM ----------------------------------------------------------------


def copy_tar_to_vm(client: AgentClient, stream: BinaryIO, dest: str) -> list[str]:
    """Extract a tar read from ``stream`` into the VM folder ``dest`` (``cp - VM:dir``).

    Members that climb out (``..``) are refused; hard links, devices and FIFOs are
    skipped (returned).  The guest applies each entry as ``torpor cp`` would.
    """
    dinfo = _guest_stat(client, dest)
    if dinfo is None or not dinfo.is_dir:
        raise NotFoundError(f"no such folder in the VM: {dest}")
    skipped: list[str] = []
    made: set[str] = set()
    try:
        tf = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 - closed below
    except tarfile.TarError as e:
        raise UsageError(f"standard input is not a tar archive ({e})") from e
    with tf:
        try:
            for m in tf:
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if ".." in parts or "\0" in m.name:
                    raise UsageError(f"tar member {m.name!r} climbs out of the destination")
                if not parts:
                    continue
                path = posixpath.join(dest, *parts)
                parent = posixpath.dirname(path)
                if parent not in made and len(parts) > 1:
                    client.mkdir(parent)
                    made.add(parent)
                if m.isdir():
                    client.mkdir(path, m.mode & 0o7777)
                    made.add(path)
                elif m.isreg():
                    data = tf.extractfile(m)
                    assert data is not None
                    client.write_file(path, data, mode=m.mode & 0o7777)
                elif m.issym():
                    client.symlink(m.linkname, path)
                else:
                    skipped.append(m.name)
        except tarfile.TarError as e:
            raise UsageError(f"corrupt tar archive on standard input ({e})") from e
    return skipped
