"""Commands run in a sandbox: results, background handles, output decoding.

Invariants:

- A command's ``timeout`` ends its whole process group (the guest agent starts
  every EXEC in its own session, and SIGNAL goes to the group) with SIGKILL, and
  the caller gets :class:`~torpor.errors.ExecTimeoutError` saying so — never a
  result that looks like a normal exit.
- Output reaches callbacks chunk by chunk as it arrives; what is *kept* for the
  result is capped (``max_output`` bytes per stream, the rest counted in
  ``*_dropped``), so a command printing without end cannot exhaust host memory.
- Bytes from the guest are decoded as UTF-8 with replacement, incrementally, so a
  character split across two chunks is not mangled.
"""

from __future__ import annotations

import codecs
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from torpor.agent.client import AgentRequestError, ExecHandle
from torpor.agent.protocol import T
from torpor.errors import AgentError, ExecTimeoutError

#: Bytes of stdout (and of stderr) a result keeps by default; callbacks see all of it.
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
#: Seconds to wait for EXIT after the group was sent SIGKILL.
_KILL_GRACE = 10.0

OutputCallback = Callable[[str], object]


@dataclass(frozen=True)
class CommandResult:
    """A finished command: ``exit_code`` (128+N if killed by signal N), its output."""

    exit_code: int
    stdout: str
    stderr: str
    signal: int | None = None
    stdout_dropped: int = 0  # bytes past ``max_output`` not kept (callbacks saw them)
    stderr_dropped: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class _Collector:
    """Decodes and dispatches output chunks; keeps at most ``limit`` bytes per stream."""

    def __init__(
        self,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        limit: int,
    ):
        self.cb = {T.STDOUT: on_stdout, T.STDERR: on_stderr}
        self.dec = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in self.cb}
        self.kept: dict[T, list[str]] = {T.STDOUT: [], T.STDERR: []}
        self.size = {T.STDOUT: 0, T.STDERR: 0}
        self.dropped = {T.STDOUT: 0, T.STDERR: 0}
        self.limit = limit

    def feed(self, kind: T, chunk: bytes, final: bool = False) -> None:
        text = self.dec[kind].decode(chunk, final)
        room = self.limit - self.size[kind]
        if room >= len(chunk):
            self.kept[kind].append(text)
            self.size[kind] += len(chunk)
        elif room > 0:  # keep what fits of this chunk (by its UTF-8 size), drop the rest
            part = text.encode()[:room].decode(errors="ignore")
            self.kept[kind].append(part)
            self.size[kind] = self.limit
            self.dropped[kind] += len(chunk) - room
        else:
            self.dropped[kind] += len(chunk)
        cb = self.cb[kind]
        if cb is not None and text:
            cb(text)

    def finish(self) -> None:
        for kind in (T.STDOUT, T.STDERR):
            self.feed(kind, b"", final=True)

    def text(self, kind: T) -> str:
        return "".join(self.kept[kind])


def run_handle(
    handle: ExecHandle,
    timeout: float | None,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
    max_output: int,
    what: str,
) -> CommandResult:
    """Drive ``handle`` to its EXIT, enforcing ``timeout`` (see the module docstring)."""
    out = _Collector(on_stdout, on_stderr, max_output)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for kind, chunk in handle.events(timeout):
            out.feed(kind, chunk)
    except AgentRequestError:
        raise
    except AgentError:
        if deadline is None or time.monotonic() < deadline:
            raise  # a lost connection, not our timeout
        # the request timed out on our side: the process still runs in the guest
        try:
            handle.signal(signal.SIGKILL)
        except AgentError as e:
            raise ExecTimeoutError(
                f"{what!r} ran past its timeout of {timeout:g} s and its process group "
                f"could not be killed: {e}",
                stdout=out.text(T.STDOUT),
                stderr=out.text(T.STDERR),
                step="exec",
            ) from e
        out.finish()
        raise ExecTimeoutError(
            f"{what!r} ran past its timeout of {timeout:g} s; its process group was "
            "killed (SIGKILL)",
            stdout=out.text(T.STDOUT),
            stderr=out.text(T.STDERR),
            step="exec",
        ) from None
    out.finish()
    assert handle.status is not None
    st = handle.status
    return CommandResult(
        exit_code=st.code,
        stdout=out.text(T.STDOUT),
        stderr=out.text(T.STDERR),
        signal=st.signal or None,
        stdout_dropped=out.dropped[T.STDOUT],
        stderr_dropped=out.dropped[T.STDERR],
    )


class CommandHandle:
    """A command started with ``background=True``.

    Its output is read by whoever calls :meth:`wait` or iterates :meth:`output`
    (once: a stream, not a buffer).  ``kill()`` ends the whole process group.
    """

    def __init__(
        self,
        handle: ExecHandle,
        command: str,
        on_done: Callable[[CommandHandle], None],
        busy: Callable[[], AbstractContextManager[None]] = nullcontext,
    ):
        self._h = handle
        self._busy = busy  # held while someone waits on the command (see Sandbox idle)
        self.command = command
        self.pid: int = handle.pid or 0
        self._lock = threading.Lock()
        self._result: CommandResult | None = None
        self._on_done = on_done

    @property
    def exit_code(self) -> int | None:
        """The exit code once :meth:`wait` returned, else None."""
        return None if self._result is None else self._result.exit_code

    def send_stdin(self, data: bytes | str) -> None:
        self._h.write_stdin(data.encode() if isinstance(data, str) else data)

    def close_stdin(self) -> None:
        self._h.close_stdin()

    def signal(self, signo: int) -> None:
        """Send ``signo`` to the command's process group."""
        self._h.signal(signo)

    def kill(self) -> None:
        """SIGKILL the command's process group (``wait`` then returns its status)."""
        if self._result is None:
            self._h.signal(signal.SIGKILL)

    def output(self, timeout: float | None = None) -> Iterator[tuple[str, bytes]]:
        """Yield ``("stdout"|"stderr", chunk)`` as the command writes, until it exits."""
        try:
            with self._busy():
                for kind, chunk in self._h.events(timeout):
                    yield ("stdout" if kind == T.STDOUT else "stderr"), chunk
        finally:
            st = self._h.status
            if st is not None:
                self._finish(CommandResult(st.code, "", "", st.signal or None))

    def wait(
        self,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> CommandResult:
        """Wait for the command to exit; ``timeout`` kills it like ``exec``'s does."""
        with self._lock:
            if self._result is not None:
                return self._result
            with self._busy():
                r = run_handle(self._h, timeout, on_stdout, on_stderr, max_output, self.command)
            self._finish(r)
            return r

    def _finish(self, r: CommandResult) -> None:
        if self._result is None:
            self._result = r
            self._on_done(self)
