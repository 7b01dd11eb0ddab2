"""``torpor --host URL`` end to end: the real CLI in a subprocess against a real server.

The server serves the test session's home, so the local CLI sees the same VMs: a
command run both ways must answer the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import torpor_cli
from tests.server.conftest import LiveServer, Tokens
from tests.server.test_client import JOURNAL

pytestmark = pytest.mark.vm


def remote(srv: LiveServer, token: str, *args: str, input: bytes | None = None):
    return torpor_cli("--host", srv.url, "--token", token, *args, input=input)


def ok(r) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout.decode()


def test_vm_commands_through_the_server(
    live_server: LiveServer, tokens: Tokens, tools_image: str, tmp_path: Path
) -> None:
    t = tokens.default
    vm = ok(
        remote(
            live_server,
            t,
            "run",
            "-d",
            "--name",
            "rbox",
            "-m",
            "256M",
            "-l",
            "t=cli",
            "--network",
            "none",
            tools_image,
            "sleep",
            "infinity",
        )
    ).strip()
    try:
        assert len(vm) == 64
        # ps: the same VM locally and remotely
        rows = json.loads(ok(remote(live_server, t, "ps", "--format", "json")))
        mine = [r for r in rows if r["id"] == vm]
        assert mine and mine[0]["name"] == "rbox" and mine[0]["labels"] == {"t": "cli"}
        assert vm[:12] in ok(remote(live_server, t, "ps", "-q", "-f", "label=t=cli")).split()
        assert "rbox" in ok(remote(live_server, t, "ps"))
        # exec: output, stderr and exit code as the local CLI gives them
        cmd = ("exec", "rbox", "sh", "-c", "echo out; echo err >&2; exit 3")
        r_remote, r_local = remote(live_server, t, *cmd), torpor_cli(*cmd)
        assert (
            (r_remote.returncode, r_remote.stdout, r_remote.stderr)
            == (
                r_local.returncode,
                r_local.stdout,
                r_local.stderr,
            )
            == (3, b"out\n", b"err\n")
        )
        r = remote(live_server, t, "exec", "-i", "rbox", "cat", input=b"fed\n")
        assert ok(r) == "fed\n"
        # exec -t: on a guest terminal over the PTY WebSocket, as locally
        cmd = ("exec", "-t", "rbox", "sh", "-c", "tty >/dev/null && echo on-a-tty; exit 5")
        r_remote, r_local = remote(live_server, t, *cmd), torpor_cli(*cmd)
        assert (r_remote.returncode, r_remote.stdout) == (r_local.returncode, r_local.stdout)
        assert (r_remote.returncode, r_remote.stdout) == (5, b"on-a-tty\r\n"), r_remote.stderr
        binary = remote(live_server, t, "exec", "rbox", "sh", "-c", "printf '\\377\\000a'")
        assert binary.stdout == b"\xff\x00a"  # raw bytes, not text with replacements
        # cp both ways
        src = tmp_path / "up.txt"
        src.write_bytes(b"payload\n")
        ok(remote(live_server, t, "cp", str(src), "rbox:/root/"))
        ok(remote(live_server, t, "cp", "rbox:/root/up.txt", str(tmp_path / "back.txt")))
        assert (tmp_path / "back.txt").read_bytes() == b"payload\n"
        # snapshot, list, restore
        snap = ok(remote(live_server, t, "snapshot", "rbox", "--tag", "cli-remote")).strip()
        snaps = json.loads(ok(remote(live_server, t, "snapshots", "--format", "json")))
        assert any(s["id"] == snap and s["tag"] == "cli-remote" for s in snaps)
        detail = json.loads(ok(remote(live_server, t, "snapshot", "inspect", snap[:12])))
        assert detail["id"] == snap
        vm2 = ok(remote(live_server, t, "restore", snap, "--name", "rbox2")).strip()
        assert ok(remote(live_server, t, "exec", "rbox2", "cat", "/root/up.txt")) == "payload\n"
        # rm: a running VM needs -f (ConflictError: exit 4, as locally)
        r = remote(live_server, t, "rm", "rbox2")
        assert r.returncode == 4, r.stderr
        assert ok(remote(live_server, t, "rm", "-f", "rbox2")).split() == ["rbox2"]
        assert vm2 not in ok(remote(live_server, t, "ps", "-q"))
        # errors map to the local exit codes
        r = remote(live_server, t, "exec", "no-such-vm", "true")
        assert r.returncode == 125 and b"no-such-vm" in r.stderr
        r = remote(live_server, t, "inspect", "no-such-vm")
        assert r.returncode == 3, r.stderr
    finally:
        torpor_cli("rm", "-f", "rbox", "rbox2")


def test_images_and_what_is_not_available(
    live_server: LiveServer, tokens: Tokens, tools_image: str
) -> None:
    t = tokens.default
    out = ok(remote(live_server, t, "images"))
    assert "tools" in out and "latest" in out
    assert (
        ok(remote(live_server, t, "images", "-q")).split() == ok(torpor_cli("images", "-q")).split()
    )
    for cmd in (("gc",), ("verify",), ("session", "verify"), ("logs", "x")):
        r = remote(live_server, t, *cmd)
        assert r.returncode == 2, (cmd, r.stderr)
        assert b"not available with --host" in r.stderr, r.stderr
    # TORPOR_HOST / TORPOR_TOKEN work like --host / --token
    r = torpor_cli("info", env={"TORPOR_HOST": live_server.url, "TORPOR_TOKEN": t})
    assert "namespace      default" in ok(r)
    r = torpor_cli("ps", env={"TORPOR_HOST": live_server.url, "TORPOR_TOKEN": "tpr_x_y"})
    assert r.returncode == 1 and b"token" in r.stderr, r.stderr
    r = remote(live_server, tokens.other, "ps", "-q")
    assert ok(r) == ""  # another namespace: none of default's VMs


def test_session_commands_through_the_server(
    live_server: LiveServer, tokens: Tokens, tools_image: str, tmp_path: Path
) -> None:
    t = tokens.default
    script = tmp_path / "journal.json"
    script.write_text(json.dumps(JOURNAL))
    sid = ok(
        remote(
            live_server,
            t,
            "session",
            "create",
            "--image",
            tools_image,
            "--model",
            f"scripted:{script}",
            "--name",
            "rsess",
            "-q",
        )
    ).strip()
    try:
        r = remote(live_server, t, "session", "send", "rsess", "alpha")
        assert ok(r) == "journal: alpha\n"
        # the turn's progress streamed as it ran, as the local CLI prints it
        assert b"tool shell" in r.stderr and b"checkpoint" in r.stderr, r.stderr
        sent = json.loads(ok(remote(live_server, t, "session", "send", "rsess", "beta", "--json")))
        assert sent["answer"] == "journal: alpha\nbeta"
        assert sent["entries"][0]["kind"] == "user"
        assert sent["entries"][-1]["kind"] == "checkpoint"
        lines = ok(remote(live_server, t, "session", "log", "rsess", "--json")).splitlines()
        local = ok(torpor_cli("session", "log", "rsess", "--json")).splitlines()
        assert lines == local  # the same log, entry by entry
        rows = json.loads(ok(remote(live_server, t, "session", "ls", "--json")))
        row = next(r for r in rows if r["id"] == sid)
        assert (row["name"], row["status"], row["turns"]) == ("rsess", "running", 2)
        show = json.loads(ok(remote(live_server, t, "session", "show", "rsess", "--json")))
        cks = show["checkpoint_list"]
        assert [c["reason"] for c in cks] == ["create", "turn", "turn"]
        assert "hibernated rsess" in ok(remote(live_server, t, "session", "hibernate", "rsess"))
        assert "rsess running in VM" in ok(remote(live_server, t, "session", "resume", "rsess"))
        child = ok(
            remote(
                live_server,
                t,
                "session",
                "fork",
                "rsess",
                "--at",
                str(cks[1]["seq"]),
                "--name",
                "rfork",
            )
        ).strip()
        assert ok(remote(live_server, t, "session", "send", "rfork", "gamma", "-q")) == (
            "journal: alpha\ngamma\n"
        )
        assert ok(remote(live_server, t, "session", "rm", "rfork")).strip() == "rfork"
        assert child not in ok(remote(live_server, t, "session", "ls", "-q"))
        r = remote(live_server, t, "session", "send", "no-such-session", "hi")
        assert r.returncode == 3, r.stderr
    finally:
        torpor_cli("session", "rm", "rsess")


def test_import_rmi_and_stop_through_the_server(
    live_server: LiveServer, tokens: Tokens, tools_image: str, tmp_path: Path
) -> None:
    from torpor.demo.image import write_busybox_rootfs

    t = tokens.default
    tar = write_busybox_rootfs(tmp_path / "up.tar")
    out = ok(remote(live_server, t, "import", str(tar), "uploaded:v1"))
    assert out.startswith("uploaded:v1: ")
    assert "uploaded" in ok(remote(live_server, t, "images"))
    r = remote(live_server, t, "import", str(tmp_path / "missing.tar"))
    assert r.returncode == 3, r.stderr
    vm = ok(
        remote(
            live_server,
            t,
            "run",
            "-d",
            "--name",
            "rstop",
            "-m",
            "256M",
            "--network",
            "none",
            "uploaded:v1",
            "sleep",
            "infinity",
        )
    ).strip()
    try:
        assert ok(remote(live_server, t, "stop", "-t", "1", "rstop")).strip() == "rstop"
        d = json.loads(ok(remote(live_server, t, "inspect", "rstop")))[0]
        assert d["id"] == vm and d["status"] in ("exited", "stopped"), d
        assert "rstop" in ok(remote(live_server, t, "ps", "-a"))
        assert "rstop" not in ok(remote(live_server, t, "ps"))
        import torpor  # the SDK: list(all=True) has the stopped one too, as locally

        with torpor.Client(live_server.url, t) as c:
            remote_all = {i.id for i in c.Sandbox.list(all=True)}
            assert vm in remote_all and vm not in {i.id for i in c.Sandbox.list()}
        assert remote_all == {i.id for i in torpor.Sandbox.list(all=True)}
        r = remote(live_server, t, "rmi", "uploaded:v1")
        assert r.returncode == 4, r.stderr  # a VM uses it: ConflictError, as locally
        ok(remote(live_server, t, "rm", "rstop"))  # stopped: no -f needed
        assert "uploaded:v1" in ok(remote(live_server, t, "rmi", "uploaded:v1"))
        assert "uploaded" not in ok(remote(live_server, t, "images"))
    finally:
        torpor_cli("rm", "-f", "rstop")
        torpor_cli("rmi", "-f", "uploaded:v1")
