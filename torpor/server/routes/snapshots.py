"""``/v1/snapshots``: the tenant's snapshot store over HTTP (docs/api.md is the contract).

The same library calls as ``torpor snapshots`` / ``snapshot inspect`` / ``snapshot
rm`` / ``restore``, on the tenant's home.  A damaged manifest is listed (with
``damaged`` saying why) and can be removed; inspecting it is a problem naming it.

Invariants: restore checks isolation with the accelerator the snapshot's VM was
made for before it starts a VM; lineage (``children``, ``ancestors``) is computed
from the manifests that load, bounded by the store's size (a cycle a forged store
might hold cannot loop: each id is visited once).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response

from torpor.paths import Paths
from torpor.sandbox import Sandbox
from torpor.server.deps import TenantDep, check_isolation
from torpor.server.idempotency import once
from torpor.server.sandbox_schemas import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    RestoreIn,
    SandboxOut,
    SnapshotDetail,
    SnapshotList,
    SnapshotOut,
    page,
)

router = APIRouter(tags=["snapshots"])


def _store(paths: Paths) -> Any:
    """The tenant's store as the CLI sees it: with a bucket, its snapshots (any
    host's) under the namespace's prefix (torpor.store.home)."""
    from torpor.store.home import home_store

    return home_store(paths)


def _row(m: Any) -> SnapshotOut:
    try:
        cfg = json.loads(m.meta.get("vm", "{}"))
    except ValueError:
        cfg = {}
    if not isinstance(cfg, dict):
        cfg = {}
    return SnapshotOut(
        id=m.id,
        parent=m.parent,
        created=str(m.created),
        kind=str(m.kind),
        tag=str(m.meta.get("tag", "")),
        vm=str(cfg.get("name", "")),
        image=str(cfg.get("image_ref", "")),
        sizes={k: a.size for k, a in m.artifacts.items()},
        chunks={k: sum(1 for c in a.chunks if c) for k, a in m.artifacts.items()},
    )


@router.get("/v1/snapshots", response_model=SnapshotList)
def list_(
    t: TenantDep,
    vm: Annotated[str | None, Query(description="only snapshots of this VM (name)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> SnapshotList:
    """Every snapshot, oldest first; damaged ones carry ``damaged``."""
    store = _store(t.paths)
    try:
        good, bad = store.scan()
    finally:
        store.close()
    rows = [_row(m) for m in good]
    if vm:
        rows = [r for r in rows if r.vm == vm]
    else:
        rows += [SnapshotOut(id=i, damaged=e.message) for i, e in bad]
    rows.sort(key=lambda r: (r.created, r.id))
    items, nxt = page(rows, lambda r: [r.created, r.id], limit, cursor)
    return SnapshotList(items=items, next_cursor=nxt)


@router.get("/v1/snapshots/{ref}", response_model=SnapshotDetail)
def inspect(ref: str, t: TenantDep) -> SnapshotDetail:
    """One snapshot (id, id prefix or tag) with its lineage: parent, ancestors
    (parent first), children."""
    store = _store(t.paths)
    try:
        m = store.get(ref)
        good, _ = store.scan()
    finally:
        store.close()
    by_id = {x.id: x for x in good}
    children = sorted(x.id for x in good if x.parent == m.id)
    ancestors: list[str] = []
    seen = {m.id}
    p = m.parent
    while p and p not in seen:
        ancestors.append(p)
        seen.add(p)
        p = by_id[p].parent if p in by_id else None
    return SnapshotDetail(
        **_row(m).model_dump(),
        children=children,
        ancestors=ancestors,
        distinct_chunks=len(m.chunks),
    )


@router.delete("/v1/snapshots/{ref}", status_code=204)
def remove(
    ref: str,
    t: TenantDep,
    force: Annotated[bool, Query(description="even if other snapshots build on it")] = False,
) -> Response:
    """Remove a snapshot (damaged ones too); its chunks go at the next gc."""
    from torpor.snapshot.core import remove_snapshot
    from torpor.vmm.manager import VMManager

    remove_snapshot(VMManager(t.paths), ref, force=force)
    return Response(status_code=204)


@router.post("/v1/snapshots/{ref}/restore", status_code=201, response_model=SandboxOut)
def restore(
    ref: str,
    request: Request,
    t: TenantDep,
    body: RestoreIn | None = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> dict[str, Any]:
    """``Sandbox.restore``: the snapshot as a new running sandbox."""
    from torpor.server.routes.sandboxes import _accel, _out
    from torpor.vmm.manager import VMManager

    name = (body or RestoreIn()).name
    store = _store(t.paths)
    try:
        m = store.get(ref)
    finally:
        store.close()
    try:
        requested = str(json.loads(m.meta.get("vm", "{}")).get("accel", "auto"))
    except (ValueError, AttributeError):
        requested = "auto"  # restore itself says what is wrong with the snapshot
    check_isolation(request, _accel(t.paths, requested))

    def run() -> dict[str, Any]:
        sb = Sandbox.restore(m.id, name=name, paths=t.paths)
        try:
            mgr = VMManager(t.paths)
            return _out(mgr, mgr.get(sb.id)).model_dump()
        finally:
            sb.close()

    return once(t.paths, idempotency_key, f"snapshot.restore:{m.id}", run)
