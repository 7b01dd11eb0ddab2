"""A server whose JSON answer (or error body) is oversized or endless is a clear
ProtocolError from the remote client, sync and async, not a body buffered without
bound.  The cap is ``max_body=`` (default :data:`torpor.client._wire.MAX_BODY`) or
``TORPOR_CLIENT_MAX_BODY``.  The server is a tiny ``http.server`` in a thread; no VM."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from tests.httpserve import serving
from torpor.client import _wire as W
from torpor.client.aio import AsyncClient
from torpor.client.sync import Client
from torpor.errors import ProtocolError, UsageError

MiB = 1 << 20
PIECE = b"x" * MiB
#: what an "endless" body sends at most, so that a client without a cap ends too
ENDLESS = 3 * W.MAX_BODY


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: a body without Content-Length ends when the server closes the connection
    def log_message(self, *a: object) -> None:
        pass

    def _json(self, status: int, size: int, length: bool) -> None:
        """A valid JSON object of about ``size`` bytes."""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if length:
            self.send_header("Content-Length", str(size + 11))
        self.end_headers()
        self.wfile.write(b'{"pad": "')
        for _ in range(size // MiB):
            self.wfile.write(PIECE)
        self.wfile.write(b"x" * (size % MiB) + b'"}')

    def _endless(self, status: int, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.end_headers()
        self.wfile.write(b'{"pad": "')
        for _ in range(ENDLESS // MiB):
            self.wfile.write(PIECE)

    def do_GET(self) -> None:
        try:
            over = W.MAX_BODY + MiB
            if self.path == "/ok":  # a big answer within the cap arrives whole
                self._json(200, 9 * MiB, length=False)
            elif self.path == "/two":
                self._json(200, 2 * MiB, length=False)
            elif self.path == "/big":  # valid JSON, past the cap, no Content-Length
                self._json(200, over, length=False)
            elif self.path == "/big-length":  # ... announced by its Content-Length
                self._json(200, over, length=True)
            elif self.path == "/endless":
                self._endless(200)
            elif self.path == "/error-endless":  # a problem body that never ends
                self._endless(500, "application/problem+json")
            elif self.path == "/events-endless":  # JSON where an event stream was asked
                self._endless(200)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what it should do


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serving(_Handler) as u:
        yield u


OVERSIZED = ("/big", "/big-length", "/endless", "/error-endless")


def test_sync_client_caps_a_json_answer(url: str) -> None:
    with Client(url, "", retries=1) as c:
        assert len(c.request("GET", "/ok")["pad"]) == 9 * MiB
        for path in OVERSIZED:
            with pytest.raises(ProtocolError, match="larger than 64 MiB"):
                c.request("GET", path)
        with pytest.raises(ProtocolError, match="larger than 64 MiB"):
            list(c._t.events("GET", "/events-endless"))


def test_async_client_caps_a_json_answer(url: str) -> None:
    async def go() -> None:
        async with AsyncClient(url, "", retries=1) as c:
            assert len((await c.request("GET", "/ok"))["pad"]) == 9 * MiB
            for path in OVERSIZED:
                with pytest.raises(ProtocolError, match="larger than 64 MiB"):
                    await c.request("GET", path)
            with pytest.raises(ProtocolError, match="larger than 64 MiB"):
                async for _ in c._t.events("GET", "/events-endless"):
                    pass

    asyncio.run(go())


def test_the_cap_is_configurable(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    c = Client(url, "", retries=1, max_body=MiB)
    with c, pytest.raises(ProtocolError, match=r"larger than 1 MiB.*max_body"):
        c.request("GET", "/two")
    monkeypatch.setenv(W.ENV_MAX_BODY, str(MiB))
    c = Client(url, "", retries=1)
    with c, pytest.raises(ProtocolError, match="larger than 1 MiB"):
        c.request("GET", "/two")
    with Client(url, "", retries=1, max_body=4 * MiB) as c:  # the argument wins
        assert len(c.request("GET", "/two")["pad"]) == 2 * MiB
    monkeypatch.setenv(W.ENV_MAX_BODY, "lots")
    with pytest.raises(UsageError, match=W.ENV_MAX_BODY):
        Client(url, "")
    monkeypatch.setenv(W.ENV_MAX_BODY, str(MiB))

    async def go() -> None:
        async with AsyncClient(url, "", retries=1) as c:
            with pytest.raises(ProtocolError, match="larger than 1 MiB"):
                await c.request("GET", "/two")

    asyncio.run(go())
