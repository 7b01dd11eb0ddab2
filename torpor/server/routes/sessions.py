"""/v1/sessions: durable agent sessions over HTTP, each route one ``torpor.Session`` call.

Every route opens the session in the caller's namespace (``paths=t.paths``), so a
session of another namespace does not exist for it (404).  Bodies and answers are
the models of :mod:`torpor.server.schemas`.

Sends (``POST /v1/sessions/{ref}/messages``):

- a send never waits for another actor: a session mid-turn answers 409
  (``Session.send(wait=False)``), whether the other turn runs here, in another
  request, or in a CLI process;
- ``Idempotency-Key`` goes to ``Session.send(key=)``: the log makes the send
  idempotent (a retry returns the first turn's answer; a retry of an interrupted
  turn finishes it), so no turn runs twice;
- with ``Accept: text/event-stream`` the turn runs in a thread of its own and the
  response streams the entries it appends, read back from the log (never from the
  hook alone, so a stream has every entry exactly once, in seq order): ``entry``
  events with ``id`` = seq, then ``done`` (``{"answer", "last_seq"}``) or ``error``
  (a problem-details body).  A client that loses the stream resumes with
  ``GET .../log`` and ``Last-Event-ID``.  A client that goes away does not stop the
  turn (it is acknowledged); its stream's reader ends at the next event or
  keep-alive.

Restart: :func:`recover_all` (run by the app's lifespan in a background thread)
recovers every interrupted turn of every namespace, as ``torpor session recover``
does, skipping sessions another actor holds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from torpor import errors as E
from torpor.server import problems
from torpor.server.deps import TenantDep, check_isolation
from torpor.server.idempotency import once
from torpor.server.routes.metrics import REGISTRY, invalidate, observer
from torpor.server.schemas import (
    AppendIn,
    CheckpointIn,
    CheckpointOut,
    EntryOut,
    ForkIn,
    LogPage,
    MessageIn,
    MessageOut,
    RecoverOut,
    Removed,
    SessionCreate,
    SessionList,
    SessionOut,
    checkpoint_json,
    entry_json,
    session_json,
)

if TYPE_CHECKING:
    from torpor.paths import Paths
    from torpor.server.deps import Tenant
    from torpor.session import Session

log = logging.getLogger("torpor.server")
router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

SSE = "text/event-stream"
#: Entries read from the log per query while streaming.
BATCH = 500
#: Seconds between keep-alive comments on an idle stream (a gone client is noticed).
KEEPALIVE = 15.0
#: Poll interval of a log follow when no turn of this process signals new entries.
FOLLOW_POLL = 0.2
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key")]
PROBLEMS: dict[int | str, dict[str, Any]] = {
    s: {"description": d, "content": {problems.MEDIA: {}}}
    for s, d in (
        (400, "bad input (UsageError)"),
        (401, "no valid token"),
        (404, "no such session in this namespace"),
        (409, "the session is busy (mid-turn) or in a state that forbids this"),
        (413, "body too large"),
        (422, "schema violation"),
    )
}


def _open(t: Tenant, ref: str, *, hook: bool = True) -> Session:
    from torpor.session import Session

    return Session.open(ref, paths=t.paths, on_event=observer(t.namespace) if hook else None)


def _wants_sse(request: Request) -> bool:
    return SSE in request.headers.get("accept", "")


def _problem_body(e: BaseException) -> dict[str, Any]:
    if isinstance(e, E.TorporError):
        status = problems.status_of(e)
        extra = {"error": type(e).__name__, "exit_code": e.exit_code, "step": e.step}
        detail = e.message
    else:
        log.error("turn failed", exc_info=e)
        status, extra = 500, {}
        detail = f"internal error ({type(e).__name__}); see the server's log"
    from http import HTTPStatus

    return {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **{k: v for k, v in extra.items() if v is not None},
    }


def _sse(event: str, data: Any, id: int | None = None) -> bytes:
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# -- create, list, get, delete ----------------------------------------------------------


def _model_spec(paths: Paths, body: SessionCreate) -> str:
    """The model spec to create with.  A client names no file on the server: a script
    comes inline and is stored content-addressed in the namespace's own home."""
    from torpor.fsutil import atomic_write_json
    from torpor.model.scripted import parse_script
    from torpor.model.scripts import BUILTIN_SCRIPTS

    if body.script is not None:
        parse_script(body.script, source="script")  # UsageError names the bad part
        text = json.dumps(body.script, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(text.encode()).hexdigest()[:32]
        folder = paths.root / "server" / "scripts"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = folder / f"{digest}.json"
        if not path.exists():
            atomic_write_json(path, body.script)
        return f"scripted:{path}"
    provider, _, name = body.model.partition(":")
    if provider == "scripted" and name not in BUILTIN_SCRIPTS:
        raise E.UsageError(
            f"model {body.model!r}: over the API a scripted model is a built-in "
            f"({', '.join('scripted:' + n for n in sorted(BUILTIN_SCRIPTS))}) or an inline "
            "`script` document"
        )
    return body.model


@router.post("", status_code=201, response_model=SessionOut, responses=PROBLEMS)
def create_session(
    body: SessionCreate, request: Request, t: TenantDep, idempotency_key: IdemKey = None
) -> dict[str, Any]:
    """``Session.create``: a log, a VM booted from ``image``, checkpoint 0."""
    from torpor.session import Session
    from torpor.vmm.boot import resolve_accel

    model = _model_spec(t.paths, body)
    check_isolation(request, resolve_accel(t.paths, "auto"))

    def run() -> dict[str, Any]:
        s = Session.create(
            body.image,
            model,
            name=body.name,
            memory_mib=body.memory_mib,
            idle=body.idle,
            system=body.system,
            network=body.network,
            labels=body.labels,
            paths=t.paths,
            on_event=observer(t.namespace),
        )
        with s:
            return session_json(s)

    return once(t.paths, idempotency_key, "POST /v1/sessions", run)


def _cursor(created: float, sid: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created, sid]).encode()).decode().rstrip("=")


def _uncursor(c: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(c + "=" * (-len(c) % 4))
        created, sid = json.loads(raw)
        return float(created), str(sid)
    except (ValueError, TypeError) as e:
        raise E.UsageError(f"bad cursor {c!r:.80}: pass next_cursor as it was given") from e


@router.get("", response_model=SessionList, responses=PROBLEMS)
def list_sessions(
    t: TenantDep,
    status: str | None = None,
    label: Annotated[list[str], Query(description="key=value; repeat for AND")] = [],  # noqa: B006
    q: str | None = Query(None, max_length=256, description="substring of name or id"),
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = Query(None, max_length=1024),
) -> dict[str, Any]:
    """``Session.list``, oldest first, filtered; ``next_cursor`` pages on."""
    from torpor.session import Session

    want: dict[str, str] = {}
    for lab in label:
        k, sep, v = lab.partition("=")
        if not sep or not k:
            raise E.UsageError(f"label filter {lab!r:.80}: expected key=value")
        want[k] = v
    start = _uncursor(cursor) if cursor else None
    items: list[dict[str, Any]] = []
    more = False
    sessions = Session.list(paths=t.paths)
    try:
        for s in sorted(sessions, key=lambda s: (s.record.created_at, s.id)):
            rec = s.record
            if start is not None and (rec.created_at, rec.id) <= start:
                continue
            labels = rec.meta.get("labels") or {}
            if any(labels.get(k) != v for k, v in want.items()):
                continue
            if q and q not in rec.name and not rec.id.startswith(q):
                continue
            row = session_json(s)
            if status is not None and row["status"] != status:
                continue
            if len(items) == limit:
                more = True
                break
            items.append(row)
    finally:
        for s in sessions:
            s.close()
    last = items[-1] if items else None
    return {
        "items": items,
        "next_cursor": _cursor(last["created"], last["id"]) if more and last else None,
    }


@router.get("/{ref}", response_model=SessionOut, responses=PROBLEMS)
def get_session(ref: str, t: TenantDep) -> dict[str, Any]:
    """``Session.open`` + its state."""
    with _open(t, ref, hook=False) as s:
        return session_json(s)


@router.delete("/{ref}", response_model=Removed, responses=PROBLEMS)
def delete_session(ref: str, t: TenantDep) -> dict[str, Any]:
    """``Session.remove``: its VMs, its log (a tombstone), the snapshots only it needed."""
    with _open(t, ref) as s:
        released = s.remove(reason="removed through the API")
        invalidate(t.namespace)
        return {"id": s.id, "removed": True, "released_snapshots": released}


# -- messages ---------------------------------------------------------------------------


class _Turn:
    """One send running in a thread of its own; wakes the streaming coroutine per entry.

    The stream reads the log through the same Session (``entries(after, limit)`` goes
    to the database, not to the Session's cache, and the log serialises its
    connection), saving a second open per send.  The Session is closed by whichever
    of the turn and the response finishes last (:meth:`release`)."""

    def __init__(self, s: Session, ns: str, text: str, key: str | None):
        self.s, self.ns, self.text, self.key = s, ns, text, key
        self._refs = 2  # the turn's thread and the response
        self._refs_lock = threading.Lock()
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.started = asyncio.Event()  # something was appended, or the send ended
        self.done = threading.Event()
        self.answer: str | None = None
        self.error: BaseException | None = None
        inner = s.on_event

        def on_event(e: Any) -> None:
            if inner is not None:
                inner(e)
            self._signal()

        s.on_event = on_event

    def _signal(self) -> None:
        def both() -> None:
            self.started.set()
            self.wake.set()

        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): no listener
            self.loop.call_soon_threadsafe(both)

    def release(self) -> None:
        with self._refs_lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self.s.close()

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.answer = self.s.send(self.text, key=self.key, wait=False)
            REGISTRY.observe("turn_seconds", self.ns, time.perf_counter() - t0)
        except BaseException as e:  # reported to the client as an `error` event
            self.error = e
            if not isinstance(e, E.ConflictError):
                REGISTRY.turn_failed(self.ns)
        finally:
            self.done.set()
            self._signal()
            self.release()


async def _stream_turn(turn: _Turn, before: int) -> AsyncIterator[bytes]:
    reader = turn.s
    last = before
    try:
        while True:
            finished = turn.done.is_set()  # before the read: the read then has every entry
            batch = await run_in_threadpool(reader.entries, last, BATCH)
            for e in batch:
                yield _sse("entry", entry_json(e), id=e.seq)
                last = e.seq
            if len(batch) == BATCH:
                continue
            if finished:
                break
            try:
                await asyncio.wait_for(turn.wake.wait(), KEEPALIVE)
            except TimeoutError:
                yield b": keep-alive\n\n"
            turn.wake.clear()
        if turn.error is not None:
            yield _sse("error", _problem_body(turn.error))
        else:
            yield _sse("done", {"answer": turn.answer, "last_seq": last})
    except E.TorporError as e:  # reading the log failed mid-stream
        yield _sse("error", _problem_body(e))
    finally:
        turn.release()


@router.post(
    "/{ref}/messages",
    response_model=MessageOut,
    responses={
        **PROBLEMS,
        200: {
            "description": "JSON, or with Accept: text/event-stream the turn's entries as "
            "SSE (`entry` events, id = seq; then `done` or `error`)",
            "content": {"application/json": {}, SSE: {}},
        },
    },
)
async def send_message(
    ref: str, body: MessageIn, request: Request, t: TenantDep, idempotency_key: IdemKey = None
) -> Any:
    """``Session.send``: one turn; 409 if the session is mid-turn."""
    s = await run_in_threadpool(_open, t, ref)
    try:
        before = await run_in_threadpool(lambda: s.state().last_seq)
    except BaseException:
        s.close()
        raise
    if not _wants_sse(request):
        t0 = time.perf_counter()
        try:
            answer = await run_in_threadpool(
                lambda: s.send(body.text, key=idempotency_key, wait=False)
            )
            REGISTRY.observe("turn_seconds", t.namespace, time.perf_counter() - t0)
            entries = await run_in_threadpool(s.entries, before)
        except E.ConflictError:
            raise
        except BaseException:
            REGISTRY.turn_failed(t.namespace)
            raise
        finally:
            s.close()
        return {"answer": answer, "entries": [entry_json(e) for e in entries]}
    turn = _Turn(s, t.namespace, body.text, idempotency_key)
    threading.Thread(target=turn.run, name=f"turn-{s.id[:8]}", daemon=True).start()
    try:
        await turn.started.wait()
    except BaseException:  # the client left before the turn logged anything
        turn.release()
        raise
    if turn.done.is_set() and turn.error is not None:
        # refused before anything was logged (busy, bad state): a plain problem, no stream
        try:
            appended = await run_in_threadpool(s.entries, before, 1)
        except BaseException:
            turn.release()
            raise
        if not appended:
            turn.release()
            body_ = _problem_body(turn.error)
            return JSONResponse(body_, status_code=body_["status"], media_type=problems.MEDIA)
    return StreamingResponse(
        _stream_turn(turn, before),
        media_type=SSE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# -- the log ----------------------------------------------------------------------------


def _after_of(after: int | None, cursor: str | None, last_event_id: str | None) -> int:
    for name, raw in (("Last-Event-ID", last_event_id), ("cursor", cursor)):
        if raw is not None:
            if not raw.strip().isdigit():
                raise E.UsageError(f"{name} {raw!r:.40}: expected an entry number")
            return int(raw)
    return after or 0


async def _follow(reader: Session, after: int, until_turn: bool) -> AsyncIterator[bytes]:
    """The log as it grows.  A client that goes away cancels this generator (the ASGI
    server's disconnect), so no reader outlives its client; the session's removal (its
    tombstone entry) ends it with ``done``.  A failure once the stream
    has started (the session removed meanwhile, the database gone) ends it with an
    ``error`` event carrying the problem."""
    last = after
    idle = 0.0
    try:
        while True:
            batch = await run_in_threadpool(reader.entries, last, BATCH)
            for e in batch:
                yield _sse("entry", entry_json(e), id=e.seq)
                last = e.seq
                if e.kind.value == "removed":  # the tombstone is the last entry there is
                    yield _sse("done", {"last_seq": last, "removed": True})
                    return
            if len(batch) == BATCH:
                continue
            if batch:
                idle = 0.0
            if until_turn:
                # a turn is open until its checkpoint: stop once none is and all is sent
                st = await run_in_threadpool(reader.state)
                if st.pending is None and st.last_seq <= last:
                    yield _sse("done", {"last_seq": last})
                    return
            await asyncio.sleep(FOLLOW_POLL)
            idle += FOLLOW_POLL
            if idle >= KEEPALIVE:
                idle = 0.0
                yield b": keep-alive\n\n"
    except E.TorporError as e:
        yield _sse("error", _problem_body(e))
    finally:
        reader.close()


@router.get(
    "/{ref}/log",
    response_model=LogPage,
    responses={
        **PROBLEMS,
        200: {
            "description": "a JSON page, or with Accept: text/event-stream a follow "
            "(`entry` events, id = seq; Last-Event-ID resumes after it)",
            "content": {"application/json": {}, SSE: {}},
        },
    },
)
async def get_log(
    ref: str,
    request: Request,
    t: TenantDep,
    after: int | None = Query(None, ge=0, description="entries with seq > after"),
    cursor: str | None = Query(None, max_length=32),
    limit: int = Query(50, ge=1, le=1000),
    until: str | None = Query(
        None, pattern="^turn$", description="SSE: end (event `done`) once no turn is open"
    ),
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Any:
    """``Session.entries(after=)``: a page, or (SSE) the log as it grows."""
    start = _after_of(after, cursor, last_event_id)
    s = await run_in_threadpool(_open, t, ref, hook=False)
    if _wants_sse(request):
        return StreamingResponse(
            _follow(s, start, until == "turn"),
            media_type=SSE,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        entries = await run_in_threadpool(s.entries, start, limit + 1)
        last_seq = await run_in_threadpool(lambda: s.state().last_seq)
    finally:
        s.close()
    more = len(entries) > limit
    entries = entries[:limit]
    return {
        "entries": [entry_json(e) for e in entries],
        "next_cursor": str(entries[-1].seq) if more else None,
        "last_seq": last_seq,
    }


@router.post("/{ref}/entries", status_code=201, response_model=EntryOut, responses=PROBLEMS)
def append_entry(ref: str, body: AppendIn, t: TenantDep) -> dict[str, Any]:
    """``Session.append``: durable before the answer; idempotent by ``key``."""
    with _open(t, ref) as s:
        return entry_json(s.append(body.kind, body.payload, key=body.key))


# -- checkpoints, hibernate, wake, recover, fork -----------------------------------------


@router.get("/{ref}/checkpoints", response_model=list[CheckpointOut], responses=PROBLEMS)
def list_checkpoints(ref: str, t: TenantDep) -> list[dict[str, Any]]:
    """``Session.checkpoints``, oldest first (a fork's inherited ones included)."""
    with _open(t, ref, hook=False) as s:
        return [checkpoint_json(c) for c in s.checkpoints]


@router.post("/{ref}/checkpoint", status_code=201, response_model=CheckpointOut, responses=PROBLEMS)
def make_checkpoint(ref: str, t: TenantDep, body: CheckpointIn | None = None) -> dict[str, Any]:
    """``Session.checkpoint``: snapshot the VM, log the pair."""
    with _open(t, ref) as s:
        return checkpoint_json(s.checkpoint(reason=(body or CheckpointIn()).reason))


@router.post("/{ref}/hibernate", response_model=SessionOut, responses=PROBLEMS)
def hibernate(ref: str, t: TenantDep) -> dict[str, Any]:
    """``Session.hibernate``: checkpoint and end the VM."""
    with _open(t, ref) as s:
        s.hibernate()
        return session_json(s)


@router.post("/{ref}/wake", response_model=SessionOut, responses=PROBLEMS)
def wake(ref: str, t: TenantDep) -> dict[str, Any]:
    """``Session.wake``: resume the VM (recovering an interrupted turn first)."""
    with _open(t, ref) as s:
        s.wake()
        return session_json(s)


@router.post("/{ref}/recover", response_model=RecoverOut, responses=PROBLEMS)
def recover(ref: str, t: TenantDep) -> dict[str, Any]:
    """``Session.recover``: last checkpoint + replay of an interrupted turn; 409 if busy."""
    with _open(t, ref) as s:
        answer = s.recover(wait=False)
        return {"answer": answer, "session": session_json(s)}


@router.post("/{ref}/fork", status_code=201, response_model=SessionOut, responses=PROBLEMS)
def fork(
    ref: str,
    request: Request,
    t: TenantDep,
    body: ForkIn | None = None,
    idempotency_key: IdemKey = None,
) -> dict[str, Any]:
    """``Session.fork(at=)``: a new session sharing the log up to a checkpoint."""
    from torpor.vmm.boot import resolve_accel

    fb = body or ForkIn()
    check_isolation(request, resolve_accel(t.paths, "auto"))

    def run() -> dict[str, Any]:
        with _open(t, ref) as s, s.fork(at=fb.at, name=fb.name) as child:
            return session_json(child)

    return once(t.paths, idempotency_key, f"POST /v1/sessions/{ref}/fork", run)


# -- restart ----------------------------------------------------------------------------


def recover_all(home: Paths) -> list[tuple[str, str, str]]:
    """Recover every interrupted turn in every namespace (the server's start-up).

    Returns ``(namespace, session id, outcome)`` for each interrupted session
    found: ``recovered``, ``busy`` (another actor holds it: its turn is running, not
    interrupted) or ``failed: <error>``.  Never raises for one session's failure.
    """
    from torpor.server.tenancy import namespace_paths, namespaces
    from torpor.session import Session

    out: list[tuple[str, str, str]] = []
    for ns in namespaces(home):
        try:
            paths = namespace_paths(home, ns)
            sessions = Session.list(paths=paths)
        except Exception as e:
            log.error("restart: cannot list sessions of namespace %s: %s", ns, e)
            continue
        try:
            ids = []
            for s in sessions:
                try:
                    if s.status() == "interrupted":
                        ids.append(s.id)
                except Exception as e:  # an edited log: left for `session verify`
                    log.warning("restart: session %s unreadable: %s", s.id, e)
        finally:
            for s in sessions:
                s.close()
        for sid in ids:
            try:
                with Session.open(sid, paths=paths, on_event=observer(ns)) as s:
                    s.recover(wait=False)
                out.append((ns, sid, "recovered"))
                log.warning("restart: recovered the interrupted turn of session %s (%s)", sid, ns)
            except E.ConflictError:
                out.append((ns, sid, "busy"))
            except Exception as e:
                out.append((ns, sid, f"failed: {e}"))
                log.error("restart: session %s (%s) not recovered: %s", sid, ns, e)
    return out
