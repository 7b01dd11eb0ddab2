"""A session held by a running turn: ``send(wait=False)`` / ``recover(wait=False)`` answer
ConflictError at once and log nothing (the HTTP API's 409), instead of queueing."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest

from torpor.context import Kind
from torpor.errors import ConflictError
from torpor.session import Session

pytestmark = pytest.mark.vm

SLOW = {
    "version": 1,
    "turns": [
        {
            "steps": [
                {"tool_calls": [{"name": "shell", "arguments": {"cmd": "sleep 6; echo slept"}}]},
                {"text": "done {turn}"},
            ]
        }
    ],
}


def test_send_and_recover_without_waiting_conflict_mid_turn(
    paths, tools_image, tmp_path: Path
) -> None:
    script = tmp_path / "slow.json"
    script.write_text(json.dumps(SLOW))
    s = Session.create(tools_image, f"scripted:{script}", paths=paths)
    other = Session.open(s.id, paths=paths)
    try:
        answers: list[str] = []
        t = threading.Thread(target=lambda: answers.append(s.send("first")))
        t.start()
        deadline = time.monotonic() + 120
        while not any(e.kind is Kind.TOOL_CALL for e in other.entries()):
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.1)
        before = other.entries()[-1].seq
        assert other.busy() and other.status() == "interrupted"
        with pytest.raises(ConflictError, match="busy"):
            other.send("second", wait=False)
        with pytest.raises(ConflictError, match="busy"):
            other.recover(wait=False)
        assert all(e.seq <= before or e.kind is not Kind.USER for e in other.entries())
        t.join(120)
        assert answers == ["done 0"]
        assert not other.busy() and other.status() == "running"
        # once the turn ended, the same call goes through
        assert other.send("second", wait=False) == "done 1"
    finally:
        with contextlib.suppress(Exception):
            s.remove()
        other.close()
        s.close()
