"""The web dashboard at ``/``: server-rendered pages over the same library calls as the API.

Pages: sessions (list, search, filter, create), a session (transcript, checkpoint
timeline, fork / hibernate / wake, send, live view), sandboxes (list, console tail,
exec), lineage (snapshot tree and session fork tree) and storage.  Jinja2 templates
in ``templates/``, one stylesheet and one small script in ``static/``; no build step.

Invariants:

- Auth is the API's (:func:`torpor.server.deps.authenticate`): the token travels in
  the HttpOnly, SameSite=Strict cookie ``torpor_token`` set by ``POST /login``.  Every
  library call gets the tenant's ``paths``, so another namespace's resource is a 404
  page, exactly as in the API.
- State changes are POSTs only, each checked twice against cross-site requests: the
  Origin check every cookie-authenticated request gets in ``deps.authenticate``, and a
  form token (an HMAC of the cookie under a per-process key) that a page of another
  site cannot know.
- Everything shown is escaped (Jinja2 autoescape; no ``|safe`` on data), and the
  Content-Security-Policy allows only this server's own script and stylesheet, so
  even a missed escape could not run a guest's ``<script>``.
- A turn started from the dashboard runs in a thread of the server; its entries reach
  the browser through the log itself (an SSE stream of the log, then a rendered
  fragment), so what the page shows is always what the log says.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException

from torpor.errors import ConflictError, TorporError, UsageError
from torpor.server import problems
from torpor.server.dashboard import views
from torpor.server.deps import COOKIE, Tenant, authenticate, check_csrf
from torpor.session.text import human_size

log = logging.getLogger("torpor.server.dashboard")
router = APIRouter(include_in_schema=False)

HERE = Path(__file__).parent
STATIC = HERE / "static"
#: Files served under /static: only these names, never a path from the request.
STATIC_FILES = {p.name: p for p in STATIC.iterdir() if p.is_file()} if STATIC.is_dir() else {}
#: How long the login cookie lives (it is also only as good as its token).
COOKIE_MAX_AGE = 7 * 86400
#: Longest message, command or name a form takes (the API's body cap is larger).
MAX_FIELD = 64 * 1024
#: Longest a dashboard exec may run.
EXEC_TIMEOUT = 30.0
#: Model specs the create form offers (free text would let a page name a script file).
MODELS = ("scripted:demo",)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_NEXT = re.compile(r"^/[A-Za-z0-9/_.\-?=&%]*$")


# -- templates --------------------------------------------------------------------------


def ago(t: Any) -> str:
    try:
        d = max(0.0, time.time() - float(t))
    except (TypeError, ValueError):
        return ""
    if d < 45:
        return "just now"
    for unit, secs in (("d", 86400), ("h", 3600), ("min", 60)):
        if d >= secs:
            return f"{int(d // secs)} {unit} ago"
    return f"{int(d)} s ago"


def iso(t: Any) -> str:
    try:
        return datetime.fromtimestamp(float(t), UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def ms(v: Any) -> str:
    if v is None:
        return ""
    v = float(v)
    return f"{v / 1000:.1f} s" if v >= 10_000 else f"{v:.0f} ms"


env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"], default_for_string=True, default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
env.filters.update(ago=ago, iso=iso, size=human_size, ms=ms, short=lambda s: str(s)[:12])


def render(ctx: Ctx, name: str, code: int = 200, **data: Any) -> HTMLResponse:
    html = env.get_template(name).render(
        request=ctx.request,
        tenant=ctx.tenant,
        csrf=ctx.csrf,
        host=views.host(),
        nav=data.pop("nav", ""),
        **data,
    )
    return HTMLResponse(html, status_code=code, headers=_headers())


def _headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


# -- request context --------------------------------------------------------------------


class Ctx:
    """One dashboard request: who asks, the form (POSTs) and the form token to embed."""

    def __init__(self, request: Request, tenant: Tenant | None, form: FormData | None):
        self.request = request
        self.tenant = tenant
        self.form = form
        self.csrf = form_token(request)

    def field(self, name: str, default: str = "") -> str:
        v = self.form.get(name) if self.form is not None else None
        if v is None:
            return default
        if not isinstance(v, str):
            raise UsageError(f"form field {name!r} must be text")
        if len(v) > MAX_FIELD:
            raise UsageError(f"form field {name!r} is longer than {MAX_FIELD} characters")
        return v

    @property
    def paths(self) -> Any:
        assert self.tenant is not None
        return self.tenant.paths


#: Guards the dashboard's per-app state (form key, running turns) on first use.
_STATE_LOCK = threading.Lock()


def _secret(request: Request) -> bytes:
    st = request.app.state
    with _STATE_LOCK:  # one key per process: a second one would void the first's forms
        if not hasattr(st, "dashboard_secret"):
            st.dashboard_secret = secrets.token_bytes(32)
    return st.dashboard_secret  # type: ignore[no-any-return]


def form_token(request: Request) -> str:
    """The form token for this browser: an HMAC of its login cookie (per-process key)."""
    cookie = request.cookies.get(COOKIE, "")
    return hmac.new(_secret(request), b"csrf\0" + cookie.encode(), hashlib.sha256).hexdigest()


def _login_redirect(request: Request) -> RedirectResponse:
    nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(nxt, safe='')}", status_code=303)


async def _run(
    request: Request, fn: Callable[..., Response], *args: Any, auth: bool = True
) -> Response:
    """Authenticate (else: to the login page), read and check a POST's form, run ``fn``
    in the thread pool (library calls block), and turn errors into pages."""
    tenant: Tenant | None = None
    form: FormData | None = None
    try:
        if auth:
            try:
                tenant = authenticate(request)
            except HTTPException as e:
                if e.status_code == 401:
                    return _login_redirect(request)
                raise
        if request.method == "POST":
            form = await request.form(max_files=0, max_fields=50)
            if auth and not hmac.compare_digest(str(form.get("csrf", "")), form_token(request)):
                raise HTTPException(
                    403, "this form has expired or came from another site; reload the page"
                )
        ctx = Ctx(request, tenant, form)
        return await run_in_threadpool(fn, ctx, *args)
    except TorporError as e:
        return _error(request, tenant, problems.status_of(e), e.message, type(e).__name__)
    except HTTPException as e:
        return _error(request, tenant, e.status_code, str(e.detail), "", e.headers)
    except Exception as e:  # a page, not a traceback; the log has the details
        log.exception("dashboard: %s %s failed", request.method, request.url.path)
        return _error(
            request, tenant, 500, f"internal error ({type(e).__name__}); see the server's log", ""
        )


def _error(
    request: Request,
    tenant: Tenant | None,
    status: int,
    message: str,
    kind: str,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    ctx = Ctx(request, tenant, None)
    resp = render(ctx, "error.html", code=status, status_code=status, message=message, kind=kind)
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _back(url: str, note: str = "") -> RedirectResponse:
    if note:
        url += ("&" if "?" in url else "?") + "note=" + quote(note, safe="")
    return RedirectResponse(url, status_code=303)


def _open(ctx: Ctx, ref: str) -> Any:
    from torpor.session import Session

    return Session.open(ref, paths=ctx.paths)


# -- login ------------------------------------------------------------------------------


def _safe_next(nxt: str) -> str:
    """Only a path on this server (never ``//host`` or a scheme): no open redirect."""
    if not nxt or nxt.startswith("//") or not _NEXT.match(nxt):
        return "/sessions"
    return nxt


@router.get("/login")
async def login_page(request: Request, next: str = "") -> Response:
    def page(ctx: Ctx) -> Response:
        if not request.app.state.tokens.configured():
            return _back(_safe_next(next))
        return render(ctx, "login.html", next=_safe_next(next), error="")

    return await _run(request, page, auth=False)


@router.post("/login")
async def login(request: Request) -> Response:
    def do(ctx: Ctx) -> Response:
        check_csrf(request, via_cookie=True)  # login CSRF: only from a page of this server
        tokens = request.app.state.tokens
        limiter = request.app.state.limiter
        if limiter.take("login:" + (request.client.host if request.client else "local")):
            raise HTTPException(429, "too many login attempts; wait a moment")
        secret = ctx.field("token").strip()
        nxt = _safe_next(ctx.field("next"))
        rec = tokens.verify(secret) if secret else None
        if rec is None:
            return render(
                ctx,
                "login.html",
                code=401,
                next=nxt,
                error="That token is not valid (revoked, expired or mistyped).",
            )
        resp = _back(nxt)
        resp.set_cookie(
            COOKIE,
            secret,
            max_age=COOKIE_MAX_AGE,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return resp

    return await _run(request, do, auth=False)


@router.post("/logout")
async def logout(request: Request) -> Response:
    def do(ctx: Ctx) -> Response:
        resp = _back("/login")
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return resp

    return await _run(request, do)


# -- static -----------------------------------------------------------------------------


@router.get("/static/{name}")
def static(name: str) -> Response:
    path = STATIC_FILES.get(name)
    if path is None:
        raise HTTPException(404, "no such file")
    return FileResponse(
        path,
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )


# -- sessions ---------------------------------------------------------------------------


@router.get("/")
async def home(request: Request) -> Response:
    return await _run(request, lambda ctx: _back("/sessions"))


@router.get("/sessions")
async def sessions_page(
    request: Request, q: str = "", status: str = "", note: str = ""
) -> Response:
    def page(ctx: Ctx) -> Response:
        from torpor.image.store import ImageStore

        rows, total = views.list_sessions(ctx.paths, q[:200], status[:40])
        images = sorted(t for im in ImageStore(ctx.paths).list() for t in im.repo_tags)
        return render(
            ctx,
            "sessions.html",
            nav="sessions",
            rows=rows,
            total=total,
            q=q[:200],
            status=status[:40],
            statuses=views.STATUSES,
            images=images,
            models=MODELS,
            note=note[:300],
        )

    return await _run(request, page)


@router.post("/sessions")
async def create_session(request: Request) -> Response:
    def do(ctx: Ctx) -> Response:
        from torpor.session import Session

        image = ctx.field("image").strip()
        model = ctx.field("model", MODELS[0]).strip()
        name = ctx.field("name").strip() or None
        if not image:
            raise UsageError("choose an image for the session's VM")
        if model not in MODELS:
            raise UsageError(f"model {model!r} is not offered here; use one of {', '.join(MODELS)}")
        s = Session.create(image, model, name=name, paths=ctx.paths)
        try:
            return _back(f"/sessions/{s.id}")
        finally:
            s.close()

    return await _run(request, do)


def _turns(request: Request) -> dict[tuple[str, str], threading.Thread]:
    """The turns this process started from the dashboard, by (namespace, session id)."""
    st = request.app.state
    with _STATE_LOCK:  # two first sends at once must not each make their own dicts
        if not hasattr(st, "dashboard_turns"):
            st.dashboard_errors = {}
            st.dashboard_turns = {}
    return st.dashboard_turns  # type: ignore[no-any-return]


def _stream_url(sid: str) -> str:
    """The API's SSE follow of the log (``entry`` events, id = seq; the cookie authenticates)."""
    return f"/v1/sessions/{quote(sid)}/log"


@router.get("/sessions/{ref}")
async def session_page(request: Request, ref: str, note: str = "", all: int = 0) -> Response:
    def page(ctx: Ctx) -> Response:
        with _open(ctx, ref) as s:
            d = views.session_detail(s, show_all=bool(all))
        assert ctx.tenant is not None
        key = (ctx.tenant.namespace, d["row"]["id"])
        failed = request.app.state.__dict__.get("dashboard_errors", {}).pop(key, "")
        return render(
            ctx,
            "session.html",
            nav="sessions",
            s=d,
            note=note[:300],
            failed=failed,
            stream=_stream_url(d["row"]["id"]),
            nonce=secrets.token_hex(12),
        )

    return await _run(request, page)


@router.get("/sessions/{ref}/entries")
async def session_entries(request: Request, ref: str, after: int = 0) -> Response:
    """A transcript fragment: the entries after ``after`` (the live view appends it)."""

    def frag(ctx: Ctx) -> Response:
        from torpor.context import superseded

        with _open(ctx, ref) as s:
            entries = s.log()
            row = views.session_row(s)
        gone = superseded(entries)
        items = views.transcript([e for e in entries if e.seq > after], gone)
        last = entries[-1].seq if entries else 0
        html = env.get_template("_entries.html").render(items=items, csrf=ctx.csrf, s={"row": row})
        return HTMLResponse(
            html,
            headers={
                **_headers(),
                "X-Last-Seq": str(last),
                "X-Status": row["status"],
                # superseded seqs so far: the page strikes through what it already shows
                "X-Superseded": ",".join(str(x) for x in sorted(gone) if x <= after)[:4000],
            },
        )

    return await _run(request, frag)


@router.post("/sessions/{ref}/send")
async def send(request: Request, ref: str) -> Response:
    def do(ctx: Ctx) -> Response:
        from torpor.server.routes.metrics import REGISTRY, observer
        from torpor.session import Session

        text = ctx.field("message")
        if not text.strip():
            raise UsageError("a message must not be empty")
        key = ctx.field("nonce").strip()[:64] or None  # a resubmitted form never runs twice
        with _open(ctx, ref) as s:
            sid = s.id
        assert ctx.tenant is not None
        turns = _turns(request)
        slot = (ctx.tenant.namespace, sid)
        t = turns.get(slot)
        if (t is not None and t.is_alive()) or views.busy(ctx.paths, sid):
            return _back(f"/sessions/{sid}", "a turn is still running; wait for its answer")
        paths, ns = ctx.paths, ctx.tenant.namespace
        errors = request.app.state.dashboard_errors

        def turn() -> None:
            t0 = time.perf_counter()
            try:
                with Session.open(sid, paths=paths, on_event=observer(ns)) as s2:
                    # wait=False: a turn another actor started meanwhile is a ConflictError
                    s2.send(text, key=f"dashboard-{key}" if key else None, wait=False)
                REGISTRY.observe("turn_seconds", ns, time.perf_counter() - t0)
            except TorporError as e:
                if not isinstance(e, ConflictError):
                    REGISTRY.turn_failed(ns)
                errors[slot] = f"{type(e).__name__}: {e.message}"
            except Exception as e:  # the thread must not die silently
                log.exception("dashboard turn of session %s failed", sid)
                errors[slot] = f"internal error ({type(e).__name__}); see the server's log"

        th = threading.Thread(target=turn, name=f"torpor-dashboard-turn-{sid[:12]}", daemon=True)
        turns[slot] = th
        th.start()
        return _back(f"/sessions/{sid}#live")

    return await _run(request, do)


@router.post("/sessions/{ref}/fork")
async def fork(request: Request, ref: str) -> Response:
    def do(ctx: Ctx) -> Response:
        at_text = ctx.field("at").strip()
        if at_text and not at_text.isdigit():
            raise UsageError(f"a checkpoint is an entry number, not {at_text[:40]!r}")
        name = ctx.field("name").strip() or None
        with _open(ctx, ref) as s:
            child = s.fork(int(at_text) if at_text else None, name=name)
            try:
                return _back(f"/sessions/{child.id}", f"forked from {s.name}")
            finally:
                child.close()

    return await _run(request, do)


@router.post("/sessions/{ref}/hibernate")
async def hibernate(request: Request, ref: str) -> Response:
    def do(ctx: Ctx) -> Response:
        with _open(ctx, ref) as s:
            s.hibernate()
            return _back(f"/sessions/{s.id}", "hibernated: the VM is stopped, its state stored")

    return await _run(request, do)


@router.post("/sessions/{ref}/wake")
async def wake(request: Request, ref: str) -> Response:
    def do(ctx: Ctx) -> Response:
        with _open(ctx, ref) as s:
            s.wake()
            return _back(f"/sessions/{s.id}", "the VM is running again")

    return await _run(request, do)


# -- sandboxes --------------------------------------------------------------------------


@router.get("/sandboxes")
async def sandboxes_page(request: Request) -> Response:
    def page(ctx: Ctx) -> Response:
        return render(ctx, "sandboxes.html", nav="sandboxes", rows=views.list_vms(ctx.paths))

    return await _run(request, page)


@router.get("/sandboxes/{ref}")
async def sandbox_page(request: Request, ref: str) -> Response:
    def page(ctx: Ctx) -> Response:
        d = views.vm_detail(ctx.paths, ref)
        return render(ctx, "sandbox.html", nav="sandboxes", d=d, result=None, cmd="")

    return await _run(request, page)


@router.post("/sandboxes/{ref}/exec")
async def sandbox_exec(request: Request, ref: str) -> Response:
    def do(ctx: Ctx) -> Response:
        from torpor.sandbox import Sandbox

        cmd = ctx.field("cmd")
        if not cmd.strip():
            raise UsageError("type a command to run")
        views.vm_detail(ctx.paths, ref)  # NotFoundError (404) before anything runs
        t0 = time.perf_counter()
        sb = Sandbox.connect(ref, paths=ctx.paths)  # not `with`: its exit kills the VM
        try:
            res = sb.exec(cmd, timeout=EXEC_TIMEOUT, max_output=256 * 1024)
        finally:
            sb.close()
        took = (time.perf_counter() - t0) * 1000
        d = views.vm_detail(ctx.paths, ref)
        result = {
            "exit_code": res.exit_code,
            "stdout": views.clip(res.stdout),
            "stderr": views.clip(res.stderr),
            "ms": took,
        }
        return render(ctx, "sandbox.html", nav="sandboxes", d=d, result=result, cmd=cmd)

    return await _run(request, do)


# -- lineage and storage -------------------------------------------------------------------


@router.get("/lineage")
async def lineage_page(request: Request) -> Response:
    def page(ctx: Ctx) -> Response:
        return render(ctx, "lineage.html", nav="lineage", d=views.lineage(ctx.paths))

    return await _run(request, page)


@router.get("/storage")
async def storage_page(request: Request) -> Response:
    def page(ctx: Ctx) -> Response:
        return render(ctx, "storage.html", nav="storage", d=views.storage(ctx.paths))

    return await _run(request, page)
