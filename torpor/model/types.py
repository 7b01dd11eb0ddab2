"""Provider-neutral values: tool specs, tool calls, responses, messages, and :class:`Model`.

Messages are plain dicts, exactly what the session builds from its context log::

    {"role": "system",    "content": str}
    {"role": "user",      "content": str}
    {"role": "assistant", "content": str, "tool_calls": [{"id", "name", "arguments": dict}]}
    {"role": "tool",      "tool_call_id": str, "name": str, "content": str, "is_error"?: bool}

``tool_calls`` is optional on assistant messages; ``is_error`` is optional on tool
messages (Anthropic forwards it as ``tool_result.is_error``; OpenAI has no such
field).  Providers translate these to their wire format and never mutate them.

``stop_reason`` is normalised across providers to :data:`STOP_END` (the model is
done), :data:`STOP_TOOL_CALLS` or :data:`STOP_MAX_TOKENS`; any other reason a
server gives (``content_filter``, ``refusal``, ...) is passed through unchanged.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from torpor.errors import UsageError

#: The model finished its answer.
STOP_END = "end"
#: The model wants the tool calls in ``ModelResponse.tool_calls`` run.
STOP_TOOL_CALLS = "tool_calls"
#: The answer was cut at the token limit.
STOP_MAX_TOKENS = "max_tokens"

ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, Any]


@dataclass(frozen=True)
class ToolSpec:
    """A tool offered to the model; ``parameters`` is a JSON schema of type object."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class ModelResponse:
    text: str  # may be "" when the reply is only tool calls
    tool_calls: tuple[ToolCall, ...]
    usage: Usage = field(default_factory=Usage)
    latency_ms: float = 0.0
    model: str = ""
    stop_reason: str = STOP_END
    response_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tool_calls": [c.to_json() for c in self.tool_calls],
            "usage": {
                "input_tokens": self.usage.input_tokens,
                "output_tokens": self.usage.output_tokens,
            },
            "latency_ms": self.latency_ms,
            "model": self.model,
            "stop_reason": self.stop_reason,
            "response_id": self.response_id,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelResponse:
        """Inverse of :meth:`to_json`; missing fields take their defaults.

        Raises :class:`~torpor.errors.UsageError` when ``d`` is not such a document.
        """
        try:
            if not isinstance(d, dict):
                raise TypeError(f"expected an object, got {type(d).__name__}")
            calls = tuple(
                ToolCall(str(c["id"]), str(c["name"]), dict(c.get("arguments") or {}))
                for c in d.get("tool_calls") or ()
            )
            u = d.get("usage") or {}
            return cls(
                text=str(d.get("text") or ""),
                tool_calls=calls,
                usage=Usage(int(u.get("input_tokens", 0)), int(u.get("output_tokens", 0))),
                latency_ms=float(d.get("latency_ms", 0.0)),
                model=str(d.get("model", "")),
                stop_reason=str(d.get("stop_reason", STOP_END)),
                response_id=str(d.get("response_id", "")),
            )
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise UsageError(f"not a model response document: {e}") from e

    def to_message(self) -> Message:
        """The neutral assistant message that records this response in a conversation."""
        msg: Message = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_json() for c in self.tool_calls]
        return msg


class Conversation(Sequence[Message]):
    """The conversation a session hands a model that takes one (:attr:`Model.lazy_messages`):
    a read-only sequence of message dicts that knows its size without reading it.

    ``len()``, :attr:`users` (how many messages have role ``user``) and :attr:`chars` (the
    total length of every message's ``content``) are kept as the log is folded; the
    messages themselves may be decoded only when indexed or iterated, so a model that
    reads only the tail of a long conversation never decodes the rest.  Every message in
    it was built by the session from its log (the shapes :func:`check_messages` accepts).
    """

    @property
    @abstractmethod
    def users(self) -> int:
        """How many messages have role ``user``."""

    @property
    @abstractmethod
    def chars(self) -> int:
        """``sum(len(m.get("content") or "") for m in self)``, without reading them."""


def check_messages(messages: Sequence[Message]) -> None:
    """Validate the neutral message shape; raise :class:`UsageError` naming the bad one."""
    for i, m in enumerate(messages):
        check_message(i, m)


def check_message(i: int, m: Any) -> None:
    """:func:`check_messages` for message ``i`` alone."""
    where = f"message {i}"
    if not isinstance(m, dict):
        raise UsageError(f"{where} is a {type(m).__name__}, not a dict")
    role = m.get("role")
    if role not in ROLES:
        raise UsageError(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(m.get("content") or "", str):
        raise UsageError(f"{where} ({role}): content must be a string")
    if role == "tool" and not isinstance(m.get("tool_call_id"), str):
        raise UsageError(f"{where} (tool): tool_call_id must be a string")
    if role == "assistant":
        for j, c in enumerate(m.get("tool_calls") or ()):
            if not (
                isinstance(c, dict)
                and isinstance(c.get("id"), str)
                and isinstance(c.get("name"), str)
                and isinstance(c.get("arguments", {}), dict)
            ):
                raise UsageError(
                    f"{where} (assistant): tool call {j} needs id, name and an arguments dict"
                )


def approx_tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: four characters per token."""
    return len(text) // 4


def dumps_arguments(arguments: dict[str, Any]) -> str:
    """Tool-call arguments as the JSON string OpenAI-style APIs carry."""
    return json.dumps(arguments, ensure_ascii=False)


class Model(ABC):
    """A chat model that may call tools.

    ``complete`` is stateless: everything the model knows is in ``messages``; calling
    it twice with the same messages asks the same question twice.  Implementations
    are safe to call from one thread at a time; use one instance per session.
    """

    #: The spec it was opened with, e.g. ``"openai:gpt-4.1"``.
    name: str
    #: ``complete`` accepts a :class:`Conversation` (a lazily decoded sequence) in place
    #: of the list.  A session hands such a model its conversation without decoding it;
    #: every other model gets a list of every message (a provider sends them all).
    lazy_messages: bool = False

    @abstractmethod
    def complete(
        self,
        messages: list[Message],
        tools: Sequence[ToolSpec],
        *,
        timeout: float | None = None,
    ) -> ModelResponse:
        """Ask for the next assistant message.

        ``timeout`` (seconds) overrides the model's default for this call.  Raises
        :class:`~torpor.model.errors.ModelError` (or a subclass) when the call fails,
        :class:`~torpor.errors.UsageError` when ``messages`` are malformed.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the connection pool, if the provider has one."""

    def __enter__(self) -> Model:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
