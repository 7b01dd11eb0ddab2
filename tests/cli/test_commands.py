"""Docker-like commands end to end: ``run --env-file``, ``kill -s``, ``wait``, ``port``,
``rename``, ``logs --tail/--since``, ``stats``, ``system df``, ``system prune``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import torpor_cli

pytestmark = pytest.mark.vm


def _ok(*args: str, **kw) -> str:
    r = torpor_cli(*args, **kw)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


def _usage(*args: str) -> bytes:
    r = torpor_cli(*args)
    assert r.returncode in (2, 125), r.stderr
    assert b"Traceback" not in r.stderr
    return r.stderr


def test_run_env_file_and_e_wins(tools_image: str, tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("# comment\n\nA=from-file\nB=two words\nHOSTVAR\n")
    out = _ok(
        "run", "--rm", "--network", "none", "--env-file", str(f), "-e", "A=from-e",
        tools_image, "sh", "-c", 'echo "$A|$B|$HOSTVAR"',
        env={"HOSTVAR": "copied"},
    )  # fmt: skip
    assert out == "from-e|two words|copied\n"


def test_run_env_file_bad_input(tools_image: str, tmp_path: Path) -> None:
    assert b"cannot read env file" in _usage(
        "run", "--rm", "--env-file", "/nonexistent", tools_image
    )
    bad = tmp_path / "bad"
    bad.write_text("OK=1\n=nokey\n")
    assert b":2: invalid line" in _usage("run", "--rm", "--env-file", str(bad), tools_image)


def test_kill_signal_goes_to_the_command_then_wait(vms, tools_image: str) -> None:
    script = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.2; done"
    vm = vms.run(tools_image, "sh", "-c", script, name="sig-box")
    deadline = time.monotonic() + 60
    while b"ready" not in torpor_cli("logs", "sig-box").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ok("kill", "-s", "TERM", "sig-box").strip() == "sig-box"
    assert _ok("wait", "sig-box").strip() == "7"
    assert "got-term" in _ok("logs", "sig-box")
    assert vms.mgr.get(vm.id).state.status.value == "exited"
    assert b"invalid signal" in _usage("kill", "-s", "NOPE", "sig-box")
    r = torpor_cli("kill", "-s", "HUP", "sig-box")  # not running any more
    assert r.returncode == 4, r.stderr


def test_port_lists_forwards(tools_image: str) -> None:
    vm_id = _ok(
        "create", "--name", "port-box", "-p", "127.0.0.1:18081:80", tools_image, "true"
    ).strip()
    try:
        assert _ok("port", "port-box").strip() == "80/tcp -> 127.0.0.1:18081"
        assert _ok("port", "port-box", "80/tcp").strip() == "127.0.0.1:18081"
        assert torpor_cli("port", "port-box", "81").returncode == 3
        assert b"invalid port" in _usage("port", "port-box", "x")
    finally:
        torpor_cli("rm", "-f", vm_id)


def test_rename(tools_image: str) -> None:
    vm_id = _ok("create", "--name", "old-name", tools_image, "true").strip()
    other = _ok("create", "--name", "taken-name", tools_image, "true").strip()
    try:
        _ok("rename", "old-name", "new-name")
        assert _ok("inspect", "-f", "{{.Id}}", "new-name").strip() == vm_id
        assert torpor_cli("inspect", "old-name").returncode == 3
        assert torpor_cli("rename", "new-name", "taken-name").returncode == 4
        assert b"invalid VM name" in _usage("rename", "new-name", "../evil")
        assert _ok("inspect", "-f", "{{.Name}}", vm_id).strip() == "new-name"
    finally:
        torpor_cli("rm", "-f", vm_id, other)


def test_logs_tail_and_since(vms, tools_image: str) -> None:
    vm = vms.run(tools_image, "sh", "-c", "for i in 1 2 3 4 5; do echo line$i; done")
    vms.mgr.wait(vm.id)
    assert _ok("logs", "--tail", "2", vm.id) == "line4\nline5\n"
    assert _ok("logs", "-n", "0", vm.id) == ""
    assert _ok("logs", "--since", "1h", vm.id).splitlines() == [f"line{i}" for i in range(1, 6)]
    assert _ok("logs", "--since", str(time.time() + 3600), vm.id) == ""
    ts = _ok("logs", "--tail", "1", "--timestamps", vm.id)
    assert ts.endswith(" line5\n") and ts[:4].isdigit()
    assert b"invalid --since" in _usage("logs", "--since", "yesterday", vm.id)
    assert b"invalid --tail" in _usage("logs", "--tail", "-3", vm.id)


def test_stats(box) -> None:
    rows = json.loads(_ok("stats", "--no-stream", "--format", "json", box.id))
    assert len(rows) == 1 and rows[0]["Name"] == box.name
    assert rows[0]["rss_bytes"] > 1 << 20 and rows[0]["cpu_percent"] >= 0
    table = _ok("stats", box.id).splitlines()
    assert table[0].split()[:3] == ["VM", "ID", "NAME"] and box.name in table[1]


def test_system_df_and_prune(vms, box, tools_image: str) -> None:
    done = vms.run(tools_image, "true", name="prune-me")
    # a stopped sandbox that had a timeout (a torpor.sandbox.* label) is prunable too;
    # only a session's VM (torpor.session) is kept for its session
    sandbox = vms.run(
        tools_image, "true", name="prune-sb", labels={"torpor.sandbox.timeout": "60.0"}
    )
    vms.mgr.wait(done.id)
    vms.mgr.wait(sandbox.id)
    kinds = {r["Type"]: r for r in json.loads(_ok("system", "df", "--format", "json"))}
    assert set(kinds) == {"Images", "VMs", "Snapshots", "Caches"}
    assert kinds["Images"]["TotalCount"] >= 1 and kinds["VMs"]["Active"] >= 1
    assert kinds["VMs"]["reclaimable_bytes"] > 0
    assert b"-f" in _usage("system", "prune")  # no terminal to ask: refuses, removes nothing
    assert "prune-me" in _ok("ps", "-a", "--format", "{{.Names}}").split()
    out = _ok("system", "prune", "-f")
    assert f"deleted VM {done.id[:12]}" in out and "Total reclaimed space" in out
    names = _ok("ps", "-a", "--format", "{{.Names}}").split()
    assert "prune-me" not in names and box.name in names  # a running VM stays
    assert "prune-sb" not in names
