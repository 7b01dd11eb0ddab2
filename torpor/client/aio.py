"""``torpor.aio.Client``: the remote SDK, awaitable, on ``httpx.AsyncClient``.

The same surface as :mod:`torpor.client.sync` with ``async def`` methods (as
:mod:`torpor.sandbox.aio` mirrors the local Sandbox): ``await c.Sandbox.create()``,
``await sb.exec(...)``, ``await sb.files.read(...)``, ``await s.send(...)``.  The rules
(errors, retries, idempotency keys, decoding) are the sync client's, from
:mod:`torpor.client._wire`; only the I/O differs.  ``checkpoints`` is a coroutine
method here (a property cannot be awaited).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from typing import Any

import httpx

from torpor import errors as E
from torpor.client import _wire as W
from torpor.client.sync import DEFAULT_TIMEOUT, EventHook, ExecStream, OutputCallback


class AsyncTransport:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        retries: int = W.DEFAULT_RETRIES,
        transport: httpx.AsyncBaseTransport | None = None,
        max_body: int | None = None,
    ):
        self.url, self.token = W.resolve(url, token)
        self.max_body = W.max_body(max_body)  # a non-streamed answer's cap (W.BodyCap)
        headers = {"User-Agent": "torpor-client", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self.retries = max(1, retries)
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=timeout if timeout is not None else DEFAULT_TIMEOUT,
            transport=transport,
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def send(
        self,
        method: str,
        path: str,
        *,
        stream: bool = False,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        cap: bool = True,
        **kw: Any,
    ) -> httpx.Response:
        hdrs = dict(headers or {})
        if key is not None:
            hdrs["Idempotency-Key"] = key
        backoff = W.Backoff(self.retries)
        while True:
            try:
                req = self.http.build_request(method, path, headers=hdrs, **kw)
                resp = await self.http.send(req, stream=True)
                if not stream and resp.status_code < 400:
                    await self._read(resp, f"{method} {path}", cap=cap)  # a cut one: retried
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                wait = backoff.next()
                if wait is None:
                    raise W.unreachable(self.url, e) from e
                await asyncio.sleep(wait)
                continue
            except httpx.TransportError as e:
                if W.may_retry_after_send(method, hdrs):
                    wait = backoff.next()
                    if wait is not None:
                        await asyncio.sleep(wait)
                        continue
                raise W.unreachable(self.url, e) from e
            if resp.status_code == 429:
                wait = backoff.next(resp.headers.get("Retry-After"))
                if wait is not None:
                    await resp.aclose()
                    await asyncio.sleep(wait)
                    continue
            if resp.status_code >= 400:
                raise await self._error(resp)
            return resp

    async def _read(self, resp: httpx.Response, what: str, *, cap: bool = True) -> None:
        """Read the body (at most ``max_body`` bytes unless not ``cap``) and close."""
        try:
            if not cap:
                await resp.aread()
                return
            body = W.BodyCap(self.max_body, what, resp.headers.get("content-length"))
            async for chunk in resp.aiter_bytes():
                body.feed(chunk)
            resp._content = body.content()  # as resp.aread() leaves it: .json(), .text
        except E.ProtocolError as e:
            e.status = resp.status_code  # type: ignore[attr-defined]
            raise
        finally:
            await resp.aclose()

    async def _error(self, resp: httpx.Response) -> E.TorporError:
        """The typed error of a >= 400 answer (ProtocolError raised if its body is
        past the cap)."""
        what = f"{resp.request.method} {resp.request.url.path} ({resp.status_code})"
        try:
            await self._read(resp, what)
        except httpx.HTTPError:  # cut mid-body: the status still says what happened
            return W.error_from(resp.status_code, "", resp.reason_phrase)
        return W.error_of(resp)

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        return W.json_of(await self.send(method, path, **kw), method, path)

    async def events(self, method: str, path: str, **kw: Any) -> AsyncIterator[W.Event]:
        hdrs = {**(kw.pop("headers", None) or {}), "Accept": "text/event-stream"}
        resp = await self.send(method, path, stream=True, headers=hdrs, **kw)
        try:
            if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                try:
                    await self._read(resp, f"{method} {path}")
                except httpx.TransportError as e:
                    raise W.unreachable(self.url, e) from e
                yield W.Event("json", resp.text, None)
                return
            stream = W.SSEStream()
            try:  # not aiter_lines(): it holds a line of any length
                async for chunk in resp.aiter_bytes():
                    for ev in stream.feed(chunk):
                        yield ev
                for ev in stream.close():
                    yield ev
            except httpx.TransportError as e:
                raise W.unreachable(self.url, e) from e
        finally:
            await resp.aclose()


async def _pages(
    t: AsyncTransport, path: str, params: list[tuple[str, str]], key: str
) -> list[Any]:
    out: list[Any] = []
    cursor: str | None = None
    seen: set[str] = set()
    while True:
        p = list(params) + ([("cursor", cursor)] if cursor else [])
        d = await t.call("GET", path, params=p)
        out.extend(W.items(d, key))
        cursor = d.get("next_cursor") if isinstance(d, dict) else None
        if not cursor or cursor in seen:
            return out
        seen.add(cursor)


async def _exec_events(
    events: AsyncIterator[W.Event],
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
    max_output: int,
) -> Any:
    st = ExecStream(on_stdout, on_stderr, max_output)
    async for ev in events:
        r = st.feed(ev)
        if r is not None:
            return r
    raise st.ended()


class AsyncFiles:
    def __init__(self, sb: AsyncSandbox):
        self._sb = sb

    def _path(self) -> str:
        return f"{self._sb._path}/files"

    async def read(self, path: str, format: str = "text") -> str | bytes:
        if format not in ("text", "bytes"):
            raise E.UsageError(f"format must be 'text' or 'bytes', not {format!r}")
        # the whole file, as asked: not capped
        resp = await self._sb._t.send("GET", self._path(), params={"path": path}, cap=False)
        return resp.content if format == "bytes" else resp.content.decode("utf-8", "replace")

    async def write(self, path: str, data: str | bytes, mode: int = 0o644) -> Any:
        body = data.encode() if isinstance(data, str) else data
        d = await self._sb._t.call(
            "PUT",
            self._path(),
            params={"path": path, "mode": str(mode)},
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        return W.entry_info(d) if isinstance(d, dict) else await self.get_info(path)

    async def list(self, path: str) -> list[Any]:
        d = await self._sb._t.call("GET", f"{self._path()}/list", params={"path": path})
        return [W.entry_info(x) for x in W.items(d, "entries")]

    async def get_info(self, path: str) -> Any:
        if not path.startswith("/"):
            raise E.UsageError(f"sandbox paths are absolute: {path!r}")
        parent, _, name = path.rstrip("/").rpartition("/")
        for e in await self.list(parent or "/"):
            if e.name == name:
                return e
        raise E.NotFoundError(f"no such file or folder in the sandbox: {path}", path=path)

    async def exists(self, path: str) -> bool:
        try:
            await self.get_info(path)
        except E.NotFoundError:
            return False
        return True

    async def remove(self, path: str) -> None:
        await self._sb._t.call("DELETE", self._path(), params={"path": path})

    async def make_dir(self, path: str, mode: int = 0o755) -> bool:
        existed = await self.exists(path)
        r = await self._sb.exec(["mkdir", "-p", "-m", f"{mode:o}", "--", path], timeout=60)
        if r.exit_code != 0:
            raise E.AgentError(f"make_dir failed ({r.exit_code}): {r.stderr.strip()[:500]}")
        return not existed

    async def rename(self, old: str, new: str) -> Any:
        await self.get_info(old)
        r = await self._sb.exec(["mv", "--", old, new], timeout=60)
        if r.exit_code != 0:
            raise E.AgentError(f"rename failed ({r.exit_code}): {r.stderr.strip()[:500]}")
        return await self.get_info(new)


class AsyncCommandHandle:
    """Awaitable :class:`torpor.client.sync.RemoteCommandHandle`."""

    def __init__(self, sb: AsyncSandbox, pid: int, command: str):
        self._sb = sb
        self.pid = pid
        self.command = command
        self.exit_code: int | None = None

    async def kill(self) -> None:
        with contextlib.suppress(E.NotFoundError):
            await self._sb.commands.kill(self.pid)

    async def wait(self, *a: object, **kw: object) -> Any:
        raise E.NotSupportedError(
            "a background command's output and exit code are not served through the API"
        )


class AsyncCommands:
    def __init__(self, sb: AsyncSandbox):
        self._sb = sb

    async def run(self, cmd: str | Iterable[str], **kw: Any) -> Any:
        if "envs" in kw:
            kw["env"] = kw.pop("envs")
        return await self._sb.exec(cmd, **kw)

    def list(self) -> list[Any]:
        return []

    async def kill(self, pid: int) -> bool:
        if not isinstance(pid, int) or isinstance(pid, bool) or pid < 2:
            raise E.UsageError(f"invalid pid {pid!r}")
        d = await self._sb._t.call("POST", f"{self._sb._path}/processes/{pid}/kill")
        return bool(d.get("killed", True)) if isinstance(d, dict) else True


class AsyncSandbox:
    """Awaitable :class:`torpor.client.sync.RemoteSandbox`.  Use ``client.Sandbox``."""

    _t: AsyncTransport

    def __init__(self, info: Any):
        self.id: str = info.id
        self.name: str = info.name
        self._path = f"/v1/sandboxes/{W.seg(self.id)}"
        self.files = AsyncFiles(self)
        self.commands = AsyncCommands(self)

    def __repr__(self) -> str:
        return f"aio.Sandbox(id={self.id[:12]!r}, name={self.name!r}, url={self._t.url!r})"

    @classmethod
    async def create(
        cls,
        image: str = "tools:latest",
        *,
        memory: str | int = "512M",
        cpus: int = 1,
        env: Mapping[str, str] | None = None,
        network: bool = True,
        labels: Mapping[str, str] | None = None,
        idle: float | None = None,
        timeout: float | None = None,
        name: str | None = None,
        cwd: str | None = None,
        user: str | None = None,
        command: Iterable[str] | None = None,
        paths: None = None,
    ) -> AsyncSandbox:
        W.no_paths(paths)
        body = W.drop_none(
            {
                "image": image,
                "memory": memory,
                "cpus": cpus,
                "env": dict(env) if env else None,
                "network": network,
                "labels": dict(labels) if labels else None,
                "idle": idle,
                "timeout": timeout,
                "name": name,
                "cwd": cwd,
                "user": user,
                "command": list(command) if command is not None else None,
            }
        )
        d = await cls._t.call("POST", "/v1/sandboxes", json=body, key=W.new_key())
        return cls(W.sandbox_info(d))

    @classmethod
    async def connect(cls, sandbox_id: str, *, paths: None = None) -> AsyncSandbox:
        W.no_paths(paths)
        info = await cls.get_info(sandbox_id)
        if info.status == "hibernated":
            await cls._t.call("POST", f"/v1/sandboxes/{W.seg(info.id)}/wake")
            info = await cls.get_info(info.id)
        if info.status != "running":
            raise E.ConflictError(f"sandbox {info.name} is not running ({info.status})")
        return cls(info)

    @classmethod
    async def list(
        cls, labels: Mapping[str, str] | None = None, *, all: bool = False, paths: None = None
    ) -> list[Any]:
        W.no_paths(paths)
        params = W.labels_query(labels)
        out: list[Any] = []
        for status in (None, *(W.OTHER_STATUSES if all else ())):
            p = params + ([("status", status)] if status else [])
            out += [W.sandbox_info(x) for x in await _pages(cls._t, "/v1/sandboxes", p, "x")]
        return out

    @classmethod
    async def get_info(cls, sandbox_id: str, *, paths: None = None) -> Any:
        W.no_paths(paths)
        return W.sandbox_info(await cls._t.call("GET", f"/v1/sandboxes/{W.seg(sandbox_id)}"))

    @classmethod
    async def restore(cls, snap: Any, *, name: str | None = None, paths: None = None) -> Any:
        W.no_paths(paths)
        ref = snap.id if hasattr(snap, "id") else str(snap)
        d = await cls._t.call(
            "POST",
            f"/v1/snapshots/{W.seg(ref)}/restore",
            json=W.drop_none({"name": name}),
            key=W.new_key(),
        )
        return cls(W.sandbox_info(d))

    async def info(self) -> Any:
        return await self.get_info(self.id)

    async def is_running(self) -> bool:
        return bool((await self.info()).status == "running")

    async def kill(self) -> None:
        await self._t.call("DELETE", self._path)

    async def close(self) -> None:
        """Nothing to drop: a remote sandbox holds no connection of its own."""

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(E.NotFoundError):
            await self.kill()

    async def snapshot(self, tag: str | None = None) -> Any:
        d = await self._t.call(
            "POST", f"{self._path}/snapshot", json=W.drop_none({"tag": tag}), key=W.new_key()
        )
        snap = W.snapshot_of(d)
        return snap if snap.tag is not None or tag is None else type(snap)(snap.id, tag)

    async def fork(self, n: int = 1) -> list[AsyncSandbox]:
        d = await self._t.call("POST", f"{self._path}/fork", json={"n": n}, key=W.new_key())
        return [type(self)(W.sandbox_info(x)) for x in W.items(d, "sandboxes")]

    async def hibernate(self) -> Any:
        return W.snapshot_of(await self._t.call("POST", f"{self._path}/hibernate"))

    async def wake(self) -> None:
        await self._t.call("POST", f"{self._path}/wake")

    async def exec(
        self,
        cmd: str | Iterable[str],
        *,
        background: bool = False,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = 60.0,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        stdin: bytes | str | bool | None = None,
        max_output: int = 16 * 1024 * 1024,
    ) -> Any:
        if background:
            body = W.drop_none(
                {"cmd": W.cmd_body(cmd), "cwd": cwd, "user": user, **W.stdin_field(stdin)}
            )
            body.update(env=dict(env or {}), background=True)
            d = await self._t.call("POST", f"{self._path}/exec", json=body)
            pid = int(d.get("pid", 0)) if isinstance(d, dict) else 0
            argv = body["cmd"]
            text = argv if isinstance(argv, str) else " ".join(argv)
            return AsyncCommandHandle(self, pid, text)
        if timeout is not None and not timeout > 0:
            raise E.UsageError(f"timeout must be > 0 seconds, not {timeout!r}")
        body = W.drop_none(
            {
                "cmd": W.cmd_body(cmd),
                "cwd": cwd,
                "env": dict(env) if env else None,
                "user": user,
                "timeout": timeout,
                **W.stdin_field(stdin),
            }
        )
        body["timeout"] = timeout  # null is "no limit", not the server's default
        events = self._t.events("POST", f"{self._path}/exec", json=body)
        return await _exec_events(events, on_stdout, on_stderr, max_output)

    def processes(self) -> list[Any]:
        return []

    async def pty(
        self,
        cmd: str | Iterable[str] = "sh",
        cols: int = 80,
        rows: int = 24,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> Any:
        """``cmd`` on a guest terminal over the PTY WebSocket (an AsyncRemotePty)."""
        from torpor.client.pty import AsyncRemotePty, _cmd_text

        if cwd is not None or env or user is not None:
            raise E.NotSupportedError("cwd, env and user of a pty are not in the API yet")
        return await AsyncRemotePty.open(
            self._t.url, self._t.token, self.id, _cmd_text(cmd), cols, rows
        )

    async def ps(self) -> list[Any]:
        d = await self._t.call("GET", f"{self._path}/processes")
        return [W.process_info(x) for x in W.items(d, "processes")]


class AsyncSession:
    """Awaitable :class:`torpor.client.sync.RemoteSession`.  Use ``client.Session``."""

    _t: AsyncTransport
    _sandbox_cls: type[AsyncSandbox]

    def __init__(self, doc: dict[str, Any], *, on_event: EventHook | None = None):
        self._doc = doc
        self.id: str = doc["id"]
        self.name: str = str(doc.get("name") or self.id)
        self._path = f"/v1/sessions/{W.seg(self.id)}"
        self.on_event = on_event

    def __repr__(self) -> str:
        return f"aio.Session(id={self.id[:12]!r}, name={self.name!r}, url={self._t.url!r})"

    @classmethod
    async def create(
        cls,
        image: str = "tools:latest",
        model: str | dict[str, Any] = "scripted:demo",
        *,
        name: str | None = None,
        memory_mib: int = 256,
        idle: float | None = None,
        system: str | None = None,
        network: bool = False,
        on_event: EventHook | None = None,
        labels: dict[str, str] | None = None,
    ) -> AsyncSession:
        body = W.session_create_body(image, model, name, memory_mib, idle, system, network, labels)
        d = await cls._t.call("POST", "/v1/sessions", json=body, key=W.new_key())
        return cls(W.session_doc(d), on_event=on_event)

    @classmethod
    async def open(cls, ref: str, *, on_event: EventHook | None = None) -> AsyncSession:
        d = await cls._t.call("GET", f"/v1/sessions/{W.seg(ref)}")
        return cls(W.session_doc(d), on_event=on_event)

    @classmethod
    async def list(cls, *, include_removed: bool = False) -> list[AsyncSession]:
        params = [("include_removed", "true")] if include_removed else []
        return [cls(W.session_doc(x)) for x in await _pages(cls._t, "/v1/sessions", params, "x")]

    async def close(self) -> None:
        """Nothing to close."""

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def refresh(self) -> dict[str, Any]:
        self._doc = W.session_doc(await self._t.call("GET", self._path))
        return self._doc

    async def status(self) -> str:
        return str((await self.refresh()).get("status", ""))

    async def log(self, after: int = 0) -> list[Any]:
        out: list[Any] = []
        while True:
            d = await self._t.call("GET", f"{self._path}/log", params={"after": str(after)})
            page = W.entries(d)
            out.extend(page)
            if not page or not (isinstance(d, dict) and d.get("next_cursor")):
                return out
            after = page[-1].seq

    async def entries(self, after: int = 0, limit: int | None = None) -> list[Any]:
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise E.UsageError(f"after must be an entry number >= 0, not {after!r}")
        if limit is not None:
            W.check_limit(limit)
        if limit is None or limit > W.MAX_PAGE:
            return (await self.log(after))[:limit]
        params = {"after": str(after), "limit": str(limit)}
        d = await self._t.call("GET", f"{self._path}/log", params=params)
        return W.entries(d)[:limit]

    @property
    def checkpoints(self) -> Awaitable[list[Any]]:
        """``await s.checkpoints`` (as :class:`torpor.aio.Session`)."""
        return self._checkpoints()

    async def _checkpoints(self) -> list[Any]:
        return W.checkpoints(await self._t.call("GET", f"{self._path}/checkpoints"))

    @property
    def sandbox(self) -> Awaitable[AsyncSandbox]:
        """``await s.sandbox``: the session's VM as a remote Sandbox, running."""
        return self._sandbox()

    async def _sandbox(self) -> AsyncSandbox:
        d = await self.refresh()
        if d.get("status") != "running" or not isinstance(d.get("vm"), dict):
            await self.wake()
            d = await self.refresh()
        vm = d.get("vm")
        if not isinstance(vm, dict) or not vm.get("id"):
            raise E.ProtocolError("the server did not name the session's VM")
        return await self._sandbox_cls.connect(str(vm["id"]))

    async def append(self, kind: Any, payload: dict[str, Any], *, key: str | None = None) -> Any:
        kind = str(getattr(kind, "value", kind))
        body = W.drop_none({"kind": kind, "payload": payload, "key": key})
        return W.entry(await self._t.call("POST", f"{self._path}/entries", json=body, key=key))

    async def checkpoint(self, reason: str = "user") -> Any:
        d = await self._t.call("POST", f"{self._path}/checkpoint", json={"reason": reason})
        return W.checkpoint(d)

    async def send(self, text: str, *, key: str | None = None, wait: bool = True) -> str:
        """See :meth:`torpor.client.sync.RemoteSession.send`."""
        if not isinstance(text, str) or not text.strip():
            raise E.UsageError("a message must not be empty")
        key = key or W.new_key()
        last = 0
        lost = False
        backoff = W.Backoff(self._t.retries)
        while True:
            try:
                answer, last = await self._send_once(text, key, last)
                return answer
            except E.ConflictError as e:
                if not W.is_busy(e) or not (wait or lost):
                    raise
            except E.TorporError as e:
                if getattr(e, "status", 0) is not None:
                    raise
                lost = True
                wait_s = backoff.next()
                if wait_s is None:
                    raise
                await asyncio.sleep(wait_s)
            with contextlib.suppress(E.TorporError):
                last = await self._follow_turn(last, key)

    def _deliver(self, d: object, last: int) -> int:
        e = W.entry(d)
        if e.seq > last:
            if self.on_event is not None:
                self.on_event(e)
            return int(e.seq)
        return last

    async def _send_once(self, text: str, key: str, last: int) -> tuple[str, int]:
        path = f"{self._path}/messages"
        async for ev in self._t.events("POST", path, json={"text": text}, key=key):
            if ev.event == "entry":
                last = self._deliver(ev.json(), last)
            elif ev.event in ("done", "json"):
                d = ev.json()
                if isinstance(d, dict):
                    for x in d.get("entries") or ():
                        last = self._deliver(x, last)
                return W.answer_of(d) or "", last
            elif ev.event == "error":
                d = ev.json()
                raise W.error_from(int(d.get("status", 500)) if isinstance(d, dict) else 500, d)
        raise W.unreachable(self._t.url, ConnectionError("the turn's stream ended early"))

    async def _follow_turn(self, last: int, key: str | None = None) -> int:
        """See :meth:`torpor.client.sync.RemoteSession._follow_turn`."""
        ours = last > 0
        params = {"after": str(last), "until": "turn"}
        async for ev in self._t.events("GET", f"{self._path}/log", params=params):
            if ev.event == "entry":
                d = ev.json()
                ours = ours or (isinstance(d, dict) and key is not None and d.get("key") == key)
                if ours:
                    last = self._deliver(d, last)
        return last

    async def hibernate(self) -> Any:
        self._doc = W.session_doc(await self._t.call("POST", f"{self._path}/hibernate"))
        return W.checkpoint(self._doc.get("last_checkpoint"))

    async def wake(self) -> Any:
        self._doc = W.session_doc(await self._t.call("POST", f"{self._path}/wake"))
        vm = self._doc.get("vm")
        return await self._sandbox_cls.get_info(vm["id"]) if isinstance(vm, dict) else None

    async def recover(self, *, replay: bool = True, wait: bool = True) -> str | None:
        if not replay:
            raise E.NotSupportedError("recover(replay=False) is not available through a server")
        while True:
            try:
                d = await self._t.call("POST", f"{self._path}/recover")
                break
            except E.ConflictError as e:
                if not wait or not W.is_busy(e):
                    raise
                await self._follow_turn(int((await self.refresh()).get("entries") or 0))
        if isinstance(d, dict) and isinstance(d.get("session"), dict):
            self._doc = d["session"]
        return W.answer_of(d)

    async def fork(self, at: int | Any | None = None, name: str | None = None) -> AsyncSession:
        body = W.drop_none({"at": getattr(at, "seq", at), "name": name})
        d = await self._t.call("POST", f"{self._path}/fork", json=body, key=W.new_key())
        return type(self)(W.session_doc(d), on_event=self.on_event)

    async def remove(self, reason: str = "removed by the user") -> list[str]:
        d = await self._t.call("DELETE", self._path, params={"reason": reason})
        if isinstance(d, dict):
            return [str(x) for x in d.get("released_snapshots") or d.get("released") or ()]
        return []


class AsyncClient:
    """Awaitable :class:`torpor.Client`: ``async with AsyncClient(url, token) as c``."""

    Sandbox: type[AsyncSandbox]
    Session: type[AsyncSession]

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        retries: int = W.DEFAULT_RETRIES,
        transport: httpx.AsyncBaseTransport | None = None,
        max_body: int | None = None,
    ):
        self._t = AsyncTransport(
            url, token, timeout=timeout, retries=retries, transport=transport, max_body=max_body
        )
        self.url = self._t.url
        self.Sandbox = type("Sandbox", (AsyncSandbox,), {"_t": self._t})
        self.Session = type(
            "Session", (AsyncSession,), {"_t": self._t, "_sandbox_cls": self.Sandbox}
        )

    def __repr__(self) -> str:
        return f"torpor.aio.Client({self.url!r})"

    async def close(self) -> None:
        await self._t.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def info(self) -> dict[str, Any]:
        return dict(await self._t.call("GET", "/v1/info"))

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        return await self._t.call(method, path, **kw)


Client = AsyncClient
