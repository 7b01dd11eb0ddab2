"""``Sandbox.pty`` on a real VM: an interactive terminal in the guest."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest

from torpor import aio
from torpor.paths import Paths
from torpor.sandbox import Sandbox

pytestmark = pytest.mark.vm

PROMPT = "PS1=$ "


def test_echo_round_trip_and_size(sb: Sandbox) -> None:
    with sb.pty("sh", cols=120, rows=40, env={"PS1": "$ "}) as p:
        assert p.pid > 0 and p.exit_code is None
        p.write("echo hel''lo; tty\n")
        out = p.read_until("hello\r\n")
        out += p.read_until("/dev/pts/")
        p.write("stty size\n")
        p.read_until("40 120\r\n")
        p.write("exit\n")
        assert p.wait(60) == 0
    assert b"hello\r\n" in out


def test_resize_is_visible_to_stty_and_sigwinch(sb: Sandbox) -> None:
    with sb.pty("sh", env={"PS1": "$ "}) as p:
        p.write("stty size\n")
        p.read_until("24 80\r\n")
        p.resize(100, 30)
        p.write("stty size\n")
        p.read_until("30 100\r\n")
        assert (p.cols, p.rows) == (100, 30)
        p.write("exit 0\n")
        p.wait(60)
    script = "trap 'echo GOT-$((1+1)); exit 0' WINCH; echo READY; while :; do sleep 1; done"
    with sb.pty(["sh", "-c", script]) as p:
        p.read_until("READY")
        p.resize(81, 25)
        p.read_until("GOT-2")  # the foreground program got SIGWINCH
        assert p.wait(60) == 0


def test_ctrl_c_interrupts_the_foreground_job_and_exit_code_comes_back(sb: Sandbox) -> None:
    with sb.pty(["sh"], env={"PS1": "$ "}) as p:
        p.write("sleep 1000\n")
        time.sleep(1)
        p.write(b"\x03")  # SIGINT to the foreground job; the shell survives
        p.write("echo rc=$?\n")
        p.read_until("rc=130")
        p.write("exit 7\n")
        assert p.wait(60) == 7
        assert p.exit_code == 7
        assert p.read(0.1) == b""


def test_ctrl_d_ends_cat(sb: Sandbox) -> None:
    p = sb.pty("cat")
    p.write("abc\n")
    p.read_until("abc\r\nabc\r\n")  # the terminal's echo, then cat's copy
    p.write(b"\x04")
    assert p.wait(60) == 0


def test_aio_pty(sb: Sandbox) -> None:
    async def go() -> int:
        async with await aio.Sandbox(sb).pty("sh -c 'stty size; exit 4'", cols=50, rows=10) as p:
            out = await p.read_until("10 50")
            assert b"10 50" in out
            return await p.wait(60)

    assert asyncio.run(go()) == 4


def _sleepers(sb: Sandbox, tag: str) -> list[int]:
    return [p.pid for p in sb.ps() if tag in " ".join(p.cmdline)]


def test_a_vanished_client_leaves_nothing_running(sb: Sandbox, paths: Paths) -> None:
    """A process opens a terminal, starts a job in it and is SIGKILLed: the shim
    hangs the terminal up and the shell and its foreground job are gone."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from torpor.paths import Paths
        from torpor.sandbox import Sandbox
        sb = Sandbox.connect({sb.id!r}, paths=Paths(Path({str(paths.root)!r})))
        p = sb.pty("sh", env={{"PS1": "$ "}})
        p.write("sleep 1001; echo never\\n")
        time.sleep(1)
        print(p.pid, flush=True)
        time.sleep(1000)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env=dict(os.environ)
    )
    try:
        assert child.stdout is not None
        shell = int(child.stdout.readline())
        deadline = time.monotonic() + 60
        while not _sleepers(sb, "sleep 1001") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _sleepers(sb, "sleep 1001"), "the job never started"
        assert shell in [p.pid for p in sb.ps()]
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = _sleepers(sb, "sleep 1001") + [p.pid for p in sb.ps() if p.pid == shell]
        if not left:
            break
        time.sleep(0.2)
    assert not left, f"left running: {left}"


def test_echo_round_trip_benchmark_runs(sb: Sandbox) -> None:
    """The benchmark helper works (its numbers are reported, never asserted)."""
    with sb.pty("cat") as p:
        samples = p.echo_round_trips(5)
    assert len(samples) == 5 and all(s > 0 for s in samples)


def echo_p50(sb: Sandbox, n: int = 200) -> float:
    """Keystroke echo p50 in ms (run by hand: see the report / docs/sandbox.md)."""
    import statistics

    with sb.pty("cat") as p:
        return statistics.median(p.echo_round_trips(n)) * 1000
