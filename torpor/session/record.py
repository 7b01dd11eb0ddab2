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

The head is JSON: ``{v, sid, seq, vm_id, hibernated, turns, last_user, msegs, csegs,
msgs, cks, users, chars}`` (``users``/``chars``: the conversation's number of user
messages and total content length, so a model that needs only those and the tail never
decodes the rest).  ``msegs``/``csegs`` list the sealed segments of messages and of
checkpoints as ``[BLAKE3 hex, count]`` in order; ``msgs``/``cks`` are what came after
the last sealed one.  A segment (a JSON list) is sealed once its JSON reaches
:data:`SEGMENT_BYTES` and is never written again (content-addressed), so a checkpoint
rewrites only the head — at most about one segment's worth of bytes, not the whole
conversation.

Opening checks the head and the checkpoint segments at once; each of the
conversation's segments is read, checked and decoded when a message in it is first read
(:class:`~torpor.session.conversation.MsgList`), or by a background thread once a caller
knows it will need them all (:attr:`Loaded.prefetch`: a recovery whose model sends every
message starts it before the VM restore, which it then overlaps).  The state (which VM,
which checkpoint, is a turn pending) never waits for the conversation, a caller that
only asks for the state (a listing) never decodes it, and a model that reads only the
tail (the scripted one) decodes at most the last segment.  A segment that fails then
makes the session read its whole log and write a new record.

Invariants (what a reader checks before it uses a record):

- ``mac = BLAKE2b-256(key = K_state, "torpor-state-v1" || sid || 0 || seq (8 bytes)
  || chain(seq) || head)``, where ``K_state`` is derived from the home's key (the
  one that MACs the log) for this purpose only, and ``chain(seq)`` is the *stored*
  chain value of the session's visible entry ``seq``, read from the log in the same
  transaction.  A record forged without the key, copied from another session, or
  from a log whose entry ``seq`` is not the one it was computed over (a rewritten or
  replaced log) is refused.
- The head's ``sid`` and ``seq`` equal the row's; every segment it names exists and
  hashes to its digest, with the stated count (messages: before they are used).
- Entries after ``seq`` are read with ``ContextLog.entries(after=seq)``, which checks
  them against entry ``seq``'s stored chain value: the record anchors the chain.

What this does *not* verify at open: the entries at or before ``seq`` themselves —
their content is represented by the record, computed by a holder of the key from
entries it had checked when it read them.  ``torpor session verify`` (and any full
read, e.g. ``Session.log()``) still checks every row.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import blake3
import orjson

from torpor.context import ChainError, Entry, Kind
from torpor.session.conversation import MsgList, Segment

if TYPE_CHECKING:
    from torpor.context import ContextLog
    from torpor.session.core import _Fold

FORMAT = 3  # 3: users and chars in the head (a format-2 record is refused, then rewritten)
#: A segment is sealed once the unsealed tail's JSON is at least this long.
SEGMENT_BYTES = 256 * 1024
_DOMAIN = b"torpor-state-v1"


class RecordRefused(Exception):
    """A record's conversation failed its check while it was decoded (after open)."""


def state_key(log: ContextLog) -> bytes | None:
    """The record MAC key of ``log`` (None: this backend keeps no records)."""
    get = getattr(log, "state_key", None)
    return get() if callable(get) else None


def record_mac(key: bytes, sid: str, seq: int, chain: bytes, head: bytes) -> bytes:
    data = _DOMAIN + sid.encode() + b"\0" + seq.to_bytes(8, "big") + chain + head
    return hashlib.blake2b(data, key=key, digest_size=32).digest()


def _digest(body: bytes) -> str:
    # BLAKE3: several times faster than BLAKE2b on a long conversation, and it releases
    # the GIL, so the background decode overlaps the VM restore better
    return blake3.blake3(body, max_threads=blake3.blake3.AUTO).hexdigest()


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
    msegs: list[list[Any]] = field(default_factory=list)  # [digest, n messages]
    csegs: list[list[Any]] = field(default_factory=list)  # [digest, n checkpoints]
    n_msgs: int = 0
    n_cks: int = 0
    seq: int = 0  # the last record written or read

    def reset(self, fold: Any) -> None:
        self.fold, self.msegs, self.csegs, self.n_msgs, self.n_cks = fold, [], [], 0, 0


@dataclass
class Loaded:
    """The outcome of :func:`load`: a fold at ``seq`` whose sealed messages decode when
    read (RecordRefused if a segment fails), or why there is none."""

    fold: _Fold | None
    seq: int
    status: str  # "used", "missing", "refused: …", "unavailable"
    writer: Writer | None = None
    #: start decoding every sealed message in the background (else reads decode them)
    prefetch: Callable[[], None] | None = None


def _seal(items: list[Any], segs: list[list[Any]], parts: dict[str, bytes]) -> list[Any]:
    """Seal ``items`` as segments of about :data:`SEGMENT_BYTES` if their JSON is at
    least that long (a whole log folded at once gives many); what stays in the head.
    Small segments keep each decode step short: the background decode takes the GIL
    one segment at a time, never for the whole conversation."""
    body = orjson.dumps(items)
    if len(body) < SEGMENT_BYTES:
        return items
    k = -(-len(body) // SEGMENT_BYTES)
    step = -(-len(items) // k)
    for i in range(0, len(items), step):
        chunk = items[i : i + step]
        b = body if k == 1 else orjson.dumps(chunk)
        d = _digest(b)
        parts[d] = b
        segs.append([d, len(chunk)])
    return []


def save(log: ContextLog, sid: str, seq: int, chain: bytes, fold: _Fold, w: Writer) -> bool:
    """Write the record of ``fold`` (the fold of ``sid``'s visible log through entry
    ``seq``, whose stored chain value is ``chain``).  False: not written (no key, or
    the fold holds what orjson cannot encode, such as integers beyond 64 bits)."""
    key = state_key(log)
    if key is None or len(chain) != 32:
        return False
    fresh = w.fold is not fold
    if fresh:
        w.reset(fold)
    parts: dict[str, bytes] = {}
    try:
        n_m, n_c = len(fold.msgs), len(fold.checkpoints)
        tail_m = _seal(fold.msgs.since(w.n_msgs), w.msegs, parts)
        tail_c = _seal([_ck_list(c) for c in fold.checkpoints[w.n_cks :]], w.csegs, parts)
        w.n_msgs, w.n_cks = n_m - len(tail_m), n_c - len(tail_c)
        head = orjson.dumps(
            {
                "v": FORMAT,
                "sid": sid,
                "seq": seq,
                "vm_id": fold.vm_id,
                "hibernated": fold.hibernated,
                "turns": fold.turns,
                "last_user": _entry_dict(fold.last_user),
                "msegs": w.msegs,
                "csegs": w.csegs,
                "msgs": tail_m,
                "cks": tail_c,
                "users": fold.msgs.users,
                "chars": fold.msgs.chars,
            }
        )
    except (TypeError, orjson.JSONEncodeError):
        w.reset(None)
        return False
    keep = [d for d, _ in w.msegs + w.csegs] if fresh else None  # a new fold: drop the old
    mac = record_mac(key, sid, seq, chain, head)
    log.state_put(sid, seq, head, mac, parts, keep)  # type: ignore[attr-defined]
    w.seq = seq
    return True


def _segments(segs: list[list[Any]], parts: dict[str, bytes]) -> list[Any]:
    out: list[Any] = []
    for d, n in segs:
        body = parts.get(d)
        if body is None or _digest(body) != d:
            raise RecordRefused(f"segment {d[:12]} is missing or altered")
        items = orjson.loads(body)
        if not isinstance(items, list) or len(items) != n:
            raise RecordRefused(f"segment {d[:12]} has the wrong length")
        out += items
    return out


def load(log: ContextLog, sid: str) -> Loaded:
    """The verified record of ``sid``, or why it cannot be used (see the module doc).

    The head (state, checkpoints) is checked and decoded here; the conversation's
    segments are checked and decoded by a background thread, so that work overlaps
    what a recovery does next (restoring the VM) and is waited for only when the
    messages are first needed."""
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
    seq, head, mac, chain = got
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
        w = Writer(msegs=[list(x) for x in h["msegs"]], csegs=[list(x) for x in h["csegs"]])
        w.n_msgs = sum(n for _, n in w.msegs)
        w.n_cks = sum(n for _, n in w.csegs)
        cparts = log.state_parts(sid, [d for d, _ in w.csegs])  # type: ignore[attr-defined]
        cks = _segments(w.csegs, cparts) + h["cks"]
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
        tail_msgs = h["msgs"]
        users, chars = h["users"], h["chars"]
        if not (
            isinstance(tail_msgs, list) and isinstance(users, int) and isinstance(chars, int)
        ):
            raise TypeError("msgs")
        f.msgs = MsgList(
            [Segment(n, _segment_loader(log, sid, d, n)) for d, n in w.msegs],
            tail_msgs,
            users=users,
            chars=chars,
        )
    except RecordRefused as e:
        return Loaded(None, 0, f"refused: {e}")
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as e:
        return Loaded(None, 0, f"refused: malformed ({type(e).__name__})")
    worker = threading.Thread(
        target=_quietly(f.msgs.decode), name=f"torpor-record-{sid[:8]}", daemon=True
    )
    started = threading.Lock()

    def prefetch() -> None:
        """Decode every sealed message now, in the background (a caller about to need
        them all: a recovery whose model sends the whole conversation)."""
        with started:
            if worker.ident is None:
                worker.start()

    w.fold, w.seq = f, seq
    return Loaded(f, seq, "used", w, prefetch)


def _segment_loader(
    log: ContextLog, sid: str, digest: str, n: int
) -> Callable[[], list[dict[str, Any]]]:
    """Read, check and decode one sealed segment of messages (RecordRefused if it fails).
    One short read per segment: the session's own database calls interleave."""

    def load() -> list[dict[str, Any]]:
        try:
            part = log.state_parts(sid, [digest])  # type: ignore[attr-defined]
            return _segments([[digest, n]], part)
        except RecordRefused:
            raise
        except (TypeError, ValueError, orjson.JSONDecodeError) as e:
            raise RecordRefused(str(e)) from e
        except Exception as e:  # the database failed: the log answers instead
            raise RecordRefused(f"its segments could not be read ({type(e).__name__})") from e

    return load


def _quietly(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` for a background thread: a failure is left for the reader that needs the
    data to meet (a segment that failed is read and checked again on access)."""

    def run() -> None:
        with contextlib.suppress(Exception):
            fn()

    return run
