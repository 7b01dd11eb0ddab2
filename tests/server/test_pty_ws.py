"""The PTY WebSocket (/v1/sandboxes/{ref}/pty) on a real VM: keystrokes, resize, exit,
refusals before the terminal starts, and a client that vanishes."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from tests.server.conftest import LiveServer, Tokens
from torpor.paths import Paths
from torpor.sandbox import Sandbox

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def client(app, tokens: Tokens) -> Iterator[TestClient]:
    with TestClient(app, headers={"Authorization": f"Bearer {tokens.default}"}) as c:
        yield c


@pytest.fixture(scope="module")
def sbx(client: TestClient, tools_image: str) -> Iterator[dict[str, Any]]:
    r = client.post(
        "/v1/sandboxes", json={"image": tools_image, "memory": "256M", "network": False}
    )
    assert r.status_code == 201, r.text
    yield r.json()
    client.delete(f"/v1/sandboxes/{r.json()['id']}")


class Screen:
    """What a WebSocket terminal showed: bytes, and the text frames beside them."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.buf = b""
        self.texts: list[dict[str, Any]] = []
        first = ws.receive()  # the server's first frame names the program's guest pid
        self.pid = json.loads(first["text"])["pid"]
        assert isinstance(self.pid, int) and self.pid > 1

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            msg = self.ws.receive()
            if msg["type"] == "websocket.close":
                raise AssertionError(f"closed before {marker!r}: {self.buf[-300:]!r}")
            if msg.get("bytes") is not None:
                self.buf += msg["bytes"]
            elif msg.get("text") is not None:
                self.texts.append(json.loads(msg["text"]))
        end = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def text(self) -> dict[str, Any]:
        """The next text frame (terminal bytes before it are kept)."""
        while not self.texts:
            msg = self.ws.receive()
            assert msg["type"] != "websocket.close", msg
            if msg.get("bytes") is not None:
                self.buf += msg["bytes"]
            elif msg.get("text") is not None:
                self.texts.append(json.loads(msg["text"]))
        return self.texts.pop(0)


def pty_url(sb: dict[str, Any], query: str = "") -> str:
    return f"/v1/sandboxes/{sb['id']}/pty" + (f"?{query}" if query else "")


def test_keystrokes_resize_and_exit_code(client: TestClient, sbx: dict[str, Any]) -> None:
    with client.websocket_connect(pty_url(sbx, "cmd=sh&cols=120&rows=40")) as ws:
        s = Screen(ws)
        ws.send_bytes(b"echo hel''lo; stty size\n")
        s.until(b"hello\r\n")
        s.until(b"40 120\r\n")
        ws.send_text(json.dumps({"resize": [100, 30]}))
        ws.send_bytes(b"stty size\n")
        s.until(b"30 100\r\n")
        for bad in ("not json", '{"resize": [0, 5]}', '{"resize": "big"}', "[1]"):
            ws.send_text(bad)
            assert "error" in s.text(), bad
        ws.send_bytes(b"exit 3\n")
        assert s.text() == {"exit": 3}
        assert ws.receive()["type"] == "websocket.close"


def test_a_program_that_ends_closes_the_socket(client: TestClient, sbx: dict[str, Any]) -> None:
    with client.websocket_connect(pty_url(sbx, "cmd=echo%20bye%3B%20exit%205")) as ws:
        s = Screen(ws)
        s.until(b"bye\r\n")
        assert s.text() == {"exit": 5}


def denial(client: TestClient, url: str, status: int) -> dict[str, Any]:
    with pytest.raises(WebSocketDenialResponse) as ei, client.websocket_connect(url):
        pass
    r = ei.value
    assert r.status_code == status, r.text
    body = json.loads(r.content)
    assert body["status"] == status and body["detail"]
    return body


def test_refusals_before_the_terminal_starts(
    app, client: TestClient, other_api: TestClient, sbx: dict[str, Any]
) -> None:
    assert denial(client, "/v1/sandboxes/no-such/pty", 404)["error"] == "NotFoundError"
    denial(other_api, pty_url(sbx), 404)  # another namespace's sandbox does not exist
    denial(client, pty_url(sbx, "cols=0"), 400)
    denial(client, pty_url(sbx, "cols=abc"), 400)
    denial(client, pty_url(sbx, "rows=99999"), 400)
    denial(client, pty_url(sbx, "cmd=a%00b"), 400)
    with TestClient(app) as anon:
        denial(anon, pty_url(sbx), 401)
        denial(TestClient(app, headers={"Authorization": "Bearer tpr_x_y"}), pty_url(sbx), 401)


def test_dashboard_cookie_authenticates_too(app, tokens: Tokens, sbx: dict[str, Any]) -> None:
    with TestClient(app, cookies={"torpor_token": tokens.default}) as c:
        url = pty_url(sbx, "cmd=echo%20ok")
        with c.websocket_connect(url, headers={"Origin": "http://testserver"}) as ws:
            s = Screen(ws)
            s.until(b"ok\r\n")
            assert s.text() == {"exit": 0}
        # a page of another site cannot open a shell with the cookie (CSWSH)
        for origin in ({"Origin": "http://evil.example"}, {}):
            with (
                pytest.raises(WebSocketDenialResponse) as ei,
                c.websocket_connect(url, headers=origin),
            ):
                pass
            assert ei.value.status_code == 403


def test_a_client_that_vanishes_ends_the_program(
    live_server: LiveServer, tokens: Tokens, sbx: dict[str, Any], paths: Paths
) -> None:
    from websockets.sync.client import connect

    url = live_server.url.replace("http://", "ws://") + pty_url(
        sbx, "cmd=echo%20up%3B%20exec%20sleep%204501"
    )
    # through uvicorn too, a refusal is an HTTP answer with a problem body
    from websockets.exceptions import InvalidStatus

    bad = live_server.url.replace("http://", "ws://") + "/v1/sandboxes/no-such/pty"
    with pytest.raises(InvalidStatus) as ei:
        connect(bad, additional_headers={"Authorization": f"Bearer {tokens.default}"})
    assert ei.value.response.status_code == 404
    assert json.loads(ei.value.response.body or b"{}")["error"] == "NotFoundError"
    sb = Sandbox.connect(sbx["id"], paths=paths)
    argv = ["sleep", "4501"]
    try:
        ws = connect(url, additional_headers={"Authorization": f"Bearer {tokens.default}"})
        pid = json.loads(ws.recv(timeout=60))["pid"]
        got = b""
        while b"up" not in got:
            got += ws.recv(timeout=60)  # type: ignore[operator]
        for _ in range(150):
            if [p for p in sb.ps() if list(p.cmdline) == argv]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the terminal's program did not start")
        assert [p.pid for p in sb.ps() if list(p.cmdline) == argv] == [pid]  # exec'd in place
        # gone: no close frame, no goodbye — the connection drops as when the client's
        # process dies.  (A bare close() did not drop it: the client's reader thread,
        # blocked in recv, holds the socket open until the server's next ping, up to
        # 20 s later — CI saw the program "run on" past the 15 s below.)
        ws.socket.shutdown(socket.SHUT_RDWR)
        ws.socket.close()
        for _ in range(150):
            if not [p for p in sb.ps() if list(p.cmdline) == argv]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the client vanished but its terminal program runs on")
    finally:
        sb.close()
