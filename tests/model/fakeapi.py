"""A local HTTP server speaking the two model wire formats, for the provider tests.

Only the transport is fake: the real ``openai`` and ``anthropic`` libraries talk
HTTP to it exactly as they would to the hosted APIs (retries, backoff,
``Retry-After``, timeouts, error bodies).  A test queues replies and reads back
the requests the server received (with the time each arrived)::

    api.reply(openai_completion(text="hi"))
    api.reply(openai_error("slow down"), status=429, headers={"retry-after": "1"})
    api.reply({...}, delay=2.0, repeat=True)      # stays queued: every request sleeps

    POST /v1/chat/completions   OpenAI chat completions (requires a bearer token)
    POST /v1/messages           Anthropic messages (requires anthropic-version)

With nothing queued the server answers 500 with ``x-should-retry: false`` so a
missing reply fails the test at once instead of being retried.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PATHS = ("/v1/chat/completions", "/v1/messages")


@dataclass
class Reply:
    body: Any = None  # dict/list -> JSON, str -> sent as is
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    repeat: bool = False


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # parsed JSON, or the raw text if it is not JSON
    at: float = 0.0  # time.monotonic() when the server had read it: gaps between retries


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: FakeAPI


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean

    def _send(self, status: int, body: Any, headers: dict[str, str]) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        with contextlib.suppress(OSError):  # the client may have given up (timeout tests)
            self.send_response(status)
            headers = {"content-type": "application/json", **headers}
            self.send_header("content-length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

    def do_POST(self) -> None:
        api = self.server.api
        raw = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
        try:
            body: Any = json.loads(raw)
        except json.JSONDecodeError:
            body = raw
        headers = {k.lower(): v for k, v in self.headers.items()}
        api._record(Request("POST", self.path, headers, body, time.monotonic()))
        if self.path not in PATHS:
            self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
            return
        if self.path == "/v1/messages" and "anthropic-version" not in headers:
            self._send(400, anthropic_error("missing anthropic-version header"), {})
            return
        if self.path == "/v1/chat/completions" and not headers.get("authorization", "").startswith(
            "Bearer "
        ):
            self._send(401, openai_error("no bearer token", "invalid_request_error"), {})
            return
        reply = api._next()
        if reply is None:
            self._send(500, {"error": {"message": "no reply queued"}}, {"x-should-retry": "false"})
            return
        if reply.delay:
            api.stopping.wait(reply.delay)
        self._send(reply.status, reply.body, reply.headers)


class FakeAPI:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Reply] = deque()
        self.requests: list[Request] = []
        self.stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.api = self
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def reply(
        self,
        body: Any = None,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        repeat: bool = False,
    ) -> None:
        with self._lock:
            self._queue.append(Reply(body, status, dict(headers or {}), delay, repeat))

    def _next(self) -> Reply | None:
        with self._lock:
            if not self._queue:
                return None
            return self._queue[0] if self._queue[0].repeat else self._queue.popleft()

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    @property
    def bodies(self) -> list[Any]:
        return [r.body for r in self.requests]

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


# ------------------------------------------------------------ reply builders


def openai_completion(
    text: str | None = None,
    tool_calls: list[tuple[str, str, str]] = (),  # type: ignore[assignment]
    *,
    finish_reason: str | None = None,
    usage: tuple[int, int] | None = (12, 5),
    model: str = "gpt-test-0001",
    id: str = "chatcmpl-test1",
) -> dict[str, Any]:
    """A chat.completion object; ``tool_calls`` are ``(id, name, arguments_json_string)``."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
            for cid, name, args in tool_calls
        ]
    doc: dict[str, Any] = {
        "id": id,
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop"),
            }
        ],
    }
    if usage is not None:
        doc["usage"] = {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": sum(usage),
        }
    return doc


def openai_error(
    message: str, type: str = "server_error", code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def anthropic_message(
    content: list[dict[str, Any]],
    *,
    stop_reason: str | None = None,
    usage: dict[str, int] | None = None,
    model: str = "claude-test-1",
    id: str = "msg_test1",
) -> dict[str, Any]:
    has_tools = any(b.get("type") == "tool_use" for b in content)
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason or ("tool_use" if has_tools else "end_turn"),
        "stop_sequence": None,
        "usage": usage if usage is not None else {"input_tokens": 21, "output_tokens": 7},
    }


def anthropic_error(message: str, type: str = "api_error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": type, "message": message}}
