"""API tokens: bearer secrets, each naming one namespace; stored hashed.

A token reads ``tpr_<id>_<secret>``: ``id`` (8 hex) finds the record, the secret
(256 random bits) is never stored — only SHA-256 of the whole token, compared in
constant time.  A fast hash is right here: the secret has full entropy, so there is
nothing to brute-force that a slow hash would protect.

Records live in ``HOME/server/tokens.json`` (0600, written atomically under a lock,
versioned).  Revoking keeps the record (``revoked`` time) so ``token ls`` can show
it; an expired or revoked token authenticates nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torpor.errors import NotFoundError, UsageError
from torpor.fsutil import atomic_write_json, locked, read_json
from torpor.paths import Paths
from torpor.server.tenancy import check_namespace

VERSION = 1
PREFIX = "tpr_"


@dataclass(frozen=True)
class Token:
    id: str
    namespace: str
    hash: str
    created: float
    name: str = ""
    expires: float | None = None
    revoked: float | None = None

    def active(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.revoked is None and (self.expires is None or now < self.expires)


@dataclass
class _File:
    version: int = VERSION
    tokens: list[Token] = field(default_factory=list)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, home: Paths):
        self.path: Path = home.root / "server" / "tokens.json"
        self._lock = home.locks / "tokens.lock"
        self._cache: tuple[tuple[int, int], dict[str, Token]] | None = None

    # -- reading -----------------------------------------------------------------------------
    def _load(self) -> _File:
        try:
            raw: dict[str, Any] = read_json(self.path)
        except FileNotFoundError:
            return _File()
        if raw.get("version") != VERSION:
            raise UsageError(f"{self.path}: token file version {raw.get('version')} unknown")
        return _File(VERSION, [Token(**t) for t in raw.get("tokens", [])])

    def list(self) -> list[Token]:
        return self._load().tokens

    def configured(self) -> bool:
        """Whether any token is active: then every request must carry one."""
        return any(t.active() for t in self._by_id().values())

    def _by_id(self) -> dict[str, Token]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        key = (st.st_mtime_ns, st.st_size)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, {t.id: t for t in self._load().tokens})
        return self._cache[1]

    def verify(self, token: str) -> Token | None:
        """The active record ``token`` proves, or None."""
        if not token.startswith(PREFIX):
            return None
        tid, _, _ = token[len(PREFIX) :].partition("_")
        rec = self._by_id().get(tid)
        if rec is None or not hmac.compare_digest(rec.hash, _digest(token)):
            return None
        return rec if rec.active() else None

    # -- writing -----------------------------------------------------------------------------
    def _save(self, f: _File) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_json(
            self.path, {"version": f.version, "tokens": [asdict(t) for t in f.tokens]}
        )

    def create(
        self, namespace: str, *, name: str = "", ttl: float | None = None
    ) -> tuple[Token, str]:
        """A new token for ``namespace``; returns its record and the secret (shown once)."""
        check_namespace(namespace)
        if ttl is not None and ttl <= 0:
            raise UsageError("a token's lifetime must be positive")
        with locked(self._lock):
            f = self._load()
            ids = {t.id for t in f.tokens}
            tid = secrets.token_hex(4)
            while tid in ids:
                tid = secrets.token_hex(4)
            secret = f"{PREFIX}{tid}_{secrets.token_urlsafe(32)}"
            now = time.time()
            rec = Token(tid, namespace, _digest(secret), now, name, now + ttl if ttl else None)
            f.tokens.append(rec)
            self._save(f)
        return rec, secret

    def revoke(self, token_id: str) -> Token:
        with locked(self._lock):
            f = self._load()
            for i, t in enumerate(f.tokens):
                if t.id == token_id:
                    if t.revoked is None:
                        f.tokens[i] = t = Token(**{**asdict(t), "revoked": time.time()})
                        self._save(f)
                    return t
        raise NotFoundError(f"no token {token_id!r}")
