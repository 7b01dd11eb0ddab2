"""The combined pack index (``packs/index``, torpor/store/packs.py): lookups through it
equal the packs' own indexes; a missing, truncated, bit-flipped, foreign, stale or lying
one still gives correct answers (the packs are read one by one) and ``verify`` names a
damaged one; writers and gc racing each other never lose a pack from the lookups."""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torpor.store import ChunkStore
from torpor.store import packs as pk

CS = 4096
REPO = Path(__file__).resolve().parents[2]


def _fresh(packs_dir: Path, key: bytes) -> pk.PackMap:
    """A new process's view (no cached index), no background rewrite."""
    return pk.PackMap(packs_dir, key, rebuild_after=None)


def _truth(packs_dir: Path, key: bytes) -> dict[str, set[tuple[str, pk.Entry]]]:
    """chunk -> every (pack, entry) the listed packs' own indexes say."""
    out: dict[str, set[tuple[str, pk.Entry]]] = {}
    for p in packs_dir.glob("*.pack"):
        fd = os.open(p, os.O_RDONLY)
        try:
            entries = pk.read_index(key, p.stem, fd)
        finally:
            os.close(fd)
        for h, e in entries.items():
            out.setdefault(h, set()).add((p.stem, e))
    return out


def _assert_same(m: pk.PackMap, truth: dict, absent: list[str]) -> None:
    for h, where in truth.items():
        assert m.get(h) in where, h
    for h in absent:
        assert m.get(h) is None


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(1, 150), st.integers(0, 20)),
            st.tuples(st.just("collide"), st.integers(1, 100), st.integers(0, 3)),
            st.tuples(st.just("gc"), st.integers(0, 1000), st.just(0)),
            st.tuples(st.just("rebuild"), st.just(0), st.just(0)),
        ),
        min_size=1,
        max_size=14,
    ),
    seed=st.integers(0, 2**32),
)
def test_lookups_equal_the_packs_own_indexes(tmp_path_factory, ops, seed):
    """Random packs (some chunks in several packs), packs deleted as gc does, the index
    rewritten at random points: a new process's lookups and those of a process that
    kept its map across the changes equal what the packs' own indexes say."""
    tmp = tmp_path_factory.mktemp("pidx")
    packs_dir, tmp_dir = tmp / "packs", tmp / "tmp"
    packs_dir.mkdir()
    tmp_dir.mkdir()
    key = secrets.token_bytes(32)
    rnd = random.Random(seed)
    known: list[str] = []
    held = pk.PackMap(packs_dir, key, rebuild_after=None)
    for op, a, b in ops:
        if op == "add":
            hs = [rnd.randbytes(32).hex() for _ in range(a)]
            hs += rnd.sample(known, min(b, len(known)))  # duplicates across packs
        if op == "collide":  # hashes sharing a 4-byte prefix, across blocks and packs
            op = "add"
            hs = [(bytes([0, 0, b, 7]) + rnd.randbytes(28)).hex() for _ in range(a)]
        if op == "add":
            known += hs
            items = [(h, b"\x00" * rnd.randrange(1, 300)) for h in dict.fromkeys(hs)]
            pk.write_pack(key, tmp_dir, packs_dir, items)
        elif op == "gc":
            packs = sorted(packs_dir.glob("*.pack"))
            if packs:
                packs[a % len(packs)].unlink()
                held.refresh()  # as gc's map: it forgets what it deleted
        else:
            m = _fresh(packs_dir, key)
            m.refresh()
            m.rebuild()
        held.refresh()
    truth = _truth(packs_dir, key)
    absent = [rnd.randbytes(32).hex() for _ in range(50)]
    absent += [h for h in known if h not in truth]
    absent += [(bytes([0, 0, b, 7]) + rnd.randbytes(28)).hex() for b in range(4) for _ in range(5)]
    _assert_same(_fresh(packs_dir, key), truth, absent)
    _assert_same(held, truth, absent)
    fresh = _fresh(packs_dir, key)
    fresh.refresh()
    fresh.rebuild()  # and a rewrite from a map built on a stale index
    _assert_same(_fresh(packs_dir, key), truth, absent)


# -- a damaged, foreign, stale or lying combined index --------------------------------------


def _store_with_packs(tmp: Path, n: int = 5) -> tuple[Path, list[tuple[str, bytes]]]:
    """A store holding ``n`` snapshots, each in its own pack, and the combined index."""
    root = tmp / "store"
    snaps = []
    with ChunkStore(root, threads=2) as s:
        s.pack_min_chunks = 1
        for i in range(n):
            data = random.Random(i).randbytes(40 * CS)
            (tmp / "src").write_bytes(data)
            m = s.commit({"memory": s.put_file(tmp / "src", chunk_size=CS)[0]})
            snaps.append((m.id, data))
        s._packs.refresh()
        s._packs.rebuild()
    assert len(list((root / "packs").glob("*.pack"))) == n
    return root, snaps


def _new_process(root: Path) -> ChunkStore:
    """A store as a new process opens it, whose map does not rewrite the index on its
    own (so the test sees what a process finds, not what it repaired)."""
    pk._maps.clear()
    key = (root / "key").read_bytes()
    pk._maps[(os.path.realpath(root / "packs"), key)] = _fresh(root / "packs", key)
    return ChunkStore(root, threads=2)


def _reads_back(root: Path, snaps: list[tuple[str, bytes]], tmp: Path) -> ChunkStore:
    s = _new_process(root)
    for sid, data in snaps:
        art = s.get(sid).artifacts["memory"]
        assert s.has_chunk(art.chunks[0])
        s.materialize(art, tmp / "back", durable=False)
        assert (tmp / "back").read_bytes() == data
        assert not s._absent(art.chunks)
    return s


def _rewrite(root: Path, key: bytes, change) -> None:
    """Rewrite the combined index, MAC'd with ``key``, its records changed by ``change``."""
    idx = root / "packs" / pk.INDEX_NAME
    fd = os.open(idx, os.O_RDONLY)
    try:
        ci = pk.CombinedIndex(key, fd)
    finally:
        os.close(fd)
    records = []
    for b in range(ci.nblocks):
        data = ci._block(b)
        records += [data[i : i + pk._IREC.size] for i in range(0, len(data), pk._IREC.size)]
    packs = list(zip(ci.names, ci.trailers, strict=True))
    ci.close()
    idx.write_bytes(pk.encode_combined(key, packs, pk.sort_records(change(records))))


def _lie_offset(records: list[bytes]) -> list[bytes]:
    """Two entries of one pack swap places: each hash points at the other's frame."""
    h1, p1, o1, n1, b1 = pk._IREC.unpack(records[0])
    j = next(i for i, r in enumerate(records[1:], 1) if pk._IREC.unpack(r)[1] == p1)
    h2, _p2, o2, n2, b2 = pk._IREC.unpack(records[j])
    records[0] = pk._IREC.pack(h1, p1, o2, n2, b1)
    records[j] = pk._IREC.pack(h2, p1, o1, n1, b2)
    return records


@pytest.mark.parametrize(
    "damage",
    [
        "missing",
        "truncated",
        "flip_head",
        "flip_block",
        "other_store",
        "pack_added",
        "pack_gcd",
        "lies",
        "omits",
        "pack_replaced",
    ],
)
def test_a_bad_or_stale_combined_index_still_gives_correct_answers(tmp_path, damage):
    root, snaps = _store_with_packs(tmp_path)
    idx = root / "packs" / pk.INDEX_NAME
    key = (root / "key").read_bytes()
    raw = idx.read_bytes()
    damaged = damage in ("truncated", "flip_head", "flip_block", "lies", "other_store", "omits")
    if damage == "missing":
        idx.unlink()
    elif damage == "truncated":
        idx.write_bytes(raw[: len(raw) - 100])
    elif damage == "flip_head":
        i = len(pk.INDEX_MAGIC) + 20  # in the pack table
        idx.write_bytes(raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1 :])
    elif damage == "flip_block":
        i = len(raw) - 10  # in the last block's entries
        idx.write_bytes(raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1 :])
    elif damage == "other_store":
        other, _ = _store_with_packs(tmp_path / "other", 1)
        idx.write_bytes((other / "packs" / pk.INDEX_NAME).read_bytes())
    elif damage == "pack_added":
        with ChunkStore(root) as s:
            s.pack_min_chunks = 1
            data = random.Random(99).randbytes(40 * CS)
            (tmp_path / "src").write_bytes(data)
            snaps.append(
                (s.commit({"memory": s.put_file(tmp_path / "src", chunk_size=CS)[0]}).id, data)
            )
    elif damage == "pack_gcd":
        with ChunkStore(root) as s:
            s.remove(snaps.pop(0)[0])
            for p in (root / "packs").glob("*.pack"):
                t = p.stat().st_mtime - 3600
                os.utime(p, (t, t))
            idx_before = idx.read_bytes()
            assert s.gc(grace_seconds=0).local_packs_deleted == 1
        idx.write_bytes(idx_before)  # the index from before gc: names a deleted pack
    elif damage == "lies":  # MAC'd with the store's key (a bug of ours), but wrong
        _rewrite(root, key, _lie_offset)
    elif damage == "omits":
        _rewrite(root, key, lambda rs: rs[1:])
    else:  # a pack it covers replaced by another pack of the same name and size
        with ChunkStore(root) as s0:
            h0 = s0.get(snaps[0][0]).artifacts["memory"].chunks[0]
        pack = root / "packs" / f"{_fresh(root / 'packs', key).get(h0)[0]}.pack"
        body = bytearray(pack.read_bytes())
        body[-pk.TRAILER_LEN] ^= 1  # the trailer no longer matches (nor its MAC)
        pack.write_bytes(bytes(body))
        damaged = False
    s = _reads_back(root, snaps, tmp_path) if damage != "pack_replaced" else None
    if damage == "pack_replaced":
        s = _new_process(root)
        first = s.get(snaps[0][0]).artifacts["memory"]
        m = s._packs
        # the replaced pack is refused whole, as without the combined index
        assert any(m.get(h) is None for h in first.chunks) or m.bad
        assert m.bad
    v = s.verify()
    names = [n for n, _ in v.bad_packs]
    assert (pk.INDEX_NAME in names) == damaged, v.bad_packs
    if damage != "pack_replaced":
        assert v.ok == (not damaged), v
        s.gc()  # rewrites it: whole again
        assert s.verify().ok
        _reads_back(root, snaps, tmp_path).close()
    s.close()


def test_a_writer_rewrites_the_index_once_packs_pile_up_and_the_next_process_uses_it(
    tmp_path,
):
    """No index and REBUILD_AFTER packs: a reader writes nothing; the next writer to
    name a pack writes one in the background (temp in tmp/, renamed into packs/,
    private) covering every pack; a new process then reads no pack's own index."""
    root, snaps = _store_with_packs(tmp_path, pk.REBUILD_AFTER - 1)
    idx = root / "packs" / pk.INDEX_NAME
    idx.unlink()
    _reads_back(root, snaps, tmp_path).close()
    assert not idx.exists()
    pk._maps.clear()
    with ChunkStore(root, threads=2) as s:
        s.pack_min_chunks = 1
        data = random.Random(99).randbytes(40 * CS)
        (tmp_path / "src").write_bytes(data)
        snaps.append(
            (s.commit({"memory": s.put_file(tmp_path / "src", chunk_size=CS)[0]}).id, data)
        )
        m = s._packs
        deadline = time.monotonic() + 30  # a background thread: wait for it
        while m._rebuilding and time.monotonic() < deadline:
            time.sleep(0.01)
    assert idx.exists() and (idx.stat().st_mode & 0o777) == 0o600
    assert not list((root / "tmp").iterdir())
    fresh = _fresh(root / "packs", (root / "key").read_bytes())
    fresh.refresh()
    assert fresh.combined is not None and not fresh.members
    assert fresh.covered == {p.stem for p in (root / "packs").glob("*.pack")}
    _reads_back(root, snaps, tmp_path).close()


# -- writers and gc at once ---------------------------------------------------------------

_WRITER = """
import random, sys
from pathlib import Path
from torpor.store import ChunkStore
root, tag, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = ChunkStore(root, threads=1)
s.pack_min_chunks = 1
for r in range(rounds):
    seed = tag * 1000 + r
    src = root.parent / f"src{seed}"
    src.write_bytes(random.Random(seed).randbytes(300 * 16384))
    m = s.commit({"memory": s.put_file(src, chunk_size=16384)[0]})
    print(m.id, seed, flush=True)
"""


def test_writers_and_gc_at_once_lose_no_pack_from_the_lookups(tmp_path):
    """Two processes each put and commit big files (a pack or more each) while this one
    runs gc (which rewrites the index) and rewrites the index itself: every committed
    snapshot reads back in a new process, and every chunk is found."""
    root = tmp_path / "store"
    ChunkStore(root).close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root), str(t), "4"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for t in (1, 2)
    ]
    try:
        with ChunkStore(root, threads=2) as s:
            while any(p.poll() is None for p in procs):
                s.gc(grace_seconds=0)
                pm = s._packs
                pm.refresh()
                pm.rebuild()
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)
    words = "".join(outs).split()
    pairs = list(zip(words[::2], words[1::2], strict=True))
    assert len(pairs) == 8
    pk._maps.clear()  # a new process; the last index written may be stale: still right
    with ChunkStore(root, threads=2) as s:
        for sid, seed in pairs:
            art = s.get(sid).artifacts["memory"]
            assert not s._absent(art.chunks)
            s.materialize(art, tmp_path / "back", durable=False)
            assert (tmp_path / "back").read_bytes() == random.Random(int(seed)).randbytes(
                300 * 16384
            )
        assert s.verify().ok


def test_an_index_that_swaps_an_entry_for_a_duplicate_is_reported_and_gc_repairs_it(tmp_path):
    """A MAC'd index (only a bug of our own writer could make one) whose entry count
    adds up but that lists one chunk twice and leaves another out: ``verify`` names it,
    and gc's rewrite makes every snapshot read back."""
    root, snaps = _store_with_packs(tmp_path, 3)
    key = (root / "key").read_bytes()

    def swap(records: list[bytes]) -> list[bytes]:
        return [records[1], *records[1:]]

    _rewrite(root, key, swap)
    with _new_process(root) as s:
        v = s.verify()
        assert [n for n, _ in v.bad_packs] == [pk.INDEX_NAME], v.bad_packs
        s.gc()
        assert s.verify().ok
    _reads_back(root, snaps, tmp_path).close()
