"""Round trips: put_file → commit → get → materialize / read_range give back the bytes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.store.conftest import KiB, MiB, chunk_files, same_content, write_sparse
from torpor.errors import UsageError
from torpor.store import Artifact, ChunkStore

CS = 64 * KiB


@pytest.mark.parametrize(
    "size",
    [0, 1, 4095, CS - 1, CS, CS + 1, 5 * CS + 777, 256 * KiB + 3],
)
@pytest.mark.parametrize("content", ["random", "zero", "mixed", "sparse"])
def test_roundtrip_odd_sizes(store: ChunkStore, tmp_path: Path, size: int, content: str):
    rng = random.Random(size)
    src = tmp_path / "src"
    if content == "random":
        src.write_bytes(rng.randbytes(size))
    elif content == "zero":
        src.write_bytes(bytes(size))
    elif content == "mixed":  # random, a zero run, random again
        third = size // 3
        src.write_bytes(rng.randbytes(third) + bytes(third) + rng.randbytes(size - 2 * third))
    else:
        write_sparse(src, size, [(size // 2, rng.randbytes(min(100, size - size // 2)))])
    art, stats = store.put_file(src, chunk_size=CS)
    assert art.size == size and stats.chunks_total == len(art.chunks)
    assert stats.chunks_zero + stats.chunks_new + stats.chunks_reused == stats.chunks_total
    if content == "zero":
        assert art.chunks == (None,) * len(art.chunks) and stats.bytes_stored == 0
    m = store.commit({"memory": art}, meta={"content": content})
    got = store.get(m.id)
    assert got == m and got.artifacts["memory"] == art
    out = tmp_path / "out"
    store.materialize(got.artifacts["memory"], out, name="memory")
    assert out.stat().st_size == size
    assert same_content(src, out)


def test_sparse_4gib_file_is_cheap_and_keeps_holes(store: ChunkStore, tmp_path: Path):
    rng = random.Random(4)
    size = 4 * 1024 * MiB
    regions = [
        (0, rng.randbytes(1 * MiB)),
        (1234 * MiB + 4097, rng.randbytes(2 * MiB)),
        (size - 300 * KiB, rng.randbytes(300 * KiB)),
    ]
    src = write_sparse(tmp_path / "disk.img", size, regions)
    art, stats = store.put_file(src)
    # Holes are skipped via SEEK_DATA: only chunks overlapping data are read.
    assert stats.bytes_read <= 5 * MiB, stats
    assert stats.chunks_total == size // (256 * KiB)
    assert stats.chunks_new <= 16
    m = store.commit({"disk": art})

    out = tmp_path / "restored.img"
    store.materialize(store.get(m.id).artifacts["disk"], out, name="disk")
    assert out.stat().st_size == size
    assert out.stat().st_blocks * 512 < 8 * MiB  # holes preserved
    with open(out, "rb") as f:
        for off, data in regions:
            f.seek(off)
            assert f.read(len(data)) == data
    # Whole-file equality, by hash, without reading 4 GiB of zeros twice: the restored
    # file chunks to exactly the same hashes (zero chunks included) in a fresh store.
    with ChunkStore(tmp_path / "other") as other:
        art2, _ = other.put_file(out)
    assert art2 == art


def test_read_range_across_chunk_boundaries(store: ChunkStore, tmp_path: Path):
    rng = random.Random(7)
    data = rng.randbytes(3 * CS) + bytes(2 * CS) + rng.randbytes(CS // 2 + 5)
    src = tmp_path / "f"
    src.write_bytes(data)
    art, _ = store.put_file(src, chunk_size=CS)
    cases = [
        (0, 10),
        (CS - 5, 10),  # straddles chunk 0/1
        (CS - 1, 2 * CS + 2),  # three chunks
        (3 * CS - 3, CS + 6),  # data → zero chunk → zero chunk
        (5 * CS - 2, 10),  # zero → short last chunk
        (len(data) - 4, 100),  # short at EOF
        (len(data), 5),
        (17, 0),
    ]
    for off, ln in cases:
        assert store.read_range(art, off, ln) == data[off : off + ln], (off, ln)
    with pytest.raises(UsageError):
        store.read_range(art, len(data) + 1, 1)
    with pytest.raises(UsageError):
        store.read_range(art, -1, 1)


def test_read_range_reads_only_covering_chunks(store: ChunkStore, tmp_path: Path):
    rng = random.Random(8)
    src = tmp_path / "f"
    src.write_bytes(rng.randbytes(4 * CS))
    art, _ = store.put_file(src, chunk_size=CS)
    for h in (art.chunks[0], art.chunks[3]):  # ranges inside chunks 1..2 never need these
        os.unlink(store.chunk_path(h))
    assert store.read_range(art, CS + 10, CS) == src.read_bytes()[CS + 10 : 2 * CS + 10]


def test_shared_chunks_of_unrelated_files_are_stored_once(store: ChunkStore, tmp_path: Path):
    rng = random.Random(9)
    common = [rng.randbytes(CS) for _ in range(4)]
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.write_bytes(rng.randbytes(CS) + b"".join(common))
    b.write_bytes(b"".join(reversed(common)) + rng.randbytes(CS) + b"tail")
    art_a, sa = store.put_file(a, chunk_size=CS)
    art_b, sb = store.put_file(b, chunk_size=CS)
    assert sa.chunks_new == 5
    assert sb.chunks_new == 2 and sb.chunks_reused == 4
    store.commit({"a": art_a, "b": art_b})
    assert len(chunk_files(store)) == 7


def test_repeated_chunk_in_one_file_is_written_once(store: ChunkStore, tmp_path: Path):
    block = random.Random(10).randbytes(CS)
    src = tmp_path / "f"
    src.write_bytes(block * 6)
    art, stats = store.put_file(src, chunk_size=CS)
    assert stats.chunks_new == 1 and stats.chunks_reused == 5
    assert len(set(art.chunks)) == 1
    out = tmp_path / "out"
    store.materialize(art, out)
    assert out.read_bytes() == block * 6


@pytest.mark.parametrize("bad", [0, 1000, 4096 + 1, 2048, 3 * 4096])
def test_bad_chunk_size_is_a_usage_error(store: ChunkStore, tmp_path: Path, bad: int):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(UsageError, match="power of two"):
        store.put_file(src, chunk_size=bad)


def test_artifact_validates_chunk_count():
    from torpor.store import ManifestError

    with pytest.raises(ManifestError, match="needs 2 chunk"):
        Artifact(size=5000, chunk_size=4096, chunks=(None,))


def test_store_folder_is_relocatable(tmp_path: Path):
    import shutil

    rng = random.Random(11)
    src = tmp_path / "f"
    src.write_bytes(rng.randbytes(3 * CS + 5) + bytes(CS))
    with ChunkStore(tmp_path / "here") as s:
        art, _ = s.put_file(src, chunk_size=CS)
        m = s.commit({"memory": art})
    shutil.copytree(tmp_path / "here", tmp_path / "elsewhere" / "store")
    shutil.rmtree(tmp_path / "here")
    with ChunkStore(tmp_path / "elsewhere" / "store") as s2:
        got = s2.get(m.id[:10])
        assert got == m
        out = tmp_path / "out"
        s2.materialize(got.artifacts["memory"], out)
        assert same_content(src, out)
        assert s2.verify().ok
        assert (
            s2.read_range(got.artifacts["memory"], CS - 1, 3) == src.read_bytes()[CS - 1 : CS + 2]
        )
    # Nothing absolute inside the store.
    for p in (tmp_path / "elsewhere" / "store").rglob("*"):
        if p.is_file() and p.name != "key":
            assert str(tmp_path).encode() not in p.read_bytes(), p


def test_progress_reaches_the_end_and_missing_file_is_not_found(store, tmp_path):
    from torpor.errors import NotFoundError

    src = write_sparse(tmp_path / "f", 64 * MiB, [(3 * MiB, b"x" * 100)])
    seen: list[tuple[int, int]] = []
    store.put_file(src, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (64 * MiB, 64 * MiB)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(NotFoundError):
        store.put_file(tmp_path / "nope")
