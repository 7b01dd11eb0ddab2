"""``session rm`` releases the snapshots of the removed session's lineage tree only:
it no longer retries every checkpoint of every session ever removed (with 1,200
snapshots one ``rm`` took ~3 minutes).  Observed through which sessions' checkpoints
``release_snapshots`` reads from the log.  No VM: snapshots are committed straight
into a private home's store and the checkpoints appended to its log, as a session
does."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from torpor.context import Kind, open_log
from torpor.paths import Paths
from torpor.session.core import release_snapshots
from torpor.store.home import home_store
from torpor.vmm.manager import VMManager


@pytest.fixture
def home(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("TORPOR_STORE", raising=False)
    monkeypatch.delenv("TORPOR_CONTEXT_DSN", raising=False)
    paths = Paths(tmp_path / "home").ensure()
    log = open_log(paths=paths)
    try:
        yield paths, log, VMManager(paths)
    finally:
        log.close()


def _checkpoint(paths: Paths, log, sid: str, parent: str | None = None) -> str:
    store = home_store(paths)
    try:
        src = paths.root / "src"
        src.write_bytes(random.randbytes(4096))
        art, _ = store.put_file(src)
        snap = store.commit({"memory": art}, parent=parent).id
    finally:
        store.close()
    log.append(sid, Kind.CHECKPOINT, {"snapshot": snap, "reason": "test"}, turn=0)
    return snap


def _present(paths: Paths) -> set[str]:
    store = home_store(paths)
    try:
        return set(store.ids())
    finally:
        store.close()


def test_rm_considers_only_the_removed_sessions_tree(home, monkeypatch) -> None:
    paths, log, mgr = home
    others = [log.create_session(f"other{i}").id for i in range(4)]
    other_snaps = {s: _checkpoint(paths, log, s) for s in others}
    parent = log.create_session("parent").id
    p1 = _checkpoint(paths, log, parent)
    child = log.create_session("child", parent=(parent, log.last_seq(parent))).id
    p2 = _checkpoint(paths, log, parent, parent=p1)
    c1 = _checkpoint(paths, log, child, parent=p1)  # the fork's VM builds on p1

    read: list[str] = []
    own_entries = log.own_entries

    def spy(sid: str, kind: Kind):
        read.append(sid)
        return own_entries(sid, kind)

    monkeypatch.setattr(log, "own_entries", spy)
    for s in others[:3]:  # removed earlier, released then
        log.remove_session(s)
        assert release_snapshots(log, mgr, s) == [other_snaps[s]]
        assert set(read) == {s}, "only the removed session's tree is read"
        read.clear()

    log.remove_session(parent)
    assert release_snapshots(log, mgr, parent) == [p2]  # p1: the live fork sees it
    assert set(read) == {parent, child}
    read.clear()
    log.remove_session(child)
    assert release_snapshots(log, mgr, child) == [c1, p1]  # p1 retried: its tree
    assert set(read) == {parent, child}
    assert _present(paths) == {other_snaps[others[3]]}  # a live session keeps its own

    read.clear()  # with no session named: every tree, as before
    assert release_snapshots(log, mgr) == []
    assert set(read) == {*others, parent, child}
