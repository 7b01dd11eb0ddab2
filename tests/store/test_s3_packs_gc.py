"""Packs, indexes and the bucket's gc across hosts, against a real S3 server (SeaweedFS).

Homes on one machine stand for hosts: each has its own cache folder; all share the
bucket and the store key.  gc's grace period here is one second (object times have
a resolution of one second, so "older than the grace" takes ~2-3 s of waiting,
polled with a deadline).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.store.conftest import KiB, same_content
from tests.store.test_s3_store import home, rand_file, tiered
from torpor.errors import ConflictError, ManifestAuthError, ManifestError, StoreError
from torpor.store import GcReport
from torpor.store.tiered import TieredStore, decode_index, pack_object, wait_uploads

CS = 64 * KiB
GRACE = 1.0


def keys(srv, bucket: str) -> set[str]:
    c = srv.client()
    return {
        o["Key"][len("torpor/") :]
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="torpor/")
        for o in page.get("Contents", [])
    }


def packs_of(store: TieredStore, snap_id: str) -> set[str]:
    return {pack_object(v.pack) for v in store._load_index(snap_id).values()}


def gc_until(
    store: TieredStore, done: Callable[[GcReport], bool], *, dry_run: bool = False
) -> GcReport:
    """Run gc (grace GRACE) until ``done(report)``; fail after a deadline."""
    deadline = time.monotonic() + 60
    while True:
        r = store.gc(grace_seconds=GRACE, dry_run=dry_run)
        if done(r):
            return r
        assert time.monotonic() < deadline, f"gc never got there: {r}"
        time.sleep(0.3)


def test_a_cold_restore_reads_one_index_then_coalesced_ranges(s3_env, bucket, tmp_path: Path):
    a_root = home(tmp_path, "a")
    src = rand_file(tmp_path / "mem", 48 * CS, 40)
    with tiered(a_root, bucket) as a:
        art1, _ = a.put_file(src, chunk_size=CS)
        m1 = a.commit({"memory": art1})
        with open(src, "r+b") as f:  # three chunks change
            for i in (3, 20, 41):
                f.seek(i * CS + 10)
                f.write(b"y" * 5000)
        art2, _ = a.put_file(src, chunk_size=CS, parent=art1)
        m2 = a.commit({"memory": art2}, parent=m1.id)
        need = set(art2.stored)
        frontier = sorted(need)
        while frontier:  # and the bases of its deltas
            frontier = sorted({b for b in map(a._base_of, frontier) if b} - need)
            need |= set(frontier)
        stored = sum(a.chunk_path(h).stat().st_size for h in need) + a.manifest_bytes(m2.id)
    with tiered(home(tmp_path, "b", key_from=a_root), bucket) as b:
        r0, d0 = b.remote.requests, b.remote.bytes_down
        got = b.get(m2.id)
        b.materialize(got.artifacts["memory"], tmp_path / "out")
        reqs, fetched = b.remote.requests - r0, b.remote.bytes_down - d0
    assert same_content(src, tmp_path / "out")
    # manifest + index + ranged GETs over two packs (the first has three holes now),
    # not one request per chunk (48 here)
    assert reqs <= 10, reqs
    assert fetched <= 1.2 * stored, (fetched, stored)


def test_a_damaged_or_missing_index_is_refused_clearly(s3_env, bucket, tmp_path: Path):
    a_root = home(tmp_path, "a")
    src = rand_file(tmp_path / "mem", 6 * CS, 41)
    with tiered(a_root, bucket) as a:
        art, _ = a.put_file(src, chunk_size=CS)
        m = a.commit({"memory": art})
    c = s3_env.client()
    key = f"torpor/snapshots/{m.id}.index"
    good = c.get_object(Bucket=bucket, Key=key)["Body"].read()
    c.put_object(Bucket=bucket, Key=key, Body=good[: len(good) - 7])  # truncated
    with tiered(home(tmp_path, "b", key_from=a_root), bucket) as b:
        got = b.get(m.id)  # the manifest is fine
        with pytest.raises(ManifestAuthError, match="index") as e:
            b.materialize(got.artifacts["memory"], tmp_path / "out")
        assert m.id[:12] in str(e.value)
        assert not list(b.chunks_dir.glob("*/*")) and not list(b.indexes_dir.iterdir())
    c.delete_object(Bucket=bucket, Key=key)
    with (
        tiered(home(tmp_path, "c", key_from=a_root), bucket) as cc,
        pytest.raises(ManifestError, match="no index"),
    ):
        cc.materialize(cc.get(m.id).artifacts["memory"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # an index signed for another snapshot does not verify for this one
    with pytest.raises(ManifestAuthError):
        decode_index(a_root.joinpath("key").read_bytes(), good, snap_id="0" * 64, source="x")


def test_a_format_1_bucket_is_refused_at_open(s3_env, bucket, tmp_path: Path):
    s3_env.client().put_object(
        Bucket=bucket, Key="torpor/FORMAT", Body=b"torpor-store 1\nkey-id 0123\n"
    )
    with pytest.raises(StoreError, match="format-1"):
        tiered(home(tmp_path, "a"), bucket)


def test_gc_condemns_then_deletes_a_removed_snapshots_pack_and_dry_run_agrees(
    s3_env, bucket, tmp_path: Path
):
    a_root = home(tmp_path, "a")
    with tiered(a_root, bucket) as a:
        art1, _ = a.put_file(rand_file(tmp_path / "f1", 6 * CS, 42), chunk_size=CS)
        m1 = a.commit({"f": art1}, meta={"tag": "old"})
        art2, _ = a.put_file(rand_file(tmp_path / "f2", 6 * CS, 43), chunk_size=CS)
        m2 = a.commit({"f": art2}, meta={"tag": "kept"})
        (dead,) = packs_of(a, m1.id)
        (alive,) = packs_of(a, m2.id)
        a.remove(m1.id)
    # gc from another host: first run(s) condemn the removed snapshot's pack only
    b_root = home(tmp_path, "b", key_from=a_root)
    with tiered(b_root, bucket) as b:
        r = gc_until(b, lambda r: dead in r.bucket_condemned)
        assert r.bucket_condemned == (dead,) and not r.dry_run
        now = keys(s3_env, bucket)
        assert f"snapshots/{m1.id}.manifest" not in now  # deleted: the tombstone stays
        assert f"snapshots/{m1.id}.removed" in now
        assert dead in keys(s3_env, bucket) and f"condemned/{dead.split('/')[-1][:-5]}" in keys(
            s3_env, bucket
        )
        # dry runs change nothing; once the mark is old enough one lists the pack
        before = keys(s3_env, bucket)
        dry = gc_until(b, lambda r: dead in r.bucket_deleted, dry_run=True)
        assert dry.dry_run and keys(s3_env, bucket) == before
        real = b.gc(grace_seconds=GRACE)
        assert real.bucket_deleted == dry.bucket_deleted == (dead,)
        assert real.bucket_bytes_freed == dry.bucket_bytes_freed > 0
        after = keys(s3_env, bucket)
        assert dead not in after and alive in after
        assert not any(k.startswith("condemned/") for k in after)
        assert f"snapshots/{m1.id}.removed" in after and f"snapshots/{m1.id}.index" not in after
        assert "gc/lock" not in after
    with tiered(home(tmp_path, "c", key_from=a_root), bucket) as c:
        assert [x.id for x in c.list()] == [m2.id]
        c.materialize(c.get("kept").artifacts["f"], tmp_path / "out")
        assert c.verify().ok
    assert same_content(tmp_path / "f2", tmp_path / "out")


def test_a_commit_on_a_parent_removed_and_condemned_meanwhile_packs_it_again(
    s3_env, bucket, tmp_path: Path
):
    """The race restic and kopia document: B builds on P while A removes P and gc
    condemns P's pack.  B's commit must not name the condemned pack; after the grace
    period gc deletes it and B's snapshot still restores."""
    a_root = home(tmp_path, "a")
    src = rand_file(tmp_path / "mem", 8 * CS, 44)
    with tiered(a_root, bucket) as a:
        art, _ = a.put_file(src, chunk_size=CS)
        p = a.commit({"memory": art})
        (old_pack,) = packs_of(a, p.id)
    b_root = home(tmp_path, "b", key_from=a_root)
    with tiered(b_root, bucket) as b, tiered(a_root, bucket) as a:
        parent = b.get(p.id)
        with open(src, "r+b") as f:
            f.seek(2 * CS)
            f.write(b"z" * 3000)
        child_art, _ = b.put_file(src, chunk_size=CS, parent=parent.artifacts["memory"])
        # meanwhile on A: P removed, its pack condemned
        a.remove(p.id)
        gc_until(a, lambda r: old_pack in r.bucket_condemned)
        child = b.commit({"memory": child_art}, parent=p.id)
        assert b.last_commit.chunks_uploaded == len(child_art.stored)  # all packed again
        assert old_pack not in packs_of(b, child.id)
        gc_until(a, lambda r: old_pack in r.bucket_deleted)
    assert old_pack not in keys(s3_env, bucket)
    with tiered(home(tmp_path, "c", key_from=a_root), bucket) as c:
        c.materialize(c.get(child.id).artifacts["memory"], tmp_path / "out")
        assert c.verify().ok
    assert same_content(src, tmp_path / "out")


def test_gc_on_one_host_while_another_uploads(s3_env, bucket, tmp_path: Path):
    """B commits a chain of checkpoints and short-lived snapshots it removes, while A
    runs gc in a loop (grace 1 s).  Every commit of B succeeds, gc deletes the removed
    ones' packs, and every live snapshot restores on a third host, verify clean."""
    a_root = home(tmp_path, "a")
    with tiered(a_root, bucket) as a:  # (creates the bucket's FORMAT, shares the key)
        a.commit({})
    b_root = home(tmp_path, "b", key_from=a_root)
    stop = threading.Event()
    reports: list[GcReport] = []
    errors: list[BaseException] = []

    def gc_loop() -> None:
        with tiered(a_root, bucket) as a:
            while not stop.is_set():
                try:
                    reports.append(a.gc(grace_seconds=GRACE))
                except ConflictError:
                    pass
                except BaseException as e:  # reported by the main thread
                    errors.append(e)
                    return

    t = threading.Thread(target=gc_loop)
    t.start()
    states: dict[str, bytes] = {}
    removed_packs: set[str] = set()
    try:
        src = rand_file(tmp_path / "mem", 16 * CS, 45)
        with tiered(b_root, bucket) as b:
            art, _ = b.put_file(src, chunk_size=CS)
            m = b.commit({"memory": art})
            states[m.id] = src.read_bytes()
            for turn in range(6):
                time.sleep(0.4)  # (so gc's runs fall between and inside commits)
                with open(src, "r+b") as f:
                    f.seek((turn * 5 % 16) * CS + 7)
                    f.write(bytes([turn]) * 4000)
                art, _ = b.put_file(src, chunk_size=CS, parent=art)
                m = b.commit({"memory": art}, parent=m.id)
                states[m.id] = src.read_bytes()
                scratch = rand_file(tmp_path / f"s{turn}", 3 * CS, 100 + turn)
                s_art, _ = b.put_file(scratch, chunk_size=CS)
                s = b.commit({"scratch": s_art})
                removed_packs |= packs_of(b, s.id)
                b.remove(s.id)
        # after the uploads: gc goes on until the removed snapshots' packs are gone
        deadline = time.monotonic() + 90
        while removed_packs & keys(s3_env, bucket) and not errors:
            assert time.monotonic() < deadline, "gc did not delete the removed packs"
            time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert any(r.bucket_deleted for r in reports)
    with tiered(home(tmp_path, "c", key_from=a_root), bucket) as c:
        live = {x.id for x in c.list()}
        assert set(states) <= live
        for snap_id, data in states.items():
            c.materialize(c.get(snap_id).artifacts["memory"], tmp_path / "out")
            assert (tmp_path / "out").read_bytes() == data
        assert c.verify().ok


def test_one_gc_at_a_time_across_hosts(s3_env, bucket, tmp_path: Path):
    with tiered(home(tmp_path, "a"), bucket) as a:
        a.commit({})
        assert a.remote.put("gc/lock", b"other-host pid 1\n", if_absent=True)
        with pytest.raises(ConflictError, match="another gc"):
            a.gc(grace_seconds=GRACE)
        assert a.gc(grace_seconds=GRACE, dry_run=True).dry_run  # a dry run needs no lock
        a.remote.delete("gc/lock")
        assert not a.gc(grace_seconds=GRACE).bucket_deleted


def test_an_upload_resumed_after_its_manifest_made_it_keeps_the_buckets_index(
    s3_env, bucket, tmp_path: Path
):
    """A crash between the manifest's PUT and the local "in the bucket" mark leaves the
    commit pending; the resumed upload must not replace the index other hosts may
    have read (a new index would name new packs, and gc on a host holding the old
    one would condemn them)."""
    root = home(tmp_path, "a")
    src = rand_file(tmp_path / "mem", 6 * CS, 46)
    with tiered(root, bucket, durability="local") as a:
        art, _ = a.put_file(src, chunk_size=CS)
        m = a.commit({"memory": art})
        assert wait_uploads(timeout=60)
    before = {k: v for k, v in etags(s3_env, bucket).items() if "/FORMAT" not in k}
    (root / "pending" / m.id).write_bytes(b"")  # as if it crashed right after the PUT
    (root / "remote" / m.id).unlink()
    with tiered(root, bucket, durability="local") as again:
        assert wait_uploads(timeout=60)
        assert not list(again.pending_dir.iterdir()) and again._is_remote(m.id)
    after = {k: v for k, v in etags(s3_env, bucket).items() if "/FORMAT" not in k}
    assert after == before  # no new pack, the same index
    with tiered(home(tmp_path, "b", key_from=root), bucket) as b:
        b.materialize(b.get(m.id).artifacts["memory"], tmp_path / "out")
    assert same_content(src, tmp_path / "out")


def etags(srv, bucket: str) -> dict[str, str]:
    c = srv.client()
    return {
        o["Key"]: o["ETag"]
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="torpor/")
        for o in page.get("Contents", [])
    }
