"""`torpor bench cli` runs and writes well-formed JSON (its figures are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import torpor_cli

pytestmark = pytest.mark.vm


def test_bench_cli_writes_json(tools_image: str, tmp_path: Path) -> None:
    out = tmp_path / "cli.json"
    before = torpor_cli("ps", "-aq").stdout
    r = torpor_cli("bench", "cli", "--image", tools_image, "--runs", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["benchmark"] == "cli" and data["bytecode_cache"] is True
    rows = data["rows"]
    assert set(rows) == {"python -c pass (floor)", "--version", "ps -a", "images", "exec VM true"}
    for name in ("ps -a", "images", "exec VM true"):
        assert rows[name]["cli_ms"]["n"] == 2 and rows[name]["library_ms"]["n"] == 2
        assert rows[name]["ratio_p50"] > 0
    assert b"exec VM true" in r.stdout
    assert torpor_cli("ps", "-aq").stdout == before  # the benchmark removes its VM
    assert torpor_cli("bench", "cli", "--runs", "0").returncode == 2
