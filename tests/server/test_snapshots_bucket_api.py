"""/v1/snapshots with snapshots in a bucket (real SeaweedFS): a server lists, shows and
removes what another host stored, and each namespace has a bucket prefix of its own.

No VM: home A stores a snapshot through the store API (what a snapshot commits),
the server serves home B (same key, empty cache).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from torpor.paths import Paths
from torpor.server.app import create_app
from torpor.server.deps import COOKIE, Config
from torpor.server.tokens import TokenStore
from torpor.store.home import home_store


def _store_one(home: Paths, src: Path) -> str:
    """A snapshot-like manifest committed by home A (into the bucket)."""
    store = home_store(home)
    try:
        art, _ = store.put_file(src)
        m = store.commit(
            {"memory": art}, meta={"vm": json.dumps({"name": "on-host-a"}), "tag": "api-bucket"}
        )
        return m.id
    finally:
        store.close()


def test_the_api_lists_shows_and_removes_snapshots_in_the_bucket(
    tmp_path, s3_server, bucket, monkeypatch
) -> None:
    for k, v in s3_server.env(bucket, "torpor").items():
        monkeypatch.setenv(k, v)
    a = Paths(tmp_path / "host-a").ensure()
    src = tmp_path / "mem"
    src.write_bytes(b"guest memory " * 40_000)
    snap = _store_one(a, src)

    b = Paths(tmp_path / "host-b").ensure()
    b.store.mkdir(parents=True, exist_ok=True)
    shutil.copy2(a.store / "key", b.store / "key")  # one key per deployment
    tokens = TokenStore(b)
    _, mine = tokens.create("default", name="b")
    _, theirs = tokens.create("team", name="team")
    app = create_app(Config(b, allow_tcg=True))
    with TestClient(app, headers={"Authorization": f"Bearer {mine}"}) as api:
        items = api.get("/v1/snapshots").json()["items"]
        assert [i["id"] for i in items] == [snap] and items[0]["vm"] == "on-host-a"
        got = api.get("/v1/snapshots/api-bucket")
        assert got.status_code == 200 and got.json()["id"] == snap

        # a namespace has a prefix (and key) of its own: it sees none of default's,
        # and what it stores stays its own (before, its key failed the bucket's check)
        with TestClient(app, headers={"Authorization": f"Bearer {theirs}"}) as team:
            r = team.get("/v1/snapshots")
            assert r.status_code == 200, r.text
            assert r.json()["items"] == []
            assert team.get(f"/v1/snapshots/{snap}").status_code == 404
            ns_home = Paths(b.root / "namespaces" / "team")
            own = _store_one(ns_home, src)
            assert [i["id"] for i in team.get("/v1/snapshots").json()["items"]] == [own]
        assert [i["id"] for i in api.get("/v1/snapshots").json()["items"]] == [snap]

        # the dashboard's snapshot tree, on a host whose cache never listed the bucket
        c = Paths(tmp_path / "host-c").ensure()
        c.store.mkdir(parents=True, exist_ok=True)
        shutil.copy2(a.store / "key", c.store / "key")
        _, on_c = TokenStore(c).create("default", name="c")
        with TestClient(create_app(Config(c)), follow_redirects=False) as page:
            page.cookies.set(COOKIE, on_c)
            html = page.get("/lineage")
            assert html.status_code == 200 and f'id="snap-{snap[:12]}"' in html.text

        assert api.delete(f"/v1/snapshots/{snap}").status_code == 204
    # removed through B's API: gone on A too (a tombstone in the bucket)
    store = home_store(a)
    try:
        assert snap not in store.ids()
    finally:
        store.close()
