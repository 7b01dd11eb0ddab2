"""``torpor.aio.Session``: the log API awaitable, on real VMs (TCG here).

The async twin runs the sync Session on one worker thread per object; these tests
drive it from one event loop as an asyncio agent loop would: its own entries,
checkpoints, the sandbox, torpor's own turn, hibernate/wake, fork, recover, and
concurrent awaits on one session.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from torpor import aio
from torpor.context import Kind
from torpor.errors import UsageError
from torpor.paths import Paths
from torpor.session import Checkpoint, SessionError

pytestmark = pytest.mark.vm


async def _cat(s: aio.Session, path: str) -> str:
    sb = await s.sandbox
    return (await sb.exec(f"cat {path}")).stdout.strip()


def test_async_own_loop_checkpoint_sandbox_fork_recover(paths: Paths, tools_image: str) -> None:
    async def main() -> None:
        s = await aio.Session.create(tools_image, "scripted:demo", paths=paths, name="aio-own")
        kids: list[aio.Session] = []
        try:
            u = await s.append("user", {"content": "make /f"}, key="m1")
            assert u.kind is Kind.USER and u.turn == 1
            assert await s.append("user", {"content": "again"}, key="m1") == u  # by key
            assert await s.status() == "interrupted"
            sb = await s.sandbox
            assert isinstance(sb, aio.Sandbox)
            assert (await sb.exec("echo one > /f")).exit_code == 0
            await s.append("model_response", {"text": "made it"})
            ck = await s.checkpoint(reason="after-f")
            assert isinstance(ck, Checkpoint) and ck.reason == "after-f"
            assert (await s.entries())[-1].seq == ck.seq
            assert (await s.checkpoints)[-1] == ck
            assert await s.status() == "running"
            with pytest.raises(UsageError):  # the sync API's typed errors, unchanged
                await s.append("checkpoint", {"snapshot": "x"})

            # many awaits at once on one session: applied one at a time, none lost
            notes = await asyncio.gather(*(s.append("app.note", {"n": i}) for i in range(8)))
            assert len({e.seq for e in notes}) == 8
            seen = [e.payload["data"]["n"] for e in await s.entries(after=ck.seq)]
            assert sorted(seen) == list(range(8))

            # work past the checkpoint, then the machine is killed under the session
            await s.append("user", {"content": "make /f two"})
            await (await s.sandbox).exec("echo two > /f")
            kid = await s.fork(at=ck)
            kids.append(kid)
            assert isinstance(kid, aio.Session) and kid.id != s.id
            assert await _cat(kid, "/f") == "one"
            await (await s.sandbox).kill()
            with pytest.raises(SessionError, match="recover"):
                await s.checkpoint()
            assert await s.recover(replay=False) is None
            assert await _cat(s, "/f") == "one"
            await s.checkpoint()
            assert await s.status() == "running"
        finally:
            for x in (*kids, s):
                with contextlib.suppress(Exception):
                    await x.remove()
                await x.close()

    asyncio.run(main())


def test_async_send_hibernate_wake_open(paths: Paths, tools_image: str) -> None:
    async def main() -> None:
        s = await aio.Session.create(tools_image, "scripted:demo", paths=paths)
        try:
            answer = await s.send("set up a counter service and tell me its port")
            assert "counter" in answer.lower()
            kinds = [e.kind for e in await s.log()]
            assert Kind.TOOL_CALL in kinds and kinds[-1] is Kind.CHECKPOINT
            ck = await s.hibernate()
            assert ck.reason == "hibernate" and await s.status() == "hibernated"
            # another opening (as another worker would), awaited the same way
            async with await aio.Session.open(s.id, paths=paths) as again:
                assert (await again.checkpoints)[-1] == ck
                await again.wake()
                assert await again.status() == "running"
                assert await _cat(again, "/work/counter")
            resumed = await aio.Session.resume(s.id, paths=paths)
            assert await resumed.status() == "running"
            await resumed.close()
            listed = await aio.Session.list(paths=paths)
            assert s.id in {x.id for x in listed}
            for x in listed:
                await x.close()
        finally:
            with contextlib.suppress(Exception):
                await s.remove()
            await s.close()

    asyncio.run(main())


def test_importing_torpor_aio_does_not_load_the_session_layer() -> None:
    import json
    import subprocess
    import sys

    probe = "import json, sys, torpor.aio; print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60, check=True)
    mods = json.loads(r.stdout)
    assert [m for m in mods if m.startswith(("torpor.session", "torpor.model"))] == []
