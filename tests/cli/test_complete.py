"""Shell completion through click's ``_TORPOR_COMPLETE`` protocol, as bash runs it."""

from __future__ import annotations

import json

import pytest

from tests.conftest import torpor_cli

pytestmark = pytest.mark.vm


def _complete(*words: str) -> list[str]:
    line = ["torpor", *words]
    r = torpor_cli(
        env={
            "_TORPOR_COMPLETE": "bash_complete",
            "COMP_WORDS": " ".join(line),
            "COMP_CWORD": str(len(line) - 1),
        }
    )
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr
    # bash_complete prints "type,value" lines
    return [ln.split(",", 1)[1] for ln in r.stdout.decode().splitlines() if "," in ln]


def test_completes_vm_image_snapshot_and_session_names(box, tools_image: str) -> None:
    assert box.name in _complete("exec", box.name[:4])
    assert box.id[:12] in _complete("inspect", box.id[:6])
    assert "tools:latest" in _complete("run", "too")
    assert _complete("logs", "zz-no-such") == []
    assert _complete("restore", "zz-no-such") == []
    assert _complete("session", "show", "zz-no-such") == []


def test_bash_source_script() -> None:
    r = torpor_cli(env={"_TORPOR_COMPLETE": "bash_source"})
    assert r.returncode == 0 and b"_torpor_completion" in r.stdout


def test_completes_snapshot_tags_and_ids(vms, tools_image: str) -> None:
    vm = vms.run(tools_image, "sleep", "infinity", name="cmpl-snap")
    r = torpor_cli("snapshot", vm.id, "--tag", "cmpl-tag")
    assert r.returncode == 0, r.stderr
    snap_id = r.stdout.decode().strip()
    assert "cmpl-tag" in _complete("restore", "cmpl")
    assert snap_id[:12] in _complete("snapshot", "rm", snap_id[:5])
    rows = json.loads(torpor_cli("snapshots", "--format", "json").stdout)
    assert any(r["id"] == snap_id and r["tag"] == "cmpl-tag" for r in rows)
    torpor_cli("snapshot", "rm", snap_id)
