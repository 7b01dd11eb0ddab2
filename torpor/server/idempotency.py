"""Idempotency keys for creates (``Idempotency-Key`` header, as Stripe and E2B do).

The first request with a key runs and its result (the created resource's id and the
response body) is recorded under the namespace's home; a retry with the same key
gets the recorded result without running again — also when it arrives while the
first is still running (it waits on the key's lock).  A key reused for another kind
of request is a 409.  Session *sends* need none of this: the context log itself
makes a send idempotent by key (``Session.send(text, key=...)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from torpor.errors import ConflictError, UsageError
from torpor.fsutil import atomic_write_json, locked, read_json
from torpor.paths import Paths

MAX_KEY = 255


def once(
    paths: Paths, key: str | None, scope: str, run: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """``run()`` once per (namespace, key); its JSON-able result is returned to retries."""
    if key is None:
        return run()
    if not key or len(key) > MAX_KEY or not key.isprintable():
        raise UsageError(f"Idempotency-Key must be 1-{MAX_KEY} printable characters")
    h = hashlib.sha256(key.encode()).hexdigest()
    folder = paths.root / "server" / "idempotency"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    rec = folder / f"{h}.json"
    with locked(paths.locks / f"idem-{h[:16]}.lock"):
        try:
            old = read_json(rec)
        except FileNotFoundError:
            old = None
        if old is not None:
            if old.get("scope") != scope:
                raise ConflictError(
                    f"Idempotency-Key {key!r} was used for {old.get('scope')}, not {scope}"
                )
            return dict(old["result"])
        result = run()
        atomic_write_json(rec, {"version": 1, "scope": scope, "result": result})
        return result
