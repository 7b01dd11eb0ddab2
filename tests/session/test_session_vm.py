"""Durable sessions on real VMs: turns, checkpoints, hibernation, crash recovery, forks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import torpor_cli
from torpor.context import Kind, superseded
from torpor.errors import NotFoundError, TorporError, UsageError
from torpor.fsutil import locked
from torpor.session import Session
from torpor.snapshot import journal
from torpor.vmm.manager import VMManager
from torpor.vmm.state import Status

pytestmark = pytest.mark.vm

# A script whose second turn has a side effect and then takes a while: the window
# in which the tests kill torpor (and the VM).
CRASH_SCRIPT = {
    "version": 1,
    "turns": [
        {
            "steps": [
                {"tool_calls": [{"name": "shell", "arguments": {"cmd": "mkdir -p /work"}}]},
                {"text": "ready"},
            ]
        },
        {
            "steps": [
                {
                    "tool_calls": [
                        {
                            "name": "shell",
                            "arguments": {
                                "cmd": "echo effect >> /work/effects; sleep 3; "
                                "wc -l < /work/effects"
                            },
                        }
                    ]
                },
                {"text": "effects: {last_result}"},
            ]
        },
        {"steps": [{"text": "turn {turn}: {user}"}]},
    ],
    "after_end": "repeat-last",
}


@pytest.fixture
def sessions(paths, tools_image):
    made: list[Session] = []

    class Factory:
        def create(self, model: str = "scripted:demo", **kw):
            s = Session.create(tools_image, model, paths=paths, **kw)
            made.append(s)
            return s

        def track(self, s: Session) -> Session:
            made.append(s)
            return s

    yield Factory()
    for s in made:
        with contextlib.suppress(Exception):
            s.remove()
        s.close()


def _guest(s: Session, *cmd: str) -> str:
    vm = s.vm()
    assert vm is not None
    with VMManager(s.paths).client(vm) as c:
        r = c.exec(list(cmd))
        return r.stdout.decode()


def _kinds(entries) -> list[str]:
    return [e.kind.value for e in entries]


def test_turns_checkpoints_hibernate_resume(sessions, paths) -> None:
    s = sessions.create(name="demo-a")
    assert s.status() == "running"
    assert [c.reason for c in s.checkpoints] == ["create"]
    answer = s.send("set up a counter service and tell me its port")
    assert "counter" in answer.lower()
    log = s.log()
    kinds = _kinds(log)
    assert kinds[:3] == ["vm", "checkpoint", "user"]
    assert kinds[-1] == "checkpoint" and "tool_call" in kinds and "tool_result" in kinds
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    # every tool call has its result, in order, and the model saw them
    calls = [e.payload["id"] for e in log if e.kind == Kind.TOOL_CALL]
    results = [e.payload["id"] for e in log if e.kind == Kind.TOOL_RESULT]
    assert calls == results and calls
    resp = [e for e in log if e.kind == Kind.MODEL_RESPONSE][-1]
    assert resp.payload["usage"]["output_tokens"] >= 0 and "latency_ms" in resp.payload
    assert _guest(s, "cat", "/work/notes.md")
    time.sleep(1.5)
    before = int(_guest(s, "cat", "/work/counter"))

    vm = s.vm()
    assert vm is not None
    ck = s.hibernate()
    assert ck.reason == "hibernate" and s.status() == "hibernated"
    vm_after = VMManager(paths).get(vm.id)
    assert vm_after.state.status == Status.HIBERNATED  # QEMU is gone: CPU and RAM freed
    assert s.hibernate() == ck  # idempotent
    time.sleep(1.0)

    answer = s.send("is the counter still running?")
    assert s.status() == "running"
    kinds = _kinds(s.log(after=ck.seq))
    assert kinds[:3] == ["hibernate", "user", "resume"], kinds
    now = int(_guest(s, "cat", "/work/counter"))
    assert now >= before  # frozen while hibernated, not reset: the process survived
    time.sleep(1.5)
    assert int(_guest(s, "cat", "/work/counter")) > now  # and it still counts
    assert "kept counting" in answer
    # storage grows with what changed: a turn's checkpoint is an increment (journaled,
    # its entry cannot know what the store adds: what the commit behind stored counts)
    cks = s.checkpoints
    assert [c.reason for c in cks] == ["create", "turn", "hibernate", "turn"]
    journal.wait_all()
    last = cks[-1]
    stored = journal.commits.get(last.snapshot, {}).get("stored_bytes", last.stored_bytes)
    assert 0 < stored < cks[0].stored_bytes


def test_crash_mid_turn_then_recover(sessions, paths, tmp_path) -> None:
    script = tmp_path / "crash.json"
    script.write_text(json.dumps(CRASH_SCRIPT))
    s = sessions.create(model=f"scripted:{script}", name="crashy")
    assert s.send("prepare") == "ready"
    # turn 2 in a separate torpor process, killed -9 (with its VM) during the tool call
    proc = subprocess.Popen(
        [sys.executable, "-m", "torpor.cli.main", "session", "send", s.id, "do it", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(e.kind == Kind.TOOL_CALL and e.turn == 2 for e in s.log()):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"turn 2 never reached its tool call: {proc.communicate()}")
    time.sleep(0.5)  # the effect is applied inside the VM
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    vm = s.vm()
    assert vm is not None
    VMManager(paths).kill(vm.id)  # and the VM dies too
    assert s.status() == "interrupted"
    users = [e for e in s.log() if e.kind == Kind.USER]
    assert [u.payload["content"] for u in users] == ["prepare", "do it"]  # acknowledged

    r = torpor_cli("session", "recover", "crashy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == "effects: 1"
    log = s.log()
    gone = superseded(log)
    assert gone, "the interrupted turn's partial entries are marked superseded"
    assert all(e.turn == 2 and e.kind != Kind.USER for e in log if e.seq in gone)
    assert [e.payload["content"] for e in log if e.kind == Kind.USER] == ["prepare", "do it"]
    assert _guest(s, "cat", "/work/effects") == "effect\n"  # applied once, not twice
    assert s.status() == "running" and log[-1].kind == Kind.CHECKPOINT


def test_torpor_killed_vm_alive_next_send_recovers(sessions, paths, tmp_path) -> None:
    script = tmp_path / "crash.json"
    script.write_text(json.dumps(CRASH_SCRIPT))
    s = sessions.create(model=f"scripted:{script}")
    s.send("prepare")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torpor.cli.main", "session", "send", s.id, "do it", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not any(e.kind == Kind.TOOL_CALL and e.turn == 2 for e in s.log()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the VM still runs, with the effect applied: the next send must not keep it
    assert _guest(s, "cat", "/work/effects") == "effect\n"
    answer = s.send("next")  # recovers turn 2 first, then runs turn 3
    assert answer == "turn 2: next"  # the script's {turn} is its 0-based turn index
    assert _guest(s, "cat", "/work/effects") == "effect\n"
    answers = [
        e.payload["text"]
        for e in s.log()
        if e.kind == Kind.MODEL_RESPONSE and e.seq not in superseded(s.log())
    ]
    assert answers[-2:] == ["effects: 1", "turn 2: next"]


def test_fork_shares_prefix_and_diverges(sessions) -> None:
    s = sessions.create(name="parent")
    s.send("set up a counter service and tell me its port")
    s.send("is the counter still running?")  # the demo script journals from turn 3 on
    at = s.checkpoints[-1]
    parent_vm = s.vm()
    child = sessions.track(s.fork(at=at, name="child"))
    assert s.vm() == parent_vm and child.vm() is not None  # the parent keeps its VM
    assert child.vm().id != parent_vm.id
    assert child.record.parent_id == s.id and child.record.parent_seq == at.seq
    assert [e.seq for e in child.log()][: at.seq] == list(range(1, at.seq + 1))
    assert child.log()[at.seq - 1].kind == Kind.CHECKPOINT
    s.send("parent branch")
    child.send("child branch")
    assert _guest(s, "cat", "/work/journal") == "parent branch\n"
    assert _guest(child, "cat", "/work/journal") == "child branch\n"
    # the child's log holds the parent's prefix by reference, then its own entries
    assert all(e.session_id == s.id for e in child.log()[: at.seq])
    assert all(e.session_id == child.id for e in child.log()[at.seq :])
    assert not any(e.payload.get("content") == "parent branch" for e in child.log())
    assert int(_guest(child, "cat", "/work/counter")) > 0
    assert [e.payload["reason"] for e in s.log() if e.kind == Kind.VM] == ["create"]
    with pytest.raises(UsageError, match="not a checkpoint"):
        s.fork(at=at.seq + 1)


def test_idempotent_send_and_idle_hibernation(sessions, paths) -> None:
    s = sessions.create(idle=1.0)
    a1 = s.send("set up a counter service and tell me its port", key="k-1")
    n = len(s.log())
    a2 = s.send("set up a counter service and tell me its port", key="k-1")
    assert a1 == a2 and len(s.log()) == n  # the retry did not start a new turn
    deadline = time.monotonic() + 90
    while s.status() != "hibernated":
        assert time.monotonic() < deadline, "the idle session was never hibernated"
        time.sleep(0.5)
    import torpor

    with torpor.Session.resume(s.id, paths=paths) as s2:  # the SDK's spelling
        assert s2.status() == "running" and s2.vm() == s.vm()
        assert s2.send("is the counter still running?").startswith("Yes")
        assert s2.checkpoints[-2].reason == "hibernate"


def test_bad_input(sessions, paths, tools_image) -> None:
    with pytest.raises(NotFoundError):
        Session.create("no-such-image:latest", paths=paths)
    with pytest.raises(UsageError):
        Session.create(tools_image, "nope:model", paths=paths)
    with pytest.raises(NotFoundError):
        Session.open("no-such-session", paths=paths)
    r = torpor_cli("session", "send", "no-such-session", "hi")
    assert r.returncode == 3 and b"no-such-session" in r.stderr
    r = torpor_cli("session", "create", "--image", tools_image, "--idle", "soon")
    assert r.returncode == 2 and b"invalid duration" in r.stderr
    r = torpor_cli("session", "create", "--image", tools_image, "--name", "bad name!")
    assert r.returncode == 2
    s = sessions.create()
    r = s.send("set up a counter service")  # a normal turn first: /work exists
    with VMManager(paths).client(s.vm()) as c:
        c.write_file("/work/bin", b"a\x00b\xff")
    from torpor.session.tools import run_tool

    with VMManager(paths).client(s.vm()) as c:
        res = run_tool(c, "x", "read_file", {"path": "/work/bin"})
        assert "\x00" in res.content  # the raw tool result has the NUL...
    s._append(Kind.TOOL_RESULT, res.to_json(), turn=1)  # ...the log takes it as U+FFFD
    assert s.log()[-1].payload["content"] == "a\ufffdb\ufffd"
    n = len(s.log())
    with pytest.raises(UsageError, match="empty"):
        s.send("   ")
    assert len(s.log()) == n  # nothing appended by the refused send


def test_cli_end_to_end(paths, tools_image) -> None:
    r = torpor_cli("session", "create", "--image", tools_image, "--name", "cli-s", "-q")
    assert r.returncode == 0, r.stderr
    sid = r.stdout.decode().strip()
    try:
        r = torpor_cli("session", "send", "cli-s", "set up a counter service", "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert "counter" in out["answer"].lower()
        assert out["entries"][0]["kind"] == "user" and out["entries"][-1]["kind"] == "checkpoint"
        r = torpor_cli("session", "ls", "--json")
        rows = {row["name"]: row for row in json.loads(r.stdout)}
        assert rows["cli-s"]["status"] == "running" and rows["cli-s"]["turns"] == 1
        r = torpor_cli("session", "hibernate", "cli-s")
        assert r.returncode == 0 and b"hibernated" in r.stdout
        r = torpor_cli("session", "show", "cli-s", "--json")
        assert json.loads(r.stdout)["status"] == "hibernated"
        r = torpor_cli("session", "log", sid[:8], "--json")
        lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
        assert lines[-1]["kind"] == "hibernate"
        r = torpor_cli("session", "fork", "cli-s", "--name", "cli-f")
        assert r.returncode == 0, r.stderr
        r = torpor_cli("session", "log", "cli-f")
        assert b"fork" in r.stdout and b"set up a counter service" in r.stdout
        r = torpor_cli("session", "fork", "cli-s", "--at", "1")
        assert r.returncode == 2 and b"not a checkpoint" in r.stderr
    finally:
        torpor_cli("session", "rm", "cli-s", "cli-f")
    assert not any(vm.config.labels.get("torpor.session") == sid for vm in VMManager(paths).list())


def test_script_file_errors_are_clear(tmp_path: Path, paths, tools_image) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError):
        Session.create(tools_image, f"scripted:{bad}", paths=paths)


def test_ctrl_c_mid_turn_keeps_the_message_and_the_next_send_finishes_it(
    sessions, tmp_path
) -> None:
    script = tmp_path / "crash.json"
    script.write_text(json.dumps(CRASH_SCRIPT))
    s = sessions.create(model=f"scripted:{script}")
    s.send("prepare")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torpor.cli.main", "session", "send", s.id, "do it"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # a background job inherits SIGINT ignored, and Python then keeps ignoring it:
        # give the CLI the disposition an interactive terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not any(e.kind == Kind.TOOL_CALL and e.turn == 2 for e in s.log()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"session recover" in err  # says how to finish the turn
    assert s.status() == "interrupted"
    r = torpor_cli("session", "send", s.id, "next", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == "turn 2: next"
    assert _guest(s, "cat", "/work/effects") == "effect\n"


def test_kill_9_during_create_leaves_nothing_behind(paths, tools_image) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torpor.cli.main",
            "session",
            "create",
            "--image",
            tools_image,
            "--name",
            "doomed",
            "-q",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mgr = VMManager(paths)
    deadline = time.monotonic() + 60
    # once its VM exists, hold that VM's snapshot lock: create can boot the VM but never
    # take checkpoint 0, so the kill below always lands before the checkpoint is logged
    vm = None
    while vm is None:
        assert time.monotonic() < deadline and proc.poll() is None
        vm = next((v for v in mgr.list() if v.name == "ses-doomed"), None)
        time.sleep(0.02)
    with locked(paths.locks / f"snap-{vm.id}.lock"):
        s = Session.open("doomed", paths=paths)
        # wait until create is at the checkpoint (its VM entry is logged), then kill it
        while not any(e.kind == Kind.VM for e in s.log()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    try:
        assert s.status() == "failed"
        with pytest.raises(TorporError, match="never finished starting"):
            s.send("hello")
        r = torpor_cli("session", "rm", "doomed")
        assert r.returncode == 0, r.stderr
        assert not [vm for vm in mgr.list() if vm.config.labels.get("torpor.session") == s.id]
    finally:
        s.close()
