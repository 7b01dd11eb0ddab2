"""Fixtures that run the real C agent in host mode (``torpor-agent --fd N``)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from torpor.agent import AgentClient
from torpor.agent.protocol import Frame, FrameDecoder
from torpor.guest.build import ensure_agent


@pytest.fixture(scope="session")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_agent(tmp_path_factory.mktemp("agent-build"))


def spawn_agent(binary: Path) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    ours, theirs = socket.socketpair()
    with theirs:
        proc = subprocess.Popen(
            [str(binary), "--fd", str(theirs.fileno())], pass_fds=(theirs.fileno(),)
        )
    return ours, proc


def stop_agent(sock: socket.socket | AgentClient, proc: subprocess.Popen[bytes]) -> int:
    """Close our end; the agent must see EOF and exit 0 on its own."""
    sock.close()
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@dataclass
class Agent:
    client: AgentClient
    proc: subprocess.Popen[bytes]


@pytest.fixture
def agent(agent_binary: Path) -> Iterator[Agent]:
    sock, proc = spawn_agent(agent_binary)
    client = AgentClient(sock)
    yield Agent(client, proc)
    assert stop_agent(client, proc) == 0


class RawAgent:
    """The agent with no client in between: for byte-exact and hostile input."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes]):
        self.sock = sock
        self.proc = proc
        self._decoder = FrameDecoder()
        self._frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, done: Callable[[Frame], bool], timeout: float = 20.0) -> list[Frame]:
        """All frames up to and including the first one ``done`` accepts."""
        self.sock.settimeout(timeout)
        got: list[Frame] = []
        while True:
            while self._frames:
                frame = self._frames.pop(0)
                got.append(frame)
                if done(frame):
                    return got
            data = self.sock.recv(1 << 16)
            assert data, f"agent closed the connection; got {got}"
            self._frames += self._decoder.feed(data)


@pytest.fixture
def raw_agent(agent_binary: Path) -> Iterator[RawAgent]:
    sock, proc = spawn_agent(agent_binary)
    yield RawAgent(sock, proc)
    assert stop_agent(sock, proc) == 0
