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
    m = re.search(r"the counter went on from (\d+) to (\d+)", out)
    assert m and int(m.group(2)) > int(m.group(1)) > 1, out
    assert "is absent in the original" in out
    assert torpor_cli("ps", "-aq").stdout == before  # the demo removes its VMs
