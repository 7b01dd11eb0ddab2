"""Model providers behind one small interface.

Public surface (everything else is an implementation detail)::

    open_model(spec, **options) -> Model      "scripted:demo", "openai:gpt-4.1", ...
    Model.complete(messages, tools, *, timeout=None) -> ModelResponse
    ModelResponse  text, tool_calls, usage, latency_ms, model, stop_reason, response_id
                   to_json() / from_json(), to_message()
    ToolSpec, ToolCall, Usage; TOOLS (shell, read_file, write_file, list_dir)
    ScriptedModel, Script, parse_script, load_script   the offline deterministic provider
    ModelError and its subclasses (exit code 12)

Messages are provider-neutral dicts (see :mod:`torpor.model.types`); each provider
translates them to its wire format and back.  The network providers import their
library lazily, so ``scripted`` works with neither installed.

Modules: ``types`` (values, :class:`Model`), ``errors``, ``tools`` (the tool specs),
``scripted`` + ``scripts`` (the offline provider and its built-in scripts),
``openai_chat``, ``anthropic_messages``, ``registry`` (:func:`open_model`).
"""

from torpor.model.errors import (
    ModelAuthError,
    ModelConnectionError,
    ModelError,
    ModelRateLimitError,
    ModelResponseError,
    ModelTimeoutError,
)
from torpor.model.registry import PROVIDERS, open_model
from torpor.model.scripted import Script, ScriptedModel, load_script, parse_script, script_position
from torpor.model.scripts import BUILTIN_SCRIPTS
from torpor.model.tools import TOOL_NAMES, TOOLS
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
)

__all__ = [
    "BUILTIN_SCRIPTS",
    "PROVIDERS",
    "STOP_END",
    "STOP_MAX_TOKENS",
    "STOP_TOOL_CALLS",
    "TOOLS",
    "TOOL_NAMES",
    "Message",
    "Model",
    "ModelAuthError",
    "ModelConnectionError",
    "ModelError",
    "ModelRateLimitError",
    "ModelResponse",
    "ModelResponseError",
    "ModelTimeoutError",
    "Script",
    "ScriptedModel",
    "ToolCall",
    "ToolSpec",
    "Usage",
    "load_script",
    "open_model",
    "parse_script",
    "script_position",
]
