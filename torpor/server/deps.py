"""Per-request context: who is asking (token → namespace → home), rate limits, isolation.

Routes take ``t: TenantDep`` and pass ``t.paths`` to the library; they
never build a path from request input.  Without any active token the server serves
one user on loopback (``torpor serve`` refuses other addresses then) and every request
acts in the ``default`` namespace.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from starlette.exceptions import HTTPException

from torpor.paths import Paths
from torpor.server.tenancy import DEFAULT, namespace_paths
from torpor.server.tokens import TokenStore

COOKIE = "torpor_token"


@dataclass
class Config:
    """What ``torpor serve`` was started with."""

    home: Paths
    max_body: int = 1 << 20  # JSON bodies
    max_upload: int = 8 << 30  # file and image uploads (streamed to disk)
    rate: float = 50.0  # requests per second per token, sustained
    burst: int = 200
    allow_tcg: bool = False


@dataclass(frozen=True)
class Tenant:
    namespace: str
    paths: Paths
    token_id: str | None


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    rate: float
    burst: int
    _b: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, key: str) -> float:
        """0 if allowed, else seconds until one request would be."""
        now = time.monotonic()
        with self._lock:
            b = self._b.setdefault(key, _Bucket(self.burst, now))
            b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
            b.at = now
            if b.tokens >= 1:
                b.tokens -= 1
                return 0.0
            return (1 - b.tokens) / self.rate


def bearer(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    scheme, _, value = h.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE)


#: Methods that change state: a browser's cross-site request of these is refused (CSRF).
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def check_csrf(request: Request, via_cookie: bool) -> None:
    """403 for a state-changing request a browser sent from a page of another site.

    Browsers send ``Origin`` with every cross-origin POST/PUT/PATCH/DELETE and every
    WebSocket handshake (``Referer``
    is the fallback); it must name this server (the ``Host`` the request came to).  A
    request authenticated by the dashboard's cookie must carry one of them; a client
    with neither (curl, the SDK) holds no ambient credential and is let through.  Also
    what protects a token-less loopback server from a web page posting to it.  A request
    with an ``Authorization`` header is not checked: a page of another site cannot send
    one without the server's CORS consent, which it never gives.
    """
    # a WebSocket (the PTY: a shell) counts as a state change; browsers send its Origin
    websocket = request.scope.get("type") == "websocket"
    if not websocket and request.scope.get("method") not in UNSAFE:
        return
    src = request.headers.get("origin") or request.headers.get("referer")
    if src is None:
        if via_cookie:
            raise HTTPException(403, "cross-site request refused: no Origin or Referer header")
        return
    host = request.headers.get("host", "").lower()
    if not host or urlsplit(src).netloc.lower() != host:
        raise HTTPException(403, "cross-site request refused: Origin is not this server")


#: Headers only browsers send: a request with one of them may come from a web page.
BROWSER_HEADERS = ("origin", "referer", "sec-fetch-site", "cookie")


def check_loopback_host(request: Request) -> None:
    """Without tokens, 403 for a browser's request naming this server by anything but a
    loopback name: DNS rebinding points a page's own name (``evil.example``) at
    127.0.0.1, and the page is then same-origin with this server.  Clients that are no
    browser (no :data:`BROWSER_HEADERS`) are not checked."""
    if not any(h in request.headers for h in BROWSER_HEADERS):
        return
    host = request.headers.get("host", "")
    name = host[1 : host.find("]")] if host.startswith("[") else host.rpartition(":")[0] or host
    try:
        ok = name.lower() == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise HTTPException(
            403,
            f"this server has no API tokens, so browsers must reach it as 127.0.0.1 or "
            f"localhost, not {host[:80]!r} (create a token to serve other names)",
        )


def authenticate(request: Request) -> Tenant:
    """The request's tenant, or 401 (rate limit: 429 with Retry-After; a cross-site
    state change, or a browser naming a token-less server by a non-loopback name: 403,
    see :func:`check_csrf` and :func:`check_loopback_host`)."""
    cfg: Config = request.app.state.config
    tokens: TokenStore = request.app.state.tokens
    limiter: RateLimiter = request.app.state.limiter
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():  # a header is no ambient credential
        check_csrf(request, via_cookie=COOKIE in request.cookies)
    if tokens.configured():
        secret = bearer(request)
        rec = tokens.verify(secret) if secret else None
        if rec is None:
            raise HTTPException(
                401,
                "a valid API token is required (Authorization: Bearer tpr_...); "
                "create one with `torpor token create`",
                headers={"WWW-Authenticate": 'Bearer realm="torpor"'},
            )
        t = Tenant(rec.namespace, namespace_paths(cfg.home, rec.namespace), rec.id)
    else:
        check_loopback_host(request)
        t = Tenant(DEFAULT, cfg.home, None)
    key = t.token_id or (request.client.host if request.client else "local")
    wait = limiter.take(key)
    if wait:
        raise HTTPException(
            429,
            f"rate limit of {cfg.rate:g} requests/s exceeded",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    return t


def tenant(request: Request) -> Tenant:
    """FastAPI dependency: see :func:`authenticate`."""
    return authenticate(request)


def multi_tenant(request: Request) -> bool:
    """Whether this server may serve more than one tenant (tokens for >1 namespace)."""
    tokens: TokenStore = request.app.state.tokens
    return len({t.namespace for t in tokens.list() if t.active()}) > 1


def check_isolation(request: Request, accel: str) -> None:
    """Before starting a VM: refuse TCG for multi-tenant use unless allowed (jail.py)."""
    from torpor.vmm.jail import check_tcg_allowed

    cfg: Config = request.app.state.config
    check_tcg_allowed(accel, multi_tenant=multi_tenant(request), allow_tcg=cfg.allow_tcg)


TenantDep = Annotated[Tenant, Depends(tenant)]
