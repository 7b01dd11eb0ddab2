"""``Pty``: an interactive terminal in a sandbox (what ``Sandbox.pty`` returns).

The program runs on a pseudo-terminal in the guest (an EXEC with the TTY flag,
docs/protocol.md), so it behaves as under a terminal emulator.

Invariants:

- ``read`` returns the terminal's bytes as they come: stdout and stderr are one
  stream, ``\\n`` arrives as ``\\r\\n`` and typed input is echoed (the guest's line
  discipline, not torpor, decides). ``write`` sends keystrokes: ``b"\\x03"`` (^C)
  interrupts the foreground job, ``b"\\x04"`` (^D) is end-of-file.
- A ``Pty`` never outlives its user: ``close()`` (or the Python process going
  away, which closes its connection to the shim) hangs the terminal up — SIGHUP to
  the session and to its foreground job — so no interactive program is left
  waiting for input that will never come.
- While open it holds the sandbox's shared busy lock: the idle watcher does not
  hibernate a sandbox under a live terminal.
- Every error is a :class:`~torpor.errors.TorporError`; a bad size is a
  :class:`~torpor.errors.UsageError` (1..4096 columns and rows).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable

from torpor.agent.client import ExecHandle
from torpor.agent.protocol import TTY_MAX, TTY_MIN
from torpor.errors import AgentError, UsageError


def check_size(cols: int, rows: int) -> None:
    for name, v in (("cols", cols), ("rows", rows)):
        if not isinstance(v, int) or not TTY_MIN <= v <= TTY_MAX:
            raise UsageError(f"terminal {name} must be {TTY_MIN}..{TTY_MAX}, not {v!r}")


def read_until(
    read: Callable[[float], bytes],
    ended: Callable[[], bool],
    unread: Callable[[bytes], None],
    marker: bytes | str,
    timeout: float,
) -> bytes:
    """A terminal's output up to and including ``marker``, read with ``read(seconds)``;
    what came after it goes back through ``unread``.  AgentError if it does not appear
    within ``timeout`` or the program ended (``ended()``) first.  Local and remote PTYs."""
    want = marker.encode() if isinstance(marker, str) else marker
    deadline = time.monotonic() + timeout
    got = b""
    while want not in got:
        left = deadline - time.monotonic()
        if left <= 0 or ended():
            raise AgentError(
                f"terminal output did not show {want!r} "
                + ("before the program exited" if ended() else f"within {timeout:g} s")
                + f"; last bytes: {got[-200:]!r}",
                step="pty",
            )
        got += read(left)
    end = got.index(want) + len(want)
    unread(got[end:])
    return got[:end]


class Pty:
    """A program on a terminal in the guest: write keystrokes, read the screen bytes."""

    def __init__(
        self,
        handle: ExecHandle,
        cols: int,
        rows: int,
        hold: contextlib.AbstractContextManager[None] | None = None,
    ):
        self._h = handle
        self._hold = hold
        self._lock = threading.Lock()  # one reader at a time: chunks stay in order
        self._pending = b""  # read past a read_until marker, returned by the next read
        self.pid: int = handle.pid or 0
        self.cols = cols
        self.rows = rows

    def __repr__(self) -> str:
        state = "running" if self.exit_code is None else f"exited {self.exit_code}"
        return f"Pty(pid={self.pid}, {self.cols}x{self.rows}, {state})"

    @property
    def exit_code(self) -> int | None:
        """The program's exit code (128+N if killed by signal N) once it ended, else None."""
        st = self._h.status
        return None if st is None else st.code

    def write(self, data: bytes | str) -> None:
        """Send keystrokes (a str is UTF-8 encoded)."""
        if self.exit_code is not None:
            return  # like typing into a closed terminal window
        self._h.write_stdin(data.encode() if isinstance(data, str) else data)

    def read(self, timeout: float | None = None) -> bytes:
        """The next bytes the terminal shows; ``b""`` if none came within ``timeout``
        or the program has exited (then ``exit_code`` is set)."""
        with self._lock:
            if self._pending:
                chunk, self._pending = self._pending, b""
                return chunk
            chunk = self._h.read(timeout)
        if self._h.status is not None:
            self._release()
        return chunk or b""

    def read_until(self, marker: bytes | str, timeout: float = 30.0) -> bytes:
        """Everything up to and including ``marker`` (what follows stays for the next
        read); AgentError if it does not appear within ``timeout`` seconds or the
        program exits first."""
        return read_until(
            self.read, lambda: self.exit_code is not None, self._unread, marker, timeout
        )

    def _unread(self, data: bytes) -> None:
        with self._lock:
            self._pending = data + self._pending

    def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size; the foreground program gets SIGWINCH."""
        check_size(cols, rows)
        if self.exit_code is None:
            self._h.resize(cols, rows)
        self.cols, self.rows = cols, rows

    def kill(self, signo: int = signal.SIGKILL) -> None:
        """Send ``signo`` to the program's process group (SIGHUP: also its foreground job)."""
        if self.exit_code is None:
            self._h.signal(signo)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the program to exit (output not read is discarded); its exit code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.exit_code is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise AgentError(
                    f"pty program {self.pid} still running after {timeout:g} s", step="pty"
                )
            self.read(left)
        code = self.exit_code
        assert code is not None
        return code

    def close(self) -> None:
        """Hang the terminal up (SIGHUP) if the program still runs, and let go of it."""
        with contextlib.suppress(AgentError):
            self.kill(signal.SIGHUP)
        self._release()

    def _release(self) -> None:
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.__exit__(None, None, None)

    def echo_round_trips(self, n: int = 100) -> list[float]:
        """Benchmark (not used by torpor): seconds from sending one keystroke to seeing
        its echo, ``n`` times. Run it on an idle prompt (e.g. ``cat``); the caller
        reads the p50 (docs/sandbox.md has the numbers measured)."""
        samples = []
        for i in range(n):
            key = b"abcdefghijklmnopqrstuvwxyz"[i % 26 : i % 26 + 1]
            t0 = time.perf_counter()
            self.write(key)
            self.read_until(key, timeout=30)
            samples.append(time.perf_counter() - t0)
        return samples

    def __enter__(self) -> Pty:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
