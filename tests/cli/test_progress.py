"""Progress on long operations (issue 10 §4): a spinner on a terminal, nothing on a pipe.

``torpor snapshot`` runs with its stderr on a real pseudo-terminal of the host
(``pty.openpty``) and then on a pipe; stdout (the snapshot id) stays clean in both.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vm


def _run_with_stderr_on_a_terminal(*args: str) -> tuple[int, bytes, bytes]:
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm")
    for k in ("TORPOR_DEBUG", "NO_COLOR"):
        env.pop(k, None)
    p = subprocess.Popen(
        [sys.executable, "-m", "torpor.cli.main", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    seen = b""
    while True:  # drain the terminal while the command runs (its buffer is small)
        r, _, _ = select.select([master], [], [], 1.0)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every slave end is closed, the command is done
                break
            if not chunk:
                break
            seen += chunk
        elif p.poll() is not None:
            break
    os.close(master)
    assert p.stdout is not None
    out = p.stdout.read()
    return p.wait(timeout=300), out, seen


def test_snapshot_shows_progress_on_a_terminal_only(vms, tools_image: str) -> None:
    vm = vms.run(tools_image, "sleep", "infinity")
    code, out, tty = _run_with_stderr_on_a_terminal("snapshot", vm.id, "--tag", "progress")
    assert code == 0, tty
    assert len(out.split()) == 1  # stdout: the id alone
    assert b"snapshotting " + vm.id.encode() in tty
    r = subprocess.run(
        [sys.executable, "-m", "torpor.cli.main", "snapshot", vm.id],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert b"snapshotting" not in r.stderr and b"\x1b" not in r.stderr  # a pipe: no spinner
    assert b"durable after" in r.stderr
