"""The context log's tamper-evidence: a keyed MAC chain over every entry.

Role: the pure functions that compute and check the ``chain`` value every entry
row carries.  The SQL layer (:mod:`torpor.context.sql`) stores it on append and
checks it on every read.

The chain (``K`` = the home's secret, ``ROOT/store/key``, the same 32 bytes that
authenticate snapshot manifests; :func:`torpor.store.store.load_key`)::

    base(S)    = MAC(K, anchor(S) || canonical(session record S))
    anchor(S)  = 32 zero bytes                         S is a root session
               = chain of the entry at S.parent_seq    S forks P at parent_seq >= 1
                 in P's visible log (P's own or inherited)
               = base(P)                               S forks P at 0
    chain(S,n) = MAC(K, prev || canonical(entry n of S))
    prev       = base(S)               n = S.parent_seq + 1 (root: n = 1)
               = chain(S, n-1)         otherwise (S's own previous entry)

``MAC`` is keyed BLAKE2b with a 32-byte digest (RFC 7693's keyed mode, a MAC by
design: no length extension, so no HMAC wrapping is needed).  Measured here per
entry of ~500 bytes: 2.1 us against 7.7 us for ``hmac.digest(..., "sha256")``
(OpenSSL's one-shot HMAC sets up a context per call); every read checks every row,
so this is the read path's cost.

A fork's first own entry chains onto its parent's entry at the fork point
(through the fork's own record), and a forked view verifies from seq 1 through
every ancestor.  ``canonical(entry)`` covers the owner's session id, seq, kind,
turn, key, created_at and the payload exactly as the database returns it (SQLite:
the stored text; PostgreSQL: ``jsonb`` rendered as text, which the append asks the
server for before computing the MAC).

What it catches: any change to an entry's content, kind, turn, key or time, to a
session's name, meta or fork point, a deleted entry in the middle, reordered or
renumbered entries, and rows copied from another session — anything that needs
a new MAC, which only a holder of ``K`` can compute.  What it does not: dropping
the *last* entries of a session (the tail), or the whole session; and a party
holding ``K`` can forge anything (the key is the trust boundary, as for
manifests).  Every row is checkable given its predecessor's stored chain value, so
a reader that already checked entries 1..k checks only k+1.. (incremental).
"""

from __future__ import annotations

import hashlib

import orjson

__all__ = ["GENESIS", "MAC_BYTES", "entry_mac", "session_base"]

MAC_BYTES = 32
GENESIS = bytes(MAC_BYTES)


def _mac(key: bytes, prev: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(prev + data, key=key, digest_size=MAC_BYTES).digest()


def canonical_entry(
    session_id: str,
    seq: int,
    kind: str,
    turn: int,
    key: str | None,
    created_at: float,
    payload_text: str,
) -> bytes:
    """The bytes an entry's MAC covers: a JSON header line, then the payload text."""
    head = orjson.dumps(["torpor-entry-1", session_id, seq, kind, turn, key, created_at])
    return head + b"\n" + payload_text.encode("utf-8")


def canonical_session(
    session_id: str,
    name: str,
    created_at: float,
    parent_id: str | None,
    parent_seq: int | None,
    meta_text: str,
) -> bytes:
    head = orjson.dumps(["torpor-session-1", session_id, name, created_at, parent_id, parent_seq])
    return head + b"\n" + meta_text.encode("utf-8")


def entry_mac(key: bytes, prev: bytes, canonical: bytes) -> bytes:
    return _mac(key, prev, canonical)


def session_base(key: bytes, anchor: bytes, canonical: bytes) -> bytes:
    return _mac(key, anchor, canonical)
