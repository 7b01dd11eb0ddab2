"""Durable agent sessions (see :mod:`torpor.session.core`)."""

from torpor.session.core import Checkpoint, Session, SessionError, SessionState

__all__ = ["Checkpoint", "Session", "SessionError", "SessionState"]
