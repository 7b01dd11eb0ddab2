"""Session lifecycle on real VMs (issue 9): removal removes, prune, and a tampered
log refused by `session log` / `recover` and named by `session verify`.

Tests that list or prune sessions use a context log of their own (a private DSN)
so other tests' sessions in the shared home are not touched.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import torpor_cli
from torpor.context import ChainError, Kind
from torpor.errors import NotFoundError
from torpor.session import Session
from torpor.snapshot.core import gc as snapshot_gc
from torpor.store import ChunkStore
from torpor.vmm.manager import VMManager

pytestmark = pytest.mark.vm


def _snapshot_ids(paths) -> set[str]:
    with ChunkStore(paths.store) as st:
        return {m.id for m in st.list()}


def test_rm_removes_the_session_and_releases_its_snapshots(paths, tools_image, tmp_path) -> None:
    env = {"TORPOR_CONTEXT_DSN": str(tmp_path / "ctx.db")}
    r = torpor_cli("session", "create", "--image", tools_image, "--name", "gone", "-q", env=env)
    assert r.returncode == 0, r.stderr
    sid = r.stdout.decode().strip()
    r = torpor_cli("session", "send", "gone", "set up a counter service", "-q", env=env)
    assert r.returncode == 0, r.stderr
    with Session.open(sid, paths=paths, dsn=env["TORPOR_CONTEXT_DSN"]) as s:
        snaps = {c.snapshot for c in s.checkpoints}
        vm_id = s.vm().id
    assert len(snaps) == 2 and snaps <= _snapshot_ids(paths)

    r = torpor_cli("session", "rm", "gone", env=env)
    assert r.returncode == 0, r.stderr
    r = torpor_cli("session", "ls", "--json", env=env)
    assert json.loads(r.stdout) == []  # before the fix: still listed
    for cmd in (["send", "gone", "are you there?"], ["show", "gone"], ["resume", sid[:8]]):
        r = torpor_cli("session", *cmd, env=env)
        assert r.returncode == NotFoundError.exit_code, (cmd, r.stdout, r.stderr)
        assert b"removed" in r.stderr or b"no session" in r.stderr, r.stderr
    assert not any(v.id == vm_id for v in VMManager(paths).list())
    assert not snaps & _snapshot_ids(paths)  # released: gc may take their chunks
    r = torpor_cli("session", "ls", "-a", "--json", env=env)
    (row,) = json.loads(r.stdout)
    assert row["status"] == "removed"
    # the log is kept and still verifies, ending in the tombstone
    r = torpor_cli("session", "verify", env=env)
    assert r.returncode == 0 and b"gone (removed): ok" in r.stdout, r.stdout
    with Session.list(paths=paths, dsn=env["TORPOR_CONTEXT_DSN"], include_removed=True)[0] as s:
        assert s.log()[-1].kind is Kind.REMOVED
    r = torpor_cli("session", "rm", "gone", env=env)
    assert r.returncode == NotFoundError.exit_code


def test_a_fork_outlives_its_removed_parent(paths, tools_image, tmp_path) -> None:
    dsn = str(tmp_path / "ctx.db")
    parent = Session.create(tools_image, "scripted:demo", name="p", paths=paths, dsn=dsn)
    child = None
    try:
        parent.send("set up a counter service and tell me its port")
        at = parent.checkpoints[-1]
        child = parent.fork(name="c")
        parent.send("parent only")
        after_fork = parent.checkpoints[-1].snapshot
        released = parent.remove()
        assert after_fork in released and at.snapshot not in released
        assert {c.snapshot for c in child.checkpoints} <= _snapshot_ids(paths)
        snapshot_gc(VMManager(paths), 0)
        # the child's VM is lost: it restores from the inherited checkpoint
        VMManager(paths).remove(child.vm().id, force=True)
        assert child.recover() is None
        assert child.log()[-1].kind is Kind.VM and child.log()[-1].payload["snapshot"] == (
            at.snapshot
        )
        assert "counter" in child.send("is the counter still running?").lower()
        assert child._log.verify(child.id) == []
        child.remove()
        assert at.snapshot not in _snapshot_ids(paths)  # now nobody needs it
    finally:
        for s in (parent, child):
            if s is not None:
                with contextlib.suppress(NotFoundError):
                    s.remove()
                s.close()


def test_prune_removes_ended_sessions_only(paths, tools_image, tmp_path) -> None:
    dsn = str(tmp_path / "ctx.db")
    env = {"TORPOR_CONTEXT_DSN": dsn}
    a = Session.create(tools_image, "scripted:demo", name="ended", paths=paths, dsn=dsn)
    b = Session.create(tools_image, "scripted:demo", name="sleepy", paths=paths, dsn=dsn)
    try:
        VMManager(paths).remove(a.vm().id, force=True)
        assert a.status() == "stopped" and b.status() == "running"
        r = torpor_cli("session", "prune", "--all-hibernated", "--dry-run", env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().splitlines() == ["ended (stopped, would be removed)"]
        r = torpor_cli("session", "prune", "-f", "--older-than", "7d", env=env)
        assert r.returncode == 0 and r.stdout == b""  # both were active just now
        b.hibernate()
        r = torpor_cli("session", "prune", "-f", env=env)
        assert r.returncode == 0 and r.stdout.decode().split() == ["ended"], r.stderr
        names = [s.name for s in Session.list(paths=paths, dsn=dsn)]
        assert names == ["sleepy"]
        gone = Session.prune(hibernated=True, paths=paths, dsn=dsn)
        assert [(n, st) for _, n, st in gone] == [("sleepy", "hibernated")]
        assert Session.list(paths=paths, dsn=dsn) == []
        r = torpor_cli("session", "prune", "--older-than", "soon", env=env)
        assert r.returncode == 2 and b"invalid duration" in r.stderr
    finally:
        for s in (a, b):
            with contextlib.suppress(NotFoundError):
                s.remove()
            s.close()


def test_a_tampered_log_is_refused_by_a_full_read_and_never_used(
    paths, tools_image, tmp_path
) -> None:
    db = tmp_path / "ctx.db"
    env = {"TORPOR_CONTEXT_DSN": str(db)}
    s = Session.create(tools_image, "scripted:demo", name="t", paths=paths, dsn=str(db))
    try:
        s.send("please set up the repo")
        (user,) = [e for e in s.log() if e.kind is Kind.USER]
        conn = sqlite3.connect(db)
        conn.execute("DROP TRIGGER torpor_entries_no_update")
        conn.execute(
            "UPDATE torpor_entries SET payload = ? WHERE seq = ?",
            ('{"content":"please rm -rf the repo"}', user.seq),
        )
        conn.commit()
        conn.close()
        r = torpor_cli("session", "log", "t", env=env)  # reading the log checks every entry
        assert r.returncode == ChainError.exit_code, r.stderr
        assert f"at entry {user.seq}".encode() in r.stderr, r.stderr
        assert b"rm -rf" not in r.stdout
        # recover and send start from the checkpoint's MAC'd state record and read only
        # the entries after it (docs/context-log.md): the edited entry is never used, so
        # they go on with what was really said, and the model never sees the edit
        for cmd in (["recover", "t"], ["send", "t", "go on"]):
            r = torpor_cli("session", *cmd, env=env)
            assert r.returncode == 0, (cmd, r.stderr)
            assert b"rm -rf" not in r.stdout
        r = torpor_cli("session", "ls", "--json", env=env)  # listed (from its record)
        assert r.returncode == 0 and json.loads(r.stdout)[0]["name"] == "t", r.stderr
        assert Session.prune(hibernated=True, dry_run=True, paths=paths, dsn=str(db)) == []
        r = torpor_cli("session", "verify", env=env)
        assert r.returncode == 11 and f"t: entry {user.seq}:".encode() in r.stdout, r.stdout
        with Session.open("t", paths=paths, dsn=str(db)) as again:
            said = [m["content"] for m in again.messages() if m["role"] == "user"]
            assert said == ["please set up the repo", "go on"], said
            with pytest.raises(ChainError):
                again.log()  # a full read still refuses the edited entry
        vm_id = s.vm().id
        r = torpor_cli("session", "rm", "t", env=env)  # an edited log can still be removed
        assert r.returncode == 0, r.stderr
        assert not any(v.id == vm_id for v in VMManager(paths).list())
    finally:
        with contextlib.suppress(NotFoundError):
            s.remove()
        s.close()


def test_readme_session_rm_never_revives(paths, tools_image, tmp_path: Path) -> None:
    """The defect as reported: after `rm`, a `send` must not bring the session back."""
    dsn = str(tmp_path / "ctx.db")
    s = Session.create(tools_image, "scripted:demo", name="r", paths=paths, dsn=dsn)
    s.remove()
    with pytest.raises(NotFoundError, match="removed"):
        s.send("hello again")
    with pytest.raises(NotFoundError, match="removed"):
        Session.open("r", paths=paths, dsn=dsn)
    assert Session.list(paths=paths, dsn=dsn) == []
    s.close()
