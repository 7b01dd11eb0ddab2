"""A remote terminal knows its program's guest pid, as a local one does: the server's
first PTY frame is ``{"pid": N}`` (sync and async clients)."""

from __future__ import annotations

import asyncio

import pytest

import torpor
import torpor.aio
from tests.server.conftest import LiveServer, Tokens

pytestmark = pytest.mark.vm


def test_remote_pty_pid_is_the_guest_pid(
    live_server: LiveServer, tokens: Tokens, tools_image: str
) -> None:
    local = torpor.Sandbox.create(tools_image, memory="256M", network=False)
    try:
        with torpor.Client(live_server.url, tokens.default) as client:
            sb = client.Sandbox.connect(local.id)
            with sb.pty("sh", 80, 24) as p:
                assert p.pid > 1
                p.write("echo pid=$$\n")
                p.read_until(f"pid={p.pid}\r\n", timeout=60)
                assert p.pid in [x.pid for x in local.ps()]

        async def aio() -> None:
            async with torpor.aio.Client(live_server.url, tokens.default) as c:
                sb = await c.Sandbox.connect(local.id)
                async with await sb.pty("sh", 80, 24) as p:
                    assert p.pid > 1
                    await p.write("echo pid=$$\n")
                    await p.read_until(f"pid={p.pid}\r\n", timeout=60)

        asyncio.run(aio())
    finally:
        local.kill()
