"""The OpenAI Agents SDK adapter, driven by the SDK's own ``Runner`` on real VMs.

The model is the real ``OpenAIChatCompletionsModel`` with the real ``openai``
client, talking HTTP to :class:`tests.model.fakeapi.FakeAPI`, which scripts the
replies (tool calls, then an answer).  The history lives in the torpor log, the
tools run in the session's microVM, and a worker killed with SIGKILL mid-run is
recovered: conversation, files and a background process are back.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, OpenAIChatCompletionsModel, set_tracing_disabled
from openai import AsyncOpenAI

from tests.model.fakeapi import FakeAPI, openai_completion
from torpor import failpoints
from torpor.context import Kind
from torpor.context.errors import ContextError
from torpor.errors import ConflictError, NotFoundError, UsageError
from torpor.integrations.openai_agents import (
    CHECKPOINT_REASON,
    ITEM_KIND,
    TorporSession,
    run_durable,
    run_durable_async,
    run_durable_streamed,
    sandbox_tools,
)

from .conftest import COUNTER, Sessions, start_worker, wait_for

pytestmark = pytest.mark.vm

set_tracing_disabled(True)

START_COUNTER = f"sh -c '{COUNTER}' &"
NOTE = "hello from the agent\n"


def _agent(api: FakeAPI | str, ts: TorporSession) -> Agent[Any]:
    url = api if isinstance(api, str) else f"{api.url}/v1"
    client = AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0)
    return Agent(
        name="worker",
        instructions="You work in a Linux microVM.",
        model=OpenAIChatCompletionsModel(model="gpt-test", openai_client=client),
        tools=sandbox_tools(ts),
    )


def _calls(*calls: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    return openai_completion(tool_calls=[(cid, name, json.dumps(a)) for cid, name, a in calls])


def _outputs(items: list[Any]) -> dict[str, str]:
    return {i["call_id"]: i["output"] for i in items if i.get("type") == "function_call_output"}


def _counter(ts: TorporSession) -> int:
    return int(ts.torpor.sandbox.files.read("/tmp/n").strip())


def _script_first_run(api: FakeAPI) -> None:
    api.reply(
        _calls(
            ("c1", "write_file", {"path": "/work/notes.txt", "content": NOTE}),
            ("c2", "exec", {"command": START_COUNTER}),
        )
    )
    api.reply(openai_completion(text="Note written, counter started."))


def test_run_uses_the_sandbox_and_keeps_history_in_the_log(sessions: Sessions, api: FakeAPI):
    ts = TorporSession(sessions.create())
    agent = _agent(api, ts)
    _script_first_run(api)
    r = run_durable(agent, "write a note and start a counter", session=ts)
    assert r.final_output == "Note written, counter started."

    items = ts.items()
    assert items[0] == {"role": "user", "content": "write a note and start a counter"}
    assert [i.get("type") for i in items[1:]] == [
        "function_call",
        "function_call",
        "function_call_output",
        "function_call_output",
        "message",
    ]
    out = _outputs(items)
    assert out["c1"] == f"wrote {len(NOTE)} bytes to /work/notes.txt"
    assert out["c2"].startswith("exit code: 0\n")
    # every item is an entry of the torpor log, and the run ended with a checkpoint
    entries = ts.torpor.entries()
    logged = [e for e in entries if e.kind is Kind.CUSTOM and e.payload["type"] == ITEM_KIND]
    assert [e.payload["data"]["item"] for e in logged] == items
    assert entries[-1].kind is Kind.CHECKPOINT
    assert entries[-1].payload["reason"] == CHECKPOINT_REASON
    assert ts.torpor.status() == "running"
    assert ts.torpor.sandbox.files.read("/work/notes.txt") == NOTE
    wait_for(lambda: _counter(ts) > 0, "the counter to count")

    # the second run sees the first's history; a new object on the log sees it all
    api.reply(_calls(("c3", "exec", {"command": "cat /tmp/n"})))
    api.reply(openai_completion(text="It counts."))
    before = len(api.requests)
    assert run_durable(agent, "is it counting?", session=ts).final_output == "It counts."
    sent = api.requests[before].body["messages"]
    assert {"role": "user", "content": "write a note and start a counter"} in sent
    assert any(
        m["role"] == "assistant" and m.get("content") == "Note written, counter started."
        for m in sent
    )
    assert _outputs(ts.items())["c3"].startswith("exit code: 0\n--- stdout ---\n")
    wait_for(lambda: _counter(ts) > 0, "the counter to count")
    with TorporSession.open(ts.session_id) as again:
        assert again.items() == ts.items()
        assert len(again.items()) == len(items) + 4  # user, call, output, answer
    assert [c.reason for c in ts.torpor.checkpoints][-2:] == [CHECKPOINT_REASON] * 2


# A worker process: one durable run of the agent, then it exits.
WORKER = """
import sys
from agents import Agent, OpenAIChatCompletionsModel, set_tracing_disabled
from openai import AsyncOpenAI
from torpor.integrations.openai_agents import TorporSession, run_durable, sandbox_tools

set_tracing_disabled(True)
ref, url, text = sys.argv[1:4]
ts = TorporSession.open(ref)
client = AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0, timeout=3600)
agent = Agent(
    name="worker",
    instructions="You work in a Linux microVM.",
    model=OpenAIChatCompletionsModel(model="gpt-test", openai_client=client),
    tools=sandbox_tools(ts),
)
print("ANSWER:", run_durable(agent, text, session=ts).final_output, flush=True)
"""

FIRST = "write a note and start a counter"
SECOND = "log your progress, then finish"


def test_worker_killed_mid_run_then_recovered(sessions: Sessions, api: FakeAPI, tmp_path: Path):
    s = sessions.create()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    url = f"{api.url}/v1"

    # run 1 completes in a worker process
    _script_first_run(api)
    w = start_worker(script, s.id, url, FIRST)
    out = w.communicate(timeout=600)[0].decode()
    assert w.returncode == 0, out
    assert "ANSWER: Note written, counter started." in out
    with TorporSession.open(s.id) as reader:
        done = reader.items()
    assert len(done) == 6

    # run 2: a tool call changes the machine, then the worker hangs on the model and is
    # killed (SIGKILL) before the run's checkpoint; the VM lives on past the checkpoint
    n = len(api.requests)
    api.reply(_calls(("c9", "exec", {"command": "echo half-done >> /work/progress"})))
    api.reply(openai_completion(text="never sent"), delay=3600)
    w = start_worker(script, s.id, url, SECOND)
    try:
        wait_for(lambda: len(api.requests) >= n + 2 or w.poll() is not None, "request 2")
        assert w.poll() is None, w.communicate()[0].decode()
        # the run is alive in its worker: a second worker is refused and touches nothing
        with TorporSession.open(s.id) as other:
            vm = other.torpor.state().vm_id
            with pytest.raises(ConflictError, match="in progress in another worker"):
                run_durable(_agent(api, other), SECOND, session=other)
            assert other.torpor.state().vm_id == vm
    finally:
        w.send_signal(signal.SIGKILL)
        w.wait()
    assert w.returncode == -signal.SIGKILL

    ts = TorporSession(sessions.open(s.id))  # the new worker: this process
    assert ts.torpor.status() == "interrupted"
    assert ts.torpor.sandbox.files.read("/work/progress") == "half-done\n"
    assert ts.items()[len(done)] == {"role": "user", "content": SECOND}  # provisional

    assert ts.torpor.recover(replay=False) is None
    # the conversation of the completed run is back, the interrupted run's items are not
    assert ts.items() == done
    # the machine is back at the checkpoint of run 1: the note is there, the half-done
    # effect is not, and the counter started in run 1 is still counting
    sb = ts.torpor.sandbox
    assert sb.files.read("/work/notes.txt") == NOTE
    assert not sb.files.exists("/work/progress")
    restored = _counter(ts)
    assert restored > 0
    wait_for(lambda: _counter(ts) > restored, "the counter to go on counting")

    # the user re-runs the interrupted input; it completes and is checkpointed
    api.reply(_calls(("c10", "exec", {"command": "echo done >> /work/progress"})))
    api.reply(openai_completion(text="Finished."))
    r = run_durable(_agent(api, ts), SECOND, session=ts)
    assert r.final_output == "Finished."
    items = ts.items()
    assert items[: len(done)] == done
    assert items[len(done)] == {"role": "user", "content": SECOND}
    assert [i for i in items if i.get("role") == "user"].count(items[len(done)]) == 1
    assert _outputs(items)["c10"].startswith("exit code: 0")
    assert "c9" not in _outputs(items)
    assert ts.torpor.sandbox.files.read("/work/progress") == "done\n"
    assert ts.torpor.status() == "running"
    entries = ts.torpor.entries()
    users = [e for e in entries if e.kind is Kind.USER]
    assert [e.payload["content"] for e in users] == [FIRST, SECOND]  # the turn was reused
    restores = [e for e in entries if e.kind is Kind.VM and e.payload.get("reason") == "recover"]
    assert len(restores) == 1  # run_durable saw the recovery done: no second restore


def test_next_run_recovers_a_crashed_run_by_itself(sessions: Sessions, api: FakeAPI):
    """Without an explicit recover(), run_durable restores the last checkpoint first."""
    ts = TorporSession(sessions.create())
    ts.torpor.sandbox.files.write("/work/base", "base\n")
    ts.torpor.checkpoint(reason="base")
    base = ts.items()
    # a run that "crashed": its turn opened, an item logged, the machine changed
    ts.begin_run("first try")
    ts.add([{"role": "user", "content": "first try"}])
    ts.torpor.sandbox.files.write("/work/half", "x")
    assert ts.torpor.status() == "interrupted"
    api.reply(openai_completion(text="ok"))
    r = run_durable(_agent(api, ts), "second try", session=ts)
    assert r.final_output == "ok"
    items = ts.items()
    assert items[: len(base) + 1] == [*base, {"role": "user", "content": "second try"}]
    assert len(items) == len(base) + 2  # the input and the answer: "first try" is gone
    assert not ts.torpor.sandbox.files.exists("/work/half")
    assert ts.torpor.sandbox.files.read("/work/base") == "base\n"
    assert ts.torpor.status() == "running"


def test_tool_failures_go_back_to_the_model(sessions: Sessions, api: FakeAPI):
    ts = TorporSession(sessions.create())
    api.reply(
        _calls(
            ("f1", "exec", {"command": "echo to-out; echo to-err >&2; cat /nope; exit 3"}),
            ("f2", "read_file", {"path": "/nope/missing.txt"}),
            ("f3", "write_file", {"path": "relative.txt", "content": "x"}),
            ("f4", "exec", {"command": "sleep 30", "timeout_seconds": 1}),
            ("f5", "read_file", {"path": "/work"}),
        )
    )
    api.reply(openai_completion(text="Some things failed."))
    r = run_durable(_agent(api, ts), "try things", session=ts)
    assert r.final_output == "Some things failed."
    out = _outputs(ts.items())
    assert out["f1"].startswith("exit code: 3\n--- stdout ---\nto-out\n")
    assert "to-err" in out["f1"] and "No such file" in out["f1"]
    assert out["f2"].startswith("error: no such file or folder in the sandbox: /nope/missing.txt")
    assert out["f3"].startswith("error: sandbox paths are absolute")
    assert out["f4"].startswith("timed out after 1 s: the command's process group was killed")
    assert out["f5"].startswith("error: ")  # a folder: the guest refuses, the model is told
    # the tool outputs reached the model as the tool messages of the next request
    sent = [m for m in api.requests[-1].body["messages"] if m["role"] == "tool"]
    assert {m["tool_call_id"] for m in sent} == {"f1", "f2", "f3", "f4", "f5"}
    assert ts.torpor.status() == "running"


def test_output_a_tool_hands_over_is_bounded(sessions: Sessions, api: FakeAPI):
    ts = TorporSession(sessions.create())
    ts.torpor.sandbox.files.write("/work/big", "y" * 5000)
    ts.torpor.sandbox.exec("dd if=/dev/zero of=/work/huge bs=1M count=0 seek=64")
    tools = {t.name: t for t in sandbox_tools(ts, max_output=100, max_read=1000)}
    agent = _agent(api, ts)
    agent.tools = list(tools.values())
    api.reply(
        _calls(
            ("b1", "exec", {"command": "yes | head -c 100000"}),
            ("b2", "read_file", {"path": "/work/big"}),
            ("b3", "read_file", {"path": "/dev/zero"}),  # would never end
            ("b5", "read_file", {"path": "/work/huge"}),  # 64 MiB: abandoned after 1000 B
        )
    )
    api.reply(_calls(("b4", "exec", {"command": "echo still here"})))
    api.reply(openai_completion(text="big"))
    run_durable(agent, "flood", session=ts)
    out = _outputs(ts.items())
    assert out["b3"].startswith("error: ") and "not a regular file" in out["b3"]
    assert out["b5"] == "\ufffd" * 1000 + "\n[... file longer than 1000 bytes: rest not shown]"
    assert out["b4"].startswith("exit code: 0\n--- stdout ---\nstill here\n")
    assert "[... 99900 more bytes not shown]" in out["b1"]
    assert len(out["b1"]) < 400
    assert out["b2"] == "y" * 1000 + "\n[... file longer than 1000 bytes: rest not shown]"


def test_bad_input_is_a_typed_error(sessions: Sessions, paths) -> None:
    with pytest.raises(NotFoundError):
        TorporSession.open("no-such-session", paths=paths)
    with pytest.raises(UsageError):
        TorporSession(object())  # type: ignore[arg-type]
    ts = TorporSession(sessions.create())
    for bad in ({"timeout": 0}, {"timeout": 10**6}, {"max_output": 0}, {"max_read": "1"}):
        with pytest.raises(UsageError):
            sandbox_tools(ts, **bad)  # type: ignore[arg-type]
    before = ts.torpor.entries()[-1].seq
    with pytest.raises(UsageError):
        ts.add([{"x": object()}])  # not JSON
    with pytest.raises(UsageError):
        ts.add({"role": "user", "content": "a dict, not a list"})  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        ts.items(limit="3")  # type: ignore[arg-type]
    assert ts.torpor.entries()[-1].seq == before  # nothing was written


def test_session_protocol_semantics(sessions: Sessions) -> None:
    """add / get (limit) / pop / clear as the SDK's SQLiteSession does them, folded from
    an append-only log; async methods for the SDK, sync ones for everyone else."""
    from agents.memory import Session as SDKSession

    ts = TorporSession(sessions.create())
    assert isinstance(ts, SDKSession)  # the SDK's runtime-checkable protocol
    a, b, c = ({"role": "user", "content": x} for x in "abc")

    async def protocol() -> None:
        assert await ts.get_items() == []
        assert await ts.pop_item() is None
        await ts.add_items([a, b, c])
        assert await ts.get_items() == [a, b, c]
        assert await ts.get_items(limit=2) == [b, c]
        assert await ts.get_items(limit=0) == []
        assert await ts.pop_item() == c
        assert await ts.get_items() == [a, b]
        await ts.add_items([a])  # the same item again is a new item, not a retry
        assert await ts.get_items() == [a, b, a]
        await ts.clear_session()
        assert await ts.get_items() == []
        await ts.add_items([c])
        assert await ts.get_items() == [c]

    asyncio.run(protocol())
    assert TorporSession.open(ts.session_id, session_settings={"limit": 1}).items() == [c]
    # the log only grew: every item, pop and clear is an entry
    kinds = [e.payload["type"] for e in ts.torpor.entries() if e.kind is Kind.CUSTOM]
    assert kinds.count(ITEM_KIND) == 5
    assert kinds.count("openai_agents.pop") == 1 and kinds.count("openai_agents.clear") == 1


def test_a_retried_add_does_not_duplicate(sessions: Sessions) -> None:
    """The log fails on the 2nd item's write: the retry appends only what is missing."""
    ts = TorporSession(sessions.create())
    a, b = {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}
    failpoints.enable("log.write", "eio", after=2)
    try:
        with pytest.raises(ContextError):
            ts.add([a, b])
    finally:
        failpoints.disable("log.write")
    assert ts.items() == [a]  # the first item is durable
    ts.add([a, b])  # what the SDK does after an error: the same add again
    assert ts.items() == [a, b]


def test_async_runner(sessions: Sessions, api: FakeAPI) -> None:
    ts = TorporSession(sessions.create())
    api.reply(_calls(("x1", "write_file", {"path": "/work/a", "content": "async"})))
    api.reply(openai_completion(text="done"))
    r = asyncio.run(run_durable_async(_agent(api, ts), "write it", session=ts))
    assert r.final_output == "done"
    assert ts.torpor.sandbox.files.read("/work/a") == "async"
    assert ts.torpor.entries()[-1].kind is Kind.CHECKPOINT


def test_a_failed_run_is_logged_and_settled(sessions: Sessions, api: FakeAPI) -> None:
    """The model API fails (500, no retry): the error is logged, the run checkpointed
    (not left interrupted), and the exception reaches the caller."""
    import openai

    ts = TorporSession(sessions.create())
    agent = _agent(api, ts)  # nothing queued: the server answers 500
    with pytest.raises(openai.InternalServerError):
        run_durable(agent, "fail please", session=ts)
    entries = ts.torpor.entries()
    errors = [e for e in entries if e.kind is Kind.ERROR]
    assert errors and errors[-1].payload["type"] == "InternalServerError"
    assert entries[-1].kind is Kind.CHECKPOINT and ts.torpor.status() == "running"

    async def inside_a_loop() -> None:
        with pytest.raises(UsageError, match="run_durable_async"):
            run_durable(agent, "sync inside async", session=ts)

    asyncio.run(inside_a_loop())
    assert ts.torpor.entries()[-1].seq == entries[-1].seq  # refused before anything was logged


def test_fork_carries_history_and_machine(sessions: Sessions, api: FakeAPI) -> None:
    ts = TorporSession(sessions.create())
    _script_first_run(api)
    run_durable(_agent(api, ts), FIRST, session=ts)
    child = TorporSession(sessions.track(ts.torpor.fork()))
    assert child.items() == ts.items()
    assert child.torpor.sandbox.files.read("/work/notes.txt") == NOTE
    wait_for(lambda: _counter(child) > 0, "the fork's counter")
    api.reply(_calls(("k1", "write_file", {"path": "/work/notes.txt", "content": "child"})))
    api.reply(openai_completion(text="changed"))
    run_durable(_agent(api, child), "change the note", session=child)
    assert len(child.items()) == len(ts.items()) + 4
    assert child.torpor.sandbox.files.read("/work/notes.txt") == "child"
    assert ts.torpor.sandbox.files.read("/work/notes.txt") == NOTE  # the parent is untouched


def test_vm_lost_mid_run_stops_the_run_and_the_next_run_recovers(
    sessions: Sessions, api: FakeAPI
) -> None:
    """The VM is killed behind the run's back: the tool does not quietly restore the
    last checkpoint under the SDK (that would supersede the run's first items while the
    SDK goes on with them); the run stops with a torpor error, and the next run
    recovers, with a history and a machine that agree."""
    from torpor.session import SessionError

    ts = TorporSession(sessions.create())
    agent = _agent(api, ts)
    _script_first_run(api)
    run_durable(agent, FIRST, session=ts)
    done = ts.items()
    api.reply(_calls(("v1", "exec", {"command": "echo lost"})))
    ts.torpor.sandbox.kill()
    agent = _agent(api, ts)  # new tools, as in a new worker: nothing cached
    with pytest.raises(SessionError, match="VM is gone") as failed:
        run_durable(agent, "the VM is gone", session=ts)
    # the tool's error; the checkpoint after the run then fails the same way
    assert "mid-run" in str(failed.value.__context__)
    assert ts.torpor.status() == "interrupted"
    api.reply(_calls(("v2", "exec", {"command": "cat /work/notes.txt"})))
    api.reply(openai_completion(text="back"))
    assert run_durable(agent, "the VM is gone", session=ts).final_output == "back"
    items = ts.items()
    assert items[: len(done)] == done
    assert items[len(done)] == {"role": "user", "content": "the VM is gone"}
    assert "v1" not in _outputs(items) and NOTE in _outputs(items)["v2"]


def test_arguments_that_do_not_parse_go_back_to_the_model(sessions: Sessions, api: FakeAPI) -> None:
    ts = TorporSession(sessions.create())
    api.reply(openai_completion(tool_calls=[("p1", "exec", '{"cmd": "true"}')]))
    api.reply(openai_completion(tool_calls=[("p2", "write_file", "not json")]))
    api.reply(openai_completion(text="sorry"))
    assert run_durable(_agent(api, ts), "go", session=ts).final_output == "sorry"
    out = _outputs(ts.items())
    assert out["p1"].startswith("error: Invalid JSON input for tool exec")
    assert out["p2"].startswith("error: ")


def test_history_on_postgres(sessions: Sessions, api: FakeAPI, pg_dsn: str, paths) -> None:
    """The same adapter with the log in PostgreSQL (jsonb): items come back equal, a NUL
    (which jsonb cannot hold) as U+FFFD."""
    ts = TorporSession(sessions.create(dsn=pg_dsn))
    try:
        api.reply(_calls(("g1", "write_file", {"path": "/work/ü.txt", "content": "héllo ✓"})))
        api.reply(openai_completion(text="wrote ✓"))
        run_durable(_agent(api, ts), "schreib eine Datei \x00 bitte", session=ts)
        with TorporSession.open(ts.session_id, paths=paths, dsn=pg_dsn) as again:
            items = again.items()
        assert items == ts.items()
        assert items[0] == {"role": "user", "content": "schreib eine Datei \ufffd bitte"}
        assert _outputs(items)["g1"] == f"wrote {len('héllo ✓'.encode())} bytes to /work/ü.txt"
        assert ts.torpor.sandbox.files.read("/work/ü.txt") == "héllo ✓"
    finally:
        # now, while its database exists: pg_dsn's teardown drops it before `sessions`
        # cleans up, and the session's VM was left running
        ts.torpor.remove()


def test_torpor_imports_without_the_sdk() -> None:
    """``import torpor`` never needs the SDK; the adapter without it is a SetupError."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['agents'] = None\n"
        "import torpor, torpor.integrations, torpor.session, torpor.sandbox\n"
        "from torpor.errors import SetupError\n"
        "try:\n"
        "    import torpor.integrations.openai_agents\n"
        "except SetupError as e:\n"
        "    print('SetupError:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SetupError:" in r.stdout and "torpor[integrations]" in r.stdout


def _sse(completion: dict[str, Any]) -> str:
    """A chat completion as the server-sent chunks of a streamed one (``stream: true``)."""
    choice = completion["choices"][0]
    msg = choice["message"]
    base = {k: completion[k] for k in ("id", "created", "model")}
    base["object"] = "chat.completion.chunk"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    if msg.get("content"):
        chunks.append(chunk({"content": msg["content"]}))
    for i, tc in enumerate(msg.get("tool_calls") or []):
        chunks.append(chunk({"tool_calls": [{"index": i, **tc}]}))
    chunks.append(chunk({}, choice["finish_reason"]))
    chunks.append({**base, "choices": [], "usage": completion["usage"]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


SSE = {"content-type": "text/event-stream"}


def test_streamed_run(sessions: Sessions, api: FakeAPI) -> None:
    """run_durable_streamed: the caller reads one event and leaves; the run still
    finishes and is checkpointed.  An error in the caller's block cancels the run,
    is logged and settled."""
    ts = TorporSession(sessions.create())
    agent = _agent(api, ts)
    api.reply(_sse(_calls(("s1", "write_file", {"path": "/work/s", "content": "st"}))), headers=SSE)
    api.reply(_sse(openai_completion(text="streamed")), headers=SSE)

    async def partly_read() -> Any:
        async with run_durable_streamed(agent, "stream it", session=ts) as result:
            async for _ in result.stream_events():
                break
        return result

    result = asyncio.run(partly_read())
    assert all(r.body["stream"] is True for r in api.requests)  # really streamed
    assert result.is_complete and result.final_output == "streamed"
    assert ts.torpor.sandbox.files.read("/work/s") == "st"
    assert [i.get("type", "user") for i in ts.items()] == [
        "user",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert ts.torpor.entries()[-1].kind is Kind.CHECKPOINT

    api.reply(_sse(_calls(("s2", "exec", {"command": "echo x"}))), headers=SSE)
    api.reply(_sse(openai_completion(text="never read")), headers=SSE)

    async def fail_in_block() -> None:
        async with run_durable_streamed(agent, "then fail", session=ts) as result:
            async for _ in result.stream_events():
                raise ValueError("the caller failed")

    with pytest.raises(ValueError, match="the caller failed"):
        asyncio.run(fail_in_block())
    entries = ts.torpor.entries()
    assert [e.payload["type"] for e in entries if e.kind is Kind.ERROR] == ["ValueError"]
    assert entries[-1].kind is Kind.CHECKPOINT and ts.torpor.status() == "running"


def test_incremental_fold_equals_the_full_fold() -> None:
    """The view TorporSession keeps (O(new entries) per call) answers exactly what folding
    the whole log answers, on random logs of items, pops, clears and supersede markers."""
    import random

    from torpor.context import Entry
    from torpor.integrations.openai_agents import (
        CLEAR_KIND,
        POP_KIND,
        _epoch,
        _ItemView,
        fold_items,
    )

    def entry(seq: int, kind: Kind, payload: dict[str, Any]) -> Entry:
        return Entry("s", seq, kind, payload, None, 0.0, 0)

    rng = random.Random(1234)
    for _ in range(200):
        log: list[Entry] = []
        view = _ItemView()
        for seq in range(1, rng.randint(1, 60)):
            r = rng.random()
            if r < 0.5:
                e = entry(seq, Kind.CUSTOM, {"type": ITEM_KIND, "data": {"item": {"n": seq}}})
            elif r < 0.6 and log:
                target = rng.choice(log).seq
                e = entry(seq, Kind.CUSTOM, {"type": POP_KIND, "data": {"seq": target}})
            elif r < 0.65:
                e = entry(seq, Kind.CUSTOM, {"type": CLEAR_KIND, "data": {"upto": seq - 1}})
            elif r < 0.75 and log:
                gone = rng.sample([x.seq for x in log], k=min(len(log), rng.randint(1, 3)))
                e = entry(seq, Kind.SUPERSEDE, {"seqs": gone})
            else:
                e = entry(seq, Kind.CHECKPOINT, {"snapshot": "x"})
            log.append(e)
            if rng.random() < 0.5:  # read at random moments, as a session does
                items, epoch = view.update(log)
                assert items == fold_items(log) and epoch == _epoch(log)
        items, epoch = view.update(log)
        assert items == fold_items(log) and epoch == _epoch(log)
