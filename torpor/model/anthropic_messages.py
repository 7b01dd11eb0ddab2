"""The ``anthropic`` provider: the Anthropic Messages API (and servers that copy it).

Reached through the ``anthropic`` library (extra ``torpor[anthropic]``), imported
only when such a model is opened.

Translation (pure functions, tested against a local server speaking the wire format):

- ``system`` messages are joined (blank line between) into the ``system=`` field.
- user text -> a ``text`` block; tool results -> ``tool_result`` blocks
  (``is_error`` forwarded) in a *user* turn; assistant text and tool calls ->
  ``text`` + ``tool_use`` blocks.  Consecutive messages that land on the same role
  are merged into one turn (the API wants the roles to alternate), so the results
  of several tool calls travel together, in order.
- Tool ids are kept, except characters the API refuses in ids (anything outside
  ``[A-Za-z0-9_-]``, e.g. from a log written by another provider) become ``_``,
  consistently in ``tool_use`` and ``tool_result``.
- reply ``text`` blocks are joined with a blank line; ``tool_use`` blocks become
  tool calls; ``stop_reason`` maps ``end_turn``/``stop_sequence`` -> ``end``,
  ``tool_use`` -> ``tool_calls``, ``max_tokens`` -> ``max_tokens``; input usage
  counts cache reads and writes too.

Retries are the library's own (exponential backoff honouring ``Retry-After``) on
408/409/429/5xx, timeouts and connection errors; what still fails is mapped by
:func:`torpor.model.errors.from_sdk_error`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from torpor.errors import SetupError
from torpor.model.errors import ModelAuthError, ModelResponseError, call_sdk
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
)

if TYPE_CHECKING:
    import anthropic

log = logging.getLogger("torpor.model")

DEFAULT_BASE_URL = "https://api.anthropic.com"
#: Sent as the key when a custom ``base_url`` needs none.
PLACEHOLDER_KEY = "torpor-no-key"

_STOP = {
    "end_turn": STOP_END,
    "stop_sequence": STOP_END,
    "tool_use": STOP_TOOL_CALLS,
    "max_tokens": STOP_MAX_TOKENS,
}
_BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def import_anthropic() -> ModuleType:
    try:
        import anthropic
    except ImportError as e:
        raise SetupError(
            "the anthropic provider needs the anthropic library: pip install 'torpor[anthropic]'",
            step="open model",
        ) from e
    return anthropic


def _tool_id(call_id: str) -> str:
    return _BAD_ID_CHARS.sub("_", call_id) or "_"


def to_anthropic_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools
    ]


def to_anthropic_messages(
    messages: Sequence[Message],
) -> tuple[str | None, list[dict[str, Any]]]:
    """Neutral messages -> ``(system, messages)`` for the Messages API."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        content = m.get("content") or ""
        blocks: list[dict[str, Any]] = []
        if role == "system":
            if content:
                system.append(content)
            continue
        if role == "user":
            if content:  # the API refuses empty text blocks
                blocks.append({"type": "text", "text": content})
        elif role == "assistant":
            if content:
                blocks.append({"type": "text", "text": content})
            blocks.extend(
                {
                    "type": "tool_use",
                    "id": _tool_id(c["id"]),
                    "name": c["name"],
                    "input": c.get("arguments") or {},
                }
                for c in m.get("tool_calls") or ()
            )
        else:  # tool
            role = "user"
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": _tool_id(m["tool_call_id"]),
            }
            if content:
                block["content"] = content
            if m.get("is_error"):
                block["is_error"] = True
            blocks.append(block)
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return ("\n\n".join(system) or None), out


def from_anthropic_message(data: dict[str, Any], *, latency_ms: float, model: str) -> ModelResponse:
    """A Messages API reply (as a dict) -> :class:`ModelResponse`."""
    blocks = data.get("content")
    if not isinstance(blocks, list):
        raise ModelResponseError("the reply has no content blocks", provider="anthropic")
    texts: list[str] = []
    calls: list[ToolCall] = []
    for i, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if block.get("text"):
                texts.append(str(block["text"]))
        elif kind == "tool_use":
            name = block.get("name")
            if not isinstance(name, str):
                raise ModelResponseError(f"tool_use block {i} has no name", provider="anthropic")
            arguments = block.get("input")
            if arguments is None:
                arguments = {}
            if not isinstance(arguments, dict):
                raise ModelResponseError(
                    f"tool call {name!r} has input that is a {type(arguments).__name__}, "
                    "not an object",
                    tool=name,
                    provider="anthropic",
                )
            calls.append(ToolCall(str(block.get("id") or f"toolu_{i}"), name, arguments))
        else:  # thinking, server tools, ...: nothing the session can act on
            log.debug("anthropic reply: ignoring a %r content block", kind)
    usage = data.get("usage") or {}
    input_tokens = sum(
        int(usage.get(k) or 0)
        for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    raw_stop = str(data.get("stop_reason") or "")
    stop = _STOP.get(raw_stop, raw_stop) or (STOP_TOOL_CALLS if calls else STOP_END)
    if calls and stop == STOP_END:  # e.g. Ollama says "stop" alongside tool calls
        stop = STOP_TOOL_CALLS
    return ModelResponse(
        text="\n\n".join(texts),
        tool_calls=tuple(calls),
        usage=Usage(input_tokens, int(usage.get("output_tokens") or 0)),
        latency_ms=latency_ms,
        model=str(data.get("model") or model),
        stop_reason=stop,
        response_id=str(data.get("id") or ""),
    )


class AnthropicModel(Model):
    """``anthropic:<model>`` — the Messages API with client tools."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_retries: int = 4,
        timeout: float = 120.0,
        max_tokens: int = 4096,
    ):
        sdk = import_anthropic()
        self.name = f"anthropic:{model}"
        self.model = model
        base = base_url or os.environ.get("ANTHROPIC_BASE_URL")
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not key and base and not os.environ.get("ANTHROPIC_AUTH_TOKEN"):
            key = PLACEHOLDER_KEY
        self.base_url = (base or DEFAULT_BASE_URL).rstrip("/")
        self.max_retries = max_retries
        self.timeout = timeout
        self.max_tokens = max_tokens
        self._sdk = sdk
        # without a key the library still tries ANTHROPIC_AUTH_TOKEN and its profiles
        try:
            self._client: anthropic.Anthropic = sdk.Anthropic(
                api_key=key, base_url=self.base_url, max_retries=max_retries, timeout=timeout
            )
        except sdk.AnthropicError as e:
            raise ModelAuthError(
                f"no usable credentials for the Anthropic API (set ANTHROPIC_API_KEY or pass "
                f"api_key): {e}",
                provider="anthropic",
                step="open model",
            ) from e
        c = self._client
        if c.api_key is None and c.auth_token is None and c.credentials is None:
            c.close()
            raise ModelAuthError(
                "no API key for the Anthropic API: set ANTHROPIC_API_KEY or pass api_key",
                provider="anthropic",
                step="open model",
            )

    def complete(
        self,
        messages: list[Message],
        tools: Sequence[ToolSpec],
        *,
        timeout: float | None = None,
    ) -> ModelResponse:
        check_messages(messages)
        system, wire = to_anthropic_messages(messages)
        kwargs: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": wire,
        }
        if system is not None:
            kwargs["system"] = system
        if tools:
            kwargs["tools"] = to_anthropic_tools(tools)
        if timeout is not None:
            kwargs["timeout"] = timeout
        log.debug(
            "anthropic request to %s: %d message(s), %d tool(s)",
            self.base_url,
            len(messages),
            len(tools),
        )
        reply, latency_ms = call_sdk(
            self._client.messages.create,
            kwargs,
            self._sdk,
            self._sdk.AnthropicError,
            provider="anthropic",
            base_url=self.base_url,
            max_retries=self.max_retries,
            timeout=timeout if timeout is not None else self.timeout,
            what="a message",
        )
        response = from_anthropic_message(reply, latency_ms=latency_ms, model=self.model)
        log.debug(
            "anthropic reply: stop=%s, %d tool call(s), usage=%s",
            response.stop_reason,
            len(response.tool_calls),
            response.usage,
        )
        return response

    def close(self) -> None:
        self._client.close()


__all__ = [
    "AnthropicModel",
    "from_anthropic_message",
    "to_anthropic_messages",
    "to_anthropic_tools",
]
