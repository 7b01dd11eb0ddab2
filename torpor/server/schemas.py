"""JSON shapes of sessions, checkpoints and log entries, shared by every face of the API.

One serializer per library object (:func:`entry_json`, :func:`checkpoint_json`,
:func:`session_json`): the routes, the SSE streams, the remote client (which turns
the JSON back into objects) and the dashboard all read the same fields, so a field
added here shows up everywhere at once.  The pydantic models document those shapes
in ``/openapi.json`` and check request bodies; every request model forbids unknown
fields (a typo is a 422, not a silently ignored option).

Invariants: an entry's JSON carries everything the log stores but its MAC (``seq``,
``turn``, ``kind``, ``payload``, ``key``, ``created``, ``session_id`` — the session
that owns the row, an ancestor's id for what a fork inherited); times are unix
seconds (floats); sizes are bytes.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # the server imports the VM stack only when a route needs it
    from torpor.context import Entry
    from torpor.session.core import Checkpoint, Session

HOST = socket.gethostname()


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- log entries ------------------------------------------------------------------------


class EntryOut(BaseModel):
    seq: int
    turn: int
    kind: str = Field(description="user, model_request, model_response, tool_call, ...")
    payload: dict[str, Any]
    key: str | None = None
    created: float = Field(description="unix seconds, the appender's clock")
    session_id: str = Field(description="the session owning the row (an ancestor's for a fork)")


def entry_json(e: Entry) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "turn": e.turn,
        "kind": e.kind.value,
        "payload": e.payload,
        "key": e.key,
        "created": e.created_at,
        "session_id": e.session_id,
    }


class LogPage(BaseModel):
    entries: list[EntryOut]
    next_cursor: str | None = Field(
        None, description="pass as cursor (or after) for the next page; null at the end"
    )
    last_seq: int = Field(description="the last entry's seq when the page was read")


class AppendIn(_In):
    kind: str = Field(
        max_length=256,
        description="a conversation kind (user, model_request, model_response, tool_call, "
        "tool_result, error) or a dotted custom kind such as 'app.note'; checked by the "
        "library (400 with its reason)",
    )
    payload: dict[str, Any]
    key: str | None = Field(None, max_length=256, description="idempotency key")


# -- checkpoints ------------------------------------------------------------------------


class CheckpointOut(BaseModel):
    seq: int
    snapshot: str
    turn: int
    reason: str
    stored_bytes: int
    pause_ms: float
    durable_ms: float
    created: float


def checkpoint_json(c: Checkpoint) -> dict[str, Any]:
    return {
        "seq": c.seq,
        "snapshot": c.snapshot,
        "turn": c.turn,
        "reason": c.reason,
        "stored_bytes": c.stored_bytes,
        "pause_ms": c.pause_ms,
        "durable_ms": c.durable_ms,
        "created": c.created_at,
    }


class CheckpointIn(_In):
    reason: str = Field("user", min_length=1, max_length=200)


# -- sessions ---------------------------------------------------------------------------


class VMRef(BaseModel):
    id: str
    name: str
    status: str


class SessionOut(BaseModel):
    id: str
    name: str
    status: str = Field(
        description="running, hibernated, interrupted, stopped, failed, removed, broken"
    )
    busy: bool = Field(
        description="another actor holds the session now (a turn running): with status "
        "interrupted, false means the turn was cut (a crash) and waits for recovery"
    )
    turns: int
    entries: int = Field(description="the last entry's seq")
    checkpoints: int
    model: str | None
    image: str | None
    created: float
    last_active: float
    stored_bytes: int = Field(description="bytes this session's own checkpoints added")
    log_bytes: int
    vm: VMRef | None
    host: str
    labels: dict[str, str]
    parent: str | None
    parent_seq: int | None
    last_checkpoint: CheckpointOut | None


def session_json(s: Session) -> dict[str, Any]:
    """What ``GET /v1/sessions/{ref}`` answers; an edited log (ChainError) answers
    status ``broken`` rather than failing a whole list."""
    from torpor.context import ChainError

    rec = s.record
    out: dict[str, Any] = {
        "id": s.id,
        "name": s.name,
        "model": rec.meta.get("model"),
        "image": rec.meta.get("image"),
        "created": rec.created_at,
        "host": HOST,
        "labels": dict(rec.meta.get("labels") or {}),
        "parent": rec.parent_id,
        "parent_seq": rec.parent_seq,
    }
    try:
        st = s.state()
        stats = s.stats()
        vm = s.vm()
        out.update(
            status=s.status(),
            busy=s.busy(),
            turns=st.turns,
            entries=st.last_seq,
            checkpoints=len(st.checkpoints),
            last_active=s.last_active(),
            stored_bytes=stats["snapshot_bytes"],
            log_bytes=stats["log_bytes"],
            vm=(
                {"id": vm.id, "name": vm.name, "status": vm.state.status.value}
                if vm is not None
                else None
            ),
            last_checkpoint=(
                checkpoint_json(st.last_checkpoint) if st.last_checkpoint is not None else None
            ),
        )
    except ChainError:
        out.update(
            status="broken",
            busy=False,
            turns=0,
            entries=0,
            checkpoints=0,
            last_active=rec.created_at,
            stored_bytes=0,
            log_bytes=0,
            vm=None,
            last_checkpoint=None,
        )
    return out


class SessionList(BaseModel):
    items: list[SessionOut]
    next_cursor: str | None = None


class SessionCreate(_In):
    image: str = Field("tools:latest", min_length=1, max_length=512)
    model: str = Field(
        "scripted:demo",
        min_length=1,
        max_length=256,
        description="provider:model (scripted:<builtin>, openai:..., anthropic:...); "
        "a script file on the server cannot be named — send `script` instead",
    )
    script: dict[str, Any] | None = Field(
        None, description="a scripted-model document (format version 1), used instead of model"
    )
    name: str | None = Field(None, min_length=1, max_length=64)
    memory_mib: int = Field(256, ge=64, le=65536)
    idle: float | None = Field(None, ge=0, description="hibernate after this many idle seconds")
    system: str | None = Field(None, max_length=65536)
    network: bool = False
    labels: dict[str, str] | None = None


class MessageIn(_In):
    text: str = Field(min_length=1, max_length=1 << 20)


class MessageOut(BaseModel):
    answer: str
    entries: list[EntryOut] = Field(description="the entries the turn appended")


class ForkIn(_In):
    at: int | None = Field(None, ge=1, description="checkpoint seq (default: the last)")
    name: str | None = Field(None, min_length=1, max_length=64)


class RecoverOut(BaseModel):
    answer: str | None = Field(description="the replayed turn's answer; null if none was open")
    session: SessionOut


class Removed(BaseModel):
    id: str
    removed: bool = True
    released_snapshots: list[str]
