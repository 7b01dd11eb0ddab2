"""Read the things ``torpor import PATH`` accepts into a staging blob store.

Role: recognise and unpack, without trusting names or sizes:

(a) ``docker save`` tarballs: ``manifest.json`` with ``Config``/``RepoTags``/
    ``Layers``, in the legacy layout (``<id>/layer.tar``, ``<hex>.json``,
    symlinks for repeated layers) and the Docker 25+ layout (``blobs/sha256``);
(b) OCI image layouts, as a tarball or a directory (``oci-layout``,
    ``index.json``, ``blobs/sha256``); the manifest is chosen by its
    ``org.opencontainers.image.ref.name`` annotation, or is the only one;
    a nested index is narrowed to ``linux/amd64``;
(c) anything else that is a tarball is a plain root filesystem, as
    ``docker import`` takes it: one layer, config made by the caller.

The archive itself may be uncompressed, gzip, zstd, xz or bzip2 (magic bytes).

Invariants:

* Everything is read in one streaming pass; archive members are never
  extracted to paths of their own choosing: ``blobs/sha256/<hex>`` members are
  hashed into a :class:`~torpor.image.blobs.BlobStore` in the caller's
  staging directory and must match their name; other layer files are stored
  under their computed digest; small JSON documents are kept in memory.
* The first member outside the docker-save/OCI vocabulary (top-level
  ``manifest.json``, ``repositories``, ``oci-layout``, ``index.json``,
  ``blobs/``, ``<64 hex>/``, ``<64 hex>.json``) makes it a plain rootfs.
* Config bytes hash to the config digest; layers are checked against the
  config's ``rootfs.diff_ids`` when unpacked (docker-save layers have no
  other digest).  Truncated or corrupt input raises ImageError; the caller
  removes the staging directory, so nothing half-written remains.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torpor.errors import DigestMismatchError, ImageError, NotFoundError, UsageError
from torpor.image.blobs import BlobStore, ProgressFn, check_digest, open_decompressed, sha256_digest
from torpor.image.layers import TarInput, iter_tar
from torpor.image.manifest import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    INDEX_TYPES,
    Descriptor,
    Index,
    Manifest,
    ResolvedImage,
    parse_config_blob,
    parse_document,
    select_platform,
)
from torpor.image.reference import Reference, parse_reference

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SMALL_MAX = 16 << 20
_SMALL_NAMES = ("manifest.json", "repositories", "oci-layout", "index.json")
_MAX_LINK_HOPS = 16


@dataclass(frozen=True)
class ArchiveImage:
    """What an archive holds, with its blobs in the staging store.

    Either ``resolved`` (docker-save / OCI) or ``rootfs_layer`` (plain rootfs
    tarball: the digest of the tarball itself, a layer without a config) is set.
    ``names`` are the references the archive records; ``keep`` the digests
    worth moving into the real blob store.
    """

    kind: str  # "docker-save", "oci-archive", "oci-dir", "rootfs"
    resolved: ResolvedImage | None = None
    rootfs_layer: str | None = None
    names: tuple[Reference, ...] = ()
    keep: tuple[str, ...] = field(default=())


def read_archive(
    path: Path,
    staging: BlobStore,
    *,
    select: Reference | None = None,
    progress: ProgressFn | None = None,
) -> ArchiveImage:
    """Identify ``path`` and bring its blobs into ``staging``, verified.

    ``select`` picks one image out of an archive that holds several (and is
    compared with ``RepoTags`` / ref-name annotations).  Raises NotFoundError
    if ``path`` does not exist, UsageError if the choice is ambiguous,
    ImageError/DigestMismatchError for corrupt content.
    """
    path = Path(path)
    if path.is_dir():
        return _read_oci_dir(path, staging, select)
    if not path.exists():
        raise NotFoundError(f"no such file: {path}", path=path)
    scan = _scan_tar(path, staging, progress)
    if scan is None:
        digest = _ingest_file(path, staging, progress)
        return ArchiveImage(kind="rootfs", rootfs_layer=digest, keep=(digest,))
    if "manifest.json" in scan.files:
        return _docker_save(path, scan, staging, select)
    return _oci(f"OCI archive {path}", "oci-archive", _TarBlobs(scan, staging), select)


# ---------------------------------------------------------------------------
# the streaming pass


@dataclass
class _Scan:
    files: dict[str, bytes] = field(default_factory=dict)  # small documents
    digests: dict[str, str] = field(default_factory=dict)  # member name -> blob digest
    links: dict[str, str] = field(default_factory=dict)  # member name -> target member name

    def resolve(self, name: str) -> str:
        for _ in range(_MAX_LINK_HOPS):
            if name not in self.links:
                return name
            name = self.links[name]
        raise ImageError(f"archive member {name!r}: too many levels of links")


def _norm(name: str) -> str | None:
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(comp)
    return "/".join(parts)


def _archive_like(name: str) -> bool:
    top = name.split("/", 1)[0]
    if top in ("", *_SMALL_NAMES, "blobs"):
        return True
    return bool(_HEX64.fullmatch(top) or (top.endswith(".json") and _HEX64.fullmatch(top[:-5])))


class _Counting:
    def __init__(self, f: Any, label: str, total: int, progress: ProgressFn | None):
        self._f = f
        self._label = label
        self._total = total
        self._progress = progress
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.count += len(data)
        if self._progress and data:
            self._progress(self._label, self.count, self._total)
        return data


def _scan_tar(path: Path, staging: BlobStore, progress: ProgressFn | None) -> _Scan | None:
    """One pass over a tarball; ``None`` if it turns out to be a plain rootfs."""
    what = f"archive {path}"
    try:
        return _scan_members(path, what, staging, progress)
    except tarfile.TarError as e:
        raise ImageError(f"{what}: corrupt or truncated tar data ({e})") from e


def _scan_members(
    path: Path, what: str, staging: BlobStore, progress: ProgressFn | None
) -> _Scan | None:
    scan = _Scan()
    with open(path, "rb") as f:
        raw = _Counting(f, f"Reading {path.name}", os.fstat(f.fileno()).st_size, progress)
        plain, _ = open_decompressed(raw, what=what)
        src = TarInput(plain)
        for tf, m in iter_tar(src, what=what, error=ImageError, require_end_marker=True):
            name = _norm(m.name)
            if name is None:
                raise ImageError(f"{what}: member {m.name!r} escapes the archive root")
            if not _archive_like(name):
                return None
            if m.issym() or m.islnk():
                base = name.rsplit("/", 1)[0] if "/" in name and m.issym() else ""
                target = _norm(f"{base}/{m.linkname}" if m.issym() else m.linkname)
                if target is not None:
                    scan.links[name] = target
                continue
            if not m.isreg():
                continue
            data = tf.extractfile(m)
            assert data is not None
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == "blobs" and parts[1] == "sha256":
                if not _HEX64.fullmatch(parts[2]):
                    raise ImageError(f"{what}: malformed blob name {name!r}")
                scan.digests[name] = staging.ingest(
                    data, expected=f"sha256:{parts[2]}", size=m.size, what=f"{what}: {name}"
                )
            elif (name in _SMALL_NAMES or name.endswith((".json", "/json"))) and (
                m.size <= _SMALL_MAX
            ):
                body = data.read()
                if len(body) != m.size:
                    raise ImageError(f"{what}: member {name!r} is truncated")
                scan.files[name] = body
            elif name.endswith("/layer.tar") or name.startswith("blobs/"):
                scan.digests[name] = staging.ingest(data, size=m.size, what=f"{what}: {name}")
    if "manifest.json" not in scan.files and "index.json" not in scan.files:
        return None  # only archive-like names, but no metadata: a rootfs after all
    return scan


def _ingest_file(path: Path, staging: BlobStore, progress: ProgressFn | None) -> str:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = _Counting(f, f"Reading {path.name}", size, progress)
        return staging.ingest(raw, size=size, what=f"rootfs tarball {path}")


def _json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what}: invalid JSON: {e}") from e


def _parse_names(values: Any, what: str) -> tuple[Reference, ...]:
    out = []
    for v in values if isinstance(values, list) else []:
        try:
            out.append(parse_reference(str(v)))
        except UsageError as e:
            raise ImageError(f"{what}: bad image name {v!r} in the archive") from e
    return tuple(out)


def _same_name(a: Reference, b: Reference) -> bool:
    return a.name == b.name and a.tag == b.tag


# ---------------------------------------------------------------------------
# docker save


def _docker_save(
    path: Path, scan: _Scan, staging: BlobStore, select: Reference | None
) -> ArchiveImage:
    what = f"docker-save archive {path}"
    entries = _json(scan.files["manifest.json"], f"{what}: manifest.json")
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) for e in entries)
    ):
        raise ImageError(f"{what}: manifest.json is not a list of images")
    named = [(e, _parse_names(e.get("RepoTags"), what)) for e in entries]
    if len(named) > 1:
        if select is None:
            listing = ", ".join(n.familiar for _, ns in named for n in ns) or "untagged images"
            raise UsageError(
                f"{what} holds {len(named)} images ({listing}); name the one to import"
            )
        named = [(e, ns) for e, ns in named if any(_same_name(n, select) for n in ns)]
        if len(named) != 1:
            raise NotFoundError(f"{what}: no image named {select.familiar} in the archive")
    entry, names = named[0]

    def blob_for(member: object, kind: str) -> str:
        if not isinstance(member, str):
            raise ImageError(f"{what}: manifest.json has a bad {kind} entry {member!r}")
        name = scan.resolve(_norm(member) or "")
        if name in scan.digests:
            return scan.digests[name]
        raise ImageError(f"{what}: {kind} {member!r} is missing from the archive (truncated?)")

    config_name = scan.resolve(_norm(str(entry.get("Config", ""))) or "")
    if config_name in scan.files:
        body = scan.files[config_name]
        digest = sha256_digest(body)
        stem = config_name.rsplit("/", 1)[-1].removesuffix(".json")
        if _HEX64.fullmatch(stem) and digest != f"sha256:{stem}":
            raise DigestMismatchError(f"{what}: config {config_name} hashes to {digest}")
        staging.put_bytes(body, expected=digest)
    else:
        digest = blob_for(entry.get("Config"), "config")
    config = parse_config_blob(staging.read(digest), what=what)
    layers = entry.get("Layers")
    if not isinstance(layers, list):
        raise ImageError(f"{what}: manifest.json entry has no Layers list")
    layer_digests = tuple(blob_for(x, "layer") for x in layers)
    resolved = ResolvedImage.build(
        config_digest=digest,
        config=config,
        layer_digests=layer_digests,
        manifest_digest=_docker25_manifest(scan, staging, digest),
        what=what,
    )
    keep = (digest, *layer_digests)
    if resolved.manifest_digest:
        keep = (resolved.manifest_digest, *keep)
    return ArchiveImage(kind="docker-save", resolved=resolved, names=names, keep=keep)


def _docker25_manifest(scan: _Scan, staging: BlobStore, config_digest: str) -> str | None:
    """Docker 25+ also writes an OCI index: find the manifest for our config in it."""
    body = scan.files.get("index.json")
    if body is None:
        return None
    try:
        index = parse_document(body, what="index.json")
        if not isinstance(index, Index):
            return None
        for d in index.manifests:
            if d.media_type in INDEX_TYPES or not staging.has(d.digest):
                continue
            doc = parse_document(staging.read(d.digest), d.media_type, what=d.digest)
            if isinstance(doc, Manifest) and doc.config.digest == config_digest:
                return d.digest
    except ImageError:
        return None
    return None


# ---------------------------------------------------------------------------
# OCI layouts


class _Blobs:
    """Where an OCI layout's blobs come from; every blob returned is verified."""

    def small(self, name: str) -> bytes | None:
        raise NotImplementedError

    def ensure(self, desc: Descriptor, what: str) -> None:
        raise NotImplementedError

    staging: BlobStore

    def read(self, desc: Descriptor, what: str) -> bytes:
        self.ensure(desc, what)
        return self.staging.read(desc.digest)


class _TarBlobs(_Blobs):
    def __init__(self, scan: _Scan, staging: BlobStore):
        self.scan = scan
        self.staging = staging

    def small(self, name: str) -> bytes | None:
        return self.scan.files.get(name)

    def ensure(self, desc: Descriptor, what: str) -> None:
        if not self.staging.has(desc.digest):
            raise ImageError(f"{what}: blob {desc.digest} is missing from the archive (truncated?)")
        if desc.size >= 0 and not self.staging.has(desc.digest, desc.size):
            raise DigestMismatchError(f"{what}: blob {desc.digest} is not {desc.size} bytes")


class _DirBlobs(_Blobs):
    def __init__(self, root: Path, staging: BlobStore):
        self.root = root
        self.staging = staging

    def small(self, name: str) -> bytes | None:
        p = self.root / name
        try:
            f = _open_regular(p)
        except FileNotFoundError:
            return None
        with f:
            body = f.read(_SMALL_MAX + 1)
        if len(body) > _SMALL_MAX:
            raise ImageError(f"{p} is too large")
        return body

    def ensure(self, desc: Descriptor, what: str) -> None:
        if self.staging.has(desc.digest, desc.size):
            return
        p = self.root / "blobs" / "sha256" / check_digest(desc.digest)
        try:
            f = _open_regular(p)
        except FileNotFoundError as e:
            raise ImageError(f"{what}: blob {desc.digest} is missing ({p})") from e
        with f:
            self.staging.ingest(f, expected=desc.digest, size=desc.size, what=f"{what}: {p}")


def _open_regular(p: Path) -> Any:
    """Open a layout file for reading; a FIFO, device or folder is an ImageError.

    O_NONBLOCK so that opening a FIFO cannot block (regular files ignore it); a layout
    unpacked from a download may hold any file type, and /dev/zero never ends.
    """
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except IsADirectoryError:
        raise ImageError(f"{p} is not a regular file") from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ImageError(f"cannot read {p}: {e.strerror}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"{p} is not a regular file")
    return os.fdopen(fd, "rb")


def _read_oci_dir(path: Path, staging: BlobStore, select: Reference | None) -> ArchiveImage:
    if not (path / "index.json").is_file():
        raise ImageError(f"{path} is a directory but not an OCI image layout (no index.json)")
    return _oci(f"OCI layout {path}", "oci-dir", _DirBlobs(path, staging), select)


def _ref_names(d: Descriptor) -> tuple[str | None, Reference | None]:
    """(ref.name annotation, full reference recorded for the entry if any)."""
    ref_name = d.annotations.get(ANNOTATION_REF_NAME)
    full = d.annotations.get(ANNOTATION_CONTAINERD_NAME)
    for candidate in (full, ref_name):
        if candidate and ("/" in candidate or ":" in candidate):
            try:
                return ref_name, parse_reference(candidate)
            except UsageError:
                continue
    return ref_name, None


def _matches(d: Descriptor, select: Reference) -> bool:
    ref_name, full = _ref_names(d)
    if full is not None and _same_name(full, select):
        return True
    return ref_name is not None and ref_name in (select.tag, select.familiar, str(select))


def _oci(what: str, kind: str, blobs: _Blobs, select: Reference | None) -> ArchiveImage:
    layout = blobs.small("oci-layout")
    if layout is not None:
        version = _json(layout, f"{what}: oci-layout")
        v = version.get("imageLayoutVersion") if isinstance(version, dict) else None
        if not isinstance(v, str) or not v.startswith("1."):
            raise ImageError(f"{what}: unsupported imageLayoutVersion {v!r}")
    body = blobs.small("index.json")
    if body is None:
        raise ImageError(f"{what}: index.json is missing")
    index = parse_document(body, what=f"{what}: index.json")
    if not isinstance(index, Index):
        raise ImageError(f"{what}: index.json is not an image index")
    candidates = list(index.manifests)
    if select is not None and len(candidates) > 1:
        candidates = [d for d in candidates if _matches(d, select)]
        if not candidates:
            raise NotFoundError(f"{what}: no image named {select.familiar} in the layout")
    if not candidates:
        raise ImageError(f"{what}: index.json lists no images")
    if len(candidates) > 1:
        if all(d.platform is not None for d in candidates):
            chosen = select_platform(Index(index.media_type, tuple(candidates)), what=what)
        else:
            names = ", ".join(sorted({_ref_names(d)[0] or d.digest[:19] for d in candidates}))
            raise UsageError(
                f"{what} holds {len(candidates)} images ({names}); name the one to import"
            )
    else:
        chosen = candidates[0]
    _, full = _ref_names(chosen)
    keep = [chosen.digest]
    doc = parse_document(blobs.read(chosen, what), chosen.media_type, what=what)
    if isinstance(doc, Index):
        entry = select_platform(doc, what=what)
        keep.append(entry.digest)
        doc = parse_document(blobs.read(entry, what), entry.media_type, what=what)
        if isinstance(doc, Index):
            raise ImageError(f"{what}: nested image indexes are not supported")
    config = parse_config_blob(blobs.read(doc.config, what), what=what)
    for layer in doc.layers:
        blobs.ensure(layer, what)
    layer_digests = tuple(d.digest for d in doc.layers)
    resolved = ResolvedImage.build(
        config_digest=doc.config.digest,
        config=config,
        layer_digests=layer_digests,
        manifest_digest=chosen.digest,
        what=what,
    )
    keep += [doc.config.digest, *layer_digests]
    return ArchiveImage(
        kind=kind,
        resolved=resolved,
        names=(full,) if full is not None else (),
        keep=tuple(keep),
    )


def rootfs_config(diff_id: str, *, cmd: list[str] | None, created: str, source: str) -> bytes:
    """The image config ``docker import`` would write for a plain rootfs tarball."""
    config: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {"Cmd": list(cmd)} if cmd else {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "torpor import", "comment": source}],
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
