"""The ``openai`` provider: the real openai library against a local chat-completions server."""

from __future__ import annotations

import sys

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
    ModelResponse,
    ModelResponseError,
    ModelTimeoutError,
    ToolCall,
    Usage,
    open_model,
)
from torpor.model.errors import ModelConnectionError
from torpor.model.openai_chat import PLACEHOLDER_KEY

from .fakeapi import FakeAPI, openai_completion, openai_error

SHELL, READ_FILE = TOOLS[0], TOOLS[1]
USER = [{"role": "user", "content": "hello"}]


def _open(api: FakeAPI, **options: object):
    options.setdefault("api_key", "sk-test")
    return open_model("openai:gpt-test", base_url=f"{api.url}/v1", **options)


def test_plain_answer(api: FakeAPI) -> None:
    api.reply(openai_completion(text="Hello there.", usage=(12, 5)))
    with _open(api) as model:
        r = model.complete([{"role": "system", "content": "Be brief."}, *USER], [])
    assert r.text == "Hello there."
    assert r.tool_calls == ()
    assert r.usage == Usage(12, 5)
    assert r.stop_reason == STOP_END
    assert r.model == "gpt-test-0001"
    assert r.response_id == "chatcmpl-test1"
    assert r.latency_ms > 0
    assert model.name == "openai:gpt-test"
    [req] = api.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-test"
    # no tools offered -> no "tools" key at all (the API rejects an empty list)
    assert req.body == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
        ],
    }


def test_tool_call_round_trip(api: FakeAPI) -> None:
    api.reply(
        openai_completion(
            text=None, tool_calls=[("call_abc", "shell", '{"cmd": "echo hi", "timeout": 5}')]
        )
    )
    api.reply(openai_completion(text="It printed hi."))
    model = _open(api)
    messages = [{"role": "system", "content": "You run commands."}, *USER]
    first = model.complete(messages, [SHELL, READ_FILE])
    assert first.text == ""
    assert first.stop_reason == STOP_TOOL_CALLS
    assert first.tool_calls == (ToolCall("call_abc", "shell", {"cmd": "echo hi", "timeout": 5}),)

    messages += [
        first.to_message(),
        {"role": "tool", "tool_call_id": "call_abc", "name": "shell", "content": "hi\n"},
    ]
    snapshot = [dict(m) for m in messages]
    second = model.complete(messages, [SHELL, READ_FILE])
    assert second.text == "It printed hi."
    assert messages == snapshot  # the caller's messages are not mutated

    body = api.requests[1].body
    assert body["messages"] == [
        {"role": "system", "content": "You run commands."},
        {"role": "user", "content": "hello"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "shell", "arguments": '{"cmd": "echo hi", "timeout": 5}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "hi\n"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "shell",
                "description": SHELL.description,
                "parameters": SHELL.parameters,
            },
        },
        {
            "type": "function",
            "function": {
                "name": "read_file",
                "description": READ_FILE.description,
                "parameters": READ_FILE.parameters,
            },
        },
    ]
    assert set(body) == {"model", "messages", "tools"}


def test_multiple_tool_calls_and_text(api: FakeAPI) -> None:
    api.reply(
        openai_completion(
            text="Looking at two things.",
            tool_calls=[
                ("c1", "list_dir", '{"path": "/work"}'),
                ("c2", "read_file", '{"path": "/work/notes.md"}'),
                ("c3", "shell", ""),  # empty arguments string means no arguments
            ],
        )
    )
    r = _open(api).complete(USER, TOOLS)
    assert r.text == "Looking at two things."
    assert [c.name for c in r.tool_calls] == ["list_dir", "read_file", "shell"]
    assert r.tool_calls[1] == ToolCall("c2", "read_file", {"path": "/work/notes.md"})
    assert r.tool_calls[2].arguments == {}
    assert ModelResponse.from_json(r.to_json()) == r


def test_assistant_text_with_tool_calls_and_tool_results_translate(api: FakeAPI) -> None:
    api.reply(openai_completion(text="done"))
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "a", "name": "list_dir", "arguments": {"path": "/"}},
                {"id": "b", "name": "shell", "arguments": {"cmd": "echo ü"}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "name": "list_dir", "content": "work/"},
        {"role": "tool", "tool_call_id": "b", "name": "shell", "content": "ü", "is_error": True},
        {"role": "assistant", "content": "All fine."},
        {"role": "user", "content": "thanks"},
    ]
    _open(api).complete(messages, TOOLS)
    assert api.requests[0].body["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "a",
                    "type": "function",
                    "function": {"name": "list_dir", "arguments": '{"path": "/"}'},
                },
                {
                    "id": "b",
                    "type": "function",
                    "function": {"name": "shell", "arguments": '{"cmd": "echo ü"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "work/"},
        {"role": "tool", "tool_call_id": "b", "content": "ü"},
        {"role": "assistant", "content": "All fine."},
        {"role": "user", "content": "thanks"},
    ]


def test_length_finish_reason_and_missing_usage(api: FakeAPI) -> None:
    api.reply(openai_completion(text="cut sho", finish_reason="length", usage=None))
    r = _open(api).complete(USER, [])
    assert r.stop_reason == STOP_MAX_TOKENS
    assert r.usage == Usage(0, 0)


def test_max_tokens_is_sent_only_when_given(api: FakeAPI) -> None:
    api.reply(openai_completion(text="a"))
    api.reply(openai_completion(text="b"))
    _open(api).complete(USER, [])
    _open(api, max_tokens=77).complete(USER, [])
    assert "max_tokens" not in api.requests[0].body
    assert api.requests[1].body["max_tokens"] == 77


def test_rate_limit_with_retry_after_then_success(api: FakeAPI) -> None:
    api.reply(
        openai_error("slow down", "rate_limit_error"), status=429, headers={"retry-after": "1"}
    )
    api.reply(openai_completion(text="finally"))
    r = _open(api, max_retries=2).complete(USER, [])
    assert r.text == "finally"
    assert len(api.requests) == 2
    assert [q.headers["x-stainless-retry-count"] for q in api.requests] == ["0", "1"]
    # The library's own backoff would retry within 0.5 s: the server saw the retry only
    # after the Retry-After second (a lower bound: a slow machine only widens the gap).
    gap = api.requests[1].at - api.requests[0].at
    assert gap >= 0.95
    assert r.latency_ms >= gap * 1000  # latency includes the retries


def test_rate_limit_forever(api: FakeAPI) -> None:
    api.reply(
        openai_error("quota exceeded", "rate_limit_error"),
        status=429,
        headers={"retry-after-ms": "10"},
        repeat=True,
    )
    with pytest.raises(ModelRateLimitError) as e:
        _open(api, max_retries=2).complete(USER, [])
    assert len(api.requests) == 3
    assert e.value.status == 429
    assert e.value.provider == "openai"
    assert "quota exceeded" in str(e.value)
    assert "after 2 retries" in str(e.value)
    assert e.value.exit_code == 12


def test_server_error_then_success(api: FakeAPI) -> None:
    api.reply(openai_error("boom"), status=500)
    api.reply(openai_completion(text="recovered"))
    r = _open(api, max_retries=1).complete(USER, [])
    assert r.text == "recovered"
    assert len(api.requests) == 2


def test_server_error_forever_names_status_and_message(api: FakeAPI) -> None:
    api.reply(
        openai_error("model overloaded"), status=503, headers={"retry-after-ms": "5"}, repeat=True
    )
    with pytest.raises(ModelError) as e:
        _open(api, max_retries=1).complete(USER, [])
    assert type(e.value) is ModelError
    assert e.value.status == 503
    assert "HTTP 503" in str(e.value) and "model overloaded" in str(e.value)


def test_bad_request_is_not_retried(api: FakeAPI) -> None:
    api.reply(openai_error("context too long", "invalid_request_error"), status=400, repeat=True)
    with pytest.raises(ModelError) as e:
        _open(api).complete(USER, [])
    assert len(api.requests) == 1
    assert e.value.status == 400 and "context too long" in str(e.value)


def test_timeout(api: FakeAPI) -> None:
    # Had the timeout been ignored, the late reply would have come back as a success.
    api.reply(openai_completion(text="too late"), delay=3.0, repeat=True)
    with pytest.raises(ModelTimeoutError) as e:
        _open(api, timeout=0.5, max_retries=1).complete(USER, [])
    assert len(api.requests) == 2  # the library retried the timeout once
    assert "0.5 s" in str(e.value)


def test_per_call_timeout_overrides_the_default(api: FakeAPI) -> None:
    api.reply(openai_completion(text="too late"), delay=3.0, repeat=True)
    model = _open(api, timeout=60, max_retries=0)
    with pytest.raises(ModelTimeoutError) as e:  # under the default, "too late" would do
        model.complete(USER, [], timeout=0.3)
    assert "0.3 s" in str(e.value)
    assert len(api.requests) == 1


def test_authentication_error(api: FakeAPI) -> None:
    api.reply(openai_error("Incorrect API key provided", "invalid_request_error"), status=401)
    with pytest.raises(ModelAuthError) as e:
        _open(api, api_key="sk-wrong").complete(USER, [])
    assert len(api.requests) == 1
    assert e.value.status == 401 and "Incorrect API key" in str(e.value)


def test_malformed_tool_arguments(api: FakeAPI) -> None:
    api.reply(openai_completion(tool_calls=[("c1", "write_file", '{"path": "/x", "content": ')]))
    with pytest.raises(ModelResponseError) as e:
        _open(api).complete(USER, TOOLS)
    assert e.value.tool == "write_file"
    assert "'write_file'" in str(e.value) and "not valid JSON" in str(e.value)


def test_tool_arguments_that_are_not_an_object(api: FakeAPI) -> None:
    api.reply(openai_completion(tool_calls=[("c1", "shell", '["ls"]')]))
    with pytest.raises(ModelResponseError, match=r"'shell'.*list, not an object"):
        _open(api).complete(USER, TOOLS)


def test_reply_without_choices(api: FakeAPI) -> None:
    api.reply({"id": "x", "object": "chat.completion", "model": "m", "choices": []})
    with pytest.raises(ModelResponseError, match="no choices"):
        _open(api).complete(USER, [])


def test_connection_refused(dead_url: str) -> None:
    model = open_model("openai:gpt-test", base_url=f"{dead_url}/v1", api_key="k", max_retries=0)
    with pytest.raises(ModelConnectionError) as e:
        model.complete(USER, [])
    assert isinstance(e.value, ModelError)
    msg = str(e.value)
    assert f"cannot reach {dead_url}/v1" in msg
    assert "refused" in msg.lower()


def test_env_base_url_and_placeholder_key(api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", f"{api.url}/v1")
    api.reply(openai_completion(text="local model"))
    model = open_model("openai:llama3.1:8b")
    assert model.name == "openai:llama3.1:8b"
    assert model.complete(USER, []).text == "local model"
    req = api.requests[0]
    assert req.headers["authorization"] == f"Bearer {PLACEHOLDER_KEY}"
    assert req.body["model"] == "llama3.1:8b"


def test_env_api_key(api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    api.reply(openai_completion(text="ok"))
    open_model("openai:gpt-test", base_url=f"{api.url}/v1").complete(USER, [])
    assert api.requests[0].headers["authorization"] == "Bearer sk-from-env"


def test_hosted_api_without_key_is_an_auth_error() -> None:
    with pytest.raises(ModelAuthError, match="OPENAI_API_KEY"):
        open_model("openai:gpt-4.1")


def test_missing_library_is_a_setup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # makes `import openai` fail
    with pytest.raises(SetupError, match=r"torpor\[openai\]"):
        open_model("openai:gpt-test", base_url="http://127.0.0.1:9/v1")


def test_tool_calls_with_finish_reason_stop_still_say_tool_calls(api: FakeAPI) -> None:
    # some local servers (Ollama) report "stop" next to tool calls
    api.reply(openai_completion(tool_calls=[("c", "shell", '{"cmd": "ls"}')], finish_reason="stop"))
    assert _open(api).complete(USER, TOOLS).stop_reason == STOP_TOOL_CALLS


def test_null_content_in_neutral_messages_is_accepted(api: FakeAPI) -> None:
    api.reply(openai_completion(text="ok"))
    _open(api).complete([*USER, {"role": "assistant", "content": None}, *USER], [])
    assert api.requests[0].body["messages"][1] == {"role": "assistant", "content": ""}


def test_retry_after_beyond_the_library_limit_is_not_waited_for(api: FakeAPI) -> None:
    # openai 3.x refuses to retry when Retry-After exceeds two minutes: fail at once
    api.reply(
        openai_error("come back tomorrow", "rate_limit_error"),
        status=429,
        headers={"retry-after": "86400"},
        repeat=True,
    )
    # (waiting a day would end in the test's timeout: a failure too)
    with pytest.raises(ModelRateLimitError) as e:
        _open(api, max_retries=3).complete(USER, [])
    assert len(api.requests) == 1
    assert "after 0 retries" in str(e.value)


@pytest.mark.parametrize("content_type", ["application/json", "text/html"])
def test_reply_that_is_not_json(api: FakeAPI, content_type: str) -> None:
    api.reply("<html>proxy error</html>", headers={"content-type": content_type})
    with pytest.raises(ModelResponseError, match="not"):
        _open(api).complete(USER, [])
