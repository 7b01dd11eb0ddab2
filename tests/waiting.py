"""Polling with a deadline, for tests that wait on another process's progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], what: str, timeout: float = 60.0, step: float = 0.05) -> T:
    """``cond()``'s first truthy value, polled every ``step`` s; AssertionError naming
    ``what`` if none comes within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")
