"""OCI / Docker distribution documents: descriptors, manifests, indexes.

Role: the one place that knows the JSON shapes and media types shared by
registries (:mod:`torpor.image.registry`) and archives
(:mod:`torpor.image.archive`), and the platform choice torpor makes.

Invariants:

* Only schema-2 documents are accepted: OCI image index / manifest and Docker
  manifest list / manifest v2.  Docker schema 1 and encrypted layers are
  refused with ImageError.
* Every digest in a parsed document has been validated (sha256, 64 hex), so
  it is safe to turn into a blob-store path.
* torpor runs ``linux/amd64`` guests; :func:`select_platform` picks that entry
  from an index or says which platforms exist.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torpor.errors import ImageError
from torpor.image.blobs import check_digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

TARGET_OS = "linux"
TARGET_ARCH = "amd64"
MAX_DOCUMENT = 4 << 20


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def from_json(cls, obj: Any, *, what: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ImageError(f"{what}: descriptor is not an object")
        digest = obj.get("digest")
        check_digest(digest, what=f"{what} digest")
        size = obj.get("size", -1)
        if not isinstance(size, int) or isinstance(size, bool):
            raise ImageError(f"{what}: descriptor size {size!r} is not an integer")
        media_type = obj.get("mediaType") or ""
        if not isinstance(media_type, str):
            raise ImageError(f"{what}: mediaType {media_type!r} is not a string")
        platform = None
        p = obj.get("platform")
        if isinstance(p, dict):
            platform = Platform(
                os=str(p.get("os", "")),
                architecture=str(p.get("architecture", "")),
                variant=str(p["variant"]) if p.get("variant") else None,
            )
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            annotations = {}
        return cls(
            media_type=media_type,
            digest=str(digest),
            size=size,
            platform=platform,
            annotations={str(k): str(v) for k, v in annotations.items()},
        )


@dataclass(frozen=True)
class Manifest:
    """One image: a config blob and its layers, bottom first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    """A list of manifests (multi-platform image, or an OCI layout's ``index.json``)."""

    media_type: str
    manifests: tuple[Descriptor, ...]


def parse_document(data: bytes, content_type: str | None = None, *, what: str) -> Manifest | Index:
    """Parse a manifest or index; the media type comes from the JSON, else ``content_type``.

    Raises ImageError for invalid JSON, schema 1, or unknown/encrypted media types.
    """
    if len(data) > MAX_DOCUMENT:
        raise ImageError(f"{what}: document larger than {MAX_DOCUMENT} bytes")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what}: not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ImageError(f"{what}: not a JSON object")
    ctype = (content_type or "").split(";")[0].strip()
    media_type = obj.get("mediaType") or ctype
    if obj.get("schemaVersion") == 1 or media_type in DOCKER_SCHEMA1:
        raise ImageError(f"{what}: Docker schema 1 manifests are not supported")
    if obj.get("schemaVersion") != 2:
        raise ImageError(f"{what}: unsupported schemaVersion {obj.get('schemaVersion')!r}")
    if not media_type or media_type in ("application/json", "application/octet-stream"):
        # OCI allows mediaType to be absent; tell index from manifest by shape.
        media_type = OCI_INDEX if "manifests" in obj else OCI_MANIFEST
    if media_type in INDEX_TYPES:
        entries = obj.get("manifests")
        if not isinstance(entries, list):
            raise ImageError(f"{what}: index has no manifests list")
        return Index(
            media_type=media_type,
            manifests=tuple(Descriptor.from_json(m, what=what) for m in entries),
        )
    if media_type in MANIFEST_TYPES:
        config = Descriptor.from_json(obj.get("config"), what=f"{what} config")
        layers_json = obj.get("layers")
        if not isinstance(layers_json, list):
            raise ImageError(f"{what}: manifest has no layers list")
        layers = tuple(Descriptor.from_json(x, what=f"{what} layer") for x in layers_json)
        for layer in layers:
            if "encrypted" in layer.media_type:
                raise ImageError(f"{what}: encrypted layers are not supported ({layer.digest})")
        return Manifest(media_type=media_type, config=config, layers=layers)
    raise ImageError(f"{what}: unsupported media type {media_type!r}")


def select_platform(index: Index, *, what: str) -> Descriptor:
    """Pick the ``linux/amd64`` manifest from ``index``.

    Raises ImageError naming the available platforms if there is none.
    """
    candidates = [
        d
        for d in index.manifests
        if d.platform is not None
        and d.platform.os == TARGET_OS
        and d.platform.architecture == TARGET_ARCH
        and d.media_type not in INDEX_TYPES
    ]
    if candidates:
        # Prefer no variant or the baseline v1 (what Docker's default matcher does).
        candidates.sort(key=lambda d: d.platform.variant not in (None, "v1"))  # type: ignore[union-attr]
        return candidates[0]
    available = sorted(
        {
            str(d.platform)
            for d in index.manifests
            if d.platform is not None and d.platform.os not in ("", "unknown")
        }
    )
    listing = ", ".join(available) if available else "none declared"
    raise ImageError(
        f"{what}: no {TARGET_OS}/{TARGET_ARCH} image in the manifest list "
        f"(available platforms: {listing})"
    )


def check_config_platform(config: Mapping[str, Any], *, what: str) -> None:
    """Refuse an image built for another OS/architecture (when the config says so)."""
    os_ = config.get("os")
    arch = config.get("architecture")
    if (os_ and os_ != TARGET_OS) or (arch and arch != TARGET_ARCH):
        raise ImageError(
            f"{what}: image is for {os_ or '?'}/{arch or '?'}, "
            f"torpor runs {TARGET_OS}/{TARGET_ARCH} guests"
        )


def diff_ids(config: Mapping[str, Any], *, what: str) -> tuple[str, ...]:
    """The uncompressed layer digests listed in an image config (``rootfs.diff_ids``)."""
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        raise ImageError(f"{what}: image config has no rootfs.diff_ids")
    for d in ids:
        check_digest(d, what=f"{what} diff_id")
    return tuple(ids)


@dataclass(frozen=True)
class ResolvedImage:
    """An image whose config and layer blobs are all in a blob store, digests verified.

    ``diff_ids`` come from the config and are checked again while unpacking.
    ``manifest_digest`` is what the source named (an index's digest if the
    reference pointed at one); ``None`` for sources without a manifest.
    """

    config_digest: str
    config: Mapping[str, Any] = field(hash=False)
    layer_digests: tuple[str, ...]
    diff_ids: tuple[str, ...]
    manifest_digest: str | None = None

    @classmethod
    def build(
        cls,
        *,
        config_digest: str,
        config: Mapping[str, Any],
        layer_digests: tuple[str, ...],
        manifest_digest: str | None,
        what: str,
    ) -> ResolvedImage:
        """Check the config against the layers and the platform torpor runs."""
        check_config_platform(config, what=what)
        ids = diff_ids(config, what=what)
        if len(ids) != len(layer_digests):
            raise ImageError(
                f"{what}: the manifest lists {len(layer_digests)} layers "
                f"but the image config has {len(ids)} diff_ids"
            )
        return cls(
            config_digest=config_digest,
            config=config,
            layer_digests=layer_digests,
            diff_ids=ids,
            manifest_digest=manifest_digest,
        )


def parse_config_blob(data: bytes, *, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what}: image config is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ImageError(f"{what}: image config is not a JSON object")
    return obj
