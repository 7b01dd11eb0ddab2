"""The scripted model reads only the tail of a conversation, and answers exactly as the
whole-conversation walk it replaced did.

``_walk_complete`` below is the scripted model's ``complete`` as it was before (it walked
every message each step: the position, the placeholders, the prompt's length); random
scripts over random conversations must give the same response (or the same error) from
it, from the model given a list, and from the model given a session's lazily decoded
conversation split into random sealed segments.  No VM.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torpor.errors import UsageError
from torpor.model import ModelError, ModelResponse, ScriptedModel, ToolCall, parse_script
from torpor.model.scripted import _PLACEHOLDER, Script
from torpor.model.tools import TOOLS
from torpor.model.types import (
    STOP_END,
    STOP_TOOL_CALLS,
    Usage,
    approx_tokens,
    check_messages,
    dumps_arguments,
)
from torpor.session.conversation import MsgList, Segment, SessionConversation

# ------------------------------------------------------------ the old walk, verbatim


def _walk_position(messages: Sequence[dict[str, Any]]) -> tuple[int, int]:
    last_user = -1
    users = 0
    for i, m in enumerate(messages):
        if m.get("role") == "user":
            users += 1
            last_user = i
    if not users:
        raise UsageError("a scripted model needs at least one user message")
    step = sum(1 for m in messages[last_user + 1 :] if m.get("role") == "assistant")
    return users - 1, step


def _walk_substitute(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], value)
    if isinstance(value, dict):
        return {k: _walk_substitute(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk_substitute(v, values) for v in value]
    return value


def _walk_complete(model: ScriptedModel, messages: list[dict[str, Any]]) -> ModelResponse:
    check_messages(messages)
    turn, step_index = _walk_position(messages)
    assert isinstance(model.script, Script)
    step = model._step(turn, step_index)
    user = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    last = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "tool"), "")
    values = {
        "turn": str(turn),
        "user": user,
        "user_sh": shlex.quote(user),
        "last_result": last.strip(),
    }
    calls = [
        ToolCall(f"call_{turn}_{step_index}_{i}", c.name, _walk_substitute(c.arguments, values))
        for i, c in enumerate(step.tool_calls)
    ]
    text = _walk_substitute(step.text, values)
    prompt = "".join(m.get("content") or "" for m in messages)
    reply = text + "".join(c.name + dumps_arguments(c.arguments) for c in calls)
    return ModelResponse(
        text=text,
        tool_calls=tuple(calls),
        usage=Usage(approx_tokens(prompt), approx_tokens(reply)),
        latency_ms=0.0,
        model=model.name,
        stop_reason=STOP_TOOL_CALLS if calls else STOP_END,
        response_id=f"scripted-{turn}-{step_index}",
    )


# ------------------------------------------------------------ helpers


def _outcome(fn: Any) -> Any:
    """A response without its latency, or the error's type and text."""
    try:
        r = fn()
    except (UsageError, ModelError) as e:
        return (type(e).__name__, str(e))
    d = r.to_json()
    d.pop("latency_ms")
    return d


def _conversation(
    system: str, body: list[dict[str, Any]], cuts: list[int], loaded: list[int] | None = None
) -> SessionConversation:
    """``body`` as a session would hand it over: sealed segments ending at ``cuts`` (each
    decoded on first access, noted in ``loaded``), then the rest as a plain list."""
    segs, start = [], 0
    for k, end in enumerate(sorted(set(c for c in cuts if 0 < c <= len(body)))):
        part = body[start:end]

        def load(part: list[dict[str, Any]] = part, k: int = k) -> list[dict[str, Any]]:
            if loaded is not None:
                loaded.append(k)
            return list(part)

        segs.append(Segment(len(part), load))
        start = end
    counted = MsgList(items=list(body))  # what the record stores with the segments
    msgs = MsgList(segs, body[start:], users=counted.users, chars=counted.chars)
    return SessionConversation(system, msgs)


TEXT = st.text(alphabet="ab {}'\"$\n", max_size=12)
PLACEHOLDED = st.lists(
    st.one_of(TEXT, st.sampled_from(["{turn}", "{user}", "{user_sh}", "{last_result}"])),
    max_size=4,
).map("".join)


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    turns = []
    for _ in range(draw(st.integers(1, 3))):
        steps: list[dict[str, Any]] = []
        for _ in range(draw(st.integers(0, 2))):  # steps with tool calls, then an answer
            calls = [
                {"name": "shell", "arguments": {"cmd": draw(PLACEHOLDED) or "true"}}
                for _ in range(draw(st.integers(1, 2)))
            ]
            steps.append({"text": draw(PLACEHOLDED), "tool_calls": calls})
        steps.append({"text": draw(PLACEHOLDED) or "done"})
        turns.append({"steps": steps})
    after = draw(st.sampled_from(["repeat-last", "error"]))
    return parse_script({"version": 1, "turns": turns, "after_end": after})


MESSAGE = st.one_of(
    st.builds(lambda c: {"role": "user", "content": c}, TEXT),
    st.builds(lambda c: {"role": "assistant", "content": c}, TEXT),
    st.builds(
        lambda c: {
            "role": "assistant",
            "content": c,
            "tool_calls": [{"id": "x", "name": "shell", "arguments": {"cmd": c}}],
        },
        TEXT,
    ),
    st.builds(lambda c: {"role": "tool", "tool_call_id": "x", "name": "shell", "content": c}, TEXT),
    st.just({"role": "assistant"}),  # content missing: counted as ""
)


@settings(max_examples=300, deadline=None)
@given(
    script=scripts(),
    system=TEXT,
    body=st.lists(MESSAGE, max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=5),
)
def test_tail_reads_answer_as_the_whole_walk(
    script: Script, system: str, body: list[dict[str, Any]], cuts: list[int]
) -> None:
    model = ScriptedModel(script, name="scripted:test")
    whole = [{"role": "system", "content": system}, *body]
    want = _outcome(lambda: _walk_complete(model, whole))
    assert _outcome(lambda: model.complete(whole, TOOLS)) == want
    conv = _conversation(system, body, cuts)
    assert len(conv) == len(whole) and list(conv) == whole
    assert _outcome(lambda: model.complete(conv, TOOLS)) == want


def _long(turns: int) -> list[dict[str, Any]]:
    body: list[dict[str, Any]] = []
    for t in range(turns):
        body += [
            {"role": "user", "content": f"turn {t}"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": f"c{t}", "name": "shell", "arguments": {"cmd": "x"}}],
            },
            {"role": "tool", "tool_call_id": f"c{t}", "name": "shell", "content": f"out {t}"},
            {"role": "assistant", "content": f"done {t}"},
        ]
    return body


def test_a_long_conversation_is_not_decoded() -> None:
    """3,000 turns in 30 sealed segments: the next answer decodes none of them (the
    turn is in the unsealed tail) and {last_result} of a turn's first step reaches back
    into the last segment only."""
    body = [*_long(3000), {"role": "user", "content": "next"}]
    cuts = list(range(400, 12_001, 400))  # the last user message stays unsealed
    doc = {
        "version": 1,
        "turns": [{"steps": [{"text": "{user}"}]}],
        "after_end": "repeat-last",
    }
    loaded: list[int] = []
    model = ScriptedModel(parse_script(doc))
    conv = _conversation("sys", body, cuts, loaded)
    r = model.complete(conv, TOOLS)
    assert r.text == "next" and r.response_id == "scripted-3000-0" and loaded == []
    assert r.usage.input_tokens == _walk_complete(model, list(conv)).usage.input_tokens
    doc["turns"] = [{"steps": [{"text": "[{last_result}]"}]}]
    loaded.clear()
    conv = _conversation("sys", body, cuts, loaded)
    assert ScriptedModel(parse_script(doc)).complete(conv, TOOLS).text == "[out 2999]"
    assert loaded == [len(cuts) - 1]


def test_a_conversation_is_checked_where_it_is_read() -> None:
    """Given a conversation, the model checks the messages it reads (the session built
    them from its log); a malformed one there is a UsageError as before."""
    body = [{"role": "user", "content": "a"}, {"role": "tool", "content": "no call id"}]
    conv = _conversation("sys", body, [])
    with pytest.raises(UsageError, match="tool_call_id"):
        ScriptedModel(parse_script({"version": 1, "turns": [{"steps": [{"text": "x"}]}]})).complete(
            conv, TOOLS
        )
