"""torpor.store.home: which store a home opens, and where a snapshot is (real SeaweedFS).

No VM: manifests are committed through the store API, as a snapshot commits them.
"""

from __future__ import annotations

import pytest

from torpor.errors import UsageError
from torpor.paths import Paths
from torpor.store import ChunkStore
from torpor.store.home import durability_fields, home_store, store_info, store_url, where
from torpor.store.tiered import TieredStore, wait_uploads


def _env(monkeypatch, s3_server, bucket: str, **extra: str) -> None:
    for k, v in s3_server.env(bucket, "torpor").items():
        monkeypatch.setenv(k, v)
    for k, v in extra.items():
        monkeypatch.setenv(k, v)


def test_without_a_bucket_the_folder_alone(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TORPOR_STORE", raising=False)
    store = home_store(Paths(tmp_path / "h"))
    assert type(store) is ChunkStore
    store.close()
    monkeypatch.setenv("TORPOR_STORE", "local")
    assert store_url(tmp_path / "h") is None
    assert store_info(tmp_path / "h").kind == "local"
    monkeypatch.setenv("TORPOR_STORE", "gs://x/y")
    with pytest.raises(UsageError):
        home_store(Paths(tmp_path / "h"))


def test_a_namespace_home_has_a_prefix_of_its_own(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORPOR_STORE", "s3://b/pre/")
    home = tmp_path / "h"
    home.mkdir()
    assert store_url(home) == "s3://b/pre/"
    (home / "namespace").write_text("team-a")
    assert store_url(home) == "s3://b/pre/namespaces/team-a"
    (home / "namespace").write_text("../evil")
    with pytest.raises(UsageError):
        store_url(home)


def test_where_a_snapshot_is_while_its_upload_is_pending(
    tmp_path, s3_server, bucket, monkeypatch
) -> None:
    """durability local, the bucket refusing this host (a wrong secret): committed
    here with its upload pending (the checkpoint fields say so); once an upload with
    good credentials ran: in the bucket."""
    _env(monkeypatch, s3_server, bucket, TORPOR_DURABILITY="local")
    home = Paths(tmp_path / "h")
    good = home_store(home)  # opened (its FORMAT checked) with the right secret
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")  # this process checked FORMAT
    refused = home_store(home)
    assert isinstance(refused, TieredStore)
    src = tmp_path / "f"
    src.write_bytes(b"pending " * 50_000)
    art, _ = refused.put_file(src)
    m = refused.commit({"memory": art})
    fields = durability_fields(refused.last_commit_timings())
    assert fields["durability"] == "local, upload pending"
    assert fields["commit_bucket_ms"] is None
    assert wait_uploads(60)  # the background upload ran, and was refused
    loc = where(refused, m)
    assert loc["store"] == "bucket" and loc["upload_pending"] and not loc["in_bucket"]
    assert loc["cached_chunks"] == loc["chunks"] > 0

    assert good.upload_pending() == [m.id]
    loc = where(good, m)
    assert loc["in_bucket"] and not loc["upload_pending"]
    refused.close()
    good.close()


def test_durability_fields_without_a_bucket() -> None:
    assert durability_fields({"commit_ms": 12.34}) == {
        "durability": "local",
        "commit_local_ms": 12.3,
        "commit_bucket_ms": None,
    }
    got = durability_fields(
        {"commit_local_ms": 3.0, "commit_bucket_ms": 40.04, "upload_pending": 0.0}
    )
    assert got == {"durability": "bucket", "commit_local_ms": 3.0, "commit_bucket_ms": 40.0}
