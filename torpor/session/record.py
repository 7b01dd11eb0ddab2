"""State records: the fold of a session's log at a checkpoint, kept so that opening
a session does not read, check and fold every entry it ever logged.

Role: a *cache*.  The log stays the source of truth; a record is verified before it
is used, and a record that is missing, stale or refused only costs a full read of
the log (which then writes a new one).

What a record holds: the :class:`~torpor.session.core._Fold` of the session's visible
log up to (and including) a ``checkpoint`` entry at seq ``S`` — VM id, hibernated
flag, turn count, the last ``user`` entry, every checkpoint and the conversation
messages.  It is stored in two tables of the context database (created on first use,
``IF NOT EXISTS``, in both backends; no schema version bump: the tables are a cache
an older torpor ignores)::

    torpor_state        session_id PK, seq, body (the head), mac
    torpor_state_parts  (session_id, digest) PK, body   -- sealed segments

The head is JSON: ``{v, sid, seq, vm_id, hibernated, turns, last_user, segs, msgs,
cks}``.  ``segs`` lists sealed segments as ``[blake2b-256 hex, n messages, n
checkpoints]`` in order; ``msgs``/``cks`` are what came after the last segment.  A
segment (``{"msgs": [...], "cks": [...]}``) is sealed once its JSON reaches
:data:`SEGMENT_BYTES` and is never written again (content-addressed), so a
checkpoint rewrites only the head — at most about one segment's worth of bytes, not
the whole conversation.

Invariants (what a reader checks before it uses a record):

- ``mac = BLAKE2b-256(key = K_state, "torpor-state-v1" || sid || 0 || seq (8 bytes)
  || chain(seq) || head)``, where ``K_state`` is derived from the home's key (the
  one that MACs the log) for this purpose only, and ``chain(seq)`` is the *stored*
  chain value of the session's visible entry ``seq``, read from the log in the same
  transaction.  A record forged without the key, copied from another session, or
  from a log whose entry ``seq`` is not the one it was computed over (a rewritten or
  replaced log) is refused.
- The head's ``sid`` and ``seq`` equal the row's; every segment it names exists and
  hashes to its digest, with the stated counts.
- Entries after ``seq`` are read with ``ContextLog.entries(after=seq)``, which checks
  them against entry ``seq``'s stored chain value: the record anchors the chain.

What this does *not* verify at open: the entries at or before ``seq`` themselves —
their content is represented by the record, computed by a holder of the key from
entries it had checked when it read them.  ``torpor session verify`` (and any full
read, e.g. ``Session.log()``) still checks every row.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import orjson

from torpor.context import ChainError, Entry, Kind

if TYPE_CHECKING:
    from torpor.context import ContextLog
    from torpor.session.core import _Fold

FORMAT = 1
#: A segment is sealed once the unsealed tail's JSON is at least this long.
SEGMENT_BYTES = 256 * 1024
_DOMAIN = b"torpor-state-v1"


def state_key(log: ContextLog) -> bytes | None:
    """The record MAC key of ``log`` (None: this backend keeps no records)."""
    get = getattr(log, "state_key", None)
    return get() if callable(get) else None


def record_mac(key: bytes, sid: str, seq: int, chain: bytes, head: bytes) -> bytes:
    data = _DOMAIN + sid.encode() + b"\0" + seq.to_bytes(8, "big") + chain + head
    return hashlib.blake2b(data, key=key, digest_size=32).digest()


def _digest(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=32).hexdigest()


def _ck_list(c: Any) -> list[Any]:
    # every field in declaration order: a Checkpoint with other fields (a newer or
    # older torpor) makes Checkpoint(*list) fail, and the record is refused
    return [getattr(c, f.name) for f in fields(c)]


def _entry_dict(e: Entry | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {
        "session_id": e.session_id,
        "seq": e.seq,
        "kind": e.kind.value,
        "payload": e.payload,
        "key": e.key,
        "created_at": e.created_at,
        "turn": e.turn,
        "chain": e.chain.hex(),
    }


@dataclass
class Writer:
    """What this process has sealed of one fold (segments are content-addressed, so
    sealing again after a reset only re-inserts identical rows)."""

    fold: Any = None
    segs: list[list[Any]] = field(default_factory=list)
    n_msgs: int = 0
    n_cks: int = 0
    seq: int = 0  # the last record written or read

    def reset(self, fold: Any) -> None:
        self.fold, self.segs, self.n_msgs, self.n_cks = fold, [], 0, 0


@dataclass
class Loaded:
    """The outcome of :func:`load`: a fold at ``seq``, or why there is none."""

    fold: _Fold | None
    seq: int
    status: str  # "used", "missing", "refused: …", "unavailable"
    writer: Writer | None = None


def save(log: ContextLog, sid: str, seq: int, chain: bytes, fold: _Fold, w: Writer) -> bool:
    """Write the record of ``fold`` (the fold of ``sid``'s visible log through entry
    ``seq``, whose stored chain value is ``chain``).  False: not written (no key, or
    the fold holds what orjson cannot encode, such as integers beyond 64 bits)."""
    key = state_key(log)
    if key is None or len(chain) != 32:
        return False
    if w.fold is not fold:
        w.reset(fold)
    parts: dict[str, bytes] = {}
    try:
        tail_m = fold.msgs[w.n_msgs :]
        tail_c = [_ck_list(c) for c in fold.checkpoints[w.n_cks :]]
        tail = orjson.dumps({"msgs": tail_m, "cks": tail_c})
        if len(tail) >= SEGMENT_BYTES:
            d = _digest(tail)
            parts[d] = tail
            w.segs.append([d, len(tail_m), len(tail_c)])
            w.n_msgs += len(tail_m)
            w.n_cks += len(tail_c)
            tail_m, tail_c = [], []
        head = orjson.dumps(
            {
                "v": FORMAT,
                "sid": sid,
                "seq": seq,
                "vm_id": fold.vm_id,
                "hibernated": fold.hibernated,
                "turns": fold.turns,
                "last_user": _entry_dict(fold.last_user),
                "segs": w.segs,
                "msgs": tail_m,
                "cks": tail_c,
            }
        )
    except (TypeError, orjson.JSONEncodeError):
        w.reset(None)
        return False
    log.state_put(sid, seq, head, record_mac(key, sid, seq, chain, head), parts)  # type: ignore[attr-defined]
    w.seq = seq
    return True


def load(log: ContextLog, sid: str) -> Loaded:
    """The verified record of ``sid``, or why it cannot be used (see the module doc)."""
    from torpor.session.core import Checkpoint, _Fold

    key = state_key(log)
    if key is None:
        return Loaded(None, 0, "unavailable")
    try:
        got = log.state_get(sid)  # type: ignore[attr-defined]
    except ChainError as e:
        return Loaded(None, 0, f"refused: {e}")
    if got is None:
        return Loaded(None, 0, "missing")
    seq, head, mac, chain, parts = got
    if chain is None:
        return Loaded(None, 0, f"refused: the log has no entry {seq}")
    if not hmac.compare_digest(mac, record_mac(key, sid, seq, chain, head)):
        return Loaded(
            None,
            0,
            "refused: its MAC does not match (forged, another session's, or the log's "
            f"entry {seq} is not the one it was written for)",
        )
    try:
        h = orjson.loads(head)
        if h["v"] != FORMAT or h["sid"] != sid or h["seq"] != seq:
            return Loaded(None, 0, "refused: its header names another session, seq or format")
        f = _Fold()
        w = Writer()
        msgs: list[dict[str, Any]] = []
        cks: list[list[Any]] = []
        for d, nm, nc in h["segs"]:
            body = parts.get(d)
            if body is None or _digest(body) != d:
                return Loaded(None, 0, f"refused: segment {d[:12]} is missing or altered")
            seg = orjson.loads(body)
            if len(seg["msgs"]) != nm or len(seg["cks"]) != nc:
                return Loaded(None, 0, f"refused: segment {d[:12]} has the wrong length")
            msgs += seg["msgs"]
            cks += seg["cks"]
            w.segs.append([d, nm, nc])
            w.n_msgs += nm
            w.n_cks += nc
        msgs += h["msgs"]
        cks += h["cks"]
        f.msgs = msgs
        f.checkpoints = [Checkpoint(*c) for c in cks]
        f.vm_id = h["vm_id"]
        f.hibernated = bool(h["hibernated"])
        f.turns = int(h["turns"])
        u = h["last_user"]
        if u is not None:
            f.last_user = Entry(
                u["session_id"],
                u["seq"],
                Kind(u["kind"]),
                u["payload"],
                u["key"],
                u["created_at"],
                u["turn"],
                bytes.fromhex(u["chain"]),
            )
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as e:
        return Loaded(None, 0, f"refused: malformed ({type(e).__name__})")
    w.fold, w.seq = f, seq
    return Loaded(f, seq, "used", w)
