"""One host per session: leases and fenced writes through real Sessions and a real VM.

Two "hosts" here are two Session objects on one home (so one store folder and one
VM manager) with different ``TORPOR_HOST_ID``s, sharing a PostgreSQL log: enough to
show that the database, not the local lock, decides who may write.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from tests.conftest import torpor_cli
from torpor.context import Kind
from torpor.errors import FencedError, LeaseHeldError, NotFoundError
from torpor.paths import Paths
from torpor.session import Session
from torpor.vmm.manager import VMManager
from torpor.vmm.state import Status

pytestmark = pytest.mark.vm

TTL = "4"  # long enough that a loaded machine never misses a renewal


def _wait_expired(s: Session) -> None:
    """Until the session's lease is past its expiry on the database's clock."""
    lease = s._log.lease(s.id)
    assert lease is not None
    end = time.monotonic() + 30
    while s._log.now() <= lease.expires_at:
        assert time.monotonic() < end
        time.sleep(0.05)


def test_a_stale_host_is_fenced_after_a_takeover(
    pg_dsn: str, paths, tools_image, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORPOR_LEASE_TTL", TTL)
    monkeypatch.setenv("TORPOR_HOST_ID", "host-a")
    a = Session.create(tools_image, "scripted:demo", name="fence-a", paths=paths, dsn=pg_dsn)
    b = c = None
    try:
        lease = a._log.lease(a.id)
        assert lease is not None and (lease.host, lease.epoch) == ("host-a", 1)
        # other processes of host a hibernating and waking the session meanwhile (two
        # tenures of this same host, through the log's own calls) are no takeover
        lg = a._log
        assert lg.release(a.id, "host-a", 1)
        assert lg.release(a.id, "host-a", lg.claim(a.id, "host-a", 30).epoch)
        a.append("app.note", {"by": "a", "n": 1})  # re-claimed at epoch 3, and written
        mine = lg.lease(a.id)
        assert mine is not None and (mine.host, mine.epoch) == ("host-a", 3)
        assert a._beat is not None  # renewing: a stays the holder however long this takes

        monkeypatch.setenv("TORPOR_HOST_ID", "host-b")
        b = Session.open(a.id, paths=paths, dsn=pg_dsn)
        before = b.entries()[-1].seq
        with pytest.raises(LeaseHeldError, match="host-a") as held:
            b.append("app.note", {"by": "b"})
        assert held.value.holder == "host-a"
        with pytest.raises(LeaseHeldError):
            b.checkpoint("b tries")
        with pytest.raises(LeaseHeldError):
            b.send("b tries")
        # the CLI on host b: a clear conflict (exit code 4) naming the holder
        r = torpor_cli("session", "send", "fence-a", "b tries", env={"TORPOR_CONTEXT_DSN": pg_dsn})
        assert r.returncode == LeaseHeldError.exit_code == 4, r.stderr
        assert b"host-a" in r.stderr and b"Traceback" not in r.stderr
        assert b.entries()[-1].seq == before  # b wrote nothing, touched no VM

        # host a freezes: its heartbeat stops, its lease runs out, b takes over
        a._beat.stop()
        _wait_expired(a)
        taken = b.append("app.note", {"by": "b", "n": 1})
        lease = b._log.lease(b.id)
        assert lease is not None and (lease.host, lease.epoch) == ("host-b", 4)
        b.send("b drives it now")  # a whole turn in the VM, checkpointed, all fenced
        assert b.state().turns == 1 and b.status() == "running"

        # a wakes up: every write and every use of the machine is refused
        n_checkpoints = len(b.checkpoints)
        with pytest.raises(FencedError, match="host-b") as fenced:
            a.append("app.note", {"by": "a", "n": 2})
        assert (fenced.value.holder, fenced.value.holder_epoch) == ("host-b", 4)
        for call in (
            lambda: a.checkpoint("a is back"),
            lambda: a.send("a is back"),
            lambda: a.sandbox,
            lambda: a.hibernate(),
            lambda: a.append("app.note", {"by": "a", "n": 3}),
        ):
            with pytest.raises(FencedError, match="refuses every further call"):
                call()
        after = b.entries(after=taken.seq - 1)
        assert all(e.payload.get("data", {}).get("by") != "a" for e in after)
        assert len(b.checkpoints) == n_checkpoints  # a committed no checkpoint entry

        # hibernating releases the lease: the session belongs to no host and wakes
        # wherever it is opened next (here: host a again, a new tenure)
        b.hibernate()
        freed = b._log.lease(b.id)
        assert freed is not None and freed.host is None
        monkeypatch.setenv("TORPOR_HOST_ID", "host-a")
        c = Session.open(a.id, paths=paths, dsn=pg_dsn)
        c.wake()
        lease = c._log.lease(c.id)
        assert lease is not None and (lease.host, lease.epoch) == ("host-a", 5)
        assert c.entries()[-1].kind in (Kind.RESUME, Kind.VM)
        with pytest.raises(LeaseHeldError):  # b let go; it is host a's now
            b.append("app.note", {"by": "b", "n": 2})
    finally:
        for x in (a, b, c):
            if x is not None:
                x.close()
        _remove_as_holder(a.id, paths, pg_dsn, monkeypatch)


def _remove_as_holder(sid: str, paths, dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Session.open(sid, paths=paths, dsn=dsn) as probe:
        lease = probe._log.lease(sid)
    if lease is not None and lease.host is not None:
        monkeypatch.setenv("TORPOR_HOST_ID", lease.host)
    with Session.open(sid, paths=paths, dsn=dsn) as s:
        s.remove()


def _second_home(tmp_path: Path, paths: Paths) -> Paths:
    """Another host on this machine: its own home (VMs, locks, caches, host id) over
    the first home's store, images and guest kernel (symlinks), so it can restore the
    first home's checkpoints as a host sharing a bucket would."""
    home = tmp_path / "host-b"
    home.mkdir()
    for part in ("store", "images", "guest"):
        (home / part).symlink_to(paths.root / part)
    return Paths(home).ensure()


def test_a_stale_host_kills_its_own_vm_once_another_host_runs_the_session(
    pg_dsn: str, paths, tools_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORPOR_LEASE_TTL", TTL)
    monkeypatch.setenv("TORPOR_HOST_ID", "host-a")
    a = Session.create(tools_image, "scripted:demo", name="fence-k", paths=paths, dsn=pg_dsn)
    home_b = _second_home(tmp_path, paths)
    b = None
    try:
        vm_a = a.vm()
        assert vm_a is not None and vm_a.state.status == Status.RUNNING
        assert a._beat is not None
        a._beat.stop()
        _wait_expired(a)

        monkeypatch.setenv("TORPOR_HOST_ID", "host-b")
        b = Session.open(a.id, paths=home_b, dsn=pg_dsn)
        b.wake()  # no VM of this session on host b: restored from the last checkpoint
        vm_b = b.vm()
        assert vm_b is not None and vm_b.id != vm_a.id and vm_b.state.status == Status.RUNNING
        assert b.entries()[-1].kind is Kind.VM

        with pytest.raises(FencedError, match="was killed") as fenced:
            a.checkpoint("a is back")
        assert fenced.value.holder == "host-b"
        assert VMManager(paths).get(vm_a.id).state.status != Status.RUNNING
        assert VMManager(home_b).get(vm_b.id).state.status == Status.RUNNING  # untouched
        assert [c.reason for c in b.checkpoints] == ["create"]
    finally:
        with contextlib.suppress(NotFoundError):
            VMManager(paths).remove(vm_a.id, force=True)
        if b is not None:
            b.remove()
            b.close()
        a.close()
