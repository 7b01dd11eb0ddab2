"""Sessions driven by the network providers: the real ``openai`` / ``anthropic`` client
libraries talk to a local server speaking their wire formats; tools run in a real VM."""

from __future__ import annotations

import json

import pytest

from tests.model.fakeapi import (
    FakeAPI,
    anthropic_error,
    anthropic_message,
    openai_completion,
    openai_error,
)
from torpor.context import Kind
from torpor.model import ModelAuthError, open_model
from torpor.session import Session
from torpor.vmm.manager import VMManager

pytestmark = pytest.mark.vm


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "anthropic-config"))
    server = FakeAPI()
    yield server
    server.close()


def _session(paths, image, model) -> Session:
    return Session.create(image, model, paths=paths)


def test_openai_tool_calls_run_in_the_vm(api: FakeAPI, paths, tools_image) -> None:
    model = open_model("openai:gpt-test", base_url=api.url + "/v1", api_key="k", max_retries=2)
    s = _session(paths, tools_image, model)
    try:
        cmd = json.dumps({"cmd": "mkdir -p /w && echo hi | tee /w/x"})
        api.reply(openai_completion(tool_calls=[("call_1", "shell", cmd)]))
        api.reply(openai_error("overloaded"), status=429, headers={"retry-after": "0"})
        api.reply(openai_completion(text="wrote hi to /w/x"))
        assert s.send("write hi to /w/x") == "wrote hi to /w/x"
        bodies = [b for b in api.bodies if isinstance(b, dict)]
        assert len(bodies) == 3  # the rate-limited request was retried by the library
        last = bodies[-1]["messages"]
        assert last[-1] == {"role": "tool", "tool_call_id": "call_1", "content": "hi\n"}
        assert last[1] == {"role": "user", "content": "write hi to /w/x"}
        assert {t["function"]["name"] for t in bodies[0]["tools"]} == {
            "shell",
            "read_file",
            "write_file",
            "list_dir",
        }
        with VMManager(paths).client(s.vm()) as c:
            assert c.read_file("/w/x") == b"hi\n"
        resp = [e for e in s.log() if e.kind == Kind.MODEL_RESPONSE]
        assert resp[0].payload["usage"] == {"input_tokens": 12, "output_tokens": 5}
        # a model failure ends the turn cleanly: error entry, checkpoint, nothing pending
        api.reply(openai_error("bad key", type="invalid_request_error"), status=401)
        with pytest.raises(ModelAuthError):
            s.send("again")
        kinds = [e.kind for e in s.log()]
        assert kinds[-2:] == [Kind.ERROR, Kind.CHECKPOINT]
        assert s.status() == "running"
        api.reply(openai_completion(text="fine now"))
        assert s.send("and now?") == "fine now"
    finally:
        s.remove()
        s.close()


def test_anthropic_tool_use_round_trip(api: FakeAPI, paths, tools_image) -> None:
    model = open_model("anthropic:claude-test", base_url=api.url, api_key="k", max_retries=2)
    s = _session(paths, tools_image, model)
    try:
        api.reply(
            anthropic_message(
                [
                    {"type": "text", "text": "Looking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "read_file",
                        "input": {"path": "/etc/hostname-missing"},
                    },
                    {
                        "type": "tool_use",
                        "id": "toolu_2",
                        "name": "list_dir",
                        "input": {"path": "/"},
                    },
                ]
            )
        )
        api.reply(anthropic_error("busy", "overloaded_error"), status=529)
        api.reply(anthropic_message([{"type": "text", "text": "done"}]))
        assert s.send("look around") == "done"
        bodies = [b for b in api.bodies if isinstance(b, dict)]
        results = bodies[-1]["messages"][-1]
        assert results["role"] == "user"
        blocks = results["content"]
        assert [b["tool_use_id"] for b in blocks] == ["toolu_1", "toolu_2"]
        assert blocks[0]["is_error"] is True  # the missing file is an error the model sees
        assert "bin" in json.dumps(blocks[1]["content"])
        tool_results = [e.payload for e in s.log() if e.kind == Kind.TOOL_RESULT]
        assert [r["is_error"] for r in tool_results] == [True, False]
    finally:
        s.remove()
        s.close()
