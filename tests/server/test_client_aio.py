"""torpor.aio.Client (httpx.AsyncClient) against a real server: the awaitable local API
and the awaitable remote one give the same results; 429 is retried after Retry-After."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

import torpor.aio
from tests.server.conftest import LiveServer, Tokens
from tests.server.test_client import JOURNAL
from torpor.errors import ExecTimeoutError, NotFoundError, TorporError, UsageError
from torpor.paths import Paths
from torpor.sandbox import CommandResult
from torpor.server.app import create_app
from torpor.server.deps import Config


async def scenario(Sandbox: Any, Session: Any, model: Any) -> dict[str, Any]:
    """The same awaits on local and remote classes; the answers, minus ids and times."""
    out: dict[str, Any] = {}
    sb = await Sandbox.create("tools:latest", memory="256M", network=False)
    async with sb:
        got: list[str] = []
        r = await sb.exec("echo a; echo b >&2; exit 2", on_stdout=got.append)
        out["exec"] = (r, "".join(got))
        try:
            await sb.exec("echo started; sleep 30", timeout=2)
        except ExecTimeoutError as e:
            out["timeout"] = (type(e), e.stdout)
        await sb.files.write("/root/x/a.txt", "A")
        out["files"] = (
            await sb.files.read("/root/x/a.txt"),
            [e.name for e in await sb.files.list("/root/x")],
            await sb.files.exists("/root/x/nope"),
        )
        try:
            await sb.files.read("/root/x/nope")
        except NotFoundError as e:
            out["missing"] = type(e)
        async with await sb.pty("sh", 80, 24) as p:
            await p.write("echo $((6*7))\n")
            out["pty"] = b"42\r\n" in await p.read_until("42\r\n", timeout=60)
            await p.resize(100, 30)
            await p.write("stty size; exit 4\n")
            out["pty_size"] = b"30 100" in await p.read_until("30 100", timeout=60)
            out["pty_exit"] = await p.wait(60)
        snap = await sb.snapshot()
        await sb.exec("echo changed > /root/x/a.txt")
        async with await Sandbox.restore(snap) as sb2:
            out["restored"] = await sb2.files.read("/root/x/a.txt")
    seen: list[Any] = []
    s = await Session.create("tools:latest", model, memory_mib=256, on_event=seen.append)
    try:
        seen.clear()
        out["a1"] = await s.send("one")
        out["events"] = [e.kind.value for e in seen]
        cks = await s.checkpoints
        out["cks"] = [(c.turn, c.reason) for c in cks]
        ck = await s.hibernate()
        out["hibernated"] = (ck.reason, await s.status())
        out["a2"] = await s.send("two")  # wakes it
        out["page"] = [e.kind.value for e in await s.entries(after=0, limit=3)]
        f = await s.fork(at=cks[-1].seq)
        out["fork"] = await f.send("three")
        await f.remove()
        vm = await s.sandbox
        out["sandbox"] = (await vm.exec("cat /root/j")).stdout
    finally:
        await s.remove()
        await s.close()
    return out


@pytest.mark.vm
def test_aio_scenario_is_the_same_locally_and_remotely(
    live_server: LiveServer, tokens: Tokens, tools_image: str, tmp_path: Path
) -> None:
    script = tmp_path / "journal.json"
    script.write_text(json.dumps(JOURNAL))

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        local = await scenario(torpor.aio.Sandbox, torpor.aio.Session, f"scripted:{script}")
        async with torpor.aio.Client(live_server.url, tokens.default) as c:
            remote = await scenario(c.Sandbox, c.Session, JOURNAL)
        return local, remote

    local, remote = asyncio.run(both())
    assert remote == local
    assert local["exec"] == (CommandResult(2, "a\n", "b\n"), "a\n")
    assert local["timeout"] == (ExecTimeoutError, "started\n")
    assert local["restored"] == "A"
    assert (local["pty"], local["pty_size"], local["pty_exit"]) == (True, True, 4)
    assert (local["a2"], local["fork"]) == ("journal: one\ntwo", "journal: one\nthree")
    assert local["sandbox"] == "one\ntwo\n"


def test_429_is_retried_after_retry_after(tmp_path: Path) -> None:
    """A server allowing 2 requests and then 1/s: a burst of 4 calls all succeed (the
    client waits the Retry-After it is given); with no retries the third is a 429."""
    app = create_app(Config(Paths(tmp_path / "h"), rate=1.0, burst=2))

    async def run(retries: int) -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with torpor.aio.Client(
            "http://torpor.test", transport=transport, retries=retries
        ) as c:
            return [(await c.info())["namespace"] for _ in range(4)]

    assert asyncio.run(run(retries=5)) == ["default"] * 4
    with pytest.raises(TorporError) as ei:
        asyncio.run(run(retries=1))
    assert ei.value.status == 429  # type: ignore[attr-defined]


def test_problem_details_map_to_typed_errors_in_process(tmp_path: Path) -> None:
    app = create_app(Config(Paths(tmp_path / "h")))

    async def run() -> list[type]:
        out: list[type] = []
        async with torpor.aio.Client(
            "http://torpor.test", transport=httpx.ASGITransport(app=app)
        ) as c:
            for call in (
                c.Sandbox.get_info("nope"),  # NotFoundError, 404
                c.Session.open("nope"),  # NotFoundError from the session routes
                c.request("GET", "/v1/sandboxes", params={"cursor": "!!"}),  # UsageError 400
                c.request("POST", "/v1/sessions", json={"bogus": 1}),  # schema: 422
            ):
                try:
                    await call
                except TorporError as e:
                    out.append(type(e))
        return out

    assert asyncio.run(run()) == [NotFoundError, NotFoundError, UsageError, UsageError]
