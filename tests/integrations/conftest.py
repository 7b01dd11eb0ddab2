"""Fixtures for the framework adapters' tests (OpenAI Agents SDK, LangGraph).

Real parts only: torpor sessions on real QEMU VMs, the real framework packages,
and the real ``openai`` client talking HTTP to :class:`tests.model.fakeapi.FakeAPI`
on 127.0.0.1 (only the model's transport is scripted).  Provider environment
variables are cleared so a developer's keys or base URLs never leak into a test,
and the SDKs' tracing/telemetry is off (no network).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.model.fakeapi import FakeAPI
from torpor.paths import Paths
from torpor.session import Session

_ENV = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "OPENAI_DEFAULT_MODEL",
    "LANGCHAIN_API_KEY",
    "LANGSMITH_API_KEY",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    monkeypatch.setenv("LANGCHAIN_TRACING_V2", "false")
    monkeypatch.setenv("LANGSMITH_TRACING", "false")


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    """A local OpenAI-compatible server (``api.url + "/v1"``) scripted per test."""
    server = FakeAPI()
    try:
        yield server
    finally:
        server.close()


class Sessions:
    """Creates torpor sessions on real VMs and removes them (VMs, snapshots) at teardown."""

    def __init__(self, paths: Paths, image: str):
        self.paths, self.image = paths, image
        self.made: list[Session] = []

    def create(self, **kw: Any) -> Session:
        s = Session.create(self.image, "scripted:demo", paths=self.paths, **kw)
        self.made.append(s)
        return s

    def open(self, ref: str, **kw: Any) -> Session:
        s = Session.open(ref, paths=self.paths, **kw)
        self.made.append(s)
        return s

    def track(self, s: Session) -> Session:
        """Remove ``s`` (a fork, say) at teardown too."""
        self.made.append(s)
        return s

    def cleanup(self) -> None:
        removed: set[str] = set()
        for s in self.made:
            if s.id not in removed:
                with contextlib.suppress(Exception):
                    s.remove()
                removed.add(s.id)
            with contextlib.suppress(Exception):
                s.close()


@pytest.fixture
def sessions(paths: Paths, tools_image: str) -> Iterator[Sessions]:
    f = Sessions(paths, tools_image)
    try:
        yield f
    finally:
        f.cleanup()


# a background counter in the guest: /tmp/n is replaced by a rename, never truncated, so a
# reader sees a whole number at every moment (``echo > /tmp/n`` has an empty instant)
COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.2; done"


def start_worker(script: Path, *args: str) -> subprocess.Popen[bytes]:
    """Run ``script`` in a new Python process (a worker the test can kill -9), with
    this test's environment (TORPOR_HOME, the cleared provider variables)."""
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
        cwd=str(Path(__file__).resolve().parents[2]),
    )


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 240) -> None:
    """Poll ``cond`` until true; fail with ``what`` after ``timeout`` seconds (a bound
    against a hung test, not a performance threshold)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)
