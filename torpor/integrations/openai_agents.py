"""The OpenAI Agents SDK on torpor: durable history and a durable machine.

Three parts, all built on the public log API of :class:`torpor.session.Session`:

- :class:`TorporSession` implements the SDK's session protocol
  (``agents.memory.Session``: ``get_items``, ``add_items``, ``pop_item``,
  ``clear_session``, all async) on the torpor context log.  Each item is a
  custom entry ``openai_agents.item`` ``{"item": ...}``; ``pop_item`` and
  ``clear_session`` append ``openai_agents.pop`` / ``openai_agents.clear``
  entries (the log is append-only), and the current list is a fold of the
  *effective* entries (superseded ones left out).
- :func:`sandbox_tools`: SDK function tools ``exec``, ``read_file``,
  ``write_file`` that run in the session's microVM (``s.sandbox``).
- :func:`run_durable` / :func:`run_durable_async` / :func:`run_durable_streamed`:
  ``Runner.run`` (sync, async, streamed) wrapped in a torpor turn: a ``user`` entry
  before the run, a checkpoint (VM snapshot + log position) after it.

Invariants:

- An item is durable before ``add_items`` returns (``Session.append``).
- Idempotency: an item's key is ``oa:<epoch>:<position>:<digest>`` — its
  position in the list, the seq of the last entry that shrank the list
  (``pop``, ``clear``, ``supersede``) and a digest of its JSON.  An
  ``add_items`` that failed (say the log's acknowledgement was lost) and is
  retried with the same items reuses the failed attempt's keys, so items that
  did reach the log are not appended twice.
- A run is a torpor turn: until its checkpoint the session counts as
  interrupted.  After a crash, the next :func:`run_durable` (or an explicit
  ``Session.recover(replay=False)``) restores the VM to the last checkpoint and
  supersedes the entries logged after it — the items of the interrupted run
  included — so the SDK's history and the machine describe the same moment
  again; the caller re-runs the interrupted input.
- The model's mistakes go back to the model, the machine's failures to the
  caller: a tool's failing command, timeout, missing file or bad path is the
  tool's *output*; a lost VM or broken agent connection raises out of the run.
- Everything the guest returns is bounded before it reaches the log or the model
  (``max_output`` bytes per stream, ``max_read`` bytes per file).
- One run at a time per torpor session: :func:`run_durable` holds a flock for the
  whole run, so a second worker gets ConflictError instead of taking a live run for a
  crashed one (and restoring its VM under it); a dead worker's lock is free at once.
  Calls on one torpor Session object are serialized by a lock (the SDK calls the
  session and the tools from worker threads).

The ``agents`` package is imported here only: ``import torpor`` never needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import threading
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from torpor.context import Entry, Kind, effective
from torpor.errors import (
    AgentError,
    ConflictError,
    ExecTimeoutError,
    NotFoundError,
    SetupError,
    TorporError,
    UsageError,
)
from torpor.fsutil import locked
from torpor.paths import Paths
from torpor.session import Session, SessionError
from torpor.vmm.state import Status

try:
    from agents import FunctionTool, ModelBehaviorError, Runner, function_tool
    from agents.memory import SessionSettings
    from agents.tool import default_tool_error_function
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise SetupError(
        "torpor.integrations.openai_agents needs the OpenAI Agents SDK: "
        "pip install 'torpor[integrations]' (or openai-agents)"
    ) from e

if TYPE_CHECKING:
    from agents import Agent, RunResult, RunResultStreaming

    from torpor.sandbox import Sandbox

__all__ = [
    "CHECKPOINT_REASON",
    "CLEAR_KIND",
    "ITEM_KIND",
    "POP_KIND",
    "RUN_KIND",
    "TorporSession",
    "run_durable",
    "run_durable_async",
    "run_durable_streamed",
    "sandbox_tools",
]

ITEM_KIND = "openai_agents.item"
POP_KIND = "openai_agents.pop"
CLEAR_KIND = "openai_agents.clear"
#: Logged when a run starts (after any recovery): a crash in the run then always
#: leaves work after the recovery, so the next run knows to restore the VM again.
RUN_KIND = "openai_agents.run"
CHECKPOINT_REASON = "openai-agents run"
#: Longest input text kept in the ``user`` entry of a run (the items hold it all).
MAX_INPUT_TEXT = 4000
#: Default bytes of each output stream / of a file a tool hands to the model.
DEFAULT_MAX_OUTPUT = 32 * 1024
DEFAULT_MAX_READ = 256 * 1024
#: Longest a tool's command may run (seconds); the model may ask for less.
DEFAULT_TOOL_TIMEOUT = 60.0
MAX_TOOL_TIMEOUT = 3600.0

# one lock per torpor Session object: a Session's log cache is not thread-safe, and the
# SDK calls the session and the tools from worker threads
_locks: weakref.WeakKeyDictionary[Session, threading.RLock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def _lock_for(s: Session) -> threading.RLock:
    with _locks_guard:
        lock = _locks.get(s)
        if lock is None:
            lock = _locks[s] = threading.RLock()
        return lock


def _canonical(item: Any) -> str:
    try:
        return json.dumps(item, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UsageError(f"an openai-agents item is not JSON-serialisable: {e}") from e


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _custom(e: Entry) -> tuple[str, dict[str, Any]] | None:
    """(type, data) of one of our custom entries, None for anything else."""
    if e.kind is not Kind.CUSTOM or not isinstance(e.payload, dict):
        return None
    t, d = e.payload.get("type"), e.payload.get("data")
    if not isinstance(t, str) or not t.startswith("openai_agents.") or not isinstance(d, dict):
        return None
    return t, d


def _apply(items: list[tuple[int, Any]], entries: Iterable[Entry]) -> int:
    """Fold effective ``entries`` into ``items`` (in place); returns the seq of the last
    entry among them that shrank the list (0 if none)."""
    shrank = 0
    for e in entries:
        if e.kind is Kind.SUPERSEDE:
            shrank = e.seq
            continue
        c = _custom(e)
        if c is None:
            continue
        t, d = c
        if t == ITEM_KIND and "item" in d:
            items.append((e.seq, d["item"]))
        elif t == POP_KIND:
            shrank = e.seq
            for i in range(len(items) - 1, -1, -1):
                if items[i][0] == d.get("seq"):
                    del items[i]
                    break
        elif t == CLEAR_KIND:
            shrank = e.seq
            upto = d.get("upto")
            if isinstance(upto, int):
                items[:] = [x for x in items if x[0] > upto]
    return shrank


def fold_items(entries: Sequence[Entry]) -> list[tuple[int, Any]]:
    """``(seq, item)`` of the SDK items the log describes now, oldest first."""
    items: list[tuple[int, Any]] = []
    _apply(items, effective(entries))
    return items


def _epoch(entries: Sequence[Entry]) -> int:
    """Seq of the last entry that shrank the item list (a pop, a clear, or a supersede
    marker, effective or not): item positions restart after it."""
    last = 0
    for e in entries:
        if e.kind is Kind.SUPERSEDE:
            last = e.seq
        else:
            c = _custom(e)
            if c is not None and c[0] in (POP_KIND, CLEAR_KIND):
                last = e.seq
    return last


def _copy(value: Any) -> Any:
    """A deep copy of JSON data read from the log (orjson: ~10x deepcopy's speed)."""
    try:
        return orjson.loads(orjson.dumps(value))
    except (orjson.JSONEncodeError, TypeError):  # an int beyond 64 bits, say
        return copy.deepcopy(value)


class _ItemView:
    """:func:`fold_items` and :func:`_epoch` of a log that only grows, in O(new entries)
    per call.  Only a ``supersede`` marker changes what earlier entries mean: new
    entries holding one, or a log that is not the one seen before, make it fold
    everything again, so the answers always equal the from-scratch functions'."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.n, self.last_seq, self.epoch = 0, 0, 0
        self.items: list[tuple[int, Any]] = []

    def update(self, entries: Sequence[Entry]) -> tuple[list[tuple[int, Any]], int]:
        if len(entries) < self.n or (self.n and entries[self.n - 1].seq != self.last_seq):
            self._reset()
        new = entries[self.n :]
        if any(e.kind is Kind.SUPERSEDE for e in new):
            self.items, self.epoch = fold_items(entries), _epoch(entries)
        else:  # nothing new can un-supersede or supersede: the old fold stands
            self.epoch = _apply(self.items, new) or self.epoch
        self.n = len(entries)
        self.last_seq = entries[-1].seq if entries else 0
        return self.items, self.epoch


def _input_text(input: Any) -> str:
    """The text of a run's ``user`` entry: the input string, or a JSON rendering."""
    if isinstance(input, str):
        text = input
    else:
        try:
            text = json.dumps(input, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = repr(input)
    # as the log stores it (no NUL), so a re-run's input compares equal to the stored one
    text = text.replace("\x00", "\ufffd").strip() or "(empty input)"
    return text if len(text) <= MAX_INPUT_TEXT else text[:MAX_INPUT_TEXT] + " [...]"


class TorporSession:
    """The SDK's session protocol on a torpor session's context log.

    ``Runner.run(agent, input, session=TorporSession(s))`` keeps the history in the
    log; :func:`run_durable` also checkpoints the VM after each run.  The sync
    methods (:meth:`items`, :meth:`add`, :meth:`pop`, :meth:`clear`) do the same as
    the async protocol methods, for code outside an event loop.
    """

    session_settings: SessionSettings | None = None

    def __init__(
        self,
        session: Session,
        *,
        session_settings: SessionSettings | dict[str, Any] | None = None,
    ):
        if not isinstance(session, Session):
            raise UsageError(
                f"TorporSession wraps a torpor.session.Session, not {type(session).__name__}"
            )
        self.torpor = session
        self.session_id: str = session.id
        if isinstance(session_settings, dict):
            try:
                session_settings = SessionSettings(**session_settings)
            except (TypeError, ValueError) as e:
                raise UsageError(f"invalid session_settings: {e}") from e
        self.session_settings = session_settings or SessionSettings()
        self._lock = _lock_for(session)
        self._failed_add: tuple[list[str], list[str]] | None = None  # digests, keys
        self._view = _ItemView()

    def _items(self) -> tuple[list[tuple[int, Any]], int]:
        """The current ``(seq, item)`` list (shared: do not change) and the epoch."""
        return self._view.update(self.torpor.entries())

    def __repr__(self) -> str:
        return f"TorporSession({self.torpor.name!r})"

    # -- opening -------------------------------------------------------------------
    @classmethod
    def create(cls, image: str = "tools:latest", **kw: Any) -> TorporSession:
        """A new torpor session (VM booted from ``image``, checkpoint 0) wrapped.

        ``kw`` goes to :meth:`torpor.session.Session.create` (``name``, ``memory_mib``,
        ``network``, ``paths``, ``dsn`` ...).  The session's own model is never used:
        the SDK's agent talks to its model itself."""
        settings = kw.pop("session_settings", None)
        model = kw.pop("model", "scripted:demo")
        return cls(Session.create(image, model, **kw), session_settings=settings)

    @classmethod
    def open(
        cls,
        ref: str,
        *,
        paths: Paths | None = None,
        dsn: str | None = None,
        session_settings: SessionSettings | dict[str, Any] | None = None,
    ) -> TorporSession:
        """Reopen torpor session ``ref`` (id, id prefix or name); NotFoundError if none."""
        return cls(Session.open(ref, paths=paths, dsn=dsn), session_settings=session_settings)

    def close(self) -> None:
        self.torpor.close()

    def __enter__(self) -> TorporSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sync API --------------------------------------------------------------------
    def items(self, limit: int | None = None) -> list[Any]:
        """The history, oldest first; ``limit`` > 0: the latest ``limit`` items; 0: none;
        None: ``session_settings.limit`` (None: all)."""
        if limit is None and self.session_settings is not None:
            limit = self.session_settings.limit
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise UsageError(f"limit must be an int or None, not {limit!r}")
        with self._lock:
            # copies: the SDK may change what it gets, the log's cached entries must not
            items = _copy([item for _, item in self._items()[0]])
        if limit is None or limit < 0:  # negative: all, as SQLiteSession's LIMIT does
            return items
        return items[-limit:] if limit else []

    def add(self, items: Sequence[Any]) -> None:
        """Append ``items``, each durable before this returns (see the module docstring
        for the keys that make a retried add idempotent)."""
        if isinstance(items, str | bytes | dict) or not isinstance(items, Sequence):
            raise UsageError(f"add_items takes a list of items, not {type(items).__name__}")
        if not items:
            return
        texts = [_canonical(i) for i in items]
        digests = [_digest(t) for t in texts]
        with self._lock:
            failed = self._failed_add
            if failed is not None and failed[0] == digests:
                keys = failed[1]  # the same add again: what reached the log is not repeated
            else:
                current, epoch = self._items()
                pos = len(current)
                keys = [f"oa:{epoch}:{pos + i}:{d}" for i, d in enumerate(digests)]
            self._failed_add = (digests, keys)
            for text, key in zip(texts, keys, strict=True):
                self.torpor.append(ITEM_KIND, {"item": json.loads(text)}, key=key)
            self._failed_add = None

    def pop(self) -> Any | None:
        """Remove and return the latest item (None if there is none)."""
        with self._lock:
            items = self._items()[0]
            if not items:
                return None
            seq, item = items[-1]
            self.torpor.append(POP_KIND, {"seq": seq})
            return _copy(item)

    def clear(self) -> None:
        """Forget every item (the entries stay in the log, marked cleared)."""
        with self._lock:
            if self._items()[0]:
                self.torpor.append(CLEAR_KIND, {"upto": self.torpor.entries()[-1].seq})

    # -- the SDK's session protocol (async) -------------------------------------------
    async def get_items(self, limit: int | None = None) -> list[Any]:
        return await asyncio.to_thread(self.items, limit)

    async def add_items(self, items: list[Any]) -> None:
        await asyncio.to_thread(self.add, items)

    async def pop_item(self) -> Any | None:
        return await asyncio.to_thread(self.pop)

    async def clear_session(self) -> None:
        await asyncio.to_thread(self.clear)

    # -- runs ------------------------------------------------------------------------
    def begin_run(self, input: Any) -> Entry:
        """Open a run as a torpor turn; returns its ``user`` entry.

        An interrupted run (a ``user`` entry after the last checkpoint) is recovered
        first, unless ``recover(replay=False)`` already did and nothing ran since:
        the VM goes back to the last checkpoint and the items logged after it are
        superseded.  Re-running the interrupted input reuses its ``user`` entry.
        """
        text = _input_text(input)
        with self._lock:
            s = self.torpor
            pending = s.state().pending
            if pending is not None and not _recovered_since(s.entries(after=pending.seq)):
                s.recover(replay=False)
            if pending is not None and pending.payload.get("content") == text:
                user = pending
            else:
                user = s.append(Kind.USER, {"content": text})
            s.append(RUN_KIND, {"user": user.seq})
            return user

    def end_run(self, error: BaseException | None = None) -> Any:
        """Settle the run: log ``error`` if given, then checkpoint (VM + log position)."""
        with self._lock:
            if error is not None:
                self.torpor.append(
                    Kind.ERROR,
                    {
                        "stage": "openai-agents",
                        "type": type(error).__name__,
                        "error": str(error)[:MAX_INPUT_TEXT],
                    },
                )
            return self.torpor.checkpoint(reason=CHECKPOINT_REASON)


def _recovered_since(after_pending: Sequence[Entry]) -> bool:
    """The entries after an interrupted run's ``user`` entry end with a ``recover``
    restore of the VM (and its supersede marker): nothing ran since the recovery."""
    tail = list(after_pending)
    while tail and tail[-1].kind is Kind.SUPERSEDE:
        tail.pop()
    return bool(tail) and tail[-1].kind is Kind.VM and tail[-1].payload.get("reason") == "recover"


@contextlib.contextmanager
def _one_run(ts: TorporSession) -> Iterator[None]:
    """Hold the session's run lock for a whole run: a flock, so a worker that dies lets
    go of it with its last breath.  It tells a crashed run (lock free: recover it) from
    one still running in another worker (lock held: ConflictError, nothing touched)."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(
            locked(ts.torpor.paths.locks / f"openai-agents-run-{ts.session_id}.lock", wait=False)
        )
    except BlockingIOError:
        raise ConflictError(
            f"session {ts.torpor.name}: a run is in progress in another worker "
            "(one run at a time per session)"
        ) from None
    with stack:
        yield


def _as_session(session: TorporSession | Session) -> TorporSession:
    if isinstance(session, TorporSession):
        return session
    return TorporSession(session)


def run_durable(
    agent: Agent[Any], input: Any, *, session: TorporSession | Session, **kwargs: Any
) -> RunResult:
    """``Runner.run_sync(agent, input, session=session)`` as a durable torpor turn.

    Before the run: a pending (crashed) run is recovered and the input is logged as a
    ``user`` entry.  After it — also when it raised an ``Exception``, which is logged as
    an ``error`` entry and re-raised — the VM is checkpointed with the log, so history
    and machine are saved at the same moment.  ``kwargs`` go to ``Runner.run_sync``.
    """
    ts = _as_session(session)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:  # Runner.run_sync would refuse only after the turn was opened in the log
        raise UsageError("run_durable() cannot run inside an event loop: use run_durable_async()")
    with _one_run(ts):
        ts.begin_run(input)
        try:
            result = Runner.run_sync(agent, input, session=ts, **kwargs)
        except Exception as e:
            ts.end_run(error=e)
            raise
        ts.end_run()
        return result


async def run_durable_async(
    agent: Agent[Any], input: Any, *, session: TorporSession | Session, **kwargs: Any
) -> RunResult:
    """:func:`run_durable` for a running event loop (``Runner.run``)."""
    ts = _as_session(session)
    with _one_run(ts):
        await asyncio.to_thread(ts.begin_run, input)
        try:
            result = await Runner.run(agent, input, session=ts, **kwargs)
        except Exception as e:
            await asyncio.to_thread(ts.end_run, e)
            raise
        await asyncio.to_thread(ts.end_run)
        return result


@contextlib.asynccontextmanager
async def run_durable_streamed(
    agent: Agent[Any], input: Any, *, session: TorporSession | Session, **kwargs: Any
) -> AsyncIterator[RunResultStreaming]:
    """``Runner.run_streamed`` as a durable torpor turn::

        async with run_durable_streamed(agent, "...", session=ts) as result:
            async for event in result.stream_events():
                ...

    Leaving the block drains what the caller did not read (the run finishes), then
    checkpoints.  An exception from the stream (or the block) is logged and settled
    as in :func:`run_durable`; if it came from the block, the run is cancelled first,
    so the snapshot is not taken under a running tool.
    """
    ts = _as_session(session)
    with _one_run(ts):
        await asyncio.to_thread(ts.begin_run, input)
        result = Runner.run_streamed(agent, input, session=ts, **kwargs)
        try:
            yield result
            async for _ in result.stream_events():  # the rest: the run ends here
                pass
        except Exception as e:
            if not result.is_complete:
                result.cancel()
                with contextlib.suppress(Exception):
                    async for _ in result.stream_events():
                        pass
            await asyncio.to_thread(ts.end_run, e)
            raise
        await asyncio.to_thread(ts.end_run)


# -------------------------------------------------------------------- sandbox tools


class _Box:
    """The session's Sandbox, re-fetched when the session moved to another VM."""

    def __init__(self, s: Session):
        self.s = s
        self._lock = _lock_for(s)
        self._sb: Sandbox | None = None

    def get(self) -> Sandbox:
        with self._lock:
            vm = self.s.vm()
            if vm is None or vm.state.status not in (Status.RUNNING, Status.HIBERNATED):
                # s.sandbox would restore the last checkpoint and supersede this run's
                # items while the SDK goes on with them in memory: stop the run instead
                raise SessionError(
                    f"session {self.s.name}: its VM is gone mid-run; the run stops here "
                    "(the next run_durable, or recover(), restores the last checkpoint)"
                )
            if self._sb is None or self._sb.id != vm.id or vm.state.status != Status.RUNNING:
                if self._sb is not None:
                    self._sb.close()
                self._sb = self.s.sandbox  # woken if hibernated
            return self._sb


class _Head:
    """An output callback keeping the first ``limit`` bytes of a stream and counting
    the rest (the Sandbox's own ``max_output`` drops a whole chunk that does not fit,
    so a command printing one large chunk would show the model nothing)."""

    def __init__(self, limit: int):
        self.limit, self.size, self.dropped = limit, 0, 0
        self.parts: list[str] = []

    def __call__(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        room = self.limit - self.size
        if room >= len(data):
            self.parts.append(text)
            self.size += len(data)
            return
        if room > 0:
            self.parts.append(data[:room].decode("utf-8", "ignore"))
            self.size = self.limit
        self.dropped += len(data) - max(room, 0)

    def text(self) -> str:
        out = "".join(self.parts)
        return out + (f"\n[... {self.dropped} more bytes not shown]" if self.dropped else "")


def _on_tool_error(ctx: Any, error: Exception) -> str:
    """The SDK's failure hook: the model's mistakes (arguments that do not parse, say)
    go back to the model; torpor's errors (the machine failed) end the run."""
    if isinstance(error, TorporError):
        raise error
    if isinstance(error, ModelBehaviorError):  # its own arguments: safe and useful to show
        return f"error: {str(error)[:2000]}"
    return default_tool_error_function(ctx, error)


def _model_error(e: Exception, path: str | None = None) -> bool:
    """An error the model caused (bad path, missing file, refused request, timeout):
    its message goes back to the model.  Anything else is the machine's: raised."""
    from torpor.agent.client import AgentRequestError

    if isinstance(e, NotFoundError):  # the file asked for, not the sandbox itself
        return path is not None and e.path == path
    return isinstance(e, UsageError | AgentRequestError | ExecTimeoutError)


def sandbox_tools(
    session: TorporSession | Session,
    *,
    timeout: float = DEFAULT_TOOL_TIMEOUT,
    max_output: int = DEFAULT_MAX_OUTPUT,
    max_read: int = DEFAULT_MAX_READ,
) -> list[FunctionTool]:
    """Function tools ``exec``, ``read_file`` and ``write_file`` running in the
    session's microVM; give them to an ``Agent(tools=...)``.

    ``timeout``: the longest a command may run (the model may ask for less); on
    timeout the command's process group is killed and the model is told.
    ``max_output`` / ``max_read``: bytes of output per stream / of a file the model
    gets (the rest is counted, not shown).
    """
    if not (isinstance(timeout, int | float) and 0 < timeout <= MAX_TOOL_TIMEOUT):
        raise UsageError(f"timeout must be in (0, {MAX_TOOL_TIMEOUT:.0f}] seconds, not {timeout!r}")
    for name, v in (("max_output", max_output), ("max_read", max_read)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{name} must be a positive number of bytes, not {v!r}")
    box = _Box(_as_session(session).torpor)

    def exec(command: str, timeout_seconds: float | None = None) -> str:
        """Run a shell command (/bin/sh -c) in your Linux machine and return its exit
        code, stdout and stderr. Files and background processes (`cmd &`) persist.

        Args:
            command: the shell command line.
            timeout_seconds: kill the command after this many seconds (default and
                maximum: the tool's limit).
        """
        t = timeout if timeout_seconds is None else min(max(float(timeout_seconds), 1.0), timeout)
        out, err = _Head(max_output), _Head(max_output)
        try:
            r = box.get().exec(
                command, timeout=t, max_output=max_output, on_stdout=out, on_stderr=err
            )
        except ExecTimeoutError:
            head = f"timed out after {t:g} s: the command's process group was killed"
        except (UsageError, AgentError) as e:
            if _model_error(e):
                return f"error: {e}"
            raise
        else:
            head = f"exit code: {r.exit_code}"
        return f"{head}\n--- stdout ---\n{out.text()}\n--- stderr ---\n{err.text()}"

    def read_file(path: str) -> str:
        """Read a text file from your machine (an absolute path).

        Args:
            path: absolute path of the file.
        """
        try:
            chunks, size = [], 0
            stream = box.get().files.read_stream(path)
            try:
                for chunk in stream:
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > max_read:
                        break
            finally:  # the rest of a long file is dropped now, not at garbage collection
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            data = b"".join(chunks)
        except (UsageError, AgentError, NotFoundError) as e:
            if _model_error(e, path):
                return f"error: {e}"
            raise
        text = data[:max_read].decode("utf-8", "replace")
        return text + (
            f"\n[... file longer than {max_read} bytes: rest not shown]" if size > max_read else ""
        )

    def write_file(path: str, content: str) -> str:
        """Write (create or replace) a text file in your machine; parent folders are made.

        Args:
            path: absolute path of the file.
            content: the whole new content.
        """
        try:
            info = box.get().files.write(path, content)
        except (UsageError, AgentError, NotFoundError) as e:
            if _model_error(e, path):
                return f"error: {e}"
            raise
        return f"wrote {info.size} bytes to {info.path}"

    # what _model_error does not return to the model (a lost VM, a broken agent
    # connection) reaches _on_tool_error, which ends the run with the torpor error
    return [
        function_tool(f, failure_error_function=_on_tool_error)
        for f in (exec, read_file, write_file)
    ]
