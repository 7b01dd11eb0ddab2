"""Build OCI / Docker test images from scratch, with Python's tarfile only.

Shared by the image tests and by anyone who needs a small bootable userland
(``busybox_rootfs_layer()`` + ``busybox_config()``).  Everything here is
deterministic: fixed mtimes, sorted entries, gzip without timestamps, so
the same call gives the same digests.

Entry helpers (``file_entry``, ``dir_entry``, ``symlink_entry``, ...) return
``(TarInfo, data)`` pairs; ``make_layer(entries, compression)`` packs them.
Layout writers: ``write_oci_layout`` (directory), ``write_oci_archive``
(tarball), ``write_oci_index_layout`` (multi-platform), ``write_docker_save``
(legacy and Docker 25+ layouts), ``write_rootfs_tar``.
``push_to_registry`` copies an OCI layout into a registry with skopeo.
``debugfs_*`` read an ext4 image without mounting it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

BUSYBOX = Path("/bin/busybox")
MTIME = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")  # vfs cap v2, cap_net_raw

Entry = tuple[tarfile.TarInfo, bytes | None]


# ---------------------------------------------------------------------------
# entries


def _info(name: str, type_: bytes, mode: int, uid: int, gid: int, mtime: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.uid = uid
    ti.gid = gid
    ti.mtime = mtime
    ti.uname = ti.gname = ""
    return ti


def _with_xattrs(ti: tarfile.TarInfo, xattrs: Mapping[str, bytes] | None) -> tarfile.TarInfo:
    if xattrs:
        ti.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
        }
    return ti


def file_entry(
    name: str,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = MTIME,
    xattrs: Mapping[str, bytes] | None = None,
) -> Entry:
    ti = _with_xattrs(_info(name, tarfile.REGTYPE, mode, uid, gid, mtime), xattrs)
    ti.size = len(data)
    return ti, data


def dir_entry(
    name: str,
    *,
    mode: int = 0o755,
    uid: int = 0,
    gid: int = 0,
    mtime: int = MTIME,
    xattrs: Mapping[str, bytes] | None = None,
) -> Entry:
    return _with_xattrs(_info(name, tarfile.DIRTYPE, mode, uid, gid, mtime), xattrs), None


def symlink_entry(name: str, target: str, *, uid: int = 0, gid: int = 0) -> Entry:
    ti = _info(name, tarfile.SYMTYPE, 0o777, uid, gid, MTIME)
    ti.linkname = target
    return ti, None


def hardlink_entry(name: str, target: str) -> Entry:
    ti = _info(name, tarfile.LNKTYPE, 0o644, 0, 0, MTIME)
    ti.linkname = target
    return ti, None


def device_entry(
    name: str, major: int, minor: int, *, block: bool = False, mode: int = 0o666
) -> Entry:
    ti = _info(name, tarfile.BLKTYPE if block else tarfile.CHRTYPE, mode, 0, 0, MTIME)
    ti.devmajor, ti.devminor = major, minor
    return ti, None


def fifo_entry(name: str, *, mode: int = 0o644) -> Entry:
    return _info(name, tarfile.FIFOTYPE, mode, 0, 0, MTIME), None


def whiteout_entry(path: str) -> Entry:
    """Deletes ``path`` from lower layers."""
    parent, _, base = path.rstrip("/").rpartition("/")
    return file_entry(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque_entry(directory: str) -> Entry:
    """Hides everything lower layers put in ``directory``."""
    return file_entry(f"{directory.rstrip('/')}/.wh..wh..opq")


# ---------------------------------------------------------------------------
# layers and configs


def compress(data: bytes, compression: str | None) -> bytes:
    if compression is None:
        return data
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    raise ValueError(compression)


def decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def make_layer(entries: Iterable[Entry], compression: str | None = "gzip") -> bytes:
    """Pack entries (in the given order) into a PAX tar, then compress."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return compress(buf.getvalue(), compression)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def diff_id(layer: bytes) -> str:
    return sha256(decompress(layer))


def make_config(
    layers: Sequence[bytes],
    *,
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    env: list[str] | None = None,
    working_dir: str | None = None,
    user: str | None = None,
    labels: Mapping[str, str] | None = None,
    exposed_ports: Sequence[str] = (),
    stop_signal: str | None = None,
    architecture: str = "amd64",
    os_: str = "linux",
    created: str = CREATED,
) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if cmd is not None:
        config["Cmd"] = cmd
    if entrypoint is not None:
        config["Entrypoint"] = entrypoint
    config["Env"] = env if env is not None else ["PATH=/usr/local/bin:/usr/bin:/bin"]
    if working_dir:
        config["WorkingDir"] = working_dir
    if user:
        config["User"] = user
    if labels:
        config["Labels"] = dict(labels)
    if exposed_ports:
        config["ExposedPorts"] = {p: {} for p in exposed_ports}
    if stop_signal:
        config["StopSignal"] = stop_signal
    return {
        "architecture": architecture,
        "os": os_,
        "created": created,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id(layer) for layer in layers]},
        "history": [{"created": created, "created_by": "tests/imagetools.py"} for _ in layers],
    }


def config_bytes(config: Mapping[str, Any]) -> bytes:
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def image_id(config: Mapping[str, Any]) -> str:
    """What torpor (and Docker) call the image id: sha256 hex of the config blob."""
    return hashlib.sha256(config_bytes(config)).hexdigest()


def busybox_applets() -> list[str]:
    out = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    return sorted({a for a in out.stdout.split() if a and a != "busybox" and "/" not in a})


@functools.lru_cache(maxsize=4)
def busybox_rootfs_layer(compression: str | None = "gzip") -> bytes:
    """A small userland: static busybox with every applet linked in /bin, users and dirs.

    Users: root (0) and ``app`` (1000, home /home/app owned by 1000).
    """
    entries: list[Entry] = [
        dir_entry("bin"),
        file_entry("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
    ]
    entries += [symlink_entry(f"bin/{a}", "busybox") for a in busybox_applets()]
    entries += [
        dir_entry("dev"),
        dir_entry("etc"),
        file_entry(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
            b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        file_entry("etc/group", b"root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"),
        file_entry("etc/hostname", b"torpor\n"),
        file_entry("etc/hosts", b"127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
        dir_entry("home"),
        dir_entry("home/app", uid=1000, gid=1000),
        dir_entry("mnt"),
        dir_entry("proc", mode=0o555),
        dir_entry("root", mode=0o700),
        dir_entry("run"),
        dir_entry("sbin"),
        dir_entry("sys", mode=0o555),
        dir_entry("tmp", mode=0o1777),
        dir_entry("usr"),
        dir_entry("usr/bin"),
        dir_entry("usr/sbin"),
        dir_entry("var"),
        dir_entry("var/tmp", mode=0o1777),
    ]
    entries.sort(key=lambda e: e[0].name)
    return make_layer(entries, compression)


def busybox_config(layers: Sequence[bytes] | None = None, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("cmd", ["sh"])
    kwargs.setdefault("env", ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    return make_config(layers if layers is not None else [busybox_rootfs_layer()], **kwargs)


# ---------------------------------------------------------------------------
# layouts


def _media_type(layer: bytes) -> str:
    if layer[:2] == b"\x1f\x8b":
        return "application/vnd.oci.image.layer.v1.tar+gzip"
    if layer[:4] == b"\x28\xb5\x2f\xfd":
        return "application/vnd.oci.image.layer.v1.tar+zstd"
    return "application/vnd.oci.image.layer.v1.tar"


def _put_blob(blobs: Path, data: bytes) -> str:
    digest = sha256(data)
    blobs.mkdir(parents=True, exist_ok=True)
    p = blobs / digest[7:]
    if not p.exists():
        p.write_bytes(data)
    return digest


def _write_image(blobs: Path, layers: Sequence[bytes], config: Mapping[str, Any]) -> dict[str, Any]:
    """Blobs for one image; returns the manifest descriptor."""
    cfg = config_bytes(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _put_blob(blobs, cfg), "size": len(cfg)},
        "layers": [
            {"mediaType": _media_type(x), "digest": _put_blob(blobs, x), "size": len(x)}
            for x in layers
        ],
    }
    body = json.dumps(manifest, indent=2).encode()
    return {"mediaType": OCI_MANIFEST, "digest": _put_blob(blobs, body), "size": len(body)}


def _write_index_json(directory: Path, descriptors: list[dict[str, Any]]) -> None:
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    (directory / "index.json").write_text(json.dumps(index, indent=2))


def write_oci_layout(
    directory: Path,
    layers: Sequence[bytes],
    config: Mapping[str, Any],
    ref_name: str | None = "latest",
    *,
    extra: Sequence[tuple[Sequence[bytes], Mapping[str, Any], str]] = (),
) -> str:
    """An OCI image layout directory; returns the manifest digest.

    ``extra`` adds more images as ``(layers, config, ref_name)``.
    """
    directory = Path(directory)
    blobs = directory / "blobs" / "sha256"
    descriptors = []
    first = None
    for lay, cfg, name in [(layers, config, ref_name), *extra]:
        desc = _write_image(blobs, lay, cfg)
        if name is not None:
            desc["annotations"] = {REF_NAME: name}
        descriptors.append(desc)
        first = first or desc["digest"]
    _write_index_json(directory, descriptors)
    assert first is not None
    return first


def write_oci_index_layout(
    directory: Path,
    images: Mapping[str, tuple[Sequence[bytes], Mapping[str, Any]]],
    ref_name: str = "latest",
) -> str:
    """A multi-platform layout: ``{"linux/amd64": (layers, config), ...}`` behind one index.

    Returns the digest of the (inner) image index.
    """
    directory = Path(directory)
    blobs = directory / "blobs" / "sha256"
    manifests = []
    for platform, (layers, config) in images.items():
        os_, arch, *variant = platform.split("/")
        desc = _write_image(blobs, layers, config)
        desc["platform"] = {"os": os_, "architecture": arch}
        if variant:
            desc["platform"]["variant"] = variant[0]
        manifests.append(desc)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
    digest = _put_blob(blobs, body)
    _write_index_json(
        directory,
        [
            {
                "mediaType": OCI_INDEX,
                "digest": digest,
                "size": len(body),
                "annotations": {REF_NAME: ref_name},
            }
        ],
    )
    return digest


def _tar_directory(directory: Path, tar_path: Path, compression: str | None) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for root, dirs, files in os.walk(directory):
            dirs.sort()
            for name in sorted(files):
                p = Path(root) / name
                ti = tf.gettarinfo(str(p), arcname=str(p.relative_to(directory)))
                ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = MTIME, 0, 0, "", ""
                with open(p, "rb") as f:
                    tf.addfile(ti, f)
    Path(tar_path).write_bytes(compress(buf.getvalue(), compression))


def write_oci_archive(
    tar_path: Path,
    layers: Sequence[bytes],
    config: Mapping[str, Any],
    ref_name: str | None = "latest",
    *,
    compression: str | None = None,
    workdir: Path | None = None,
) -> str:
    """An OCI layout as a tarball; returns the manifest digest."""
    tar_path = Path(tar_path)
    layout = Path(workdir) if workdir else tar_path.with_name(tar_path.name + ".layout")
    digest = write_oci_layout(layout, layers, config, ref_name)
    _tar_directory(layout, tar_path, compression)
    return digest


def write_docker_save(
    tar_path: Path,
    layers: Sequence[bytes],
    config: Mapping[str, Any],
    repo_tags: Sequence[str] = ("tools:latest",),
    *,
    layout: str = "legacy",
    compression: str | None = None,
    link_duplicates: bool = True,
) -> None:
    """A ``docker save`` tarball.

    ``layout="legacy"``: ``<id>/layer.tar`` (+ ``VERSION``, ``json``),
    ``<config hex>.json``, repeated layers as symlinks; ``layout="docker25"``:
    ``blobs/sha256`` + ``index.json`` + ``oci-layout`` + ``manifest.json``.
    Layers are stored uncompressed, as Docker does.
    """
    plain = [decompress(x) for x in layers]
    cfg = config_bytes(config)
    cfg_hex = hashlib.sha256(cfg).hexdigest()
    members: list[Entry] = []
    layer_names: list[str] = []
    if layout == "legacy":
        seen: dict[str, str] = {}
        parent = ""
        for data in plain:
            did = sha256(data)
            layer_id = hashlib.sha256(f"{parent} {did}".encode()).hexdigest()
            parent = layer_id
            members.append(dir_entry(f"{layer_id}/"))
            members.append(file_entry(f"{layer_id}/VERSION", b"1.0"))
            members.append(file_entry(f"{layer_id}/json", json.dumps({"id": layer_id}).encode()))
            if link_duplicates and did in seen:
                members.append(symlink_entry(f"{layer_id}/layer.tar", f"../{seen[did]}/layer.tar"))
            else:
                members.append(file_entry(f"{layer_id}/layer.tar", data))
                seen[did] = layer_id
            layer_names.append(f"{layer_id}/layer.tar")
        members.append(file_entry(f"{cfg_hex}.json", cfg))
        config_name = f"{cfg_hex}.json"
    elif layout == "docker25":
        members.append(dir_entry("blobs/"))
        members.append(dir_entry("blobs/sha256/"))
        blob_members: dict[str, bytes] = {}
        for data in plain:
            blob_members[hashlib.sha256(data).hexdigest()] = data
            layer_names.append(f"blobs/sha256/{hashlib.sha256(data).hexdigest()}")
        blob_members[cfg_hex] = cfg
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": f"sha256:{cfg_hex}", "size": len(cfg)},
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha256(d),
                    "size": len(d),
                }
                for d in plain
            ],
        }
        mbody = json.dumps(manifest).encode()
        mhex = hashlib.sha256(mbody).hexdigest()
        blob_members[mhex] = mbody
        for hx, data in sorted(blob_members.items()):
            members.append(file_entry(f"blobs/sha256/{hx}", data))
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": f"sha256:{mhex}",
                    "size": len(mbody),
                    "annotations": {
                        "io.containerd.image.name": f"docker.io/library/{t}",
                        REF_NAME: t.rsplit(":", 1)[-1],
                    },
                }
                for t in repo_tags[:1]
            ],
        }
        members.append(file_entry("index.json", json.dumps(index).encode()))
        members.append(file_entry("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'))
        config_name = f"blobs/sha256/{cfg_hex}"
    else:
        raise ValueError(layout)
    manifest_json = [{"Config": config_name, "RepoTags": list(repo_tags), "Layers": layer_names}]
    members.append(file_entry("manifest.json", json.dumps(manifest_json).encode()))
    repositories: dict[str, dict[str, str]] = {}
    for t in repo_tags:
        repo, _, tag = t.rpartition(":")
        repositories.setdefault(repo, {})[tag] = (
            layer_names[-1].split("/")[0] if layer_names else ""
        )
    members.append(file_entry("repositories", json.dumps(repositories).encode()))
    Path(tar_path).write_bytes(make_layer(members, compression))


def write_rootfs_tar(
    tar_path: Path, entries: Iterable[Entry], compression: str | None = None
) -> None:
    """A plain root filesystem tarball, as ``docker export`` / ``tar -C root -c .`` make."""
    Path(tar_path).write_bytes(make_layer([dir_entry("./"), *entries], compression))


# ---------------------------------------------------------------------------
# registry


@dataclass
class Registry:
    """A running test registry (see the ``registry`` fixtures in tests/image/conftest.py)."""

    host: str  # "127.0.0.1:PORT"
    url: str
    root: Path
    proc: subprocess.Popen[bytes]
    log: Path
    username: str | None = None
    password: str | None = None
    token_requests: list[dict[str, str]] = field(default_factory=list)

    def ref(self, repo_tag: str) -> str:
        return f"{self.host}/{repo_tag}"

    @property
    def creds(self) -> str | None:
        return f"{self.username}:{self.password}" if self.username else None


def push_to_registry(
    oci_layout_dir: Path,
    dest: str,
    *,
    ref_name: str = "latest",
    creds: str | None = None,
    all_platforms: bool = False,
    dest_format: str | None = None,
) -> None:
    """``skopeo copy oci:DIR:REF docker://DEST`` to a plain-HTTP registry."""
    cmd = [
        "skopeo",
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
    ]
    if creds:
        cmd.append(f"--dest-creds={creds}")
    else:
        cmd.append("--dest-no-creds")
    if all_platforms:
        cmd.append("--all")
    if dest_format:
        cmd += ["--format", dest_format]
    cmd += [f"oci:{oci_layout_dir}:{ref_name}", f"docker://{dest}"]
    env = {**os.environ, "HOME": str(Path(oci_layout_dir).parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr}")


# ---------------------------------------------------------------------------
# reading ext4 images


def debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    )
    return proc.stdout


def debugfs_stat(image: Path, path: str) -> dict[str, Any]:
    """Parse ``debugfs -R 'stat PATH'``: type, mode, uid, gid, size, links, xattrs, symlink."""
    out = debugfs(image, f'stat "{path}"')
    if not out.strip():
        raise FileNotFoundError(path)
    info: dict[str, Any] = {}
    m = re.search(r"Type:\s+(.+?)\s+Mode:\s+(\d+)", out)
    assert m, out
    info["type"], info["mode"] = m.group(1), int(m.group(2), 8)
    m = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)(?:\s+Project:\s+\d+)?\s+Size:\s+(\d+)", out)
    assert m, out
    info["uid"], info["gid"], info["size"] = int(m.group(1)), int(m.group(2)), int(m.group(3))
    m = re.search(r"Links:\s+(\d+)", out)
    info["links"] = int(m.group(1)) if m else None
    m = re.search(r"Inode:\s+(\d+)", out)
    info["inode"] = int(m.group(1)) if m else None
    m = re.search(r'Fast link dest:\s+"(.*)"', out)
    info["symlink"] = m.group(1) if m else None
    m = re.search(r"Device major/minor number:\s+(\d+):(\d+)", out)
    info["device"] = (int(m.group(1)), int(m.group(2))) if m else None
    m = re.search(r"mtime:\s+0x([0-9a-f]+)", out)
    info["mtime"] = int(m.group(1), 16) if m else None
    xattrs = {}
    if "Extended attributes:" in out:
        block = out.split("Extended attributes:", 1)[1]
        for line in block.splitlines()[1:]:
            mm = re.match(r"\s+(\S+) \((\d+)\)(?: = (.*))?$", line)
            if not mm:
                break
            xattrs[mm.group(1)] = mm.group(3)
    info["xattrs"] = xattrs
    return info


def debugfs_ls(image: Path, path: str) -> list[str]:
    """Names in a directory (without ``.`` and ``..``)."""
    out = debugfs(image, f'ls -l "{path}"')
    names = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 9:
            name = parts[-1]
            if name not in (".", ".."):
                names.append(name)
    return names


def debugfs_cat(image: Path, path: str) -> bytes:
    proc = subprocess.run(
        ["debugfs", "-R", f'cat "{path}"', str(image)], capture_output=True, check=True
    )
    return proc.stdout


def debugfs_exists(image: Path, path: str) -> bool:
    proc = subprocess.run(
        ["debugfs", "-R", f'stat "{path}"', str(image)], capture_output=True, text=True
    )
    return "File not found" not in proc.stderr and bool(proc.stdout.strip())


def leftovers(paths: Any) -> list[str]:
    """What a store operation left behind: tmp/ entries, image dirs, partial blobs."""
    out = [str(p.relative_to(paths.root)) for p in paths.tmp.iterdir()]
    out += [p.name for p in paths.images.iterdir() if p.name != "refs.json"]
    out += [p.name for p in paths.blobs.iterdir() if p.name.startswith(".partial")]
    return out
