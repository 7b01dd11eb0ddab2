"""LangGraph on torpor: a checkpoint saver backed by a session's context log, whose
checkpoints are torpor checkpoint pairs (graph state + VM snapshot), and tools that
run in the session's sandbox.

::

    from torpor import Session
    from torpor.integrations.langgraph import TorporSaver, sandbox_tools

    s = Session.create(image="tools:latest")
    saver = TorporSaver(s)
    graph = builder.compile(checkpointer=saver)        # nodes use sandbox_tools(s)
    config = {"configurable": {"thread_id": "t1"}}
    graph.invoke(inputs, config, durability="sync")

How it maps (one session holds one LangGraph thread; more threads: more sessions):

- ``put`` appends a ``langgraph.checkpoint`` custom entry (thread, namespace, id,
  parent id, metadata as JSON, the checkpoint as base64 of ``serde.dumps_typed``)
  and then takes a torpor checkpoint (``s.checkpoint(reason="langgraph")``): the VM
  snapshot right after the entry is the machine of that LangGraph checkpoint (the
  pair is found by position: a ``langgraph`` torpor checkpoint binds the LangGraph
  checkpoint entry it follows, if no other one came between).  ``every=N``
  snapshots the VM at every Nth put only; the others are provisional (below).
- ``put_writes`` appends one ``langgraph.writes`` entry per write, keyed by
  (checkpoint id, task id, idx) within a VM generation, so a retried call adds
  nothing; special writes (errors, interrupts) replace, as in LangGraph's savers.
- ``get_tuple``/``list`` fold the session's *effective* log (superseded entries
  left out); ``delete_thread`` appends a ``langgraph.delete`` marker and checkpoints
  (the log is append-only: the thread's entries stay, folded away).

Invariants:

- The LangGraph state the saver reports never claims effects the machine lacks.
  Work on the machine after the last VM snapshot is provisional: before anything
  provisional is logged or done (a write, a put without a snapshot, a sandbox tool
  call) the saver opens a turn (a ``user`` entry ``langgraph: ...``), so after a
  crash ``s.recover(replay=False)`` restores the VM to the last snapshot and
  supersedes the LangGraph entries after it; ``graph.invoke(None, config)`` then
  resumes from the last paired checkpoint and re-runs the lost step's tasks once,
  on a machine without their earlier half-done effects.  A run's last snapshot
  settles the turn.  Code that changes the machine other than through
  :func:`sandbox_tools` calls :func:`open_turn` first.
- A run does not start on a machine another worker left mid-step: a turn the saver
  opened through another Session object (a crashed worker's), with no VM restored
  since, makes the run raise SessionError before any node runs.
- An ``interrupt()`` (an interrupt write on the newest checkpoint) settles the turn
  with a snapshot: a paused run is idle, not interrupted, and resumes anywhere.
- Pairs are exact only if no task of the next step runs while a put snapshots:
  LangGraph's default ``durability="async"`` saves in the background while the next
  step runs, so the saver refuses it (UsageError when the run starts); use
  ``durability="sync"`` (a pair per super-step) or ``"exit"`` (one per invoke).
- Time travel within a session (invoking from an older ``checkpoint_id``) does not
  rewind the VM; :meth:`TorporSaver.fork` does (a new session from that pair).
- One Session object's saver, tools and :func:`open_turn` share one lock, so
  LangGraph's worker threads never use the session concurrently.

langgraph is imported here only: ``import torpor`` works without it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, tool
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    SerializerProtocol,
    get_checkpoint_id,
    get_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.serde.types import INTERRUPT

from torpor.context import Entry, Kind, effective
from torpor.errors import TorporError, UsageError
from torpor.session import Checkpoint as TorporCheckpoint
from torpor.session import Session, SessionError

CHECKPOINT_KIND = "langgraph.checkpoint"
WRITES_KIND = "langgraph.writes"
DELETE_KIND = "langgraph.delete"
#: The reason of the torpor checkpoints a put takes (what binds a pair).
REASON = "langgraph"
#: Key prefix of the ``user`` entries that open a turn (``open_turn``).
OPEN_KEY = "langgraph.open."
#: What a sandbox tool returns at most of a command's output or a file (each stream).
TOOL_OUTPUT_CAP = 64 * 1024

# LangGraph's run config keys (langgraph._internal._constants): a run sets the
# runtime; the durability key is there only when the caller chose one.
_RUNTIME_KEY = "__pregel_runtime"
_DURABILITY_KEY = "__pregel_durability"


# -- state shared by a Session object's saver(s) and tools -----------------------------
@dataclass
class _Shared:
    lock: threading.RLock = field(default_factory=threading.RLock)
    sandbox: tuple[str, Any] | None = None  # (vm id, Sandbox) of the last tool call
    opened: set[str] = field(default_factory=set)  # keys of the turns opened through it


_SHARED: weakref.WeakKeyDictionary[Session, _Shared] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def _shared(session: Session) -> _Shared:
    with _SHARED_LOCK:
        sh = _SHARED.get(session)
        if sh is None:
            sh = _SHARED[session] = _Shared()
        return sh


def open_turn(session: Session, why: str = "work on the machine") -> None:
    """Mark what follows as provisional until the next torpor checkpoint: a ``user``
    entry opens a turn, so a crash before the next checkpoint makes
    ``recover(replay=False)`` restore the VM and supersede the entries after it.
    Idempotent while a turn is open (keyed by the last checkpoint)."""
    sh = _shared(session)
    with sh.lock:
        st = session.state()
        if st.pending is not None:
            return
        last = st.last_checkpoint
        key = f"{OPEN_KEY}{last.seq if last else 0}"
        session.append("user", {"content": f"langgraph: {why}"}, key=key)
        sh.opened.add(key)


def _check_recovered(session: Session) -> None:
    """Refuse to start a run on a machine a crashed worker left half-way: a turn the
    saver or its tools opened in *another* process (or through another Session
    object), with no VM restored since, means the machine may hold effects of tasks
    LangGraph will run again."""
    st = session.state()
    p = st.pending
    if p is None or not (p.key or "").startswith(OPEN_KEY) or p.key in _shared(session).opened:
        return
    if any(e.kind is Kind.VM for e in session.entries(after=p.seq)):
        return  # recovered (the VM restored from the last checkpoint) since
    raise SessionError(
        f"session {session.name} was interrupted in the middle of LangGraph work "
        f"(entry {p.seq}: {p.payload.get('content', '')!r:.120}); its machine may hold "
        "effects of steps LangGraph will run again: call session.recover(replay=False) "
        "first (it restores the VM to the last paired checkpoint)"
    )


# -- the fold ----------------------------------------------------------------------------
@dataclass
class _Ck:
    seq: int
    thread_id: str
    ns: str
    id: str
    parent: str | None
    type: str
    blob: str  # base64
    metadata: dict[str, Any]
    pair: TorporCheckpoint | None = None


@dataclass
class _Write:
    task_id: str
    task_path: str
    idx: int
    channel: str
    type: str
    value: str  # base64


class _Fold:
    """What the effective log says about LangGraph threads."""

    def __init__(self) -> None:
        self.cks: dict[tuple[str, str, str], _Ck] = {}
        self.writes: dict[tuple[str, str, str], dict[tuple[str, int], _Write]] = {}
        self.gen = 0  # seq of the last ``vm`` entry: a new machine, new write keys
        self._unpaired: _Ck | None = None  # the last checkpoint entry, until a snapshot

    def add(self, entries: Sequence[Entry]) -> None:
        for e in entries:
            if e.kind is Kind.VM:
                self.gen = e.seq
                self._unpaired = None
            elif e.kind is Kind.CHECKPOINT:
                if self._unpaired is not None and e.payload.get("reason") == REASON:
                    self._unpaired.pair = TorporCheckpoint.from_entry(e)
                self._unpaired = None
            elif e.kind is Kind.CUSTOM and isinstance(e.payload.get("data"), dict):
                self._custom(e, str(e.payload.get("type")), e.payload["data"])

    def _custom(self, e: Entry, kind: str, d: dict[str, Any]) -> None:
        try:
            if kind == CHECKPOINT_KIND:
                ck = _Ck(
                    e.seq,
                    str(d["thread_id"]),
                    str(d["checkpoint_ns"]),
                    str(d["checkpoint_id"]),
                    None
                    if d.get("parent_checkpoint_id") is None
                    else str(d["parent_checkpoint_id"]),
                    str(d["type"]),
                    str(d["checkpoint"]),
                    dict(d.get("metadata") or {}),
                )
                self.cks[(ck.thread_id, ck.ns, ck.id)] = ck  # a re-put replaces
                self._unpaired = ck
            elif kind == WRITES_KIND:
                w = _Write(
                    str(d["task_id"]),
                    str(d.get("task_path", "")),
                    int(d["idx"]),
                    str(d["channel"]),
                    str(d["type"]),
                    str(d["value"]),
                )
                per = self.writes.setdefault(
                    (str(d["thread_id"]), str(d["checkpoint_ns"]), str(d["checkpoint_id"])), {}
                )
                # regular writes: the first wins; special ones (error, interrupt): the last
                if (w.task_id, w.idx) not in per or w.channel in WRITES_IDX_MAP:
                    per[(w.task_id, w.idx)] = w
            elif kind == DELETE_KIND:
                t = str(d["thread_id"])
                self.cks = {k: v for k, v in self.cks.items() if k[0] != t}
                self.writes = {k: v for k, v in self.writes.items() if k[0] != t}
                if self._unpaired is not None and self._unpaired.thread_id == t:
                    self._unpaired = None
        except (KeyError, TypeError, ValueError):
            return  # not an entry this saver wrote (another app's kind): ignored

    def thread(self) -> str | None:
        return next((k[0] for k in self.cks), None)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise UsageError(f"a LangGraph entry of the log is not valid base64: {e}") from e


def _conf(config: RunnableConfig | None) -> dict[str, Any]:
    conf = (config or {}).get("configurable") or {}
    if not isinstance(conf, dict):
        raise UsageError("a LangGraph config's 'configurable' must be a dict")
    return conf


class TorporSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer whose checkpoints are torpor checkpoint pairs.

    ``every``: take the VM snapshot at every Nth put of this saver (1: every put,
    exact pairs at every super-step).  Puts in between are provisional: after a
    crash, recovery goes back to the last paired checkpoint and LangGraph re-runs
    the steps since (on the restored machine).

    Besides LangGraph's saver API: :meth:`torpor_checkpoint` (the pair of a LangGraph
    checkpoint) and :meth:`fork` (a new session at one).  ``copy_thread``,
    ``delete_for_runs`` and ``prune`` are not implemented (LangGraph's base raises
    NotImplementedError): the log is append-only and a session holds one thread.
    """

    def __init__(
        self, session: Session, *, every: int = 1, serde: SerializerProtocol | None = None
    ) -> None:
        super().__init__(serde=serde)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise UsageError(f"every must be an integer >= 1, not {every!r}")
        self.session = session
        self.every = every
        self._puts = 0
        self._shared = _shared(session)
        self._fold_state = _Fold()
        self._folded = 0  # entries folded into _fold_state
        self._folded_seq = 0
        # put_writes calls under way: LangGraph submits a step's writes and then the
        # next checkpoint's put to a thread pool, so a put could overtake them; it
        # waits for those already started (see put)
        self._writing = 0
        self._writes_done = threading.Condition()

    # -- reading -----------------------------------------------------------------------
    def _fold(self) -> _Fold:
        """The fold of the effective log, brought up to date: only new entries are
        folded, unless a ``supersede`` among them rewrote history (then all of it)."""
        entries = self.session.entries()
        fresh = len(entries) < self._folded or (
            self._folded and entries[self._folded - 1].seq != self._folded_seq
        )
        tail = entries if fresh else entries[self._folded :]
        if fresh or any(e.kind is Kind.SUPERSEDE for e in tail):
            self._fold_state = _Fold()
            self._fold_state.add(effective(entries))
        else:
            self._fold_state.add(tail)
        self._folded = len(entries)
        self._folded_seq = entries[-1].seq if entries else 0
        return self._fold_state

    def _tuple(self, f: _Fold, ck: _Ck, config: RunnableConfig | None = None) -> CheckpointTuple:
        conf = {"thread_id": ck.thread_id, "checkpoint_ns": ck.ns, "checkpoint_id": ck.id}
        writes = sorted(
            f.writes.get((ck.thread_id, ck.ns, ck.id), {}).values(),
            key=lambda w: writes_sort_key(w.task_path, w.task_id, w.idx),
        )
        return CheckpointTuple(
            config if config is not None else {"configurable": conf},
            self.serde.loads_typed((ck.type, _unb64(ck.blob))),
            json.loads(json.dumps(ck.metadata)),  # a copy the caller may change
            (
                {"configurable": {**conf, "checkpoint_id": ck.parent}}
                if ck.parent is not None
                else None
            ),
            [
                (w.task_id, w.channel, self.serde.loads_typed((w.type, _unb64(w.value))))
                for w in writes
            ],
        )

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        conf = _conf(config)
        _check_durability(conf)
        thread_id, ns = str(conf.get("thread_id")), str(conf.get("checkpoint_ns") or "")
        with self._shared.lock:
            f = self._fold()
            if _RUNTIME_KEY in conf:  # a run starts: refuse what it must not run on
                self._check_thread(f, thread_id)
                if not ns:
                    _check_recovered(self.session)
            if checkpoint_id := get_checkpoint_id(config):
                ck = f.cks.get((thread_id, ns, str(checkpoint_id)))
                return None if ck is None else self._tuple(f, ck, config)
            mine = [c for k, c in f.cks.items() if k[0] == thread_id and k[1] == ns]
            if not mine:
                return None
            return self._tuple(f, max(mine, key=lambda c: c.id))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        conf = _conf(config) if config is not None else {}
        before_id = get_checkpoint_id(before) if before is not None else None
        with self._shared.lock:
            f = self._fold()
            found = []
            for (thread_id, ns, ck_id), ck in f.cks.items():
                if config is not None:
                    if thread_id != str(conf.get("thread_id")):
                        continue
                    if conf.get("checkpoint_ns") is not None and ns != conf["checkpoint_ns"]:
                        continue
                    if (want := get_checkpoint_id(config)) and ck_id != want:
                        continue
                if before_id and not ck_id < before_id:
                    continue
                if filter and not all(ck.metadata.get(k) == v for k, v in filter.items()):
                    continue
                found.append(ck)
            found.sort(key=lambda c: c.id, reverse=True)
            if limit is not None:
                found = found[: max(limit, 0)]
            tuples = [self._tuple(f, ck) for ck in found]
        yield from tuples

    # -- writing -----------------------------------------------------------------------
    def _check_thread(self, f: _Fold, thread_id: str) -> None:
        have = f.thread()
        if have is not None and have != thread_id:
            raise UsageError(
                f"session {self.session.name} holds LangGraph thread {have!r}, not "
                f"{thread_id!r}: one session per thread (a thread's checkpoints pair with "
                "its own machine); create another Session for another thread"
            )

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        conf = _conf(config)
        _check_durability(conf)
        thread_id = str(conf["thread_id"])
        ns = str(conf.get("checkpoint_ns") or "")
        type_, blob = self.serde.dumps_typed(checkpoint)
        payload = {
            "thread_id": thread_id,
            "checkpoint_ns": ns,
            "checkpoint_id": str(checkpoint["id"]),
            "parent_checkpoint_id": conf.get("checkpoint_id"),
            "type": type_,
            "checkpoint": _b64(blob),
            "metadata": _jsonable(get_checkpoint_metadata(config, metadata)),
        }
        with self._writes_done:  # the previous step's writes go before this checkpoint
            self._writes_done.wait_for(lambda: self._writing == 0)
        with self._shared.lock:
            self._check_thread(self._fold(), thread_id)
            self._puts += 1
            snap = self._puts % self.every == 0
            if not snap:
                open_turn(self.session, f"checkpoint {checkpoint['id']} (no VM snapshot yet)")
            self.session.append(CHECKPOINT_KIND, payload)
            if snap:
                self.session.checkpoint(reason=REASON)
        return {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint["id"],
            }
        }

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        with self._writes_done:
            self._writing += 1
        try:
            self._put_writes(config, writes, task_id, task_path)
        finally:
            with self._writes_done:
                self._writing -= 1
                self._writes_done.notify_all()

    def _put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str,
    ) -> None:
        conf = _conf(config)
        _check_durability(conf)
        thread_id = str(conf["thread_id"])
        ns = str(conf.get("checkpoint_ns") or "")
        ck_id = str(conf["checkpoint_id"])
        rows = []
        for idx, (channel, value) in enumerate(writes):
            type_, data = self.serde.dumps_typed(value)
            rows.append((WRITES_IDX_MAP.get(channel, idx), channel, type_, data))
        with self._shared.lock:
            f = self._fold()
            self._check_thread(f, thread_id)
            newest = max((k[2] for k in f.cks if k[0] == thread_id and k[1] == ns), default="")
            if ck_id >= newest:
                # the running step's writes: provisional until the next snapshot.  (A
                # late write of an older checkpoint is not: nothing will resume from it.)
                open_turn(self.session, f"writes of task {task_id}")
            for idx, channel, type_, data in rows:
                key = None
                if channel not in WRITES_IDX_MAP:  # regular writes: the first one stays
                    h = hashlib.sha256(
                        json.dumps([thread_id, ns, ck_id, task_id, idx]).encode()
                    ).hexdigest()[:40]
                    key = f"langgraph.w.{f.gen}.{h}"
                self.session.append(
                    WRITES_KIND,
                    {
                        "thread_id": thread_id,
                        "checkpoint_ns": ns,
                        "checkpoint_id": ck_id,
                        "task_id": str(task_id),
                        "task_path": str(task_path),
                        "idx": idx,
                        "channel": str(channel),
                        "type": type_,
                        "value": _b64(data),
                    },
                    key=key,
                )
            if ck_id >= newest and any(r[1] == INTERRUPT for r in rows):
                # the run pauses for a human: settle here, so the session is idle (not
                # interrupted) while it waits and a resume in another process needs no
                # recovery.  The machine keeps what the node did before interrupt():
                # LangGraph re-runs that node on resume, as with any saver.
                self.session.checkpoint(reason=f"{REASON} interrupt")

    def delete_thread(self, thread_id: str) -> None:
        """Fold the thread's checkpoints and writes away (a ``langgraph.delete``
        marker, then a checkpoint so the deletion is not provisional)."""
        with self._shared.lock:
            f = self._fold()
            if not any(k[0] == str(thread_id) for k in (*f.cks, *f.writes)):
                return
            self.session.append(DELETE_KIND, {"thread_id": str(thread_id)})
            self.session.checkpoint(reason="langgraph delete")

    # -- pairs -------------------------------------------------------------------------
    def torpor_checkpoint(self, config: RunnableConfig) -> TorporCheckpoint:
        """The torpor checkpoint (log position + VM snapshot) paired with the LangGraph
        checkpoint ``config`` names (its latest, without a ``checkpoint_id``)."""
        conf = _conf(config)
        thread_id, ns = str(conf.get("thread_id")), str(conf.get("checkpoint_ns") or "")
        with self._shared.lock:
            f = self._fold()
            want = get_checkpoint_id(config)
            if want:
                ck = f.cks.get((thread_id, ns, str(want)))
            else:
                mine = [c for k, c in f.cks.items() if k[0] == thread_id and k[1] == ns]
                ck = max(mine, key=lambda c: c.id) if mine else None
        if ck is None:
            raise UsageError(
                f"session {self.session.name} has no LangGraph checkpoint "
                f"{want or '(latest)'} in thread {thread_id!r}"
            )
        if ck.pair is None:
            raise UsageError(
                f"LangGraph checkpoint {ck.id} has no VM snapshot of its own (taken with "
                f"every={self.every}, or superseded); pick a paired one: saver.list(config) "
                "and saver.torpor_checkpoint(t.config)"
            )
        return ck.pair

    def fork(self, config: RunnableConfig, name: str | None = None) -> Session:
        """A new session whose log ends at the LangGraph checkpoint ``config`` names and
        whose VM is that checkpoint's snapshot: ``TorporSaver(child)`` and
        ``graph.invoke(None, config_without_checkpoint_id)`` go on from there."""
        return self.session.fork(at=self.torpor_checkpoint(config), name=name)

    # -- async: the same calls on a worker thread (the session API is synchronous) -------
    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        items = await asyncio.to_thread(
            lambda: list(self.list(config, filter=filter, before=before, limit=limit))
        )
        for item in items:
            yield item

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await asyncio.to_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        await asyncio.to_thread(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await asyncio.to_thread(self.delete_thread, thread_id)


def _check_durability(conf: dict[str, Any]) -> None:
    """Refuse a graph run that saves in the background (see the module docstring)."""
    if _RUNTIME_KEY in conf and conf.get(_DURABILITY_KEY, "async") == "async":
        raise UsageError(
            "TorporSaver pairs each LangGraph checkpoint with a VM snapshot, which needs "
            "the step's tasks to be finished when it is taken; LangGraph's default "
            "durability='async' saves while the next step runs. Run the graph with "
            "durability='sync' (a pair per super-step) or durability='exit' (one per run)"
        )


def _jsonable(metadata: Any) -> dict[str, Any]:
    """Metadata as stored: JSON (as LangGraph's SQL savers), so ``list(filter=)`` can
    compare it; values JSON cannot hold are refused with the key named."""
    try:
        return json.loads(json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise UsageError(f"LangGraph checkpoint metadata is not JSON: {e}") from e


# -- tools ---------------------------------------------------------------------------------
def _sandbox(session: Session, why: str) -> Any:
    """The session's Sandbox for a tool call, after opening the turn (a tool changes
    the machine).  One connection per VM, remade after the VM changed (recovery)."""
    sh = _shared(session)
    with sh.lock:
        open_turn(session, why)
        vm_id = session.state().vm_id
        if sh.sandbox is not None and sh.sandbox[0] == vm_id and sh.sandbox[1].is_running():
            return sh.sandbox[1]
        sb = session.sandbox  # woken or restored if needed
        if sh.sandbox is not None:
            sh.sandbox[1].close()
        sh.sandbox = (sb.id, sb)
        return sb


def _cut(text: str, dropped: int = 0) -> str:
    data = text.encode("utf-8", "replace")
    if len(data) <= TOOL_OUTPUT_CAP and not dropped:
        return text
    more = max(len(data) - TOOL_OUTPUT_CAP, 0) + dropped
    return data[:TOOL_OUTPUT_CAP].decode("utf-8", "ignore") + f"\n[... {more} more bytes]"


def sandbox_tools(session: Session, *, timeout: float = 60.0) -> list[BaseTool]:
    """LangChain tools ``exec``, ``read_file`` and ``write_file`` that run in the
    session's VM.  Failures (a non-zero exit, a missing file, a timeout) are results
    the model reads, not exceptions; each result is capped at 64 KiB."""
    if not (isinstance(timeout, int | float) and timeout > 0):
        raise UsageError(f"timeout must be > 0 seconds, not {timeout!r}")

    @tool("exec")
    def exec_(command: str) -> str:
        """Run a shell command (/bin/sh -c) in the Linux machine; returns its exit
        code, stdout and stderr. The machine and what you start in it persist."""
        try:
            r = _sandbox(session, "exec").exec(command, timeout=timeout, max_output=TOOL_OUTPUT_CAP)
        except TorporError as e:
            return f"error: {e}"
        return (
            f"exit code {r.exit_code}\nstdout:\n{_cut(r.stdout, r.stdout_dropped)}"
            f"\nstderr:\n{_cut(r.stderr, r.stderr_dropped)}"
        )

    @tool("read_file")
    def read_file(path: str) -> str:
        """Read a text file of the Linux machine (the first 64 KiB)."""
        try:
            chunks = _sandbox(session, "read_file").files.read_stream(path)
            data = b""
            with contextlib.closing(chunks):  # abandoned early: the rest is dropped
                for chunk in chunks:
                    data += chunk
                    if len(data) > TOOL_OUTPUT_CAP:
                        break  # no more than the cap is held, whatever the file's size
        except TorporError as e:
            return f"error: {e}"
        text = data[:TOOL_OUTPUT_CAP].decode("utf-8", "replace")
        return text + ("\n[... file continues]" if len(data) > TOOL_OUTPUT_CAP else "")

    @tool("write_file")
    def write_file(path: str, content: str) -> str:
        """Write (create or replace) a text file in the Linux machine; parent folders
        are made."""
        try:
            _sandbox(session, "write_file").files.write(path, content)
        except TorporError as e:
            return f"error: {e}"
        return f"wrote {len(content.encode())} bytes to {path}"

    return [exec_, read_file, write_file]


__all__ = [
    "CHECKPOINT_KIND",
    "DELETE_KIND",
    "WRITES_KIND",
    "TorporSaver",
    "open_turn",
    "sandbox_tools",
]
