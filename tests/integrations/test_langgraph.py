"""The LangGraph adapter (torpor.integrations.langgraph) with the real langgraph
package, real VMs and the real openai client against a local scripted server.

- a graph run whose tool writes a file and starts a background counter in the
  sandbox; its state read back through a new Session object and saver; forks at
  LangGraph checkpoints get that checkpoint's machine;
- the worker killed -9 mid-run (waiting on the model, or inside a tool): recover,
  resume with ``graph.invoke(None, config)``; the file, the counter and the whole
  conversation are there and no tool's effect was applied twice;
- the saver's contract called directly (put / get_tuple / list / put_writes /
  delete_thread, sync and async), and what it refuses.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langgraph.checkpoint.base import (
    ERROR,
    WRITES_IDX_MAP,
    create_checkpoint,
    empty_checkpoint,
    writes_sort_key,
)
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from tests.integrations.conftest import COUNTER, start_worker, wait_for
from tests.integrations.langgraph_app import build
from tests.model.fakeapi import openai_completion
from torpor.context import Kind, effective
from torpor.errors import UsageError
from torpor.integrations.langgraph import CHECKPOINT_KIND, TorporSaver, sandbox_tools
from torpor.sandbox import Sandbox
from torpor.session import Session, SessionError

pytestmark = pytest.mark.vm

APP = Path(__file__).resolve().parent / "langgraph_app.py"
# the first tool call: a file, a run counted in the guest, a background counter
SETUP = (
    "echo hello > /tmp/f; echo one >> /tmp/runs; "
    f"sh -c '{COUNTER}' </dev/null >/dev/null 2>&1 & echo started"
)
# the second: counted, then held until /tmp/go exists (the crash test kills it there)
HELD = "echo two >> /tmp/runs; while [ ! -f /tmp/go ]; do sleep 0.1; done; echo finished"


def _call(cid: str, command: str) -> dict[str, Any]:
    return openai_completion(tool_calls=[(cid, "exec", json.dumps({"command": command}))])


def _cat(sb: Any, path: str) -> str:
    return sb.exec(f"cat {path}").stdout.strip()


def _counting(sb: Any) -> bool:
    first = int(_cat(sb, "/tmp/n"))
    sb.exec("sleep 1")
    return int(_cat(sb, "/tmp/n")) > first


def test_graph_state_survives_a_new_session_object_and_forks_get_the_machine(sessions, api) -> None:
    s = sessions.create()
    saver = TorporSaver(s)
    graph = build(s, saver, api.url)
    api.reply(_call("call_1", SETUP))
    api.reply(openai_completion(text="set up"))
    config = {"configurable": {"thread_id": "t1"}}
    out = graph.invoke(
        {"messages": [{"role": "user", "content": "set it up"}]}, config, durability="sync"
    )
    assert out["messages"][-1]["content"] == "set up"
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert "started" in out["messages"][2]["content"]
    state = graph.get_state(config)
    assert s.status() == "running"  # the run's last put settled the turn

    # every LangGraph checkpoint is a pair: its entry, then a langgraph torpor checkpoint
    tuples = list(saver.list(config))
    assert len(tuples) == 5  # input, then one per super-step (model, tools, model)
    assert [h.config for h in graph.get_state_history(config)] == [t.config for t in tuples]
    pairs = [saver.torpor_checkpoint(t.config) for t in tuples]
    assert len({p.snapshot for p in pairs}) == 5 and all(p.reason == "langgraph" for p in pairs)

    with Session.open(s.id, paths=s.paths) as again:  # a new Session object, a new saver
        graph2 = build(again, TorporSaver(again), api.url)
        state2 = graph2.get_state(config)
        assert state2.values == state.values and state2.next == ()
        assert state2.config == state.config and state2.metadata == state.metadata
        sb = again.sandbox
        assert _cat(sb, "/tmp/f") == "hello" and _cat(sb, "/tmp/runs") == "one"
        assert _counting(sb)

    # fork at the checkpoint before the tool ran: that machine has no /tmp/f
    before_tool = next(t for t in tuples if t.metadata["step"] == 1)  # tools next
    assert (
        state.config["configurable"]["checkpoint_id"]
        == tuples[0].config["configurable"]["checkpoint_id"]
    )
    child = saver.fork(before_tool.config)
    sessions.made.append(child)
    assert child.sandbox.exec("test -e /tmp/f").exit_code == 1
    child_saver = TorporSaver(child)
    latest = child_saver.get_tuple({"configurable": {"thread_id": "t1"}})
    assert latest is not None and latest.config == before_tool.config
    # and it goes on from there: LangGraph runs the pending tool call in the child's VM
    api.reply(openai_completion(text="set up in the fork"))
    out = build(child, child_saver, api.url).invoke(None, config, durability="sync")
    assert out["messages"][-1]["content"] == "set up in the fork"
    assert _cat(child.sandbox, "/tmp/runs") == "one" and _counting(child.sandbox)
    assert child.status() == "running"  # its tool opened its own turn; its last put settled it
    assert _cat(s.sandbox, "/tmp/runs") == "one"  # the parent's machine is its own


@pytest.mark.parametrize("where", ["model", "tool"])
def test_worker_killed_mid_run_resumes_with_machine_and_no_tool_twice(
    sessions, api, where: str
) -> None:
    s = sessions.create()
    vm_id = s.state().vm_id
    api.reply(_call("call_1", SETUP))
    if where == "model":
        api.reply(openai_completion(text="never sent"), delay=900)  # held until the kill
    else:
        api.reply(_call("call_2", HELD))
    worker = start_worker(APP, s.id, api.url, "t1", "set it up")
    try:
        if where == "model":
            wait_for(lambda: len(api.requests) == 2, "the second model request")
        else:
            probe = Sandbox.connect(vm_id, paths=s.paths)  # not the session: no lock taken
            wait_for(
                lambda: probe.exec("cat /tmp/runs 2>/dev/null").stdout.split() == ["one", "two"],
                "the held tool to start",
            )
            probe.close()
        assert worker.poll() is None, worker.stdout.read() if worker.stdout else ""
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    # a new worker: the test process
    again = sessions.open(s.id)
    config = {"configurable": {"thread_id": "t1"}}
    if where == "tool":
        assert again.status() == "interrupted"  # the tool opened the turn
        # resuming on the half-done machine would run the held tool twice: refused
        n = len(again.entries())
        with pytest.raises(SessionError, match="recover"):
            build(again, TorporSaver(again), api.url).invoke(None, config, durability="sync")
        assert len(again.entries()) == n and len(api.requests) == 2
    assert again.recover(replay=False) is None
    sb = again.sandbox
    assert _cat(sb, "/tmp/f") == "hello"
    assert _cat(sb, "/tmp/runs") == "one"  # the killed tool's half-done effect is gone
    if where == "tool":
        sb.exec("touch /tmp/go")  # the held tool may finish this time
    api.reply(openai_completion(text="all done"))
    saver = TorporSaver(again)
    out = build(again, saver, api.url).invoke(None, config, durability="sync")

    msgs = out["messages"]
    assert msgs[0] == {"role": "user", "content": "set it up"} and msgs[-1]["content"] == "all done"
    calls = [c["id"] for m in msgs if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    results = [m["tool_call_id"] for m in msgs if m["role"] == "tool"]
    want = ["call_1"] if where == "model" else ["call_1", "call_2"]
    assert calls == results == want  # the conversation is complete, each call answered once
    sb = again.sandbox
    assert _cat(sb, "/tmp/runs") == ("one" if where == "model" else "one\ntwo")
    assert _cat(sb, "/tmp/f") == "hello" and _counting(sb)
    assert again.status() == "running"
    # what LangGraph resumed from was a pair: nothing after its snapshot stayed effective
    latest = saver.get_tuple(config)
    assert latest is not None and latest.checkpoint["channel_values"]["messages"] == msgs
    if where == "model":
        assert len(api.requests) == 3  # the lost request asked again, nothing else
    else:
        assert len(api.requests) == 3  # no model call repeated: its answer was paired


def _cfg(thread: str = "t", **kw: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread, "checkpoint_ns": "", **kw}}


def test_saver_contract_put_get_list_writes_delete(sessions) -> None:
    s = sessions.create()
    with pytest.raises(UsageError):
        TorporSaver(s, every=0)
    saver = TorporSaver(s, every=1000)  # log-only puts here: the pairing is tested above
    c1 = empty_checkpoint()
    c1["channel_values"] = {"a": "x"}
    cfg1 = saver.put(_cfg(), c1, {"source": "input", "step": -1, "parents": {}}, {})
    assert cfg1 == _cfg(checkpoint_id=c1["id"])
    c2 = create_checkpoint(c1, None, 0)
    c2["channel_values"] = {"a": "y", "b": [1, 2]}
    cfg2 = saver.put(cfg1, c2, {"source": "loop", "step": 0, "parents": {}, "tag": "t2"}, {})
    assert s.status() == "interrupted"  # puts without a snapshot are provisional

    got = saver.get_tuple({"configurable": {"thread_id": "t"}})  # the latest
    assert got is not None and got.checkpoint == c2 and got.config == cfg2
    assert got.parent_config == _cfg(checkpoint_id=c1["id"])
    assert got.metadata == {"source": "loop", "step": 0, "parents": {}, "tag": "t2"}
    first = saver.get_tuple(cfg1)
    assert first is not None and first.checkpoint == c1 and first.parent_config is None
    assert saver.get_tuple(_cfg(checkpoint_id="nope")) is None
    assert saver.get_tuple({"configurable": {"thread_id": "other"}}) is None

    with pytest.raises(UsageError, match="no VM snapshot of its own"):
        saver.fork(cfg2)  # a provisional put has no machine to fork

    # writes: idempotent by (checkpoint, task, idx); special writes replace
    saver.put_writes(cfg2, [("a", 1), ("b", {"x": 2})], "task1", "path1")
    n = len(s.entries())
    saver.put_writes(cfg2, [("a", 99), ("b", {"x": 99})], "task1", "path1")  # a retry
    assert len(s.entries()) == n
    saver.put_writes(cfg2, [(ERROR, "e1")], "task2")
    saver.put_writes(cfg2, [(ERROR, "e2")], "task2")
    got = saver.get_tuple(cfg2)
    rows = [("path1", "task1", 0, "a", 1), ("path1", "task1", 1, "b", {"x": 2})]
    rows.append(("", "task2", WRITES_IDX_MAP[ERROR], ERROR, "e2"))
    rows.sort(key=lambda r: writes_sort_key(r[0], r[1], r[2]))
    assert got is not None and got.pending_writes == [(r[1], r[3], r[4]) for r in rows]

    # list: newest first; filter, before, limit, namespace
    ids = lambda ts: [t.config["configurable"]["checkpoint_id"] for t in ts]  # noqa: E731
    assert ids(saver.list(_cfg())) == [c2["id"], c1["id"]]
    assert ids(saver.list(None)) == [c2["id"], c1["id"]]
    assert ids(saver.list(_cfg(), filter={"source": "input"})) == [c1["id"]]
    assert ids(saver.list(_cfg(), filter={"tag": "t2", "step": 0})) == [c2["id"]]
    assert ids(saver.list(_cfg(), before=cfg2)) == [c1["id"]]
    assert ids(saver.list(_cfg(), limit=1)) == [c2["id"]]
    assert ids(saver.list({"configurable": {"thread_id": "t", "checkpoint_ns": "sub"}})) == []
    assert [t.pending_writes for t in saver.list(_cfg(), limit=1)] == [got.pending_writes]

    # async variants, on the same log
    async def use() -> None:
        assert (await saver.aget_tuple(cfg2)) == saver.get_tuple(cfg2)
        assert ids([t async for t in saver.alist(_cfg(), limit=1)]) == [c2["id"]]
        c3 = create_checkpoint(c2, None, 1)
        cfg3 = await saver.aput(cfg2, c3, {"source": "loop", "step": 1}, {})
        await saver.aput_writes(cfg3, [("a", "z")], "task3")
        got3 = await saver.aget_tuple(cfg3)
        assert got3 is not None and got3.pending_writes == [("task3", "a", "z")]

    asyncio.run(use())

    # a state too big for one entry: a clear error, nothing written
    n = len(s.entries())
    huge = create_checkpoint(c2, None, 5)
    huge["channel_values"] = {"a": "x" * (9 * 1024 * 1024)}
    with pytest.raises(UsageError, match=r"langgraph\.checkpoint payload"):
        saver.put(cfg2, huge, {"source": "loop", "step": 5}, {})
    assert len(s.entries()) == n

    # one thread per session, also for a graph run started on another thread
    with pytest.raises(UsageError, match="one session per thread"):
        saver.put(_cfg("u"), empty_checkpoint(), {}, {})
    # deletion folds the thread away; then the session may hold another
    saver.delete_thread("t")
    assert saver.get_tuple(_cfg()) is None and list(saver.list(None)) == []
    assert s.status() == "running"  # the deletion was checkpointed, not provisional
    paired = TorporSaver(s)  # every put paired
    c4 = empty_checkpoint()
    cfg4 = paired.put(_cfg("u"), c4, {"source": "input", "step": -1}, {})
    ck = paired.torpor_checkpoint(cfg4)
    assert ck == s.checkpoints[-1] and ck.reason == "langgraph" and s.status() == "running"
    before = effective(s.entries())[-2]  # the pair: the put's entry, then the snapshot
    assert before.kind is Kind.CUSTOM and before.payload["type"] == CHECKPOINT_KIND
    with pytest.raises(UsageError, match="no LangGraph checkpoint"):
        paired.torpor_checkpoint(_cfg("u", checkpoint_id="nope"))


class Counter(TypedDict):
    n: int


def test_graph_runs_that_cannot_pair_are_refused_before_they_run(sessions) -> None:
    s = sessions.create()
    ran: list[int] = []

    def node(state: Counter) -> dict[str, Any]:
        ran.append(1)
        return {"n": state["n"] + 1}

    g = StateGraph(Counter)
    g.add_node("node", node)
    g.add_edge(START, "node")
    g.add_edge("node", END)
    graph = g.compile(checkpointer=TorporSaver(s))
    with pytest.raises(UsageError, match="durability"):
        graph.invoke({"n": 1}, {"configurable": {"thread_id": "t"}})  # LangGraph's default
    assert ran == []
    assert graph.invoke({"n": 1}, {"configurable": {"thread_id": "t"}}, durability="exit") == {
        "n": 2
    }
    with pytest.raises(UsageError, match="one session per thread"):
        graph.invoke({"n": 1}, {"configurable": {"thread_id": "t2"}}, durability="sync")
    assert ran == [1]
    # the async API: the same saver through aget_tuple/aput/aput_writes
    config = {"configurable": {"thread_id": "t"}}
    out = asyncio.run(graph.ainvoke({"n": 5}, config, durability="sync"))
    assert out == {"n": 6} and ran == [1, 1] and graph.get_state(config).values == {"n": 6}
    assert s.status() == "running"
    # tools: failures come back as results the model reads
    exec_, read_file, write_file = sandbox_tools(s)
    assert "exit code 3" in exec_.invoke({"command": "echo out; exit 3"})
    assert write_file.invoke({"path": "/srv/a/b.txt", "content": "hi"}).startswith("wrote 2")
    assert read_file.invoke({"path": "/srv/a/b.txt"}) == "hi"
    assert read_file.invoke({"path": "/nope"}).startswith("error:")
    big = exec_.invoke({"command": "head -c 200000 /dev/zero | tr '\\0' a"})
    assert "more bytes]" in big and len(big) < 70_000
    (quick, *_) = sandbox_tools(s, timeout=1)
    assert "past its timeout" in quick.invoke({"command": "sleep 30"})
    with pytest.raises(UsageError):
        sandbox_tools(s, timeout=0)


class Log(TypedDict):
    log: str


def test_subgraph_checkpoints_pair_in_the_same_session(sessions) -> None:
    s = sessions.create()
    exec_ = sandbox_tools(s)[0]

    def s1(st: Log) -> dict[str, Any]:
        out = exec_.invoke({"command": "echo s1 >> /tmp/sub; cat /tmp/sub"})
        return {"log": st["log"] + "+" + out.split("stdout:\n")[1].split("\n")[0]}

    sub = StateGraph(Log)
    sub.add_node("s1", s1)
    sub.add_node("s2", lambda st: {"log": st["log"] + "+s2"})
    sub.add_edge(START, "s1")
    sub.add_edge("s1", "s2")
    sub.add_edge("s2", END)
    g = StateGraph(Log)
    g.add_node("inner", sub.compile(checkpointer=True))  # its own namespace, this saver
    g.add_node("after", lambda st: {"log": st["log"] + "+after"})
    g.add_edge(START, "inner")
    g.add_edge("inner", "after")
    g.add_edge("after", END)
    saver = TorporSaver(s)
    config = {"configurable": {"thread_id": "t"}}
    out = g.compile(checkpointer=saver).invoke({"log": "x"}, config, durability="sync")
    assert out == {"log": "x+s1+s2+after"}
    spaces = [t.config["configurable"]["checkpoint_ns"] for t in saver.list(None)]
    assert spaces.count("inner") == 4 and spaces.count("") == 4
    inner = saver.get_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": "inner"}})
    assert inner is not None and inner.checkpoint["channel_values"]["log"] == "x+s1+s2"
    seqs = [saver.torpor_checkpoint(t.config).seq for t in saver.list(None)]
    assert len(set(seqs)) == 8 and s.status() == "running"  # every one a pair of its own


def test_interrupt_pauses_settled_and_resumes_in_another_session_object(sessions) -> None:
    s = sessions.create()
    exec_ = sandbox_tools(s)[0]

    def ask(st: Counter) -> dict[str, Any]:
        exec_.invoke({"command": "echo asked >> /tmp/asked"})  # re-run on resume
        return {"n": st["n"] + interrupt("how many?")}

    g = StateGraph(Counter)
    g.add_node("ask", ask)
    g.add_edge(START, "ask")
    g.add_edge("ask", END)
    config = {"configurable": {"thread_id": "h"}}
    out = g.compile(checkpointer=TorporSaver(s)).invoke({"n": 1}, config, durability="sync")
    assert out["__interrupt__"][0].value == "how many?"
    assert s.status() == "running"  # paused for a human: settled, not interrupted
    assert s.checkpoints[-1].reason == "langgraph interrupt"
    with Session.open(s.id, paths=s.paths) as again:  # the answer comes to another worker
        graph = g.compile(checkpointer=TorporSaver(again))
        assert [i.value for i in graph.get_state(config).interrupts] == ["how many?"]
        assert graph.invoke(Command(resume=5), config, durability="sync") == {"n": 6}
        assert _cat(again.sandbox, "/tmp/asked") == "asked\nasked"  # LangGraph's re-run
        assert again.status() == "running"


def test_every_n_puts_pairs_some_and_recovery_goes_back_to_the_last_pair(sessions) -> None:
    s = sessions.create()
    exec_ = sandbox_tools(s)[0]

    def node(st: Counter) -> dict[str, Any]:
        exec_.invoke({"command": "echo ran >> /tmp/ran"})
        return {"n": st["n"] + 1}

    g = StateGraph(Counter)
    g.add_node("node", node)
    g.add_edge(START, "node")
    g.add_edge("node", END)
    saver = TorporSaver(s, every=2)
    config = {"configurable": {"thread_id": "e"}}
    assert g.compile(checkpointer=saver).invoke({"n": 1}, config, durability="sync") == {"n": 2}
    steps = {t.metadata["step"]: t for t in saver.list(config)}  # puts: -1, 0, 1
    assert sorted(steps) == [-1, 0, 1]
    assert saver.torpor_checkpoint(steps[0].config).reason == "langgraph"  # the 2nd put
    for step in (-1, 1):
        with pytest.raises(UsageError, match="no VM snapshot"):
            saver.torpor_checkpoint(steps[step].config)
    assert s.status() == "interrupted"  # the run ended on a provisional put
    with Session.open(s.id, paths=s.paths) as again:
        graph = g.compile(checkpointer=TorporSaver(again))
        with pytest.raises(SessionError, match="recover"):
            graph.invoke(None, config, durability="sync")
        again.recover(replay=False)  # back to the pair: before the node ran
        state = graph.get_state(config)
        assert state.next == ("node",) and state.values == {"n": 1}
        assert again.sandbox.exec("test -e /tmp/ran").exit_code == 1
        assert graph.invoke(None, config, durability="sync") == {"n": 2}
        assert _cat(again.sandbox, "/tmp/ran") == "ran"  # once, on the restored machine
