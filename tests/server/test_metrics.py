"""/metrics: Prometheus text format, fed by real turns; per namespace, and a tenant sees
only its own namespace."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from tests.server.test_sessions_api import ECHO_SCRIPT

pytestmark = pytest.mark.vm

SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (-?[0-9.e+]+|\+Inf|NaN)$")


def parse(text: str) -> dict[str, float]:
    """Every sample line as ``name{labels}`` → value; fails on a line that is neither a
    sample nor a ``# HELP`` / ``# TYPE`` comment (the format must parse)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            continue
        m = SAMPLE.match(line)
        assert m, f"not Prometheus text: {line!r}"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_metrics_count_turns_checkpoints_and_sessions(
    app, api: TestClient, other_api: TestClient, tools_image: str
) -> None:
    before = parse(api.get("/metrics").text)
    r = api.post("/v1/sessions", json={"script": ECHO_SCRIPT})
    assert r.status_code == 201
    sid = r.json()["id"]
    try:
        api.post(f"/v1/sessions/{sid}/messages", json={"text": "m"}).raise_for_status()
        api.post(f"/v1/sessions/{sid}/hibernate").raise_for_status()
        api.post(f"/v1/sessions/{sid}/wake").raise_for_status()
        r = api.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = parse(r.text)
        ns = '{namespace="default"}'

        def grew(name: str, by: float = 1) -> bool:
            return m[name] >= before.get(name, 0) + by

        assert grew(f"torpor_turn_seconds_count{ns}")
        assert (
            m['torpor_turn_seconds_bucket{namespace="default",le="+Inf"}']
            == m[f"torpor_turn_seconds_count{ns}"]
        )
        # create, the turn and the hibernation each checkpointed
        assert grew(f"torpor_checkpoint_pause_ms_count{ns}", 3)
        assert grew(f"torpor_checkpoint_durable_ms_count{ns}", 3)
        assert m[f"torpor_checkpoint_durable_ms_sum{ns}"] > 0
        assert grew(f"torpor_resume_ms_count{ns}")
        assert m[f"torpor_stored_bytes{ns}"] > 0
        assert m['torpor_sessions{namespace="default",status="running"}'] >= 1
        assert m[f"torpor_vms_running{ns}"] >= 1
        # a tenant of another namespace sees its own numbers only
        other = parse(other_api.get("/metrics").text)
        assert other and all('namespace="other"' in k for k in other)
        assert other['torpor_sessions{namespace="other",status="running"}'] == 0
        with TestClient(app) as anon:
            assert anon.get("/metrics").status_code == 401
    finally:
        api.delete(f"/v1/sessions/{sid}")
