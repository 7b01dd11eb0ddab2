"""``torpor.Client(url, token)``: the Sandbox and Session of a ``torpor serve`` server.

``Client(url).Sandbox`` and ``Client(url).Session`` are classes with the methods and
signatures of :class:`torpor.Sandbox` and :class:`torpor.Session`, returning the same
dataclasses and raising the same error classes, so code moves from local to remote by
changing one line::

    Sandbox = torpor.Client("http://gpu-host:7878", token).Sandbox

Invariants:

- Every failure is a :class:`~torpor.errors.TorporError` (see :mod:`torpor.client._wire`
  for how a problem-details answer maps back); no httpx exception leaks.
- Creates (sandbox, session, fork, restore, snapshot) and message sends carry an
  ``Idempotency-Key`` made here when the caller gives none, so the automatic retry
  after a lost answer never makes a second VM or runs a turn twice.
- What a method cannot do through the API (a background command, an open stdin, a
  local ``paths=``) raises NotSupportedError/UsageError instead of doing something else.
- A remote object holds only ids: state is always asked of the server.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, BinaryIO

import httpx

from torpor import errors as E
from torpor.client import _wire as W

OutputCallback = Callable[[str], object]
EventHook = Callable[[Any], None]
DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=900.0)  # a boot or a turn under TCG is slow


class Transport:
    """One httpx.Client with the auth header, the retry rules and the error mapping."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        retries: int = W.DEFAULT_RETRIES,
        transport: httpx.BaseTransport | None = None,
        max_body: int | None = None,
    ):
        self.url, self.token = W.resolve(url, token)
        self.max_body = W.max_body(max_body)  # a non-streamed answer's cap (W.BodyCap)
        headers = {"User-Agent": "torpor-client", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self.retries = max(1, retries)
        self.http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout if timeout is not None else DEFAULT_TIMEOUT,
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def send(
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
        """The 2xx response (with ``stream``: open, the caller closes it); errors raised.
        Without ``stream`` the body is read, at most ``max_body`` bytes if ``cap``."""
        hdrs = dict(headers or {})
        if key is not None:
            hdrs["Idempotency-Key"] = key
        backoff = W.Backoff(self.retries)
        while True:
            try:
                req = self.http.build_request(method, path, headers=hdrs, **kw)
                resp = self.http.send(req, stream=True)
                if not stream and resp.status_code < 400:
                    self._read(resp, f"{method} {path}", cap=cap)  # here: a cut one is retried
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                wait = backoff.next()  # never reached the server: safe to send again
                if wait is None:
                    raise W.unreachable(self.url, e) from e
                time.sleep(wait)
                continue
            except httpx.TransportError as e:
                if W.may_retry_after_send(method, hdrs) and not _is_body_stream(kw):
                    wait = backoff.next()
                    if wait is not None:
                        time.sleep(wait)
                        continue
                raise W.unreachable(self.url, e) from e
            if resp.status_code == 429:
                wait = backoff.next(resp.headers.get("Retry-After"))
                if wait is not None:
                    resp.close()
                    time.sleep(wait)
                    continue
            if resp.status_code >= 400:
                raise self._error(resp)
            return resp

    def _read(self, resp: httpx.Response, what: str, *, cap: bool = True) -> None:
        """Read the body (at most ``max_body`` bytes unless not ``cap``) and close."""
        try:
            if not cap:
                resp.read()
                return
            body = W.BodyCap(self.max_body, what, resp.headers.get("content-length"))
            for chunk in resp.iter_bytes():
                body.feed(chunk)
            resp._content = body.content()  # as resp.read() leaves it: .json(), .text
        except E.ProtocolError as e:
            e.status = resp.status_code  # type: ignore[attr-defined]
            raise
        finally:
            resp.close()

    def _error(self, resp: httpx.Response) -> E.TorporError:
        """The typed error of a >= 400 answer (ProtocolError raised if its body is
        past the cap)."""
        try:
            self._read(resp, f"{resp.request.method} {resp.request.url.path} ({resp.status_code})")
        except httpx.HTTPError:  # cut mid-body: the status still says what happened
            return W.error_from(resp.status_code, "", resp.reason_phrase)
        return W.error_of(resp)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """The decoded JSON of a 2xx answer (None for an empty one)."""
        return W.json_of(self.send(method, path, **kw), method, path)

    def events(self, method: str, path: str, **kw: Any) -> Iterator[W.Event]:
        """Server-Sent Events of one request, as they arrive."""
        hdrs = {**(kw.pop("headers", None) or {}), "Accept": "text/event-stream"}
        resp = self.send(method, path, stream=True, headers=hdrs, **kw)
        try:
            ctype = resp.headers.get("content-type", "")
            if not ctype.startswith("text/event-stream"):
                # a server that answered with JSON instead: one event with the whole body
                try:
                    self._read(resp, f"{method} {path}")
                except httpx.TransportError as e:
                    raise W.unreachable(self.url, e) from e
                yield W.Event("json", resp.text, None)
                return
            stream = W.SSEStream()
            try:  # not iter_lines(): it holds a line of any length
                for chunk in resp.iter_bytes():
                    for ev in stream.feed(chunk):
                        yield ev
                for ev in stream.close():
                    yield ev
            except httpx.TransportError as e:
                raise W.unreachable(self.url, e) from e
        finally:
            resp.close()


def _is_body_stream(kw: Mapping[str, Any]) -> bool:
    c = kw.get("content")
    return c is not None and not isinstance(c, bytes | str)


def _stream_text(data: str) -> str:
    """The text of a stdout/stderr event: a JSON string (docs/api.md), else raw text."""
    if data.startswith('"'):
        with contextlib.suppress(ValueError):
            d = json.loads(data)
            if isinstance(d, str):
                return d
    return data


class _Output:
    """Output of a streamed exec: callbacks see all of it, the result keeps ``limit``."""

    def __init__(
        self, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None, limit: int
    ):
        self.cb = {"stdout": on_stdout, "stderr": on_stderr}
        self.kept: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.size = {"stdout": 0, "stderr": 0}
        self.dropped = {"stdout": 0, "stderr": 0}
        self.limit = limit

    def feed(self, kind: str, text: str) -> None:
        n = len(text.encode("utf-8", "replace"))
        if self.size[kind] + n <= self.limit:
            self.kept[kind].append(text)
            self.size[kind] += n
        else:
            self.dropped[kind] += n
        cb = self.cb[kind]
        if cb is not None and text:
            cb(text)

    def text(self, kind: str) -> str:
        return "".join(self.kept[kind])


class ExecStream:
    """The events of one exec, fed in order; :meth:`feed` returns the CommandResult at
    the final event (or raises its error).  Shared by the sync and async clients."""

    def __init__(
        self, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None, limit: int
    ):
        self.out = _Output(on_stdout, on_stderr, limit)

    def feed(self, ev: W.Event) -> Any | None:
        import dataclasses

        out = self.out
        if ev.event in ("stdout", "stderr"):
            out.feed(ev.event, _stream_text(ev.data))
            return None
        if ev.event in ("exit", "result", "json"):
            body = ev.json()
            if isinstance(body, dict) and (body.get("timed_out") or body.get("error")):
                ev = W.Event("error", ev.data, ev.id)  # the exit of a killed command
                return self.feed(ev)
            r = W.exec_exit(body)
            # a JSON answer (no stream) carries the output itself
            if r.stdout and not out.size["stdout"]:
                out.feed("stdout", r.stdout)
            if r.stderr and not out.size["stderr"]:
                out.feed("stderr", r.stderr)
            return dataclasses.replace(
                r,
                stdout=out.text("stdout"),
                stderr=out.text("stderr"),
                stdout_dropped=r.stdout_dropped + out.dropped["stdout"],
                stderr_dropped=r.stderr_dropped + out.dropped["stderr"],
            )
        if ev.event == "error":
            body = ev.json()
            status = int(body.get("status", 500)) if isinstance(body, dict) else 500
            err = W.error_from(status, body)
            if isinstance(err, E.ExecTimeoutError):
                err.stdout = err.stdout or out.text("stdout")
                err.stderr = err.stderr or out.text("stderr")
            raise err
        return None  # an event this client does not know: a newer server's

    @staticmethod
    def ended() -> E.TorporError:
        return E.AgentError("the server ended the exec stream without an exit status", step="exec")


def exec_events(
    events: Iterable[W.Event],
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
    max_output: int,
) -> Any:
    """Drive an exec's event stream to its CommandResult (or its error)."""
    st = ExecStream(on_stdout, on_stderr, max_output)
    for ev in events:
        r = st.feed(ev)
        if r is not None:
            return r
    raise st.ended()


# -- Sandbox ---------------------------------------------------------------------------


class RemoteFiles:
    """``sb.files`` over ``/v1/sandboxes/{ref}/files``."""

    def __init__(self, sb: RemoteSandbox):
        self._sb = sb

    def _path(self) -> str:
        return f"{self._sb._path}/files"

    def read(self, path: str, format: str = "text") -> str | bytes:
        if format not in ("text", "bytes"):
            raise E.UsageError(f"format must be 'text' or 'bytes', not {format!r}")
        # the whole file, as asked: not capped (read_stream is for files of any size)
        resp = self._sb._t.send("GET", self._path(), params={"path": path}, cap=False)
        data = resp.content
        return data if format == "bytes" else data.decode("utf-8", "replace")

    def read_stream(self, path: str) -> Iterator[bytes]:
        resp = self._sb._t.send("GET", self._path(), params={"path": path}, stream=True)
        try:
            yield from resp.iter_bytes()
        except httpx.TransportError as e:  # cut mid-file: never a partial file as whole
            raise W.unreachable(self._sb._t.url, e) from e
        finally:
            resp.close()

    def write(self, path: str, data: str | bytes | BinaryIO, mode: int = 0o644) -> Any:
        body = data.encode() if isinstance(data, str) else data
        d = self._sb._t.call(
            "PUT",
            self._path(),
            params={"path": path, "mode": str(mode)},
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        return W.entry_info(d) if isinstance(d, dict) else self.get_info(path)

    def list(self, path: str) -> list[Any]:
        d = self._sb._t.call("GET", f"{self._path()}/list", params={"path": path})
        return [W.entry_info(x) for x in W.items(d, "entries")]

    def get_info(self, path: str) -> Any:
        parent, _, name = path.rstrip("/").rpartition("/")
        if not path.startswith("/"):
            raise E.UsageError(f"sandbox paths are absolute: {path!r}")
        for e in self.list(parent or "/"):
            if e.name == name:
                return e
        raise E.NotFoundError(f"no such file or folder in the sandbox: {path}", path=path)

    def exists(self, path: str) -> bool:
        try:
            self.get_info(path)
        except E.NotFoundError:
            return False
        return True

    def make_dir(self, path: str, mode: int = 0o755) -> bool:
        existed = self.exists(path)
        r = self._sb.exec(["mkdir", "-p", "-m", f"{mode:o}", "--", path], timeout=60)
        if r.exit_code != 0:
            raise E.AgentError(f"make_dir failed ({r.exit_code}): {r.stderr.strip()[:500]}")
        return not existed

    def remove(self, path: str) -> None:
        self._sb._t.call("DELETE", self._path(), params={"path": path})

    def rename(self, old: str, new: str) -> Any:
        self.get_info(old)
        r = self._sb.exec(["mv", "--", old, new], timeout=60)
        if r.exit_code != 0:
            raise E.AgentError(f"rename failed ({r.exit_code}): {r.stderr.strip()[:500]}")
        return self.get_info(new)


class RemoteCommandHandle:
    """A background command started through a server: its ``pid`` and ``kill()``.

    The server discards a background command's output (docs/api.md), so ``wait``,
    ``output`` and stdin are NotSupportedError; ``sb.ps()`` shows whether it runs."""

    def __init__(self, sb: RemoteSandbox, pid: int, command: str):
        self._sb = sb
        self.pid = pid
        self.command = command
        self.exit_code: int | None = None

    def __repr__(self) -> str:
        return f"RemoteCommandHandle(pid={self.pid}, command={self.command[:40]!r})"

    def kill(self) -> None:
        """SIGKILL the command's process group."""
        with contextlib.suppress(E.NotFoundError):  # already gone, as locally
            self._sb.commands.kill(self.pid)

    def signal(self, signo: int) -> None:
        import signal as _signal

        if signo != _signal.SIGKILL:
            raise E.NotSupportedError("through a server a background command can only be killed")
        self.kill()

    def _unsupported(self, *a: object, **kw: object) -> Any:
        raise E.NotSupportedError(
            "a background command's output, exit code and stdin are not served through "
            "the API: write its output to a file in the sandbox and read that"
        )

    wait = output = send_stdin = close_stdin = _unsupported


class RemoteCommands:
    """``sb.commands``: the E2B names."""

    def __init__(self, sb: RemoteSandbox):
        self._sb = sb

    def run(self, cmd: str | Iterable[str], **kw: Any) -> Any:
        if "envs" in kw:
            kw["env"] = kw.pop("envs")
        return self._sb.exec(cmd, **kw)

    def list(self) -> list[Any]:
        return self._sb.processes()

    def kill(self, pid: int) -> bool:
        if not isinstance(pid, int) or isinstance(pid, bool) or pid < 2:
            raise E.UsageError(f"invalid pid {pid!r}")
        d = self._sb._t.call("POST", f"{self._sb._path}/processes/{pid}/kill")
        return bool(d.get("killed", True)) if isinstance(d, dict) else True


class RemoteSandbox:
    """:class:`torpor.Sandbox` through a server.  Use ``client.Sandbox``."""

    _t: Transport  # set on the per-client subclass (Client.__init__)

    def __init__(self, info: Any):
        self.id: str = info.id
        self.name: str = info.name
        self._path = f"/v1/sandboxes/{W.seg(self.id)}"
        self.files = RemoteFiles(self)
        self.commands = RemoteCommands(self)

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id[:12]!r}, name={self.name!r}, url={self._t.url!r})"

    # -- lifecycle -------------------------------------------------------------------
    @classmethod
    def create(
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
    ) -> RemoteSandbox:
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
        d = cls._t.call("POST", "/v1/sandboxes", json=body, key=W.new_key())
        return cls(W.sandbox_info(d))

    @classmethod
    def connect(cls, sandbox_id: str, *, paths: None = None) -> RemoteSandbox:
        """The sandbox ``sandbox_id``; a hibernated one is woken (as locally)."""
        W.no_paths(paths)
        info = cls.get_info(sandbox_id)
        if info.status == "hibernated":
            cls._t.call("POST", f"/v1/sandboxes/{W.seg(info.id)}/wake")
            info = cls.get_info(info.id)
        if info.status != "running":
            raise E.ConflictError(f"sandbox {info.name} is not running ({info.status})")
        return cls(info)

    @classmethod
    def list(
        cls, labels: Mapping[str, str] | None = None, *, all: bool = False, paths: None = None
    ) -> list[Any]:
        W.no_paths(paths)
        params: list[tuple[str, str]] = W.labels_query(labels)
        out: list[Any] = []
        # the route lists running and hibernated ones; `all` asks for the others by status
        for status in (None, *(W.OTHER_STATUSES if all else ())):
            p = params + ([("status", status)] if status else [])
            for page in _pages(cls._t, "/v1/sandboxes", p, "sandboxes"):
                out.extend(W.sandbox_info(x) for x in page)
        return out

    @classmethod
    def get_info(cls, sandbox_id: str, *, paths: None = None) -> Any:
        W.no_paths(paths)
        return W.sandbox_info(cls._t.call("GET", f"/v1/sandboxes/{W.seg(sandbox_id)}"))

    @classmethod
    def restore(cls, snap: Any, *, name: str | None = None, paths: None = None) -> RemoteSandbox:
        W.no_paths(paths)
        ref = snap.id if hasattr(snap, "id") else str(snap)
        d = cls._t.call(
            "POST",
            f"/v1/snapshots/{W.seg(ref)}/restore",
            json=W.drop_none({"name": name}),
            key=W.new_key(),
        )
        return cls(W.sandbox_info(d))

    def info(self) -> Any:
        return self.get_info(self.id)

    def is_running(self) -> bool:
        return bool(self.info().status == "running")

    def set_timeout(self, timeout: float | None) -> None:
        raise E.NotSupportedError("set_timeout is not available through the server API yet")

    def kill(self) -> None:
        """End the sandbox and remove it (its snapshots stay)."""
        self._t.call("DELETE", self._path)

    def close(self) -> None:
        """Nothing to drop: a remote sandbox holds no connection of its own."""

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(E.NotFoundError):
            self.kill()

    # -- snapshots ---------------------------------------------------------------------
    def snapshot(self, tag: str | None = None) -> Any:
        d = self._t.call(
            "POST", f"{self._path}/snapshot", json=W.drop_none({"tag": tag}), key=W.new_key()
        )
        snap = W.snapshot_of(d)
        return snap if snap.tag is not None or tag is None else type(snap)(snap.id, tag)

    def fork(self, n: int = 1) -> list[RemoteSandbox]:
        d = self._t.call("POST", f"{self._path}/fork", json={"n": n}, key=W.new_key())
        return [type(self)(W.sandbox_info(x)) for x in W.items(d, "sandboxes")]

    def hibernate(self) -> Any:
        return W.snapshot_of(self._t.call("POST", f"{self._path}/hibernate"))

    def wake(self) -> None:
        self._t.call("POST", f"{self._path}/wake")

    # -- commands ----------------------------------------------------------------------
    def exec(
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
        """Run ``cmd``; output streams to the callbacks as the server relays it (SSE)."""
        if background:
            body = W.drop_none(
                {"cmd": W.cmd_body(cmd), "cwd": cwd, "user": user, **W.stdin_field(stdin)}
            )
            body.update(env=dict(env or {}), background=True)
            d = self._t.call("POST", f"{self._path}/exec", json=body)
            pid = int(d.get("pid", 0)) if isinstance(d, dict) else 0
            argv = body["cmd"]
            return RemoteCommandHandle(self, pid, argv if isinstance(argv, str) else " ".join(argv))
        if timeout is not None and not timeout > 0:
            raise E.UsageError(f"timeout must be > 0 seconds, not {timeout!r}")
        body = W.drop_none(
            {
                "cmd": W.cmd_body(cmd),  # a string goes as one: the server runs sh -c
                "cwd": cwd,
                "env": dict(env) if env else None,
                "user": user,
                "timeout": timeout,
                **W.stdin_field(stdin),
            }
        )
        body["timeout"] = timeout  # null is "no limit", not the server's default
        events = self._t.events("POST", f"{self._path}/exec", json=body)
        return exec_events(events, on_stdout, on_stderr, max_output)

    def pty(
        self,
        cmd: str | Iterable[str] = "sh",
        cols: int = 80,
        rows: int = 24,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> Any:
        """``cmd`` on a ``cols`` x ``rows`` guest terminal, over the PTY WebSocket
        (:class:`torpor.client.pty.RemotePty`, the methods of the local Pty)."""
        from torpor.client.pty import RemotePty, _cmd_text

        if cwd is not None or env or user is not None:
            raise E.NotSupportedError("cwd, env and user of a pty are not in the API yet")
        return RemotePty(self._t.url, self._t.token, self.id, _cmd_text(cmd), cols, rows)

    def processes(self) -> list[Any]:
        """Background commands this object started: none (see :meth:`exec`)."""
        return []

    def ps(self) -> list[Any]:
        """Every user process in the guest."""
        d = self._t.call("GET", f"{self._path}/processes")
        return [W.process_info(x) for x in W.items(d, "processes")]

    def logs(self, tail: int | None = None) -> str:
        """The console log (not in the local API: the CLI's ``logs``)."""
        params = {"tail": str(tail)} if tail is not None else None
        return self._t.send("GET", f"{self._path}/logs", params=params).text


def _pages(t: Transport, path: str, params: list[tuple[str, str]], key: str) -> Iterator[list[Any]]:
    """Every page of a list route (``next_cursor`` until there is none)."""
    cursor: str | None = None
    seen: set[str] = set()
    while True:
        p = list(params) + ([("cursor", cursor)] if cursor else [])
        d = t.call("GET", path, params=p)
        yield W.items(d, key)
        cursor = d.get("next_cursor") if isinstance(d, dict) else None
        if not cursor or cursor in seen:  # a server repeating a cursor must not loop us
            return
        seen.add(cursor)


# -- Session ---------------------------------------------------------------------------


class RemoteSession:
    """:class:`torpor.Session` through a server.  Use ``client.Session``."""

    _t: Transport
    _sandbox_cls: type[RemoteSandbox]

    def __init__(self, doc: dict[str, Any], *, on_event: EventHook | None = None):
        self._doc = doc
        self.id: str = doc["id"]
        self.name: str = str(doc.get("name") or self.id)
        self._path = f"/v1/sessions/{W.seg(self.id)}"
        self.on_event = on_event

    def __repr__(self) -> str:
        return f"Session(id={self.id[:12]!r}, name={self.name!r}, url={self._t.url!r})"

    @classmethod
    def create(
        cls,
        image: str = "tools:latest",
        model: str | dict[str, Any] = "scripted:demo",
        *,
        name: str | None = None,
        memory_mib: int = 256,
        idle: float | None = None,
        system: str | None = None,
        network: bool = False,
        paths: None = None,
        dsn: None = None,
        on_event: EventHook | None = None,
        tools: None = None,
        labels: dict[str, str] | None = None,
    ) -> RemoteSession:
        """A new session on the server.  ``model``: a spec string; a scripted model is a
        built-in (``scripted:demo``) or a script document (a dict) sent inline."""
        _local_only(paths=paths, dsn=dsn, tools=tools)
        body = W.session_create_body(image, model, name, memory_mib, idle, system, network, labels)
        d = cls._t.call("POST", "/v1/sessions", json=body, key=W.new_key())
        return cls(W.session_doc(d), on_event=on_event)

    @classmethod
    def open(
        cls,
        ref: str,
        *,
        paths: None = None,
        dsn: None = None,
        model: None = None,
        on_event: EventHook | None = None,
        tools: None = None,
    ) -> RemoteSession:
        _local_only(paths=paths, dsn=dsn, tools=tools, model=model)
        d = cls._t.call("GET", f"/v1/sessions/{W.seg(ref)}")
        return cls(W.session_doc(d), on_event=on_event)

    @classmethod
    def resume(cls, ref: str, **kw: Any) -> RemoteSession:
        s = cls.open(ref, **kw)
        s.wake()
        return s

    @classmethod
    def list(
        cls,
        *,
        paths: None = None,
        dsn: None = None,
        include_removed: bool = False,
        status: str | None = None,
        label: str | None = None,
        q: str | None = None,
    ) -> list[RemoteSession]:
        _local_only(paths=paths, dsn=dsn)
        params = [
            (k, v)
            for k, v in (
                ("status", status),
                ("label", label),
                ("q", q),
                ("include_removed", "true" if include_removed else None),
            )
            if v is not None
        ]
        out: list[RemoteSession] = []
        for page in _pages(cls._t, "/v1/sessions", params, "sessions"):
            out.extend(cls(W.session_doc(x)) for x in page)
        return out

    def close(self) -> None:
        """Nothing to close: a remote session holds no connection of its own."""

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the log says ---------------------------------------------------------------
    def refresh(self) -> dict[str, Any]:
        """The server's current JSON for this session (state, counts, VM)."""
        self._doc = W.session_doc(self._t.call("GET", self._path))
        return self._doc

    @property
    def record(self) -> Any:
        from torpor.context.model import SessionRecord

        d = self._doc
        return SessionRecord(
            id=self.id,
            name=self.name,
            created_at=float(d.get("created", d.get("created_at", 0.0)) or 0.0),
            parent_id=d.get("parent_id", d.get("parent")),
            parent_seq=d.get("parent_seq"),
            meta=dict(d.get("meta") or {k: d[k] for k in ("model", "image") if k in d}),
            removed_at=d.get("removed_at"),
        )

    def status(self) -> str:
        return str(self.refresh().get("status", ""))

    def stats(self) -> dict[str, Any]:
        d = self.refresh()
        return dict(d.get("stats") or {k: d[k] for k in ("turns", "checkpoints") if k in d})

    def log(self, after: int = 0) -> list[Any]:
        """The visible log after seq ``after`` (every page)."""
        out: list[Any] = []
        while True:
            d = self._t.call("GET", f"{self._path}/log", params={"after": str(after)})
            page = W.entries(d)
            out.extend(page)
            more = isinstance(d, dict) and (d.get("next_cursor") or d.get("more"))
            if not page or not more:
                return out
            after = page[-1].seq

    def entries(self, after: int = 0, limit: int | None = None) -> list[Any]:
        """The visible log after seq ``after``; at most ``limit`` entries (one page)."""
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise E.UsageError(f"after must be an entry number >= 0, not {after!r}")
        if limit is not None:
            W.check_limit(limit)
        if limit is None or limit > W.MAX_PAGE:
            return (self.log(after))[:limit]
        params = {"after": str(after), "limit": str(limit)}
        return W.entries(self._t.call("GET", f"{self._path}/log", params=params))[:limit]

    def follow(self, after: int = 0, stop: Callable[[], bool] | None = None) -> Iterator[Any]:
        """New entries as they are appended (SSE; reconnects resume after the last one)."""
        last = after
        backoff = W.Backoff(self._t.retries)
        while stop is None or not stop():
            try:
                for ev in self._t.events(
                    "GET",
                    f"{self._path}/log",
                    params={"after": str(last), "follow": "true"},
                    headers={"Last-Event-ID": str(last)},
                ):
                    if ev.event in ("entry", "message"):
                        e = W.entry(ev.json())
                        if e.seq > last:
                            last = e.seq
                            backoff = W.Backoff(self._t.retries)
                            yield e
                    if stop is not None and stop():
                        return
                return  # the server ended the stream (session removed)
            except E.TorporError as e:
                if getattr(e, "status", 0) is not None:
                    raise
                wait = backoff.next()
                if wait is None:
                    raise
                time.sleep(wait)

    @property
    def checkpoints(self) -> list[Any]:
        return W.checkpoints(self._t.call("GET", f"{self._path}/checkpoints"))

    def append(self, kind: Any, payload: dict[str, Any], *, key: str | None = None) -> Any:
        kind = str(getattr(kind, "value", kind))
        body = W.drop_none({"kind": kind, "payload": payload, "key": key})
        return W.entry(self._t.call("POST", f"{self._path}/entries", json=body, key=key))

    def checkpoint(self, reason: str = "user") -> Any:
        d = self._t.call("POST", f"{self._path}/checkpoint", json={"reason": reason})
        return W.checkpoint(d)

    @property
    def sandbox(self) -> RemoteSandbox:
        """The session's VM as a remote Sandbox, running (woken first)."""
        d = self.refresh()
        vm = d.get("vm_id") or (d.get("vm") if isinstance(d.get("vm"), str) else None)
        if isinstance(d.get("vm"), dict):
            vm = d["vm"].get("id")
        if not vm or d.get("status") != "running":
            self.wake()
            d = self.refresh()
            vm = d.get("vm_id") or d.get("vm")
            if isinstance(vm, dict):
                vm = vm.get("id")
        if not isinstance(vm, str) or not vm:
            raise E.ProtocolError("the server did not name the session's VM")
        return self._sandbox_cls.connect(vm)

    # -- doing ---------------------------------------------------------------------------
    def send(self, text: str, *, key: str | None = None, wait: bool = True) -> str:
        """One turn; its entries reach ``on_event`` as the server appends them (SSE).

        The server never queues a send behind a running turn (409); with ``wait`` (as
        locally) this waits for that turn to end by following the log, then sends.
        A lost connection is resumed the same way (follow the log to the end of the
        turn, then send again with the same idempotency key, which returns the
        turn's answer without running it twice); no entry is delivered twice."""
        if not isinstance(text, str) or not text.strip():
            raise E.UsageError("a message must not be empty")
        key = key or W.new_key()
        last = 0
        lost = False
        backoff = W.Backoff(self._t.retries)
        while True:
            try:
                answer, last = self._send_once(text, key, last)
                return answer
            except E.ConflictError as e:
                if not W.is_busy(e) or not (wait or lost):
                    raise
                # a turn runs: ours (sent before the connection was lost) or another's
            except E.TorporError as e:
                if getattr(e, "status", 0) is not None:
                    raise
                lost = True
                wait_s = backoff.next()
                if wait_s is None:
                    raise
                time.sleep(wait_s)
            with contextlib.suppress(E.TorporError):  # then try again, which says why
                last = self._follow_turn(last, key)

    def _deliver(self, d: object, last: int) -> int:
        e = W.entry(d)
        if e.seq > last:
            if self.on_event is not None:
                self.on_event(e)
            return int(e.seq)
        return last

    def _send_once(self, text: str, key: str, last: int) -> tuple[str, int]:
        for ev in self._t.events("POST", f"{self._path}/messages", json={"text": text}, key=key):
            if ev.event == "entry":
                last = self._deliver(ev.json(), last)
            elif ev.event in ("done", "json"):
                d = ev.json()
                if isinstance(d, dict):  # a JSON answer (no stream) lists its entries
                    for x in d.get("entries") or ():
                        last = self._deliver(x, last)
                return W.answer_of(d) or "", last
            elif ev.event == "error":
                d = ev.json()
                raise W.error_from(int(d.get("status", 500)) if isinstance(d, dict) else 500, d)
        raise W.unreachable(self._t.url, ConnectionError("the turn's stream ended early"))

    def _follow_turn(self, last: int, key: str | None = None) -> int:
        """Follow the log until no turn is open; the last seq seen.  Entries are
        delivered from our turn's ``user`` entry (the one with ``key``) on, or all
        after ``last`` once one of the turn's entries was delivered."""
        ours = last > 0
        for ev in self._t.events(
            "GET", f"{self._path}/log", params={"after": str(last), "until": "turn"}
        ):
            if ev.event == "entry":
                d = ev.json()
                ours = ours or (isinstance(d, dict) and key is not None and d.get("key") == key)
                if ours:
                    last = self._deliver(d, last)
        return last

    def hibernate(self) -> Any:
        """Checkpoint and end the VM; the hibernation's Checkpoint."""
        self._doc = W.session_doc(self._t.call("POST", f"{self._path}/hibernate"))
        return W.checkpoint(self._doc.get("last_checkpoint"))

    def wake(self) -> Any:
        """Make sure the VM runs; its SandboxInfo (a remote client has no VM object)."""
        self._doc = W.session_doc(self._t.call("POST", f"{self._path}/wake"))
        vm = self._doc.get("vm")
        return self._sandbox_cls.get_info(vm["id"]) if isinstance(vm, dict) else None

    def recover(self, *, replay: bool = True, wait: bool = True) -> str | None:
        """After a crash: the last checkpoint and a replay of the interrupted turn."""
        if not replay:
            raise E.NotSupportedError("recover(replay=False) is not available through a server")
        while True:
            try:
                d = self._t.call("POST", f"{self._path}/recover")
                break
            except E.ConflictError as e:
                if not wait or not W.is_busy(e):
                    raise
                self._follow_turn(self._last_seq())  # a turn runs: wait for its end
        if isinstance(d, dict) and isinstance(d.get("session"), dict):
            self._doc = d["session"]
        return W.answer_of(d)

    def _last_seq(self) -> int:
        return int(self.refresh().get("entries") or 0)

    def fork(self, at: int | Any | None = None, name: str | None = None) -> RemoteSession:
        seq = getattr(at, "seq", at)
        body = W.drop_none({"at": seq, "name": name})
        d = self._t.call("POST", f"{self._path}/fork", json=body, key=W.new_key())
        return type(self)(W.session_doc(d), on_event=self.on_event)

    def remove(self, reason: str = "removed by the user") -> list[str]:
        d = self._t.call("DELETE", self._path, params={"reason": reason})
        if isinstance(d, dict):
            return [str(x) for x in d.get("released_snapshots") or d.get("released") or ()]
        return [str(x) for x in d] if isinstance(d, list) else []


def _local_only(**kw: object) -> None:
    given = [k for k, v in kw.items() if v is not None]
    if given:
        raise E.UsageError(
            f"{', '.join(given)}= only apply to a local session (the server chooses them)"
        )


# -- the client --------------------------------------------------------------------------


class Client:
    """A ``torpor serve`` server: ``client.Sandbox``, ``client.Session``, snapshots, images.

    ``url`` and ``token`` default to ``TORPOR_HOST`` and ``TORPOR_TOKEN``.
    """

    Sandbox: type[RemoteSandbox]
    Session: type[RemoteSession]

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        retries: int = W.DEFAULT_RETRIES,
        transport: httpx.BaseTransport | None = None,
        max_body: int | None = None,
    ):
        self._t = Transport(
            url, token, timeout=timeout, retries=retries, transport=transport, max_body=max_body
        )
        self.url = self._t.url
        self.Sandbox = type("Sandbox", (RemoteSandbox,), {"_t": self._t})
        self.Session = type(
            "Session", (RemoteSession,), {"_t": self._t, "_sandbox_cls": self.Sandbox}
        )

    def __repr__(self) -> str:
        return f"torpor.Client({self.url!r})"

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the rest of the API (for the CLI's --host) ------------------------------------
    def info(self) -> dict[str, Any]:
        return dict(self._t.call("GET", "/v1/info"))

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """Any route, JSON in and out, with the client's auth, retries and errors."""
        return self._t.call(method, path, **kw)

    def snapshots(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for page in _pages(self._t, "/v1/snapshots", [], "snapshots"):
            out.extend(page)
        return out

    def inspect_snapshot(self, ref: str) -> dict[str, Any]:
        return dict(self._t.call("GET", f"/v1/snapshots/{W.seg(ref)}"))

    def remove_snapshot(self, ref: str, *, force: bool = False) -> Any:
        params = {"force": "true"} if force else None
        return self._t.call("DELETE", f"/v1/snapshots/{W.seg(ref)}", params=params)

    def images(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for page in _pages(self._t, "/v1/images", [], "images"):
            out.extend(page)
        return out

    def pull(self, reference: str, *, insecure: bool = False) -> dict[str, Any]:
        body = {"ref": reference, **({"insecure": True} if insecure else {})}
        return dict(self._t.call("POST", "/v1/images/pull", json=body, key=W.new_key()))

    def remove_image(self, ref: str, *, force: bool = False) -> Any:
        params = {"force": "true"} if force else None
        return self._t.call("DELETE", f"/v1/images/{W.seg(ref)}", params=params)
