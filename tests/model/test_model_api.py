"""The public surface: open_model specs and options, response documents, errors, tool specs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from torpor.errors import TorporError, UsageError
from torpor.model import (
    PROVIDERS,
    TOOL_NAMES,
    TOOLS,
    Model,
    ModelAuthError,
    ModelError,
    ModelRateLimitError,
    ModelResponse,
    ModelResponseError,
    ModelTimeoutError,
    ScriptedModel,
    ToolCall,
    ToolSpec,
    Usage,
    open_model,
)
from torpor.model.errors import ModelConnectionError
from torpor.model.openai_chat import OpenAIChatModel


@pytest.mark.parametrize(
    "spec",
    ["", "demo", "nope:model", "openai:", "anthropic:  ", "scripted:", "scripted:no-such-script"],
)
def test_bad_specs_list_providers_and_builtin_scripts(spec: str) -> None:
    with pytest.raises(UsageError) as e:
        open_model(spec)
    msg = str(e.value)
    for provider in PROVIDERS:
        assert provider in msg
    assert "scripted:demo" in msg and "scripted:bench" in msg
    assert e.value.exit_code == 2


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"temperature": 0.2}, "unknown model option.*temperature"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"api_key": 123}, "api_key"),
    ],
)
def test_bad_options(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        open_model("scripted:demo", **options)


def test_options_are_accepted_by_every_provider_and_defaults_apply() -> None:
    opts = {"base_url": "http://127.0.0.1:9/v1", "api_key": "k", "max_tokens": 10}
    assert isinstance(open_model("scripted:bench", **opts), ScriptedModel)
    m = open_model("openai:m", base_url="http://127.0.0.1:9/v1", max_retries=None)
    assert isinstance(m, OpenAIChatModel)
    assert (m.max_retries, m.timeout, m.max_tokens) == (4, 120.0, None)
    a = open_model("anthropic:m", base_url="http://127.0.0.1:9", timeout=5)
    assert (a.max_retries, a.timeout, a.max_tokens) == (4, 5.0, 4096)  # type: ignore[attr-defined]
    assert repr(a) == "<AnthropicModel anthropic:m>"


def test_response_json_round_trip() -> None:
    r = ModelResponse(
        text="hi",
        tool_calls=(ToolCall("c1", "shell", {"cmd": "ls", "timeout": 2.5}),),
        usage=Usage(10, 3),
        latency_ms=12.5,
        model="m",
        stop_reason="tool_calls",
        response_id="r1",
    )
    doc = json.loads(json.dumps(r.to_json()))
    assert doc == {
        "text": "hi",
        "tool_calls": [{"id": "c1", "name": "shell", "arguments": {"cmd": "ls", "timeout": 2.5}}],
        "usage": {"input_tokens": 10, "output_tokens": 3},
        "latency_ms": 12.5,
        "model": "m",
        "stop_reason": "tool_calls",
        "response_id": "r1",
    }
    assert ModelResponse.from_json(doc) == r
    assert r.to_message() == {
        "role": "assistant",
        "content": "hi",
        "tool_calls": [{"id": "c1", "name": "shell", "arguments": {"cmd": "ls", "timeout": 2.5}}],
    }


def test_response_json_defaults_and_garbage() -> None:
    r = ModelResponse.from_json({"text": "only text"})
    assert r == ModelResponse("only text", (), Usage(0, 0), 0.0, "", "end", "")
    assert r.to_message() == {"role": "assistant", "content": "only text"}
    for bad in (None, [], {"tool_calls": [{"name": "x"}]}, {"usage": {"input_tokens": "many"}}):
        with pytest.raises(UsageError, match="not a model response"):
            ModelResponse.from_json(bad)  # type: ignore[arg-type]


def test_error_tree() -> None:
    for cls in (
        ModelRateLimitError,
        ModelTimeoutError,
        ModelResponseError,
        ModelAuthError,
        ModelConnectionError,
    ):
        assert issubclass(cls, ModelError)
        assert cls.exit_code == 12
    assert issubclass(ModelError, TorporError)
    e = ModelError("boom", provider="openai", status=500, step="openai request")
    assert str(e) == "openai request: boom"
    assert (e.provider, e.status) == ("openai", 500)


def test_tool_specs() -> None:
    assert TOOL_NAMES == ("shell", "read_file", "write_file", "list_dir")
    by_name = {t.name: t for t in TOOLS}
    assert by_name["shell"].parameters["required"] == ["cmd"]
    assert by_name["shell"].parameters["properties"]["timeout"]["type"] == "number"
    assert by_name["shell"].parameters["properties"]["max_output"]["type"] == "integer"
    assert by_name["write_file"].parameters["required"] == ["path", "content"]
    for t in TOOLS:
        assert isinstance(t, ToolSpec) and t.description
        assert t.parameters["type"] == "object"
        assert set(t.parameters["required"]) <= set(t.parameters["properties"])
        json.dumps(t.parameters)  # plain JSON, as sent on the wire


def test_model_is_abstract_and_a_context_manager() -> None:
    with pytest.raises(TypeError):
        Model()  # type: ignore[abstract]
    with open_model("scripted:demo") as m:
        assert m.name == "scripted:demo"
