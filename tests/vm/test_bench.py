"""`torpor bench boot` runs and writes well-formed JSON (its figures are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import torpor_cli

pytestmark = pytest.mark.vm


def test_bench_boot_writes_json(tools_image: str, tmp_path: Path) -> None:
    out = tmp_path / "boot.json"
    before = torpor_cli("ps", "-aq").stdout
    r = torpor_cli(
        "bench", "boot", "--image", tools_image, "--runs", "1", "--execs", "3", "--json", str(out)
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["accel"] in ("kvm", "tcg")
    assert data["ready_wall_ms"]["n"] == 1
    assert data["exec_true_ms"]["n"] == 3
    assert data["stdout_1mib_mib_per_s"]["n"] == 5
    assert data["machine"]["qemu"].startswith("QEMU")
    assert b"cold boot to agent-ready" in r.stdout
    assert torpor_cli("ps", "-aq").stdout == before  # the benchmark removes its VMs


def test_bench_snapshot_writes_json(tools_image: str, tmp_path: Path) -> None:
    out = tmp_path / "snap.json"
    before = torpor_cli("ps", "-aq").stdout
    r = torpor_cli(
        "bench",
        "snapshot",
        "--image",
        tools_image,
        "--trials",
        "1",
        "--forks",
        "1",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    res = data["results"]
    for key in (
        "pause_ms",
        "durable_ms",
        "stored_first_bytes",
        "stored_incr_bytes",
        "restore_hot_ms",
        "restore_cold_ms",
        "fork_ms",
        "baseline_bytes",
    ):
        assert res[key]["n"] == 1, key
    assert res["baseline_bytes"]["p50"] > 0 and res["stored_incr_bytes"]["p50"] > 0
    assert b"pause window" in r.stdout
    assert torpor_cli("ps", "-aq").stdout == before


def test_bench_sessions_writes_json(tools_image: str, tmp_path: Path) -> None:
    out = tmp_path / "sessions.json"
    before = torpor_cli("ps", "-aq").stdout
    r = torpor_cli(
        "bench",
        "sessions",
        "--image",
        tools_image,
        "--turns",
        "2,3",
        "--json",
        str(out),
        env={"COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert [x["turns"] for x in data["results"]] == [2, 3]
    for x in data["results"]:
        assert x["checkpoint_durable_ms"]["n"] == x["turns"]  # one checkpoint per turn
        assert x["snapshot_bytes_total"] > 0 and x["log_entries"] > 0
        assert x["resume_ms"] > 0 and x["recover_ms"] > 0
    assert b"resume" in r.stdout and b"recover" in r.stdout
    assert torpor_cli("ps", "-aq").stdout == before
    r = torpor_cli("bench", "sessions", "--turns", "ten")
    assert r.returncode == 2 and b"--turns" in r.stderr


def test_bench_starts_writes_json(tools_image: str, tmp_path: Path) -> None:
    out = tmp_path / "starts.json"
    before = torpor_cli("ps", "-aq").stdout
    r = torpor_cli(
        "bench", "starts", "--image", tools_image, "--workers", "1", "--duration", "3",
        "--pool", "0", "--probe", "both", "--json", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"no pool", "no pool, agent request"}
    assert modes["no pool, agent request"]["starts"] >= 1
    assert modes["no pool, agent request"]["errors"] == 0
    m = modes["no pool"]
    assert m["starts"] >= 1 and m["errors"] == 0
    assert m["machine_cpu_ms_per_start"] > 0
    assert m["qemu_cpu_ms"]["n"] == m["shim_cpu_ms"]["n"] >= m["starts"]
    assert b"machine CPU per start" in r.stdout
    assert torpor_cli("ps", "-aq").stdout == before  # the benchmark removes its VMs
