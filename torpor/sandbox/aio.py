"""``torpor.aio.Sandbox``: the :class:`torpor.sandbox.Sandbox` API, awaitable.

A first step, by design: every call runs the synchronous implementation in a
worker thread (``asyncio.to_thread``).  That is sound because the sync Sandbox is
thread-safe (its AgentClient has one reader thread and a send lock; the cached
connection is made under a lock), and it keeps one implementation of every rule.
Callbacks (``on_stdout``/``on_stderr``) are called from the worker thread.
A background command's handle is an :class:`AsyncCommandHandle`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from torpor.paths import Paths
from torpor.sandbox import core
from torpor.sandbox.files import EntryInfo, Files
from torpor.sandbox.process import CommandHandle, CommandResult
from torpor.sandbox.pty import Pty


class AsyncCommandHandle:
    def __init__(self, h: CommandHandle):
        self._h = h
        self.pid = h.pid
        self.command = h.command

    @property
    def exit_code(self) -> int | None:
        return self._h.exit_code

    async def kill(self) -> None:
        await asyncio.to_thread(self._h.kill)

    async def signal(self, signo: int) -> None:
        await asyncio.to_thread(self._h.signal, signo)

    async def send_stdin(self, data: bytes | str) -> None:
        await asyncio.to_thread(self._h.send_stdin, data)

    async def close_stdin(self) -> None:
        await asyncio.to_thread(self._h.close_stdin)

    async def wait(self, timeout: float | None = None, **kw: Any) -> CommandResult:
        return await asyncio.to_thread(self._h.wait, timeout, **kw)

    async def output(self, timeout: float | None = None) -> AsyncIterator[tuple[str, bytes]]:
        """``("stdout"|"stderr", chunk)`` as the command writes, until it exits."""
        it = self._h.output(timeout)
        end = object()
        while (item := await asyncio.to_thread(next, it, end)) is not end:
            yield item  # type: ignore[misc]


class AsyncCommands:
    """``sb.commands`` awaitable: E2B's names for the command calls."""

    def __init__(self, commands: core.Commands):
        self._c = commands

    async def run(self, cmd: str | Iterable[str], **kw: Any) -> Any:
        r = await asyncio.to_thread(lambda: self._c.run(cmd, **kw))
        return AsyncCommandHandle(r) if isinstance(r, CommandHandle) else r

    def list(self) -> list[AsyncCommandHandle]:
        return [AsyncCommandHandle(p) for p in self._c.list()]

    async def connect(self, pid: int) -> AsyncCommandHandle:
        """Reconnect to command ``pid`` (see ``torpor.sandbox.core.Commands.connect``)."""
        return AsyncCommandHandle(await asyncio.to_thread(self._c.connect, pid))

    async def kill(self, pid: int) -> bool:
        return await asyncio.to_thread(self._c.kill, pid)


class AsyncPty:
    """Awaitable twin of :class:`torpor.sandbox.pty.Pty`."""

    def __init__(self, p: Pty):
        self._p = p
        self.pid = p.pid

    @property
    def sync(self) -> Pty:
        return self._p

    @property
    def exit_code(self) -> int | None:
        return self._p.exit_code

    @property
    def cols(self) -> int:
        return self._p.cols

    @property
    def rows(self) -> int:
        return self._p.rows

    async def write(self, data: bytes | str) -> None:
        await asyncio.to_thread(self._p.write, data)

    async def read(self, timeout: float | None = None) -> bytes:
        return await asyncio.to_thread(self._p.read, timeout)

    async def read_until(self, marker: bytes | str, timeout: float = 30.0) -> bytes:
        return await asyncio.to_thread(self._p.read_until, marker, timeout)

    async def resize(self, cols: int, rows: int) -> None:
        await asyncio.to_thread(self._p.resize, cols, rows)

    async def kill(self, signo: int = 9) -> None:
        await asyncio.to_thread(self._p.kill, signo)

    async def wait(self, timeout: float | None = None) -> int:
        return await asyncio.to_thread(self._p.wait, timeout)

    async def close(self) -> None:
        await asyncio.to_thread(self._p.close)

    async def __aenter__(self) -> AsyncPty:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncFiles:
    def __init__(self, files: Files):
        self._f = files

    async def read(self, path: str, format: str = "text") -> str | bytes:
        return await asyncio.to_thread(self._f.read, path, format)

    async def write(self, path: str, data: str | bytes, mode: int = 0o644) -> EntryInfo:
        return await asyncio.to_thread(self._f.write, path, data, mode)

    async def list(self, path: str) -> list[EntryInfo]:
        return await asyncio.to_thread(self._f.list, path)

    async def get_info(self, path: str) -> EntryInfo:
        return await asyncio.to_thread(self._f.get_info, path)

    async def exists(self, path: str) -> bool:
        return await asyncio.to_thread(self._f.exists, path)

    async def make_dir(self, path: str, mode: int = 0o755) -> bool:
        return await asyncio.to_thread(self._f.make_dir, path, mode)

    async def remove(self, path: str) -> None:
        await asyncio.to_thread(self._f.remove, path)

    async def rename(self, old: str, new: str) -> EntryInfo:
        return await asyncio.to_thread(self._f.rename, old, new)


class Sandbox:
    """Awaitable twin of :class:`torpor.sandbox.Sandbox` (same names, same errors)."""

    def __init__(self, sync: core.Sandbox):
        self._sb = sync
        self.id = sync.id
        self.name = sync.name
        self.files = AsyncFiles(sync.files)
        self.commands = AsyncCommands(sync.commands)

    def __repr__(self) -> str:
        return f"aio.{self._sb!r}"

    @property
    def sync(self) -> core.Sandbox:
        """The synchronous Sandbox underneath."""
        return self._sb

    @classmethod
    async def create(cls, image: str = "tools:latest", **kw: Any) -> Sandbox:
        return cls(await asyncio.to_thread(lambda: core.Sandbox.create(image, **kw)))

    @classmethod
    async def connect(cls, sandbox_id: str, *, paths: Paths | None = None) -> Sandbox:
        return cls(await asyncio.to_thread(core.Sandbox.connect, sandbox_id, paths=paths))

    @classmethod
    async def list(
        cls, labels: Mapping[str, str] | None = None, **kw: Any
    ) -> list[core.SandboxInfo]:
        return await asyncio.to_thread(lambda: core.Sandbox.list(labels, **kw))

    @classmethod
    async def get_info(cls, sandbox_id: str, *, paths: Paths | None = None) -> core.SandboxInfo:
        return await asyncio.to_thread(core.Sandbox.get_info, sandbox_id, paths=paths)

    @classmethod
    async def restore(cls, snap: core.Snapshot | str, **kw: Any) -> Sandbox:
        return cls(await asyncio.to_thread(lambda: core.Sandbox.restore(snap, **kw)))

    async def exec(self, cmd: str | Iterable[str], **kw: Any) -> Any:
        r = await asyncio.to_thread(lambda: self._sb.exec(cmd, **kw))
        return AsyncCommandHandle(r) if isinstance(r, CommandHandle) else r

    def processes(self) -> list[AsyncCommandHandle]:
        return [AsyncCommandHandle(p) for p in self._sb.processes()]

    async def ps(self) -> list[core.ProcessInfo]:
        return await asyncio.to_thread(self._sb.ps)

    async def pty(
        self, cmd: str | Iterable[str] = "sh", cols: int = 80, rows: int = 24, **kw: Any
    ) -> AsyncPty:
        return AsyncPty(await asyncio.to_thread(lambda: self._sb.pty(cmd, cols, rows, **kw)))

    async def snapshot(self, tag: str | None = None) -> core.Snapshot:
        return await asyncio.to_thread(self._sb.snapshot, tag)

    async def fork(self, n: int = 1) -> list[Sandbox]:
        return [Sandbox(s) for s in await asyncio.to_thread(self._sb.fork, n)]

    async def hibernate(self) -> core.Snapshot:
        return await asyncio.to_thread(self._sb.hibernate)

    async def wake(self) -> None:
        await asyncio.to_thread(self._sb.wake)

    async def info(self) -> core.SandboxInfo:
        return await asyncio.to_thread(self._sb.info)

    async def is_running(self) -> bool:
        return await asyncio.to_thread(self._sb.is_running)

    async def set_timeout(self, timeout: float | None) -> None:
        await asyncio.to_thread(self._sb.set_timeout, timeout)

    async def kill(self) -> None:
        await asyncio.to_thread(self._sb.kill)

    async def close(self) -> None:
        await asyncio.to_thread(self._sb.close)

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self._sb.__exit__, *exc)
