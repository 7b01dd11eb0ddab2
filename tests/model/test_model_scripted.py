"""The ``scripted`` provider: position from messages only, templating, script files, built-ins."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from torpor.errors import UsageError
from torpor.model import (
    STOP_END,
    STOP_TOOL_CALLS,
    TOOL_NAMES,
    TOOLS,
    Model,
    ModelError,
    ModelResponse,
    ModelResponseError,
    ScriptedModel,
    ToolCall,
    Usage,
    load_script,
    open_model,
    parse_script,
    script_position,
)
from torpor.model.scripts import BUILTIN_SCRIPTS
from torpor.model.tools import argument_problems, find_tool

SCRIPT: dict[str, Any] = {
    "version": 1,
    "turns": [
        {
            "steps": [
                {
                    "text": "t{turn} first",
                    "tool_calls": [
                        {"name": "shell", "arguments": {"cmd": "echo {user}"}},
                        {"name": "read_file", "arguments": {"path": "/t{turn}"}},
                    ],
                },
                {"text": "t{turn} got [{last_result}]"},
            ]
        },
        {"steps": [{"text": "second turn: {user}"}]},
    ],
}


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _tool(call_id: str, content: str, name: str = "shell") -> dict[str, str]:
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}


def _model(doc: dict[str, Any] = SCRIPT, **changes: Any) -> ScriptedModel:
    return ScriptedModel(parse_script({**doc, **changes}), name="scripted:test")


def _same(a: ModelResponse, b: ModelResponse) -> bool:
    """Equal in everything but the measured latency."""
    da, db = a.to_json(), b.to_json()
    da.pop("latency_ms"), db.pop("latency_ms")
    return da == db


def test_position_comes_from_the_messages_only() -> None:
    sys = {"role": "system", "content": "s"}
    asst = {"role": "assistant", "content": "a"}
    assert script_position([sys, _user("u")]) == (0, 0)
    assert script_position([_user("u"), asst, _tool("x", "r")]) == (0, 1)
    assert script_position([_user("u"), asst, _tool("x", "r"), asst, _tool("y", "r")]) == (0, 2)
    assert script_position([_user("u"), asst, asst, _user("v")]) == (1, 0)
    assert script_position([_user("u"), asst, _user("v"), asst, _tool("z", "")]) == (1, 1)
    with pytest.raises(UsageError, match="user message"):
        script_position([sys])


def test_a_turn_with_tool_calls_then_a_final_answer() -> None:
    model = _model()
    messages: list[dict[str, Any]] = [{"role": "system", "content": "sys"}, _user("hi there")]
    first = model.complete(messages, TOOLS)
    assert first.text == "t0 first"
    assert first.stop_reason == STOP_TOOL_CALLS
    assert first.tool_calls == (
        ToolCall("call_0_0_0", "shell", {"cmd": "echo hi there"}),
        ToolCall("call_0_0_1", "read_file", {"path": "/t0"}),
    )
    assert first.model == "scripted:test"
    assert first.response_id == "scripted-0-0"
    messages += [
        first.to_message(),
        _tool("call_0_0_0", "hi there\n"),
        _tool("call_0_0_1", "  file body \n", "read_file"),
    ]
    final = model.complete(messages, TOOLS)
    assert final.text == "t0 got [file body]"  # the last tool message, stripped
    assert final.tool_calls == ()
    assert final.stop_reason == STOP_END
    messages += [final.to_message(), _user("more")]
    assert model.complete(messages, TOOLS).text == "second turn: more"


def test_same_messages_same_answer() -> None:
    messages = [_user("x"), {"role": "assistant", "content": "", "tool_calls": []}, _tool("c", "1")]
    a = _model().complete(messages, TOOLS)
    b = _model().complete(list(messages), TOOLS)
    c = open_model("scripted:demo").complete(messages, TOOLS)
    d = open_model("scripted:demo").complete(messages, TOOLS)
    assert _same(a, b) and _same(c, d)
    assert a.latency_ms >= 0


def test_usage_is_characters_over_four() -> None:
    r = _model().complete([_user("12345678")], [])
    assert r.usage.input_tokens == 2
    reply = "t0 first" + 'shell{"cmd": "echo 12345678"}' + 'read_file{"path": "/t0"}'
    assert r.usage == Usage(2, len(reply) // 4)


def test_templating_is_one_pass() -> None:
    # substituted text is never expanded again, and braces that are not placeholders stay
    doc = {
        "version": 1,
        "turns": [
            {
                "steps": [
                    {
                        "text": "{user} / {turn} / {nope} / {{turn}}",
                        "tool_calls": [
                            {
                                "name": "write_file",
                                "arguments": {"path": "/f", "content": "{user_sh}"},
                            },
                        ],
                    },
                ]
            }
        ],
    }
    r = _model(doc).complete([_user("it's {turn} {last_result}")], TOOLS)
    assert r.text == "it's {turn} {last_result} / 0 / {nope} / {0}"
    assert r.tool_calls[0].arguments == {
        "path": "/f",
        "content": "'it'\"'\"'s {turn} {last_result}'",
    }


def test_after_end_repeat_last() -> None:
    model = _model(after_end="repeat-last")
    messages = [
        _user("a"),
        {"role": "assistant", "content": "x"},
        _user("b"),
        {"role": "assistant", "content": "y"},
        _user("c"),
    ]
    r = model.complete(messages, TOOLS)
    assert r.text == "second turn: c"
    assert r.response_id == "scripted-2-0"


def test_after_end_error() -> None:
    model = _model(after_end="error")
    messages = [
        _user("a"),
        {"role": "assistant", "content": "x"},
        _user("b"),
        {"role": "assistant", "content": "y"},
        _user("c"),
    ]
    with pytest.raises(ModelError, match="script has no turn 2"):
        model.complete(messages, TOOLS)


def test_asking_past_the_last_step_is_an_error() -> None:
    doc = {
        "version": 1,
        "turns": [{"steps": [{"tool_calls": [{"name": "shell", "arguments": {"cmd": "true"}}]}]}],
    }
    messages = [_user("a"), {"role": "assistant", "content": ""}, _tool("c", "")]
    with pytest.raises(ModelError, match="turn 0 has 1 step"):
        _model(doc).complete(messages, TOOLS)


def test_a_tool_the_caller_did_not_offer() -> None:
    with pytest.raises(ModelResponseError, match="'read_file'") as e:
        _model().complete([_user("a")], [TOOLS[0]])
    assert e.value.tool == "read_file"
    # offering no tools at all is not checked (convenient for tests)
    assert _model().complete([_user("a")], []).tool_calls


def test_a_function_as_the_script() -> None:
    seen: list[tuple[int, int, int]] = []

    def script(turn: int, step: int, messages: list[dict[str, Any]]) -> ModelResponse:
        seen.append((turn, step, len(messages)))
        return ModelResponse(f"{turn}.{step}", (), Usage(), 0.0, "fn", STOP_END)

    model = ScriptedModel(script, name="scripted:fn")
    assert model.complete([_user("a")], []).text == "0.0"
    assert (
        model.complete([_user("a"), {"role": "assistant", "content": ""}, _user("b")], []).text
        == "1.0"
    )
    assert seen == [(0, 0, 1), (1, 0, 3)]


def test_malformed_messages_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="message 1 has role 'robot'"):
        _model().complete([_user("a"), {"role": "robot", "content": "x"}], [])
    with pytest.raises(UsageError, match="tool_call_id"):
        _model().complete([_user("a"), {"role": "tool", "content": "x"}], [])


# ------------------------------------------------------------- script files


def _write(tmp_path: Path, doc: Any) -> Path:
    p = tmp_path / "script.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def test_load_a_script_file(tmp_path: Path) -> None:
    path = _write(tmp_path, SCRIPT)
    assert load_script(path) == parse_script(SCRIPT)
    model = open_model(f"scripted:{path}")
    assert model.name == f"scripted:{path}"
    assert model.complete([_user("x")], TOOLS).text == "t0 first"
    assert parse_script(load_script(path).to_json()) == load_script(path)


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ('{"version": 1, "turns": [', "not valid JSON.*line 1"),
        ([], "must be an object"),
        ({"turns": []}, "needs 'version'"),
        ({"version": 2, "turns": [{"steps": [{"text": "x"}]}]}, "unsupported script version 2"),
        ({"version": 1, "turns": []}, "turns must be a non-empty list"),
        ({"version": 1, "turns": [{"steps": []}]}, "turn 0: steps must be a non-empty list"),
        ({"version": 1, "turns": [{"steps": [{}]}]}, "neither text nor tool_calls"),
        ({"version": 1, "turns": [{"steps": [{"txt": "x"}]}]}, "unknown key.*txt"),
        ({"version": 1, "turns": [{"steps": [{"text": "x"}]}], "after_end": "loop"}, "after_end"),
        (
            {"version": 1, "turns": [{"steps": [{"tool_calls": [{"name": "rm_rf"}]}]}]},
            "unknown tool 'rm_rf'.*known tools: shell, read_file, write_file, list_dir",
        ),
        (
            {
                "version": 1,
                "turns": [
                    {"steps": [{"tool_calls": [{"name": "shell", "arguments": {"command": "ls"}}]}]}
                ],
            },
            r"turn 0 step 0 tool call 0 \(shell\): missing required argument 'cmd'; "
            "unknown argument 'command'",
        ),
        (
            {
                "version": 1,
                "turns": [
                    {
                        "steps": [
                            {
                                "tool_calls": [
                                    {"name": "shell", "arguments": {"cmd": "ls", "timeout": "5"}}
                                ]
                            }
                        ]
                    }
                ],
            },
            "'timeout' must be of type number",
        ),
        (
            {
                "version": 1,
                "turns": [
                    {
                        "steps": [
                            {
                                "tool_calls": [
                                    {
                                        "name": "shell",
                                        "arguments": {"cmd": "ls", "max_output": True},
                                    }
                                ]
                            }
                        ]
                    }
                ],
            },
            "'max_output' must be of type integer, not bool",
        ),
    ],
)
def test_bad_script_files(tmp_path: Path, doc: Any, problem: str) -> None:
    path = _write(tmp_path, doc)
    with pytest.raises(UsageError, match=problem) as e:
        load_script(path)
    assert str(path) in str(e.value)
    with pytest.raises(UsageError, match=problem):
        open_model(f"scripted:{path}")


def test_missing_script_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="script file not found"):
        open_model(f"scripted:{tmp_path}/nope.json")


# ------------------------------------------------------------- built-in scripts


def _run_turn(
    model: Model,
    messages: list[dict[str, Any]],
    results: dict[str, str],
    calls: list[ToolCall],
) -> str:
    """Play one turn, answering each tool call with ``results[name]``; return the answer."""
    for _ in range(10):
        r = model.complete(messages, TOOLS)
        messages.append(r.to_message())
        if not r.tool_calls:
            return r.text
        for c in r.tool_calls:
            calls.append(c)
            messages.append(_tool(c.id, results.get(c.name, "") + "\n", c.name))
    raise AssertionError("the turn did not end")


def test_demo_script_plays_through() -> None:
    model = open_model("scripted:demo")
    assert isinstance(model, ScriptedModel)
    messages: list[dict[str, Any]] = [_user("set up a counter service and tell me its port")]
    calls: list[ToolCall] = []
    answer = _run_turn(model, messages, {"shell": "3", "write_file": "wrote 10 bytes"}, calls)
    assert [c.name for c in calls] == ["shell", "write_file", "shell", "shell"]
    assert calls[0].arguments == {"cmd": "mkdir -p /work"}
    assert "setsid" in calls[2].arguments["cmd"] and "echo started" in calls[2].arguments["cmd"]
    assert calls[3].arguments == {"cmd": "cat /work/counter"}
    assert "count was 3" in answer and "/work/counter" in answer

    messages.append(_user("is the counter still running?"))
    answer = _run_turn(
        model, messages, {"list_dir": "counter\t3\nnotes.md\t120", "shell": "42"}, calls
    )
    assert answer == "Yes — /work/counter now reads 42, so it kept counting."

    for n, text in enumerate(["buy milk", 'say "hi" $(reboot)'], start=1):
        messages.append(_user(text))
        before = len(calls)
        answer = _run_turn(model, messages, {"shell": str(n)}, calls)
        assert answer == f"Noted ({n} notes)."
        assert calls[before].id == f"call_{n + 1}_0_0"
    assert calls[-1].arguments["cmd"] == (
        "echo 'say \"hi\" $(reboot)' >> /work/journal && wc -l < /work/journal"
    )


def test_bench_script_every_turn() -> None:
    model = open_model("scripted:bench")
    messages: list[dict[str, Any]] = []
    calls: list[ToolCall] = []
    for turn in range(3):
        messages.append(_user(f"go {turn}"))
        assert _run_turn(model, messages, {}, calls) == f"ok {turn}"
    assert [c.arguments["cmd"] for c in calls] == [
        f"mkdir -p /work && echo turn-{t} >> /work/log && head -c 4096 /dev/urandom > /work/t{t}"
        for t in range(3)
    ]


@pytest.mark.parametrize("name", sorted(BUILTIN_SCRIPTS))
def test_builtin_scripts_use_only_known_tools_with_valid_arguments(name: str) -> None:
    script = parse_script(BUILTIN_SCRIPTS[name])
    for turn in script.turns:
        assert turn.steps[-1].tool_calls == (), "a turn must end with an answer"
        for step in turn.steps:
            for call in step.tool_calls:
                assert call.name in TOOL_NAMES
                spec = find_tool(call.name)
                assert spec is not None and argument_problems(spec, call.arguments) == []


@pytest.mark.parametrize("name", sorted(BUILTIN_SCRIPTS))
def test_builtin_shell_commands_parse(name: str) -> None:
    script = parse_script(BUILTIN_SCRIPTS[name])
    assert script.after_end == "repeat-last"
    played = [script.turns[min(t, len(script.turns) - 1)] for t in range(4)]
    scripted = sum(c.name == "shell" for t in played for s in t.steps for c in s.tool_calls)
    assert scripted > 0, f"{name} has no shell call: nothing to check here"
    model = open_model(f"scripted:{name}")
    messages: list[dict[str, Any]] = []
    calls: list[ToolCall] = []
    for turn in range(4):  # past the script's end too
        messages.append(_user(f"note {turn}: it's $HOME"))
        _run_turn(model, messages, {"shell": "1"}, calls)
    cmds = [c.arguments["cmd"] for c in calls if c.name == "shell"]
    assert len(cmds) == scripted, cmds  # every scripted shell call was played and is checked
    for cmd in cmds:
        check = subprocess.run(["sh", "-n", "-c", cmd], capture_output=True)
        assert check.returncode == 0, (cmd, check.stderr)
