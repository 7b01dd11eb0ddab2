"""``sb.pty()`` through a server: :class:`RemotePty` over the PTY WebSocket.

The same methods as :class:`torpor.sandbox.pty.Pty` (``write``, ``read``,
``read_until``, ``resize``, ``wait``, ``close``, ``exit_code``), over
``GET /v1/sandboxes/{ref}/pty`` (docs/api.md): binary frames are terminal bytes both
ways, a text frame ``{"resize": [cols, rows]}`` resizes, and the server ends with
``{"exit": code}``; its first frame is ``{"pid": N}``, the program's guest pid
(``pid``, as on a local Pty).  Closing the WebSocket hangs the terminal up (SIGHUP), as closing
a local Pty does.

Invariants: every failure is a TorporError (a refused upgrade is mapped like any
problem-details answer); ``read`` returns ``b""`` once the program ended, with
``exit_code`` set; one reader at a time (a lock), so chunks stay in order.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlencode

from torpor import errors as E
from torpor.client import _wire as W


def _ws_url(http_url: str, path: str, query: dict[str, str]) -> str:
    scheme = "wss" if http_url.startswith("https://") else "ws"
    return f"{scheme}://{http_url.split('://', 1)[1]}{path}?{urlencode(query)}"


def _ws_args(
    url: str, token: str | None, ref: str, cmd: str, cols: int, rows: int
) -> dict[str, Any]:
    """``connect()`` arguments of a sandbox's PTY WebSocket (the sync and async clients')."""
    path = f"/v1/sandboxes/{W.seg(ref)}/pty"
    return {
        "uri": _ws_url(url, path, {"cmd": cmd, "cols": str(cols), "rows": str(rows)}),
        "additional_headers": {"Authorization": f"Bearer {token}"} if token else {},
        "max_size": 16 * 1024 * 1024,
        "open_timeout": 60,
    }


def _refused(e: Any) -> E.TorporError:
    """A refused upgrade (``InvalidStatus``) as the typed error its problem body names."""
    r = e.response
    try:
        body: Any = json.loads(bytes(r.body or b""))
    except ValueError:
        body = bytes(r.body or b"").decode("utf-8", "replace")
    return W.error_from(r.status_code, body, r.reason_phrase)


def _cmd_text(cmd: str | Iterable[str]) -> str:
    """The route takes one string (a word runs as a program, more go through sh -c)."""
    if isinstance(cmd, str):
        return cmd
    argv = [str(a) for a in cmd]
    if not argv or not argv[0]:
        raise E.UsageError("empty command")
    return argv[0] if len(argv) == 1 else " ".join(shlex.quote(a) for a in argv)


def _control(text: str, exit_code: int | None) -> int | None:
    """A text frame from the server: ``{"exit": code}`` (the new exit code) or
    ``{"error": problem}`` (raised); anything else is ignored."""
    try:
        d = json.loads(text)
    except ValueError:
        return exit_code
    if isinstance(d, dict) and "exit" in d:
        code = d["exit"]
        return int(code) if isinstance(code, int) and not isinstance(code, bool) else -1
    if isinstance(d, dict) and "error" in d:
        err = d["error"]
        status = int(err.get("status", 500)) if isinstance(err, dict) else 400
        raise W.error_from(status, err if isinstance(err, dict) else {"detail": str(err)})
    return exit_code


#: How long a new terminal waits for the server's first frame (its ``{"pid"}``).
FIRST_FRAME_TIMEOUT = 60.0


def _pid_frame(text: str) -> int | None:
    """The pid of the server's ``{"pid": N}`` frame; None for another text frame.  A
    pid that is not a plausible guest pid is a ProtocolError (a hostile server)."""
    try:
        d = json.loads(text)
    except ValueError:
        return None
    if not isinstance(d, dict) or "pid" not in d:
        return None
    pid = d["pid"]
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 31:
        raise E.ProtocolError(f"the server sent a terminal pid that is not a pid: {pid!r}")
    return pid


def _no_first_frame() -> E.AgentError:
    return E.AgentError(
        f"the server did not start the terminal within {FIRST_FRAME_TIMEOUT:g} s", step="pty"
    )


class RemotePty:
    """A program on a terminal in a sandbox on a server (what ``sb.pty()`` returns)."""

    def __init__(self, url: str, token: str | None, ref: str, cmd: str, cols: int, rows: int):
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        from torpor.sandbox.pty import check_size

        check_size(cols, rows)
        try:
            self._ws = connect(**_ws_args(url, token, ref, cmd, cols, rows))
        except InvalidStatus as e:
            raise _refused(e) from e
        except (InvalidHandshake, OSError, TimeoutError) as e:
            raise W.unreachable(url, e) from e
        self._lock = threading.Lock()
        self._pending = b""
        self._exit: int | None = None
        self._closed = False
        self.pid = 0  # until the server's first frame says
        self.cols, self.rows = cols, rows
        try:
            self._first_frame()
        except BaseException:
            self._ws.close()
            raise

    def _first_frame(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            msg = self._ws.recv(timeout=FIRST_FRAME_TIMEOUT)
        except TimeoutError:
            raise _no_first_frame() from None
        except ConnectionClosed:
            self._closed = True  # reads say so
            return
        if isinstance(msg, bytes):
            self._pending = msg  # a server that sends no pid: output first
        elif (pid := _pid_frame(msg)) is not None:
            self.pid = pid
        else:
            self._control(msg)

    def __repr__(self) -> str:
        state = "running" if self._exit is None else f"exited {self._exit}"
        return f"RemotePty({self.cols}x{self.rows}, {state})"

    @property
    def exit_code(self) -> int | None:
        return self._exit

    def write(self, data: bytes | str) -> None:
        if self._exit is not None or self._closed:
            return  # like typing into a closed terminal window
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):  # ended: the next read says how
            self._ws.send(data.encode() if isinstance(data, str) else bytes(data))

    def read(self, timeout: float | None = None) -> bytes:
        from websockets.exceptions import ConnectionClosed

        with self._lock:
            if self._pending:
                chunk, self._pending = self._pending, b""
                return chunk
            if self._exit is not None or self._closed:
                return b""
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    msg = self._ws.recv(timeout=left)
                except TimeoutError:
                    return b""
                except ConnectionClosed:
                    self._closed = True
                    return b""
                if isinstance(msg, bytes):
                    return msg
                self._control(msg)
                if self._exit is not None:
                    return b""

    def _control(self, text: str) -> None:
        self._exit = _control(text, self._exit)

    def read_until(self, marker: bytes | str, timeout: float = 30.0) -> bytes:
        from torpor.sandbox.pty import read_until

        return read_until(
            self.read, lambda: self._exit is not None or self._closed, self._unread, marker, timeout
        )

    def _unread(self, data: bytes) -> None:
        with self._lock:
            self._pending = data + self._pending

    def resize(self, cols: int, rows: int) -> None:
        from torpor.sandbox.pty import check_size

        check_size(cols, rows)
        if self._exit is None and not self._closed:
            from websockets.exceptions import ConnectionClosed

            with contextlib.suppress(ConnectionClosed):
                self._ws.send(json.dumps({"resize": [cols, rows]}))
        self.cols, self.rows = cols, rows

    def kill(self, signo: int = signal.SIGHUP) -> None:
        """SIGHUP (hang up) is what the API offers: it closes the terminal."""
        if signo != signal.SIGHUP:
            raise E.NotSupportedError(
                "through a server a terminal can only be hung up (SIGHUP, close()); "
                "end a process with sb.commands.kill(pid)"
            )
        self.close()

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._exit is None:
            if self._closed:
                raise E.AgentError("the terminal's connection ended without an exit code")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise E.AgentError(f"pty program still running after {timeout:g} s", step="pty")
            self.read(left)
        return self._exit

    def close(self) -> None:
        self._closed = True
        self._ws.close()

    def __enter__(self) -> RemotePty:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TTYHandle:
    """:class:`RemotePty` as the handle :func:`torpor.cli.tty.interact` drives."""

    def __init__(self, p: RemotePty):
        self.p = p

    def write_stdin(self, data: bytes) -> None:
        self.p.write(data)

    def resize(self, cols: int, rows: int) -> None:
        self.p.resize(cols, rows)

    def events(self) -> Iterator[tuple[None, bytes]]:
        while chunk := self.p.read(None):
            yield None, chunk

    def wait(self) -> Any:
        class _Status:
            code = self.p.wait()

        return _Status


class AsyncRemotePty:
    """Awaitable :class:`RemotePty` (``websockets.asyncio``): ``await sb.pty()``."""

    def __init__(self, ws: Any, cols: int, rows: int):
        self._ws = ws
        self._pending = b""
        self._exit: int | None = None
        self._closed = False
        self._lock: Any = None
        self.pid = 0  # until the server's first frame says (open())
        self.cols, self.rows = cols, rows

    @classmethod
    async def open(
        cls, url: str, token: str | None, ref: str, cmd: str, cols: int, rows: int
    ) -> AsyncRemotePty:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidStatus

        from torpor.sandbox.pty import check_size

        check_size(cols, rows)
        try:
            ws = await connect(**_ws_args(url, token, ref, cmd, cols, rows))
        except InvalidStatus as e:
            raise _refused(e) from e
        except (InvalidHandshake, OSError, TimeoutError) as e:
            raise W.unreachable(url, e) from e
        p = cls(ws, cols, rows)
        try:
            await p._first_frame()
        except BaseException:
            await ws.close()
            raise
        return p

    async def _first_frame(self) -> None:
        import asyncio

        from websockets.exceptions import ConnectionClosed

        try:
            msg = await asyncio.wait_for(self._ws.recv(), FIRST_FRAME_TIMEOUT)
        except TimeoutError:
            raise _no_first_frame() from None
        except ConnectionClosed:
            self._closed = True
            return
        if isinstance(msg, bytes):
            self._pending = msg
        elif (pid := _pid_frame(msg)) is not None:
            self.pid = pid
        else:
            self._exit = _control(msg, self._exit)

    @property
    def exit_code(self) -> int | None:
        return self._exit

    async def write(self, data: bytes | str) -> None:
        from websockets.exceptions import ConnectionClosed

        if self._exit is not None or self._closed:
            return
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(data.encode() if isinstance(data, str) else bytes(data))

    async def read(self, timeout: float | None = None) -> bytes:
        import asyncio

        from websockets.exceptions import ConnectionClosed

        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._pending:
                chunk, self._pending = self._pending, b""
                return chunk
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._exit is None and not self._closed:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    msg = await asyncio.wait_for(self._ws.recv(), left)
                except TimeoutError:
                    return b""
                except ConnectionClosed:
                    self._closed = True
                    return b""
                if isinstance(msg, bytes):
                    return msg
                self._exit = _control(msg, self._exit)
            return b""

    async def read_until(self, marker: bytes | str, timeout: float = 30.0) -> bytes:
        want = marker.encode() if isinstance(marker, str) else marker
        deadline = time.monotonic() + timeout
        got = b""
        while want not in got:
            left = deadline - time.monotonic()
            if left <= 0 or self._exit is not None or self._closed:
                raise E.AgentError(
                    f"terminal output did not show {want!r}; last bytes: {got[-200:]!r}",
                    step="pty",
                )
            got += await self.read(left)
        end = got.index(want) + len(want)
        self._pending = got[end:] + self._pending
        return got[:end]

    async def resize(self, cols: int, rows: int) -> None:
        from websockets.exceptions import ConnectionClosed

        from torpor.sandbox.pty import check_size

        check_size(cols, rows)
        if self._exit is None and not self._closed:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(json.dumps({"resize": [cols, rows]}))
        self.cols, self.rows = cols, rows

    async def kill(self, signo: int = signal.SIGHUP) -> None:
        if signo != signal.SIGHUP:
            raise E.NotSupportedError("through a server a terminal can only be hung up (SIGHUP)")
        await self.close()

    async def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._exit is None:
            if self._closed:
                raise E.AgentError("the terminal's connection ended without an exit code")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise E.AgentError(f"pty program still running after {timeout:g} s", step="pty")
            await self.read(left)
        return self._exit

    async def close(self) -> None:
        self._closed = True
        await self._ws.close()

    async def __aenter__(self) -> AsyncRemotePty:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
