"""``from torpor.aio import Sandbox``: the awaitable Sandbox (torpor.sandbox.aio)."""

from torpor.sandbox.aio import AsyncCommandHandle, AsyncFiles, Sandbox

__all__ = ["AsyncCommandHandle", "AsyncFiles", "Sandbox"]
