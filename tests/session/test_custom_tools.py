"""Custom tools for a session's model: host callables and sandbox commands, offered next
to the built-in four, logged like them, and re-supplied when a session is reopened."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

import torpor
from torpor.context import Kind
from torpor.errors import UsageError
from torpor.model.scripted import parse_script
from torpor.session import Session, SessionError
from torpor.session.tools import Tool, run_custom

# turn 0 calls both custom tools, then a built-in one; turn 1 calls the host tool again
SCRIPT = {
    "version": 1,
    "tools": ["lookup", "guest_args"],
    "turns": [
        {
            "steps": [
                {
                    "tool_calls": [
                        {"name": "lookup", "arguments": {"city": "Paris", "n": 2}},
                        {"name": "guest_args", "arguments": {"path": "/tmp/x"}},
                    ]
                },
                {"tool_calls": [{"name": "shell", "arguments": {"cmd": "cat /tmp/args"}}]},
                {"text": "done: {last_result}"},
            ]
        },
        {
            "steps": [
                {"tool_calls": [{"name": "lookup", "arguments": {"city": "{user}"}}]},
                {"text": "found {last_result}"},
            ]
        },
    ],
}


# -- without a VM ---------------------------------------------------------------------


def test_tool_definitions_are_checked() -> None:
    def f(x: str) -> str:
        return x

    with pytest.raises(UsageError, match="shadow"):
        Tool("shell", "mine", {"type": "object"}, fn=f)
    with pytest.raises(UsageError, match="invalid tool name"):
        Tool("bad name", "d", {"type": "object"}, fn=f)
    with pytest.raises(UsageError, match="exactly one"):
        Tool("t", "d", {"type": "object"}, fn=f, command="true")
    with pytest.raises(UsageError, match="exactly one"):
        Tool("t", "d", {"type": "object"})
    with pytest.raises(UsageError, match="type object"):
        Tool("t", "d", {"type": "string"}, fn=f)
    with pytest.raises(UsageError, match="shadow"):
        torpor.tool(f, name="read_file")


def test_decorator_builds_the_schema_and_stays_callable() -> None:
    @torpor.tool
    def weather(city: str, days: int = 1, metric: bool = True) -> dict[str, Any]:
        """Forecast for a city."""
        return {"city": city, "days": days}

    assert isinstance(weather, torpor.Tool) and weather.where == "host"
    assert weather.description == "Forecast for a city."
    assert weather.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "metric": {"type": "boolean"},
        },
        "required": ["city"],
        "additionalProperties": False,
    }
    assert weather("Oslo") == {"city": "Oslo", "days": 1}
    ok = run_custom(None, weather, "c1", {"city": "Oslo", "days": 3})
    assert not ok.is_error and json.loads(ok.content) == {"city": "Oslo", "days": 3}
    bad = run_custom(None, weather, "c2", {"city": 5, "extra": 1})
    assert bad.is_error and "city" in bad.content and "extra" in bad.content

    @torpor.tool(name="boom")
    def explode() -> str:
        raise RuntimeError("no luck")

    r = run_custom(None, explode, "c3", {})
    assert r.is_error and "RuntimeError: no luck" in r.content


def test_scripts_name_the_custom_tools_they_call() -> None:
    assert parse_script(SCRIPT).tools == ("lookup", "guest_args")
    undeclared = {**SCRIPT, "tools": ["lookup"]}
    with pytest.raises(UsageError, match="unknown tool 'guest_args'"):
        parse_script(undeclared)
    with pytest.raises(UsageError, match="not built-ins"):
        parse_script({**SCRIPT, "tools": ["shell"]})


# -- on real VMs ------------------------------------------------------------------------


@pytest.fixture
def made(paths):
    out: list[Session] = []
    yield out
    for s in out:
        with contextlib.suppress(Exception):
            s.remove()
        s.close()


def _tools(calls: list[dict[str, Any]]) -> list[Tool]:
    @torpor.tool
    def lookup(city: str, n: int = 1) -> str:
        """Look a city up (on the host)."""
        calls.append({"city": city, "n": n})
        return f"{city} x{n}"

    guest = Tool(
        "guest_args",
        "Write the arguments into the machine.",
        {
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "required": ["path"],
            "additionalProperties": False,
        },
        command='printf %s "$TORPOR_TOOL_ARGS" > /tmp/args; uname -s',
    )
    return [lookup, guest]


@pytest.mark.vm
def test_custom_tools_run_and_are_logged(paths, tools_image, tmp_path: Path, made) -> None:
    script = tmp_path / "custom.json"
    script.write_text(json.dumps(SCRIPT))
    calls: list[dict[str, Any]] = []
    s = Session.create(tools_image, f"scripted:{script}", paths=paths, tools=_tools(calls))
    made.append(s)
    answer = s.send("go")
    assert calls == [{"city": "Paris", "n": 2}]  # the host function, with parsed arguments
    results = {e.payload["name"]: e.payload for e in s.log() if e.kind is Kind.TOOL_RESULT}
    assert results["lookup"]["content"] == "Paris x2" and not results["lookup"]["is_error"]
    assert results["guest_args"]["content"].strip() == "Linux"  # ran in the VM
    assert results["guest_args"]["exit_code"] == 0
    assert json.loads(results["shell"]["content"]) == {"path": "/tmp/x"}
    assert answer == 'done: {"path": "/tmp/x"}'
    assert s.status() == "running"

    # another process: the tools are code, so they must be passed again
    with Session.open(s.id, paths=paths) as bare:
        before = bare.log()[-1].seq
        with pytest.raises(SessionError, match="lookup, guest_args"):
            bare.send("Rome")
        assert bare.log()[-1].seq == before  # refused before anything was acknowledged
    with pytest.raises(UsageError, match="fixed when it is created"):
        Session.open(s.id, paths=paths, tools=[*_tools(calls), torpor.tool(lambda: 1, name="x")])
    with Session.open(s.id, paths=paths, tools=_tools(calls)) as again:
        assert again.send("Rome") == "found Rome x1"
    assert calls[-1] == {"city": "Rome", "n": 1}


@pytest.mark.vm
def test_recovered_turn_needs_its_tools(paths, tools_image, made) -> None:
    """A turn that dies inside a host tool is interrupted; recovering it without the
    tool is a clear error (not a skipped call); with the tool it is replayed."""
    doc = {
        "version": 1,
        "tools": ["flaky"],
        "turns": [
            {
                "steps": [
                    {"tool_calls": [{"name": "shell", "arguments": {"cmd": "echo x >> /t"}}]},
                    {"tool_calls": [{"name": "flaky", "arguments": {}}]},
                    {"text": "lines: {last_result}"},
                ]
            }
        ],
    }
    model = torpor.model.scripted.ScriptedModel(parse_script(doc))
    state = {"die": True}

    @torpor.tool
    def flaky() -> str:
        """Dies the first time, like a worker killed mid-turn."""
        if state["die"]:
            raise SystemExit("worker killed")  # not an Exception: the turn is cut short
        return "ok"

    s = Session.create(tools_image, model, paths=paths, tools=[flaky])
    made.append(s)
    with pytest.raises(SystemExit):
        s.send("go")
    assert s.status() == "interrupted"
    with Session.open(s.id, paths=paths, model=model) as bare:
        with pytest.raises(SessionError, match="flaky"):
            bare.recover()
        assert bare.status() == "interrupted"  # nothing skipped, nothing lost
    state["die"] = False
    with Session.open(s.id, paths=paths, model=model, tools=[flaky]) as again:
        assert again.recover() == "lines: ok"
        assert again.status() == "running"
        r = again.sandbox.exec("wc -l < /t")
        assert r.stdout.strip() == "1"  # the shell call's effect was not applied twice


def test_the_largest_tool_result_fits_in_one_entry() -> None:
    """A built-in or custom tool's output (capped at MAX_OUTPUT) must never trip the
    append cap mid-turn, even when JSON escaping grows every byte sixfold."""
    from torpor.session.core import _check_payload
    from torpor.session.tools import MAX_OUTPUT, ToolResult

    worst = ToolResult("c", "shell", "\x01" * MAX_OUTPUT + "\n[output truncated]", truncated=True)
    _check_payload(worst.to_json(), "tool_result")  # no UsageError
