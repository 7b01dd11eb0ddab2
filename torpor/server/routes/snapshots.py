"""/v1/snapshots routes (being written; see docs/api.md for the contract)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
