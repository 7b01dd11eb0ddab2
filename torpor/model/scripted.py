"""The ``scripted`` provider: an offline, deterministic model for demos, benchmarks and tests.

Invariant: the answer depends only on the messages.  The position in the script is
derived from them and nothing else, so replaying a context log (after a crash, on
another host, in a fork) gets the same answers::

    turn = (number of user messages) - 1
    step = number of assistant messages after the last user message

Script document, format version 1 (a ``.json`` file or a built-in from
:mod:`torpor.model.scripts`)::

    {"version": 1,
     "description": "optional",
     "turns": [ {"description": "optional",
                 "steps": [ {"text": "optional",
                             "tool_calls": [{"name": "shell", "arguments": {"cmd": "echo hi"}}]},
                            {"text": "final answer"} ]} ],
     "after_end": "repeat-last",          # or "error"
     "tools": ["lookup"]}                 # optional: custom tools the script may call

Past the last turn, ``repeat-last`` reuses the last turn's steps and ``error``
raises :class:`ModelError`.  Tool names and arguments are checked against
:data:`torpor.model.tools.TOOLS` when the script is parsed; calls of the custom
tools named in ``"tools"`` are accepted with any arguments (the session checks them
against the tool's schema when it runs the call, and the model refuses a tool the
caller did not offer).  Tool-call ids are
``call_<turn>_<step>_<i>``.

In step text and in string arguments (at any depth) these placeholders are
replaced, in one pass, so substituted text is never expanded again:
``{turn}`` the turn index, ``{user}`` the last user message, ``{user_sh}`` the same
quoted for ``sh``, ``{last_result}`` the content of the last tool message, stripped.
Usage is ``len(text) // 4`` tokens each way; latency is measured.

Cost: an answer reads only the messages after the last user message (and, for
``{last_result}``, back to the last tool message) plus the conversation's counts.  A
session hands this model its :class:`~torpor.model.types.Conversation`
(``lazy_messages``), which keeps the number of user messages and the total content
length as the log is folded, so a step costs the same at turn 10 and at turn 10,000 and
never decodes the rest of the conversation.  Given a plain list, the model walks it
once (the counts) and checks every message; given a Conversation it checks the messages
it reads (the session built the rest from its log).
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torpor.errors import UsageError
from torpor.model.errors import ModelError, ModelResponseError
from torpor.model.scripts import BUILTIN_SCRIPTS
from torpor.model.tools import TOOLS, argument_problems, find_tool
from torpor.model.types import (
    STOP_END,
    STOP_TOOL_CALLS,
    Conversation,
    Message,
    Model,
    ModelResponse,
    ToolCall,
    ToolSpec,
    Usage,
    approx_tokens,
    check_message,
    check_messages,
    dumps_arguments,
)

SCRIPT_VERSION = 1
AFTER_END = ("repeat-last", "error")

#: A script given as code: ``(turn, step, messages) -> ModelResponse``.  ``messages`` is
#: what ``complete`` was given: from a session, a :class:`Conversation` (a sequence).
ScriptFn = Callable[[int, int, Sequence[Message]], ModelResponse]

_PLACEHOLDER = re.compile(r"\{(turn|user|user_sh|last_result)\}")


@dataclass(frozen=True)
class ScriptCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Step:
    text: str = ""
    tool_calls: tuple[ScriptCall, ...] = ()


@dataclass(frozen=True)
class Turn:
    steps: tuple[Step, ...]
    description: str = ""


@dataclass(frozen=True)
class Script:
    turns: tuple[Turn, ...]
    after_end: str = "repeat-last"
    description: str = ""
    tools: tuple[str, ...] = ()  # custom tools the script may call

    def to_json(self) -> dict[str, Any]:
        def step(s: Step) -> dict[str, Any]:
            d: dict[str, Any] = {}
            if s.text:
                d["text"] = s.text
            if s.tool_calls:
                d["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in s.tool_calls]
            return d

        doc: dict[str, Any] = {"version": SCRIPT_VERSION}
        if self.description:
            doc["description"] = self.description
        doc["turns"] = [
            {
                **({"description": t.description} if t.description else {}),
                "steps": [step(s) for s in t.steps],
            }
            for t in self.turns
        ]
        doc["after_end"] = self.after_end
        if self.tools:
            doc["tools"] = list(self.tools)
        return doc


# ---------------------------------------------------------------- parsing


def _keys(obj: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    if not isinstance(obj, dict):
        raise UsageError(f"{where} must be an object, not {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise UsageError(f"{where} has unknown key(s) {', '.join(unknown)}")
    for key in required:
        if key not in obj:
            raise UsageError(f"{where} needs {key!r}")


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise UsageError(f"{where}: {key!r} must be a string")
    return value


def parse_script(doc: Any, *, source: str = "script", tools: Sequence[ToolSpec] = TOOLS) -> Script:
    """Validate a script document and build a :class:`Script`.

    Raises :class:`~torpor.errors.UsageError` naming ``source`` and the bad part.
    """
    _keys(
        doc, source, ("version", "description", "turns", "after_end", "tools"), ("version", "turns")
    )
    custom = doc.get("tools", [])
    if not isinstance(custom, list) or not all(
        isinstance(n, str) and n and find_tool(n, TOOLS) is None for n in custom
    ):
        raise UsageError(f"{source}: tools must be a list of custom tool names (not built-ins)")
    if doc["version"] != SCRIPT_VERSION:
        raise UsageError(
            f"{source}: unsupported script version {doc['version']!r} "
            f"(this torpor reads version {SCRIPT_VERSION})"
        )
    after_end = doc.get("after_end", "repeat-last")
    if after_end not in AFTER_END:
        raise UsageError(
            f"{source}: after_end is {after_end!r}; expected one of {', '.join(AFTER_END)}"
        )
    raw_turns = doc["turns"]
    if not isinstance(raw_turns, list) or not raw_turns:
        raise UsageError(f"{source}: turns must be a non-empty list")
    turns = []
    for t, raw_turn in enumerate(raw_turns):
        where = f"{source}: turn {t}"
        _keys(raw_turn, where, ("description", "steps"), ("steps",))
        raw_steps = raw_turn["steps"]
        if not isinstance(raw_steps, list) or not raw_steps:
            raise UsageError(f"{where}: steps must be a non-empty list")
        steps = []
        for s, raw_step in enumerate(raw_steps):
            swhere = f"{where} step {s}"
            _keys(raw_step, swhere, ("text", "tool_calls"))
            text = _str(raw_step, "text", swhere)
            raw_calls = raw_step.get("tool_calls", [])
            if not isinstance(raw_calls, list):
                raise UsageError(f"{swhere}: tool_calls must be a list")
            if not text and not raw_calls:
                raise UsageError(f"{swhere} has neither text nor tool_calls")
            calls = []
            for i, raw_call in enumerate(raw_calls):
                cwhere = f"{swhere} tool call {i}"
                _keys(raw_call, cwhere, ("name", "arguments"), ("name",))
                name = raw_call["name"]
                spec = find_tool(name, tools) if isinstance(name, str) else None
                arguments = raw_call.get("arguments", {})
                if spec is None and name in custom:
                    if not isinstance(arguments, dict):
                        raise UsageError(f"{cwhere} ({name}): arguments must be an object")
                    calls.append(ScriptCall(name, arguments))
                    continue
                if spec is None:
                    known = ", ".join([*(x.name for x in tools), *custom])
                    raise UsageError(f"{cwhere}: unknown tool {name!r} (known tools: {known})")
                problems = argument_problems(spec, arguments)
                if problems:
                    raise UsageError(f"{cwhere} ({name}): {'; '.join(problems)}")
                calls.append(ScriptCall(name, arguments))
            steps.append(Step(text, tuple(calls)))
        turns.append(Turn(tuple(steps), _str(raw_turn, "description", where)))
    return Script(tuple(turns), after_end, _str(doc, "description", source), tuple(custom))


def load_script(path: str | Path, *, tools: Sequence[ToolSpec] = TOOLS) -> Script:
    """Read and validate a script file; raises :class:`UsageError` if it is unusable."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise UsageError("script file not found", path=p) from e
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read script file: {e}", path=p) from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(
            f"script file is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", path=p
        ) from e
    return parse_script(doc, source=f"script {p}", tools=tools)


def builtin_script(name: str) -> Script:
    """One of :data:`~torpor.model.scripts.BUILTIN_SCRIPTS`, parsed."""
    if name not in BUILTIN_SCRIPTS:
        raise UsageError(
            f"no built-in script {name!r} (built-in: {', '.join(sorted(BUILTIN_SCRIPTS))})"
        )
    return parse_script(BUILTIN_SCRIPTS[name], source=f"built-in script {name!r}")


# ---------------------------------------------------------------- running


def script_position(messages: Sequence[Message]) -> tuple[int, int]:
    """``(turn, step)`` for the next answer, derived only from ``messages``: the number
    of user messages (a :class:`Conversation` knows it; a list is counted) and the
    assistant messages after the last user message (read backwards from the end)."""
    return _position(messages, check=False)


def _position(messages: Sequence[Message], check: bool) -> tuple[int, int]:
    if isinstance(messages, Conversation):
        users = messages.users
    else:
        users = sum(1 for m in messages if m.get("role") == "user")
    if not users:
        raise UsageError("a scripted model needs at least one user message")
    step = 0
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if check:
            check_message(i, m)
        role = m.get("role")
        if role == "user":
            break
        if role == "assistant":
            step += 1
    return users - 1, step


def _substitute(value: Any, values: _Values) -> Any:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], value)
    if isinstance(value, dict):
        return {k: _substitute(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    return value


def _last(messages: Sequence[Message], role: str) -> str:
    """The content of the last message with ``role`` ("" if none), read from the end."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.get("role") == role:
            return m.get("content") or ""
    return ""


class _Values:
    """The placeholder values of one answer, each looked up when a placeholder first
    asks for it (a step without ``{last_result}`` never searches for a tool message)."""

    def __init__(self, turn: int, messages: Sequence[Message]):
        self.turn, self.messages = turn, messages
        self.got: dict[str, str] = {}

    def __getitem__(self, key: str) -> str:
        if key not in self.got:
            if key == "turn":
                self.got[key] = str(self.turn)
            elif key == "user":
                self.got[key] = _last(self.messages, "user")
            elif key == "user_sh":
                self.got[key] = shlex.quote(self["user"])
            else:  # last_result
                self.got[key] = _last(self.messages, "tool").strip()
        return self.got[key]


def _chars(messages: Sequence[Message]) -> int:
    """The length of every message's content together (the prompt's size)."""
    if isinstance(messages, Conversation):
        return messages.chars
    return sum(len(m.get("content") or "") for m in messages)


class ScriptedModel(Model):
    """Answers from a :class:`Script` (or a function), deterministically and offline."""

    lazy_messages = True  # reads the tail and the counts only (see the module doc)

    def __init__(self, script: Script | ScriptFn, name: str = "scripted"):
        self.script = script
        self.name = name

    def _step(self, turn: int, step: int) -> Step:
        assert isinstance(self.script, Script)
        turns = self.script.turns
        if turn >= len(turns):
            if self.script.after_end == "error":
                raise ModelError(
                    f"script has no turn {turn} (it has {len(turns)})",
                    provider="scripted",
                    step=self.name,
                )
            steps = turns[-1].steps
        else:
            steps = turns[turn].steps
        if step >= len(steps):
            raise ModelError(
                f"script turn {turn} has {len(steps)} step(s); step {step} was asked for "
                "(its last step should answer without tool calls)",
                provider="scripted",
                step=self.name,
            )
        return steps[step]

    def complete(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec],
        *,
        timeout: float | None = None,
    ) -> ModelResponse:
        t0 = time.perf_counter()
        lazy = isinstance(messages, Conversation)
        if not lazy:
            check_messages(messages)
        turn, step_index = _position(messages, check=lazy)
        if not isinstance(self.script, Script):
            return self.script(turn, step_index, messages)
        step = self._step(turn, step_index)
        values = _Values(turn, messages)
        offered = {t.name for t in tools}
        calls = []
        for i, c in enumerate(step.tool_calls):
            if offered and c.name not in offered:
                raise ModelResponseError(
                    f"script turn {turn} step {step_index} calls {c.name!r}, which the caller "
                    f"did not offer (offered: {', '.join(sorted(offered))})",
                    tool=c.name,
                    provider="scripted",
                    step=self.name,
                )
            calls.append(
                ToolCall(f"call_{turn}_{step_index}_{i}", c.name, _substitute(c.arguments, values))
            )
        text = _substitute(step.text, values)
        reply = text + "".join(c.name + dumps_arguments(c.arguments) for c in calls)
        return ModelResponse(
            text=text,
            tool_calls=tuple(calls),
            # approx_tokens of the whole prompt, from its length alone
            usage=Usage(_chars(messages) // 4, approx_tokens(reply)),
            latency_ms=(time.perf_counter() - t0) * 1000,
            model=self.name,
            stop_reason=STOP_TOOL_CALLS if calls else STOP_END,
            response_id=f"scripted-{turn}-{step_index}",
        )


__all__ = [
    "SCRIPT_VERSION",
    "Script",
    "ScriptCall",
    "ScriptFn",
    "ScriptedModel",
    "Step",
    "Turn",
    "builtin_script",
    "load_script",
    "parse_script",
    "script_position",
]
