"""Leases, heartbeats and fenced appends, on SQLite and PostgreSQL.

Lease times come from the database's clock, so expiry is driven by a short TTL and
polled with a deadline (never a sleep the test depends on).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.context.conftest import REPO, Backend
from torpor.cluster.host import ENV_HOST_ID, HOST_FILE, Heartbeat, host_id
from torpor.context import ContextLog, Kind, Lease
from torpor.errors import ConflictError, FencedError, LeaseHeldError, NotFoundError, UsageError
from torpor.paths import Paths

TTL = 1.0


def _expire(log: ContextLog, lease: Lease) -> None:
    """Wait (database clock) until ``lease`` is past its expiry."""
    end = time.monotonic() + 20
    while log.now() <= lease.expires_at:
        assert time.monotonic() < end
        time.sleep(0.05)


def test_claim_extend_takeover_release_epochs(log: ContextLog) -> None:
    s = log.create_session("leased")
    assert log.lease(s.id) is None
    a = log.claim(s.id, "host-a", TTL)
    assert (a.host, a.epoch) == ("host-a", 1)
    assert a.expires_at > log.now()
    again = log.claim(s.id, "host-a", 30)  # the holder extends: same tenure, same epoch
    assert (again.host, again.epoch) == ("host-a", 1)
    assert again.expires_at > a.expires_at

    with pytest.raises(LeaseHeldError) as held:
        log.claim(s.id, "host-b", TTL)
    err = held.value
    assert isinstance(err, ConflictError) and err.exit_code == ConflictError.exit_code
    assert err.holder == "host-a" and err.epoch == 1 and 0 < err.seconds_left <= 30
    assert "host-a" in str(err) and "s more" in str(err)

    short = log.claim(s.id, "host-a", TTL)
    _expire(log, short)
    assert log.expired_leases() == [log.lease(s.id)]
    b = log.claim(s.id, "host-b", TTL)  # expired: taken over, a new epoch
    assert (b.host, b.epoch) == ("host-b", 2)
    assert log.expired_leases() == []

    assert log.release(s.id, "host-a", 1) is False  # not a's any more
    assert log.release(s.id, "host-b", 1) is False  # b's, but not at that epoch
    assert log.release(s.id, "host-b", 2) is True
    freed = log.lease(s.id)
    assert freed is not None and freed.host is None and freed.epoch == 2
    assert log.release(s.id, "host-b", 2) is False
    # after a release the holder changes even when the same host claims again
    assert log.claim(s.id, "host-b", TTL).epoch == 3
    assert log.claim(s.id, "host-b", TTL).epoch == 3
    # who held each tenure (the extensions and the lapsed re-claim were no new tenure)
    assert log.tenures(s.id) == [(1, "host-a"), (2, "host-b"), (3, "host-b")]
    assert log.tenures(s.id, 1) == [(2, "host-b"), (3, "host-b")]
    assert log.tenures(s.id, 3) == []


def test_an_expired_lease_reclaimed_by_its_holder_keeps_its_epoch(log: ContextLog) -> None:
    s = log.create_session("back")
    first = log.claim(s.id, "host-a", TTL)
    _expire(log, first)
    assert log.expired_leases() == [log.lease(s.id)]
    back = log.claim(s.id, "host-a", TTL)  # nobody took it: the same tenure goes on
    assert back.epoch == 1
    assert log.append(s.id, Kind.USER, {"content": "x"}, turn=1, fence=("host-a", 1)).seq == 1


def test_fenced_append_is_refused_after_a_takeover_and_writes_nothing(
    log: ContextLog, backend: Backend
) -> None:
    s = log.create_session("fenced")
    a = log.claim(s.id, "host-a", TTL)
    fa = ("host-a", a.epoch)
    assert log.append(s.id, Kind.USER, {"content": "from a"}, turn=1, fence=fa).seq == 1
    _expire(log, a)
    # expired, not yet taken: a's fenced write is refused too (it is not unexpired)
    with pytest.raises(FencedError, match="expired"):
        log.append(s.id, Kind.TOOL_CALL, {"n": 1}, turn=1, fence=fa)
    b = log.claim(s.id, "host-b", TTL)
    fb = ("host-b", b.epoch)
    with pytest.raises(FencedError) as refused:
        log.append(s.id, Kind.TOOL_CALL, {"n": 2}, turn=1, fence=fa, key="late")
    err = refused.value
    assert isinstance(err, ConflictError)
    assert (err.host, err.epoch, err.holder, err.holder_epoch) == ("host-a", 1, "host-b", 2)
    assert "host-b" in str(err)
    # an idempotency key does not get a stale writer past the fence either
    log.append(s.id, Kind.TOOL_CALL, {"n": 3}, turn=1, fence=fb, key="shared")
    with pytest.raises(FencedError):
        log.append(s.id, Kind.TOOL_CALL, {"n": 3}, turn=1, fence=fa, key="shared")
    assert [e.payload for e in log.entries(s.id)] == [{"content": "from a"}, {"n": 3}]
    assert backend.rows() == 2
    # no lease at all, a wrong epoch, a released lease: all refused
    other = log.create_session("never-claimed")
    with pytest.raises(FencedError, match="no host holds"):
        log.append(other.id, Kind.USER, {"content": "x"}, turn=1, fence=fb)
    with pytest.raises(FencedError):
        log.append(s.id, Kind.USER, {"content": "x"}, turn=1, fence=("host-b", 3))
    assert log.release(s.id, *fb)
    with pytest.raises(FencedError, match="released"):
        log.append(s.id, Kind.USER, {"content": "x"}, turn=1, fence=fb)
    # without a fence nothing about leases is checked (single-host callers)
    assert log.append(s.id, Kind.USER, {"content": "unfenced"}, turn=2).seq == 3


def test_remove_session_is_fenced_and_releases_the_lease(log: ContextLog) -> None:
    s = log.create_session("gone")
    a = log.claim(s.id, "host-a", 30)
    with pytest.raises(FencedError):
        log.remove_session(s.id, fence=("host-b", 1))
    log.remove_session(s.id, fence=("host-a", a.epoch))
    assert log.lease(s.id) == Lease(s.id, None, a.epoch, a.expires_at)
    assert log.expired_leases() == []
    with pytest.raises(NotFoundError):
        log.claim(s.id, "host-a", TTL)


def test_heartbeat_extends_held_leases_and_lists_hosts(log: ContextLog) -> None:
    s1, s2, s3 = (log.create_session(f"hb{i}") for i in range(3))
    log.claim(s1.id, "host-a", TTL)
    log.claim(s2.id, "host-a", TTL)
    log.claim(s3.id, "host-b", TTL)
    log.heartbeat("host-a", {"version": "x", "pid": os.getpid()}, 60)
    l1, l2, l3 = (log.lease(s.id) for s in (s1, s2, s3))
    assert l1 is not None and l2 is not None and l3 is not None
    assert l1.expires_at - log.now() > 30 and l2.expires_at - log.now() > 30
    _expire(log, l3)  # host-b never heartbeat: its lease ran out, host-a's did not
    assert [x.session_id for x in log.expired_leases()] == [s3.id]
    with pytest.raises(LeaseHeldError):
        log.claim(s1.id, "host-b", TTL)
    # an expired lease is not revived by its host's heartbeat: it has to claim again
    log.heartbeat("host-b", {}, 60)
    assert [x.session_id for x in log.expired_leases()] == [s3.id]

    hosts = {h.id: h for h in log.hosts()}
    assert set(hosts) == {"host-a", "host-b"}
    a = hosts["host-a"]
    assert a.alive and a.info == {"version": "x", "pid": os.getpid()}
    assert a.started_at <= a.heartbeat_at <= log.now()
    # a host seen again after its heartbeat lapsed starts a new alive stretch
    log.heartbeat("host-c", {}, TTL)
    c0 = {h.id: h for h in log.hosts()}["host-c"]
    log.heartbeat("host-c", {}, TTL)
    c1 = {h.id: h for h in log.hosts()}["host-c"]
    assert c1.started_at == c0.started_at and c1.heartbeat_at >= c0.heartbeat_at
    end = time.monotonic() + 20
    while {h.id: h for h in log.hosts()}["host-c"].alive:
        assert time.monotonic() < end
        time.sleep(0.05)
    log.heartbeat("host-c", {}, TTL)
    c2 = {h.id: h for h in log.hosts()}["host-c"]
    assert c2.alive and c2.started_at > c0.started_at


def test_lease_times_are_the_databases_not_this_process(
    log: ContextLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = log.create_session("clock")
    log.claim(s.id, "host-a", 30)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this host's clock is an hour ahead
    with pytest.raises(LeaseHeldError):
        log.claim(s.id, "host-b", TTL)
    assert log.expired_leases() == []
    assert log.append(s.id, Kind.USER, {"content": "x"}, turn=1, fence=("host-a", 1)).seq == 1
    assert abs(log.now() - real()) < 60


def test_bad_arguments_are_usage_errors(log: ContextLog) -> None:
    s = log.create_session("bad")
    for host in ("", "-x", "a b", "x" * 200, None, "a\x00"):
        with pytest.raises(UsageError):
            log.claim(s.id, host, TTL)  # type: ignore[arg-type]
    for ttl in (0, -1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(UsageError):
            log.claim(s.id, "host-a", ttl)  # type: ignore[arg-type]
    for fence in (("host-a", 0), ("host-a", True), ("host-a",), ["host-a", 1], ("", 1)):
        with pytest.raises(UsageError):
            log.append(s.id, Kind.USER, {"content": "x"}, turn=1, fence=fence)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        log.heartbeat("host-a", {"bad": object()}, TTL)
    with pytest.raises(NotFoundError):
        log.claim("0" * 32, "host-a", TTL)
    assert log.entries(s.id) == []


_CLAIMER = """
import sys
from torpor.context import open_log
from torpor.errors import LeaseHeldError
dsn, sid, host = sys.argv[1:4]
with open_log(dsn) as log:
    print("READY", flush=True)
    sys.stdin.readline()
    try:
        lease = log.claim(sid, host, 30)
        print("won", lease.epoch, flush=True)
    except LeaseHeldError as e:
        print("held", e.holder, flush=True)
"""


def test_concurrent_claims_from_processes_exactly_one_wins(backend: Backend) -> None:
    with backend.open() as log:
        sid = log.create_session("raced").id
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, backend.dsn, sid, f"host-{i}"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "READY"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120)[0].split() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    winners = [i for i, o in enumerate(outs) if o[0] == "won"]
    assert len(winners) == 1, outs
    assert outs[winners[0]] == ["won", "1"]
    assert all(o == ["held", f"host-{winners[0]}"] for i, o in enumerate(outs) if i != winners[0])
    with backend.open() as log:
        got = log.lease(sid)
    assert got is not None and got.host == f"host-{winners[0]}" and got.epoch == 1


def test_leases_work_on_a_database_made_before_they_existed(backend: Backend) -> None:
    with backend.open() as log:
        sid = log.create_session("old").id
    backend.sql("DROP TABLE torpor_tenures")
    backend.sql("DROP TABLE torpor_leases")
    backend.sql("DROP TABLE torpor_hosts")
    with backend.open() as log:  # reopening adds the tables; the schema version is unchanged
        assert log.claim(sid, "host-a", TTL).epoch == 1
    assert backend.sql("SELECT value FROM torpor_meta WHERE key = 'schema_version'") == [("2",)]


def test_host_id_is_made_once_per_home(tmp_path: os.PathLike[str], monkeypatch) -> None:
    monkeypatch.delenv(ENV_HOST_ID, raising=False)
    a, b = Paths(tmp_path / "a"), Paths(tmp_path / "b")  # type: ignore[operator]
    ida = host_id(a)
    assert ida == host_id(a) != host_id(b)
    f = a.root / HOST_FILE
    assert f.read_text().strip() == ida and (f.stat().st_mode & 0o777) == 0o600
    monkeypatch.setenv(ENV_HOST_ID, "node-7")
    assert host_id(a) == "node-7"
    monkeypatch.setenv(ENV_HOST_ID, "bad id")
    with pytest.raises(UsageError, match=ENV_HOST_ID):
        host_id(a)
    monkeypatch.delenv(ENV_HOST_ID)
    from torpor.server.tenancy import namespace_paths

    assert host_id(namespace_paths(a, "team-1")) == ida  # a server's namespaces: its host
    f.write_text("../../etc\n")
    with pytest.raises(UsageError, match="not a host id"):
        host_id(a)


def test_the_heartbeat_thread_renews_while_held_and_stops_when_dropped(
    backend: Backend, log: ContextLog
) -> None:
    s = log.create_session("beating")
    first = log.claim(s.id, "host-hb", TTL)
    holder = object()
    hb = Heartbeat.hold(holder, where=backend.dsn, host="host-hb", ttl=TTL, opener=backend.open)
    try:
        assert (
            Heartbeat.hold(holder, where=backend.dsn, host="host-hb", ttl=TTL, opener=backend.open)
            is hb
        )  # one thread per log and host
        end = time.monotonic() + 30
        while log.now() < first.expires_at + 2 * TTL:  # well past the claim's own expiry
            assert time.monotonic() < end
            time.sleep(0.05)
        held = log.lease(s.id)
        assert held is not None and held.host == "host-hb" and held.expires_at > log.now()
        assert hb.beats >= 2
    finally:
        hb.drop(holder)
    end = time.monotonic() + 30
    while not log.expired_leases():  # nobody renews it any more (a beat in flight may land)
        assert time.monotonic() < end
        time.sleep(0.05)
    assert [x.session_id for x in log.expired_leases()] == [s.id]
    assert {h.id for h in log.hosts()} == {"host-hb"}


def test_a_takeover_waits_for_an_append_already_past_its_fence_check(pg_dsn: str) -> None:
    """The fence is checked and the entry inserted under the session's lock, which a
    release and a claim take too: a takeover that starts while a fenced append is
    between its check and its commit returns only after that append committed (the
    entry was written by the holder of the time), never in between."""
    import threading

    pg = Backend("postgres", pg_dsn)
    with pg.open() as writer, pg.open() as other:
        sid = writer.create_session("racing").id
        lease = writer.claim(sid, "host-w", 30)
        # a slow insert: the append sits after its fence check, holding its locks
        pg.sql(
            "CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$"
        )
        pg.sql(
            "CREATE TRIGGER slow BEFORE INSERT ON torpor_entries FOR EACH ROW"
            " EXECUTE FUNCTION slow_insert()"
        )
        got: list[object] = []
        t = threading.Thread(
            target=lambda: got.append(
                writer.append(sid, Kind.TOOL_CALL, {"n": 1}, turn=1, fence=("host-w", 1))
            )
        )
        t.start()
        end = time.monotonic() + 30
        while not pg.sql("SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'"):
            assert time.monotonic() < end and t.is_alive()
            time.sleep(0.01)
        assert other.release(sid, "host-w", lease.epoch)
        taken = other.claim(sid, "host-m", 30)
        # the claim returned: the append it waited for is committed, in the log
        assert [e.payload for e in other.entries(sid)] == [{"n": 1}]
        t.join(30)
        assert len(got) == 1 and taken.epoch == lease.epoch + 1
        with pytest.raises(FencedError):
            writer.append(sid, Kind.TOOL_CALL, {"n": 2}, turn=1, fence=("host-w", 1))
