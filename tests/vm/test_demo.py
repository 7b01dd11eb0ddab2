"""The README's first command runs `torpor demo`: it must work end to end."""

from __future__ import annotations

import re

import pytest

from tests.conftest import torpor_cli

pytestmark = pytest.mark.vm


def test_demo_runs_end_to_end(torpor_home) -> None:
    before = torpor_cli("ps", "-aq").stdout
    r = torpor_cli("demo", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    m = re.search(r"the counter went on from (\d+) to (\d+) to (\d+)", out)
    assert m, out
    first, after, later = (int(x) for x in m.groups())
    assert later > after >= first > 0, out  # frozen while hibernated, then counting again
    assert "'the original branch'" in out and "'the forked branch'" in out
    assert "the branches diverged" in out
    assert re.search(r"checkpoints of demo-\d+", out)  # the checkpoint table
    assert "hibernate" in out and "resumed VM in" in out  # the log was printed
    assert torpor_cli("ps", "-aq").stdout == before  # the demo removes its VMs
    live = torpor_cli("session", "ls", "--json").stdout.decode()
    every = torpor_cli("session", "ls", "-a", "--json").stdout.decode()
    assert "demo-" not in live  # the demo removes its sessions ...
    assert "demo-" in every  # ... whose logs stay, marked removed
