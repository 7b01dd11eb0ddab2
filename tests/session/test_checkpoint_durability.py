"""A checkpoint entry says how its snapshot was durable (issue 12 §1): in the bucket,
locally with the upload pending (``--durability local``), or locally without a
bucket, with both commit timings; ``session show`` and ``session log`` display it.

One VM boot (and one wake): the session checkpoints in each of the three modes.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import torpor_cli
from torpor.session import Session
from torpor.store.tiered import wait_uploads

pytestmark = pytest.mark.vm


def _payload(s: Session, seq: int) -> dict:
    return next(e.payload for e in s.log() if e.seq == seq)


def test_checkpoint_entries_record_durability_and_both_timings(
    paths, tools_image, tmp_path, s3_server, bucket, monkeypatch
) -> None:
    for k, v in s3_server.env(bucket, "torpor").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TORPOR_DURABILITY", "bucket")
    dsn = str(tmp_path / "ctx.db")
    s = Session.create(image=tools_image, model="scripted:demo", paths=paths, dsn=dsn)
    name = s.name
    try:
        p = _payload(s, s.checkpoints[-1].seq)
        assert p["durability"] == "bucket"
        assert p["commit_bucket_ms"] > 0 and p["commit_local_ms"] >= 0

        monkeypatch.setenv("TORPOR_DURABILITY", "local")  # acknowledged, uploaded behind
        p = _payload(s, s.hibernate().seq)
        assert p["durability"] == "local, upload pending"
        assert p["commit_local_ms"] >= 0 and p["commit_bucket_ms"] is None
        assert wait_uploads(120)

        monkeypatch.setenv("TORPOR_STORE", "local")  # no bucket at all
        s.send("hello")  # wakes the VM from the local store, then checkpoints
        p = _payload(s, s.checkpoints[-1].seq)
        assert p["durability"] == "local" and p["commit_bucket_ms"] is None
        assert p["commit_local_ms"] >= 0
    finally:
        s.close()

    env = {"TORPOR_STORE": "local"}
    shown = torpor_cli("session", "--dsn", dsn, "show", name, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    modes = [c["durability"] for c in json.loads(shown.stdout)["checkpoint_list"]]
    assert modes == ["bucket", "local, upload pending", "local"]
    log = torpor_cli("session", "--dsn", dsn, "log", name, env=env)
    assert log.returncode == 0, log.stderr
    text = log.stdout.decode()
    assert "(bucket: local " in text and "(local, upload pending: local " in text
    table = torpor_cli("session", "--dsn", dsn, "show", name, env={**env, "COLUMNS": "200"})
    assert b"local, upload pending" in table.stdout, table.stdout

    with Session.open(name, paths=paths, dsn=dsn) as s:
        s.remove()
