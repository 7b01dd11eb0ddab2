"""A whole snapshot id is answered by a path check (and, with a bucket, one GET):
neither a missing nor a removed id makes the store read every manifest or list the
bucket (``session rm`` looks up ids of snapshots released long ago; with 1,200
snapshots each such lookup read all 1,200 manifests).  Observed through what is
read: the paths of ``snapshots/`` opened or listed, the bucket prefixes listed."""

from __future__ import annotations

import random
import secrets
from pathlib import Path

import pytest

from tests.store.conftest import KiB
from tests.store.test_s3_store import home, tiered
from torpor.errors import ConflictError, NotFoundError
from torpor.store import ChunkStore

CS = 64 * KiB


def _commit(store: ChunkStore, tmp_path: Path, seed: int):
    src = tmp_path / f"src{seed}"
    src.write_bytes(random.Random(seed).randbytes(2 * CS))
    art, _ = store.put_file(src, chunk_size=CS)
    return store.commit({"memory": art}, meta={"tag": f"t{seed}"})


@pytest.fixture
def snapshot_reads(monkeypatch):
    """Every path under a ``snapshots`` folder read or listed (the folder for a listing)."""
    seen: list[str] = []
    read_bytes, iterdir = Path.read_bytes, Path.iterdir

    def spy_read(self: Path) -> bytes:
        if self.parent.name == "snapshots":
            seen.append(self.name)
        return read_bytes(self)

    def spy_iterdir(self: Path):
        if self.name == "snapshots":
            seen.append("LIST " + str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "read_bytes", spy_read)
    monkeypatch.setattr(Path, "iterdir", spy_iterdir)
    return seen


def test_a_missing_or_removed_whole_id_reads_no_manifest(tmp_path: Path, snapshot_reads) -> None:
    with ChunkStore(tmp_path / "store") as store:
        ms = [_commit(store, tmp_path, i) for i in range(5)]
        store.remove(ms[1].id)
        snapshot_reads.clear()
        for ref in (ms[1].id, secrets.token_hex(32), ms[1].id.upper()):
            with pytest.raises(NotFoundError):
                store.get(ref)
            with pytest.raises(NotFoundError):
                store.resolve_id(ref)
        assert snapshot_reads == []
        # a present one: its own manifest, nothing else
        assert store.get(ms[3].id).id == ms[3].id
        assert snapshot_reads == [f"{ms[3].id}.manifest"]
        # a prefix or a tag still finds it (that one does list)
        assert store.get(ms[2].id[:10]).id == ms[2].id
        assert store.get("t4").id == ms[4].id


def test_a_whole_id_in_the_bucket_is_one_get_not_a_listing(
    s3_env, bucket, tmp_path: Path, monkeypatch
) -> None:
    a_root = home(tmp_path, "a")
    with tiered(a_root, bucket) as a:
        ms = [_commit(a, tmp_path, i) for i in range(3)]
        a.remove(ms[0].id)
    with tiered(home(tmp_path, "b", key_from=a_root), bucket) as b:  # empty cache
        listed: list[str] = []
        real_list = b.remote.list

        def spy_list(prefix: str) -> list[str]:
            listed.append(prefix)
            return real_list(prefix)

        monkeypatch.setattr(b.remote, "list", spy_list)
        assert b.get(ms[2].id).id == ms[2].id  # only in the bucket: fetched by name
        for ref in (ms[0].id, secrets.token_hex(32)):  # removed there / never existed
            with pytest.raises(NotFoundError):
                b.get(ref)
        assert b.is_removed(ms[0].id)  # the bucket's tombstone was brought over
        assert listed == []
        assert b.get("t1").id == ms[1].id  # a tag still lists
        assert listed


def test_removal_parses_no_other_manifest_whole(tmp_path: Path, monkeypatch) -> None:
    """The check for snapshots building on the one removed reads each other manifest's
    parent only (a VM snapshot's manifest lists ~8,000 chunks: parsing 1,200 of them
    per removal took seconds); a child is still found."""
    import torpor.store.store as store_mod

    with ChunkStore(tmp_path / "store") as store:
        ms = [_commit(store, tmp_path, i) for i in range(6)]
        src = tmp_path / "child"
        src.write_bytes(b"c" * CS)
        art, _ = store.put_file(src, chunk_size=CS)
        child = store.commit({"memory": art}, parent=ms[2].id)
        parsed: list[str | None] = []
        real = store_mod.decode_manifest

        def spy(key, data, *, source, expect_id):
            parsed.append(expect_id)
            return real(key, data, source=source, expect_id=expect_id)

        monkeypatch.setattr(store_mod, "decode_manifest", spy)
        with pytest.raises(ConflictError, match=child.id[:12]):
            store.remove(ms[2].id)
        store.remove(ms[4].id)
        assert set(parsed) <= {ms[2].id, ms[4].id}  # only the one being removed
        assert {m.id for m in store.list()} == {m.id for m in ms} - {ms[4].id} | {child.id}
