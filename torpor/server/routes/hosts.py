"""``GET /v1/hosts``: the hosts sharing this server's context log (``torpor hosts``).

Each row: host id, alive (heartbeat within its TTL), seconds since its last heartbeat,
the sessions it holds, and what its heartbeat said (hostname, pid, version).  A caller
sees the log of its own namespace (a namespace's sessions live in a schema of their
own, and so do its leases); reads only, from the database, never cached.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from torpor.server.deps import TenantDep

router = APIRouter()


@router.get("/v1/hosts", tags=["system"])
def hosts(t: TenantDep) -> list[dict[str, Any]]:
    from torpor.cluster.failover import host_rows
    from torpor.context import open_log

    with open_log(None, paths=t.paths) as lg:
        return host_rows(lg)
