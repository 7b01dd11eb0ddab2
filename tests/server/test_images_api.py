"""/v1/images: list, import by upload (streamed, capped), pull from a real registry on
loopback (Debian's docker-registry), rm (refused while a VM uses the image), bad input,
and another namespace's empty store."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.imagetools import (
    Registry,
    file_entry,
    image_id,
    make_config,
    make_layer,
    push_to_registry,
    write_oci_layout,
)
from tests.server.conftest import Tokens, free_port
from tests.server.test_sandboxes_api import problem
from torpor.paths import Paths
from torpor.server.app import create_app
from torpor.server.deps import Config

REGISTRY_BIN = "/usr/bin/docker-registry"


@pytest.fixture(scope="module")
def client(app, tokens: Tokens) -> Iterator[TestClient]:
    with TestClient(app, headers={"Authorization": f"Bearer {tokens.default}"}) as c:
        yield c


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry on 127.0.0.1, plain HTTP, anonymous (stopped by PID)."""
    if not os.access(REGISTRY_BIN, os.X_OK):
        pytest.fail(f"{REGISTRY_BIN} is missing (apt-get install docker-registry)")
    base = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = base / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {base / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: {secrets.token_hex(16)}\n"
    )
    log = base / "registry.log"
    with log.open("ab") as f:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=f, stderr=f)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(f"{url}/v2/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            pytest.fail(f"docker-registry did not start: {log.read_text()[-2000:]}")
        yield Registry(host=f"127.0.0.1:{port}", url=url, root=base, proc=proc, log=log)
    finally:
        proc.terminate()
        proc.wait(10)


def marker_image(tmp_path: Path, marker: str) -> tuple[Path, dict[str, Any]]:
    layers = [make_layer([file_entry("etc/marker", marker.encode())])]
    config = make_config(layers)
    layout = tmp_path / f"layout-{marker}"
    write_oci_layout(layout, layers, config, "latest")
    return layout, config


def test_list_has_the_test_image(client: TestClient, tools_image: str) -> None:
    items = client.get("/v1/images").json()["items"]
    tools = [i for i in items if "tools:latest" in i["repo_tags"]]
    assert len(tools) == 1 and tools[0]["size"] > 0 and len(tools[0]["id"]) == 64
    first = client.get("/v1/images?limit=1").json()
    assert len(first["items"]) == 1
    if len(items) > 1:
        nxt = client.get(f"/v1/images?limit=1&cursor={first['next_cursor']}").json()
        assert nxt["items"][0]["id"] == items[1]["id"]


def test_import_upload_then_rm(client: TestClient, tmp_path: Path) -> None:
    from torpor.demo.image import write_busybox_rootfs

    tar = write_busybox_rootfs(tmp_path / "rootfs.tar")
    name = f"uploaded-{os.getpid()}:v1"

    def body() -> Iterator[bytes]:  # streamed (chunked): never one buffer
        with tar.open("rb") as f:
            while chunk := f.read(256 << 10):
                yield chunk

    r = client.post(f"/v1/images/import?name={name}", content=body())
    assert r.status_code == 201, r.text
    img = r.json()
    assert name in img["repo_tags"] and img["size"] > 0
    assert name in [t for i in client.get("/v1/images").json()["items"] for t in i["repo_tags"]]
    r = client.delete(f"/v1/images/{name}")
    assert r.status_code == 200 and r.json()["id"] == img["id"]
    assert any(line.startswith("Deleted") for line in r.json()["done"])
    problem(client.delete(f"/v1/images/{name}"), 404, "NotFoundError")


def test_import_bad_uploads(client: TestClient, paths: Paths, tokens: Tokens) -> None:
    problem(client.post("/v1/images/import", content=b""), 400, "UsageError")
    r = client.post("/v1/images/import?name=junk:1", content=os.urandom(64 << 10))
    assert r.status_code in (400, 422), r.text
    problem(r, r.status_code)
    problem(client.post("/v1/images/import?name=Bad%20Name", content=b"x" * 10), 400)
    leftovers = [p for p in paths.tmp.iterdir() if p.name.startswith("upload-")]
    assert leftovers == []
    small = create_app(Config(paths, allow_tcg=True, max_upload=32 << 10))
    with TestClient(small, headers={"Authorization": f"Bearer {tokens.default}"}) as c:
        problem(c.post("/v1/images/import", content=b"x" * (33 << 10)), 413)
        problem(c.post("/v1/images/import", content=iter([b"x" * (8 << 10)] * 8)), 413)
    assert [p for p in paths.tmp.iterdir() if p.name.startswith("upload-")] == []


def test_pull_from_a_registry(client: TestClient, registry: Registry, tmp_path: Path) -> None:
    layout, config = marker_image(tmp_path, "pulled")
    push_to_registry(layout, registry.ref("apitest/marker:latest"))
    r = client.post("/v1/images/pull", json={"ref": registry.ref("apitest/marker:latest")})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == image_id(config)
    assert registry.ref("apitest/marker:latest") in r.json()["repo_tags"]
    problem(
        client.post("/v1/images/pull", json={"ref": registry.ref("apitest/nothing:latest")}),
        404,
    )
    problem(client.post("/v1/images/pull", json={"ref": "UPPER/case::bad"}), 400, "UsageError")
    problem(client.post("/v1/images/pull", json={}), 422)
    problem(client.post("/v1/images/pull", json={"ref": "x", "extra": 1}), 422)
    client.delete(f"/v1/images/{registry.ref('apitest/marker:latest')}")


def test_pull_never_sends_the_servers_own_credentials(
    client: TestClient, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant chooses the registry: the operator's TORPOR_REGISTRY_* must not go there."""
    import http.server
    import threading

    seen: list[str | None] = []

    class Snoop(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="snoop"')
            self.send_header("Content-Length", "0")
            self.end_headers()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Snoop)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("TORPOR_REGISTRY_USER", "operator")
    monkeypatch.setenv("TORPOR_REGISTRY_PASSWORD", "operator-secret")
    try:
        r = client.post("/v1/images/pull", json={"ref": f"127.0.0.1:{srv.server_port}/x/y:latest"})
        assert r.status_code >= 400
        assert seen and not any(seen), seen  # asked, and never answered with a secret
    finally:
        srv.shutdown()


def test_rm_refuses_an_image_a_vm_uses(client: TestClient, box: Any) -> None:
    body = problem(client.delete("/v1/images/tools:latest"), 409, "ConflictError")
    assert "used by a VM" in body["detail"]
    assert "tools:latest" in [
        t for i in client.get("/v1/images").json()["items"] for t in i["repo_tags"]
    ]


def test_bad_refs_and_other_namespaces(
    client: TestClient, other_api: TestClient, tools_image: str
) -> None:
    for ref in ("no-such:1", "../../etc/passwd", "..%2F..%2Fetc", "a" * 64):
        r = client.delete(f"/v1/images/{ref}")
        assert r.status_code in (400, 404), (ref, r.text)
        problem(r, r.status_code)
    assert other_api.get("/v1/images").json()["items"] == []
    problem(other_api.delete(f"/v1/images/{tools_image}"), 404, "NotFoundError")
    problem(client.get("/v1/images?cursor=!!"), 400, "UsageError")
