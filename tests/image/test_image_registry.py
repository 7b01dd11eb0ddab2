"""Pulling from a real registry (distribution v2.8 on loopback), with and without token auth."""

from __future__ import annotations

import base64
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from imagetools import (
    Registry,
    busybox_config,
    busybox_rootfs_layer,
    debugfs_cat,
    debugfs_stat,
    file_entry,
    image_id,
    leftovers,
    make_config,
    make_layer,
    push_to_registry,
    write_oci_index_layout,
    write_oci_layout,
)

from torpor.errors import DigestMismatchError, ImageError, NotFoundError, RegistryError
from torpor.image.blobs import BlobStore
from torpor.image.reference import parse_reference
from torpor.image.registry import RegistryClient, is_loopback, parse_challenge
from torpor.image.store import ImageStore
from torpor.paths import Paths


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


def image_layers(marker: bytes) -> tuple[list[bytes], dict]:
    layers = [busybox_rootfs_layer(), make_layer([file_entry("etc/marker", marker)])]
    return layers, busybox_config(layers)


def push(
    tmp_path: Path, reg: Registry, repo_tag: str, marker: bytes = b"m", **kwargs: object
) -> tuple[dict, str]:
    """Push a busybox image; return (config, manifest digest as the registry serves it)."""
    layers, config = image_layers(marker)
    layout = tmp_path / unique("layout")
    write_oci_layout(layout, layers, config, "latest")
    push_to_registry(layout, reg.ref(repo_tag), **kwargs)  # type: ignore[arg-type]
    return config, manifest_digest(reg, repo_tag, **kwargs)  # type: ignore[arg-type]


def manifest_digest(reg: Registry, repo_tag: str, creds: str | None = None, **_: object) -> str:
    _, _, tag = repo_tag.partition(":")
    with RegistryClient(
        reg.host,
        username=creds.split(":")[0] if creds else None,
        password=creds.split(":")[1] if creds else None,
    ) as client:
        _, _, digest = client.get_manifest(parse_reference(reg.ref(repo_tag)), tag)
    return digest


@pytest.fixture
def spy_requests(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every URL the registry client sends (a spy on the real transport, not a fake)."""
    seen: list[str] = []
    original = httpx.Client.send

    def send(self: httpx.Client, request: httpx.Request, **kwargs: object) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        return original(self, request, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx.Client, "send", send)
    yield seen


def test_pull_by_tag_then_again(
    tmp_path: Path, registry: Registry, store: ImageStore, paths: Paths, spy_requests: list[str]
) -> None:
    repo = unique("tools")
    config, digest = push(tmp_path, registry, f"{repo}:latest", b"first")
    events: list[tuple[str, int, int]] = []
    image = store.pull(registry.ref(f"{repo}:latest"), progress=lambda *e: events.append(e))
    assert image.id == image_id(config)
    assert image.repo_tags == (registry.ref(f"{repo}:latest"),)
    assert image.repo_digests == (f"{registry.host}/{repo}@{digest}",)
    assert image.manifest_digest == digest
    assert debugfs_cat(image.disk_path, "/etc/marker") == b"first"
    assert debugfs_stat(image.disk_path, "/bin/busybox")["mode"] == 0o755
    assert any(e[0].startswith("Downloading") and e[1] == e[2] > 0 for e in events)
    assert any(e[0] == "Extracting layer 2/2" for e in events)
    blob_files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths.blobs.iterdir()}
    assert image.id in blob_files and digest[7:] in blob_files

    spy_requests.clear()
    again = store.pull(registry.ref(f"{repo}:latest"))
    assert again == image
    assert not [r for r in spy_requests if "/blobs/" in r], spy_requests
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths.blobs.iterdir()} == (
        blob_files
    )
    assert [i.id for i in store.list()] == [image.id]
    assert leftovers(paths) == [image.id]


def test_pull_by_digest(
    tmp_path: Path, registry: Registry, store: ImageStore, spy_requests: list[str]
) -> None:
    repo = unique("bydigest")
    config, digest = push(tmp_path, registry, f"{repo}:v1", b"digest")
    image = store.pull(f"{registry.host}/{repo}@{digest}")
    assert image.id == image_id(config)
    assert image.repo_tags == ()
    assert image.repo_digests == (f"{registry.host}/{repo}@{digest}",)
    assert store.get(f"{registry.host}/{repo}@{digest}") == image
    # Content addressed and already here: no network at all.
    spy_requests.clear()
    assert store.pull(f"{registry.host}/{repo}@{digest}") == image
    assert spy_requests == []
    # tag@digest pulls the digest.
    assert store.pull(f"{registry.host}/{repo}:whatever@{digest}").id == image.id


def test_pull_unknown_tag_and_repo(
    tmp_path: Path, registry: Registry, store: ImageStore, paths: Paths
) -> None:
    repo = unique("known")
    push(tmp_path, registry, f"{repo}:latest")
    with pytest.raises(NotFoundError, match=f"{repo}:nope"):
        store.pull(registry.ref(f"{repo}:nope"))
    missing = unique("missing")
    with pytest.raises(NotFoundError, match=missing):
        store.pull(registry.ref(f"{missing}:latest"))
    with pytest.raises(NotFoundError):
        store.pull(f"{registry.host}/{repo}@sha256:{'0' * 64}")
    assert leftovers(paths) == []


def test_pull_multi_arch_selects_amd64(
    tmp_path: Path, registry: Registry, store: ImageStore
) -> None:
    amd_layers, amd_config = image_layers(b"amd64")
    arm_layers = [make_layer([file_entry("etc/marker", b"arm64")])]
    arm_config = make_config(arm_layers, architecture="arm64")
    layout = tmp_path / "multi"
    index_digest = write_oci_index_layout(
        layout,
        {
            "linux/arm64": (arm_layers, arm_config),
            "linux/amd64": (amd_layers, amd_config),
            "linux/arm/v7": (arm_layers, make_config(arm_layers, architecture="arm")),
        },
    )
    repo = unique("multi")
    push_to_registry(layout, registry.ref(f"{repo}:latest"), all_platforms=True)
    image = store.pull(registry.ref(f"{repo}:latest"))
    assert image.id == image_id(amd_config)
    assert image.manifest_digest == index_digest
    assert debugfs_cat(image.disk_path, "/etc/marker") == b"amd64"


def test_pull_index_without_amd64(
    tmp_path: Path, registry: Registry, store: ImageStore, paths: Paths
) -> None:
    arm_layers = [make_layer([file_entry("etc/marker", b"arm")])]
    layout = tmp_path / "armonly"
    write_oci_index_layout(
        layout,
        {
            "linux/arm64": (arm_layers, make_config(arm_layers, architecture="arm64")),
            "linux/arm/v7": (arm_layers, make_config(arm_layers, architecture="arm")),
        },
    )
    repo = unique("armonly")
    push_to_registry(layout, registry.ref(f"{repo}:latest"), all_platforms=True)
    with pytest.raises(ImageError, match=r"linux/amd64.*linux/arm/v7, linux/arm64"):
        store.pull(registry.ref(f"{repo}:latest"))
    assert leftovers(paths) == []


def test_pull_docker_v2_manifest(tmp_path: Path, registry: Registry, store: ImageStore) -> None:
    repo = unique("v2s2")
    _, digest = push(tmp_path, registry, f"{repo}:latest", b"v2s2", dest_format="v2s2")
    with RegistryClient(registry.host) as client:
        _, ctype, _ = client.get_manifest(parse_reference(registry.ref(repo)), "latest")
    assert ctype == "application/vnd.docker.distribution.manifest.v2+json"
    image = store.pull(registry.ref(f"{repo}:latest"))
    assert debugfs_cat(image.disk_path, "/etc/marker") == b"v2s2"
    assert image.manifest_digest == digest


def test_corrupted_blob_in_registry(
    tmp_path: Path, registry: Registry, store: ImageStore, paths: Paths
) -> None:
    repo = unique("rotten")
    layers, config = image_layers(b"rotten-" + os.urandom(8).hex().encode())
    layout = tmp_path / "rotten"
    write_oci_layout(layout, layers, config, "latest")
    push_to_registry(layout, registry.ref(f"{repo}:latest"))
    # The registry serves stored bytes without checking them: rot one on its disk.
    layer_hex = next(
        p.name for p in (layout / "blobs/sha256").iterdir() if p.read_bytes() == layers[1]
    )
    data_file = (
        registry.root / "data/docker/registry/v2/blobs/sha256" / layer_hex[:2] / layer_hex / "data"
    )
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data_file.write_bytes(bytes(raw))
    with pytest.raises(DigestMismatchError, match=layer_hex):
        store.pull(registry.ref(f"{repo}:latest"))
    assert not (paths.blobs / layer_hex).exists()
    assert leftovers(paths) == []


def test_unreachable_registry(store: ImageStore, paths: Paths) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RegistryError, match=f"127.0.0.1:{port}") as exc:
        store.pull(f"127.0.0.1:{port}/tools:latest")
    assert isinstance(exc.value.__cause__, httpx.HTTPError)
    assert leftovers(paths) == []


# ---------------------------------------------------------------------------
# token auth


def test_token_auth(
    tmp_path: Path, token_registry: Registry, store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORPOR_REGISTRY_USER", raising=False)
    monkeypatch.delenv("TORPOR_REGISTRY_PASSWORD", raising=False)
    repo = unique("private")
    creds = token_registry.creds
    user, password = token_registry.username, token_registry.password
    assert creds and user and password
    config, _ = push(tmp_path, token_registry, f"{repo}:latest", b"secret", creds=creds)
    ref = token_registry.ref(f"{repo}:latest")

    with pytest.raises(RegistryError, match="pull access denied"):
        store.pull(ref)
    with pytest.raises(RegistryError, match=r"authentication .* failed"):
        store.pull(ref, username=user, password="wrong")
    assert token_registry.token_requests[-1] == {"result": "denied", "user": user}

    image = store.pull(ref, username=user, password=password)
    assert image.id == image_id(config)
    assert debugfs_cat(image.disk_path, "/etc/marker") == b"secret"
    granted = [r for r in token_registry.token_requests if r["result"] == "granted"]
    assert granted[-1]["scope"] == f"repository:{repo}:pull"
    assert granted[-1]["service"] == "torpor-test-registry"

    store.remove(image.id)
    monkeypatch.setenv("TORPOR_REGISTRY_USER", user)
    monkeypatch.setenv("TORPOR_REGISTRY_PASSWORD", password)
    assert store.pull(ref).id == image.id
    monkeypatch.setenv("TORPOR_REGISTRY_PASSWORD", "wrong")
    with pytest.raises(RegistryError, match=f"refused user '{user}'"):
        store.pull(token_registry.ref(f"{repo}:other"))


# ---------------------------------------------------------------------------
# small parts


def test_parse_challenge() -> None:
    c = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull",error="insufficient_scope"'
    )
    assert c is not None and c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull",
        "error": "insufficient_scope",
    }
    basic = parse_challenge('Basic realm="Registry Realm"')
    assert basic is not None and basic.scheme == "basic"
    assert parse_challenge('Bearer realm="a\\"b"').params["realm"] == 'a"b'  # type: ignore[union-attr]
    assert parse_challenge("") is None


@pytest.mark.parametrize(
    ("registry", "loopback"),
    [
        ("localhost:5000", True),
        ("localhost", True),
        ("127.0.0.1:5000", True),
        ("127.3.4.5", True),
        ("[::1]:5000", True),
        ("docker.io", False),
        ("10.0.0.1:5000", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback(registry: str, loopback: bool) -> None:
    assert is_loopback(registry) is loopback


def test_https_by_default() -> None:
    assert RegistryClient("ghcr.io").base_url == "https://ghcr.io"
    assert RegistryClient("docker.io").base_url == "https://registry-1.docker.io"
    assert RegistryClient("localhost:5000").base_url == "http://localhost:5000"
    assert RegistryClient("myreg:5000", insecure=True).base_url == "http://myreg:5000"


def test_blob_already_present_is_not_downloaded(
    tmp_path: Path, registry: Registry, spy_requests: list[str]
) -> None:
    repo = unique("present")
    push(tmp_path, registry, f"{repo}:latest")
    blobs = BlobStore(tmp_path / "blobs")
    ref = parse_reference(registry.ref(f"{repo}:latest"))
    with RegistryClient(registry.host) as client:
        resolved = client.pull(ref, blobs)
        spy_requests.clear()
        again = client.pull(ref, blobs)
    assert again == resolved
    assert [r.split()[0] for r in spy_requests] == ["GET"]  # the manifest only


def test_basic_auth(
    tmp_path: Path, basic_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # distribution's own htpasswd auth: the client is challenged with Basic, answers it.
    monkeypatch.delenv("TORPOR_REGISTRY_USER", raising=False)
    monkeypatch.delenv("TORPOR_REGISTRY_PASSWORD", raising=False)
    user, password = basic_registry.username, basic_registry.password
    assert user and password
    repo = unique("basic")
    creds = basic_registry.creds
    config, _ = push(tmp_path, basic_registry, f"{repo}:latest", b"basic", creds=creds)
    ref = parse_reference(basic_registry.ref(f"{repo}:latest"))
    seen: list[str] = []  # the Authorization header of every request (a spy, not a fake)
    original = httpx.Client.send

    def send(self: httpx.Client, request: httpx.Request, **kwargs: object) -> httpx.Response:
        seen.append(request.headers.get("Authorization", ""))
        return original(self, request, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx.Client, "send", send)
    blobs = BlobStore(tmp_path / "blobs")
    with RegistryClient(ref.registry, username=user, password=password) as client:
        resolved = client.pull(ref, blobs)
    assert resolved.config_digest == f"sha256:{image_id(config)}"
    assert resolved.layer_digests and all(blobs.has(d) for d in resolved.layer_digests)
    basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    assert seen[0] == "" and set(seen[1:]) == {basic}, seen
    wrong = RegistryClient(ref.registry, username=user, password="nope")
    with wrong, pytest.raises(RegistryError, match=f"refused user '{user}'"):
        wrong.pull(ref, BlobStore(tmp_path / "b2"))
    anonymous = RegistryClient(ref.registry)
    with anonymous, pytest.raises(RegistryError, match="requires a username and password"):
        anonymous.pull(ref, BlobStore(tmp_path / "b3"))
