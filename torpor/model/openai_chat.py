"""The ``openai`` provider: any OpenAI-compatible chat-completions endpoint.

That is OpenAI itself and the local servers that copy its API (vLLM, Ollama,
llama.cpp ``llama-server``, LM Studio, ...), reached through the ``openai`` library
(extra ``torpor[openai]``), imported only when such a model is opened.

Translation (pure functions, tested against a local server speaking the wire format):

- neutral messages -> chat messages; assistant tool calls carry their arguments as
  a JSON *string*; ``tool`` messages become ``{"role": "tool", "tool_call_id",
  "content"}``.  An assistant message with tool calls and no text sends
  ``content: null``, as the API itself returns it.
- the reply's first choice -> :class:`ModelResponse`; arguments that are not a JSON
  object raise :class:`ModelResponseError` naming the tool; ``finish_reason`` maps
  ``stop`` -> ``end``, ``tool_calls`` -> ``tool_calls``, ``length`` -> ``max_tokens``.

Retries are the library's own (exponential backoff, honouring ``Retry-After`` up
to two minutes) on 408/409/429/5xx, timeouts and connection errors;
what still fails is mapped by :func:`torpor.model.errors.from_sdk_error`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from torpor.errors import SetupError
from torpor.model.errors import ModelAuthError, ModelError, ModelResponseError, call_sdk
from torpor.model.types import (
    STOP_END,
    STOP_MAX_TOKENS,
    STOP_TOOL_CALLS,
    Message,
    Model,
    ModelResponse,
    ToolCall,
    ToolSpec,
    Usage,
    check_messages,
    dumps_arguments,
)

if TYPE_CHECKING:
    import openai

log = logging.getLogger("torpor.model")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Sent as the key when a custom ``base_url`` needs none (vLLM, Ollama, llama.cpp).
PLACEHOLDER_KEY = "torpor-no-key"

_STOP = {
    "stop": STOP_END,
    "tool_calls": STOP_TOOL_CALLS,
    "function_call": STOP_TOOL_CALLS,
    "length": STOP_MAX_TOKENS,
}


def import_openai() -> ModuleType:
    try:
        import openai
    except ImportError as e:
        raise SetupError(
            "the openai provider needs the openai library: pip install 'torpor[openai]'",
            step="open model",
        ) from e
    return openai


def to_openai_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def to_openai_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Neutral messages -> chat-completions messages (a new list; inputs untouched)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        if role in ("system", "user"):
            out.append({"role": role, "content": m.get("content") or ""})
        elif role == "assistant":
            calls = m.get("tool_calls") or []
            msg: dict[str, Any] = {"role": "assistant", "content": m.get("content") or ""}
            if calls:
                msg["content"] = m.get("content") or None
                msg["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {
                            "name": c["name"],
                            "arguments": dumps_arguments(c.get("arguments") or {}),
                        },
                    }
                    for c in calls
                ]
            out.append(msg)
        else:  # tool
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": m["tool_call_id"],
                    "content": m.get("content") or "",
                }
            )
    return out


def _parse_arguments(name: str, raw: Any, finish_reason: str) -> dict[str, Any]:
    if isinstance(raw, dict):  # some servers send an object instead of a string
        return raw
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    cut = " (the reply was cut at the token limit)" if finish_reason == "length" else ""
    try:
        args = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as e:
        raise ModelResponseError(
            f"tool call {name!r} has arguments that are not valid JSON{cut}: {e}: "
            f"{str(raw)[:200]!r}",
            tool=name,
            provider="openai",
        ) from e
    if not isinstance(args, dict):
        raise ModelResponseError(
            f"tool call {name!r} has arguments that are a JSON {type(args).__name__}, "
            f"not an object{cut}",
            tool=name,
            provider="openai",
        )
    return args


def from_openai_completion(data: dict[str, Any], *, latency_ms: float, model: str) -> ModelResponse:
    """A chat-completion reply (as a dict) -> :class:`ModelResponse`."""
    choices = data.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        raise ModelResponseError("the reply has no choices", provider="openai")
    choice = choices[0]
    message = choice.get("message") or {}
    finish = str(choice.get("finish_reason") or "")
    text = message.get("content") or ""
    if not text and message.get("refusal"):
        text, finish = str(message["refusal"]), finish or "refusal"
    calls = []
    for i, raw in enumerate(message.get("tool_calls") or []):
        function = raw.get("function") if isinstance(raw, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            kind = raw.get("type") if isinstance(raw, dict) else type(raw).__name__
            raise ModelResponseError(
                f"tool call {i} is not a function call (type {kind!r})", provider="openai"
            )
        name = function["name"]
        call_id = raw.get("id") or f"{data.get('id') or 'call'}_{i}"
        calls.append(
            ToolCall(str(call_id), name, _parse_arguments(name, function.get("arguments"), finish))
        )
    usage = data.get("usage") or {}
    stop = _STOP.get(finish, finish) or (STOP_TOOL_CALLS if calls else STOP_END)
    if calls and stop == STOP_END:  # e.g. Ollama says "stop" alongside tool calls
        stop = STOP_TOOL_CALLS
    return ModelResponse(
        text=str(text),
        tool_calls=tuple(calls),
        usage=Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)),
        latency_ms=latency_ms,
        model=str(data.get("model") or model),
        stop_reason=stop,
        response_id=str(data.get("id") or ""),
    )


class OpenAIChatModel(Model):
    """``openai:<model>`` — chat completions with function tools."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_retries: int = 4,
        timeout: float = 120.0,
        max_tokens: int | None = None,
    ):
        sdk = import_openai()
        self.name = f"openai:{model}"
        self.model = model
        base = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        self.base_url = base.rstrip("/")
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if self.base_url == DEFAULT_BASE_URL:
                raise ModelAuthError(
                    "no API key for api.openai.com: set OPENAI_API_KEY or pass api_key "
                    "(a local server needs none: set OPENAI_BASE_URL instead)",
                    provider="openai",
                    step="open model",
                )
            key = PLACEHOLDER_KEY
        self.max_retries = max_retries
        self.timeout = timeout
        self.max_tokens = max_tokens
        self._sdk = sdk
        try:
            self._client: openai.OpenAI = sdk.OpenAI(
                api_key=key, base_url=self.base_url, max_retries=max_retries, timeout=timeout
            )
        except sdk.OpenAIError as e:
            raise ModelError(
                f"cannot set up the openai client: {e}", provider="openai", step="open model"
            ) from e

    def complete(
        self,
        messages: list[Message],
        tools: Sequence[ToolSpec],
        *,
        timeout: float | None = None,
    ) -> ModelResponse:
        check_messages(messages)
        kwargs: dict[str, Any] = {"model": self.model, "messages": to_openai_messages(messages)}
        if tools:  # the API rejects an empty list
            kwargs["tools"] = to_openai_tools(tools)
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        if timeout is not None:
            kwargs["timeout"] = timeout
        log.debug(
            "openai request to %s: %d message(s), %d tool(s)",
            self.base_url,
            len(messages),
            len(tools),
        )
        reply, latency_ms = call_sdk(
            self._client.chat.completions.create,
            kwargs,
            self._sdk,
            self._sdk.OpenAIError,
            provider="openai",
            base_url=self.base_url,
            max_retries=self.max_retries,
            timeout=timeout if timeout is not None else self.timeout,
            what="a chat completion",
        )
        response = from_openai_completion(reply, latency_ms=latency_ms, model=self.model)
        log.debug(
            "openai reply: stop=%s, %d tool call(s), usage=%s",
            response.stop_reason,
            len(response.tool_calls),
            response.usage,
        )
        return response

    def close(self) -> None:
        self._client.close()


__all__ = [
    "OpenAIChatModel",
    "from_openai_completion",
    "to_openai_messages",
    "to_openai_tools",
]
