"""Durable agent sessions: a context log paired with VM checkpoints.

A session is a row in the context log (:mod:`torpor.context`) plus a microVM.
Everything about it is *derived from the log*: which VM it runs in (the last
``vm`` entry), its checkpoints (``checkpoint`` entries naming snapshots), whether
it is hibernated (the last of ``hibernate`` / ``resume`` / ``vm``), and whether a
turn was interrupted (a ``user`` entry after the last checkpoint).  Nothing is
kept anywhere else, so any host that can read the log and the snapshot store can
pick a session up.

A turn::

    user (acknowledged: durable before send() does anything else)
    model_request -> model_response -> tool_call -> tool_result ... (repeat)
    model_response (no tool calls: the answer)
    checkpoint  (an incremental snapshot of the VM; log position and snapshot
                 now describe the same moment)

Recovery after a crash mid-turn: the VM is restored from the last checkpoint
(the tool calls of the lost turn are gone with it), the turn's partial entries
are marked superseded by a ``supersede`` entry, and the user's message is
replayed — so no acknowledged entry is lost and no tool call's effect is applied
twice to the machine.

The log as an API (any loop): :meth:`Session.append`, :meth:`Session.checkpoint`,
:meth:`Session.entries`, :attr:`Session.sandbox`, :meth:`Session.fork`,
:meth:`Session.recover`.  The built-in loop (:meth:`Session.send`) is written with
exactly these calls, so a user's loop gets the same guarantees:

- ``append`` is durable before it returns and idempotent by ``key``.  It takes the
  conversation kinds (:data:`LOOP_KINDS`, payloads checked for the shape
  :meth:`Session.messages` reads) or a custom kind: a dotted name such as
  ``"app.note"`` (torpor's own kinds never contain a dot), stored as a ``custom``
  entry ``{"type": kind, "data": payload}``.  Lifecycle kinds (checkpoint, vm,
  hibernate, resume, fork, supersede, removed) are torpor's alone: they carry the
  lineage, and a user-written one could make the log lie about the machine.
  Payloads are JSON objects of at most :data:`MAX_APPEND_BYTES`.
- ``checkpoint`` snapshots the VM and appends the ``checkpoint`` entry naming it
  before it returns: log position and snapshot describe the same moment.  Durable
  means: in the store, or (the fast path, :mod:`torpor.snapshot.journal`) in this
  home's fsync'd checkpoint journal, committed into the store behind; the entry is
  appended only after that point, and every reader of the snapshot finishes the
  journal first.
- Work after the last checkpoint is provisional: whenever the VM has to be rebuilt
  from that checkpoint (crash, VM lost or killed, ``recover``), the conversation and
  custom entries after it are superseded, because the machine no longer has
  their effects.
- One actor per session on a host: the session lock is held by every state-changing
  call and is re-entrant within one Session object on one thread.
- One host per session: before it runs or changes the machine a Session claims the
  session's lease in the log's database (:meth:`ContextLog.claim`, ttl
  ``TORPOR_LEASE_TTL``, default 10 s), renewed by a heartbeat thread while held, and
  every entry it appends carries ``fence=(host, epoch)``, so the database refuses it
  once another host took the session over.  The checkpoint entry is fenced like any
  other: a snapshot a stale host commits to the store (the store cannot be fenced) is
  never named by the log, so no one restores it.  A Session that finds its lease
  taken over refuses every further call (FencedError); reopen the session to drive
  it again.  ``hibernate`` releases the lease: a hibernated session belongs to no host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torpor import failpoints
from torpor.cluster.host import Heartbeat, host_id, lease_ttl
from torpor.context import (
    ChainError,
    ContextLog,
    Entry,
    Kind,
    Lease,
    SessionRecord,
    effective,
    open_log,
    superseded,
)
from torpor.errors import (
    ConflictError,
    FencedError,
    LeaseHeldError,
    NotFoundError,
    TorporError,
    UsageError,
)
from torpor.fsutil import locked
from torpor.model import Model, ModelError, open_model
from torpor.model.tools import TOOLS
from torpor.paths import Paths
from torpor.session.conversation import MsgList, SessionConversation
from torpor.session.record import RecordRefused, Writer
from torpor.session.record import load as load_record
from torpor.session.record import save as save_record
from torpor.session.tools import Tool, check_tools, run_custom, run_tool
from torpor.snapshot import journal
from torpor.snapshot.core import restore, snapshot
from torpor.store.home import durability_fields
from torpor.vmm.capture import unvouch_shadow
from torpor.vmm.manager import NAME_RE, VM, RunRequest, VMManager
from torpor.vmm.state import Status

DEFAULT_SYSTEM = (
    "You are an agent working inside your own Linux microVM. Use the tools to run "
    "shell commands and to read, write and list files; the machine and everything "
    "you start in it persist between turns. Answer briefly when the task is done."
)
#: Model steps in one turn before torpor gives up on the model (a loop guard).
MAX_STEPS = 64
#: VM label naming the session a VM was booted for.
LABEL = "torpor.session"

log = logging.getLogger(__name__)

#: Entries of a turn's work that a recovery supersedes (events such as ``vm`` stay).
TURN_WORK = (
    Kind.MODEL_REQUEST,
    Kind.MODEL_RESPONSE,
    Kind.TOOL_CALL,
    Kind.TOOL_RESULT,
    Kind.CUSTOM,
)
#: The kinds :meth:`Session.append` takes besides custom ones: a loop's conversation.
LOOP_KINDS = frozenset(
    {
        Kind.USER,
        Kind.MODEL_REQUEST,
        Kind.MODEL_RESPONSE,
        Kind.TOOL_CALL,
        Kind.TOOL_RESULT,
        Kind.ERROR,
    }
)
#: A custom entry kind: dotted, so it can never equal one of torpor's (none has a dot).
CUSTOM_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}(\.[a-z0-9_-]{1,31}){1,3}")
#: Largest payload :meth:`Session.append` stores (its JSON, UTF-8).
# 8 MiB: a built-in tool result holds at most 1 MiB of output, which JSON escaping
# of control characters can grow sixfold
MAX_APPEND_BYTES = 8 * 1024 * 1024
#: Longest checkpoint reason.
MAX_REASON = 200


class SessionError(TorporError):
    """A session cannot do what was asked (no VM, no checkpoint to recover from)."""

    exit_code = 13


@dataclass(frozen=True)
class Checkpoint:
    """A (log position, snapshot) pair: both describe the same moment."""

    seq: int
    snapshot: str
    turn: int
    reason: str
    stored_bytes: int
    pause_ms: float
    durable_ms: float
    created_at: float

    @classmethod
    def from_entry(cls, e: Entry) -> Checkpoint:
        p = e.payload
        return cls(
            e.seq,
            p["snapshot"],
            e.turn,
            p.get("reason", "turn"),
            int(p.get("stored_bytes", 0)),
            float(p.get("pause_ms", 0.0)),
            float(p.get("durable_ms", 0.0)),
            e.created_at,
        )


@dataclass(frozen=True)
class SessionState:
    """What the log says about a session right now."""

    vm_id: str | None
    checkpoints: tuple[Checkpoint, ...]
    hibernated: bool
    turns: int
    pending: Entry | None  # the user entry of an interrupted turn
    last_seq: int

    @property
    def last_checkpoint(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None


class _Fold:
    """What a run of effective entries adds to a session's state and conversation.

    :func:`derive_state` and :func:`messages_from` fold a whole log from scratch;
    :class:`LogView` keeps one fold of the settled part of a growing log and folds only
    what is new, so a turn's many state and message reads do not grow with the session.
    """

    def __init__(self) -> None:
        self.vm_id: str | None = None
        self.hibernated = False
        self.checkpoints: list[Checkpoint] = []
        self.last_user: Entry | None = None
        self.turns = 0
        # the conversation; from a state record, its sealed segments decode when read
        self.msgs = MsgList()

    def copy(self) -> _Fold:
        c = _Fold()
        c.vm_id, c.hibernated, c.last_user, c.turns = (
            self.vm_id,
            self.hibernated,
            self.last_user,
            self.turns,
        )
        c.checkpoints, c.msgs = list(self.checkpoints), self.msgs.copy()
        return c

    def add(self, eff: Iterable[Entry], owner: str | None) -> None:
        for e in eff:
            p = e.payload
            if e.kind == Kind.VM:
                if owner is None or e.session_id == owner:
                    self.vm_id = p.get("vm")
                self.hibernated = False
            elif e.kind == Kind.RESUME:
                self.hibernated = False
            elif e.kind == Kind.HIBERNATE:
                self.hibernated = True
            elif e.kind == Kind.CHECKPOINT:
                self.checkpoints.append(Checkpoint.from_entry(e))
            elif e.kind == Kind.USER:
                self.last_user = e
                self.turns += 1
                self.msgs.append({"role": "user", "content": p["content"]})
            elif e.kind == Kind.MODEL_RESPONSE:
                m: dict[str, Any] = {"role": "assistant", "content": p.get("text", "")}
                if p.get("tool_calls"):
                    m["tool_calls"] = [
                        {"id": c["id"], "name": c["name"], "arguments": c["arguments"]}
                        for c in p["tool_calls"]
                    ]
                self.msgs.append(m)
            elif e.kind == Kind.TOOL_RESULT:
                tool: dict[str, Any] = {
                    "role": "tool",
                    "tool_call_id": p["id"],
                    "name": p["name"],
                    "content": p["content"],
                }
                if p.get("is_error"):
                    tool["is_error"] = True
                self.msgs.append(tool)

    def state(self, last_seq: int) -> SessionState:
        pending = None
        cks = self.checkpoints
        if self.last_user is not None and (not cks or cks[-1].seq < self.last_user.seq):
            pending = self.last_user
        return SessionState(self.vm_id, tuple(cks), self.hibernated, self.turns, pending, last_seq)

    def messages(self, system: str) -> list[dict[str, Any]]:
        return [{"role": "system", "content": system}, *self.msgs]

    def conversation(self, system: str) -> SessionConversation:
        """:meth:`messages` as a sequence that decodes only what is read."""
        return SessionConversation(system, self.msgs)


def derive_state(entries: Sequence[Entry], owner: str | None = None) -> SessionState:
    """The state ``entries`` describe.  With ``owner``, only that session's own ``vm``
    entries name its VM: a fork's inherited prefix names its parent's VM."""
    f = _Fold()
    f.add(effective(entries), owner)
    return f.state(entries[-1].seq if entries else 0)


def messages_from(entries: Sequence[Entry], system: str) -> list[dict[str, Any]]:
    """The provider-neutral conversation the log describes (superseded work left out)."""
    f = _Fold()
    f.add(effective(entries), None)
    return f.messages(system)


class _Stale(Exception):
    """A view seeded from a state record cannot answer from the entries after it (a
    marker reaches back before the record): the caller reads the whole log."""


class LogView:
    """:func:`derive_state` and :func:`messages_from` of a log that only grows, in
    O(new entries) per call.

    Entries up to the last checkpoint are *settled*: folded once and kept.  Only
    ``SUPERSEDE`` markers change what earlier entries mean, and a session supersedes
    only the work after its last checkpoint; a marker that names a settled entry (or
    a log that is not the one seen before) makes the view fold everything again, so
    the answers always equal the from-scratch functions'.  The message dicts are
    shared between calls: callers must not mutate them.

    :meth:`seed` starts the view from a state record (:mod:`torpor.session.record`):
    the fold through seq ``S``; the entries passed in are then only those after
    ``S``, and where a full refold would be needed the view raises :class:`_Stale`.
    The record's messages decode when read (:class:`~torpor.session.conversation.MsgList`):
    :meth:`state` and :meth:`conversation` never decode them; :meth:`messages` does.
    """

    def __init__(self, owner: str | None) -> None:
        self.owner = owner
        self.based = False
        self.prefetch: Callable[[], None] = lambda: None  # see seed()
        self._reset()

    def seed(self, fold: _Fold, seq: int, prefetch: Callable[[], None] | None = None) -> None:
        """Start from ``fold``, the fold of the log through entry ``seq``; ``prefetch``
        starts decoding its sealed messages in the background (for a model that will
        read them all)."""
        self._settled, self._n, self._seq, self.based = fold, 0, seq, True
        self.prefetch = prefetch or (lambda: None)

    def settled(self) -> tuple[_Fold, int]:
        """The settled fold and the seq it runs through (0: nothing settled)."""
        return self._settled, self._seq

    def rebase(self, entries: Sequence[Entry], seq: int) -> int:
        """A state record was written at ``seq``: if that is what this view settled, let
        it go on from the record (as :meth:`seed` would) and return how many entries at
        the head of ``entries`` it stands for; else 0 (nothing changes)."""
        k = self._n
        if self._seq != seq or k == 0 or k > len(entries) or entries[k - 1].seq != seq:
            return 0
        self._n, self.based = 0, True
        return k

    def _reset(self) -> None:
        if self.based:
            raise _Stale
        self._settled = _Fold()
        self._n = 0  # entries settled
        self._seq = 0  # seq of the last settled entry

    def _fold(self, entries: Sequence[Entry]) -> _Fold:
        if len(entries) < self._n or (self._n and entries[self._n - 1].seq != self._seq):
            self._reset()  # not the log we settled
        tail = entries[self._n :]
        gone = superseded(tail)
        if gone and min(gone) <= self._seq:
            self._reset()  # a marker rewrote settled history: fold it all again
            tail = entries
            gone = superseded(tail)
        # settle up to the tail's last checkpoint, unless a later marker reaches back
        cut = max((i for i, e in enumerate(tail) if e.kind is Kind.CHECKPOINT), default=-1)
        if cut >= 0 and not any(s <= tail[cut].seq for s in superseded(tail[cut + 1 :])):
            head, tail = tail[: cut + 1], tail[cut + 1 :]
            self._settled.add(
                (e for e in head if e.kind is not Kind.SUPERSEDE and e.seq not in gone),
                self.owner,
            )
            self._n += len(head)
            self._seq = head[-1].seq
        f = self._settled.copy()
        f.add(effective(tail), self.owner)
        return f

    def state(self, entries: Sequence[Entry]) -> SessionState:
        last = entries[-1].seq if entries else (self._seq if self.based else 0)
        return self._fold(entries).state(last)

    def messages(self, entries: Sequence[Entry], system: str) -> list[dict[str, Any]]:
        return self._fold(entries).messages(system)

    def conversation(self, entries: Sequence[Entry], system: str) -> SessionConversation:
        return self._fold(entries).conversation(system)


def _answer_of(entries: Sequence[Entry], turn: int) -> str:
    text = ""
    for e in effective(entries):
        if e.turn == turn and e.kind == Kind.MODEL_RESPONSE:
            text = e.payload.get("text", "")
    return text


def _vm_name(session_name: str) -> str:
    name = f"ses-{session_name}"[:63]
    return name if NAME_RE.match(name) else ""


def _no_nul(value: Any) -> Any:
    """U+0000 -> U+FFFD in every string: the log (PostgreSQL's jsonb) cannot hold NUL,
    and a tool's output (a binary file, say) may contain it."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {k: _no_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nul(v) for v in value]
    return value


def release_snapshots(
    log: ContextLog, mgr: VMManager, session_id: str | None = None
) -> list[str]:
    """Remove from the store the snapshots of removed sessions' checkpoints that no
    live session can still restore: every live session sees its ancestors'
    checkpoints up to its fork point, and those stay.  A snapshot another snapshot
    builds on, or a hibernated VM waits on, stays too (the store refuses).  Returns
    the ids removed; ``torpor gc`` then reclaims their chunks.

    With ``session_id`` (the session just removed) only its lineage tree (the
    sessions sharing its root ancestor) is looked at: only they can see its
    checkpoints, and a snapshot kept earlier because a fork built on it is in the
    same tree, so it is retried there.  Looking at every session ever removed made
    each ``session rm`` cost as much as all the earlier ones together."""
    from torpor.snapshot.core import remove_snapshot

    everyone = {r.id: r for r in log.list_sessions(include_removed=True)}
    if session_id is not None:
        roots: dict[str, str] = {}

        def root(sid: str) -> str:
            path = []
            while sid not in roots:
                path.append(sid)
                up = everyone[sid].parent_id
                if up is None or up not in everyone or up in path:
                    roots[sid] = sid
                    break
                sid = up
            for p in path:
                roots[p] = roots[sid]
            return roots[sid]

        top = root(session_id) if session_id in everyone else session_id
        everyone = {i: r for i, r in everyone.items() if root(i) == top}
    own: dict[str, list[tuple[int, str]]] = {}

    def checkpoints(sid: str) -> list[tuple[int, str]]:
        if sid not in own:
            own[sid] = [
                (e.seq, str(e.payload.get("snapshot")))
                for e in log.own_entries(sid, Kind.CHECKPOINT)
            ]
        return own[sid]

    needed: set[str] = set()
    for r in everyone.values():
        if r.removed:
            continue
        sid: str | None = r.id
        hi: int | None = None
        while sid is not None and sid in everyone:
            needed.update(snap for seq, snap in checkpoints(sid) if hi is None or seq <= hi)
            rec = everyone[sid]
            if rec.parent_seq is not None:
                hi = rec.parent_seq if hi is None else min(hi, rec.parent_seq)
            sid = rec.parent_id
    doomed: list[str] = []
    for r in sorted(everyone.values(), key=lambda r: -r.created_at):
        if r.removed:
            doomed += [snap for _, snap in reversed(checkpoints(r.id)) if snap not in needed]
    released: list[str] = []
    for snap in dict.fromkeys(doomed):  # newest first: a snapshot's children go before it
        try:
            remove_snapshot(mgr, snap)
        except NotFoundError:
            continue  # released before
        except ConflictError:
            continue  # something else builds on it or resumes from it: keep it
        released.append(snap)
    return released


def _check_payload(payload: Any, kind: str) -> None:
    """A user's payload: a JSON object of at most :data:`MAX_APPEND_BYTES`."""
    if not isinstance(payload, dict):
        raise UsageError(
            f"a {kind} payload must be a JSON object (a dict), not {type(payload).__name__}"
        )
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UsageError(f"a {kind} payload is not JSON-serialisable: {e}") from e
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_APPEND_BYTES:
        raise UsageError(
            f"a {kind} payload is {size} bytes of JSON; the most one entry holds is "
            f"{MAX_APPEND_BYTES} (store large data in the sandbox and log a reference)"
        )


#: Session labels: at most this many, keys and values this long.
MAX_LABELS, MAX_LABEL_KEY, MAX_LABEL_VALUE = 64, 63, 255
_LABEL_KEY_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_./-]*")


def _check_labels(labels: dict[str, str] | None) -> dict[str, str]:
    if not labels:
        return {}
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise UsageError(f"labels: at most {MAX_LABELS} key/value pairs")
    for k, v in labels.items():
        if not (isinstance(k, str) and len(k) <= MAX_LABEL_KEY and _LABEL_KEY_RE.fullmatch(k)):
            raise UsageError(
                f"bad label key {k!r:.80}: 1-{MAX_LABEL_KEY} of [a-zA-Z0-9_./-], "
                "starting with a letter or digit"
            )
        if k.startswith("torpor."):
            raise UsageError(f"label {k!r}: the torpor.* labels are torpor's own")
        if not (isinstance(v, str) and len(v) <= MAX_LABEL_VALUE and v.isprintable()):
            raise UsageError(
                f"label {k}: a value is at most {MAX_LABEL_VALUE} printable characters"
            )
    return dict(labels)


def _need(cond: bool, kind: str, what: str) -> None:
    if not cond:
        raise UsageError(f"a {kind} entry needs {what}")


def _check_loop_payload(kind: Kind, p: dict[str, Any]) -> None:
    """The fields :class:`_Fold` reads, so a user's entries cannot break ``messages()``."""
    k = kind.value
    if kind is Kind.USER:
        _need(
            isinstance(p.get("content"), str) and bool(p["content"].strip()),
            k,
            "'content': a non-empty string",
        )
    elif kind is Kind.MODEL_RESPONSE:
        _need(isinstance(p.get("text", ""), str), k, "'text': a string")
        calls = p.get("tool_calls") or []
        _need(
            isinstance(calls, list)
            and all(
                isinstance(c, dict)
                and isinstance(c.get("id"), str)
                and isinstance(c.get("name"), str)
                and isinstance(c.get("arguments"), dict)
                for c in calls
            ),
            k,
            "'tool_calls': a list of {'id': str, 'name': str, 'arguments': dict}",
        )
    elif kind is Kind.TOOL_CALL:
        _need(
            isinstance(p.get("id"), str)
            and isinstance(p.get("name"), str)
            and isinstance(p.get("arguments"), dict),
            k,
            "'id': str, 'name': str and 'arguments': dict",
        )
    elif kind is Kind.TOOL_RESULT:
        _need(
            isinstance(p.get("id"), str)
            and isinstance(p.get("name"), str)
            and isinstance(p.get("content"), str),
            k,
            "'id': str, 'name': str and 'content': str",
        )


EventHook = Callable[[Entry], None]


def _labelled_vms(mgr: VMManager, session_id: str) -> set[str]:
    """Ids of the VMs labelled as this session's (booted or restored for it)."""
    return {vm.id for vm in mgr.list() if vm.config.labels.get(LABEL) == session_id}


class _Restoring:
    """A session's VM restored from a checkpoint, its old VM removed beside it.

    The old VM (after a crash: dead, its RAM file still held) is removed by a thread
    while the new one is restored, not before: the restore never copies the old VM's
    RAM shadow.  The new VM is restored unnamed, labelled with the session, and takes
    the session's VM name once the old one has given it up; a removal that fails
    removes the new VM too and raises, as if it had failed first.  Other VMs labelled
    with the session (one restored by a recovery killed before it logged it) go once
    the new one runs.

    ``behind``: the restore runs in a thread, from :meth:`start` on, while the caller
    goes on (a recovery's model call, which reads the log only: started right before
    it, so that the thread's work, imports included, does not compete for the GIL with
    the log reads and writes before it); :meth:`wait` joins it (or runs it, if never
    started) and appends the ``vm`` entry, in the caller's thread (the log has one
    writer), its ``ms`` the restore's own time.  Until then the log names the old VM,
    so a crash in between leaves the session as a crash before the restore would,
    plus a labelled VM.
    """

    def __init__(self, s: Session, ck: Checkpoint, reason: str, *, behind: bool = False):
        self.s, self.ck, self.reason = s, ck, reason
        self.vm: VM | None = None
        self.error: BaseException | None = None
        self.logged, self.ms = False, 0.0
        self.thread: threading.Thread | None = None
        s._claim()
        self.old = s.state().vm_id
        if self.old is not None:
            # its RAM shadow may still equal the checkpoint, but it goes with the VM: a
            # restore copying it would race the removal (and start over, in full)
            with contextlib.suppress(NotFoundError):
                unvouch_shadow(s._mgr.get(self.old).files.shadow, ck.snapshot)
        self.started = not behind
        if not behind:
            self._run()

    def start(self) -> None:
        """The restore, in its thread (once)."""
        if not self.started:
            self.started = True
            self.thread = threading.Thread(target=self._run, name="torpor-restore", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            self.vm = self._restore()
        except BaseException as e:  # raised by wait(), in the caller's thread
            self.error = e

    def _restore(self) -> VM:
        s, mgr = self.s, self.s._mgr
        failed: list[BaseException] = []
        remover = None
        if self.old is not None:
            old = self.old

            def remove_old() -> None:
                try:
                    mgr.remove(old, force=True)
                except NotFoundError:
                    pass
                except BaseException as e:  # raised below
                    failed.append(e)

            remover = threading.Thread(target=remove_old, name="torpor-old-vm", daemon=True)
            remover.start()
        t0 = time.perf_counter()
        # no pool spares for a checkpoint a recovery restores: the session moves on
        # from it, and a spare is a whole restore running beside the replayed turn.
        # Nor a shared base filled for it (one-off: the RAM straight into the VM's
        # own file); forks of a session's checkpoint may be many, so they share one
        # (and a pool spare, which carries no label: a fork's VM is found by its log)
        fork = self.reason == "fork"
        try:
            vm = restore(
                mgr,
                self.ck.snapshot,
                keep_pool=fork,
                shared=fork,
                labels=None if fork else {LABEL: s.id},
            )
        finally:
            if remover is not None:
                remover.join()
        if failed:
            with contextlib.suppress(TorporError):
                mgr.remove(vm.id, force=True)
            raise failed[0]
        name = _vm_name(s.name)
        if name and vm.name != name:
            with contextlib.suppress(ConflictError):  # the name is someone else's VM's
                vm = mgr.rename(vm.id, name)
        self.ms = (time.perf_counter() - t0) * 1000
        if not fork:
            self._remove_strays(vm)
        return vm

    def _remove_strays(self, vm: VM) -> None:
        """Remove the session's other labelled VMs (restored by a recovery killed
        before it logged its VM).  Never fails the restore: a stray left is one more
        VM, which the next restore (or the session's removal) finds again."""
        mgr, sid = self.s._mgr, self.s.id
        try:
            strays = _labelled_vms(mgr, sid) - {vm.id}
        except Exception as e:
            log.warning("session %s: its VMs could not be listed: %s", sid[:12], e)
            return
        for vm_id in strays:
            try:
                mgr.remove(vm_id, force=True)
            except NotFoundError:
                pass  # gone meanwhile: as wanted
            except Exception as e:
                log.warning("session %s: stray VM %s not removed: %s", sid[:12], vm_id[:12], e)

    def wait(self) -> VM:
        """The restored VM, logged; the restore's error if it failed."""
        if not self.started:
            self.started = True
            self._run()
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.vm is not None
        if not self.logged:
            self.s._log_vm(self.vm, self.ck, self.reason, self.ms)
            self.logged = True
        return self.vm

    def settle(self) -> None:
        """However the caller's turn ended: the restore joined and its VM, if it runs,
        logged (it is the session's VM now); a failure of its own is left to
        :meth:`wait`, so that the turn's error is the one raised."""
        if self.thread is not None:
            self.thread.join()
        if self.vm is not None and not self.logged:
            with contextlib.suppress(TorporError):
                self.wait()


class Session:
    """One durable agent session. Create with :meth:`create`, reopen with :meth:`open`."""

    def __init__(
        self,
        record: SessionRecord,
        log: ContextLog,
        paths: Paths,
        *,
        model: Model | None = None,
        dsn: str | None = None,
        on_event: EventHook | None = None,
        owns_log: bool = True,
        tools: Sequence[Tool] | None = None,
    ):
        self.record = record
        self._tools = {t.name: t for t in check_tools(tools)}
        declared = {t.get("name") for t in record.meta.get("tools") or () if isinstance(t, dict)}
        stray = sorted(set(self._tools) - declared)
        if stray:
            raise UsageError(
                f"session {record.name} was created without tool(s) {', '.join(stray)}: "
                "a session's tools are fixed when it is created "
                f"(it has: {', '.join(sorted(n for n in declared if n)) or 'none'})"
            )
        self._lock_owner: int | None = None
        # the lease this object holds (None: none), its host id and heartbeat, and
        # once it found the session taken over, the error every call raises
        self._lease: Lease | None = None
        self._claimed_at = 0.0  # time.monotonic() of the last claim (see _claim_again)
        self._host: str | None = None
        self._beat: Heartbeat | None = None
        self._fenced: FencedError | None = None
        self._turn_seen, self._turn_scan = 0, 0  # see _turns()
        self._owns_log = owns_log  # sessions from list() share one connection
        self.paths = paths
        self._log = log
        self._dsn = dsn
        self._model = model
        self._mgr = VMManager(paths)
        self._cache: list[Entry] = []  # the visible log after _base_seq
        self._view = LogView(owner=record.id)
        # the state record (torpor.session.record): read on the first log access;
        # with one, the cache and the view start after its seq
        self._loaded, self._base_seq = False, 0
        self._prefix: list[Entry] | None = None  # entries 1.._base_seq, once asked for
        self._rec, self._record_status = Writer(), "not read"
        #: phase timings of this object's last checkpoint (ms; benchmarks read them)
        self.last_checkpoint_timings: dict[str, float] = {}
        self.on_event = on_event

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        image: str = "tools:latest",
        model: str | Model = "scripted:demo",
        *,
        name: str | None = None,
        memory_mib: int = 256,
        idle: float | None = None,
        system: str | None = None,
        network: bool = False,
        paths: Paths | None = None,
        dsn: str | None = None,
        on_event: EventHook | None = None,
        tools: Sequence[Tool] | None = None,
        labels: dict[str, str] | None = None,
    ) -> Session:
        """A new session: its log, a VM booted from ``image``, checkpoint 0.

        ``tools``: custom tools offered to the model next to the built-in ones.  Only
        their names are logged; pass the same tools to :meth:`open`/:meth:`resume`
        in any process that runs turns of this session.  ``labels``: the user's
        key/value tags (kept in the session's record, fixed at creation; the HTTP
        API filters lists by them)."""
        from torpor.image.store import ImageStore

        paths = (paths or Paths.default()).ensure()
        if idle is not None and idle < 0:
            raise UsageError("--idle must be >= 0 seconds (0 = never hibernate)")
        custom = check_tools(tools)
        user_labels = _check_labels(labels)
        model_obj = open_model(model) if isinstance(model, str) else model
        image_id = ImageStore(paths).get(image).id  # NotFoundError before anything is made
        log = open_log(dsn, paths=paths)
        meta = {
            "image": image,
            "image_id": image_id,
            "model": model_obj.name,
            "memory_mib": memory_mib,
            "idle": idle or 0,
            "system": system or DEFAULT_SYSTEM,
            "network": network,
        }
        if custom:
            meta["tools"] = [{"name": t.name, "where": t.where} for t in custom]
        if user_labels:
            meta["labels"] = user_labels
        record = log.create_session(name, meta)
        s = cls(record, log, paths, model=model_obj, dsn=dsn, on_event=on_event, tools=custom)
        with s._locked():
            s._claim()
            try:
                req = RunRequest(
                    image=image_id,
                    command=("sleep", "infinity"),
                    name=_vm_name(record.name) or None,
                    memory_mib=memory_mib,
                    network=network,
                    labels={LABEL: record.id},
                )
                vm = s._mgr.run(req)
            except TorporError as e:
                s._append(Kind.ERROR, {"stage": "create", "error": str(e)}, turn=0)
                raise
            s._append(Kind.VM, {"vm": vm.id, "name": vm.name, "reason": "create"}, turn=0)
            s._checkpoint(vm.id, turn=0, reason="create")
        s._arm_idle()
        return s

    @classmethod
    def open(
        cls,
        ref: str,
        *,
        paths: Paths | None = None,
        dsn: str | None = None,
        model: Model | None = None,
        on_event: EventHook | None = None,
        tools: Sequence[Tool] | None = None,
    ) -> Session:
        """Reopen session ``ref``.  ``tools``: its custom tools (code is not in the
        log), needed before this process runs one of its turns."""
        paths = (paths or Paths.default()).ensure()
        log = open_log(dsn, paths=paths)
        try:
            return cls(
                log.get_session(ref),
                log,
                paths,
                model=model,
                dsn=dsn,
                on_event=on_event,
                tools=tools,
            )
        except BaseException:
            log.close()
            raise

    @classmethod
    def resume(cls, ref: str, **kw: Any) -> Session:
        """Open session ``ref`` and make sure its VM runs (waking it if hibernated)."""
        s = cls.open(ref, **kw)
        s.wake()
        return s

    @classmethod
    def list(
        cls, *, paths: Paths | None = None, dsn: str | None = None, include_removed: bool = False
    ) -> list[Session]:
        paths = (paths or Paths.default()).ensure()
        log = open_log(dsn, paths=paths)  # shared by the returned sessions, closed with them
        records = log.list_sessions(include_removed=include_removed)
        if not records:
            log.close()
        return [cls(r, log, paths, dsn=dsn, owns_log=i == 0) for i, r in enumerate(records)]

    def close(self) -> None:
        if self._beat is not None:  # the lease stays ours until it expires (or serve renews)
            self._beat.drop(self)
            self._beat = None
        if self._owns_log:
            self._log.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the log says -------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.record.id

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def model(self) -> Model:
        if self._model is None:
            self._model = open_model(self.record.meta["model"])
        return self._model

    def log(self, after: int = 0) -> list[Entry]:
        """The visible log (entries after ``after``).

        The log is append-only and seqs only grow, so what was read once is kept and
        only newer entries are fetched: a turn's many reads cost O(new entries).
        """
        entries = self._read()
        if after < self._base_seq:  # what the state record stands for: read (and
            # chain-checked) once, on the first call that asks for it, then kept
            if self._prefix is None:
                self._prefix = self._log.entries(self.id, after=0, limit=self._base_seq)
            return [e for e in self._prefix if e.seq > after] + entries
        if after <= 0:
            return list(entries)
        return [e for e in entries if e.seq > after]

    def _read(self) -> list[Entry]:
        """The cached log after the state record's seq (all of it without a record),
        brought up to date (not a copy: do not modify)."""
        if not self._loaded:
            self._load_record()
        upto = self._cache[-1].seq if self._cache else self._base_seq
        self._cache.extend(self._log.entries(self.id, after=upto))
        return self._cache

    def _load_record(self) -> None:
        """Start from the session's verified state record, if it has one; else fold
        the whole log and write one (see :mod:`torpor.session.record`)."""
        self._loaded = True
        got = load_record(self._log, self.id)
        self._record_status = got.status
        if got.fold is not None and got.writer is not None:
            self._base_seq = got.seq
            self._view.seed(got.fold, got.seq, got.prefetch)
            u = got.fold.last_user
            self._turn_seen = u.turn if u is not None else 0
            self._rec = got.writer
            self._record_status = f"used (seq {got.seq})"
        elif got.status != "unavailable" and not self.record.removed:
            self._save_record()  # missing or refused: the log rebuilds it
            if self._record_status.startswith("written"):
                self._record_status = f"{got.status}; {self._record_status}"

    def _key_used(self, key: str) -> bool:
        """Whether any visible entry carries ``key``: the entries after the state
        record from the cache, the rest by the database's key index (a new key, the
        common case, must not cost a read of the whole log)."""
        if any(e.key == key for e in self._read()):
            return True
        if self._base_seq == 0:
            return False
        find = getattr(self._log, "find_key", None)
        return find is None or find(self.id, key) is not None

    def _drop_record(self, why: str = "") -> None:
        """Forget the state record and read the whole log (a marker reached back, or
        the record's conversation failed its check)."""
        self._record_status = why or f"stale (seq {self._base_seq}): the whole log was read"
        self._base_seq, self._cache, self._prefix = 0, [], None
        self._view = LogView(owner=self.id)
        self._turn_seen, self._turn_scan = 0, 0
        self._rec = Writer()

    def _folded(self, fn: Callable[[LogView, list[Entry]], Any]) -> Any:
        """``fn(view, entries)``; once more from the whole log if the record is stale."""
        try:
            return fn(self._view, self._read())
        except _Stale:
            self._drop_record()
        except RecordRefused as e:  # found while its conversation was decoded
            return self._refused(e, fn)
        return fn(self._view, self._read())

    def _refused(self, e: RecordRefused, fn: Callable[[LogView, list[Entry]], Any]) -> Any:
        """A segment of the state record failed its check when it was read: forget the
        record, ``fn`` over the whole log, and write a new record."""
        self._drop_record(f"refused: {e}")
        out = fn(self._view, self._read())
        self._save_record()
        if self._record_status.startswith("written"):
            self._record_status = f"refused: {e}; {self._record_status}"
        return out

    def _save_record(self) -> None:
        """Write the state record at the last settled checkpoint (a cache: a failure
        leaves the log the only source, as it always is)."""
        try:
            self._folded(LogView.state)  # settles through the last checkpoint
            fold, seq = self._folded(lambda view, _: view.settled())
            if seq == 0 or seq <= self._rec.seq:  # nothing settled, or written already
                return
            chain = next((e.chain for e in reversed(self._cache) if e.seq == seq), b"")
            if save_record(self._log, self.id, seq, chain, fold, self._rec):
                self._record_status = f"written (seq {seq})"
                self._forget_settled(seq)
        except TorporError as e:
            self._record_status = f"not written: {e}"

    def _forget_settled(self, seq: int) -> None:
        """The state record just written stands for the log through ``seq``: forget
        the cached entries it covers, as if this object had been opened from it (a
        long-lived worker's memory then follows the unsettled tail, not the log).  A
        whole-log read kept for :meth:`log` keeps them; a refold that would need them
        reads the log again (the view is based on the record: :class:`_Stale`)."""
        cache = self._cache
        k = self._view.rebase(cache, seq)
        if k == 0:
            return
        if self._prefix is not None:
            self._prefix.extend(cache[:k])
        self._cache = cache[k:]  # a new list: a caller iterating the old one is unaffected
        self._base_seq = seq
        self._turn_scan = max(0, self._turn_scan - k)

    def follow(self, after: int = 0, stop: Callable[[], bool] | None = None) -> Iterator[Entry]:
        return self._log.follow(self.id, after=after, stop=stop)

    def state(self) -> SessionState:
        return self._folded(LogView.state)

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return list(self.state().checkpoints)

    def messages(self) -> list[dict[str, Any]]:
        system = self.record.meta.get("system", DEFAULT_SYSTEM)
        return self._folded(lambda view, entries: view.messages(entries, system))

    def _conversation(self, view: LogView, entries: list[Entry]) -> SessionConversation:
        return view.conversation(entries, self.record.meta.get("system", DEFAULT_SYSTEM))

    def _lazy_model(self) -> bool:
        try:
            return bool(self.model.lazy_messages)
        except Exception:  # the turn reports a model that cannot be opened
            return False

    def _model_messages(self, model: Model) -> Sequence[dict[str, Any]]:
        """What ``model.complete`` is given: the lazily decoded conversation for a model
        that reads only what it needs (``lazy_messages``), else every message (a
        provider sends them all: decoding them is the model's cost)."""
        if model.lazy_messages:
            return self._folded(self._conversation)
        return self.messages()

    def _complete(
        self, model: Model, msgs: Sequence[dict[str, Any]], offered: Sequence[Any]
    ) -> Any:
        """``model.complete(msgs, offered)``.  A state-record segment that fails its
        check while the model reads it (RecordRefused) costs a read of the whole log
        and the same question again: the model answered nothing, nothing was logged."""
        try:
            return model.complete(msgs, offered)  # type: ignore[arg-type]
        except RecordRefused as e:
            return model.complete(self._refused(e, self._conversation), offered)  # type: ignore[arg-type]

    def vm(self) -> VM | None:
        st = self.state()
        if st.vm_id is None:
            return None
        try:
            return self._mgr.get(st.vm_id)
        except NotFoundError:
            return None

    def status(self) -> str:
        """running / hibernated / interrupted / stopped / failed / removed."""
        if self.record.removed:
            return "removed"
        st = self.state()
        if not st.checkpoints:
            return "failed"
        if st.pending is not None:
            return "interrupted"
        if st.hibernated:
            return "hibernated"
        vm = self.vm()
        if vm is not None and vm.state.status == Status.HIBERNATED:
            return "hibernated"  # through s.sandbox: resumable, so never "stopped" (pruned)
        return "running" if vm is not None and vm.state.status == Status.RUNNING else "stopped"

    def busy(self) -> bool:
        """Whether another actor (a thread, this host's server, a CLI) holds the session
        now — a turn or another change running.  ``status()`` says ``interrupted`` for
        any open turn; with ``busy()`` false as well, nobody is running it (a crash).
        Probes the session lock for an instant (never waits)."""
        if self._lock_owner is not None:
            return True
        try:
            with locked(self.paths.locks / f"session-{self.id}.lock", wait=False):
                return False
        except BlockingIOError:
            return True

    def stats(self) -> dict[str, Any]:
        st = self.state()
        own = [c for c in st.checkpoints if c.seq > (self.record.parent_seq or 0)]
        log_stats = self._log.stats(self.id)
        return {
            "entries": log_stats["entries"],
            "own_entries": log_stats["own_entries"],
            "log_bytes": log_stats["bytes"],
            "checkpoints": len(st.checkpoints),
            "snapshot_bytes": sum(c.stored_bytes for c in own),
            "turns": st.turns,
            "state_record": self._record_status,
        }

    # -- the log as an API ----------------------------------------------------------------
    def entries(self, after: int = 0, limit: int | None = None) -> list[Entry]:
        """The visible log after seq ``after`` (superseded entries included: see
        :func:`torpor.context.effective` for what still counts); with ``limit``, at
        most that many, read from the database without the whole log (a page)."""
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise UsageError(f"after must be an entry number >= 0, not {after!r}")
        if limit is not None:
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise UsageError(f"limit must be a whole number >= 1, not {limit!r}")
            return self._log.entries(self.id, after=after, limit=limit)
        return self.log(after)

    def append(self, kind: Kind | str, payload: dict[str, Any], *, key: str | None = None) -> Entry:
        """Append an entry; durable before it returns.  With a ``key`` already used in
        this session, returns the stored entry and appends nothing.

        ``kind``: one of :data:`LOOP_KINDS` (``"user"`` starts a turn: the session
        counts as interrupted until the next checkpoint) or a custom dotted name such
        as ``"app.note"``, stored as kind ``custom`` with ``{"type", "data"}``.
        """
        if isinstance(kind, str) and not isinstance(kind, Kind) and "." in kind:
            if not CUSTOM_KIND_RE.fullmatch(kind):
                raise UsageError(
                    f"invalid custom entry kind {kind!r:.80}: use dotted lower-case names "
                    "such as 'app.note' (2-4 parts of [a-z0-9_-])"
                )
            _check_payload(payload, kind)
            return self._append_loop(Kind.CUSTOM, {"type": kind, "data": payload}, key)
        try:
            k = Kind(kind)
        except ValueError:
            raise UsageError(
                f"unknown entry kind {kind!r:.80}: use one of "
                f"{', '.join(sorted(x.value for x in LOOP_KINDS))} or a dotted custom kind "
                "such as 'app.note'"
            ) from None
        if k not in LOOP_KINDS:
            raise UsageError(
                f"entry kind {k.value!r} is written by torpor only (it records the session's "
                "machine and lineage); use checkpoint(), fork(), recover() or a custom kind"
            )
        _check_payload(payload, k.value)
        _check_loop_payload(k, payload)
        return self._append_loop(k, payload, key)

    def _append_loop(self, kind: Kind, payload: dict[str, Any], key: str | None) -> Entry:
        turns = self._turns()
        entry = self._append(kind, payload, turn=turns + 1 if kind is Kind.USER else turns, key=key)
        if self._cache and entry.seq == self._cache[-1].seq + 1:
            self._cache.append(entry)  # what we just wrote: no need to read it back
        return entry

    def checkpoint(self, reason: str = "user") -> Checkpoint:
        """Snapshot the session's VM and log a ``checkpoint`` entry naming it, at the
        current end of the log; both are durable before this returns.  Settles an
        open turn.  Wakes a hibernated VM first, unless nothing happened since it
        was hibernated (then the hibernation's checkpoint is returned)."""
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
            raise UsageError(
                f"a checkpoint reason is 1-{MAX_REASON} characters, not {reason!r:.80}"
            )
        with self._locked():
            st = self.state()
            ck = st.last_checkpoint
            if ck is None:
                raise SessionError(f"session {self.name} never finished starting (no checkpoint 0)")
            if st.hibernated and all(e.kind is Kind.HIBERNATE for e in self.log(after=ck.seq)):
                return ck
            self._claim()  # before judging the VM: another host's is not "gone"
            st = self.state()  # as of the claim: nobody else writes from here on
            if self._live_vm(st) is None and not self._vm_hibernated(st):
                # restoring here would silently drop the work logged since the last
                # checkpoint: the caller decides, through recover()
                raise SessionError(
                    f"session {self.name}: its VM is gone (status {self.status()}); "
                    "recover() restores the last checkpoint (work logged after it is "
                    "superseded)"
                )
            vm = self._ensure_running(st)
            try:
                return self._checkpoint(vm.id, turn=self.state().turns, reason=reason)
            except NotFoundError as e:  # the VM went away under us (sandbox.kill())
                raise SessionError(
                    f"session {self.name}: its VM is gone ({e}); recover() restores the last "
                    "checkpoint (work logged after it is superseded)"
                ) from e

    @property
    def sandbox(self) -> Any:
        """The session's VM as a :class:`torpor.Sandbox`, running (woken or restored
        first, as for a turn).  What the user does with it is the machine's state at
        the next checkpoint.  ``kill()`` or ``hibernate()`` on it do not break the
        session: a killed VM is restored from the last checkpoint by the next turn,
        ``checkpoint()`` raises SessionError until ``recover()`` does that, and
        either way the work logged after that checkpoint is superseded."""
        from torpor.sandbox import Sandbox

        with self._locked():
            vm = self._ensure_running(self.state())
        return Sandbox.connect(vm.id, paths=self.paths)

    @property
    def tools(self) -> tuple[Tool, ...]:
        """The custom tools supplied to this Session object."""
        return tuple(self._tools.values())

    # -- doing -------------------------------------------------------------------------
    def send(self, text: str, *, key: str | None = None, wait: bool = True) -> str:
        """One turn: log the message (durably), let the model work in the VM, checkpoint.

        Returns the model's answer. ``key`` makes the call idempotent: sending the
        same key again returns the answer of the turn it started (finishing that turn
        first if it was interrupted) instead of starting a new one.  A send while
        another actor holds the session (a turn running) queues behind it; with
        ``wait=False`` it raises ConflictError at once and logs nothing.
        """
        if not isinstance(text, str) or not text.strip():
            raise UsageError("a message must not be empty")
        self._check_tools_supplied()  # before the message is acknowledged
        with self._locked_or_busy(wait, "a turn"):
            st = self.state()
            if key is not None and self._key_used(key):
                entries = self.log()  # a key anywhere in the visible log
                for e in entries:
                    if e.kind == Kind.USER and e.key == key:
                        if st.pending is not None and st.pending.seq == e.seq:
                            return self._recover_locked(st)
                        return _answer_of(entries, e.turn)
            if not st.checkpoints:
                raise SessionError(
                    f"session {self.name} never finished starting (no checkpoint 0); "
                    f"remove it with `torpor session rm {self.name}` and create another"
                )
            if st.pending is not None:
                self._recover_locked(st)
                st = self.state()
            # acknowledged first; a VM that fails to wake leaves it pending
            turn = self.append(Kind.USER, {"content": text}, key=key).turn
            answer = self._run_turn(turn)
        self._arm_idle()
        return answer

    def hibernate(self) -> Checkpoint:
        """Checkpoint and end the VM (frees its CPU and RAM); the next send wakes it."""
        with self._locked():
            return self._hibernate_locked()

    def _hibernate_locked(self) -> Checkpoint:
        st = self.state()
        if st.pending is not None:
            raise ConflictError(
                f"session {self.name} has an interrupted turn {st.pending.turn}; "
                f"run `torpor session recover {self.name}` first"
            )
        if st.hibernated and st.last_checkpoint is not None:
            return st.last_checkpoint
        self._claim()  # before judging the VM: another host's is not "gone"
        st = self.state()  # as of the claim: nobody else writes from here on
        if st.hibernated and st.last_checkpoint is not None:  # meanwhile, elsewhere
            self._release_lease()
            return st.last_checkpoint
        vm = self._live_vm(st)
        if vm is None and self._vm_hibernated(st):
            vm = self._ensure_running(st)  # hibernated through s.sandbox: the log did not say
        if vm is None:
            raise SessionError(
                f"session {self.name} has no running VM to hibernate (status {self.status()})"
            )
        ck = self._checkpoint(vm.id, turn=st.turns, reason="hibernate", stop=True)
        self._append(Kind.HIBERNATE, {"vm": vm.id, "snapshot": ck.snapshot}, turn=st.turns)
        self._release_lease()  # hibernated: no host's; it wakes wherever it is opened
        return ck

    def wake(self) -> VM:
        """Make sure the VM runs: resume a hibernated one, recover an interrupted turn."""
        with self._locked():
            st = self.state()
            if st.pending is not None:
                self._recover_locked(st)
                st = self.state()
            vm = self._ensure_running(st)
        self._arm_idle()
        return vm

    def recover(
        self, *, replay: bool = True, wait: bool = True, why: str | None = None
    ) -> str | None:
        """Bring the session back after a crash; returns the replayed turn's answer.

        With no interrupted turn this only makes sure the VM runs (restoring the
        last checkpoint if the VM is gone) and returns None.  ``replay=False`` (for
        a loop of one's own): restore the VM to the last checkpoint and supersede
        the work logged after it, but do not run torpor's loop; the turn stays open
        until the caller's next :meth:`checkpoint`.  ``wait=False``: ConflictError
        at once if another actor holds the session (a turn running).  ``why``: the
        reason a new VM's ``vm`` entry gives (e.g. ``"failover from <host>"``).
        """
        with self._locked_or_busy(wait, "a recovery"):
            st = self.state()
            if st.pending is None:
                self._ensure_running(st, why=why)
                return None
            if not replay:
                ck = st.last_checkpoint
                if ck is None:
                    raise SessionError(f"session {self.name} has no checkpoint to recover from")
                self._restore_vm(ck, reason=why or "recover")
                self._supersede_after(ck, st.pending.turn, "recover")
                return None
            answer = self._recover_locked(st, why=why)
        self._arm_idle()
        return answer

    def fork(self, at: int | Checkpoint | None = None, name: str | None = None) -> Session:
        """A new session sharing this log up to checkpoint ``at`` and a VM forked from it."""
        st = self.state()
        if not st.checkpoints:
            raise SessionError(f"session {self.name} has no checkpoint to fork from")
        if at is None:
            ck = st.checkpoints[-1]
        else:
            seq = at.seq if isinstance(at, Checkpoint) else at
            found = [c for c in st.checkpoints if c.seq == seq]
            if not found:
                have = ", ".join(str(c.seq) for c in st.checkpoints)
                raise UsageError(
                    f"entry {seq} of session {self.name} is not a checkpoint "
                    f"(checkpoints are at: {have})"
                )
            ck = found[0]
        meta = {**self.record.meta, "forked_from": self.id}
        record = self._log.create_session(name, meta, parent=(self.id, ck.seq))
        child = Session(  # its own connection: closing either session leaves the other usable
            record,
            open_log(self._dsn, paths=self.paths),
            self.paths,
            model=self._model,
            dsn=self._dsn,
            on_event=self.on_event,
            tools=self.tools,
        )
        with child._locked():
            child._append(
                Kind.FORK, {"parent": self.id, "at": ck.seq, "snapshot": ck.snapshot}, turn=ck.turn
            )
            child._restore_vm(ck, reason="fork")
        child._arm_idle()
        return child

    def remove(self, reason: str = "removed by the user") -> list[str]:
        """Remove the session: its VMs, its log (a ``removed`` tombstone; nothing is
        deleted, the chain stays checkable), and the snapshots only it needed.

        Afterwards the session is not listed and opening it raises NotFoundError.
        Besides the VM the log names, any VM labelled with this session goes too: one
        booted by a ``create`` that was killed before it could log it.  Snapshots a
        live fork still sees (checkpoints up to its fork point) are kept; the rest are
        removed from the store, so ``torpor gc`` reclaims their chunks.  Returns the
        snapshot ids released.
        """
        with self._locked():
            self._log.get_session(self.id)  # NotFoundError if removed meanwhile
            lease = self._claim()  # LeaseHeldError while another host runs it
            ids = _labelled_vms(self._mgr, self.id)
            ids -= self._forks_vms()  # forks restored before 'torpor.*' labels stopped being copied
            try:
                vm = self.vm()
            except ChainError:
                vm = None  # an edited log still goes; its VMs by their label
            if vm is not None:
                ids.add(vm.id)
            for vm_id in ids:
                with contextlib.suppress(NotFoundError):
                    self._mgr.remove(vm_id, force=True)
            self._log.remove_session(self.id, reason, fence=(self._host_id(), lease.epoch))
            self._release_lease(in_log=False)  # remove_session released it
            self.record = self._log.get_session(self.id, include_removed=True)
        journal.finish_all(self.paths)  # a journaled checkpoint is released like the rest
        return release_snapshots(self._log, self._mgr, self.id)

    def _forks_vms(self) -> set[str]:
        """Every VM a live fork of this session (at any depth) has run in."""
        every = {r.id: r for r in self._log.list_sessions(include_removed=True)}
        out: set[str] = set()
        for r in every.values():
            if r.removed:
                continue
            up = r.parent_id
            while up is not None and up != self.id:
                up = every[up].parent_id if up in every else None
            if up == self.id:
                out.update(str(e.payload.get("vm")) for e in self._log.own_entries(r.id, Kind.VM))
        return out

    @classmethod
    def prune(
        cls,
        *,
        older_than: float | None = None,
        hibernated: bool = False,
        dry_run: bool = False,
        paths: Paths | None = None,
        dsn: str | None = None,
    ) -> list[tuple[str, str, str]]:
        """Remove sessions that ended: ``stopped`` (VM gone or exited) and ``failed``
        (never started), and with ``hibernated`` the hibernated ones too.  Running and
        interrupted sessions are never pruned.  ``older_than`` (seconds) keeps those
        active more recently (last entry's time).  Returns ``(id, name, status)`` of
        each removed (with ``dry_run``: each that would be)."""
        if older_than is not None and older_than < 0:
            raise UsageError("--older-than must be >= 0")
        wanted = {"stopped", "failed"} | ({"hibernated"} if hibernated else set())
        now = time.time()
        out: list[tuple[str, str, str]] = []
        sessions = cls.list(paths=paths, dsn=dsn)
        try:
            for s in sessions:
                try:
                    status = s.status()
                except ChainError:
                    continue  # an edited log is evidence: never pruned
                if status not in wanted:
                    continue
                if older_than is not None and now - s.last_active() < older_than:
                    continue
                if not dry_run:
                    try:
                        s.remove(reason="pruned")
                    except LeaseHeldError:
                        continue  # another host runs it (its VM is not here to see)
                out.append((s.id, s.name, status))
        finally:
            for s in sessions:
                s.close()
        return out

    def last_active(self) -> float:
        """When the last entry was appended (unix seconds)."""
        entries = self._read()
        if not entries and self._base_seq:  # the record's last entry: one row, not the log
            entries = self._log.entries(self.id, after=self._base_seq - 1, limit=1)
        return entries[-1].created_at if entries else self.record.created_at

    # -- internals ---------------------------------------------------------------------
    def _turns(self) -> int:
        """``state().turns`` without folding the log: the turn of the last ``user``
        entry (user entries are never superseded, and the k-th has turn k).  O(new
        entries), so a loop that appends many entries between checkpoints (whose
        unsettled tail ``state()`` folds on every call) stays O(1) per append."""
        entries = self._read()
        for e in entries[self._turn_scan :]:
            if e.kind is Kind.USER:
                self._turn_seen = e.turn
        self._turn_scan = len(entries)
        return self._turn_seen

    def _append(self, kind: Kind, payload: dict[str, Any], *, turn: int, key: str | None = None):
        payload = _no_nul(payload)
        lease = self._lease or self._claim()
        try:
            entry = self._log.append(
                self.id, kind, payload, turn=turn, key=key, fence=(self._host_id(), lease.epoch)
            )
        except FencedError:
            # lapsed (a late heartbeat) or released by this host: the same tenure goes on
            # and the append is retried; taken over: _claim raises, nothing was written
            lease = self._claim()
            entry = self._log.append(
                self.id, kind, payload, turn=turn, key=key, fence=(self._host_id(), lease.epoch)
            )
        if self.on_event is not None:
            self.on_event(entry)
        return entry

    def _host_id(self) -> str:
        if self._host is None:
            self._host = host_id(self.paths)
        return self._host

    def _claim(self) -> Lease:
        """Claim (or renew) the session's lease for this host before touching the machine.

        Another live host holding it: LeaseHeldError, or FencedError if this object
        held it before (it was taken over).  Claimed again at a newer epoch: if another
        host held a tenure in between (``ContextLog.tenures``) this object's view of
        the machine is stale, so it gives the lease back and refuses this and every
        later call; tenures of this same host only (another process of it hibernated
        and woke the session) are no takeover."""
        if self._fenced is not None:
            raise FencedError(
                self._fenced.message,
                session_id=self.id,
                host=self._fenced.host,
                epoch=self._fenced.epoch,
                holder=self._fenced.holder,
                holder_epoch=self._fenced.holder_epoch,
            )
        host, held = self._host_id(), self._lease
        try:
            lease = self._log.claim(self.id, host, lease_ttl())
        except LeaseHeldError as e:
            if held is not None:
                self._go_stale(held, e.holder, e.epoch)
            raise
        if held is not None and lease.epoch != held.epoch:
            others = [t for t in self._log.tenures(self.id, held.epoch) if t[1] != host]
            if others:
                with contextlib.suppress(TorporError):
                    self._log.release(self.id, host, lease.epoch)
                self._go_stale(held, others[-1][1], others[-1][0])
        self._lease, self._claimed_at = lease, time.monotonic()
        if self._beat is None:
            dsn, paths = self._dsn, self.paths  # not self: the thread must not keep it alive
            self._beat = Heartbeat.hold(
                self,
                where=f"{dsn or ''}|{paths.root}",
                host=host,
                ttl=lease_ttl(),
                opener=lambda: open_log(dsn, paths=paths),
            )
        return lease

    def _claim_again(self) -> Lease:
        """:meth:`_claim`, unless this object claimed a moment ago (within the same
        call: a checkpoint claims before judging the VM, then would again before the
        capture and before the entry, each a database write with an fsync).  Safe: the
        lease outlives that moment by far, and every entry is fenced anyway."""
        fresh = min(0.5, lease_ttl() / 4)
        if self._lease is not None and time.monotonic() - self._claimed_at < fresh:
            return self._lease
        return self._claim()

    def _go_stale(self, held: Lease, holder: str | None, epoch: int) -> None:
        self._lease = None
        if self._beat is not None:
            self._beat.drop(self)
            self._beat = None
        by = f"host {holder}" if holder else "another host"
        stopped = self._kill_stale_vms()
        gone = f" (its VM {', '.join(stopped)} here was killed)" if stopped else ""
        self._fenced = FencedError(
            f"session {self.name} was taken over by {by} (epoch {epoch}) while this host"
            f" ({held.host}) held it at epoch {held.epoch}: this Session refuses every"
            f" further call{gone}; open the session again to drive it",
            session_id=self.id,
            host=str(held.host),
            epoch=held.epoch,
            holder=holder,
            holder_epoch=epoch,
        )
        raise self._fenced

    def _kill_stale_vms(self) -> list[str]:
        """After a takeover: kill this home's running VMs that the log named for this
        session but names no more (the new holder runs its own): what they do now is
        no part of the session.  The VM the log names now is left alone (a new holder
        on this same home drives it).  Best effort: the fence holds either way."""
        killed: list[str] = []
        try:
            now = self.state().vm_id
            for e in self._log.own_entries(self.id, Kind.VM):
                vm_id = e.payload.get("vm")
                if not isinstance(vm_id, str) or vm_id == now or vm_id in killed:
                    continue
                try:
                    vm = self._mgr.get(vm_id)
                except (NotFoundError, UsageError):
                    continue
                if vm.state.status.active:
                    self._mgr.kill(vm.id)
                    killed.append(vm.name or vm.id)
        except TorporError:
            pass
        return killed

    def _release_lease(self, *, in_log: bool = True) -> None:
        lease, self._lease = self._lease, None
        if in_log and lease is not None:
            self._log.release(self.id, self._host_id(), lease.epoch)
        if self._beat is not None:
            self._beat.drop(self)
            self._beat = None

    @contextlib.contextmanager
    def _locked(self, wait: bool = True) -> Iterator[None]:
        """One actor per session on this host: turns, hibernation and recovery queue.

        Re-entrant for the thread holding it through this object, so the built-in
        loop can call the public :meth:`checkpoint` under its turn's lock.  With
        ``wait=False`` a busy session raises BlockingIOError at once.
        """
        me = threading.get_ident()
        if self._lock_owner == me:
            yield
            return
        with locked(self.paths.locks / f"session-{self.id}.lock", wait=wait):
            self._lock_owner = me
            try:
                yield
            finally:
                self._lock_owner = None

    @contextlib.contextmanager
    def _locked_or_busy(self, wait: bool, what: str) -> Iterator[None]:
        """:meth:`_locked`; with ``wait=False`` a held lock is a ConflictError (the
        HTTP API answers 409 instead of holding a request for a whole turn)."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self._locked(wait=wait))
            except BlockingIOError:
                raise ConflictError(
                    f"session {self.name} is busy (a turn or another change is running); "
                    f"{what} can start once it ends"
                ) from None
            yield

    def _live_vm(self, st: SessionState) -> VM | None:
        if st.vm_id is None:
            return None
        try:
            vm = self._mgr.get(st.vm_id)
        except NotFoundError:
            return None
        return vm if vm.state.status == Status.RUNNING else None

    def _vm_hibernated(self, st: SessionState) -> bool:
        if st.vm_id is None:
            return False
        try:
            return self._mgr.get(st.vm_id).state.status == Status.HIBERNATED
        except NotFoundError:
            return False

    def _ensure_running(self, st: SessionState, why: str | None = None) -> VM:
        """The session's VM, running: as it is, resumed in place, or restored."""
        self._claim_again()  # before the VM is used: a host that lost the session stops here
        st = self.state()  # as of the claim: what another host did before it counts
        if st.vm_id is not None:
            try:
                vm = self._mgr.get(st.vm_id)
            except NotFoundError:
                vm = None
            if vm is not None and vm.state.status == Status.RUNNING:
                return vm
            if vm is not None and vm.state.status == Status.HIBERNATED:
                t0 = time.perf_counter()
                vm = self._mgr.start(vm.id)
                ms = (time.perf_counter() - t0) * 1000
                self._append(
                    Kind.RESUME,
                    {"vm": vm.id, "ms": round(ms, 1), "from": "hibernated"},
                    turn=st.turns,
                )
                return vm
        ck = st.last_checkpoint
        if ck is None:
            raise SessionError(f"session {self.name} has no VM and no checkpoint to restore")
        vm = self._restore_vm(ck, reason=why or "vm lost")
        # a loop's work logged after the checkpoint is gone from the restored machine
        self._supersede_after(ck, st.turns, "vm lost")
        return vm

    def _restore_vm(self, ck: Checkpoint, *, reason: str) -> VM:
        """A new VM for this session from checkpoint ``ck`` (the old one is removed),
        logged by a ``vm`` entry.  See :class:`_Restoring` (which a recovery runs
        beside its model call)."""
        return _Restoring(self, ck, reason).wait()

    def _log_vm(self, vm: VM, ck: Checkpoint, reason: str, ms: float) -> None:
        self._append(
            Kind.VM,
            {
                "vm": vm.id,
                "name": vm.name,
                "reason": reason,
                "checkpoint": ck.seq,
                "snapshot": ck.snapshot,
                "ms": round(ms, 1),
            },
            turn=ck.turn,
        )

    def _recover_locked(self, st: SessionState, why: str | None = None) -> str:
        assert st.pending is not None
        self._check_tools_supplied()  # before the VM is touched
        ck = st.last_checkpoint
        if ck is None:
            raise SessionError(f"session {self.name} has no checkpoint to recover from")
        if not self._lazy_model():  # it will send every message: decode them meanwhile
            self._view.prefetch()
        # the replayed turn's first model call reads the log only: the VM is restored
        # beside it, and waited for at the turn's first tool call (or its checkpoint)
        restoring = _Restoring(self, ck, why or "recover", behind=True)
        try:
            self._supersede_after(ck, st.pending.turn, "replayed")
            return self._run_turn(st.pending.turn, restoring)
        finally:
            restoring.settle()

    def _supersede_after(self, ck: Checkpoint, turn: int, why: str) -> None:
        """Mark the work logged after ``ck`` superseded: the VM was just restored to it."""
        partial = [e.seq for e in effective(self.log(after=ck.seq)) if e.kind in TURN_WORK]
        if partial:
            self._append(
                Kind.SUPERSEDE,
                {
                    "seqs": partial,
                    "reason": f"turn {turn} was interrupted; the VM was restored "
                    f"to checkpoint {ck.seq} ({why})",
                },
                turn=turn,
            )

    def _run_turn(self, turn: int, restoring: _Restoring | None = None) -> str:
        """Torpor's loop for one turn; ``restoring``: the VM is still being restored
        (a recovery), waited for at the first tool call or the checkpoint."""
        begin: Callable[[], object]  # the restore started (a recovery's)
        vm_ready: Callable[[], VM]  # the VM, once it runs
        if restoring is None:
            running = self._ensure_running(self.state())
            begin, vm_ready = (lambda: None), (lambda: running)
        else:
            begin, vm_ready = restoring.start, restoring.wait
        self._check_tools_supplied()
        model = self.model
        offered = (*TOOLS, *(t.spec for t in self._tools.values()))
        answer = ""
        # the built-in loop is one user of the public log API: append + checkpoint
        with contextlib.ExitStack() as stack:
            clients: list[Any] = []

            def client() -> Any:  # the VM's agent, connected at the first tool call
                if not clients:
                    clients.append(stack.enter_context(self._mgr.client(vm_ready())))
                return clients[0]

            for step in range(MAX_STEPS):
                msgs = self._model_messages(model)  # decoded only as far as the model reads
                self.append(
                    Kind.MODEL_REQUEST, {"model": model.name, "step": step, "messages": len(msgs)}
                )
                begin()  # (a recovery's VM, restored beside the model call)
                try:
                    resp = self._complete(model, msgs, offered)
                except ModelError as e:
                    self.append(
                        Kind.ERROR, {"stage": "model", "error": str(e), "type": type(e).__name__}
                    )
                    vm_ready()
                    self.checkpoint(reason="turn")
                    raise
                self.append(Kind.MODEL_RESPONSE, resp.to_json())
                answer = resp.text
                if not resp.tool_calls:
                    break
                for call in resp.tool_calls:
                    c = client()  # (a restored VM is logged before the call it runs)
                    self.append(
                        Kind.TOOL_CALL,
                        {"id": call.id, "name": call.name, "arguments": call.arguments},
                    )
                    custom = self._tools.get(call.name)
                    if custom is not None:
                        result = run_custom(c, custom, call.id, call.arguments)
                    else:
                        result = run_tool(c, call.id, call.name, call.arguments)
                    self.append(Kind.TOOL_RESULT, _no_nul(result.to_json()))
            else:
                self.append(
                    Kind.ERROR, {"stage": "model", "error": f"no answer after {MAX_STEPS} steps"}
                )
        vm_ready()
        self.checkpoint(reason="turn")
        return answer

    def _check_tools_supplied(self) -> None:
        """A turn needs every custom tool the session was created with: code is not in
        the log, and a model offered fewer tools (or a call skipped) would silently
        change what the session does."""
        declared = [
            t.get("name") for t in self.record.meta.get("tools") or () if isinstance(t, dict)
        ]
        missing = [str(n) for n in declared if n not in self._tools]
        if missing:
            raise SessionError(
                f"session {self.name} uses custom tool(s) {', '.join(missing)}, which this "
                "process did not supply: pass tools=[...] to Session.open/resume "
                "(tools are code; the log holds only their names)"
            )

    def _checkpoint(self, vm_id: str, *, turn: int, reason: str, stop: bool = False) -> Checkpoint:
        t0 = time.perf_counter()
        self._claim_again()  # the entry below is fenced too: a snapshot meanwhile stays unnamed
        upto = self._log.last_seq(self.id)
        tag = f"session {self.name} turn {turn}"
        t1 = time.perf_counter()
        # the fast path: durable once the capture is journaled, stored behind (see
        # torpor.snapshot.journal; None: a first snapshot, a bucket store, ...)
        res = None if stop else journal.fast_snapshot(self._mgr, vm_id, tag=tag)
        journaled = res is not None
        if res is None:
            res = snapshot(self._mgr, vm_id, tag=tag, stop=stop)
        t2 = time.perf_counter()
        entry = self._append(
            Kind.CHECKPOINT,
            {
                "snapshot": res.manifest.id,
                "vm": vm_id,
                "upto": upto,
                "reason": reason,
                # journaled: what the store will hold is known once the commit behind
                # ran (compression, dedup), so 0 here and the journal's size apart
                "stored_bytes": 0 if journaled else res.stored_bytes,
                "new_chunks": res.new_chunks,
                "pause_ms": round(res.pause_ms, 1),
                "durable_ms": round(res.durable_ms, 1),
                # with a bucket: acknowledged in it, or locally with the upload pending
                **durability_fields(res.timings),
                # journaled: durable in this home's checkpoint journal, stored behind
                **({"journal": True, "journal_bytes": res.stored_bytes} if journaled else {}),
            },
            turn=turn,
        )
        t3 = time.perf_counter()
        self._save_record()  # after the checkpoint entry: the record is at its seq
        t4 = time.perf_counter()
        self.last_checkpoint_timings = {  # for benchmarks (torpor bench turn)
            **res.timings,
            "journal": float(journaled),
            "pause_ms": res.pause_ms,
            "durable_ms": res.durable_ms,
            "claim_ms": (t1 - t0) * 1000,
            "snapshot_ms": (t2 - t1) * 1000,
            "entry_ms": (t3 - t2) * 1000,
            "record_ms": (t4 - t3) * 1000,
            "checkpoint_ms": (t4 - t0) * 1000,
        }
        failpoints.hit("session.checkpoint_logged")
        return Checkpoint.from_entry(entry)

    def _arm_idle(self) -> None:
        """Hibernate after ``idle`` seconds without a new log entry (a detached watcher)."""
        idle = float(self.record.meta.get("idle") or 0)
        if idle <= 0:
            return
        cmd = [
            sys.executable,
            "-m",
            "torpor.session.idle",
            "--root",
            str(self.paths.root),
            "--session",
            self.id,
            "--seq",
            str(self._log.last_seq(self.id)),
            "--after",
            str(idle),
        ]
        env = dict(os.environ)
        if self._dsn:  # in the environment, not argv: a DSN may hold a password
            env["TORPOR_CONTEXT_DSN"] = self._dsn
        subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd="/",
            env=env,
        )
