"""The thesis workload: a deterministic agent session with no network.

Every system under test runs exactly this session.  Turn ``t`` is

1. the user message ``turn t``;
2. one model step that answers with ``M`` bytes of incompressible text (base64 of a
   BLAKE3 stream keyed by the seed and the turn);
3. ``k`` tool calls that each write ``T`` bytes to one of ``W`` workspace files;
4. one ``tick`` tool call that appends ``t`` to the workspace journal and advances the
   counter of a background process by one.

Everything the session produces is a pure function of the :class:`Workload`, so the
expected message hash, workspace file hashes, journal and counter after ``n`` turns
are computed here without running anything, and every system's result is compared
against them.  The journal is append-only: a tick that runs twice (a side effect
repeated by a recovery) shows up as a duplicate line.

Invariants: the canonical message list of turn ``t`` has ``k + 3`` entries
(``user``, ``assistant``, ``k`` x ``tool`` write results, ``tool`` tick result); the
message hash is a SHA-256 chain over ``role NUL content`` entries (SHA-256 because
Temporal's workflow code must compute it with the standard library).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import blake3

WORKSPACE_FILES = 8
EMPTY_HASH = "0" * 64

BG_SCRIPT = (
    # A background process whose counter advances once per SIGUSR1.  The trap comes
    # first: a SIGUSR1 before it would kill the shell.  Then it writes its counter and
    # its pid, so a tick can find it; the marker argument ($0) lets the harness tell
    # it from a reused pid.
    "i=0; trap 'i=$((i+1)); echo $i > {dir}/counter.tmp; mv {dir}/counter.tmp {dir}/counter' USR1; "
    "echo 0 > {dir}/counter; echo $$ > {dir}/bg.pid; "
    "while :; do sleep 1 & wait $!; done"
)


@dataclass(frozen=True)
class Workload:
    """One point of the sweep.  ``style``: ``delta`` = each step receives only new
    data; ``full`` = the model step receives the whole conversation.  ``every``: the
    engine's continue-as-new / fork period in turns (0 = never)."""

    turns: int
    model_bytes: int = 1024
    tool_bytes: int = 1024
    tools: int = 2
    seed: int = 1
    style: str = "delta"
    every: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        return cls(**d)

    @property
    def per_turn(self) -> int:
        """Canonical messages per turn."""
        return self.tools + 3

    # -- content -------------------------------------------------------------------

    def _stream(self, label: str, n: int) -> str:
        raw = blake3.blake3(f"{self.seed}:{label}".encode()).digest(length=(n * 3) // 4 + 3)
        return base64.b64encode(raw).decode()[:n]

    def user_text(self, turn: int) -> str:
        return f"turn {turn}: continue the task"

    def model_text(self, turn: int) -> str:
        return self._stream(f"model:{turn}", self.model_bytes)

    def tool_path(self, turn: int, i: int) -> str:
        return f"f{(turn * self.tools + i) % WORKSPACE_FILES}.txt"

    def tool_content(self, turn: int, i: int) -> str:
        return self._stream(f"tool:{turn}:{i}", self.tool_bytes)

    def write_result(self, turn: int, i: int) -> str:
        digest = hashlib.sha256(self.tool_content(turn, i).encode()).hexdigest()
        return f"wrote {self.tool_path(turn, i)} sha256={digest}"

    def tick_result(self, turn: int) -> str:
        return f"tick {turn} ok"

    def turn_messages(self, turn: int) -> list[tuple[str, str]]:
        out = [("user", self.user_text(turn)), ("assistant", self.model_text(turn))]
        out += [("tool", self.write_result(turn, i)) for i in range(self.tools)]
        out.append(("tool", self.tick_result(turn)))
        return out

    # -- expectations --------------------------------------------------------------

    def expected_hash(self, turns: int | None = None) -> str:
        h = EMPTY_HASH
        for t in range(self.turns if turns is None else turns):
            for role, content in self.turn_messages(t):
                h = chain(h, role, content)
        return h

    def expected_workspace(self, turns: int | None = None) -> dict[str, str]:
        """File name -> sha256 of the workspace after ``turns`` turns (journal included)."""
        n = self.turns if turns is None else turns
        files: dict[str, str] = {}
        for t in range(n):
            for i in range(self.tools):
                files[self.tool_path(t, i)] = sha256_text(self.tool_content(t, i))
        files["journal"] = sha256_text("".join(f"{t}\n" for t in range(n)))
        return files


def chain(h: str, role: str, content: str) -> str:
    return hashlib.sha256(f"{h}{role}\0{content}".encode()).hexdigest()


def record_user(h: str, msgs: list[list[str]] | None, text: str) -> str:
    """A replay engine's conversation after the user's message: the new hash, and the
    message appended to ``msgs`` (the ``full`` style; None in the ``delta`` style)."""
    if msgs is not None:
        msgs.append(["user", text])
    return chain(h, "user", text)


def record_step(h: str, msgs: list[list[str]] | None, answer: str, outs: list[str]) -> str:
    """The same after the model's answer and the tool results of its step."""
    h = chain(h, "assistant", answer)
    for o in outs:
        h = chain(h, "tool", o)
    if msgs is not None:
        msgs.append(["assistant", answer])
        msgs.extend(["tool", o] for o in outs)
    return h


def hash_messages(messages: list[tuple[str, str]] | list[list[str]]) -> str:
    h = EMPTY_HASH
    for role, content in messages:
        h = chain(h, role, content)
    return h


def sha256_text(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()
