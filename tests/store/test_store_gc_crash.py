"""gc deletes only unreferenced chunks, never a live writer's; kill -9 leaves the store sound."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.store.conftest import KiB, MiB, chunk_files, same_content, stray_temps
from torpor.store import ChunkStore

CS = 64 * KiB
REPO = Path(__file__).resolve().parents[2]


def _file(path: Path, n_chunks: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(n_chunks * CS))
    return path


def _age(store: ChunkStore, seconds: float = 3600) -> None:
    """Backdate every chunk, as if written long ago (outside any grace period)."""
    t = time.time() - seconds
    for p in store.chunks_dir.glob("*/*"):
        os.utime(p, (t, t))


def _writer(store_root: Path, file: Path, mode: str, parent: str | None = None):
    args = [sys.executable, "-m", "tests.store._writer", str(store_root), str(file), mode]
    if parent:
        args.append(parent)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def _expect(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline().strip()
    assert line == word, f"writer said {line!r}, rc={proc.poll()}"


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_gc_removes_only_unreferenced_chunks(store, tmp_path):
    a, _ = store.put_file(_file(tmp_path / "a", 4, 1), chunk_size=CS)
    ma = store.commit({"memory": a})
    b_src = tmp_path / "b"
    b_src.write_bytes((tmp_path / "a").read_bytes()[: 2 * CS] + random.randbytes(3 * CS))
    b, _ = store.put_file(b_src, chunk_size=CS)
    mb = store.commit({"memory": b})
    _age(store)
    assert store.gc(grace_seconds=0).chunks_deleted == 0
    store.remove(ma.id)
    r = store.gc(grace_seconds=0)
    assert r.chunks_deleted == 2  # a's chunks 2, 3; chunks 0, 1 are shared with b
    assert chunk_files(store) == set(b.stored)
    assert store.verify().ok
    out = tmp_path / "out"
    store.materialize(store.get(mb.id).artifacts["memory"], out)
    assert same_content(out, b_src)


def test_gc_grace_period_keeps_young_orphans(store, tmp_path):
    store.put_file(_file(tmp_path / "a", 3, 2), chunk_size=CS)
    store.close()  # abandon: no lease, chunks are orphans
    r = store.gc(grace_seconds=3600)
    assert r.chunks_deleted == 0 and r.chunks_kept_young == 3
    assert store.gc(grace_seconds=0).chunks_deleted == 3


def test_gc_keeps_chunks_of_a_lease_holding_writer_in_process(tmp_path):
    root = tmp_path / "store"
    with ChunkStore(root) as writer, ChunkStore(root) as admin:
        writer.put_file(_file(tmp_path / "old", 2, 3), chunk_size=CS)
        writer.close()  # orphans from an abandoned writer
        _age(admin)
        art, _ = writer.put_file(_file(tmp_path / "new", 4, 4), chunk_size=CS)
        assert len(list(writer.leases_dir.iterdir())) == 1
        r = admin.gc(grace_seconds=0)
        assert r.leases_live == 1 and r.chunks_deleted == 2 and r.chunks_kept_young == 4
        m = writer.commit({"memory": art})
        assert list(writer.leases_dir.iterdir()) == []
        out = tmp_path / "out"
        admin.materialize(admin.get(m.id).artifacts["memory"], out)
        assert same_content(out, tmp_path / "new")


def test_writer_reusing_an_old_orphan_chunk_keeps_it_through_gc(tmp_path):
    """Dedup against an old unreferenced chunk claims it (mtime), so gc spares it."""
    root = tmp_path / "store"
    src = _file(tmp_path / "f", 3, 5)
    with ChunkStore(root) as w, ChunkStore(root) as admin:
        w.put_file(src, chunk_size=CS)
        w.close()
        _age(admin)  # old orphans now
        art, stats = w.put_file(src, chunk_size=CS)  # same content: all three reused
        assert stats.chunks_new == 0 and stats.chunks_reused == 3
        assert admin.gc(grace_seconds=0).chunks_deleted == 0
        m = w.commit({"memory": art})
        assert admin.verify().ok and admin.get(m.id)


def test_gc_while_writer_subprocess_holds_lease(tmp_path):
    root = tmp_path / "store"
    src = _file(tmp_path / "f", 8, 7)
    ChunkStore(root).close()
    proc = _writer(root, src, "wait-commit")
    try:
        _expect(proc, "PUT")
        with ChunkStore(root) as admin:
            n = len(chunk_files(admin))
            r = admin.gc(grace_seconds=0)
            assert r.leases_live == 1 and r.chunks_deleted == 0 and r.chunks_kept_young == n == 8
            proc.stdin.write("go\n")
            proc.stdin.flush()
            snap_id = proc.stdout.readline().strip()
            assert proc.wait(timeout=30) == 0
            assert admin.gc(grace_seconds=0).chunks_deleted == 0
            out = tmp_path / "out"
            admin.materialize(admin.get(snap_id).artifacts["disk"], out)
            assert same_content(out, src)
            assert list(admin.leases_dir.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _base_snapshot(root: Path, tmp_path: Path):
    src = _file(tmp_path / "base", 16, 8)
    with ChunkStore(root) as s:
        art, _ = s.put_file(src, chunk_size=CS)
        m = s.commit({"disk": art})
    return m, src


def _assert_consistent_after_crash(root: Path, tmp_path: Path, base, base_src: Path) -> None:
    with ChunkStore(root) as s:
        assert [m.id for m in s.list()] == [base.id]  # no partial snapshot listed
        assert s.verify().ok
        before = chunk_files(s)
        r = s.gc(grace_seconds=0)  # the dead writer's lease is stale, its chunks orphans
        assert r.leases_stale_removed == 1 and r.leases_live == 0
        assert chunk_files(s) == set(base.artifacts["disk"].stored) <= before
        assert stray_temps(s.tmp_dir) == [] and stray_temps(s.snapshots_dir) == []
        assert list(s.leases_dir.iterdir()) == []
        out = tmp_path / "restored"
        s.materialize(s.get(base.id).artifacts["disk"], out)
        assert same_content(out, base_src)
        assert s.verify().ok


def test_kill9_during_put_file(tmp_path):
    root = tmp_path / "store"
    base, base_src = _base_snapshot(root, tmp_path)
    src = _file(tmp_path / "child", 16, 9)
    proc = _writer(root, src, "pause-chunks", base.id)
    _expect(proc, "PAUSED")
    _kill(proc)
    _assert_consistent_after_crash(root, tmp_path, base, base_src)


def test_kill9_during_commit(tmp_path):
    root = tmp_path / "store"
    base, base_src = _base_snapshot(root, tmp_path)
    src = _file(tmp_path / "child", 16, 10)
    proc = _writer(root, src, "pause-commit", base.id)
    _expect(proc, "PAUSED")
    with ChunkStore(root) as s:
        assert any(p.name.endswith(".tmp") for p in s.snapshots_dir.iterdir())
    _kill(proc)
    _assert_consistent_after_crash(root, tmp_path, base, base_src)


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.45])
def test_kill9_at_an_arbitrary_moment(tmp_path, delay: float):
    """A writer snapshotting in a loop, killed wherever it happens to be."""
    root = tmp_path / "store"
    src = tmp_path / "disk"
    src.write_bytes(os.urandom(2 * MiB))
    ChunkStore(root).close()
    proc = _writer(root, src, "loop")
    proc.stdout.readline()  # at least one snapshot committed
    time.sleep(delay)
    _kill(proc)
    with ChunkStore(root) as s:
        snaps = s.list()
        assert snaps
        assert s.verify().ok
        s.gc(grace_seconds=0)
        assert s.verify().ok
        referenced = set().union(*(m.chunks for m in snaps))
        assert chunk_files(s) == referenced
        last = max(snaps, key=lambda m: int(m.meta["round"]))
        out = tmp_path / "out"
        s.materialize(last.artifacts["disk"], out)
        assert out.stat().st_size == 2 * MiB


def test_stale_lease_of_dead_process_is_ignored(tmp_path):
    root = tmp_path / "store"
    with ChunkStore(root) as s:
        s.put_file(_file(tmp_path / "f", 2, 11), chunk_size=CS)
        lease = next(s.leases_dir.iterdir())
        # Pretend the lease belongs to a process that no longer exists.
        lease.write_text(json.dumps({"host": socket.gethostname(), "pid": 999999999}))
        _age(s)
        os.utime(lease, (time.time() - 7200, time.time() - 7200))
        r = s.gc(grace_seconds=0)
        assert r.leases_stale_removed == 1 and r.chunks_deleted == 2
