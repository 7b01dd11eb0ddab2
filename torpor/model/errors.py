"""Errors raised by model providers, and the one helper that maps SDK errors into them.

::

    TorporError
     └── ModelError                 a model call failed                        (12)
          ├── ModelRateLimitError   still rate limited (429) after the retries
          ├── ModelTimeoutError     no answer within the timeout, after the retries
          ├── ModelConnectionError  the endpoint could not be reached at all
          ├── ModelResponseError    the reply is malformed or unsupported
          └── ModelAuthError        missing, wrong or insufficient credentials

Bad specs and options (``open_model("nope:x")``) are
:class:`~torpor.errors.UsageError`; a provider library that is not installed is a
:class:`~torpor.errors.SetupError` naming the extra to install.

Every :class:`ModelError` carries ``provider`` and, when an HTTP reply was the
cause, ``status``; the SDK exception is chained with ``raise ... from``.  The
``openai`` and ``anthropic`` libraries share one exception design (same class
names), so :func:`from_sdk_error` serves both.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from torpor.errors import TorporError


class ModelError(TorporError):
    exit_code = 12

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        status: int | None = None,
        step: str | None = None,
        path: object = None,
    ):
        super().__init__(message, step=step, path=path)
        self.provider = provider
        self.status = status


class ModelRateLimitError(ModelError):
    pass


class ModelTimeoutError(ModelError):
    pass


class ModelConnectionError(ModelError):
    pass


class ModelResponseError(ModelError):
    """The reply cannot be used; ``tool`` names the tool call at fault, if one is."""

    def __init__(
        self,
        message: str,
        *,
        tool: str | None = None,
        provider: str | None = None,
        status: int | None = None,
        step: str | None = None,
        path: object = None,
    ):
        super().__init__(message, provider=provider, status=status, step=step, path=path)
        self.tool = tool


class ModelAuthError(ModelError):
    pass


def _api_message(exc: BaseException) -> str:
    """The server's own error text: ``{"error": {"message"}}`` (both APIs) or ``{"message"}``."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return str(getattr(exc, "message", None) or exc)


def _root_cause(exc: BaseException) -> str:
    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return str(cause) or type(cause).__name__


def _retries_made(exc: BaseException, max_retries: int) -> int:
    """Retries before ``exc``: the libraries number each attempt in a request header.

    Fewer than ``max_retries`` when the server said not to retry (``x-should-retry``,
    a ``Retry-After`` beyond the library's limit).
    """
    headers = getattr(getattr(exc, "request", None), "headers", None)
    try:
        return int(headers["x-stainless-retry-count"]) if headers is not None else max_retries
    except (KeyError, TypeError, ValueError):
        return max_retries


def from_sdk_error(
    exc: Exception,
    sdk: ModuleType,
    *,
    provider: str,
    base_url: str,
    max_retries: int,
    timeout: float | None,
) -> ModelError:
    """Map an exception of the ``openai`` / ``anthropic`` library (``sdk``) to a ModelError.

    The libraries retry 429, 408, 409, 5xx, timeouts and connection errors up to
    ``max_retries`` times before raising; the message says how many were made.
    """
    n = _retries_made(exc, max_retries)
    tries = f"after {n} {'retry' if n == 1 else 'retries'}"
    kw: dict[str, Any] = {"provider": provider, "step": f"{provider} request"}
    if isinstance(exc, sdk.APIStatusError):
        status = exc.status_code
        text = _api_message(exc)
        if isinstance(exc, sdk.RateLimitError):
            return ModelRateLimitError(
                f"rate limited by {base_url} (HTTP 429) {tries}: {text}", status=status, **kw
            )
        if isinstance(exc, sdk.AuthenticationError | sdk.PermissionDeniedError):
            return ModelAuthError(
                f"{base_url} refused the credentials (HTTP {status}): {text}", status=status, **kw
            )
        retried = f" {tries}" if status in (408, 409) or status >= 500 else ""
        return ModelError(
            f"{base_url} answered HTTP {status}{retried}: {text}", status=status, **kw
        )
    if isinstance(exc, sdk.APITimeoutError):
        limit = f"within {timeout:g} s " if timeout is not None else ""
        return ModelTimeoutError(f"{base_url} did not answer {limit}{tries}", **kw)
    if isinstance(exc, sdk.APIConnectionError):
        return ModelConnectionError(f"cannot reach {base_url} {tries}: {_root_cause(exc)}", **kw)
    if isinstance(exc, sdk.APIResponseValidationError):
        return ModelResponseError(f"{base_url} sent a reply that does not parse: {exc}", **kw)
    return ModelError(f"{provider} client failed: {exc}", **kw)


__all__ = [
    "ModelAuthError",
    "ModelConnectionError",
    "ModelError",
    "ModelRateLimitError",
    "ModelResponseError",
    "ModelTimeoutError",
    "from_sdk_error",
]


def call_sdk(
    create: Callable[..., Any],
    kwargs: dict[str, Any],
    sdk: ModuleType,
    base_error: type[Exception],
    *,
    provider: str,
    base_url: str,
    max_retries: int,
    timeout: float | None,
    what: str,
) -> tuple[dict[str, Any], float]:
    """One SDK call with the errors both libraries share mapped to ModelErrors.

    Returns the reply as a plain dict (``what`` names it in the error when the
    server sent something else) and the call's latency in milliseconds.
    """
    t0 = time.perf_counter()
    try:
        reply = create(**kwargs)
    except json.JSONDecodeError as e:  # the libraries let this one through unwrapped
        raise ModelResponseError(
            f"{base_url} sent a reply that is not JSON: {e}", provider=provider
        ) from e
    except base_error as e:
        raise from_sdk_error(
            e,
            sdk,
            provider=provider,
            base_url=base_url,
            max_retries=max_retries,
            timeout=timeout,
        ) from e
    latency_ms = (time.perf_counter() - t0) * 1000
    if not hasattr(reply, "to_dict"):
        raise ModelResponseError(
            f"{base_url} sent something that is not {what}: {str(reply)[:200]!r}",
            provider=provider,
        )
    logging.getLogger("torpor.model").debug("%s reply in %.0f ms", provider, latency_ms)
    return reply.to_dict(warnings=False), latency_ms
