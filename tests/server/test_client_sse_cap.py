"""A server that streams an over-long SSE line (or an event of endless ``data:``
lines) is a clear ProtocolError from the client, sync and async, not a line held
whole in memory.  The server is a tiny ``http.server`` in a thread; no VM."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from tests.httpserve import serving
from torpor.client import _wire as W
from torpor.client.aio import AsyncTransport
from torpor.client.sync import Transport
from torpor.errors import ProtocolError

MiB = 1 << 20
PIECE = b"x" * MiB


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            if self.path == "/ok":  # a big event within the cap still arrives whole
                self.wfile.write(b"event: big\ndata: " + PIECE * 9 + b"\n\n")
            elif self.path == "/line":  # one line past the cap, then the event's end
                self.wfile.write(b"data: ")
                for _ in range(W.MAX_SSE_LINE // MiB + 1):
                    self.wfile.write(PIECE)
                self.wfile.write(b"\n\n")
            else:  # short data lines past the cap, never a blank line
                line = b"data: " + b"y" * (MiB - 7) + b"\n"
                for _ in range(W.MAX_SSE_LINE // MiB + 2):
                    self.wfile.write(line)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what it should do


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serving(_Handler) as u:
        yield u


def test_sync_client_caps_an_sse_line_and_an_event(url: str) -> None:
    t = Transport(url, "", retries=1)
    try:
        (ev,) = list(t.events("GET", "/ok"))
        assert ev.event == "big" and len(ev.data) == 9 * MiB
        for path in ("/line", "/lines"):
            with pytest.raises(ProtocolError, match="MiB"):
                list(t.events("GET", path))
    finally:
        t.close()


def test_async_client_caps_an_sse_line_and_an_event(url: str) -> None:
    async def go() -> None:
        t = AsyncTransport(url, "", retries=1)
        try:
            got = [ev async for ev in t.events("GET", "/ok")]
            assert [len(e.data) for e in got] == [9 * MiB]
            for path in ("/line", "/lines"):
                with pytest.raises(ProtocolError, match="MiB"):
                    async for _ in t.events("GET", path):
                        pass
        finally:
            await t.close()

    asyncio.run(go())


def test_line_splitter_keeps_the_spec_line_ends() -> None:
    r = W.SSELines()
    out = r.feed(b"data: a\r") + r.feed(b"\ndata: b\rdata: c\n") + r.feed(b"\n:x") + r.close()
    assert out == ["data: a", "data: b", "data: c", "", ":x"]
