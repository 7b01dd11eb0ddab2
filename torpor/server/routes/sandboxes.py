"""``/v1/sandboxes``: :class:`torpor.Sandbox` over HTTP (docs/api.md is the contract).

Every route is one library call with ``paths=t.paths`` (the tenant's home): another
namespace's sandbox does not exist here, so it is a 404 like any unknown id.

Invariants:

- Before anything starts a VM (create, fork, wake, and a use that wakes a
  hibernated sandbox) ``check_isolation`` sees the accelerator that VM will use.
- Each request uses its own agent connection, closed when the request ends.
- ``exec``: the command's output goes to the client as it arrives (SSE) or into a
  result capped at ``max_output`` bytes per stream (JSON).  Between the thread that
  reads the guest and the client sits a buffer of at most :data:`STREAM_BUFFER`
  bytes; output beyond it (a client slower than the command) is dropped and
  counted (``stdout_dropped``), so no command and no client can grow the
  server's memory.  A client that disconnects before the exit ends the command:
  its process group gets SIGKILL and the request's connection is closed, so no
  host thread waits on it.  ``background`` commands keep running after the
  request; their output is discarded (``processes`` lists them, ``kill`` ends them).
- The PTY WebSocket ends the terminal's program when the client goes away
  (SIGHUP to its session and foreground job, as closing a terminal window does).
- File uploads stream from the request body to the guest (``write_file`` takes a
  file-like reader), never held whole, into a temporary file renamed over the target
  when complete; a cut upload's temporary file is finished and removed (the guest
  agent cannot cancel a write, and an unfinished one would hold an upload slot).
  Downloads stream back the same way.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal

import anyio
from anyio import from_thread, to_thread
from fastapi import APIRouter, Header, Query, Request, Response, WebSocket
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.websockets import WebSocketDisconnect, WebSocketState

from torpor.errors import (
    ConflictError,
    ExecTimeoutError,
    NotFoundError,
    TorporError,
    UsageError,
)
from torpor.paths import Paths
from torpor.sandbox import Sandbox
from torpor.server import problems
from torpor.server.deps import TenantDep, authenticate, check_isolation
from torpor.server.idempotency import once
from torpor.server.sandbox_schemas import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_PATH,
    BackgroundOut,
    EntryOut,
    ExecIn,
    ExecOut,
    ForkIn,
    KillOut,
    ProcessOut,
    SandboxCreate,
    SandboxList,
    SandboxOut,
    SnapshotIn,
    SnapshotRef,
    StopIn,
    page,
)
from torpor.vmm.manager import VM, VMManager
from torpor.vmm.state import Status

log = logging.getLogger("torpor.server")
router = APIRouter(tags=["sandboxes"])

#: Bytes of exec output waiting for a slow client before more is dropped (and counted).
STREAM_BUFFER = 8 * 1024 * 1024
#: Seconds between checks that a JSON exec's client is still there.
DISCONNECT_POLL = 0.5
#: Seconds of silence after which an exec stream sends an SSE comment.
KEEPALIVE = 15.0
#: Console bytes a logs request returns at most (the newest).
MAX_LOG_BYTES = 8 * 1024 * 1024

IdemKey = Annotated[str | None, Header(alias="Idempotency-Key")]
Encoding = Annotated[Literal["utf-8", "base64"], Query()]


# -- helpers -------------------------------------------------------------------------------


def _mgr(paths: Paths) -> VMManager:
    return VMManager(paths)


def _accel(paths: Paths, requested: str) -> str:
    from torpor.vmm.boot import resolve_accel

    return resolve_accel(paths, requested or "auto")


def _out(mgr: VMManager, vm: VM) -> SandboxOut:
    from torpor.vmm.qemu import ISOLATION

    info = Sandbox.get_info(vm.id, paths=mgr.paths)
    accel = vm.state.accel or None
    return SandboxOut(
        id=info.id,
        name=info.name,
        image=info.image,
        status=info.status,
        labels=info.labels,
        created=info.created,
        memory_mib=info.memory_mib,
        cpus=info.cpus,
        end_at=info.end_at,
        accel=accel,
        isolation=ISOLATION.get(accel) if accel else None,
    )


def _check_text(what: str, *values: str | None) -> None:
    """NUL cannot travel in a C string to the guest: a 400 here, not a guest error."""
    for v in values:
        if v is not None and "\0" in v:
            raise UsageError(f"{what} must not contain NUL bytes")


def _guest_path(path: str) -> str:
    _check_text("path", path)
    if not path.startswith("/"):
        raise UsageError(f"sandbox paths are absolute: {path[:200]!r}")
    return path


#: errno of a guest refusal caused by the path a client asked for -> the error it is
_PATH_ERRNO: dict[int, type[TorporError]] = {
    errno.ENOENT: NotFoundError,
    errno.ENOTDIR: NotFoundError,
    errno.EISDIR: UsageError,
    errno.ENAMETOOLONG: UsageError,
    errno.ELOOP: UsageError,
    errno.EINVAL: UsageError,
    errno.EEXIST: ConflictError,
    errno.ENOTEMPTY: ConflictError,
}


@contextlib.contextmanager
def _guest_refusals(
    path: str, override: dict[int, type[TorporError]] | None = None
) -> Iterator[None]:
    """A guest's refusal of a path (EISDIR, ENOTDIR, ...) as the client's error, not a
    502: the agent did its job, the request named the wrong thing."""
    from torpor.agent.client import AgentRequestError

    try:
        yield
    except AgentRequestError as e:
        cls = {**_PATH_ERRNO, **(override or {})}.get(e.errno or 0)
        if cls is None:
            raise
        raise cls(f"{path[:300]}: {os.strerror(e.errno or 0)}", path=path) from e


def _open(request: Request | WebSocket, paths: Paths, ref: str) -> Sandbox:
    """The sandbox ``ref`` for a use that talks to its guest (which wakes a
    hibernated one: isolation is checked first)."""
    mgr = _mgr(paths)
    vm = mgr.get(ref)
    if vm.state.status == Status.HIBERNATED:
        check_isolation(request, _accel(paths, vm.config.accel))  # type: ignore[arg-type]
    return Sandbox.connect(vm.id, paths=paths)


def _close_soon(sb: Sandbox) -> None:
    """Close ``sb``'s connection without blocking the event loop (it joins a thread)."""
    threading.Thread(target=sb.close, name="torpor-server-close", daemon=True).start()


# -- lifecycle -----------------------------------------------------------------------------


@router.post("/v1/sandboxes", status_code=201, response_model=SandboxOut)
def create(
    body: SandboxCreate, request: Request, t: TenantDep, idempotency_key: IdemKey = None
) -> dict[str, Any]:
    """``Sandbox.create``: boot a sandbox; answers once its guest agent is up."""
    _check_text("command, env, cwd and user", *(body.command or ()), body.cwd, body.user)
    _check_text("env", *body.env.keys(), *body.env.values())
    check_isolation(request, _accel(t.paths, "auto"))

    def run() -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if body.command is not None:
            kw["command"] = tuple(body.command)
        sb = Sandbox.create(
            body.image,
            memory=body.memory,
            cpus=body.cpus,
            env=body.env,
            network=body.network,
            labels=body.labels,
            idle=body.idle,
            timeout=body.timeout,
            name=body.name,
            cwd=body.cwd,
            user=body.user,
            paths=t.paths,
            **kw,
        )
        try:
            mgr = _mgr(t.paths)
            return _out(mgr, mgr.get(sb.id)).model_dump()
        finally:
            sb.close()

    return once(t.paths, idempotency_key, "sandbox.create", run)


@router.get("/v1/sandboxes", response_model=SandboxList)
def list_(
    t: TenantDep,
    label: Annotated[list[str] | None, Query(description="KEY or KEY=VALUE; repeatable")] = None,
    status: Annotated[str | None, Query(description="running, hibernated, exited, …")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> SandboxList:
    """``Sandbox.list``: running and hibernated sandboxes (``status``: that status only),
    newest first."""
    want: dict[str, str | None] = {}
    for item in label or ():
        k, sep, v = item.partition("=")
        if not k:
            raise UsageError(f"bad label filter {item!r}: use KEY or KEY=VALUE")
        want[k] = v if sep else None
    infos = Sandbox.list(all=status is not None, paths=t.paths)
    infos = [
        i
        for i in infos
        if (status is None or i.status == status)
        and all(k in i.labels and (v is None or i.labels[k] == v) for k, v in want.items())
    ]
    infos.sort(key=lambda i: (-i.created, i.id))
    items, nxt = page(infos, lambda i: [-i.created, i.id], limit, cursor)
    mgr = _mgr(t.paths)
    out = []
    for i in items:
        with contextlib.suppress(NotFoundError):  # removed meanwhile
            out.append(_out(mgr, mgr.get(i.id)))
    return SandboxList(items=out, next_cursor=nxt)


@router.get("/v1/sandboxes/{ref}", response_model=SandboxOut)
def get(ref: str, t: TenantDep) -> SandboxOut:
    """``Sandbox.get_info`` (id, id prefix or name), with the accelerator."""
    mgr = _mgr(t.paths)
    return _out(mgr, mgr.get(ref))


@router.delete("/v1/sandboxes/{ref}", status_code=204)
def kill(ref: str, t: TenantDep) -> Response:
    """``Sandbox.kill``: end the VM and remove it (its snapshots stay)."""
    _mgr(t.paths).remove(ref, force=True)
    return Response(status_code=204)


@router.post("/v1/sandboxes/{ref}/stop", response_model=SandboxOut)
def stop(ref: str, t: TenantDep, body: StopIn | None = None) -> SandboxOut:
    """Stop the VM: SIGTERM its main process, SIGKILL after ``timeout``, power off."""
    mgr = _mgr(t.paths)
    vm = mgr.stop(ref, timeout=(body or StopIn()).timeout)
    return _out(mgr, vm)


@router.post("/v1/sandboxes/{ref}/hibernate", response_model=SnapshotRef)
def hibernate(ref: str, t: TenantDep) -> SnapshotRef:
    """``Sandbox.hibernate``: snapshot, then end the VM; a hibernated one answers its
    snapshot again."""
    from torpor.snapshot import last_snapshot

    mgr = _mgr(t.paths)
    vm = mgr.get(ref)
    if vm.state.status == Status.HIBERNATED:
        return SnapshotRef(id=last_snapshot(vm))
    if vm.state.status != Status.RUNNING:
        raise ConflictError(f"sandbox {vm.name} is not running ({vm.state.status})")
    sb = Sandbox.connect(vm.id, paths=t.paths)
    try:
        return SnapshotRef(id=sb.hibernate().id)
    finally:
        sb.close()


@router.post("/v1/sandboxes/{ref}/wake", response_model=SandboxOut)
def wake(ref: str, request: Request, t: TenantDep) -> SandboxOut:
    """``Sandbox.wake``: resume a hibernated sandbox in place (a running one: no-op)."""
    mgr = _mgr(t.paths)
    vm = mgr.get(ref)
    if vm.state.status != Status.RUNNING:
        check_isolation(request, _accel(t.paths, vm.config.accel))
        with contextlib.suppress(ConflictError):  # woken by someone else meanwhile
            mgr.start(vm.id)
    return _out(mgr, mgr.get(vm.id))


@router.post("/v1/sandboxes/{ref}/snapshot", status_code=201, response_model=SnapshotRef)
def snapshot(ref: str, t: TenantDep, body: SnapshotIn | None = None) -> SnapshotRef:
    """``Sandbox.snapshot``: a durable snapshot; the sandbox keeps running."""
    from torpor.snapshot import snapshot as take

    tag = (body or SnapshotIn()).tag
    _check_text("tag", tag)
    r = take(_mgr(t.paths), ref, tag=tag)
    return SnapshotRef(id=r.manifest.id, tag=tag)


@router.post("/v1/sandboxes/{ref}/fork", status_code=201, response_model=list[SandboxOut])
def fork(
    ref: str,
    request: Request,
    t: TenantDep,
    body: ForkIn | None = None,
    idempotency_key: IdemKey = None,
) -> list[dict[str, Any]]:
    """``Sandbox.fork(n)``: snapshot, then ``n`` independent running copies."""
    n = (body or ForkIn()).n
    mgr = _mgr(t.paths)
    vm = mgr.get(ref)
    check_isolation(request, _accel(t.paths, vm.config.accel))

    def run() -> dict[str, Any]:
        sb = Sandbox.connect(vm.id, paths=t.paths)
        try:
            kids = sb.fork(n)
        finally:
            sb.close()
        return {"items": [_out(mgr, mgr.get(k.id)).model_dump() for k in kids]}

    return list(once(t.paths, idempotency_key, f"sandbox.fork:{vm.id}", run)["items"])


@router.get("/v1/sandboxes/{ref}/logs", response_class=Response)
def logs(
    ref: str, t: TenantDep, tail: Annotated[int | None, Query(ge=0, le=100_000)] = None
) -> Response:
    """The guest's serial console (what is kept of it), as text; ``tail``: last lines."""
    data = _mgr(t.paths).console(ref)[-MAX_LOG_BYTES:]
    text = data.decode("utf-8", "replace")
    if tail is not None:
        lines = text.splitlines(keepends=True)
        text = "".join(lines[-tail:]) if tail else ""
    return Response(text, media_type="text/plain; charset=utf-8")


# -- commands ------------------------------------------------------------------------------


class _Pump:
    """Carries one command's output from the thread reading the guest to the event
    loop, holding at most :data:`STREAM_BUFFER` bytes (the rest is counted, not kept)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self.dropped = {"stdout": 0, "stderr": 0}

    def _put(self, item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)

    def chunk(self, kind: str, data: bytes) -> None:
        with self._lock:
            if self._pending + len(data) > STREAM_BUFFER:
                self.dropped[kind] += len(data)
                return
            self._pending += len(data)
        self._put((kind, data))

    def taken(self, n: int) -> None:
        with self._lock:
            self._pending -= n

    def end(self, kind: str, value: Any) -> None:
        self._put((kind, value))


def _drive(p: Any, timeout: float | None, pump: _Pump) -> None:
    """Thread body: read ``p`` (a CommandHandle) to its exit, a timeout or an error."""
    from torpor.errors import AgentError

    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for kind, chunk in p.output(timeout):
            pump.chunk(kind, chunk)
        r = p.wait()
        pump.end("exit", (r.exit_code, r.signal))
    except AgentError as e:
        if deadline is not None and time.monotonic() >= deadline:
            with contextlib.suppress(AgentError):
                p.kill()
            pump.end("timeout", timeout)
        else:
            pump.end("error", e)
    except Exception as e:  # never a silent end: the client is told
        log.exception("exec stream failed")
        pump.end("error", e)


def _timeout_message(what: str, timeout: float) -> str:
    return f"{what!r} ran past its timeout of {timeout:g} s; its process group was killed (SIGKILL)"


def _problem_of(e: BaseException) -> dict[str, Any]:
    if isinstance(e, TorporError):
        return {
            "status": problems.status_of(e),
            "detail": e.message,
            "error": type(e).__name__,
            "exit_code": e.exit_code,
        }
    return {"status": 500, "detail": f"internal error ({type(e).__name__})"}


def _sse(seq: int, event: str, data: Any) -> bytes:
    return f"id: {seq}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _start(sb: Sandbox, body: ExecIn) -> Any:
    """Start ``body`` as a background handle: this route drives it (timeout, output
    buffer, disconnect) instead of the library's foreground loop."""
    return sb.exec(
        body.cmd, background=True, cwd=body.cwd, env=body.env, user=body.user, stdin=body.stdin
    )


@router.post(
    "/v1/sandboxes/{ref}/exec",
    response_model=ExecOut | BackgroundOut,
    responses={
        200: {
            "description": "JSON result; or, with `Accept: text/event-stream`, SSE events "
            "`stdout`, `stderr` (JSON strings) and `exit`",
            "content": {"text/event-stream": {}},
        },
        504: {"description": "the command ran past its timeout (killed)"},
    },
)
async def exec_(
    ref: str, body: ExecIn, request: Request, t: TenantDep, encoding: Encoding = "utf-8"
) -> Any:
    """``Sandbox.exec``: run a command; JSON result, SSE stream or (background) its pid."""
    cmd = [body.cmd] if isinstance(body.cmd, str) else body.cmd
    _check_text("cmd, env, cwd, user and stdin", *cmd, body.cwd, body.user, body.stdin)
    _check_text("env", *body.env.keys(), *body.env.values())
    sb = await to_thread.run_sync(_open, request, t.paths, ref)
    if body.background:
        try:
            return BackgroundOut(pid=await to_thread.run_sync(_background, sb, body))
        finally:
            await to_thread.run_sync(sb.close)
    try:
        p = await to_thread.run_sync(_start, sb, body)
    except BaseException:
        await to_thread.run_sync(sb.close)
        raise
    pump = _Pump(asyncio.get_running_loop())
    threading.Thread(
        target=_drive, args=(p, body.timeout, pump), name="torpor-server-exec", daemon=True
    ).start()
    what = body.cmd if isinstance(body.cmd, str) else " ".join(body.cmd)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(
            _events(sb, p, pump, encoding, what),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _collect(request, sb, p, pump, encoding, body.max_output, what)


def _background(sb: Sandbox, body: ExecIn) -> int:
    p = sb.exec(
        body.cmd,
        background=True,
        cwd=body.cwd,
        env=body.env,
        user=body.user,
        stdin=body.stdin is not None,
    )
    if body.stdin is not None:  # fed before the request's connection closes
        p.send_stdin(body.stdin)
        p.close_stdin()
    return int(p.pid)


def _abandon(sb: Sandbox, p: Any) -> None:
    """The client left before the exit: end the command and drop the connection
    (which also ends the thread reading it)."""

    def job() -> None:
        with contextlib.suppress(Exception):
            p.kill()
        sb.close()

    threading.Thread(target=job, name="torpor-server-abandon", daemon=True).start()


async def _collect(
    request: Request,
    sb: Sandbox,
    p: Any,
    pump: _Pump,
    encoding: str,
    max_output: int,
    what: str,
) -> ExecOut | Response:
    kept: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    size = {"stdout": 0, "stderr": 0}
    dropped = {"stdout": 0, "stderr": 0}
    done = False
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(pump.q.get(), DISCONNECT_POLL)
            except TimeoutError:
                if await request.is_disconnected():  # nobody reads the answer: 499, as nginx
                    return Response(status_code=499)  # (the finally below ends the command)
                continue
            if kind in kept:
                pump.taken(len(value))
                room = max(0, max_output - size[kind])
                kept[kind].append(value[:room])
                size[kind] += min(room, len(value))
                dropped[kind] += max(0, len(value) - room)
                continue
            done = True
            if kind == "timeout":
                raise ExecTimeoutError(_timeout_message(what, value), step="exec")
            if kind == "error":
                raise value
            code, sig = value
            out = {k: b"".join(v) for k, v in kept.items()}
            enc: Callable[[bytes], str] = (
                (lambda b: base64.b64encode(b).decode())
                if encoding == "base64"
                else (lambda b: b.decode("utf-8", "replace"))
            )
            return ExecOut(
                exit_code=code,
                stdout=enc(out["stdout"]),
                stderr=enc(out["stderr"]),
                signal=sig,
                stdout_dropped=dropped["stdout"] + pump.dropped["stdout"],
                stderr_dropped=dropped["stderr"] + pump.dropped["stderr"],
                encoding="base64" if encoding == "base64" else "utf-8",
            )
    finally:
        if done:
            _close_soon(sb)
        else:
            _abandon(sb, p)


async def _events(
    sb: Sandbox, p: Any, pump: _Pump, encoding: str, what: str
) -> AsyncIterator[bytes]:
    dec = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in ("stdout", "stderr")}
    seq = 0
    done = False
    try:
        yield b": torpor exec stream\n\n"  # headers go out now, before the first output
        while True:
            try:
                kind, value = await asyncio.wait_for(pump.q.get(), KEEPALIVE)
            except TimeoutError:  # a silent command: proxies drop idle connections
                yield b": keepalive\n\n"
                continue
            seq += 1
            if kind in dec:
                pump.taken(len(value))
                text = (
                    base64.b64encode(value).decode()
                    if encoding == "base64"
                    else dec[kind].decode(value)
                )
                if text:
                    yield _sse(seq, kind, text)
                continue
            done = True
            if encoding != "base64":
                for k, d in dec.items():
                    if tail := d.decode(b"", True):
                        yield _sse(seq, k, tail)
                        seq += 1
            ends = {
                "stdout_dropped": pump.dropped["stdout"],
                "stderr_dropped": pump.dropped["stderr"],
            }
            if kind == "exit":
                code, sig = value
                yield _sse(seq, "exit", {"exit_code": code, "signal": sig, **ends})
            elif kind == "timeout":
                yield _sse(
                    seq,
                    "exit",
                    {
                        "exit_code": None,
                        "signal": signal.SIGKILL.value,
                        "timed_out": True,
                        "status": 504,
                        "error": "ExecTimeoutError",
                        "detail": _timeout_message(what, value),
                        **ends,
                    },
                )
            else:
                yield _sse(seq, "error", _problem_of(value))
            return
    finally:
        if done:
            _close_soon(sb)
        else:  # the client went away (or the stream was cancelled) mid-command
            _abandon(sb, p)


@router.get("/v1/sandboxes/{ref}/processes", response_model=list[ProcessOut])
def processes(ref: str, request: Request, t: TenantDep) -> list[ProcessOut]:
    """``Sandbox.ps``: every user process in the guest, from its /proc."""
    sb = _open(request, t.paths, ref)
    try:
        return [ProcessOut(pid=x.pid, cmdline=list(x.cmdline)) for x in sb.ps()]
    finally:
        sb.close()


@router.post("/v1/sandboxes/{ref}/processes/{pid}/kill", response_model=KillOut)
def kill_process(ref: str, pid: int, request: Request, t: TenantDep) -> KillOut:
    """``Sandbox.commands.kill``: SIGKILL the process group of ``pid``; 404 if none."""
    if not 2 <= pid < 1 << 31:
        raise UsageError(f"invalid pid {pid}")
    sb = _open(request, t.paths, ref)
    try:
        if not sb.commands.kill(pid):
            raise NotFoundError(f"no process {pid} in sandbox {sb.name}")
    finally:
        sb.close()
    return KillOut(pid=pid, killed=True)


# -- files ---------------------------------------------------------------------------------

GuestPath = Annotated[str, Query(min_length=1, max_length=MAX_PATH, description="absolute")]


def _entry(e: Any) -> EntryOut:
    return EntryOut(
        name=e.name, path=e.path, type=e.type, size=e.size, mode=e.mode, link_target=e.link_target
    )


@router.get(
    "/v1/sandboxes/{ref}/files",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def read_file(ref: str, path: GuestPath, request: Request, t: TenantDep) -> StreamingResponse:
    """``Sandbox.files.read_stream``: the file's bytes, streamed."""
    p = _guest_path(path)
    sb = _open(request, t.paths, ref)
    try:
        with _guest_refusals(p):
            info = sb.files.get_info(p)
            if info.type == "dir":
                raise UsageError(f"{p} is a folder: list it with files/list")
            chunks = sb.files.read_stream(p)
    except BaseException:
        sb.close()
        raise

    def stream() -> Any:
        try:
            yield from chunks
        finally:
            sb.close()

    return StreamingResponse(stream(), media_type="application/octet-stream")


class _BodyReader:
    """A file-like ``read()`` over the request body, for a worker thread: each read
    takes the next chunk from the event loop, so the body is never held whole.

    A body that ends badly (over the upload cap, the client gone) reads as its end,
    with the reason kept in ``failed``: the guest then finishes a temporary file that
    the route removes — an unfinished guest upload would hold one of the agent's
    few upload slots until the VM restarts (the protocol cannot cancel one)."""

    def __init__(self, body: AsyncIterator[bytes]):
        self._it = body
        self._buf = b""
        self.failed: BaseException | None = None

    async def _next(self) -> bytes:
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:
            return b""

    def read(self, n: int = -1) -> bytes:
        while not self._buf:
            if self.failed is not None:
                return b""
            try:
                chunk = from_thread.run(self._next)
            except BaseException as e:  # _TooLarge (the cap), ClientDisconnect, ...
                self.failed = e
                return b""
            if not chunk:
                return b""
            self._buf = chunk
        if n < 0 or n >= len(self._buf):
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


def _upload(sb: Sandbox, p: str, reader: _BodyReader, mode: int) -> Any:
    """Write the body to a temporary name next to ``p``, then rename it over ``p``;
    a body that failed leaves only the temporary file, which is removed."""
    parent, _, name = p.rpartition("/")
    if not name:
        raise UsageError(f"{p} names a folder, not a file")
    tmp = f"{parent}/.torpor-upload-{secrets.token_hex(8)}"
    # ENOTDIR: a file stands where a parent folder would be made
    with _guest_refusals(p, {errno.ENOTDIR: ConflictError}):
        with contextlib.suppress(NotFoundError):
            if sb.files.get_info(p).type == "dir":  # mv would move the file into it
                raise UsageError(f"{p} is a folder")
        sb.files.write(tmp, reader, mode=mode)  # parent folders made; atomic in itself
    try:
        if reader.failed is not None:
            raise reader.failed
        with _guest_refusals(p):
            return sb.files.rename(tmp, p)
    except BaseException:
        with contextlib.suppress(Exception):
            sb.files.remove(tmp)
        raise


@router.put(
    "/v1/sandboxes/{ref}/files",
    response_model=EntryOut,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def write_file(
    ref: str,
    path: GuestPath,
    request: Request,
    t: TenantDep,
    mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
) -> EntryOut | Response:
    """``Sandbox.files.write``: the raw request body becomes the file (atomically:
    it appears under its name only once complete); parent folders are made.  Capped
    by the server's upload limit (413); a cut upload leaves nothing behind."""
    p = _guest_path(path)
    sb = await to_thread.run_sync(_open, request, t.paths, ref)
    try:
        reader = _BodyReader(request.stream())
        info = await to_thread.run_sync(_upload, sb, p, reader, mode)
    except ClientDisconnect:  # the uploader left: nothing was written, nobody to tell
        return Response(status_code=499)
    finally:
        await to_thread.run_sync(sb.close)
    return _entry(info)


@router.delete("/v1/sandboxes/{ref}/files", status_code=204)
def remove_file(ref: str, path: GuestPath, request: Request, t: TenantDep) -> Response:
    """``Sandbox.files.remove``: a file, or a folder with everything in it."""
    p = _guest_path(path)
    sb = _open(request, t.paths, ref)
    try:
        with _guest_refusals(p):
            sb.files.remove(p)
    finally:
        sb.close()
    return Response(status_code=204)


@router.get("/v1/sandboxes/{ref}/files/list", response_model=list[EntryOut])
def list_files(ref: str, path: GuestPath, request: Request, t: TenantDep) -> list[EntryOut]:
    """``Sandbox.files.list``: a folder's entries, sorted by name."""
    p = _guest_path(path)
    sb = _open(request, t.paths, ref)
    try:
        with _guest_refusals(p, {errno.ENOTDIR: UsageError}):  # listing a file
            return [_entry(e) for e in sb.files.list(p)]
    finally:
        sb.close()


# -- terminal ------------------------------------------------------------------------------

#: WebSocket close codes for failures before the terminal starts: 4000 + HTTP status.
WS_BASE = 4000


async def _ws_fail(ws: WebSocket, status: int, detail: str, **extra: Any) -> None:
    """Refuse the WebSocket with a problem body (an HTTP answer where the server
    supports it, else a close code 4000+status after a JSON text frame)."""
    resp = problems.problem(status, detail, **extra)
    try:
        await ws.send_denial_response(resp)
        return
    except RuntimeError:
        pass
    if ws.client_state == WebSocketState.CONNECTING:
        await ws.accept()
    body = json.loads(bytes(resp.body))
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps({"error": body}))
        await ws.close(WS_BASE + status, detail[:120])


def _size(raw: Any) -> tuple[int, int]:
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
    ):
        raise UsageError('resize is {"resize": [cols, rows]}')
    return raw[0], raw[1]


@router.websocket("/v1/sandboxes/{ref}/pty")
async def pty(ws: WebSocket, ref: str) -> None:
    """``Sandbox.pty`` over a WebSocket (``?cmd=sh&cols=80&rows=24``).

    Binary frames both ways are terminal bytes; a text frame ``{"resize": [cols,
    rows]}`` resizes.  The server's first frame is ``{"pid": N}`` (the program's guest
    pid); when the program exits it sends ``{"exit": code}`` and closes.  A client
    that goes away hangs the terminal up (its program ends)."""
    from starlette.exceptions import HTTPException

    try:
        t = authenticate(ws)  # type: ignore[arg-type]
        q = ws.query_params
        cmd = q.get("cmd") or "sh"
        _check_text("cmd", cmd)
        try:
            cols, rows = int(q.get("cols", "80")), int(q.get("rows", "24"))
        except ValueError:
            raise UsageError("cols and rows are integers") from None
        sb = await to_thread.run_sync(_open, ws, t.paths, ref)
    except HTTPException as e:
        await _ws_fail(ws, e.status_code, str(e.detail))
        return
    except TorporError as e:
        await _ws_fail(ws, problems.status_of(e), e.message, error=type(e).__name__)
        return
    try:
        term = await to_thread.run_sync(lambda: sb.pty(cmd, cols, rows))
    except TorporError as e:
        await to_thread.run_sync(sb.close)
        await _ws_fail(ws, problems.status_of(e), e.message, error=type(e).__name__)
        return
    await ws.accept()
    await ws.send_text(json.dumps({"pid": term.pid}))  # the program's pid in the guest
    loop = asyncio.get_running_loop()
    out: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)
    stop = threading.Event()

    def put(item: bytes | None) -> bool:
        """Hand ``item`` to the loop; False once the session ended (nobody reads)."""
        try:
            fut = asyncio.run_coroutine_threadsafe(out.put(item), loop)
        except RuntimeError:  # the loop is closed
            return False
        while not stop.is_set():
            try:
                fut.result(timeout=0.5)
                return True
            except concurrent.futures.TimeoutError:
                continue
        fut.cancel()
        return False

    def reader() -> None:  # thread: terminal -> queue (bounded: a slow client slows it)
        try:
            while not stop.is_set():
                chunk = term.read(timeout=0.5)
                if chunk:
                    if not put(chunk):
                        return
                elif term.exit_code is not None:
                    break
        except Exception as e:  # the connection to the guest broke
            log.info("pty reader ended: %s", e)
        put(None)

    threading.Thread(target=reader, name="torpor-server-pty", daemon=True).start()

    async def to_client() -> None:
        while (chunk := await out.get()) is not None:
            await ws.send_bytes(chunk)
        code = term.exit_code
        await ws.send_text(json.dumps({"exit": code}))
        await ws.close(1000)

    async def from_client() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("bytes") is not None:
                await to_thread.run_sync(term.write, msg["bytes"])
            elif msg.get("text") is not None:
                try:
                    d = json.loads(msg["text"])
                    if not isinstance(d, dict) or "resize" not in d:
                        raise UsageError('text frames are {"resize": [cols, rows]}')
                    c, r = _size(d["resize"])
                    await to_thread.run_sync(term.resize, c, r)
                except (ValueError, TorporError) as e:
                    detail = e.message if isinstance(e, TorporError) else "not JSON"
                    await ws.send_text(json.dumps({"error": detail}))

    try:
        async with anyio.create_task_group() as tg:

            async def first(fn: Callable[[], Any]) -> None:
                with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                    await fn()
                tg.cancel_scope.cancel()  # either side ending ends the session

            tg.start_soon(first, to_client)
            tg.start_soon(first, from_client)
    finally:
        stop.set()
        # hang up (SIGHUP to the program and its foreground job) and drop the connection
        threading.Thread(
            target=lambda: (term.close(), sb.close()), name="torpor-server-pty-end", daemon=True
        ).start()
