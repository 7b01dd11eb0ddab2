"""Errors as RFC 9457 problem details (``application/problem+json``).

Every error body has ``type``, ``title``, ``status``, ``detail`` plus torpor's own
``error`` (the exception class, e.g. ``NotFoundError``), ``exit_code`` (the CLI's code
for the same failure, docs/cli.md) and ``step`` when torpor knows it.  Unexpected
exceptions become a 500 whose body names no internals (the log has the traceback).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from torpor import errors as E

log = logging.getLogger("torpor.server")
MEDIA = "application/problem+json"

# most specific first: the first class in an error's MRO found here decides
STATUS: dict[type[E.TorporError], int] = {
    E.TCGRefusedError: 403,
    E.NotSupportedError: 501,
    E.UsageError: 400,
    E.NotFoundError: 404,
    E.ConflictError: 409,
    E.RegistryError: 502,
    E.DigestMismatchError: 502,
    E.ImageError: 422,
    E.ExecTimeoutError: 504,
    E.UnsafeCopyError: 422,
    E.AgentError: 502,
    E.StoreError: 500,  # damaged or missing data is the server's problem, not storage room
    E.GuestError: 500,
    E.VMError: 500,
    E.SetupError: 500,
}
# errors defined outside torpor.errors, by class name (most specific first in an MRO
# walk): a model provider that failed is a bad gateway, one that timed out a gateway
# timeout — not the server's own fault (500)
_EXTRA = {
    "SessionError": 409,
    "ModelTimeoutError": 504,
    "ModelRateLimitError": 503,
    "ModelError": 502,
}


def status_of(e: E.TorporError) -> int:
    for cls in type(e).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
        if cls.__name__ in _EXTRA:
            return _EXTRA[cls.__name__]
    return 500


def problem(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    from http import HTTPStatus

    body = {
        "type": "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **{k: v for k, v in extra.items() if v is not None},
    }
    return JSONResponse(body, status_code=status, media_type=MEDIA, headers=headers)


def from_error(e: E.TorporError) -> JSONResponse:
    return problem(
        status_of(e),
        e.message,
        error=type(e).__name__,
        exit_code=e.exit_code,
        step=e.step,
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(E.TorporError)
    async def _torpor(_: Request, e: E.TorporError) -> JSONResponse:
        return from_error(e)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return problem(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = [{"loc": list(x.get("loc", ())), "msg": str(x.get("msg", ""))} for x in e.errors()]
        return problem(422, "the request does not match the API's schema", errors=errs)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem(500, f"internal error ({type(e).__name__}); see the server's log")
