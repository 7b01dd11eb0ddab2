"""Integrity: manifests are authenticated before parsing; bad chunks are named, all of them."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import zstandard

from tests.store.conftest import KiB, stray_temps
from torpor.errors import ConflictError, NotFoundError, TorporError
from torpor.store import (
    ChunkCorruptError,
    ChunkMissingError,
    ChunkStore,
    ManifestAuthError,
    ManifestError,
    ManifestVersionError,
    StoreError,
)
from torpor.store import manifest as manifest_mod
from torpor.store.manifest import MAC_PREFIX, MAGIC, MAGIC_V1, encode_manifest, mac

CS = 64 * KiB


def _snap(store: ChunkStore, tmp_path: Path, n: int = 6, seed: int = 1, parent=None):
    src = tmp_path / f"src{seed}"
    src.write_bytes(random.Random(seed).randbytes(n * CS))
    art, _ = store.put_file(src, chunk_size=CS)
    return store.commit({"memory": art}, parent=parent), src


def _swap_body(path: Path, old: bytes, new: bytes) -> None:
    """Edit a manifest's body, keeping its (now wrong) MAC line: what an attacker can do."""
    head, mac_line, z = path.read_bytes().split(b"\n", 2)
    body = zstandard.ZstdDecompressor().decompress(z)
    assert old in body
    z = zstandard.ZstdCompressor().compress(body.replace(old, new))
    path.write_bytes(head + b"\n" + mac_line + b"\n" + z)


def test_tampered_manifest_fails_auth_before_parsing(store, tmp_path, monkeypatch):
    m, _ = _snap(store, tmp_path)
    path = store.snapshots_dir / f"{m.id}.manifest"
    _swap_body(path, b'"kind"', b'"kinc"')

    def no_parse(*a, **k):
        raise AssertionError("json parsed (or zstd run) before the MAC was checked")

    monkeypatch.setattr(manifest_mod.json, "loads", no_parse)
    monkeypatch.setattr(manifest_mod, "_body", no_parse)
    with pytest.raises(ManifestAuthError) as ei:
        store.get(m.id)
    assert str(path) in str(ei.value)
    assert isinstance(ei.value, StoreError) and isinstance(ei.value, TorporError)
    assert ei.value.exit_code == 10


def test_manifest_from_another_store_fails_auth(tmp_path: Path):
    with ChunkStore(tmp_path / "a") as a, ChunkStore(tmp_path / "b") as b:
        m, _ = _snap(a, tmp_path)
        name = f"{m.id}.manifest"
        (b.snapshots_dir / name).write_bytes((a.snapshots_dir / name).read_bytes())
        with pytest.raises(ManifestAuthError):
            b.get(m.id)


def test_unknown_schema_major_is_rejected_clearly(store: ChunkStore):
    body = json.dumps(
        {
            "schema_version": 2,
            "parent": None,
            "created": "x",
            "kind": "vm-snapshot",
            "meta": {},
            "artifacts": {},
            "new_field": [1],
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    from torpor.store.chunks import hash_bytes

    sid = hash_bytes(body)
    (store.snapshots_dir / f"{sid}.manifest").write_bytes(encode_manifest(store._key, body))
    with pytest.raises(ManifestVersionError, match="schema_version 2 is not supported"):
        store.get(sid)


def test_unknown_file_format_and_non_manifests(store: ChunkStore):
    sid = "ab" * 32
    p = store.snapshots_dir / f"{sid}.manifest"
    p.write_bytes(b"torpor-manifest 9\nhmac-sha256 00\n{}\n")
    with pytest.raises(ManifestVersionError, match="torpor-manifest 9"):
        store.get(sid)
    p.write_bytes(b"\x89PNG\r\n\x1a\n not a manifest")
    with pytest.raises(ManifestError, match="not a torpor manifest"):
        store.get(sid)
    p.write_bytes(MAGIC + b"hmac-sha256 zz")  # truncated
    with pytest.raises(ManifestError):
        store.get(sid)


def test_renamed_manifest_is_rejected(store, tmp_path):
    m, _ = _snap(store, tmp_path)
    other = "cd" * 32
    os.rename(store.snapshots_dir / f"{m.id}.manifest", store.snapshots_dir / f"{other}.manifest")
    with pytest.raises(ManifestError, match="not to its file name"):
        store.get(other)


def test_missing_and_corrupt_chunks_are_all_named_and_no_dest_left(store, tmp_path):
    m, _ = _snap(store, tmp_path)
    art = m.artifacts["memory"]
    gone, bad1, bad2 = art.chunks[1], art.chunks[3], art.chunks[4]
    os.unlink(store.chunk_path(gone))
    store.chunk_path(bad1).write_bytes(b"garbage")  # not even zstd
    # A valid zstd frame of the wrong content: only the hash check catches it.
    from torpor.store.chunks import compress_chunk

    store.chunk_path(bad2).write_bytes(compress_chunk(bytes(CS - 1) + b"x"))

    dest_dir = tmp_path / "restore"
    dest_dir.mkdir()
    dest = dest_dir / "ram"
    with pytest.raises(ChunkMissingError) as ei:
        store.materialize(art, dest, name="memory")
    msg = str(ei.value)
    for h in (gone, bad1, bad2):
        assert h in msg
    assert "memory" in msg
    assert ei.value.missing == (gone,) and set(ei.value.corrupt) == {bad1, bad2}
    assert list(dest_dir.iterdir()) == []  # no dest, no temp file

    with pytest.raises(ChunkMissingError):
        store.read_range(art, 0, 6 * CS)
    # Only corrupt ones: the corrupt class.
    store.chunk_path(gone).parent.mkdir(exist_ok=True)
    store.chunk_path(gone).write_bytes(b"\x28\xb5\x2f\xfd junk")
    with pytest.raises(ChunkCorruptError) as ei2:
        store.materialize(art, dest, name="memory")
    assert set(ei2.value.corrupt) == {gone, bad1, bad2}
    assert not dest.exists() and stray_temps(dest_dir) == []
    # An existing dest is not clobbered by a failed materialize.
    dest.write_bytes(b"old")
    with pytest.raises(ChunkCorruptError):
        store.materialize(art, dest)
    assert dest.read_bytes() == b"old"


def test_verify_finds_missing_and_corrupt_and_affected_snapshots(store, tmp_path):
    m1, _ = _snap(store, tmp_path, seed=1)
    m2, _ = _snap(store, tmp_path, seed=2)
    a1, a2 = m1.artifacts["memory"], m2.artifacts["memory"]
    os.unlink(store.chunk_path(a1.chunks[0]))
    p = store.chunk_path(a2.chunks[2])
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    assert store.verify().ok is False
    r = store.verify()
    assert r.missing == (a1.chunks[0],)
    assert r.corrupt == (a2.chunks[2],)
    assert r.affected == {m1.id: (a1.chunks[0],), m2.id: (a2.chunks[2],)}
    assert r.chunks_checked == 11


def test_verify_reports_bad_manifest(store, tmp_path):
    m, _ = _snap(store, tmp_path)
    p = store.snapshots_dir / f"{m.id}.manifest"
    _swap_body(p, b'"vm-snapshot"', b'"vm-snapshoX"')
    r = store.verify()
    assert not r.ok and r.bad_manifests[0][0] == p.name and "MAC" in r.bad_manifests[0][1]


def test_format_1_manifests_still_load(store, tmp_path):
    m, src = _snap(store, tmp_path)
    body = m.body()
    p = store.snapshots_dir / f"{m.id}.manifest"
    p.write_bytes(MAGIC_V1 + MAC_PREFIX + mac(store._key, body).encode() + b"\n" + body + b"\n")
    assert store.get(m.id) == m
    assert store.verify().ok
    out = tmp_path / "out"
    store.materialize(store.get(m.id).artifacts["memory"], out)
    assert out.read_bytes() == src.read_bytes()


def test_gc_keeps_what_a_damaged_manifest_names(store, tmp_path):
    m, _ = _snap(store, tmp_path)
    other, _ = _snap(store, tmp_path, seed=2)
    store.remove(other.id)
    p = store.snapshots_dir / f"{m.id}.manifest"
    _swap_body(p, b'"vm-snapshot"', b'"vm-snapshoX"')  # fails auth, body still readable
    r = store.gc(grace_seconds=0)
    assert r.manifests_unreadable == (p.name,)
    assert r.chunks_deleted == len(other.chunks)  # only the removed snapshot's chunks
    assert all(store.chunk_path(h).exists() for h in m.chunks)
    # a body that does not even decompress names nothing knowable: gc deletes nothing
    third, _ = _snap(store, tmp_path, seed=3)
    store.remove(third.id)
    head, mac_line, z = p.read_bytes().split(b"\n", 2)
    p.write_bytes(head + b"\n" + mac_line + b"\n" + b"\x28\xb5\x2f\xfd" + z[4:20])
    r = store.gc(grace_seconds=0)
    assert r.chunks_deleted == 0 and r.manifests_unreadable == (p.name,)
    assert all(store.chunk_path(h).exists() for h in m.chunks | third.chunks)


def test_get_prefix_missing_ambiguous(store, tmp_path):
    m, _ = _snap(store, tmp_path)
    assert store.get(m.id[:8]).id == m.id
    with pytest.raises(NotFoundError):
        store.get("0" * 10 if not m.id.startswith("0") else "f" * 10)
    # Two manifests with the same first hex digit make a one-char prefix ambiguous.
    ids = {m.id}
    seed = 2
    while len({i[0] for i in ids}) == len(ids):
        ids.add(_snap(store, tmp_path, n=1, seed=seed)[0].id)
        seed += 1
    first = [i[0] for i in ids]
    dup = next(c for c in first if first.count(c) > 1)
    with pytest.raises(ConflictError, match="ambiguous"):
        store.get(dup)


def test_remove_refuses_parent_unless_forced(store, tmp_path):
    p, _ = _snap(store, tmp_path, seed=1)
    c, _ = _snap(store, tmp_path, seed=2, parent=p.id)
    with pytest.raises(ConflictError, match="parent"):
        store.remove(p.id)
    store.remove(c.id)
    store.remove(p.id)
    assert store.list() == []
    p2, _ = _snap(store, tmp_path, seed=3)
    _snap(store, tmp_path, seed=4, parent=p2.id)
    store.remove(p2.id, force=True)
    assert [x.parent for x in store.list()] == [p2.id]


def test_commit_checks_parent_and_chunks(store, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(os.urandom(2 * CS))
    art, _ = store.put_file(src, chunk_size=CS)
    with pytest.raises(NotFoundError):
        store.commit({"memory": art}, parent="ee" * 32)
    os.unlink(store.chunk_path(art.chunks[0]))
    with pytest.raises(ChunkMissingError, match=art.chunks[0]):
        store.commit({"memory": art})
    assert store.list() == []


def test_torn_chunk_left_by_a_crash_is_not_reused(store, tmp_path):
    """A chunk file under its real name but with bad content (power loss before syncfs)
    must not be trusted by a later writer that happens to produce the same chunk."""
    block = os.urandom(CS)
    from torpor.store.chunks import hash_bytes

    h = hash_bytes(block)
    store.chunk_path(h).parent.mkdir(exist_ok=True)
    store.chunk_path(h).write_bytes(b"")  # torn: zero length
    src = tmp_path / "f"
    src.write_bytes(block * 2)
    art, stats = store.put_file(src, chunk_size=CS)
    assert stats.chunks_new == 1
    m = store.commit({"memory": art})
    out = tmp_path / "out"
    store.materialize(m.artifacts["memory"], out)
    assert out.read_bytes() == block * 2


def test_key_file_is_private_and_stable(tmp_path):
    with ChunkStore(tmp_path / "s") as s:
        key = (tmp_path / "s" / "key").read_bytes()
        assert (tmp_path / "s" / "key").stat().st_mode & 0o777 == 0o600
        assert len(key) == 32
        m, _ = _snap(s, tmp_path)
    with ChunkStore(tmp_path / "s") as s2:
        assert (tmp_path / "s" / "key").read_bytes() == key
        assert s2.get(m.id) == m


def test_unknown_store_format_is_rejected(tmp_path):
    ChunkStore(tmp_path / "s").close()
    (tmp_path / "s" / "FORMAT").write_bytes(b"torpor-store 7\n")
    with pytest.raises(StoreError, match="unsupported store format"):
        ChunkStore(tmp_path / "s")
