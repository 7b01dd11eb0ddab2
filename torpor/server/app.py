"""The ASGI application: ``create_app(Config)`` → FastAPI, served by uvicorn.

Routes live in ``torpor.server.routes.*`` (one module per resource) and the dashboard
in ``torpor.server.dashboard``; this module wires them to the shared parts: the
token store, the rate limiter, the body cap and the problem-details handlers.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from torpor import __version__
from torpor.server import problems
from torpor.server.deps import Config, RateLimiter
from torpor.server.tokens import TokenStore

ROUTERS = (
    "torpor.server.routes.system",
    "torpor.server.routes.hosts",
    "torpor.server.routes.metrics",
    "torpor.server.routes.sessions",
    "torpor.server.routes.sandboxes",
    "torpor.server.routes.snapshots",
    "torpor.server.routes.images",
    "torpor.server.dashboard",
)
# routes whose bodies are uploads streamed to disk (capped by Config.max_upload)
UPLOAD_SUFFIXES = ("/files", "/images/import")


class BodyLimit:
    """413 for a body over the cap, whether declared (Content-Length) or streamed."""

    def __init__(self, app: ASGIApp, cfg: Config):
        self.app = app
        self.cfg = cfg

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        cap = self.cfg.max_upload if path.endswith(UPLOAD_SUFFIXES) else self.cfg.max_body
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            await _too_large(send, cap)
            return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > cap:
                    raise _TooLarge(cap)
            return msg

        async def tracking(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited, tracking)
        except _TooLarge:
            if not started:
                await _too_large(send, cap)


class _TooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body parsing (which turns any other error
    while reading a body into a 400) lets it through to the problem handler as 413."""

    def __init__(self, cap: int):
        super().__init__(413, f"the request body is larger than this server accepts ({cap} bytes)")


async def _too_large(send: Send, cap: int) -> None:
    resp = problems.problem(
        413, f"the request body is larger than this server accepts ({cap} bytes)"
    )
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _limit_malloc_arenas(n: int = 2) -> None:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX=n would) unless the environment
    sets it.  A server runs snapshots on many short-lived threads; with glibc's
    default of 8 arenas per core each keeps its freed buffers, and ``torpor bench
    serve`` (4 sessions x 3 turns) measured 352 MiB peak RSS against 153 MiB with 2."""
    import contextlib
    import ctypes
    import os

    if "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its own policy
        ctypes.CDLL("libc.so.6").mallopt(-8, n)  # M_ARENA_MAX


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start-up: recover interrupted turns (a kill -9 of the last server) in a thread of
    their own, so /healthz answers at once; a daemon thread, since a recovery cut by
    shutdown is just another interrupted turn for the next start."""
    from torpor.server.routes.sessions import recover_all

    _limit_malloc_arenas()
    home = app.state.config.home

    def run() -> None:
        try:
            app.state.recovered = recover_all(home)
        except Exception:
            logging.getLogger("torpor.server").exception("restart recovery failed")

    threading.Thread(target=run, name="torpor-recover", daemon=True).start()
    yield


def create_app(cfg: Config) -> FastAPI:
    app = FastAPI(
        lifespan=_lifespan,
        title="torpor",
        version=__version__,
        description="Durable AI-agent sessions and sandboxes on snapshotted microVMs.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    cfg.home.ensure()
    app.state.config = cfg
    app.state.tokens = TokenStore(cfg.home)
    app.state.limiter = RateLimiter(cfg.rate, cfg.burst)
    problems.install(app)
    for name in ROUTERS:
        mod: Any = importlib.import_module(name)
        app.include_router(mod.router)
    app.add_middleware(BodyLimit, cfg=cfg)
    return app
