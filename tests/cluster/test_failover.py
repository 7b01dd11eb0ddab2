"""Sessions that outlive their host (issue 12 §3): hosts A and B are ``torpor serve``
processes, C is this process, all sharing one PostgreSQL log and one bucket.

- a session hibernated on A wakes on B (a home that never saw it: empty cache);
- A killed -9 mid-turn: B's failover loop takes the session over once A's lease
  expires, replays the turn on the VM restored from the last checkpoint (the journal
  has the turn's line once), the background counter keeps counting; A restarted
  removes its stale VM and does not take the session back;
- B paused (SIGSTOP) mid-turn: C takes over (``torpor session recover --anywhere``);
  when B resumes, its in-flight turn's next write is refused by the fence, and the log
  holds the turn's work once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from tests.cluster.conftest import Cluster
from torpor.bench.cluster import _env, free_port
from torpor.cluster.host import host_id
from torpor.context import Kind, effective, open_log
from torpor.vmm.manager import VMManager

pytestmark = [pytest.mark.vm, pytest.mark.slow]
TORPOR = (sys.executable, "-m", "torpor.cli.main")

NOTES = {
    "version": 1,
    "turns": [
        {
            "steps": [
                {
                    "tool_calls": [
                        {
                            "name": "shell",
                            "arguments": {"cmd": "echo {user_sh} >> /root/notes; cat /root/notes"},
                        }
                    ]
                },
                {"text": "notes: {last_result}"},
            ]
        }
    ],
    "after_end": "repeat-last",
}
_COUNTER = (
    "i=0; while true; do i=$((i+1)); echo $i > /root/.c && mv /root/.c /root/counter; sleep 1; done"
)
COUNTER = {
    "version": 1,
    "turns": [
        {  # 0: a background service, and the journal's first line
            "steps": [
                {
                    "tool_calls": [
                        {
                            "name": "shell",
                            "arguments": {
                                "cmd": f"setsid sh -c '{_COUNTER}' </dev/null >/dev/null 2>&1 & "
                                "echo {user_sh} >> /root/journal; sleep 1; cat /root/counter"
                            },
                        }
                    ]
                },
                {"text": "started"},
            ]
        },
        {  # 1: a journal line, then a slow call: the window for a crash mid-turn
            "steps": [
                {
                    "tool_calls": [
                        {
                            "name": "shell",
                            "arguments": {
                                "cmd": "echo {user_sh} >> /root/journal; sleep 6; echo ok"
                            },
                        }
                    ]
                },
                {"text": "slow turn done"},
            ]
        },
        {  # 2 and after: read the journal
            "steps": [
                {"tool_calls": [{"name": "shell", "arguments": {"cmd": "cat /root/journal"}}]},
                {"text": "journal: {last_result}"},
            ]
        },
    ],
    "after_end": "repeat-last",
}


def _create(host_url: str, script: dict[str, Any], name: str) -> str:
    r = httpx.post(f"{host_url}/v1/sessions", json={"script": script, "name": name}, timeout=300)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _send(host_url: str, sid: str, text: str) -> httpx.Response:
    return httpx.post(f"{host_url}/v1/sessions/{sid}/messages", json={"text": text}, timeout=300)


def _entries(cluster: Cluster, sid: str) -> list[Any]:
    with cluster.log() as lg:
        return lg.entries(sid)


def _wait(cond: Any, what: str, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _in_flight(url: str, sid: str, text: str) -> tuple[threading.Thread, dict[str, Any]]:
    """A send whose host will die or be paused under it (its outcome kept)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["r"] = _send(url, sid, text)
        except httpx.HTTPError as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _bucket_manifests(cluster: Cluster) -> set[str]:
    """The snapshot manifests listed in the bucket (their ids)."""
    import boto3

    bucket, _, prefix = cluster.env["TORPOR_STORE"].removeprefix("s3://").partition("/")
    c = boto3.client(
        "s3",
        endpoint_url=cluster.env["AWS_ENDPOINT_URL"],
        aws_access_key_id=cluster.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=cluster.env["AWS_SECRET_ACCESS_KEY"],
        region_name=cluster.env["AWS_DEFAULT_REGION"],
    )
    out = set()
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            name = o["Key"].rsplit("/", 1)[1]
            if name.endswith(".manifest"):
                out.add(name.removesuffix(".manifest"))
    return out


def _tool_call_of_turn(cluster: Cluster, sid: str, turn: int) -> bool:
    return any(e.kind == Kind.TOOL_CALL and e.turn == turn for e in _entries(cluster, sid))


def test_a_session_hibernated_on_a_wakes_on_b(cluster: Cluster) -> None:
    a, b = cluster.a.start(), cluster.b.start()
    try:
        sid = _create(a.url, NOTES, "wanderer")
        r = _send(a.url, sid, "written on A")
        assert r.status_code == 200 and r.json()["answer"] == "notes: written on A", r.text
        r = httpx.post(f"{a.url}/v1/sessions/{sid}/hibernate", timeout=120)
        assert r.status_code == 200, r.text
        with cluster.log() as lg:
            assert lg.lease(sid) is not None and lg.lease(sid).host is None  # nobody's
        r = _send(b.url, sid, "read on B")
        assert r.status_code == 200, r.text
        assert r.json()["answer"] == "notes: written on A\nread on B"
        with cluster.log() as lg:
            assert lg.lease(sid).host == b.host_id
        vms_b = {vm.id for vm in VMManager(b.paths).list()}
        last_vm = [e for e in _entries(cluster, sid) if e.kind == Kind.VM][-1]
        assert last_vm.payload["vm"] in vms_b  # the session runs on B now
        httpx.delete(f"{b.url}/v1/sessions/{sid}", timeout=120)
    finally:
        a.stop()
        b.stop()


def test_kill9_mid_turn_b_takes_over_and_a_restarted_lets_go(cluster: Cluster) -> None:
    a, b = cluster.a.start(), cluster.b.start()
    try:
        sid = _create(a.url, COUNTER, "survivor")
        r = _send(a.url, sid, "line-0")
        assert r.status_code == 200 and r.json()["answer"] == "started", r.text
        old_vm = [e for e in _entries(cluster, sid) if e.kind == Kind.VM][-1].payload["vm"]
        sender, _ = _in_flight(a.url, sid, "line-1")
        _wait(lambda: _tool_call_of_turn(cluster, sid, 2), "A's slow tool call")
        a.stop(signal.SIGKILL)  # A's server dies mid-turn; its VM lingers (a sick host)
        sender.join(30)

        def taken_over() -> bool:
            es = _entries(cluster, sid)
            return es[-1].kind == Kind.CHECKPOINT and es[-1].turn == 2

        _wait(taken_over, "B's failover to replay turn 2")
        with cluster.log() as lg:
            assert lg.lease(sid).host == b.host_id
        es = _entries(cluster, sid)
        vm_entry = [e for e in es if e.kind == Kind.VM][-1]
        assert vm_entry.payload["vm"] != old_vm
        assert vm_entry.payload["vm"] in {vm.id for vm in VMManager(b.paths).list()}
        assert vm_entry.payload["reason"] == f"failover from {a.host_id}"  # the log says why
        assert [e.payload["content"] for e in es if e.kind == Kind.USER] == ["line-0", "line-1"]
        turn2 = [e for e in effective(es) if e.turn == 2]
        assert [e.kind for e in turn2 if e.kind in (Kind.TOOL_CALL, Kind.TOOL_RESULT)] == [
            Kind.TOOL_CALL,
            Kind.TOOL_RESULT,
        ]  # the interrupted call superseded, the replayed one kept: once
        # the journal has turn 2's line once (the VM came back from turn 1's checkpoint)
        r = _send(b.url, sid, "read")
        assert r.status_code == 200, r.text
        assert r.json()["answer"] == "journal: line-0\nline-1"
        # the background service, started on A in turn 1, counts on B
        mgr_b = VMManager(b.paths)

        def count() -> int:
            with mgr_b.client(vm_entry.payload["vm"]) as c:
                return int(c.exec(["cat", "/root/counter"]).stdout.decode().strip() or 0)

        first = count()
        _wait(lambda: count() > first, "the counter to go on on B", timeout=60)
        # A comes back: it removes its stale VM and leaves the session to B
        assert old_vm in {vm.id for vm in VMManager(a.paths).list()}
        a.start()
        _wait(
            lambda: old_vm not in {vm.id for vm in VMManager(a.paths).list()},
            "A to remove its stale VM",
            timeout=60,
        )
        with cluster.log() as lg:
            assert lg.lease(sid).host == b.host_id
        listed = subprocess.run(
            [*TORPOR, "hosts", "--json"], env=cluster.c_env(), capture_output=True, text=True
        )
        assert listed.returncode == 0, listed.stderr
        rows = {r["id"]: r for r in json.loads(listed.stdout)}
        assert rows[b.host_id]["alive"] and "survivor" in rows[b.host_id]["sessions"]
        assert rows[b.host_id]["failover"]  # its torpor serve runs the loop
        assert not any(h.endswith(":failover") for h in rows)  # (a column, not a host)
        assert rows[a.host_id]["alive"] and "survivor" not in rows[a.host_id]["sessions"]
        api = {r["id"]: r for r in httpx.get(f"{a.url}/v1/hosts", timeout=30).json()}
        assert api[b.host_id]["sessions"] == rows[b.host_id]["sessions"]  # the same, over HTTP
        httpx.delete(f"{b.url}/v1/sessions/{sid}", timeout=120)
    finally:
        a.stop(signal.SIGKILL)
        b.stop()


def test_a_paused_host_is_fenced_after_c_takes_over(cluster: Cluster) -> None:
    b = cluster.b.start(failover=False)
    try:
        sid = _create(b.url, COUNTER, "paused")
        assert _send(b.url, sid, "line-0").status_code == 200
        sender, out = _in_flight(b.url, sid, "line-1")
        _wait(lambda: _tool_call_of_turn(cluster, sid, 2), "B's slow tool call")
        b.send_signal(signal.SIGSTOP)  # paused, not dead: its turn is still in flight
        try:
            with cluster.log() as lg:
                _wait(lambda: lg.lease(sid).expires_at < lg.now(), "B's lease to expire", 60)
            cli = subprocess.run(
                [*TORPOR, "session", "recover", "--anywhere", "--json"],
                env=cluster.c_env(),
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            b.send_signal(signal.SIGCONT)
        assert cli.returncode == 0, cli.stderr
        rows = [json.loads(line) for line in cli.stdout.splitlines()]
        mine = [r for r in rows if r["session_id"] == sid]
        assert len(mine) == 1 and mine[0]["outcome"] == "recovered", rows
        assert mine[0]["from_host"] == b.host_id
        sender.join(120)
        assert not sender.is_alive()
        # B's turn resumed after the takeover: its next write was refused by the fence
        assert "r" in out and out["r"].status_code == 409, out
        es = _entries(cluster, sid)
        turn2 = [e for e in effective(es) if e.turn == 2]
        assert [e.kind for e in turn2 if e.kind in (Kind.TOOL_RESULT, Kind.CHECKPOINT)] == [
            Kind.TOOL_RESULT,
            Kind.CHECKPOINT,
        ]  # C's replay, once; nothing B wrote after the takeover
        assert [e.payload["content"] for e in es if e.kind == Kind.USER] == ["line-0", "line-1"]
    finally:
        b.send_signal(signal.SIGCONT)
        b.stop()


def test_two_hosts_racing_for_a_dead_hosts_session_one_wins(cluster: Cluster, tmp_path) -> None:
    """A session whose host is gone (the CLI process that made it exited, so nothing
    heartbeats its lease) is taken by exactly one of two hosts passing at once; a
    session with custom tools (code not in the log) is left alone, with the reason."""
    from torpor.cluster.failover import HELD, RESTORED, SKIPPED, failover_once

    script = tmp_path / "notes.json"
    script.write_text(json.dumps(NOTES))
    model = f"scripted:{script}"
    create = ("session", "create", "--image", "tools:latest", "-q", "--model", model)
    made = subprocess.run(
        [*TORPOR, *create, "--name", "racer"],
        env={**cluster.env, "TORPOR_HOME": str(cluster.a.paths.root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    sid = made.stdout.strip()
    with cluster.log() as lg:
        tooly = lg.create_session("tooly", {"tools": [{"name": "lookup", "where": "host"}]}).id
        lg.claim(tooly, cluster.a.host_id, 1.0)
        _wait(
            lambda: {ls.session_id for ls in lg.expired_leases()} >= {sid, tooly},
            "both leases to expire",
            60,
        )
    # a standby may warm its cache with the session's last snapshot before it claims
    from torpor.cluster.failover import prefetch
    from torpor.store.home import home_store

    with cluster.as_c(), cluster.log() as lg:
        assert prefetch(cluster.c, lg, tooly) == 0  # no checkpoint: nothing to fetch
        assert prefetch(cluster.c, lg, sid) > 0
        snap = lg.own_entries(sid, Kind.CHECKPOINT)[-1].payload["snapshot"]
        with home_store(cluster.c) as st:
            need = set(st.get(snap).chunks)
        cached = {p.name for p in (cluster.c.store / "chunks").glob("*/*")}
        assert need and need <= cached
        assert lg.lease(sid).host == cluster.a.host_id  # reads only: the lease untouched
    results: dict[str, Any] = {}

    def pass_on(name: str, home: Any) -> None:
        with open_log(cluster.dsn, paths=home) as lg:
            results[name] = failover_once(home, lg, dsn=cluster.dsn)

    with cluster.as_c():
        threads = [
            threading.Thread(target=pass_on, args=(n, h))
            for n, h in (("b", cluster.b.paths), ("c", cluster.c))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    by_session: dict[str, list[str]] = {}
    for rows in results.values():
        for r in rows:
            by_session.setdefault(r.session_id, []).append(r.outcome)
    assert sorted(by_session[sid]) in ([RESTORED], [HELD, RESTORED]), results
    assert set(by_session[tooly]) == {SKIPPED}, results
    assert all(
        "custom tool" in r.detail
        for rows in results.values()
        for r in rows
        if r.session_id == tooly
    )
    winner = next(
        n
        for n, rows in results.items()
        for r in rows
        if r.session_id == sid and r.outcome == RESTORED
    )
    win_home = cluster.b.paths if winner == "b" else cluster.c
    with cluster.log() as lg:
        assert lg.lease(sid).host == host_id(win_home)
    last_vm = [e for e in _entries(cluster, sid) if e.kind == Kind.VM][-1].payload["vm"]
    assert last_vm in {vm.id for vm in VMManager(win_home).list()}
    with cluster.as_c():
        mgr = VMManager(win_home)
        with mgr.client(last_vm) as c:
            assert c.exec(["cat", "/proc/uptime"]).code == 0


def test_bucket_unreachable_during_a_turns_checkpoint(cluster: Cluster, tmp_path, monkeypatch):
    """The bucket goes away between two turns: the turn's checkpoint fails with a clear
    error, the log does not call the turn checkpointed, the bucket lists no snapshot the
    log does not name; once the bucket is back, recover() checkpoints the turn."""
    from torpor.errors import TorporError
    from torpor.session import Session

    monkeypatch.setattr("torpor.store.backend.BACKOFF_S", 0.01)
    script = tmp_path / "notes.json"
    script.write_text(json.dumps(NOTES))
    with cluster.as_c():
        s = Session.create(
            "tools:latest", f"scripted:{script}", name="cut-off", paths=cluster.c, dsn=cluster.dsn
        )
        try:
            assert s.send("one") == "notes: one"
            cps = len(s.checkpoints)
            listed = _bucket_manifests(cluster)
            assert {c.snapshot for c in s.checkpoints} <= listed
            dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
            with _env({"AWS_ENDPOINT_URL": dead}), pytest.raises(TorporError) as e:
                s.send("two")
            assert dead in str(e.value), e.value  # names what it could not reach
            assert len(s.checkpoints) == cps and s.status() == "interrupted"
            assert _bucket_manifests(cluster) == listed  # nothing half-listed
            assert s.recover() == "notes: one\ntwo"  # the turn replayed on the last checkpoint
            assert len(s.checkpoints) == cps + 1
            assert s.checkpoints[-1].snapshot in _bucket_manifests(cluster)
        finally:
            s.remove()
            s.close()


def test_the_loop_skips_a_session_it_cannot_run_and_backs_off(cluster: Cluster) -> None:
    """No VM: a session with custom tools whose host died is skipped, with the reason,
    on the loop's first pass, then looked at again only after 2, 4, 8... passes (not a
    log line and a database round trip every pass)."""
    from torpor.cluster.failover import SKIPPED, Failover
    from torpor.server.tenancy import namespace_paths

    home = namespace_paths(cluster.c, "loop")  # a schema of its own: only this session
    with open_log(cluster.dsn, paths=home) as lg:
        sid = lg.create_session("tooly", {"tools": [{"name": "lookup", "where": "host"}]}).id
        lg.claim(sid, "gone-host", 1.0)
        _wait(lambda: sid in {ls.session_id for ls in lg.expired_leases()}, "expiry", 60)
    loop = Failover(lambda: [home], dsn=cluster.dsn, ttl=3.0, interval=0.02)
    with cluster.as_c():
        loop.start()
        try:
            _wait(lambda: loop.passes >= 10, "ten passes", 120)
        finally:
            loop.stop()
    looks = [r for _, r in loop.results if r.session_id == sid]
    assert looks and all(r.outcome == SKIPPED and "custom tool" in r.detail for r in looks)
    assert looks[0].from_host == "gone-host"
    last = loop.passes - 1  # the last pass may have stopped before reaching the home
    expected = [k for k in (0, 2, 6, 14, 30, 62, 126, 254) if k <= last]
    assert len(looks) in (len(expected), len(expected) - 1), (len(looks), loop.passes)
    assert len(looks) < loop.passes / 2


def test_recover_anywhere_leaves_a_live_hosts_session_and_names_bad_input(
    cluster: Cluster,
) -> None:
    """No VM: `session recover --anywhere S` of a session a live host holds says so and
    changes nothing; an unknown session is exit code 3, no session at all (without
    --anywhere) a usage error."""
    from torpor.server.tenancy import namespace_paths

    home = namespace_paths(cluster.c, "cli")
    with open_log(cluster.dsn, paths=home) as lg:
        sid = lg.create_session("held-one", {}).id
        lease = lg.claim(sid, "busy-host", 300.0)
    env = {**cluster.c_env(), "TORPOR_HOME": str(home.root)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TORPOR, "session", "recover", *args], env=env, capture_output=True, text=True
        )

    r = cli("--anywhere", "--json", "held-one")
    assert r.returncode == 0, r.stderr
    (row,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert row["outcome"] == "held" and "busy-host" in row["detail"], row
    with open_log(cluster.dsn, paths=home) as lg:
        assert lg.lease(sid) == lease  # untouched: same holder, same epoch
        assert lg.entries(sid) == []
    r = cli("--anywhere", "no-such-session")
    assert r.returncode == 3 and "no-such-session" in r.stderr, r.stderr
    r = cli()
    assert r.returncode == 2 and "one session" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_bench_cluster_refuses_a_log_hosts_cannot_share(tmp_path) -> None:
    """No VM, nothing started: the bench needs a PostgreSQL DSN and sane counts."""
    env = {k: v for k, v in os.environ.items() if k != "TORPOR_CONTEXT_DSN"}
    for args, needle in (
        (["--dsn", f"sqlite:///{tmp_path}/x.db"], "PostgreSQL"),
        (["--dsn", "postgresql://nobody@/x", "--turns", "1"], "--turns"),
    ):
        r = subprocess.run(
            [*TORPOR, "bench", "cluster", *args, "--json", str(tmp_path / "out.json")],
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "out.json").exists()
