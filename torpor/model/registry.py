"""``open_model(spec, **options)``: one place that turns a model spec into a :class:`Model`.

Specs are ``<provider>:<model>``; the model part may itself contain colons
(``openai:llama3.1:8b`` for Ollama)::

    scripted:demo | scripted:bench        a built-in script (torpor.model.scripts)
    scripted:/path/to/script.json          a script file (any spec with '/' or '.json')
    openai:<model>                         OpenAI-compatible chat completions
    anthropic:<model>                      Anthropic Messages API

Options, accepted for every provider so a caller can pass one settings dict
(``scripted`` ignores them): ``base_url``, ``api_key``, ``max_retries`` (default 4),
``timeout`` (seconds, default 120), ``max_tokens`` (anthropic default 4096; openai
sends it only when given).  Environment: ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``
and ``ANTHROPIC_BASE_URL`` / ``ANTHROPIC_API_KEY`` fill in what the options leave
out.  With a custom base URL and no key, a placeholder key is sent (vLLM, Ollama
and llama.cpp need none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torpor.errors import UsageError
from torpor.model.scripted import ScriptedModel, builtin_script, load_script
from torpor.model.scripts import BUILTIN_SCRIPTS
from torpor.model.types import Model

PROVIDERS = ("scripted", "openai", "anthropic")
OPTIONS = ("base_url", "api_key", "max_retries", "timeout", "max_tokens")
DEFAULT_MAX_RETRIES = 4
DEFAULT_TIMEOUT = 120.0


def _help() -> str:
    builtins = ", ".join(f"scripted:{n}" for n in sorted(BUILTIN_SCRIPTS))
    return (
        f"providers: {', '.join(PROVIDERS)}; e.g. {builtins}, scripted:/path/script.json, "
        "openai:gpt-4.1, anthropic:claude-sonnet-4-5"
    )


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UsageError(
            f"unknown model option(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})"
        )
    opts = {k: v for k, v in options.items() if v is not None}
    retries = opts.get("max_retries", DEFAULT_MAX_RETRIES)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise UsageError(f"max_retries must be a non-negative integer, not {retries!r}")
    timeout = opts.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise UsageError(f"timeout must be a positive number of seconds, not {timeout!r}")
    if "max_tokens" in opts:
        mt = opts["max_tokens"]
        if not isinstance(mt, int) or isinstance(mt, bool) or mt <= 0:
            raise UsageError(f"max_tokens must be a positive integer, not {mt!r}")
    for key in ("base_url", "api_key"):
        if key in opts and not isinstance(opts[key], str):
            raise UsageError(f"{key} must be a string")
    opts["max_retries"] = retries
    opts["timeout"] = float(timeout)
    return opts


def open_model(spec: str, **options: Any) -> Model:
    """Open the model ``spec`` names.

    Raises :class:`~torpor.errors.UsageError` for an unknown provider, an empty
    model, a missing or invalid script, or bad options;
    :class:`~torpor.errors.SetupError` when the provider's library is not
    installed; :class:`~torpor.model.errors.ModelAuthError` when a hosted API has
    no key.  Nothing is sent over the network here.
    """
    provider, sep, model = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or provider not in PROVIDERS:
        raise UsageError(f"unknown model {spec!r}; {_help()}")
    if not model.strip():
        raise UsageError(f"model spec {spec!r} names no model; {_help()}")
    opts = _check_options(options)
    if provider == "scripted":
        if model in BUILTIN_SCRIPTS:
            return ScriptedModel(builtin_script(model), name=spec)
        if "/" in model or model.endswith(".json") or Path(model).is_file():
            return ScriptedModel(load_script(model), name=spec)
        raise UsageError(f"no script {model!r}; {_help()}")
    if provider == "openai":
        from torpor.model.openai_chat import OpenAIChatModel

        return OpenAIChatModel(model, **opts)
    from torpor.model.anthropic_messages import AnthropicModel

    return AnthropicModel(model, **opts)


__all__ = ["OPTIONS", "PROVIDERS", "open_model"]
