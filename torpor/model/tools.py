"""The tools every session offers its model, as the model sees them.

:data:`TOOLS` is the one list both sides agree on: providers send these specs to the
model, scripts are checked against them, and ``torpor.session.tools`` executes calls
by these names.  :func:`argument_problems` checks arguments against a spec's schema
(the subset of JSON Schema the specs use: object, required, additionalProperties,
and the scalar types) so a script can be rejected when it is loaded, not mid-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torpor.model.types import ToolSpec

SHELL = ToolSpec(
    name="shell",
    description=(
        "Run a command with `sh -c` inside the machine (working directory /). "
        "Returns stdout and stderr interleaved; a non-zero exit status marks an error. "
        "Start long-running services in the background (`setsid cmd </dev/null >/dev/null 2>&1 &`)."
    ),
    parameters={
        "type": "object",
        "properties": {
            "cmd": {"type": "string", "description": "The shell command line."},
            "timeout": {
                "type": "number",
                "description": "Seconds before the command is killed (default 60).",
            },
            "max_output": {
                "type": "integer",
                "description": "Most bytes of output returned (default 65536).",
            },
        },
        "required": ["cmd"],
        "additionalProperties": False,
    },
)

READ_FILE = ToolSpec(
    name="read_file",
    description="Read a text file inside the machine. Large files are cut and say so.",
    parameters={
        "type": "object",
        "properties": {"path": {"type": "string", "description": "Absolute path."}},
        "required": ["path"],
        "additionalProperties": False,
    },
)

WRITE_FILE = ToolSpec(
    name="write_file",
    description=(
        "Create or replace a file inside the machine with the given text; "
        "missing parent directories are created."
    ),
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Absolute path."},
            "content": {"type": "string", "description": "The whole new content."},
        },
        "required": ["path", "content"],
        "additionalProperties": False,
    },
)

LIST_DIR = ToolSpec(
    name="list_dir",
    description=(
        "List a directory inside the machine: one entry per line, directories end "
        "with '/', files show their size."
    ),
    parameters={
        "type": "object",
        "properties": {"path": {"type": "string", "description": "Absolute path."}},
        "required": ["path"],
        "additionalProperties": False,
    },
)

TOOLS: tuple[ToolSpec, ...] = (SHELL, READ_FILE, WRITE_FILE, LIST_DIR)
TOOL_NAMES: tuple[str, ...] = tuple(t.name for t in TOOLS)

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def find_tool(name: str, tools: Sequence[ToolSpec] = TOOLS) -> ToolSpec | None:
    return next((t for t in tools if t.name == name), None)


def argument_problems(spec: ToolSpec, arguments: Any) -> list[str]:
    """What is wrong with ``arguments`` for ``spec`` (empty when they fit the schema)."""
    if not isinstance(arguments, dict):
        return [f"arguments must be an object, not {type(arguments).__name__}"]
    schema = spec.parameters
    props: dict[str, Any] = schema.get("properties", {})
    problems = [
        f"missing required argument {key!r}"
        for key in schema.get("required", ())
        if key not in arguments
    ]
    for key, value in arguments.items():
        prop = props.get(key)
        if prop is None:
            if schema.get("additionalProperties", True) is False:
                problems.append(f"unknown argument {key!r} (known: {', '.join(props)})")
            continue
        kind = prop.get("type")
        accepted = _TYPES.get(kind, (object,)) if isinstance(kind, str) else (object,)
        # bool is an int in Python but not a number in JSON
        if not isinstance(value, accepted) or (isinstance(value, bool) and kind != "boolean"):
            problems.append(f"argument {key!r} must be of type {kind}, not {type(value).__name__}")
    return problems


__all__ = [
    "LIST_DIR",
    "READ_FILE",
    "SHELL",
    "TOOLS",
    "TOOL_NAMES",
    "WRITE_FILE",
    "argument_problems",
    "find_tool",
]
