"""``torpor exec VM CMD | head -1``: the reader goes away, the command does not run on.

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
