"""Layering: a snapshot of something restored from P stores only what changed since P."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from tests.store.conftest import KiB, MiB, chunk_files
from torpor.errors import UsageError
from torpor.store import ChunkMissingError, ChunkStore

CS = 64 * KiB


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_five_generations_store_only_their_delta(store: ChunkStore, tmp_path: Path):
    rng = random.Random(5)
    n_chunks = 64
    work = tmp_path / "ram"
    work.write_bytes(rng.randbytes(n_chunks * CS - 1000))  # odd size: short last chunk
    art, stats = store.put_file(work, chunk_size=CS)
    assert stats.chunks_new == n_chunks
    m = store.commit({"memory": art}, meta={"gen": "0"})
    history = [(m.id, _sha(work))]

    for gen in range(1, 6):
        # Restore the parent, change a few chunks, snapshot it again with the parent.
        work = tmp_path / f"ram{gen}"
        store.materialize(store.get(m.id).artifacts["memory"], work)
        changed = rng.sample(range(n_chunks - 1), gen + 1)
        with open(work, "r+b") as f:
            for i in changed[:-1]:
                f.seek(i * CS + rng.randrange(CS - 100))
                f.write(rng.randbytes(100))
            f.seek(changed[-1] * CS)
            f.write(bytes(CS))  # one chunk becomes all zeros: stored as nothing
        before = chunk_files(store)
        art, stats = store.put_file(work, chunk_size=CS, parent=m.artifacts["memory"])
        m = store.commit({"memory": art}, parent=m.id, meta={"gen": str(gen)})
        history.append((m.id, _sha(work)))

        assert stats.chunks_new == gen, stats
        assert len(chunk_files(store) - before) == gen
        assert stats.bytes_stored <= gen * (CS + 512)  # random data: ~ incompressible
        assert art.chunks[changed[-1]] is None
        unchanged = set(range(n_chunks)) - set(changed)
        assert all(art.chunks[i] == m_parent for i, m_parent in _pairs(store, m, unchanged))

    # Every generation still restores to exactly what it was.
    for i, (snap_id, digest) in enumerate(history):
        out = tmp_path / f"check{i}"
        store.materialize(store.get(snap_id).artifacts["memory"], out)
        assert _sha(out) == digest
    assert [x.meta["gen"] for x in store.list()] == [str(i) for i in range(6)]
    assert store.verify().ok


def _pairs(store: ChunkStore, m, indexes):
    parent = store.get(m.parent).artifacts["memory"]
    return [(i, parent.chunks[i]) for i in indexes]


def test_dirty_fast_path_reads_only_dirty_chunks(store: ChunkStore, tmp_path: Path):
    rng = random.Random(6)
    src = tmp_path / "ram"
    src.write_bytes(rng.randbytes(32 * CS))
    base, _ = store.put_file(src, chunk_size=CS)
    p = store.commit({"memory": base})
    with open(src, "r+b") as f:
        for i in (3, 17):
            f.seek(i * CS + 5)
            f.write(b"changed!")
    art, stats = store.put_file(src, chunk_size=CS, parent=base, dirty=[3, 17])
    assert stats.bytes_read == 2 * CS
    assert stats.chunks_skipped == 30 and stats.chunks_new == 2
    full, _ = store.put_file(src, chunk_size=CS, parent=base)
    assert art == full  # same result as reading everything
    m = store.commit({"memory": art}, parent=p.id)
    out = tmp_path / "out"
    store.materialize(m.artifacts["memory"], out)
    assert out.read_bytes() == src.read_bytes()


def test_dirty_path_with_grown_file_reads_new_tail(store: ChunkStore, tmp_path: Path):
    rng = random.Random(61)
    src = tmp_path / "f"
    src.write_bytes(rng.randbytes(4 * CS + 10))
    base, _ = store.put_file(src, chunk_size=CS)
    with open(src, "ab") as f:
        f.write(rng.randbytes(CS))
    art, stats = store.put_file(src, chunk_size=CS, parent=base, dirty=[])
    # chunks 0-3 are identical spans and clean; 4 changed length, 5 is new.
    assert stats.chunks_skipped == 4 and stats.bytes_read == CS + 10
    out = tmp_path / "out"
    store.materialize(art, out)
    assert out.read_bytes() == src.read_bytes()


def test_dirty_path_needs_parent_chunks(store: ChunkStore, tmp_path: Path):
    src = tmp_path / "f"
    src.write_bytes(os.urandom(4 * CS))
    base, _ = store.put_file(src, chunk_size=CS)
    store.commit({"memory": base})
    os.unlink(store.chunk_path(base.chunks[2]))
    with pytest.raises(ChunkMissingError) as ei:
        store.put_file(src, chunk_size=CS, parent=base, dirty=[0])
    assert base.chunks[2] in str(ei.value)
    with pytest.raises(UsageError):
        store.put_file(src, chunk_size=CS, dirty=[0])
    with pytest.raises(UsageError):
        store.put_file(src, chunk_size=2 * CS, parent=base, dirty=[0])


def test_parent_chunk_missing_from_store_is_rewritten(store: ChunkStore, tmp_path: Path):
    src = tmp_path / "f"
    src.write_bytes(os.urandom(4 * CS))
    base, _ = store.put_file(src, chunk_size=CS)
    store.commit({"memory": base})
    os.unlink(store.chunk_path(base.chunks[1]))
    art, stats = store.put_file(src, chunk_size=CS, parent=base)
    assert art == base and stats.chunks_new == 1
    assert store.verify().ok


def test_large_parent_layer_counts(store: ChunkStore, tmp_path: Path):
    """A 16 MiB file with default chunks: one changed page → one new chunk."""
    src = tmp_path / "ram"
    src.write_bytes(os.urandom(16 * MiB))
    base, _ = store.put_file(src)
    with open(src, "r+b") as f:
        f.seek(5 * MiB + 4096)
        f.write(os.urandom(4096))
    art, stats = store.put_file(src, parent=base)
    assert stats.chunks_new == 1 and stats.chunks_reused == 63
    assert sum(a != b for a, b in zip(art.chunks, base.chunks, strict=True)) == 1
