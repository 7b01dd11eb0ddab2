"""Apply image layers (tar streams) in order into a root filesystem directory.

Role: the only code that writes untrusted archive content to the host.  It
never calls ``tarfile.extractall``; every entry is resolved by hand, relative
to an open directory fd of the root, one component at a time.

Safety invariants (violations raise LayerError naming the layer and entry):

* Entry names and hard-link targets are cleaned lexically (``.`` and ``..``
  components); one that climbs above the root is refused.
* Parent paths are walked with ``lstat``/``O_NOFOLLOW``.  A symlink met on the
  way is followed *inside* the root only if its target is relative and stays
  inside; an absolute target or one that climbs out is an "absolute / relative
  symlink escape" and is refused.  Host symlinks are never followed.
* The final component is never followed: an existing entry of another type
  (symlink included) is removed first and the new one created with
  ``O_EXCL|O_NOFOLLOW``; metadata is set through that fd, or with the
  ``follow_symlinks=False`` variants (``lchown``, ``lsetxattr``, ``utimensat``).
* Hard links may point only at an existing non-directory inside the root.
* Caps across all layers of one build, so a decompression bomb cannot fill the
  host: file content (holes included) ``TORPOR_IMAGE_MAX_BYTES`` (default 64 GiB),
  entries ``TORPOR_IMAGE_MAX_ENTRIES`` (default 10,000,000), and the host file
  system keeps ``min(1 GiB, 5 %)`` free.  Hitting one is a LayerError naming it.

Semantics (OCI image-spec "changesets", as Docker applies them):

* Regular files, directories, symlinks (target stored verbatim), hard links,
  character/block devices, FIFOs; mode including setuid/setgid/sticky, numeric
  uid/gid, mtime, and PAX ``SCHILY.xattr.*`` / ``LIBARCHIVE.xattr.*`` xattrs
  (``security.capability`` included; set after chown, which would clear it).
* ``.wh.<name>`` deletes ``<name>`` from lower layers; ``.wh..wh..opq`` makes
  its directory opaque: everything below it that this same layer did not
  write is removed, wherever the marker sits in the tar.
* A directory over an existing directory keeps the contents; any other type
  change replaces the old entry (recursively for a directory).
* Sparse regions (all-zero 128 KiB blocks) are written as holes.

As non-root, ownership and device nodes cannot be reproduced: chown and mknod
are skipped with one warning, and directories keep owner ``rwx`` so later
entries can be written and the tree removed.

The uncompressed stream is hashed while applied; :attr:`LayerResult.diff_id`
is compared with the expected diff id when one is given (DigestMismatchError).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import shutil
import stat
import tarfile
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from torpor.errors import DigestMismatchError, ImageError, LayerError
from torpor.image.blobs import Reader, open_decompressed
from torpor.limits import WriteBudget, env_int

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40
NAME_MAX = 255
_COPY_CHUNK = 128 << 10
_WINDOW = 64 << 10
ENV_MAX_BYTES = "TORPOR_IMAGE_MAX_BYTES"
ENV_MAX_ENTRIES = "TORPOR_IMAGE_MAX_ENTRIES"
DEFAULT_MAX_BYTES = 64 << 30
DEFAULT_MAX_ENTRIES = 10_000_000

Parts = tuple[str, ...]


@dataclass(frozen=True)
class LayerResult:
    """What applying one layer produced."""

    diff_id: str
    entries: int
    compression: str | None


class TarInput:
    """The uncompressed stream as tarfile reads it: hashed, counted, last 64 KiB kept.

    The kept window lets us check what tarfile stopped on: Python's tarfile ends
    iteration *silently* on a corrupt or truncated header after the first one.
    """

    def __init__(self, raw: Reader):
        self._raw = raw
        self._hash = hashlib.sha256()
        self.count = 0
        self._window = bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self._hash.update(data)
            self.count += len(data)
            self._window += data
            if len(self._window) > 2 * _WINDOW:
                del self._window[: len(self._window) - _WINDOW]
        return data

    def block_at(self, offset: int) -> bytes | None:
        """The 512 bytes at absolute ``offset`` if still in the window."""
        start = offset - (self.count - len(self._window))
        if start < 0 or offset + tarfile.BLOCKSIZE > self.count:
            return None
        return bytes(self._window[start : start + tarfile.BLOCKSIZE])

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def _clean(name: str) -> Parts | None:
    """Lexically clean a tar path; ``None`` if it climbs above the root."""
    out: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not out:
                return None
            out.pop()
        else:
            out.append(comp)
    return tuple(out)


def iter_tar(
    src: TarInput, *, what: str, error: type[ImageError], require_end_marker: bool
) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Stream the members of a tar; after the last, check the archive really ended.

    An empty stream has no members.  A corrupt header, a truncated header or
    data, or (if ``require_end_marker``) a missing end-of-archive block raises
    ``error`` naming ``what``.  Member data must be read before the next member.
    """
    try:
        tf = tarfile.open(  # noqa: SIM115 - closed by the with block below
            fileobj=src,  # type: ignore[arg-type]
            mode="r|",
            errors="surrogateescape",
        )
    except tarfile.TarError as e:
        if src.count == 0:
            return
        raise error(f"{what}: not a tar archive ({e})") from e
    with tf:
        while True:
            try:
                member = tf.next()
            except tarfile.TarError as e:
                raise error(f"{what}: corrupt or truncated tar ({e})") from e
            if member is None:
                break
            yield tf, member
            tf.members.clear()  # stream mode would otherwise keep every header in memory
            # Skip the data nobody read ourselves: tarfile's stream skip reads 10 KiB at a
            # time *past the end of the input* until it reaches the claimed size, so a
            # header claiming 2**40 bytes would spin for hours.
            remaining = tf.offset - tf.fileobj.tell()  # type: ignore[union-attr]
            while remaining > 0:
                got = len(tf.fileobj.read(min(remaining, 1 << 20)))  # type: ignore[union-attr]
                if not got:
                    raise error(
                        f"{what}: tar archive is truncated (member {member.name!r} "
                        f"claims {member.size} bytes)"
                    )
                remaining -= got
        end = tf.offset
    block = src.block_at(end)
    if block is None:
        if src.count > end or require_end_marker:
            raise error(
                f"{what}: tar archive is truncated (no end-of-archive marker at byte {end})"
            )
    elif block.count(0) != tarfile.BLOCKSIZE:
        raise error(f"{what}: corrupt tar header at byte {end}")


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            # tarfile decoded the raw bytes with utf-8 + surrogateescape: this undoes it exactly.
            out[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            with contextlib.suppress(ValueError):
                padded = value + "=" * (-len(value) % 4)
                out[name] = base64.b64decode(padded)
    return out


class RootfsBuilder:
    """Applies layers, bottom first, into ``root`` (an existing, empty directory).

    Use as a context manager (it holds a directory fd on ``root``).
    """

    def __init__(self, root: Path, *, warn: Callable[[str], None] | None = None):
        self.root = Path(root)
        self._root_fd = os.open(
            self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        self.privileged = os.geteuid() == 0
        self._warn_fn = warn or log.warning
        # across all layers of this build; bytes are file content read, holes included
        self.budget = WriteBudget(
            env_int(ENV_MAX_BYTES, DEFAULT_MAX_BYTES),
            env_int(ENV_MAX_ENTRIES, DEFAULT_MAX_ENTRIES),
            ENV_MAX_BYTES,
            ENV_MAX_ENTRIES,
        )
        self._warned: set[str] = set()
        # The last resolved parent directory: consecutive entries usually share it.
        self._cached: tuple[Parts, int, Parts] | None = None

    def invalidate(self) -> None:
        """Forget resolved directories; called before anything is removed or replaced."""
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def close(self) -> None:
        self.invalidate()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> RootfsBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._warn_fn(message)

    def apply(
        self,
        stream: Reader,
        *,
        name: str,
        expected_diff_id: str | None = None,
        require_end_marker: bool | None = None,
    ) -> LayerResult:
        """Apply one layer read from ``stream`` (compressed or not).

        ``name`` identifies the layer in errors.  Without ``expected_diff_id`` a
        tar lacking its end-of-archive blocks is refused as truncated (with a
        digest, a short tar fails the digest check instead).  Raises LayerError
        for corrupt or unsafe content, DigestMismatchError for a wrong diff id.
        """
        if require_end_marker is None:
            require_end_marker = expected_diff_id is None
        try:
            plain, compression = open_decompressed(stream, what=f"layer {name}")
            src = TarInput(plain)
            applier = _LayerApplier(self, name)
            entries = applier.run(src, require_end_marker=require_end_marker)
            src.drain()
        except LayerError:
            raise
        except ImageError as e:
            raise LayerError(str(e)) from e
        if expected_diff_id is not None and src.digest != expected_diff_id:
            raise DigestMismatchError(
                f"layer {name}: uncompressed content hashes to {src.digest}, "
                f"the image config says its diff_id is {expected_diff_id}"
            )
        return LayerResult(diff_id=src.digest, entries=entries, compression=compression)

    # -- path resolution ---------------------------------------------------

    def open_dir(
        self, parts: Parts, *, create: bool, fail: Callable[[str], LayerError]
    ) -> tuple[int, Parts]:
        """Open the directory ``parts`` below the root; return (fd, real parts).

        Symlinks on the way are resolved lexically inside the root (relative
        targets only).  Missing directories are created (0755) if ``create``,
        else FileNotFoundError propagates.  The caller closes the fd.
        """
        pending = list(parts)
        fd = os.dup(self._root_fd)
        real: list[str] = []
        hops = 0
        try:
            while pending:
                comp = pending.pop(0)
                try:
                    st = os.lstat(comp, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    # the image's modes, not the process umask (the CLI's is 077)
                    os.chmod(comp, 0o755, dir_fd=fd)
                    st = os.lstat(comp, dir_fd=fd)
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(comp, dir_fd=fd)
                    shown = "/".join([*real, comp])
                    if target.startswith("/"):
                        raise fail(
                            f"path goes through /{shown} -> {target}: "
                            "absolute symlink escape (refused)"
                        )
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise fail(f"too many levels of symbolic links at /{shown}")
                    resolved = _clean("/".join([*real, target]))
                    if resolved is None:
                        raise fail(
                            f"path goes through /{shown} -> {target}, which climbs out of "
                            "the root: relative symlink escape (refused)"
                        )
                    pending = list(resolved) + pending
                    os.close(fd)
                    fd = os.dup(self._root_fd)
                    real = []
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise fail(f"/{'/'.join([*real, comp])} is not a directory")
                nfd = os.open(
                    comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
                os.close(fd)
                fd = nfd
                real.append(comp)
            return fd, tuple(real)
        except BaseException:
            os.close(fd)
            raise

    @contextlib.contextmanager
    def dir_fd(
        self, parts: Parts, *, create: bool, fail: Callable[[str], LayerError]
    ) -> Iterator[tuple[int, Parts]]:
        """:meth:`open_dir` as a context manager, remembering the last directory.

        A cached fd stays valid while nothing is removed (see :meth:`invalidate`):
        the path can then only resolve to the same directory.
        """
        if self._cached is None or self._cached[0] != parts:
            fd, real = self.open_dir(parts, create=create, fail=fail)
            self.invalidate()
            self._cached = (parts, fd, real)
        fd = os.dup(self._cached[1])
        try:
            yield fd, self._cached[2]
        finally:
            os.close(fd)


class _LayerApplier:
    """State for one layer: what it wrote (for opaque dirs) and deferred dir mtimes."""

    def __init__(self, builder: RootfsBuilder, name: str):
        self.b = builder
        self.name = name
        self.written: set[Parts] = set()
        self.dir_times: dict[Parts, int] = {}
        self.entry = ""

    def fail(self, why: str) -> LayerError:
        return LayerError(f"layer {self.name}: entry {self.entry!r}: {why}")

    def run(self, src: TarInput, *, require_end_marker: bool) -> int:
        count = 0
        for tf, member in iter_tar(
            src, what=f"layer {self.name}", error=LayerError, require_end_marker=require_end_marker
        ):
            self.entry = member.name
            self.b.budget.entry(self.fail)
            try:
                self.apply_member(tf, member)
            except tarfile.TarError as e:
                raise self.fail(f"corrupt tar data: {e}") from e
            except OSError as e:
                raise self.fail(f"{e.strerror or e}") from e
            count += 1
        self.entry = ""
        self.finish_dirs()
        return count

    # -- entries -------------------------------------------------------------

    def apply_member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        if "\0" in m.name or "\0" in (m.linkname or ""):
            raise self.fail("name contains a NUL byte")
        parts = _clean(m.name)
        if parts is None:
            raise self.fail("path escapes the root (../)")
        for comp in parts:
            if len(os.fsencode(comp)) > NAME_MAX:
                raise self.fail(f"file name longer than {NAME_MAX} bytes")
        if not parts:
            if not m.isdir():
                raise self.fail("the root entry must be a directory")
            self.set_dir_meta(self.b._root_fd, m, ())
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self.whiteout(parts)
            return
        with self.b.dir_fd(parts[:-1], create=True, fail=self.fail) as (pfd, preal):
            path = (*preal, base)
            for i in range(1, len(path) + 1):
                self.written.add(path[:i])
            if m.islnk():
                self.hardlink(m, pfd, base, path)
                return
            self.dir_times.pop(path, None)
            existing = _lstat(base, pfd)
            if existing is not None and not (m.isdir() and stat.S_ISDIR(existing.st_mode)):
                self.remove(base, pfd, existing)
            if m.isreg():
                self.regular(tf, m, pfd, base)
            elif m.isdir():
                if existing is None or not stat.S_ISDIR(existing.st_mode):
                    os.mkdir(base, 0o700, dir_fd=pfd)
                fd = os.open(
                    base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd
                )
                try:
                    self.set_dir_meta(fd, m, path)
                finally:
                    os.close(fd)
            elif m.issym():
                os.symlink(m.linkname, base, dir_fd=pfd)
                self.set_meta_nofollow(pfd, base, m, symlink=True)
            elif m.ischr() or m.isblk():
                if not self.b.privileged:
                    self.b.warn_once(
                        "mknod", "not running as root: device nodes in the image are skipped"
                    )
                    return
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                os.mknod(base, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
                self.set_meta_nofollow(pfd, base, m, symlink=False)
            elif m.isfifo():
                os.mkfifo(base, 0o600, dir_fd=pfd)
                self.set_meta_nofollow(pfd, base, m, symlink=False)
            else:
                raise self.fail(f"unsupported tar entry type {m.type!r}")

    def regular(self, tf: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, base: str) -> None:
        fd = os.open(
            base,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=pfd,
        )
        try:
            data = tf.extractfile(m)
            written = 0
            if data is not None:
                while chunk := data.read(_COPY_CHUNK):
                    self.b.budget.add(len(chunk), fd, self.fail)
                    if chunk.count(0) == len(chunk):
                        os.lseek(fd, len(chunk), os.SEEK_CUR)  # leave a hole
                    else:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                    written += len(chunk)
            if written != m.size:
                raise self.fail(f"truncated file data ({written} of {m.size} bytes)")
            os.ftruncate(fd, m.size)
            self.chown(fd, m)
            os.chmod(fd, m.mode & 0o7777)
            self.set_xattrs(fd, m)
            os.utime(fd, ns=(_ns(m.mtime), _ns(m.mtime)))
        finally:
            os.close(fd)

    def hardlink(self, m: tarfile.TarInfo, pfd: int, base: str, path: Parts) -> None:
        target = _clean(m.linkname)
        if target is None or not target:
            raise self.fail(f"hard link target {m.linkname!r} escapes the root")
        try:
            with self.b.dir_fd(target[:-1], create=False, fail=self.fail) as (tfd, treal):
                tst = _lstat(target[-1], tfd)
                if tst is None:
                    raise self.fail(f"hard link target {m.linkname!r} does not exist")
                if stat.S_ISDIR(tst.st_mode):
                    raise self.fail(f"hard link target {m.linkname!r} is a directory")
                if (*treal, target[-1]) == path:
                    return
                existing = _lstat(base, pfd)
                if existing is not None:
                    if (existing.st_dev, existing.st_ino) == (tst.st_dev, tst.st_ino):
                        return
                    self.remove(base, pfd, existing)
                self.dir_times.pop(path, None)
                # linkat() without AT_SYMLINK_FOLLOW: a symlink target is linked, not followed.
                os.link(target[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError as e:
            raise self.fail(f"hard link target {m.linkname!r} does not exist") from e

    def whiteout(self, parts: Parts) -> None:
        base = parts[-1]
        try:
            with self.b.dir_fd(parts[:-1], create=False, fail=self.fail) as (pfd, preal):
                if base == OPAQUE_MARKER:
                    self.clear_lower(pfd, preal)
                    return
                if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                    return  # aufs bookkeeping (.wh..wh.plnk etc.), not content
                victim = base[len(WHITEOUT_PREFIX) :]
                if victim in ("", ".", ".."):
                    raise self.fail("malformed whiteout")
                if (*preal, victim) in self.written:
                    return  # whiteouts hide lower layers only
                st = _lstat(victim, pfd)
                if st is not None:
                    self.remove(victim, pfd, st)
                    self.forget_below((*preal, victim))
        except FileNotFoundError:
            return  # nothing below to hide

    def clear_lower(self, dfd: int, dpath: Parts) -> None:
        """Opaque directory: remove what lower layers put below ``dpath``."""
        for child in os.listdir(dfd):
            cpath = (*dpath, child)
            st = _lstat(child, dfd)
            if st is None:
                continue
            if cpath not in self.written:
                self.remove(child, dfd, st)
                self.forget_below(cpath)
            elif stat.S_ISDIR(st.st_mode):
                fd = os.open(
                    child, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd
                )
                try:
                    self.clear_lower(fd, cpath)
                finally:
                    os.close(fd)

    def remove(self, name: str, dir_fd: int, st: os.stat_result) -> None:
        self.b.invalidate()
        _remove(name, dir_fd, st)

    def forget_below(self, path: Parts) -> None:
        n = len(path)
        for p in [p for p in self.dir_times if p[:n] == path]:
            del self.dir_times[p]

    # -- metadata ------------------------------------------------------------

    def chown(self, target: int | str, m: tarfile.TarInfo, *, dir_fd: int | None = None) -> None:
        if not self.b.privileged:
            if m.uid != os.geteuid() or m.gid != os.getegid():
                self.b.warn_once(
                    "chown", "not running as root: file ownership from the image is not kept"
                )
            return
        if isinstance(target, int):
            os.chown(target, m.uid, m.gid)
        else:
            os.chown(target, m.uid, m.gid, dir_fd=dir_fd, follow_symlinks=False)

    def set_xattrs(self, target: int | str, m: tarfile.TarInfo, dir_fd: int | None = None) -> None:
        for key, value in _xattrs(m).items():
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    # No dir_fd for *xattr: go through /proc/self/fd of the parent, never
                    # following the final component.
                    os.setxattr(
                        f"/proc/self/fd/{dir_fd}/{target}", key, value, follow_symlinks=False
                    )
            except OSError as e:
                # As Docker does: an xattr the host filesystem or our privileges refuse
                # (EPERM, ENOTSUP, EINVAL for a foreign ACL, ENOSPC...) is a warning.
                self.b.warn_once(
                    f"xattr:{key}:{e.errno}",
                    f"layer {self.name}: cannot set xattr {key} on {self.entry!r} "
                    f"({e.strerror}); skipped",
                )

    def set_dir_meta(self, fd: int, m: tarfile.TarInfo, path: Parts) -> None:
        self.chown(fd, m)
        mode = m.mode & 0o7777
        if not self.b.privileged:
            mode |= 0o700
        os.chmod(fd, mode)
        self.set_xattrs(fd, m)
        self.dir_times[path] = _ns(m.mtime)

    def set_meta_nofollow(self, pfd: int, base: str, m: tarfile.TarInfo, *, symlink: bool) -> None:
        self.chown(base, m, dir_fd=pfd)
        if not symlink:
            _chmod_nofollow(pfd, base, m.mode & 0o7777)
        self.set_xattrs(base, m, dir_fd=pfd)
        t = _ns(m.mtime)
        os.utime(base, ns=(t, t), dir_fd=pfd, follow_symlinks=False)

    def finish_dirs(self) -> None:
        """Set directory mtimes last (creating children changed them), deepest first."""
        for path, t in sorted(self.dir_times.items(), key=lambda kv: -len(kv[0])):
            if not path:
                os.utime(self.b._root_fd, ns=(t, t))
                continue
            try:
                with self.b.dir_fd(path[:-1], create=False, fail=self.fail) as (pfd, _):
                    os.utime(path[-1], ns=(t, t), dir_fd=pfd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError, LayerError):
                continue
        self.dir_times.clear()


def _ns(mtime: float) -> int:
    return round(float(mtime) * 1_000_000_000)


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _remove(name: str, dir_fd: int, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _chmod_nofollow(dir_fd: int, name: str, mode: int) -> None:
    """chmod a non-symlink without following a symlink (Linux has no lchmod)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            return
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def apply_layers(
    root: Path,
    layers: Sequence[tuple[Path, str, str | None]],
    *,
    warn: Callable[[str], None] | None = None,
    on_layer: Callable[[int, LayerResult], None] | None = None,
) -> list[LayerResult]:
    """Apply ``(blob path, name, expected diff id)`` layers in order into ``root``."""
    results = []
    with RootfsBuilder(root, warn=warn) as builder:
        for i, (path, name, diff_id) in enumerate(layers):
            with open(path, "rb") as f:
                result = builder.apply(f, name=name, expected_diff_id=diff_id)
            results.append(result)
            if on_layer:
                on_layer(i, result)
    return results
