"""What the sync and the async client share: no I/O here, only rules and shapes.

- **Errors**: a problem-details body (docs/api.md) becomes the typed torpor error its
  ``error`` field names (a :class:`~torpor.errors.TorporError` subclass from
  ``torpor.errors``, ``SessionError`` or ``ModelError``; nothing else is looked up, so
  a server cannot make the client build an arbitrary class); without one, the HTTP
  status picks a category, and anything else is a plain ``TorporError``.  Every error
  raised by a client carries ``status`` (the HTTP status, or None when the server was
  never reached).
- **Retries**: a request that never reached the server (connect error) is retried
  whatever its method; one that may have reached it only when it is idempotent
  (GET/PUT/DELETE, or a POST carrying an ``Idempotency-Key``).  429 is retried always
  (the server did nothing), after ``Retry-After``.  Backoff doubles from 0.25 s, capped.
- **Decoding**: JSON objects become the library's own dataclasses (SandboxInfo,
  CommandResult, Entry, Checkpoint, ...) by field name; unknown fields are ignored and
  missing ones keep their defaults, so a newer server does not break an older client.
- **SSE**: :class:`SSELines` splits the body into lines (CRLF, LF or CR) and
  :class:`SSEParser` turns lines into ``(event, data, id)`` per the Server-Sent Events
  spec (``data`` lines joined, comments ignored).  A line, and an event's joined
  data, hold at most :data:`MAX_SSE_LINE` bytes: past it, ProtocolError, so a hostile
  or broken server cannot make the client hold an endless line.
- **Answer size**: a non-streamed answer (JSON, a problem body, a log) is read in
  pieces through :class:`BodyCap` and never held past ``max_body`` bytes (default
  :data:`MAX_BODY`, or ``TORPOR_CLIENT_MAX_BODY``): past it, ProtocolError, so an
  oversized or endless body is an error, not unbounded memory.  A file read
  (``files.read``) is what its caller asked for whole and is not capped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from torpor import errors as E

if TYPE_CHECKING:
    import httpx

ENV_HOST = "TORPOR_HOST"
ENV_TOKEN = "TORPOR_TOKEN"
#: Attempts of one request (the first included) before the last failure is raised.
DEFAULT_RETRIES = 5
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 8.0
#: Longest Retry-After the client honours; a larger one is waited this long.
RETRY_AFTER_MAX = 60.0
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
T = TypeVar("T")


def resolve(url: str | None, token: str | None) -> tuple[str, str | None]:
    """The server URL and token: the arguments, else ``TORPOR_HOST``/``TORPOR_TOKEN``."""
    url = url or os.environ.get(ENV_HOST) or ""
    if not url:
        raise E.UsageError(f"no server given: pass a URL or set {ENV_HOST}")
    if "://" not in url:
        url = "http://" + url  # like docker -H host:port
    if not url.startswith(("http://", "https://")):
        raise E.UsageError(f"server URL must be http:// or https://, not {url!r}")
    token = token if token is not None else os.environ.get(ENV_TOKEN) or None
    return url.rstrip("/"), token


def seg(ref: object) -> str:
    """One path segment: a name or id, never a path of its own (no ``/`` or ``..``)."""
    s = str(ref)
    if not s or s in (".", ".."):
        raise E.UsageError(f"invalid reference {s!r}")
    return quote(s, safe="")


def new_key() -> str:
    return f"tpc-{uuid.uuid4().hex}"


# -- errors ------------------------------------------------------------------------------

_BY_STATUS: dict[int, type[E.TorporError]] = {
    400: E.UsageError,
    404: E.NotFoundError,
    409: E.ConflictError,
    413: E.UsageError,
    422: E.UsageError,
    501: E.NotSupportedError,
}


def _error_class(name: object) -> type[E.TorporError] | None:
    if not isinstance(name, str) or not name.isidentifier():
        return None
    cls = getattr(E, name, None)
    if cls is None and name == "SessionError":
        from torpor.session.core import SessionError

        cls = SessionError
    if cls is None and name == "ModelError":
        from torpor.model.errors import ModelError

        cls = ModelError
    if isinstance(cls, type) and issubclass(cls, E.TorporError):
        return cls
    return None


def error_of(resp: httpx.Response) -> E.TorporError:
    """The typed error of a >= 400 answer whose body has been read (JSON or text)."""
    try:
        body: object = resp.json()
    except ValueError:
        body = resp.text
    return error_from(resp.status_code, body, resp.reason_phrase)


def json_of(resp: httpx.Response, method: str, path: str) -> Any:
    """The decoded JSON of a 2xx answer whose body has been read (None when empty)."""
    if not resp.content:
        return None
    try:
        return resp.json()
    except ValueError as e:
        raise E.ProtocolError(f"{method} {path}: the server's answer is not JSON") from e


def error_from(status: int, body: object, reason: str = "") -> E.TorporError:
    """The typed error for a non-2xx answer (``body``: the decoded JSON, or text)."""
    d = body if isinstance(body, dict) else {}
    detail = d.get("detail")
    if not isinstance(detail, str) or not detail:
        text = body if isinstance(body, str) else ""
        detail = f"the server answered {status} {reason}".rstrip() + (
            f": {text.strip()[:300]}" if text.strip() else ""
        )
    if d.get("errors") and status == 422:  # schema violations: name the fields
        where = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg', '')}"
            for e in d["errors"][:5]
            if isinstance(e, dict)
        )
        detail = f"{detail} ({where})" if where else detail
    step = d.get("step") if isinstance(d.get("step"), str) else None
    cls = _error_class(d.get("error")) or _BY_STATUS.get(status, E.TorporError)
    # built without the class's own __init__: some take other arguments (ChunkError)
    err = cls.__new__(cls)
    E.TorporError.__init__(err, detail, step=step)
    if isinstance(err, E.ExecTimeoutError):
        err.stdout = str(d.get("stdout") or "")
        err.stderr = str(d.get("stderr") or "")
    if isinstance(err, E.ChunkError):
        err.artifact = str(d.get("artifact") or "")
        err.missing, err.corrupt = (), ()
    err.status = status  # type: ignore[attr-defined]
    return err


def is_busy(e: E.TorporError) -> bool:
    """A 409 because another actor holds the session (its turn runs), not a bad state."""
    return isinstance(e, E.ConflictError) and "is busy" in e.message


def unreachable(url: str, exc: Exception) -> E.TorporError:
    err = E.TorporError(f"cannot reach the torpor server at {url}: {exc}", step="connect")
    err.status = None  # type: ignore[attr-defined]
    return err


@dataclass
class Backoff:
    """The wait before the next attempt, or None when the attempts are used up."""

    retries: int = DEFAULT_RETRIES
    attempt: int = 0

    def next(self, retry_after: str | None = None) -> float | None:
        self.attempt += 1
        if self.attempt >= self.retries:
            return None
        if retry_after is not None:
            try:
                secs = float(retry_after)
                if math.isfinite(secs) and secs >= 0:
                    return min(secs, RETRY_AFTER_MAX)
            except ValueError:
                pass  # an HTTP date: fall back to the backoff
        return min(BACKOFF_FIRST * 2 ** (self.attempt - 1), BACKOFF_MAX)


def may_retry_after_send(method: str, headers: Mapping[str, str]) -> bool:
    """Whether a request that may have reached the server can be sent again."""
    return method.upper() in IDEMPOTENT or "Idempotency-Key" in headers


# -- SSE ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    event: str
    data: str
    id: str | None

    def json(self) -> Any:
        try:
            return json.loads(self.data) if self.data else None
        except ValueError as e:
            raise E.ProtocolError(f"the server sent a malformed {self.event!r} event") from e


#: The longest SSE line, and event data, the client holds.  The server's largest event
#: is a log entry: up to 8 MiB of JSON (MAX_APPEND_BYTES), which its ``json.dumps``
#: (ASCII-only) may grow up to 6x (a control character becomes ``\u0001``).
MAX_SSE_LINE = 64 << 20
#: The largest non-streamed answer the client holds (a page of 1000 VMs or the info
#: answer are kilobytes; the largest is a log page of big entries).
MAX_BODY = 64 << 20
ENV_MAX_BODY = "TORPOR_CLIENT_MAX_BODY"
_EOL = re.compile(rb"\r\n|\r|\n")


def _too_long(what: str, limit: int) -> E.ProtocolError:
    return E.ProtocolError(
        f"the server sent an event {what} longer than {limit >> 20} MiB "
        "(a broken or hostile server); the stream was dropped"
    )


def max_body(value: int | None) -> int:
    """The cap on a non-streamed answer: ``value``, else ``TORPOR_CLIENT_MAX_BODY``,
    else :data:`MAX_BODY`."""
    source = "max_body"
    if value is None:
        raw = os.environ.get(ENV_MAX_BODY, "").strip()
        if not raw:
            return MAX_BODY
        source = ENV_MAX_BODY
        try:
            value = int(raw)
        except ValueError:
            value = 0
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise E.UsageError(f"{source} must be a positive number of bytes, not {value!r}")
    return value


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"


class BodyCap:
    """The bytes of one non-streamed answer, fed as they arrive; never more than
    ``limit`` (a Content-Length past it is refused before anything is read)."""

    def __init__(self, limit: int, what: str, content_length: str | None = None) -> None:
        self.limit, self.what = limit, what
        self._buf = bytearray()
        cl = (content_length or "").strip()
        if cl.isdecimal() and int(cl) > limit:
            raise self._too_large()

    def _too_large(self) -> E.ProtocolError:
        return E.ProtocolError(
            f"the server's answer to {self.what} is larger than {_size(self.limit)} (a "
            f"broken or hostile server; if it is right, raise max_body= or {ENV_MAX_BODY})"
        )

    def feed(self, chunk: bytes) -> None:
        if len(self._buf) + len(chunk) > self.limit:
            raise self._too_large()
        self._buf += chunk

    def content(self) -> bytes:
        return bytes(self._buf)


class SSELines:
    """Feed the body's bytes as they arrive; get back complete lines (decoded UTF-8,
    without their line end).  A line is never held past ``max_line`` bytes."""

    def __init__(self, max_line: int = MAX_SSE_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._cr = False  # the last chunk ended in CR: an LF first in the next is its end

    def feed(self, chunk: bytes) -> list[str]:
        if self._cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._cr = chunk[-1:] == b"\r"
        out: list[str] = []
        start = 0
        for m in _EOL.finditer(chunk):
            self._add(chunk[start : m.start()])
            out.append(self._buf.decode("utf-8", "replace"))
            self._buf.clear()
            start = m.end()
        self._add(chunk[start:])
        return out

    def _add(self, part: bytes) -> None:
        if len(self._buf) + len(part) > self.max_line:
            raise _too_long("line", self.max_line)
        self._buf += part

    def close(self) -> list[str]:
        """The last line if the body did not end with a line end."""
        rest = [self._buf.decode("utf-8", "replace")] if self._buf else []
        self._buf.clear()
        return rest


class SSEParser:
    """Feed lines (without their newline); yields complete events.  An event's data
    (its ``data`` lines joined) is never held past ``max_data`` characters."""

    def __init__(self, max_data: int = MAX_SSE_LINE) -> None:
        self.max_data = max_data
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        self._id: str | None = None
        self.last_id: str | None = None

    def feed(self, line: str) -> Event | None:
        if line == "":
            if not self._data and not self._event:
                return None
            ev = Event(self._event or "message", "\n".join(self._data), self._id)
            if self._id is not None:
                self.last_id = self._id
            self._event, self._data, self._id, self._size = "", [], None, 0
            return ev
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._size += len(value) + 1
            if self._size > self.max_data:
                raise _too_long("data", self.max_data)
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        return None


# -- request bodies ----------------------------------------------------------------------


#: VM statuses besides running and hibernated (what ``list(all=True)`` adds).
OTHER_STATUSES = ("created", "starting", "stopping", "exited", "dead")
#: Largest page the API serves (docs/api.md, lists).
MAX_PAGE = 1000


class SSEStream:
    """Body bytes in, complete events out: :class:`SSELines` then :class:`SSEParser`
    (so neither a line nor an event's data is ever held past its cap)."""

    def __init__(self) -> None:
        self._lines, self._parser = SSELines(), SSEParser()

    def _events(self, lines: list[str]) -> list[Event]:
        return [ev for line in lines if (ev := self._parser.feed(line)) is not None]

    def feed(self, chunk: bytes) -> list[Event]:
        return self._events(self._lines.feed(chunk))

    def close(self) -> list[Event]:
        """What the end of the body completes (an event not followed by a blank line)."""
        return self._events([*self._lines.close(), ""])


def check_limit(limit: object) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise E.UsageError(f"limit must be an integer >= 1, not {limit!r}")


def drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def stdin_field(stdin: bytes | str | bool | None) -> dict[str, Any]:
    if stdin is None or stdin is False:
        return {}
    if stdin is True:
        raise E.NotSupportedError(
            "stdin=True (an open stdin fed with send_stdin) is not available through a "
            "server: pass the input as bytes or str"
        )
    if isinstance(stdin, str):
        return {"stdin": stdin}
    try:
        return {"stdin": bytes(stdin).decode("utf-8")}
    except UnicodeDecodeError:
        raise E.NotSupportedError(
            "stdin through a server is text: these bytes are not UTF-8 (write them to a "
            "file with files.write and redirect from it)"
        ) from None


def no_paths(paths: object) -> None:
    if paths is not None:
        raise E.UsageError("paths= names a local torpor home; a remote client has none")


def labels_query(labels: Mapping[str, str] | None) -> list[tuple[str, str]]:
    return [("label", f"{k}={v}") for k, v in (labels or {}).items()]


# -- decoding ----------------------------------------------------------------------------


def build(cls: type[T], d: object, **override: Any) -> T:
    """``cls`` (a dataclass) from the matching keys of ``d``."""
    if not isinstance(d, dict):
        raise E.ProtocolError(f"the server sent {type(d).__name__} where {cls.__name__} belongs")
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in override:
            kw[f.name] = override[f.name]
        elif f.name in d:
            v = d[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) and "tuple" in str(f.type) else v
    try:
        return cls(**kw)
    except TypeError as e:
        raise E.ProtocolError(f"the server's {cls.__name__} lacks a field: {e}") from e


def items(body: object, *keys: str) -> list[Any]:
    """The list in a list answer: the body itself or its ``items`` (or a named key)."""
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        for k in ("items", *keys):
            if isinstance(body.get(k), list):
                return list(body[k])
    raise E.ProtocolError("the server sent no list where one belongs")


def sandbox_info(d: object) -> Any:
    from torpor.sandbox.core import SandboxInfo

    if isinstance(d, dict) and isinstance(d.get("sandbox"), dict):
        d = d["sandbox"]
    return build(SandboxInfo, d)


def command_result(d: object) -> Any:
    from torpor.sandbox.process import CommandResult

    return build(CommandResult, d)


def entry_info(d: object) -> Any:
    from torpor.sandbox.files import EntryInfo

    return build(EntryInfo, d)


def process_info(d: object) -> Any:
    from torpor.sandbox.core import ProcessInfo

    if not isinstance(d, dict):
        raise E.ProtocolError("the server sent a malformed process")
    return ProcessInfo(int(d.get("pid", 0)), tuple(str(a) for a in d.get("cmdline") or ()))


def snapshot_of(d: object) -> Any:
    from torpor.sandbox.core import Snapshot

    if isinstance(d, dict) and isinstance(d.get("snapshot"), dict):
        d = d["snapshot"]
    if isinstance(d, dict) and "id" not in d and isinstance(d.get("snapshot"), str):
        d = {"id": d["snapshot"], "tag": d.get("tag")}
    return build(Snapshot, d)


def entry(d: object) -> Any:
    from torpor.context.model import Entry, Kind

    if not isinstance(d, dict):
        raise E.ProtocolError("the server sent a malformed log entry")
    try:
        return Entry(
            session_id=str(d.get("session_id") or d.get("session") or ""),
            seq=int(d["seq"]),
            kind=Kind(d["kind"]),
            payload=dict(d.get("payload") or {}),
            key=d.get("key"),
            created_at=float(d.get("created", d.get("created_at", 0.0)) or 0.0),
            turn=int(d.get("turn", 0)),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise E.ProtocolError(f"the server sent a malformed log entry: {e}") from e


def checkpoint(d: object) -> Any:
    from torpor.session.core import Checkpoint

    if isinstance(d, dict) and isinstance(d.get("checkpoint"), dict):
        d = d["checkpoint"]
    if isinstance(d, dict) and "created_at" not in d:  # the API names it ``created``
        d = {**d, "created_at": d.get("created", 0.0)}
    return build(Checkpoint, d)


def entries(body: object) -> list[Any]:
    return [entry(x) for x in items(body, "entries")]


def checkpoints(body: object) -> list[Any]:
    return [checkpoint(x) for x in items(body, "checkpoints")]


def session_doc(body: object) -> dict[str, Any]:
    """A session's JSON (``{"session": {...}}`` or the object itself), with an id."""
    if isinstance(body, dict) and isinstance(body.get("session"), dict):
        body = body["session"]
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        raise E.ProtocolError("the server sent a session without an id")
    return body


def answer_of(body: object) -> str | None:
    if isinstance(body, dict):
        a = body.get("answer")
        return a if isinstance(a, str) or a is None else str(a)
    if isinstance(body, str):
        return body
    return None


def cmd_body(cmd: str | Iterable[str]) -> str | list[str]:
    """A string stays one (the server runs it with ``/bin/sh -c``, as the library)."""
    argv = cmd if isinstance(cmd, str) else [str(a) for a in cmd]
    if not argv:
        raise E.UsageError("empty command")
    return argv


def exec_exit(data: object) -> Any:
    """The ``exit`` event of an exec stream as a CommandResult (output filled in later)."""
    from torpor.sandbox.process import CommandResult

    d = data if isinstance(data, dict) else {"exit_code": data}
    return build(CommandResult, {"stdout": "", "stderr": "", **d})


def session_create_body(
    image: str,
    model: object,
    name: str | None,
    memory_mib: int,
    idle: float | None,
    system: str | None,
    network: bool,
    labels: Mapping[str, str] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": image,
        "name": name,
        "memory_mib": memory_mib,
        "idle": idle,
        "system": system,
        "network": network,
        "labels": dict(labels) if labels else None,
    }
    if isinstance(model, dict):
        body["script"] = model
    elif isinstance(model, str):
        body["model"] = model
    else:
        raise E.UsageError(
            "a remote session's model is a spec string ('scripted:demo', 'openai:...') or "
            "a scripted-model document (a dict): a Model object cannot travel"
        )
    return drop_none(body)
