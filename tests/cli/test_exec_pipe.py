"""A reader that goes away: `exec VM CMD | head -1` ends CMD; every command exits 141.

Before: the CLI exited 1 (click's EPIPE handling) and the command went on writing
into the guest agent's pipe for ever (``yes`` spun in the guest until the VM ended).
Now the command gets SIGPIPE, as a writer into a closed pipe does, and the CLI exits
141 like every command whose stdout was closed (docs/cli.md, exit codes).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import torpor_cli

pytestmark = pytest.mark.vm


def _running(vm_id: str, name: str) -> list[str]:
    r = torpor_cli("exec", vm_id, "ps")  # busybox: PID USER COMMAND
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stdout.decode().splitlines() if ln.rstrip().endswith(" " + name)]


def test_exec_into_a_closed_pipe_ends_the_command_and_exits_141(box) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "torpor.cli.main", "exec", box.id, "yes", "piped"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert p.stdout is not None
    assert p.stdout.readline() == b"piped\n"
    p.stdout.close()  # `| head -1`
    assert p.wait(timeout=120) == 141
    deadline = time.monotonic() + 60  # a bound for a loaded machine, not a timing check
    while _running(box.id, "yes piped"):
        if time.monotonic() > deadline:
            pytest.fail("`yes` still runs in the guest after its reader went away")
        time.sleep(0.2)


def test_cp_into_a_closed_pipe_exits_141_without_a_traceback(box) -> None:
    """click turned every EPIPE into a silent exit 1; the table says 141."""
    r = torpor_cli("exec", box.id, "sh", "-c", "head -c 4000000 /dev/zero > /root/big")
    assert r.returncode == 0, r.stderr
    p = subprocess.Popen(
        [sys.executable, "-m", "torpor.cli.main", "cp", f"{box.id}:/root/big", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert p.stdout is not None and p.stderr is not None
    assert len(p.stdout.read(10)) == 10
    p.stdout.close()  # `| head -c 10`
    assert p.wait(timeout=120) == 141
    assert b"Traceback" not in p.stderr.read()
