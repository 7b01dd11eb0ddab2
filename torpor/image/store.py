"""The local image store: pulled and imported images, unpacked to ext4 disks.

Role: the public face of the image domain.  :class:`ImageStore` pulls,
imports, lists, finds, tags and removes images; an :class:`Image` is what the
VM side needs (``disk_path``, ``config``).

On disk (under :class:`~torpor.paths.Paths`)::

    blobs/sha256/<hex>         manifests, configs, layers (content addressed)
    images/<id>/rootfs.ext4    the read-only base disk (mode 0444, sparse)
    images/<id>/image.json     {"schema_version": 1, ...} - metadata, written once
    images/refs.json           {"schema_version": 1, "refs": {canonical ref: id}}
    images/.bases/             snapshots' base disks by content digest (not images:
                               never listed or removed here; torpor.snapshot.base)
    tmp/image-<pid>-<rand>/    staging for one build or removal (flock-ed by its owner)
    locks/images.lock          serialises refs.json and moves into images/

Invariants:

* An image id is the sha256 hex of its config blob (Docker's image id); an
  image is stored once per id, whatever names point at it.
* ``images/<id>`` appears atomically: layers are unpacked, the disk built and
  ``image.json`` written inside a staging directory, which is then renamed
  into place under the lock.  If the id already exists only the names are
  added.  Any failure or interruption (KeyboardInterrupt included) removes the
  staging directory; ones left by a killed process (their flock is free and
  their pid dead, or they are older than a minute) are removed by the next
  store operation, as are partial blob downloads.
* ``refs.json`` is the only record of names; it is rewritten atomically under
  ``locks/images.lock``.  Tag references (``repo:tag``) and digest references
  (``repo@sha256:...``) share it; an image with no reference left is deleted
  by :meth:`ImageStore.remove`, never implicitly.
* Both JSON files carry ``schema_version``; an unknown major version is
  refused with ImageError rather than misread.

Progress events (``progress(event, done, total)``, bytes; total 0 = unknown):
``"Downloading <digest12>"``, ``"Reading <file>"``, ``"Extracting layer i/n"``,
``"Building disk"``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from torpor.errors import ConflictError, ImageError, NotFoundError, UsageError
from torpor.fsutil import atomic_write_json, fsync_dir, locked, read_json
from torpor.image.blobs import BlobStore, ProgressFn, owner_alive
from torpor.image.config import ImageConfig
from torpor.image.ext4 import DEFAULT_DISK_SIZE, LABEL, build_ext4, scan_tree
from torpor.image.manifest import ResolvedImage, parse_config_blob
from torpor.image.reference import Reference, parse_reference
from torpor.paths import Paths

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STAGING_PREFIX = "image-"
DISK_FILE = "rootfs.ext4"
META_FILE = "image.json"
REFS_FILE = "refs.json"
_ID_RE = re.compile(r"[0-9a-f]{64}")
_PREFIX_RE = re.compile(r"[0-9a-f]{4,64}")
MIN_PREFIX = 4


@dataclass(frozen=True)
class Image:
    """One stored image."""

    id: str  # sha256 hex of the config blob
    repo_tags: tuple[str, ...]  # familiar form, e.g. "tools:latest"
    repo_digests: tuple[str, ...]  # familiar form, e.g. "localhost:5000/tools@sha256:..."
    created: datetime | None
    size: int  # apparent bytes of the unpacked root filesystem
    disk_path: Path  # images/<id>/rootfs.ext4
    config: ImageConfig
    manifest_digest: str | None
    layers: tuple[str, ...]  # diff ids, bottom first

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def digest(self) -> str:
        """The config digest, ``sha256:<id>``."""
        return f"sha256:{self.id}"

    @property
    def name(self) -> str:
        """The first tag, or the short id for an untagged image."""
        return self.repo_tags[0] if self.repo_tags else self.short_id


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _check_schema(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ImageError(f"{path} is not a JSON object", path=path)
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ImageError(
            f"{path} has schema_version {version!r}; this torpor reads {SCHEMA_VERSION} "
            "(written by a newer or incompatible torpor?)",
            path=path,
        )
    return obj


def _rmtree(path: Path) -> None:
    """Remove a tree we own, even one holding read-only directories."""

    def onerror(func: Any, p: str, exc_info: Any) -> None:
        exc = exc_info[1]
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError):
            parent = os.path.dirname(p)
            with contextlib.suppress(OSError):
                os.chmod(parent, stat.S_IRWXU)
                if os.path.isdir(p) and not os.path.islink(p):
                    os.chmod(p, stat.S_IRWXU)
            func(p)
            return
        raise exc

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=onerror)


class ImageStore:
    """Images under ``paths`` (see the module docstring for the layout and invariants).

    ``in_use(image_id) -> bool`` tells :meth:`remove` whether a VM still uses
    an image; ``disk_size`` is the virtual size of new base disks.
    """

    def __init__(
        self,
        paths: Paths,
        *,
        disk_size: int = DEFAULT_DISK_SIZE,
        in_use: Callable[[str], bool] | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.paths = paths
        self.disk_size = disk_size
        self._in_use = in_use
        self._warn = warn
        self.blobs = BlobStore(paths.blobs)

    # -- locking, staging, housekeeping ------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with locked(self.paths.locks / "images.lock"):
            yield

    @contextlib.contextmanager
    def _staging(self) -> Iterator[Path]:
        """A private directory under ``tmp/``, removed whatever happens."""
        self.paths.tmp.mkdir(parents=True, exist_ok=True)
        d = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.paths.tmp))
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # tells _clean_stale() that we are alive
            yield d
        finally:
            try:
                _rmtree(d)
            finally:
                os.close(fd)

    def _clean_stale(self) -> None:
        """Remove staging dirs and partial blobs of killed processes.  Caller holds the lock."""
        try:
            names = os.listdir(self.paths.tmp)
        except FileNotFoundError:
            names = []
        for name in names:
            if not name.startswith(STAGING_PREFIX):
                continue
            d = self.paths.tmp / name
            try:
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its owner is at work
                if owner_alive(name[len(STAGING_PREFIX) :], os.fstat(fd).st_mtime):
                    continue  # created an instant ago, flock not taken yet
                log.info("removing stale staging directory %s", d)
                _rmtree(d)
            finally:
                os.close(fd)
        self.blobs.clean_stale()

    # -- metadata ------------------------------------------------------------

    @property
    def _refs_path(self) -> Path:
        return self.paths.images / REFS_FILE

    def _read_refs(self) -> dict[str, str]:
        try:
            obj = read_json(self._refs_path)
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise ImageError(f"{self._refs_path} is corrupt: {e}", path=self._refs_path) from e
        refs = _check_schema(obj, self._refs_path).get("refs", {})
        if not isinstance(refs, dict):
            raise ImageError(f"{self._refs_path}: refs is not an object", path=self._refs_path)
        return {str(k): str(v) for k, v in refs.items()}

    def _write_refs(self, refs: dict[str, str]) -> None:
        atomic_write_json(
            self._refs_path, {"schema_version": SCHEMA_VERSION, "refs": dict(sorted(refs.items()))}
        )

    def _ids(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.paths.images) if _ID_RE.fullmatch(n)]
        except FileNotFoundError:
            return []

    def _load(self, image_id: str, refs: dict[str, str]) -> Image:
        d = self.paths.images / image_id
        meta_path = d / META_FILE
        try:
            meta = _check_schema(read_json(meta_path), meta_path)
        except FileNotFoundError as e:
            raise NotFoundError(f"no such image: {image_id}", path=d) from e
        except ValueError as e:
            raise ImageError(f"{meta_path} is corrupt: {e}", path=meta_path) from e
        raw_config = meta.get("config") or {}
        tags: list[str] = []
        digests: list[str] = []
        for key, value in refs.items():
            if value != image_id:
                continue
            ref = parse_reference(key)
            (digests if ref.digest else tags).append(ref.familiar)
        return Image(
            id=image_id,
            repo_tags=tuple(sorted(tags)),
            repo_digests=tuple(sorted(digests)),
            created=_parse_time(meta.get("created")),
            size=int(meta.get("size", 0)),
            disk_path=d / DISK_FILE,
            config=ImageConfig.from_json(raw_config),
            manifest_digest=meta.get("manifest_digest"),
            layers=tuple(meta.get("diff_ids", ())),
        )

    # -- lookups ---------------------------------------------------------------

    @staticmethod
    def _ref_key(ref: Reference) -> str:
        if ref.digest:
            return str(Reference(ref.registry, ref.repository, None, ref.digest))
        return str(ref)

    def _find(self, name_or_id: str, refs: dict[str, str]) -> tuple[str, str | None]:
        """(image id, the refs.json key it was found by, or None if found by id)."""
        text = name_or_id.strip()
        if text.startswith("sha256:"):
            return self._find_id(text[len("sha256:") :], text), None
        try:
            ref = parse_reference(text)
        except UsageError:
            ref = None
        if ref is not None:
            key = self._ref_key(ref)
            if key in refs:
                return refs[key], key
        if _PREFIX_RE.fullmatch(text):
            return self._find_id(text, text), None
        raise NotFoundError(f"no such image: {text}")

    def _find_id(self, prefix: str, shown: str) -> str:
        if not _PREFIX_RE.fullmatch(prefix):
            raise NotFoundError(
                f"no such image: {shown} (ids are at least {MIN_PREFIX} hex digits)"
            )
        matches = [i for i in self._ids() if i.startswith(prefix)]
        if not matches:
            raise NotFoundError(f"no such image: {shown}")
        if len(matches) > 1:
            listing = ", ".join(m[:12] for m in sorted(matches))
            raise ConflictError(f"image id prefix {shown} is ambiguous: {listing}")
        return matches[0]

    def list(self) -> list[Image]:
        """All images, newest first."""
        with self._lock():
            self._clean_stale()
            refs = self._read_refs()
            images = []
            for image_id in self._ids():
                try:
                    images.append(self._load(image_id, refs))
                except (ImageError, NotFoundError) as e:
                    log.warning("skipping unreadable image %s: %s", image_id, e)
        epoch = datetime.min.replace(tzinfo=UTC)

        def key(i: Image) -> tuple[datetime, str]:
            created = i.created or epoch
            if created.tzinfo is None:
                created = created.replace(tzinfo=UTC)
            return created, i.id

        return sorted(images, key=key, reverse=True)

    def get(self, name_or_id: str) -> Image:
        """By ``repo:tag`` (any form Docker accepts), ``repo@digest``, or id / id prefix.

        Raises NotFoundError if nothing matches, ConflictError for an ambiguous prefix.
        """
        with self._lock():
            self._clean_stale()
            refs = self._read_refs()
            image_id, _ = self._find(name_or_id, refs)
            return self._load(image_id, refs)

    # -- pull / import ---------------------------------------------------------

    def pull(
        self,
        ref: str,
        progress: ProgressFn | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        insecure: bool = False,
    ) -> Image:
        """Pull ``ref`` from its registry and store it (see :mod:`torpor.image.registry`).

        A reference by digest that is already stored is not fetched again.
        Raises UsageError (bad reference), NotFoundError, RegistryError,
        DigestMismatchError, LayerError, ImageError.
        """
        reference = parse_reference(ref)
        with self._lock():
            self._clean_stale()
            if reference.digest:
                refs = self._read_refs()
                key = self._ref_key(reference)
                if key in refs and (self.paths.images / refs[key]).is_dir():
                    return self._load(refs[key], refs)
        from torpor.image import registry  # httpx (and its CLI's rich, click): ~0.1 s to import

        resolved = registry.pull(
            reference,
            self.blobs,
            progress=progress,
            username=username,
            password=password,
            insecure=insecure,
        )
        assert resolved.manifest_digest is not None  # registries always name a manifest
        names = [reference.with_digest(resolved.manifest_digest)]
        if reference.tag and not reference.digest:
            names.insert(0, reference)
        with self._staging() as staging:
            return self._install(
                staging,
                resolved,
                names,
                source=str(reference),
                sources=self.blobs,
                progress=progress,
            )

    def import_archive(
        self,
        path: str | os.PathLike[str],
        repository_tag: str | None = None,
        progress: ProgressFn | None = None,
        *,
        cmd: list[str] | None = None,
    ) -> Image:
        """Import a ``docker save`` tarball, an OCI layout (tarball or directory) or a
        plain root filesystem tarball (see :mod:`torpor.image.archive`).

        ``repository_tag`` names the image (and picks it in a multi-image
        archive); without it the names recorded in the archive are used.
        ``cmd`` is the Cmd of an image made from a plain rootfs tarball.
        Raises NotFoundError, UsageError, ImageError (LayerError, DigestMismatchError).
        """
        select = parse_reference(repository_tag) if repository_tag else None
        if select is not None and select.digest:
            raise UsageError(f"cannot name an imported image with a digest: {repository_tag}")
        with self._lock():
            self._clean_stale()
        path = Path(path).absolute()
        with self._staging() as staging:
            staged = BlobStore(staging / "blobs")
            from torpor.image.archive import read_archive

            archive = read_archive(path, staged, select=select, progress=progress)
            names = [select] if select is not None else list(archive.names)
            if archive.resolved is None:
                assert archive.rootfs_layer is not None
                return self._install(
                    staging,
                    None,
                    names,
                    source=str(path),
                    sources=staged,
                    keep=archive.keep,
                    rootfs_layer=archive.rootfs_layer,
                    cmd=cmd,
                    progress=progress,
                )
            return self._install(
                staging,
                archive.resolved,
                names,
                source=str(path),
                sources=staged,
                keep=archive.keep,
                progress=progress,
            )

    def _install(
        self,
        staging: Path,
        resolved: ResolvedImage | None,
        names: list[Reference],
        *,
        source: str,
        sources: BlobStore,
        keep: tuple[str, ...] = (),
        rootfs_layer: str | None = None,
        cmd: list[str] | None = None,
        progress: ProgressFn | None = None,
    ) -> Image:
        """Unpack, build the disk, and move the result into ``images/`` (or just tag)."""
        if resolved is not None:
            ImageConfig.from_json(resolved.config)  # refuse a malformed config before the work
            existing = self._commit_existing(resolved.config_digest[7:], names, sources, keep)
            if existing is not None:
                return existing
        rootfs = staging / "rootfs"
        rootfs.mkdir()
        layer_digests = resolved.layer_digests if resolved else (rootfs_layer or "",)
        diff_ids: tuple[str | None, ...] = resolved.diff_ids if resolved else (None,)
        n = len(layer_digests)
        from torpor.image.archive import rootfs_config
        from torpor.image.layers import RootfsBuilder

        with RootfsBuilder(rootfs, warn=self._warn) as builder:
            for i, (digest, diff_id) in enumerate(zip(layer_digests, diff_ids, strict=True), 1):
                label = f"Extracting layer {i}/{n}"
                path = sources.path(digest)
                with open(path, "rb") as f:
                    reader = _ProgressReader(f, label, os.fstat(f.fileno()).st_size, progress)
                    result = builder.apply(
                        reader, name=f"{i}/{n} ({digest})", expected_diff_id=diff_id
                    )
        if resolved is None:
            config_bytes = rootfs_config(
                result.diff_id, cmd=cmd, created=_now(), source=f"imported from {source}"
            )
            config_digest = sources.put_bytes(config_bytes)
            resolved = ResolvedImage.build(
                config_digest=config_digest,
                config=parse_config_blob(config_bytes, what=source),
                layer_digests=layer_digests,
                manifest_digest=None,
                what=source,
            )
            keep = (*keep, config_digest)
            existing = self._commit_existing(config_digest[7:], names, sources, keep)
            if existing is not None:
                return existing
        image_id = resolved.config_digest[7:]

        if progress:
            progress("Building disk", 0, 0)
        stats = scan_tree(rootfs)
        out = staging / "image"
        out.mkdir()
        disk = build_ext4(rootfs, out / DISK_FILE, size=self.disk_size, stats=stats)
        _rmtree(rootfs)
        if progress:
            progress("Building disk", 1, 1)
        atomic_write_json(
            out / META_FILE,
            {
                "schema_version": SCHEMA_VERSION,
                "id": image_id,
                "config_digest": resolved.config_digest,
                "manifest_digest": resolved.manifest_digest,
                "diff_ids": list(resolved.diff_ids),
                "layer_blobs": list(resolved.layer_digests),
                "created": resolved.config.get("created"),
                "size": stats.apparent_bytes,
                "entries": stats.entries,
                "disk": {
                    "file": DISK_FILE,
                    "virtual_size": disk.virtual_size,
                    "inodes": disk.inodes,
                    "label": LABEL,
                    "fs": "ext4",
                },
                "config": dict(resolved.config),
                "source": source,
                "stored_at": _now(),
            },
        )
        with self._lock():
            self._keep_blobs(sources, keep)
            final = self.paths.images / image_id
            if not final.exists():
                self.paths.images.mkdir(parents=True, exist_ok=True)
                os.rename(out, final)
                fsync_dir(self.paths.images)
            refs = self._read_refs()
            self._add_refs(refs, image_id, names)
            return self._load(image_id, refs)

    def _commit_existing(
        self, image_id: str, names: list[Reference], sources: BlobStore, keep: tuple[str, ...]
    ) -> Image | None:
        with self._lock():
            if not (self.paths.images / image_id / META_FILE).is_file():
                return None
            self._keep_blobs(sources, keep)
            refs = self._read_refs()
            self._add_refs(refs, image_id, names)
            return self._load(image_id, refs)

    def _keep_blobs(self, sources: BlobStore, keep: tuple[str, ...]) -> None:
        if sources.root == self.blobs.root:
            return
        for digest in keep:
            if sources.has(digest):
                self.blobs.move_from(sources, digest)

    def _add_refs(self, refs: dict[str, str], image_id: str, names: list[Reference]) -> None:
        changed = False
        for ref in names:
            key = self._ref_key(ref)
            if refs.get(key) != image_id:
                refs[key] = image_id
                changed = True
        if changed:
            self._write_refs(refs)

    # -- names -----------------------------------------------------------------

    def tag(self, image: Image | str, ref: str) -> Image:
        """Point ``ref`` (``repo[:tag]``) at ``image``; the tag moves if it was elsewhere."""
        target = parse_reference(ref)
        if target.digest:
            raise UsageError(f"cannot tag with a digest reference: {ref}")
        with self._lock():
            refs = self._read_refs()
            if isinstance(image, Image):
                image_id = image.id
                if not (self.paths.images / image_id).is_dir():
                    raise NotFoundError(f"no such image: {image.id[:12]}")
            else:
                image_id, _ = self._find(image, refs)
            self._add_refs(refs, image_id, [target])
            return self._load(image_id, refs)

    def remove(
        self,
        name_or_id: str,
        force: bool = False,
        in_use: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """Remove a name, and the image once no name is left; return what was done.

        By name: that tag goes (with the repository's digest references when it
        was the repository's last tag); the image goes if nothing names it.
        By id: every name and the image go; an image with several tags needs
        ``force``.  Deleting an image a VM uses (``in_use``) needs ``force``.
        Raises NotFoundError, ConflictError.
        """
        in_use = in_use or self._in_use
        done: list[str] = []
        with self._lock():
            self._clean_stale()
            refs = self._read_refs()
            image_id, key = self._find(name_or_id, refs)
            names = [k for k, v in refs.items() if v == image_id]
            if key is not None:
                drop = [key]
                ref = parse_reference(key)
                rest = [parse_reference(k) for k in names if k != key]
                if ref.tag and not any(r.tag and r.name == ref.name for r in rest):
                    drop += [str(r) for r in rest if r.digest and r.name == ref.name]
            else:
                tags = [parse_reference(k) for k in names if not parse_reference(k).digest]
                if len({t.name for t in tags}) > 1 and not force:
                    shown = ", ".join(t.familiar for t in tags)
                    raise ConflictError(
                        f"image {image_id[:12]} is named in several repositories ({shown}); "
                        "remove the names one by one, or force"
                    )
                drop = names
            delete = not [k for k in names if k not in drop]
            if delete and not force and in_use is not None and in_use(image_id):
                raise ConflictError(
                    f"image {image_id[:12]} ({name_or_id}) is used by a VM; "
                    "remove the VM first or force"
                )
            for k in drop:
                del refs[k]
                done.append(f"Untagged: {parse_reference(k).familiar}")
            self._write_refs(refs)
            doomed: Path | None = None
            if delete:
                self.paths.tmp.mkdir(parents=True, exist_ok=True)
                doomed = Path(
                    tempfile.mkdtemp(
                        prefix=f"{STAGING_PREFIX}{os.getpid()}-rm-", dir=self.paths.tmp
                    )
                )
                try:
                    os.rename(self.paths.images / image_id, doomed / image_id)
                except FileNotFoundError:
                    pass
                except OSError:
                    _rmtree(doomed)
                    raise
                fsync_dir(self.paths.images)
                done.append(f"Deleted: sha256:{image_id}")
        if doomed is not None:
            _rmtree(doomed)
        return done


class _ProgressReader:
    def __init__(self, f: Any, label: str, total: int, progress: ProgressFn | None):
        self._f = f
        self._label = label
        self._total = total
        self._progress = progress
        self._done = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data and self._progress:
            self._done += len(data)
            self._progress(self._label, self._done, self._total)
        return data
