"""The image domain: OCI/Docker images pulled or imported, unpacked to ext4 base disks.

Public surface (everything else is an implementation detail)::

    ImageStore(paths).pull(ref) / .import_archive(path) / .list() / .get(x)
                     .tag(image, ref) / .remove(x, force=False)  -> Image
    Image            id, repo_tags, created, size, disk_path, config, manifest_digest, layers
    ImageConfig      the runtime config; resolve_command(), merge_env() apply Docker's rules
    Reference        parse_reference("localhost:5000/tools:latest")

Modules, bottom up: ``reference`` (names), ``blobs`` (content-addressed store,
decompression), ``manifest`` (OCI/Docker documents), ``registry`` (HTTP pull),
``archive`` (docker-save / OCI / rootfs tarballs), ``layers`` (safe layer
application), ``ext4`` (mkfs.ext4 -d), ``config`` (run-time rules), ``store``.

Invariant: importing this package (or a light submodule such as ``torpor.image.config``,
which the VM manager needs for every ``exec``) imports nothing else.  The names above
are resolved on first access (PEP 562), so the store and with it zstandard and the
manifest parsers load only for code that touches images (issue 10, CLI start-up).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torpor.image.config import DEFAULT_PATH, ImageConfig, merge_env, resolve_command
    from torpor.image.ext4 import DEFAULT_DISK_SIZE
    from torpor.image.reference import Reference, parse_reference
    from torpor.image.store import Image, ImageStore

# public name -> the submodule that defines it
_LAZY = {
    "DEFAULT_DISK_SIZE": "ext4",
    "DEFAULT_PATH": "config",
    "Image": "store",
    "ImageConfig": "config",
    "ImageStore": "store",
    "Reference": "reference",
    "merge_env": "config",
    "parse_reference": "reference",
    "resolve_command": "config",
}

__all__ = [
    "DEFAULT_DISK_SIZE",
    "DEFAULT_PATH",
    "Image",
    "ImageConfig",
    "ImageStore",
    "Reference",
    "merge_env",
    "parse_reference",
    "resolve_command",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # resolved once; later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
