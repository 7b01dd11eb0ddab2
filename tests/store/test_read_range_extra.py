"""``ChunkStore.read_range(extra=...)``: chunks a store does not have yet (a checkpoint
still journaled, which a lazy restore serves before its commit) are read from the map;
everything else from the store, hash-checked; a map entry of the wrong size is not
used, and a chunk in neither is missing, never zeros."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from torpor.errors import ChunkMissingError
from torpor.store.store import ChunkStore

CS = 64 * 1024


def test_read_range_takes_chunks_the_store_lacks_from_extra(tmp_path: Path) -> None:
    rng = random.Random(13)
    data = rng.randbytes(2 * CS) + bytes(CS) + rng.randbytes(CS + 100)
    src = tmp_path / "f"
    src.write_bytes(data)
    with ChunkStore(tmp_path / "a") as a:
        art, _ = a.put_file(src, chunk_size=CS)
    # another store holding only chunk 0 (and 2 is zeros): 1, 3 and 4 come from the map
    with ChunkStore(tmp_path / "b") as b:
        part = tmp_path / "part"
        part.write_bytes(data[:CS])
        b.put_file(part, chunk_size=CS)
        spans = {i: art.span(i) for i in (1, 3, 4)}
        extra = {art.chunks[i]: data[o : o + n] for i, (o, n) in spans.items()}
        assert b.read_range(art, 0, len(data), extra=extra) == data
        assert b.read_range(art, CS - 7, 2 * CS + 9, extra=extra) == data[CS - 7 : 3 * CS + 2]
        del extra[art.chunks[4]]
        with pytest.raises(ChunkMissingError):  # chunk 4 (the short last one): nowhere
            b.read_range(art, 4 * CS, 10, extra=extra)
        bad = dict(extra)
        bad[art.chunks[1]] = data[CS : 2 * CS - 1]  # the wrong size: not used
        with pytest.raises(ChunkMissingError):
            b.read_range(art, CS, 10, extra=bad)
