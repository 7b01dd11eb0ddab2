"""Local packs (torpor/store/packs.py): a put with many new chunks writes them into one
file with an index.  Stores mixing packs and loose chunks read back byte for byte; gc
keeps a pack any kept snapshot names a chunk of and removes one nothing names; a
pack whose index lies or that was truncated is a corrupt-chunk error naming it, never
wrong bytes or a crash; kill -9 and ENOSPC mid pack leave nothing listed."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.store.conftest import stray_temps
from torpor import failpoints
from torpor.errors import ChunkCorruptError, TorporError
from torpor.failpoints import ENV as FAILPOINTS_ENV
from torpor.store import ChunkStore
from torpor.store import chunks as ck
from torpor.store import packs as pk
from torpor.store import store as store_mod
from torpor.store.manifest import Artifact

CS = 4096
BIG_CS = 64 * 1024
REPO = Path(__file__).resolve().parents[2]


def _packs(store: ChunkStore) -> list[Path]:
    return sorted(store.packs_dir.glob("*.pack"))


def _loose(store: ChunkStore) -> set[str]:
    return {p.name for p in store.chunks_dir.glob("*/*")}


def _age(path: Path, seconds: float = 3600) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _age_all(store: ChunkStore) -> None:
    for p in [*store.chunks_dir.glob("*/*"), *_packs(store)]:
        _age(p)


def _random_file(path: Path, n: int, seed: int, cs: int = CS) -> bytes:
    data = random.Random(seed).randbytes(n * cs)
    path.write_bytes(data)
    return data


# -- round trips ---------------------------------------------------------------------


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    puts=st.lists(
        st.tuples(
            st.lists(st.sampled_from(["rand", "zero", "keep", "flip"]), min_size=1, max_size=24),
            st.sampled_from([None, 1, 4]),  # pack_min_chunks: loose only, always, many only
        ),
        min_size=1,
        max_size=5,
    ),
    seed=st.integers(0, 2**32),
)
def test_packs_and_loose_chunks_read_back_byte_for_byte(tmp_path_factory, puts, seed):
    """Each put changes the file (new random chunks, zeros, a few bytes flipped: deltas),
    stored as a child of the previous snapshot with packs on or off; every snapshot
    reads back exactly, and verify finds nothing wrong."""
    tmp = tmp_path_factory.mktemp("packs")
    rnd = random.Random(seed)
    src = tmp / "file"
    content = bytearray()
    snaps: list[tuple[str, bytes]] = []
    with ChunkStore(tmp / "store", threads=2) as store:
        parent = parent_id = None
        for kinds, pack_min in puts:
            store.pack_min_chunks = pack_min
            new = bytearray()
            for i, kind in enumerate(kinds):
                old = bytes(content[i * CS : (i + 1) * CS]) or bytes(CS)
                if kind == "rand":
                    new += rnd.randbytes(CS)
                elif kind == "zero":
                    new += bytes(CS)
                elif kind == "keep":
                    new += old
                else:
                    b = bytearray(old)
                    b[rnd.randrange(CS)] ^= 0xFF
                    new += b
            content = new
            src.write_bytes(content)
            art, _ = store.put_file(src, chunk_size=CS, parent=parent)
            m = store.commit({"memory": art}, parent=parent_id)
            snaps.append((m.id, bytes(content)))
            parent, parent_id = art, m.id
        for i, (sid, want) in enumerate(snaps):
            out = tmp / f"back{i}"
            store.materialize(store.get(sid).artifacts["memory"], out, durable=False)
            assert out.read_bytes() == want
        v = store.verify()
        assert v.ok, v
        assert not stray_temps(store.tmp_dir)


def test_a_first_snapshot_sized_put_goes_into_packs_and_is_read_by_a_new_process(tmp_path):
    """Default settings: a put of many new chunks writes packs, not a file per chunk; a
    fresh process (no cached index) reads it back."""
    src = tmp_path / "ram"
    data = _random_file(src, 150, 1, BIG_CS)
    with ChunkStore(tmp_path / "store") as store:
        art, stats = store.put_file(src, chunk_size=BIG_CS)
        m = store.commit({"memory": art})
        assert stats.chunks_new == 150
        assert _packs(store) and not _loose(store)
    code = (
        "import sys; from pathlib import Path; from torpor.store import ChunkStore\n"
        "s = ChunkStore(Path(sys.argv[1]))\n"
        "s.materialize(s.get(sys.argv[2]).artifacts['memory'], Path(sys.argv[3]))\n"
        "assert s.verify().ok\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "store"), m.id, str(tmp_path / "back")],
        check=True,
        cwd=REPO,
    )
    assert (tmp_path / "back").read_bytes() == data



def test_a_packed_chunk_is_reused_unread_and_a_loose_one_is_rehashed(tmp_path):
    """Another writer's chunk is reused by a later put: one in a sealed pack as it is
    (a pack is named only after its frames and MAC'd index were synced, so it is never
    torn, and no torpor without packs wrote it), a loose one only after it was read
    back and re-hashed (an older torpor may have left it torn)."""
    big, small = tmp_path / "big", tmp_path / "small"
    _random_file(big, 150, 3, BIG_CS)
    _random_file(small, 8, 4, BIG_CS)
    with ChunkStore(tmp_path / "store") as store:
        store.put_file(big, chunk_size=BIG_CS)
        store.put_file(small, chunk_size=BIG_CS)
        assert _packs(store) and len(_loose(store)) == 8
    with ChunkStore(tmp_path / "store") as store:  # another writer: nothing of its own
        _, packed = store.put_file(big, chunk_size=BIG_CS)
        _, loose = store.put_file(small, chunk_size=BIG_CS)
    assert (packed.chunks_new, packed.chunks_reused, packed.chunks_verified) == (0, 150, 0)
    assert (loose.chunks_new, loose.chunks_reused, loose.chunks_verified) == (0, 8, 8)


def test_a_packing_put_writes_unvouched_loose_chunks_into_its_pack(tmp_path):
    """Loose chunks another writer left (an older torpor's: maybe torn) are not read
    back by a put that writes a pack: they go into the pack, and the next writer
    reuses the packed copies without reading them."""
    big = tmp_path / "big"
    data = _random_file(big, 150, 5, BIG_CS)
    with ChunkStore(tmp_path / "store") as store:
        store.pack_min_chunks = None  # loose files only, as before packs
        art, _ = store.put_file(big, chunk_size=BIG_CS)
        assert not _packs(store) and len(_loose(store)) == 150
    with ChunkStore(tmp_path / "store") as store:
        _, second = store.put_file(big, chunk_size=BIG_CS)
        assert all(store._packs.get(h) for h in art.chunks)
    assert (second.chunks_new, second.chunks_verified) == (150, 0)
    with ChunkStore(tmp_path / "store") as store:
        art3, third = store.put_file(big, chunk_size=BIG_CS)
        m = store.commit({"memory": art3})
        store.materialize(m.artifacts["memory"], tmp_path / "back")
    assert (third.chunks_new, third.chunks_reused, third.chunks_verified) == (0, 150, 0)
    assert (tmp_path / "back").read_bytes() == data

# -- gc ------------------------------------------------------------------------------


def test_gc_keeps_a_pack_shared_by_a_kept_snapshot_and_removes_an_unnamed_one(tmp_path):
    with ChunkStore(tmp_path / "store") as store:
        store.pack_min_chunks = 1
        a_src, b_src = tmp_path / "a", tmp_path / "b"
        a = _random_file(a_src, 8, 1)
        ma = store.commit({"memory": store.put_file(a_src, chunk_size=CS)[0]})
        # b: half of a's chunks and 4 new ones (a second pack)
        b = a[: 4 * CS] + random.Random(2).randbytes(4 * CS)
        b_src.write_bytes(b)
        mb = store.commit({"memory": store.put_file(b_src, chunk_size=CS)[0]})
        # c: nothing shared (a third pack), removed below
        c_src = tmp_path / "c"
        _random_file(c_src, 6, 3)
        mc = store.commit({"memory": store.put_file(c_src, chunk_size=CS)[0]})
        assert len(_packs(store)) == 3 and not _loose(store)
        pack_of = {h: store._packs.get(h)[0] for h in ma.chunks | mb.chunks | mc.chunks}
        store.remove(ma.id)
        store.remove(mc.id)
        _age_all(store)
        r = store.gc(grace_seconds=0)
        left = {p.stem for p in _packs(store)}
        # a's pack holds chunks b names: kept whole (no repacking); c's pack: gone
        assert left == {pack_of[h] for h in mb.chunks}
        assert r.local_packs_deleted == 1 and r.chunks_deleted == 6
        store.materialize(store.get(mb.id).artifacts["memory"], tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == b
        assert store.verify().ok
        store.remove(mb.id)
        store.gc(grace_seconds=0)
        assert not _packs(store) and store.verify().ok


def test_gc_dry_run_names_a_doomed_packs_chunks_and_deletes_nothing(tmp_path):
    with ChunkStore(tmp_path / "store") as store:
        store.pack_min_chunks = 1
        _random_file(tmp_path / "a", 5, 1)
        m = store.commit({"memory": store.put_file(tmp_path / "a", chunk_size=CS)[0]})
        store.remove(m.id)
        _age_all(store)
        r = store.gc(grace_seconds=0, dry_run=True)
        assert set(r.chunks_doomed) == set(m.chunks) and len(_packs(store)) == 1


def _writer(store_root: Path, file: Path, mode: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.store._writer", str(store_root), str(file), mode],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), **env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_gc_racing_a_writer_keeps_its_new_pack_and_the_old_pack_it_claimed(tmp_path):
    """A writer (another process) has put a file whose chunks are half in an old,
    unreferenced pack (claimed: the pack's mtime) and half new (its own pack); gc with
    no grace runs before its commit: both packs stay, the commit reads back."""
    root = tmp_path / "store"
    old_src, src = tmp_path / "old", tmp_path / "new"
    old = _random_file(old_src, 80, 1, BIG_CS)
    with ChunkStore(root) as store:
        m0 = store.commit({"disk": store.put_file(old_src, chunk_size=BIG_CS)[0]})
        store.remove(m0.id)
        (old_pack,) = _packs(store)
        _age(old_pack)
    data = old + random.Random(2).randbytes(80 * BIG_CS)
    src.write_bytes(data)
    w = _writer(root, src, "wait-commit")
    try:
        assert w.stdout.readline().strip() == "PUT"
        with ChunkStore(root) as store:
            r = store.gc(grace_seconds=0)
            assert r.chunks_deleted == 0 and len(_packs(store)) == 2
        w.stdin.write("go\n")
        w.stdin.flush()
        sid = w.stdout.readline().strip()
        assert w.wait(timeout=60) == 0
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    with ChunkStore(root) as store:
        store.materialize(store.get(sid).artifacts["disk"], tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == data
        assert store.verify().ok


# -- hostile or damaged packs --------------------------------------------------------


def _forge(store: ChunkStore, frames: list[tuple[str, bytes]], entries: list) -> Path:
    """A pack holding ``frames`` back to back whose index (MAC'd with the store's key,
    as only a writer holding it could) says ``entries`` (hash, offset, length)."""
    name = pk.new_name()
    body = pk.MAGIC + b"".join(f for _, f in frames)
    tail = pk.encode_tail(
        store._key, name, len(body), [(h, pk.Entry(o, n, None)) for h, o, n in entries]
    )
    path = store.packs_dir / f"{name}.pack"
    path.write_bytes(body + tail)
    return path


def _two_chunks(rng: random.Random) -> list[tuple[str, bytes, bytes]]:
    out = []
    for _ in range(2):
        data = rng.randbytes(CS)
        out.append((ck.hash_bytes(data), data, ck.compress_chunk(data)))
    return out


def _artifact(hashes: list[str]) -> Artifact:
    return Artifact(len(hashes) * CS, CS, tuple(hashes))


@pytest.mark.parametrize("lie", ["past_end", "overlap", "wrong_hash", "truncated", "bad_mac"])
def test_a_pack_whose_index_lies_is_a_corrupt_chunk_error_naming_it(tmp_path, lie):
    rng = random.Random(7)
    (h1, d1, f1), (h2, d2, f2) = _two_chunks(rng)
    with ChunkStore(tmp_path / "store") as store:
        # the good pack first: the snapshot commits, and reads back
        good = _forge(
            store,
            [(h1, f1), (h2, f2)],
            [(h1, len(pk.MAGIC), len(f1)), (h2, len(pk.MAGIC) + len(f1), len(f2))],
        )
        art = _artifact([h1, h2])
        m = store.commit({"memory": art})
        store.materialize(art, tmp_path / "ok", durable=False)
        assert (tmp_path / "ok").read_bytes() == d1 + d2
        good.unlink()
    off2 = len(pk.MAGIC) + len(f1)
    if lie == "past_end":
        entries = [(h1, len(pk.MAGIC), len(f1)), (h2, off2, len(f2) + 10_000)]
    elif lie == "overlap":
        entries = [(h1, len(pk.MAGIC), len(f1)), (h2, len(pk.MAGIC) + 5, len(f2))]
    elif lie == "wrong_hash":  # each hash points at the other's frame
        entries = [(h1, off2, len(f2)), (h2, len(pk.MAGIC), len(f1))]
    else:
        entries = [(h1, len(pk.MAGIC), len(f1)), (h2, off2, len(f2))]
    # a new process view (no cached index): the damaged pack is read from disk
    pk._maps.clear()
    with ChunkStore(tmp_path / "store") as store:
        bad = _forge(store, [(h1, f1), (h2, f2)], entries)
        raw = bad.read_bytes()
        if lie == "truncated":
            bad.write_bytes(raw[: len(raw) - 50])
        elif lie == "bad_mac":
            i = len(raw) - pk.TRAILER_LEN - 5  # a byte of the index
            bad.write_bytes(raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1 :])
        dest = tmp_path / "back"
        with pytest.raises(ChunkCorruptError) as e:
            store.materialize(store.get(m.id).artifacts["memory"], dest)
        assert bad.name in str(e.value)
        assert not dest.exists()
        with pytest.raises(ChunkCorruptError):
            store.read_range(art, 0, 2 * CS)
        v = store.verify()
        assert not v.ok
        if lie == "wrong_hash":
            assert set(v.corrupt) == {h1, h2}
        else:
            assert [n for n, _ in v.bad_packs] == [bad.name]
        # gc never deletes what a refused pack may hold
        _age(bad)
        store.remove(m.id)
        store.gc(grace_seconds=0)
        assert bad.exists() or lie == "wrong_hash"
        bad.unlink(missing_ok=True)


def test_a_pack_truncated_after_its_index_was_loaded_reads_as_corrupt(tmp_path):
    src = tmp_path / "ram"
    _random_file(src, 80, 3, BIG_CS)
    with ChunkStore(tmp_path / "store") as store:
        art, _ = store.put_file(src, chunk_size=BIG_CS)
        store.commit({"memory": art})
        (p,) = _packs(store)
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)  # the index stays cached in this process
        with pytest.raises(ChunkCorruptError) as e:
            store.materialize(art, tmp_path / "back")
        assert p.name in str(e.value)


# -- crashes and a full disk ---------------------------------------------------------


def test_kill9_mid_pack_write_lists_nothing_and_the_next_put_works(tmp_path):
    root = tmp_path / "store"
    src = tmp_path / "ram"
    data = _random_file(src, 300, 4, BIG_CS)
    w = _writer(root, src, "wait-commit", **{FAILPOINTS_ENV: "store.chunk_write=kill@280"})
    out, _ = w.communicate(timeout=120)
    assert w.returncode == -9 and "PUT" not in out
    with ChunkStore(root) as store:
        assert store.list() == []
        assert store.verify().ok  # packs named before the kill are whole
        art, _ = store.put_file(src, chunk_size=BIG_CS)
        m = store.commit({"memory": art})
        store.materialize(store.get(m.id).artifacts["memory"], tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == data
        for p in store.tmp_dir.iterdir():
            _age(p)
        store.gc(grace_seconds=0)
        assert not stray_temps(store.tmp_dir) and store.verify().ok


@pytest.mark.parametrize("after", [1, 40])
def test_enospc_mid_pack_lists_nothing_and_a_retry_works(tmp_path, after):
    src = tmp_path / "file"
    data = _random_file(src, 48, after)
    with ChunkStore(tmp_path / "store", threads=2) as store:
        store.pack_min_chunks = 1
        failpoints.enable("store.chunk_write", "enospc", after=after)
        try:
            with pytest.raises(TorporError) as e:
                art, _ = store.put_file(src, chunk_size=CS)
                store.commit({"memory": art})
            assert "No space left" in str(e.value)
        finally:
            failpoints.disable()
        assert store.list() == [] and not _packs(store)
        assert not list(store.tmp_dir.iterdir())
        art, _ = store.put_file(src, chunk_size=CS)
        m = store.commit({"memory": art})
        store.materialize(store.get(m.id).artifacts["memory"], tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == data
        assert store.verify().ok


def test_a_failed_pack_write_is_dropped_only_after_its_other_writes_end(tmp_path, monkeypatch):
    """The seal of a pack whose first frame write failed closed the pack's file while
    its other writes were still running on the sync threads: they hit a closed
    descriptor (CI: a staging buffer left exported) or, once the number was reused, a
    stranger's file."""
    import errno
    import threading

    real = pk.PackWriter.write
    seen: list[str] = []
    first = threading.Event()

    def write(self, placed):
        if not first.is_set():
            first.set()
            raise OSError(errno.EIO, "injected")
        time.sleep(0.3)  # still writing when the failure is noticed
        try:
            return real(self, placed)
        except OSError as e:
            seen.append(errno.errorcode.get(e.errno or 0, str(e)))
            raise

    monkeypatch.setattr(pk.PackWriter, "write", write)
    src = tmp_path / "file"
    _random_file(src, 4 * store_mod.PACK_WRITE_GROUP, 7)
    with ChunkStore(tmp_path / "store", threads=2) as store:
        store.pack_min_chunks = 1
        with pytest.raises(TorporError, match="injected"):
            store.put_file(src, chunk_size=CS)
        assert seen == [], seen
        assert not _packs(store) and not list(store.tmp_dir.iterdir())


def test_an_older_store_is_marked_as_holding_packs_before_its_first_pack(tmp_path):
    """An older torpor takes packed chunks for missing ones: a store gets the packs
    format (which it refuses at open) before its first pack is named, and stays
    readable here either way."""
    root = tmp_path / "store"
    with ChunkStore(root) as store:
        store.pack_min_chunks = None
        _random_file(tmp_path / "a", 3, 1)
        ma = store.commit({"memory": store.put_file(tmp_path / "a", chunk_size=CS)[0]})
    (root / "FORMAT").write_bytes(b"torpor-store 1\n")  # as an older torpor left it
    with ChunkStore(root) as store:
        store.pack_min_chunks = None
        store.commit({"memory": store.put_file(tmp_path / "a", chunk_size=CS)[0]})
        assert (root / "FORMAT").read_bytes() == b"torpor-store 1\n"  # no pack: unchanged
        store.pack_min_chunks = 1
        data = _random_file(tmp_path / "b", 3, 2)
        mb = store.commit({"memory": store.put_file(tmp_path / "b", chunk_size=CS)[0]})
        assert (root / "FORMAT").read_bytes() == b"torpor-store 1+packs\n"
        assert _packs(store)
    with ChunkStore(root) as store:
        store.materialize(store.get(mb.id).artifacts["memory"], tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == data and store.get(ma.id)


# -- packs named by another process while this one reads ------------------------------


def _pack_elsewhere(store: ChunkStore, seed: int) -> tuple[str, bytes]:
    """A chunk in a pack another process named: on disk, unknown to this process's map."""
    data = random.Random(seed).randbytes(CS)
    h = ck.hash_bytes(data)
    pk.write_pack(store._key, store.tmp_dir, store.packs_dir, [(h, ck.compress_chunk(data))])
    return h, data


def test_a_pack_another_thread_found_first_is_read_not_missing(tmp_path, monkeypatch):
    """A restore reads chunks on many threads: two miss a pack another process has just
    named, one lists ``packs/`` and adds it, and the other's own listing then finds
    nothing new.  That one must look again, not call the chunk missing (CI: a session's
    recovery failed with ChunkMissingError for a chunk of the checkpoint its worker had
    just committed into a new pack)."""
    with ChunkStore(tmp_path / "store") as store:
        pm = store._packs
        pm.refresh()
        read_h, read_data = _pack_elsewhere(store, 5)
        has_h, _ = _pack_elsewhere(store, 6)
        real_get = pm.get

        def get(h: str):
            hit = real_get(h)
            if hit is None:
                pm.refresh()  # another thread's listing, between this lookup and ours
            return hit

        monkeypatch.setattr(pm, "get", get)
        assert store._read_chunk(read_h, CS) == read_data
        assert store.has_chunk(has_h)
