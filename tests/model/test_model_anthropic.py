"""The ``anthropic`` provider: the real anthropic library against a local Messages API server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from torpor.errors import SetupError
from torpor.model import (
    STOP_END,
    STOP_MAX_TOKENS,
    STOP_TOOL_CALLS,
    TOOLS,
    ModelAuthError,
    ModelError,
    ModelRateLimitError,
    ModelResponseError,
    ModelTimeoutError,
    ToolCall,
    Usage,
    open_model,
)
from torpor.model.anthropic_messages import PLACEHOLDER_KEY
from torpor.model.errors import ModelConnectionError

from .fakeapi import FakeAPI, anthropic_error, anthropic_message

SHELL, LIST_DIR = TOOLS[0], TOOLS[3]
USER = [{"role": "user", "content": "hello"}]


def _open(api: FakeAPI, **options: object):
    options.setdefault("api_key", "sk-ant-test")
    return open_model("anthropic:claude-test", base_url=api.url, **options)


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def test_plain_answer(api: FakeAPI) -> None:
    api.reply(
        anthropic_message(
            [_text("Hello there.")],
            usage={"input_tokens": 20, "output_tokens": 4, "cache_read_input_tokens": 100},
        )
    )
    with _open(api) as model:
        r = model.complete(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "system", "content": "Be kind."},
                *USER,
            ],
            [],
        )
    assert r.text == "Hello there."
    assert r.tool_calls == ()
    assert r.usage == Usage(120, 4)  # cache reads are input too
    assert r.stop_reason == STOP_END
    assert (r.model, r.response_id) == ("claude-test-1", "msg_test1")
    assert model.name == "anthropic:claude-test"
    [req] = api.requests
    assert req.path == "/v1/messages"
    assert req.headers["anthropic-version"]
    assert req.body == {
        "model": "claude-test",
        "max_tokens": 4096,
        "system": "Be brief.\n\nBe kind.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
    }


def test_tool_call_round_trip(api: FakeAPI) -> None:
    api.reply(
        anthropic_message(
            [
                _text("I'll run it."),
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "shell",
                    "input": {"cmd": "echo hi"},
                },
            ]
        )
    )
    api.reply(anthropic_message([_text("It printed hi.")]))
    model = _open(api, max_tokens=1000)
    messages = [{"role": "system", "content": "You run commands."}, *USER]
    first = model.complete(messages, [SHELL, LIST_DIR])
    assert first.text == "I'll run it."
    assert first.stop_reason == STOP_TOOL_CALLS
    assert first.tool_calls == (ToolCall("toolu_01", "shell", {"cmd": "echo hi"}),)

    messages += [
        first.to_message(),
        {"role": "tool", "tool_call_id": "toolu_01", "name": "shell", "content": "hi\n"},
    ]
    assert model.complete(messages, [SHELL, LIST_DIR]).text == "It printed hi."
    assert api.requests[1].body == {
        "model": "claude-test",
        "max_tokens": 1000,
        "system": "You run commands.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "I'll run it."},
                    {
                        "type": "tool_use",
                        "id": "toolu_01",
                        "name": "shell",
                        "input": {"cmd": "echo hi"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "hi\n"}],
            },
        ],
        "tools": [
            {
                "name": "shell",
                "description": SHELL.description,
                "input_schema": SHELL.parameters,
            },
            {
                "name": "list_dir",
                "description": LIST_DIR.description,
                "input_schema": LIST_DIR.parameters,
            },
        ],
    }


def test_multiple_tool_calls_and_merged_results(api: FakeAPI) -> None:
    api.reply(
        anthropic_message(
            [
                {"type": "tool_use", "id": "toolu_a", "name": "list_dir", "input": {"path": "/"}},
                {"type": "tool_use", "id": "toolu_b", "name": "shell", "input": {"cmd": "false"}},
            ]
        )
    )
    api.reply(anthropic_message([_text("One of them failed.")]))
    model = _open(api)
    first = model.complete(USER, TOOLS)
    assert first.text == ""
    assert [c.id for c in first.tool_calls] == ["toolu_a", "toolu_b"]
    messages = [
        *USER,
        first.to_message(),
        {"role": "tool", "tool_call_id": "toolu_a", "name": "list_dir", "content": "work/"},
        {
            "role": "tool",
            "tool_call_id": "toolu_b",
            "name": "shell",
            "content": "",
            "is_error": True,
        },
        {"role": "user", "content": "and?"},
    ]
    model.complete(messages, TOOLS)
    # consecutive tool results (and the user text after them) form one user turn
    assert api.requests[1].body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_a", "name": "list_dir", "input": {"path": "/"}},
                {"type": "tool_use", "id": "toolu_b", "name": "shell", "input": {"cmd": "false"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "work/"},
                {"type": "tool_result", "tool_use_id": "toolu_b", "is_error": True},
                {"type": "text", "text": "and?"},
            ],
        },
    ]


def test_foreign_tool_ids_are_made_acceptable(api: FakeAPI) -> None:
    api.reply(anthropic_message([_text("ok")]))
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call:1/x", "name": "shell", "arguments": {"cmd": "true"}}],
        },
        {"role": "tool", "tool_call_id": "call:1/x", "name": "shell", "content": "done"},
    ]
    _open(api).complete(messages, TOOLS)
    sent = api.requests[0].body["messages"]
    assert sent[1]["content"][0]["id"] == "call_1_x"
    assert sent[2]["content"][0]["tool_use_id"] == "call_1_x"


def test_max_tokens_stop_reason_and_ignored_blocks(api: FakeAPI) -> None:
    api.reply(
        anthropic_message(
            [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                _text("part one"),
                _text("part two"),
            ],
            stop_reason="max_tokens",
        )
    )
    r = _open(api).complete(USER, [])
    assert r.text == "part one\n\npart two"
    assert r.stop_reason == STOP_MAX_TOKENS


def test_rate_limit_with_retry_after_then_success(api: FakeAPI) -> None:
    api.reply(
        anthropic_error("slow down", "rate_limit_error"), status=429, headers={"retry-after": "1"}
    )
    api.reply(anthropic_message([_text("finally")]))
    r = _open(api, max_retries=2).complete(USER, [])
    assert r.text == "finally"
    assert [q.headers["x-stainless-retry-count"] for q in api.requests] == ["0", "1"]
    # the server saw the retry after Retry-After, not after the library's 0.5 s backoff
    assert api.requests[1].at - api.requests[0].at >= 0.95


def test_rate_limit_forever(api: FakeAPI) -> None:
    api.reply(
        anthropic_error("too many requests", "rate_limit_error"),
        status=429,
        headers={"retry-after-ms": "10"},
        repeat=True,
    )
    with pytest.raises(ModelRateLimitError) as e:
        _open(api, max_retries=3).complete(USER, [])
    assert len(api.requests) == 4
    assert e.value.provider == "anthropic" and e.value.status == 429
    assert "too many requests" in str(e.value)


def test_server_error_then_success(api: FakeAPI) -> None:
    api.reply(anthropic_error("Overloaded", "overloaded_error"), status=529)
    api.reply(anthropic_message([_text("recovered")]))
    assert _open(api, max_retries=1).complete(USER, []).text == "recovered"
    assert len(api.requests) == 2


def test_server_error_forever(api: FakeAPI) -> None:
    api.reply(
        anthropic_error("Internal server error"),
        status=500,
        headers={"retry-after-ms": "5"},
        repeat=True,
    )
    with pytest.raises(ModelError) as e:
        _open(api, max_retries=1).complete(USER, [])
    assert type(e.value) is ModelError
    assert e.value.status == 500 and "Internal server error" in str(e.value)
    assert len(api.requests) == 2


def test_timeout(api: FakeAPI) -> None:
    # Had the timeout been ignored, the late reply would have come back as a success.
    api.reply(anthropic_message([_text("too late")]), delay=3.0, repeat=True)
    with pytest.raises(ModelTimeoutError) as e:
        _open(api, timeout=0.5, max_retries=1).complete(USER, [])
    assert "0.5 s" in str(e.value)
    assert len(api.requests) == 2  # the library retried the timeout once


def test_authentication_error(api: FakeAPI) -> None:
    api.reply(anthropic_error("invalid x-api-key", "authentication_error"), status=401)
    with pytest.raises(ModelAuthError) as e:
        _open(api).complete(USER, [])
    assert len(api.requests) == 1
    assert "invalid x-api-key" in str(e.value)


def test_permission_denied_is_an_auth_error(api: FakeAPI) -> None:
    api.reply(anthropic_error("not allowed", "permission_error"), status=403)
    with pytest.raises(ModelAuthError):
        _open(api).complete(USER, [])


def test_tool_input_that_is_not_an_object(api: FakeAPI) -> None:
    api.reply(anthropic_message([{"type": "tool_use", "id": "t", "name": "shell", "input": "ls"}]))
    with pytest.raises(ModelResponseError) as e:
        _open(api).complete(USER, TOOLS)
    assert e.value.tool == "shell" and "'shell'" in str(e.value)


def test_connection_refused(dead_url: str) -> None:
    model = open_model("anthropic:claude-test", base_url=dead_url, api_key="k", max_retries=0)
    with pytest.raises(ModelConnectionError) as e:
        model.complete(USER, [])
    assert isinstance(e.value, ModelError)
    assert f"cannot reach {dead_url}" in str(e.value)
    assert "refused" in str(e.value).lower()


def test_env_base_url_and_placeholder_key(api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", api.url)
    api.reply(anthropic_message([_text("compatible server")]))
    assert open_model("anthropic:local").complete(USER, []).text == "compatible server"
    assert api.requests[0].headers["authorization"] == f"Bearer {PLACEHOLDER_KEY}"


def test_env_api_key(api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-env")
    api.reply(anthropic_message([_text("ok")]))
    open_model("anthropic:claude-test", base_url=api.url).complete(USER, [])
    # anthropic 2.x sends the API key as a bearer token, not x-api-key
    assert api.requests[0].headers["authorization"] == "Bearer sk-ant-env"


def test_hosted_api_without_key_is_an_auth_error() -> None:
    with pytest.raises(ModelAuthError, match="ANTHROPIC_API_KEY"):
        open_model("anthropic:claude-sonnet-4-5")


def test_missing_library_is_a_setup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anthropic", None)
    with pytest.raises(SetupError, match=r"torpor\[anthropic\]"):
        open_model("anthropic:claude-test", base_url="http://127.0.0.1:9")


def test_no_key_and_no_profile_is_an_auth_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # no ANTHROPIC_CONFIG_DIR: the library looks for a default profile under $HOME, finds none
    monkeypatch.delenv("ANTHROPIC_CONFIG_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    with pytest.raises(ModelAuthError, match="ANTHROPIC_API_KEY"):
        open_model("anthropic:claude-sonnet-4-5")


@pytest.mark.parametrize("content_type", ["application/json", "text/html"])
def test_reply_that_is_not_json(api: FakeAPI, content_type: str) -> None:
    api.reply("<html>proxy error</html>", headers={"content-type": content_type})
    with pytest.raises(ModelResponseError, match="not"):
        _open(api).complete(USER, [])
