"""The thesis harness on a tiny N: correctness checks only, never timings.

Every peer must be installed (the ``bench`` extra from ``.[dev]``, Restate and
QEMU with the guest kernel from scripts/setup): a missing one fails here instead of
being skipped, the headline torpor recovery test included.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from torpor.bench.thesis.harness import run_one
from torpor.bench.thesis.peers import ALL, get
from torpor.bench.thesis.report import crossings, fit
from torpor.bench.thesis.workload import Workload, hash_messages

PEERS = [n for n in ALL if n not in ("plain", "torpor")]


def test_workload_is_deterministic_and_sized() -> None:
    w = Workload(turns=4, model_bytes=1000, tool_bytes=300, tools=3)
    assert len(w.model_text(2)) == 1000 and len(w.tool_content(1, 2)) == 300
    assert w.model_text(2) == Workload(turns=9, model_bytes=1000).model_text(2)
    assert w.model_text(2) != w.model_text(3)
    msgs = [m for t in range(4) for m in w.turn_messages(t)]
    assert len(msgs) == 4 * w.per_turn
    assert hash_messages(msgs) == w.expected_hash()
    ws = w.expected_workspace()
    assert ws["journal"] == w.expected_workspace(4)["journal"] != w.expected_workspace(3)["journal"]


def test_fit_and_crossing() -> None:
    a, b = fit([(10, 120.0), (100, 210.0), (1000, 1110.0)])  # type: ignore[misc]
    assert a == pytest.approx(110) and b == pytest.approx(1.0)
    pts = [
        {
            "system": "x",
            "turns": n,
            "model_bytes": 1,
            "tool_bytes": 1,
            "style": "delta",
            "every": 0,
            "agg": {"recovery_ms": {"p50": 110 + n}},
        }
        for n in (10, 1000)
    ]
    pts += [
        {
            "system": "torpor",
            "turns": 10,
            "model_bytes": 1,
            "tool_bytes": 1,
            "style": "delta",
            "every": 0,
            "agg": {"recovery_ms": {"p50": 610.0}},
        }
    ]
    (row,) = crossings({"points": pts})
    assert row["n_star"] == pytest.approx(500)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A folder with a short path for a peer's unix sockets (108 bytes at most):
    under pytest-xdist, tmp_path (``.../popen-gw0/test_peer_recovers_after_kill93``)
    made Restate's ``restate-server/base/thesis/fabric.sock`` too long to bind."""
    d = Path(tempfile.mkdtemp(prefix="thesis-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _run(name: str, tmp_path: Path, style: str = "delta", turns: int = 3) -> dict:
    system = get(name)
    why = system.missing()
    if why:
        # Every peer is provided by the set-up: the bench extra (pip), restate (npm, by
        # scripts/setup), torpor itself (QEMU and the guest kernel, by scripts/setup).
        # A missing one is a broken set-up, never a skip.
        pytest.fail(f"{name} should be installed here but cannot run: {why}")
    conn = system.setup(tmp_path)
    try:
        return run_one(system, conn, Workload(turns=turns, style=style), tmp_path, timeout=150)
    finally:
        system.teardown()


def _assert_recovered(r: dict) -> None:
    assert r["failure"] is None, r.get("worker_log", r["failure"])
    assert r["crashed"], "the worker was not killed"
    c = r["checks"]
    assert c["recovered_ok"], "no step ran after the crash"
    assert c["messages_ok"], "the rebuilt conversation differs from the expected one"
    assert c["workspace_ok"], c["workspace_files_bad"]
    assert c["journal_ok"] and c["side_effects_twice"] == 0
    assert r["recovery"]["total_ms"] > 0
    assert r["storage"]["bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", PEERS)
def test_peer_recovers_after_kill9(name: str, short_tmp: Path) -> None:
    style = "full" if name.startswith("langgraph") else "delta"
    r = _run(name, short_tmp, style)
    _assert_recovered(r)
    # honest about the loss: a host process does not survive its worker's crash
    assert r["checks"]["bg_lost"] and not r["checks"]["bg_kept"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dbos-sqlite", "temporal", "restate"])
def test_replay_engine_full_style(name: str, short_tmp: Path) -> None:
    _assert_recovered(_run(name, short_tmp, "full"))


@pytest.mark.slow
@pytest.mark.vm
def test_torpor_recovers_and_keeps_the_process(short_tmp: Path) -> None:
    r = _run("torpor", short_tmp)
    _assert_recovered(r)
    assert r["checks"]["bg_kept"], r["checks"]


@pytest.mark.slow
@pytest.mark.vm
@pytest.mark.parametrize("keep,bulk", [("2", 3), ("9", 0)])
def test_torpor_bulk_build_runs_apart_and_the_run_recovers(
    keep: str, bulk: int, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TORPOR_THESIS_PREFILL=K: the session is created, and all but its last K turns
    built in bulk, by a child process (its transient memory is not the crashed
    worker's; also when there is nothing to build, so that every N's worker is alike),
    then the worker runs the rest turn by turn and is killed in the last; every check
    holds."""
    monkeypatch.setenv("TORPOR_THESIS_PREFILL", keep)
    system = get("torpor")
    conn = system.setup(short_tmp)
    try:
        r = run_one(system, conn, Workload(turns=5), short_tmp, timeout=240, keep=True)
    finally:
        system.teardown()
    _assert_recovered(r)
    assert r["checks"]["bg_kept"], r["checks"]
    (events,) = short_tmp.glob("torpor-*/events.jsonl")
    evs = [json.loads(line) for line in events.read_text().splitlines()]
    (pre,) = [e for e in evs if e["ev"] == "prefill"]
    first = next(e["pid"] for e in evs if e["ev"] == "start")
    assert pre["turns"] == bulk and pre.get("builder") not in (first, None)  # another process
    turns = [e["turn"] for e in evs if e["ev"] == "turn" and e["pid"] == first]
    assert turns == list(range(bulk, 4))  # turn 4 crashed, then ran in the recovering worker


@pytest.mark.slow
def test_cli_quick_writes_json_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torpor.bench.thesis.cli import thesis
    from torpor.bench.thesis.peers.openai_agents import OpenAIAgents

    monkeypatch.setattr(OpenAIAgents, "missing", lambda self: "not installed: (test)")
    out = tmp_path / "out"
    res = CliRunner().invoke(
        thesis,
        [
            "--quick",
            "--systems",
            "plain,dbos-sqlite,openai-agents",
            "--turns",
            "3",
            "--styles",
            "delta",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((out / "thesis.json").read_text())
    # a peer that cannot run is reported, never dropped
    assert data["systems"]["openai-agents"]["status"] == "not installed: (test)"
    assert "not installed: (test)" in res.output
    assert {p["system"] for p in data["points"]} == {"plain", "dbos-sqlite"}
    dbos = next(p for p in data["points"] if p["system"] == "dbos-sqlite")
    assert dbos["agg"]["ok"] and dbos["agg"]["checks"]["recovered_ok"]
    for png in ("recovery-vs-n.png", "storage-vs-n.png"):
        assert (out / png).stat().st_size > 1000

    # a sweep run in parts is merged into one result, tables and plots
    from torpor.bench.thesis.cli import thesis_report

    later = {
        "systems": {"openai-agents": {"family": "context", "notes": "", "status": "ok"}},
        "points": [dict(p, turns=5) for p in data["points"] if p["system"] == "plain"]
        + [dict(p, seed=99) for p in data["points"] if p["system"] == "dbos-sqlite"],
    }
    (tmp_path / "later.json").write_text(json.dumps(later))
    merged_dir = tmp_path / "merged"
    res = CliRunner().invoke(
        thesis_report,
        [str(out / "thesis.json"), str(tmp_path / "later.json"), "--out", str(merged_dir)],
    )
    assert res.exit_code == 0, res.output
    merged = json.loads((merged_dir / "results.json").read_text())
    assert len(merged["points"]) == len(data["points"]) + 1  # dbos-sqlite's point replaced
    assert next(p for p in merged["points"] if p["system"] == "dbos-sqlite")["seed"] == 99
    assert merged["systems"]["openai-agents"]["status"] == "ok"  # the sweep that ran it wins
    assert len(merged["sweeps"]) == 2
    table = (merged_dir / "tables.md").read_text()
    assert "| dbos-sqlite | 3 |" in table and "| plain | 5 |" in table
    assert (merged_dir / "recovery-vs-n.png").stat().st_size > 1000
    # what is not a sweep result is refused by name, and nothing is written
    (tmp_path / "bad.json").write_text("[1, 2]")
    res = CliRunner().invoke(
        thesis_report, [str(tmp_path / "bad.json"), "--out", str(tmp_path / "never")]
    )
    assert res.exit_code == 2 and "bad.json is not a thesis result" in res.output
    assert not (tmp_path / "never").exists()
