"""The local store's ``gc(dry_run=True)`` deletes nothing and names exactly what a real
gc then deletes (``torpor gc --dry-run``; the bucket's side is in test_s3_packs_gc)."""

from __future__ import annotations

import random
from pathlib import Path

from tests.store.conftest import chunk_files
from torpor.store import ChunkStore


def test_a_dry_run_lists_what_gc_then_deletes_and_deletes_nothing(tmp_path: Path) -> None:
    cs = 64 * 1024
    rng = random.Random(6)
    (tmp_path / "gone").write_bytes(rng.randbytes(5 * cs))
    (tmp_path / "kept").write_bytes(rng.randbytes(3 * cs))
    with ChunkStore(tmp_path / "store") as store:
        gone, _ = store.put_file(tmp_path / "gone", chunk_size=cs)
        s1 = store.commit({"f": gone})
        kept, _ = store.put_file(tmp_path / "kept", chunk_size=cs)
        store.commit({"f": kept})
        store.remove(s1.id)
        before = chunk_files(store)
        dry = store.gc(grace_seconds=0, dry_run=True)
        assert dry.dry_run and chunk_files(store) == before
        assert set(dry.chunks_doomed) == set(gone.stored) and dry.chunks_deleted == 5
        real = store.gc(grace_seconds=0)
        assert not real.dry_run and set(real.chunks_doomed) == set(dry.chunks_doomed)
        assert real.bytes_freed == dry.bytes_freed > 0
        assert chunk_files(store) == set(kept.stored)
        assert store.verify().ok
