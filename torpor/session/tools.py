"""The tools a session's model can call: the four built-in ones (run inside the
session's VM) and the user's own (:class:`Tool`, :func:`tool`).

Every tool returns a :class:`ToolResult`, never raises for the guest's sake: a
missing file or a failing command is something the model should see and react to.
Only a lost VM (the agent connection broke) raises, because then the turn cannot go
on and the session's recovery takes over.

Custom tools:

- A :class:`Tool` is either a host callable (``fn``: called on the host with the
  parsed arguments as keyword arguments; its return value, a string or anything
  JSON-serialisable, becomes the result) or a sandbox command (``command``: run with
  ``sh -c`` in the session's VM, the arguments as JSON in ``$TORPOR_TOOL_ARGS``).
- Names match :data:`TOOL_NAME_RE` and may not shadow a built-in tool.
- Arguments are checked against the tool's JSON schema (the subset
  :func:`torpor.model.tools.argument_problems` knows) before the tool runs; a bad
  call, and an exception raised by ``fn``, come back to the model as an error result.
- Tools are code, not data: the log records only their names (in the session's meta),
  so a process that reopens a session must pass the same tools again.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torpor.agent.client import AgentClient, AgentRequestError
from torpor.agent.files import list_dir_capped
from torpor.errors import UsageError
from torpor.model.tools import TOOL_NAMES, argument_problems
from torpor.model.types import ToolSpec

#: Largest file ``read_file`` returns whole; larger files are cut (and say so).
READ_LIMIT = 256 * 1024
#: Most entries ``list_dir`` returns; more are cut (and say so).
LIST_LIMIT = 2000
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_OUTPUT = 64 * 1024
#: Most output bytes a shell call may ask for: a tool result must fit in a log entry.
MAX_OUTPUT = 1024 * 1024
MAX_TIMEOUT = 3600.0
#: A custom tool's name (as providers accept them: OpenAI's and Anthropic's rule).
TOOL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_-]{0,63}")


@dataclass(frozen=True)
class ToolResult:
    id: str
    name: str
    content: str
    is_error: bool = False
    exit_code: int | None = None
    truncated: bool = False
    ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _arg(args: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    if key not in args:
        if default is None:
            raise ValueError(f"missing argument {key!r}")
        return default
    value = args[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"argument {key!r} must be a {kind.__name__}")
    return value


def _shell(c: AgentClient, args: dict[str, Any]) -> tuple[str, int, bool]:
    cmd = _arg(args, "cmd", str)
    timeout = min(max(_arg(args, "timeout", float, DEFAULT_TIMEOUT), 0.1), MAX_TIMEOUT)
    limit = min(max(_arg(args, "max_output", int, DEFAULT_MAX_OUTPUT), 0), MAX_OUTPUT)
    return _run_sh(c, cmd, timeout, limit)


def _run_sh(
    c: AgentClient, cmd: str, timeout: float, limit: int, env: Sequence[str] = ()
) -> tuple[str, int, bool]:
    handle = c.start_exec(["sh", "-c", cmd], env=env, cwd="/")
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        handle.signal(signal.SIGKILL)  # the whole process group: sh and its children

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    out = bytearray()
    dropped = 0
    try:
        for kind, chunk in handle.events():  # ends at EXIT: the timer guarantees one
            del kind  # stdout and stderr interleave as the model would see them in a shell
            room = limit - len(out)
            out += chunk[:room] if room > 0 else b""
            dropped += max(0, len(chunk) - max(room, 0))
    finally:
        timer.cancel()
    assert handle.status is not None
    code = handle.status.code
    text = out.decode(errors="replace")
    if dropped:
        text += f"\n[output truncated: {dropped} more bytes]"
    if fired.is_set():
        text += f"\n[killed after the {timeout:g} s timeout]"
    return text, code, bool(dropped)


def _read_file(c: AgentClient, args: dict[str, Any]) -> tuple[str, bool]:
    path = _arg(args, "path", str)
    data = bytearray()
    truncated = False
    _info, chunks = c.read_file_stream(path)
    for chunk in chunks:
        data += chunk
        if len(data) > READ_LIMIT:
            truncated = True
            break
    text = bytes(data[:READ_LIMIT]).decode(errors="replace")
    if truncated:
        text += f"\n[file cut at {READ_LIMIT} bytes]"
    return text, truncated


def _write_file(c: AgentClient, args: dict[str, Any]) -> str:
    path = _arg(args, "path", str)
    content = _arg(args, "content", str)
    parent = os.path.dirname(path)
    if parent and parent != "/":
        c.mkdir(parent)
    data = content.encode()
    c.write_file(path, data)
    return f"wrote {len(data)} bytes to {path}"


def _list_dir(c: AgentClient, args: dict[str, Any]) -> str:
    path = _arg(args, "path", str)
    lines = []
    # capped: a guest that sends endless entries must not grow the host's memory
    entries, cut = list_dir_capped(c, path, LIST_LIMIT)
    for e in sorted(entries, key=lambda e: e.name):
        if e.is_dir:
            lines.append(f"{e.name}/")
        elif e.is_symlink:
            lines.append(f"{e.name} -> {e.link_target}")
        else:
            lines.append(f"{e.name}\t{e.size}")
    if cut:
        lines.append(f"[listing cut at {LIST_LIMIT} entries]")
    return "\n".join(lines) if lines else "(empty)"


def run_tool(c: AgentClient, call_id: str, name: str, arguments: dict[str, Any]) -> ToolResult:
    """Execute one tool call in the VM behind ``c``."""
    t0 = time.perf_counter()

    def done(content: str, **kw: Any) -> ToolResult:
        return ToolResult(call_id, name, content, ms=(time.perf_counter() - t0) * 1000, **kw)

    try:
        if name == "shell":
            text, code, cut = _shell(c, arguments)
            return done(text, exit_code=code, truncated=cut, is_error=code != 0)
        if name == "read_file":
            text, cut = _read_file(c, arguments)
            return done(text, truncated=cut)
        if name == "write_file":
            return done(_write_file(c, arguments))
        if name == "list_dir":
            return done(_list_dir(c, arguments))
        return done(f"error: unknown tool {name!r}", is_error=True)
    except ValueError as e:
        return done(f"error: {name}: {e}", is_error=True)
    except AgentRequestError as e:  # the guest refused: ENOENT, EISDIR, EACCES...
        reason = os.strerror(e.errno) if e.errno else str(e)
        return done(f"error: {name}: {reason}", is_error=True)


@dataclass(frozen=True)
class Tool:
    """A user-defined tool: exactly one of ``fn`` (runs on the host) or ``command``
    (runs with ``sh -c`` in the session's VM, arguments in ``$TORPOR_TOOL_ARGS``)."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any] | None = None
    command: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TOOL_NAME_RE.fullmatch(self.name):
            raise UsageError(
                f"invalid tool name {self.name!r}: use 1-64 of [a-zA-Z0-9_-], "
                "starting with a letter or _"
            )
        if self.name in TOOL_NAMES:
            raise UsageError(f"tool name {self.name!r} would shadow a built-in tool")
        if not isinstance(self.description, str):
            raise UsageError(f"tool {self.name}: description must be a string")
        p = self.parameters
        if not isinstance(p, dict) or p.get("type") != "object":
            raise UsageError(f"tool {self.name}: parameters must be a JSON schema of type object")
        try:
            json.dumps(p, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise UsageError(f"tool {self.name}: parameters are not JSON: {e}") from e
        if (self.fn is None) == (self.command is None):
            raise UsageError(f"tool {self.name}: give exactly one of fn= or command=")
        if self.fn is not None and not callable(self.fn):
            raise UsageError(f"tool {self.name}: fn must be callable")
        if self.command is not None and (not isinstance(self.command, str) or not self.command):
            raise UsageError(f"tool {self.name}: command must be a non-empty string")
        if not isinstance(self.timeout, int | float) or not 0 < self.timeout <= MAX_TIMEOUT:
            raise UsageError(f"tool {self.name}: timeout must be in (0, {MAX_TIMEOUT:g}] s")

    @property
    def where(self) -> str:
        return "host" if self.fn is not None else "sandbox"

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        """A decorated function stays callable as itself."""
        if self.fn is None:
            raise UsageError(f"tool {self.name} is a sandbox command, not a host function")
        return self.fn(*args, **kw)


_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
}


def _schema_of(fn: Callable[..., Any]) -> dict[str, Any]:
    """A JSON schema from ``fn``'s signature: annotated scalars get a type, parameters
    without a default are required, ``**kwargs`` allows extra arguments."""
    props: dict[str, Any] = {}
    required: list[str] = []
    extra = False
    try:
        hints = inspect.get_annotations(fn, eval_str=True)
    except Exception:  # unresolvable annotations: untyped parameters
        hints = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            extra = True
            continue
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            raise UsageError(f"tool {fn.__name__}: parameters must be passable by keyword")
        kind = _JSON_TYPES.get(hints.get(p.name))
        props[p.name] = {"type": kind} if kind else {}
        if p.default is p.empty:
            required.append(p.name)
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": extra,
    }


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> Any:
    """Make a host function a :class:`Tool`: ``@torpor.tool`` or ``@torpor.tool(name=...)``.

    The description defaults to the docstring, the parameters to a schema built from
    the signature's annotations (str, int, float, bool, dict, list)."""

    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool(
            name=name or f.__name__,
            description=description if description is not None else inspect.getdoc(f) or "",
            parameters=parameters if parameters is not None else _schema_of(f),
            fn=f,
        )

    return wrap(fn) if fn is not None else wrap


def check_tools(tools: Sequence[Tool] | None) -> tuple[Tool, ...]:
    """``tools`` as a tuple, each a :class:`Tool` with a name of its own."""
    out = tuple(tools or ())
    seen: set[str] = set()
    for t in out:
        if not isinstance(t, Tool):
            raise UsageError(f"tools must be torpor.Tool objects (or @torpor.tool), not {t!r:.80}")
        if t.name in seen:
            raise UsageError(f"two tools are named {t.name!r}")
        seen.add(t.name)
    return out


def _result_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def run_custom(c: AgentClient | None, t: Tool, call_id: str, arguments: Any) -> ToolResult:
    """Execute one call of custom tool ``t``: on the host, or in the VM behind ``c``."""
    t0 = time.perf_counter()

    def done(content: str, **kw: Any) -> ToolResult:
        return ToolResult(call_id, t.name, content, ms=(time.perf_counter() - t0) * 1000, **kw)

    problems = argument_problems(t.spec, arguments)
    if problems:
        return done(f"error: {t.name}: {'; '.join(problems)}", is_error=True)
    if t.fn is not None:
        try:
            value = t.fn(**arguments)
        except Exception as e:  # the user's code failed: the model sees it and goes on
            return done(f"error: {t.name}: {type(e).__name__}: {e}", is_error=True)
        text = _result_text(value)
        cut = len(text.encode()) > MAX_OUTPUT
        if cut:
            text = text.encode()[:MAX_OUTPUT].decode(errors="ignore") + "\n[result truncated]"
        return done(text, truncated=cut)
    assert c is not None and t.command is not None
    env = (f"TORPOR_TOOL_ARGS={json.dumps(arguments, ensure_ascii=False)}",)
    try:
        text, code, cut = _run_sh(c, t.command, t.timeout, DEFAULT_MAX_OUTPUT, env)
    except AgentRequestError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        return done(f"error: {t.name}: {reason}", is_error=True)
    return done(text, exit_code=code, truncated=cut, is_error=code != 0)
