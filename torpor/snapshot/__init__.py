"""Snapshot, restore and fork running microVMs (see :mod:`torpor.snapshot.core`)."""

from torpor.snapshot.core import SnapshotResult, fork, last_snapshot, restore, snapshot

__all__ = ["SnapshotResult", "fork", "last_snapshot", "restore", "snapshot"]
