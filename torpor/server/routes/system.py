"""``/healthz`` (no auth: for load balancers) and ``/v1/info`` (who am I, where)."""

from __future__ import annotations

import socket
from typing import Any

from fastapi import APIRouter

from torpor import __version__
from torpor.server.deps import TenantDep

router = APIRouter()


@router.get("/healthz", tags=["system"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/info", tags=["system"])
def info(t: TenantDep) -> dict[str, Any]:
    return {
        "version": __version__,
        "host": socket.gethostname(),
        "namespace": t.namespace,
        "authenticated": t.token_id is not None,
    }
