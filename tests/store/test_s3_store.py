"""The tiered store against a real S3 server (SeaweedFS): a bucket behind the local cache.

Two homes on one machine stand for two hosts: each has its own cache folder, both
share the bucket and the store key.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path

import blake3
import pytest

from tests.store.conftest import KiB, same_content
from tests.store.s3server import S3Server
from torpor.errors import (
    ChunkCorruptError,
    ManifestAuthError,
    NoSuchBucketError,
    RemoteAccessError,
    RemoteUnreachableError,
    UsageError,
)
from torpor.store import ChunkStore
from torpor.store.backend import S3Backend
from torpor.store.tiered import (
    TieredStore,
    decode_index,
    open_store,
    parse_size,
    wait_uploads,
)

CS = 64 * KiB
# file times come from the kernel's coarse clock (a jiffy, up to 10 ms): uses that must
# be ordered by mtime are this far apart (an ordering, not a timing assertion)
COARSE_CLOCK = 0.05


def home(tmp_path: Path, name: str, key_from: Path | None = None) -> Path:
    """A host's store folder; ``key_from`` (another store folder) shares its key."""
    root = tmp_path / name / "store"
    root.mkdir(parents=True)
    if key_from is not None:
        shutil.copy2(key_from / "key", root / "key")
    return root


def tiered(root: Path, bucket: str, **kw) -> TieredStore:
    return TieredStore(root, S3Backend(f"s3://{bucket}/torpor"), **kw)


def rand_file(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def objects(srv: S3Server, bucket: str, prefix: str = "torpor/") -> dict[str, bytes]:
    c = srv.client()
    out = {}
    for o in c.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        out[o["Key"]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def local_chunks(store: ChunkStore) -> set[str]:
    return {p.name for p in store.chunks_dir.glob("*/*")}


def test_open_store_picks_the_backend(s3_env, bucket, tmp_path: Path, monkeypatch):
    root = home(tmp_path, "a")
    plain = open_store(root)
    assert type(plain) is ChunkStore  # nothing configured: exactly the local store
    monkeypatch.setenv("TORPOR_STORE", f"s3://{bucket}/p")
    monkeypatch.setenv("TORPOR_CACHE_MAX", "1G")
    t = open_store(root)
    assert isinstance(t, TieredStore)
    assert t.cache_max == 1 << 30 and t.durability == "bucket"
    assert parse_size("512M") == 512 << 20 and parse_size("4096") == 4096
    monkeypatch.setenv("TORPOR_CACHE_MAX", "lots")
    with pytest.raises(UsageError, match="not a size"):
        open_store(root)
    with pytest.raises(UsageError, match="s3://"):
        open_store(root, store="ftp://bucket/p")
    with pytest.raises(UsageError, match="durability"):
        open_store(root, store=f"s3://{bucket}/p", durability="maybe", cache_max=1)


def test_round_trip_through_the_bucket_on_a_second_host(s3_env, bucket, tmp_path: Path):
    a_root = home(tmp_path, "a")
    src = rand_file(tmp_path / "mem", 20 * CS + 123, 1)
    with tiered(a_root, bucket) as a:
        art, _ = a.put_file(src, chunk_size=CS)
        m = a.commit({"memory": art}, meta={"tag": "first"})
        st = a.last_commit
    assert st is not None and st.durability == "bucket" and st.bucket_ms is not None
    assert st.chunks_uploaded == len(art.stored) and st.packs_uploaded == 1
    keys = objects(s3_env, bucket)
    assert f"torpor/snapshots/{m.id}.manifest" in keys
    assert f"torpor/snapshots/{m.id}.index" in keys
    packs = [k for k in keys if k.startswith("torpor/packs/")]
    assert len(packs) == 1  # every chunk in one pack, named by its content
    assert packs[0].endswith(f"/{blake3.blake3(keys[packs[0]]).hexdigest()}.pack")
    assert not [k for k in keys if k.startswith("torpor/chunks/")]

    b_root = home(tmp_path, "b", key_from=a_root)  # another host: empty cache
    with tiered(b_root, bucket) as b:
        assert local_chunks(b) == set()
        assert [x.id for x in b.list()] == [m.id]
        got = b.get("first")  # by tag, through the bucket's listing
        assert got.id == m.id
        # a range reads only the chunks covering it
        assert b.read_range(got.artifacts["memory"], 3 * CS + 5, 100) == src.read_bytes()[
            3 * CS + 5 : 3 * CS + 105
        ]
        assert len(local_chunks(b)) == 1
        b.materialize(got.artifacts["memory"], tmp_path / "out")
    assert same_content(src, tmp_path / "out")


def test_an_incremental_snapshot_uploads_only_new_chunks(s3_env, bucket, tmp_path: Path):
    root = home(tmp_path, "a")
    src = rand_file(tmp_path / "mem", 16 * CS, 2)
    with tiered(root, bucket) as a:
        art, _ = a.put_file(src, chunk_size=CS)
        m1 = a.commit({"memory": art})
        with open(src, "r+b") as f:  # one page changes
            f.seek(5 * CS + 100)
            f.write(b"x" * 4096)
        art2, _ = a.put_file(src, chunk_size=CS, parent=art)
        a.commit({"memory": art2}, parent=m1.id)
        st = a.last_commit
        assert st.chunks_uploaded == 1 and st.packs_uploaded == 1
        # one pack, the index, the gc check (condemned/ and the parent), the manifest
        assert st.requests <= 5
        assert st.bytes_uploaded < CS + 4096


def test_existing_chunk_objects_are_never_reuploaded_or_replaced(
    s3_env, bucket, tmp_path: Path
):
    a_root = home(tmp_path, "a")
    src = rand_file(tmp_path / "mem", 8 * CS, 3)
    with tiered(a_root, bucket) as a:
        art, _ = a.put_file(src, chunk_size=CS)
        m = a.commit({"memory": art})
    before = {
        o["Key"]: o["ETag"]
        for o in s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]
    }
    # another host (empty cache) stores the same bytes on top of that snapshot: every
    # chunk is found through the parent's index, none is sent again
    c_root = home(tmp_path, "c", key_from=a_root)
    with tiered(c_root, bucket) as c:
        m = c.get(m.id)
        art_c, _ = c.put_file(src, chunk_size=CS, parent=m.artifacts["memory"])
        c.commit({"memory": art_c}, parent=m.id, meta={"host": "c"})
        assert c.last_commit.chunks_uploaded == 0 and c.last_commit.packs_uploaded == 0
        up = c.last_commit.bytes_uploaded
        assert up < 4096  # the manifest and the index only
        # a conditional put of other bytes under a pack's name is refused
        pack = next(k for k in before if "/packs/" in k).split("/", 1)[1]
        assert c.remote.put(pack, b"other bytes", if_absent=True) is False
    after = {
        o["Key"]: o["ETag"]
        for o in s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]
    }
    assert {k: v for k, v in after.items() if k in before} == before


def test_a_chunk_corrupted_in_the_bucket_is_refused(s3_env, bucket, tmp_path: Path):
    a_root = home(tmp_path, "a")
    src = rand_file(tmp_path / "mem", 6 * CS, 4)
    with tiered(a_root, bucket) as a:
        art, _ = a.put_file(src, chunk_size=CS)
        m = a.commit({"memory": art})
    victim = sorted(art.stored)[2]
    c = s3_env.client()
    loc = decode_index(
        a_root.joinpath("key").read_bytes(),
        c.get_object(Bucket=bucket, Key=f"torpor/snapshots/{m.id}.index")["Body"].read(),
        snap_id=m.id, source="test",
    )[victim]  # fmt: skip
    key = f"torpor/packs/{loc.pack[:2]}/{loc.pack}.pack"
    good = c.get_object(Bucket=bucket, Key=key)["Body"].read()
    # one byte of the victim's frame flipped (in place: the pack keeps its name)
    bad = bytearray(good)
    bad[loc.offset + loc.length // 2] ^= 0x01
    c.put_object(Bucket=bucket, Key=key, Body=bytes(bad))
    b_root = home(tmp_path, "b", key_from=a_root)
    with tiered(b_root, bucket) as b:
        with pytest.raises(ChunkCorruptError) as e:
            b.materialize(b.get(m.id).artifacts["memory"], tmp_path / "out")
        assert e.value.corrupt == (victim,)  # the others in the pack are fine
        assert victim not in local_chunks(b)  # refused, not cached
        assert len(local_chunks(b)) == len(art.stored) - 1
        assert not (tmp_path / "out").exists()
        # a pack truncated in the middle of a frame too
        c.put_object(Bucket=bucket, Key=key, Body=good[: loc.offset + loc.length // 2])
        with pytest.raises(ChunkCorruptError):
            b.read_range(b.get(m.id).artifacts["memory"], art.chunks.index(victim) * CS, 10)


def test_a_manifest_tampered_in_the_bucket_is_refused(s3_env, bucket, tmp_path: Path):
    a_root = home(tmp_path, "a")
    src = rand_file(tmp_path / "mem", 4 * CS, 5)
    with tiered(a_root, bucket) as a:
        art, _ = a.put_file(src, chunk_size=CS)
        m = a.commit({"memory": art}, meta={"tag": "t"})
    key = f"torpor/snapshots/{m.id}.manifest"
    c = s3_env.client()
    data = bytearray(c.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-3] ^= 0x40
    c.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    b_root = home(tmp_path, "b", key_from=a_root)
    with tiered(b_root, bucket) as b:
        with pytest.raises(ManifestAuthError):
            b.get(m.id)
        assert not (b.snapshots_dir / f"{m.id}.manifest").exists()  # not cached
        good, bad = b.scan()
        assert good == [] and [i for i, _ in bad] == [m.id]


def test_a_host_with_another_key_is_told_so_at_open(s3_env, bucket, tmp_path: Path):
    with tiered(home(tmp_path, "a"), bucket) as a:
        a.commit({})
    with pytest.raises(ManifestAuthError, match="key"):
        tiered(home(tmp_path, "b"), bucket)  # its own fresh key


def test_removal_travels_through_the_bucket(s3_env, bucket, tmp_path: Path):
    a_root = home(tmp_path, "a")
    with tiered(a_root, bucket) as a:
        art, _ = a.put_file(rand_file(tmp_path / "f", 2 * CS, 6), chunk_size=CS)
        m = a.commit({"f": art})
        a.remove(m.id)
    # a forged tombstone (no valid MAC) for another snapshot is ignored
    with tiered(a_root, bucket) as a:
        m2 = a.commit({"f": art}, meta={"n": "2"})
    s3_env.client().put_object(
        Bucket=bucket, Key=f"torpor/snapshots/{m2.id}.removed", Body=b"forged"
    )
    with tiered(home(tmp_path, "b", key_from=a_root), bucket) as b:
        assert [x.id for x in b.list()] == [m2.id]


def test_wrong_credentials_and_missing_bucket_are_clear_errors(
    s3_env, bucket, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(RemoteAccessError) as e:
        tiered(home(tmp_path, "a"), bucket)
    assert bucket in str(e.value) and s3_env.endpoint in str(e.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.env("x")["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(NoSuchBucketError) as e2:
        tiered(home(tmp_path, "b"), "no-such-bucket-here")
    assert "no-such-bucket-here" in str(e2.value) and s3_env.endpoint in str(e2.value)


def test_bucket_unreachable_during_commit(tmp_path: Path, monkeypatch):
    """The server stops between put and commit: a clear error, nothing listed
    anywhere; once it is back, the same commit succeeds."""
    srv = S3Server(tmp_path / "srv").start()
    try:
        for k, v in srv.env("x").items():
            if k.startswith("AWS_"):
                monkeypatch.setenv(k, v)
        monkeypatch.setattr("torpor.store.backend.BACKOFF_S", 0.01)
        bucket = srv.make_bucket("unreachable-test")
        root = home(tmp_path, "a")
        src = rand_file(tmp_path / "mem", 8 * CS, 7)
        with tiered(root, bucket) as a:
            art, _ = a.put_file(src, chunk_size=CS)
            srv.stop()
            with pytest.raises(RemoteUnreachableError) as e:
                a.commit({"memory": art}, meta={"tag": "x"})
            assert bucket in str(e.value) and srv.endpoint in str(e.value)
            assert not list((root / "snapshots").glob("*.manifest"))  # not listed here
            with pytest.raises(RemoteUnreachableError):
                a.ids()  # a listing needs the bucket: it fails, it does not guess
            srv.start()  # same ports, same data
            assert a.ids() == []  # nor there
            m = a.commit({"memory": art}, meta={"tag": "x"})  # the retry
            assert a.last_commit.durability == "bucket"
        with tiered(home(tmp_path, "b", key_from=root), bucket) as b:
            assert b.get("x").id == m.id
            b.materialize(b.get("x").artifacts["memory"], tmp_path / "out")
        assert same_content(src, tmp_path / "out")
    finally:
        srv.stop()


def test_a_local_ack_survives_an_unreachable_bucket_and_is_uploaded_later(
    tmp_path: Path, monkeypatch
):
    """durability=local: the bucket is down at the commit; the snapshot is acknowledged
    (locally durable), stays pending, and the next store opened on the home uploads it."""
    srv = S3Server(tmp_path / "srv").start()
    try:
        for k, v in srv.env("x").items():
            if k.startswith("AWS_"):
                monkeypatch.setenv(k, v)
        monkeypatch.setattr("torpor.store.backend.BACKOFF_S", 0.01)
        bucket = srv.make_bucket("pending-test")
        root = home(tmp_path, "a")
        src = rand_file(tmp_path / "mem", 8 * CS, 9)
        with tiered(root, bucket, durability="local") as a:
            art, _ = a.put_file(src, chunk_size=CS)
            srv.stop()
            m = a.commit({"memory": art}, meta={"tag": "behind"})
            assert a.last_commit.upload_pending
            assert wait_uploads(timeout=120)
            assert [p.name for p in a.pending_dir.iterdir()] == [m.id]  # not lost: pending
        srv.start()
        with tiered(root, bucket, durability="local") as again:
            assert wait_uploads(timeout=120)
            assert not list(again.pending_dir.iterdir())
        with tiered(home(tmp_path, "b", key_from=root), bucket) as b:
            b.materialize(b.get("behind").artifacts["memory"], tmp_path / "out")
        assert same_content(src, tmp_path / "out")
    finally:
        srv.stop()


def test_verify_counts_evicted_chunks_as_present_in_the_bucket(s3_env, bucket, tmp_path: Path):
    root = home(tmp_path, "a")
    with tiered(root, bucket) as a:
        art, _ = a.put_file(rand_file(tmp_path / "f", 6 * CS, 30), chunk_size=CS)
        m = a.commit({"f": art})
        a.evict(0)
        assert local_chunks(a) == set()
        assert a.verify().ok
        (pack,) = [k for k in objects(s3_env, bucket) if k.startswith("torpor/packs/")]
        s3_env.client().delete_object(Bucket=bucket, Key=pack)
        r = a.verify()
        every = tuple(sorted(art.stored))  # all in that one pack
        assert r.missing == every and r.affected == {m.id: every}


def test_durability_local_acknowledges_first_and_uploads_behind(
    s3_env, bucket, tmp_path: Path
):
    a_root = home(tmp_path, "a")
    src = rand_file(tmp_path / "mem", 8 * CS, 8)
    with tiered(a_root, bucket, durability="local") as a:
        art, _ = a.put_file(src, chunk_size=CS)
        m = a.commit({"memory": art})
        st = a.last_commit
        assert st.durability == "local" and st.upload_pending and st.bucket_ms is None
        assert wait_uploads(timeout=60)
        assert not list(a.pending_dir.iterdir())
    with tiered(home(tmp_path, "b", key_from=a_root), bucket) as b:
        b.materialize(b.get(m.id).artifacts["memory"], tmp_path / "out")
    assert same_content(src, tmp_path / "out")


def test_cache_eviction_is_lru_by_bytes(s3_env, bucket, tmp_path: Path):
    a_root = home(tmp_path, "a")
    with tiered(a_root, bucket) as a:
        arts = {}
        for i in range(3):
            art, _ = a.put_file(rand_file(tmp_path / f"f{i}", 8 * CS, 10 + i), chunk_size=CS)
            arts[i] = (art, a.commit({"f": art}, meta={"i": str(i)}))
    b_root = home(tmp_path, "b", key_from=a_root)
    with tiered(b_root, bucket) as b:
        for i in (0, 1, 2):
            b.materialize(arts[i][0], tmp_path / f"out{i}")
            time.sleep(COARSE_CLOCK)
        total = b.cache_bytes()
        per = total // 3  # (the three files are alike: random bytes, same size)
        # touch snapshot 0 again: now 1 is the least recently used
        b.read_range(arts[0][0], 0, 8 * CS)
        freed = b.evict(total - per)
        assert freed >= per - 2 * CS
        have = local_chunks(b)
        assert arts[0][0].stored <= have and arts[2][0].stored <= have
        assert not (arts[1][0].stored & have)
        assert b.cache_bytes() <= total - per
        # an evicted snapshot still restores: fetched again
        b.materialize(arts[1][0], tmp_path / "again")
        assert same_content(tmp_path / "f1", tmp_path / "again")
        # a configured bound is kept after each read
        b.cache_max = 2 * per
        b.materialize(arts[0][0], tmp_path / "again0")
        assert b.cache_bytes() <= 2 * per


def test_eviction_spares_what_a_running_read_holds(s3_env, bucket, tmp_path: Path):
    a_root = home(tmp_path, "a")
    src = rand_file(tmp_path / "mem", 64 * CS, 20)
    with tiered(a_root, bucket) as a:
        art, _ = a.put_file(src, chunk_size=CS)
        m = a.commit({"memory": art})
    b_root = home(tmp_path, "b", key_from=a_root)
    with tiered(b_root, bucket) as b, tiered(b_root, bucket) as evictor:
        b.materialize(art, tmp_path / "warm")  # everything cached
        assert local_chunks(b) == set(art.stored)
        time.sleep(COARSE_CLOCK)
        with b.pinned():
            part = b.read_range(art, 10 * CS, 4 * CS)  # touches chunks 10..13
            held = {art.chunks[i] for i in range(10, 14)}
            evictor.evict(0)
            assert held <= local_chunks(b)  # what the read touched stays
            assert len(local_chunks(b)) < len(art.stored)  # the rest went
            assert part == src.read_bytes()[10 * CS : 14 * CS]
        evictor.evict(0)
        assert local_chunks(b) == set()

        # a whole restore racing an evictor that empties the cache again and again
        stop = threading.Event()
        freed = []

        def evict_loop() -> None:
            while not stop.is_set():
                freed.append(evictor.evict(0))

        t = threading.Thread(target=evict_loop)
        t.start()
        try:
            b.materialize(b.get(m.id).artifacts["memory"], tmp_path / "cold")
        finally:
            stop.set()
            t.join()
        assert same_content(src, tmp_path / "cold")


def test_the_local_store_is_unchanged_without_a_bucket(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("TORPOR_STORE", raising=False)
    s = open_store(home(tmp_path, "a"))
    assert type(s) is ChunkStore
    assert not (s.root / "remote").exists() and not (s.root / "pending").exists()
