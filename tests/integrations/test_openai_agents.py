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

pytest.importorskip("agents")

from agents import Agent, OpenAIChatCompletionsModel, set_tracing_disabled  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

from tests.model.fakeapi import FakeAPI, openai_completion  # noqa: E402
from torpor import failpoints  # noqa: E402
from torpor.context import Kind, effective  # noqa: E402
from torpor.context.errors import ContextError  # noqa: E402
from torpor.errors import NotFoundError, UsageError  # noqa: E402
from torpor.integrations.openai_agents import (  # noqa: E402
    CHECKPOINT_REASON,
    ITEM_KIND,
    TorporSession,
    run_durable,
    run_durable_async,
    sandbox_tools,
)

from .conftest import Sessions, start_worker, wait_for  # noqa: E402

pytestmark = pytest.mark.vm

set_tracing_disabled(True)

COUNTER = "sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.2; done' &"
NOTE = "hello from the agent\n"


def _agent(api: FakeAPI, ts: TorporSession) -> Agent[Any]:
    client = AsyncOpenAI(base_url=f"{api.url}/v1", api_key="sk-test", max_retries=0)
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
    return int(ts.torpor.sandbox.files.read("/tmp/n").strip() or 0)


def _script_first_run(api: FakeAPI) -> None:
    api.reply(
        _calls(
            ("c1", "write_file", {"path": "/work/notes.txt", "content": NOTE}),
            ("c2", "exec", {"command": COUNTER}),
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
    assert int(_outputs(ts.items())["c3"].split("--- stdout ---\n")[1].split()[0]) > 0
    with TorporSession.open(ts.session_id) as again:
        assert again.items() == ts.items()
        assert len(again.items()) == len(items) + 4  # user, call, output, answer
    assert [c.reason for c in ts.torpor.checkpoints][-2:] == [CHECKPOINT_REASON] * 2
