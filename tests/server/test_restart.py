"""kill -9 of ``torpor serve`` mid-turn, then a new server on the same home: the session
is found, its interrupted turn recovered at start-up (as ``torpor session recover``
does), its VM running."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import LiveServer, Tokens, start_server
from tests.server.test_sessions_api import SLOW_SCRIPT
from torpor.paths import Paths
from torpor.session import Session
from torpor.vmm.manager import VMManager

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_kill9_mid_turn_then_restart_recovers_the_turn(
    live_server: LiveServer, tokens: Tokens, paths: Paths, tools_image: str, tmp_path: Path
) -> None:
    h = {"Authorization": f"Bearer {tokens.default}"}
    c = httpx.Client(base_url=live_server.url, headers=h, timeout=180)
    r = c.post("/v1/sessions", json={"script": SLOW_SCRIPT, "name": "restart-me"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    old_vm = r.json()["vm"]["id"]

    def send() -> None:
        # the server dies under this request
        with contextlib.suppress(httpx.HTTPError), httpx.Client(headers=h, timeout=180) as c1:
            c1.post(f"{live_server.url}/v1/sessions/{sid}/messages", json={"text": "survive this"})

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    deadline = time.monotonic() + 120
    while not any(
        e["kind"] == "tool_call" for e in c.get(f"/v1/sessions/{sid}/log").json()["entries"]
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    live_server.proc.send_signal(signal.SIGKILL)
    live_server.proc.wait(10)
    sender.join(30)
    with Session.open(sid, paths=paths) as s:
        assert s.status() == "interrupted" and not s.busy()  # open, and nobody runs it

    srv = start_server(paths.root, tmp_path / "serve2.log")
    try:
        c2 = httpx.Client(base_url=srv.url, headers=h, timeout=60)
        deadline = time.monotonic() + 240
        while True:
            got = c2.get(f"/v1/sessions/{sid}").json()
            if got["status"] == "running" and got["turns"] == 1:
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.5)
        assert got["vm"]["status"] == "running" and got["vm"]["id"] != old_vm
        entries = c2.get(f"/v1/sessions/{sid}/log", params={"limit": 1000}).json()["entries"]
        kinds = [e["kind"] for e in entries]
        assert "supersede" in kinds and kinds[-1] == "checkpoint"
        vm_entries = [e for e in entries if e["kind"] == "vm"]
        assert vm_entries[-1]["payload"]["reason"] == "recover"
        answers = [e["payload"]["text"] for e in entries if e["kind"] == "model_response"]
        assert answers[-1] == "slow turn 0 done"
        users = [e for e in entries if e["kind"] == "user"]
        assert [u["payload"]["content"] for u in users] == ["survive this"]  # acknowledged once
        # the old VM (which ran the cut tool call) was replaced, not left running
        assert old_vm not in {v.id for v in VMManager(paths).list()}
        c2.delete(f"/v1/sessions/{sid}")
    finally:
        srv.stop()
