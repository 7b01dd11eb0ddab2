"""``torpor.aio``: torpor's awaitable API — ``Sandbox`` and ``Session``.

``Sandbox`` is :mod:`torpor.sandbox.aio`.  ``Session`` is the awaitable twin of
:class:`torpor.session.Session` (the context log as an API: ``append``,
``checkpoint``, ``entries``, ``fork``, ``recover``, ``send``, ``hibernate``,
``wake``, ``sandbox``), built like the Sandbox's: the sync implementation does the
work in a thread, so there is one implementation of every rule.

Invariants of ``Session``:

- Every call of one ``aio.Session`` object runs on that object's own worker thread
  (a one-thread executor), in the order the calls were made.  The sync Session
  keeps a read cache of its log and turn counters that two threads must not use at
  once; with one worker, ``asyncio.gather(s.append(...), s.entries())`` is safe.
  Sessions from ``fork`` / ``open`` / ``list`` get workers of their own, so a long
  ``send`` on one never delays another session.
- Cancelling an await does not stop the call already running in the worker (a turn
  still runs to its checkpoint, as if its caller had crashed): what it wrote is
  durable, its result is dropped.  Calls not yet started are not run.
- The sync properties that do I/O keep their names and become awaitable:
  ``await s.sandbox`` (an :class:`torpor.aio.Sandbox`), ``await s.checkpoints``.
- ``torpor.session`` is imported on first use, so ``from torpor.aio import Sandbox``
  does not load the session, model or context layers.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from torpor.paths import Paths
from torpor.sandbox.aio import AsyncCommandHandle, AsyncFiles, AsyncPty, Sandbox

if TYPE_CHECKING:
    from torpor.client.aio import Client  # at run time: __getattr__ below (lazy)
    from torpor.context import Entry
    from torpor.session import Checkpoint, SessionState
    from torpor.session import Session as SyncSession

__all__ = ["AsyncCommandHandle", "AsyncFiles", "AsyncPty", "Client", "Sandbox", "Session"]

R = TypeVar("R")


def _sync_session() -> type[SyncSession]:
    from torpor.session import Session as SyncSession

    return SyncSession


async def _in_thread(fn: Callable[..., R], *args: Any, **kw: Any) -> R:
    """A call that has no Session object yet (create, open): any worker thread."""
    return await asyncio.to_thread(fn, *args, **kw)


class Session:
    """Awaitable twin of :class:`torpor.session.Session` (same names, same errors).

    Get one with ``await Session.create(...)``, ``open``, ``resume`` or ``list``, or
    wrap a sync one: ``aio.Session(sync_session)``; ``.sync`` gives it back.
    """

    def __init__(self, sync: SyncSession):
        self._s = sync
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torpor-session")

    def __repr__(self) -> str:
        return f"aio.Session(id={self._s.id[:12]!r}, name={self._s.name!r})"

    @property
    def sync(self) -> SyncSession:
        """The synchronous Session underneath (use it only from one thread at a time)."""
        return self._s

    @property
    def id(self) -> str:
        return self._s.id

    @property
    def name(self) -> str:
        return self._s.name

    @property
    def paths(self) -> Paths:
        return self._s.paths

    def _run(self, fn: Callable[..., R], *args: Any, **kw: Any) -> Awaitable[R]:
        """Queue ``fn`` on this session's worker (see the module docstring)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._worker, functools.partial(fn, *args, **kw))

    # -- opening ---------------------------------------------------------------------
    @classmethod
    async def create(
        cls, image: str = "tools:latest", model: Any = "scripted:demo", **kw: Any
    ) -> Session:
        """``Session.create`` (a new log, a VM booted from ``image``, checkpoint 0)."""
        return cls(await _in_thread(_sync_session().create, image, model, **kw))

    @classmethod
    async def open(cls, ref: str, **kw: Any) -> Session:
        return cls(await _in_thread(_sync_session().open, ref, **kw))

    @classmethod
    async def resume(cls, ref: str, **kw: Any) -> Session:
        """Open session ``ref`` and make sure its VM runs (waking it if hibernated)."""
        return cls(await _in_thread(_sync_session().resume, ref, **kw))

    @classmethod
    async def list(cls, **kw: Any) -> list[Session]:
        return [cls(s) for s in await _in_thread(_sync_session().list, **kw)]

    async def close(self) -> None:
        """Close the session's log connection and end its worker (after queued calls)."""
        try:
            await self._run(self._s.close)
        finally:
            self._worker.shutdown(wait=False)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the log as an API -----------------------------------------------------------
    async def append(self, kind: Any, payload: dict[str, Any], *, key: str | None = None) -> Entry:
        """Append an entry, durable before the await returns; idempotent by ``key``."""
        return await self._run(self._s.append, kind, payload, key=key)

    async def checkpoint(self, reason: str = "user") -> Checkpoint:
        """A checkpoint pair (VM snapshot + log entry) at the current log position."""
        return await self._run(self._s.checkpoint, reason)

    async def entries(self, after: int = 0, limit: int | None = None) -> list[Entry]:
        return await self._run(self._s.entries, after, limit)

    async def log(self, after: int = 0) -> list[Entry]:
        return await self._run(self._s.log, after)

    async def state(self) -> SessionState:
        return await self._run(self._s.state)

    async def messages(self) -> list[dict[str, Any]]:
        return await self._run(self._s.messages)

    async def status(self) -> str:
        return await self._run(self._s.status)

    @property
    def checkpoints(self) -> Awaitable[list[Checkpoint]]:
        """``await s.checkpoints``: the session's checkpoints, oldest first."""
        return self._run(lambda: self._s.checkpoints)

    @property
    def sandbox(self) -> Awaitable[Sandbox]:
        """``await s.sandbox``: the session's VM as an :class:`torpor.aio.Sandbox`,
        running (woken or restored first, as for a turn)."""

        async def get() -> Sandbox:
            return Sandbox(await self._run(lambda: self._s.sandbox))

        return get()

    @property
    def tools(self) -> Sequence[Any]:
        return self._s.tools

    # -- doing -----------------------------------------------------------------------
    async def send(self, text: str, *, key: str | None = None, wait: bool = True) -> str:
        """One turn of torpor's own loop; returns the model's answer."""
        return await self._run(self._s.send, text, key=key, wait=wait)

    async def hibernate(self) -> Checkpoint:
        return await self._run(self._s.hibernate)

    async def wake(self) -> Any:
        return await self._run(self._s.wake)

    async def recover(self, *, replay: bool = True, wait: bool = True) -> str | None:
        return await self._run(self._s.recover, replay=replay, wait=wait)

    async def fork(self, at: Any = None, name: str | None = None) -> Session:
        """A new session sharing this log up to checkpoint ``at`` (its own worker)."""
        return Session(await self._run(self._s.fork, at, name))

    async def remove(self, reason: str = "removed by the user") -> list[str]:
        return await self._run(self._s.remove, reason)


def __getattr__(name: str) -> Any:
    # the awaitable remote client (torpor.client.aio): imported on first use, so
    # ``from torpor.aio import Sandbox`` does not load httpx
    if name == "Client":
        from torpor.client.aio import Client

        return Client
    raise AttributeError(f"module 'torpor.aio' has no attribute {name!r}")
