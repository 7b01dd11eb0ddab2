"""Snapshot, restore and fork running microVMs (see :mod:`torpor.snapshot.core`)."""

from torpor.snapshot.core import SnapshotResult, restore, snapshot

__all__ = ["SnapshotResult", "restore", "snapshot"]
