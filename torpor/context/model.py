"""The context log's value types and the pure functions over them.

Role: what an entry and a session *are*, how payloads are encoded, and how the
visible log is reduced to its effective content.  No database here.

Invariants:

- An :class:`Entry` is immutable and so is its place in the log: ``(session_id,
  seq)`` names one entry forever.  Corrections are new entries: a ``SUPERSEDE``
  entry (payload ``{"seqs": [...], "reason": "..."}``) marks *earlier* entries of
  the same visible log as replaced; :func:`effective` drops both.
- Payloads and session ``meta`` are JSON objects.  They are encoded once, here,
  with one encoder for every backend, and what an ``append`` returns is the
  decoded encoding (tuples come back as lists), so the returned entry equals the
  one read back later.  Strings may not contain U+0000, which PostgreSQL's
  ``jsonb`` cannot store; the SQLite backend refuses it too so both behave alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from torpor.errors import UsageError

__all__ = [
    "SCHEMA_VERSION",
    "Entry",
    "HostRecord",
    "Kind",
    "Lease",
    "SessionRecord",
    "effective",
    "superseded",
]

SCHEMA_VERSION = 2  # 2: entries carry a MAC chain; sessions can be removed (docs/context-log.md)
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
MIN_PREFIX = 4
MAX_KEY_LEN = 256


class Kind(StrEnum):
    """What an entry records; the values are the strings stored in the database."""

    USER = "user"
    MODEL_REQUEST = "model_request"
    MODEL_RESPONSE = "model_response"  # payload carries token usage and latency
    TOOL_CALL = "tool_call"
    TOOL_RESULT = "tool_result"
    CHECKPOINT = "checkpoint"
    HIBERNATE = "hibernate"
    RESUME = "resume"
    ERROR = "error"
    SUPERSEDE = "supersede"  # {"seqs": [int, ...], "reason": str}
    FORK = "fork"
    VM = "vm"  # "this session now runs in VM <id>": {"vm": id, ...}
    REMOVED = "removed"  # the tombstone: the session was removed; its last entry
    CUSTOM = "custom"  # a user's own entry (Session.append): {"type": "ns.name", "data": {...}}


@dataclass(frozen=True)
class Entry:
    """One entry of a session's log.

    ``session_id`` is the session that *owns* the row: entries a fork inherits
    keep their ancestor's id (they are shared by reference, not copied).
    """

    session_id: str
    seq: int
    kind: Kind
    payload: dict[str, Any]
    key: str | None
    created_at: float  # unix seconds, the appender's clock
    turn: int  # 0 = before any user message; chosen by the caller
    # MAC chain value (torpor.context.chain); b"" only where an entry is built by hand
    chain: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True)
class SessionRecord:
    """A session.  ``parent_id``/``parent_seq``: it inherits the parent's visible
    entries with ``seq <= parent_seq``; its own entries start at ``parent_seq + 1``."""

    id: str
    name: str
    created_at: float
    parent_id: str | None
    parent_seq: int | None
    meta: dict[str, Any]  # image, model, memory, ...; immutable after create
    schema_version: int = 1
    removed_at: float | None = None  # set once the session was removed (a tombstone)

    @property
    def removed(self) -> bool:
        return self.removed_at is not None


@dataclass(frozen=True)
class Lease:
    """Which host owns a session now (mutable state beside the log, not an entry).

    ``host`` None: released (a hibernated session belongs to no host).  ``epoch``
    grows by one whenever the holder changes, a release included, so a write fenced
    with ``(host, epoch)`` can only succeed for the holder of that one tenure.
    ``expires_at``: unix seconds on the *database's* clock (hosts' clocks never
    decide); compare it with :meth:`ContextLog.now`, not ``time.time()``."""

    session_id: str
    host: str | None
    epoch: int
    expires_at: float


@dataclass(frozen=True)
class HostRecord:
    """A host that heartbeats into the log's database.  ``started_at``: the start of
    its current alive stretch (a heartbeat after the previous one expired restarts
    it); ``alive``: its last heartbeat is within the ttl it gave (database clock)."""

    id: str
    info: dict[str, Any]
    started_at: float
    heartbeat_at: float
    alive: bool


def superseded(entries: Iterable[Entry]) -> set[int]:
    """The seqs marked by ``SUPERSEDE`` entries.  A marker can only replace entries
    before it; seqs it names that are not earlier are ignored."""
    out: set[int] = set()
    for e in entries:
        if e.kind is Kind.SUPERSEDE:
            out.update(s for s in _seqs(e.payload) if s < e.seq)
    return out


def effective(entries: Iterable[Entry]) -> list[Entry]:
    """``entries`` minus the superseded ones and minus the ``SUPERSEDE`` markers."""
    entries = list(entries)
    gone = superseded(entries)
    return [e for e in entries if e.kind is not Kind.SUPERSEDE and e.seq not in gone]


def _seqs(payload: dict[str, Any]) -> list[int]:
    seqs = payload.get("seqs")
    if not isinstance(seqs, list):
        return []
    return [s for s in seqs if isinstance(s, int) and not isinstance(s, bool)]


# -- validation and encoding (shared by every backend) --------------------------------


def check_name(name: str, what: str = "session name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid {what} {name!r}: use 1-64 of [a-zA-Z0-9_.-], starting with a letter or digit"
        )
    return name


def check_kind(kind: Kind | str) -> Kind:
    try:
        return Kind(kind)
    except ValueError:
        known = ", ".join(k.value for k in Kind)
        raise UsageError(f"unknown entry kind {kind!r} (known: {known})") from None


def check_turn(turn: int) -> int:
    if not isinstance(turn, int) or isinstance(turn, bool) or turn < 0:
        raise UsageError(f"turn must be an integer >= 0, not {turn!r}")
    return turn


def check_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN or "\x00" in key:
        raise UsageError(
            f"idempotency key must be a non-empty string of at most {MAX_KEY_LEN}"
            f" characters without NUL, not {key!r:.80}"
        )
    return key


HOST_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.:-]{0,127}")
MAX_TTL = 86400.0


def check_host(host: str) -> str:
    if not isinstance(host, str) or not HOST_RE.fullmatch(host):
        raise UsageError(
            f"invalid host id {host!r:.80}: use 1-128 of [a-zA-Z0-9_.:-], starting with a"
            " letter or digit"
        )
    return host


def check_ttl(ttl: float) -> float:
    if (
        not isinstance(ttl, int | float)
        or isinstance(ttl, bool)
        or not 0 < ttl <= MAX_TTL  # NaN fails this too
    ):
        raise UsageError(f"a lease ttl is a number of seconds in (0, {MAX_TTL:g}], not {ttl!r}")
    return float(ttl)


def check_fence(fence: tuple[str, int] | None) -> None:
    """``None`` or ``(host id, epoch >= 1)``."""
    if fence is None:
        return
    if not isinstance(fence, tuple) or len(fence) != 2:
        raise UsageError(f"a fence is (host, epoch), not {fence!r:.80}")
    check_host(fence[0])
    epoch = fence[1]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise UsageError(f"a fence's epoch is an integer >= 1, not {epoch!r}")


def check_supersede(payload: dict[str, Any], seq: int) -> None:
    """A ``SUPERSEDE`` entry at ``seq`` must name earlier seqs of the visible log."""
    seqs = payload.get("seqs")
    if (
        not isinstance(seqs, list)
        or not seqs
        or any(not isinstance(s, int) or isinstance(s, bool) or not 1 <= s < seq for s in seqs)
    ):
        raise UsageError(
            f"a supersede entry needs payload {{'seqs': [...]}} naming earlier entries"
            f" (1..{seq - 1}), got {seqs!r:.200}"
        )


def encode_json(obj: dict[str, Any], what: str) -> tuple[str, int]:
    """``obj`` as compact JSON text and its UTF-8 size; UsageError if it can't be stored."""
    if not isinstance(obj, dict):
        raise UsageError(f"{what} must be a JSON object (a dict), not {type(obj).__name__}")
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{what} is not storable as JSON: {e}") from e
    if "\\u0000" in text and _has_nul(obj):
        raise UsageError(
            f"{what} contains a NUL character (U+0000), which PostgreSQL cannot store in"
            " text: replace it (e.g. with U+FFFD) before appending"
        )
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise UsageError(f"{what} is not valid Unicode (lone surrogate?): {e}") from e
    return text, size


def decode_json(value: str | dict[str, Any]) -> dict[str, Any]:
    """A stored payload as a dict.  orjson first: reading a 1000-turn session's 11,000
    entries spent 125 ms in ``json.loads``; orjson takes ~3x less.  It refuses what
    ``json`` accepts beyond 64-bit integers (a model may put one in tool arguments):
    then ``json`` decodes it."""
    if not isinstance(value, str):
        return value  # PostgreSQL's jsonb arrives decoded
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return json.loads(value)


def _has_nul(obj: Any) -> bool:
    if isinstance(obj, str):
        return "\x00" in obj
    if isinstance(obj, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return any(_has_nul(v) for v in obj)
    return False
