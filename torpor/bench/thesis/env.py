"""The host-side environment a peer's worker acts on, and the event recorder.

Peers are not sandboxes: their "workspace" is a host directory and their
"background process" a host subprocess started by the first tick.  The worker runs
in its own process group (started by the harness), so ``kill -9`` of that group
also kills the background process — what a crashed worker machine or container
does.  torpor does not use this module: its tools run inside the VM.

Events go to ``events.jsonl`` in the run directory, one JSON object a line, written
with a single ``write(2)`` on an ``O_APPEND`` descriptor so that a ``kill -9`` never
leaves a torn line behind.  Times are ``time.monotonic()`` (CLOCK_MONOTONIC is
system-wide on Linux, so the harness compares them with its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from torpor.bench.thesis.workload import BG_SCRIPT, EMPTY_HASH, Workload, chain, hash_messages

CRASH_ARMED = "crash.armed"


class Recorder:
    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._once: set[str] = set()

    def __call__(self, ev: str, **fields: Any) -> None:
        fields.update(ev=ev, t=time.monotonic(), pid=os.getpid())
        os.write(self._fd, (json.dumps(fields) + "\n").encode())

    def once(self, ev: str, **fields: Any) -> None:
        if ev not in self._once:
            self._once.add(ev)
            self(ev, **fields)


def stop_process(proc: subprocess.Popen[Any] | None, sig: int, timeout: float) -> None:
    """Ask a server we started to stop (``sig``), SIGKILL it after ``timeout`` s."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def io_read_bytes() -> int:
    """Bytes this process read through read-like syscalls (files and sockets)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class HostEnv:
    """Model, tools and crash point for the peers (all run on the host).

    ``crash_turn``: the turn in which the worker dies — inside the first tool call,
    before its side effect — as long as ``crash.armed`` exists in the run directory.
    In a recovery worker (``recovering=True``), the first execution of that tool call
    records ``rerun`` and the step after it records ``next``: "the next step runs".
    """

    def __init__(self, run_dir: Path, w: Workload, crash_turn: int, recovering: bool):
        self.dir = run_dir
        self.ws = run_dir / "ws"
        self.ws.mkdir(exist_ok=True)
        self.w = w
        self.crash_turn = crash_turn
        self.recovering = recovering
        self.rec = Recorder(run_dir / "events.jsonl")
        self._rerun_seen = False
        self._next_seen = False
        self._turn_t0: float | None = None
        #: a re-run of the crashed step means the state is rebuilt (not for Temporal,
        #: whose server retries the step before any replay)
        self.auto_restored = True

    # -- markers -------------------------------------------------------------------

    def _step(self, turn: int, kind: str, i: int = 0) -> None:
        self.rec.once("first_step", turn=turn, kind=kind, i=i, rchar=io_read_bytes())
        if not self.recovering:
            return
        if self._rerun_seen and not self._next_seen:
            self._next_seen = True
            self.rec("next", turn=turn, kind=kind, i=i, rchar=io_read_bytes())

    def turn_started(self, turn: int) -> None:
        self._turn_t0 = time.monotonic()

    def turn_done(self, turn: int) -> None:
        # only a first run's turns measure latency; a recovery's are mostly replay
        if self._turn_t0 is not None and not self.recovering:
            self.rec("turn", turn=turn, ms=(time.monotonic() - self._turn_t0) * 1000)
        self._turn_t0 = None

    # -- the agent -----------------------------------------------------------------

    def model(self, turn: int, context: list | None = None) -> str:
        """One model step.  In ``full`` style ``context`` is the whole conversation
        so far (ending with this turn's user message); it is checked, as a real
        model would at least have to read it."""
        self._step(turn, "model")
        if self._turn_t0 is None:
            self.turn_started(turn)
        if context is not None:
            want = self._expected_prefix(turn)
            got = hash_messages(context[:-1])
            if got != want or list(context[-1]) != ["user", self.w.user_text(turn)]:
                raise RuntimeError(f"turn {turn}: model received a wrong conversation")
        return self.w.model_text(turn)

    def _expected_prefix(self, turn: int) -> str:
        """Expected hash of turns < ``turn``, extended incrementally (the harness's
        own check must not grow with the square of the session)."""
        cache = self.__dict__.setdefault("_prefix", {0: EMPTY_HASH})
        last = max(k for k in cache if k <= turn)
        h = cache[last]
        for t in range(last, turn):
            for role, content in self.w.turn_messages(t):
                h = chain(h, role, content)
            cache[t + 1] = h
        return h

    def write(self, turn: int, i: int) -> str:
        self._step(turn, "write", i)
        if turn == self.crash_turn and i == 0:
            if (self.dir / CRASH_ARMED).exists():
                self.rec("crash", turn=turn)
                while True:  # the harness kills the whole process group now
                    time.sleep(60)
            if self.recovering and not self._rerun_seen:
                self._rerun_seen = True
                if self.auto_restored:
                    self.rec.once("restored", rchar=io_read_bytes())
                self.rec("rerun", turn=turn, rchar=io_read_bytes())
        p = self.ws / self.w.tool_path(turn, i)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(self.w.tool_content(turn, i))
        os.replace(tmp, p)
        return self.w.write_result(turn, i)

    def tick(self, turn: int) -> str:
        self._step(turn, "tick")
        with open(self.ws / "journal", "a") as f:
            f.write(f"{turn}\n")
        t0 = time.monotonic()
        pid = self.bg_pid()
        if pid is None:
            # the first turn starts it; after a crash it is gone and must be restarted
            # (its counter starts again from 0 — that is the loss being measured)
            if turn != 0:
                self.rec("bg_lost", turn=turn)
            pid = self._start_bg()
            if turn != 0:
                self.rec("bg_restarted", turn=turn, ms=(time.monotonic() - t0) * 1000)
        before = self.counter()
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while self.counter() == before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"turn {turn}: background process did not count")
            time.sleep(0.002)
        return self.w.tick_result(turn)

    # -- the background process ----------------------------------------------------

    def _start_bg(self) -> int:
        (self.dir / "bg.pid").unlink(missing_ok=True)
        script = BG_SCRIPT.format(dir=self.dir)
        subprocess.Popen(
            ["sh", "-c", script, f"thesis-bg:{self.dir}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            pid = self.bg_pid()
            if pid is not None and (self.dir / "counter").exists():
                return pid
            if time.monotonic() > deadline:
                raise RuntimeError("background process did not start")
            time.sleep(0.002)

    def bg_pid(self) -> int | None:
        return bg_alive(self.dir)

    def counter(self) -> int:
        try:
            return int((self.dir / "counter").read_text().strip() or -1)
        except (OSError, ValueError):
            return -1


def bg_alive(run_dir: Path) -> int | None:
    """The background process's pid if it is alive (and is ours), else None."""
    try:
        pid = int((run_dir / "bg.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    if f"thesis-bg:{run_dir}".encode() not in cmdline or ") Z " in stat:
        return None
    return pid
