"""Shell completion of VM, image, snapshot and session names (click's ``_TORPOR_COMPLETE``).

Each completer reads the library's own listings and returns the names (and ids)
starting with what was typed.  A completer runs on every <Tab>: it never raises
(a broken or missing home completes nothing) and imports only the layer it reads.
Names come from VMs, images and users: anything with a control character or white
space is not offered (it would corrupt the shell's line).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from typing import Any

from click.shell_completion import CompletionItem

_SAFE = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]+\Z")


def _items(names: Iterable[str], incomplete: str) -> list[CompletionItem]:
    seen: dict[str, None] = {}
    for n in names:
        if n and n.startswith(incomplete) and _SAFE.match(n):
            seen.setdefault(n)
    return [CompletionItem(n) for n in seen]


def _paths() -> Any:
    from torpor.paths import Paths

    return Paths.default()


def vm_names(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    with contextlib.suppress(Exception):  # completion must never print a traceback
        from torpor.vmm.manager import VMManager

        vms = VMManager(_paths()).list(all=True)
        return _items([*(v.name for v in vms), *(v.id[:12] for v in vms)], incomplete)
    return []


def image_names(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    with contextlib.suppress(Exception):
        from torpor.image.store import ImageStore

        imgs = ImageStore(_paths()).list()
        return _items([t for im in imgs for t in im.repo_tags], incomplete)
    return []


def _snapshots(ctx: Any) -> list[Any]:
    """The home's snapshots as every command sees them (with a bucket: its listing,
    any host's), or, if the bucket does not answer within :data:`BUCKET_WAIT`, those
    this host's cache holds: a <Tab> never hangs on a slow or unreachable bucket."""
    import os
    import threading

    from torpor.store import ChunkStore
    from torpor.store.home import home_store

    params = (ctx.find_root().params or {}) if ctx is not None else {}
    if params.get("store_url"):  # `torpor --store URL restore <Tab>`: callbacks do not run
        os.environ["TORPOR_STORE"] = str(params["store_url"])
    # opening the bucket store resumes this home's pending uploads: never wait for them
    os.environ["TORPOR_UPLOAD_EXIT_WAIT"] = "0"
    found: list[Any] = []

    def listing() -> None:
        with contextlib.suppress(Exception):
            store = home_store(_paths())
            try:
                found.append(store.scan()[0])
            finally:
                store.close()

    t = threading.Thread(target=listing, daemon=True)
    t.start()
    t.join(BUCKET_WAIT)
    if found:
        return list(found[0])
    store = ChunkStore(_paths().store)  # the cache: every manifest this host has seen
    try:
        return store.scan()[0]
    finally:
        store.close()


BUCKET_WAIT = 3.0  # seconds a completion waits for the bucket's listing


def snapshot_names(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    with contextlib.suppress(Exception):
        good = _snapshots(ctx)
        names = []
        for m in good:  # a tag works wherever a snapshot id does
            if m.meta.get("tag"):
                names.append(str(m.meta["tag"]))
            names.append(m.id[:12])
        return _items(names, incomplete)
    return []


def session_names(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    with contextlib.suppress(Exception):
        from torpor.session import Session

        dsn = (ctx.find_root().obj or {}).get("dsn") if ctx is not None else None
        sessions = Session.list(paths=_paths(), dsn=dsn)
        return _items([n for s in sessions for n in (s.name, s.id[:12])], incomplete)
    return []
