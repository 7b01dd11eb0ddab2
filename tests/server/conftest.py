"""Fixtures for the HTTP server: an in-process app (TestClient) and a real one (uvicorn).

Both serve the test session's home (``paths``, which has ``tools:latest``).  Tokens:
``token`` acts in namespace ``default`` (that home), ``other_token`` in ``other`` (an
empty namespace: every resource of ``default`` must be a 404 there).  With tokens for
two namespaces the server is multi-tenant, so TCG needs ``allow_tcg`` (jail.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from torpor.paths import Paths
from torpor.server.app import create_app
from torpor.server.deps import Config
from torpor.server.tokens import TokenStore


@dataclass(frozen=True)
class Tokens:
    default: str
    other: str


@pytest.fixture(scope="session")
def tokens(paths: Paths) -> Tokens:
    store = TokenStore(paths)
    _, a = store.create("default", name="tests")
    _, b = store.create("other", name="tests-other")
    return Tokens(a, b)


@pytest.fixture(scope="session")
def server_config(paths: Paths) -> Config:
    return Config(paths, allow_tcg=True)


@pytest.fixture(scope="session")
def app(server_config: Config, tokens: Tokens):
    return create_app(server_config)


@pytest.fixture
def api(app, tokens: Tokens) -> Iterator[TestClient]:
    """An in-process client authenticated for namespace ``default``."""
    with TestClient(app, headers={"Authorization": f"Bearer {tokens.default}"}) as c:
        yield c


@pytest.fixture
def other_api(app, tokens: Tokens) -> Iterator[TestClient]:
    """An in-process client authenticated for namespace ``other``."""
    with TestClient(app, headers={"Authorization": f"Bearer {tokens.other}"}) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    home: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_server(home: Path, log: Path, port: int | None = None) -> LiveServer:
    """``torpor --allow-tcg serve`` as a real process on a free loopback port."""
    port = port or free_port()
    env = {**os.environ, "TORPOR_HOME": str(home)}
    out = log.open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torpor.cli.main",
            "--allow-tcg",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=out,
        stderr=out,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"torpor serve did not come up: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return LiveServer(url, home, proc, log)


@pytest.fixture
def live_server(paths: Paths, tokens: Tokens, tmp_path: Path) -> Iterator[LiveServer]:
    """A real ``torpor serve`` process on the test home (stopped by PID afterwards)."""
    srv = start_server(paths.root, tmp_path / "serve.log")
    try:
        yield srv
    finally:
        srv.stop()
