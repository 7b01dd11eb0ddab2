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
"""

from torpor.image.config import DEFAULT_PATH, ImageConfig, merge_env, resolve_command
from torpor.image.ext4 import DEFAULT_DISK_SIZE
from torpor.image.reference import Reference, parse_reference
from torpor.image.store import Image, ImageStore

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
