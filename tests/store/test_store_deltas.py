"""Delta chunks: a new version of a chunk is stored against the previous version's
anchor when that is much smaller, and read back, verified and gc'd through it."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.store.conftest import KiB, chunk_files, same_content
from torpor.store import ChunkMissingError, ChunkStore
from torpor.store import chunks as ck

CS = 64 * KiB


def _base(store: ChunkStore, h: str) -> str | None:
    return ck.delta_base(store.chunk_path(h).read_bytes())


def _generation(store: ChunkStore, work: Path, parent, rng: random.Random, n: int = 1):
    """Change ``n`` small spots of chunk 1 in ``work``, snapshot it on ``parent``."""
    with open(work, "r+b") as f:
        for _ in range(n):
            f.seek(CS + rng.randrange(CS - 64))
            f.write(rng.randbytes(64))
    art, stats = store.put_file(
        work, chunk_size=CS, parent=parent.artifacts["m"] if parent else None
    )
    return store.commit({"m": art}, parent=parent.id if parent else None), stats


def _two_generations(store: ChunkStore, tmp_path: Path, rng: random.Random):
    """A file, a snapshot of it, a small change, a snapshot on the first: chunk 1 of
    the second is a delta of chunk 1 of the first (its anchor)."""
    work = tmp_path / "ram"
    work.write_bytes(rng.randbytes(2 * CS))
    first, _ = _generation(store, work, None, rng)
    second, _ = _generation(store, work, first, rng)
    anchor, delta = first.artifacts["m"].chunks[1], second.artifacts["m"].chunks[1]
    assert _base(store, delta) == anchor
    return work, first, second, anchor, delta


def test_small_changes_are_stored_as_one_link_deltas(store: ChunkStore, tmp_path: Path):
    rng = random.Random(7)
    work = tmp_path / "ram"
    work.write_bytes(rng.randbytes(4 * CS))
    first, _ = _generation(store, work, None, rng)
    anchor = first.artifacts["m"].chunks[1]
    assert _base(store, anchor) is None  # nothing to be a delta of: plain
    snaps, digests = [first], [work.read_bytes()]
    for _ in range(5):
        m, stats = _generation(store, work, snaps[-1], rng)
        h = m.artifacts["m"].chunks[1]
        assert stats.chunks_new == 1
        assert stats.bytes_stored < CS // 8  # 64 random bytes changed, not 64 KiB stored
        assert _base(store, h) == anchor  # against the plain anchor, never a delta
        snaps.append(m)
        digests.append(work.read_bytes())
    for i, (m, want) in enumerate(zip(snaps, digests, strict=True)):
        out = tmp_path / f"out{i}"
        store.materialize(m.artifacts["m"], out)
        assert out.read_bytes() == want
        assert store.read_range(m.artifacts["m"], CS + 10, 100) == want[CS + 10 : CS + 110]
    assert store.verify().ok


def test_a_rewritten_chunk_is_stored_plain_and_becomes_the_anchor(
    store: ChunkStore, tmp_path: Path
):
    rng = random.Random(8)
    work = tmp_path / "ram"
    work.write_bytes(rng.randbytes(2 * CS))
    first, _ = _generation(store, work, None, rng)
    with open(work, "r+b") as f:
        f.seek(CS)
        f.write(rng.randbytes(CS))  # nothing in common with the previous version
    second, _ = _generation(store, work, first, rng, n=0)
    new_anchor = second.artifacts["m"].chunks[1]
    assert _base(store, new_anchor) is None
    third, _ = _generation(store, work, second, rng)
    assert _base(store, third.artifacts["m"].chunks[1]) == new_anchor


def test_gc_keeps_a_kept_deltas_base_and_drops_it_with_the_delta(store: ChunkStore, tmp_path: Path):
    work, first, second, anchor, _ = _two_generations(store, tmp_path, random.Random(9))
    store.remove(first.id, force=True)
    store.gc(grace_seconds=0)
    assert anchor in chunk_files(store)  # no manifest names it, but a kept delta needs it
    out = tmp_path / "out"
    store.materialize(store.get(second.id).artifacts["m"], out)
    assert same_content(out, work)
    store.remove(second.id)
    store.gc(grace_seconds=0)
    assert chunk_files(store) == set()


def test_a_missing_or_damaged_base_is_reported_and_never_read_as_data(
    store: ChunkStore, tmp_path: Path
):
    rng = random.Random(10)
    _, _, second, anchor, delta = _two_generations(store, tmp_path, rng)
    frame = store.chunk_path(anchor).read_bytes()

    store.chunk_path(anchor).write_bytes(ck.compress_chunk(rng.randbytes(CS)))  # damaged
    report = store.verify()
    assert anchor in report.corrupt and delta in report.corrupt
    assert delta in report.affected[second.id]

    os.unlink(store.chunk_path(anchor))  # gone
    report = store.verify()
    assert anchor in report.missing and delta in report.corrupt
    with pytest.raises(ChunkMissingError):
        store.materialize(second.artifacts["m"], tmp_path / "never")
    assert not (tmp_path / "never").exists()

    store.chunk_path(anchor).write_bytes(frame)  # put back: whole again
    assert store.verify().ok


def test_a_delta_whose_base_is_itself_a_delta_still_reads(store: ChunkStore, tmp_path: Path):
    """Two writers racing on one new chunk can leave a base stored as a delta."""
    rng = random.Random(11)
    a = rng.randbytes(CS)
    b = a[:100] + rng.randbytes(50) + a[150:]
    c = b[:1000] + rng.randbytes(50) + b[1050:]
    ha, hb, hc = (ck.hash_bytes(x) for x in (a, b, c))
    for h, frame in (
        (ha, ck.compress_chunk(a)),
        (hb, ck.compress_delta(b, ha, a)),
        (hc, ck.compress_delta(c, hb, b)),  # a delta of a delta
    ):
        store.chunk_path(h).parent.mkdir(parents=True, exist_ok=True)
        store.chunk_path(h).write_bytes(frame)
    assert store._read_chunk(hc, CS) == c
    store.chunk_path(ha).write_bytes(ck.compress_delta(a, hc, c))  # a loop: never readable
    assert store._read_chunk(hc, CS) == "corrupt"
