"""/v1/snapshots on real VMs: list, inspect with lineage, restore (idempotent), rm, and
bad input; another namespace sees none of it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import Tokens
from tests.server.test_sandboxes_api import problem
from torpor.paths import Paths
from torpor.server.app import create_app
from torpor.server.deps import Config

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def client(app, tokens: Tokens) -> Iterator[TestClient]:
    with TestClient(app, headers={"Authorization": f"Bearer {tokens.default}"}) as c:
        yield c


@pytest.fixture(scope="module")
def lineage(client: TestClient, tools_image: str) -> Iterator[dict[str, Any]]:
    """A sandbox with two snapshots, the second built on the first."""
    r = client.post(
        "/v1/sandboxes", json={"image": tools_image, "memory": "256M", "network": False}
    )
    assert r.status_code == 201, r.text
    sb = r.json()
    tag = f"snapapi-{os.getpid()}-{int(time.time())}"
    base = f"/v1/sandboxes/{sb['id']}"
    client.post(f"{base}/exec", json={"cmd": "echo one > /root/state"})
    first = client.post(f"{base}/snapshot", json={"tag": tag})
    assert first.status_code == 201, first.text
    client.post(f"{base}/exec", json={"cmd": "echo two > /root/state"})
    second = client.post(f"{base}/snapshot", json={})
    assert second.status_code == 201, second.text
    yield {"sb": sb, "tag": tag, "first": first.json()["id"], "second": second.json()["id"]}
    client.delete(base)


def test_list_shows_them_oldest_first(client: TestClient, lineage: dict[str, Any]) -> None:
    items = client.get("/v1/snapshots?limit=1000").json()["items"]
    ids = [s["id"] for s in items]
    assert ids.index(lineage["first"]) < ids.index(lineage["second"])
    row = items[ids.index(lineage["first"])]
    assert row["tag"] == lineage["tag"] and row["vm"] == lineage["sb"]["name"]
    assert row["image"] == "tools:latest" and row["damaged"] is None
    assert set(row["sizes"]) >= {"memory", "disk", "devstate"}
    by_vm = client.get(f"/v1/snapshots?vm={lineage['sb']['name']}").json()["items"]
    assert [s["id"] for s in by_vm] == [lineage["first"], lineage["second"]]
    # pages: one at a time, following next_cursor, gives the same list
    seen, cursor = [], None
    while True:
        q = f"/v1/snapshots?vm={lineage['sb']['name']}&limit=1" + (
            f"&cursor={cursor}" if cursor else ""
        )
        page = client.get(q).json()
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [lineage["first"], lineage["second"]]


def test_inspect_has_lineage(client: TestClient, lineage: dict[str, Any]) -> None:
    first = client.get(f"/v1/snapshots/{lineage['tag']}").json()  # by tag
    assert first["id"] == lineage["first"]
    assert lineage["second"] in first["children"]
    second = client.get(f"/v1/snapshots/{lineage['second'][:16]}").json()  # by prefix
    assert second["parent"] == lineage["first"]
    assert second["ancestors"][0] == lineage["first"]
    assert second["distinct_chunks"] > 0 and second["sizes"]["memory"] > 0


def test_restore_is_idempotent_and_brings_the_state_back(
    client: TestClient, lineage: dict[str, Any]
) -> None:
    key = {"Idempotency-Key": f"restore-{time.time()}"}
    r = client.post(f"/v1/snapshots/{lineage['first']}/restore", json={}, headers=key)
    assert r.status_code == 201, r.text
    sb = r.json()
    try:
        again = client.post(f"/v1/snapshots/{lineage['first']}/restore", json={}, headers=key)
        assert again.status_code == 201 and again.json()["id"] == sb["id"]
        out = client.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "cat /root/state"})
        assert out.json()["stdout"] == "one\n"
        # the same key on another snapshot's restore is a conflict, not a second answer
        problem(
            client.post(f"/v1/snapshots/{lineage['second']}/restore", json={}, headers=key),
            409,
            "ConflictError",
        )
    finally:
        client.delete(f"/v1/sandboxes/{sb['id']}")


def test_restore_checks_isolation_first(
    paths: Paths, tokens: Tokens, lineage: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from torpor.vmm.boot import resolve_accel

    if resolve_accel(paths, "auto") != "tcg":
        return  # KVM: nothing to refuse (test_sandboxes_api covers the allowed path)
    monkeypatch.delenv("TORPOR_ALLOW_TCG", raising=False)
    strict = create_app(Config(paths, allow_tcg=False))
    with TestClient(strict, headers={"Authorization": f"Bearer {tokens.default}"}) as c:
        r = c.post(f"/v1/snapshots/{lineage['first']}/restore", json={})
        problem(r, 403, "TCGRefusedError")


def test_rm_refuses_a_parent_unless_forced(client: TestClient, lineage: dict[str, Any]) -> None:
    problem(client.delete(f"/v1/snapshots/{lineage['first']}"), 409, "ConflictError")
    assert client.delete(f"/v1/snapshots/{lineage['second']}").status_code == 204
    problem(client.get(f"/v1/snapshots/{lineage['second']}"), 404, "NotFoundError")
    problem(client.delete(f"/v1/snapshots/{lineage['second']}"), 404, "NotFoundError")
    assert client.get(f"/v1/snapshots/{lineage['first']}").json()["children"] == []


def test_bad_input(client: TestClient) -> None:
    problem(client.get("/v1/snapshots/no-such-tag"), 404, "NotFoundError")
    problem(client.get(f"/v1/snapshots/{'f' * 64}"), 404, "NotFoundError")
    problem(client.post("/v1/snapshots/no-such-tag/restore", json={}), 404, "NotFoundError")
    problem(client.post("/v1/snapshots/x/restore", json={"name": "a b"}), 404)
    problem(client.post("/v1/snapshots/x/restore", json={"bogus": 1}), 422)
    problem(
        client.post(
            "/v1/snapshots/x/restore", content=b"{", headers={"content-type": "application/json"}
        ),
        422,
    )
    problem(client.delete("/v1/snapshots/%20"), 400, "UsageError")
    problem(client.get("/v1/snapshots?limit=100000"), 422)
    problem(client.get("/v1/snapshots?cursor=bm90LWEtbGlzdA"), 400, "UsageError")
    for ref in ("..%2F..%2Fetc%2Fpasswd", "..", "%2E%2E"):
        assert client.get(f"/v1/snapshots/{ref}").status_code in (400, 404), ref


def test_restore_with_a_bad_name_is_400(client: TestClient, lineage: dict[str, Any]) -> None:
    r = client.post(f"/v1/snapshots/{lineage['first']}/restore", json={"name": "../x"})
    problem(r, 400, "UsageError")


def test_another_namespace_sees_no_snapshot(
    other_api: TestClient, client: TestClient, lineage: dict[str, Any]
) -> None:
    assert lineage["first"] not in [s["id"] for s in other_api.get("/v1/snapshots").json()["items"]]
    for ref in (lineage["first"], lineage["first"][:12], lineage["tag"]):
        problem(other_api.get(f"/v1/snapshots/{ref}"), 404, "NotFoundError")
        problem(other_api.delete(f"/v1/snapshots/{ref}"), 404, "NotFoundError")
        problem(other_api.post(f"/v1/snapshots/{ref}/restore", json={}), 404, "NotFoundError")
    assert client.get(f"/v1/snapshots/{lineage['first']}").status_code == 200
