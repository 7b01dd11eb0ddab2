"""``--format`` table|json|template on every listing, ``inspect -f``, ``ps --filter``,
no truncation into a pipe, escaped control characters, ``NO_COLOR`` — end to end."""

from __future__ import annotations

import json

import pytest

from tests.conftest import torpor_cli

pytestmark = pytest.mark.vm


def _ok(*args: str, **kw) -> str:
    r = torpor_cli(*args, **kw)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


def test_images_template_json_and_table(tools_image: str) -> None:
    assert "tools:latest" in _ok("images", "--format", "{{.Repository}}:{{.Tag}}").splitlines()
    rows = json.loads(_ok("images", "--format", "json"))
    assert any(r["Repository"] == "tools" and r["Tag"] == "latest" for r in rows)
    out = _ok("images", "--format", r"table {{.Repository}}\t{{json .Size}}").splitlines()
    assert out[0].split("\t") == ["REPOSITORY", "SIZE"]
    assert any(line.startswith("tools\t") and line.split("\t")[1].isdigit() for line in out[1:])
    assert _ok("images").splitlines()[0].split() == [
        "REPOSITORY",
        "TAG",
        "IMAGE",
        "ID",
        "CREATED",
        "SIZE",
    ]


def test_bad_template_is_a_usage_error(tools_image: str) -> None:
    for args in (
        ("images", "--format", "{{.Nope}}"),
        ("images", "--format", "{{range .}}{{end}}"),
        ("ps", "--format", "plain"),
        ("ps", "--filter", "colour=red"),
        ("ps", "--filter", "status=sleepy"),
    ):
        r = torpor_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith(b"torpor: ") and b"Traceback" not in r.stderr, r.stderr


def test_ps_template_filter_and_inspect(vms, tools_image: str) -> None:
    a = vms.run(tools_image, "sleep", "infinity", name="fmt-a", labels={"team": "red"})
    b = vms.run(tools_image, "true", name="fmt-b", labels={"team": "blue", "x": ""})
    vms.mgr.wait(b.id)
    names = _ok("ps", "-a", "--format", "{{.Names}}").split()
    assert {"fmt-a", "fmt-b"} <= set(names)
    assert _ok("ps", "--filter", "label=team=red", "--format", "{{.Names}}").split() == ["fmt-a"]
    blue = _ok("ps", "--filter", "label=team", "--filter", "label=x", "--format", "{{.Names}}")
    assert blue.split() == ["fmt-b"]
    assert "fmt-b" in _ok("ps", "--filter", "status=exited", "--format", "{{.Names}}").split()
    assert "fmt-a" not in _ok("ps", "--filter", "status=exited", "--format", "{{.Names}}").split()
    assert _ok("ps", "--filter", "name=fmt-", "--filter", "status=running", "-q").split() == [
        a.id[:12]
    ]
    table = _ok("ps", "-a", "--format", r"table {{.Names}}\t{{.State}}").splitlines()
    assert table[0] == "NAMES\tSTATE" and "fmt-a\trunning" in table

    assert _ok("inspect", "-f", "{{.Name}}", "fmt-a", "fmt-b").split() == ["fmt-a", "fmt-b"]
    assert json.loads(_ok("inspect", "--format", "{{json .Config.labels}}", "fmt-a")) == {
        "team": "red"
    }
    assert json.loads(_ok("inspect", "--format", "json", "fmt-a"))[0]["Name"] == "fmt-a"


def test_no_truncation_into_a_pipe_and_control_characters_escaped(vms, tools_image: str) -> None:
    long = "echo " + "a" * 120
    vms.run(tools_image, "sh", "-c", long, name="fmt-long", labels={"evil": "\x1b]0;owned\x07"})
    out = _ok("ps", "-a", "--filter", "name=fmt-long")
    assert long in out  # the whole command, no ellipsis, no wrap
    assert len(out.splitlines()) == 2
    labels = _ok("ps", "-a", "--filter", "name=fmt-long", "--format", "{{.Labels}}")
    assert "\x1b" not in labels and "\x07" not in labels
    assert labels.strip() == "evil=\\x1b]0;owned\\x07"
    js = _ok("ps", "-a", "--filter", "name=fmt-long", "--format", "{{json .Labels}}")
    assert "\x1b" not in js and json.loads(js) == "evil=\x1b]0;owned\x07"


def test_no_color_is_honoured() -> None:
    # FORCE_COLOR makes rich colour into a pipe; NO_COLOR must still win
    coloured = torpor_cli("inspect", "no-such-vm", env={"FORCE_COLOR": "1"})
    assert coloured.returncode == 3 and b"\x1b[" in coloured.stderr
    plain = torpor_cli("inspect", "no-such-vm", env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert plain.returncode == 3 and b"\x1b" not in plain.stderr
    assert plain.stderr.startswith(b"torpor: ")


def test_session_ls_and_snapshots_take_format(tools_image: str) -> None:
    assert isinstance(json.loads(_ok("session", "ls", "--format", "json")), list)
    assert _ok("session", "ls").splitlines()[0].split()[:3] == ["SESSION", "NAME", "STATUS"]
    assert isinstance(json.loads(_ok("snapshots", "--format", "json")), list)
    assert _ok("snapshots", "--format", "table {{.ShortID}}").splitlines()[0] == "SHORTID"
