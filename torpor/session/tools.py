"""The tools a session's model can call, executed inside the session's VM.

Every tool returns a :class:`ToolResult`, never raises for the guest's sake: a
missing file or a failing command is something the model should see and react to.
Only a lost VM (the agent connection broke) raises, because then the turn cannot go
on and the session's recovery takes over.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from torpor.agent.client import AgentClient, AgentRequestError
from torpor.agent.files import list_dir_capped

#: Largest file ``read_file`` returns whole; larger files are cut (and say so).
READ_LIMIT = 256 * 1024
#: Most entries ``list_dir`` returns; more are cut (and say so).
LIST_LIMIT = 2000
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_OUTPUT = 64 * 1024
MAX_TIMEOUT = 3600.0


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
    limit = max(_arg(args, "max_output", int, DEFAULT_MAX_OUTPUT), 0)
    handle = c.start_exec(["sh", "-c", cmd], cwd="/")
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
