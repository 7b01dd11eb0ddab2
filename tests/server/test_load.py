"""A bounded load test of the API (``torpor bench serve`` with small numbers): sessions
x turns from concurrent clients over SSE against a real server process — no entry lost
or duplicated, every stream complete, every session removed afterwards."""

from __future__ import annotations

import pytest

from tests.server.conftest import Tokens
from torpor.bench.serve import run_serve_bench
from torpor.paths import Paths
from torpor.server.tokens import TokenStore
from torpor.session import Session

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.mark.timeout(900)
def test_load_4_sessions_3_turns_4_clients(paths: Paths, tokens: Tokens, tools_image: str) -> None:
    before = _ids(paths)
    res = run_serve_bench(
        paths, image=tools_image, sessions=4, turns=3, clients=4, overhead_turns=2
    )
    ld = res["load"]
    assert ld["problems"] == []
    assert ld["turns_done"] == 12 and ld["turn_ms"]["n"] == 12
    assert ld["sse_first_event_ms"]["n"] == 12
    assert res["hibernated_listed"] == 4
    assert res["overhead"]["api_turn_ms"]["n"] == 2 and res["overhead"]["library_turn_ms"]["n"] == 2
    rss = res["server_rss_mib"]
    assert rss["start"] > 0 and rss["peak"] >= rss["start"]
    # its sessions removed, its own token revoked
    assert _ids(paths) == before
    mine = [t for t in TokenStore(paths).list() if t.name == "bench-serve"]
    assert mine and not any(t.active() for t in mine)


def _ids(paths: Paths) -> set[str]:
    sessions = Session.list(paths=paths)
    try:
        return {s.id for s in sessions}
    finally:
        for s in sessions:
            s.close()
